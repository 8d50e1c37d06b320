"""Search spaces as data: what a study draws for each trial, checked against what the model and the recipe take.

A space maps each parameter, a model option or a recipe field named as its flag with underscores (``fc1_size`` for
--fc1-size; ``beta1`` and ``beta2`` for the two values of --betas), to how a trial draws it (docs/tuning.md, "Your own
space"):

    {"kind": "float" | "int", "low": L, "high": H, "log": true | false}   a range, both ends included
    {"kind": "categorical", "choices": [A, B, ...]}                         one of a list

and, optionally, ``"when": {"optimizer": ["sgd"]}``: drawn only in the trials where a parameter drawn before it took one
of those values (Optuna's define-by-run, written down). Every end and choice must be a value the parameter's flag takes,
checked by the flag's own type as a --config file is (``engine.value_problem``), so nothing a trial draws can fail to
build or train for a bad value.

The spaces a study can name: ``model``, each model's own, derived from its registry entry (its declared options with
their ranges and choices, and the recipe fields that matter for it; ``ModelSpec.tuning`` narrows or drops any), the
original study's ``study``, and ``extended``; or a file of the user's own, JSON or YAML.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

import engine
from engine import UserError
from models.study import STUDY_SPACE

KINDS = ("float", "int", "categorical")
KEYS = {"float": {"low", "high", "log"}, "int": {"low", "high", "log"}, "categorical": {"choices"}}
HELP = "docs/tuning.md#your-own-space"
# Every recipe field a study may draw but three: epochs (the study's --epochs), tta (only the test set sees it, and the
# objective is the validation loss) and muon_batched (it changes the speed, not the arithmetic).
TUNABLE_RECIPE = (
    "batch_size",
    "optimizer",
    "lr",
    "beta1",
    "beta2",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "scheduler",
    "warmup_epochs",
    "augment",
    "decoupled",
    "muon_lr",
    "muon_momentum",
    "muon_renorm_every",
    "muon_weight_decay",
    "weight_average",
)
BETAS = ("beta1", "beta2")
# The study's space, plus both convolutions' shapes and the optimiser with its own settings. Muon is left out: it
# orthogonalises whole filter banks, made for the wide airbench nets, not this search.
EXTENDED_SPACE = {
    **STUDY_SPACE,
    "conv1_width": {"kind": "categorical", "choices": [16, 20, 32, 48, 64]},
    "conv1_kernel": {"kind": "categorical", "choices": [3, 5]},
    "conv2_width": {"kind": "categorical", "choices": [32, 40, 64, 96, 128]},
    "conv2_kernel": {"kind": "categorical", "choices": [3, 4, 5]},
    "optimizer": {"kind": "categorical", "choices": ["adam", "adamw", "sgd"]},
    "momentum": {"kind": "float", "low": 0.8, "high": 0.99, "when": {"optimizer": ["sgd"]}},
    "beta1": {"kind": "float", "low": 0.8, "high": 0.95, "when": {"optimizer": ["adam", "adamw"]}},
    "beta2": {"kind": "float", "low": 0.99, "high": 0.9999, "when": {"optimizer": ["adam", "adamw"]}},
}
NAMED_SPACES = {"model": None, "study": STUDY_SPACE, "extended": EXTENDED_SPACE}  # model: each model's own
DECADE = 10  # a range whose ends are this far apart or more is drawn on the log scale


@dataclass(frozen=True)
class Param:
    """How a trial draws one parameter."""

    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (earlier parameter, the values it must have taken), ...

    def to_json(self) -> dict[str, Any]:
        """The parameter in the file's form, with nothing left to a default: what the study stores and compares."""
        if self.kind == "categorical":
            drawn: dict[str, Any] = {"kind": self.kind, "choices": list(self.choices)}
        else:
            drawn = {"kind": self.kind, "low": self.low, "high": self.high, "log": self.log}
        return drawn | ({"when": {name: list(values) for name, values in self.when}} if self.when else {})

    def drawn_in(self, params: dict[str, Any]) -> bool:
        return all(name in params and params[name] in values for name, values in self.when)

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)


Space = dict[str, Param]


def draw(space: Space, trial: Any) -> dict[str, Any]:
    """A trial's parameters, drawn in the space's order (a ``when`` looks at those drawn before it)."""
    params: dict[str, Any] = {}
    for name, param in space.items():
        if param.drawn_in(params):
            params[name] = param.suggest(trial, name)
    return params


def to_json(space: Space) -> dict[str, dict[str, Any]]:
    return {name: param.to_json() for name, param in space.items()}


# --------------------------------------------------------------------------------------------
# What each parameter takes: its flag, as the command line checks it
# --------------------------------------------------------------------------------------------
def flag_actions(model: str) -> dict[str, tuple[argparse.Action, str]]:
    """The flag of every parameter a study of ``model`` may draw (its options' and the tunable recipe fields'), with
    what its values are: bool, str (a choice), int or float."""
    spec = engine.model_spec(model)
    parser = argparse.ArgumentParser(add_help=False)
    engine.add_recipe_arguments(parser, spec.recipe)
    engine.add_model_arguments(parser, {model: spec})
    by_dest = {action.dest: action for action in parser._actions}
    actions = {
        option.name: (by_dest[engine.MODEL_OPTION + option.name], option.kind.__name__) for option in spec.options
    }
    for name in TUNABLE_RECIPE:
        if name in BETAS:  # one value of --betas
            action = argparse.Action(by_dest["betas"].option_strings, name, type=by_dest["betas"].type)
        else:
            action = by_dest[name]
        actions[name] = (action, recipe_value_kind(action))
    return actions


def recipe_value_kind(action: argparse.Action) -> str:
    """What a recipe flag's values are: bool, str (a choice), int or float."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return "bool"
    if action.choices is not None:
        return "str"
    return "int" if action.type in (engine.positive_int, engine.non_negative_int) else "float"


# --------------------------------------------------------------------------------------------
# The flags that choose a study's model and space
# --------------------------------------------------------------------------------------------
def tunable_model(name: str) -> str:
    """--model's type: a model modified_models.py trains (one with a script of its own caches what it trains on)."""
    spec = engine.MODELS.get(name)
    if spec is None or spec.own_script:
        trained_here = [model for model, spec in engine.MODELS.items() if spec.own_script is None]
        why = f"{name} is trained by {spec.own_script}, which this script cannot tune; " if spec else ""
        raise argparse.ArgumentTypeError(f"{why}choose one of {', '.join(trained_here)}, got {name}")
    return name


def space_argument(text: str) -> str:
    """--space's type: a named space (or its former name), or a JSON or YAML file."""
    name = engine.former_name(text)
    if name in NAMED_SPACES or Path(text).suffix in (".json", ".yaml", ".yml"):
        return name
    raise argparse.ArgumentTypeError(f"choose one of {', '.join(NAMED_SPACES)}, or a .json or .yaml file, got {text}")


# --------------------------------------------------------------------------------------------
# Reading and checking a space
# --------------------------------------------------------------------------------------------
def parse_space(raw: Any, model: str, source: str) -> Space:
    """``raw`` (the file's form) checked for ``model``: one line naming the parameter and the fix for the first
    problem."""
    if not isinstance(raw, dict) or not raw:
        raise UserError(
            f"{source}: a search space is an object mapping parameters to how they are drawn, e.g. "
            f'{{"lr": {{"kind": "float", "low": 0.001, "high": 0.1, "log": true}}}} ({HELP})'
        )
    actions = flag_actions(model)
    space: Space = {}
    for name, drawn in raw.items():
        if name not in actions:
            options = ", ".join(option.name for option in engine.model_spec(model).options) or "none"
            raise UserError(
                f"{source}: {name} is neither an option of {model} (its options: {options}) nor a recipe field a study "
                f"can tune ({', '.join(TUNABLE_RECIPE)}); correct or remove it ({HELP})"
            )
        action, takes = actions[name]
        space[name] = parse_param(drawn, action, takes, space, f"{source}: {name}")
    return space


def parse_param(drawn: Any, action: argparse.Action, takes: str, earlier: Space, where: str) -> Param:
    if not isinstance(drawn, dict) or drawn.get("kind") not in KINDS:
        raise UserError(f'{where} needs "kind": one of {", ".join(KINDS)}, e.g. {{"kind": "float", "low": 0.1, ...}}')
    kind, flag = drawn["kind"], action.option_strings[0]
    unknown = set(drawn) - KEYS[kind] - {"kind", "when"}
    if unknown:
        raise UserError(f"{where}: {sorted(unknown)[0]!r} is not a key of a {kind} parameter ({sorted(KEYS[kind])})")
    if kind != "categorical" and (takes in ("bool", "str") or (kind == "float" and takes == "int")):
        words = {"bool": "true or false", "str": "names", "int": "whole numbers"}[takes]
        other = '"int" or "categorical"' if takes == "int" else '"categorical"'
        raise UserError(f'{where}: kind "{kind}" does not fit {flag}, which takes {words}; use {other}')
    when = parse_when(drawn.get("when", {}), earlier, where)
    if kind == "categorical":
        choices = drawn.get("choices")
        if not isinstance(choices, list) or not choices or len({json.dumps(c) for c in choices}) < len(choices):
            raise UserError(f'{where}: "choices" must be a list of different values, e.g. [32, 64, 128]')
        for choice in choices:
            check_value(action, choice, where, "choice")
        return Param(kind, choices=tuple(choices), when=when)
    low, high, log = drawn.get("low"), drawn.get("high"), drawn.get("log", False)
    number = int if kind == "int" else (int, float)
    if not all(isinstance(end, number) and not isinstance(end, bool) for end in (low, high)):
        raise UserError(f'{where}: a {kind} parameter needs "low" and "high", {"whole " * (kind == "int")}numbers')
    if not isinstance(log, bool):
        raise UserError(f'{where}: "log" is true or false, not {json.dumps(log)}')
    for end, value in (("low", low), ("high", high)):
        check_value(action, value, where, end)
    if not low <= high or (log and low <= 0):
        problem = f"low {low} is above high {high}" if low > high else "a log scale needs low above 0"
        raise UserError(f"{where}: {problem}; correct the range")
    if kind == "float":
        low, high = float(low), float(high)
    return Param(kind, low=low, high=high, log=log, when=when)


def check_value(action: argparse.Action, value: Any, where: str, what: str) -> None:
    problem, _ = engine.value_problem(action, value)
    if problem:
        flag = action.option_strings[0]
        raise UserError(
            f"{where}: {what} {json.dumps(value)} is not a value {flag} takes ({problem}); give one it takes"
        )


def parse_when(when: Any, earlier: Space, where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(when, dict) or not all(isinstance(values, list) and values for values in when.values()):
        raise UserError(
            f'{where}: "when" maps parameters drawn before it to lists of values, e.g. {{"optimizer": ["sgd"]}}'
        )
    for name, values in when.items():
        if name not in earlier or earlier[name].kind != "categorical":
            raise UserError(
                f'{where}: "when" names {name}, which is not a categorical parameter before it in the space'
            )
        missing = [value for value in values if value not in earlier[name].choices]
        if missing:
            raise UserError(
                f'{where}: "when" gives {name} the value {json.dumps(missing[0])}, which is not one of its choices'
            )
    return tuple((name, tuple(values)) for name, values in when.items())


def read_space_file(path: Path) -> Any:
    """A space file's contents: JSON, or YAML for .yaml and .yml."""
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(
            f"--space {path}: {error.strerror or error}; give a space file of yours ({HELP}) or one of "
            f"{', '.join(NAMED_SPACES)}"
        ) from None
    try:
        return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(
            f"--space {path} is not valid {'YAML' if path.suffix != '.json' else 'JSON'}: {reason}"
        ) from None


# --------------------------------------------------------------------------------------------
# A model's own space
# --------------------------------------------------------------------------------------------
def range_of(low: float, high: float, kind: str) -> dict[str, Any]:
    if kind == "float":  # ends of three significant figures: 0.00925, not 0.009250000000000001
        low, high = float(f"{low:.3g}"), float(f"{high:.3g}")
    return {"kind": kind, "low": low, "high": high, "log": low > 0 and high / low >= DECADE}


def declared_space(option: engine.ModelOption) -> dict[str, Any] | None:
    """An option's range or choices as its registry entry declares them; None for one without bounds."""
    if option.choices is not None:
        return {"kind": "categorical", "choices": list(option.choices)}
    if option.kind is bool:
        return {"kind": "categorical", "choices": [False, True]}
    if option.kind in (int, float) and option.low is not None and option.high is not None:
        return range_of(option.low, option.high, "int" if option.kind is int else "float")
    return None


def recipe_space(recipe: engine.Recipe) -> dict[str, dict[str, Any]]:
    """The recipe fields that matter for every model, around the model's own values: the learning rate and weight decay
    a decade either way, the batch from a quarter to twice the recipe's; momentum where the optimiser has one, Muon's
    rate where it is Muon."""
    space = {"lr": range_of(recipe.lr / 10, recipe.lr * 10, "float")}
    if recipe.weight_decay > 0:
        space["weight_decay"] = range_of(recipe.weight_decay / 10, recipe.weight_decay * 10, "float")
    batches = sorted({max(1, recipe.batch_size // 4), max(1, recipe.batch_size // 2), recipe.batch_size})
    space["batch_size"] = {"kind": "categorical", "choices": [*batches, 2 * recipe.batch_size]}
    if recipe.optimizer in ("sgd", "muon"):
        space["momentum"] = {"kind": "float", "low": 0.8, "high": 0.99, "log": False}
    if recipe.optimizer == "muon":
        space["muon_lr"] = range_of(recipe.muon_lr / 4, recipe.muon_lr * 4, "float")
    return space


def model_space(model: str) -> dict[str, dict[str, Any]]:
    """``model``'s own space in the file's form: its options as declared and its recipe's fields, then its registry
    entry's ``tuning`` (a parameter's own distribution, or None to leave it out)."""
    spec = engine.model_spec(model)
    derived = {option.name: declared_space(option) for option in spec.options} | recipe_space(spec.recipe)
    merged = derived | spec.tuning
    return {name: drawn for name, drawn in merged.items() if drawn is not None}


def resolve_space(given: str, model: str) -> tuple[str, Space]:
    """--space's value as a label (a name, or the file's path) and the space it names, checked for ``model``."""
    if given in NAMED_SPACES:
        raw = NAMED_SPACES[given] if NAMED_SPACES[given] is not None else model_space(model)
        source = f"--space {given}" if given != "model" else f"{model}'s own search space (its registry entry)"
        return given, parse_space(raw, model, source)
    path = Path(given)
    return str(path), parse_space(read_space_file(path), model, f"--space {path}")


# --------------------------------------------------------------------------------------------
# A trial's parameters as a run
# --------------------------------------------------------------------------------------------
def split_params(model: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's parameters as the model's options and the recipe's fields."""
    spec = engine.model_spec(model)
    options = {name: value for name, value in params.items() if spec.option(name) is not None}
    return options, {name: value for name, value in params.items() if name not in options}


def recipe_for(model: str, params: dict[str, Any], epochs: int) -> engine.Recipe:
    """``model``'s own recipe with a trial's recipe fields, for ``epochs``."""
    fields = split_params(model, params)[1]
    recipe = replace(
        engine.model_spec(model).recipe, epochs=epochs, **{k: v for k, v in fields.items() if k not in BETAS}
    )
    betas = tuple(fields.get(name, default) for name, default in zip(BETAS, recipe.betas, strict=True))
    return replace(recipe, betas=betas)


def options_for(model: str, params: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``model``: a trial's, and the defaults for the rest, checked."""
    return engine.model_spec(model).resolve(model, split_params(model, params)[0], "the trial's parameters")
