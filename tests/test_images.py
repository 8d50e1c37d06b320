"""Decoding image files: engine.decode_image, the one decoding of image-folder trees and predict.py, for every mode and
size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import engine.data as data_module
import engine.images as images_module
import predict
from conftest import from_pil, png_header_claiming, to_pil, write_image_folder


def decoded(path: Path, size: int | None = 32) -> torch.Tensor:
    """What the toolkit sees of the file: uint8 RGB, 3 x H x W."""
    return torch.from_numpy(engine.decode_image(path, size)).permute(2, 0, 1)


def test_an_image_enlarged_by_nearest_neighbour_is_downsized_back_to_its_own_pixels(tmp_path, arrays):
    image = arrays.test_images[5]
    for factor in (2, 3, 7):
        path = tmp_path / f"x{factor}.png"
        to_pil(image).resize((32 * factor, 32 * factor), Image.Resampling.NEAREST).save(path)
        assert torch.equal(decoded(path), image), factor


def test_grayscale_16_bit_and_transparent_images_become_rgb_the_way_they_look(tmp_path, arrays):
    gray = to_pil(arrays.test_images[0]).convert("L")
    gray.save(tmp_path / "gray.png")
    assert torch.equal(decoded(tmp_path / "gray.png"), from_pil(gray))  # the gray value in every channel
    deep = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # the same picture in 16 bits
    deep.save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    assert torch.equal(decoded(tmp_path / "gray16.png"), from_pil(gray))
    rgba = to_pil(arrays.test_images[1]).convert("RGBA")
    alpha = Image.new("L", (32, 32), 255)
    alpha.paste(0, (0, 0, 16, 32))  # the left half transparent
    rgba.putalpha(alpha)
    rgba.save(tmp_path / "half-transparent.png")
    seen = decoded(tmp_path / "half-transparent.png")
    assert torch.all(seen[:, :, :16] == 255) and torch.equal(seen[:, :, 16:], arrays.test_images[1][:, :, 16:])


def test_a_16_bit_png_in_a_training_tree_is_decoded_as_predict_decodes_it(tmp_path, arrays):
    """Scaled by its depth (value / 65535 * 255) in both, not clipped at 255 (which turned it white in the tree)."""
    root = write_image_folder(tmp_path / "tree", arrays)
    path = sorted((root / "train" / "cat").iterdir())[0]
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)  # 1000 among them: 4, not 255
    Image.fromarray(values).save(path)
    expected = torch.from_numpy(np.rint(values / 65535 * 255).astype(np.uint8)).expand(3, 32, 32)

    loaded = data_module.load_dataset(root)
    position = [file.path for file in data_module.list_image_files(root / "train", loaded.classes)].index(path)
    read, images, unreadable = predict.read_images([path], 32)
    assert torch.equal(loaded.train_images[position], expected) and (read, unreadable) == ([path], [])
    assert torch.equal(images[0], expected) and expected.float().mean() < 200


def test_a_float_tiff_is_scaled_from_0_1_or_else_stretched_from_its_range_with_a_note(tmp_path, capsys):
    light = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(light).save(tmp_path / "light.tiff")
    assert Image.open(tmp_path / "light.tiff").mode == "F"
    assert torch.equal(decoded(tmp_path / "light.tiff")[0], torch.from_numpy(np.rint(light * 255).astype(np.uint8)))
    assert capsys.readouterr().err == ""
    Image.fromarray(light * 4 - 1).save(tmp_path / "other-units.tiff")  # -1..3: no scale to go by
    assert torch.equal(
        decoded(tmp_path / "other-units.tiff")[0], torch.from_numpy(np.rint(light * 255).astype(np.uint8))
    )
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: {tmp_path / 'other-units.tiff'} holds values from -1 to 3")
    Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32)).save(tmp_path / "nan.tiff")
    with pytest.raises(engine.UnreadableImage, match="not numbers"):
        decoded(tmp_path / "nan.tiff")


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_alone(tmp_path, monkeypatch):
    huge = png_header_claiming(tmp_path / "huge.png", 11_000, 11_000)  # 121 million pixels: Pillow only warns
    with pytest.raises(engine.UnreadableImage) as refused:
        decoded(huge)
    assert str(refused.value) == (
        f"{huge} is 11000x11000 pixels, more than the {engine.images.MAX_DECODED_PIXELS:,} the toolkit decodes "
        f"(its bound on memory); shrink it first"
    )
    # A smaller limit, for real images: a PNG is decoded whole, so it is refused; a JPEG being resized is decoded at 1/8
    # scale.
    monkeypatch.setattr(images_module, "MAX_DECODED_PIXELS", 64 * 64)
    big = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(big).save(tmp_path / "big.jpg")
    with pytest.raises(engine.UnreadableImage, match="is 256x256 pixels, more than the 4,096"):
        decoded(tmp_path / "big.png")
    assert decoded(tmp_path / "big.jpg").shape == (3, 32, 32)
    with pytest.raises(engine.UnreadableImage, match="is 256x256 pixels"):
        decoded(tmp_path / "big.jpg", size=None)  # at full size, as a training tree reads it


def test_a_cache_of_another_decoding_is_rebuilt(image_folder, monkeypatch):
    data_module.load_dataset(image_folder)
    decodings = []
    monkeypatch.setattr(
        data_module,
        "decode_image",
        lambda path, size=None: decodings.append(path) or images_module.decode_image(path, size),
    )
    data_module.load_dataset(image_folder)
    assert decodings == []  # the cache served
    monkeypatch.setattr(data_module, "DECODING_VERSION", "a later one")
    data_module.load_dataset(image_folder)
    assert len(decodings) == 400  # every image decoded again, by the decoding of now
