"""Run the CLI fuzzing campaign of ``tests/test_fuzz_cli.py`` at volume: ``python scripts/fuzz.py --cases 10000``.

Splits the cases over ``--jobs`` pytest processes, each with its own hypothesis seed, and prints their tally: cases
per command and exit status, the CLI's time per case and the wall time (and the cases done every 10 minutes). Exits
1, with the failing case, if any case fails (hypothesis shrinks it first)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=int(time.time()), help="hypothesis seed of the first job")
    args = p.parse_args()
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for j in range(args.jobs):
            n = args.cases // args.jobs + (j < args.cases % args.jobs)
            report = Path(tmp) / f"tally-{j}.json"
            env = {**os.environ, "OPD_LENS_FUZZ_EXAMPLES": str(n), "OPD_LENS_FUZZ_REPORT": str(report)}
            cmd = [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-x",
                "-p",
                "no:cacheprovider",
                "-W",
                "ignore::FutureWarning",
                f"--hypothesis-seed={args.seed + j}",
                "tests/test_fuzz_cli.py",
            ]
            log = open(Path(tmp) / f"log-{j}.txt", "w+")  # noqa: SIM115
            jobs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), report, log))
        next_progress = start + 600
        while any(proc.poll() is None for proc, _, _ in jobs):
            time.sleep(1)
            if time.monotonic() >= next_progress:
                next_progress += 600
                done = sum(_cases(json.loads(r.read_text())) for _, r, _ in jobs if r.exists())
                print(f"  {(time.monotonic() - start) / 60:.0f} min: {done} cases done", flush=True)
        tally: collections.Counter = collections.Counter()
        failed = False
        for proc, report, log in jobs:
            failed |= proc.wait() != 0
            if proc.returncode:
                log.seek(0)
                print(log.read()[-8000:])
            if report.exists():
                part = json.loads(report.read_text())
                slowest = max(tally.pop("slowest", 0), part.pop("slowest", 0))
                tally.update(part)
                tally["slowest"] = slowest
    wall = time.monotonic() - start
    cases = _cases(tally)
    print(f"{cases} cases in {wall / 60:.1f} min on {args.jobs} job(s), seeds {args.seed}..{args.seed + args.jobs - 1}")
    for key in sorted(k for k in tally if " exit " in k):
        print(f"  {key:<28} {tally[key]:>6}")
    if cases:
        print(f"  CLI time per case: mean {tally['seconds'] / cases:.3f} s, slowest {tally['slowest']:.2f} s")
    print("FAILED" if failed else "no traceback, no hang, nothing written outside the store, no stored step changed")
    return 1 if failed else 0


def _cases(tally: dict) -> int:
    return sum(v for k, v in tally.items() if " exit " in k)


if __name__ == "__main__":
    sys.exit(main())
