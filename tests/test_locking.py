"""Lock alignment over a store (against a numpy float64 oracle) and rank-constrained retraining of the ci zoo."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from opd_lens import charts, open_store
from opd_lens.checkpoints.writer import save_checkpoint
from opd_lens.cli import main
from opd_lens.diagnostics import Settings
from opd_lens.errors import ChartError, StoreError, ZooError
from opd_lens.locking import channel_overlap, final_channel_overlap, lock_alignment, lock_summary
from opd_lens.testing import qwen3_config, qwen3_shapes
from opd_lens.widgets import RetrainJob
from opd_lens.zoo import load_zoo, rank_constrained_retrain, retrain_accuracy
from opd_lens.zoo.train import STATE, Cancelled

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = (10, 20, 30, 40)
K = 4
ARTIFACTS = Path(__file__).parents[1] / "build" / "test-artifacts"


def _rotating_run(root: Path) -> tuple[Path, Path]:
    """ΔW_t = (1 − s)·A + s·B with s = t/T: rank-4 channels A and B with different right subspaces, so the channel
    turns from A's to a mix over training (and a second, locked run: ΔW_t = (t/T)·A)."""
    config = qwen3_config(layers=1, hidden=32, intermediate=48)
    g = torch.Generator().manual_seed(0)
    origin = {n: torch.randn(s, generator=g) * 0.05 for n, s in qwen3_shapes(config).items()}

    def planted(shape):
        out, inp = shape
        return 0.02 * torch.randn(out, 4, generator=g) @ torch.randn(4, inp, generator=g)

    a = {n: planted(w.shape) for n, w in origin.items() if w.ndim == 2}
    b = {n: planted(w.shape) for n, w in a.items()}
    save_checkpoint(root / "origin", origin, config=config)
    for t in STEPS:
        s = t / STEPS[-1]
        turning = {n: w + ((1 - s) * a[n] + s * b[n] if n in a else 0) for n, w in origin.items()}
        locked = {n: w + (s * a[n] if n in a else 0) for n, w in origin.items()}
        save_checkpoint(root / "turning" / f"checkpoint-{t}", turning, step=t, config=config)
        save_checkpoint(root / "locked" / f"checkpoint-{t}", locked, step=t, config=config)
    return root / "origin", root


@pytest.fixture(scope="module")
def lock_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    origin, runs = _rotating_run(root)
    store = open_store(root / "store", Settings(angle_k=4, mask_rank=4, lock_k=K, exact=True))
    for name in ("turning", "locked"):
        store.add_run(name, runs / name, origin)
    store.compute(progress=False, endpoint="none")
    return store, origin, runs


def _oracle_basis(origin: Path, ckpt: Path, name: str) -> np.ndarray:
    w0 = load_file(origin / "model.safetensors")[name].double().numpy()
    wt = load_file(ckpt / "model.safetensors")[name].double().numpy()
    return np.linalg.svd(wt - w0)[2][:K].T


def test_channel_overlap_across_runs_matches_a_numpy_oracle(lock_store):
    """Sim_K between the channels of two runs from one origin, from the cached bases: every cell against numpy."""
    store, origin, runs = lock_store
    over = channel_overlap(store, "turning", "locked", other_steps=[10, 40])
    assert over.dims == ("step", "other_step", "layer", "module") and over.shape[:2] == (4, 2)
    assert over.attrs["run"] == "turning" and over.attrs["lock_k"] == K and over.attrs["units"] == "1"
    shapes = qwen3_shapes(qwen3_config(layers=1, hidden=32, intermediate=48))
    for module in over.module.values:
        name = f"model.layers.0.{module}.weight"
        assert float(over.chance.sel(module=module)) == K / shapes[name][1]  # K/n: two random K-dim subspaces
        for s in (10, 40):
            theirs = _oracle_basis(origin, runs / "locked" / f"checkpoint-{s}", name)
            for t in STEPS:
                mine = _oracle_basis(origin, runs / "turning" / f"checkpoint-{t}", name)
                cell = float(over.sel(step=t, other_step=s, layer=0, module=module))
                assert cell == pytest.approx(np.linalg.norm(mine.T @ theirs) ** 2 / K, abs=1e-6)
    # known answers: "locked" keeps channel A throughout; "turning" starts near A and ends between A and B
    same = channel_overlap(store, "locked", "locked")
    assert float(same.min()) == pytest.approx(1.0, abs=1e-6)  # float32 storage
    mean = over.sel(other_step=40).mean(["layer", "module"])
    assert float(mean.sel(step=10)) > 0.9 and bool((mean.diff("step") < 0).all())
    assert float(mean.sel(step=40)) < 2 * float(over.chance.mean())  # channel B against A: chance level


def test_every_pair_at_once_is_channel_overlap_of_each_pair(lock_store, tmp_path):
    """final_channel_overlap: each (other, run) cube is channel_overlap against other's last step, on the Dataset's
    grid; against itself a run gives its lock_alignment; without cached bases there is nothing to give."""
    store, *_ = lock_store
    every = final_channel_overlap(store)
    assert every.dims == ("other", "run", "step", "layer", "module") and list(every.other.values) == [
        "turning",
        "locked",
    ]
    ds = store.dataset()
    for other in ("turning", "locked"):
        for run in ("turning", "locked"):
            pair = channel_overlap(store, run, other).isel(other_step=0, drop=True)
            got = every.sel(other=other, run=run).sel(step=pair.step)
            np.testing.assert_array_equal(got.transpose(*pair.dims).values, pair.values)
        np.testing.assert_allclose(every.sel(other=other, run=other), ds.lock_alignment.sel(run=other), atol=1e-6)
    shutil.copytree(store.path, tmp_path / "store")
    shutil.rmtree(open_store(tmp_path / "store", create=False).run_cache("locked"))
    assert final_channel_overlap(tmp_path / "store") is None


def test_channel_overlap_chart_reads_at_a_glance(lock_store):
    store, *_ = lock_store
    over = channel_overlap(store, "turning", "locked", other_steps=[10, 40])
    chart = charts.channel_overlap(over)
    spec = chart.to_dict()
    line = spec["layer"][1]
    assert line["encoding"]["x"]["title"] == "turning step"
    assert line["encoding"]["y"]["title"] == f"Sim_{K} to locked at step 40"
    assert "turning's channel against locked's" in spec["title"]["text"]
    assert spec["title"]["subtitle"][1].endswith("0.0833 (n = 48), 0.125 (n = 32)")
    assert [row["chance"] for row in spec["datasets"][spec["layer"][0]["data"]["name"]]] == [4 / 48, 4 / 32]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    chart.save(ARTIFACTS / "channel-overlap.png")  # looked at: lines per module, two dashed chance rules
    with pytest.raises(ChartError, match="unknown other_step 20"):
        charts.channel_overlap(over, other_step=20)
    with pytest.raises(ChartError, match="expected the DataArray"):
        charts.channel_overlap(over.rename("x"))


def test_channel_overlap_refuses_runs_from_different_origins(lock_store, tmp_path):
    store, origin, runs = lock_store
    shutil.copytree(store.path, tmp_path / "store")
    copy = open_store(tmp_path / "store", create=False)
    other = tmp_path / "other"
    config = qwen3_config(layers=1, hidden=32, intermediate=48)
    w = {n: torch.randn(s, generator=torch.Generator().manual_seed(9)) for n, s in qwen3_shapes(config).items()}
    save_checkpoint(other / "origin", w, config=config)
    save_checkpoint(other / "run" / "checkpoint-5", {n: v + 0.01 for n, v in w.items()}, step=5, config=config)
    copy.add_run("elsewhere", other / "run", other / "origin")
    copy.compute(progress=False, endpoint="none")
    with pytest.raises(StoreError, match="start from different origins"):
        channel_overlap(copy, "turning", "elsewhere")
    every = final_channel_overlap(copy)  # runs of another origin share no channel: NaN, not an error
    assert bool(every.sel(other="elsewhere", run="turning").isnull().all())
    assert bool(every.sel(other="elsewhere", run="elsewhere").notnull().any())
    with pytest.raises(StoreError, match="no computed run 'nope'"):
        channel_overlap(copy, "turning", "nope")
    with pytest.raises(StoreError, match=r"run 'locked' has no computed step 15; it has \[10, 20, 30, 40\]"):
        channel_overlap(copy, "turning", "locked", other_steps=15)


def test_lock_alignment_matches_a_numpy_oracle(lock_store):
    store, origin, runs = lock_store
    lock = lock_alignment(store, ref_step=20)
    assert list(lock.ref_step.values) == [20, 20]
    name, layer, module = "model.layers.0.self_attn.q_proj.weight", 0, "self_attn.q_proj"
    ref = _oracle_basis(origin, runs / "turning" / "checkpoint-20", name)
    last = _oracle_basis(origin, runs / "turning" / "checkpoint-40", name)
    for t in STEPS:
        v = _oracle_basis(origin, runs / "turning" / f"checkpoint-{t}", name)
        cell = lock.sel(run="turning", step=t, layer=layer, module=module)
        assert float(cell.sim_ref) == pytest.approx(np.linalg.norm(v.T @ ref) ** 2 / K, abs=1e-4)
        assert float(cell.sim_last) == pytest.approx(np.linalg.norm(v.T @ last) ** 2 / K, abs=1e-4)
    assert float(lock.sim_ref.sel(run="turning", step=40).mean()) < 0.9  # the channel turned ...
    assert float(lock.sim_ref.sel(run="locked").min()) > 0.999  # ... or did not


def test_lock_summary_finds_the_lock(lock_store):
    store, *_ = lock_store
    summary = lock_summary(lock_alignment(store))
    assert summary.loc["locked", "lock_step"] == 10 and summary.loc["locked", "lock_progress"] == 0.25
    sims = lock_alignment(store).sim_last.sel(run="turning").mean(("layer", "module"))
    assert float(sims.sel(step=20)) < 0.9 <= float(sims.sel(step=30))  # B dominates from s = 0.75 on
    assert summary.loc["turning", "lock_step"] == 30
    assert summary.loc["locked", "ref_step"] == 10  # progress 0.25 is nearest 0.2
    sr = lock_alignment(store).stable_rank.sel(run="turning").mean(("layer", "module"))
    assert summary.loc["turning", "stable_rank_max"] == pytest.approx(float(sr.max()))
    assert summary.loc["turning", "stable_rank_min"] == pytest.approx(float(sr.min()))


def test_lock_alignment_errors_name_what_is_wrong(lock_store):
    store, *_ = lock_store
    with pytest.raises(StoreError, match="no computed run 'x'"):
        lock_alignment(store, runs=["x"])
    with pytest.raises(StoreError, match=r"run 'turning' has no computed step 15; it has \[10, 20, 30, 40\]"):
        lock_alignment(store, ref_step=15)


@pytest.fixture(scope="module")
def zoo(ci_zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "ci"
    shutil.copytree(ci_zoo[0], out)
    return out


def _fp32(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / STATE, weights_only=True)["model"]


def test_retrain_in_update_mode_keeps_the_update_in_the_early_channel(zoo, tmp_path, capsys):
    store = tmp_path / "store"
    main(["retrain", str(zoo), "--run", "opd", "-k", str(K), "--mode", "update", "--store", str(store), "--quiet"])
    out = capsys.readouterr().out
    assert out.startswith(f"held-out accuracy from the projection point (step 20) on, plain vs rank-{K} constrained")
    entry = load_zoo(zoo)["retrains"][f"opd-k{K}-update"]
    assert entry["constraint"] == {"run": "opd", "k": K, "start": 20, "mode": "update"}
    assert [c["step"] for c in entry["checkpoints"]] == [20, 40, 60]  # the shared history, then its own
    run_dir = zoo / entry["path"]
    start, end = _fp32(zoo / "runs" / "opd" / "checkpoint-20"), _fp32(run_dir / "checkpoint-60")
    from opd_lens.locking import Subspaces

    bases = Subspaces.load(run_dir / "subspaces.safetensors").right
    assert len(bases) == 14
    for name, v in bases.items():
        delta = (end[name] - start[name]).double()
        v = v.double()
        assert torch.linalg.norm(delta - delta @ v @ v.T) <= 1e-5 * torch.linalg.norm(delta), name
    plain = _fp32(zoo / "runs" / "opd" / "checkpoint-60")
    delta = (plain[name] - start[name]).double()
    assert torch.linalg.norm(delta - delta @ v @ v.T) > 0.1 * torch.linalg.norm(delta)  # unconstrained leaves it
    ds = open_store(store, create=False).dataset()
    assert list(ds.run.values) == [f"opd-k{K}-update"] and ds.method.values[0] == f"opd-k{K}"
    table = retrain_accuracy(zoo)
    assert set(table.run) == {"opd", f"opd-k{K}-update"}
    assert table[table.constrained].accuracy.between(0, 1).all()


def test_retrain_job_cancels_and_resumes(zoo, tmp_path):
    job = RetrainJob(zoo, run="sft", K=K, at=0.2)
    job.cancel()  # before the first step: stops at once, nothing saved past the start
    job.start().wait(timeout=120)
    assert job.result is None and isinstance(job.error, Cancelled)
    assert "stopped at step" in job._label.value and job._button.disabled
    entry = rank_constrained_retrain(zoo, "sft", K, progress=False)  # the same retraining runs to the end
    assert entry["path"] == f"runs/sft-k{K}" and entry["checkpoints"][-1]["step"] == 150
    with pytest.raises(ZooError, match="holds a retraining with .* not .*'start': 100"):
        rank_constrained_retrain(zoo, "sft", K, at=0.6, progress=False)
