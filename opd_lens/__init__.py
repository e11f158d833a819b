"""opd_lens: where did my fine-tuning go in parameter space?

Read checkpoint series (:mod:`opd_lens.checkpoints`) and compute per-matrix diagnostics of the update
(:mod:`opd_lens.diagnostics`) for on-policy distillation, SFT and RLVR runs.
"""

__version__ = "0.1.0"

from . import diagnostics

__all__ = ["diagnostics", "__version__"]
