"""``opd-lens demo``: the main job, end to end — train the demo zoo (or reuse it), compute its store, write the
offline report and print the paper-style table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .api import Store, open_store
from .diagnostics import Settings
from .summary import summarize

__all__ = ["ZOO_SETTINGS", "compute_zoo", "run_demo", "zoo_table"]

ZOO_SETTINGS = Settings(angle_k=16, mask_rank=8)
"""Sized for the zoo's tiny model (hidden 64): the paper's k = 512 and r = 64 of 4096 would span whole matrices."""

_COLUMNS = {
    "method": "method",
    "accuracy": "held-out acc.",
    "unchanged_pct": "unchanged %",
    "principal_overlap_pct": "princ. overlap %",
    "lowmag_overlap_pct": "low-mag overlap %",
    "max_angle_v_deg": "max angle V °",
    "spectral_shift": "spectral shift",
    "stable_rank": "stable rank",
    "lock_alignment_first": "Sim16 first ckpt",
}


def compute_zoo(zoo: Path, store_path: Path, *, endpoint: str = "all", progress: bool = True) -> Store:
    """Register every run of the zoo at ``zoo`` (with its own origin: the base for SFT, the anchor otherwise), its
    constrained retrainings included, in the store at ``store_path`` and compute what is missing."""
    from .zoo import load_zoo

    manifest = load_zoo(zoo)
    store = open_store(store_path, ZOO_SETTINGS)
    for name, run in (manifest["runs"] | manifest.get("retrains", {})).items():
        store.add_run(name, zoo / run["path"], zoo / run["origin"], method=run["method"])
    store.compute(progress=progress, endpoint=endpoint)
    return store


def zoo_table(store: Store, zoo: Path) -> pd.DataFrame:
    """The paper-style table of the zoo's store with each run's final held-out accuracy (avg@4), README columns."""
    from .zoo import load_zoo

    manifest = load_zoo(zoo)
    runs = manifest["runs"] | manifest.get("retrains", {})
    table = summarize(store.dataset())
    table = table.loc[[r for r in table.index if r in runs]]  # runs a user added to the store have no accuracy
    table["accuracy"] = [runs[r]["checkpoints"][-1]["eval_accuracy"] for r in table.index]
    return table[list(_COLUMNS)].rename(columns=_COLUMNS)


def run_demo(out: Path, preset: str = "classroom", *, progress: bool = True, workers: int = 2) -> pd.DataFrame:
    """Train (or reuse) the zoo under ``out/zoo``, compute ``out/store``, write ``out/report.html``; print and return
    the table."""
    from .report import store_report
    from .zoo import train_zoo

    zoo = out / "zoo"
    print(f"zoo ({preset}) in {zoo}: training what is not there yet ...", flush=True)
    train_zoo(zoo, preset, progress=progress, workers=workers)
    store = compute_zoo(zoo, out / "store", progress=progress)
    table = zoo_table(store, zoo)
    report = store_report(store, out / "report.html", title=f"opd_lens demo zoo ({preset})")
    print(table.to_string(float_format=lambda x: f"{x:.3g}"))
    print(f"store: {store.path}\nreport: {report} ({report.stat().st_size / 2**20:.1f} MiB, opens offline)")
    print("notebooks: jupyter lab demo_notebooks/  (start with 01_quickstart.ipynb)")
    return table
