"""Trajectory diagnostics of the cumulative update ΔW_t = W_t − W_0 (OPD §4, App. E)."""

from __future__ import annotations

import math

import torch

__all__ = [
    "HILL_K",
    "LOCK_K",
    "update_fro",
    "delta_fro",
    "stable_rank",
    "channel_applies",
    "channel_energy",
    "hill_alpha",
    "sim_k",
]

HILL_K = 10
"""Default number k of top singular values in the Hill estimate (the paper leaves k open; third parties use 10)."""
LOCK_K = 16
"""Default dimension K of the right singular subspace compared by Sim_K (OPD §4.2)."""


_BLOCK_BYTES = 2**22
"""Float64 working memory of :func:`update_fro` and :func:`delta_fro` for inputs of lower precision."""


def update_fro(dw: torch.Tensor) -> torch.Tensor:
    """‖ΔW‖_F = (Σ_ij ΔW_ij²)^½, accumulated in float64.

    An input of lower precision is upcast a block of rows at a time, never whole (its squares are exact in float64).
    """
    if dw.dtype == torch.float64:
        return torch.linalg.matrix_norm(dw, ord="fro")
    return _sum_squares(dw.shape, lambda rows: dw[..., rows, :].to(torch.float64), dw.device).sqrt()


def delta_fro(w0: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """‖W_t − W_0‖_F from the two matrices: ``update_fro(wt − w0)`` with the difference taken exactly in float64,
    a block of rows at a time."""
    if w0.shape != wt.shape:
        raise ValueError(f"shape mismatch: {tuple(w0.shape)} vs {tuple(wt.shape)}")

    def block(rows: slice) -> torch.Tensor:
        return wt[..., rows, :].to(torch.float64) - w0[..., rows, :].to(torch.float64)

    return _sum_squares(w0.shape, block, w0.device).sqrt()


def _sum_squares(shape, block, device) -> torch.Tensor:
    """Σ over the last two dimensions of ``block(rows)²``, ``block`` giving float64 row blocks of ``shape``."""
    m, n = shape[-2:]
    rows = max(1, _BLOCK_BYTES // (8 * max(1, n * math.prod(shape[:-2]))))
    total = torch.zeros(shape[:-2], dtype=torch.float64, device=device)
    for i in range(0, m, rows):
        b = block(slice(i, i + rows))
        total += b.mul_(b).sum(dim=(-2, -1))
    return total


def stable_rank(s: torch.Tensor, fro: torch.Tensor | float | None = None) -> torch.Tensor:
    """Stable rank ‖ΔW‖_F² / ‖ΔW‖₂² from the descending singular values ``s`` of ΔW.

    With the full spectrum, ‖ΔW‖_F² = Σ σ_i²; pass ``fro`` when ``s`` is truncated. NaN for a zero update.
    """
    s = s.to(torch.float64)
    fro2 = (s * s).sum(-1) if fro is None else torch.as_tensor(fro, dtype=torch.float64, device=s.device) ** 2
    return fro2 / s[..., 0] ** 2


def channel_applies(shape: tuple[int, ...], k: int = LOCK_K) -> bool:
    """Whether an m×n update has a top-K channel to measure: with K ≥ min(m, n), V_K holds every direction ΔW can
    use (its rank is at most min(m, n)), so the channel energy is 1 and Sim_K is 1 (K ≥ n) or set by arbitrary
    null directions (m ≤ K < n): fixed by construction, not measured."""
    return k < min(shape[-2:])


def channel_energy(s: torch.Tensor, fro: torch.Tensor | float, k: int = LOCK_K) -> torch.Tensor:
    """Σ_{i≤K} σ_i² / ‖ΔW‖_F², the share of the update's energy in its top-K singular directions (its channel, the
    span of V_K), from the descending singular values ``s`` of ΔW (at least the top K) and ‖ΔW‖_F.

    In [0, 1]: 1 when ΔW has rank ≤ K. A fast path's top values may round a few ε above the norm, so the ratio is
    clipped at 1. NaN for a zero update.
    """
    s = s.to(torch.float64)[..., :k]
    fro2 = torch.as_tensor(fro, dtype=torch.float64, device=s.device) ** 2
    return ((s * s).sum(-1) / fro2).clamp(max=1.0)


def hill_alpha(s: torch.Tensor, k: int = HILL_K, rtol: float | None = None) -> torch.Tensor:
    """Hill tail index α̂ = [ (1/(k−1)) Σ_{i<k} log(σ_i/σ_k) ]⁻¹ over the top-k singular values σ_1 ≥ … ≥ σ_k.

    k is capped at the number of singular values (and must be ≥ 2). NaN when σ_k is numerically zero,
    σ_k ≤ ``rtol``·σ_1 (default len(s)·ε of float64: the update has rank < k and no tail to estimate); +inf when
    σ_1 = σ_k.
    """
    if k < 2:
        raise ValueError(f"hill k must be >= 2, got {k}")
    s = s.to(torch.float64)
    k = min(k, s.shape[-1])
    top, sk = s[..., : k - 1], s[..., k - 1 : k]
    mean_log = torch.log(top / sk).sum(-1) / (k - 1)
    alpha = 1.0 / mean_log
    rtol = s.shape[-1] * torch.finfo(s.dtype).eps if rtol is None else rtol
    tiny = sk[..., 0] <= s[..., 0] * rtol
    return torch.where(tiny, torch.full_like(alpha, float("nan")), alpha)


def sim_k(va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
    """Sim_K(V_a, V_b) = ‖V_aᵀ V_b‖_F² / K for orthonormal n×K bases: the mean cos² of their principal angles.

    In [0, 1]; 1 means the same K-dimensional subspace. Symmetric in its arguments.
    """
    if va.shape != vb.shape:
        raise ValueError(f"bases must have the same shape, got {tuple(va.shape)} and {tuple(vb.shape)}")
    m = va.to(torch.float64).mT @ vb.to(torch.float64)
    return (m * m).sum(dim=(-2, -1)) / va.shape[-1]
