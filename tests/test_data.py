"""Data: loading in every layout, the README's split, statistics, augmentation presets."""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import engine
import engine.batches
import engine.classifier
import engine.data as data_module
import engine.official as official
import functions as fn
from benchmarks.accuracy import get_accuracy


def test_split_is_the_readmes_random_split():
    train, val = data_module.split_train_val(50_000)
    reference_train, reference_val = torch.utils.data.random_split(
        range(50_000), [45_000, 5_000], generator=torch.Generator().manual_seed(20)
    )
    assert train.tolist() == list(reference_train.indices)
    assert val.tolist() == list(reference_val.indices)
    assert len(set(train.tolist()) | set(val.tolist())) == 50_000


def test_mean_std_per_channel_is_exact_on_a_known_array():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 3, 5, 4), dtype=np.uint8)
    mean, std = fn.mean_std_per_channel(torch.from_numpy(images))
    pixels = images.transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    np.testing.assert_allclose(mean.numpy(), pixels.mean(1), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), pixels.std(1), rtol=1e-5)


def test_split_normalises_every_split_with_training_statistics(arrays):
    data = engine.SplitData.from_arrays(arrays)
    mean, std = fn.mean_std_per_channel(data.train_images)
    torch.testing.assert_close(data.mean, mean)
    torch.testing.assert_close(data.std, std)
    batches = engine.batches.EvalBatches(data.val_images, data.val_labels, 1000, data.mean, data.std)
    images, _ = next(iter(batches))
    expected = (data.val_images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(images, expected)


def test_image_folder_loads_and_caches(image_folder, arrays, monkeypatch):
    first = data_module.load_dataset(image_folder.parent)  # found one folder down
    assert torch.equal(first.train_images, arrays.train_images[torch.argsort(arrays.train_labels, stable=True)])
    assert first.classes == fn.CLASSES
    assert (image_folder / data_module.CACHE_NAME).is_file()

    monkeypatch.setattr(data_module, "decode_images", lambda *a: pytest.fail("the cache should have been used"))
    second = data_module.load_dataset(image_folder)
    assert "cache" in second.source and torch.equal(second.test_images, first.test_images)


def test_changed_tree_rebuilds_the_cache(image_folder):
    data_module.load_dataset(image_folder)
    victim = next((image_folder / "train" / "cat").iterdir())
    victim.unlink()
    reloaded = data_module.load_dataset(image_folder)
    assert len(reloaded.train_images) == 299


def test_read_only_tree_caches_elsewhere(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    original = engine.files.write_atomically

    def refuse_beside_tree(path, write):
        if path.parent == image_folder:
            raise PermissionError("read-only")
        original(path, write)

    monkeypatch.setattr(data_module, "write_atomically", refuse_beside_tree)
    data = data_module.load_dataset(image_folder)
    assert str(tmp_path / "user-cache") in data.source
    assert not (image_folder / data_module.CACHE_NAME).exists()


def test_python_batches_load_after_checksum(python_batches, arrays):
    root, checksums = python_batches
    data = data_module.load_dataset(root, checksums=checksums)
    assert torch.equal(data.train_images, arrays.train_images)
    assert torch.equal(data.test_labels, arrays.test_labels)


def test_tampered_batch_is_refused_before_unpickling(python_batches, monkeypatch):
    root, checksums = python_batches
    batch = root / official.PYTHON_BATCHES_DIR / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-10])
    monkeypatch.setattr(official.pickle, "load", lambda *a, **k: pytest.fail("unpickled an unchecked file"))
    with pytest.raises(engine.UserError, match="data_batch_3 failed its MD5 check"):
        data_module.load_dataset(root, checksums=checksums)


def test_official_checksums_refuse_foreign_batches(python_batches):
    root, _ = python_batches
    with pytest.raises(engine.UserError, match="MD5"):
        data_module.load_dataset(root)


def test_offline_download_failure_is_one_clear_message(tmp_path):
    with pytest.raises(engine.UserError) as error:
        data_module.load_dataset(tmp_path / "empty")
    message = str(error.value)
    assert "download failed" in message and "--data-dir" in message and "\n" not in message
    assert not (tmp_path / "empty").exists()


def sorted_by_label(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The images in the order a tree written by ``write_image_folder`` lists them: by class, then by file name."""
    return images[torch.argsort(labels, stable=True)]


def flip_bytes_inside(path: Path, member: str) -> None:
    """Invert four bytes in the middle of one array's data, well past zip's and numpy's headers."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    middle = info.header_offset + 30 + name_length + extra_length + info.compress_size // 2
    raw[middle : middle + 4] = bytes(byte ^ 0xFF for byte in raw[middle : middle + 4])
    path.write_bytes(raw)


CACHE_DAMAGE = {
    "truncated": lambda cache: cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2]),
    "zero bytes": lambda cache: cache.write_bytes(b""),
    "a flipped bit in the training images": lambda cache: flip_bytes_inside(cache, "train_images.npy"),
    "a flipped bit in the test images": lambda cache: flip_bytes_inside(cache, "test_images.npy"),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_damaged_cache_is_rebuilt_with_one_note(image_folder, damage, capsys, monkeypatch):
    fresh = data_module.load_dataset(image_folder)
    cache = image_folder / data_module.CACHE_NAME
    CACHE_DAMAGE[damage](cache)
    capsys.readouterr()

    rebuilt = data_module.load_dataset(image_folder)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: the decoded-image cache {cache} is unreadable (")
    assert notes[0].endswith("); rebuilding it")
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(rebuilt, name), getattr(fresh, name))
    assert rebuilt.classes == fresh.classes

    monkeypatch.setattr(data_module, "decode_images", lambda *a: pytest.fail("the rebuilt cache should have been used"))
    again = data_module.load_dataset(image_folder)
    assert "decoded cache" in again.source and torch.equal(again.train_images, fresh.train_images)
    assert capsys.readouterr().err == ""


def test_stale_temporary_cache_files_are_removed_and_fresh_ones_kept(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    hour_ago = time.time() - 3600
    left = {}
    for cache in data_module.cache_candidates(image_folder):  # beside the tree and in the user cache folder
        cache.parent.mkdir(parents=True, exist_ok=True)
        for age in ("old", "fresh"):
            # named as write_atomically names them
            handle, name = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=cache.suffix)
            os.close(handle)
            left[name] = age
            if age == "old":
                os.utime(name, (hour_ago, hour_ago))
    # another file's temporary copy: not the loader's business
    handle, other = tempfile.mkstemp(dir=image_folder, prefix=".notes.txt.", suffix=".txt")
    os.close(handle)
    os.utime(other, (hour_ago, hour_ago))

    data_module.load_dataset(image_folder)
    assert {name: Path(name).exists() for name in left} == {name: age == "fresh" for name, age in left.items()}
    assert Path(other).exists()


def test_hidden_folders_and_files_are_ignored(image_folder, arrays):
    for hidden in (
        image_folder.parent / ".ipynb_checkpoints",
        image_folder / "train" / ".ipynb_checkpoints",
        image_folder / "test" / ".ipynb_checkpoints",
        image_folder / "train" / "cat" / ".ipynb_checkpoints",
    ):
        hidden.mkdir()
        (hidden / "0000-checkpoint.png").write_bytes(b"not an image")
    (image_folder / "train" / "cat" / "._0003.png").write_bytes(b"macOS resource fork")  # an image suffix, but hidden
    (image_folder / "test" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")

    data = data_module.load_dataset(image_folder.parent)
    assert data.classes == fn.CLASSES
    assert torch.equal(data.train_images, sorted_by_label(arrays.train_images, arrays.train_labels))
    assert torch.equal(data.test_labels, arrays.test_labels.sort(stable=True).values)


def test_cifar10_classes_keep_their_labels_in_any_listing_order(image_folder, arrays, monkeypatch):
    listed = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda folder: reversed(list(listed(folder))))
    data = data_module.load_dataset(image_folder)
    assert data.classes == fn.CLASSES
    assert torch.equal(data.train_images, sorted_by_label(arrays.train_images, arrays.train_labels))
    assert torch.equal(data.train_labels, arrays.train_labels.sort(stable=True).values)


def refused(data_dir: Path, monkeypatch) -> str:
    """The one-line UserError loading ``data_dir`` gives, raised before any image is decoded."""
    monkeypatch.setattr(data_module, "decode_images", lambda *a: pytest.fail("decoded images before refusing the tree"))
    with pytest.raises(engine.UserError) as error:
        data_module.load_dataset(data_dir)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_class_missing_from_test_is_refused_before_training(image_folder, monkeypatch):
    shutil.rmtree(image_folder / "test" / "truck")
    assert "test/ lacks the class folder 'truck' that train/ has" in refused(image_folder, monkeypatch)


def test_train_and_test_differences_are_named_both_ways(image_folder, monkeypatch):
    (image_folder / "test" / "truck").rename(image_folder / "test" / "lorry")
    message = refused(image_folder, monkeypatch)
    assert "test/ lacks the class folder 'truck' that train/ has" in message
    assert "train/ lacks the class folder 'lorry' that test/ has" in message


def test_a_tree_of_one_class_is_refused_and_any_other_count_loads(image_folder, monkeypatch):
    for split in ("train", "test"):
        shutil.copytree(image_folder / split / "cat", image_folder / split / "zebra")
    assert len(data_module.load_dataset(image_folder).classes) == 11  # the classes come from the folders
    for split in ("train", "test"):
        for folder in (image_folder / split).iterdir():
            if folder.name != "cat":
                shutil.rmtree(folder)
    message = refused(image_folder, monkeypatch)
    assert "1 class folder ('cat')" in message and "needs at least 2" in message


def test_empty_class_folder_is_refused(image_folder, monkeypatch):
    for image in (image_folder / "train" / "frog").iterdir():
        image.unlink()
    assert f"{image_folder / 'train' / 'frog'} holds no images" in refused(image_folder, monkeypatch)


def test_tree_without_test_folder_says_so_instead_of_downloading(image_folder, monkeypatch):
    shutil.rmtree(image_folder / "test")
    message = refused(image_folder.parent, monkeypatch)
    assert f"{image_folder} has train/ but no test/ folder" in message and "download" not in message


def test_zero_byte_image_is_refused_while_listing(image_folder, monkeypatch):
    victim = sorted((image_folder / "test" / "dog").iterdir())[2]
    victim.write_bytes(b"")
    assert f"{victim} is empty (0 bytes)" in refused(image_folder, monkeypatch)


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("not an image", "not an image Pillow can decode"),
        ("truncated", "truncated"),
        ("unreadable", "Permission denied"),
    ],
)
def test_bad_image_file_is_one_line_naming_it(image_folder, monkeypatch, fault, reason):
    import PIL.Image

    victim = sorted((image_folder / "test" / "dog").iterdir())[2]
    if fault == "not an image":
        victim.write_bytes(b"<html>404 not found</html>")
    elif fault == "truncated":
        victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    else:  # the tests may run as root, whom file permissions do not stop: refuse the file as the OS would
        opened = PIL.Image.open

        def open_all_but_victim(fp, *args, **kwargs):
            if Path(fp) == victim:
                raise PermissionError(13, "Permission denied", str(fp))
            return opened(fp, *args, **kwargs)

        monkeypatch.setattr(PIL.Image, "open", open_all_but_victim)
    with pytest.raises(engine.UserError) as error:
        data_module.load_dataset(image_folder)
    message = str(error.value)
    assert message.startswith(f"{victim} ") and reason in message and "\n" not in message


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------
def params(n: int, preset: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return fn.AUGMENTATIONS[preset].sample(n, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_readme_parameters_have_torchvisions_ranges():
    p = params(20_000, "study")
    assert abs(p["hflip"].float().mean() - 0.5) < 0.02 and abs(p["vflip"].float().mean() - 0.5) < 0.02
    assert p["degrees"].min() >= -90 and p["degrees"].max() <= 90 and p["degrees"].std() > 45
    for key in ("brightness", "contrast", "saturation"):
        assert p[key].min() >= 0.5 and p[key].max() <= 1.5
    assert p["hue"].min() >= -0.5 and p["hue"].max() <= 0.5
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(20_000, 4))
    assert len({tuple(row) for row in p["order"].tolist()}) == 24  # every order of the four jitters occurs


def test_readme_augmentation_equals_torchvision_image_by_image():
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    p = params(16, "study")
    ours = fn.apply_study(images, p)
    jitters = (
        lambda x, i: TF.adjust_brightness(x, float(p["brightness"][i])),
        lambda x, i: TF.adjust_contrast(x, float(p["contrast"][i])),
        lambda x, i: TF.adjust_saturation(x, float(p["saturation"][i])),
        lambda x, i: TF.adjust_hue(x, float(p["hue"][i])),
    )
    for i in range(16):
        x = images[i]
        x = TF.horizontal_flip(x) if p["hflip"][i] else x
        x = TF.vertical_flip(x) if p["vflip"][i] else x
        x = TF.rotate(x, float(p["degrees"][i]))
        for op in p["order"][i].tolist():
            x = jitters[op](x, i)
        torch.testing.assert_close(ours[i], x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset, pad, mode", [("standard", 4, "constant"), ("light", 2, "reflect")])
def test_crop_and_flip(preset, pad, mode):
    images = torch.rand(64, 3, 32, 32)
    p = params(64, preset)
    ours = fn.AUGMENTATIONS[preset].apply(images, p)
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode=mode)
    for i in range(64):
        dy, dx = int(p["dy"][i]), int(p["dx"][i])
        crop = padded[i, :, dy : dy + 32, dx : dx + 32]
        torch.testing.assert_close(ours[i], crop.flip(2) if p["hflip"][i] else crop)
    big = params(20_000, preset)
    assert big["dy"].min() == 0 and big["dy"].max() == 2 * pad and abs(big["hflip"].float().mean() - 0.5) < 0.02


def test_each_image_draws_its_own_parameters():
    images = torch.full((8, 3, 32, 32), 0.5)
    images[:, 0, :16] = 0.9  # asymmetric, so every flip and rotation shows
    out = fn.augment(images, "study", torch.Generator().manual_seed(3))
    assert len({tuple(o.flatten()[:200].tolist()) for o in out}) == 8


def test_training_batches_are_augmented_and_evaluation_batches_never(split):
    datamodule = engine.classifier.CIFAR10DataModule(split, batch_size=32, augment="study", seed=0)

    class FakeTrainer:
        global_rank, world_size, current_epoch = 0, 1, 0

    datamodule.trainer = FakeTrainer()
    plain = fn.normalize(split.train_images.float() / 255, split.mean, split.std)
    train_images, train_labels = next(iter(datamodule.train_dataloader()))
    originals = [plain[(split.train_labels == label).nonzero().squeeze(1)] for label in train_labels[:8]]
    assert not any(
        torch.allclose(image, candidate)
        for image, pool in zip(train_images[:8], originals, strict=True)
        for candidate in pool
    )
    for batches, source in zip(datamodule.val_dataloader(), (split.train_images, split.val_images), strict=True):
        images, _ = next(iter(batches))
        torch.testing.assert_close(images, fn.normalize(source[: len(images)].float() / 255, split.mean, split.std))


def test_epochs_shuffle_differently_and_repeat_per_seed(split):
    def first_labels(seed, epoch):
        batches = engine.batches.TrainBatches(
            split.train_images, split.train_labels, 32, "none", split.mean, split.std, seed, lambda: epoch
        )
        return next(iter(batches))[1]

    assert torch.equal(first_labels(0, 1), first_labels(0, 1))
    assert not torch.equal(first_labels(0, 1), first_labels(0, 2))
    assert not torch.equal(first_labels(0, 1), first_labels(1, 1))


def test_a_last_epoch_in_part_is_the_first_batches_of_the_whole_epoch(split):
    """--epochs 2.5 on 270 images in batches of 32: epochs of 9, 9 and 5 batches (23 steps, the run's rounded up),
    the third's drawn as the whole third epoch would draw them."""

    def batches(epochs, epoch):
        return engine.batches.TrainBatches(
            split.train_images, split.train_labels, 32, "study", split.mean, split.std, 0, lambda: epoch, epochs=epochs
        )

    assert [len(batches(2.5, epoch)) for epoch in range(4)] == [9, 9, 5, 0]
    part, whole = list(batches(2.5, 2)), list(batches(None, 2))
    assert len(part) == 5 and len(whole) == 9
    for (images, labels), (whole_images, whole_labels) in zip(part, whole[:5], strict=True):
        assert torch.equal(images, whole_images) and torch.equal(labels, whole_labels)


def test_kaiming_normal_initialisation():
    layer = torch.nn.Linear(4000, 500)
    layer.bias.data.fill_(3.0)
    fn.initialize_using_norm_kaiming(layer)
    assert math.isclose(layer.weight.std().item(), math.sqrt(2 / 4000), rel_tol=0.02)
    assert abs(layer.weight.mean().item()) < 1e-3 and torch.count_nonzero(layer.bias) == 0
    conv = torch.nn.Conv2d(64, 128, 3)
    fn.initialize_using_norm_kaiming(conv)
    assert math.isclose(conv.weight.std().item(), math.sqrt(2 / (64 * 9)), rel_tol=0.02)


def test_get_accuracy():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 10).float()

    predictions = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    labels = torch.tensor([1, 2, 3, 0, 0, 6, 0, 8])
    batches = [(predictions[:5].view(-1, 1).float(), labels[:5]), (predictions[5:].view(-1, 1).float(), labels[5:])]
    assert get_accuracy(Fixed(), batches) == 5 / 8
