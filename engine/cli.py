"""The command line every script shares: flag types and the argument groups.

A flag means the same thing and takes the same choices in every script and benchmark, because each declares it
through the groups here. The settings the flags make are ``engine.settings``'s; how a run ends, ``engine.exits``'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.config import LOGGERS, OPTIMIZERS, PRECISIONS, SCHEDULERS, TTA_MODES, WEIGHT_AVERAGES, Recipe
from engine.data import DATASETS, VAL_FRACTION
from engine.flags import (
    beta,
    choices_help,
    epoch_count,
    former_name,
    non_negative_float,
    non_negative_int,
    on_off,
    open_fraction,
    positive_float,
    positive_int,
)
from engine.help import advanced, brief
from engine.registry import ModelSpec, option_table
from engine.settings import MODEL_OPTION, RESUME_MAY_CHANGE
from functions import AUGMENTATIONS

DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")


# --------------------------------------------------------------------------------------------
# Argument groups (docs/running.md explains runs; advanced flags show in --help-all only)
# --------------------------------------------------------------------------------------------
def add_recipe_arguments(parser: argparse.ArgumentParser, recipe: Recipe) -> None:
    """The recipe's flags; each defaults to ``recipe``'s value (shown in --help), so a model's own recipe stays its
    default.
    """
    r = recipe
    group = parser.add_argument_group(
        "recipe (defaults: this model's own recipe; CIFAR10Net's is the original study's)"
    )
    group.add_argument(
        "--epochs",
        type=epoch_count,
        metavar="N",
        help="passes over the training split; with a fraction (7.5) the last pass trains that part of its batches, as "
        f"airbench94's 9.9 (default {r.epochs:g})",
    )
    group.add_argument(
        "--batch-size", type=positive_int, metavar="N", help=f"images per optimisation step (default {r.batch_size})"
    )
    group.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help=f"adam, adamw, sgd (Nesterov), or muon (Muon for the filters, SGD for the rest) (default {r.optimizer})",
    )
    group.add_argument("--lr", type=positive_float, metavar="LR", help=f"peak learning rate (default {r.lr:g})")
    group.add_argument(
        "--weight-decay", type=non_negative_float, metavar="WD", help=f"L2 penalty (default {r.weight_decay:g})"
    )
    brief(
        group.add_argument(
            "--augment",
            type=former_name,
            choices=tuple(AUGMENTATIONS),
            metavar="NAME",
            help="training augmentation, done in batches on the device: "
            + choices_help(AUGMENTATIONS, lambda augmentation: augmentation.description)
            + f" (default {r.augment})",
        ),
        f"training augmentation: {', '.join(AUGMENTATIONS)} (default {r.augment})",
    )
    brief(
        group.add_argument(
            "--scheduler",
            choices=tuple(SCHEDULERS),
            metavar="NAME",
            help=f"learning-rate schedule: {choices_help(SCHEDULERS)} (default {r.scheduler})",
        ),
        f"learning-rate schedule: {', '.join(SCHEDULERS)} (default {r.scheduler})",
    )
    more = [
        group.add_argument(
            "--betas",
            type=beta,
            nargs=2,
            metavar=("BETA1", "BETA2"),
            help=f"Adam's betas (default {r.betas[0]} {r.betas[1]})",
        ),
        group.add_argument("--momentum", type=beta, help=f"SGD's Nesterov momentum (default {r.momentum})"),
        group.add_argument(
            "--label-smoothing", type=beta, help=f"cross-entropy label smoothing (default {r.label_smoothing})"
        ),
        group.add_argument(
            "--warmup-epochs",
            type=non_negative_float,
            help=f"epochs of linear warm-up for cosine/onecycle (default {r.warmup_epochs})",
        ),
        group.add_argument(
            "--tta",
            choices=tuple(TTA_MODES),
            help=f"test-time augmentation, each test image's class scores from: {choices_help(TTA_MODES)} "
            f"(default {r.tta})",
        ),
    ]
    group = parser.add_argument_group("recipe: airbench's pieces (docs/RESULTS.md measures each)")
    more += [
        group.add_argument(
            "--decoupled",
            action=argparse.BooleanOptionalAction,
            help="sum the loss over the batch and read --weight-decay per 1,024 examples whatever the lr (airbench's "
            f"form) (default {on_off(r.decoupled)})",
        ),
        group.add_argument(
            "--muon-lr",
            type=positive_float,
            help=f"with --optimizer muon, the lr of the convolution filters (default {r.muon_lr:g})",
        ),
        group.add_argument(
            "--muon-momentum",
            type=beta,
            help=f"with --optimizer muon, the filters' Nesterov momentum (default {r.muon_momentum})",
        ),
        group.add_argument(
            "--muon-renorm-every",
            type=positive_int,
            metavar="N",
            help="with --optimizer muon, rescale each filter to norm sqrt(its output channels) before every N-th "
            f"step: airbench's 1, hiverge's 8 (default {r.muon_renorm_every})",
        ),
        group.add_argument(
            "--muon-weight-decay",
            type=non_negative_float,
            help="with --optimizer muon, the filters' weight decay, read as --weight-decay is; it matters only "
            f"between renormalisations (--muon-renorm-every above 1) (default {r.muon_weight_decay:g})",
        ),
        group.add_argument(
            "--muon-batched",
            action=argparse.BooleanOptionalAction,
            help="with --optimizer muon, orthogonalise the filters of one shape in one stacked call: the same "
            f"arithmetic in fewer, larger products, which pays on a GPU (default {on_off(r.muon_batched)})",
        ),
        group.add_argument(
            "--weight-average",
            choices=tuple(WEIGHT_AVERAGES),
            help=f"{choices_help(WEIGHT_AVERAGES)} (default {r.weight_average})",
        ),
    ]
    for action in more:
        advanced(action)


def add_model_arguments(parser: argparse.ArgumentParser, specs: dict[str, ModelSpec], everyday: bool = True) -> None:
    """A flag for each option of the models in ``specs`` (the models this script trains), defaulting to each model's
    own; in --help only where ``everyday`` (one model's few options), else in --help-all.

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
        if option.kind is not bool and option.choices is None:
            kwargs["metavar"] = option.name.upper() if option.kind is str else "N"
        if option.choices is not None:
            kwargs["choices"] = option.choices
        action = group.add_argument(
            option.flag,
            dest=MODEL_OPTION + name,
            **kwargs,
            help=f"{option.help}; {option.allowed()} ({default})".replace("%", "%%"),
        )
        brief(action, f"{option.help} ({default})".replace("%", "%%"))
        if not everyday:
            advanced(action)


def add_data_arguments(
    parser: argparse.ArgumentParser, limit_train: bool = True, optional_validation: bool = True
) -> None:
    """--data-dir and --num-workers everywhere; --limit-train, --val-fraction and (with ``optional_validation``: not
    where the validation split is needed, as tuning's objective) --no-validation where the training split is free to
    choose. docs/data.md explains each.
    """
    group = parser.add_argument_group("data (docs/data.md)")
    group.add_argument(
        "--data-dir",
        default="./data",
        metavar="DIR",
        help="CIFAR-10's official 'cifar-10-batches-py' folder, or an image-folder tree train/<class>/*.jpg and "
        "test/<class>/*.jpg of any classes; if neither is there, the official archive is downloaded into it "
        "(default ./data)",
    )
    advanced(
        group.add_argument(
            "--dataset", default="auto", choices=tuple(DATASETS), help=f"{choices_help(DATASETS)} (default auto)"
        )
    )
    if limit_train:
        group.add_argument(
            "--limit-train",
            type=positive_int,
            metavar="N",
            help="train on only the first N images of the training split, for a quick look",
        )
        if optional_validation:
            group.add_argument(
                "--no-validation",
                dest="validation",
                action="store_false",
                help="train on every training image, with no validation split (a final run: no best.ckpt)",
            )
        advanced(
            group.add_argument(
                "--val-fraction",
                type=open_fraction,
                default=VAL_FRACTION,
                metavar="F",
                help=f"the fraction of the training images that validates, drawn with the study's seeded split "
                f"(default {VAL_FRACTION:g}: CIFAR-10's 45,000 / 5,000, the study's images exactly)",
            )
        )
    advanced(
        group.add_argument(
            "--num-workers",
            type=positive_int,
            default=2,
            help="threads that decode an image-folder tree the first time (later runs read the cache) (default 2)",
        )
    )


def add_device_arguments(parser: argparse.ArgumentParser, training: bool = True, distributed: bool = True) -> None:
    """--device everywhere; with ``training``, --precision and --compile; with ``distributed`` too, --devices,
    --strategy, --num-nodes and --collective-timeout.
    """
    group = parser.add_argument_group("device")
    group.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        metavar="DEVICE",
        help="where to compute: auto (cuda, else mps, else cpu), cpu, cuda (or gpu), mps (default auto)",
    )
    if not training:
        return
    group.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        metavar="PRECISION",
        help="Lightning precision: 32-true, bf16-mixed, 16-mixed, ... (default auto: bf16-mixed on a CUDA GPU that "
        "computes bf16, 16-mixed on older ones, else 32-true)",
    )
    brief(parser._actions[-1], "32-true, bf16-mixed, 16-mixed, ... (default auto: mixed on a GPU, else 32-true)")
    advanced(
        group.add_argument(
            "--compile",
            action="store_true",
            help="torch.compile the network: fuses its layers into fewer, faster kernels after a one-off compilation "
            "(tens of seconds; needs a C++ compiler on CPU)",
        )
    )
    if distributed:
        group = parser.add_argument_group("several devices or machines (docs/running.md)")
        for action in (
            group.add_argument(
                "--devices",
                default="auto",
                help="how many devices, or which, passed to Lightning (e.g. 4, or 0,1) (default auto)",
            ),
            group.add_argument(
                "--strategy",
                default="auto",
                help="Lightning's distribution strategy, e.g. ddp for data-parallel over several GPUs or nodes "
                "(default auto)",
            ),
            group.add_argument(
                "--num-nodes",
                type=positive_int,
                default=1,
                metavar="N",
                help="machines that train this one model together, each with --devices devices (--strategy ddp; the "
                "run folder on a filesystem all nodes share) (default 1)",
            ),
            group.add_argument(
                "--collective-timeout",
                type=positive_float,
                default=300.0,
                metavar="SECONDS",
                help="how long a process of a data-parallel run waits for the others (to start, to exchange gradients "
                "and metrics) before the run stops with one line: a node that froze or lost its network; raise it "
                "where a node takes longer to start (default 300)",
            ),
        ):
            advanced(action)


def add_run_arguments(parser: argparse.ArgumentParser, run_name: str) -> None:
    group = parser.add_argument_group("run (docs/running.md)")
    group.add_argument("--out-dir", metavar="DIR", help=f"run folder for every output (default runs/{run_name})")
    group.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seeds initialisation, shuffling, augmentation and dropout; the validation split is always the study's "
        "(default 0)",
    )
    brief(
        group.add_argument(
            "--resume",
            nargs="?",
            const="last",
            metavar="CKPT",
            help="continue the run in --out-dir with its own settings, from its last.ckpt (or the checkpoint given); "
            "only how the rest runs may change: "
            + ", ".join("--" + name.replace("_", "-") for name in RESUME_MAY_CHANGE)
            + " and the analyses' flags",
        ),
        "continue the run in --out-dir with its own settings, from its last.ckpt (or CKPT)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out-dir (without it, a folder that holds a run is refused)",
    )
    group.add_argument(
        "--config",
        metavar="CONFIG_JSON",
        help="run again with an earlier run's settings (its config.json); flags given beside it override them",
    )
    for action in (
        group.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="show progress bars, or not; the per-epoch line is printed either way (default: bars only when the "
            "output is a terminal)",
        ),
        group.add_argument(
            "--logger",
            choices=tuple(LOGGERS),
            default="tensorboard",
            help=f"where Lightning logs each epoch's metrics: {choices_help(LOGGERS)} (default tensorboard)",
        ),
        group.add_argument(
            "--val-every",
            type=non_negative_int,
            default=1,
            metavar="N",
            help="measure the validation split and the training-accuracy sample after every N-th epoch and the last; "
            "0: never (the test pass still runs); a speed run saves their time (default 1)",
        ),
        group.add_argument(
            "--train-accuracy-sample",
            type=non_negative_int,
            metavar="N",
            help="training images measured for the training accuracy when the validation split is; 0: none "
            "(default: as many as the validation split has, or 5,000 without one)",
        ),
        group.add_argument(
            "--keep-epoch-checkpoints",
            action="store_true",
            help="keep every epoch's checkpoint as epoch-001.ckpt, ... beside last.ckpt, to evaluate the network as "
            "it was after each epoch (default: last.ckpt only)",
        ),
        group.add_argument(
            "--profile",
            action="store_true",
            help="time each part of the training loop (Lightning's SimpleProfiler) into <run folder>/fit-profile.txt",
        ),
    ):
        advanced(action)


def add_training_arguments(parser: argparse.ArgumentParser, recipe: Recipe, run_name: str) -> None:
    """The flags every training script shares; ``recipe`` supplies the defaults shown in --help."""
    add_recipe_arguments(parser, recipe)
    add_data_arguments(parser)
    add_run_arguments(parser, run_name)
    add_device_arguments(parser)
