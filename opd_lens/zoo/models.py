"""Tiny Qwen3-architecture causal LMs (``transformers``' own Qwen3 classes), saved and loaded as HF checkpoints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from ..checkpoints import save_checkpoint
from .task import VOCAB

__all__ = ["ModelSize", "qwen3_config", "build_model", "load_model", "save_model", "bf16_state"]


@dataclass(frozen=True)
class ModelSize:
    """Width, depth, MLP width and attention heads (query and key/value) of a tiny Qwen3."""

    hidden: int
    layers: int
    intermediate: int
    heads: int = 4
    kv_heads: int = 2


def qwen3_config(size: ModelSize, max_len: int) -> Qwen3Config:
    """A Qwen3 config over the task's characters: grouped-query attention, q/k norms, untied ``lm_head``, no
    dropout, bf16 as the saved dtype, eager attention (fastest for tiny models on CPU). Weights start with std
    0.06 rather than Qwen3's 0.02, from which models this small learn the task late and seed-dependently."""
    # torch_dtype and attn_implementation go through PreTrainedConfig's **kwargs, which transformers 5's typed
    # signature leaves out (torch_dtype: the name 4.x reads; 5.x takes it as dtype); 4.x types them: unused-ignore
    return Qwen3Config(  # type: ignore[call-arg, unused-ignore]
        vocab_size=len(VOCAB),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        initializer_range=0.06,
        torch_dtype="bfloat16",
        architectures=["Qwen3ForCausalLM"],
        attn_implementation="eager",
    )


def build_model(config: Qwen3Config, seed: int) -> Qwen3ForCausalLM:
    """A freshly initialized fp32 model; the same ``seed`` gives the same weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config).float()


def bf16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights rounded to bf16, as a bf16 trainer saves them."""
    return {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}


def save_model(path: str | os.PathLike, model: Qwen3ForCausalLM, step: int, log_history=()) -> Path:
    """Save ``model`` as a Hugging Face checkpoint directory: bf16 ``model.safetensors``, ``config.json`` and
    ``trainer_state.json`` (``global_step`` and ``log_history``)."""
    return save_checkpoint(path, bf16_state(model), step=step, config=model.config.to_dict(), log_history=log_history)


def load_model(path: str | os.PathLike) -> Qwen3ForCausalLM:
    """An fp32 model with the weights of a checkpoint directory written by :func:`save_model`."""
    path = Path(path)
    config = Qwen3Config(**json.loads((path / "config.json").read_text()) | {"attn_implementation": "eager"})
    model = Qwen3ForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in load_file(path / "model.safetensors").items()})
    return model.float()
