"""The store's caches: W_0's factors per origin and the V_K bases of every step of a run, as safetensors files.

Both are derived data (deleting ``STORE/cache/`` costs a recompute, never a wrong value) and are keyed so that
they cannot be mistaken for another's: the origin factors by the origin's content fingerprint and the settings,
the bases by run and step. :class:`~opd_lens.store.Store` hands them out (:meth:`~opd_lens.store.Store.origin_cache`,
:meth:`~opd_lens.store.Store.lock_bases`); the engine fills them and ``lock_alignment`` reads the bases back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoints import MatrixRef
from .diagnostics import Factors, OriginFactors, Settings, all_finite, origin_factors, sim_k
from .diagnostics.matrix import keep_angle_sides
from .files import replacing

__all__ = [
    "BASES_MEMO_BYTES",
    "SIM_BATCH_BYTES",
    "LockBases",
    "OriginCache",
    "atomic_save",
    "matrix_key",
    "parse_matrix_key",
    "settings_key",
]

BASES_MEMO_BYTES = 2**28
"""Bytes of V_K bases a store keeps in memory once loaded (256 MiB)."""
SIM_BATCH_BYTES = 2**24
"""Bases stacked into one Sim_K call by :meth:`LockBases.alignment_grid` (16 MiB, besides as many of the anchor)."""


def matrix_key(ref) -> str:
    """``"layer|module"``, the key of a matrix in the caches."""
    return f"{ref.layer}|{ref.module}"


def parse_matrix_key(key: str) -> tuple[int, str]:
    layer, module = key.split("|", 1)
    return int(layer), module


def settings_key(settings: Settings) -> str:
    """A short hash of the settings, part of an origin cache's directory name."""
    return hashlib.sha256(repr(sorted(settings.asdict().items())).encode()).hexdigest()[:12]


def atomic_save(file: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save a safetensors file through a temporary, so a failed write (a full disk) leaves no partial file."""
    with replacing(file) as tmp:
        save_file(dict(tensors), tmp)


class OriginCache:
    """The origin factors (:func:`~opd_lens.diagnostics.origin_factors`) of the matrices of one origin checkpoint
    under one store's settings: computed on first use, then loaded. Masks stay packed; the SVD is loaded only for
    steps that need endpoint metrics."""

    def __init__(self, directory: Path, settings: Settings):
        self.directory = Path(directory)
        self.settings = settings

    def _file(self, ref: MatrixRef) -> Path:
        key = quote(matrix_key(ref), safe="")
        name = key if len(key) <= 200 else hashlib.sha256(matrix_key(ref).encode()).hexdigest()
        return self.directory / f"{name}.safetensors"

    def has(self, ref: MatrixRef) -> bool:
        return self._file(ref).is_file()

    def get(self, ref: MatrixRef, w0: torch.Tensor, with_svd: bool) -> OriginFactors | None:
        """The factors of ``ref`` whose W_0 is ``w0`` (on the device to compute on); ``None`` (and nothing cached)
        when W_0 holds NaN or Inf, which have no SVD. ``with_svd=False`` may leave out the SVD."""
        file = self._file(ref)
        if file.is_file():
            return self._load(file, w0.device, with_svd)
        if not all_finite(w0):
            return None
        of = origin_factors(w0, self.settings)
        f = of.factors
        assert f is not None  # origin_factors factorizes W_0
        atomic_save(
            file,
            {
                "u": f.u.cpu().contiguous(),
                "s": f.s.cpu().contiguous(),
                "vh": f.vh.cpu().contiguous(),
                "principal_mask": of.principal_mask,
                "lowmag_mask": of.lowmag_mask,
                "shape": torch.tensor(list(w0.shape)),
            },
        )
        return of

    def _load(self, file: Path, device: torch.device, with_svd: bool) -> OriginFactors:
        with safe_open(file, framework="pt") as f:
            masks = (f.get_tensor(name) for name in ("principal_mask", "lowmag_mask"))
            svd = None
            if with_svd:
                # a cache of an earlier release holds max(angle_k, mask_rank) vectors on both sides: cut
                svd = Factors(*(f.get_tensor(name).to(device) for name in ("u", "s", "vh")))
                svd = keep_angle_sides(svd, self.settings.angle_k)
            return OriginFactors(svd, *masks)


class LockBases:
    """V_K(t) of every matrix of a run, one safetensors file per step, keyed by :func:`matrix_key`.

    Loaded bases stay in ``memo`` (shared by the store's LockBases) up to :data:`BASES_MEMO_BYTES`, so that a run
    that gains a checkpoint, whose every step's ``lock_alignment`` is then recomputed, does not reopen a file per
    step each time."""

    def __init__(self, directory: Path, memo: dict[Path, dict[str, torch.Tensor]] | None = None):
        self.directory = Path(directory)
        self._memo = {} if memo is None else memo

    def _file(self, step: int) -> Path:
        return self.directory / f"bases-{step}.safetensors"

    def has(self, step: int) -> bool:
        return self._file(step).is_file()

    def save(self, step: int, bases: dict[str, torch.Tensor]) -> None:
        file = self._file(step)
        self._memo.pop(file, None)
        atomic_save(file, {k: v.contiguous() for k, v in bases.items()})

    def load(self, step: int) -> dict[str, torch.Tensor]:
        file = self._file(step)
        if (hit := self._memo.get(file)) is not None:
            return hit
        bases = load_file(file)
        size = sum(t.numel() * t.element_size() for t in bases.values())
        held = sum(t.numel() * t.element_size() for b in self._memo.values() for t in b.values())
        while self._memo and held + size > BASES_MEMO_BYTES:
            oldest = next(iter(self._memo))
            held -= sum(t.numel() * t.element_size() for t in self._memo.pop(oldest).values())
        if size <= BASES_MEMO_BYTES:
            self._memo[file] = bases
        return bases

    def alignment_grid(
        self,
        steps: Iterable[int],
        anchor: Mapping[str, torch.Tensor],
        layers: Mapping[int, int],
        modules: Mapping[str, int],
    ) -> np.ndarray:
        """Sim_K of V_K(t) to the bases ``anchor`` (matrix key -> V_K) for each of ``steps``, as a float32 (step,
        layer, module) grid indexed by ``layers`` and ``modules``; NaN where a matrix is not in both or its shape
        differs (LoRA steps of other ranks share no K). Bases of matrices that the grid does not index are left
        out. Batched per shape across steps, :data:`SIM_BATCH_BYTES` of bases per call, so that a long run costs a
        few calls rather than one per step and matrix."""
        steps = list(steps)
        grid = np.full((len(steps), len(layers), len(modules)), np.nan, np.float32)
        where = {}  # matrix key -> (layer, module) index in the grid
        for k in anchor:
            layer, module = parse_matrix_key(k)
            if layer in layers and module in modules:
                where[k] = layers[layer], modules[module]
        batches: dict[tuple[int, ...], list[tuple[int, str, torch.Tensor]]] = {}

        def flush(batch: list[tuple[int, str, torch.Tensor]]) -> None:
            sims = sim_k(torch.stack([b for *_, b in batch]), torch.stack([anchor[k] for _, k, _ in batch]))
            for (i, k, _), sim in zip(batch, sims.tolist(), strict=True):
                grid[(i,) + where[k]] = sim  # not [(i, *where[k])]: mypy takes it for 3.11-only syntax
            batch.clear()

        for i, step in enumerate(steps):
            for k, b in self.load(step).items():
                if k in where and anchor[k].shape == b.shape:
                    batch = batches.setdefault(tuple(b.shape), [])
                    batch.append((i, k, b))
                    if len(batch) * b.numel() * b.element_size() >= SIM_BATCH_BYTES:
                        flush(batch)
        for batch in batches.values():
            if batch:
                flush(batch)
        return grid
