"""A run's hyperparameters for TensorBoard's HPARAMS tab: the settings that decide it, with the metrics it ended with.

``log_hyperparameters`` hands the run's Lightning logger its ``RunConfig`` as scalars and strings (Lightning groups
them as ``model``, ``model_options/width``, ``recipe/lr``, ``seed``, ...) and its final metrics, named ``final/...``
so that they stay apart from the per-epoch curves: once a run, at its end (``fit``'s for a tuning trial, after the
test for ``train``), in the process that reports. The logger writes them to its ``hparams.yaml`` too, so
``tensorboard --logdir runs`` compares runs and tuning trials side by side.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from engine.config import RunConfig

# Where the run's files are, whether it resumed or replaced one, what it shows and logs, its profile, its loader
# workers, its epoch checkpoints, how long it waits for other processes, the analyses after it and what --resume
# changed: none of it changes what the network learns, and the paths would make every run differ from every other.
NOT_HYPERPARAMETERS = (
    "data_dir",
    "out_dir",
    "resume",
    "overwrite",
    "progress",
    "logger",
    "profile",
    "num_workers",
    "collective_timeout",
    "keep_epoch_checkpoints",
    "analyses",
    "changes",
)
# The last epoch's metrics (metrics.csv's last row) that the HPARAMS tab shows, as final/<name>.
FINAL_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def as_scalars(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with what TensorBoard takes: a sequence as one string (``recipe/betas``: ``"(0.9, 0.999)"``, from
    a tuple or from config.json's list alike), nested settings as nested dicts (Lightning names them ``group/name``),
    and no None: TensorBoard takes none, and the string ``"None"`` would make a column of numbers a column of text."""
    scalars = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            scalars[key] = as_scalars(value)
        elif isinstance(value, (list, tuple)):
            scalars[key] = str(tuple(value))
        elif value is not None:
            scalars[key] = value
    return scalars


def hyperparameters(config: RunConfig, precision: str) -> dict[str, Any]:
    """What decides the run, from ``config``, with ``precision`` as resolved (``auto`` names none)."""
    settings = {key: value for key, value in asdict(config).items() if key not in NOT_HYPERPARAMETERS}
    return as_scalars(dict(settings, precision=precision))


def final_metrics(history: list[dict[str, Any]], test_accuracy: float | None = None) -> dict[str, float]:
    """The last epoch's losses and accuracies and the test accuracy, as ``final/<name>``; one the run did not measure
    (no validation split, no test) is left out."""
    last = history[-1] if history else {}
    metrics = {f"final/{key}": float(last[key]) for key in FINAL_METRICS if last.get(key) is not None}
    if test_accuracy is not None:
        metrics["final/test_accuracy"] = float(test_accuracy)
    return metrics


def log_hyperparameters(
    logger: Logger | None,
    config: RunConfig,
    precision: str,
    history: list[dict[str, Any]],
    test_accuracy: float | None = None,
) -> None:
    """The run's hyperparameters and final metrics to its ``logger`` (--logger): TensorBoard's events and
    ``hparams.yaml``; the CSV logger's ``hparams.yaml`` (its metrics stay per epoch); nothing without a logger."""
    params = hyperparameters(config, precision)
    if isinstance(logger, TensorBoardLogger):
        # Lightning writes hparams.yaml only where there is none, and wrote one ({}) when the fit began.
        Path(logger.log_dir, logger.NAME_HPARAMS_FILE).unlink(missing_ok=True)
        logger.log_hyperparams(params, final_metrics(history, test_accuracy))
        logger.finalize("success")  # the events on disk (the Trainer closed its file already), and hparams.yaml
    elif isinstance(logger, CSVLogger):
        logger.log_hyperparams(params)
