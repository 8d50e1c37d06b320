"""The model registry: a name for every network, with everything that belongs to it.

A model is one ``nn.Module`` class plus one ``register`` call: how to build it, the recipe it trains with, how its
weights start, which parameters learn at which rate, and a line that says what it is. The engine reads all of
it from here, so a model with its own initialisation or parameter groups needs no change to the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from engine.config import Recipe
from functions import UserError, initialize_using_norm_kaiming

ParameterGroups = Callable[[nn.Module, Recipe], list[dict[str, Any]]]
# The recipe's fields that only some models implement: a model's entry lists the ones it does (``options``).
MODEL_OPTIONS = ("whiten", "dirac", "freeze_norm_weights", "norm_bias_lr_scale")


def kaiming_normal(net: nn.Module, data: Any, recipe: Recipe) -> None:
    """The README's initialisation: Kaiming-normal weights and zero biases in every conv and linear layer."""
    net.apply(initialize_using_norm_kaiming)


def keep_weights(net: nn.Module, data: Any, recipe: Recipe) -> None:
    """For a network that arrives with its weights (pretrained): nothing to initialise."""


def one_group(net: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Every trainable parameter at the recipe's learning rate and weight decay."""
    return [{"params": [p for p in net.parameters() if p.requires_grad]}]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry. ``initialize(net, data, recipe)`` sets the built network's starting weights (``data`` is the
    run's ``SplitData``: an initialisation may look at the training images). ``parameter_groups`` returns optimiser
    groups; a group's own ``lr`` or ``weight_decay`` (absolute, at the peak of the schedule) overrides the recipe's,
    and the schedule scales every group alike. ``options``: the recipe's MODEL_OPTIONS this model implements."""

    build: Callable[[], nn.Module]
    recipe: Recipe
    description: str
    initialize: Callable[[nn.Module, Any, Recipe], None] = kaiming_normal
    parameter_groups: ParameterGroups = one_group
    options: frozenset[str] = frozenset()


MODELS: dict[str, ModelSpec] = {}


def register(name: str, spec: ModelSpec) -> ModelSpec:
    MODELS[name] = spec
    return spec


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def check_model_options(name: str, model: ModelSpec, recipe: Recipe) -> None:
    """A recipe that asks for a property its model does not have is refused, rather than silently ignored."""
    defaults = Recipe()
    for option in MODEL_OPTIONS:
        if getattr(recipe, option) != getattr(defaults, option) and option not in model.options:
            raise UserError(f"--{option.replace('_', '-')} is a property of the airbench models, which {name} does not have; "
                            f"leave it out, or choose --model Airbench94 or Airbench94_muon")


def first_line(cls: type) -> str:
    """A class's one-line description: the first line of its docstring."""
    return cls.__doc__.strip().splitlines()[0]
