"""The demo zoo: the ci preset end to end (learning is real), determinism, resuming, the objectives, the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import opd_lens
from opd_lens.cli import main
from opd_lens.diagnostics import Settings
from opd_lens.summary import Summary
from opd_lens.zoo import PRESETS, RUNS, ZooError, load_zoo, train_zoo
from opd_lens.zoo import train as zoo_train
from opd_lens.zoo.objectives import (
    grpo_advantages,
    mix_advantages,
    opd_advantages,
    ppo_clip_loss,
    sft_loss,
    sparsify_tokens,
)
from opd_lens.zoo.task import decode, exact_match, make_task

TINY = replace(
    PRESETS["ci"],
    name="tiny",
    n_train=512,
    n_eval=32,
    base_steps=4,
    teacher_steps=4,
    sft_demos=64,
    sft_steps=4,
    opd_steps=8,
    rlvr_steps=8,
    prompts=8,
    group=4,
    saves=2,
)
"""Seconds to train: for determinism and resuming, not for learning."""


def final_accuracy(manifest: dict, run: str) -> float:
    return manifest["runs"][run]["checkpoints"][-1]["eval_accuracy"]


def test_ci_zoo_learns(ci_zoo):
    _, manifest = ci_zoo
    models = manifest["models"]
    anchor = models["anchor"]["accuracy"]
    assert anchor == final_accuracy(manifest, "sft") > models["base"]["accuracy"] + 0.05
    assert models["teacher"]["accuracy"] > anchor + 0.05
    assert final_accuracy(manifest, "opd") > anchor + 0.01
    assert final_accuracy(manifest, "rlvr") > anchor + 0.01


def test_ci_zoo_is_saved_like_a_trainer_saves(ci_zoo):
    out, manifest = ci_zoo
    assert set(manifest["runs"]) == {"sft", "opd", "rlvr"}  # ci leaves the controls to the other presets
    ckpts = opd_lens.find_checkpoints(out / "runs" / "opd")
    assert [c.step for c in ckpts] == PRESETS["ci"].save_steps("opd") == [20, 40, 60]
    last = out / "runs" / "opd" / "checkpoint-60"
    with safe_open(last / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert {f.get_tensor(n).dtype for n in names} == {torch.bfloat16}
    assert {"model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"} <= names
    config = json.loads((last / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    assert [h["step"] for h in state["log_history"]] == [20, 40, 60]
    assert state["log_history"] == manifest["runs"]["opd"]["checkpoints"]
    assert 0 <= state["log_history"][-1]["eval_accuracy"] <= 1
    anchor = out / "anchor" / "model.safetensors"
    assert anchor.read_bytes() == (out / "runs" / "sft" / "checkpoint-150" / "model.safetensors").read_bytes()
    assert load_zoo(out) == manifest


def test_ci_zoo_computes_into_a_store(ci_zoo, tmp_path):
    out, _ = ci_zoo
    settings = Settings(angle_k=16, mask_rank=8)
    kw = dict(settings=settings, progress=False)
    opd_lens.compute(tmp_path, out / "runs" / "sft", origin=out / "base", name="sft", method="sft", **kw)
    ds = opd_lens.compute(tmp_path, out / "runs" / "opd", origin=out / "anchor", name="opd", method="opd", **kw)
    table = opd_lens.summarize(ds)
    assert list(ds.step.values[ds.progress.sel(run="opd").notnull().values]) == [20, 40, 60]
    assert ds.sizes["layer"] == 2 and ds.sizes["module"] == 7
    assert 0 <= table.loc["sft", "unchanged_pct"] < table.loc["opd", "unchanged_pct"] < 100
    assert table.loc["opd", "update_fro"] < table.loc["sft", "update_fro"]


def test_zoo_is_deterministic_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    save = zoo_train._save
    stopped = []

    def stop_after_first_opd_checkpoint(path, *args):
        save(path, *args)
        if path.parent.name == "opd" and not stopped:
            stopped.append(path)
            raise KeyboardInterrupt

    monkeypatch.setattr(zoo_train, "_save", stop_after_first_opd_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_zoo(tmp_path / "a", TINY, seed=3, progress=False, workers=1)
    assert stopped == [tmp_path / "a" / "runs" / "opd" / "checkpoint-4"]
    assert "opd" not in load_zoo(tmp_path / "a")["runs"]
    monkeypatch.setattr(zoo_train, "_save", save)
    resumed = train_zoo(tmp_path / "a", TINY, seed=3, progress=False, workers=1)
    straight = train_zoo(tmp_path / "b", TINY, seed=3, progress=False, workers=2)  # runs in worker processes
    assert resumed == straight
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len([f for f in files if f.name == "model.safetensors"]) == 3 + 2 * 3  # base, teacher, anchor; 3 runs
    for f in files:
        a, b = tmp_path / "a" / f, tmp_path / "b" / f
        if f.name == zoo_train.STATE:  # a pickle's bytes depend on how objects were shared; compare what it holds
            assert same(torch.load(a, weights_only=True), torch.load(b, weights_only=True)), f
        else:
            assert a.read_bytes() == b.read_bytes(), f


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_zoo_directory_holds_one_zoo(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ZooError, match="exists and is not a directory"):
        train_zoo(tmp_path / "file", TINY)
    (tmp_path / "other" / "x").mkdir(parents=True)
    with pytest.raises(ZooError, match="not empty and holds no zoo"):
        train_zoo(tmp_path / "other", TINY)
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "zoo.json").write_text(json.dumps({"preset": "ci", "seed": 0, "config": {}}))
    with pytest.raises(ZooError, match="holds a zoo of preset 'ci' with seed 0"):
        train_zoo(tmp_path / "zoo", TINY, seed=1)
    with pytest.raises(ZooError, match="unknown preset 'huge'"):
        train_zoo(tmp_path / "new", "huge")


def test_presets():
    assert set(PRESETS["classroom"].runs) == set(PRESETS["paper"].runs) == set(RUNS)
    for preset in PRESETS.values():
        for run in preset.runs:
            saves = preset.save_steps(run)
            assert len(saves) == preset.saves and saves[-1] == preset.steps(run)
    classroom = PRESETS["classroom"]
    assert classroom.sft_steps * classroom.sft_batch == 5 * classroom.sft_demos  # 5 epochs, as in the paper
    with pytest.raises(ValueError, match="multiples of minibatches"):
        replace(classroom, opd_steps=201)
    with pytest.raises(ValueError, match="'sft'"):
        replace(classroom, runs=("opd",))


def test_task_splits_and_reward():
    task = make_task(3, 400, 100, seed=5)
    assert torch.equal(task.train_prompts, make_task(3, 400, 100, seed=5).train_prompts)
    assert not torch.equal(task.train_prompts, make_task(3, 400, 100, seed=6).train_prompts)
    prompts = [decode(p.tolist()) for p in torch.cat([task.eval_prompts, task.train_prompts])]
    assert len(set(prompts)) == 500  # held-out problems never appear in training
    for prompt, answer in zip(prompts[:50], torch.cat([task.eval_answers, task.train_answers])[:50], strict=True):
        a, b = prompt[:-1].split("+")
        assert len(a) == len(b) == 3 and prompt.endswith("=")
        assert int(decode(answer.tolist())[::-1]) == int(a[::-1]) + int(b[::-1])  # least significant digit first
    responses = task.eval_answers[:3].clone()
    responses[1, 0] = (responses[1, 0] + 1) % 10
    assert exact_match(responses, task.eval_answers[:3]).tolist() == [1.0, 0.0, 1.0]


def test_sft_loss_is_mean_token_cross_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    assert sft_loss(logits, torch.tensor([[0, 1]])).item() == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)


def test_opd_advantage_is_minus_sampled_token_log_ratio():
    student, teacher = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-0.5, -3.0]])
    assert opd_advantages(student, teacher).tolist() == [[0.5, -1.0]]


def test_grpo_advantages_normalize_within_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.25, unbiased std 0.5; group 2 has no variance and no signal
    assert grpo_advantages(rewards, 4).tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], abs=1e-5)
    assert grpo_advantages(rewards, 4, std_normalize=False).tolist() == [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]


def test_ppo_clip_is_asymmetric_and_stops_clipped_gradients():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    logp = torch.log(ratio).requires_grad_()
    loss = ppo_clip_loss(logp, torch.zeros(5), adv, 0.2, 0.28)
    # per token: min(1.5, 1.28), min(-1.5, -1.28), min(0.5, 0.8), min(-0.5, -0.8), min(2.2, 2.2)
    assert loss.item() == pytest.approx(-(1.28 - 1.5 + 0.5 - 0.8 + 2.2) / 5)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0, 1.5 / 5, -0.5 / 5, 0, -2.2 / 5])


def test_top_kl_keeps_the_largest_signed_gaps_and_rescales():
    r = torch.tensor([[0.5, -2.0, 3.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert sparsify_tokens(r, 0.5, "topkl").tolist() == [[0, 0, 6.0, 2.0], [0, 0, 6.0, 8.0]]  # T/Σm = 4/2


def test_random_sparsification_keeps_a_fraction_and_rescales():
    r = torch.arange(1.0, 4001.0).view(1000, 4)
    kept = sparsify_tokens(r, 0.25, "random", torch.Generator().manual_seed(0))
    assert ((kept != 0).sum(-1) == 1).all()
    assert torch.equal(kept[kept != 0], 4 * r[kept != 0])
    counts = (kept != 0).sum(0)
    assert counts.min() > 200  # every position is kept about a quarter of the time
    again = sparsify_tokens(r, 0.25, "random", torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)
    with pytest.raises(ValueError, match="unknown sparsification"):
        sparsify_tokens(r, 0.25, "bottom")


def test_mixing_weights_token_and_sequence_advantages():
    mixed = mix_advantages(torch.tensor([[1.0, 2.0]]), torch.tensor([3.0]), 0.25)
    assert mixed.tolist() == [[0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 3]]


def test_cli_zoo_reports_a_trained_zoo(ci_zoo, capsys):
    out, manifest = ci_zoo
    assert main(["zoo", "--out", str(out), "--preset", "ci", "--quiet"]) == 0  # nothing left to train
    printed = capsys.readouterr().out
    assert f"zoo {out} (preset ci, seed 0) ready" in printed
    assert f"{manifest['models']['anchor']['accuracy']:.3f}" in printed and "rlvr" in printed


def test_cli_zoo_mistakes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["zoo", "--out", str(tmp_path), "--preset", "huge"])
    assert exit_info.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["zoo", "--out", str(tmp_path / "file"), "--preset", "ci"]) == 2
    err = capsys.readouterr().err
    assert err == f"opd-lens: error: {tmp_path / 'file'}: exists and is not a directory\n"
    assert main(["zoo", "--out", str(tmp_path), "--preset", "ci", "--seed", "1"]) == 2  # tmp_path holds "file"
    assert "not empty and holds no zoo" in capsys.readouterr().err


def test_demo_reuses_the_zoo_and_writes_the_report(ci_zoo, tmp_path, capsys):
    import shutil

    out, manifest = ci_zoo
    shutil.copytree(out, tmp_path / "demo" / "zoo")
    main(["demo", "--out", str(tmp_path / "demo"), "--preset", "ci", "--quiet"])
    first = capsys.readouterr().out
    ds = opd_lens.open_store(tmp_path / "demo" / "store", create=False).dataset()
    assert Summary.of(ds).text() in first  # the table with its legend, as `opd-lens summary` prints it
    header, *lines = first.split("\n\n")[0].splitlines()[-4:]  # the first block, after the progress lines
    assert header.split()[:7] == ["run", "method", "ckpts", "first", "last", "acc", "%"]
    rows = {line.split()[0]: line.split() for line in lines}
    assert set(rows) == {"sft", "opd", "rlvr"}
    for run in rows:
        assert rows[run][5] == f"{100 * final_accuracy(manifest, run):.1f}"  # from the manifest, like before
    assert float(rows["sft"][6]) == pytest.approx(opd_lens.summarize(ds).loc["sft", "unchanged_pct"], abs=0.05)
    assert (tmp_path / "demo" / "report.html").stat().st_size > 1e6
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*") if p.is_file() and "report" not in p.name}
    main(["demo", "--out", str(tmp_path / "demo"), "--preset", "ci", "--quiet"])
    second = capsys.readouterr().out
    assert second == first  # the same table, ...
    changed = [p for p, t in files.items() if p.stat().st_mtime_ns != t]
    assert [p for p in changed if "zoo" in p.relative_to(tmp_path).parts] == []  # ... nothing retrained
    assert [p for p in changed if "c" in p.relative_to(tmp_path).parts] == []  # ... no zarr chunk rewritten


def test_generation_uses_the_current_cache_api_and_equals_transformers_generate():
    """The KV-cached decoding passes one cache by the name this transformers takes: no deprecation warning, and
    greedy decoding gives exactly ``model.generate``'s tokens."""
    import warnings

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd_lens.zoo.rollout import generate

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    prompts = torch.randint(0, 50, (3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy = generate(model, prompts, 6)
        sampled = generate(model, prompts, 6, torch.Generator().manual_seed(1))
    assert torch.equal(greedy, model.generate(prompts, max_new_tokens=6, do_sample=False)[:, 5:])
    assert sampled.shape == (3, 6) and torch.equal(
        sampled, generate(model, prompts, 6, torch.Generator().manual_seed(1))
    )
