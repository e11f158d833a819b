"""Torch distributed checkpoints (DCP) as HF Trainer/Accelerate FSDP and prime-rl write them, and the layouts opd_lens
does not read (DeepSpeed ZeRO, verl FSDP shards, Megatron dist_ckpt), which stop with the converter to run.

Every DCP directory is written by ``torch.distributed.checkpoint.save`` (in-process without a process group, or by
two real gloo ranks); every foreign tree holds real ``torch.save`` files with the names those trainers use.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import random_state_dict, tiny_config

import opd_lens
from opd_lens.checkpoints import find_checkpoints, open_checkpoint, save_checkpoint
from opd_lens.cli import main
from opd_lens.diagnostics import Settings
from opd_lens.errors import CheckpointNotFoundError, CheckpointWarning, CorruptCheckpointError
from opd_lens.schema import SCALARS
from opd_lens.testing import qwen3_config, qwen3_shapes, write_planted_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = qwen3_config(layers=1, hidden=32, intermediate=48)
SET = Settings(angle_k=16)
Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
OUT = "<out_dir>"


# --- writing checkpoints as the trainers do --------------------------------------------------------------------------


def dcp_save(state: dict, path: Path) -> Path:
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=path, no_dist=True)
    return path


def adam_state(sd: dict[str, torch.Tensor]) -> dict:
    """An optimizer state dict keyed by parameter names, as ``get_state_dict`` returns it."""
    state = {
        n: {"step": torch.tensor(5.0), "exp_avg": t.float() * 0.1, "exp_avg_sq": t.float() ** 2} for n, t in sd.items()
    }
    return {"state": state, "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": list(sd)}]}


def write_hf_fsdp(step_dir: Path, sd: dict[str, torch.Tensor], step: int, config: dict | None = None) -> Path:
    """HF Trainer with FSDP ``SHARDED_STATE_DICT``: Accelerate's ``{"model": sd}`` in ``pytorch_model_fsdp_0/``,
    ``{"optimizer": ...}`` in ``optimizer_0/``, trainer state and config beside them."""
    dcp_save({"model": sd}, step_dir / "pytorch_model_fsdp_0")
    dcp_save({"optimizer": adam_state(sd)}, step_dir / "optimizer_0")
    (step_dir / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (step_dir / "config.json").write_text(json.dumps(config or CONFIG))
    torch.save({"last_epoch": step}, step_dir / "scheduler.pt")
    return step_dir


def write_prime_rl(step_dir: Path, sd: dict[str, torch.Tensor], step: int, legacy: bool = False) -> Path:
    """prime-rl's ``{"app": AppState}`` in ``checkpoints/step_N/trainer/`` (before September 2025: ``step_N/``
    itself), the orchestrator's progress beside it."""
    app = {
        "model": sd,
        "optimizers": adam_state(sd),
        "scheduler": {"last_epoch": step, "_step_count": step + 1},
        "progress": {"step": step, "total_tokens": 4096 * step, "total_samples": 8 * step},
    }
    dcp_save({"app": app}, step_dir if legacy else step_dir / "trainer")
    if not legacy:
        (step_dir / "orchestrator").mkdir()
        torch.save({"progress": {"step": step}}, step_dir / "orchestrator" / "progress.pt")
    return step_dir


WRITERS = {
    "hf-fsdp": lambda run, sd, step: write_hf_fsdp(run / f"checkpoint-{step}", sd, step),
    "prime-rl": lambda run, sd, step: write_prime_rl(run / "checkpoints" / f"step_{step}", sd, step),
    "prime-rl-legacy": lambda run, sd, step: write_prime_rl(run / "checkpoints" / f"step_{step}", sd, step, True),
}


def dcp_twin(src_run: Path, dst_run: Path, layout: str) -> Path:
    """The checkpoints of ``src_run`` (safetensors) written again as DCP in ``layout``."""
    for ckpt in find_checkpoints(src_run):
        WRITERS[layout](dst_run, {name: ckpt.read(name) for name in ckpt.tensors}, ckpt.step)
    return dst_run


def data_region(metadata_dir: Path, key: str) -> tuple[Path, int, int]:
    """(data file, offset, length) of ``key``'s one chunk, from DCP's own metadata reader."""
    md = dcp.FileSystemReader(metadata_dir).read_metadata()
    [(file, offset, length)] = [
        (metadata_dir / s.relative_path, s.offset, s.length) for i, s in md.storage_data.items() if i.fqn == key
    ]
    return file, offset, length


def overwrite(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- reading DCP ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", list(WRITERS))
def test_every_tensor_read_equals_the_source(tmp_path, layout, dtype):
    sd = random_state_dict(qwen3_shapes(tiny_config(2)), dtype)
    step_dir = WRITERS[layout](tmp_path, sd, 7)
    ckpt = open_checkpoint(step_dir)
    assert ckpt.path == step_dir
    assert set(ckpt.tensors) == set(sd)  # HF names: no wrapper prefix, no optimizer state, no scheduler/progress
    name = {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    for n, t in sd.items():
        assert ckpt.tensors[n].dtype == name and ckpt.tensors[n].shape == tuple(t.shape)
        got = ckpt.read(n)
        assert got.dtype == dtype and torch.equal(got, t), n
    # the analysed matrices (rows cut by the plan) equal those of the same weights written as safetensors
    twin = open_checkpoint(save_checkpoint(tmp_path / "twin", sd, config=ckpt.config or None))
    refs = ckpt.plan().matrices
    assert [r.tensor for r in refs] == [r.tensor for r in twin.plan().matrices] and len(refs) == 14
    for ref in refs:
        assert torch.equal(ckpt.read_matrix(ref), twin.read_matrix(ref)), ref


def test_reads_are_per_tensor_and_a_garbled_tensor_names_its_file(tmp_path):
    sd = random_state_dict(qwen3_shapes(tiny_config(1)), torch.bfloat16)
    fsdp = write_hf_fsdp(tmp_path / "checkpoint-1", sd, 1) / "pytorch_model_fsdp_0"
    file, offset, length = data_region(fsdp, f"model.{DOWN}")
    overwrite(file, offset, b"\xff" * length)  # only down_proj's bytes: the file keeps its size
    ckpt = open_checkpoint(tmp_path / "checkpoint-1")  # the metadata and file sizes are intact
    for n, t in sd.items():
        if n != DOWN:
            assert torch.equal(ckpt.read(n), t), n  # never touches down_proj's bytes
    with pytest.raises(CorruptCheckpointError) as ei:
        ckpt.read(DOWN)
    assert str(file) in str(ei.value) and repr(DOWN) in str(ei.value) and "\n" not in str(ei.value)


def test_fingerprint_covers_the_data_files(tmp_path):
    sd = random_state_dict(qwen3_shapes(tiny_config(1)), torch.float32)
    step_dir = write_prime_rl(tmp_path / "step_1", sd, 1)
    before = open_checkpoint(step_dir).fingerprint
    assert open_checkpoint(step_dir).fingerprint == before
    file, offset, _ = data_region(step_dir / "trainer", f"app.model.{Q}")
    overwrite(file, offset + 8, b"\x01")  # one byte of weights changes; .metadata does not
    assert open_checkpoint(step_dir).fingerprint != before


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_rank_sharded_checkpoint_reads_whole_tensors(tmp_path):
    """FSDP2-style DTensor shards (rows, and one tensor by columns), uneven, written by two real gloo ranks."""
    g = torch.Generator().manual_seed(3)
    sd = {
        Q: torch.randn(7, 6, generator=g).bfloat16(),
        DOWN: torch.randn(6, 9, generator=g),
        "model.norm.weight": torch.randn(5, generator=g),
    }
    torch.save(sd, tmp_path / "sd.pt")
    out = tmp_path / "run" / "checkpoints" / "step_3" / "trainer"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [str(tmp_path / "store"), str(tmp_path / "sd.pt"), str(out)]
    ranks = [subprocess.Popen([sys.executable, "-c", TWO_RANKS, str(r), *args], env=env) for r in range(2)]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    [ckpt] = find_checkpoints(tmp_path / "run")
    assert ckpt.step == 3 and set(ckpt.tensors) == set(sd)
    for n, t in sd.items():
        assert torch.equal(ckpt.read(n), t), n


TWO_RANKS = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
rank, store, src, out = int(sys.argv[1]), *sys.argv[2:]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
mesh = init_device_mesh("cpu", (2,))
sd = torch.load(src)
model = {k: distribute_tensor(v, mesh, [Shard(1 if k.endswith("down_proj.weight") else 0)]) for k, v in sd.items()}
optim = {"state": {k: {"exp_avg": distribute_tensor(v.float(), mesh, [Shard(0)])} for k, v in sd.items()}}
dcp.save({"app": {"model": model, "optimizers": optim}}, checkpoint_id=out)
dist.destroy_process_group()
# The checkpoint is complete here. torch's gloo teardown at interpreter exit aborts now and then ("terminate called
# without an active exception", rc -6) after everything is written, so leave without running it.
sys.stdout.flush(); sys.stderr.flush()
import os; os._exit(0)
"""


# --- discovery and compute ----------------------------------------------------------------------------------------


def _no_warnings(run: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return find_checkpoints(run)


def test_find_checkpoints_in_each_dcp_layout(tmp_path):
    sd = random_state_dict(qwen3_shapes(tiny_config(1)), torch.bfloat16)
    for layout in WRITERS:
        run = tmp_path / layout
        for step in (20, 5, 10):
            WRITERS[layout](run, sd, step)
        top, name = (run, "checkpoint-{}") if layout == "hf-fsdp" else (run / "checkpoints", "step_{}")
        for where in {run, top}:  # prime-rl: the output directory or its checkpoints/
            ckpts = _no_warnings(where)
            assert [c.step for c in ckpts] == [5, 10, 20], (layout, where)
            assert [c.path for c in ckpts] == [top / name.format(s) for s in (5, 10, 20)]
            assert all(set(c.tensors) == set(sd) for c in ckpts)


def test_prime_rl_prefers_its_hf_weights_over_dcp(tmp_path):
    sd = random_state_dict(qwen3_shapes(tiny_config(1)), torch.bfloat16)
    for step in (1, 2):
        WRITERS["prime-rl"](tmp_path, sd, step)
        save_checkpoint(tmp_path / "weights" / f"step_{step}", sd)
    assert [c.path for c in _no_warnings(tmp_path)] == [tmp_path / "weights" / f"step_{s}" for s in (1, 2)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A safetensors run of steps 1-4 from its origin, and the reference Dataset computed from it."""
    root = tmp_path_factory.mktemp("planted")
    origin, run = write_planted_run(root, config=CONFIG, steps=(1, 2, 3, 4))
    reference = opd_lens.compute(root / "store", run, origin=origin, name="r", settings=SET, progress=False)
    return origin, run, reference


def same_values(a, b, steps=None) -> None:
    if steps is not None:
        b = b.sel(step=steps)
    for dim in ("step", "layer", "module"):
        assert a[dim].values.tolist() == b[dim].values.tolist(), dim
    for name in (*SCALARS, "angles_u", "angles_v"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-6, atol=0, err_msg=name)


@pytest.mark.parametrize("layout", ["hf-fsdp", "prime-rl"])
def test_compute_on_a_dcp_run_equals_the_safetensors_run(planted, tmp_path, layout):
    origin, run, reference = planted
    twin = dcp_twin(run, tmp_path / "run", layout)
    ds = opd_lens.compute(tmp_path / "store", twin, origin=origin, name="r", settings=SET, progress=False)
    same_values(ds, reference)


def test_bad_dcp_steps_are_skipped_with_one_line_naming_the_file(planted, tmp_path):
    origin, run, reference = planted
    twin = dcp_twin(run, tmp_path / "run", "hf-fsdp")
    truncated = twin / "checkpoint-2" / "pytorch_model_fsdp_0" / "__0_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:-100])  # found when the run is opened
    file, offset, length = data_region(twin / "checkpoint-3" / "pytorch_model_fsdp_0", f"model.{Q}")
    overwrite(file, offset, b"\0" * length)  # found when q_proj is read
    store = opd_lens.open_store(tmp_path / "store", SET)
    with pytest.warns(CheckpointWarning):
        store.add_run("r", twin, origin)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        report = store.compute(progress=False)
    assert [s for _, s in report.steps] == [1, 4]
    [two] = [line for line in report.skipped if "checkpoint-2" in line]
    [three] = [line for line in report.skipped if "checkpoint-3" in line]
    assert f"{truncated}: truncated or still being written" in two
    assert str(file) in three and f"cannot read tensor {Q!r}" in three
    assert all("\n" not in line for line in report.skipped)
    same_values(store.dataset(), reference, steps=[1, 4])


def test_garbled_or_hostile_metadata_is_refused_naming_it(tmp_path):
    sd = random_state_dict(qwen3_shapes(tiny_config(1)), torch.bfloat16)
    for step in (1, 2, 3):
        write_prime_rl(tmp_path / f"step_{step}", sd, step)
    garbled = tmp_path / "step_2" / "trainer" / ".metadata"
    garbled.write_bytes(garbled.read_bytes()[:50])
    marker = tmp_path / "ran"
    hostile = tmp_path / "step_3" / "trainer" / ".metadata"
    hostile.write_bytes(pickle.dumps(_RunsCode(str(marker))))  # unpickled by plain pickle, it would create marker
    with pytest.warns(CheckpointWarning) as rec:
        ckpts = find_checkpoints(tmp_path)
    assert [c.step for c in ckpts] == [1]
    messages = sorted(str(w.message) for w in rec)
    assert len(messages) == 2
    assert f"{garbled}: unreadable torch DCP metadata" in messages[0]
    assert f"{hostile}: unreadable torch DCP metadata" in messages[1] and "not part of DCP metadata" in messages[1]
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_dcp_without_model_weights_is_not_a_checkpoint(tmp_path):
    sd = random_state_dict(qwen3_shapes(tiny_config(1)), torch.bfloat16)
    optimizer = write_hf_fsdp(tmp_path / "checkpoint-1", sd, 1) / "optimizer_0"
    with pytest.raises(CheckpointNotFoundError, match="a torch DCP checkpoint without model weights"):
        open_checkpoint(optimizer)


# --- layouts opd_lens does not read ----------------------------------------------------------------------------------


def write_deepspeed(ckpt_dir: Path, step: int) -> Path:
    """What DeepSpeed's ``save_checkpoint`` writes for ZeRO-3 on one rank: the tag directory with model and optimizer
    states, ``latest`` naming it and the ``zero_to_fp32.py`` script beside it."""
    tag = ckpt_dir / f"global_step{step}"
    tag.mkdir(parents=True)
    shapes = [{Q: torch.Size([4, 4])}]
    torch.save(
        {"module": None, "param_shapes": shapes, "ds_version": "0.16.4"},
        tag / "zero_pp_rank_0_mp_rank_00_model_states.pt",
    )
    optim = {"optimizer_state_dict": {"zero_stage": 3, "fp32_flat_groups": [torch.zeros(16)]}, "ds_version": "0.16.4"}
    torch.save(optim, tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (ckpt_dir / "latest").write_text(tag.name)
    (ckpt_dir / "zero_to_fp32.py").write_text("# DeepSpeed's zero_to_fp32.py\n")
    return tag


def write_verl_fsdp(run: Path, step: int, world: int = 2) -> Path:
    """verl's FSDP checkpoint without ``hf_model`` in ``save_contents`` (the default): rank shards, ``fsdp_config.json``
    and a ``huggingface/`` holding config only."""
    actor = run / f"global_step_{step}" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "huggingface" / "config.json").write_text(json.dumps(CONFIG))
    for r in range(world):
        torch.save({Q: torch.zeros(2, 4)}, actor / f"model_world_size_{world}_rank_{r}.pt")
        torch.save({"state": {}}, actor / f"optim_world_size_{world}_rank_{r}.pt")
        torch.save({"rng": torch.zeros(4)}, actor / f"extra_state_world_size_{world}_rank_{r}.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 1, "world_size": world}))
    (run / "latest_checkpointed_iteration.txt").write_text(str(step))
    return actor


def write_megatron(d: Path) -> Path:
    """Megatron's torch_dist format: real DCP files of Megatron-named, layer-stacked tensors, ``metadata.json`` and
    ``common.pt``."""
    layers = {
        "decoder.layers.self_attention.linear_qkv.weight": torch.zeros(2, 64, 32),
        "decoder.layers.mlp.linear_fc1.weight": torch.zeros(2, 96, 32),
        "embedding.word_embeddings.weight": torch.zeros(16, 32),
    }
    dcp_save(layers, d)
    meta = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch"}
    (d / "metadata.json").write_text(json.dumps(meta))
    torch.save({"checkpoint_version": 3.0, "iteration": 10}, d / "common.pt")
    return d


def deepspeed_hf(tmp: Path) -> tuple[Path, Path, str, str]:
    """HF Trainer with DeepSpeed: checkpoint-N/ holding global_stepN/, latest and zero_to_fp32.py."""
    run = tmp / "out"
    for step in (10, 20):
        write_deepspeed(run / f"checkpoint-{step}", step)
    ckpt = run / "checkpoint-10"
    command = f"python {ckpt}/zero_to_fp32.py {ckpt} {OUT} -t global_step10 --safe_serialization"
    return run, ckpt, str(ckpt / "global_step10" / "zero_pp_rank_0_mp_rank_00_model_states.pt"), command


def deepspeed_openrlhf(tmp: Path) -> tuple[Path, Path, str, str]:
    """OpenRLHF's actor: _actor/global_stepN/ with latest and zero_to_fp32.py in _actor/."""
    run = tmp / "ckpt" / "_actor"
    for step in (10, 20):
        write_deepspeed(run, step)
    command = f"python {run}/zero_to_fp32.py {run} {OUT} -t global_step10 --safe_serialization"
    tag = run / "global_step10"
    return run, tag, str(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"), command


def verl_fsdp(tmp: Path) -> tuple[Path, Path, str, str]:
    run = tmp / "verl"
    for step in (10, 20):
        write_verl_fsdp(run, step)
    actor = run / "global_step_10" / "actor"
    command = f"python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir {OUT}"
    return run, actor.parent, str(actor / "model_world_size_2_rank_0.pt"), command


def verl_megatron(tmp: Path) -> tuple[Path, Path, str, str]:
    run = tmp / "verl"
    for step in (10, 20):
        actor = run / f"global_step_{step}" / "actor"
        write_megatron(actor / "dist_ckpt")
        (actor / "huggingface").mkdir()
        (actor / "huggingface" / "config.json").write_text(json.dumps(CONFIG))
    actor = run / "global_step_10" / "actor"
    command = f"python -m verl.model_merger merge --backend megatron --local_dir {actor} --target_dir {OUT}"
    return run, actor.parent, str(actor / "dist_ckpt" / "metadata.json"), command


FOREIGN = {  # layout: (run builder, what the message calls the layout)
    "deepspeed-hf": (deepspeed_hf, "a DeepSpeed ZeRO checkpoint"),
    "deepspeed-openrlhf": (deepspeed_openrlhf, "a DeepSpeed ZeRO checkpoint"),
    "verl-fsdp": (verl_fsdp, "a verl FSDP checkpoint"),
    "verl-megatron": (verl_megatron, "a Megatron dist_ckpt (torch_dist) checkpoint"),
}


def _says(message: str, layout: str, file: str, command: str) -> None:
    assert "\n" not in message
    assert f"{layout} ({file}), which opd_lens does not read; convert it to safetensors with: {command}" in message


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_find_checkpoints_names_layout_file_and_converter(tmp_path, kind):
    build, layout = FOREIGN[kind]
    run, step_dir, file, command = build(tmp_path)
    with pytest.warns(CheckpointWarning) as rec, pytest.raises(CheckpointNotFoundError) as ei:
        find_checkpoints(run)
    assert len(rec) == 2  # one line per step
    [first] = [str(w.message) for w in rec if str(w.message).startswith(f"skipping {step_dir}: ")]
    _says(first, layout, file, command)
    assert str(ei.value).startswith(f"{run}: no readable checkpoints (2 skipped, see warnings); ")
    _says(str(ei.value), layout, file, command)


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_open_checkpoint_names_layout_file_and_converter(tmp_path, kind):
    build, layout = FOREIGN[kind]
    _, step_dir, file, command = build(tmp_path)
    for path in {step_dir, Path(file).parent}:  # the step directory, and the directory of the identifying file
        with pytest.raises(CheckpointNotFoundError) as ei:
            open_checkpoint(path)
        assert str(ei.value).startswith(f"{path}: ")
        _says(str(ei.value), layout, file, command)


def test_megatron_dist_ckpt_is_not_read_as_plain_dcp(tmp_path):
    root = tmp_path / "megatron"
    iteration = write_megatron(root / "iter_0000010")
    assert (iteration / ".metadata").is_file() and list(iteration.glob("*.distcp"))
    command = (
        "Megatron-Bridge's examples/conversion/convert_checkpoints.py export --hf-model <base HF model> "
        f"--megatron-path {root} --hf-path {OUT}"
    )
    with pytest.raises(CheckpointNotFoundError) as ei:
        open_checkpoint(iteration)
    _says(str(ei.value), "a Megatron dist_ckpt (torch_dist) checkpoint", str(iteration / "metadata.json"), command)
    with pytest.raises(CheckpointNotFoundError) as ei:
        find_checkpoints(iteration)
    _says(str(ei.value), "a Megatron dist_ckpt (torch_dist) checkpoint", str(iteration / "metadata.json"), command)


def test_deepspeed_without_the_script_points_to_deepspeeds_module(tmp_path):
    tag = write_deepspeed(tmp_path / "checkpoint-3", 3)
    (tmp_path / "checkpoint-3" / "zero_to_fp32.py").unlink()
    with pytest.raises(CheckpointNotFoundError) as ei:
        open_checkpoint(tag)
    command = f"python -m deepspeed.utils.zero_to_fp32 {tag.parent} {OUT} -t global_step3 --safe_serialization"
    assert command in str(ei.value)


def _cli(capsys, *args: str) -> list[str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and "Traceback" not in err
    return err.splitlines()


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_cli_inspect_of_one_foreign_checkpoint_is_one_error_line(tmp_path, capsys, kind):
    build, layout = FOREIGN[kind]
    _, _, file, command = build(tmp_path)
    [line] = _cli(capsys, "inspect", str(Path(file).parent))
    assert line.startswith("opd-lens: error: ")
    _says(line, layout, file, command)


def test_cli_compute_of_a_foreign_run_is_one_line_per_step_and_one_error(tmp_path, capsys, planted):
    origin, _, _ = planted
    run, _, file, command = verl_fsdp(tmp_path)
    store = tmp_path / "store"
    lines = _cli(capsys, "compute", str(run), "--origin", str(origin), "--name", "r", "--store", str(store), "--quiet")
    assert len(lines) == 3
    assert all(line.startswith("opd-lens: warning: skipping ") for line in lines[:2])
    assert lines[2].startswith(f"opd-lens: error: {run}: no readable checkpoints (2 skipped, see warnings); ")
    _says(lines[2], "a verl FSDP checkpoint", file, command)


def test_cli_inspect_of_a_dcp_run(tmp_path, capsys):
    sd = random_state_dict(qwen3_shapes(tiny_config(2)), torch.bfloat16)
    for step in (1, 2):
        WRITERS["hf-fsdp"](tmp_path, sd, step)
    assert main(["inspect", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and f"{tmp_path}: 2 checkpoint(s)" in out
    assert all(" 14 " in line and "BF16" in line for line in out.splitlines()[2:4])


def test_a_dcp_step_still_being_written_has_no_metadata_yet(tmp_path):
    sd = random_state_dict(qwen3_shapes(tiny_config(1)), torch.bfloat16)
    for step in (1, 2):
        WRITERS["prime-rl"](tmp_path, sd, step)
    (tmp_path / "checkpoints" / "step_2" / "trainer" / ".metadata").unlink()  # DCP writes it last
    with pytest.warns(CheckpointWarning, match="step_2: no safetensors or torch DCP weights inside"):
        ckpts = find_checkpoints(tmp_path)
    assert [c.step for c in ckpts] == [1]
    shutil.rmtree(tmp_path / "checkpoints" / "step_2")
    assert [c.step for c in _no_warnings(tmp_path)] == [1]
