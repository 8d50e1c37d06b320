"""TensorBoard's HPARAMS tab (issue #36): every run and every tuning trial logs the settings that decide it with the
metrics it ended with, once, read back here from the event files and hparams.yaml the run wrote."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

import engine
import engine.run
import main as main_script
from conftest import quick_config, run_script, write_image_folder

SESSION_START = "_hparams_/session_start_info"


@pytest.fixture
def data_dir(tmp_path, arrays) -> Path:
    return write_image_folder(tmp_path / "data", arrays)


def run_main(monkeypatch, data_dir: Path, run_dir: Path, *argv: str) -> int:
    quick = ("--batch-size", "32", "--augment", "none", "--no-tsne", "--device", "cpu", "--no-progress")
    flags = ("--data-dir", str(data_dir), "--out-dir", str(run_dir), *quick, *argv)
    return run_script(monkeypatch, main_script.main, "main.py", *flags)


def logged(run_dir: Path) -> tuple[dict[str, Any], set[str], dict[str, float]]:
    """What TensorBoard's HPARAMS tab reads from a run folder: the run's hyperparameters (its session), the metrics its
    experiment names, and the last value of each scalar."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content[SESSION_START]).session_start_info
    params = {name: getattr(value, value.WhichOneof("kind")) for name, value in session.hparams.items()}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    return params, metrics, scalars


def sessions_written(run_dir: Path) -> int:
    """How many times the run folder's event files start an HPARAMS session (TensorBoard keeps the first)."""
    return sum(
        value.tag == SESSION_START
        for path in (run_dir / "tensorboard").glob("events.out.tfevents.*")
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
    )


def hparams_yaml(run_dir: Path, folder: str = "tensorboard") -> dict[str, Any]:
    return yaml.safe_load((run_dir / folder / "hparams.yaml").read_text())


def test_a_training_run_logs_its_settings_with_its_final_and_test_metrics_once(monkeypatch, tmp_path, data_dir):
    run = tmp_path / "run"
    assert run_main(monkeypatch, data_dir, run, "--epochs", "2", "--lr", "0.002") == 0  # TensorBoard: the default
    config = json.loads((run / "config.json").read_text())
    last = engine.read_metrics_csv(run / "metrics.csv")[-1]
    test = json.loads((run / "test.json").read_text())
    params, metrics, scalars = logged(run)

    assert params["model"] == "CIFAR10Net" and params["recipe/lr"] == pytest.approx(config["recipe"]["lr"]) == 0.002
    assert params["recipe/epochs"] == 2 and params["seed"] == config["seed"]
    assert params["recipe/betas"] == str(tuple(config["recipe"]["betas"]))  # a sequence as one string
    assert params["precision"] == test["precision"] == "32-true"  # as resolved, not "auto"
    assert not {"out_dir", "data_dir", "resume", "overwrite", "progress", "changes"} & set(params)
    assert not any(key.startswith("analyses") for key in params)
    final = {"final/train_loss", "final/train_accuracy", "final/val_loss", "final/val_accuracy", "final/test_accuracy"}
    assert metrics == final
    assert scalars["final/test_accuracy"] == pytest.approx(test["test_accuracy"], rel=1e-6)
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert scalars[f"final/{name}"] == pytest.approx(last[name], rel=1e-6), name
    assert sessions_written(run) == 1  # not once after the fit and again after the test

    saved = hparams_yaml(run)
    assert saved["model"] == "CIFAR10Net" and saved["recipe"]["lr"] == 0.002 and saved["recipe"]["epochs"] == 2


def test_a_tuning_trial_fit_without_train_logs_them_too(tmp_path, split):
    config = replace(quick_config(tmp_path, epochs=1), logger="tensorboard", seed=7)
    fitted = engine.fit(config, engine.model_spec("CIFAR10Net"), split, checkpoints=False)
    run = Path(config.out_dir)
    params, metrics, scalars = logged(run)
    assert params["model"] == "CIFAR10Net" and params["seed"] == 7 and params["recipe/epochs"] == 1
    assert params["recipe/lr"] == pytest.approx(config.recipe.lr)
    assert metrics == {"final/train_loss", "final/train_accuracy", "final/val_loss", "final/val_accuracy"}  # no test
    assert scalars["final/val_loss"] == pytest.approx(fitted.history[-1]["val_loss"], rel=1e-6)
    assert sessions_written(run) == 1
    assert hparams_yaml(run)["seed"] == 7


def test_a_run_that_measured_no_validation_leaves_those_metrics_out(tmp_path, split):
    config = replace(quick_config(tmp_path, epochs=1), logger="tensorboard", val_every=0)
    engine.fit(config, engine.model_spec("CIFAR10Net"), split, checkpoints=False)
    _, metrics, scalars = logged(Path(config.out_dir))
    assert metrics == {"final/train_loss"}  # neither None nor NaN for what was not measured
    assert not any(tag.startswith("final/val") for tag in scalars)


def test_a_resumed_run_logs_them_once_at_its_end_with_what_it_changed(monkeypatch, tmp_path, data_dir):
    def interrupted_before_the_test(*args, **kwargs):
        raise engine.RunInterrupted(signal.SIGINT)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(engine.run, "finish_run", interrupted_before_the_test)
        assert run_main(monkeypatch, data_dir, run, "--epochs", "1") == 130
    assert not (run / "test.json").exists()
    assert run_main(monkeypatch, data_dir, run, "--epochs", "2", "--resume") == 0
    params, metrics, scalars = logged(run)
    assert params["recipe/epochs"] == 2 and "final/test_accuracy" in metrics
    assert scalars["final/val_loss"] == pytest.approx(engine.read_metrics_csv(run / "metrics.csv")[-1]["val_loss"])
    assert sessions_written(run) == 1 and hparams_yaml(run)["recipe"]["epochs"] == 2


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_the_other_loggers_still_work(tmp_path, split, logger):
    config = replace(quick_config(tmp_path, epochs=1), logger=logger)
    engine.fit(config, engine.model_spec("CIFAR10Net"), split, checkpoints=False)
    run = Path(config.out_dir)
    assert not (run / "tensorboard").exists()
    if logger == "csv":  # the CSV logger keeps the settings in its hparams.yaml; its metrics stay per epoch
        assert hparams_yaml(run, "csv_log")["recipe"]["lr"] == config.recipe.lr
    else:
        assert not (run / "csv_log").exists()
