"""Executing a plan: read → compute → write, locally with reads running ahead of the compute, or on Dask.

The pending checkpoints of a run are taken in groups, and each group matrix by matrix: W_0 of a matrix is read
once and its origin factors loaded once for all the group's checkpoints (a series of N checkpoints reads W_0
N/group times instead of N), while the results, small next to the weights, wait for the group to finish. Each
(run, step) region is then written once. A group holds as many checkpoints as :data:`GROUP_BYTES` of results
allow (their V_K bases dominate), so memory stays that of one matrix whatever the length of the series.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np
import torch

from ..cache import LockBases, OriginCache, matrix_key
from ..checkpoints import Checkpoint, MatrixRef
from ..diagnostics import (
    MatrixDiagnostics,
    OriginFactors,
    Settings,
    all_finite,
    lora_diagnostics,
    lora_weight,
    matrix_diagnostics,
    nonfinite_diagnostics,
)
from ..errors import CheckpointError, StepError
from ..progress import progress_bar
from ..schema import ANGLES, STEP_SCALARS
from ..store import Store, write_step
from .plan import RunPlan, StepTask

__all__ = ["GROUP_BYTES", "READ_AHEAD_BYTES", "StepError", "StepOutcome", "run_local", "run_dask", "resolve_device"]

GROUP_BYTES = 2**28
"""Results (V_K bases and angle profiles) a group of checkpoints may hold before its steps are written: 256 MiB."""
SIDE_BY_SIDE_NUMEL = 2**22
"""On the CPU, matrices of up to this many entries (4 Mi: 2048×2048, 4096×1024) are computed side by side, one per
intra-op thread: their LAPACK calls and selections (``eigh``, ``kthvalue``) keep a single core busy at these sizes."""
READ_AHEAD_BYTES = 2**26
"""Weights the reader may hold ahead of the compute: 64 MiB, so reading overlaps computing for the many small
matrices where it matters, and the largest matrices (whose compute dwarfs their read) add no memory."""


@dataclass(frozen=True)
class MatrixResult:
    scalars: dict[str, float]
    angles: dict[str, np.ndarray]
    spectrum: np.ndarray
    basis: torch.Tensor
    nonfinite: tuple[bool, str] | None = None
    """(in the origin?, the tensor and its file) when W_0 or W_t holds NaN or Inf values."""


@dataclass(frozen=True)
class StepOutcome:
    nonfinite: list[tuple[bool, str]]
    """The tensors holding NaN or Inf, as (in the origin?, which tensor in which file)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when torch sees a GPU, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --- one matrix of a group -----------------------------------------------------------------------------------------


def _read_update(ckpt: Checkpoint, ref: MatrixRef) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | StepError:
    """:meth:`~opd_lens.checkpoints.Checkpoint.read_update` of ``ref``; a failure is a StepError."""
    try:
        return ckpt.read_update(ref)
    except CheckpointError as e:
        return StepError(str(e))


def _diagnose(
    origin: Checkpoint,
    ckpt: Checkpoint,
    ref: MatrixRef,
    w0: torch.Tensor,
    update: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    factors: OriginFactors | None,
    settings: Settings,
    endpoint: bool,
    device: torch.device,
) -> MatrixResult:
    """The diagnostics of one matrix of one checkpoint, given W_0 (on ``device``), what was read of W_t (the matrix,
    or a LoRA adapter's factors) and the origin factors (``None`` when W_0 is not finite)."""
    if isinstance(update, tuple):
        left, right = update
        update = left.to(device), right.to(device)
    else:
        update = update.to(device)
    nonfinite = None
    if factors is None:
        nonfinite = True, f"tensor {ref.tensor!r} in {origin.tensors[ref.tensor].file}"
    elif isinstance(update, tuple) and not all(all_finite(t) for t in update):
        nonfinite = False, f"the LoRA factors of {ref.tensor!r} in {ckpt.path}"
    d: MatrixDiagnostics
    if nonfinite is not None:
        wt = lora_weight(w0, *update) if isinstance(update, tuple) else update
        d = nonfinite_diagnostics(w0, wt, settings, factors)
    elif isinstance(update, tuple):
        d = lora_diagnostics(w0, *update, settings, factors, endpoint=endpoint)
    else:
        d = matrix_diagnostics(w0, update, settings, factors, endpoint=endpoint)
        if math.isnan(d.update_fro):  # W_0 is finite (it has factors), so W_t holds the NaN or Inf
            nonfinite = False, f"tensor {ref.tensor!r} in {ckpt.tensors[ref.tensor].file}"
    basis = d.lock_basis if d.update_fro > 0 else torch.full_like(d.lock_basis, math.nan)
    return MatrixResult(
        scalars={name: getattr(d, name) for name in STEP_SCALARS},
        angles={"angles_u": d.angles_u.cpu().numpy(), "angles_v": d.angles_v.cpu().numpy()},
        spectrum=d.update_spectrum.cpu().numpy(),
        basis=basis.to(torch.float32).cpu(),
        nonfinite=nonfinite,
    )


def _matrix(
    origin, ref, w0, updates, tasks, cache: OriginCache, settings, device
) -> dict[int, MatrixResult | StepError]:
    """Every checkpoint of a group at one matrix: task index -> MatrixResult or StepError."""
    w0 = w0.to(device)
    factors = cache.get(ref, w0, with_svd=any(t.endpoint for t in tasks.values()))
    out: dict[int, MatrixResult | StepError] = {}
    for i, task in tasks.items():
        update = updates[i]
        if isinstance(update, StepError):
            out[i] = update
        else:
            out[i] = _diagnose(origin, task.ckpt, ref, w0, update, factors, settings, task.endpoint, device)
    return out


def _groups(tasks: Sequence[StepTask], settings: Settings) -> list[list[StepTask]]:
    """Consecutive tasks in groups whose results fit in :data:`GROUP_BYTES`."""
    groups: list[list[StepTask]] = []
    held = 0
    for task in tasks:
        size = sum(4 * (ref.shape[1] * settings.lock_k + 2 * min(ref.shape)) for ref in task.refs)
        if not groups or held + size > GROUP_BYTES:
            groups.append([])
            held = 0
        groups[-1].append(task)
        held += size
    return groups


def _by_matrix(group: Sequence[StepTask]) -> list[tuple[MatrixRef, dict[int, StepTask]]]:
    """The group's matrices in order, each with the tasks (by index in the group) that have it."""
    refs: dict[str, tuple[MatrixRef, dict[int, StepTask]]] = {}
    for i, task in enumerate(group):
        for ref in task.refs:
            refs.setdefault(matrix_key(ref), (ref, {}))[1][i] = task
    return list(refs.values())


# --- writing a step ------------------------------------------------------------------------------------------------


def _region(task: StepTask, results: Sequence[MatrixResult], grid) -> tuple[dict, dict, dict]:
    """The (layer, module) blocks of one step's scalars (the update spectrum with them) and angle profiles, and its
    V_K bases by matrix key."""
    layers, modules, k, r = grid
    shape = (len(layers), len(modules))
    scalars = {name: np.full(shape, np.nan, np.float32) for name in STEP_SCALARS}
    spectrum = scalars["update_spectrum"] = np.full((*shape, r), np.nan, np.float32)
    angles = {name: np.full((*shape, k), np.nan, np.float32) for name in ANGLES}
    for ref, res in zip(task.refs, results, strict=True):
        i, j = layers[ref.layer], modules[ref.module]
        spectrum[i, j, : res.spectrum.shape[0]] = res.spectrum[:r]
        for name, value in res.scalars.items():
            scalars[name][i, j] = value
        for name, profile in res.angles.items():
            angles[name][i, j, : profile.shape[0]] = profile
    bases = {matrix_key(r): res.basis for r, res in zip(task.refs, results, strict=True)}
    return scalars, angles, bases


def _write(write, bases: LockBases, run: int, task: StepTask, results, grid) -> StepOutcome:
    """Save a step's V_K bases, then write its region (angles only where they may be, or may have been, set)."""
    scalars, angles, vk = _region(task, results, grid)
    bases.save(task.step, vk)
    write(run, task.slot, scalars, None if task.fresh and not task.endpoint else angles)
    return StepOutcome([res.nonfinite for res in results if res.nonfinite])


# --- local ---------------------------------------------------------------------------------------------------------


class ReadAhead:
    """Runs ``jobs`` ((bytes, read) pairs) in a background thread, yielding their results in order; at most
    ``budget`` bytes of results are held ahead of the consumer, the one being consumed included, except that the
    next job always runs when nothing else is held (so a job larger than the budget is read when it is needed)."""

    def __init__(self, jobs: Sequence[tuple[int, Callable[[], Any]]], budget: int = READ_AHEAD_BYTES):
        self._jobs = deque(jobs)
        self._budget = budget
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="opd-lens-read")
        self._ahead: deque = deque()
        self._held = 0

    def __iter__(self) -> Generator[Any, None, None]:
        try:
            current = 0
            while self._jobs or self._ahead:
                self._held -= current
                self._fill()
                future, current = self._ahead.popleft()
                result = future.result()
                self._fill()
                yield result
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _fill(self) -> None:
        while self._jobs and (not self._held or self._held + self._jobs[0][0] <= self._budget):
            size, job = self._jobs.popleft()
            self._ahead.append((self._pool.submit(job), size))
            self._held += size


def run_local(
    store: Store, plan: RunPlan, device, progress: bool, tally: Callable[[int], None]
) -> Iterator[tuple[StepTask, Any]]:
    """Compute ``plan`` in this process; yields (task, StepOutcome or StepError) as steps are written and
    ``tally``s the matrices read."""
    dev = resolve_device(device)
    settings = store.settings
    cache = store.origin_cache(plan.origin)
    write = store.step_writer()
    bases = store.lock_bases(plan.name)
    run, grid = store.run_index(plan.name), store.grid()
    bar = progress_bar(total=len(plan.tasks), desc=f"{plan.name} checkpoints", unit="ckpt", disable=not progress)
    try:
        for group in _groups(plan.tasks, settings):
            matrices = _by_matrix(group)
            results: list[list] = [[] for _ in group]
            failed: dict[int, StepError] = {}  # a step that failed to read is read no further
            jobs: list[tuple[int, Callable[[], Any]]] = []
            for ref, tasks in matrices:
                origin_read = partial(_read_origin, plan.origin, ref, tasks, failed)
                jobs.append((plan.origin.read_nbytes(ref), origin_read))
                for i, task in tasks.items():
                    jobs.append((task.ckpt.read_nbytes(ref), partial(_read_unless_failed, task.ckpt, ref, i, failed)))
            inner = progress_bar(
                matrices, desc=f"step {group[0].ckpt.step}", unit="matrix", nested=True, disable=not progress
            )
            with closing(iter(ReadAhead(jobs))) as reads, SideBySide(dev) as side:
                for ref, tasks in inner:
                    w0 = next(reads)
                    updates = {i: next(reads) for i in tasks}
                    live = {i: t for i, t in tasks.items() if i not in failed}
                    if live:
                        compute = partial(_matrix, plan.origin, ref, w0, updates, live, cache, settings, dev)
                        side.submit(compute, math.prod(ref.shape))
                    _collect(side.done(), failed, results)
                _collect(side.done(wait=True), failed, results)
            inner.close()
            # the matrices read for the steps computed: each one's own, and W_0 of every matrix that one of them has
            done = [task for i, task in enumerate(group) if i not in failed]
            tally(len({matrix_key(r) for t in done for r in t.refs}) + sum(len(t.refs) for t in done))
            for i, task in enumerate(group):
                yield task, failed[i] if i in failed else _write(write, bases, run, task, results[i], grid)
            bar.update(len(group))
    finally:
        bar.close()


def _collect(outcomes, failed: dict, results: list) -> None:
    """File each matrix's outcomes (task index -> MatrixResult or StepError), in matrix order."""
    for outcome in outcomes:
        for i, res in outcome.items():
            if isinstance(res, StepError):
                failed[i] = res
            else:
                results[i].append(res)


class SideBySide:
    """Runs the compute of small matrices on a CPU side by side, one per intra-op thread (see
    :data:`SIDE_BY_SIDE_NUMEL`), and everything else in the calling thread; :meth:`done` gives the outcomes in
    the order of submission. At most one matrix per thread is in flight, so memory stays that of a few matrices."""

    def __init__(self, device: torch.device):
        self._workers = torch.get_num_threads() if device.type == "cpu" else 1
        self._pool = _compute_pool(self._workers) if self._workers > 1 else None
        self._pending: deque = deque()

    def __enter__(self) -> SideBySide:
        return self

    def __exit__(self, *exc) -> None:
        for future in self._pending:  # after an error: what has not started is not run
            future.cancel()
        futures.wait(self._pending)

    def submit(self, compute: Callable[[], Any], numel: int) -> None:
        if self._pool is not None and numel <= SIDE_BY_SIDE_NUMEL:
            self._pending.append(self._pool.submit(compute))
            return
        futures.wait(self._pending)  # a large matrix has every core to itself
        done: futures.Future = futures.Future()
        done.set_result(compute())
        self._pending.append(done)

    def done(self, wait: bool = False) -> list:
        """The outcomes ready in order (all of them with ``wait``, or while a thread would be left without work)."""
        out = []
        while self._pending and (wait or len(self._pending) >= self._workers or self._pending[0].done()):
            out.append(self._pending.popleft().result())
        return out


@cache
def _compute_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of single-threaded compute workers, kept between computes (a series computes often)."""
    return ThreadPoolExecutor(workers, "opd-lens-compute", initializer=torch.set_num_threads, initargs=(1,))


def _read_origin(origin: Checkpoint, ref: MatrixRef, tasks: dict[int, StepTask], failed: dict) -> torch.Tensor | None:
    """W_0 of ``ref``, or ``None`` when every step that needs it has already failed to read."""
    return None if all(i in failed for i in tasks) else origin.read_matrix(ref)


def _read_unless_failed(
    ckpt: Checkpoint, ref: MatrixRef, i: int, failed: dict[int, StepError]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | StepError:
    """What task ``i``'s checkpoint holds of ``ref`` (:func:`_read_update`), unless that step has already failed to
    read: then its StepError."""
    return failed.get(i) or _read_update(ckpt, ref)


# --- Dask ----------------------------------------------------------------------------------------------------------


def _matrix_job(origin, ref, tasks, cache, settings, device) -> tuple[dict[int, Any], int]:
    """A Dask task: one matrix for every checkpoint of a group (W_0 read once), and the matrices read."""
    w0 = origin.read_matrix(ref)
    updates = {i: _read_update(t.ckpt, ref) for i, t in tasks.items()}
    return _matrix(origin, ref, w0, updates, tasks, cache, settings, resolve_device(device)), 1 + len(tasks)


def _write_job(path, bases_dir, run, grid, task, index, parts) -> StepOutcome | StepError:
    """A Dask task: write one step's region from its matrices' results (``parts``, one per matrix job)."""
    results = [part[index] for part, _ in parts]
    if failed := next((res for res in results if isinstance(res, StepError)), None):
        return failed
    return _write(lambda *a: write_step(path, *a), LockBases(bases_dir), run, task, results, grid)


def run_dask(
    store: Store, plan: RunPlan, device, client, progress: bool, tally: Callable[[int], None]
) -> Iterator[tuple[StepTask, Any]]:
    """Compute ``plan`` on a Dask cluster: a task per matrix and group of checkpoints, a task per step that writes
    its region (workers must see the store and the checkpoints at the same paths)."""
    settings = store.settings
    cache = store.origin_cache(plan.origin)
    run, grid = store.run_index(plan.name), store.grid()
    bases_dir = store.run_cache(plan.name)
    for group in _groups(plan.tasks, settings):
        matrices = _by_matrix(group)
        parts = {
            matrix_key(ref): client.submit(_matrix_job, plan.origin, ref, tasks, cache, settings, device, pure=False)
            for ref, tasks in matrices
        }
        writes = []
        for i, task in enumerate(group):
            mine = [parts[matrix_key(ref)] for ref in task.refs]
            writes.append(client.submit(_write_job, store.data_path, bases_dir, run, grid, task, i, mine, pure=False))
        for task, fut in zip(
            group, progress_bar(writes, desc=plan.name, unit="step", disable=not progress), strict=True
        ):
            yield task, fut.result()
        tally(sum(n for _, n in client.gather(list(parts.values()))))
