"""A 2-D picture of a network's features: a seeded t-SNE (openTSNE's, FFT-accelerated, or scikit-learn's), how well
the classes separate (silhouette in the picture, k-NN accuracy in the features), and the embedding saved and drawn.

tsne.py makes these of a trained network's penultimate features, at the end of a run or on its own command.
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import engine
from engine import UserError, write_atomically

# A t-SNE is ~1,000 short parallel steps: OpenMP threads that spin-wait between them take the cores
# from each other on a shared machine (2,000 points on a busy 2-core machine: 44 s spinning, 8 s
# passive; the same on an idle one). Read when openTSNE's and scikit-learn's own OpenMP runtimes
# load, at their first use below; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

METHODS = ("auto", "opentsne", "sklearn")
PERPLEXITY = 30
N_JOBS = 2
KNN_NEIGHBOURS = 5
KNN_FOLDS = 5
SILHOUETTE_SAMPLE = 10_000  # the silhouette's cost is quadratic in the points: score a sample of at most this many
OPENTSNE_ITERATIONS = 250 + 500  # openTSNE's defaults: early exaggeration, then the main optimisation
PROGRESS_EVERY_ITERATIONS = 50


# --------------------------------------------------------------------------------------------
# t-SNE and clustering numbers
# --------------------------------------------------------------------------------------------
def stratified_sample(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` points, every class in its share of ``labels``; all points if ``size`` is None or too
    big.
    """
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    # Each point's place within its class as a fraction of the class: taking the smallest
    # fractions first fills every class in proportion to its size.
    place = np.empty(len(labels))
    for label in np.unique(shuffled):
        members = shuffled == label
        place[members] = (np.arange(members.sum()) + 0.5) / members.sum()
    return np.sort(order[np.argsort(place, kind="stable")[:size]])


def check_enough_points(split: str, count: int) -> None:
    # scikit-learn refuses a perplexity >= the number of points; one rule for both implementations.
    if count <= PERPLEXITY:
        raise UserError(
            f"t-SNE with perplexity {PERPLEXITY} needs more than {PERPLEXITY} points but the {split} split gives "
            f"{count}; raise --tsne-samples or use a larger data set"
        )


def resolve_method(method: str) -> str:
    """ "auto" is openTSNE when installed, else scikit-learn."""
    if method == "sklearn":
        return method
    try:
        import openTSNE  # noqa: F401
    except ImportError:
        if method == "opentsne":
            raise UserError(
                "--tsne-method opentsne needs the openTSNE package: pip install openTSNE, or use --tsne-method sklearn"
            ) from None
        return "sklearn"
    return "opentsne"


class IterationProgress:
    """openTSNE's callback: a line at most every half minute saying how far its optimisation has come (a split's
    t-SNE takes minutes on a small CPU)."""

    def __init__(self, label: str):
        self.lines = engine.ProgressLines(label, OPENTSNE_ITERATIONS, "iterations")
        self.done = 0

    def __call__(self, iteration: int, error: float, embedding) -> None:
        self.done = min(self.done + PROGRESS_EVERY_ITERATIONS, OPENTSNE_ITERATIONS)
        self.lines.report(self.done)


def embed(features: np.ndarray, method: str, seed: int, label: str = "t-SNE") -> np.ndarray:
    """Seeded 2-D t-SNE of ``features`` (points x dims) by "opentsne" or "sklearn"; float32 points x 2.

    Progress goes to the output as it runs, under ``label``.
    """
    if method == "opentsne":
        from openTSNE import TSNE

        # openTSNE's own choice of gradient: FFT-accelerated from 10,000 points (a whole split), Barnes-Hut
        # below, where FFT's fixed grid costs more than it saves (60 points: 20 s against 1 s).
        tsne = TSNE(
            n_components=2,
            perplexity=PERPLEXITY,
            n_jobs=N_JOBS,
            random_state=seed,
            callbacks=IterationProgress(label),
            callbacks_every_iters=PROGRESS_EVERY_ITERATIONS,
        )
        return np.asarray(tsne.fit(features), dtype=np.float32)
    from sklearn.manifold import TSNE

    # its own progress lines
    tsne = TSNE(n_components=2, perplexity=PERPLEXITY, n_jobs=N_JOBS, random_state=seed, verbose=1)
    return tsne.fit_transform(features).astype(np.float32)


def clustering_scores(features: np.ndarray, points: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """Silhouette by true class in the 2-D embedding, and k-NN accuracy by true class in the feature space."""
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    silhouette = silhouette_score(points, labels, sample_size=min(len(points), SILHOUETTE_SAMPLE), random_state=seed)
    knn = cross_val_score(
        KNeighborsClassifier(n_neighbors=KNN_NEIGHBOURS, n_jobs=N_JOBS),
        features,
        labels,
        cv=KFold(KNN_FOLDS, shuffle=True, random_state=seed),
    )
    return {"silhouette_true_class_2d": float(silhouette), "knn_accuracy_features": float(knn.mean())}


def embed_and_score(
    features: np.ndarray, labels: np.ndarray, method: str, seed: int, label: str = "t-SNE"
) -> tuple[np.ndarray, dict[str, Any]]:
    """The 2-D points and a report: points, method, seconds the t-SNE took, clustering scores."""
    started = time.perf_counter()
    points = embed(features, method, seed, label)
    seconds = time.perf_counter() - started
    report = {"points": len(points), "method": method, "tsne_seconds": round(seconds, 2)}
    return points, {**report, **clustering_scores(features, points, labels, seed)}


def describe(split: str, report: dict[str, Any]) -> str:
    return (
        f"t-SNE of the {split} split: {report['points']:,} points by {report['method']} in "
        f"{report['tsne_seconds']:.1f} s; silhouette by true class in 2-D {report['silhouette_true_class_2d']:.3f}, "
        f"{KNN_NEIGHBOURS}-NN accuracy in feature space {report['knn_accuracy_features']:.2%}"
    )


# --------------------------------------------------------------------------------------------
# The embedding on disk and in a figure
# --------------------------------------------------------------------------------------------
@dataclass
class Embedding:
    """A split's 2-D t-SNE points with each point's true and predicted class: all the figure needs."""

    points: np.ndarray  # points x 2
    labels: np.ndarray
    predictions: np.ndarray
    indices: np.ndarray  # each point's position in its split
    classes: tuple[str, ...]
    model: str
    split: str
    method: str

    @property
    def correct(self) -> np.ndarray:
        return self.labels == self.predictions


def save_embedding(embedding: Embedding, path: Path) -> None:
    # Strings as unicode arrays, so the file loads with allow_pickle=False.
    e = embedding
    arrays = {
        "embedding": e.points,
        "labels": e.labels,
        "predictions": e.predictions,
        "correct": e.correct,
        "indices": e.indices,
        "classes": np.array(e.classes, dtype=str),
        "model": np.array(e.model),
        "split": np.array(e.split),
        "method": np.array(e.method),
    }
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays))


def load_embedding(path: Path) -> Embedding:
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a tsne_<split>.npz that tsne.py or a training run wrote")
    try:
        with np.load(path, allow_pickle=False) as saved:
            return Embedding(
                saved["embedding"],
                saved["labels"],
                saved["predictions"],
                saved["indices"],
                tuple(str(name) for name in saved["classes"]),
                str(saved["model"]),
                str(saved["split"]),
                str(saved["method"]),
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a t-SNE file written by tsne.py ({type(error).__name__}: {error})") from None


def class_colours(num_classes: int) -> np.ndarray:
    """RGBA per class label, the one map for both scatter layers and every figure: tab10 for CIFAR-10."""
    import matplotlib

    if num_classes <= 10:
        return matplotlib.colormaps["tab10"](np.arange(num_classes))
    return matplotlib.colormaps["turbo"](np.linspace(0, 1, num_classes))


def draw_embedding(embedding: Embedding):
    """The scatter plot: colour = predicted class, black edge = misclassified; returns the matplotlib figure."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    e = embedding
    colours = class_colours(len(e.classes))
    size = float(np.clip(30_000 / len(e.points), 1.5, 25))  # small points when there are many
    figure = Figure(figsize=(9, 7))
    axis = figure.subplots()
    # Misclassified points last, so their edges are not hidden under correct ones.
    for gid, chosen, edge, width in (("correct", e.correct, "none", 0.0), ("misclassified", ~e.correct, "black", 0.5)):
        axis.scatter(
            e.points[chosen, 0],
            e.points[chosen, 1],
            s=size,
            c=colours[e.predictions[chosen]],
            edgecolors=edge,
            linewidths=width,
            gid=gid,
        )
    handles = [
        Line2D([], [], linestyle="", marker="o", markerfacecolor=colours[label], markeredgecolor="none", label=name)
        for label, name in enumerate(e.classes)
    ]
    handles.append(
        Line2D(
            [], [], linestyle="", marker="o", markerfacecolor="white", markeredgecolor="black", label="misclassified"
        )
    )
    axis.legend(handles=handles, title="predicted class", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axis.set_title(
        f"{e.model}: t-SNE of penultimate features, {e.split} split\n"
        f"{len(e.points):,} points, {int((~e.correct).sum()):,} misclassified (black edge); {e.method}"
    )
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    return figure


def save_drawing(embedding: Embedding, path: Path) -> None:
    engine.save_figure(engine.styled(draw_embedding)(embedding), path, dpi=300)
