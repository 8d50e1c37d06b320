"""The one training engine behind all four scripts, built on PyTorch Lightning.

``train(config, net)`` is the whole story of a run: load the data, fit with Lightning (progress
bar, checkpoint every epoch, resume, mixed precision, multi-GPU strategies), then measure the test
set and write the run folder. The scripts only choose the network and the recipe.
"""
from __future__ import annotations

import argparse
import csv
import errno
import functools
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

import functions as fn
from functions import UserError

# Lightning's advertisement and two warnings that say nothing to our users (a resumed run folder is not empty by design).
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "Tip:" not in str(record.msg))
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Frozen pretrained layers stay in eval mode on purpose (transfer learning): nothing to warn about.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# The logged validation metrics are computed from sums already reduced over all processes: syncing them again is redundant.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val_")

# --------------------------------------------------------------------------------------------
# Configuration: the README's recipe is the default, every part of it a flag
# --------------------------------------------------------------------------------------------
OPTIMIZERS = ("adam", "adamw", "sgd")
TTA_MODES = {
    "none": "the image alone",
    "flip": "the image and its mirror image, averaged",
    "flip-translate": "half the flip average, half the flip averages of the image shifted one pixel up-left and one down-right "
                      "(reflect-padded): 6 forward passes",
}
SCHEDULERS = {
    "none": "constant",
    "cosine": "linear warm-up, then cosine decay to 0, per step",
    "onecycle": "linear warm-up, then linear decay to 0, per step",
}


@dataclass
class Recipe:
    """How a network is trained. Defaults are the README's recipe for CIFAR10Net."""

    epochs: int = 100
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    scheduler: str = "none"
    warmup_epochs: float = 0.0
    augment: str = "readme"
    tta: str = "none"


@dataclass
class RunConfig:
    """Everything that decides a run; written to ``config.json`` in the run folder."""

    model: str
    recipe: Recipe = field(default_factory=Recipe)
    data_dir: str = "./data"
    out_dir: str = ""
    seed: int = 0
    limit_train: int | None = None
    num_workers: int = 2
    device: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    precision: str = "auto"
    compile: bool = False
    resume: str | None = None
    overwrite: bool = False
    progress: bool = True
    tsne: bool = True
    tsne_samples: int | None = None
    tsne_method: str = "auto"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def beta(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser, recipe: Recipe, run_name: str,
                           schedulers: dict[str, str] | None = None) -> None:
    """The flags every training script shares; ``recipe`` supplies the defaults shown in --help.

    ``schedulers`` adds script-specific learning-rate schedules (name: description) to the engine's.
    """
    r = recipe
    group = parser.add_argument_group("recipe (defaults: the README's recipe for this model)")
    group.add_argument("--epochs", type=positive_int, help=f"passes over the training split (default {r.epochs})")
    group.add_argument("--batch-size", type=positive_int, help=f"images per optimisation step (default {r.batch_size})")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help=f"adam, adamw, or sgd with Nesterov momentum (default {r.optimizer})")
    group.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {r.lr:g})")
    group.add_argument("--betas", type=beta, nargs=2, metavar=("BETA1", "BETA2"), help=f"Adam's betas (default {r.betas[0]} {r.betas[1]})")
    group.add_argument("--momentum", type=beta, help=f"SGD's Nesterov momentum (default {r.momentum})")
    group.add_argument("--weight-decay", type=non_negative_float, help=f"L2 penalty (default {r.weight_decay:g})")
    group.add_argument("--label-smoothing", type=beta, help=f"cross-entropy label smoothing (default {r.label_smoothing})")
    schedule_help = dict(SCHEDULERS, **(schedulers or {}))
    group.add_argument("--scheduler", choices=tuple(schedule_help), help="learning-rate schedule: "
                       + "; ".join(f"{k}: {v}" for k, v in schedule_help.items()) + f" (default {r.scheduler})")
    group.add_argument("--warmup-epochs", type=non_negative_float, help=f"epochs of linear warm-up for cosine/onecycle (default {r.warmup_epochs})")
    group.add_argument("--augment", choices=tuple(fn.AUGMENT_PRESETS), help="training augmentation, done in batches on the device: "
                       + "; ".join(f"{k}: {v}" for k, v in fn.AUGMENT_PRESETS.items()) + f" (default {r.augment})")
    group.add_argument("--tta", choices=tuple(TTA_MODES), help="test-time augmentation, the class scores of each test image from: "
                       + "; ".join(f"{k}: {v}" for k, v in TTA_MODES.items()) + f" (default {r.tta})")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", default="./data", help="folder with CIFAR-10: the official 'cifar-10-batches-py' folder, or an image-folder tree "
                       "train/<class>/*.png|jpg and test/<class>/... (the folder itself or one sub-folder); if neither is there, torchvision downloads "
                       "the official archive into it (default ./data)")
    group.add_argument("--limit-train", type=positive_int, metavar="N", help="train on only the first N images of the 45,000-image training split, for a quick look")
    group.add_argument("--num-workers", type=positive_int, default=2, help="threads that decode an image-folder tree the first time (later runs read the cache) (default 2)")

    group = parser.add_argument_group("run")
    group.add_argument("--out-dir", help=f"run folder for every output (default runs/{run_name})")
    group.add_argument("--seed", type=non_negative_int, default=0, help="seeds initialisation, shuffling, augmentation and dropout; the 45k/5k split is always the README's (default 0)")
    group.add_argument("--resume", nargs="?", const="last", metavar="CKPT", help="continue an interrupted run: with no value, from last.ckpt in --out-dir; or from the checkpoint given")
    group.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir (without it, a folder that holds a run's results is "
                       "refused: continue it with --resume or choose another --out-dir)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "gpu", "mps"), help="where to train (default auto: cuda, else mps, else cpu)")
    group.add_argument("--devices", default="auto", help="how many devices, or which, passed to Lightning (e.g. 4, or 0,1) (default auto)")
    group.add_argument("--strategy", default="auto", help="Lightning's distribution strategy, e.g. ddp for data-parallel over several GPUs or nodes (default auto)")
    group.add_argument("--precision", default="auto", help="Lightning precision, e.g. 32-true, bf16-mixed, 16-mixed (default auto: bf16-mixed on CUDA, else 32-true)")
    group.add_argument("--compile", action="store_true", help="torch.compile the network: fuses its layers into fewer, faster kernels "
                       "after a one-off compilation (tens of seconds; needs a C++ compiler on CPU)")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar (the per-epoch line stays)")

    group = parser.add_argument_group("analysis")
    group.add_argument("--no-tsne", dest="tsne", action="store_false", help="skip the t-SNE plots of penultimate features at the end")
    group.add_argument("--tsne-samples", type=positive_int, metavar="N", help="embed a class-stratified sample of N points per split instead of all")
    group.add_argument("--tsne-method", default="auto", choices=("auto", "opentsne", "sklearn"), help="t-SNE implementation: openTSNE's FFT-accelerated one, or scikit-learn's (default auto: openTSNE if installed)")


RECIPE_FLAGS = {f.name for f in fields(Recipe)}


def config_from_args(args: argparse.Namespace, model: str, recipe: Recipe, run_name: str) -> RunConfig:
    """The recipe with every flag the user gave laid over it."""
    given = {name: value for name, value in vars(args).items() if name in RECIPE_FLAGS and value is not None}
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    settings = {f.name: getattr(args, f.name) for f in fields(RunConfig)
                if f.name not in ("model", "recipe", "out_dir") and hasattr(args, f.name)}
    return RunConfig(model=model, recipe=replace(recipe, **given), out_dir=args.out_dir or str(Path("runs") / run_name), **settings)


class RunInterrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (a job scheduler) arrived. A BaseException, so no ``except Exception`` swallows it.

    On its way up, the code that knows fills in what is kept (``saved``) and, where the flags that continue
    differ from the run's own plus --resume, the command that continues (``continue_command``).
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved: str | None = None
        self.continue_command: str | None = None


class TrainingDiverged(Exception):
    """The loss became NaN, infinite or exploded: later epochs cannot rescue the run."""

    def __init__(self, loss_name: str, value: float, epoch: int, lr: float):
        super().__init__(f"training diverged: the {loss_name} is {value:.3g} after epoch {epoch}; lower the learning rate "
                         f"(--lr, now {lr:g}) and start again; no model.pth was written"
                         + (", last.ckpt keeps the last good epoch" if epoch > 1 else ""))
        self.loss_name, self.value, self.epoch = loss_name, value, epoch


def raise_interrupted(signum: int, frame) -> None:
    raise RunInterrupted(signum)


def is_main_process() -> bool:
    """False in the extra processes of data-parallel training (Lightning, torchrun and SLURM set these): the first one owns the run."""
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def resume_command(argv: list[str]) -> str:
    """The command line that continues the run ``argv`` started: the same flags, without --overwrite, with --resume."""
    args, skip_value = [], False
    for arg in argv[1:]:
        if skip_value and not arg.startswith("-"):
            skip_value = False
            continue
        skip_value = arg == "--resume"
        if arg in ("--overwrite", "--resume") or arg.startswith("--resume="):
            continue
        args.append(arg)
    return shlex.join(["python", argv[0], *args, "--resume"])


def interrupted_message(interrupt: RunInterrupted) -> str:
    """One line: which signal, what is kept, and the command that continues (only if there is something to continue)."""
    if interrupt.saved is None:
        return f"interrupted by {interrupt} before anything was saved: nothing to resume; run the same command to start again"
    return f"interrupted by {interrupt}: {interrupt.saved}; continue with: {interrupt.continue_command or resume_command(sys.argv)}"


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main`` with the toolkit's exit statuses, each with one line on stderr.

    0 done; 1 training diverged or the disk filled up; 2 a mistake in the command or the data (``UserError``);
    130 Ctrl-C (SIGINT) and 143 SIGTERM, after saying what was saved and how to continue.
    """
    handlers = {signum: signal.signal(signum, raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({error.filename or error}); the files written before stay as they were: free some space, "
              f"then continue with: {resume_command(sys.argv)}", file=sys.stderr)
        sys.exit(1)
    except (RunInterrupted, KeyboardInterrupt) as interrupt:
        if not isinstance(interrupt, RunInterrupted):
            interrupt = RunInterrupted(signal.SIGINT)
        if is_main_process():
            print(f"\n{interrupted_message(interrupt)}", file=sys.stderr)
        sys.exit(128 + interrupt.signum)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------------------------
# Data module: uint8 tensors on the device, batches made there
# --------------------------------------------------------------------------------------------
@dataclass
class SplitData:
    """The README's split of ``fn.CIFAR10Arrays`` and the training statistics used for every split."""

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
    def from_arrays(cls, data: fn.CIFAR10Arrays, limit_train: int | None = None) -> "SplitData":
        train_index, val_index = fn.split_train_val(len(data.train_images))
        if limit_train is not None:
            train_index = train_index[:limit_train]
        train_images = data.train_images[train_index]
        mean, std = fn.mean_std_per_channel(train_images)
        return cls(train_images, data.train_labels[train_index], data.train_images[val_index], data.train_labels[val_index],
                   data.test_images, data.test_labels, mean, std, data.classes, data.source)

    def to(self, device: torch.device) -> "SplitData":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


class CIFAR10DataModule(pl.LightningDataModule):
    """Training batches are shuffled and augmented; validation, train-accuracy and test batches never are."""

    EVAL_BATCH = 500

    def __init__(self, data: SplitData, batch_size: int, augment: str, seed: int):
        super().__init__()
        self.data, self.batch_size, self.augment, self.seed = data, batch_size, augment, seed

    def setup(self, stage: str) -> None:
        self.data = self.data.to(self.trainer.strategy.root_device)

    def shard(self) -> dict[str, int]:
        return {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}

    def train_dataloader(self) -> fn.TrainBatches:
        d = self.data
        return fn.TrainBatches(d.train_images, d.train_labels, self.batch_size, self.augment, d.mean, d.std,
                               self.seed, epoch=lambda: self.trainer.current_epoch, **self.shard())

    def eval_batches(self, images: torch.Tensor, labels: torch.Tensor) -> fn.EvalBatches:
        return fn.EvalBatches(images, labels, self.EVAL_BATCH, self.data.mean, self.data.std, **self.shard())

    def val_dataloader(self) -> list[fn.EvalBatches]:
        """The validation split, then a fixed training sample of the same size for train accuracy."""
        d = self.data
        sample = len(d.val_images)
        return [self.eval_batches(d.val_images, d.val_labels), self.eval_batches(d.train_images[:sample], d.train_labels[:sample])]


# --------------------------------------------------------------------------------------------
# Lightning module: any network, the recipe's loss, optimiser and schedule
# --------------------------------------------------------------------------------------------
def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, shape: str) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine or linear decay (or constant)."""
    if shape == "none":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress


class ImageClassifier(pl.LightningModule):
    """Trains ``net`` with cross-entropy; keeps per-epoch loss and accuracy sums on the device."""

    def __init__(self, net: nn.Module, recipe: Recipe, seed: int, steps_per_epoch: int):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
        self.recipe, self.seed, self.steps_per_epoch = recipe, seed, steps_per_epoch
        self.epoch_metrics: dict[str, float] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_train_epoch_start(self) -> None:
        # Dropout draws from the global generator: seed it per epoch so a resumed run repeats the full one.
        torch.manual_seed(fn.epoch_seed(self.seed, self.current_epoch) + 1)
        self.train_loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.train_count = 0
        self.epoch_started = time.perf_counter()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels, label_smoothing=self.recipe.label_smoothing)
        self.train_loss_sum += loss.detach() * labels.numel()  # no .item(): no device sync per step
        self.train_count += labels.numel()
        return loss

    def on_validation_epoch_start(self) -> None:
        self.eval_sums = torch.zeros(2, 3, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        logits = self.net(images).float()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(1) == labels).sum()
        self.eval_sums[dataloader_idx] += torch.stack([loss.double(), correct.double(),
                                                       torch.tensor(labels.numel(), device=self.device, dtype=torch.float64)])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        reduce = self.trainer.strategy.reduce
        sums = reduce(self.eval_sums, reduce_op="sum")
        train = reduce(torch.stack([self.train_loss_sum, self.train_loss_sum.new_tensor(self.train_count)]), reduce_op="sum")
        val_loss, val_acc = (sums[0, 0] / sums[0, 2]).item(), (sums[0, 1] / sums[0, 2]).item()
        self.epoch_metrics = {
            "epoch": self.current_epoch + 1,
            "train_loss": (train[0] / train[1]).item(),
            "val_loss": val_loss,
            "train_accuracy": (sums[1, 1] / sums[1, 2]).item(),
            "val_accuracy": val_acc,
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
        }
        self.log_dict({"val_loss": val_loss, "val_accuracy": val_acc}, prog_bar=True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameters to optimise; transfer learning overrides this to freeze or slow the backbone."""
        return [{"params": [p for p in self.net.parameters() if p.requires_grad]}]

    def make_optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        groups = self.parameter_groups()
        if r.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=True, weight_decay=r.weight_decay)
        optimizer_class = torch.optim.AdamW if r.optimizer == "adamw" else torch.optim.Adam
        return optimizer_class(groups, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        r = self.recipe
        optimizer = self.make_optimizer()
        total = r.epochs * self.steps_per_epoch
        warmup = round(r.warmup_epochs * self.steps_per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, total, warmup, r.scheduler))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# --------------------------------------------------------------------------------------------
# Callbacks and checkpoint IO: the run folder
# --------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed; read back with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        fn.write_atomically(Path(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "seconds")


class RunRecorder(Callback):
    """After every epoch: the README's console line and ``metrics.csv``; ``curves.png`` when training stops. Resumes with the run.

    The figure is drawn once, at the end or on an interruption: drawing it takes about 0.16 s, a quarter of a FastVGG epoch on a GPU.
    """

    def __init__(self, run_dir: Path, title: str):
        self.run_dir, self.title = run_dir, title
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        if not module.epoch_metrics or not trainer.is_global_zero:
            return
        metrics = dict(module.epoch_metrics, seconds=time.perf_counter() - module.epoch_started)
        self.history.append(metrics)
        line = (f"After epoch {metrics['epoch']}: training loss = {metrics['train_loss']:.4f}, validation loss = {metrics['val_loss']:.4f}, "
                f"training accuracy = {metrics['train_accuracy']:.4f}, validation accuracy = {metrics['val_accuracy']:.4f} "
                f"({metrics['seconds']:.1f} s)")
        bar = trainer.progress_bar_callback
        bar.print(line) if isinstance(bar, TQDMProgressBar) else print(line, flush=True)
        write_metrics_csv(self.run_dir / "metrics.csv", self.history)

    def on_train_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        if self.history and trainer.is_global_zero:
            plot_curves(self.history, self.run_dir / "curves.png", self.title)

    def on_exception(self, trainer: pl.Trainer, module: ImageClassifier, exception: BaseException) -> None:
        self.on_train_end(trainer, module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | tuple[str, ...]) -> None:
    """``rows`` as a CSV table of ``columns`` (other keys left out), written atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    fn.write_atomically(path, write)


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    write_csv(path, history, METRIC_COLUMNS)


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def save_figure(figure, path: Path, dpi: int = 120) -> None:
    import matplotlib.pyplot as plt

    fn.write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format=path.suffix[1:]))
    plt.close(figure)


def plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Loss and accuracy, train against validation, per epoch: the README's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in ((loss_axis, "loss", "Loss"), (accuracy_axis, "accuracy", "Accuracy")):
        axis.plot(epochs, [row[f"train_{key}"] for row in history], marker=".", label="train")
        axis.plot(epochs, [row[f"val_{key}"] for row in history], marker=".", label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: Path, value: Any) -> None:
    fn.write_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def tta_logits(net: nn.Module, images: torch.Tensor, logits: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """The scores under each test-time augmentation of TTA_MODES up to ``mode``, in that order.

    ``logits`` are the scores of ``images`` themselves; each mode reuses the views of the one before.
    """
    scores = {"none": logits}
    if mode == "none":
        return scores

    def with_mirror(x: torch.Tensor, x_scores: torch.Tensor) -> torch.Tensor:
        return (x_scores + net(x.flip(3)).float()) / 2

    scores["flip"] = with_mirror(images, logits)
    if mode == "flip":
        return scores
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]  # content moved one pixel down-right, one up-left
    scores["flip-translate"] = (scores["flip"] + sum(with_mirror(x, net(x).float()) for x in shifted) / 2) / 2
    return scores


@torch.no_grad()
def predict(net: nn.Module, batches, with_features: bool = False, tta: str = "none") -> dict[str, Any]:
    """Logits (and penultimate features, from the same forward pass) for every batch, in eval mode.

    ``logits`` are averaged over the test-time views of ``tta``; ``logits_by_tta`` holds the logits of
    every mode up to it, from the same forward passes. The features stay those of the image itself.
    """
    net.eval()
    by_tta: dict[str, list[torch.Tensor]] = {}
    features, labels = [], []
    for images, batch_labels in batches:
        if with_features:
            penultimate = net.forward_features(images)
            batch_logits = net.classify(penultimate).float()
            features.append(penultimate.flatten(1).float().cpu())
        else:
            batch_logits = net(images).float()
        for mode, scores in tta_logits(net, images, batch_logits, tta).items():
            by_tta.setdefault(mode, []).append(scores.cpu())
        labels.append(batch_labels.cpu())
    logits_by_tta = {mode: torch.cat(scores) for mode, scores in by_tta.items()}
    result = {"logits": logits_by_tta[tta], "logits_by_tta": logits_by_tta, "labels": torch.cat(labels)}
    if with_features:
        result["features"] = torch.cat(features)
    return result


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)


def test_report(labels: torch.Tensor, predictions: torch.Tensor, classes: tuple[str, ...]) -> dict[str, Any]:
    matrix = confusion_matrix(labels, predictions, len(classes))
    per_class = (matrix.diag().double() / matrix.sum(1).clamp_min(1).double()).tolist()
    return {
        "test_accuracy": (labels == predictions).double().mean().item(),
        "per_class_accuracy": dict(zip(classes, per_class)),
        "confusion_matrix": matrix.tolist(),
        "num_test_images": labels.numel(),
    }


def plot_confusion(report: dict[str, Any], classes: tuple[str, ...], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(report["confusion_matrix"], dtype=float)
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(7, 6))
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            axis.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                      color="white" if rates[i, j] > 0.5 else "black")
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"{title}: test accuracy {report['test_accuracy']:.2%}")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    save_figure(figure, path)


# --------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------
def resolve_accelerator(device: str) -> str:
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return "gpu"
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def training_device(device: str) -> torch.device:
    """The device Lightning picks for ``--device`` (auto: cuda, else mps, else cpu)."""
    accelerator = resolve_accelerator(device)
    if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without, PyTorch emulates it, slowly."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def warn_emulated_bf16() -> None:
    print("warning: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 is emulated and training runs many "
          "times slower than in float32; use --precision 32-true", file=sys.stderr)


def resolve_precision(precision: str, accelerator: str) -> str:
    device_type = training_device(accelerator).type
    if precision == "auto":
        return "bf16-mixed" if device_type == "cuda" else "32-true"
    if precision.startswith("bf16") and device_type == "cpu" and not cpu_has_bf16():
        warn_emulated_bf16()
    return precision


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint or state dict, loaded without unpickling arbitrary objects; one clear error otherwise."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}); give a .ckpt or .pth this toolkit wrote") from None


def resume_checkpoint(config: RunConfig, run_dir: Path) -> Path | None:
    if config.resume is None:
        return None
    path = run_dir / "last.ckpt" if config.resume == "last" else Path(config.resume)
    if config.resume == "last" and not path.is_file():
        raise UserError(f"nothing to resume: {run_dir} has no last.ckpt; give --out-dir of the interrupted run, or drop --resume")
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        held = "a plain state dict (model.pth)" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise UserError(f"{path} holds {held}, not a training checkpoint; resume from a run's last.ckpt or best.ckpt")
    saved = checkpoint.get("run_config", {})
    if saved.get("model") != config.model:
        raise UserError(f"{path} is a checkpoint of {saved.get('model', 'an unknown model')}, not {config.model}; "
                        f"resume with the same --model, or start a new --out-dir")
    if saved.get("recipe", {}).get("epochs", config.recipe.epochs) > config.recipe.epochs:
        raise UserError(f"{path} was trained for more epochs than --epochs {config.recipe.epochs}; raise --epochs to continue")
    return path


# --------------------------------------------------------------------------------------------
# The run folder: one run per folder, held while the run lives
# --------------------------------------------------------------------------------------------
RESULT_FILES = ("metrics.csv", "last.ckpt", "best.ckpt", "model.pth", "test.json")
RUN_OUTPUTS = ("config.json", *RESULT_FILES, "curves.png", "confusion_matrix.png", "tsne_*.png", "tsne_*.npz", "tsne_metrics.json")
MIN_FREE_BYTES = 100 * 2**20  # a few checkpoints of the largest network here, written through temporary copies
LOCK_FILE = ".lock"
held_run_folders: dict[Path, tuple[FileLock, bool]] = {}  # folder: its lock, and whether this run created the folder


def check_writable_folder(folder: Path, flag: str = "--out-dir") -> None:
    """Create ``folder`` if needed and make sure files can be written there; one line naming the problem otherwise."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{flag} {folder} lies under a file, not a folder; give a folder path") from None
    except OSError as error:
        raise UserError(f"cannot write in {flag} {folder} ({error.strerror}); choose another {flag}") from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"the disk of {flag} {folder} has {free / 2**20:.0f} MB free and a run needs {MIN_FREE_BYTES // 2**20} MB "
                        f"for its checkpoints; free some space or choose another {flag}")


def remove_temporary_files(folder: Path) -> None:
    """Delete the half-written temporary copies ``fn.write_atomically`` leaves when a process is killed mid-write."""
    for path in folder.iterdir():
        if path.is_file() and fn.is_temporary_copy(path):
            path.unlink(missing_ok=True)


def continues_this_folder(config: RunConfig, run_dir: Path) -> bool:
    return config.resume == "last" or (config.resume is not None and Path(config.resume).resolve().parent == run_dir.resolve())


def keep_earlier_results(config: RunConfig, run_dir: Path) -> None:
    """Refuse a folder that holds another run's results, unless this run continues it (--resume) or replaces it (--overwrite)."""
    results = [name for name in RESULT_FILES if (run_dir / name).exists()]
    if not results or continues_this_folder(config, run_dir):
        return
    if not config.overwrite:
        state = "a finished" if (run_dir / "test.json").exists() else "an unfinished"
        raise UserError(f"{run_dir} holds {state} run ({', '.join(results)}); continue it with --resume, keep it and give "
                        f"another --out-dir, or replace it with --overwrite")
    for pattern in RUN_OUTPUTS:
        for path in run_dir.glob(pattern):
            path.unlink()
    print(f"--overwrite: removed the earlier run's files from {run_dir}")


def claim_run_folder(config: RunConfig) -> Path:
    """Hold ``config.out_dir`` for this run: writable, locked against a second live run, holding no other run's results.

    Call it before any slow work. Idempotent within a process; ``release_run_folder`` lets go. The lock is the
    operating system's, so a killed run never leaves its folder locked.
    """
    run_dir = Path(config.out_dir)
    if run_dir.resolve() in held_run_folders or not is_main_process():  # the extra data-parallel processes share the first's claim
        return run_dir
    if config.resume is not None and config.overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite replaces it; give one of them")
    created = not run_dir.exists()
    check_writable_folder(run_dir)
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"another run is using {run_dir} right now; wait for it to end, or give another --out-dir") from None
    held_run_folders[run_dir.resolve()] = (lock, created)
    try:
        keep_earlier_results(config, run_dir)
        remove_temporary_files(run_dir)  # left by a kill; while the folder is ours nobody else writes there
    except BaseException:
        release_run_folder(run_dir)
        raise
    return run_dir


def release_run_folder(run_dir: Path) -> None:
    """Let go of the folder; one this run created and left empty (it failed before writing anything) is removed."""
    lock, created = held_run_folders.pop(Path(run_dir).resolve(), (None, False))
    if lock is None:
        return
    lock.release()
    if created and [path.name for path in run_dir.iterdir()] == [LOCK_FILE]:
        (run_dir / LOCK_FILE).unlink()
        run_dir.rmdir()


# Cross-entropy over 10 classes starts near ln 10 = 2.3, and a poor but sound run stays within hundreds
# (BatchNorm statistics that lag a high learning rate); above 10,000 the weights have blown up.
DIVERGED_LOSS = 1e4


class DivergenceGuard(Callback):
    """Stops the run in the epoch its loss becomes NaN, infinite or explodes, before that epoch's checkpoints are written."""

    def on_validation_end(self, trainer: pl.Trainer, module: ImageClassifier) -> None:
        metrics = module.epoch_metrics
        for key, name in (("val_loss", "validation loss"), ("train_loss", "training loss")):
            if not metrics[key] <= DIVERGED_LOSS:  # also true for NaN
                raise TrainingDiverged(name, metrics[key], metrics["epoch"], module.recipe.lr)


class ConfigInCheckpoint(Callback):
    """Stores the run's configuration in every checkpoint, so a resume can check it is the same model."""

    def __init__(self, config: RunConfig):
        self.config = config

    def on_save_checkpoint(self, trainer, module, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_config"] = json.loads(json.dumps(asdict(self.config)))


def load_split(config: RunConfig) -> SplitData:
    if config.limit_train is not None and config.limit_train < 2:
        raise UserError(f"--limit-train {config.limit_train} leaves too few images to train on; give at least 2")
    data = SplitData.from_arrays(fn.load_cifar10(config.data_dir, config.num_workers), config.limit_train)
    if len(data.train_images) < 2 or len(data.val_images) < 1:
        raise UserError(f"{config.data_dir} holds too few training images to split 90/10; it needs at least 20")
    return data


def fit(config: RunConfig, net: nn.Module, data: SplitData, module_class: type[ImageClassifier] = ImageClassifier,
        callbacks: tuple[Callback, ...] = (), initialize: bool = True, checkpoints: bool = True) -> RunRecorder:
    """Train ``net`` on ``data`` by ``config`` with a Lightning Trainer; returns the recorder with the history.

    ``initialize`` applies the README's Kaiming-normal initialisation (off for pretrained networks);
    ``callbacks`` are added to the Trainer's (hyperparameter tuning adds its pruning callback);
    ``checkpoints`` writes last.ckpt after every epoch, and best.ckpt when the validation loss is the lowest so far.
    """
    run_dir = Path(config.out_dir)
    accelerator = resolve_accelerator(config.device)
    ckpt_path = resume_checkpoint(config, run_dir)
    pl.seed_everything(config.seed, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 parts on tensor-core GPUs
    if initialize:
        net.apply(fn.initialize_using_norm_kaiming)
    if config.compile:
        net.compile()  # in place: the state dict keeps its plain names, so checkpoints load with or without it
    recipe = config.recipe
    datamodule = CIFAR10DataModule(data, recipe.batch_size, recipe.augment, config.seed)
    module = module_class(net, recipe, config.seed, steps_per_epoch=math.ceil(len(data.train_images) / recipe.batch_size))

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", asdict(config))
    recorder = RunRecorder(run_dir, config.model)
    all_callbacks: list[Callback] = [recorder, DivergenceGuard(), *callbacks]  # the guard first: a pruner never sees a NaN
    if checkpoints:
        # Two checkpoints: Lightning's save_last writes last.ckpt only in epochs where the monitored one saved.
        all_callbacks += [ConfigInCheckpoint(config),
                          ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val_loss", mode="min", enable_version_counter=False),
                          ModelCheckpoint(dirpath=run_dir, filename="last", save_on_train_epoch_end=True, enable_version_counter=False)]
    if config.progress:
        all_callbacks.append(TQDMProgressBar(refresh_rate=20))
    trainer = pl.Trainer(
        max_epochs=recipe.epochs, accelerator=accelerator, devices=config.devices, strategy=config.strategy,
        precision=resolve_precision(config.precision, accelerator), callbacks=all_callbacks, logger=False,
        plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0, enable_model_summary=False,
        enable_checkpointing=checkpoints, enable_progress_bar=config.progress, default_root_dir=run_dir,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except RunInterrupted:
        stop_extra_processes(trainer)
        raise
    recorder.is_global_zero, recorder.device = trainer.is_global_zero, trainer.strategy.root_device
    return recorder


def saved_progress(config: RunConfig, run_dir: Path) -> str | None:
    """What an interrupted run keeps: the epochs in last.ckpt; None if it has none."""
    last = run_dir / "last.ckpt"
    try:
        epochs = torch.load(last, map_location="cpu", weights_only=True)["epoch"] + 1
    except FileNotFoundError:
        return None
    return f"{last} holds epoch {epochs} of {config.recipe.epochs}"


def stop_extra_processes(trainer: pl.Trainer) -> None:
    """The processes Lightning started for data-parallel training would otherwise wait for this one forever."""
    kill = getattr(trainer.strategy.launcher, "kill", None)
    if kill is not None:
        kill(signal.SIGKILL)


def train(config: RunConfig, net: nn.Module, module_class: type[ImageClassifier] = ImageClassifier,
          data: SplitData | None = None, initialize: bool = True) -> dict[str, Any]:
    """The whole run: claim the run folder, load data, fit, then test and write the run folder. Returns the test report."""
    resolve_accelerator(config.device)
    run_dir = claim_run_folder(config)  # a busy or unusable folder fails before the slow data load
    try:
        resume_checkpoint(config, run_dir)
        data = data or load_split(config)
        if config.tsne and hasattr(net, "forward_features"):
            import tsne

            tsne.check_settings(config, data)  # a t-SNE that cannot run fails now, not after the training
        print(f"Data: {data.source}; {len(data.train_images)} train / {len(data.val_images)} validation / {len(data.test_images)} test images")
        recorder = fit(config, net, data, module_class, initialize=initialize)
        if not recorder.is_global_zero:
            return {}
        return finish_run(config, net, data, recorder.history, run_dir, recorder.device)
    except RunInterrupted as interrupt:
        interrupt.saved = interrupt.saved or saved_progress(config, run_dir)
        raise
    finally:
        release_run_folder(run_dir)


def finish_run(config: RunConfig, net: nn.Module, data: SplitData, history: list[dict[str, float]],
               run_dir: Path, device: torch.device) -> dict[str, Any]:
    """Save the final weights, measure the test set, draw the confusion matrix and (optionally) t-SNE."""
    net = net.to(device)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}  # plain layout: loads anywhere
    fn.write_atomically(run_dir / "model.pth", lambda tmp: torch.save(state, tmp))
    test = predict(net, fn.EvalBatches(data.test_images.to(device), data.test_labels.to(device),
                                       CIFAR10DataModule.EVAL_BATCH, data.mean, data.std),
                   with_features=hasattr(net, "forward_features"), tta=config.recipe.tta)
    report = test_report(test["labels"], test["logits"].argmax(1), data.classes)
    final = history[-1] if history else {}
    report.update({"model": config.model, "epochs": len(history), "tta": config.recipe.tta, "final_val_accuracy": final.get("val_accuracy"),
                   "best_val_accuracy": max((row["val_accuracy"] for row in history), default=None),
                   "data": data.source})
    write_json(run_dir / "test.json", report)
    plot_confusion(report, data.classes, run_dir / "confusion_matrix.png", config.model)
    print(f"Test accuracy of {config.model}: {report['test_accuracy']:.4f} on {report['num_test_images']} images"
          + (f" (with {config.recipe.tta} test-time augmentation)" if config.recipe.tta != "none" else ""))
    if config.tsne and hasattr(net, "forward_features"):
        import tsne

        tsne.analyse_run(net, data, test, run_dir, config, device)
    print(f"Run folder {run_dir}: config.json, metrics.csv, curves.png, model.pth, best.ckpt, last.ckpt, test.json, confusion_matrix.png"
          + (", tsne_*.png, tsne_*.npz, tsne_metrics.json" if config.tsne else ""))
    return report
