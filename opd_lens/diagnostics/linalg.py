"""Exact float64 linear algebra shared by the diagnostics.

Every function accepts a single matrix or a batch (leading dimensions broadcast) on any device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Factors", "svd64", "subspace_angles", "top_right_singular_vectors"]


class Factors(NamedTuple):
    """A (possibly truncated) SVD ``W = U diag(s) Vh``: ``u`` is m×k, ``vh`` is k×n, ``s`` is the *full* spectrum."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def svd64(w: torch.Tensor, k: int | None = None) -> Factors:
    """Thin SVD of ``w`` in float64; singular vectors truncated to the top ``k`` (the spectrum is kept whole)."""
    u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    if k is not None:
        u, vh = u[..., :k], vh[..., :k, :]
    return Factors(u, s, vh)


def subspace_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of orthonormal bases ``a`` and ``b`` (n×k).

    cos θ_i are the singular values of aᵀb and sin θ_i those of b − a(aᵀb); as in Björck & Golub (and
    ``scipy.linalg.subspace_angles``) each angle is taken from the sine where cos² θ ≥ ½, so angles far below 1°
    keep full float64 relative precision, and from the cosine otherwise.
    """
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"bases must have the same number of columns, got {a.shape[-1]} and {b.shape[-1]}")
    a, b = a.to(torch.float64), b.to(torch.float64)
    m = a.mT @ b
    cos = torch.linalg.svdvals(m).clamp(-1.0, 1.0)  # descending: smallest angles first
    sin = torch.linalg.svdvals(b - a @ m).flip(-1).clamp(0.0, 1.0)  # ascending: smallest angles first
    return torch.where(cos * cos >= 0.5, torch.arcsin(sin), torch.arccos(cos))


def top_right_singular_vectors(w: torch.Tensor, k: int) -> torch.Tensor:
    """V_k: the top-``k`` right singular vectors of ``w`` as an orthonormal n×k basis (float64)."""
    return svd64(w, k).vh.mT
