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


def test_demo_runs_and_reuses_its_run(tmp_path):
    first = opd_lens("demo", "--out", str(tmp_path / "demo"))
    assert first.returncode == 0, first.stderr
    assert "writing a synthetic run" in first.stdout
    table = [line.split() for line in first.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in table] == [25, 50, 75, 100]
    assert float(table[-1][5]) == pytest.approx(1.0)  # Sim_16 of the last step with itself
    unchanged = [float(row[1]) for row in table]
    assert unchanged == sorted(unchanged, reverse=True)  # a growing update changes more entries
    second = opd_lens("demo", "--out", str(tmp_path / "demo"))
    assert second.returncode == 0 and "writing" not in second.stdout
    assert second.stdout.splitlines()[-5:] == first.stdout.splitlines()[-5:]
