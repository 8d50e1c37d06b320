"""Transfer learning on CIFAR-10 from an ImageNet-trained torchvision network: the original study's ResNet18 experiment.

    python transfer_learning.py --data-dir ./data
    python transfer_learning.py --arch efficientnet_b0 --finetune layer4 --augment standard --epochs 20
    python transfer_learning.py --weights ~/resnet18-f37072fd.pth      # offline: a local copy of the weights

The study's experiment is the default: resnet18 with ImageNet weights, every backbone parameter frozen, its fc
replaced by Linear(512, 10), images resized to 224x224 inside the network, Adam lr 0.01 on the new layer only, batch
64, inputs normalised with ImageNet's statistics. The network is the registered model TransferNet; its options below
are recorded in config.json and the model card, so predict.py, evaluate.py and tsne.py rebuild it from the run folder,
runs/<arch>-transfer-<finetune>/. Two defaults differ from the study: no augmentation (so the frozen backbone's features
are computed once and cached: seconds per epoch instead of a full ResNet pass; --augment study repeats the study's), and
10 epochs (a linear head on fixed features converges in a few). --finetune layer4 or all also trains the last stage or
the whole backbone, at --backbone-lr-scale times the head's lr. Offline, --weights takes a local file (docs/data.md);
results: docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import engine
import tsne
from engine import write_atomically
from models.transfer import ARCHS, FINETUNE_CHOICES, TRANSFER_RECIPE, TransferNet, pretrained_statistics  # noqa: F401

MODEL = "TransferNet"
FEATURE_FILE = "features.pt"


# --------------------------------------------------------------------------------------------
# The linear probe on cached features
# --------------------------------------------------------------------------------------------
def feature_cache_applies(options: dict[str, Any], recipe: engine.Recipe) -> bool:
    """Features can be cached when nothing changes them between epochs: a frozen backbone and unaugmented images."""
    if not options["feature_cache"] or options["finetune"] != "fc":
        return False
    if recipe.augment != "none":
        print(
            f"note: --augment {recipe.augment} changes the images every epoch, so the backbone's features cannot be "
            "cached; every epoch runs the full backbone (--augment none caches them)"
        )
        return False
    if recipe.tta != "none":
        print(
            "note: --tta needs the backbone's features of the test-time views (mirrored, shifted images) too, so "
            "features are not cached"
        )
        return False
    return True


def feature_fingerprint(net: TransferNet, data: engine.SplitData) -> str:
    """Changes whenever the features could: other backbone weights, image size, images or normalisation."""
    digest = hashlib.sha1(f"{type(net.backbone).__name__}|{net.image_size}".encode())
    named = [
        *net.backbone.state_dict().items(),
        ("train", data.train_images),
        ("val", data.val_images),
        ("test", data.test_images),
        ("mean", data.mean),
        ("std", data.std),
    ]
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


def cached_backbone_features(
    net: TransferNet, data: engine.SplitData, device: torch.device, run_dir: Path
) -> dict[str, torch.Tensor]:
    """The frozen backbone's features of the train, validation and test images: read back, or computed once."""
    path = run_dir / FEATURE_FILE
    fingerprint = feature_fingerprint(net, data)
    features = read_feature_file(path, fingerprint)
    if features is not None:
        print(f"Backbone features read from {path}")
        return features
    splits = {
        "train": (data.train_images, data.train_labels),
        "val": (data.val_images, data.val_labels),
        "test": (data.test_images, data.test_labels),
    }
    count = sum(len(images) for images, _ in splits.values())
    print(
        f"Computing the frozen backbone's features once: {count} images at {net.image_size}x{net.image_size} px "
        f"on {device}",
        flush=True,
    )
    started = time.perf_counter()
    net.to(device, memory_format=torch.channels_last)
    features = {
        name: engine.predict(
            net, images, labels, data.mean, data.std, with_features=True, progress=f"features of the {name} images"
        )["features"]
        for name, (images, labels) in splits.items()
    }
    print(f"Features computed in {time.perf_counter() - started:.1f} s")
    write_feature_file(path, fingerprint, features)
    return features


def feature_split(data: engine.SplitData, features: dict[str, torch.Tensor]) -> engine.SplitData:
    """The split with each image replaced by its backbone features; float inputs pass the engine's batches unchanged."""
    return replace(
        data,
        train_images=features["train"].float(),
        val_images=features["val"].float(),
        test_images=features["test"].float(),
        source=f"{data.source}, as cached backbone features",
    )


def train_on_cached_features(
    config: engine.RunConfig, net: TransferNet, data: engine.SplitData, device: torch.device
) -> dict[str, Any]:
    """Train the head on cached features of ``net``'s backbone through the engine; checkpoints and model.pth still hold
    the whole net. The network the engine builds starts from the same backbone (the same options, weights and seed), and
    passes features on unchanged (``TransferNet.forward_features``)."""
    features = feature_split(data, cached_backbone_features(net, data, device, Path(config.out_dir)))
    return engine.train(config, engine.model_spec(MODEL), data=features, analyses=tsne.analyses(config))


# --------------------------------------------------------------------------------------------
# A whole run and the command line
# --------------------------------------------------------------------------------------------
def run_name(options: dict[str, Any]) -> str:
    return f"{options['arch']}-transfer-{options['finetune']}"


def train_transfer(config: engine.RunConfig, data: engine.SplitData | None = None) -> dict[str, Any]:
    """Train the transfer network of ``config`` (on cached features when they cannot change), test it; returns the test
    report.
    """
    device = engine.training_device(config.device)
    engine.claim_run_folder(config)  # a busy or unusable folder fails before the slow parts
    engine.resume_checkpoint(config, Path(config.out_dir))
    spec = engine.model_spec(MODEL)
    net = spec.build(config.model_options, name=MODEL)
    torch.manual_seed(config.seed)  # as engine.fit seeds before it initialises its own copy
    # the pretrained weights: a failed download or a wrong file fails before the data load
    spec.initialize(net, None, config.recipe)
    # ImageNet's statistics, as the weights expect
    data = engine.for_model(spec, config, data or engine.load_split(config))
    if feature_cache_applies(config.model_options, config.recipe):
        return train_on_cached_features(config, net, data, device)
    return engine.train(config, spec, data=data, analyses=tsne.analyses(config))


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = engine.script_parser(__doc__)
    engine.add_training_arguments(parser, TRANSFER_RECIPE, run_name="<arch>-transfer-<finetune>")
    engine.add_model_arguments(parser, {MODEL: engine.model_spec(MODEL)})
    tsne.add_arguments(parser)
    return engine.parse_arguments(parser, argv, model=MODEL)


def configure(args: argparse.Namespace) -> engine.RunConfig:
    config = engine.config_from_args(args, MODEL, run_name=MODEL)
    return config if args.out_dir else replace(config, out_dir=str(Path("runs") / run_name(config.model_options)))


def main() -> None:
    train_transfer(configure(parse_arguments()))


if __name__ == "__main__":
    engine.run_cli(main)
