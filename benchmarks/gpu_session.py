"""Every GPU measurement of the fast recipe in one short session: what a lent GPU machine runs, once, in a few minutes.

    python -m benchmarks.gpu_session --data-dir <JPEG copy> --out-dir <folder>

In order, each in a process of its own with its own log, so that a step that fails is recorded and the others still run:

    versus-compiled   ours against the yardstick, width 64, all 50,000 training images, bf16, torch.compile, --seeds,
                      with the time-to-accuracy curve; each side's first run (compiling, choosing convolution
                      algorithms) is a warm-up, not reported, as airbench times itself
    versus-eager      the same without torch.compile, the first two seeds
    profile           one run of ours (modified_models.py --model Airbench94_muon --no-validation --profile):
      Lightning's
                      SimpleProfiler, where each step's time goes (fetching the batch, forward and backward, optimiser)
    newton-schulz     Muon's Newton-Schulz iterations against one training step, bf16 and float32

summary.md gathers each step's command, exit status, wall time and results (the tables, the profile, the log's end for
a step that failed): the one file to bring back. On the CPU, with a small --width and --epochs, the same session
checks the script itself (tests/test_gpu_session.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import engine
from engine import write_atomically

REPO = Path(__file__).resolve().parents[1]
STEP_TIMEOUT = 1800  # seconds: a step that hangs ends, and the session goes on


def steps(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each step's command line, by name."""
    out = Path(args.out_dir)
    common = ["--data-dir", args.data_dir, "--device", args.device, "--precision", args.precision]
    versus = [
        sys.executable,
        "-m",
        "benchmarks.bench_versus_airbench",
        *common,
        "--model",
        "Airbench94_muon",
        "--width",
        str(args.width),
        "--full-train",
        "--warm-up",
        "--reference-batch-size",
        str(args.reference_batch_size),
        *([] if args.epochs is None else ["--epochs", str(args.epochs), "--reference-epochs", str(args.epochs)]),
    ]
    return {
        "versus-compiled": [
            *versus,
            "--compile",
            "--curve",
            "--seeds",
            *map(str, args.seeds),
            "--out-dir",
            str(out / "versus-compiled"),
        ],
        "versus-eager": [*versus, "--seeds", *map(str, args.seeds[:2]), "--out-dir", str(out / "versus-eager")],
        "profile": [
            sys.executable,
            str(REPO / "modified_models.py"),
            *common,
            "--model",
            "Airbench94_muon",
            "--width",
            str(args.width),
            "--no-validation",
            "--profile",
            "--no-tsne",
            "--logger",
            "none",
            "--overwrite",
            "--out-dir",
            str(out / "profile"),
            *([] if args.epochs is None else ["--epochs", str(args.epochs)]),
        ],
        "newton-schulz": [
            sys.executable,
            "-m",
            "benchmarks.bench_newton_schulz",
            "--model",
            "Airbench94_muon",
            "--width",
            str(args.width),
            "--device",
            args.device,
            "--out-dir",
            str(out / "newton-schulz"),
        ],
    }


def results(name: str, out: Path) -> str:
    """What a step measured, as summary.md shows it."""
    files = {"profile": out / "profile" / "fit-profile.txt"}.get(name, out / name / "runs.md")
    if not files.is_file():
        return "(no results written)\n"
    text = files.read_text()
    return f"```\n{text}```\n" if name == "profile" else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", required=True, help="the data (the JPEG copy unpacked, or CIFAR-10's official files)"
    )
    parser.add_argument(
        "--out-dir",
        default="runs/gpu_session",
        help="folder for every step's results and summary.md (default runs/gpu_session)",
    )
    parser.add_argument("--device", default="cuda", help="where to run (default cuda; cpu checks the script)")
    parser.add_argument("--precision", default="bf16-mixed", help="both sides' precision (default bf16-mixed)")
    parser.add_argument(
        "--width", type=engine.positive_int, default=64, help="both sides' width (default 64, airbench's)"
    )
    parser.add_argument(
        "--seeds",
        type=engine.non_negative_int,
        nargs="+",
        default=[0, 1, 2, 3],
        help="seeds of the compiled side by side (default 0 1 2 3); the eager one runs the first two",
    )
    parser.add_argument(
        "--reference-batch-size",
        type=engine.positive_int,
        default=1024,
        help="the yardstick's batch (default 1024, airbench94's)",
    )
    parser.add_argument(
        "--epochs",
        type=engine.positive_int,
        help="both sides' epochs, for checking the script (default: each method's own)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("versus-compiled", "versus-eager", "profile", "newton-schulz"),
        help="run these steps only (default all)",
    )
    args = parser.parse_args()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = [f"# GPU session: {' '.join(sys.argv[1:])}", ""]
    for name, command in steps(args).items():
        if args.only and name not in args.only:
            continue
        print(f"{name}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            try:
                status = subprocess.run(
                    command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=STEP_TIMEOUT
                ).returncode
            except subprocess.TimeoutExpired:
                status = f"stopped after {STEP_TIMEOUT} s"
        seconds = time.perf_counter() - started
        print(f"{name}: exit {status}, {seconds:.0f} s", flush=True)
        summary += [f"## {name}: exit {status}, {seconds:.0f} s", "", f"`{' '.join(command)}`", "", results(name, out)]
        if status != 0:
            summary += ["End of its log:", "", "```", *(out / f"{name}.log").read_text().splitlines()[-30:], "```", ""]
        text = "\n".join(summary) + "\n"
        # after every step: a session cut short keeps what it did
        write_atomically(out / "summary.md", partial(Path.write_text, data=text))
    print(f"Written {out}/summary.md")


if __name__ == "__main__":
    engine.run_cli(main)
