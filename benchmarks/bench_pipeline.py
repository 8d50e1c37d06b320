"""Seconds per epoch of a model's recipe, our engine against the compute floor (and, for CIFAR10Net, the original loop).

    python -m benchmarks.bench_pipeline --data-dir ./data
    python -m benchmarks.bench_pipeline --data-dir ./data --model Airbench94_muon_narrow --precision bf16-mixed

(a) ours: engine.fit for one epoch (Lightning, batches augmented on the device with the
    `readme` preset, validation loss/accuracy and train accuracy on a 5,000-image sample);
(b) the original way, the study's loop as written: per-image PIL transforms (the study's Compose)
    in a DataLoader, then validation loss, then accuracy over the whole training loader and over the
    validation loader;
(c) the compute floor: the same epoch's arithmetic with nothing else: forward, backward and Adam
    step on normalised batches already in memory, no augmentation, then the same metric forward
    passes (5,000 validation and 5,000 training-sample images) on batches already in memory.
All three train CIFAR10Net with batch 64 on the 45,000-image training split. With --model, (a) and (c) train that
model with its own recipe (optimiser and parameter groups as the engine makes them, the same precision): (a)/(c) is
the engine's overhead per epoch over a plain loop on the same batches.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import engine
from benchmarks.accuracy import get_accuracy
from functions import initialize_using_norm_kaiming, normalize
from models.study import CIFAR10Net


def ours(data: engine.SplitData, tmp: Path, model: str, precision: str) -> float:
    recipe = replace(engine.model_spec(model).recipe, epochs=1)
    config = engine.RunConfig(
        model=model,
        recipe=recipe,
        out_dir=str(tmp / "ours"),
        progress=False,
        analyses={"tsne": False},
        device="cpu",
        precision=precision,
        logger="none",
    )
    fitted = engine.fit(config, engine.model_spec(model), data, checkpoints=False)
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
    train_transform = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.RandomRotation(degrees=90),
            transforms.ColorJitter(brightness=0.5, hue=0.5, contrast=0.5, saturation=0.5),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_transform = transforms.Compose([transforms.ToTensor(), normalize])
    train_loader = DataLoader(
        PILImages(data.train_images, data.train_labels, train_transform), batch_size=64, shuffle=True
    )
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
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


def floor(data: engine.SplitData, model: str, precision: str) -> float:
    """One epoch's arithmetic with nothing else: the model's optimiser on batches already made, then the
    metric passes."""
    spec = engine.model_spec(model)
    recipe = replace(spec.recipe, epochs=1)
    net = spec.build()
    spec.initialize(net, data, recipe)
    module = engine.ImageClassifier(
        net,
        recipe,
        seed=0,
        steps_per_epoch=len(data.train_images) // recipe.batch_size,
        parameter_groups=spec.parameter_groups,
    )
    optimizer = module.make_optimizer()
    net = module.net
    reduction = module.training_loss_reduction()
    train = in_memory_batches(data.train_images, data.train_labels, recipe.batch_size, data)
    sample = len(data.val_images)
    evaluation = in_memory_batches(data.val_images, data.val_labels, engine.EVAL_BATCH, data) + in_memory_batches(
        data.train_images[:sample], data.train_labels[:sample], engine.EVAL_BATCH, data
    )
    autocast = engine.autocast_for(precision, torch.device("cpu"))
    started = time.perf_counter()
    net.train()
    for inputs, labels in train:
        optimizer.zero_grad()
        with autocast:
            logits = net(inputs)
        nn.functional.cross_entropy(
            logits.float(), labels, label_smoothing=recipe.label_smoothing, reduction=reduction
        ).backward()
        optimizer.step()
    net.eval()
    with torch.no_grad(), autocast:
        for inputs, labels in evaluation:
            nn.functional.cross_entropy(net(inputs).float(), labels)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_data_arguments(parser, limit_train=False)
    parser.add_argument("--out-dir", default="runs/bench_pipeline", help="scratch folder for the engine's run")
    parser.add_argument(
        "--rounds",
        type=engine.positive_int,
        default=2,
        help="times each way is measured, interleaved; the fastest of each counts (shared machines are noisy) "
        "(default 2)",
    )
    parser.add_argument(
        "--model",
        default="CIFAR10Net",
        help="a registered model, trained with its own recipe; the original loop only "
        "for CIFAR10Net (default CIFAR10Net)",
    )
    parser.add_argument(
        "--precision", default="32-true", choices=("32-true", "bf16-mixed"), help="on this CPU (default 32-true)"
    )
    args = parser.parse_args()
    engine.model_spec(args.model)
    torch.manual_seed(0)
    data = engine.SplitData.from_arrays(engine.load_dataset(args.data_dir, args.num_workers))
    print(f"{data.source}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    ways = {
        "floor": lambda: floor(data, args.model, args.precision),
        "ours": lambda: ours(data, Path(args.out_dir), args.model, args.precision),
    }
    if args.model == "CIFAR10Net":
        ways["original"] = lambda: original(data)
    rounds = {name: [] for name in ways}
    for round_number in range(args.rounds):
        for name, measure in ways.items():
            rounds[name].append(measure())
        print(
            f"round {round_number + 1}: "
            + ", ".join(f"{name} {seconds[-1]:.1f} s" for name, seconds in rounds.items()),
            flush=True,
        )
    times = {name: min(seconds) for name, seconds in rounds.items()}
    print(f"{args.model}, {args.precision}")
    print(f"(a) ours, engine + batched device augmentation + metrics: {times['ours']:.1f} s/epoch")
    if "original" in times:
        print(f"(b) original, the study's loop with per-image PIL transforms: {times['original']:.1f} s/epoch")
        print(f"speed-up (b)/(a) = {times['original'] / times['ours']:.2f}x")
    print(f"(c) compute floor, the same arithmetic on in-memory batches: {times['floor']:.1f} s/epoch")
    print(f"overhead (a)/(c) = {times['ours'] / times['floor']:.2f}x")


if __name__ == "__main__":
    engine.run_cli(main)
