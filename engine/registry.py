"""The model registry: a name for every network, with the options it is built with and everything else that belongs to
it.

A model is one ``nn.Module`` class plus one ``register`` call: the options its constructor takes (each with a type, a
default, the values it allows and a line of help), the recipe it trains with, how its weights start, which parameters
learn at which rate, and a line that says what it is. A trained network is its name plus its options (and the number of
classes, which comes from the data): the run's ``config.json`` and model card record both, so any saved file rebuilds it
exactly. The engine reads all of it from here, so a model with its own options, initialisation or parameter groups
needs no change to the engine; every script offers a model's options as flags (``engine.add_model_arguments``).
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from engine.config import Recipe
from engine.errors import UserError
from functions import initialize_using_norm_kaiming


# --------------------------------------------------------------------------------------------
# The model interface: what the engine and the analyses call on a network besides forward()
# --------------------------------------------------------------------------------------------
@runtime_checkable
class FeatureNetwork(Protocol):
    """A network whose penultimate features can be taken: ``forward(x) == classify(forward_features(x))``. The analyses
    of features need it; a network without it still trains, predicts and evaluates."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor: ...

    def classify(self, features: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ProgressAware(Protocol):
    """A network whose training changes with its progress (airbench's stem bias stops learning after a fraction of an
    epoch): the engine calls ``training_progress(epochs)``, epochs done as a float, before every training step."""

    def training_progress(self, epochs: float) -> None: ...


ParameterGroups = Callable[[nn.Module, Recipe], list[dict[str, Any]]]
Statistics = Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
OPTION_KINDS = (bool, int, float, str)


def kaiming_normal(net: nn.Module, data: Any, recipe: Recipe) -> None:
    """The original study's initialisation: Kaiming-normal weights and zero biases in every conv and linear layer."""
    net.apply(initialize_using_norm_kaiming)


def one_group(net: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Every trainable parameter at the recipe's learning rate and weight decay."""
    return [{"params": [p for p in net.parameters() if p.requires_grad]}]


# --------------------------------------------------------------------------------------------
# A model's options
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelOption:
    """One keyword argument of a model's constructor: its type, default, allowed values (``choices``, or the inclusive
    range ``low``..``high`` for numbers) and one line of help. A value from a flag, a config file, a model card or a
    tuning trial passes ``check`` before a network is built with it."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        assert self.kind in OPTION_KINDS, f"option {self.name}: kind must be one of {OPTION_KINDS}"
        assert self.problem(self.default) == "", (
            f"option {self.name}: default {self.default!r} {self.problem(self.default)}"
        )

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """The values it takes, in words."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        kind = "a whole number" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{kind} from {self.low:g} to {self.high:g}"
        return kind if self.low is None else f"{kind} >= {self.low:g}"

    def problem(self, value: Any) -> str:
        """Why ``value`` is not allowed; empty if it is."""
        if self.kind is bool:
            fits = isinstance(value, bool)
        elif self.kind is int:
            fits = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            fits = isinstance(value, str)
        in_range = (
            fits
            and (self.choices is None or value in self.choices)
            and (
                self.kind not in (int, float)
                or ((self.low is None or value >= self.low) and (self.high is None or value <= self.high))
            )
        )
        return "" if in_range else f"must be {self.allowed()}"

    def check(self, value: Any, model: str, source: str) -> Any:
        problem = self.problem(value)
        if problem:
            raise UserError(
                f"{source}: {self.name} = {value!r} for {model} {problem}; give {self.flag} a value it takes, or "
                "leave it out"
            )
        return float(value) if self.kind is float else value

    def parse(self, text: str) -> Any:
        """A flag's text as this option's value (argparse's type): one line and exit status 2 when it does not fit."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.allowed()}, got {text}") from None
        if self.problem(value):
            raise argparse.ArgumentTypeError(f"must be {self.allowed()}, got {text}")
        return value


def with_defaults(options: tuple[ModelOption, ...], **defaults: Any) -> tuple[ModelOption, ...]:
    """The same options with other defaults: a registered variant of a model (e.g. its narrow version)."""
    unknown = set(defaults) - {option.name for option in options}
    assert not unknown, f"no such options: {unknown}"
    return tuple(replace(option, default=defaults.get(option.name, option.default)) for option in options)


# --------------------------------------------------------------------------------------------
# A registry entry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A registry entry. ``network(num_classes=..., **options)`` builds the network; ``options`` declares the keyword
    arguments it takes besides the number of classes. ``initialize(net, data, recipe)`` sets the built network's
    starting weights (``data`` is the run's ``SplitData``: an initialisation may look at the training images).
    ``parameter_groups`` returns optimiser groups; a group's own ``lr`` or ``weight_decay`` (absolute, at the peak of
    the schedule) overrides the recipe's, and the schedule scales every group alike. ``input_statistics(options)``: the
    mean and std a model's inputs must be normalised with when they are its own (pretrained weights), instead of the
    training split's. ``own_script``: the script of its own that trains it (one that caches a frozen backbone's
    features, say), or None where the script that trains any model by name does; the engine only carries it.
    ``tuning``: how the default search space of a tuning study of this model differs from the one derived from its
    options and recipe (docs/tuning.md): a parameter's own distribution, in a --space file's form, or None to leave it
    out; the engine only carries it."""

    network: Callable[..., nn.Module]
    recipe: Recipe
    description: str
    initialize: Callable[[nn.Module, Any, Recipe], None] = kaiming_normal
    parameter_groups: ParameterGroups = one_group
    options: tuple[ModelOption, ...] = ()
    input_statistics: Statistics | None = None
    own_script: str | None = None
    tuning: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def option(self, name: str) -> ModelOption | None:
        return next((option for option in self.options if option.name == name), None)

    def resolve(self, name: str, given: Any, source: str) -> dict[str, Any]:
        """Every option's value: those ``given`` (checked), the defaults for the rest. One line for an unknown or bad
        one.
        """
        if not isinstance(given, dict):
            raise UserError(
                f"{source}: the model options of {name} must be a mapping of option names to values, not a "
                f"{type(given).__name__}"
            )
        unknown = [key for key in given if self.option(key) is None]
        if unknown:
            takes = ", ".join(option.name for option in self.options) or "none"
            raise UserError(
                f"{source}: {unknown[0]} is not an option of {name} (its options: {takes}); leave it out, or choose a "
                "model that has it"
            )
        return {
            option.name: option.check(given[option.name], name, source) if option.name in given else option.default
            for option in self.options
        }

    def build(
        self,
        options: dict[str, Any] | None = None,
        num_classes: int = 10,
        name: str = "the model",
        source: str = "its options",
    ) -> nn.Module:
        """The network with ``options`` (checked; defaults for the rest) and a last layer of ``num_classes``."""
        return self.network(num_classes=num_classes, **self.resolve(name, options or {}, source))


MODELS: dict[str, ModelSpec] = {}


def register(name: str, spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` under ``name``; its options must be keyword arguments of its network (a typo fails at import)."""
    parameters = inspect.signature(spec.network).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for option in (*spec.options, ModelOption("num_classes", int, 10, "")):
        assert takes_any or option.name in parameters, f"{name}: its network takes no keyword argument {option.name}"
    MODELS[name] = spec
    return spec


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def first_line(cls: type) -> str:
    """A class's one-line description: the first line of its docstring."""
    return cls.__doc__.strip().splitlines()[0]


def option_table(specs: dict[str, ModelSpec]) -> dict[str, tuple[ModelOption, dict[str, Any]]]:
    """Each option name the ``specs`` declare: its declaration and each model's default. Models that share an option
    name must declare the same type and allowed values, so that its flag means one thing."""
    table: dict[str, tuple[ModelOption, dict[str, Any]]] = {}
    for model, spec in specs.items():
        for option in spec.options:
            first, defaults = table.setdefault(option.name, (option, {}))
            assert (first.kind, first.choices, first.low, first.high) == (
                option.kind,
                option.choices,
                option.low,
                option.high,
            ), f"option {option.name} is declared two ways (by {next(iter(defaults))} and {model})"
            defaults[model] = option.default
    return table
