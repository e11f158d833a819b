"""The widget runtime that offline pages carry instead of loading it from a CDN: RequireJS, anywidget's front end
(as a named AMD module) and the standalone widget manager (``@jupyter-widgets/html-manager``'s ``embed-amd.js``).
Reports (:mod:`opd_lens.report`), the nbconvert exporter (:mod:`opd_lens.nbconvert`) and the documentation use it.
It imports nothing heavy: every ``jupyter nbconvert`` loads the exporter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import OpdLensError

__all__ = ["offline_runtime", "widget_runtime"]

_VENDOR = Path(__file__).resolve().parent / "static" / "vendor"
_ANONYMOUS = 'define(["@jupyter-widgets/base"]'


def widget_runtime() -> dict[str, str]:
    """The scripts, by file name in load order: RequireJS, anywidget (named ``"anywidget"``), the widget manager."""
    spec = importlib.util.find_spec("anywidget")
    anywidget = Path(spec.origin).parent / "nbextension" / "index.js" if spec and spec.origin else Path("anywidget")
    missing = [p for p in (_VENDOR / "require.js", _VENDOR / "embed-amd.js", anywidget) if not p.is_file()]
    if missing:
        raise OpdLensError(f"{missing[0]}: missing; rebuild the JS bundle (`npm --prefix js run build`)")
    anywidget_js = anywidget.read_text(encoding="utf-8")
    if _ANONYMOUS not in anywidget_js:
        raise OpdLensError(f"{anywidget}: unexpected anywidget front end (no AMD define); cannot inline it")
    return {
        "require.js": (_VENDOR / "require.js").read_text(encoding="utf-8"),
        "anywidget.js": anywidget_js.replace(_ANONYMOUS, 'define("anywidget", ["@jupyter-widgets/base"]'),
        "embed-amd.js": (_VENDOR / "embed-amd.js").read_text(encoding="utf-8"),
    }


def offline_runtime() -> tuple[str, str]:
    """:func:`widget_runtime` as inline ``<script>`` elements: RequireJS; and what widgets need on top of it."""
    require, *widgets = (_script(s) for s in widget_runtime().values())
    return require, "\n".join(widgets)


def _script(source: str) -> str:
    """``source`` as an inline <script> element."""
    if "</script" in source.lower():
        raise OpdLensError("an inlined script contains '</script'; it cannot be embedded safely")
    return f"<script>{source}</script>"
