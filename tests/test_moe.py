"""MoE models end to end: a tiny Qwen3-MoE run written as real safetensors checkpoints in the three expert layouts
(per-expert keys, transformers v5's fused ``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj`` [E, H, I],
and the fused tensors stored transposed) gives one Dataset, whose per-expert values are the diagnostics of that
expert's matrices, grouped by the ``expert`` and ``projection`` coordinates."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import opd_lens
from opd_lens.checkpoints import checkpoint_path, find_checkpoints, save_checkpoint
from opd_lens.diagnostics import Settings, matrix_diagnostics, sim_k
from opd_lens.testing import write_planted_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, HEADS, KV_HEADS, HEAD_DIM = 24, 4, 2, 6
E, MI, LAYERS = 4, 10, 2  # 2·MI != H and MI != H: the orientation of a transposed fused tensor is unambiguous
STEPS = (10, 20, 30)
CONFIG = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": H,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "num_experts": E,
    "moe_intermediate_size": MI,
    "num_hidden_layers": LAYERS,
    "vocab_size": 32,
}
SET = Settings(angle_k=8, mask_rank=4)
FORMS = ("per-expert", "fused", "fused-transposed")
SCALARS = ("unchanged_frac", "update_fro", "stable_rank", "hill_alpha", "principal_overlap", "lowmag_overlap")
ENDPOINT = ("max_angle_u", "max_angle_v", "spectral_shift")
RTOL, ATOL = 1e-5, 1e-6  # values are stored as float32


def moe_shapes() -> dict[str, tuple[int, ...]]:
    """Per-expert (legacy) Qwen3-MoE names and shapes."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (32, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, H),
            p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H),
            p + "self_attn.o_proj.weight": (H, q),
            p + "self_attn.q_norm.weight": (HEAD_DIM,),
            p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "mlp.gate.weight": (E, H),  # the router
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
        }
        for e in range(E):
            x = f"{p}mlp.experts.{e}."
            shapes |= {x + "gate_proj.weight": (MI, H), x + "up_proj.weight": (MI, H), x + "down_proj.weight": (H, MI)}
    shapes |= {"model.norm.weight": (H,), "lm_head.weight": (32, H)}
    return shapes


def planted_series(seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """bf16 state dicts of the origin (step 0) and the steps: ΔW_t = (t/T)·0.05·rms(W_0)·(rank-2 + sparse)."""
    g = torch.Generator().manual_seed(seed)
    w0 = {n: torch.randn(s, generator=g) / (s[-1] ** 0.5 if len(s) > 1 else 10) for n, s in moe_shapes().items()}
    delta = {}
    for n, w in w0.items():
        if w.ndim == 2:
            m, k = w.shape
            low = torch.randn(m, 2, generator=g) @ torch.randn(2, k, generator=g)
            sparse = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) < 0.3)
            delta[n] = w.pow(2).mean().sqrt() * (low / low.pow(2).mean().sqrt() + sparse)
    series = {0: {n: w.to(torch.bfloat16) for n, w in w0.items()}}
    for t in STEPS:
        f = 0.05 * t / STEPS[-1]
        series[t] = {n: (w + f * delta[n] if n in delta else w).to(torch.bfloat16) for n, w in w0.items()}
    return series


def fused(per_expert: dict[str, torch.Tensor], transposed: bool = False) -> dict[str, torch.Tensor]:
    """The same weights in transformers v5's fused layout ([E, 2I, H] and [E, H, I], no ``.weight``), or stored
    with each expert's matrix transposed ([E, H, 2I] and [E, I, H])."""
    sd = {k: v for k, v in per_expert.items() if ".experts." not in k}
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts."
        pairs = [(per_expert[f"{p}{e}.gate_proj.weight"], per_expert[f"{p}{e}.up_proj.weight"]) for e in range(E)]
        gate_up = torch.stack([torch.cat(pair) for pair in pairs])
        down = torch.stack([per_expert[f"{p}{e}.down_proj.weight"] for e in range(E)])
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        sd[p + "gate_up_proj"], sd[p + "down_proj"] = gate_up.contiguous(), down.contiguous()
    return sd


def write_form(root: Path, series, form: str) -> tuple[Path, Path]:
    """Write the series in one expert layout: (origin dir, run dir of checkpoint-N/)."""
    convert = {
        "per-expert": lambda sd: sd,
        "fused": fused,
        "fused-transposed": lambda sd: fused(sd, transposed=True),
    }[form]
    shard = 6_000 if form == "fused" else None  # one form sharded, with a model.safetensors.index.json
    origin = save_checkpoint(root / form / "origin", convert(series[0]), config=CONFIG, max_shard_bytes=shard)
    run_dir = root / form / "run"
    for t in STEPS:
        sd = convert(series[t])
        save_checkpoint(checkpoint_path(run_dir, t, "hf"), sd, step=t, config=CONFIG, max_shard_bytes=shard)
    return origin, run_dir


def direct(series) -> dict[tuple[int, int, str], object]:
    """(step, layer, module) -> matrix_diagnostics of the in-memory per-expert matrices, without any reader."""
    out = {}
    for t in STEPS:
        for name, w0 in series[0].items():
            if w0.ndim == 2 and name.startswith("model.layers."):
                layer, rest = name[len("model.layers.") :].split(".", 1)
                out[t, int(layer), rest.removesuffix(".weight")] = matrix_diagnostics(w0, series[t][name], SET)
    return out


@pytest.fixture(scope="module")
def series():
    return planted_series()


@pytest.fixture(scope="module")
def stores(series, tmp_path_factory) -> dict[str, opd_lens.Store]:
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for form in FORMS:
        origin, run_dir = write_form(root, series, form)
        store = opd_lens.open_store(root / f"{form}.store", SET)
        store.add_run("moe", run_dir, origin, method="opd")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every layout reads cleanly
            store.compute(progress=False, endpoint="all", device="cpu")
        out[form] = store
    return out


@pytest.fixture(scope="module")
def datasets(stores) -> dict[str, xr.Dataset]:
    return {form: store.dataset() for form, store in stores.items()}


def test_the_layouts_are_what_they_claim(stores):
    names = {}
    for form, store in stores.items():
        ckpt = find_checkpoints(store.runs["moe"]["run_dir"])[-1]
        names[form] = ckpt.tensors
        assert {info.dtype for info in ckpt.tensors.values()} == {"BF16"}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names["per-expert"]
    assert names["fused"]["model.layers.1.mlp.experts.gate_up_proj"].shape == (E, 2 * MI, H)
    assert names["fused"]["model.layers.1.mlp.experts.down_proj"].shape == (E, H, MI)
    assert names["fused-transposed"]["model.layers.1.mlp.experts.gate_up_proj"].shape == (E, H, 2 * MI)
    assert names["fused-transposed"]["model.layers.1.mlp.experts.down_proj"].shape == (E, MI, H)
    assert len({info.file for info in names["fused"].values()}) > 1
    sharded = find_checkpoints(stores["fused"].runs["moe"]["run_dir"])[-1].path
    assert (sharded / "model.safetensors.index.json").is_file()


def test_expert_and_projection_coordinates(datasets):
    ds = datasets["per-expert"]
    assert ds.sizes["module"] == 5 + 3 * E  # q, k, v, o, router and three matrices per expert
    assert ds.expert.dims == ds.projection.dims == ("module",)
    assert ds.expert.dtype == np.int64
    coords = zip(ds.expert.values.tolist(), ds.projection.values.tolist(), strict=True)
    by_module = dict(zip(ds.module.values.tolist(), coords, strict=True))
    assert by_module["mlp.experts.3.down_proj"] == (3, "mlp.experts.down_proj")
    assert by_module["mlp.experts.0.gate_proj"] == (0, "mlp.experts.gate_proj")
    assert by_module["mlp.gate"] == (-1, "mlp.gate")
    assert by_module["self_attn.q_proj"] == (-1, "self_attn.q_proj")
    assert sorted(set(ds.expert.values.tolist())) == [-1, *range(E)]
    assert set(ds.projection.values.tolist()) == {
        "mlp.experts.gate_proj",
        "mlp.experts.up_proj",
        "mlp.experts.down_proj",
        "mlp.gate",
        *(f"self_attn.{p}_proj" for p in "qkvo"),
    }


def test_lazy_dataset_has_the_coordinates(stores, datasets):
    pytest.importorskip("dask")
    lazy = stores["fused"].dataset(lazy=True)
    xr.testing.assert_identical(lazy.expert, datasets["fused"].expert)
    xr.testing.assert_identical(lazy.projection, datasets["fused"].projection)
    xr.testing.assert_allclose(lazy.update_fro.compute(), datasets["fused"].update_fro)


@pytest.mark.parametrize("form", ["fused", "fused-transposed"])
def test_fused_layouts_give_the_per_expert_dataset(datasets, form):
    a, b = datasets["per-expert"].drop_attrs(), datasets[form].drop_attrs()
    for name in ("run", "step", "layer", "module", "expert", "projection", "numel", "method", "progress"):
        xr.testing.assert_identical(a[name], b[name])
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        xr.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=1e-4 if "angle" in name else ATOL)
    assert int(a.update_fro.notnull().sum()) == len(STEPS) * LAYERS * (5 + 3 * E)


@pytest.mark.parametrize("form", FORMS)
def test_per_expert_values_are_the_diagnostics_of_that_experts_matrices(datasets, series, form):
    ds = datasets[form]
    expected = direct(series)
    assert {(layer, module) for _, layer, module in expected} == {
        (int(layer), str(module)) for layer in ds.layer.values for module in ds.module.values
    }
    last = STEPS[-1]
    for (t, layer, module), d in expected.items():
        one = ds.sel(run="moe", step=t, layer=layer, module=module)
        for name in SCALARS + ENDPOINT:
            np.testing.assert_allclose(one[name].values, getattr(d, name), rtol=RTOL, atol=ATOL, err_msg=name)
        lock = float(sim_k(d.lock_basis, expected[last, layer, module].lock_basis))
        np.testing.assert_allclose(one.lock_alignment.values, lock, rtol=RTOL, atol=ATOL)
        for name in ("angles_u", "angles_v"):
            profile = getattr(d, name).numpy()
            np.testing.assert_allclose(one[name].values[: profile.size], profile, rtol=RTOL, atol=1e-4)
            assert np.isnan(one[name].values[profile.size :]).all()


def test_groupby_expert_and_projection_are_numpy_means(datasets):
    ds = datasets["fused-transposed"]
    expert = ds.expert.values
    for var in ("update_fro", "stable_rank"):
        grouped = ds[var].groupby("expert").mean()
        assert grouped.dims == ("run", "step", "layer", "expert")
        assert grouped.expert.values.tolist() == [-1, *range(E)]
        values = ds[var].values  # (run, step, layer, module)
        for e in grouped.expert.values:
            manual = values[..., expert == e].mean(axis=-1)
            np.testing.assert_allclose(grouped.sel(expert=e).values, manual, rtol=1e-6)
    by_proj = ds.update_fro.groupby("projection").mean()
    down = ds.module.values[ds.projection.values == "mlp.experts.down_proj"]
    assert len(down) == E
    manual = ds.update_fro.sel(module=down).values.mean(axis=-1)
    np.testing.assert_allclose(by_proj.sel(projection="mlp.experts.down_proj").values, manual, rtol=1e-6)
    experts_only = ds.update_fro.where(ds.expert >= 0)
    assert bool(experts_only.sel(module="self_attn.q_proj").isnull().all())
    assert bool(experts_only.sel(module="mlp.experts.1.up_proj").notnull().all())


def test_dense_model_has_no_experts(tmp_path):
    origin, run_dir = write_planted_run(tmp_path / "dense", steps=(5, 10, 15))
    store = opd_lens.open_store(tmp_path / "store", SET)
    store.add_run("dense", run_dir, origin)
    store.compute(progress=False, device="cpu")
    ds = store.dataset()
    assert ds.sizes["module"] == 7
    assert (ds.expert.values == -1).all()
    assert ds.expert.dtype == np.int64
    assert ds.projection.values.tolist() == ds.module.values.tolist()
    assert ds.update_fro.groupby("expert").mean().sizes["expert"] == 1
