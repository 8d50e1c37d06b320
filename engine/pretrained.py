"""torchvision's ImageNet networks and their weight catalogues, for transfer learning.

Its own module, listed among the names ``engine`` loads on first use, because importing torchvision takes about
1.2 s of a 2-core CPU's start-up: a script's --help and a flag mistake answer without it.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import get_model, get_model_weights


def torchvision_network(arch: str) -> nn.Module:
    """torchvision's ``arch`` with random weights, its ImageNet head included."""
    return get_model(arch, weights=None)


def torchvision_weights(arch: str):
    """The enum of ``arch``'s pretrained weights: DEFAULT and the named ones, each with its URL and its transforms."""
    return get_model_weights(arch)
