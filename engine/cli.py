"""The command line every script shares: flag types, the argument groups, the config a run's flags make, exit statuses.

A flag means the same thing and takes the same choices in every script and benchmark, because each declares it
through the groups here. ``run_cli`` turns how a run ended into one line on stderr and an exit status.
"""

from __future__ import annotations

import argparse
import errno
import math
import shlex
import signal
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from engine.config import LOGGERS, OPTIMIZERS, PRECISIONS, SCHEDULERS, TTA_MODES, WEIGHT_AVERAGES, Recipe, RunConfig
from engine.data import DATASETS, VAL_FRACTION
from engine.devices import is_main_process
from engine.errors import DiskFull, RunInterrupted, TrainingDiverged
from engine.checkpoints import read_checkpoint, resume_path
from engine.registry import ModelSpec, model_spec, option_table
from engine.settings import (
    MODEL_OPTION,
    NOT_COMPARED,
    RECIPE_FLAGS,
    RESUME_MAY_CHANGE,
    Settings,
    changed_settings,
    describe_change,
    flattened,
    given_flags,
    normalised,
    read_config,
    run_settings,
)
from functions import AUGMENTATIONS, UserError

DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")


# --------------------------------------------------------------------------------------------
# Flag types: a bad value is argparse's one line and exit status 2
# --------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def beta(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def open_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {text}")
    return value


def on_off(value: bool) -> str:
    return "on" if value else "off"


def choices_help(table: dict[str, Any], describe: Callable[[Any], str] = str) -> str:
    """ "name: description; ..." for a --help text (where argparse reads % as a format: "23%" is written "23%%")."""
    return "; ".join(f"{name}: {describe(value)}" for name, value in table.items()).replace("%", "%%")


# --------------------------------------------------------------------------------------------
# Argument groups
# --------------------------------------------------------------------------------------------
def add_recipe_arguments(parser: argparse.ArgumentParser, recipe: Recipe) -> None:
    """The recipe's flags; each defaults to ``recipe``'s value (shown in --help), so a model's own recipe stays its
    default.
    """
    r = recipe
    group = parser.add_argument_group(
        "recipe (defaults: this model's own recipe; CIFAR10Net's is the original study's)"
    )
    group.add_argument("--epochs", type=positive_int, help=f"passes over the training split (default {r.epochs})")
    group.add_argument("--batch-size", type=positive_int, help=f"images per optimisation step (default {r.batch_size})")
    group.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="adam, adamw, sgd with Nesterov momentum, or muon: Muon for the "
        f"convolution filters (see --muon-lr) and Nesterov SGD for the rest (default {r.optimizer})",
    )
    group.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {r.lr:g})")
    group.add_argument(
        "--betas",
        type=beta,
        nargs=2,
        metavar=("BETA1", "BETA2"),
        help=f"Adam's betas (default {r.betas[0]} {r.betas[1]})",
    )
    group.add_argument("--momentum", type=beta, help=f"SGD's Nesterov momentum (default {r.momentum})")
    group.add_argument("--weight-decay", type=non_negative_float, help=f"L2 penalty (default {r.weight_decay:g})")
    group.add_argument(
        "--label-smoothing", type=beta, help=f"cross-entropy label smoothing (default {r.label_smoothing})"
    )
    group.add_argument(
        "--scheduler",
        choices=tuple(SCHEDULERS),
        help=f"learning-rate schedule: {choices_help(SCHEDULERS)} (default {r.scheduler})",
    )
    group.add_argument(
        "--warmup-epochs",
        type=non_negative_float,
        help=f"epochs of linear warm-up for cosine/onecycle (default {r.warmup_epochs})",
    )
    group.add_argument(
        "--augment",
        choices=tuple(AUGMENTATIONS),
        help="training augmentation, done in batches on the device: "
        + choices_help(AUGMENTATIONS, lambda augmentation: augmentation.description)
        + f" (default {r.augment})",
    )
    group.add_argument(
        "--tta",
        choices=tuple(TTA_MODES),
        help=f"test-time augmentation, the class scores of each test image from: "
        f"{choices_help(TTA_MODES)} (default {r.tta})",
    )

    group = parser.add_argument_group("recipe: airbench's pieces (docs/RESULTS.md measures each)")
    group.add_argument(
        "--decoupled",
        action=argparse.BooleanOptionalAction,
        help="sum the loss over the batch and read --weight-decay as the decay per 1,024 examples whatever the lr: "
        "airbench's form, where lr and weight decay keep their meaning at any batch size (default "
        f"{on_off(r.decoupled)})",
    )
    group.add_argument(
        "--muon-lr",
        type=positive_float,
        help=f"with --optimizer muon, the lr of the convolution filters (default {r.muon_lr:g})",
    )
    group.add_argument(
        "--muon-momentum",
        type=beta,
        help=f"with --optimizer muon, the filters' Nesterov momentum (default {r.muon_momentum})",
    )
    group.add_argument(
        "--muon-renorm-every",
        type=positive_int,
        metavar="N",
        help="with --optimizer muon, rescale each filter to norm sqrt(its output channels) before every N-th step: "
        f"airbench's 1, hiverge's 8 (default {r.muon_renorm_every})",
    )
    group.add_argument(
        "--muon-weight-decay",
        type=non_negative_float,
        help="with --optimizer muon, the filters' weight decay, read as "
        "--weight-decay is (with --decoupled, per 1,024 examples); it matters only between renormalisations, "
        f"so with --muon-renorm-every above 1 (default {r.muon_weight_decay:g})",
    )
    group.add_argument(
        "--muon-batched",
        action=argparse.BooleanOptionalAction,
        help="with --optimizer muon, orthogonalise the filters of "
        "one shape together, in one stacked call: the same arithmetic in fewer, larger products, which pays where "
        f"launching work costs (a GPU) (default {on_off(r.muon_batched)})",
    )
    group.add_argument(
        "--weight-average",
        choices=tuple(WEIGHT_AVERAGES),
        help=f"{choices_help(WEIGHT_AVERAGES)} (default {r.weight_average})",
    )


def add_model_arguments(parser: argparse.ArgumentParser, specs: dict[str, ModelSpec]) -> None:
    """A flag for each option of the models in ``specs`` (the models this script trains), defaulting to each model's
    own.

    A flag whose option the chosen model does not have is refused when the run is configured (``config_from_args``)."""
    table = option_table(specs)
    if not table:
        return
    group = parser.add_argument_group("model options (what the network is; recorded in config.json and the model card)")
    for name, (option, defaults) in table.items():
        if len(specs) == 1 or len(set(map(repr, defaults.values()))) == 1 and len(defaults) == len(specs):
            default = f"default {next(iter(defaults.values()))}"
        else:
            default = "models and defaults: " + ", ".join(f"{model} {value}" for model, value in defaults.items())
        kwargs: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction} if option.kind is bool else {"type": option.parse}
        )
        if option.kind is not bool and option.kind is not str:
            kwargs["metavar"] = "N"
        if option.choices is not None:
            kwargs["choices"] = option.choices
        group.add_argument(
            option.flag,
            dest=MODEL_OPTION + name,
            **kwargs,
            help=f"{option.help}; {option.allowed()} ({default})".replace("%", "%%"),
        )


def model_options_given(args: argparse.Namespace) -> dict[str, Any]:
    """The model options given as flags (or by --config): the flags' values that are not None."""
    return {
        name.removeprefix(MODEL_OPTION): value
        for name, value in vars(args).items()
        if name.startswith(MODEL_OPTION) and value is not None
    }


def add_data_arguments(parser: argparse.ArgumentParser, limit_train: bool = True) -> None:
    """--data-dir and --num-workers everywhere; --limit-train and --no-validation where the training split is free to
    choose.
    """
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-dir",
        default="./data",
        help="folder with the data: CIFAR-10's official 'cifar-10-batches-py' folder (or CIFAR-100's "
        "'cifar-100-python'), or an image-folder tree train/<class>/*.png|jpg and test/<class>/... of any classes (2 "
        "or more) and image size (the folder itself or one sub-folder); if none is there, torchvision downloads the "
        "official archive of --dataset into it (default ./data)",
    )
    group.add_argument(
        "--dataset", default="auto", choices=tuple(DATASETS), help=f"{choices_help(DATASETS)} (default auto)"
    )
    if limit_train:
        group.add_argument(
            "--limit-train",
            type=positive_int,
            metavar="N",
            help="train on only the first N images of the 45,000-image training split, for a quick look",
        )
        group.add_argument(
            "--no-validation",
            dest="validation",
            action="store_false",
            help="train on all 50,000 training images, "
            "with no validation split (a final run: no validation loss, no best.ckpt; the test set as always)",
        )
        group.add_argument(
            "--val-fraction",
            type=open_fraction,
            default=VAL_FRACTION,
            metavar="F",
            help=f"the fraction of the training images that validates, drawn with the study's seeded split "
            f"(default {VAL_FRACTION:g}: CIFAR-10's 45,000 / 5,000, the study's images exactly)",
        )
    group.add_argument(
        "--num-workers",
        type=positive_int,
        default=2,
        help="threads that decode an image-folder tree the first time (later runs read the cache) (default 2)",
    )


def add_device_arguments(parser: argparse.ArgumentParser, training: bool = True, distributed: bool = True) -> None:
    """--device everywhere; with ``training``, --precision and --compile; with ``distributed`` too, --devices and
    --strategy.
    """
    group = parser.add_argument_group("device")
    group.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="where to compute: auto (cuda, else mps, else cpu), cpu, cuda (or gpu), mps (default auto)",
    )
    if not training:
        return
    if distributed:
        group.add_argument(
            "--devices",
            default="auto",
            help="how many devices, or which, passed to Lightning (e.g. 4, or 0,1) (default auto)",
        )
        group.add_argument(
            "--strategy",
            default="auto",
            help="Lightning's distribution strategy, e.g. ddp for data-parallel over several GPUs or nodes (default "
            "auto)",
        )
        group.add_argument(
            "--num-nodes",
            type=positive_int,
            default=1,
            metavar="N",
            help="machines that train this one model together, each with --devices devices (use --strategy ddp; start "
            "the command on every node, with torchrun or Slurm as this toolkit's README.md shows, the run folder on a "
            "filesystem all nodes share) (default 1)",
        )
    group.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        metavar="PRECISION",
        help="Lightning precision: "
        + ", ".join(PRECISIONS[1:])
        + " (default auto: bf16-mixed on a CUDA GPU that computes bf16, 16-mixed on older ones, else 32-true)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network: fuses its layers into fewer, faster kernels "
        "after a one-off compilation (tens of seconds; needs a C++ compiler on CPU)",
    )


def add_run_arguments(parser: argparse.ArgumentParser, run_name: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out-dir", help=f"run folder for every output (default runs/{run_name})")
    group.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seeds initialisation, shuffling, augmentation and dropout; the 45k/5k split is always the original "
        "study's (default 0)",
    )
    group.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="CKPT",
        help="continue the run in --out-dir with its own settings: with no "
        "value, from its last.ckpt; or from the checkpoint given. Only how the rest of it runs may change: "
        + ", ".join("--" + name.replace("_", "-") for name in RESUME_MAY_CHANGE).replace("--tsne,", "--no-tsne,")
        + " (recorded in config.json); any other flag that differs from the run's is refused",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out-dir (without it, a folder that holds a run's results is "
        "refused: continue it with --resume or choose another --out-dir)",
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars, or not; the per-epoch line is printed either way (default: bars only when the output "
        "is a terminal, so a log file gets clean lines)",
    )
    group.add_argument(
        "--val-every",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="measure the validation split and the training-accuracy sample after every N-th epoch and after the last; "
        "0: never (the test pass still runs). The epochs between record their training loss only, and best.ckpt is "
        "chosen among the measured ones; a speed run saves the passes' time (docs/RESULTS.md) (default 1)",
    )
    group.add_argument(
        "--train-accuracy-sample",
        type=non_negative_int,
        metavar="N",
        help="training images measured for the training accuracy (unaugmented) when the validation split is; 0: none "
        "(default: as many as the validation split has, or 5,000 without one)",
    )
    group.add_argument(
        "--keep-epoch-checkpoints",
        action="store_true",
        help="keep every epoch's checkpoint as epoch-001.ckpt, epoch-002.ckpt, ... beside last.ckpt (each a whole "
        "checkpoint: evaluate.py --checkpoint measures the network as it was after that epoch), for curves of accuracy "
        "against time (default: last.ckpt only)",
    )
    group.add_argument(
        "--profile",
        action="store_true",
        help="time each part of the training loop (Lightning's SimpleProfiler: fetching "
        "batches, forward, backward, optimiser step, validation) and write the table to <run folder>/fit-profile.txt",
    )
    group.add_argument(
        "--logger",
        choices=tuple(LOGGERS),
        default="tensorboard",
        help=f"where Lightning logs each epoch's metrics: {choices_help(LOGGERS)} (default tensorboard)",
    )
    group.add_argument(
        "--config",
        metavar="CONFIG_JSON",
        help="run again with the settings of an earlier run (its run folder's config.json, checked as the flags are); "
        "flags given beside it override them; --out-dir, --resume, --overwrite and --progress are never taken from it",
    )


def add_training_arguments(parser: argparse.ArgumentParser, recipe: Recipe, run_name: str) -> None:
    """The flags every training script shares; ``recipe`` supplies the defaults shown in --help."""
    add_recipe_arguments(parser, recipe)
    add_data_arguments(parser)
    add_run_arguments(parser, run_name)
    add_device_arguments(parser)


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, model: str | None = None
) -> argparse.Namespace:
    """The command line; with --config, the earlier run's settings (checked as their flags check them) are the defaults
    that the flags given override. ``args.settings`` keeps the parser and the flags given, for --resume's checks.

    ``model``: the one model this script trains; a config of another model is refused. Scripts that choose the model by
    --model take the config's as its default.
    """
    settings = Settings(parser, given_flags(parser, argv))
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    path = config_only.parse_known_args(argv)[0].config
    if path is not None:
        saved = read_config(Path(path))
        if model is not None and saved.get("model") != model:
            raise UserError(
                f"--config {path} is a run of {saved.get('model')}, not {model}; give it to the script that trained it "
                f"(python modified_models.py --config {path} for a registered model)"
            )
        parser.set_defaults(**settings.check(saved, f"--config {path}"))
    args = parser.parse_args(argv)
    args.settings = settings
    return args


def run_config(args: argparse.Namespace, model: str, run_name: str) -> RunConfig:
    """The registered ``model`` with its options and recipe, every setting in ``args`` laid over them."""
    spec = model_spec(model)
    recipe = {name: value for name, value in vars(args).items() if name in RECIPE_FLAGS and value is not None}
    if "betas" in recipe:
        recipe["betas"] = tuple(recipe["betas"])
    source = f"--config {args.config} or the flags" if getattr(args, "config", None) else "the flags"
    options = spec.resolve(model, model_options_given(args), source)
    settings = {
        f.name: getattr(args, f.name)
        for f in fields(RunConfig)
        if f.name not in ("model", "model_options", "recipe", "out_dir") and hasattr(args, f.name)
    }
    config = RunConfig(
        model=model,
        model_options=options,
        recipe=replace(spec.recipe, **recipe),
        out_dir=args.out_dir or str(Path("runs") / run_name),
        **settings,
    )
    if config.val_every != 1 and config.recipe.scheduler == "plateau":
        raise UserError(
            f"--val-every {config.val_every} with --scheduler plateau: that schedule lowers the lr after an epoch "
            "whose validation loss did not improve, so it needs one after every epoch; give --val-every 1 or another "
            "--scheduler"
        )
    return config


def config_from_args(args: argparse.Namespace, model: str, run_name: str) -> RunConfig:
    """The run the command line describes; with --resume, the run in --out-dir as it was trained (``resumed``)."""
    config = run_config(args, model, run_name)
    return resumed(config, args, model, run_name) if config.resume is not None else config


def resumed(config: RunConfig, args: argparse.Namespace, model: str, run_name: str) -> RunConfig:
    """The run --resume continues, with its own settings from its checkpoint: a flag given that would change what its
    finished epochs meant is refused; one of ``RESUME_MAY_CHANGE`` is taken and recorded as a change after epoch k."""
    path = resume_path(config)
    checkpoint = read_checkpoint(path) if path.is_file() else None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("run_config"), dict)
        or checkpoint["run_config"].get("model") != model
    ):
        return config  # nothing to continue, no settings to continue with, or another model's: resume_checkpoint says which
    source = f"the settings in {path}"
    saved = args.settings.check(run_settings(checkpoint["run_config"], source), source)
    now, given = {**vars(args), **flattened(asdict(config), "the command line")}, args.settings.given
    changed = changed_settings(now, saved, given)  # never where or whether a run goes (NOT_COMPARED)
    refused = [dest for dest in changed if dest not in RESUME_MAY_CHANGE]
    if refused:
        flag = args.settings.action(refused[0]).option_strings[0]
        raise UserError(
            f"--resume continues the run in {config.out_dir} as it was trained, and {flag} would change what its "
            f"finished epochs meant: {describe_change(refused[0], now[refused[0]], saved[refused[0]])}; leave {flag} "
            "out to continue it, or train a new run with another --out-dir (or --overwrite). --resume may change: "
            f"{', '.join(args.settings.action(dest).option_strings[0] for dest in RESUME_MAY_CHANGE if args.settings.action(dest))}"
        )
    merged = argparse.Namespace(
        **{
            **vars(args),
            **{dest: value for dest, value in saved.items() if dest not in given and dest not in NOT_COMPARED},
        }
    )
    epochs_done = int(checkpoint.get("epoch", -1)) + 1
    changes = list(checkpoint["run_config"].get("changes", [])) + [
        {"after_epoch": epochs_done, "setting": dest, "from": normalised(saved[dest]), "to": normalised(now[dest])}
        for dest in changed
    ]
    config = replace(run_config(merged, model, run_name), out_dir=config.out_dir, resume=config.resume, changes=changes)
    finished = Path(config.out_dir, "test.json").is_file() and epochs_done >= config.recipe.epochs
    if finished and config.resume == "last":
        raise UserError(
            f"{config.out_dir} holds a finished run of {epochs_done} epochs; to train it further give --resume with "
            f"--epochs above {epochs_done}, or start it again with --overwrite"
        )
    return config


# --------------------------------------------------------------------------------------------
# How a run ends: one line and an exit status
# --------------------------------------------------------------------------------------------
def raise_interrupted(signum: int, frame) -> None:
    raise RunInterrupted(signum)


def restart_command(argv: list[str]) -> str:
    """The command line ``argv`` without --overwrite and --resume (and its checkpoint): starts the run in its folder
    again.
    """
    args, skip_value = [], False
    for arg in argv[1:]:
        if skip_value and not arg.startswith("-"):
            skip_value = False
            continue
        skip_value = arg == "--resume"
        if arg in ("--overwrite", "--resume") or arg.startswith("--resume="):
            continue
        args.append(arg)
    return shlex.join(["python", argv[0], *args])


def resume_command(argv: list[str]) -> str:
    """The command line that continues the run ``argv`` started: the same flags, without --overwrite, with --resume."""
    return f"{restart_command(argv)} --resume"


def interrupted_message(interrupt: RunInterrupted) -> str:
    """One line: which signal, what is kept, and the command that continues (only if there is something to continue)."""
    if interrupt.saved is None:
        return (
            f"interrupted by {interrupt} before anything was saved: nothing to resume; run the same command to "
            "start again"
        )
    return (
        f"interrupted by {interrupt}: {interrupt.saved}; continue with: "
        f"{interrupt.continue_command or resume_command(sys.argv)}"
    )


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main`` with the toolkit's exit statuses, each with one line on stderr.

    0 done; 1 training diverged or the disk filled up; 2 a mistake in the command or the data (``UserError``);
    130 Ctrl-C (SIGINT) and 143 SIGTERM, after saying what was saved and how to continue.
    """
    handlers = {signum: signal.signal(signum, raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except DiskFull as full:
        way_on = (
            f"continue with: {resume_command(sys.argv)}"
            if full.resumable
            else f"start it again (no epoch was saved yet) with: {restart_command(sys.argv)}"
        )
        print(
            f"error: the disk is full ({full.path}); the files written before stay as they were: free some "
            f"space, then {way_on}",
            file=sys.stderr,
        )
        sys.exit(1)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(
            f"error: the disk is full ({error.filename or error}); the files written before stay as they were: free "
            "some space, then run the same command again",
            file=sys.stderr,
        )
        sys.exit(1)
    except (RunInterrupted, KeyboardInterrupt) as interrupt:
        if not isinstance(interrupt, RunInterrupted):
            interrupt = RunInterrupted(signal.SIGINT)
        if is_main_process():
            print(f"\n{interrupted_message(interrupt)}", file=sys.stderr)
        sys.exit(128 + interrupt.signum)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
