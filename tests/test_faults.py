"""Faults a user's machine meets: a second run into a used folder, two runs at once, divergence, signals, bad folders, a
full disk.
"""

from __future__ import annotations

import errno
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import engine
import engine.exits
import engine.run
import engine.run_folder
import evaluate
import hyperparameter_tune
import main as main_script
import tsne
from conftest import disk_full_when, quick_config, run_command, write_image_folder

REPO = Path(__file__).resolve().parents[1]
QUICK_FLAGS = (
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--augment",
    "none",
    "--no-tsne",
    "--no-progress",
    "--device",
    "cpu",
)


def run_main(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(main_script.main)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def file_contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


@pytest.fixture
def data_dir(tmp_path, arrays) -> Path:
    return write_image_folder(tmp_path / "data", arrays)


# --------------------------------------------------------------------------------------------
# One run per folder
# --------------------------------------------------------------------------------------------
def test_a_second_run_keeps_a_finished_runs_files_unless_told_to_overwrite(monkeypatch, capsys, tmp_path, data_dir):
    flags = ("--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run"), *QUICK_FLAGS)
    assert run_main(monkeypatch, capsys, *flags)[0] == 0
    first = file_contents(tmp_path / "run")
    assert {"model.pth", "test.json", "last.ckpt", "metrics.csv"} <= set(first)

    code, err = run_main(monkeypatch, capsys, *flags, "--seed", "1")
    assert code == 2 and err.count("\n") == 1
    assert "holds a finished run" in err and "--resume" in err and "--overwrite" in err and "--out-dir" in err
    assert file_contents(tmp_path / "run") == first

    assert run_main(monkeypatch, capsys, *flags, "--seed", "1", "--overwrite")[0] == 0
    replaced = file_contents(tmp_path / "run")
    assert replaced["model.pth"] != first["model.pth"]
    assert json.loads(replaced["config.json"])["seed"] == 1


def test_resume_and_overwrite_together_are_refused(monkeypatch, capsys, tmp_path):
    code, err = run_main(monkeypatch, capsys, "--resume", "--overwrite", "--out-dir", str(tmp_path / "run"))
    assert code == 2 and "give one of them" in err and not (tmp_path / "run").exists()


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1], timeout=0)
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_live_run_into_the_same_folder_stops_before_loading_data(monkeypatch, capsys, tmp_path):
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run" / engine.run_folder.LOCK_FILE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        # No data there: had it tried to load any, the message would be about the missing data set.
        code, err = run_main(
            monkeypatch, capsys, "--data-dir", str(tmp_path / "no-data"), "--out-dir", str(tmp_path / "run")
        )
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and err.count("\n") == 1 and "another run is using" in err
    assert not (tmp_path / "no-data").exists()


def test_a_killed_runs_lock_does_not_block_the_next_run(monkeypatch, capsys, tmp_path, data_dir):
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run" / engine.run_folder.LOCK_FILE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # as kill -9 would: no clean-up ran
    holder.wait()
    assert (
        run_main(monkeypatch, capsys, "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run"), *QUICK_FLAGS)[0]
        == 0
    )


def test_stale_temporary_files_are_removed_at_the_next_start(monkeypatch, capsys, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = [run_dir / ".model.pth.k2x_9abq.pth", run_dir / ".metrics.csv.zz00yy11.csv"]
    for path in stale:
        path.write_bytes(b"half a file")
    (run_dir / "notes.txt").write_text("the user's own file")
    assert run_main(monkeypatch, capsys, "--data-dir", str(data_dir), "--out-dir", str(run_dir), *QUICK_FLAGS)[0] == 0
    assert not any(path.exists() for path in stale)
    assert (run_dir / "notes.txt").read_text() == "the user's own file"


def test_the_temporary_copy_pattern_matches_only_write_atomically_files(tmp_path):
    target = tmp_path / "model.pth"
    seen = []
    engine.write_atomically(target, lambda tmp: seen.append(tmp) or tmp.write_bytes(b"x"))
    assert engine.files.is_temporary_copy(seen[0])
    for name in ("model.pth", ".lock", "notes.txt", ".metrics.csv.abcdefgh.json", ".hidden"):
        assert not engine.files.is_temporary_copy(tmp_path / name), name


# --------------------------------------------------------------------------------------------
# last.ckpt after every epoch
# --------------------------------------------------------------------------------------------
def test_last_checkpoint_holds_the_last_epoch_when_validation_loss_rises(monkeypatch, tmp_path, split):
    original = engine.ImageClassifier.on_validation_epoch_end

    def rising_validation_loss(self):
        original(self)
        self.epoch_metrics["val_loss"] = float(self.current_epoch + 1)  # worse every epoch: best.ckpt stays at epoch 1
        self.log("val_loss", float(self.current_epoch + 1), prog_bar=True)  # as the engine logs it

    monkeypatch.setattr(engine.ImageClassifier, "on_validation_epoch_end", rising_validation_loss)
    config = quick_config(tmp_path, "CIFAR10Net", epochs=3)
    engine.train(config, engine.model_spec("CIFAR10Net"), data=split)
    assert torch.load(tmp_path / "run/last.ckpt", weights_only=True)["epoch"] == 2  # 0-based: all three epochs
    assert torch.load(tmp_path / "run/best.ckpt", weights_only=True)["epoch"] == 0

    config.recipe.epochs, config.resume = 5, "last"
    engine.train(config, engine.model_spec("CIFAR10Net"), data=split)
    # no epoch repeated
    assert [row["epoch"] for row in engine.read_metrics_csv(tmp_path / "run/metrics.csv")] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, shown", [("sgd", "is nan"), ("adam", "e+")])
def test_a_diverging_run_exits_non_zero_and_writes_no_final_model(
    monkeypatch, capsys, tmp_path, data_dir, optimizer, shown
):
    code, err = run_main(
        monkeypatch,
        capsys,
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(tmp_path / "run"),
        *QUICK_FLAGS,
        "--lr",
        "1e6",
        "--optimizer",
        optimizer,
    )
    assert code == 1 and err.count("\n") == 1
    assert "training diverged" in err and shown in err and "lower the learning rate" in err
    assert not (tmp_path / "run/model.pth").exists() and not (tmp_path / "run/test.json").exists()


def test_divergence_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, split):
    original = engine.ImageClassifier.on_validation_epoch_end

    def blows_up_in_epoch_3(self):
        original(self)
        if self.current_epoch == 2:
            self.epoch_metrics["train_loss"] = float("inf")

    monkeypatch.setattr(engine.ImageClassifier, "on_validation_epoch_end", blows_up_in_epoch_3)
    with pytest.raises(engine.TrainingDiverged, match="training loss is inf after epoch 3"):
        engine.train(quick_config(tmp_path, "CIFAR10Net", epochs=4), engine.model_spec("CIFAR10Net"), data=split)
    assert torch.load(tmp_path / "run/last.ckpt", weights_only=True)["epoch"] == 1  # epoch 2, the last good one
    assert not (tmp_path / "run/model.pth").exists()


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------
def start_training(data_dir: Path, run_dir: Path, epochs: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "main.py"),
            "--data-dir",
            str(data_dir),
            "--out-dir",
            str(run_dir),
            "--epochs",
            str(epochs),
            "--batch-size",
            "16",
            "--augment",
            "none",
            "--no-tsne",
            "--no-progress",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_with_its_status_and_the_printed_command_resumes_it(tmp_path, data_dir, signum, status):
    run_dir, epochs = tmp_path / "run", 40
    process = start_training(data_dir, run_dir, epochs)
    wait_for(run_dir / "last.ckpt", process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"interrupted by {signal.Signals(signum).name}: ") and "holds epoch" in line
    done = int(line.split("holds epoch ")[1].split()[0])
    assert 1 <= done < epochs
    command = shlex.split(line.split("continue with: ")[1])
    assert command[0] == "python" and command[-1] == "--resume"
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [row["epoch"] for row in engine.read_metrics_csv(run_dir / "metrics.csv")] == list(range(1, epochs + 1))
    assert (run_dir / "test.json").is_file()


def test_ctrl_c_while_the_data_loads_offers_nothing_to_resume(monkeypatch, capsys, tmp_path):
    def interrupted_while_decoding(config):
        raise engine.RunInterrupted(signal.SIGINT)

    monkeypatch.setattr(engine.run, "load_split", interrupted_while_decoding)
    code, err = run_main(monkeypatch, capsys, "--out-dir", str(tmp_path / "run"))
    assert code == 130 and err.strip().count("\n") == 0
    assert "interrupted by SIGINT" in err and "nothing to resume" in err and "--resume" not in err
    assert not (tmp_path / "run").exists()  # the folder it made and never wrote to is gone


def test_the_resume_command_keeps_the_flags_and_drops_overwrite():
    argv = ["main.py", "--epochs", "5", "--overwrite", "--resume", "old/last.ckpt", "--out-dir", "runs/a b"]
    assert engine.exits.resume_command(argv) == "python main.py --epochs 5 --out-dir 'runs/a b' --resume"
    assert engine.exits.resume_command(["main.py", "--resume", "--seed", "3"]) == "python main.py --seed 3 --resume"


# --------------------------------------------------------------------------------------------
# Folders and files that cannot be used
# --------------------------------------------------------------------------------------------
def failing_probe(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize(
    "case, message",
    [
        ("a file", "is a file"),
        ("under a file", "lies under a file"),
        ("read-only", "cannot write in --out-dir"),
        ("full disk", "MB free"),
    ],
)
def test_an_unusable_out_dir_is_one_line_before_the_data_load(monkeypatch, capsys, tmp_path, case, message):
    (tmp_path / "file").write_text("x")
    out_dir = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run"}.get(case, tmp_path / "run")
    if case == "read-only":  # root ignores file modes: make the write itself fail, as on a read-only mount
        monkeypatch.setattr(tempfile, "TemporaryFile", failing_probe)
    if case == "full disk":
        monkeypatch.setattr(engine.run_folder.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 2**20, 2**20))
    code, err = run_main(monkeypatch, capsys, "--data-dir", str(tmp_path / "no-data"), "--out-dir", str(out_dir))
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "no-data").exists()


SHIPPED = str(REPO / "pretrained" / "FastVGG_narrow")


@pytest.mark.parametrize(
    "script, model",
    [(main_script, ()), (hyperparameter_tune, ()), (evaluate, ("--run", SHIPPED)), (tsne, ("--run", SHIPPED))],
)
def test_an_out_dir_inside_the_data_tree_is_one_line_naming_it(monkeypatch, capsys, tmp_path, data_dir, script, model):
    """Not 'test/ lacks the class folder myrun': the flag is wrong, not the data; and nothing is written
    into the tree."""
    before = sorted(data_dir.rglob("*"))
    out_dir = data_dir / "train" / "myrun"
    code, _, err = run_command(
        script, monkeypatch, capsys, *model, "--data-dir", tmp_path, "--out-dir", out_dir, "--device", "cpu"
    )
    assert code == 2
    assert err == f"error: --out-dir {out_dir} lies inside the data tree {data_dir}; give a folder outside it\n"
    assert sorted(data_dir.rglob("*")) == before


def test_a_disk_that_fills_up_mid_run_is_one_line(monkeypatch, capsys, tmp_path, data_dir):
    monkeypatch.setattr(engine.run, "write_atomically", disk_full_when(lambda path: path.name == "model.pth"))
    code, err = run_main(
        monkeypatch, capsys, "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run"), *QUICK_FLAGS
    )
    assert code == 1 and err.count("\n") == 1 and "disk is full" in err and "--resume" in err
    assert (tmp_path / "run/last.ckpt").is_file()


def test_limit_train_of_one_image_blames_the_flag(monkeypatch, capsys, tmp_path, data_dir):
    code, err = run_main(
        monkeypatch, capsys, "--data-dir", str(data_dir), "--limit-train", "1", "--out-dir", str(tmp_path / "run")
    )
    assert code == 2 and "--limit-train 1" in err and str(data_dir) not in err


@pytest.mark.parametrize(
    "content, held",
    [(torch.zeros(3), "a Tensor"), ([1, 2], "a list"), ({"fc1.weight": torch.zeros(2)}, "plain state dict")],
)
def test_resume_from_a_file_that_is_no_training_checkpoint(monkeypatch, capsys, tmp_path, content, held):
    torch.save(content, tmp_path / "other.pt")
    code, err = run_main(
        monkeypatch, capsys, "--resume", str(tmp_path / "other.pt"), "--out-dir", str(tmp_path / "run")
    )
    assert code == 2 and err.count("\n") == 1 and held in err and "not a training checkpoint" in err
