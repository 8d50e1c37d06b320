"""A whole run: ``fit`` trains a registered model with a Lightning Trainer, ``train`` is the story a script tells.

``train(config, model)``: claim the run folder, load the data, fit (progress bar, a checkpoint every epoch, resume,
mixed precision, multi-GPU strategies: Lightning's), then save the weights, measure the test set, and run the
analyses the script handed in (plots of the features, say). The scripts only choose the model, the recipe and the
analyses.
"""

from __future__ import annotations

import errno
import logging
import signal
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.profilers import SimpleProfiler
from torch import nn

from engine.batches import SplitData, epoch_steps, load_split
from engine.callbacks import (
    AfterValidation,
    AtomicCheckpointIO,
    ConfigInCheckpoint,
    DivergenceGuard,
    EpochCheckpoints,
    EpochProgressBar,
    Lookahead,
    RunRecorder,
    ValidationSchedule,
)
from engine.card import ModelCard, git_commit, library_versions
from engine.checkpoints import resume_checkpoint, saved_progress
from engine.classifier import CIFAR10DataModule, ImageClassifier, warn_few_steps
from engine.config import RunConfig
from engine.data import INPUT_SIZE
from engine.devices import (
    autocast_for,
    bound_collectives,
    destroy_process_group_at_exit,
    is_main_process,
    lost_process,
    resolve_accelerator,
    resolve_precision,
    training_device,
)
from engine.errors import DiskFull, ProcessLost, RunInterrupted
from engine.evaluation import predict, test_report
from engine.files import write_atomically
from engine.hyperparameters import log_hyperparameters
from engine.plots import plot_confusion
from engine.progress import progress_enabled
from engine.registry import FeatureNetwork, ModelSpec
from engine.run_folder import claim_run_folder, release_run_folder, write_json

# Lightning's notes ("GPU available", tips, "max_epochs reached") say nothing the run's own lines do not (train prints
# the device and precision); its warnings still show. Two warnings that say nothing to our users (a resumed run folder
# is not empty by design).
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Metrics are logged once an epoch, not every n steps: a short epoch is no reason to warn.
warnings.filterwarnings(
    "ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval"
)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Frozen pretrained layers stay in eval mode on purpose (transfer learning): nothing to warn about.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# The logged metrics are computed from sums already reduced over all processes (the epoch and the lr are the same in
# each): syncing them again is redundant.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val_|train_|epoch|lr)")

# What a finished run folder holds, in the order the closing line lists them.
RUN_FILES = (
    "config.json",
    "model.json",
    "metrics.csv",
    "curves.png",
    "model.pth",
    "best.ckpt",
    "last.ckpt",
    "test.json",
    "confusion_matrix.png",
    "fit-profile.txt",
)


class Analysis(Protocol):
    """Work a script hands to ``train`` to run at the end of the run, such as plots of the features."""

    def check(self, config: RunConfig, data: SplitData) -> None:
        """Raise a ``UserError`` now, before the training, if the analysis could not run."""

    def run(
        self,
        net: nn.Module,
        data: SplitData,
        test: dict[str, Any],
        run_dir: Path,
        config: RunConfig,
        device: torch.device,
    ) -> None:
        """Analyse the trained ``net``; ``test`` is ``predict``'s output on the test split, with features."""

    def finish_command(self, config: RunConfig, run_dir: Path) -> str:
        """The command that runs this analysis on the saved model in ``run_dir`` as the run would have: what a run
        stopped during its analyses prints (--resume cannot finish them: the run is trained and tested)."""


def model_card(config: RunConfig, data: SplitData, precision: str) -> ModelCard:
    """What using the trained network needs besides its weights (written as model.json): which model it is with its
    options, the class names in label order, the normalisation its inputs had, the precision (as resolved) it trained
    and is tested at, and what trained it."""
    return ModelCard(
        config.model,
        tuple(data.classes),
        tuple(data.mean.tolist()),
        tuple(data.std.tolist()),
        options=dict(config.model_options),
        image_size=INPUT_SIZE,
        tta=config.recipe.tta,
        precision=precision,
        versions=library_versions(),
        commit=git_commit(),
    )


def for_model(model: ModelSpec, config: RunConfig, data: SplitData) -> SplitData:
    """``data`` normalised as ``model`` needs: with its own statistics where it has them (pretrained weights), else as
    loaded (the training split's)."""
    if model.input_statistics is None:
        return data
    mean, std = model.input_statistics(config.model_options)
    return replace(data, mean=mean, std=std)


def save_weights(net: nn.Module, run_dir: Path) -> None:
    """The final weights as model.pth, a plain state dict in a plain layout that loads anywhere."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_atomically(run_dir / "model.pth", lambda tmp: torch.save(state, tmp))


@dataclass
class Fitted:
    """What ``fit`` leaves: the trained network, its per-epoch history, where and at what precision it trained,
    whether this process reports, and the Trainer's logger (None: --logger none)."""

    net: nn.Module
    history: list[dict[str, float]]
    device: torch.device
    precision: str
    is_global_zero: bool
    logger: Logger | None = None


def make_logger(name: str, run_dir: Path) -> Logger | bool:
    """Lightning's logger for --logger: each epoch's metrics where TensorBoard (or a CSV reader) finds them live."""
    if name == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="", default_hp_metric=False)
    if name == "csv":
        return CSVLogger(save_dir=run_dir, name="csv_log", version="")
    return False


def stop_extra_processes(trainer: pl.Trainer) -> None:
    """The processes Lightning started for data-parallel training would otherwise wait for this one forever."""
    kill = getattr(trainer.strategy.launcher, "kill", None)
    if kill is not None:
        kill(signal.SIGKILL)


def fit(
    config: RunConfig,
    model: ModelSpec,
    data: SplitData,
    after_validation: Callable[[dict[str, Any]], None] | None = None,
    checkpoints: bool = True,
    hyperparameters: bool = True,
) -> Fitted:
    """Build ``model`` with ``config.model_options``, initialise it its own way and train it on ``data`` (normalised for
    the model: ``for_model``) by ``config`` with a Lightning Trainer.

    ``after_validation`` gets each epoch's metrics once it is validated (hyperparameter tuning prunes with it);
    ``checkpoints`` writes last.ckpt after every epoch, and best.ckpt when the validation loss is the lowest so far;
    ``hyperparameters`` logs the run's settings with its final metrics at the end (``engine.hyperparameters``; ``train``
    logs them itself, after the test, with its accuracy).
    """
    run_dir = Path(config.out_dir)
    accelerator = resolve_accelerator(config.device)
    ckpt_path = resume_checkpoint(config, run_dir)
    net = model.build(config.model_options, len(data.classes), config.model, source="the run's model options")
    pl.seed_everything(config.seed, verbose=False)  # after the build: initialisation draws from the seed, as always
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 parts on tensor-core GPUs
    model.initialize(net, data, config.recipe)
    if config.compile:
        net.compile()  # in place: the state dict keeps its plain names, so checkpoints load with or without it
    recipe = config.recipe
    datamodule = CIFAR10DataModule(
        data, recipe.batch_size, recipe.augment, config.seed, config.train_accuracy_sample, recipe.epochs
    )
    precision = resolve_precision(config.precision, accelerator)
    card = model_card(config, data, precision).to_dict()
    if is_main_process():  # one writer, whatever the number of processes and nodes
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", asdict(config))
        write_json(run_dir / "model.json", card)
    recorder = RunRecorder(run_dir, config.model)
    # The guard first: a pruner, the per-epoch line and the checkpoints never see a NaN.
    all_callbacks: list[Callback] = [DivergenceGuard(), recorder, ValidationSchedule(config.val_every)]
    if after_validation is not None:
        all_callbacks.append(AfterValidation(after_validation))
    if recipe.weight_average == "lookahead":
        all_callbacks.append(Lookahead())
    if checkpoints:
        # Two checkpoints: Lightning's save_last writes last.ckpt only in epochs where the monitored one saved.
        all_callbacks += [
            ConfigInCheckpoint(config, card),
            ModelCheckpoint(
                dirpath=run_dir, filename="last", save_on_train_epoch_end=True, enable_version_counter=False
            ),
        ]
        if config.keep_epoch_checkpoints:
            all_callbacks.append(EpochCheckpoints(run_dir))
        if config.validation:  # the best epoch is the one with the lowest validation loss: none without validation
            all_callbacks.append(
                ModelCheckpoint(
                    dirpath=run_dir, filename="best", monitor="val_loss", mode="min", enable_version_counter=False
                )
            )
    progress = progress_enabled(config.progress)
    if progress:
        all_callbacks.append(EpochProgressBar(refresh_rate=20))
    trainer = pl.Trainer(
        max_epochs=recipe.whole_epochs,
        # a last epoch in part has fewer batches: the Trainer asks the loaders again for each epoch's length
        reload_dataloaders_every_n_epochs=int(recipe.epochs != recipe.whole_epochs),
        accelerator=accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=precision,
        callbacks=all_callbacks,
        logger=make_logger(config.logger, run_dir),
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_checkpointing=checkpoints,
        enable_progress_bar=progress,
        default_root_dir=run_dir,
        profiler=SimpleProfiler(dirpath=run_dir, filename="profile") if config.profile and is_main_process() else None,
    )
    bound_collectives(trainer.strategy, config.collective_timeout)
    module = ImageClassifier(
        net,
        recipe,
        config.seed,
        # each process of a data-parallel run takes its share of every epoch: the schedule counts its steps
        steps_per_epoch=epoch_steps(len(data.train_images), recipe.batch_size, world_size=trainer.world_size),
        parameter_groups=model.parameter_groups,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except RunInterrupted:
        stop_extra_processes(trainer)
        raise
    except RuntimeError as error:  # a 100-line traceback from deep in PyTorch, where a node was lost
        lost = lost_process(error, config.collective_timeout, config.num_nodes)
        if lost is None:
            raise
        stop_extra_processes(trainer)
        raise lost from error
    if trainer.world_size > 1:
        destroy_process_group_at_exit()
    if hyperparameters and trainer.is_global_zero:
        log_hyperparameters(trainer.logger, config, precision, recorder.history)
    device = trainer.strategy.root_device
    return Fitted(net, recorder.history, device, precision, trainer.is_global_zero, trainer.logger)


def train(
    config: RunConfig, model: ModelSpec, data: SplitData | None = None, analyses: Sequence[Analysis] = ()
) -> dict[str, Any]:
    """The whole run: claim the run folder, load data, fit, then test, write the run folder and run ``analyses``.

    Returns the test report (empty in the extra processes of data-parallel training).
    """
    resolve_accelerator(config.device)
    run_dir = claim_run_folder(config)  # a busy or unusable folder fails before the slow data load
    try:
        resume_checkpoint(config, run_dir)
        data = for_model(model, config, data or load_split(config))
        for analysis in analyses:
            analysis.check(config, data)  # an analysis that cannot run fails now, not after the training
        if is_main_process():
            print(
                f"Data: {data.source}; {len(data.train_images)} train / {len(data.val_images)} validation / "
                f"{len(data.test_images)} test images\nTraining {config.model} for {config.recipe.epochs:g} "
                f"epoch{'' if config.recipe.epochs == 1 else 's'} on {training_device(config.device)}, "
                f"{resolve_precision(config.precision, config.device)} precision, into {run_dir}",
                flush=True,
            )
            warn_few_steps(config.model, config.recipe, len(data.train_images))
        fitted = fit(config, model, data, hyperparameters=False)  # logged after the test, with its accuracy
        if not fitted.is_global_zero:
            return {}
        return finish_run(config, fitted, data, run_dir, analyses)
    except RunInterrupted as interrupt:
        interrupt.saved = interrupt.saved or saved_progress(config, run_dir)
        raise
    except ProcessLost as lost:
        lost.saved = saved_progress(config, run_dir)
        raise
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(error.filename or str(error), resumable=(run_dir / "last.ckpt").is_file()) from error
    finally:
        release_run_folder(run_dir)


def finish_run(
    config: RunConfig, fitted: Fitted, data: SplitData, run_dir: Path, analyses: Sequence[Analysis] = ()
) -> dict[str, Any]:
    """Save the final weights, measure the test set, draw the confusion matrix, then run the analyses."""
    net, history = fitted.net.to(fitted.device), fitted.history
    save_weights(net, run_dir)
    with autocast_for(fitted.precision, fitted.device):  # the precision the run validated at
        test = predict(
            net,
            data.test_images,
            data.test_labels,
            data.mean,
            data.std,
            tta=config.recipe.tta,
            with_features=isinstance(net, FeatureNetwork),
        )
    report = test_report(test["labels"], test["logits"].argmax(1), data.classes)
    final = history[-1] if history else {}
    report.update(
        {
            "model": config.model,
            "epochs": len(history),
            "tta": config.recipe.tta,
            "precision": fitted.precision,
            "final_val_accuracy": final.get("val_accuracy"),
            "best_val_accuracy": max(
                (row["val_accuracy"] for row in history if row["val_accuracy"] is not None), default=None
            ),
            "data": data.source,
        }
    )
    plot_confusion(report, data.classes, run_dir / "confusion_matrix.png", config.model)
    log_hyperparameters(fitted.logger, config, fitted.precision, history, report["test_accuracy"])
    write_json(run_dir / "test.json", report)  # last: with test.json the run is finished, and --resume refuses it
    print(
        f"Test accuracy of {config.model}: {report['test_accuracy']:.2%} on {report['num_test_images']} images"
        + (f" (with {config.recipe.tta} test-time augmentation)" if config.recipe.tta != "none" else "")
    )
    written = [name for name in RUN_FILES if (run_dir / name).exists()]  # no best.ckpt without a validation split
    print(f"Run folder {run_dir}: {', '.join(written)}")
    run_analyses(analyses, net, data, test, run_dir, config, fitted.device)
    return report


def run_analyses(
    analyses: Sequence[Analysis],
    net: nn.Module,
    data: SplitData,
    test: dict[str, Any],
    run_dir: Path,
    config: RunConfig,
    device: torch.device,
) -> None:
    """Each analysis in turn. A run stopped during one is trained and tested, so --resume has nothing to continue: its
    line names the commands that run the analyses left instead (``Analysis.finish_command``)."""
    done = 0
    try:
        for analysis in analyses:
            analysis.run(net, data, test, run_dir, config, device)
            done += 1
    except RunInterrupted as interrupt:
        # an analysis written before finish_command has none: the user runs it again as its own docs say
        left = [a.finish_command(config, run_dir) for a in analyses[done:] if hasattr(a, "finish_command")]
        interrupt.saved = f"{run_dir} holds the trained and tested run (model.pth, test.json), not all of its analyses"
        interrupt.continue_command = " && ".join(left)
        raise
