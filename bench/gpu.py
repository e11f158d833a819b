"""Benchmark: the CUDA path at Qwen3-8B shapes, with the same ratios as ``bench/run.py``, in one process.

    python bench/gpu.py                      # about 3 minutes on one H100: 2 layers of Qwen3-8B, 3 checkpoints
    python bench/gpu.py --device cpu --hidden 256 --intermediate 640 --heads 4 --kv-heads 1   # a dry run

Writes (once) a bf16 run with Qwen3-8B's matrices (q/o 4096×4096, k/v 1024×4096, gate/up 12288×4096,
down 4096×12288) and a planted update of the chosen spectrum, then measures per checkpoint:
    (a) the read floor: stream W_0 and W_t from safetensors, move them to the device, form ΔW in float32 there;
    (b) opd_lens trajectory metrics on the device, checkpoints added one at a time (W_0's factors cached);
    (d) naive on the device: a full float64 SVD of ΔW per matrix (``torch.linalg.svdvals`` and V_16);
    (c) opd_lens ``endpoint="all"`` on the device (W_0's factors cached);
    (e) a naive pair script on the device: float64 SVDs of W_0, W_t and ΔW, angles and spectral shift (its masks,
        elementwise and cheap on a GPU, are left out, which favours it);
and W_0's once-per-run pass. Ratios b/a, d/b and e/c as in ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from runs import build_run, compute_fresh, link_run, read_floor, series, timed

import opd_lens
from opd_lens.checkpoints import find_checkpoints, matched_matrices, open_checkpoint
from opd_lens.diagnostics import Settings
from opd_lens.testing import SPECTRA


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=12288)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--rank", type=int, default=24)
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--spectrum", choices=SPECTRA, default="powerlaw")
    p.add_argument("--work", type=Path, default=Path("/tmp/opd-lens-gpu"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: torch sees no CUDA GPU (use --device cpu for a dry run)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    origin, run = build_run(args, args.layers)
    ckpts = find_checkpoints(run)
    o = open_checkpoint(origin)
    refs = matched_matrices(o, ckpts[0])
    print(f"{name}, torch {torch.__version__}: {len(refs)} matrices, {len(ckpts)} checkpoints, {args.spectrum} update")

    warm = args.work / "warm-store"
    shutil.rmtree(warm, ignore_errors=True)
    first = timed(
        lambda: opd_lens.compute(
            warm, run, origin=origin, name="r", endpoint="none", device=args.device, progress=False
        ),
        device,
    )
    a = timed(lambda: [read_floor(o, c, refs, device) for c in ckpts], device) / len(ckpts)
    _print("(a) read floor, ΔW formed on the device", a)
    b = series(args.work / "b", ckpts, origin, warm, device=args.device)
    _print("(b) opd_lens trajectory metrics, one checkpoint at a time", b, f"b/a = {b / a:.1f}")
    last = ckpts[-1]
    d = timed(lambda: [_naive_trajectory(o.read_matrix(r), last.read_matrix(r), device) for r in refs], device)
    _print("(d) naive: float64 SVD of ΔW per matrix", d, f"d/b = {d / b:.1f}")
    subset = link_run([last], args.work / "subset")
    c = timed(lambda: compute_fresh(args.work / "c", subset, origin, warm, "all", device=args.device), device)
    _print("(c) opd_lens endpoint='all'", c)
    s = Settings()
    e = timed(lambda: [_naive_pair(o.read_matrix(r), last.read_matrix(r), s, device) for r in refs], device)
    _print("(e) naive pair script: float64 SVDs of W_0, W_t, ΔW", e, f"e/c = {e / c:.1f}")
    _print("W_0's SVDs and masks, once per run", first - b * len(ckpts))


def _naive_trajectory(w0, wt, device):
    dw = wt.to(device).double() - w0.to(device).double()
    _, s, vh = torch.linalg.svd(dw, full_matrices=False)
    return s, vh[:16]


def _naive_pair(w0, wt, s: Settings, device):
    a0, at = w0.to(device).double(), wt.to(device).double()
    u0, s0, vh0 = torch.linalg.svd(a0, full_matrices=False)
    ut, st, vht = torch.linalg.svd(at, full_matrices=False)
    sd = torch.linalg.svdvals(at - a0)
    k = min(s.angle_k, *a0.shape)
    cos_u = torch.linalg.svdvals(u0[:, :k].T @ ut[:, :k]).clamp(max=1)
    cos_v = torch.linalg.svdvals(vh0[:k] @ vht[:k].T).clamp(max=1)
    return torch.rad2deg(torch.arccos(cos_u)).max(), torch.rad2deg(torch.arccos(cos_v)).max(), (st - s0).norm(), sd


def _print(label: str, seconds: float, ratio: str = "") -> None:
    print(f"  {label:<58s} {seconds:8.2f} s  {ratio}", flush=True)


if __name__ == "__main__":
    main()
