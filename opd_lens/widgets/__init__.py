"""anywidget views of an opd_lens Dataset: the :class:`Explorer` and the live :class:`LockMonitor`.

The front end is TypeScript in ``js/``, bundled by esbuild into ``opd_lens/static`` when the package is built.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import OpdLensError

STATIC = Path(__file__).resolve().parent.parent / "static"

if not (STATIC / "explorer.js").is_file():
    raise OpdLensError(
        f"{STATIC}: the widgets' JavaScript bundle is missing; build it with `npm --prefix js install && npm "
        "--prefix js run build` (pip install builds it too)"
    )

from .explorer import Explorer  # noqa: E402
from .monitor import LockMonitor  # noqa: E402

__all__ = ["Explorer", "LockMonitor"]
