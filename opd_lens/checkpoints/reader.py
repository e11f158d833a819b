"""Lazy, validated access to one checkpoint's safetensors weights, one tensor at a time."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ShapeMismatchError,
    UnsupportedTensorError,
)
from .adapters import Adapter, parse_adapter
from .foreign import foreign_layout
from .formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DCP_METADATA,
    DTYPE_BYTES,
    PICKLE_ENV,
    TORCH_DTYPES,
    TensorInfo,
    detect_weights,
)
from .names import MatrixPlan, MatrixRef, plan_matrices

__all__ = ["Checkpoint", "open_checkpoint", "matched_matrices", "READABLE_DTYPES"]

READABLE_DTYPES = ("BF16", "F16", "F32", "F64")
"""safetensors dtypes the diagnostics accept; quantized weights (I8, F8_*) are refused with a clear error."""
_MAX_HEADER = 100 * 2**20
_SAMPLE = 64 * 2**10


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """One model checkpoint on disk: a directory with ``model.safetensors`` or shards and their index, or a PEFT
    LoRA adapter (``adapter``), whose matrices are those of the base model it adapts.

    Construct with :func:`open_checkpoint` (which validates every header against the file sizes and the index);
    tensors are read lazily, one at a time, through ``safetensors.safe_open``.
    """

    path: Path
    step: int | None
    tensors: Mapping[str, TensorInfo]
    adapter: Adapter | None = None

    def __repr__(self) -> str:
        return f"Checkpoint(step={self.step}, path='{self.path}', tensors={len(self.tensors)})"

    @cached_property
    def config(self) -> dict:
        """The model's ``config.json`` beside the weights (empty if absent or unreadable)."""
        try:
            config = load_json(self.path / "config.json")
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    @cached_property
    def trainer_step(self) -> int | None:
        """``global_step`` from the ``trainer_state.json`` beside the weights, or None; read once (an opened
        checkpoint is reused only while its directory, that file included, is unchanged)."""
        return read_trainer_step(self.path)

    @cached_property
    def fingerprint(self) -> str:
        """A content fingerprint: SHA-256 over each weight file's name, size, header and first and last 64 KiB.

        Cheap on multi-GB checkpoints and changes whenever a file is rewritten with other weights in practice; not
        a cryptographic hash of every byte.
        """
        h = hashlib.sha256()
        for config in self._configs():  # an adapter's scale is in its config
            h.update(_read_small(config))
        for file in self._weight_files():
            try:
                size = file.stat().st_size
                with open(file, "rb") as f:
                    start = 0  # where the tensor data starts: after the header (a pickle has none)
                    if file.suffix == ".safetensors":
                        (n,) = struct.unpack("<Q", f.read(8))
                        start = 8 + n
                    head = f.read(start - f.tell() + _SAMPLE)
                    f.seek(max(start, size - _SAMPLE))
                    tail = f.read(_SAMPLE)
            except (OSError, struct.error) as e:
                raise CorruptCheckpointError(f"{file}: cannot read: {e}") from None
            h.update(f"{file.name}\0{size}\0".encode() + head + tail)
        return h.hexdigest()

    def _configs(self) -> list[Path]:
        if self.adapter is None:
            return []
        return sorted({info.file.parent / ADAPTER_CONFIG for info in self.tensors.values()})

    def _weight_files(self) -> list[Path]:
        files = {info.file for info in self.tensors.values()}
        files |= {f for m in files if m.name == DCP_METADATA for f in m.parent.glob("*.distcp")}  # DCP's data
        return sorted(files)

    def _signature(self) -> tuple:
        """(path, inode, size, mtime) of the directory, of everything in it and of every file elsewhere that the
        content lives in: changes whenever one of them is rewritten, replaced, added or removed (up to the file
        system's timestamp granularity). Plain strings and ``os`` calls: a growing run re-checks every stored
        checkpoint on each compute."""
        with os.scandir(self.path) as entries:
            inside = sorted(e.path for e in entries)
        paths = [os.fspath(self.path), *inside, *self._outside]
        return tuple((p, (st := os.stat(p)).st_ino, st.st_size, st.st_mtime_ns) for p in paths)

    @cached_property
    def _outside(self) -> tuple[str, ...]:
        """The directories, then the files, outside :attr:`path` that hold this checkpoint's configs and weights."""
        outside = [p for p in (*self._configs(), *self._weight_files()) if p.parent != self.path]
        return tuple(os.fspath(p) for p in (*sorted({p.parent for p in outside}), *outside))

    def plan(self, include_globals: bool = False) -> MatrixPlan:
        """The analysed matrices of this checkpoint (see :mod:`opd_lens.checkpoints.names`)."""
        self._not_adapter()
        try:
            return plan_matrices({k: v.shape for k, v in self.tensors.items()}, self.config, include_globals)
        except ValueError as e:
            raise CorruptCheckpointError(f"{self.path}: {e}") from None

    def read(self, name: str) -> torch.Tensor:
        """The whole stored tensor ``name``, in its stored dtype, on the CPU."""
        return self._get(name)

    def read_matrix(self, ref: MatrixRef) -> torch.Tensor:
        """The (out, in) matrix ``ref`` in its stored dtype, reading only its expert slice and rows."""
        self._not_adapter()
        info = self._info(ref.tensor)
        _check_dtype(info, ref.tensor)
        lead = () if ref.expert is None else (ref.expert,)
        rows = slice(None) if ref.rows is None else slice(*ref.rows)

        def cut(sl):  # tuples joined with +: mypy takes sl[(*lead, rows)] for 3.11-only syntax (valid in 3.10)
            if ref.transpose:
                return sl[lead + (slice(None), rows)].mT
            return sl[lead + (rows,)]

        m = self._get(ref.tensor, cut)
        if tuple(m.shape) != ref.shape:
            raise CorruptCheckpointError(
                f"{info.file}: tensor {ref.tensor!r} gave shape {tuple(m.shape)} for {ref.module}, expected {ref.shape}"
            )
        return m.contiguous()

    def read_lora(self, ref: MatrixRef) -> tuple[torch.Tensor, torch.Tensor]:
        """An adapter's update of the base matrix ``ref`` as float64 factors (L, R), ΔW = L·R with L = s·B (rows cut
        as ``ref`` cuts the base tensor) and R = A, or L = s·Aᵀ, R = Bᵀ for an embedding."""
        pair = self.adapter.pair_for(ref.tensor) if self.adapter is not None else None
        if pair is None:
            raise CheckpointError(f"{self.path}: holds no LoRA factors for {ref.tensor!r}")
        for name in (pair.a, pair.b):
            _check_dtype(self._info(name), name)
        a, b = (self._get(name).to(torch.float64) for name in (pair.a, pair.b))
        left, right = (a.mT, b.mT) if pair.embedding else (b, a)
        if ref.rows is not None:
            left = left[slice(*ref.rows)]
        return left * pair.scale, right

    def read_update(self, ref: MatrixRef) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """What this checkpoint holds of the matrix ``ref``: W_t itself (:meth:`read_matrix`), or for a LoRA
        adapter the factors (L, R) of its update ΔW = L·R (:meth:`read_lora`)."""
        return self.read_matrix(ref) if self.adapter is None else self.read_lora(ref)

    def read_nbytes(self, ref: MatrixRef) -> int:
        """The bytes reading ``ref`` holds: those of the matrix (0 for an adapter's factors, small next to it)."""
        return 0 if self.adapter is not None else math.prod(ref.shape) * self.tensors[ref.tensor].itemsize

    def _not_adapter(self) -> None:
        if self.adapter is not None:
            raise CheckpointError(
                f"{self.path}: a LoRA adapter; its matrices are those of the base model it adapts (pass the base "
                "model as the origin)"
            )

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def _get(self, name: str, cut=None):
        info = self._info(name)
        if info.file.suffix != ".safetensors":  # torch DCP, or a pickle the user opted in to (see open_checkpoint)
            if info.file.name == DCP_METADATA:
                from .dcp import read_dcp_tensor  # torch.distributed.checkpoint is slow to import: only when needed

                t: torch.Tensor | None = read_dcp_tensor(info.file, name)
            else:
                t = _load_pickle(info.file).get(name)
            if t is None:
                raise CorruptCheckpointError(f"{info.file}: no longer holds tensor {name!r}")
            try:
                return (t if cut is None else cut(t)).clone()
            except (AttributeError, IndexError, RuntimeError, TypeError) as e:
                raise CorruptCheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from None
        try:
            with safe_open(info.file, framework="pt") as f:
                return f.get_tensor(name) if cut is None else cut(f.get_slice(name))
        except (OSError, RuntimeError, ValueError, TypeError, SafetensorError) as e:
            raise CorruptCheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from None


def open_checkpoint(path: str | os.PathLike, step: int | None = None, *, allow_pickle: bool = False) -> Checkpoint:
    """Open and validate the checkpoint whose weights are in directory ``path``.

    Reads ``model.safetensors.index.json`` when present (every listed shard must exist and hold exactly the tensors
    the index assigns to it), otherwise every ``*.safetensors`` file but PEFT adapters, otherwise a torch
    distributed checkpoint (DCP, see :mod:`~opd_lens.checkpoints.dcp`) in ``path`` or in its subdirectory
    ``pytorch_model_fsdp_0/`` (HF Trainer FSDP) or ``trainer/`` (prime-rl). Each file's header must parse and match
    the file's size (a file still being written fails this). DeepSpeed ZeRO, verl FSDP and Megatron checkpoints
    raise :class:`CheckpointNotFoundError` saying which converter to run. The step defaults to
    ``global_step`` in ``trainer_state.json``, if any. Raises :class:`CheckpointNotFoundError` or
    :class:`CorruptCheckpointError` naming the file at fault (:class:`CheckpointError` if it cannot be read).

    Pickle weights (``pytorch_model*.bin``, ``model*.pt``) are refused, since loading a pickle can run code, unless
    ``allow_pickle``; they are then loaded with ``torch.load(weights_only=True)``, memory-mapped.
    """
    path = Path(path)
    try:
        return _open_cached(path, step, allow_pickle)
    except CheckpointError:  # CheckpointNotFoundError is an OSError too
        raise
    except OSError as e:  # a directory or file we may not read, a symlink loop, ...
        raise CheckpointError(f"{e.filename or path}: cannot read: {e.strerror or e}") from None


_OPENED: dict[tuple, tuple[tuple, Checkpoint]] = {}
"""(path, step, allow_pickle) -> (signature, checkpoint): re-opening an unchanged checkpoint costs a directory
listing and a few ``stat`` calls, so that planning a run does not slow down as the run grows."""
_OPENED_MAX = 4096
_RACY_NS = 2 * 10**9
"""A checkpoint modified less than this before it was opened is opened again next time: a rewrite within the
file system's timestamp granularity would leave its signature unchanged (git's "racy" index entries)."""


def _open_cached(path: Path, step: int | None, allow_pickle: bool) -> Checkpoint:
    key = (path.absolute(), step, allow_pickle)
    if (hit := _OPENED.pop(key, None)) is not None:
        try:
            if hit[1]._signature() == hit[0]:
                _OPENED[key] = hit
                return hit[1]
        except OSError:
            pass
    opened = time.time_ns()
    ckpt = _open(path, step, allow_pickle)
    try:
        signature = ckpt._signature()
    except OSError:
        return ckpt
    if all(mtime < opened - _RACY_NS for *_, mtime in signature):
        if len(_OPENED) >= _OPENED_MAX:
            del _OPENED[next(iter(_OPENED))]
        _OPENED[key] = (signature, ckpt)
    return ckpt


def _open(path: Path, step: int | None, allow_pickle: bool) -> Checkpoint:
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise CheckpointNotFoundError(f"{path}: checkpoint directory {what}")
    weights = detect_weights(path)
    adapter = None
    if weights is None:
        why = foreign_layout(path) or f"no safetensors weights ({_what_is_here(path)})"
        raise CheckpointNotFoundError(f"{path}: {why}")
    if weights.format == "sharded":
        tensors = _read_sharded(*weights.paths)
    elif weights.format == "adapter":
        tensors, adapter = _read_adapter(*weights.paths)
    elif weights.format == "dcp":
        from .dcp import read_dcp  # torch.distributed.checkpoint is slow to import: only when needed

        tensors = read_dcp(*weights.paths)
    else:
        if weights.format == "pickle" and not allow_pickle:
            raise CheckpointNotFoundError(
                f"{weights.paths[0]}: a pickle checkpoint; opd_lens reads safetensors only by default, since loading "
                f"a pickle can run code. Convert it to safetensors, or opt in (--allow-pickle or {PICKLE_ENV}=1 on "
                "the command line, allow_pickle=True in Python) to load it with torch.load(weights_only=True)"
            )
        read = _read_header if weights.format == "safetensors" else _pickle_header
        tensors = {}
        for file in weights.paths:
            for name, info in read(file).items():
                if name in tensors:
                    raise CorruptCheckpointError(
                        f"{path}: tensor {name!r} is stored twice, in {tensors[name].file.name} and {file.name}"
                    )
                tensors[name] = info
    if not tensors:
        raise CorruptCheckpointError(f"{path}: the checkpoint holds no tensors")
    if step is None:
        step = read_trainer_step(path)
    return Checkpoint(path=path, step=step, tensors=tensors, adapter=adapter)


def _read_adapter(path: Path) -> tuple[dict[str, TensorInfo], Adapter]:
    config_file = path / ADAPTER_CONFIG
    if not config_file.exists():
        raise CheckpointNotFoundError(f"{path}: {ADAPTER_WEIGHTS} without {ADAPTER_CONFIG}; save the adapter with it")
    try:
        config = load_json(config_file)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CorruptCheckpointError(f"{config_file}: unreadable adapter config: {e}") from None
    tensors = _read_header(path / ADAPTER_WEIGHTS)
    return tensors, parse_adapter(path, config, {name: info.shape for name, info in tensors.items()})


def matched_matrices(origin: Checkpoint, checkpoint: Checkpoint, include_globals: bool = False) -> list[MatrixRef]:
    """The analysed matrices of ``checkpoint``, checked against ``origin``: the same (layer, module) keys with the
    same shapes (for a LoRA adapter: the origin's matrices it updates, which its factors must fit), else
    :class:`CheckpointError` / :class:`ShapeMismatchError` naming both files and the tensor."""
    if checkpoint.adapter is not None:
        refs = origin.plan(include_globals).matrices
        shapes = {name: info.shape for name, info in origin.tensors.items()}
        adapted = checkpoint.adapter.adapted(checkpoint.path, origin.path, shapes, list(refs))
        return [r for r in refs if r.tensor in adapted]
    ref0 = origin.plan(include_globals).by_key()
    reft = checkpoint.plan(include_globals).by_key()
    for keys, here, there in (
        (ref0.keys() - reft.keys(), origin, checkpoint),
        (reft.keys() - ref0.keys(), checkpoint, origin),
    ):
        if keys:
            layer, module = min(keys)
            name = (ref0 if here is origin else reft)[layer, module].tensor
            raise CheckpointError(
                f"{there.path}: has no matrix for tensor {name!r} (layer {layer}, {module}) found in {here.path}"
            )
    for key, r in reft.items():
        if r.shape != ref0[key].shape:
            raise ShapeMismatchError(
                f"tensor {r.tensor!r}: shape {r.shape} in {checkpoint.tensors[r.tensor].file} but "
                f"{ref0[key].shape} in origin {origin.tensors[ref0[key].tensor].file}"
            )
    for ckpt, by_key in ((origin, ref0), (checkpoint, reft)):
        for layer_module in sorted(by_key):
            _check_dtype(ckpt.tensors[by_key[layer_module].tensor], by_key[layer_module].tensor)
    return [reft[k] for k in sorted(reft)]


def _check_dtype(info: TensorInfo, name: str) -> None:
    if info.dtype not in READABLE_DTYPES:
        raise UnsupportedTensorError(
            f"{info.file}: tensor {name!r} is {info.dtype}; opd_lens analyses "
            f"{'/'.join(READABLE_DTYPES)} weights only (dequantize the checkpoint first)"
        )


def load_json(source: Path | bytes):
    """Parse a JSON file (or bytes); every malformed input raises ValueError (OSError if unreadable or not a regular
    file: reading a FIFO would block)."""
    if isinstance(source, Path) and source.exists() and not source.is_file():
        raise OSError(f"{source}: not a regular file")
    raw = source.read_bytes() if isinstance(source, Path) else source
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_trainer_step(path: Path) -> int | None:
    """``global_step`` from ``trainer_state.json`` in ``path``, or None."""
    try:
        step = load_json(path / "trainer_state.json")["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _read_sharded(index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = load_json(index)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{index}: unreadable shard index: {e}") from None
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        file = index.parent / shard
        if Path(shard).name != shard:
            raise CorruptCheckpointError(f"{index}: shard name {shard!r} is not a file in the checkpoint directory")
        if not file.is_file():
            raise CorruptCheckpointError(f"{index}: shard {shard} is listed in the index but missing")
        header = _read_header(file)
        listed = {name for name, s in weight_map.items() if s == shard}
        if missing := sorted(listed - header.keys()):
            raise CorruptCheckpointError(
                f"{file}: index lists tensor {missing[0]!r} in this shard but the file does not hold it"
            )
        for name in sorted(header.keys() - listed):
            other = weight_map.get(name)
            where = f"the index assigns it to {other}" if other else "the index does not list it"
            raise CorruptCheckpointError(f"{file}: holds tensor {name!r} but {where}")
        tensors.update(header)
    return tensors


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without loading data; check it describes exactly the file's bytes."""
    try:
        st = file.stat()
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block
            raise CorruptCheckpointError(f"{file}: not a regular file")
        size = st.st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(f"{file}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CorruptCheckpointError(
                    f"{file}: header claims {n} bytes but the file has {size} (truncated or not safetensors)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CorruptCheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
    try:
        header = load_json(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        tensors, spans = {}, []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in (*shape, start, stop)) or stop < start:
                raise ValueError(f"tensor {name!r} has a malformed shape or offsets")
            if not isinstance(dtype, str):
                raise ValueError(f"tensor {name!r} has dtype {dtype!r}, not a name")
            nbytes = DTYPE_BYTES.get(dtype)
            if nbytes is not None and stop - start != nbytes * math.prod(shape):
                raise ValueError(f"tensor {name!r}: {stop - start} bytes do not hold {dtype}{list(shape)}")
            tensors[name] = TensorInfo(file, dtype, shape)
            spans.append((start, stop, name))
        end = 0
        for start, stop, name in sorted(spans):
            if start != end:
                raise ValueError(f"tensor {name!r} starts at byte {start} of the data, expected {end}")
            end = stop
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{file}: corrupt safetensors header: {e}") from None
    if size != 8 + n + end:
        state = "truncated or still being written" if size < 8 + n + end else "has trailing bytes"
        raise CorruptCheckpointError(f"{file}: {state}: header describes {8 + n + end} bytes, file has {size}")
    return tensors


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from a pickle, loaded with ``torch.load(weights_only=True)``: tensors and plain containers only,
    no code runs. Memory-mapped when the file is in torch's zip format."""
    try:
        if not stat.S_ISREG(file.stat().st_mode):
            raise CorruptCheckpointError(f"{file}: not a regular file")
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except CorruptCheckpointError:
        raise
    except Exception as e:  # torch.load raises many types for what is not a weights-only pickle
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise CorruptCheckpointError(
            f"{file}: cannot load as a weights-only pickle: {type(e).__name__}: {why}"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CorruptCheckpointError(f"{file}: not a state dict (a mapping of tensor names to tensors)")
    return obj


def _pickle_header(file: Path) -> dict[str, TensorInfo]:
    tensors = _load_pickle(file).items()
    return {k: TensorInfo(file, TORCH_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in tensors}


def _read_small(file: Path, limit: int = 2**20) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read(limit)
    except OSError as e:
        raise CorruptCheckpointError(f"{file}: cannot read: {e.strerror or e}") from None


def _what_is_here(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    if pickles:
        return f"found pickle files {pickles[:4]} that are not model weights; opd_lens reads safetensors only"
    return f"contents: {names[:8]}" if names else "empty directory"
