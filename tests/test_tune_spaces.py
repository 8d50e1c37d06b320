"""Tuning any model over any space: each model's own space, a user's space file (and the ones refused), Optuna's
samplers and pruners as flags, figures that say how many trials they rest on, and a winner of another model retrained
and loaded by predict.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import engine
import hyperparameter_tune as tune
import predict
import study_storage
import tuning
from conftest import TRIAL_SIZED, run_command, synthetic_arrays, to_pil

pytestmark = pytest.mark.usefixtures("trial_sized_data")

MODEL = "FastVGG_narrow"
USERS_SPACE = {
    "width": {"kind": "categorical", "choices": [8, 16]},
    "lr": {"kind": "float", "low": 0.05, "high": 0.5, "log": True},
    "weight_decay": {"kind": "float", "low": 1e-4, "high": 1e-3},
    "optimizer": {"kind": "categorical", "choices": ["sgd", "adam"]},
    "momentum": {"kind": "float", "low": 0.8, "high": 0.95, "when": {"optimizer": ["sgd"]}},
}


def flags(out_dir: Path, *more: str) -> list[str]:
    return ["--out-dir", str(out_dir), "--device", "cpu", "--no-tsne", "--model", MODEL, *more]


def load(out_dir: Path, name: str = MODEL) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=study_storage.open_storage(f"sqlite:///{out_dir}/study.db"))


def space_file(folder: Path, space: dict, name: str = "space.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(space))
    return path


def trainable() -> list[str]:
    return [name for name, spec in engine.MODELS.items() if spec.own_script is None]


# --------------------------------------------------------------------------------------------
# Each model's own space
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", trainable())
def test_every_model_has_a_space_of_its_own_whose_every_draw_builds_and_trains_by_its_recipe(model):
    """A model's space comes from its registry entry; what it draws passes the options' and flags' checks."""
    label, space = tuning.resolve_space("model", model)
    spec = engine.model_spec(model)
    assert label == "model" and {"lr", "batch_size"} <= set(space)
    assert space["lr"].log and space["lr"].low == pytest.approx(spec.recipe.lr / 10)  # a decade either way
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        params = tuning.draw(space, trial)
        assert params == trial.params
        config = tuning.trial_config(engine.RunConfig(model=model), params, epochs=2, out_dir=Path("x"))
        assert config.recipe.lr == params["lr"] and config.recipe.epochs == 2
        assert all(config.model_options[name] == value for name, value in params.items() if spec.option(name))
        spec.build(config.model_options)  # checked by the options' own declarations
        study.tell(trial, 0.0)


def test_a_models_space_uses_its_declared_options_narrowed_where_its_entry_says():
    airbench = tuning.model_space("Airbench94_muon")
    assert airbench["whiten"] == {"kind": "categorical", "choices": [False, True]}  # a switch, as declared
    assert "whiten_images" not in airbench  # left out by its entry
    assert airbench["width"] == {"kind": "int", "low": 32, "high": 128, "log": True}  # narrowed by its entry
    assert {"momentum", "muon_lr"} <= set(airbench)  # its optimiser has both
    cifar = tuning.model_space("CIFAR10Net")
    assert "momentum" not in cifar and cifar["dropout"] == {"kind": "float", "low": 0.1, "high": 0.9}
    for model in ("CIFAR10Net_7", "CIFAR10Net"):  # the original study's space is theirs
        assert tuning.to_json(tuning.resolve_space("model", model)[1]) == tuning.to_json(
            tuning.resolve_space("study", "CIFAR10Net_7")[1]
        )


def test_the_default_model_and_space_are_the_original_studys(no_figures, tmp_path):
    tune.main(["--out-dir", str(tmp_path), "--device", "cpu", "--no-tsne", "--n-trials", "1", "--epochs", "1"])
    study = load(tmp_path, "CIFAR10Net_7")
    assert study.user_attrs["model"] == "CIFAR10Net_7" and study.user_attrs["space"] == "model"
    assert set(study.trials[0].params) == {"fc1_size", "fc2_size", "dropout", "lr", "weight_decay", "batch_size"}


# --------------------------------------------------------------------------------------------
# A space of the user's own
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_users_space_file_is_what_the_trials_draw_and_is_stored_with_the_study(no_figures, tmp_path, suffix):
    path = tmp_path / f"mine{suffix}"
    path.write_text(json.dumps(USERS_SPACE))  # JSON is YAML too
    out = tmp_path / "tune"
    tune.main(flags(out, "--space", str(path), "--n-trials", "4", "--epochs", "1", "--sampler", "random"))
    study = load(out)
    assert study.user_attrs["space"] == str(path) and study.user_attrs["search_space"]["width"]["choices"] == [8, 16]
    assert json.loads((out / "space.json").read_text()) == study.user_attrs["search_space"]
    trials = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
    assert len(trials) == 4
    for trial in trials:
        params = trial.params
        assert params["width"] in (8, 16) and 0.05 <= params["lr"] <= 0.5 and 1e-4 <= params["weight_decay"] <= 1e-3
        assert ("momentum" in params) == (params["optimizer"] == "sgd")  # "when"
        config = json.loads((out / "trials" / f"{trial.number:04d}" / "config.json").read_text())
        assert config["model"] == MODEL and config["model_options"]["width"] == params["width"]
        assert config["recipe"]["optimizer"] == params["optimizer"] and config["recipe"]["lr"] == params["lr"]
    # a rerun without --space continues with the stored one; space.json, given back as --space, is the same space
    tune.main(flags(out, "--n-trials", "5"))
    tune.main(flags(out, "--n-trials", "6", "--space", str(out / "space.json")))
    assert len(load(out).trials) == 6 and set(load(out).trials[5].params) <= set(USERS_SPACE)


@pytest.mark.parametrize(
    ("space", "says"),
    [
        ({"widht": {"kind": "int", "low": 8, "high": 16}}, "widht is neither an option of FastVGG_narrow"),
        (
            {"lr": {"kind": "float", "low": 0.0, "high": 1.0}},
            "lr: low 0.0 is not a value --lr takes (must be a number > 0",
        ),
        ({"width": {"kind": "int", "low": 8, "high": 5000}}, "width: high 5000 is not a value --width takes"),
        (
            {"momentum": {"kind": "float", "low": 0.5, "high": 1.0}},
            "momentum: high 1.0 is not a value --momentum takes",
        ),
        ({"batch_size": {"kind": "float", "low": 32, "high": 64}}, 'kind "float" does not fit --batch-size'),
        ({"optimizer": {"kind": "int", "low": 0, "high": 2}}, 'kind "int" does not fit --optimizer'),
        ({"optimizer": {"kind": "categorical", "choices": ["sgd", "lion"]}}, 'choice "lion" is not a value'),
        ({"lr": {"kind": "float", "low": 0.5, "high": 0.1}}, "low 0.5 is above high 0.1"),
        ({"lr": {"low": 0.1, "high": 0.5}}, 'lr needs "kind"'),
        ({"lr": {"kind": "float", "low": 0.1, "high": 0.5, "step": 0.1}}, "'step' is not a key"),
        ({"momentum": {"kind": "float", "low": 0.8, "high": 0.9, "when": {"optimizer": ["sgd"]}}}, '"when" names'),
        ({"epochs": {"kind": "int", "low": 1, "high": 5}}, "epochs is neither an option"),
        ([1, 2], "a search space is an object"),
    ],
)
def test_a_bad_space_file_is_one_line_naming_the_key_with_exit_2_before_any_trial(
    monkeypatch, capsys, tmp_path, space, says
):
    path = space_file(tmp_path, space)
    out = tmp_path / "tune"
    code, printed, err = run_command(tune, monkeypatch, capsys, *flags(out, "--space", path, "--n-trials", "2"))
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (out / "trials").exists() and not load(out).trials


@pytest.mark.parametrize(
    ("text", "says"), [('{"lr": {"kind": ', "is not valid JSON"), (None, "No such file or directory")]
)
def test_a_malformed_or_missing_space_file_is_one_line(monkeypatch, capsys, tmp_path, text, says):
    path = tmp_path / "space.json"
    if text is not None:
        path.write_text(text)
    code, _, err = run_command(tune, monkeypatch, capsys, *flags(tmp_path / "tune", "--space", path))
    assert code == 2 and err.count("\n") == 1 and says in err and f"--space {path}" in err


def test_a_second_worker_with_another_space_is_refused(no_figures, monkeypatch, capsys, tmp_path):
    mine = space_file(tmp_path / "a", USERS_SPACE)
    other = space_file(tmp_path / "b", {name: drawn for name, drawn in USERS_SPACE.items() if name != "momentum"})
    out = tmp_path / "tune"
    tune.main(flags(out, "--space", str(mine), "--n-trials", "1", "--epochs", "1"))
    written = {path.name: path.stat().st_mtime_ns for path in out.iterdir() if path.is_file()}
    code, _, err = run_command(tune, monkeypatch, capsys, *flags(out, "--space", other, "--n-trials", "2"))
    assert code == 2 and err.count("\n") == 1
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir() if path.is_file()} == written  # nor study.json
    assert f"searches another space than --space {other} holds: the one given as --space {mine}" in err
    assert len(load(out).trials) == 1


def test_a_model_with_a_script_of_its_own_is_refused_at_the_command_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_command(tune, monkeypatch, capsys, *flags(tmp_path, "--model", "TransferNet"))
    assert code == 2 and "TransferNet is trained by transfer_learning.py, which this script cannot tune" in err


# --------------------------------------------------------------------------------------------
# Samplers and pruners
# --------------------------------------------------------------------------------------------
def test_the_sampler_and_pruner_chosen_are_the_studys_and_are_recorded(no_figures, tmp_path):
    out = tmp_path / "tune"
    tune.main(flags(out, "--n-trials", "2", "--epochs", "2", "--sampler", "random", "--pruner", "none"))
    study = load(out)
    assert study.user_attrs["sampler"] == "random" and study.user_attrs["pruner"] == "none"
    assert all(not trial.intermediate_values for trial in study.trials)  # nothing reported to a pruner
    best = json.loads((out / "best_params.json").read_text())
    assert (best["sampler"], best["pruner"]) == ("random", "none")
    tune.main(flags(out, "--n-trials", "3"))  # continued with the recorded ones
    assert load(out).user_attrs["sampler"] == "random" and len(load(out).trials) == 3
    default = tmp_path / "default"
    tune.main(flags(default, "--n-trials", "1", "--epochs", "2"))
    study = load(default)
    assert (study.user_attrs["sampler"], study.user_attrs["pruner"]) == ("tpe", "median")
    assert study.trials[0].intermediate_values.keys() == {0, 1}  # reported epoch by epoch to the median rule


@pytest.mark.parametrize("sampler", sorted(tuning.SAMPLERS))
def test_each_sampler_runs_a_study_and_one_seed_proposes_the_same_trials(sampler):
    space = tuning.resolve_space("model", MODEL)[1]

    def proposals(seed: int) -> list[dict]:
        study = optuna.create_study()
        settings = tuning.StudySettings(MODEL, "model", tuning.to_json(space), epochs=1, sampler=sampler)
        tuning.configure(study, settings, seed)
        assert type(study.sampler).__name__ == tuning.SAMPLERS[sampler]
        proposed = []
        for value in (3.0, 1.0, 2.0, 0.5):
            trial = study.ask()
            proposed.append(tuning.draw(space, trial))
            study.tell(trial, value)
        return proposed

    assert proposals(seed=1) == proposals(seed=1) != proposals(seed=2)


@pytest.mark.parametrize(("pruner", "kind"), [("median", "MedianPruner"), ("hyperband", "HyperbandPruner")])
def test_each_pruner_is_optunas(pruner, kind):
    study = optuna.create_study()
    tuning.configure(study, tuning.StudySettings(MODEL, "model", {}, epochs=4, pruner=pruner), seed=0)
    assert type(study.pruner).__name__ == kind


# --------------------------------------------------------------------------------------------
# Figures that say what they rest on; another model's winner retrained and loaded
# --------------------------------------------------------------------------------------------
def test_importances_and_slices_say_how_many_trials_they_rest_on(monkeypatch, tmp_path, capsys):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = tuning.resolve_space("model", MODEL)[1]
    for value in (1.0, 2.0, 1.5):
        trial = study.ask()
        tuning.draw(space, trial)
        study.tell(trial, value)
    drawn = []
    monkeypatch.setattr(tuning.outputs.plt, "close", drawn.append)
    written = tuning.write_figures(study, tmp_path)
    assert written == ["optimization_history.png", "param_importances.png", "parallel_coordinate.png", "slice.png"]
    titles = [figure.get_suptitle() or figure.axes[0].get_title(loc="left") for figure in drawn]
    assert titles[1] == "Importances from 3 complete trials: fewer than 20, they mean little"
    assert titles[3] == "Slices from 3 complete trials: fewer than 20, they mean little"
    settings = tuning.StudySettings(MODEL, "model", tuning.to_json(space), epochs=1)
    tuning.write_outputs(study, settings, tmp_path, retrain_epochs=1)
    assert "param_importances.png and slice.png rest on 3 complete trials: fewer than 20" in capsys.readouterr().out


def test_another_models_winner_is_retrained_by_its_own_recipe_and_loads_in_predict(monkeypatch, capsys, tmp_path):
    out = tmp_path / "tune"
    argv = flags(out, "--n-trials", "3", "--epochs", "1", "--retrain", "--retrain-epochs", "1")
    code, printed, err = run_command(tune, monkeypatch, capsys, *argv)
    assert code == 0, err
    best = json.loads((out / "best_params.json").read_text())
    config = json.loads((out / "retrain" / "config.json").read_text())
    recipe = engine.model_spec(MODEL).recipe
    assert config["model"] == MODEL == best["model"] and config["model_options"]["width"] == best["params"]["width"]
    assert config["recipe"]["lr"] == best["params"]["lr"] and config["recipe"]["epochs"] == 1
    assert (config["recipe"]["scheduler"], config["recipe"]["augment"]) == (recipe.scheduler, recipe.augment)
    image = tmp_path / "photo.png"
    to_pil(engine.SplitData.from_arrays(synthetic_arrays(**TRIAL_SIZED)).test_images[0]).save(image)
    for run in (out / "retrain", out / "trials" / "0001"):
        code, printed, err = run_command(predict, monkeypatch, capsys, "--run", run, "--device", "cpu", image)
        assert code == 0 and f"{MODEL} (width " in printed and "photo.png: " in printed, err
    assert math.isfinite(best["val_loss"])
