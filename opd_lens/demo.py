"""``opd-lens demo``: the main job, end to end — train the demo zoo (or reuse it), compute its store, write the
offline report and print the paper-style table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .api import Store, open_store
from .diagnostics import Settings
from .summary import Summary

__all__ = ["ZOO_SETTINGS", "compute_zoo", "run_demo"]

ZOO_SETTINGS = Settings(angle_k=16, mask_rank=8)
"""Sized for the zoo's tiny model (hidden 64): the paper's k = 512 and r = 64 of 4096 would span whole matrices."""


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


def run_demo(out: Path, preset: str = "classroom", *, progress: bool = True, workers: int = 2) -> pd.DataFrame:
    """Train (or reuse) the zoo under ``out/zoo``, compute ``out/store``, write ``out/report.html``; print and return
    the table."""
    from .report import store_report
    from .zoo import train_zoo

    zoo = out / "zoo"
    print(f"zoo ({preset}) in {zoo}: training what is not there yet ...", flush=True)
    train_zoo(zoo, preset, progress=progress, workers=workers)
    store = compute_zoo(zoo, out / "store", progress=progress)
    summary = Summary.of(store.dataset())
    report = store_report(store, out / "report.html", title=f"opd_lens demo zoo ({preset})")
    print(summary.text())
    print(f"store: {store.path}\nreport: {report} ({report.stat().st_size / 2**20:.1f} MiB, opens offline)")
    print("notebooks: jupyter lab demo_notebooks/  (start with 01_quickstart.ipynb)")
    return summary.table
