"""The plain float64 numpy scripts the benchmarks compare opd_lens against: what a researcher writes for one pair.

Each takes W_0 and W_t as float32 numpy arrays (exact copies of bf16 weights) and the diagnostics' settings, and
computes with full ``np.linalg.svd`` calls and no caching; the values follow ``../shared/reference/diagnostics.md``
(ties at a mask's quantile are all kept, where opd_lens keeps exactly ⌈α·mn⌉).
"""

from __future__ import annotations

import numpy as np

from opd_lens.diagnostics import Settings


def trajectory(w0: np.ndarray, wt: np.ndarray, s: Settings) -> dict:
    """Trajectory metrics: ΔW's full SVD for stable rank, Hill α and V_K; unchanged fraction and ‖ΔW‖_F."""
    dw = wt.astype(np.float64) - w0.astype(np.float64)
    _, sv, vh = np.linalg.svd(dw, full_matrices=False)
    return {**_update(dw, sv, s), "v_k": vh[: s.lock_k].T}


def pair(w0: np.ndarray, wt: np.ndarray, s: Settings) -> dict:
    """Every metric of one pair: full SVDs of W_0, W_t and ΔW, the two masks and their overlaps with M_upd, the
    principal angles of the top-k singular subspaces and the spectral shift."""
    a0, at = w0.astype(np.float64), wt.astype(np.float64)
    u0, s0, vh0 = np.linalg.svd(a0, full_matrices=False)
    ut, st, vht = np.linalg.svd(at, full_matrices=False)
    dw = at - a0
    out = _update(dw, np.linalg.svd(dw, compute_uv=False), s)
    k, r = min(s.angle_k, *a0.shape), min(s.mask_rank, *a0.shape)
    for side, x, y in (("u", u0[:, :k], ut[:, :k]), ("v", vh0[:k].T, vht[:k].T)):
        cos = np.linalg.svd(x.T @ y, compute_uv=False).clip(max=1.0)
        out[f"max_angle_{side}"] = float(np.degrees(np.arccos(cos)).max())
    out["spectral_shift"] = float(np.linalg.norm(st - s0) / np.linalg.norm(s0))
    changed = dw != 0  # bf16 inputs, η < 2⁻⁸: an entry changed iff it differs
    rank_r = np.abs((u0[:, :r] * s0[:r]) @ vh0[:r])
    principal = rank_r >= np.quantile(rank_r, 1 - s.mask_alpha)
    lowmag = np.abs(a0) <= np.quantile(np.abs(a0), s.mask_alpha)
    n = max(int(changed.sum()), 1)
    out["principal_overlap"] = float((principal & changed).sum() / n)
    out["lowmag_overlap"] = float((lowmag & changed).sum() / n)
    return out


def _update(dw: np.ndarray, sv: np.ndarray, s: Settings) -> dict:
    k = min(s.hill_k, sv.size)
    return {
        "unchanged_frac": float((dw == 0).mean()),
        "update_fro": float(np.linalg.norm(dw)),
        "stable_rank": float((sv**2).sum() / sv[0] ** 2),
        "hill_alpha": float((k - 1) / np.log(sv[: k - 1] / sv[k - 1]).sum()),
    }
