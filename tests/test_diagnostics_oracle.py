"""Every diagnostic of ``opd_lens.diagnostics`` against an independent float64 oracle.

The expected values are built here with numpy / scipy only (``numpy.linalg.svd``, ``scipy.linalg.subspace_angles``
and plain formulas); no ``opd_lens`` function is used to build an expected value. Inputs are stored as bf16, fp16 and
fp32 torch tensors of tall, wide and square shapes.

Tolerances (relative unless stated):
* exact (``==``) for everything that is integer counting: update masks, unchanged fractions, mask overlaps;
* 1e-12 for closed-form float64 formulas evaluated on the same float64 numbers (Frobenius norm, stable rank, Hill,
  Sim_K, spectral shift of given spectra): a handful of roundings, so agreement is ~1e-15, 1e-12 leaves headroom;
* quantities that need an SVD computed by *two different* LAPACK call paths (torch vs numpy) differ by the SVD's
  backward error ~ eps·σ_1 in the singular values and ~ eps·σ_1/gap in the singular vectors; the tolerances for
  those are stated (and justified) where they are used.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.linalg
import torch

from opd_lens.diagnostics import (
    Settings,
    fraction_mask,
    hill_alpha,
    lowmag_mask,
    mask_overlap,
    matrix_diagnostics,
    principal_angles,
    principal_mask,
    sim_k,
    spectral_shift,
    stable_rank,
    svd64,
    tie_overlap_range,
    top_right_singular_vectors,
    unchanged_fraction,
    update_fro,
    update_mask,
)

SHAPES = [(48, 24), (24, 48), (32, 32)]
SHAPE_IDS = ["tall48x24", "wide24x48", "square32"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]

shapes = pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)

EPS = np.finfo(np.float64).eps


# ----------------------------------------------------------------------------------------------------------------
# numpy oracles
# ----------------------------------------------------------------------------------------------------------------


def np64(t: torch.Tensor) -> np.ndarray:
    """The exact float64 values of a (bf16 / fp16 / fp32 / fp64) tensor."""
    return t.detach().to(torch.float64).cpu().numpy()


def np_round_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even of float32-representable values to bf16, in numpy bit arithmetic, returned as float64.

    Independent of torch's own bf16 cast (``test_numpy_bf16_rounding_matches_torch`` checks that both agree on the
    test inputs). NaN stays NaN, overflow rounds to ±inf.
    """
    x32 = np.asarray(x, dtype=np.float32)
    bits = x32.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = rounded.view(np.float32).astype(np.float64)
    out[np.isnan(x32)] = np.nan
    return out


def bf16_values(t: torch.Tensor) -> np.ndarray:
    """bf16(t) as float64 numpy: exact for bf16 storage, numpy RNE for fp16 / fp32 (both exact in float32)."""
    if t.dtype == torch.bfloat16:
        return np64(t)
    return np_round_bf16(np64(t).astype(np.float32))


def oracle_update_mask(a: np.ndarray, b: np.ndarray, eta: float) -> np.ndarray:
    """Literal η test on bf16 values in float64: changed iff not ``|b − a| ≤ η·max(|a|, |b|)``.

    Non-finite entries follow the rules documented in ``support.update_mask``: NaN vs NaN and an infinity vs the
    same infinity are unchanged; NaN vs anything else, and an infinity vs anything else, are changed.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.abs(b - a) <= eta * np.maximum(np.abs(a), np.abs(b))
        same = (a == b) | (np.isnan(a) & np.isnan(b))
    finite = np.isfinite(a) & np.isfinite(b)
    return ~np.where(finite, close, same)


def oracle_k(alpha: float, shape: tuple[int, int]) -> int:
    """k = ⌈α·m·n⌉ in exact rational arithmetic (α read as the decimal it is written as)."""
    return math.ceil(Fraction(str(alpha)) * shape[0] * shape[1])


def oracle_rank_r_scores(w0: np.ndarray, r: int) -> np.ndarray:
    """|U_r Σ_r V_rᵀ| from numpy's SVD, r capped at min(m, n)."""
    u, s, vh = np.linalg.svd(w0, full_matrices=False)
    r = min(r, s.size)
    return np.abs((u[:, :r] * s[:r]) @ vh[:r, :])


def oracle_fraction_mask(scores: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """The k largest (smallest) scores, exact ties going to the lowest row-major indices (masks.fraction_mask)."""
    flat = scores.ravel()
    order = np.lexsort((np.arange(flat.size), -flat if largest else flat))
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


def assert_fraction_mask(mask: torch.Tensor, scores: np.ndarray, k: int, largest: bool, tol: float) -> None:
    """Exactly k entries selected; every selected score ≥ (largest) / ≤ (smallest) every unselected one (± tol).

    If the k-th and (k+1)-th scores are separated by more than ``tol`` the selection is unique and must match.
    """
    m = mask.cpu().numpy()
    assert m.dtype == np.bool_ and m.shape == scores.shape
    assert int(m.sum()) == k
    sel, uns = scores[m], scores[~m]
    if uns.size:
        if largest:
            assert sel.min() >= uns.max() - tol
        else:
            assert sel.max() <= uns.min() + tol
    order = np.sort(scores.ravel())
    if largest:
        order = order[::-1]
    if k < order.size and abs(order[k - 1] - order[k]) > tol:
        expected = scores >= order[k - 1] if largest else scores <= order[k - 1]
        np.testing.assert_array_equal(m, expected)


def oracle_overlap_bounds(
    scores: np.ndarray, k: int, largest: bool, upd: np.ndarray, tol: float
) -> tuple[float, float]:
    """Range of |M ∩ U| / |U| over every valid top-k (bottom-k) selection M, ties within ``tol`` broken any way."""
    flat = scores.ravel() if largest else -scores.ravel()
    u = upd.ravel()
    t = np.sort(flat)[::-1][k - 1]
    definite = flat > t + tol
    band = ~definite & (flat >= t - tol)
    need = k - int(definite.sum())
    assert 0 <= need <= int(band.sum())
    base = int((definite & u).sum())
    in_band_upd, in_band_not = int((band & u).sum()), int((band & ~u).sum())
    lo = base + max(0, need - in_band_not)
    hi = base + min(need, in_band_upd)
    n_upd = int(u.sum())
    return lo / n_upd, hi / n_upd


def oracle_angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """scipy.linalg.subspace_angles in degrees, sorted ascending (scipy returns them descending)."""
    return np.sort(np.rad2deg(scipy.linalg.subspace_angles(a, b)))


def oracle_hill(s: np.ndarray, k: int) -> float:
    k = min(k, s.size)
    return 1.0 / np.mean(np.log(s[: k - 1] / s[k - 1]))


def oracle_sim(va: np.ndarray, vb: np.ndarray) -> float:
    return float(np.linalg.norm(va.T @ vb, "fro") ** 2 / va.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# test data
# ----------------------------------------------------------------------------------------------------------------


def _seed(*parts: object) -> int:
    return sum((i + 1) * sum(map(ord, str(p))) for i, p in enumerate(parts)) + 12345


def make_pair(shape, dtype, seed, scale=0.02, dense=False):
    """(W_0, W_t) in ``dtype``: W_t mixes untouched entries, sub-/near-ULP changes and η-scale changes.

    With ``dense=True`` every entry gets a ~1% relative change plus a small additive one (useful for spectra).
    """
    rng = np.random.default_rng(seed)
    w0 = rng.normal(0.0, scale, shape)
    if dense:
        wt = w0 * (1.0 + rng.normal(0.0, 1e-2, shape)) + rng.normal(0.0, 2e-3 * scale, shape)
    else:
        cat = rng.integers(0, 10, shape)
        delta = np.zeros(shape)  # cat 0-2: untouched
        delta = np.where((cat >= 3) & (cat < 6), rng.uniform(-4e-3, 4e-3, shape), delta)  # around ½ bf16 ULP
        delta = np.where((cat >= 6) & (cat < 9), rng.uniform(-3e-2, 3e-2, shape), delta)  # around η = 0.01
        delta = np.where(cat == 9, rng.normal(0.0, 1.0, shape), delta)  # large
        wt = w0 * (1.0 + delta)
    # round W_0 to the storage dtype first, so untouched entries stay bit-identical
    w0_t = torch.from_numpy(w0).to(dtype)
    wt = np.where(rng.integers(0, 10, shape) < 3, np64(w0_t), wt)
    return w0_t, torch.from_numpy(wt).to(dtype)


def _smallest_subnormal(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).smallest_normal) * float(torch.finfo(dtype).eps)


def special_pairs(dtype: torch.dtype) -> list[tuple[float, float]]:
    nan, inf = float("nan"), float("inf")
    tiny = _smallest_subnormal(dtype)
    return [
        (nan, nan),
        (nan, 1.0),
        (1.0, nan),
        (nan, inf),
        (inf, inf),
        (-inf, -inf),
        (-inf, inf),
        (inf, 1.0),
        (1.0, -inf),
        (0.0, -0.0),
        (-0.0, 0.0),
        (0.0, 0.0),
        (0.0, tiny),
        (-tiny, 0.0),
        (tiny, 2 * tiny),
        (tiny, -tiny),
        (1.0, -1.0),
    ]


def with_specials(w0: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of (w0, wt) with the special pairs planted in the first row(s)."""
    w0, wt = w0.clone(), wt.clone()
    for i, (a, b) in enumerate(special_pairs(w0.dtype)):
        r, c = divmod(3 * i, w0.shape[1])
        w0[r, c] = a
        wt[r, c] = b
    return w0, wt


# ----------------------------------------------------------------------------------------------------------------
# 1. update support
# ----------------------------------------------------------------------------------------------------------------


@shapes
@dtypes
def test_numpy_bf16_rounding_matches_torch(shape, dtype):
    w0, wt = with_specials(*make_pair(shape, dtype, _seed("round", shape, dtype)))
    for t in (w0, wt):
        got = np64(t.to(torch.bfloat16))
        np.testing.assert_array_equal(got, bf16_values(t))  # NaN == NaN for assert_array_equal


@pytest.mark.parametrize("eta", [1e-3, 0.01], ids=["eta1e-3", "eta1e-2"])
@shapes
@dtypes
def test_update_mask_and_unchanged_fraction_vs_literal_eta_oracle(shape, dtype, eta):
    w0, wt = with_specials(*make_pair(shape, dtype, _seed("mask", shape, dtype)))
    a, b = bf16_values(w0), bf16_values(wt)
    expected = oracle_update_mask(a, b, eta)

    got = update_mask(w0, wt, eta)
    assert got.dtype == torch.bool and got.shape == w0.shape
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(update_mask(wt, w0, eta).numpy(), expected)  # the test is symmetric

    frac = unchanged_fraction(w0, wt, eta)
    assert frac.dtype == torch.float64 and frac.shape == ()
    assert float(frac) == 1.0 - expected.sum() / expected.size

    # the data exercise every outcome: changed and unchanged, and for η = 0.01 entries that are unchanged although
    # their bf16 values differ (the general, non-bitwise branch)
    assert 0 < expected.sum() < expected.size
    bitwise_differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    if eta > 2.0**-8:
        assert (bitwise_differ & ~expected).sum() > 10
    else:
        np.testing.assert_array_equal(expected, bitwise_differ)


# ----------------------------------------------------------------------------------------------------------------
# 2. masks
# ----------------------------------------------------------------------------------------------------------------

# Rank-r reconstructions computed by torch and numpy differ by ~ r·eps·σ_1 per entry (SVD backward error); near-ties
# closer than 1e-12·max|score| may therefore be ordered differently and either choice is accepted.
SCORE_TOL = 1e-12


@pytest.mark.parametrize("alpha", [0.5, 0.3])
@pytest.mark.parametrize("rank", [4, 64], ids=["r4", "r64capped"])
@shapes
@dtypes
def test_principal_mask_vs_numpy_reconstruction(shape, dtype, alpha, rank):
    w0, _ = make_pair(shape, dtype, _seed("princ", shape, dtype))
    scores = oracle_rank_r_scores(np64(w0), rank)
    mask = principal_mask(w0, rank=rank, alpha=alpha)
    assert_fraction_mask(mask, scores, oracle_k(alpha, shape), largest=True, tol=SCORE_TOL * scores.max())


@pytest.mark.parametrize("alpha", [0.5, 0.3])
@shapes
@dtypes
def test_lowmag_mask_vs_numpy(shape, dtype, alpha):
    w0, _ = make_pair(shape, dtype, _seed("low", shape, dtype))
    scores = np.abs(np64(w0))  # exact; bf16/fp16 storage produces genuine ties
    mask = lowmag_mask(w0, alpha=alpha)
    k = oracle_k(alpha, shape)
    assert_fraction_mask(mask, scores, k, largest=False, tol=0.0)
    # the scores are exact, so the documented tie rule (lowest row-major index first) fixes the mask completely
    np.testing.assert_array_equal(mask.numpy(), oracle_fraction_mask(scores, k, largest=False))


@pytest.mark.parametrize("alpha", [0.5, 0.3])
@shapes
@dtypes
def test_masks_with_heavy_ties_vs_numpy(shape, dtype, alpha):
    """W_0 on a coarse grid (9 distinct magnitudes): ties straddle the threshold, the tie rule decides the mask."""
    rng = np.random.default_rng(_seed("ties", shape, dtype))
    w0 = torch.from_numpy(rng.integers(-8, 9, shape) * 0.0078125).to(dtype)  # k/128: exact in every dtype
    scores = np.abs(np64(w0))
    k = oracle_k(alpha, shape)
    kth = np.sort(scores.ravel())[k - 1]
    assert (scores == kth).sum() > 1 and (scores < kth).sum() < k  # a genuine tie at the threshold
    np.testing.assert_array_equal(lowmag_mask(w0, alpha).numpy(), oracle_fraction_mask(scores, k, largest=False))
    # the same rule for the largest scores, through principal_mask at full rank (the reconstruction of a grid
    # matrix is exact only up to rounding, so check fraction_mask on the exact scores directly)
    np.testing.assert_array_equal(
        fraction_mask(torch.from_numpy(scores), alpha, largest=True).numpy(),
        oracle_fraction_mask(scores, k, largest=True),
    )


@pytest.mark.parametrize("alpha", [0.5, 0.3])
@shapes
@dtypes
def test_tie_overlap_range_vs_numpy(shape, dtype, alpha):
    """The overlap's range over every tie rule: the oracle's bounds, the row-major rule inside them, both ends
    reached by a tie rule that takes the updated tied entries first or last."""
    rng = np.random.default_rng(_seed("tie-range", shape, dtype))
    w0 = torch.from_numpy(rng.integers(-8, 9, shape) * 0.0078125).to(dtype)  # few magnitudes: heavy ties
    scores = np.abs(np64(w0))
    upd = rng.random(shape) < 0.4
    k = oracle_k(alpha, shape)
    for largest in (False, True):
        lo, hi = tie_overlap_range(torch.from_numpy(scores), alpha, torch.from_numpy(upd), largest=largest)
        exp_lo, exp_hi = oracle_overlap_bounds(scores, k, largest, upd, tol=0.0)
        assert (float(lo), float(hi)) == (exp_lo, exp_hi)
        assert exp_lo < exp_hi  # the ties matter here
        rule = (oracle_fraction_mask(scores, k, largest) & upd).sum() / upd.sum()
        assert exp_lo <= rule <= exp_hi
        for first in (True, False):  # break the ties with the updated entries first (hi) or last (lo)
            key = np.where(upd.ravel(), 0, 1) if first else np.where(upd.ravel(), 1, 0)
            order = np.lexsort((key, -scores.ravel() if largest else scores.ravel()))
            mask = np.zeros(upd.size, bool)
            mask[order[:k]] = True
            assert (mask & upd.ravel()).sum() / upd.sum() == (exp_hi if first else exp_lo)
    nothing = torch.zeros(shape, dtype=torch.bool)
    assert all(math.isnan(float(v)) for v in tie_overlap_range(torch.from_numpy(scores), alpha, nothing))


def test_tie_overlap_range_known_answer():
    """All 16 scores equal, α = 1/2: any 8 may form the mask. With the first 8 entries updated the row-major rule
    gives overlap 1, another rule anything down to 0; with no tie the range is one point."""
    upd = torch.zeros(4, 4, dtype=torch.bool)
    upd.view(-1)[:8] = True
    lo, hi = tie_overlap_range(torch.ones(4, 4), 0.5, upd)
    assert (float(lo), float(hi)) == (0.0, 1.0)
    assert float(mask_overlap(fraction_mask(torch.ones(4, 4), 0.5), upd)) == 1.0
    distinct = torch.arange(16.0).view(4, 4)
    lo, hi = tie_overlap_range(distinct, 0.5, upd)  # the top 8 are entries 8..15, none updated
    assert float(lo) == float(hi) == 0.0


def test_fraction_k_is_exact_ceiling():
    # α·m·n with a non-integer product (0.3·48·24 = 345.6) and an integer one (0.3·40·10 = 120) that floating point
    # writes as 120.00000000000001 or 119.99999999999999 depending on the order of multiplication.
    for shape, alpha in [((48, 24), 0.3), ((40, 10), 0.3), ((30, 10), 0.7), ((7, 3), 0.1), ((5, 5), 1.0)]:
        w0 = torch.from_numpy(np.random.default_rng(7).normal(size=shape))
        assert int(lowmag_mask(w0, alpha).sum()) == oracle_k(alpha, shape)
        assert int(principal_mask(w0, 2, alpha).sum()) == oracle_k(alpha, shape)


@shapes
def test_mask_overlap_vs_numpy(shape):
    rng = np.random.default_rng(_seed("overlap", shape))
    for density in (0.05, 0.5, 0.95):
        m = rng.random(shape) < 0.5
        u = rng.random(shape) < density
        got = mask_overlap(torch.from_numpy(m), torch.from_numpy(u))
        assert got.dtype == torch.float64
        assert float(got) == (m & u).sum() / u.sum()
    empty = np.zeros(shape, dtype=bool)
    assert math.isnan(float(mask_overlap(torch.from_numpy(m), torch.from_numpy(empty))))


# ----------------------------------------------------------------------------------------------------------------
# 3. principal angles and spectral shift
# ----------------------------------------------------------------------------------------------------------------

# The singular vectors of W_0 and W_t are computed twice (torch, numpy); each differs by ~ eps·σ_1/gap (gap = the
# distance from σ_k to σ_{k+1}, ≳ 1e-3·σ_1 for these Gaussian matrices), i.e. ≲ 2e-13 rad. The angles of proper
# subspaces are ≳ 0.1° unless they are exactly zero (two k-dim subspaces of R^n share ≥ 2k − n dimensions), so the
# relative error is ≲ 1e-10 (5e-12 observed); 1e-10 relative, plus 1e-9 degrees absolute for the exactly-zero
# angles (≤ 1.5e-13 degrees observed).
ANGLE_RTOL, ANGLE_ATOL_DEG = 1e-10, 1e-9


@pytest.mark.parametrize("k", [1, 5, 16, 512], ids=["k1", "k5", "k16", "k512capped"])
@shapes
@dtypes
def test_principal_angles_vs_scipy(shape, dtype, k):
    w0, wt = make_pair(shape, dtype, _seed("angles", shape, dtype), dense=True)
    u0, _, vh0 = np.linalg.svd(np64(w0), full_matrices=False)
    ut, _, vht = np.linalg.svd(np64(wt), full_matrices=False)
    kk = min(k, *shape)
    nan = np.full(kk, np.nan)  # a side of dimension kk: the whole space on both sides, angles 0 by construction
    exp_u = oracle_angles_deg(u0[:, :kk], ut[:, :kk]) if kk < shape[0] else nan
    exp_v = oracle_angles_deg(vh0[:kk].T, vht[:kk].T) if kk < shape[1] else nan

    got_u, got_v = principal_angles(w0, wt, k=k)
    assert got_u.dtype == torch.float64 and got_v.dtype == torch.float64
    assert got_u.shape == (kk,) and got_v.shape == (kk,)
    for got, exp in ((got_u, exp_u), (got_v, exp_v)):
        g = got.numpy()
        assert np.isnan(g).all() or np.all(np.diff(g) >= 0), "angles must be ascending"
        np.testing.assert_allclose(g, exp, rtol=ANGLE_RTOL, atol=ANGLE_ATOL_DEG)
    if kk < min(shape):  # a proper subspace moved by a 1% update: angles are not trivially zero
        assert exp_u.max() > 0.1 and exp_v.max() > 0.1


@shapes
@dtypes
def test_principal_angles_with_precomputed_factors(shape, dtype):
    w0, wt = make_pair(shape, dtype, _seed("angles-f", shape, dtype), dense=True)
    u0, _, vh0 = np.linalg.svd(np64(w0), full_matrices=False)
    ut, _, vht = np.linalg.svd(np64(wt), full_matrices=False)
    got_u, got_v = principal_angles(w0, wt, k=6, factors0=svd64(w0, 10), factors_t=svd64(wt, 6))
    np.testing.assert_allclose(got_u.numpy(), oracle_angles_deg(u0[:, :6], ut[:, :6]), rtol=ANGLE_RTOL)
    np.testing.assert_allclose(got_v.numpy(), oracle_angles_deg(vh0[:6].T, vht[:6].T), rtol=ANGLE_RTOL)


@shapes
@dtypes
def test_svd64_spectrum_vs_numpy(shape, dtype):
    w0, _ = make_pair(shape, dtype, _seed("svd", shape, dtype))
    s_np = np.linalg.svd(np64(w0), compute_uv=False)
    f = svd64(w0, 3)
    assert f.s.dtype == torch.float64 and f.s.shape == (min(shape),)
    assert f.u.shape == (shape[0], 3) and f.vh.shape == (3, shape[1])
    # two LAPACK paths agree to the backward error eps·σ_1 (absolute) on every singular value
    np.testing.assert_allclose(f.s.numpy(), s_np, rtol=0, atol=50 * EPS * s_np[0])


@shapes
@dtypes
def test_spectral_shift_vs_numpy(shape, dtype):
    w0, wt = make_pair(shape, dtype, _seed("shift", shape, dtype), dense=True)
    s0 = np.linalg.svd(np64(w0), compute_uv=False)
    st = np.linalg.svd(np64(wt), compute_uv=False)
    expected = np.linalg.norm(st - s0) / np.linalg.norm(s0)
    # same numbers in, plain formula: 1e-12
    got = spectral_shift(torch.from_numpy(s0), torch.from_numpy(st))
    assert got.dtype == torch.float64 and got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # fp32 spectra are promoted to float64 before the norms
    s0_32, st_32 = s0.astype(np.float32), st.astype(np.float32)
    exp_32 = np.linalg.norm(st_32.astype(np.float64) - s0_32) / np.linalg.norm(s0_32.astype(np.float64))
    assert float(spectral_shift(torch.from_numpy(s0_32), torch.from_numpy(st_32))) == pytest.approx(exp_32, rel=1e-12)
    # through svd64: singular values differ by ~ eps·σ_1 between torch and numpy; the shift is ~1e-3, so its
    # relative error is ≲ sqrt(n)·eps/1e-3 ≈ 1e-12; 1e-10 is tight.
    got_svd = spectral_shift(svd64(w0).s, svd64(wt).s)
    assert float(got_svd) == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# 4. trajectory metrics
# ----------------------------------------------------------------------------------------------------------------


@shapes
@dtypes
def test_update_fro_vs_numpy(shape, dtype):
    w0, wt = make_pair(shape, dtype, _seed("fro", shape, dtype))
    dw_np = np64(wt) - np64(w0)
    expected = np.sqrt(np.sum(dw_np * dw_np))
    got = update_fro(wt.double() - w0.double())
    assert got.dtype == torch.float64 and got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-13)
    # the input dtype is promoted to float64 before squaring (an fp16 ΔW would overflow otherwise)
    big = torch.full(shape, 300.0, dtype=torch.float16)
    assert float(update_fro(big)) == pytest.approx(300.0 * math.sqrt(shape[0] * shape[1]), rel=1e-14)


@shapes
@dtypes
def test_stable_rank_vs_numpy(shape, dtype):
    w0, wt = make_pair(shape, dtype, _seed("srank", shape, dtype))
    dw_np = np64(wt) - np64(w0)
    s = np.linalg.svd(dw_np, compute_uv=False)
    fro2 = np.sum(dw_np * dw_np)  # from the entries, not from the spectrum
    expected = fro2 / s[0] ** 2
    got = stable_rank(torch.from_numpy(s))
    assert got.dtype == torch.float64 and got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # truncated spectrum with the Frobenius norm passed explicitly
    assert float(stable_rank(torch.from_numpy(s[:3].copy()), fro=math.sqrt(fro2))) == pytest.approx(expected, rel=1e-12)
    assert float(
        stable_rank(torch.from_numpy(s[:3].copy()), fro=torch.tensor(math.sqrt(fro2), dtype=torch.float64))
    ) == pytest.approx(expected, rel=1e-12)
    assert 1.0 <= expected <= min(shape)


@pytest.mark.parametrize("k", [10, 4, 24, 100], ids=["k10", "k4", "k24", "k100capped"])
@shapes
@dtypes
def test_hill_alpha_vs_numpy(shape, dtype, k):
    w0, wt = make_pair(shape, dtype, _seed("hill", shape, dtype))
    s = np.linalg.svd(np64(wt) - np64(w0), compute_uv=False)
    expected = oracle_hill(s, k)
    got = hill_alpha(torch.from_numpy(s), k)
    assert got.dtype == torch.float64 and got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert math.isfinite(expected) and expected > 0


def test_hill_alpha_default_k_is_ten():
    s = np.sort(np.random.default_rng(3).lognormal(size=30))[::-1].copy()
    assert float(hill_alpha(torch.from_numpy(s))) == pytest.approx(oracle_hill(s, 10), rel=1e-12)


@pytest.mark.parametrize("n,K", [(24, 16), (48, 16), (32, 1), (32, 8)])
def test_sim_k_vs_numpy_and_scipy_angles(n, K):
    rng = np.random.default_rng(_seed("sim", n, K))
    va, _ = np.linalg.qr(rng.normal(size=(n, K)))
    # vb: va rotated part-way towards a random subspace, so Sim_K is strictly inside (0, 1)
    vb, _ = np.linalg.qr(va + 0.7 * rng.normal(size=(n, K)))
    expected = oracle_sim(va, vb)
    angles = scipy.linalg.subspace_angles(va, vb)
    assert expected == pytest.approx(np.mean(np.cos(angles) ** 2), rel=1e-12)
    got = sim_k(torch.from_numpy(va), torch.from_numpy(vb))
    assert got.dtype == torch.float64 and got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert float(got) == pytest.approx(np.mean(np.cos(angles) ** 2), rel=1e-12)
    if n > K:
        assert 0.0 < expected < 1.0
    # fp32 bases are promoted before the product
    va32, vb32 = va.astype(np.float32), vb.astype(np.float32)
    exp32 = oracle_sim(va32.astype(np.float64), vb32.astype(np.float64))
    assert float(sim_k(torch.from_numpy(va32), torch.from_numpy(vb32))) == pytest.approx(exp32, rel=1e-12)


# Top-K right singular vectors of ΔW from two SVD implementations: the subspace differs by ~ eps·σ_1/(σ_K − σ_{K+1});
# for these Gaussian-like updates that is ≲ 1e-12, so Sim_K (a squared cosine) agrees to ~1e-12 absolute.
SUBSPACE_TOL = 1e-10


@shapes
@dtypes
def test_top_right_singular_vectors_and_sim_k_on_updates(shape, dtype):
    w0, w1 = make_pair(shape, dtype, _seed("traj1", shape, dtype), dense=True)
    rng = np.random.default_rng(_seed("traj2", shape, dtype))
    # a later checkpoint continuing the same update plus fresh noise
    w2 = torch.from_numpy(np64(w1) + 0.5 * (np64(w1) - np64(w0)) + rng.normal(0.0, 2e-4, shape)).to(dtype)
    K = 8
    vs = []
    for wt in (w1, w2):
        dw = np64(wt) - np64(w0)
        _, _, vh = np.linalg.svd(dw, full_matrices=False)
        vs.append(vh[:K].T)
        got = top_right_singular_vectors(torch.from_numpy(dw), K)
        assert got.shape == (shape[1], K) and got.dtype == torch.float64
        g = got.numpy()
        np.testing.assert_allclose(g.T @ g, np.eye(K), atol=1e-13)
        assert oracle_sim(g, vh[:K].T) == pytest.approx(1.0, abs=SUBSPACE_TOL)
    expected = oracle_sim(vs[0], vs[1])
    assert 0.05 < expected < 0.999  # a non-trivial overlap
    got = sim_k(*(top_right_singular_vectors(torch.from_numpy(np64(wt) - np64(w0)), K) for wt in (w1, w2)))
    assert float(got) == pytest.approx(expected, abs=SUBSPACE_TOL)


# ----------------------------------------------------------------------------------------------------------------
# 5. matrix_diagnostics end to end
# ----------------------------------------------------------------------------------------------------------------

SETTINGS = [Settings(), Settings(eta=0.01, mask_rank=4, mask_alpha=0.3, angle_k=6, lock_k=5, hill_k=7)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "custom"])
@shapes
@dtypes
def test_matrix_diagnostics_vs_oracles(shape, dtype, settings):
    w0, wt = make_pair(shape, dtype, _seed("md", shape, dtype))
    a0, at = np64(w0), np64(wt)
    dw = at - a0
    m, n = shape

    # --- oracles -------------------------------------------------------------------------------------------
    upd = oracle_update_mask(bf16_values(w0), bf16_values(wt), settings.eta)
    u0, s0, vh0 = np.linalg.svd(a0, full_matrices=False)
    ut, st, vht = np.linalg.svd(at, full_matrices=False)
    sd = np.linalg.svd(dw, compute_uv=False)
    _, _, vhd = np.linalg.svd(dw, full_matrices=False)
    k = min(settings.angle_k, m, n)
    exp_u = oracle_angles_deg(u0[:, :k], ut[:, :k]) if k < m else np.full(k, np.nan)  # k = m: 0 by construction
    exp_v = oracle_angles_deg(vh0[:k].T, vht[:k].T) if k < n else np.full(k, np.nan)
    kmask = oracle_k(settings.mask_alpha, shape)
    princ_scores = oracle_rank_r_scores(a0, settings.mask_rank)
    p_lo, p_hi = oracle_overlap_bounds(princ_scores, kmask, True, upd, SCORE_TOL * princ_scores.max())
    low = oracle_fraction_mask(np.abs(a0), kmask, largest=False)  # exact scores: the tie rule fixes it
    exp_low_overlap = (low & upd).sum() / upd.sum()

    # --- library -------------------------------------------------------------------------------------------
    d = matrix_diagnostics(w0, wt, settings)

    assert d.unchanged_frac == 1.0 - upd.sum() / upd.size
    assert d.update_fro == pytest.approx(np.linalg.norm(dw), rel=1e-13)
    assert d.stable_rank == pytest.approx(np.sum(dw * dw) / sd[0] ** 2, rel=1e-12)
    # Hill: log(σ_i/σ_k) from two SVDs; each σ carries ~ eps·σ_1 absolute error, σ_k ≳ 0.05·σ_1 here → 1e-12
    assert d.hill_alpha == pytest.approx(oracle_hill(sd, settings.hill_k), rel=1e-12)
    if settings.mask_rank < min(m, n):
        assert p_lo <= d.principal_overlap <= p_hi
    else:  # W_0^(r) = W_0: a magnitude mask, not a principal one
        assert math.isnan(d.principal_overlap)
    assert d.lowmag_overlap == exp_low_overlap
    assert d.spectral_shift == pytest.approx(np.linalg.norm(st - s0) / np.linalg.norm(s0), rel=1e-10)
    np.testing.assert_allclose(d.angles_u.numpy(), exp_u, rtol=ANGLE_RTOL, atol=ANGLE_ATOL_DEG)
    np.testing.assert_allclose(d.angles_v.numpy(), exp_v, rtol=ANGLE_RTOL, atol=ANGLE_ATOL_DEG)
    for got, exp in ((d.max_angle_u, exp_u), (d.max_angle_v, exp_v)):
        assert got == pytest.approx(exp.max(), rel=ANGLE_RTOL, abs=ANGLE_ATOL_DEG, nan_ok=True)
    K = settings.lock_k
    assert d.lock_basis.shape == (n, K)
    lb = d.lock_basis.numpy()
    np.testing.assert_allclose(lb.T @ lb, np.eye(K), atol=1e-13)
    assert oracle_sim(lb, vhd[:K].T) == pytest.approx(1.0, abs=SUBSPACE_TOL)


@shapes
def test_matrix_diagnostics_reports_unique_overlaps_exactly(shape):
    """fp32 W_0 with a rank-4 principal mask: no ties, so the overlaps are unique and must match exactly."""
    w0, wt = make_pair(shape, torch.float32, _seed("md-exact", shape))
    settings = Settings(mask_rank=4, mask_alpha=0.3)
    a0 = np64(w0)
    upd = oracle_update_mask(bf16_values(w0), bf16_values(wt), settings.eta)
    kmask = oracle_k(settings.mask_alpha, shape)
    for scores, largest in ((oracle_rank_r_scores(a0, 4), True), (np.abs(a0), False)):
        lo, hi = oracle_overlap_bounds(scores, kmask, largest, upd, SCORE_TOL * scores.max())
        assert lo == hi
    d = matrix_diagnostics(w0, wt, settings)
    p = oracle_overlap_bounds(oracle_rank_r_scores(a0, 4), kmask, True, upd, 0.0)[0]
    low = oracle_overlap_bounds(np.abs(a0), kmask, False, upd, 0.0)[0]
    assert d.principal_overlap == p
    assert d.lowmag_overlap == low
