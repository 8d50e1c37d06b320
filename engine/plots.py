"""The run's figures: training curves, the test confusion matrix, and several models' curves compared; the style every
figure of the toolkit is drawn in.

Figures are made with matplotlib's object API (``Figure``), not pyplot: no backend is chosen or changed, so
importing the toolkit in a notebook leaves its plotting alone, and nothing needs a display. Each is drawn inside
``styled``: matplotlib's defaults plus the few settings in STYLE, whatever another library (Optuna's plots call
``plt.style.use``) or a user's matplotlibrc changed before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from engine.files import write_atomically

# The project's look on top of matplotlib's defaults: light grids, no top and right frame.
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}
# Settings that choose where figures go rather than how they look: kept as the user has them.
NOT_STYLE = ("backend", "interactive", "figure.max_open_warning")
Drawing = TypeVar("Drawing", bound=Callable[..., Any])


def styled(draw: Drawing) -> Drawing:
    """``draw`` under matplotlib's defaults and STYLE (restored after), so no earlier restyling leaks into it."""

    @functools.wraps(draw)
    def in_style(*args: Any, **kwargs: Any) -> Any:
        defaults = {key: value for key, value in matplotlib.rcParamsDefault.items() if key not in NOT_STYLE}
        with matplotlib.rc_context({**defaults, **STYLE}):
            return draw(*args, **kwargs)

    return in_style  # type: ignore[return-value]


def save_figure(figure: Figure, path: Path, dpi: int = 120) -> None:
    write_atomically(Path(path), lambda tmp: figure.savefig(tmp, dpi=dpi, format=Path(path).suffix[1:]))


def measured(history: list[dict[str, float | None]], key: str) -> tuple[list[int], list[float]]:
    """The epochs that measured ``key``, and its values: none without a validation split, some with --val-every."""
    rows = [row for row in history if row[key] is not None]
    return [row["epoch"] for row in rows], [row[key] for row in rows]


def epoch_and_value_axes(axis, key: str, label: str) -> None:
    """Whole epochs along x (no tick at epoch 1.5); accuracy in percent, as the console and the tables write it."""
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(label)
    if key == "accuracy":
        axis.yaxis.set_major_formatter(PercentFormatter(1.0))


@styled
def plot_curves(history: list[dict[str, float | None]], path: Path, title: str) -> None:
    """Loss and accuracy, train against validation, per epoch: the original study's figures."""
    figure = Figure(figsize=(11, 4))
    for axis, key, label in zip(figure.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy"), strict=True):
        for split, name in (("train", "train"), ("val", "validation")):
            epochs, values = measured(history, f"{split}_{key}")
            if values:
                axis.plot(epochs, values, marker=".", label=name)
        epoch_and_value_axes(axis, key, label)
        if axis.lines:  # an accuracy axis can have nothing measured (--val-every 0, --train-accuracy-sample 0)
            axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


@styled
def plot_comparison(histories: dict[str, list[dict]], path: Path, setting: str) -> None:
    """Every model's curves in one figure: validation solid, training dashed."""
    figure = Figure(figsize=(13, 5))
    axes = figure.subplots(1, 2)
    colours = matplotlib.colormaps["tab10"]
    for index, (name, history) in enumerate(histories.items()):
        for axis, key in zip(axes, ("loss", "accuracy"), strict=True):
            validation = measured(history, f"val_{key}")  # no validation curve for a run on every training image
            if validation[1]:
                axis.plot(*validation, color=colours(index), label=name)
            axis.plot(
                *measured(history, f"train_{key}"),
                color=colours(index),
                linestyle="--",
                alpha=0.6,
                label=None if validation[1] else name,
            )
    for axis, key, label in zip(axes, ("loss", "accuracy"), ("Loss", "Accuracy"), strict=True):
        epoch_and_value_axes(axis, key, label)
    styles = [
        Line2D([], [], color="grey", label="validation"),
        Line2D([], [], color="grey", linestyle="--", label="training"),
    ]
    axes[0].legend(handles=styles, fontsize=8)
    axes[1].legend(fontsize=8)
    figure.suptitle(setting)
    figure.tight_layout()
    save_figure(figure, path)


ANNOTATED_CLASSES = 20  # up to this many classes each cell shows its count; beyond, the colours alone stay readable


@styled
def plot_confusion(report: dict[str, Any], classes: tuple[str, ...], path: Path, title: str) -> None:
    """The confusion matrix as rates per true class, readable from 2 to 100 classes: the figure grows with the classes,
    the counts are written in the cells up to ANNOTATED_CLASSES, and the class names shrink to fit."""
    matrix = np.array(report["confusion_matrix"], dtype=float)
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = max(6.0, 0.16 * len(classes) + 3)
    figure = Figure(figsize=(side + 1, side))
    axis = figure.subplots()
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    axis.grid(False)  # the style's grid would cross the cells
    if len(classes) <= ANNOTATED_CLASSES:
        for i in range(len(classes)):
            for j in range(len(classes)):
                axis.text(
                    j,
                    i,
                    f"{int(matrix[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    names = {"fontsize": 9 if len(classes) <= ANNOTATED_CLASSES else 6}
    axis.set_xticks(
        range(len(classes)), classes, rotation=45 if len(classes) <= ANNOTATED_CLASSES else 90, ha="right", **names
    )
    axis.set_yticks(range(len(classes)), classes, **names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"{title}: test accuracy {report['test_accuracy']:.2%}")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    save_figure(figure, path)
