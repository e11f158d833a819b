"""Find the checkpoints of a training run in the directory layouts trainers write."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import CheckpointError, CheckpointNotFoundError, CheckpointWarning
from .reader import INDEX_NAME, Checkpoint, open_checkpoint, read_trainer_step, weight_files

__all__ = ["Layout", "LAYOUTS", "find_checkpoints", "checkpoint_path"]


@dataclass(frozen=True)
class Layout:
    """How one trainer names a checkpoint directory (``pattern``/``dir_format``, the step as ``{step}``) and where
    its safetensors weights are inside it (``weights``, relative)."""

    name: str
    pattern: str
    dir_format: str
    weights: str = ""

    def match(self, dirname: str) -> int | None:
        m = re.fullmatch(self.pattern, dirname)
        return int(m.group(1)) if m else None


LAYOUTS = (
    Layout("hf", r"checkpoint-(\d+)", "checkpoint-{step}"),  # HF Trainer, TRL
    Layout("openrlhf", r"global_step(\d+)_hf", "global_step{step}_hf"),  # OpenRLHF --save_hf_ckpt
    Layout("openrlhf-opd", r"global_step_(\d+)_hf", "global_step_{step}_hf"),  # OpenRLHF OPDTrainer
    Layout("verl", r"global_step_(\d+)", "global_step_{step}", "actor/huggingface"),  # verl with hf_model saved
    Layout("global-step", r"global_step_?(\d+)", "global_step{step}"),  # weights directly inside
    Layout("step", r"step_(\d+)", "step_{step}"),  # prime-rl (also under weights/) and plain
)
"""Known layouts, in order of preference when two directories claim the same step."""

_SUBDIRS = ("", "weights")  # prime-rl keeps standalone HF weights in weights/step_N


def checkpoint_path(run_dir: str | os.PathLike, step: int, layout: str = "hf") -> Path:
    """Where a checkpoint of ``step`` goes in ``run_dir`` under ``layout`` (the weights directory)."""
    lay = next((x for x in LAYOUTS if x.name == layout), None)
    if lay is None:
        raise ValueError(f"unknown layout {layout!r}; known: {[x.name for x in LAYOUTS]}")
    return Path(run_dir) / lay.dir_format.format(step=step) / lay.weights


def find_checkpoints(run_dir: str | os.PathLike) -> list[Checkpoint]:
    """The checkpoints of a run, sorted by step.

    Looks for ``checkpoint-N/`` (HF Trainer, TRL; the step comes from ``trainer_state.json`` when it has one),
    ``global_stepN_hf/`` and ``global_step_N_hf/`` (OpenRLHF), ``global_step_N/actor/huggingface/`` (verl),
    ``global_stepN/`` holding weights, and ``step_N/`` (prime-rl, also under ``weights/``, and plain). A directory
    with none of these that is itself a checkpoint is returned alone (step from ``trainer_state.json``, else 0).
    A checkpoint that cannot be read (a shard missing, index and files disagreeing, a file still being written) is
    skipped with a :class:`CheckpointWarning` naming it.
    """
    run = Path(run_dir)
    if not run.is_dir():
        what = "is not a directory" if run.exists() else "does not exist"
        raise CheckpointNotFoundError(f"{run}: run directory {what}")
    found: dict[int, tuple[int, Checkpoint]] = {}  # step -> (layout preference, checkpoint)
    unreadable = 0
    weightless: dict[int, Path] = {}
    for base in (run / sub for sub in _SUBDIRS):
        if found or not base.is_dir():
            continue
        for entry in sorted(base.iterdir(), key=lambda p: p.name):
            match = _match(entry)
            if match is None:
                continue
            step, weights, preference = match
            if weights is None:
                weightless.setdefault(step, entry)
                continue
            ckpt = _open_or_warn(weights, step)
            if ckpt is None:
                unreadable += 1
                continue
            if ckpt.step in found:
                kept, dropped = sorted([found[ckpt.step], (preference, ckpt)], key=lambda x: x[0])
                warnings.warn(
                    f"{dropped[1].path}: step {ckpt.step} is also in {kept[1].path}; using the latter",
                    CheckpointWarning,
                    stacklevel=2,
                )
                found[ckpt.step] = kept
            else:
                found[ckpt.step] = (preference, ckpt)
    checkpoints = [found[s][1] for s in sorted(found)]
    for step, entry in sorted(weightless.items()):
        if step not in found:
            warnings.warn(
                f"skipping {entry}: no safetensors weights inside (DeepSpeed, FSDP or Megatron shards must be "
                "converted to Hugging Face safetensors first)",
                CheckpointWarning,
                stacklevel=2,
            )
    if not found and not unreadable and not weightless and _has_weights(run):
        ckpt = open_checkpoint(run)
        return [ckpt if ckpt.step is not None else replace(ckpt, step=0)]
    if not found:
        skipped = unreadable + len(weightless)
        raise CheckpointNotFoundError(
            f"{run}: no readable checkpoints"
            + (f" ({skipped} skipped, see warnings)" if skipped else "")
            + "; expected checkpoint-N/, global_step_N[_hf]/, global_step_N/actor/huggingface/ or step_N/ "
            "directories with safetensors weights, or a checkpoint directory itself"
        )
    return checkpoints


def _match(entry: Path) -> tuple[int, Path | None, int] | None:
    """(step, weights directory or None if it holds no safetensors, layout preference) for a step directory."""
    if not entry.is_dir():
        return None
    step = None
    for preference, layout in enumerate(LAYOUTS):
        s = layout.match(entry.name)
        if s is None:
            continue
        step = s
        weights = entry / layout.weights
        if weights.is_dir() and _has_weights(weights):
            return step, weights, preference
    return None if step is None else (step, None, len(LAYOUTS))


def _has_weights(path: Path) -> bool:
    return (path / INDEX_NAME).is_file() or bool(weight_files(path))


def _open_or_warn(path: Path, dir_step: int) -> Checkpoint | None:
    try:
        ckpt = open_checkpoint(path, step=dir_step)
    except CheckpointError as e:
        warnings.warn(f"skipping incomplete checkpoint: {e}", CheckpointWarning, stacklevel=3)
        return None
    trainer_step = read_trainer_step(path)
    if trainer_step is not None and trainer_step != dir_step:
        warnings.warn(
            f"{path}: trainer_state.json says global_step {trainer_step}, the directory name says {dir_step}; "
            f"using {trainer_step}",
            CheckpointWarning,
            stacklevel=3,
        )
        return replace(ckpt, step=trainer_step)
    return ckpt
