"""What Muon's Newton-Schulz iterations cost per training step, in bf16 and in float32, beside the step's forward and
backward.

    python -m benchmarks.bench_newton_schulz --model Airbench94_muon_narrow --width 32
    python -m benchmarks.bench_newton_schulz --model Airbench94_muon --width 64
    python -m benchmarks.bench_newton_schulz --model Airbench94_muon --width 64 --device cuda

Muon orthogonalises every convolution filter's update at every step (engine/optimizers.py). On a GPU and on a CPU with
bf16 instructions (AVX512-BF16, AMX) airbench runs the iterations in bf16; a CPU with AVX2 only emulates bf16, and
the engine then runs them in float32 (``newton_schulz_dtype``). This times, side by side in one process, the
iterations over the model's filters in each dtype (one filter at a time, and those of one shape stacked into one
call, ``--muon-batched``), and one forward and backward pass of a training batch (float32,
and bf16 autocast where the device computes bf16), each the median of --rounds rounds. It says which kind of CPU (or
which GPU) it ran on. Writes runs.csv and runs.md into --out-dir.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import engine
import engine.optimizers as optimizers
import models  # noqa: F401  (registers every model)
from benchmarks.tables import write_runs

COLUMNS = ("what", "dtype", "ms_per_step")


def median_ms(work, rounds: int, repeats: int, device: torch.device) -> float:
    """The median over ``rounds`` of the mean milliseconds of ``repeats`` calls of ``work``, after one warm-up call (on
    a GPU, up to the end of the work queued)."""
    finish = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    work()
    finish()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        finish()
        times.append(1000 * (time.perf_counter() - started) / repeats)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="Airbench94_muon_narrow",
        help="a registered model trained with Muon (default Airbench94_muon_narrow)",
    )
    parser.add_argument("--width", type=engine.positive_int, help="the model's width option (default: the model's own)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to time it (default cpu)")
    parser.add_argument(
        "--rounds", type=engine.positive_int, default=5, help="timed rounds; the median is reported (default 5)"
    )
    parser.add_argument(
        "--out-dir",
        default="runs/bench_newton_schulz",
        help="folder for runs.csv and runs.md (default runs/bench_newton_schulz)",
    )
    args = parser.parse_args()

    spec = engine.model_spec(args.model)
    options = spec.resolve(args.model, {} if args.width is None else {"width": args.width}, "--width")
    device = engine.training_device(args.device)
    net = spec.build(options, 10, args.model).to(device, memory_format=torch.channels_last)
    filters = [p.detach().reshape(len(p), -1) for p in net.parameters() if p.ndim == 4 and p.requires_grad]
    batch = spec.recipe.batch_size
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    if device.type == "cuda":
        bf16, machine = True, f"GPU {torch.cuda.get_device_name(device)}"
    else:
        bf16 = engine.cpu_has_bf16()
        machine = "CPU with " + ("bf16 instructions (AVX512-BF16/AMX)" if bf16 else "no bf16 instructions (AVX2 only)")
    print(
        f"{args.model} {options}: {len(filters)} filters, batch {batch}; {machine}; {torch.get_num_threads()} threads",
        flush=True,
    )

    def training_pass(autocast: bool):
        def work():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(net(images).float(), labels)
            loss.backward()
            net.zero_grad(set_to_none=True)

        return work

    def newton_schulz(dtype: torch.dtype, batched: bool):
        return lambda: optimizers.orthogonalize_each(filters, dtype, batched)

    rows = [
        {
            "what": "Newton-Schulz, every filter" + (", one call per shape (--muon-batched)" if batched else ""),
            "dtype": dtype_name,
            "ms_per_step": median_ms(newton_schulz(dtype, batched), args.rounds, 20, device),
        }
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
        for batched in (False, True)
    ]
    rows.append(
        {
            "what": "forward and backward of a batch",
            "dtype": "float32",
            "ms_per_step": median_ms(training_pass(False), args.rounds, 2, device),
        }
    )
    if bf16:
        rows.append(
            {
                "what": "forward and backward of a batch",
                "dtype": "bf16 autocast",
                "ms_per_step": median_ms(training_pass(True), args.rounds, 2, device),
            }
        )
    text = write_runs(
        Path(args.out_dir),
        rows,
        COLUMNS,
        f"{args.model} {options}, batch {batch}; {machine}; median of {args.rounds} rounds",
        {"what": "l", "dtype": "l", "ms per step": "r"},
        lambda r: [r["what"], r["dtype"], f"{r['ms_per_step']:.2f}"],
    )
    print(text)


if __name__ == "__main__":
    engine.run_cli(main)
