"""Where a run computes: the accelerator, the precision that pays on it, which process owns the run, and how the
processes of a data-parallel run wait for each other."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

from engine.errors import ProcessLost, UserError

if TYPE_CHECKING:  # the parser loads this module: Lightning loads on first use (engine.ON_FIRST_USE)
    from lightning.pytorch.strategies import Strategy


def resolve_accelerator(device: str) -> str:
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return "gpu"
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def training_device(device: str) -> torch.device:
    """The device Lightning picks for ``--device`` (auto: cuda, else mps, else cpu)."""
    accelerator = resolve_accelerator(device)
    if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without, PyTorch emulates it, slowly."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def warn_emulated_bf16() -> None:
    print(
        "warning: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 is emulated and training runs many "
        "times slower than in float32; use --precision 32-true",
        file=sys.stderr,
    )


def resolve_precision(precision: str, accelerator: str) -> str:
    """--precision; auto: bf16 mixed precision on a GPU that computes bf16 (Ampere and later), fp16 mixed precision with
    loss scaling on an older one (a T4, say, where bf16 is emulated), float32 on a CPU."""
    device_type = training_device(accelerator).type
    if precision == "auto":
        if device_type != "cuda":
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision.startswith("bf16") and device_type == "cpu" and not cpu_has_bf16():
        warn_emulated_bf16()
    return precision


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast that Lightning runs a ``precision`` (as resolve_precision gives it) under, for the passes made
    outside the Trainer: the test set after training is measured at the precision the run trained and validated at (in
    float32 it added about 15 s to a 3-minute bf16 run on a CPU with AMX, docs/RESULTS.md). The -true precisions keep
    the weights in their own dtype."""
    dtypes = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    if precision not in dtypes:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtypes[precision])


def is_first_on_its_node() -> bool:
    """Whether this process speaks for its node: one line per node's log when a data-parallel run fails (a node whose
    peer was lost may be any node)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def is_main_process() -> bool:
    """False in the extra processes of data-parallel training (Lightning, torchrun and SLURM set these): the first one
    owns the run.
    """
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def bound_collectives(strategy: Strategy, seconds: float) -> None:
    """--collective-timeout: Lightning's data-parallel strategies take the timeout of their collective operations
    (PyTorch's 30 minutes by default) only as an argument of their constructor, which a strategy named by --strategy
    (or chosen by auto) never gets; it is read when the processes connect, in fit. (tests/test_faults_runs.py freezes
    a node under a 20 s timeout: it fails if Lightning renames the attribute.)"""
    if hasattr(strategy, "_timeout"):
        strategy._timeout = timedelta(seconds=seconds)


def destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@functools.cache
def destroy_process_group_at_exit() -> None:
    """After a data-parallel fit that ended well: the process group is destroyed at exit, while the interpreter is
    whole. Lightning does so for NCCL only; a gloo group left to the interpreter's shutdown can abort a finished run's
    process ("terminate called without an active exception", exit status -6, seen in CI). Not after a failed fit:
    there a collective may still wait on a lost peer, and destroying the group would wait with it."""
    atexit.register(destroy_process_group)


# gloo's own words for a lost or silent peer. Most of its errors start with their source file (".../gloo/...cc:N]"),
# but some do not: "Application timeout caused pair closure" is how a timeout ends a connection that waits on a frozen
# node, and it raced the recv timeout in CI (which of the two arrives first varies from run to run).
GLOO_PEER_LOST = ("pair closure", "Connection closed by peer", "Socket closed", "Socket unexpectedly closed")


def lost_process(error: RuntimeError, timeout: float, nodes: int) -> ProcessLost | None:
    """A failed collective operation as ``ProcessLost`` (what PyTorch says happened, without its source location and
    advice); None for any other error. gloo raises a plain RuntimeError that names it or says one of
    ``GLOO_PEER_LOST``, NCCL and the rendezvous a DistError."""
    text = str(error).strip()
    distributed = torch.distributed.is_available() and isinstance(error, torch.distributed.DistError)
    if not distributed and "gloo" not in text and not any(words in text for words in GLOO_PEER_LOST):
        return None
    what = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(error).__name__).split(". ")[0]
    return ProcessLost(
        what.rstrip("."), re.search(r"timed out|timeout", text, re.IGNORECASE) is not None, timeout, nodes
    )
