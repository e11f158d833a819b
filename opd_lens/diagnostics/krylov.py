"""The fast path of the trajectory spectra: top singular values and right singular vectors by block Krylov.

The trajectory metrics of ΔW_t (stable rank, Hill α, V_K for Sim_K) need only the top ``k`` singular triplets.
:func:`top_spectrum` finds them by block Lanczos on ΔWᵀΔW with full reorthogonalization, applying ΔW in float32
(the cost is a few passes over the matrix instead of a full float64 SVD) and solving the small Rayleigh–Ritz
problem in float64 from ΔW·Q, so singular values are not squared in working precision.

It stops adaptively, after each block, when both hold:

* every top-k Ritz pair has a residual ‖ΔWᵀΔW v − λ v‖ ≤ ``tol``·λ (a bound on the error of λ = σ², usually far
  pessimistic: the actual error is of order residual²/gap), or below the float32 noise floor;
* the top-k right Ritz subspace moved by less than ``tol`` since the previous block (1 − Sim_K over the directions
  with a numerically nonzero σ), so at least two blocks are always taken.

Measured against the exact SVD (``tests/test_fast_path.py``), the default tolerance keeps stable rank within
1% relative, Hill α within 2% and Sim_K within 0.01 absolute, on planted low-rank-plus-noise spectra and on
slowly decaying (power-law and linear) spectra. Small matrices (min(m, n) ≤ 4·block) take the exact SVD.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .linalg import all_finite, svd64

__all__ = ["KRYLOV_TOL", "TopSpectrum", "krylov_applies", "top_spectrum"]

KRYLOV_TOL = 2e-3
"""Default stopping tolerance of :func:`top_spectrum` (see the module docstring for what it bounds)."""


class TopSpectrum(NamedTuple):
    """The top-k singular values (float64, descending) and right singular vectors (n×k, float64) of a matrix."""

    s: torch.Tensor
    v: torch.Tensor
    dim: int
    """Dimension of the Krylov basis used (min(m, n) when the exact SVD was taken)."""
    rtol: float
    """Singular values at or below ``rtol``·σ_1 are numerically zero at the precision they were computed in."""


def top_spectrum(
    a: torch.Tensor,
    k: int,
    *,
    start: torch.Tensor | None = None,
    block: int = 32,
    tol: float = KRYLOV_TOL,
    max_dim: int = 512,
    seed: int = 0,
    exact: bool = False,
) -> TopSpectrum:
    """Top-``k`` singular values and right singular vectors of the m×n matrix ``a`` (k is capped at min(m, n)).

    ``start`` (n×j, j < ``block``) seeds the first block, e.g. with the previous checkpoint's V_K; the rest of the
    block is Gaussian from ``seed``, so results are deterministic. The basis grows by ``block`` columns per
    iteration up to ``max_dim`` (and at most n). ``exact=True`` takes the full float64 SVD instead. A matrix with
    a non-finite entry gives NaN.
    """
    m, n = a.shape
    k = min(k, m, n)
    if not all_finite(a):
        nan = torch.full((n, k), math.nan, dtype=torch.float64, device=a.device)
        return TopSpectrum(nan[0], nan, 0, math.nan)
    if not krylov_applies((m, n), exact, block):
        f = svd64(a, k, left=False)
        return TopSpectrum(f.s[:k], f.vh.mT, min(m, n), min(m, n) * torch.finfo(torch.float64).eps)
    a = a.to(torch.float32)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    x = torch.randn(n, block, generator=gen, dtype=torch.float64, device=a.device)
    if start is not None:
        j = min(start.shape[1], block - 1)
        x[:, :j] = start[:, :j].to(x)
    x = torch.linalg.qr(x).Q.to(torch.float32)
    cap = min(max(max_dim, k), n)
    f64 = {"dtype": torch.float64, "device": a.device}
    q, z, g = torch.empty(n, cap, **f64), torch.empty(m, cap, **f64), torch.empty(cap, cap, **f64)
    p = torch.empty(n, cap, dtype=torch.float32, device=a.device)  # ΔWᵀΔW Q: float32 products, kept as such
    prev = None
    noise = 16 * math.sqrt(n) * torch.finfo(torch.float32).eps
    d = 0
    while True:
        b = x.shape[1]
        zb, pb = _normal_product(a, x)
        q[:, d : d + b], p[:, d : d + b], z[:, d : d + b] = x, pb, zb
        g[: d + b, d : d + b] = z[:, : d + b].mT @ z[:, d : d + b]  # the Rayleigh quotient QᵀΔWᵀΔWQ, grown by a block
        g[d : d + b, :d] = g[:d, d : d + b].mT
        d += b
        lam, vecs = torch.linalg.eigh(g[:d, :d])
        lam, vecs = lam.flip(0).clamp(min=0.0), vecs.flip(1)[:, :k]
        v = q[:, :d] @ vecs
        res = torch.linalg.vector_norm(_mm64(p[:, :d], vecs) - v * lam[:k], dim=0)
        floor = noise * lam[0]  # the float32 error of ΔWᵀΔW v
        live = lam[:k] > noise * floor  # σ above the float32 error of ΔW v
        values_ok = bool((res <= torch.maximum(tol * lam[:k], floor)).all())
        moved = 1.0 if prev is None else 1.0 - float(((prev.mT @ v[:, live]) ** 2).sum()) / max(int(live.sum()), 1)
        if (d >= k and values_ok and (moved <= tol or not live.any())) or d >= cap:
            return TopSpectrum(lam[:k].sqrt(), v, d, noise)
        prev = v
        x = _next_block(p[:, d - b : d][:, : cap - d].to(torch.float64), q[:, :d], gen).to(torch.float32)


def krylov_applies(shape: tuple[int, ...], exact: bool = False, block: int = 32) -> bool:
    """Whether :func:`top_spectrum` takes the Krylov path (float32 products) rather than the exact float64 SVD."""
    return not exact and min(shape[-2:]) > 4 * block


_CACHE_BYTES = 2**20
"""Size of the row blocks of :func:`_normal_product` on the CPU (32 to 128 rows): small enough to stay in cache."""


def _normal_product(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a x, aᵀ a x)`` for float32 ``a`` (m×n) and ``x`` (n×b).

    On the CPU both come from one pass over ``a``, a block of rows at a time: the block is still in cache for its
    transposed product, which reading ``a`` by columns from memory would make 2–3× slower (and a transposed copy of
    ``a`` would double the memory). GPUs multiply by a transposed operand at full speed.
    """
    if a.device.type != "cpu":
        z = a @ x
        return z, a.mT @ z
    m, n = a.shape
    rows = min(max(32, _CACHE_BYTES // (4 * n)), 128)
    z = torch.empty(m, x.shape[1], dtype=a.dtype)
    p = torch.zeros(n, x.shape[1], dtype=a.dtype)
    for i in range(0, m, rows):
        block = a[i : i + rows]
        zi = torch.mm(block, x, out=z[i : i + rows])
        p.addmm_(block.mT, zi)
    return z, p


def _mm64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float64 for a float32 ``a``, upcast a block of rows at a time."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    rows = max(1, 2**18 // max(1, a.shape[1]))
    for i in range(0, a.shape[0], rows):
        torch.mm(a[i : i + rows].to(torch.float64), b, out=out[i : i + rows])
    return out


def _next_block(p: torch.Tensor, q: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Orthonormalize the new Krylov block ``p`` against the basis ``q`` (classical Gram–Schmidt, twice).

    Columns that vanish against ``q`` (an invariant subspace was found, e.g. for a flat spectrum) are replaced by
    fresh Gaussian ones, so the basis stays orthonormal and keeps growing.
    """
    scale = torch.linalg.vector_norm(p, dim=0)
    x = p
    for _ in range(2):
        x = x - q @ (q.mT @ x)
    lost = torch.linalg.vector_norm(x, dim=0) <= 1e-6 * scale
    if bool(lost.any()):
        fresh = torch.randn(x.shape[0], int(lost.sum()), generator=gen, dtype=x.dtype, device=x.device)
        x[:, lost] = fresh - q @ (q.mT @ fresh)
    x = torch.linalg.qr(x).Q
    x = x - q @ (q.mT @ x)
    return torch.linalg.qr(x).Q
