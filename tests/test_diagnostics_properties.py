"""Property tests (hypothesis) of ``opd_lens.diagnostics``: ranges, symmetries and invariances.

Matrices are small (≤ 12×12) so that the whole file runs in a few seconds. Float tolerances are stated per test;
they are rounding-level because the random matrices used for subspace properties are built with well-separated
singular values (the singular subspaces are then well conditioned).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from opd_lens.diagnostics import (
    bits,
    hill_alpha,
    lowmag_mask,
    mask_overlap,
    principal_angles,
    principal_mask,
    sim_k,
    spectral_shift,
    stable_rank,
    svd64,
    unchanged_fraction,
    update_mask,
    update_pass,
)

FAST = settings(max_examples=60, deadline=None)
MORE = settings(max_examples=150, deadline=None)

seeds = st.integers(0, 2**32 - 1)
dims = st.integers(2, 12)
shapes = st.tuples(dims, dims)

# bf16 bit patterns worth hitting often: ±0, smallest/largest subnormal, smallest normal, 1, largest finite, ±inf,
# quiet and signalling NaNs with several payloads and signs
_SPECIAL_HEX = "0000 8000 0001 8001 007F 0080 3F80 3F81 7F7F FF7F 7F80 FF80 7FC0 FFC0 7F81 7FFF"
SPECIAL_BITS = [int(h, 16) - (0x10000 if int(h, 16) >= 0x8000 else 0) for h in _SPECIAL_HEX.split()]  # as int16
bit_elements = st.one_of(st.sampled_from(SPECIAL_BITS), st.integers(-(2**15), 2**15 - 1))


def orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def conditioned(shape, rng, spacing=1.0):
    """U diag(σ) Vᵀ with σ_i = spacing·(p − i) + 1 ± 0.2·spacing: every singular gap ≥ 0.6·spacing."""
    m, n = shape
    p = min(m, n)
    sig = spacing * (np.arange(p, 0, -1) + rng.uniform(-0.2, 0.2, p)) + 1.0
    u = orthogonal(m, rng)[:, :p]
    v = orthogonal(n, rng)[:, :p]
    return (u * sig) @ v.T


@st.composite
def bit_pairs(draw):
    """(w0, wt) int16 bit patterns: wt mixes copies, ±1..3-bit neighbours, sign flips and independent patterns."""
    shape = draw(st.tuples(st.integers(1, 8), st.integers(1, 8)))
    a = draw(hnp.arrays(np.int16, shape, elements=bit_elements))
    other = draw(hnp.arrays(np.int16, shape, elements=bit_elements))
    offset = draw(hnp.arrays(np.int16, shape, elements=st.integers(-3, 3)))
    mode = draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 3)))
    near = (a.astype(np.int32) + offset).astype(np.int16)  # wraps like the bit pattern does
    flipped = a ^ np.int16(-(2**15))
    b = np.select([mode == 0, mode == 1, mode == 2], [a, near, flipped], other).astype(np.int16)
    return a, b


def as_bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.copy()).view(torch.bfloat16)


def literal_eta_oracle(a: np.ndarray, b: np.ndarray, eta: float) -> np.ndarray:
    """Changed iff not |b − a| ≤ η·max(|a|, |b|), in float64 on the bf16 values; NaN / inf by support.py's rules."""
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.abs(b - a) <= eta * np.maximum(np.abs(a), np.abs(b))
        same = (a == b) | (np.isnan(a) & np.isnan(b))
    return ~np.where(np.isfinite(a) & np.isfinite(b), close, same)


# ----------------------------------------------------------------------------------------------------------------
# update support
# ----------------------------------------------------------------------------------------------------------------


@MORE
@given(bit_pairs())
def test_update_mask_on_bf16_bit_patterns_is_the_literal_eta_test(pair):
    a_bits, b_bits = pair
    a, b = as_bf16(a_bits), as_bf16(b_bits)
    av, bv = a.double().numpy(), b.double().numpy()
    expected = literal_eta_oracle(av, bv, 1e-3)
    np.testing.assert_array_equal(update_mask(a, b).numpy(), expected)
    np.testing.assert_array_equal(update_mask(a, b, eta=1e-3).numpy(), expected)
    # … and the literal test is bit equality up to ±0 and NaN payloads: the shortcut is exact
    both_zero = (av == 0) & (bv == 0)
    both_nan = np.isnan(av) & np.isnan(bv)
    np.testing.assert_array_equal(expected, ~((a_bits == b_bits) | both_zero | both_nan))


@MORE
@given(bit_pairs(), st.sampled_from([2.0**-8 * 0.999, 2.0**-8, 0.005, 0.01, 0.1, 0.5]))
def test_update_mask_general_branch_is_the_literal_eta_test(pair, eta):
    a, b = as_bf16(pair[0]), as_bf16(pair[1])
    expected = literal_eta_oracle(a.double().numpy(), b.double().numpy(), eta)
    np.testing.assert_array_equal(update_mask(a, b, eta).numpy(), expected)


@MORE
@given(bit_pairs(), st.sampled_from([torch.float32, torch.float64]))
def test_update_pass_on_bf16_bit_patterns_against_float64(pair, dtype):
    """One pass gives M_upd exactly, ΔW as the exact difference rounded once to ``dtype`` and ‖ΔW‖_F within 2⁻²⁴
    relative of the float64 norm of the exact difference (exactly it on the float64 route). The bit patterns
    include NaN, ±inf, ±0, subnormals and pairs whose float32 difference overflows or rounds."""
    a, b = as_bf16(pair[0]), as_bf16(pair[1])
    av, bv = a.double().numpy(), b.double().numpy()
    p = update_pass(a, b, dtype=dtype)
    np.testing.assert_array_equal(bits.unpack(p.changed, av.shape), update_mask(a, b).numpy())
    assert p.n_changed == int(update_mask(a, b).sum())
    with np.errstate(invalid="ignore", over="ignore"):
        exact = bv - av  # the difference rounded once to float64 (2⁻⁵³ relative)
        fro = float(np.sqrt(np.sum(exact * exact)))
    if not np.isfinite(exact).all():
        assert not math.isfinite(p.fro)
        return
    got = p.delta.double().numpy()
    if dtype == torch.float64:
        np.testing.assert_array_equal(got, exact)
        assert p.fro == pytest.approx(fro, rel=1e-15)
    else:
        finite = np.abs(exact) <= np.finfo(np.float32).max  # beyond it the float32 difference is ±inf
        np.testing.assert_allclose(got[finite], exact[finite], rtol=2.0**-24 + 2.0**-52, atol=0.0)
        assert np.array_equal(got[~finite], np.sign(exact[~finite]) * np.inf)
        assert p.fro == pytest.approx(fro, rel=2.0**-24 + 1e-14)


fp32_elements = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@FAST
@given(
    st.one_of(
        bit_pairs().map(lambda p: (as_bf16(p[0]), as_bf16(p[1]))),
        st.tuples(st.integers(1, 6), st.integers(1, 6))
        .flatmap(
            lambda s: st.tuples(
                hnp.arrays(np.float32, s, elements=fp32_elements), hnp.arrays(np.float32, s, elements=fp32_elements)
            )
        )
        .map(lambda p: (torch.from_numpy(p[0]), torch.from_numpy(p[1]))),
    ),
    st.sampled_from([1e-3, 0.01, 0.1]),
)
def test_unchanged_fraction_in_unit_interval_and_symmetric(pair, eta):
    w0, wt = pair
    f = float(unchanged_fraction(w0, wt, eta))
    assert 0.0 <= f <= 1.0
    assert f == float(unchanged_fraction(wt, w0, eta))
    assert torch.equal(update_mask(w0, wt, eta), update_mask(wt, w0, eta))
    assert torch.equal(update_mask(w0, wt, eta), update_mask(-w0, -wt, eta))  # sign-symmetric
    assert float(unchanged_fraction(w0, w0, eta)) == 1.0


# ----------------------------------------------------------------------------------------------------------------
# masks and overlaps
# ----------------------------------------------------------------------------------------------------------------


@FAST
@given(shapes, seeds, st.integers(1, 1000), st.integers(1, 16), st.floats(0.0, 1.0))
def test_masks_select_ceil_alpha_n_and_overlaps_in_unit_interval(shape, seed, alpha_permille, rank, density):
    rng = np.random.default_rng(seed)
    alpha = alpha_permille / 1000
    k = math.ceil(Fraction(alpha_permille, 1000) * shape[0] * shape[1])
    w0 = torch.from_numpy(rng.normal(size=shape)).to(torch.bfloat16)
    pm, lm = principal_mask(w0, rank, alpha), lowmag_mask(w0, alpha)
    assert int(pm.sum()) == k and int(lm.sum()) == k
    # bf16 magnitudes tie often: the k smallest, ties to the lowest row-major index (numpy stable lexsort)
    scores = w0.abs().double().numpy().ravel()
    expected = np.zeros(scores.size, dtype=bool)
    expected[np.lexsort((np.arange(scores.size), scores))[:k]] = True
    np.testing.assert_array_equal(lm.numpy().ravel(), expected)
    upd = torch.from_numpy(rng.random(shape) < density)
    for mask in (pm, lm):
        ov = float(mask_overlap(mask, upd))
        if upd.any():
            assert 0.0 <= ov <= 1.0
        else:
            assert math.isnan(ov)
    full = torch.ones(shape, dtype=torch.bool)
    assert float(mask_overlap(pm, full)) == k / (shape[0] * shape[1])


# ----------------------------------------------------------------------------------------------------------------
# principal angles
# ----------------------------------------------------------------------------------------------------------------

# Singular gaps ≥ 0.6, σ_1 ≤ 14 and perturbations ≤ 0.03·N(0,1) keep every singular subspace conditioned to
# ~eps·σ_1/gap ≈ 5e-15 rad; 1e-10 degrees is far above that and far below any angle that matters.
ANGLE_ATOL_DEG = 1e-10


@st.composite
def endpoint_pairs(draw):
    shape = draw(shapes)
    rng = np.random.default_rng(draw(seeds))
    eps = draw(st.sampled_from([1e-6, 1e-3, 3e-2]))
    w0 = conditioned(shape, rng)
    wt = w0 + eps * rng.normal(size=shape)
    k = draw(st.integers(1, 13))
    return w0, wt, k, rng


@FAST
@given(endpoint_pairs())
def test_angles_range_symmetry_and_orthogonal_invariance(case):
    w0, wt, k, rng = case
    m, n = w0.shape
    t0, tt = torch.from_numpy(w0), torch.from_numpy(wt)
    au, av = principal_angles(t0, tt, k)
    kk = min(k, m, n)
    assert au.shape == (kk,) and av.shape == (kk,)
    for a, side in ((au, m), (av, n)):
        if kk == side:  # the whole space on both sides: 0 by construction, recorded as NaN
            assert bool(a.isnan().all())
            continue
        assert bool(((a >= 0) & (a <= 90)).all())
        assert bool((a.diff() >= 0).all())
    # swapping W_0 and W_t: the same multiset (both are returned sorted)
    bu, bv = principal_angles(tt, t0, k)
    np.testing.assert_allclose(bu.numpy(), au.numpy(), rtol=0, atol=ANGLE_ATOL_DEG)
    np.testing.assert_allclose(bv.numpy(), av.numpy(), rtol=0, atol=ANGLE_ATOL_DEG)
    # W → Q W R for orthogonal Q (m×m), R (n×n) on both
    q, r = orthogonal(m, rng), orthogonal(n, rng)
    cu, cv = principal_angles(torch.from_numpy(q @ w0 @ r), torch.from_numpy(q @ wt @ r), k)
    np.testing.assert_allclose(cu.numpy(), au.numpy(), rtol=0, atol=ANGLE_ATOL_DEG)
    np.testing.assert_allclose(cv.numpy(), av.numpy(), rtol=0, atol=ANGLE_ATOL_DEG)


@FAST
@given(shapes, seeds, st.integers(1, 13))
def test_angles_in_range_for_unrelated_matrices(shape, seed, k):
    rng = np.random.default_rng(seed)
    w0 = torch.from_numpy(rng.normal(size=shape)).to(torch.bfloat16)
    wt = torch.from_numpy(rng.normal(size=shape)).to(torch.bfloat16)
    for a, side in zip(principal_angles(w0, wt, k), shape, strict=True):
        assert bool(a.isnan().all()) if min(k, *shape) == side else bool(((a >= 0) & (a <= 90)).all())


# ----------------------------------------------------------------------------------------------------------------
# Sim_K
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def basis_pairs(draw):
    n = draw(st.integers(1, 12))
    K = draw(st.integers(1, n))
    rng = np.random.default_rng(draw(seeds))
    va = np.linalg.qr(rng.normal(size=(n, K)))[0]
    mix = draw(st.sampled_from([0.0, 1e-3, 0.3, 3.0, math.inf]))
    vb = rng.normal(size=(n, K)) if mix == math.inf else va + mix * rng.normal(size=(n, K))
    vb = np.linalg.qr(vb)[0]
    return va, vb, orthogonal(K, rng)


@FAST
@given(basis_pairs())
def test_sim_k_range_symmetry_and_basis_invariance(case):
    va, vb, r = case
    a, b = torch.from_numpy(va), torch.from_numpy(vb)
    s = float(sim_k(a, b))
    # [0, 1] up to the rounding of a sum of K² squares of cosines (exactly 1 may come out as 1 + 1 ulp)
    assert 0.0 <= s <= 1.0 + 1e-12
    assert abs(float(sim_k(b, a)) - s) <= 1e-14
    assert abs(float(sim_k(a, torch.from_numpy(vb @ r))) - s) <= 1e-13
    assert abs(float(sim_k(torch.from_numpy(va @ r), b)) - s) <= 1e-13
    assert abs(float(sim_k(a, a)) - 1.0) <= 1e-13


# ----------------------------------------------------------------------------------------------------------------
# stable rank, spectral shift, Hill
# ----------------------------------------------------------------------------------------------------------------


@FAST
@given(shapes, seeds, st.floats(1e-3, 1e3), st.sampled_from(["gauss", "lowrank", "spiky"]))
def test_stable_rank_range_and_invariances(shape, seed, scale, kind):
    rng = np.random.default_rng(seed)
    m, n = shape
    if kind == "gauss":
        dw = rng.normal(size=shape)
    elif kind == "lowrank":
        dw = rng.normal(size=(m, 1)) @ rng.normal(size=(1, n)) + 1e-3 * rng.normal(size=shape)
    else:
        dw = rng.normal(size=shape) * np.exp(3 * rng.normal(size=shape))
    sr = float(stable_rank(svd64(torch.from_numpy(dw)).s))
    assert 1.0 <= sr <= min(m, n) * (1 + 1e-12)
    # Σσ² / σ_1² from SVDs of scaled / rotated copies: every σ carries ~eps·σ_1 error → 1e-12 relative
    sr_scaled = float(stable_rank(svd64(torch.from_numpy(scale * dw)).s))
    q, r = orthogonal(m, rng), orthogonal(n, rng)
    sr_rot = float(stable_rank(svd64(torch.from_numpy(q @ dw @ r)).s))
    assert math.isclose(sr_scaled, sr, rel_tol=1e-12)
    assert math.isclose(sr_rot, sr, rel_tol=1e-12)


@FAST
@given(shapes, seeds, st.sampled_from([0.0, 1e-6, 1e-3, 1.0]))
def test_spectral_shift_nonnegative_and_orthogonally_invariant(shape, seed, eps):
    rng = np.random.default_rng(seed)
    m, n = shape
    w0 = rng.normal(size=shape)
    wt = w0 + eps * rng.normal(size=shape)
    shift = float(spectral_shift(svd64(torch.from_numpy(w0)).s, svd64(torch.from_numpy(wt)).s))
    assert shift >= 0.0
    q, r = orthogonal(m, rng), orthogonal(n, rng)
    s0q = svd64(torch.from_numpy(q @ w0 @ r)).s
    stq = svd64(torch.from_numpy(q @ wt @ r)).s
    # the numerator moves by ≲ sqrt(p)·eps·σ_1 ≤ sqrt(p)·eps·‖σ_0‖ under the rotation: 1e-13 absolute suffices
    assert abs(float(spectral_shift(s0q, stq)) - shift) <= 1e-13


spectra = st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=30).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64)
)


@MORE
@given(spectra, st.integers(2, 32), st.integers(-20, 20), st.floats(1e-3, 1e3))
def test_hill_alpha_positive_and_scale_invariant(s, k, log2_scale, scale):
    a = float(hill_alpha(s, k))
    assert a > 0  # +inf when σ_1 = σ_k
    # a power-of-two scale is exact in binary: the same value bit for bit
    assert float(hill_alpha(s * 2.0**log2_scale, k)) == a
    # any other scale: the mean log-ratio 1/α moves by a few eps only (checked on 1/α, robust when σ_1 ≈ σ_k)
    assert abs(1.0 / float(hill_alpha(s * scale, k)) - 1.0 / a) <= 1e-14


@FAST
@given(shapes, seeds, st.integers(2, 12), st.floats(1e-3, 1e3))
def test_hill_alpha_on_matrix_spectra(shape, seed, k, scale):
    rng = np.random.default_rng(seed)
    dw = rng.normal(size=shape)
    a = float(hill_alpha(svd64(torch.from_numpy(dw)).s, k))
    assert a > 0
    b = float(hill_alpha(svd64(torch.from_numpy(scale * dw)).s, k))
    # σ_i/σ_k of a Gaussian matrix: log-ratios carry ~eps·σ_1/σ_k error; σ_k ≳ 1e-4·σ_1 for these sizes → 1e-10
    assert abs(1.0 / b - 1.0 / a) <= 1e-10
