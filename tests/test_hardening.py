"""Hardening: bad inputs to compute, watch and the CLI, the store under faults, and fuzzing of names and the reader.

Every case uses real files and real processes: a bad checkpoint gives one clear line on stderr (exit status 2 from
the CLI), no traceback, nothing written for it, and the other steps are computed as if it were not there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import ctrl_c_default
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import opd_lens
from opd_lens.checkpoints import matched_matrices, open_checkpoint, plan_matrices, save_checkpoint
from opd_lens.checkpoints.names import natural_key
from opd_lens.diagnostics import Settings
from opd_lens.errors import CheckpointError, CheckpointWarning, CorruptCheckpointError, StoreError
from opd_lens.schema import SCALARS
from opd_lens.testing import qwen3_config, write_planted_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = qwen3_config(layers=1, hidden=32, intermediate=48)
SET = Settings(angle_k=8, mask_rank=8, lock_k=8)  # below every side of CONFIG's matrices (k/v: 16 x 32)
W = "model.safetensors"
UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
IS_ROOT = os.geteuid() == 0


def opd_lens_cli(*args: str, env: dict | None = None, drop_dac: bool = False, timeout: float = 120):
    """Run ``opd-lens`` as a real subprocess; ``drop_dac``: as root, without the capabilities that let root read
    any file, so that file permissions apply to it as to any user."""
    cmd = [sys.executable, "-m", "opd_lens.cli", *args]
    env = {**os.environ, "PYTHONWARNINGS": "", **(env or {})}
    pre = _drop_dac_capabilities if drop_dac and IS_ROOT else None
    return subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=pre, timeout=timeout)


def compute_args(run: Path, origin: Path, store: Path, name: str = "r") -> list[str]:
    return [
        "compute",
        str(run),
        "--origin",
        str(origin),
        "--name",
        name,
        "--store",
        str(store),
        "--angle-k",
        "8",
        "--mask-rank",
        "8",
        "--lock-k",
        "8",
        "--quiet",
    ]


def _drop_dac_capabilities() -> None:
    """In a child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the program
    it runs as root gets neither (permission bits then apply to root too)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop_dac() -> bool:
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_dac_capabilities, capture_output=True)
    return probe.returncode == 0


def one_line(res: subprocess.CompletedProcess, status: int, *needles: str) -> str:
    """The CLI exited with ``status`` and wrote exactly one line, holding ``needles``, to stderr."""
    assert res.returncode == status, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def same_values(a: xr.Dataset, b: xr.Dataset, variables=(*SCALARS, "angles_u", "angles_v")) -> None:
    """Equal values (NaN where the other has NaN) of ``variables`` on the same run, step, layer and module coords."""
    for dim in ("step", "layer", "module"):
        assert a[dim].values.tolist() == b[dim].values.tolist(), dim
    for name in variables:
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-6, atol=0, err_msg=name)


def store_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def resave(path: Path, tensors: dict[str, torch.Tensor], **kw) -> None:
    """Rewrite the checkpoint at ``path`` with ``tensors`` (config and trainer state kept)."""
    ckpt = open_checkpoint(path)
    save_checkpoint(path, tensors, step=ckpt.step, config=ckpt.config, **kw)


def split_header(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_header(file: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# --- one bad checkpoint among good ones ----------------------------------------------------------------------------


def _truncated(d: Path) -> None:
    f = d / W
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage_header(d: Path) -> None:
    f = d / W
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[:8] + b'{"model.layers.0.x": [' + b"\xff" * (n - 22) + data[8 + n :])


def _header_claims_more(d: Path) -> None:
    f = d / W
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])


def _zero_bytes(d: Path) -> None:
    (d / W).write_bytes(b"")


def _shard_missing(d: Path) -> None:
    resave(d, tensors_of(d), max_shard_bytes=10_000)
    (d / "model-00002-of-00004.safetensors").unlink()


def _same_tensor_in_two_shards(d: Path) -> None:
    resave(d, tensors_of(d), max_shard_bytes=10_000)
    first, second = d / "model-00001-of-00004.safetensors", d / "model-00002-of-00004.safetensors"
    extra = open_checkpoint(d).tensors
    name = next(n for n, info in extra.items() if info.file == second and n.startswith("model.layers."))
    save_file({**{n: t for n, t in tensors_of(d).items() if extra[n].file == first}, name: tensors_of(d)[name]}, first)


def _same_tensor_in_two_files(d: Path) -> None:
    save_file({UP: tensors_of(d)[UP]}, d / "extra.safetensors")


def _shape_mismatch(d: Path) -> None:
    t = tensors_of(d)
    resave(d, {**t, UP: t[UP][:-1]})


def _as_dtype(dtype: torch.dtype):
    def mutate(d: Path) -> None:
        t = tensors_of(d)
        resave(d, {**t, UP: t[UP].to(dtype)})

    return mutate


def _fifo(d: Path) -> None:
    (d / W).unlink()
    os.mkfifo(d / W)


def _dangling_symlink(d: Path) -> None:
    (d / W).unlink()
    os.symlink("gone.safetensors", d / W)


def _symlink_loop(d: Path) -> None:
    shutil.rmtree(d)
    os.symlink(d.name, d)  # checkpoint-N -> checkpoint-N


def _pickle_only(d: Path) -> None:
    t = tensors_of(d)
    (d / W).unlink()
    torch.save(t, d / "pytorch_model.bin")


def _unknown_dtype(d: Path) -> None:
    """A tensor outside the analysed ones in a dtype safetensors does not know: the header passes opd_lens's checks,
    and reading any tensor of the file fails (a failure at read time, not at discovery)."""
    header, data = split_header(d / W)
    header["model.extra_scale"] = {"dtype": "Q7", "shape": [2], "data_offsets": [len(data), len(data) + 2]}
    join_header(d / W, header, data + b"\0\0")


GOOD = (1, 50, 100)
BAD = {  # step: (mutation, what the one line about it says)
    2: (_truncated, ["truncated or still being written", "/checkpoint-2/model.safetensors"]),
    3: (_garbage_header, ["corrupt safetensors header", "/checkpoint-3/model.safetensors"]),
    4: (_header_claims_more, ["header claims", "/checkpoint-4/model.safetensors"]),
    5: (_zero_bytes, ["0 bytes", "/checkpoint-5/model.safetensors"]),
    6: (_shard_missing, ["model-00002-of-00004.safetensors is listed in the index but missing"]),
    7: (_same_tensor_in_two_shards, ["/checkpoint-7/model-00001-of-00004.safetensors: holds tensor", "assigns it"]),
    8: (_same_tensor_in_two_files, [f"tensor {UP!r} is stored twice", "extra.safetensors"]),
    9: (_shape_mismatch, [f"tensor {UP!r}: shape (47, 32) in", "/checkpoint-9/model.safetensors"]),
    10: (_as_dtype(torch.int8), [f"/checkpoint-10/model.safetensors: tensor {UP!r} is I8"]),
    11: (_as_dtype(torch.float8_e4m3fn), [f"/checkpoint-11/model.safetensors: tensor {UP!r} is F8_E4M3"]),
    12: (_fifo, ["/checkpoint-12/model.safetensors: not a regular file"]),
    13: (_dangling_symlink, ["/checkpoint-13/model.safetensors: cannot read: No such file or directory"]),
    14: (_symlink_loop, ["/checkpoint-14: a symbolic link that loops or points nowhere"]),
    15: (_pickle_only, ["/checkpoint-15/pytorch_model.bin", "OPD_LENS_ALLOW_PICKLE=1", "weights_only=True"]),
    16: (_unknown_dtype, ["/checkpoint-16/model.safetensors: cannot read tensor 'model.layers.0."]),
}


def _line_about(lines: list[str], step: int) -> str:
    hits = [line for line in lines if re.search(rf"checkpoint-{step}(?![0-9])", line)]
    assert len(hits) == 1, (step, hits)
    return hits[0]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """A run with good checkpoints GOOD and one bad checkpoint per case of BAD, a copy with the good ones only, and
    the reference store computed from that copy."""
    root = tmp_path_factory.mktemp("faulty")
    origin, run = write_planted_run(root, config=CONFIG, steps=(*GOOD, *BAD))
    good = root / "good"
    for step in GOOD:
        shutil.copytree(run / f"checkpoint-{step}", good / f"checkpoint-{step}")
    for step, (mutate, _) in BAD.items():
        mutate(run / f"checkpoint-{step}")
    reference = opd_lens.compute(root / "reference", good, origin=origin, name="r", settings=SET, progress=False)
    return origin, run, reference


def test_bad_checkpoints_are_skipped_with_one_warning_each_by_compute(faulty, tmp_path):
    origin, run, reference = faulty
    store = opd_lens.open_store(tmp_path / "store", SET)
    with pytest.warns(CheckpointWarning):
        store.add_run("r", run, origin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = store.compute(progress=False)
    assert not [w for w in caught if not issubclass(w.category, CheckpointWarning)]
    assert [s for _, s in report.steps] == list(GOOD)
    assert len(report.skipped) == len(BAD)
    for step, (_, needles) in BAD.items():
        line = _line_about(report.skipped, step)
        assert all(n in line for n in needles), (step, needles, line)
        assert any(str(w.message) == line for w in caught), line
    ds = store.dataset()
    same_values(ds, reference)  # the bad checkpoints changed nothing of the good ones
    assert sorted(int(s) for s in store.runs["r"]["checkpoints"]) == list(GOOD)
    assert {p.name for p in store.run_cache("r").iterdir()} == {f"bases-{s}.safetensors" for s in GOOD}
    with pytest.warns(CheckpointWarning):
        again = store.compute(progress=False)
    assert again.matrices_read == 0 and again.steps == [] and len(again.skipped) == len(BAD)


def test_bad_checkpoints_via_the_cli_one_line_each_exit_2(faulty, tmp_path):
    origin, run, reference = faulty
    store = tmp_path / "store"
    res = opd_lens_cli(*compute_args(run, origin, store))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout.startswith("r: computed steps 1, 50, 100;"), res.stdout
    lines = res.stderr.splitlines()
    assert len(lines) == len(BAD), res.stderr  # one line per bad checkpoint, no repeat
    assert all(line.startswith("opd-lens: warning: skipping ") for line in lines), res.stderr
    for step, (_, needles) in BAD.items():
        line = _line_about(lines, step)
        assert all(n in line for n in needles), (step, needles, line)
    same_values(opd_lens.open_store(store).dataset(), reference)


def test_unreadable_files_and_directories(tmp_path):
    """chmod 000 on a step's weights file, on another step's directory, and on the origin's weights. Root reads
    anything, so as root the CLI runs without the capabilities that allow that (a real permission failure)."""
    if IS_ROOT and not _can_drop_dac():
        pytest.skip("running as root without CAP_SETPCAP: cannot drop CAP_DAC_OVERRIDE, so chmod 000 cannot stop reads")
    origin, run = write_planted_run(tmp_path / "r", config=CONFIG, steps=(1, 2, 3, 4))
    os.chmod(run / "checkpoint-2" / W, 0)
    os.chmod(run / "checkpoint-3", 0)
    store = tmp_path / "store"
    args = compute_args(run, origin, store)
    try:
        res = opd_lens_cli(*args, drop_dac=True)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stdout.startswith("r: computed steps 1, 4;"), res.stdout
        lines = res.stderr.splitlines()
        assert len(lines) == 2 and all("Permission denied" in line for line in lines), res.stderr
        assert str(run / "checkpoint-2" / W) in _line_about(lines, 2)
        assert str(run / "checkpoint-3") in _line_about(lines, 3)

        os.chmod(origin / W, 0)
        other = tmp_path / "store2"
        res = opd_lens_cli(*compute_args(run, origin, other), drop_dac=True)
        one_line(res, 2, "opd-lens: error: ", str(origin / W), "Permission denied")
        assert opd_lens.open_store(other, create=False).runs == {}
    finally:
        os.chmod(run / "checkpoint-3", 0o755)


@pytest.mark.parametrize(
    "case",
    ["truncated", "fifo", "int8", "pickle", "run_dir_loop"],
)
def test_bad_origin_or_run_dir_is_one_error_line_and_nothing_stored(tmp_path, case):
    origin, run = write_planted_run(tmp_path / "r", config=CONFIG, steps=(1, 2))
    needles = {
        "truncated": (_truncated, ["truncated or still being written", str(origin / W)]),
        "fifo": (_fifo, [str(origin / W), "not a regular file"]),
        "int8": (_as_dtype(torch.int8), [str(origin / W), f"tensor {UP!r} is I8"]),
        "pickle": (_pickle_only, [str(origin / "pytorch_model.bin"), "OPD_LENS_ALLOW_PICKLE=1"]),
        "run_dir_loop": (None, [str(tmp_path / "loop"), "cannot resolve the path", "Symlink loop"]),
    }
    mutate, expected = needles[case]
    if mutate is not None:
        mutate(origin)
    else:
        os.symlink("loop", tmp_path / "loop")
        run = tmp_path / "loop"
    store = tmp_path / "store"
    res = opd_lens_cli(*compute_args(run, origin, store))
    one_line(res, 2, "opd-lens: error: ", *expected)
    assert opd_lens.open_store(store, create=False).runs == {}
    assert not (store / ".lock").exists()


def test_a_stored_last_checkpoint_gone_bad_makes_no_earlier_step_an_endpoint(tmp_path):
    """Found by the CLI fuzzer: with the stored last checkpoint unreadable, "last" was the step before it, which
    compute then rewrote with endpoint metrics."""
    origin, run = write_planted_run(tmp_path / "r", config=CONFIG, steps=(1, 2))
    store = opd_lens.open_store(tmp_path / "store", SET)
    store.add_run("r", run, origin)
    store.compute(progress=False)
    before = store.dataset().load()
    _truncated(run / "checkpoint-2")
    with pytest.warns(CheckpointWarning, match="checkpoint-2"):
        report = store.compute(progress=False)
    assert report.steps == [] and report.matrices_read == 0
    xr.testing.assert_identical(store.dataset(), before)


def test_a_header_dtype_that_is_not_a_name_is_one_warning_line(tmp_path):
    """Found by the CLI fuzzer: ``"dtype": null`` passed the header check, and ``inspect`` raised a TypeError."""
    origin, run = write_planted_run(tmp_path / "r", config=CONFIG, steps=(1, 2))
    header, data = split_header(run / "checkpoint-1" / W)
    header[UP]["dtype"] = None
    join_header(run / "checkpoint-1" / W, header, data)
    res = opd_lens_cli("inspect", str(run), "--origin", str(origin))
    one_line(res, 0, "checkpoint-1", UP, "dtype None")
    assert "1 checkpoint(s)" in res.stdout


def test_a_step_past_int64_is_skipped_with_one_line(tmp_path):
    """Found by the CLI fuzzer: a ``global_step`` of 2^63 (or a folder ``checkpoint-99999999999999999999``) overflowed
    the store's int64 step coordinate in compute."""
    origin, run = write_planted_run(tmp_path / "r", config=CONFIG, steps=(1, 2))
    (run / "checkpoint-1" / "trainer_state.json").unlink()
    (run / "checkpoint-1").rename(run / "checkpoint-99999999999999999999")
    res = opd_lens_cli(*compute_args(run, origin, tmp_path / "store"))
    one_line(res, 2, "checkpoint-99999999999999999999", "outside 0 to 2^63 - 1")
    assert res.stdout.startswith("r: computed steps 2;"), res.stdout


# --- NaN and Inf values --------------------------------------------------------------------------------------------


def test_nan_and_inf_are_recorded_as_nan_with_one_warning_each(tmp_path):
    origin, run = write_planted_run(tmp_path / "r", config=CONFIG, steps=(1, 2, 3))
    clean = opd_lens.compute(tmp_path / "clean", run, origin=origin, name="r", settings=SET, progress=False)
    t = tensors_of(origin)
    t[DOWN][3, 4] = math.nan
    resave(origin, t)
    t = tensors_of(run / "checkpoint-2")
    t[UP][0, 0] = math.nan
    resave(run / "checkpoint-2", t)
    t = tensors_of(run / "checkpoint-3")  # the last step: principal angles, spectral shift
    t[Q][1, 1] = math.inf
    resave(run / "checkpoint-3", t)
    store = tmp_path / "store"
    res = opd_lens_cli(*compute_args(run, origin, store))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout.startswith("r: computed steps 1, 2, 3;")
    lines = res.stderr.splitlines()
    assert len(lines) == 3, res.stderr
    assert lines[0].startswith("opd-lens: warning: the origin: 1 matrix holds NaN or Inf") and DOWN in lines[0]
    assert str(origin / W) in lines[0]
    assert lines[1].startswith("opd-lens: warning: step 2: 1 matrix holds NaN or Inf") and UP in lines[1]
    assert lines[2].startswith("opd-lens: warning: step 3: 1 matrix holds NaN or Inf") and Q in lines[2]

    ds = opd_lens.open_store(store).dataset().sel(run="r", layer=0)
    down, up, q = ds.sel(module="mlp.down_proj"), ds.sel(module="mlp.up_proj"), ds.sel(module="self_attn.q_proj")
    for name in ("update_fro", "stable_rank", "hill_alpha", "principal_overlap", "lowmag_overlap", "lock_alignment"):
        assert down[name].isnull().all(), name  # W_0 has no SVD, so no masks: NaN at every step
    assert down.unchanged_frac.notnull().all()  # still defined: NaN has its rules
    assert up.sel(step=2)[["update_fro", "stable_rank", "hill_alpha"]].to_array().isnull().all()
    assert up.sel(step=2).unchanged_frac.notnull() and up.sel(step=2).principal_overlap.notnull()
    last = q.sel(step=3)
    assert last[["update_fro", "max_angle_u", "max_angle_v", "spectral_shift"]].to_array().isnull().all()
    assert last.angles_v.isnull().all()
    # every other matrix is exactly what it is without the NaNs
    others = [m for m in ds.module.values if m not in ("mlp.down_proj", "mlp.up_proj", "self_attn.q_proj")]
    same_values(ds.sel(module=others), clean.sel(run="r", layer=0, module=others))
    assert np.isfinite(ds.sel(step=3, module=others).max_angle_v).all()
    assert opd_lens.open_store(store).compute(progress=False).matrices_read == 0  # nothing left to redo


def test_dask_skips_a_step_its_workers_cannot_read_and_records_nan(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    origin, run = write_planted_run(tmp_path / "r", config=CONFIG, steps=(1, 2, 3))
    _unknown_dtype(run / "checkpoint-2")  # fails on the worker, at read time
    t = tensors_of(run / "checkpoint-3")
    t[UP][0, 0] = math.inf
    resave(run / "checkpoint-3", t)
    reports, stores = [], []
    for name in ("local", "dask"):
        store = opd_lens.open_store(tmp_path / name, SET)
        store.add_run("r", run, origin)
        with contextlib.ExitStack() as stack, pytest.warns(CheckpointWarning) as caught:
            client = None
            if name == "dask":
                cluster = stack.enter_context(
                    distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None)
                )
                client = stack.enter_context(distributed.Client(cluster))
            reports.append(store.compute(progress=False, client=client))
        messages = [str(w.message) for w in caught]
        assert any("step 3: 1 matrix holds NaN or Inf" in m for m in messages), messages
        stores.append(store.dataset())
    for report in reports:
        assert [s for _, s in report.steps] == [1, 3] and len(report.skipped) == 1
        assert "skipping step 2: " in report.skipped[0] and "cannot read tensor" in report.skipped[0]
        assert str(run / "checkpoint-2" / W) in report.skipped[0]
    xr.testing.assert_identical(stores[0].drop_attrs(), stores[1].drop_attrs())


# --- watch: a checkpoint still being written -----------------------------------------------------------------------


def _lines(stream, q: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        q.put(line.rstrip("\n"))


def _next(q: queue.Queue, timeout: float = 60) -> str:
    return q.get(timeout=timeout)


def test_watch_skips_a_checkpoint_being_written_until_it_is_complete(tmp_path):
    origin, run = write_planted_run(tmp_path / "live", config=CONFIG, steps=(1, 2, 3))
    ready = tmp_path / "ready-checkpoint-3"
    (run / "checkpoint-3").rename(ready)
    data = (ready / W).read_bytes()
    store = tmp_path / "store"
    opd_lens.open_store(store, SET)  # settings every matrix of CONFIG is large enough for: no warning line
    cmd = [sys.executable, "-m", "opd_lens.cli", "watch", str(run), "--origin", str(origin), "--name", "live"]
    proc = subprocess.Popen(
        [*cmd, "--store", str(store), "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": ""},
        preexec_fn=ctrl_c_default,
    )
    out, err = queue.Queue(), queue.Queue()
    for stream, q in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=_lines, args=(stream, q), daemon=True).start()
    try:
        assert _next(out).startswith("watching ")
        assert _next(out).startswith("live: step 1, 2 done")
        # the trainer writes checkpoint-3: the directory appears with its weights file half written
        staging = tmp_path / "staging"
        shutil.copytree(ready, staging)
        (staging / W).write_bytes(data[: len(data) // 3])
        staging.rename(run / "checkpoint-3")
        line = _next(err)
        assert line.startswith("opd-lens: warning: skipping incomplete checkpoint: ")
        assert str(run / "checkpoint-3" / W) in line and "still being written" in line
        assert opd_lens.open_store(store).dataset().step.values.tolist() == [1, 2]  # nothing of step 3
        with open(run / "checkpoint-3" / W, "ab") as f:  # more of it, still incomplete, over several polls
            f.write(data[len(data) // 3 : 2 * len(data) // 3])
        time.sleep(1.0)
        assert opd_lens.open_store(store).dataset().step.values.tolist() == [1, 2]
        with open(run / "checkpoint-3" / W, "ab") as f:
            f.write(data[2 * len(data) // 3 :])
        assert _next(out).startswith("live: step 3 done")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.2)
    rest = []
    while not err.empty():
        rest.append(err.get())
    assert rest == ["stopped; every completed step is in the store"], rest  # no second line about checkpoint-3
    ds = opd_lens.open_store(store).dataset()
    # watch computed steps 1 and 2 when 2 was last, so step 2 has principal angles too
    fresh = opd_lens.compute(
        tmp_path / "fresh", run, origin=origin, name="live", endpoint=[2, 3], settings=SET, progress=False
    )
    same_values(ds, fresh)


# --- pickles -------------------------------------------------------------------------------------------------------


class _Evil:
    """A pickle payload that would create a file when unpickled, if unpickling ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_opt_in_reads_weights_only(tmp_path):
    origin, run = write_planted_run(tmp_path / "r", config=CONFIG, steps=(1, 2))
    reference = opd_lens.compute(tmp_path / "ref", run, origin=origin, name="r", settings=SET, progress=False)
    for d in (origin, run / "checkpoint-1", run / "checkpoint-2"):
        _pickle_only(d)
    # the API: refused by default, read when asked, tensor for tensor
    with pytest.raises(CheckpointError, match="OPD_LENS_ALLOW_PICKLE=1"):
        open_checkpoint(origin)
    ckpt = open_checkpoint(origin, allow_pickle=True)
    assert ckpt.tensors[UP].dtype == "BF16" and len(ckpt.fingerprint) == 64
    assert torch.equal(ckpt.read(UP), torch.load(origin / "pytorch_model.bin", weights_only=True)[UP])
    # model.pt counts as weights; what else trainers pickle beside them does not
    other = tmp_path / "other"
    other.mkdir()
    torch.save({UP: ckpt.read(UP)}, other / "model.pt")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "mp_rank_00_model_states.pt"):
        (other / name).write_bytes(b"not read")
    assert set(open_checkpoint(other, allow_pickle=True).tensors) == {UP}
    # the CLI with the opt-in gives the store the safetensors gave
    store = tmp_path / "store"
    args = compute_args(run, origin, store)
    res = opd_lens_cli(*args, env={"OPD_LENS_ALLOW_PICKLE": "1"})
    assert res.returncode == 0 and res.stderr == "", res.stderr
    same_values(opd_lens.open_store(store).dataset(), reference)
    # opted in, a pickle that would run code is refused, and runs none
    marker = tmp_path / "pwned"
    torch.save({UP: torch.zeros(2, 2), "x": _Evil(marker)}, run / "checkpoint-2" / "pytorch_model.bin")
    with pytest.raises(CorruptCheckpointError, match="weights-only pickle") as ei:
        open_checkpoint(run / "checkpoint-2", allow_pickle=True)
    assert str(run / "checkpoint-2" / "pytorch_model.bin") in str(ei.value)
    assert not marker.exists()
    res = opd_lens_cli(*args, env={"OPD_LENS_ALLOW_PICKLE": "1"})
    assert res.returncode == 2 and not marker.exists()
    one_line(res, 2, "opd-lens: warning: skipping incomplete checkpoint: ", "weights-only pickle")


# --- the store under faults ----------------------------------------------------------------------------------------

HOLD = """
import sys
import opd_lens
store = opd_lens.open_store(sys.argv[1])
with store.writer():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_cli_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(tmp_path):
    origin, run = write_planted_run(tmp_path / "r", config=CONFIG, steps=(1, 2))
    store = tmp_path / "store"
    opd_lens.open_store(store, SET)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = compute_args(run, origin, store)
        res = opd_lens_cli(*args)
        one_line(res, 2, "opd-lens: error: ", f"store is locked by PID {holder.pid} ", str(store / ".lock"))
        assert opd_lens.open_store(store).runs == {}
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its lock file stays
        holder.wait(timeout=60)
        assert json.loads((store / ".lock").read_text())["pid"] == holder.pid
        res = opd_lens_cli(*args)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert res.stdout.startswith("r: computed steps 1, 2;") and not (store / ".lock").exists()
    finally:
        holder.kill()
        holder.wait()


def test_cli_store_of_a_newer_schema_is_one_error_line(tmp_path):
    store = tmp_path / "store"
    opd_lens.open_store(store, SET)
    meta = store / "data.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = 99
    meta.write_text(json.dumps(doc))
    one_line(opd_lens_cli("summary", str(store)), 2, "opd-lens: error: ", str(store), "newer", "schema 99")


@pytest.fixture(scope="module")
def two_then_three(tmp_path_factory):
    """A run whose step 3 lands after steps 1 and 2 were computed: the store before step 3, its Dataset, and the
    store computed with all three steps at once."""
    root = tmp_path_factory.mktemp("full-disk")
    origin, run = write_planted_run(root / "r", config=CONFIG, steps=(1, 2, 3))
    clean = opd_lens.compute(root / "clean", run, origin=origin, name="r", settings=SET, endpoint="all", progress=False)
    (run / "checkpoint-3").rename(root / "checkpoint-3")
    before = opd_lens.compute(
        root / "before", run, origin=origin, name="r", settings=SET, endpoint="all", progress=False
    )
    (root / "checkpoint-3").rename(run / "checkpoint-3")
    return root / "before", before, clean


def _check_failed_write(path: Path, before: xr.Dataset, clean: xr.Dataset) -> bool:
    """After a compute whose writes failed: no partial step, no lock, no temporary file; True when the failure came
    before step 3 was complete (the Dataset is then the one before)."""
    assert not (path / ".lock").exists()
    leftovers = [f for f in store_files(path) if f.endswith((".tmp", ".partial"))]
    assert not leftovers, leftovers
    ds = opd_lens.open_store(path, create=False).dataset()
    if 3 not in ds.step.values:
        xr.testing.assert_identical(ds, before)
        return True
    same_values(ds, clean, [v for v in (*SCALARS, "angles_u", "angles_v") if v != "lock_alignment"])
    return False


def _rerun_completes(path: Path, clean: xr.Dataset) -> None:
    report = opd_lens.open_store(path).compute(endpoint="all", progress=False)
    assert report.steps in ([("r", 3)], [])
    ds = opd_lens.open_store(path).dataset()
    same_values(ds, clean)
    got, want = (json.loads(d.attrs["runs"])["r"]["checkpoints"] for d in (ds, clean))
    assert got.keys() == want.keys()


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs, mounted for the test (root only)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); the RLIMIT_FSIZE variant covers failing writes")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_leaves_no_partial_step_and_a_rerun_completes(two_then_three, tmpfs):
    before_path, before, clean = two_then_three
    outcomes = {}
    for pages in (0, 2, 8, 12, 16, 17, 18, 32):  # from no room for the lock to enough for the whole step
        path = tmpfs / "store"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(before_path, path)
        filler = tmpfs / "filler"
        filler.unlink(missing_ok=True)
        free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - pages * 4096))
        try:
            opd_lens.open_store(path).compute(endpoint="all", progress=False)
            outcomes[pages] = None
        except StoreError as e:
            assert str(path) in str(e) and "No space left on device" in str(e), e
            outcomes[pages] = _check_failed_write(path, before, clean)
        filler.unlink()
        _rerun_completes(path, clean)
    failed = [p for p, o in outcomes.items() if o is not None]
    assert len(failed) >= 3, outcomes
    assert sum(1 for o in outcomes.values() if o) >= 2, outcomes  # failures before step 3 was complete


RLIMIT_DRIVER = """
import json, resource, signal, sys
import torch
torch.set_num_threads(1)
import opd_lens
from opd_lens.errors import OpdLensError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
out = {}
for path, limit in json.loads(sys.argv[1]):
    store = opd_lens.open_store(path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        store.compute(endpoint="all", progress=False)
        out[path] = None
    except OpdLensError as e:
        out[path] = f"{type(e).__name__}: {e}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
print(json.dumps(out))
"""


def test_failing_writes_rlimit_fsize_leave_no_partial_step(two_then_three, tmp_path):
    """Writes that fail with EFBIG (RLIMIT_FSIZE in a subprocess): a real OS error at several points of a step."""
    before_path, before, clean = two_then_three
    trials = []
    for limit in (0, 64, 1000, 8000, 30000):  # the lock, the V_K bases file at several sizes, nothing
        path = tmp_path / f"store-{limit}"
        shutil.copytree(before_path, path)
        trials.append((str(path), limit))
    res = subprocess.run([sys.executable, "-c", RLIMIT_DRIVER, json.dumps(trials)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    outcomes = json.loads(res.stdout.splitlines()[-1])
    before_complete = 0
    for path, message in outcomes.items():
        if message is not None:
            assert message.startswith("StoreError: ") and path in message and "File too large" in message, message
            before_complete += _check_failed_write(Path(path), before, clean)
        _rerun_completes(Path(path), clean)
    assert sum(m is not None for m in outcomes.values()) >= 3, outcomes
    assert before_complete >= 2, outcomes


@pytest.mark.parametrize("array", ["unchanged_frac", "lowmag_overlap", "angles_v"])
def test_failing_chunk_write_leaves_no_partial_step(two_then_three, tmp_path, array):
    """A directory where a zarr chunk of step 3 goes: writing that chunk fails (EISDIR), at the first, a middle or
    the last variable of the step. (Chunks equal to the fill value, as the first ``complete = 0``, are not written
    but deleted, and zarr deletes a directory there.)"""
    before_path, before, clean = two_then_three
    path = tmp_path / "store"
    shutil.copytree(before_path, path)
    slot = 2  # steps 1 and 2 hold slots 0 and 1
    coords = (0, slot) + (0,) * (len(opd_lens.open_store(path)._group[array].shape) - 2)
    chunk = path / "data.zarr" / array / "c" / "/".join(map(str, coords))
    chunk.mkdir(parents=True)
    with pytest.raises(StoreError, match="Is a directory") as ei:
        opd_lens.open_store(path).compute(endpoint="all", progress=False)
    assert str(path) in str(ei.value)
    chunk.rmdir()
    assert _check_failed_write(path, before, clean)
    _rerun_completes(path, clean)


# --- long names ----------------------------------------------------------------------------------------------------


def test_very_long_parameter_names_and_huge_block_numbers(tmp_path):
    long = "model.layers.0." + "very_long_projection_name_" * 12 + "proj.weight"
    sd = {long: torch.randn(8, 6), "model.layers.99999999999999999999.mlp.weight": torch.randn(4, 4)}
    origin = save_checkpoint(tmp_path / "origin", sd)
    save_checkpoint(tmp_path / "run" / "checkpoint-1", {k: v + 0.1 for k, v in sd.items()}, step=1)
    plan = open_checkpoint(origin).plan()
    assert [m.tensor for m in plan.matrices] == [long]  # a block number past int64 is not a block
    ds = opd_lens.compute(tmp_path / "store", tmp_path / "run", origin=origin, name="r", progress=False)
    assert float(ds.update_fro.sel(run="r", step=1, layer=0).max()) > 0


# --- fuzzing -------------------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_st = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats() | st.text(max_size=6),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=8,
)
name_part = st.sampled_from(
    ["model", "layers", "layer", "h", "blocks", "0", "1", "٣", "²", "007", "99999999999999999999", "mlp", "experts"]
    + ["self_attn", "qkv_proj", "c_attn", "gate_up_proj", "down_proj", "weight", "bias", "", "|", "/", "..", "\n"]
)
names_st = st.lists(name_part, min_size=1, max_size=7).map(".".join) | st.text(max_size=24)


def _exercise(path: Path, allow_pickle: bool | None = None) -> None:
    """Open, plan, match against itself, fingerprint and read every matrix: CheckpointError is the only failure."""
    with contextlib.suppress(CheckpointError):
        ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
        _ = ckpt.fingerprint
        for ref in matched_matrices(ckpt, ckpt, include_globals=True):
            ckpt.read_matrix(ref)


@FUZZ
@given(names=st.lists(names_st, max_size=6), config=json_st)
def test_fuzz_parameter_names_through_a_real_file(names, config):
    shapes = {n: (2 + i % 3, 3) if i % 4 else (2, 6, 3) for i, n in enumerate(names) if n != "__metadata__"}
    modules = {n.split(".", k)[-1] for n in names for k in range(n.count(".") + 1)}  # every dotted suffix
    keys = sorted(natural_key(m) for m in modules)  # never raises, and keys compare: no str/int mix in a position
    assert all(isinstance(k, tuple) for k in keys)
    try:
        plan_matrices(shapes, config if isinstance(config, dict) else None, True)
    except ValueError as e:  # the one documented failure of the pure function (Checkpoint.plan: a CheckpointError)
        assert "both map to" in str(e), e
    with tempfile.TemporaryDirectory() as d:
        save_file({n: torch.randn(s) for n, s in shapes.items()}, Path(d) / W)
        (Path(d) / "config.json").write_text(json.dumps(config))
        _exercise(Path(d))


entry_st = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "F64", "I8", "F8_E4M3", "Q7", "BOOL"]) | json_st,
        "shape": st.lists(st.integers(0, 5), max_size=3) | json_st,
        "data_offsets": st.lists(st.integers(0, 96), min_size=2, max_size=2) | json_st,
    }
)
header_st = st.dictionaries(
    st.sampled_from([Q, UP, "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.attn.c_attn.weight", "w"])
    | st.sampled_from(["__metadata__"]),
    entry_st | json_st,
    max_size=4,
)


@FUZZ
@given(header=header_st, data=st.binary(max_size=96), config=json_st | st.just({"model_type": "gpt2"}))
def test_fuzz_headers_with_a_valid_length_prefix_then_read_everything(header, data, config):
    with tempfile.TemporaryDirectory() as d:
        raw = json.dumps(header).encode()
        (Path(d) / W).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        (Path(d) / "config.json").write_text(json.dumps(config))
        _exercise(Path(d))


SHARDS = {
    "model-00001-of-00002.safetensors": {Q: torch.randn(4, 4)},
    "model-00002-of-00002.safetensors": {UP: torch.randn(6, 4), "model.norm.weight": torch.randn(4)},
}
shard_name_st = st.sampled_from([*SHARDS, "missing.safetensors", "../model.safetensors", "", ".", "config.json"])
tensor_name_st = st.sampled_from([Q, UP, "model.norm.weight", "model.layers.0.other.weight"]) | st.text(max_size=6)
index_st = st.one_of(
    json_st,
    st.fixed_dictionaries(
        {"weight_map": st.dictionaries(tensor_name_st, shard_name_st | json_st, max_size=5) | json_st},
        optional={"metadata": json_st},
    ),
)


@FUZZ
@given(index=index_st, raw=st.none() | st.binary(max_size=64), state=json_st)
def test_fuzz_shard_index_json(index, raw, state):
    with tempfile.TemporaryDirectory() as d:
        for name, tensors in SHARDS.items():
            save_file(tensors, Path(d) / name)
        text = json.dumps(index).encode() if raw is None else raw
        (Path(d) / "model.safetensors.index.json").write_bytes(text)
        (Path(d) / "trainer_state.json").write_text(json.dumps(state))
        _exercise(Path(d))


def _valid_pickle() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        torch.save({Q: torch.randn(4, 4), UP: torch.randn(6, 4)}, Path(d) / "p.bin")
        return (Path(d) / "p.bin").read_bytes()


VALID_PICKLE = _valid_pickle()


def _flipped(flips: list[tuple[int, int]]) -> bytes:
    """VALID_PICKLE with the bytes at some offsets replaced."""
    data = bytearray(VALID_PICKLE)
    for offset, value in flips:
        data[offset] = value
    return bytes(data)


flips_st = st.lists(st.tuples(st.integers(0, len(VALID_PICKLE) - 1), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@given(data=st.binary(max_size=300) | flips_st.map(_flipped))
def test_fuzz_pickle_bytes_when_opted_in(data):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "pytorch_model.bin").write_bytes(data)
        _exercise(Path(d), allow_pickle=True)


@FUZZ
@given(data=st.binary(max_size=200), n=st.integers(0, 2**64 - 1) | st.integers(0, 300))
def test_fuzz_random_bytes_with_any_length_prefix(data, n):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / W).write_bytes(struct.pack("<Q", n) + data)
        _exercise(Path(d))
