"""OpdLensCallback in a real transformers Trainer: each saved checkpoint reaches the store; a constrained run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_projector import leak, tiny_model
from transformers import Qwen3ForCausalLM, Trainer, TrainingArguments

from opd_lens import open_store
from opd_lens.diagnostics import Settings
from opd_lens.locking import SubspaceProjector, subspaces_from_checkpoint
from opd_lens.locking.callback import OpdLensCallback

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_trainer(model, out, callback=None, max_steps: int = 6) -> Trainer:
    gen = torch.Generator().manual_seed(3)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 16, (4 * max_steps, 12), generator=gen)]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback] if callback else None)


class Monitor:
    refreshes = 0

    def refresh(self):
        self.refreshes += 1


def test_every_saved_checkpoint_reaches_the_store(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "origin")
    open_store(tmp_path / "store", Settings(angle_k=4, mask_rank=4, lock_k=4))  # every matrix has a channel
    monitor = Monitor()
    callback = OpdLensCallback(store=tmp_path / "store", origin=tmp_path / "origin", method="sft", monitor=monitor)
    make_trainer(model, tmp_path / "run", callback).train()
    ds = open_store(tmp_path / "store").dataset()
    assert list(ds.run.values) == ["run"] and list(ds.method.values) == ["sft"]
    assert list(ds.step.values) == [2, 4, 6]
    assert ds.sizes["layer"] == 1 and ds.sizes["module"] == 7
    for name in ("stable_rank", "lock_alignment"):
        assert np.isfinite(ds[name].values).all(), name
    assert monitor.refreshes == 3


def test_store_errors_do_not_stop_training(tmp_path, caplog):
    callback = OpdLensCallback(store=tmp_path / "store", origin=tmp_path / "no-origin")
    trainer = make_trainer(tiny_model(), tmp_path / "run", callback, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="opd_lens"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert f"could not process {tmp_path / 'run' / 'checkpoint-2'}" in caplog.text
    assert "no-origin" in caplog.text


def test_update_projector_keeps_the_run_in_the_early_subspace(tmp_path):
    tiny_model().save_pretrained(tmp_path / "origin")
    make_trainer(Qwen3ForCausalLM.from_pretrained(tmp_path / "origin"), tmp_path / "first", max_steps=2).train()
    subspaces = subspaces_from_checkpoint(tmp_path / "origin", tmp_path / "first" / "checkpoint-2", K=4)
    assert len(subspaces.right) == 7
    model = Qwen3ForCausalLM.from_pretrained(tmp_path / "first" / "checkpoint-2")
    params = dict(model.named_parameters())
    start = {n: params[n].detach().double().clone() for n in subspaces.right}
    trainer = make_trainer(model, tmp_path / "k4", OpdLensCallback(projector=SubspaceProjector(subspaces, "update")))
    trainer.train()
    for name, v in subspaces.right.items():
        delta = params[name].detach().double() - start[name]
        assert delta.norm() > 1e-3 * start[name].norm(), name
        assert leak(delta, v) <= 1e-5, name
    # the projector is detached when training ends: one more step (the schedule has decayed to 0) leaves the span
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-3
    model(input_ids=torch.arange(12)[None], labels=torch.arange(12)[None]).loss.backward()
    trainer.optimizer.step()
    name, v = next(iter(subspaces.right.items()))
    assert leak(params[name].detach().double() - start[name], v) > 1e-3
