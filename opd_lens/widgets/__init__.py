"""anywidget views of an opd_lens Dataset: the :class:`Explorer` and the live :class:`LockMonitor`.

The front end is TypeScript in ``js/``, bundled by esbuild into ``opd_lens/static`` when the package is built.
"""

from __future__ import annotations

from .explorer import Explorer
from .monitor import LockMonitor

__all__ = ["Explorer", "LockMonitor"]
