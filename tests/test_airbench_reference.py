"""The airbench94 yardstick (benchmarks/bench_airbench_reference.py): whitening stem, schedule, a short run
that learns."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

import functions as fn
from benchmarks import bench_airbench_reference as reference
from benchmarks import bench_versus_airbench as versus
from conftest import run_script


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


def test_the_stem_bias_learns_at_the_base_rate_and_only_batchnorm_biases_at_64x(split):
    images = fn.normalize(split.train_images.float() / 255, split.mean, split.std)
    net = reference.airbench_net(8, images)
    bias_group, other_group = reference.make_optimizer(net, batch_size=1024).param_groups
    norm_biases = [m.bias for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [id(p) for p in bias_group["params"]] == [id(p) for p in norm_biases]
    # airbench94 groups by the name "norm": the stem is no norm
    assert any(p is net[0].bias for p in other_group["params"])
    assert bias_group["lr"] == 64 * other_group["lr"]
    # the same decay per step
    assert bias_group["lr"] * bias_group["weight_decay"] == other_group["lr"] * other_group["weight_decay"]
    # the whitening filters stay
    assert not any(p is net[0].weight for group in (bias_group, other_group) for p in group["params"])


def test_no_dirac_keeps_the_default_initialisation_and_lr_scale_scales_every_rate_but_not_the_decay(split):
    images = fn.normalize(split.train_images.float() / 255, split.mean, split.std)
    torch.manual_seed(0)
    identity = reference.airbench_net(8, images)[2][
        0
    ].weight  # 8 filters of 24 inputs: the first 8 pass their channel through
    torch.manual_seed(0)
    default = reference.airbench_net(8, images, dirac=False)[2][0].weight
    assert torch.equal(identity[:, :8, 1, 1], torch.eye(8)) and not torch.equal(default[:, :8, 1, 1], torch.eye(8))
    net = reference.airbench_net(8, images)
    plain, scaled = (
        reference.make_optimizer(net, 512).param_groups,
        reference.make_optimizer(net, 512, lr_scale=1.5).param_groups,
    )
    for before, after in zip(plain, scaled, strict=True):
        assert after["lr"] == pytest.approx(1.5 * before["lr"], rel=1e-12)
        # decay per step unchanged
        assert abs(after["lr"] * after["weight_decay"] - before["lr"] * before["weight_decay"]) < 1e-15


def test_lookahead_pulls_every_five_steps_from_the_start_and_fully_at_the_end():
    total = 100
    pulls = {step: reference.lookahead_decay(step, total) for step in range(1, total + 1)}
    assert [step for step, decay in pulls.items() if decay is not None] == list(range(5, 101, 5))
    assert pulls[5] == 0.95**5 * 0.05**3 and pulls[50] == 0.95**5 * 0.5**3
    assert pulls[100] == 1.0  # the network ends as the average


def test_a_pull_moves_the_average_and_sets_the_network_to_it():
    net = torch.nn.Linear(3, 2)
    lookahead = reference.Lookahead(net)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.pull(net, decay=0.75)
    torch.testing.assert_close(net.weight.detach(), start + 0.25)
    torch.testing.assert_close(lookahead.average["weight"], start + 0.25)


def test_short_run_learns_the_synthetic_task(split):
    row = reference.train_and_test(split, seed=0, epochs=12, width=8, batch_size=32, device=torch.device("cpu"))
    assert row["train_images"] == len(split.train_images) and row["batch_size"] == 32
    assert row["test_plain"] > 0.5 and row["test_flip_translate"] > 0.5  # chance is 0.1


def test_the_row_has_validation_accuracy_and_the_flags_reach_the_run(monkeypatch, tmp_path, image_folder, split):
    row = reference.train_and_test(
        split, seed=0, epochs=1, width=8, batch_size=32, device=torch.device("cpu"), dirac=False, lr_scale=0.5
    )
    assert 0 <= row["val_flip_translate"] <= 1 and row["dirac"] is False and row["lr_scale"] == 0.5
    seen = []
    monkeypatch.setattr(
        reference,
        "train_and_test",
        lambda data, seed, *rest, **kw: (
            seen.append(kw) or dict.fromkeys(reference.COLUMNS, 0.1) | {"seed": seed, "val_flip_translate": 0.2}
        ),
    )
    argv = [
        "--data-dir",
        str(image_folder),
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path),
        "--no-dirac",
        "--lr-scale",
        "1.25",
    ]
    assert run_script(monkeypatch, reference.main, "bench_airbench_reference.py", *argv) == 0
    assert [(kw["dirac"], kw["lr_scale"]) for kw in seen] == [(False, 1.25)]
    # a scale must be positive
    assert run_script(monkeypatch, reference.main, "bench_airbench_reference.py", *argv[:-1], "0") == 2


def test_no_validation_and_full_train_both_train_on_every_image(monkeypatch, tmp_path, image_folder):
    seen = []
    monkeypatch.setattr(
        reference,
        "train_and_test",
        lambda data, seed, *rest, **kw: (
            seen.append(len(data.train_images)) or dict.fromkeys(reference.COLUMNS, 0.1) | {"seed": seed}
        ),
    )
    for flag in (None, "--no-validation", "--full-train"):
        argv = ["--data-dir", str(image_folder), "--device", "cpu", "--out-dir", str(tmp_path / str(flag))] + (
            [flag] if flag else []
        )
        assert run_script(monkeypatch, reference.main, "bench_airbench_reference.py", *argv) == 0
    assert seen == [270, 300, 300]  # the study's 90% split, then all 300 synthetic training images


def test_fewer_images_than_one_batch_is_one_clear_line(monkeypatch, tmp_path, image_folder, capsys):
    argv = [
        "--data-dir",
        str(image_folder),
        "--device",
        "cpu",
        "--limit-train",
        "100",
        "--batch-size",
        "128",
        "--out-dir",
        str(tmp_path),
    ]
    assert run_script(monkeypatch, reference.main, "bench_airbench_reference.py", *argv) == 2
    assert "100 training images do not fill one batch of 128" in capsys.readouterr().err
    assert not (tmp_path / "runs.csv").exists()


def test_the_side_by_side_gives_the_yardstick_its_tuned_settings_and_reports_validation(
    monkeypatch, tmp_path, image_folder
):
    seen = []
    real = reference.train_and_test
    monkeypatch.setattr(reference, "train_and_test", lambda *args, **kw: seen.append(kw) or real(*args, **kw))
    argv = [
        "--data-dir",
        str(image_folder),
        "--device",
        "cpu",
        "--model",
        "Airbench94_muon_narrow",
        "--width",
        "8",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--reference-epochs",
        "1",
        "--reference-batch-size",
        "32",
        "--reference-no-dirac",
        "--reference-lr-scale",
        "0.5",
        "--out-dir",
        str(tmp_path),
    ]
    assert run_script(monkeypatch, versus.main, "bench_versus_airbench.py", *argv) == 0
    assert seen == [{"dirac": False, "lr_scale": 0.5, "snapshots": None}]
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [row["method"] for row in rows] == ["airbench94 (yardstick, tuned)", "Airbench94_muon_narrow (ours)"]
    assert all(0 <= float(row["val_flip_translate"]) <= 1 for row in rows)
    assert "validation (flip-translate TTA)" in (tmp_path / "runs.md").read_text()


def test_the_curve_measures_every_epochs_weights_of_both_sides_after_the_clock(monkeypatch, tmp_path, image_folder):
    argv = [
        "--data-dir",
        str(image_folder),
        "--device",
        "cpu",
        "--model",
        "Airbench94_muon_narrow",
        "--width",
        "8",
        "--seeds",
        "0",
        "--epochs",
        "2",
        "--reference-epochs",
        "2",
        "--reference-batch-size",
        "32",
        "--curve",
        "--out-dir",
        str(tmp_path),
    ]
    assert run_script(monkeypatch, versus.main, "bench_versus_airbench.py", *argv) == 0
    rows = {row["method"]: row for row in csv.DictReader(open(tmp_path / "runs.csv"))}
    points = list(csv.DictReader(open(tmp_path / "curve.csv")))
    for method, row in rows.items():
        curve = [p for p in points if p["method"] == method]
        assert [p["epoch"] for p in curve] == ["1", "2"]
        # times on the clock so far, as written (to 0.1 s): never falling, within the run's (a fast CPU may write both
        # epochs within one tenth of a second, so they may be equal)
        assert 0 <= float(curve[0]["seconds"]) <= float(curve[1]["seconds"]) <= float(row["seconds"])
        # the last epoch's weights are the run's final ones
        assert curve[-1]["test_flip_translate"] == row["test_flip_translate"]
    assert sorted(path.name for path in (tmp_path / "runs/ours-seed0").glob("epoch-*.ckpt")) == [
        "epoch-001.ckpt",
        "epoch-002.ckpt",
    ]
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 10_000
