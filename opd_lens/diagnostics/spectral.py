"""Endpoint diagnostics on W_0 and W_t: subspace rotation and spectral drift (OPD §3.1, App. C.3)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .linalg import Factors, subspace_angles, svd64

__all__ = [
    "ANGLE_K",
    "INTRUDER_K",
    "INTRUDER_EPS",
    "subspace_k",
    "angle_sides",
    "principal_angles",
    "spectral_shift",
    "intruder_dimensions",
    "intruder_count",
]

ANGLE_K = 512
"""Default size k of the top singular subspaces compared by the principal angles (OPD App. C.3: 512 of 4096)."""


INTRUDER_K = 10
"""Default number of top singular vectors of W_t checked for intruders (Shuttleworth et al. 2024)."""
INTRUDER_EPS = 0.5
"""Default similarity threshold ε below which a singular vector of W_t is an intruder (the authors' code)."""


def subspace_k(k: int | float, m: int, n: int) -> int:
    """The k of an m×n matrix's top-k singular subspaces: an int ``k`` capped at min(m, n), or a fraction
    ``0 < k < 1`` of min(m, n), rounded to the nearest integer and at least 1 (the paper's 512 of 4096 is 1/8)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not (k >= 1 if isinstance(k, int) else 0 < k < 1):
        raise ValueError(f"k must be an integer >= 1 or a fraction in (0, 1), got {k!r}")
    side = min(m, n)
    return min(k, side) if isinstance(k, int) else max(1, min(side, round(k * side)))


def principal_angles(
    w0: torch.Tensor | tuple[int, ...],
    wt: torch.Tensor | None,
    k: int | float = ANGLE_K,
    factors0: Factors | None = None,
    factors_t: Factors | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal angles in degrees (ascending) between the top-k singular subspaces of W_0 and W_t.

    Returns ``(angles_u, angles_v)``: cos θ_i(U) = σ_i(U_{0,k}ᵀ U_{t,k}) for the left and likewise for the right
    singular vectors, computed in float64 through the sine formulation of :func:`subspace_angles` so that angles
    far below 1° are accurate. ``k`` is resolved by :func:`subspace_k` (an int capped at min(m, n), or a
    fraction of it). A side of dimension k (the right side of an m×n matrix with n = k, say) gives k NaN: both
    subspaces are the whole space, so its angles are zero by construction, not a measurement. Pass precomputed
    ``factors0``/``factors_t`` (with at least k vectors on each other side) to avoid repeating SVDs. Angles near
    index k are unstable when σ_k ≈ σ_{k+1}. ``w0`` may be given as its shape when both factors are (``wt`` then
    ``None``).
    """
    shape = tuple(w0) if isinstance(w0, tuple) else tuple(w0.shape)
    m, n = shape[-2:]
    k = subspace_k(k, m, n)
    f0 = _given_or_svd(factors0, w0, k, "factors0")
    ft = _given_or_svd(factors_t, wt, k, "factors_t")
    left, right = angle_sides(m, n, k)
    out = []
    for side, needed, get in (("left", left, lambda f: f.u), ("right", right, lambda f: f.vh.mT)):
        if not needed:
            out.append(torch.full((*f0.s.shape[:-1], k), math.nan, dtype=torch.float64, device=f0.s.device))
            continue
        for name, f in (("factors0", f0), ("factors_t", ft)):
            if get(f).shape[-1] < k:
                raise ValueError(f"{name} holds {get(f).shape[-1]} {side} singular vectors, fewer than k={k}")
        out.append(torch.rad2deg(subspace_angles(get(f0)[..., :k], get(ft)[..., :k])))
    return out[0], out[1]


def _given_or_svd(f: Factors | None, w: torch.Tensor | tuple[int, ...] | None, k: int, name: str) -> Factors:
    if f is not None:
        return f
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{name} is needed without the matrix it factorizes")
    return svd64(w, k)


def angle_sides(m: int, n: int, k: int | float) -> tuple[bool, bool]:
    """Whether the left and the right top-k singular subspaces of an m×n matrix are proper subspaces (k below
    the side's dimension), i.e. whether their principal angles are measurements rather than zero by construction."""
    k = subspace_k(k, m, n)
    return k < m, k < n


def spectral_shift(s0: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
    """Normalized spectral shift ‖σ(W_t) − σ(W_0)‖₂ / ‖σ(W_0)‖₂ over the full descending spectra.

    By Mirsky's inequality the numerator is at most ‖ΔW‖_F.
    """
    s0, st = s0.to(torch.float64), st.to(torch.float64)
    return torch.linalg.vector_norm(st - s0, dim=-1) / torch.linalg.vector_norm(s0, dim=-1)


def intruder_dimensions(
    u0: torch.Tensor, ut: torch.Tensor, k: int = INTRUDER_K, eps: float = INTRUDER_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
    the top-k left singular vectors u_i of W_t whose largest |cos| with any left singular vector of W_0 is below ε.

    ``u0`` holds *all* of W_0's left singular vectors (m×min(m, n), the thin SVD), ``ut`` at least W_t's top k
    (columns, descending σ). Returns ``(count, similarity)``: the number of intruders among the top k and, per
    u_i, max_j |u_iᵀ u_{0,j}| (1 when u_i lies along a singular direction of W_0; for m ≤ n the basis spans
    everything, so a small value means u_i spreads over many of W_0's directions). Float64, any batch.
    """
    k = min(k, ut.shape[-1])
    similarity = (u0.to(torch.float64).mT @ ut[..., :k].to(torch.float64)).abs().amax(dim=-2)
    return (similarity < eps).sum(-1), similarity


_DECIDED = 1e-6
"""Margin by which W_0's unseen directions must stay below ε for :func:`intruder_count` to decide without them."""


def intruder_count(
    ut: torch.Tensor,
    u0_top: torch.Tensor,
    u0_all: Callable[[], torch.Tensor],
    k: int = INTRUDER_K,
    eps: float = INTRUDER_EPS,
) -> int:
    """The count of :func:`intruder_dimensions`, exactly, reading all of W_0's left singular vectors only where its
    top ones cannot decide.

    ``ut`` holds W_t's top left singular vectors (at least k), ``u0_top`` W_0's top ones (any number, m×0
    included) and ``u0_all()`` returns all of them. With c = U_{0,top}ᵀ u_i, u_i is no intruder once max |c_j| ≥ ε,
    and an intruder once also ‖u_i − U_{0,top} c‖ = √(1 − ‖c‖²) < ε, since that bounds |cos| with every other
    singular vector of W_0 (orthonormal to the top ones). Only vectors left between the two bounds are compared
    with ``u0_all()``: a small update needs no more than the cached top vectors, a new direction at most one more
    factorization of W_0.
    """
    ut = ut[..., : min(k, ut.shape[-1])].to(torch.float64)
    c = u0_top.to(torch.float64).mT @ ut
    seen = c.abs().amax(dim=-2) if c.shape[-2] else torch.zeros(ut.shape[-1], dtype=torch.float64, device=ut.device)
    rest = (1.0 - (c * c).sum(dim=-2)).clamp(min=0.0).sqrt()
    below = seen < eps
    open_ = below & (rest >= eps - _DECIDED)
    count = int((below & ~open_).sum())
    if bool(open_.any()):
        count += int(intruder_dimensions(u0_all(), ut[..., open_], k=ut.shape[-1], eps=eps)[0])
    return count
