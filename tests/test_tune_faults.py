"""hyperparameter_tune.py's faults, each made for real: a retraining stopped by Ctrl-C, a SQLite study whose disk
fills up (a small tmpfs), a PostgreSQL server that stays down past --db-patience (stopped mid-run, or before the worker
starts) and a bare postgresql:// URL. Each ends in one line, and the command that line prints is run here and must
work."""

from __future__ import annotations

import errno
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import postgres
import pytest
from optuna.trial import TrialState

import engine
import engine.callbacks
import hyperparameter_tune as tune
from conftest import TRIAL_SIZED, run_command

pytestmark = pytest.mark.usefixtures("trial_sized_data", "no_figures")

REPO = Path(__file__).resolve().parents[1]
STUDY = "CIFAR10Net_7"  # the default --study-name
PATIENCE = ("--db-patience", "3")

# A worker process on the synthetic data. With PAUSE_AT set it stops once, at that moment of its trial, and waits while
# the file PAUSE exists: the test breaks the database meanwhile. "trained": the trial's weights are saved and its result
# is to be stored next; "epoch": its first epoch is validated and is to be reported next.
WORKER_SCRIPT = f"""
import os, sys, time
from pathlib import Path
import engine
from conftest import synthetic_arrays
engine.load_split = lambda config: engine.SplitData.from_arrays(synthetic_arrays(**{TRIAL_SIZED!r}))
import hyperparameter_tune, tuning.trials

def pause():
    flag = Path(os.environ.pop("PAUSE"))
    flag.touch()
    while flag.exists():
        time.sleep(0.05)

if os.environ.get("PAUSE_AT") == "trained":
    save_weights = engine.save_weights
    engine.save_weights = lambda net, folder: (save_weights(net, folder), pause())
elif os.environ.get("PAUSE_AT") == "epoch":
    report = tuning.trials.TrialEpochs.__call__
    tuning.trials.TrialEpochs.__call__ = lambda self, metrics: (pause(), report(self, metrics))
engine.run_cli(lambda: hyperparameter_tune.main(sys.argv[1:]))
"""


def flags(out_dir: Path, *more: str) -> list[str]:
    return ["--out-dir", str(out_dir), "--device", "cpu", "--no-tsne", *more]


def worker_env(**more: str) -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        **more,
    )


def start_worker(tmp_path: Path, *args: str, pause_at: str | None = None) -> subprocess.Popen:
    """A worker process, as `python worker.py ARGS` (the script above); with ``pause_at``, it pauses there once."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    pause = {"PAUSE_AT": pause_at, "PAUSE": str(tmp_path / "paused")} if pause_at else {}
    return subprocess.Popen(
        [sys.executable, script.name, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=worker_env(**pause),
        cwd=tmp_path,
    )


def when_paused(worker: subprocess.Popen, tmp_path: Path) -> None:
    """Wait until ``worker`` pauses; it goes on when ``go_on`` removes the file."""
    flag = tmp_path / "paused"
    while not flag.exists():
        assert worker.poll() is None, worker.communicate()[0]
        time.sleep(0.05)


def go_on(tmp_path: Path) -> None:
    (tmp_path / "paused").unlink()


def last_line(output: str) -> str:
    """The line a run ended with, checked to be its only line of error: no traceback, no other error."""
    assert "Traceback" not in output and output.count("error:") <= 1, output
    return output.strip().splitlines()[-1]


def printed_command(line: str, after: str) -> list[str]:
    """The command ``line`` ends with, after ``after``, as an argument list."""
    assert after in line, line
    return shlex.split(line.split(after, 1)[1])


def run_printed(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a printed `python SCRIPT ARGS` as the user would (this Python, the tests' data); its output."""
    assert command[0] == "python", command
    return subprocess.run(
        [sys.executable, *command[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=worker_env(),
        cwd=cwd,
        timeout=300,
    )


def output_until(worker: subprocess.Popen, words: str) -> str:
    """What ``worker`` prints up to its first line with ``words`` in it (or to its end)."""
    lines = []
    for line in worker.stdout:
        lines.append(line)
        if words in line:
            break
    return "".join(lines)


def load_study(storage: str) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=storage)


# --------------------------------------------------------------------------------------------
# An interrupted retraining
# --------------------------------------------------------------------------------------------
@pytest.fixture
def ctrl_c_after(monkeypatch):
    """``ctrl_c_after(n)``: a real SIGINT to this process right after the n-th last.ckpt it writes from then on, so a
    retraining stops at a known epoch (its last.ckpt holds it); ``ctrl_c_after(None)``: no more."""
    save = engine.callbacks.AtomicCheckpointIO.save_checkpoint

    def arm(n: int | None) -> None:
        written = []

        def save_then_interrupt(self, checkpoint, path, storage_options=None):
            save(self, checkpoint, path, storage_options)
            if Path(path).name == "last.ckpt":
                written.append(path)
                if len(written) == n:
                    os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(engine.callbacks.AtomicCheckpointIO, "save_checkpoint", save_then_interrupt)

    return arm


def metrics(run_dir: Path) -> list[dict]:
    return engine.read_metrics_csv(run_dir / "metrics.csv")


def test_an_interrupted_retraining_continues_with_the_command_it_prints(tmp_path, monkeypatch, capsys, ctrl_c_after):
    out = tmp_path / "tune"
    run_dir = out / "retrain"
    study = flags(out, "--n-trials", "1", "--epochs", "1", "--retrain")
    ctrl_c_after(2)
    code, printed, err = run_command(tune, monkeypatch, capsys, *study)
    assert code == 130
    line = last_line(err)
    assert line.startswith(f"interrupted by SIGINT: {run_dir}/last.ckpt holds epoch 2 of 100; continue with: ")
    command = printed_command(line, "continue with: ")
    assert command == ["python", "hyperparameter_tune.py", *study]  # no --resume: this script has none
    # the default of --retrain-epochs is the study recipe's, not the trials': the line that starts it says so
    assert "for 100 epochs (the default of --retrain-epochs, CIFAR10Net_7's recipe's; the trials ran 1) in" in printed

    ctrl_c_after(1)
    code, printed, err = run_command(tune, monkeypatch, capsys, *command[2:])
    assert code == 130 and "for 100 epochs in" in printed and "resuming after epoch 2" in printed
    assert f"{run_dir}/last.ckpt holds epoch 3 of 100" in last_line(err)  # it went on from epoch 2

    # fewer epochs than the retraining planned: one line, naming its plan, what it did, and both ways on
    code, _, err = run_command(tune, monkeypatch, capsys, *study, "--retrain-epochs", "4")
    assert (code, last_line(err)) == (
        2,
        f"error: {run_dir} holds trial 0's retraining, stopped after 3 of its 100 epochs; continue it with "
        "--retrain-epochs 100 or more (or without --retrain-epochs), or retrain it from the start for 4 epochs with "
        "--overwrite",
    )
    ctrl_c_after(2)
    code, printed, err = run_command(tune, monkeypatch, capsys, *study, "--retrain-epochs", "4", "--overwrite")
    assert code == 130 and "resuming" not in printed
    line = last_line(err)
    assert f"{run_dir}/last.ckpt holds epoch 2 of 4; continue with: " in line
    command = printed_command(line, "continue with: ")
    assert command == ["python", "hyperparameter_tune.py", *study, "--retrain-epochs", "4"]  # not started again
    interrupted = metrics(run_dir)

    ctrl_c_after(None)
    code, _, err = run_command(tune, monkeypatch, capsys, *command[2:])
    assert code == 0, err
    finished = metrics(run_dir)
    assert [row["epoch"] for row in finished] == [1, 2, 3, 4] and finished[:2] == interrupted
    assert engine.read_json(run_dir / "test.json")["epochs"] == 4

    code, _, err = run_command(tune, monkeypatch, capsys, *study, "--retrain-epochs", "3")
    line = last_line(err)
    assert code == 2 and f"{run_dir} holds trial 0's retraining, finished after 4 epochs;" in line
    assert line.endswith("or retrain it from the start for 3 epochs with --overwrite")
    code, _, err = run_command(tune, monkeypatch, capsys, *study, "--retrain-epochs", "3", "--overwrite")
    assert code == 0, err
    assert [row["epoch"] for row in metrics(run_dir)] == [1, 2, 3]


# --------------------------------------------------------------------------------------------
# A SQLite study whose disk fills up
# --------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A folder on a 1 MB tmpfs of its own: a real filesystem that fills up (mounting one needs root)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode
        == 0
    )
    if not mounted:
        pytest.skip("mounting a small tmpfs to fill needs root (mount -t tmpfs)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Write a file into ``folder`` until its filesystem has no space left."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC


@pytest.mark.parametrize("moment", ["trained", "epoch"])
def test_a_full_disk_under_a_sqlite_study_is_one_line_at_once_and_the_next_start_keeps_what_was_trained(
    tmp_path, small_disk, moment
):
    storage = f"sqlite:///{small_disk / 'study.db'}"
    out = tmp_path / "tune"
    worker = start_worker(
        tmp_path, *flags(out, "--storage", storage, "--n-trials", "1", "--epochs", "1", *PATIENCE), pause_at=moment
    )
    when_paused(worker, tmp_path)
    fill(small_disk)
    go_on(tmp_path)
    output = worker.communicate(timeout=120)[0]
    line = last_line(output)
    assert worker.returncode == 1 and "retrying" not in output  # a full disk is not waited out
    assert line.startswith(f"error: the disk of the study's database {storage} is full (database or disk is full); ")
    trial = (
        "trial 0 finished (validation loss "
        if moment == "trained"
        else "trial 0 was cut short: the next start fails it and runs another in its place"
    )
    assert trial in line and "free some space on it, then run: python worker.py " in line

    (small_disk / "filler").unlink()
    again = run_printed(printed_command(line, "run: "), tmp_path)
    assert again.returncode == 0, again.stdout
    trials = load_study(storage).trials
    if moment == "trained":  # kept: the next start records it from its folder, with the value the line named
        assert [t.state for t in trials] == [TrialState.COMPLETE]
        assert trials[0].value == metrics(out / "trials/0000")[-1]["val_loss"]
        assert f"trial 0 finished (validation loss {trials[0].value:.4f})" in line
        assert "recorded from" in trials[0].user_attrs["reason"]
    else:
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
        assert trials[0].user_attrs["reason"] == f"its worker (process {worker.pid}) ended mid-trial"


# --------------------------------------------------------------------------------------------
# A PostgreSQL server that is down past --db-patience
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[postgres.Server]:
    """A PostgreSQL server of this module's own, which tests stop and start; skips where none can run."""
    try:
        with postgres.running_server() as running:
            yield running
    except postgres.ServerUnavailable as reason:
        pytest.skip(f"no PostgreSQL server: {reason}")


@pytest.fixture
def database(server) -> Iterator[str]:
    """The server's URL, with the server running again after the test whatever the test did to it."""
    yield server.url
    if not (server.data_dir / "postmaster.pid").exists():
        server.start()


def test_a_postgresql_server_down_past_the_patience_as_a_trial_ends_is_one_line_and_the_trial_is_kept(
    tmp_path, server, database
):
    name, out = "down-after-a-trial", tmp_path / "tune"
    argv = flags(out, "--storage", database, "--study-name", name, "--n-trials", "1", "--epochs", "1", *PATIENCE)
    worker = start_worker(tmp_path, *argv, pause_at="trained")
    when_paused(worker, tmp_path)
    server.stop()
    go_on(tmp_path)
    output = worker.communicate(timeout=120)[0]
    line = last_line(output)
    assert worker.returncode == 1 and "the study's database is unreachable" in output
    assert line.startswith(f"error: the study's database {database} stayed unreachable for 3 s (")
    assert "; trial 0 finished (validation loss " in line and "when it is back, run: python worker.py" in line

    server.start()
    again = run_printed(printed_command(line, "run: "), tmp_path)
    assert again.returncode == 0, again.stdout
    trials = optuna.load_study(study_name=name, storage=database).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE]
    assert f"trial 0 finished (validation loss {trials[0].value:.4f})" in line


def test_a_postgresql_server_down_when_the_worker_starts_is_waited_for_as_one_that_goes_down_later(
    tmp_path, server, database
):
    name = "down-at-the-start"
    argv = flags(tmp_path / "tune", "--storage", database, "--study-name", name, "--n-trials", "1", "--epochs", "1")
    server.stop()
    worker = start_worker(tmp_path, *argv, *PATIENCE)
    output = worker.communicate(timeout=120)[0]
    line = last_line(output)
    # waited for, as a server that goes down later is, then a fault of the machine (exit status 1), not the user's
    assert worker.returncode == 1 and "the study's database is unreachable" in output
    assert line.startswith(f"error: the study's database {database} stayed unreachable for 3 s (")
    assert "when it is back, run: python worker.py" in line

    server.start()
    again = run_printed(printed_command(line, "run: "), tmp_path)
    assert again.returncode == 0, again.stdout
    assert [t.state for t in optuna.load_study(study_name=name, storage=database).trials] == [TrialState.COMPLETE]

    # down at the start and back within the patience: the worker goes on
    server.stop()
    worker = start_worker(tmp_path, *argv, "--n-trials", "2", "--db-patience", "120")
    before = output_until(worker, "the study's database is unreachable")
    server.start()
    output = before + worker.communicate(timeout=180)[0]
    assert worker.returncode == 0 and "the study's database is unreachable" in before, output
    assert len(optuna.load_study(study_name=name, storage=database).trials) == 2


@pytest.mark.skipif(
    importlib.util.find_spec("psycopg") is not None, reason="psycopg 3 is installed: postgresql:// works"
)
def test_a_bare_postgresql_url_names_the_driver_that_is_installed(tmp_path, monkeypatch, capsys, database):
    bare = database.replace("postgresql+psycopg2://", "postgresql://")
    code, _, err = run_command(tune, monkeypatch, capsys, *flags(tmp_path, "--storage", bare, "--n-trials", "0"))
    line = last_line(err)
    assert code == 2 and err.count("\n") == 1 and line.startswith(f"error: cannot open the study storage {bare}: ")
    named = line.split("write it as ", 1)[1].split(",", 1)[0]
    assert named == database
    code, _, err = run_command(tune, monkeypatch, capsys, *flags(tmp_path, "--storage", named, "--n-trials", "0"))
    assert code == 0, err
