"""The airbench94 yardstick (benchmarks/bench_airbench_reference.py): whitening stem, schedule, a short run that learns."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import functions as fn
from benchmarks import bench_airbench_reference as reference


def test_whitening_filters_decorrelate_the_patches(split):
    images = fn.normalize(split.train_images.float() / 255, split.mean, split.std)
    filters = reference.whitening_filters(images, eps=0.0)
    assert filters.shape == (24, 3, 2, 2)
    torch.testing.assert_close(filters[12:], -filters[:12])
    responses = F.conv2d(images.double(), filters[:12].double()).permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = responses.T @ responses / len(responses)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)


def test_triangle_schedule_rises_peaks_and_falls():
    total = 1000
    values = [reference.triangle(step, total) for step in range(total + 1)]
    assert values[0] == 0.2 and values[230] == 1.0 and abs(values[-1] - 0.07) < 1e-12
    assert max(values) == 1.0 and values.index(1.0) == 230


def test_short_run_learns_the_synthetic_task(split):
    row = reference.train_and_test(split, seed=0, epochs=6, width=8, batch_size=32, device=torch.device("cpu"))
    assert row["train_images"] == len(split.train_images) and row["batch_size"] == 32
    assert row["test_plain"] > 0.5 and row["test_flip_translate"] > 0.5  # chance is 0.1
