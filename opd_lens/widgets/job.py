"""A rank-constrained retraining of the demo zoo run from a notebook cell: a progress bar and a Cancel button."""

from __future__ import annotations

import os
import threading

import ipywidgets

from ..zoo.retrain import rank_constrained_retrain
from ..zoo.train import Cancelled

__all__ = ["RetrainJob"]


class RetrainJob:
    """:func:`~opd_lens.zoo.retrain.rank_constrained_retrain` in a background thread, shown in a notebook as a
    progress bar with a Cancel button::

        job = RetrainJob("opd-lens-demo/zoo", run="sft", K=16, store="opd-lens-demo/store").start()
        job            # live progress; Cancel stops after the current step (run again to continue)
        job.wait()     # the manifest entry, or raises what the training raised
    """

    def __init__(self, zoo: str | os.PathLike, run: str = "opd", K: int = 16, at: float = 0.2, **kwargs):
        self.args = dict(zoo=zoo, run=run, K=K, at=at, progress=False, **kwargs)
        self.result: dict | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"opd-lens retrain {run}-k{K}", daemon=True)
        self._bar = ipywidgets.IntProgress(description=f"{run}-k{K}", min=0, max=1)
        self._label = ipywidgets.Label("not started")
        self._button = ipywidgets.Button(description="Cancel", button_style="warning")
        self._button.on_click(lambda _: self.cancel())
        self.widget = ipywidgets.HBox([self._bar, self._label, self._button])

    def start(self) -> RetrainJob:
        self._label.value = "starting (computing V_K) ..."
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop after the current step; saved checkpoints are kept and the next run continues from them."""
        self._stop.set()
        self._button.disabled = True
        self._label.value = "cancelling ..."

    def wait(self, timeout: float | None = None) -> dict | None:
        self._thread.join(timeout)
        if self.error is not None and not isinstance(self.error, Cancelled):
            raise self.error
        return self.result

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _on_step(self, step: int, total: int, record: dict | None) -> None:
        self._bar.max, self._bar.value = total, step
        if record is not None:
            self._label.value = f"step {step}/{total}: held-out accuracy {record['eval_accuracy']:.3f}"

    def _run(self) -> None:
        try:
            self.result = rank_constrained_retrain(**self.args, stop=self._stop, on_step=self._on_step)
            self._label.value = f"done: final held-out accuracy {self.result['checkpoints'][-1]['eval_accuracy']:.3f}"
        except BaseException as e:  # reported in the widget and by wait()
            self.error = e
            self._label.value = str(e) if isinstance(e, Cancelled) else f"failed: {e}"
        finally:
            self._button.disabled = True

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
