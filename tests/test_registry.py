"""A model is one class and one registry entry: its options, recipe, initialisation and parameter groups reach the
engine unchanged.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import engine
import main
import modified_models
import transfer_learning
from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
TOY_RECIPE = engine.Recipe(
    epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, augment="none"
)
INIT_SEED = 1234


class ToyNet(nn.Module):
    """A convolution, global pooling and a linear layer: the smallest network with conv and linear weights."""

    def __init__(self, toy_channels: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, toy_channels, 3, padding=1)
        self.fc = nn.Linear(toy_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))


def toy_initial_weights(channels: int = 16) -> dict[str, torch.Tensor]:
    """The toy's own initialisation, from its own generator: nothing like Kaiming-normal (all positive, small)."""
    generator = torch.Generator().manual_seed(INIT_SEED)
    shapes = {name: tensor.shape for name, tensor in ToyNet(channels).state_dict().items()}
    return {name: 0.01 + 0.02 * torch.rand(shape, generator=generator) for name, shape in shapes.items()}


def toy_initialize(net: ToyNet, data, recipe) -> None:
    with torch.no_grad():
        for name, tensor in toy_initial_weights(net.conv.out_channels).items():
            net.get_parameter(name).copy_(tensor)


def toy_parameter_groups(net: ToyNet, recipe: engine.Recipe) -> list[dict]:
    """Convolution weights at 3x the rate with no weight decay; biases at half the rate, decayed 10x; the rest as the
    recipe says.
    """
    return [
        {"params": [net.conv.weight], "lr": 3 * recipe.lr, "weight_decay": 0.0},
        {"params": [net.conv.bias, net.fc.bias], "lr": recipe.lr / 2, "weight_decay": 10 * recipe.weight_decay},
        {"params": [net.fc.weight]},
    ]


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setattr(engine.registry, "MODELS", dict(engine.MODELS))  # the registration stays in this test
    monkeypatch.setattr(engine, "MODELS", engine.registry.MODELS)
    monkeypatch.setattr(modified_models, "MODELS", engine.registry.MODELS)
    engine.register(
        "ToyNet",
        engine.ModelSpec(
            ToyNet,
            TOY_RECIPE,
            engine.first_line(ToyNet),
            initialize=toy_initialize,
            parameter_groups=toy_parameter_groups,
            options=(engine.ModelOption("toy_channels", int, 16, "the toy's filters", low=1, high=64),),
        ),
    )


def test_a_toy_model_trains_through_the_command_line_with_its_own_initialisation_and_groups(
    monkeypatch, capsys, tmp_path, arrays, toy_registered
):
    seen = {}

    def record_start(module):  # what the Trainer really starts from and optimises with
        seen["weights"] = {name: tensor.detach().clone() for name, tensor in module.net.state_dict().items()}
        seen["groups"] = [
            (group["lr"], group["weight_decay"], [id(p) for p in group["params"]])
            for group in module.trainer.optimizers[0].param_groups
        ]
        seen["ids"] = {name: id(parameter) for name, parameter in module.net.named_parameters()}

    monkeypatch.setattr(engine.ImageClassifier, "on_train_start", record_start)
    data_dir = write_image_folder(tmp_path / "data", arrays)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "modified_models.py",
            "--model",
            "ToyNet",
            "--toy-channels",
            "8",
            "--data-dir",
            str(data_dir),
            "--no-tsne",
            "--no-progress",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path / "run"),
        ],
    )
    engine.run_cli(modified_models.main)

    initial = toy_initial_weights(8)
    assert seen["weights"]["conv.weight"].shape == (8, 3, 3, 3)  # built with the option given
    assert seen["weights"].keys() == initial.keys()
    assert all(torch.equal(seen["weights"][name], initial[name]) for name in initial)  # not overwritten by Kaiming, say
    ids = seen["ids"]
    assert [params for _, _, params in seen["groups"]] == [
        [ids["conv.weight"]],
        [ids["conv.bias"], ids["fc.bias"]],
        [ids["fc.weight"]],
    ]
    assert [lr for lr, _, _ in seen["groups"]] == pytest.approx([0.15, 0.025, 0.05])
    assert [decay for _, decay, _ in seen["groups"]] == pytest.approx([0.0, 0.01, 1e-3])
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["model"] == "ToyNet" and config["recipe"]["optimizer"] == "sgd" and config["recipe"]["epochs"] == 2
    assert config["model_options"] == {"toy_channels": 8} == engine.read_json(tmp_path / "run/model.json")["options"]
    history = engine.read_metrics_csv(tmp_path / "run/metrics.csv")
    assert len(history) == 2 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert "ToyNet" in capsys.readouterr().out


def test_the_registry_lists_a_registered_model_with_its_description(monkeypatch, capsys, toy_registered):
    monkeypatch.setattr(sys, "argv", ["modified_models.py", "--list"])
    modified_models.main()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ToyNet"))
    assert (
        "618 parameters" in line
        and "A convolution, global pooling and a linear layer" in line
        and "Options: --toy-channels" in line
    )


def test_a_models_option_is_a_flag_only_of_the_scripts_that_train_it(monkeypatch, capsys, toy_registered):
    def help_text(script) -> str:  # every flag: a model's options are in --help-all where a script trains many models
        monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", "--help-all"])
        with pytest.raises(SystemExit):
            script.main()
        return capsys.readouterr().out

    assert "--toy-channels" in help_text(modified_models) and "--width" in help_text(modified_models)
    assert "--toy-channels" not in help_text(transfer_learning) and "--width" not in help_text(transfer_learning)
    assert "--toy-channels" not in help_text(main) and "--fc1-size" in help_text(main)
    assert "--arch" in help_text(transfer_learning) and "--arch" not in help_text(modified_models)


@pytest.mark.parametrize(
    "value, message",
    [("0", "must be a whole number from 1 to 64, got 0"), ("x", "must be a whole number from 1 to 64, got x")],
)
def test_a_bad_option_value_is_argparses_one_line(monkeypatch, capsys, tmp_path, toy_registered, value, message):
    monkeypatch.setattr(
        sys,
        "argv",
        ["modified_models.py", "--model", "ToyNet", "--toy-channels", value, "--out-dir", str(tmp_path / "run")],
    )
    with pytest.raises(SystemExit) as exit_info:
        modified_models.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_an_option_value_from_a_file_is_checked_like_a_flag(toy_registered):
    spec = engine.model_spec("ToyNet")
    assert spec.resolve("ToyNet", {}, "x") == {"toy_channels": 16}
    for bad in (0, 65, 8.0, "8", True, None):
        with pytest.raises(engine.UserError, match="toy_channels = .* for ToyNet must be a whole number from 1 to 64"):
            spec.build({"toy_channels": bad}, name="ToyNet", source="some.json")
    with pytest.raises(
        engine.UserError, match="some.json: width is not an option of ToyNet \\(its options: toy_channels\\)"
    ):
        spec.build({"width": 8}, name="ToyNet", source="some.json")


def test_the_study_models_start_kaiming_normal_and_train_in_one_group(split, tmp_path):
    spec = engine.model_spec("CIFAR10Net")
    net = spec.build()
    spec.initialize(net, None, spec.recipe)
    assert all(
        not bias.any() for name, bias in net.named_parameters() if name.endswith("bias") and not name.startswith("bn")
    )
    # Kaiming: gain sqrt(2), fan-in
    assert net.fc1.weight.std().item() == pytest.approx((2 / net.fc1.in_features) ** 0.5, rel=0.1)
    groups = spec.parameter_groups(net, spec.recipe)
    assert (
        len(groups) == 1 and len(groups[0]["params"]) == len(list(net.parameters())) and groups[0].keys() == {"params"}
    )


def test_an_unknown_model_names_the_registered_ones():
    with pytest.raises(engine.UserError, match="unknown model 'ResNet9000'; choose one of: CIFAR10Net, "):
        engine.model_spec("ResNet9000")
    assert replace(engine.model_spec("CIFAR10Net_7"), recipe=TOY_RECIPE).recipe is TOY_RECIPE


def test_the_readmes_extending_example_registers_a_model_that_trains(monkeypatch, tmp_path, split):
    readme = (REPO / "README.md").read_text()
    example = readme.split("## Extending", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr(engine.registry, "MODELS", dict(engine.MODELS))  # the example's registration stays in this test
    monkeypatch.setattr(engine, "MODELS", engine.registry.MODELS)
    exec(compile(example, "README.md", "exec"), {})
    spec = engine.model_spec("TinyNet")
    net = spec.build()
    groups = spec.parameter_groups(net, spec.recipe)
    assert [len(group["params"]) for group in groups] == [2, 2] and groups[1]["weight_decay"] == 0.0
    options = spec.resolve("TinyNet", {"channels": 8}, "the test")
    assert spec.build(options).conv.out_channels == 8 and spec.build(num_classes=4).fc.out_features == 4
    config = engine.RunConfig(
        model="TinyNet",
        model_options=options,
        recipe=replace(spec.recipe, epochs=2, augment="none"),
        out_dir=str(tmp_path / "run"),
        progress=False,
        analyses={"tsne": False},
        device="cpu",
    )
    report = engine.train(config, spec, data=split)
    history = engine.read_metrics_csv(tmp_path / "run/metrics.csv")
    assert history[-1]["train_loss"] < history[0]["train_loss"] and report["num_test_images"] == len(split.test_labels)
