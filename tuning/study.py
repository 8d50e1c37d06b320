"""The tuning study's pieces: search spaces, the study and its storage, the workers that share it, its outputs."""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
import torch
from matplotlib.ticker import NullFormatter
from optuna.trial import FrozenTrial, Trial, TrialState
from optuna.visualization import matplotlib as plots

import engine
from analyses.report import write_report
from engine import UserError, former_name, write_atomically
from models.study import STUDY_RECIPE
from study_storage import StorageSettings, open_storage, unusable_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DEFAULT_SPACE, DEFAULT_EPOCHS, DEFAULT_TRIALS = "study", 5, 30
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)
# Workers that open a fresh storage at once race to create its tables and the study; the loser's
# CREATE or INSERT meets the winner's, worded "already exists" (SQLite, PostgreSQL, MySQL), "UNIQUE
# constraint failed" (SQLite), "violates unique constraint" (PostgreSQL) or "Duplicate entry" (MySQL).
CREATION_RACE = ("already exists", "unique constraint", "duplicate")
CREATION_ATTEMPTS = 5


# --------------------------------------------------------------------------------------------
# Search spaces
# --------------------------------------------------------------------------------------------
FC_SIZES = (32, 64, 128, 256, 512)
BATCH_SIZES = (32, 64, 128, 256, 512)
CONV1_WIDTHS, CONV1_KERNELS = (16, 20, 32, 48, 64), (3, 5)
CONV2_WIDTHS, CONV2_KERNELS = (32, 40, 64, 96, 128), (3, 4, 5)
# Muon is left out: it orthogonalises whole filter banks, made for the wide airbench nets, not this search.
TUNED_OPTIMIZERS = ("adam", "adamw", "sgd")


def suggest_study(trial: Trial) -> dict[str, Any]:
    """The study's study: CIFAR10Net_7's layer sizes and dropout, and the recipe's lr, weight decay and batch size."""
    return {
        "fc1_size": trial.suggest_categorical("fc1_size", FC_SIZES),
        "fc2_size": trial.suggest_categorical("fc2_size", FC_SIZES),
        "dropout": trial.suggest_float("dropout", 0.1, 0.9),
        "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 5e-4, 1e-1, log=True),
        "batch_size": trial.suggest_categorical("batch_size", BATCH_SIZES),
    }


def suggest_extended(trial: Trial) -> dict[str, Any]:
    """The study's space, the two convolutions' shapes, and the optimiser with its own settings."""
    params = suggest_study(trial)
    params.update(
        conv1_width=trial.suggest_categorical("conv1_width", CONV1_WIDTHS),
        conv1_kernel=trial.suggest_categorical("conv1_kernel", CONV1_KERNELS),
        conv2_width=trial.suggest_categorical("conv2_width", CONV2_WIDTHS),
        conv2_kernel=trial.suggest_categorical("conv2_kernel", CONV2_KERNELS),
        optimizer=trial.suggest_categorical("optimizer", TUNED_OPTIMIZERS),
    )
    if params["optimizer"] == "sgd":
        params["momentum"] = trial.suggest_float("momentum", 0.8, 0.99)
    else:
        params["beta1"] = trial.suggest_float("beta1", 0.8, 0.95)
        params["beta2"] = trial.suggest_float("beta2", 0.99, 0.9999)
    return params


# Each space draws CIFAR10Net_7's options (its layer sizes and dropout: what the network is) and recipe fields.
TUNED_MODEL = "CIFAR10Net_7"
SPACES: dict[str, Callable[[Trial], dict[str, Any]]] = {"study": suggest_study, "extended": suggest_extended}
RECIPE_PARAMS = ("batch_size", "optimizer", "lr", "momentum", "weight_decay")
BETA_PARAMS = ("beta1", "beta2")


def recipe_for(params: dict[str, Any], epochs: int) -> engine.Recipe:
    """The study's recipe with a trial's training hyperparameters."""
    recipe = replace(STUDY_RECIPE, epochs=epochs, **{name: params[name] for name in RECIPE_PARAMS if name in params})
    if "beta1" in params:
        recipe = replace(recipe, betas=(params["beta1"], params["beta2"]))
    return recipe


def options_for(params: dict[str, Any]) -> dict[str, Any]:
    """CIFAR10Net_7's options with a trial's network hyperparameters (every parameter that is not the recipe's),
    checked.
    """
    chosen = {name: value for name, value in params.items() if name not in RECIPE_PARAMS + BETA_PARAMS}
    return engine.model_spec(TUNED_MODEL).resolve(TUNED_MODEL, chosen, "the trial's parameters")


def trial_config(base: engine.RunConfig, params: dict[str, Any], epochs: int, out_dir: Path) -> engine.RunConfig:
    """The run a trial's configuration makes: CIFAR10Net_7 with the trial's options and recipe, in ``out_dir``. Its
    config.json is what ``modified_models.py --config`` reruns."""
    return replace(
        base,
        model=TUNED_MODEL,
        model_options=options_for(params),
        recipe=recipe_for(params, epochs),
        out_dir=str(out_dir),
    )


# --------------------------------------------------------------------------------------------
# The study and its storage
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudySettings:
    """What defines the tuning problem; stored with the study so that every worker and resume agrees."""

    space: str
    epochs: int


def make_pruner(prune: bool) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner() if prune else optuna.pruners.NopPruner()


def make_sampler(seed: int, trials_so_far: int) -> optuna.samplers.TPESampler:
    """A TPE sampler seeded by --seed in a fresh study, and by --seed and the trials so far in a resumed one.

    Reseeding a resumed study with --seed alone would replay the first run's random draws: its next
    trial would repeat trial 0. The trials so far differ from one run of a study to the next.
    """
    sampler_seed = (
        seed if trials_so_far == 0 else int(np.random.SeedSequence((seed, trials_so_far)).generate_state(1)[0])
    )
    # constant liar: workers avoid each other's running trials
    return optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)


def is_creation_race(error: Exception) -> bool:
    return any(words in str(error).lower() for words in CREATION_RACE)


def open_study(
    storage_url: str, name: str, seed: int, prune: bool, settings: StorageSettings = StorageSettings()
) -> optuna.Study:
    """Create the study, or load it if it exists; an unusable storage is the user's to fix.

    A worker that loses the race to create a fresh storage retries after a random pause, by which
    time the winner has created it.
    """
    backoff = random.Random()  # seeded by the OS: workers forked from one process still pause differently
    for attempt in range(1, CREATION_ATTEMPTS + 1):
        try:
            study = optuna.create_study(
                study_name=name,
                storage=open_storage(storage_url, settings),
                pruner=make_pruner(prune),
                direction="minimize",
                load_if_exists=True,
            )
            break
        except Exception as error:
            # database drivers raise many types (ImportError, OperationalError, ArgumentError, OSError, ...)
            if attempt < CREATION_ATTEMPTS and is_creation_race(error):
                time.sleep(attempt * backoff.uniform(0.05, 0.25))
                continue
            raise UserError(unusable_storage(storage_url, error)) from None
    study.sampler = make_sampler(seed, len(study.get_trials(deepcopy=False)))
    return study


def study_settings(study: optuna.Study, space: str | None, epochs: int | None) -> StudySettings:
    """The study's stored settings; flags that contradict them are an error, missing flags take them."""
    stored = {
        **study.user_attrs,
        **({"space": former_name(study.user_attrs["space"])} if "space" in study.user_attrs else {}),
    }
    for key, given in (("space", space), ("epochs", epochs)):
        if key in stored and given is not None and given != stored[key]:
            raise UserError(
                f"study {study.study_name!r} was tuned with --{key} {stored[key]}; continue it with that (or leave "
                f"--{key} out), or start another study with --study-name or --out-dir"
            )
    settings = StudySettings(
        space=stored.get("space", space or DEFAULT_SPACE), epochs=stored.get("epochs", epochs or DEFAULT_EPOCHS)
    )
    for key, value in asdict(settings).items():
        study.set_user_attr(key, value)
    return settings


# --------------------------------------------------------------------------------------------
# Workers: who runs which trial, and trials left behind by dead ones
# --------------------------------------------------------------------------------------------
def this_worker() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def process_exists(pid: int) -> bool:
    if os.name == "nt":
        return True  # on Windows os.kill(pid, 0) would end the process: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def private_optuna(study: optuna.Study) -> tuple[optuna.storages.BaseStorage, int, set[int]]:
    """The study's storage, its id there, and the ids of its RUNNING trials whose heartbeat has been silent for the
    grace period (none without a heartbeat): what failing another worker's trial with a reason needs, and what Optuna
    keeps private (Optuna's own fail_stale_trials reads the same, but fails the trials before a reason can be recorded).
    The one place tuning reaches into Optuna's private API; tests/test_tune.py checks it against the installed Optuna.
    """
    try:
        storage, study_id = study._storage, study._study_id
        heartbeat = optuna.storages._heartbeat.is_heartbeat_enabled(storage)  # the study's storage is a cache in front
        return storage, study_id, set(storage._get_stale_trial_ids(study_id)) if heartbeat else set()
    except AttributeError as error:
        raise RuntimeError(
            f"Optuna {optuna.__version__} no longer has what tuning.private_optuna reads ({error}); install an earlier "
            f"release (pip install 'optuna<{optuna.__version__}'), or update tuning.private_optuna"
        ) from None


def fail_running_trials(
    study: optuna.Study, reason_for: Callable[[FrozenTrial, dict[str, Any], set[int]], str | None]
) -> None:
    """Mark FAIL, with a reason, the RUNNING trials that ``reason_for`` (given the trial, its worker and the trial
    numbers whose heartbeat is silent) gives one for."""
    storage, study_id, silent_ids = private_optuna(study)
    silent = {storage.get_trial_number_from_id(trial_id) for trial_id in silent_ids}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        reason = reason_for(trial, worker, silent) if worker else None
        if reason:
            # a trial of another process: study.set_user_attr reaches only this process's trials, the storage any
            try:
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                storage.set_trial_user_attr(trial_id, "reason", reason)
                study.tell(trial.number, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker marked it first


def abandoned(worker: dict[str, Any]) -> bool:
    """The worker ran on this machine and its process is gone (killed, crashed, or stopped by its database)."""
    return worker["host"] == socket.gethostname() and not process_exists(worker["pid"])


def fail_abandoned_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker ran on this machine and is gone."""
    fail_running_trials(
        study,
        lambda trial, worker, silent: (
            f"its worker (process {worker['pid']}) ended mid-trial" if abandoned(worker) else None
        ),
    )


def fail_silent_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose heartbeat has been silent for the grace period, wherever their worker ran (a
    database storage's heartbeat; a journal file has none)."""
    fail_running_trials(
        study,
        lambda trial, worker, silent: (
            f"its worker ({worker['host']}, process {worker['pid']}) sent no heartbeat "
            f"for the grace period (--heartbeat-grace)"
            if trial.number in silent
            else None
        ),
    )


def places_taken(study: optuna.Study, before: int | None = None) -> int:
    """Trials that count towards --n-trials: finished ones, and running ones (numbered below ``before``, if given)."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(1 for t in trials if t.state in FINISHED or before is None or t.number < before)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def format_params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}" for name, value in params.items()
    )


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None


TRIAL_COLUMNS = ("number", "state", "value", "duration_s", "epochs_run", "reason")
OBJECTIVE_NAME = "validation loss"  # what the figures call a trial's value (Optuna's own word is "Objective Value")
# name: complete trials it needs
FIGURES = {"optimization_history": 1, "param_importances": 2, "parallel_coordinate": 2, "slice": 2}


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """One row per trial, one column per parameter any trial has."""
    trials = study.get_trials(deepcopy=False)
    param_names = list(dict.fromkeys(name for trial in trials for name in trial.params))
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "duration_s": round(t.duration.total_seconds(), 2) if t.duration else None,
            "epochs_run": t.user_attrs.get("epochs_run"),
            "reason": t.user_attrs.get("reason", ""),
            **t.params,
        }
        for t in trials
    ]
    engine.write_csv(path, rows, [*TRIAL_COLUMNS, *param_names])


def best_record(study: optuna.Study, settings: StudySettings, best: FrozenTrial, retrain_epochs: int) -> dict[str, Any]:
    return {
        "study": study.study_name,
        "space": settings.space,
        "trial": best.number,
        "val_loss": best.value,
        "epochs": settings.epochs,
        "params": best.params,
        "model": TUNED_MODEL,
        "model_options": options_for(best.params),
        "recipe": asdict(recipe_for(best.params, retrain_epochs)),
    }


def write_figures(study: optuna.Study, out_dir: Path) -> list[str]:
    """Optuna's matplotlib figures the study has enough complete trials for; returns the files written."""
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    written = []
    for name, needed in FIGURES.items():
        if complete < needed:
            continue
        # Optuna's plots call plt.style.use("ggplot"): rc_context puts the process's style back after them
        with warnings.catch_warnings(), matplotlib.rc_context():
            # the plots are "experimental", and an axis where all trials agree is "singular"
            warnings.simplefilter("ignore")
            axes = getattr(plots, f"plot_{name}")(study, target_name=OBJECTIVE_NAME)
            figure = np.ravel(axes)[0].figure
            width, height = figure.get_size_inches()
            figure.set_size_inches(max(width, 1.3 * len(study.best_params) + 3), height)  # an axis per parameter
            for axis in figure.axes:  # a log axis (lr, weight decay) labels its minor ticks too, and they collide
                axis.tick_params(labelsize=8)
                axis.tick_params(axis="x", labelrotation=30)
                for scale, ticks in ((axis.get_xscale(), axis.xaxis), (axis.get_yscale(), axis.yaxis)):
                    if scale == "log":
                        ticks.set_minor_formatter(NullFormatter())
            # bbox "tight" widens the image to Optuna's long, rotated labels instead of cutting them off
            write_atomically(
                out_dir / f"{name}.png", partial(figure.savefig, dpi=120, format="png", bbox_inches="tight")
            )
        plt.close(figure)
        written.append(f"{name}.png")
    return written


def pruning_savings(study: optuna.Study, epochs: int) -> tuple[int, int]:
    """Pruned trials and the epochs they did not run."""
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    return len(pruned), sum(epochs - trial.user_attrs.get("epochs_run", epochs) for trial in pruned)


def write_outputs(study: optuna.Study, settings: StudySettings, out_dir: Path, retrain_epochs: int) -> None:
    counts = {state: len(study.get_trials(deepcopy=False, states=(state,))) for state in (*FINISHED, TrialState.FAIL)}
    pruned, saved = pruning_savings(study, settings.epochs)
    print(
        f"Study {study.study_name!r}: {counts[TrialState.COMPLETE]} complete, {pruned} pruned, "
        f"{counts[TrialState.FAIL]} failed trials; "
        f"pruning saved {saved} of {settings.epochs * (counts[TrialState.COMPLETE] + pruned)} epochs"
    )
    write_trials_csv(study, out_dir / "trials.csv")
    written = ["trials.csv"]
    best = best_trial(study)
    if best is None:
        print("No trial has completed yet: no best_params.json and no figures")
    else:
        engine.write_json(out_dir / "best_params.json", best_record(study, settings, best, retrain_epochs))
        written += ["best_params.json", *write_figures(study, out_dir)]
        print(f"Best: trial {best.number}, validation loss {best.value:.4f}; {format_params(best.params)}")
    written.append(write_report(out_dir).name)
    print(f"Written to {out_dir}: {', '.join(written)}")
