"""Decoding an image file into RGB pixels: the one way the toolkit reads an image, for image-folder trees and photos to
classify alike.

``decode_image(path, size)`` opens whatever Pillow reads, turns it upright as its EXIF data says, converts every mode
to 8-bit RGB the same way (16-bit images scaled by their depth, floating-point ones from 0..1, transparent parts laid
on white) and, given ``size``, resizes it to ``size`` x ``size`` by area averaging. A file it cannot use raises
``UnreadableImage``: one line naming the file, the problem and the fix. What is no file of data at all (a FIFO, a
device, a dangling link, a link loop) is refused from its directory entry, before anything opens it: opening a FIFO
waits for a writer, forever.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import UserError

# The most pixels decoded at full resolution: the bound on the memory one image takes. Decoding and converting holds
# up to 16 bytes per pixel at the peak (measured: an RGBA PNG with transparency and a float TIFF; the decoded image,
# its RGBA copy, a white canvas, the RGB result), so 2**25 pixels (33,554,432) stay under about 512 MB. That takes an
# 8K frame (7680x4320) and any camera's JPEG: a JPEG being resized is decoded at 1/2, 1/4 or 1/8 scale first.
MAX_DECODED_PIXELS = 2**25
# Pillow warns when a header claims over 89 million pixels (and refuses twice that). The limit above is what bounds the
# decoding here: such a JPEG is decoded at a reduced scale, anything else is refused with a line of its own; the
# warning would only add a traceback-like line to the output.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Changes whenever decode_image turns some file into other pixels than before, so caches of decoded images are rebuilt.
DECODING_VERSION = "2: 16-bit scaled by its depth, float from 0..1, EXIF orientation"
SIXTEEN_BIT_MAX = 2**16 - 1
WHITE = (255, 255, 255, 255)


class UnreadableImage(UserError):
    """An image file that cannot be used: one line with the file, the problem and the fix. Prediction lists these and
    goes on with the other images; a tree lists every one it holds, then stops the command."""

    def __init__(self, path: Path, problem: str, fix: str):
        super().__init__(f"{path} {problem}; {fix}")
        self.path = Path(path)


# What a directory entry is when it is no regular file: ``stat.S_IFMT`` of its mode, in words.
SPECIAL_FILES = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def file_status(path: Path) -> os.stat_result:
    """``path``'s status (through links), or ``UnreadableImage`` when it is no regular file: a FIFO, a socket, a device
    or a folder; a link to nothing, or a loop of links. It only reads the directory entries, so it never blocks."""
    try:
        status = os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnreadableImage(
                path, "is a symbolic link that leads back to itself (a loop)", "delete it or point it at an image file"
            ) from None
        if error.errno == errno.ENOENT and os.path.islink(path):
            raise UnreadableImage(
                path,
                f"is a symbolic link to {os.readlink(path)}, which does not exist",
                "restore that file or delete the link",
            ) from None
        raise UnreadableImage(
            path, f"cannot be read as an image ({error.strerror or error})", "delete it or copy it again"
        ) from None
    if not stat.S_ISREG(status.st_mode):
        kind = SPECIAL_FILES.get(stat.S_IFMT(status.st_mode), "a special file")
        raise UnreadableImage(path, f"is {kind}, not a file of image data", "replace it with the image file")
    return status


def error_reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can decode"  # Pillow's own message repeats the path
    return getattr(error, "strerror", None) or str(error)  # "Permission denied"; "image file is truncated"


def check_pixel_count(image: Image.Image, path: Path) -> None:
    """Refuse, from the header alone, an image whose decoding would take more than MAX_DECODED_PIXELS pixels."""
    pixels = image.width * image.height
    if pixels > MAX_DECODED_PIXELS:
        raise UnreadableImage(
            path,
            f"is {image.width}x{image.height} pixels, more than the {MAX_DECODED_PIXELS:,} the toolkit "
            f"decodes (its bound on memory)",
            "shrink it first",
        )


def bytes_from(values: np.ndarray, full_scale: float, path: Path) -> np.ndarray:
    """``values`` from 0..``full_scale`` to 0..255. Values outside that range (a float image in other units, a 32-bit
    integer one) carry no scale to go by: stretched from their own lowest to their highest, with a note saying so."""
    if not np.isfinite(values).all():
        raise UnreadableImage(
            path, "holds pixel values that are not numbers (NaN or infinite)", "save it with finite values"
        )
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > full_scale:
        print(
            f"note: {path} holds values from {low:.4g} to {high:.4g}, outside 0..{full_scale:g}: stretched from that "
            "range to 0..255",
            file=sys.stderr,
        )
        values = (values - low) * (full_scale / ((high - low) or 1))
    return np.rint(values * (255 / full_scale)).astype(np.uint8)


def eight_bit(image: Image.Image, path: Path) -> Image.Image:
    """Grayscale of more than 8 bits as 8 bits, scaled by its depth: Pillow's own conversion clips 16-bit values at 255
    (turning most pixels white) and float ones at 1 (turning a 0..1 image black)."""
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit files; Pillow reads some 16-bit PNGs as 32-bit "I"
        return Image.fromarray(bytes_from(np.asarray(image, dtype=np.float32), SIXTEEN_BIT_MAX, path))
    if image.mode == "F":  # 32-bit float, from TIFF: light in 0..1 by convention
        return Image.fromarray(bytes_from(np.asarray(image, dtype=np.float32), 1.0, path))
    return image


def as_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the mode: grayscale repeated in the three channels; transparent parts laid on white (what a viewer
    shows; the colour a transparent pixel stores is arbitrary, often black)."""
    if image.has_transparency_data:
        return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def resized(image: Image.Image, size: int) -> Image.Image:
    """``image`` at ``size`` x ``size``. Downsizing averages the pixels each output pixel covers (Pillow's BOX filter,
    OpenCV's INTER_AREA): every source pixel counts, nothing aliases, and an image enlarged by a whole factor with
    nearest-neighbour comes back exactly. Interpolating filters (bicubic) blur across those blocks; they suit only
    enlarging, which a picture smaller than the model's input needs."""
    if image.size == (size, size):
        return image
    shrinking = image.width >= size and image.height >= size
    return image.resize((size, size), Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)


def decode_image(path: Path, size: int | None = None) -> np.ndarray:
    """The image file at ``path`` as uint8 RGB, height x width x 3, upright; resized to ``size`` x ``size`` when given
    (the whole image squeezed into the square: its aspect ratio is not kept).

    At most MAX_DECODED_PIXELS are decoded: a larger image is refused before its pixels are read. A file that is no
    image, a damaged one or one that cannot be opened raises ``UnreadableImage`` with Pillow's or the system's reason;
    what is no regular file is refused before it is opened (``file_status``).
    """
    file_status(path)
    try:
        with Image.open(path) as image:
            if size is not None:
                # JPEG: decoded at 1/2, 1/4 or 1/8 scale where that still covers the size, 10x faster
                image.draft("RGB", (size, size))
            check_pixel_count(image, path)
            ImageOps.exif_transpose(image, in_place=True)  # upright as the camera said, as every viewer shows it
            rgb = as_rgb(eight_bit(image, path))
            return np.array(rgb if size is None else resized(rgb, size))
    except Image.DecompressionBombError:
        raise UnreadableImage(
            path, f"has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, too many to decode safely", "shrink it first"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow's errors for unreadable, unknown and damaged files (a broken PNG chunk: SyntaxError)
        raise UnreadableImage(
            path, f"cannot be read as an image ({error_reason(error)})", "delete it or copy it again"
        ) from None
