"""Benchmark: the cost of each route to the top-16 spectrum of ΔW, per shape, and the constants of the rule that
chooses between them (``opd_lens.diagnostics.krylov.krylov_budget``).

    python bench/methods.py                    # transformer shapes from 256 to 4096 wide (a few minutes)
    python bench/methods.py --quick            # up to 2048 wide

For each m×n it times, in one process (best of ``--repeat``):

* the block Krylov basis grown to dimension d (no early stop), next to the cost model in ``krylov.py``;
* the float64 Gram route (Gram matrix + ``eigh``), next to its model;
* the exact float64 SVD (``svd64``), for reference;

and the crossover: the largest basis that was cheaper than the Gram route, next to the budget the code derives from
its model. Past the budget the fast path switches to the Gram route (a 2-competitive rule: a matrix never costs
much more than twice the cheaper route, whatever its spectrum).
"""

from __future__ import annotations

import argparse
import time

import torch

from opd_lens.diagnostics import krylov, svd64


def _best(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shapes up to 2048 wide only")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(256, 768), (384, 384), (1536, 384), (768, 768), (2048, 768), (1024, 1024), (3072, 1024), (2048, 2048)]
    if not args.quick:
        shapes += [(4096, 4096), (12288, 4096)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms\n")
    print(
        f"{'shape':>12} {'krylov d=64':>12} {'d=128':>8} {'d=256':>8} {'model 256':>10} {'gram+eigh':>10}"
        f" {'model':>8} {'svd64':>9} {'crossover':>10} {'budget':>7}"
    )
    g = torch.Generator().manual_seed(0)
    for m, n in shapes:
        s = min(m, n)
        a = torch.randn(m, n, generator=g)  # a flat spectrum: the Krylov basis never converges early
        dims = [d for d in range(64, s, 32) if d <= 1024]
        kry = {d: _best(lambda a=a, d=d: krylov._block_lanczos(a, 16, None, 32, 0.0, d, 0), args.repeat) for d in dims}
        a64 = a.to(torch.float64)
        t = a64 if m >= n else a64.mT
        gram = _best(lambda t=t: torch.linalg.eigh(t.mT @ t), args.repeat)
        svd = _best(lambda a=a: svd64(a, 16, left=False), 1) if m * n <= 2**23 else float("nan")
        ck, cg = krylov._NS_KRYLOV, krylov._NS_GRAM
        model_k = 1e-9 * (ck[0] * m * n * 256 + ck[1] * (m + n) * 256**2 + ck[2] * 256**4 / 32)
        model_g = 1e-9 * (cg[0] * m * n * s + cg[1] * s**3)
        cross = max([d for d, sec in kry.items() if sec <= gram], default=0)
        cells = " ".join(f"{1e3 * kry[d]:8.1f}" if d in kry else f"{'':>8}" for d in (64, 128, 256))
        print(
            f"{m:>5}×{n:<6} {cells:>30} {1e3 * model_k:10.1f} {1e3 * gram:10.1f} {1e3 * model_g:8.1f}"
            f" {1e3 * svd:9.1f} {cross:>10} {krylov.krylov_budget(m, n):>7}"
        )
    print("\ncrossover: the largest basis measured cheaper than the Gram route; budget: where the code switches")


if __name__ == "__main__":
    main()
