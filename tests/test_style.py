"""The code's form, as CI enforces it: ruff's lint and format checks (pyproject.toml) pass on the whole tree, and the
pre-commit hook runs the same ruff release that requirements.txt pins."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("command", [("check",), ("format", "--check")], ids=["check", "format"])
def test_ruff_passes_on_the_whole_tree(command):
    done = ruff(*command)
    assert done.returncode == 0, f"ruff {' '.join(command)} (fix with ruff check --fix / ruff format):\n{done.stdout}"


def test_pre_commit_runs_the_ruff_that_requirements_pin():
    pinned = re.search(r"^ruff==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    hook = re.search(r"ruff-pre-commit\s+rev: v(\S+)", (ROOT / ".pre-commit-config.yaml").read_text())
    assert pinned and hook and pinned[1] == hook[1]
