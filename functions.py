"""The study's shared helpers: statistics, normalisation, augmentation, Kaiming initialisation, accuracy.

The bottom layer of the toolkit: plain functions and small classes that import nothing of the project.
Images are uint8 tensors N x 3 x 32 x 32, turned into normalised float batches (``model_input``) and
augmented a whole chunk of batches at a time, every image with its own random parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --------------------------------------------------------------------------------------------
# Statistics and normalisation
# --------------------------------------------------------------------------------------------
def mean_std_per_channel(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and (population) std over every pixel of every image, in [0, 1] units.

    Takes a uint8 or float tensor N x C x H x W. Unlike the original, which averaged per-image standard deviations
    over a DataLoader's batches, this is the standard deviation of the pixel distribution itself.
    """
    values = images.to(torch.float64)
    if images.dtype == torch.uint8:
        values = values / 255.0
    values = values.transpose(0, 1).reshape(values.shape[1], -1)
    mean = values.mean(1)
    std = ((values**2).mean(1) - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------
# Augmentation, a batch at a time, every image with its own random parameters
# --------------------------------------------------------------------------------------------
def uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def flip_where(images: torch.Tensor, flip: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(dim), images)


def flip_and_rotate(
    images: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, degrees: torch.Tensor
) -> torch.Tensor:
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
    theta = torch.stack(
        [
            torch.stack([mirror_x * cos, -mirror_x * sin, zero], 1),
            torch.stack([mirror_y * sin, mirror_y * cos, zero], 1),
        ],
        1,
    )
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
    hue6 = torch.where(
        argmax == 0,
        (g - b) / safe_delta,
        torch.where(argmax == 1, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta),
    )
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


def sample_study_params(n: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """One draw per image of every random choice the original study's torchvision pipeline makes."""
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


def apply_study(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
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


# hiverge's brightness and contrast jitter (cifar10-speedrun), in [0, 1] terms: its shift of up to 0.14 and its contrast
# scale of 1 +- 0.13 act on normalised images, where a channel's std is about a quarter of the [0, 1] range.
JITTER_BRIGHTNESS, JITTER_CONTRAST = 0.035, 0.13


def sample_jitter_params(n: int, generator: torch.Generator, device: torch.device, pad: int) -> dict[str, torch.Tensor]:
    """The crop's parameters, then each image's brightness shift and contrast scale (drawn after, so the crops are the
    crop's own).
    """
    return sample_crop_params(n, generator, device, pad) | {
        "brightness": uniform(n, -JITTER_BRIGHTNESS, JITTER_BRIGHTNESS, generator, device),
        "contrast": uniform(n, 1 - JITTER_CONTRAST, 1 + JITTER_CONTRAST, generator, device),
    }


def apply_crop_jitter(images: torch.Tensor, params: dict[str, torch.Tensor], pad: int, mode: str) -> torch.Tensor:
    """``apply_crop``, then the brightness shift and the contrast scale about mid-grey; no clamping, as hiverge's."""
    shift, scale = params["brightness"].view(-1, 1, 1, 1), params["contrast"].view(-1, 1, 1, 1)
    return (apply_crop(images, params, pad, mode) + shift - 0.5) * scale + 0.5


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation: how each image's random parameters are drawn, and how a batch is transformed by them.

    ``alternating_flip``: the horizontal flip is no coin toss but alternates, each image mirrored in every other epoch
    from a random start of its own (airbench): every image is seen both ways within two epochs, not just on average.
    The batches, which know each image and the epoch, set the ``hflip`` parameter then.
    """

    description: str
    sample: Callable[[int, torch.Generator, torch.device], dict[str, torch.Tensor]]
    apply: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
    alternating_flip: bool = False


def no_parameters(n: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    return {}


def unchanged(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    return images


AUGMENTATIONS = {
    "study": Augmentation(
        "the original study's: horizontal and vertical flips, rotation up to 90 degrees, strong colour jitter",
        sample_study_params,
        apply_study,
    ),
    "standard": Augmentation(
        "the usual CIFAR recipe: random 32x32 crop of the 4-pixel zero-padded image, horizontal flip",
        partial(sample_crop_params, pad=4),
        partial(apply_crop, pad=4, mode="constant"),
    ),
    "light": Augmentation(
        "random 32x32 crop of the 2-pixel reflect-padded image, horizontal flip: airbench's, for runs of a few epochs",
        partial(sample_crop_params, pad=2),
        partial(apply_crop, pad=2, mode="reflect"),
    ),
    "alternating": Augmentation(
        "light's crop, with alternating flips: each image mirrored in every other epoch (airbench)",
        partial(sample_crop_params, pad=2),
        partial(apply_crop, pad=2, mode="reflect"),
        alternating_flip=True,
    ),
    "alternating-jitter": Augmentation(
        "alternating's crops and flips, then each image's brightness shifted by up to 0.035 and its "
        "contrast scaled by 0.87 to 1.13 (hiverge's cifar10-speedrun)",
        partial(sample_jitter_params, pad=2),
        partial(apply_crop_jitter, pad=2, mode="reflect"),
        alternating_flip=True,
    ),
    "none": Augmentation("no augmentation", no_parameters, unchanged),
}


def augment(
    images: torch.Tensor, name: str, generator: torch.Generator, hflip: torch.Tensor | None = None
) -> torch.Tensor:
    """Augment float images in [0, 1] by ``AUGMENTATIONS[name]``; each image draws its own parameters, but ``hflip``
    (an alternating flip's choice per image) when given."""
    augmentation = AUGMENTATIONS[name]
    params = augmentation.sample(images.shape[0], generator, images.device)
    if hflip is not None:
        params["hflip"] = hflip
    return augmentation.apply(images, params)


def model_input(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    augmentation: str = "none",
    generator: torch.Generator | None = None,
    hflip: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 images -> [0, 1], augmented by ``augmentation``, normalised, channels-last (faster convolutions).

    Float tensors are inputs already made for the model (cached backbone features, say): unchanged.
    """
    if images.dtype != torch.uint8:
        return images
    images = augment(images.float() / 255, augmentation, generator, hflip)
    return normalize(images, mean, std).contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Initialisation and accuracy
# --------------------------------------------------------------------------------------------
def initialize_using_norm_kaiming(module: nn.Module) -> None:
    """Kaiming-normal weights (fan-in, ReLU gain) and zero biases for conv and linear layers; use with
    ``model.apply``."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many images the class scores ``logits`` (N x classes) classify as ``labels``: a tensor on their device, so
    summing over batches needs no synchronisation per step."""
    return (logits.argmax(1) == labels).sum()
