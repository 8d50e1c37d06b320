"""Bad inputs (issue #34): special files among the images, a model card edited by hand, a tree of damaged images, a
class the split leaves without training images, an image replaced under the cache, a damaged last.ckpt, a small disk,
a read-only --out folder. Each is met as a user meets it: real FIFOs and links, a real truncated checkpoint, an edited
card, and a real small or read-only file system where one can be mounted. Nothing here may block: a command that could
hang runs under a timeout."""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import engine
import engine.data as data_module
import engine.run_folder
import export
import main as main_script
import predict
from conftest import run_command, synthetic_arrays, to_pil, write_image_folder

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "pretrained" / "FastVGG_narrow"
PATIENCE_S = 300  # far more than any command here takes; a command that blocks fails the test instead of hanging it
QUICK = ("--epochs", "2", "--batch-size", "32", "--augment", "none", "--no-tsne", "--no-progress", "--device", "cpu")


def command(*argv, cwd: Path = REPO, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """A script run as a user runs it, under a timeout (and, given ``memory_limit``, an address-space limit)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run(
        [sys.executable, *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=PATIENCE_S,
        preexec_fn=limit if memory_limit else None,
    )


@contextlib.contextmanager
def deadline(seconds: int = PATIENCE_S):
    """Fail, rather than hang, when the code inside waits too long (an open() of a FIFO is interrupted by the alarm)."""

    def expired(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def printed_command(line: str, marker: str = "with: ") -> list[str]:
    """The command a message prints after ``marker``, as argv after "python SCRIPT"."""
    words = shlex.split(line.split(marker, 1)[1])
    assert words[0] == "python", line
    return words[2:]


def can_mount_tmpfs() -> bool:
    """Whether this process may mount a file system of its own in a private mount namespace (root, with unshare)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]
    return subprocess.run(probe, capture_output=True, timeout=60).returncode == 0


needs_tmpfs = pytest.mark.skipif(
    not can_mount_tmpfs(), reason="mounting a small or read-only tmpfs needs root and unshare"
)


def on_tmpfs(mount: Path, options: str, shell: str) -> subprocess.CompletedProcess:
    """``shell`` run with a fresh tmpfs (``options``) at ``mount``, in a mount namespace of its own: the file system
    exists only for that command and goes with it, whatever happens to the test."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} && {shell}"
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=PATIENCE_S,
    )


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    to_pil(synthetic_arrays(10, 10).test_images[3]).save(path)
    return path


# --------------------------------------------------------------------------------------------
# predict.py and special files
# --------------------------------------------------------------------------------------------
def test_a_fifo_named_on_the_command_line_is_listed_and_does_not_block(tmp_path, photo):
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    done = command(REPO / "predict.py", fifo, photo)
    assert done.returncode == 2 and done.stdout.splitlines()[-1].startswith(f"{photo}: ")
    assert done.stderr.splitlines() == [
        f"{fifo} is a FIFO (named pipe), not a file of image data; replace it with the image file",
        "error: 1 of 2 images could not be used (listed above); 1 was predicted",
    ]


def test_every_entry_of_a_folder_that_is_not_used_is_listed_with_its_reason(tmp_path, photo):
    folder = tmp_path / "holiday"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(photo, folder / name)
    (folder / "c-link.png").symlink_to(folder / "a.png")  # a link to an image is an image
    os.mkfifo(folder / "d-fifo.jpg")
    (folder / "e-loop.jpg").symlink_to(folder / "e-loop.jpg")
    (folder / "f-dangling.png").symlink_to(tmp_path / "deleted.png")
    (folder / "g-notes.jpg").write_text("not pixels")
    (folder / "h-cut.png").write_bytes(photo.read_bytes()[:60])
    (folder / "i-sub.png").mkdir()  # a folder, searched only with --recursive
    done = command(REPO / "predict.py", folder)
    assert done.returncode == 2
    assert [line.split(":")[0] for line in done.stdout.splitlines()[1:]] == [
        str(folder / name) for name in ("a.png", "b.png", "c-link.png")
    ]
    lines = done.stderr.splitlines()
    assert lines[:3] == [
        f"{folder / 'd-fifo.jpg'} is a FIFO (named pipe), not a file of image data; replace it with the image file",
        f"{folder / 'e-loop.jpg'} is a symbolic link that leads back to itself (a loop); delete it or point it at an "
        "image file",
        f"{folder / 'f-dangling.png'} is a symbolic link to {tmp_path / 'deleted.png'}, which does not exist; restore "
        "that file or delete the link",
    ]
    assert lines[3].startswith(f"{folder / 'g-notes.jpg'} cannot be read as an image")
    assert lines[4].startswith(f"{folder / 'h-cut.png'} cannot be read as an image")
    assert lines[5:] == ["error: 5 of 8 images could not be used (listed above); 3 were predicted"]


def test_one_good_image_a_fifo_and_a_dangling_link_do_not_pass_without_a_word(tmp_path, photo):
    folder = tmp_path / "holiday"
    folder.mkdir()
    shutil.copy(photo, folder / "good.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "gone.jpg").symlink_to("gone-for-good.jpg")
    done = command(REPO / "predict.py", folder)
    assert done.returncode == 2 and done.stdout.splitlines()[-1].startswith(f"{folder / 'good.png'}: ")
    assert done.stderr.splitlines() == [
        f"{folder / 'gone.jpg'} is a symbolic link to gone-for-good.jpg, which does not exist; restore that file or "
        "delete the link",
        f"{folder / 'pipe.png'} is a FIFO (named pipe), not a file of image data; replace it with the image file",
        "error: 2 of 3 images could not be used (listed above); 1 was predicted",
    ]


# --------------------------------------------------------------------------------------------
# A model card is input too
# --------------------------------------------------------------------------------------------
def edited_card(tmp_path: Path, **changes) -> Path:
    """A copy of the shipped model whose model.json has ``changes``."""
    run = tmp_path / "edited"
    shutil.copytree(SHIPPED, run)
    card = engine.read_json(run / "model.json")
    engine.write_json(run / "model.json", {**card, **changes})
    return run


def test_an_image_size_of_100000_is_refused_before_any_image_is_resized(tmp_path, photo):
    """Before, this resized the photo to 100000 x 100000 (24.3 GB): under the limit here, a MemoryError traceback."""
    run = edited_card(tmp_path, image_size=100_000)
    done = command(REPO / "predict.py", "--run", run, photo, memory_limit=8 * 2**30)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {run / 'model.json'} is not a model card this toolkit wrote (image_size is 100000, and every network "
        "here takes 32x32 images); correct it, or copy it again from the run that wrote it"
    ]


CARD_EDITS = {
    "image size 33": ({"image_size": 33}, "image_size is 33, and every network here takes 32x32 images"),
    "image size as text": ({"image_size": "32"}, "image_size is '32', and every network here takes 32x32 images"),
    "a mean above 1": ({"mean": [0.5, 5, 0.5]}, "mean must be 3 numbers from 0 to 1"),
    "a mean that is no number": ({"mean": [0.5, float("nan"), 0.5]}, "mean must be 3 numbers from 0 to 1"),
    "a std of 0": ({"std": [0.2, 0, 0.2]}, "std must be 3 numbers above 0 and at most 1"),
    "an infinite std": ({"std": [0.2, float("inf"), 0.2]}, "std must be 3 numbers above 0 and at most 1"),
    "a class named twice": ({"classes": ["cat"] * 10}, "the class names must all differ"),
    "versions as text": ({"versions": "torch 2"}, "versions must map library names to their versions"),
    "a commit as a number": ({"commit": 5}, "commit must be a git commit's name or null"),
}


@pytest.mark.parametrize("case", CARD_EDITS)
def test_every_card_field_is_checked_in_one_line(monkeypatch, capsys, tmp_path, photo, case):
    changes, problem = CARD_EDITS[case]
    run = edited_card(tmp_path, **changes)
    code, out, err = run_command(predict, monkeypatch, capsys, "--run", run, "--device", "cpu", photo)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"error: {run / 'model.json'} is not a model card this toolkit wrote ({problem}")
    assert err.endswith("; correct it, or copy it again from the run that wrote it\n")
    shutil.copy(SHIPPED / "model.json", run / "model.json")  # the fix it names
    code, out, err = run_command(predict, monkeypatch, capsys, "--run", run, "--device", "cpu", photo)
    assert (code, err) == (0, "") and out.splitlines()[-1].startswith(f"{photo}: ")


# --------------------------------------------------------------------------------------------
# A tree's unusable files, all at once
# --------------------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data", synthetic_arrays())


def test_a_class_folder_of_damaged_images_is_listed_at_once_and_the_fix_works(monkeypatch, capsys, tmp_path, tree):
    frogs = sorted((tree / "train" / "frog").iterdir())
    originals = {path: path.read_bytes() for path in frogs}
    for path in frogs:
        path.write_bytes(originals[path][:40])
    flags = ("--data-dir", tree, "--out-dir", tmp_path / "run", *QUICK)
    code, _, err = run_command(main_script, monkeypatch, capsys, *flags)
    lines = err.splitlines()
    assert code == 2 and len(lines) > 1, "one file per run"
    assert len(frogs) > data_module.LISTED_FILES and len(lines) == data_module.LISTED_FILES + 1
    assert [line.split(" cannot be read as an image (")[0] for line in lines[:-1]] == [
        str(path) for path in frogs[: data_module.LISTED_FILES]
    ]
    assert lines[-1] == (
        f"error: {len(frogs)} files of {tree} cannot be used (the first {data_module.LISTED_FILES} are listed above; "
        f"train/frog: {len(frogs)}); copy them again or delete them, then run the same command again"
    )
    for path, content in originals.items():  # copied again
        path.write_bytes(content)
    code, _, err = run_command(main_script, monkeypatch, capsys, *flags)
    assert (code, err) == (0, "")


def test_every_entry_a_tree_cannot_list_is_named_at_once_and_nothing_blocks(capsys, tree):
    cats, dogs = sorted((tree / "train" / "cat").iterdir()), sorted((tree / "test" / "dog").iterdir())
    for path in (cats[0], dogs[0], dogs[1]):
        path.unlink()
    os.mkfifo(cats[0])
    dogs[0].symlink_to(tree / "elsewhere.png")
    dogs[1].symlink_to(dogs[1])
    cats[1].write_bytes(b"")
    with deadline(), pytest.raises(engine.UserError) as error:
        data_module.load_dataset(tree)
    assert capsys.readouterr().err.splitlines() == [
        f"{cats[0]} is a FIFO (named pipe), not a file of image data; replace it with the image file",
        f"{cats[1]} is empty (0 bytes); delete it or copy it again",
        f"{dogs[0]} is a symbolic link to {tree / 'elsewhere.png'}, which does not exist; restore that file or delete "
        "the link",
        f"{dogs[1]} is a symbolic link that leads back to itself (a loop); delete it or point it at an image file",
    ]
    assert str(error.value) == (
        f"4 files of {tree} cannot be used (listed above; train/cat: 2, test/dog: 2); copy them again or delete them, "
        "then run the same command again"
    )


# --------------------------------------------------------------------------------------------
# A class the split leaves without a training image
# --------------------------------------------------------------------------------------------
def test_a_class_the_split_leaves_without_training_images_is_named_and_the_fix_works(monkeypatch, capsys, tmp_path):
    arrays = synthetic_arrays(10, 20)  # one training image per class
    tree = write_image_folder(tmp_path / "data", arrays)
    _, val = data_module.split_train_val(10)
    unseen = arrays.classes[int(val[0])]  # the tree lists one image per class, in label order
    flags = ("--data-dir", tree, *QUICK, "--logger", "none")
    code, _, err = run_command(main_script, monkeypatch, capsys, *flags, "--out-dir", tmp_path / "run")
    notes = [line for line in err.splitlines() if line.startswith("note:")]  # (a warning on so few steps may come too)
    assert code == 0 and notes == [
        f"note: the 90%/10% split of the 10 training images leaves the class '{unseen}' without a training image, so "
        "the model cannot learn it; give it more images, or train on every image with --no-validation"
    ]
    code, _, err = run_command(
        main_script, monkeypatch, capsys, *flags, "--no-validation", "--out-dir", tmp_path / "all"
    )
    assert code == 0 and "note:" not in err


# --------------------------------------------------------------------------------------------
# The cache and an image replaced with cp -p
# --------------------------------------------------------------------------------------------
def test_an_image_replaced_by_one_of_the_same_size_and_time_rebuilds_the_cache(tmp_path, tree):
    """cp -p keeps the size (both are uncompressed 32x32 PNGs) and the modification time; the change time moves."""
    victim, donor = sorted((tree / "train" / "cat").iterdir())[0], tmp_path / "donor.png"
    images = 255 - synthetic_arrays().train_images[:2]  # neither is in the tree
    to_pil(images[0]).save(victim, compress_level=0)
    to_pil(images[1]).save(donor, compress_level=0)
    times = victim.stat()
    os.utime(donor, ns=(times.st_atime_ns, times.st_mtime_ns))
    first = data_module.load_dataset(tree)
    index = (first.train_images == images[0]).flatten(1).all(1).nonzero().item()
    shutil.copy2(donor, victim)  # what cp -p does: the same file, rewritten, its times copied
    after = victim.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (times.st_size, times.st_mtime_ns, times.st_ino)
    again = data_module.load_dataset(tree)
    assert "decoded once" in again.source and torch.equal(again.train_images[index], images[1])


# --------------------------------------------------------------------------------------------
# A damaged last.ckpt
# --------------------------------------------------------------------------------------------
def test_a_truncated_last_ckpt_names_the_checkpoint_to_resume_from_and_that_command_works(
    monkeypatch, capsys, tmp_path, tree
):
    run = tmp_path / "run"
    flags = ("--data-dir", tree, "--out-dir", run, *QUICK, "--logger", "none")
    assert run_command(main_script, monkeypatch, capsys, *flags)[0] == 0
    last = run / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # as a full disk or a copy that stopped leaves it
    best_epoch = torch.load(run / "best.ckpt", weights_only=True)["epoch"] + 1
    code, _, err = run_command(main_script, monkeypatch, capsys, *flags, "--epochs", "3", "--resume")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {last} is damaged (cut short: ") and f"--resume {run / 'best.ckpt'}" in err
    assert f"continue from {run / 'best.ckpt'}, which holds epoch {best_epoch}, with: python main.py " in err
    code, _, err = run_command(main_script, monkeypatch, capsys, *printed_command(err))
    assert (code, err) == (0, "")
    assert [row["epoch"] for row in engine.read_metrics_csv(run / "metrics.csv")] == [1, 2, 3]


# --------------------------------------------------------------------------------------------
# The free-space check
# --------------------------------------------------------------------------------------------
Usage = namedtuple("Usage", "total used free")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_the_space_a_run_asks_for_bounds_what_it_writes_and_stays_small_for_a_small_network(
    monkeypatch, capsys, tmp_path, tree
):
    """The computation itself, on any machine: a quick CIFAR10Net run writes about 6 MB; the check used to ask 100."""
    run = tmp_path / "run"
    assert run_command(main_script, monkeypatch, capsys, "--data-dir", tree, "--out-dir", run, *QUICK)[0] == 0
    config = engine.RunConfig(model="CIFAR10Net", recipe=engine.Recipe(epochs=2))
    needed = engine.run_folder.space_needed(config)
    # the files at the end, plus the temporary copy of a checkpoint being replaced
    assert folder_bytes(run) + (run / "last.ckpt").stat().st_size <= needed < 60 * 2**20


@needs_tmpfs
def test_a_run_fits_an_empty_60_mb_disk_and_a_smaller_one_is_refused_leaving_no_folder(tmp_path, tree):
    mount = tmp_path / "disk"
    train = shlex.join([sys.executable, "main.py", "--data-dir", str(tree), "--out-dir", str(mount / "run"), *QUICK])
    done = on_tmpfs(mount, "size=60m", f"{train}; echo status=$?")
    assert done.stdout.splitlines()[-1] == "status=0", done.stderr[-2000:]
    done = on_tmpfs(mount, "size=4m", f"{train}; echo status=$?; ls -A {shlex.quote(str(mount))}")
    assert done.stdout.splitlines()[-1] == "status=2"  # and ls printed nothing: no empty run folder left behind
    needed = engine.run_folder.space_needed(engine.RunConfig(model="CIFAR10Net"))
    assert done.stderr.splitlines() == [
        f"error: the disk of --out-dir {mount / 'run'} has 4 MB free and a run of CIFAR10Net (its checkpoints and "
        f"files) needs about {needed / 2**20:.0f} MB; free some space or choose another --out-dir"
    ]


def test_a_refused_out_dir_leaves_no_folder_behind(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(engine.run_folder.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 2**20, 2**20))
    code, _, err = run_command(
        main_script, monkeypatch, capsys, "--data-dir", tmp_path / "no-data", "--out-dir", tmp_path / "runs" / "new"
    )
    assert code == 2 and "has 1 MB free" in err and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# export.py --out into a read-only folder
# --------------------------------------------------------------------------------------------
EXPORT_SUGGESTION = "--out runs/exports/FastVGG_narrow/model.onnx"


def test_export_into_a_read_only_folder_suggests_a_file_it_can_write(monkeypatch, capsys, tmp_path):
    """Root writes anywhere its file modes say no, so the folder refuses as a read-only mount does."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    probe = tempfile.TemporaryFile

    def refusing(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(read_only):
            raise OSError(30, "Read-only file system")
        return probe(*args, dir=dir, **kwargs)

    monkeypatch.setattr(export.tempfile, "TemporaryFile", refusing)
    monkeypatch.chdir(tmp_path)
    for out, problem in (
        (read_only, f"--out {read_only} is a folder, and one you cannot write (Read-only file system)"),
        (read_only / "model.onnx", f"cannot write {read_only / 'model.onnx'} (Read-only file system)"),
    ):
        code, _, err = run_command(export, monkeypatch, capsys, "--run", SHIPPED, "--out", out)
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {problem}")
        assert err.endswith(f"give --out FILE in a folder you can write, e.g. {EXPORT_SUGGESTION}\n")
    code, out, err = run_command(export, monkeypatch, capsys, "--run", SHIPPED, *shlex.split(EXPORT_SUGGESTION))
    assert (code, err) == (0, "") and (tmp_path / "runs/exports/FastVGG_narrow/model.onnx").is_file()


@needs_tmpfs
def test_export_into_a_read_only_mount_suggests_a_file_it_can_write(tmp_path):
    mount = tmp_path / "read-only"
    exporting = shlex.join([sys.executable, str(REPO / "export.py"), "--run", str(SHIPPED), "--out", str(mount)])
    done = on_tmpfs(mount, "ro,size=1m", f"cd {shlex.quote(str(tmp_path))} && {exporting}")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: --out {mount} is a folder, and one you cannot write (Read-only file system); give --out FILE "
        f"in a folder you can write, e.g. {EXPORT_SUGGESTION}"
    ]
    done = command(REPO / "export.py", "--run", SHIPPED, *shlex.split(EXPORT_SUGGESTION), cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "runs/exports/FastVGG_narrow/model.onnx").is_file()


def test_a_folder_one_can_write_is_offered_its_own_file(monkeypatch, capsys, tmp_path):
    code, _, err = run_command(export, monkeypatch, capsys, "--run", SHIPPED, "--out", tmp_path)
    assert code == 2
    assert err == f"error: --out {tmp_path} is a folder; give a file name, e.g. --out {tmp_path / 'model.onnx'}\n"
