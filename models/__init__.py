"""Every registered model. Importing this package registers them all in ``engine.MODELS``.

    study     CIFAR10Net and the study's modified models (the original study's recipe, Kaiming-normal initialisation)
    fast      FastVGG, past the study, with its own recipe
    airbench  airbench94_muon's network and method: the fast recipe
    transfer  TransferNet, transfer learning's network: a torchvision backbone with a new head (trained by
    transfer_learning.py)

Adding a model: one class in a module here and one ``engine.register(name, engine.ModelSpec(...))`` call
beside it, declaring the options its constructor takes (README, "Extending"); import the module below.
"""

# The study's models first: the registry lists models in the order they register.
from models.study import (
    README_MODELS,
    README_RECIPE,
    CIFAR10Net,
    CIFAR10Net_2,
    CIFAR10Net_3,
    CIFAR10Net_4,
    CIFAR10Net_5,  # isort: skip
    CIFAR10Net_6,
    CIFAR10Net_7,
    CIFAR10Net_optim,
    ConvBN,
    FCBN,
)
from models.fast import FAST_RECIPE, ConvGroup, FastVGG  # isort: skip
from models.airbench import AIRBENCH_RECIPE, AirbenchNet  # isort: skip
from models.transfer import TRANSFER_RECIPE, TransferNet  # isort: skip
