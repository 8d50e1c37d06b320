"""Train the original study's modified models, one at a time or all under identical settings, and compare them.

    python modified_models.py --list
    python modified_models.py --model CIFAR10Net_7 --data-dir ./data
    python modified_models.py --all --epochs 20 --augment standard --data-dir ./data

    python modified_models.py --model Airbench94_muon --data-dir ./data --no-validation    # the fast recipe

The study changes CIFAR10Net one idea at a time (CIFAR10Net_2 to _7), then tunes it (CIFAR10Net_optim); FastVGG and
Airbench94_muon (each also _narrow) go past it with recipes of their own. Each model trains through the same engine as
main.py into its own run folder. --all (or --models A B ...) trains each under one setting, skips those already
finished, resumes an interrupted one, and writes comparison.csv, .md and .png into --out-dir. The recipe defaults below
are the study's; a model with a recipe of its own uses it (--list), and any flag given overrides it. Each model's
options: --help-all. Runs, resuming and errors: docs/running.md; results: docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

from torch import nn

import engine
import tsne
from analyses.report import write_report
from engine import MODELS, ModelSpec, UserError, model_spec, write_atomically
from models.fast import FAST_RECIPE, ConvGroup, FastVGG
from models.study import (
    STUDY_MODELS,
    STUDY_RECIPE,
    CIFAR10Net,
    CIFAR10Net_2,
    CIFAR10Net_3,
    CIFAR10Net_4,
    CIFAR10Net_5,
    CIFAR10Net_6,
    CIFAR10Net_7,
    CIFAR10Net_optim,
)

# The study's names, as the study's own modified_models.py offered them: from modified_models import CIFAR10Net_2.
__all__ = [
    "MODELS",
    "ModelSpec",
    "model_spec",
    "FAST_RECIPE",
    "ConvGroup",
    "FastVGG",
    "CIFAR10Net",
    "CIFAR10Net_2",
    "CIFAR10Net_3",
    "CIFAR10Net_4",
    "CIFAR10Net_5",
    "CIFAR10Net_6",
    "CIFAR10Net_7",
    "CIFAR10Net_optim",
    "main",
]


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def trained_here() -> dict[str, ModelSpec]:
    """The models this script trains: every registered model but those another script trains (TransferNet:
    transfer_learning.py).
    """
    return {name: spec for name, spec in MODELS.items() if spec.own_script is None}


def print_model_list() -> None:
    width = max(map(len, MODELS))
    for name, spec in MODELS.items():
        trained_by = f" (python {spec.own_script})" if spec.own_script else ""
        options = f" Options: {', '.join(option.flag for option in spec.options)}." if spec.options else ""
        print(
            f"{name:<{width}}  {parameter_count(spec.build()):>9,} parameters  {spec.description}{trained_by}{options}"
        )


def check_trained_here(name: str) -> None:
    spec = model_spec(name)
    if spec.own_script:
        raise UserError(
            f"{name} is trained by {spec.own_script}; run python {spec.own_script} (its --help lists its options)"
        )


# --------------------------------------------------------------------------------------------
# Comparison of several models under one setting
# --------------------------------------------------------------------------------------------
COMPARISON_COLUMNS = (
    "model",
    "parameters",
    "epochs",
    "best_val_accuracy",
    "final_val_accuracy",
    "best_val_loss",
    "final_val_loss",
    "test_accuracy",
    "train_val_gap",
    "seconds_per_epoch",
)


def best(values: list[float | None], pick) -> float | None:
    """``pick`` (max or min) of the values there are; None without any (a run with no validation split)."""
    present = [value for value in values if value is not None]
    return pick(present) if present else None


def comparison_row(name: str, run_dir: Path) -> dict[str, float | str | None]:
    history = engine.read_metrics_csv(run_dir / "metrics.csv")
    report = engine.read_json(run_dir / "test.json")
    options = engine.read_json(run_dir / "config.json").get("model_options", {})
    final = history[-1]
    return {
        "model": name,
        "parameters": parameter_count(MODELS[name].build(options, len(report["per_class_accuracy"]), name)),
        "epochs": len(history),
        "best_val_accuracy": best([row["val_accuracy"] for row in history], max),
        "final_val_accuracy": final["val_accuracy"],
        "best_val_loss": best([row["val_loss"] for row in history], min),
        "final_val_loss": final["val_loss"],
        "test_accuracy": report["test_accuracy"],
        "train_val_gap": None
        if None in (final["val_accuracy"], final["train_accuracy"])
        else final["train_accuracy"] - final["val_accuracy"],
        "seconds_per_epoch": sum(row["seconds"] for row in history) / len(history),
    }


def cell(value: float | None, form: str) -> str:
    return "n/a" if value is None else format(value, form)


def write_comparison(rows: list[dict], histories: dict[str, list[dict]], out_dir: Path, setting: str) -> None:
    engine.write_csv(out_dir / "comparison.csv", rows, COMPARISON_COLUMNS)
    lines = [
        f"Setting: {setting}",
        "",
        "| model | parameters | best val acc | final val acc | best val loss | final val loss | test acc | "
        "train-val gap | s/epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {cell(r['best_val_accuracy'], '.2%')} | "
            f"{cell(r['final_val_accuracy'], '.2%')} | "
            f"{cell(r['best_val_loss'], '.3f')} | {cell(r['final_val_loss'], '.3f')} | {r['test_accuracy']:.2%} | "
            f"{cell(r['train_val_gap'], '+.2%')} | {r['seconds_per_epoch']:.1f} |"
        )
    write_atomically(out_dir / "comparison.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    engine.plot_comparison(histories, out_dir / "comparison.png", setting)


def comparison_args(args: argparse.Namespace, run_dir: Path, resume: str | None) -> argparse.Namespace:
    """The command line's settings for one model of a comparison: its own run folder and resume."""
    one_model = copy.copy(args)
    one_model.out_dir, one_model.resume = str(run_dir), resume
    return one_model


def check_same_setting(names: list[str], args: argparse.Namespace, out_dir: Path) -> None:
    """A comparison never mixes settings: each model already in ``out_dir`` must have trained as these flags ask."""
    for name in names:
        earlier = out_dir / name / "config.json"
        if args.overwrite or not earlier.is_file():
            continue
        asked = engine.config_from_args(comparison_args(args, out_dir / name, None), name, name)
        differences = engine.differences_from(asked, engine.read_json(earlier), str(earlier))
        if differences:
            raise UserError(
                f"{out_dir} holds a comparison trained with other settings ({name}: {differences[0]}); a comparison "
                "never mixes settings: rerun it with the flags it was trained with, give another --out-dir, or "
                "--overwrite to train every model again"
            )


def compare(names: list[str], args: argparse.Namespace) -> None:
    """Train each model under the same flags into --out-dir/<model>; finished models are not trained again (unless
    --overwrite). Models already there must have trained with the same settings (``check_same_setting``)."""
    out_dir = Path(args.out_dir or "runs/comparison")
    check_same_setting(names, args, out_dir)
    data = None
    for name in names:
        run_dir = out_dir / name
        if (run_dir / "test.json").is_file() and not args.overwrite:
            print(f"== {name}: finished earlier with these settings, kept ({run_dir})")
            continue
        resume = "last" if (run_dir / "last.ckpt").is_file() and not args.overwrite else None
        print(f"== {name}" + (": resuming" if resume else ""))
        config = engine.config_from_args(comparison_args(args, run_dir, resume), name, name)
        try:
            if data is None:
                engine.claim_run_folder(config)  # a busy folder fails before the data load
                data = engine.load_split(config)
            engine.train(config, MODELS[name], data=data, analyses=tsne.analyses(config))
        except engine.RunInterrupted as interrupt:
            # finished models are skipped, the interrupted one resumes; one stopped in its analyses is finished, so
            # their own commands (the engine's continue_command) run first
            rerun = shlex.join(["python", *sys.argv])
            interrupt.continue_command = " && ".join(filter(None, (interrupt.continue_command, rerun)))
            raise
    rows = [comparison_row(name, out_dir / name) for name in names]
    histories = {name: engine.read_metrics_csv(out_dir / name / "metrics.csv") for name in names}
    r = engine.config_from_args(args, names[0], "comparison").recipe
    setting = (
        f"{rows[0]['epochs']} epochs, augment={r.augment}, seed {args.seed}"
        + (f", {args.limit_train} training images" if args.limit_train else "")
        + "; recipe per model unless overridden"
    )
    write_comparison(rows, histories, out_dir, setting)
    report = write_report(out_dir)
    print(f"Comparison written to {out_dir}/comparison.csv, comparison.md, comparison.png and {report.name}")
    print((out_dir / "comparison.md").read_text())


def main() -> None:
    parser = engine.script_parser(
        __doc__, usage="%(prog)s (--model NAME | --models NAME ... | --all | --list) [options]"
    )
    which = parser.add_argument_group("which models").add_mutually_exclusive_group()
    which.add_argument("--model", help=f"train one model: {', '.join(trained_here())}")
    which.add_argument(
        "--models", nargs="+", metavar="NAME", help="train these models under identical settings and compare them"
    )
    which.add_argument(
        "--all", action="store_true", help="train and compare CIFAR10Net and the original study's seven modified models"
    )
    which.add_argument("--list", action="store_true", help="list the models with their parameter counts and exit")
    engine.add_training_arguments(parser, STUDY_RECIPE, run_name="<model>, or runs/comparison with --all/--models")
    engine.add_model_arguments(parser, trained_here(), everyday=False)
    tsne.add_arguments(parser)
    args = engine.parse_arguments(parser)
    if not (args.model or args.models or args.all or args.list):
        parser.error("give --model NAME, --models NAME ..., --all or --list (or --config of a run)")
    if args.list:
        print_model_list()
        return
    for name in [args.model] if args.model else (args.models or []):
        check_trained_here(name)
    if args.model:
        config = engine.config_from_args(args, args.model, args.model)
        engine.train(config, MODELS[args.model], analyses=tsne.analyses(config))
    else:
        compare(list(STUDY_MODELS) if args.all else args.models, args)


if __name__ == "__main__":
    engine.run_cli(main)
