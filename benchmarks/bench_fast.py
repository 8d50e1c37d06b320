"""FastVGG's recipe measured: accuracy and wall time per seed, ablations, and grids over its settings.

    python -m benchmarks.bench_fast --data-dir ./data                          # FastVGG, seeds 0 1 2
    python -m benchmarks.bench_fast --data-dir ./data --model FastVGG_narrow --precision bf16-mixed
    python -m benchmarks.bench_fast --data-dir ./data --ablations --seeds 0    # one idea off at a time
    python -m benchmarks.bench_fast --data-dir ./data --model Airbench94_muon_narrow --hiverge --seeds 0 1  # hiverge's
    python -m benchmarks.bench_fast --data-dir ./data --vary lr=0.2,0.4,0.8 --vary weight_decay=5e-4,1e-3

Every run trains through the engine exactly as ``modified_models --model <name>`` does, so the time includes what a
user's run includes (the per-epoch validation, the checkpoints), but not the data loading, which happens once. The
variants take turns, seed by seed (every variant's seed 0, then every variant's seed 1...), so a machine that slows down
mid-benchmark slows them all alike. After each run it measures validation accuracy with the run's TTA (the number to
choose settings by) and test accuracy under each TTA mode (none, flip, flip-translate, and selective: flip-translate for
the least confident fifth only), from one forward pass of each view. A run that diverges is a row that says so, and the
benchmark goes on.

With --compile the first run also compiles the network; its time is reported as the first run, and the runs after it
start with the network already compiled and the data already on the device (how airbench times itself). Writes runs.csv,
runs.md and time_accuracy.png into --out-dir.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import get_args, get_type_hints

import matplotlib
from matplotlib.figure import Figure

import engine
import models  # noqa: F401  (registers every model)
from benchmarks.accuracy import accuracy_by_tta
from benchmarks.tables import percent
from engine import UserError, write_atomically
from functions import AUGMENTATIONS

# One idea off (or changed) at a time against the model's recipe; TTA needs no run of its own (test_plain).
ABLATIONS = {
    "no label smoothing": {"label_smoothing": "0"},
    "standard augmentation (4-pixel zero pad)": {"augment": "standard"},
    "no augmentation": {"augment": "none"},
    "no warm-up": {"warmup_epochs": "0"},
    "constant lr (no warm-up, no decay)": {"scheduler": "none"},
    "batch 1024, lr x2": {"batch_size": "x2", "lr": "x2"},
    "batch 256, lr /2": {"batch_size": "/2", "lr": "/2"},
}
# airbench's pieces, each off (or changed) at a time against an airbench model's recipe. Muon's alternative, SGD at
# airbench94's rates with its triangle and lookahead, is the yardstick itself (bench_versus_airbench); --decoupled is a
# reparametrisation (the same steps for matching values), so it has no accuracy of its own to measure.
AIRBENCH_ABLATIONS = {
    "no whitening (a trainable 2x2 stem)": {"whiten": "off"},
    "no identity initialisation": {"dirac": "off"},
    "BatchNorm weights learn, biases at the head's rate": {"freeze_norm_weights": "off", "norm_bias_lr_scale": "1"},
    "triangle schedule instead of linear": {"scheduler": "triangle"},
    "random flips instead of alternating": {"augment": "light"},
    "lookahead added": {"weight_average": "lookahead"},
    "no label smoothing": {"label_smoothing": "0"},
}
# hiverge's changes to airbench94_muon (hiverge/cifar10-speedrun: 94% in 2.1 s on an A100), each alone against an
# airbench model's recipe. Its own values where they carry over: label smoothing 0.09-0.1, brightness 0.14 and contrast
# 0.13 of a channel's std, the stem bias for 0.19 of an epoch, whitening from 960 images, filters renormalised every 8th
# step and decayed between (its 1.04e-6 x batch 1,536 at Muon's lr 0.205: 2.2e-4 per 1,024 examples, in --decoupled's
# terms).
HIVERGE_CHANGES = {
    "label smoothing 0.1": {"label_smoothing": "0.1"},
    "brightness and contrast jitter": {"augment": "alternating-jitter"},
    "stem bias learns 0.2 epochs": {"whiten_bias_epochs": "0.2"},
    "whitening from 960 images": {"whiten_images": "960"},
    "filters renormalised every 8th step, decayed between": {"muon_renorm_every": "8", "muon_weight_decay": "2.2e-4"},
}
COLUMNS = (
    "variant",
    "seed",
    "epochs",
    "tta",
    "seconds",
    "val_accuracy",
    "val_tta",
    "test_plain",
    "test_flip",
    "test_flip_translate",
    "test_selective",
    "test_tta",
    "first_run",
    "diverged",
)
ACCURACY_COLUMNS = ("val_accuracy", "val_tta", "test_plain", "test_flip", "test_flip_translate", "test_selective")


# Settings with a fixed set of values: a value outside it fails before any training.
CHOICES = {
    "tta": engine.TTA_MODES,
    "augment": AUGMENTATIONS,
    "optimizer": engine.OPTIMIZERS,
    "scheduler": engine.SCHEDULERS,
    "weight_average": engine.WEIGHT_AVERAGES,
}


def setting_value(key: str, text: str, current, kind: type):
    """``text`` as a value of the setting ``key`` (of type ``kind``); x2 and /2 scale the current value."""
    if type(None) in get_args(kind):  # a setting that may be None (int | None): its type
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    if kind not in (int, float, str, bool):
        raise UserError(f"{key} cannot be varied here")
    if key in CHOICES and text not in CHOICES[key]:
        raise UserError(f"{key}={text}: choose one of {', '.join(CHOICES[key])}")
    if text in ("x2", "/2") and kind in (int, float):
        return kind(current * 2 if text == "x2" else current / 2)
    if kind is bool:
        return text.lower() in ("1", "true", "on", "yes")
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{key}={text}: not a valid {kind.__name__}") from None


def apply_settings(config: engine.RunConfig, settings: dict[str, str]) -> engine.RunConfig:
    """``config`` with each setting changed: a recipe field, a model option of the model, or a run setting."""
    recipe_types, run_types = get_type_hints(engine.Recipe), get_type_hints(engine.RunConfig)
    spec = engine.model_spec(config.model)
    recipe_changes, option_changes, run_changes = {}, {}, {}
    for key, value in settings.items():
        option = spec.option(key)
        if key in recipe_types:
            recipe_changes[key] = setting_value(key, value, getattr(config.recipe, key), recipe_types[key])
        elif option is not None:
            option_changes[key] = setting_value(key, value, config.model_options[key], option.kind)
        elif key in run_types and key not in ("recipe", "model_options"):
            run_changes[key] = setting_value(key, value, getattr(config, key), run_types[key])
        else:
            raise UserError(
                f"unknown setting {key!r}; use a recipe field ({', '.join(recipe_types)}), an option of {config.model} "
                f"({', '.join(option.name for option in spec.options) or 'none'}) or precision, compile"
            )
    options = spec.resolve(config.model, {**config.model_options, **option_changes}, "--vary")
    return replace(config, recipe=replace(config.recipe, **recipe_changes), model_options=options, **run_changes)


def parse_vary(items: list[str]) -> list[dict[str, str]]:
    """KEY=V1,V2 ... -> the cross product of all values, one dict per combination."""
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        if not values:
            raise UserError(f"--vary {item}: write KEY=VALUE[,VALUE...], e.g. lr=0.2,0.4")
        axes.append([(key, value) for value in values.split(",")])
    return [dict(combination) for combination in itertools.product(*axes)]


def measure(config: engine.RunConfig, data: engine.SplitData, variant: str, first_run: bool) -> tuple[dict, list[dict]]:
    """Train one run, time it, and measure it; returns the table row and the per-epoch history (none if it diverged:
    then the row says so, and the benchmark goes on with the next run)."""
    started = time.perf_counter()
    run = {
        "variant": variant,
        "seed": config.seed,
        "epochs": config.recipe.epochs,
        "tta": config.recipe.tta,
        "first_run": first_run,
    }
    try:
        fitted = engine.fit(config, engine.model_spec(config.model), data)
    except engine.TrainingDiverged as diverged:
        row = run | {
            "seconds": round(time.perf_counter() - started, 2),
            "diverged": f"the {diverged.loss_name} is {diverged.value:.3g} after epoch {diverged.epoch}",
        }
        print(f"{variant} seed {config.seed}: diverged, {row['diverged']}; the benchmark goes on", flush=True)
        return row, []
    seconds = time.perf_counter() - started
    net = fitted.net.to(fitted.device)  # the data is already there (main moves it once)
    test = accuracy_by_tta(net, data.test_images, data.test_labels, data.mean, data.std, tta="flip-translate")
    row = run | {
        "seconds": round(seconds, 2),
        "val_accuracy": fitted.history[-1]["val_accuracy"],
        "val_tta": accuracy_by_tta(net, data.val_images, data.val_labels, data.mean, data.std, tta=config.recipe.tta)[
            config.recipe.tta
        ],
        "test_plain": test["none"],
        "test_flip": test["flip"],
        "test_flip_translate": test["flip-translate"],
        "test_selective": test["selective"],
        "test_tta": test[config.recipe.tta],
        "diverged": "",
    }
    print(
        f"{variant} seed {config.seed}: {row['epochs']} epochs in {seconds:.1f} s; validation "
        f"{percent(row['val_accuracy'])} ({config.recipe.tta} TTA {row['val_tta']:.4f}); test {row['test_plain']:.4f}, "
        f"with flip TTA {row['test_flip']:.4f}, with flip-translate TTA {row['test_flip_translate']:.4f}",
        flush=True,
    )
    return row, fitted.history


def mean_of(values) -> float | None:
    values = list(values)
    return None if None in values else statistics.mean(values)


def hiverge_changes(base: engine.RunConfig) -> dict[str, dict[str, str]]:
    """hiverge's changes that ``base`` does not already make (Airbench94_muon_narrow has adopted the stem bias's 0.2
    epochs).
    """
    return {name: settings for name, settings in HIVERGE_CHANGES.items() if apply_settings(base, settings) != base}


def write_table(rows: list[dict], out_dir: Path, title: str) -> str:
    engine.write_csv(out_dir / "runs.csv", rows, COLUMNS)
    lines = [
        title,
        "",
        "| variant | seed | epochs | seconds | val acc | val acc (run's TTA) | test acc | test (flip TTA) | test "
        "(flip-translate TTA) | test (selective TTA) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = list(dict.fromkeys(r["variant"] for r in rows))
    for r in sorted(rows, key=lambda r: order.index(r["variant"])):  # run in turns, shown variant by variant
        accuracies = (
            f"diverged: {r['diverged']} |" + " |" * (len(ACCURACY_COLUMNS) - 1)
            if r["diverged"]
            else " | ".join(percent(r[key]) for key in ACCURACY_COLUMNS) + " |"
        )
        lines.append(
            f"| {r['variant']}{' (first run, compiles)' if r['first_run'] else ''} | {r['seed']} | {r['epochs']} "
            f"| {r['seconds']:.1f} | " + accuracies
        )
    finished = [r for r in rows if not r["first_run"] and not r["diverged"]]
    for variant in dict.fromkeys(r["variant"] for r in finished):
        group = [r for r in finished if r["variant"] == variant]
        if len(group) > 1:
            lines.append(
                f"| **{variant}: mean of {len(group)}** | | {group[0]['epochs']} | "
                f"{statistics.mean(r['seconds'] for r in group):.1f} | "
                + " | ".join(percent(mean_of(r[key] for r in group)) for key in ACCURACY_COLUMNS)
                + " |"
            )
    text = "\n".join(lines) + "\n"
    write_atomically(out_dir / "runs.md", lambda tmp: tmp.write_text(text))
    return text


def plot_time_accuracy(curves: list[tuple[str, list[dict], dict]], path: Path, title: str) -> None:
    """Validation accuracy after each epoch against the run's wall time; the final test accuracy (TTA) as a star."""
    figure = Figure(figsize=(8, 5))
    axis = figure.subplots()
    colours = matplotlib.colormaps["tab10"]
    for index, (label, history, row) in enumerate(curves):
        elapsed = list(itertools.accumulate(epoch["seconds"] for epoch in history))
        colour = colours(index % 10)
        measured = [
            (seconds, epoch["val_accuracy"])
            for seconds, epoch in zip(elapsed, history, strict=True)
            if epoch["val_accuracy"] is not None
        ]
        if measured:  # none with --val-every 0
            axis.plot(*zip(*measured, strict=True), marker=".", color=colour, label=f"{label}: validation per epoch")
        axis.plot(
            [row["seconds"]],
            [row["test_tta"]],
            marker="*",
            markersize=12,
            color=colour,
            linestyle="none",
            label=f"{label}: test {row['test_tta']:.2%} ({row['tta']} TTA)",
        )
    axis.axhline(0.93, color="grey", linestyle=":", label="93%")
    axis.set_xlabel("wall-clock seconds of training")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0.5, 1.0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    axis.set_title(title)
    figure.tight_layout()
    engine.save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="FastVGG",
        help="a registered model (python modified_models.py --list), trained with its own recipe (default FastVGG)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run each variant with (default 0 1 2)"
    )
    parser.add_argument(
        "--epochs", type=engine.epoch_count, help="override the recipe's epochs (7.5: a last one in part)"
    )
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also run each ablation: for the airbench models, "
        + "; ".join(AIRBENCH_ABLATIONS)
        + "; for the others, "
        + "; ".join(ABLATIONS),
    )
    parser.add_argument(
        "--hiverge",
        action="store_true",
        help="also run each of hiverge's changes alone that the model does not already have (airbench models only): "
        + "; ".join(HIVERGE_CHANGES),
    )
    parser.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="run every combination of these settings (recipe fields, the model's options, or precision, compile...) "
        "instead of the recipe alone; repeatable",
    )
    engine.add_data_arguments(parser)
    engine.add_device_arguments(parser, distributed=False)
    parser.add_argument(
        "--out-dir",
        default="runs/bench_fast",
        help="folder for the runs, runs.csv, runs.md and the figure (default runs/bench_fast)",
    )
    args = parser.parse_args()

    spec = engine.model_spec(args.model)
    recipe = replace(spec.recipe, epochs=args.epochs or spec.recipe.epochs)
    out_dir = Path(args.out_dir)
    base = engine.RunConfig(
        model=args.model,
        model_options=spec.resolve(args.model, {}, "defaults"),
        recipe=recipe,
        data_dir=args.data_dir,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        limit_train=args.limit_train,
        progress=False,
        analyses={"tsne": False},
    )
    variants = (
        {"recipe": {}}
        if not args.vary
        else {",".join(f"{k}={v}" for k, v in s.items()): s for s in parse_vary(args.vary)}
    )
    if args.ablations:
        variants.update(AIRBENCH_ABLATIONS if spec.option("whiten") else ABLATIONS)
    if args.hiverge:
        if not spec.option("whiten"):
            raise UserError(
                f"--hiverge changes airbench's method; {args.model} is not an airbench model (Airbench94_muon, "
                "Airbench94_muon_narrow)"
            )
        changes = hiverge_changes(base)
        variants.update(changes)
        if len(changes) < len(HIVERGE_CHANGES):
            print(
                f"Already in {args.model}'s recipe, so not run: "
                f"{'; '.join(name for name in HIVERGE_CHANGES if name not in changes)}"
            )
    # bad settings fail before any training
    configs = {name: apply_settings(base, settings) for name, settings in variants.items()}

    device = engine.training_device(args.device)
    data = engine.load_split(base).to(device)  # once, before the clock starts
    print(
        f"Data: {data.source}; {len(data.train_images)} train / {len(data.val_images)} validation / "
        f"{len(data.test_images)} test images"
    )
    precision = engine.resolve_precision(args.precision, engine.resolve_accelerator(args.device))
    varied = {key for settings in variants.values() for key in settings}
    title = (
        f"{args.model}, {device}"
        + ("" if "precision" in varied else f", {precision}")
        + (", compiled" if args.compile and "compile" not in varied else "")
    )
    rows, curves = [], []
    compiled = set()  # precisions already compiled for: later runs reuse the compiled code
    for seed in args.seeds:  # variants interleaved, seed by seed: the machine's drift falls on every variant alike
        for name, config in configs.items():
            first_run = config.compile and config.precision not in compiled
            if config.compile:
                compiled.add(config.precision)
            row, history = measure(
                replace(config, seed=seed, out_dir=str(out_dir / "runs" / f"{len(rows):02d}")), data, name, first_run
            )
            rows.append(row)
            if history:
                curves.append((f"{name}, seed {seed}" + (" (first run)" if first_run else ""), history, row))
            # after every run: an interrupted benchmark keeps what it measured
            table = write_table(rows, out_dir, title)
            plot_time_accuracy(curves, out_dir / "time_accuracy.png", title)
    print(table + f"Written {out_dir}/runs.csv, runs.md and time_accuracy.png")


if __name__ == "__main__":
    engine.run_cli(main)
