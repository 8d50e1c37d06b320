"""The tuning study, as hyperparameter_tune.py runs it.

    study    search spaces, the study and its storage, the workers that share it, its outputs
    trials   one trial (trained, reported epoch by epoch, pruned, its result kept in its folder), and a worker's loop
             over trials

hyperparameter_tune.py tells the story of a study: open it, run trials until it holds --n-trials, write the outputs,
retrain the winner.
"""

from tuning.study import (
    DEFAULT_EPOCHS,
    DEFAULT_SPACE,
    DEFAULT_TRIALS,
    FINISHED,
    OUT_OF_MEMORY,
    SPACES,
    TUNED_MODEL,
    StudySettings,
    best_trial,
    fail_abandoned_trials,
    fail_running_trials,
    fail_silent_trials,
    format_params,
    open_study,
    places_taken,
    private_optuna,
    recipe_for,
    study_settings,
    this_worker,
    trial_config,
    write_outputs,
)
from tuning.trials import NotNeeded, make_objective, run_trials, settle_abandoned_trials, trial_dir, wait_line

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_SPACE",
    "DEFAULT_TRIALS",
    "FINISHED",
    "OUT_OF_MEMORY",
    "SPACES",
    "TUNED_MODEL",
    "NotNeeded",
    "StudySettings",
    "best_trial",
    "fail_abandoned_trials",
    "fail_running_trials",
    "fail_silent_trials",
    "format_params",
    "make_objective",
    "open_study",
    "places_taken",
    "private_optuna",
    "recipe_for",
    "run_trials",
    "settle_abandoned_trials",
    "study_settings",
    "this_worker",
    "trial_config",
    "trial_dir",
    "wait_line",
    "write_outputs",
]
