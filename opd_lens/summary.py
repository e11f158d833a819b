"""The paper-style table: one row per run, from the opd_lens Dataset."""

from __future__ import annotations

import pandas as pd
import xarray as xr

__all__ = ["summarize"]

_MATRIX = ("layer", "module")


def summarize(ds: xr.Dataset) -> pd.DataFrame:
    """One row per run, as in the paper's Table 1 and Figs. 2–5 (means over matrices, unweighted unless noted).

    Columns: ``method``; ``first_step``, ``last_step``, ``steps``; at the last step ``unchanged_pct`` (weighted
    by parameter count, the paper's bf16 sparsity), ``principal_overlap_pct``, ``lowmag_overlap_pct`` (random
    baseline: α), ``stable_rank`` and ``update_fro``; at the last step that has angles ``max_angle_u_deg``,
    ``max_angle_v_deg`` and ``spectral_shift``; ``lock_alignment_first``, Sim_K of the first checkpoint to the
    final channel.
    """
    rows = []
    for run in ds.run.values:
        r = ds.sel(run=run)
        steps = r.step.values[r.progress.notnull().values]
        row = {"run": str(run), "method": str(r.method.values), "steps": len(steps)}
        if len(steps):
            first, last = r.sel(step=steps[0]), r.sel(step=steps[-1])
            has_angles = r.max_angle_v.notnull().any(_MATRIX).values
            ends = r.step.values[has_angles]
            end = r.sel(step=ends[-1]) if len(ends) else None
            weights = r.numel.where(last.unchanged_frac.notnull(), 0)
            row |= {
                "first_step": int(steps[0]),
                "last_step": int(steps[-1]),
                "unchanged_pct": 100 * float((last.unchanged_frac.fillna(0) * weights).sum() / weights.sum()),
                "principal_overlap_pct": 100 * _mean(last.principal_overlap),
                "lowmag_overlap_pct": 100 * _mean(last.lowmag_overlap),
                "max_angle_u_deg": _mean(end.max_angle_u) if end is not None else float("nan"),
                "max_angle_v_deg": _mean(end.max_angle_v) if end is not None else float("nan"),
                "spectral_shift": _mean(end.spectral_shift) if end is not None else float("nan"),
                "stable_rank": _mean(last.stable_rank),
                "update_fro": _mean(last.update_fro),
                "lock_alignment_first": _mean(first.lock_alignment),
            }
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def _mean(da: xr.DataArray) -> float:
    return float(da.mean(_MATRIX, skipna=True))
