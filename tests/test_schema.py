"""The schema table and what follows from it: attributes on every variable, labels for the views, a Dataset that
writes to netCDF, a previous release's store that opens, migrates and computes, and stores that move."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import opd_lens
from opd_lens import charts
from opd_lens.schema import (
    ANGLES,
    SCALARS,
    SCHEMA_VERSION,
    SPECTRA,
    STEP_SCALARS,
    VARIABLES,
    added_after,
    changed_after,
)
from opd_lens.widgets._data import explorer_payload

FIXTURE = Path(__file__).parent / "fixtures" / "store_v1"
RECORDED_AT = "/tmp/opd_lens_fixture"  # where the fixture's store was written (its README)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opd_lens.cli", *args], capture_output=True, text=True, timeout=300)


def attributes(store: Path) -> dict:
    return json.loads((store / "data.zarr" / "zarr.json").read_text())["attributes"]


@pytest.fixture
def old(tmp_path) -> Path:
    """A copy of the schema-1 fixture (store, origin and run) in a folder of its own."""
    root = tmp_path / "project"
    shutil.copytree(FIXTURE, root)
    return root


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> tuple[Path, xr.Dataset, xr.Dataset]:
    """The fixture relocated with the CLI, its Dataset before any write, and after one compute."""
    root = tmp_path_factory.mktemp("migrated") / "project"
    shutil.copytree(FIXTURE, root)
    assert "channel_energy" not in zarr.open_group(root / "store" / "data.zarr", mode="r")
    before = opd_lens.open_store(root / "store", create=False).dataset()
    res = cli("relocate", str(root / "store"), "--from", RECORDED_AT, "--to", str(root))
    assert res.returncode == 0, res.stderr
    assert "5 recorded path(s) moved" in res.stdout
    store = opd_lens.open_store(root / "store", create=False)
    report = store.compute(progress=False)
    assert [step for _, step in report.steps] == [10, 20, 30]  # stored before channel_energy: recomputed
    return root, before, store.dataset()


def test_the_table_is_consistent():
    assert set(SCALARS) | set(ANGLES) | set(SPECTRA) == set(VARIABLES)
    assert "lock_alignment" in SCALARS and "lock_alignment" not in STEP_SCALARS
    assert set(STEP_SCALARS) <= set(opd_lens.diagnostics.MatrixDiagnostics.__dataclass_fields__)
    for v in VARIABLES.values():
        assert v.long_name and v.description and v.units in ("1", "degree"), v.name
        assert (
            v.when in ("step", "endpoint", "final")
            and 1 <= v.since <= v.revised <= SCHEMA_VERSION
            or (v.revised == 1 and v.since <= SCHEMA_VERSION)
        )
        module, _, name = v.formula.rpartition(".")
        assert hasattr(__import__(module, fromlist=[name]), name), v.formula  # the formula it names exists
    assert added_after(1) == ["intruder_dimensions", "channel_energy", "update_spectrum"]
    assert added_after(2) == ["intruder_dimensions", "update_spectrum"] and added_after(SCHEMA_VERSION) == []
    revised = {"lock_alignment", "principal_overlap", "channel_energy", "max_angle_u", "max_angle_v", *ANGLES}
    assert set(changed_after(2)) == revised | {"update_spectrum", "intruder_dimensions"}
    assert changed_after(3) == ["intruder_dimensions"] and changed_after(3, endpoint=False) == []
    assert changed_after(SCHEMA_VERSION) == []


def test_every_variable_carries_its_attributes_and_the_views_their_labels(migrated):
    _, _, ds = migrated
    for name, v in VARIABLES.items():
        expected = {"long_name": v.long_name, "units": v.units, "description": v.description}
        assert ds[name].attrs == expected | ({"comment": v.comment} if v.comment else {})
    assert "NaN where the matrix's column count n ≤ k" in ds.max_angle_v.attrs["comment"]
    payload = explorer_payload(ds)
    assert payload["labels"] == {m: VARIABLES[m].description for m in SCALARS}
    spec = charts.trajectory(ds, "max_angle_v").to_dict()
    assert spec["layer"][-1]["encoding"]["y"]["title"] == "largest principal angle, V side (°)"


def test_dataset_writes_to_netcdf_and_reads_back(migrated, tmp_path):
    _, _, ds = migrated
    ds.to_netcdf(tmp_path / "d.nc")
    back = xr.open_dataset(tmp_path / "d.nc").load()
    for name in VARIABLES:
        np.testing.assert_array_equal(back[name].values, ds[name].values, err_msg=name)
        assert back[name].attrs["long_name"] == VARIABLES[name].long_name
    assert json.loads(back.attrs["runs"]) == json.loads(ds.attrs["runs"])
    assert back.attrs["lock_k"] == ds.attrs["lock_k"]


def test_a_previous_release_store_opens_before_any_write(old):
    """Read-only, a schema-1 store gives the Dataset of today with the new variable NaN, and changes nothing."""
    files = sorted(p.read_bytes() for p in (old / "store").rglob("*") if p.is_file())
    ds = opd_lens.open_store(old / "store", create=False).dataset()
    assert ds.sizes["step"] == 3 and bool(ds.channel_energy.isnull().all())
    assert bool(ds.stable_rank.notnull().all())
    assert sorted(p.read_bytes() for p in (old / "store").rglob("*") if p.is_file()) == files


def test_a_previous_release_store_migrates_and_computes(migrated):
    root, before, ds = migrated
    attrs = attributes(root / "store")
    assert attrs["schema_version"] == SCHEMA_VERSION
    assert "channel_energy" in zarr.open_group(root / "store" / "data.zarr", mode="r")
    assert bool(before.channel_energy.isnull().all()) and bool(before.update_spectrum.isnull().all())
    assert bool(ds.channel_energy.notnull().all()) and float(ds.channel_energy.max()) <= 1.0
    assert bool(ds.update_spectrum.isel(rank_index=0).notnull().all())  # a rank dimension created in place, then filled
    np.testing.assert_allclose(ds.stable_rank, ds.update_fro**2 / ds.update_spectrum.isel(rank_index=0) ** 2, rtol=1e-4)
    # what the old release stored is what today's recompute gives, endpoint angles of the last step included
    for name in (*SCALARS, *ANGLES):
        if name not in added_after(1):
            np.testing.assert_allclose(ds[name].values, before[name].values, rtol=1e-4, atol=1e-6, err_msg=name)
    for name in ("max_angle_v", "intruder_dimensions"):  # endpoint metrics, at the last step only
        assert bool(ds[name].sel(step=30).notnull().all()) and bool(ds[name].sel(step=10).isnull().all()), name
    store = opd_lens.open_store(root / "store", create=False)
    assert store.compute(progress=False).matrices_read == 0  # migrated once: nothing left to do
    assert {e["schema"] for e in store.runs["sft"]["checkpoints"].values()} == {SCHEMA_VERSION}


def test_a_migration_cut_short_is_completed(migrated, tmp_path):
    """A writer killed after creating the new arrays but before recording the version: the next one finishes."""
    root, _, ds = migrated
    copy = tmp_path / "project"
    shutil.copytree(root, copy)
    group = zarr.open_group(copy / "store" / "data.zarr", mode="r+")
    group.attrs["schema_version"] = 1
    store = opd_lens.open_store(copy / "store", create=False)  # moved with its folder: its paths follow
    assert store.compute(progress=False).matrices_read == 0
    assert attributes(copy / "store")["schema_version"] == SCHEMA_VERSION
    xr.testing.assert_identical(store.dataset().drop_attrs(), ds.drop_attrs())


def test_a_store_moved_with_its_runs_follows_them(migrated, tmp_path):
    root, _, ds = migrated
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    shutil.move(root, tmp_path / "gone")  # the original folder is no longer there
    try:
        store = opd_lens.open_store(moved / "store", create=False)
        assert store.runs["sft"]["run_dir"] == str((moved / "run").resolve())
        assert store.compute(progress=False).matrices_read == 0  # same fingerprints: nothing recomputed
        assert attributes(moved / "store")["runs"]["sft"]["origin"] == str((moved / "origin").resolve())
    finally:
        shutil.move(tmp_path / "gone", root)


def test_relocate_mistakes_are_one_line_and_change_nothing(old):
    store = old / "store"
    meta = (store / "data.zarr" / "zarr.json").read_bytes()
    for args, needle in (
        (["--from", "/no/such/folder", "--to", str(old)], "no recorded path lies below /no/such/folder"),
        (["--from", RECORDED_AT, "--to", str(old / "missing")], "which does not exist; nothing changed"),
    ):
        res = cli("relocate", str(store), *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
        assert (store / "data.zarr" / "zarr.json").read_bytes() == meta
    res = cli("relocate", str(old / "nothing"), "--from", RECORDED_AT, "--to", str(old))
    assert res.returncode == 2 and "no opd_lens store here" in res.stderr
