"""One check for a run's settings, wherever they come from: the command line, a --config file, or the checkpoint that
--resume continues.

A value read from a file passes exactly the check its flag's text would: the flag's own type (which holds its range),
its choices, its number of values, on/off for a switch. So the command line's parser is the one schema; a bad value is
one line naming the key, the file and the fix, before anything is written. (jsonargparse or pydantic would need a second
schema of the same settings, kept in step with the flags by hand: the flags already say everything.)

--resume continues the run that is there: its settings come from its checkpoint, and a flag that would change what its
finished epochs meant (the model or its options, the recipe, the data, the seed) is refused. What may change is how
the rest of it runs (``RESUME_MAY_CHANGE``: more epochs, where and how fast it computes, what it shows); such a change
is recorded in config.json as made after epoch k.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from engine.config import Recipe, RunConfig
from engine.registry import MODELS
from functions import UserError

# What --resume may change, and what it records as a change: how the remaining epochs run, not what they mean.
RESUME_MAY_CHANGE = (
    "epochs",
    "device",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "compile",
    "num_workers",
    "progress",
    "logger",
    "val_every",
    "train_accuracy_sample",
    "keep_epoch_checkpoints",
    "profile",
    "tsne",
    "tsne_samples",
    "tsne_method",
)
# where and whether a run goes: never a setting of its own
NOT_COMPARED = ("out_dir", "resume", "overwrite", "config", "changes")


def is_switch(action: argparse.Action) -> bool:
    """store_true, store_false, or --x/--no-x."""
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction))


def value_problem(action: argparse.Action, value: Any) -> tuple[str, Any]:
    """Why a value from a file is not one the flag takes (empty if it is), and the value as the flag would give it."""
    if value is None:
        return ("" if action.default is None else "it takes a value, not null"), None
    if is_switch(action):
        return ("" if isinstance(value, bool) else "it is a switch: true or false"), value
    if isinstance(action.nargs, int):
        if not isinstance(value, list) or len(value) != action.nargs:
            return f"it takes a list of {action.nargs} values", value
        checked = [
            value_problem(argparse.Action([], action.dest, type=action.type, choices=action.choices), item)
            for item in value
        ]
        problem = next((problem for problem, _ in checked if problem), "")
        return problem, [item for _, item in checked]
    if isinstance(value, (bool, list, dict)) or (action.type is None and not isinstance(value, str)):
        return f"a {type(value).__name__} is not a value it takes", value
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
            return str(error) or f"not a value it takes, got {value}", value
    if action.choices is not None and value not in action.choices:
        return f"choose one of {', '.join(map(str, action.choices))}", value
    return "", value


@dataclass
class Settings:
    """A script's command line as the schema of its settings, and the flags the user gave on it."""

    parser: argparse.ArgumentParser
    given: frozenset[str]  # argparse destinations of the flags on the command line

    def action(self, dest: str) -> argparse.Action | None:
        return next((action for action in self.parser._actions if action.dest == dest and action.option_strings), None)

    def check(self, values: dict[str, Any], source: str) -> dict[str, Any]:
        """``values`` (argparse destinations) checked as their flags check them; those this script has no flag for are
        left out. One line for the first bad one."""
        checked = {}
        for dest, value in values.items():
            action = self.action(dest)
            if action is None:
                continue
            problem, checked[dest] = value_problem(action, value)
            if problem:
                flag = action.option_strings[-1] if is_switch(action) and value is False else action.option_strings[0]
                raise UserError(
                    f"{source}: {dest.removeprefix(MODEL_OPTION)} = {json.dumps(value)} is not a value {flag} takes "
                    f"({problem}); correct it there, or give {flag} on the command line"
                )
        return checked


MODEL_OPTION = "model_option_"  # the argparse destination of a model option's flag: model_option_<name>


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> frozenset[str]:
    """The destinations of the flags on the command line (a parse in which nothing has a default)."""
    bare = copy.copy(parser)
    bare._actions = [copy.copy(action) for action in parser._actions]
    bare._defaults = {}
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    bare._option_string_actions = {option: action for action in bare._actions for option in action.option_strings}
    return frozenset(vars(bare.parse_known_args(argv)[0]))


def flattened(saved: dict[str, Any], source: str) -> dict[str, Any]:
    """A run's settings as written in config.json or a checkpoint, keyed by argparse destination: recipe fields and run
    settings by their names, model options as model_option_<name>."""
    recipe, options = saved.get("recipe", {}), saved.get("model_options", {})
    if not isinstance(recipe, dict) or not isinstance(options, dict):
        raise UserError(
            f"{source}: recipe and model_options must be mappings of names to values; copy the file again from "
            "its run folder"
        )
    rest = {key: value for key, value in saved.items() if key not in ("recipe", "model_options")}
    return {**recipe, **rest, **{MODEL_OPTION + name: value for name, value in options.items()}}


def normalised(value: Any) -> Any:
    """A value as JSON writes it (tuples as lists), so a flag's value and a file's compare equal when they are."""
    return json.loads(json.dumps(value))


def same_setting(dest: str, a: Any, b: Any) -> bool:
    if dest == "data_dir" and isinstance(a, str) and isinstance(b, str):
        return Path(a).resolve() == Path(b).resolve()
    return normalised(a) == normalised(b)


def changed_settings(now: dict[str, Any], before: dict[str, Any], dests: frozenset[str] | set[str]) -> list[str]:
    """The destinations among ``dests`` whose value in ``now`` differs from ``before``'s."""
    return [
        dest
        for dest in dests
        if dest in before and dest not in NOT_COMPARED and not same_setting(dest, now.get(dest), before[dest])
    ]


def describe_change(dest: str, now: Any, before: Any) -> str:
    return f"{dest.removeprefix(MODEL_OPTION)} {json.dumps(normalised(now))} (it has {json.dumps(normalised(before))})"


RECIPE_FLAGS = {f.name for f in fields(Recipe)}
# where, whether and how it shows: the new run's own
NOT_FROM_CONFIG = ("out_dir", "resume", "overwrite", "config", "progress", "changes")
# Recipe fields that became model options (airbench's), as config.json files written before then hold them.
FORMER_RECIPE_FIELDS = ("whiten", "dirac", "freeze_norm_weights", "norm_bias_lr_scale")


def run_settings(saved: Any, source: str) -> dict[str, Any]:
    """A run's settings as config.json and checkpoints hold them, keyed by argparse destination; a file that is not a
    run's settings (a tuning study's best_params.json, say) or has a key no run has is refused with one line."""
    if not isinstance(saved, dict):
        raise UserError(
            f"{source} is not a run's settings (a {type(saved).__name__}, not a mapping); give <run folder>/config.json"
        )
    recipe = saved.get("recipe", {})
    unknown = sorted(
        set(saved) - {f.name for f in fields(RunConfig)}
        | set(recipe if isinstance(recipe, dict) else ()) - RECIPE_FLAGS - set(FORMER_RECIPE_FIELDS)
    )
    if unknown or "model" not in saved:
        tuned = (
            " (for a tuning study's winner: <out-dir>/retrain/config.json, or trials/<N>/config.json for one trial)"
            if "trial" in saved
            else ""
        )
        raise UserError(
            f"{source} is not a run's config.json (it has {', '.join(unknown) or 'no model'}); give the config.json "
            f"of a run folder{tuned}"
        )
    settings = flattened(saved, source)
    former = {name: settings.pop(name) for name in FORMER_RECIPE_FIELDS if name in settings}
    spec = MODELS.get(saved["model"])
    if former and not saved.get("model_options") and spec is not None and all(spec.option(name) for name in former):
        # written before airbench's pieces were model options of the airbench models: they were its options
        settings.update({MODEL_OPTION + name: value for name, value in former.items()})
    return settings


def read_config(path: Path) -> dict[str, Any]:
    """An earlier run's settings from its config.json, as flag defaults."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(
            f"--config {path} cannot be read as a run's config.json ({type(error).__name__}); give <run "
            "folder>/config.json"
        ) from None
    settings = run_settings(saved, f"--config {path}")
    return {name: value for name, value in settings.items() if name not in NOT_FROM_CONFIG}


def differences_from(config: RunConfig, saved: Any, source: str) -> list[str]:
    """What differs between the run ``config`` describes and the run settings ``saved`` (a config.json's), apart from
    how it runs (``RESUME_MAY_CHANGE`` but the epochs): one description each, e.g. 'lr 0.01 (it has 0.001)'."""
    before, now = run_settings(saved, source), flattened(asdict(config), "the command line")
    how_it_runs = set(RESUME_MAY_CHANGE) - {"epochs"}
    return [
        describe_change(dest, now[dest], before[dest]) for dest in changed_settings(now, before, set(now) - how_it_runs)
    ]
