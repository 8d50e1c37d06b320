"""The run folder: one run per folder, held while the run lives, and the plain files a run writes there.

``claim_run_folder`` checks the folder can be written, takes an operating-system lock on it (a second live run
into it stops at once; a killed run leaves no lock behind), refuses another run's results unless asked to
continue (--resume) or replace them (--overwrite), and clears the temporary files a kill left.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from engine.config import RunConfig
from engine.data import check_outside_data_tree
from engine.devices import is_main_process
from engine.errors import UserError
from engine.files import is_temporary_copy, write_atomically
from engine.registry import model_spec

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "seconds")
RESULT_FILES = ("metrics.csv", "last.ckpt", "best.ckpt", "model.pth", "test.json")
# What --overwrite removes: a run's files, its evaluations and exports (stale once its weights are replaced), and the
# files of the analyses at its end (each analysis registers its own: register_run_outputs)
RUN_OUTPUTS = [
    "config.json",
    "model.json",
    *RESULT_FILES,
    "epoch-*.ckpt",
    "curves.png",
    "confusion_matrix.png",
    "tensorboard",
    "csv_log",
    "evaluation-*.json",
    "evaluation-*-confusion.png",
    "*.onnx",
    "*.onnx.json",
    "*.pt2",
    "*.pt2.json",
]
# What a run writes besides its weights: config.json, model.json, metrics.csv, the curves, the confusion matrix,
# TensorBoard's events and the analyses' figures. Measured: 1.7 MB for 2 epochs on 600 images, analyses included; a
# figure of 45,000 points and 100 epochs of events take more, so this bounds them generously.
SMALL_FILES_BYTES = 16 * 2**20
# A checkpoint holds the weights and the optimiser's state: with Adam two values per weight (CIFAR10Net's last.ckpt is
# 3.0 times its weights, measured), and room for a weight average's copy.
CHECKPOINT_WEIGHTS = 4
LOCK_FILE = ".lock"
held_run_folders: dict[Path, tuple[FileLock, bool]] = {}  # folder: its lock, and whether this run created the folder


def register_run_outputs(*patterns: str) -> None:
    """Declare the files an analysis writes into a run folder (glob patterns), so --overwrite removes them too."""
    RUN_OUTPUTS.extend(pattern for pattern in patterns if pattern not in RUN_OUTPUTS)


def weights_bytes(config: RunConfig) -> int:
    """The bytes of the run's network (weights and buffers), counted on a copy built on the meta device: no memory, no
    data (its last layer has ten outputs; the data's classes are not known yet)."""
    with torch.device("meta"):
        net = model_spec(config.model).build(config.model_options, name=config.model)
    return sum(tensor.numel() * tensor.element_size() for tensor in (*net.parameters(), *net.buffers()))


def space_needed(config: RunConfig) -> int:
    """The most a run has on disk at once: model.pth, last.ckpt and best.ckpt and the temporary copy of the checkpoint
    being replaced (with --keep-epoch-checkpoints, every epoch's too), and the small files."""
    weights = weights_bytes(config)
    checkpoints = 3 + (config.recipe.whole_epochs if config.keep_epoch_checkpoints else 0)
    return weights + checkpoints * CHECKPOINT_WEIGHTS * weights + SMALL_FILES_BYTES


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and the folders above it that do not exist yet, deepest first: what making it would make."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def check_writable_folder(
    folder: Path, flag: str = "--out-dir", need: int = SMALL_FILES_BYTES, purpose: str = "what is written there"
) -> None:
    """Create ``folder`` if needed and make sure ``need`` bytes fit on its disk and files can be written there; one line
    naming the problem otherwise, and no folder left behind that this made."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file; give a folder")
    missing = missing_folders(folder)
    free = shutil.disk_usage(missing[-1].parent if missing else folder).free
    if free < need:  # asked before anything is made
        raise UserError(
            f"the disk of {flag} {folder} has {free / 2**20:.0f} MB free and {purpose} needs about "
            f"{need / 2**20:.0f} MB; free some space or choose another {flag}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        for path in missing:
            with contextlib.suppress(OSError):
                path.rmdir()
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            raise UserError(f"{flag} {folder} lies under a file, not a folder; give a folder path") from None
        raise UserError(f"cannot write in {flag} {folder} ({error.strerror}); choose another {flag}") from None


def remove_temporary_files(folder: Path) -> None:
    """Delete the half-written temporary copies ``write_atomically`` leaves when a process is killed mid-write."""
    for path in folder.iterdir():
        if path.is_file() and is_temporary_copy(path):
            path.unlink(missing_ok=True)


def continues_this_folder(config: RunConfig, run_dir: Path) -> bool:
    return config.resume == "last" or (
        config.resume is not None and Path(config.resume).resolve().parent == run_dir.resolve()
    )


def remove_run_outputs(run_dir: Path) -> None:
    for pattern in RUN_OUTPUTS:
        for path in run_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def keep_earlier_results(config: RunConfig, run_dir: Path) -> None:
    """Refuse a folder that holds another run's results, unless this run continues it (--resume) or replaces it
    (--overwrite).

    A run that stopped before its first checkpoint (the disk filled up, say) left nothing to continue or keep: its files
    are removed and the folder reused, so the same command starts it again."""
    results = [name for name in RESULT_FILES if (run_dir / name).exists()]
    if not results or continues_this_folder(config, run_dir):
        return
    if not config.overwrite and results == ["metrics.csv"]:
        remove_run_outputs(run_dir)
        print(f"{run_dir} held a run that stopped before its first checkpoint (nothing to continue): starting it again")
        return
    if not config.overwrite:
        finished = (run_dir / "test.json").exists()
        way_on = (
            "train it further with --resume --epochs N (more epochs than it has)"
            if finished
            else "continue it with --resume"
        )
        raise UserError(
            f"{run_dir} holds {'a finished' if finished else 'an unfinished'} run ({', '.join(results)}); {way_on}, "
            "keep it and give another --out-dir, or replace it with --overwrite"
        )
    remove_run_outputs(run_dir)
    print(f"--overwrite: removed the earlier run's files from {run_dir}")


def claim_run_folder(config: RunConfig) -> Path:
    """Hold ``config.out_dir`` for this run: outside the data tree, writable, locked against a second live run, holding
    no other run's results.

    Call it before any slow work. Idempotent within a process; ``release_run_folder`` lets go. The lock is the
    operating system's, so a killed run never leaves its folder locked.
    """
    run_dir = Path(config.out_dir)
    if run_dir.resolve() in held_run_folders or not is_main_process():
        # the extra data-parallel processes share the first's claim
        return run_dir
    if config.resume is not None and config.overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite replaces it; give one of them")
    check_outside_data_tree(run_dir, config.data_dir)  # before the folder is made: it would become a class of the data
    created = not run_dir.exists()
    purpose = f"a run of {config.model} (its checkpoints and files)"
    check_writable_folder(run_dir, need=space_needed(config), purpose=purpose)
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"another run is using {run_dir} right now; wait for it to end, or give another --out-dir"
        ) from None
    held_run_folders[run_dir.resolve()] = (lock, created)
    try:
        keep_earlier_results(config, run_dir)
        remove_temporary_files(run_dir)  # left by a kill; while the folder is ours nobody else writes there
    except BaseException:
        release_run_folder(run_dir)
        raise
    return run_dir


def release_run_folder(run_dir: Path) -> None:
    """Let go of the folder; one this run created and left empty (it failed before writing anything) is removed."""
    lock, created = held_run_folders.pop(Path(run_dir).resolve(), (None, False))
    if lock is None:
        return
    lock.release()
    if created and [path.name for path in run_dir.iterdir()] == [LOCK_FILE]:
        (run_dir / LOCK_FILE).unlink()
        run_dir.rmdir()


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: Path, value: Any) -> None:
    write_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | tuple[str, ...]) -> None:
    """``rows`` as a CSV table of ``columns`` (other keys left out), written atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    write_csv(path, history, METRIC_COLUMNS)


def read_metrics_csv(path: Path) -> list[dict[str, float | None]]:
    """metrics.csv as written; an empty cell (no validation split) reads as None."""
    with open(path, newline="") as handle:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(handle)]
