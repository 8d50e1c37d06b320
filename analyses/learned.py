"""What a trained network learned, as cs231n's lecture 12 ("Visualizing and Understanding") shows it, from the test set:
the images it is most wrongly sure of, the ones it is most and least sure of and right, where it looks (Grad-CAM), its
first layer's filters, and the training images nearest in its feature space.

Each function draws one figure (matplotlib's object API, the project's style) from tensors already computed, so
visualize.py measures the network once and every figure shows the same predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib.figure import Figure
from torch import nn

from engine.plots import styled
from functions import model_input

WRONG_SHOWN = 24  # the most confidently wrong test images in one grid
PER_CLASS_SHOWN = 4  # the most and the least confident right images of each class
CLASSES_SHOWN = 20  # rows of the per-class figure; more classes than this show the first ones, and the figure says so
CAM_SHOWN = 8  # test images under Grad-CAM: the most confidently wrong half, the most confidently right half
NEIGHBOUR_QUERIES, NEIGHBOURS = 6, 5  # cs231n's figure: a few test images and their nearest training images
FILTERS_SHOWN = 64


@dataclass(frozen=True)
class Predictions:
    """A split's images (uint8 N x 3 x H x W), labels, class probabilities and, for a FeatureNetwork, features."""

    images: torch.Tensor
    labels: torch.Tensor
    probabilities: torch.Tensor
    features: torch.Tensor | None = None

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(1)

    @property
    def confidence(self) -> torch.Tensor:
        return self.probabilities.max(1).values


def picture(image: torch.Tensor) -> np.ndarray:
    """A uint8 3 x H x W tensor as an H x W x 3 array for imshow."""
    return image.permute(1, 2, 0).cpu().numpy()


def bare(axis) -> None:
    axis.set_xticks([])
    axis.set_yticks([])


def grid(count: int, columns: int, cell: float = 1.6, caption_lines: int = 2) -> tuple[Figure, list]:
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(columns * cell, rows * (cell + 0.17 * caption_lines) + 0.6))
    axes = list(np.ravel(figure.subplots(rows, columns, squeeze=False)))
    for axis in axes:
        bare(axis)
        axis.set_frame_on(False)
    return figure, axes


@styled
def confidently_wrong(test: Predictions, classes: tuple[str, ...], model: str) -> Figure:
    """The test images the network gets wrong with the highest probability: true class, predicted class and its
    probability under each."""
    wrong = (test.predicted != test.labels).nonzero().squeeze(1)
    order = wrong[test.confidence[wrong].argsort(descending=True)][:WRONG_SHOWN]
    figure, axes = grid(max(len(order), 1), columns=8)
    for axis, index in zip(axes, order.tolist(), strict=False):
        axis.imshow(picture(test.images[index]))
        axis.set_title(
            f"true: {classes[test.labels[index]]}\npred: {classes[test.predicted[index]]} {test.confidence[index]:.0%}",
            fontsize=8,
        )
    figure.suptitle(
        f"{model}: the {len(order)} test images it is most sure of and wrong ({len(wrong):,} wrong of "
        f"{len(test.labels):,})"
    )
    figure.tight_layout()
    return figure


@styled
def confident_right(test: Predictions, classes: tuple[str, ...], model: str) -> Figure:
    """Per class, the right answers it is most sure of (left) and least sure of (right)."""
    shown = classes[:CLASSES_SHOWN]
    figure = Figure(figsize=(2 * PER_CLASS_SHOWN * 1.1 + 1.4, len(shown) * 1.25 + 0.8))
    axes = figure.subplots(len(shown), 2 * PER_CLASS_SHOWN, squeeze=False)
    right = test.predicted == test.labels
    for row, name in enumerate(shown):
        members = (right & (test.labels == row)).nonzero().squeeze(1)
        order = members[test.confidence[members].argsort(descending=True)].tolist()
        picks = order[:PER_CLASS_SHOWN] + order[-PER_CLASS_SHOWN:] if len(order) >= 2 * PER_CLASS_SHOWN else order
        for column, axis in enumerate(axes[row]):
            bare(axis)
            axis.set_frame_on(False)
            if column < len(picks):
                axis.imshow(picture(test.images[picks[column]]))
                axis.set_title(f"{test.confidence[picks[column]]:.0%}", fontsize=7)
        axes[row][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    more = f" (the first {len(shown)} of {len(classes)} classes)" if len(shown) < len(classes) else ""
    figure.suptitle(f"{model}: right, most sure (left) and least sure (right), per class{more}")
    figure.tight_layout()
    return figure


def last_convolution(net: nn.Module) -> nn.Conv2d | None:
    convolutions = [module for module in net.modules() if isinstance(module, nn.Conv2d)]
    return convolutions[-1] if convolutions else None


def grad_cam(
    net: nn.Module, images: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Grad-CAM (Captum's LayerGradCam) at the last convolution for each image's ``targets`` class, upsampled to the
    image and scaled to [0, 1] per image: N x H x W."""
    layer = last_convolution(net)
    device = next(net.parameters()).device
    inputs = model_input(images.to(device), mean.to(device), std.to(device))
    with torch.enable_grad():
        maps = LayerGradCam(net, layer).attribute(inputs, target=targets.to(device), relu_attributions=True)
    maps = LayerAttribution.interpolate(maps.detach().float(), tuple(images.shape[-2:]), "bilinear")[:, 0]
    peak = maps.flatten(1).max(1).values.clamp_min(1e-12)
    return (maps / peak.view(-1, 1, 1)).cpu()


@styled
def class_activation_maps(
    net: nn.Module, test: Predictions, classes: tuple[str, ...], model: str, mean: torch.Tensor, std: torch.Tensor
) -> Figure:
    """Where the network looks: Grad-CAM for the predicted class and for the true class over a sample of test images
    (the most confidently wrong half, the most confidently right half)."""
    wrong = (test.predicted != test.labels).nonzero().squeeze(1)
    right = (test.predicted == test.labels).nonzero().squeeze(1)
    half = CAM_SHOWN // 2
    sample = torch.cat(
        [
            wrong[test.confidence[wrong].argsort(descending=True)][:half],
            right[test.confidence[right].argsort(descending=True)][: CAM_SHOWN - min(half, len(wrong))],
        ]
    )
    images = test.images[sample]
    maps = {
        "predicted": grad_cam(net, images, test.predicted[sample], mean, std),
        "true": grad_cam(net, images, test.labels[sample], mean, std),
    }
    figure = Figure(figsize=(len(sample) * 1.5 + 0.5, 3 * 1.75 + 0.6))
    axes = figure.subplots(3, len(sample), squeeze=False)
    for column, index in enumerate(sample.tolist()):
        image = picture(test.images[index])
        true, predicted = classes[test.labels[index]], classes[test.predicted[index]]
        axes[0][column].imshow(image)
        axes[0][column].set_title(f"true: {true}\npred: {predicted} {test.confidence[index]:.0%}", fontsize=7)
        for row, (kind, name) in enumerate((("predicted", predicted), ("true", true)), start=1):
            axes[row][column].imshow(image)
            axes[row][column].imshow(maps[kind][column].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes[row][column].set_title(f"for {name}", fontsize=7)
    for row in axes:
        for axis in row:
            bare(axis)
    for row, label in enumerate(("image", "Grad-CAM:\npredicted class", "Grad-CAM:\ntrue class")):
        axes[row][0].set_ylabel(label, fontsize=8)
    figure.suptitle(f"{model}: where it looks (Grad-CAM at its last convolution; red: most)")
    figure.tight_layout()
    return figure


@styled
def first_layer_filters(net: nn.Module, model: str) -> Figure:
    """The first convolution's filters as small RGB images, each scaled to its own range (cs231n's first figure)."""
    layer = next(module for module in net.modules() if isinstance(module, nn.Conv2d))
    weights = layer.weight.detach().float().cpu()[:FILTERS_SHOWN]
    low = weights.flatten(1).min(1).values.view(-1, 1, 1, 1)
    high = weights.flatten(1).max(1).values.view(-1, 1, 1, 1)
    scaled = (weights - low) / (high - low).clamp_min(1e-12)
    figure, axes = grid(len(scaled), columns=min(len(scaled), 16), cell=0.75, caption_lines=0)
    for axis, kernel in zip(axes, scaled, strict=False):
        shown = kernel.permute(1, 2, 0).numpy() if kernel.shape[0] == 3 else kernel.mean(0).numpy()
        axis.imshow(shown, interpolation="nearest", cmap=None if kernel.shape[0] == 3 else "gray")
    out, inputs, height, width = layer.weight.shape
    figure.suptitle(
        f"{model}: first convolution, {min(out, FILTERS_SHOWN)} of {out} filters, {height}x{width} over {inputs} "
        "channels"
    )
    figure.tight_layout()
    return figure


@styled
def nearest_neighbours(test: Predictions, train: Predictions, classes: tuple[str, ...], model: str) -> Figure:
    """For a few test images (one per class, in class order), the training images whose penultimate features are
    nearest (cosine similarity): what the network counts as alike."""
    queries = [int((test.labels == label).nonzero()[0]) for label in test.labels.unique()[:NEIGHBOUR_QUERIES]]
    query_features = nn.functional.normalize(test.features[queries].float(), dim=1)
    train_features = nn.functional.normalize(train.features.float(), dim=1)
    nearest = (query_features @ train_features.T).topk(NEIGHBOURS, dim=1).indices
    figure = Figure(figsize=((NEIGHBOURS + 1) * 1.5 + 0.4, len(queries) * 1.7 + 0.6))
    axes = figure.subplots(len(queries), NEIGHBOURS + 1, squeeze=False)
    for row, (query, neighbours) in enumerate(zip(queries, nearest.tolist(), strict=True)):
        axes[row][0].imshow(picture(test.images[query]))
        axes[row][0].set_title(f"test: {classes[test.labels[query]]}", fontsize=8, fontweight="bold")
        for column, index in enumerate(neighbours, start=1):
            axes[row][column].imshow(picture(train.images[index]))
            axes[row][column].set_title(classes[train.labels[index]], fontsize=8)
        for axis in axes[row]:
            bare(axis)
    figure.suptitle(f"{model}: the {NEIGHBOURS} training images nearest to each test image in feature space")
    figure.tight_layout()
    return figure
