"""Tune a model's hyperparameters with Optuna (CIFAR10Net_7 over the original study's space by default), then retrain
the winner.

    python hyperparameter_tune.py --data-dir ./data                          # the study: 30 trials of 5 epochs
    python hyperparameter_tune.py --data-dir ./data --n-trials 50            # the same study, up to 50 trials
    python hyperparameter_tune.py --data-dir ./data --n-trials 0 --retrain   # the best so far, with the full recipe
    python hyperparameter_tune.py --data-dir ./data --model FastVGG_narrow --space my-space.json --sampler random

Each trial trains the model through the same engine as main.py for --epochs epochs and scores it by its validation loss
after the last; lowest wins. A seeded sampler (TPE by default) proposes each next configuration, a pruner (the median
rule by default) stops the unpromising trials, and a diverged or out-of-memory trial fails without stopping the study.
The search space: the model's own (--space model: its options and the recipe fields that matter for it, as its
registry entry declares them; CIFAR10Net_7's is the original study's), study, extended (the study's, the convolutions'
shapes and the optimiser), or a JSON or YAML file of your own. The study lives in a storage (default
<out-dir>/study.db): the same command continues it, and several workers, on one machine or many (--storage), share it.
Spaces, outputs, workers, PostgreSQL and what happens when one dies: docs/tuning.md.
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
from study_storage import DatabaseFault, StorageSettings, hide_password, is_journal
from tuning import (
    DEFAULT_EPOCHS,
    DEFAULT_MODEL,
    DEFAULT_PRUNER,
    DEFAULT_SAMPLER,
    DEFAULT_TRIALS,
    FINISHED,
    PRUNERS,
    SAMPLERS,
    StudySettings,
    best_trial,
    check_study_folder,
    configure,
    fail_running_trials,
    format_params,
    make_objective,
    mark_study_folder,
    open_study,
    run_trials,
    settle_abandoned_trials,
    space_argument,
    study_settings,
    this_worker,
    trial_config,
    tunable_model,
    write_outputs,
    write_space,
)


# --------------------------------------------------------------------------------------------
# Retraining the best configuration with the full recipe
# --------------------------------------------------------------------------------------------
def retrain(
    study: optuna.Study,
    settings: StudySettings,
    base: engine.RunConfig,
    epochs: int | None,
    data: engine.SplitData | None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> None:
    """Train the best trial's configuration like main.py does into <out-dir>/retrain for ``epochs`` (None: the model's
    own recipe's, or an interrupted retraining's own); the same command continues an interrupted retraining of it, and
    --overwrite starts it again.
    """
    best = best_trial(study)
    if best is None:
        raise UserError(
            f"study {study.study_name!r} has no complete trial to retrain; run some trials first (--n-trials)"
        )
    run_dir = Path(base.out_dir) / "retrain"
    record = json.loads(json.dumps({"study": study.study_name, "trial": best.number, "params": best.params}))
    earlier = engine.read_json(run_dir / "trial.json") if (run_dir / "trial.json").is_file() else None
    if earlier not in (None, record) and (run_dir / "last.ckpt").is_file() and not overwrite:
        raise UserError(
            f"{run_dir} holds the retraining of trial {earlier.get('trial')}, and the best trial is now {best.number}; "
            f"retrain trial {best.number} in its place with --overwrite, or move {run_dir} away first to keep it"
        )
    resume = earlier == record and (run_dir / "last.ckpt").is_file() and not overwrite
    planned, done = checkpoint_epochs(run_dir / "last.ckpt") if resume else (None, 0)
    if planned is not None and epochs is not None and epochs < planned:
        raise UserError(fewer_epochs_than_planned(run_dir, best.number, epochs, planned, done))
    config = replace(
        trial_config(base, best.params, epochs or planned or engine.model_spec(settings.model).recipe.epochs, run_dir),
        progress=progress,
        resume="last" if resume else None,
        overwrite=overwrite,
    )
    engine.claim_run_folder(config)  # with --overwrite, it removes the earlier retraining's files
    engine.write_json(run_dir / "trial.json", record)
    # by default the model's own recipe's epochs (the study's 100), whatever the trials ran: said where it starts
    default = f" (the default of --retrain-epochs, {settings.model}'s recipe's; the trials ran {settings.epochs})"
    print(
        f"== Retraining trial {best.number} ({config.model}; {format_params(best.params)}) for "
        f"{config.recipe.epochs} epochs{default if epochs is None and planned is None else ''} in {run_dir}"
        + (f": resuming after epoch {done}" if resume else "")
    )
    try:
        engine.train(
            config,
            engine.model_spec(config.model),
            data=data or engine.load_split(config),
            analyses=tsne.analyses(config),
        )
    except engine.RunInterrupted as interrupt:
        # this script has no --resume: its own command continues the retraining, without --overwrite (which restarts it)
        interrupt.continue_command = shlex.join(["python", *(arg for arg in sys.argv if arg != "--overwrite")])
        raise


def fewer_epochs_than_planned(run_dir: Path, trial: int, epochs: int, planned: int, done: int) -> str:
    """The retraining in ``run_dir`` cannot go on for fewer epochs than it planned (the engine never shortens a run's
    schedule): what it holds, and the ways on."""
    if done >= planned:
        return (
            f"{run_dir} holds trial {trial}'s retraining, finished after {done} epochs; train it further with "
            f"--retrain-epochs above {planned}, or retrain it from the start for {epochs} epochs with --overwrite"
        )
    return (
        f"{run_dir} holds trial {trial}'s retraining, stopped after {done} of its {planned} epochs; continue it with "
        f"--retrain-epochs {planned} or more (or without --retrain-epochs), or retrain it from the start for {epochs} "
        "epochs with --overwrite"
    )


def checkpoint_epochs(path: Path) -> tuple[int | None, int]:
    """The epochs a run planned and those it finished, from its last.ckpt."""
    checkpoint = engine.read_checkpoint(path)
    try:
        return checkpoint["run_config"]["recipe"]["epochs"], checkpoint["epoch"] + 1
    except (KeyError, TypeError):
        return None, 0  # a damaged checkpoint: resuming from it says what is wrong with it (engine.resume_checkpoint)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = engine.script_parser(__doc__)
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
        "--model",
        type=tunable_model,
        metavar="NAME",
        help=f"the model to tune: any that modified_models.py trains (modified_models.py --list shows them) (default "
        f"{DEFAULT_MODEL}, or the existing study's)",
    )
    group.add_argument(
        "--space",
        type=space_argument,
        metavar="NAME|FILE",
        help="search space: model (the model's own), study, extended, or a .json/.yaml file of your own "
        "(docs/tuning.md#your-own-space) (default model, or the existing study's)",
    )
    group.add_argument(
        "--sampler",
        choices=tuple(SAMPLERS),
        help=f"Optuna's sampler: tpe (Tree-structured Parzen Estimator), cmaes (CMA-ES), gp (Gaussian process); "
        f"seeded by --seed (default {DEFAULT_SAMPLER}, or the existing study's)",
    )
    group.add_argument(
        "--pruner",
        choices=PRUNERS,
        help="stops unpromising trials early: median (worse than the median trial at that epoch), hyperband, or "
        f"none (default {DEFAULT_PRUNER}, or the existing study's)",
    )
    engine.advanced(
        group.add_argument(
            "--no-prune", dest="pruner", action="store_const", const="none", help="the same as --pruner none"
        )
    )
    group.add_argument(
        "--timeout",
        type=engine.positive_float,
        metavar="SECONDS",
        help="start no new trial after this many seconds (the running one finishes) (default: no limit)",
    )
    group.add_argument(
        "--storage",
        metavar="URL",
        help="where the study lives: a journal file (PATH.log or journal:PATH), sqlite:///PATH.db, or a "
        "postgresql+psycopg2:// or mysql+pymysql:// URL shared by workers on several machines (default "
        "sqlite:///<out-dir>/study.db)",
    )
    # several workers and their database (docs/tuning.md): --help-all only
    for action in (
        group.add_argument(
            "--study-name", metavar="NAME", help="the study's name in the storage (default: the model's name)"
        ),
        group.add_argument(
            "--heartbeat",
            type=engine.positive_float,
            default=StorageSettings.heartbeat,
            metavar="SECONDS",
            help="with a database storage, how often a worker records that its trial still runs (default "
            f"{StorageSettings.heartbeat:g}); give every worker of a study the same",
        ),
        group.add_argument(
            "--heartbeat-grace",
            type=engine.positive_float,
            default=StorageSettings.grace,
            metavar="SECONDS",
            help="a running trial whose heartbeat has been silent this long is failed (its worker died, on any "
            "machine) and another worker runs one in its place; more than --heartbeat (default "
            f"{StorageSettings.grace:g})",
        ),
        group.add_argument(
            "--db-patience",
            type=engine.positive_float,
            default=StorageSettings.patience,
            metavar="SECONDS",
            help="how long a worker retries, with backoff, while the study's database server cannot be reached (a "
            "restart, a failover, a dropped connection, a server not up yet); the running trial goes on and reports "
            "when it is back. Past it, or at once on a full disk, the worker stops with exit status 1 (default "
            f"{StorageSettings.patience:g})",
        ),
    ):
        engine.advanced(action)
    group.add_argument(
        "--seed",
        type=engine.non_negative_int,
        default=0,
        metavar="N",
        help="seeds the sampler (in a resumed study, with the number of trials so far) and each trial's "
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
        metavar="N",
        help="epochs of the retraining (default: the model's own recipe's, CIFAR10Net_7's 100, whatever --epochs "
        "the trials ran; an interrupted retraining continues with its own)",
    )
    engine.advanced(
        group.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="the retraining's progress bars, or not (default: only when the output is a terminal, so a log file "
            "gets clean lines; the trials print one line each)",
        )
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="start the retraining in <out-dir>/retrain again, replacing an earlier one (of another trial: without "
        "it, that is refused; of this trial: without it, it is continued)",
    )
    tsne.add_arguments(parser)
    engine.add_data_arguments(parser, optional_validation=False)
    engine.add_device_arguments(parser, distributed=False)  # one device per worker: no data-parallel trials
    parser.add_argument_group("output").add_argument(
        "--out-dir",
        metavar="DIR",
        help=f"folder for the study file and every output, one study's (default runs/tune for {DEFAULT_MODEL}, "
        "runs/tune-<model> for another)",
    )
    return parser


def base_config(args: argparse.Namespace, settings: StudySettings, out_dir: Path) -> engine.RunConfig:
    """Every trial's run settings; the trial fills in its options, recipe and run folder. One device: no data-parallel
    trials."""
    return engine.RunConfig(
        model=settings.model,
        data_dir=args.data_dir,
        dataset=args.dataset,
        val_fraction=args.val_fraction,
        out_dir=str(out_dir),
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
    except DatabaseFault as fault:
        # a fault of the machine; the worker's trial stays RUNNING until the next start (settle_abandoned_trials)
        print(f"error: {fault.line(shlex.join(['python', *sys.argv]))}", file=sys.stderr)
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
    # one folder and study per model unless told otherwise: the study's own default keeps its runs/tune
    model = args.model or DEFAULT_MODEL
    out_dir = Path(args.out_dir or ("runs/tune" if model == DEFAULT_MODEL else f"runs/tune-{model}"))
    study_name = args.study_name or model
    # before the study's folder is made; each trial's folder lies in it
    engine.check_outside_data_tree(out_dir, args.data_dir)
    if args.storage is not None and not args.storage.strip():
        raise UserError(
            "--storage is empty; give a journal file (PATH.log), sqlite:///PATH.db or a database URL, "
            "or leave --storage out for <out-dir>/study.db"
        )
    storage_url = args.storage or f"sqlite:///{out_dir / 'study.db'}"
    check_study_folder(out_dir, study_name)  # makes it, for the default SQLite file too
    storage_settings = StorageSettings(heartbeat=args.heartbeat, grace=args.heartbeat_grace, patience=args.db_patience)
    study = open_study(storage_url, study_name, storage_settings)
    settings = study_settings(study, args.model, args.space, args.epochs, args.sampler, args.pruner)
    mark_study_folder(out_dir, study_name, hide_password(storage_url))  # once the command is not refused
    configure(study, settings, args.seed)
    write_space(settings, out_dir)
    settle_abandoned_trials(study)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    # --n-trials 0 runs none: "2 of 0 finished" would say nothing
    asked = f"of {args.n_trials} " if args.n_trials else ""
    print(
        f"Study {study.study_name!r} in {hide_password(storage_url)}: {finished} {asked}trials finished; "
        f"{settings.model} over space {settings.space} ({len(settings.search_space)} parameters), epochs per trial "
        f"{settings.epochs}, sampler {settings.sampler}, pruner {settings.pruner}"
    )
    base = base_config(args, settings, out_dir)
    retrain_epochs = args.retrain_epochs or engine.model_spec(settings.model).recipe.epochs
    data = None
    if finished < args.n_trials:
        data = engine.load_split(base)
        print(f"Data: {data.source}; {len(data.train_images)} train / {len(data.val_images)} validation images")
        try:
            run_trials(
                study,
                make_objective(settings, base, data, args.n_trials, settings.pruner != "none"),
                args.n_trials,
                settings.epochs,
                args.timeout,
                grace=None if is_journal(storage_url) else args.heartbeat_grace,
                out_dir=out_dir,
            )
        except engine.RunInterrupted as interrupt:
            # a signal passes Optuna by, leaving the trial RUNNING: it fails here, with the reason
            reason = f"interrupted by {interrupt}"
            fail_running_trials(study, lambda trial, worker, silent: reason if worker == this_worker() else None)
            write_outputs(study, settings, out_dir, retrain_epochs)
            interrupt.saved = f"the finished trials are kept in {hide_password(storage_url)}"
            interrupt.continue_command = shlex.join(["python", *sys.argv])
            raise
    write_outputs(study, settings, out_dir, retrain_epochs)
    if args.retrain:
        retrain(study, settings, base, args.retrain_epochs, data, args.overwrite, args.progress)


if __name__ == "__main__":
    engine.run_cli(main)
