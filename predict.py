"""Classify your own images with a trained model: each image's top classes, with their probabilities.

    python predict.py photo.jpg                                       # the shipped model, pretrained/FastVGG_narrow
    python predict.py --run runs/CIFAR10Net photo.jpg holiday/
    python predict.py --run runs/FastVGG --checkpoint best.ckpt --recursive --csv predictions.csv holiday/
    python predict.py --checkpoint CIFAR10Net_7.pth --model CIFAR10Net_7 photo.png

Images of any size and common format are turned upright (EXIF), made RGB and RESIZED TO 32x32 PIXELS, the size the
models were trained on (each output pixel the average of those it covers; the aspect ratio is not kept, so crop a photo
around its subject first). The model knows its training classes only (CIFAR-10's ten for the shipped one). Every image
that can be read is predicted; each file that cannot be used is then listed with its reason, and the exit status is 2.
The answers go through engine.predict, as the run's own test measurement did. docs/using-models.md says more.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import engine
import saved_models
from engine import UserError
from saved_models import ModelCard, SavedModel

# The shipped model (trained by the project, docs/using-models.md): found beside this script, wherever it is run from.
DEFAULT_RUN = saved_models.SHIPPED_MODELS / "FastVGG_narrow"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
PRINTED_IMAGES = 20  # more images than this: a summary on screen, every image in --csv


# --------------------------------------------------------------------------------------------
# Finding and reading the images
# --------------------------------------------------------------------------------------------
def is_hidden(path: Path, folder: Path) -> bool:
    """Hidden files and folders (``.ipynb_checkpoints``, macOS's ``._photo.jpg`` companions) hold no photos."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def images_in_folder(folder: Path, recursive: bool) -> list[Path]:
    """The entries of ``folder`` with an image suffix, sorted; with ``recursive``, those of its sub-folders too. Every
    one but a folder: a FIFO, a link to nothing or a loop of links among them is then listed with its reason, not
    dropped without a word."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path
        for path in candidates
        if path.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(path, folder) and not path.is_dir()
    )


def find_images(paths: list[str], recursive: bool) -> list[Path]:
    """Every image to classify, in the order given, each once. A file named on the command line is read whatever its
    suffix (Pillow decides); a folder gives its entries with an image suffix, and a folder that gives none is a mistake.
    A path that names nothing is a mistake too; a link that leads nowhere is an entry, listed with its reason.
    """
    found = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            images = images_in_folder(path, recursive)
            if not images:
                deeper = "" if recursive else ", or --recursive to search its sub-folders"
                raise UserError(
                    f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)} files); give image files or another "
                    f"folder{deeper}"
                )
            found += images
        elif path.exists() or path.is_symlink():
            found.append(path)
        else:
            raise UserError(f"{path} does not exist; give image files or folders of images")
    return list(dict.fromkeys(found))


def read_images(paths: list[Path], size: int) -> tuple[list[Path], torch.Tensor, list[engine.UnreadableImage]]:
    """The files that are images, and those images as uint8 RGB, N x 3 x ``size`` x ``size``; then the files that are
    not, each with its reason. One bad file among many costs only itself."""
    read, images, unreadable = [], [], []
    for path in paths:
        try:
            images.append(engine.decode_image(path, size))
            read.append(path)
        except engine.UnreadableImage as error:
            unreadable.append(error)
    pixels = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    return read, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), unreadable


# --------------------------------------------------------------------------------------------
# The model and its answers
# --------------------------------------------------------------------------------------------
def open_model(args: argparse.Namespace) -> tuple[SavedModel, ModelCard]:
    """The model to ask, and its card (made from the data for a plain state dict given with --model)."""
    run = args.run
    if run is None and args.checkpoint is None:
        run = DEFAULT_RUN
        if not run.is_dir():
            raise UserError(
                f"the shipped model is not installed ({run} is missing); give --run DIR of a trained run "
                f"(python main.py makes runs/CIFAR10Net), or --checkpoint FILE --model NAME"
            )
    saved = saved_models.open_saved_model(run, args.checkpoint, args.model)
    card = saved.card or saved_models.card_from_data_dir(saved.name, args.data_dir)
    return saved, card


def probabilities(
    saved: SavedModel, card: ModelCard, images: torch.Tensor, tta: str, device: torch.device
) -> torch.Tensor:
    """Each image's class probabilities: the softmax of the model's scores, through engine.predict like the test
    measurement.
    """
    mean, std = card.normalisation
    dummy_labels = torch.zeros(len(images), dtype=torch.long)
    logits = engine.predict(saved.net.to(device), images, dummy_labels, mean, std, tta=tta)["logits"]
    return logits.softmax(1)


def top_classes(probs: torch.Tensor, classes: tuple[str, ...], k: int) -> list[list[tuple[str, float]]]:
    """Per image, its ``k`` likeliest classes with their probabilities, likeliest first."""
    values, indices = probs.topk(min(k, len(classes)), dim=1)
    return [
        [(classes[i], p) for i, p in zip(image_indices, image_values, strict=True)]
        for image_values, image_indices in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def describe_row(path: Path, row: list[tuple[str, float]]) -> str:
    return f"{path}: " + ", ".join(f"{name} {p:.1%}" for name, p in row)


def csv_rows(paths: list[Path], rows: list[list[tuple[str, float]]]) -> list[dict[str, object]]:
    table = []
    for path, row in zip(paths, rows, strict=True):
        entry: dict[str, object] = {"path": str(path)}
        for rank, (name, p) in enumerate(row, 1):
            entry[f"class_{rank}"], entry[f"probability_{rank}"] = name, round(p, 6)
        table.append(entry)
    return table


def csv_columns(k: int) -> list[str]:
    return ["path"] + [column for rank in range(1, k + 1) for column in (f"class_{rank}", f"probability_{rank}")]


def check_csv_path(csv_file: str | None) -> None:
    """A --csv that cannot be a file fails before any image is read."""
    if csv_file and Path(csv_file).is_dir():
        raise UserError(f"--csv {csv_file} is a folder; give a file name, e.g. {Path(csv_file) / 'predictions.csv'}")


def write_predictions(path: Path, table: list[dict[str, object]], columns: list[str]) -> None:
    try:
        engine.write_csv(path, table, columns)
    except OSError as error:  # a read-only folder, a path under a file, a full disk
        raise UserError(f"cannot write --csv {path} ({error.strerror or error}); give another file") from None


def summary(rows: list[list[tuple[str, float]]]) -> str:
    counts = Counter(row[0][0] for row in rows)
    return f"Top class of {len(rows)} images: " + ", ".join(f"{name} {count}" for name, count in counts.most_common())


def report(paths: list[Path], rows: list[list[tuple[str, float]]], csv_file: str | None) -> None:
    """One line per image for a few images, a summary for many; every image in the CSV when one is asked for.

    Many images without --csv print the summary and ask for --csv rather than write a file the user did not name: a
    predictions.csv appearing in the current folder (or replacing one there) would be a surprise."""
    if len(rows) <= PRINTED_IMAGES:
        for path, row in zip(paths, rows, strict=True):
            print(describe_row(path, row))
    else:
        print(summary(rows))
    if csv_file:
        write_predictions(Path(csv_file), csv_rows(paths, rows), csv_columns(len(rows[0])))
        print(f"Wrote {len(rows)} rows to {csv_file}")
    elif len(rows) > PRINTED_IMAGES:
        print(f"Each image's top classes: pass --csv FILE (more than {PRINTED_IMAGES} images are not listed here)")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = engine.script_parser(__doc__, usage="%(prog)s [options] IMAGE_OR_FOLDER [IMAGE_OR_FOLDER ...]")
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="IMAGE_OR_FOLDER",
        help="image files (any format Pillow reads) and folders; a folder gives its .png, .jpg, .jpeg, .bmp, .gif and "
        ".webp files (hidden ones aside); each image is resized to 32x32 pixels",
    )
    parser.add_argument(
        "--recursive",
        action="store_true",
        help="also search the folders' sub-folders (default: only the files directly in each folder)",
    )
    group = saved_models.add_arguments(
        parser,
        run_help="run folder of a trained model: its model.json and model.pth (default "
        "pretrained/FastVGG_narrow beside predict.py, the shipped model, when neither --run nor --checkpoint is given)",
    )
    group.add_argument(
        "--data-dir",
        default="./data",
        help="only with --model, for weights without model.json: CIFAR-10 here (the official batches or an "
        "image-folder tree, never downloaded) gives the normalisation statistics and class names; without it, "
        "CIFAR-10's published statistics are used, with a note (default ./data)",
    )
    group = parser.add_argument_group("prediction")
    group.add_argument(
        "--top",
        type=engine.positive_int,
        default=3,
        metavar="K",
        help="how many of the likeliest classes to show per image (default 3)",
    )
    group.add_argument(
        "--csv",
        metavar="FILE",
        help="also write one row per image: path, then class_1, probability_1, ... for the --top "
        f"classes (replaced if it exists). Without it, more than {PRINTED_IMAGES} images print only a summary",
    )
    engine.add_device_arguments(parser, training=False)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.model is not None and args.run is None and args.checkpoint is None:
        raise UserError("--model names the network of a weights file: give it with --checkpoint FILE")
    device = engine.training_device(args.device)
    check_csv_path(args.csv)
    paths = find_images(args.paths, args.recursive)  # a wrong path fails before the model loads
    saved, card = open_model(args)
    read, images, unreadable = read_images(paths, card.image_size)
    if read:
        tta = args.tta or card.tta
        print(
            f"{saved.describe()}; {len(read)} image{'s' if len(read) > 1 else ''} resized to "
            f"{card.image_size}x{card.image_size}" + (f", {tta} test-time augmentation" if tta != "none" else "")
        )
        report(read, top_classes(probabilities(saved, card, images, tta, device), card.classes, args.top), args.csv)
    if unreadable:
        for error in unreadable:
            print(error, file=sys.stderr)
        predicted = f"{len(read)} {'was' if len(read) == 1 else 'were'} predicted" if read else "none was predicted"
        raise UserError(f"{len(unreadable)} of {len(paths)} images could not be used (listed above); {predicted}")


if __name__ == "__main__":
    engine.run_cli(main)
