"""Endpoint diagnostics on W_0 and W_t: subspace rotation and spectral drift (OPD §3.1, App. C.3)."""

from __future__ import annotations

import torch

from .linalg import Factors, subspace_angles, svd64

__all__ = ["ANGLE_K", "principal_angles", "spectral_shift"]

ANGLE_K = 512
"""Default size k of the top singular subspaces compared by the principal angles (OPD App. C.3)."""


def principal_angles(
    w0: torch.Tensor,
    wt: torch.Tensor,
    k: int = ANGLE_K,
    factors0: Factors | None = None,
    factors_t: Factors | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal angles in degrees (ascending) between the top-k singular subspaces of W_0 and W_t.

    Returns ``(angles_u, angles_v)``: cos θ_i(U) = σ_i(U_{0,k}ᵀ U_{t,k}) for the left and likewise for the right
    singular vectors, computed in float64 through the sine formulation of :func:`subspace_angles` so that angles
    far below 1° are accurate. k is capped at min(m, n). Pass precomputed ``factors0``/``factors_t`` (with at least
    k vectors) to avoid repeating SVDs. Angles near index k are unstable when σ_k ≈ σ_{k+1}.
    """
    k = min(k, w0.shape[-2], w0.shape[-1])
    f0 = factors0 if factors0 is not None else svd64(w0, k)
    ft = factors_t if factors_t is not None else svd64(wt, k)
    for name, f in (("factors0", f0), ("factors_t", ft)):
        if f.u.shape[-1] < k:
            raise ValueError(f"{name} holds {f.u.shape[-1]} singular vectors, fewer than k={k}")
    angles_u = subspace_angles(f0.u[..., :k], ft.u[..., :k])
    angles_v = subspace_angles(f0.vh[..., :k, :].mT, ft.vh[..., :k, :].mT)
    return torch.rad2deg(angles_u), torch.rad2deg(angles_v)


def spectral_shift(s0: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
    """Normalized spectral shift ‖σ(W_t) − σ(W_0)‖₂ / ‖σ(W_0)‖₂ over the full descending spectra.

    By Mirsky's inequality the numerator is at most ‖ΔW‖_F.
    """
    s0, st = s0.to(torch.float64), st.to(torch.float64)
    return torch.linalg.vector_norm(st - s0, dim=-1) / torch.linalg.vector_norm(s0, dim=-1)
