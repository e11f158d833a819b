"""The classroom notebooks run top to bottom on the ci zoo, in order, sharing one demo directory; they are committed
without outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import opd_lens

NOTEBOOKS = Path(__file__).resolve().parent.parent / "demo_notebooks"
NAMES = [
    "01_quickstart.ipynb",
    "02_regimes.ipynb",
    "03_subspace_locking.ipynb",
    "04_controls.ipynb",
    "05_your_checkpoints.ipynb",
]
SETUP = '''import os
from pathlib import Path

import opd_lens

DEMO = Path(os.environ.get("OPD_LENS_DEMO", "../opd-lens-demo"))  # where `opd-lens demo` works
PRESET = os.environ.get("OPD_LENS_PRESET", "classroom")  # CI runs these notebooks on "ci"'''


@pytest.fixture(scope="module")
def demo(ci_zoo, tmp_path_factory) -> Path:
    """A demo directory holding a copy of the trained ci zoo; the notebooks add the store, report and runs."""
    out = tmp_path_factory.mktemp("notebooks") / "demo"
    shutil.copytree(ci_zoo[0], out / "zoo")
    return out


def run(name: str, demo: Path, monkeypatch) -> nbformat.NotebookNode:
    """Execute a notebook from ``demo_notebooks/`` on the ci preset; a cell that raises fails the test."""
    monkeypatch.setenv("OPD_LENS_DEMO", str(demo))  # the kernel inherits this environment
    monkeypatch.setenv("OPD_LENS_PRESET", "ci")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def output(nb: nbformat.NotebookNode, source: str) -> str:
    """The printed and plain-text output of the first code cell whose source contains ``source``."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and source in c.source)
    parts = [o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs]
    return "".join(parts)


def test_notebooks_are_committed_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code[0].source == SETUP, name
        assert len(nb.cells) <= 25, name
        for i, cell in enumerate(code):
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: code cell {i} has outputs"
            assert not cell.source.lstrip().startswith("!"), f"{name}: code cell {i} is a shell cell"


def test_01_quickstart(demo, monkeypatch):
    nb = run("01_quickstart.ipynb", demo, monkeypatch)
    assert (demo / "report.html").is_file()
    ds = opd_lens.open_store(demo / "store", create=False).dataset()
    assert list(ds.run.values) == ["sft", "opd", "rlvr"]
    # ex.selection (the default: the first run's last step) pulled that matrix's history out of the Dataset
    selection = output(nb, "sel = ex.selection")
    assert "'run': 'sft'" in selection and "'step': 150" in selection
    assert "unchanged_frac" in selection and "stable_rank" in selection
    assert "unchanged_pct" in output(nb, "opd_lens.summarize(ds)")


def test_02_regimes(demo, monkeypatch):
    nb = run("02_regimes.ipynb", demo, monkeypatch)
    table = opd_lens.summarize(opd_lens.open_store(demo / "store", create=False).dataset())
    sparsity = output(nb, '"paper, Qwen3-8B (%)"')
    assert "51.6" in sparsity and f"{table.unchanged_pct['opd']:.1f}" in sparsity
    verdict = output(nb, "u = main.unchanged_pct")
    assert f"OPD {table.unchanged_pct['opd']:.1f}%, RLVR" in verdict and "same order" in verdict


def test_03_subspace_locking(demo, monkeypatch):
    nb = run("03_subspace_locking.ipynb", demo, monkeypatch)
    store = opd_lens.open_store(demo / "store", create=False)
    assert {"opd-k16", "sft-k16"} <= set(store.runs)
    ds = store.dataset()
    assert ds.stable_rank.sel(run="opd-k16").notnull().any()  # the retrained run was computed into the store
    assert "'start': 20" in output(nb, "opd_k16 = job.wait()") and "'start': 50" in output(nb, "sft_k16 = job.wait()")
    assert "Under the rank-16 constraint OPD is" in output(nb, "NOISE = 0.02")


def test_04_controls(demo, monkeypatch):
    nb = run("04_controls.ipynb", demo, monkeypatch)
    printed = output(nb, "CONTROLS = {")
    assert "controls in this store: none" in printed and "The classroom preset trains them" in printed
    assert "stable rank / OPD" in output(nb, "PAPER = {")


def test_05_your_checkpoints(demo, monkeypatch):
    nb = run("05_your_checkpoints.ipynb", demo, monkeypatch)
    # the monitor was shown before training and followed every checkpoint the callback computed
    assert "LockMonitor run='live' checkpoints=0" in output(nb, "mon = opd_lens.LockMonitor")
    live = opd_lens.open_store(demo / "live.store", create=False).dataset()
    assert list(live.run.values) == ["live"]
    assert list(live.step.values) == [2, 4, 6]
    assert live.stable_rank.notnull().all()
    assert sorted(p.name for p in (demo / "live").glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    assert "opd" in opd_lens.open_store(demo / "my.store", create=False).runs
    assert "once more: 0 matrices read" in output(nb, "mine = opd_lens.open_store")
    assert "alarms:" in output(nb, 'print("alarms:"')
