"""``opd-lens demo``: the main job, end to end, with what exists today.

Today it writes a synthetic checkpoint series with a planted update (a locked rank-4 channel plus a sparse part)
in the Hugging Face Trainer layout, finds and reads it like any run, and prints the per-step diagnostics. The demo
zoo of real SFT/OPD/RLVR runs, the zarr store, the widgets and the offline report build on these pieces.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import find_checkpoints, matched_matrices, open_checkpoint
from .diagnostics import Settings, matrix_diagnostics, origin_factors, sim_k
from .synthetic import write_planted_run

__all__ = ["run_demo"]

_SETTINGS = Settings(angle_k=16, mask_rank=8)  # sized for the tiny demo model (hidden 64)


def run_demo(out: Path) -> None:
    """Write (or reuse) the synthetic run under ``out`` and print its diagnostics per checkpoint."""
    origin_dir, run_dir = out / "synthetic" / "origin", out / "synthetic" / "run"
    if not run_dir.is_dir():
        print(f"writing a synthetic run to {run_dir} ...")
        write_planted_run(out / "synthetic", scale=0.005)
    origin, ckpts = open_checkpoint(origin_dir), find_checkpoints(run_dir)
    refs = matched_matrices(origin, ckpts[-1])
    print(f"{run_dir}: {len(ckpts)} checkpoints x {len(refs)} matrices; origin {origin_dir}")
    w0 = {r: origin.read_matrix(r) for r in refs}
    factors = {r: origin_factors(w, _SETTINGS) for r, w in w0.items()}
    results = {
        c.step: {
            r: matrix_diagnostics(w0[r], c.read_matrix(r), _SETTINGS, factors[r], endpoint=c is ckpts[-1]) for r in refs
        }
        for c in ckpts
    }
    final = results[ckpts[-1].step]
    print(
        f"{'step':>6} {'unchanged%':>10} {'|dW|_F':>8} {'srank':>6} {'hill':>6} {'Sim16':>6} {'princ%':>7} "
        f"{'lowmag%':>7}"
    )
    numel = {r: r.shape[0] * r.shape[1] for r in refs}
    for step, res in results.items():
        unchanged = sum(res[r].unchanged_frac * numel[r] for r in refs) / sum(numel.values())
        sim = _mean(float(sim_k(res[r].lock_basis, final[r].lock_basis)) for r in refs)
        print(
            f"{step:>6} {100 * unchanged:>10.1f} {_mean(res[r].update_fro for r in refs):>8.4f} "
            f"{_mean(res[r].stable_rank for r in refs):>6.2f} {_mean(res[r].hill_alpha for r in refs):>6.2f} "
            f"{sim:>6.3f} {100 * _mean(res[r].principal_overlap for r in refs):>7.1f} "
            f"{100 * _mean(res[r].lowmag_overlap for r in refs):>7.1f}"
        )
    print(
        f"last step: mean max angle U {_mean(final[r].max_angle_u for r in refs):.3f} deg, "
        f"V {_mean(final[r].max_angle_v for r in refs):.3f} deg (top-{_SETTINGS.angle_k}); "
        f"spectral shift {_mean(final[r].spectral_shift for r in refs):.2e}"
    )
    print(
        "Means over matrices (unchanged% weighted by size). Coming next: the demo zoo of real SFT/OPD/RLVR runs "
        "on a tiny Qwen3 model, the incremental zarr store, the widgets and the offline report."
    )


def _mean(values) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).nanmean())
