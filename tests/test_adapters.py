"""PEFT LoRA adapters: real adapters saved by peft (and by a real transformers Trainer) against real base models.

Oracles: peft's own merge (``merge_and_unload``) for ΔW, the dense float64 diagnostics of W_0 + ΔW for every
metric, and numpy's SVD for the factor spectrum.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import opd_lens
from opd_lens.checkpoints import find_checkpoints, matched_matrices, open_checkpoint, save_checkpoint
from opd_lens.cli import main
from opd_lens.diagnostics import (
    Settings,
    lora_diagnostics,
    lora_spectrum,
    lora_weight,
    matrix_diagnostics,
    origin_factors,
    sim_k,
)
from opd_lens.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, ShapeMismatchError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

QWEN = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "tie_word_embeddings": False,
}
STEPS = (1, 2, 3)
EXACT = Settings(exact=True, lock_k=2, hill_k=2, angle_k=8, mask_rank=4)
"""K and the Hill k at most the smallest adapter rank, so the dense and factor paths compare every metric."""


def _base(path, seed=0):
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN)).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def _load_base(path):
    return transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32)


def _lora_run(run, base, steps=STEPS, seed=1, **config):
    """Adapters whose B grows with the step, saved by peft's ``save_pretrained`` as a trainer would."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False} | config
    model = peft.get_peft_model(_load_base(base), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    b0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    for t in steps:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in b0:
                    p.copy_(b0[n].sign() * 1e-4 * t + 2e-5 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(run / f"checkpoint-{t}")
    return run


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = _base(root / "base")
    run = _lora_run(
        root / "run",
        base,
        target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"],
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"q_proj": 3},
    )
    return base, run


def _merged_delta(base, adapter):
    """ΔW by peft's own merge, float32, by tensor name."""
    merged = peft.PeftModel.from_pretrained(_load_base(base), adapter).merge_and_unload().state_dict()
    return {name: merged[name].double() - w.double() for name, w in _load_base(base).state_dict().items()}


# --- reading ------------------------------------------------------------------------------------------------------


def test_read_lora_equals_peft_merge(zoo):
    base, run = zoo
    origin = open_checkpoint(base)
    for step in STEPS:
        ckpt = open_checkpoint(run / f"checkpoint-{step}")
        refs = matched_matrices(origin, ckpt)
        assert {r.module for r in refs} == {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.gate_proj"}
        delta = _merged_delta(base, ckpt.path)
        for ref in refs:
            left, right = ckpt.read_lora(ref)
            got, want = left @ right, delta[ref.tensor]
            assert got.shape == want.shape == ref.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)  # peft merges in float32: W_0 rounds


def test_scales_follow_rslora_and_alpha_pattern(zoo):
    _, run = zoo
    pairs = open_checkpoint(run / "checkpoint-1").adapter.pairs
    q, down, v = (pairs[f"model.layers.0.{m}"] for m in ("self_attn.q_proj", "mlp.down_proj", "self_attn.v_proj"))
    assert (q.rank, q.scale) == (4, 3 / 2)  # alpha_pattern, rsLoRA: α/√r
    assert (down.rank, down.scale) == (2, 8 / math.sqrt(2))  # rank_pattern
    assert (v.rank, v.scale) == (4, 8 / 2)


def test_gpt2_conv1d_fused_qkv_and_embedding(tmp_path):
    """fan_in_fan_out Conv1D (stored [in, out]), c_attn split into q/k/v rows, and an embedding adapter."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
        peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True, init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "run" / "checkpoint-5")
    origin, ckpt = open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "run" / "checkpoint-5")
    refs = matched_matrices(origin, ckpt, include_globals=True)
    modules = {r.module for r in refs}
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.c_proj", "mlp.c_proj", "transformer.wte"} <= modules
    merged = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), ckpt.path
    ).merge_and_unload()
    for ref in refs:
        left, right = ckpt.read_lora(ref)
        full = merged.state_dict()[ref.tensor].double() - origin.read(ref.tensor).double()
        full = full.mT if ref.transpose else full
        want = full if ref.rows is None else full[slice(*ref.rows)]
        torch.testing.assert_close(left @ right, want, rtol=1e-5, atol=1e-7)
    assert len(matched_matrices(origin, ckpt)) == len(refs) - 1  # the embedding is a global: opt-in


# --- diagnostics from the factors ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 40),
    n=st.integers(2, 40),
    r=st.integers(1, 12),
    deficient=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lora_spectrum_equals_numpy_svd(m, n, r, deficient, seed):
    gen = torch.Generator().manual_seed(seed)
    left, right = torch.randn(m, r, generator=gen, dtype=torch.float64), torch.randn(r, n, generator=gen).double()
    if deficient and r > 1:
        left[:, -1] = left[:, 0]  # rank r - 1
    top = lora_spectrum(left, right)
    s = np.linalg.svd((left @ right).numpy(), compute_uv=False)
    k = min(r, m, n)
    np.testing.assert_allclose(top.s[:k].numpy(), s[:k], rtol=0, atol=1e-12 * s[0])
    assert top.v.shape == (n, min(r, n))
    np.testing.assert_allclose((top.v.mT @ top.v).numpy(), np.eye(top.v.shape[1]), atol=1e-12)
    live = int((s[:k] > 1e-9 * s[0]).sum())  # ΔW·v_i = σ_i u_i: the right vectors are singular vectors
    dw_v = (left @ right @ top.v[:, :live]).numpy()
    np.testing.assert_allclose(np.linalg.norm(dw_v, axis=0), s[:live], rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(6, 30),
    n=st.integers(6, 30),
    r=st.integers(2, 6),
    scale=st.sampled_from([1e-4, 1e-3, 3e-2]),
    endpoint=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lora_diagnostics_equal_dense_float64(m, n, r, scale, endpoint, seed):
    """Every metric from the factors equals the exact dense computation on W_t = W_0 + L·R."""
    gen = torch.Generator().manual_seed(seed)
    w0 = (0.05 * torch.randn(m, n, generator=gen)).to(torch.bfloat16)
    left = scale * torch.randn(m, r, generator=gen, dtype=torch.float64)
    right = torch.randn(r, n, generator=gen, dtype=torch.float64)
    o = origin_factors(w0, EXACT)
    got = lora_diagnostics(w0, left, right, EXACT, o, endpoint=endpoint)
    want = matrix_diagnostics(w0, lora_weight(w0, left, right), EXACT, o, endpoint=endpoint)
    for name in ("unchanged_frac", "principal_overlap", "lowmag_overlap"):
        assert getattr(got, name) == getattr(want, name) or (
            math.isnan(getattr(got, name)) and math.isnan(getattr(want, name))
        )
    for name in ("update_fro", "stable_rank", "hill_alpha", "max_angle_u", "max_angle_v", "spectral_shift"):
        a, b = getattr(got, name), getattr(want, name)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-7, abs=1e-9), name
    np.testing.assert_allclose(got.angles_u.numpy(), want.angles_u.numpy(), atol=1e-7)
    s = lora_spectrum(left, right).s
    if float(s[1] - s[2] if r > 2 else s[1]) > 1e-6 * float(s[0]):  # V_2 is defined: a gap after σ_2
        assert float(sim_k(got.lock_basis, want.lock_basis)) == pytest.approx(1.0, abs=1e-8)


def test_rank_below_k_keeps_the_adapter_directions():
    """With r < K the basis holds the r directions (not null-space padding) and Hill α is NaN (σ_k = 0)."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(40, 30, generator=gen).to(torch.bfloat16)
    left, right = torch.randn(40, 3, generator=gen).double(), torch.randn(3, 30, generator=gen).double()
    d = lora_diagnostics(w0, left, right, Settings(exact=True, angle_k=8, mask_rank=4), endpoint=False)
    assert d.lock_basis.shape == (30, 3)
    assert math.isnan(d.hill_alpha)
    q = torch.linalg.qr(right.mT).Q
    assert float(sim_k(d.lock_basis, q)) == pytest.approx(1.0, abs=1e-12)


# --- end to end ---------------------------------------------------------------------------------------------------


def _dense_twin(zoo, root):
    """The same run as full float64 checkpoints W_0 + ΔW, written with the base's names."""
    base, run = zoo
    origin = open_checkpoint(base)
    for c in find_checkpoints(run):
        tensors = {name: origin.read(name) for name in origin.tensors}
        for ref in matched_matrices(origin, c):
            tensors[ref.tensor] = lora_weight(origin.read_matrix(ref), *c.read_lora(ref))
        save_checkpoint(root / f"checkpoint-{c.step}", tensors, step=c.step, config=origin.config)
    return root


def test_store_equals_dense_twin(zoo, tmp_path):
    base, run = zoo
    twin = _dense_twin(zoo, tmp_path / "twin")
    store = opd_lens.open_store(tmp_path / "s", EXACT)
    store.add_run("lora", run, base)
    store.add_run("dense", twin, base)
    report = store.compute(progress=False, endpoint="all")
    assert not report.skipped and len(report.steps) == 6
    ds = store.dataset()
    adapted = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.gate_proj"]
    rest = ["self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj"]
    assert sorted(ds.module.values) == sorted(adapted + rest)
    lora, dense = ds.sel(run="lora"), ds.sel(run="dense")
    for name in ("unchanged_frac", "principal_overlap", "lowmag_overlap"):
        np.testing.assert_array_equal(lora[name].sel(module=adapted), dense[name].sel(module=adapted))
    for name in ("update_fro", "stable_rank", "hill_alpha", "lock_alignment", "max_angle_u", "spectral_shift"):
        np.testing.assert_allclose(lora[name].sel(module=adapted), dense[name].sel(module=adapted), rtol=1e-5)
    # modules the adapter does not touch are absent for the LoRA run, and unchanged in the dense twin
    assert bool(lora.update_fro.sel(module=rest).isnull().all())
    assert bool((dense.unchanged_frac.sel(module=rest) == 1).all())
    assert float(lora.lock_alignment.sel(step=3).min()) == pytest.approx(1.0)


def test_real_trainer_peft_checkpoints(tmp_path):
    """transformers.Trainer with a peft model writes checkpoint-N/adapter_model.safetensors; opd_lens reads the
    series (steps from trainer_state.json) and computes it incrementally."""
    base = _base(tmp_path / "base")
    model = peft.get_peft_model(_load_base(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (32, 12), generator=gen)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=100,
        disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    ckpts = find_checkpoints(tmp_path / "out")
    assert [c.step for c in ckpts] == [2, 4, 6] and all(c.adapter is not None for c in ckpts)
    store = opd_lens.open_store(tmp_path / "s", Settings(angle_k=16, mask_rank=8))
    store.add_run("trl-lora", tmp_path / "out", base, method="sft")
    assert len(store.compute(progress=False).steps) == 3
    assert store.compute(progress=False).matrices_read == 0
    fro = store.dataset().update_fro.sel(run="trl-lora").mean(["layer", "module"]).values
    assert np.all(np.diff(fro) > 0)


# --- errors -------------------------------------------------------------------------------------------------------


def _save_peft(path, base, config):
    peft.get_peft_model(_load_base(base), config).save_pretrained(path)
    return path


def test_dora_and_other_peft_methods_are_refused(zoo, tmp_path):
    base, _ = zoo
    dora = _save_peft(tmp_path / "dora", base, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(CheckpointNotFoundError, match=r"dora.*DoRA.*merge_and_unload"):
        open_checkpoint(dora)
    ia3 = _save_peft(tmp_path / "ia3", base, peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(CheckpointNotFoundError, match=r"adapter_config.json: a PEFT IA3 adapter"):
        open_checkpoint(ia3)


def test_broken_adapters_name_the_file(zoo, tmp_path):
    base, run = zoo
    no_config = tmp_path / "no-config"
    shutil.copytree(run / "checkpoint-1", no_config)
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="adapter_model.safetensors without adapter_config.json"):
        open_checkpoint(no_config)
    bad = tmp_path / "bad-config"
    shutil.copytree(run / "checkpoint-1", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": "sixteen"}))
    with pytest.raises(CorruptCheckpointError, match="lora_alpha .* not a number"):
        open_checkpoint(bad)
    (bad / "adapter_config.json").write_text("{")
    with pytest.raises(CorruptCheckpointError, match="bad-config/adapter_config.json: unreadable"):
        open_checkpoint(bad)
    from safetensors.torch import load_file, save_file

    one_sided = tmp_path / "one-sided"
    shutil.copytree(run / "checkpoint-1", one_sided)
    factors = load_file(one_sided / "adapter_model.safetensors")
    kept = {k: v for k, v in factors.items() if "layers.1.self_attn.q_proj.lora_B" not in k}
    save_file(kept, one_sided / "adapter_model.safetensors")
    with pytest.raises(CorruptCheckpointError, match=r"'model.layers.1.self_attn.q_proj' has no lora_B factor"):
        open_checkpoint(one_sided)


def test_adapter_for_another_base_is_skipped_with_its_module_named(zoo, tmp_path, capsys):
    base, run = zoo
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**dict(QWEN, intermediate_size=40))).to(
        torch.bfloat16
    ).save_pretrained(tmp_path / "other-base")
    with pytest.raises(ShapeMismatchError, match=r"'model.layers.0.mlp.down_proj' make a 32×48 update.*is 32×40"):
        matched_matrices(open_checkpoint(tmp_path / "other-base"), open_checkpoint(run / "checkpoint-1"))
    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    shutil.rmtree(mixed / "checkpoint-2")
    _lora_run(mixed, tmp_path / "other-base", steps=(2,), target_modules=["down_proj"])
    store = opd_lens.open_store(tmp_path / "s", EXACT)
    store.add_run("lora", mixed, base)
    with pytest.warns(UserWarning, match=r"skipping step 2: .*checkpoint-2.*down_proj.*32×40"):
        report = store.compute(progress=False)
    assert [s for _, s in report.steps] == [1, 3] and len(report.skipped) == 1
    cli = ["compute", str(mixed), "--origin", str(base), "--name", "lora", "--store", str(tmp_path / "s")]
    assert main(cli) == 2  # one line, exit 2; nothing new is written
    assert "warning: skipping step 2:" in capsys.readouterr().err


def test_adapter_as_origin_and_cli(zoo, tmp_path, capsys):
    base, run = zoo
    with pytest.raises(CheckpointError, match=r"checkpoint-1: a LoRA adapter; .*\(pass the base model as the origin\)"):
        matched_matrices(open_checkpoint(run / "checkpoint-1"), open_checkpoint(run / "checkpoint-2"))
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "LoRA adapter: 8 modules of rank 2/4" in out and "pass --origin BASE" in out
    assert main(["inspect", str(run), "--origin", str(base)]) == 0
    assert "analysed: 8 matrices" in capsys.readouterr().out
    assert main(["inspect", str(run), "--origin", str(run / "checkpoint-1")]) == 2
    assert "pass the base model as the origin" in capsys.readouterr().err


def test_rank_change_between_steps_leaves_no_common_k(zoo, tmp_path):
    """A run whose adapter rank changes: lock_alignment is NaN where V_K(t) and the last step's differ in size."""
    base, _ = zoo
    run = _lora_run(tmp_path / "run", base, steps=(1, 2), r=2, target_modules=["q_proj"])
    _lora_run(run, base, steps=(3,), r=3, target_modules=["q_proj"])
    store = opd_lens.open_store(tmp_path / "s", Settings(angle_k=8, mask_rank=4))
    store.add_run("lora", run, base)
    store.compute(progress=False)
    sim = store.dataset().lock_alignment.sel(run="lora", module="self_attn.q_proj")
    assert bool(sim.sel(step=[1, 2]).isnull().all()) and bool((sim.sel(step=3) == 1).all())


def test_prime_rl_lora_adapters_subdirectory(zoo, tmp_path):
    """prime-rl keeps adapters in weights/step_N/lora_adapters/: found, and computed like the same adapters
    in checkpoint-N/."""
    base, run = zoo
    for step in STEPS:
        shutil.copytree(run / f"checkpoint-{step}", tmp_path / "prime" / "weights" / f"step_{step}" / "lora_adapters")
    ckpts = find_checkpoints(tmp_path / "prime")
    assert [c.step for c in ckpts] == list(STEPS) and all(c.adapter is not None for c in ckpts)
    store = opd_lens.open_store(tmp_path / "s", EXACT)
    store.add_run("trl", run, base)
    store.add_run("prime", tmp_path / "prime", base)
    store.compute(progress=False)
    ds = store.dataset()
    for name in ("unchanged_frac", "stable_rank", "lock_alignment"):
        np.testing.assert_array_equal(ds[name].sel(run="trl"), ds[name].sel(run="prime"))


def test_dask_cluster_computes_adapters_as_locally(zoo, tmp_path):
    """Adapter checkpoints travel to worker processes (pickled) and give the store a local compute gives."""
    import xarray as xr

    distributed = pytest.importorskip("dask.distributed")
    base, run = zoo
    stores = {}
    with (
        distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        for where, kwargs in (("local", {}), ("remote", {"client": client})):
            stores[where] = opd_lens.open_store(tmp_path / where, EXACT)
            stores[where].add_run("lora", run, base)
            stores[where].compute(progress=False, endpoint="all", **kwargs)
    xr.testing.assert_identical(stores["local"].dataset().drop_attrs(), stores["remote"].dataset().drop_attrs())


def test_fused_expert_lora_factors_are_refused(zoo, tmp_path):
    from safetensors.torch import save_file

    _, run = zoo
    moe = tmp_path / "moe"
    shutil.copytree(run / "checkpoint-1", moe)
    p = "base_model.model.model.layers.0.mlp.experts.gate_up_proj"
    save_file(
        {f"{p}.lora_A.weight": torch.zeros(4, 2, 32), f"{p}.lora_B.weight": torch.zeros(4, 96, 2)},
        moe / "adapter_model.safetensors",
    )
    with pytest.raises(CheckpointNotFoundError, match=r"experts.gate_up_proj' has 3-D LoRA factors"):
        open_checkpoint(moe)


def test_nonfinite_factors_are_recorded_as_nan_with_one_warning(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    base, run = zoo
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    file = bad / "checkpoint-2" / "adapter_model.safetensors"
    factors = load_file(file)
    factors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(factors, file)
    store = opd_lens.open_store(tmp_path / "s", EXACT)
    store.add_run("lora", bad, base)
    with pytest.warns(UserWarning, match=r"step 2: 1 matrix holds NaN or Inf values \(the LoRA factors of "):
        store.compute(progress=False)
    ds = store.dataset().sel(run="lora")
    v = ds.update_fro.sel(layer=1, module="self_attn.v_proj")
    assert np.isnan(float(v.sel(step=2))) and np.isfinite(float(v.sel(step=3)))
    assert np.isfinite(float(ds.update_fro.sel(step=2, layer=0, module="self_attn.v_proj")))
