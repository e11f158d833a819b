"""Principal and low-magnitude masks of W_0 and their overlap with the visible update (OPD §3.1, PNT §4.2)."""

from __future__ import annotations

import math

import torch

from .linalg import Factors, svd64
from .support import count_true

__all__ = [
    "MASK_RANK",
    "MASK_ALPHA",
    "fraction_mask",
    "principal_mask",
    "principal_mask_applies",
    "lowmag_mask",
    "mask_overlap",
    "tie_overlap_range",
]

MASK_RANK = 64
"""Default rank r of the reconstruction W_0^(r) that ranks principal weights (OPD App. C.3)."""
MASK_ALPHA = 0.5
"""Default mask fraction α (OPD App. C.3; the paper's Fig. 3 implies 0.3, also a good choice)."""


def fraction_mask(scores: torch.Tensor, alpha: float, largest: bool = True) -> torch.Tensor:
    """Boolean mask of the k = ⌈α·m·n⌉ entries of each m×n matrix with the largest (or smallest) score.

    Exactly k entries are selected per matrix. The tie rule: of the entries whose score equals the k-th, the
    first ones in row-major order fill the mask, so it is the same on every device; NaN scores rank last.
    :func:`tie_overlap_range` says how far another tie rule could move an overlap.
    """
    beyond, at, need = _threshold(scores, alpha, largest)
    if bool((count_true(at.unsqueeze(-2)).unsqueeze(-1) > need).any()):  # more ties than needed: the first ones
        at &= at.cumsum(-1) <= need
    return (beyond | at).view(scores.shape)


def tie_overlap_range(
    scores: torch.Tensor, alpha: float, update: torch.Tensor, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least and the greatest Overlap(M, M_upd) over every tie rule of :func:`fraction_mask`.

    M holds the entries beyond the k-th score and ``need`` of the t entries equal to it. If u of those t are
    updated, the tied part of |M ∩ M_upd| can be anything in [max(0, need − (t − u)), min(need, u)]; the
    row-major rule picks one value in that range. bf16 weights tie often (|W_0| takes few distinct values near the
    α-quantile), so this range is how much the rule can matter. NaN when nothing changed.
    """
    beyond, at, need = (t.unsqueeze(-2) for t in _threshold(scores, alpha, largest))
    upd = update.flatten(-2).unsqueeze(-2)
    fixed, ties, tied_updated, n, need = (
        c.to(torch.float64)
        for c in (count_true(beyond, upd), count_true(at), count_true(at, upd), count_true(upd), need[..., 0, 0])
    )
    lo = fixed + (need - (ties - tied_updated)).clamp(min=0)
    hi = fixed + torch.minimum(need, tied_updated)
    return lo / n, hi / n


def _threshold(scores: torch.Tensor, alpha: float, largest: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened masks of the entries beyond the k-th score and of those equal to it, and how many of the latter
    a mask of k entries takes (≥ 1)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    numel = scores.shape[-2] * scores.shape[-1]
    k = math.ceil(round(alpha * numel, 6))
    flat = scores.flatten(-2)
    if flat.numel() and bool(torch.aminmax(flat).min.isnan()):  # copied only to rank NaN last
        flat = flat.nan_to_num(nan=-math.inf if largest else math.inf, posinf=math.inf, neginf=-math.inf)
    rank = numel - k + 1 if largest else k  # the k-th largest is the (n-k+1)-th smallest
    kth = flat.kthvalue(rank, dim=-1, keepdim=True).values
    beyond = flat > kth if largest else flat < kth
    at = flat == kth
    need = k - count_true(beyond.unsqueeze(-2)).unsqueeze(-1)
    return beyond, at, need


def principal_mask(
    w0: torch.Tensor, rank: int = MASK_RANK, alpha: float = MASK_ALPHA, factors: Factors | None = None
) -> torch.Tensor:
    """M_princ: the top-α entries of |W_0^(r)|, W_0^(r) = U_r Σ_r V_rᵀ the rank-r SVD reconstruction of W_0.

    r is capped at min(m, n). Pass ``factors`` (from :func:`svd64` of ``w0``, with at least r vectors) to reuse an
    SVD already computed.
    """
    f = factors if factors is not None else svd64(w0, rank)
    r = min(rank, f.u.shape[-1])
    scores = (f.u[..., :r] * f.s[..., None, :r]) @ f.vh[..., :r, :]
    return fraction_mask(scores.abs_(), alpha, largest=True)


def principal_mask_applies(shape: tuple[int, ...], rank: int = MASK_RANK) -> bool:
    """Whether M_princ of an m×n matrix ranks principal weights: with r ≥ min(m, n) the reconstruction W_0^(r) is
    W_0 itself and M_princ is the top-α magnitude mask (about the complement of M_low), so its overlap repeats the
    low-magnitude one instead of measuring anything about principal directions."""
    return rank < min(shape[-2:])


def lowmag_mask(w0: torch.Tensor, alpha: float = MASK_ALPHA) -> torch.Tensor:
    """M_low: the bottom-α entries of |W_0|."""
    return fraction_mask(w0.abs(), alpha, largest=False)


def mask_overlap(mask: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Overlap(M, M_upd) = |M ∩ M_upd| / |M_upd| per matrix (random baseline: α). NaN when nothing changed."""
    inter = count_true(mask, update).to(torch.float64)
    return inter / count_true(update).to(torch.float64)
