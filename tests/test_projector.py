"""SubspaceProjector on a real tiny Qwen3 model, and V_K from real checkpoints against a numpy float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd_lens.checkpoints import open_checkpoint
from opd_lens.errors import CheckpointWarning
from opd_lens.locking import SubspaceError, SubspaceProjector, Subspaces, subspaces_from_checkpoint
from opd_lens.testing import qwen3_config, write_planted_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 4


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return Qwen3ForCausalLM(config).to(dtype)


def random_subspaces(model: torch.nn.Module, k: int = K, two_sided: bool = False) -> Subspaces:
    """Random orthonormal bases for every 2-D weight inside the numbered layers."""
    gen = torch.Generator().manual_seed(1)
    weights = {n: p for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2}

    def basis(d):
        return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64)).Q

    right = {n: basis(p.shape[1]) for n, p in weights.items()}
    left = {n: basis(p.shape[0]) for n, p in weights.items()} if two_sided else None
    return Subspaces(k, right, left)


def train(model, optimizer, steps: int = 20, on_backward=None) -> None:
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        tokens = torch.randint(0, 16, (4, 12), generator=gen)
        model(input_ids=tokens, labels=tokens).loss.backward()
        if on_backward:
            on_backward()
        optimizer.step()
        optimizer.zero_grad()


def snapshot(model, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().double().clone() for n in names}


def leak(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor | None = None) -> float:
    """‖x − x V Vᵀ‖ / ‖x‖ (left side with ``u``: ‖x − U Uᵀ x‖ / ‖x‖), in float64."""
    x = x.double()
    p = x @ v.double() @ v.double().T if u is None else u.double() @ u.double().T @ x
    return float(torch.linalg.norm(x - p) / torch.linalg.norm(x))


def max_leaks(model, before, subspaces, left: bool = False) -> float:
    now = snapshot(model, before)
    if left:
        return max(leak(now[n] - before[n], None, subspaces.left[n]) for n in before)
    return max(leak(now[n] - before[n], subspaces.right[n]) for n in before)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


# --- update mode ---------------------------------------------------------------------------------------------------


def test_update_mode_keeps_delta_w_in_the_span_under_adamw():
    model = tiny_model()
    subspaces = random_subspaces(model)
    before = snapshot(model, subspaces.right)
    optimizer = adamw(model)
    with SubspaceProjector(subspaces, mode="update").attach(model, optimizer):
        train(model, optimizer)
    assert len(before) == 7
    assert min(float(torch.linalg.norm(w - before[n])) for n, w in snapshot(model, before).items()) > 1e-3
    assert max_leaks(model, before, subspaces) <= 1e-5


def test_without_the_projector_adamw_leaves_the_span():
    model = tiny_model()
    subspaces = random_subspaces(model)
    before = snapshot(model, subspaces.right)
    optimizer = adamw(model)
    train(model, optimizer)
    assert max_leaks(model, before, subspaces) > 0.5


def test_update_mode_needs_the_optimizer():
    with pytest.raises(SubspaceError, match="optimizer"):
        SubspaceProjector(random_subspaces(tiny_model()), mode="update").attach(tiny_model())


# --- gradient mode -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_mode_projects_every_gradient_and_sgd_stays_in_the_span(dtype):
    model = tiny_model(dtype=dtype)
    subspaces = random_subspaces(model)
    params = dict(model.named_parameters())
    before = snapshot(model, subspaces.right)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    leaks = []

    def check_gradients():
        leaks.extend(leak(params[n].grad, v) for n, v in subspaces.right.items())

    with SubspaceProjector(subspaces).attach(model):
        train(model, optimizer, on_backward=check_gradients)
    assert len(leaks) == 20 * 7
    assert max(leaks) <= 1e-6
    # float32 weights: each step's W - lr·g rounds W (~6e-8 ‖W‖), and that leak accumulates over the steps
    assert max_leaks(model, before, subspaces) <= (1e-5 if dtype == torch.float64 else 1e-4)
    # unconstrained parameters still train
    assert not torch.equal(params["model.norm.weight"], tiny_model(dtype=dtype).model.norm.weight)


def test_gradient_mode_with_adam_leaks_as_the_reference_says():
    model = tiny_model()
    subspaces = random_subspaces(model)
    before = snapshot(model, subspaces.right)
    optimizer = adamw(model)
    with SubspaceProjector(subspaces).attach(model):
        train(model, optimizer)
    assert max_leaks(model, before, subspaces) > 0.1


# --- two-sided and detach ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gradient", "update"])
def test_two_sided_keeps_both_sides_in_the_span(mode):
    model = tiny_model(dtype=torch.float64)  # the rank-(4, 4) update is so small that float32 rounding of W would leak
    subspaces = random_subspaces(model, two_sided=True)
    before = snapshot(model, subspaces.right)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5) if mode == "gradient" else adamw(model)
    with SubspaceProjector(subspaces, mode=mode, two_sided=True).attach(model, optimizer):
        train(model, optimizer, steps=10)
    assert max_leaks(model, before, subspaces) <= 1e-5
    assert max_leaks(model, before, subspaces, left=True) <= 1e-5


@pytest.mark.parametrize("mode", ["gradient", "update"])
def test_detach_restores_unconstrained_training(mode):
    model = tiny_model()
    subspaces = random_subspaces(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    projector = SubspaceProjector(subspaces, mode=mode).attach(model, optimizer)
    train(model, optimizer, steps=3)
    projector.detach()
    before = snapshot(model, subspaces.right)
    train(model, optimizer, steps=3)
    assert max_leaks(model, before, subspaces) > 0.5
    projector.attach(model, optimizer)  # attachable again once detached
    projector.detach()


def test_attach_binds_by_exact_name():
    model = tiny_model()
    subspaces = random_subspaces(model)
    renamed = Subspaces(K, {f"x.{n}": v for n, v in subspaces.right.items()})
    with pytest.raises(SubspaceError, match="no subspace names a parameter"):
        SubspaceProjector(renamed).attach(model)
    partly = Subspaces(
        K, {**subspaces.right, "model.layers.9.mlp.up_proj.weight": subspaces.right[next(iter(subspaces.right))]}
    )
    with pytest.warns(UserWarning, match="1 subspaces name no parameter"), SubspaceProjector(partly).attach(model):
        pass
    with pytest.raises(SubspaceError, match="left bases"):
        SubspaceProjector(subspaces, two_sided=True)
    with pytest.raises(ValueError, match="mode"):
        SubspaceProjector(subspaces, mode="weights")
    projector = SubspaceProjector(subspaces).attach(model)
    with pytest.raises(SubspaceError, match="already attached"):
        projector.attach(model)
    projector.detach()
    wrong = Subspaces(K, {"model.layers.0.mlp.down_proj.weight": subspaces.right["model.layers.0.mlp.up_proj.weight"]})
    with pytest.raises(SubspaceError, match="down_proj.weight' has shape"):
        SubspaceProjector(wrong).attach(model)


# --- subspaces from checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A run whose update is exactly rank 4 (no sparse part), stored in float32."""
    root = tmp_path_factory.mktemp("planted")
    config = qwen3_config(layers=2, hidden=32, intermediate=48)
    origin, run = write_planted_run(root, config=config, steps=(10, 20), rank=4, density=0.0, dtype=torch.float32)
    return origin, run / "checkpoint-10"


def numpy_bases(origin, checkpoint, name, k):
    w0 = load_file(str(origin / "model.safetensors"))[name].astype(np.float64)
    wt = load_file(str(checkpoint / "model.safetensors"))[name].astype(np.float64)
    u, _, vt = np.linalg.svd(wt - w0)
    return u[:, :k], vt[:k].T


def projector_distance(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


def test_subspaces_match_a_numpy_svd_oracle(planted):
    origin, checkpoint = planted
    subspaces = subspaces_from_checkpoint(origin, checkpoint, K=4, two_sided=True)
    expected = [n for n in open_checkpoint(origin).tensors if ".layers." in n and n.endswith("proj.weight")]
    assert sorted(subspaces.right) == sorted(expected) and len(expected) == 14
    for name in expected:
        u_np, v_np = numpy_bases(origin, checkpoint, name, 4)
        v, u = subspaces.right[name], subspaces.left[name]
        assert v.dtype == torch.float32 and v.shape == (v_np.shape[0], 4) and u.shape == (u_np.shape[0], 4)
        assert projector_distance(v, v_np) <= 1e-5
        assert projector_distance(u, u_np) <= 1e-5


def test_subspaces_cap_k_and_filter_names(planted):
    origin, checkpoint = planted
    subspaces = subspaces_from_checkpoint(open_checkpoint(origin), open_checkpoint(checkpoint), K=1000)
    assert subspaces.k == 1000 and subspaces.left is None
    for name, v in subspaces.right.items():
        w = open_checkpoint(origin).read(name)
        assert v.shape == (w.shape[1], min(w.shape))
    name = "model.layers.1.self_attn.o_proj.weight"
    assert list(subspaces_from_checkpoint(origin, checkpoint, K=2, names=[name]).right) == [name]
    with pytest.raises(SubspaceError, match="lm_head.weight"):
        subspaces_from_checkpoint(origin, checkpoint, names=["lm_head.weight"])


def test_fused_tensors_are_skipped_with_a_warning(tmp_path):
    config = qwen3_config(layers=1, hidden=16, intermediate=24) | {"model_type": "phi3"}
    origin, run = write_planted_run(tmp_path, config=config, steps=(5,), density=0.0)
    for path in (origin, run / "checkpoint-5"):  # fuse gate and up as Phi-3 stores them
        ckpt = open_checkpoint(path)
        tensors = {n: ckpt.read(n) for n in ckpt.tensors}
        prefix = "model.layers.0.mlp."
        fused = torch.cat([tensors.pop(prefix + "gate_proj.weight"), tensors.pop(prefix + "up_proj.weight")])
        save_file(tensors | {prefix + "gate_up_proj.weight": fused}, str(path / "model.safetensors"))
    with pytest.warns(CheckpointWarning, match="gate_up_proj"):
        subspaces = subspaces_from_checkpoint(origin, run / "checkpoint-5", K=2)
    assert len(subspaces.right) == 5 and not any("gate" in n for n in subspaces.right)


def test_save_load_round_trip_is_bit_exact(planted, tmp_path):
    origin, checkpoint = planted
    for two_sided in (False, True):
        subspaces = subspaces_from_checkpoint(origin, checkpoint, K=3, two_sided=two_sided)
        loaded = Subspaces.load(subspaces.save(tmp_path / "v.safetensors"))
        assert loaded.k == 3 and list(loaded.right) == list(subspaces.right)
        assert (loaded.left is None) == (not two_sided)
        for side in ("right", "left") if two_sided else ("right",):
            for name, basis in getattr(subspaces, side).items():
                assert torch.equal(getattr(loaded, side)[name], basis)


def test_loading_something_else_is_a_clear_error(planted, tmp_path):
    origin, _ = planted
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SubspaceError, match=f"{bad}: not a readable opd_lens subspaces file"):
        Subspaces.load(bad)
    model_file = origin / "model.safetensors"
    with pytest.raises(SubspaceError, match=f"{model_file}: .*no opd_lens subspaces metadata"):
        Subspaces.load(model_file)
    with pytest.raises(SubspaceError, match="missing.safetensors"):
        Subspaces.load(tmp_path / "missing.safetensors")
