"""Readers beside a writer: while ``opd-lens watch`` computes checkpoints as they land (and is killed once, at a
random point, and restarted), five reader processes (``tests/store_reader.py``: the Dataset, ``summarize``, the
Explorer, a LockMonitor and xarray on the raw zarr group) read the same store over and over. None raises, each only
ever sees complete steps, and every value it sees equals the final store's."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from store_reader import computed, digests

from opd_lens import open_store
from opd_lens.errors import StoreError
from opd_lens.testing import qwen3_config, write_planted_run

KINDS = ("dataset", "summarize", "explorer", "monitor", "zarr")
STEPS = tuple(range(10, 90, 10))
CONFIG = qwen3_config(layers=2, hidden=192, intermediate=384, heads=4, kv_heads=2)  # a step takes a while to write
READER = Path(__file__).with_name("store_reader.py")


def _watch(run: Path, origin: Path, store: Path, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "opd_lens.cli", "watch", str(run), "--origin", str(origin), "--name", "r"]
    args = ["--store", str(store), "--interval", "0.1"]
    return subprocess.Popen([*cmd, *args], stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for(store: Path, steps: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the store holds ``steps`` steps of run r (read from its registry, as the CLI's own readers do)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the writer exited"
        with contextlib.suppress(StoreError):  # no store, or no run r, yet
            s = open_store(store, create=False)
            if "r" in s.runs and len(s.recorded("r")) >= steps:
                return
        time.sleep(0.05)
    raise AssertionError(f"the writer did not reach {steps} steps in {timeout:g}s")


def test_readers_beside_a_writer_killed_once_see_only_complete_steps(tmp_path):
    origin, pool = write_planted_run(tmp_path / "pool", config=CONFIG, steps=STEPS, rank=4)
    run, store, stop = tmp_path / "run", tmp_path / "store", tmp_path / "stop"
    run.mkdir()
    readers = []
    for kind in KINDS:
        cmd = [sys.executable, str(READER), kind, str(store), "r", str(tmp_path / f"{kind}.jsonl"), str(stop)]
        readers.append((kind, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
    log = open(tmp_path / "watch.log", "w")  # noqa: SIM115 - closed below
    writer = _watch(run, origin, store, log)
    rng = random.Random(0)
    killed_at = None
    try:
        for i, step in enumerate(STEPS):
            shutil.copytree(pool / f"checkpoint-{step}", run / f".tmp-{step}")
            (run / f".tmp-{step}").rename(run / f"checkpoint-{step}")  # lands whole, as save_checkpoint does
            if i == len(STEPS) // 2:  # kill the writer at a random point of computing this checkpoint
                time.sleep(rng.uniform(0.1, 0.6))
                writer.kill()
                writer.wait()
                killed_at = len(open_store(store, create=False).recorded("r"))
                writer = _watch(run, origin, store, log)  # takes over the dead writer's lock, completes the step
            _wait_for(store, i + 1, writer)
    finally:
        stop.touch()
        for _, proc in readers:
            proc.wait(timeout=120)
        writer.send_signal(signal.SIGINT)
        writer.wait(timeout=60)
        log.close()
    for kind, proc in readers:
        assert proc.returncode == 0, f"{kind} reader failed:\n{proc.stderr.read()}"

    final = computed(open_store(store, create=False).dataset().sel(run="r"))
    assert [int(s) for s in final.step.values] == list(STEPS)
    expected, last = digests(final), max(STEPS)
    for kind in KINDS:
        seen = [json.loads(line) for line in (tmp_path / f"{kind}.jsonl").read_text().splitlines()]
        assert len(seen) >= 5, (kind, len(seen))
        errors = [i for i, s in enumerate(seen) if "error" in s]
        assert errors == list(range(len(errors))), (kind, "an error after a step was seen", seen)
        counts = [s["steps"] if isinstance(s["steps"], int) else len(s["steps"]) for s in seen if "error" not in s]
        assert counts == sorted(counts), (kind, "a step disappeared", counts)  # steps only ever appear
        assert counts[-1] == len(STEPS), (kind, counts[-1])
        for s in seen:
            if "error" in s or isinstance(s["steps"], int):
                if kind == "summarize" and "error" not in s:
                    assert s["last"] in STEPS
                continue
            steps = s["steps"]
            assert set(steps) <= set(STEPS), (kind, steps)
            assert steps == [x for x in STEPS if x in steps], (kind, steps)
            for step, values in s.get("digests", {}).items():
                for name, digest in values.items():
                    if name not in expected[step] or name == "lock_alignment" and max(steps) != last:
                        continue  # Sim_K to the then-latest channel: final values only once the last step is in
                    assert digest == expected[step][name], (kind, step, name, "differs from the final store")
    print(f"writer killed with {killed_at} of {len(STEPS)} steps stored; reads: ", end="")
    print({kind: len((tmp_path / f"{kind}.jsonl").read_text().splitlines()) for kind in KINDS})
