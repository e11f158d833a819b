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

from .linalg import svd64

__all__ = ["KRYLOV_TOL", "TopSpectrum", "top_spectrum"]

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
    if not bool(torch.isfinite(a).all()):
        nan = torch.full((n, k), math.nan, dtype=torch.float64, device=a.device)
        return TopSpectrum(nan[0], nan, 0, math.nan)
    if exact or min(m, n) <= 4 * block:
        f = svd64(a, k)
        return TopSpectrum(f.s[:k], f.vh.mT, min(m, n), min(m, n) * torch.finfo(torch.float64).eps)
    a = a.to(torch.float32)
    at = a.mT.contiguous()  # both products stream memory in order
    gen = torch.Generator(device=a.device).manual_seed(seed)
    x = torch.randn(n, block, generator=gen, dtype=torch.float64, device=a.device)
    if start is not None:
        j = min(start.shape[1], block - 1)
        x[:, :j] = start[:, :j].to(x)
    x = torch.linalg.qr(x).Q.to(torch.float32)
    cap = min(max(max_dim, k), n)
    f64 = {"dtype": torch.float64, "device": a.device}
    q, p, z, g = (
        torch.empty(n, cap, **f64),
        torch.empty(n, cap, **f64),
        torch.empty(m, cap, **f64),
        torch.empty(cap, cap, **f64),
    )
    prev = None
    noise = 16 * math.sqrt(n) * torch.finfo(torch.float32).eps
    d = 0
    while True:
        b = x.shape[1]
        zb = a @ x
        q[:, d : d + b], p[:, d : d + b], z[:, d : d + b] = x, at @ zb, zb
        g[: d + b, d : d + b] = z[:, : d + b].mT @ z[:, d : d + b]  # the Rayleigh quotient QᵀΔWᵀΔWQ, grown by a block
        g[d : d + b, :d] = g[:d, d : d + b].mT
        d += b
        lam, vecs = torch.linalg.eigh(g[:d, :d])
        lam, vecs = lam.flip(0).clamp(min=0.0), vecs.flip(1)[:, :k]
        v = q[:, :d] @ vecs
        res = torch.linalg.vector_norm(p[:, :d] @ vecs - v * lam[:k], dim=0)
        floor = noise * lam[0]  # the float32 error of ΔWᵀΔW v
        live = lam[:k] > noise * floor  # σ above the float32 error of ΔW v
        values_ok = bool((res <= torch.maximum(tol * lam[:k], floor)).all())
        moved = 1.0 if prev is None else 1.0 - float(((prev.mT @ v[:, live]) ** 2).sum()) / max(int(live.sum()), 1)
        if (d >= k and values_ok and (moved <= tol or not live.any())) or d >= cap:
            return TopSpectrum(lam[:k].sqrt(), v, d, noise)
        prev = v
        x = _next_block(p[:, d - b : d][:, : cap - d], q[:, :d], gen).to(torch.float32)


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
