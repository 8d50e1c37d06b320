"""One check for settings from flags, --config and --resume; comparisons that never mix settings; every stop leaves a
way on.
"""

from __future__ import annotations

import json
import shlex
import typing
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

import engine
import engine.callbacks
import main
import modified_models
from conftest import disk_full_when, quick_config, run_command, stopped_after_epoch_one, write_image_folder

QUICK = ("--batch-size", "32", "--augment", "none", "--no-tsne", "--no-progress", "--device", "cpu", "--logger", "none")
METRIC_COLUMNS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr")


@pytest.fixture
def data_dir(tmp_path, arrays) -> Path:
    return write_image_folder(tmp_path / "data", arrays)


def metrics(run_dir: Path) -> list[dict]:
    return [
        {column: row[column] for column in METRIC_COLUMNS} for row in engine.read_metrics_csv(run_dir / "metrics.csv")
    ]


def test_the_precisions_offered_are_lightnings():
    assert set(engine.PRECISIONS) == {
        "auto",
        *typing.get_args(_PRECISION_INPUT_STR),
        *typing.get_args(_PRECISION_INPUT_STR_ALIAS),
    }


# --------------------------------------------------------------------------------------------
# --config values pass the flags' own checks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("recipe.epochs", -3, "epochs = -3 is not a value --epochs takes (must be a number of epochs above 0 (e.g. 8"),
        ("recipe.batch_size", 0, "batch_size = 0 is not a value --batch-size takes"),
        ("recipe.epochs", "ten", 'epochs = "ten" is not a value --epochs takes'),
        ("recipe.batch_size", 2.5, "batch_size = 2.5 is not a value --batch-size takes"),
        ("recipe.augment", "bogus", 'augment = "bogus" is not a value --augment takes (choose one of study'),
        ("recipe.optimizer", "bogus", 'optimizer = "bogus" is not a value --optimizer takes'),
        ("recipe.betas", [0.9], "betas = [0.9] is not a value --betas takes (it takes a list of 2 values)"),
        ("recipe.lr", "fast", 'lr = "fast" is not a value --lr takes'),
        ("data_dir", ["a", "b"], 'data_dir = ["a", "b"] is not a value --data-dir takes'),
        ("precision", "bf17", 'precision = "bf17" is not a value --precision takes'),
        ("seed", None, "seed = null is not a value --seed takes (it takes a value, not null)"),
        (
            "validation",
            "yes",
            'validation = "yes" is not a value --no-validation takes (it is a switch: true or false)',
        ),
        (
            "model_options.fc1_size",
            0,
            "fc1_size = 0 is not a value --fc1-size takes (must be a whole number from 1 to 4096, got 0)",
        ),
        ("colour", "red", "is not a run's config.json (it has colour)"),
        ("recipe.whiteness", 1, "is not a run's config.json (it has whiteness)"),
    ],
)
def test_a_bad_config_value_is_one_line_naming_the_key_and_the_file(tmp_path, monkeypatch, capsys, key, value, message):
    saved = asdict(quick_config(tmp_path, "CIFAR10Net"))
    *parents, name = key.split(".")
    holder = saved
    for parent in parents:
        holder = holder[parent]
    holder[name] = value
    path = tmp_path / "edited" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(saved))
    code, out, err = run_command(main, monkeypatch, capsys, "--config", path, "--out-dir", tmp_path / "new")
    assert code == 2 and err.count("\n") == 1 and message in err and str(path) in err, err
    assert not (tmp_path / "new").exists()


def test_a_config_file_that_is_no_json_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text("{not json")
    code, out, err = run_command(
        main, monkeypatch, capsys, "--config", tmp_path / "config.json", "--out-dir", tmp_path / "new"
    )
    assert (
        code == 2
        and err.count("\n") == 1
        and "cannot be read as a run's config.json" in err
        and not (tmp_path / "new").exists()
    )


def test_a_precision_lightning_does_not_know_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys, data_dir
):
    code, out, err = run_command(
        main, monkeypatch, capsys, "--precision", "bf17", "--data-dir", data_dir, "--out-dir", tmp_path / "new"
    )
    assert code == 2 and "argument --precision: invalid choice: 'bf17'" in err and not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------
# --resume continues the run that is there
# --------------------------------------------------------------------------------------------
@pytest.fixture
def interrupted(tmp_path, monkeypatch, capsys, data_dir) -> tuple[Path, tuple[str, ...]]:
    """A 3-epoch run on 150 images at lr 0.003 stopped by SIGTERM right after its first checkpoint; and its flags."""
    flags = ("--data-dir", str(data_dir), "--epochs", "3", "--limit-train", "150", "--lr", "0.003", *QUICK)
    code, out, err = stopped_after_epoch_one(main, monkeypatch, capsys, *flags, "--out-dir", tmp_path / "run")
    assert code == 143 and "holds epoch 1 of 3" in err
    return tmp_path / "run", flags


def test_a_bare_resume_continues_with_the_runs_own_settings(interrupted, tmp_path, monkeypatch, capsys):
    run_dir, flags = interrupted
    # no data, recipe or device flags
    code, out, err = run_command(main, monkeypatch, capsys, "--resume", "--out-dir", run_dir)
    assert (code, err) == (0, ""), err
    config = engine.read_json(run_dir / "config.json")
    assert (config["recipe"]["epochs"], config["recipe"]["lr"], config["limit_train"], config["analyses"]["tsne"]) == (
        3,
        0.003,
        150,
        False,
    )
    assert config["changes"] == []
    code, out, err = run_command(main, monkeypatch, capsys, *flags, "--out-dir", tmp_path / "straight")
    assert code == 0 and metrics(run_dir) == metrics(tmp_path / "straight")  # the resumed run is the uninterrupted one


def test_resume_refuses_a_flag_that_changes_the_finished_epochs_and_leaves_the_run_as_it_was(
    interrupted, monkeypatch, capsys
):
    run_dir, flags = interrupted
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    for changed in (
        ("--optimizer", "sgd"),
        ("--batch-size", "64"),
        ("--limit-train", "300"),
        ("--seed", "1"),
        ("--fc1-size", "32"),
    ):
        code, out, err = run_command(main, monkeypatch, capsys, *flags, *changed, "--resume", "--out-dir", run_dir)
        assert (
            code == 2 and err.count("\n") == 1 and f"{changed[0]} would change what its finished epochs meant" in err
        ), err
        assert "--resume may change: --epochs" in err
    assert {
        path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()
    } == before  # config.json byte for byte


def test_a_run_written_before_the_analyses_had_their_own_settings_resumes_and_configures(
    interrupted, tmp_path, monkeypatch, capsys
):
    """Such a run keeps the t-SNE's settings at the top of config.json and of its checkpoint's settings."""
    run_dir, flags = interrupted

    def old_form(settings: dict) -> dict:
        return {**{key: value for key, value in settings.items() if key != "analyses"}, **settings["analyses"]}

    old_config = old_form(engine.read_json(run_dir / "config.json"))
    assert old_config["tsne"] is False and "analyses" not in old_config
    engine.write_json(run_dir / "config.json", old_config)
    checkpoint = engine.read_checkpoint(run_dir / "last.ckpt")
    checkpoint["run_config"] = old_form(checkpoint["run_config"])
    torch.save(checkpoint, run_dir / "last.ckpt")

    code, out, err = run_command(main, monkeypatch, capsys, "--resume", "--out-dir", run_dir)
    assert (code, err) == (0, ""), err
    assert engine.read_json(run_dir / "config.json")["analyses"] == {
        "tsne": False,
        "tsne_method": "auto",
        "tsne_samples": None,
    }
    engine.write_json(tmp_path / "old.json", old_config)
    code, out, err = run_command(
        main, monkeypatch, capsys, "--config", tmp_path / "old.json", "--epochs", "1", "--out-dir", tmp_path / "again"
    )
    assert (code, err) == (0, ""), err
    assert engine.read_json(tmp_path / "again/config.json")["analyses"]["tsne"] is False


def test_the_studys_augmentation_under_its_old_name_readme_trains_resumes_and_configures(
    interrupted, tmp_path, monkeypatch, capsys
):
    """--augment readme, and a run folder written when the study's augmentation was called so."""
    run_dir, flags = interrupted
    config = engine.read_json(run_dir / "config.json")
    config["recipe"]["augment"] = "readme"
    engine.write_json(run_dir / "config.json", config)
    checkpoint = engine.read_checkpoint(run_dir / "last.ckpt")
    checkpoint["run_config"]["recipe"]["augment"] = "readme"
    torch.save(checkpoint, run_dir / "last.ckpt")

    code, out, err = run_command(main, monkeypatch, capsys, "--resume", "--out-dir", run_dir)
    assert (code, err) == (0, ""), err
    resumed = engine.read_json(run_dir / "config.json")
    assert resumed["recipe"]["augment"] == "study" and resumed["changes"] == []
    for argv, out_dir in (
        (("--config", run_dir.parent / "old.json"), tmp_path / "configured"),
        ((*flags[:-2], "--augment", "readme"), tmp_path / "flagged"),
    ):
        engine.write_json(run_dir.parent / "old.json", config)
        code, out, err = run_command(main, monkeypatch, capsys, *argv, "--epochs", "1", "--out-dir", out_dir)
        assert (code, err) == (0, ""), err
        assert engine.read_json(out_dir / "config.json")["recipe"]["augment"] == "study"


def test_more_epochs_on_resume_are_recorded_as_a_change(interrupted, monkeypatch, capsys):
    run_dir, flags = interrupted
    assert run_command(main, monkeypatch, capsys, "--resume", "--out-dir", run_dir)[0] == 0
    code, out, err = run_command(main, monkeypatch, capsys, "--resume", "--out-dir", run_dir)
    assert code == 2 and "holds a finished run of 3 epochs" in err and "--epochs" in err
    code, out, err = run_command(main, monkeypatch, capsys, "--resume", "--epochs", "4", "--out-dir", run_dir)
    assert (code, err) == (0, ""), err
    config = engine.read_json(run_dir / "config.json")
    assert config["recipe"]["epochs"] == 4 and config["changes"] == [
        {"after_epoch": 3, "setting": "epochs", "from": 3, "to": 4}
    ]
    assert len(metrics(run_dir)) == 4


def test_a_checkpoint_with_damaged_settings_is_one_line(tmp_path, monkeypatch, capsys):
    torch.save({"state_dict": {}, "run_config": ["not", "a", "mapping"]}, tmp_path / "last.ckpt")
    code, out, err = run_command(
        main, monkeypatch, capsys, "--resume", tmp_path / "last.ckpt", "--out-dir", tmp_path / "run"
    )
    assert code == 2 and err.count("\n") == 1 and "damaged run settings" in err


# --------------------------------------------------------------------------------------------
# Comparisons never mix settings
# --------------------------------------------------------------------------------------------
def test_a_comparison_without_validation_works_and_a_rerun_with_other_settings_is_refused(
    tmp_path, monkeypatch, capsys, data_dir
):
    flags = (
        "--models",
        "CIFAR10Net_3",
        "CIFAR10Net_2",
        "--epochs",
        "1",
        "--limit-train",
        "100",
        "--no-validation",
        "--data-dir",
        data_dir,
        "--out-dir",
        tmp_path / "comparison",
        *QUICK,
    )
    code, out, err = run_command(modified_models, monkeypatch, capsys, *flags)
    assert (code, err) == (0, ""), err
    table = (tmp_path / "comparison/comparison.md").read_text()
    assert "| CIFAR10Net_3 |" in table and "n/a" in table
    before = (tmp_path / "comparison/comparison.csv").read_bytes()
    code, out, err = run_command(modified_models, monkeypatch, capsys, *flags, "--lr", "0.01")
    assert (
        code == 2
        and err.count("\n") == 1
        and "comparison trained with other settings (CIFAR10Net_3: lr 0.01 (it has 0.001))" in err
    )
    assert (tmp_path / "comparison/comparison.csv").read_bytes() == before
    code, out, err = run_command(modified_models, monkeypatch, capsys, *flags)
    assert code == 0 and out.count("finished earlier with these settings, kept") == 2


# --------------------------------------------------------------------------------------------
# Every stop leaves a way on
# --------------------------------------------------------------------------------------------
def test_a_full_disk_before_the_first_checkpoint_names_a_command_that_finishes_the_run(
    tmp_path, monkeypatch, capsys, data_dir
):
    flags = (
        "--data-dir",
        str(data_dir),
        "--epochs",
        "2",
        "--limit-train",
        "100",
        *QUICK,
        "--out-dir",
        str(tmp_path / "run"),
    )
    with monkeypatch.context() as patch:
        patch.setattr(engine.callbacks, "write_atomically", disk_full_when(lambda path: path.suffix == ".ckpt"))
        code, out, err = run_command(main, monkeypatch, capsys, *flags)
    assert code == 1 and err.count("\n") == 1 and "disk is full" in err and "--resume" not in err
    command = shlex.split(err.split("start it again (no epoch was saved yet) with: ", 1)[1])
    assert command[:2] == ["python", "main.py"]
    code, out, err = run_command(main, monkeypatch, capsys, *command[2:])
    assert (code, err) == (0, ""), err
    assert (tmp_path / "run/test.json").is_file() and len(metrics(tmp_path / "run")) == 2
