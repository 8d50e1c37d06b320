"""The LightningModule that trains any registered network: one loss, the recipe's optimiser over the model's
parameter groups, the recipe's schedule, and per-epoch metrics summed on the device (no sync per step); and the
LightningDataModule that serves it ``engine.batches``' batches."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from engine.batches import EVAL_BATCH, TRAIN_ACCURACY_SAMPLE, EvalBatches, SplitData, TrainBatches, epoch_seed
from engine.config import Recipe
from engine.optimizers import MuonSGD, newton_schulz_dtype
from engine.registry import ParameterGroups, ProgressAware, one_group
from functions import count_correct

# the "plateau" schedule: halve the lr after an epoch without a better val_loss
PLATEAU_FACTOR, PLATEAU_PATIENCE = (0.5, 1)
TRIANGLE_START, TRIANGLE_PEAK_AT, TRIANGLE_END = 0.2, 0.23, 0.07  # airbench94's triangle, as fractions of the peak lr
DECOUPLED_EXAMPLES = 1024  # with --decoupled, --weight-decay is the decay per this many training examples

# An epoch of fewer steps than this (a batch holds a third of the training images or more) is a recipe made for far
# more data: FastVGG's batches of 512 make 320 images one step an epoch, 10 in its run (61% on 4 classes, against 70%
# in 400 steps of batch 32: docs/RESULTS.md, "A few hundred images of your own").
FEW_STEPS = 4
CIFAR10_TRAINING_IMAGES = 45_000  # the training split every registered recipe was made for


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, shape: str) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine or linear decay (or constant); or airbench's
    linear decay without warm-up, or its triangle."""
    if shape == "none":
        return 1.0
    if shape == "linear":
        return 1.0 - step / total_steps
    if shape == "triangle":
        peak = int(TRIANGLE_PEAK_AT * total_steps)
        if step < peak:
            return TRIANGLE_START + (1 - TRIANGLE_START) * step / peak
        return 1 + (TRIANGLE_END - 1) * (step - peak) / (total_steps - peak)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress


def warn_few_steps(model: str, recipe: Recipe, train_images: int) -> None:
    """A recipe made for CIFAR-10 hardly trains in a few steps an epoch (a small data set in large batches): say so,
    and what to change."""
    batch = recipe.batch_size
    steps = math.ceil(train_images / batch)
    if steps >= FEW_STEPS:
        return
    print(
        f"warning: an epoch is only {steps} step{'' if steps == 1 else 's'} here ({train_images} training images in "
        f"batches of {batch}), {recipe.training_steps(steps)} in the whole run, where {model}'s recipe takes "
        f"{recipe.training_steps(math.ceil(CIFAR10_TRAINING_IMAGES / batch))} on CIFAR-10: for a small data set give "
        'a smaller --batch-size with --lr lowered in proportion, and more --epochs (docs/data.md, "Your own data")',
        file=sys.stderr,
    )


class ImageClassifier(pl.LightningModule):
    """Trains ``net`` with cross-entropy; keeps per-epoch loss and accuracy sums on the device."""

    def __init__(
        self,
        net: nn.Module,
        recipe: Recipe,
        seed: int,
        steps_per_epoch: int,
        parameter_groups: ParameterGroups = one_group,
    ):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
        self.recipe, self.seed, self.steps_per_epoch = recipe, seed, steps_per_epoch
        self.parameter_groups = parameter_groups
        self.epoch_metrics: dict[str, float] = {}

    @property
    def total_steps(self) -> int:
        """This process's optimisation steps in the whole run, where the schedule and the lookahead end."""
        return self.recipe.training_steps(self.steps_per_epoch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy, the one loss of training and evaluation. Label smoothing applies only while training: the
        validation loss is the plain cross-entropy, comparable across recipes (and the best checkpoint's measure)."""
        smoothing = self.recipe.label_smoothing if self.training else 0.0
        return F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction=reduction)

    def training_loss_reduction(self) -> str:
        """The mean, or with --decoupled the sum over the batch: then the lr is a step per example, whatever the batch
        size.
        """
        return "sum" if self.recipe.decoupled else "mean"

    def on_train_epoch_start(self) -> None:
        # Dropout draws from the global generator: seed it per epoch so a resumed run repeats the full one.
        torch.manual_seed(epoch_seed(self.seed, self.current_epoch) + 1)
        # a network may keep parts in eval mode on purpose (frozen pretrained layers): its own train() knows
        self.net.train()
        self.train_loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.train_count = 0
        self.epoch_started = time.perf_counter()
        self.epoch_metrics = {}  # until the epoch's validation (if it has one) or its end: finish_epoch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if isinstance(self.net, ProgressAware):
            self.net.training_progress(self.current_epoch + batch_idx / self.steps_per_epoch)
        reduction = self.training_loss_reduction()
        loss = self.loss(self.net(images), labels, reduction)
        # no .item(): no device sync per step
        self.train_loss_sum += loss.detach() * (labels.numel() if reduction == "mean" else 1)
        self.train_count += labels.numel()
        return loss

    def on_validation_epoch_start(self) -> None:
        self.eval_sums = torch.zeros(2, 3, device=self.device, dtype=torch.float64)

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        images, labels = batch
        logits = self.net(images).float()
        correct = count_correct(logits, labels)
        self.eval_sums[dataloader_idx] += torch.stack(
            [
                self.loss(logits, labels, reduction="sum").double(),
                correct.double(),
                torch.tensor(labels.numel(), device=self.device, dtype=torch.float64),
            ]
        )

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.epoch_metrics = self.close_epoch(self.trainer.strategy.reduce(self.eval_sums, reduce_op="sum"))

    def finish_epoch(self) -> dict[str, float | None]:
        """The epoch's metrics, from its validation or, in an epoch without one (--val-every), its training loss alone.
        Every process calls it (the sums are reduced over all of them) before the one that reports uses them."""
        if not self.epoch_metrics:
            self.epoch_metrics = self.close_epoch(None)
        return self.epoch_metrics

    def close_epoch(self, eval_sums: torch.Tensor | None) -> dict[str, float | None]:
        """Per-epoch metrics from the sums; an evaluation the epoch did not run (no validation split, no training
        sample, or none this epoch) is None. Logged once an epoch (TensorBoard by default): the metrics a user watches
        live."""
        train = self.trainer.strategy.reduce(
            torch.stack([self.train_loss_sum, self.train_loss_sum.new_tensor(self.train_count)]), reduce_op="sum"
        )
        measured = {}
        for index, kind in enumerate(self.trainer.datamodule.eval_kinds if eval_sums is not None else ()):
            loss, correct, count = eval_sums[index].tolist()
            measured[kind] = (loss / count, correct / count)
        metrics = {
            "epoch": self.current_epoch + 1,
            "train_loss": (train[0] / train[1]).item(),
            "val_loss": measured["val"][0] if "val" in measured else None,
            "train_accuracy": measured["train"][1] if "train" in measured else None,
            "val_accuracy": measured["val"][1] if "val" in measured else None,
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
        }
        if "val" in measured:
            self.log_dict({"val_loss": metrics["val_loss"], "val_accuracy": metrics["val_accuracy"]}, prog_bar=True)
        # "epoch" as metrics.csv counts it, from 1 (Lightning would log its own, counted from 0).
        self.log_dict(
            {
                name: metrics[name]
                for name in ("epoch", "train_loss", "train_accuracy", "lr")
                if metrics[name] is not None
            }
        )
        return metrics

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The model's parameter groups, with Muon's own group of convolution filters, and weight decay per step."""
        r = self.recipe
        groups = self.parameter_groups(self.net, r)
        if r.optimizer == "muon":  # the 4-D parameters (convolution filters) of every group go to Muon
            filters = [p for group in groups for p in group["params"] if p.ndim == 4]
            groups = [dict(group, params=[p for p in group["params"] if p.ndim != 4]) for group in groups]
            groups = [group for group in groups if group["params"]]
            groups.append(
                {
                    "params": filters,
                    "lr": r.muon_lr,
                    "momentum": r.muon_momentum,
                    "weight_decay": r.muon_weight_decay,
                    "orthogonalize": True,
                    "renorm_every": r.muon_renorm_every,
                }
            )
        if r.decoupled:
            # weight decay per 1,024 examples; PyTorch decays by lr x weight_decay, so divide by the group's lr
            for group in groups:
                group["weight_decay"] = (
                    group.get("weight_decay", r.weight_decay)
                    * r.batch_size
                    / DECOUPLED_EXAMPLES
                    / group.get("lr", r.lr)
                )
        return groups

    def make_optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        groups = self.optimizer_groups()
        if r.optimizer == "muon":
            return MuonSGD(
                groups,
                lr=r.lr,
                momentum=r.momentum,
                weight_decay=r.weight_decay,
                newton_schulz_dtype=newton_schulz_dtype(self.device),
                batched=r.muon_batched,
            )
        if r.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=True, weight_decay=r.weight_decay)
        optimizer_class = torch.optim.AdamW if r.optimizer == "adamw" else torch.optim.Adam
        return optimizer_class(groups, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        r = self.recipe
        optimizer = self.make_optimizer()
        if r.scheduler == "plateau":
            schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "monitor": "val_loss", "interval": "epoch"},
            }
        total = self.total_steps
        warmup = round(r.warmup_epochs * self.steps_per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, total, warmup, r.scheduler)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class CIFAR10DataModule(pl.LightningDataModule):
    """Training batches are shuffled and augmented; validation, train-accuracy and test batches never are."""

    def __init__(
        self,
        data: SplitData,
        batch_size: int,
        augment: str,
        seed: int,
        train_accuracy_sample: int | None = None,
        epochs: float | None = None,
    ):
        super().__init__()
        self.data, self.batch_size, self.augment, self.seed = data, batch_size, augment, seed
        self.epochs = epochs  # with a fraction, the last epoch's batches are fewer (``TrainBatches``)
        # Training images measured for the train accuracy after a validated epoch: by default as many as the validation
        # split.
        self.train_accuracy_sample = (
            (len(data.val_images) or TRAIN_ACCURACY_SAMPLE) if train_accuracy_sample is None else train_accuracy_sample
        )
        # val_dataloader's order
        self.eval_kinds = ("train",) * bool(self.train_accuracy_sample) + ("val",) * bool(len(data.val_images))

    def setup(self, stage: str) -> None:
        self.data = self.data.to(self.trainer.strategy.root_device)

    def shard(self) -> dict[str, int]:
        return {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}

    def train_dataloader(self) -> TrainBatches:
        d = self.data
        return TrainBatches(
            d.train_images,
            d.train_labels,
            self.batch_size,
            self.augment,
            d.mean,
            d.std,
            self.seed,
            epoch=lambda: self.trainer.current_epoch,
            epochs=self.epochs,
            **self.shard(),
        )

    def eval_batches(self, images: torch.Tensor, labels: torch.Tensor) -> EvalBatches:
        return EvalBatches(images, labels, EVAL_BATCH, self.data.mean, self.data.std, **self.shard())

    def val_dataloader(self) -> list[EvalBatches]:
        """A fixed training sample for train accuracy, then the validation split: each if there is one
        (``eval_kinds``)."""
        d, sample = self.data, self.train_accuracy_sample
        images = {"train": (d.train_images[:sample], d.train_labels[:sample]), "val": (d.val_images, d.val_labels)}
        return [self.eval_batches(*images[kind]) for kind in self.eval_kinds]
