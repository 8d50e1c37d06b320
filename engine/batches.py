"""Batches made on the device: the study's split of the data, shuffled and augmented training batches, plain evaluation
batches (the Lightning DataModule that serves them to the Trainer is in ``engine.classifier``).

Images stay uint8 on the training device; each chunk of batches is turned into normalised floats there. The
augmentation lives in ``TrainBatches`` and only there, so evaluation can never be augmented by mistake.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import torch

from engine.config import RunConfig, training_steps
from engine.data import VAL_FRACTION, DatasetArrays, load_dataset, quoted, split_train_val
from engine.devices import is_main_process
from engine.errors import UserError
from functions import AUGMENTATIONS, mean_std_per_channel, model_input

EVAL_BATCH = 500  # images per evaluation batch: large, as nothing is kept for a backward pass
TRAIN_ACCURACY_SAMPLE = 5000  # training images measured after each epoch when there is no validation split to match


def epoch_steps(images: int, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
    """The batches of a whole epoch in one process (each of a data-parallel run's takes every ``world_size``-th
    image)."""
    return math.ceil(len(range(rank, images, world_size)) / batch_size)


def epoch_seed(seed: int, epoch: int) -> int:
    """One independent stream per (seed, epoch): a resumed run draws exactly what the full run drew."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


class TrainBatches:
    """One epoch of shuffled, augmented, normalised training batches per iteration.

    The augmentation lives here and only here, so evaluation batches (``EvalBatches``) cannot be
    augmented by mistake. Chunks of many batches are augmented at once to amortise per-call costs.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        augmentation: str,
        mean: torch.Tensor,
        std: torch.Tensor,
        seed: int,
        epoch: Callable[[], int],
        rank: int = 0,
        world_size: int = 1,
        epochs: float | None = None,
    ):
        self.images, self.labels = images, labels
        self.epochs = epochs  # the run's, whole or with a fraction: a last epoch in part is shorter
        self.batch_size, self.augmentation = batch_size, augmentation
        self.mean, self.std = mean.to(images.device), std.to(images.device)
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.chunk = batch_size * max(1, 2048 // batch_size)
        self.first_flip = None  # for alternating flips: whether each image is mirrored in the even epochs
        if AUGMENTATIONS[augmentation].alternating_flip:
            # the same in every epoch, and after a resume
            start = torch.Generator(device=images.device).manual_seed(seed)
            self.first_flip = torch.rand(len(images), generator=start, device=images.device) < 0.5

    def __len__(self) -> int:
        """The batches of the current epoch: all of them, or, in a last epoch in part, what the run's steps leave."""
        steps = epoch_steps(len(self.images), self.batch_size, self.rank, self.world_size)
        if self.epochs is None:
            return steps
        return max(0, min(steps, training_steps(self.epochs, steps) - self.epoch() * steps))  # none after the last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # a last epoch in part stops early: its batches are the whole epoch's first, augmented alike
        return itertools.islice(self.whole_epoch(), len(self))

    def whole_epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device, epoch = self.images.device, self.epoch()
        generator = torch.Generator(device=device).manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(len(self.images), generator=generator, device=device)[self.rank :: self.world_size]
        for start in range(0, len(order), self.chunk):
            index = order[start : start + self.chunk]
            hflip = None if self.first_flip is None else self.first_flip[index] ^ bool(epoch % 2)
            images = model_input(self.images[index], self.mean, self.std, self.augmentation, generator, hflip)
            labels = self.labels[index]
            for offset in range(0, len(index), self.batch_size):
                yield images[offset : offset + self.batch_size], labels[offset : offset + self.batch_size]


class EvalBatches:
    """Normalised, never augmented, in a fixed order; optionally every ``world_size``-th image from ``rank``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.batch_size = batch_size
        self.mean, self.std = mean.to(images.device), std.to(images.device)

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            yield (
                model_input(self.images[start : start + self.batch_size], self.mean, self.std),
                self.labels[start : start + self.batch_size],
            )


@dataclass
class SplitData:
    """The original study's split of ``DatasetArrays`` and the training statistics used for every split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    classes: tuple[str, ...]
    source: str

    @classmethod
    def from_arrays(
        cls,
        data: DatasetArrays,
        limit_train: int | None = None,
        validation: bool = True,
        val_fraction: float = VAL_FRACTION,
    ) -> SplitData:
        """The study's 45,000 / 5,000 split (``val_fraction`` of another data set's training images validate); without
        ``validation``, every training image trains (a final run)."""
        train_index, val_index = split_train_val(len(data.train_images), val_fraction)
        if not validation:
            train_index, val_index = torch.arange(len(data.train_images)), val_index[:0]
        if limit_train is not None:
            train_index = train_index[:limit_train]
        train_images = data.train_images[train_index]
        mean, std = mean_std_per_channel(train_images)
        return cls(
            train_images,
            data.train_labels[train_index],
            data.train_images[val_index],
            data.train_labels[val_index],
            data.test_images,
            data.test_labels,
            mean,
            std,
            data.classes,
            data.source,
        )

    def to(self, device: torch.device) -> SplitData:
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


def classes_without_training_images(data: DatasetArrays, train_index: torch.Tensor) -> list[str]:
    """The classes of which the split puts every training image into validation (a class with one image, say)."""
    trained = set(data.train_labels[train_index].tolist())
    return [name for label, name in enumerate(data.classes) if label not in trained]


def note_unlearnable_classes(data: DatasetArrays, val_fraction: float) -> None:
    """Say so when the split leaves a class without a training image: the run would go on and never learn it."""
    train_index, _ = split_train_val(len(data.train_images), val_fraction)
    missing = classes_without_training_images(data, train_index)
    if missing:
        one = len(missing) == 1
        named = f"the class {quoted(missing)}" if one else f"{len(missing)} classes ({quoted(missing)})"
        print(
            f"note: the {1 - val_fraction:.0%}/{val_fraction:.0%} split of the {len(data.train_images)} training "
            f"images leaves {named} without a training image, so the model cannot learn {'it' if one else 'them'}; "
            f"give {'it' if one else 'them'} more images, or train on every image with --no-validation",
            file=sys.stderr,
        )


def load_split(config: RunConfig) -> SplitData:
    if config.limit_train is not None and config.limit_train < 2:
        raise UserError(f"--limit-train {config.limit_train} leaves too few images to train on; give at least 2")
    arrays = load_dataset(config.data_dir, config.num_workers, config.dataset)
    if config.validation and is_main_process():  # once, not once per data-parallel process
        note_unlearnable_classes(arrays, config.val_fraction)
    data = SplitData.from_arrays(arrays, config.limit_train, config.validation, config.val_fraction)
    if len(data.train_images) < 2 or (config.validation and len(data.val_images) < 1):
        raise UserError(
            f"{config.data_dir} holds too few training images to split "
            f"{1 - config.val_fraction:.0%}/{config.val_fraction:.0%}; it needs more, or a larger --val-fraction"
        )
    return data
