"""The LightningModule that trains any registered network: one loss, the recipe's optimiser over the model's
parameter groups, the recipe's schedule, and per-epoch metrics summed on the device (no sync per step)."""
from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from engine.batches import epoch_seed
from engine.config import Recipe
from engine.optimizers import MuonSGD
from engine.registry import ParameterGroups, one_group

PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 1  # the "plateau" schedule: halve the lr after an epoch without a better val_loss
TRIANGLE_START, TRIANGLE_PEAK_AT, TRIANGLE_END = 0.2, 0.23, 0.07  # airbench94's triangle, as fractions of the peak lr
DECOUPLED_EXAMPLES = 1024  # with --decoupled, --weight-decay is the decay per this many training examples


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


class ImageClassifier(pl.LightningModule):
    """Trains ``net`` with cross-entropy; keeps per-epoch loss and accuracy sums on the device."""

    def __init__(self, net: nn.Module, recipe: Recipe, seed: int, steps_per_epoch: int,
                 parameter_groups: ParameterGroups = one_group):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
        self.recipe, self.seed, self.steps_per_epoch = recipe, seed, steps_per_epoch
        self.parameter_groups = parameter_groups
        self.epoch_metrics: dict[str, float] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy, the one loss of training and evaluation. Label smoothing applies only while training: the
        validation loss is the plain cross-entropy, comparable across recipes (and the best checkpoint's measure)."""
        smoothing = self.recipe.label_smoothing if self.training else 0.0
        return F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction=reduction)

    def training_loss_reduction(self) -> str:
        """The mean, or with --decoupled the sum over the batch: then the lr is a step per example, whatever the batch size."""
        return "sum" if self.recipe.decoupled else "mean"

    def on_train_epoch_start(self) -> None:
        # Dropout draws from the global generator: seed it per epoch so a resumed run repeats the full one.
        torch.manual_seed(epoch_seed(self.seed, self.current_epoch) + 1)
        self.net.train()  # a network may keep parts in eval mode on purpose (frozen pretrained layers): its own train() knows
        if hasattr(self.net, "start_epoch"):  # a network that changes itself between epochs (airbench's stem bias stops learning)
            self.net.start_epoch(self.current_epoch)
        self.train_loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.train_count = 0
        self.epoch_started = time.perf_counter()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        reduction = self.training_loss_reduction()
        loss = self.loss(self.net(images), labels, reduction)
        self.train_loss_sum += loss.detach() * (labels.numel() if reduction == "mean" else 1)  # no .item(): no device sync per step
        self.train_count += labels.numel()
        return loss

    def on_validation_epoch_start(self) -> None:
        self.eval_sums = torch.zeros(2, 3, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        logits = self.net(images).float()
        correct = (logits.argmax(1) == labels).sum()
        self.eval_sums[dataloader_idx] += torch.stack([self.loss(logits, labels, reduction="sum").double(), correct.double(),
                                                       torch.tensor(labels.numel(), device=self.device, dtype=torch.float64)])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        reduce = self.trainer.strategy.reduce
        sums = reduce(self.eval_sums, reduce_op="sum")
        train = reduce(torch.stack([self.train_loss_sum, self.train_loss_sum.new_tensor(self.train_count)]), reduce_op="sum")
        validated = sums[1, 2] > 0  # no validation split: a final run on every training image
        val_loss, val_acc = ((sums[1, 0] / sums[1, 2]).item(), (sums[1, 1] / sums[1, 2]).item()) if validated else (None, None)
        self.epoch_metrics = {
            "epoch": self.current_epoch + 1,
            "train_loss": (train[0] / train[1]).item(),
            "val_loss": val_loss,
            "train_accuracy": (sums[0, 1] / sums[0, 2]).item(),
            "val_accuracy": val_acc,
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
        }
        if validated:
            self.log_dict({"val_loss": val_loss, "val_accuracy": val_acc}, prog_bar=True)
        # Once an epoch, to the logger (TensorBoard by default): the metrics a user watches live.
        # "epoch" as metrics.csv counts it, from 1 (Lightning would log its own, counted from 0).
        self.log_dict({name: self.epoch_metrics[name] for name in ("epoch", "train_loss", "train_accuracy", "lr")})

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The model's parameter groups, with Muon's own group of convolution filters, and weight decay per step."""
        r = self.recipe
        groups = self.parameter_groups(self.net, r)
        if r.optimizer == "muon":  # the 4-D parameters (convolution filters) of every group go to Muon
            filters = [p for group in groups for p in group["params"] if p.ndim == 4]
            groups = [dict(group, params=[p for p in group["params"] if p.ndim != 4]) for group in groups]
            groups = [group for group in groups if group["params"]]
            groups.append({"params": filters, "lr": r.muon_lr, "momentum": r.muon_momentum, "weight_decay": 0.0, "orthogonalize": True})
        if r.decoupled:  # weight decay per 1,024 examples; PyTorch decays by lr x weight_decay, so divide by the group's lr
            for group in groups:
                group["weight_decay"] = group.get("weight_decay", r.weight_decay) * r.batch_size / DECOUPLED_EXAMPLES / group.get("lr", r.lr)
        return groups

    def make_optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        groups = self.optimizer_groups()
        if r.optimizer == "muon":
            return MuonSGD(groups, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
        if r.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=True, weight_decay=r.weight_decay)
        optimizer_class = torch.optim.AdamW if r.optimizer == "adamw" else torch.optim.Adam
        return optimizer_class(groups, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        r = self.recipe
        optimizer = self.make_optimizer()
        if r.scheduler == "plateau":
            schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "monitor": "val_loss", "interval": "epoch"}}
        total = r.epochs * self.steps_per_epoch
        warmup = round(r.warmup_epochs * self.steps_per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, total, warmup, r.scheduler))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
