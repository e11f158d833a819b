"""The diagnostics store: a zarr v3 group holding the opd_lens Dataset, grown incrementally by one writer at a time.

Storage only: arrays, the run registry, the writer lock and the Dataset. What to compute and how is the engine's
(:mod:`opd_lens.engine`), which drives this module and is never imported by it.

On disk, ``STORE/data.zarr`` is the zarr group. Its attributes hold the schema version, the diagnostics settings and
the run registry; arrays with xarray dimension names hold the coordinates (``run``, ``step``, ``layer``, ``module``,
``angle_index``, ``numel``) and the variables of the Dataset, one chunk per (run, step), so steps are written
independently (by Dask workers too); ``lock_alignment`` and ``lock_ref``, which only the writer process rewrites when
a run gains a new last step, are chunked by blocks of steps. A step's values become visible only when its
``complete`` flag is set, which is written last; ``lock_alignment`` counts only where its ``lock_ref`` is the run's
last step. The registry (the group's ``runs`` attribute) records each computed checkpoint with its fingerprint,
whether it holds endpoint metrics and the step its ``lock_alignment`` refers to, so that planning a compute reads one
JSON document rather than an array chunk per step. Dimensions grow through an intent file, so a writer killed
mid-resize is repaired by the next one. ``STORE/cache/`` keeps the origin factors and the V_K bases of each step;
``STORE/.lock`` names the writer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import xarray as xr
import zarr
import zarr.api.asynchronous
from safetensors import SafetensorError
from zarr.core.sync import sync  # zarr's bridge to its I/O loop (a notebook's running loop rules out asyncio.run)

from ._version import __version__
from .cache import LockBases, OriginCache, settings_key
from .checkpoints import Checkpoint
from .checkpoints.names import natural_key
from .diagnostics import Settings, subspace_k
from .errors import CheckpointError, OpdLensError, StoreError, StoreLockedError
from .files import replacing
from .schema import SCHEMA_VERSION, VARIABLES

__all__ = [
    "Store",
    "open_store",
]

_DATA = "data.zarr"
_UNSET = {"run": "", "layer": np.iinfo(np.int64).min, "module": ""}
"""Fill value of a coordinate slot that was grown but not yet assigned."""
_LOCK = ".lock"
_GROW = ".grow.json"
_STEP_BLOCK = 32
_RUN_KEYS = ("run_dir", "origin", "method", "include_globals")
_RUN_FIELDS = {**dict.fromkeys(("run_dir", "origin", "method"), str), "include_globals": bool,
               "origin_fingerprint": str, "checkpoints": dict}  # fmt: skip
_ENTRY_FIELDS = {"path": str, "fingerprint": str, "endpoint": bool, "lock_ref": int, "schema": int}
_OPTIONAL = ("endpoint", "lock_ref", "schema")
"""Keys a registry entry of an older store lacks (:meth:`Store.recorded` completes ``endpoint`` and ``lock_ref``)."""
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}  # fmt: skip
_T = TypeVar("_T")


def open_store(path: str | os.PathLike, settings: Settings | None = None, *, create: bool = True) -> Store:
    """Open the store at ``path``, creating it (with ``settings``, default :class:`Settings`) if it does not exist
    and ``create`` is true.

    An existing store keeps the settings it was created with; passing different ones is an error, since values
    computed under different hyper-parameters cannot share one Dataset.
    """
    path = Path(path)
    if not (path / _DATA / "zarr.json").is_file():
        if not create:
            raise StoreError(f"{path}: no opd_lens store here")
        leftover = {_DATA, _LOCK}  # what a creation killed before writing zarr.json leaves
        if path.exists() and (not path.is_dir() or any(p.name not in leftover for p in path.iterdir())):
            raise StoreError(f"{path}: exists and is not an opd_lens store")
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "opd_lens_version": __version__,
            "settings": (settings or Settings()).asdict(),
            "runs": {},
            "home": os.path.realpath(path),
        }
        try:
            zarr.create_group(path / _DATA, attributes=attrs, overwrite=True)  # one atomic write of zarr.json
        except OSError as e:
            raise StoreError(f"{path}: cannot create the store: {_why(e)}") from None
    store = Store(path)
    if settings is not None and settings != store.settings:
        raise StoreError(
            f"{path}: the store was computed with {store.settings}, not {settings}; use another store for these "
            "settings"
        )
    return store


class Store:
    """An opd_lens store: the Dataset (:meth:`dataset`), the registry of its runs and the arrays the engine fills.

    :func:`opd_lens.open_store` returns one with the engine's verbs attached (``add_run``, ``compute``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._locked = False
        self._held: dict[str, object] = {}
        """What the writer holding the lock has read (the registry as JSON, coordinate indices): no other process
        changes them meanwhile, so each is read once per :meth:`writer` session."""
        self._bases: dict[Path, dict[str, torch.Tensor]] = {}
        self._home = os.path.realpath(self.path)
        self.data_path = self.path / _DATA
        """The zarr group; ``xr.open_zarr(store.data_path)`` shows the raw arrays (uncommitted slots included)."""
        try:
            self._group = zarr.open_group(self.data_path, mode="r+")
            attrs = dict(self._group.attrs)
        except Exception as e:  # zarr raises many types for a damaged or foreign directory
            raise StoreError(f"{self.path}: not a readable opd_lens store ({type(e).__name__}: {e})") from None
        if (version := self._attr(attrs, "schema_version", int)) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer opd_lens (schema {version}, this is {SCHEMA_VERSION}); upgrade"
            )
        self.settings = self._settings(self._attr(attrs, "settings", dict))
        home = self._attr(attrs, "home", str) if "home" in attrs else None
        self._moved_from = os.path.dirname(home) if home and home != self._home else None
        """The folder that held the store when its paths were recorded, if the store has moved since."""

    def __repr__(self) -> str:
        return f"<opd_lens.Store '{self.path}' runs={list(self.runs)}>"

    # --- registry ---------------------------------------------------------------------------------------------

    @property
    def runs(self) -> dict[str, dict]:
        """The registered runs: name -> run_dir, origin, method, include_globals, fingerprints and the computed
        checkpoints. Paths are absolute; when the store has moved with the folder that holds it (``runs/`` beside
        ``store/`` in a project or demo folder), the paths that lay in that folder follow it."""
        runs = self._registry()
        if (moved_from := self._moved_from) is None:
            return runs
        return {name: self._followed(run, moved_from) for name, run in runs.items()}

    def relocate(self, old: str | os.PathLike, new: str | os.PathLike) -> int:
        """Point every recorded path below ``old`` at the same place below ``new`` (runs or origins that moved);
        returns how many paths changed. Nothing is written unless every run's directory and origin then exist."""
        old, new = os.path.abspath(old), os.path.abspath(new)
        changed = self._relocated(old, new)[1]  # checked before the writer lock, whose entry may migrate the store
        with self.writer():
            self._update_runs(self._relocated(old, new)[0])
        return changed

    def _relocated(self, old: str, new: str) -> tuple[dict[str, dict], int]:
        runs, changed = {}, 0
        for name, run in self.runs.items():
            out = runs[name] = _rebased(run, old, new)
            changed += sum(out[k] != run[k] for k in ("run_dir", "origin"))
            changed += sum(out["checkpoints"][s] != e for s, e in run["checkpoints"].items())
        if not changed:
            where = ", ".join(sorted({run["run_dir"] for run in self.runs.values()}))
            raise StoreError(f"{self.path}: no recorded path lies below {old}; the runs are at {where}")
        for name, out in runs.items():
            if missing := [out[k] for k in ("run_dir", "origin") if not os.path.exists(out[k])]:
                raise StoreError(
                    f"{self.path}: run {name!r} would point to {missing[0]}, which does not exist; nothing changed"
                )
        return runs, changed

    def _registry(self) -> dict[str, dict]:
        """The run registry as stored."""
        if isinstance(held := self._held.get("runs"), str):
            return json.loads(held)
        runs = self._checked(dict(self._attr(zarr.open_group(self.data_path, mode="r").attrs, "runs", dict)))
        if self._locked:
            self._held["runs"] = json.dumps(runs)
        return runs

    def _followed(self, run: dict, old: str) -> dict:
        """``run`` with the paths that lay in ``old``, the folder the store was in, moved to the folder it is in now,
        unless its directory is still where it was recorded (the store alone was copied)."""
        if not _below(run["run_dir"], old) or os.path.exists(run["run_dir"]):
            return run
        return _rebased(run, old, os.path.dirname(self._home))

    def register_run(self, name: str, spec: Mapping, shapes: Mapping[tuple[int, str], tuple[int, int]]) -> None:
        """Register run ``name`` (``spec``: run_dir, origin, method, include_globals, origin_fingerprint) with its
        analysed matrices, ``(layer, module) -> shape``: creates the arrays and coordinates they need. Registering
        the same run again is a no-op; reusing a name for another run is an error."""
        if not isinstance(name, str) or not name.strip():
            raise StoreError(f"run name must be a non-empty string, got {name!r}")
        known = self.runs.get(name)
        if known is not None:
            if {k: known[k] for k in _RUN_KEYS} != {k: spec[k] for k in _RUN_KEYS}:
                raise StoreError(f"{self.path}: run {name!r} is already registered as {_describe(known)}")
            return
        with self.writer():
            slots = self._ensure_arrays(name, shapes)
            r, layers, modules = slots["run"][name], slots["layer"], slots["module"]
            numel = self._array("numel")
            block = np.zeros(numel.shape[1:], dtype=np.int64)
            for (layer, module), shape in shapes.items():
                block[layers[layer], modules[module]] = shape[0] * shape[1]
            numel[r] = block
            self._update_runs({name: {**{k: spec[k] for k in (*_RUN_KEYS, "origin_fingerprint")}, "checkpoints": {}}})

    # --- read -------------------------------------------------------------------------------------------------

    def dataset(
        self, lazy: bool = False, *, runs: Iterable[str] | None = None, steps: Iterable[int] | None = None
    ) -> xr.Dataset:
        """The opd_lens Dataset: completed steps only, sorted by step, with ``progress`` and ``method`` coords, and
        ``expert`` / ``projection`` along ``module`` to group MoE experts (see :meth:`_expert_coords`). Each
        variable carries the ``long_name``, ``units`` and ``description`` of :mod:`opd_lens.schema`; the attrs hold
        the settings and ``runs``, the run registry as a JSON document (``json.loads``), so that
        ``ds.to_netcdf()`` writes it.

        By default a snapshot loaded into memory. ``lazy=True`` (needs dask) keeps the variables as dask arrays
        read on demand, one (run, step) chunk at a time, for stores too large for memory; such a Dataset reads
        whatever the store holds when it is computed, so take it while no compute is writing.

        ``runs`` and ``steps`` keep only those runs (by name) and steps: only their chunks are read, so a few steps
        of a long run cost what they hold, not what the store holds. Steps not computed are left out (``progress``
        stays each step's fraction of its run's last computed step, whether or not that one is kept).
        """
        registry = self.runs
        if not registry or not (self.data_path / "complete").exists():  # its metadata is read (and checked) by _array
            raise StoreError(f"{self.path}: the store holds no computed runs yet (add a run and compute)")
        computed = StoreError(f"{self.path}: no step has been computed yet (run compute)")
        if not any(run["checkpoints"] for run in registry.values()):
            raise computed
        if runs is not None:
            runs = list(runs)
            if unknown := [r for r in runs if r not in registry]:
                raise StoreError(f"{self.path}: no run named {unknown[0]!r}; registered: {list(registry)}")
            registry = {name: registry[name] for name in registry if name in runs}
        ds, last = self._open_raw(lazy, registry, None if steps is None else {int(s) for s in steps})
        complete = ds["complete"] == 1
        ds = ds.isel(step=np.flatnonzero(complete.any("run").values))
        if not ds.sizes["step"] and runs is None and steps is None:
            raise computed
        complete = ds["complete"] == 1
        variables = {}
        for name, v in VARIABLES.items():  # a variable newer than the store (not yet migrated) reads as NaN
            da = ds[name] if name in ds else _missing(ds, v, self.settings)
            valid = complete & (ds["lock_ref"] == last) if name == "lock_alignment" else complete
            variables[name] = da.where(valid).assign_attrs(v.attrs)
        out = xr.Dataset(variables, coords={"numel": ds["numel"]})
        out = out.assign_coords(
            progress=(ds.step / last).where(complete).transpose("run", "step"),
            method=("run", [registry[r]["method"] for r in ds.run.values]),
        )
        out = out.sortby("step").isel(
            run=np.argsort([list(registry).index(r) for r in out.run.values], kind="stable"),
            layer=np.argsort(out.layer.values, kind="stable"),
            module=sorted(range(out.sizes["module"]), key=lambda i: natural_key(str(out.module.values[i]))),
        )
        out = out.assign_coords(self._expert_coords(out.module.values))
        out = out.transpose("run", "step", "layer", "module", "angle_index", "rank_index")
        out.attrs = {
            "schema_version": SCHEMA_VERSION,
            "opd_lens_version": __version__,
            **self.settings.asdict(),
            "runs": json.dumps(registry),
        }
        return out

    @staticmethod
    def _expert_coords(modules) -> dict[str, tuple[str, np.ndarray]]:
        """The ``expert`` and ``projection`` coords along ``module``: ``expert`` is ``e`` in a module named
        ``….experts.{e}.…`` (-1 for any other matrix), ``projection`` the name without ``.{e}``
        (``mlp.experts.3.down_proj`` -> ``mlp.experts.down_proj``), or the module name itself."""
        expert, projection = [], []
        for module in map(str, modules):
            parts = module.split(".")
            hits = [
                i
                for i in range(1, len(parts) - 1)
                if parts[i - 1].rpartition("/")[2] == "experts" and parts[i].isascii() and parts[i].isdigit()
            ]
            expert.append(int(parts[hits[0]]) if hits else -1)
            projection.append(".".join(parts[: hits[0]] + parts[hits[0] + 1 :]) if hits else module)
        return {
            "expert": ("module", np.array(expert, dtype=np.int64)),
            "projection": ("module", np.array(projection, dtype=str)),
        }

    def _open_raw(
        self, lazy: bool, registry: Mapping[str, dict], steps: set[int] | None, attempts: int = 5
    ) -> tuple[xr.Dataset, xr.DataArray]:
        """The raw arrays of the runs of ``registry`` at ``steps`` (all if ``None``) that it records, and each run's
        last complete step; retried while a writer is between resizing two arrays.

        A step counts as complete if the registry records it and its ``complete`` flag reads 1 before the values
        are read and again after them; a lock_alignment is current if ``lock_ref`` reads the same both times. A
        writer unrecords a step and clears its flag before rewriting it, sets the flag after and then records it,
        and marks lock_alignment stale before rewriting it: a step written while the values were read is left out
        rather than shown half written. Only the slots of the kept steps are read, and each run's last recorded."""
        recorded = {name: {int(s) for s in run["checkpoints"]} for name, run in registry.items()}
        shown = set().union(*recorded.values())
        shown = shown if steps is None else shown & steps
        read = shown | {max(s) for s in recorded.values() if s}
        for _ in range(attempts):
            try:
                # the store writes no CF attributes: decoding ones that a forged store carries would only break
                ds = xr.open_zarr(self.data_path, consolidated=False, chunks={} if lazy else None, decode_cf=False)
                ds = ds.assign_coords(run=[str(v) for v in ds.run.values], module=[str(v) for v in ds.module.values])
                ds = ds.isel(
                    run=np.flatnonzero(np.isin(ds.run.values, list(registry))),
                    layer=np.flatnonzero(ds.layer.values != _UNSET["layer"]),
                    module=np.flatnonzero(ds.module.values != _UNSET["module"]),
                    step=np.flatnonzero(np.isin(ds.step.values, list(read))),
                )
                before = ds[["complete", "lock_ref", "numel"]].load()
                ds = ds.assign(before) if lazy else ds.load()
                inside = [[int(s) in recorded[str(r)] for s in ds.step.values] for r in ds.run.values]
                complete = (before.complete == 1) & (ds.complete == 1) & xr.DataArray(inside, dims=("run", "step"))
                last = ds.step.where(complete).max("step")
                ds = ds.assign(
                    complete=complete.astype(np.int64),
                    lock_ref=ds.lock_ref.where(before.lock_ref == ds.lock_ref, -1),
                )
                return ds.isel(step=np.flatnonzero(np.isin(ds.step.values, list(shown)))), last
            except Exception as e:
                if damage := self._damage():
                    raise StoreError(f"{self.path}: {damage}; a damaged opd_lens store") from None
                if not isinstance(e, ValueError):
                    raise
                error = e  # conflicting dimension sizes
                time.sleep(0.2)
        raise StoreError(
            f"{self.path}: arrays disagree in size ({error}); a writer was interrupted while growing the store: run "
            "`opd-lens compute` (or Store.compute) on it once to repair"
        )

    # --- writing (callers hold the writer lock) -----------------------------------------------------------------

    @contextmanager
    def writer(self) -> Iterator[Store]:
        """Hold the store's writer lock (re-entrant within this object); repair an interrupted resize on entry.

        A write that fails (a full disk, a read-only file system) raises :class:`StoreError`; what was written is
        consistent, since a step becomes visible only with its ``complete`` flag, written last."""
        if self._locked:
            yield self
            return
        _acquire(self.path / _LOCK)
        self._locked = True
        try:
            self._group = zarr.open_group(self.data_path, mode="r+")  # its attributes as the last writer left them
            self._finish_grow()
            self._migrate()
            if self._moved_from is not None:  # record the paths where they are now
                self._update_runs({})
            yield self
        except (OSError, SafetensorError) as e:
            if isinstance(e, OpdLensError):  # CheckpointNotFoundError is an OSError too
                raise
            raise StoreError(f"{self.path}: cannot write the store: {_why(e)}") from None
        finally:
            self._locked = False
            self._held.clear()
            (self.path / _LOCK).unlink(missing_ok=True)

    def run_index(self, name: str) -> int:
        return self._coord_index("run")[name]

    def grid(self) -> tuple[dict[int, int], dict[str, int], int, int]:
        """Index of each layer and module value, and the sizes of ``angle_index`` and ``rank_index``."""
        layers, modules = self._coord_index("layer"), self._coord_index("module")
        return layers, modules, self._array("angle_index").shape[0], self._array("rank_index").shape[0]

    def recorded(self, name: str) -> dict[int, dict]:
        """Step -> registry entry (``path``, ``fingerprint``, ``endpoint``, ``lock_ref``) of every checkpoint of run
        ``name`` whose step is complete. Entries of a store written before ``endpoint`` and ``lock_ref`` were
        recorded are completed from the arrays once, in place."""
        entries = {int(k): v for k, v in self.runs[name]["checkpoints"].items()}
        if any("endpoint" not in e or "lock_ref" not in e for e in entries.values()):
            entries = self._complete_registry(name, entries)
        return entries

    def _complete_registry(self, name: str, entries: dict[int, dict]) -> dict[int, dict]:
        r = self.run_index(name)
        steps = self._read("step")
        done = self._read("complete", (r, slice(None))) == 1
        angles = ~np.isnan(self._read("max_angle_v", r)).all(axis=(-2, -1))
        lock = self._read("lock_ref", (r, slice(None)))
        slots = {int(s): i for i, s in enumerate(steps) if s >= 0}
        kept = {}
        for step, e in entries.items():
            i = slots.get(step)
            if i is not None and done[i]:
                kept[step] = {**e, "endpoint": bool(angles[i]), "lock_ref": int(lock[i])}
        self._update_runs({name: {**self.runs[name], "checkpoints": {str(k): v for k, v in kept.items()}}})
        return kept

    def used_slots(self) -> set[int]:
        """The slots along ``step`` that have been given a step (and may hold values)."""
        return {int(i) for i in np.flatnonzero(self._read("step") >= 0)}

    def step_slots(self, steps: Iterable[int]) -> dict[int, int]:
        """The slot of each step along the step dimension, allocating slots (in blocks) for new ones; one read (per
        writer session) and at most one write of the step coordinate."""
        steps = list(steps)
        held = self._held.get("step")
        coord = held if isinstance(held, np.ndarray) else self._read("step")
        index = {int(s): i for i, s in enumerate(coord) if s >= 0}
        new = [s for s in dict.fromkeys(steps) if s not in index]
        if new:
            free = [int(i) for i in np.flatnonzero(coord < 0)]
            if len(free) < len(new):
                size = coord.shape[0] + _STEP_BLOCK * math.ceil((len(new) - len(free)) / _STEP_BLOCK)
                self._grow({"step": size})
                free += range(coord.shape[0], size)
                coord = np.concatenate([coord, np.full(size - coord.shape[0], -1, coord.dtype)])
            index.update(zip(new, free, strict=False))
            coord = coord.copy()
            for s in new:
                coord[index[s]] = s
            lo, hi = min(index[s] for s in new), max(index[s] for s in new) + 1
            self._array("step")[lo:hi] = coord[lo:hi]
        if self._locked:
            self._held["step"] = coord
        return {s: index[s] for s in steps}

    def cache_dir(self, *parts: str) -> Path:
        path = self.path.joinpath("cache", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run_cache(self, name: str) -> Path:
        return self.cache_dir("runs", hashlib.sha256(name.encode()).hexdigest()[:16])

    def lock_bases(self, name: str) -> LockBases:
        """The cached V_K(t) of run ``name``: the top-K right singular vectors of every ΔW_t (K = lock_k)."""
        return LockBases(self.run_cache(name), self._bases)

    def origin_cache(self, origin: Checkpoint) -> OriginCache:
        """The cached factors of W_0 for ``origin`` under this store's settings (shared by the runs from it)."""
        key = f"{origin.fingerprint[:16]}-{settings_key(self.settings)}"
        return OriginCache(self.cache_dir("origin", key), self.settings)

    # --- writing (callers hold the writer lock) -----------------------------------------------------------------

    def record(self, name: str, entries: Mapping[int, Mapping | None]) -> None:
        """Record computed checkpoints of run ``name`` in the registry: step -> its entry (``path``,
        ``fingerprint``, ``endpoint``, ``lock_ref``), replacing what was recorded; an entry ``None`` unrecords the
        step (before it is rewritten, so that a compute killed mid-write recomputes it). One write for all."""
        if not entries:
            return
        run = self.runs[name]
        checkpoints = dict(run["checkpoints"])
        for step, entry in entries.items():
            if entry is None:
                checkpoints.pop(str(step), None)
            else:
                checkpoints[str(step)] = dict(entry)
        self._update_runs({name: {**run, "checkpoints": checkpoints}})

    def step_writer(self) -> StepWriter:
        """A writer of whole (run, step) regions that keeps the group open (see :func:`write_step`)."""
        return StepWriter(self.data_path)

    def write_lock(self, name: str, values: Mapping[int, np.ndarray | None], ref_step: int) -> None:
        """Sim_K to the final channel for steps of run ``name`` (step -> (layer, module) values; ``None`` marks
        the step stale), with the step it refers to: one write of each lock array for all of them."""
        if not values:
            return
        r = self.run_index(name)
        slots = self.step_slots(values)
        lo, hi = min(slots.values()), max(slots.values()) + 1
        covered = len(slots) == hi - lo  # every slot of the range is written: nothing needs reading back first
        refs, locks = self._array("lock_ref"), self._array("lock_alignment")
        ref = np.empty(hi - lo, refs.dtype) if covered else np.asarray(refs[r, lo:hi])
        for step in values:
            ref[slots[step] - lo] = -1
        if any(v is not None for v in values.values()):
            refs[r, lo:hi] = ref  # stale while their values are rewritten: a reader never pairs new values, old ref
            whole = covered and all(v is not None for v in values.values())
            lock = np.empty((hi - lo, *locks.shape[2:]), locks.dtype) if whole else np.asarray(locks[r, lo:hi])
            for step, v in values.items():
                if v is not None:
                    lock[slots[step] - lo] = v
            locks[r, lo:hi] = lock
        for step, v in values.items():
            ref[slots[step] - lo] = -1 if v is None else ref_step
        refs[r, lo:hi] = ref

    # --- internals ----------------------------------------------------------------------------------------------

    def _damage(self) -> str | None:
        """What keeps xarray from reading the arrays, if it is their metadata: metadata that zarr cannot read, or a
        _FillValue attribute (which xarray decodes, and opd_lens never writes)."""
        for member in sorted(p for p in self.data_path.iterdir() if (p / "zarr.json").is_file()):
            try:
                attrs = zarr.open_array(member, mode="r").attrs
            except Exception as e:  # zarr raises many types for damaged metadata
                return f"array {member.name} of {_DATA} cannot be read ({type(e).__name__}: {e})"
            if "_FillValue" in attrs:
                return f"array {member.name} of {_DATA} has a _FillValue attribute, which opd_lens never writes"
        return None

    def _array(self, name: str) -> zarr.Array:
        """The array ``name`` of the group (zarr types a member as an array or a group)."""
        try:
            node = self._group[name]
        except Exception as e:  # zarr raises many types for damaged metadata
            raise StoreError(
                f"{self.path}: array {name} of {_DATA} cannot be read ({type(e).__name__}: {e}); a damaged opd_lens "
                "store"
            ) from None
        if not isinstance(node, zarr.Array):
            raise StoreError(f"{self.path}: {name} in {_DATA} is a group, not an array; a damaged opd_lens store")
        return node

    def _read(self, name: str, selection: int | slice | tuple[int | slice, ...] = slice(None)) -> np.ndarray:
        """``selection`` of the array ``name``, read into memory."""
        return np.asarray(self._array(name)[selection])

    def _attr(self, attrs: Mapping[str, object], key: str, kind: type[_T]) -> _T:
        """Attribute ``key`` of the group as the store wrote it, a ``kind`` (JSON: a dict, str or int)."""
        if key not in attrs:
            raise StoreError(f"{self.path}: {_DATA} has no attribute {key!r}; not an opd_lens store, or a damaged one")
        if type(value := attrs[key]) is not kind:
            raise StoreError(
                f"{self.path}: attribute {key!r} of {_DATA} is {_json_type(value)}, not {_JSON_TYPES[kind]}; not an "
                "opd_lens store, or a damaged one"
            )
        return value

    def _settings(self, values: dict) -> Settings:
        """The settings of the ``settings`` attribute (a key it lacks takes its default), checked."""
        kinds = {k: (bool,) if isinstance(v, bool) else (int, float) for k, v in Settings().asdict().items()}
        for key, value in values.items():
            if type(value) not in kinds.get(key, ()):
                what = f"is {_short(value)}, not {_JSON_TYPES[kinds[key][-1]]}" if key in kinds else "is unknown"
                raise StoreError(f"{self.path}: setting {_short(key)} of {_DATA} {what}; a damaged opd_lens store")
        try:
            return Settings(**values)
        except ValueError as e:
            raise StoreError(
                f"{self.path}: the settings of {_DATA} are not valid ({e}); a damaged opd_lens store"
            ) from None

    def _checked(self, runs: dict) -> dict[str, dict]:
        """``runs``, the run registry as read, if each run and checkpoint entry holds what the store writes."""
        if problem := next(_registry_problems(runs), None):
            where, wrong = problem
            raise StoreError(f"{self.path}: {where} in the registry of {_DATA} {wrong}; a damaged opd_lens store")
        return runs

    def _update_runs(self, changes: Mapping[str, dict]) -> None:
        """Replace registry entries with one write, recording where the store is now."""
        runs = {**self.runs, **changes}
        self._held.pop("runs", None)  # a failed write must not leave a registry that the store does not hold
        self._group.update_attributes({"runs": runs, "home": self._home})  # one write of zarr.json
        self._moved_from = None
        if self._locked:
            self._held["runs"] = json.dumps(runs)

    def _coord_index(self, dim: str, values: np.ndarray | None = None) -> dict:
        """Value -> slot of the assigned slots of coordinate ``dim`` (``values``: that array, if already read)."""
        if values is None and isinstance(held := self._held.get(dim), dict):
            return dict(held)
        read = values is None
        values = self._read(dim) if values is None else values
        cast = int if dim == "layer" else str
        index = {cast(v): i for i, v in enumerate(values) if v != _UNSET[dim]}
        if read and self._locked:
            self._held[dim] = dict(index)
        return index

    def _ensure_arrays(self, run: str, shapes: Mapping[tuple[int, str], tuple[int, int]]) -> dict[str, dict]:
        """Create missing arrays and give ``run`` and the layers and modules of its matrices ``shapes`` a slot each,
        growing the grid (and ``angle_index``, and ``step`` to its first block of slots) in one step; idempotent, so a
        writer killed half-way is completed by the next. Returns dim -> {value: slot} for those values."""
        k = max(subspace_k(self.settings.angle_k, *shape) for shape in shapes.values())
        wanted: dict[str, list[str] | list[int]] = {
            "run": [run],
            "layer": sorted({layer for layer, _ in shapes}),
            "module": sorted({module for _, module in shapes}, key=natural_key),
        }
        r = self.settings.top_k
        for name, spec in _array_specs(len(wanted["layer"]), len(wanted["module"]), k, r).items():
            if name not in self._group:
                dims = spec.pop("dims")
                self._group.create_array(name, shape=(0,) * len(dims), dimension_names=list(dims), **spec)
        slots, new, sizes = {}, {}, {}
        for dim, values in wanted.items():
            slots[dim], new[dim], size = self._slots(dim, values)
            if size > self._array(dim).shape[0]:
                sizes[dim] = size
        if k > self._array("angle_index").shape[0]:
            sizes["angle_index"] = k
        if r > self._array("rank_index").shape[0]:
            sizes["rank_index"] = r
        if sizes and self._array("step").shape[0] == 0:  # the first block of step slots in the same resize
            sizes["step"] = _STEP_BLOCK
        if sizes:
            self._grow(sizes)
        for dim, assigned in new.items():
            self._held.pop(dim, None)
            for value, i in assigned.items():
                self._array(dim)[i] = value
        for dim in ("angle_index", "rank_index"):
            self._array(dim)[:] = np.arange(self._array(dim).shape[0])
        return slots

    def _slots(self, dim: str, values) -> tuple[dict, dict, int]:
        """Slots of ``values`` in coordinate ``dim``: (all of them, the newly assigned ones, the size they need).
        New values take free slots first (grown by a writer killed before naming them), then slots past the end."""
        current = self._read(dim)
        index = self._coord_index(dim, current)
        free = iter(np.flatnonzero(current == _UNSET[dim]).tolist())
        size = current.shape[0]
        slots, new = {}, {}
        for value in values:
            if value not in index:
                i = next(free, None)
                if i is None:
                    i, size = size, size + 1
                index[value] = new[value] = i
            slots[value] = index[value]
        return slots, new, size

    def _grow(self, sizes: Mapping[str, int]) -> None:
        marker = self.path / _GROW
        with replacing(marker) as tmp:
            tmp.write_text(json.dumps(dict(sizes)))
        self._finish_grow()

    def _migrate(self) -> None:
        """Bring a store of an older schema to :data:`SCHEMA_VERSION` in place: create the arrays it lacks (NaN,
        shaped and chunked like the arrays of the same dimensions), then record the version. Each step is atomic
        and the whole is idempotent, so a writer killed half-way leaves a store the next writer completes."""
        if self._attr(self._group.attrs, "schema_version", int) >= SCHEMA_VERSION:
            return
        if "complete" in self._group:  # the arrays exist; a store without them gets all of them on registration
            if "rank_index" not in self._group:  # the dimension of update_spectrum (schema 3)
                r = self.settings.top_k
                self._group.create_array(
                    "rank_index", shape=(r,), chunks=(r,), dtype=np.int64, dimension_names=["rank_index"]
                )
            self._array("rank_index")[:] = np.arange(self._array("rank_index").shape[0])  # again, if cut short before
            like = self._array("stable_rank")  # (run, step, layer, module), chunked one (run, step) at a time
            for name, v in VARIABLES.items():
                if name not in self._group:
                    extra = [self._array(d).shape[0] for d in v.dims[4:]]
                    self._group.create_array(
                        name,
                        shape=(*like.shape, *extra),
                        chunks=(*like.chunks, *(max(n, 1) for n in extra)),
                        dtype=np.float32,
                        fill_value=np.nan,
                        dimension_names=list(v.dims),
                    )
        self._group.attrs["schema_version"] = SCHEMA_VERSION

    def _finish_grow(self) -> None:
        marker = self.path / _GROW
        if not marker.is_file():
            return
        sizes = json.loads(marker.read_text())
        for _, arr in self._group.arrays():
            meta = arr.metadata  # a zarr v3 group's arrays are v3 arrays, which have dimension names
            dims = (meta.dimension_names if meta.zarr_format == 3 else None) or ()
            shape = tuple(max(sizes.get(d, n), n) for d, n in zip(dims, arr.shape, strict=True))
            if shape != arr.shape:
                self._held.pop(arr.basename, None)
                arr.resize(shape)
        marker.unlink()


def _array_specs(n_layers: int, n_modules: int, k: int, r: int) -> dict[str, dict]:
    """Every array of the store (``complete`` last: its presence means all exist), with chunks for this grid."""
    coord = {"chunks": (64,)}
    specs = {
        "run": {**coord, "dims": ("run",), "dtype": str, "fill_value": _UNSET["run"]},
        "layer": {**coord, "dims": ("layer",), "dtype": np.int64, "fill_value": _UNSET["layer"]},
        "module": {**coord, "dims": ("module",), "dtype": str, "fill_value": _UNSET["module"]},
        "step": {"dims": ("step",), "chunks": (_STEP_BLOCK,), "dtype": np.int64, "fill_value": -1},
        "angle_index": {"dims": ("angle_index",), "chunks": (max(k, 1),), "dtype": np.int64, "fill_value": 0},
        "rank_index": {"dims": ("rank_index",), "chunks": (r,), "dtype": np.int64, "fill_value": 0},
        "numel": {
            "dims": ("run", "layer", "module"),
            "chunks": (1, n_layers, n_modules),
            "dtype": np.int64,
            "fill_value": 0,
        },
        "lock_ref": {"dims": ("run", "step"), "chunks": (1, _STEP_BLOCK), "dtype": np.int64, "fill_value": -1},
    }
    for name, v in VARIABLES.items():
        dims = v.dims
        steps = _STEP_BLOCK if name == "lock_alignment" else 1  # rewritten for all steps at once, by one process
        chunks = (1, steps, n_layers, n_modules) + tuple(
            {"angle_index": max(k, 1), "rank_index": r}[d] for d in dims[4:]
        )
        specs[name] = {"dims": dims, "chunks": chunks, "dtype": np.float32, "fill_value": np.nan}
    specs["complete"] = {"dims": ("run", "step"), "chunks": (1, 1), "dtype": np.int64, "fill_value": 0}
    return specs


class StepWriter:
    """Writes whole (run, step) regions of one store: the ``complete`` flag cleared, every variable's chunk at once
    (concurrently, on zarr's I/O loop), then the flag set; the group and its arrays stay open. Safe in a Dask
    worker: each region is its own set of chunks."""

    def __init__(self, path: Path):
        self._path = path
        self._group: zarr.AsyncGroup = sync(zarr.api.asynchronous.open_group(path, mode="r+"))
        self._arrays: dict[str, zarr.AsyncArray] = {}

    def __call__(
        self, run: int, slot: int, scalars: Mapping[str, np.ndarray], angles: Mapping[str, np.ndarray] | None
    ) -> None:
        """Write one region and mark it complete. ``angles=None`` leaves the angle arrays untouched (a slot never
        written holds only their fill value, NaN)."""
        sync(self._write(run, slot, {**scalars, **(angles or {})}))

    async def _write(self, run: int, slot: int, blocks: Mapping[str, np.ndarray]) -> None:
        complete = await self._array("complete")
        await complete.setitem((run, slot), 0)
        arrays = await asyncio.gather(*(self._array(name) for name in blocks))
        writes = (a.setitem((run, slot), block) for a, block in zip(arrays, blocks.values(), strict=True))
        # every write runs to its end before a failure is raised: one cut short would leave a partial chunk file
        for outcome in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
        await complete.setitem((run, slot), 1)

    async def _array(self, name: str) -> zarr.AsyncArray:
        if name not in self._arrays:
            node = await self._group.getitem(name)
            if not isinstance(node, zarr.AsyncArray):
                raise StoreError(f"{self._path}: {name} is a group, not an array")
            self._arrays[name] = node
        return self._arrays[name]


def write_step(
    path: Path, run: int, slot: int, scalars: Mapping[str, np.ndarray], angles: Mapping[str, np.ndarray] | None
) -> None:
    """Write one (run, step) region and then mark it complete; safe to call from a Dask worker."""
    StepWriter(path)(run, slot, scalars, angles)


def _registry_problems(runs: dict) -> Iterator[tuple[str, str]]:
    """(where, what is wrong) for each run or checkpoint entry of a registry that is not as the store writes it."""
    for name, run in runs.items():
        if wrong := _wrong(run, _RUN_FIELDS) if name.strip() and _utf8(name) else "is not a run name":
            yield f"run {_short(name)}", wrong
            continue
        for step, entry in run["checkpoints"].items():
            if wrong := _wrong(entry, _ENTRY_FIELDS) if step.isascii() and step.isdigit() else "is not a step number":
                yield f"checkpoint {_short(step)} of run {_short(name)}", wrong


def _wrong(record: object, fields: Mapping[str, type]) -> str | None:
    """What keeps ``record`` from being a JSON object with ``fields`` (key -> type; keys in :data:`_OPTIONAL` may be
    missing), or None."""
    if type(record) is not dict:
        return f"is {_json_type(record)}, not an object"
    for key, kind in fields.items():
        if key not in record:
            if key not in _OPTIONAL:
                return f"has no {key!r}"
        elif type(value := record[key]) is not kind:
            return f"has {key!r} = {_short(value)}, not {_JSON_TYPES[kind]}"
        elif isinstance(value, str) and not _utf8(value):
            return f"has {key!r} = {_short(value)}, not valid Unicode"
    return None


def _utf8(text: str) -> bool:
    """Whether UTF-8 encodes ``text``: JSON escapes such as ``\\ud800`` decode to lone surrogates, which it cannot."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: object) -> str:
    """The JSON type of a decoded value, in words: ``an object``, ``a string``, ``null``…"""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    """``value`` as JSON (ASCII, one line), cut short: a forged store's strings may be megabytes."""
    text = json.dumps(value)
    return text if len(text) <= 80 else f"{text[:60]}…{text[-16:]}"


def _missing(ds: xr.Dataset, v, settings: Settings) -> xr.DataArray:
    """A variable that a store of an older schema lacks, as NaN (``rank_index`` sized by the settings if absent too)."""
    da = xr.full_like(ds["stable_rank"], np.nan)
    for dim in v.dims[4:]:
        size = ds.sizes[dim] if dim in ds.dims else settings.top_k
        da = da.expand_dims({dim: np.arange(size)}, axis=-1)
    return da


def _resolved(path: str | os.PathLike) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError) as e:  # RuntimeError: a symbolic link loop
        raise CheckpointError(f"{path}: cannot resolve the path: {e}") from None


def _below(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _rebased(run: Mapping, old: str, new: str) -> dict:
    """A registry entry with its paths below ``old`` moved below ``new``."""

    def moved(path: str) -> str:
        return new + path[len(old.rstrip(os.sep)) :] if _below(path, old) else path

    entries = {s: {**e, "path": moved(e["path"])} if "path" in e else e for s, e in run["checkpoints"].items()}
    return {**run, "run_dir": moved(run["run_dir"]), "origin": moved(run["origin"]), "checkpoints": entries}


def _describe(run: Mapping) -> str:
    return f"run_dir {run['run_dir']}, origin {run['origin']}, method {run['method']!r}"


def _acquire(lock: Path) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid, host = {}, -1, ""
            unreadable_and_old = pid <= 0 and _age(lock) > 2.0  # a writer died while writing the lock file
            if unreadable_and_old or (pid > 0 and host == me["host"] and not _alive(pid)):
                lock.unlink(missing_ok=True)  # stale: its writer is gone
                continue
            if pid <= 0:
                time.sleep(0.5)  # being written this instant
                continue
            raise StoreLockedError(
                f"{lock.parent}: store is locked by PID {pid} on {host} since {holder.get('since', '?')}; if that "
                f"process is gone, delete {lock}"
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as e:  # a full disk: leave no empty lock behind
            lock.unlink(missing_ok=True)
            raise StoreError(f"{lock.parent}: cannot write the store lock {lock}: {_why(e)}") from None
        return
    raise StoreLockedError(f"{lock.parent}: cannot take the store lock {lock}")


def _why(e: BaseException) -> str:
    """An OS error in a few words: its reason and the file (``No space left on device: .../c/0/0``)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
