"""The compute engine: which checkpoints still need diagnostics, the origin-factor cache, local or Dask execution.

Data flows one way: checkpoints are read one matrix at a time, :mod:`opd_lens.diagnostics` computes, and the
results are written into the :class:`~opd_lens.store.Store` one (run, step) region at a time.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoints import Checkpoint, MatrixRef, find_checkpoints, matched_matrices, open_checkpoint
from .diagnostics import (
    Factors,
    OriginFactors,
    Settings,
    all_finite,
    lora_diagnostics,
    lora_weight,
    matrix_diagnostics,
    origin_factors,
    sim_k,
    svd64,
)
from .errors import CheckpointError, CheckpointWarning
from .store import (
    ANGLES,
    SCALARS,
    LockBases,
    Store,
    StoreError,
    matrix_key,
    parse_matrix_key,
    write_lock_alignment,
    write_step,
)

__all__ = ["ComputeReport", "compute_store", "resolve_device"]

_STEP_SCALARS = tuple(name for name in SCALARS if name != "lock_alignment")


@dataclass
class ComputeReport:
    """What one :func:`compute_store` call did."""

    steps: list[tuple[str, int]] = field(default_factory=list)
    """(run, step) pairs computed."""
    matrices_read: int = 0
    """Matrices read from checkpoints (origin and checkpoint reads alike): 0 when nothing was new."""
    lock_updates: int = 0
    """(run, step) pairs whose lock_alignment was (re)computed against a new last step."""
    skipped: list[str] = field(default_factory=list)
    """Why each checkpoint left out was skipped (unreadable, not matching the origin); nothing was written for it."""


@dataclass(frozen=True)
class _MatrixResult:
    scalars: dict[str, float]
    angles: dict[str, np.ndarray]
    basis: torch.Tensor
    reads: int
    nonfinite: tuple[bool, str] | None = None
    """(in the origin?, the tensor and its file) when W_0 or W_t holds NaN or Inf values."""


class _StepError(CheckpointError):
    """A checkpoint (not the origin) could not be read: its step is skipped, the others go on."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when torch sees a GPU, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def compute_store(
    store: Store,
    *,
    runs: Sequence[str] | None = None,
    device: str = "auto",
    endpoint: str | Sequence[int] = "last",
    client=None,
    progress: bool = True,
) -> ComputeReport:
    """Compute the diagnostics of every checkpoint of ``runs`` (default: all registered) not yet in ``store``.

    Incremental: a checkpoint already stored (same content fingerprint) is not read again, so a second call with
    nothing new reads no matrix; new checkpoints in a run directory are appended. W_0's factors are computed once
    per origin and cached in the store. When a run gains a newer last step, ``lock_alignment`` (Sim_K of V_K(t)
    to the final channel V_K(last)) is recomputed for all of that run's steps from cached bases.

    ``endpoint`` chooses the steps that also get principal angles and the spectral shift: ``"last"`` (each run's
    last checkpoint), ``"all"``, ``"none"`` or a list of steps. Stored steps that lack them are recomputed;
    angles already stored are kept (so a step that was last when computed keeps its angles).

    ``client`` (a ``dask.distributed.Client``) runs one task per matrix on the cluster and one write task per
    (run, step) region; workers must see the store and checkpoint paths. ``device="auto"`` uses CUDA when
    available.
    """
    report = ComputeReport()
    names = list(store.runs) if runs is None else list(runs)
    with store.writer():
        for name in names:
            _compute_run(store, name, device, endpoint, client, progress, report)
    return report


def _compute_run(store: Store, name: str, device, endpoint, client, progress: bool, report: ComputeReport) -> None:
    spec = store.runs.get(name)
    if spec is None:
        raise StoreError(f"{store.path}: no run named {name!r}; registered: {list(store.runs)}")
    origin = open_checkpoint(spec["origin"])
    if origin.fingerprint != spec["origin_fingerprint"]:
        raise StoreError(f"{origin.path}: the origin of run {name!r} changed since it was added; use a new store")

    def skip(path: Path, message: str) -> None:
        warnings.warn(CheckpointWarning(message, path), stacklevel=2)
        report.skipped.append(message)

    refs = {}
    for c in find_checkpoints(spec["run_dir"], on_skip=skip):
        try:
            refs[c.step] = (c, matched_matrices(origin, c, spec["include_globals"]))
        except CheckpointError as e:
            skip(c.path, f"skipping step {c.step}: {e}")
    ckpts = [c for c, _ in refs.values()]
    done = store.completed_steps(name)
    bases = LockBases(store.run_cache(name))
    ends = _endpoint_steps(endpoint, [c.step for c in ckpts]) if ckpts else set()
    missing_angles = ends - store.endpoint_steps(name)
    pending = []
    for c in ckpts:
        recorded = spec["checkpoints"].get(str(c.step), {}).get("fingerprint")
        if c.step in done and recorded == c.fingerprint and bases.has(c.step) and c.step not in missing_angles:
            continue
        if c.step in done and recorded is not None and recorded != c.fingerprint:
            warnings.warn(
                f"{c.path}: changed since it was computed; recomputing step {c.step}", CheckpointWarning, stacklevel=3
            )
        pending.append(c)
    if pending:
        if (last := max({*done, *(c.step for c in pending)})) in done and last in {c.step for c in pending}:
            # a rewritten final channel: before any write. A new last step needs nothing: lock_alignment shows only
            # where it refers to the last complete step, so a compute that fails before completing it changes nothing
            store.invalidate_lock_alignment(name)
        factors = store.cache_dir("origin", f"{origin.fingerprint[:16]}-{_settings_key(store.settings)}")
        tasks = [(c, refs[c.step][1], store.step_slot(c.step), c.step in ends) for c in pending]
        execute = _run_dask if client is not None else _run_local
        for c, outcome in execute(store, name, origin, tasks, factors, device, client, progress):
            if isinstance(outcome, CheckpointError):
                skip(c.path, f"skipping step {c.step}: {outcome}")
                continue
            reads, nonfinite = outcome
            for in_origin in (True, False):
                if bad := [what for o, what in nonfinite if o == in_origin]:
                    _warn_nonfinite("the origin" if in_origin else f"step {c.step}", bad)
            store.record_checkpoint(name, c.step, str(c.path), c.fingerprint)
            report.steps.append((name, c.step))
            report.matrices_read += reads
    report.lock_updates += _update_lock_alignment(store, name, bases)


def _run_local(store, name, origin, tasks, factor_dir, device, client, progress):
    dev = resolve_device(device)
    run = store.run_index(name)
    steps = tqdm(tasks, desc=f"{name} checkpoints", unit="ckpt", disable=not progress, dynamic_ncols=True)
    for ckpt, refs, slot, is_end in steps:
        steps.set_postfix_str(f"step {ckpt.step}")
        batched = {}
        matrices = tqdm(refs, desc=f"step {ckpt.step}", unit="matrix", leave=False, disable=not progress)
        try:
            if is_end and dev.type == "cuda":
                batched = batched_factors(ckpt, refs, store.settings.angle_k, dev, origin=origin)
            results = [
                _matrix_task(origin, ckpt, ref, store.settings, is_end, dev, factor_dir, batched.get(matrix_key(ref)))
                for ref in matrices
            ]
        except _StepError as e:
            matrices.close()
            yield ckpt, e
            continue
        yield (
            ckpt,
            _write_task(store.data_path, store.grid(), run, slot, refs, results, store.run_cache(name), ckpt.step),
        )


def _run_dask(store, name, origin, tasks, factor_dir, device, client, progress):
    run = store.run_index(name)
    grid = store.grid()
    refs0 = {(r.layer, r.module): r for _, refs, _, _ in tasks for r in refs}
    warm = client.map(
        _factor_task,
        [origin] * len(refs0),
        list(refs0.values()),
        settings=store.settings,
        factor_dir=factor_dir,
        device=device,
        pure=False,
    )
    factor_reads = sum(client.gather(warm))
    writes = []
    for ckpt, refs, slot, is_end in tasks:
        parts = [
            client.submit(_matrix_task, origin, ckpt, ref, store.settings, is_end, device, factor_dir, pure=False)
            for ref in refs
        ]
        writes.append(
            (
                ckpt,
                client.submit(
                    _write_task,
                    store.data_path,
                    grid,
                    run,
                    slot,
                    refs,
                    parts,
                    store.run_cache(name),
                    ckpt.step,
                    pure=False,
                ),
            )
        )
    for i, (ckpt, fut) in enumerate(tqdm(writes, desc=name, unit="step", disable=not progress)):
        try:
            reads, nonfinite = fut.result()
        except _StepError as e:
            yield ckpt, e
            continue
        yield ckpt, (reads + (factor_reads if i == 0 else 0), nonfinite)


def _factor_task(origin: Checkpoint, ref: MatrixRef, settings: Settings, factor_dir: Path, device) -> int:
    """Compute and cache one matrix's origin factors; returns the number of matrices read."""
    return _load_factors(origin, ref, settings, factor_dir, resolve_device(device), with_svd=False)[1]


def batched_factors(
    ckpt: Checkpoint,
    refs: Sequence[MatrixRef],
    k: int,
    device,
    budget_bytes: int = 2**30,
    origin: Checkpoint | None = None,
) -> dict[str, Factors]:
    """Float64 SVDs of a checkpoint's matrices for the endpoint metrics, batching matrices of equal shape.

    Matrices of one shape (the same module across layers) go through one batched ``torch.linalg.svd`` call per
    chunk of at most ``budget_bytes`` of float64 input, which keeps a GPU busy; keys are ``layer|module``. Matrices
    holding NaN or Inf are left out. A LoRA adapter's W_t = W_0 + ΔW needs the ``origin`` W_0.
    """
    groups: dict[tuple[int, ...], list[MatrixRef]] = defaultdict(list)
    for ref in refs:
        groups[tuple(ref.shape)].append(ref)
    out = {}
    for shape, group in groups.items():
        per_chunk = max(1, budget_bytes // (8 * math.prod(shape)))
        for i in range(0, len(group), per_chunk):
            read = ((r, _dense_step(origin, ckpt, r, device)) for r in group[i : i + per_chunk])
            chunk = [(r, m) for r, m in read if all_finite(m)]
            if chunk:
                f = svd64(torch.stack([m for _, m in chunk]), k)
                out |= {matrix_key(r): Factors(f.u[j], f.s[j], f.vh[j]) for j, (r, _) in enumerate(chunk)}
    return out


def _warn_nonfinite(where: str, tensors: list[str]) -> None:
    n = len(tensors)
    warnings.warn(
        CheckpointWarning(
            f"{where}: {n} {'matrix holds' if n == 1 else 'matrices hold'} NaN or Inf values ({tensors[0]}"
            f"{', ...' if n > 1 else ''}); the diagnostics these make undefined are recorded as NaN"
        ),
        stacklevel=4,
    )


def _read_step(read, ref: MatrixRef) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``read(ref)`` from a checkpoint; a failure skips the step (:class:`_StepError`), unlike one reading the
    origin."""
    try:
        return read(ref)
    except CheckpointError as e:
        raise _StepError(str(e)) from None


def _dense_step(origin: Checkpoint | None, ckpt: Checkpoint, ref: MatrixRef, device) -> torch.Tensor:
    """W_t of ``ref`` on ``device``: read, or for a LoRA adapter W_0 + ΔW in float64."""
    if ckpt.adapter is None:
        return _read_step(ckpt.read_matrix, ref).to(device)
    if origin is None:
        raise ValueError(f"{ckpt.path}: a LoRA adapter's weights need the origin W_0")
    return lora_weight(origin.read_matrix(ref).to(device), *(f.to(device) for f in _read_step(ckpt.read_lora, ref)))


def _matrix_task(origin, ckpt, ref, settings, is_end, device, factor_dir, factors_t=None) -> _MatrixResult:
    dev = resolve_device(device)
    factors, reads = _load_factors(origin, ref, settings, factor_dir, dev, with_svd=is_end)
    w0 = origin.read_matrix(ref).to(dev)
    if ckpt.adapter is None:
        lora, wt = None, _read_step(ckpt.read_matrix, ref).to(dev)
    else:
        lora, wt = tuple(f.to(dev) for f in _read_step(ckpt.read_lora, ref)), None
    nonfinite = None
    if factors is None:
        nonfinite = True, f"tensor {ref.tensor!r} in {origin.tensors[ref.tensor].file}"
    elif not all(all_finite(t) for t in (lora or (wt,))):
        where = ckpt.tensors[ref.tensor].file if lora is None else ckpt.path
        nonfinite = False, f"{'tensor' if lora is None else 'the LoRA factors of'} {ref.tensor!r} in {where}"
    if nonfinite is None and lora is not None:
        d = lora_diagnostics(w0, *lora, settings, factors, endpoint=is_end, factors_t=factors_t)
    elif nonfinite is None:
        d = matrix_diagnostics(w0, wt, settings, factors, endpoint=is_end, factors_t=factors_t)
    else:
        d = _nonfinite_diagnostics(w0, wt if lora is None else lora_weight(w0, *lora), settings, factors)
    return _MatrixResult(
        scalars={name: getattr(d, name) for name in _STEP_SCALARS},
        angles={"angles_u": d.angles_u.cpu().numpy(), "angles_v": d.angles_v.cpu().numpy()},
        basis=(d.lock_basis if d.update_fro > 0 else torch.full_like(d.lock_basis, math.nan)).to(torch.float32).cpu(),
        reads=reads + 2,
        nonfinite=nonfinite,
    )


def _nonfinite_diagnostics(w0, wt, settings: Settings, factors: OriginFactors | None):
    """The diagnostics of a pair holding NaN or Inf, without the SVDs they break: ‖ΔW‖_F, the spectra, angles and
    spectral shift are NaN, and the mask overlaps too when W_0 is the one (its masks need its SVD); the unchanged
    fraction follows the rules for NaN and Inf entries."""
    if factors is None:
        none = torch.zeros(w0.shape, dtype=torch.bool, device=w0.device)
        d = matrix_diagnostics(w0, wt, settings, OriginFactors(None, none, none), endpoint=False)
        d = replace(d, principal_overlap=math.nan, lowmag_overlap=math.nan)
    else:
        d = matrix_diagnostics(w0, wt, settings, replace(factors, factors=None), endpoint=False)
    return replace(d, update_fro=d.update_fro if math.isfinite(d.update_fro) else math.nan)


def _write_task(path, grid, run, slot, refs, results, bases_dir, step) -> tuple[int, list[tuple[bool, str]]]:
    """Write one (run, step) region from its matrices' results and save V_K bases; returns the matrices read and
    the tensors holding NaN or Inf."""
    layers, modules, k = grid
    shape = (len(layers), len(modules))
    scalars = {name: np.full(shape, np.nan, np.float32) for name in _STEP_SCALARS}
    angles = {name: np.full((*shape, k), np.nan, np.float32) for name in ANGLES}
    for ref, res in zip(refs, results, strict=True):
        i, j = layers[ref.layer], modules[ref.module]
        for name, value in res.scalars.items():
            scalars[name][i, j] = value
        for name, profile in res.angles.items():
            angles[name][i, j, : profile.shape[0]] = profile
    LockBases(bases_dir).save(step, {matrix_key(r): res.basis for r, res in zip(refs, results, strict=True)})
    write_step(path, run, slot, scalars, angles)
    return sum(res.reads for res in results), [res.nonfinite for res in results if res.nonfinite]


def _update_lock_alignment(store: Store, name: str, bases: LockBases) -> int:
    """Recompute Sim_K(V_K(t), V_K(last)) for every step whose stored value refers to an older last step."""
    done = store.completed_steps(name)
    if not done:
        return 0
    last = max(done)
    stale = [s for s, ref in done.items() if ref != last]
    if not stale:
        return 0
    layers, modules, _ = store.grid()
    final = bases.load(last)
    run = store.run_index(name)
    for step in stale:
        values = np.full((len(layers), len(modules)), np.nan, np.float32)
        for key, basis in bases.load(step).items():
            if key in final and final[key].shape == basis.shape:  # LoRA steps of other ranks: no common K
                layer, module = parse_matrix_key(key)
                values[layers[layer], modules[module]] = float(sim_k(basis, final[key]))
        write_lock_alignment(store.data_path, run, store.step_slot(step), values, last)
    return len(stale)


def _load_factors(
    origin: Checkpoint, ref: MatrixRef, settings: Settings, factor_dir: Path, device, with_svd: bool = True
) -> tuple[OriginFactors, int]:
    """The origin factors of one matrix from the cache, computing and caching them on first use.

    ``with_svd=False`` reads only the masks from a cached file (all that steps without endpoint metrics need).
    ``None`` (and nothing cached) when W_0 holds NaN or Inf, which have no SVD.
    """
    file = Path(factor_dir) / f"{_cache_name(matrix_key(ref))}.safetensors"
    if file.is_file():
        with safe_open(file, framework="pt", device=str(device)) as f:
            shape = tuple(int(d) for d in f.get_tensor("shape").tolist())
            masks = (_unpack(f.get_tensor(name), shape).to(device) for name in ("principal_mask", "lowmag_mask"))
            svd = Factors(*(f.get_tensor(name) for name in ("u", "s", "vh"))) if with_svd else None
            return OriginFactors(svd, *masks), 0
    w0 = origin.read_matrix(ref).to(device)
    if not all_finite(w0):
        return None, 1
    of = origin_factors(w0, settings)
    tensors = {
        "u": of.factors.u.cpu().contiguous(),
        "s": of.factors.s.cpu().contiguous(),
        "vh": of.factors.vh.cpu().contiguous(),
        "principal_mask": _pack(of.principal_mask),
        "lowmag_mask": _pack(of.lowmag_mask),
        "shape": torch.tensor(list(w0.shape)),
    }
    tmp = file.with_name(f".{file.name}.{id(tensors)}.tmp")
    try:
        save_file(tensors, tmp)
        tmp.replace(file)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial file
    return of, 1


def _cache_name(key: str) -> str:
    """A file name for a matrix key: quoted, or hashed when too long for the file system."""
    name = quote(key, safe="")
    return name if len(name) <= 200 else hashlib.sha256(key.encode()).hexdigest()


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().ravel()))


def _unpack(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    flat = np.unpackbits(bits.cpu().numpy(), count=math.prod(shape))  # 0/1 bytes: viewed as bool, not copied
    return torch.from_numpy(flat.view(np.bool_).reshape(shape))


def _settings_key(settings: Settings) -> str:
    return hashlib.sha256(repr(sorted(settings.asdict().items())).encode()).hexdigest()[:12]


def _endpoint_steps(endpoint, steps: list[int]) -> set[int]:
    if isinstance(endpoint, str):
        if endpoint == "last":
            return {max(steps)}
        if endpoint == "all":
            return set(steps)
        if endpoint == "none":
            return set()
        try:
            return {int(s) for s in endpoint.split(",") if s.strip()}
        except ValueError:
            raise StoreError(
                f"endpoint must be last, all, none or a comma-separated list of steps, got {endpoint!r}"
            ) from None
    return {int(s) for s in endpoint}
