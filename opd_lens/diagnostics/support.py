"""bf16-visible update support: which entries a fine-tuning run visibly changed."""

from __future__ import annotations

import math

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
    if eta < _BF16_MIN_RELATIVE_GAP:  # two bool temporaries of the matrix's size, not five
        changed = a != b
        nan = torch.isnan(a)
        if bool(nan.any()):
            changed &= ~(nan & torch.isnan(b))
        return changed
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    af, bf = a.to(torch.float64), b.to(torch.float64)  # float64: no overflow, no float32 rounding
    close = (bf - af).abs() <= eta * torch.maximum(af.abs(), bf.abs())
    finite = torch.isfinite(af) & torch.isfinite(bf)
    return ~torch.where(finite, close, same)


_COUNT_BLOCK = 2**20
"""Entries per block of :func:`count_true`."""


def count_true(mask: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """The number of True entries of ``mask`` (of ``mask & other`` if given) over the last two dimensions, int64.

    Counted a block of entries at a time: ``sum`` and ``count_nonzero`` of a bool tensor first cast all of it to
    int64, 8 bytes an entry, i.e. twice a float32 copy of the matrix.
    """
    shape = mask.shape if other is None else torch.broadcast_shapes(mask.shape, other.shape)
    mask = mask.flatten(-2)
    other = None if other is None else other.flatten(-2)
    step = max(1, _COUNT_BLOCK // max(1, math.prod(shape[:-2])))
    total = torch.zeros(shape[:-2], dtype=torch.int64, device=mask.device)
    for i in range(0, mask.shape[-1], step):
        block = mask[..., i : i + step]
        if other is not None:
            block = block & other[..., i : i + step]
        total += block.sum(-1)
    return total


def unchanged_fraction(w0: torch.Tensor, wt: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """sp_bf16 = 1 − |M_upd| / n over the last two dimensions (per matrix; batch dimensions are kept)."""
    changed = count_true(update_mask(w0, wt, eta))
    return 1.0 - changed.to(torch.float64) / (w0.shape[-2] * w0.shape[-1])
