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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.checkpoints import read_checkpoint, resume_path
from engine.config import Recipe, RunConfig
from engine.errors import UserError
from engine.registry import MODELS, model_spec

# What --resume may change, and what it records as a change: how the remaining epochs run, not what they mean.
RESUME_MAY_CHANGE = (
    "epochs",
    "device",
    "devices",
    "strategy",
    "num_nodes",
    "collective_timeout",
    "precision",
    "compile",
    "num_workers",
    "progress",
    "logger",
    "val_every",
    "train_accuracy_sample",
    "keep_epoch_checkpoints",
    "profile",
)
# The settings of the analyses a script runs at the end of a run, by argparse destination: each analysis registers its
# own. They are kept in RunConfig.analyses, checked as their flags check them, and --resume may change them (what a
# run shows, not what its epochs meant).
ANALYSIS_SETTINGS: set[str] = set()
# where and whether a run goes: never a setting of its own
NOT_COMPARED = ("out_dir", "resume", "overwrite", "config", "changes")


def register_analysis_settings(*dests: str) -> None:
    """Declare an analysis's settings (its flags' argparse destinations), so runs carry them in RunConfig.analyses."""
    ANALYSIS_SETTINGS.update(dests)


def analysis_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The registered analyses' settings among ``args``, as RunConfig.analyses holds them."""
    return {dest: getattr(args, dest) for dest in sorted(ANALYSIS_SETTINGS) if hasattr(args, dest)}


def may_change_on_resume(dest: str) -> bool:
    return dest in RESUME_MAY_CHANGE or dest in ANALYSIS_SETTINGS


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
    recipe, options, analyses = (saved.get(key, {}) for key in ("recipe", "model_options", "analyses"))
    if not all(isinstance(part, dict) for part in (recipe, options, analyses)):
        raise UserError(
            f"{source}: recipe, model_options and analyses must be mappings of names to values; copy the file again "
            "from its run folder"
        )
    rest = {key: value for key, value in saved.items() if key not in ("recipe", "model_options", "analyses")}
    # an analysis's setting at the top level: a run written before RunConfig.analyses held them
    return {**recipe, **rest, **analyses, **{MODEL_OPTION + name: value for name, value in options.items()}}


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
        set(saved) - {f.name for f in fields(RunConfig)} - ANALYSIS_SETTINGS
        | set(recipe if isinstance(recipe, dict) else ()) - RECIPE_FLAGS - set(FORMER_RECIPE_FIELDS)
    )
    if unknown or "model" not in saved:
        tuned = (
            " (for a tuning study's winner: <out-dir>/retrain/config.json, or trials/0002/config.json for trial 2)"
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
    how_it_runs = (set(RESUME_MAY_CHANGE) | ANALYSIS_SETTINGS) - {"epochs"}
    return [
        describe_change(dest, now[dest], before[dest]) for dest in changed_settings(now, before, set(now) - how_it_runs)
    ]


# --------------------------------------------------------------------------------------------
# A run's settings from its command line, its --config and the checkpoint --resume continues
# --------------------------------------------------------------------------------------------
def model_options_given(args: argparse.Namespace) -> dict[str, Any]:
    """The model options given as flags (or by --config): the flags' values that are not None."""
    given = {name: getattr(args, name) for name in vars(args) if name.startswith(MODEL_OPTION)}
    return {name.removeprefix(MODEL_OPTION): value for name, value in given.items() if value is not None}


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, model: str | None = None
) -> argparse.Namespace:
    """The command line; with --config, the earlier run's settings (checked as their flags check them) are the defaults
    that the flags given override. ``args.settings`` keeps the parser and the flags given, for --resume's checks.

    ``model``: the one model this script trains; a config of another model is refused. Scripts that choose the model by
    --model take the config's as its default.
    """
    settings = Settings(parser, given_flags(parser, argv))
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    path = config_only.parse_known_args(argv)[0].config
    if path is not None:
        saved = read_config(Path(path))
        if model is not None and saved.get("model") != model:
            raise UserError(
                f"--config {path} is a run of {saved.get('model')}, not {model}; give it to the script that trained it "
                f"(its --help says which models it trains)"
            )
        parser.set_defaults(**settings.check(saved, f"--config {path}"))
    args = parser.parse_args(argv)
    args.settings = settings
    return args


def run_config(args: argparse.Namespace, model: str, run_name: str) -> RunConfig:
    """The registered ``model`` with its options and recipe, every setting in ``args`` laid over them."""
    spec = model_spec(model)
    recipe = {name: getattr(args, name) for name in sorted(RECIPE_FLAGS) if getattr(args, name, None) is not None}
    if "betas" in recipe:
        recipe["betas"] = tuple(recipe["betas"])
    source = f"--config {args.config} or the flags" if getattr(args, "config", None) else "the flags"
    options = spec.resolve(model, model_options_given(args), source)
    settings = {
        f.name: getattr(args, f.name)
        for f in fields(RunConfig)
        if f.name not in ("model", "model_options", "recipe", "out_dir", "analyses") and hasattr(args, f.name)
    }
    config = RunConfig(
        model=model,
        model_options=options,
        recipe=replace(spec.recipe, **recipe),
        out_dir=args.out_dir or str(Path("runs") / run_name),
        analyses=analysis_settings(args),
        **settings,
    )
    if config.val_every != 1 and config.recipe.scheduler == "plateau":
        raise UserError(
            f"--val-every {config.val_every} with --scheduler plateau: that schedule lowers the lr after an epoch "
            "whose validation loss did not improve, so it needs one after every epoch; give --val-every 1 or another "
            "--scheduler"
        )
    return config


def config_from_args(args: argparse.Namespace, model: str, run_name: str) -> RunConfig:
    """The run the command line describes; with --resume, the run in --out-dir as it was trained (``resumed``)."""
    config = run_config(args, model, run_name)
    return resumed(config, args, model, run_name) if config.resume is not None else config


def resumed(config: RunConfig, args: argparse.Namespace, model: str, run_name: str) -> RunConfig:
    """The run --resume continues, with its own settings from its checkpoint: a flag given that would change what its
    finished epochs meant is refused; one of ``RESUME_MAY_CHANGE`` is taken and recorded as a change after epoch k."""
    path = resume_path(config)
    checkpoint = read_checkpoint(path) if path.is_file() else None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("run_config"), dict)
        or checkpoint["run_config"].get("model") != model
    ):
        # nothing to continue, no settings to continue with, or another model's: resume_checkpoint says which
        return config
    source = f"the settings in {path}"
    saved = args.settings.check(run_settings(checkpoint["run_config"], source), source)
    now, given = {**vars(args), **flattened(asdict(config), "the command line")}, args.settings.given
    changed = changed_settings(now, saved, given)  # never where or whether a run goes (NOT_COMPARED)
    refused = [dest for dest in changed if not may_change_on_resume(dest)]
    if refused:
        flag = args.settings.action(refused[0]).option_strings[0]
        may_change = [
            action.option_strings[0]
            for dest in (*RESUME_MAY_CHANGE, *sorted(ANALYSIS_SETTINGS))
            if (action := args.settings.action(dest))
        ]
        raise UserError(
            f"--resume continues the run in {config.out_dir} as it was trained, and {flag} would change what its "
            f"finished epochs meant: {describe_change(refused[0], now[refused[0]], saved[refused[0]])}; leave {flag} "
            "out to continue it, or train a new run with another --out-dir (or --overwrite). --resume may change: "
            f"{', '.join(may_change)}"
        )
    merged = argparse.Namespace(
        **{
            **vars(args),
            **{dest: value for dest, value in saved.items() if dest not in given and dest not in NOT_COMPARED},
        }
    )
    epochs_done = int(checkpoint.get("epoch", -1)) + 1
    changes = list(checkpoint["run_config"].get("changes", [])) + [
        {"after_epoch": epochs_done, "setting": dest, "from": normalised(saved[dest]), "to": normalised(now[dest])}
        for dest in changed
    ]
    config = replace(run_config(merged, model, run_name), out_dir=config.out_dir, resume=config.resume, changes=changes)
    finished = Path(config.out_dir, "test.json").is_file() and epochs_done >= config.recipe.whole_epochs
    if finished and config.resume == "last":
        raise UserError(
            f"{config.out_dir} holds a finished run of {saved['epochs']:g} epochs; to train it further give --resume "
            f"with --epochs above {epochs_done}, or start it again with --overwrite"
        )
    return config
