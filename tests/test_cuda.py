"""The CUDA path end to end against the CPU result (skipped where torch sees no GPU; ``pytest -m cuda`` runs these).

On a GPU the Krylov products are float32 GEMMs and the SVDs cuSOLVER's, so the spectra may differ from the CPU's
within the fast path's stated tolerances (stable rank 1%, Hill α 2%, lock_alignment 0.01, angles 0.05°); counts
(unchanged fraction, mask overlaps) are exact and ‖ΔW‖_F is a float64 sum of exact differences (rtol 1e-9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import opd_lens
from opd_lens.diagnostics import Settings, matrix_diagnostics
from opd_lens.engine import resolve_device
from opd_lens.testing import qwen3_config, write_planted_run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch"),
]

EXACT = ("unchanged_frac", "principal_overlap", "lowmag_overlap")
RTOL = {"update_fro": 1e-9, "stable_rank": 0.01, "hill_alpha": 0.02, "spectral_shift": 1e-6}
ATOL = {"lock_alignment": 0.01, "max_angle_u": 0.05, "max_angle_v": 0.05, "angles_u": 0.05, "angles_v": 0.05}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A run whose matrices take the Krylov path (sides above 128) and the exact one (the 64-wide k/v)."""
    config = qwen3_config(layers=2, hidden=256, intermediate=640, heads=4, kv_heads=1)
    return write_planted_run(tmp_path_factory.mktemp("run"), config=config, steps=(10, 20, 30), rank=12)


def test_auto_picks_cuda():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("endpoint", ["last", "all"])
def test_engine_on_cuda_matches_cpu(planted, tmp_path, endpoint):
    origin, run = planted
    settings = Settings(angle_k=32, mask_rank=16)
    got = {}
    for device in ("cpu", "cuda"):
        got[device] = opd_lens.compute(
            tmp_path / device,
            run,
            origin=origin,
            name="r",
            settings=settings,
            device=device,
            endpoint=endpoint,
            progress=False,
        )
    cpu, gpu = got["cpu"], got["cuda"]
    assert cpu.sizes == gpu.sizes
    for name in EXACT:
        np.testing.assert_array_equal(gpu[name].values, cpu[name].values, err_msg=name)
    for name, rtol in RTOL.items():
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=rtol, equal_nan=True, err_msg=name)
    for name, atol in ATOL.items():
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, atol=atol, rtol=0, equal_nan=True, err_msg=name)
    assert np.isfinite(gpu["max_angle_v"].sel(step=30).values).all()  # the endpoint angles were computed


def test_krylov_matrix_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(5)
    w0 = (torch.randn(1024, 384, generator=gen) / 20).bfloat16()
    low = torch.randn(1024, 12, generator=gen) @ torch.randn(12, 384, generator=gen)
    wt = (w0.double() + 2e-3 * low + 1e-3 * torch.randn(1024, 384, generator=gen)).bfloat16()
    settings = Settings(angle_k=64, mask_rank=16)
    ref = matrix_diagnostics(w0, wt, settings)
    got = matrix_diagnostics(w0.cuda(), wt.cuda(), settings)
    for name in EXACT:
        assert getattr(got, name) == getattr(ref, name), name
    for name, rtol in RTOL.items():
        assert getattr(got, name) == pytest.approx(getattr(ref, name), rel=rtol), name
    for name in ("max_angle_u", "max_angle_v"):
        assert getattr(got, name) == pytest.approx(getattr(ref, name), abs=ATOL[name]), name
    sim = (got.lock_basis.cpu().double().T @ ref.lock_basis.double()).pow(2).sum() / ref.lock_basis.shape[1]
    assert float(sim) >= 0.99
