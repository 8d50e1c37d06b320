"""Small synthetic CIFAR-10 look-alikes: learnable, written in both on-disk layouts, no network."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
import engine.data as data_module
import engine.official as official
import functions as fn


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: its own colour and a stripe at row 3k, plus noise. A small CNN learns it in a few epochs."""
    # one palette for every split
    palette = torch.rand(10, 3, generator=torch.Generator().manual_seed(1234)) * 0.6 + 0.2
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = palette[labels].view(n, 3, 1, 1).expand(n, 3, 32, 32).clone()
    for k in range(10):
        images[labels == k, :, 3 * k : 3 * k + 2, :] = 1.0
    images += 0.35 * torch.randn(images.shape, generator=generator)
    order = torch.randperm(n, generator=generator)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)[order], labels[order]


def synthetic_arrays(n_train: int = 300, n_test: int = 100, seed: int = 0) -> data_module.DatasetArrays:
    train_images, train_labels = synthetic_images(n_train, seed)
    test_images, test_labels = synthetic_images(n_test, seed + 1)
    return data_module.DatasetArrays(train_images, train_labels, test_images, test_labels, fn.CLASSES, "synthetic")


@pytest.fixture
def arrays() -> data_module.DatasetArrays:
    return synthetic_arrays()


@pytest.fixture
def split(arrays) -> engine.SplitData:
    return engine.SplitData.from_arrays(arrays)


def to_pil(image: torch.Tensor):
    """A uint8 3 x H x W tensor as a Pillow image."""
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(image) -> torch.Tensor:
    """A Pillow image as the uint8 3 x H x W RGB tensor a model sees."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def png_header_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, followed by a few bytes of pixel data: refusing it
    names its size only if nothing was decoded (decoding would find it truncated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits per channel, RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)))
    return path


def write_image_folder(root: Path, data: data_module.DatasetArrays) -> Path:
    from PIL import Image

    for split_name, images, labels in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split_name / data.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:04d}.png")
    return root


def write_python_batches(root: Path, data: data_module.DatasetArrays) -> dict[str, str]:
    """The official layout (five training batches and a test batch); returns their MD5 table."""
    folder = root / official.PYTHON_BATCHES_DIR
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(data.train_images)), 5)
    batches = {
        name: (data.train_images[idx], data.train_labels[idx])
        for name, idx in zip(official.TRAIN_BATCHES, chunks, strict=True)
    }
    batches["test_batch"] = (data.test_images, data.test_labels)
    for name, (images, labels) in batches.items():
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": images.reshape(len(images), -1).numpy(), "labels": labels.tolist()}, handle)
    return {name: official.md5sum(folder / name) for name in batches}


@pytest.fixture
def image_folder(tmp_path, arrays) -> Path:
    return write_image_folder(tmp_path / "jpeg-copy", arrays)


@pytest.fixture
def python_batches(tmp_path, arrays) -> tuple[Path, dict[str, str]]:
    return tmp_path, write_python_batches(tmp_path, arrays)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never download: a download attempt fails as it does offline."""
    import urllib.error

    def offline(data_dir, dataset):
        Path(data_dir).mkdir(parents=True, exist_ok=True)  # as torchvision does before it downloads
        raise urllib.error.URLError("network is unreachable (tests run offline)")

    monkeypatch.setattr(data_module, "download_official", offline)


# Small enough that a tuning trial takes a second or two: 90 training images
TRIAL_SIZED = dict(n_train=100, n_test=20)


@pytest.fixture
def trial_sized_data(monkeypatch):
    """Every split a script loads is TRIAL_SIZED synthetic data."""
    data = engine.SplitData.from_arrays(synthetic_arrays(**TRIAL_SIZED))
    monkeypatch.setattr(engine, "load_split", lambda config: data)


@pytest.fixture
def no_figures(monkeypatch):
    """Optuna's figures take seconds to draw; only the tests of the figures need them."""
    monkeypatch.setattr("tuning.outputs.write_figures", lambda study, out_dir: [])


def quick_config(tmp_path: Path, model: str = "CIFAR10Net", **recipe) -> engine.RunConfig:
    """A run that finishes in seconds on the synthetic data."""
    base = dict(epochs=2, batch_size=32, augment="none")
    base.update(recipe)
    return engine.RunConfig(
        model=model,
        recipe=replace(engine.Recipe(), **base),
        out_dir=str(tmp_path / "run"),
        progress=False,
        analyses={"tsne": False},
        device="cpu",
    )


def run_script(monkeypatch, main, name: str, *argv: str) -> int:
    """Run a script's ``main`` through engine.run_cli as its command line would, with ``argv``; its exit status."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        engine.run_cli(main)
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def disk_full_when(full: Callable[[Path], bool]) -> Callable[[Path, Callable[[Path], None]], None]:
    """A ``write_atomically`` that fails as a full disk does (ENOSPC) for the paths ``full`` picks, and writes the
    others.
    """
    real_write = engine.files.write_atomically

    def write(path: Path, writer: Callable[[Path], None]) -> None:
        if full(Path(path)):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, writer)

    return write


def run_command(script, monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """A script's command line in this process: exit status, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *map(str, argv)])
    capsys.readouterr()  # what came before is not this command's
    try:
        engine.run_cli(script.main)
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stopped_after_epoch_one(script, monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """A script's command line stopped by SIGTERM right after its first checkpoint, as a scheduler would stop it:
    exit status, stdout, stderr."""
    real_save = engine.callbacks.AtomicCheckpointIO.save_checkpoint

    def save_then_stop(io, checkpoint, path, storage_options=None):
        real_save(io, checkpoint, path, storage_options)
        if Path(path).name == "last.ckpt" and checkpoint["epoch"] == 0:
            raise engine.RunInterrupted(signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(engine.callbacks.AtomicCheckpointIO, "save_checkpoint", save_then_stop)
        return run_command(script, monkeypatch, capsys, *argv)


def transfer_net(
    finetune: str = "fc", image_size: int = 32, weights: str = "none", arch: str = "resnet18", seed: int = 0
):
    """The TransferNet a seed-``seed`` run starts from: built from its options, then initialised under the seed, as
    engine.fit does.
    """
    spec = engine.model_spec("TransferNet")
    net = spec.build({"arch": arch, "weights": weights, "image_size": image_size, "finetune": finetune})
    torch.manual_seed(seed)
    spec.initialize(net, None, spec.recipe)
    return net


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_nodes(command: list[str], cwd: Path) -> list[subprocess.Popen]:
    """Node 0 and node 1 of one run, started as a cluster starts them (MASTER_ADDR, MASTER_PORT, NODE_RANK)."""
    port = free_port()
    return [
        subprocess.Popen(
            command,
            env=dict(
                os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank), OMP_NUM_THREADS="1"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        for rank in (0, 1)
    ]
