"""Torch distributed checkpoints (DCP): a directory with a ``.metadata`` file and ``*.distcp`` data files.

Reads the model's tensors of what ``torch.distributed.checkpoint.save`` writes for a state dict saved bare, as
``{"model": sd}`` (HF Trainer / Accelerate FSDP ``SHARDED_STATE_DICT``: ``checkpoint-N/pytorch_model_fsdp_0/``)
or as ``{"app": {"model": sd, "optimizers": ..., ...}}`` (prime-rl: ``checkpoints/step_N/trainer/``, before
September 2025 ``checkpoints/step_N/``), from any number of ranks. Tensors keep the names the trainer's model gives
them (``model.layers.0.self_attn.q_proj.weight`` for a Hugging Face model, and for prime-rl's dense models; its MoE
models keep experts in prime-rl's own layout); optimizer state and non-tensor entries are left out. Megatron's
``torch_dist`` format is DCP on disk too, with Megatron names and layer-stacked tensors: it is not read (see
:mod:`.foreign`).

``.metadata`` is a pickle: it is read by an unpickler that builds DCP's metadata classes only, so no code runs.
Each tensor is loaded alone, whole, by ``torch.distributed.checkpoint.load`` without a process group (its data goes
through ``torch.load(weights_only=True)``). This module imports ``torch.distributed.checkpoint``, which is slow:
the reader imports it only when it meets a DCP directory.
"""

from __future__ import annotations

import functools
import os
import pathlib
import pickle
import stat
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from .formats import DCP_METADATA, TORCH_DTYPES, TensorInfo

__all__ = ["read_dcp", "read_dcp_tensor"]

_MODEL_AT = (("model",), ("app", "model"), ())
"""Where the model's state dict is in the saved one, in order of preference: Accelerate, prime-rl, bare."""
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed._shard.sharded_tensor.metadata")


def read_dcp(directory: Path) -> dict[str, TensorInfo]:
    """The model tensors of the DCP checkpoint in ``directory``, checked against its data files' sizes."""
    file = directory / DCP_METADATA
    metadata, model = _index(file)
    if not model:
        sample = sorted(metadata.state_dict_metadata)[:3]
        raise CheckpointNotFoundError(f"{file}: a torch DCP checkpoint without model weights (keys like {sample})")
    return {name: TensorInfo(file, TORCH_DTYPES.get(e.dtype, str(e.dtype)), e.shape) for name, e in model.items()}


def read_dcp_tensor(file: Path, name: str) -> torch.Tensor:
    """The whole tensor ``name`` of the DCP checkpoint whose metadata is ``file``, loaded alone, on the CPU."""
    metadata, model = _index(file)
    if name not in model:
        raise CorruptCheckpointError(f"{file}: no longer holds tensor {name!r}")
    entry = model[name]
    _check_data(file, entry.data)
    out = torch.empty(entry.shape, dtype=entry.dtype)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", "torch.distributed is", UserWarning)
            dcp.load({entry.key: out}, storage_reader=_Reader(file.parent, metadata), no_dist=True)
    except (Exception, dcp.CheckpointException) as e:  # a garbled data file raises many types; DCP wraps them
        cause: BaseException = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e
        why = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")[:300]
        where = ", ".join(str(file.parent / f) for f in sorted(entry.data)) or file
        raise CorruptCheckpointError(f"{where}: cannot read tensor {name!r}: {type(cause).__name__}: {why}") from None
    return out


class _Entry(NamedTuple):
    """A model tensor: its DCP key, dtype, shape and data files (name -> where its data there ends)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: dict[str, int]


class _Reader(dcp.FileSystemReader):
    """DCP's file reader, given the metadata already read (safely) instead of unpickling ``.metadata`` again."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self._metadata


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes, dtypes and layouts, and paths; refuses every other global."""

    def find_class(self, module: str, name: str):
        obj = getattr(sys.modules.get(module), name, None)  # only modules torch.distributed.checkpoint imported
        allowed = (
            (module in _METADATA_MODULES and isinstance(obj, type) and obj.__module__ == module)
            or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
            or (module == "torch" and (obj is torch.Size or isinstance(obj, torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")  # a torch.layout from its name
            or (module in ("pathlib", "pathlib._local") and isinstance(obj, type) and issubclass(obj, pathlib.PurePath))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")
        return obj


def _index(file: Path) -> tuple[Metadata, dict[str, _Entry]]:
    """The metadata of a DCP checkpoint and its model's tensors by name, parsed once while the file is unchanged."""
    try:
        st = file.stat()
    except OSError as e:
        raise CorruptCheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block
        raise CorruptCheckpointError(f"{file}: not a regular file")
    return _parse(file, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _parse(file: Path, mtime_ns: int, size: int) -> tuple[Metadata, dict[str, _Entry]]:
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f"holds a {type(metadata).__name__}, not DCP Metadata")
        data: dict[str, dict[str, int]] = {}  # DCP key -> {data file: where the key's data there ends}
        ends: dict[str, int] = {}  # data file -> where its data ends
        for index, info in metadata.storage_data.items():
            name, end = info.relative_path, info.offset + info.length
            mine = data.setdefault(index.fqn, {})
            mine[name] = max(mine.get(name, 0), end)
            ends[name] = max(ends.get(name, 0), end)
        _check_data(file, ends)
        return metadata, _model(metadata, data)
    except CorruptCheckpointError:
        raise
    except OSError as e:
        raise CorruptCheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # a garbled pickle raises many types
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise CorruptCheckpointError(f"{file}: unreadable torch DCP metadata: {type(e).__name__}: {why}") from None


def _model(metadata: Metadata, data: dict[str, dict[str, int]]) -> dict[str, _Entry]:
    """The model's tensors, found by the nested-dict paths DCP's save planner records for its flattened keys."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    found: dict[tuple, dict[str, _Entry]] = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            *where, name = paths.get(key, (key,))
            dtype, shape = md.properties.dtype, tuple(md.size)
            if not isinstance(dtype, torch.dtype) or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(f"tensor {key!r} has a malformed dtype or shape")
            found.setdefault(tuple(where), {})[str(name)] = _Entry(key, dtype, shape, data.get(key, {}))
    return next((found[where] for where in _MODEL_AT if where in found), {})


def _check_data(file: Path, ends: dict[str, int]) -> None:
    """Each data file (name -> where the data there ends) is a regular file beside ``file``, long enough."""
    for name, end in sorted(ends.items()):
        data = file.parent / name
        if os.path.basename(name) != name:
            raise CorruptCheckpointError(f"{file}: data file {name!r} is not a file in the checkpoint directory")
        try:
            st = data.stat()
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{file}: data file {name} is listed but missing") from None
        except OSError as e:
            raise CorruptCheckpointError(f"{data}: cannot read: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(f"{data}: not a regular file")
        if st.st_size < end:
            raise CorruptCheckpointError(
                f"{data}: truncated or still being written: the DCP metadata places data up to byte {end}, "
                f"the file has {st.st_size}"
            )
