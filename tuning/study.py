"""The study and its storage, what defines it (model, space, epochs, sampler, pruner), and the workers that share it."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

import engine
from engine import UserError, former_name
from study_storage import StorageSettings, open_storage, unusable_storage
from tuning.space import NAMED_SPACES, Space, options_for, parse_space, recipe_for, resolve_space, to_json

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DEFAULT_MODEL, DEFAULT_SPACE, DEFAULT_EPOCHS, DEFAULT_TRIALS = "CIFAR10Net_7", "model", 5, 30
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)
# Workers that open a fresh storage at once race to create its tables and the study; the loser's
# CREATE or INSERT meets the winner's, worded "already exists" (SQLite, PostgreSQL, MySQL), "UNIQUE
# constraint failed" (SQLite), "violates unique constraint" (PostgreSQL) or "Duplicate entry" (MySQL).
CREATION_RACE = ("already exists", "unique constraint", "duplicate")
CREATION_ATTEMPTS = 5

# Optuna's samplers and pruners by the names --sampler and --pruner take; a sampler the installed Optuna lacks is not
# offered. CMA-ES and the Gaussian process draw categorical parameters at random (they model numbers only).
SAMPLER_CLASSES = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "gp": "GPSampler"}
SAMPLERS = {name: cls for name, cls in SAMPLER_CLASSES.items() if hasattr(optuna.samplers, cls)}
PRUNERS = ("median", "hyperband", "none")
DEFAULT_SAMPLER, DEFAULT_PRUNER = "tpe", "median"


# --------------------------------------------------------------------------------------------
# What defines a study
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudySettings:
    """What defines the tuning problem; stored with the study so that every worker and every rerun agrees."""

    model: str
    space: str  # how it was given: a named space, or the file it was read from
    search_space: dict[str, dict[str, Any]]  # the space itself, in a --space file's form
    epochs: int
    sampler: str = DEFAULT_SAMPLER
    pruner: str = DEFAULT_PRUNER

    def parsed(self) -> Space:
        return parse_space(self.search_space, self.model, f"study's space ({self.space})")


def trial_config(base: engine.RunConfig, params: dict[str, Any], epochs: int, out_dir: Path) -> engine.RunConfig:
    """The run a trial's parameters make: ``base.model`` with the trial's options and its own recipe with the trial's
    fields, for ``epochs``, in ``out_dir``. Its config.json is what ``modified_models.py --config`` reruns."""
    return replace(
        base,
        model_options=options_for(base.model, params),
        recipe=recipe_for(base.model, params, epochs),
        out_dir=str(out_dir),
    )


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":  # a trial worse than the median of earlier trials at the same epoch, after 5 trials
        return optuna.pruners.MedianPruner()
    if name == "hyperband":  # successive halving in brackets, from 1 epoch up to the trial's all
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def make_sampler(name: str, seed: int, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """--sampler's sampler seeded by --seed in a fresh study, and by --seed and the trials so far in a resumed one.

    Reseeding a resumed study with --seed alone would replay the first run's random draws: its next
    trial would repeat trial 0. The trials so far differ from one run of a study to the next.
    """
    sampler_seed = (
        seed if trials_so_far == 0 else int(np.random.SeedSequence((seed, trials_so_far)).generate_state(1)[0])
    )
    if name == "tpe":  # constant liar: workers avoid each other's running trials
        return optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)
    return getattr(optuna.samplers, SAMPLERS[name])(seed=sampler_seed)


def is_creation_race(error: Exception) -> bool:
    return any(words in str(error).lower() for words in CREATION_RACE)


def open_study(storage_url: str, name: str, settings: StorageSettings = StorageSettings()) -> optuna.Study:
    """Create the study, or load it if it exists; an unusable storage is the user's to fix. ``configure`` gives it its
    sampler and pruner.

    A worker that loses the race to create a fresh storage retries after a random pause, by which
    time the winner has created it.
    """
    backoff = random.Random()  # seeded by the OS: workers forked from one process still pause differently
    for attempt in range(1, CREATION_ATTEMPTS + 1):
        try:
            return optuna.create_study(
                study_name=name, storage=open_storage(storage_url, settings), direction="minimize", load_if_exists=True
            )
        except Exception as error:
            # database drivers raise many types (ImportError, OperationalError, ArgumentError, OSError, ...)
            if attempt < CREATION_ATTEMPTS and is_creation_race(error):
                time.sleep(attempt * backoff.uniform(0.05, 0.25))
                continue
            raise UserError(unusable_storage(storage_url, error)) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def configure(study: optuna.Study, settings: StudySettings, seed: int) -> None:
    """The study's sampler and pruner, as its settings name them."""
    study.sampler = make_sampler(settings.sampler, seed, len(study.get_trials(deepcopy=False)))
    study.pruner = make_pruner(settings.pruner, settings.epochs)


def stored_settings(study: optuna.Study) -> dict[str, Any]:
    """What the study holds of its settings. A study from before --model tunes CIFAR10Net_7, and one from before the
    space was stored has the space its name names (its former name too)."""
    stored = dict(study.user_attrs)
    if not stored:
        return stored
    stored.setdefault("model", DEFAULT_MODEL)
    if "space" in stored:
        stored["space"] = former_name(stored["space"])
        if "search_space" not in stored and stored["space"] in NAMED_SPACES:
            stored["search_space"] = to_json(resolve_space(stored["space"], stored["model"])[1])
    return stored


def refused(study: optuna.Study, flag: str, stored: Any) -> UserError:
    return UserError(
        f"study {study.study_name!r} was tuned with --{flag} {stored}; continue it with that (or leave --{flag} out), "
        "or start another study with --study-name or --out-dir"
    )


def study_settings(
    study: optuna.Study,
    model: str | None,
    space: str | None,
    epochs: int | None,
    sampler: str | None = None,
    pruner: str | None = None,
) -> StudySettings:
    """The study's stored settings; flags that contradict them are an error (a space by what it holds, whatever it is
    called), missing flags take them, and a new study's are stored."""
    stored = stored_settings(study)
    for key, given in (("model", model), ("epochs", epochs), ("sampler", sampler), ("pruner", pruner)):
        if key in stored and given is not None and given != stored[key]:
            raise refused(study, key, stored[key])
    model = stored.get("model", model or DEFAULT_MODEL)
    if space is not None:
        label, parsed = resolve_space(space, model)
        if "search_space" in stored and to_json(parsed) != stored["search_space"]:
            raise UserError(
                f"study {study.study_name!r} searches another space than --space {space} holds: the one given as "
                f"--space {stored['space']} (space.json in its folder holds it); continue it with that (or leave "
                "--space out), or start another study with --study-name or --out-dir"
            )
    if "search_space" in stored:
        label, search_space = stored["space"], stored["search_space"]
    else:
        label, parsed = (label, parsed) if space is not None else resolve_space(DEFAULT_SPACE, model)
        search_space = to_json(parsed)
    settings = StudySettings(
        model=model,
        space=label,
        search_space=search_space,
        epochs=stored.get("epochs", epochs or DEFAULT_EPOCHS),
        sampler=stored.get("sampler", sampler or DEFAULT_SAMPLER),
        pruner=stored.get("pruner", pruner or DEFAULT_PRUNER),
    )
    for key, value in asdict(settings).items():
        if study.user_attrs.get(key) != value:  # as stored: a former name is stored anew
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
# The trials, in a line and at their best
# --------------------------------------------------------------------------------------------
def format_params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}" for name, value in params.items()
    )


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None
