"""Rank-constrained retraining of the demo zoo: continue a run from ≈ 20% of its training with every gradient
(or every optimizer update) confined to the early channel V_K, as in the paper's functional-sufficiency test."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pandas as pd

from ..api import Store, open_store
from ..errors import ZooError
from ..locking import SubspaceProjector, Subspaces, subspaces_from_checkpoint
from .presets import RUNS, Preset
from .runner import load_zoo, record_retrain, single_thread
from .train import Variant, train_run

__all__ = ["rank_constrained_retrain", "retrain_accuracy"]

_SPEC = "constraint.json"
_BASES = "subspaces.safetensors"


def rank_constrained_retrain(
    zoo: str | os.PathLike,
    run: str = "opd",
    K: int = 16,
    at: float = 0.2,
    *,
    mode: str = "gradient",
    store: Store | str | os.PathLike | None = None,
    progress: bool = True,
    stop: threading.Event | None = None,
    on_step=None,
) -> dict:
    """Retrain ``run`` of the zoo at ``zoo`` from its checkpoint nearest ``at`` (fraction of training) to the end,
    each weight matrix constrained to the top-``K`` right singular vectors of ΔW = W_at − W_0 (``mode``
    ``"gradient"``: g ← g V Vᵀ before Adam, the paper's reading; ``"update"``: the optimizer's update projected, so
    ΔW stays exactly in the span). Saved as run ``<run>-k<K>`` (``-update`` appended in update mode) with held-out
    accuracy per checkpoint, recorded in the zoo's manifest and, given ``store``, computed into it. Resumable;
    ``stop`` and ``on_step`` as in :func:`opd_lens.zoo.train.train_run`. Returns the run's manifest entry."""
    zoo = Path(zoo)
    manifest = load_zoo(zoo)
    if run not in manifest["runs"]:
        raise ZooError(f"{zoo}: no finished run {run!r} to retrain; it has {list(manifest['runs'])}")
    if mode not in ("gradient", "update"):
        raise ValueError(f"mode must be 'gradient' or 'update', not {mode!r}")
    preset = Preset.from_dict(manifest["config"])
    saves, total = preset.save_steps(run), preset.steps(run)
    start = min(saves[:-1], key=lambda s: abs(s / total - at))
    name = f"{run}-k{K}" + ("-update" if mode == "update" else "")
    run_dir = zoo / "runs" / name
    spec = {"run": run, "k": K, "start": start, "mode": mode}
    subspaces = _subspaces(zoo, run_dir, spec)
    projector = SubspaceProjector(subspaces, mode=mode)
    variant = Variant(name, f"{RUNS[run].method}-k{K}", start, projector.attach)
    with single_thread():
        entry = train_run(zoo, run, preset, manifest["seed"], progress, variant=variant, stop=stop, on_step=on_step)
    entry["constraint"] = spec
    record_retrain(zoo, name, entry)
    if store is not None:
        store = store if isinstance(store, Store) else open_store(store)
        store.add_run(name, zoo / entry["path"], zoo / entry["origin"], method=entry["method"])
        store.compute(progress=progress)
    return entry


def retrain_accuracy(zoo: str | os.PathLike) -> pd.DataFrame:
    """Held-out accuracy per checkpoint of every retrained run and the run it was constrained from, in the columns
    :func:`opd_lens.charts.constrained_accuracy` takes (the constrained runs share the plain run's history up to
    their start)."""
    manifest = load_zoo(zoo)
    retrains = manifest.get("retrains", {})
    plain = {e["constraint"]["run"] for e in retrains.values()}
    entries = [(n, manifest["runs"][n], False) for n in manifest["runs"] if n in plain]
    entries += [(n, e, True) for n, e in retrains.items()]
    rows = [
        {"run": n, "method": e["method"], "step": c["step"], "progress": c["step"] / e["steps"],
         "accuracy": c["eval_accuracy"], "constrained": constrained}
        for n, e, constrained in entries
        for c in e["checkpoints"]
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["run", "method", "step", "progress", "accuracy", "constrained"])


def _subspaces(zoo: Path, run_dir: Path, spec: dict) -> Subspaces:
    """The constraint's V_K, computed once and saved with the run (a run dir of another constraint is an error)."""
    if (run_dir / _SPEC).is_file():
        saved = json.loads((run_dir / _SPEC).read_text())
        if saved != spec:
            raise ZooError(f"{run_dir}: holds a retraining with {saved}, not {spec}; remove it to retrain")
        return Subspaces.load(run_dir / _BASES)
    origin = zoo / RUNS[spec["run"]].origin
    subspaces = subspaces_from_checkpoint(origin, zoo / "runs" / spec["run"] / f"checkpoint-{spec['start']}", spec["k"])
    run_dir.mkdir(parents=True, exist_ok=True)
    subspaces.save(run_dir / _BASES)
    (run_dir / _SPEC).write_text(json.dumps(spec))
    return subspaces
