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
from pathlib import Path
from typing import Any

import torch

import engine
import tsne
from functions import write_atomically
from models.transfer import (ARCHS, FINETUNE_CHOICES, TRANSFER_RECIPE, TransferNet, build_transfer_net,  # noqa: F401
                             pretrained_statistics, transfer_model)

FEATURE_FILE = "features.pt"


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
        write_atomically(path, lambda tmp: torch.save({"fingerprint": fingerprint, "features": features}, tmp))
        print(f"Features saved in {path}; a resumed run reads them back")
    except OSError as error:
        print(f"note: could not save the features in {path} ({error}); they stay in memory for this run")


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
    features = {name: engine.predict(net, images, labels, data.mean, data.std, with_features=True,
                                     progress=f"features of the {name} images")["features"]
                for name, (images, labels) in splits.items()}
    print(f"Features computed in {time.perf_counter() - started:.1f} s")
    write_feature_file(path, fingerprint, features)
    return features


def feature_split(data: engine.SplitData, features: dict[str, torch.Tensor]) -> engine.SplitData:
    """The split with each image replaced by its backbone features; float inputs pass the engine's batches unchanged."""
    return replace(data, train_images=features["train"].float(), val_images=features["val"].float(),
                   test_images=features["test"].float(), source=f"{data.source}, as cached backbone features")


def train_on_cached_features(config: engine.RunConfig, model: engine.ModelSpec, net: TransferNet, data: engine.SplitData,
                             device: torch.device) -> dict[str, Any]:
    """Train the head on cached features through the engine; checkpoints and model.pth still hold the whole net."""
    features = feature_split(data, cached_backbone_features(net, data, device, Path(config.out_dir)))
    net.takes_features = True
    try:
        return engine.train(config, model, data=features, analyses=tsne.analyses(config))
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
    model = transfer_model(net, config.recipe, options.backbone_lr_scale)
    if cached:
        return train_on_cached_features(config, model, net, data, device)
    return engine.train(config, model, data=data, analyses=tsne.analyses(config))


def image_size(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32 (CIFAR-10's own size), got {text}")
    return value


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_training_arguments(parser, TRANSFER_RECIPE, run_name="<arch>-transfer-<finetune>")
    tsne.add_arguments(parser)
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
    return engine.parse_arguments(parser, argv)


def configure(args: argparse.Namespace) -> tuple[engine.RunConfig, TransferOptions]:
    options = TransferOptions(arch=args.arch, weights=args.weights, image_size=args.image_size, finetune=args.finetune,
                              backbone_lr_scale=args.backbone_lr_scale, feature_cache=args.feature_cache)
    name = run_name(options)
    return engine.config_from_args(args, model=name, recipe=TRANSFER_RECIPE, run_name=name), options


def main() -> None:
    train_transfer(*configure(parse_arguments()))


if __name__ == "__main__":
    engine.run_cli(main)
