"""update_spectrum: the top singular values of ΔW_t behind stable rank, Hill α and V_K, against numpy's float64
SVD, on planted spectra, on the fast path (within 1% of σ_1), for LoRA updates, and as stored in a store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import opd_lens
from opd_lens.diagnostics import Settings, lora_diagnostics, matrix_diagnostics, nonfinite_diagnostics
from opd_lens.testing import qwen3_config, write_planted_run

EXACT = Settings(angle_k=4, mask_rank=4, exact=True)
FAST = Settings(angle_k=4, mask_rank=4)
FAST_RTOL = 1e-2
"""The fast path's top singular values agree with the exact SVD within 1% of σ_1 (its Ritz residuals stop at 2e-3)."""


def planted(m: int, n: int, s: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_0 and W_t = W_0 + U diag(s) Vᵀ with random orthonormal U, V: ΔW has exactly the singular values s."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(m, len(s))))[0]
    v = np.linalg.qr(rng.normal(size=(n, len(s))))[0]
    w0 = rng.normal(size=(m, n))
    return torch.from_numpy(w0), torch.from_numpy(w0 + (u * s) @ v.T)


def test_a_planted_spectrum_comes_back():
    s = np.array([3.0, 2.0, 1.5, 1.0, 0.5])
    w0, wt = planted(300, 200, s, seed=0)
    for config, atol in ((EXACT, 1e-10), (FAST, FAST_RTOL * s[0])):
        got = matrix_diagnostics(w0, wt, config, endpoint=False).update_spectrum.numpy()
        assert got.shape == (16,)  # max(lock_k, hill_k)
        np.testing.assert_allclose(got[:5], s, atol=atol)
        np.testing.assert_allclose(got[5:], 0, atol=max(atol, 1e-10))  # rank 5: nothing beyond


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 60), st.integers(2, 60), st.integers(0, 2**16), st.integers(2, 20))
def test_exact_spectrum_is_numpys(m, n, seed, lock_k):
    rng = np.random.default_rng(seed)
    w0 = torch.from_numpy(rng.normal(size=(m, n)))
    wt = w0 + 0.1 * torch.from_numpy(rng.normal(size=(m, n)))
    config = Settings(angle_k=1, mask_rank=1, lock_k=lock_k, hill_k=2, exact=True)
    got = matrix_diagnostics(w0, wt, config, endpoint=False).update_spectrum.numpy()
    want = np.linalg.svd((wt - w0).numpy(), compute_uv=False)[: config.top_k]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(512, 384), (384, 1536)])
def test_fast_path_within_its_tolerance_of_the_exact_one(shape):
    """A slowly decaying (power-law) spectrum, the hard case for a Krylov method."""
    m, n = shape
    s = np.arange(1, min(m, n) + 1) ** -0.6
    w0, wt = planted(m, n, s, seed=1)
    exact = matrix_diagnostics(w0, wt, EXACT, endpoint=False).update_spectrum
    fast = matrix_diagnostics(w0.float(), wt.float(), FAST, endpoint=False).update_spectrum
    np.testing.assert_allclose(exact.numpy(), s[:16], rtol=1e-10)
    np.testing.assert_allclose(fast.numpy(), exact.numpy(), atol=FAST_RTOL * float(exact[0]))


def test_lora_equals_dense_and_nonfinite_is_empty():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(40, 30, generator=g, dtype=torch.float64)
    left, right = (
        torch.randn(40, 3, generator=g, dtype=torch.float64),
        torch.randn(3, 30, generator=g, dtype=torch.float64),
    )
    lora = lora_diagnostics(w0, left, right, EXACT, endpoint=False).update_spectrum
    dense = matrix_diagnostics(w0, w0 + left @ right, EXACT, endpoint=False).update_spectrum
    np.testing.assert_allclose(lora.numpy(), dense.numpy(), atol=1e-10)
    bad = w0.clone()
    bad[0, 0] = float("nan")
    assert nonfinite_diagnostics(w0, bad, EXACT, None).update_spectrum.numel() == 0


def test_stored_per_step_and_nan_padded(tmp_path):
    """k/v of a hidden-32 Qwen3 with one kv head are 8 × 32: 8 singular values of 16, NaN beyond."""
    config = qwen3_config(layers=1, hidden=32, intermediate=48, kv_heads=1)
    origin, run = write_planted_run(tmp_path / "r", config=config, steps=(5, 10), rank=3, spectrum="planted")
    ds = opd_lens.compute(tmp_path / "s", run, origin=origin, name="r", settings=FAST, progress=False)
    spectrum = ds.update_spectrum
    assert spectrum.dims == ("run", "step", "layer", "module", "rank_index") and spectrum.sizes["rank_index"] == 16
    assert spectrum.attrs["long_name"] == "top singular values of ΔW"
    k_proj = spectrum.sel(run="r", step=10, layer=0, module="self_attn.k_proj").values
    assert np.isfinite(k_proj[:8]).all() and np.isnan(k_proj[8:]).all()
    q = spectrum.sel(run="r", layer=0, module="self_attn.q_proj")
    # the planted rank-3 part grows ∝ t (the tail beyond it is bf16 rounding, which does not)
    np.testing.assert_allclose(q.sel(step=5).values[:3], q.sel(step=10).values[:3] / 2, rtol=2e-2)
    assert bool((q.diff("rank_index") <= 1e-6).all())  # descending
    # stable rank is ‖ΔW‖_F² / σ_1²: the stored σ_1 and ‖ΔW‖_F give it back
    last = ds.sel(run="r", step=10)
    np.testing.assert_allclose(
        last.stable_rank.values, (last.update_fro**2 / last.update_spectrum.isel(rank_index=0) ** 2).values, rtol=1e-4
    )
