"""See what a trained network learned: its surest mistakes, where it looks, its first filters, its nearest neighbours.

    python visualize.py --run runs/CIFAR10Net --data-dir ./data
    python visualize.py --run pretrained/FastVGG_narrow --data-dir ./data --out-dir runs/look

From the test set (cs231n's lecture 12, "Visualizing and Understanding"): the images it is most sure of and wrong, the
right ones it is most and least sure of per class, Grad-CAM maps for the predicted and the true class (Captum), the
first convolution's filters, and for a few test images the training images nearest in its penultimate features.
Writes visual_*.png and visualize.json beside the weights in a run folder of yours (else runs/evaluations/<folder>, or
--out-dir) and adds them to that folder's report.html. A figure the model cannot have (no penultimate features, no
convolution) is a line and a note on the page. docs/using-models.md says more.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import analyses
import engine
import saved_models
from analyses.report import VISUALIZE_INDEX, write_report
from saved_models import SavedModel

FIGURES = {
    "visual_wrong.png": "The test images it is most sure of, and wrong",
    "visual_right.png": "Right: the most and the least sure, per class",
    "visual_gradcam.png": "Where it looks: Grad-CAM for the predicted and the true class",
    "visual_filters.png": "The first convolution's filters",
    "visual_neighbours.png": "Nearest training images in feature space",
}


def predictions(
    saved: SavedModel, card, images: torch.Tensor, labels: torch.Tensor, device
) -> analyses.learned.Predictions:
    """The plain network's answers (no test-time augmentation: Grad-CAM explains one forward pass) on ``images``."""
    mean, std = card.normalisation
    features = isinstance(saved.net, engine.FeatureNetwork)
    result = engine.predict(saved.net.to(device), images, labels, mean, std, with_features=features)
    return analyses.learned.Predictions(
        images.cpu(), result["labels"].cpu(), result["logits"].float().softmax(1).cpu(), result.get("features")
    )


def why_not(saved: SavedModel, name: str) -> str | None:
    """Why ``saved``'s network cannot have the figure ``name``, or None when it can."""
    has_convolution = analyses.learned.last_convolution(saved.net) is not None
    if name == "visual_neighbours.png" and not isinstance(saved.net, engine.FeatureNetwork):
        return f"{saved.name} has no forward_features() and classify(), so no nearest neighbours in feature space"
    if name in ("visual_gradcam.png", "visual_filters.png") and not has_convolution:
        return f"{saved.name} has no convolution, so no Grad-CAM and no first-layer filters"
    return None


def draw(saved: SavedModel, card, data, device) -> tuple[dict[str, object], dict[str, str]]:
    """Every figure it can have (name: matplotlib figure), and why each other one is missing."""
    mean, std = card.normalisation
    classes = tuple(card.classes)
    test = predictions(saved, card, data.test_images, data.test_labels, device)
    makers = {
        "visual_wrong.png": lambda: analyses.learned.confidently_wrong(test, classes, saved.name),
        "visual_right.png": lambda: analyses.learned.confident_right(test, classes, saved.name),
        "visual_gradcam.png": lambda: analyses.learned.class_activation_maps(
            saved.net, test, classes, saved.name, mean, std
        ),
        "visual_filters.png": lambda: analyses.learned.first_layer_filters(saved.net, saved.name),
        "visual_neighbours.png": lambda: analyses.learned.nearest_neighbours(
            test, predictions(saved, card, data.train_images, data.train_labels, device), classes, saved.name
        ),
    }
    drawn, notes = {}, {}
    for name, make in makers.items():
        reason = why_not(saved, name)
        if reason is None:
            try:
                drawn[name] = make()
            except (RuntimeError, ValueError, IndexError) as error:  # a figure lost is a note, never a failed command
                reason = f"{FIGURES[name]}: could not be drawn ({type(error).__name__}: {error})"
        if reason:
            print(f"note: {reason}", flush=True)
            notes[name] = reason
    return drawn, notes


def build_parser():
    parser = engine.script_parser(__doc__)
    saved_models.add_arguments(
        parser,
        run_help="run folder of a trained model: its model.pth (the final weights) with its model.json",
        tta=False,
    ).add_argument(
        "--out-dir",
        metavar="DIR",
        help="folder for the figures (default: the weights' run folder; runs/evaluations/<folder name> for the shipped "
        "model, a read-only folder or weights outside a run folder)",
    )
    engine.add_data_arguments(parser, limit_train=False)
    engine.add_device_arguments(parser, training=False)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.run is None and args.checkpoint is None:
        raise engine.UserError(
            "give --run DIR (a run folder), or --checkpoint FILE (with --model NAME for a plain state dict)"
        )
    started = time.perf_counter()
    device = engine.training_device(args.device)
    saved = saved_models.open_saved_model(args.run, args.checkpoint, args.model)  # a wrong file fails before the data
    out_dir = Path(args.out_dir) if args.out_dir else saved_models.output_folder(saved)
    engine.check_outside_data_tree(out_dir, args.data_dir)
    engine.check_writable_folder(out_dir)
    data = engine.load_split(
        engine.RunConfig(model=saved.name, data_dir=args.data_dir, dataset=args.dataset, num_workers=args.num_workers)
    )
    saved.net.eval()
    drawn, notes = draw(saved, saved_models.card_for_data(saved, data), data, device)
    for name, figure in drawn.items():
        engine.save_figure(figure, out_dir / name)
    index = {
        "model": saved.name,
        "weights": str(saved.weights),
        "figures": {n: FIGURES[n] for n in drawn},
        "notes": notes,
    }
    engine.write_json(out_dir / VISUALIZE_INDEX, index)
    report = write_report(out_dir)
    print(f"Wrote {len(drawn)} figures ({', '.join(drawn)}) and {report} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    engine.run_cli(main)
