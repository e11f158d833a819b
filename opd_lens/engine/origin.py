"""W_0's once-per-run work, cached next to the store: one safetensors file per matrix, shared by every run that
starts from the same origin with the same settings."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import quote

import torch
from safetensors import safe_open

from ..checkpoints import Checkpoint, MatrixRef
from ..diagnostics import Factors, OriginFactors, Settings, all_finite, origin_factors
from ..diagnostics.matrix import keep_angle_sides
from ..store import Store, atomic_save, matrix_key

__all__ = ["OriginCache"]


class OriginCache:
    """The origin factors (:func:`~opd_lens.diagnostics.origin_factors`) of the matrices of one origin checkpoint
    under one store's settings: computed on first use, then loaded. Masks stay packed; the SVD is loaded only for
    steps that need endpoint metrics."""

    def __init__(self, directory: Path, settings: Settings):
        self.directory = Path(directory)
        self.settings = settings

    @classmethod
    def of(cls, store: Store, origin: Checkpoint) -> OriginCache:
        """The cache of ``origin`` under ``store``'s settings."""
        return cls(
            store.cache_dir("origin", f"{origin.fingerprint[:16]}-{settings_key(store.settings)}"), store.settings
        )

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


def settings_key(settings: Settings) -> str:
    return hashlib.sha256(repr(sorted(settings.asdict().items())).encode()).hexdigest()[:12]
