"""bf16-visible update support: which entries a fine-tuning run visibly changed."""

from __future__ import annotations

import torch

__all__ = ["ETA", "update_mask", "unchanged_fraction"]

ETA = 1e-3
"""Default relative tolerance η of the "unchanged" test (PNT Def. 2.1–2.2; OPD App. C.3)."""

_BF16_MIN_RELATIVE_GAP = 2.0**-8
"""Distinct bf16 values differ relatively by at least 2⁻⁸ (normal, subnormal, zero or opposite sign alike)."""


def update_mask(w0: torch.Tensor, wt: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """M_upd: True where an entry visibly changed, ``bf16(wt) ≉_η bf16(w0)``.

    Both tensors are rounded to bf16 first (a bf16 input is unchanged by that; torch rounds float64 through
    float32). An entry is unchanged iff
    ``|ŵ − w| ≤ η · max(|w|, |ŵ|)``. For η < 2⁻⁸ (the default 1e-3 included) that is exactly bf16 equality, so the
    test runs as a bit comparison: +0 and −0 are equal, 0 → nonzero is a change. Non-finite entries are compared
    explicitly: NaN against NaN (and ±inf against the same inf) counts as unchanged, NaN against a number as changed.
    """
    if w0.shape != wt.shape:
        raise ValueError(f"shape mismatch: {tuple(w0.shape)} vs {tuple(wt.shape)}")
    a, b = w0.to(torch.bfloat16), wt.to(torch.bfloat16)
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if eta < _BF16_MIN_RELATIVE_GAP:
        return ~same
    af, bf = a.to(torch.float64), b.to(torch.float64)  # float64: no overflow, no float32 rounding
    close = (bf - af).abs() <= eta * torch.maximum(af.abs(), bf.abs())
    finite = torch.isfinite(af) & torch.isfinite(bf)
    return ~torch.where(finite, close, same)


def unchanged_fraction(w0: torch.Tensor, wt: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """sp_bf16 = 1 − |M_upd| / n over the last two dimensions (per matrix; batch dimensions are kept)."""
    changed = update_mask(w0, wt, eta).sum(dim=(-2, -1), dtype=torch.int64)
    return 1.0 - changed.to(torch.float64) / (w0.shape[-2] * w0.shape[-1])
