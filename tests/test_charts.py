"""The altair chart builders: the data each chart carries equals an independent numpy/xarray aggregate of a real
store (two synthetic runs with different steps, principal angles at every step), filters and errors, colours
consistent across charts, and PNG/SVG export through vl-convert."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from opd_lens import charts, open_store
from opd_lens.diagnostics import Settings
from opd_lens.errors import OpdLensError
from opd_lens.summary import summarize
from opd_lens.testing import qwen3_config, write_planted_run

RUNS = {"small": dict(scale=0.005, steps=(10, 20, 30)), "large": dict(scale=0.05, steps=(25, 50), layout="verl")}
MATRIX = ("layer", "module")
ACCURACY = pd.DataFrame(
    {
        "run": ["plain", "plain", "locked", "locked"],
        "method": ["opd", "opd", "opd-k16", "opd-k16"],
        "step": [10, 20, 10, 20],
        "accuracy": [0.2, 0.4, 0.25, 0.35],
        "constrained": [False, False, True, True],
    }
)


@pytest.fixture(scope="module")
def ds(tmp_path_factory, one_torch_thread) -> xr.Dataset:
    """Two runs on a tiny Qwen3 (hidden 32, one kv head: k/v have 8 rows, fewer than angle_k = 16)."""
    out = tmp_path_factory.mktemp("charts")
    store = open_store(out / "store", Settings(angle_k=16, mask_rank=8))
    config = qwen3_config(layers=2, hidden=32, intermediate=48, kv_heads=1)
    for seed, (name, kwargs) in enumerate(RUNS.items()):
        origin, run = write_planted_run(out / name, config=config, seed=seed, **kwargs)
        store.add_run(name, run, origin, method=f"synthetic {name}")
    store.compute(progress=False, endpoint="all")
    return store.dataset()


def rows(chart: alt.TopLevelMixin, field: str) -> list[dict]:
    """The rows of the chart's one dataset that has ``field``."""
    found = [d for d in chart.to_dict()["datasets"].values() if d and field in d[0]]
    assert len(found) == 1
    return found[0]


def color_scales(spec) -> list[dict]:
    """Every run colour scale in a chart spec."""
    if isinstance(spec, dict):
        color = spec.get("color")
        here = [color["scale"]] if isinstance(color, dict) and color.get("field") == "run" else []
        return here + [s for v in spec.values() for s in color_scales(v)]
    if isinstance(spec, list):
        return [s for v in spec for s in color_scales(v)]
    return []


def run_steps(ds: xr.Dataset, run: str) -> np.ndarray:
    return ds.step.values[ds.progress.sel(run=run).notnull().values]


@pytest.mark.parametrize("metric", ["stable_rank", "update_fro", "lock_alignment", "max_angle_v"])
def test_trajectory_is_mean_min_max_over_matrices_per_existing_step(ds, metric):
    got = {(r["run"], r["step"]): r for r in rows(charts.trajectory(ds, metric), "mean")}
    want = {}
    for run in RUNS:
        for step in run_steps(ds, run):
            values = ds[metric].sel(run=run, step=step).values.ravel()
            values = values[~np.isnan(values)]
            want[(run, int(step))] = (values.mean(), values.min(), values.max(), len(values))
    assert sorted(got) == sorted(want)  # only the steps each run has: (small, 25) is absent
    for key, (mean, lo, hi, n) in want.items():
        r = got[key]
        np.testing.assert_allclose([r["mean"], r["min"], r["max"]], [mean, lo, hi], rtol=1e-5)
        # lock_k = 16 ≥ the 8 rows of k/v (2 layers x 2): no channel to measure, NaN
        assert r["matrices"] == n == (10 if metric == "lock_alignment" else 14)
        assert r["progress"] == pytest.approx(key[1] / max(RUNS[key[0]]["steps"]))
    assert any(r["min"] < r["max"] for r in got.values())  # a real band, not one matrix


def test_trajectory_filters_matrices_and_runs(ds):
    chart = charts.trajectory(ds, "stable_rank", module="self_attn.k_proj", layer=1, runs=["large"])
    got = rows(chart, "mean")
    assert [r["step"] for r in got] == [25, 50]
    for r in got:
        value = float(ds.stable_rank.sel(run="large", step=r["step"], layer=1, module="self_attn.k_proj"))
        assert r["matrices"] == 1
        np.testing.assert_allclose([r["mean"], r["min"], r["max"]], value, rtol=1e-6)
    both = rows(charts.trajectory(ds, "stable_rank", module=["mlp.up_proj", "mlp.down_proj"]), "mean")
    assert {r["matrices"] for r in both} == {4}
    assert "module self_attn.k_proj, layer 1" in chart.to_dict()["title"]["subtitle"]
    unlisted = ds.assign_coords(progress=ds.progress.where(ds.step != 30))  # a step the run does not list
    assert {r["step"] for r in rows(charts.trajectory(unlisted, runs=["small"]), "mean")} == {10, 20}


def test_run_colours_follow_the_dataset_order_in_every_chart(ds):
    colors = charts.run_colors(ds)
    assert colors == {"small": charts.PALETTE[0], "large": charts.PALETTE[1]}
    for chart in (charts.trajectory(ds), charts.regimes(ds), charts.overlaps(ds)):
        for scale in color_scales(chart.to_dict()):
            assert scale == {"domain": ["small", "large"], "range": [colors["small"], colors["large"]]}
    (only,) = set(map(str, color_scales(charts.trajectory(ds, runs=["large"]).to_dict())))
    assert only == str({"domain": ["large"], "range": [colors["large"]]})  # filtered, same colour
    angles = charts.angle_profiles(ds, "large", 0, "mlp.up_proj").to_dict()
    assert {layer["encoding"]["color"]["value"] for layer in angles["layer"]} == {colors["large"]}


def test_bands_are_drawn_for_few_runs_only(ds):
    """Eight overlapping min–max bands are an unreadable wash: by default only up to MAX_BANDS runs get them."""
    assert len(charts.trajectory(ds).to_dict()["layer"]) == 2  # two runs: band and line
    many = xr.concat([ds.assign_coords(run=[f"{r}-{i}" for r in ds.run.values]) for i in range(2)], "run")
    spec = charts.trajectory(many).to_dict()
    assert len(spec["layer"]) == 1 and spec["layer"][0]["mark"]["type"] == "line"
    assert "bands drawn for ≤ 3 runs" in spec["title"]["subtitle"]
    assert len(charts.trajectory(many, bands=True).to_dict()["layer"]) == 2
    assert len(charts.trajectory(ds, bands=False).to_dict()["layer"]) == 1


def test_regimes_shows_summarize(ds):
    table = summarize(ds)
    got = {r["run"]: r for r in rows(charts.regimes(ds), "unchanged_pct")}
    assert list(got) == list(table.index)
    for run, r in got.items():
        for column in ("unchanged_pct", "max_angle_v_deg", "max_angle_u_deg", "spectral_shift"):
            assert r[column] == pytest.approx(table.loc[run, column])
        last = ds.sel(run=run, step=run_steps(ds, run)[-1])
        weights = ds.numel.sel(run=run).values
        weighted = 100 * (last.unchanged_frac.values * weights).sum() / weights.sum()  # independent of summarize
        assert r["unchanged_pct"] == pytest.approx(weighted, rel=1e-5)
        assert r["max_angle_v_deg"] == pytest.approx(float(np.nanmean(last.max_angle_v.values)), rel=1e-5)
    assert got["large"]["max_angle_v_deg"] > got["small"]["max_angle_v_deg"]  # the planted update is 10x larger
    spec = charts.regimes(ds).to_dict()
    assert [c["encoding"]["y"]["field"] for row in spec["vconcat"] for c in row["hconcat"]] == [
        "unchanged_pct",
        "max_angle_v_deg",
        "max_angle_u_deg",
        "spectral_shift",
    ]


def test_overlaps_at_the_last_step_against_the_random_baseline(ds):
    chart = charts.overlaps(ds)
    got = {(r["run"], r["mask"]): r for r in rows(chart, "mask")}
    for run in RUNS:
        last = run_steps(ds, run)[-1]
        for mask, var in (("principal", "principal_overlap"), ("low-magnitude", "lowmag_overlap")):
            r = got[(run, mask)]
            assert r["step"] == last
            assert r["overlap"] == pytest.approx(100 * np.nanmean(ds[var].sel(run=run, step=last).values), rel=1e-5)
    (baseline,) = rows(chart, "label")
    assert baseline["overlap"] == pytest.approx(100 * ds.attrs["mask_alpha"])
    assert baseline["label"].startswith("random")
    at_20 = rows(charts.overlaps(ds, step=20), "mask")
    assert {(r["run"], r["step"]) for r in at_20} == {("small", 20)}  # "large" has no step 20
    with pytest.raises(charts.ChartError, match=r"no run has step 7; valid: 'last' or one of \[10, 20, 25, 30, 50\]"):
        charts.overlaps(ds, step=7)


def test_angle_profiles_of_one_matrix(ds):
    got = rows(charts.angle_profiles(ds, "large", 1, "self_attn.k_proj"), "angle")
    u = ds.angles_u.sel(run="large", step=50, layer=1, module="self_attn.k_proj").values
    assert np.isnan(u).all() and not [r for r in got if r["side"] == "U (left)"]  # 8 rows ≤ k: 0 by construction
    subtitle = charts.angle_profiles(ds, "large", 1, "self_attn.k_proj").to_dict()["title"]["subtitle"]
    assert subtitle == [
        "run large, step 50",
        "U side not shown: k spans that whole side, so its angles are 0 by construction",
    ]
    want = ds.angles_v.sel(run="large", step=50, layer=1, module="self_attn.k_proj").values
    assert np.isnan(want[8:]).all()  # k_proj is 8 x 32: 8 angles of 16, NaN dropped
    mine = [r for r in got if r["side"] == "V (right)"]
    assert [r["angle_index"] for r in mine] == list(range(8))
    np.testing.assert_allclose([r["angle"] for r in mine], want[:8], rtol=1e-6)
    at_25 = rows(charts.angle_profiles(ds, "large", 0, "mlp.up_proj", step=25), "angle")
    want = ds.angles_v.sel(run="large", step=25, layer=0, module="mlp.up_proj").values
    np.testing.assert_allclose([r["angle"] for r in at_25 if r["side"] == "V (right)"], want, rtol=1e-6)


def test_angle_profiles_say_what_is_missing(ds):
    with pytest.raises(charts.ChartError, match=r"at step 20; steps with angles: \[25, 50\]"):
        charts.angle_profiles(ds, "large", 0, "mlp.up_proj", step=20)
    none = ds.assign(angles_u=ds.angles_u * np.nan, angles_v=ds.angles_v * np.nan)
    with pytest.raises(OpdLensError, match="no principal angles stored for run 'small', layer 0, module 'mlp.up_proj'"):
        charts.angle_profiles(none, "small", 0, "mlp.up_proj")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ds: charts.trajectory(ds, "angles_u"), r"unknown metric 'angles_u'; valid: 'unchanged_frac', .*"),
        (lambda ds: charts.trajectory(ds, module="q_proj"), r"unknown module 'q_proj'; valid: 'mlp.down_proj', .*"),
        (lambda ds: charts.trajectory(ds, layer=[0, 5]), r"unknown layer 5; valid: 0, 1$"),
        (lambda ds: charts.trajectory(ds, runs=["rlvr"]), r"unknown run 'rlvr'; valid: 'small', 'large'$"),
        (lambda ds: charts.angle_profiles(ds, "large", 0, "up_proj"), r"unknown module 'up_proj'"),
    ],
)
def test_unknown_names_list_the_valid_ones(ds, call, message):
    with pytest.raises(ValueError, match=message) as info:
        call(ds)
    assert isinstance(info.value, OpdLensError)


def test_constrained_accuracy_dashes_constrained_runs():
    chart = charts.constrained_accuracy(ACCURACY)
    got = rows(chart, "accuracy")
    assert [(r["run"], r["step"], r["accuracy"], r["training"]) for r in got] == [
        ("plain", 10, 0.2, "plain"),
        ("plain", 20, 0.4, "plain"),
        ("locked", 10, 0.25, "constrained"),
        ("locked", 20, 0.35, "constrained"),
    ]
    (line, _points) = chart.to_dict()["layer"]
    dash = line["encoding"]["strokeDash"]
    assert (dash["field"], dash["scale"]["domain"]) == ("training", ["plain", "constrained"])
    assert dash["scale"]["range"][0] == [1, 0] and dash["scale"]["range"][1] != [1, 0]
    assert line["encoding"]["x"]["field"] == "step"
    by_progress = charts.constrained_accuracy(ACCURACY.assign(progress=ACCURACY.step / 20))
    assert by_progress.to_dict()["layer"][0]["encoding"]["x"]["field"] == "progress"


def test_constrained_accuracy_names_missing_columns():
    with pytest.raises(charts.ChartError, match=r"missing \['accuracy', 'constrained'\]"):
        charts.constrained_accuracy(ACCURACY.drop(columns=["accuracy", "constrained"]))
    with pytest.raises(ValueError, match=r"step \(or progress\).*missing \['step'\]"):
        charts.constrained_accuracy(ACCURACY.drop(columns="step"))


BUILDERS = {
    "trajectory": charts.trajectory,
    "regimes": charts.regimes,
    "overlaps": charts.overlaps,
    "angles": lambda ds: charts.angle_profiles(ds, "small", 0, "self_attn.q_proj"),
    "accuracy": lambda ds: charts.constrained_accuracy(ACCURACY),
}


@pytest.mark.parametrize("name", BUILDERS)
def test_charts_carry_small_data_and_export_png_and_svg(ds, name, tmp_path):
    chart = BUILDERS[name](ds)
    spec = chart.to_dict()
    assert spec["title"]
    assert all(0 < len(d) < 5000 for d in spec["datasets"].values())
    chart.save(tmp_path / "c.png")
    chart.save(tmp_path / "c.svg")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "c.svg").read_text()
    assert svg.lstrip().startswith("<svg") and svg.rstrip().endswith("</svg>")


def test_enable_offline_bundles_vega():
    renderer = alt.renderers.active
    try:
        charts.enable_offline()
        assert alt.JupyterChart._is_offline and alt.renderers.active == "jupyter"
        assert "esm.sh" not in alt.JupyterChart._esm  # the CDN imports are replaced by vl-convert's bundle
    finally:
        alt.JupyterChart.enable_offline(False)
        alt.renderers.enable(renderer)
