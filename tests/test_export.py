"""export.py: the exported file answers as predict.py does, for a trained run and for every registered architecture."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import pytest
import torch
from torch import nn

import engine
import export
import functions as fn
import predict
import saved_models
from conftest import quick_config, run_command, synthetic_arrays, synthetic_images

TOLERANCE = 1e-4
CPU = torch.device("cpu")
TRANSFER_OPTIONS = {"arch": "resnet18", "weights": "none", "image_size": 32}  # small and offline
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A CIFAR10Net trained for an epoch on the synthetic data: model.pth, model.json, best.ckpt, config.json."""
    config = quick_config(tmp_path_factory.mktemp("tiny-run"), "CIFAR10Net", epochs=1)
    engine.train(config, engine.model_spec("CIFAR10Net"), data=engine.SplitData.from_arrays(synthetic_arrays()))
    return Path(config.out_dir)


def onnx_probabilities(path: Path, images: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["probabilities"], {"images": images.numpy()})[0])


def predict_probabilities(run: Path, images: torch.Tensor, tta: str, checkpoint: str | None = None) -> torch.Tensor:
    """predict.py's answer: the model loaded as predict.py loads it, through its ``probabilities``."""
    saved = saved_models.open_saved_model(run, checkpoint)
    return predict.probabilities(saved, saved.card, images, tta, CPU)


def random_network(name: str, options: dict, images: torch.Tensor) -> nn.Module:
    """``name``'s network with random weights, its head scaled so its answers on ``images`` are far from uniform: as
    built, some (FastVGG, Airbench94_muon) answer about 0.1 for every class, which any normalisation or view would
    match."""
    torch.manual_seed(0)
    net = engine.model_spec(name).build(options).eval()
    with torch.no_grad():
        head = [module for module in net.modules() if isinstance(module, nn.Linear)][-1]
        head.weight.mul_(3 / net(fn.model_input(images, torch.tensor(MEAN), torch.tensor(STD))).std())
    return net


def saved_run(folder: Path, name: str, options: dict, net: nn.Module) -> Path:
    """A run-like folder: model.pth and the model.json card a run writes."""
    folder.mkdir()
    torch.save(net.state_dict(), folder / "model.pth")
    card = engine.ModelCard(name, fn.CLASSES, MEAN, STD, options=options)
    engine.write_json(folder / "model.json", card.to_dict())
    return folder


def test_the_exported_run_answers_as_predict_py(monkeypatch, capsys, tiny_run):
    images = synthetic_images(6, seed=5)[0]
    answers = {}
    for tta in ("none", "flip"):
        code, out, err = run_command(export, monkeypatch, capsys, "--run", tiny_run, "--tta", tta)
        assert (code, err) == (0, ""), err
        exported = tiny_run / "model.onnx"  # the user's run folder (config.json, writable): beside the weights
        assert out.startswith(f"Wrote {exported} and {exported}.json")
        answers[tta] = onnx_probabilities(exported, images)
        assert (answers[tta] - predict_probabilities(tiny_run, images, tta)).abs().max() <= TOLERANCE
        assert (onnx_probabilities(exported, images[:1]) - answers[tta][:1]).abs().max() <= TOLERANCE  # any batch size
        described = engine.read_json(Path(f"{exported}.json"))
        card = engine.ModelCard.from_dict(described, "the export's JSON")
        assert card == engine.ModelCard.from_dict(
            {**engine.read_json(tiny_run / "model.json"), "tta": tta}, "model.json"
        )
        assert described["input"]["shape"] == ["N", 3, 32, 32] and described["input"]["dtype"] == "uint8"
        assert described["output"]["name"] == "probabilities"
    assert (answers["none"] - answers["flip"]).abs().max() > 100 * TOLERANCE  # the flip is inside the file


def test_a_checkpoint_exports_as_pt2_and_outside_a_users_run_under_runs_exports(
    monkeypatch, capsys, tmp_path, tiny_run
):
    copy = tmp_path / "copied-run"  # no config.json: not a run folder of the user's
    copy.mkdir()
    (copy / "best.ckpt").write_bytes((tiny_run / "best.ckpt").read_bytes())
    monkeypatch.chdir(tmp_path)
    code, out, err = run_command(
        export, monkeypatch, capsys, "--run", copy, "--checkpoint", "best.ckpt", "--format", "pt2"
    )
    assert (code, err) == (0, ""), err
    exported = Path("runs/exports/copied-run/best.pt2")
    images = synthetic_images(4, seed=6)[0]
    card_tta = engine.read_json(tiny_run / "model.json")["tta"]  # the default: the card's own
    assert engine.read_json(Path(f"{exported}.json"))["tta"] == card_tta
    answers = torch.export.load(exported).module()(images)
    assert (answers - predict_probabilities(copy, images, card_tta, "best.ckpt")).abs().max() <= TOLERANCE
    assert sorted(path.name for path in copy.iterdir()) == ["best.ckpt"]


@pytest.mark.parametrize("name", list(engine.MODELS))
def test_every_architecture_exports_with_predict_pys_answers(name, tmp_path):
    images = synthetic_images(4, seed=7)[0]
    options = TRANSFER_OPTIONS if name == "TransferNet" else {}
    run = saved_run(tmp_path / name, name, options, random_network(name, options, images))
    saved = saved_models.open_saved_model(run)
    for tta in ("none", "flip"):
        out = tmp_path / f"{name}-{tta}.onnx"
        export.export(saved, tta, "onnx", out)
        assert (onnx_probabilities(out, images) - predict_probabilities(run, images, tta)).abs().max() <= TOLERANCE


def test_mistakes_are_one_line_before_anything_is_written(monkeypatch, capsys, tmp_path, tiny_run):
    no_card = tmp_path / "no-card"
    no_card.mkdir()
    (no_card / "model.pth").write_bytes((tiny_run / "model.pth").read_bytes())
    (tmp_path / "a-file").write_text("")
    for argv, message in [
        (["--run", tiny_run, "--tta", "flip-translate"], "--tta flip-translate is not offered for export"),
        (["--run", no_card], f"{no_card / 'model.pth'} has no model card"),
        (["--run", tiny_run, "--out", tmp_path / "a-file" / "model.onnx"], "cannot write"),
        (["--run", tiny_run, "--out", tmp_path], "is a folder; give a file name"),
    ]:
        code, out, err = run_command(export, monkeypatch, capsys, *argv)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(path.name for path in no_card.iterdir()) == ["model.pth"]
