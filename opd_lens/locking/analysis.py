"""Lock alignment: does a run's cumulative update ΔW_t enter its final low-dimensional channel early?

Reads V_K(t), the top-K right singular vectors of every ΔW_t, from the store's cache (computed with the
diagnostics, K = the store's ``lock_k``); nothing is re-read from the checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ..cache import parse_matrix_key
from ..errors import StoreError
from ..store import Store, open_store

__all__ = ["channel_overlap", "final_channel_overlap", "lock_alignment", "lock_summary"]


def lock_alignment(
    store: Store | str | os.PathLike,
    *,
    ref_progress: float = 0.2,
    ref_step: int | Mapping[str, int] | None = None,
    runs: list[str] | None = None,
) -> xr.Dataset:
    """Sim_K of every checkpoint's channel to the run's final channel and to an early reference channel.

    Returns a Dataset over (run, step, layer, module) with ``sim_last`` = Sim_K(V_K(t), V_K(last)) (the store's
    ``lock_alignment``), ``sim_ref`` = Sim_K(V_K(t), V_K(t_ref)) and ``stable_rank``; the coordinate
    ``ref_step(run)`` is each run's reference: ``ref_step`` (one step for all runs, or per run), else the checkpoint
    whose progress is nearest ``ref_progress`` (the paper projects at ≈ 20% of training).
    """
    store = store if isinstance(store, Store) else open_store(store, create=False)
    ds = store.dataset()
    names = [str(r) for r in ds.run.values] if runs is None else list(runs)
    missing = sorted(set(names) - set(ds.run.values))
    if missing:
        raise StoreError(
            f"{store.path}: no computed run {missing[0]!r}; the store has {[str(r) for r in ds.run.values]}"
        )
    ds = ds.sel(run=names)
    layers = {int(v): i for i, v in enumerate(ds.layer.values)}
    modules = {str(v): i for i, v in enumerate(ds.module.values)}
    sim_ref = np.full(ds.stable_rank.shape, np.nan, np.float32)
    refs = []
    for r, name in enumerate(names):
        progress = ds.progress.sel(run=name)
        steps = _computed_steps(ds, name, store)
        ref = _reference(name, steps, progress, ref_step, ref_progress, store)
        refs.append(ref)
        bases = store.lock_bases(name)
        slots = [int(np.flatnonzero(ds.step.values == step)[0]) for step in steps]
        sim_ref[r, slots] = bases.alignment_grid(steps, bases.load(ref), layers, modules)
    dims = ("run", "step", "layer", "module")
    out = xr.Dataset(
        {"sim_last": ds.lock_alignment, "sim_ref": (dims, sim_ref), "stable_rank": ds.stable_rank},
        coords={"ref_step": ("run", refs)},
    )
    out.attrs = {"lock_k": ds.attrs["lock_k"], "store": str(store.path)}
    return out


def channel_overlap(
    store: Store | str | os.PathLike,
    run: str,
    other: str,
    *,
    other_steps: int | Sequence[int] | None = None,
) -> xr.DataArray:
    """Do two runs from one origin use the same channel? Sim_K(V_K^run(t), V_K^other(s)) for every matrix.

    Returns a DataArray over (step, other_step, layer, module): each computed step t of ``run`` against each of
    ``other_steps`` of ``other`` (default: its last), from the cached V_K bases (nothing is read from the
    checkpoints). 1 is the same K-dimensional subspace of the input space; the coord ``chance(module)`` = K/n is
    the expected Sim_K of two random K-dimensional subspaces of Rⁿ. NaN where a matrix has no channel (a zero
    update, or ``lock_k`` ≥ min(m, n)) or is not in both runs.
    """
    store = store if isinstance(store, Store) else open_store(store, create=False)
    return _overlap(store, store.dataset(), run, other, other_steps)


def final_channel_overlap(store: Store | str | os.PathLike, ds: xr.Dataset | None = None) -> xr.DataArray | None:
    """:func:`channel_overlap` of every run against every run's final channel at once: a DataArray over (other, run,
    step, layer, module) on the store's Dataset grid, NaN where ``run`` and ``other`` start from different origins
    or a step is not computed; against itself a run gives its ``lock_alignment``. ``None`` when some computed
    step has no cached V_K bases (a store filled without the engine). ``ds``: the store's Dataset, if already read."""
    store = store if isinstance(store, Store) else open_store(store, create=False)
    ds = store.dataset() if ds is None else ds
    names = [str(r) for r in ds.run.values]
    steps = {name: _computed_steps(ds, name, store) for name in names}
    if not all(store.lock_bases(name).has(s) for name in names for s in steps[name]):
        return None
    out = np.full((len(names), *ds.stable_rank.transpose("run", "step", "layer", "module").shape), np.nan, np.float32)
    origin = {name: store.runs[name]["origin_fingerprint"] for name in names}
    slot = {int(s): i for i, s in enumerate(ds.step.values)}
    for o, other in enumerate(names):
        for r, run in enumerate(names):
            if steps[run] and steps[other] and origin[run] == origin[other]:
                sim = _overlap(store, ds, run, other, None).isel(other_step=0)
                out[o, r, [slot[s] for s in steps[run]]] = sim.transpose("step", "layer", "module").values
    return xr.DataArray(
        out,
        dims=("other", "run", "step", "layer", "module"),
        coords={
            "other": names,
            "run": names,
            "step": ds.step.values,
            "layer": ds.layer.values,
            "module": ds.module.values,
        },
        name="final_channel_overlap",
        attrs={"long_name": "Sim_K to a run's final channel", "units": "1", "lock_k": int(ds.attrs["lock_k"])},
    )


def _overlap(store: Store, ds: xr.Dataset, run: str, other: str, other_steps) -> xr.DataArray:
    steps = {name: _computed_steps(ds, name, store) for name in (run, other)}
    runs = store.runs
    if runs[run]["origin_fingerprint"] != runs[other]["origin_fingerprint"]:
        raise StoreError(
            f"{store.path}: runs {run!r} and {other!r} start from different origins "
            f"({runs[run]['origin']} and {runs[other]['origin']}); their updates share no parameter space"
        )
    if other_steps is None:
        other_steps = [steps[other][-1]]
    other_steps = [other_steps] if isinstance(other_steps, int) else [int(s) for s in other_steps]
    if absent := [s for s in other_steps if s not in steps[other]]:
        raise StoreError(f"{store.path}: run {other!r} has no computed step {absent[0]}; it has {steps[other]}")
    layers = {int(v): i for i, v in enumerate(ds.layer.values)}
    modules = {str(v): i for i, v in enumerate(ds.module.values)}
    mine, theirs = store.lock_bases(run), store.lock_bases(other)
    grids = [mine.alignment_grid(steps[run], theirs.load(s), layers, modules) for s in other_steps]
    k = int(ds.attrs["lock_k"])
    columns = {}
    for key, basis in theirs.load(other_steps[0]).items():
        columns[parse_matrix_key(key)[1]] = basis.shape[0]
    chance = [k / columns[m] if m in columns else np.nan for m in modules]
    out = xr.DataArray(
        np.stack(grids, axis=1),
        dims=("step", "other_step", "layer", "module"),
        coords={
            "step": steps[run],
            "other_step": other_steps,
            "layer": list(layers),
            "module": list(modules),
            "chance": ("module", chance),
        },
        name="channel_overlap",
    )
    out.attrs = {
        "long_name": f"Sim_K of {run}'s channel to {other}'s",
        "units": "1",
        "description": f"Sim_K(V_K of {run} at step, V_K of {other} at other_step), K = {k}; chance level K/n",
        "run": run,
        "other_run": other,
        "lock_k": k,
    }
    return out


def _computed_steps(ds: xr.Dataset, name: str, store: Store) -> list[int]:
    if name not in ds.run.values:
        raise StoreError(f"{store.path}: no computed run {name!r}; the store has {[str(r) for r in ds.run.values]}")
    progress = ds.progress.sel(run=name)
    return [int(s) for s in progress.step.values[progress.notnull().values]]


def lock_summary(lock: xr.Dataset, threshold: float = 0.9) -> pd.DataFrame:
    """One row per run: when the update locked and how wide its stable rank stayed (means over matrices).

    Columns: ``method``; ``lock_step`` and ``lock_progress``, the first checkpoint whose mean Sim_K to the final
    channel reaches ``threshold`` (NaN if only the last does, trivially); ``sim_last_first``, that Sim_K at the
    first checkpoint; ``ref_step`` and ``sim_ref_last``, how much of the final channel lies in the reference one;
    ``stable_rank_ref`` (the paper chooses K just below it), ``stable_rank_min`` and ``stable_rank_max`` over
    training.
    """
    means = lock[["sim_last", "sim_ref", "stable_rank"]].mean(("layer", "module"))
    rows = []
    for name in lock.run.values:
        m = means.sel(run=name)
        m = m.isel(step=np.flatnonzero(m.progress.notnull().values))
        steps, progress = m.step.values, m.progress.values
        before_last = np.flatnonzero(m.sim_last.values[:-1] >= threshold)
        first = int(before_last[0]) if before_last.size else None
        ref = int(lock.ref_step.sel(run=name))
        rows.append(
            {
                "run": str(name),
                "method": str(m.method.values),
                "lock_step": int(steps[first]) if first is not None else np.nan,
                "lock_progress": float(progress[first]) if first is not None else np.nan,
                "sim_last_first": float(m.sim_last.values[0]),
                "ref_step": ref,
                "sim_ref_last": float(m.sim_ref.values[-1]),
                "stable_rank_ref": float(m.stable_rank.sel(step=ref)),
                "stable_rank_min": float(np.nanmin(m.stable_rank.values)),
                "stable_rank_max": float(np.nanmax(m.stable_rank.values)),
            }
        )
    return pd.DataFrame(rows).set_index("run")


def _reference(name, steps, progress, ref_step, ref_progress, store) -> int:
    if ref_step is None:
        values = progress.sel(step=steps).values
        return steps[int(np.argmin(np.abs(values - ref_progress)))]
    ref = ref_step[name] if isinstance(ref_step, Mapping) else ref_step
    if ref not in steps:
        raise StoreError(f"{store.path}: run {name!r} has no computed step {ref}; it has {steps}")
    return int(ref)
