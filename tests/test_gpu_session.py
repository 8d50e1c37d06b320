"""The GPU session script (benchmarks/gpu_session.py), checked on the CPU at a toy size: every step runs and reports,
and a step that fails is recorded while the others still run."""

from __future__ import annotations

import argparse

from benchmarks import gpu_session
from conftest import run_script, write_image_folder


def test_the_compiled_side_by_side_is_compiled_warmed_up_and_curved_on_every_seed():
    args = argparse.Namespace(
        data_dir="d",
        out_dir="o",
        device="cuda",
        precision="bf16-mixed",
        width=64,
        seeds=[0, 1, 2, 3],
        epochs=None,
        reference_batch_size=1024,
    )
    commands = gpu_session.steps(args)
    compiled, eager = commands["versus-compiled"], commands["versus-eager"]
    assert {"--compile", "--curve", "--warm-up", "--full-train"} <= set(compiled) and compiled[
        compiled.index("--seeds") + 1 :
    ][:4] == ["0", "1", "2", "3"]
    assert "--compile" not in eager and eager[eager.index("--seeds") + 1 : eager.index("--seeds") + 3] == ["0", "1"]
    assert "--epochs" not in compiled  # each method's own epochs
    assert {"--profile", "--no-validation"} <= set(commands["profile"]) and "cuda" in commands["newton-schulz"]


def test_the_session_runs_every_step_on_the_cpu_and_records_a_failed_one(monkeypatch, tmp_path, arrays):
    data_dir = write_image_folder(tmp_path / "data", arrays)
    toy = [
        "--data-dir",
        str(data_dir),
        "--device",
        "cpu",
        "--width",
        "8",
        "--epochs",
        "1",
        "--seeds",
        "0",
        "--reference-batch-size",
        "32",
    ]
    assert (
        run_script(
            monkeypatch,
            gpu_session.main,
            "gpu_session.py",
            *toy,
            "--precision",
            "32-true",
            "--only",
            "versus-eager",
            "profile",
            "newton-schulz",
            "--out-dir",
            str(tmp_path / "ok"),
        )
        == 0
    )
    summary = (tmp_path / "ok/summary.md").read_text()
    for step in ("versus-eager", "profile", "newton-schulz"):
        assert f"## {step}: exit 0," in summary, summary
    assert "versus-compiled" not in summary
    assert "time ratio ours / yardstick" in summary and "Newton-Schulz, every filter" in summary
    assert "run_training_batch" in summary  # the profile's table, inline
    assert (
        run_script(
            monkeypatch,
            gpu_session.main,
            "gpu_session.py",
            *toy,
            "--precision",
            "16-mixed",
            "--only",
            "versus-eager",
            "newton-schulz",
            "--out-dir",
            str(tmp_path / "bad"),
        )
        == 0
    )
    summary = (tmp_path / "bad/summary.md").read_text()
    # its log's end
    assert "## versus-eager: exit 2," in summary and "the yardstick runs 32-true or bf16-mixed" in summary
    assert "## newton-schulz: exit 0," in summary  # the next step ran all the same
