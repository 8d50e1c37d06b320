"""The engine: learning, reproducibility, resume, run folder, command-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import engine
import engine.classifier
import engine.official as official
import engine.run
import functions as fn
import main as main_script
import modified_models
from conftest import quick_config, run_command, start_nodes, stopped_after_epoch_one, write_image_folder


def run(tmp_path, split, model="CIFAR10Net", **recipe):
    config = quick_config(tmp_path, model, **recipe)
    report = engine.train(config, modified_models.MODELS[model], data=split)
    return config, report


def test_two_process_data_parallel_run_on_the_cpu_learns(tmp_path, image_folder):
    """The multi-GPU path (Lightning DDP: sharded batches, metrics reduced over processes, rank 0 writes) on two CPU
    processes.
    """
    main_py = Path(__file__).resolve().parents[1] / "main.py"
    result = subprocess.run(
        [
            sys.executable,
            str(main_py),
            "--data-dir",
            str(image_folder),
            "--device",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--epochs",
            "3.5",
            "--scheduler",
            "cosine",
            "--lr",
            "3e-3",
            "--batch-size",
            "16",
            "--augment",
            "none",
            "--no-tsne",
            "--no-progress",
            "--out-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = engine.read_metrics_csv(tmp_path / "run/metrics.csv")
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # each process counts its own steps (9 an epoch, 32 in all): the cosine schedule ends with the run
    assert abs(history[-1]["lr"]) < 1e-12 < history[-2]["lr"]
    report = json.loads((tmp_path / "run/test.json").read_text())
    assert report["num_test_images"] == 100 and report["test_accuracy"] > 0.5  # chance is 0.1


def test_two_nodes_train_one_model_into_one_run_folder(tmp_path, image_folder):
    """Two nodes as separate process groups on this machine, started as a cluster starts them (MASTER_ADDR, MASTER_PORT
    and NODE_RANK; gloo over 127.0.0.1), one device each, sharing the run folder: one model, one set of files, written
    by node 0."""
    main_py = Path(__file__).resolve().parents[1] / "main.py"
    command = [
        sys.executable,
        str(main_py),
        "--data-dir",
        str(image_folder),
        "--device",
        "cpu",
        "--devices",
        "1",
        "--num-nodes",
        "2",
        "--strategy",
        "ddp",
        "--epochs",
        "3",
        "--lr",
        "3e-3",
        "--batch-size",
        "16",
        "--augment",
        "none",
        "--no-tsne",
        "--no-progress",
        "--out-dir",
        str(tmp_path / "run"),
    ]
    nodes = start_nodes(command, tmp_path)
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "After epoch 3" in outputs[0][0] and "Test accuracy" in outputs[0][0]
    # node 1 trains, node 0 alone reports and writes
    assert "After epoch" not in outputs[1][0] and "Test accuracy" not in outputs[1][0]
    history = engine.read_metrics_csv(tmp_path / "run/metrics.csv")
    assert [row["epoch"] for row in history] == [1, 2, 3] and history[-1]["train_loss"] < history[0]["train_loss"]
    assert json.loads((tmp_path / "run/config.json").read_text())["num_nodes"] == 2
    assert json.loads((tmp_path / "run/test.json").read_text())["num_test_images"] == 100


def test_short_run_learns_and_writes_the_run_folder(tmp_path, split):
    config, report = run(tmp_path, split, epochs=4, lr=3e-3)
    run_dir = tmp_path / "run"
    history = engine.read_metrics_csv(run_dir / "metrics.csv")
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert report["test_accuracy"] > 0.5  # chance is 0.1
    for name in (
        "config.json",
        "curves.png",
        "model.pth",
        "best.ckpt",
        "last.ckpt",
        "test.json",
        "confusion_matrix.png",
    ):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "test.json").read_text())
    assert set(saved["per_class_accuracy"]) == set(fn.CLASSES)
    assert sum(map(sum, saved["confusion_matrix"])) == len(split.test_images)
    state = torch.load(run_dir / "model.pth", weights_only=True)
    main_script.CIFAR10Net().load_state_dict(state)  # a plain state dict with the README's names


def test_same_seed_same_numbers(tmp_path, split):
    _, first = run(tmp_path / "a", split, model="CIFAR10Net_7", augment="study")
    _, second = run(tmp_path / "b", split, model="CIFAR10Net_7", augment="study")
    assert (
        engine.read_metrics_csv(tmp_path / "a/run/metrics.csv")[-1]["train_loss"]
        == engine.read_metrics_csv(tmp_path / "b/run/metrics.csv")[-1]["train_loss"]
    )
    a = torch.load(tmp_path / "a/run/model.pth", weights_only=True)
    b = torch.load(tmp_path / "b/run/model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, split):
    full = quick_config(tmp_path / "full", "CIFAR10Net_7", epochs=3, augment="study")
    engine.train(full, modified_models.MODELS["CIFAR10Net_7"], data=split)

    first_part = quick_config(tmp_path / "parts", "CIFAR10Net_7", epochs=1, augment="study")
    engine.train(first_part, modified_models.MODELS["CIFAR10Net_7"], data=split)
    rest = quick_config(tmp_path / "parts", "CIFAR10Net_7", epochs=3, augment="study")
    rest.resume = "last"
    engine.train(rest, modified_models.MODELS["CIFAR10Net_7"], data=split)

    def drop_time(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert drop_time(engine.read_metrics_csv(tmp_path / "full/run/metrics.csv")) == drop_time(
        engine.read_metrics_csv(tmp_path / "parts/run/metrics.csv")
    )
    a = torch.load(tmp_path / "full/run/model.pth", weights_only=True)
    b = torch.load(tmp_path / "parts/run/model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fraction_of_an_epoch_ends_the_schedule_with_the_run_and_a_resumed_run_matches_an_uninterrupted_one(
    monkeypatch, capsys, tmp_path, image_folder
):
    """--epochs 2.5 (airbench94 trains 9.9): 270 images in batches of 32 make 9 steps an epoch and 23 in the run; the
    last epoch is measured and checkpointed as the others, and the lr schedule and lookahead end at its last step."""
    flags = ("--model", "Airbench94_muon_narrow", "--width", "8", "--batch-size", "32", "--epochs", "2.5")
    flags += ("--data-dir", image_folder, "--no-tsne", "--no-progress", "--device", "cpu")
    code, out, err = run_command(modified_models, monkeypatch, capsys, *flags, "--out-dir", tmp_path / "full")
    assert code == 0 and "for 2.5 epochs" in out, err
    rows = engine.read_metrics_csv(tmp_path / "full/metrics.csv")
    assert [row["epoch"] for row in rows] == [1, 2, 3] and rows[-1]["val_loss"] is not None
    assert rows[-1]["lr"] == 0 < rows[-2]["lr"]  # airbench's linear decay reaches 0 at the run's last step
    assert engine.read_checkpoint(tmp_path / "full/last.ckpt")["global_step"] == 23
    assert engine.read_json(tmp_path / "full/config.json")["recipe"]["epochs"] == 2.5

    code, _, err = stopped_after_epoch_one(
        modified_models, monkeypatch, capsys, *flags, "--out-dir", tmp_path / "parts"
    )
    assert code == 143 and "holds epoch 1 of 2.5" in err, err
    code, _, err = run_command(
        modified_models, monkeypatch, capsys, *flags[:2], "--resume", "--out-dir", tmp_path / "parts"
    )
    assert code == 0, err

    def drop_time(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert drop_time(rows) == drop_time(engine.read_metrics_csv(tmp_path / "parts/metrics.csv"))
    a = torch.load(tmp_path / "full/model.pth", weights_only=True)
    b = torch.load(tmp_path / "parts/model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_schedule_shape():
    def factor(step, shape):
        return engine.classifier.learning_rate_factor(step, total_steps=100, warmup_steps=10, shape=shape)

    assert factor(0, "cosine") == pytest.approx(0.1) and factor(9, "cosine") == pytest.approx(1.0)
    assert factor(55, "cosine") == pytest.approx(0.5) and factor(100, "cosine") == pytest.approx(0.0)
    assert factor(55, "onecycle") == pytest.approx(0.5) and factor(77, "none") == 1.0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def run_main(monkeypatch, capsys, *argv, script=main_script):
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(script.main)
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "-3"], "must be a number of epochs above 0"),
        (["--epochs", "nan"], "must be a number of epochs above 0"),
        (["--epochs", "2.5x"], "must be a number of epochs above 0"),
        (["--augment", "fancy"], "invalid choice"),
        (["--lr", "nan"], "must be a number > 0"),
        (["--batch-size", "0"], "must be a positive whole number"),
    ],
)
def test_bad_flag_values_exit_2(monkeypatch, capsys, tmp_path, flags, message):
    code, err = run_main(monkeypatch, capsys, *flags, "--out-dir", str(tmp_path / "run"))
    assert code == 2 and message in err
    assert not (tmp_path / "run").exists()


def test_data_dir_with_nothing_usable_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    code, err = run_main(
        monkeypatch, capsys, "--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run")
    )
    assert code == 2 and err.count("\n") == 1 and "download failed" in err
    assert not (tmp_path / "run").exists()


def test_tampered_batch_file_exits_2(monkeypatch, capsys, tmp_path, python_batches):
    root, _ = python_batches
    (root / official.PYTHON_BATCHES_DIR / "test_batch").write_bytes(b"not a pickle")
    code, err = run_main(monkeypatch, capsys, "--data-dir", str(root), "--out-dir", str(tmp_path / "run"))
    assert code == 2 and "MD5" in err and not (tmp_path / "run").exists()


def test_checkpoint_of_another_model_is_refused(monkeypatch, capsys, tmp_path, split, arrays):
    run(tmp_path, split, model="CIFAR10Net_3", epochs=1)
    data_dir = write_image_folder(tmp_path / "data", arrays)
    code, err = run_main(
        monkeypatch,
        capsys,
        "--data-dir",
        str(data_dir),
        "--resume",
        str(tmp_path / "run/last.ckpt"),
        "--out-dir",
        str(tmp_path / "other"),
    )
    assert code == 2 and "checkpoint of CIFAR10Net_3, not CIFAR10Net" in err
    assert not (tmp_path / "other").exists()


def test_resume_with_nothing_to_resume(monkeypatch, capsys, tmp_path):
    code, err = run_main(monkeypatch, capsys, "--resume", "--out-dir", str(tmp_path / "never-ran"))
    assert code == 2 and "nothing to resume" in err and not (tmp_path / "never-ran").exists()


def test_garbage_checkpoint_is_refused(monkeypatch, capsys, tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 100)
    code, err = run_main(
        monkeypatch, capsys, "--resume", str(tmp_path / "junk.ckpt"), "--out-dir", str(tmp_path / "run")
    )
    assert code == 2 and err.count("\n") == 1 and "junk.ckpt is damaged" in err


def test_main_trains_end_to_end_from_an_image_folder(monkeypatch, capsys, tmp_path, arrays):
    data_dir = write_image_folder(tmp_path / "data", arrays)
    code, _ = run_main(
        monkeypatch,
        capsys,
        "--data-dir",
        str(data_dir),
        "--epochs",
        "2",
        "--no-tsne",
        "--no-progress",
        "--augment",
        "standard",
        "--lr",
        "3e-3",
        "--out-dir",
        str(tmp_path / "run"),
    )
    capsys.readouterr()
    assert code == 0
    report = json.loads((tmp_path / "run/test.json").read_text())
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert (
        config["recipe"]["augment"] == "standard"
        and config["recipe"]["lr"] == 3e-3
        and config["recipe"]["batch_size"] == 64
    )
    assert report["epochs"] == 2 and report["test_accuracy"] > 0.3


def test_the_test_pass_runs_at_the_precision_the_run_trained_at(monkeypatch, tmp_path, split):
    """A bf16 run measures its test set under bf16 autocast, as Lightning validated it (in float32 the pass added about
    15 s to a 3-minute run on a CPU with AMX); a float32 run in float32."""
    autocast_during_test = []

    def recording_predict(*args, **kwargs):
        autocast_during_test.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return engine.predict(*args, **kwargs)

    monkeypatch.setattr(engine.run, "predict", recording_predict)
    for precision in ("bf16-mixed", "32-true"):
        config = replace(quick_config(tmp_path / precision, epochs=1), precision=precision)
        engine.train(config, engine.model_spec("CIFAR10Net"), data=split)
    assert autocast_during_test == [torch.bfloat16, None]


def test_the_test_report_has_precision_recall_and_f1_per_class():
    report = engine.test_report(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0]), ("a", "b", "c"))
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]] and report["test_accuracy"] == 0.6
    assert report["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1-score": 0.5, "support": 1 + 1}
    assert report["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and report["per_class"]["b"]["recall"] == 1.0
    # never predicted: 0, no warning
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1}
    assert report["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert report["macro_avg"]["recall"] == pytest.approx(0.5) and report["weighted_avg"]["support"] == 5


# --------------------------------------------------------------------------------------------
# What a run measures between epochs: --val-every, --train-accuracy-sample
# --------------------------------------------------------------------------------------------
def test_val_every_measures_every_nth_and_the_last_epoch_and_trains_the_same(tmp_path, split):
    every = quick_config(tmp_path / "every", "CIFAR10Net_7", epochs=3, augment="study")
    sparse = replace(quick_config(tmp_path / "sparse", "CIFAR10Net_7", epochs=3, augment="study"), val_every=2)
    for config in (every, sparse):
        engine.train(config, modified_models.MODELS["CIFAR10Net_7"], data=split)
    full, thin = (engine.read_metrics_csv(Path(c.out_dir) / "metrics.csv") for c in (every, sparse))
    assert [row["val_loss"] is not None for row in thin] == [False, True, True]  # epoch 2, then the last
    assert [row["train_accuracy"] is not None for row in thin] == [False, True, True]
    # measuring never changes the training
    assert [row["train_loss"] for row in thin] == [row["train_loss"] for row in full]
    assert [row["val_accuracy"] for row in thin][1:] == [row["val_accuracy"] for row in full][1:]
    a, b = (torch.load(Path(c.out_dir) / "model.pth", weights_only=True) for c in (every, sparse))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_val_every_0_and_no_training_sample_measure_nothing_between_epochs(tmp_path, split):
    config = replace(quick_config(tmp_path, "CIFAR10Net_7", epochs=2), val_every=0, train_accuracy_sample=0)
    report = engine.train(config, modified_models.MODELS["CIFAR10Net_7"], data=split)
    rows = engine.read_metrics_csv(Path(config.out_dir) / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1, 2] and all(row["train_loss"] > 0 for row in rows)
    assert all(row[key] is None for row in rows for key in ("val_loss", "val_accuracy", "train_accuracy"))
    assert report["final_val_accuracy"] is None and 0 <= report["test_accuracy"] <= 1  # the test pass runs all the same
    assert not (Path(config.out_dir) / "best.ckpt").exists() and (Path(config.out_dir) / "last.ckpt").is_file()


def test_the_training_accuracy_sample_is_the_size_asked(split):
    assert engine.classifier.CIFAR10DataModule(split, 32, "none", 0).eval_kinds == ("train", "val")
    module = engine.classifier.CIFAR10DataModule(split, 32, "none", 0, train_accuracy_sample=40)
    module.trainer = type("Trainer", (), {"global_rank": 0, "world_size": 1})()
    sample, validation = module.val_dataloader()
    assert len(sample.images) == 40 and len(validation.images) == len(split.val_images)
    assert engine.classifier.CIFAR10DataModule(split, 32, "none", 0, train_accuracy_sample=0).eval_kinds == ("val",)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--val-every", "-1"], "argument --val-every: must be a whole number >= 0"),
        (["--train-accuracy-sample", "x"], "argument --train-accuracy-sample"),
        (["--val-every", "2", "--scheduler", "plateau"], "--val-every 2 with --scheduler plateau"),
    ],
)
def test_watching_flags_are_checked_before_anything_is_written(monkeypatch, capsys, tmp_path, flags, message):
    code, err = run_main(monkeypatch, capsys, *flags, "--out-dir", str(tmp_path / "run"))
    assert code == 2 and message in err.splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_profile_writes_where_the_training_time_went(tmp_path, split):
    config = replace(quick_config(tmp_path, "CIFAR10Net_7", epochs=1), profile=True)
    engine.train(config, modified_models.MODELS["CIFAR10Net_7"], data=split)
    table = (Path(config.out_dir) / "fit-profile.txt").read_text()
    assert "optimizer_step" in table and "validation_step" in table and "train_dataloader_next" in table
