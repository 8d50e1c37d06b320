"""Parse first: every script's --help and its flag mistakes answer before Lightning, scikit-learn, matplotlib and
torchvision load (engine.ON_FIRST_USE and models/transfer.py load them on first use), and the names loaded on first use
exist."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from benchmarks import bench_startup
from conftest import run_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = (
    "main.py",
    "modified_models.py",
    "hyperparameter_tune.py",
    "transfer_learning.py",
    "predict.py",
    "evaluate.py",
    "tsne.py",
    "export.py",
    "visualize.py",
)
HEAVY = ("lightning", "sklearn", "matplotlib", "torchvision", "captum")
# Optuna's figures are drawn through pyplot, which tuning.study imports (0.4 s of the tuner's start on a 2-core CPU).
ALLOWED = {"hyperparameter_tune.py": ("matplotlib",)}

# Runs a script as `python SCRIPT ARGS...` would, then reports its exit status and which heavy libraries it loaded.
PROBE = """
import json, runpy, sys
script, *args = sys.argv[1:]
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
    status = 0
except SystemExit as exit:
    status = exit.code
print("PROBE " + json.dumps({"status": status, "loaded": [name for name in HEAVY if name in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def probe(script: str, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, result.stderr[-2000:]
    return json.loads(lines[-1].removeprefix("PROBE ")) | {"stdout": result.stdout, "stderr": result.stderr}


# --help shows what a study user needs in at most this many lines; --help-all shows every flag.
HELP_LINES = {"main.py": 80, "modified_models.py": 100, "transfer_learning.py": 100, "hyperparameter_tune.py": 100}
OTHER_SCRIPTS_HELP_LINES = 80


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_fits_two_screens_and_help_all_lists_every_flag(script):
    shown, every = probe(script, "--help"), probe(script, "--help-all")
    assert shown["status"] == every["status"] == 0
    assert set(every["loaded"]) <= set(ALLOWED.get(script, ())), f"{script} --help-all loaded {every['loaded']}"
    lines = [line for line in shown["stdout"].splitlines() if not line.startswith("PROBE ")]
    assert len(lines) <= HELP_LINES.get(script, OTHER_SCRIPTS_HELP_LINES), "\n".join(lines)
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", every["stdout"]))
    assert {"--help", "--help-all"} <= flags
    hidden = flags - set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", shown["stdout"]))
    assert not hidden or "more options for speed runs" in shown["stdout"]  # --help says what it left out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_a_flag_mistake_answer_before_the_heavy_libraries_load(script):
    shown = probe(script, "--help")
    assert shown["status"] == 0 and "usage:" in shown["stdout"]
    assert set(shown["loaded"]) <= set(ALLOWED.get(script, ())), f"{script} --help loaded {shown['loaded']}"
    mistake = probe(script, "--no-such-flag")
    assert mistake["status"] == 2 and "error:" in mistake["stderr"]  # predict.py names its missing images first
    assert set(mistake["loaded"]) <= set(ALLOWED.get(script, ())), (
        f"{script} with a wrong flag loaded {mistake['loaded']}"
    )


def test_a_bad_value_is_refused_before_lightning_loads():
    refused = probe("main.py", "--epochs", "0")
    assert (
        refused["status"] == 2
        and "--epochs: must be a number of epochs above 0 (e.g. 8, or 7.5), got 0" in refused["stderr"]
    )
    assert "lightning" not in refused["loaded"]


def test_every_name_loaded_on_first_use_is_in_its_module():
    for module, names in engine.ON_FIRST_USE.items():
        loaded = importlib.import_module(f"engine.{module}")
        for name in names:
            assert getattr(engine, name) is getattr(loaded, name), f"engine.{name} is not engine.{module}.{name}"


def test_the_start_up_benchmark_times_both_checkouts_and_refuses_a_folder_that_is_not_one(monkeypatch, tmp_path):
    argv = ["--before", str(ROOT), "--rounds", "1", "--scripts", "evaluate.py", "--out-dir", str(tmp_path / "bench")]
    assert run_script(monkeypatch, bench_startup.main, "bench_startup.py", *argv) == 0
    rows = (tmp_path / "bench/runs.md").read_text().splitlines()
    assert [row.split(" | ")[1] for row in rows if row.startswith("| evaluate.py")] == ["--help", "a flag mistake"]
    assert (
        run_script(
            monkeypatch,
            bench_startup.main,
            "bench_startup.py",
            "--before",
            str(tmp_path),
            "--out-dir",
            str(tmp_path / "b2"),
        )
        == 2
    )
