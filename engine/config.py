"""What decides a run: the recipe (how a network is trained) and the run's settings, written to ``config.json``.

The original study's recipe for CIFAR10Net is ``Recipe()``; every other model's registry entry brings its own. What a
network is (its layer sizes, airbench's whitened stem, ...) is not the recipe's: it is the model's options, declared in
its registry entry and recorded in ``RunConfig.model_options``. The tables of named choices here are the ones every
script's flags offer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("adam", "adamw", "sgd", "muon")
SCHEDULERS = {
    "none": "constant",
    "cosine": "linear warm-up, then cosine decay to 0, per step",
    "onecycle": "linear warm-up, then linear decay to 0, per step",
    "plateau": "halve the lr after an epoch without a lower validation loss",
    "linear": "linear decay from the peak to 0, per step, no warm-up (airbench94_muon)",
    "triangle": "0.2 of the peak, up to the peak at 23% of the steps, down to 0.07 of it at the end (airbench94)",
}
WEIGHT_AVERAGES = {
    "none": "the network as trained",
    "lookahead": "airbench94's lookahead: every 5 steps the network is pulled to an average of its weights that "
    "follows it closely at first and ever more slowly; at the end it is the average",
}
LOGGERS = {
    "tensorboard": "TensorBoard event files in <run folder>/tensorboard (tensorboard --logdir runs)",
    "csv": "Lightning's CSV log in <run folder>/csv_log",
    "none": "no logger (metrics.csv and curves.png are written all the same)",
}
# --precision: auto (ours: the precision that pays on the device) and every value Lightning 2.x accepts (its aliases
# too); tests/test_settings.py checks this against Lightning's own list, so a bad value fails at the command line, not
# in the Trainer.
PRECISIONS = (
    "auto",
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "32",
    "16",
    "bf16",
    "64",
)
TTA_MODES = {
    "none": "the image alone",
    "flip": "the image and its mirror image, averaged",
    "flip-translate": "half the flip average, half the flip averages of the image shifted one pixel up-left and one "
    "down-right (reflect-padded): 6 forward passes",
    "selective": "the image alone, but for the fifth of each batch the network is least sure of (lowest top "
    "probability), flip-translate's six views (hiverge's): 2 forward passes",
}
SELECTIVE_FRACTION = 0.2  # of each batch, the least confident images, which selective TTA looks at six ways


@dataclass
class Recipe:
    """How a network is trained. Defaults are the original study's recipe for CIFAR10Net."""

    # whole passes, or with a fraction: the last pass trains that part of its batches (airbench94 trains 9.9)
    epochs: float = 100
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    scheduler: str = "none"
    warmup_epochs: float = 0.0
    augment: str = "study"
    tta: str = "none"
    # The pieces of airbench's method, each off unless a recipe asks for it (docs/RESULTS.md measures each).
    # loss summed over the batch, weight decay per 1,024 examples whatever the lr (airbench's form)
    decoupled: bool = False
    muon_lr: float = 0.24  # with optimizer muon: the lr of the convolution filters, which Muon orthogonalises
    muon_momentum: float = 0.6
    # with optimizer muon: each filter renormalised before every N-th step (airbench: every step)
    muon_renorm_every: int = 1
    # with optimizer muon: the filters' decay, read as --weight-decay is (airbench: none)
    muon_weight_decay: float = 0.0
    # with optimizer muon: the filters of one shape orthogonalised in one call (hiverge's; the same arithmetic)
    muon_batched: bool = False
    weight_average: str = "none"

    @property
    def whole_epochs(self) -> int:
        """The epochs a run goes through, the last in part where ``epochs`` has a fraction."""
        return math.ceil(self.epochs)

    def training_steps(self, steps_per_epoch: int) -> int:
        return training_steps(self.epochs, steps_per_epoch)


def training_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimisation steps in a run of ``epochs``: a fraction of an epoch is rounded up to whole steps, as airbench94."""
    return math.ceil(epochs * steps_per_epoch)


@dataclass
class RunConfig:
    """Everything that decides a run; written to ``config.json`` in the run folder."""

    model: str
    model_options: dict[str, Any] = field(default_factory=dict)  # every option of the model, given or default
    recipe: Recipe = field(default_factory=Recipe)
    data_dir: str = "./data"
    dataset: str = "auto"  # which official data set --data-dir holds or downloads: auto, cifar10, cifar100
    out_dir: str = ""
    seed: int = 0
    limit_train: int | None = None
    num_workers: int = 2
    device: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    # seconds a process of a data-parallel run waits for the others (to connect, to exchange gradients and metrics)
    # before it gives up: a node that froze or lost its network ends the run with one line, not 30 minutes of silence
    collective_timeout: float = 300.0
    precision: str = "auto"
    compile: bool = False
    resume: str | None = None
    overwrite: bool = False
    validation: bool = True  # False: train on all 50,000 training images, no validation split (a final run)
    # the evaluation passes after every N-th epoch and the last (0: none); the epochs between record the training loss
    val_every: int = 1
    # training images measured for train accuracy; None: as many as validate, or 5,000
    train_accuracy_sample: int | None = None
    # every epoch's checkpoint kept as epoch-NNN.ckpt: accuracy against time, after the run
    keep_epoch_checkpoints: bool = False
    profile: bool = False  # Lightning's SimpleProfiler: where the Trainer's time goes, in fit-profile.txt
    val_fraction: float = 0.1  # of the training images, validated on: CIFAR-10's 5,000 of 50,000 (the study's split)
    progress: bool | None = None  # None: progress bars only when the output is a terminal
    logger: str = "tensorboard"
    # the settings of the analyses at the end of the run (plots of the features, say), by their flags' argparse names:
    # each analysis registers its own (engine.register_analysis_settings); the engine carries them and never reads them
    analyses: dict[str, Any] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)  # what each --resume changed, after which epoch
