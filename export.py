"""Export a trained model as one file that takes raw pixels and gives class probabilities: ONNX, or torch.export's .pt2.

    python export.py --run runs/FastVGG                            # runs/FastVGG/model.onnx and model.onnx.json
    python export.py --run pretrained/FastVGG_narrow               # into runs/exports/FastVGG_narrow/
    python export.py --run runs/CIFAR10Net --checkpoint best.ckpt --tta none --out cifar10net.onnx

The file takes a uint8 RGB batch N x 3 x 32 x 32 ("images") and gives N x classes probabilities ("probabilities"): the
division by 255, the normalisation, the network, the test-time augmentation and the softmax are inside it; resizing a
photo to 32x32 is not (Pillow's Image.resize(..., Image.Resampling.BOX), as predict.py does). <file>.json beside it
holds the model card and the input and output spec. The file is checked against the model before it is put in place.
docs/using-models.md says more.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnxruntime
import torch
from torch import nn

import engine
import saved_models
from engine import UserError, write_atomically
from functions import model_input
from saved_models import ModelCard, SavedModel

FORMATS = {
    "onnx": "ONNX, for onnxruntime or any ONNX runtime (opset 18)",
    "pt2": "torch.export's ExportedProgram, for torch.export.load (PyTorch only; the toolkit's code is not needed)",
}
EXPORTED_TTA = ("none", "flip")  # what issue #24 asks export to offer; flip-translate is left out by that decision
INPUT, OUTPUT = "images", "probabilities"  # the names of the file's input and output
OPSET = 18  # read by onnxruntime 1.14 (2023) and later
CHECK_IMAGES = 8  # random images the written file answers before it is put in place
CHECK_TOLERANCE = 1e-4  # largest difference from the model's own probabilities the check accepts


class ExportedClassifier(nn.Module):
    """uint8 images in, class probabilities out, the way engine.predict and predict.py compute them: ``model_input``
    (x/255, normalised by the card), the network, ``engine.tta_logits`` under ``tta``, the softmax."""

    def __init__(self, net: nn.Module, card: ModelCard, tta: str):
        super().__init__()
        self.net, self.tta = net, tta
        mean, std = card.normalisation
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = model_input(images, self.mean, self.std)
        logits = self.net(inputs).float()
        return engine.tta_logits(self.net, inputs, logits, self.tta)[self.tta].softmax(1)


# --------------------------------------------------------------------------------------------
# Writing the file, checked
# --------------------------------------------------------------------------------------------
def example_batch(size: int) -> torch.Tensor:
    """What the exporters trace with: two images, so the batch size stays a variable (torch.export fixes
    sizes 0 and 1)."""
    return torch.zeros(2, 3, size, size, dtype=torch.uint8)


def write_onnx(model: ExportedClassifier, size: int, path: Path) -> None:
    program = torch.onnx.export(
        model,
        (example_batch(size),),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes={INPUT: {0: "N"}},
        opset_version=OPSET,
        verbose=False,
    )

    def write(temporary: Path) -> None:
        program.save(str(temporary), external_data=False)  # one self-contained file, whatever the network's size
        session = onnxruntime.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
        check_answers(model, size, lambda images: torch.from_numpy(session.run([OUTPUT], {INPUT: images.numpy()})[0]))

    write_atomically(path, write)


def write_pt2(model: ExportedClassifier, size: int, path: Path) -> None:
    program = torch.export.export(model, (example_batch(size),), dynamic_shapes={INPUT: {0: torch.export.Dim("N")}})

    def write(temporary: Path) -> None:
        torch.export.save(program, temporary)
        check_answers(model, size, torch.export.load(temporary).module())

    write_atomically(path, write)


WRITERS: dict[str, Callable[[ExportedClassifier, int, Path], None]] = {"onnx": write_onnx, "pt2": write_pt2}


@torch.no_grad()
def check_answers(model: ExportedClassifier, size: int, exported: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The written file must give the model's probabilities on random images (an exporter can mistranslate an
    operation).
    """
    images = torch.randint(
        0, 256, (CHECK_IMAGES, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    difference = (exported(images) - model(images)).abs().max().item()
    if not difference <= CHECK_TOLERANCE:
        raise UserError(
            f"the exported file's probabilities differ from the model's by up to {difference:.2g} on {CHECK_IMAGES} "
            f"random images (at most {CHECK_TOLERANCE:g} is right), so it was not written; try the other --format"
        )


def description(card: ModelCard, tta: str, weights: Path, file_format: str) -> dict[str, Any]:
    """<file>.json: the card (its tta the file's) and what goes in and comes out;
    ``ModelCard.from_dict`` reads it back."""
    return {
        **replace(card, tta=tta).to_dict(),
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "shape": ["N", 3, card.image_size, card.image_size],
            "range": "0..255, RGB",
            "normalised": "inside the file (x/255, minus mean, over std): give the raw pixels",
        },
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": ["N", len(card.classes)],
            "meaning": f"class probabilities, in the order of classes, with {tta} test-time augmentation",
        },
        "format": file_format,
        "exported_from": str(weights),
    }


# --------------------------------------------------------------------------------------------
# What to export, and where
# --------------------------------------------------------------------------------------------
def exported_tta(asked: str | None, card: ModelCard, weights: Path) -> str:
    """--tta, else the card's own; flip-translate is not offered (see EXPORTED_TTA)."""
    if asked == "flip-translate":
        raise UserError(
            "--tta flip-translate is not offered for export; give --tta flip (the image and its mirror image) or "
            "--tta none"
        )
    tta = asked or card.tta
    if tta not in EXPORTED_TTA:
        raise UserError(
            f"{weights} predicts with {tta} test-time augmentation (its model card's), which export does not offer; "
            "give --tta flip (the image and its mirror image) or --tta none"
        )
    return tta


def file_format(asked: str | None, out: str | None) -> str:
    """--format, else the one --out's suffix names, else ONNX."""
    suffix = Path(out).suffix.lstrip(".") if out else ""
    return asked or (suffix if suffix in FORMATS else "onnx")


def write_problem(folder: Path) -> str:
    """Why no file can be made in ``folder`` (or, if it does not exist yet, in the folder above it that would hold
    it); empty if one can."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:  # a read-only folder, a path under a file
        return error.strerror or str(error)
    return ""


def check_writable(out: Path, default: Path) -> None:
    """The file and its JSON can be written where they go: said before the export, not after it, with a file that can
    be written instead (in the folder --out names, else in ``default``, where export.py writes without --out)."""
    problem = write_problem(out if out.is_dir() else out.parent)
    if out.is_dir() and not problem:
        raise UserError(f"--out {out} is a folder; give a file name, e.g. --out {out / default.name}")
    if problem:
        what = f"--out {out} is a folder, and one you cannot write" if out.is_dir() else f"cannot write {out}"
        instead = f", e.g. --out {default}" if default != out and not write_problem(default.parent) else ""
        raise UserError(f"{what} ({problem}); give --out FILE in a folder you can write{instead}")


def export(saved: SavedModel, tta: str, file_format: str, out: Path) -> None:
    """Write ``saved`` as ``out`` and its description as <out>.json."""
    card = saved.card
    WRITERS[file_format](ExportedClassifier(saved.net, card, tta).eval(), card.image_size, out)
    engine.write_json(Path(f"{out}.json"), description(card, tta, saved.weights, file_format))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = engine.script_parser(__doc__)
    group = saved_models.add_arguments(
        parser,
        run_help="run folder of a trained model: exports its model.pth (the final weights) with its model.json",
        tta=False,
        model=False,
    )
    group.add_argument(
        "--tta",
        choices=tuple(engine.TTA_MODES),
        help="test-time augmentation inside the file, each image's probabilities from: "
        f"{engine.choices_help({mode: engine.TTA_MODES[mode] for mode in EXPORTED_TTA})} (default: the model's own, "
        "from its model card). flip-translate is not offered: give flip for a model that uses it",
    )
    group = parser.add_argument_group("export")
    group.add_argument(
        "--format",
        choices=tuple(FORMATS),
        help=f"{engine.choices_help(FORMATS)} (default: the one --out's suffix names, else onnx)",
    )
    group.add_argument(
        "--out",
        metavar="FILE",
        help="the file to write (replaced if it exists), and FILE.json beside it (default: "
        "<weights>.onnx or .pt2 beside the weights in a run folder of yours, e.g. runs/FastVGG/model.onnx; "
        "runs/exports/<folder name>/ for the shipped model, a read-only folder or weights outside a run folder)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.run is None and args.checkpoint is None:
        raise UserError("give --run DIR (a run folder), or --checkpoint FILE (a run's best.ckpt or last.ckpt)")
    saved = saved_models.open_saved_model(
        args.run, args.checkpoint, card_needed_for="the exported file builds in its class names and normalisation"
    )
    tta = exported_tta(args.tta, saved.card, saved.weights)
    chosen_format = file_format(args.format, args.out)
    default = saved_models.output_folder(saved, saved_models.EXPORTS) / f"{saved.weights.stem}.{chosen_format}"
    out = Path(args.out) if args.out else default
    check_writable(out, default)
    export(saved, tta, chosen_format, out)
    size = saved.card.image_size
    print(
        f"Wrote {out} and {out}.json: {saved.describe()}; in: uint8 images N x 3 x {size} x {size} (RGB, 0..255), out: "
        f"{len(saved.card.classes)} class probabilities; "
        f"normalisation{f' and {tta} test-time augmentation' if tta != 'none' else ''} inside"
    )


if __name__ == "__main__":
    engine.run_cli(main)
