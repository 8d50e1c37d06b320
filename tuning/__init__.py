"""The tuning study, as hyperparameter_tune.py runs it.

    space    search spaces as data: a model's own, the study's, a user's file; checked against the flags
    study    the study and its storage, what defines it (model, space, epochs, sampler, pruner), the workers sharing it
    trials   one trial (trained, reported epoch by epoch, pruned, its result kept in its folder), and a worker's loop
             over trials
    outputs  the study's folder: trials.csv, best_params.json, space.json, Optuna's figures, report.html

hyperparameter_tune.py tells the story of a study: open it, run trials until it holds --n-trials, write the outputs,
retrain the winner.
"""

from tuning.outputs import check_study_folder, mark_study_folder, write_figures, write_outputs, write_space
from tuning.space import (
    NAMED_SPACES,
    draw,
    model_space,
    options_for,
    recipe_for,
    resolve_space,
    space_argument,
    to_json,
    tunable_model,
)
from tuning.study import (
    DEFAULT_EPOCHS,
    DEFAULT_MODEL,
    DEFAULT_PRUNER,
    DEFAULT_SAMPLER,
    DEFAULT_SPACE,
    DEFAULT_TRIALS,
    FINISHED,
    OUT_OF_MEMORY,
    PRUNERS,
    SAMPLERS,
    StudySettings,
    best_trial,
    configure,
    fail_abandoned_trials,
    fail_running_trials,
    fail_silent_trials,
    format_params,
    open_study,
    places_taken,
    private_optuna,
    study_settings,
    this_worker,
    trial_config,
)
from tuning.trials import NotNeeded, make_objective, run_trials, settle_abandoned_trials, trial_dir, wait_line

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_MODEL",
    "DEFAULT_PRUNER",
    "DEFAULT_SAMPLER",
    "DEFAULT_SPACE",
    "DEFAULT_TRIALS",
    "FINISHED",
    "NAMED_SPACES",
    "OUT_OF_MEMORY",
    "PRUNERS",
    "SAMPLERS",
    "NotNeeded",
    "StudySettings",
    "best_trial",
    "check_study_folder",
    "configure",
    "draw",
    "fail_abandoned_trials",
    "fail_running_trials",
    "fail_silent_trials",
    "format_params",
    "make_objective",
    "mark_study_folder",
    "model_space",
    "open_study",
    "options_for",
    "places_taken",
    "private_optuna",
    "recipe_for",
    "resolve_space",
    "run_trials",
    "settle_abandoned_trials",
    "space_argument",
    "study_settings",
    "this_worker",
    "to_json",
    "trial_config",
    "trial_dir",
    "tunable_model",
    "wait_line",
    "write_figures",
    "write_outputs",
    "write_space",
]
