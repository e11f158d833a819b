"""The opd-lens command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ctrl_c_default

import opd_lens as opd_lens_api
from opd_lens import cli
from opd_lens.summary import Summary, summarize
from opd_lens.testing import write_planted_run


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
    from opd_lens.testing import qwen3_config

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


def test_report_writes_one_self_contained_file(tmp_path, run):
    origin, run_dir = run
    store = tmp_path / "store"
    args = ["compute", str(run_dir), "--origin", str(origin), "--name", "<b>opd</b>", "--store", str(store)]
    assert opd_lens(*args, "--angle-k", "16", "--quiet").returncode == 0
    res = opd_lens("report", str(store), "-o", str(tmp_path / "r.html"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"wrote {tmp_path / 'r.html'} (") and "opens offline" in res.stdout
    page = (tmp_path / "r.html").read_text()
    body = page.split("</head>")[1]
    assert body.count("application/vnd.jupyter.widget-view+json") == 1 and body.count("<svg") >= 4
    assert "<b>opd</b>" not in body  # the run name is escaped in the table and the charts
    assert "&lt;b&gt;opd&lt;/b&gt;" in page
    assert "cdn.jsdelivr" not in page.split("<script>")[0] and "<script src=" not in page
    bad = opd_lens("report", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and bad.stderr.strip().endswith("no opd_lens store here")


def test_compute_then_summary(tmp_path, run):
    origin, run_dir = run
    store = tmp_path / "store"
    args = ["compute", str(run_dir), "--origin", str(origin), "--name", "opd", "--method", "opd", "--store", str(store)]
    first = opd_lens(*args, "--angle-k", "16", "--mask-rank", "8", "--quiet")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("opd: computed steps 3, 6, 10;") and first.stderr == ""
    second = opd_lens(*args)
    assert second.returncode == 0 and "opd: computed nothing new; 0 matrices read" in second.stdout
    mismatch = opd_lens(*args, "--lock-k", "8")
    assert mismatch.returncode == 2 and "lock_k=16, not 8" in mismatch.stderr and mismatch.stderr.count("\n") == 1
    table = json.loads(opd_lens("summary", str(store), "--json").stdout)
    assert table["opd"]["method"] == "opd" and table["opd"]["last_step"] == 10 and table["opd"]["steps"] == 3
    csv = opd_lens("summary", str(store), "--csv").stdout.splitlines()
    assert csv[0].startswith("run,method,steps,first_step,last_step,unchanged_pct") and csv[1].startswith("opd,opd,3,")
    text = opd_lens("summary", str(store)).stdout
    assert text == Summary.of(opd_lens_api.open_store(store, create=False).dataset()).text() + "\n"
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "method", "ckpts"] and lines[1].split()[:5] == ["opd", "opd", "3", "3", "10"]
    assert "acc %" not in text  # these checkpoints log no held-out accuracy
    assert max(map(len, lines)) <= 120 and "Sim_K 1st = Sim_K to the final channel" in text


def test_progress_in_a_log_is_whole_lines(tmp_path, run):
    """stderr captured (not a terminal): no redraws, a line when the run's checkpoints start and one when they are
    done, none from the per-step matrix bars."""
    origin, run_dir = run
    args = ["compute", str(run_dir), "--origin", str(origin), "--name", "opd", "--store", str(tmp_path / "store")]
    done = opd_lens(*args)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("opd-lens: warning:")]
    assert lines[0] == "opd checkpoints: 0/3 ckpt, 0 s, started" and lines[-1].startswith("opd checkpoints: 3/3 ckpt, ")
    assert lines[-1].endswith(" s, done") and len(lines) <= 2 + 10  # at most one more line per LOG_INTERVAL_S


def test_watch_computes_new_checkpoints_and_stops_cleanly(tmp_path):
    from opd_lens.checkpoints import checkpoint_path, open_checkpoint, save_checkpoint

    origin, run_dir = write_planted_run(tmp_path / "live", steps=(1, 2))
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "opd_lens.cli", "watch", str(run_dir), "--origin", str(origin), "--name", "live"]
    proc = subprocess.Popen(
        [*cmd, "--store", str(store), "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_default,
    )
    try:
        assert proc.stdout.readline().startswith("watching ")
        assert proc.stdout.readline().startswith("live: step 1, 2 done; last step 2:")
        last = open_checkpoint(checkpoint_path(run_dir, 2))
        weights = {name: last.read(name) * 1.01 for name in last.tensors}
        save_checkpoint(checkpoint_path(run_dir, 3), weights, step=3, config=last.config)
        line = proc.stdout.readline()
        assert line.startswith("live: step 3 done; last step 3:")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped; every completed step is in the store" in err and "Traceback" not in err
    assert not (store / ".lock").exists()
    ds = opd_lens_api.open_store(store).dataset()
    assert ds.step.values.tolist() == [1, 2, 3]
    assert float(ds.lock_alignment.sel(run="live", step=3).mean()) == pytest.approx(1.0, abs=1e-6)
    row = summarize(ds).loc["live"]  # the line, read from steps 1 and 3 only, says what the whole store does
    said = f"stable rank {row.stable_rank:.3g}, Sim_K first->last {row.lock_alignment_first:.3f}"
    assert line.rstrip().endswith(said)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_watch_hands_freed_heap_back_with_glibc():
    """Without it a watcher's RSS grew from 321 MiB to 2 GiB over 500 checkpoints (bench/soak.py)."""
    assert cli._malloc_trim() is not None
    cli._trim_heap()


def test_new_store_settings_and_pickle_opt_in_from_the_command_line(tmp_path, run):
    import torch
    from safetensors.torch import load_file

    origin, run_dir = run
    pickled = tmp_path / "pickled"
    for ckpt in sorted(run_dir.glob("global_step_*/actor/huggingface")):
        step = int(ckpt.parts[-3].removeprefix("global_step_"))
        (pickled / f"checkpoint-{step}").mkdir(parents=True)
        torch.save(load_file(ckpt / "model.safetensors"), pickled / f"checkpoint-{step}" / "pytorch_model.bin")
    store = tmp_path / "store"
    args = ["compute", str(pickled), "--origin", str(origin), "--name", "p", "--store", str(store), "--quiet"]
    refused = opd_lens(*args, "--mask-rank", "8", "--mask-alpha", "0.3", "--angle-k", "16")
    assert refused.returncode == 2 and "--allow-pickle" not in refused.stdout
    assert refused.stderr.count("OPD_LENS_ALLOW_PICKLE=1") == 3  # one line per refused checkpoint
    allowed = opd_lens(*args, "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr
    ds = opd_lens_api.open_store(store, create=False).dataset()
    assert (ds.attrs["mask_rank"], ds.attrs["mask_alpha"], ds.attrs["angle_k"]) == (8, 0.3, 16)
    assert [int(s) for s in ds.step.values] == [3, 6, 10]
    other = opd_lens(*args, "--allow-pickle", "--mask-rank", "4")
    assert other.returncode == 2 and other.stderr.strip().endswith("the store uses mask_rank=8, not 4")


def test_preset_choices_are_the_zoos_presets():
    from opd_lens.cli import _preset_names
    from opd_lens.zoo import PRESETS

    assert _preset_names() == tuple(PRESETS)
    bad = opd_lens("zoo", "--out", "z", "--preset", "nope")
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr and all(p in bad.stderr for p in PRESETS)


def test_notebooks_are_copied_out_and_edits_are_kept(tmp_path):
    shipped = sorted((Path(__file__).parents[1] / "demo_notebooks").glob("*.ipynb"))
    dest = tmp_path / "books"
    res = opd_lens("notebooks", str(dest))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{dest}: {len(shipped)} notebook(s) copied\n")
    assert [p.read_bytes() for p in sorted(dest.glob("*.ipynb"))] == [p.read_bytes() for p in shipped]
    assert "(all up to date)" in opd_lens("notebooks", str(dest)).stdout

    edited = dest / shipped[1].name
    edited.write_text("my edits", encoding="utf-8")
    (dest / shipped[0].name).unlink()
    res = opd_lens("notebooks", str(dest))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert str(edited) in res.stderr and "--force" in res.stderr
    assert edited.read_text(encoding="utf-8") == "my edits" and not (dest / shipped[0].name).exists()  # nothing written

    res = opd_lens("notebooks", str(dest), "--force")
    assert res.returncode == 0 and f"{dest}: 2 notebook(s) copied" in res.stdout
    assert edited.read_bytes() == shipped[1].read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == [p.name for p in shipped]  # no temporaries left


def test_notebooks_into_a_file_is_an_error(tmp_path):
    (tmp_path / "taken").write_text("", encoding="utf-8")
    res = opd_lens("notebooks", str(tmp_path / "taken"))
    assert res.returncode == 2 and res.stderr == f"opd-lens: error: {tmp_path / 'taken'}: not a directory\n"
