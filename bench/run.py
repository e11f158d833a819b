"""Benchmark: opd_lens's compute path against the read floor and naive float64 references.

    python bench/run.py                      # hidden 1024, intermediate 3072, 8 layers, 6 checkpoints, bf16
    python bench/run.py --layers 2 --checkpoints 3 --hidden 512 --intermediate 1536     # a quick look
    python bench/run.py --spectrum powerlaw  # the update's spectrum: planted, powerlaw or bulk (the default)

Builds a synthetic Qwen3-shaped run (an update of the chosen spectrum, ``opd_lens.testing.SPECTRA``) and
measures, in ONE process so that ratios are comparable on a noisy machine:

per checkpoint, trajectory metrics (what grows with the number of checkpoints)
    (a) the read floor: stream every analysed matrix of W_0 and W_t from safetensors, form ΔW in float32;
    (f) the non-spectral part: the read, opd_lens's one update pass and both mask overlaps (no spectra, no store);
        (a) and (f) are each the fastest of 3 passes;
    (b) opd_lens, default settings, no endpoint metrics (W_0's factors already cached), checkpoints added to a
        store one at a time as a series or ``opd-lens watch`` adds them (``Store.compute`` after each);
    (b₁) the same as one ``opd_lens.compute`` call into a fresh store (creating its arrays, returning the Dataset);
    (d) naive (numpy, ``bench/naive.py``): a full float64 SVD of ΔW per matrix (stable rank, Hill α, V_16) plus the
        elementwise metrics;
endpoint metrics at every checkpoint
    (c) opd_lens ``endpoint="all"`` (W_0's factors already cached);
    (e) the naive numpy pair script called per checkpoint: full float64 SVDs of W_0, W_t and ΔW, masks, angles,
        shift;
and the peak RSS of a whole compute (``endpoint="last"``) over 4 vs 8 layers, each in a fresh process.
Targets of issue 17 on a 2-core CPU: b/a ≤ 5 on the planted and power-law spectra, ≤ 15 on the bulk; f/a ≤ 1.5;
d/b ≥ 20; e/c ≥ 3; RSS growth < 15%.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import naive as naive_script
import torch
from runs import LABEL, build_run, compute_fresh, link_run, naive_over, read_floor, row, series, timed

import opd_lens
from opd_lens.checkpoints import find_checkpoints, matched_matrices, open_checkpoint
from opd_lens.diagnostics import Settings, bits, origin_factors
from opd_lens.diagnostics.support import update_pass
from opd_lens.testing import SPECTRA

TRAJECTORY_TARGET = {"planted": 5, "powerlaw": 5, "bulk": 15}
FAST_REPEAT = 3
"""(a) and (f) take a fraction of a second: each is the fastest of this many passes, so that a moment of noise on a
shared machine does not decide the ratio of the two."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--checkpoints", type=int, default=6)
    p.add_argument("--rank", type=int, default=4, help="rank of the planted update (default: %(default)s)")
    p.add_argument("--density", type=float, default=0.3, help="density of its sparse part (default: %(default)s)")
    p.add_argument("--spectrum", choices=SPECTRA, default="bulk", help="the update's spectrum (default: %(default)s)")
    p.add_argument("--reference-checkpoints", type=int, default=1, help="checkpoints timed for (d), (e) and (c)")
    p.add_argument("--work", type=Path, default=Path("/tmp/opd-lens-bench"), help="where runs and stores go")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--skip-rss", action="store_true", help="skip the 4-vs-8-layer peak RSS measurement")
    p.add_argument("--rss-probe", nargs=3, metavar=("ORIGIN", "RUN", "STORE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_probe:
        return _rss_probe(*map(Path, args.rss_probe))

    origin, run = build_run(args, args.layers)
    ckpts = find_checkpoints(run)
    o = open_checkpoint(origin)
    refs = matched_matrices(o, ckpts[0])
    n_ref = min(args.reference_checkpoints, len(ckpts))
    params = sum(math.prod(r.shape) for r in refs) / 1e6
    print(
        f"run: {len(refs)} matrices, {params:.1f} M parameters per checkpoint, {len(ckpts)} checkpoints; "
        f"{args.spectrum} spectrum; torch {torch.__version__}, {torch.get_num_threads()} threads\n",
        flush=True,
    )

    settings = Settings()
    warm = args.work / "warm-store"  # holds W_0's factors, computed once per run and timed here
    shutil.rmtree(warm, ignore_errors=True)
    first = timed(lambda: opd_lens.compute(warm, run, origin=origin, name="r", endpoint="none", progress=False))

    print("per checkpoint, trajectory metrics")
    a = row(
        "(a) read floor: stream W_0 and W_t, form ΔW in fp32",
        lambda: [read_floor(o, c, refs) for c in ckpts],
        len(ckpts),
        repeat=FAST_REPEAT,
    )
    masks = {r: origin_factors(o.read_matrix(r), settings) for r in refs}
    f = row(
        "(f) non-spectral part: read, update pass, overlaps",
        lambda: [_non_spectral(o, c, refs, masks, settings) for c in ckpts],
        len(ckpts),
        repeat=FAST_REPEAT,
    )
    print(f"{'':62s}f/a = {f / a:5.1f}  (target ≤ 1.5)")
    b = series(args.work / "b", ckpts, origin, warm)
    print(f"  {'(b) opd_lens trajectory metrics, one checkpoint at a time':<{LABEL}s} {b:8.2f} s", flush=True)
    print(f"{'':62s}b/a = {b / a:5.1f}  (target ≤ {TRAJECTORY_TARGET[args.spectrum]})")
    b1 = row(
        "(b₁) the same in one compute() into a fresh store",
        lambda: compute_fresh(args.work / "b1", run, origin, warm, "none"),
        len(ckpts),
    )
    print(f"{'':62s}b₁/a = {b1 / a:4.1f}")
    naive = ckpts[:n_ref]
    d = row(
        "(d) naive: full float64 SVD of ΔW per matrix",
        lambda: [naive_over(naive_script.trajectory, o, c, refs, settings) for c in naive],
        n_ref,
    )
    print(f"{'':62s}d/b = {d / b:5.1f}  (target ≥ 20)")
    print("endpoint metrics at every checkpoint")
    subset = link_run(naive, args.work / "subset")
    c = row("(c) opd_lens endpoint='all'", lambda: compute_fresh(args.work / "c", subset, origin, warm, "all"), n_ref)
    e = row(
        "(e) naive pair script, re-factorises W_0",
        lambda: [naive_over(naive_script.pair, o, c, refs, settings) for c in naive],
        n_ref,
    )
    print(f"{'':62s}e/c = {e / c:5.1f}  (target ≥ 3)")
    print("once per run")
    label = "opd_lens: W_0's SVD and masks, cached in the store"
    print(f"  {label:<{LABEL}s} {first - b1 * len(ckpts):8.2f} s")
    if not args.skip_rss:
        small, large = (_peak_rss(args, layers) for layers in (max(1, args.layers // 2), args.layers))
        print(
            f"\npeak RSS of a compute: {args.layers // 2} layers {small:.0f} MiB, {args.layers} layers "
            f"{large:.0f} MiB: {100 * (large / small - 1):+.1f}%  (target < +15%)"
        )


def _non_spectral(o, c, refs, origins, s: Settings) -> list:
    """What opd_lens computes besides the spectra: ΔW, ‖ΔW‖_F and M_upd in one pass, and M_upd's two overlaps."""
    out = []
    for r in refs:
        p = update_pass(o.read_matrix(r), c.read_matrix(r), s.eta)
        m = origins[r]
        out.append(
            (p.fro, p.n_changed, bits.count_and(m.principal_mask, p.changed), bits.count_and(m.lowmag_mask, p.changed))
        )
    return out


def _peak_rss(args, layers: int) -> float:
    origin, run = build_run(args, layers)
    store = args.work / f"rss-{layers}"
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, __file__, "--rss-probe", str(origin), str(run), str(store)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def _rss_probe(origin: Path, run: Path, store: Path) -> None:
    opd_lens.compute(store, run, origin=origin, name="r", progress=False)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
