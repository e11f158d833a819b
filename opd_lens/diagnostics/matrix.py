"""Every diagnostic of one weight matrix at one checkpoint.

Endpoint spectra (angles, spectral shift) and W_0's factors are always exact float64 SVDs. The trajectory spectra
of ΔW_t (stable rank, Hill α, V_K) come from :func:`~opd_lens.diagnostics.krylov.top_spectrum` by default, or
from a full float64 SVD with ``Settings(exact=True)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from . import bits
from .krylov import TopSpectrum, krylov_applies, start_block, top_spectrum
from .linalg import Factors, gram_svd, svd64
from .masks import MASK_ALPHA, MASK_RANK, lowmag_mask, principal_mask, principal_mask_applies
from .spectral import ANGLE_K, INTRUDER_K, angle_sides, intruder_count, principal_angles, spectral_shift, subspace_k
from .support import ETA, UpdatePass, update_pass
from .trajectory import HILL_K, LOCK_K, channel_applies, channel_energy, hill_alpha, stable_rank

__all__ = [
    "Settings",
    "OriginFactors",
    "MatrixDiagnostics",
    "origin_factors",
    "endpoint_factors",
    "endpoint_intruders",
    "matrix_diagnostics",
    "nonfinite_diagnostics",
    "assemble",
]


@dataclass(frozen=True)
class Settings:
    """The hyper-parameters of the diagnostics (recorded with every result).

    A value that a matrix is too small for is NaN rather than a number fixed by construction: the angles of a side
    whose dimension is ≤ ``angle_k`` (see :func:`~opd_lens.diagnostics.angle_sides`), the principal overlap when
    ``mask_rank`` ≥ min(m, n) (:func:`~opd_lens.diagnostics.principal_mask_applies`), Sim_K and the channel
    energy when ``lock_k`` ≥ min(m, n) (:func:`~opd_lens.diagnostics.channel_applies`)."""

    eta: float = ETA
    mask_rank: int = MASK_RANK
    mask_alpha: float = MASK_ALPHA
    angle_k: int | float = ANGLE_K
    """k of the principal angles: an integer, or a fraction of each matrix's smaller side (``1/8``: the paper's
    512 of 4096), see :func:`~opd_lens.diagnostics.subspace_k`."""
    lock_k: int = LOCK_K
    hill_k: int = HILL_K
    exact: bool = False
    """Trajectory spectra of ΔW_t by full float64 SVD instead of the (default) block Krylov fast path."""

    def __post_init__(self):
        try:
            subspace_k(self.angle_k, 1, 1)
        except ValueError as e:
            raise ValueError(f"angle_k: {e}") from None
        for name in ("mask_rank", "lock_k", "hill_k"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")

    def asdict(self) -> dict[str, float | int]:
        return asdict(self)

    @property
    def top_k(self) -> int:
        """How many top singular values of ΔW_t are computed (and stored as ``update_spectrum``)."""
        return max(self.lock_k, self.hill_k)


@dataclass(frozen=True)
class OriginFactors:
    """What the diagnostics need from W_0, computed once per matrix and reused for every checkpoint."""

    factors: Factors | None
    """:func:`endpoint_factors` of W_0: the full spectrum and the top-``angle_k`` singular vectors of each side whose
    angles are not zero by construction; ``None`` when only the masks were loaded (enough for steps without
    endpoint metrics)."""
    principal_mask: torch.Tensor
    """M_princ, packed (:mod:`~opd_lens.diagnostics.bits`)."""
    lowmag_mask: torch.Tensor
    """M_low, packed."""


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
    intruder_dimensions: float
    """How many of W_t's top :data:`~opd_lens.diagnostics.INTRUDER_K` left singular vectors are intruders
    (:func:`~opd_lens.diagnostics.intruder_dimensions`); NaN without endpoint metrics."""
    channel_energy: float
    angles_u: torch.Tensor
    """Principal angles (degrees, ascending) of the left singular subspaces; empty when not computed."""
    angles_v: torch.Tensor
    update_spectrum: torch.Tensor
    """σ_1 ≥ σ_2 ≥ … of ΔW_t, the top :attr:`Settings.top_k` (fewer for a smaller matrix or a LoRA update of lower
    rank); empty for a pair holding NaN or Inf."""
    lock_basis: torch.Tensor
    """V_K(t), the top-K right singular vectors of ΔW_t (n×K), to compare with another step by ``sim_k``."""


def origin_factors(w0: torch.Tensor, settings: Settings = Settings()) -> OriginFactors:
    """SVD and masks of W_0: the once-per-run work shared by every checkpoint of that run.

    One factorization serves both: the rank-r reconstruction behind the principal mask takes the top r triplets,
    the angles the top-k vectors of their non-trivial sides, the spectral shift the spectrum; only what the
    checkpoints need later is kept."""
    m, n = w0.shape[-2:]
    r = min(settings.mask_rank, m, n)
    f = _factorize(w0, max(subspace_k(settings.angle_k, m, n), r), settings.exact)
    principal = principal_mask(w0, r, settings.mask_alpha, f)
    return OriginFactors(
        factors=keep_angle_sides(f, settings.angle_k),
        principal_mask=bits.pack(principal),
        lowmag_mask=bits.pack(lowmag_mask(w0, settings.mask_alpha)),
    )


def endpoint_factors(w: torch.Tensor, settings: Settings = Settings()) -> Factors:
    """What the endpoint metrics need of one matrix: its full spectrum (float64) and its top-``angle_k`` left and
    right singular vectors, leaving out (as m×0 / 0×n) a side whose k vectors span the whole space, where the
    angles are zero by construction. Exact float64 SVD with ``Settings(exact=True)``; otherwise
    :func:`~opd_lens.diagnostics.linalg.gram_svd` (the same result to ~ε·σ_1²/σ_i, 2–3× cheaper), which itself
    falls back to the SVD for ill-conditioned matrices."""
    m, n = w.shape[-2:]
    k = subspace_k(settings.angle_k, m, n)
    left, right = angle_sides(m, n, k)
    if settings.exact:
        return keep_angle_sides(svd64(w, k), settings.angle_k)
    return gram_svd(w, k, left=left, right=right)


def _factorize(w: torch.Tensor, k: int | None, exact: bool) -> Factors:
    return svd64(w, k) if exact else gram_svd(w, k)


def keep_angle_sides(f: Factors, angle_k: int | float) -> Factors:
    """``f`` cut to the top-``angle_k`` vectors of the sides with non-trivial angles."""
    m, n = f.u.shape[-2], f.vh.shape[-1]
    k = subspace_k(angle_k, m, n)
    left, right = angle_sides(m, n, k)
    return Factors(f.u[..., :k] if left else f.u[..., :0], f.s, f.vh[..., :k, :] if right else f.vh[..., :0, :])


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
    ``angle_k`` vectors and the full spectrum). A pair holding NaN or Inf gives :func:`nonfinite_diagnostics`,
    found by the update pass itself (its ‖ΔW‖_F is then not finite), with no separate scan of either matrix.
    """
    if w0.shape != wt.shape or w0.ndim != 2:
        raise ValueError(f"expected two matrices of one shape, got {tuple(w0.shape)} and {tuple(wt.shape)}")
    m, n = w0.shape
    o = origin if origin is not None else origin_factors(w0, settings)
    fast = krylov_applies(w0.shape, settings.exact)
    probe = start_block(w0.shape[1], device=w0.device) if fast else None  # ΔW·Ω formed in the update pass
    p = update_pass(w0, wt, settings.eta, torch.float32 if fast else torch.float64, probe)
    if not math.isfinite(p.fro):
        return _nonfinite(p, (m, n), settings, o)
    delta, fro, changed, n_changed, sketch = p
    del p
    # Every entry is at most ‖ΔW‖_F, so ΔW rounded to its dtype can only overflow when that norm exceeds the dtype.
    overflow = fro >= torch.finfo(delta.dtype).max
    k = settings.top_k
    top = top_spectrum(delta, k, exact=settings.exact, check_finite=overflow, sketch=sketch)
    del delta, sketch  # before the SVD of W_t: the largest allocations never coexist
    ft = intruders = None
    if endpoint:
        ft = factors_t if factors_t is not None else endpoint_factors(wt, settings)
        intruders = endpoint_intruders(w0, wt, ft, o, settings)
    return assemble(changed, n_changed, fro, top, settings, o, (m, n), ft, intruders)


def endpoint_intruders(
    w0: torch.Tensor, wt: torch.Tensor, factors_t: Factors, origin: OriginFactors, settings: Settings
) -> int:
    """The intruder dimensions of W_t (:func:`~opd_lens.diagnostics.intruder_count`) from the SVDs the endpoint
    metrics already hold: W_t's top left vectors (factorized again for its top k only where the angles leave out
    the left side or hold fewer) and W_0's cached top-``angle_k``; W_0 is factorized whole only for a vector those
    cannot decide."""
    if origin.factors is None:
        raise ValueError("intruder dimensions need the origin's SVD; pass OriginFactors with factors")
    k = min(INTRUDER_K, *w0.shape)
    ut = factors_t.u if factors_t.u.shape[-1] >= k else _factorize(wt, k, settings.exact).u
    return intruder_count(ut[:, :k], origin.factors.u, lambda: _factorize(w0, None, settings.exact).u, k)


def assemble(
    changed: torch.Tensor,
    n_changed: int,
    fro: float,
    top: TopSpectrum,
    settings: Settings,
    origin: OriginFactors,
    shape: tuple[int, int],
    factors_t: Factors | None,
    intruders: int | None = None,
) -> MatrixDiagnostics:
    """The diagnostics from their ingredients: the packed update mask and its count, ‖ΔW‖_F, the top spectrum of
    ΔW and, for the endpoint metrics, :func:`endpoint_factors` of W_t and :func:`endpoint_intruders` (``None``:
    angles, spectral shift and intruders are NaN). Values a matrix this small cannot give are NaN (see
    :class:`Settings`)."""
    nan = float("nan")
    angles_u = angles_v = torch.empty(0, dtype=torch.float64)
    principal = principal_mask_applies(shape, settings.mask_rank)
    channel = channel_applies(shape, settings.lock_k)
    basis = top.v[:, : settings.lock_k]
    shift = nan
    if factors_t is not None:
        if origin.factors is None:
            raise ValueError("endpoint metrics need the origin's SVD; pass OriginFactors with factors")
        angles_u, angles_v = principal_angles(shape, None, settings.angle_k, origin.factors, factors_t)
        angles_u, angles_v = angles_u.cpu(), angles_v.cpu()
        shift = float(spectral_shift(origin.factors.s, factors_t.s))
    return MatrixDiagnostics(
        unchanged_frac=1.0 - n_changed / (shape[0] * shape[1]),
        update_fro=fro,
        stable_rank=float(stable_rank(top.s, fro)),
        hill_alpha=float(hill_alpha(top.s, settings.hill_k, top.rtol)),
        principal_overlap=bits.count_and(origin.principal_mask, changed) / n_changed
        if n_changed and principal
        else nan,
        lowmag_overlap=bits.count_and(origin.lowmag_mask, changed) / n_changed if n_changed else nan,
        max_angle_u=_max(angles_u),
        max_angle_v=_max(angles_v),
        spectral_shift=shift,
        intruder_dimensions=nan if intruders is None else float(intruders),
        channel_energy=float(channel_energy(top.s, fro, settings.lock_k)) if channel else nan,
        angles_u=angles_u,
        angles_v=angles_v,
        update_spectrum=top.s[: settings.top_k].to(torch.float64).cpu(),
        lock_basis=basis if channel else torch.full_like(basis, nan),
    )


def _max(angles: torch.Tensor) -> float:
    """The largest angle; NaN for none or for a side whose angles are zero by construction (all NaN)."""
    return float(angles.max()) if angles.numel() else float("nan")


def nonfinite_diagnostics(
    w0: torch.Tensor, wt: torch.Tensor, settings: Settings, origin: OriginFactors | None
) -> MatrixDiagnostics:
    """The diagnostics of a pair holding NaN or Inf, without the SVDs they break: the unchanged fraction follows
    the rules of :func:`~opd_lens.diagnostics.update_mask` for such entries; ‖ΔW‖_F, the spectra, V_K, the angles
    and the spectral shift are NaN, and so are the mask overlaps when W_0 is the one (its masks need its SVD)."""
    p = update_pass(w0, wt, settings.eta)  # checks the shapes
    m, n = w0.shape
    return _nonfinite(p, (m, n), settings, origin)


def _nonfinite(
    p: UpdatePass, shape: tuple[int, int], settings: Settings, origin: OriginFactors | None
) -> MatrixDiagnostics:
    _, fro, changed, n_changed, _ = p
    m, n = shape
    k = min(settings.lock_k, m, n)
    nan = float("nan")

    def overlap(mask: torch.Tensor) -> float:
        return bits.count_and(mask, changed) / n_changed if n_changed else nan

    return MatrixDiagnostics(
        unchanged_frac=1.0 - n_changed / (m * n),
        update_fro=fro if math.isfinite(fro) else nan,
        stable_rank=nan,
        hill_alpha=nan,
        principal_overlap=overlap(origin.principal_mask) if origin else nan,
        lowmag_overlap=overlap(origin.lowmag_mask) if origin else nan,
        max_angle_u=nan,
        max_angle_v=nan,
        spectral_shift=nan,
        intruder_dimensions=nan,
        channel_energy=nan,
        angles_u=torch.empty(0, dtype=torch.float64),
        angles_v=torch.empty(0, dtype=torch.float64),
        update_spectrum=torch.empty(0, dtype=torch.float64),
        lock_basis=torch.full((n, k), nan, dtype=torch.float64),
    )
