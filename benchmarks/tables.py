"""The two files a benchmark leaves: runs.csv (every column, for a program) and runs.md (a table, for the docs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import engine
from engine import write_atomically


def write_runs(
    out_dir: Path,
    rows: list[dict],
    columns: tuple[str, ...],
    title: str,
    headings: dict[str, str],
    cells: Callable[[dict], list[str]],
) -> str:
    """runs.csv with ``columns`` of ``rows``, and runs.md: ``title``, then a table whose ``headings`` map each heading
    to its alignment ("l" or "r") and whose row for each run is ``cells(row)``; both written atomically. Returns
    runs.md's text."""
    engine.write_csv(out_dir / "runs.csv", rows, columns)
    lines = [
        title,
        "",
        "| " + " | ".join(headings) + " |",
        "|" + "|".join("---:" if align == "r" else "---" for align in headings.values()) + "|",
    ]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    write_atomically(out_dir / "runs.md", lambda tmp: tmp.write_text(text))
    return text


def percent(value: float | None) -> str:
    """A fraction as a table writes it; n/a where it was not measured (a run with --val-every 0 has no validation)."""
    return "n/a" if value is None else f"{value:.2%}"
