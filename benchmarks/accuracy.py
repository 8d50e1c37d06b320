"""Accuracy as the benchmarks measure it: the study's loop over a DataLoader, and under each test-time augmentation.

The toolkit's own runs measure accuracy inside the engine (its LightningModule and ``engine.predict``); these serve the
benchmarks that time the original scripts' way and that compare test-time augmentations side by side.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.evaluation import predict
from functions import count_correct


@torch.no_grad()
def get_accuracy(model: nn.Module, batches: Iterable) -> float:
    """Fraction of correctly classified images over ``(images, labels)`` batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for images, labels in batches:
        correct += count_correct(model(images.to(device)), labels.to(device)).item()
        total += labels.numel()
    model.train(was_training)
    return correct / total


def accuracy_by_tta(
    net: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, tta: str
) -> dict[str, float]:
    """Accuracy under each test-time augmentation up to ``tta``, from one pass of each view."""
    result = predict(net, images, labels, mean, std, tta=tta)
    return {
        mode: count_correct(logits, result["labels"]).item() / len(result["labels"])
        for mode, logits in result["logits_by_tta"].items()
    }
