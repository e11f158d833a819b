"""The diagnostics store and compute engine: the Dataset contract, stored values against the diagnostics computed
directly from the checkpoint files, incremental compute, the origin-factor cache, the summary table, errors, the
writer lock and the repair of an interrupted resize.

Every run is a real directory of bf16 safetensors checkpoints with Qwen3 tensor names, in a trainer layout."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import opd_lens
from opd_lens.checkpoints import (
    checkpoint_path,
    find_checkpoints,
    matched_matrices,
    open_checkpoint,
    save_checkpoint,
)
from opd_lens.diagnostics import MatrixDiagnostics, Settings, matrix_diagnostics, sim_k
from opd_lens.errors import (
    CheckpointNotFoundError,
    CheckpointWarning,
    OpdLensError,
    ShapeMismatchError,
    StoreError,
    StoreLockedError,
)
from opd_lens.schema import SCHEMA_VERSION
from opd_lens.testing import qwen3_config, write_planted_run

SET = Settings(angle_k=16, mask_rank=8)
VARIABLES = {
    "unchanged_frac",
    "update_fro",
    "stable_rank",
    "hill_alpha",
    "lock_alignment",
    "principal_overlap",
    "lowmag_overlap",
    "max_angle_u",
    "max_angle_v",
    "angles_u",
    "angles_v",
    "spectral_shift",
    "intruder_dimensions",
    "channel_energy",
    "update_spectrum",
}
STEP_SCALARS = ("unchanged_frac", "update_fro", "stable_rank", "hill_alpha", "principal_overlap", "lowmag_overlap")
END_SCALARS = ("max_angle_u", "max_angle_v", "spectral_shift")
N_MATRICES = 14  # 2 layers x 7 dense matrices of a Qwen3 block
RTOL, ATOL = 1e-5, 1e-7  # values are stored as float32
HOLD_LOCK = """
import sys
import opd_lens
path = sys.stdin.readline().strip()
store = opd_lens.open_store(path, create=False)
with store.writer():
    print("locked", flush=True)
    sys.stdin.read()
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- runs on disk ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    origin: Path
    run_dir: Path
    layout: str
    method: str


def write_sparse_steps(
    origin: Path,
    run_dir: Path,
    steps,
    layout: str,
    *,
    seed: int,
    scale: float = 0.05,
    density: float = 0.1,
    last: int | None = None,
) -> None:
    """Hand-write checkpoints W_t = W_0 + (t/last)·scale·rms(W_0)·S (S sparse Gaussian) from an existing origin,
    the way an RLVR run starts from the same SFT anchor as an OPD run."""
    o = open_checkpoint(origin)
    w0 = {name: o.read(name) for name in o.tensors}
    g = torch.Generator().manual_seed(seed)
    direction = {}
    for name, w in w0.items():
        if w.ndim == 2:
            mask = torch.rand(w.shape, generator=g) < density
            direction[name] = torch.randn(w.shape, generator=g) * mask * w.float().pow(2).mean().sqrt()
    last = last or max(steps)
    for step in steps:
        tensors = {
            n: (w.float() + (step / last) * scale * direction[n]).to(w.dtype) if n in direction else w
            for n, w in w0.items()
        }
        save_checkpoint(checkpoint_path(run_dir, step, layout), tensors, step=step, config=o.config)


def make_runs(root: Path) -> dict[str, Run]:
    """Three runs: SFT from the base model (HF Trainer layout); OPD from the SFT anchor (verl layout, sharded);
    RLVR from the same anchor directory (step_N layout, written by hand)."""
    base, sft = write_planted_run(root / "sft", layout="hf", steps=(25, 50, 75, 100), seed=1, scale=0.02)
    anchor, opd = write_planted_run(
        root / "opd", layout="verl", steps=(10, 20, 30, 40), seed=2, scale=0.05, rank=2, max_shard_bytes=60_000
    )
    rlvr = root / "rlvr" / "run"
    write_sparse_steps(anchor, rlvr, (15, 30, 45, 60), "step", seed=3)
    return {
        "sft": Run(base, sft, "hf", "sft"),
        "opd": Run(anchor, opd, "verl", "opd"),
        "rlvr": Run(anchor, rlvr, "step", "rlvr"),
    }


def new_store(path: Path, runs: dict[str, Run], names=None, **compute):
    store = opd_lens.open_store(path, SET)
    for name in names or runs:
        r = runs[name]
        store.add_run(name, r.run_dir, origin=r.origin, method=r.method)
    report = store.compute(progress=False, **compute)
    return store, report


def direct(run: Run, endpoint: bool = True) -> dict[tuple[int, int, str], MatrixDiagnostics]:
    """(step, layer, module) -> the diagnostics computed here from the checkpoint files, without the store."""
    origin = open_checkpoint(run.origin)
    out = {}
    for ckpt in find_checkpoints(run.run_dir):
        for ref in matched_matrices(origin, ckpt):
            w0, wt = origin.read_matrix(ref), ckpt.read_matrix(ref)
            out[ckpt.step, ref.layer, ref.module] = matrix_diagnostics(w0, wt, SET, endpoint=endpoint)
    return out


def direct_lock(diags: dict[tuple[int, int, str], MatrixDiagnostics]) -> dict[tuple[int, int, str], float]:
    last = max(step for step, _, _ in diags)
    return {
        (step, layer, module): float(sim_k(d.lock_basis, diags[last, layer, module].lock_basis))
        for (step, layer, module), d in diags.items()
    }


def _no_attrs(ds: xr.Dataset) -> xr.Dataset:
    out = ds.copy()
    out.attrs = {}
    return out


def at(ds: xr.Dataset, var: str, run: str, step: int, layer: int, module: str) -> np.ndarray:
    return ds[var].sel(run=run, step=step, layer=layer, module=module).values


def steps_of(ds: xr.Dataset, run: str) -> list[int]:
    return [int(s) for s in ds.step.values[ds.progress.sel(run=run).notnull().values]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def lock_holder():
    """A process that will hold a store's writer lock: started early, so that it imports while the store computes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


_CLEAN_COMPUTE_WARNINGS: list[str] = []


@pytest.fixture(scope="module")
def computed(runs, tmp_path_factory, lock_holder):
    """The three runs in one store, computed with the defaults (endpoint="last"): (store, report, dataset)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store, report = new_store(tmp_path_factory.mktemp("computed") / "store", runs)
    _CLEAN_COMPUTE_WARNINGS[:] = [str(w.message) for w in caught]
    return store, report, store.dataset()


@pytest.fixture(scope="module")
def diagnostics(runs) -> dict[str, dict]:
    return {name: direct(run) for name, run in runs.items()}


# --- the Dataset contract ----------------------------------------------------------------------------------------


def test_runs_are_real_bf16_qwen_checkpoints_in_trainer_layouts(runs):
    assert len(runs) >= 3
    layouts = {"sft": "checkpoint-", "opd": "global_step_", "rlvr": "step_"}
    for name, run in runs.items():
        ckpts = find_checkpoints(run.run_dir)
        assert len(ckpts) >= 4
        for c in ckpts:
            assert c.path.relative_to(run.run_dir).parts[0].startswith(layouts[name])
            assert {info.dtype for info in c.tensors.values()} == {"BF16"}
            assert "model.layers.1.self_attn.q_proj.weight" in c.tensors
            assert {ref.layer for ref in c.plan().matrices} == {0, 1}
            assert len({info.file for info in c.tensors.values()}) > (1 if name == "opd" else 0)  # opd is sharded
    assert runs["opd"].origin == runs["rlvr"].origin


def test_dataset_dims_variables_and_dtypes(computed):
    _, _, ds = computed
    assert set(ds.dims) == {"run", "step", "layer", "module", "angle_index", "rank_index"}
    assert set(ds.data_vars) == VARIABLES
    for name in VARIABLES:
        assert ds[name].dtype == np.float32, name
        extra = {"angles_u": ("angle_index",), "angles_v": ("angle_index",), "update_spectrum": ("rank_index",)}
        assert ds[name].dims == ("run", "step", "layer", "module", *extra.get(name, ())), name
    assert list(ds.rank_index.values) == list(range(max(SET.lock_k, SET.hill_k)))
    assert ds.sizes["run"] == 3
    assert ds.sizes["layer"] == 2
    assert ds.sizes["module"] == 7
    assert ds.sizes["angle_index"] == SET.angle_k


def test_dataset_coords(computed, runs):
    _, _, ds = computed
    assert list(ds.run.values) == ["sft", "opd", "rlvr"]
    assert ds.run.dtype.kind == "U"
    assert ds.step.dtype == np.int64
    union = sorted({c.step for r in runs.values() for c in find_checkpoints(r.run_dir)})
    assert list(ds.step.values) == union == [10, 15, 20, 25, 30, 40, 45, 50, 60, 75, 100]
    assert ds.layer.dtype == np.int64
    assert list(ds.layer.values) == [0, 1]
    assert ds.module.dtype.kind == "U"
    assert list(ds.module.values) == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    assert list(ds.method.values) == ["sft", "opd", "rlvr"]
    assert ds.method.dims == ("run",)
    assert ds.progress.dims == ("run", "step")
    for name, run in runs.items():
        steps = [c.step for c in find_checkpoints(run.run_dir)]
        for step in ds.step.values:
            p = float(ds.progress.sel(run=name, step=step))
            if step in steps:
                assert p == pytest.approx(step / max(steps), rel=1e-12)
            else:
                assert np.isnan(p)
                # a run without this step has no value there
                assert bool(ds.sel(run=name, step=step).unchanged_frac.isnull().all())


def test_dataset_attrs(computed, runs):
    _, _, ds = computed
    assert ds.attrs["schema_version"] == SCHEMA_VERSION
    assert ds.attrs["opd_lens_version"] == opd_lens.__version__
    for key, value in SET.asdict().items():
        assert ds.attrs[key] == value, key
    assert set(json.loads(ds.attrs["runs"])) == set(runs)
    for name, run in runs.items():
        spec = json.loads(ds.attrs["runs"])[name]
        assert Path(spec["origin"]) == run.origin.resolve()
        assert Path(spec["run_dir"]) == run.run_dir.resolve()
        assert spec["method"] == run.method
        assert spec["origin_fingerprint"] == open_checkpoint(run.origin).fingerprint
        ckpts = find_checkpoints(run.run_dir)
        assert set(spec["checkpoints"]) == {str(c.step) for c in ckpts}
        for c in ckpts:
            entry = spec["checkpoints"][str(c.step)]
            assert Path(entry["path"]) == c.path
            assert entry["fingerprint"] == c.fingerprint
    # the two runs from the SFT anchor name the same origin directory
    assert json.loads(ds.attrs["runs"])["opd"]["origin"] == json.loads(ds.attrs["runs"])["rlvr"]["origin"]


def test_numel_coord_is_matrix_size(computed, runs):
    _, _, ds = computed
    origin = open_checkpoint(runs["sft"].origin)
    for ref in origin.plan().matrices:
        assert int(ds.numel.sel(run="sft", layer=ref.layer, module=ref.module)) == ref.shape[0] * ref.shape[1]


def test_lazy_dataset_agrees_with_the_snapshot(computed):
    store, _, ds = computed
    assert ds.unchanged_frac.chunks is None  # the default: loaded into memory
    lazy = store.dataset(lazy=True)
    assert lazy.unchanged_frac.chunks is not None  # dask-backed, read on demand
    assert lazy.attrs == ds.attrs
    part = {"run": ["sft", "rlvr"], "step": [30, 60, 100]}  # a few (run, step) chunks are enough
    xr.testing.assert_identical(lazy.sel(part).load(), ds.sel(part))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_dataset_of_some_runs_and_steps_is_the_full_datasets_selection(computed, data):
    store, _, ds = computed
    names, stored = list(map(str, ds.run.values)), [int(s) for s in ds.step.values]
    runs = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    steps = data.draw(st.lists(st.sampled_from([*stored, 1, 99, 2**40]), unique=True))  # and some never computed
    expected = ds.sel(run=[n for n in names if n in runs], step=[s for s in stored if s in steps])
    expected = expected.isel(step=expected.progress.notnull().any("run").values)  # steps of the chosen runs only
    expected.attrs["runs"] = json.dumps({n: store.runs[n] for n in names if n in runs})
    xr.testing.assert_identical(store.dataset(runs=runs, steps=steps), expected)


def test_dataset_of_some_steps_reads_only_their_chunks(computed, tmp_path):
    """The chunks of the steps left out are never read: garbage in them breaks the whole Dataset, not a part."""
    store, _, ds = computed
    copy = opd_lens.open_store(shutil.copytree(store.path, tmp_path / "store"), create=False)
    run, slot = copy.run_index("sft"), list(zarr.open_array(copy.data_path / "step", mode="r")[:]).index(50)
    for name in VARIABLES - {"lock_alignment"}:  # lock_alignment's chunks hold a block of steps
        chunk = copy.data_path / name / "c" / str(run) / str(slot)
        for file in chunk.rglob("*") if chunk.is_dir() else [chunk]:
            if file.is_file():
                file.write_bytes(b"not a chunk")
    with pytest.raises(Exception):  # noqa: B017 - whichever codec meets the garbage first
        copy.dataset()
    kept = [25, 75, 100]
    xr.testing.assert_identical(copy.dataset(runs=["sft"], steps=kept), store.dataset(runs=["sft"], steps=kept))
    xr.testing.assert_identical(copy.dataset(steps=[60]), store.dataset(steps=[60]))  # another slot of sft


def test_dataset_of_an_unknown_run(computed):
    store, _, _ = computed
    with pytest.raises(StoreError, match=r"no run named 'sftt'; registered: \['sft', 'opd', 'rlvr'\]"):
        store.dataset(runs=["sftt"])


def test_raw_zarr_opens_with_xarray(computed):
    store, _, _ = computed
    raw = xr.open_zarr(store.data_path, consolidated=False)
    assert set(raw.data_vars) >= VARIABLES


# --- values against the diagnostics computed directly -------------------------------------------------------


def test_stored_values_equal_direct_diagnostics(computed, diagnostics):
    _, _, ds = computed
    checked = 0
    for name, diags in diagnostics.items():
        last = max(step for step, _, _ in diags)
        for (step, layer, module), d in diags.items():
            for var in STEP_SCALARS:
                np.testing.assert_allclose(
                    at(ds, var, name, step, layer, module), getattr(d, var), rtol=RTOL, atol=ATOL, err_msg=var
                )
            spectrum = at(ds, "update_spectrum", name, step, layer, module)
            np.testing.assert_allclose(spectrum, d.update_spectrum.numpy(), rtol=RTOL, atol=ATOL)
            if step == last:  # endpoint="last"
                for var in END_SCALARS:
                    np.testing.assert_allclose(
                        at(ds, var, name, step, layer, module), getattr(d, var), rtol=RTOL, atol=ATOL, err_msg=var
                    )
                for var in ("angles_u", "angles_v"):
                    expected = getattr(d, var).numpy()
                    got = at(ds, var, name, step, layer, module)
                    assert expected.shape == (SET.angle_k,)
                    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6, err_msg=var)
            checked += 1
    assert checked == 12 * N_MATRICES


def test_lock_alignment_is_sim_k_to_last_step(computed, diagnostics):
    _, _, ds = computed
    for name, diags in diagnostics.items():
        expected = direct_lock(diags)
        got = {key: float(at(ds, "lock_alignment", name, *key)) for key in expected}
        last = max(step for step, _, _ in expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=RTOL, abs=1e-6), (name, key)
            if key[0] == last:
                assert got[key] == pytest.approx(1.0, abs=1e-6)
        # the subspace does move: early checkpoints are not perfectly aligned with the final channel everywhere
        assert min(got.values()) < 0.999


def test_endpoint_last_puts_angles_only_at_each_runs_last_step(computed, runs):
    _, _, ds = computed
    for name, run in runs.items():
        last = find_checkpoints(run.run_dir)[-1].step
        for var in (*END_SCALARS, "angles_u", "angles_v"):
            has = ds[var].sel(run=name).notnull()
            has = has.any([d for d in has.dims if d != "step"])
            assert [int(s) for s in ds.step.values[has.values]] == [last], (name, var)
            assert bool(ds[var].sel(run=name, step=last).notnull().all()), (name, var)


ENDPOINTS = {"all": ("all", [25, 50, 75, 100]), "list": ([25, 75], [25, 75]), "text": ("50, 100", [50, 100])}


def test_endpoint_choices(tmp_path, runs, diagnostics):
    # one store, the sft run registered once per endpoint choice, each computed with its own
    store = opd_lens.open_store(tmp_path / "store", SET)
    sft = runs["sft"]
    for name, (endpoint, _) in ENDPOINTS.items():
        store.add_run(name, sft.run_dir, origin=sft.origin)
        store.compute(runs=[name], endpoint=endpoint, progress=False)
    ds = store.dataset()
    for name, (_, expected) in ENDPOINTS.items():
        for var in (*END_SCALARS, "angles_u", "angles_v"):
            has = ds[var].sel(run=name).notnull()
            has = has.any([d for d in has.dims if d != "step"])
            assert [int(s) for s in ds.step.values[has.values]] == expected, (name, var)
        for (step, layer, module), d in diagnostics["sft"].items():
            for var in STEP_SCALARS:  # the same everywhere
                np.testing.assert_allclose(
                    at(ds, var, name, step, layer, module), getattr(d, var), rtol=RTOL, atol=ATOL
                )
            if step in expected:
                for var in ("angles_v", "spectral_shift"):
                    np.testing.assert_allclose(
                        at(ds, var, name, step, layer, module), getattr(d, var), rtol=RTOL, atol=1e-6
                    )


def test_bad_endpoint_is_a_store_error(tmp_path, runs):
    store = opd_lens.open_store(tmp_path / "store", SET)
    store.add_run("sft", runs["sft"].run_dir, origin=runs["sft"].origin)
    with pytest.raises(StoreError, match="endpoint"):
        store.compute(endpoint="first", progress=False)


# --- incremental compute --------------------------------------------------------------------------------------------


def test_second_compute_reads_nothing(computed):
    store, report, before = computed
    # W_0 once per run (each run's checkpoints form one group), W_t once per step
    assert report.matrices_read == 3 * N_MATRICES + 12 * N_MATRICES
    assert len(report.steps) == 12
    again = store.compute(progress=False)
    assert again.matrices_read == 0
    assert again.steps == []
    assert again.lock_updates == 0
    xr.testing.assert_identical(store.dataset(), before)
    # a fresh handle on the same directory sees the same Dataset and settings
    reopened = opd_lens.open_store(store.path)
    assert reopened.settings == SET
    xr.testing.assert_identical(reopened.dataset(), before)
    assert reopened.compute(progress=False).matrices_read == 0


def test_origin_factors_cached_once_per_origin(computed, runs):
    store, report, _ = computed
    dirs = sorted(p for p in (store.path / "cache" / "origin").iterdir() if p.is_dir())
    # three runs, two origin directories (OPD and RLVR share the SFT anchor)
    assert len(dirs) == 2
    for d in dirs:
        assert len([f for f in d.iterdir() if f.suffix == ".safetensors"]) == N_MATRICES


def test_new_checkpoint_is_appended_and_lock_alignment_follows_the_new_last_step(tmp_path):
    runs = make_runs(tmp_path / "runs")
    store, first = new_store(tmp_path / "store", runs, ["sft", "opd"])
    assert first.matrices_read == 2 * N_MATRICES + 8 * N_MATRICES  # W_0 once per run, W_t once per step
    before = store.dataset()
    snapshot = before.copy(deep=True)
    sft = runs["sft"]
    # a later checkpoint in another direction, so the final channel moves
    write_sparse_steps(sft.origin, sft.run_dir, (125,), "hf", seed=11, scale=0.05, density=0.5)

    report = store.compute(progress=False)
    assert report.steps == [("sft", 125)]
    assert report.matrices_read == N_MATRICES * 2  # origin factors come from the cache
    assert report.lock_updates == 5  # steps 25..100 refer to the new last step, and 125 itself
    ds = store.dataset()
    assert list(ds.step.values) == [10, 20, 25, 30, 40, 50, 75, 100, 125]

    diags = direct(sft)
    lock = direct_lock(diags)
    for (step, layer, module), value in lock.items():
        assert float(at(ds, "lock_alignment", "sft", step, layer, module)) == pytest.approx(value, rel=RTOL, abs=1e-6)
    old = before.lock_alignment.sel(run="sft", step=[25, 50, 75, 100])
    new = ds.lock_alignment.sel(run="sft", step=[25, 50, 75, 100])
    assert float(abs(new - old).max()) > 0.05  # they changed: they refer to V_K(125) now

    # progress renormalised to the new last step; the other run untouched
    np.testing.assert_allclose(
        ds.progress.sel(run="sft", step=[25, 50, 75, 100, 125]), np.array([25, 50, 75, 100, 125]) / 125
    )
    xr.testing.assert_identical(_no_attrs(ds.sel(run="opd", step=before.step.values)), _no_attrs(before.sel(run="opd")))
    # earlier values of sft other than lock_alignment are untouched
    for var in STEP_SCALARS:
        np.testing.assert_array_equal(
            ds[var].sel(run="sft", step=before.step.values).values, before[var].sel(run="sft").values
        )
    # the new step has its values and, as the new last step, angles
    for (step, layer, module), d in diags.items():
        if step == 125:
            for var in (*STEP_SCALARS, *END_SCALARS):
                np.testing.assert_allclose(
                    at(ds, var, "sft", step, layer, module), getattr(d, var), rtol=RTOL, atol=ATOL
                )
    assert bool(ds.angles_v.sel(run="sft", step=125).notnull().all())

    again = store.compute(progress=False)
    assert (again.matrices_read, again.steps, again.lock_updates) == (0, [], 0)

    # the Dataset taken before is a snapshot: step 100 is its last step, aligned with itself
    xr.testing.assert_identical(before, snapshot)
    np.testing.assert_allclose(before.lock_alignment.sel(run="sft", step=100).values, 1.0, atol=1e-6)


def test_run_added_later_joins_the_dataset(tmp_path):
    runs = make_runs(tmp_path / "runs")
    store, _ = new_store(tmp_path / "store", runs, ["sft"])
    before = store.dataset()

    # a run from the same base model as sft, at steps the others do not have: W_0's factors are cached already
    late = tmp_path / "late"
    write_sparse_steps(runs["sft"].origin, late, (5, 60, 130), "step", seed=5)
    store.add_run("late", late, origin=runs["sft"].origin, method="opd-k16")
    report = store.compute(progress=False)
    assert sorted(report.steps) == [("late", 5), ("late", 60), ("late", 130)]
    assert report.matrices_read == N_MATRICES + 3 * N_MATRICES  # W_0 once for the three, W_t for each

    # another model, with a third layer, its own origin and k_proj of 12 x 24: the layer grid grows
    wide_origin, wide = write_planted_run(
        tmp_path / "wide", config=qwen3_config(layers=3, hidden=24, intermediate=40), steps=(7, 14), layout="step"
    )
    store.add_run("wide", wide, origin=wide_origin, method="sft")
    report = store.compute(progress=False)
    assert report.matrices_read == 21 + 2 * 21  # W_0 once (its factors come from that read), W_t per step

    ds = store.dataset()
    assert list(ds.run.values) == ["sft", "late", "wide"]
    assert list(ds.method.values) == ["sft", "opd-k16", "sft"]
    assert list(ds.layer.values) == [0, 1, 2]
    assert list(ds.step.values) == [5, 7, 14, 25, 50, 60, 75, 100, 130]
    assert steps_of(ds, "late") == [5, 60, 130]
    assert steps_of(ds, "wide") == [7, 14]
    np.testing.assert_allclose(ds.progress.sel(run="late", step=[5, 60, 130]), np.array([5, 60, 130]) / 130)
    assert bool(ds.unchanged_frac.sel(run="late", step=[7, 14, 25, 100]).isnull().all())
    assert bool(ds.unchanged_frac.sel(run="sft", step=[5, 7, 14, 60, 130]).isnull().all())
    assert bool(ds.unchanged_frac.sel(run=["sft", "late"], layer=2).isnull().all())
    assert int(ds.numel.sel(run="sft", layer=2).sum()) == 0
    assert bool(ds.unchanged_frac.sel(run="wide", step=[7, 14], layer=2).notnull().all())
    # the runs already there keep their values
    old = ds.sel(run=["sft"], step=before.step.values, layer=[0, 1])
    for var in VARIABLES:
        xr.testing.assert_identical(old[var], before[var])

    # values of the late runs against the diagnostics computed directly
    for name, run_dir, origin in (("late", late, runs["sft"].origin), ("wide", wide, wide_origin)):
        diags = direct(Run(origin, run_dir, "step", name))
        lock = direct_lock(diags)
        last = max(s for s, _, _ in diags)
        for (step, layer, module), d in diags.items():
            for var in STEP_SCALARS:
                np.testing.assert_allclose(
                    at(ds, var, name, step, layer, module), getattr(d, var), rtol=RTOL, atol=ATOL
                )
            lock_value = float(at(ds, "lock_alignment", name, step, layer, module))
            assert lock_value == pytest.approx(lock[step, layer, module], rel=RTOL, abs=1e-6, nan_ok=True)
            if step == last:
                np.testing.assert_allclose(
                    at(ds, "angles_u", name, step, layer, module)[: d.angles_u.numel()],
                    d.angles_u.numpy(),
                    rtol=RTOL,
                    atol=1e-6,
                )
                # profiles shorter than angle_index (k capped at the smaller dimension) are NaN-padded
                assert np.isnan(at(ds, "angles_u", name, step, layer, module)[d.angles_u.numel() :]).all()
    # k_proj of "wide" is 12 x 24, angle_k = 16: k = 12, the whole U side (NaN: 0 by construction), 12 V angles
    assert np.isnan(at(ds, "angles_u", "wide", 14, 0, "self_attn.k_proj")).all()
    assert np.isfinite(at(ds, "angles_v", "wide", 14, 0, "self_attn.k_proj")).sum() == 12


def test_rewritten_checkpoint_is_recomputed_with_its_lock_alignment(tmp_path):
    """A trainer resumed from an earlier checkpoint writes the same step again with other weights: the step is
    recomputed (with a warning) and lock_alignment must refer to the weights now on disk. sft gets a middle step
    rewritten, opd its last."""
    runs = make_runs(tmp_path / "runs")
    store, _ = new_store(tmp_path / "store", runs, ["sft", "opd"])
    rewritten = {"sft": 50, "opd": 40}
    for name, step in rewritten.items():
        run = runs[name]
        last = find_checkpoints(run.run_dir)[-1].step
        write_sparse_steps(run.origin, run.run_dir, (step,), run.layout, seed=13, scale=0.05, density=0.5, last=last)
    with pytest.warns(CheckpointWarning, match="changed since it was computed"):
        report = store.compute(progress=False)
    assert report.steps == list(rewritten.items())
    ds = store.dataset()
    stale = []
    for name, step in rewritten.items():
        run = runs[name]
        diags = direct(run)
        for (s, layer, module), d in diags.items():
            if s == step:
                for var in STEP_SCALARS:
                    np.testing.assert_allclose(
                        at(ds, var, name, s, layer, module), getattr(d, var), rtol=RTOL, atol=ATOL
                    )
        ckpt = open_checkpoint(checkpoint_path(run.run_dir, step, run.layout))
        assert json.loads(ds.attrs["runs"])[name]["checkpoints"][str(step)]["fingerprint"] == ckpt.fingerprint
        lock = direct_lock(diags)
        got = {key: float(at(ds, "lock_alignment", name, *key)) for key in lock}
        wrong = [(key, got[key], v) for key, v in lock.items() if not np.isclose(got[key], v, rtol=1e-4, atol=1e-5)]
        if wrong:
            stale.append(f"{name} (step {step} rewritten): {len(wrong)} of {len(lock)} stale, e.g. {wrong[0]}")
    assert not stale, "lock_alignment not recomputed: " + "; ".join(stale)


def test_one_call_compute(tmp_path, runs):
    path = tmp_path / "store"
    sft, opd = runs["sft"], runs["opd"]
    ds = opd_lens.compute(path, sft.run_dir, origin=sft.origin, name="sft", method="sft", settings=SET, progress=False)
    assert isinstance(ds, xr.Dataset)
    ds = ds.load()
    assert list(ds.run.values) == ["sft"]
    ds2 = opd_lens.compute(path, opd.run_dir, origin=opd.origin, name="opd", progress=False, endpoint="all")
    assert list(ds2.run.values) == ["sft", "opd"]
    assert list(ds2.method.values) == ["sft", "opd"]
    xr.testing.assert_identical(_no_attrs(ds2.sel(run="sft", step=ds.step.values)), _no_attrs(ds.sel(run="sft")))
    opd_angles = ds2.angles_v.sel(run="opd", step=[10, 20, 30, 40])
    assert bool(opd_angles.notnull().any(["layer", "module", "angle_index"]).all())


def test_compute_of_unknown_run(computed):
    store, _, _ = computed
    with pytest.raises(StoreError, match="nope"):
        store.compute(runs=["nope"], progress=False)


# --- summary ---------------------------------------------------------------------------------------------------------


def test_summarize_one_row_per_run(computed, runs, diagnostics):
    _, _, ds = computed
    table = opd_lens.summarize(ds)
    assert list(table.index) == ["sft", "opd", "rlvr"]
    assert table.index.name == "run"
    assert set(table.columns) == {
        "method",
        "first_step",
        "last_step",
        "steps",
        "unchanged_pct",
        "principal_overlap_pct",
        "lowmag_overlap_pct",
        "max_angle_u_deg",
        "max_angle_v_deg",
        "spectral_shift",
        "intruders",
        "stable_rank",
        "update_fro",
        "lock_alignment_first",
    }
    for name, run in runs.items():
        row = table.loc[name]
        steps = [c.step for c in find_checkpoints(run.run_dir)]
        first, last = steps[0], steps[-1]
        assert row["method"] == run.method
        assert (row["first_step"], row["last_step"], row["steps"]) == (first, last, 4)
        diags = {k: d for k, d in diagnostics[name].items() if k[0] == last}
        numel = {(lay, mod): int(ds.numel.sel(run=name, layer=lay, module=mod)) for _, lay, mod in diags}
        # the parameter-weighted mean at the last step, by hand from the Dataset and from the direct values
        uf = ds.unchanged_frac.sel(run=name, step=last)
        manual = sum(float(uf.sel(layer=lay, module=mod)) * n for (lay, mod), n in numel.items()) / sum(numel.values())
        assert row["unchanged_pct"] == pytest.approx(100 * manual, rel=1e-6)
        exact = sum(diags[last, lay, mod].unchanged_frac * n for (lay, mod), n in numel.items()) / sum(numel.values())
        assert row["unchanged_pct"] == pytest.approx(100 * exact, rel=1e-5)
        unweighted = np.mean([d.unchanged_frac for d in diags.values()])
        assert not np.isclose(manual, unweighted, rtol=1e-6)  # the weighting matters for these shapes
        for col, var, factor in (
            ("principal_overlap_pct", "principal_overlap", 100),
            ("lowmag_overlap_pct", "lowmag_overlap", 100),
            ("stable_rank", "stable_rank", 1),
            ("update_fro", "update_fro", 1),
            ("max_angle_u_deg", "max_angle_u", 1),
            ("max_angle_v_deg", "max_angle_v", 1),
            ("spectral_shift", "spectral_shift", 1),
            ("intruders", "intruder_dimensions", 1),
        ):
            expected = factor * np.mean([getattr(d, var) for d in diags.values()])
            assert row[col] == pytest.approx(expected, rel=1e-5), col
        lock = direct_lock(diagnostics[name])
        expected = np.mean([v for (s, _, _), v in lock.items() if s == first])
        assert row["lock_alignment_first"] == pytest.approx(expected, rel=1e-5)


# --- errors ----------------------------------------------------------------------------------------------------------


def test_add_run_errors_leave_the_registry_alone(tmp_path, runs):
    store = opd_lens.open_store(tmp_path / "store", SET)
    sft = runs["sft"]
    store.add_run("sft", sft.run_dir, origin=sft.origin, method="sft")
    registry = store.runs

    with pytest.raises(CheckpointNotFoundError, match="does not exist") as e:
        store.add_run("x", tmp_path / "no-such-run", origin=sft.origin)
    assert "no-such-run" in str(e.value)

    with pytest.raises(CheckpointNotFoundError, match="does not exist") as e:
        store.add_run("x", sft.run_dir, origin=tmp_path / "no-such-origin")
    assert "no-such-origin" in str(e.value)

    empty = tmp_path / "empty-origin"
    empty.mkdir()
    (empty / "README.md").write_text("not weights")
    with pytest.raises(OpdLensError, match="no safetensors") as e:
        store.add_run("x", sft.run_dir, origin=empty)
    assert str(empty) in str(e.value)

    other, _ = write_planted_run(tmp_path / "other", config=qwen3_config(hidden=32, intermediate=48), steps=(1,))
    with pytest.raises(ShapeMismatchError, match=r"model\.layers\.0\.mlp\.down_proj\.weight") as e:
        store.add_run("x", sft.run_dir, origin=other)
    assert isinstance(e.value, OpdLensError)

    with pytest.raises(StoreError, match="'sft'.*already registered"):
        store.add_run("sft", runs["opd"].run_dir, origin=sft.origin)
    with pytest.raises(StoreError, match="already registered"):
        store.add_run("sft", sft.run_dir, origin=sft.origin, method="rlvr")
    with pytest.raises(StoreError, match="non-empty"):
        store.add_run("  ", sft.run_dir, origin=sft.origin)
    store.add_run("sft", sft.run_dir, origin=sft.origin, method="sft")  # the same run again: a no-op
    assert store.runs == registry


def test_open_store_errors(tmp_path, computed):
    store, _, _ = computed
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an opd_lens store"):
        opd_lens.open_store(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StoreError):
        opd_lens.open_store(a_file)

    with pytest.raises(StoreError, match="settings"):
        opd_lens.open_store(store.path, Settings(angle_k=32, mask_rank=8))
    assert opd_lens.open_store(store.path, SET).settings == SET

    missing = tmp_path / "missing"
    with pytest.raises(StoreError, match="no opd_lens store"):
        opd_lens.open_store(missing, create=False)
    assert not missing.exists()

    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    assert opd_lens.open_store(empty_dir, SET).runs == {}  # an empty directory becomes a store


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "store"
    opd_lens.open_store(path, SET)
    meta_file = path / "data.zarr" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["schema_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="newer") as e:
        opd_lens.open_store(path)
    assert "99" in str(e.value)


def test_dataset_of_an_empty_store(tmp_path):
    store = opd_lens.open_store(tmp_path / "store", SET)
    with pytest.raises(StoreError, match="no computed runs"):
        store.dataset()


def test_dataset_of_a_store_with_runs_but_nothing_computed(tmp_path, runs):
    """Runs registered, compute not yet run (or killed before its first step): a clean StoreError or an empty
    Dataset, not a numpy error."""
    store = opd_lens.open_store(tmp_path / "store", SET)
    store.add_run("sft", runs["sft"].run_dir, origin=runs["sft"].origin)
    try:
        ds = store.dataset()
    except StoreError:
        return
    assert ds.sizes["step"] == 0
    assert list(ds.run.values) == ["sft"]


def test_changed_origin_is_refused(tmp_path):
    origin, run_dir = write_planted_run(tmp_path / "r", config=qwen3_config(hidden=32, intermediate=48), steps=(1, 2))
    store = opd_lens.open_store(tmp_path / "store", SET)
    store.add_run("r", run_dir, origin=origin)
    o = open_checkpoint(origin)
    tensors = {n: o.read(n) * 2 for n in o.tensors}
    save_checkpoint(origin, tensors, config=o.config)
    with pytest.raises(StoreError, match="origin .*changed"):
        store.compute(progress=False)


# --- the writer lock -------------------------------------------------------------------------------------------------


def test_second_writer_gets_store_locked_error_naming_the_holder(computed, runs, lock_holder):
    store, _, before = computed
    lock = store.path / ".lock"
    proc = lock_holder
    try:
        proc.stdin.write(f"{store.path}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "locked"
        assert lock.is_file()
        assert json.loads(lock.read_text())["pid"] == proc.pid
        with pytest.raises(StoreLockedError, match=rf"PID {proc.pid}\b") as e:
            store.compute(progress=False)
        assert isinstance(e.value, OpdLensError)
        assert str(lock) in str(e.value)
        with pytest.raises(StoreLockedError, match=rf"PID {proc.pid}\b"):
            opd_lens.open_store(store.path).add_run("new", runs["sft"].run_dir, origin=runs["sft"].origin)
        xr.testing.assert_identical(store.dataset(), before)  # readers need no lock
        assert lock.is_file()  # the failed writer did not remove the holder's lock
        assert "new" not in store.runs
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert not lock.exists()
    assert store.compute(progress=False).matrices_read == 0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_writer_is_recovered(computed):
    store, _, _ = computed
    lock = store.path / ".lock"
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": since}))
    report = store.compute(progress=False)
    assert report.matrices_read == 0
    assert not lock.exists()


def test_unreadable_old_lock_is_recovered(computed):
    store, _, _ = computed
    lock = store.path / ".lock"
    lock.write_text("{garbage")
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert store.compute(progress=False).matrices_read == 0
    assert not lock.exists()


def test_lock_held_on_another_host_is_respected(computed):
    store, _, _ = computed
    lock = store.path / ".lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "since": "2020-01-01 00:00:00"}))
    try:
        with pytest.raises(StoreLockedError, match="PID 1 on elsewhere.example"):
            store.compute(progress=False)
    finally:
        lock.unlink()


# --- an interrupted resize -------------------------------------------------------------------------------------------


def _step_sizes(path: Path) -> set[int]:
    group = zarr.open_group(path / "data.zarr", mode="r")
    sizes = set()
    for _, arr in group.arrays():
        dims = arr.metadata.dimension_names or ()
        if "step" in dims:
            sizes.add(arr.shape[dims.index("step")])
    return sizes


def _interrupt_grow(store, target: int, resized=()) -> Path:
    """Leave the store as a writer killed while growing the step dimension to ``target``: the intent file written,
    the arrays ``resized`` already grown, the others not."""
    marker = store.path / ".grow.json"
    marker.write_text(json.dumps({"step": target}))
    group = zarr.open_group(store.path / "data.zarr", mode="r+")
    for name in resized:
        arr = group[name]
        dims = arr.metadata.dimension_names
        arr.resize(tuple(target if d == "step" else n for d, n in zip(dims, arr.shape, strict=True)))
    return marker


def test_interrupted_grow_is_repaired_by_the_next_writer(tmp_path, runs):
    store, _ = new_store(tmp_path / "store", runs, ["opd"])
    before = store.dataset()
    (old,) = _step_sizes(store.path)

    # killed after writing the intent, before resizing anything
    marker = _interrupt_grow(store, old + 32)
    report = store.compute(progress=False)
    assert report.matrices_read == 0
    assert not marker.exists()
    assert _step_sizes(store.path) == {old + 32}

    # killed after resizing some of the arrays: readers get a clear error until a writer repairs the store
    marker = _interrupt_grow(store, old + 96, ("step", "complete", "unchanged_frac", "angles_u"))
    assert _step_sizes(store.path) == {old + 32, old + 96}
    with pytest.raises(StoreError, match="interrupted"):
        store.dataset()
    report = store.compute(progress=False)
    assert report.matrices_read == 0
    assert not marker.exists()
    assert _step_sizes(store.path) == {old + 96}
    xr.testing.assert_identical(opd_lens.open_store(store.path).dataset(), before)


def test_no_warnings_on_a_clean_compute(computed):
    assert _CLEAN_COMPUTE_WARNINGS == []


def test_endpoint_all_later_adds_angles_to_stored_steps(tmp_path, runs):
    store, _ = new_store(tmp_path / "store", runs, ["sft"])
    assert {step for step, entry in store.recorded("sft").items() if entry["endpoint"]} == {100}
    report = store.compute(progress=False, endpoint="all")
    assert [step for _, step in report.steps] == [25, 50, 75]  # only the steps that lacked angles
    ds = store.dataset()
    assert bool(ds.max_angle_v.sel(run="sft").notnull().all())
    again = store.compute(progress=False, endpoint="all")
    assert (again.steps, again.matrices_read) == ([], 0)


def test_alignment_grid_equals_sim_k_per_matrix_in_any_batching(tmp_path, monkeypatch):
    """Sim_K of every step's bases to an anchor, batched per shape across steps, equals the float64 numpy oracle
    matrix by matrix, whatever the batch size; a matrix missing from a step, or of another K, stays NaN."""
    import opd_lens.cache as cache_module
    from opd_lens.cache import LockBases

    gen = torch.Generator().manual_seed(3)

    def basis(n: int, k: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q.to(torch.float32)

    layers, modules = {0: 0, 1: 1}, {"q": 0, "down": 1}
    shapes = {"q": (24, 4), "down": (40, 4)}
    bases = LockBases(tmp_path)
    steps = [1, 2, 3, 5, 8]
    for step in steps:
        held = {f"{layer}|{m}": basis(*shape) for layer in layers for m, shape in shapes.items()}
        if step == 3:
            del held["1|q"]  # not in this step
            held["0|down"] = basis(40, 2)  # another K: no Sim_K to the anchor's
        bases.save(step, held)
    anchor = {f"{layer}|{m}": basis(*shape) for layer in layers for m, shape in shapes.items()}

    expected = np.full((len(steps), 2, 2), np.nan)
    for i, step in enumerate(steps):
        for key, v in bases.load(step).items():
            layer, m = key.split("|")
            if v.shape == anchor[key].shape:
                cos = v.double().numpy().T @ anchor[key].double().numpy()
                expected[i, layers[int(layer)], modules[m]] = (cos**2).sum() / v.shape[1]
    for batch_bytes in (1, 24 * 4 * 4 * 2, 2**24):  # one basis per call, two, everything at once
        monkeypatch.setattr(cache_module, "SIM_BATCH_BYTES", batch_bytes)
        got = bases.alignment_grid(steps, anchor, layers, modules)
        assert got.shape == (5, 2, 2) and got.dtype == np.float32
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.isnan(got[2, 1, 0]) and np.isnan(got[2, 0, 1]) and not np.isnan(got[2, 0, 0])


def test_a_store_of_real_study_shape_filled_directly_opens_summarizes_and_feeds_the_explorer(tmp_path):
    """A tenth of the steps of ``bench/bigstore.py``'s 6 × 300 × 36 × 7 store (that one's timings are in the docs)."""
    from opd_lens.testing import fill_store
    from opd_lens.widgets import Explorer

    store = fill_store(tmp_path / "s", runs=6, steps=30, layers=36)
    ds = store.dataset()
    assert dict(ds.stable_rank.sizes) == {"run": 6, "step": 30, "layer": 36, "module": 7}
    assert ds.stable_rank.notnull().all() and ds.lock_alignment.notnull().all()  # every lock_ref is the last step
    assert ds.max_angle_u.sel(step=3000).notnull().all() and ds.max_angle_u.sel(step=2900).isnull().all()
    table = opd_lens.summarize(ds)
    assert list(table.index) == [f"run-{i}" for i in range(6)] and (table.steps == 30).all()
    assert (table.last_step == 3000).all()
    data = Explorer(store)._data
    assert data["steps"] == list(range(100, 3001, 100)) and len(data["runs"]) == 6
