"""The fast recipe's pieces inside the engine: whitening, identity convolutions, parameter groups, Muon, alternating
flips, lookahead, the schedules, training on every image, and a short run that learns."""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import engine
import engine.batches
import engine.callbacks
import engine.classifier
import engine.optimizers
import functions as fn
import main as main_script
import modified_models
from benchmarks import bench_newton_schulz
from conftest import quick_config, run_command, run_script, stopped_after_epoch_one
from engine import with_defaults
from models.airbench import AIRBENCH_RECIPE, AirbenchNet, initialize, parameter_groups, whitening_filters


def airbench(split, recipe=AIRBENCH_RECIPE, **options) -> AirbenchNet:
    """A small airbench network (first stage 8 filters) with the model's options, initialised as a run does."""
    torch.manual_seed(0)
    net = AirbenchNet(width=8, **options)
    initialize(net, split, recipe)
    return net


def test_whitening_filters_give_identity_covariance_on_the_patches(split):
    images = fn.normalize(split.train_images.float() / 255, split.mean, split.std)
    filters = whitening_filters(images, eps=0.0)
    assert filters.shape == (24, 3, 2, 2)
    torch.testing.assert_close(filters[12:], -filters[:12])
    responses = F.conv2d(images.double(), filters[:12].double()).permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(
        responses.T @ responses / len(responses), torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_the_whitening_images_and_the_stem_bias_epochs_are_options(split):
    net = airbench(split, whiten_images=40, whiten_bias_epochs=1)
    images = fn.normalize(split.train_images[:40].float() / 255, split.mean, split.std)
    torch.testing.assert_close(net.whiten.weight, whitening_filters(images))  # the first 40 images, not 5,000
    assert not torch.allclose(net.whiten.weight, airbench(split).whiten.weight)
    assert [(net.training_progress(epoch), net.whiten.bias.requires_grad)[1] for epoch in range(3)] == [
        True,
        False,
        False,
    ]
    options = engine.model_spec("Airbench94_muon").resolve("Airbench94_muon", {"whiten_bias_epochs": 0}, "the test")
    assert options["whiten_images"] == 5000 and options["whiten_bias_epochs"] == 0


def test_the_whitened_stem_is_frozen_and_its_bias_learns_three_epochs(split):
    net = airbench(split)
    images = fn.normalize(split.train_images[:5000].float() / 255, split.mean, split.std)
    torch.testing.assert_close(net.whiten.weight, whitening_filters(images))
    assert not net.whiten.weight.requires_grad and not net.whiten.bias.any()
    assert [(net.training_progress(epoch), net.whiten.bias.requires_grad)[1] for epoch in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    plain = airbench(split, whiten=False)
    assert plain.whiten.weight.requires_grad and not torch.allclose(plain.whiten.weight, net.whiten.weight)
    assert [(plain.training_progress(epoch), plain.whiten.bias.requires_grad)[1] for epoch in range(5)] == [True] * 5


def test_dirac_initialisation_passes_the_input_through_an_identity_shaped_conv(split):
    net = airbench(split)
    conv = net.stages[1][0]  # 8 -> 32 channels, 3x3, same padding: the first 8 output channels are the input
    x = torch.randn(4, conv.in_channels, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv(x)[:, : conv.in_channels], x)
    without = airbench(split, dirac=False).stages[1][0]
    with torch.no_grad():
        assert not torch.allclose(without(x)[:, : conv.in_channels], x)


def test_the_optimiser_groups_carry_the_rates_and_decays_asked_for(split):
    net = airbench(split)
    module = engine.ImageClassifier(net, AIRBENCH_RECIPE, seed=0, steps_per_epoch=10, parameter_groups=parameter_groups)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, engine.optimizers.MuonSGD)
    others, biases, filters = optimizer.param_groups  # the recipe's rate first: metrics.csv's lr
    norm_biases = [m.bias for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [id(p) for p in biases["params"]] == [id(net.whiten.bias)] + [id(p) for p in norm_biases]
    # BatchNorm weights frozen, the filters taken by Muon
    assert [id(p) for p in others["params"]] == [id(net.head.weight)]
    assert {id(p) for p in filters["params"]} == {
        id(m.weight) for m in net.stages.modules() if isinstance(m, torch.nn.Conv2d)
    }
    assert (biases["lr"], others["lr"], filters["lr"]) == pytest.approx((0.053, 0.67, 0.24))
    assert (
        filters["orthogonalize"]
        and not biases["orthogonalize"]
        and filters["momentum"] == 0.6
        and others["momentum"] == 0.85
    )
    # 0.004: airbench94_muon's 2e-6 x batch 2000
    per_step = AIRBENCH_RECIPE.weight_decay * AIRBENCH_RECIPE.batch_size / 1024
    assert per_step == pytest.approx(0.004)
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(per_step) == others["lr"] * others["weight_decay"]
    assert filters["weight_decay"] == 0.0


def test_muon_orthogonalises_the_update_and_keeps_each_filter_at_its_norm():
    update = torch.randn(16, 72)
    singular = torch.linalg.svdvals(engine.optimizers.orthogonalize(update).float())
    assert singular.min() > 0.3 and singular.max() < 1.5  # pushed towards 1 (three quintic steps: roughly 0.5 to 1.5)
    weight = torch.nn.Parameter(torch.randn(16, 8, 3, 3) * 5)
    optimizer = engine.optimizers.MuonSGD(
        [{"params": [weight], "orthogonalize": True, "lr": 0.1, "momentum": 0.6}], lr=1.0, momentum=0.9
    )
    weight.grad = torch.randn_like(weight)
    before = weight.detach().clone()
    optimizer.step()
    normalised = before * 4 / before.norm()  # sqrt(16 output channels)
    step = normalised - weight.detach()
    assert step.norm().item() == pytest.approx(
        0.1 * engine.optimizers.orthogonalize((weight.grad * 1.6).reshape(16, -1)).float().norm().item(), rel=1e-2
    )


@pytest.mark.parametrize("has_bf16, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_newton_schulz_runs_in_bf16_only_where_the_cpu_computes_it(monkeypatch, split, has_bf16, dtype):
    monkeypatch.setattr(engine.optimizers, "cpu_has_bf16", lambda: has_bf16)
    module = engine.ImageClassifier(
        airbench(split), AIRBENCH_RECIPE, seed=0, steps_per_epoch=10, parameter_groups=parameter_groups
    )
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.newton_schulz_dtype == dtype
    seen = []
    real = engine.optimizers.orthogonalize
    monkeypatch.setattr(
        engine.optimizers, "orthogonalize", lambda matrix, **kw: seen.append(kw["dtype"]) or real(matrix, **kw)
    )
    module.net(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert seen and set(seen) == {dtype}


def test_each_image_is_flipped_in_alternate_epochs_from_its_own_start(monkeypatch, split):
    ids = torch.arange(len(split.train_images))
    seen: dict[int, list[bool]] = {}
    flips = []
    real = engine.batches.model_input
    monkeypatch.setattr(
        engine.batches,
        "model_input",
        lambda images, mean, std, augmentation, generator, hflip: (
            flips.append(hflip) or real(images, mean, std, augmentation, generator, hflip)
        ),
    )
    for epoch in range(4):
        batches = engine.batches.TrainBatches(
            split.train_images, ids, 32, "alternating", split.mean, split.std, seed=3, epoch=partial(int, epoch)
        )
        labels = torch.cat([labels for _, labels in batches])
        for image, flipped in zip(labels.tolist(), torch.cat(flips).tolist(), strict=True):
            seen.setdefault(image, []).append(flipped)
        flips.clear()
    assert len(seen) == len(ids)
    assert all(
        flipped[1] != flipped[0] and flipped[2] == flipped[0] and flipped[3] == flipped[1] for flipped in seen.values()
    )
    first = torch.tensor([flipped[0] for flipped in seen.values()], dtype=torch.float)
    assert 0.3 < first.mean() < 0.7  # a random start per image, not one for all


def test_the_weight_average_follows_its_formula():
    net = torch.nn.Linear(3, 2)
    module, trainer = SimpleNamespace(net=net, total_steps=20), SimpleNamespace(global_step=0)
    lookahead = engine.callbacks.Lookahead()
    lookahead.on_train_start(trainer, module)
    weights = net.weight.detach().clone()
    average = weights.clone()
    for step in range(1, 21):
        with torch.no_grad():
            net.weight.add_(1.0)  # a training step
        weights = weights + 1.0
        trainer.global_step = step
        lookahead.on_train_batch_end(trainer, module)
        decay = 1.0 if step == 20 else (0.95**5 * (step / 20) ** 3 if step % 5 == 0 else None)
        if decay is not None:  # the average moves towards the network, and the network is set to it
            average = decay * average + (1 - decay) * weights
            weights = average.clone()
        torch.testing.assert_close(net.weight.detach(), weights)
    torch.testing.assert_close(lookahead.average["weight"], average)
    assert engine.callbacks.lookahead_decay(20, 20) == 1.0 and engine.callbacks.lookahead_decay(7, 20) is None


def test_airbench_schedules_have_their_shape():
    linear = [engine.classifier.learning_rate_factor(step, 100, 0, "linear") for step in (0, 50, 99)]
    assert linear == pytest.approx([1.0, 0.5, 0.01])
    triangle = [engine.classifier.learning_rate_factor(step, 100, 0, "triangle") for step in (0, 23, 100)]
    assert triangle == pytest.approx([0.2, 1.0, 0.07])


def test_training_on_every_image_writes_the_usual_outputs_without_a_validation_split(tmp_path, arrays, capsys):
    data = engine.SplitData.from_arrays(arrays, validation=False)
    assert len(data.train_images) == len(arrays.train_images) and len(data.val_images) == 0
    config = replace(quick_config(tmp_path, epochs=2), validation=False)
    report = engine.train(config, engine.model_spec("CIFAR10Net"), data=data)
    run_dir = tmp_path / "run"
    for name in (
        "model.pth",
        "last.ckpt",
        "test.json",
        "metrics.csv",
        "curves.png",
        "confusion_matrix.png",
        "model.json",
    ):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "best.ckpt").exists()  # "best" is by validation loss: there is none
    assert "best.ckpt" not in capsys.readouterr().out.splitlines()[-1]  # the closing line lists what was written
    history = engine.read_metrics_csv(run_dir / "metrics.csv")
    assert [row["val_loss"] for row in history] == [None, None] and all(
        row["train_accuracy"] is not None for row in history
    )
    assert report["num_test_images"] == len(arrays.test_images) and report["best_val_accuracy"] is None


def test_a_short_fast_recipe_run_learns_the_synthetic_task(tmp_path, split):
    recipe = replace(engine.model_spec("Airbench94_muon_narrow").recipe, epochs=4, batch_size=32)
    config = engine.RunConfig(
        model="Airbench94_muon_narrow",
        recipe=recipe,
        out_dir=str(tmp_path / "run"),
        progress=False,
        analyses={"tsne": False},
        device="cpu",
        logger="none",
    )
    report = engine.train(config, engine.model_spec("Airbench94_muon_narrow"), data=split)
    history = engine.read_metrics_csv(tmp_path / "run/metrics.csv")
    assert history[-1]["train_loss"] < history[0]["train_loss"] and report["test_accuracy"] > 0.5  # chance is 0.1


def test_airbench_options_on_a_model_without_them_are_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["main.py", "--whiten", "--out-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(main_script.main)
    # main.py trains CIFAR10Net only
    assert exit_info.value.code == 2 and "unrecognized arguments: --whiten" in capsys.readouterr().err
    monkeypatch.setattr(
        sys, "argv", ["modified_models.py", "--model", "FastVGG", "--no-whiten", "--out-dir", str(tmp_path / "run")]
    )
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(modified_models.main)
    error = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and error.count("\n") == 1
        and "whiten is not an option of FastVGG (its options: width)" in error
    )
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "run").exists()


def test_the_newton_schulz_benchmark_times_both_dtypes_beside_a_step(monkeypatch, tmp_path):
    argv = ["--model", "Airbench94_muon_narrow", "--width", "4", "--rounds", "1", "--out-dir", str(tmp_path)]
    assert run_script(monkeypatch, bench_newton_schulz.main, "bench_newton_schulz.py", *argv) == 0
    table = (tmp_path / "runs.md").read_text()
    assert (
        "| Newton-Schulz, every filter | float32 |" in table and "| Newton-Schulz, every filter | bfloat16 |" in table
    )
    assert "forward and backward of a batch | float32" in table


@pytest.mark.parametrize(
    "model, batch_size, muon_lr, stem_bias_epochs",
    [("Airbench94_muon_cpu", 1000, 0.17, 0.2), ("Airbench94_muon", 2000, 0.24, 3.0)],  # the GPU's recipe is unchanged
)
def test_the_cpu_recipe_reaches_the_optimiser_and_config_json_and_each_run_resumes_with_its_own(
    monkeypatch, capsys, tmp_path, image_folder, model, batch_size, muon_lr, stem_bias_epochs
):
    run_dir = tmp_path / "run"
    flags = ("--model", model, "--width", "8", "--epochs", "2", "--data-dir", image_folder, "--out-dir", run_dir)
    code, _, err = stopped_after_epoch_one(
        modified_models, monkeypatch, capsys, *flags, "--no-tsne", "--no-progress", "--device", "cpu"
    )
    assert code == 143 and "holds epoch 1 of 2" in err, err
    # a bare --resume: the run's own settings, whatever the model's defaults are by then
    spec = engine.model_spec(model)
    later = replace(spec, recipe=replace(spec.recipe, batch_size=64, muon_lr=0.5))
    monkeypatch.setitem(
        engine.registry.MODELS, model, replace(later, options=with_defaults(spec.options, whiten=False))
    )
    code, _, err = run_command(modified_models, monkeypatch, capsys, "--model", model, "--resume", "--out-dir", run_dir)
    assert code == 0 and "error" not in err, err  # a warning says 270 images make few batches of 1,000
    config = engine.read_json(run_dir / "config.json")
    recipe, options = config["recipe"], config["model_options"]
    assert (recipe["batch_size"], recipe["muon_lr"], options["whiten_bias_epochs"], options["whiten"]) == (
        batch_size,
        muon_lr,
        stem_bias_epochs,
        True,
    )
    head, *_, filters = engine.read_checkpoint(run_dir / "last.ckpt")["optimizer_states"][0]["param_groups"]
    assert filters["orthogonalize"] and filters["initial_lr"] == pytest.approx(muon_lr)
    # --decoupled: the head's decay per step follows the batch (the recipe's is per 1,024 images)
    assert head["initial_lr"] * head["weight_decay"] == pytest.approx(recipe["weight_decay"] * batch_size / 1024)
