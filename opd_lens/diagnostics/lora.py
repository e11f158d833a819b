"""Diagnostics of a low-rank update ΔW = L·R (a LoRA adapter) from its factors.

The spectrum of ΔW comes exactly from the factors: with L = Q_L R_L and Rᵀ = Q_R R_R (thin QRs), ΔW = Q_L (R_L R_Rᵀ)
Q_Rᵀ, so the SVD of the r×r core gives every nonzero singular value and the right singular vectors Q_R V_core, in
O((m+n)·r²) float64 work and without forming ΔW. ‖ΔW‖_F, stable rank, Hill α and V_K follow. Two diagnostics need
the dense weights: the bf16-visible update (``unchanged_frac`` and the mask overlaps) forms bf16(W_0 + ΔW) in row
blocks, and the endpoint metrics take the SVD of W_t = W_0 + ΔW, formed in float64 as the dense path does.
"""

from __future__ import annotations

import torch

from . import bits
from .krylov import TopSpectrum
from .linalg import Factors
from .matrix import (
    MatrixDiagnostics,
    OriginFactors,
    Settings,
    assemble,
    endpoint_factors,
    endpoint_intruders,
    origin_factors,
)
from .support import update_mask

__all__ = ["lora_spectrum", "lora_weight", "lora_update_mask", "lora_diagnostics"]

_BLOCK_BYTES = 2**26


def lora_spectrum(left: torch.Tensor, right: torch.Tensor) -> TopSpectrum:
    """Every singular value (float64, descending; r of them, zeros included) and the right singular vectors (n×r)
    of L·R for L (m×r) and R (r×n), from QR(L), QR(Rᵀ) and the SVD of the r×r core."""
    ql, rl = torch.linalg.qr(left.to(torch.float64))
    qr, rr = torch.linalg.qr(right.to(torch.float64).mT)
    _, s, vh = torch.linalg.svd(rl @ rr.mT)
    return TopSpectrum(s, qr @ vh.mT, s.shape[-1], s.shape[-1] * torch.finfo(torch.float64).eps)


def lora_weight(w0: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """W_t = W_0 + L·R, dense, in float64."""
    return w0.to(torch.float64) + left.to(torch.float64) @ right.to(torch.float64)


def lora_update_mask(w0: torch.Tensor, left: torch.Tensor, right: torch.Tensor, eta: float) -> torch.Tensor:
    """M_upd of W_t = W_0 + L·R (see :func:`~opd_lens.diagnostics.update_mask`), formed in float64 row blocks of at
    most 64 MiB so that the dense update never exists whole."""
    m, n = w0.shape
    rows = max(1, _BLOCK_BYTES // (8 * n))
    out = torch.empty((m, n), dtype=torch.bool, device=w0.device)
    for i in range(0, m, rows):
        out[i : i + rows] = update_mask(w0[i : i + rows], lora_weight(w0[i : i + rows], left[i : i + rows], right), eta)
    return out


def lora_diagnostics(
    w0: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    settings: Settings | None = None,
    origin: OriginFactors | None = None,
    endpoint: bool = True,
    factors_t: Factors | None = None,
) -> MatrixDiagnostics:
    """All diagnostics of W_t = W_0 + L·R against W_0 (arguments as for
    :func:`~opd_lens.diagnostics.matrix_diagnostics`).

    Equal to the dense diagnostics of that W_t with ``Settings(exact=True)`` (tested): the spectrum is exact, so
    there is no fast-path tolerance. With r < K, V_K(t) holds the r directions an update of rank r spans, and Sim_K
    compares those (the dense SVD would pad them with arbitrary directions of the null space).
    """
    settings = settings or Settings()
    m, n = w0.shape
    if left.shape[0] != m or right.shape[-1] != n or left.shape[1] != right.shape[0]:
        raise ValueError(f"factors {tuple(left.shape)}·{tuple(right.shape)} do not make a {m}×{n} update")
    o = origin if origin is not None else origin_factors(w0, settings)
    top = lora_spectrum(left, right)
    fro = float(torch.linalg.vector_norm(top.s))
    pad = min(settings.top_k, m, n) - top.s.shape[0]
    if pad > 0:  # a rank-r update has min(m, n) - r zero singular values: Hill α needs them
        top = top._replace(s=torch.cat([top.s, top.s.new_zeros(pad)]))
    ft = intruders = None
    if endpoint:
        wt = lora_weight(w0, left, right)
        ft = factors_t if factors_t is not None else endpoint_factors(wt, settings)
        intruders = endpoint_intruders(w0, wt, ft, o, settings)
        del wt
    changed = bits.pack(lora_update_mask(w0, left, right, settings.eta))
    return assemble(changed, bits.count(changed), fro, top, settings, o, (m, n), ft, intruders)
