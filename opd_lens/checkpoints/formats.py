"""The weight formats a checkpoint directory may hold, told apart in one place, and what their readers share.

A directory holds, in order of precedence: sharded safetensors (``model.safetensors.index.json``), safetensors
files, a PEFT LoRA adapter (:mod:`.adapters`), a torch distributed checkpoint (DCP, :mod:`.dcp`) or pickle weights
(read only when the caller opts in). :func:`detect_weights` says which; the readers describe every stored tensor
by a :class:`TensorInfo`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .foreign import is_megatron

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DCP_METADATA",
    "DTYPE_BYTES",
    "INDEX_NAME",
    "PICKLE_ENV",
    "SINGLE_NAME",
    "TORCH_DTYPES",
    "TensorInfo",
    "Weights",
    "detect_weights",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_SUBDIRS = ("lora_adapters",)
"""Where an adapter may sit in a step directory: prime-rl's ``weights/step_N/lora_adapters/``."""
DCP_METADATA = ".metadata"
DCP_SUBDIRS = ("pytorch_model_fsdp_0", "trainer")
"""Where a torch DCP checkpoint of the model sits in a step directory: HF Trainer/Accelerate FSDP, prime-rl."""
PICKLE_ENV = "OPD_LENS_ALLOW_PICKLE"
"""Set to 1 for ``opd-lens`` to read pickle weights (``pytorch_model*.bin``, ``model*.pt``), as ``--allow-pickle``."""
_PICKLE_NAME = re.compile(r"(pytorch_)?model(-\d+-of-\d+)?\.(bin|pt|pth)")
DTYPE_BYTES = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
"""Bytes per element of each safetensors dtype."""
TORCH_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
"""The safetensors name of a torch dtype, for the tensors of pickles and DCP checkpoints."""


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor's file, dtype (safetensors name, e.g. ``"BF16"``) and shape, read from the header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        """Bytes per stored element (8 for a dtype safetensors does not name, e.g. a pickle's)."""
        return DTYPE_BYTES.get(self.dtype, 8)


@dataclass(frozen=True)
class Weights:
    """The weights in a checkpoint directory: their format and where they are (the shard index, the adapter's or
    the DCP checkpoint's directory, or the weight files)."""

    format: Literal["sharded", "safetensors", "adapter", "dcp", "pickle"]
    paths: tuple[Path, ...]


def detect_weights(path: Path) -> Weights | None:
    """The weights in checkpoint directory ``path``, the first format found in the order of precedence above; None
    if there are none. OSError if ``path`` cannot be listed."""
    if (index := path / INDEX_NAME).is_file():
        return Weights("sharded", (index,))
    if files := _weight_files(path):
        return Weights("safetensors", tuple(files))
    if (directory := _adapter_dir(path)) is not None:
        return Weights("adapter", (directory,))
    if (directory := _dcp_dir(path)) is not None:
        return Weights("dcp", (directory,))
    if files := _pickle_files(path):
        return Weights("pickle", tuple(files))
    return None


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of model weights in ``path`` (PEFT adapter files are not model weights)."""
    return sorted(
        f for f in path.iterdir() if f.suffix == ".safetensors" and not f.name.startswith(("adapter_model", "."))
    )


def _pickle_files(path: Path) -> list[Path]:
    """The pickle weight files in ``path``: ``pytorch_model.bin`` and its shards, ``model.pt``, ``model.pth`` (not
    optimizer states, training arguments or DeepSpeed shards)."""
    return sorted(f for f in path.iterdir() if _PICKLE_NAME.fullmatch(f.name))


def _adapter_dir(path: Path) -> Path | None:
    """The directory holding a PEFT adapter in ``path``: ``path`` itself or one of :data:`ADAPTER_SUBDIRS`."""
    return next((d for d in (path, *(path / s for s in ADAPTER_SUBDIRS)) if (d / ADAPTER_WEIGHTS).exists()), None)


def _dcp_dir(path: Path) -> Path | None:
    """The torch DCP checkpoint in ``path``: ``path`` itself or one of :data:`DCP_SUBDIRS` with a ``.metadata`` file,
    but not a Megatron ``dist_ckpt`` (DCP too, with Megatron names); None if there is none."""
    return next(
        (d for d in (path, *(path / s for s in DCP_SUBDIRS)) if (d / DCP_METADATA).is_file() and not is_megatron(d)),
        None,
    )
