"""opd_lens: where did my fine-tuning go in parameter space?

Read checkpoint series (:mod:`opd_lens.checkpoints`) and compute per-matrix diagnostics of the update
(:mod:`opd_lens.diagnostics`) for on-policy distillation, SFT and RLVR runs.
"""

from . import checkpoints, diagnostics
from ._version import __version__
from .api import Store, compute, open_store
from .checkpoints import Checkpoint, find_checkpoints, open_checkpoint
from .diagnostics import Settings
from .engine import ComputeReport
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
from .summary import summarize

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


def __getattr__(name: str):
    """The views, the charts and the testing helpers load on first use, so computing needs
    neither the widget stack nor the JS bundle."""
    if name in ("Explorer", "LockMonitor"):
        from . import widgets

        return getattr(widgets, name)
    if name in ("charts", "testing"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
