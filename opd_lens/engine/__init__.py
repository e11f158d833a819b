"""The compute engine: register runs in a store and compute what is new of them into it.

Data flows one way: :mod:`~opd_lens.engine.plan` decides which checkpoints are new or changed, the pipeline
(:mod:`~opd_lens.engine.pipeline`) reads them one matrix at a time ahead of the compute, :mod:`opd_lens.diagnostics`
computes, and each (run, step) region is written into the :class:`~opd_lens.store.Store` once; then
:mod:`~opd_lens.engine.lock` brings ``lock_alignment`` up to date. W_0's factors (per origin) and the V_K bases
(per step) are kept in the store's caches (:mod:`opd_lens.cache`). The store never imports the engine.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints import find_checkpoints, matched_matrices, open_checkpoint
from ..diagnostics import Settings, angle_sides, channel_applies, principal_mask_applies
from ..errors import CheckpointError, CheckpointWarning, SettingsWarning, StepError, StoreError
from ..schema import SCHEMA_VERSION
from ..store import Store
from .lock import update_lock_alignment
from .pipeline import resolve_device, run_dask, run_local
from .plan import plan_run

__all__ = ["ComputeReport", "add_run", "compute_store", "resolve_device"]


@dataclass
class ComputeReport:
    """What one :func:`compute_store` call did."""

    steps: list[tuple[str, int]] = field(default_factory=list)
    """(run, step) pairs computed."""
    matrices_read: int = 0
    """Matrices read from checkpoints (origin and checkpoint reads alike): 0 when nothing was new."""
    lock_updates: int = 0
    """(run, step) pairs whose lock_alignment was (re)computed against a new last step."""
    skipped: list[str] = field(default_factory=list)
    """Why each checkpoint left out was skipped (unreadable, not matching the origin); nothing was written for it."""


def add_run(
    store: Store,
    name: str,
    run_dir: str | os.PathLike,
    origin: str | os.PathLike,
    method: str | None = None,
    include_globals: bool = False,
    *,
    allow_pickle: bool = False,
) -> None:
    """Register a run in ``store``: its checkpoint directory, its origin W_0 and its method label (default:
    ``name``).

    Checks that the run has readable checkpoints whose matrices match the origin's. Adding the same run again
    is a no-op; reusing a name for another run is an error. ``allow_pickle``: see
    :func:`~opd_lens.checkpoints.open_checkpoint`.
    """
    if not isinstance(name, str) or not name.strip():
        raise StoreError(f"run name must be a non-empty string, got {name!r}")
    run_path, origin_path = _resolved(run_dir), _resolved(origin)
    spec = {
        "run_dir": run_path,
        "origin": origin_path,
        "method": method or name,
        "include_globals": include_globals,
    }
    known = store.runs.get(name)
    if known is not None:  # the same run again (a no-op), or another one under this name (an error)
        store.register_run(name, {**spec, "origin_fingerprint": known["origin_fingerprint"]}, {})
        return
    origin_ckpt = open_checkpoint(origin_path, allow_pickle=allow_pickle)
    last = find_checkpoints(run_path, allow_pickle=allow_pickle)[-1]
    refs = matched_matrices(origin_ckpt, last, include_globals)
    shapes = {(ref.layer, ref.module): ref.shape for ref in refs}
    store.register_run(name, {**spec, "origin_fingerprint": origin_ckpt.fingerprint}, shapes)
    _warn_small(name, list(shapes.values()), store.settings)


def _warn_small(name: str, shapes: list[tuple[int, int]], settings: Settings) -> None:
    """One warning naming how many of a run's matrices are too small for each setting (their values are NaN)."""
    counts = {
        f"angle_k={settings.angle_k} on one side or both (principal angles)": sum(
            not all(angle_sides(*shape, settings.angle_k)) for shape in shapes
        ),
        f"mask_rank={settings.mask_rank} (principal_overlap)": sum(
            not principal_mask_applies(shape, settings.mask_rank) for shape in shapes
        ),
        f"lock_k={settings.lock_k} (lock_alignment, channel_energy)": sum(
            not channel_applies(shape, settings.lock_k) for shape in shapes
        ),
    }
    if too_small := [f"{n} of {len(shapes)} for {what}" for what, n in counts.items() if n]:
        warnings.warn(
            f"run {name!r}: matrices too small for the store's settings, their values stored as NaN (0 or 1 by "
            f"construction otherwise): {'; '.join(too_small)}. A fractional angle_k such as 1/8 scales k with "
            "each matrix; the other settings are fixed when the store is created.",
            SettingsWarning,
            stacklevel=3,
        )


def compute_store(
    store: Store,
    *,
    runs: Sequence[str] | None = None,
    device: str = "auto",
    endpoint: str | Sequence[int] = "last",
    client=None,
    progress: bool = True,
    allow_pickle: bool = False,
) -> ComputeReport:
    """Compute the diagnostics of every checkpoint of ``runs`` (default: all registered) not yet in ``store``.

    Incremental: a checkpoint already stored (same content fingerprint) is not read again, so a second call with
    nothing new reads no matrix; new checkpoints in a run directory are appended. W_0's factors are computed once
    per origin and cached in the store. When a run gains a newer last step, ``lock_alignment`` (Sim_K of V_K(t)
    to the final channel V_K(last)) is recomputed for all of that run's steps from cached bases.

    ``endpoint`` chooses the steps that also get principal angles and the spectral shift: ``"last"`` (each run's
    last checkpoint), ``"all"``, ``"none"`` or a list of steps. Stored steps that lack them are recomputed;
    angles already stored are kept (so a step that was last when computed keeps its angles).

    ``client`` (a ``dask.distributed.Client``) runs one task per matrix (for a group of checkpoints) on the
    cluster and one write task per (run, step) region; workers must see the store and checkpoint paths.
    ``device="auto"`` uses CUDA when available. ``allow_pickle``: see :func:`~opd_lens.checkpoints.open_checkpoint`.
    """
    report = ComputeReport()
    names = list(store.runs) if runs is None else list(runs)
    with store.writer():
        for name in names:
            _compute_run(store, name, device, endpoint, client, progress, allow_pickle, report)
    return report


def _compute_run(
    store: Store, name: str, device, endpoint, client, progress: bool, allow_pickle: bool, report: ComputeReport
) -> None:
    def skip(path: Path, message: str) -> None:
        warnings.warn(CheckpointWarning(message, path), stacklevel=2)
        report.skipped.append(message)

    plan = plan_run(store, name, endpoint, skip, allow_pickle)
    if plan.tasks:
        # before any write: a compute killed from here on recomputes the rewritten steps and their lock_alignment
        store.record(name, dict.fromkeys(plan.rewrites))
        store.write_lock(name, dict.fromkeys(plan.stale_lock), -1)
        kept = store.recorded(name)
        store.record(name, {s: {**kept[s], "lock_ref": -1} for s in plan.stale_lock if s in kept})

        def tally(reads: int) -> None:
            report.matrices_read += reads

        if client is None:
            outcomes = run_local(store, plan, device, progress, tally)
        else:
            outcomes = run_dask(store, plan, device, client, progress, tally)
        for task, outcome in outcomes:
            step = task.step
            if isinstance(outcome, StepError):
                skip(task.ckpt.path, f"skipping step {step}: {outcome}")
                continue
            for in_origin in (True, False):
                if bad := [what for o, what in outcome.nonfinite if o == in_origin]:
                    _warn_nonfinite("the origin" if in_origin else f"step {step}", bad)
            entry = {"path": str(task.ckpt.path), "fingerprint": task.ckpt.fingerprint, "schema": SCHEMA_VERSION}
            store.record(name, {step: {**entry, "endpoint": task.endpoint, "lock_ref": -1}})
            report.steps.append((name, step))
    report.lock_updates += update_lock_alignment(store, name)


def _warn_nonfinite(where: str, tensors: list[str]) -> None:
    n = len(tensors)
    warnings.warn(
        CheckpointWarning(
            f"{where}: {n} {'matrix holds' if n == 1 else 'matrices hold'} NaN or Inf values ({tensors[0]}"
            f"{', ...' if n > 1 else ''}); the diagnostics these make undefined are recorded as NaN"
        ),
        stacklevel=4,
    )


def _resolved(path: str | os.PathLike) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError) as e:  # RuntimeError: a symbolic link loop
        raise CheckpointError(f"{path}: cannot resolve the path: {e}") from None
