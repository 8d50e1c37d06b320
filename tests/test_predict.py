"""Using a trained model: predict.py on the user's own images, evaluate.py on the test set, saved_models underneath."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import evaluate
import functions as fn
import predict
import saved_models
from conftest import (
    from_pil,
    png_header_claiming,
    quick_config,
    synthetic_arrays,
    to_pil,
    transfer_net,
    write_image_folder,
)
from conftest import run_command as run_script
from models.transfer import TransferNet


@dataclass
class TinyRun:
    """A CIFAR10Net trained 3 epochs on the synthetic data, and that data as an image-folder tree."""

    run_dir: Path
    split: engine.SplitData
    data_dir: Path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny-run")
    arrays = synthetic_arrays()
    split = engine.SplitData.from_arrays(arrays)
    config = quick_config(root, "CIFAR10Net", epochs=3, lr=3e-3)
    engine.train(config, engine.model_spec("CIFAR10Net"), data=split)
    return TinyRun(Path(config.out_dir), split, write_image_folder(root / "image-tree", arrays))


def trained_net(run_dir: Path, weights: str = "model.pth") -> torch.nn.Module:
    """The run's CIFAR10Net with the weights of ``weights``, loaded by hand (not through saved_models)."""
    state = torch.load(run_dir / weights, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = {key.removeprefix("net."): value for key, value in state["state_dict"].items()}
    net = engine.model_spec("CIFAR10Net").build()
    net.load_state_dict(state)
    return net.eval()


def card_normalisation(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    card = engine.read_json(run_dir / "model.json")
    return torch.tensor(card["mean"]), torch.tensor(card["std"])


def expected_probabilities(net, images: torch.Tensor, mean, std, tta: str = "none") -> torch.Tensor:
    """The model's own answer on its own tensors: engine.predict on the uint8 images, softmaxed."""
    return engine.predict(net, images, torch.zeros(len(images), dtype=torch.long), mean, std, tta=tta)[
        "logits"
    ].softmax(1)


@pytest.fixture
def photos(tmp_path, tiny_run) -> tuple[list[Path], torch.Tensor]:
    """Four test images as files, and the uint8 tensors the model should see for them: a 32x32 PNG, one enlarged to a
    64x64 PNG by nearest neighbour, one in grayscale ("L"; the model sees it as gray RGB) and a BMP."""
    images = tiny_run.split.test_images[:4]
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [folder / "a.png", folder / "b-64x64.png", folder / "c-gray.png", folder / "d.bmp"]
    to_pil(images[0]).save(paths[0])
    to_pil(images[1]).resize((64, 64), Image.Resampling.NEAREST).save(paths[1])
    gray = to_pil(images[2]).convert("L")
    gray.save(paths[2])
    to_pil(images[3]).save(paths[3])
    seen = torch.stack([images[0], images[1], from_pil(gray), images[3]])
    return paths, seen


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def csv_probabilities(rows: list[dict[str, str]], classes: tuple[str, ...]) -> torch.Tensor:
    """Every class's probability per row, from a CSV written with --top 10."""
    table = torch.zeros(len(rows), len(classes), dtype=torch.float64)
    for i, row in enumerate(rows):
        for rank in range(1, len(classes) + 1):
            table[i, classes.index(row[f"class_{rank}"])] = float(row[f"probability_{rank}"])
    return table


def report_of(net, split: engine.SplitData, mean=None, std=None, tta: str = "none") -> dict:
    """The report a run makes at its end, of ``net`` on ``split``'s test images (normalised by ``split``'s statistics
    unless ``mean`` and ``std`` are given)."""
    mean, std = (split.mean, split.std) if mean is None else (torch.as_tensor(mean), torch.as_tensor(std))
    test = engine.predict(net, split.test_images, split.test_labels, mean, std, tta=tta)
    return engine.test_report(test["labels"], test["logits"].argmax(1), split.classes)


def untrained(name: str, seed: int) -> torch.nn.Module:
    """A freshly initialised network: its answers are far from perfect, so a wrong normalisation, view or
    weight shows."""
    torch.manual_seed(seed)
    net = engine.model_spec(name).build()
    engine.model_spec(name).initialize(net, None, engine.model_spec(name).recipe)
    return net.eval()


# --------------------------------------------------------------------------------------------
# predict.py
# --------------------------------------------------------------------------------------------
def test_predict_answers_with_the_models_own_classes_and_probabilities(monkeypatch, capsys, tmp_path, tiny_run, photos):
    paths, seen = photos
    expected = expected_probabilities(trained_net(tiny_run.run_dir), seen, *card_normalisation(tiny_run.run_dir))
    code, out, err = run_script(
        predict,
        monkeypatch,
        capsys,
        "--run",
        tiny_run.run_dir,
        "--device",
        "cpu",
        "--top",
        10,
        "--csv",
        tmp_path / "out.csv",
        *paths,
    )
    assert (code, err) == (0, "")
    assert "resized to 32x32" in out
    rows = read_csv(tmp_path / "out.csv")
    assert [row["path"] for row in rows] == [str(path) for path in paths]
    got = csv_probabilities(rows, fn.CLASSES)
    assert torch.allclose(got, expected.double(), atol=2e-6)
    assert torch.allclose(got.sum(1), torch.ones(len(paths), dtype=torch.float64), atol=1e-5)
    # The printed lines: one per image, top class first, three classes by default.
    code, out, _ = run_script(predict, monkeypatch, capsys, "--run", tiny_run.run_dir, "--device", "cpu", *paths)
    lines = [line for line in out.splitlines() if line.startswith(str(paths[0].parent))]
    assert [line.split(": ")[1].split()[0] for line in lines] == [fn.CLASSES[i] for i in expected.argmax(1)]
    assert all(line.count("%") == 3 for line in lines)


def test_predict_with_test_time_augmentation_answers_as_predict_does_under_it(
    monkeypatch, capsys, tmp_path, tiny_run, photos
):
    paths, seen = photos
    net, normalisation = trained_net(tiny_run.run_dir), card_normalisation(tiny_run.run_dir)
    for tta in ("flip", "flip-translate"):
        code, out, err = run_script(
            predict,
            monkeypatch,
            capsys,
            "--run",
            tiny_run.run_dir,
            "--device",
            "cpu",
            "--top",
            10,
            "--tta",
            tta,
            "--csv",
            tmp_path / f"{tta}.csv",
            *paths,
        )
        assert code == 0 and f"{tta} test-time augmentation" in out
        got = csv_probabilities(read_csv(tmp_path / f"{tta}.csv"), fn.CLASSES)
        assert torch.allclose(got, expected_probabilities(net, seen, *normalisation, tta=tta).double(), atol=2e-6)
        # the views count
        assert not torch.allclose(got, expected_probabilities(net, seen, *normalisation).double(), atol=1e-4)


def test_a_folder_gives_its_images_by_suffix_and_its_sub_folders_only_when_recursive(
    monkeypatch, capsys, tmp_path, tiny_run, photos
):
    paths, _ = photos
    folder = paths[0].parent
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"not an image either")
    (folder / "more").mkdir()
    to_pil(tiny_run.split.test_images[9]).save(folder / "more" / "e.webp", lossless=True)
    code, _, err = run_script(
        predict, monkeypatch, capsys, "--run", tiny_run.run_dir, "--device", "cpu", "--csv", tmp_path / "f.csv", folder
    )
    assert (code, err) == (0, "")
    assert [row["path"] for row in read_csv(tmp_path / "f.csv")] == [str(path) for path in sorted(paths)]
    # paths[0] twice: predicted once
    code, _, err = run_script(
        predict,
        monkeypatch,
        capsys,
        "--run",
        tiny_run.run_dir,
        "--device",
        "cpu",
        "--recursive",
        "--csv",
        tmp_path / "r.csv",
        folder,
        paths[0],
    )
    assert (code, err) == (0, "")
    assert [row["path"] for row in read_csv(tmp_path / "r.csv")] == [
        str(path) for path in sorted([*paths, folder / "more" / "e.webp"])
    ]


def test_many_images_without_csv_print_a_summary_and_ask_for_csv(monkeypatch, capsys, tmp_path, tiny_run):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "many"
    folder.mkdir()
    for index, image in enumerate(tiny_run.split.test_images[: predict.PRINTED_IMAGES + 1]):
        to_pil(image).save(folder / f"{index:02d}.png")
    code, out, err = run_script(predict, monkeypatch, capsys, "--run", tiny_run.run_dir, "--device", "cpu", folder)
    assert (code, err) == (0, "")
    assert f"Top class of {predict.PRINTED_IMAGES + 1} images:" in out and "--csv FILE" in out
    assert str(folder / "00.png") not in out and not list(tmp_path.glob("*.csv"))  # no file the user did not ask for


@pytest.mark.parametrize("case", ["missing file", "folder without images"])
def test_a_path_that_gives_no_image_is_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path, tiny_run, case):
    folder = tmp_path / "photos"
    folder.mkdir()
    to_pil(tiny_run.split.test_images[0]).save(folder / "fine.png")
    bad = tmp_path / "nowhere.jpg"
    if case == "folder without images":
        bad = tmp_path / "empty"
        bad.mkdir()
        (bad / "readme.txt").write_text("no images here")
    monkeypatch.setattr(saved_models, "open_saved_model", lambda *args: pytest.fail("the model should not load"))
    code, out, err = run_script(
        predict, monkeypatch, capsys, "--run", tiny_run.run_dir, "--device", "cpu", folder / "fine.png", bad
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(bad) in err


def test_files_that_cannot_be_used_are_listed_after_the_predictions_of_the_others(
    monkeypatch, capsys, tmp_path, tiny_run
):
    """A truncated JPEG, a PNG over the pixel limit and a text file named on the command line, among good images: the
    good ones are predicted as if alone, each bad one is one line with its reason, and the exit status says the data had
    a problem."""
    folder = tmp_path / "holiday"
    folder.mkdir()
    images = tiny_run.split.test_images[:3]
    good = [folder / "a.jpg", folder / "b.png", folder / "d.jpg"]
    for path, image in zip(good, images, strict=True):
        to_pil(image).save(path, quality=95)
    truncated = folder / "c.jpg"
    truncated.write_bytes(good[0].read_bytes()[:500])
    too_large = folder / "e-large.png"
    to_pil(images[0]).resize((96, 96)).save(too_large)
    monkeypatch.setattr(engine.images, "MAX_DECODED_PIXELS", 64 * 64)
    text = tmp_path / "notes.txt"
    text.write_text("these are not pixels")
    code, out, err = run_script(
        predict,
        monkeypatch,
        capsys,
        "--run",
        tiny_run.run_dir,
        "--device",
        "cpu",
        "--top",
        10,
        "--csv",
        tmp_path / "out.csv",
        folder,
        text,
    )
    assert code == 2
    rows = read_csv(tmp_path / "out.csv")
    assert [row["path"] for row in rows] == [str(path) for path in good]
    seen = torch.stack([from_pil(Image.open(path)) for path in good])
    expected = expected_probabilities(trained_net(tiny_run.run_dir), seen, *card_normalisation(tiny_run.run_dir))
    assert torch.allclose(csv_probabilities(rows, fn.CLASSES), expected.double(), atol=2e-6)
    assert "3 images resized to 32x32" in out and all(str(path) in out for path in good)
    lines = err.splitlines()
    # Pillow's words
    assert lines[0].startswith(f"{truncated} cannot be read as an image (") and "truncated" in lines[0].lower()
    assert lines[1:] == [
        f"{too_large} is 96x96 pixels, more than the 4,096 the toolkit decodes (its bound on memory); shrink it first",
        f"{text} cannot be read as an image (not an image Pillow can decode); delete it or copy it again",
        "error: 3 of 6 images could not be used (listed above); 3 were predicted",
    ]


def test_a_png_of_121_million_pixels_is_refused_in_one_line_without_pillows_warning(tmp_path):
    """The shipped model, as a user runs it: the huge file is refused from its header,
    the other image still predicted."""
    huge = png_header_claiming(tmp_path / "huge.png", 11_000, 11_000)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo)
    done = subprocess.run(
        [sys.executable, predict.__file__, str(huge), str(photo)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and done.stdout.splitlines()[-1].startswith(f"{photo}: ")
    assert done.stderr.splitlines() == [
        f"{huge} is 11000x11000 pixels, more than the 33,554,432 the toolkit decodes (its bound on "
        "memory); shrink it first",
        "error: 1 of 2 images could not be used (listed above); 1 was predicted",
    ]


def test_a_missing_run_folder_is_one_line_naming_run(monkeypatch, capsys, tmp_path, photos):
    paths, _ = photos
    monkeypatch.setattr(predict, "DEFAULT_RUN", tmp_path / "pretrained" / "FastVGG_narrow")
    code, _, err = run_script(predict, monkeypatch, capsys, paths[0])  # the shipped model, not installed
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--run" in err and "FastVGG_narrow" in err
    code, _, err = run_script(predict, monkeypatch, capsys, "--run", tmp_path / "no-such-run", paths[0])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--run" in err and "no-such-run" in err


def test_a_checkpoint_alone_carries_its_model_card(monkeypatch, capsys, tmp_path, tiny_run, photos):
    paths, seen = photos
    expected = expected_probabilities(
        trained_net(tiny_run.run_dir, "best.ckpt"), seen, *card_normalisation(tiny_run.run_dir)
    )
    lonely = tmp_path / "elsewhere" / "best.ckpt"  # no model.json beside it: the card comes from the checkpoint
    lonely.parent.mkdir()
    lonely.write_bytes((tiny_run.run_dir / "best.ckpt").read_bytes())
    for flags in (("--checkpoint", lonely), ("--run", tiny_run.run_dir, "--checkpoint", "best.ckpt")):
        code, _, err = run_script(
            predict, monkeypatch, capsys, *flags, "--device", "cpu", "--top", 10, "--csv", tmp_path / "c.csv", *paths
        )
        assert (code, err) == (0, "")
        assert torch.allclose(csv_probabilities(read_csv(tmp_path / "c.csv"), fn.CLASSES), expected.double(), atol=2e-6)


def test_a_plain_state_dict_takes_the_datas_statistics_or_cifar10s_published_ones(
    monkeypatch, capsys, tmp_path, tiny_run, photos
):
    paths, seen = photos
    weights = tmp_path / "study" / "CIFAR10Net.pth"
    weights.parent.mkdir()
    torch.save(trained_net(tiny_run.run_dir).state_dict(), weights)
    code, _, err = run_script(predict, monkeypatch, capsys, "--checkpoint", weights, "--device", "cpu", paths[0])
    assert code == 2 and "--model" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_script(
        predict,
        monkeypatch,
        capsys,
        "--checkpoint",
        weights,
        "--model",
        "CIFAR10Net",
        "--data-dir",
        tmp_path / "no-data",
        "--device",
        "cpu",
        "--top",
        10,
        "--csv",
        tmp_path / "p.csv",
        *paths,
    )
    assert (code, err) == (0, "")
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    # said once; nothing downloaded
    assert len(notes) == 1 and "published" in notes[0] and not (tmp_path / "no-data").exists()
    official = torch.tensor(saved_models.OFFICIAL_MEAN), torch.tensor(saved_models.OFFICIAL_STD)
    expected = expected_probabilities(trained_net(tiny_run.run_dir), seen, *official)
    assert torch.allclose(csv_probabilities(read_csv(tmp_path / "p.csv"), fn.CLASSES), expected.double(), atol=2e-6)
    # With the data at hand, its training split's statistics, as training computes them; no note.
    code, out, err = run_script(
        predict,
        monkeypatch,
        capsys,
        "--checkpoint",
        weights,
        "--model",
        "CIFAR10Net",
        "--data-dir",
        tiny_run.data_dir,
        "--device",
        "cpu",
        "--top",
        10,
        "--csv",
        tmp_path / "d.csv",
        *paths,
    )
    assert (code, err) == (0, "") and "note:" not in out
    data = engine.load_split(engine.RunConfig(model="CIFAR10Net", data_dir=str(tiny_run.data_dir)))
    expected = expected_probabilities(trained_net(tiny_run.run_dir), seen, data.mean, data.std)
    assert torch.allclose(csv_probabilities(read_csv(tmp_path / "d.csv"), fn.CLASSES), expected.double(), atol=2e-6)


def test_an_old_transfer_learning_run_is_rebuilt_from_its_transfer_json(tmp_path):
    net = transfer_net().eval()
    run_dir = tmp_path / "resnet18-transfer-fc"
    run_dir.mkdir()
    torch.save(net.state_dict(), run_dir / "model.pth")
    card = {
        "model": "resnet18-transfer-fc",
        "classes": list(fn.CLASSES),
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "image_size": 32,
        "tta": "none",
    }
    engine.write_json(run_dir / "model.json", card)
    with pytest.raises(engine.UserError, match="resnet18-transfer-fc, which is not a registered model"):
        saved_models.open_saved_model(run=run_dir)
    engine.write_json(
        run_dir / "transfer.json", {"arch": "resnet18", "weights": "default", "image_size": 32, "finetune": "fc"}
    )
    saved = saved_models.open_saved_model(run=run_dir)
    assert isinstance(saved.net, TransferNet) and saved.card.mean == (0.485, 0.456, 0.406)
    assert all(torch.equal(value, net.state_dict()[key]) for key, value in saved.net.state_dict().items())


def test_a_card_that_disagrees_with_model_or_is_damaged_is_one_line(tmp_path, tiny_run):
    with pytest.raises(engine.UserError, match="not --model CIFAR10Net_7"):
        saved_models.open_saved_model(run=tiny_run.run_dir, model="CIFAR10Net_7")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.pth").write_bytes((tiny_run.run_dir / "model.pth").read_bytes())
    (copy / "model.json").write_text(
        '{"model": "CIFAR10Net", "classes": ["cat"], "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}'
    )
    with pytest.raises(engine.UserError, match="classes must be a list of at least 2 class names"):
        saved_models.open_saved_model(run=copy)


# --------------------------------------------------------------------------------------------
# evaluate.py
# --------------------------------------------------------------------------------------------
REPORT_KEYS = (
    "test_accuracy",
    "per_class_accuracy",
    "per_class",
    "macro_avg",
    "weighted_avg",
    "confusion_matrix",
    "num_test_images",
)


def test_evaluating_a_runs_model_pth_reproduces_its_test_json(monkeypatch, capsys, tiny_run):
    test_json = (tiny_run.run_dir / "test.json").read_bytes()
    code, out, err = run_script(
        evaluate, monkeypatch, capsys, "--run", tiny_run.run_dir, "--data-dir", tiny_run.data_dir, "--device", "cpu"
    )
    assert (code, err) == (0, "")
    evaluation = engine.read_json(tiny_run.run_dir / "evaluation-model.json")
    recorded = engine.read_json(tiny_run.run_dir / "test.json")
    assert {key: evaluation[key] for key in REPORT_KEYS} == {key: recorded[key] for key in REPORT_KEYS}
    assert (evaluation["model"], evaluation["tta"], evaluation["checkpoint"]) == (
        "CIFAR10Net",
        "none",
        str(tiny_run.run_dir / "model.pth"),
    )
    assert f"{recorded['test_accuracy']:.2%}" in out
    assert (tiny_run.run_dir / "evaluation-model-confusion.png").stat().st_size > 0
    assert (tiny_run.run_dir / "test.json").read_bytes() == test_json  # the run's own results untouched


def test_evaluating_a_mixed_precision_run_measures_at_its_precision_and_reproduces_its_test_json(
    monkeypatch, capsys, tmp_path
):
    """A bf16-mixed run tests under bf16 autocast; evaluate.py measures as it did by default (the card's precision),
    records the precision, and measures in float32 when asked."""
    arrays = synthetic_arrays()
    config = replace(quick_config(tmp_path, "CIFAR10Net", epochs=1), precision="bf16-mixed")
    engine.train(config, engine.model_spec("CIFAR10Net"), data=engine.SplitData.from_arrays(arrays))
    run_dir, tree = Path(config.out_dir), write_image_folder(tmp_path / "tree", arrays)
    assert engine.read_json(run_dir / "model.json")["precision"] == "bf16-mixed"
    real_predict, autocast_seen = engine.predict, []

    def predict_noting_autocast(*args, **kwargs):
        autocast_seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(engine, "predict", predict_noting_autocast)
    flags = ("--run", run_dir, "--data-dir", tree, "--device", "cpu")
    code, out, err = run_script(evaluate, monkeypatch, capsys, *flags)
    assert code == 0, err
    evaluation, recorded = (engine.read_json(run_dir / name) for name in ("evaluation-model.json", "test.json"))
    assert {key: evaluation[key] for key in REPORT_KEYS} == {key: recorded[key] for key in REPORT_KEYS}
    assert evaluation["precision"] == recorded["precision"] == "bf16-mixed" and "bf16-mixed precision" in out
    code, out, err = run_script(evaluate, monkeypatch, capsys, *flags, "--precision", "32-true")
    assert code == 0 and engine.read_json(run_dir / "evaluation-model.json")["precision"] == "32-true"
    assert autocast_seen == [torch.bfloat16, False]


def test_evaluate_normalises_by_the_model_card_not_by_the_data(monkeypatch, capsys, tmp_path, tiny_run):
    """A card's mean and std are what the network was trained with; here they are made far from the data's own."""
    copy = tmp_path / "run-copy"
    copy.mkdir()
    (copy / "model.pth").write_bytes((tiny_run.run_dir / "model.pth").read_bytes())
    card = {**engine.read_json(tiny_run.run_dir / "model.json"), "mean": [0.1, 0.6, 0.3], "std": [0.5, 0.2, 0.9]}
    engine.write_json(copy / "model.json", card)
    code, _, err = run_script(
        evaluate, monkeypatch, capsys, "--run", copy, "--data-dir", tiny_run.data_dir, "--device", "cpu"
    )
    assert (code, err) == (0, "")
    evaluation = {key: engine.read_json(copy / "evaluation-model.json")[key] for key in REPORT_KEYS}
    assert evaluation == report_of(trained_net(copy), tiny_run.split, card["mean"], card["std"])
    assert evaluation != report_of(trained_net(copy), tiny_run.split)  # so the check above tells the two apart


def test_evaluating_best_ckpt_reports_the_weights_it_holds(monkeypatch, capsys, tmp_path, tiny_run):
    """test.json measured model.pth, the final weights; best.ckpt holds the epoch of the lowest validation loss, the
    same weights only when that epoch was the last one. A checkpoint given other weights shows which ones are measured.
    """
    code, _, err = run_script(
        evaluate,
        monkeypatch,
        capsys,
        "--run",
        tiny_run.run_dir,
        "--checkpoint",
        "best.ckpt",
        "--data-dir",
        tiny_run.data_dir,
        "--device",
        "cpu",
        "--out-dir",
        tmp_path,
    )
    assert (code, err) == (0, "")
    assert not (tiny_run.run_dir / "evaluation-best.json").exists()  # --out-dir respected
    evaluation = {key: engine.read_json(tmp_path / "evaluation-best.json")[key] for key in REPORT_KEYS}
    best = trained_net(tiny_run.run_dir, "best.ckpt")
    assert evaluation == report_of(best, tiny_run.split)
    final = trained_net(tiny_run.run_dir).state_dict()
    recorded = engine.read_json(tiny_run.run_dir / "test.json")
    if all(torch.equal(value, final[key]) for key, value in best.state_dict().items()):  # the last epoch was the best
        assert evaluation == {key: recorded[key] for key in REPORT_KEYS}
    checkpoint = torch.load(tiny_run.run_dir / "best.ckpt", map_location="cpu", weights_only=True)
    other = untrained("CIFAR10Net", seed=5)
    checkpoint["state_dict"] = {f"net.{key}": value for key, value in other.state_dict().items()}
    torch.save(checkpoint, tmp_path / "other.ckpt")
    code, _, err = run_script(
        evaluate,
        monkeypatch,
        capsys,
        "--checkpoint",
        tmp_path / "other.ckpt",
        "--data-dir",
        tiny_run.data_dir,
        "--device",
        "cpu",
        "--out-dir",
        tmp_path,
    )
    assert (code, err) == (0, "")
    evaluation = {key: engine.read_json(tmp_path / "evaluation-other.json")[key] for key in REPORT_KEYS}
    assert evaluation == report_of(other, tiny_run.split) != {key: recorded[key] for key in REPORT_KEYS}


def test_a_plain_state_dict_with_model_evaluates_with_the_datas_statistics(monkeypatch, capsys, tmp_path, tiny_run):
    net = untrained("CIFAR10Net_7", seed=3)
    weights = tmp_path / "CIFAR10Net_7.pth"
    torch.save(net.state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_script(
        evaluate,
        monkeypatch,
        capsys,
        "--checkpoint",
        weights,
        "--model",
        "CIFAR10Net_7",
        "--data-dir",
        tiny_run.data_dir,
        "--device",
        "cpu",
    )
    assert (code, err) == (0, "")
    written = Path("runs/evaluations") / tmp_path.name / "evaluation-CIFAR10Net_7.json"  # weights outside a run folder
    assert str(written) in out and not (tmp_path / "evaluation-CIFAR10Net_7.json").exists()
    evaluation = {key: engine.read_json(tmp_path / written)[key] for key in REPORT_KEYS}
    # its statistics, as training's
    data = engine.load_split(engine.RunConfig(model="CIFAR10Net_7", data_dir=str(tiny_run.data_dir)))
    assert evaluation == report_of(net, data)
    # the data's, not CIFAR-10's
    assert evaluation != report_of(net, data, saved_models.OFFICIAL_MEAN, saved_models.OFFICIAL_STD)
    code, out, err = run_script(
        evaluate,
        monkeypatch,
        capsys,
        "--checkpoint",
        weights,
        "--model",
        "CIFAR10Net_7",
        "--tta",
        "flip",
        "--data-dir",
        tiny_run.data_dir,
        "--device",
        "cpu",
        "--out-dir",
        tmp_path / "flip",
    )
    assert (code, err) == (0, "") and "with flip test-time augmentation" in out
    evaluation = engine.read_json(tmp_path / "flip" / "evaluation-CIFAR10Net_7.json")
    assert evaluation["tta"] == "flip"
    assert {key: evaluation[key] for key in REPORT_KEYS} == report_of(net, data, tta="flip") != report_of(net, data)
    # (CIFAR10Net_7 has CIFAR10Net's very shapes: not a test of this)
    code, _, err = run_script(
        evaluate,
        monkeypatch,
        capsys,
        "--checkpoint",
        weights,
        "--model",
        "CIFAR10Net_2",
        "--data-dir",
        tiny_run.data_dir,
        "--device",
        "cpu",
    )
    assert code == 2 and "does not fit CIFAR10Net_2" in err and len(err.strip().splitlines()) == 1


def test_every_option_of_both_scripts_is_explained():
    for parser in (predict.build_parser(), evaluate.build_parser()):
        assert all(action.help for action in parser._actions), parser.prog
    assert "32x32" in predict.build_parser().format_help()


def test_the_shipped_model_answers_without_training(monkeypatch, capsys, tmp_path):
    card = json.loads((predict.DEFAULT_RUN / "model.json").read_text())
    assert (
        card["model"] == "FastVGG_narrow"
        and json.loads((predict.DEFAULT_RUN / "test.json").read_text())["test_accuracy"] > 0.85
    )
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo)
    monkeypatch.setattr(sys, "argv", ["predict.py", str(photo)])
    engine.run_cli(predict.main)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{photo}: ") and line.count("%") == 3


def test_evaluating_the_shipped_model_writes_nothing_into_the_repository(monkeypatch, capsys, tmp_path, tiny_run):
    before = sorted(path.name for path in predict.DEFAULT_RUN.iterdir())
    monkeypatch.chdir(tmp_path)
    code, out, err = run_script(
        evaluate, monkeypatch, capsys, "--run", predict.DEFAULT_RUN, "--data-dir", tiny_run.data_dir, "--device", "cpu"
    )
    assert (code, err) == (0, "")
    assert sorted(path.name for path in predict.DEFAULT_RUN.iterdir()) == before
    written = Path("runs/evaluations/FastVGG_narrow/evaluation-model.json")
    assert str(written) in out and engine.read_json(tmp_path / written)["per_class"]["cat"]["support"] == 10
