"""Write checkpoints exactly as a Hugging Face trainer does (used by the demo zoo, tests and benchmarks)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from .formats import INDEX_NAME, SINGLE_NAME

__all__ = ["save_checkpoint"]


def save_checkpoint(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    step: int | None = None,
    config: Mapping | None = None,
    max_shard_bytes: int | None = None,
    log_history: Sequence[Mapping] = (),
) -> Path:
    """Save ``tensors`` as a Hugging Face checkpoint directory at ``path`` and return it.

    One ``model.safetensors``, or shards ``model-0000k-of-0000N.safetensors`` of at most ``max_shard_bytes`` each
    with a ``model.safetensors.index.json``; ``config.json`` if given; ``trainer_state.json`` with ``global_step``
    and ``log_history`` if ``step`` is given. The directory is written beside its final place and renamed into it,
    so readers never see half a checkpoint.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = _shard(tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(_contiguous(shards[0]), tmp / SINGLE_NAME, metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(_contiguous(shard), tmp / name, metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2))
    if step is not None:
        state = {"global_step": step, "log_history": list(log_history)}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def _shard(tensors: Mapping[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
