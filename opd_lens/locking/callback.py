"""A Hugging Face ``Trainer`` callback (so TRL trainers too): constrain training with a :class:`SubspaceProjector`
and feed each saved checkpoint to an opd_lens store and a live monitor."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from types import FrameType

from transformers import Trainer, TrainerCallback

from ..api import Store, open_store
from ..summary import summarize
from .projector import SubspaceProjector

__all__ = ["FIGURES", "OpdLensCallback"]

FIGURES = ("stable_rank", "update_fro", "unchanged_pct", "lock_alignment_first")
"""The columns of :func:`~opd_lens.summarize` reported per checkpoint: at the newest checkpoint, the mean stable rank
and ‖ΔW‖_F, the parameter-weighted unchanged %, and the first checkpoint's Sim_K to the newest channel (the newest
checkpoint's own Sim_K is 1 by construction)."""

logger = logging.getLogger(__name__)


class OpdLensCallback(TrainerCallback):
    """``Trainer(..., callbacks=[OpdLensCallback(...)])``.

    - ``projector``: attached to the model and optimizer when training begins, detached when it ends.
    - ``store`` (a :class:`~opd_lens.Store` or its path) with ``origin`` (W_0's checkpoint directory): on every save
      the run ``run_name`` (default: ``args.run_name``, else the output directory's name) is registered once, with
      ``method``, and the new checkpoint is computed into the store. A failure is logged as a warning naming the
      checkpoint; training goes on.
    - ``monitor`` (anything with ``refresh()``, e.g. :class:`~opd_lens.LockMonitor`): refreshed after each save.

    After each save it reports the finite ones of the checkpoint's :data:`FIGURES` (``opd_lens/<column>``) and of the
    monitor's alarm count (``opd_lens/alarms``, if it has ``alarms``) through ``Trainer.log`` of the Trainer running
    it, found up the call stack (callback events are not given the trainer), so that every ``report_to`` integration
    records them at the checkpoint's step.

    Only the main process (``state.is_world_process_zero``) writes the store, refreshes the monitor and reports.
    """

    def __init__(
        self,
        *,
        projector: SubspaceProjector | None = None,
        store: Store | str | os.PathLike | None = None,
        origin: str | os.PathLike | None = None,
        run_name: str | None = None,
        method: str | None = None,
        monitor=None,
    ):
        if (store is None) != (origin is None):
            raise ValueError("store and origin go together: the store needs the run's origin checkpoint")
        self.projector, self.store, self.origin = projector, store, origin
        self.run_name, self.method, self.monitor = run_name, method, monitor
        self._registered = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The Trainer creates the optimizer (an Accelerate wrapper) before this event and passes it to every event.
        if self.projector is not None:
            self.projector.attach(model, optimizer)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        figures: dict[str, float] = {}
        try:
            if self.store is not None:
                if not isinstance(self.store, Store):
                    self.store = open_store(self.store)
                name = self.run_name or args.run_name or Path(args.output_dir).name
                if not self._registered:
                    assert self.origin is not None  # __init__: store and origin go together
                    self.store.add_run(name, args.output_dir, self.origin, method=self.method)
                    self._registered = True
                self.store.compute(runs=[name], progress=False)
                row = summarize(self.store.dataset().sel(run=[name])).loc[name]
                figures |= {f"opd_lens/{column}": float(row[column]) for column in FIGURES}
            if self.monitor is not None:
                self.monitor.refresh()
                if hasattr(self.monitor, "alarms"):
                    figures["opd_lens/alarms"] = len(self.monitor.alarms)
            if figures := {k: v for k, v in figures.items() if math.isfinite(v)}:
                self._trainer().log(figures)
        except Exception as e:  # diagnostics must never stop a training run
            logger.warning("opd_lens could not process %s (training goes on): %s: %s", checkpoint, type(e).__name__, e)

    def _trainer(self) -> Trainer:
        """The ``Trainer`` whose callback handler, up the call stack, holds this callback."""
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and self in owner.callback_handler.callbacks:
                return owner
            frame = frame.f_back
        raise RuntimeError("no transformers Trainer running this callback to log through")

    def on_train_end(self, args, state, control, **kwargs):
        if self.projector is not None:
            self.projector.detach()
