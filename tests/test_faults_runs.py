"""Faults of whole runs, each met as a user meets it: a SIGTERM during the t-SNE at the end of a run, a node of a
multi-node run killed or frozen, a recipe that does not fit a small data set. Every command a stopped run prints is
run here, and must finish the run."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine
import main
import modified_models
import tsne
from conftest import run_command, start_nodes, synthetic_arrays, write_image_folder

REPO = Path(__file__).resolve().parents[1]
TSNE_FILES = {"tsne_test.png", "tsne_test.npz", "tsne_train.png", "tsne_train.npz", "tsne_metrics.json"}
QUICK = ("--augment", "none", "--no-progress", "--device", "cpu", "--logger", "none")


@pytest.fixture
def data_dir(tmp_path, arrays) -> Path:
    return write_image_folder(tmp_path / "data", arrays)


def printed_command(line: str) -> list[str]:
    """The command after 'continue with: ' in a run's last line, split as the shell would."""
    return shlex.split(line.split("continue with: ", 1)[1])


def run_printed(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """A printed ``python SCRIPT ...`` command, run with this Python from the repository root."""
    assert command[0] == "python", command
    return subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, cwd=REPO, timeout=600, **kwargs
    )


# --------------------------------------------------------------------------------------------
# A signal during the analyses at the end of a run
# --------------------------------------------------------------------------------------------
def test_sigterm_during_the_tsne_names_the_command_that_finishes_it(tmp_path):
    """The signal comes while the train split's t-SNE computes (1,080 points: a second or two)."""
    run_dir, data_dir = tmp_path / "run", write_image_folder(tmp_path / "data", synthetic_arrays(n_train=1200))
    process = subprocess.Popen(
        [sys.executable, "main.py", "--data-dir", data_dir, "--out-dir", run_dir, "--epochs", "1", "--seed", "3"]
        + ["--batch-size", "32", *QUICK],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    for line in process.stdout:  # the test split's t-SNE is written, the train split's is being computed
        if line.startswith("t-SNE of the train split: embedding"):
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"interrupted by SIGTERM: {run_dir} holds the trained and tested run"), line
    assert "--resume" not in line
    assert (run_dir / "test.json").is_file() and (run_dir / "tsne_test.npz").is_file()
    assert not (run_dir / "tsne_metrics.json").exists()

    command = printed_command(line)
    assert Path(REPO, command[1]).resolve() == REPO / "tsne.py" and command[2:4] == ["--run", str(run_dir)]
    assert "--seed" in command and "--device" in command  # as the run embedded: the same sample, the same device
    finished = run_printed(command)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert TSNE_FILES <= {path.name for path in run_dir.iterdir()}
    assert set(engine.read_json(run_dir / "tsne_metrics.json")) == {"test", "train"}


def test_a_comparison_stopped_in_a_models_tsne_prints_commands_that_finish_both(
    monkeypatch, capsys, tmp_path, data_dir
):
    """--models skips a model with test.json: the t-SNE it missed runs first, then the comparison goes on."""
    real_analyse = tsne.analyse_split
    out_dir = tmp_path / "comparison"

    def stopped_in_the_first_train_split(predicted, split, *args):
        if split == "train" and not (out_dir / "CIFAR10Net" / "tsne_train.npz").exists():
            raise engine.RunInterrupted(signal.SIGTERM)
        return real_analyse(predicted, split, *args)

    flags = ("--models", "CIFAR10Net", "CIFAR10Net_2", "--data-dir", data_dir, "--epochs", "1", "--batch-size", "32")
    with monkeypatch.context() as patch:
        patch.setattr(tsne, "analyse_split", stopped_in_the_first_train_split)
        code, _, err = run_command(modified_models, monkeypatch, capsys, *flags, *QUICK, "--out-dir", out_dir)
    assert code == 143 and err.strip().count("\n") == 0, err
    finish, comparison = (shlex.split(part) for part in err.split("continue with: ", 1)[1].split(" && "))
    assert Path(finish[1]).resolve() == REPO / "tsne.py" and comparison[1] == "modified_models.py"

    assert run_command(tsne, monkeypatch, capsys, *finish[2:])[0] == 0
    assert run_command(modified_models, monkeypatch, capsys, *comparison[2:])[0] == 0
    for model in ("CIFAR10Net", "CIFAR10Net_2"):
        assert TSNE_FILES <= {path.name for path in (out_dir / model).iterdir()}, model
    assert (out_dir / "comparison.csv").is_file()


# --------------------------------------------------------------------------------------------
# A node lost or frozen in a multi-node run (two gloo processes on this machine)
# --------------------------------------------------------------------------------------------
def wait_for_an_epoch(run_dir: Path, nodes: list[subprocess.Popen]) -> None:
    for _ in range(6000):
        if (run_dir / "last.ckpt").exists():
            return
        assert all(node.poll() is None for node in nodes), [node.communicate()[1][-2000:] for node in nodes]
        time.sleep(0.02)
    pytest.fail("no epoch was saved in 120 s")


def error_line(stderr: str) -> str:
    """The run's one line: the last, the only one that says error, and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize(
    "gloo_says, timed_out",
    [
        (
            "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv",
            True,
        ),
        ("Application timeout caused pair closure", True),  # no source file: seen in CI on a frozen node
        ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5321", False),
    ],
)
def test_each_way_gloo_reports_a_lost_peer_is_a_lost_process(gloo_says, timed_out):
    lost = engine.devices.lost_process(RuntimeError(gloo_says), 20, nodes=2)
    assert lost is not None and ("did not answer for 20 s" in str(lost)) == timed_out, lost
    assert "/gloo/" not in str(lost) and "a node" in str(lost)
    assert engine.devices.lost_process(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 20, 2) is None


def test_after_a_fit_that_ended_well_the_process_group_is_destroyed_at_exit(tmp_path):
    """A gloo group left to the interpreter's shutdown can abort a finished node (exit status -6, seen in CI): the
    engine destroys it at exit, while the interpreter is whole. (atexit runs its handlers last first: the check,
    registered before, runs after.)"""
    script = (
        "import atexit, torch.distributed as dist\n"
        "from engine.devices import destroy_process_group_at_exit\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "destroy_process_group_at_exit()\n"
        "destroy_process_group_at_exit()  # once per process, however many runs ended well\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "initialized at exit: False", result.stderr[-2000:]


@pytest.mark.parametrize(
    "fault, message",
    [
        (signal.SIGKILL, "error: this data-parallel run lost one of its processes: a node stopped"),
        (
            signal.SIGSTOP,
            "error: another process of this data-parallel run did not answer for 20 s (--collective-timeout)",
        ),
    ],
    ids=["killed", "frozen"],
)
def test_a_node_killed_or_frozen_mid_run_stops_the_others_with_one_line_and_resume_finishes(
    tmp_path, image_folder, fault, message
):
    run_dir, epochs = tmp_path / "run", 8
    command = [sys.executable, str(REPO / "main.py"), "--data-dir", str(image_folder), "--devices", "1"]
    command += ["--num-nodes", "2", "--strategy", "ddp", "--epochs", str(epochs), "--batch-size", "16", "--no-tsne"]
    command += [*QUICK, "--collective-timeout", "20", "--out-dir", str(run_dir)]
    node0, node1 = start_nodes(command, tmp_path)
    try:
        wait_for_an_epoch(run_dir, [node0, node1])
        node1.send_signal(fault)
        _, err = node0.communicate(timeout=120)  # bounded by --collective-timeout, not PyTorch's 30 minutes
        assert node0.returncode == 1, err[-3000:]
        line = error_line(err)
        assert line.startswith(message) and "holds epoch" in line and "on every node, continue with: " in line, line
        if fault == signal.SIGSTOP:  # woken up, the frozen node finds its peer gone and says so in its own log
            node1.send_signal(signal.SIGCONT)
            _, frozen_err = node1.communicate(timeout=120)
            assert node1.returncode == 1 and error_line(frozen_err).startswith("error: "), frozen_err[-3000:]
    finally:
        for node in (node0, node1):
            if node.poll() is None:
                node.kill()
                node.communicate()

    resumed = printed_command(line)
    assert resumed[-1] == "--resume" and "--collective-timeout" in resumed
    nodes = start_nodes([sys.executable, *resumed[1:]], tmp_path)
    results = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in results]
    assert [row["epoch"] for row in engine.read_metrics_csv(run_dir / "metrics.csv")] == list(range(1, epochs + 1))
    assert json.loads((run_dir / "test.json").read_text())["epochs"] == epochs


# --------------------------------------------------------------------------------------------
# --collective-timeout is a setting like any other
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf"])
def test_a_bad_collective_timeout_is_one_line_before_anything_is_written(monkeypatch, capsys, tmp_path, value):
    code, _, err = run_command(main, monkeypatch, capsys, "--collective-timeout", value, "--out-dir", tmp_path / "run")
    assert code == 2 and err.strip().splitlines()[-1].startswith("main.py: error: argument --collective-timeout")
    assert not (tmp_path / "run").exists()


def test_collective_timeout_comes_from_a_config_file_is_checked_there_and_may_change_on_resume(
    monkeypatch, capsys, tmp_path, data_dir
):
    flags = ("--data-dir", data_dir, "--epochs", "1", "--batch-size", "32", "--no-tsne", *QUICK)
    code, _, err = run_command(
        main, monkeypatch, capsys, *flags, "--collective-timeout", "45", "--out-dir", tmp_path / "a"
    )
    assert code == 0, err
    assert engine.read_json(tmp_path / "a/config.json")["collective_timeout"] == 45

    code, _, err = run_command(
        main, monkeypatch, capsys, "--config", tmp_path / "a/config.json", "--out-dir", tmp_path / "b"
    )
    assert code == 0, err
    assert engine.read_json(tmp_path / "b/config.json")["collective_timeout"] == 45

    bad = engine.read_json(tmp_path / "a/config.json") | {"collective_timeout": -1}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, _, err = run_command(
        main, monkeypatch, capsys, "--config", tmp_path / "bad.json", "--out-dir", tmp_path / "c"
    )
    assert (
        code == 2
        and err.count("\n") == 1
        and "collective_timeout = -1 is not a value --collective-timeout takes" in err
    )
    assert not (tmp_path / "c").exists()

    code, _, err = run_command(
        main,
        monkeypatch,
        capsys,
        "--resume",
        "--epochs",
        "2",
        "--collective-timeout",
        "90",
        "--out-dir",
        tmp_path / "a",
    )
    assert code == 0, err
    config = engine.read_json(tmp_path / "a/config.json")
    assert config["collective_timeout"] == 90
    assert {"after_epoch": 1, "setting": "collective_timeout", "from": 45.0, "to": 90.0} in config["changes"]


# --------------------------------------------------------------------------------------------
# A recipe that does not fit the data
# --------------------------------------------------------------------------------------------
@pytest.fixture
def small_tree(tmp_path) -> Path:
    """A folder of a few hundred images: 4 classes of 100 training images each, and 10 test images each."""
    arrays = synthetic_arrays(n_train=1000, n_test=100)
    train, test = arrays.train_labels < 4, arrays.test_labels < 4
    small = type(arrays)(
        arrays.train_images[train],
        arrays.train_labels[train],
        arrays.test_images[test],
        arrays.test_labels[test],
        arrays.classes[:4],
        arrays.source,
    )
    return write_image_folder(tmp_path / "my-photos", small)


def test_the_own_data_example_warns_that_an_epoch_is_one_step_and_the_recommended_command_does_not(
    monkeypatch, capsys, tmp_path, small_tree
):
    example = ("--model", "FastVGG_narrow", "--data-dir", small_tree, "--val-fraction", "0.2", "--no-tsne", *QUICK)
    code, _, err = run_command(
        modified_models, monkeypatch, capsys, *example, "--epochs", "2", "--out-dir", tmp_path / "a"
    )
    assert code == 0 and err.count("\n") == 1, err
    assert err.startswith(
        "warning: an epoch is only 1 step here (320 training images in batches of 512), 2 in the whole run, where "
        "FastVGG_narrow's recipe takes 176 on CIFAR-10: for a small data set give a smaller --batch-size"
    ), err
    recommended = ("--batch-size", "32", "--lr", "0.05", "--epochs", "1")  # docs/data.md, "Your own data"
    code, _, err = run_command(
        modified_models, monkeypatch, capsys, *example, *recommended, "--out-dir", tmp_path / "b"
    )
    assert (code, err) == (0, "")
