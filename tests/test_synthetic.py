"""The synthetic runs plant the spectra they name (float64 SVDs of the written ΔW, float32 files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd_lens.checkpoints import find_checkpoints, open_checkpoint
from opd_lens.testing import SPECTRA, write_planted_run


def _spectra(tmp_path, spectrum: str, rank: int = 4) -> dict[str, np.ndarray]:
    origin, run = write_planted_run(tmp_path, steps=(1, 2), rank=rank, spectrum=spectrum, dtype=torch.float32)
    w0, wt = open_checkpoint(origin), find_checkpoints(run)[-1]
    out = {}
    for name, info in w0.tensors.items():
        if len(info.shape) == 2 and "layers" in name:
            dw = wt.read(name).double().numpy() - w0.read(name).double().numpy()
            out[name] = np.linalg.svd(dw, compute_uv=False)
    return out


def test_powerlaw_decays_as_one_over_i(tmp_path):
    for name, s in _spectra(tmp_path, "powerlaw").items():
        i = np.arange(1, s.size + 1)
        np.testing.assert_allclose(s * i, s[0], rtol=1e-3, err_msg=name)


def test_planted_has_a_gap_after_its_rank_and_bulk_does_not(tmp_path):
    planted, bulk = _spectra(tmp_path / "p", "planted"), _spectra(tmp_path / "b", "bulk")
    for name in planted:
        assert planted[name][3] / planted[name][4] > 10, name
        assert bulk[name][3] / bulk[name][4] < planted[name][3] / planted[name][4] / 5, name
        tail = bulk[name][4:12]
        assert tail[0] / tail[-1] < 2, (name, tail)  # a bulk: the next singular values close together


def test_unknown_spectrum_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"'flat'.*{', '.join(SPECTRA)}"):
        write_planted_run(tmp_path, spectrum="flat")
    assert not tmp_path.joinpath("origin").exists()
