"""The official python archives of CIFAR-10 and CIFAR-100: each file MD5-checked against torchvision's own table before
it is unpickled (a pickle is never opened unchecked), and torchvision's download of them where there is internet."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from functions import CLASSES


@dataclass
class DatasetArrays:
    """The whole data set decoded into memory: uint8 images N x 3 x 32 x 32, int64 labels, the class names in label
    order.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str


# torchvision.datasets.CIFAR10's and CIFAR100's own tables: the official files and their MD5 sums.
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
CIFAR100_DIR = "cifar-100-python"
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(folder: Path, checksums: dict[str, str], name: str) -> None:
    """Every file of the table present with its MD5; one line naming the first that is not."""
    for file, expected in checksums.items():
        path = folder / file
        if not path.is_file():
            raise UserError(f"{path} is missing; the folder {folder} is incomplete: download {name} again")
        if md5sum(path) != expected:
            raise UserError(
                f"{path} failed its MD5 check (truncated or altered); delete {folder} and download {name} again"
            )


def unpickled(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")  # safe: check_files matched its checksum first


def images_of(batch: dict) -> np.ndarray:
    return np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)


def load_python_batches(folder: Path, checksums: dict[str, str] = OFFICIAL_MD5) -> DatasetArrays:
    """Read the official ``cifar-10-batches-py`` files."""
    check_files(folder, checksums, "CIFAR-10")
    train = [unpickled(folder / name) for name in TRAIN_BATCHES]
    test = unpickled(folder / "test_batch")
    return DatasetArrays(
        train_images=torch.from_numpy(np.concatenate([images_of(batch) for batch in train])),
        train_labels=torch.from_numpy(np.concatenate([np.asarray(batch["labels"]) for batch in train])).long(),
        test_images=torch.from_numpy(images_of(test)),
        test_labels=torch.tensor(test["labels"]).long(),
        classes=CLASSES,
        source=f"official python batches in {folder}",
    )


def load_cifar100(folder: Path, checksums: dict[str, str] = CIFAR100_MD5) -> DatasetArrays:
    """Read the official ``cifar-100-python`` files, with the 100 fine labels (the coarse 20 are not offered)."""
    check_files(folder, checksums, "CIFAR-100")
    train, test = unpickled(folder / "train"), unpickled(folder / "test")
    return DatasetArrays(
        train_images=torch.from_numpy(images_of(train)),
        train_labels=torch.tensor(train["fine_labels"]).long(),
        test_images=torch.from_numpy(images_of(test)),
        test_labels=torch.tensor(test["fine_labels"]).long(),
        classes=tuple(unpickled(folder / "meta")["fine_label_names"]),
        source=f"official CIFAR-100 python files in {folder} (fine labels)",
    )


# Each named data set: its official folder, how to read it, and torchvision's class that downloads it.
@dataclass(frozen=True)
class Official:
    title: str
    folder: str
    load: object
    torchvision_class: str


OFFICIAL = {
    "cifar10": Official("CIFAR-10", PYTHON_BATCHES_DIR, load_python_batches, "CIFAR10"),
    "cifar100": Official("CIFAR-100", CIFAR100_DIR, load_cifar100, "CIFAR100"),
}
