"""anywidget views of an opd_lens Dataset: the :class:`Explorer` and the live :class:`LockMonitor`; and
:class:`RetrainJob`, the demo zoo's rank-constrained retraining run from a notebook cell.

The front end is TypeScript in ``js/``, bundled by esbuild into ``opd_lens/static`` when the package is built.
``RetrainJob`` needs ``transformers`` (the ``zoo`` extra), so it loads on first use.
"""

from __future__ import annotations

from .explorer import Explorer
from .monitor import LockMonitor

__all__ = ["Explorer", "LockMonitor", "RetrainJob"]


def __getattr__(name: str):
    if name == "RetrainJob":
        from .job import RetrainJob

        return RetrainJob
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
