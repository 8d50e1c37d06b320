"""Checkpoints and saved weights: written atomically, read without unpickling arbitrary objects, checked before use.

A run writes Lightning checkpoints (``last.ckpt``, ``best.ckpt``: weights, optimiser, schedule, history, the run's
configuration) and a plain state dict (``model.pth``). Everything here that reads one turns a wrong or damaged
file into one ``UserError`` line.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import RunConfig
from engine.errors import UserError
from engine.exits import restart_command


def read_checkpoint(path: Path) -> Any:
    """A checkpoint or state dict, loaded without unpickling arbitrary objects; one clear error otherwise."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}); give a .ckpt or .pth this "
            "toolkit wrote"
        ) from None


def weights_in(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The network's state dict from a plain state dict (model.pth) or a Lightning checkpoint (.ckpt)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        # engine.ImageClassifier keeps the network as ``self.net``.
        return {
            key.removeprefix("net."): value for key, value in checkpoint["state_dict"].items() if key.startswith("net.")
        }
    if (
        isinstance(checkpoint, dict)
        and checkpoint
        and all(isinstance(value, torch.Tensor) for value in checkpoint.values())
    ):
        return checkpoint
    raise UserError(
        f"{path} holds neither a state dict nor a Lightning checkpoint; give a run's model.pth, best.ckpt or last.ckpt"
    )


def listed(kind: str, items: list[str]) -> str:
    return f"{kind} {', '.join(items[:3])}" + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """What keeps ``given`` from loading into a network whose state dict is ``expected``; empty if nothing."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [
        f"{key} {tuple(given[key].shape)} for {tuple(value.shape)}"
        for key, value in expected.items()
        if key in given and given[key].shape != value.shape
    ]
    return "; ".join(
        listed(kind, items)
        for kind, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped))
        if items
    )


def load_weights(net: nn.Module, name: str, path: Path) -> nn.Module:
    """``net`` (the model ``name``) with the weights saved at ``path``, in eval mode; one clear error if they do not
    fit.
    """
    checkpoint = read_checkpoint(path)
    state = weights_in(checkpoint, path)
    problem = state_dict_mismatch(net.state_dict(), state)
    if problem:
        trained_as = checkpoint.get("run_config", {}).get("model") if isinstance(checkpoint, dict) else None
        hint = f" (it was trained as {trained_as})" if trained_as else ""
        raise UserError(f"{path} does not fit {name}{hint}: {problem}; give the --model it was trained as")
    net.load_state_dict(state)
    return net.eval()


def damage(path: Path) -> str:
    """What is wrong with the zip archive ``torch.save`` wrote at ``path``; empty if it is whole. A truncated file has
    lost the directory at the archive's end; a changed byte fails its CRC, which ``torch.load`` does not check."""
    try:
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()
    except (zipfile.BadZipFile, OSError):
        return "cut short: the end of its archive is missing"
    return "a stored value fails its CRC check" if failed else ""


def epochs_in(path: Path) -> int | None:
    """How many epochs the checkpoint at ``path`` holds; None when it is damaged or holds no epoch."""
    checkpoint = None if damage(path) else read_checkpoint(path)
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    return epoch + 1 if isinstance(epoch, int) else None


def resume_instead(damaged: Path) -> str:
    """The way on from a damaged checkpoint: the command that resumes from the whole checkpoint beside it that holds
    the most epochs (best.ckpt, or an epoch-NNN.ckpt of --keep-epoch-checkpoints), else the one that starts again."""
    beside = [damaged.parent / "best.ckpt", *damaged.parent.glob("epoch-*.ckpt")]
    held = {path: epochs for path in beside if path != damaged and path.is_file() and (epochs := epochs_in(path))}
    if not held:
        return f"nothing beside it to continue from: start the run again with: {restart_command(sys.argv)} --overwrite"
    path = max(held, key=held.get)
    return f"continue from {path}, which holds epoch {held[path]}, with: {restart_command(sys.argv)} --resume {path}"


def resume_path(config: RunConfig) -> Path:
    """The checkpoint --resume names: last.ckpt in the run folder, or the file given; checked to be whole first, so that
    one damaged by a full disk or a copy that stopped names the checkpoint to continue from instead."""
    path = Path(config.out_dir) / "last.ckpt" if config.resume == "last" else Path(config.resume)
    problem = damage(path) if path.is_file() else ""
    if problem:
        raise UserError(f"{path} is damaged ({problem}); {resume_instead(path)}")
    return path


def resume_checkpoint(config: RunConfig, run_dir: Path) -> Path | None:
    """The checkpoint --resume asks for, checked to be a training checkpoint of this model; None without --resume."""
    if config.resume is None:
        return None
    path = resume_path(config)
    if config.resume == "last" and not path.is_file():
        raise UserError(
            f"nothing to resume: {run_dir} has no last.ckpt (no epoch finished there); drop --resume to start the run "
            "again (with --overwrite if the folder holds its first files), or give --out-dir of the interrupted run"
        )
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        held = "a plain state dict (model.pth)" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise UserError(f"{path} holds {held}, not a training checkpoint; resume from a run's last.ckpt or best.ckpt")
    saved = checkpoint.get("run_config", {})
    if not isinstance(saved, dict) or not isinstance(saved.get("recipe", {}), dict):
        raise UserError(
            f"{path} holds damaged run settings (run_config is a {type(saved).__name__}); resume from another "
            "checkpoint of the run, or start it again with --overwrite"
        )
    if saved.get("model") != config.model:
        raise UserError(
            f"{path} is a checkpoint of {saved.get('model', 'an unknown model')}, not {config.model}; "
            f"resume with the same --model, or start a new --out-dir"
        )
    options = saved.get("model_options", config.model_options)  # older checkpoints have none: their models had none
    if options != config.model_options:
        changed = sorted(
            name for name in {*options, *config.model_options} if options.get(name) != config.model_options.get(name)
        )
        raise UserError(
            f"{path} is a checkpoint of {config.model} with other model options "
            f"({', '.join(f'{name} {options.get(name)!r}' for name in changed)}); "
            f"resume with the options it was trained with, or start a new --out-dir"
        )
    if saved.get("recipe", {}).get("epochs", config.recipe.epochs) > config.recipe.epochs:
        raise UserError(
            f"{path} was trained for more epochs than --epochs {config.recipe.epochs:g}; raise --epochs to continue"
        )
    return path


def saved_progress(config: RunConfig, run_dir: Path) -> str | None:
    """What an interrupted run keeps: the epochs in last.ckpt; None if it has none."""
    last = run_dir / "last.ckpt"
    try:
        epochs = torch.load(last, map_location="cpu", weights_only=True)["epoch"] + 1
    except FileNotFoundError:
        return None
    return f"{last} holds epoch {epochs} of {config.recipe.epochs:g}"
