"""Exact float64 linear algebra shared by the diagnostics.

Every function accepts a single matrix or a batch (leading dimensions broadcast) on any device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Factors",
    "GRAM_RCOND",
    "LEAN_MIN_NUMEL",
    "all_finite",
    "gram_svd",
    "svd64",
    "subspace_angles",
    "top_right_singular_vectors",
]


class Factors(NamedTuple):
    """A (possibly truncated) SVD ``W = U diag(s) Vh``: ``u`` is m×k, ``vh`` is k×n, ``s`` is the *full* spectrum."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


LEAN_MIN_NUMEL = 2**22
"""Matrices with at least this many entries (and one side at least twice the other) take the QR route of
:func:`svd64` on the CPU."""
_LEAN_RCOND = 1e-3
"""The QR route forms U_k = W V_k Σ_k⁻¹ only where σ_k > this · σ_1 (its error is ≈ ε·σ_1/σ_k)."""


def svd64(w: torch.Tensor, k: int | None = None, *, left: bool = True) -> Factors:
    """Thin SVD of ``w`` in float64; singular vectors truncated to the top ``k`` (the spectrum is kept whole).

    ``left=False`` skips the left singular vectors (``u`` is then m×0). A large tall m×n CPU matrix (m ≥ 2n, at
    least :data:`LEAN_MIN_NUMEL` entries; a wide one is transposed) with ``k`` given is factorised through its QR:
    W = QR, the SVD of the n×n R gives σ and V, and U_k = W V_k Σ_k⁻¹ is formed directly, so neither Q nor the
    m×n U is ever built. LAPACK's ``gesdd`` takes that QR first too (for m ≥ 11n/6), then forms Q and U: skipping
    them takes 1.1 GB instead of 1.9 GB and 10% less time for a 12288×4096 matrix. Where σ_k ≤ 10⁻³·σ_1 the plain
    SVD is taken instead.
    """
    if k is not None and w.ndim == 2 and w.device.type == "cpu":
        m, n = w.shape
        if m * n >= LEAN_MIN_NUMEL and max(m, n) >= 2 * min(m, n):
            f = _svd64_tall(w, k, left) if m >= n else _svd64_tall(w.mT, k, True)  # a wide one's V is Wᵀ's U
            if f is not None:
                f = f if m >= n else Factors(f.vh.mT, f.s, f.u.mT)
                return f if left else f._replace(u=f.u[:, :0])
    u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    if k is not None:
        u, vh = u[..., :k], vh[..., :k, :]
    if not left:
        u = u[..., :0]
    return Factors(u, s, vh)


def _svd64_tall(w: torch.Tensor, k: int, left: bool) -> Factors | None:
    """:func:`svd64` of a tall m×n matrix through its QR; ``None`` where U_k cannot be formed as W V_k Σ_k⁻¹."""
    m, n = w.shape
    k = min(k, n)
    r = torch.linalg.qr(w.to(torch.float64), mode="r").R
    _, s, vh = torch.linalg.svd(r)
    del r
    vh = vh[:k].contiguous()
    if not left:
        return Factors(vh.new_empty(m, 0), s, vh)
    if k and not bool(s[k - 1] > _LEAN_RCOND * s[0]):  # also NaN
        return None
    u = torch.empty(m, k, dtype=torch.float64)
    rows = max(1, 2**20 // n)
    for i in range(0, m, rows):
        torch.mm(w[i : i + rows].to(torch.float64), vh.mT, out=u[i : i + rows])
    return Factors(u.div_(s[:k]), s, vh)


GRAM_RCOND = 1e-4
""":func:`gram_svd` serves only matrices with σ_min > this · σ_1, where its singular values keep an absolute error
below 10⁻¹²·σ_1 (the error of σ_i from the Gram matrix is ≈ ε·σ_1²/σ_i)."""


def gram_svd(w: torch.Tensor, k: int | None = None, *, left: bool = True, right: bool = True) -> Factors:
    """:func:`svd64`'s result from the float64 eigendecomposition of the smaller Gram matrix, wᵀw or wwᵀ.

    The Gram matrix costs one matrix product and its ``eigh`` is 2–3× cheaper than LAPACK's SVD with vectors (and
    cheaper than the singular values alone) at the shapes of transformer weights. The price is the squared
    condition number: σ_i carries an absolute error of about ε·σ_1²/σ_i instead of ε·σ_1, and the vectors
    ε·σ_1²/(σ_i² − σ_{i+1}²) instead of ε·σ_1/(σ_i − σ_{i+1}). So a matrix with σ_min ≤ :data:`GRAM_RCOND`·σ_1 (and any
    batch, or a non-CPU/CUDA device) takes :func:`svd64`; above it every σ_i is within 10⁻¹²·σ_1 and the singular
    subspaces within a few ε·σ_1/gap of the SVD's. The other side's vectors are formed as W·V_k·Σ_k⁻¹ (or WᵀU_k·Σ_k⁻¹).
    ``left=False`` / ``right=False`` leave out U (m×0) / Vᴴ (0×n).
    """
    m, n = w.shape[-2:]
    if w.ndim != 2 or min(m, n) == 0:
        return _drop(svd64(w, k), left, right)
    tall = m >= n
    a = w.to(torch.float64)
    g = a.mT @ a if tall else a @ a.mT
    lam, e = torch.linalg.eigh(g)
    del g
    lam, e = lam.flip(-1), e.flip(-1)
    if not bool(lam[-1] > (GRAM_RCOND**2) * lam[0]):  # also NaN, and a zero matrix
        return _drop(svd64(w, k), left, right)
    s = lam.sqrt()
    k = min(m, n) if k is None else min(k, m, n)
    near = e[:, :k]  # the vectors of the Gram's side: V (tall) or U (wide)
    need_far = left if tall else right
    far = (a @ near if tall else a.mT @ near) / s[:k] if need_far else near.new_empty(max(m, n), 0)
    u, v = (far, near) if tall else (near, far)
    return _drop(Factors(u, s, v.mT), left, right)


def _drop(f: Factors, left: bool, right: bool) -> Factors:
    u = f.u if left else f.u[..., :0]
    vh = f.vh if right else f.vh[..., :0, :]
    return Factors(u, f.s, vh)


def all_finite(a: torch.Tensor) -> bool:
    """No NaN or ±inf in ``a``, without a boolean copy of it (min and max propagate NaN)."""
    if a.numel() == 0:
        return True
    lo, hi = torch.aminmax(a)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


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
    return svd64(w, k, left=False).vh.mT
