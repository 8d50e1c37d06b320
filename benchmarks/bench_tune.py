"""The study's study with pruning against the same number of trials without it, side by side.

    python -m benchmarks.bench_tune --data-dir ./data [--n-trials 30] [--epochs 5]

Runs hyperparameter_tune.py twice at the same time, side by side, one CPU thread each, on the same
data, seed and search space: once with the median pruner and once with --pruner none, each in its own
folder under --out-dir. Prints each study's wall time, epochs trained and best validation loss.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import engine

SCRIPT = Path(__file__).resolve().parents[1] / "hyperparameter_tune.py"


def study_summary(out_dir: Path, seconds: float) -> str:
    with open(out_dir / "trials.csv", newline="") as handle:
        trials = list(csv.DictReader(handle))
    best = json.loads((out_dir / "best_params.json").read_text())
    states = {state: sum(t["state"] == state for t in trials) for state in ("COMPLETE", "PRUNED", "FAIL")}
    epochs = sum(int(t["epochs_run"] or 0) for t in trials)
    return (
        f"{len(trials)} trials ({states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed), "
        f"{epochs} epochs trained, {seconds / 60:.1f} min wall; best validation loss {best['val_loss']:.4f} "
        f"(trial {best['trial']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_data_arguments(parser, limit_train=False)
    parser.add_argument(
        "--out-dir", default="runs/bench_tune", help="folder for the two studies (default runs/bench_tune)"
    )
    parser.add_argument("--n-trials", type=engine.positive_int, default=30, help="trials per study (default 30)")
    parser.add_argument("--epochs", type=engine.positive_int, default=5, help="epochs per trial (default 5)")
    parser.add_argument("--seed", type=engine.non_negative_int, default=0, help="seed of both studies (default 0)")
    args = parser.parse_args()
    studies = {"pruned": [], "no-prune": ["--pruner", "none"]}
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")  # one core each: neither study slows the other
    started = time.perf_counter()
    workers = {}
    for label, extra in studies.items():
        out_dir = Path(args.out_dir) / label
        out_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            str(SCRIPT),
            "--data-dir",
            args.data_dir,
            "--num-workers",
            str(args.num_workers),
            "--out-dir",
            str(out_dir),
            "--n-trials",
            str(args.n_trials),
            "--epochs",
            str(args.epochs),
            "--seed",
            str(args.seed),
            *extra,
        ]
        workers[label] = subprocess.Popen(
            command, env=one_thread, stdout=open(out_dir / "log.txt", "w"), stderr=subprocess.STDOUT
        )
    seconds = {}
    while len(seconds) < len(workers):
        for label, worker in workers.items():
            if label not in seconds and worker.poll() is not None:
                seconds[label] = time.perf_counter() - started
                if worker.returncode:
                    raise engine.UserError(f"the {label} study failed; see {Path(args.out_dir) / label / 'log.txt'}")
        time.sleep(1)
    for label in studies:
        print(f"{label:>9}: {study_summary(Path(args.out_dir) / label, seconds[label])}")


if __name__ == "__main__":
    engine.run_cli(main)
