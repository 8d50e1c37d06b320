"""Evaluate a saved model on the test set: accuracy, per-class precision, recall and F1, the confusion matrix.

    python evaluate.py --run runs/CIFAR10Net --data-dir ./data
    python evaluate.py --run runs/FastVGG --checkpoint best.ckpt
    python evaluate.py --checkpoint ~/study/CIFAR10Net_7.pth --model CIFAR10Net_7 --data-dir ./data --out-dir results

Measures the test images as a training run does at its end, normalised by the model card, at the precision the run
tested at: a run's model.pth gives its test.json's numbers. Writes evaluation-<weights>.json and
evaluation-<weights>-confusion.png beside the weights in a run folder of yours (else under runs/evaluations/, or
--out-dir); a run's own test.json is never touched. A plain state dict (the study's torch.save(net.state_dict(), ...))
takes --model, and the data's statistics. docs/using-models.md says more.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import engine
import saved_models
from engine import UserError
from saved_models import ModelCard, SavedModel


def evaluation_files(out_dir: Path, weights: Path) -> tuple[Path, Path]:
    """evaluation-<stem>.json and its figure: names no run writes, so a run's own test.json is never replaced."""
    return out_dir / f"evaluation-{weights.stem}.json", out_dir / f"evaluation-{weights.stem}-confusion.png"


def measure(
    saved: SavedModel, card: ModelCard, data: engine.SplitData, tta: str, precision: str, device
) -> dict[str, Any]:
    """The test report of a training run's end: predictions of the test split, normalised by the card, under ``tta``,
    at ``precision`` (as a run's test pass: autocast for the -mixed ones)."""
    mean, std = card.normalisation
    with engine.autocast_for(precision, device):
        test = engine.predict(saved.net.to(device), data.test_images, data.test_labels, mean, std, tta=tta)
    report = engine.test_report(test["labels"], test["logits"].argmax(1), data.classes)
    report.update(
        {"model": saved.name, "checkpoint": str(saved.weights), "tta": tta, "precision": precision, "data": data.source}
    )
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = engine.script_parser(__doc__)
    group = saved_models.add_arguments(
        parser,
        run_help="run folder of a trained model: evaluates its model.pth (the final weights) with its model.json",
    )
    group.add_argument(
        "--out-dir",
        help="folder for evaluation-<weights>.json and evaluation-<weights>-confusion.png (default: the weights' run "
        "folder; runs/evaluations/<folder name> for the shipped model, a read-only folder or weights outside a run "
        "folder)",
    )
    engine.add_data_arguments(parser, limit_train=False)
    engine.add_device_arguments(parser, training=False)
    parser.add_argument(
        "--precision",
        choices=engine.PRECISIONS,
        metavar="PRECISION",
        help="measure at this precision (Lightning's names: 32-true, bf16-mixed, 16-mixed, ...; auto as in training) "
        "(default: the one the run trained and tested at, from its model card, so a run's model.pth gives its "
        "test.json's numbers; 32-true for a plain state dict)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.run is None and args.checkpoint is None:
        raise UserError(
            "give --run DIR (a run folder), or --checkpoint FILE (with --model NAME for a plain state dict)"
        )
    device = engine.training_device(args.device)
    # a wrong file fails before the slow data load
    saved = saved_models.open_saved_model(args.run, args.checkpoint, args.model)
    out_dir = Path(args.out_dir) if args.out_dir else saved_models.output_folder(saved)
    engine.check_outside_data_tree(out_dir, args.data_dir)  # under train/ it would be read as a class folder next time
    engine.check_writable_folder(out_dir)
    data = engine.load_split(
        engine.RunConfig(model=saved.name, data_dir=args.data_dir, dataset=args.dataset, num_workers=args.num_workers)
    )
    card = saved_models.card_for_data(saved, data)
    tta = args.tta or card.tta
    precision = engine.resolve_precision(args.precision or card.precision, args.device)
    report = measure(saved, card, data, tta, precision, device)
    report_file, figure_file = evaluation_files(out_dir, saved.weights)
    engine.write_json(report_file, report)
    engine.plot_confusion(report, data.classes, figure_file, f"{saved.name} ({saved.weights.name})")
    print(
        f"Test accuracy of {saved.describe()}: {report['test_accuracy']:.2%} on {report['num_test_images']} images"
        + (f" (with {tta} test-time augmentation)" if tta != "none" else "")
        + (f", at {precision} precision" if precision != "32-true" else "")
    )
    print(f"Wrote {report_file} and {figure_file}")


if __name__ == "__main__":
    engine.run_cli(main)
