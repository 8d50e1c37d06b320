"""Watching a run and running it again: logs that read well in a file, TensorBoard, live curves, progress of long
steps, --config, the precision a GPU gets."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import engine
import engine.callbacks
import engine.devices
import engine.plots
import engine.progress
import main as main_script
from conftest import quick_config, run_script, write_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path, arrays) -> Path:
    return write_image_folder(tmp_path / "data", arrays)


def run_main(monkeypatch, *argv) -> int:
    return run_script(monkeypatch, main_script.main, "main.py", *argv)


def test_piped_output_has_one_clean_line_per_epoch_and_forced_bars_count_epochs_from_one(tmp_path, data_dir):
    command = [
        sys.executable,
        str(REPO / "main.py"),
        "--data-dir",
        str(data_dir),
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--augment",
        "none",
        "--no-tsne",
        "--device",
        "cpu",
    ]
    piped = subprocess.run(
        [*command, "--out-dir", str(tmp_path / "piped")], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert piped.returncode == 0, piped.stderr[-2000:]
    log = piped.stdout + piped.stderr
    assert "\r" not in log and "\x1b[" not in log
    epoch_lines = [line for line in log.splitlines() if line.startswith("After epoch")]
    assert [line.split(":")[0] for line in epoch_lines] == ["After epoch 1", "After epoch 2", "After epoch 3"]
    assert "Training CIFAR10Net for 3 epochs on cpu, 32-true precision" in log and "GPU available" not in log

    forced = subprocess.run(
        [*command, "--progress", "--out-dir", str(tmp_path / "forced")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "Epoch 1/3" in forced.stdout and "Epoch 3/3" in forced.stdout and "Epoch 0" not in forced.stdout
    assert "Validation" not in forced.stdout  # no bars for validation
    assert forced.stdout.count("After epoch") == 3


@pytest.mark.parametrize(
    "logger, written",
    [("tensorboard", "tensorboard/events.out.tfevents.*"), ("csv", "csv_log/metrics.csv"), ("none", None)],
)
def test_the_logger_writes_into_the_run_folder(tmp_path, split, logger, written):
    config = replace(quick_config(tmp_path), logger=logger)
    engine.train(config, engine.model_spec("CIFAR10Net"), data=split)
    run_dir = Path(config.out_dir)
    found = {path.relative_to(run_dir) for path in run_dir.rglob("*") if path.is_file()}
    if written is None:
        assert not (run_dir / "tensorboard").exists() and not (run_dir / "csv_log").exists()
        return
    assert any(path.match(written) for path in found), found
    if logger == "csv":
        logged = (run_dir / "csv_log/metrics.csv").read_text().splitlines()[0].split(",")
        assert {"val_loss", "val_accuracy", "train_loss", "train_accuracy", "lr"} <= set(logged)


def test_tensorboard_holds_every_epochs_metrics(tmp_path, split):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = replace(quick_config(tmp_path, epochs=3), logger="tensorboard")
    engine.train(config, engine.model_spec("CIFAR10Net"), data=split)
    events = EventAccumulator(str(Path(config.out_dir) / "tensorboard"))
    events.Reload()
    history = engine.read_metrics_csv(Path(config.out_dir) / "metrics.csv")
    for name in ("epoch", "train_loss", "val_loss", "val_accuracy", "train_accuracy"):
        # epochs counted from 1, as metrics.csv does
        values = [event.value for event in events.Scalars(name)]
        assert values == pytest.approx([row[name] for row in history], rel=1e-5), name


def test_curves_have_whole_epoch_ticks_and_one_epoch_is_no_plural(tmp_path, split, capsys, monkeypatch):
    engine.train(quick_config(tmp_path, epochs=1), engine.model_spec("CIFAR10Net"), data=split)
    assert "Training CIFAR10Net for 1 epoch on cpu" in capsys.readouterr().out
    drawn = []
    monkeypatch.setattr(engine.plots, "save_figure", lambda figure, path, dpi=120: drawn.append(figure))
    engine.plots.plot_curves(
        [
            {"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "train_accuracy": 0.2, "val_accuracy": 0.2},
            {"epoch": 2, "train_loss": 1.5, "val_loss": 1.7, "train_accuracy": 0.4, "val_accuracy": 0.35},
        ],
        tmp_path / "curves.png",
        "two epochs",
    )
    assert all(tick == int(tick) for axis in drawn[0].axes for tick in axis.get_xticks())


def test_every_epochs_checkpoint_is_kept_when_asked_and_an_overwrite_removes_them(monkeypatch, tmp_path, data_dir):
    run = tmp_path / "run"
    argv = [
        "--data-dir",
        str(data_dir),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--augment",
        "none",
        "--no-tsne",
        "--device",
        "cpu",
        "--logger",
        "none",
        "--out-dir",
        str(run),
    ]
    assert run_main(monkeypatch, *argv, "--keep-epoch-checkpoints") == 0
    assert sorted(path.name for path in run.glob("epoch-*.ckpt")) == ["epoch-001.ckpt", "epoch-002.ckpt"]
    final = torch.load(run / "model.pth", weights_only=True)
    after = {epoch: engine.weights_in(engine.read_checkpoint(run / f"epoch-00{epoch}.ckpt"), run) for epoch in (1, 2)}
    # the last epoch's checkpoint is the final network
    assert all(torch.equal(after[2][key], final[key]) for key in final)
    assert not all(torch.equal(after[1][key], final[key]) for key in final)
    # Lightning's count (from 0) inside: written after the 1st
    assert engine.read_checkpoint(run / "epoch-001.ckpt")["epoch"] == 0
    assert json.loads((run / "config.json").read_text())["keep_epoch_checkpoints"] is True
    assert run_main(monkeypatch, *argv, "--overwrite") == 0
    assert not list(run.glob("epoch-*.ckpt"))  # the replaced run's checkpoints went with it
