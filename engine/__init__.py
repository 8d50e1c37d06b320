"""The one training engine behind every script, built on PyTorch Lightning. ``import engine`` gives its public names.

Modules, each one job (docs/DESIGN.md shows the layers):
    config       Recipe and RunConfig: what decides a run
    images       decoding one image file to RGB uint8 (any mode, size-bounded), resized by area averaging
    official     CIFAR-10's and CIFAR-100's official python files, MD5-checked
    data         reading a data set from disk (official files, any image-folder tree and its cache, download)
    batches      the study's split, training and evaluation batches made on the device
    registry     the model registry: a model's options, build, recipe, initialisation, parameter groups, description
    card         the model card: what a trained network is and needs, written by a run, read by saved_models
    classifier   the LightningModule (loss, optimiser over the model's parameter groups, schedules, metrics), the
      DataModule
    callbacks    per-epoch line and metrics.csv, divergence guard, config in checkpoints, epoch bar, atomic checkpoint
      files
    checkpoints  writing and reading checkpoints and weights safely; resume checks
    run_folder   one run per folder (lock, --overwrite), JSON and CSV files
    evaluation   predict (with test-time augmentation), the test report
    plots        curves and confusion matrix
    devices      accelerator, precision (and its autocast outside the Trainer), which process owns the run
    errors       RunInterrupted, TrainingDiverged, DiskFull
    settings     one check for settings from flags, --config and --resume's checkpoint; what --resume may change
    cli          shared flags, config from flags, exit statuses (run_cli)
    run          fit and train
    pretrained   torchvision's ImageNet networks and their weights (transfer learning)

Parse first, then load what trains: the modules in ``ON_FIRST_USE`` need Lightning, scikit-learn, matplotlib or
torchvision (together 3-4 s of a 2-core CPU's start-up), and load on first use of one of their names (lazy_loader,
the Scientific Python ecosystem's SPEC 1), so a script's --help and its flag errors never wait for them
(docs/RESULTS.md, "Start-up"). Every other module loads with the package.
"""

import lazy_loader

from engine.batches import EVAL_BATCH, EvalBatches, SplitData, TrainBatches, epoch_seed, load_split
from engine.card import ModelCard
from engine.checkpoints import (
    load_weights,
    read_checkpoint,
    resume_checkpoint,
    saved_progress,
    state_dict_mismatch,
    weights_in,
)
from engine.cli import (
    DEVICES,
    add_data_arguments,
    add_device_arguments,
    add_model_arguments,
    add_recipe_arguments,
    add_run_arguments,
    add_training_arguments,
    beta,
    choices_help,
    config_from_args,
    interrupted_message,
    non_negative_float,
    non_negative_int,
    parse_arguments,
    positive_float,
    positive_int,
    resume_command,
    run_cli,
)
from engine.config import LOGGERS, OPTIMIZERS, PRECISIONS, SCHEDULERS, TTA_MODES, WEIGHT_AVERAGES, Recipe, RunConfig
from engine.data import DATASETS, INPUT_SIZE, check_outside_data_tree, has_local_dataset, load_dataset, split_train_val
from engine.official import DatasetArrays
from engine.devices import (
    autocast_for,
    cpu_has_bf16,
    is_main_process,
    resolve_accelerator,
    resolve_precision,
    training_device,
)
from engine.errors import DiskFull, RunInterrupted, TrainingDiverged
from engine.images import MAX_DECODED_PIXELS, UnreadableImage, decode_image
from engine.progress import ProgressLines, on_terminal, progress_enabled, watched
from engine.registry import (
    MODELS,
    ModelOption,
    ModelSpec,
    first_line,
    kaiming_normal,
    model_spec,
    one_group,
    option_table,
    register,
    with_defaults,
)
from engine.run_folder import (
    LOCK_FILE,
    RESULT_FILES,
    check_writable_folder,
    claim_run_folder,
    read_json,
    read_metrics_csv,
    release_run_folder,
    write_csv,
    write_json,
    write_metrics_csv,
)
from engine.settings import differences_from
from functions import UserError

# Loaded on first use: the names of the modules that import Lightning, scikit-learn, matplotlib or torchvision.
ON_FIRST_USE = {
    "callbacks": [
        "DIVERGED_LOSS",
        "AtomicCheckpointIO",
        "ConfigInCheckpoint",
        "DivergenceGuard",
        "EpochProgressBar",
        "Lookahead",
        "RunRecorder",
        "lookahead_decay",
    ],
    "classifier": ["CIFAR10DataModule", "ImageClassifier", "learning_rate_factor"],
    "evaluation": ["accuracy_by_tta", "least_confident", "predict", "test_report", "tta_logits"],
    "plots": ["plot_comparison", "plot_confusion", "plot_curves", "save_figure"],
    "pretrained": ["torchvision_network", "torchvision_weights"],
    "run": ["Analysis", "Fitted", "finish_run", "fit", "for_model", "model_card", "save_weights", "train"],
}
__getattr__, __dir__, _lazy_names = lazy_loader.attach(__name__, submod_attrs=ON_FIRST_USE)
