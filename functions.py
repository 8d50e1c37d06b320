"""Shared helpers for the CIFAR-10 scripts: data, statistics, augmentation, initialisation, accuracy.

Everything here is a plain function or a small class; the training engine that uses them lives
in ``engine.py``. Images stay uint8 tensors (N x 3 x 32 x 32) in memory, on the training device,
and are augmented and normalised a whole chunk of batches at a time.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

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

SPLIT_SEED = 20  # the README's torch.Generator().manual_seed(20)
TRAIN_FRACTION = 0.9  # 45,000 / 5,000 of the 50,000 training images


class UserError(Exception):
    """A mistake the user can fix; the scripts print its message on one line and exit with status 2."""


# --------------------------------------------------------------------------------------------
# Loading CIFAR-10
# --------------------------------------------------------------------------------------------
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


def image_error_reason(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can decode"  # Pillow's own message repeats the path
    return getattr(error, "strerror", None) or str(error)  # "Permission denied"; "image file is truncated"


def decode_images(files: list[ImageFile], workers: int) -> np.ndarray:
    """The images as one uint8 array N x 3 x 32 x 32; a file that is no 32x32 image stops with its name."""
    from PIL import Image

    def decode(file: ImageFile) -> np.ndarray:
        try:
            with Image.open(file.path) as image:
                if image.size != (32, 32):  # known from the header, before the pixels are decoded
                    raise UserError(f"{file.path} is {image.width}x{image.height} pixels; CIFAR-10 images are 32x32")
                return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError) as error:  # Pillow's errors for unreadable, unknown and damaged files (a broken PNG chunk: SyntaxError)
            reason = image_error_reason(error)
            raise UserError(f"{file.path} cannot be read as an image ({reason}); delete it or copy it again") from None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # Pillow releases the GIL while decoding
        images = np.stack(list(pool.map(decode, files)))
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def labels_of(files: list[ImageFile]) -> torch.Tensor:
    return torch.tensor([file.label for file in files], dtype=torch.long)


def tree_fingerprint(files: list[ImageFile]) -> str:
    """Changes whenever a file is added, removed, renamed or rewritten: the cache is then rebuilt."""
    digest = hashlib.sha1()
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


# write_atomically's temporary copy of NAME.SUFFIX: ".NAME." + mkstemp's 8 random characters + ".SUFFIX"
TEMPORARY_COPY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]*)?")


def is_temporary_copy(path: Path) -> bool:
    match = TEMPORARY_COPY.fullmatch(path.name)
    return match is not None and (match["suffix"] or "") == Path(match["name"]).suffix


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
    """The README's split, to the index: ``random_split`` with ``torch.Generator().manual_seed(20)``."""
    train_size = int(TRAIN_FRACTION * num_images)
    train, val = torch.utils.data.random_split(
        range(num_images), [train_size, num_images - train_size], generator=torch.Generator().manual_seed(SPLIT_SEED)
    )
    return torch.tensor(train.indices), torch.tensor(val.indices)


# --------------------------------------------------------------------------------------------
# Statistics and normalisation
# --------------------------------------------------------------------------------------------
def mean_std_per_channel(images: torch.Tensor | Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and (population) std over every pixel of every image, in [0, 1] units.

    Takes a uint8 or float tensor N x C x H x W, or an iterable of ``(images, labels)`` batches such
    as a DataLoader. Unlike the original, which averaged per-image standard deviations, this is the
    standard deviation of the pixel distribution itself.
    """
    batches = [(images, None)] if isinstance(images, torch.Tensor) else images
    total = total_sq = None
    count = 0
    for batch, _ in batches:
        values = batch.to(torch.float64)
        if batch.dtype == torch.uint8:
            values = values / 255.0
        values = values.transpose(0, 1).reshape(values.shape[1], -1)
        total = values.sum(1) if total is None else total + values.sum(1)
        total_sq = (values**2).sum(1) if total_sq is None else total_sq + (values**2).sum(1)
        count += values.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------
# Augmentation, a batch at a time, every image with its own random parameters
# --------------------------------------------------------------------------------------------
AUGMENT_PRESETS = {
    "readme": "the README's: horizontal and vertical flips, rotation up to 90 degrees, strong colour jitter",
    "standard": "the usual CIFAR recipe: random 32x32 crop of the 4-pixel zero-padded image, horizontal flip",
    "light": "random 32x32 crop of the 2-pixel reflect-padded image, horizontal flip: airbench's, for runs of a few epochs",
    "none": "no augmentation",
}


def uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def flip_where(images: torch.Tensor, flip: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(dim), images)


def flip_and_rotate(images: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Optional horizontal and vertical flips, then a counter-clockwise rotation about the centre with
    nearest-neighbour sampling and zero fill (torchvision's RandomRotation), as one resampling pass.

    Flips map pixel centres onto pixel centres, so folding them into the rotation's sampling grid
    gives exactly the pixels of flipping first and rotating after, at half the cost.
    """
    radians = degrees * (math.pi / 180)
    cos, sin = radians.cos(), radians.sin()
    mirror_x = 1.0 - 2.0 * hflip.to(images.dtype)
    mirror_y = 1.0 - 2.0 * vflip.to(images.dtype)
    zero = torch.zeros_like(cos)
    # affine_grid maps output to input coordinates; with y pointing down this rotates counter-clockwise.
    theta = torch.stack([torch.stack([mirror_x * cos, -mirror_x * sin, zero], 1),
                         torch.stack([mirror_y * sin, mirror_y * cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision's rgb_to_grayscale."""
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


def blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp_(0, 1)


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, hue += shift mod 1, HSV -> RGB) in closed form.

    Each output channel is ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 * hue) mod 6`` and n = 5, 3, 1 for R, G, B: no per-sector gathers.
    """
    maxc, argmax = images.max(1)
    minc = images.min(1).values
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = images.unbind(1)
    hue6 = torch.where(argmax == 0, (g - b) / safe_delta,
                       torch.where(argmax == 1, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta))
    hue6 = hue6 + 6.0 * shift.view(-1, 1, 1)
    sector = (torch.tensor([5.0, 3.0, 1.0], device=images.device).view(1, 3, 1, 1) + hue6.unsqueeze(1)) % 6.0
    ramp = torch.minimum(sector, 4.0 - sector).clamp_(0, 1)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * ramp


def color_jitter(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """torchvision's ColorJitter: brightness, contrast, saturation and hue, in each image's own random order."""
    ops = (
        lambda x, k: (x * params["brightness"][k].view(-1, 1, 1, 1)).clamp_(0, 1),
        lambda x, k: blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), params["contrast"][k]),
        lambda x, k: blend(x, grayscale(x), params["saturation"][k]),
        lambda x, k: shift_hue(x, params["hue"][k]),
    )
    images = images.clone()
    for stage in range(4):
        for op_index, op in enumerate(ops):
            chosen = (params["order"][:, stage] == op_index).nonzero().squeeze(1)
            if chosen.numel():
                images[chosen] = op(images[chosen], chosen)
    return images


def sample_readme_params(n: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """One draw per image of every random choice the README's torchvision pipeline makes."""
    return {
        "hflip": torch.rand(n, generator=generator, device=device) < 0.5,
        "vflip": torch.rand(n, generator=generator, device=device) < 0.5,
        "degrees": uniform(n, -90.0, 90.0, generator, device),
        "brightness": uniform(n, 0.5, 1.5, generator, device),
        "contrast": uniform(n, 0.5, 1.5, generator, device),
        "saturation": uniform(n, 0.5, 1.5, generator, device),
        "hue": uniform(n, -0.5, 0.5, generator, device),
        "order": torch.rand(n, 4, generator=generator, device=device).argsort(1),
    }


def apply_readme(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    return color_jitter(flip_and_rotate(images, params["hflip"], params["vflip"], params["degrees"]), params)


def sample_crop_params(n: int, generator: torch.Generator, device: torch.device, pad: int) -> dict[str, torch.Tensor]:
    return {
        "dy": torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device),
        "dx": torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device),
        "hflip": torch.rand(n, generator=generator, device=device) < 0.5,
    }


def apply_crop(images: torch.Tensor, params: dict[str, torch.Tensor], pad: int, mode: str) -> torch.Tensor:
    """Each image's own random crop of the padded image (offsets ``dy``, ``dx``), then its own flip."""
    n, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode=mode)
    rows = (params["dy"].view(n, 1) + torch.arange(height, device=images.device)).view(n, 1, height, 1)
    cols = (params["dx"].view(n, 1) + torch.arange(width, device=images.device)).view(n, 1, 1, width)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channel = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return flip_where(padded[batch, channel, rows, cols], params["hflip"], 3)


AUGMENTERS = {
    "readme": (sample_readme_params, apply_readme),
    "standard": (partial(sample_crop_params, pad=4), partial(apply_crop, pad=4, mode="constant")),
    "light": (partial(sample_crop_params, pad=2), partial(apply_crop, pad=2, mode="reflect")),
}


def augment(images: torch.Tensor, preset: str, generator: torch.Generator) -> torch.Tensor:
    """Augment float images in [0, 1] with ``preset``; each image draws its own parameters."""
    if preset == "none":
        return images
    sample, apply = AUGMENTERS[preset]
    return apply(images, sample(images.shape[0], generator, images.device))


# --------------------------------------------------------------------------------------------
# Batches made on the device
# --------------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    """One independent stream per (seed, epoch): a resumed run draws exactly what the full run drew."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, preset: str = "none",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images -> [0, 1], augmented by ``preset``, normalised, channels-last (faster convolutions).

    Float tensors are inputs already made for the model (cached backbone features, say): unchanged.
    """
    if images.dtype != torch.uint8:
        return images
    images = augment(images.float() / 255, preset, generator)
    return normalize(images, mean, std).contiguous(memory_format=torch.channels_last)


class TrainBatches:
    """One epoch of shuffled, augmented, normalised training batches per iteration.

    The augmentation lives here and only here, so evaluation batches (``EvalBatches``) cannot be
    augmented by mistake. Chunks of many batches are augmented at once to amortise per-call costs.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, preset: str,
                 mean: torch.Tensor, std: torch.Tensor, seed: int, epoch: Callable[[], int],
                 rank: int = 0, world_size: int = 1):
        self.images, self.labels = images, labels
        self.batch_size, self.preset = batch_size, preset
        self.mean, self.std = mean.to(images.device), std.to(images.device)
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.chunk = batch_size * max(1, 2048 // batch_size)

    def __len__(self) -> int:
        return math.ceil(len(range(self.rank, len(self.images), self.world_size)) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        generator = torch.Generator(device=device).manual_seed(epoch_seed(self.seed, self.epoch()))
        order = torch.randperm(len(self.images), generator=generator, device=device)[self.rank::self.world_size]
        for start in range(0, len(order), self.chunk):
            index = order[start:start + self.chunk]
            images = model_input(self.images[index], self.mean, self.std, self.preset, generator)
            labels = self.labels[index]
            for offset in range(0, len(index), self.batch_size):
                yield images[offset:offset + self.batch_size], labels[offset:offset + self.batch_size]


class EvalBatches:
    """Normalised, never augmented, in a fixed order; optionally every ``world_size``-th image from ``rank``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mean: torch.Tensor, std: torch.Tensor, rank: int = 0, world_size: int = 1):
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.batch_size = batch_size
        self.mean, self.std = mean.to(images.device), std.to(images.device)

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            yield model_input(self.images[start:start + self.batch_size], self.mean, self.std), self.labels[start:start + self.batch_size]


# --------------------------------------------------------------------------------------------
# Initialisation and accuracy
# --------------------------------------------------------------------------------------------
def initialize_using_norm_kaiming(module: nn.Module) -> None:
    """Kaiming-normal weights (fan-in, ReLU gain) and zero biases for conv and linear layers; use with ``model.apply``."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@torch.no_grad()
def get_accuracy(model: nn.Module, batches: Iterable) -> float:
    """Fraction of correctly classified images over ``(images, labels)`` batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for images, labels in batches:
        predictions = model(images.to(device)).argmax(1)
        correct += (predictions == labels.to(device)).sum().item()
        total += labels.numel()
    model.train(was_training)
    return correct / total
