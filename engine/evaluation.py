"""Predictions of a trained network: logits (under test-time augmentation), penultimate features, the test report.

``predict`` is the one way the toolkit asks a network about images: at the end of a run, in the analyses,
for the transfer-learning feature cache, in the benchmarks, and for a user's own photos.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from sklearn import metrics
from torch import nn

from engine.batches import EVAL_BATCH, EvalBatches
from engine.config import SELECTIVE_FRACTION
from engine.progress import watched


def least_confident(logits: torch.Tensor, fraction: float = SELECTIVE_FRACTION) -> torch.Tensor:
    """Whether each image is among the ``fraction`` (rounded up) whose top softmax probability is lowest."""
    confidence = logits.softmax(1).amax(1)
    chosen = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    chosen[confidence.argsort()[: math.ceil(fraction * len(logits))]] = True
    return chosen


def tta_logits(net: nn.Module, images: torch.Tensor, logits: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """The scores under each test-time augmentation of TTA_MODES up to ``mode``, in that order (selective after
    flip-translate: from its views, at no cost; or, asked alone, from the views of its least confident images only).

    ``logits`` are the scores of ``images`` themselves; each mode reuses the views of the one before.
    """
    scores = {"none": logits}
    if mode == "none":
        return scores
    if mode == "selective":
        unsure = least_confident(logits)
        scores["selective"] = logits.clone()
        scores["selective"][unsure] = tta_logits(net, images[unsure], logits[unsure], "flip-translate")[
            "flip-translate"
        ]
        return scores

    def with_mirror(x: torch.Tensor, x_scores: torch.Tensor) -> torch.Tensor:
        return (x_scores + net(x.flip(3)).float()) / 2

    scores["flip"] = with_mirror(images, logits)
    if mode == "flip":
        return scores
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]  # content moved one pixel down-right, one up-left
    scores["flip-translate"] = (scores["flip"] + sum(with_mirror(x, net(x).float()) for x in shifted) / 2) / 2
    scores["selective"] = torch.where(least_confident(logits).unsqueeze(1), scores["flip-translate"], logits)
    return scores


@torch.no_grad()
def predict(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    tta: str = "none",
    with_features: bool = False,
    progress: str | None = None,
) -> dict[str, Any]:
    """Logits (and penultimate features, from the same forward pass) of uint8 ``images``, normalised by ``mean`` and
    ``std``, in batches on the network's device, in eval mode.

    ``logits`` are averaged over the test-time views of ``tta``; ``logits_by_tta`` holds the logits of every mode
    up to it, from the same forward passes. The features stay those of the image itself. ``progress`` names a
    progress display (for a long pass: a large backbone on a CPU, say).
    """
    net.eval()
    device = next(net.parameters()).device
    by_tta: dict[str, list[torch.Tensor]] = {}
    features = []
    batches = EvalBatches(images.to(device), labels, EVAL_BATCH, mean, std)
    for batch, _ in batches if progress is None else watched(batches, len(batches), progress):
        if with_features:
            penultimate = net.forward_features(batch)
            batch_logits = net.classify(penultimate).float()
            features.append(penultimate.flatten(1).float().cpu())
        else:
            batch_logits = net(batch).float()
        for mode, scores in tta_logits(net, batch, batch_logits, tta).items():
            by_tta.setdefault(mode, []).append(scores.cpu())
    logits_by_tta = {mode: torch.cat(scores) for mode, scores in by_tta.items()}
    result = {"logits": logits_by_tta[tta], "logits_by_tta": logits_by_tta, "labels": labels.cpu()}
    if with_features:
        result["features"] = torch.cat(features)
    return result


def test_report(labels: torch.Tensor, predictions: torch.Tensor, classes: tuple[str, ...]) -> dict[str, Any]:
    """What test.json and a saved model's evaluation report: accuracy, each class's accuracy (its recall), precision,
    recall and F1 (scikit-learn's classification report, by class name, with its macro and weighted averages) and the
    confusion matrix (rows: true class)."""
    true, predicted, label_ids = labels.cpu().numpy(), predictions.cpu().numpy(), list(range(len(classes)))
    matrix = metrics.confusion_matrix(true, predicted, labels=label_ids)
    report = metrics.classification_report(
        true, predicted, labels=label_ids, target_names=list(classes), output_dict=True, zero_division=0
    )
    return {
        "test_accuracy": float((true == predicted).mean()),
        "per_class_accuracy": {name: report[name]["recall"] for name in classes},
        "per_class": {
            name: {key: report[name][key] for key in ("precision", "recall", "f1-score", "support")} for name in classes
        },
        "macro_avg": report["macro avg"],
        "weighted_avg": report["weighted avg"],
        "confusion_matrix": matrix.tolist(),
        "num_test_images": int(labels.numel()),
    }
