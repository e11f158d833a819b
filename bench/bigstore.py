"""Benchmark: a store at real-study size, 6 runs × 300 steps × 36 layers × 7 modules (a 36-layer, 4096-wide
model), filled directly with ``opd_lens.testing.fill_store`` (no checkpoints, no training).

    python bench/bigstore.py                   # the full size
    python bench/bigstore.py --steps 30        # a tenth

Prints the wall time of each thing a researcher does with such a store, in one process: fill it, open it
(``Store.dataset()``, or two steps of one run), ``summarize`` it, build the Explorer on it, write its offline
report, and the bytes on disk.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from opd_lens import open_store, summarize
from opd_lens.report import store_report
from opd_lens.testing import fill_store
from opd_lens.widgets import Explorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--work", type=Path, default=Path("/tmp/opd-lens-bench/bigstore"))
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    path = args.work / "store"
    timings = {}

    def timed(what: str, fn):
        start = time.perf_counter()
        out = fn()
        timings[what] = time.perf_counter() - start
        print(f"  {what:<34} {timings[what]:7.2f} s", flush=True)
        return out

    print(f"store of {args.runs} runs × {args.steps} steps × {args.layers} layers × 7 modules")
    timed("fill (fill_store)", lambda: fill_store(path, runs=args.runs, steps=args.steps, layers=args.layers))
    store = open_store(path, create=False)
    ds = timed("open (Store.dataset)", store.dataset)
    timed("open lazily (dataset(lazy=True))", lambda: store.dataset(lazy=True))
    ends = [int(ds.step[0]), int(ds.step[-1])]
    timed("first and last step of one run", lambda: store.dataset(runs=["run-0"], steps=ends))
    timed("summarize", lambda: summarize(ds))
    timed("Explorer(store)", lambda: Explorer(store))
    timed("Explorer(ds)", lambda: Explorer(ds))
    report = timed("report (store_report)", lambda: store_report(store, args.work / "report.html"))
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    files = sum(1 for f in path.rglob("*") if f.is_file())
    print(f"  store on disk: {disk / 2**20:.1f} MiB in {files} files; report {report.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
