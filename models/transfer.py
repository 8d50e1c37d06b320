"""Transfer learning's network: an ImageNet-trained torchvision backbone behind a batch resize, and a new head.

The study's experiment is resnet18 with its ImageNet weights, every backbone parameter frozen and only the new
head trained. It is the registered model TransferNet, whose options say which backbone, which weights it starts from,
the size images are resized to, what trains, how fast the backbone learns and whether transfer_learning.py caches the
frozen backbone's features. Its initialisation loads the pretrained weights (a saved run's network is rebuilt from its
options without them: its own weights replace them all), and its inputs are normalised with the statistics those
weights were trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine import ModelOption, ModelSpec, Recipe, UserError, register, state_dict_mismatch

FINETUNE_CHOICES = ("fc", "layer4", "all")

# The study's optimiser (Adam, lr 0.01, no weight decay, batch 64); no augmentation and 10 epochs: see
# transfer_learning.py.
TRANSFER_RECIPE = Recipe(epochs=10, batch_size=64, optimizer="adam", lr=0.01, weight_decay=0.0, augment="none")


# --------------------------------------------------------------------------------------------
# Architectures: where each keeps its ImageNet head and its last stage
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    head: str  # the 1000-way ImageNet layer that the new 10-way head replaces
    last_stage: tuple[str, ...]  # what --finetune layer4 also trains: the last stage and any pretrained layers after it


RESNET = Arch(head="fc", last_stage=("layer4",))
ARCHS = {
    "resnet18": RESNET,
    "resnet34": RESNET,
    "resnet50": RESNET,
    "vgg16": Arch(head="classifier.6", last_stage=("features.24", "features.26", "features.28", "classifier")),
    "mobilenet_v3_small": Arch(
        head="classifier.3", last_stage=("features.9", "features.10", "features.11", "features.12", "classifier")
    ),
    "efficientnet_b0": Arch(head="classifier.1", last_stage=("features.7", "features.8")),
}


# --------------------------------------------------------------------------------------------
# The network: resize in batches, pretrained backbone, new head
# --------------------------------------------------------------------------------------------
class TransferNet(nn.Module):
    """A torchvision backbone (its ImageNet head removed) behind a batch resize to ``image_size``, and a new head.

    Frozen parts (every parameter with ``requires_grad`` False) stay in eval mode when the net is put
    in training mode, so their BatchNorm statistics and dropout do not change them either.
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Linear, image_size: int, arch: str, weights: str, backbone_lr_scale: float
    ):
        super().__init__()
        self.backbone, self.head, self.image_size = backbone, head, image_size
        self.arch, self.weights, self.backbone_lr_scale = arch, weights, backbone_lr_scale

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (self.image_size, self.image_size):
            return images
        return F.interpolate(
            images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=False
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output, the head's input: what the t-SNE analysis projects. Given features already (a batch of
        vectors: transfer_learning.py's cache of the frozen backbone's features), it passes them on."""
        if x.dim() == 2:
            return x
        return self.backbone(self.resize(x)).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))

    def frozen_modules(self) -> list[nn.Module]:
        return [
            m
            for m in self.backbone.modules()
            if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())
        ]

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self


def pretrained_statistics(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std the ImageNet weights were trained with, from their own transforms."""
    transform = engine.torchvision_weights(arch).DEFAULT.transforms()
    return torch.tensor(transform.mean), torch.tensor(transform.std)


def weights_file(weights) -> Path:
    """Where ``torch.hub`` keeps a downloaded weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def download_state_dict(weights) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as error:  # offline, refused, truncated, failed hash: all the same advice
        reason = " ".join(str(getattr(error, "reason", error)).split())
        raise UserError(
            f"could not get the pretrained weights {weights} ({type(error).__name__}: {reason}); download "
            f"{weights.url} and put it at {weights_file(weights)} (torchvision's cache), or pass "
            f"--weights PATH with a local copy (--weights none: random backbone)"
        ) from None


def read_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        names = ", ".join(engine.torchvision_weights(arch).__members__)
        raise UserError(f"--weights {path}: no such file; give a state-dict file, default, none, or one of {names}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise UserError(f"--weights {path} is not a readable PyTorch state dict ({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"--weights {path} holds no state dict (a mapping of parameter names to tensors)")
    return state


def imagenet_state_dict(arch: str, weights: str) -> dict[str, torch.Tensor] | None:
    """``weights``: none (random backbone), default or a weights name (torchvision's, downloaded once), or a file."""
    if weights == "none":
        return None
    available = engine.torchvision_weights(arch)
    if weights == "default":
        return download_state_dict(available.DEFAULT)
    if weights in available.__members__:
        return download_state_dict(available[weights])
    return read_state_dict(Path(weights).expanduser(), arch)


def load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """Load every backbone tensor; the old head's are ignored (it is replaced), anything else must fit exactly."""
    head_prefix = ARCHS[arch].head + "."
    state = {name: value for name, value in state.items() if not name.startswith(head_prefix)}
    problem = state_dict_mismatch(backbone.state_dict(), state)
    if problem:
        raise UserError(
            f"{source} does not fit torchvision's {arch}: {problem}; give weights of torchvision.models.{arch}"
        )
    backbone.load_state_dict(state)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``path`` (e.g. classifier.6) and return what was there."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def in_last_stage(parameter_name: str, arch: str) -> bool:
    return any(parameter_name.startswith(prefix + ".") for prefix in ARCHS[arch].last_stage)


def freeze(net: TransferNet, arch: str, finetune: str) -> None:
    """Only the head trains (fc), also the last stage (layer4), or everything (all)."""
    for name, parameter in net.backbone.named_parameters():
        parameter.requires_grad = finetune == "all" or (finetune == "layer4" and in_last_stage(name, arch))


def backbone_without_head(arch: str) -> tuple[nn.Module, int]:
    """torchvision's ``arch`` with random weights and its ImageNet head removed, and the width of the
    features it gives."""
    backbone = engine.torchvision_network(arch)
    imagenet_head = replace_module(backbone, ARCHS[arch].head, nn.Identity())
    return backbone, imagenet_head.in_features


def transfer_network(
    arch: str = "resnet18",
    weights: str = "default",
    image_size: int = 224,
    finetune: str = "fc",
    backbone_lr_scale: float = 0.1,
    feature_cache: bool = True,
    num_classes: int = 10,
) -> TransferNet:
    """The network of the options: ``arch`` with a new ``num_classes``-way head, frozen per ``finetune``; its weights
    are random until ``load_pretrained`` (a training run's initialisation) or a saved state dict replaces them.
    ``feature_cache`` is transfer_learning.py's to read; the network is the same either way."""
    backbone, features = backbone_without_head(arch)
    net = TransferNet(backbone, nn.Linear(features, num_classes), image_size, arch, weights, backbone_lr_scale)
    freeze(net, arch, finetune)
    return net.train()  # the frozen parts to eval mode from the start


@torch.no_grad()
def load_pretrained(net: TransferNet, data: Any = None, recipe: Recipe | None = None) -> None:
    """The registry's initialisation: a new head drawn from the run's seed, the backbone from its ``weights`` (with
    ``none``, random weights drawn from the seed too)."""
    net.head.reset_parameters()
    state = imagenet_state_dict(net.arch, net.weights)
    if state is None:
        net.backbone.load_state_dict(backbone_without_head(net.arch)[0].state_dict())
    else:
        load_backbone_state(net.backbone, state, net.arch, source=f"--weights {net.weights}")


# --------------------------------------------------------------------------------------------
# Its registry entry: pretrained weights kept, the backbone slower than the head
# --------------------------------------------------------------------------------------------
def parameter_groups(net: TransferNet, recipe: Recipe) -> list[dict[str, Any]]:
    """The head first (its lr is the metrics' lr column), then the trainable backbone parameters, if any."""
    head = [{"params": list(net.head.parameters())}]
    backbone = [p for p in net.backbone.parameters() if p.requires_grad]
    return head + ([{"params": backbone, "lr": recipe.lr * net.backbone_lr_scale}] if backbone else [])


TRANSFER_OPTIONS = (
    ModelOption("arch", str, "resnet18", "torchvision network", choices=tuple(ARCHS)),
    ModelOption(
        "weights",
        str,
        "default",
        "what the backbone starts from: default (torchvision's ImageNet weights for --arch, resnet18's "
        "IMAGENET1K_V1 as the study's, downloaded once), a weights name such as IMAGENET1K_V2, a local state-dict "
        "PATH, or none (a random backbone)",
    ),
    ModelOption(
        "image_size", int, 224, "side the 32x32 images are resized to, in batches on the device", low=32, high=1024
    ),
    ModelOption(
        "finetune",
        str,
        "fc",
        "what trains: fc, the new head only (the study's); layer4, also the last stage (or block); all, the whole "
        "network",
        choices=FINETUNE_CHOICES,
    ),
    ModelOption(
        "backbone_lr_scale",
        float,
        0.1,
        "learning rate of trained pretrained layers as a fraction of the head's",
        low=1e-6,
        high=10.0,
    ),
    ModelOption(
        "feature_cache",
        bool,
        True,
        "with --finetune fc and --augment none, compute the frozen backbone's features once (else the full backbone "
        "runs every epoch)",
    ),
)
register(
    "TransferNet",
    ModelSpec(
        transfer_network,
        TRANSFER_RECIPE,
        "Transfer learning: an ImageNet-trained torchvision backbone (resnet18 by "
        "default, frozen) behind a batch resize, and a new head.",
        initialize=load_pretrained,
        parameter_groups=parameter_groups,
        options=TRANSFER_OPTIONS,
        input_statistics=lambda options: pretrained_statistics(options["arch"]),
        own_script="transfer_learning.py",
    ),
)
