"""transfer_learning.py on the synthetic data: random backbones (--weights none) at small image sizes, offline."""

from __future__ import annotations

import sys
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision

import engine
import transfer_learning as tl
from conftest import transfer_net
from models.transfer import freeze


def run_flags(out_dir: Path, *flags: str) -> list[str]:
    return [
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
        "--no-tsne",
        "--out-dir",
        str(out_dir),
        *flags,
    ]


def train(split: engine.SplitData, out_dir: Path, *flags: str) -> dict[str, torch.Tensor]:
    """One run through the command-line flags on the synthetic split; returns the saved model.pth."""
    tl.train_transfer(tl.configure(tl.parse_arguments(run_flags(out_dir, *flags))), data=split)
    return torch.load(out_dir / "model.pth", weights_only=True)


def first_training_images(split: engine.SplitData, count: int) -> engine.SplitData:
    return replace(split, train_images=split.train_images[:count], train_labels=split.train_labels[:count])


def initial_state(finetune: str = "fc", image_size: int = 32) -> dict[str, torch.Tensor]:
    """The weights a seed-0 run starts from."""
    return {k: v.clone() for k, v in transfer_net(finetune, image_size).state_dict().items()}


def backbone_parameter_names(finetune: str = "fc") -> tuple[set[str], set[str]]:
    """All backbone parameter names and those that --finetune trains, as state-dict keys of the whole net."""
    net = transfer_net(finetune)
    named = [(f"backbone.{name}", p) for name, p in net.backbone.named_parameters()]
    return {name for name, _ in named}, {name for name, p in named if p.requires_grad}


def run_main(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["transfer_learning.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(tl.main)
    return exit_info.value.code


def test_frozen_backbone_is_bit_identical_after_training_while_the_head_learns(tmp_path, split, capsys):
    before = initial_state()
    after = train(split, tmp_path / "run", "--epochs", "2", "--augment", "standard", "--scheduler", "plateau")
    backbone = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)  # BatchNorm statistics are part of the comparison
    assert all(torch.equal(before[k], after[k]) for k in backbone)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    output = capsys.readouterr().out
    assert (
        "note: --augment standard changes the images every epoch, so the backbone's features cannot be cached" in output
    )
    assert len(engine.read_metrics_csv(tmp_path / "run" / "metrics.csv")) == 2
    assert not (tmp_path / "run" / tl.FEATURE_FILE).exists()
    assert engine.read_json(tmp_path / "run" / "config.json")["model_options"] == {
        "arch": "resnet18",
        "weights": "none",
        "image_size": 32,
        "finetune": "fc",
        "backbone_lr_scale": 0.1,
        "feature_cache": True,
    }


@pytest.mark.parametrize("finetune", tl.FINETUNE_CHOICES)
def test_each_finetune_mode_trains_exactly_the_parameters_it_names(tmp_path, split, finetune):
    all_names, trainable = backbone_parameter_names(finetune)
    expected = {"fc": set(), "layer4": {n for n in all_names if n.startswith("backbone.layer4.")}, "all": all_names}[
        finetune
    ]
    assert trainable == expected
    before = initial_state(finetune)
    after = train(first_training_images(split, 64), tmp_path / finetune, "--finetune", finetune)
    changed = {name for name in all_names if not torch.equal(before[name], after[name])}
    assert changed == expected
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_pretrained_layers_learn_at_the_scaled_rate_and_plateau_replaces_the_schedule():
    net = transfer_net("layer4")
    recipe = engine.Recipe(lr=0.01, scheduler="plateau", warmup_epochs=1)
    model = engine.model_spec("TransferNet")
    head, backbone = model.parameter_groups(net, recipe)
    assert [id(p) for p in head["params"]] == [id(p) for p in net.head.parameters()]
    assert [id(p) for p in backbone["params"]] == [id(p) for p in net.backbone.layer4.parameters()]
    module = engine.ImageClassifier(net, recipe, seed=0, steps_per_epoch=10, parameter_groups=model.parameter_groups)
    configured = module.configure_optimizers()
    assert isinstance(configured["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert [g["lr"] for g in configured["optimizer"].param_groups] == pytest.approx([0.01, 0.001])
    assert module.recipe.scheduler == "plateau"


def test_cached_and_uncached_linear_probes_agree(tmp_path, split, capsys):
    split = first_training_images(split, 128)
    flags = ("--image-size", "48", "--epochs", "2")  # 48 px: the batch resize is part of both paths
    slow = train(split, tmp_path / "slow", *flags, "--no-feature-cache")
    fast = train(split, tmp_path / "fast", *flags)
    assert (tmp_path / "fast" / tl.FEATURE_FILE).is_file()
    assert slow.keys() == fast.keys()  # the cached path still saves the whole network
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-4, atol=1e-5)
    slow_metrics, fast_metrics = (engine.read_metrics_csv(tmp_path / name / "metrics.csv") for name in ("slow", "fast"))
    for slow_row, fast_row in zip(slow_metrics, fast_metrics, strict=True):
        for column in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert fast_row[column] == pytest.approx(slow_row[column], rel=1e-4, abs=1e-5)
    slow_test, fast_test = (engine.read_json(tmp_path / name / "test.json") for name in ("slow", "fast"))
    assert fast_test["confusion_matrix"] == slow_test["confusion_matrix"]
    capsys.readouterr()
    again = train(split, tmp_path / "fast", *flags, "--overwrite")  # a new run into the folder: the features stay
    assert "Backbone features read from" in capsys.readouterr().out
    torch.testing.assert_close(again["head.weight"], fast["head.weight"])


def test_weights_path_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(123)
    saved = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18-local.pth"
    torch.save(saved, path)
    net = transfer_net(weights=str(path))
    loaded = net.backbone.state_dict()
    assert loaded.keys() == {k for k in saved if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)
    assert net.head.out_features == 10


@pytest.mark.parametrize("content", ["resnet34", "not a checkpoint"])
def test_a_weights_file_that_does_not_fit_is_refused_with_exit_2(tmp_path, monkeypatch, capsys, content):
    path = tmp_path / "weights.pth"
    if content == "resnet34":
        torch.save(torchvision.models.resnet34().state_dict(), path)
    else:
        path.write_text(content)
    code = run_main(
        monkeypatch,
        "--weights",
        str(path),
        "--device",
        "cpu",
        "--data-dir",
        str(tmp_path / "no-data"),
        "--out-dir",
        str(tmp_path / "run"),
    )
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(path) in error
    assert (
        "does not fit torchvision's resnet18" if content == "resnet34" else "not a readable PyTorch state dict"
    ) in error


@pytest.mark.parametrize("arch", list(tl.ARCHS))
def test_each_arch_builds_with_a_10_way_head(arch):
    net = transfer_net(arch=arch).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = net.forward_features(images)
        assert net(images).shape == (2, 10)
    assert features.shape == (2, net.head.in_features) and net.head.out_features == 10
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 1000 for m in net.modules())
    freeze(net, arch, "layer4")
    trainable = sum(p.requires_grad for p in net.backbone.parameters())
    assert 0 < trainable < len(list(net.backbone.parameters()))
    mean, std = tl.pretrained_statistics(arch)
    assert mean.shape == std.shape == (3,)


def test_offline_download_failure_is_one_clear_line(tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(url, destination, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code = run_main(
        monkeypatch, "--device", "cpu", "--data-dir", str(tmp_path / "no-data"), "--out-dir", str(tmp_path / "run")
    )
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert str(hub / "checkpoints" / "resnet18-f37072fd.pth") in error
    assert "--weights PATH" in error and "URLError" in error
