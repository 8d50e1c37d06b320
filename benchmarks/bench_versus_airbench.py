"""Our fast recipe against airbench94 on the same data, device, precision, width and training images, side by side.

    python -m benchmarks.bench_versus_airbench --data-dir ./data --width 32 --seeds 0 1 --precision bf16-mixed
    python -m benchmarks.bench_versus_airbench --data-dir ./data --width 64 --full-train --seeds 0 1
    python -m benchmarks.bench_versus_airbench --data-dir ./data --width 32 --seeds 0 1 --curve   # test accuracy
    against time

For each seed it runs both, one after the other in this process, alternating which goes first so that a machine
whose speed drifts favours neither: the yardstick (``bench_airbench_reference``: airbench94's method outside the
engine, timed as airbench94 times itself, from normalising the data to the end of the final TTA pass) and our recipe
(``--model``, Airbench94_muon by default) trained by ``engine.train`` exactly as ``modified_models.py --model ...
--no-tsne`` trains it, timed over everything that run does: the run folder, the whitening set-up, every epoch's
validation, metrics and checkpoints, the final weights, the test set with the recipe's TTA, test.json and its figure.
The data is loaded once, before either clock starts. Both sides report test accuracy with flip and with
flip-translate TTA and, unless they train on every image, validation accuracy with flip-translate TTA (the same
weights, measured after the clock), wall time, milliseconds per training step, and the
training arithmetic: FLOPs of one training step (forward and backward, torch.utils.flop_counter) times the steps.
The yardstick runs airbench94's settings unless told otherwise: ``--reference-batch-size``, ``--reference-no-dirac``
and ``--reference-lr-scale`` give it the settings its own tuning chose (docs/RESULTS.md). Writes runs.csv and runs.md
into --out-dir.

With ``--curve`` both sides keep their weights after every epoch (ours as a user's ``--keep-epoch-checkpoints`` run
writes them, the yardstick as a copy in memory; each inside its clock) and, after the clock, each epoch's weights are
measured on the test set with flip-translate TTA: test accuracy against the seconds on the clock when the epoch ended,
in curve.csv and time_to_accuracy.png, so each method's accuracy at every time budget can be read off.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode

import engine
import models  # noqa: F401  (registers every model)
from benchmarks import bench_airbench_reference as reference
from benchmarks.accuracy import accuracy_by_tta
from benchmarks.tables import percent
from engine import write_atomically

COLUMNS = (
    "method",
    "seed",
    "width",
    "train_images",
    "epochs",
    "batch_size",
    "precision",
    "seconds",
    "steps",
    "ms_per_step",
    "training_pflops",
    "val_flip_translate",
    "test_flip",
    "test_flip_translate",
)
CURVE_COLUMNS = ("method", "seed", "epoch", "seconds", "test_flip_translate")


def training_step_flops(net: torch.nn.Module, batch_size: int, device: torch.device) -> int:
    """FLOPs of one training step of ``net`` on a batch: the forward and the backward pass (the optimiser's are not
    counted).
    """
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    net = net.to(device).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(images), labels).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def curve_points(
    method: str,
    seed: int,
    net: torch.nn.Module,
    snapshots: list[tuple[int, float, dict]],
    data: engine.SplitData,
    precision: str,
    device: torch.device,
) -> list[dict]:
    """Test accuracy (flip-translate TTA) of the weights after each epoch, measured after the clock:
    curve.csv's rows."""
    points = []
    for epoch, seconds, weights in snapshots:
        net.load_state_dict(weights)
        with engine.autocast_for(precision, device):
            test = accuracy_by_tta(
                net.to(device), data.test_images, data.test_labels, data.mean, data.std, tta="flip-translate"
            )
        points.append(
            {
                "method": method,
                "seed": seed,
                "epoch": epoch,
                "seconds": round(seconds, 1),
                "test_flip_translate": test["flip-translate"],
            }
        )
    return points


def run_reference(
    data: engine.SplitData, seed: int, args: argparse.Namespace, precision: str, device: torch.device
) -> tuple[dict, list[dict]]:
    snapshots = [] if args.curve else None
    row = reference.train_and_test(
        data,
        seed,
        args.reference_epochs,
        args.width,
        args.reference_batch_size,
        device,
        precision,
        args.compile,
        dirac=args.reference_dirac,
        lr_scale=args.reference_lr_scale,
        snapshots=snapshots,
    )
    steps = math.ceil(len(data.train_images) // args.reference_batch_size * args.reference_epochs)
    # counts the FLOPs, then takes each epoch's weights
    net = reference.airbench_net(args.width, torch.randn(8, 3, 32, 32), args.reference_dirac)
    flops = training_step_flops(net, args.reference_batch_size, device)
    tuned = args.reference_batch_size != 1024 or not args.reference_dirac or args.reference_lr_scale != 1
    method = "airbench94 (yardstick" + (", tuned)" if tuned else ")")
    return (
        {
            "method": method,
            "seed": seed,
            "width": args.width,
            "train_images": row["train_images"],
            "epochs": row["epochs"],
            "batch_size": row["batch_size"],
            "precision": precision,
            "seconds": row["seconds"],
            "steps": steps,
            "ms_per_step": round(1000 * row["seconds"] / steps, 1),
            "training_pflops": round(flops * steps / 1e15, 4),
            "val_flip_translate": row["val_flip_translate"],
            "test_flip": row["test_flip"],
            "test_flip_translate": row["test_flip_translate"],
        },
        curve_points(method, seed, net, snapshots or [], data, precision, device),
    )


def run_ours(
    data: engine.SplitData, seed: int, args: argparse.Namespace, precision: str, device: torch.device
) -> tuple[dict, list[dict]]:
    spec = engine.model_spec(args.model)
    options = spec.resolve(args.model, {"width": args.width}, "--width")
    recipe = replace(spec.recipe, epochs=args.epochs or spec.recipe.epochs)
    config = engine.RunConfig(
        model=args.model,
        model_options=options,
        recipe=recipe,
        out_dir=str(Path(args.out_dir) / "runs" / f"ours-seed{seed}"),
        seed=seed,
        device=args.device,
        precision=precision,
        compile=args.compile,
        progress=False,
        analyses={"tsne": False},
        validation=not args.full_train,
        overwrite=True,
        keep_epoch_checkpoints=args.curve,
    )
    wall_started, started = time.time(), time.perf_counter()
    engine.train(config, spec, data=data)  # the whole run a user's command makes (with --no-tsne)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    net = spec.build(options)
    net.load_state_dict(torch.load(Path(config.out_dir) / "model.pth", map_location=device, weights_only=True))
    with engine.autocast_for(precision, device):  # as the run's own test pass, and the yardstick's
        test = accuracy_by_tta(
            net.to(device), data.test_images, data.test_labels, data.mean, data.std, tta="flip-translate"
        )
        val = (
            accuracy_by_tta(net, data.val_images, data.val_labels, data.mean, data.std, tta="flip-translate")[
                "flip-translate"
            ]
            if len(data.val_images)
            else None
        )
    steps = recipe.training_steps(math.ceil(len(data.train_images) / recipe.batch_size))
    flops = training_step_flops(spec.build(options), recipe.batch_size, device)
    method = f"{args.model} (ours)"
    # each epoch's checkpoint as the run wrote it, at the moment the file was written
    snapshots = [
        (
            int(path.stem.removeprefix("epoch-")),
            path.stat().st_mtime - wall_started,
            engine.weights_in(engine.read_checkpoint(path), path),
        )
        for path in sorted(Path(config.out_dir).glob("epoch-*.ckpt"))
    ]
    return (
        {
            "method": method,
            "seed": seed,
            "width": args.width,
            "train_images": len(data.train_images),
            "epochs": recipe.epochs,
            "batch_size": recipe.batch_size,
            "precision": precision,
            "seconds": round(seconds, 1),
            "steps": steps,
            "ms_per_step": round(1000 * seconds / steps, 1),
            "training_pflops": round(flops * steps / 1e15, 4),
            "val_flip_translate": val,
            "test_flip": test["flip"],
            "test_flip_translate": test["flip-translate"],
        },
        curve_points(method, seed, net, snapshots, data, precision, device),
    )


def plot_time_to_accuracy(points: list[dict], path: Path, title: str) -> None:
    """Test accuracy after each epoch against the seconds on the method's clock: a line per method and seed."""
    figure = Figure(figsize=(8, 5))
    axis = figure.subplots()
    # tab10 has more colours than methods
    colours = dict(zip(dict.fromkeys(p["method"] for p in points), matplotlib.colormaps["tab10"].colors, strict=False))
    for (method, seed), run in itertools.groupby(points, key=lambda p: (p["method"], p["seed"])):
        run = list(run)
        axis.plot(
            [p["seconds"] for p in run],
            [p["test_flip_translate"] for p in run],
            marker=".",
            color=colours[method],
            label=f"{method}, seed {seed}: {run[-1]['test_flip_translate']:.2%} at {run[-1]['seconds']:.0f} s",
        )
    axis.set_xlabel("seconds on the method's clock at the end of the epoch")
    axis.set_ylabel("test accuracy (flip-translate TTA)")
    axis.set_ylim(0.5, 1.0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    engine.save_figure(figure, path)


def write_tables(rows: list[dict], out_dir: Path, title: str) -> str:
    engine.write_csv(out_dir / "runs.csv", rows, COLUMNS)
    lines = [
        title,
        "",
        "| method | seed | images | epochs | batch | seconds | ms/step | training PFLOPs | validation (flip-translate "
        "TTA) | test (flip TTA) | test (flip-translate TTA) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['train_images']:,} | {r['epochs']} | {r['batch_size']} | "
            f"{r['seconds']:.1f} | {r['ms_per_step']:.1f} | {r['training_pflops']:.4f} | "
            f"{percent(r['val_flip_translate'])} | {r['test_flip']:.2%} | {r['test_flip_translate']:.2%} |"
        )
    means = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        means[method] = {
            key: statistics.mean(r[key] for r in group) for key in ("seconds", "test_flip", "test_flip_translate")
        }
        validated = [r["val_flip_translate"] for r in group if r["val_flip_translate"] is not None]
        lines.append(
            f"| **{method}: mean of {len(group)}** | | | | | {means[method]['seconds']:.1f} | | | "
            f"{percent(statistics.mean(validated) if validated else None)} | {means[method]['test_flip']:.2%} | "
            f"{means[method]['test_flip_translate']:.2%} |"
        )
    if len(means) == 2:
        (ref, ref_mean), (ours, ours_mean) = means.items()
        lines += [
            "",
            f"time ratio ours / yardstick: {ours_mean['seconds'] / ref_mean['seconds']:.2f}x; accuracy "
            "difference (flip-translate): "
            f"{100 * (ours_mean['test_flip_translate'] - ref_mean['test_flip_translate']):+.2f} points",
        ]
    text = "\n".join(lines) + "\n"
    write_atomically(out_dir / "runs.md", lambda tmp: tmp.write_text(text))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="Airbench94_muon", help="our recipe: a registered airbench model (default Airbench94_muon)"
    )
    parser.add_argument(
        "--width",
        type=engine.positive_int,
        default=64,
        help="channels of the first stage, the others 4x, both sides (default 64)",
    )
    parser.add_argument("--seeds", type=engine.non_negative_int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
    parser.add_argument(
        "--epochs", type=engine.epoch_count, help="our recipe's epochs (default: its own; 7.5: a last one in part)"
    )
    parser.add_argument(
        "--reference-epochs",
        type=engine.positive_float,
        default=9.9,
        help="the yardstick's epochs (default 9.9, airbench94's)",
    )
    parser.add_argument(
        "--reference-batch-size", type=engine.positive_int, default=1024, help="the yardstick's batch (default 1024)"
    )
    parser.add_argument(
        "--reference-no-dirac",
        dest="reference_dirac",
        action="store_false",
        help="the yardstick without identity initialisation (default: with it, airbench94's)",
    )
    parser.add_argument(
        "--reference-lr-scale",
        type=engine.positive_float,
        default=1.0,
        help="multiplies the yardstick's learning rates (default 1, airbench94's)",
    )
    parser.add_argument(
        "--full-train", action="store_true", help="both train on all 50,000 training images (ours with --no-validation)"
    )
    parser.add_argument(
        "--only", choices=("both", "ours", "reference"), default="both", help="run one side only (default both)"
    )
    parser.add_argument(
        "--warm-up",
        action=argparse.BooleanOptionalAction,
        help="run each side once before the timed runs, unreported: on a GPU the first run compiles (--compile) and "
        "chooses convolution algorithms, as airbench's warm-up does (default: on a GPU only)",
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="also measure each epoch's weights on the test set, after the clock: "
        "test accuracy against time, in curve.csv and time_to_accuracy.png",
    )
    engine.add_data_arguments(parser, limit_train=False)
    engine.add_device_arguments(parser, distributed=False)
    parser.add_argument(
        "--out-dir", default="runs/bench_versus_airbench", help="folder for runs.csv, runs.md and our run folders"
    )
    args = parser.parse_args()

    device = engine.training_device(args.device)
    precision = reference.yardstick_precision(args.precision, args.device)
    torch.backends.cudnn.benchmark = True  # for both sides, as airbench94 does
    arrays = engine.load_dataset(args.data_dir, args.num_workers)
    # loaded before either clock starts
    data = engine.SplitData.from_arrays(arrays, validation=not args.full_train).to(device)
    print(
        f"Data: {data.source}; {len(data.train_images)} train / {len(data.test_images)} test images; {device}, "
        f"{precision}"
    )
    sides = {"reference": run_reference, "ours": run_ours}
    if args.only != "both":
        sides = {args.only: sides[args.only]}
    title = (
        f"{args.model} against airbench94, width {args.width}, {len(data.train_images):,} training images, "
        f"{device}, {precision}" + (", compiled" if args.compile else "")
    )
    if args.warm_up if args.warm_up is not None else device.type == "cuda":
        for side in sides.values():
            side(data, args.seeds[0], args, precision, device)
        print("warm-up done: each side ran once, unreported", flush=True)
    rows, points, out_dir = [], [], Path(args.out_dir)
    for index, seed in enumerate(args.seeds):
        order = list(sides.values()) if index % 2 == 0 else list(reversed(sides.values()))  # alternate who goes first
        for side in order:
            row, curve = side(data, seed, args, precision, device)
            rows.append(row)
            print(
                f"{row['method']} seed {seed}: {row['seconds']:.1f} s, test with flip TTA {row['test_flip']:.4f}, "
                f"flip-translate {row['test_flip_translate']:.4f}",
                flush=True,
            )
            table = write_tables(rows, out_dir, title)
            if args.curve:
                points += curve
                engine.write_csv(out_dir / "curve.csv", points, CURVE_COLUMNS)
                plot_time_to_accuracy(points, out_dir / "time_to_accuracy.png", title)
    print(table)


if __name__ == "__main__":
    engine.run_cli(main)
