"""Matrices too small for a setting: the values it governs are NaN (not 0 or 1 by construction), each rule is
checked against a numpy oracle of the construction it avoids, and a relative ``angle_k`` scales k per matrix."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import opd_lens
from opd_lens.diagnostics import (
    Settings,
    angle_sides,
    channel_applies,
    channel_energy,
    matrix_diagnostics,
    principal_angles,
    principal_mask,
    principal_mask_applies,
    subspace_k,
)
from opd_lens.testing import qwen3_config, write_planted_run


def pair(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    return w0, w0 + 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)


# --- the rules -----------------------------------------------------------------------------------------------


def test_subspace_k_counts_and_fractions():
    assert subspace_k(512, 384, 1536) == 384  # a count is capped at the smaller side
    assert subspace_k(16, 384, 1536) == 16
    assert subspace_k(1 / 8, 4096, 4096) == 512  # the paper's 512 of 4096
    assert subspace_k(1 / 8, 384, 1536) == 48
    assert subspace_k(1 / 8, 4, 100) == 1  # at least 1
    assert subspace_k(0.3, 10, 10) == 3
    for bad in (0, -1, 0.0, 1.0, 1.5, True, "8", None, math.nan):
        with pytest.raises(ValueError, match="k must be an integer >= 1 or a fraction in"):
            subspace_k(bad, 8, 8)
    with pytest.raises(ValueError, match="angle_k"):
        Settings(angle_k=2.0)
    with pytest.raises(ValueError, match="lock_k must be an integer"):
        Settings(lock_k=0.5)


def test_the_angles_of_a_side_of_dimension_k_are_zero_by_construction_and_reported_as_nan():
    """numpy: with k = the side's dimension the two bases span the whole space, every angle is 0 (to rounding)."""
    w0, wt = pair(40, 12)
    u0, _, vh0 = np.linalg.svd(w0.numpy())
    ut, _, vht = np.linalg.svd(wt.numpy())
    cos_v = np.linalg.svd(vh0[:12] @ vht[:12].T, compute_uv=False)
    assert np.allclose(cos_v, 1.0, atol=1e-12)  # what the library would otherwise report as "0.0°"
    au, av = principal_angles(w0, wt, k=512)
    assert av.shape == (12,) and bool(av.isnan().all())
    cos_u = np.linalg.svd(u0[:, :12].T @ ut[:, :12], compute_uv=False)
    np.testing.assert_allclose(np.sort(np.cos(np.deg2rad(au.numpy()))), np.sort(cos_u), atol=1e-12)  # U: a measurement
    d = matrix_diagnostics(w0, wt, Settings(angle_k=512, mask_rank=4, exact=True))
    assert math.isnan(d.max_angle_v) and d.max_angle_u == pytest.approx(float(au.max()), rel=1e-10)


def test_a_relative_angle_k_measures_every_side_and_matches_the_oracle():
    w0, wt = pair(96, 48, seed=1)
    au, av = principal_angles(w0, wt, k=1 / 8)  # k = 6 of min(m, n) = 48
    u0, _, vh0 = np.linalg.svd(w0.numpy())
    ut, _, vht = np.linalg.svd(wt.numpy())
    for got, a, b in ((au, u0[:, :6], ut[:, :6]), (av, vh0[:6].T, vht[:6].T)):
        cos = np.clip(np.linalg.svd(a.T @ b, compute_uv=False), -1, 1)
        np.testing.assert_allclose(np.sort(got.numpy()), np.sort(np.rad2deg(np.arccos(cos))), atol=1e-6)
        assert float(got.max()) > 0.1  # a measurement, not a construction
    d = matrix_diagnostics(w0, wt, Settings(angle_k=1 / 8, mask_rank=4, exact=True))
    assert d.angles_u.shape == d.angles_v.shape == (6,)
    assert d.max_angle_v == pytest.approx(float(av.max()), rel=1e-8)


def test_a_full_rank_principal_mask_is_the_magnitude_mask():
    """numpy: W_0^(r) = W_0 when r ≥ min(m, n), so M_princ ranks |W_0| itself and is not about principal directions."""
    w0, wt = pair(30, 8, seed=2)
    top = np.abs(w0.numpy()).ravel()
    magnitude = np.zeros(top.size, bool)
    magnitude[np.argsort(-top, kind="stable")[: math.ceil(0.5 * top.size)]] = True
    assert np.array_equal(principal_mask(w0, rank=8).numpy().ravel(), magnitude)
    assert not principal_mask_applies((30, 8), 8) and principal_mask_applies((30, 8), 7)
    assert math.isnan(matrix_diagnostics(w0, wt, Settings(angle_k=4, mask_rank=8)).principal_overlap)
    assert 0 < matrix_diagnostics(w0, wt, Settings(angle_k=4, mask_rank=7)).principal_overlap < 1


def test_a_channel_as_wide_as_the_matrix_holds_all_of_the_update():
    """numpy: K ≥ min(m, n) gives channel energy 1 and V_K the whole row space: nothing to measure."""
    w0, wt = pair(30, 8, seed=3)
    s = np.linalg.svd((wt - w0).numpy(), compute_uv=False)
    assert float(channel_energy(torch.from_numpy(s), np.linalg.norm(s), k=8)) == pytest.approx(1.0, abs=1e-12)
    d = matrix_diagnostics(w0, wt, Settings(angle_k=4, mask_rank=4, lock_k=8))
    assert math.isnan(d.channel_energy) and bool(d.lock_basis.isnan().all())
    assert opd_lens.diagnostics.sim_k(d.lock_basis, d.lock_basis).isnan()  # so lock_alignment is NaN too
    d = matrix_diagnostics(w0, wt, Settings(angle_k=4, mask_rank=4, lock_k=7))
    assert 0 < d.channel_energy < 1 and bool(d.lock_basis.isfinite().all())


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 20),
    st.integers(2, 20),
    st.one_of(st.integers(1, 24), st.floats(0.01, 0.99)),
    st.integers(1, 24),
    st.integers(1, 24),
)
def test_nan_exactly_where_a_matrix_is_too_small(m, n, angle_k, mask_rank, lock_k):
    w0, wt = pair(m, n, seed=m * 31 + n)
    d = matrix_diagnostics(w0, wt, Settings(angle_k=angle_k, mask_rank=mask_rank, lock_k=lock_k, hill_k=2))
    k = subspace_k(angle_k, m, n)
    left, right = angle_sides(m, n, angle_k)
    assert (left, right) == (k < m, k < n)
    assert math.isnan(d.max_angle_u) != left and math.isnan(d.max_angle_v) != right
    assert math.isnan(d.principal_overlap) == (mask_rank >= min(m, n))
    assert math.isnan(d.channel_energy) == (lock_k >= min(m, n)) == (not channel_applies((m, n), lock_k))


# --- through the store and the CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Qwen3 (hidden 64): q/o 64×64, k/v 32×64, gate/up 160×64, down 64×160, two layers."""
    return write_planted_run(tmp_path_factory.mktemp("small"), config=qwen3_config(), steps=(5, 10))


def test_add_run_warns_once_with_the_counts_and_the_store_says_why(run, tmp_path):
    origin, run_dir = run
    store = opd_lens.open_store(tmp_path / "s", Settings(angle_k=32, mask_rank=32, lock_k=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.add_run("sft", run_dir, origin)
        store.add_run("sft", run_dir, origin)  # the same run again: no second warning
    said = [str(w.message) for w in caught if issubclass(w.category, opd_lens.SettingsWarning)]
    assert len(said) == 1, said
    assert "4 of 14 for angle_k=32" in said[0]  # k/v: 32 rows
    assert "4 of 14 for mask_rank=32" in said[0] and "4 of 14 for lock_k=32" in said[0]
    store.compute(progress=False, endpoint="all")
    ds = store.dataset()
    kv = ds.module.isin(["self_attn.k_proj", "self_attn.v_proj"])
    for name in ("max_angle_u", "principal_overlap", "channel_energy", "lock_alignment"):
        assert bool(ds[name].where(kv).isnull().all()), name
        assert bool(ds[name].where(~kv, 0).notnull().all()), name  # every other matrix measured
        assert "NaN where" in ds[name].attrs["comment"]
    assert bool(ds.angles_u.where(kv).isnull().all()) and bool(ds.max_angle_v.notnull().all())


def test_cli_takes_a_relative_angle_k_and_refuses_a_bad_one(run, tmp_path):
    origin, run_dir = run

    def cli(store, *args):
        cmd = [sys.executable, "-m", "opd_lens.cli", "compute", str(run_dir), "--origin", str(origin), "--name"]
        return subprocess.run(
            [*cmd, "sft", "--store", str(tmp_path / store), "--quiet", *args], capture_output=True, text=True
        )

    res = cli("r", "--angle-k", "1/8", "--mask-rank", "16")
    assert res.returncode == 0, res.stderr
    assert "too small" not in res.stderr, res.stderr
    ds = opd_lens.open_store(tmp_path / "r", create=False).dataset()
    assert ds.attrs["angle_k"] == 0.125
    last = ds.sel(step=10)
    assert bool(last.max_angle_u.notnull().all()) and bool(last.max_angle_v.notnull().all())
    assert ds.sizes["angle_index"] == 8  # k = 64/8 for every matrix with a side of 64, 32/8 = 4 for k/v
    k_proj = last.angles_u.sel(layer=0, module="self_attn.k_proj").values
    assert np.isfinite(k_proj).sum() == 4
    default = cli("d")
    assert default.returncode == 0 and "for angle_k=512 on one side or both (principal angles)" in default.stderr
    assert "14 of 14 for angle_k=512" in default.stderr and "14 of 14 for mask_rank=64" in default.stderr
    assert default.stderr.count("\n") == 1, default.stderr  # one warning line
    for bad in ("0", "1.5", "x", "1/0"):
        res = cli("b", "--angle-k", bad)
        assert res.returncode == 2 and "Traceback" not in res.stderr and "--angle-k" in res.stderr, res.stderr
        assert not (tmp_path / "b").exists()
