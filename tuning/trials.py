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
from study_storage import first_line
from tuning.study import (
    FINISHED,
    OUT_OF_MEMORY,
    SPACES,
    StudySettings,
    best_trial,
    fail_abandoned_trials,
    fail_silent_trials,
    format_params,
    places_taken,
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


def make_objective(
    settings: StudySettings, base: engine.RunConfig, data: engine.SplitData, n_trials: int, prune: bool
) -> Callable[[Trial], float]:
    def objective(trial: Trial) -> float:
        trial.set_user_attr("worker", this_worker())
        if places_taken(trial.study, before=trial.number) >= n_trials:
            trial.set_user_attr("reason", f"not needed: other workers' trials already make up --n-trials {n_trials}")
            raise NotNeeded(trial.user_attrs["reason"])
        params = SPACES[settings.space](trial)
        config = trial_config(base, params, settings.epochs, trial_dir(Path(base.out_dir), trial.number))
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
        finally:
            trial.set_user_attr("epochs_run", counter.epochs_run)
        # the trial's network, for predict.py, evaluate.py and tsne.py --run
        engine.save_weights(fitted.net, Path(config.out_dir))
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
) -> None:
    """Start trials, one at a time, until the study holds ``n_trials`` finished ones or --timeout has passed.

    Checking before each trial keeps a worker from starting one that other workers' running trials already make up for;
    two workers that still start the last place at once are settled in the objective (``NotNeeded``). When the running
    trials of other workers make up the rest, this worker waits: each either finishes, or its heartbeat stays silent for
    ``grace`` seconds (its worker died, wherever it ran), it is failed, and this worker runs a trial in its place. A
    journal file (``grace`` None) has no heartbeat to tell a dead worker from a slow one: there the worker stops.
    """
    deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
    waiting = False

    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        print(trial_line(trial, epochs, best_trial(study)), flush=True)

    while time.monotonic() < deadline:
        fail_abandoned_trials(study)
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
        study.optimize(
            objective, n_trials=1, catch=(NotNeeded, *OUT_OF_MEMORY), callbacks=[report], gc_after_trial=True
        )
