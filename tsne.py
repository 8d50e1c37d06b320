"""t-SNE of a trained network's penultimate features: how well the classes separate.

    python tsne.py --run runs/CIFAR10Net_7 --data-dir ./data
    python tsne.py --checkpoint ~/study/CIFAR_7.pth --model CIFAR10Net_7 --data-dir ./data
    python tsne.py --redraw runs/CIFAR10Net_7/tsne_test.npz

For the test split and the training split: the features of the second-to-last layer, projected to 2-D with a seeded
t-SNE (openTSNE's, or scikit-learn's), each point coloured by its predicted class and edged black where that is wrong.
Writes tsne_<split>.png, tsne_<split>.npz (to redraw without recomputing) and tsne_metrics.json (the silhouette by true
class in 2-D, the 5-NN accuracy in the features). The training scripts run the same analysis at the end of every run
unless given --no-tsne. docs/using-models.md says more.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import engine
import saved_models
from analyses.embedding import (
    METHODS,
    PERPLEXITY,
    Embedding,
    check_enough_points,
    describe,
    embed_and_score,
    load_embedding,
    resolve_method,
    save_drawing,
    save_embedding,
    stratified_sample,
)
from analyses.report import ReportAnalysis
from engine import UserError
from saved_models import SavedModel

SPLITS = ("test", "train")
# The t-SNE's settings in a training run (its flags' destinations), with their defaults: the engine carries them in
# RunConfig.analyses and lets --resume change them.
SETTINGS = {"tsne": True, "tsne_samples": None, "tsne_method": "auto"}
engine.register_analysis_settings(*SETTINGS)
engine.register_run_outputs("tsne_*.png", "tsne_*.npz", "tsne_metrics.json")


def setting(config: engine.RunConfig, name: str) -> Any:
    return config.analyses.get(name, SETTINGS[name])


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
    if not isinstance(saved.net, engine.FeatureNetwork):
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
            validation=args.validation,
            val_fraction=args.val_fraction,
        )
    )
    card = saved_models.card_for_data(saved, data)
    mean, std = card.normalisation
    return replace(data, mean=mean, std=std)


# --------------------------------------------------------------------------------------------
# The analysis of a run
# --------------------------------------------------------------------------------------------
# Without --tsne-samples, a split's t-SNE embeds at most one point for every SAMPLED_PER_TRAINED images the run trained
# on (epochs x training images), and at least MIN_SAMPLES: a short first look then spends no more time on its t-SNE than
# on training (docs/RESULTS.md, "A first run"), while a full run, and tsne.py on its own, embed every point.
SAMPLED_PER_TRAINED, MIN_SAMPLES = 6, 1000


def samples(config: engine.RunConfig, data: engine.SplitData) -> int | None:
    """Points per split: --tsne-samples, else as many as the training the run did is worth (None: all)."""
    given = setting(config, "tsne_samples")
    if given is not None:
        return given
    worth = max(MIN_SAMPLES, round(config.recipe.epochs * len(data.train_labels) / SAMPLED_PER_TRAINED))
    return worth if worth < max(len(data.train_labels), len(data.test_labels)) else None


def analyse_split(
    predicted: dict[str, torch.Tensor],
    split: str,
    classes: tuple[str, ...],
    run_dir: Path,
    config: engine.RunConfig,
    method: str,
    size: int | None,
) -> dict[str, Any]:
    """Embed (a sample of ``size``) one split's features, write tsne_<split>.npz and .png, print and return the
    numbers."""
    labels = predicted["labels"].numpy()
    index = stratified_sample(labels, size, config.seed)
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
    size = samples(config, data)
    for split in splits:
        check_enough_points(split, min(split_sizes[split], size or split_sizes[split]))
    return resolve_method(setting(config, "tsne_method"))


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
        reports[split] = analyse_split(predicted, split, data.classes, run_dir, config, method, samples(config, data))
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
        if isinstance(net, engine.FeatureNetwork):
            analyse_run(net, data, test, run_dir, config)

    def finish_command(self, config: engine.RunConfig, run_dir: Path) -> str:
        """This command on the run's model.pth, with the run's data, seed and t-SNE settings: the same files, for a run
        stopped during its t-SNE."""
        return shlex.join(["python", this_script(), "--run", str(run_dir), *same_settings(config)])


def this_script() -> str:
    """This file as the user can type it where the run was started: relative below the working folder, else whole."""
    here, working = Path(__file__).resolve(), Path.cwd().resolve()
    return str(here.relative_to(working) if here.is_relative_to(working) else here)


def same_settings(config: engine.RunConfig) -> list[str]:
    """The flags of this command that give the t-SNE a run's data, seed, device and t-SNE settings (those that differ
    from their defaults)."""
    defaults = build_parser().parse_args(["--run", "."])
    flags = []
    for flag, value in (
        ("--data-dir", config.data_dir),
        ("--dataset", config.dataset),
        ("--limit-train", config.limit_train),
        ("--val-fraction", config.val_fraction),
        ("--num-workers", config.num_workers),
        ("--seed", config.seed),
        ("--device", config.device),
        ("--tsne-samples", setting(config, "tsne_samples")),
        ("--tsne-method", setting(config, "tsne_method")),
    ):
        if value != getattr(defaults, flag.removeprefix("--").replace("-", "_")):
            flags += [flag, str(value)]
    return flags + ([] if config.validation else ["--no-validation"])


def analyses(config: engine.RunConfig) -> list[TSNEAnalysis | ReportAnalysis]:
    """What a training run with ``config`` analyses at its end: the t-SNE plots (unless --no-tsne), then report.html,
    which shows them."""
    return [*([TSNEAnalysis()] if setting(config, "tsne") else []), ReportAnalysis()]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, switch: bool = True) -> None:
    """The t-SNE's flags; with ``switch``, --no-tsne too (the training scripts, which run it at the end; there the
    others show in --help-all only)."""
    group = parser.add_argument_group("analysis")
    if switch:
        group.add_argument(
            "--no-tsne",
            dest="tsne",
            action="store_false",
            help="skip the t-SNE plots of penultimate features at the end",
        )
    settings = (
        group.add_argument(
            "--tsne-samples",
            type=engine.positive_int,
            metavar="N",
            help=f"embed a class-stratified sample of N points per split (N > {PERPLEXITY}) (default: all; at the end "
            f"of a short run, one point per {SAMPLED_PER_TRAINED} images it trained on, at least {MIN_SAMPLES})",
        ),
        group.add_argument(
            "--tsne-method",
            default="auto",
            choices=METHODS,
            help="t-SNE implementation: openTSNE's FFT-accelerated one, or scikit-learn's (default auto: openTSNE if "
            "installed)",
        ),
    )
    for action in settings if switch else ():
        engine.advanced(action)


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
    parser = engine.script_parser(__doc__)
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
        analyses=engine.analysis_settings(args),
    )
    net = saved.net.to(engine.training_device(args.device))
    analyse_run(net, data, None, out_dir, config, splits=tuple(dict.fromkeys(args.splits)))


if __name__ == "__main__":
    engine.run_cli(main)
