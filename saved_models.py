"""Find and load a trained model: its network with the saved weights, and its card (what feeding the network needs).

    saved_models.open_saved_model(run="runs/CIFAR10Net")                            # model.json + model.pth
    saved_models.open_saved_model(run="runs/CIFAR10Net", checkpoint="best.ckpt")    # another weights file of the run
    saved_models.open_saved_model(checkpoint="elsewhere/best.ckpt")                 # the card inside the checkpoint
    saved_models.open_saved_model(checkpoint="CIFAR10Net_7.pth", model="CIFAR10Net_7")   # a plain state dict

A run writes its model card (``engine.ModelCard``) as model.json and into last.ckpt and best.ckpt: the model's name
and options, the class names in label order, the per-channel mean and std its inputs were normalised with, the image
size, its test-time augmentation and what trained it. The network is rebuilt from the card's name and options, so a
tuning trial, a transfer-learning run or an airbench run at another width loads like any other. A plain state dict
saved by the original study's scripts has no card; ``card_from_data`` makes one from the data (the training split's
statistics, as training computes them), and ``card_from_data_dir`` falls back on CIFAR-10's published statistics when
no data is at hand. The weights are read with ``weights_only=True`` and checked to fit before use
(``engine.load_weights``). Run folders of transfer learning written before TransferNet was a registered model name
their network in transfer.json; they load too.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

import engine
import models  # noqa: F401  (registers every model, so a card's or --model's name finds its network)
from engine import ModelCard, UserError
from functions import CLASSES

CARD_FILE = "model.json"
SHIPPED_MODELS = Path(__file__).resolve().parent / "pretrained"  # the trained models that come with the toolkit
# where files about a model go when its own folder is not the user's run folder
EVALUATIONS = Path("runs") / "evaluations"
# where export.py writes a model's files when its own folder is not the user's run folder
EXPORTS = Path("runs") / "exports"
LEGACY_TRANSFER_FILE = "transfer.json"  # a transfer-learning run's options, before TransferNet was a registered model
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
def read_json_file(path: Path) -> dict[str, Any]:
    try:
        return engine.read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} cannot be read ({type(error).__name__}); copy it again from the run folder") from None


def card_from_data(model: str, data: engine.SplitData, tta: str = "none") -> ModelCard:
    """A card for weights that came without one: the data's classes and its training split's statistics, as training
    uses.
    """
    return ModelCard(model, tuple(data.classes), tuple(data.mean.tolist()), tuple(data.std.tolist()), tta=tta)


def card_from_official_statistics(model: str) -> ModelCard:
    return ModelCard(model, CLASSES, OFFICIAL_MEAN, OFFICIAL_STD)


def card_from_data_dir(model: str, data_dir: str | Path, num_workers: int = 2) -> ModelCard:
    """A card for weights that came without one, from the data in ``data_dir`` when it holds some; else from CIFAR-10's
    published statistics, with a note (never a download: a 170 MB archive to classify one photo is not worth it)."""
    if engine.has_local_dataset(data_dir):
        config = engine.RunConfig(model=model, data_dir=str(data_dir), num_workers=num_workers)
        return card_from_data(model, engine.load_split(config))
    print(
        f"note: no CIFAR-10 in --data-dir {data_dir}, so the inputs are normalised with CIFAR-10's published training "
        f"statistics (mean {OFFICIAL_MEAN}, std {OFFICIAL_STD}); give --data-dir with the data the model trained on "
        "for its exact ones"
    )
    return card_from_official_statistics(model)


# --------------------------------------------------------------------------------------------
# Where the weights and the card are
# --------------------------------------------------------------------------------------------
def weights_file(run: Path | None, checkpoint: Path | None) -> Path:
    """The weights to load: ``checkpoint`` (a name inside ``run`` when a run is given), else the run's model.pth."""
    if run is None:
        if checkpoint is None:
            raise UserError(
                "give --run DIR (a run folder), or --checkpoint FILE (with --model NAME for a plain state dict)"
            )
        return checkpoint
    if not run.is_dir():
        state = "is a file" if run.exists() else "does not exist"
        raise UserError(
            f"--run {run} {state}; give a run folder (one with model.json and model.pth), or --checkpoint FILE"
        )
    name = checkpoint or Path(DEFAULT_WEIGHTS)
    if not (run / name).is_file():
        held = sorted(path.name for path in run.iterdir() if path.suffix in (".pth", ".ckpt"))
        raise UserError(
            f"{run} has no {name}; it holds {', '.join(held) or 'no weights'}: give --checkpoint NAME of one of them, "
            f"or another --run"
        )
    return run / name


def embedded_card(checkpoint: Any) -> Any:
    """The card a Lightning checkpoint carries (``model_card``); None for a plain state dict or an older checkpoint."""
    return (
        checkpoint.get("model_card")
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
        else None
    )


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


def model_name(
    card: ModelCard | None, card_file: Path | None, model: str | None, checkpoint: Any, weights: Path
) -> str:
    """The model the weights belong to: the card's; --model must agree with it. Without a card, --model, or the model
    an older checkpoint names."""
    if card is not None:
        if model is not None and model != card.model:
            raise UserError(
                f"{weights} holds {card.model} (so says {card_file or 'its model card'}), not --model {model}; "
                f"drop --model or give {card.model}"
            )
        return card.model
    name = model or trained_as(checkpoint)
    if name is None:
        raise UserError(
            f"{weights} is a plain state dict with no {CARD_FILE} beside it, so which network it holds is unknown; "
            f"give --model NAME (python modified_models.py --list shows them)"
        )
    return name


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
def legacy_transfer_card(card: ModelCard, folder: Path) -> ModelCard:
    """A card of a transfer-learning run written before TransferNet was registered (its model was named like
    resnet18-transfer-fc, its options in transfer.json beside it) as today's card; any other card as it is."""
    legacy = folder / LEGACY_TRANSFER_FILE
    if card.model in engine.MODELS or not legacy.is_file():
        return card
    saved = read_json_file(legacy)
    spec = engine.model_spec("TransferNet")
    options = {name: value for name, value in saved.items() if spec.option(name)} if isinstance(saved, dict) else saved
    return replace(card, model="TransferNet", options=options)


def build_network(name: str, options: dict[str, Any], num_classes: int, source: str) -> nn.Module:
    """The registered model ``name``'s network with the ``options`` its card records (checked) and ``num_classes``
    outputs.
    """
    if name not in engine.MODELS:
        raise UserError(
            f"{source} names {name}, which is not a registered model; choose one of: {', '.join(engine.MODELS)}"
        )
    return engine.model_spec(name).build(options, num_classes, name, source=source)


# --------------------------------------------------------------------------------------------
# A saved model
# --------------------------------------------------------------------------------------------
@dataclass
class SavedModel:
    """A trained network in eval mode on the CPU, the file its weights came from, and its card (None for a plain state
    dict given with --model: then ``card_from_data`` or ``card_from_data_dir`` makes one)."""

    net: nn.Module
    name: str
    weights: Path
    card: ModelCard | None
    card_file: Path | None  # the model.json the card came from; None when the checkpoint carried it, or there is none

    def describe(self) -> str:
        spec = engine.model_spec(self.name)
        options = spec.resolve(self.name, self.card.options if self.card is not None else {}, "its card")
        different = ", ".join(
            f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in options.items()
            if value != spec.option(key).default
        )
        return f"{self.name}{f' ({different})' if different else ''} from {self.weights}" + (
            f" (card: {self.card_file})" if self.card_file else ""
        )


def open_saved_model(
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    model: str | None = None,
    card_needed_for: str | None = None,
) -> SavedModel:
    """The model saved in the run folder ``run`` (its model.pth, or its file ``checkpoint``), or in the file
    ``checkpoint``; ``model`` names the network of a plain state dict that has no model.json beside it. With
    ``card_needed_for`` (what needs the card), weights without a card are refused, before --model is asked for."""
    run = Path(run) if run is not None else None
    weights = weights_file(run, Path(checkpoint) if checkpoint is not None else None)
    folder = run if run is not None else weights.parent
    saved = engine.read_checkpoint(weights)
    engine.weights_in(saved, weights)  # neither a state dict nor a checkpoint: say so before building anything
    card, card_file = find_card(saved, weights, folder)
    if card is None and card_needed_for:
        raise UserError(
            f"{weights} has no model card ({CARD_FILE} beside it, or inside a best.ckpt or last.ckpt), and "
            f"{card_needed_for}; give a run folder with its {CARD_FILE}, or a run's best.ckpt or last.ckpt"
        )
    if card is not None:
        card = legacy_transfer_card(card, folder)
    name = model_name(card, card_file, model, saved, weights)
    source = f"the model card of {weights}" if card is not None else f"--model {name}"
    net = build_network(name, card.options if card else {}, len(card.classes) if card else len(CLASSES), source)
    net = engine.load_weights(net, name, weights)
    return SavedModel(net, name, weights, card, card_file)


def card_for_data(saved: SavedModel, data: engine.SplitData) -> ModelCard:
    """``saved``'s card, checked to name the data's classes (the labels of the data must mean what the model's outputs
    mean, or every number measured on it is wrong); for a plain state dict, one made from the data, as training makes
    it."""
    card = saved.card or card_from_data(saved.name, data)
    if tuple(card.classes) != tuple(data.classes):
        raise UserError(
            f"{saved.weights} was trained on the classes {', '.join(card.classes)} but the data has "
            f"{', '.join(data.classes)} (in label order); give --data-dir with the data it was trained on"
        )
    return card


def output_folder(saved: SavedModel, elsewhere: Path = EVALUATIONS) -> Path:
    """Where evaluate.py, tsne.py and export.py write about ``saved`` by default: beside its weights when they are in a
    run folder of the user's (one with its model card, model.json; writable); else, for the toolkit's shipped model, a
    read-only folder or weights outside a run folder, ``elsewhere``/<that folder's name> (runs/evaluations/, or
    export.py's runs/exports/), so nothing lands in the repository or in someone else's files."""
    folder = saved.weights.parent
    shipped = folder.resolve().is_relative_to(SHIPPED_MODELS)
    if (folder / CARD_FILE).is_file() and not shipped and os.access(folder, os.W_OK):
        return folder
    return elsewhere / folder.resolve().name


def add_arguments(
    parser: argparse.ArgumentParser, run_help: str, tta: bool = True, model: bool = True
) -> argparse._ArgumentGroup:
    """--run, --checkpoint, (with ``model``) --model and (with ``tta``) --tta: which trained model answers, as
    predict.py, evaluate.py, tsne.py and export.py take them."""
    group = parser.add_argument_group("model")
    group.add_argument("--run", type=Path, metavar="DIR", help=run_help)
    group.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="with --run: another weights file of the run folder, e.g. best.ckpt or last.ckpt; alone: a weights file, "
        "best.ckpt or last.ckpt (which carry their model card) or a model.pth (with model.json beside it"
        + (", or --model)" if model else ")"),
    )
    if model:
        group.add_argument(
            "--model",
            help="the network a plain state dict holds, e.g. CIFAR10Net_7 (python modified_models.py --list); only "
            "needed when no model.json comes with the weights",
        )
    if tta:
        group.add_argument(
            "--tta",
            choices=tuple(engine.TTA_MODES),
            help=f"test-time augmentation, each image's class scores from: {engine.choices_help(engine.TTA_MODES)} "
            "(default: the model's own, from its model card; none for a plain state dict)",
        )
    return group
