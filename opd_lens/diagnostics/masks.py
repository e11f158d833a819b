"""Principal and low-magnitude masks of W_0 and their overlap with the visible update (OPD §3.1, PNT §4.2)."""

from __future__ import annotations

import math

import torch

from .linalg import Factors, svd64
from .support import count_true

__all__ = ["MASK_RANK", "MASK_ALPHA", "fraction_mask", "principal_mask", "lowmag_mask", "mask_overlap"]

MASK_RANK = 64
"""Default rank r of the reconstruction W_0^(r) that ranks principal weights (OPD App. C.3)."""
MASK_ALPHA = 0.5
"""Default mask fraction α (OPD App. C.3; the paper's Fig. 3 implies 0.3, also a good choice)."""


def fraction_mask(scores: torch.Tensor, alpha: float, largest: bool = True) -> torch.Tensor:
    """Boolean mask of the k = ⌈α·m·n⌉ entries of each m×n matrix with the largest (or smallest) score.

    Exactly k entries are selected per matrix. Ties at the threshold go to the lowest row-major indices, so the
    mask is the same on every device; NaN scores rank last.
    """
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
    need = k - count_true(beyond.unsqueeze(-2)).unsqueeze(-1)  # how many of the ties at the threshold to take, ≥ 1
    if bool((count_true(at.unsqueeze(-2)).unsqueeze(-1) > need).any()):  # more ties than needed: the first ones
        at &= at.cumsum(-1) <= need
    return (beyond | at).view(scores.shape)


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


def lowmag_mask(w0: torch.Tensor, alpha: float = MASK_ALPHA) -> torch.Tensor:
    """M_low: the bottom-α entries of |W_0|."""
    return fraction_mask(w0.abs(), alpha, largest=False)


def mask_overlap(mask: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Overlap(M, M_upd) = |M ∩ M_upd| / |M_upd| per matrix (random baseline: α). NaN when nothing changed."""
    inter = count_true(mask, update).to(torch.float64)
    return inter / count_true(update).to(torch.float64)
