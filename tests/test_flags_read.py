"""No script offers a flag it ignores: each script runs once on the synthetic data, and every flag its --help offers is
read by the script (directly, or through the run's settings). A flag added but never wired in fails here."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
from PIL import Image

import engine
import engine.help
import evaluate
import export
import hyperparameter_tune
import main
import modified_models
import predict
import transfer_learning
import tsne
import tuning
import visualize
from conftest import quick_config, run_command, synthetic_arrays, write_image_folder

READ: set[str] = set()  # the names read on a parsed command line since it was parsed


class RecordingNamespace(argparse.Namespace):
    """A parsed command line that notes each setting read from it (copies too: copy.copy keeps the class)."""

    def __getattribute__(self, name: str):
        if not name.startswith("_"):
            READ.add(name)
        return super().__getattribute__(name)


@pytest.fixture
def parsers(monkeypatch) -> list[argparse.ArgumentParser]:
    """Every parse_args of the test parses into a RecordingNamespace; the parsers, in order."""
    parsed: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        result = original(self, args, RecordingNamespace() if namespace is None else namespace)
        READ.clear()  # argparse's own look-ups while parsing are not the script's
        parsed.append(self)
        return result

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    return parsed


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A CIFAR10Net run (its model.pth also as a plain state dict outside it), the image-folder tree it trained on, and
    a photo."""
    root = tmp_path_factory.mktemp("flags")
    arrays = synthetic_arrays()
    config = quick_config(root, "CIFAR10Net", epochs=1)
    engine.train(config, engine.model_spec("CIFAR10Net"), data=engine.SplitData.from_arrays(arrays))
    shutil.copy(Path(config.out_dir) / "model.pth", root / "plain.pth")
    photo = root / "photo.png"
    Image.fromarray(arrays.test_images[0].permute(1, 2, 0).numpy()).save(photo)
    return Path(config.out_dir), write_image_folder(root / "tree", arrays), photo


def command_lines(run: Path, tree: Path, photo: Path, out: Path) -> dict[str, tuple]:
    """Each script's module and the command lines that, between them, take every branch that reads a flag."""
    quick = ("--data-dir", tree, "--device", "cpu", "--no-progress", "--logger", "none", "--no-tsne")
    short = ("--epochs", "1", "--batch-size", "32", "--limit-train", "64")
    tune = ("--data-dir", tree, "--device", "cpu", "--no-tsne", "--n-trials", "1", "--epochs", "1")
    transfer = ("--weights", "none", "--image-size", "32")
    embed = ("--tsne-samples", "40", "--tsne-method", "sklearn", "--splits", "test")
    return {
        "main.py": (main, [(*quick, *short, "--out-dir", out)]),
        "modified_models.py": (
            modified_models,
            [("--list",), ("--models", "CIFAR10Net", "CIFAR10Net_2", *quick, *short, "--out-dir", out)],
        ),
        "transfer_learning.py": (transfer_learning, [(*quick, *short, *transfer, "--out-dir", out)]),
        "hyperparameter_tune.py": (
            hyperparameter_tune,
            [(*tune, "--limit-train", "64", "--retrain", "--retrain-epochs", "1", "--out-dir", out)],
        ),
        "predict.py": (
            predict,
            [
                ("--run", run, "--device", "cpu", photo),
                ("--checkpoint", run.parent / "plain.pth", "--model", "CIFAR10Net", "--data-dir", tree, photo),
            ],
        ),
        "evaluate.py": (evaluate, [("--run", run, "--data-dir", tree, "--device", "cpu", "--out-dir", out)]),
        "tsne.py": (tsne, [("--run", run, "--data-dir", tree, "--device", "cpu", *embed, "--out-dir", out)]),
        "export.py": (export, [("--run", run, "--out", out / "model.onnx")]),
        "visualize.py": (visualize, [("--run", run, "--data-dir", tree, "--device", "cpu", "--out-dir", out)]),
    }


@pytest.mark.parametrize(
    "script",
    [
        "main.py",
        "modified_models.py",
        "transfer_learning.py",
        "hyperparameter_tune.py",
        "predict.py",
        "evaluate.py",
        "tsne.py",
        "export.py",
        "visualize.py",
    ],
)
def test_every_flag_a_script_offers_is_read(script, parsers, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        tuning.outputs, "write_figures", lambda study, out_dir: []
    )  # Optuna's figures: seconds, and no flag
    module, runs = command_lines(*trained, tmp_path / "out")[script]
    read = set()
    for argv in runs:
        code, out, err = run_command(module, monkeypatch, capsys, *argv)
        assert code == 0, err
        read |= READ
    parser = parsers[0]  # the script's own: the first it parses (a tuning retrain parses no other)
    offered = {
        action.dest: action.option_strings[0]
        for action in parser._actions
        if action.option_strings and not isinstance(action, (argparse._HelpAction, engine.help.HelpAction))
    }
    ignored = sorted(flag for dest, flag in offered.items() if dest not in read)
    assert not ignored, f"{script} offers {', '.join(ignored)} but never reads them"
