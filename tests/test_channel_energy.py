"""channel_energy, Σ_{i≤K} σ_i² / ‖ΔW‖_F², against a numpy float64 oracle: the formula, planted ranks, the fast
path (block Krylov: within 0.01 absolute of the exact path, as Sim_K) and the LoRA path, and the stored values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import opd_lens
from opd_lens.checkpoints import find_checkpoints, matched_matrices, open_checkpoint
from opd_lens.diagnostics import Settings, channel_energy, lora_diagnostics, matrix_diagnostics
from opd_lens.testing import qwen3_config, write_planted_run

FAST_ATOL = 0.01  # the fast path's tolerance, absolute (its top-16 singular values agree to 0.5% relative)


def oracle(dw: np.ndarray, k: int) -> float:
    s = np.linalg.svd(dw.astype(np.float64), compute_uv=False)
    return float((s[:k] ** 2).sum() / (dw.astype(np.float64) ** 2).sum())


def planted(m: int, n: int, rank: int, noise: float, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    low = g.standard_normal((m, rank)) @ g.standard_normal((rank, n)) / math.sqrt(rank)
    return low + noise * g.standard_normal((m, n))


@given(
    m=st.integers(2, 40),
    n=st.integers(2, 40),
    k=st.integers(1, 48),
    seed=st.integers(0, 2**16),
)
@hsettings(max_examples=60, deadline=None)
def test_formula_against_numpy(m, n, k, seed):
    dw = np.random.default_rng(seed).standard_normal((m, n))
    s = torch.linalg.svdvals(torch.from_numpy(dw))
    got = float(channel_energy(s, float(np.linalg.norm(dw)), k))
    assert got == pytest.approx(oracle(dw, k), rel=1e-12)
    assert 0.0 < got <= 1.0
    if k >= min(m, n):
        assert got == pytest.approx(1.0, abs=1e-12)  # the whole spectrum


def test_zero_update_is_nan_and_rank_at_most_k_is_one():
    assert math.isnan(float(channel_energy(torch.zeros(5, dtype=torch.float64), 0.0, 3)))
    dw = planted(96, 64, rank=3, noise=0.0, seed=1)
    s = torch.linalg.svdvals(torch.from_numpy(dw))
    assert float(channel_energy(s, float(np.linalg.norm(dw)), 3)) == pytest.approx(1.0, abs=1e-12)
    assert float(channel_energy(s, float(np.linalg.norm(dw)), 2)) < 0.9


@pytest.mark.parametrize(("noise", "shape"), [(0.0, (512, 384)), (0.05, (512, 384)), (0.3, (384, 640))])
def test_matrix_diagnostics_fast_and_exact_against_the_oracle(noise, shape):
    """A planted rank-8 channel plus Gaussian noise, K = 16, in bf16: the exact path equals the oracle, the fast
    path (which must have run: the matrices are above its size limit) is within FAST_ATOL."""
    g = torch.Generator().manual_seed(7)
    w0 = (torch.randn(*shape, generator=g, dtype=torch.float64) / shape[1] ** 0.5).to(torch.bfloat16)
    update = torch.from_numpy(planted(*shape, rank=8, noise=noise, seed=3)) * 0.02 / shape[1] ** 0.5
    wt = (w0.double() + update).to(torch.bfloat16)
    dw = (wt.double() - w0.double()).numpy()
    want = oracle(dw, 16)
    exact = matrix_diagnostics(w0, wt, Settings(angle_k=16, mask_rank=8, exact=True), endpoint=False)
    fast = matrix_diagnostics(w0, wt, Settings(angle_k=16, mask_rank=8), endpoint=False)
    assert exact.channel_energy == pytest.approx(want, rel=1e-9)
    assert abs(fast.channel_energy - want) <= FAST_ATOL
    assert fast.channel_energy <= 1.0


def test_lora_of_rank_below_k_lives_in_its_channel():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(80, 48, generator=g, dtype=torch.float64)
    left, right = torch.randn(80, 4, generator=g) * 0.1, torch.randn(4, 48, generator=g) * 0.1
    d = lora_diagnostics(w0, left, right, Settings(angle_k=8, mask_rank=4, lock_k=16), endpoint=False)
    assert d.channel_energy == pytest.approx(1.0, abs=1e-12)
    d2 = lora_diagnostics(w0, left, right, Settings(angle_k=8, mask_rank=4, lock_k=2), endpoint=False)
    assert d2.channel_energy == pytest.approx(oracle((left.double() @ right.double()).numpy(), 2), rel=1e-9)


def test_stored_values_against_the_oracle(tmp_path):
    config = qwen3_config(layers=1, hidden=32, intermediate=64, heads=4, kv_heads=2)
    origin, run = write_planted_run(tmp_path / "r", config=config, steps=(10, 20), rank=2, spectrum="planted")
    store = opd_lens.open_store(tmp_path / "store", Settings(angle_k=8, mask_rank=4, lock_k=4))
    store.add_run("sft", run, origin)
    store.compute(progress=False)
    ds = store.dataset()
    assert ds.channel_energy.attrs["long_name"] == "share of ‖ΔW‖_F² in its top-K channel"
    o = open_checkpoint(origin)
    for c in find_checkpoints(run):
        for ref in matched_matrices(o, c):
            dw = c.read_matrix(ref).double().numpy() - o.read_matrix(ref).double().numpy()
            got = float(ds.channel_energy.sel(run="sft", step=c.step, layer=ref.layer, module=ref.module))
            assert got == pytest.approx(oracle(dw, 4), rel=1e-5), (c.step, ref.module)
