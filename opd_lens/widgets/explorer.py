"""The Explorer widget: layers × steps × runs of every diagnostic, with a synced selection."""

from __future__ import annotations

import os

import anywidget
import traitlets
import xarray as xr

from ..locking import final_channel_overlap
from ..store import Store, open_store
from ._data import CHANNEL_BUDGET, explorer_payload
from ._static import STATIC

__all__ = ["Explorer"]


class Explorer(anywidget.AnyWidget):
    """Explore a store: small-multiple layer × step heatmaps per run, trajectories, a layer × module grid (the
    selected run and step, modules grouped by type: attention, MLP, experts) and a per-matrix detail panel.

    ``Explorer(store_or_path_or_dataset)`` shows every per-matrix metric (``metrics=`` ships a subset). Click a cell or
    use the arrow keys (PageUp/PageDown change run); :attr:`selection` follows in Python. The heatmaps show one
    module (the first, unless ``module=`` names one; ``module=""`` is the mean over modules)::

        ex = Explorer("runs.zarr", metric="unchanged_frac")
        ex                       # in a notebook cell
        ex.selection             # {'run': 'sft', 'layer': 3, 'module': 'mlp.down_proj', 'step': 200}
        ex.metric = "channel_overlap:opd"   # every run's Sim_K to opd's final channel

    Given a store (not a Dataset), the Explorer also offers channels across runs: metric ``channel_overlap:RUN``
    is each run's Sim_K to RUN's final channel (:func:`~opd_lens.locking.final_channel_overlap`, from the cached
    V_K bases), up to :data:`~opd_lens.widgets._data.CHANNEL_BUDGET` bytes of them (``channels=False``: none; a
    DataArray from that function: those).
    """

    _esm = STATIC / "explorer.js"
    _css = STATIC / "widget.css"
    _data = traitlets.Dict().tag(sync=True)
    metric = traitlets.Unicode(help="the metric shown").tag(sync=True)
    module = traitlets.Unicode(help='the module shown; "" is the mean over modules').tag(sync=True)
    scale = traitlets.Enum(["linear", "log"], "linear", help="the colour scale").tag(sync=True)
    selection = traitlets.Dict(help="the selected matrix and step: run, layer, module, step").tag(sync=True)

    def __init__(
        self,
        source: xr.Dataset | Store | str | os.PathLike,
        *,
        metric: str = "stable_rank",
        module: str | None = None,
        scale: str = "linear",
        selection: dict | None = None,
        metrics: list[str] | None = None,
        channels: bool | xr.DataArray = True,
    ):
        store = None
        if isinstance(source, xr.Dataset):
            ds = source
        else:
            store = source if isinstance(source, Store) else open_store(source, create=False)
            ds = store.dataset()
        size = ds.sizes["run"] * ds.stable_rank.size * 4  # runs² float32 (run, step, layer, module) cubes
        overlap = channels if isinstance(channels, xr.DataArray) else None
        if channels is True and store is not None and size <= CHANNEL_BUDGET:
            overlap = final_channel_overlap(store, ds)
        data = explorer_payload(ds, metrics, overlap)
        module = data["modules"][0] if module is None else module  # the paper reads its findings per module
        r = int(ds.progress.notnull().any("step").argmax("run"))  # the first run with a computed step
        first = ds.isel(run=r)
        default = {
            "run": data["runs"][r],
            "layer": data["layers"][0],
            "module": module or data["modules"][0],
            "step": int(first.step.where(first.progress.notnull()).max()),
        }
        super().__init__(_data=data, metric=metric, module=module, scale=scale, selection=selection or default)

    def __repr__(self) -> str:
        return f"<opd_lens.Explorer runs={self._data['runs']} metric={self.metric!r} selection={self.selection}>"

    @traitlets.validate("metric")
    def _valid_metric(self, proposal):
        return _one_of(proposal.value, list(self._data["metrics"]), "metric")

    @traitlets.validate("module")
    def _valid_module(self, proposal):
        return _one_of(proposal.value, ["", *self._data["modules"]], "module")

    @traitlets.observe("module")
    def _follow_module(self, change):
        """A single module shown is also the selected matrix's module (the mean over modules keeps it)."""
        if change.new and change.new != self.selection["module"]:
            self.selection = {**self.selection, "module": change.new}

    @traitlets.validate("selection")
    def _valid_selection(self, proposal):
        sel = dict(proposal.value)
        if set(sel) != {"run", "layer", "module", "step"}:
            raise traitlets.TraitError(f"selection needs exactly run, layer, module and step, not {sorted(sel)}")
        _one_of(sel["run"], self._data["runs"], "run")
        _one_of(sel["layer"], self._data["layers"], "layer")
        _one_of(sel["module"], self._data["modules"], "module")
        _one_of(sel["step"], self._data["steps"], "step")
        return sel


def _one_of(value, valid: list, what: str):
    if value not in valid:
        raise traitlets.TraitError(f"{what} {value!r} is not in this Dataset; choose one of {valid}")
    return value
