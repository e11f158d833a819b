"""PEFT LoRA adapters: which base tensors an adapter updates, through which factors, at what scale.

A LoRA step directory holds ``adapter_model.safetensors`` and ``adapter_config.json`` (TRL with PEFT, Tinker
archives, prime-rl ``lora_adapters/``). Its update of a base weight, oriented (out, in) like every analysed matrix,
is the rank-r product ΔW = s·B·A with ``lora_B`` [out, r], ``lora_A`` [r, in] and s = α/r (α/√r with rsLoRA; α
from ``alpha_pattern`` when a pattern names the module). GPT-2 Conv1D modules (``fan_in_fan_out``) have the same
(out, in) product; embeddings (``lora_embedding_A`` [r, vocab], ``lora_embedding_B`` [dim, r]) have ΔW = s·(B·A)ᵀ.
DoRA and the other PEFT methods do not update by a low-rank product and are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, ShapeMismatchError
from .formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .names import MatrixRef

__all__ = ["Adapter", "LoraPair", "parse_adapter"]

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?$")


@dataclass(frozen=True)
class LoraPair:
    """The factors of one adapted module: tensor names, rank and scale s of ΔW = s·B·A."""

    a: str
    b: str
    shape: tuple[int, int]
    """(out, in) of ΔW."""
    rank: int
    scale: float
    embedding: bool = False
    """``lora_embedding_A``/``_B`` of an embedding: ΔW = s·(B·A)ᵀ."""


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter: module path (``model.layers.0.self_attn.q_proj``) -> its :class:`LoraPair`."""

    pairs: Mapping[str, LoraPair]
    skipped: Mapping[str, str]
    """Stored tensors that are not LoRA factors (biases, ``modules_to_save`` copies), and why they are left out."""

    def pair_for(self, tensor: str) -> LoraPair | None:
        """The factors that update the base weight ``tensor``, if any."""
        module = tensor.removesuffix(".weight")
        if module in self.pairs:
            return self.pairs[module]
        found = [pair for m, pair in self.pairs.items() if _same_weight(m, tensor)]
        return found[0] if len(found) == 1 else None

    def adapted(
        self, where: Path, origin: Path, shapes: Mapping[str, tuple[int, ...]], refs: list[MatrixRef]
    ) -> set[str]:
        """The base tensors among the analysed matrices ``refs`` of the origin (whose tensor ``shapes`` are given)
        that this adapter updates. Raises :class:`CheckpointError` naming the adapter ``where`` and the module when
        a module has no weight in the base, or :class:`ShapeMismatchError` when the factors do not fit it."""
        analysed = {ref.tensor: ref for ref in refs}
        out = set()
        for module, pair in self.pairs.items():
            tensor = f"{module}.weight"
            if tensor not in shapes:
                found = [name for name in shapes if _same_weight(module, name)]
                if len(found) != 1:
                    raise CheckpointError(f"{where}: adapts {module!r}, which has no weight in the base model {origin}")
                tensor = found[0]
            ref = analysed.get(tensor)
            if ref is None:
                continue  # not analysed (e.g. lm_head without include_globals)
            if ref.expert is not None:
                raise CheckpointError(f"{where}: LoRA on the fused expert tensor {tensor!r} is not supported")
            stored = shapes[tensor]
            oriented = (stored[1], stored[0]) if ref.transpose else (stored[0], stored[1])
            if pair.shape != oriented:
                raise ShapeMismatchError(
                    f"{where}: the factors of {module!r} make a {pair.shape[0]}×{pair.shape[1]} update, but "
                    f"{tensor!r} in {origin} is {oriented[0]}×{oriented[1]}"
                )
            out.add(tensor)
        return out


def parse_adapter(path: Path, config: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> Adapter:
    """The :class:`Adapter` described by ``adapter_config.json`` (``config``) and the stored factor ``shapes``."""
    file = path / ADAPTER_CONFIG
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointNotFoundError(
            f"{file}: a PEFT {kind} adapter; opd_lens analyses LoRA adapters only (merge it into the base model and "
            "save full checkpoints to analyse it)"
        )
    if config.get("use_dora"):
        raise CheckpointNotFoundError(
            f"{file}: a DoRA adapter; its update is not a low-rank product B·A, so opd_lens cannot analyse it from "
            "its factors (merge it with peft's merge_and_unload() and save full checkpoints)"
        )
    alpha = config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, Mapping):
        raise CorruptCheckpointError(f"{file}: alpha_pattern must be a mapping, got {alpha_pattern!r}")
    factors: dict[str, dict[str, str]] = {}
    skipped: dict[str, str] = {}
    for name in shapes:
        stem = name.removeprefix("base_model.model.").removesuffix(".weight")
        m = _FACTOR.fullmatch(stem)
        if m is None:
            if "lora_magnitude_vector" in name:
                raise CheckpointNotFoundError(f"{path / ADAPTER_WEIGHTS}: holds DoRA magnitudes ({name!r})")
            skipped[name] = "not a LoRA factor (a bias or a fully trained module copy)"
            continue
        key = ("E" if m["embedding"] else "") + m["side"]
        factors.setdefault(m["module"], {})[key] = name
    pairs = {}
    for module, found in factors.items():
        embedding = "EA" in found or "EB" in found
        a, b = (found.get("EA"), found.get("EB")) if embedding else (found.get("A"), found.get("B"))
        if a is None or b is None:
            side = "A" if a is None else "B"
            raise CorruptCheckpointError(f"{path / ADAPTER_WEIGHTS}: module {module!r} has no lora_{side} factor")
        sa, sb = shapes[a], shapes[b]
        if len(sa) == len(sb) == 3:
            raise CheckpointNotFoundError(
                f"{path / ADAPTER_WEIGHTS}: {module!r} has 3-D LoRA factors (fused MoE experts); opd_lens reads "
                "per-module 2-D factors only (save the adapter in PEFT's per-expert format)"
            )
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1] or sa[0] == 0:
            raise CorruptCheckpointError(
                f"{path / ADAPTER_WEIGHTS}: the factors of {module!r} do not multiply: A {list(sa)}, B {list(sb)}"
            )
        rank = sa[0]
        module_alpha = alpha_pattern.get(_pattern_key(alpha_pattern, module), alpha)
        if not _is_number(module_alpha):
            raise CorruptCheckpointError(f"{file}: lora_alpha of {module!r} is {module_alpha!r}, not a number")
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        shape = (sa[1], sb[0]) if embedding else (sb[0], sa[1])
        pairs[module] = LoraPair(a, b, shape, rank, float(scale), embedding)
    if not pairs:
        raise CorruptCheckpointError(f"{path / ADAPTER_WEIGHTS}: holds no LoRA factors")
    return Adapter(pairs, skipped)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    """The first key of ``alpha_pattern`` naming ``module``, matched as PEFT does: ``(.*\\.)?(KEY)$``."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            if module == key or module.endswith(f".{key}"):
                return key
    return None


def _same_weight(module: str, tensor: str) -> bool:
    """Whether the PEFT module path and the base weight name agree up to a leading prefix (a base saved without
    ``model.``, or with an extra wrapper prefix)."""
    weight = f"{module}.weight"
    return tensor == weight or weight.endswith(f".{tensor}") or tensor.endswith(f".{weight}")
