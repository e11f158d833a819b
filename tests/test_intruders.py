"""Intruder dimensions (Shuttleworth et al. 2024) against a numpy oracle and on planted cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import opd_lens
from opd_lens.diagnostics import (
    INTRUDER_EPS,
    INTRUDER_K,
    Settings,
    intruder_count,
    intruder_dimensions,
    lora_diagnostics,
    matrix_diagnostics,
    svd64,
)
from opd_lens.schema import SCHEMA_VERSION
from opd_lens.testing import qwen3_config, write_planted_run


def thin_u(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.linalg.svd(w, full_matrices=False)[0])


def oracle(w0: np.ndarray, wt: np.ndarray, k: int, eps: float) -> tuple[int, np.ndarray]:
    """The definition, written out: for each of W_t's top-k left singular vectors, the largest |cos| with any of
    W_0's (thin SVD), one pair at a time."""
    u0 = np.linalg.svd(w0, full_matrices=False)[0]
    ut = np.linalg.svd(wt, full_matrices=False)[0]
    sims = np.array([max(abs(float(ut[:, i] @ u0[:, j])) for j in range(u0.shape[1])) for i in range(k)])
    return int((sims < eps).sum()), sims


def test_defaults_follow_the_authors():
    assert (INTRUDER_K, INTRUDER_EPS) == (10, 0.5)


@settings(max_examples=30, deadline=None)
@given(st.integers(12, 40), st.integers(12, 40), st.integers(0, 2**16), st.sampled_from([0.3, 0.5, 0.9]))
def test_matches_the_numpy_oracle(m, n, seed, eps):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(m, n))
    wt = w0 + rng.normal(size=(m, n)) * rng.choice([0.01, 0.5])
    count, sims = intruder_dimensions(thin_u(w0), thin_u(wt), k=10, eps=eps)
    want_count, want = oracle(w0, wt, 10, eps)
    np.testing.assert_allclose(sims.numpy(), want, atol=1e-12)
    assert int(count) == want_count


def test_a_new_high_sigma_direction_is_an_intruder_and_a_small_update_none():
    """W_t = W_0 + σ x yᵀ with σ above σ_1(W_0) and x random: W_t's top left vector is ≈ x, which lies along no
    single singular direction of W_0 (its largest |cos| with a basis of R^256 is ~ √(2 ln m / m) ≈ 0.2)."""
    rng = np.random.default_rng(0)
    m, n = 256, 384
    w0 = rng.normal(size=(m, n)) / np.sqrt(n)
    x = rng.normal(size=m)
    x /= np.linalg.norm(x)
    y = rng.normal(size=n)
    y /= np.linalg.norm(y)
    s1 = float(svd64(torch.from_numpy(w0)).s[0])
    intruded = w0 + 3 * s1 * np.outer(x, y)
    count, sims = intruder_dimensions(thin_u(w0), thin_u(intruded))
    assert int(count) == 1 and float(sims[0]) < 0.3 and bool((sims[1:] >= INTRUDER_EPS).all())
    nudged = w0 + 1e-3 * rng.normal(size=(m, n)) / np.sqrt(n)  # a full-fine-tuning-like small dense update
    count, sims = intruder_dimensions(thin_u(w0), thin_u(nudged))
    assert int(count) == 0 and float(sims.min()) > 0.9
    same, sims = intruder_dimensions(thin_u(w0), thin_u(w0))
    assert int(same) == 0 and np.allclose(sims.numpy(), 1.0, atol=1e-10)  # each vector against itself


def unused():
    raise AssertionError("W_0's top vectors decide every count here; the full basis must not be computed")


@settings(max_examples=40, deadline=None)
@given(
    st.integers(12, 40),
    st.integers(12, 40),
    st.integers(0, 2**16),
    st.sampled_from([0.3, 0.5, 0.9]),
    st.floats(0.0, 1.0),
    st.sampled_from([0.01, 0.3, 3.0]),
)
def test_the_count_from_top_vectors_is_the_definitions(m, n, seed, eps, share, scale):
    """Whatever share of W_0's vectors is cached, the bounded count equals the oracle's, whether the bounds decide
    alone or the full basis is needed."""
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(m, n))
    wt = w0 + rng.normal(size=(m, n)) * scale
    u0 = thin_u(w0)
    top = u0[:, : round(share * u0.shape[1])]
    assert intruder_count(thin_u(wt), top, lambda: u0, eps=eps) == oracle(w0, wt, 10, eps)[0]


def test_a_small_update_is_decided_by_the_cached_top_vectors_and_a_new_direction_by_the_whole_basis():
    rng = np.random.default_rng(1)
    m, n = 256, 384
    w0 = rng.normal(size=(m, n)) / np.sqrt(n)
    u0 = thin_u(w0)
    nudged = w0 + 1e-3 * rng.normal(size=(m, n)) / np.sqrt(n)
    assert intruder_count(thin_u(nudged), u0[:, :32], unused) == 0
    x, y = rng.normal(size=m), rng.normal(size=n)
    intruded = w0 + 3 * float(svd64(torch.from_numpy(w0)).s[0]) * np.outer(x / np.linalg.norm(x), y / np.linalg.norm(y))
    calls = []
    assert intruder_count(thin_u(intruded), u0[:, :32], lambda: calls.append(1) or u0) == 1 and calls == [1]


@pytest.mark.parametrize("shape", [(48, 40), (40, 48), (96, 24)])
def test_the_endpoint_metric_is_the_definition_on_dense_and_lora_updates(shape):
    """matrix_diagnostics and lora_diagnostics store the oracle's count, on both sides of angle_k and for tall and
    wide matrices (a tall W_0's cached U comes from W V Σ⁻¹)."""
    m, n = shape
    g = torch.Generator().manual_seed(m + n)
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    left, right = (
        torch.randn(m, 3, generator=g, dtype=torch.float64),
        torch.randn(3, n, generator=g, dtype=torch.float64),
    )
    wt = w0 + 2 * left @ right
    want = oracle(w0.numpy(), wt.numpy(), 10, 0.5)[0]
    assert want > 0  # the update's three strong directions lie along none of W_0's
    for angle_k in (4, 30, 64, 1 / 8):  # the left side kept whole, cut, or left out
        for exact in (True, False):
            s = Settings(angle_k=angle_k, exact=exact)
            assert matrix_diagnostics(w0, wt, s).intruder_dimensions == want, (angle_k, exact)
            assert lora_diagnostics(w0, 2 * left, right, s).intruder_dimensions == want, (angle_k, exact)
    assert np.isnan(matrix_diagnostics(w0, wt, Settings(), endpoint=False).intruder_dimensions)


def test_stored_at_endpoint_steps_counting_the_planted_directions(tmp_path):
    """A rank-2 update far above W_0's spectrum puts two new directions at the top of every matrix: at least 2
    intruders each (the oracle's count, read from the checkpoint files), none for a small update, NaN at steps
    without endpoint metrics."""
    config = qwen3_config(layers=1, hidden=128, intermediate=256, heads=4, kv_heads=2)
    origin, run = write_planted_run(
        tmp_path / "big", config=config, steps=(10, 20), rank=2, scale=8.0, spectrum="planted"
    )
    ds = opd_lens.compute(tmp_path / "s", run, origin=origin, name="big", progress=False, endpoint="all")
    got = ds.intruder_dimensions.sel(run="big")
    assert got.attrs["long_name"] == "intruder dimensions among W_t's top 10"
    assert bool((got >= 2).all()), got.values
    w0 = load_file(origin / "model.safetensors")
    for step in (10, 20):
        wt = load_file(run / f"checkpoint-{step}" / "model.safetensors")
        for module in got.module.values:
            name = f"model.layers.0.{module}.weight"
            want = oracle(w0[name].double().numpy(), wt[name].double().numpy(), 10, 0.5)[0]
            assert float(got.sel(step=step, layer=0, module=module)) == want, (step, module)
    origin, run = write_planted_run(tmp_path / "small", config=config, steps=(10, 20), rank=2, scale=1e-3)
    store = opd_lens.open_store(tmp_path / "s")
    store.add_run("small", run, origin=origin)
    store.compute(progress=False)
    small = store.dataset().intruder_dimensions.sel(run="small")
    assert bool((small.sel(step=20) == 0).all()) and bool(small.sel(step=10).isnull().all())


def test_a_schema_3_store_recomputes_only_its_endpoint_steps(tmp_path):
    """Intruder dimensions are an endpoint metric: a store of the schema before them brings up the steps that hold
    endpoint metrics and leaves every other step as stored."""
    origin, run = write_planted_run(tmp_path / "r", steps=(10, 20, 30))
    opd_lens.compute(tmp_path / "s", run, origin=origin, name="r", progress=False)
    store = opd_lens.open_store(tmp_path / "s", create=False)
    store.record("r", {step: {**e, "schema": 3} for step, e in store.recorded("r").items()})
    before = store.dataset()
    report = store.compute(progress=False)
    n = before.sizes["layer"] * before.sizes["module"]
    assert report.matrices_read == 2 * n  # W_0 and the last checkpoint
    assert {s: e["schema"] for s, e in store.recorded("r").items()} == {10: 3, 20: 3, 30: SCHEMA_VERSION}
    after = store.dataset()
    for name in ("stable_rank", "unchanged_frac", "intruder_dimensions", "max_angle_v"):
        np.testing.assert_array_equal(after[name].values, before[name].values, err_msg=name)
