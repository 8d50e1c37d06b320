"""The one training engine behind every script, built on PyTorch Lightning.

``import engine`` gives the names in ``__all__``: what the scripts, the models and the benchmarks use. Anything else is
the engine's own, reached as ``engine.<module>.<name>`` where a test needs it.

Modules, each one job (docs/DESIGN.md shows the layers):
    config       Recipe and RunConfig: what decides a run
    errors       UserError (one line, exit status 2), RunInterrupted, TrainingDiverged, DiskFull
    files        files written whole or not at all
    images       decoding one image file to RGB uint8 (any mode, size-bounded), resized by area averaging
    official     CIFAR-10's and CIFAR-100's official python files, MD5-checked
    data         reading a data set from disk (official files, any image-folder tree and its cache, download)
    batches      the study's split, training and evaluation batches made on the device
    registry     the model registry and the model interface (FeatureNetwork, ProgressAware)
    card         the model card: what a trained network is and needs, written by a run, read by saved_models
    classifier   the LightningModule and the DataModule
    callbacks    per-epoch line and metrics.csv, divergence guard, config in checkpoints, epoch bar, checkpoint files
    checkpoints  writing and reading checkpoints and weights safely; resume checks
    run_folder   one run per folder (lock, --overwrite), JSON and CSV files
    evaluation   predict (with test-time augmentation), the test report
    plots        curves and confusion matrix
    devices      accelerator, precision (and its autocast outside the Trainer), which process owns the run
    settings     a run's settings from its flags, --config and --resume's checkpoint, checked once; what --resume
                 may change
    flags        the types a flag's value is checked by
    cli          the flags every script shares, in their groups
    help         --help (what most runs need) and --help-all (every flag)
    exits        how a run ends: one line and an exit status (run_cli)
    run          fit and train
    hyperparameters  a run's settings and final metrics for TensorBoard's HPARAMS tab
    pretrained   torchvision's ImageNet networks and their weights (transfer learning)

Parse first, then load what trains: the modules in ``ON_FIRST_USE`` need Lightning, scikit-learn, matplotlib or
torchvision (together 3-4 s of a 2-core CPU's start-up), and load on first use of one of their names (lazy_loader,
the Scientific Python ecosystem's SPEC 1), so a script's --help and its flag errors never wait for them
(docs/RESULTS.md, "Start-up"). Every other module loads with the package.
"""

import sys

# Before anything else loads, so an old Python gets this line rather than an error from deep inside a module.
if sys.version_info < (3, 10):  # noqa: UP036 (ruff assumes the supported version; a user may not have it)
    sys.exit(f"this toolkit needs Python 3.10 or newer; this is Python {sys.version.split()[0]}")

import lazy_loader

from engine.batches import EVAL_BATCH, SplitData, load_split
from engine.card import ModelCard
from engine.checkpoints import load_weights, read_checkpoint, resume_checkpoint, state_dict_mismatch, weights_in
from engine.cli import (
    add_data_arguments,
    add_device_arguments,
    add_model_arguments,
    add_recipe_arguments,
    add_training_arguments,
)
from engine.config import OPTIMIZERS, PRECISIONS, SCHEDULERS, TTA_MODES, WEIGHT_AVERAGES, Recipe, RunConfig
from engine.data import check_outside_data_tree, has_local_dataset, load_dataset
from engine.devices import autocast_for, cpu_has_bf16, resolve_accelerator, resolve_precision, training_device
from engine.errors import RunInterrupted, TrainingDiverged, UserError
from engine.exits import run_cli
from engine.files import write_atomically
from engine.flags import choices_help, epoch_count, former_name, non_negative_int, positive_float, positive_int
from engine.help import advanced, script_parser
from engine.images import UnreadableImage, decode_image
from engine.progress import ProgressLines
from engine.registry import (
    MODELS,
    FeatureNetwork,
    ModelOption,
    ModelSpec,
    ProgressAware,
    first_line,
    model_spec,
    register,
    with_defaults,
)
from engine.run_folder import (
    check_writable_folder,
    claim_run_folder,
    read_json,
    read_metrics_csv,
    register_run_outputs,
    write_csv,
    write_json,
)
from engine.settings import (
    MODEL_OPTION,
    analysis_settings,
    config_from_args,
    differences_from,
    parse_arguments,
    register_analysis_settings,
    value_problem,
)

# Loaded on first use: the names of the modules that import Lightning, scikit-learn, matplotlib or torchvision.
ON_FIRST_USE = {
    "classifier": ["ImageClassifier"],
    "evaluation": ["predict", "test_report", "tta_logits"],
    "plots": ["plot_comparison", "plot_confusion", "save_figure", "styled"],
    "pretrained": ["torchvision_network", "torchvision_weights"],
    "run": ["fit", "for_model", "save_weights", "train"],
}
__getattr__, __dir__, _lazy_names = lazy_loader.attach(__name__, submod_attrs=ON_FIRST_USE)

__all__ = [
    # the model registry and the interface the engine relies on (README.md, "Extending")
    "MODELS",
    "FeatureNetwork",
    "ModelOption",
    "ModelSpec",
    "ProgressAware",
    "first_line",
    "model_spec",
    "register",
    "with_defaults",
    # what decides a run, and its command line
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULERS",
    "TTA_MODES",
    "WEIGHT_AVERAGES",
    "Recipe",
    "RunConfig",
    "add_data_arguments",
    "advanced",
    "add_device_arguments",
    "add_model_arguments",
    "add_recipe_arguments",
    "add_training_arguments",
    "choices_help",
    "config_from_args",
    "differences_from",
    "epoch_count",
    "former_name",
    "non_negative_int",
    "parse_arguments",
    "positive_float",
    "positive_int",
    "analysis_settings",
    "register_analysis_settings",
    "register_run_outputs",
    # a value checked as its flag checks it (a --config file's, a search space's): engine.settings
    "MODEL_OPTION",
    "value_problem",
    "run_cli",
    "script_parser",
    # how a run ends other than well
    "RunInterrupted",
    "TrainingDiverged",
    "UserError",
    # data
    "EVAL_BATCH",
    "SplitData",
    "UnreadableImage",
    "check_outside_data_tree",
    "decode_image",
    "has_local_dataset",
    "load_dataset",
    "load_split",
    # devices
    "autocast_for",
    "cpu_has_bf16",
    "resolve_accelerator",
    "resolve_precision",
    "training_device",
    # run folders, checkpoints, weights and cards
    "ModelCard",
    "ProgressLines",
    "check_writable_folder",
    "claim_run_folder",
    "load_weights",
    "read_checkpoint",
    "read_json",
    "read_metrics_csv",
    "resume_checkpoint",
    "state_dict_mismatch",
    "weights_in",
    "write_atomically",
    "write_csv",
    "write_json",
    # loaded on first use
    *(name for names in ON_FIRST_USE.values() for name in names),
]
