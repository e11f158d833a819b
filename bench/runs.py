"""What the benchmarks share: the synthetic runs they time, the stores they time them into, and the timing.

Imported by ``bench/run.py``, ``bench/peers.py`` and ``bench/gpu.py`` (run from the repository root or ``bench/``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

import opd_lens
from opd_lens.diagnostics import Settings
from opd_lens.testing import qwen3_config, write_planted_run

LABEL = 58
"""Width of a row's label."""


def build_run(args, layers: int) -> tuple[Path, Path]:
    """Write (once) the synthetic Qwen3-shaped run of these sizes (``args``: hidden, intermediate, heads, kv_heads,
    checkpoints, rank, density, spectrum, work); returns (origin, run_dir)."""
    key = f"h{args.hidden}-i{args.intermediate}-L{layers}-c{args.checkpoints}-r{args.rank}-d{args.density}"
    out = args.work / f"{key}-{args.spectrum}"
    if not (out / "done").is_file():
        shutil.rmtree(out, ignore_errors=True)
        config = qwen3_config(layers, args.hidden, args.intermediate, args.heads, args.kv_heads)
        steps = [10 * (i + 1) for i in range(args.checkpoints)]
        write_planted_run(out, config=config, steps=steps, rank=args.rank, density=args.density, spectrum=args.spectrum)
        (out / "done").touch()
    return out / "origin", out / "run"


def timed(fn, device: torch.device | None = None, repeat: int = 1) -> float:
    """Seconds of ``fn()`` (the fastest of ``repeat`` calls), waiting for a CUDA device to finish."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def row(label: str, fn, checkpoints: int = 1, repeat: int = 1) -> float:
    """Time ``fn`` over ``checkpoints`` checkpoints; print and return the seconds per checkpoint."""
    seconds = timed(fn, repeat=repeat) / checkpoints
    print(f"  {label:<{LABEL}s} {seconds:8.2f} s", flush=True)
    return seconds


def read_floor(o, c, refs, device: str | torch.device = "cpu") -> None:
    """What no tool can skip: stream every analysed matrix of W_0 and W_t, form ΔW in float32 (on ``device``)."""
    for r in refs:
        c.read_matrix(r).to(device).float() - o.read_matrix(r).to(device).float()


def naive_over(fn, o, c, refs, s: Settings) -> list:
    """A plain numpy script (``bench/naive.py``) over every matrix of one checkpoint, reading as opd_lens does."""
    return [fn(o.read_matrix(r).float().numpy(), c.read_matrix(r).float().numpy(), s) for r in refs]


def fresh_store(store: Path, warm: Path):
    """A new store holding W_0's factors (copied from the store ``warm``, computed once per run)."""
    shutil.rmtree(store, ignore_errors=True)
    s = opd_lens.open_store(store)
    shutil.copytree(warm / "cache" / "origin", store / "cache" / "origin", dirs_exist_ok=True)
    return s


def compute_fresh(store: Path, run: Path, origin: Path, warm: Path, endpoint: str, device: str = "auto") -> None:
    """One ``opd_lens.compute`` into a fresh store that starts with W_0's factors cached."""
    fresh_store(store, warm)
    opd_lens.compute(store, run, origin=origin, name="r", endpoint=endpoint, device=device, progress=False)


def series(store: Path, ckpts, origin: Path, warm: Path, device: str = "auto") -> float:
    """Seconds per checkpoint of a series grown one checkpoint at a time, as ``opd-lens watch`` grows it: link the
    checkpoint into the run, ``Store.compute`` (trajectory metrics, and every stored step's lock_alignment against
    the new last one)."""
    s = fresh_store(store, warm)
    run = link_run(ckpts[:1], store.parent / f"{store.name}-run")
    s.add_run("r", run, origin=origin)
    seconds = timed(lambda: s.compute(endpoint="none", device=device, progress=False))
    for c in ckpts[1:]:
        (run / c.path.name).symlink_to(c.path.resolve(), target_is_directory=True)
        seconds += timed(lambda: s.compute(endpoint="none", device=device, progress=False))
    return seconds / len(ckpts)


def link_run(ckpts, out: Path) -> Path:
    """A run directory holding links to these checkpoints."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for c in ckpts:
        (out / c.path.name).symlink_to(c.path.resolve(), target_is_directory=True)
    return out
