"""Reading a data set from disk: CIFAR-10's or CIFAR-100's official python files, any image-folder tree (decoded and
resized once, then cached), or a download.

``load_dataset`` returns the whole data set as uint8 tensors; ``split_train_val`` is the study's 45,000 / 5,000 split
(the same random split of any other data set, at its --val-fraction). An image-folder tree may hold any number of
classes (2 or more; the sorted folder names are the class names) and images of any size, resized to the models' input
size by ``engine.images.decode_image``, as a photo to classify is resized. Everything a user can get wrong here (a
tampered official file, half a tree, a class folder missing from one split, an undecodable file, an --out-dir inside
the tree) stops with one ``UserError`` line before any training; a tree's unusable files are listed first, all of them
at once (``LISTED_FILES`` at most), so one run names every file to fix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import urllib.error
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from engine.errors import UserError
from engine.files import is_temporary_copy, write_atomically
from engine.images import DECODING_VERSION, UnreadableImage, decode_image, file_status
from engine.official import OFFICIAL, DatasetArrays

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CACHE_NAME = "cifar10-uint8-cache.npz"
INPUT_SIZE = 32  # the models' input: every image of a tree is resized to INPUT_SIZE x INPUT_SIZE once, into the cache
DATASETS = {
    "auto": "CIFAR-10's or CIFAR-100's official folder, else an image-folder tree, else CIFAR-10 downloaded",
    "cifar10": "CIFAR-10: its official cifar-10-batches-py folder, else an image-folder tree, else downloaded",
    "cifar100": "CIFAR-100 (100 fine labels): its official cifar-100-python folder, else an image-folder tree, else "
    "downloaded",
}

LISTED_FILES = 20  # a tree's unusable files printed one per line; the count names them all, by folder
SPLIT_SEED = 20  # the original study's torch.Generator().manual_seed(20)
VAL_FRACTION = 0.1  # 5,000 of CIFAR-10's 50,000 training images: the study's 45,000 / 5,000


class ImageFile(NamedTuple):
    """One entry of the tree: an image, whose size, times and inode key the decoded-image cache
    (``tree_fingerprint``); or, with ``problem``, what keeps it from being one, seen from the listing alone."""

    path: Path
    label: int
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    inode: int = 0
    problem: UnreadableImage | None = None


def visible_entries(folder: Path) -> list[Path]:
    """The folder's entries, sorted, without hidden ones: Jupyter's ``.ipynb_checkpoints``, macOS's ``.DS_Store``
    and ``._name.png`` companions are never data (a hidden folder would otherwise become an 11th class)."""
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def find_image_folder_root(data_dir: Path) -> Path | None:
    """``data_dir`` itself or its first sub-folder that holds both ``train/`` and ``test/``."""
    candidates = [data_dir] + [p for p in visible_entries(data_dir) if p.is_dir()] if data_dir.is_dir() else []
    for candidate in candidates:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    for candidate in candidates:  # half a tree is a copy gone wrong, not a reason to download
        for present, missing in (("train", "test"), ("test", "train")):
            if (candidate / present).is_dir():
                raise UserError(
                    f"{candidate} has {present}/ but no {missing}/ folder; an image-folder tree needs both "
                    f"train/<class>/ and test/<class>/"
                )
    return None


def check_outside_data_tree(folder: Path, data_dir: str | os.PathLike, flag: str = "--out-dir") -> None:
    """Refuse ``folder`` anywhere inside the image-folder tree that ``data_dir`` gives. Under train/ or test/ a run
    folder would be read as a class folder, and the data, not the flag, would seem wrong; elsewhere it mixes runs into
    the data."""
    data_dir = Path(data_dir)
    if official_folder(data_dir, "auto") is not None:
        return  # the official files are read, not the tree
    root = find_image_folder_root(data_dir)
    if root is not None and Path(folder).resolve().is_relative_to(root.resolve()):
        raise UserError(f"{flag} {folder} lies inside the data tree {root}; give a folder outside it")


def quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def class_folders(root: Path) -> tuple[str, ...]:
    """The class names, checked: train/ and test/ hold the same class folders, at least two, or nothing is decoded.

    A class missing from test/ would otherwise crash after all the training. The sorted names give the labels:
    CIFAR-10's own names sort into its label order, whatever order the file system lists them in."""
    found = {
        split: {path.name for path in visible_entries(root / split) if path.is_dir()} for split in ("train", "test")
    }
    problems = []
    for split, other in (("test", "train"), ("train", "test")):
        lacking = sorted(found[other] - found[split])
        if lacking:
            plural = "s" if len(lacking) > 1 else ""
            problems.append(f"{split}/ lacks the class folder{plural} {quoted(lacking)} that {other}/ has")
    if problems:
        raise UserError(f"{root}: {'; '.join(problems)}; train/ and test/ must hold the same class folders")
    classes = tuple(sorted(found["train"]))
    if len(classes) < 2:
        raise UserError(
            f"{root}: train/ and test/ hold {len(classes)} class folder{'s' if len(classes) != 1 else ''} "
            f"({quoted(classes) or 'none'}); a classifier needs at least 2: one folder per class in each"
        )
    return classes


def refuse_files(problems: list[UnreadableImage], root: Path) -> None:
    """Stop on the tree's unusable files, if any, naming every one: one alone is the error line; several are printed one
    per line (the first LISTED_FILES), then counted by folder in the error line, so one run shows what to fix."""
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0]
    for problem in problems[:LISTED_FILES]:
        print(problem, file=sys.stderr)
    shown = "listed above" if len(problems) <= LISTED_FILES else f"the first {LISTED_FILES} are listed above"
    folders = Counter(problem.path.parent.relative_to(root).as_posix() for problem in problems)
    raise UserError(
        f"{len(problems)} files of {root} cannot be used ({shown}; "
        f"{', '.join(f'{folder}: {count}' for folder, count in folders.items())}); copy them again or delete them, "
        "then run the same command again"
    )


def image_file(path: Path, label: int) -> ImageFile:
    """``path`` as an entry of the tree, from its directory entry alone: an empty file, a FIFO or a link to nothing
    carries its ``problem``."""
    try:
        status = file_status(path)
        if status.st_size == 0:
            raise UnreadableImage(path, "is empty (0 bytes)", "delete it or copy it again")
    except UnreadableImage as problem:
        return ImageFile(path, label, problem=problem)
    return ImageFile(path, label, status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino)


def list_image_files(split_dir: Path, classes: tuple[str, ...]) -> list[ImageFile]:
    """The entries of ``split_dir/<class>/`` in label order, each an image or what keeps it from being one (an empty
    file, a FIFO, a link to nothing), found from the listing alone, before the slow decoding. An empty class stops
    here."""
    files = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        images = [path for path in visible_entries(folder) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise UserError(f"{folder} holds no images (.png, .jpg or .jpeg files); every class needs some")
        files += [image_file(path, label) for path in images]
    return files


def decoded_or_problem(file: ImageFile) -> np.ndarray | UnreadableImage:
    try:
        return decode_image(file.path, INPUT_SIZE)
    except UnreadableImage as problem:
        return problem


def decode_images(files: list[ImageFile], workers: int, root: Path) -> np.ndarray:
    """The images as one uint8 array N x 3 x INPUT_SIZE x INPUT_SIZE, each resized as a photo to classify is; every file
    that cannot be decoded is named (``refuse_files``) after all were tried."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # Pillow releases the GIL while decoding
        decoded = list(pool.map(decoded_or_problem, files))
    refuse_files([image for image in decoded if isinstance(image, UnreadableImage)], root)
    return np.ascontiguousarray(np.stack(decoded).transpose(0, 3, 1, 2))


def labels_of(files: list[ImageFile]) -> torch.Tensor:
    return torch.tensor([file.label for file in files], dtype=torch.long)


def tree_fingerprint(files: list[ImageFile]) -> str:
    """Changes whenever a file is added, removed, renamed or rewritten, or the decoding changes: the cache is then
    rebuilt.

    From the one stat per file the listing made, never the bytes (reading every image again on every run would cost
    time that grows with the tree: docs/data.md). The size and the modification time miss a file rewritten with both
    kept (cp -p of another image of the same size); its change time (ctime, which no program can set back) moves with
    every write, and its inode with a replacement by rename. A chmod moves the change time too: one needless rebuild,
    never a stale cache.
    """
    digest = hashlib.sha1(f"decoding {DECODING_VERSION}\n".encode())
    for file in files:
        entry = f"{file.path.parent.name}/{file.path.name}|{file.label}|{file.size}|{file.mtime_ns}"
        digest.update(f"{entry}|{file.ctime_ns}|{file.inode}\n".encode())
    return digest.hexdigest()


def cache_candidates(root: Path) -> list[Path]:
    """Beside the tree first; else the user's cache folder (the tree may be read-only)."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar10-toolkit"
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / CACHE_NAME, user_cache / f"{key}-{CACHE_NAME}"]


def read_cache(path: Path, fingerprint: str, counts: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached train and test images if ``path`` holds this tree's; None if it is absent, stale or damaged.

    A damaged cache (truncated by a full disk, a bit flipped: zip's CRC catches that) says so in one line, since it
    costs a full decode; the rebuild then replaces it."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["fingerprint"]) != fingerprint:
                return None  # the tree changed since: rebuilt without a word
            images = cached["train_images"], cached["test_images"]
    except FileNotFoundError:
        return None
    except Exception as error:
        # zipfile, numpy and the OS each have their own errors for a damaged file; all mean: decode again
        reason = type(error).__name__
    else:
        if all(
            array.dtype == np.uint8 and array.shape == (count, 3, INPUT_SIZE, INPUT_SIZE)
            for array, count in zip(images, counts, strict=True)
        ):
            return images
        reason = "arrays of the wrong shape"  # a damaged array header can still parse, as a shorter array
    print(f"note: the decoded-image cache {path} is unreadable ({reason}); rebuilding it", file=sys.stderr)
    return None


def write_cache(root: Path, arrays: dict[str, np.ndarray]) -> Path | None:
    for path in cache_candidates(root):
        try:
            write_atomically(path, lambda tmp: np.savez(tmp, **arrays))
            return path
        except OSError:
            continue  # read-only or full: try the next place, or run without a cache
    return None


# A write finishes within seconds of its temporary file's last change; one untouched this long is a killed run's.
STALE_TEMPORARY_AGE_S = 10 * 60


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary copies of ``path`` that a run killed inside ``write_atomically`` left behind; a recent
    one may be another run writing right now, so it stays."""
    cutoff = time.time() - STALE_TEMPORARY_AGE_S
    for temporary in path.parent.glob(f".{path.name}.*"):
        try:
            if is_temporary_copy(temporary) and temporary.stat().st_mtime < cutoff:
                temporary.unlink()
        except OSError:
            pass  # gone meanwhile, or a read-only folder: it does no harm


def load_image_folder(root: Path, workers: int = 2) -> DatasetArrays:
    """Decode ``train/<class>/*`` and ``test/<class>/*`` once, then reuse a pickle-free .npz cache."""
    classes = class_folders(root)
    train_files, test_files = (list_image_files(root / split, classes) for split in ("train", "test"))
    refuse_files([file.problem for file in train_files + test_files if file.problem], root)
    fingerprint = tree_fingerprint(train_files + test_files)
    for path in cache_candidates(root):
        remove_stale_temporaries(path)
    for path in cache_candidates(root):
        cached = read_cache(path, fingerprint, (len(train_files), len(test_files)))
        if cached is not None:
            train_images, test_images = cached
            source = f"image folders in {root} (decoded cache {path})"
            break
    else:
        images = decode_images(train_files + test_files, workers, root)
        train_images, test_images = images[: len(train_files)], images[len(train_files) :]
        written = write_cache(
            root, {"train_images": train_images, "test_images": test_images, "fingerprint": np.array(fingerprint)}
        )
        source = f"image folders in {root}" + (
            f" (decoded once, cached in {written})" if written else " (no writable cache folder)"
        )
    return DatasetArrays(
        train_images=torch.from_numpy(train_images),
        train_labels=labels_of(train_files),
        test_images=torch.from_numpy(test_images),
        test_labels=labels_of(test_files),
        classes=classes,
        source=source,
    )


def download_official(data_dir: Path, dataset: str) -> None:
    """torchvision's own download of the official archive of ``dataset`` into ``data_dir``."""
    import torchvision

    getattr(torchvision.datasets, OFFICIAL[dataset].torchvision_class)(root=str(data_dir), train=True, download=True)


def official_folder(data_dir: Path, dataset: str) -> tuple[str, Path] | None:
    """The official folder in ``data_dir`` of ``dataset`` (auto: CIFAR-10's, else CIFAR-100's), with its data set's
    name.
    """
    for name in ("cifar10", "cifar100") if dataset == "auto" else (dataset,):
        folder = data_dir / OFFICIAL[name].folder
        if folder.is_dir():
            return name, folder
    return None


def has_local_dataset(data_dir: str | os.PathLike) -> bool:
    """Whether ``data_dir`` holds a data set (an official folder or an image-folder tree), so that loading downloads
    nothing.
    """
    data_dir = Path(data_dir)
    return official_folder(data_dir, "auto") is not None or find_image_folder_root(data_dir) is not None


def load_dataset(
    data_dir: str | os.PathLike, workers: int = 2, dataset: str = "auto", checksums: dict[str, str] | None = None
) -> DatasetArrays:
    """The data set in ``data_dir``: the official folder of ``dataset``, else an image-folder tree, else a download of
    ``dataset`` (CIFAR-10 for auto). ``checksums`` replaces the official folder's MD5 table (tests make their own
    files)."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file; give the folder that holds the data set")
    found = official_folder(data_dir, dataset)
    if found is not None:
        name, folder = found
        return OFFICIAL[name].load(folder, *([checksums] if checksums else []))
    root = find_image_folder_root(data_dir)
    if root is not None:
        return load_image_folder(root, workers)
    name = "cifar10" if dataset == "auto" else dataset
    official = OFFICIAL[name]
    existed = data_dir.exists()
    try:
        download_official(data_dir, name)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        if not existed:
            shutil.rmtree(data_dir, ignore_errors=True)  # leave no empty folder or partial archive behind
        raise UserError(
            f"no {official.title} under {data_dir} and the download failed ({error}); offline, copy the official "
            f"'{official.folder}' folder or an image-folder tree (train/<class>/*.png|jpg, test/<class>/...) "
            f"there, or point --data-dir at one"
        ) from None
    return official.load(data_dir / official.folder, *([checksums] if checksums else []))


def split_train_val(num_images: int, val_fraction: float = VAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The original study's split, to the index: ``random_split`` with ``torch.Generator().manual_seed(20)``; other data
    sets and other fractions the same way."""
    train_size = int((1 - val_fraction) * num_images)
    if train_size < 1:  # the floor leaves at least one validation image whenever the fraction is above 0
        raise UserError(
            f"--val-fraction {val_fraction:g} of {num_images} training images leaves no training image; give a "
            "smaller one"
        )
    train, val = torch.utils.data.random_split(
        range(num_images), [train_size, num_images - train_size], generator=torch.Generator().manual_seed(SPLIT_SEED)
    )
    return torch.tensor(train.indices), torch.tensor(val.indices)
