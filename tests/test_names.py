"""Parameter names -> analysed (layer, module) matrices for each model family, proven end to end on real files."""

from __future__ import annotations

import contextlib
import json
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import (
    DENSE_MODULES,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    QWEN3_CONFIG,
    VOCAB,
    qwen3_state_dict,
    random_state_dict,
    tiny_config,
    write_raw_checkpoint,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd_lens.checkpoints import GLOBAL_LAYER, MatrixPlan, open_checkpoint, plan_matrices, save_checkpoint
from opd_lens.errors import CheckpointError
from opd_lens.testing import qwen3_shapes

H, Q, KV, INTER = HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, INTERMEDIATE


def _natural_key(key):
    """(layer, module) ordered with numbered parts compared as numbers: experts.2 before experts.10."""
    layer, module = key
    return layer, [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", module)]


def _keys(plan: MatrixPlan) -> list[tuple[int, str]]:
    return [(r.layer, r.module) for r in plan.matrices]


def _shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _e2e(path: Path, sd, expected, config=None, include_globals=False, raw_shards: int = 0) -> MatrixPlan:
    """Write ``sd`` for real, open it, and check every planned matrix against the slice the test expects.

    ``raw_shards`` > 0 writes that many shards with safetensors directly and a hand-written index; otherwise
    opd_lens's writer is used.
    """
    if raw_shards:
        names = list(sd)
        write_raw_checkpoint(path, sd, shards=[names[i::raw_shards] for i in range(raw_shards)])
        if config is not None:
            (path / "config.json").write_text(json.dumps(config))
    else:
        save_checkpoint(path, sd, config=config)
    ckpt = open_checkpoint(path)
    plan = ckpt.plan(include_globals)
    assert _keys(plan) == sorted(expected, key=_natural_key)
    for ref in plan.matrices:
        want = expected[ref.layer, ref.module]
        assert ref.shape == tuple(want.shape), ref
        got = ckpt.read_matrix(ref)
        assert got.dtype == want.dtype, ref
        assert torch.equal(got, want), ref
    return plan


# --- Llama / Qwen3 / Mistral ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen3", "llama", "mistral", None])
def test_llama_family_plan(model_type):
    shapes = qwen3_shapes(tiny_config(3))
    shapes["model.layers.1.self_attn.q_proj.bias"] = (Q,)  # Qwen2-style biases are never analysed
    config = None if model_type is None else {**QWEN3_CONFIG, "model_type": model_type}
    plan = plan_matrices(shapes, config)
    assert _keys(plan) == [(i, m) for i in range(3) for m in DENSE_MODULES]
    by = plan.by_key()
    assert by[0, "self_attn.q_proj"].shape == (Q, H)
    assert by[2, "self_attn.k_proj"].shape == (KV, H)
    assert by[1, "self_attn.o_proj"].shape == (H, Q)
    assert by[1, "mlp.down_proj"].shape == (H, INTER)
    assert by[1, "mlp.up_proj"].tensor == "model.layers.1.mlp.up_proj.weight"
    for r in plan.matrices:
        assert (r.expert, r.transpose, r.rows) == (None, False, None)
    assert not any("norm" in r.module for r in plan.matrices)
    assert set(plan.skipped) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all("include_globals" in why for why in plan.skipped.values())


def test_llama_family_globals_opt_in():
    plan = plan_matrices(qwen3_shapes(tiny_config(1)), QWEN3_CONFIG, include_globals=True)
    by = plan.by_key()
    assert by[GLOBAL_LAYER, "model.embed_tokens"].shape == (VOCAB, H)
    assert by[GLOBAL_LAYER, "lm_head"].shape == (VOCAB, H)
    assert by[GLOBAL_LAYER, "lm_head"].tensor == "lm_head.weight"
    assert GLOBAL_LAYER == -1
    assert _keys(plan)[:2] == [(-1, "lm_head"), (-1, "model.embed_tokens")]
    assert len(plan.matrices) == 2 + 7
    assert not plan.skipped
    assert (GLOBAL_LAYER, "model.norm") not in by


def test_layers_sort_numerically():
    plan = plan_matrices(qwen3_shapes(tiny_config(12)))
    layers = [r.layer for r in plan.matrices]
    assert layers == sorted(layers)
    assert layers[-1] == 11 and len(layers) == 12 * 7
    assert _keys(plan) == sorted(_keys(plan), key=_natural_key)


@pytest.mark.parametrize("raw_shards", [0, 3])
def test_llama_family_end_to_end(tmp_path, raw_shards):
    sd = qwen3_state_dict(n_layers=2)
    expected = {(i, m): sd[f"model.layers.{i}.{m}.weight"] for i in range(2) for m in DENSE_MODULES}
    expected[-1, "model.embed_tokens"] = sd["model.embed_tokens.weight"]
    expected[-1, "lm_head"] = sd["lm_head.weight"]
    _e2e(tmp_path / "c", sd, expected, QWEN3_CONFIG, include_globals=True, raw_shards=raw_shards)


# --- BERT -------------------------------------------------------------------------------------------------------

BERT_MODULES = (
    "attention.output.dense",
    "attention.self.key",
    "attention.self.query",
    "attention.self.value",
    "intermediate.dense",
    "output.dense",
)


def _bert_state_dict(n_layers=2):
    shapes = {
        "bert.embeddings.word_embeddings.weight": (VOCAB, H),
        "bert.embeddings.position_embeddings.weight": (8, H),
        "bert.embeddings.LayerNorm.weight": (H,),
        "bert.pooler.dense.weight": (H, H),
        "cls.predictions.transform.dense.weight": (H, H),
    }
    for i in range(n_layers):
        p = f"bert.encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + m + ".weight"] = (H, H)
            shapes[p + m + ".bias"] = (H,)
        shapes[p + "attention.output.LayerNorm.weight"] = (H,)
        shapes[p + "intermediate.dense.weight"] = (4 * H, H)
        shapes[p + "output.dense.weight"] = (H, 4 * H)
        shapes[p + "output.LayerNorm.bias"] = (H,)
    return random_state_dict(shapes, torch.float32)


def test_bert_plan_and_end_to_end(tmp_path):
    sd = _bert_state_dict()
    plan = plan_matrices(_shapes(sd), {"model_type": "bert", "num_attention_heads": 4})
    assert _keys(plan) == [(i, m) for i in range(2) for m in BERT_MODULES]
    assert plan.by_key()[1, "intermediate.dense"].shape == (4 * H, H)
    assert set(plan.skipped) == {
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.pooler.dense.weight",
        "cls.predictions.transform.dense.weight",
    }
    expected = {(i, m): sd[f"bert.encoder.layer.{i}.{m}.weight"] for i in range(2) for m in BERT_MODULES}
    _e2e(tmp_path / "c", sd, expected, {"model_type": "bert"})


# --- GPT-2 (Conv1D, fused c_attn) -------------------------------------------------------------------------------

GPT2_MODULES = ("attn.c_proj", "attn.k_proj", "attn.q_proj", "attn.v_proj", "mlp.c_fc", "mlp.c_proj")


def _gpt2_state_dict(prefix="transformer.", n_layers=2, causal_buffer=False):
    shapes = {f"{prefix}wte.weight": (VOCAB, H), f"{prefix}wpe.weight": (8, H), f"{prefix}ln_f.weight": (H,)}
    for i in range(n_layers):
        p = f"{prefix}h.{i}."
        shapes |= {
            p + "ln_1.weight": (H,),
            p + "attn.c_attn.weight": (H, 3 * H),  # Conv1D: (in, out)
            p + "attn.c_attn.bias": (3 * H,),
            p + "attn.c_proj.weight": (H, H),
            p + "attn.c_proj.bias": (H,),
            p + "mlp.c_fc.weight": (H, 4 * H),
            p + "mlp.c_fc.bias": (4 * H,),
            p + "mlp.c_proj.weight": (4 * H, H),
        }
        if causal_buffer:
            shapes[p + "attn.bias"] = (1, 1, 8, 8)  # the causal-mask buffer older checkpoints carry
    return random_state_dict(shapes, torch.float16)


def _gpt2_expected(sd, prefix="transformer.", n_layers=2):
    out = {}
    for i in range(n_layers):
        p = f"{prefix}h.{i}."
        w = sd[p + "attn.c_attn.weight"]
        out[i, "attn.q_proj"] = w[:, :H].T.contiguous()
        out[i, "attn.k_proj"] = w[:, H : 2 * H].T.contiguous()
        out[i, "attn.v_proj"] = w[:, 2 * H :].T.contiguous()
        out[i, "attn.c_proj"] = sd[p + "attn.c_proj.weight"].T.contiguous()
        out[i, "mlp.c_fc"] = sd[p + "mlp.c_fc.weight"].T.contiguous()
        out[i, "mlp.c_proj"] = sd[p + "mlp.c_proj.weight"].T.contiguous()
    return out


@pytest.mark.parametrize(
    "config",
    [None, {"model_type": "gpt2"}, {"model_type": "gpt2", "n_head": 4, "n_embd": H}],
    ids=["none", "bare", "full"],
)
@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_gpt2_plan(config, prefix):
    sd = _gpt2_state_dict(prefix, causal_buffer=True)
    plan = plan_matrices(_shapes(sd), config)
    assert _keys(plan) == [(i, m) for i in range(2) for m in GPT2_MODULES]
    by = plan.by_key()
    for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
        r = by[0, f"attn.{part}"]
        assert (r.shape, r.transpose, r.rows) == ((H, H), True, (j * H, (j + 1) * H))
        assert r.tensor == f"{prefix}h.0.attn.c_attn.weight"
    assert by[1, "mlp.c_fc"].shape == (4 * H, H) and by[1, "mlp.c_fc"].transpose
    assert by[1, "mlp.c_proj"].shape == (H, 4 * H) and by[1, "mlp.c_proj"].transpose
    assert by[1, "attn.c_proj"].transpose
    assert f"{prefix}h.0.attn.bias" in plan.skipped  # the 4-D mask buffer
    assert f"{prefix}wte.weight" in plan.skipped


@pytest.mark.parametrize("config", [None, {"model_type": "gpt2", "n_head": 4}], ids=["no-config", "config"])
def test_gpt2_end_to_end(tmp_path, config):
    sd = _gpt2_state_dict(causal_buffer=True)
    _e2e(tmp_path / "c", sd, _gpt2_expected(sd), config, raw_shards=2)


# --- GPT-J / GPT-Neo: h.N blocks with nn.Linear weights ---------------------------------------------------------


def test_gptj_not_transposed_end_to_end(tmp_path):
    shapes = {"transformer.wte.weight": (VOCAB, H)}
    for i in range(2):
        p = f"transformer.h.{i}."
        shapes |= {p + f"attn.{m}.weight": (H, H) for m in ("q_proj", "k_proj", "v_proj", "out_proj")}
        shapes |= {p + "mlp.fc_in.weight": (4 * H, H), p + "mlp.fc_out.weight": (H, 4 * H), p + "ln_1.weight": (H,)}
    sd = random_state_dict(shapes, torch.bfloat16)
    config = {"model_type": "gptj", "n_head": 4, "n_embd": H}
    modules = ("attn.k_proj", "attn.out_proj", "attn.q_proj", "attn.v_proj", "mlp.fc_in", "mlp.fc_out")
    plan = plan_matrices(shapes, config)
    assert not any(r.transpose for r in plan.matrices)
    assert plan.by_key()[0, "mlp.fc_in"].shape == (4 * H, H)
    expected = {(i, m): sd[f"transformer.h.{i}.{m}.weight"] for i in range(2) for m in modules}
    _e2e(tmp_path / "c", sd, expected, config)


def test_gpt_neo_c_fc_is_linear_with_a_config(tmp_path):
    # GPT-Neo names its MLP c_fc/c_proj like GPT-2 but stores nn.Linear (out, in): config.json tells them apart
    shapes = {}
    for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes[f"transformer.h.0.attn.attention.{m}.weight"] = (H, H)
    shapes |= {"transformer.h.0.mlp.c_fc.weight": (4 * H, H), "transformer.h.0.mlp.c_proj.weight": (H, 4 * H)}
    sd = random_state_dict(shapes, torch.float32)
    expected = {(0, k[len("transformer.h.0.") : -len(".weight")]): v for k, v in sd.items()}
    plan = _e2e(tmp_path / "c", sd, expected, {"model_type": "gpt_neo", "num_heads": 4})
    assert not any(r.transpose for r in plan.matrices)


# --- Phi-3 (fused qkv_proj with GQA, fused gate_up_proj) ----------------------------------------------------------


def _phi3_state_dict(n_layers=2):
    shapes = {"model.embed_tokens.weight": (VOCAB, H), "lm_head.weight": (VOCAB, H)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.qkv_proj.weight": (Q + 2 * KV, H),
            p + "self_attn.o_proj.weight": (H, Q),
            p + "mlp.gate_up_proj.weight": (2 * INTER, H),
            p + "mlp.down_proj.weight": (H, INTER),
            p + "input_layernorm.weight": (H,),
        }
    return random_state_dict(shapes, torch.bfloat16)


PHI3_CONFIGS = {
    "head_dim": {
        "model_type": "phi3",
        "hidden_size": H,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
    },
    # Phi-3's own config has no head_dim: hidden // heads
    "no-head_dim": {
        "model_type": "phi3",
        "hidden_size": H,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
    },
}


@pytest.mark.parametrize("cfg", list(PHI3_CONFIGS))
def test_phi3_plan(cfg):
    plan = plan_matrices(_shapes(_phi3_state_dict()), PHI3_CONFIGS[cfg])
    by = plan.by_key()
    assert (by[0, "self_attn.q_proj"].rows, by[0, "self_attn.q_proj"].shape) == ((0, Q), (Q, H))
    assert (by[0, "self_attn.k_proj"].rows, by[0, "self_attn.k_proj"].shape) == ((Q, Q + KV), (KV, H))
    assert (by[0, "self_attn.v_proj"].rows, by[0, "self_attn.v_proj"].shape) == ((Q + KV, Q + 2 * KV), (KV, H))
    assert (by[1, "mlp.gate_proj"].rows, by[1, "mlp.up_proj"].rows) == ((0, INTER), (INTER, 2 * INTER))
    assert _keys(plan) == [(i, m) for i in range(2) for m in DENSE_MODULES]


def test_phi3_end_to_end(tmp_path):
    sd = _phi3_state_dict()
    expected = {}
    for i in range(2):
        p = f"model.layers.{i}."
        qkv, gu = sd[p + "self_attn.qkv_proj.weight"], sd[p + "mlp.gate_up_proj.weight"]
        expected |= {
            (i, "self_attn.q_proj"): qkv[:Q],
            (i, "self_attn.k_proj"): qkv[Q : Q + KV],
            (i, "self_attn.v_proj"): qkv[Q + KV :],
            (i, "self_attn.o_proj"): sd[p + "self_attn.o_proj.weight"],
            (i, "mlp.gate_proj"): gu[:INTER],
            (i, "mlp.up_proj"): gu[INTER:],
            (i, "mlp.down_proj"): sd[p + "mlp.down_proj.weight"],
        }
    _e2e(tmp_path / "c", sd, expected, PHI3_CONFIGS["no-head_dim"], raw_shards=3)


# --- Baichuan W_pack ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, {"model_type": "baichuan", "num_attention_heads": 4, "hidden_size": H}])
def test_baichuan_w_pack_end_to_end(tmp_path, config):
    shapes = {}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.W_pack.weight": (3 * H, H),
            p + "self_attn.o_proj.weight": (H, H),
            p + "mlp.gate_proj.weight": (INTER, H),
            p + "mlp.up_proj.weight": (INTER, H),
            p + "mlp.down_proj.weight": (H, INTER),
        }
    sd = random_state_dict(shapes, torch.float32)
    expected = {}
    for i in range(2):
        p = f"model.layers.{i}."
        w = sd[p + "self_attn.W_pack.weight"]
        expected |= {
            (i, "self_attn.q_proj"): w[:H],
            (i, "self_attn.k_proj"): w[H : 2 * H],
            (i, "self_attn.v_proj"): w[2 * H :],
        }
        for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            expected[i, m] = sd[p + m + ".weight"]
    _e2e(tmp_path / "c", sd, expected, config)


# --- what cannot be split ---------------------------------------------------------------------------------------


def test_unsplittable_qkv_is_skipped_not_raised():
    shapes = {
        "model.layers.0.self_attn.qkv_proj.weight": (Q + 2 * KV, H),  # 32 rows, no config: not thirds
        "model.layers.0.self_attn.o_proj.weight": (H, Q),
    }
    plan = plan_matrices(shapes)
    assert _keys(plan) == [(0, "self_attn.o_proj")]
    why = plan.skipped["model.layers.0.self_attn.qkv_proj.weight"]
    assert "32" in why and "num_key_value_heads" in why


def test_qkv_with_config_that_does_not_add_up_is_skipped():
    # GQA config whose sizes do not match the tensor: equal thirds would be a silent wrong split
    shapes = {"model.layers.0.self_attn.qkv_proj.weight": (48, H)}
    plan = plan_matrices(shapes, {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4})
    assert not plan.matrices and "model.layers.0.self_attn.qkv_proj.weight" in plan.skipped


def test_odd_gate_up_is_skipped():
    plan = plan_matrices({"model.layers.0.mlp.gate_up_proj.weight": (7, H)})
    assert not plan.matrices
    assert "odd" in plan.skipped["model.layers.0.mlp.gate_up_proj.weight"]


def test_biases_1d_and_unknown_3d_are_not_analysed():
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (Q, H),
        "model.layers.0.self_attn.q_proj.bias": (Q,),
        "model.layers.0.mlp.experts.gate_up_proj_bias": (4, 2 * INTER),  # 2-D fused expert bias (gpt-oss)
        "model.layers.0.input_layernorm.weight": (H,),
        "model.layers.0.conv.weight": (H, 1, 4),  # 3-D but not a fused expert
        "model.scalar": (),
        "model.big_table.weight": (2, 3, 4),
    }
    plan = plan_matrices(shapes, include_globals=True)
    assert _keys(plan) == [(0, "self_attn.q_proj")]
    assert "bias" in plan.skipped["model.layers.0.mlp.experts.gate_up_proj_bias"]
    assert "3-D" in plan.skipped["model.layers.0.conv.weight"]
    assert "3-D" in plan.skipped["model.big_table.weight"]
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight", "model.scalar"):
        assert name not in {r.tensor for r in plan.matrices}


def test_two_tensors_for_one_matrix_is_a_value_error():
    shapes = {"model.layers.0.self_attn.qkv_proj.weight": (3 * H, H), "model.layers.0.self_attn.k_proj.weight": (H, H)}
    with pytest.raises(ValueError, match="k_proj"):
        plan_matrices(shapes)


# --- MoE ------------------------------------------------------------------------------------------------------

E, MI = 3, 6  # experts, expert intermediate size (2 * MI != H and MI != H, so orientation is unambiguous)
MOE_CONFIG = {**QWEN3_CONFIG, "model_type": "qwen3_moe", "num_experts": E, "moe_intermediate_size": MI}


def _moe_attn_and_router(n_layers):
    shapes = {}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{m}_proj.weight": (Q if m == "q" else KV, H) for m in "qkv"}
        shapes |= {
            p + "self_attn.o_proj.weight": (H, Q),
            p + "mlp.gate.weight": (E, H),
            p + "post_attention_layernorm.weight": (H,),
        }
    return shapes


def _moe_per_expert(n_layers=2, seed=0):
    shapes = _moe_attn_and_router(n_layers)
    for i in range(n_layers):
        for e in range(E):
            p = f"model.layers.{i}.mlp.experts.{e}."
            shapes |= {p + "gate_proj.weight": (MI, H), p + "up_proj.weight": (MI, H), p + "down_proj.weight": (H, MI)}
    return random_state_dict(shapes, torch.bfloat16, seed)


def _moe_fused_from(per_expert, n_layers=2, transposed=False):
    """The same weights in transformers v5's fused layout ([E, 2I, H] / [E, H, I]), or stored transposed."""
    sd = {k: v for k, v in per_expert.items() if ".experts." not in k}
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp.experts."
        gu = torch.stack(
            [
                torch.cat([per_expert[f"{p}{e}.gate_proj.weight"], per_expert[f"{p}{e}.up_proj.weight"]])
                for e in range(E)
            ]
        )
        down = torch.stack([per_expert[f"{p}{e}.down_proj.weight"] for e in range(E)])
        if transposed:
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)
        sd[p + "gate_up_proj"], sd[p + "down_proj"] = gu.contiguous(), down.contiguous()
    return sd


def _moe_expected(per_expert):
    out = {}
    for name, t in per_expert.items():
        if t.dim() == 2 and name.startswith("model.layers."):
            layer, rest = name[len("model.layers.") :].split(".", 1)
            out[int(layer), rest[: -len(".weight")]] = t
    return out


def test_moe_per_expert_and_fused_give_the_same_keys_and_shapes():
    per = _shapes(_moe_per_expert())
    fused = _shapes(_moe_fused_from(_moe_per_expert()))
    fused_t = _shapes(_moe_fused_from(_moe_per_expert(), transposed=True))
    assert fused["model.layers.0.mlp.experts.gate_up_proj"] == (E, 2 * MI, H)
    assert fused_t["model.layers.0.mlp.experts.gate_up_proj"] == (E, H, 2 * MI)
    plans = [plan_matrices(per, MOE_CONFIG), plan_matrices(fused, MOE_CONFIG), plan_matrices(fused_t, MOE_CONFIG)]
    key_shapes = [[(r.layer, r.module, r.shape) for r in p.matrices] for p in plans]
    assert key_shapes[0] == key_shapes[1] == key_shapes[2]
    by = plans[0].by_key()
    assert by[1, "mlp.experts.2.down_proj"].shape == (H, MI)
    assert by[1, "mlp.gate"].shape == (E, H)  # the router is analysed
    assert len(plans[0].matrices) == 2 * (4 + 1 + 3 * E)
    assert all(r.expert is None for r in plans[0].matrices)
    fused_refs = [r for r in plans[2].matrices if "experts" in r.module]
    assert all(r.transpose and r.expert is not None for r in fused_refs)
    assert {r.module: r.expert for r in fused_refs}["mlp.experts.2.up_proj"] == 2


@pytest.mark.parametrize("layout", ["per-expert", "fused", "fused-transposed"])
def test_moe_end_to_end(tmp_path, layout):
    per = _moe_per_expert()
    sd = {"per-expert": per, "fused": _moe_fused_from(per), "fused-transposed": _moe_fused_from(per, transposed=True)}
    _e2e(tmp_path / "c", sd[layout], _moe_expected(per), MOE_CONFIG, raw_shards=2 if layout == "fused" else 0)


def test_fused_experts_with_weight_suffix():
    shapes = {
        "model.layers.0.mlp.experts.gate_up_proj.weight": (E, 2 * MI, H),
        "model.layers.0.mlp.experts.down_proj.weight": (E, H, MI),
    }
    plan = plan_matrices(shapes)
    assert len(plan.matrices) == 3 * E
    assert plan.by_key()[0, "mlp.experts.0.up_proj"].rows == (MI, 2 * MI)


# --- several block stacks ---------------------------------------------------------------------------------------


def test_multiple_block_stacks_end_to_end(tmp_path):
    shapes = {}
    for i in range(2):
        p = f"model.language_model.layers.{i}."
        shapes |= {p + f"self_attn.{m}_proj.weight": (H, H) for m in "qkvo"}
        shapes |= {
            p + "mlp.gate_proj.weight": (INTER, H),
            p + "mlp.up_proj.weight": (INTER, H),
            p + "mlp.down_proj.weight": (H, INTER),
        }
    shapes |= {
        "model.vision_tower.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.vision_tower.layers.0.mlp.fc1.weight": (12, 8),
        "model.vision_tower.layers.1.self_attn.q_proj.weight": (8, 8),
        "model.multi_modal_projector.linear.weight": (H, 8),
    }
    sd = random_state_dict(shapes, torch.float32)
    plan = plan_matrices(shapes)
    keys = _keys(plan)
    assert keys == sorted(keys, key=_natural_key)
    assert (0, "self_attn.q_proj") in keys and (0, "model.vision_tower/self_attn.q_proj") in keys
    assert (0, "model.vision_tower/mlp.fc1") in keys and (1, "model.vision_tower/self_attn.q_proj") in keys
    assert "model.multi_modal_projector.linear.weight" in plan.skipped
    expected = {}
    for name, t in sd.items():
        for prefix, tag in (
            ("model.language_model.layers.", ""),
            ("model.vision_tower.layers.", "model.vision_tower/"),
        ):
            if name.startswith(prefix):
                layer, rest = name[len(prefix) :].split(".", 1)
                expected[int(layer), tag + rest[: -len(".weight")]] = t
    _e2e(tmp_path / "c", sd, expected)


def test_qkv_in_a_secondary_stack_is_split_too():
    shapes = {f"model.layers.{i}.mlp.down_proj.weight": (H, INTER) for i in range(3)}
    shapes["vision.blocks.0.attn.qkv_proj.weight"] = (24, 8)
    by = plan_matrices(shapes).by_key()
    assert by[0, "vision/attn.k_proj"].rows == (8, 16)


# --- fuzzing ------------------------------------------------------------------------------------------------------

TOKENS = [
    "model",
    "transformer",
    "bert",
    "encoder",
    "language_model",
    "vision_tower",
    "layers",
    "layer",
    "h",
    "blocks",
    "0",
    "1",
    "2",
    "10",
    "self_attn",
    "attn",
    "mlp",
    "experts",
    "q_proj",
    "qkv_proj",
    "c_attn",
    "W_pack",
    "c_fc",
    "c_proj",
    "gate_up_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate",
    "weight",
    "bias",
    "embed_tokens",
    "lm_head",
    "norm",
    "",
    "x",
]
FUZZ_CONFIGS = [
    None,
    {},
    {"model_type": "gpt2"},
    {"model_type": "gpt2", "n_head": 3},
    QWEN3_CONFIG,
    PHI3_CONFIGS["no-head_dim"],
    {"model_type": "gptj"},
    {"hidden_size": 4},
    {"num_attention_heads": 2},
]

names_st = st.one_of(
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=8).map(".".join),
    st.text(max_size=30),
)
shapes_st = st.dictionaries(names_st, st.lists(st.integers(0, 9), max_size=4), max_size=12)


def _check_geometry(ref, stored):
    """The ref describes a real cut of the stored tensor whose (out, in) shape is ref.shape."""
    if ref.expert is None:
        assert len(stored) == 2
        mat = stored
    else:
        assert len(stored) == 3 and 0 <= ref.expert < stored[0]
        mat = stored[1:]
    out_dim, in_dim = (mat[1], mat[0]) if ref.transpose else mat
    if ref.rows is None:
        assert ref.shape == (out_dim, in_dim)
    else:
        start, stop = ref.rows
        assert 0 <= start <= stop <= out_dim
        assert ref.shape == (stop - start, in_dim)


@settings(max_examples=300, deadline=None)
@given(shapes=shapes_st, config=st.sampled_from(FUZZ_CONFIGS), include_globals=st.booleans())
def test_plan_matrices_fuzz(shapes, config, include_globals):
    try:
        plan = plan_matrices(shapes, config, include_globals)
    except ValueError:
        return
    keys = _keys(plan)
    assert keys == sorted(keys, key=_natural_key) and len(set(keys)) == len(keys)
    for ref in plan.matrices:
        assert ref.tensor in shapes
        _check_geometry(ref, tuple(shapes[ref.tensor]))
        if ref.layer == GLOBAL_LAYER:
            assert include_globals
    assert set(plan.skipped) <= set(shapes)
    assert not set(plan.skipped) & {r.tensor for r in plan.matrices}


def _open_and_plan(data: bytes) -> None:
    """open_checkpoint + plan on a directory holding ``data`` as model.safetensors: only CheckpointErrors."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.safetensors").write_bytes(data)
        with contextlib.suppress(CheckpointError):
            open_checkpoint(d).plan()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_open_checkpoint_random_bytes(data):
    _open_and_plan(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.binary(max_size=64), st.integers(-8, 8))
def test_open_checkpoint_random_header_after_valid_length(header, data, skew):
    n = max(0, len(header) + skew)
    _open_and_plan(struct.pack("<Q", n) + header + data)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=False), st.text(max_size=5))
json_value = st.recursive(
    json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6
)
entry_st = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "BF16", "F16", "I8", "F8_E4M3", "XX"]) | json_value,
            "shape": st.lists(st.integers(-1, 6), max_size=3) | json_value,
            "data_offsets": st.lists(st.integers(-1, 80), min_size=2, max_size=2) | json_value,
        }
    ),
)
header_st = st.dictionaries(
    st.sampled_from(
        ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.experts.gate_up_proj", "__metadata__", "w", ""]
    )
    | st.text(max_size=8),
    entry_st,
    max_size=4,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_st, st.binary(max_size=80))
def test_open_checkpoint_structured_headers(header, data):
    raw = json.dumps(header).encode()
    _open_and_plan(struct.pack("<Q", len(raw)) + raw + data)


def test_experts_sort_numerically():
    shapes = {f"model.layers.0.mlp.experts.{e}.down_proj.weight": (8, 4) for e in (10, 2, 1)}
    plan = plan_matrices(shapes, {})
    assert [m.module for m in plan.matrices] == [f"mlp.experts.{e}.down_proj" for e in (1, 2, 10)]


def test_qkv_sizes_from_a_multimodal_text_config():
    config = {"model_type": "llava", "text_config": {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 4}}
    shapes = {"language_model.model.layers.0.self_attn.qkv_proj.weight": (4 * 4 + 2 * 4, 16)}
    plan = plan_matrices(shapes, config)
    rows = {m.module: m.rows for m in plan.matrices}
    assert rows == {"self_attn.q_proj": (0, 16), "self_attn.k_proj": (16, 20), "self_attn.v_proj": (20, 24)}
