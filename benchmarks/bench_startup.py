"""How long each script takes to answer --help and a flag mistake: this checkout against another one, side by side.

    git worktree add /tmp/before <an earlier commit>
    python -m benchmarks.bench_startup --before /tmp/before --rounds 5

A user meets this time at every --help and every mistyped flag. Each round runs every script, in both checkouts, with
``--help`` and with a flag it does not have, each as ``python SCRIPT ...`` in a new process with this Python; the
order of the two checkouts alternates from round to round, so a machine whose speed drifts favours neither. One
untimed round first warms the disk cache (the figures are warm starts; a first start after a reboot is slower for
both). Reports the median wall seconds of each and the ratio. Run it with nothing else running. Writes runs.csv and
runs.md into --out-dir.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import engine
from benchmarks.tables import write_runs
from engine import UserError

SCRIPTS = (
    "main.py",
    "modified_models.py",
    "hyperparameter_tune.py",
    "transfer_learning.py",
    "predict.py",
    "evaluate.py",
    "tsne.py",
    "export.py",
)
CASES = {"--help": ["--help"], "a flag mistake": ["--no-such-flag"]}
HERE = Path(__file__).resolve().parent.parent
COLUMNS = ("script", "case", "before_s", "now_s", "ratio")


def seconds_to_answer(checkout: Path, script: str, args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, script, *args], cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--before",
        required=True,
        type=Path,
        help="a checkout of the commit to compare with (git worktree add DIR COMMIT)",
    )
    parser.add_argument(
        "--rounds", type=engine.positive_int, default=5, help="timed rounds; the medians are reported (default 5)"
    )
    parser.add_argument(
        "--scripts", nargs="+", choices=SCRIPTS, default=list(SCRIPTS), help="scripts to time (default all)"
    )
    parser.add_argument(
        "--out-dir", default="runs/bench_startup", help="folder for runs.csv and runs.md (default runs/bench_startup)"
    )
    args = parser.parse_args()
    if not all((args.before / script).is_file() for script in args.scripts):
        raise UserError(
            f"--before {args.before} is not a checkout of this project (no {', '.join(args.scripts)}); make one with "
            "git worktree add DIR COMMIT"
        )

    checkouts = {"before": args.before.resolve(), "now": HERE}
    times = {(name, script, case): [] for name in checkouts for script in args.scripts for case in CASES}
    for round_number in range(args.rounds + 1):  # round 0 warms the disk cache and is not counted
        order = list(checkouts.items()) if round_number % 2 else list(reversed(checkouts.items()))
        for script in args.scripts:
            for case, case_args in CASES.items():
                for name, checkout in order:
                    seconds = seconds_to_answer(checkout, script, case_args)
                    if round_number:
                        times[name, script, case].append(seconds)
        if round_number:
            print(f"round {round_number} of {args.rounds} done", flush=True)

    rows = []
    for script in args.scripts:
        for case in CASES:
            before, now = (statistics.median(times[name, script, case]) for name in checkouts)
            rows.append(
                {
                    "script": script,
                    "case": case,
                    "before_s": round(before, 2),
                    "now_s": round(now, 2),
                    "ratio": round(now / before, 2),
                }
            )
    text = write_runs(
        Path(args.out_dir),
        rows,
        COLUMNS,
        f"Median of {args.rounds} warm starts, seconds; before: {args.before}",
        {"script": "l", "case": "l", "before": "r", "now": "r", "now / before": "r"},
        lambda r: [r["script"], r["case"], f"{r['before_s']:.2f}", f"{r['now_s']:.2f}", f"{r['ratio']:.2f}x"],
    )
    print(text)


if __name__ == "__main__":
    engine.run_cli(main)
