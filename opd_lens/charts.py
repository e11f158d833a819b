"""Altair chart builders for the opd_lens Dataset.

Each builder aggregates in xarray/pandas first and hands altair a small table (one row per run, step or angle), so
charts stay far below altair's 5000-row limit, embed in notebooks and reports, and export with
``chart.save("x.png" | "x.svg")`` through vl-convert. Runs keep their Dataset order and their colour
(:func:`run_colors`) in every chart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import altair as alt
import numpy as np
import pandas as pd
import xarray as xr

from .errors import ChartError
from .schema import VARIABLES
from .summary import summarize

__all__ = [
    "ChartError",
    "run_colors",
    "trajectory",
    "regimes",
    "overlaps",
    "angle_profiles",
    "constrained_accuracy",
    "channel_overlap",
    "enable_offline",
]

PALETTE = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac")
"""Vega's tableau10, assigned to runs in order (the widgets use the same list: js/src/scale.ts)."""

MAX_BANDS = 3
"""Most runs whose min–max bands :func:`trajectory` draws by default."""

_MATRIX = ("layer", "module")
_WIDTH = 300
_LINE_LEGEND = alt.Legend(symbolType="stroke", symbolStrokeColor="gray", symbolStrokeWidth=2)
_PROGRESS = alt.X("progress:Q", title="training progress (step / last step)", axis=alt.Axis(format="%"))


def run_colors(runs: xr.Dataset | Iterable[str]) -> dict[str, str]:
    """Run name -> colour, in the order of the Dataset's ``run`` coordinate (or of the names given)."""
    names = runs.run.values if isinstance(runs, xr.Dataset) else runs
    return {str(name): PALETTE[i % len(PALETTE)] for i, name in enumerate(dict.fromkeys(map(str, names)))}


def trajectory(
    ds: xr.Dataset,
    metric: str = "stable_rank",
    *,
    module: str | Sequence[str] | None = None,
    layer: int | Sequence[int] | None = None,
    runs: Sequence[str] | None = None,
    bands: bool | None = None,
) -> alt.LayerChart:
    """``metric`` against training progress per run: the mean over matrices as a line, their min–max as a band.

    ``module`` and ``layer`` restrict the matrices, ``runs`` the runs; only the steps a run has are drawn.
    ``bands``: draw the min–max bands (default: when at most :data:`MAX_BANDS` runs are shown, since more overlap
    into an unreadable wash; the tooltip gives every run's min and max either way).
    """
    metrics = [name for name, da in ds.data_vars.items() if da.dims == ("run", "step", *_MATRIX)]
    _check("metric", [metric], metrics)
    shown = _select(ds, runs=runs, layer=layer, module=module)
    da = shown[metric]
    stats = xr.Dataset(
        {
            "mean": da.mean(_MATRIX),
            "min": da.min(_MATRIX),
            "max": da.max(_MATRIX),
            "matrices": da.notnull().sum(_MATRIX),
        }
    )
    df = (
        stats.to_dataframe()
        .reset_index()
        .dropna(subset=["progress", "mean"])[["run", "method", "step", "progress", *stats]]
    )
    label = VARIABLES[metric].title if metric in VARIABLES else metric
    where = ", ".join(f"{k} {v}" for k, v in {"module": module, "layer": layer}.items() if v is not None)
    base = alt.Chart(df).encode(x=_PROGRESS, color=_color(ds, shown.run.values))
    bands = len(shown.run) <= MAX_BANDS if bands is None else bands
    line = base.mark_line(point=True).encode(
        y=alt.Y("mean:Q", title=label),
        tooltip=[
            "run:N",
            "method:N",
            "step:Q",
            alt.Tooltip("progress:Q", format=".0%"),
            alt.Tooltip("mean:Q", format=".4g"),
            alt.Tooltip("min:Q", format=".4g"),
            alt.Tooltip("max:Q", format=".4g"),
            "matrices:Q",
        ],
    )
    spread = "min–max (band)" if bands else f"min–max in the tooltip (bands drawn for ≤ {MAX_BANDS} runs)"
    subtitle = f"mean over matrices (line), {spread}{'; ' + where if where else ''}"
    layers = [base.mark_area(opacity=0.2).encode(y="min:Q", y2="max:Q"), line] if bands else [line]
    # alt.LayerChart itself, as alt.layer makes it: alt.layer is typed to return a FacetChart too (for layers that
    # share a facet encoding, which altair 6 hoists), and no chart here has one
    return alt.LayerChart(layer=layers).properties(title=alt.Title(f"{metric} over training", subtitle=subtitle))


def regimes(ds: xr.Dataset) -> alt.VConcatChart:
    """The paper's Table 1 / Figs. 2–3 per run, from :func:`~opd_lens.summarize`: unchanged % (parameter-weighted)
    at the last step, and mean max principal angle (V and U side) and mean spectral shift at the last endpoint, as
    a 2 × 2 grid (so eight runs stay within a laptop window)."""
    table = summarize(ds).reset_index()
    color = _color(ds, table.run)
    quantities = {
        "unchanged_pct": "unchanged (bf16, %)",
        "max_angle_v_deg": "mean max angle, V side (°)",
        "max_angle_u_deg": "mean max angle, U side (°)",
        "spectral_shift": "mean spectral shift (relative)",
    }
    bars = [
        alt.Chart(table)
        .mark_bar()
        .encode(
            x=alt.X("run:N", sort=list(table.run), title=None),
            y=alt.Y(f"{column}:Q", title=label),
            color=color,
            tooltip=["run:N", "method:N", "last_step:Q", alt.Tooltip(f"{column}:Q", format=".4g", title=label)],
        )
        .properties(title=label, width=max(120, 40 * len(table)))
        for column, label in quantities.items()
    ]
    return alt.vconcat(alt.hconcat(*bars[:2]), alt.hconcat(*bars[2:])).properties(
        title="Update regimes per run (paper Table 1, Figs. 2–3)"
    )


def overlaps(ds: xr.Dataset, *, step: int | str = "last") -> alt.LayerChart:
    """Principal- and low-magnitude-mask overlap per run (mean over matrices, %) at ``step`` (``"last"``: each
    run's last step; a run without that step is left out), against the random baseline α (attr ``mask_alpha``)."""
    rows = []
    for run in map(str, ds.run.values):
        r = ds.sel(run=run)
        steps = r.step.values[r.progress.notnull().values]
        at = steps[-1:] if step == "last" else steps[steps == step]
        if not len(at):
            continue
        here = r.sel(step=at[0])
        for mask, var in (("principal", "principal_overlap"), ("low-magnitude", "lowmag_overlap")):
            pct = 100 * float(here[var].mean(_MATRIX))
            rows.append({"run": run, "method": str(r.method.values), "step": int(at[0]), "mask": mask, "overlap": pct})
    if not rows:
        valid = ds.step.values[ds.progress.notnull().any("run").values].tolist()
        raise ChartError(f"no run has step {step!r}; valid: 'last' or one of {valid}")
    df = pd.DataFrame(rows)
    alpha = 100 * float(ds.attrs["mask_alpha"])
    y = alt.Y("overlap:Q", title="visibly updated entries inside the mask (%)")
    bars = (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("mask:N", title="mask", sort=["principal", "low-magnitude"], axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("run:N", sort=list(df.run.unique())),
            y=y,
            color=_color(ds, df.run),
            tooltip=["run:N", "method:N", "step:Q", "mask:N", alt.Tooltip("overlap:Q", format=".2f")],
        )
    )
    baseline = pd.DataFrame({"overlap": [alpha], "label": [f"random (α = {ds.attrs['mask_alpha']:g})"]})
    rule = (
        alt.Chart(baseline)
        .mark_rule(color="gray")
        .encode(
            y=y,
            strokeDash=alt.StrokeDash(
                "label:N", title="baseline", scale=alt.Scale(range=[[4, 4]]), legend=_LINE_LEGEND
            ),
            tooltip=["label:N"],
        )
    )
    when = "each run's last step" if step == "last" else f"step {step}"
    title = alt.Title("Update localization", subtitle=f"mean over matrices at {when}")
    return alt.LayerChart(layer=[bars, rule]).properties(title=title, width=_WIDTH)


def angle_profiles(ds: xr.Dataset, run: str, layer: int, module: str, step: int | None = None) -> alt.LayerChart:
    """Principal angles θ_i (degrees) between the top singular subspaces of W_0 and W_t, U and V side, over the
    index i, for one matrix at one endpoint step (default: the last step with angles)."""
    one = _select(ds, runs=[run], layer=[layer], module=[module]).isel(run=0, layer=0, module=0)
    has = (one.angles_u.notnull() | one.angles_v.notnull()).any("angle_index").values
    ends = [int(s) for s in one.step.values[has]]
    what = f"run {run!r}, layer {layer}, module {module!r}"
    if not ends:
        raise ChartError(f"no principal angles stored for {what}; compute with endpoint='all' or include its steps")
    if step is None:
        step = ends[-1]
    elif step not in ends:
        raise ChartError(f"no principal angles stored for {what} at step {step}; steps with angles: {ends}")
    at = one.sel(step=step)
    sides = {"U (left)": at.angles_u, "V (right)": at.angles_v}
    df = pd.concat(
        [da.to_series().rename("angle").reset_index().assign(side=side) for side, da in sides.items()]
    ).dropna(subset=["angle"])[["angle_index", "side", "angle"]]
    subtitle = [f"run {run}, step {step}"]
    if absent := [side.split()[0] for side, da in sides.items() if bool(da.isnull().all())]:
        subtitle.append(f"{absent[0]} side not shown: k spans that whole side, so its angles are 0 by construction")
    title = alt.Title(f"Principal angles, {module} layer {layer}", subtitle=subtitle)
    base = alt.Chart(df).encode(
        x=alt.X("angle_index:Q", title="rank index i"),
        y=alt.Y("angle:Q", title="principal angle θ_i (°)"),
        color=alt.value(run_colors(ds)[run]),
        tooltip=["side:N", "angle_index:Q", alt.Tooltip("angle:Q", format=".3f", title="angle (°)")],
    )
    return _dashed_lines(base, alt.StrokeDash("side:N", title="subspace", legend=_LINE_LEGEND)).properties(title=title)


def constrained_accuracy(table: pd.DataFrame) -> alt.LayerChart:
    """Held-out accuracy (fraction) per run against ``progress`` (or ``step``), dashed where training was
    constrained. ``table`` has columns ``run``, ``method``, ``step`` or ``progress``, ``accuracy``, ``constrained``."""
    x = "progress" if "progress" in table.columns else "step"
    missing = [c for c in ("run", "method", x, "accuracy", "constrained") if c not in table.columns]
    if missing:
        raise ChartError(
            f"constrained_accuracy needs columns run, method, step (or progress), accuracy, constrained; "
            f"missing {missing}"
        )
    df = table[["run", "method", x, "accuracy", "constrained"]].dropna(subset=[x, "accuracy"])
    df = df.assign(run=df.run.astype(str), training=np.where(df.constrained.astype(bool), "constrained", "plain"))
    x_enc = _PROGRESS if x == "progress" else alt.X("step:Q", title="training step")
    base = alt.Chart(df.drop(columns="constrained")).encode(
        x=x_enc,
        y=alt.Y("accuracy:Q", title="held-out accuracy", axis=alt.Axis(format="%")),
        color=_color(run_colors(df.run), df.run),
        tooltip=["run:N", "method:N", "training:N", f"{x}:Q", alt.Tooltip("accuracy:Q", format=".1%")],
    )
    dash = alt.StrokeDash(
        "training:N",
        title="training",
        scale=alt.Scale(domain=["plain", "constrained"], range=[[1, 0], [6, 4]]),
        legend=_LINE_LEGEND,
    )
    return _dashed_lines(base, dash).properties(title="Held-out accuracy, constrained vs plain")


def channel_overlap(over: xr.DataArray, *, other_step: int | None = None) -> alt.LayerChart:
    """Do two runs share a channel? :func:`opd_lens.locking.channel_overlap` per module (mean over layers, one
    line each) against the first run's step, with the chance level K/n of each input width as a dashed rule.
    ``other_step``: which of the other run's steps (default: its last in ``over``)."""
    if over.name != "channel_overlap" or "other_step" not in over.dims:
        raise ChartError("expected the DataArray of opd_lens.locking.channel_overlap")
    steps = over.other_step.values.tolist()
    other_step = steps[-1] if other_step is None else other_step
    _check("other_step", [other_step], steps)
    mean = over.sel(other_step=other_step).mean("layer")
    df = mean.to_dataframe(name="sim").reset_index().dropna(subset=["sim"])[["step", "module", "sim"]]
    run, other, k = over.attrs["run"], over.attrs["other_run"], over.attrs["lock_k"]
    modules = [str(m) for m in over.module.values]
    color = alt.Color("module:N", title="module", scale=alt.Scale(domain=modules))
    line = (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title=f"{run} step"),
            y=alt.Y("sim:Q", title=f"Sim_{k} to {other} at step {other_step}", scale=alt.Scale(domain=[0, 1])),
            color=color,
            tooltip=["module:N", "step:Q", alt.Tooltip("sim:Q", format=".3f", title=f"Sim_{k}")],
        )
    )
    chance = pd.DataFrame({"chance": sorted({float(c) for c in over.chance.values if np.isfinite(c)})})
    rule = alt.Chart(chance).mark_rule(strokeDash=[4, 4], color="gray").encode(y="chance:Q")
    levels = ", ".join(f"{c:.3g} (n = {round(k / c)})" for c in chance.chance)
    title = alt.Title(
        f"{run}'s channel against {other}'s (Sim_{k}, mean over layers)",
        subtitle=[
            "1: the same K-dimensional input subspace",
            f"dashed: chance K/n for two random subspaces of the input width n: {levels}",
        ],
    )
    return alt.LayerChart(layer=[rule, line]).properties(width=_WIDTH, title=title)


def enable_offline() -> None:
    """Show charts in notebooks with no network: altair's ``jupyter`` renderer (each chart a ``JupyterChart``
    widget) with Vega from the bundle in vl-convert instead of a CDN."""
    alt.renderers.enable("jupyter", offline=True)
    alt.JupyterChart.enable_offline()


def _dashed_lines(base: alt.Chart, dash: alt.StrokeDash) -> alt.LayerChart:
    """Lines dashed by ``dash`` with their points; separate layers so the dash legend shows strokes."""
    return alt.LayerChart(layer=[base.mark_line().encode(strokeDash=dash), base.mark_point(filled=True)])


def _color(colors: xr.Dataset | dict[str, str], shown: Iterable) -> alt.Color:
    colors = run_colors(colors) if isinstance(colors, xr.Dataset) else colors
    domain = list(dict.fromkeys(map(str, shown)))
    return alt.Color("run:N", title="run", scale=alt.Scale(domain=domain, range=[colors[r] for r in domain]))


def _select(ds: xr.Dataset, *, runs=None, layer=None, module=None) -> xr.Dataset:
    """``ds`` restricted to the given runs, layers and modules (each None, one value or a sequence), checked."""
    selection = {}
    for dim, value in (("run", runs), ("layer", layer), ("module", module)):
        if value is not None:
            values = [value] if isinstance(value, str | int | np.integer) else list(value)
            _check(dim, values, ds[dim].values.tolist())
            selection[dim] = values
    return ds.sel(selection)


def _check(what: str, given: Sequence, valid: Sequence) -> None:
    unknown = [v for v in given if v not in valid]
    if unknown:
        raise ChartError(f"unknown {what} {', '.join(map(repr, unknown))}; valid: {', '.join(map(repr, valid))}")
