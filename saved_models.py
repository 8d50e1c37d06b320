"""Find and load a trained model: its network with the saved weights, and its card (what feeding the network needs).

    saved_models.open_saved_model(run="runs/CIFAR10Net")                            # model.json + model.pth
    saved_models.open_saved_model(run="runs/CIFAR10Net", checkpoint="best.ckpt")    # another weights file of the run
    saved_models.open_saved_model(checkpoint="elsewhere/best.ckpt")                 # the card inside the checkpoint
    saved_models.open_saved_model(checkpoint="CIFAR10Net_7.pth", model="CIFAR10Net_7")   # a plain state dict

A run writes its model card as model.json (and into last.ckpt and best.ckpt as ``model_card``): the model's name,
the class names in label order, the per-channel mean and std its inputs were normalised with, the image size and its
test-time augmentation. A plain state dict saved by the original study's scripts has no card; ``card_from_data``
makes one from the data (the training split's statistics, as training computes them), and ``card_from_data_dir``
falls back on CIFAR-10's published statistics when no data is at hand. The weights are read with
``weights_only=True`` and checked to fit before use (``engine.load_weights``); a transfer-learning run's network is
rebuilt from its transfer.json.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import engine
import models  # noqa: F401  (registers every model, so a card's or --model's name finds its network)
from functions import CLASSES, UserError
from models.transfer import ARCHS, FINETUNE_CHOICES, build_transfer_net

CARD_FILE = "model.json"
TRANSFER_FILE = "transfer.json"
DEFAULT_WEIGHTS = "model.pth"  # a run's final weights, as a plain state dict

# CIFAR-10's published per-channel statistics of all 50,000 official training images, in [0, 1] units (population
# std over every pixel, as functions.mean_std_per_channel computes it). A run normalises with those of its own
# 45,000-image training split, which differ from these in the fourth decimal on the official files: used only for a
# plain state dict when no data is at hand, and said so.
OFFICIAL_MEAN = (0.4914, 0.4822, 0.4465)
OFFICIAL_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCard:
    """What using a trained network needs besides its weights; a run writes it as model.json."""

    model: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int = 32
    tta: str = "none"

    @property
    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std as the float32 tensors ``engine.predict`` takes (the very values training used)."""
        return torch.tensor(self.mean, dtype=torch.float32), torch.tensor(self.std, dtype=torch.float32)

    @classmethod
    def from_dict(cls, card: Any, source: str) -> "ModelCard":
        """The card read from ``source`` (a model.json, a checkpoint), checked; one line naming what is wrong otherwise."""
        problem = card_problem(card)
        if problem:
            raise UserError(f"{source} is not a model card this toolkit wrote ({problem}); train the model again, or give its weights "
                            f"with --checkpoint FILE --model NAME")
        return cls(card["model"], tuple(card["classes"]), tuple(map(float, card["mean"])), tuple(map(float, card["std"])),
                   int(card.get("image_size", 32)), card.get("tta", "none"))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def card_problem(card: Any) -> str:
    """What is wrong with a card; empty if nothing."""
    if not isinstance(card, dict):
        return f"a {type(card).__name__}, not a mapping"
    if not isinstance(card.get("model"), str):
        return "no model name"
    classes = card.get("classes")
    if not (isinstance(classes, list) and len(classes) == len(CLASSES) and all(isinstance(name, str) for name in classes)):
        return f"classes must be the {len(CLASSES)} class names"
    for key in ("mean", "std"):
        values = card.get(key)
        if not (isinstance(values, list) and len(values) == 3 and all(is_number(value) for value in values)):
            return f"{key} must be 3 numbers, one per colour channel"
    if not all(value > 0 for value in card["std"]):
        return "std must be positive"
    if not (isinstance(card.get("image_size", 32), int) and card.get("image_size", 32) > 0):
        return "image_size must be a positive whole number"
    if card.get("tta", "none") not in engine.TTA_MODES:
        return f"tta must be one of {', '.join(engine.TTA_MODES)}"
    return ""


def read_json_file(path: Path) -> dict[str, Any]:
    try:
        return engine.read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} cannot be read ({type(error).__name__}); copy it again from the run folder") from None


def card_from_data(model: str, data: engine.SplitData, tta: str = "none") -> ModelCard:
    """A card for weights that came without one: the data's classes and its training split's statistics, as training uses."""
    return ModelCard(model, tuple(data.classes), tuple(data.mean.tolist()), tuple(data.std.tolist()), image_size=32, tta=tta)


def card_from_official_statistics(model: str) -> ModelCard:
    return ModelCard(model, CLASSES, OFFICIAL_MEAN, OFFICIAL_STD)


def card_from_data_dir(model: str, data_dir: str | Path, num_workers: int = 2) -> ModelCard:
    """A card for weights that came without one, from the data in ``data_dir`` when it holds some; else from CIFAR-10's
    published statistics, with a note (never a download: a 170 MB archive to classify one photo is not worth it)."""
    if engine.has_local_cifar10(data_dir):
        config = engine.RunConfig(model=model, data_dir=str(data_dir), num_workers=num_workers)
        return card_from_data(model, engine.load_split(config))
    print(f"note: no CIFAR-10 in --data-dir {data_dir}, so the inputs are normalised with CIFAR-10's published training statistics "
          f"(mean {OFFICIAL_MEAN}, std {OFFICIAL_STD}); give --data-dir with the data the model trained on for its exact ones")
    return card_from_official_statistics(model)


# --------------------------------------------------------------------------------------------
# Where the weights and the card are
# --------------------------------------------------------------------------------------------
def weights_file(run: Path | None, checkpoint: Path | None) -> Path:
    """The weights to load: ``checkpoint`` (a name inside ``run`` when a run is given), else the run's model.pth."""
    if run is None:
        if checkpoint is None:
            raise UserError("give --run DIR (a run folder), or --checkpoint FILE (with --model NAME for a plain state dict)")
        return checkpoint
    if not run.is_dir():
        state = "is a file" if run.exists() else "does not exist"
        raise UserError(f"--run {run} {state}; give a run folder (one with model.json and model.pth), or --checkpoint FILE")
    name = checkpoint or Path(DEFAULT_WEIGHTS)
    if not (run / name).is_file():
        held = sorted(path.name for path in run.iterdir() if path.suffix in (".pth", ".ckpt"))
        raise UserError(f"{run} has no {name}; it holds {', '.join(held) or 'no weights'}: give --checkpoint NAME of one of them, "
                        f"or another --run")
    return run / name


def embedded_card(checkpoint: Any) -> Any:
    """The card a Lightning checkpoint carries (``model_card``); None for a plain state dict or an older checkpoint."""
    return checkpoint.get("model_card") if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict) else None


def trained_as(checkpoint: Any) -> str | None:
    """The model an older Lightning checkpoint without a card names in its run configuration."""
    config = checkpoint.get("run_config") if isinstance(checkpoint, dict) else None
    return config.get("model") if isinstance(config, dict) else None


def find_card(checkpoint: Any, weights: Path, folder: Path) -> tuple[ModelCard | None, Path | None]:
    """The card of ``weights``, and the model.json it was read from: the card inside the checkpoint (no file), else
    ``folder``'s model.json; else none."""
    card = embedded_card(checkpoint)
    if card is not None:
        return ModelCard.from_dict(card, f"the model card inside {weights}"), None
    card_file = folder / CARD_FILE
    if card_file.is_file():
        return ModelCard.from_dict(read_json_file(card_file), str(card_file)), card_file
    return None, None


def model_name(card: ModelCard | None, card_file: Path | None, model: str | None, checkpoint: Any, weights: Path) -> str:
    """The model the weights belong to: the card's; --model must agree with it. Without a card, --model, or the model
    an older checkpoint names."""
    if card is not None:
        if model is not None and model != card.model:
            raise UserError(f"{weights} holds {card.model} (so says {card_file or 'its model card'}), not --model {model}; "
                            f"drop --model or give {card.model}")
        return card.model
    name = model or trained_as(checkpoint)
    if name is None:
        raise UserError(f"{weights} is a plain state dict with no {CARD_FILE} beside it, so which network it holds is unknown; "
                        f"give --model NAME (python modified_models.py --list shows them)")
    return name


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
def transfer_network(name: str, transfer_file: Path) -> nn.Module:
    """A transfer-learning run's network, rebuilt from its transfer.json without downloading the ImageNet weights
    (the saved weights replace them all)."""
    options = read_json_file(transfer_file)
    arch, finetune, image_size = (options.get(key) if isinstance(options, dict) else None for key in ("arch", "finetune", "image_size"))
    if arch not in ARCHS or finetune not in FINETUNE_CHOICES or not isinstance(image_size, int) or image_size < 32:
        raise UserError(f"{transfer_file} does not describe a transfer-learning network (arch {arch!r}, finetune {finetune!r}, "
                        f"image_size {image_size!r}); copy it again from the run folder of {name}")
    return build_transfer_net(arch, "none", image_size, finetune)


def build_network(name: str, folder: Path) -> nn.Module:
    """A registered model's network by its name; a transfer-learning run's from the transfer.json in ``folder``."""
    if name in engine.MODELS:
        return engine.model_spec(name).build()
    if (folder / TRANSFER_FILE).is_file():
        return transfer_network(name, folder / TRANSFER_FILE)
    raise UserError(f"{name} is not a registered model and {folder} has no {TRANSFER_FILE} to rebuild a transfer-learning network from; "
                    f"choose one of: {', '.join(engine.MODELS)}")


# --------------------------------------------------------------------------------------------
# A saved model
# --------------------------------------------------------------------------------------------
@dataclass
class SavedModel:
    """A trained network in eval mode on the CPU, the file its weights came from, and its card (None for a plain state dict
    given with --model: then ``card_from_data`` or ``card_from_data_dir`` makes one)."""

    net: nn.Module
    name: str
    weights: Path
    card: ModelCard | None
    card_file: Path | None  # the model.json the card came from; None when the checkpoint carried it, or there is none

    def describe(self) -> str:
        return f"{self.name} from {self.weights}" + (f" (card: {self.card_file})" if self.card_file else "")


def open_saved_model(run: str | Path | None = None, checkpoint: str | Path | None = None, model: str | None = None) -> SavedModel:
    """The model saved in the run folder ``run`` (its model.pth, or its file ``checkpoint``), or in the file
    ``checkpoint``; ``model`` names the network of a plain state dict that has no model.json beside it."""
    run = Path(run) if run is not None else None
    weights = weights_file(run, Path(checkpoint) if checkpoint is not None else None)
    folder = run if run is not None else weights.parent
    saved = engine.read_checkpoint(weights)
    engine.weights_in(saved, weights)  # neither a state dict nor a checkpoint: say so before building anything
    card, card_file = find_card(saved, weights, folder)
    name = model_name(card, card_file, model, saved, weights)
    net = engine.load_weights(build_network(name, folder), name, weights)
    return SavedModel(net, name, weights, card, card_file)


def add_arguments(parser: argparse.ArgumentParser, run_help: str) -> argparse._ArgumentGroup:
    """--run, --checkpoint, --model and --tta: which trained model answers, as predict.py and evaluate.py take them."""
    group = parser.add_argument_group("model")
    group.add_argument("--run", type=Path, metavar="DIR", help=run_help)
    group.add_argument("--checkpoint", metavar="PATH", help="with --run: another weights file of the run folder, e.g. best.ckpt or last.ckpt; "
                       "alone: a weights file, best.ckpt or last.ckpt (which carry their model card) or a model.pth (with model.json beside "
                       "it, or --model)")
    group.add_argument("--model", help="the network a plain state dict holds, e.g. CIFAR10Net_7 (python modified_models.py --list); only needed "
                       "when no model.json comes with the weights")
    group.add_argument("--tta", choices=tuple(engine.TTA_MODES), help=f"test-time augmentation, each image's class scores from: "
                       f"{engine.choices_help(engine.TTA_MODES)} (default: the model's own, from its model card; none for a plain state dict)")
    return group
