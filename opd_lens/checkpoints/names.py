"""Which stored tensors are analysed, and as which (layer, module) matrices.

Every 2-D weight inside a numbered block (``layers.N``, ``layer.N``, ``h.N``, ``blocks.N``) is one matrix, keyed by
the block number and the name inside the block without ``.weight``. Fused tensors are split the way the models
use them: QKV (``qkv_proj``, GPT-2 ``c_attn``, Baichuan ``W_pack``) into ``q_proj``/``k_proj``/``v_proj``,
``gate_up_proj`` into ``gate_proj``/``up_proj``, and 3-D fused experts (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]) into ``experts.{e}.{gate,up,down}_proj``. GPT-2 Conv1D weights, stored
(in, out), are transposed to (out, in). Embeddings and ``lm_head`` (any 2-D weight outside the blocks) are opt-in,
with layer = -1. 1-D tensors are ignored; anything else not analysed is reported with the reason.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["MatrixRef", "MatrixPlan", "plan_matrices", "GLOBAL_LAYER"]

GLOBAL_LAYER = -1
"""Layer index of opted-in matrices outside the numbered blocks (embeddings, lm_head)."""

_BLOCK = re.compile(r"^(?:(?P<prefix>.*?)\.)?(?P<kind>layers|layer|h|blocks)\.(?P<layer>[0-9]{1,18})\.(?P<rest>.+)$")
"""A numbered block; its number is ASCII digits that fit the store's int64 ``layer`` coordinate."""
_QKV = ("qkv_proj", "c_attn", "W_pack")
_CONV1D = ("c_attn", "c_proj", "c_fc", "q_attn")
_CONV1D_MODEL_TYPES = ("gpt2", "decision_transformer", "imagegpt")
_FUSED_EXPERT = re.compile(r"^(?P<parent>.*experts)\.(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class MatrixRef:
    """One analysed matrix: where it is stored and how to cut it out, oriented (out, in)."""

    layer: int
    module: str
    tensor: str
    shape: tuple[int, int]
    """(out, in) after the transforms below."""
    expert: int | None = None
    """Index along dim 0 of a 3-D fused expert tensor."""
    transpose: bool = False
    """Stored (in, out): GPT-2 Conv1D or transposed fused experts."""
    rows: tuple[int, int] | None = None
    """Row range [start, stop) of the (out, in)-oriented tensor, for fused QKV and gate/up."""


@dataclass(frozen=True)
class MatrixPlan:
    """The analysed matrices of a checkpoint, sorted by (layer, module), and what was left out and why."""

    matrices: tuple[MatrixRef, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)

    def by_key(self) -> dict[tuple[int, str], MatrixRef]:
        return {(m.layer, m.module): m for m in self.matrices}


def plan_matrices(
    shapes: Mapping[str, Sequence[int]],
    config: Mapping | None = None,
    include_globals: bool = False,
) -> MatrixPlan:
    """Map stored tensor names and shapes (and the model's ``config.json``, if any) to analysed matrices."""
    config = config or {}
    conv1d_model = config.get("model_type") in _CONV1D_MODEL_TYPES
    blocks = {name: m for name in shapes if (m := _BLOCK.match(name))}
    primary = Counter(m["prefix"] for m in blocks.values()).most_common(1)
    primary_prefix = primary[0][0] if primary else None
    out: list[MatrixRef] = []
    skipped: dict[str, str] = {}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            continue
        if name.endswith("bias"):
            skipped[name] = "bias, not a weight matrix"
            continue
        m = blocks.get(name)
        if m is None:
            if len(shape) == 2 and include_globals:
                out.append(MatrixRef(GLOBAL_LAYER, _strip_weight(name), name, shape))
            else:
                skipped[name] = (
                    "outside the numbered blocks (pass include_globals=True to analyse it)"
                    if len(shape) == 2
                    else f"{len(shape)}-D tensor outside the numbered blocks"
                )
            continue
        module = _strip_weight(m["rest"])
        if m["prefix"] != primary_prefix:
            module = f"{m['prefix']}/{module}"
        layer = int(m["layer"])
        leaf = module.rsplit(".", 1)[-1]
        conv1d = leaf in _CONV1D and (conv1d_model or (not config and m["kind"] == "h"))
        try:
            if len(shape) == 2:
                out.extend(_split_2d(layer, module, name, shape, conv1d, config))
            elif len(shape) == 3 and (fe := _FUSED_EXPERT.match(module)):
                out.extend(_split_experts(layer, fe["parent"], fe["proj"], name, shape, config))
            else:
                skipped[name] = f"{len(shape)}-D tensor that is not a known fused-expert layout"
        except _CannotSplit as e:
            skipped[name] = str(e)
    keys = Counter((r.layer, r.module) for r in out)
    dupes = [k for k, n in keys.items() if n > 1]
    if dupes:
        layer, module = dupes[0]
        names = sorted(r.tensor for r in out if (r.layer, r.module) == (layer, module))
        raise ValueError(f"tensors {names} both map to layer {layer} module {module!r}")
    out.sort(key=lambda r: (r.layer, natural_key(r.module)))
    return MatrixPlan(tuple(out), skipped)


def natural_key(name: str) -> tuple:
    """Sort key that orders numbered parts numerically (``experts.2`` before ``experts.10``)."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"([0-9]+)", name)))


class _CannotSplit(Exception):
    pass


def _strip_weight(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _split_2d(layer, module, name, shape, conv1d, config):
    out_dim, in_dim = (shape[1], shape[0]) if conv1d else shape
    parent, _, leaf = module.rpartition(".")
    prefix = f"{parent}." if parent else ""
    if leaf in _QKV:
        sizes: tuple[int, ...] = _qkv_sizes(out_dim, in_dim, config, name)
        parts = [f"{prefix}{p}" for p in ("q_proj", "k_proj", "v_proj")]
    elif leaf == "gate_up_proj":
        if out_dim % 2:
            raise _CannotSplit(f"fused gate_up_proj with an odd number of rows ({out_dim})")
        sizes = (out_dim // 2, out_dim // 2)
        parts = [f"{prefix}gate_proj", f"{prefix}up_proj"]
    else:
        return [MatrixRef(layer, module, name, (out_dim, in_dim), transpose=conv1d)]
    refs, start = [], 0
    for part, size in zip(parts, sizes, strict=True):
        refs.append(MatrixRef(layer, part, name, (size, in_dim), transpose=conv1d, rows=(start, start + size)))
        start += size
    return refs


def _qkv_sizes(rows: int, hidden: int, config: Mapping, name: str) -> tuple[int, int, int]:
    heads = _positive_int(config, "num_attention_heads") or _positive_int(config, "n_head")
    if heads:
        kv_heads = _positive_int(config, "num_key_value_heads") or heads
        head_dim = _positive_int(config, "head_dim") or hidden // heads
        sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        if sum(sizes) == rows:
            return sizes
    if rows % 3 == 0 and (not heads or (_positive_int(config, "num_key_value_heads") or heads) == heads):
        return (rows // 3,) * 3
    raise _CannotSplit(
        f"fused QKV with {rows} rows cannot be split into q/k/v: config.json must give num_attention_heads, "
        "num_key_value_heads and head_dim that add up to it"
    )


def _positive_int(config: Mapping, key: str) -> int | None:
    """``config[key]`` if it is a positive int; multimodal configs keep the language model's in ``text_config``."""
    text = config.get("text_config")
    value = config.get(key, text.get(key) if isinstance(text, Mapping) else None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _split_experts(layer, parent, proj, name, shape, config):
    n_experts, a, b = shape
    hidden = _positive_int(config, "hidden_size")
    if proj == "down_proj":  # stored [E, H, I]; some writers store [E, I, H]
        transpose = hidden is not None and b == hidden and a != hidden
    else:  # stored [E, out, H]; some writers store [E, H, out]
        transpose = hidden is not None and a == hidden and b != hidden
    out_dim, in_dim = (b, a) if transpose else (a, b)
    refs = []
    for e in range(n_experts):
        for sub in _split_2d(layer, f"{parent}.{e}.{proj}", name, (out_dim, in_dim), False, config):
            refs.append(MatrixRef(sub.layer, sub.module, name, sub.shape, e, transpose, sub.rows))
    return refs
