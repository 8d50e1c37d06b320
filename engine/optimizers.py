"""Muon for convolution filters, Nesterov SGD for everything else, in one optimiser (airbench94_muon's pair).

Muon (Keller Jordan, 2024) replaces a filter's momentum update by the nearest orthogonal matrix (a few Newton-Schulz
iterations), so every direction of the filter moves at the same rate. ``torch.optim.Muon`` (torch 2.9+) does not serve
here: it takes 2-D parameters only, Lightning's automatic optimisation takes one optimiser where airbench pairs Muon
with SGD, and airbench's Muon also renormalises each filter before its step. So the few lines are written here; a
group marked ``orthogonalize`` gets Muon, every other group Nesterov SGD with its own weight decay.
"""

from __future__ import annotations

import torch

from engine.devices import cpu_has_bf16

# Newton-Schulz quintic coefficients chosen for the steepest slope at zero (Keller Jordan's): three iterations
# leave singular values roughly in [0.5, 1.5], which trains as well as exact orthogonalisation.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 3


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16, as airbench, where the device computes it natively (a GPU from Ampere on; a CPU with AVX512-BF16 or AMX);
    float32 elsewhere, where bf16 would be emulated: on a CPU with AVX2 only, the iterations cost several times more
    in bf16 than in float32 (docs/RESULTS.md, "CPUs without bf16")."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32


def orthogonalize(
    matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``matrix`` with its singular values pushed towards 1 (U V^T of its SVD, approximately), computed in ``dtype``;
    given a stack of matrices (the last two dimensions), each of them."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(dtype)
    # the largest singular value at most 1, where the iteration converges
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(matrix.dtype)


def orthogonalize_each(matrices: list[torch.Tensor], dtype: torch.dtype, batched: bool = False) -> list[torch.Tensor]:
    """``orthogonalize`` of every matrix: one at a time, or (``batched``, hiverge's) those of one shape stacked into one
    call, the same arithmetic in fewer, larger products (fewer kernel launches on a GPU)."""
    if not batched:
        return [orthogonalize(matrix, dtype=dtype) for matrix in matrices]
    result: list[torch.Tensor] = [torch.empty(0)] * len(matrices)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, matrix in enumerate(matrices):
        by_shape.setdefault(tuple(matrix.shape), []).append(index)
    for indices in by_shape.values():
        for index, matrix in zip(
            indices, orthogonalize(torch.stack([matrices[i] for i in indices]), dtype=dtype).unbind(), strict=True
        ):
            result[index] = matrix
    return result


class MuonSGD(torch.optim.Optimizer):
    """Per group: ``orthogonalize`` True, Muon (Nesterov momentum, the filter renormalised to norm sqrt(out channels)
    before every ``renorm_every``-th step, the orthogonalised update times lr, then the filter shrunk by lr x weight
    decay); else SGD with Nesterov momentum and weight decay. airbench renormalises every step, so its Muon needs no
    weight decay; hiverge renormalises every 8th and decays the filters between. ``newton_schulz_dtype``: the
    iterations' precision (``newton_schulz_dtype(device)``)."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float,
        weight_decay: float = 0.0,
        newton_schulz_dtype: torch.dtype = torch.bfloat16,
        batched: bool = False,
    ):
        super().__init__(
            params,
            {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "orthogonalize": False, "renorm_every": 1},
        )
        self.newton_schulz_dtype, self.batched = newton_schulz_dtype, batched

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for (
            group
        ) in self.param_groups:  # a checkpoint written before renorm_every was a setting renormalised every step
            group.setdefault("renorm_every", 1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params, updates = [p for p in group["params"] if p.grad is not None], []
            for p in params:
                grad = p.grad if group["orthogonalize"] else p.grad.add(p, alpha=group["weight_decay"])
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buffer.mul_(momentum).add_(grad)
                updates.append(grad.add(buffer, alpha=momentum))  # Nesterov
            if not group["orthogonalize"]:
                for p, update in zip(params, updates, strict=True):
                    p.add_(update, alpha=-lr)
                continue
            for p in params:
                steps = self.state[p]["steps"] = self.state[p].get("steps", 0) + 1
                if steps % group["renorm_every"] == 0:
                    p.mul_(len(p) ** 0.5 / p.norm())  # the steps from the same scale: the lr alone sets their size
            matrices = orthogonalize_each(
                [update.reshape(len(update), -1) for update in updates], self.newton_schulz_dtype, self.batched
            )
            for p, update in zip(params, matrices, strict=True):
                p.add_(update.view_as(p), alpha=-lr)
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
        return loss
