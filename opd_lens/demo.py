"""``opd-lens demo``: the main job, end to end — train the demo zoo (or reuse it), compute its store, write the
offline report and print the paper-style table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from .api import Store, open_store
from .diagnostics import Settings
from .errors import OpdLensError
from .files import replacing
from .summary import Summary

__all__ = ["ZOO_SETTINGS", "compute_zoo", "copy_notebooks", "run_demo"]

DEMO_DIR = "opd-lens-demo"
"""The folder ``opd-lens demo`` works in by default, and the notebooks' default ``DEMO`` (``../opd-lens-demo``: the
notebooks' folder beside it)."""

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
    notebooks = out.parent / "demo_notebooks"
    env = "" if out.name == DEMO_DIR else f"OPD_LENS_DEMO={out.resolve()} "
    print(f"notebooks: opd-lens notebooks {notebooks} && {env}jupyter lab {notebooks}  (start with 01_quickstart)")
    return summary.table


def _notebook_sources() -> list[Path]:
    """The classroom notebooks: in a wheel at ``opd_lens/demo_notebooks``, in a checkout at ``demo_notebooks/``."""
    package = Path(__file__).resolve().parent
    for folder in (package / "demo_notebooks", package.parent / "demo_notebooks"):
        if found := sorted(folder.glob("[0-9][0-9]_*.ipynb")):
            return found
    raise OpdLensError(f"the classroom notebooks are not installed with opd_lens ({package}): reinstall opd-lens")


def copy_notebooks(dest: str | Path, *, force: bool = False) -> list[Path]:
    """Copy the classroom notebooks into ``dest`` (created if missing) and return the paths written. A notebook
    already there with other content (your edits) stops the copy before anything is written, unless ``force``."""
    dest = Path(dest)
    stale = {dest / s.name: s for s in _notebook_sources() if not _same_file(dest / s.name, s)}
    edited = [str(target) for target in stale if target.is_file()]
    if edited and not force:
        raise OpdLensError(f"{', '.join(edited)}: differs from the shipped notebook (kept; pass --force to overwrite)")
    if dest.exists() and not dest.is_dir():
        raise OpdLensError(f"{dest}: not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    for target, source in stale.items():
        with replacing(target) as tmp:
            shutil.copyfile(source, tmp)
    return list(stale)


def _same_file(target: Path, source: Path) -> bool:
    return target.is_file() and target.read_bytes() == source.read_bytes()
