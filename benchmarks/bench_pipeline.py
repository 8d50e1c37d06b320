"""Seconds per epoch of the README recipe, three ways, side by side in one process.

    python -m benchmarks.bench_pipeline --data-dir ./data

(a) ours: engine.fit for one epoch (Lightning, batches augmented on the device with the
    `readme` preset, validation loss/accuracy and train accuracy on a 5,000-image sample);
(b) the original way, the README's loop as written: per-image PIL transforms (the README's Compose)
    in a DataLoader, then validation loss, then accuracy over the whole training loader and over the
    validation loader;
(c) the compute floor: the same epoch's arithmetic with nothing else: forward, backward and Adam
    step on normalised batches already in memory, no augmentation, then the same metric forward
    passes (5,000 validation and 5,000 training-sample images) on batches already in memory.
All three train CIFAR10Net with batch 64 on the 45,000-image training split.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import engine
from functions import get_accuracy, initialize_using_norm_kaiming, normalize
from models.study import README_RECIPE, CIFAR10Net


def ours(data: engine.SplitData, tmp: Path) -> float:
    from dataclasses import replace

    config = engine.RunConfig(model="CIFAR10Net", recipe=replace(README_RECIPE, epochs=1), out_dir=str(tmp / "ours"),
                              progress=False, tsne=False, device="cpu")
    fitted = engine.fit(config, engine.model_spec("CIFAR10Net"), data, checkpoints=False)
    return fitted.history[-1]["seconds"]


class PILImages(Dataset):
    """The original pipeline: a PIL image per item through torchvision transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def original(data: engine.SplitData) -> float:
    from torchvision import transforms

    normalize = transforms.Normalize(mean=data.mean.tolist(), std=data.std.tolist())
    train_transform = transforms.Compose([
        transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(), transforms.RandomRotation(degrees=90),
        transforms.ColorJitter(brightness=0.5, hue=0.5, contrast=0.5, saturation=0.5), transforms.ToTensor(), normalize])
    eval_transform = transforms.Compose([transforms.ToTensor(), normalize])
    train_loader = DataLoader(PILImages(data.train_images, data.train_labels, train_transform), batch_size=64, shuffle=True)
    val_loader = DataLoader(PILImages(data.val_images, data.val_labels, eval_transform), batch_size=64)

    model = CIFAR10Net()
    model.apply(initialize_using_norm_kaiming)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, betas=(0.9, 0.999), weight_decay=5e-4)
    started = time.perf_counter()
    model.train()
    losses = []
    for inputs, labels in train_loader:
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        for inputs, labels in val_loader:
            criterion(model(inputs), labels).item()
    get_accuracy(model, train_loader)
    get_accuracy(model, val_loader)
    return time.perf_counter() - started


def in_memory_batches(images: torch.Tensor, labels: torch.Tensor, size: int, data: engine.SplitData) -> list:
    images = normalize(images.float() / 255, data.mean, data.std).contiguous(memory_format=torch.channels_last)
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(images), size)]


def floor(data: engine.SplitData) -> float:
    model = CIFAR10Net().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, weight_decay=5e-4)
    train = in_memory_batches(data.train_images, data.train_labels, 64, data)
    sample = len(data.val_images)
    evaluation = (in_memory_batches(data.val_images, data.val_labels, engine.EVAL_BATCH, data)
                  + in_memory_batches(data.train_images[:sample], data.train_labels[:sample], engine.EVAL_BATCH, data))
    started = time.perf_counter()
    for inputs, labels in train:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        for inputs, labels in evaluation:
            nn.functional.cross_entropy(model(inputs), labels)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_data_arguments(parser, limit_train=False)
    parser.add_argument("--out-dir", default="runs/bench_pipeline", help="scratch folder for the engine's run")
    parser.add_argument("--rounds", type=engine.positive_int, default=2,
                        help="times each way is measured, interleaved; the fastest of each counts (shared machines are noisy) (default 2)")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = engine.SplitData.from_arrays(engine.load_cifar10(args.data_dir, args.num_workers))
    print(f"{data.source}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    ways = {"floor": lambda: floor(data), "ours": lambda: ours(data, Path(args.out_dir)), "original": lambda: original(data)}
    rounds = {name: [] for name in ways}
    for round_number in range(args.rounds):
        for name, measure in ways.items():
            rounds[name].append(measure())
        print(f"round {round_number + 1}: " + ", ".join(f"{name} {seconds[-1]:.1f} s" for name, seconds in rounds.items()), flush=True)
    times = {name: min(seconds) for name, seconds in rounds.items()}
    print(f"(a) ours, engine + batched device augmentation + metrics: {times['ours']:.1f} s/epoch")
    print(f"(b) original, the README's loop with per-image PIL transforms: {times['original']:.1f} s/epoch")
    print(f"(c) compute floor, the same arithmetic on in-memory batches: {times['floor']:.1f} s/epoch")
    print(f"speed-up (b)/(a) = {times['original'] / times['ours']:.2f}x   overhead (a)/(c) = {times['ours'] / times['floor']:.2f}x")


if __name__ == "__main__":
    engine.run_cli(main)
