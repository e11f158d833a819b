"""The paper-style table: one row per run, from the opd_lens Dataset, and its rendering as text, markdown and HTML.

:data:`COLUMNS` defines every column once (the schema variable it derives from, the statistic, a short header,
its unit and decimals); :func:`summarize` computes the values and :class:`Summary` renders them with a legend.
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import pandas as pd
import xarray as xr

from .checkpoints.reader import load_json
from .schema import VARIABLES

__all__ = ["COLUMNS", "MISSING", "Column", "Summary", "held_out_accuracy", "summarize"]

_MATRIX = ("layer", "module")
_AT = {"first": "first checkpoint", "last": "last step", "endpoint": "last step with angles"}
MISSING = "–"
"""How a value that is not there (NaN) is shown."""


@dataclass(frozen=True)
class Column:
    """One column of the table. A column with a ``variable`` is the mean over matrices of that schema variable at
    checkpoint ``at`` (parameter-weighted if ``weighted``, times 100 if ``percent``); ``meaning`` completes its
    legend line and may name the store's settings ``{mask_alpha}``, ``{angle_k}``, ``{lock_k}``."""

    name: str
    header: str
    meaning: str
    decimals: int | None = None
    """Fixed decimals of a number; ``None`` for text."""
    variable: str | None = None
    at: Literal["first", "last", "endpoint"] = "last"
    weighted: bool = False
    percent: bool = False

    @property
    def unit(self) -> str:
        """``%``, ``°`` (from the variable's schema units) or nothing."""
        if self.percent:
            return "%"
        return "°" if self.variable and VARIABLES[self.variable].units == "degree" else ""

    @property
    def label(self) -> str:
        """The header with its unit."""
        return f"{self.header} {self.unit}".rstrip()

    def legend(self, attrs: Mapping) -> str:
        """``label = meaning``, with the long name of the variable, the statistic and the store's settings."""
        parts = [self.meaning.format(**_settings(attrs))]
        if self.variable:
            weighting = "parameter-weighted matrix mean" if self.weighted else "matrix mean"
            parts = [VARIABLES[self.variable].long_name, f"{weighting}, {_AT[self.at]}", *parts]
        return f"{self.label} = " + "; ".join(p for p in parts if p)

    def format(self, value) -> str:
        """The value as shown: fixed decimals, :data:`MISSING` for NaN."""
        if self.decimals is None:
            return str(value)
        return MISSING if pd.isna(value) else f"{value:.{self.decimals}f}"


COLUMNS = (
    Column("run", "run", "the run's name in the store"),
    Column("method", "method", "the method label given when the run was added"),
    Column("steps", "ckpts", "number of computed checkpoints", 0),
    Column("first_step", "first", "step of the first computed checkpoint", 0),
    Column("last_step", "last", "step of the last computed checkpoint", 0),
    Column("accuracy_pct", "acc", "held-out accuracy of the last checkpoint (eval_accuracy in its trainer_state.json)",
           1, percent=True),
    Column("unchanged_pct", "unchanged", "", 1, "unchanged_frac", weighted=True, percent=True),
    Column("principal_overlap_pct", "principal", "random baseline {mask_alpha}", 1, "principal_overlap", percent=True),
    Column("lowmag_overlap_pct", "low-mag", "random baseline {mask_alpha}", 1, "lowmag_overlap", percent=True),
    Column("max_angle_u_deg", "angle U", "top-k subspaces of W₀, W_t; {angle_k}", 1, "max_angle_u", "endpoint"),
    Column("max_angle_v_deg", "angle V", "top-k subspaces of W₀, W_t; {angle_k}", 1, "max_angle_v", "endpoint"),
    Column("spectral_shift", "σ shift", "", 3, "spectral_shift", "endpoint"),
    Column("intruders", "intruders", "left singular vectors with |cos| < 0.5 to all of W₀'s", 1,
           "intruder_dimensions", "endpoint"),
    Column("stable_rank", "stable rank", "", 2, "stable_rank"),
    Column("update_fro", "‖ΔW‖_F", "", 3, "update_fro"),
    Column("lock_alignment_first", "Sim_K 1st", "top-K right singular vectors; {lock_k}", 3, "lock_alignment", "first"),
)  # fmt: skip
"""Every column, in the table's order (``run`` is the index)."""


def summarize(ds: xr.Dataset) -> pd.DataFrame:
    """One row per run, as in the paper's Table 1 and Figs. 2–5, with the columns of :data:`COLUMNS` (means over
    matrices; ``unchanged_pct`` weighted by parameter count, the paper's bf16 sparsity). ``accuracy_pct`` is there
    when a run's checkpoints log a held-out accuracy (see :func:`held_out_accuracy`)."""
    accuracy = held_out_accuracy(ds)
    rows = [_row(ds.sel(run=run)) | {"accuracy_pct": 100 * accuracy.get(str(run), math.nan)} for run in ds.run.values]
    columns = [c.name for c in COLUMNS[1:] if c.name != "accuracy_pct" or accuracy]
    return pd.DataFrame(rows, columns=["run", *columns]).set_index("run")


def held_out_accuracy(ds: xr.Dataset) -> dict[str, float]:
    """Run -> the ``eval_accuracy`` that the ``trainer_state.json`` of its last checkpoint in ``ds`` logs for that
    step (what ``transformers.Trainer`` and the demo zoo write, and the zoo's manifest copies), for the runs that log
    one."""
    runs = json.loads(ds.attrs.get("runs", "{}"))
    accuracy = {}
    for name in map(str, ds.run.values):
        steps = ds.step.values[ds.progress.sel(run=name).notnull().values]
        entry = runs.get(name, {}).get("checkpoints", {}).get(str(steps[-1])) if len(steps) else None
        value = _logged_accuracy(Path(entry["path"]) / "trainer_state.json", int(steps[-1])) if entry else None
        if value is not None:
            accuracy[name] = value
    return accuracy


def _logged_accuracy(path: Path, step: int) -> float | None:
    try:
        history = load_json(path).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(history, list):
        return None
    values = [
        r["eval_accuracy"]
        for r in history
        if isinstance(r, dict) and r.get("step") == step and type(r.get("eval_accuracy")) in (int, float)
    ]
    return float(values[-1]) if values else None


def _row(r: xr.Dataset) -> dict:
    """The values of one run, ``r`` the Dataset at that run."""
    steps = r.step.values[r.progress.notnull().values]
    row = {"run": str(r.run.values), "method": str(r.method.values), "steps": len(steps)}
    if not len(steps):
        return row
    ends = r.step.values[r.max_angle_v.notnull().any(_MATRIX).values]
    at: dict[str, xr.Dataset | None] = {"first": r.sel(step=steps[0]), "last": r.sel(step=steps[-1])}
    at["endpoint"] = r.sel(step=ends[-1]) if len(ends) else None
    row |= {"first_step": int(steps[0]), "last_step": int(steps[-1])}
    for c in COLUMNS:
        if c.variable:
            point = at[c.at]
            value = math.nan if point is None else _mean(point[c.variable], c.weighted)
            row[c.name] = 100 * value if c.percent else value
    return row


def _mean(da: xr.DataArray, weighted: bool) -> float:
    if not weighted:
        return float(da.mean(_MATRIX, skipna=True))
    weights = da.numel.where(da.notnull(), 0)
    return float((da.fillna(0) * weights).sum() / weights.sum())


def _settings(attrs: Mapping) -> dict[str, str]:
    """The settings a legend names, with their values where the Dataset's attrs hold them."""
    alpha, k, lock_k = (attrs.get(key) for key in ("mask_alpha", "angle_k", "lock_k"))
    if k is not None:  # an int, or a fraction of each matrix's smaller side
        k = f"k={Fraction(k).limit_denominator(1000)}·min(m, n)" if isinstance(k, float) else f"k={k}"
        k += " (matrices with a side ≤ k left out: 0° by construction)"
    return {
        "mask_alpha": "α" if alpha is None else f"α={alpha:g} ({100 * alpha:g}%)",
        "angle_k": k or "k",
        "lock_k": "K" if lock_k is None else f"K={lock_k}",
    }


@dataclass(frozen=True)
class Summary:
    """The table of :func:`summarize` rendered for people: fixed decimals per column, short headers with units and
    a legend below, as text (stacked blocks no wider than ``width``), markdown or HTML."""

    table: pd.DataFrame
    attrs: Mapping

    @classmethod
    def of(cls, ds: xr.Dataset) -> Summary:
        """The summary of a Dataset (its attrs give the settings the legend names)."""
        return cls(summarize(ds), dict(ds.attrs))

    @property
    def columns(self) -> list[Column]:
        """The columns the table holds, ``run`` first."""
        return [c for c in COLUMNS if c.name == "run" or c.name in self.table.columns]

    def legend(self) -> list[str]:
        """One line per column: header = meaning."""
        return [c.legend(self.attrs) for c in self.columns]

    def cells(self) -> list[list[str]]:
        """The formatted values, one list per row."""
        rows = self.table.reset_index()
        return [[c.format(row[c.name]) for c in self.columns] for _, row in rows.iterrows()]

    def text(self, width: int = 120) -> str:
        """Fixed-width text no wider than ``width``: the table in blocks of whole columns (each repeating ``run``),
        then the legend."""
        columns, cells = self.columns, self.cells()
        widths = [max([len(c.label), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
        lines = []
        for block in _blocks(widths, width):
            for row in [[c.label for c in columns], *cells]:
                lines.append("  ".join(_pad(row[i], widths[i], columns[i]) for i in block).rstrip())
            lines.append("")
        legend = [textwrap.fill(line, width, subsequent_indent="    ") for line in self.legend()]
        return "\n".join(lines + legend)

    def markdown(self) -> str:
        """A markdown table, then the legend as a list."""
        columns = self.columns
        lines = ["| " + " | ".join(c.label for c in columns) + " |"]
        lines.append("|" + "|".join("---" if c.decimals is None else "---:" for c in columns) + "|")
        lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in self.cells()]
        return "\n".join([*lines, "", *(f"- {line}" for line in self.legend())])

    def html(self) -> str:
        """An HTML table (headers carry their meaning as a tooltip), then the legend; every value escaped."""
        columns, legend = self.columns, self.legend()
        head = "".join(
            f'<th title="{html.escape(line)}"{_align(c)}>{html.escape(c.label)}</th>'
            for c, line in zip(columns, legend, strict=True)
        )
        body = "".join(
            "<tr>" + "".join(_html_cell(c, v) for c, v in zip(columns, row, strict=True)) + "</tr>"
            for row in self.cells()
        )
        items = "".join(f"<li>{html.escape(line)}</li>" for line in legend)
        return (
            f'<table class="dataframe opd-summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f'<ul class="opd-summary-legend">{items}</ul>'
        )

    def _repr_html_(self) -> str:
        return self.html()

    def __str__(self) -> str:
        return self.text()


def _html_cell(c: Column, value: str) -> str:
    """A body cell: the run's name is the row header."""
    tag = "th" if c.name == "run" else "td"
    return f"<{tag}{_align(c)}>{html.escape(value)}</{tag}>"


def _align(c: Column) -> str:
    """Text left-aligned, numbers right-aligned (the page's default), never wrapped."""
    return ' style="text-align: left; white-space: nowrap"' if c.decimals is None else ' style="white-space: nowrap"'


def _pad(value: str, width: int, c: Column) -> str:
    return value.ljust(width) if c.decimals is None else value.rjust(width)


def _blocks(widths: list[int], width: int) -> list[list[int]]:
    """Column indices split into blocks no wider than ``width`` where possible, each starting with column 0."""
    blocks, current = [], [0]
    for i in range(1, len(widths)):
        if current != [0] and sum(widths[j] + 2 for j in current) + widths[i] > width:
            blocks.append(current)
            current = [0]
        current.append(i)
    return [*blocks, current]
