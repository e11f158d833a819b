"""opd_lens: where did my fine-tuning go in parameter space?

Read checkpoint series (:mod:`opd_lens.checkpoints`) and compute per-matrix diagnostics of the update
(:mod:`opd_lens.diagnostics`) for on-policy distillation, SFT and RLVR runs.

Everything but the version and the exceptions loads on first use, so ``import opd_lens`` is cheap (no torch): the
nbconvert exporter that every ``jupyter nbconvert`` loads, for one, needs none of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import (
    ChartError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    OpdLensError,
    SettingsWarning,
    ShapeMismatchError,
    StepError,
    StoreError,
    StoreLockedError,
    SubspaceError,
    UnsupportedTensorError,
    ZooError,
)

if TYPE_CHECKING:
    from . import charts, checkpoints, diagnostics, testing
    from .api import Store, compute, open_store
    from .checkpoints import Checkpoint, find_checkpoints, open_checkpoint
    from .diagnostics import Settings
    from .engine import ComputeReport
    from .summary import summarize
    from .widgets import Explorer, LockMonitor

__all__ = [
    "ChartError",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "SettingsWarning",
    "ComputeReport",
    "CorruptCheckpointError",
    "Explorer",
    "LockMonitor",
    "OpdLensError",
    "Settings",
    "ShapeMismatchError",
    "StepError",
    "Store",
    "StoreError",
    "StoreLockedError",
    "SubspaceError",
    "UnsupportedTensorError",
    "ZooError",
    "__version__",
    "charts",
    "checkpoints",
    "compute",
    "diagnostics",
    "find_checkpoints",
    "open_checkpoint",
    "open_store",
    "summarize",
    "testing",
]

_LAZY = {
    "Store": "api",
    "compute": "api",
    "open_store": "api",
    "Checkpoint": "checkpoints",
    "find_checkpoints": "checkpoints",
    "open_checkpoint": "checkpoints",
    "Settings": "diagnostics",
    "ComputeReport": "engine",
    "summarize": "summary",
    "Explorer": "widgets",
    "LockMonitor": "widgets",
}
"""Exported name -> the module (of this package) it comes from."""
_SUBMODULES = ("charts", "checkpoints", "diagnostics", "testing")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
