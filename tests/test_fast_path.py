"""The fast path of the trajectory spectra (block Krylov, ``top_spectrum``) against an independent float64 oracle.

The requirement: the default path agrees with the exact one to 1% relative in stable rank, 0.01 absolute in
lock_alignment (Sim_16) and 2% relative in Hill α, on planted spectra and on slowly decaying ones. The oracle is
``np.linalg.svd`` in float64 on matrices U diag(s) Vᵀ of known spectrum, with the metrics recomputed here in numpy
(not with opd_lens's own formulas), plus opd_lens's exact path where whole pipelines are compared.

Matrices are kept a few hundred rows wide, just above the 4·block = 128 limit under which the exact SVD is taken,
and every Krylov case checks that the fast path really ran: it reports the float32 rtol rather than the exact
path's min(m, n)·ε, and in the fixed cases its basis stayed smaller than the matrix."""

from __future__ import annotations

import ctypes
import glob
import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import opd_lens
import opd_lens.diagnostics.linalg as linalg
from opd_lens.checkpoints import find_checkpoints, matched_matrices, open_checkpoint
from opd_lens.cli import main as cli_main
from opd_lens.diagnostics import (
    Settings,
    endpoint_factors,
    gram_svd,
    matrix_diagnostics,
    principal_angles,
    svd64,
    top_spectrum,
)
from opd_lens.diagnostics.trajectory import hill_alpha, stable_rank
from opd_lens.testing import qwen3_config, write_planted_run

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_blas_thread")

K = 16  # Sim_K and V_K, the default lock_k
HILL_K = 10
SR_RTOL = 0.01  # stable rank, relative
HILL_RTOL = 0.02  # Hill α, relative
SIM_MIN = 0.99  # Sim_16(fast V_16, oracle V_16)
LOCK_ATOL = 0.01  # lock_alignment, absolute
SV_RTOL = 0.005  # the top-16 singular values, relative
SMALL_SET = dict(angle_k=16, mask_rank=8)
EPS64 = torch.finfo(torch.float64).eps  # the exact path reports rtol = min(m, n)·ε


@pytest.fixture(scope="module")
def one_blas_thread():
    """numpy's OpenBLAS on one thread while this module runs: on a small, shared box its spinning worker threads
    slow the oracle's SVDs several-fold. A no-op where numpy is not linked to scipy-openblas."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    lib = ctypes.CDLL(libs[0]) if libs else None
    get = getattr(lib, "scipy_openblas_get_num_threads64_", None)
    set_ = getattr(lib, "scipy_openblas_set_num_threads64_", None)
    if get is None or set_ is None:
        yield
        return
    n = get()
    set_(1)
    yield
    set_(n)


# --- the independent float64 oracle ------------------------------------------------------------------------------


def orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """A Haar-random n×k orthonormal basis (QR of a Gaussian with the signs of R fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def with_spectrum(m: int, n: int, s: np.ndarray, seed: int) -> np.ndarray:
    """U diag(s) Vᵀ (float64) with random orthonormal U (m×r), V (n×r), r = len(s)."""
    rng = np.random.default_rng(seed)
    return (orthonormal(rng, m, len(s)) * s) @ orthonormal(rng, n, len(s)).T


def oracle_svd(a: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """All singular values (descending) and the top-k right singular vectors (n×k) by numpy's float64 SVD."""
    _, s, vt = np.linalg.svd(np.asarray(a, dtype=np.float64), full_matrices=False)
    return s, vt[:k].T


def np_stable_rank(a: np.ndarray, s: np.ndarray) -> float:
    return float(np.sum(a.astype(np.float64) ** 2) / s[0] ** 2)


def np_hill(s: np.ndarray, k: int = HILL_K) -> float:
    """[ (1/(k−1)) Σ_{i<k} log(σ_i/σ_k) ]⁻¹, written out independently of opd_lens."""
    return float(1.0 / np.mean(np.log(s[: k - 1] / s[k - 1])))


def np_sim(va, vb) -> float:
    """‖V_aᵀ V_b‖_F² / K."""
    va, vb = np.asarray(va, dtype=np.float64), np.asarray(vb, dtype=np.float64)
    return float(np.sum((va.T @ vb) ** 2) / va.shape[1])


def fast(a: np.ndarray, k: int = K, **kwargs):
    """The Krylov path itself: the basis may grow to 512 (past the cost budget at which ``top_spectrum`` would
    switch to the Gram route), so these cases test its accuracy on hard spectra too."""
    kwargs.setdefault("max_dim", 512)
    return top_spectrum(torch.from_numpy(np.ascontiguousarray(a)), k, **kwargs)


def fast_metrics(a: np.ndarray, top) -> tuple[float, float]:
    """Stable rank and Hill α from a TopSpectrum, the way ``matrix_diagnostics`` forms them (exact Frobenius)."""
    fro = float(np.linalg.norm(a))
    return float(stable_rank(top.s, fro)), float(hill_alpha(top.s, HILL_K, top.rtol))


def rel(x: float, y: float) -> float:
    return abs(x - y) / abs(y)


def assert_orthonormal(v: torch.Tensor, atol: float = 1e-5) -> None:
    v = v.to(torch.float64)
    err = float((v.mT @ v - torch.eye(v.shape[1], dtype=torch.float64)).abs().max())
    assert err <= atol, f"V_K is not orthonormal: max |VᵀV − I| = {err:.3g}"


def assert_matches_oracle(
    a: np.ndarray, label: str, *, hill: bool = True, subspace: bool = True, smaller: bool = True
) -> None:
    """The fast path on ``a`` against the numpy oracle: top-16 σ, stable rank, Hill α and Sim_16 of V_16."""
    m, n = a.shape
    s, v = oracle_svd(a)
    top = fast(a)
    assert top.rtol != min(m, n) * EPS64, f"{label}: the exact SVD was taken, not the Krylov path"
    if smaller:
        assert top.dim < min(m, n), f"{label}: the Krylov basis grew to the whole space (dim {top.dim})"
    assert top.s.shape == (K,) and top.v.shape == (n, K), label
    assert_orthonormal(top.v)
    got_s = top.s.numpy()
    worst = float(np.max(np.abs(got_s - s[:K]) / s[:K]))
    assert worst <= SV_RTOL, f"{label}: top-16 singular values off by {worst:.3g} relative\n{got_s}\nvs\n{s[:K]}"
    sr, alpha = fast_metrics(a, top)
    assert rel(sr, np_stable_rank(a, s)) <= SR_RTOL, f"{label}: stable rank {sr} vs {np_stable_rank(a, s)}"
    if hill:
        assert math.isfinite(alpha), f"{label}: Hill α is {alpha}, oracle {np_hill(s)}"
        assert rel(alpha, np_hill(s)) <= HILL_RTOL, f"{label}: Hill α {alpha} vs {np_hill(s)}"
    if subspace:
        sim = np_sim(top.v.numpy(), v)
        assert sim >= SIM_MIN, f"{label}: Sim_16(fast V_16, oracle V_16) = {sim}"
    # whatever the gaps, V_16 must hold the top-16 energy: ‖A V‖_F² = Σ_{i≤16} σ_i²
    energy = float(np.sum((a @ top.v.numpy()) ** 2) / np.sum(s[:K] ** 2))
    assert abs(energy - 1.0) <= 1e-3, f"{label}: V_16 captures {energy} of the top-16 energy"


# --- 1. known spectra --------------------------------------------------------------------------------------------


def _planted24(p: int, m: int, n: int, seed: int) -> np.ndarray:
    s = 0.05 * np.linspace(1.0, 0.5, p)  # a small, slightly sloped noise floor
    s[:24] = np.linspace(10.0, 5.0, 24)
    return with_spectrum(m, n, s, seed)


def _planted4_mp(p: int, m: int, n: int, seed: int) -> np.ndarray:
    """Rank 4 above a Marchenko–Pastur bulk: a Gaussian noise matrix of bulk edge ≈ 1 + √(p/max(m, n))."""
    rng = np.random.default_rng(seed + 100)
    noise = rng.standard_normal((m, n)) / math.sqrt(max(m, n))
    return with_spectrum(m, n, np.array([8.0, 6.0, 4.0, 3.0]), seed) + noise


def _power(e: float):
    return lambda p, m, n, seed: with_spectrum(m, n, np.arange(1, p + 1, dtype=np.float64) ** -e, seed)


def _linear(p: int, m: int, n: int, seed: int) -> np.ndarray:
    return with_spectrum(m, n, 1.0 - np.arange(p, dtype=np.float64) / p, seed)


SPECTRA = {
    "planted24": _planted24,
    "planted4+mp": _planted4_mp,
    "power0.5": _power(0.5),
    "power1": _power(1.0),
    "linear": _linear,
}


@pytest.mark.parametrize("shape", [(600, 400), (400, 600)], ids=["tall", "wide"])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_known_spectra_match_the_float64_oracle(spectrum, shape):
    m, n = shape
    a = SPECTRA[spectrum](min(m, n), m, n, seed=1)
    assert_matches_oracle(a, f"{spectrum} {m}x{n}")


def test_known_spectra_are_what_they_claim():
    """The test matrices have the spectra they are built with (so the cases above test what they say)."""
    s, _ = oracle_svd(SPECTRA["power1"](400, 600, 400, seed=1))
    np.testing.assert_allclose(s, 1.0 / np.arange(1, 401), rtol=1e-10)
    s, _ = oracle_svd(SPECTRA["linear"](400, 400, 600, seed=1))
    np.testing.assert_allclose(s, 1.0 - np.arange(400) / 400, rtol=1e-10, atol=1e-13)
    s, _ = oracle_svd(SPECTRA["planted4+mp"](400, 600, 400, seed=1))
    assert s[3] > 2.5 and s[4] < 1.9  # 4 spikes above the bulk edge 1 + √(2/3) ≈ 1.82


# --- 2. lock_alignment along a trajectory ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spectrum", "shape"),
    [("power0.5", (480, 320)), ("linear", (320, 480)), ("planted24", (480, 320)), ("planted4+mp", (320, 480))],
)
def test_lock_alignment_along_a_trajectory(spectrum, shape):
    """ΔW_t = (t/T)·L + E_t, E_t a Gaussian part rotating with t: Sim_16(V_t, V_T) fast vs oracle within 0.01."""
    m, n = shape
    p = min(m, n)
    low = SPECTRA[spectrum](p, m, n, seed=2)
    rng = np.random.default_rng(3)
    g1, g2 = (rng.standard_normal((m, n)) / math.sqrt(max(m, n)) for _ in range(2))
    scale = 0.3 * np.linalg.svd(low, compute_uv=False)[0]  # noise comparable to the channel early on
    steps = (1, 2, 3, 5, 8)
    last = steps[-1]
    deltas = {}
    for t in steps:
        phi = 0.5 * math.pi * t / last
        deltas[t] = (t / last) * low + scale * (math.cos(phi) * g1 + math.sin(phi) * g2)
    fast_v = {}
    oracle_v = {}
    for t, dw in deltas.items():
        top = fast(dw)
        assert top.dim < p
        fast_v[t] = top.v[:, :K].numpy()
        oracle_v[t] = oracle_svd(dw)[1]
    want = {t: np_sim(oracle_v[t], oracle_v[last]) for t in steps}
    got = {t: np_sim(fast_v[t], fast_v[last]) for t in steps}
    for t in steps:
        assert abs(got[t] - want[t]) <= LOCK_ATOL, f"{spectrum} step {t}: lock_alignment {got[t]} vs oracle {want[t]}"
    assert got[last] == pytest.approx(1.0, abs=1e-6)
    assert min(want.values()) < 0.9, want  # the subspace does move, so the comparison is not 1 against 1


# --- 3. a property over decay, shape and seed --------------------------------------------------------------------


@hsettings(max_examples=10, deadline=None)
@given(
    decay=st.floats(0.0, 2.0),
    p=st.integers(160, 320),
    extra=st.integers(0, 160),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(decay=0.0, p=200, extra=40, transpose=False, seed=0)  # flat spectrum, tall: ΔWᵀΔW = I
@example(decay=0.3, p=160, extra=0, transpose=False, seed=0)
@example(decay=2.0, p=320, extra=160, transpose=True, seed=1)
def test_power_law_property(decay, p, extra, transpose, seed):
    """σ_i = i^−decay on random shapes: singular values and stable rank always; Hill α where the top-10 spread is
    resolvable (σ_1/σ_10 − 1 ≥ 1e-3, else α is ill-conditioned, ∞ at decay 0); Sim_16 where V_16 is determined
    (relative gap σ_16/σ_17 − 1 ≥ 1e-3; a flat spectrum has no preferred 16-dimensional subspace)."""
    m, n = (p, p + extra) if transpose else (p + extra, p)
    s = np.arange(1, p + 1, dtype=np.float64) ** -decay
    a = with_spectrum(m, n, s, seed)
    assert_matches_oracle(
        a,
        f"decay {decay} {m}x{n} seed {seed}",
        hill=s[0] / s[HILL_K - 1] - 1 >= 1e-3,
        subspace=s[K - 1] / s[K] - 1 >= 1e-3,
        smaller=False,  # near-flat spectra may need the whole space; the Krylov path is still taken
    )


@pytest.mark.parametrize(
    "shape", [(400, 300), (300, 300), (300, 400), (222, 230)], ids=["tall", "square", "wide", "nearly-square"]
)
def test_flat_spectrum(shape):
    """All singular values equal (a scaled semi-orthogonal matrix): σ_1..σ_16 are all 2 and the stable rank is
    min(m, n); any orthonormal V_16 is a valid top-16 basis. ΔWᵀΔW = 4·I (tall, square) or nearly so (222×230)
    makes the Krylov space invariant after one block: the next block must not break orthogonality."""
    m, n = shape
    p = min(m, n)
    a = with_spectrum(m, n, np.full(p, 2.0), seed=0)
    top = fast(a)
    np.testing.assert_allclose(top.s.numpy(), 2.0, rtol=SV_RTOL, err_msg=f"{shape}: σ of a flat spectrum")
    sr, _ = fast_metrics(a, top)
    assert rel(sr, p) <= SR_RTOL, f"{shape}: stable rank {sr}, expected {p}"
    assert_orthonormal(top.v)


# --- 4. determinism ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spectrum", ["power0.5", "planted4+mp"])
def test_deterministic_and_seed_independent_within_tolerance(spectrum):
    a = SPECTRA[spectrum](400, 600, 400, seed=4)
    one, two = fast(a), fast(a)
    assert torch.equal(one.s, two.s) and torch.equal(one.v, two.v) and one.dim == two.dim
    s, v = oracle_svd(a)
    other = fast(a, seed=7)
    assert not torch.equal(other.v, one.v)  # the seed does reach the start block
    for top in (one, other):
        assert top.dim < 400
        sr, alpha = fast_metrics(a, top)
        assert rel(sr, np_stable_rank(a, s)) <= SR_RTOL
        assert rel(alpha, np_hill(s)) <= HILL_RTOL
        assert np_sim(top.v.numpy(), v) >= SIM_MIN
    assert abs(np_sim(one.v.numpy(), other.v.numpy()) - 1.0) <= 1 - SIM_MIN


def test_start_block_from_a_previous_basis():
    """``start`` seeds the first block (e.g. with the previous step's V_K); wider than a block it is cut."""
    a = SPECTRA["power0.5"](400, 600, 400, seed=5)
    s, v = oracle_svd(a, 40)
    for start in (torch.from_numpy(v[:, :K]), torch.from_numpy(v[:, :40])):
        top = fast(a, start=start)
        assert top.dim < 400
        np.testing.assert_allclose(top.s.numpy(), s[:K], rtol=SV_RTOL)
        assert np_sim(top.v.numpy(), v[:, :K]) >= SIM_MIN


# --- 5. edge cases -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(600, 400), (100, 80)])
def test_zero_matrix(shape):
    top = fast(np.zeros(shape))
    assert top.s.shape == (K,) and bool((top.s == 0).all())
    assert math.isnan(float(stable_rank(top.s, 0.0)))
    assert math.isnan(float(hill_alpha(top.s, HILL_K, top.rtol)))


def test_rank_3_matrix():
    a = with_spectrum(600, 400, np.array([5.0, 3.0, 2.0]), seed=6)
    s, v = oracle_svd(a, 3)
    top = fast(a)
    np.testing.assert_allclose(top.s[:3].numpy(), [5.0, 3.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(s[:3], [5.0, 3.0, 2.0], rtol=1e-12)
    assert float(top.s[3:].max()) <= top.rtol * float(top.s[0])  # the rest is numerically zero
    assert np_sim(top.v[:, :3].numpy(), v) >= 1 - 1e-6
    assert math.isnan(float(hill_alpha(top.s, HILL_K, top.rtol)))
    sr, _ = fast_metrics(a, top)
    assert sr == pytest.approx((25 + 9 + 4) / 25, rel=1e-6)
    # the whole pipeline: W_t = W_0 + (rank 3), fast and exact agree that Hill α is undefined
    w0 = torch.from_numpy(np.random.default_rng(7).standard_normal((600, 400)))
    wt = w0 + torch.from_numpy(a)
    diags = [matrix_diagnostics(w0, wt, Settings(**SMALL_SET, exact=ex), endpoint=False) for ex in (False, True)]
    assert all(math.isnan(d.hill_alpha) for d in diags), [d.hill_alpha for d in diags]
    assert diags[0].stable_rank == pytest.approx(diags[1].stable_rank, rel=SR_RTOL)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("shape", [(600, 400), (100, 80)])
def test_non_finite_matrix_gives_nan(bad, shape):
    a = np.random.default_rng(8).standard_normal(shape)
    a[3, 5] = bad
    for exact in (False, True):
        top = fast(a, exact=exact)
        assert top.s.shape == (K,) and top.v.shape == (shape[1], K)
        assert bool(top.s.isnan().all()) and bool(top.v.isnan().all())
        assert math.isnan(float(stable_rank(top.s, float(np.linalg.norm(a)))))
        assert math.isnan(float(hill_alpha(top.s, HILL_K, top.rtol)))
    w0 = torch.zeros(shape, dtype=torch.float64)
    for exact in (False, True):
        d = matrix_diagnostics(w0, torch.from_numpy(a), Settings(**SMALL_SET, exact=exact), endpoint=False)
        assert math.isnan(d.stable_rank) and math.isnan(d.hill_alpha) and bool(d.lock_basis.isnan().all())


@pytest.mark.parametrize(("shape", "block"), [((128, 300), 32), ((300, 128), 32), ((90, 70), 32), ((32, 40), 8)])
def test_small_matrices_take_the_exact_svd(shape, block):
    a = torch.from_numpy(np.random.default_rng(9).standard_normal(shape))
    top = top_spectrum(a, K, block=block)
    ref = svd64(a, K)
    k = min(K, *shape)
    assert top.dim == min(shape)
    assert torch.equal(top.s, ref.s[:k]) and torch.equal(top.v, ref.vh.mT)
    assert top.rtol == min(shape) * torch.finfo(torch.float64).eps


@pytest.mark.parametrize(("shape", "block"), [((129, 300), 32), ((300, 129), 32), ((40, 33), 4)])
def test_just_above_the_limit_takes_the_krylov_path(shape, block):
    a = with_spectrum(*shape, np.arange(1, min(shape) + 1, dtype=np.float64) ** -1.0, seed=10)
    top = fast(a, block=block)
    s, v = oracle_svd(a)
    assert top.dim <= min(shape) and top.rtol == 16 * max(shape[1], 1) ** 0.5 * torch.finfo(torch.float32).eps
    np.testing.assert_allclose(top.s.numpy(), s[:K], rtol=SV_RTOL)
    assert np_sim(top.v.numpy(), v) >= SIM_MIN


@pytest.mark.parametrize(("k", "block"), [(100, 32), (16, 4)])
def test_k_above_the_block_size_still_gives_k_values(k, block):
    """A low-rank update with k > block (e.g. Settings(lock_k=100)): k values (zeros past the rank) and an n×k
    basis, as the exact path gives, so V_K of different steps stay comparable."""
    a = with_spectrum(600, 400, np.array([3.0, 2.0]), seed=12)
    top = fast(a, k, block=block)
    assert top.dim < 400
    assert top.s.shape == (k,) and top.v.shape == (400, k), (top.s.shape, top.v.shape)
    np.testing.assert_allclose(top.s[:2].numpy(), [3.0, 2.0], rtol=1e-6)


def test_lock_basis_shape_does_not_depend_on_the_update_rank():
    w0 = torch.from_numpy(np.random.default_rng(13).standard_normal((600, 400)))
    settings = dict(SMALL_SET, lock_k=100)
    shapes = set()
    for update in (with_spectrum(600, 400, np.array([3.0, 2.0]), 14), SPECTRA["power1"](400, 600, 400, 14)):
        wt = w0 + torch.from_numpy(update)
        for exact in (False, True):
            d = matrix_diagnostics(w0, wt, Settings(**settings, exact=exact), endpoint=False)
            shapes.add(tuple(d.lock_basis.shape))
    assert shapes == {(400, 100)}


# --- 6. matrix_diagnostics, fast vs exact ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """W_0 (bf16, 512×384) and W_t = bf16(W_0 + rank-24 channel + sparse part)."""
    g = torch.Generator().manual_seed(11)
    w0 = (torch.randn(512, 384, generator=g, dtype=torch.float64) / 384**0.5).to(torch.bfloat16)
    rms = float(w0.double().pow(2).mean().sqrt())
    low = torch.randn(512, 24, generator=g, dtype=torch.float64) @ torch.randn(
        24, 384, generator=g, dtype=torch.float64
    )
    sparse = torch.randn(512, 384, generator=g, dtype=torch.float64) * (torch.rand(512, 384, generator=g) < 0.3)
    update = 0.05 * rms * (low / low.pow(2).mean().sqrt() + 0.3 * sparse)
    return w0, (w0.double() + update).to(torch.bfloat16)


@pytest.mark.parametrize("endpoint", [True, False])
def test_matrix_diagnostics_fast_vs_exact(bf16_pair, endpoint):
    w0, wt = bf16_pair
    fast_d = matrix_diagnostics(w0, wt, Settings(**SMALL_SET), endpoint=endpoint)
    exact_d = matrix_diagnostics(w0, wt, Settings(**SMALL_SET, exact=True), endpoint=endpoint)
    for name in ("unchanged_frac", "update_fro", "principal_overlap", "lowmag_overlap"):
        assert getattr(fast_d, name) == getattr(exact_d, name), name
    assert 0.0 < fast_d.unchanged_frac < 1.0
    # the numpy oracle of the float64 update
    dw = (wt.double() - w0.double()).numpy()
    s, v = oracle_svd(dw)
    assert rel(fast_d.stable_rank, np_stable_rank(dw, s)) <= SR_RTOL
    assert rel(fast_d.hill_alpha, np_hill(s)) <= HILL_RTOL
    assert rel(fast_d.stable_rank, exact_d.stable_rank) <= SR_RTOL
    assert rel(fast_d.hill_alpha, exact_d.hill_alpha) <= HILL_RTOL
    assert exact_d.stable_rank == pytest.approx(np_stable_rank(dw, s), rel=1e-9)
    assert exact_d.hill_alpha == pytest.approx(np_hill(s), rel=1e-9)
    assert fast_d.lock_basis.shape == exact_d.lock_basis.shape == (384, K)
    assert np_sim(fast_d.lock_basis.numpy(), v) >= SIM_MIN
    assert np_sim(fast_d.lock_basis.numpy(), exact_d.lock_basis.numpy()) >= SIM_MIN
    assert fast(dw).dim < 384  # this pair does go through the Krylov path
    if endpoint:
        # the fast endpoint factors come from the Gram matrix (gram_svd), the exact ones from LAPACK's SVD: the
        # angles agree to ~1e-12° (the bound: a few ε·σ_1²/gap), far inside float32 storage
        for name in ("angles_u", "angles_v"):
            got, want = getattr(fast_d, name), getattr(exact_d, name)
            assert got.shape == (16,), name
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9, msg=name)
        for name in ("max_angle_u", "max_angle_v"):
            assert getattr(fast_d, name) == pytest.approx(getattr(exact_d, name), rel=1e-10, abs=1e-9), name
        assert fast_d.spectral_shift == pytest.approx(exact_d.spectral_shift, rel=1e-10)
        for name in ("max_angle_u", "max_angle_v", "spectral_shift"):
            assert math.isfinite(getattr(fast_d, name)), name
    else:
        for d in (fast_d, exact_d):
            assert d.angles_u.numel() == 0 and math.isnan(d.max_angle_u) and math.isnan(d.spectral_shift)


# --- 7. the engine: a fast store against an exact store ----------------------------------------------------------


@pytest.fixture(scope="module")
def planted_256(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted256")
    config = qwen3_config(layers=1, hidden=256, intermediate=384, heads=4, kv_heads=2)
    return write_planted_run(root, config=config, steps=(10, 20, 30), rank=24)


@pytest.fixture(scope="module")
def fast_and_exact(planted_256, tmp_path_factory):
    origin, run_dir = planted_256
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for label, exact in (("fast", False), ("exact", True)):
        out[label] = opd_lens.compute(
            root / label,
            run_dir,
            origin=origin,
            name="r",
            settings=Settings(**SMALL_SET, exact=exact),
            progress=False,
            device="cpu",
        )
    return out


def test_engine_matrices_take_both_paths(planted_256):
    origin_dir, run_dir = planted_256
    origin = open_checkpoint(origin_dir)
    ckpt = find_checkpoints(run_dir)[-1]
    krylov = 0
    for ref in matched_matrices(origin, ckpt):
        dw = ckpt.read_matrix(ref).double() - origin.read_matrix(ref).double()
        top = top_spectrum(dw, K)
        if min(ref.shape) > 128:
            assert top.dim < min(ref.shape), ref
            krylov += 1
        else:
            assert top.dim == min(ref.shape), ref
    assert krylov >= 4  # q, o (256×256), gate, up (384×256), down (256×384)


def test_engine_fast_store_matches_exact_store(fast_and_exact):
    f, e = fast_and_exact["fast"], fast_and_exact["exact"]
    assert f.attrs["exact"] is False and e.attrs["exact"] is True
    assert f.sizes == e.sizes and list(f.step.values) == [10, 20, 30]
    for name in (
        "unchanged_frac",
        "update_fro",
        "principal_overlap",
        "lowmag_overlap",
        "max_angle_u",
        "max_angle_v",
        "spectral_shift",
        "angles_u",
        "angles_v",
    ):
        np.testing.assert_array_equal(f[name].values, e[name].values, err_msg=name)
    assert np.isfinite(f["angles_u"].sel(step=30).values).any()
    for name, rtol in (("stable_rank", SR_RTOL), ("hill_alpha", HILL_RTOL)):
        fv, ev = f[name].values, e[name].values
        assert np.isfinite(ev).all(), name
        np.testing.assert_allclose(fv, ev, rtol=rtol, atol=0, err_msg=name)
    fl, el = f["lock_alignment"].values, e["lock_alignment"].values
    assert np.isfinite(el).all()
    np.testing.assert_allclose(fl, el, rtol=0, atol=LOCK_ATOL, err_msg="lock_alignment")
    np.testing.assert_allclose(el[:, -1], 1.0, atol=1e-6)


def test_engine_stored_values_against_the_numpy_oracle(planted_256, fast_and_exact):
    """The fast store's stable rank, Hill α and lock_alignment against numpy on the checkpoint files."""
    ds = fast_and_exact["fast"]
    origin_dir, run_dir = planted_256
    origin = open_checkpoint(origin_dir)
    ckpts = find_checkpoints(run_dir)
    refs = matched_matrices(origin, ckpts[-1])
    last_v = {}
    spectra = {}
    for ckpt in ckpts:
        for ref in refs:
            dw = (ckpt.read_matrix(ref).double() - origin.read_matrix(ref).double()).numpy()
            s, v = oracle_svd(dw)
            spectra[ckpt.step, ref.module] = (dw, s, v)
            if ckpt is ckpts[-1]:
                last_v[ref.module] = v
    for (step, module), (dw, s, v) in spectra.items():
        at = {"run": "r", "step": step, "layer": 0, "module": module}
        label = f"step {step} {module}"
        assert rel(float(ds["stable_rank"].sel(at)), np_stable_rank(dw, s)) <= SR_RTOL, label
        assert rel(float(ds["hill_alpha"].sel(at)), np_hill(s)) <= HILL_RTOL, label
        want = np_sim(v, last_v[module])
        assert abs(float(ds["lock_alignment"].sel(at)) - want) <= LOCK_ATOL, label


# --- 8. the CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return write_planted_run(tmp_path_factory.mktemp("small"), steps=(1, 2))


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs a one-line printer
    rc = cli_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_exact_flag(tmp_path, small_run, monkeypatch, capsys):
    origin, run_dir = small_run
    store = tmp_path / "exact-store"
    common = (str(run_dir), "--origin", str(origin), "--name", "r", "--store", str(store), "--quiet")
    rc, out, err = _cli(monkeypatch, capsys, "compute", *common, "--exact")
    assert rc == 0, err
    assert "computed steps 1, 2" in out
    assert opd_lens.open_store(store).settings.exact is True
    assert bool(opd_lens.open_store(store).dataset().attrs["exact"]) is True
    # the same store again without --exact: it keeps its settings
    rc, out, err = _cli(monkeypatch, capsys, "compute", *common)
    assert rc == 0, err
    assert "nothing new" in out
    assert opd_lens.open_store(store).settings.exact is True
    # and again with --exact
    rc, out, err = _cli(monkeypatch, capsys, "compute", *common, "--exact")
    assert rc == 0, err


def test_cli_exact_against_a_fast_store_exits_2(tmp_path, small_run, monkeypatch, capsys):
    origin, run_dir = small_run
    store = tmp_path / "fast-store"
    common = (str(run_dir), "--origin", str(origin), "--name", "r", "--store", str(store), "--quiet")
    rc, _, err = _cli(monkeypatch, capsys, "compute", *common)
    assert rc == 0, err
    assert opd_lens.open_store(store).settings.exact is False
    rc, out, err = _cli(monkeypatch, capsys, "compute", *common, "--exact")
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("opd-lens: error: ")
    assert "exact" in err and "Traceback" not in err
    assert opd_lens.open_store(store).settings.exact is False


# --- 9. the Gram route of the endpoint factors --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(720, 240), (240, 720), (300, 300)], ids=["tall", "wide", "square"])
def test_gram_svd_matches_the_oracle(shape):
    """gram_svd against numpy's SVD, on a matrix of distinct singular values spanning two decades."""
    m, n = shape
    s_true = np.geomspace(1.0, 1e-2, min(m, n))
    w = torch.from_numpy(with_spectrum(m, n, s_true, seed=3))
    k = 64
    f = gram_svd(w, k)
    u, s, vt = np.linalg.svd(w.numpy(), full_matrices=False)
    assert f.u.shape == (m, k) and f.vh.shape == (k, n) and f.s.shape == (min(m, n),)
    assert f.u.dtype == f.s.dtype == f.vh.dtype == torch.float64
    # σ_i carries ≈ ε·σ_1²/σ_i: ≤ 1e-12·σ_1 for σ_i ≥ 1e-2·σ_1 (GRAM_RCOND = 1e-4 allows 1e-12 at most)
    np.testing.assert_allclose(f.s.numpy(), s, rtol=0, atol=1e-12 * s[0])
    np.testing.assert_allclose(f.u.numpy() @ f.u.numpy().T, u[:, :k] @ u[:, :k].T, atol=1e-10)
    np.testing.assert_allclose(f.vh.numpy().T @ f.vh.numpy(), vt[:k].T @ vt[:k], atol=1e-10)
    np.testing.assert_allclose(f.u.numpy().T @ f.u.numpy(), np.eye(k), atol=1e-11)
    np.testing.assert_allclose(f.vh.numpy() @ f.vh.numpy().T, np.eye(k), atol=1e-11)
    np.testing.assert_allclose(w.numpy() @ f.vh.numpy().T, f.u.numpy() * f.s.numpy()[:k], atol=1e-11)
    left_only, right_only = gram_svd(w, k, right=False), gram_svd(w, k, left=False)
    assert left_only.vh.shape == (0, n) and right_only.u.shape == (m, 0)
    torch.testing.assert_close(left_only.u, f.u) and torch.testing.assert_close(right_only.vh, f.vh)


def test_gram_svd_falls_back_to_the_svd_when_ill_conditioned():
    """σ_min ≤ GRAM_RCOND·σ_1 (here a rank-5 matrix): the Gram route would lose the small σ, so svd64 is taken."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 200, generator=g, dtype=torch.float64)
    f, ref = gram_svd(w, 16), svd64(w, 16)
    assert torch.equal(f.s, ref.s) and torch.equal(f.u, ref.u) and torch.equal(f.vh, ref.vh)
    batch = torch.randn(3, 40, 30, generator=g, dtype=torch.float64)
    assert torch.equal(gram_svd(batch, 4).s, svd64(batch, 4).s)  # batches: the SVD


@pytest.mark.parametrize("exact", [False, True])
def test_endpoint_factors_keep_only_the_sides_with_angles(exact):
    """angle_k ≥ a side's dimension makes that side's angles zero by construction: no vectors are kept for it."""
    w = torch.from_numpy(with_spectrum(300, 100, np.geomspace(1.0, 0.1, 100), seed=5))
    wide = endpoint_factors(w, Settings(angle_k=512, exact=exact))  # k = 100 = n: V trivial, U the range of W
    assert wide.u.shape == (300, 100) and wide.vh.shape == (0, 100) and wide.s.shape == (100,)
    square = endpoint_factors(w[:100], Settings(angle_k=512, exact=exact))
    assert square.u.shape == (100, 0) and square.vh.shape == (0, 100)
    both = endpoint_factors(w, Settings(angle_k=16, exact=exact))
    assert both.u.shape == (300, 16) and both.vh.shape == (16, 100)
    ref = svd64(w, 16)
    np.testing.assert_allclose(both.s.numpy(), ref.s.numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(both.u.numpy() @ both.u.numpy().T, ref.u.numpy() @ ref.u.numpy().T, atol=1e-10)
    a0, a1 = principal_angles(w.shape, None, 512, wide, endpoint_factors(w * 1.01, Settings(angle_k=512)))
    assert a1.shape == (100,) and bool(a1.isnan().all())  # the whole right space against itself: no measurement
    assert float(a0.max()) < 1e-6  # a scaled matrix has the same range


# --- 10. the QR route of svd64 for large tall and wide matrices --------------------------------------------------


@pytest.fixture
def qr_route(monkeypatch):
    """svd64 takes its QR route at any size; returns the list of what each attempt gave (None: fell back)."""
    attempts = []
    real = linalg._svd64_tall

    def spy(w, k, left):
        f = real(w, k, left)
        attempts.append(f)
        return f

    monkeypatch.setattr(linalg, "LEAN_MIN_NUMEL", 0)
    monkeypatch.setattr(linalg, "_svd64_tall", spy)
    return attempts


@pytest.mark.parametrize("shape", [(720, 240), (240, 720), (400, 200)], ids=["tall", "wide", "ratio2"])
def test_svd64_qr_route_matches_the_oracle(qr_route, shape):
    m, n = shape
    s_true = 1.0 / np.sqrt(1.0 + np.arange(min(m, n)))  # distinct singular values: vectors defined up to sign
    w = torch.from_numpy(with_spectrum(m, n, s_true, seed=3))
    k = 64
    f = svd64(w, k)
    assert len(qr_route) == 1 and qr_route[0] is not None  # the QR route was taken and kept
    u, s, vt = np.linalg.svd(w.numpy(), full_matrices=False)
    assert f.u.shape == (m, k) and f.vh.shape == (k, n) and f.s.shape == (min(m, n),)
    assert f.u.dtype == f.s.dtype == f.vh.dtype == torch.float64
    np.testing.assert_allclose(f.s.numpy(), s, rtol=0, atol=1e-13 * s[0])
    np.testing.assert_allclose(f.u.numpy() @ f.u.numpy().T, u[:, :k] @ u[:, :k].T, atol=1e-11)
    np.testing.assert_allclose(f.vh.numpy().T @ f.vh.numpy(), vt[:k].T @ vt[:k], atol=1e-11)
    np.testing.assert_allclose(f.u.numpy().T @ f.u.numpy(), np.eye(k), atol=1e-12)
    np.testing.assert_allclose(w.numpy() @ f.vh.numpy().T, f.u.numpy() * f.s.numpy()[:k], atol=1e-12)
    right = svd64(w, k, left=False)
    assert right.u.shape == (m, 0)
    np.testing.assert_allclose(right.vh.numpy().T @ right.vh.numpy(), vt[:k].T @ vt[:k], atol=1e-11)
    # and the diagnostics built on it: principal angles against the plain SVD of another matrix
    w2 = w + 0.01 * torch.from_numpy(with_spectrum(m, n, s_true, seed=4))
    angles = principal_angles(w, w2, k)
    plain = linalg.Factors(*torch.linalg.svd(w, full_matrices=False))
    plain2 = linalg.Factors(*torch.linalg.svd(w2, full_matrices=False))
    expected = principal_angles(w, w2, k, plain, plain2)
    for got, want in zip(angles, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-9)


def test_svd64_qr_route_falls_back_when_ill_conditioned(qr_route):
    """A rank-5 matrix has σ_k ≈ 0 for k > 5: U_k = W V_k Σ_k⁻¹ is undefined, so the plain SVD is taken."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 200, generator=g, dtype=torch.float64)
    f = svd64(w, 16)
    assert qr_route == [None]
    np.testing.assert_allclose(f.u.numpy().T @ f.u.numpy(), np.eye(16), atol=1e-12)
    np.testing.assert_allclose(w.numpy() @ f.vh.numpy().T, f.u.numpy() * f.s.numpy()[:16], atol=1e-10)
    assert svd64(w, 16, left=False).vh.shape == (16, 200)  # V alone needs no U: the QR route is kept
    assert qr_route[-1] is not None


def test_svd64_qr_route_only_for_large_tall_or_wide_cpu_matrices(monkeypatch):
    calls = []
    monkeypatch.setattr(linalg, "LEAN_MIN_NUMEL", 10_000)
    monkeypatch.setattr(linalg, "_svd64_tall", lambda w, k, left: calls.append(w.shape))  # None: the plain SVD
    svd64(torch.randn(150, 60), 8)  # 9000 entries: below LEAN_MIN_NUMEL
    svd64(torch.randn(120, 120), 8)  # square
    svd64(torch.randn(3, 200, 60), 8)  # a batch
    svd64(torch.randn(200, 60), None)  # every vector
    assert calls == []
    svd64(torch.randn(200, 60), 8)
    svd64(torch.randn(60, 200), 8)
    assert calls == [(200, 60), (200, 60)]  # the wide one transposed
