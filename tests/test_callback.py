"""OpdLensCallback in a real transformers Trainer: each saved checkpoint reaches the store; a constrained run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_projector import leak, tiny_model
from transformers import Qwen3ForCausalLM, Trainer, TrainerCallback, TrainingArguments

from opd_lens import LockMonitor, open_store
from opd_lens.diagnostics import Settings
from opd_lens.errors import SettingsWarning
from opd_lens.locking import SubspaceProjector, subspaces_from_checkpoint
from opd_lens.locking.callback import OpdLensCallback

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_trainer(model, out, *callbacks, max_steps: int = 6, report_to=()) -> Trainer:
    gen = torch.Generator().manual_seed(3)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 16, (4 * max_steps, 12), generator=gen)]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        report_to=list(report_to),
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks) or None)


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
    trainer = make_trainer(model, tmp_path / "run", callback)
    trainer.train()
    ds = open_store(tmp_path / "store").dataset()
    assert list(ds.run.values) == ["run"] and list(ds.method.values) == ["sft"]
    assert list(ds.step.values) == [2, 4, 6]
    assert ds.sizes["layer"] == 1 and ds.sizes["module"] == 7
    for name in ("stable_rank", "lock_alignment"):
        assert np.isfinite(ds[name].values).all(), name
    assert monitor.refreshes == 3
    reports = [r for r in trainer.state.log_history if "opd_lens/stable_rank" in r]  # Trainer.log keeps a history
    assert [r["step"] for r in reports] == [2, 4, 6]
    assert not any("opd_lens/alarms" in r for r in reports)  # this monitor has no alarms


class Snapshots(TrainerCallback):
    """The store's Dataset as each save left it (this callback runs after OpdLensCallback)."""

    def __init__(self, store):
        self.store, self.at = store, {}

    def on_save(self, args, state, control, **kwargs):
        self.at[state.global_step] = open_store(self.store).dataset().sel(run="run")


def tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    """Tag -> step -> value of the opd_lens scalars in the TensorBoard event files under ``logdir``."""
    (events,) = logdir.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if "opd_lens/" in t]
    return {t.split("opd_lens/")[1]: {e.step: e.value for e in acc.Scalars(t)} for t in tags}


def test_checkpoint_figures_reach_tensorboard_at_the_save_steps(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "origin")
    open_store(tmp_path / "store", Settings(angle_k=4, mask_rank=4, lock_k=4))
    snapshots = Snapshots(tmp_path / "store")
    callback = OpdLensCallback(store=tmp_path / "store", origin=tmp_path / "origin")
    make_trainer(model, tmp_path / "run", callback, snapshots, report_to=["tensorboard"]).train()
    expected = {}
    for step, ds in snapshots.at.items():  # the figures from each save's Dataset, computed here
        at = ds.sel(step=step)
        expected[step] = {
            "stable_rank": float(at.stable_rank.mean()),
            "update_fro": float(at.update_fro.mean()),
            "unchanged_pct": 100 * float((at.unchanged_frac * at.numel).sum() / at.numel.sum()),
            "lock_alignment_first": float(ds.lock_alignment.isel(step=0).mean()),
        }
    logged = tensorboard_scalars(tmp_path / "run")
    assert sorted(logged) == sorted(expected[6])
    for name, values in logged.items():
        assert list(values) == [2, 4, 6], name
        assert values == pytest.approx({step: e[name] for step, e in expected.items()}, rel=1e-6), name
    assert logged["lock_alignment_first"][2] == pytest.approx(1, rel=1e-6)  # the first checkpoint is the newest
    assert logged["lock_alignment_first"][6] < 1


def test_monitor_alarm_count_reaches_tensorboard_and_nan_figures_are_left_out(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "origin")
    open_store(tmp_path / "store", Settings(angle_k=4, mask_rank=4, lock_k=32))  # K ≥ every min(m, n): Sim_K NaN
    monitor = LockMonitor(tmp_path / "store", "run", stable_rank_band=(None, 0))  # every checkpoint alarms
    callback = OpdLensCallback(store=tmp_path / "store", origin=tmp_path / "origin", monitor=monitor)
    with pytest.warns(SettingsWarning, match="7 of 7 for lock_k=32"):
        make_trainer(model, tmp_path / "run", callback, max_steps=4, report_to=["tensorboard"]).train()
    logged = tensorboard_scalars(tmp_path / "run")
    assert sorted(logged) == ["alarms", "stable_rank", "unchanged_pct", "update_fro"]
    assert logged["alarms"] == {2: 1, 4: 2}
    assert len(monitor.alarms) == 2


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
