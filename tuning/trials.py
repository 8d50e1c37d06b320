"""One trial of a study: its network trained with the trial's settings, reported to Optuna epoch by epoch (and pruned
when the pruner says so); and a worker's loop over trials until the study has its number."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, Trial, TrialState

import engine
from study_storage import DatabaseFault, first_line
from tuning.space import draw
from tuning.study import (
    FINISHED,
    OUT_OF_MEMORY,
    StudySettings,
    abandoned,
    best_trial,
    fail_abandoned_trials,
    fail_silent_trials,
    format_params,
    places_taken,
    private_optuna,
    this_worker,
    trial_config,
)


class NotNeeded(Exception):
    """Two workers started the last trials at once: the later-numbered one steps back and fails unrun."""


class TrialEpochs:
    """Called after each validated epoch of a trial: counts the epochs it ran, whatever ends it, and with ``prune``
    reports the validation loss to Optuna and stops the trial when the pruner says so (what optuna-integration's
    Lightning callback does for one process; the step is the epoch counted from 0, as that callback counted)."""

    def __init__(self, trial: Trial, prune: bool):
        self.trial, self.prune = trial, prune
        self.epochs_run = 0

    def __call__(self, metrics: dict) -> None:
        self.epochs_run += 1
        if self.prune:
            self.trial.report(metrics["val_loss"], step=metrics["epoch"] - 1)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"trial pruned at epoch {metrics['epoch']}")


WAIT_POLL_SECONDS = 5.0  # how often a waiting worker looks at the other workers' running trials


def trial_dir(out_dir: Path, number: int) -> Path:
    return out_dir / "trials" / f"{number:04d}"


def trained_result(folder: Path) -> tuple[float, int] | None:
    """The validation loss and the epochs of a trial whose folder holds its final weights, saved after its last epoch
    (the objective saves them last), from its metrics.csv; None for one without them. A model.pth older than the
    metrics is another run's, left in a reused folder."""
    weights, metrics = folder / "model.pth", folder / "metrics.csv"
    if not weights.is_file() or not metrics.is_file() or weights.stat().st_mtime < metrics.stat().st_mtime:
        return None
    history = engine.read_metrics_csv(metrics)
    return history[-1]["val_loss"], len(history)


def record_trained_trials(study: optuna.Study) -> None:
    """Store the result of each RUNNING trial that its worker on this machine trained but stopped before storing (its
    database failed it, or it was killed just then), read from the trial's folder: a trained trial is not lost."""
    storage, study_id, _ = private_optuna(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker, folder = trial.user_attrs.get("worker"), trial.user_attrs.get("folder")
        result = trained_result(Path(folder)) if worker and folder and abandoned(worker) else None
        if result is None:
            continue
        value, epochs = result
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "epochs_run", epochs)
        storage.set_trial_user_attr(trial_id, "reason", f"recorded from {folder}: its worker stopped before storing it")
        try:
            study.tell(trial.number, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker recorded it first
        print(
            f"Trial {trial.number} COMPLETE: validation loss {value:.4f}, recorded from {folder} (its worker stopped)"
        )


def settle_abandoned_trials(study: optuna.Study) -> None:
    """The RUNNING trials whose worker ran on this machine and is gone: recorded if it had trained them, else failed."""
    record_trained_trials(study)
    fail_abandoned_trials(study)


def make_objective(
    settings: StudySettings, base: engine.RunConfig, data: engine.SplitData, n_trials: int, prune: bool
) -> Callable[[Trial], float]:
    space = settings.parsed()

    def objective(trial: Trial) -> float:
        trial.set_user_attr("worker", this_worker())
        if places_taken(trial.study, before=trial.number) >= n_trials:
            trial.set_user_attr("reason", f"not needed: other workers' trials already make up --n-trials {n_trials}")
            raise NotNeeded(trial.user_attrs["reason"])
        params = draw(space, trial)
        config = trial_config(base, params, settings.epochs, trial_dir(Path(base.out_dir), trial.number))
        trial.set_user_attr("folder", str(Path(config.out_dir).resolve()))  # where a next start finds its result
        counter = TrialEpochs(trial, prune)
        # The engine's divergence guard runs before the hook, so a diverged loss never reaches the pruner (which ranks
        # NaN as a number, and waits for its first five trials anyway).
        try:
            fitted = engine.fit(
                config, engine.model_spec(config.model), data, after_validation=counter, checkpoints=False
            )
        except engine.TrainingDiverged as error:  # no later epoch would rescue it: pruned at once, the study goes on
            counter.epochs_run = error.epoch  # it ran, though the hook never saw it (the guard stops the run first)
            trial.set_user_attr("reason", f"diverged: {error.loss_name} {error.value:.3g} after epoch {error.epoch}")
            raise optuna.TrialPruned(trial.user_attrs["reason"]) from None
        except optuna.TrialPruned:
            trial.set_user_attr(
                "reason", f"pruned: validation loss after epoch {counter.epochs_run} worse than the median trial's"
            )
            raise
        except OUT_OF_MEMORY as error:
            trial.set_user_attr("reason", f"out of memory: {first_line(error)}")
            release_memory()
            raise
        else:
            # the trial's network, for predict.py, evaluate.py and tsne.py --run; saved before anything is stored, so a
            # trained trial's folder holds its result whatever the study's database does next (record_trained_trials)
            engine.save_weights(fitted.net, Path(config.out_dir))
        finally:
            trial.set_user_attr("epochs_run", counter.epochs_run)
        return fitted.history[-1]["val_loss"]

    return objective


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trial_line(trial: FrozenTrial, epochs: int, best: FrozenTrial | None) -> str:
    outcome = (
        f"validation loss {trial.value:.4f}"
        if trial.state == TrialState.COMPLETE
        else trial.user_attrs.get("reason", "")
    )
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    line = (
        f"Trial {trial.number} {trial.state.name}: {outcome} ({trial.user_attrs.get('epochs_run', 0)}/{epochs} "
        f"epochs, {seconds:.1f} s)"
    )
    if trial.params:
        line += f"; {format_params(trial.params)}"
    return line + (f"; best so far: trial {best.number}, {best.value:.4f}" if best else "")


def wait_line(study: optuna.Study, grace: float) -> str:
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    where = ", ".join(f"trial {t.number} on {t.user_attrs.get('worker', {}).get('host', '?')}" for t in running[:3])
    return (
        f"Waiting for {len(running)} trial(s) running on other workers ({where}): each finishes, or is failed once its "
        f"heartbeat has been silent for {grace:.0f} s (--heartbeat-grace) and run again here"
    )


def run_trials(
    study: optuna.Study,
    objective: Callable[[Trial], float],
    n_trials: int,
    epochs: int,
    timeout: float | None,
    grace: float | None = None,
    out_dir: Path | None = None,
) -> None:
    """Start trials, one at a time, until the study holds ``n_trials`` finished ones or --timeout has passed.

    Checking before each trial keeps a worker from starting one that other workers' running trials already make up for;
    two workers that still start the last place at once are settled in the objective (``NotNeeded``). When the running
    trials of other workers make up the rest, this worker waits: each either finishes, or its heartbeat stays silent for
    ``grace`` seconds (its worker died, wherever it ran), it is failed, and this worker runs a trial in its place. A
    journal file (``grace`` None) has no heartbeat to tell a dead worker from a slow one: there the worker stops.
    A fault of the study's database (``DatabaseFault``) ends the loop, saying what became of the trial it ended (its
    folder, ``trial_dir`` in ``out_dir``, tells whether it was trained).
    """
    deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
    waiting = False
    current: dict[str, int] = {}  # the number of the trial this worker runs, until it is stored

    def tracked(trial: Trial) -> float:
        current["number"] = trial.number
        return objective(trial)

    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        current.clear()
        print(trial_line(trial, epochs, best_trial(study)), flush=True)

    while time.monotonic() < deadline:
        settle_abandoned_trials(study)
        fail_silent_trials(study)
        if len(study.get_trials(deepcopy=False, states=FINISHED)) >= n_trials:
            return
        if places_taken(study) >= n_trials:
            if grace is None:
                return
            if not waiting:
                print(wait_line(study, grace), flush=True)
            waiting = True
            time.sleep(min(WAIT_POLL_SECONDS, grace))
            continue
        waiting = False
        try:
            study.optimize(
                tracked, n_trials=1, catch=(NotNeeded, *OUT_OF_MEMORY), callbacks=[report], gc_after_trial=True
            )
        except BaseException as error:
            fault = database_fault(error)
            if fault is None:
                raise
            fault.trial = fate(current.get("number"), out_dir)
            raise fault from None


def database_fault(error: BaseException | None) -> DatabaseFault | None:
    """The study's database fault behind ``error``: the error itself, or its context where Optuna's optimize, failing
    to store a trial's end, raised an AssertionError or UnboundLocalError from a finally clause in its place."""
    while error is not None and not isinstance(error, DatabaseFault):
        error = error.__context__
    return error


def fate(number: int | None, out_dir: Path | None) -> str | None:
    """What becomes of the trial a database fault ended, for the line that stops the worker."""
    if number is None:
        return None
    trained = trained_result(trial_dir(out_dir, number)) if out_dir else None
    if trained is None:
        return f"trial {number} was cut short: the next start fails it and runs another in its place"
    return f"trial {number} finished (validation loss {trained[0]:.4f}): the next start records it from its folder"
