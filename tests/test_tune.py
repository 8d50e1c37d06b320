"""hyperparameter_tune.py on the synthetic data: outputs, resuming, failing trials, several workers, the
search spaces."""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import postgres
import pytest
import torch
from optuna.trial import TrialState

import engine
import hyperparameter_tune as tune
import study_storage
import tuning
from conftest import TRIAL_SIZED
from modified_models import CIFAR10Net_7

pytestmark = pytest.mark.usefixtures("trial_sized_data")

REPO = Path(__file__).resolve().parents[1]
STUDY = "CIFAR10Net_7"  # the default --study-name
STUDY_SPACE = tuning.resolve_space("study", STUDY)[1]


def study_settings(**changes) -> tuning.StudySettings:
    """The default study's settings, with ``changes``."""
    settings = dict(model=STUDY, space="model", search_space=tuning.to_json(STUDY_SPACE), epochs=5) | changes
    return tuning.StudySettings(**settings)


def stored_settings(**changes) -> dict:
    """What a study of the default settings, with ``changes``, stores."""
    return dataclasses.asdict(study_settings(**changes))


# A worker process that tunes on the synthetic data instead of CIFAR-10 (it imports the project and the tests' helpers
# as the tests do: start_worker puts both on its PYTHONPATH).
WORKER_SCRIPT = f"""
import os, socket, sys
import engine
from conftest import synthetic_arrays
engine.load_split = lambda config: engine.SplitData.from_arrays(synthetic_arrays(**{TRIAL_SIZED!r}))
if "WORKER_HOST" in os.environ:  # the test's stand-in for a worker on another machine
    socket.gethostname = lambda: os.environ["WORKER_HOST"]
import hyperparameter_tune
engine.run_cli(lambda: hyperparameter_tune.main(sys.argv[1:]))
"""


def flags(out_dir: Path, *more: str) -> list[str]:
    return ["--out-dir", str(out_dir), "--device", "cpu", "--no-tsne", *more]


def read_trials(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def load_study(storage: str | Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=study_storage.open_storage(str(storage)))


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """An empty database on a PostgreSQL server of its own, for the whole session; skips where no server can run."""
    try:
        with postgres.running_server() as server:
            yield server.url
    except postgres.ServerUnavailable as reason:
        pytest.skip(f"no PostgreSQL server: {reason}")


def start_worker(tmp_path: Path, *args: str, host: str | None = None) -> subprocess.Popen:
    """A worker process on the synthetic data; with ``host``, as if it ran on a machine of that name."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",  # two workers share the machine's cores
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        **({"WORKER_HOST": host} if host else {}),
    )
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


# --------------------------------------------------------------------------------------------
# A study, its outputs, and continuing it
# --------------------------------------------------------------------------------------------
def test_tiny_study_writes_every_output_and_a_rerun_continues_it(tmp_path, capsys):
    out = tmp_path / "tune"
    tune.main(flags(out, "--n-trials", "3", "--epochs", "1"))
    printed = capsys.readouterr().out
    for name in (
        "study.db",
        "trials.csv",
        "best_params.json",
        "optimization_history.png",
        "param_importances.png",
        "parallel_coordinate.png",
        "slice.png",
        "trials/0002/metrics.csv",
    ):
        assert (out / name).is_file(), name
    assert all(f"Trial {n} COMPLETE" in printed for n in range(3))
    first = read_trials(out)
    assert [row["number"] for row in first] == ["0", "1", "2"]
    assert all(
        row["state"] == "COMPLETE" and row["epochs_run"] == "1" and float(row["duration_s"]) > 0 for row in first
    )
    assert {"fc1_size", "fc2_size", "dropout", "lr", "weight_decay", "batch_size"} <= set(first[0])

    best = json.loads((out / "best_params.json").read_text())
    assert best["val_loss"] == min(float(row["value"]) for row in first)
    assert (
        best["model"] == "CIFAR10Net_7"
        and best["recipe"]["lr"] == best["params"]["lr"]
        and best["recipe"]["epochs"] == 100
    )
    study = load_study(f"sqlite:///{out}/study.db")
    assert all(trial.intermediate_values.keys() == {0} for trial in study.trials)  # the pruning callback saw val_loss

    tune.main(flags(out, "--n-trials", "5"))  # the study remembers its 1 epoch per trial
    rows = read_trials(out)
    assert [row["number"] for row in rows] == ["0", "1", "2", "3", "4"]
    assert rows[:3] == first
    assert "3 of 5 trials finished" in capsys.readouterr().out and rows[4]["epochs_run"] == "1"


def test_flags_that_contradict_the_study_are_refused(tmp_path):
    tune.main(flags(tmp_path, "--n-trials", "0", "--epochs", "2"))
    with pytest.raises(engine.UserError, match="--epochs 2"):
        tune.main(flags(tmp_path, "--n-trials", "0", "--epochs", "3"))
    with pytest.raises(
        engine.UserError, match="another space than --space extended holds: the one given as --space model"
    ):
        tune.main(flags(tmp_path, "--n-trials", "0", "--space", "extended"))
    tune.main(flags(tmp_path, "--n-trials", "0", "--space", "study"))  # CIFAR10Net_7's own space is the study's
    for flag, value in (("--model", "FastVGG_narrow"), ("--sampler", "random"), ("--pruner", "none")):
        with pytest.raises(engine.UserError, match=f"was tuned with {flag} "):
            tune.main(flags(tmp_path, "--n-trials", "0", "--study-name", STUDY, flag, value))
    # another model's study is another study (its own name): it never shares this one's folder and trial numbers
    with pytest.raises(
        engine.UserError, match="holds the outputs and trials of study 'CIFAR10Net_7' .*--study-name CIFAR10Net_7"
    ):
        tune.main(flags(tmp_path, "--n-trials", "0", "--model", "FastVGG_narrow"))


def test_retrain_of_an_existing_study_trains_its_best_trial_like_main(no_figures, tmp_path, capsys):
    out = tmp_path / "tune"
    tune.main(flags(out, "--n-trials", "1", "--epochs", "1"))
    tune.main(flags(out, "--n-trials", "0", "--retrain", "--retrain-epochs", "1"))
    best = json.loads((out / "best_params.json").read_text())
    config = json.loads((out / "retrain/config.json").read_text())
    report = json.loads((out / "retrain/test.json").read_text())
    assert config["model"] == "CIFAR10Net_7" and config["recipe"]["lr"] == best["params"]["lr"]
    assert config["recipe"]["batch_size"] == best["params"]["batch_size"] and config["recipe"]["epochs"] == 1
    assert report["epochs"] == 1 and (out / "retrain/model.pth").is_file()
    state = torch.load(out / "retrain/model.pth", weights_only=True)
    assert state["fc1.weight"].shape[0] == best["params"]["fc1_size"]
    printed = capsys.readouterr()
    assert "Retraining trial 0" in printed.out
    assert "\r" not in printed.out + printed.err  # not a terminal: no progress bar fragments in a log


def test_retraining_another_trial_keeps_the_earlier_retraining_unless_told_to_overwrite(no_figures, tmp_path):
    out = tmp_path / "tune"
    tune.main(flags(out, "--n-trials", "1", "--epochs", "1", "--retrain", "--retrain-epochs", "1"))
    first = {name: (out / "retrain" / name).read_bytes() for name in ("trial.json", "model.pth", "test.json")}
    study = load_study(f"sqlite:///{out}/study.db")
    trial = study.trials[0]
    study.add_trial(
        optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, value=trial.value - 1)
    )
    tune.main(flags(out, "--n-trials", "0"))
    assert json.loads((out / "best_params.json").read_text())["trial"] == 1
    with pytest.raises(engine.UserError, match="--overwrite"):
        tune.main(flags(out, "--n-trials", "0", "--retrain", "--retrain-epochs", "1"))
    assert {name: (out / "retrain" / name).read_bytes() for name in first} == first  # trial 0's retraining, whole
    tune.main(flags(out, "--n-trials", "0", "--retrain", "--retrain-epochs", "1", "--overwrite"))
    assert json.loads((out / "retrain/trial.json").read_text())["trial"] == 1


def test_a_signal_mid_trial_fails_that_trial_with_its_reason_and_exits_143(no_figures, tmp_path, monkeypatch, capsys):
    def fit_interrupted(*args, **kwargs):
        raise engine.RunInterrupted(signal.SIGTERM)

    monkeypatch.setattr(engine, "fit", fit_interrupted)
    monkeypatch.setattr(sys, "argv", ["hyperparameter_tune.py", *flags(tmp_path, "--n-trials", "2", "--epochs", "1")])
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(tune.main)
    assert exit_info.value.code == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        line.startswith("interrupted by SIGTERM: the finished trials are kept in sqlite:///") and "--resume" not in line
    )
    assert line.endswith(
        "continue with: python hyperparameter_tune.py " + " ".join(flags(tmp_path, "--n-trials", "2", "--epochs", "1"))
    )
    rows = read_trials(tmp_path)
    assert [(row["state"], row["reason"]) for row in rows] == [("FAIL", "interrupted by SIGTERM")]


def test_retrain_without_a_complete_trial_is_a_user_error(tmp_path):
    with pytest.raises(engine.UserError, match="no complete trial"):
        tune.main(flags(tmp_path, "--n-trials", "0", "--retrain"))


def proposed_by_runs(storage: str, seed: int, runs: int) -> list[dict]:
    """What a study proposes over several runs of one worker;
    each run completes a trial and is then killed mid-trial."""
    proposed = []
    for _ in range(runs):
        study = tuning.open_study(storage, STUDY)
        tuning.configure(study, study_settings(), seed)
        complete, killed = study.ask(), study.ask()  # the killed one stays RUNNING, as a kill leaves it
        proposed += [tuning.draw(STUDY_SPACE, complete), tuning.draw(STUDY_SPACE, killed)]
        study.tell(complete, 1.0)
    return proposed


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # asked and told by hand, not by optimize
def test_a_resumed_study_proposes_no_configuration_twice(tmp_path):
    proposed = proposed_by_runs(f"sqlite:///{tmp_path}/study.db", seed=0, runs=3)
    assert len({json.dumps(params, sort_keys=True) for params in proposed}) == len(proposed) == 6


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # asked and told by hand, not by optimize
def test_a_fresh_study_with_the_same_seed_proposes_the_same_first_trials(tmp_path):
    first, again, other_seed = (
        proposed_by_runs(f"sqlite:///{tmp_path}/{name}.db", seed, runs=1)
        for name, seed in (("first", 0), ("again", 0), ("other", 1))
    )
    assert first == again and first != other_seed


# --------------------------------------------------------------------------------------------
# Trials that go wrong
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Fixed parameter")
def test_diverging_trials_are_pruned_with_their_reason_and_the_study_goes_on(no_figures, tmp_path):
    out = tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{out}/study.db")
    study.enqueue_trial({"optimizer": "sgd", "lr": 1e6})  # the loss becomes NaN
    study.enqueue_trial({"optimizer": "adam", "lr": 1e6})  # the loss stays finite but explodes
    tune.main(flags(out, "--n-trials", "3", "--epochs", "1", "--space", "extended"))
    rows = read_trials(out)
    assert [row["state"] for row in rows] == ["PRUNED", "PRUNED", "COMPLETE"]
    assert all(row["reason"].startswith("diverged: validation loss") and row["epochs_run"] == "1" for row in rows[:2])
    assert "nan" in rows[0]["reason"]


def test_out_of_memory_fails_the_trial_with_its_reason_and_the_study_goes_on(no_figures, tmp_path, monkeypatch):
    real_fit, calls = engine.fit, []

    def fit_out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(engine, "fit", fit_out_of_memory_once)
    tune.main(flags(tmp_path, "--n-trials", "2", "--epochs", "1"))
    rows = read_trials(tmp_path)
    assert [row["state"] for row in rows] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert rows[0]["reason"] == "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"


def test_pruned_trials_stop_early_and_the_saved_epochs_are_reported(no_figures, tmp_path, monkeypatch, capsys):
    # A pruner that prunes every trial after its first epoch, instead of waiting for the median rule's five trials.
    monkeypatch.setattr(tuning.study, "make_pruner", lambda name, epochs: optuna.pruners.ThresholdPruner(upper=0.0))
    tune.main(flags(tmp_path, "--n-trials", "2", "--epochs", "3"))
    rows = read_trials(tmp_path)
    assert [(row["state"], row["epochs_run"]) for row in rows] == [("PRUNED", "1"), ("PRUNED", "1")]
    assert rows[0]["reason"].startswith("pruned: validation loss after epoch 1")
    printed = capsys.readouterr().out
    assert "pruning saved 4 of 6 epochs" in printed and "No trial has completed yet" in printed
    assert not (tmp_path / "best_params.json").exists()


# --------------------------------------------------------------------------------------------
# Several workers, and a killed one
# --------------------------------------------------------------------------------------------
def test_two_workers_on_one_journal_finish_exactly_the_requested_trials(tmp_path):
    storage = tmp_path / "tune/study.log"
    storage.parent.mkdir()
    workers = [
        start_worker(
            tmp_path,
            *flags(storage.parent, "--storage", str(storage), "--n-trials", "3", "--epochs", "1", "--seed", seed),
        )
        for seed in ("1", "2")
    ]
    outputs = [worker.communicate(timeout=180)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = load_study(storage)
    assert len(study.get_trials(states=tuning.FINISHED)) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))
    # Any other trial is one that lost the race for the last place and stepped back without training.
    assert all(t.user_attrs["reason"].startswith("not needed") for t in study.get_trials(states=(TrialState.FAIL,)))


def test_a_worker_killed_mid_trial_loses_only_that_trial(no_figures, tmp_path):
    out = tmp_path / "tune"
    tune.main(flags(out, "--n-trials", "1", "--epochs", "1"))
    # What a killed worker leaves behind: its trial RUNNING, and its process gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out}/study.db")
    study.ask().set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid})

    tune.main(flags(out, "--n-trials", "2"))
    rows = read_trials(out)
    assert [row["state"] for row in rows] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert rows[1]["reason"] == f"its worker (process {dead.pid}) ended mid-trial"


def run_when_started(start: multiprocessing.synchronize.Event, argv: list[str]) -> None:
    start.wait()
    tune.main(argv)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="starts the workers by fork")
def test_two_workers_started_together_on_a_fresh_sqlite_file_both_run(tmp_path):
    # Each try races the two workers to create the file's tables and the study; before the retry, the
    # later one died in most tries ("table studies already exists", "UNIQUE constraint failed: alembic_version").
    fork = multiprocessing.get_context("fork")  # forked workers start within milliseconds, unlike fresh interpreters
    for attempt in range(5):
        out = tmp_path / f"try{attempt}"
        start = fork.Event()
        workers = [
            fork.Process(target=run_when_started, args=(start, flags(out, "--n-trials", "0", "--seed", seed)))
            for seed in ("1", "2")
        ]
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(timeout=60)
        assert [worker.exitcode for worker in workers] == [0, 0], f"try {attempt}"
        assert load_study(f"sqlite:///{out}/study.db").user_attrs == stored_settings(epochs=5)


def test_two_workers_on_one_postgresql_study_finish_exactly_the_requested_trials(tmp_path, postgresql_url):
    name = "two-workers"
    workers = [
        start_worker(
            tmp_path,
            *flags(
                tmp_path / seed,
                "--storage",
                postgresql_url,
                "--study-name",
                name,
                "--n-trials",
                "3",
                "--epochs",
                "1",
                "--seed",
                seed,
            ),
        )
        for seed in ("1", "2")
    ]
    outputs = [worker.communicate(timeout=180)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = optuna.load_study(study_name=name, storage=postgresql_url)
    assert len(study.get_trials(states=tuning.FINISHED)) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert all(t.user_attrs["reason"].startswith("not needed") for t in study.get_trials(states=(TrialState.FAIL,)))


def runs_a_trial(worker: subprocess.Popen, storage: str, name: str) -> bool:
    if name not in optuna.study.get_all_study_names(storage):
        return False
    running = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.RUNNING,))
    return any(trial.user_attrs.get("worker", {}).get("pid") == worker.pid for trial in running)


def test_a_worker_killed_mid_trial_on_postgresql_loses_that_trial_as_failed(no_figures, tmp_path, postgresql_url):
    name, out = "killed-worker", tmp_path / "tune"
    # 1000 epochs: the trial is still running when it is killed
    worker = start_worker(
        tmp_path, *flags(out, "--storage", postgresql_url, "--study-name", name, "--n-trials", "1", "--epochs", "1000")
    )
    try:
        deadline = time.monotonic() + 120
        while not runs_a_trial(worker, postgresql_url, name):
            assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[0]
            time.sleep(0.2)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.kill()  # a no-op after the SIGKILL; stops the worker when an assertion failed
        worker.communicate()
    assert worker.returncode == -signal.SIGKILL

    # the next run of the command
    tune.main(flags(out, "--storage", postgresql_url, "--study-name", name, "--n-trials", "0"))
    rows = read_trials(out)
    assert [row["state"] for row in rows] == ["FAIL"]
    assert rows[0]["reason"] == f"its worker (process {worker.pid}) ended mid-trial"


def wait_until_it_runs_a_trial(worker: subprocess.Popen, storage: str, name: str) -> None:
    deadline = time.monotonic() + 120
    while not runs_a_trial(worker, storage, name):
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[0]
        time.sleep(0.2)


# the survivor reaches its first look well within the grace
FAST_HEARTBEAT = ("--heartbeat", "1", "--heartbeat-grace", "10")


def test_a_worker_dead_on_another_machine_is_replaced_and_the_study_ends_with_exactly_n_trials(
    no_figures, tmp_path, postgresql_url, capsys
):
    name, out = "dead-elsewhere", tmp_path / "tune"
    study_flags = ("--storage", postgresql_url, "--study-name", name, "--n-trials", "1", *FAST_HEARTBEAT)
    dead = start_worker(tmp_path, *flags(tmp_path / "a", *study_flags, "--epochs", "1000", "--seed", "1"), host="nodeA")
    try:
        wait_until_it_runs_a_trial(dead, postgresql_url, name)
        dead.send_signal(signal.SIGKILL)  # on "nodeA": this machine cannot see that its process is gone
    finally:
        dead.kill()
        dead.communicate()
    study = optuna.load_study(study_name=name, storage=postgresql_url)
    # the survivor's trial takes a second (the dead worker's would have taken 1000 epochs)
    study.set_user_attr("epochs", 1)
    tune.main(flags(out, *study_flags, "--seed", "2"))  # the dead worker's trial holds the study's only place
    assert "Waiting for 1 trial(s) running on other workers (trial 0 on nodeA)" in capsys.readouterr().out
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # exactly --n-trials finished
    assert "nodeA" in trials[0].user_attrs["reason"] and "no heartbeat" in trials[0].user_attrs["reason"]


def test_a_worker_rides_out_a_database_restart_and_keeps_its_trial(no_figures, tmp_path):
    try:
        server_context = postgres.running_server()
        server = server_context.__enter__()
    except postgres.ServerUnavailable as reason:
        pytest.skip(f"no PostgreSQL server: {reason}")
    try:
        worker = start_worker(
            tmp_path,
            *flags(
                tmp_path / "tune",
                "--storage",
                server.url,
                "--n-trials",
                "1",
                "--epochs",
                "4",
                "--db-patience",
                "60",
                "--no-prune",
            ),
        )
        wait_until_it_runs_a_trial(worker, server.url, STUDY)
        server.stop()  # mid-trial: the worker's next report and its result meet a closed server
        time.sleep(4)
        server.start()
        output = worker.communicate(timeout=180)[0]
        assert worker.returncode == 0, output
        assert "the study's database is unreachable" in output and "Traceback" not in output
        trials = optuna.load_study(study_name=STUDY, storage=server.url).get_trials()
        assert (
            [t.state for t in trials] == [TrialState.COMPLETE]
            and trials[0].value > 0
            and trials[0].user_attrs["epochs_run"] == 4
        )
    finally:
        server_context.__exit__(None, None, None)


def test_a_trial_started_when_running_trials_already_make_up_the_study_steps_back():
    study = optuna.create_study()
    study.ask()  # another worker's trial, still running: it will make up the one trial asked for
    objective = tuning.make_objective(study_settings(epochs=1), base=None, data=None, n_trials=1, prune=True)
    tuning.run_trials(study, objective, n_trials=1, epochs=1, timeout=None)
    assert len(study.trials) == 1  # checked before starting: no trial at all
    study.optimize(objective, n_trials=1, catch=(tuning.NotNeeded,))  # started at the same moment as the other
    late = study.trials[1]
    assert late.state == TrialState.FAIL and late.user_attrs["reason"].startswith("not needed") and not late.params


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "storage",
    [
        "sqlite:////nonexistent/folder/study.db",
        "postgresql://tuner:secret@localhost:1/optuna",
        "journal:/nonexistent/folder/study.log",
        "no such storage",
    ],
)
def test_unusable_storage_exits_2_with_one_line(monkeypatch, capsys, tmp_path, storage):
    monkeypatch.setattr(sys, "argv", ["hyperparameter_tune.py", *flags(tmp_path / "tune", "--storage", storage)])
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(tune.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: cannot open the study storage")
    assert "secret" not in err


def test_empty_storage_exits_2_with_one_line_naming_the_flag(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["hyperparameter_tune.py", *flags(tmp_path / "tune", "--storage", "")])
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(tune.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --storage is empty")
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize(
    "bad",
    [
        ["--n-trials", "-1"],
        ["--epochs", "0"],
        ["--space", "huge"],
        ["--timeout", "nan"],
        ["--limit-train", "0"],
        ["--device", "tpu"],
        ["--retrain-epochs", "x"],
    ],
)
def test_bad_flag_values_exit_2(tmp_path, bad):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(flags(tmp_path / "tune", *bad))
    assert exit_info.value.code == 2 and not (tmp_path / "tune").exists()


# --------------------------------------------------------------------------------------------
# The search spaces
# --------------------------------------------------------------------------------------------
def sample(space: str, n: int) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = []
    for _ in range(n):
        trial = study.ask()
        samples.append(tuning.draw(tuning.resolve_space(space, STUDY)[1], trial))
        assert samples[-1] == trial.params
        study.tell(trial, 0.0)
    return samples


def check_readme_bounds(params: dict) -> None:
    assert params["fc1_size"] in (32, 64, 128, 256, 512) and params["fc2_size"] in (32, 64, 128, 256, 512)
    assert params["batch_size"] in (32, 64, 128, 256, 512)
    assert 1e-4 <= params["lr"] <= 1e-1 and 5e-4 <= params["weight_decay"] <= 1e-1 and 0.1 <= params["dropout"] <= 0.9


def test_readme_space_is_the_readme_study():
    samples = sample("study", 300)
    for params in samples:
        assert set(params) == {"fc1_size", "fc2_size", "dropout", "lr", "weight_decay", "batch_size"}
        check_readme_bounds(params)
    lrs = sorted(params["lr"] for params in samples)
    assert lrs[len(lrs) // 2] < 10**-2.3  # log-uniform: the median is near 10^-2.5, not 0.05
    assert {params["fc1_size"] for params in samples} == {32, 64, 128, 256, 512}
    recipe = tuning.recipe_for(STUDY, samples[0], epochs=5)
    assert (recipe.epochs, recipe.lr, recipe.batch_size, recipe.optimizer) == (
        5,
        samples[0]["lr"],
        samples[0]["batch_size"],
        "adam",
    )
    net = engine.model_spec("CIFAR10Net_7").build(tuning.options_for(STUDY, samples[0]))
    assert (
        isinstance(net, CIFAR10Net_7)
        and net.fc1.out_features == samples[0]["fc1_size"]
        and net.dropout.p == samples[0]["dropout"]
    )


def test_extended_space_adds_convolutions_and_optimisers_and_every_network_builds():
    samples = sample("extended", 300)
    shapes_built = set()
    for params in samples:
        check_readme_bounds(params)
        assert params["conv1_width"] in (16, 20, 32, 48, 64) and params["conv2_width"] in (32, 40, 64, 96, 128)
        assert params["conv1_kernel"] in (3, 5) and params["conv2_kernel"] in (3, 4, 5)
        recipe = tuning.recipe_for(STUDY, params, epochs=5)
        assert recipe.optimizer == params["optimizer"]
        if params["optimizer"] == "sgd":
            assert 0.8 <= params["momentum"] <= 0.99 and "beta1" not in params and recipe.momentum == params["momentum"]
        else:
            assert 0.8 <= params["beta1"] <= 0.95 and 0.99 <= params["beta2"] <= 0.9999 and "momentum" not in params
            assert recipe.betas == (params["beta1"], params["beta2"])
        kernels = (params["conv1_kernel"], params["conv2_kernel"])
        if kernels not in shapes_built:
            net = engine.model_spec("CIFAR10Net_7").build(tuning.options_for(STUDY, params)).eval()
            assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
            assert net.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, params["fc2_size"])
            shapes_built.add(kernels)
    assert len(shapes_built) == 6 and {params["optimizer"] for params in samples} == {"adam", "adamw", "sgd"}


def test_cifar10net_7_with_its_default_options_is_the_readmes():
    net = engine.model_spec("CIFAR10Net_7").build()
    shapes = {name: tuple(p.shape) for name, p in net.state_dict().items()}
    assert (
        shapes["conv1.weight"],
        shapes["conv2.weight"],
        shapes["fc1.weight"],
        shapes["fc2.weight"],
        shapes["fc3.weight"],
    ) == ((20, 3, 3, 3), (40, 20, 4, 4), (124, 1440), (64, 124), (10, 64))
    assert net.dropout.p == 0.5


def test_the_private_optuna_that_tuning_reads_is_in_the_installed_optuna(tmp_path):
    """tuning.private_optuna is the one place tuning reads what Optuna keeps private; when an Optuna release changes
    it, this fails with the line a user would see."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    settings = study_storage.StorageSettings(heartbeat=1, grace=1)
    study = tuning.open_study(url, STUDY, settings=settings)
    trial = study.ask()
    storage, study_id, silent = tuning.private_optuna(study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.record_heartbeat(trial_id)
    assert study_id == storage.get_study_id_from_name(STUDY) and tuning.private_optuna(study)[2] == set()
    time.sleep(2.5)  # past the grace period of 1 s
    assert tuning.private_optuna(study)[2] == {trial_id}
    journal = tuning.open_study(str(tmp_path / "study.log"), STUDY)
    assert tuning.private_optuna(journal)[2] == set()  # a journal has no heartbeat
    with pytest.raises(RuntimeError, match=r"Optuna .* no longer has what tuning.private_optuna reads"):
        tuning.private_optuna(object())


def test_a_study_stored_under_the_old_space_name_readme_continues(no_figures, tmp_path):
    """The study's space was once named readme: a study stored so, and the flag spelled so, go on as --space study."""
    out = tmp_path / "tune"
    out.mkdir()
    old = tuning.open_study(f"sqlite:///{out}/study.db", STUDY)
    old.set_user_attr("space", "readme")
    old.set_user_attr("epochs", 1)
    tune.main(flags(out, "--n-trials", "1", "--space", "readme"))
    study = load_study(f"sqlite:///{out}/study.db")
    assert study.user_attrs == stored_settings(space="study", epochs=1)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
