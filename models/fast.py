"""Past the study: a small fast VGG in the line of Keller Jordan's airbench, with its own recipe.

FastVGG is airbench94's network (a 2x2 stem, three pooled stages of two 3x3 convolutions); its recipe (SGD with
Nesterov momentum, a one-cycle schedule, label smoothing, light augmentation, flip TTA) is measured in
benchmarks/bench_fast.py, each choice a flag.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import ModelOption, ModelSpec, Recipe, first_line, register, with_defaults


class ConvGroup(nn.Sequential):
    """conv 3x3, max-pool 2, BN, GELU, conv 3x3, BN, GELU: a VGG stage that halves the resolution.

    Pooling right after the first convolution (airbench's order) runs the second one on a quarter of the pixels.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_eps: float = 1e-5, norm_momentum: float = 0.1):
        def norm() -> nn.BatchNorm2d:
            return nn.BatchNorm2d(out_channels, eps=norm_eps, momentum=norm_momentum)

        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            norm(),
            nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            norm(),
            nn.GELU(),
        )


class FastVGG(nn.Module):
    """A 7-conv BatchNorm VGG (2x2 stem, three pooled stages of two 3x3 convs), after Keller Jordan's airbench94.

    32x32 -> 31 (stem) -> 15 -> 7 -> 3 -> max-pooled to 1x1; the stages are ``width``, 4 x ``width`` and 4 x ``width``
    wide (airbench's 64, 256, 256). The class scores are scaled by ``logit_scale`` (airbench's 1/9), which keeps the
    early logits small so label-smoothed cross-entropy trains at a high lr.
    """

    def __init__(self, width: int = 64, stem_width: int = 24, logit_scale: float = 1 / 9, num_classes: int = 10):
        super().__init__()
        widths = (width, 4 * width, 4 * width)
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 2), nn.BatchNorm2d(stem_width), nn.GELU())
        self.stages = nn.Sequential(
            ConvGroup(stem_width, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2])
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled output of the last stage: the penultimate features the t-SNE analysis projects."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))


# FastVGG's own recipe: every choice a flag, each measured in benchmarks/bench_fast.py (see docs/RESULTS.md).
FAST_RECIPE = Recipe(
    epochs=10,
    batch_size=512,
    optimizer="sgd",
    lr=0.8,
    momentum=0.9,
    weight_decay=5e-4,
    label_smoothing=0.2,
    scheduler="onecycle",
    warmup_epochs=2.0,
    augment="light",
    tta="flip",
)


def recipe_summary(r: Recipe) -> str:
    return (
        f"Trains {r.epochs:g} epochs, batch {r.batch_size}, {r.optimizer} lr {r.lr:g} (momentum {r.momentum}, weight "
        f"decay {r.weight_decay:g}), {r.scheduler} schedule with {r.warmup_epochs:g} warm-up epochs, label smoothing "
        f"{r.label_smoothing}, {r.augment} augmentation{f', {r.tta} TTA' if r.tta != 'none' else ''}."
    )


FAST_OPTIONS = (
    ModelOption("width", int, 64, "filters of the first stage; the other two have 4 times as many", low=1, high=1024),
)
# Tuning's width: around each model's own, on the log scale (the declared 1 to 1,024 would spend trials on toy nets).
register(
    "FastVGG",
    ModelSpec(
        FastVGG,
        FAST_RECIPE,
        first_line(FastVGG) + " " + recipe_summary(FAST_RECIPE),
        options=FAST_OPTIONS,
        tuning={"width": {"kind": "int", "low": 32, "high": 128, "log": True}},
    ),
)
register(
    "FastVGG_narrow",
    ModelSpec(
        FastVGG,
        FAST_RECIPE,
        "FastVGG at half the width (32, 128, 128): a quarter of the arithmetic. " + recipe_summary(FAST_RECIPE),
        options=with_defaults(FAST_OPTIONS, width=32),
        tuning={"width": {"kind": "int", "low": 16, "high": 64, "log": True}},
    ),
)
