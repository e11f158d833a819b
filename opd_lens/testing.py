"""Testing helpers (like :mod:`xarray.testing`): synthetic checkpoint series with a planted update, written in real
trainer layouts, for tests, benchmarks and demos.

:func:`write_planted_run` writes an origin and a run of a tiny Qwen3-shaped model (:func:`qwen3_config`,
:func:`qwen3_shapes`) whose cumulative update ΔW_t = (t/T)·D grows along one fixed direction D of known spectrum
(:func:`update_direction`, one of ``SPECTRA``), so the diagnostics have known structure (a locked right subspace, a
stable rank set by the spectrum, partial bf16 sparsity).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .checkpoints import checkpoint_path, save_checkpoint
from .schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from .store import Store

__all__ = ["SPECTRA", "fill_store", "qwen3_config", "qwen3_shapes", "update_direction", "write_planted_run"]

SPECTRA = {
    "bulk": "a rank-r channel B A plus a sparse Gaussian S of equal rms: σ_(r+1)… sit at the edge of a "
    "Marchenko–Pastur bulk, about 1% apart (the adversarial case for a Krylov method)",
    "planted": "the rank-r channel B A plus the sparse S at a tenth of its rms: a clear gap after σ_r",
    "powerlaw": "full rank, σ_i ∝ 1/i, random singular vectors: the decaying spectra of real fine-tuning updates",
}
"""The update directions ``write_planted_run`` can plant, by name."""

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def qwen3_config(layers: int = 2, hidden: int = 64, intermediate: int = 160, heads: int = 4, kv_heads: int = 2) -> dict:
    """A Qwen3 ``config.json`` for the given sizes (head_dim = hidden / heads)."""
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": 128,
    }


def qwen3_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Stored tensor names and shapes of a Qwen3 causal LM with ``config``."""
    h, i, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    proj = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    proj |= {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes |= {f"{p}.self_attn.{n}.weight": proj[n] for n in _ATTN}
        shapes |= {f"{p}.mlp.{n}.weight": proj[n] for n in _MLP}
        shapes |= {f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,)}
        shapes |= {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (config["vocab_size"], h)}
    return shapes


def write_planted_run(
    out: str | os.PathLike,
    *,
    config: dict | None = None,
    steps: Sequence[int] = (25, 50, 75, 100),
    rank: int = 4,
    scale: float = 0.02,
    density: float = 0.3,
    spectrum: str = "bulk",
    layout: str = "hf",
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write an origin checkpoint and a run of checkpoints at ``steps``; return ``(origin_dir, run_dir)``.

    Each matrix gets ΔW_t = (t/T)·scale·rms(W_0)·D with D of rms ≈ 1 shaped by ``spectrum`` (a key of ``SPECTRA``):
    B A / ‖B A‖_rms of rank ``rank``, plus S a sparse Gaussian with the given ``density`` unless it is "powerlaw".
    1-D weights stay at W_0.
    """
    if spectrum not in SPECTRA:
        raise ValueError(f"unknown spectrum {spectrum!r}; choose one of {', '.join(SPECTRA)}")
    config = config or qwen3_config()
    out = Path(out)
    gen = torch.Generator().manual_seed(seed)
    origin = {name: _init(shape, gen) for name, shape in qwen3_shapes(config).items()}
    delta = {name: update_direction(w, spectrum, rank, density, gen) for name, w in origin.items() if w.ndim == 2}
    origin_dir = save_checkpoint(out / "origin", _cast(origin, dtype), config=config)
    run_dir = out / "run"
    last = max(steps)
    for step in steps:
        weights = {n: w + (step / last) * scale * delta[n] if n in delta else w for n, w in origin.items()}
        path = checkpoint_path(run_dir, step, layout)
        save_checkpoint(path, _cast(weights, dtype), step=step, config=config, max_shard_bytes=max_shard_bytes)
    return origin_dir, run_dir


def _init(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / shape[1] ** 0.5


def update_direction(w: torch.Tensor, spectrum: str, rank: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """rms(W_0)·D, the planted direction of one m×n matrix W_0 (see :func:`write_planted_run` and ``SPECTRA``)."""
    m, n = w.shape
    rms = w.pow(2).mean().sqrt()
    if spectrum == "powerlaw":
        p = min(m, n)
        u = torch.linalg.qr(torch.randn(m, p, generator=gen)).Q
        v = torch.linalg.qr(torch.randn(n, p, generator=gen)).Q
        d = (u / torch.arange(1, p + 1)) @ v.T
        return rms * d / d.pow(2).mean().sqrt()
    low = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
    sparse = torch.randn(m, n, generator=gen) * (torch.rand(m, n, generator=gen) < density)
    return rms * (low / low.pow(2).mean().sqrt() + (0.1 if spectrum == "planted" else 1.0) * sparse)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in tensors.items()}


def fill_store(
    path: str | os.PathLike,
    *,
    runs: int = 6,
    steps: int = 300,
    layers: int = 36,
    hidden: int = 4096,
    intermediate: int = 12288,
    seed: int = 0,
) -> Store:
    """A store of ``runs`` runs × ``steps`` steps × ``layers`` layers × the 7 modules of a Qwen3 block, filled with
    random values through the store's own writers, with no checkpoint read and no training: for timing what reads a
    store at real-study size. The last step of each run has endpoint metrics; ``lock_alignment`` refers to it."""
    from .diagnostics import Settings
    from .schema import ANGLES, STEP_SCALARS, VARIABLES
    from .store import open_store

    store = open_store(path, Settings(angle_k=16))
    rng = np.random.default_rng(seed)
    mlp = {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    blocks = {f"self_attn.{m}": (hidden, hidden) for m in _ATTN} | {f"mlp.{m}": shape for m, shape in mlp.items()}
    shapes = {(layer, module): shape for layer in range(layers) for module, shape in blocks.items()}
    series = [100 * (t + 1) for t in range(steps)]
    for i in range(runs):
        name = f"run-{i}"
        spec = {"run_dir": f"/runs/{name}", "origin": "/runs/origin", "method": ("sft", "opd", "rlvr")[i % 3]}
        store.register_run(name, {**spec, "include_globals": False, "origin_fingerprint": "0" * 64}, shapes)
        with store.writer():
            grid_layers, grid_modules, k, r = store.grid()
            shape = (len(grid_layers), len(grid_modules))
            write, run, slots = store.step_writer(), store.run_index(name), store.step_slots(series)
            for step in series:
                last = step == series[-1]
                scalars = {v: rng.random(shape, np.float32) for v in STEP_SCALARS}
                if not last:  # endpoint metrics at the last step only
                    scalars |= {
                        v: np.full(shape, np.nan, np.float32) for v in STEP_SCALARS if VARIABLES[v].when == "endpoint"
                    }
                scalars["update_spectrum"] = np.sort(rng.random((*shape, r), np.float32))[..., ::-1]
                angles = {v: np.sort(rng.random((*shape, k), np.float32) * 90) for v in ANGLES} if last else None
                write(run, slots[step], scalars, angles)
            entries = {
                s: {
                    "path": f"{spec['run_dir']}/checkpoint-{s}",
                    "fingerprint": "0" * 64,
                    "schema": SCHEMA_VERSION,
                    "endpoint": s == series[-1],
                    "lock_ref": -1,
                }
                for s in series
            }
            store.record(name, entries)
            store.write_lock(name, {s: rng.random(shape, np.float32) for s in series}, series[-1])
            store.record(name, {s: {**e, "lock_ref": series[-1]} for s, e in entries.items()})
    return store
