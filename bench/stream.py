"""Benchmark: peak memory of a compute on Qwen3-8B-shaped matrices, which opd_lens streams one matrix at a time.

    OMP_NUM_THREADS=1 python bench/stream.py --threads 1    # Qwen3-8B shapes, 2 layers, 2 checkpoints: ~30 min
    python bench/stream.py --layers 1                       # the same peaks in about half the time
    python bench/stream.py --hidden 1024 --intermediate 3072 --heads 8 --kv-heads 2    # a quick look (~1 min)

(At such small sizes about 100 MB of fixed overhead, the allocator's and the store's, dominate the multiples.)

Writes a synthetic run with Qwen3-8B's matrix shapes (hidden 4096, intermediate 12288, 32 query and 8 key/value
heads of 128: q/o 4096×4096, k/v 1024×4096, gate/up 12288×4096, down 4096×12288) in bf16, every checkpoint
sharded (``--shard-mb``) with a real ``model.safetensors.index.json``, and a planted rank-4 plus sparse update.
Then it runs each phase of a compute in a FRESH child process, spawned by this small parent (a child's
``ru_maxrss`` starts at its parent's RSS), and reports that process's peak RSS (``ru_maxrss``) above its
baseline, its RSS after the imports and a tiny warm-up compute:

(i)   the one-off origin pass: W₀'s float64 SVDs and masks, cached on disk (what ``compute`` does first per run);
(ii)  one trajectory step (``endpoint="none"``) with W₀'s factors cached: what every checkpoint costs;
(iii) one endpoint step (``endpoint="last"``): (ii) plus the float64 SVD of W_t for angles and spectral shift.

The target (from the issue) for (ii) and (iii): peak ≤ 3× the largest matrix in fp32 (12288·4096·4 B = 201 MB,
so 604 MB) plus the origin factors of that matrix as the compute holds them in memory: its two masks as bool (1 B
per entry each, 101 MB), and for (iii) its float64 top-512 singular vectors as well (67 MB).

The time is the float64 SVDs: (i) and (iii) take one per matrix, 70 to 100 s for the 4096-wide ones on one
thread. Measured on a shared 2-core CPU with ``--threads 1``: (i) 864 s, (ii) 45 s, (iii) 913 s, plus about two
minutes to write the run the first time (2.2 GB of bf16 under ``--work``, reused afterwards). The peaks are per
matrix (one is in memory at a time), so they do not depend on the number of layers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

MB = 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=12288)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--checkpoints", type=int, default=2)
    p.add_argument("--shard-mb", type=float, default=256, help="max shard size in MB (default: %(default)s)")
    p.add_argument("--phases", default="i,ii,iii", help="which phases to run (default: %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/tmp/opd-lens-stream"), help="where runs and stores go")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", nargs=4, metavar=("PHASE", "ORIGIN", "RUN", "STORE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        return _build(args)
    if args.probe:
        return _probe(args, args.probe[0], *map(Path, args.probe[1:]))

    # This process imports neither torch nor opd_lens and holds no tensor: a child's ru_maxrss starts from the RSS
    # of the process that spawned it, so every probe must be spawned by a small one.
    size = ["--hidden", "--intermediate", "--heads", "--kv-heads", "--layers", "--checkpoints", "--shard-mb"]
    values = [args.hidden, args.intermediate, args.heads, args.kv_heads, args.layers, args.checkpoints, args.shard_mb]
    common = [a for pair in zip(size, map(str, values), strict=True) for a in pair] + ["--work", str(args.work)]
    common += ["--threads", str(args.threads)] if args.threads else []
    print(f"run under {args.work} (written on first use, a few minutes at the default sizes) ...", flush=True)
    info = _child([*common, "--build"])
    m, n = info["largest"]
    fp32 = m * n * 4
    k = info["k"]
    masks = 2 * m * n  # two bool masks
    svd = 8 * (m * k + k * n + min(m, n))  # u, vh (top-k) and the whole spectrum, float64
    targets = {"ii": 3 * fp32 + masks, "iii": 3 * fp32 + masks + svd}
    print(
        f"run: {info['matrices']} matrices in {args.layers} layers, {len(info['checkpoints'])} bf16 checkpoints, "
        f"{'/'.join(map(str, info['shards']))} shards per checkpoint with model.safetensors.index.json; "
        f"torch {info['torch']}, {info['threads']} thread(s)\n"
        f"largest matrix {m}×{n}: {fp32 / MB:.0f} MB in fp32; its origin factors in memory: masks {masks / MB:.0f} MB, "
        f"float64 top-{k} SVD {svd / MB:.0f} MB\n",
        flush=True,
    )

    phases = set(args.phases.split(","))
    base = Path(info["work"]) / "stores"
    origin, run = info["origin"], info["run"]
    origin_store = base / "origin"
    rows = []
    if "i" in phases:
        shutil.rmtree(origin_store, ignore_errors=True)
        r = _child([*common, "--probe", "origin", origin, run, str(origin_store)])
        rows.append(("(i) origin factors, once per run", r, None))
    if not (origin_store / "cache" / "origin").is_dir():
        sys.exit(f"{origin_store}: no cached origin factors; run phase i first")
    cache_mb = sum(f.stat().st_size for f in (origin_store / "cache" / "origin").rglob("*") if f.is_file()) / MB
    for phase, label, ckpt in (
        ("ii", "(ii) trajectory step, endpoint='none'", info["checkpoints"][0]),
        ("iii", "(iii) endpoint step, endpoint='last'", info["checkpoints"][-1]),
    ):
        if phase in phases:
            store, subset = base / phase, base / f"run-{phase}"
            for path in (store, subset):
                shutil.rmtree(path, ignore_errors=True)
            subset.mkdir(parents=True)
            (subset / Path(ckpt).name).symlink_to(ckpt, target_is_directory=True)
            r = _child([*common, "--probe", phase, origin, str(subset), str(store)])
            rows.append((label, r, targets[phase]))

    print(f"{'phase':<40s} {'seconds':>8s} {'baseline':>9s} {'peak above':>11s} {'× fp32':>7s}   target")
    for label, r, target in rows:
        peak = r["peak"] - r["baseline"]
        verdict = "" if target is None else f"≤ {target / MB:.0f} MB {'pass' if peak <= target else 'FAIL'}"
        print(
            f"{label:<40s} {r['seconds']:8.1f} {r['baseline'] / MB:6.0f} MB {peak / MB:8.0f} MB {peak / fp32:7.2f}   "
            f"{verdict}"
        )
    print(f"\norigin-factor cache on disk: {cache_mb:.0f} MB for {info['matrices']} matrices")


def _child(argv: list[str]) -> dict:
    """Run this script with ``argv`` in a fresh process; its last stdout line is JSON."""
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _build(args) -> None:
    """Write (once) the synthetic sharded run for these sizes; print what it holds as JSON."""
    import torch

    from opd_lens.checkpoints import find_checkpoints, matched_matrices, open_checkpoint
    from opd_lens.diagnostics import Settings
    from opd_lens.testing import qwen3_config, write_planted_run

    key = f"h{args.hidden}-i{args.intermediate}-a{args.heads}-{args.kv_heads}-L{args.layers}-c{args.checkpoints}"
    key += f"-s{args.shard_mb:g}"
    out = args.work / key
    if not (out / "done").is_file():
        shutil.rmtree(out, ignore_errors=True)
        print(f"writing the run to {out} ...", file=sys.stderr, flush=True)
        config = qwen3_config(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads)
        steps = [10 * (i + 1) for i in range(args.checkpoints)]
        write_planted_run(out, config=config, steps=steps, max_shard_bytes=int(args.shard_mb * MB))
        (out / "done").touch()
    origin, run = out / "origin", out / "run"
    ckpts = find_checkpoints(run)
    for c in ckpts:
        assert (c.path / "model.safetensors.index.json").is_file(), f"{c.path} is not sharded"
    refs = matched_matrices(open_checkpoint(origin), ckpts[-1])
    largest = max(refs, key=lambda r: math.prod(r.shape)).shape
    s = Settings()
    info = {
        "work": str(out),
        "origin": str(origin),
        "run": str(run),
        "checkpoints": [str(c.path.resolve()) for c in ckpts],
        "shards": sorted({len({t.file for t in c.tensors.values()}) for c in ckpts}),
        "matrices": len(refs),
        "largest": list(largest),
        "k": min(max(s.angle_k, s.mask_rank), *largest),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
    }
    print(json.dumps(info))


def _rss() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _probe(args, phase: str, origin: Path, run: Path, store: Path) -> None:
    """One phase in this (fresh) process; prints its baseline and peak RSS and its seconds as one JSON line."""
    import tempfile

    import torch

    import opd_lens
    from opd_lens.checkpoints import find_checkpoints, matched_matrices, open_checkpoint
    from opd_lens.testing import qwen3_config, write_planted_run

    if args.threads:
        torch.set_num_threads(args.threads)
    s = opd_lens.open_store(store)
    s.add_run("r", run, origin)
    if phase != "origin":  # W_0's factors cached, as after the first compute of a run
        shutil.copytree(store.parent / "origin" / "cache" / "origin", store / "cache" / "origin")
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: every code path once, on tiny matrices
        o, r = write_planted_run(Path(tmp) / "w", config=qwen3_config(1, 256, 384, 4, 2), steps=(1,))
        opd_lens.compute(Path(tmp) / "s", r, origin=o, name="w", progress=False, device="cpu")
    baseline = _rss()
    t = time.perf_counter()
    if phase == "origin":
        o = open_checkpoint(origin)
        cache = s.origin_cache(o)
        for ref in matched_matrices(o, find_checkpoints(run)[-1]):
            cache.get(ref, o.read_matrix(ref), with_svd=True)
    else:
        report = s.compute(endpoint="none" if phase == "ii" else "last", device="cpu", progress=False)
        assert len(report.steps) == 1, report
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds}))


if __name__ == "__main__":
    main()
