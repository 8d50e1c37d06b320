"""report.html: one page that gathers a run folder (or a comparison's, or a tuning study's) for a reader.

The model card and settings, the per-epoch curves, the test accuracy with the per-class precision, recall and F1, the
confusion matrix, the t-SNE, the comparison or the study's figures, and visualize.py's figures once made. The page is
one self-contained file (every figure inside it as a PNG data URI; no script, no CDN), so it opens offline from disk
and can be mailed or archived alone. A figure the folder lacks is a note on the page, never a failed run.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path
from typing import Any

import jinja2

import engine

REPORT = "report.html"
VISUALIZE_INDEX = "visualize.json"  # visualize.py's figures and the reasons for any it could not draw
TEMPLATES = Path(__file__).resolve().parent / "templates"
RUN_FIGURES = {"curves.png": "Loss and accuracy per epoch", "confusion_matrix.png": "Confusion matrix (test set)"}
TSNE_FIGURES = {
    "tsne_test.png": "t-SNE of the penultimate features, test split",
    "tsne_train.png": "t-SNE of the penultimate features, training split",
}
COMPARISON_FIGURES = {"comparison.png": "The models' curves compared"}
STUDY_FIGURES = {
    "optimization_history.png": "Optimisation history",
    "param_importances.png": "Hyperparameter importances",
    "parallel_coordinate.png": "Parallel coordinates",
    "slice.png": "Each hyperparameter against the objective",
}
MAX_TABLE_ROWS = 50  # a study's trials or a comparison's runs: the page shows this many, the CSV holds them all
engine.register_run_outputs(REPORT, VISUALIZE_INDEX, "visual_*.png")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figures(folder: Path, names: dict[str, str]) -> list[dict[str, str]]:
    return [
        {"title": title, "file": name, "src": data_uri(folder / name)}
        for name, title in names.items()
        if (folder / name).is_file()
    ]


def read(folder: Path, name: str) -> Any:
    """A JSON file of the folder, or None when it is missing or damaged (the page says what it could not show)."""
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def csv_table(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return None
    return {"header": rows[0], "rows": rows[1 : MAX_TABLE_ROWS + 1], "more": max(0, len(rows) - 1 - MAX_TABLE_ROWS)}


def percent(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "n/a"


def tsne_note(config: dict[str, Any] | None) -> str | None:
    if config is None:
        return None
    if not config.get("analyses", {}).get("tsne", True):
        return "No t-SNE in this run: it ran with --no-tsne (python tsne.py --run on this folder makes it)."
    return "No t-SNE figures in this folder (the model may have no penultimate features, or the t-SNE was stopped)."


def visual_section(folder: Path, index: Any) -> dict[str, Any]:
    """visualize.py's figures as its ``index`` (visualize.json) lists them, or how to make them."""
    if not isinstance(index, dict):
        return {"figures": [], "notes": [f"Not made yet: python visualize.py --run {folder} draws them."]}
    shown = {name: title for name, title in index.get("figures", {}).items() if (folder / name).is_file()}
    return {"figures": figures(folder, shown), "notes": list(index.get("notes", {}).values())}


def page(folder: Path) -> dict[str, Any]:
    """Everything the template shows, from the files of ``folder``."""
    config, card, test = read(folder, "config.json"), read(folder, "model.json"), read(folder, "test.json")
    visual_index = read(folder, VISUALIZE_INDEX)
    run_figures = figures(folder, RUN_FIGURES)
    tsne = figures(folder, TSNE_FIGURES)
    per_class = (test or {}).get("per_class", {})
    return {
        "title": (card or config or visual_index or {}).get("model") or folder.name,
        "folder": str(folder),
        "card": card,
        "config": config,
        "test": test,
        "test_accuracy": percent((test or {}).get("test_accuracy")),
        "per_class": [{"name": name, **values} for name, values in per_class.items()],
        "run_figures": run_figures,
        "tsne": tsne,
        "tsne_note": None if tsne or not (folder / "test.json").is_file() else tsne_note(config),
        "visual": visual_section(folder, visual_index) if card or (folder / VISUALIZE_INDEX).is_file() else None,
        "comparison": {"figures": figures(folder, COMPARISON_FIGURES), "table": csv_table(folder / "comparison.csv")},
        "study": {
            "figures": figures(folder, STUDY_FIGURES),
            "best": read(folder, "best_params.json"),
            "table": csv_table(folder / "trials.csv"),
        },
        "percent": percent,
    }


def write_report(folder: Path) -> Path:
    """Write ``folder``/report.html from what the folder holds now; returns its path."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    html = environment.get_template("report.html.j2").render(page(Path(folder)))
    path = Path(folder) / REPORT
    engine.write_atomically(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    return path


class ReportAnalysis:
    """The last analysis of a training run: gathers its folder into report.html (after the t-SNE, which it shows)."""

    def check(self, config: engine.RunConfig, data: engine.SplitData) -> None:
        """Nothing can stop a report: a missing figure is a note on the page."""

    def run(self, net, data, test, run_dir: Path, config, device) -> None:
        try:
            print(f"Report: {write_report(run_dir)}", flush=True)
        except (OSError, jinja2.TemplateError) as error:  # the run's results are all written: the page is extra
            print(f"note: no report.html ({type(error).__name__}: {error}); the run's files are all there", flush=True)
