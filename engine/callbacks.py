"""What the Trainer does besides training, as Lightning callbacks and plugins: the per-epoch line, metrics.csv and
curves.png; stopping a run that diverges; which epochs are measured; a hook for tuning; the epoch bar; the run's
configuration stored in every checkpoint, written atomically."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.plugins.io import TorchCheckpointIO

from engine.classifier import ImageClassifier
from engine.config import RunConfig
from engine.errors import TrainingDiverged
from engine.files import write_atomically
from engine.plots import plot_curves
from engine.run_folder import write_metrics_csv

# Cross-entropy over 10 classes starts near ln 10 = 2.3, and a poor but sound run stays within hundreds
# (BatchNorm statistics that lag a high learning rate); above 10,000 the weights have blown up.
DIVERGED_LOSS = 1e4


# airbench94's: a pull every 5 steps, the average's decay at most 0.95 a step
LOOKAHEAD_EVERY, LOOKAHEAD_DECAY = (5, 0.95)


def lookahead_decay(step: int, total_steps: int) -> float | None:
    """How much of the average stays when the network is pulled to it after ``step`` steps; None: no pull then.

    Every 5 steps, with a decay that grows with the cube of progress (the early average follows the network closely);
    after the last step, 1: the network ends as the average.
    """
    if step >= total_steps:
        return 1.0
    if step % LOOKAHEAD_EVERY == 0:
        return LOOKAHEAD_DECAY**LOOKAHEAD_EVERY * (step / total_steps) ** 3
    return None


class Lookahead(Callback):
    """airbench94's lookahead: an average of the weights (and BatchNorm statistics) that the network is pulled back to.

    Lightning's own weight averaging keeps an average beside the network for evaluation; lookahead also sets the
    training weights to it, which is the point. The average is in every checkpoint, so a resumed run pulls to it too.
    """

    def __init__(self):
        self.average: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        state = module.net.state_dict()
        if self.average is None:
            self.average = {
                key: value.detach().clone() for key, value in state.items() if value.dtype.is_floating_point
            }
        self.average = {key: value.to(state[key].device) for key, value in self.average.items()}  # restored on the CPU

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, module: ImageClassifier, *args) -> None:
        decay = lookahead_decay(trainer.global_step, module.total_steps)
        if decay is None:
            return
        state = module.net.state_dict()
        for key, average in self.average.items():
            average.lerp_(state[key], 1 - decay)
            state[key].copy_(average)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.average = state_dict["average"]


# curves.png is redrawn after an epoch only when this long has passed since the last drawing: drawing takes about
# 0.16 s, a quarter of a FastVGG epoch on a GPU, so short epochs must not each pay for it.
CURVES_EVERY_S = 30.0


# The per-epoch line's metrics, in the original study's order.
MEASURED = (
    ("train_loss", "training loss"),
    ("val_loss", "validation loss"),
    ("train_accuracy", "training accuracy"),
    ("val_accuracy", "validation accuracy"),
)


class RunRecorder(Callback):
    """After every epoch: the original study's console line and ``metrics.csv``; ``curves.png`` at most every half
    minute, and when training stops. Resumes with the run (its history is in the checkpoints)."""

    def __init__(self, run_dir: Path, title: str):
        self.run_dir, self.title = run_dir, title
        self.history: list[dict[str, float]] = []
        self.curves_drawn = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        metrics = dict(module.finish_epoch(), seconds=time.perf_counter() - module.epoch_started)
        if not trainer.is_global_zero:
            return
        self.history.append(metrics)
        # --val-every: not each epoch
        measured = [
            f"{label} = {metrics[key]:.2%}" if key.endswith("accuracy") else f"{label} = {metrics[key]:.4f}"
            for key, label in MEASURED
            if metrics[key] is not None
        ]
        line = f"After epoch {metrics['epoch']}: " + ", ".join(measured) + f" ({metrics['seconds']:.1f} s)"
        bar = trainer.progress_bar_callback
        bar.print(line) if isinstance(bar, TQDMProgressBar) else print(line, flush=True)
        write_metrics_csv(self.run_dir / "metrics.csv", self.history)
        if time.monotonic() - self.curves_drawn >= CURVES_EVERY_S:
            self.draw_curves()

    def draw_curves(self) -> None:
        plot_curves(self.history, self.run_dir / "curves.png", self.title)
        self.curves_drawn = time.monotonic()

    def on_train_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        if self.history and trainer.is_global_zero:
            self.draw_curves()

    def on_exception(self, trainer: pl.Trainer, module: ImageClassifier, exception: BaseException) -> None:
        self.on_train_end(trainer, module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


class DivergenceGuard(Callback):
    """Stops the run in the epoch its loss becomes NaN, infinite or explodes, before that epoch's checkpoints are
    written: after its validation, or at its end in an epoch without one."""

    def on_validation_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        self.check(module.epoch_metrics, module)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        self.check(module.finish_epoch(), module)

    @staticmethod
    def check(metrics: dict[str, float | None], module: ImageClassifier) -> None:
        for key, name in (("val_loss", "validation loss"), ("train_loss", "training loss")):
            if metrics[key] is not None and not metrics[key] <= DIVERGED_LOSS:  # also true for NaN
                raise TrainingDiverged(name, metrics[key], metrics["epoch"], module.recipe.lr)


class ValidationSchedule(Callback):
    """--val-every N: the evaluation passes (validation split, training sample) after every N-th epoch and after the
    last; none with 0. Sets Lightning's check_val_every_n_epoch for each epoch, as its own rule alone would skip the
    last."""

    def __init__(self, every: int):
        self.every = every

    def on_train_epoch_start(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        epoch = trainer.current_epoch + 1
        due = self.every > 0 and (epoch % self.every == 0 or epoch == trainer.max_epochs)
        trainer.check_val_every_n_epoch = 1 if due else trainer.max_epochs + 1


class EpochCheckpoints(Callback):
    """--keep-epoch-checkpoints: after each epoch, a whole checkpoint of its own, epoch-NNN.ckpt (counted from 1, as
    metrics.csv).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_epoch_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        # whole, as last.ckpt
        trainer.save_checkpoint(self.run_dir / f"epoch-{trainer.current_epoch + 1:03d}.ckpt", weights_only=False)


class AfterValidation(Callback):
    """Hands each epoch's metrics to a plain function once its validation is done (after the divergence guard: never a
    NaN), in the process that reports; what it raises ends the run. Hyperparameter tuning prunes and counts epochs
    with it, without a Lightning class of its own (so its --help need not load Lightning)."""

    def __init__(self, hook: Callable[[dict[str, Any]], None]):
        self.hook = hook

    def on_validation_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        if trainer.is_global_zero and module.epoch_metrics:
            self.hook(dict(module.epoch_metrics))


class ConfigInCheckpoint(Callback):
    """Stores the run's configuration and model card in every checkpoint: a resume checks it is the same model, and a
    checkpoint alone says how to feed its network (``model_card``)."""

    def __init__(self, config: RunConfig, card: dict[str, Any]):
        self.config, self.card = config, card

    def on_save_checkpoint(self, trainer, module, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_config"] = json.loads(json.dumps(asdict(self.config)))
        checkpoint["model_card"] = self.card


class EpochProgressBar(TQDMProgressBar):
    """Lightning's training bar, its epochs counted from 1 as the per-epoch lines count them; no bars for validation,
    which runs in a second or two and would only push the per-epoch lines apart."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        # Lightning's own version names the epoch from 0, and draws that before any change could reach the screen.
        self.train_progress_bar.reset(total=convert_inf(self.total_train_batches))
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed; read back with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        write_atomically(Path(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
