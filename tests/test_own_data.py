"""Beyond CIFAR-10: image-folder trees of any classes and image size, and CIFAR-100's official files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import engine.data
import engine.official as official
import evaluate
import main
import predict
import tsne
from analyses import embedding as tsne_embedding
from conftest import run_command

WIDTH, HEIGHT = 48, 40  # not the models' 32x32, nor square: every image is resized once, into the cache


def write_tree(root: Path, num_classes: int, train_per_class: int = 24, test_per_class: int = 12) -> tuple[str, ...]:
    """A learnable tree: class k's images have their own colour and a bright band at their own height; returns the class
    names.
    """
    generator = np.random.default_rng(num_classes)
    colours = generator.uniform(40, 215, (num_classes, 3))
    classes = tuple(f"kind_{chr(ord('a') + k % 26)}{k}" for k in range(num_classes))
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.broadcast_to(colours[label], (HEIGHT, WIDTH, 3)) + generator.normal(
                    0, 20, (HEIGHT, WIDTH, 3)
                )
                band = int(label * (HEIGHT - 3) / max(1, num_classes - 1))
                pixels[band : band + 3] = 255
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    return classes


@pytest.mark.parametrize("num_classes", [3, 12])
def test_a_tree_of_other_classes_and_size_trains_evaluates_predicts_and_analyses(
    tmp_path, monkeypatch, capsys, num_classes
):
    classes = write_tree(tmp_path / "data", num_classes)
    run_dir = tmp_path / "run"
    code, out, err = run_command(
        main,
        monkeypatch,
        capsys,
        "--data-dir",
        tmp_path / "data",
        "--epochs",
        "6",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--augment",
        "none",
        "--val-fraction",
        "0.25",
        "--no-tsne",
        "--no-progress",
        "--device",
        "cpu",
        "--logger",
        "none",
        "--out-dir",
        run_dir,
    )
    assert (code, err) == (0, ""), err
    assert f"{num_classes * 18} train / {num_classes * 6} validation / {num_classes * 12} test images" in out
    card = engine.read_json(run_dir / "model.json")
    assert tuple(card["classes"]) == classes
    assert torch.load(run_dir / "model.pth", weights_only=True)["fc3.weight"].shape[0] == num_classes
    report = engine.read_json(run_dir / "test.json")
    assert tuple(report["per_class"]) == classes and len(report["confusion_matrix"]) == num_classes
    assert report["test_accuracy"] > 2 / num_classes  # it learned: chance is 1 / num_classes

    code, out, err = run_command(
        evaluate, monkeypatch, capsys, "--run", run_dir, "--data-dir", tmp_path / "data", "--device", "cpu"
    )
    assert (code, err) == (0, "") and engine.read_json(run_dir / "evaluation-model.json")["confusion_matrix"] == report[
        "confusion_matrix"
    ]
    photo = tmp_path / "data/test" / classes[-1] / "000.png"
    code, out, err = run_command(predict, monkeypatch, capsys, "--run", run_dir, "--device", "cpu", "--top", 2, photo)
    assert (code, err) == (0, "") and f"{photo}: {classes[-1]} " in out
    code, out, err = run_command(
        tsne,
        monkeypatch,
        capsys,
        "--run",
        run_dir,
        "--data-dir",
        tmp_path / "data",
        "--device",
        "cpu",
        "--splits",
        "test",
        "--tsne-method",
        "sklearn",
    )
    assert (code, err) == (0, "")
    embedding = tsne_embedding.load_embedding(run_dir / "tsne_test.npz")
    # more than t-SNE's perplexity of 30
    assert embedding.classes == classes and len(embedding.points) == num_classes * 12


def test_the_validation_fraction_keeps_the_studys_split_and_moves_with_the_flag():
    train, val = engine.data.split_train_val(50_000, 0.1)
    study = torch.utils.data.random_split(range(50_000), [45_000, 5_000], generator=torch.Generator().manual_seed(20))
    assert train.tolist() == study[0].indices and val.tolist() == study[1].indices
    assert [len(part) for part in engine.data.split_train_val(200, 0.25)] == [150, 50]
    with pytest.raises(engine.UserError, match="leaves no training image"):
        engine.data.split_train_val(1, 0.5)


def write_cifar100(root: Path, per_split: tuple[int, int] = (200, 100)) -> dict[str, str]:
    """cifar-100-python as the official archive lays it out (train, test, meta pickles); returns its MD5 table."""
    folder = root / official.CIFAR100_DIR
    folder.mkdir(parents=True)
    generator = np.random.default_rng(100)
    for name, count in zip(("train", "test"), per_split, strict=True):
        fine = np.arange(count) % 100
        batch = {
            "data": generator.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(
        pickle.dumps(
            {
                "fine_label_names": [f"fine{k:02d}" for k in range(100)],
                "coarse_label_names": [f"coarse{k:02d}" for k in range(20)],
            }
        )
    )
    return {name: official.md5sum(folder / name) for name in ("train", "test", "meta")}


def test_cifar100s_official_files_load_with_100_classes_and_a_tampered_one_is_refused(tmp_path, monkeypatch):
    checksums = write_cifar100(tmp_path)
    data = engine.load_dataset(tmp_path, dataset="auto", checksums=checksums)
    assert (
        len(data.classes) == 100 and data.classes[7] == "fine07" and tuple(data.train_images.shape) == (200, 3, 32, 32)
    )
    assert data.train_labels.tolist()[:3] == [0, 1, 2] and int(data.test_labels.max()) == 99
    (tmp_path / official.CIFAR100_DIR / "test").write_bytes(b"tampered")
    monkeypatch.setattr(official.pickle, "load", lambda *a, **k: pytest.fail("unpickled an unchecked file"))
    with pytest.raises(engine.UserError, match="failed its MD5 check"):
        engine.load_dataset(tmp_path, dataset="cifar100", checksums=checksums)


def test_cifar100_offline_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    code, out, err = run_command(
        main,
        monkeypatch,
        capsys,
        "--dataset",
        "cifar100",
        "--data-dir",
        tmp_path / "none",
        "--out-dir",
        tmp_path / "run",
    )
    assert code == 2 and err.count("\n") == 1 and "no CIFAR-100 under" in err and "'cifar-100-python'" in err
