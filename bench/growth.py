"""Benchmark: does the cost of one new checkpoint depend on how many are already stored?

    python bench/growth.py                    # 150 checkpoints of two 128×64 matrices
    python bench/growth.py --checkpoints 60 --profile

Grows a run one checkpoint at a time (a live ``watch``: link the next checkpoint into the run directory, compute)
and prints the wall time of each compute near the start and near the end, in one process. Each compute finds the
new checkpoint, computes its trajectory metrics and brings every earlier step's ``lock_alignment`` up to date
against the new final channel (that part must grow with the steps stored: one Sim_K per step, from cached bases).
Target: the last computes within 2× of the 3rd.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import statistics
import time
from pathlib import Path

import torch

import opd_lens
from opd_lens.checkpoints import save_checkpoint

NAMES = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=int, default=150)
    p.add_argument("--window", type=int, default=5, help="computes averaged at each end (default: %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/tmp/opd-lens-bench/growth"))
    p.add_argument("--profile", action="store_true", help="print the profile of the last compute")
    args = p.parse_args()
    torch.set_num_threads(1)

    pool, origin = write_pool(args.work, args.checkpoints)
    run, store_path = args.work / "run", args.work / "store"
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(store_path, ignore_errors=True)
    run.mkdir()
    store = opd_lens.open_store(store_path)
    times = []
    for i, ckpt in enumerate(
        sorted((d for d in pool.iterdir() if d.is_dir()), key=lambda d: int(d.name.split("-")[1]))
    ):
        (run / ckpt.name).symlink_to(ckpt, target_is_directory=True)
        if i == 0:
            store.add_run("r", run, origin=origin)
        last = i == args.checkpoints - 1
        profiler = cProfile.Profile() if last and args.profile else None
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        report = store.compute(progress=False)
        if profiler:
            profiler.disable()
        times.append(time.perf_counter() - t)
        assert len(report.steps) == 1, report
    w = args.window
    start, end = statistics.mean(times[2 : 2 + w]), statistics.mean(times[-w:])
    print(f"run: 2 matrices of 128×64, bf16, grown to {args.checkpoints} checkpoints, computed after each")
    print(f"  checkpoints 3–{2 + w}: {1e3 * start:7.1f} ms per new checkpoint")
    print(f"  checkpoints {args.checkpoints - w + 1}–{args.checkpoints}: {1e3 * end:7.1f} ms per new checkpoint")
    print(f"  ratio end/start = {end / start:4.2f}  (target ≤ 2)")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def write_pool(work: Path, n: int) -> tuple[Path, Path]:
    """W_0 and ``n`` checkpoints drifting along a planted rank-2 direction plus noise, written once."""
    pool, origin = work / f"pool-{n}", work / "origin"
    if not (pool / "done").is_file():
        shutil.rmtree(work, ignore_errors=True)
        gen = torch.Generator().manual_seed(0)
        w0 = {name: torch.randn(128, 64, generator=gen) / 8 for name in NAMES}
        save_checkpoint(origin, {k: v.bfloat16() for k, v in w0.items()})
        drift = {name: torch.randn(128, 2, generator=gen) @ torch.randn(2, 64, generator=gen) / 80 for name in NAMES}
        for step in range(1, n + 1):
            weights = {
                k: (w + step / n * drift[k] + 1e-3 * torch.randn(w.shape, generator=gen)).bfloat16()
                for k, w in w0.items()
            }
            save_checkpoint(pool / f"checkpoint-{step}", weights, step=step)
        (pool / "done").touch()
    return pool, origin


if __name__ == "__main__":
    main()
