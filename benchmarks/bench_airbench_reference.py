"""A yardstick: airbench94's complete method, run on the same data, device and precision as our recipes.

    python -m benchmarks.bench_airbench_reference --data-dir ./data --seeds 0
    python -m benchmarks.bench_airbench_reference --data-dir ./data --full-train --seeds 0 1 2

This script runs Keller Jordan's airbench94 method ("94% on CIFAR-10 in 3.29 seconds", 2024; its legacy/airbench94.py),
written here from that source and outside the engine, so that what the data allows and what our recipes leave out can be
told apart:

- a frozen 2x2 stem whose filters whiten the training set's patches (its bias trains for 3 epochs, at the base learning
  rate: airbench94 picks the 64x group by the name ``norm``, which the stem does not have);
- convolutions initialised to pass their input through (identity, "dirac", on the first channels);
- BatchNorm weights frozen at 1, BatchNorm biases at 64x the learning rate (same weight decay per step);
- learning rate and weight decay decoupled from batch size and momentum (per 1,024 summed losses);
- a triangular schedule (0.2 -> 1 at 23% of the steps -> 0.07);
- lookahead: an average of the weights kept from the first step; every 5 steps it moves towards the network by 1 -
  0.95^5 (step/total)^3 and the network is set to it, and at the last step the network takes the average whole;
- alternating flips (a random half flipped once, then every image flipped every other epoch) and 2-pixel reflect-padded
  random crops;
- flip-translate test-time augmentation (the engine's ``--tta flip-translate``).

Timed as airbench94 times itself: from normalising the training images, through the whitening set-up and the training,
to the end of the final test pass with flip-translate TTA; the data is already on the device. Precision: airbench94
keeps fp16 weights with fp32 BatchNorm on its GPU; here the weights stay fp32 and ``--precision bf16-mixed`` runs the
forward and backward passes under bf16 autocast (the default on CUDA; float32 elsewhere, as the engine's ``auto``). With
``--compile`` the network is compiled. On CUDA a first run with random labels warms up (chooses convolution algorithms,
compiles) before the timed runs.

Its published figure, 94.01% (mean of 1,000 runs on an A100), is on the official files with all 50,000 training images:
``--full-train`` trains on them too; the default trains on the study's 45,000-image split, as our recipes do, and then
also measures the 5,000 validation images (flip-translate TTA, after the clock): the number to tune the yardstick by, as
our recipes were tuned. ``--no-dirac`` and ``--lr-scale`` give it the same chance our narrow recipe had (which dropped
identity initialisation and changed its batch and learning rate); their defaults are airbench94's. Writes runs.csv into
--out-dir.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import engine
from benchmarks.accuracy import accuracy_by_tta
from functions import apply_crop, normalize, sample_crop_params
from models.fast import ConvGroup

MOMENTUM, LABEL_SMOOTHING, LOGIT_SCALE = 0.85, 0.2, 1 / 9
LR_PER_1024, WEIGHT_DECAY_PER_1024, NORM_BIAS_LR_SCALE = 11.5, 0.0153, 64.0
STEM_BIAS_EPOCHS, LOOKAHEAD_EVERY, LOOKAHEAD_DECAY = 3, 5, 0.95
COLUMNS = (
    "seed",
    "train_images",
    "epochs",
    "width",
    "batch_size",
    "dirac",
    "lr_scale",
    "precision",
    "seconds",
    "val_flip_translate",
    "test_plain",
    "test_flip",
    "test_flip_translate",
)


class ScaleLogits(nn.Module):
    """Multiplies the class scores by a constant (airbench's 1/9: small early logits for label-smoothed training at a
    high lr).
    """

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def whitening_filters(images: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """24 filters of 2x2x3 from the eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue), and their
    negatives.
    """
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    scaled = (eigenvectors.T / torch.sqrt(eigenvalues + eps).unsqueeze(1)).reshape(12, 3, 2, 2).float()
    return torch.cat((scaled, -scaled))


def airbench_net(width: int, whitening_images: torch.Tensor, dirac: bool = True) -> nn.Sequential:
    """FastVGG's layout with airbench's stem (whitening conv and GELU, no BatchNorm), initialisation and BatchNorm;
    without ``dirac`` the convolutions keep PyTorch's default initialisation."""
    net = nn.Sequential(
        nn.Conv2d(3, 24, 2),
        nn.GELU(),
        ConvGroup(24, width),
        ConvGroup(width, 4 * width),
        ConvGroup(4 * width, 4 * width),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(4 * width, 10, bias=False),
        ScaleLogits(LOGIT_SCALE),
    )
    with torch.no_grad():
        net[0].weight.copy_(whitening_filters(whitening_images))
        net[0].weight.requires_grad_(False)
        net[0].bias.zero_()
        for module in net[2:].modules():
            if isinstance(module, nn.Conv2d) and dirac:
                nn.init.dirac_(module.weight[: module.in_channels])  # an identity path through the first channels
            elif isinstance(module, nn.BatchNorm2d):
                module.eps, module.momentum = 1e-12, 0.4  # running statistics that follow the fast-moving weights
                module.weight.requires_grad_(False)
    return net.to(memory_format=torch.channels_last)


def make_optimizer(net: nn.Sequential, batch_size: int, lr_scale: float = 1.0) -> torch.optim.SGD:
    """SGD with Nesterov momentum; lr and weight decay per 1,024 summed losses, independent of momentum.

    ``lr_scale`` multiplies every learning rate and keeps the weight decay per step (airbench's coupling).
    """
    kilostep_scale = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr = lr_scale * LR_PER_1024 / kilostep_scale
    decay_per_step = WEIGHT_DECAY_PER_1024 * batch_size / kilostep_scale
    norm_biases = [m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    # the stem's bias too
    others = [p for p in net.parameters() if p.requires_grad and not any(p is bias for bias in norm_biases)]
    bias_lr = lr * NORM_BIAS_LR_SCALE
    return torch.optim.SGD(
        [
            {"params": norm_biases, "lr": bias_lr, "weight_decay": decay_per_step / bias_lr},
            {"params": others, "lr": lr, "weight_decay": decay_per_step / lr},
        ],
        momentum=MOMENTUM,
        nesterov=True,
    )


def triangle(step: int, total_steps: int, start: float = 0.2, peak_at: float = 0.23, end: float = 0.07) -> float:
    peak = int(peak_at * total_steps)
    if step < peak:
        return start + (1 - start) * step / peak
    return 1 + (end - 1) * (step - peak) / (total_steps - peak)


def lookahead_decay(step: int, total_steps: int) -> float | None:
    """How much of the average stays when the network is pulled to it after ``step`` steps; None: no pull then.

    Every 5 steps, with a decay that grows with the cube of progress (the early average follows the network
    closely); after the last step, 1: the network ends as the average.
    """
    if step >= total_steps:
        return 1.0
    if step % LOOKAHEAD_EVERY == 0:
        return LOOKAHEAD_DECAY**LOOKAHEAD_EVERY * (step / total_steps) ** 3
    return None


class Lookahead:
    """A running average of the weights that the network is pulled back to; its decay tightens as training ends."""

    def __init__(self, net: nn.Module):
        self.average = {k: v.detach().clone() for k, v in net.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def pull(self, net: nn.Module, decay: float) -> None:
        state = net.state_dict()
        for key, average in self.average.items():
            average.lerp_(state[key], 1 - decay)
            state[key].copy_(average)


def train_and_test(
    data: engine.SplitData,
    seed: int,
    epochs: float,
    width: int,
    batch_size: int,
    device: torch.device,
    precision: str = "32-true",
    compile: bool = False,
    labels: torch.Tensor | None = None,
    dirac: bool = True,
    lr_scale: float = 1.0,
    snapshots: list | None = None,
) -> dict:
    """Train with the whole method, then measure the test set under each TTA mode (and, after the clock, the
    validation images with flip-translate TTA, if there are any); returns the runs.csv row.

    ``labels`` replaces the training labels (random ones for a warm-up run). ``snapshots``, when given, gets (epoch,
    seconds on the clock, a copy of the weights) after every epoch: a copy in memory, inside the clock, as our side
    writes a checkpoint.
    """
    labels = data.train_labels if labels is None else labels
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    # 32-true or bf16-mixed (yardstick_precision): none, or bf16 autocast
    autocast = engine.autocast_for(precision, device)
    steps_per_epoch = len(data.train_images) // batch_size  # whole batches only, as airbench94
    if steps_per_epoch == 0:
        raise engine.UserError(
            f"{len(data.train_images)} training images do not fill one batch of {batch_size}: give a smaller "
            "--batch-size or more images (--limit-train)"
        )
    total_steps = math.ceil(steps_per_epoch * epochs)
    half_flipped = torch.rand(len(data.train_images), generator=generator, device=device) < 0.5
    started = time.perf_counter()
    images = normalize(data.train_images.float() / 255, data.mean, data.std)
    net = airbench_net(width, images[:5000], dirac).to(device)
    if compile:
        net.compile()
    optimizer = make_optimizer(net, batch_size, lr_scale)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: triangle(step, total_steps))
    lookahead, step = Lookahead(net), 0
    for epoch in range(math.ceil(epochs)):
        net[0].bias.requires_grad_(epoch < STEM_BIAS_EPOCHS)
        crop = sample_crop_params(len(images), generator, device, pad=2)
        crop["hflip"] = half_flipped ^ bool(epoch % 2)  # alternating flips: each image mirrored every other epoch
        epoch_images = apply_crop(images, crop, pad=2, mode="reflect").contiguous(memory_format=torch.channels_last)
        order = torch.randperm(len(images), generator=generator, device=device)
        net.train()
        for index in order[: steps_per_epoch * batch_size].view(steps_per_epoch, batch_size):
            with autocast:
                logits = net(epoch_images[index]).float()
            loss = F.cross_entropy(logits, labels[index], label_smoothing=LABEL_SMOOTHING, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            decay = lookahead_decay(step, total_steps)
            if decay is not None:
                lookahead.pull(net, decay)
            if step >= total_steps:
                break
        if snapshots is not None:
            snapshots.append(
                (
                    epoch + 1,
                    time.perf_counter() - started,
                    {key: value.detach().clone() for key, value in net.state_dict().items()},
                )
            )
        print(
            f"seed {seed} epoch {epoch + 1}: training loss {loss.item() / batch_size:.4f}, "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
    with autocast:
        test = accuracy_by_tta(net, data.test_images, data.test_labels, data.mean, data.std, tta="flip-translate")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    val = None
    if len(data.val_images):
        with autocast:
            val = accuracy_by_tta(net, data.val_images, data.val_labels, data.mean, data.std, tta="flip-translate")[
                "flip-translate"
            ]
    return {
        "seed": seed,
        "train_images": len(images),
        "epochs": epochs,
        "width": width,
        "batch_size": batch_size,
        "dirac": dirac,
        "lr_scale": lr_scale,
        "precision": precision,
        "seconds": round(seconds, 1),
        "val_flip_translate": val,
        "test_plain": test["none"],
        "test_flip": test["flip"],
        "test_flip_translate": test["flip-translate"],
    }


def yardstick_precision(precision: str, device: str) -> str:
    """--precision as the engine resolves it, if the yardstick runs it: float32, or bf16 autocast."""
    precision = engine.resolve_precision(precision, device)
    if precision not in ("32-true", "bf16-mixed"):
        raise engine.UserError(f"--precision {precision}: the yardstick runs 32-true or bf16-mixed; give one of them")
    return precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seeds", type=engine.non_negative_int, nargs="+", default=[0], help="seeds to run (default 0)"
    )
    parser.add_argument(
        "--epochs",
        type=engine.positive_float,
        default=9.9,
        help="passes over the training images (default 9.9, airbench94's)",
    )
    parser.add_argument(
        "--width",
        type=engine.positive_int,
        default=64,
        help="channels of the first stage; the others have 4x (default 64)",
    )
    parser.add_argument(
        "--batch-size",
        type=engine.positive_int,
        default=1024,
        help="images per step; lr and weight decay adapt (default 1024)",
    )
    parser.add_argument(
        "--no-dirac",
        dest="dirac",
        action="store_false",
        help="keep PyTorch's default initialisation instead of identity (dirac) convolutions (default: identity, "
        "airbench94's)",
    )
    parser.add_argument(
        "--lr-scale",
        type=engine.positive_float,
        default=1.0,
        help="multiplies every learning rate, weight decay per step unchanged (default 1, airbench94's)",
    )
    # its --no-validation trains on all 50,000 images, as airbench does (default: the 45,000 split)
    engine.add_data_arguments(parser)
    parser.add_argument("--full-train", dest="validation", action="store_false", help="the same as --no-validation")
    engine.add_device_arguments(parser, distributed=False)
    parser.add_argument(
        "--out-dir",
        default="runs/bench_airbench_reference",
        help="folder for runs.csv (default runs/bench_airbench_reference)",
    )
    args = parser.parse_args()

    device = engine.training_device(args.device)
    precision = yardstick_precision(args.precision, args.device)
    torch.backends.cudnn.benchmark = True  # as airbench94: the fastest convolution algorithms for these fixed shapes
    arrays = engine.load_dataset(args.data_dir, args.num_workers)
    data = engine.SplitData.from_arrays(arrays, args.limit_train)
    if not args.validation:  # airbench's setting: every training image (the split's statistics still normalise them)
        keep = slice(args.limit_train)
        data = replace(data, train_images=arrays.train_images[keep], train_labels=arrays.train_labels[keep])
        data = replace(data, val_images=data.val_images[:0], val_labels=data.val_labels[:0])  # all of them trained
    data = data.to(device)
    print(
        f"Data: {data.source}; {len(data.train_images)} train / {len(data.val_images)} validation / "
        f"{len(data.test_images)} test images; {device}, {precision}"
    )
    run = partial(
        train_and_test,
        data,
        epochs=args.epochs,
        width=args.width,
        batch_size=args.batch_size,
        device=device,
        precision=precision,
        compile=args.compile,
        dirac=args.dirac,
        lr_scale=args.lr_scale,
    )
    if device.type == "cuda":  # choosing convolution algorithms (and compiling) happens here, outside the timed runs
        run(0, labels=torch.randint(0, 10, data.train_labels.shape, device=device))
    rows = []
    for seed in args.seeds:
        rows.append(run(seed))
        r = rows[-1]
        validation = (
            ""
            if r["val_flip_translate"] is None
            else f"validation (flip-translate TTA) {r['val_flip_translate']:.4f}; "
        )
        print(
            f"seed {seed}: {r['epochs']} epochs in {r['seconds']:.1f} s; {validation}test {r['test_plain']:.4f}, with "
            f"flip TTA {r['test_flip']:.4f}, with flip-translate TTA {r['test_flip_translate']:.4f}",
            flush=True,
        )
        engine.write_csv(Path(args.out_dir) / "runs.csv", rows, COLUMNS)
    print(f"Written {args.out_dir}/runs.csv")


if __name__ == "__main__":
    engine.run_cli(main)
