"""The diagnostics give the same answers on every available device (CUDA runs where torch sees a GPU)."""

from __future__ import annotations

import pytest
import torch

from opd_lens.diagnostics import Settings, matrix_diagnostics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_matrix_diagnostics_match_cpu(device):
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(96, 40, generator=gen).bfloat16()
    wt = (w0.float() + 0.01 * torch.randn(96, 6, generator=gen) @ torch.randn(6, 40, generator=gen)).bfloat16()
    settings = Settings(angle_k=12, mask_rank=8)
    ref = matrix_diagnostics(w0, wt, settings)
    got = matrix_diagnostics(w0.to(device), wt.to(device), settings)
    assert got.lock_basis.device.type == device
    for name in ("unchanged_frac", "principal_overlap", "lowmag_overlap"):
        assert getattr(got, name) == getattr(ref, name), name  # exact counts: no tolerance
    for name in ("update_fro", "stable_rank", "hill_alpha", "max_angle_u", "max_angle_v", "spectral_shift"):
        assert getattr(got, name) == pytest.approx(getattr(ref, name), rel=1e-9), name
    torch.testing.assert_close(got.angles_v.cpu(), ref.angles_v, rtol=1e-9, atol=1e-12)
