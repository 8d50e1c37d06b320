"""Seconds per epoch of the study's ResNet18 linear probe: its original pipeline against transfer_learning.py.

    python -m benchmarks.bench_transfer                           # 256 train / 64 validation / 64 test images, 2 epochs
    python -m benchmarks.bench_transfer --train 1000 --val 200 --data-dir ./data

The same linear probe three ways (resnet18, every backbone parameter frozen, a new Linear(512, 10),
Adam lr 0.01, batch 64, 224x224 inputs, ImageNet normalisation, no augmentation), on a subset of
CIFAR-10, on the device --device names:

1. original: the study's code: a DataLoader of PIL images through torchvision.transforms
   Resize(224), ToTensor and Normalize, one image at a time; every epoch runs the full backbone
   for training, for the validation loss, and for the study's get_accuracy over the training and
   the validation loader.
2. ours, no feature cache: transfer_learning --no-feature-cache: uint8 images in memory,
   normalised and resized in batches inside the network; every epoch runs the full backbone for
   training, validation and a validation-sized training sample.
3. ours, feature cache: transfer_learning.py: the backbone's features once, then only the head.

The backbone is randomly initialised (pretrained weights cannot be downloaded here), so the
accuracies only check that each pipeline learns something; they say nothing of transfer learning.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

import engine
import transfer_learning as tl
from benchmarks.accuracy import get_accuracy

BATCH_SIZE = 64
STUDY_LR = 0.01


def subset(data_dir: str, num_workers: int, n_train: int, n_val: int, n_test: int) -> engine.SplitData:
    """The first images of the study's shuffled train and validation splits, and a seeded sample of the test set."""
    data = engine.SplitData.from_arrays(engine.load_dataset(data_dir, num_workers), limit_train=n_train)
    # the folders are sorted by class
    test = torch.randperm(len(data.test_images), generator=torch.Generator().manual_seed(0))[:n_test]
    return replace(
        data,
        val_images=data.val_images[:n_val],
        val_labels=data.val_labels[:n_val],
        test_images=data.test_images[test],
        test_labels=data.test_labels[test],
    )


class PILImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 hands the study's DataLoader: a PIL image per item, then the transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index].permute(1, 2, 0).numpy())), int(self.labels[index])


def original_linear_probe(data: engine.SplitData, epochs: int, device: torch.device) -> dict[str, float]:
    """The study's transfer learning loop, as written there (model.train() included, so BatchNorm statistics move)."""
    mean, std = tl.pretrained_statistics("resnet18")
    transform = transforms.Compose(
        [transforms.Resize(224), transforms.ToTensor(), transforms.Normalize(mean.tolist(), std.tolist())]
    )
    train_loader = torch.utils.data.DataLoader(
        PILImages(data.train_images, data.train_labels, transform), batch_size=BATCH_SIZE, shuffle=True
    )
    val_loader = torch.utils.data.DataLoader(
        PILImages(data.val_images, data.val_labels, transform), batch_size=BATCH_SIZE
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, 10)
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=STUDY_LR)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_losses = [
                criterion(model(images.to(device)), labels.to(device)).item() for images, labels in val_loader
            ]
        train_accuracy = get_accuracy(model, train_loader)
        val_accuracy = get_accuracy(model, val_loader)
        seconds.append(time.perf_counter() - started)
    return {
        "seconds_per_epoch": sum(seconds) / epochs,
        "whole_run": sum(seconds),
        "train_accuracy": train_accuracy,
        "val_loss": sum(val_losses) / len(val_losses),
        "val_accuracy": val_accuracy,
    }


def our_linear_probe(data: engine.SplitData, epochs: int, device: str, feature_cache: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as run_dir:
        args = tl.parse_arguments(
            [
                "--weights",
                "none",
                "--epochs",
                str(epochs),
                "--device",
                device,
                "--out-dir",
                run_dir,
                "--no-progress",
                "--no-tsne",
                "--feature-cache" if feature_cache else "--no-feature-cache",
            ]
        )
        config = tl.configure(args)
        started = time.perf_counter()
        tl.train_transfer(config, data=data)
        whole_run = time.perf_counter() - started
        history = engine.read_metrics_csv(Path(run_dir) / "metrics.csv")
    final = history[-1]
    return {
        "seconds_per_epoch": sum(row["seconds"] for row in history) / len(history),
        "whole_run": whole_run,
        "train_accuracy": final["train_accuracy"],
        "val_loss": final["val_loss"],
        "val_accuracy": final["val_accuracy"],
    }


def backbone_passes(n_train: int, n_val: int) -> dict[str, str]:
    """Images through the backbone per epoch (and once, for the cache)."""
    return {
        "original": f"{2 * n_train + 2 * n_val:,}",
        "ours, no feature cache": f"{n_train + 2 * n_val:,}",
        "ours, feature cache": f"0 ({n_train + n_val:,} + test once)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=engine.positive_int, default=256, help="training images (default 256)")
    parser.add_argument(
        "--val",
        type=engine.positive_int,
        default=64,
        help="validation images; also the train-accuracy sample (default 64)",
    )
    parser.add_argument("--test", type=engine.positive_int, default=64, help="test images (default 64)")
    parser.add_argument("--epochs", type=engine.positive_int, default=2, help="epochs of each pipeline (default 2)")
    engine.add_data_arguments(parser, limit_train=False)
    engine.add_device_arguments(parser, training=False)
    args = parser.parse_args()

    data = subset(args.data_dir, args.num_workers, args.train, args.val, args.test)
    device = engine.training_device(args.device)
    results = {
        "original": original_linear_probe(data, args.epochs, device),
        "ours, no feature cache": our_linear_probe(data, args.epochs, device.type, feature_cache=False),
        "ours, feature cache": our_linear_probe(data, args.epochs, device.type, feature_cache=True),
    }
    passes = backbone_passes(len(data.train_images), len(data.val_images))
    print(
        f"\nResNet18 linear probe at 224x224, random-initialised backbone (accuracy is only a pipeline check); "
        f"{len(data.train_images)} train / {len(data.val_images)} validation / {len(data.test_images)} test images of "
        f"{args.data_dir}; batch {BATCH_SIZE}, {args.epochs} epochs, {device}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'pipeline':<24} {'backbone passes/epoch':>24} {'s/epoch':>9} {'whole run s':>12} {'train acc':>10} "
        f"{'val loss':>9} {'val acc':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<24} {passes[name]:>24} {r['seconds_per_epoch']:>9.2f} {r['whole_run']:>12.1f} "
            f"{r['train_accuracy']:>10.3f} {r['val_loss']:>9.3f} {r['val_accuracy']:>8.3f}"
        )
    print(
        "whole run: original = its epochs only; ours = building the net, (feature extraction,) epochs, "
        "checkpoints, test set and plots"
    )


if __name__ == "__main__":
    main()
