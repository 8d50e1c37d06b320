"""Progress a user can watch, on a terminal and in a log file alike.

On a terminal: tqdm bars. Piped to a file (a cluster's job log, ``> log.txt``), a bar's carriage returns and
cursor codes would fill the file with fragments, so there: a plain line at most every ``LINE_EVERY_S`` seconds.
(The Trainer's epoch bar, a Lightning callback, is ``engine.callbacks.EpochProgressBar``.)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
LINE_EVERY_S = 30.0


def on_terminal() -> bool:
    """Whether progress bars can be drawn: standard output is a terminal, not a file or a pipe."""
    return sys.stdout.isatty()


def progress_enabled(setting: bool | None) -> bool:
    """--progress / --no-progress, or (None, the default) bars only on a terminal."""
    return on_terminal() if setting is None else setting


class ProgressLines:
    """``report(done)`` prints "<label>: <done> of <total> <unit>" at most every ``LINE_EVERY_S`` seconds, and at the
    end.
    """

    def __init__(self, label: str, total: int, unit: str):
        self.label, self.total, self.unit = label, total, unit
        self.last = time.monotonic()

    def report(self, done: int) -> None:
        now = time.monotonic()
        if done >= self.total or now - self.last >= LINE_EVERY_S:
            print(f"{self.label}: {done:,} of {self.total:,} {self.unit}", flush=True)
            self.last = now


def watched(items: Iterable[Item], total: int, label: str, unit: str = "batches") -> Iterator[Item]:
    """``items``, with a bar on a terminal or a line every half minute in a file."""
    if on_terminal():
        yield from tqdm(items, total=total, desc=label, unit=unit[:-1] if unit.endswith("s") else unit, leave=False)
        return
    lines = ProgressLines(label, total, unit)
    for done, item in enumerate(items, 1):
        yield item
        lines.report(done)
