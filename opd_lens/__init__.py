"""opd_lens: where did my fine-tuning go in parameter space?

Read checkpoint series (:mod:`opd_lens.checkpoints`) and compute per-matrix diagnostics of the update
(:mod:`opd_lens.diagnostics`) for on-policy distillation, SFT and RLVR runs.
"""

from . import checkpoints, diagnostics
from ._version import __version__
from .api import Store, compute, open_store
from .checkpoints import Checkpoint, find_checkpoints, open_checkpoint
from .engine import ComputeReport
from .errors import OpdLensError
from .summary import summarize

__all__ = [
    "Checkpoint",
    "ComputeReport",
    "Explorer",
    "LockMonitor",
    "OpdLensError",
    "Store",
    "__version__",
    "charts",
    "checkpoints",
    "compute",
    "diagnostics",
    "find_checkpoints",
    "open_checkpoint",
    "open_store",
    "summarize",
]


def __getattr__(name: str):
    """The views load on first use, so computing needs neither the widget stack nor the JS bundle."""
    if name in ("Explorer", "LockMonitor"):
        from . import widgets

        return getattr(widgets, name)
    if name == "charts":
        import importlib

        return importlib.import_module(".charts", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
