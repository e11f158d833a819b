"""``opd-lens demo``: the main job, end to end, with what exists today.

Today it writes two synthetic checkpoint series with planted updates (a locked rank-4 channel plus a sparse part;
one small update, one ten times larger) in real trainer layouts, computes them into a store like any run, and
prints the paper-style table and the trajectories. The demo zoo of real SFT/OPD/RLVR runs, the widgets and the
offline report build on these pieces.
"""

from __future__ import annotations

from pathlib import Path

from .diagnostics import Settings
from .store import open_store
from .summary import summarize
from .synthetic import write_planted_run

__all__ = ["run_demo"]

_SETTINGS = Settings(angle_k=16, mask_rank=8)  # sized for the tiny demo model (hidden 64)
_RUNS = {"small-update": dict(scale=0.005, layout="hf"), "large-update": dict(scale=0.05, layout="verl")}


def run_demo(out: Path, progress: bool = True) -> None:
    """Write (or reuse) the synthetic runs under ``out``, compute them into ``out/store`` and print the results."""
    store = open_store(out / "store", _SETTINGS)
    for seed, (name, kwargs) in enumerate(_RUNS.items()):
        base = out / "synthetic" / name
        if not (base / "run").is_dir():
            print(f"writing a synthetic run to {base} ...")
            write_planted_run(base, seed=seed, **kwargs)
        store.add_run(name, base / "run", base / "origin", method=f"synthetic, {name}")
    report = store.compute(progress=progress)
    print(f"store {store.path}: {len(report.steps)} new checkpoint(s), {report.matrices_read} matrices read")
    ds = store.dataset()
    table = summarize(ds)
    cols = ["last_step", "unchanged_pct", "lowmag_overlap_pct", "max_angle_v_deg", "spectral_shift", "stable_rank"]
    print(table[cols].to_string(float_format=lambda x: f"{x:.4g}"))
    means = ds[["stable_rank", "lock_alignment"]].mean(("layer", "module"))
    for run in ds.run.values:
        m = means.sel(run=run).where(ds.progress.sel(run=run).notnull(), drop=True)
        pairs = zip(m.step.values, m.stable_rank.values, m.lock_alignment.values, strict=True)
        line = ", ".join(f"{step}: {srank:.2f}/{sim:.2f}" for step, srank, sim in pairs)
        print(f"{run} (step: stable rank/Sim_16 to last) {line}")
    print(
        "Coming next: the demo zoo of real SFT/OPD/RLVR runs on a tiny Qwen3 model, the widgets and the offline "
        "report. Meanwhile: opd-lens compute/summary/watch on your own runs."
    )
