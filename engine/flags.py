"""The types a flag's value is checked by: a bad value is argparse's one line and exit status 2, on the command line and
in a --config file or a checkpoint alike (engine.settings applies the same types)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def epoch_count(text: str) -> int | float:
    """Whole epochs, or with a fraction: the last epoch trains that part of its batches."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of epochs above 0 (e.g. 8, or 7.5), got {text}")
    return int(value) if value.is_integer() else value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def beta(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def open_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {text}")
    return value


# The original study's augmentation and search space were once named "readme" (after the study's README): the
# commands, config.json files, checkpoints and studies of then still say so, and still work.
FORMER_NAMES = {"readme": "study"}


def former_name(text: str) -> str:
    """A choice as it is named now (a flag type: it runs before argparse checks the choices, also on a --config or
    --resume value)."""
    return FORMER_NAMES.get(text, text)


def on_off(value: bool) -> str:
    return "on" if value else "off"


def choices_help(table: dict[str, Any], describe: Callable[[Any], str] = str) -> str:
    """ "name: description; ..." for a --help text (where argparse reads % as a format: "23%" is written "23%%")."""
    return "; ".join(f"{name}: {describe(value)}" for name, value in table.items()).replace("%", "%%")
