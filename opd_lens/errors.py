"""Exception and warning types. Every user-facing error is an :class:`OpdLensError` whose message names the file
(and tensor) at fault; the CLI prints it as one line and exits with status 2."""

from __future__ import annotations

import os

__all__ = [
    "OpdLensError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "ShapeMismatchError",
    "UnsupportedTensorError",
    "CheckpointWarning",
    "SettingsWarning",
    "StepError",
    "StoreError",
    "StoreLockedError",
    "ChartError",
    "SubspaceError",
    "ZooError",
]


class OpdLensError(Exception):
    """Base class of the errors opd_lens reports to users (bad input, not a bug)."""


class CheckpointError(OpdLensError):
    """A checkpoint or run directory cannot be read as asked."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory does not exist or holds no checkpoint opd_lens can read."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file or shard index is truncated, garbled, missing or inconsistent."""


class ShapeMismatchError(CheckpointError, ValueError):
    """The same tensor has different shapes in the origin and a checkpoint."""


class UnsupportedTensorError(CheckpointError, TypeError):
    """A tensor's dtype or layout cannot be analysed (e.g. int8 or fp8 weights)."""


class StepError(CheckpointError):
    """A checkpoint (not the origin) could not be read: its step is skipped, the others go on."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or looks inconsistent; the message names it and says why. ``path``: the checkpoint
    (or file) it is about, when known."""

    def __init__(self, message: str = "", path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = path


class SettingsWarning(UserWarning):
    """Some matrices of a run are too small for a setting (``angle_k``, ``mask_rank``, ``lock_k``): the values it
    governs are NaN for them, since they would be fixed by construction rather than measured."""


class StoreError(OpdLensError):
    """The store cannot be opened or written as asked."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class ChartError(OpdLensError, ValueError):
    """A chart was asked for something the Dataset or table does not hold."""


class ZooError(OpdLensError):
    """The output directory cannot hold the zoo asked for, or a part of it failed to train."""


class SubspaceError(OpdLensError, ValueError):
    """A subspace file cannot be read, or subspaces do not fit the model they are bound to."""
