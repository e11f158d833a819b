"""Small matrices computed side by side on the CPU give the very values of a one-thread, one-at-a-time compute."""

from __future__ import annotations

import pytest
import torch
import xarray as xr

import opd_lens
from opd_lens.engine import pipeline
from opd_lens.testing import qwen3_config, write_planted_run


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_side_by_side_equals_one_at_a_time(tmp_path, torch_threads, monkeypatch):
    config = qwen3_config(layers=2, hidden=192, intermediate=320, heads=4, kv_heads=2)
    origin, run = write_planted_run(tmp_path / "run", config=config, steps=(1, 2, 3), rank=6)
    used = []
    submit = pipeline.SideBySide.submit
    monkeypatch.setattr(pipeline.SideBySide, "submit", lambda self, c, n: used.append(self._pool) or submit(self, c, n))
    out = {}
    for threads in (1, 2):
        torch_threads(threads)
        out[threads] = opd_lens.compute(
            tmp_path / f"store-{threads}", run, origin=origin, name="r", endpoint="all", progress=False
        )
    assert used[0] is None and used[-1] is not None  # one thread: in order; two: side by side
    xr.testing.assert_identical(out[1].drop_attrs(), out[2].drop_attrs())
    assert torch.get_num_threads() == 2  # the workers' single thread does not leak into the caller


def test_a_large_matrix_waits_for_the_small_ones_and_order_is_kept(monkeypatch, torch_threads):
    monkeypatch.setattr(pipeline, "SIDE_BY_SIDE_NUMEL", 10)
    torch_threads(2)
    with pipeline.SideBySide(torch.device("cpu")) as side:
        order = []
        for i, numel in enumerate([5, 5, 100, 5]):
            side.submit(lambda i=i: i, numel)
            order += side.done()
        order += side.done(wait=True)
    assert order == [0, 1, 2, 3]
