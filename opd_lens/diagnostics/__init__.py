"""Parameter-space diagnostics of fine-tuning updates: pure functions on torch tensors (no I/O, any device).

W_0 is the origin matrix (m×n, torch layout [out, in]), W_t a checkpoint's, ΔW_t = W_t − W_0. Scalar functions
return 0-d tensors and accept batches (leading dimensions broadcast); SVDs run in float64. Definitions follow
the OPD paper (arXiv 2606.07082 v3, App. C.3) and PNT (arXiv 2511.08567).

Update support (``support``)
    update_mask(w0, wt, eta=1e-3)
        M_upd = {(i,j): bf16(W_t)_ij ≉_η bf16(W_0)_ij}; unchanged iff |ŵ − w| ≤ η·max(|w|, |ŵ|). For η < 2⁻⁸
        (the default) this is exact bf16 equality (±0 equal); NaN/inf compared explicitly.
    unchanged_fraction(w0, wt, eta=1e-3)
        sp_bf16 = 1 − |M_upd| / (m·n).

Masks (``masks``)
    principal_mask(w0, rank=64, alpha=0.5)
        top-⌈α·m·n⌉ entries of |U_r Σ_r V_rᵀ| (rank-r reconstruction of W_0); meaningful for r < min(m, n)
        (``principal_mask_applies``).
    lowmag_mask(w0, alpha=0.5)
        bottom-⌈α·m·n⌉ entries of |W_0|.
    mask_overlap(mask, update)
        |M ∩ M_upd| / |M_upd|; the random baseline is α.
    tie_overlap_range(scores, alpha, update)
        the least and greatest overlap over every way of breaking ties at the mask's threshold.

Endpoint spectra (``spectral``)
    principal_angles(w0, wt, k=512)
        degrees between top-k left (U) and right (V) singular subspaces of W_0 and W_t, k ≤ min(m, n) or a
        fraction of it (``subspace_k``); cos θ_i = σ_i(U_{0,k}ᵀ U_{t,k}), small angles from the sines of
        (I − U_0U_0ᵀ)U_t; NaN on a side of dimension k, where they are zero by construction (``angle_sides``).
    spectral_shift(s0, st)
        ‖σ(W_t) − σ(W_0)‖₂ / ‖σ(W_0)‖₂ over full spectra.
    intruder_dimensions(u0, ut, k=10, eps=0.5)
        the top-k left singular vectors of W_t whose max |cos| with every left singular vector of W_0 is < ε.
    intruder_count(ut, u0_top, u0_all)
        their number, exactly, from W_0's top vectors where the bound √(1 − ‖U_{0,top}ᵀu‖²) < ε decides it.

Trajectory of ΔW_t (``trajectory``)
    update_fro(dw)          ‖ΔW‖_F.
    stable_rank(s)          ‖ΔW‖_F² / σ_1(ΔW)².
    channel_energy(s, fro)  Σ_{i≤K} σ_i² / ‖ΔW‖_F², the share of ΔW in its top-K channel.
    channel_applies(shape)  K < min(m, n): otherwise the channel energy and Sim_K are fixed by construction.
    hill_alpha(s, k=10)     [ (1/(k−1)) Σ_{i<k} log(σ_i/σ_k) ]⁻¹ over the top-k singular values.
    sim_k(va, vb)           ‖V_aᵀ V_b‖_F² / K for top-K right singular bases, K = 16.

Fast trajectory spectra (``krylov``)
    top_spectrum(a, k)      top-k singular values and right vectors by adaptive block Krylov (float32 passes,
                            float64 Rayleigh–Ritz); within 1% (stable rank), 2% (Hill α), 0.01 (Sim_K) of exact.

One matrix, everything (``matrix``)
    matrix_diagnostics(w0, wt, settings=Settings(), origin=None) -> MatrixDiagnostics
        all of the above; trajectory spectra by ``top_spectrum`` unless ``Settings(exact=True)``;
        ``origin_factors(w0)`` is the per-run W_0 work to reuse.

Low-rank updates (``lora``)
    lora_diagnostics(w0, left, right, ...)
        the same for W_t = W_0 + L·R (a LoRA adapter), the spectrum of ΔW exactly from QR(L), QR(Rᵀ) and an r×r SVD;
        the update mask from bf16(W_0 + L·R) in row blocks.

Linear algebra (``linalg``)
    svd64(w, k=None), subspace_angles(a, b), top_right_singular_vectors(w, k).
"""

from .krylov import KRYLOV_TOL, TopSpectrum, krylov_budget, top_spectrum
from .linalg import Factors, all_finite, gram_svd, subspace_angles, svd64, top_right_singular_vectors
from .lora import lora_diagnostics, lora_spectrum, lora_update_mask, lora_weight
from .masks import (
    MASK_ALPHA,
    MASK_RANK,
    fraction_mask,
    lowmag_mask,
    mask_overlap,
    principal_mask,
    principal_mask_applies,
    tie_overlap_range,
)
from .matrix import (
    MatrixDiagnostics,
    OriginFactors,
    Settings,
    endpoint_factors,
    matrix_diagnostics,
    nonfinite_diagnostics,
    origin_factors,
)
from .spectral import (
    ANGLE_K,
    INTRUDER_EPS,
    INTRUDER_K,
    angle_sides,
    intruder_count,
    intruder_dimensions,
    principal_angles,
    spectral_shift,
    subspace_k,
)
from .support import ETA, UpdatePass, unchanged_fraction, update_mask, update_pass
from .trajectory import HILL_K, LOCK_K, channel_applies, channel_energy, hill_alpha, sim_k, stable_rank, update_fro

__all__ = [
    "all_finite",
    "angle_sides",
    "channel_applies",
    "channel_energy",
    "endpoint_factors",
    "gram_svd",
    "krylov_budget",
    "update_pass",
    "UpdatePass",
    "lora_diagnostics",
    "lora_spectrum",
    "lora_update_mask",
    "lora_weight",
    "ANGLE_K",
    "ETA",
    "HILL_K",
    "KRYLOV_TOL",
    "LOCK_K",
    "MASK_ALPHA",
    "MASK_RANK",
    "Factors",
    "MatrixDiagnostics",
    "OriginFactors",
    "Settings",
    "TopSpectrum",
    "fraction_mask",
    "hill_alpha",
    "intruder_dimensions",
    "intruder_count",
    "INTRUDER_EPS",
    "INTRUDER_K",
    "lowmag_mask",
    "mask_overlap",
    "matrix_diagnostics",
    "nonfinite_diagnostics",
    "origin_factors",
    "principal_angles",
    "principal_mask",
    "principal_mask_applies",
    "sim_k",
    "spectral_shift",
    "stable_rank",
    "subspace_angles",
    "subspace_k",
    "svd64",
    "tie_overlap_range",
    "top_right_singular_vectors",
    "top_spectrum",
    "unchanged_fraction",
    "update_fro",
    "update_mask",
]
