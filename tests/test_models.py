"""The README's models: shapes, sizes, gradients, learning, registry, comparison runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import conftest
import engine
import modified_models as mm
from main import CIFAR10Net


def conv(i, o, k):
    return i * o * k * k + o


def linear(i, o):
    return i * o + o


def bn(c):
    return 2 * c


EXPECTED_PARAMETERS = {
    "CIFAR10Net": conv(3, 20, 3)
    + bn(20)
    + conv(20, 40, 4)
    + bn(40)
    + linear(1440, 124)
    + bn(124)
    + linear(124, 64)
    + bn(64)
    + linear(64, 10),
    "CIFAR10Net_2": conv(3, 20, 3)
    + bn(20)
    + conv(20, 40, 4)
    + bn(40)
    + linear(1440, 32)
    + bn(32)
    + linear(32, 16)
    + bn(16)
    + linear(16, 10),
    "CIFAR10Net_3": conv(3, 20, 3) + bn(20) + conv(20, 40, 4) + bn(40) + linear(1440, 10),
    "CIFAR10Net_4": conv(3, 16, 5)
    + conv(16, 16, 5)
    + conv(16, 32, 3)
    + conv(32, 32, 3)
    + bn(16) * 2
    + bn(32) * 2
    + linear(512, 64)
    + bn(64)
    + linear(64, 32)
    + bn(32)
    + linear(32, 10),
    "CIFAR10Net_5": conv(3, 32, 3)
    + conv(32, 32, 3)
    + conv(32, 64, 3)
    + conv(64, 64, 3)
    + bn(32) * 2
    + bn(64) * 2
    + linear(1600, 32)
    + bn(32)
    + linear(32, 10),
    "CIFAR10Net_7": conv(3, 20, 3)
    + bn(20)
    + conv(20, 40, 4)
    + bn(40)
    + linear(1440, 124)
    + bn(124)
    + linear(124, 64)
    + bn(64)
    + linear(64, 10),
    "CIFAR10Net_optim": conv(3, 20, 3)
    + bn(20)
    + conv(20, 40, 4)
    + bn(40)
    + linear(1440, 128)
    + bn(128)
    + linear(128, 128)
    + bn(128)
    + linear(128, 10),
}
EXPECTED_PARAMETERS["CIFAR10Net_6"] = EXPECTED_PARAMETERS["CIFAR10Net_4"] + conv(3, 16, 9) + conv(16, 32, 5)


def fast_vgg(w0, w1, w2):
    def group(i, o):
        return i * o * 9 + bn(o) + o * o * 9 + bn(o)  # bias-free convolutions: BatchNorm follows each

    return conv(3, 24, 2) + bn(24) + group(24, w0) + group(w0, w1) + group(w1, w2) + w2 * 10


EXPECTED_PARAMETERS["FastVGG"] = fast_vgg(64, 256, 256)
EXPECTED_PARAMETERS["FastVGG_narrow"] = fast_vgg(32, 128, 128)
# the same, but its whitening stem has no BatchNorm
EXPECTED_PARAMETERS["Airbench94_muon"] = fast_vgg(64, 256, 256) - bn(24)
EXPECTED_PARAMETERS["Airbench94_muon_cpu"] = EXPECTED_PARAMETERS["Airbench94_muon"]
EXPECTED_PARAMETERS["Airbench94_muon_narrow"] = fast_vgg(32, 128, 128) - bn(24)


@pytest.mark.parametrize("name", list(mm.trained_here()))  # TransferNet: tests/test_transfer.py
def test_model_shapes_size_gradients(name):
    net = mm.MODELS[name].build()
    assert mm.parameter_count(net) == EXPECTED_PARAMETERS[name]
    x = torch.randn(6, 3, 32, 32)
    logits = net(x)
    assert logits.shape == (6, 10)
    assert mm.MODELS[name].build(num_classes=3)(x).shape == (6, 3)  # the last layer follows the classes
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    torch.testing.assert_close(net.classify(net.forward_features(x)), net(x))


@pytest.mark.parametrize("name", list(mm.trained_here()))
def test_model_overfits_a_tiny_batch(name):
    torch.manual_seed(0)
    net = mm.MODELS[name].build()
    x, y = torch.randn(20, 3, 32, 32), torch.arange(20) % 10
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
    net.eval()
    assert (net(x).argmax(1) == y).float().mean() >= 0.9


def test_penultimate_features_of_cifar10net_are_fc2_activations():
    net = CIFAR10Net().eval()
    x = torch.randn(4, 3, 32, 32)
    h = net.pool(net.relu(net.bn1(net.conv1(x))))
    h = torch.flatten(net.pool(net.relu(net.bn2(net.conv2(h)))), 1)
    h = net.relu(net.bnfc2(net.fc2(net.relu(net.bnfc1(net.fc1(h))))))
    torch.testing.assert_close(net.forward_features(x), h)


def test_readme_state_dict_loads_into_cifar10net_7():
    readme_names = ["conv1", "bn1", "conv2", "bn2", "fc1", "bnfc1", "fc2", "bnfc2", "fc3"]
    original = CIFAR10Net().state_dict()
    assert {key.split(".")[0] for key in original} == set(readme_names)
    net = mm.CIFAR10Net_7()
    net.load_state_dict(original)  # strict: every name matches
    assert torch.equal(net.fc1.weight, original["fc1.weight"])


def test_optim_model_carries_its_recipe():
    recipe = mm.MODELS["CIFAR10Net_optim"].recipe
    assert (recipe.lr, recipe.weight_decay, recipe.batch_size) == (0.00216, 0.000925, 128)
    assert mm.MODELS["CIFAR10Net_optim"].build().dropout.p == 0.46


def run_script(monkeypatch, *argv):
    return conftest.run_script(monkeypatch, mm.main, "modified_models.py", *argv)


def test_list_and_unknown_model(monkeypatch, capsys):
    assert run_script(monkeypatch, "--list") == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in mm.MODELS) and "201,230 parameters" in listing
    assert run_script(monkeypatch, "--model", "ResNet9000") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CIFAR10Net_optim" in err


def test_comparison_writes_table_and_figure_and_resumes(monkeypatch, capsys, tmp_path, split):
    monkeypatch.setattr(engine, "load_split", lambda config: split)
    flags = [
        "--models",
        "CIFAR10Net_2",
        "CIFAR10Net_3",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--augment",
        "none",
        "--no-tsne",
        "--no-progress",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path),
    ]
    trained = []
    original_train = engine.train
    monkeypatch.setattr(
        engine, "train", lambda config, net, **kw: trained.append(config.model) or original_train(config, net, **kw)
    )

    # Interrupted after the first model: its test.json exists, the second has only a checkpoint.
    assert run_script(monkeypatch, "--models", "CIFAR10Net_2", *flags[3:]) == 0
    assert run_script(monkeypatch, *flags) == 0
    assert trained == ["CIFAR10Net_2", "CIFAR10Net_3"]  # CIFAR10Net_2 was not trained again
    table = (tmp_path / "comparison.md").read_text()
    assert "CIFAR10Net_2" in table and "CIFAR10Net_3" in table and (tmp_path / "comparison.png").is_file()
    rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("model,parameters") and len(rows) == 3

    (tmp_path / "CIFAR10Net_3" / "test.json").unlink()  # killed before testing: resumes from last.ckpt
    assert run_script(monkeypatch, *flags) == 0
    assert trained[-1] == "CIFAR10Net_3" and "resuming" in capsys.readouterr().out
