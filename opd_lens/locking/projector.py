"""Rank-K constrained training (OPD §4.2, App. F): keep each weight's update inside an early update subspace.

:func:`subspaces_from_checkpoint` takes V_K, the top-K right singular vectors of ΔW = W_t − W_0 (and, for the
two-sided variant, U_K), per matrix; :class:`SubspaceProjector` binds them to a model's parameters by name and either
projects each gradient, ``g ← g V Vᵀ`` (the paper's reading), or projects each optimizer update so that W − W_attach
stays exactly in span(V) under Adam's elementwise scaling and weight decay.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoints import Checkpoint, matched_matrices, open_checkpoint
from ..diagnostics import svd64
from ..errors import CheckpointWarning, SubspaceError

__all__ = ["MODES", "SubspaceError", "SubspaceProjector", "Subspaces", "subspaces_from_checkpoint"]

MODES = ("gradient", "update")
_FORMAT = "opd_lens.subspaces"


@dataclass(frozen=True, eq=False)
class Subspaces:
    """Per-parameter bases of a rank-``k`` constraint, keyed by parameter name (e.g.
    ``model.layers.0.self_attn.q_proj.weight``): ``right[name]`` is V (d_in × k', orthonormal columns) and
    ``left[name]``, for two-sided constraints, U (d_out × k'); k' = min(k, d_out, d_in). Stored as float32."""

    k: int
    right: Mapping[str, torch.Tensor]
    left: Mapping[str, torch.Tensor] | None = None

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise SubspaceError(f"k must be a positive int, got {self.k!r}")
        if self.left is not None and self.left.keys() != self.right.keys():
            raise SubspaceError("left and right bases must name the same parameters")
        for side in ("right", "left"):
            bases = getattr(self, side)
            if bases is None:
                continue
            bases = {name: b.detach().to(torch.float32).contiguous() for name, b in bases.items()}
            for name, b in bases.items():
                cols = self.right[name].shape[-1]
                if b.ndim != 2 or not cols <= min(self.k, b.shape[0]) or b.shape[1] != cols:
                    raise SubspaceError(f"{side} basis of {name!r} has shape {tuple(b.shape)}, expected (d, {cols})")
                if not torch.allclose(b.mT @ b, torch.eye(cols), atol=1e-4):
                    raise SubspaceError(f"{side} basis of {name!r} does not have orthonormal columns")
            object.__setattr__(self, side, bases)

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file: ``right/NAME`` and ``left/NAME`` tensors, k and the names in its metadata."""
        tensors = {f"right/{n}": v for n, v in self.right.items()}
        tensors |= {f"left/{n}": u for n, u in (self.left or {}).items()}
        meta = {"format": _FORMAT, "k": str(self.k), "names": json.dumps(list(self.right))}
        save_file(tensors, path, metadata={**meta, "two_sided": str(self.left is not None)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Subspaces:
        """Read a file written by :meth:`save`; anything else raises :class:`SubspaceError` naming the file."""
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise SubspaceError("no opd_lens subspaces metadata")
                names = json.loads(meta["names"])
                sides = ("right", "left") if meta["two_sided"] == "True" else ("right",)
                if set(f.keys()) != {f"{side}/{n}" for side in sides for n in names}:
                    raise SubspaceError("its tensors do not match the names in its metadata")
                bases = {side: {n: f.get_tensor(f"{side}/{n}") for n in names} for side in sides}
            return cls(int(meta["k"]), bases["right"], bases.get("left"))
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
            raise SubspaceError(f"{path}: not a readable opd_lens subspaces file: {e}") from None


def subspaces_from_checkpoint(
    origin: Checkpoint | str | os.PathLike,
    checkpoint: Checkpoint | str | os.PathLike,
    K: int = 16,
    *,
    two_sided: bool = False,
    names: Collection[str] | None = None,
) -> Subspaces:
    """The top-``K`` right (and, if ``two_sided``, left) singular vectors of ΔW = W_checkpoint − W_origin, by exact
    float64 SVD, for every analysed matrix (or only the parameters in ``names``); K is capped at min(d_out, d_in).

    Only matrices stored as one whole 2-D parameter can be constrained; parts of fused tensors (QKV, gate_up,
    stacked experts) and transposed Conv1D weights are skipped with a :class:`CheckpointWarning`.
    """
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    origin, checkpoint = (c if isinstance(c, Checkpoint) else open_checkpoint(c) for c in (origin, checkpoint))
    at_origin = origin.plan().by_key()
    right, left, skipped = {}, {}, set()
    for ref in matched_matrices(origin, checkpoint):
        if names is not None and ref.tensor not in names:
            continue
        if ref.expert is not None or ref.rows is not None or ref.transpose:
            skipped.add(ref.tensor)
            continue
        w0 = origin.read_matrix(at_origin[ref.layer, ref.module])
        u, _, vh = svd64(checkpoint.read_matrix(ref).double() - w0.double(), min(K, *ref.shape))
        right[ref.tensor], left[ref.tensor] = vh.mT, u
    if skipped:
        warnings.warn(
            f"{checkpoint.path}: {len(skipped)} fused or transposed tensors are not one parameter matrix and stay "
            f"unconstrained: {sorted(skipped)[:4]}",
            CheckpointWarning,
            stacklevel=2,
        )
    if unknown := sorted(set(names or ()) - right.keys() - skipped):
        raise SubspaceError(f"{checkpoint.path}: {unknown[:4]} are not analysed weight matrices of this checkpoint")
    if not right:
        raise SubspaceError(f"{checkpoint.path}: no weight matrix to take a subspace from")
    return Subspaces(K, right, left if two_sided else None)


class SubspaceProjector:
    """Constrain training to :class:`Subspaces`: ``attach(model, optimizer)`` hooks each named 2-D weight W
    (d_out × d_in), ``detach()`` (or leaving a ``with`` block) removes every hook.

    ``mode="gradient"``: each gradient becomes g V Vᵀ (two-sided: U Uᵀ g V Vᵀ) before anything reads it. With
    SGD ΔW stays in span(V); Adam's elementwise scaling and weight decay leak out of it.
    ``mode="update"``: after every ``optimizer.step()`` W ← W_a + (W − W_a) V Vᵀ, W_a the weight at attach time,
    so W − W_a stays in span(V) whatever the optimizer does (rounding does not accumulate across steps); it keeps a
    copy of each constrained weight.
    Projections run on the parameter's device in float32 (float64 for float64 parameters).
    """

    def __init__(self, subspaces: Subspaces, mode: str = "gradient", two_sided: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if two_sided and subspaces.left is None:
            raise SubspaceError("two_sided=True needs subspaces with left bases (two_sided=True when taking them)")
        self.subspaces, self.mode, self.two_sided = subspaces, mode, two_sided
        self._handles: list = []
        self._targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> SubspaceProjector:
        """Bind to ``model``'s parameters of the same names; ``mode="update"`` needs the ``optimizer``."""
        if self._handles:
            raise SubspaceError("the projector is already attached; detach() it first")
        stepping = None
        if self.mode == "update":
            if optimizer is None:
                raise SubspaceError('mode="update" projects the optimizer\'s steps: pass the optimizer to attach()')
            stepping = _stepping(optimizer)
        params = dict(model.named_parameters())
        wanted = list(self.subspaces.right)
        bound = [n for n in wanted if n in params]
        if not bound:
            raise SubspaceError(
                f"no subspace names a parameter of the model: subspaces for {wanted[:3]}, parameters {list(params)[:3]}"
            )
        if len(bound) < len(wanted):
            missing = [n for n in wanted if n not in params]
            warnings.warn(f"{len(missing)} subspaces name no parameter of the model: {missing[:4]}", stacklevel=2)
        left = self.subspaces.left if self.two_sided else None  # not None when two_sided (checked in __init__)
        for name in bound:
            p, v = params[name], self.subspaces.right[name]
            u = left[name] if left is not None else None
            if p.ndim != 2 or p.shape[1] != v.shape[0] or (u is not None and p.shape[0] != u.shape[0]):
                want = (u.shape[0] if u is not None else "d_out", v.shape[0])
                raise SubspaceError(f"parameter {name!r} has shape {tuple(p.shape)}, its subspace is for {want}")
            dtype = torch.promote_types(p.dtype, torch.float32)
            v, u = v.to(p.device, dtype), None if u is None else u.to(p.device, dtype)
            if self.mode == "gradient":
                self._handles.append(p.register_hook(partial(_project, v=v, u=u)))
            else:
                self._targets.append((p, p.detach().clone(), v, u))
        if stepping is not None:
            self._handles.append(stepping.register_step_post_hook(self._project_updates))
        return self

    def detach(self) -> None:
        """Remove every hook; training is unconstrained again."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._targets = [], []

    def __enter__(self) -> SubspaceProjector:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @torch.no_grad()
    def _project_updates(self, *_) -> None:
        for p, anchor, v, u in self._targets:
            p.copy_(anchor + _project(p - anchor, v, u))


def _project(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """x V Vᵀ (two-sided: U Uᵀ x V Vᵀ) in the bases' dtype, returned in x's."""
    y = (x.to(v.dtype) @ v) @ v.mT
    if u is not None:
        y = u @ (u.mT @ y)
    return y.to(x.dtype)


def _stepping(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that runs the step: Accelerate's ``AcceleratedOptimizer`` (what the HF Trainer holds)
    wraps it in ``.optimizer`` and does not run step hooks of its own."""
    while isinstance(inner := getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = inner
    return optimizer
