"""Train the whole zoo in order, the runs on single-threaded worker processes, and keep its manifest.

Layout under ``out``: ``base/`` and ``teacher/`` (single checkpoint directories), ``runs/<name>/checkpoint-N/``,
``anchor/`` (a copy of the final ``sft`` checkpoint, origin of every other run) and the manifest ``zoo.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ZooError
from ..files import replacing
from .models import load_model, save_model
from .presets import PRESETS, Preset
from .train import pretrain, run_entry, train_run

__all__ = ["train_zoo", "load_zoo", "record_retrain", "single_thread", "ZooError", "MANIFEST"]

MANIFEST = "zoo.json"


def load_zoo(out: str | os.PathLike) -> dict:
    """The manifest of the zoo in ``out``: preset, seed and configuration; the ``base``, ``teacher`` and
    ``anchor`` models with their held-out accuracy; the finished runs, each with its method, origin, steps and
    per-checkpoint log (step, held-out accuracy, training statistics); ``retrains``, the constrained retrainings
    (:mod:`opd_lens.zoo.retrain`), when there are any. Paths are relative to ``out``."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise ZooError(f"{out}: no zoo here ({MANIFEST} missing)")
    return json.loads(path.read_text())


def train_zoo(
    out: str | os.PathLike,
    preset: str | Preset = "classroom",
    seed: int = 0,
    progress: bool = True,
    workers: int = 2,
) -> dict:
    """Train the zoo of ``preset`` into ``out`` and return its manifest (see :func:`load_zoo`).

    The base and the teacher are pretrained, the ``sft`` run trains the anchor from the base, then the other runs
    train from the anchor, up to ``workers`` at once, each in its own single-threaded process (tiny models gain
    little from more threads and lose much on a busy machine; their progress bars go to the terminal);
    ``workers=1`` trains everything in this process. Deterministic in ``seed``: the same bytes on the same machine.
    Resumable: what is finished is kept, and a run stopped mid-way continues from its last checkpoint (a stopped
    pretraining, seconds long, starts over). ``out`` may not hold a zoo of another preset or seed.
    """
    out = Path(out)
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ZooError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    manifest = _open_manifest(out, preset, seed)
    models, runs = manifest["models"], manifest["runs"]
    with single_thread():
        for name in ("base", "teacher"):
            if name not in models:
                models[name] = pretrain(out, name, preset, seed, progress)
                _write_manifest(out, manifest)
        if "sft" not in runs:
            runs["sft"] = train_run(out, "sft", preset, seed, progress)
            _write_manifest(out, manifest)
        if "anchor" not in models:
            last = runs["sft"]["checkpoints"][-1]
            anchor = load_model(out / "runs" / "sft" / f"checkpoint-{last['step']}")
            save_model(out / "anchor", anchor, last["step"], [last])
            models["anchor"] = {"path": "anchor", "step": last["step"], "accuracy": last["eval_accuracy"]}
            _write_manifest(out, manifest)
        todo = [name for name in preset.runs if name not in runs]
        if workers <= 1:
            for name in todo:
                runs[name] = train_run(out, name, preset, seed, progress)
                _write_manifest(out, manifest)
    if workers > 1:
        _train_in_workers(out, todo, preset, workers, progress, manifest)
    return load_zoo(out)


def record_retrain(out: str | os.PathLike, name: str, entry: dict) -> None:
    """Add the constrained retraining ``name`` (a manifest entry with its constraint) to the zoo's manifest."""
    manifest = load_zoo(out)
    manifest["retrains"] = manifest.get("retrains", {}) | {name: entry}
    _write_manifest(Path(out), manifest)


def _open_manifest(out: Path, preset: Preset, seed: int) -> dict:
    if out.exists() and not out.is_dir():
        raise ZooError(f"{out}: exists and is not a directory")
    config = json.loads(json.dumps(asdict(preset)))  # as the manifest holds it
    if (out / MANIFEST).is_file():
        manifest = load_zoo(out)
        if (manifest["preset"], manifest["seed"], manifest["config"]) != (preset.name, seed, config):
            raise ZooError(
                f"{out}: holds a zoo of preset {manifest['preset']!r} with seed {manifest['seed']} (or another "
                f"configuration), not {preset.name!r} with seed {seed}; use another directory"
            )
        return manifest
    if out.is_dir() and any(out.iterdir()):
        raise ZooError(f"{out}: exists, is not empty and holds no zoo")
    manifest = {"preset": preset.name, "seed": seed, "config": config, "models": {}, "runs": {}}
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    """Save the manifest atomically, its runs in the preset's order whatever order they finished in."""
    runs = manifest["runs"]
    ordered = manifest | {"runs": {name: runs[name] for name in manifest["config"]["runs"] if name in runs}}
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(ordered, indent=2))


def _train_in_workers(out: Path, names: list[str], preset: Preset, workers: int, progress: bool, manifest: dict):
    """Train ``names`` on up to ``workers`` worker processes, recording each run in the manifest as it ends."""
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen, int]] = {}  # name -> (process, progress-bar line)
    free = list(range(workers))
    try:
        while pending or running:
            while pending and free:
                name, line = pending.pop(0), free.pop(0)
                cmd = [sys.executable, "-m", "opd_lens.zoo.worker", str(out), name, str(line), str(int(progress))]
                running[name] = (subprocess.Popen(cmd), line)
            time.sleep(0.1)
            for name, (proc, line) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                free.append(line)
                if proc.returncode:
                    raise ZooError(f"run {name} failed in its worker (exit status {proc.returncode}); see above")
                manifest["runs"][name] = run_entry(out, name, preset)
                _write_manifest(out, manifest)
    finally:
        for proc, _ in running.values():
            proc.terminate()
            proc.wait()


@contextmanager
def single_thread():
    """One intra-op thread and deterministic kernels, as in a worker; restored afterwards."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
