"""Reading CIFAR-10 from disk: the official python batches, an image-folder tree (decoded once, then cached), or a download.

``load_cifar10`` returns the whole data set as uint8 tensors; ``split_train_val`` is the study's 45,000 / 5,000 split.
Everything a user can get wrong here (a tampered batch file, half a tree, a missing or extra class folder, a file
that is no 32x32 image, an --out-dir inside the tree) stops with one ``UserError`` line before any training. Each file
of a tree is decoded by ``engine.images.decode_image``, as predict.py decodes a photo.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch

from engine.images import DECODING_VERSION, decode_image
from functions import CLASSES, UserError, is_temporary_copy, write_atomically

# torchvision.datasets.CIFAR10's own table: the official batch files and their MD5 sums.
# A file is unpickled only after its checksum matched this table.
PYTHON_BATCHES_DIR = "cifar-10-batches-py"
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CACHE_NAME = "cifar10-uint8-cache.npz"

SPLIT_SEED = 20  # the original study's torch.Generator().manual_seed(20)
TRAIN_FRACTION = 0.9  # 45,000 / 5,000 of the 50,000 training images



@dataclass
class CIFAR10Arrays:
    """The whole data set decoded into memory: uint8 images N x 3 x 32 x 32 and int64 labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_python_batches(folder: Path, checksums: dict[str, str] = OFFICIAL_MD5) -> CIFAR10Arrays:
    """Read the official ``cifar-10-batches-py`` files, each checked against its MD5 before unpickling."""
    for name, expected in checksums.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing; the folder {folder} is incomplete: download CIFAR-10 again")
        if md5sum(path) != expected:
            raise UserError(f"{path} failed its MD5 check (truncated or altered); delete {folder} and download CIFAR-10 again")

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")  # safe: the checksum above matched
        return np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(batch["labels"])

    train = [read(name) for name in TRAIN_BATCHES]
    test_images, test_labels = read("test_batch")
    return CIFAR10Arrays(
        train_images=torch.from_numpy(np.concatenate([images for images, _ in train])),
        train_labels=torch.from_numpy(np.concatenate([labels for _, labels in train])).long(),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels).long(),
        classes=CLASSES,
        source=f"official python batches in {folder}",
    )


class ImageFile(NamedTuple):
    """One image of the tree; its size and modification time key the decoded-image cache."""

    path: Path
    label: int
    size: int
    mtime_ns: int


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
                raise UserError(f"{candidate} has {present}/ but no {missing}/ folder; an image-folder tree needs both "
                                f"train/<class>/ and test/<class>/")
    return None


def check_outside_data_tree(folder: Path, data_dir: str | os.PathLike, flag: str = "--out-dir") -> None:
    """Refuse ``folder`` anywhere inside the image-folder tree that ``data_dir`` gives. Under train/ or test/ a run folder
    would be read as a class folder, and the data, not the flag, would seem wrong; elsewhere it mixes runs into the data."""
    data_dir = Path(data_dir)
    if (data_dir / PYTHON_BATCHES_DIR).is_dir():
        return  # the official batches are read, not the tree
    root = find_image_folder_root(data_dir)
    if root is not None and Path(folder).resolve().is_relative_to(root.resolve()):
        raise UserError(f"{flag} {folder} lies inside the data tree {root}; give a folder outside it")


def quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def class_folders(root: Path) -> tuple[str, ...]:
    """The class names, checked: train/ and test/ hold the same ten class folders, or nothing is decoded.

    A class missing from test/ would otherwise crash after all the training, and a count other than ten at the
    first step (the models have ten outputs). The sorted names give the labels: CIFAR-10's own names sort into
    its label order, whatever order the file system lists them in."""
    found = {split: {path.name for path in visible_entries(root / split) if path.is_dir()} for split in ("train", "test")}
    problems = []
    for split, other in (("test", "train"), ("train", "test")):
        lacking = sorted(found[other] - found[split])
        if lacking:
            plural = "s" if len(lacking) > 1 else ""
            problems.append(f"{split}/ lacks the class folder{plural} {quoted(lacking)} that {other}/ has")
    if problems:
        raise UserError(f"{root}: {'; '.join(problems)}; train/ and test/ must hold the same class folders")
    classes = tuple(sorted(found["train"]))
    if len(classes) != len(CLASSES):
        raise UserError(f"{root}: train/ and test/ hold {len(classes)} class folders ({quoted(classes) or 'none'}) but the "
                        f"models have {len(CLASSES)} outputs; give exactly CIFAR-10's {len(CLASSES)} class folders")
    return classes


def list_image_files(split_dir: Path, classes: tuple[str, ...]) -> list[ImageFile]:
    """The images of ``split_dir/<class>/`` in label order. An empty class or a zero-byte file stops here, from
    the listing alone, before the slow decoding."""
    files = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        images = [path for path in visible_entries(folder) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise UserError(f"{folder} holds no images (.png, .jpg or .jpeg files); every class needs some")
        for path in images:
            try:
                stat = path.stat()
            except OSError as error:  # a dangling link, say
                raise UserError(f"{path} cannot be read ({error.strerror}); delete it or copy it again") from None
            if stat.st_size == 0:
                raise UserError(f"{path} is empty (0 bytes); delete it or copy it again")
            files.append(ImageFile(path, label, stat.st_size, stat.st_mtime_ns))
    return files


def decode_images(files: list[ImageFile], workers: int) -> np.ndarray:
    """The images as one uint8 array N x 3 x 32 x 32; a file that is no 32x32 image stops with its name."""
    def decode(file: ImageFile) -> np.ndarray:
        image = decode_image(file.path)
        if image.shape[:2] != (32, 32):
            raise UserError(f"{file.path} is {image.shape[1]}x{image.shape[0]} pixels; CIFAR-10 images are 32x32")
        return image

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # Pillow releases the GIL while decoding
        images = np.stack(list(pool.map(decode, files)))
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def labels_of(files: list[ImageFile]) -> torch.Tensor:
    return torch.tensor([file.label for file in files], dtype=torch.long)


def tree_fingerprint(files: list[ImageFile]) -> str:
    """Changes whenever a file is added, removed, renamed or rewritten, or the decoding changes: the cache is then rebuilt."""
    digest = hashlib.sha1(f"decoding {DECODING_VERSION}\n".encode())
    for file in files:
        digest.update(f"{file.path.parent.name}/{file.path.name}|{file.label}|{file.size}|{file.mtime_ns}\n".encode())
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
    except Exception as error:  # zipfile, numpy and the OS each have their own errors for a damaged file; all mean: decode again
        reason = type(error).__name__
    else:
        if all(array.dtype == np.uint8 and array.shape == (count, 3, 32, 32) for array, count in zip(images, counts)):
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


def load_image_folder(root: Path, workers: int = 2) -> CIFAR10Arrays:
    """Decode ``train/<class>/*`` and ``test/<class>/*`` once, then reuse a pickle-free .npz cache."""
    classes = class_folders(root)
    train_files = list_image_files(root / "train", classes)
    test_files = list_image_files(root / "test", classes)
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
        images = decode_images(train_files + test_files, workers)
        train_images, test_images = images[:len(train_files)], images[len(train_files):]
        written = write_cache(root, {"train_images": train_images, "test_images": test_images,
                                     "fingerprint": np.array(fingerprint)})
        source = f"image folders in {root}" + (f" (decoded once, cached in {written})" if written else " (no writable cache folder)")
    return CIFAR10Arrays(
        train_images=torch.from_numpy(train_images),
        train_labels=labels_of(train_files),
        test_images=torch.from_numpy(test_images),
        test_labels=labels_of(test_files),
        classes=classes,
        source=source,
    )


def download_cifar10(data_dir: Path) -> None:
    """torchvision's own download of the official archive into ``data_dir``."""
    import torchvision

    torchvision.datasets.CIFAR10(root=str(data_dir), train=True, download=True)


def has_local_cifar10(data_dir: str | os.PathLike) -> bool:
    """Whether ``data_dir`` holds CIFAR-10 (official batches or an image-folder tree), so that loading downloads nothing."""
    data_dir = Path(data_dir)
    return (data_dir / PYTHON_BATCHES_DIR).is_dir() or find_image_folder_root(data_dir) is not None


def load_cifar10(data_dir: str | os.PathLike, workers: int = 2, checksums: dict[str, str] = OFFICIAL_MD5) -> CIFAR10Arrays:
    """The data set from ``data_dir``: official python batches, else an image-folder tree, else a download."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file; give the folder that holds CIFAR-10")
    if (data_dir / PYTHON_BATCHES_DIR).is_dir():
        return load_python_batches(data_dir / PYTHON_BATCHES_DIR, checksums)
    root = find_image_folder_root(data_dir)
    if root is not None:
        return load_image_folder(root, workers)
    existed = data_dir.exists()
    try:
        download_cifar10(data_dir)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        if not existed:
            shutil.rmtree(data_dir, ignore_errors=True)  # leave no empty folder or partial archive behind
        raise UserError(
            f"no CIFAR-10 under {data_dir} and the download failed ({error}); offline, copy the official "
            f"'{PYTHON_BATCHES_DIR}' folder or an image-folder tree (train/<class>/*.png|jpg, test/<class>/...) "
            f"there, or point --data-dir at one"
        ) from None
    return load_python_batches(data_dir / PYTHON_BATCHES_DIR, checksums)


def split_train_val(num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original study's split, to the index: ``random_split`` with ``torch.Generator().manual_seed(20)``."""
    train_size = int(TRAIN_FRACTION * num_images)
    train, val = torch.utils.data.random_split(
        range(num_images), [train_size, num_images - train_size], generator=torch.Generator().manual_seed(SPLIT_SEED)
    )
    return torch.tensor(train.indices), torch.tensor(val.indices)
