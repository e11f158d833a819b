"""Planning a compute: which checkpoints of a run are new or changed, which steps get endpoint metrics, and what
must be invalidated before anything is written."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints import Checkpoint, MatrixRef, find_checkpoints, matched_matrices, open_checkpoint
from ..errors import CheckpointError, CheckpointWarning, StoreError
from ..schema import changed_after
from ..store import Store

__all__ = ["StepTask", "RunPlan", "plan_run", "endpoint_steps"]


@dataclass(frozen=True)
class StepTask:
    """One checkpoint to compute: its matrices, its slot along ``step`` and whether it gets endpoint metrics."""

    ckpt: Checkpoint
    refs: list[MatrixRef]
    slot: int
    endpoint: bool
    fresh: bool
    """The slot was never written, so its angle arrays hold only their fill value and need no write."""

    @property
    def step(self) -> int:
        """The checkpoint's step."""
        return _step(self.ckpt)


@dataclass
class RunPlan:
    name: str
    origin: Checkpoint
    tasks: list[StepTask] = field(default_factory=list)
    rewrites: list[int] = field(default_factory=list)
    """Recorded steps that are recomputed: unrecorded, and their lock_alignment invalidated, before any write."""
    stale_lock: list[int] = field(default_factory=list)
    """Recorded steps whose lock_alignment must be invalidated before any write: the rewritten ones, or all when
    the final channel itself is rewritten."""


def plan_run(store: Store, name: str, endpoint, skip: Callable[[Path, str], None], allow_pickle: bool) -> RunPlan:
    """What computing run ``name`` of ``store`` involves; ``skip(path, message)`` hears of unreadable checkpoints.

    A checkpoint is left alone when its step is recorded with the same content fingerprint and the current schema,
    its V_K bases are cached and, if it is an endpoint step, it holds endpoint metrics (a step that lacks them is
    recomputed; angles already stored are kept, so a step that was last when computed keeps its angles). A step
    stored before a variable of the schema existed or changed is recomputed to fill it, endpoint metrics included
    if it had them. The last step is the last the store holds or the run has: a stored final checkpoint that has
    become unreadable makes no earlier step an endpoint."""
    spec = store.runs.get(name)
    if spec is None:
        raise StoreError(f"{store.path}: no run named {name!r}; registered: {list(store.runs)}")
    origin = open_checkpoint(spec["origin"], allow_pickle=allow_pickle)
    if origin.fingerprint != spec["origin_fingerprint"]:
        raise StoreError(f"{origin.path}: the origin of run {name!r} changed since it was added; use a new store")
    plan = RunPlan(name, origin)
    ckpts = find_checkpoints(spec["run_dir"], allow_pickle=allow_pickle, on_skip=skip)
    if not ckpts:
        return plan
    recorded = store.recorded(name)
    bases = store.lock_bases(name)
    ends = endpoint_steps(endpoint, [*recorded, *(_step(c) for c in ckpts)])  # "last": of what the store holds too
    used = store.used_slots()
    todo = []
    for c in ckpts:
        step = _step(c)
        entry = recorded.get(step)
        keeps_angles = False  # a recompute of a step that has endpoint metrics keeps them
        if entry is not None and entry["fingerprint"] == c.fingerprint:
            # stored under an older schema: bring it up, unless only endpoint metrics changed and it holds none
            older = bool(changed_after(entry.get("schema", 1), entry["endpoint"]))
            if not older and bases.has(step) and (step not in ends or entry["endpoint"]):
                continue
            keeps_angles = older and bool(entry["endpoint"])
        elif entry is not None:
            warnings.warn(
                f"{c.path}: changed since it was computed; recomputing step {step}", CheckpointWarning, stacklevel=4
            )
        try:
            refs = matched_matrices(origin, c, spec["include_globals"])
        except CheckpointError as e:
            skip(c.path, f"skipping step {step}: {e}")
            continue
        todo.append((c, step, refs, step in ends or keeps_angles))
        if entry is not None:
            plan.rewrites.append(step)
    slots = store.step_slots(step for _, step, *_ in todo)
    for c, step, refs, endpoint_metrics in todo:
        slot = slots[step]
        plan.tasks.append(StepTask(c, refs, slot, endpoint_metrics, slot not in used))
    plan.stale_lock = list(plan.rewrites)
    if plan.tasks and max({*recorded, *(t.step for t in plan.tasks)}) in plan.rewrites:
        plan.stale_lock = sorted(recorded)  # a rewritten final channel: every lock_alignment refers to the old one
    return plan


def _step(ckpt: Checkpoint) -> int:
    """The step of a checkpoint of a run: :func:`~opd_lens.checkpoints.find_checkpoints` gives each one."""
    if ckpt.step is None:
        raise ValueError(f"{ckpt.path}: a checkpoint of a run without a step")
    return ckpt.step


def endpoint_steps(endpoint: str | Sequence[int], steps: list[int]) -> set[int]:
    """The steps that get endpoint metrics: ``"last"``, ``"all"``, ``"none"``, a list or a comma-separated string."""
    if isinstance(endpoint, str):
        if endpoint == "last":
            return {max(steps)}
        if endpoint == "all":
            return set(steps)
        if endpoint == "none":
            return set()
        try:
            return {int(s) for s in endpoint.split(",") if s.strip()}
        except ValueError:
            raise StoreError(
                f"endpoint must be last, all, none or a comma-separated list of steps, got {endpoint!r}"
            ) from None
    return {int(s) for s in endpoint}
