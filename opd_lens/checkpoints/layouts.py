"""Find the checkpoints of a training run in the directory layouts trainers write."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import CheckpointError, CheckpointNotFoundError, CheckpointWarning
from .foreign import foreign_layout
from .formats import detect_weights
from .reader import Checkpoint, open_checkpoint

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

_SUBDIRS = ("", "weights", "checkpoints")  # prime-rl: standalone HF weights/step_N, DCP checkpoints/step_N


def checkpoint_path(run_dir: str | os.PathLike, step: int, layout: str = "hf") -> Path:
    """Where a checkpoint of ``step`` goes in ``run_dir`` under ``layout`` (the weights directory)."""
    lay = next((x for x in LAYOUTS if x.name == layout), None)
    if lay is None:
        raise ValueError(f"unknown layout {layout!r}; known: {[x.name for x in LAYOUTS]}")
    return Path(run_dir) / lay.dir_format.format(step=step) / lay.weights


def find_checkpoints(
    run_dir: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    on_skip: Callable[[Path, str], None] | None = None,
) -> list[Checkpoint]:
    """The checkpoints of a run, sorted by step.

    Looks for ``checkpoint-N/`` (HF Trainer, TRL; the step comes from ``trainer_state.json`` when it has one),
    ``global_stepN_hf/`` and ``global_step_N_hf/`` (OpenRLHF), ``global_step_N/actor/huggingface/`` (verl),
    ``global_stepN/`` holding weights, and ``step_N/`` (prime-rl, also under ``weights/``, else ``checkpoints/``,
    and plain). Weights are safetensors, or a torch DCP checkpoint in the step directory or in its
    ``pytorch_model_fsdp_0/`` (HF Trainer FSDP) or ``trainer/`` (prime-rl). A directory with none of these that is
    itself a checkpoint is returned alone (step from ``trainer_state.json``, else 0). A step directory in a layout
    opd_lens does not read (DeepSpeed ZeRO, verl FSDP shards, Megatron ``dist_ckpt``) is skipped with a warning
    naming the converter to run.
    A checkpoint that cannot be read (a shard missing, index and files disagreeing, a file still being written, no
    permission, a symbolic link that loops) is skipped with a :class:`CheckpointWarning` naming it, or reported to
    ``on_skip(path, message)`` instead. ``allow_pickle``: see :func:`~opd_lens.checkpoints.open_checkpoint`.
    """
    run = Path(run_dir)
    skipped: list[tuple[Path, str]] = []
    try:
        checkpoints = _find(run, allow_pickle, skipped)
    finally:
        for path, message in skipped:
            if on_skip is not None:
                on_skip(path, message)
            else:
                warnings.warn(CheckpointWarning(message, path), stacklevel=2)
    return checkpoints


def _find(run: Path, allow_pickle: bool, skipped: list[tuple[Path, str]]) -> list[Checkpoint]:
    try:
        if not run.is_dir():
            state = "is not a directory" if run.exists() else "does not exist"
            raise CheckpointNotFoundError(f"{run}: run directory {state}")
        bases = [base for base in (run / sub for sub in _SUBDIRS) if base.is_dir()]
        entries = {base: sorted(base.iterdir(), key=lambda p: p.name) for base in bases}
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{e.filename or run}: cannot read the run directory: {e.strerror or e}") from None
    found: dict[int, tuple[int, Checkpoint]] = {}  # step -> (layout preference, checkpoint)
    unreadable = 0
    weightless: dict[int, Path] = {}
    for base in bases:
        if found:
            continue
        for entry in entries[base]:
            why: str | None
            try:
                match = _match(entry)
            except OSError as e:
                match, why = None, f"cannot read: {e.strerror or e}"
            else:
                dangling = match is None and entry.is_symlink() and not entry.exists()
                why = "a symbolic link that loops or points nowhere" if dangling else None
            if match is None:
                if why and any(layout.match(entry.name) is not None for layout in LAYOUTS):
                    skipped.append((entry, f"skipping {entry}: {why}"))
                    unreadable += 1
                continue
            step, weights, preference = match
            if weights is None:
                weightless.setdefault(step, entry)
                continue
            opened = _open_or_skip(weights, step, allow_pickle, skipped)
            if opened is None:
                unreadable += 1
                continue
            step, ckpt = opened
            if not 0 <= step < 2**63:  # the store keeps steps as int64
                skipped.append((ckpt.path, f"skipping {ckpt.path}: step {step} is outside 0 to 2^63 - 1"))
                unreadable += 1
                continue
            if step in found:
                kept, dropped = sorted([found[step], (preference, ckpt)], key=lambda x: x[0])
                warnings.warn(
                    f"{dropped[1].path}: step {step} is also in {kept[1].path}; using the latter",
                    CheckpointWarning,
                    stacklevel=3,
                )
                found[step] = kept
            else:
                found[step] = (preference, ckpt)
    checkpoints = [found[s][1] for s in sorted(found)]
    # what the first step directory in a layout opd_lens does not read is, and how to convert it
    foreign: str | None = None
    for step, entry in sorted(weightless.items()):
        if step not in found:
            what = foreign_layout(entry)
            foreign = foreign or (what and f"{entry.name} is {what}")
            why = what or "no safetensors or torch DCP weights inside (convert them to Hugging Face safetensors)"
            skipped.append((entry, f"skipping {entry}: {why}"))
    if not found and not unreadable and not weightless and _has_weights(run):
        ckpt = open_checkpoint(run, allow_pickle=allow_pickle)
        return [ckpt if ckpt.step is not None else replace(ckpt, step=0)]
    if not found:
        n_skipped = unreadable + len(weightless)
        if foreign is None and (what := foreign_layout(run)):
            foreign = f"it is {what}"
        raise CheckpointNotFoundError(
            f"{run}: no readable checkpoints"
            + (f" ({n_skipped} skipped, see warnings)" if n_skipped else "")
            + "; "
            + (
                foreign
                or "expected checkpoint-N/, global_step_N[_hf]/, global_step_N/actor/huggingface/ or step_N/ "
                "directories with safetensors or torch DCP weights, or a checkpoint directory itself"
            )
        )
    return checkpoints


def _match(entry: Path) -> tuple[int, Path | None, int] | None:
    """(step, weights directory or None if it holds no weights, layout preference) for a step directory; a directory
    that cannot be looked into counts as holding weights, so that opening it says why it cannot be read."""
    if not entry.is_dir():
        return None
    step = None
    for preference, layout in enumerate(LAYOUTS):
        s = layout.match(entry.name)
        if s is None:
            continue
        step = s
        weights = entry / layout.weights
        try:
            if weights.is_dir() and _has_weights(weights):
                return step, weights, preference
        except OSError:
            return step, weights, preference
    return None if step is None else (step, None, len(LAYOUTS))


def _has_weights(path: Path) -> bool:
    try:
        return detect_weights(path) is not None
    except OSError:
        return True  # unreadable: open_checkpoint says why


def _open_or_skip(
    path: Path, dir_step: int, allow_pickle: bool, skipped: list[tuple[Path, str]]
) -> tuple[int, Checkpoint] | None:
    """The step and the checkpoint in ``path`` (``None`` if it cannot be read, recorded in ``skipped``)."""
    try:
        ckpt = open_checkpoint(path, step=dir_step, allow_pickle=allow_pickle)
    except CheckpointError as e:
        skipped.append((path, f"skipping incomplete checkpoint: {e}"))
        return None
    trainer_step = ckpt.trainer_step
    if trainer_step is not None and trainer_step != dir_step:
        warnings.warn(
            f"{path}: trainer_state.json says global_step {trainer_step}, the directory name says {dir_step}; "
            f"using {trainer_step}",
            CheckpointWarning,
            stacklevel=4,
        )
        return trainer_step, replace(ckpt, step=trainer_step)
    return dir_step, ckpt
