"""Soak: ``opd-lens watch`` following a run that grows to 500 checkpoints while it watches.

    python bench/soak.py                      # 500 checkpoints of two 128×64 matrices
    python bench/soak.py --checkpoints 100

Lands the checkpoints one at a time in the watched run directory (each a symlink into a pool written first, so it
appears whole) and waits until the store records it: prints the latency of a new checkpoint (landing to recorded,
including up to one poll interval of the watcher and 20 ms of this script's) and the watcher's resident memory near
the start and near the end. Every ``--check`` checkpoints it checks every stored step's ``lock_alignment`` against a
float64 oracle, Sim_K of the exact top-K right singular vectors of ΔW_t and of the latest ΔW (the store computes
them exactly too).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from growth import NAMES, write_pool

import opd_lens
from opd_lens.checkpoints import open_checkpoint
from opd_lens.diagnostics import Settings

MODULES = ("mlp.gate_proj", "mlp.up_proj")
K = Settings().lock_k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=int, default=500)
    p.add_argument("--check", type=int, default=50, help="check lock_alignment every this many checkpoints")
    p.add_argument("--window", type=int, default=20, help="checkpoints averaged at each end (default: %(default)s)")
    p.add_argument("--interval", type=float, default=0.05, help="watch's poll interval (default: %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/tmp/opd-lens-bench/soak"))
    args = p.parse_args()
    pool, origin = write_pool(args.work, args.checkpoints)
    run, store_path = args.work / "run", args.work / "store"
    for path in (run, store_path):
        shutil.rmtree(path, ignore_errors=True)
    run.mkdir()
    opd_lens.open_store(store_path, Settings(exact=True))
    w0 = {n: open_checkpoint(origin).read(n).double().numpy() for n in NAMES}
    oracle: dict[int, dict[str, np.ndarray]] = {}
    cmd = [sys.executable, "-m", "opd_lens.cli", "watch", str(run), "--origin", str(origin), "--name", "r"]
    log = open(args.work / "watch.log", "w")  # noqa: SIM115 - closed below
    watch = subprocess.Popen(
        [*cmd, "--store", str(store_path), "--interval", str(args.interval)], stdout=log, stderr=log
    )
    latency, rss, worst = [], [], 0.0
    try:
        for step in range(1, args.checkpoints + 1):
            landed = time.perf_counter()
            (run / f"checkpoint-{step}").symlink_to(pool / f"checkpoint-{step}", target_is_directory=True)
            _wait_recorded(store_path, step, watch)
            latency.append(time.perf_counter() - landed)
            rss.append(_rss_mib(watch.pid))
            oracle[step] = {
                n: _top_v(open_checkpoint(pool / f"checkpoint-{step}").read(n).double().numpy() - w0[n]) for n in NAMES
            }
            if step % args.check == 0 or step == args.checkpoints:
                worst = max(worst, _check_lock(store_path, oracle, step))
                print(
                    f"  {step:>4} checkpoints: latency {1e3 * latency[-1]:6.0f} ms, watch RSS {rss[-1]:5.0f} MiB, "
                    f"lock_alignment max |error| {worst:.1e}",
                    flush=True,
                )
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=60)
        log.close()
    w = args.window
    start, end = statistics.median(latency[2 : 2 + w]), statistics.median(latency[-w:])
    print(f"watch over {args.checkpoints} checkpoints landing one at a time (poll every {args.interval:g} s)")
    print(
        f"  latency per new checkpoint, median: checkpoints 3–{2 + w} {1e3 * start:.0f} ms, "
        f"last {w} {1e3 * end:.0f} ms (ratio {end / start:.2f})"
    )
    print(f"  watch RSS: {rss[2]:.0f} MiB at checkpoint 3, {rss[-1]:.0f} MiB at {args.checkpoints}")
    print(f"  lock_alignment vs float64 oracle: max |error| {worst:.1e} over every step at every check")


def _wait_recorded(store: Path, step: int, watch: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if watch.poll() is not None:
            raise SystemExit(f"watch exited with status {watch.returncode}")
        s = opd_lens.open_store(store, create=False)
        if "r" in s.runs and step in s.recorded("r"):
            return
        time.sleep(0.02)  # a poll parses the registry: more often, it would take CPU from the watcher
    raise SystemExit(f"checkpoint {step} not recorded within {timeout:g} s")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _top_v(dw: np.ndarray) -> np.ndarray:
    return np.linalg.svd(dw, full_matrices=False)[2][:K].T


def _check_lock(store: Path, oracle: dict[int, dict[str, np.ndarray]], last: int) -> float:
    """Max |stored lock_alignment − Sim_K(V_K(ΔW_t), V_K(ΔW_last))| over every stored step and matrix."""
    ds = opd_lens.open_store(store, create=False).dataset().sel(run="r", layer=0)
    assert [int(s) for s in ds.step.values] == list(range(1, last + 1))
    worst = 0.0
    for name, module in zip(NAMES, MODULES, strict=True):
        final = oracle[last][name]
        expected = [np.linalg.norm(oracle[t][name].T @ final) ** 2 / K for t in range(1, last + 1)]
        got = ds.lock_alignment.sel(module=module).values
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst


if __name__ == "__main__":
    main()
