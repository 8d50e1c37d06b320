"""Watching a run and running it again: logs that read well in a file, TensorBoard, live curves, progress of long
steps, --config, the precision a GPU gets."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import engine
import engine.callbacks
import engine.devices
import engine.progress
import main as main_script
import tsne
import tuning
from conftest import quick_config, run_script, write_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path, arrays) -> Path:
    return write_image_folder(tmp_path / "data", arrays)


def run_main(monkeypatch, *argv) -> int:
    return run_script(monkeypatch, main_script.main, "main.py", *argv)


def test_piped_output_has_one_clean_line_per_epoch_and_forced_bars_count_epochs_from_one(tmp_path, data_dir):
    command = [sys.executable, str(REPO / "main.py"), "--data-dir", str(data_dir), "--epochs", "3", "--batch-size", "16",
               "--augment", "none", "--no-tsne", "--device", "cpu"]
    piped = subprocess.run([*command, "--out-dir", str(tmp_path / "piped")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert piped.returncode == 0, piped.stderr[-2000:]
    log = piped.stdout + piped.stderr
    assert "\r" not in log and "\x1b[" not in log
    epoch_lines = [line for line in log.splitlines() if line.startswith("After epoch")]
    assert [line.split(":")[0] for line in epoch_lines] == ["After epoch 1", "After epoch 2", "After epoch 3"]
    assert "Training CIFAR10Net for 3 epochs on cpu, 32-true precision" in log and "GPU available" not in log

    forced = subprocess.run([*command, "--progress", "--out-dir", str(tmp_path / "forced")], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "Epoch 1/3" in forced.stdout and "Epoch 3/3" in forced.stdout and "Epoch 0" not in forced.stdout
    assert "Validation" not in forced.stdout  # no bars for validation
    assert forced.stdout.count("After epoch") == 3


@pytest.mark.parametrize("logger, written", [("tensorboard", "tensorboard/events.out.tfevents.*"), ("csv", "csv_log/metrics.csv"),
                                             ("none", None)])
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
    for name in ("train_loss", "val_loss", "val_accuracy", "train_accuracy"):
        values = [event.value for event in events.Scalars(name)]
        assert values == pytest.approx([row[name] for row in history], rel=1e-5), name


def test_curves_are_redrawn_during_training_no_more_often_than_asked(monkeypatch, tmp_path, split):
    drawn = []
    monkeypatch.setattr(engine.callbacks, "plot_curves", lambda history, path, title: drawn.append(len(history)))
    engine.train(quick_config(tmp_path / "a", epochs=3), engine.model_spec("CIFAR10Net"), data=split)
    assert drawn == [3]  # a run of seconds: only the final drawing
    drawn.clear()
    monkeypatch.setattr(engine.callbacks, "CURVES_EVERY_S", 0.0)
    engine.train(quick_config(tmp_path / "b", epochs=3), engine.model_spec("CIFAR10Net"), data=split)
    assert drawn == [1, 2, 3, 3]  # after each epoch, then at the end


def test_long_steps_report_progress_in_a_log(monkeypatch, capsys, split):
    monkeypatch.setattr(engine.progress, "LINE_EVERY_S", 0.0)
    monkeypatch.setattr(engine.progress, "on_terminal", lambda: False)
    tsne.embed(np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32), "opentsne", 0, label="t-SNE of the test split")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "t-SNE of the test split: 750 of 750 iterations" and len(lines) == 15
    net = engine.model_spec("CIFAR10Net").build()
    engine.predict(net, split.train_images, split.train_labels, split.mean, split.std, progress="features of the train images")
    assert capsys.readouterr().out.splitlines() == ["features of the train images: 1 of 1 batches"]


def test_config_reruns_a_run_with_its_settings_and_flags_override(monkeypatch, tmp_path, data_dir):
    first = ["--data-dir", str(data_dir), "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--augment", "standard",
             "--seed", "5", "--no-tsne", "--logger", "none", "--device", "cpu", "--out-dir", str(tmp_path / "first")]
    assert run_main(monkeypatch, *first) == 0
    assert run_main(monkeypatch, "--config", str(tmp_path / "first/config.json"), "--out-dir", str(tmp_path / "again")) == 0
    original, again = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("first", "again"))
    assert {**original, "out_dir": None} == {**again, "out_dir": None}
    without_time = [[{k: v for k, v in row.items() if k != "seconds"} for row in engine.read_metrics_csv(tmp_path / name / "metrics.csv")]
                    for name in ("first", "again")]
    assert without_time[0] == without_time[1]  # the same epochs, to the last digit (CPU)
    assert torch.equal(*(torch.load(tmp_path / name / "model.pth", weights_only=True)["fc3.weight"] for name in ("first", "again")))

    assert run_main(monkeypatch, "--config", str(tmp_path / "first/config.json"), "--epochs", "1", "--seed", "6",
                    "--out-dir", str(tmp_path / "changed")) == 0
    changed = json.loads((tmp_path / "changed/config.json").read_text())
    assert changed["recipe"]["epochs"] == 1 and changed["seed"] == 6 and changed["recipe"]["lr"] == 3e-3 and changed["recipe"]["augment"] == "standard"


def test_config_of_another_model_or_no_config_file_is_one_line(monkeypatch, capsys, tmp_path):
    config = json.loads(json.dumps(engine.RunConfig(model="FastVGG").__dict__, default=lambda value: value.__dict__))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert run_main(monkeypatch, "--config", str(tmp_path / "config.json"), "--out-dir", str(tmp_path / "run")) == 2
    assert "is a run of FastVGG, not CIFAR10Net" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert run_main(monkeypatch, "--config", str(tmp_path / "broken.json"), "--out-dir", str(tmp_path / "run")) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("bf16_supported, chosen", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_precision_on_a_gpu_is_bf16_only_where_it_computes_bf16(monkeypatch, bf16_supported, chosen):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert engine.resolve_precision("auto", "cuda") == chosen
    assert engine.resolve_precision("32-true", "cuda") == "32-true"  # asked for: kept


def test_tuning_figures_name_the_validation_loss(monkeypatch, tmp_path):
    study = optuna.create_study()
    for lr, loss in ((0.1, 2.0), (0.01, 1.5), (0.001, 1.7)):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "dropout": lr * 3}, value=loss,
                                                  distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1, log=True),
                                                                 "dropout": optuna.distributions.FloatDistribution(0, 1)}))
    labels = []
    monkeypatch.setattr(tuning.plt, "close", lambda figure: labels.append([axis.get_ylabel() for axis in figure.axes]))
    assert tuning.write_figures(study, tmp_path) == ["optimization_history.png", "param_importances.png", "parallel_coordinate.png",
                                                     "slice.png"]
    assert labels[0][0] == "validation loss" and all("Objective" not in label for figure in labels for label in figure)
