"""The store as users hold it: the storage of :mod:`opd_lens.store` with the engine's verbs attached.

The storage layer never imports the engine; this module, above both, joins them, so that ``opd_lens.open_store``
gives an object that registers runs, computes them and returns the Dataset.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import xarray as xr

from . import engine
from . import store as storage
from .diagnostics import Settings

__all__ = ["Store", "open_store", "compute"]


class Store(storage.Store):
    """An opd_lens store: register runs with :meth:`add_run`, fill it with :meth:`compute`, read :meth:`dataset`."""

    def add_run(
        self,
        name: str,
        run_dir: str | os.PathLike,
        origin: str | os.PathLike,
        method: str | None = None,
        include_globals: bool = False,
        *,
        allow_pickle: bool = False,
    ) -> None:
        """Register a run: its checkpoint directory, its origin W_0 and its method label (default: ``name``); see
        :func:`opd_lens.engine.add_run`."""
        engine.add_run(self, name, run_dir, origin, method, include_globals, allow_pickle=allow_pickle)

    def compute(
        self,
        *,
        runs: Sequence[str] | None = None,
        device: str = "auto",
        endpoint: str | Sequence[int] = "last",
        client=None,
        progress: bool = True,
        allow_pickle: bool = False,
    ) -> engine.ComputeReport:
        """Compute every checkpoint not yet stored; see :func:`opd_lens.engine.compute_store`."""
        return engine.compute_store(
            self,
            runs=runs,
            device=device,
            endpoint=endpoint,
            client=client,
            progress=progress,
            allow_pickle=allow_pickle,
        )


def open_store(path: str | os.PathLike, settings: Settings | None = None, *, create: bool = True) -> Store:
    """Open the store at ``path``, creating it (with ``settings``, default :class:`Settings`) if it does not exist
    and ``create`` is true; see :func:`opd_lens.store.open_store`."""
    return Store(storage.open_store(path, settings, create=create).path)


def compute(
    store: str | os.PathLike | storage.Store,
    run_dir: str | os.PathLike,
    *,
    origin: str | os.PathLike,
    name: str,
    method: str | None = None,
    settings: Settings | None = None,
    allow_pickle: bool = False,
    **kwargs,
) -> xr.Dataset:
    """One call: open (or create) ``store``, register the run, compute what is new of it and return the Dataset.

    ``kwargs`` go to :func:`opd_lens.engine.compute_store` (``device``, ``endpoint``, ``client``, ``progress``);
    ``allow_pickle``: see :func:`opd_lens.checkpoints.open_checkpoint`.
    """
    s = store if isinstance(store, storage.Store) else open_store(store, settings)
    engine.add_run(s, name, run_dir, origin, method, allow_pickle=allow_pickle)
    engine.compute_store(s, runs=[name], allow_pickle=allow_pickle, **kwargs)
    return s.dataset()
