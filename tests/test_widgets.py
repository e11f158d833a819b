"""The widgets' Python side: what they send to the browser equals the Dataset, and bad input is refused clearly."""

from __future__ import annotations

import re
from pathlib import Path

import anywidget
import numpy as np
import pytest
import traitlets
import xarray as xr
from conftest import EVIL_NAME

from opd_lens import Explorer, LockMonitor, open_store
from opd_lens.store import Store
from opd_lens.widgets._data import _module_types, explorer_payload, wire
from opd_lens.widgets.monitor import _breach

JS = Path(__file__).parents[1] / "js" / "src"


def unwire(w: dict) -> np.ndarray:
    return np.frombuffer(w["view"], dtype=w["dtype"]).reshape(w["shape"])


@pytest.fixture(scope="module")
def ds(widget_store) -> xr.Dataset:
    return open_store(widget_store, create=False).dataset()


def test_wire_is_binary_float32_or_int32_c_order():
    a = np.arange(12, dtype=np.float64).reshape(3, 4).T  # Fortran order, float64
    w = wire(a)
    assert isinstance(w["view"], memoryview) and w["dtype"] == "float32" and w["shape"] == [4, 3]
    np.testing.assert_array_equal(unwire(w), a)
    assert wire(np.arange(3, dtype=np.int64))["dtype"] == "int32"


def test_payload_carries_every_metric_cube_exactly(ds):
    p = explorer_payload(ds)
    assert p["runs"] == ["sft", EVIL_NAME] and p["methods"] == ["sft", "opd"]
    assert p["steps"] == [10, 20, 30] and p["layers"] == [0, 1, 2] and len(p["modules"]) == 7
    assert set(p["metrics"]) == {
        "unchanged_frac", "update_fro", "stable_rank", "hill_alpha", "lock_alignment",
        "principal_overlap", "lowmag_overlap", "max_angle_u", "max_angle_v", "spectral_shift", "intruder_dimensions",
        "channel_energy",
    }  # fmt: skip
    for name, w in p["metrics"].items():
        np.testing.assert_array_equal(unwire(w), ds[name].transpose("run", "step", "layer", "module").values)
    np.testing.assert_array_equal(unwire(p["progress"]), ds.progress.values.astype(np.float32))
    assert np.isnan(unwire(p["progress"])[1, 0])  # the second run has no step 10
    assert p["mask_alpha"] == ds.attrs["mask_alpha"]
    assert p["attrs"]["max_angle_u"] == {"long_name": ds.max_angle_u.long_name, "units": "degree"}
    assert p["attrs"]["stable_rank"]["units"] == "1"
    bare = ds[["stable_rank"]].copy()
    bare["stable_rank"].attrs = {"long_name": "my rank", "units": "1"}  # the Dataset's attrs, not the schema's
    assert explorer_payload(bare)["attrs"] == {"stable_rank": {"long_name": "my rank", "units": "1"}}
    bare["stable_rank"].attrs = {}  # a hand-built Dataset: the schema's
    assert explorer_payload(bare)["attrs"]["stable_rank"]["long_name"] == "stable rank of ΔW"


def test_payload_groups_modules_by_type(ds):
    p = explorer_payload(ds)
    assert p["projections"] == p["modules"]  # a dense model: one matrix per projection
    assert p["types"] == ["MLP"] * 3 + ["attention"] * 4
    modules = ["mlp.experts.0.down_proj", "mlp.experts.1.down_proj", "mlp.gate", "self_attn.q_proj", "lm_head"]
    moe = xr.Dataset({"stable_rank": (("module",), np.zeros(5))}, coords={"module": modules})
    moe = moe.assign_coords(Store._expert_coords(modules))  # the coords the store gives a Dataset
    assert _module_types(moe) == {
        "projections": ["mlp.experts.down_proj", "mlp.experts.down_proj", "mlp.gate", "self_attn.q_proj", "lm_head"],
        "types": ["experts", "experts", "MLP", "attention", "other"],
    }
    assert _module_types(moe.drop_vars(["expert", "projection"]))["projections"] == modules  # a hand-built Dataset


def test_payload_angles_are_the_endpoint_steps(ds):
    angles = explorer_payload(ds)["angles"]
    assert angles["steps"] == [10, 20, 30]  # endpoint="all"
    np.testing.assert_array_equal(unwire(angles["v"]), ds.angles_v.values)
    last_only = ds.copy()
    last_only["angles_u"] = ds.angles_u.where(ds.step == 30)
    last_only["angles_v"] = ds.angles_v.where(ds.step == 30)
    assert explorer_payload(last_only)["angles"]["steps"] == [30]


def test_payload_spectrum_every_step_within_its_budget(ds, monkeypatch):
    payload = explorer_payload(ds)
    assert payload["spectrum"]["steps"] == [10, 20, 30] and payload["lock_k"] == ds.attrs["lock_k"]
    np.testing.assert_array_equal(unwire(payload["spectrum"]["s"]), ds.update_spectrum.values)
    monkeypatch.setattr("opd_lens.widgets._data.SPECTRUM_BUDGET", 1)  # too small: each run's last step
    assert explorer_payload(ds)["spectrum"]["steps"] == [30]
    assert explorer_payload(ds.drop_vars("update_spectrum"))["spectrum"] is None


def test_payload_subset_and_unknown_metric(ds):
    p = explorer_payload(ds, ["stable_rank"])
    assert list(p["metrics"]) == ["stable_rank"]
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['nope'\]; the Dataset has \['unchanged_frac'"):
        explorer_payload(ds, ["nope"])


def test_explorer_accepts_a_path_a_store_or_a_dataset(widget_store, ds):
    for source in (widget_store, str(widget_store), open_store(widget_store, create=False), ds):
        ex = Explorer(source)
        assert ex._data["runs"] == ["sft", EVIL_NAME]
    assert ex.selection == {"run": "sft", "layer": 0, "module": "mlp.down_proj", "step": 30}  # the first run
    assert ex.module == "mlp.down_proj"  # one module, not the mean over modules
    assert Explorer(ds, module="").module == ""
    assert "Explorer runs=" in repr(ex)


def test_explorer_of_a_store_offers_channels_across_runs(widget_store, ds):
    """From a store, one metric per run: every run's Sim_K to that run's final channel (its own: lock_alignment;
    the other run starts from another origin: NaN)."""
    from opd_lens.locking import final_channel_overlap

    ex = Explorer(widget_store, metric="channel_overlap:sft")
    names = [f"channel_overlap:{r}" for r in ("sft", EVIL_NAME)]
    assert [m for m in ex._data["metrics"] if m.startswith("channel_overlap:")] == names
    assert ex._data["order"] == list(ex._data["metrics"])  # the picker's order, kept apart from the keys'
    assert ex._data["attrs"]["channel_overlap:sft"] == {"long_name": "Sim_K to sft's final channel", "units": "1"}
    assert "K/n = chance" in ex._data["labels"]["channel_overlap:sft"]
    cube = np.frombuffer(ex._data["metrics"]["channel_overlap:sft"]["view"], np.float32).reshape(ds.stable_rank.shape)
    np.testing.assert_allclose(cube[0], ds.lock_alignment.sel(run="sft").values, atol=1e-6)
    assert np.isnan(cube[1]).all()
    for quiet in (Explorer(ds), Explorer(widget_store, channels=False)):
        assert not any(m.startswith("channel_overlap:") for m in quiet._data["metrics"])
    given = Explorer(ds, channels=final_channel_overlap(widget_store))
    assert given._data["metrics"]["channel_overlap:sft"]["view"].tobytes() == cube.tobytes()


def test_explorer_validates_its_traits(widget_store):
    ex = Explorer(widget_store, metric="unchanged_frac", module="mlp.up_proj", scale="log")
    assert ex.selection["module"] == "mlp.up_proj"  # the module shown is the selected matrix's
    with pytest.raises(traitlets.TraitError, match="metric 'rank' is not in this Dataset; choose one of"):
        ex.metric = "rank"
    with pytest.raises(traitlets.TraitError, match="module 'mlp' is not in this Dataset"):
        ex.module = "mlp"
    with pytest.raises(traitlets.TraitError, match="step 15 is not in this Dataset"):
        ex.selection = {"run": "sft", "layer": 0, "module": "mlp.up_proj", "step": 15}
    with pytest.raises(traitlets.TraitError, match="needs exactly run, layer, module and step"):
        ex.selection = {"run": "sft"}
    ex.selection = {"run": "sft", "layer": 2, "module": "mlp.up_proj", "step": 10}
    assert ex.selection["layer"] == 2
    ex.module = "mlp.down_proj"
    assert ex.selection == {"run": "sft", "layer": 2, "module": "mlp.down_proj", "step": 10}
    ex.module = ""
    assert ex.selection["module"] == "mlp.down_proj"
    with pytest.raises(traitlets.TraitError):
        ex.scale = "sqrt"


def test_bundle_state_is_the_built_module(widget_store):
    ex = Explorer(widget_store)
    state = ex.get_state()
    assert "export default" in state["_esm"] or "render" in state["_esm"]
    assert ".opd-heat" in state["_css"]


def test_monitor_series_and_alarms_match_numpy(widget_store, ds):
    mon = LockMonitor(widget_store, "sft")
    r = ds.sel(run="sft")
    assert mon._data["steps"] == [10, 20, 30] and mon._data["lock_k"] == ds.attrs["lock_k"]
    for name in ("stable_rank", "lock_alignment"):
        v = r[name].values.reshape(3, -1)
        np.testing.assert_allclose(unwire(mon._data[name]["mean"]), np.nanmean(v, 1), rtol=1e-6)
        np.testing.assert_allclose(unwire(mon._data[name]["min"]), np.nanmin(v, 1), rtol=1e-6)
        np.testing.assert_allclose(unwire(mon._data[name]["max"]), np.nanmax(v, 1), rtol=1e-6)
    sims = np.nanmean(r.lock_alignment.values.reshape(3, -1), 1)
    mon.sim_band = [1.1, None]  # everything below: every step but the last (Sim to itself is 1) alarms
    assert [a.split(" at step ")[1] for a in mon.alarms] == ["10", "20"]
    assert mon.alarms[0] == f"Sim_{ds.attrs['lock_k']} {sims[0]:.3g} < 1.1 at step 10"
    mon.from_step = 20
    assert len(mon.alarms) == 1
    ranks = np.nanmean(r.stable_rank.values.reshape(3, -1), 1)
    mon.from_step, mon.sim_band, mon.stable_rank_band = 0, [None, None], [None, float(ranks.min())]
    expected = [f"stable rank {v:.3g} > {ranks.min():g} at step {s}" for s, v in zip([10, 20, 30], ranks, strict=True)]
    assert mon.alarms == [a for a, v in zip(expected, ranks, strict=True) if v > ranks.min()]
    assert len(mon.alarms) == 2
    with pytest.raises(traitlets.TraitError):
        mon.alarms = []


def test_monitor_follows_new_checkpoints(tmp_path):
    from opd_lens.diagnostics import Settings
    from opd_lens.testing import qwen3_config, write_planted_run

    origin, run = write_planted_run(tmp_path / "run", config=qwen3_config(layers=1, hidden=16, intermediate=32))
    store = open_store(tmp_path / "store", Settings(angle_k=4, mask_rank=4))
    store.add_run("opd", run, origin)
    mon = LockMonitor(store, "opd")
    assert mon._data["steps"] == [] and mon.alarms == []
    store.compute(progress=False)
    mon.refresh()
    assert mon._data["steps"] == [25, 50, 75, 100]


def test_monitor_waits_for_a_run_not_registered_yet(widget_store):
    mon = LockMonitor(widget_store, "live")  # the training callback registers it at its first save
    assert mon._data["steps"] == [] and mon.alarms == []
    assert repr(mon) == "<opd_lens.LockMonitor run='live' checkpoints=0 alarms=0>"


def test_the_alarm_rule_leaves_open_sides_and_nan_alone():
    assert _breach(0.5, [0.9, None]) == "< 0.9"
    assert _breach(5.0, [None, 4.0]) == "> 4"
    assert _breach(5.0, [None, None]) is None
    assert _breach(float("nan"), [0.9, None]) is None


def test_monitor_flags_exactly_the_points_it_lists(widget_store):
    mon = LockMonitor(widget_store, "sft", sim_band=(1.1, None), from_step=20)
    assert unwire(mon._data["lock_alignment"]["mean"])[0] < 1.1  # step 10 leaves the band, but before from_step
    assert mon._in_alarm == {"stable_rank": [False] * 3, "lock_alignment": [False, True, False]}

    def listed():
        series = {"stable": "stable_rank", f"Sim_{mon._data['lock_k']}": "lock_alignment"}
        return [(series[a.split()[0]], int(a.split()[-1])) for a in mon.alarms]

    def flagged():
        steps = mon._data["steps"]
        return [(name, s) for name, flags in mon._in_alarm.items() for s, f in zip(steps, flags, strict=True) if f]

    assert listed() == flagged() == [("lock_alignment", 20)]
    for from_step, rank_band in ((0, [None, 0.0]), (20, [None, 0.0]), (0, [None, None])):
        mon.from_step, mon.stable_rank_band = from_step, rank_band
        assert listed() == flagged()
    assert len(listed()) == 2  # Sim at steps 10 and 20; the latest is never checked


def _ts_model_keys(path: Path) -> set[str]:
    """The member names of ``export interface Model { ... }`` in a TypeScript file (nested types skipped)."""
    source = re.sub(r"/\*.*?\*/|//[^\n]*", "", path.read_text(), flags=re.S)
    top, depth = [], 1
    for c in source.split("export interface Model {", 1)[1]:
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0:
            break
        if depth == 1 and c != "}":
            top.append(c)
    return set(re.findall(r"^\s*(\w+)\??\s*:", "".join(top), re.M))


@pytest.mark.parametrize(("widget", "source"), [(Explorer, "explorer/state.ts"), (LockMonitor, "monitor.ts")])
def test_the_ts_model_names_every_synced_trait(widget, source):
    internals = set(anywidget.AnyWidget.class_traits(sync=True))  # ipywidgets' and anywidget's own
    synced = {name for name in widget.class_traits(sync=True) if name not in internals}
    assert _ts_model_keys(JS / source) == synced


def test_runs_have_the_same_colours_in_widgets_and_charts():
    from opd_lens.charts import PALETTE

    source = (JS / "scale.ts").read_text()
    block = source.split("export const RUN_COLORS = [", 1)[1].split("];", 1)[0]
    assert tuple(re.findall(r'"(#[0-9a-f]{6})"', block)) == PALETTE
