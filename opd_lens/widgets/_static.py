"""Where the widgets' JavaScript and CSS bundle lies (``js/`` built by esbuild), checked once on import."""

from __future__ import annotations

from pathlib import Path

from ..errors import OpdLensError

STATIC = Path(__file__).resolve().parent.parent / "static"

if not (STATIC / "explorer.js").is_file():
    raise OpdLensError(
        f"{STATIC}: the widgets' JavaScript bundle is missing; build it with `npm --prefix js install && npm "
        "--prefix js run build` (pip install builds it too)"
    )
