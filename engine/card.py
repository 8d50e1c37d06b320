"""The model card: what using a trained network needs besides its weights, one type on both sides.

A run writes it as model.json and into every checkpoint (``model_card``); ``saved_models`` reads it back with
``ModelCard.from_dict`` and rebuilds the network from it exactly: the model's registry name and its options, the class
names in label order (their number sizes the last layer), the per-channel mean and std the inputs were normalised with,
the image size, the test-time augmentation and the precision it was trained and tested at; and, to say what trained it,
the versions of torch, torchvision and lightning and the git commit of the toolkit (when it ran from a git checkout).
Cards written before the options existed (no ``options``) still load: their models are built with their default options,
which is what trained them. A card is input like a flag: every field is checked before anything is built from it, and
every number is bounded (the options by their model's declaration), so a hand-edited card is one line, never a 24 GB
resize or an answer quietly changed.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from engine.config import PRECISIONS, TTA_MODES
from engine.data import INPUT_SIZE
from engine.errors import UserError

LIBRARIES = ("torch", "torchvision", "lightning")
REPOSITORY = Path(__file__).resolve().parents[1]


def library_versions() -> dict[str, str]:
    """The installed versions of the libraries that trained a network (read from the installation, nothing imported)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The toolkit's git commit, with "-dirty" when its tracked files have changes; None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git installed, or it hangs
        return None
    return commit.stdout.strip() + ("-dirty" if dirty else "")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def per_channel(values: Any, fits: Callable[[float], bool]) -> bool:
    """Whether ``values`` is one finite number per colour channel, each one that ``fits``."""
    return isinstance(values, list) and len(values) == 3 and all(is_number(value) and fits(value) for value in values)


@dataclass(frozen=True)
class ModelCard:
    """What using a trained network needs besides its weights; a run writes it as model.json."""

    model: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    image_size: int = INPUT_SIZE  # the side every image is resized to: what every network here takes
    tta: str = "none"
    # as the run resolved --precision; cards written before it was recorded default to float32
    precision: str = "32-true"
    versions: dict[str, str] = field(default_factory=dict)
    commit: str | None = None

    @property
    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std as the float32 tensors ``engine.predict`` takes (the very values training used)."""
        return torch.tensor(self.mean, dtype=torch.float32), torch.tensor(self.std, dtype=torch.float32)

    def to_dict(self) -> dict[str, Any]:
        card = asdict(self)
        card.update(classes=list(self.classes), mean=list(self.mean), std=list(self.std))
        return card

    @classmethod
    def from_dict(cls, card: Any, source: str) -> ModelCard:
        """The card read from ``source`` (a model.json, a checkpoint), checked; one line naming what is
        wrong otherwise."""
        problem = card_problem(card)
        if problem:
            raise UserError(
                f"{source} is not a model card this toolkit wrote ({problem}); correct it, or copy it again from the "
                "run that wrote it"
            )
        return cls(
            card["model"],
            tuple(card["classes"]),
            tuple(map(float, card["mean"])),
            tuple(map(float, card["std"])),
            dict(card.get("options", {})),
            int(card.get("image_size", INPUT_SIZE)),
            card.get("tta", "none"),
            card.get("precision", "32-true"),
            dict(card.get("versions", {})),
            card.get("commit"),
        )


def card_problem(card: Any) -> str:
    """What is wrong with a card; empty if nothing. Each field is checked as its flag would be, each number bounded:
    the mean and std are of pixels in 0..1, and the image size is the one every network takes (the options are checked
    against the model's declaration when the network is built from them)."""
    if not isinstance(card, dict):
        return f"a {type(card).__name__}, not a mapping"
    if not isinstance(card.get("model"), str):
        return "no model name"
    classes = card.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(name, str) for name in classes)):
        return "classes must be a list of at least 2 class names"
    if len(set(classes)) < len(classes):
        return "the class names must all differ"
    if not per_channel(card.get("mean"), lambda mean: 0 <= mean <= 1):
        return "mean must be 3 numbers from 0 to 1, one per colour channel"
    if not per_channel(card.get("std"), lambda std: 0 < std <= 1):
        return "std must be 3 numbers above 0 and at most 1, one per colour channel"
    if not isinstance(card.get("options", {}), dict):
        return "options must be a mapping of option names to values"
    if card.get("image_size", INPUT_SIZE) != INPUT_SIZE:
        return f"image_size is {card['image_size']!r}, and every network here takes {INPUT_SIZE}x{INPUT_SIZE} images"
    if card.get("tta", "none") not in TTA_MODES:
        return f"tta must be one of {', '.join(TTA_MODES)}"
    if card.get("precision", "32-true") not in PRECISIONS[1:]:
        return f"precision must be one of {', '.join(PRECISIONS[1:])}"
    versions = card.get("versions", {})
    if not (isinstance(versions, dict) and all(isinstance(value, str) for value in versions.values())):
        return "versions must map library names to their versions"
    if not isinstance(card.get("commit"), (str, type(None))):
        return "commit must be a git commit's name or null"
    return ""
