"""What the widgets send to the browser: Datasets in, binary ``{view, dtype, shape}`` arrays out."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ..schema import ANGLES, SCALARS, VARIABLES

ANGLE_BUDGET = 32 * 2**20
"""Bytes of angle profiles the Explorer ships; beyond it, only each run's last endpoint step."""
SPECTRUM_BUDGET = 8 * 2**20
"""Bytes of update spectra the Explorer ships; beyond it, only each run's last step."""
CHANNEL_BUDGET = 16 * 2**20
"""Bytes of cross-run channel overlaps (runs² cubes) the Explorer ships; beyond it, none."""
CHANNEL_PREFIX = "channel_overlap:"
"""The Explorer's metric ``channel_overlap:OTHER``: each run's Sim_K to run OTHER's final channel."""


def wire(a: np.ndarray) -> dict:
    """A C-contiguous float32 or int32 array as anywidget sends it: ``{view, dtype, shape}`` (binary, not JSON)."""
    a = np.asarray(a)
    a = np.ascontiguousarray(a, dtype=np.int32 if np.issubdtype(a.dtype, np.integer) else np.float32)
    return {"view": a.data.cast("B"), "dtype": str(a.dtype), "shape": list(a.shape)}


def explorer_payload(ds: xr.Dataset, metrics: list[str] | None = None, channels: xr.DataArray | None = None) -> dict:
    """The Explorer's data: every per-matrix metric cube (run, step, layer, module) and the angle profiles; with
    ``channels`` (:func:`~opd_lens.locking.final_channel_overlap`), one more cube per run, ``channel_overlap:RUN``:
    every run's Sim_K to RUN's final channel."""
    available = [m for m in SCALARS if m in ds]
    metrics = available if metrics is None else list(metrics)
    unknown = sorted(set(metrics) - set(available))
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown or metrics}; the Dataset has {available}")
    ds = ds.transpose("run", "step", "layer", "module", ...)
    alpha = float(ds.attrs.get("mask_alpha", math.nan))
    return {
        "runs": [str(r) for r in ds.run.values],
        "methods": [str(m) for m in ds.method.values],
        "steps": [int(s) for s in ds.step.values],
        "layers": [int(x) for x in ds.layer.values],
        "modules": [str(m) for m in ds.module.values],
        **_module_types(ds),
        "progress": wire(ds.progress.values),
        "metrics": (cubes := {m: wire(ds[m].values) for m in metrics} | _cubes(channels, lambda c: wire(c.values))),
        "order": list(cubes),  # the picker's order: a saved notebook's widget state has its keys sorted
        "labels": {m: VARIABLES[m].description for m in metrics} | _cubes(channels, _channel_label),
        "attrs": {m: _title_attrs(ds[m]) for m in metrics} | _cubes(channels, _channel_attrs),
        "angles": _angles(ds),
        "spectrum": _spectrum(ds),
        "mask_alpha": alpha if math.isfinite(alpha) else None,  # JSON has no NaN
        "lock_k": int(ds.attrs.get("lock_k", 0)),
    }


def _cubes(channels: xr.DataArray | None, value) -> dict:
    """``channel_overlap:OTHER`` -> ``value`` of its (run, step, layer, module) cube, for every other run."""
    if channels is None:
        return {}
    return {
        CHANNEL_PREFIX + str(o): value(channels.sel(other=o).transpose("run", "step", "layer", "module"))
        for o in channels.other.values
    }


def _channel_label(cube: xr.DataArray) -> str:
    k = cube.attrs.get("lock_k", "K")
    return (
        f"Sim_K (K = {k}) of each run's top-K update directions to {cube.other.item()}'s final ones: do the runs share "
        "a channel? 1 = the same subspace, K/n = chance"
    )


def _channel_attrs(cube: xr.DataArray) -> dict[str, str]:
    return {"long_name": f"Sim_K to {cube.other.item()}'s final channel", "units": "1"}


def _module_types(ds: xr.Dataset) -> dict[str, list[str]]:
    """Per module: its ``projection`` (experts share one; the module's name without that coord) and its type."""
    modules = [str(m) for m in ds.module.values]
    projections = [str(p) for p in ds.projection.values] if "projection" in ds.coords else modules
    experts = [int(e) for e in ds.expert.values] if "expert" in ds.coords else [-1] * len(modules)
    return {"projections": projections, "types": [_type(p, e) for p, e in zip(projections, experts, strict=True)]}


def _type(projection: str, expert: int) -> str:
    """``experts`` for an MoE expert's matrix, else ``attention``, ``MLP`` or ``other`` by the projection's name."""
    if expert >= 0:
        return "experts"
    parts = projection.lower().split(".")
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(p in ("mlp", "feed_forward", "ffn") for p in parts):
        return "MLP"
    return "other"


def _title_attrs(da: xr.DataArray) -> dict[str, str]:
    """A variable's ``long_name`` and ``units`` (CF: ``"1"`` is dimensionless): its attrs, else the schema's."""
    attrs = VARIABLES[str(da.name)].attrs | da.attrs
    return {"long_name": str(attrs["long_name"]), "units": str(attrs["units"])}


def _angles(ds: xr.Dataset) -> dict | None:
    """Angle profiles at the steps that have them; each run's last such step alone when they exceed the budget."""
    if not all(a in ds for a in ANGLES):
        return None
    has = ds.angles_v.notnull().any(("layer", "module", "angle_index"))  # (run, step)
    steps = _within(has, ds.angles_v[:, :1].nbytes * 2, ANGLE_BUDGET)
    if steps.size == 0:
        return None
    sub = ds.isel(step=steps)
    return {
        "u": wire(sub.angles_u.values),
        "v": wire(sub.angles_v.values),
        "steps": [int(s) for s in sub.step.values],
    }


def _spectrum(ds: xr.Dataset) -> dict | None:
    """The top singular values of every ΔW_t, at every step within the budget, else at each run's last step."""
    if "update_spectrum" not in ds:
        return None
    has = ds.update_spectrum.isel(rank_index=0).notnull().any(("layer", "module"))  # (run, step)
    steps = _within(has, ds.update_spectrum[:, :1].nbytes, SPECTRUM_BUDGET)
    if steps.size == 0:
        return None
    sub = ds.update_spectrum.isel(step=steps)
    return {"s": wire(sub.values), "steps": [int(s) for s in sub.step.values]}


def _within(has: xr.DataArray, step_bytes: int, budget: int) -> np.ndarray:
    """The step indices where ``has`` (run, step) holds for some run; each run's last one alone when all of them
    would take more than ``budget`` bytes at ``step_bytes`` each."""
    steps = np.flatnonzero(has.any("run").values)
    if steps.size * step_bytes > budget:
        last = [np.flatnonzero(has.values[r])[-1:] for r in range(has.sizes["run"])]
        steps = np.unique(np.concatenate(last))
    return steps
