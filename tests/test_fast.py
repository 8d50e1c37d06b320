"""FastVGG and its recipe: test-time flips, the warm-up-then-decay schedule, a short run, the benchmark's settings."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import engine
import engine.batches
import modified_models as mm
from benchmarks import bench_fast


def test_fastvgg_shapes_through_its_stages():
    net = mm.FastVGG().eval()
    x = net.stem(torch.randn(4, 3, 32, 32))
    shapes = [tuple(x.shape[1:])]
    for stage in net.stages:
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(24, 31, 31), (64, 15, 15), (256, 7, 7), (256, 3, 3)]
    images = torch.randn(4, 3, 32, 32)
    assert net.forward_features(images).shape == (4, 256) and net(images).shape == (4, 10)


def test_recipe_lowers_the_loss_of_a_tiny_batch():
    torch.manual_seed(0)
    net = mm.MODELS["FastVGG_narrow"].build()
    r = mm.FAST_RECIPE
    optimizer = torch.optim.SGD(
        net.parameters(), lr=0.1, momentum=r.momentum, nesterov=True, weight_decay=r.weight_decay
    )
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y, label_smoothing=r.label_smoothing)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_tta_modes_average_the_views_they_name(split):
    torch.manual_seed(0)
    net = mm.MODELS["FastVGG_narrow"].build()
    test = split.test_images[:40], split.test_labels[:40], split.mean, split.std
    plain = engine.predict(net, *test)["logits"]
    with_tta = engine.predict(net, *test, tta="flip-translate", with_features=True)
    images = torch.cat([images for images, _ in engine.batches.EvalBatches(*test[:2], 16, split.mean, split.std)])
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    with torch.no_grad():

        def mirror_mean(x):
            return (net(x) + net(x.flip(3))) / 2

        flip = mirror_mean(images)
        down_right, up_left = mirror_mean(padded[:, :, 0:32, 0:32]), mirror_mean(padded[:, :, 2:34, 2:34])
    # content moved one pixel down-right
    assert torch.equal(padded[:, :, 0:32, 0:32][:, :, 1:, 1:], images[:, :, :31, :31])
    torch.testing.assert_close(with_tta["logits_by_tta"]["none"], plain)
    torch.testing.assert_close(with_tta["logits_by_tta"]["flip"], flip)
    torch.testing.assert_close(with_tta["logits"], flip / 2 + (down_right + up_left) / 4)
    torch.testing.assert_close(engine.predict(net, *test, tta="flip")["logits"], flip)
    assert not torch.allclose(flip, plain) and not torch.allclose(with_tta["logits"], flip)
    # features: the image itself
    torch.testing.assert_close(with_tta["features"], engine.predict(net, *test, with_features=True)["features"])


def test_fast_recipe_schedule_warms_up_peaks_and_decays():
    r = replace(mm.FAST_RECIPE, epochs=10, warmup_epochs=2.0)
    steps_per_epoch = 88
    module = engine.ImageClassifier(mm.MODELS["FastVGG_narrow"].build(), r, seed=0, steps_per_epoch=steps_per_epoch)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    optimizer = scheduler.optimizer
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    seen = {}
    for step in range(10 * steps_per_epoch):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    warmup, total = 2 * steps_per_epoch, 10 * steps_per_epoch
    assert seen[0] == pytest.approx(r.lr / warmup)  # starts near zero
    assert seen[warmup // 2 - 1] == pytest.approx(r.lr / 2)  # linear warm-up
    assert seen[warmup - 1] == pytest.approx(r.lr) == max(seen.values())  # peak at the end of warm-up
    assert seen[warmup + (total - warmup) // 2] == pytest.approx(r.lr / 2)  # linear decay
    assert seen[total - 1] < 0.01 * r.lr  # to (almost) zero
    assert all(seen[s + 1] <= seen[s] for s in range(warmup - 1, total - 1))


def test_fastvgg_one_epoch_run_writes_the_usual_outputs(monkeypatch, capsys, tmp_path, arrays):
    from conftest import write_image_folder

    data_dir = write_image_folder(tmp_path / "data", arrays)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "modified_models.py",
            "--model",
            "FastVGG_narrow",
            "--data-dir",
            str(data_dir),
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--no-progress",
            "--tsne-samples",
            "60",
            "--out-dir",
            str(tmp_path / "run"),
        ],
    )
    mm.main()
    out = capsys.readouterr().out
    assert "(with flip test-time augmentation)" in out
    for name in (
        "config.json",
        "metrics.csv",
        "curves.png",
        "model.pth",
        "last.ckpt",
        "test.json",
        "confusion_matrix.png",
        "tsne_test.png",
    ):
        assert (tmp_path / "run" / name).is_file(), name
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert (
        config["recipe"]["optimizer"] == "sgd"
        and config["recipe"]["augment"] == "light"
        and config["recipe"]["tta"] == "flip"
    )
    assert json.loads((tmp_path / "run/test.json").read_text())["tta"] == "flip"


def test_benchmark_settings_cross_product_and_types():
    base = engine.RunConfig(model="FastVGG", recipe=mm.FAST_RECIPE)
    variants = bench_fast.parse_vary(["lr=0.2,0.4", "augment=standard,light", "tta=none"])
    assert len(variants) == 4 and variants[0] == {"lr": "0.2", "augment": "standard", "tta": "none"}
    config = bench_fast.apply_settings(
        base, {"lr": "0.2", "batch_size": "x2", "tta": "flip-translate", "precision": "bf16-mixed", "compile": "on"}
    )
    assert (
        config.recipe.lr == 0.2
        and config.recipe.batch_size == 2 * mm.FAST_RECIPE.batch_size
        and config.recipe.tta == "flip-translate"
    )
    assert config.precision == "bf16-mixed" and config.compile is True
    for bad in ({"lr": "fast"}, {"colour": "red"}, {"betas": "0.9"}, {"tta": "off"}, {"augment": "heavy"}):
        with pytest.raises(engine.UserError):
            bench_fast.apply_settings(base, bad)
    with pytest.raises(engine.UserError):
        bench_fast.parse_vary(["lr"])


def test_compile_flag_compiles_the_network_in_place(monkeypatch, tmp_path, split):
    from conftest import quick_config

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(type(self).__name__))
    config = replace(quick_config(tmp_path, model="FastVGG_narrow", epochs=1, batch_size=128), compile=True)
    engine.fit(config, mm.MODELS["FastVGG_narrow"], split, checkpoints=False)
    assert compiled == ["FastVGG"]  # the network itself, so its state dict keeps plain names
    config = replace(config, compile=False, out_dir=str(tmp_path / "plain"))
    engine.fit(config, mm.MODELS["FastVGG_narrow"], split, checkpoints=False)
    assert compiled == ["FastVGG"]


def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(engine.devices, "cpu_has_bf16", lambda: False)
    engine.devices.warn_emulated_bf16.cache_clear()
    assert engine.resolve_precision("32-true", "cpu") == "32-true"
    assert engine.resolve_precision("auto", "cpu") == "32-true"
    assert capsys.readouterr().err == ""
    assert engine.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert engine.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert capsys.readouterr().err.count("use --precision 32-true") == 1
    monkeypatch.setattr(engine.devices, "cpu_has_bf16", lambda: True)
    engine.devices.warn_emulated_bf16.cache_clear()
    assert engine.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed" and capsys.readouterr().err == ""


def test_benchmark_records_a_diverged_run_and_goes_on(monkeypatch, capsys, tmp_path, arrays):
    from conftest import run_script, write_image_folder

    data_dir = write_image_folder(tmp_path / "data", arrays)
    status = run_script(
        monkeypatch,
        bench_fast.main,
        "bench_fast.py",
        "--model",
        "FastVGG_narrow",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "1",
        "--seeds",
        "0",
        "--vary",
        "lr=1e9,0.05",
        "--vary",
        "batch_size=64",
        "--out-dir",
        str(tmp_path / "bench"),
    )
    assert status == 0
    table = (tmp_path / "bench/runs.md").read_text().splitlines()
    diverged, learned = [line for line in table if line.startswith("| lr=")]
    assert "diverged: the training loss" in diverged or "diverged: the validation loss" in diverged
    # the run after the diverged one was trained and measured
    assert "diverged" not in learned and learned.count("%") == 6
    rows = (tmp_path / "bench/runs.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].endswith("after epoch 1") and "lr=1e9" in capsys.readouterr().out


def test_benchmark_times_a_run_that_measures_nothing_between_epochs(monkeypatch, tmp_path, arrays):
    from conftest import run_script, write_image_folder

    data_dir = write_image_folder(tmp_path / "data", arrays)
    status = run_script(
        monkeypatch,
        bench_fast.main,
        "bench_fast.py",
        "--model",
        "FastVGG_narrow",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "2",
        "--seeds",
        "0",
        "--vary",
        "val_every=0,1",
        "--vary",
        "train_accuracy_sample=0",
        "--out-dir",
        str(tmp_path / "bench"),
    )
    assert status == 0
    silent, watched = [
        line for line in (tmp_path / "bench/runs.md").read_text().splitlines() if line.startswith("| val_every=")
    ]
    # no validation in the run; one after its last epoch
    assert silent.split(" | ")[4] == "n/a" and watched.split(" | ")[4].endswith("%")
    # validation with the run's TTA and the test set are measured after the run all the same
    assert silent.count("%") == 5


def test_benchmark_runs_the_variants_in_turns_seed_by_seed(monkeypatch, tmp_path, arrays):
    from conftest import run_script, write_image_folder

    data_dir = write_image_folder(tmp_path / "data", arrays)
    status = run_script(
        monkeypatch,
        bench_fast.main,
        "bench_fast.py",
        "--model",
        "FastVGG_narrow",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "1",
        "--limit-train",
        "64",
        "--seeds",
        "0",
        "1",
        "--vary",
        "lr=0.05,0.1",
        "--out-dir",
        str(tmp_path / "bench"),
    )
    assert status == 0
    ran = [line.split(",")[:2] for line in (tmp_path / "bench/runs.csv").read_text().splitlines()[1:]]
    # drift falls on both variants alike
    assert ran == [["lr=0.05", "0"], ["lr=0.1", "0"], ["lr=0.05", "1"], ["lr=0.1", "1"]]
    shown = [
        line.split(" | ")[:2]
        for line in (tmp_path / "bench/runs.md").read_text().splitlines()
        if line.startswith("| lr=")
    ]
    # the table reads variant by variant
    assert shown == [["| lr=0.05", "0"], ["| lr=0.05", "1"], ["| lr=0.1", "0"], ["| lr=0.1", "1"]]
