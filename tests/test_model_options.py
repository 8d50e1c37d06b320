"""A model is a name plus its options: every saved run folder rebuilds its network exactly, whoever trained it.

A tuning trial and the retrained winner (other fc sizes and dropout than the registered CIFAR10Net_7), a transfer run
(TransferNet with its options, no transfer.json) and an airbench run at another width are each predicted, evaluated and
analysed by --run; a trial's config.json trains the same network to the same numbers; best_params.json is no config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import engine
import evaluate
import hyperparameter_tune
import modified_models
import predict
import transfer_learning
import tsne
from conftest import run_command, synthetic_arrays, write_image_folder

REPORT_KEYS = (
    "test_accuracy",
    "per_class_accuracy",
    "per_class",
    "macro_avg",
    "weighted_avg",
    "confusion_matrix",
    "num_test_images",
)
RUN_FLAGS = ("--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "tree", synthetic_arrays(n_train=200, n_test=60))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, data_dir) -> Path:
    """A two-trial study of one epoch each, and its winner retrained for one epoch."""
    out = tmp_path_factory.mktemp("tune") / "tune"
    hyperparameter_tune.main(
        [
            "--data-dir",
            str(data_dir),
            "--out-dir",
            str(out),
            "--n-trials",
            "2",
            "--epochs",
            "1",
            "--no-prune",
            "--device",
            "cpu",
            "--no-tsne",
            "--retrain",
            "--retrain-epochs",
            "1",
        ]
    )
    return out


def image_file(data_dir: Path) -> Path:
    return next((data_dir / "test").rglob("*.png"))


def check_used_by_run(run_dir: Path, data_dir: Path, monkeypatch, capsys) -> None:
    """predict.py, evaluate.py and tsne.py each take the run folder by --run alone; evaluate.py reproduces its
    test.json.
    """
    code, out, err = run_command(
        predict, monkeypatch, capsys, "--run", run_dir, "--device", "cpu", image_file(data_dir)
    )
    assert (code, err) == (0, "") and image_file(data_dir).name in out
    code, out, err = run_command(
        evaluate,
        monkeypatch,
        capsys,
        "--run",
        run_dir,
        "--data-dir",
        data_dir,
        "--device",
        "cpu",
        "--out-dir",
        run_dir / "evaluation",
    )
    assert (code, err) == (0, ""), err
    if (run_dir / "test.json").is_file():
        evaluation, recorded = (
            engine.read_json(run_dir / "evaluation/evaluation-model.json"),
            engine.read_json(run_dir / "test.json"),
        )
        assert {key: evaluation[key] for key in REPORT_KEYS} == {key: recorded[key] for key in REPORT_KEYS}
    code, out, err = run_command(
        tsne,
        monkeypatch,
        capsys,
        "--run",
        run_dir,
        "--data-dir",
        data_dir,
        "--device",
        "cpu",
        "--splits",
        "test",
        "--tsne-samples",
        40,
        "--tsne-method",
        "sklearn",
        "--out-dir",
        run_dir / "tsne",
    )
    assert (code, err) == (0, "") and (run_dir / "tsne/tsne_test.png").is_file()


def test_a_tuning_trial_and_the_retrained_winner_are_used_by_run(tuned, data_dir, monkeypatch, capsys):
    for run_dir in (tuned / "trials/0000", tuned / "trials/0001", tuned / "retrain"):
        options = engine.read_json(run_dir / "config.json")["model_options"]
        card = engine.read_json(run_dir / "model.json")
        assert card["model"] == "CIFAR10Net_7" and card["options"] == options
        assert options["fc1_size"] != 124  # the tuned sizes ({32, ..., 512}) are never the registered network's
        assert set(card["versions"]) == {"torch", "torchvision", "lightning"}
        check_used_by_run(run_dir, data_dir, monkeypatch, capsys)
    best = engine.read_json(tuned / "best_params.json")
    assert engine.read_json(tuned / "retrain/config.json")["model_options"] == best["model_options"]


def test_a_trials_config_trains_its_network_to_the_same_numbers(tuned, tmp_path, monkeypatch, capsys):
    trial = tuned / "trials/0001"
    code, out, err = run_command(
        modified_models,
        monkeypatch,
        capsys,
        "--config",
        trial / "config.json",
        "--out-dir",
        tmp_path / "again",
        "--no-tsne",
        *RUN_FLAGS,
    )
    assert (code, err) == (0, ""), err
    again = engine.read_json(tmp_path / "again/config.json")
    assert again["model_options"] == engine.read_json(trial / "config.json")["model_options"]
    columns = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr")
    expected, got = (engine.read_metrics_csv(folder / "metrics.csv") for folder in (trial, tmp_path / "again"))
    # to the last digit
    assert [{c: row[c] for c in columns} for row in got] == [{c: row[c] for c in columns} for row in expected]


def test_best_params_is_no_config_and_says_what_to_give(tuned, tmp_path, monkeypatch, capsys):
    code, out, err = run_command(
        modified_models, monkeypatch, capsys, "--config", tuned / "best_params.json", "--out-dir", tmp_path / "x"
    )
    assert code == 2 and err.count("\n") == 1 and "is not a run's config.json" in err and "retrain/config.json" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "script, flags",
    [
        (
            transfer_learning,
            ("--weights", "none", "--image-size", "48", "--finetune", "layer4", "--epochs", "1", "--batch-size", "50"),
        ),
        (
            modified_models,
            ("--model", "Airbench94_muon_narrow", "--width", "8", "--no-dirac", "--epochs", "1", "--batch-size", "50"),
        ),
    ],
)
def test_a_run_with_other_options_is_rebuilt_from_its_card(script, flags, tmp_path, data_dir, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_command(
        script, monkeypatch, capsys, *flags, "--data-dir", data_dir, "--out-dir", run_dir, "--no-tsne", *RUN_FLAGS
    )
    assert (code, err) == (0, ""), err
    assert not (run_dir / "transfer.json").exists()
    options = engine.read_json(run_dir / "model.json")["options"]
    assert options.get("image_size", options.get("width")) in (48, 8)
    check_used_by_run(run_dir, data_dir, monkeypatch, capsys)
