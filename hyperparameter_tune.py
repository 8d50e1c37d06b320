"""Tune CIFAR10Net_7's hyperparameters with Optuna, as the original study's study did, then retrain the winner.

    python hyperparameter_tune.py --data-dir ./data                          # 30 trials of 5 epochs in runs/tune
    python hyperparameter_tune.py --data-dir ./data --n-trials 50            # the same study, up to 50 trials
    python hyperparameter_tune.py --data-dir ./data --n-trials 0 --retrain   # train the best so far for 100 epochs

Each trial samples a configuration, trains CIFAR10Net_7 (CIFAR10Net with dropout) through the same
engine as main.py for --epochs epochs on the 45,000-image training split, and scores it by the
validation loss after its last epoch; lowest wins. A seeded TPE sampler proposes each next
configuration from the trials so far (the first 10 at random), and a median pruner stops a trial
whose validation loss after some epoch is worse than the median of earlier trials at that epoch.
A trial whose validation loss becomes NaN, infinite or above 10,000 (diverged) is pruned at once;
one that runs out of memory fails; either way the study goes on. The original study's study (30 trials of
5 epochs) found CIFAR10Net_optim.

Search spaces (--space):
  readme    fc1_size, fc2_size in {32, 64, 128, 256, 512}; dropout uniform in [0.1, 0.9];
            lr log-uniform in [1e-4, 1e-1]; weight_decay log-uniform in [5e-4, 1e-1];
            batch_size in {32, 64, 128, 256, 512}; everything else is the original study's recipe
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
    python hyperparameter_tune.py --data-dir ./data --seed 1 --storage
    postgresql+psycopg2://tuner:secret@dbhost:5432/optuna
    python hyperparameter_tune.py --data-dir ./data --seed 2 --storage
    postgresql+psycopg2://tuner:secret@dbhost:5432/optuna
(+psycopg2 picks the driver that requirements.txt installs, psycopg2-binary; to SQLAlchemy 2.1 a bare
postgresql:// means psycopg 3. MySQL works the same: mysql+pymysql://... after pip install pymysql.)

A killed worker leaves its trial RUNNING in the storage. Such a trial is marked FAIL, with the reason,
and does not count: at once when its worker ran on this machine (its process is gone), and, with a
database storage (SQLite, PostgreSQL, MySQL), once its worker's heartbeat (recorded every --heartbeat
seconds, default 60) has been silent for --heartbeat-grace seconds (default 180), wherever it ran. A
worker whose remaining places are all held by other workers' running trials waits (and says so in one
line): each of them finishes, or goes silent, is failed and is replaced by a trial of the waiting
worker, so the study always ends with exactly --n-trials finished trials. A journal file has no
heartbeat: a trial of a worker killed on another machine stays RUNNING and holds its place; raise
--n-trials by one to make up for it.

A worker rides out its database server's restart, a failover or a dropped connection: every call to
the database is retried with backoff (1, 2, 4, ... up to 30 s; one line on stderr per retry) for at
most --db-patience seconds (default 600), while the running trial goes on; its result is stored once
the server is back. Past that the worker stops with one line and exit status 1; its unfinished trial
is failed when the command is run again.

Outputs in --out-dir (default runs/tune): best_params.json (the best trial, its network and its
full recipe), trials.csv (every trial: state, value, duration, epochs run, reason, parameters),
optimization_history.png, param_importances.png (from 2 complete trials on), parallel_coordinate.png,
slice.png, trials/<number>/ (each trial's network as a run folder: config.json, model.json,
metrics.csv, curves, model.pth; python predict.py --run, evaluate.py --run and tsne.py --run take it,
and python modified_models.py --config trials/<number>/config.json trains it again to the same numbers),
and with --retrain the run folder retrain/ (as main.py's: metrics, curves, model.pth, test accuracy, t-SNE). Trials and
the retraining run on one device each (Optuna's pruning callback does not support data-parallel training).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import optuna

import engine
import tsne
from engine import UserError
from models.study import README_RECIPE
from study_storage import DatabaseUnavailable, StorageSettings, hide_password, is_journal
from tuning import (
    DEFAULT_EPOCHS,
    DEFAULT_SPACE,
    DEFAULT_TRIALS,
    FINISHED,
    SPACES,
    TUNED_MODEL,
    StudySettings,
    best_trial,
    fail_abandoned_trials,
    fail_running_trials,
    format_params,
    make_objective,
    open_study,
    recipe_for,
    run_trials,
    study_settings,
    this_worker,
    trial_config,
    write_outputs,
)


# --------------------------------------------------------------------------------------------
# Retraining the best configuration with the full recipe
# --------------------------------------------------------------------------------------------
def retrain(
    study: optuna.Study,
    settings: StudySettings,
    base: engine.RunConfig,
    epochs: int,
    data: engine.SplitData | None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> None:
    """Train the best trial's configuration like main.py does into <out-dir>/retrain; resumes an interrupted retraining
    of it.
    """
    best = best_trial(study)
    if best is None:
        raise UserError(
            f"study {study.study_name!r} has no complete trial to retrain; run some trials first (--n-trials)"
        )
    run_dir = Path(base.out_dir) / "retrain"
    record = json.loads(json.dumps({"study": study.study_name, "trial": best.number, "params": best.params}))
    same_trial = (run_dir / "trial.json").is_file() and engine.read_json(run_dir / "trial.json") == record
    config = replace(
        trial_config(base, best.params, epochs, run_dir),
        progress=progress,
        resume="last" if same_trial and (run_dir / "last.ckpt").is_file() else None,
        overwrite=overwrite and not same_trial,
    )
    # an earlier retraining of another trial stays unless --overwrite; then it is this trial's
    engine.claim_run_folder(config)
    engine.write_json(run_dir / "trial.json", record)
    print(
        f"== Retraining trial {best.number} ({config.model}; {format_params(best.params)}) for {epochs} epochs "
        f"in {run_dir}" + (": resuming" if config.resume else "")
    )
    engine.train(
        config, engine.model_spec(config.model), data=data or engine.load_split(config), analyses=tsne.analyses(config)
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("study")
    group.add_argument(
        "--n-trials",
        type=engine.non_negative_int,
        default=DEFAULT_TRIALS,
        metavar="N",
        help=f"finished (complete or pruned) trials the study should hold in all, counting earlier runs and "
        f"other workers; 0 runs none, e.g. to rewrite the outputs or --retrain (default {DEFAULT_TRIALS})",
    )
    group.add_argument(
        "--epochs",
        type=engine.positive_int,
        metavar="N",
        help=f"epochs per trial; the objective is the validation loss after the last (default {DEFAULT_EPOCHS}, "
        "or the existing study's)",
    )
    group.add_argument(
        "--space",
        choices=tuple(SPACES),
        help=f"search space, see above (default {DEFAULT_SPACE}, or the existing study's)",
    )
    group.add_argument(
        "--timeout",
        type=engine.positive_float,
        metavar="SECONDS",
        help="start no new trial after this many seconds (the running one finishes) (default: no limit)",
    )
    group.add_argument(
        "--no-prune",
        dest="prune",
        action="store_false",
        help="train every trial for all its epochs instead of stopping the unpromising ones (median rule)",
    )
    group.add_argument(
        "--storage",
        metavar="URL",
        help="where the study lives: a journal file (PATH.log or journal:PATH), sqlite:///PATH.db, or a "
        "postgresql:// or mysql:// URL shared by workers on several machines (default sqlite:///<out-dir>/study.db)",
    )
    group.add_argument(
        "--study-name",
        default="CIFAR10Net_7",
        metavar="NAME",
        help="the study's name in the storage (default CIFAR10Net_7)",
    )
    group.add_argument(
        "--heartbeat",
        type=engine.positive_float,
        default=StorageSettings.heartbeat,
        metavar="SECONDS",
        help="with a database storage, how often a worker records that its trial still runs (default "
        f"{StorageSettings.heartbeat:g}); give every worker of a study the same",
    )
    group.add_argument(
        "--heartbeat-grace",
        type=engine.positive_float,
        default=StorageSettings.grace,
        metavar="SECONDS",
        help="a running trial whose heartbeat has been silent this long is failed (its worker died, on any machine) "
        f"and another worker runs one in its place; more than --heartbeat (default {StorageSettings.grace:g})",
    )
    group.add_argument(
        "--db-patience",
        type=engine.positive_float,
        default=StorageSettings.patience,
        metavar="SECONDS",
        help="how long a worker retries, with backoff, while the study's database server cannot be reached (a "
        "restart, a failover, a dropped connection); the running trial goes on and reports when it is back. "
        f"Past it the worker stops with exit status 1 (default {StorageSettings.patience:g})",
    )
    group.add_argument(
        "--seed",
        type=engine.non_negative_int,
        default=0,
        metavar="N",
        help="seeds the TPE sampler (in a resumed study, with the number of trials so far) and each trial's "
        "training; give parallel workers different seeds (default 0)",
    )

    group = parser.add_argument_group("retraining")
    group.add_argument(
        "--retrain",
        action="store_true",
        help="after the trials, train the best configuration with the full recipe into <out-dir>/retrain, as main.py "
        "does",
    )
    group.add_argument(
        "--retrain-epochs",
        type=engine.positive_int,
        default=README_RECIPE.epochs,
        metavar="N",
        help=f"epochs of the retraining (default {README_RECIPE.epochs})",
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the retraining's progress bars, or not (default: only when the output is a terminal, so a log file gets "
        "clean lines; the trials print one line each)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier retraining of another trial in <out-dir>/retrain (without it, that is refused)",
    )
    tsne.add_arguments(parser)
    engine.add_data_arguments(parser, optional_validation=False)
    engine.add_device_arguments(parser, distributed=False)  # one device per worker: no data-parallel trials
    parser.add_argument_group("output").add_argument(
        "--out-dir",
        default="runs/tune",
        metavar="DIR",
        help="folder for the study file and every output (default runs/tune)",
    )
    return parser


def base_config(args: argparse.Namespace, settings: StudySettings) -> engine.RunConfig:
    """Every trial's run settings; the trial fills in its recipe and run folder. One device: no data-parallel trials."""
    return engine.RunConfig(
        model=TUNED_MODEL,
        recipe=recipe_for({}, settings.epochs),
        data_dir=args.data_dir,
        dataset=args.dataset,
        val_fraction=args.val_fraction,
        out_dir=args.out_dir,
        seed=args.seed,
        limit_train=args.limit_train,
        num_workers=args.num_workers,
        device=args.device,
        devices="1",
        precision=args.precision,
        compile=args.compile,
        progress=False,
        analyses=engine.analysis_settings(args),
    )


def main(argv: list[str] | None = None) -> None:
    try:
        tune(argv)
    except DatabaseUnavailable as error:
        # the worker's trial stays RUNNING: the next start fails it (fail_abandoned_trials)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def tune(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.heartbeat_grace <= args.heartbeat:
        raise UserError(
            f"--heartbeat-grace {args.heartbeat_grace:g} must be longer than --heartbeat {args.heartbeat:g}: a live "
            "worker's trial would be failed between two heartbeats"
        )
    engine.resolve_accelerator(args.device)  # a missing GPU fails before the study and the data
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets our one line instead
    # no per-trial "GPU available" lines
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    out_dir = Path(args.out_dir)
    # before the study's folder is made; each trial's folder lies in it
    engine.check_outside_data_tree(out_dir, args.data_dir)
    if args.storage is not None and not args.storage.strip():
        raise UserError(
            "--storage is empty; give a journal file (PATH.log), sqlite:///PATH.db or a database URL, "
            "or leave --storage out for <out-dir>/study.db"
        )
    if args.storage is None:
        out_dir.mkdir(parents=True, exist_ok=True)  # for the default SQLite file
    storage_url = args.storage or f"sqlite:///{out_dir / 'study.db'}"
    storage_settings = StorageSettings(heartbeat=args.heartbeat, grace=args.heartbeat_grace, patience=args.db_patience)
    study = open_study(storage_url, args.study_name, args.seed, args.prune, storage_settings)
    settings = study_settings(study, args.space, args.epochs)
    fail_abandoned_trials(study)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    # --n-trials 0 runs none: "2 of 0 finished" would say nothing
    asked = f"of {args.n_trials} " if args.n_trials else ""
    print(
        f"Study {study.study_name!r} in {hide_password(storage_url)}: {finished} {asked}trials finished; "
        f"space {settings.space}, epochs per trial {settings.epochs}, pruning {'on' if args.prune else 'off'}"
    )
    base = base_config(args, settings)
    data = None
    if finished < args.n_trials:
        data = engine.load_split(base)
        print(f"Data: {data.source}; {len(data.train_images)} train / {len(data.val_images)} validation images")
        try:
            run_trials(
                study,
                make_objective(settings, base, data, args.n_trials, args.prune),
                args.n_trials,
                settings.epochs,
                args.timeout,
                grace=None if is_journal(storage_url) else args.heartbeat_grace,
            )
        except engine.RunInterrupted as interrupt:
            # a signal passes Optuna by, leaving the trial RUNNING: it fails here, with the reason
            reason = f"interrupted by {interrupt}"
            fail_running_trials(study, lambda trial, worker, silent: reason if worker == this_worker() else None)
            write_outputs(study, settings, out_dir, args.retrain_epochs)
            interrupt.saved = f"the finished trials are kept in {hide_password(storage_url)}"
            interrupt.continue_command = shlex.join(["python", *sys.argv])
            raise
    write_outputs(study, settings, out_dir, args.retrain_epochs)
    if args.retrain:
        retrain(study, settings, base, args.retrain_epochs, data, args.overwrite, args.progress)


if __name__ == "__main__":
    engine.run_cli(main)
