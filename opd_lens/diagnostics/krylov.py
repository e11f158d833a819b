"""The fast path of the trajectory spectra: top singular values and right singular vectors by block Krylov.

The trajectory metrics of ΔW_t (stable rank, Hill α, V_K for Sim_K) need only the top ``k`` singular triplets.
:func:`top_spectrum` finds them by block Lanczos on ΔWΔWᵀ with full reorthogonalization: the basis U of the left
Krylov space span{ΔWΩ, (ΔWΔWᵀ)ΔWΩ, …} grows a block at a time, X = ΔWᵀU gives the right Ritz vectors, and the
Rayleigh–Ritz problem XᵀX = UᵀΔWΔWᵀU is solved in float64 (singular values are not squared in working precision:
X is formed by float32 products, its Gram in float64). Each block costs two float32 products with ΔW (ΔWᵀU and
ΔW·X, the second also the raw next block) and a CholeskyQR2 of an m×b block; the random start block is not kept
in the basis, so the first Ritz values already come from ΔWᵀΔW·Ω.

It stops after a block when the top-k Ritz pairs have converged, in either of two ways:

* proven: every residual ‖ΔWΔWᵀu − λu‖ ≤ ``tol``·λ (or below the float32 noise floor), which bounds the error of
  λ = σ², and the Davis–Kahan bound (‖R_K‖_F / (λ_K − λ_{K+1}))² / K on 1 − Sim_K(V_K, exact V_K) is ≤ ``tol``
  (over the directions with a numerically nonzero σ);
* settled: since the previous block, no top-k σ moved by more than ``tol`` relative and V_K by less than ``tol``
  (1 − Sim_K). The error left is then about one convergence factor below what moved, which the tests measure.

When a hard spectrum (a flat or Marchenko–Pastur bulk around σ_K) would grow the basis past the dimension at
which its cost equals that of the float64 Gram eigendecomposition (:func:`krylov_budget`), it switches to the
latter, so a matrix never costs more than about twice the exact-enough route. Measured against the exact SVD
(``tests/test_fast_path.py``), the default tolerance keeps stable rank within 1% relative, Hill α within 2% and
Sim_K within 0.01 absolute, on planted low-rank-plus-noise spectra and on slowly decaying (power-law and linear)
spectra. Small matrices (min(m, n) ≤ 4·block) take the exact SVD.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .linalg import all_finite, svd64

__all__ = ["KRYLOV_TOL", "TopSpectrum", "krylov_applies", "krylov_budget", "start_block", "top_spectrum"]

KRYLOV_TOL = 2e-3
"""Default stopping tolerance of :func:`top_spectrum` (see the module docstring for what it bounds)."""

_F32 = torch.finfo(torch.float32).eps
_F64 = torch.finfo(torch.float64).eps


class TopSpectrum(NamedTuple):
    """The top-k singular values (float64, descending) and right singular vectors (n×k, float64) of a matrix."""

    s: torch.Tensor
    v: torch.Tensor
    dim: int
    """Dimension of the Krylov basis used (min(m, n) when an exact route was taken)."""
    rtol: float
    """Singular values at or below ``rtol``·σ_1 are numerically zero at the precision they were computed in."""


def top_spectrum(
    a: torch.Tensor,
    k: int,
    *,
    start: torch.Tensor | None = None,
    block: int = 32,
    tol: float = KRYLOV_TOL,
    max_dim: int | None = None,
    seed: int = 0,
    exact: bool = False,
    check_finite: bool = True,
    sketch: torch.Tensor | None = None,
) -> TopSpectrum:
    """Top-``k`` singular values and right singular vectors of the m×n matrix ``a`` (k is capped at min(m, n)).

    ``start`` (n×j, j < ``block``) seeds the first block, e.g. with the previous checkpoint's V_K; the rest of the
    block is Gaussian from ``seed``, so results are deterministic. The basis grows by ``block`` columns per
    iteration up to ``max_dim`` (default :func:`krylov_budget`), past which the float64 Gram route finishes the
    job. ``exact=True`` takes the full float64 SVD instead. A matrix with a non-finite entry gives NaN;
    ``check_finite=False`` skips that scan of ``a`` (as in SciPy) where the caller knows it is finite.
    ``sketch`` is ``a``·Ω for Ω = :func:`start_block` (same ``block`` and ``seed``, no ``start``), formed by the
    caller while ``a`` was in cache (:func:`~opd_lens.diagnostics.update_pass`), which saves one pass over ``a``.
    """
    if sketch is not None and start is not None:
        raise ValueError("pass either a start basis or a sketch of the start block, not both")
    m, n = a.shape
    k = min(k, m, n)
    if check_finite and not all_finite(a):
        nan = torch.full((n, k), math.nan, dtype=torch.float64, device=a.device)
        return TopSpectrum(nan[0], nan, 0, math.nan)
    if not krylov_applies((m, n), exact, block):
        f = svd64(a, k, left=False)
        return TopSpectrum(f.s[:k], f.vh.mT, min(m, n), min(m, n) * _F64)
    cap = min(krylov_budget(m, n, block) if max_dim is None else max(max_dim, k), m, n)
    return _block_lanczos(a.to(torch.float32), k, start, block, tol, cap, seed, sketch) or _gram_top(a, k)


def krylov_applies(shape: tuple[int, ...], exact: bool = False, block: int = 32) -> bool:
    """Whether :func:`top_spectrum` takes the Krylov path (float32 products) rather than the exact float64 SVD."""
    return not exact and min(shape[-2:]) > 4 * block


# Costs measured on this project's 2-core CPU by ``bench/methods.py`` (nanoseconds per unit; a flat spectrum, so
# the basis never stops early). A Krylov basis of dimension d costs the products (per m·n·d), the block
# Gram–Schmidt and CholeskyQR2 (per (m + n)·d²) and one Rayleigh–Ritz ``eigh`` per block (per d⁴/block); the
# Gram route the float64 Gram matrix (per m·n·s, s = min(m, n)) and its ``eigh`` (per s³).
_NS_KRYLOV = (0.025, 0.19, 0.018)
_NS_GRAM = (0.014, 0.10)


def krylov_budget(m: int, n: int, block: int = 32) -> int:
    """The largest Krylov basis worth building before the float64 Gram route is cheaper: the largest multiple of
    ``block`` whose predicted Krylov work stays below the predicted cost of that route (at least 2 blocks). Giving
    up there keeps a matrix within about twice the cost of the better choice, whatever its spectrum."""
    s = min(m, n)
    gram = _NS_GRAM[0] * m * n * s + _NS_GRAM[1] * s**3
    a, b, c = _NS_KRYLOV
    d = 2 * block
    while (
        d + block <= s
        and a * m * n * (d + block) + b * (m + n) * (d + block) ** 2 + c * (d + block) ** 4 / block <= gram
    ):
        d += block
    return d


def start_block(n: int, block: int = 32, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Ω (n×``block``, float32), the Gaussian start block of :func:`top_spectrum` for ``seed``."""
    return _start(n, block, seed, torch.device(device))[0]


def _start(n: int, block: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Generator]:
    """Ω and the generator that drew it (which then draws the replacement columns, so results are deterministic)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, block, generator=gen, dtype=torch.float32, device=device), gen


def _block_lanczos(
    a: torch.Tensor,
    k: int,
    start: torch.Tensor | None,
    block: int,
    tol: float,
    cap: int,
    seed: int,
    sketch: torch.Tensor | None,
) -> TopSpectrum | None:
    """Block Lanczos on aaᵀ (float32 ``a``); ``None`` when the basis reached ``cap`` before converging and ``cap`` is
    below min(m, n) (the caller then takes the Gram route)."""
    m, n = a.shape
    dev = a.device
    omega, gen = _start(n, block, seed, dev)
    if start is not None:
        j = min(start.shape[1], block - 1)
        omega[:, :j] = start[:, :j].to(omega)
    y = a @ omega if sketch is None else sketch
    basis = torch.empty(m, cap, dtype=torch.float32, device=dev)  # U
    aat = torch.empty(m, cap, dtype=torch.float32, device=dev)  # ΔWΔWᵀU = ΔW·X
    x = torch.empty(n, cap, dtype=torch.float64, device=dev)  # X = ΔWᵀU
    gram = torch.empty(cap, cap, dtype=torch.float64, device=dev)
    noise = 16 * math.sqrt(n) * _F32  # relative float32 error of ΔWᵀΔW v
    prev = None
    d = 0
    while True:
        b = min(block, cap - d)
        u = _orthonormalize(y[:, :b], basis[:, :d], gen)
        xb = (a.mT @ u).to(torch.float64)
        basis[:, d : d + b], x[:, d : d + b] = u, xb
        gram[: d + b, d : d + b] = x[:, : d + b].mT @ xb
        gram[d : d + b, :d] = gram[:d, d : d + b].mT
        d += b
        lam, w = torch.linalg.eigh(gram[:d, :d])
        lam, w = lam.flip(0).clamp(min=0.0), w.flip(1)
        # the stopping tests run on the few Ritz values as a NumPy array: scalar work, not a tensor op apiece
        lam_np = lam.cpu().numpy()
        floor = noise * lam_np[0]
        n_live = int((lam_np[:k] > noise * floor).sum())  # σ above the float32 error of ΔW v
        if d >= min(m, n):  # the whole space: Rayleigh–Ritz is exact
            return _ritz(lam, w, x[:, :d], k, n_live, gen, d, noise)
        y = a @ xb.to(torch.float32)
        aat[:, d - b : d] = y
        if d < k:
            if d == cap:
                return None
            continue
        j = min(k + 1, d)
        wj = w[:, :j].to(torch.float32)
        res = torch.linalg.vector_norm(aat[:, :d] @ wj - (basis[:, :d] @ wj) * lam[:j].to(torch.float32), dim=0)
        res = res.cpu().numpy().astype(np.float64)
        current = _ritz(lam, w, x[:, :d], k, n_live, gen, d, noise)
        if n_live == 0:
            return current
        values_ok = bool((res[:k] <= np.maximum(tol * lam_np[:k], floor)).all())
        gap = lam_np[n_live - 1] - lam_np[n_live] if n_live < d else lam_np[n_live - 1]
        bound = float((res[:n_live] ** 2).sum()) / max(float(gap), 1e-300) ** 2 / n_live
        if values_ok and bound <= tol:
            return current
        if prev is not None:
            s_now, s_then = lam_np[:n_live] ** 0.5, prev.s[:n_live].cpu().numpy()
            moved_s = float((np.abs(s_now - s_then) / s_now).max())
            kept = float(((prev.v[:, :n_live].mT @ current.v[:, :n_live]) ** 2).sum()) / n_live
            if moved_s <= tol and 1.0 - kept <= tol:
                return current
        if d == cap:
            return None
        prev = current


def _ritz(lam, w, x, k, n_live, gen, d, noise) -> TopSpectrum:
    """σ_i = √λ_i and V = X·W·Σ⁻¹ for the top k Ritz pairs; directions with a numerically zero σ (a rank-deficient
    matrix) are completed by random orthonormal ones."""
    s = lam[:k].sqrt()
    return TopSpectrum(s, _complete(x @ w[:, :n_live] / s[:n_live], k, gen), d, noise)


def _orthonormalize(y: torch.Tensor, basis: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """An orthonormal basis (m×b, float32) of the block ``y`` projected out of ``basis``: block classical
    Gram–Schmidt and CholeskyQR (its Gram in float64), twice.

    A column that all but vanishes against ``basis`` (the Krylov space is invariant there, e.g. for a low-rank or
    flat spectrum) is replaced by a fresh Gaussian one, since normalizing what is left would amplify rounding noise
    into directions that are not orthogonal to the basis; a block that is rank deficient in itself takes a
    Householder QR with the same replacement. So the basis stays orthonormal and keeps growing.
    """
    before = torch.linalg.vector_norm(y, dim=0)
    y = _project(y, basis)
    lost = torch.linalg.vector_norm(y, dim=0) <= 1e-3 * before
    if bool(lost.any()):
        y = y.clone()
        y[:, lost] = _project(_gaussian(y.shape[0], int(lost.sum()), y, gen), basis)
    for again in (False, True):
        if again:
            y = _project(y, basis)
        g = y.mT.to(torch.float64) @ y.to(torch.float64)
        r, info = torch.linalg.cholesky_ex(g, upper=True)
        diag = torch.diagonal(r)
        if int(info) != 0 or not bool(diag.min() > 1e-3 * diag.max()):
            return _householder(y, basis, gen)
        y = torch.linalg.solve_triangular(r.to(y.dtype), y, upper=True, left=False)
    return y


def _project(y: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return y - basis @ (basis.mT @ y) if basis.shape[1] else y


def _gaussian(m: int, b: int, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(m, b, generator=gen, dtype=like.dtype, device=like.device)


def _householder(y: torch.Tensor, basis: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Householder QR of a rank-deficient block, its vanished directions replaced by fresh Gaussian ones."""
    scale = float(torch.linalg.vector_norm(y, dim=0).max())
    q, r = torch.linalg.qr(y.to(torch.float64))
    lost = torch.diagonal(r).abs() <= 1e-4 * scale
    q = q.to(y.dtype)
    if bool(lost.any()):
        kept = torch.cat([basis, q[:, ~lost]], dim=1)
        fresh = _project(_project(_gaussian(y.shape[0], int(lost.sum()), y, gen), kept), kept)
        q[:, lost] = torch.linalg.qr(fresh).Q
    return torch.linalg.qr(_project(q, basis)).Q if basis.shape[1] else q


def _gram_top(a: torch.Tensor, k: int) -> TopSpectrum:
    """The top-k singular values and right vectors from the float64 eigendecomposition of the smaller Gram matrix
    (σ_i exact to ≈ ε·σ_1²/σ_i, ample for the top k), accumulated along the longer side a block at a time so that
    no float64 copy of ``a`` exists whole."""
    m, n = a.shape
    tall = m >= n
    t = a if tall else a.mT  # the Gram of t (long × short) is tᵀt
    s_dim = t.shape[1]
    g = torch.zeros(s_dim, s_dim, dtype=torch.float64, device=a.device)
    rows = max(1, 2**22 // (8 * s_dim))
    for i in range(0, t.shape[0], rows):
        blk = t[i : i + rows].to(torch.float64)
        g.addmm_(blk.mT, blk)
    lam, e = torch.linalg.eigh(g)
    lam, e = lam.flip(0).clamp(min=0.0)[:k], e.flip(1)[:, :k]
    s = lam.sqrt()
    rtol = math.sqrt(s_dim * _F64)
    if tall:
        return TopSpectrum(s, e, s_dim, rtol)
    live = s > rtol * s[0]
    v = torch.empty(n, int(live.sum()), dtype=torch.float64, device=a.device)
    for i in range(0, n, rows):  # V = Aᵀ U Σ⁻¹, a block of A's columns at a time
        v[i : i + rows] = a[:, i : i + rows].mT.to(torch.float64) @ e[:, live]
    v /= s[live]
    gen = torch.Generator(device=a.device).manual_seed(0)
    return TopSpectrum(s, _complete(v, k, gen), s_dim, rtol)


def _complete(v: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``v`` (n×j orthonormal) completed to n×k by random orthonormal directions orthogonal to it."""
    if v.shape[1] >= k:
        return v
    fill = torch.randn(v.shape[0], k - v.shape[1], generator=gen, dtype=v.dtype, device=v.device)
    for _ in range(2):
        fill = fill - v @ (v.mT @ fill)
    return torch.cat([v, torch.linalg.qr(fill).Q], dim=1)
