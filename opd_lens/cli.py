"""The ``opd-lens`` command. User mistakes print one line and exit with status 2."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .checkpoints import find_checkpoints, matched_matrices, open_checkpoint
from .errors import OpdLensError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        return args.func(args) or 0
    except OpdLensError as e:
        print(f"opd-lens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opd-lens: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd-lens", description="Where did my fine-tuning go in parameter space?")
    p.add_argument("--version", action="version", version=f"opd-lens {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the demo end to end (see README)")
    demo.add_argument(
        "--out", type=Path, default=Path("opd-lens-demo"), help="working directory (default: %(default)s)"
    )
    demo.set_defaults(func=_demo)

    ins = sub.add_parser("inspect", help="list the checkpoints of a run and the matrices opd_lens analyses")
    ins.add_argument("run_dir", type=Path, help="a run directory or a single checkpoint directory")
    ins.add_argument("--origin", type=Path, help="origin checkpoint W_0 to check every checkpoint against")
    ins.add_argument("--include-globals", action="store_true", help="also analyse embeddings and lm_head")
    ins.set_defaults(func=_inspect)
    return p


def _inspect(args: argparse.Namespace) -> None:
    ckpts = find_checkpoints(args.run_dir)
    origin = open_checkpoint(args.origin) if args.origin else None
    print(f"{args.run_dir}: {len(ckpts)} checkpoint(s)")
    print(f"  {'step':>8}  {'matrices':>8}  {'dtypes':<10} path")
    for c in ckpts:
        refs = matched_matrices(origin, c, args.include_globals) if origin else c.plan(args.include_globals).matrices
        dtypes = ",".join(sorted({c.tensors[r.tensor].dtype for r in refs}))
        print(f"  {c.step:>8}  {len(refs):>8}  {dtypes:<10} {c.path}")
    plan = ckpts[-1].plan(args.include_globals)
    layers = sorted({m.layer for m in plan.matrices})
    modules = sorted({m.module for m in plan.matrices})
    print(f"analysed: {len(plan.matrices)} matrices, layers {layers[0]}..{layers[-1]}, modules: {', '.join(modules)}")
    for name, why in plan.skipped.items():
        print(f"skipped: {name}: {why}")
    if origin:
        print(f"origin {origin.path}: every analysed matrix matches in name and shape")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"opd-lens: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
