"""t-SNE of a trained network's penultimate features: how well the classes separate.

    python tsne.py --run runs/CIFAR10Net_7 --data-dir ./data
    python tsne.py --run runs/tune/trials/0003 --checkpoint model.pth --data-dir ./data
    python tsne.py --checkpoint ~/study/CIFAR_7.pth --model CIFAR10Net_7 --data-dir ./data
    python tsne.py --redraw runs/CIFAR10Net_7/tsne_test.npz

For the test split and the 45,000-image training split: the features of the second-to-last layer,
projected to 2-D with a seeded t-SNE (openTSNE's by default, FFT-accelerated from 10,000 points;
scikit-learn's on request). Each point is coloured by its PREDICTED class from one fixed class ->
colour map (tab10 by class label, the same in every layer and figure); misclassified points have a
black edge. Writes tsne_<split>.png (300 dpi), tsne_<split>.npz (the embedding with true and
predicted labels, so the figure can be redrawn without recomputing) and tsne_metrics.json: the
silhouette score by true class in the 2-D embedding and the cross-validated 5-NN accuracy in the
original feature space. The network is loaded as predict.py and evaluate.py load it (saved_models): rebuilt from
the run's model card, with its options, and fed inputs normalised as it was trained.
The training scripts hand the same analysis to the engine (``analyses``), which runs it at the end of
every run unless given --no-tsne.
"""

from __future__ import annotations

import argparse
import os
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import engine
import saved_models
from functions import UserError, write_atomically
from saved_models import SavedModel

# A t-SNE is ~1,000 short parallel steps: OpenMP threads that spin-wait between them take the cores
# from each other on a shared machine (2,000 points on a busy 2-core machine: 44 s spinning, 8 s
# passive; the same on an idle one). Read when openTSNE's and scikit-learn's own OpenMP runtimes
# load, at their first use below; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SPLITS = ("test", "train")
METHODS = ("auto", "opentsne", "sklearn")
PERPLEXITY = 30
N_JOBS = 2
KNN_NEIGHBOURS = 5
KNN_FOLDS = 5
SILHOUETTE_SAMPLE = 10_000  # the silhouette's cost is quadratic in the points: score a sample of at most this many
OPENTSNE_ITERATIONS = 250 + 500  # openTSNE's defaults: early exaggeration, then the main optimisation
PROGRESS_EVERY_ITERATIONS = 50


# --------------------------------------------------------------------------------------------
# Features of a trained network
# --------------------------------------------------------------------------------------------
def split_predictions(net: nn.Module, data: engine.SplitData, split: str) -> dict[str, torch.Tensor]:
    """Logits, labels and penultimate features of every image of ``split`` ("test" or "train")."""
    images, labels = (data.test_images, data.test_labels) if split == "test" else (data.train_images, data.train_labels)
    return engine.predict(net, images, labels, data.mean, data.std, with_features=True)


def open_model(args: argparse.Namespace) -> SavedModel:
    """The saved model of --run / --checkpoint / --model, checked to have penultimate features (and a t-SNE to run): a
    wrong file fails before the slow data load."""
    saved = saved_models.open_saved_model(args.run, args.checkpoint, args.model)
    if not hasattr(saved.net, "forward_features"):
        raise UserError(
            f"{saved.name} has no forward_features(), so its penultimate features cannot be taken; choose another model"
        )
    resolve_method(getattr(args, "tsne_method", "auto"))  # a missing openTSNE fails before the data load too
    return saved


def model_data(saved: SavedModel, args: argparse.Namespace) -> engine.SplitData:
    """The data normalised as ``saved``'s card says (a plain state dict's card is made from the data, as training
    computes it).
    """
    data = engine.load_split(
        engine.RunConfig(
            model=saved.name,
            data_dir=args.data_dir,
            dataset=args.dataset,
            num_workers=args.num_workers,
            limit_train=args.limit_train,
        )
    )
    card = saved_models.card_for_data(saved, data)
    mean, std = card.normalisation
    return replace(data, mean=mean, std=std)


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
        f"{KNN_NEIGHBOURS}-NN accuracy in feature space {report['knn_accuracy_features']:.4f}"
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
    engine.save_figure(draw_embedding(embedding), path, dpi=300)


# --------------------------------------------------------------------------------------------
# The analysis of a run
# --------------------------------------------------------------------------------------------
def analyse_split(
    predicted: dict[str, torch.Tensor],
    split: str,
    classes: tuple[str, ...],
    run_dir: Path,
    config: engine.RunConfig,
    method: str,
) -> dict[str, Any]:
    """Embed (a sample of) one split's features, write tsne_<split>.npz and .png, print and return the numbers."""
    labels = predicted["labels"].numpy()
    index = stratified_sample(labels, config.tsne_samples, config.seed)
    features = predicted["features"].numpy()[index]
    print(f"t-SNE of the {split} split: embedding {len(index):,} points by {method}", flush=True)
    points, report = embed_and_score(features, labels[index], method, config.seed, label=f"t-SNE of the {split} split")
    embedding = Embedding(
        points,
        labels[index],
        predicted["logits"].argmax(1).numpy()[index],
        index,
        tuple(classes),
        config.model,
        split,
        method,
    )
    save_embedding(embedding, run_dir / f"tsne_{split}.npz")
    save_drawing(embedding, run_dir / f"tsne_{split}.png")
    print(describe(split, report), flush=True)
    return report


def check_settings(config: engine.RunConfig, data: engine.SplitData, splits: tuple[str, ...] = SPLITS) -> str:
    """One clear error, before any slow work, when the t-SNE cannot run; else the implementation to use."""
    split_sizes = {"test": len(data.test_labels), "train": len(data.train_labels)}
    for split in splits:
        check_enough_points(split, min(split_sizes[split], config.tsne_samples or split_sizes[split]))
    return resolve_method(config.tsne_method)


def analyse_run(
    net: nn.Module,
    data: engine.SplitData,
    test: dict[str, torch.Tensor] | None,
    run_dir: Path,
    config: engine.RunConfig,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, Any]:
    """t-SNE figures and numbers for each split; ``test`` is predict()'s output with features, computed if None."""
    run_dir = Path(run_dir)
    method = check_settings(config, data, splits)
    reports = {}
    for split in splits:
        predicted = test if split == "test" and test is not None else split_predictions(net, data, split)
        reports[split] = analyse_split(predicted, split, data.classes, run_dir, config, method)
    engine.write_json(run_dir / "tsne_metrics.json", reports)
    print(
        f"t-SNE written to {run_dir}: "
        + ", ".join(f"tsne_{split}.png/.npz" for split in splits)
        + ", tsne_metrics.json"
    )
    return reports


class TSNEAnalysis:
    """The t-SNE plots of a run's penultimate features: what the training scripts hand to ``engine.train``."""

    def check(self, config: engine.RunConfig, data: engine.SplitData) -> None:
        check_settings(config, data)

    def run(
        self,
        net: nn.Module,
        data: engine.SplitData,
        test: dict[str, Any],
        run_dir: Path,
        config: engine.RunConfig,
        device: torch.device,
    ) -> None:
        if hasattr(net, "forward_features"):
            analyse_run(net, data, test, run_dir, config)


def analyses(config: engine.RunConfig) -> list[TSNEAnalysis]:
    """What a training run with ``config`` analyses at its end: the t-SNE plots, unless --no-tsne."""
    return [TSNEAnalysis()] if config.tsne else []


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, switch: bool = True) -> None:
    """The t-SNE's flags; with ``switch``, --no-tsne too (the training scripts, which run it at the end)."""
    group = parser.add_argument_group("analysis")
    if switch:
        group.add_argument(
            "--no-tsne",
            dest="tsne",
            action="store_false",
            help="skip the t-SNE plots of penultimate features at the end",
        )
    group.add_argument(
        "--tsne-samples",
        type=engine.positive_int,
        metavar="N",
        help=f"embed a class-stratified sample of N points per split instead of all (N > {PERPLEXITY}, the perplexity)",
    )
    group.add_argument(
        "--tsne-method",
        default="auto",
        choices=METHODS,
        help="t-SNE implementation: openTSNE's FFT-accelerated one, or scikit-learn's (default auto: openTSNE if "
        "installed)",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--run, --checkpoint and --model (as predict.py and evaluate.py take them), the data and the device: where the
    features come from (also the benchmark's)."""
    group = saved_models.add_arguments(
        parser,
        run_help="run folder of a trained model: its model.pth (the final weights) with its model.json",
        tta=False,
    )
    group.add_argument(
        "--seed", type=engine.non_negative_int, default=0, help="seeds the sample and the t-SNE (default 0)"
    )
    engine.add_data_arguments(parser)
    engine.add_device_arguments(parser, training=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_arguments(parser, switch=False)
    group = parser.add_argument_group("output")
    group.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="which splits to embed (default test train)"
    )
    group.add_argument(
        "--out-dir",
        help="folder for tsne_*.png, tsne_*.npz and tsne_metrics.json (default: the weights' run folder; "
        "runs/evaluations/<folder name> for the shipped model, a read-only folder or weights outside "
        "a run folder; with --redraw, the .npz file's folder)",
    )
    group.add_argument(
        "--redraw",
        metavar="NPZ",
        help="redraw tsne_<split>.png from a saved tsne_<split>.npz without recomputing; "
        "takes no --run, --checkpoint or --model",
    )
    return parser


def redraw(path: Path, out_dir: str | None) -> None:
    target = Path(out_dir or path.parent) / f"{path.stem}.png"
    save_drawing(load_embedding(path), target)
    print(f"Redrew {target} from {path}")


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.redraw:
        if args.run or args.model or args.checkpoint:
            parser.error("--redraw draws a saved file; give it without --run, --checkpoint and --model")
        redraw(Path(args.redraw), args.out_dir)
        return
    if not (args.run or args.checkpoint):
        parser.error("give --run DIR (or --checkpoint FILE, with --model NAME for a plain state dict), or --redraw NPZ")
    saved = open_model(args)
    out_dir = Path(args.out_dir) if args.out_dir else saved_models.output_folder(saved)
    engine.check_outside_data_tree(out_dir, args.data_dir)  # under train/ it would be read as a class folder next time
    engine.check_writable_folder(out_dir)
    data = model_data(saved, args)
    config = engine.RunConfig(
        model=saved.name,
        data_dir=args.data_dir,
        dataset=args.dataset,
        out_dir=str(out_dir),
        seed=args.seed,
        device=args.device,
        limit_train=args.limit_train,
        num_workers=args.num_workers,
        tsne_samples=args.tsne_samples,
        tsne_method=args.tsne_method,
    )
    net = saved.net.to(engine.training_device(args.device))
    analyse_run(net, data, None, out_dir, config, splits=tuple(dict.fromkeys(args.splits)))


if __name__ == "__main__":
    engine.run_cli(main)
