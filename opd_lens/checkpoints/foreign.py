"""Checkpoint layouts opd_lens does not read, recognised so that it can name the converter to run instead.

DeepSpeed ZeRO (``global_stepN/`` with ``*_model_states.pt``, ``latest`` and ``zero_to_fp32.py`` beside it), verl
FSDP rank shards (``model_world_size_W_rank_r.pt`` beside ``fsdp_config.json``, in ``global_step_N/actor/``) and
Megatron ``dist_ckpt`` (``torch_dist``: a ``metadata.json`` naming the ``sharded_backend``, ``common.pt`` and DCP
files holding Megatron-named, layer-stacked tensors) must be converted to Hugging Face safetensors first.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["foreign_layout", "is_megatron"]

_OUT = "<out_dir>"


def foreign_layout(path: Path) -> str | None:
    """If ``path`` is, or directly holds, a checkpoint in a layout opd_lens does not read: one line naming the layout,
    the file that identified it and the command converting it to safetensors; else None."""
    for detect in (_deepspeed, _verl_fsdp, _megatron):
        try:
            if found := detect(path):
                return found
        except OSError:
            continue
    return None


def is_megatron(path: Path) -> bool:
    """Whether ``path`` is a Megatron ``dist_ckpt`` directory: its ``metadata.json`` names a ``sharded_backend``."""
    file = path / "metadata.json"
    try:
        meta = json.loads(_head(file)) if file.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "sharded_backend" in meta


def _head(file: Path) -> bytes:
    with open(file, "rb") as f:
        return f.read(2**16)


def _says(layout: str, file: Path, command: str) -> str:
    return f"a {layout} checkpoint ({file}), which opd_lens does not read; convert it to safetensors with: {command}"


def _deepspeed(path: Path) -> str | None:
    latest = path / "latest"  # the newest tag, written by DeepSpeed beside the tag directories
    tags = [_head(latest).decode(errors="replace").strip()] if latest.is_file() else []
    for tag in (path, *(path / t for t in tags if t and Path(t).name == t), *sorted(path.glob("global_step*"))):
        states = sorted(tag.glob("*_model_states.pt")) or sorted(tag.glob("*_optim_states.pt"))
        if states:
            script = tag.parent / "zero_to_fp32.py"
            run = f"python {script}" if script.is_file() else "python -m deepspeed.utils.zero_to_fp32"
            return _says("DeepSpeed ZeRO", states[0], f"{run} {tag.parent} {_OUT} -t {tag.name} --safe_serialization")
    return None


def _verl_fsdp(path: Path) -> str | None:
    for actor in (path, path / "actor", *([path.parent] if path.name == "huggingface" else [])):
        if shards := sorted(actor.glob("model_world_size_*_rank_*.pt")):
            command = f"python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir {_OUT}"
            return _says("verl FSDP", shards[0], command)
    return None


def _megatron(path: Path) -> str | None:
    for d in (path, *(base / sub for base in (path, path / "actor") for sub in ("dist_ckpt", "model/dist_ckpt"))):
        if not is_megatron(d):
            continue
        if d.name == "dist_ckpt":  # verl: actor/dist_ckpt, or actor/model/dist_ckpt
            actor = d.parent.parent if d.parent.name == "model" else d.parent
            command = f"python -m verl.model_merger merge --backend megatron --local_dir {actor} --target_dir {_OUT}"
        else:  # Megatron-LM / NeMo: iter_NNNNNNN/ under the checkpoint directory
            root = d.parent if d.name.startswith("iter_") else d
            command = (
                "Megatron-Bridge's examples/conversion/convert_checkpoints.py export --hf-model <base HF model> "
                f"--megatron-path {root} --hf-path {_OUT}"
            )
        return _says("Megatron dist_ckpt (torch_dist)", d / "metadata.json", command)
    return None
