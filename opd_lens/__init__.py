"""opd_lens: where did my fine-tuning go in parameter space?

Read checkpoint series (:mod:`opd_lens.checkpoints`) and compute per-matrix diagnostics of the update
(:mod:`opd_lens.diagnostics`) for on-policy distillation, SFT and RLVR runs.
"""

__version__ = "0.1.0"

from . import checkpoints, diagnostics
from .checkpoints import Checkpoint, find_checkpoints, open_checkpoint
from .errors import OpdLensError
from .store import Store, compute, open_store
from .summary import summarize

__all__ = [
    "Checkpoint",
    "OpdLensError",
    "Store",
    "__version__",
    "checkpoints",
    "compute",
    "diagnostics",
    "find_checkpoints",
    "open_checkpoint",
    "open_store",
    "summarize",
]
