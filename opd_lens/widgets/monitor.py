"""The LockMonitor widget: a live view of one run's stable rank and lock alignment as checkpoints arrive."""

from __future__ import annotations

import os
import threading

import anywidget
import numpy as np
import traitlets

from ..errors import StoreError
from ..store import Store, open_store
from ._data import wire
from ._static import STATIC

__all__ = ["LockMonitor"]

_MATRIX = ("layer", "module")


class LockMonitor(anywidget.AnyWidget):
    """Stable rank of ΔW_t and Sim_K to the latest channel, per checkpoint of ``run``, with alarm bands.

    Feed it with ``opd-lens watch`` (or the training callback) writing to ``store`` and call :meth:`refresh`, or
    :meth:`follow` to poll. ``run`` need not be in the store yet: until its first checkpoint is computed the view
    waits (a live run is registered only once it has saved a checkpoint). A checkpoint (from ``from_step`` on)
    whose mean over matrices leaves a band raises an alarm, listed in :attr:`alarms` and drawn red. Sim_K is
    measured against the latest checkpoint, so the latest itself is 1 and is not checked.
    """

    _esm = STATIC / "monitor.js"
    _css = STATIC / "widget.css"
    run = traitlets.Unicode().tag(sync=True)
    _data = traitlets.Dict().tag(sync=True)
    sim_band = traitlets.List([0.9, None], minlen=2, maxlen=2, help="[low, high] of Sim_K; None is open").tag(sync=True)
    stable_rank_band = traitlets.List([None, None], minlen=2, maxlen=2, help="[low, high] of the stable rank").tag(
        sync=True
    )
    from_step = traitlets.Int(0, help="checkpoints before this step raise no alarm").tag(sync=True)
    alarms = traitlets.List(traitlets.Unicode(), read_only=True, help="one message per value out of its band").tag(
        sync=True
    )
    _in_alarm = traitlets.Dict(read_only=True, help="per series, whether each checkpoint is in alarm").tag(sync=True)

    def __init__(
        self,
        store: Store | str | os.PathLike,
        run: str,
        *,
        sim_band: tuple[float | None, float | None] = (0.9, None),
        stable_rank_band: tuple[float | None, float | None] = (None, None),
        from_step: int = 0,
    ):
        self.store = store if isinstance(store, Store) else open_store(store, create=False)
        super().__init__(run=run, sim_band=list(sim_band), stable_rank_band=list(stable_rank_band), from_step=from_step)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.observe(lambda _: self._check(), ["sim_band", "stable_rank_band", "from_step"])
        self.refresh()

    def __repr__(self) -> str:
        steps = self._data["steps"]
        return f"<opd_lens.LockMonitor run={self.run!r} checkpoints={len(steps)} alarms={len(self.alarms)}>"

    def refresh(self) -> None:
        """Re-read the store and redraw."""
        try:
            ds = self.store.dataset().sel(run=self.run)
            ds = ds.isel(step=np.flatnonzero(ds.progress.notnull().values))
        except (StoreError, KeyError):  # nothing computed for this run yet
            ds = None
        steps = [] if ds is None else [int(s) for s in ds.step.values]
        series = {}
        for name in ("stable_rank", "lock_alignment"):
            v = None if ds is None else ds[name]
            series[name] = {
                stat: wire(np.zeros(0) if v is None else getattr(v, stat)(_MATRIX, skipna=True).values)
                for stat in ("mean", "min", "max")
            }
        lock_k = self.store.settings.lock_k
        with self.hold_sync():
            self._data = {"steps": steps, **series, "lock_k": lock_k}
            self._check()

    def follow(self, every: float = 5.0) -> None:
        """Refresh every ``every`` seconds in a background thread until :meth:`stop`."""
        self.stop()
        self._stop.clear()

        def loop():
            while not self._stop.wait(every):
                self.refresh()

        self._thread = threading.Thread(target=loop, name=f"opd-lens LockMonitor {self.run}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop :meth:`follow`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _check(self) -> None:
        """Set :attr:`alarms` and the per-checkpoint flags the view draws red: the one alarm rule."""
        steps = self._data["steps"]
        found, flags = [], {}
        for name, band, label in (
            ("stable_rank", self.stable_rank_band, "stable rank"),
            ("lock_alignment", self.sim_band, f"Sim_{self._data['lock_k']}"),
        ):
            means = np.frombuffer(self._data[name]["mean"]["view"], np.float32)
            checked = steps[:-1] if name == "lock_alignment" else steps
            flags[name] = [False] * len(steps)
            for i, (step, v) in enumerate(zip(checked, means, strict=False)):
                breach = None if step < self.from_step else _breach(float(v), band)
                if breach:
                    flags[name][i] = True
                    found.append(f"{label} {v:.3g} {breach} at step {step}")
        with self.hold_sync():
            self.set_trait("alarms", found)
            self.set_trait("_in_alarm", flags)


def _breach(v: float, band: list) -> str | None:
    """How ``v`` leaves ``[low, high]`` (``"< low"`` or ``"> high"``), or None: inside, NaN, or on an open side."""
    low, high = band
    if low is not None and v < low:
        return f"< {low:g}"
    if high is not None and v > high:
        return f"> {high:g}"
    return None
