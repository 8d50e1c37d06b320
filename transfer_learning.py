"""Transfer learning on CIFAR-10 from an ImageNet-trained torchvision network: the README's ResNet18 experiment.

    python transfer_learning.py --data-dir ./data
    python transfer_learning.py --arch efficientnet_b0 --finetune layer4 --augment standard --epochs 20
    python transfer_learning.py --weights ~/resnet18-f37072fd.pth      # offline: a local copy of the weights

The README's experiment is the default: resnet18 with ImageNet weights (IMAGENET1K_V1), every backbone
parameter frozen, the 1000-way fc replaced by Linear(512, 10), images resized to 224x224, Adam with
lr 0.01 on the new layer only (no weight decay), batch 64. Images are normalised with the ImageNet
statistics the pretrained weights expect, and resized in batches on the device inside the network.
Per-epoch curves, test accuracy, model.pth and the rest of the run folder are main.py's, in
runs/<arch>-transfer-<finetune>/ (plus transfer.json with these options).

Two choices differ from the README, both flags:
- Augmentation defaults to none. The README trained with its heavy augmentation (--augment readme
  repeats that); without it the frozen backbone's features never change, so they are computed once
  and cached (features.pt in the run folder) and every epoch only trains the head: seconds instead
  of a full ResNet pass over 45,000 images at 224 px. --no-feature-cache forces the full pass.
- 10 epochs by default: a linear head on fixed features converges in a few; --epochs 100 gives the
  README's length (it says transfer training was done like the custom model's 100 epochs).

--finetune layer4 or all also trains the backbone's last stage or all of it, at --backbone-lr-scale
times the head's learning rate; frozen layers keep their BatchNorm statistics (they stay in eval mode).
"""
from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model, get_model_weights

import engine
import functions as fn
from functions import UserError

NUM_CLASSES = len(fn.CLASSES)
FINETUNE_CHOICES = ("fc", "layer4", "all")
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 1  # halve the learning rate after an epoch without a better val_loss
PLATEAU = {"plateau": f"multiply the lr by {PLATEAU_FACTOR} after {PLATEAU_PATIENCE} epoch(s) without a lower validation loss"}
FEATURE_FILE = "features.pt"

# The README's optimiser (Adam, lr 0.01, no weight decay, batch 64); no augmentation and 10 epochs: see the docstring.
TRANSFER_RECIPE = engine.Recipe(epochs=10, batch_size=64, optimizer="adam", lr=0.01, weight_decay=0.0, augment="none")


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
    "mobilenet_v3_small": Arch(head="classifier.3",
                               last_stage=("features.9", "features.10", "features.11", "features.12", "classifier")),
    "efficientnet_b0": Arch(head="classifier.1", last_stage=("features.7", "features.8")),
}


@dataclass(frozen=True)
class TransferOptions:
    """This script's own flags; written to ``transfer.json`` in the run folder."""

    arch: str = "resnet18"
    weights: str = "default"
    image_size: int = 224
    finetune: str = "fc"
    backbone_lr_scale: float = 0.1
    feature_cache: bool = True


# --------------------------------------------------------------------------------------------
# The network: resize in batches, pretrained backbone, new head
# --------------------------------------------------------------------------------------------
class TransferNet(nn.Module):
    """A torchvision backbone (its ImageNet head removed) behind a batch resize to ``image_size``, and a new head.

    Frozen parts (every parameter with ``requires_grad`` False) stay in eval mode when the net is put
    in training mode, so their BatchNorm statistics and dropout do not change them either.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, image_size: int):
        super().__init__()
        self.backbone, self.head, self.image_size = backbone, head, image_size
        self.takes_features = False  # True while the head trains on cached backbone features instead of images

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (self.image_size, self.image_size):
            return images
        return F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output, the head's input: what the t-SNE analysis projects."""
        if self.takes_features:
            return x.flatten(1)
        return self.backbone(self.resize(x)).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in self.backbone.modules()
                if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]

    def train(self, mode: bool = True) -> "TransferNet":
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self


def pretrained_statistics(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std the ImageNet weights were trained with, from their own transforms."""
    transform = get_model_weights(arch).DEFAULT.transforms()
    return torch.tensor(transform.mean), torch.tensor(transform.std)


def weights_file(weights) -> Path:
    """Where ``torch.hub`` keeps a downloaded weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def download_state_dict(weights) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as error:  # offline, refused, truncated, failed hash: all the same advice
        reason = " ".join(str(getattr(error, "reason", error)).split())
        raise UserError(f"could not get the pretrained weights {weights} ({type(error).__name__}: {reason}); download "
                        f"{weights.url} and put it at {weights_file(weights)} (torchvision's cache), or pass "
                        f"--weights PATH with a local copy (--weights none: random backbone)") from None


def read_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        names = ", ".join(get_model_weights(arch).__members__)
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
    available = get_model_weights(arch)
    if weights == "default":
        return download_state_dict(available.DEFAULT)
    if weights in available.__members__:
        return download_state_dict(available[weights])
    return read_state_dict(Path(weights).expanduser(), arch)


def load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """Load every backbone tensor; the old head's are ignored (it is replaced), anything else must fit exactly."""
    head_prefix = ARCHS[arch].head + "."
    state = {name: value for name, value in state.items() if not name.startswith(head_prefix)}
    expected = backbone.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    misshapen = [name for name in expected if name in state and state[name].shape != expected[name].shape]
    if missing or unexpected or misshapen:
        example = (missing or unexpected or misshapen)[0]
        raise UserError(f"{source} does not fit torchvision's {arch}: {len(missing)} missing, {len(unexpected)} unexpected and "
                        f"{len(misshapen)} wrongly shaped tensors (first: {example}); give weights of torchvision.models.{arch}")
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


def build_transfer_net(arch: str, weights: str = "default", image_size: int = 224, finetune: str = "fc") -> TransferNet:
    """torchvision's ``arch`` with ``weights``, its ImageNet head swapped for a 10-way Linear, frozen per ``finetune``."""
    state = imagenet_state_dict(arch, weights)
    backbone = get_model(arch, weights=None)
    imagenet_head = replace_module(backbone, ARCHS[arch].head, nn.Identity())
    if state is not None:
        load_backbone_state(backbone, state, arch, source=f"--weights {weights}")
    net = TransferNet(backbone, nn.Linear(imagenet_head.in_features, NUM_CLASSES), image_size)
    freeze(net, arch, finetune)
    return net.train()  # the frozen parts to eval mode from the start


# --------------------------------------------------------------------------------------------
# Training: parameter groups, frozen modes, the plateau schedule
# --------------------------------------------------------------------------------------------
class TransferClassifier(engine.ImageClassifier):
    """The engine's classifier; the pretrained parameters it trains learn ``backbone_lr_scale`` times slower than the head."""

    def __init__(self, net: TransferNet, recipe: engine.Recipe, seed: int, steps_per_epoch: int, backbone_lr_scale: float = 0.1):
        super().__init__(net, recipe, seed, steps_per_epoch)
        self.backbone_lr_scale = backbone_lr_scale

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.net.train()  # Lightning keeps whatever mode the net had; TransferNet.train keeps the frozen parts in eval

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The head first (its lr is the metrics' lr column), then the trainable backbone parameters, if any."""
        groups = [{"params": list(self.net.head.parameters())}]
        backbone = [p for p in self.net.backbone.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": self.recipe.lr * self.backbone_lr_scale})
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        if self.recipe.scheduler != "plateau":
            return super().configure_optimizers()
        optimizer = self.make_optimizer()
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "monitor": "val_loss", "interval": "epoch"}}


# --------------------------------------------------------------------------------------------
# The linear probe on cached features
# --------------------------------------------------------------------------------------------
def feature_cache_applies(options: TransferOptions, recipe: engine.Recipe, device: torch.device) -> bool:
    """Features can be cached when nothing changes them between epochs: a frozen backbone and unaugmented images."""
    if not options.feature_cache or options.finetune != "fc":
        return False
    if recipe.augment != "none":
        print(f"note: --augment {recipe.augment} changes the images every epoch, so the backbone's features cannot be cached; "
              f"every epoch runs the full backbone (--augment none caches them)")
        return False
    if recipe.tta != "none":
        print("note: --tta needs the backbone's features of the test-time views (mirrored, shifted images) too, so features are not cached")
        return False
    return True


def feature_fingerprint(net: TransferNet, data: engine.SplitData) -> str:
    """Changes whenever the features could: other backbone weights, image size, images or normalisation."""
    digest = hashlib.sha1(f"{type(net.backbone).__name__}|{net.image_size}".encode())
    named = [*net.backbone.state_dict().items(), ("train", data.train_images), ("val", data.val_images),
             ("test", data.test_images), ("mean", data.mean), ("std", data.std)]
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_feature_file(path: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing or damaged: compute the features again
        return None
    return stored["features"] if isinstance(stored, dict) and stored.get("fingerprint") == fingerprint else None


def write_feature_file(path: Path, fingerprint: str, features: dict[str, torch.Tensor]) -> None:
    try:
        fn.write_atomically(path, lambda tmp: torch.save({"fingerprint": fingerprint, "features": features}, tmp))
        print(f"Features saved in {path}; a resumed run reads them back")
    except OSError as error:
        print(f"note: could not save the features in {path} ({error}); they stay in memory for this run")


def backbone_features(net: TransferNet, images: torch.Tensor, labels: torch.Tensor, data: engine.SplitData,
                      device: torch.device) -> torch.Tensor:
    batches = fn.EvalBatches(images.to(device), labels.to(device), engine.CIFAR10DataModule.EVAL_BATCH, data.mean, data.std)
    return engine.predict(net, batches, with_features=True)["features"]


def cached_backbone_features(net: TransferNet, data: engine.SplitData, device: torch.device, run_dir: Path) -> dict[str, torch.Tensor]:
    """The frozen backbone's features of the train, validation and test images: read back, or computed once."""
    path = run_dir / FEATURE_FILE
    fingerprint = feature_fingerprint(net, data)
    features = read_feature_file(path, fingerprint)
    if features is not None:
        print(f"Backbone features read from {path}")
        return features
    splits = {"train": (data.train_images, data.train_labels), "val": (data.val_images, data.val_labels),
              "test": (data.test_images, data.test_labels)}
    count = sum(len(images) for images, _ in splits.values())
    print(f"Computing the frozen backbone's features once: {count} images at {net.image_size}x{net.image_size} px on {device}", flush=True)
    started = time.perf_counter()
    net.to(device, memory_format=torch.channels_last)
    features = {name: backbone_features(net, images, labels, data, device) for name, (images, labels) in splits.items()}
    print(f"Features computed in {time.perf_counter() - started:.1f} s")
    write_feature_file(path, fingerprint, features)
    return features


def feature_split(data: engine.SplitData, features: dict[str, torch.Tensor]) -> engine.SplitData:
    """The split with each image replaced by its backbone features; float inputs pass the engine's batches unchanged."""
    return replace(data, train_images=features["train"].float(), val_images=features["val"].float(),
                   test_images=features["test"].float(), source=f"{data.source}, as cached backbone features")


def train_on_cached_features(config: engine.RunConfig, net: TransferNet, data: engine.SplitData, module_class,
                             device: torch.device) -> dict[str, Any]:
    """Train the head on cached features through the engine; checkpoints and model.pth still hold the whole net."""
    features = feature_split(data, cached_backbone_features(net, data, device, Path(config.out_dir)))
    net.takes_features = True
    try:
        return engine.train(config, net, module_class=module_class, data=features, initialize=False)
    finally:
        net.takes_features = False


# --------------------------------------------------------------------------------------------
# A whole run and the command line
# --------------------------------------------------------------------------------------------
def run_name(options: TransferOptions) -> str:
    return f"{options.arch}-transfer-{options.finetune}"


def train_transfer(config: engine.RunConfig, options: TransferOptions, data: engine.SplitData | None = None) -> dict[str, Any]:
    """Build the net, train it (on cached features when they cannot change), test it; returns the test report."""
    device = engine.training_device(config.device)
    engine.claim_run_folder(config)  # a busy or unusable folder fails before the slow parts
    engine.resume_checkpoint(config, Path(config.out_dir))
    torch.manual_seed(config.seed)  # the new head's initialisation (and a random backbone's)
    net = build_transfer_net(options.arch, options.weights, options.image_size, options.finetune)
    mean, std = pretrained_statistics(options.arch)
    data = replace(data or engine.load_split(config), mean=mean, std=std)
    cached = feature_cache_applies(options, config.recipe, device)
    engine.write_json(Path(config.out_dir) / "transfer.json", dict(asdict(options), trained_on_cached_features=cached))
    module_class = partial(TransferClassifier, backbone_lr_scale=options.backbone_lr_scale)
    if cached:
        return train_on_cached_features(config, net, data, module_class, device)
    return engine.train(config, net, module_class=module_class, data=data, initialize=False)


def image_size(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32 (CIFAR-10's own size), got {text}")
    return value


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_training_arguments(parser, TRANSFER_RECIPE, run_name="<arch>-transfer-<finetune>", schedulers=PLATEAU)
    defaults = TransferOptions()
    group = parser.add_argument_group("transfer learning")
    group.add_argument("--arch", choices=tuple(ARCHS), default=defaults.arch, help=f"torchvision network (default {defaults.arch})")
    group.add_argument("--weights", default=defaults.weights, help="default: torchvision's DEFAULT ImageNet weights for --arch (resnet18: "
                       "IMAGENET1K_V1, the README's), downloaded once into the torch.hub cache; a weights name such as IMAGENET1K_V2; "
                       "PATH: a local state-dict file of the torchvision network; none: a random backbone (default: default)")
    group.add_argument("--image-size", type=image_size, default=defaults.image_size,
                       help=f"side the 32x32 images are resized to, in batches on the device (default {defaults.image_size})")
    group.add_argument("--finetune", choices=FINETUNE_CHOICES, default=defaults.finetune,
                       help="what trains: fc, the new head only (the README); layer4, also the last stage (resnet layer4; for the others "
                       "their last block and the pretrained layers after it); all, the whole network (default fc)")
    group.add_argument("--backbone-lr-scale", type=engine.positive_float, default=defaults.backbone_lr_scale,
                       help=f"learning rate of trained pretrained layers as a fraction of the head's (default {defaults.backbone_lr_scale})")
    group.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=defaults.feature_cache,
                       help="with --finetune fc and --augment none, compute the frozen backbone's features once and train the head on them "
                       "(default on; --no-feature-cache runs the full backbone every epoch)")
    return parser.parse_args(argv)


def configure(args: argparse.Namespace) -> tuple[engine.RunConfig, TransferOptions]:
    options = TransferOptions(arch=args.arch, weights=args.weights, image_size=args.image_size, finetune=args.finetune,
                              backbone_lr_scale=args.backbone_lr_scale, feature_cache=args.feature_cache)
    name = run_name(options)
    return engine.config_from_args(args, model=name, recipe=TRANSFER_RECIPE, run_name=name), options


def main() -> None:
    train_transfer(*configure(parse_arguments()))


if __name__ == "__main__":
    engine.run_cli(main)
