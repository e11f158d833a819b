"""Self-contained offline HTML: widgets (with their state and data) and charts in ONE file that needs no network.

The page inlines the widget runtime of :mod:`opd_lens.offline` (RequireJS, anywidget, the widget manager) instead
of loading it from a CDN, so it renders from ``file://`` with every network request blocked. Widgets stay
interactive (their views run in the page); only what needs a kernel, such as Python seeing a new selection, is gone.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable
from pathlib import Path

import ipywidgets
import pandas as pd
from ipywidgets.embed import dependency_state, embed_data

from .errors import ChartError
from .files import replacing
from .offline import offline_runtime
from .store import Store
from .summary import Summary

__all__ = ["export_html", "store_report"]

_VIEW = "application/vnd.jupyter.widget-view+json"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; }} .opd-item {{ margin: 0 0 28px; }}
table.dataframe {{ border-collapse: collapse; font-size: 13px; }}
.dataframe th, .dataframe td {{ padding: 3px 8px; border: 0; border-bottom: 1px solid #ddd; text-align: right; }}
.opd-summary-legend {{ font-size: 12px; color: #444; padding-left: 18px; }}
</style>
{scripts}
<script type="application/vnd.jupyter.widget-state+json">{state}</script>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


def export_html(items: Iterable, path: str | os.PathLike, *, title: str = "opd_lens report") -> Path:
    """Write ``items`` — widgets (Explorer, LockMonitor, any ipywidget), altair charts (as inline SVG), strings
    (as paragraphs of text), a :class:`~opd_lens.summary.Summary` (its table and legend) and pandas tables — into
    one self-contained HTML file at ``path`` and return its path."""
    items = list(items)
    widgets = [w for w in items if isinstance(w, ipywidgets.Widget)]
    state = dependency_state(widgets, drop_defaults=False) if widgets else {}
    data = embed_data(views=widgets, drop_defaults=False, state=state) if widgets else None
    views = iter(data["view_specs"] if data else [])
    body = []
    for item in items:
        if isinstance(item, ipywidgets.Widget):
            spec = _script_json(next(views))
            body.append(f'<div class="opd-item"><script type="{_VIEW}">{spec}</script></div>')
        elif isinstance(item, str):
            body.append(f'<p class="opd-item">{html.escape(item)}</p>')
        elif isinstance(item, Summary):
            body.append(f'<div class="opd-item">{item.html()}</div>')
        elif isinstance(item, pd.DataFrame):
            body.append(f'<div class="opd-item">{item.to_html(float_format=lambda x: f"{x:.4g}", escape=True)}</div>')
        elif hasattr(item, "to_dict") and hasattr(item, "save"):  # an altair chart
            body.append(f'<div class="opd-item">{_svg(item)}</div>')
        else:
            raise TypeError(
                f"export_html: cannot show a {type(item).__name__}; "
                "pass widgets, altair charts, summaries, tables or text"
            )
    page = _PAGE.format(
        title=html.escape(title),
        scripts="\n".join(offline_runtime()) if widgets else "",
        state=_script_json(data["manager_state"] if data else {}),
        body="\n".join(body),
    )
    path = Path(path)
    with replacing(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def store_report(store: Store, path: str | os.PathLike, *, title: str = "opd_lens report") -> Path:
    """The standard report of a store: the paper-style table, the Explorer, and the regime, trajectory and overlap
    charts."""
    from . import charts
    from .widgets import Explorer

    ds = store.dataset()
    items = [
        f"{store.path}: {ds.sizes['run']} run(s), {ds.sizes['layer']} layer(s) x {ds.sizes['module']} module(s).",
        Summary.of(ds),
        "The Explorer: pick a metric and a module; each heatmap is one run's layers × checkpoints, a click shows "
        'that matrix\'s history, mask overlaps and principal angles below. Under "channels across runs", each '
        "run's Sim_K to another run's final channel: do runs from one origin use the same directions?",
        Explorer(store, metric="unchanged_frac"),
        "Update regimes: how much of each run's weights moved at all (unchanged %), and how far its top singular "
        "subspaces and spectrum turned. The paper: OPD leaves about half of the bf16 weights unchanged and rotates "
        "about 1°, SFT rotates more than 10°, RLVR less than 0.5°.",
        charts.regimes(ds),
        "Stable rank of ΔW over training: how many directions the update effectively spreads over (low: a narrow "
        "channel).",
        charts.trajectory(ds, "stable_rank"),
        "Sim_K to the final channel: how much of each checkpoint's top-K update directions already lie in the "
        "run's final ones; a run that locks early reaches 1 long before its last step.",
        charts.trajectory(ds, "lock_alignment"),
        "Where the visible updates land: the share inside W₀'s principal and low-magnitude masks; the dashed line "
        "is what random positions would give (α).",
        charts.overlaps(ds),
    ]
    try:
        return export_html(items, path, title=title)
    except ChartError as e:
        raise ChartError(f"{store.path}: {e}") from None


def _svg(chart) -> str:
    """An altair chart as inline SVG."""
    import vl_convert as vlc

    spec = chart.to_json()
    try:
        return vlc.vegalite_to_svg(spec)
    except ValueError as e:  # e.g. a name with U+2028 in an expression that Vega-Lite compiles (a custom sort)
        title = json.loads(spec).get("title", "")
        title = title.get("text", "") if isinstance(title, dict) else title
        reason = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ChartError(f"Vega-Lite cannot draw the chart {title!r} ({reason})") from None


def _script_json(value) -> str:
    """JSON safe inside a <script> element: no ``<`` at all, so neither ``</script>`` nor ``<!--<script>`` (which
    would make the element run on past its end tag) can occur in it."""
    return json.dumps(value).replace("<", "\\u003c")
