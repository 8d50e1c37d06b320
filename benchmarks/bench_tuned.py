"""A study of a model other than the study's, then its winner against the model's own recipe, side by side.

    python -m benchmarks.bench_tuned --data-dir ./data [--model FastVGG_narrow]
        [--space benchmarks/fastvgg_narrow_space.json] [--n-trials 16] [--epochs 3] [--limit-train 10000] [--seeds 1 2]

1. The search, as a user runs it: ``hyperparameter_tune.py --model M --space FILE --n-trials N --epochs E
   --limit-train L --seed 0``: short trials on a subset of the training split, scored on the validation split.
2. The comparison, on seeds the search never used: for each seed, ``modified_models.py --model M`` with the model's own
   recipe and with the winner's parameters as flags (its options and recipe fields from best_params.json), each for
   the recipe's epochs on the whole training split, taking turns so that a slower spell of the machine falls on both.
Writes runs.csv and runs.md (a table per run: seed, recipe, validation and test accuracy, wall time) in --out-dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import engine
from benchmarks.tables import percent, write_runs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = Path(__file__).with_name("fastvgg_narrow_space.json")
COLUMNS = ("seed", "recipe", "val_accuracy", "test_accuracy", "seconds", "flags")


def run(command: list[str]) -> float:
    """Run a script of the project to its end; its wall time."""
    print("$ " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    return time.perf_counter() - started


def winner_flags(best: dict) -> list[str]:
    """The winner's parameters as the flags modified_models.py takes (beta1 and beta2 as --betas)."""
    params = dict(best["params"])
    flags = []
    if "beta1" in params or "beta2" in params:
        betas = best["recipe"]["betas"]
        flags += ["--betas", str(params.pop("beta1", betas[0])), str(params.pop("beta2", betas[1]))]
    for name, value in params.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag if value is True else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_data_arguments(parser, limit_train=False)
    parser.add_argument("--model", default="FastVGG_narrow", help="the model to tune (default FastVGG_narrow)")
    parser.add_argument("--space", default=str(DEFAULT_SPACE), help=f"the search space (default {DEFAULT_SPACE.name})")
    parser.add_argument("--n-trials", type=engine.positive_int, default=16, help="trials of the search (default 16)")
    parser.add_argument("--epochs", type=engine.positive_int, default=3, help="epochs per trial (default 3)")
    parser.add_argument(
        "--limit-train", type=engine.positive_int, default=10000, help="training images per trial (default 10000)"
    )
    parser.add_argument(
        "--seeds", type=engine.non_negative_int, nargs="+", default=[1, 2], help="held-out seeds (default 1 2)"
    )
    parser.add_argument("--precision", default="auto", help="the comparison's --precision (default auto)")
    parser.add_argument("--out-dir", default="runs/bench_tuned", help="folder of it all (default runs/bench_tuned)")
    args = parser.parse_args()
    if 0 in args.seeds:
        raise engine.UserError("--seeds: seed 0 is the search's own; compare on seeds it never used")
    out = Path(args.out_dir)
    study = out / "study"
    common = ["--data-dir", args.data_dir, "--num-workers", str(args.num_workers), "--no-tsne"]
    search = [
        *("--model", args.model, "--space", args.space, "--n-trials", str(args.n_trials), "--epochs", str(args.epochs)),
        *("--limit-train", str(args.limit_train), "--seed", "0", "--out-dir", str(study)),
    ]
    search_seconds = run([sys.executable, "hyperparameter_tune.py", *search, *common])
    best = json.loads((study / "best_params.json").read_text())
    recipes = {"own": [], "tuned": winner_flags(best)}
    rows = []
    for seed in args.seeds:
        for recipe, flags in recipes.items():
            run_dir = out / f"{recipe}-seed{seed}"
            command = [sys.executable, "modified_models.py", "--model", args.model, *flags, *common]
            command += ["--seed", str(seed), "--precision", args.precision, "--out-dir", str(run_dir), "--overwrite"]
            seconds = run(command)
            report = json.loads((run_dir / "test.json").read_text())
            rows.append(
                {
                    "seed": seed,
                    "recipe": recipe,
                    "val_accuracy": report["final_val_accuracy"],
                    "test_accuracy": report["test_accuracy"],
                    "seconds": round(seconds, 1),
                    "flags": " ".join(flags),
                }
            )
    winner = " ".join(recipes["tuned"])
    title = (
        f"{args.model}: its own recipe against the winner of {args.n_trials} trials of {args.epochs} epochs on "
        f"{args.limit_train} images ({search_seconds / 60:.1f} min; trial {best['trial']}: {winner})"
    )
    table = write_runs(
        out,
        rows,
        COLUMNS,
        title,
        {"seed": "r", "recipe": "l", "validation accuracy": "r", "test accuracy": "r", "wall time": "r"},
        lambda row: [
            str(row["seed"]),
            row["recipe"],
            percent(row["val_accuracy"]),
            percent(row["test_accuracy"]),
            f"{row['seconds']:.0f} s",
        ],
    )
    print(table)
    for recipe in recipes:
        accuracies = [row["test_accuracy"] for row in rows if row["recipe"] == recipe]
        print(f"{recipe}: mean test accuracy {percent(statistics.mean(accuracies))} over seeds {args.seeds}")


if __name__ == "__main__":
    engine.run_cli(main)
