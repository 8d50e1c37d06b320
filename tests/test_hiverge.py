"""hiverge's changes to airbench's method, each an option: brightness and contrast jitter, the stem bias for a fraction
of an epoch, Muon's filters renormalised every N-th step with weight decay between, batched Newton-Schulz, selective
TTA, and the benchmark that measures each alone."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import engine
import engine.evaluation
import engine.optimizers
import functions as fn
import modified_models
from benchmarks import bench_fast
from conftest import run_command, run_script, write_image_folder
from models.airbench import AirbenchNet


def test_the_jitter_keeps_the_crops_and_flips_and_shifts_and_scales_each_image(split):
    images = split.train_images[:64].float() / 255
    flips = torch.rand(64, generator=torch.Generator().manual_seed(5)) < 0.5
    plain = fn.augment(images, "alternating", torch.Generator().manual_seed(1), flips)
    jittered = fn.augment(images, "alternating-jitter", torch.Generator().manual_seed(1), flips)
    # per image, jittered = (plain + shift - 0.5) * scale + 0.5: a straight line through its pixels
    x, y = plain.flatten(1), jittered.flatten(1)
    scale = ((x - x.mean(1, keepdim=True)) * (y - y.mean(1, keepdim=True))).sum(1) / (
        x - x.mean(1, keepdim=True)
    ).square().sum(1)
    shift = (y.mean(1) - 0.5) / scale + 0.5 - x.mean(1)
    torch.testing.assert_close(y, (x + shift[:, None] - 0.5) * scale[:, None] + 0.5, atol=1e-5, rtol=0)
    assert (
        scale.min() >= 1 - fn.JITTER_CONTRAST - 1e-4
        and scale.max() <= 1 + fn.JITTER_CONTRAST + 1e-4
        and scale.std() > 0.03
    )
    assert shift.abs().max() <= fn.JITTER_BRIGHTNESS + 1e-4 and shift.std() > 0.01
    assert fn.AUGMENTATIONS["alternating-jitter"].alternating_flip


def test_the_stem_bias_learns_for_a_fraction_of_an_epoch(tmp_path, split):
    net = AirbenchNet(width=8, whiten_bias_epochs=0.5)
    assert [(net.training_progress(epochs), net.whiten.bias.requires_grad)[1] for epochs in (0, 0.25, 0.5, 1)] == [
        True,
        True,
        False,
        False,
    ]
    seen = []
    recipe = replace(engine.model_spec("Airbench94_muon_narrow").recipe, epochs=2, batch_size=64)
    config = engine.RunConfig(
        model="Airbench94_muon_narrow",
        model_options={"width": 8, "whiten_bias_epochs": 0.5},
        recipe=recipe,
        out_dir=str(tmp_path / "run"),
        progress=False,
        analyses={"tsne": False},
        device="cpu",
        logger="none",
    )
    spec = engine.model_spec("Airbench94_muon_narrow")
    real = AirbenchNet.training_progress

    def record(self, epochs):
        seen.append((epochs, self.whiten.bias.detach().clone()))
        real(self, epochs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AirbenchNet, "training_progress", record)
        engine.fit(config, spec, split, checkpoints=False)
    # 270 images: 5 batches of 64
    assert [epochs for epochs, _ in seen] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1, 1.2, 1.4, 1.6, 1.8])
    biases = [bias for _, bias in seen]  # each as the step at that point found it
    assert not torch.equal(biases[2], biases[3])  # the third step (0.4 epochs in) still moved the bias
    assert all(torch.equal(biases[3], later) for later in biases[4:])  # from half-way through the first epoch it stays


def muon(weight: torch.nn.Parameter, **group) -> engine.optimizers.MuonSGD:
    return engine.optimizers.MuonSGD(
        [{"params": [weight], "orthogonalize": True, "lr": 0.1, "momentum": 0.6, **group}], lr=1.0, momentum=0.9
    )


def steps(optimizer: engine.optimizers.MuonSGD, weight: torch.nn.Parameter, grads: list[torch.Tensor]) -> list[float]:
    norms = []
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
        norms.append(weight.detach().norm().item())
    return norms


def test_muon_renormalises_every_nth_step_and_decays_the_filters_between():
    grads = [torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    # norm about 3 x 5 x 12 = 180, not sqrt(16)
    start = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(9)) * 5
    every = torch.nn.Parameter(start.clone())
    assert all(abs(norm - 4) < 1 for norm in steps(muon(every), every, grads))  # renormalised to 4, then one small step
    third = torch.nn.Parameter(start.clone())
    norms = steps(muon(third, renorm_every=3), third, grads)
    # the 3rd step rescales
    assert norms[0] > 100 and norms[1] > 100 and abs(norms[2] - 4) < 1 and abs(norms[3] - 4) < 1
    plain, decayed = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    steps(muon(plain, renorm_every=3), plain, grads[:1])
    steps(muon(decayed, renorm_every=3, weight_decay=0.5), decayed, grads[:1])
    torch.testing.assert_close(decayed.detach(), plain.detach() * (1 - 0.1 * 0.5))  # lr x weight decay, after the step


def test_batched_newton_schulz_is_the_same_arithmetic_in_one_call_per_shape(monkeypatch):
    matrices = [
        torch.randn(*shape, generator=torch.Generator().manual_seed(k))
        for k, shape in enumerate([(8, 72), (16, 72), (8, 72), (72, 8)])
    ]
    alone = [engine.optimizers.orthogonalize(m, dtype=torch.float32) for m in matrices]
    calls = []
    real = engine.optimizers.orthogonalize
    monkeypatch.setattr(
        engine.optimizers, "orthogonalize", lambda x, **kw: calls.append(tuple(x.shape)) or real(x, **kw)
    )
    together = engine.optimizers.orthogonalize_each(matrices, torch.float32, batched=True)
    assert sorted(calls) == [(1, 16, 72), (1, 72, 8), (2, 8, 72)]  # the two 8 x 72 matrices in one call
    for one, other in zip(alone, together, strict=True):
        torch.testing.assert_close(one, other, rtol=1e-5, atol=1e-6)
    weights = {
        batched: [
            torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(k)))
            for k, shape in enumerate([(8, 8, 3, 3), (8, 8, 3, 3), (16, 8, 3, 3)])
        ]
        for batched in (False, True)
    }
    for batched, params in weights.items():
        optimizer = engine.optimizers.MuonSGD(
            [{"params": params, "orthogonalize": True, "lr": 0.1, "momentum": 0.6}],
            lr=1.0,
            momentum=0.9,
            newton_schulz_dtype=torch.float32,
            batched=batched,
        )
        for step in range(2):
            for k, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + k))
            optimizer.step()
    for one, other in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(one.detach(), other.detach(), rtol=1e-5, atol=1e-6)


def test_muon_counts_its_steps_across_a_resume_and_reads_older_checkpoints():
    grads = [torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    start = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(9)) * 5
    whole = torch.nn.Parameter(start.clone())
    steps(muon(whole, renorm_every=3), whole, grads)
    resumed = torch.nn.Parameter(start.clone())
    first = muon(resumed, renorm_every=3)
    steps(first, resumed, grads[:2])
    saved = first.state_dict()
    second = muon(resumed, renorm_every=3)
    second.load_state_dict(saved)
    steps(second, resumed, grads[2:])
    torch.testing.assert_close(resumed.detach(), whole.detach())  # the step count came back: the 3rd step renormalised
    del saved["param_groups"][0]["renorm_every"]  # a checkpoint from before the setting
    older = muon(torch.nn.Parameter(start.clone()), renorm_every=3)
    older.load_state_dict(saved)
    assert older.param_groups[0]["renorm_every"] == 1


def test_the_muon_flags_reach_the_optimiser_and_config_json_and_bad_values_are_one_line(
    monkeypatch, capsys, tmp_path, arrays
):
    data_dir = write_image_folder(tmp_path / "data", arrays)
    out = tmp_path / "run"
    code, _, err = run_command(
        modified_models,
        monkeypatch,
        capsys,
        "--model",
        "Airbench94_muon_narrow",
        "--data-dir",
        data_dir,
        "--muon-renorm-every",
        "0",
        "--out-dir",
        out,
    )
    assert (
        code == 2 and "argument --muon-renorm-every: must be a positive whole number, got 0" in err and not out.exists()
    )
    code, _, err = run_command(
        modified_models,
        monkeypatch,
        capsys,
        "--model",
        "Airbench94_muon_narrow",
        "--data-dir",
        data_dir,
        "--muon-weight-decay",
        "-1",
        "--out-dir",
        out,
    )
    assert code == 2 and "argument --muon-weight-decay:" in err and not out.exists()
    code, _, _ = run_command(
        modified_models,
        monkeypatch,
        capsys,
        "--model",
        "Airbench94_muon_narrow",
        "--data-dir",
        data_dir,
        "--width",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--muon-renorm-every",
        "8",
        "--muon-weight-decay",
        "2.2e-4",
        "--augment",
        "alternating-jitter",
        "--whiten-bias-epochs",
        "0.2",
        "--muon-batched",
        "--no-tsne",
        "--logger",
        "none",
        "--out-dir",
        out,
    )
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["muon_renorm_every"] == 8 and config["recipe"]["muon_weight_decay"] == 2.2e-4
    assert config["recipe"]["augment"] == "alternating-jitter" and config["model_options"]["whiten_bias_epochs"] == 0.2
    module = engine.ImageClassifier(
        AirbenchNet(width=8),
        engine.Recipe(**{**config["recipe"], "betas": tuple(config["recipe"]["betas"])}),
        seed=0,
        steps_per_epoch=4,
        parameter_groups=engine.model_spec("Airbench94_muon_narrow").parameter_groups,
    )
    optimizer = module.configure_optimizers()["optimizer"]
    filters = optimizer.param_groups[-1]
    assert (
        filters["orthogonalize"]
        and filters["renorm_every"] == 8
        and optimizer.batched
        and config["recipe"]["muon_batched"]
    )
    # --decoupled: per 1,024 examples
    assert filters["lr"] * filters["weight_decay"] == pytest.approx(2.2e-4 * 64 / 1024)


def test_the_benchmark_offers_each_hiverge_change_for_airbench_models_only(monkeypatch, capsys, tmp_path, split):
    def recipe_of(model):
        spec = engine.model_spec(model)
        return engine.RunConfig(model=model, model_options=spec.resolve(model, {}, "defaults"), recipe=spec.recipe)

    base, narrow = recipe_of("Airbench94_muon"), recipe_of("Airbench94_muon_narrow")
    assert list(bench_fast.hiverge_changes(base)) == list(bench_fast.HIVERGE_CHANGES)
    # adopted there
    assert set(bench_fast.HIVERGE_CHANGES) - set(bench_fast.hiverge_changes(narrow)) == {"stem bias learns 0.2 epochs"}
    changed = {name: bench_fast.apply_settings(base, settings) for name, settings in bench_fast.HIVERGE_CHANGES.items()}
    assert changed["brightness and contrast jitter"].recipe.augment == "alternating-jitter"
    assert changed["stem bias learns 0.2 epochs"].model_options["whiten_bias_epochs"] == 0.2
    assert changed["whitening from 960 images"].model_options["whiten_images"] == 960
    assert changed["filters renormalised every 8th step, decayed between"].recipe.muon_renorm_every == 8
    for name, config in changed.items():  # each changes only its own settings
        assert sum(getattr(config.recipe, f) != getattr(base.recipe, f) for f in vars(base.recipe)) + sum(
            config.model_options[k] != base.model_options[k] for k in base.model_options
        ) == len(bench_fast.HIVERGE_CHANGES[name]), name
    code = run_script(
        monkeypatch,
        bench_fast.main,
        "bench_fast.py",
        "--model",
        "FastVGG_narrow",
        "--hiverge",
        "--out-dir",
        str(tmp_path),
    )
    assert code == 2 and "not an airbench model" in capsys.readouterr().err


def test_selective_tta_looks_six_ways_at_the_least_confident_fifth_only():
    logits = torch.tensor(
        [
            [5.0, 0.0],
            [0.1, 0.0],
            [3.0, 0.0],
            [0.0, 0.2],
            [4.0, 0.0],
            [2.0, 0.0],
            [6.0, 0.0],
            [0.0, 7.0],
            [1.0, 0.0],
            [8.0, 0.0],
        ]
    )
    # a fifth of 10: the two closest calls
    assert engine.evaluation.least_confident(logits).nonzero().flatten().tolist() == [1, 3]
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)
    ).eval()
    images = torch.randn(20, 3, 8, 8)
    seen = []
    net.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    with torch.no_grad():
        plain = net(images)
        seen.clear()
        every = engine.tta_logits(net, images, plain, "flip-translate")
        assert seen == [20] * 5  # the mirror, and two shifts both ways
        seen.clear()
        selective = engine.tta_logits(net, images, plain, "selective")
    assert seen == [4] * 5  # the same views, of the four least confident images only
    # flip-translate's run gives the same scores free
    torch.testing.assert_close(selective["selective"], every["selective"])
    unsure = engine.evaluation.least_confident(plain)
    torch.testing.assert_close(selective["selective"][~unsure], plain[~unsure])
    torch.testing.assert_close(selective["selective"][unsure], every["flip-translate"][unsure])
    assert "selective" in engine.TTA_MODES and "selective" not in engine.tta_logits(net, images, plain, "flip")
