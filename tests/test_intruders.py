"""Intruder dimensions (Shuttleworth et al. 2024) against a numpy oracle and on planted cases."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_lens.diagnostics import INTRUDER_EPS, INTRUDER_K, intruder_dimensions, svd64


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
