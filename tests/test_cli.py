"""The opd-lens command, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_lens.synthetic import write_planted_run


def opd_lens(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "opd_lens.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": ""})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    return write_planted_run(tmp_path_factory.mktemp("synthetic"), steps=(3, 6, 10), layout="verl")


def test_inspect_lists_steps_and_matrices(run):
    origin, run_dir = run
    res = opd_lens("inspect", str(run_dir), "--origin", str(origin))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"{run_dir}: 3 checkpoint(s)"
    steps = [int(line.split()[0]) for line in lines[2:5]]
    assert steps == [3, 6, 10]
    assert all(" 14 " in line and "BF16" in line and "actor/huggingface" in line for line in lines[2:5])
    assert "self_attn.q_proj" in res.stdout and "skipped: lm_head.weight" in res.stdout


@pytest.mark.parametrize(
    ("make_args", "expected"),
    [
        (lambda tmp, run: ["inspect", str(tmp / "nope")], "run directory does not exist"),
        (lambda tmp, run: ["inspect", str(tmp)], "no readable checkpoints"),
        (lambda tmp, run: ["inspect", str(run[1]), "--origin", str(tmp / "nope")], "does not exist"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, run, make_args, expected):
    res = opd_lens(*make_args(tmp_path, run))
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("opd-lens: error: ")
    assert expected in res.stderr and "Traceback" not in res.stderr


def test_inspect_reports_shape_mismatch_against_origin(tmp_path, run):
    from opd_lens.synthetic import qwen3_config

    other, _ = write_planted_run(tmp_path, config=qwen3_config(hidden=32), steps=(1,))
    res = opd_lens("inspect", str(run[1]), "--origin", str(other))
    assert res.returncode == 2
    assert "shape" in res.stderr and "model.layers.0." in res.stderr and str(other) in res.stderr


def test_skipped_checkpoint_is_one_warning_line(tmp_path):
    origin, run_dir = write_planted_run(tmp_path, steps=(1, 2))
    weights = run_dir / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    res = opd_lens("inspect", str(run_dir))
    assert res.returncode == 0
    assert res.stderr.startswith("opd-lens: warning: skipping incomplete checkpoint:")
    assert str(weights) in res.stderr and res.stderr.count("\n") == 1
    assert "1 checkpoint(s)" in res.stdout


def test_demo_runs_and_reuses_its_work(tmp_path):
    first = opd_lens("demo", "--out", str(tmp_path / "demo"), "--quiet")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("writing a synthetic run") == 2
    assert "8 new checkpoint(s)" in first.stdout
    table = [line.split() for line in first.stdout.splitlines() if line.startswith(("small", "large"))]
    rows = {row[0]: row for row in table if row[1].isdigit()}
    small, large = rows["small-update"], rows["large-update"]
    assert small[1] == large[1] == "100"  # last step
    assert float(small[2]) > float(large[2])  # a smaller update leaves more bf16 entries unchanged
    assert float(small[4]) < float(large[4])  # ... and rotates the top singular subspace less
    trajectory = [line for line in first.stdout.splitlines() if "Sim_16 to last" in line]
    assert len(trajectory) == 2 and all(line.endswith("/1.00") for line in trajectory)
    second = opd_lens("demo", "--out", str(tmp_path / "demo"), "--quiet")
    assert second.returncode == 0 and "writing" not in second.stdout
    assert "0 new checkpoint(s), 0 matrices read" in second.stdout
    assert second.stdout.splitlines()[1:] == first.stdout.splitlines()[3:]
