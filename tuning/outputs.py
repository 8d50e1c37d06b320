"""A study's outputs, rewritten after every run of the script: trials.csv, best_params.json, Optuna's figures (each
saying how many trials it rests on) and report.html."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as plots

import engine
from analyses.report import write_report
from engine import write_atomically
from tuning.space import options_for, recipe_for
from tuning.study import FINISHED, StudySettings, best_trial, format_params

TRIAL_COLUMNS = ("number", "state", "value", "duration_s", "epochs_run", "reason")
OBJECTIVE_NAME = "validation loss"  # what the figures call a trial's value (Optuna's own word is "Objective Value")
# name: complete trials it needs
FIGURES = {"optimization_history": 1, "param_importances": 2, "parallel_coordinate": 2, "slice": 2}
# The figures that read each parameter's effect out of the trials, and their titles. Optuna's importances (PED-ANOVA)
# set the best tenth of the trials against all of them: below 20 trials that tenth is one trial, and a slice's cloud
# of points is as thin. Such a figure says so, and so does the log.
READ_FROM_TRIALS = {"param_importances": "Importances", "slice": "Slices"}
FEW_TRIALS = 20


def check_study_folder(out_dir: Path, study: str) -> None:
    """Refuse ``out_dir`` if its study.json names another study: its trial folders are numbered from 0 like this one's,
    so another study's trials would write into them. Makes the folder (the default SQLite file lies in it)."""
    held = read_marker(out_dir / "study.json")
    if held is not None and held.get("study") != study:
        raise engine.UserError(
            f"{out_dir} holds the outputs and trials of study {held.get('study')!r} (in {held.get('storage')}); give "
            f"this study a folder of its own with --out-dir, or continue that one with --study-name {held.get('study')}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def mark_study_folder(out_dir: Path, study: str, storage: str) -> None:
    """study.json: the study ``out_dir`` holds, written once the study is open."""
    engine.write_json(out_dir / "study.json", {"study": study, "storage": storage})


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        held = engine.read_json(path)
    except (OSError, ValueError):
        return None  # none yet, or damaged: the study that opens now writes it anew
    return held if isinstance(held, dict) else None


def write_space(settings: StudySettings, out_dir: Path) -> None:
    """space.json: the study's space in a --space file's form, to read, or to start another study with."""
    engine.write_json(out_dir / "space.json", settings.search_space)


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """One row per trial, one column per parameter any trial has."""
    trials = study.get_trials(deepcopy=False)
    param_names = list(dict.fromkeys(name for trial in trials for name in trial.params))
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "duration_s": round(t.duration.total_seconds(), 2) if t.duration else None,
            "epochs_run": t.user_attrs.get("epochs_run"),
            "reason": t.user_attrs.get("reason", ""),
            **t.params,
        }
        for t in trials
    ]
    engine.write_csv(path, rows, [*TRIAL_COLUMNS, *param_names])


def best_record(study: optuna.Study, settings: StudySettings, best: FrozenTrial, retrain_epochs: int) -> dict[str, Any]:
    return {
        "study": study.study_name,
        "space": settings.space,
        "trial": best.number,
        "val_loss": best.value,
        "epochs": settings.epochs,
        "params": best.params,
        "sampler": settings.sampler,
        "pruner": settings.pruner,
        "model": settings.model,
        "model_options": options_for(settings.model, best.params),
        "recipe": asdict(recipe_for(settings.model, best.params, retrain_epochs)),
    }


def write_figures(study: optuna.Study, out_dir: Path) -> list[str]:
    """Optuna's matplotlib figures the study has enough complete trials for; returns the files written."""
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    written = []
    for name, needed in FIGURES.items():
        if complete < needed:
            continue
        # Optuna's plots call plt.style.use("ggplot"): rc_context puts the process's style back after them
        with warnings.catch_warnings(), matplotlib.rc_context():
            # the plots are "experimental", and an axis where all trials agree is "singular"
            warnings.simplefilter("ignore")
            axes = getattr(plots, f"plot_{name}")(study, target_name=OBJECTIVE_NAME)
            figure = np.ravel(axes)[0].figure
            width, height = figure.get_size_inches()
            figure.set_size_inches(max(width, 1.3 * len(study.best_params) + 3), height)  # an axis per parameter
            if name in READ_FROM_TRIALS:
                title_with_trials(figure, READ_FROM_TRIALS[name], complete)
            # a log axis (lr, weight decay, a width) labels 1, 2 and 5 of each decade, plainly: Optuna's labels its
            # minor ticks in scientific notation too, which collide
            for axis in figure.axes:
                axis.tick_params(labelsize=8)
                axis.tick_params(axis="x", labelrotation=30)
                for scale, ticks in ((axis.get_xscale(), axis.xaxis), (axis.get_yscale(), axis.yaxis)):
                    if scale == "log":
                        ticks.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                        ticks.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                        ticks.set_minor_formatter(NullFormatter())
            # bbox "tight" widens the image to Optuna's long, rotated labels instead of cutting them off
            write_atomically(
                out_dir / f"{name}.png", partial(figure.savefig, dpi=120, format="png", bbox_inches="tight")
            )
        plt.close(figure)
        written.append(f"{name}.png")
    return written


def title_with_trials(figure: matplotlib.figure.Figure, title: str, complete: int) -> None:
    """Title a figure read from the trials with how many it rests on (in red, and saying so, when they are few)."""
    few = complete < FEW_TRIALS
    text = f"{title} from {complete} complete trials" + (f": fewer than {FEW_TRIALS}, they mean little" if few else "")
    style = {"color": "firebrick" if few else "black", "fontsize": 11}
    if figure.get_suptitle():  # a slice of several parameters: one title over all
        figure.suptitle(text, **style)
    else:
        figure.axes[0].set_title(text, loc="left", **style)


def pruning_savings(study: optuna.Study, epochs: int) -> tuple[int, int]:
    """Pruned trials and the epochs they did not run."""
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    return len(pruned), sum(epochs - trial.user_attrs.get("epochs_run", epochs) for trial in pruned)


def write_outputs(study: optuna.Study, settings: StudySettings, out_dir: Path, retrain_epochs: int) -> None:
    counts = {state: len(study.get_trials(deepcopy=False, states=(state,))) for state in (*FINISHED, TrialState.FAIL)}
    pruned, saved = pruning_savings(study, settings.epochs)
    print(
        f"Study {study.study_name!r}: {counts[TrialState.COMPLETE]} complete, {pruned} pruned, "
        f"{counts[TrialState.FAIL]} failed trials; "
        f"pruning saved {saved} of {settings.epochs * (counts[TrialState.COMPLETE] + pruned)} epochs"
    )
    write_trials_csv(study, out_dir / "trials.csv")
    written = ["trials.csv"]
    best = best_trial(study)
    if best is None:
        print("No trial has completed yet: no best_params.json and no figures")
    else:
        engine.write_json(out_dir / "best_params.json", best_record(study, settings, best, retrain_epochs))
        figures = write_figures(study, out_dir)
        written += ["best_params.json", *figures]
        print(f"Best: trial {best.number}, validation loss {best.value:.4f}; {format_params(best.params)}")
        complete = counts[TrialState.COMPLETE]
        read = [f"{name}.png" for name in READ_FROM_TRIALS if f"{name}.png" in figures]
        if read and complete < FEW_TRIALS:
            print(f"{' and '.join(read)} rest on {complete} complete trials: fewer than {FEW_TRIALS}, they mean little")
    written.append(write_report(out_dir).name)
    print(f"Written to {out_dir}: {', '.join(written)}")
