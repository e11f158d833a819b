"""compute(..., client=...) on a real Dask cluster of two worker processes gives the store a local compute gives."""

from __future__ import annotations

import json

import pytest
import xarray as xr

import opd_lens
from opd_lens.diagnostics import Settings
from opd_lens.testing import write_planted_run

distributed = pytest.importorskip("dask.distributed")

SETTINGS = Settings(angle_k=16, mask_rank=8)


def _store(path, runs, **kwargs):
    store = opd_lens.open_store(path, SETTINGS)
    for name, (origin, run_dir) in runs.items():
        store.add_run(name, run_dir, origin)
    report = store.compute(progress=False, **kwargs)
    return store, report


def test_dask_cluster_matches_local(tmp_path):
    runs = {
        "a": write_planted_run(tmp_path / "a", steps=(2, 4, 6, 8), seed=1),
        "b": write_planted_run(tmp_path / "b", steps=(3, 6, 9, 12), seed=2, scale=0.05, layout="verl"),
    }
    local, local_report = _store(tmp_path / "local", runs, endpoint="all")
    with (
        distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        remote, remote_report = _store(tmp_path / "remote", runs, endpoint="all", client=client)
    assert remote_report.steps == local_report.steps
    assert remote_report.matrices_read == local_report.matrices_read
    a, b = local.dataset(), remote.dataset()
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    assert json.loads(a.attrs["runs"]).keys() == json.loads(b.attrs["runs"]).keys()
    again = remote.compute(progress=False)
    assert again.matrices_read == 0 and again.steps == []
