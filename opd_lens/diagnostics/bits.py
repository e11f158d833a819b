"""Boolean masks packed eight entries to a byte, and the counts the overlaps need, by popcount.

A packed mask is a 1-D ``torch.uint8`` tensor on the CPU: the row-major entries of an m×n boolean matrix, most
significant bit first (``numpy.packbits``), the last byte padded with zeros. At 1/8 of a bool mask it is what the
store caches for W_0's masks and what an overlap reads: |M ∩ M_upd| is the popcount of a bitwise AND, so the masks
are never unpacked.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["pack", "unpack", "count", "count_and"]

_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """The packed bits of a boolean matrix (any device), on the CPU."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy()))
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    octets = flat.view(-1, 8).to(torch.uint8) * _WEIGHTS.to(flat.device)
    return octets.sum(dim=1, dtype=torch.uint8).cpu()


def unpack(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean matrix of ``shape`` that :func:`pack` packed into ``bits``."""
    flat = np.unpackbits(bits.numpy(), count=math.prod(shape))  # 0/1 bytes: viewed as bool, not copied
    return torch.from_numpy(flat.view(np.bool_).reshape(shape))


def count(bits: torch.Tensor) -> int:
    """The number of set bits."""
    return int(np.bitwise_count(bits.numpy()).sum(dtype=np.int64))


def count_and(a: torch.Tensor, b: torch.Tensor) -> int:
    """The number of bits set in both ``a`` and ``b`` (|A ∩ B| for two packed masks of one shape)."""
    if a.shape != b.shape:
        raise ValueError(f"packed masks of different sizes: {tuple(a.shape)} and {tuple(b.shape)}")
    return int(np.bitwise_count(np.bitwise_and(a.numpy(), b.numpy())).sum(dtype=np.int64))
