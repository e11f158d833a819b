"""The stored variables of the opd_lens Dataset, defined once.

Every variable the store holds is one :class:`Variable` in :data:`VARIABLES`: its dimensions, when the engine
computes it, its ``long_name`` and ``units`` (CF conventions: ``"1"`` for a dimensionless quantity) and where its
formula is documented. The store creates its arrays from this table, the engine fills the per-step ones, and the
charts and widgets take their labels from it, so a new diagnostic is a line here, its formula in
:mod:`opd_lens.diagnostics` and its field in :class:`~opd_lens.diagnostics.MatrixDiagnostics`.

A store records the :data:`SCHEMA_VERSION` it was written with; a variable added in a later version (``since``)
is created in an older store by its next writer, and the steps stored before it are recomputed to fill it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "SCHEMA_VERSION",
    "Variable",
    "VARIABLES",
    "SCALARS",
    "ANGLES",
    "STEP_SCALARS",
    "SPECTRA",
    "added_after",
    "changed_after",
]

SCHEMA_VERSION = 4
"""1: the first release; 2: ``channel_energy``; 3: ``update_spectrum``, and NaN, not a value fixed by
construction, where a matrix is too small for ``angle_k``, ``mask_rank`` or ``lock_k`` (the angles,
``principal_overlap``, ``channel_energy``, ``lock_alignment``); 4: ``intruder_dimensions``."""

MATRIX_DIMS = ("run", "step", "layer", "module")
PROFILE_DIMS = (*MATRIX_DIMS, "angle_index")
SPECTRUM_DIMS = (*MATRIX_DIMS, "rank_index")


@dataclass(frozen=True)
class Variable:
    """One stored variable (float32, NaN where not computed)."""

    name: str
    dims: tuple[str, ...]
    when: Literal["step", "endpoint", "final"]
    """``step``: every checkpoint; ``endpoint``: endpoint steps only; ``final``: every checkpoint, against the
    run's last step, so recomputed when the run gains a new last step."""
    long_name: str
    units: str
    description: str
    """One line for a reader who meets the variable in a picker."""
    formula: str
    """The function whose docstring gives the definition."""
    since: int = 1
    """The schema version that added it."""
    revised: int = 1
    """The schema version that last changed how its values are computed."""
    comment: str = ""
    """When the value is NaN although the step was computed (the CF ``comment`` attribute)."""

    @property
    def attrs(self) -> dict[str, str]:
        """The variable's attributes in the Dataset."""
        out = {"long_name": self.long_name, "units": self.units, "description": self.description}
        return out | {"comment": self.comment} if self.comment else out

    @property
    def title(self) -> str:
        """An axis title: the long name, with the unit where it has one."""
        return f"{self.long_name} (°)" if self.units == "degree" else self.long_name


_D = "opd_lens.diagnostics."
_ANGLE_NAN = (
    "NaN where the matrix's {side} ≤ k (angle_k): both top-k subspaces are then the whole space and the angles are "
    "0 by construction (opd_lens.diagnostics.angle_sides)"
)
_ANGLE_NAN_U = _ANGLE_NAN.format(side="row count m")
_ANGLE_NAN_V = _ANGLE_NAN.format(side="column count n")
_MASK_NAN = (
    "NaN where mask_rank ≥ min(m, n): W₀'s rank-r reconstruction is then W₀ itself and the mask a magnitude mask "
    "(opd_lens.diagnostics.principal_mask_applies)"
)
_CHANNEL_NAN = (
    "NaN where lock_k ≥ min(m, n): the top-K channel then holds every direction the update can use, so the value "
    "is fixed by construction (opd_lens.diagnostics.channel_applies)"
)
VARIABLES: dict[str, Variable] = {
    v.name: v
    for v in (
        Variable(
            "unchanged_frac",
            MATRIX_DIMS,
            "step",
            "unchanged fraction of entries (bf16)",
            "1",
            "fraction of entries whose bf16 value did not change (bf16-visible update sparsity)",
            _D + "unchanged_fraction",
        ),
        Variable(
            "update_fro",
            MATRIX_DIMS,
            "step",
            "Frobenius norm of ΔW",
            "1",
            "‖ΔW‖_F, the Frobenius norm of the cumulative update",
            _D + "update_fro",
        ),
        Variable(
            "stable_rank",
            MATRIX_DIMS,
            "step",
            "stable rank of ΔW",
            "1",
            "stable rank of ΔW: ‖ΔW‖_F² / ‖ΔW‖_2²",
            _D + "stable_rank",
        ),
        Variable(
            "hill_alpha",
            MATRIX_DIMS,
            "step",
            "Hill tail index α of σ(ΔW)",
            "1",
            "Hill tail index of the singular values of ΔW (top-k)",
            _D + "hill_alpha",
        ),
        Variable(
            "lock_alignment",
            MATRIX_DIMS,
            "final",
            "Sim_K to the final channel",
            "1",
            "Sim_K: alignment of ΔW's top-K right singular subspace with the final update's",
            _D + "sim_k",
            revised=3,
            comment=_CHANNEL_NAN,
        ),
        Variable(
            "principal_overlap",
            MATRIX_DIMS,
            "step",
            "principal-mask overlap (share of updated entries)",
            "1",
            "share of updated entries inside W₀'s principal mask (random baseline: α)",
            _D + "principal_mask",
            revised=3,
            comment=_MASK_NAN,
        ),
        Variable(
            "lowmag_overlap",
            MATRIX_DIMS,
            "step",
            "low-magnitude-mask overlap (share of updated entries)",
            "1",
            "share of updated entries inside W₀'s low-magnitude mask (random baseline: α)",
            _D + "lowmag_mask",
        ),
        Variable(
            "max_angle_u",
            MATRIX_DIMS,
            "endpoint",
            "largest principal angle, U side",
            "degree",
            "largest principal angle (degrees) between W₀'s and W_t's top-k left singular subspaces",
            _D + "principal_angles",
            revised=3,
            comment=_ANGLE_NAN_U,
        ),
        Variable(
            "max_angle_v",
            MATRIX_DIMS,
            "endpoint",
            "largest principal angle, V side",
            "degree",
            "largest principal angle (degrees) between W₀'s and W_t's top-k right singular subspaces",
            _D + "principal_angles",
            revised=3,
            comment=_ANGLE_NAN_V,
        ),
        Variable(
            "spectral_shift",
            MATRIX_DIMS,
            "endpoint",
            "spectral shift of σ(W) (relative)",
            "1",
            "‖σ(W_t) − σ(W₀)‖₂ / ‖σ(W₀)‖₂",
            _D + "spectral_shift",
        ),
        Variable(
            "intruder_dimensions",
            MATRIX_DIMS,
            "endpoint",
            "intruder dimensions among W_t's top 10",
            "1",
            "how many of W_t's top-10 left singular vectors have |cos| < 0.5 with every left singular vector of W₀ "
            "(Shuttleworth et al. 2024)",
            _D + "intruder_dimensions",
            since=4,
        ),
        Variable(
            "channel_energy",
            MATRIX_DIMS,
            "step",
            "share of ‖ΔW‖_F² in its top-K channel",
            "1",
            "Σ_{i≤K} σ_i² / ‖ΔW‖_F²: how much of the update lies in its top-K right singular directions (K = lock_k)",
            _D + "channel_energy",
            since=2,
            revised=3,
            comment=_CHANNEL_NAN,
        ),
        Variable(
            "update_spectrum",
            SPECTRUM_DIMS,
            "step",
            "top singular values of ΔW",
            "1",
            "σ_1 ≥ σ_2 ≥ … of ΔW_t, the top max(lock_k, hill_k): the spectrum behind stable rank, Hill α, the channel "
            "energy and V_K",
            _D + "top_spectrum",
            since=3,
            comment="NaN past min(m, n) singular values, and for a matrix holding NaN or Inf",
        ),
        Variable(
            "angles_u",
            PROFILE_DIMS,
            "endpoint",
            "principal angles, U side",
            "degree",
            "principal angles (degrees, ascending) between W₀'s and W_t's top-k left singular subspaces",
            _D + "principal_angles",
            revised=3,
            comment=_ANGLE_NAN_U,
        ),
        Variable(
            "angles_v",
            PROFILE_DIMS,
            "endpoint",
            "principal angles, V side",
            "degree",
            "principal angles (degrees, ascending) between W₀'s and W_t's top-k right singular subspaces",
            _D + "principal_angles",
            revised=3,
            comment=_ANGLE_NAN_V,
        ),
    )
}
"""Every stored variable, in the Dataset's order."""

SCALARS = tuple(name for name, v in VARIABLES.items() if v.dims == MATRIX_DIMS)
"""Per-matrix variables, dims (run, step, layer, module)."""
ANGLES = tuple(name for name, v in VARIABLES.items() if v.dims == PROFILE_DIMS)
"""Angle profiles, dims (run, step, layer, module, angle_index)."""
SPECTRA = tuple(name for name, v in VARIABLES.items() if v.dims == SPECTRUM_DIMS)
"""Top singular values, dims (run, step, layer, module, rank_index)."""
STEP_SCALARS = tuple(name for name in SCALARS if VARIABLES[name].when != "final")
"""The per-matrix variables a step's own compute gives (``lock_alignment`` waits for the run's last step)."""


def added_after(version: int) -> list[str]:
    """The variables that a store of schema ``version`` lacks."""
    return [name for name, v in VARIABLES.items() if v.since > version]


def changed_after(version: int, endpoint: bool = True) -> list[str]:
    """The variables that steps computed under schema ``version`` lack or hold by an older definition (those a step
    without endpoint metrics holds, for ``endpoint=False``)."""
    return [
        name
        for name, v in VARIABLES.items()
        if max(v.since, v.revised) > version and (endpoint or v.when != "endpoint")
    ]
