"""Every registered model. Importing this package registers them all in ``engine.MODELS``.

    study     CIFAR10Net and the study's modified models (the original study's recipe, Kaiming-normal initialisation)
    fast      FastVGG, past the study, with its own recipe
    airbench  airbench94_muon's network and method: the fast recipe
    transfer  TransferNet, transfer learning's network: a torchvision backbone with a new head (trained by
    transfer_learning.py)

Adding a model: one class in a module here and one ``engine.register(name, engine.ModelSpec(...))`` call
beside it, declaring the options its constructor takes (README.md, "Extending"); import the module below.
"""

# The registry lists models in the order they register: the study's first.
# isort: off
from models import study
from models import fast
from models import airbench
from models import transfer

# isort: on

__all__ = ["study", "fast", "airbench", "transfer"]
