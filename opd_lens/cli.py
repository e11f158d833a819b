"""The ``opd-lens`` command. User mistakes print one line and exit with status 2."""

from __future__ import annotations

import argparse
import ast
import ctypes
import functools
import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .api import Store, open_store
from .checkpoints import MatrixPlan, find_checkpoints, matched_matrices, open_checkpoint
from .checkpoints.formats import PICKLE_ENV
from .demo import DEMO_DIR, copy_notebooks, run_demo
from .diagnostics import Settings, subspace_k
from .errors import OpdLensError, StoreError
from .summary import Summary, summarize

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    if hasattr(args, "allow_pickle"):  # the flag, or the environment variable: read here only
        args.allow_pickle = args.allow_pickle or os.environ.get(PICKLE_ENV, "0") not in ("", "0")
    try:
        return args.func(args) or 0
    except OpdLensError as e:
        print(f"opd-lens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opd-lens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


_PRESETS = (
    "ci: ~2 min, sft/opd/rlvr only; classroom: ~10 min, every run; paper: longer, closer to the paper's step "
    "counts (default: %(default)s)"
)


def _preset_names() -> tuple[str, ...]:
    """The keys of :data:`opd_lens.zoo.PRESETS`, read from its source: importing the zoo needs transformers, which
    the other commands (and ``--help``) do not."""
    tree = ast.parse((Path(__file__).parent / "zoo" / "presets.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Dict)
            and ast.unparse(node.targets[0]) == "PRESETS"
        ):
            return tuple(ast.literal_eval(key) for key in node.value.keys if key is not None)
    raise RuntimeError("opd_lens/zoo/presets.py defines no PRESETS dict")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd-lens", description="Where did my fine-tuning go in parameter space?")
    p.add_argument("--version", action="version", version=f"opd-lens {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="train the demo zoo (or reuse it), compute its store, write report.html, print the table"
    )
    demo.add_argument("--out", type=Path, default=Path(DEMO_DIR), help="working directory (default: %(default)s)")
    demo.add_argument("--preset", default="classroom", choices=_preset_names(), help=_PRESETS)
    demo.add_argument("--workers", type=int, default=2, help="runs trained at once (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    books = sub.add_parser("notebooks", help="copy the classroom notebooks into a folder, to open in Jupyter")
    books.add_argument(
        "dir", type=Path, nargs="?", default=Path("demo_notebooks"), help="destination (default: %(default)s)"
    )
    books.add_argument("--force", action="store_true", help="overwrite notebooks you have edited")
    books.set_defaults(func=_notebooks)

    retrain = sub.add_parser(
        "retrain", help="retrain a demo-zoo run from ~20%% of its training, confined to its early rank-K channel"
    )
    retrain.add_argument("zoo", type=Path, help="the zoo's directory (opd-lens zoo --out)")
    retrain.add_argument("--run", default="opd", help="the run to constrain (default: %(default)s)")
    retrain.add_argument("-k", type=int, default=16, help="rank K of the channel V_K (default: %(default)s)")
    retrain.add_argument("--at", type=float, default=0.2, help="projection point, fraction (default: %(default)s)")
    retrain.add_argument(
        "--mode",
        default="gradient",
        choices=("gradient", "update"),
        help="project each gradient (the paper) or each optimizer update (default: %(default)s)",
    )
    retrain.add_argument("--store", type=Path, help="also compute the retrained run into this store")
    retrain.add_argument("--quiet", action="store_true", help="no progress bars")
    retrain.set_defaults(func=_retrain)

    report = sub.add_parser("report", help="write a store's offline HTML report (one self-contained file)")
    report.add_argument("store", type=Path, help="the store directory")
    report.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="default: %(default)s")
    report.add_argument("--title", default="opd_lens report", help="default: %(default)s")
    report.set_defaults(func=_report)

    comp = sub.add_parser("compute", help="compute a run's diagnostics into a store (only what is new)")
    _run_args(comp)
    comp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    comp.add_argument(
        "--endpoint",
        default="last",
        help="steps that also get principal angles and spectral shift: last, all, none or STEP,STEP,... "
        "(default: %(default)s)",
    )
    comp.add_argument("--lock-k", type=int, help=f"K of Sim_K for a new store (default {Settings.lock_k})")
    comp.add_argument(
        "--angle-k",
        type=_angle_k,
        help="k of the principal angles for a new store: a count, or a fraction of each matrix's smaller side "
        f"such as 1/8 (the paper's 512 of 4096; default {Settings.angle_k})",
    )
    comp.add_argument(
        "--mask-rank", type=int, help=f"rank r of the principal mask for a new store (default {Settings.mask_rank})"
    )
    comp.add_argument(
        "--mask-alpha", type=float, help=f"mask fraction α for a new store (default {Settings.mask_alpha})"
    )
    comp.add_argument(
        "--exact",
        action="store_true",
        default=None,
        help="a new store computes the trajectory spectra by full float64 SVDs instead of block Krylov",
    )
    comp.add_argument("--quiet", action="store_true", help="no progress bars")
    comp.set_defaults(func=_compute)

    summ = sub.add_parser("summary", help="print the paper-style table of a store, one row per run")
    summ.add_argument("store", type=Path)
    fmt = summ.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV instead of a table")
    fmt.add_argument("--json", action="store_true", help="JSON instead of a table")
    summ.set_defaults(func=_summary)

    watch = sub.add_parser("watch", help="follow a run that is still training: compute checkpoints as they land")
    _run_args(watch)
    watch.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default: %(default)s)")
    watch.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    watch.set_defaults(func=_watch)

    zoo = sub.add_parser("zoo", help="train the demo zoo: SFT, OPD, RLVR and control runs of a tiny Qwen3 on CPU")
    zoo.add_argument("--out", type=Path, required=True, help="the zoo's directory (an interrupted zoo resumes)")
    zoo.add_argument(
        "--preset",
        default="classroom",
        choices=_preset_names(),
        help=_PRESETS,
    )
    zoo.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    zoo.add_argument(
        "--workers", type=int, default=2, help="runs trained at once, one process each (default: %(default)s)"
    )
    zoo.add_argument("--quiet", action="store_true", help="no progress bars")
    zoo.set_defaults(func=_zoo)

    reloc = sub.add_parser(
        "relocate", help="point a store at runs and origins that moved (paths inside the store's folder follow it)"
    )
    reloc.add_argument("store", type=Path, help="the store directory")
    reloc.add_argument("--from", dest="old", type=Path, required=True, help="the folder the store records")
    reloc.add_argument("--to", dest="new", type=Path, required=True, help="where that folder is now")
    reloc.set_defaults(func=_relocate)

    ins = sub.add_parser("inspect", help="list the checkpoints of a run and the matrices opd_lens analyses")
    ins.add_argument("run_dir", type=Path, help="a run directory or a single checkpoint directory")
    ins.add_argument("--origin", type=Path, help="origin checkpoint W_0 to check every checkpoint against")
    ins.add_argument("--include-globals", action="store_true", help="also analyse embeddings and lm_head")
    _pickle_arg(ins)
    ins.set_defaults(func=_inspect)
    return p


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="the run's checkpoint directory")
    p.add_argument("--origin", type=Path, required=True, help="the run's origin checkpoint W_0")
    p.add_argument("--name", required=True, help="the run's name in the store")
    p.add_argument("--method", help="method label, e.g. sft, opd, rlvr (default: the name)")
    p.add_argument("--store", type=Path, required=True, help="the store directory (created if missing)")
    _pickle_arg(p)


def _pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help=f"also read .bin/.pt checkpoints, with torch.load(weights_only=True) (or set {PICKLE_ENV}=1)",
    )


def _angle_k(text: str) -> int | float:
    """``--angle-k``: an integer count, or a fraction given as ``1/8`` or ``0.125``."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else (int(text) if text.strip().lstrip("+").isdigit() else float(text))
        subspace_k(value, 1, 1)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a count >= 1 or a fraction in (0, 1) such as 1/8, got {text!r}"
        ) from None
    return value


def _open(args: argparse.Namespace) -> Store:
    keys = ("lock_k", "angle_k", "mask_rank", "mask_alpha", "exact")
    given = {k: v for k in keys if (v := getattr(args, k, None)) is not None}
    store = open_store(args.store, Settings(**given) if not (args.store / "data.zarr").exists() else None)
    for key, value in given.items():
        if getattr(store.settings, key) != value:
            raise StoreError(f"{args.store}: the store uses {key}={getattr(store.settings, key)}, not {value}")
    store.add_run(args.name, args.run_dir, args.origin, args.method, allow_pickle=args.allow_pickle)
    return store


def _compute(args: argparse.Namespace) -> int:
    store = _open(args)
    report = store.compute(
        runs=[args.name],
        device=args.device,
        endpoint=args.endpoint,
        progress=not args.quiet,
        allow_pickle=args.allow_pickle,
    )
    done = "steps " + ", ".join(str(step) for _, step in report.steps) if report.steps else "nothing new"
    print(f"{args.name}: computed {done}; {report.matrices_read} matrices read; store {args.store}")
    return 2 if report.skipped else 0  # each skipped checkpoint was one warning line


def _summary(args: argparse.Namespace) -> None:
    summary = Summary.of(open_store(args.store, create=False).dataset())
    if args.csv:
        print(summary.table.to_csv(), end="")
    elif args.json:
        print(summary.table.to_json(orient="index", indent=2))
    else:
        print(summary.text())


def _watch(args: argparse.Namespace) -> None:
    store = _open(args)
    print(
        f"watching {args.run_dir} every {args.interval:g}s into {args.store} (Ctrl-C stops; the store stays consistent)"
    )
    try:
        while True:
            report = store.compute(runs=[args.name], device=args.device, progress=False, allow_pickle=args.allow_pickle)
            if report.steps:  # the columns printed need the first and last steps only: read just those
                recorded = store.recorded(args.name)
                ends = (min(recorded), max(recorded))
                row = summarize(store.dataset(runs=[args.name], steps=ends)).loc[args.name]
                steps = ", ".join(str(s) for _, s in report.steps)
                print(
                    f"{args.name}: step {steps} done; last step {row.last_step}: stable rank {row.stable_rank:.3g}, "
                    f"Sim_K first->last {row.lock_alignment_first:.3f}",
                    flush=True,
                )
            _trim_heap()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print("stopped; every completed step is in the store", file=sys.stderr)


def _trim_heap() -> None:
    """Hand the heap that a compute freed back to the OS (glibc's ``malloc_trim``; elsewhere nothing). glibc keeps
    it otherwise, and a long watch grew: 321 MiB to 2 GiB of RSS over 500 checkpoints (``bench/soak.py``)."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` from the symbols already loaded (``None`` off Linux, or with a libc that lacks it)."""
    return getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


def _relocate(args: argparse.Namespace) -> None:
    changed = open_store(args.store, create=False).relocate(args.old, args.new)
    print(f"{args.store}: {changed} recorded path(s) moved from {args.old} to {args.new}")


def _inspect(args: argparse.Namespace) -> None:
    ckpts = find_checkpoints(args.run_dir, allow_pickle=args.allow_pickle)
    origin = open_checkpoint(args.origin, allow_pickle=args.allow_pickle) if args.origin else None
    print(f"{args.run_dir}: {len(ckpts)} checkpoint(s)")
    print(f"  {'step':>8}  {'matrices':>8}  {'dtypes':<10} path")
    for c in ckpts:
        if c.adapter is None:
            refs = (
                matched_matrices(origin, c, args.include_globals) if origin else c.plan(args.include_globals).matrices
            )
            count, stored = len(refs), [r.tensor for r in refs]
        else:  # the factors' dtypes; without the base, the adapted modules
            count = len(matched_matrices(origin, c, args.include_globals) if origin else c.adapter.pairs)
            stored = [name for p in c.adapter.pairs.values() for name in (p.a, p.b)]
        dtypes = ",".join(sorted({c.tensors[name].dtype for name in stored}))
        print(f"  {c.step:>8}  {count:>8}  {dtypes:<10} {c.path}")
    last = ckpts[-1]
    if last.adapter is not None:
        ranks = "/".join(str(r) for r in sorted({p.rank for p in last.adapter.pairs.values()}))
        print(
            f"LoRA adapter: {len(last.adapter.pairs)} modules of rank {ranks}, analysed from the factors of ΔW = s·B·A"
        )
        if origin is None:
            print("pass --origin BASE (the base model it adapts) to check it and list the matrices it updates")
            return
        plan = MatrixPlan(tuple(matched_matrices(origin, last, args.include_globals)), last.adapter.skipped)
    else:
        plan = last.plan(args.include_globals)
    layers = sorted({m.layer for m in plan.matrices})
    modules = sorted({m.module for m in plan.matrices})
    print(f"analysed: {len(plan.matrices)} matrices, layers {layers[0]}..{layers[-1]}, modules: {', '.join(modules)}")
    for name, why in plan.skipped.items():
        print(f"skipped: {name}: {why}")
    if origin:
        print(f"origin {origin.path}: every analysed matrix matches in name and shape")


def _demo(args: argparse.Namespace) -> None:
    _need_zoo()
    run_demo(args.out, args.preset, progress=not args.quiet, workers=args.workers)


def _notebooks(args: argparse.Namespace) -> None:
    written = copy_notebooks(args.dir, force=args.force)
    print(f"{args.dir}: {len(written)} notebook(s) copied" + ("" if written else " (all up to date)"))
    print(f"next: jupyter lab {args.dir}  (they read the demo from ../{DEMO_DIR}, or from $OPD_LENS_DEMO)")


def _retrain(args: argparse.Namespace) -> None:
    _need_zoo()
    from .zoo import rank_constrained_retrain, retrain_accuracy

    entry = rank_constrained_retrain(
        args.zoo, args.run, args.k, args.at, mode=args.mode, store=args.store, progress=not args.quiet
    )
    start = entry["constraint"]["start"]
    table = retrain_accuracy(args.zoo)
    table = table[table.run.isin([args.run, Path(entry["path"]).name]) & (table.step >= start)]
    wide = table.pivot(index="step", columns="run", values="accuracy")
    print(f"held-out accuracy from the projection point (step {start}) on, plain vs rank-{args.k} constrained:")
    print(wide.to_string(float_format=lambda x: f"{x:.3f}"))


def _report(args: argparse.Namespace) -> None:
    from .report import store_report

    path = store_report(open_store(args.store, create=False), args.output, title=args.title)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, self-contained: opens offline)")


def _need_zoo() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise OpdLensError("the zoo needs transformers: pip install 'opd-lens[zoo]'")


def _zoo(args: argparse.Namespace) -> None:
    _need_zoo()
    from .zoo import train_zoo

    start = time.monotonic()
    manifest = train_zoo(args.out, args.preset, seed=args.seed, progress=not args.quiet, workers=args.workers)
    print(f"zoo {args.out} (preset {args.preset}, seed {args.seed}) ready in {time.monotonic() - start:.0f}s")
    print(f"  {'model':<14} {'steps':>6}  held-out accuracy (avg@4)")
    for name, model in manifest["models"].items():
        print(f"  {name:<14} {model['step']:>6}  {model['accuracy']:.3f}")
    print(f"  {'run':<14} {'steps':>6}  held-out accuracy per checkpoint  origin")
    for name, run in manifest["runs"].items():
        accuracies = " ".join(f"{c['eval_accuracy']:.3f}" for c in run["checkpoints"])
        print(f"  {name:<14} {run['steps']:>6}  {accuracies}  {run['origin']}")
    print(
        f"next: opd-lens compute {args.out / 'runs' / 'opd'} --origin {args.out / 'anchor'} --name opd --method opd "
        "--store STORE (sft's origin is base)"
    )


_warned: set[tuple[str, str]] = set()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One line per warning, and one per checkpoint: ``watch`` skips a checkpoint still being written at every poll
    until it is complete."""
    path = getattr(message, "path", None)
    key = ("path", str(path)) if path is not None else ("text", str(message))
    if key not in _warned:
        _warned.add(key)
        print(f"opd-lens: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
