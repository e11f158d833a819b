"""Every diagnostic of one weight matrix at one checkpoint.

Endpoint spectra (angles, spectral shift) and W_0's factors are always exact float64 SVDs. The trajectory spectra
of ΔW_t (stable rank, Hill α, V_K) come from :func:`~opd_lens.diagnostics.krylov.top_spectrum` by default, or
from a full float64 SVD with ``Settings(exact=True)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .krylov import TopSpectrum, krylov_applies, top_spectrum
from .linalg import Factors, svd64
from .masks import MASK_ALPHA, MASK_RANK, lowmag_mask, mask_overlap, principal_mask
from .spectral import ANGLE_K, principal_angles, spectral_shift
from .support import ETA, count_true, update_mask
from .trajectory import HILL_K, LOCK_K, delta_fro, hill_alpha, stable_rank

__all__ = ["Settings", "OriginFactors", "MatrixDiagnostics", "origin_factors", "matrix_diagnostics", "assemble"]


@dataclass(frozen=True)
class Settings:
    """The hyper-parameters of the diagnostics (recorded with every result)."""

    eta: float = ETA
    mask_rank: int = MASK_RANK
    mask_alpha: float = MASK_ALPHA
    angle_k: int = ANGLE_K
    lock_k: int = LOCK_K
    hill_k: int = HILL_K
    exact: bool = False
    """Trajectory spectra of ΔW_t by full float64 SVD instead of the (default) block Krylov fast path."""

    def asdict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class OriginFactors:
    """What the diagnostics need from W_0, computed once per matrix and reused for every checkpoint."""

    factors: Factors | None
    """SVD of W_0 (float64) with max(angle_k, mask_rank) singular vectors and the full spectrum; ``None`` when
    only the masks were loaded (enough for steps without endpoint metrics)."""
    principal_mask: torch.Tensor
    lowmag_mask: torch.Tensor


@dataclass(frozen=True)
class MatrixDiagnostics:
    """The diagnostics of one (W_0, W_t) pair; names match the variables of the opd_lens Dataset."""

    unchanged_frac: float
    update_fro: float
    stable_rank: float
    hill_alpha: float
    principal_overlap: float
    lowmag_overlap: float
    max_angle_u: float
    max_angle_v: float
    spectral_shift: float
    angles_u: torch.Tensor
    """Principal angles (degrees, ascending) of the left singular subspaces; empty when not computed."""
    angles_v: torch.Tensor
    lock_basis: torch.Tensor
    """V_K(t), the top-K right singular vectors of ΔW_t (n×K), to compare with another step by ``sim_k``."""


def origin_factors(w0: torch.Tensor, settings: Settings = Settings()) -> OriginFactors:
    """SVD and masks of W_0: the once-per-run work shared by every checkpoint of that run."""
    factors = svd64(w0, max(settings.angle_k, settings.mask_rank))
    return OriginFactors(
        factors=factors,
        principal_mask=principal_mask(w0, settings.mask_rank, settings.mask_alpha, factors),
        lowmag_mask=lowmag_mask(w0, settings.mask_alpha),
    )


def matrix_diagnostics(
    w0: torch.Tensor,
    wt: torch.Tensor,
    settings: Settings = Settings(),
    origin: OriginFactors | None = None,
    endpoint: bool = True,
    factors_t: Factors | None = None,
) -> MatrixDiagnostics:
    """All diagnostics of W_t against W_0 for one m×n matrix.

    ``origin`` reuses :func:`origin_factors` of ``w0``; ``endpoint=False`` skips the SVD of W_t, leaving the
    angles and the spectral shift NaN; ``factors_t`` passes an SVD of W_t already computed (with at least
    ``angle_k`` vectors and the full spectrum).
    """
    if w0.shape != wt.shape or w0.ndim != 2:
        raise ValueError(f"expected two matrices of one shape, got {tuple(w0.shape)} and {tuple(wt.shape)}")
    o = origin if origin is not None else origin_factors(w0, settings)
    fro = delta_fro(w0, wt)
    dw = _delta(w0, wt, float32=krylov_applies(w0.shape, settings.exact))
    top = top_spectrum(dw, max(settings.lock_k, settings.hill_k), exact=settings.exact)
    del dw  # before the SVD of W_t and the update mask: the largest allocations never coexist
    ft = None
    if endpoint:
        ft = factors_t if factors_t is not None else svd64(wt, settings.angle_k)
    return assemble(update_mask(w0, wt, settings.eta), fro, top, settings, o, w0, ft)


def _delta(w0: torch.Tensor, wt: torch.Tensor, float32: bool) -> torch.Tensor:
    """ΔW = W_t − W_0 in float64, or for the Krylov path (which multiplies in float32 anyway) the exact difference
    rounded once to float32, formed a block of rows at a time: half the memory, and no temporary of the matrix's
    size (torch would upcast a whole bf16 operand of a float32 subtraction)."""
    if not float32:
        return wt.to(torch.float64) - w0.to(torch.float64)
    dw = torch.empty(w0.shape, dtype=torch.float32, device=w0.device)
    rows = max(1, 2**19 // max(1, w0.shape[-1]))
    for i in range(0, w0.shape[-2], rows):
        dw[i : i + rows] = wt[i : i + rows].to(torch.float64) - w0[i : i + rows].to(torch.float64)
    return dw


def assemble(
    upd: torch.Tensor,
    fro: torch.Tensor,
    top: TopSpectrum,
    settings: Settings,
    origin: OriginFactors,
    w0: torch.Tensor,
    factors_t: Factors | None,
) -> MatrixDiagnostics:
    """The diagnostics from their ingredients: the update mask, ‖ΔW‖_F, the top spectrum of ΔW and, for the
    endpoint metrics, the SVD of W_t (``None``: angles and spectral shift are NaN)."""
    nan = float("nan")
    angles_u = angles_v = torch.empty(0, dtype=torch.float64, device=w0.device)
    shift = nan
    if factors_t is not None:
        if origin.factors is None:
            raise ValueError("endpoint metrics need the origin's SVD; pass OriginFactors with factors")
        angles_u, angles_v = principal_angles(w0, None, settings.angle_k, origin.factors, factors_t)
        shift = float(spectral_shift(origin.factors.s, factors_t.s))
    return MatrixDiagnostics(
        unchanged_frac=1.0 - float(count_true(upd)) / upd.numel(),
        update_fro=float(fro),
        stable_rank=float(stable_rank(top.s, fro)),
        hill_alpha=float(hill_alpha(top.s, settings.hill_k, top.rtol)),
        principal_overlap=float(mask_overlap(origin.principal_mask, upd)),
        lowmag_overlap=float(mask_overlap(origin.lowmag_mask, upd)),
        max_angle_u=float(angles_u.max()) if angles_u.numel() else nan,
        max_angle_v=float(angles_v.max()) if angles_v.numel() else nan,
        spectral_shift=shift,
        angles_u=angles_u,
        angles_v=angles_v,
        lock_basis=top.v[:, : settings.lock_k],
    )
