"""airbench94_muon's network and method (Keller Jordan, 2024), inside the toolkit: the fast recipe.

The network is FastVGG's layout with airbench's stem and BatchNorm. What makes the method fast is the network's own
options (the first four below, flags of the airbench models only) and the recipe's fields (the rest);
``docs/RESULTS.md`` measures each one off in turn:

    whiten                the 2x2 stem starts as the whitening of the training images' patches and stays frozen
    dirac                 every 3x3 convolution starts as an identity on its first channels
    freeze_norm_weights   BatchNorm weights stay 1; norm_bias_lr_scale sets the biases' own learning rate
    width                 the first stage's filters (the other two have 4 times as many): 64 is airbench's
    optimizer muon        Muon (orthogonalised momentum) for the convolution filters, Nesterov SGD for the rest
    decoupled             loss summed over the batch, weight decay per 1,024 examples whatever the lr
    scheduler linear      straight down from the peak to 0
    augment alternating   2-pixel reflect-padded crops, each image mirrored in every other epoch
    tta flip-translate    six views of each test image

airbench94 itself (SGD, lookahead, the triangle schedule) is ``benchmarks/bench_airbench_reference.py``, our yardstick.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from engine import ModelOption, ModelSpec, Recipe, register, with_defaults
from functions import normalize
from models.fast import ConvGroup

# The method's numbers, after airbench94_muon.py, and why each.
AIRBENCH_RECIPE = Recipe(
    epochs=8,  # airbench94_muon's: Muon reaches in 8 epochs what SGD reaches in 9.9
    batch_size=2000,  # large batches: few steps, each cheap to orchestrate
    optimizer="muon",
    lr=0.67,  # the head's lr (per example: the loss is summed), SGD
    momentum=0.85,  # SGD's Nesterov momentum, for the head and the biases
    muon_lr=0.24,
    muon_momentum=0.6,  # the filters' Muon
    weight_decay=0.002048,  # per 1,024 examples: 0.004 per step of 2,000 (2e-6 x batch, airbench's)
    decoupled=True,
    label_smoothing=0.2,
    scheduler="linear",
    augment="alternating",
    tta="flip-translate",
)
# The network's options, airbench94_muon's values (each a flag of the airbench models).
AIRBENCH_OPTIONS = (
    ModelOption("width", int, 64, "filters of the first stage; the other two have 4 times as many", low=1, high=1024),
    ModelOption(
        "whiten",
        bool,
        True,
        "the first convolution whitens the training images' 2x2 patches and stays frozen, its bias "
        "learning for --whiten-bias-epochs",
    ),
    ModelOption(
        "whiten_images",
        int,
        5000,
        "training images whose 2x2 patches give the whitening filters (5,000 give 4.8 million "
        "patches: plenty for a 12x12 covariance)",
        low=1,
        high=1_000_000,
    ),
    ModelOption(
        "whiten_bias_epochs",
        float,
        3.0,
        "epochs the whitening stem's bias learns before it freezes with the stem (a fraction "
        "counts steps: 0.2 is the first fifth of the first epoch, hiverge's)",
        low=0,
        high=1000,
    ),
    ModelOption("dirac", bool, True, "the other convolutions start as identities on their first channels"),
    ModelOption("freeze_norm_weights", bool, True, "BatchNorm weights stay 1, only the biases learn"),
    ModelOption(
        "norm_bias_lr_scale",
        float,
        0.053 / 0.67,
        "BatchNorm biases (and the stem's) learn at this multiple of --lr (airbench's 0.053 against the head's 0.67)",
        low=1e-4,
        high=100.0,
    ),
)
# At half the width, on the 2-core CPU, three changes measured there (docs/RESULTS.md, two seeds each): no identity
# initialisation (it did not pay at this width), batches of 500 (the same arithmetic in four times the steps: 0.3 points
# more validation accuracy than 2,000, and 0.91x the time of 1,000 on that CPU) and Muon's per-step rate lowered to
# match (each Muon step has a fixed size: 0.24 / sqrt(4)). And one of hiverge/cifar10-speedrun's changes, measured at
# this width over 12 paired seeds: the stem's bias freezes after a fifth of the first epoch, not 3 epochs (0.95x the
# time, the backward pass stopping at the first stage; validation accuracy +0.15 points, standard error 0.11).
NARROW_RECIPE = replace(AIRBENCH_RECIPE, batch_size=500, muon_lr=0.12)
NARROW_OPTIONS = with_defaults(AIRBENCH_OPTIONS, width=32, dirac=False, whiten_bias_epochs=0.2)
# At airbench's width, on a 2-core CPU (docs/RESULTS.md, "A CPU recipe at width 64"): batches of 1,000 take 0.77x the
# time per epoch of 2,000 there, with Muon's per-step rate matched (0.24 / sqrt 2) and hiverge's stem bias frozen after
# 0.2 epochs as at width 32; 7.5 epochs (8 gave 0.2 points more validation accuracy in 1.07x the time, 7 lost 0.2
# points to 7.5). A GPU keeps airbench94_muon's.
CPU_RECIPE = replace(AIRBENCH_RECIPE, epochs=7.5, batch_size=1000, muon_lr=0.17)
CPU_OPTIONS = with_defaults(AIRBENCH_OPTIONS, whiten_bias_epochs=0.2)
# Tuning: the width around each model's own, the stem bias's epochs and the biases' rate a decade around airbench's;
# how many images the whitening reads is not a hyperparameter (5,000 are plenty), and is left out.
AIRBENCH_TUNING = {
    "width": {"kind": "int", "low": 32, "high": 128, "log": True},
    "whiten_images": None,
    "whiten_bias_epochs": {"kind": "float", "low": 0.1, "high": 3.0, "log": True},
    "norm_bias_lr_scale": {"kind": "float", "low": 0.02, "high": 0.3, "log": True},
}
NARROW_TUNING = AIRBENCH_TUNING | {"width": {"kind": "int", "low": 16, "high": 64, "log": True}}
WHITEN_EPS = 5e-4  # keeps the near-constant directions of the patches from being blown up
NORM_MOMENTUM, NORM_EPS = 0.4, 1e-12  # running statistics that follow fast-moving weights (airbench's "momentum 0.6")


class AirbenchNet(nn.Module):
    """airbench94's network: a 2x2 stem of 24 filters, three pooled stages of two 3x3 convs, max-pool, a linear head.

    The stages are ``width``, 4 x ``width`` and 4 x ``width`` wide. The head's scores are divided by its width
    (airbench94_muon's scaling; the head starts at unit-variance weights). The other options say how ``initialize`` and
    ``parameter_groups`` treat the network (see the module's docstring); the network keeps them.
    """

    def __init__(
        self,
        width: int = 64,
        whiten: bool = True,
        whiten_images: int = 5000,
        whiten_bias_epochs: float = 3.0,
        dirac: bool = True,
        freeze_norm_weights: bool = True,
        norm_bias_lr_scale: float = 0.053 / 0.67,
        num_classes: int = 10,
    ):
        super().__init__()
        widths = (width, 4 * width, 4 * width)
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.stages = nn.Sequential(
            *(ConvGroup(a, b, NORM_EPS, NORM_MOMENTUM) for a, b in zip((24, *widths[:2]), widths, strict=True))
        )
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        # with whitening, the stem's bias stops learning after whiten_bias_epochs
        self.whitened, self.dirac = (whiten, dirac)
        self.whiten_images, self.whiten_bias_epochs = whiten_images, whiten_bias_epochs
        self.freeze_norm_weights, self.norm_bias_lr_scale = freeze_norm_weights, norm_bias_lr_scale

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled output of the last stage: the penultimate features the t-SNE analysis projects."""
        return torch.flatten(self.pool(self.stages(nn.functional.gelu(self.whiten(x)))), 1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features) / features.size(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))

    def training_progress(self, epochs: float) -> None:
        """The engine calls this before each training step with the epochs done so far (1.5: half-way through the
        second).
        """
        if self.whitened:
            self.whiten.bias.requires_grad_(epochs < self.whiten_bias_epochs)


def whitening_filters(images: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """24 filters of 2x2x3 from the eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue), and their
    negatives: their responses to the training patches are decorrelated, with unit variance."""
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    scaled = (eigenvectors.T / torch.sqrt(eigenvalues + eps).unsqueeze(1)).reshape(12, 3, 2, 2).float()
    return torch.cat((scaled, -scaled))


@torch.no_grad()
def initialize(net: AirbenchNet, data: Any, recipe: Recipe) -> None:
    """Fresh default weights, then what the network's options ask for: the whitening stem, identity convolutions, frozen
    norms.
    """
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            module.reset_parameters()
    net.head.weight.mul_(1 / net.head.weight.std())
    if net.dirac:
        for module in net.stages.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.dirac_(module.weight[: module.in_channels])  # an identity path through the first channels
    if net.whitened:
        images = normalize(
            data.train_images[: net.whiten_images].float() / 255,
            data.mean.to(data.train_images.device),
            data.std.to(data.train_images.device),
        )
        net.whiten.weight.copy_(whitening_filters(images))
        net.whiten.weight.requires_grad_(False)
        net.whiten.bias.zero_()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.requires_grad_(not net.freeze_norm_weights)


def parameter_groups(net: AirbenchNet, recipe: Recipe) -> list[dict[str, Any]]:
    """Everything but the biases (the head; the filters, which Muon takes over) at the recipe's rate, first, so that it
    is the lr metrics.csv records; the biases (BatchNorm's and the stem's) at their own."""
    biases = [net.whiten.bias] + [m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [p for p in net.parameters() if p.requires_grad and not any(p is bias for bias in biases)]
    return [{"params": others}, {"params": biases, "lr": recipe.lr * net.norm_bias_lr_scale}]


register(
    "Airbench94_muon",
    ModelSpec(
        AirbenchNet,
        AIRBENCH_RECIPE,
        "airbench94_muon's network and method: whitened stem, identity convolutions, frozen BatchNorm "
        "weights, Muon, alternating flips, flip-translate TTA; 8 epochs, batch 2,000.",
        initialize,
        parameter_groups,
        AIRBENCH_OPTIONS,
        tuning=AIRBENCH_TUNING,
    ),
)
register(
    "Airbench94_muon_cpu",
    ModelSpec(
        AirbenchNet,
        CPU_RECIPE,
        "Airbench94_muon with a recipe chosen on a 2-core CPU: batches of 1,000, Muon at 0.17, "
        "the stem's bias frozen after 0.2 epochs (hiverge's); 7.5 epochs.",
        initialize,
        parameter_groups,
        CPU_OPTIONS,
        tuning=AIRBENCH_TUNING,
    ),
)
register(
    "Airbench94_muon_narrow",
    ModelSpec(
        AirbenchNet,
        NARROW_RECIPE,
        "Airbench94_muon at half the width (32, 128, 128): a quarter of the arithmetic; "
        "batches of 500, Muon at 0.12, no identity initialisation (chosen at this width on a CPU), "
        "the stem's bias frozen after 0.2 epochs (hiverge's).",
        initialize,
        parameter_groups,
        NARROW_OPTIONS,
        tuning=NARROW_TUNING,
    ),
)
