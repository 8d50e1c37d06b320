"""Tune CIFAR10Net_7's hyperparameters with Optuna, as the README's study did, then retrain the winner.

    python hyperparameter_tune.py --data-dir ./data                          # 30 trials of 5 epochs in runs/tune
    python hyperparameter_tune.py --data-dir ./data --n-trials 50            # the same study, up to 50 trials
    python hyperparameter_tune.py --data-dir ./data --n-trials 0 --retrain   # train the best so far for 100 epochs

Each trial samples a configuration, trains CIFAR10Net_7 (CIFAR10Net with dropout) through the same
engine as main.py for --epochs epochs on the 45,000-image training split, and scores it by the
validation loss after its last epoch; lowest wins. A seeded TPE sampler proposes each next
configuration from the trials so far (the first 10 at random), and a median pruner stops a trial
whose validation loss after some epoch is worse than the median of earlier trials at that epoch.
A trial whose validation loss becomes NaN, infinite or above 10,000 (diverged) is pruned at once;
one that runs out of memory fails; either way the study goes on. The README's study (30 trials of
5 epochs) found CIFAR10Net_optim.

Search spaces (--space):
  readme    fc1_size, fc2_size in {32, 64, 128, 256, 512}; dropout uniform in [0.1, 0.9];
            lr log-uniform in [1e-4, 1e-1]; weight_decay log-uniform in [5e-4, 1e-1];
            batch_size in {32, 64, 128, 256, 512}; everything else is the README's recipe
  extended  the readme space, plus the width and kernel size of both convolutions, and the
            optimizer: adam or adamw with their betas, or sgd with its Nesterov momentum

The study lives in a storage, not in the process: by default the SQLite file <out-dir>/study.db,
or any Optuna storage given by --storage. Every trial is stored as it ends, so running the same
command again continues the study (trial numbers go on) until it holds --n-trials finished
(complete or pruned) trials; a study stopped by Ctrl-C or killed mid-trial loses only that trial.
A study remembers its --space and --epochs; resume it with the same ones (or leave them out).
--seed seeds the sampler of a fresh study, so the same seed proposes the same first trials; a resumed
study seeds it from --seed and the number of trials the study already holds, so that the rerun
proposes new configurations instead of replaying the first run's.

Several workers, one study: start the same command in several processes, on one machine or on many,
with one storage, at once or one after another (workers that open a fresh storage at the same
moment take turns creating it). Each worker trains one trial at a time; together they stop at
exactly --n-trials finished trials. Give each worker its own --seed, so that their first, random
trials differ.
On one machine a journal file is the simplest shared storage (SQLite can stall on several writers):
    python hyperparameter_tune.py --data-dir ./data --storage runs/tune/study.log --seed 1 &
    python hyperparameter_tune.py --data-dir ./data --storage runs/tune/study.log --seed 2 &
(with several GPUs, give each worker its own: CUDA_VISIBLE_DEVICES=0 python ..., =1, ...).
Across machines, use a database server that every machine reaches, e.g. PostgreSQL on dbhost with an
empty database made once by createdb -h dbhost -U tuner optuna; then on machine A and on machine B:
    python hyperparameter_tune.py --data-dir ./data --seed 1 --storage postgresql+psycopg2://tuner:secret@dbhost:5432/optuna
    python hyperparameter_tune.py --data-dir ./data --seed 2 --storage postgresql+psycopg2://tuner:secret@dbhost:5432/optuna
(+psycopg2 picks the driver that requirements.txt installs, psycopg2-binary; to SQLAlchemy 2.1 a bare
postgresql:// means psycopg 3. MySQL works the same: mysql+pymysql://... after pip install pymysql.)

A killed worker leaves its trial RUNNING in the storage. Such a trial is marked FAIL, with the reason,
and does not count: at once when its worker ran on this machine (its process is gone), and, with a
database storage (SQLite, PostgreSQL, MySQL), once its worker's heartbeat has been silent for
3 minutes, wherever it ran. A journal file has no heartbeat: a trial of a worker killed on another
machine stays RUNNING and holds its place; raise --n-trials by one to make up for it.

Outputs in --out-dir (default runs/tune): best_params.json (the best trial, its network and its
full recipe), trials.csv (every trial: state, value, duration, epochs run, reason, parameters),
optimization_history.png, param_importances.png (from 2 complete trials on), parallel_coordinate.png,
slice.png, trials/<number>/ (each trial's curves), and with --retrain the run folder retrain/
(as main.py's: metrics, curves, model.pth, test accuracy, t-SNE). Trials and the retraining run on
one device each (Optuna's pruning callback does not support data-parallel training).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import re
import shlex
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import torch
from lightning.pytorch.callbacks import Callback
from optuna.trial import FrozenTrial, Trial, TrialState
from optuna_integration import PyTorchLightningPruningCallback
from torch import nn

import engine
from functions import UserError, write_atomically
from main import README_RECIPE, CIFAR10Net
from modified_models import CIFAR10Net_7

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DEFAULT_SPACE, DEFAULT_EPOCHS, DEFAULT_TRIALS = "readme", 5, 30
HEARTBEAT_SECONDS, HEARTBEAT_GRACE_SECONDS = 60, 180
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)
# Workers that open a fresh storage at once race to create its tables and the study; the loser's
# CREATE or INSERT meets the winner's, worded "already exists" (SQLite, PostgreSQL, MySQL), "UNIQUE
# constraint failed" (SQLite), "violates unique constraint" (PostgreSQL) or "Duplicate entry" (MySQL).
CREATION_RACE = ("already exists", "unique constraint", "duplicate")
CREATION_ATTEMPTS = 5


# --------------------------------------------------------------------------------------------
# Search spaces
# --------------------------------------------------------------------------------------------
class TunableCIFAR10Net(CIFAR10Net):
    """CIFAR10Net with dropout whose two convolutions' widths and kernel sizes are chosen too.

    The defaults are CIFAR10Net's (20 filters 3x3, 40 filters 4x4), so the defaults give CIFAR10Net_7.
    """

    def __init__(self, conv1_width: int = 20, conv1_kernel: int = 3, conv2_width: int = 40, conv2_kernel: int = 4,
                 fc1_size: int = 124, fc2_size: int = 64, dropout: float = 0.5):
        super().__init__(fc1_size, fc2_size, dropout)
        self.conv1 = nn.Conv2d(3, conv1_width, conv1_kernel)
        self.bn1 = nn.BatchNorm2d(conv1_width)
        self.conv2 = nn.Conv2d(conv1_width, conv2_width, conv2_kernel)
        self.bn2 = nn.BatchNorm2d(conv2_width)
        side = ((32 - conv1_kernel + 1) // 2 - conv2_kernel + 1) // 2  # each unpadded convolution, then a 2x2 pool
        self.fc1 = nn.Linear(conv2_width * side * side, fc1_size)


FC_SIZES = (32, 64, 128, 256, 512)
BATCH_SIZES = (32, 64, 128, 256, 512)
CONV1_WIDTHS, CONV1_KERNELS = (16, 20, 32, 48, 64), (3, 5)
CONV2_WIDTHS, CONV2_KERNELS = (32, 40, 64, 96, 128), (3, 4, 5)


def suggest_readme(trial: Trial) -> dict[str, Any]:
    """The README's study: CIFAR10Net_7's layer sizes and dropout, and the recipe's lr, weight decay and batch size."""
    return {
        "fc1_size": trial.suggest_categorical("fc1_size", FC_SIZES),
        "fc2_size": trial.suggest_categorical("fc2_size", FC_SIZES),
        "dropout": trial.suggest_float("dropout", 0.1, 0.9),
        "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 5e-4, 1e-1, log=True),
        "batch_size": trial.suggest_categorical("batch_size", BATCH_SIZES),
    }


def suggest_extended(trial: Trial) -> dict[str, Any]:
    """The README's space, the two convolutions' shapes, and the optimiser with its own settings."""
    params = suggest_readme(trial)
    params.update(
        conv1_width=trial.suggest_categorical("conv1_width", CONV1_WIDTHS),
        conv1_kernel=trial.suggest_categorical("conv1_kernel", CONV1_KERNELS),
        conv2_width=trial.suggest_categorical("conv2_width", CONV2_WIDTHS),
        conv2_kernel=trial.suggest_categorical("conv2_kernel", CONV2_KERNELS),
        optimizer=trial.suggest_categorical("optimizer", engine.OPTIMIZERS),
    )
    if params["optimizer"] == "sgd":
        params["momentum"] = trial.suggest_float("momentum", 0.8, 0.99)
    else:
        params["beta1"] = trial.suggest_float("beta1", 0.8, 0.95)
        params["beta2"] = trial.suggest_float("beta2", 0.99, 0.9999)
    return params


@dataclass(frozen=True)
class SearchSpace:
    suggest: Callable[[Trial], dict[str, Any]]
    network: type[nn.Module]


SPACES = {"readme": SearchSpace(suggest_readme, CIFAR10Net_7), "extended": SearchSpace(suggest_extended, TunableCIFAR10Net)}
RECIPE_PARAMS = ("batch_size", "optimizer", "lr", "momentum", "weight_decay")
BETA_PARAMS = ("beta1", "beta2")


def recipe_for(params: dict[str, Any], epochs: int) -> engine.Recipe:
    """The README's recipe with a trial's training hyperparameters."""
    recipe = replace(README_RECIPE, epochs=epochs, **{name: params[name] for name in RECIPE_PARAMS if name in params})
    if "beta1" in params:
        recipe = replace(recipe, betas=(params["beta1"], params["beta2"]))
    return recipe


def network_for(space: str, params: dict[str, Any]) -> nn.Module:
    """The space's network built with a trial's network hyperparameters (every parameter that is not the recipe's)."""
    return SPACES[space].network(**{name: value for name, value in params.items() if name not in RECIPE_PARAMS + BETA_PARAMS})


# --------------------------------------------------------------------------------------------
# The study and its storage
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudySettings:
    """What defines the tuning problem; stored with the study so that every worker and resume agrees."""

    space: str
    epochs: int


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def is_journal(storage: str) -> bool:
    return storage.startswith("journal:") or storage.endswith(".log")


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """A journal file (``journal:PATH`` or ``PATH.log``), or a database URL with a heartbeat for its running trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat arguments
        if is_journal(storage):
            path = storage.removeprefix("journal:")
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
        return optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=HEARTBEAT_GRACE_SECONDS)


def make_pruner(prune: bool) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner() if prune else optuna.pruners.NopPruner()


def make_sampler(seed: int, trials_so_far: int) -> optuna.samplers.TPESampler:
    """A TPE sampler seeded by --seed in a fresh study, and by --seed and the trials so far in a resumed one.

    Reseeding a resumed study with --seed alone would replay the first run's random draws: its next
    trial would repeat trial 0. The trials so far differ from one run of a study to the next.
    """
    sampler_seed = seed if trials_so_far == 0 else int(np.random.SeedSequence((seed, trials_so_far)).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)  # constant liar: workers avoid each other's running trials


def is_creation_race(error: Exception) -> bool:
    return any(words in str(error).lower() for words in CREATION_RACE)


def open_study(storage_url: str, name: str, seed: int, prune: bool) -> optuna.Study:
    """Create the study, or load it if it exists; an unusable storage is the user's to fix.

    A worker that loses the race to create a fresh storage retries after a random pause, by which
    time the winner has created it.
    """
    backoff = random.Random()  # seeded by the OS: workers forked from one process still pause differently
    for attempt in range(1, CREATION_ATTEMPTS + 1):
        try:
            study = optuna.create_study(study_name=name, storage=open_storage(storage_url), pruner=make_pruner(prune),
                                        direction="minimize", load_if_exists=True)
            break
        except Exception as error:  # database drivers raise many types (ImportError, OperationalError, ArgumentError, OSError, ...)
            if attempt < CREATION_ATTEMPTS and is_creation_race(error):
                time.sleep(attempt * backoff.uniform(0.05, 0.25))
                continue
            raise UserError(f"cannot open the study storage {hide_password(storage_url)}: {first_line(error)}; give a journal file "
                            "(PATH.log), sqlite:///PATH.db, or a reachable postgresql:// or mysql:// URL with its driver installed") from None
    study.sampler = make_sampler(seed, len(study.get_trials(deepcopy=False)))
    return study


def study_settings(study: optuna.Study, space: str | None, epochs: int | None) -> StudySettings:
    """The study's stored settings; flags that contradict them are an error, missing flags take them."""
    stored = study.user_attrs
    for key, given in (("space", space), ("epochs", epochs)):
        if key in stored and given is not None and given != stored[key]:
            raise UserError(f"study {study.study_name!r} was tuned with --{key} {stored[key]}; continue it with that (or leave "
                            f"--{key} out), or start another study with --study-name or --out-dir")
    settings = StudySettings(space=stored.get("space", space or DEFAULT_SPACE), epochs=stored.get("epochs", epochs or DEFAULT_EPOCHS))
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


def fail_running_trials(study: optuna.Study, reason_for: Callable[[dict[str, Any]], str | None]) -> None:
    """Mark FAIL, with a reason, the RUNNING trials whose worker ``reason_for`` gives one for."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        reason = reason_for(worker) if worker else None
        if reason:
            try:  # Optuna's public API sets attributes only on a trial of this process: use the storage, as fail_stale_trials does
                study._storage.set_trial_user_attr(trial._trial_id, "reason", reason)
                study.tell(trial.number, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker marked it first


def fail_abandoned_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker ran on this machine and is gone (killed, or crashed)."""
    fail_running_trials(study, lambda worker: f"its worker (process {worker['pid']}) ended mid-trial"
                        if worker["host"] == socket.gethostname() and not process_exists(worker["pid"]) else None)


def places_taken(study: optuna.Study, before: int | None = None) -> int:
    """Trials that count towards --n-trials: finished ones, and running ones (numbered below ``before``, if given)."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(1 for t in trials if t.state in FINISHED or before is None or t.number < before)


# --------------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------------
class NotNeeded(Exception):
    """Two workers started the last trials at once: the later-numbered one steps back and fails unrun."""


class EpochCounter(Callback):
    """Counts the epochs a trial ran (its validations), whatever ends it."""

    def __init__(self):
        self.epochs_run = 0

    def on_validation_start(self, trainer, module) -> None:
        self.epochs_run += 1


def trial_dir(out_dir: Path, number: int) -> Path:
    return out_dir / "trials" / f"{number:04d}"


def make_objective(settings: StudySettings, base: engine.RunConfig, data: engine.SplitData, n_trials: int,
                   prune: bool) -> Callable[[Trial], float]:
    def objective(trial: Trial) -> float:
        trial.set_user_attr("worker", this_worker())
        if places_taken(trial.study, before=trial.number) >= n_trials:
            trial.set_user_attr("reason", f"not needed: other workers' trials already make up --n-trials {n_trials}")
            raise NotNeeded(trial.user_attrs["reason"])
        params = SPACES[settings.space].suggest(trial)
        config = replace(base, recipe=recipe_for(params, settings.epochs), out_dir=str(trial_dir(Path(base.out_dir), trial.number)))
        counter = EpochCounter()
        # The engine's divergence guard runs before the pruning callback, so a diverged loss never reaches the pruner
        # (which ranks NaN as a number, and waits for its first five trials anyway).
        callbacks = (counter, PyTorchLightningPruningCallback(trial, monitor="val_loss")) if prune else (counter,)
        try:
            recorder = engine.fit(config, network_for(settings.space, params), data, callbacks=callbacks, checkpoints=False)
        except engine.TrainingDiverged as error:  # no later epoch would rescue it: pruned at once, the study goes on
            trial.set_user_attr("reason", f"diverged: {error.loss_name} {error.value:.3g} after epoch {error.epoch}")
            raise optuna.TrialPruned(trial.user_attrs["reason"]) from None
        except optuna.TrialPruned:
            trial.set_user_attr("reason", f"pruned: validation loss after epoch {counter.epochs_run} worse than the median trial's")
            raise
        except OUT_OF_MEMORY as error:
            trial.set_user_attr("reason", f"out of memory: {first_line(error)}")
            release_memory()
            raise
        finally:
            trial.set_user_attr("epochs_run", counter.epochs_run)
        return recorder.history[-1]["val_loss"]

    return objective


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}" for name, value in params.items())


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None


def trial_line(trial: FrozenTrial, epochs: int, best: FrozenTrial | None) -> str:
    outcome = f"validation loss {trial.value:.4f}" if trial.state == TrialState.COMPLETE else trial.user_attrs.get("reason", "")
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    line = f"Trial {trial.number} {trial.state.name}: {outcome} ({trial.user_attrs.get('epochs_run', 0)}/{epochs} epochs, {seconds:.1f} s)"
    if trial.params:
        line += f"; {format_params(trial.params)}"
    return line + (f"; best so far: trial {best.number}, {best.value:.4f}" if best else "")


def run_trials(study: optuna.Study, objective: Callable[[Trial], float], n_trials: int, epochs: int, timeout: float | None) -> None:
    """Start trials, one at a time, while the study needs more and --timeout has not passed.

    Checking before each trial stops a worker that other workers' running trials already make up for;
    two workers that still start the last place at once are settled in the objective (``NotNeeded``).
    """
    deadline = time.monotonic() + (timeout if timeout is not None else math.inf)

    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        print(trial_line(trial, epochs, best_trial(study)), flush=True)

    while time.monotonic() < deadline:
        fail_abandoned_trials(study)
        if places_taken(study) >= n_trials:
            return
        study.optimize(objective, n_trials=1, catch=(NotNeeded, *OUT_OF_MEMORY), callbacks=[report], gc_after_trial=True)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
TRIAL_COLUMNS = ("number", "state", "value", "duration_s", "epochs_run", "reason")
FIGURES = {"optimization_history": 1, "param_importances": 2, "parallel_coordinate": 2, "slice": 2}  # name: complete trials it needs


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """One row per trial, one column per parameter any trial has."""
    trials = study.get_trials(deepcopy=False)
    param_names = list(dict.fromkeys(name for trial in trials for name in trial.params))
    rows = [{"number": t.number, "state": t.state.name, "value": t.value,
             "duration_s": round(t.duration.total_seconds(), 2) if t.duration else None,
             "epochs_run": t.user_attrs.get("epochs_run"), "reason": t.user_attrs.get("reason", ""), **t.params} for t in trials]
    engine.write_csv(path, rows, [*TRIAL_COLUMNS, *param_names])


def best_record(study: optuna.Study, settings: StudySettings, best: FrozenTrial, retrain_epochs: int) -> dict[str, Any]:
    network = SPACES[settings.space].network
    return {
        "study": study.study_name, "space": settings.space, "trial": best.number, "val_loss": best.value,
        "epochs": settings.epochs, "params": best.params, "model": network.__name__,
        "recipe": asdict(recipe_for(best.params, retrain_epochs)),
    }


def write_figures(study: optuna.Study, out_dir: Path) -> list[str]:
    """Optuna's matplotlib figures the study has enough complete trials for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as plots

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    written = []
    for name, needed in FIGURES.items():
        if complete < needed:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plots are "experimental", and an axis where all trials agree is "singular"
            axes = getattr(plots, f"plot_{name}")(study)
        figure = np.ravel(axes)[0].figure
        width, height = figure.get_size_inches()
        figure.set_size_inches(max(width, 1.3 * len(study.best_params) + 3), height)  # room for an axis per parameter
        # bbox "tight" widens the image to Optuna's long, rotated labels instead of cutting them off
        write_atomically(out_dir / f"{name}.png", lambda tmp: figure.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))
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
    print(f"Study {study.study_name!r}: {counts[TrialState.COMPLETE]} complete, {pruned} pruned, {counts[TrialState.FAIL]} failed trials; "
          f"pruning saved {saved} of {settings.epochs * (counts[TrialState.COMPLETE] + pruned)} epochs")
    write_trials_csv(study, out_dir / "trials.csv")
    written = ["trials.csv"]
    best = best_trial(study)
    if best is None:
        print("No trial has completed yet: no best_params.json and no figures")
    else:
        engine.write_json(out_dir / "best_params.json", best_record(study, settings, best, retrain_epochs))
        written += ["best_params.json", *write_figures(study, out_dir)]
        print(f"Best: trial {best.number}, validation loss {best.value:.4f}; {format_params(best.params)}")
    print(f"Written to {out_dir}: {', '.join(written)}")


# --------------------------------------------------------------------------------------------
# Retraining the best configuration with the full recipe
# --------------------------------------------------------------------------------------------
def retrain(study: optuna.Study, settings: StudySettings, base: engine.RunConfig, epochs: int, data: engine.SplitData | None,
            overwrite: bool = False) -> None:
    """Train the best trial's configuration like main.py does into <out-dir>/retrain; resumes an interrupted retraining of it."""
    best = best_trial(study)
    if best is None:
        raise UserError(f"study {study.study_name!r} has no complete trial to retrain; run some trials first (--n-trials)")
    run_dir = Path(base.out_dir) / "retrain"
    record = json.loads(json.dumps({"study": study.study_name, "trial": best.number, "params": best.params}))
    same_trial = (run_dir / "trial.json").is_file() and engine.read_json(run_dir / "trial.json") == record
    config = replace(base, recipe=recipe_for(best.params, epochs), out_dir=str(run_dir), progress=True,
                     resume="last" if same_trial and (run_dir / "last.ckpt").is_file() else None,
                     overwrite=overwrite and not same_trial)
    engine.claim_run_folder(config)  # an earlier retraining of another trial stays unless --overwrite; then it is this trial's
    engine.write_json(run_dir / "trial.json", record)
    print(f"== Retraining trial {best.number} ({config.model}; {format_params(best.params)}) for {epochs} epochs in {run_dir}"
          + (": resuming" if config.resume else ""))
    engine.train(config, network_for(settings.space, best.params), data=data)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("study")
    group.add_argument("--n-trials", type=engine.non_negative_int, default=DEFAULT_TRIALS, metavar="N",
                       help=f"finished (complete or pruned) trials the study should hold in all, counting earlier runs and "
                            f"other workers; 0 runs none, e.g. to rewrite the outputs or --retrain (default {DEFAULT_TRIALS})")
    group.add_argument("--epochs", type=engine.positive_int, metavar="N",
                       help=f"epochs per trial; the objective is the validation loss after the last (default {DEFAULT_EPOCHS}, "
                            "or the existing study's)")
    group.add_argument("--space", choices=tuple(SPACES), help=f"search space, see above (default {DEFAULT_SPACE}, or the existing study's)")
    group.add_argument("--timeout", type=engine.positive_float, metavar="SECONDS",
                       help="start no new trial after this many seconds (the running one finishes) (default: no limit)")
    group.add_argument("--no-prune", dest="prune", action="store_false",
                       help="train every trial for all its epochs instead of stopping the unpromising ones (median rule)")
    group.add_argument("--storage", metavar="URL",
                       help="where the study lives: a journal file (PATH.log or journal:PATH), sqlite:///PATH.db, or a "
                            "postgresql:// or mysql:// URL shared by workers on several machines (default sqlite:///<out-dir>/study.db)")
    group.add_argument("--study-name", default="CIFAR10Net_7", metavar="NAME",
                       help="the study's name in the storage (default CIFAR10Net_7)")
    group.add_argument("--seed", type=engine.non_negative_int, default=0, metavar="N",
                       help="seeds the TPE sampler (in a resumed study, with the number of trials so far) and each trial's "
                            "training; give parallel workers different seeds (default 0)")

    group = parser.add_argument_group("retraining")
    group.add_argument("--retrain", action="store_true",
                       help="after the trials, train the best configuration with the full recipe into <out-dir>/retrain, as main.py does")
    group.add_argument("--retrain-epochs", type=engine.positive_int, default=README_RECIPE.epochs, metavar="N",
                       help=f"epochs of the retraining (default {README_RECIPE.epochs})")
    group.add_argument("--overwrite", action="store_true",
                       help="replace an earlier retraining of another trial in <out-dir>/retrain (without it, that is refused)")
    group.add_argument("--no-tsne", dest="tsne", action="store_false", help="skip the t-SNE plots at the end of the retraining")

    group = parser.add_argument_group("data and device")
    group.add_argument("--data-dir", default="./data", metavar="DIR",
                       help="folder with CIFAR-10, as for main.py: the official 'cifar-10-batches-py' folder or an image-folder "
                            "tree train/<class>/..., test/<class>/...; downloaded if neither (default ./data)")
    group.add_argument("--limit-train", type=engine.positive_int, metavar="N",
                       help="train on only the first N images of the 45,000-image training split, for a quick look")
    group.add_argument("--num-workers", type=engine.positive_int, default=2, metavar="N",
                       help="threads that decode an image-folder tree the first time (later runs read the cache) (default 2)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "gpu", "mps"),
                       help="where to train, one device per worker (default auto: cuda, else mps, else cpu)")
    group.add_argument("--out-dir", default="runs/tune", metavar="DIR",
                       help="folder for the study file and every output (default runs/tune)")
    return parser


def base_config(args: argparse.Namespace, settings: StudySettings) -> engine.RunConfig:
    """Every trial's run settings; the trial fills in its recipe and run folder. One device: no data-parallel trials."""
    return engine.RunConfig(model=SPACES[settings.space].network.__name__, recipe=recipe_for({}, settings.epochs),
                            data_dir=args.data_dir, out_dir=args.out_dir, seed=args.seed, limit_train=args.limit_train,
                            num_workers=args.num_workers, device=args.device, devices="1", progress=False, tsne=args.tsne)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    engine.resolve_accelerator(args.device)  # a missing GPU fails before the study and the data
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets our one line instead
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no per-trial "GPU available" lines
    out_dir = Path(args.out_dir)
    if args.storage is not None and not args.storage.strip():
        raise UserError("--storage is empty; give a journal file (PATH.log), sqlite:///PATH.db or a database URL, "
                        "or leave --storage out for <out-dir>/study.db")
    if args.storage is None:
        out_dir.mkdir(parents=True, exist_ok=True)  # for the default SQLite file
    storage_url = args.storage or f"sqlite:///{out_dir / 'study.db'}"
    study = open_study(storage_url, args.study_name, args.seed, args.prune)
    settings = study_settings(study, args.space, args.epochs)
    fail_abandoned_trials(study)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    print(f"Study {study.study_name!r} in {hide_password(storage_url)}: {finished} of {args.n_trials} trials finished; "
          f"space {settings.space}, epochs per trial {settings.epochs}, pruning {'on' if args.prune else 'off'}")
    base = base_config(args, settings)
    data = None
    if places_taken(study) < args.n_trials:
        data = engine.load_split(base)
        print(f"Data: {data.source}; {len(data.train_images)} train / {len(data.val_images)} validation images")
        try:
            run_trials(study, make_objective(settings, base, data, args.n_trials, args.prune), args.n_trials, settings.epochs, args.timeout)
        except engine.RunInterrupted as interrupt:  # a signal passes Optuna by, leaving the trial RUNNING: it fails here, with the reason
            fail_running_trials(study, lambda worker: f"interrupted by {interrupt}" if worker == this_worker() else None)
            write_outputs(study, settings, out_dir, args.retrain_epochs)
            interrupt.saved = f"the finished trials are kept in {hide_password(storage_url)}"
            interrupt.continue_command = shlex.join(["python", *sys.argv])
            raise
    write_outputs(study, settings, out_dir, args.retrain_epochs)
    if args.retrain:
        retrain(study, settings, base, args.retrain_epochs, data, args.overwrite)


if __name__ == "__main__":
    engine.run_cli(main)
