"""The t-SNE analysis: penultimate features, one class -> colour map, black edges, files, redraw, CLI errors."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import threadpoolctl
import torch
from PIL import Image
from torch import nn

import engine
import functions as fn
import saved_models
import tsne
from analyses import embedding as tsne_embedding
from conftest import quick_config
from engine import UserError
from modified_models import MODELS, CIFAR10Net_2, CIFAR10Net_7, ModelSpec


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread for these tiny t-SNEs: on shared cores, every step's hand-over between two threads waits
    for a busy core, which costs more than the work (a 60-point t-SNE: 14 s against 0.5 s)."""
    monkeypatch.setattr(tsne_embedding, "N_JOBS", 1)
    with threadpoolctl.threadpool_limits(1):
        yield


def tsne_config(tmp_path: Path, method: str = "sklearn", samples: int | None = 60) -> engine.RunConfig:
    return engine.RunConfig(
        model="CIFAR10Net_7",
        out_dir=str(tmp_path),
        device="cpu",
        analyses={"tsne_samples": samples, "tsne_method": method},
    )


def run_cli(monkeypatch, *argv) -> int:
    """tsne.py's command line in this process: its exit status."""
    monkeypatch.setattr(sys, "argv", ["tsne.py", *map(str, argv)])
    try:
        engine.run_cli(tsne.main)
    except SystemExit as exit:
        return exit.code
    return 0


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def hand_made_embedding() -> tsne_embedding.Embedding:
    """40 points, 4 of them misclassified; class 7 is predicted both rightly (point 7) and wrongly (point 3)."""
    labels = np.arange(40) % 10
    predictions = labels.copy()
    predictions[[3, 14, 25, 36]] = [7, 7, 0, 9]
    points = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    return tsne_embedding.Embedding(
        points, labels, predictions, np.arange(40), fn.CLASSES, "CIFAR10Net_7", "test", "sklearn"
    )


def scatter_layers(figure) -> dict:
    """The figure's two PathCollections by gid: "correct" and "misclassified"."""
    return {collection.get_gid(): collection for collection in figure.axes[0].collections}


def dpi_of(path: Path) -> tuple[float, float]:
    with Image.open(path) as image:
        return image.info["dpi"]


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------
def test_features_are_the_penultimate_activations(split):
    torch.manual_seed(0)
    net = CIFAR10Net_7()  # dropout 0.5: features must come from eval mode
    with torch.no_grad():
        for _ in range(3):  # moves the BatchNorm running statistics off their defaults, so eval mode shows
            net(torch.randn(16, 3, 32, 32))
    predicted = tsne.split_predictions(net, split, "test")

    net.eval()
    images = fn.normalize(split.test_images.float() / 255, split.mean, split.std)
    with torch.no_grad():
        x = net.pool(net.relu(net.bn1(net.conv1(images))))
        x = net.pool(net.relu(net.bn2(net.conv2(x)))).flatten(1)
        x = net.relu(net.bnfc1(net.fc1(x)))
        expected = net.relu(net.bnfc2(net.fc2(x)))
        torch.testing.assert_close(predicted["features"], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(predicted["logits"], net.fc3(expected), atol=1e-4, rtol=1e-4)
    assert torch.equal(predicted["labels"], split.test_labels)
    assert len(tsne.split_predictions(net, split, "train")["features"]) == len(split.train_labels)


def test_stratified_sample_keeps_each_class_share_and_follows_the_seed():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    index = tsne_embedding.stratified_sample(labels, 100, seed=3)
    assert np.bincount(labels[index]).tolist() == [60, 30, 10]
    assert np.array_equal(index, np.unique(index))  # sorted, no repeats
    assert np.array_equal(index, tsne_embedding.stratified_sample(labels, 100, seed=3))
    assert not np.array_equal(index, tsne_embedding.stratified_sample(labels, 100, seed=4))
    assert np.array_equal(tsne_embedding.stratified_sample(labels, None, seed=3), np.arange(1000))


# --------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------
def test_class_colours_are_tab10_by_class_label():
    # airplane tab:blue, automobile tab:orange, bird tab:green, cat tab:red, ... truck tab:cyan
    tab10 = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    assert np.allclose(tsne_embedding.class_colours(10), [matplotlib.colors.to_rgba(colour) for colour in tab10])


def test_both_layers_colour_every_point_by_its_predicted_class_from_one_map():
    e = hand_made_embedding()
    colours = tsne_embedding.class_colours(10)
    figure = tsne_embedding.draw_embedding(e)
    layers = scatter_layers(figure)
    for gid, chosen in (("correct", e.correct), ("misclassified", ~e.correct)):
        assert 7 in e.predictions[chosen]  # the same class in both layers
        np.testing.assert_allclose(layers[gid].get_offsets(), e.points[chosen])
        np.testing.assert_allclose(layers[gid].get_facecolors(), colours[e.predictions[chosen]])
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [*fn.CLASSES, "misclassified"]
    for label, handle in enumerate(legend.legend_handles[:10]):
        assert np.allclose(matplotlib.colors.to_rgba(handle.get_markerfacecolor()), colours[label])
    plt.close(figure)


def test_black_edge_exactly_on_misclassified_points():
    e = hand_made_embedding()
    figure = tsne_embedding.draw_embedding(e)
    layers = scatter_layers(figure)
    wrong = layers["misclassified"]
    np.testing.assert_allclose(wrong.get_offsets(), e.points[[3, 14, 25, 36]])
    assert np.allclose(wrong.get_edgecolors(), [0, 0, 0, 1]) and min(wrong.get_linewidths()) > 0
    right = layers["correct"]
    assert len(right.get_offsets()) == 36
    assert len(right.get_edgecolors()) == 0 or max(right.get_linewidths()) == 0
    assert "CIFAR10Net_7" in figure.axes[0].get_title() and "test" in figure.axes[0].get_title()
    plt.close(figure)


# --------------------------------------------------------------------------------------------
# A run's analysis and the saved files
# --------------------------------------------------------------------------------------------
# openTSNE's train split: the CLI test
@pytest.mark.parametrize("method, splits", [("sklearn", ("test", "train")), ("opentsne", ("test",))])
def test_small_run_writes_figures_embeddings_and_numbers(tmp_path, split, method, splits, capsys):
    net = CIFAR10Net_7().eval()
    test = tsne.split_predictions(net, split, "test")
    reports = tsne.analyse_run(net, split, test, tmp_path, tsne_config(tmp_path, method), splits=splits)

    for name in splits:
        labels = split.test_labels if name == "test" else split.train_labels
        with np.load(tmp_path / f"tsne_{name}.npz", allow_pickle=False) as saved:
            assert saved["embedding"].shape == (60, 2) and np.isfinite(saved["embedding"]).all()
            assert np.array_equal(saved["labels"], labels.numpy()[saved["indices"]])
            assert np.array_equal(saved["correct"], saved["labels"] == saved["predictions"])
            assert tuple(saved["classes"]) == fn.CLASSES
            assert (str(saved["model"]), str(saved["split"]), str(saved["method"])) == ("CIFAR10Net_7", name, method)
            if name == "test":  # 10 of each class in the synthetic test split
                assert np.bincount(saved["labels"]).tolist() == [6] * 10
        assert dpi_of(tmp_path / f"tsne_{name}.png") == pytest.approx((300, 300), abs=0.1)
        assert -1 <= reports[name]["silhouette_true_class_2d"] <= 1 and 0 <= reports[name]["knn_accuracy_features"] <= 1
    assert engine.read_json(tmp_path / "tsne_metrics.json") == reports
    assert "silhouette" in capsys.readouterr().out


def test_a_training_run_ends_with_the_analysis(tmp_path, split):
    config = replace(
        quick_config(tmp_path, model="CIFAR10Net_7", epochs=1),
        analyses={"tsne": True, "tsne_samples": 40, "tsne_method": "sklearn"},
    )
    engine.train(config, MODELS["CIFAR10Net_7"], data=split, analyses=tsne.analyses(config))
    run_dir = Path(config.out_dir)
    assert {"tsne_test.png", "tsne_test.npz", "tsne_train.png", "tsne_train.npz", "tsne_metrics.json"} <= {
        p.name for p in run_dir.iterdir()
    }


def test_too_few_points_for_the_perplexity_is_a_user_error(tmp_path, split):
    with pytest.raises(UserError, match="perplexity 30"):
        tsne.analyse_run(CIFAR10Net_7(), split, None, tmp_path, tsne_config(tmp_path, samples=30))
    assert not list(tmp_path.iterdir())


def test_redraw_from_the_saved_npz(tmp_path, monkeypatch):
    e = hand_made_embedding()
    tsne_embedding.save_embedding(e, tmp_path / "tsne_test.npz")
    loaded = tsne_embedding.load_embedding(tmp_path / "tsne_test.npz")
    for field in ("points", "labels", "predictions", "indices"):
        assert np.array_equal(getattr(loaded, field), getattr(e, field))
    assert (loaded.classes, loaded.model, loaded.split, loaded.method) == (e.classes, e.model, e.split, e.method)

    assert run_cli(monkeypatch, "--redraw", tmp_path / "tsne_test.npz") == 0
    assert dpi_of(tmp_path / "tsne_test.png") == pytest.approx((300, 300), abs=0.1)


def test_redraw_of_a_foreign_file_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.npz").write_text("not a t-SNE file")
    assert run_cli(monkeypatch, "--redraw", tmp_path / "notes.npz") == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "not a t-SNE file" in lines[0]


# --------------------------------------------------------------------------------------------
# Command line: checkpoints and models
# --------------------------------------------------------------------------------------------
def test_cli_embeds_the_splits_asked_for_from_a_checkpoint(tmp_path, monkeypatch, image_folder):
    torch.save(CIFAR10Net_7().state_dict(), tmp_path / "model.pth")
    status = run_cli(
        monkeypatch,
        "--model",
        "CIFAR10Net_7",
        "--checkpoint",
        tmp_path / "model.pth",
        "--data-dir",
        image_folder,
        "--splits",
        "train",
        "--tsne-samples",
        40,
        "--tsne-method",
        "opentsne",
        "--out-dir",
        tmp_path / "out",
    )
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "tsne_metrics.json",
        "tsne_train.npz",
        "tsne_train.png",
    ]


def test_lightning_checkpoint_loads_with_its_net_prefix(tmp_path):
    trained = CIFAR10Net_7()
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()}, "epoch": 1}, tmp_path / "last.ckpt"
    )
    loaded = saved_models.open_saved_model(checkpoint=tmp_path / "last.ckpt", model="CIFAR10Net_7").net
    assert not loaded.training
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_checkpoint_of_another_model_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    torch.save(CIFAR10Net_2().state_dict(), tmp_path / "model.pth")
    status = run_cli(
        monkeypatch,
        "--model",
        "CIFAR10Net_7",
        "--checkpoint",
        tmp_path / "model.pth",
        "--data-dir",
        tmp_path / "no-data",
    )
    lines = error_lines(capsys)
    assert status == 2 and len(lines) == 1
    assert "does not fit CIFAR10Net_7" in lines[0] and "wrong shape fc1.weight (32, 1440) for (124, 1440)" in lines[0]


def test_lightning_checkpoint_of_another_model_names_it(tmp_path, monkeypatch, capsys):
    state = {f"net.{k}": v for k, v in CIFAR10Net_2().state_dict().items()}
    torch.save({"state_dict": state, "run_config": {"model": "CIFAR10Net_2"}}, tmp_path / "last.ckpt")
    assert run_cli(monkeypatch, "--model", "CIFAR10Net_3", "--checkpoint", tmp_path / "last.ckpt") == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "trained as CIFAR10Net_2" in lines[0] and "unexpected" in lines[0]


@pytest.mark.parametrize(
    "model, message", [("ResNet50", "ResNet50, which is not a registered model"), ("Plain", "no forward_features")]
)
def test_unusable_model_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, model, message):
    monkeypatch.setitem(
        MODELS,
        "Plain",
        ModelSpec(lambda num_classes: nn.Linear(3, num_classes), engine.Recipe(), "no penultimate layer"),
    )
    torch.save((nn.Linear(3, 10) if model == "Plain" else CIFAR10Net_7()).state_dict(), tmp_path / "model.pth")
    assert run_cli(monkeypatch, "--model", model, "--checkpoint", tmp_path / "model.pth") == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and message in lines[0]


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, "--model", "CIFAR10Net_7", "--checkpoint", tmp_path / "missing.pth") == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "does not exist" in lines[0]


def test_help_explains_every_option():
    parser = tsne.build_parser()
    assert all(action.help for action in parser._actions)
    text = parser.format_help()
    for option in (
        "--run",
        "--model",
        "--checkpoint",
        "--data-dir",
        "--device",
        "--seed",
        "--splits",
        "--tsne-samples",
        "--tsne-method",
        "--out-dir",
        "--redraw",
    ):
        assert option in text


def test_a_short_run_embeds_a_sample_as_large_as_its_training_is_worth(split):
    """Without --tsne-samples: a 1-epoch run on the synthetic split (270 images) embeds at least MIN_SAMPLES points,
    which is all of them; a longer run on 3,000 images, one point per 6 images trained on; --tsne-samples wins."""
    short = quick_config(Path("unused"), "CIFAR10Net_7", epochs=1)
    assert tsne.samples(short, split) is None  # the minimum covers every point
    many = replace(split, train_labels=torch.zeros(3000, dtype=torch.long), test_labels=torch.zeros(10_000))
    assert tsne.samples(replace(short, recipe=replace(short.recipe, epochs=2)), many) == 1000
    assert tsne.samples(replace(short, recipe=replace(short.recipe, epochs=5)), many) == 2500
    assert tsne.samples(replace(short, recipe=replace(short.recipe, epochs=100)), many) is None
    assert tsne.samples(replace(short, analyses={"tsne_samples": 40}), many) == 40
