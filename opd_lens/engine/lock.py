"""lock_alignment: Sim_K of each step's V_K to the run's final channel, kept current as the run grows."""

from __future__ import annotations

from ..store import Store

__all__ = ["update_lock_alignment"]


def update_lock_alignment(store: Store, name: str) -> int:
    """Recompute Sim_K(V_K(t), V_K(last)) for every recorded step of run ``name`` whose value refers to another
    last step (all of them when the run gained a new last step, else only the steps just computed), from the cached
    bases, without reading checkpoints; one write for all. Returns the number of steps updated."""
    recorded = store.recorded(name)
    if not recorded:
        return 0
    last = max(recorded)
    stale = sorted(s for s, entry in recorded.items() if entry["lock_ref"] != last)
    if not stale:
        return 0
    layers, modules, *_ = store.grid()
    bases = store.lock_bases(name)
    grids = bases.alignment_grid(stale, bases.load(last), layers, modules)
    values = dict(zip(stale, grids, strict=True))
    store.write_lock(name, values, last)
    store.record(name, {s: {**recorded[s], "lock_ref": last} for s in stale})
    return len(stale)
