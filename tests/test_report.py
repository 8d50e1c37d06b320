"""What a network learned (visualize.py) and report.html: the figures, the page, and the page in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.image import imread
from torch import nn

import engine
import engine.plots
import visualize
from analyses.report import ReportAnalysis, write_report
from conftest import quick_config, run_command, synthetic_arrays, write_image_folder

REPO = Path(__file__).resolve().parents[1]
VISUAL_FIGURES = set(visualize.FIGURES)
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's own checks start it: no network, no first-run pages, a profile of its own.
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Appended to a copy of the page by the browser test only: the report itself has no script.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0).length;
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = `images ${loaded} of ${images.length} loaded`;
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A CIFAR10Net run on the synthetic data, with its report; and the image tree it trained on."""
    root = tmp_path_factory.mktemp("report")
    arrays = synthetic_arrays()
    config = quick_config(root, "CIFAR10Net", epochs=2)
    engine.train(
        config, engine.model_spec("CIFAR10Net"), data=engine.SplitData.from_arrays(arrays), analyses=[ReportAnalysis()]
    )
    return Path(config.out_dir), write_image_folder(root / "tree", arrays)


def embedded_images(page: str) -> int:
    return len(re.findall(r'<img src="data:image/png;base64,', page))


def test_a_run_ends_with_a_self_contained_report_of_its_results(trained):
    run_dir, _ = trained
    page = (run_dir / "report.html").read_text()
    test = engine.read_json(run_dir / "test.json")
    assert f"{test['test_accuracy']:.2%}" in page and all(name in page for name in test["per_class"])
    assert embedded_images(page) == 2  # the curves and the confusion matrix, inside the page
    assert "--no-tsne" in page  # what is missing says why
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page  # nothing to fetch, nothing to run


def test_visualize_draws_every_figure_and_adds_them_to_the_runs_report(trained, monkeypatch, capsys):
    run_dir, tree = trained
    code, out, err = run_command(
        visualize, monkeypatch, capsys, "--run", run_dir, "--data-dir", tree, "--device", "cpu"
    )
    assert (code, err) == (0, ""), err
    assert {path.name for path in run_dir.glob("visual_*.png")} == VISUAL_FIGURES
    index = engine.read_json(run_dir / "visualize.json")
    assert set(index["figures"]) == VISUAL_FIGURES and index["notes"] == {}
    assert embedded_images((run_dir / "report.html").read_text()) == 2 + len(VISUAL_FIGURES)


def test_the_shipped_model_is_visualized_outside_the_repository(trained, tmp_path, monkeypatch, capsys):
    _, tree = trained
    before = sorted(path.name for path in (REPO / "pretrained/FastVGG_narrow").iterdir())
    monkeypatch.chdir(tmp_path)
    code, out, err = run_command(
        visualize, monkeypatch, capsys, "--run", REPO / "pretrained/FastVGG_narrow", "--data-dir", tree
    )
    assert (code, err) == (0, ""), err
    written = tmp_path / "runs/evaluations/FastVGG_narrow"
    assert {path.name for path in written.glob("visual_*.png")} == VISUAL_FIGURES
    assert "FastVGG_narrow" in (written / "report.html").read_text()
    assert sorted(path.name for path in (REPO / "pretrained/FastVGG_narrow").iterdir()) == before


class NoFeatures(nn.Module):
    """A network without forward_features: no nearest neighbours, every other figure."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_model_without_features_gets_a_note_for_the_figures_it_cannot_have(tmp_path, monkeypatch, capsys):
    spec = engine.ModelSpec(NoFeatures, engine.Recipe(epochs=1), engine.first_line(NoFeatures))
    monkeypatch.setitem(engine.MODELS, "NoFeatures", spec)  # registered for this test only
    arrays = synthetic_arrays()
    config = quick_config(tmp_path, "NoFeatures", epochs=1)
    engine.train(config, spec, data=engine.SplitData.from_arrays(arrays))
    tree = write_image_folder(tmp_path / "tree", arrays)
    code, out, err = run_command(visualize, monkeypatch, capsys, "--run", config.out_dir, "--data-dir", tree)
    assert (code, err) == (0, ""), err
    drawn = {path.name for path in Path(config.out_dir).glob("visual_*.png")}
    assert drawn == VISUAL_FIGURES - {"visual_neighbours.png"}
    assert out.count("note: NoFeatures has no forward_features()") == 1
    assert "no nearest neighbours" in (Path(config.out_dir) / "report.html").read_text()


def test_figures_keep_the_projects_style_after_optunas_restyling(tmp_path):
    """Optuna's matplotlib plots call plt.style.use; a figure drawn after them looks as one drawn before."""
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.1 * e, "val_accuracy": 0.09 * e}
        for e in range(1, 6)
    ]
    engine.plots.plot_curves(history, tmp_path / "before.png", "curves")
    with plt.style.context("default"):  # leave the test process as it was
        plt.style.use("ggplot")
        engine.plots.plot_curves(history, tmp_path / "after.png", "curves")
    assert (imread(tmp_path / "before.png") == imread(tmp_path / "after.png")).all()


def test_a_report_missing_its_figures_says_so_and_a_damaged_file_costs_no_run(tmp_path):
    (tmp_path / "test.json").write_text("{not json")
    page = write_report(tmp_path).read_text()
    assert "<h1>" in page and embedded_images(page) == 0


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (Debian's chromium package; .ci/run installs it)")
def test_the_report_opens_in_a_real_browser_with_every_image_and_no_console_error(trained, tmp_path):
    run_dir, _ = trained
    page = tmp_path / "checked.html"
    page.write_text((run_dir / "report.html").read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    shown = subprocess.run(
        [
            BROWSER,
            *BROWSER_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    images = embedded_images(page.read_text())
    assert f"images {images} of {images} loaded" in shown.stdout, shown.stderr[-2000:]
    assert "CONSOLE" not in shown.stderr, shown.stderr
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            BROWSER,
            *BROWSER_FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--hide-scrollbars",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            (run_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 10_000
