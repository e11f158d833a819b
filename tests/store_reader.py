"""A reader of a store that another process is writing: ``python tests/store_reader.py KIND STORE RUN OUT STOP``.

Reads the store as ``KIND`` does (``dataset``, ``summarize``, ``explorer``, ``monitor`` or ``zarr``: xarray on the
raw zarr group) over and over until the file ``STOP`` exists, then once more, and appends one JSON line per read to
``OUT``: the steps of ``RUN`` it saw and, for ``dataset`` and ``zarr``, a SHA-256 of each variable at each step.
Exits 1 with the traceback if any read raises, except the StoreError of a store with no step computed yet.
The ``zarr`` reader follows the protocol of :meth:`opd_lens.Store.dataset`: the ``complete`` flags, then the values,
then the flags again; a step is complete if both reads say so.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

from opd_lens import LockMonitor, open_store, summarize
from opd_lens.errors import StoreError
from opd_lens.widgets import Explorer


def digests(ds: xr.Dataset) -> dict[str, dict[str, str]]:
    """Step -> variable -> SHA-256 of its float32 values at that step, of a Dataset of one run."""
    return {
        str(int(step)): {
            name: hashlib.sha256(np.ascontiguousarray(ds[name].sel(step=step).values, np.float32).tobytes()).hexdigest()
            for name in ds.data_vars
            if "step" in ds[name].dims
        }
        for step in ds.step.values
    }


def computed(ds: xr.Dataset) -> xr.Dataset:
    """The steps of a one-run Dataset that this run has computed."""
    return ds.isel(step=np.flatnonzero(ds.progress.notnull().values))


def read(kind: str, store: Path, run: str, monitor: list) -> dict:
    if kind == "zarr":
        if not (store / "data.zarr" / "complete").exists():  # the store creates it last
            raise StoreError(f"{store}: no arrays yet")
        raw = xr.open_zarr(store / "data.zarr", consolidated=False)
        before = raw.complete.load()  # the protocol: the flags, the values, the flags again
        raw = raw.load()
        names = [str(r) for r in raw.run.values]
        if run not in names:
            return {"steps": []}
        one = raw.isel(run=names.index(run))
        flags = (before.values[names.index(run)] == 1) & (one.complete.values == 1)
        done = one.isel(step=np.flatnonzero(flags)).drop_vars(["complete", "lock_ref"])
        done = done.drop_vars([v for v in done.data_vars if "step" not in done[v].dims])
        return {"steps": sorted(int(s) for s in done.step.values), "digests": digests(done)}
    if kind == "monitor":
        if not monitor:
            monitor.append(LockMonitor(store, run))
        monitor[0].refresh()
        return {"steps": monitor[0]._data["steps"]}
    s = open_store(store, create=False)
    if kind == "explorer":
        widget = Explorer(s)
        return {"steps": widget._data["steps"], "runs": widget._data["runs"]}
    ds = s.dataset()
    if kind == "summarize":
        row = summarize(ds).loc[run]
        return {"steps": int(row.steps), "last": int(row.last_step)}
    one = computed(ds.sel(run=run))
    return {"steps": [int(x) for x in one.step.values], "digests": digests(one)}


def main(kind: str, store: str, run: str, out: str, stop: str) -> None:
    monitor: list = []
    with open(out, "a") as f:
        while True:
            last = Path(stop).exists()
            try:
                seen = read(kind, Path(store), run, monitor)
            except StoreError as e:  # before the first step: no store, or no step computed yet
                seen = {"error": str(e)}
                time.sleep(0.05)
            f.write(json.dumps(seen) + "\n")
            f.flush()
            if last:
                return


if __name__ == "__main__":
    main(*sys.argv[1:])
