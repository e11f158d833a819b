"""bf16-visible update support: which entries a fine-tuning run visibly changed."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .bits import count, pack

__all__ = ["ETA", "UpdatePass", "update_mask", "unchanged_fraction", "update_pass"]

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


class UpdatePass(NamedTuple):
    """What one pass over a pair (W_0, W_t) gives: the update, its norm and its bf16-visible support."""

    delta: torch.Tensor
    """ΔW = W_t − W_0: the exact difference rounded once to ``dtype`` (float32 by default)."""
    fro: float
    """‖ΔW‖_F, accumulated in float64 (see :func:`update_pass` for what it is the norm of)."""
    changed: torch.Tensor
    """M_upd, packed (:mod:`~opd_lens.diagnostics.bits`, on the CPU)."""
    n_changed: int
    """|M_upd|."""
    sketch: torch.Tensor | None = None
    """ΔW·Ω for the ``probe`` Ω passed to :func:`update_pass` (``None`` without one)."""


_PASS_BLOCK = 2**18
"""Entries per block of :func:`update_pass` (its scratch: 1 MiB in float32, 2 MiB in float64). Large enough that a
matrix takes a few dozen short calls, each releasing the GIL, so that matrices computed side by side by threads
wait little on each other between them: measured on this project's CPU, blocks of 2¹⁶ entries took 1.5× as long
there, and no longer alone."""


def update_pass(
    w0: torch.Tensor,
    wt: torch.Tensor,
    eta: float = ETA,
    dtype: torch.dtype = torch.float32,
    probe: torch.Tensor | None = None,
) -> UpdatePass:
    """ΔW, ‖ΔW‖_F and M_upd of one matrix pair in a single pass, a block of rows at a time, and ΔW·``probe`` (an
    n×b matrix of ``dtype``, e.g. the start block of a Krylov method) from each block while it is in cache.

    For bf16 inputs, η < 2⁻⁸ (the default) and a float32 ``dtype`` (the fast path), each block's difference is
    formed in float32, which rounds the exact difference once (IEEE subtraction of exact operands); it is exact
    unless an entry's two values differ in binary exponent by more than 16, and ‖ΔW‖_F is its norm summed in
    float64, within 2⁻²⁴ relative of the exact one. An entry changed iff its difference is nonzero: distinct
    finite bf16 values always differ (by at least 2⁻¹³³, a float32 subnormal), and +0 − (−0) = 0, which is
    :func:`update_mask`'s rule without comparing the operands again. Otherwise the difference is formed exactly in
    float64 and summed in squares there, then rounded once to ``dtype``, and the mask is :func:`update_mask`'s.
    A pair with a NaN or Inf entry, or whose float32 difference overflows, takes the float64 route too.
    """
    if w0.shape != wt.shape or w0.ndim != 2:
        raise ValueError(f"expected two matrices of one shape, got {tuple(w0.shape)} and {tuple(wt.shape)}")
    bitwise = w0.dtype == wt.dtype == torch.bfloat16 and eta < _BF16_MIN_RELATIVE_GAP
    if bitwise and dtype == torch.float32:
        delta, fro2, changed, sketch = _float32_pass(w0, wt, probe)
        if math.isfinite(fro2):
            bits = pack(changed)
            return UpdatePass(delta, math.sqrt(fro2), bits, count(bits), sketch)
        del delta, changed, sketch
    p = _float64_pass(w0, wt, eta, dtype, bitwise)
    return p if probe is None else p._replace(sketch=p.delta @ probe)


def _blocks(w0: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ΔW of ``dtype`` and M_upd, allocated, and the rows of one block."""
    m, n = w0.shape
    delta = torch.empty((m, n), dtype=dtype, device=w0.device)
    changed = torch.empty((m, n), dtype=torch.bool, device=w0.device)
    return delta, changed, max(1, _PASS_BLOCK // max(1, n))


def _float32_pass(w0: torch.Tensor, wt: torch.Tensor, probe: torch.Tensor | None):
    m, n = w0.shape
    delta, changed, rows = _blocks(w0, torch.float32)
    operand = torch.empty(min(rows, m) * n, dtype=torch.float32, device=w0.device)
    d64 = torch.empty(min(rows, m) * n, dtype=torch.float64, device=w0.device)
    sketch = None if probe is None else torch.empty(m, probe.shape[1], dtype=torch.float32, device=w0.device)
    fro2 = torch.zeros((), dtype=torch.float64, device=w0.device)
    cpu = w0.device.type == "cpu"
    for i in range(0, m, rows):
        d = delta[i : i + rows]
        w = operand[: d.numel()].view_as(d)
        d.copy_(wt[i : i + rows])
        w.copy_(w0[i : i + rows])
        d.sub_(w)  # float32 − float32: faster than a mixed bf16 operand
        if cpu:  # numpy's comparison is 15× torch's here
            np.not_equal(d.numpy(), 0, out=changed[i : i + rows].numpy())
        else:
            torch.ne(d, 0, out=changed[i : i + rows])
        s = d64[: d.numel()]
        s.copy_(d.view(-1))  # squares summed in float64: exact products, no float32 accumulation
        fro2 += torch.dot(s, s)
        if probe is not None and sketch is not None:  # both or neither
            torch.mm(d, probe, out=sketch[i : i + rows])
    return delta, float(fro2), changed, sketch


def _float64_pass(w0, wt, eta: float, dtype: torch.dtype, bitwise: bool) -> UpdatePass:
    m, n = w0.shape
    delta, changed, rows = _blocks(w0, dtype)
    scratch = torch.empty(min(rows, m) * n, dtype=torch.float64, device=w0.device)
    fro2 = torch.zeros((), dtype=torch.float64, device=w0.device)
    for i in range(0, m, rows):
        d64 = scratch[: min(rows, m - i) * n].view(-1, n)
        d64.copy_(wt[i : i + rows])
        d64.sub_(w0[i : i + rows])
        fro2 += torch.dot(d64.view(-1), d64.view(-1))
        d = delta[i : i + rows]
        d.copy_(d64)
        if bitwise:
            torch.ne(d, 0, out=changed[i : i + rows])
        else:
            changed[i : i + rows] = update_mask(w0[i : i + rows], wt[i : i + rows], eta)
    squares = float(fro2)
    if bitwise and not math.isfinite(squares):  # a NaN or Inf entry: compare it by the rules of update_mask
        changed = update_mask(w0, wt, eta)
    bits = pack(changed)
    return UpdatePass(delta, math.sqrt(squares) if squares >= 0 else math.nan, bits, count(bits))
