"""The command line every script shares: flag types, the argument groups, the config a run's flags make, exit statuses.

A flag means the same thing and takes the same choices in every script and benchmark, because each declares it
through the groups here. ``run_cli`` turns how a run ended into one line on stderr and an exit status.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import shlex
import signal
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from engine.config import LOGGERS, OPTIMIZERS, SCHEDULERS, TTA_MODES, WEIGHT_AVERAGES, Recipe, RunConfig
from engine.devices import is_main_process
from engine.errors import RunInterrupted, TrainingDiverged
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


def on_off(value: bool) -> str:
    return "on" if value else "off"


def choices_help(table: dict[str, Any], describe: Callable[[Any], str] = str) -> str:
    """"name: description; ..." for a --help text (where argparse reads % as a format: "23%" is written "23%%")."""
    return "; ".join(f"{name}: {describe(value)}" for name, value in table.items()).replace("%", "%%")


# --------------------------------------------------------------------------------------------
# Argument groups
# --------------------------------------------------------------------------------------------
def add_recipe_arguments(parser: argparse.ArgumentParser, recipe: Recipe) -> None:
    """The recipe's flags; each defaults to ``recipe``'s value (shown in --help), so a model's own recipe stays its default."""
    r = recipe
    group = parser.add_argument_group("recipe (defaults: the README's recipe for this model)")
    group.add_argument("--epochs", type=positive_int, help=f"passes over the training split (default {r.epochs})")
    group.add_argument("--batch-size", type=positive_int, help=f"images per optimisation step (default {r.batch_size})")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help="adam, adamw, sgd with Nesterov momentum, or muon: Muon for the "
                       f"convolution filters (see --muon-lr) and Nesterov SGD for the rest (default {r.optimizer})")
    group.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {r.lr:g})")
    group.add_argument("--betas", type=beta, nargs=2, metavar=("BETA1", "BETA2"), help=f"Adam's betas (default {r.betas[0]} {r.betas[1]})")
    group.add_argument("--momentum", type=beta, help=f"SGD's Nesterov momentum (default {r.momentum})")
    group.add_argument("--weight-decay", type=non_negative_float, help=f"L2 penalty (default {r.weight_decay:g})")
    group.add_argument("--label-smoothing", type=beta, help=f"cross-entropy label smoothing (default {r.label_smoothing})")
    group.add_argument("--scheduler", choices=tuple(SCHEDULERS), help=f"learning-rate schedule: {choices_help(SCHEDULERS)} (default {r.scheduler})")
    group.add_argument("--warmup-epochs", type=non_negative_float, help=f"epochs of linear warm-up for cosine/onecycle (default {r.warmup_epochs})")
    group.add_argument("--augment", choices=tuple(AUGMENTATIONS), help="training augmentation, done in batches on the device: "
                       + choices_help(AUGMENTATIONS, lambda augmentation: augmentation.description) + f" (default {r.augment})")
    group.add_argument("--tta", choices=tuple(TTA_MODES), help=f"test-time augmentation, the class scores of each test image from: "
                       f"{choices_help(TTA_MODES)} (default {r.tta})")

    group = parser.add_argument_group("recipe: airbench's pieces (docs/RESULTS.md measures each)")
    group.add_argument("--decoupled", action=argparse.BooleanOptionalAction, help="sum the loss over the batch and read --weight-decay "
                       "as the decay per 1,024 examples whatever the lr: airbench's form, where lr and weight decay keep their meaning "
                       f"at any batch size (default {on_off(r.decoupled)})")
    group.add_argument("--muon-lr", type=positive_float, help=f"with --optimizer muon, the lr of the convolution filters (default {r.muon_lr:g})")
    group.add_argument("--muon-momentum", type=beta, help=f"with --optimizer muon, the filters' Nesterov momentum (default {r.muon_momentum})")
    group.add_argument("--weight-average", choices=tuple(WEIGHT_AVERAGES), help=f"{choices_help(WEIGHT_AVERAGES)} (default {r.weight_average})")
    group.add_argument("--whiten", action=argparse.BooleanOptionalAction, help="the first convolution whitens the training images' "
                       f"2x2 patches and stays frozen, its bias learning for 3 epochs (airbench models) (default {on_off(r.whiten)})")
    group.add_argument("--dirac", action=argparse.BooleanOptionalAction, help="the other convolutions start as identities on their "
                       f"first channels (airbench models) (default {on_off(r.dirac)})")
    group.add_argument("--freeze-norm-weights", action=argparse.BooleanOptionalAction, help="BatchNorm weights stay 1, only the "
                       f"biases learn (airbench models) (default {on_off(r.freeze_norm_weights)})")
    group.add_argument("--norm-bias-lr-scale", type=positive_float, help=f"BatchNorm biases learn at this multiple of --lr (airbench "
                       f"models) (default {r.norm_bias_lr_scale:g})")


def add_data_arguments(parser: argparse.ArgumentParser, limit_train: bool = True) -> None:
    """--data-dir and --num-workers everywhere; --limit-train and --no-validation where the training split is free to choose."""
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", default="./data", help="folder with CIFAR-10: the official 'cifar-10-batches-py' folder, or an image-folder tree "
                       "train/<class>/*.png|jpg and test/<class>/... (the folder itself or one sub-folder); if neither is there, torchvision downloads "
                       "the official archive into it (default ./data)")
    if limit_train:
        group.add_argument("--limit-train", type=positive_int, metavar="N", help="train on only the first N images of the 45,000-image training split, for a quick look")
        group.add_argument("--no-validation", dest="validation", action="store_false", help="train on all 50,000 training images, "
                           "with no validation split (a final run: no validation loss, no best.ckpt; the test set as always)")
    group.add_argument("--num-workers", type=positive_int, default=2, help="threads that decode an image-folder tree the first time (later runs read the cache) (default 2)")


def add_device_arguments(parser: argparse.ArgumentParser, training: bool = True, distributed: bool = True) -> None:
    """--device everywhere; with ``training``, --precision and --compile; with ``distributed`` too, --devices and --strategy."""
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", choices=DEVICES, help="where to compute: auto (cuda, else mps, else cpu), cpu, cuda (or gpu), mps (default auto)")
    if not training:
        return
    if distributed:
        group.add_argument("--devices", default="auto", help="how many devices, or which, passed to Lightning (e.g. 4, or 0,1) (default auto)")
        group.add_argument("--strategy", default="auto", help="Lightning's distribution strategy, e.g. ddp for data-parallel over several GPUs or nodes (default auto)")
    group.add_argument("--precision", default="auto", help="Lightning precision, e.g. 32-true, bf16-mixed, 16-mixed (default auto: bf16-mixed on a CUDA GPU that computes bf16, 16-mixed on older ones, else 32-true)")
    group.add_argument("--compile", action="store_true", help="torch.compile the network: fuses its layers into fewer, faster kernels "
                       "after a one-off compilation (tens of seconds; needs a C++ compiler on CPU)")


def add_run_arguments(parser: argparse.ArgumentParser, run_name: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out-dir", help=f"run folder for every output (default runs/{run_name})")
    group.add_argument("--seed", type=non_negative_int, default=0, help="seeds initialisation, shuffling, augmentation and dropout; the 45k/5k split is always the README's (default 0)")
    group.add_argument("--resume", nargs="?", const="last", metavar="CKPT", help="continue an interrupted run: with no value, from last.ckpt in --out-dir; or from the checkpoint given")
    group.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir (without it, a folder that holds a run's results is "
                       "refused: continue it with --resume or choose another --out-dir)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show progress bars, or not; the per-epoch line is printed either way (default: bars only when the output "
                            "is a terminal, so a log file gets clean lines)")
    group.add_argument("--logger", choices=tuple(LOGGERS), default="tensorboard",
                       help=f"where Lightning logs each epoch's metrics: {choices_help(LOGGERS)} (default tensorboard)")
    group.add_argument("--config", metavar="CONFIG_JSON", help="run again with the settings of an earlier run (its run folder's "
                       "config.json); flags given beside it override them; --out-dir, --resume and --overwrite are never taken from it")


def add_training_arguments(parser: argparse.ArgumentParser, recipe: Recipe, run_name: str) -> None:
    """The flags every training script shares; ``recipe`` supplies the defaults shown in --help."""
    add_recipe_arguments(parser, recipe)
    add_data_arguments(parser)
    add_run_arguments(parser, run_name)
    add_device_arguments(parser)


RECIPE_FLAGS = {f.name for f in fields(Recipe)}
NOT_FROM_CONFIG = ("out_dir", "resume", "overwrite", "config", "progress")  # where, whether and how it shows: the new run's own choice


def read_config(path: Path) -> dict[str, Any]:
    """An earlier run's settings as flag defaults: config.json's recipe and run settings, and the extra settings a
    script keeps beside it (transfer.json)."""
    try:
        saved = json.loads(path.read_text())
        settings = {**saved.pop("recipe"), **saved}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"--config {path} is not a run's config.json ({type(error).__name__}); give <run folder>/config.json") from None
    extra = path.parent / "transfer.json"
    if extra.is_file():
        settings.update(json.loads(extra.read_text()))
    return {name: value for name, value in settings.items() if name not in NOT_FROM_CONFIG}


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, model: str | None = None) -> argparse.Namespace:
    """The command line; with --config, the earlier run's settings are the defaults that the flags given override.

    ``model``: the one model this script trains; a config of another model is refused. Scripts that choose the model by
    --model take the config's as its default.
    """
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    path = config_only.parse_known_args(argv)[0].config
    if path is not None:
        settings = read_config(Path(path))
        if model is not None and settings.get("model") != model:
            raise UserError(f"--config {path} is a run of {settings.get('model')}, not {model}; give it to the script that trained it "
                            f"(python modified_models.py --config {path} for a registered model)")
        dests = {action.dest for action in parser._actions}
        parser.set_defaults(**{name: value for name, value in settings.items() if name in dests})
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace, model: str, recipe: Recipe, run_name: str) -> RunConfig:
    """The recipe with every flag the user gave laid over it."""
    given = {name: value for name, value in vars(args).items() if name in RECIPE_FLAGS and value is not None}
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    settings = {f.name: getattr(args, f.name) for f in fields(RunConfig)
                if f.name not in ("model", "recipe", "out_dir") and hasattr(args, f.name)}
    return RunConfig(model=model, recipe=replace(recipe, **given), out_dir=args.out_dir or str(Path("runs") / run_name), **settings)


# --------------------------------------------------------------------------------------------
# How a run ends: one line and an exit status
# --------------------------------------------------------------------------------------------
def raise_interrupted(signum: int, frame) -> None:
    raise RunInterrupted(signum)


def resume_command(argv: list[str]) -> str:
    """The command line that continues the run ``argv`` started: the same flags, without --overwrite, with --resume."""
    args, skip_value = [], False
    for arg in argv[1:]:
        if skip_value and not arg.startswith("-"):
            skip_value = False
            continue
        skip_value = arg == "--resume"
        if arg in ("--overwrite", "--resume") or arg.startswith("--resume="):
            continue
        args.append(arg)
    return shlex.join(["python", argv[0], *args, "--resume"])


def interrupted_message(interrupt: RunInterrupted) -> str:
    """One line: which signal, what is kept, and the command that continues (only if there is something to continue)."""
    if interrupt.saved is None:
        return f"interrupted by {interrupt} before anything was saved: nothing to resume; run the same command to start again"
    return f"interrupted by {interrupt}: {interrupt.saved}; continue with: {interrupt.continue_command or resume_command(sys.argv)}"


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
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({error.filename or error}); the files written before stay as they were: free some space, "
              f"then continue with: {resume_command(sys.argv)}", file=sys.stderr)
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
