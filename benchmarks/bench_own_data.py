"""Your own data, measured: two image-folder trees that are not CIFAR-10's ten classes, trained as a user would train
them.

    python -m benchmarks.bench_own_data --data-dir <JPEG copy> --precision bf16-mixed

(a) scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1,797 real 8x8 grayscale scans of 10 digits,
    shipped inside scikit-learn) written as an image-folder tree, 80/20 stratified (seed 0), resized to 32x32 by the
    toolkit;
(b) a 4-class subset of the CIFAR-10 tree in --data-dir (airplane, automobile, ship, truck: its class folders linked,
  not
    copied), beside the accuracy of those four classes in a 10-class run of the same model and recipe (--compare-run,
    default the shipped pretrained/FastVGG_narrow).

Each trains FastVGG_narrow with its own recipe through ``python modified_models.py --model FastVGG_narrow --data-dir
TREE``, exactly a user's command, and reports its test accuracy (flip TTA, the recipe's) and its wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import engine
from engine.data import find_image_folder_root

REPO = Path(__file__).resolve().parents[1]
SUBSET = ("airplane", "automobile", "ship", "truck")
MODEL = "FastVGG_narrow"


def write_digits_tree(root: Path) -> Path:
    """load_digits as train/<digit>/*.png and test/<digit>/*.png: 0..16 intensities scaled to 0..255."""
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    split = train_test_split(np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=0)
    for name, indices in zip(("train", "test"), split, strict=True):
        for index in indices:
            folder = root / name / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index], mode="L").save(folder / f"{index:04d}.png")
    return root


def link_subset_tree(root: Path, cifar: Path) -> Path:
    """The four classes' folders of the CIFAR-10 tree, linked into a tree of their own."""
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for name in SUBSET:
            link = root / split / name
            if not link.exists():
                link.symlink_to((cifar / split / name).resolve(), target_is_directory=True)
    return root


def train(tree: Path, run_dir: Path, precision: str, seed: int) -> tuple[dict, float]:
    command = [
        sys.executable,
        str(REPO / "modified_models.py"),
        "--model",
        MODEL,
        "--data-dir",
        str(tree),
        "--out-dir",
        str(run_dir),
        "--no-tsne",
        "--no-progress",
        "--precision",
        precision,
        "--seed",
        str(seed),
        "--overwrite",
    ]
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    return engine.read_json(run_dir / "test.json"), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", type=Path, required=True, help="the CIFAR-10 image-folder tree (train/<class>/, test/<class>/)"
    )
    parser.add_argument(
        "--compare-run",
        type=Path,
        default=REPO / "pretrained" / MODEL,
        help=f"a 10-class run of {MODEL} with its recipe, whose test.json gives the four classes' accuracy",
    )
    parser.add_argument(
        "--precision",
        default="32-true",
        choices=engine.PRECISIONS,
        help="as modified_models.py takes it (default 32-true)",
    )
    parser.add_argument("--seed", type=engine.non_negative_int, default=0, help="the runs' seed (default 0)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs/bench_own_data"),
        help="trees and run folders (default runs/bench_own_data)",
    )
    args = parser.parse_args()
    root = find_image_folder_root(args.data_dir)
    if root is None:
        raise engine.UserError(f"--data-dir {args.data_dir} holds no image-folder tree (train/<class>/, test/<class>/)")

    digits, digits_seconds = train(
        write_digits_tree(args.out_dir / "digits-tree"), args.out_dir / "digits", args.precision, args.seed
    )
    subset, subset_seconds = train(
        link_subset_tree(args.out_dir / "subset-tree", root), args.out_dir / "subset4", args.precision, args.seed
    )
    ten = engine.read_json(args.compare_run / "test.json")["per_class_accuracy"]
    print(f"\n{MODEL}, its recipe, seed {args.seed}, {args.precision}; test accuracy with {digits['tta']} TTA")
    print(
        f"(a) digits, 10 classes, 8x8 scans resized to 32x32: {digits['test_accuracy']:.2%} on "
        f"{digits['num_test_images']} images ({digits_seconds:.0f} s)"
    )
    print(
        f"(b) {', '.join(SUBSET)} as a 4-class tree: {subset['test_accuracy']:.2%} on {subset['num_test_images']} "
        f"images ({subset_seconds:.0f} s); per class "
        + ", ".join(f"{name} {subset['per_class_accuracy'][name]:.2%}" for name in SUBSET)
    )
    print(
        f"    the same four in the 10-class run {args.compare_run}: "
        + ", ".join(f"{name} {ten[name]:.2%}" for name in SUBSET)
        + f"; mean {np.mean([ten[name] for name in SUBSET]):.2%}"
    )


if __name__ == "__main__":
    engine.run_cli(main)
