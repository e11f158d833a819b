"""Shared helpers for the test suite: tiny model state dicts and hand-written (non-opd_lens) safetensors files."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from safetensors.torch import save_file

from opd_lens.testing import qwen3_shapes

# CI replays the same examples every run (a red CI is a real regression); local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def ctrl_c_default() -> None:
    """``preexec_fn`` of a child that a test stops with SIGINT: a shell's background job (``cmd &``) starts with
    SIGINT ignored, which Python then keeps, so the child would never see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# A tiny Qwen3-like geometry with grouped-query attention (kv heads < heads).
HIDDEN = 16
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 4
INTERMEDIATE = 24
VOCAB = 32

QWEN3_CONFIG = {
    "model_type": "qwen3",
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "intermediate_size": INTERMEDIATE,
    "vocab_size": VOCAB,
}

DENSE_MODULES = (
    "mlp.down_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "self_attn.k_proj",
    "self_attn.o_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
)
"""The 7 analysed matrices of a Llama/Qwen3/Mistral block, sorted."""


def tiny_config(n_layers: int = 2) -> dict:
    """:data:`QWEN3_CONFIG` with ``n_layers`` layers, for :func:`opd_lens.testing.qwen3_shapes`."""
    return QWEN3_CONFIG | {"num_hidden_layers": n_layers}


def random_state_dict(
    shapes: Mapping[str, Sequence[int]], dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Distinct random tensors of the given shapes (every element differs, so a wrong slice cannot pass)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(tuple(shape), generator=g).to(dtype) for name, shape in shapes.items()}


def qwen3_state_dict(n_layers: int = 2, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Qwen3-style state dict (GQA, q/k norms, untied lm_head)."""
    return random_state_dict(qwen3_shapes(tiny_config(n_layers)), dtype, seed)


def write_raw_checkpoint(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    shards: Sequence[Sequence[str]] | None = None,
    shard_names: Sequence[str] | None = None,
    weight_map: Mapping[str, str] | None = None,
) -> Path:
    """Write a checkpoint directly with ``safetensors.torch.save_file`` (not opd_lens's writer).

    ``shards=None`` writes one ``model.safetensors``; otherwise each group of names goes to its own shard and a
    hand-written ``model.safetensors.index.json`` is added (``weight_map`` overrides the index's map).
    """
    path.mkdir(parents=True, exist_ok=True)
    if shards is None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
        return path
    n = len(shards)
    names = list(shard_names or [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)])
    wm: dict[str, str] = {}
    for fname, group in zip(names, shards, strict=True):
        save_file({k: tensors[k].contiguous() for k in group}, str(path / fname))
        wm |= dict.fromkeys(group, fname)
    if weight_map is not None:
        wm = dict(weight_map)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm})
    )
    return path


def write_trainer_state(path: Path, step: int) -> None:
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


@pytest.fixture
def tiny_qwen3() -> dict[str, torch.Tensor]:
    return qwen3_state_dict()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices run many times faster on one intra-op thread than on several on a small, shared CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EVIL_NAME = "<img src=x onerror=alert(1)>"
"""A run name that is HTML: every view must show it as text and run nothing."""


@pytest.fixture(scope="session")
def widget_store(tmp_path_factory) -> Path:
    """A real store of two planted runs (one named :data:`EVIL_NAME`), angles at every step, for the views."""
    from opd_lens import open_store
    from opd_lens.diagnostics import Settings
    from opd_lens.testing import qwen3_config, write_planted_run

    root = tmp_path_factory.mktemp("widget-store")
    store = open_store(root / "store", Settings(angle_k=8, mask_rank=4))
    config = qwen3_config(layers=3, hidden=32, intermediate=64)
    for seed, (name, scale, steps) in enumerate([("sft", 0.05, (10, 20, 30)), (EVIL_NAME, 0.005, (20, 30))]):
        origin, run = write_planted_run(root / f"run{seed}", config=config, steps=steps, scale=scale, seed=seed)
        store.add_run(name, run, origin, method="opd" if seed else "sft")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    store.compute(progress=False, endpoint="all")
    torch.set_num_threads(n)
    return store.path


@pytest.fixture(scope="session")
def ci_zoo(tmp_path_factory) -> tuple[Path, dict]:
    """The ci preset of the demo zoo, trained once per session (about a minute); copy it before changing it."""
    from opd_lens.zoo import train_zoo

    out = tmp_path_factory.mktemp("zoo") / "ci"
    return out, train_zoo(out, "ci", seed=0, progress=False)
