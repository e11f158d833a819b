"""Run-directory discovery: every trainer layout, numeric ordering, what is ignored, and incomplete checkpoints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import qwen3_state_dict, write_raw_checkpoint
from safetensors.torch import save_file

from opd_lens.checkpoints import LAYOUTS, checkpoint_path, find_checkpoints, save_checkpoint
from opd_lens.errors import CheckpointNotFoundError, CheckpointWarning

# Tiny weights are enough for discovery: two layers' worth would only slow the suite down.
TINY = {
    "model.layers.0.self_attn.q_proj.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
    "model.layers.0.mlp.down_proj.weight": torch.arange(6, dtype=torch.float32).reshape(3, 2),
}


def _save(path: Path, step: int | None = None, **kw) -> Path:
    return save_checkpoint(path, TINY, step=step, **kw)


def _steps(ckpts) -> list[int]:
    return [c.step for c in ckpts]


def _no_warnings(run: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return find_checkpoints(run)


# --- every layout --------------------------------------------------------------------------------------------------


def test_hf_trl_checkpoint_dirs_with_trainer_state(tmp_path):
    for s in (50, 100, 150):
        _save(tmp_path / f"checkpoint-{s}", step=s)
    # what else TRL puts in an output dir
    (tmp_path / "runs" / "Jan01_00-00-00").mkdir(parents=True)
    (tmp_path / "runs" / "Jan01_00-00-00" / "events.out.tfevents.1").write_bytes(b"\0")
    (tmp_path / "training_args.bin").write_bytes(b"\0")
    ckpts = _no_warnings(tmp_path)
    assert _steps(ckpts) == [50, 100, 150]
    assert [c.path for c in ckpts] == [tmp_path / f"checkpoint-{s}" for s in (50, 100, 150)]
    assert all(set(c.tensors) == set(TINY) for c in ckpts)


def test_hf_checkpoint_dir_without_trainer_state_takes_step_from_name(tmp_path):
    _save(tmp_path / "checkpoint-7")
    assert _steps(_no_warnings(tmp_path)) == [7]


def test_trainer_state_step_wins_over_dir_name_with_warning(tmp_path):
    _save(tmp_path / "checkpoint-10", step=12)
    _save(tmp_path / "checkpoint-20", step=20)
    with pytest.warns(CheckpointWarning) as rec:
        ckpts = find_checkpoints(tmp_path)
    assert _steps(ckpts) == [12, 20]
    assert ckpts[0].path == tmp_path / "checkpoint-10"
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1
    assert str(tmp_path / "checkpoint-10") in msgs[0]
    assert "12" in msgs[0] and "10" in msgs[0]


def test_trainer_state_step_reorders_series(tmp_path):
    # the directory names say 5 < 8, trainer_state says 9 > 8: the order follows the step actually used
    _save(tmp_path / "checkpoint-5", step=9)
    _save(tmp_path / "checkpoint-8", step=8)
    with pytest.warns(CheckpointWarning):
        ckpts = find_checkpoints(tmp_path)
    assert [(c.step, c.path.name) for c in ckpts] == [(8, "checkpoint-8"), (9, "checkpoint-5")]


@pytest.mark.parametrize("fmt", ["global_step{}_hf", "global_step_{}_hf"])
def test_openrlhf_hf_dirs(tmp_path, fmt):
    for s in (3, 30):
        _save(tmp_path / fmt.format(s))
    # OpenRLHF's DeepSpeed actor state sits beside the HF copies
    (tmp_path / "_actor" / "global_step3").mkdir(parents=True)
    (tmp_path / "_actor" / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"\0")
    ckpts = _no_warnings(tmp_path)
    assert _steps(ckpts) == [3, 30]
    assert [c.path for c in ckpts] == [tmp_path / fmt.format(s) for s in (3, 30)]


def test_verl_actor_huggingface(tmp_path):
    for s in (10, 20):
        actor = tmp_path / f"global_step_{s}" / "actor"
        _save(actor / "huggingface")
        (actor / "model_world_size_2_rank_0.pt").write_bytes(b"\0")
        (actor / "fsdp_config.json").write_text("{}")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("20")
    ckpts = _no_warnings(tmp_path)
    assert _steps(ckpts) == [10, 20]
    assert ckpts[1].path == tmp_path / "global_step_20" / "actor" / "huggingface"


@pytest.mark.parametrize("fmt", ["global_step{}", "global_step_{}"])
def test_global_step_with_weights_inside(tmp_path, fmt):
    for s in (1, 2):
        _save(tmp_path / fmt.format(s))
    ckpts = _no_warnings(tmp_path)
    assert _steps(ckpts) == [1, 2]
    assert ckpts[0].path == tmp_path / fmt.format(1)


def test_step_dirs(tmp_path):
    for s in (0, 4):
        _save(tmp_path / f"step_{s}")
    assert _steps(_no_warnings(tmp_path)) == [0, 4]


def test_prime_rl_weights_subdir(tmp_path):
    # prime-rl: checkpoints/step_N is DCP (ignored), weights/step_N is a standalone HF checkpoint
    for s in (5, 10):
        dcp = tmp_path / "checkpoints" / f"step_{s}"
        dcp.mkdir(parents=True)
        (dcp / ".metadata").write_bytes(b"\0")
        (dcp / "__0_0.distcp").write_bytes(b"\0")
        _save(tmp_path / "weights" / f"step_{s}")
    ckpts = _no_warnings(tmp_path)
    assert _steps(ckpts) == [5, 10]
    assert ckpts[0].path == tmp_path / "weights" / "step_5"


def test_origin_directory_is_itself_one_checkpoint(tmp_path):
    origin = _save(tmp_path / "Qwen3-tiny")
    (origin / "tokenizer.json").write_text("{}")
    [ckpt] = _no_warnings(origin)
    assert ckpt.step == 0
    assert ckpt.path == origin
    assert set(ckpt.tensors) == set(TINY)


def test_origin_directory_with_trainer_state_uses_its_step(tmp_path):
    origin = _save(tmp_path / "sft-final", step=321)
    [ckpt] = _no_warnings(origin)
    assert ckpt.step == 321


def test_origin_sharded_written_without_opd_lens(tmp_path):
    sd = qwen3_state_dict(n_layers=1)
    names = list(sd)
    origin = write_raw_checkpoint(tmp_path / "snap", sd, shards=[names[:5], names[5:]])
    [ckpt] = _no_warnings(origin)
    assert ckpt.step == 0
    assert set(ckpt.tensors) == set(sd)


def test_trl_output_dir_with_final_model_and_checkpoint_subdirs(tmp_path):
    # TRL: save_model() writes the final model at the top, checkpoints are in checkpoint-N; the series wins
    _save(tmp_path, step=300)
    for s in (100, 200):
        _save(tmp_path / f"checkpoint-{s}", step=s)
    ckpts = _no_warnings(tmp_path)
    assert _steps(ckpts) == [100, 200]
    assert all(c.path != tmp_path for c in ckpts)


# --- ordering and ignored entries ------------------------------------------------------------------------------


def test_numeric_sort_not_name_sort(tmp_path):
    steps = [2, 9, 10, 100, 1000]
    for s in steps:
        _save(tmp_path / f"checkpoint-{s}")
    ckpts = _no_warnings(tmp_path)
    assert _steps(ckpts) == steps
    assert [c.path.name for c in ckpts] != sorted(c.path.name for c in ckpts)


def test_numeric_sort_across_layouts(tmp_path):
    _save(tmp_path / "step_10")
    _save(tmp_path / "checkpoint-9")
    _save(tmp_path / "global_step11_hf")
    assert _steps(_no_warnings(tmp_path)) == [9, 10, 11]


def test_ignored_entries(tmp_path):
    _save(tmp_path / "checkpoint-1")
    _save(tmp_path / "tmp-checkpoint-5")  # HF Trainer's in-progress save
    _save(tmp_path / "checkpoint-final")
    _save(tmp_path / ".tmp-checkpoint-6")  # opd_lens writer's staging dir
    _save(tmp_path / "checkpoint-2" / "nested-extra")  # nested, and checkpoint-2 has no weights of its own
    (tmp_path / "checkpoint-3").write_bytes(b"not a dir")
    (tmp_path / "step_4.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "global_step_7").write_text("a file")
    (tmp_path / "runs" / "step_8").mkdir(parents=True)  # logs dir
    (tmp_path / "logs").mkdir()
    with pytest.warns(CheckpointWarning) as rec:
        ckpts = find_checkpoints(tmp_path)
    assert _steps(ckpts) == [1]
    # the only warning is about checkpoint-2, which has no safetensors at its top level
    assert len(rec) == 1 and str(tmp_path / "checkpoint-2") in str(rec[0].message)


def test_checkpoint_path_round_trips_for_every_layout(tmp_path):
    for i, lay in enumerate(LAYOUTS):
        run = tmp_path / lay.name
        for step in (3, 12):
            p = checkpoint_path(run, step + i, lay.name)
            assert p.is_relative_to(run)
            _save(p)
        ckpts = _no_warnings(run)
        assert _steps(ckpts) == [3 + i, 12 + i], lay.name
        assert [c.path for c in ckpts] == [checkpoint_path(run, s + i, lay.name) for s in (3, 12)], lay.name


def test_checkpoint_path_default_and_unknown_layout(tmp_path):
    assert checkpoint_path(tmp_path, 5) == tmp_path / "checkpoint-5"
    assert checkpoint_path(tmp_path, 5, "verl") == tmp_path / "global_step_5" / "actor" / "huggingface"
    with pytest.raises(ValueError, match="nope"):
        checkpoint_path(tmp_path, 5, "nope")


def test_same_step_twice_keeps_one_and_warns(tmp_path):
    _save(tmp_path / "checkpoint-5", step=5)
    _save(tmp_path / "step_5")
    with pytest.warns(CheckpointWarning, match="step 5") as rec:
        ckpts = find_checkpoints(tmp_path)
    assert _steps(ckpts) == [5]
    assert ckpts[0].path == tmp_path / "checkpoint-5"  # hf is the preferred layout
    assert str(tmp_path / "step_5") in str(rec[0].message)


def test_same_step_twice_prefers_layout_order_not_name_order(tmp_path):
    # LAYOUTS is documented as "in order of preference when two directories claim the same step":
    # OpenRLHF's global_step_N_hf comes before a bare global_step_N holding weights.
    _save(tmp_path / "global_step_5")
    _save(tmp_path / "global_step_5_hf")
    with pytest.warns(CheckpointWarning):
        ckpts = find_checkpoints(tmp_path)
    assert _steps(ckpts) == [5]
    assert ckpts[0].path == tmp_path / "global_step_5_hf"


# --- incomplete checkpoints ------------------------------------------------------------------------------------


def _series(run: Path, steps=(1, 2, 3), shard=False) -> None:
    for s in steps:
        _save(run / f"checkpoint-{s}", step=s, max_shard_bytes=48 if shard else None)


def _find_with_one_warning(run: Path, *needles: str):
    with pytest.warns(CheckpointWarning) as rec:
        ckpts = find_checkpoints(run)
    assert len(rec) == 1, [str(w.message) for w in rec]
    msg = str(rec[0].message)
    for n in needles:
        assert n in msg, (n, msg)
    return ckpts, msg


def test_missing_shard_is_skipped(tmp_path):
    _series(tmp_path, shard=True)
    bad = tmp_path / "checkpoint-2"
    shards = sorted(bad.glob("model-*.safetensors"))
    assert len(shards) == 2
    shards[1].unlink()
    ckpts, msg = _find_with_one_warning(tmp_path, str(bad), shards[1].name)
    assert _steps(ckpts) == [1, 3]
    assert "missing" in msg


def test_index_lists_tensor_the_shard_does_not_hold(tmp_path):
    _series(tmp_path, shard=True)
    bad = tmp_path / "checkpoint-3"
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.k_proj.weight"] = "model-00001-of-00002.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpts, _ = _find_with_one_warning(tmp_path, str(bad / "model-00001-of-00002.safetensors"), "k_proj")
    assert _steps(ckpts) == [1, 2]


def test_shard_holds_tensor_the_index_does_not_list(tmp_path):
    # hand-written shards and index (not opd_lens's writer); the index of step_2 forgets one tensor of shard 1
    sd = {f"model.layers.0.{m}.weight": torch.full((2, 2), float(i)) for i, m in enumerate("abc")}
    groups = [["model.layers.0.a.weight", "model.layers.0.b.weight"], ["model.layers.0.c.weight"]]
    for s in (1, 2, 3):
        write_raw_checkpoint(tmp_path / f"step_{s}", sd, shards=groups)
    bad = tmp_path / "step_2"
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.b.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpts, msg = _find_with_one_warning(
        tmp_path, str(bad / "model-00001-of-00002.safetensors"), "model.layers.0.b.weight"
    )
    assert _steps(ckpts) == [1, 3]
    assert "does not list" in msg


def test_shard_holds_tensor_the_index_assigns_elsewhere(tmp_path):
    # hand-written shards: both files hold tensor b, the index says it lives in the second one
    run = tmp_path / "run"
    good = {"model.layers.0.a.weight": torch.ones(2, 2), "model.layers.0.b.weight": torch.zeros(2, 2)}
    for s in (1, 2):
        write_raw_checkpoint(run / f"step_{s}", good, shards=[["model.layers.0.a.weight"], ["model.layers.0.b.weight"]])
    bad = run / "step_2"
    save_file(good, str(bad / "model-00001-of-00002.safetensors"))
    ckpts, msg = _find_with_one_warning(run, str(bad / "model-00001-of-00002.safetensors"), "model.layers.0.b.weight")
    assert _steps(ckpts) == [1]
    assert "model-00002-of-00002.safetensors" in msg


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_file_still_being_written_is_skipped(tmp_path, cut):
    _series(tmp_path)
    f = tmp_path / "checkpoint-3" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - cut])
    ckpts, _ = _find_with_one_warning(tmp_path, str(f))
    assert _steps(ckpts) == [1, 2]


def test_deepspeed_step_dir_without_safetensors_warns_about_conversion(tmp_path):
    _series(tmp_path, steps=(1, 3))
    ds = tmp_path / "global_step2"
    ds.mkdir()
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"\0")
    (ds / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0")
    ckpts, msg = _find_with_one_warning(tmp_path, str(ds))
    assert _steps(ckpts) == [1, 3]
    assert "convert" in msg and "safetensors" in msg


def test_verl_without_hf_model_warns_about_conversion(tmp_path):
    _save(tmp_path / "global_step_1" / "actor" / "huggingface")
    actor = tmp_path / "global_step_2" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "huggingface" / "config.json").write_text("{}")  # verl's default: config and tokenizer only
    (actor / "model_world_size_1_rank_0.pt").write_bytes(b"\0")
    ckpts, msg = _find_with_one_warning(tmp_path, str(tmp_path / "global_step_2"))
    assert _steps(ckpts) == [1]
    assert "convert" in msg


# --- nothing to find -------------------------------------------------------------------------------------------


def test_no_checkpoints_at_all(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointNotFoundError) as ei:
        find_checkpoints(tmp_path)
    assert str(tmp_path) in str(ei.value)
    assert "skipped" not in str(ei.value)


def test_empty_run_dir(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no readable checkpoints"):
        find_checkpoints(tmp_path)


def test_missing_run_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointNotFoundError) as ei:
        find_checkpoints(missing)
    assert str(missing) in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)


def test_run_dir_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointNotFoundError, match="not a directory"):
        find_checkpoints(f)


def test_every_checkpoint_broken(tmp_path):
    _series(tmp_path, steps=(1, 2))
    for s in (1, 2):
        f = tmp_path / f"checkpoint-{s}" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-3])
    ds = tmp_path / "global_step3"
    ds.mkdir()
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"\0")
    with pytest.warns(CheckpointWarning) as rec, pytest.raises(CheckpointNotFoundError) as ei:
        find_checkpoints(tmp_path)
    assert len(rec) == 3
    assert str(tmp_path) in str(ei.value)
    assert "3 skipped" in str(ei.value)
