"""Known answers of ``opd_lens.diagnostics``: cases whose value follows from the definitions by hand.

Tolerances are stated per test; "exact" means ``==`` on the returned float.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd_lens.diagnostics import (
    ANGLE_K,
    ETA,
    HILL_K,
    LOCK_K,
    MASK_ALPHA,
    MASK_RANK,
    Settings,
    fraction_mask,
    hill_alpha,
    lowmag_mask,
    mask_overlap,
    matrix_diagnostics,
    origin_factors,
    principal_angles,
    principal_mask,
    sim_k,
    spectral_shift,
    stable_rank,
    subspace_angles,
    svd64,
    top_right_singular_vectors,
    unchanged_fraction,
    update_fro,
    update_mask,
)

SHAPES = [(48, 24), (24, 48), (32, 32)]
SHAPE_IDS = ["tall48x24", "wide24x48", "square32"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
ETAS = [1e-3, 0.01]
ETA_IDS = ["eta1e-3", "eta1e-2"]

shapes = pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
etas = pytest.mark.parametrize("eta", ETAS, ids=ETA_IDS)


def rand(shape, dtype=torch.float64, seed=0, scale=0.02):
    return torch.from_numpy(np.random.default_rng(seed).normal(0.0, scale, shape)).to(dtype)


def orthonormal(n, k, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, k)))
    return q


def bf16_bits(bits: int) -> torch.Tensor:
    """A 0-d bf16 tensor from its 16-bit pattern (given as an unsigned int)."""
    return torch.tensor(bits - (1 << 16) if bits >= 1 << 15 else bits, dtype=torch.int16).view(torch.bfloat16)


def changed(a, b, eta=ETA, dtype=torch.float32) -> bool:
    """update_mask on two scalars (python floats or 0-d tensors) stored as ``dtype``."""
    ta = a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=dtype)
    tb = b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=dtype)
    return bool(update_mask(ta.reshape(1, 1), tb.reshape(1, 1), eta)[0, 0])


def test_documented_defaults():
    assert ETA == 1e-3
    assert MASK_RANK == 64
    assert MASK_ALPHA == 0.5
    assert ANGLE_K == 512
    assert LOCK_K == 16
    assert HILL_K == 10
    assert Settings() == Settings(eta=1e-3, mask_rank=64, mask_alpha=0.5, angle_k=512, lock_k=16, hill_k=10)


# ----------------------------------------------------------------------------------------------------------------
# identical checkpoints
# ----------------------------------------------------------------------------------------------------------------


@shapes
@dtypes
def test_identical_checkpoints(shape, dtype):
    w0 = rand(shape, dtype, seed=1)
    wt = w0.clone()
    for eta in ETAS:
        assert not update_mask(w0, wt, eta).any()
        assert float(unchanged_fraction(w0, wt, eta)) == 1.0
    au, av = principal_angles(w0, wt, k=512)
    assert au.numel() == av.numel() == min(shape)
    for angles, side in ((au, shape[0]), (av, shape[1])):  # k = min(m, n): the side of that dimension is trivial
        if side == min(shape):
            assert bool(angles.isnan().all())  # zero by construction: not a measurement
        else:
            assert float(angles.abs().max()) < 1e-6  # degrees
    f0, ft = svd64(w0), svd64(wt)
    assert float(spectral_shift(f0.s, ft.s)) == 0.0
    dw = wt.double() - w0.double()
    assert float(update_fro(dw)) == 0.0
    s = svd64(dw).s
    assert math.isnan(float(stable_rank(s)))
    assert math.isnan(float(hill_alpha(s)))

    d = matrix_diagnostics(w0, wt)
    assert d.unchanged_frac == 1.0
    assert d.update_fro == 0.0
    assert math.isnan(d.stable_rank)
    assert math.isnan(d.hill_alpha)
    assert math.isnan(d.principal_overlap) and math.isnan(d.lowmag_overlap)  # |M_upd| = 0
    m, n = shape  # default angle_k = 512: the side of dimension min(m, n) is trivial (NaN), the other measured
    for angle, side in ((d.max_angle_u, m), (d.max_angle_v, n)):
        assert math.isnan(angle) if side == min(shape) else angle < 1e-6
    assert d.spectral_shift == 0.0


# ----------------------------------------------------------------------------------------------------------------
# bf16 update support: single-entry known answers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["nextafter", "bits"])
@pytest.mark.parametrize("direction", [1, -1], ids=["up", "down"])
@shapes
def test_one_bf16_ulp_change_of_one_entry(shape, direction, method):
    w0 = rand(shape, torch.bfloat16, seed=2)
    n = shape[0] * shape[1]
    for flat_idx in (0, n // 2 + 3, n - 1):
        i, j = divmod(flat_idx, shape[1])
        wt = w0.clone()
        if method == "nextafter":
            wt[i, j] = torch.nextafter(w0[i, j], torch.tensor(direction * math.inf, dtype=torch.bfloat16))
        else:  # add ±1 to the bit pattern: one ULP away from zero for +1 (the entry is nonzero)
            bits = w0.view(torch.int16).clone()
            bits[i, j] += direction
            wt = bits.view(torch.bfloat16)
        assert int(wt.view(torch.int16)[i, j]) - int(w0.view(torch.int16)[i, j]) in (1, -1)
        mask = update_mask(w0, wt)
        assert int(mask.sum()) == 1 and bool(mask[i, j])
        assert float(unchanged_fraction(w0, wt)) == 1.0 - 1.0 / n
        # a relative change of one ULP is ≤ 2⁻⁷ < 0.01: the general branch with η = 0.01 calls it unchanged
        assert float(unchanged_fraction(w0, wt, 0.01)) == 1.0


@pytest.mark.parametrize(
    "bits", [0x3F80, 0x3F81, 0x4049, 0xC47A, 0x7F7E, 0x0080, 0x0081, 0x0005, 0x807F], ids=lambda b: hex(b)
)
def test_one_ulp_bit_neighbours_are_changed(bits):
    # normal, max-finite neighbour, smallest normal, subnormals, negative subnormal
    a = bf16_bits(bits)
    for b in (bf16_bits(bits + 1), bf16_bits(bits - 1)):
        assert changed(a, b)
        assert changed(b, a)
        # the same values stored in fp32 are also one bf16 ULP apart
        assert changed(a.float(), b.float())


@etas
@dtypes
def test_signed_zeros_are_unchanged(dtype, eta):
    assert not changed(0.0, -0.0, eta, dtype)
    assert not changed(-0.0, 0.0, eta, dtype)
    w0 = torch.zeros(4, 5, dtype=dtype)
    assert float(unchanged_fraction(w0, -w0, eta)) == 1.0


@etas
def test_zero_to_smallest_subnormal_is_changed(eta):
    tiny = bf16_bits(0x0001)  # 2^-133, the smallest bf16 subnormal
    assert float(tiny) == 2.0**-133
    zero, neg_zero, neg_tiny = bf16_bits(0x0000), bf16_bits(0x8000), bf16_bits(0x8001)
    for a, b in ((zero, tiny), (tiny, zero), (neg_zero, tiny), (zero, neg_tiny), (tiny, neg_tiny)):
        assert changed(a, b, eta)
    # fp32 inputs are rounded to bf16 first: 2^-133 is visible, anything ≤ half of it rounds to zero
    assert changed(0.0, 2.0**-133, eta)
    assert changed(0.0, 1.5 * 2.0**-134, eta)  # rounds up to 2^-133
    assert not changed(0.0, 2.0**-134, eta)  # exact tie, rounds to even (zero)
    assert not changed(0.0, 2.0**-149, eta)  # the smallest fp32 subnormal is invisible in bf16


def _bf16_ulp(x: torch.Tensor) -> float:
    return float(torch.nextafter(x, torch.tensor(math.inf, dtype=torch.bfloat16)).double() - x.double())


@pytest.mark.parametrize("value", [1.0078125, 3.140625, -1000.0, 0.0234375, 1.5e-20, -6.0e30])
def test_fp32_change_below_half_bf16_ulp_is_invisible(value):
    x = torch.tensor(value, dtype=torch.bfloat16)
    assert x.item() != 0 and float(x.abs()) != 2.0 ** math.floor(math.log2(abs(float(x))))  # not a binade edge
    ulp = _bf16_ulp(x.abs()) * (1 if float(x) > 0 else -1)  # away from zero
    xf = x.float()
    lo, hi = 63 / 128, 65 / 128  # just below / above half a ULP, dyadic so that x + frac·ULP is exact in fp32
    below = torch.tensor(float(x) + lo * ulp, dtype=torch.float32)
    above = torch.tensor(float(x) + hi * ulp, dtype=torch.float32)
    half = torch.tensor(float(x) + 0.5 * ulp, dtype=torch.float32)
    # every one of these fp32 numbers is exact (≤ 15 significant bits) and differs from x in fp32
    for t, frac in ((below, lo), (above, hi), (half, 0.5)):
        assert float(t) == float(x) + frac * ulp and float(t) != float(x)
    assert not changed(xf, below)
    assert changed(xf, above)
    # exactly half a ULP: round-to-nearest-even, visible iff x's last mantissa bit is odd
    odd = bool(int(x.view(torch.int16)) & 1)
    assert changed(xf, half) == odd


def test_dense_sub_half_ulp_update_has_full_sparsity():
    w0 = rand((32, 16), torch.bfloat16, seed=3).float()
    ulp = torch.nextafter(w0.abs().to(torch.bfloat16), torch.tensor(math.inf, dtype=torch.bfloat16)).float()
    ulp = ulp - w0.abs()
    wt = w0 + torch.sign(w0) * 0.4 * ulp
    assert bool((wt != w0).all())
    assert float(unchanged_fraction(w0, wt)) == 1.0
    assert float(unchanged_fraction(w0, w0 + torch.sign(w0) * 0.6 * ulp)) == 0.0


def test_reference_absolute_tolerance_examples():
    # diagnostics.md §1a "Why not an absolute tolerance": 1024.001 and 1024.002 round to the same bf16 (1024),
    # 1e-6 and 2e-6 are ~134 ULPs apart
    assert not changed(1024.001, 1024.002)
    assert changed(1e-6, 2e-6)
    assert not changed(1024.0, 1027.0)  # bf16 spacing at 1024 is 8: 1027 rounds to 1024
    assert changed(1024.0, 1029.0)  # 1029 rounds to 1032


@etas
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_non_finite_rules(dtype, eta):
    nan, inf = math.nan, math.inf
    if dtype == torch.bfloat16:
        nans = [bf16_bits(0x7FC0), bf16_bits(0x7FC1), bf16_bits(0xFFC0), bf16_bits(0x7F81)]
    else:
        nans = [torch.tensor(nan), -torch.tensor(nan)]
    for a in nans:
        for b in nans:
            assert not changed(a, b, eta, dtype)  # NaN on both sides (any payload): unchanged
        for x in (1.0, 0.0, -0.0, 2.0**-133, inf, -inf):
            assert changed(a, x, eta, dtype)  # NaN vs a number: changed
            assert changed(x, a, eta, dtype)
    assert not changed(inf, inf, eta, dtype)
    assert not changed(-inf, -inf, eta, dtype)
    assert changed(inf, -inf, eta, dtype)
    assert changed(inf, 3.0e38, eta, dtype)  # the largest bf16 values are still finite
    assert changed(-3.0e38, -inf, eta, dtype)
    if dtype == torch.float32:
        assert changed(3.3e38, 3.4e38, eta, dtype)  # 3.4e38 overflows to inf in bf16
        assert not changed(3.4e38, math.inf, eta, dtype)


@pytest.mark.parametrize(
    "w0,wt,eta",
    [
        (-(2.0**-10), 2.0**22, 1.0),  # |Δ| = 2²² + 2⁻¹⁰ > 1·2²²: changed
        (-2.2729798727922060e38, 2.2729798727922060e38, 1.5),  # |Δ| = 2·x > 1.5·x: changed
    ],
)
def test_update_mask_literal_test_for_large_eta(w0, wt, eta):
    """The documented test, unchanged iff |ŵ − w| ≤ η·max(|w|, |ŵ|), for η ≥ 1 (general branch).

    Regression: evaluated in float32, 2²² + 2⁻¹⁰ rounded to 2²² and 2·x overflowed to inf ≤ 1.5·x = inf, so both
    pairs came out unchanged.

    Both pairs are finite bf16 values of opposite sign, so |ŵ − w| = |w| + |ŵ| > max(|w|, |ŵ|)·η for the η given;
    the entries are changed by the literal (exact-arithmetic) definition.
    """
    a, b = torch.tensor(w0, dtype=torch.bfloat16), torch.tensor(wt, dtype=torch.bfloat16)
    assert float(a) == w0 and float(b) == wt  # exactly representable
    assert abs(w0) + abs(wt) > eta * max(abs(w0), abs(wt))  # exact in float64 for these values
    assert changed(a, b, eta)


# ----------------------------------------------------------------------------------------------------------------
# masks: known answers
# ----------------------------------------------------------------------------------------------------------------


def test_masks_on_a_known_matrix():
    # |W_0| = 1..12 in a 3×4 layout; rank-1 W_0 so the rank-1 reconstruction is W_0 itself
    w0 = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -2.0, 3.0, 4.0]))
    low = lowmag_mask(w0, alpha=0.25)  # k = 3: |w| ∈ {1, 2, 2} (two 2's tie, 12 entries)
    assert int(low.sum()) == 3 and bool(low[0, 0]) and bool(low[0, 1]) and bool(low[1, 0])
    princ = principal_mask(w0, rank=1, alpha=0.25)  # the three largest |w|: 12, 9, 8 (row 3: 3,6,9,12; 8 at (1,3))
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[2, 3] = expected[2, 2] = expected[1, 3] = True
    assert torch.equal(princ, expected)
    update = torch.zeros(3, 4, dtype=torch.bool)
    update[2, 3] = update[0, 0] = True
    assert float(mask_overlap(princ, update)) == 0.5
    assert float(mask_overlap(low, update)) == 0.5
    assert float(mask_overlap(princ, princ)) == 1.0
    assert float(mask_overlap(~princ, princ)) == 0.0
    assert int(fraction_mask(torch.arange(12.0).view(3, 4), 1.0).sum()) == 12


def test_principal_mask_random_baseline_is_alpha():
    # the overlap of a mask with the full update is |M| / n = ⌈α·n⌉ / n
    w0 = rand((40, 25), torch.float32, seed=4)
    full = torch.ones(40, 25, dtype=torch.bool)
    for alpha in (0.3, 0.5):
        assert float(mask_overlap(principal_mask(w0, 8, alpha), full)) == alpha
        assert float(mask_overlap(lowmag_mask(w0, alpha), full)) == alpha


def test_fraction_mask_ties_go_to_lowest_row_major_index():
    flat = torch.zeros(4, 6)
    for alpha, k in ((0.25, 6), (0.5, 12), (0.3, 8)):  # ⌈0.3·24⌉ = ⌈7.2⌉ = 8
        expected = (torch.arange(24) < k).view(4, 6)
        assert torch.equal(fraction_mask(flat, alpha, largest=True), expected)
        assert torch.equal(fraction_mask(flat, alpha, largest=False), expected)
        assert torch.equal(lowmag_mask(flat.to(torch.bfloat16), alpha), expected)
    # a tie across the threshold: scores 0,1,1,1,1,2 (row-major), k = 3
    scores = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
    assert torch.equal(
        fraction_mask(scores, 0.5, largest=True), torch.tensor([[False, True, True], [False, False, True]])
    )
    assert torch.equal(
        fraction_mask(scores, 0.5, largest=False), torch.tensor([[True, True, True], [False, False, False]])
    )
    # ±0 are the same score
    signed = torch.tensor([[0.0, -0.0, 0.0, -0.0]])
    assert torch.equal(fraction_mask(signed, 0.5), torch.tensor([[True, True, False, False]]))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
def test_fraction_mask_selects_exactly_k_with_nan_scores(alpha, largest):
    """The documented contract: exactly k = ⌈α·m·n⌉ entries per matrix, whatever the scores.

    A NaN in W_0 (a diverged checkpoint, which update_mask explicitly supports) makes |W_0| contain NaN.
    """
    scores = torch.arange(16, dtype=torch.float32).view(4, 4)
    scores[0, :3] = math.nan
    k = math.ceil(alpha * 16)
    assert int(fraction_mask(scores, alpha, largest).sum()) == k
    if not largest:
        assert int(lowmag_mask(scores, alpha).sum()) == k


# ----------------------------------------------------------------------------------------------------------------
# planted low-rank updates: stable rank, Hill, Sim_K
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 3, 8])
@shapes
def test_planted_equal_singular_values(shape, r):
    m, n = shape
    c = 0.37
    u, v = orthonormal(m, r, seed=5), orthonormal(n, r, seed=6)
    dw = torch.from_numpy(c * u @ v.T)  # U diag(c, …, c) Vᵀ, float64
    s = svd64(dw).s
    assert float(stable_rank(s)) == pytest.approx(r, rel=1e-9)
    # with the exact spectrum: σ_1 = … = σ_r = c, σ_{r+1} = … = 0
    s_exact = torch.tensor([c] * r + [0.0] * (min(m, n) - r), dtype=torch.float64)
    assert float(stable_rank(s_exact)) == pytest.approx(r, rel=1e-15)
    for k in range(2, 12):
        if k <= r:
            assert float(hill_alpha(s_exact, k)) == math.inf  # σ_1 = σ_k: no tail
            # the SVD's σ_i agree to ~1e-16 relative only, so the estimate is huge rather than inf
            assert float(hill_alpha(s, k)) > 1e12
        else:
            assert math.isnan(float(hill_alpha(s_exact, k)))  # σ_k = 0: rank < k
            assert math.isnan(float(hill_alpha(s, k)))  # σ_k ~ 1e-16·σ_1 is numerically zero
    # Sim_K of the top-r right subspace with the planted V (any basis of it)
    vr = top_right_singular_vectors(dw, r)
    assert float(sim_k(vr, torch.from_numpy(v))) == pytest.approx(1.0, abs=1e-12)
    rot = orthonormal(r, r, seed=7)
    assert float(sim_k(vr, torch.from_numpy(v @ rot))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("r", [2, 5])
def test_planted_distinct_singular_values(r):
    u, v = orthonormal(40, r, seed=8), orthonormal(30, r, seed=9)
    sig = np.array([3.0, 2.0, 1.5, 1.0, 0.5])[:r]
    dw = torch.from_numpy((u * sig) @ v.T)
    s = svd64(dw).s
    assert float(stable_rank(s)) == pytest.approx(np.sum(sig**2) / sig[0] ** 2, rel=1e-12)
    k = r
    expected_hill = 1.0 / np.mean(np.log(sig[: k - 1] / sig[k - 1]))
    assert float(hill_alpha(s, k)) == pytest.approx(expected_hill, rel=1e-12)
    assert float(sim_k(top_right_singular_vectors(dw, r), torch.from_numpy(v))) == pytest.approx(1.0, abs=1e-12)
    # with a column of the planted V missing, the overlap is (r − 1)/r
    if r > 1:
        vr = top_right_singular_vectors(dw, r)
        other = torch.from_numpy(np.concatenate([v[:, :-1], orthonormal(30, 30, seed=10)[:, -1:]], axis=1))
        other_q, _ = torch.linalg.qr(other)
        assert float(sim_k(vr, other_q)) == pytest.approx((r - 1) / r, abs=0.1)


@pytest.mark.parametrize("K", [1, 4, 16])
def test_sim_k_orthogonal_subspaces_is_zero(K):
    n = 40
    q = torch.from_numpy(orthonormal(n, n, seed=11))
    assert float(sim_k(q[:, :K], q[:, K : 2 * K])) == pytest.approx(0.0, abs=1e-15)
    assert float(sim_k(q[:, :K], q[:, :K])) == pytest.approx(1.0, abs=1e-14)
    eye = torch.eye(n, dtype=torch.float64)
    assert float(sim_k(eye[:, :K], eye[:, K : 2 * K])) == 0.0
    assert float(sim_k(eye[:, :K], eye[:, :K])) == 1.0


def test_subspace_angles_of_coordinate_planes():
    eye = torch.eye(4, dtype=torch.float64)
    th = math.radians(30.0)
    b = torch.stack([eye[:, 0], math.cos(th) * eye[:, 1] + math.sin(th) * eye[:, 2]], dim=1)
    got = subspace_angles(eye[:, :2], b)
    torch.testing.assert_close(got, torch.tensor([0.0, th], dtype=torch.float64), rtol=1e-14, atol=1e-15)
    got90 = subspace_angles(eye[:, :2], eye[:, 2:])
    torch.testing.assert_close(got90, torch.tensor([math.pi / 2] * 2, dtype=torch.float64), rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# principal angles: a rotation by a known tiny angle
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("j", [0, 2], ids=["mix_v1_v2", "mix_v3_v4"])
@shapes
def test_givens_rotation_of_right_singular_vectors(shape, j):
    """W_t = U Σ (V G)ᵀ, G a Givens rotation by θ = 1e-4° of columns j, j+1 of V, σ well separated.

    The top-(j+1) right subspace turns by exactly θ (span(v_1..v_j) and the plane of v_j, v_{j+1} are kept), the
    left one does not move. arccos(cos θ) would resolve θ = 1.75e-6 rad only to ~eps/θ ≈ 6e-11 rad ≈ 4e-5
    relative; the sine formulation gets ~eps·σ_1/gap/θ ≈ 1e-9, so 1e-6 relative proves it is used.
    """
    m, n = shape
    p = min(m, n)
    theta_deg = 1e-4
    theta = math.radians(theta_deg)
    u, v = orthonormal(m, p, seed=12), orthonormal(n, p, seed=13)
    sig = 10.0 * 0.8 ** np.arange(p)  # gaps ≥ 20% of σ_i
    g = np.eye(p)
    g[j, j] = g[j + 1, j + 1] = math.cos(theta)
    g[j, j + 1], g[j + 1, j] = -math.sin(theta), math.sin(theta)
    w0 = torch.from_numpy((u * sig) @ v.T)
    wt = torch.from_numpy((u * sig) @ (v @ g).T)
    k = j + 1
    au, av = principal_angles(w0, wt, k=k)
    assert float(av.max()) == pytest.approx(theta_deg, rel=1e-6)
    assert float(av[-1]) == float(av.max())
    if k > 1:
        assert float(av[:-1].max()) < 1e-9
    assert float(au.max()) < 1e-9  # degrees; the left subspace is unchanged
    # the same through matrix_diagnostics
    d = matrix_diagnostics(w0, wt, Settings(angle_k=k))
    assert d.max_angle_v == pytest.approx(theta_deg, rel=1e-6)
    assert d.max_angle_u < 1e-9
    # rotating the two vectors as a pair keeps the top-(j+2) subspace: all angles ~0
    au2, av2 = principal_angles(w0, wt, k=k + 1)
    assert float(av2.max()) < 1e-9 and float(au2.max()) < 1e-9


# ----------------------------------------------------------------------------------------------------------------
# spectral shift
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.5, 2.0, 1.001, 0.999, 1.0 + 2.0**-20, -2.0])
@shapes
def test_spectral_shift_of_scaled_matrix(shape, c):
    w0 = rand(shape, torch.float64, seed=14)
    shift = float(spectral_shift(svd64(w0).s, svd64(c * w0).s))
    # σ(c·W) = |c|·σ(W) (singular values are sign-blind), so the shift is ||c| − 1| (= |c − 1| for c > 0). Each σ
    # is computed to ~eps·σ_1, so the relative error is ≲ sqrt(n)·eps/||c| − 1|: ≤ 1e-9 even for c = 1 + 2⁻²⁰.
    assert shift == pytest.approx(abs(abs(c) - 1.0), rel=1e-9)
    if c in (0.5, 2.0):  # exact scaling in binary: to a few ULPs
        assert shift == pytest.approx(abs(c - 1.0), rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_spectral_shift_of_power_of_two_scaled_bf16(dtype):
    w0 = rand((32, 16), dtype, seed=15)
    for c in (0.5, 2.0, 4.0):
        wt = w0 * c  # exact in bf16 and fp32
        assert float(spectral_shift(svd64(w0).s, svd64(wt).s)) == pytest.approx(abs(c - 1.0), rel=1e-14)


@pytest.mark.parametrize("kind", ["dense", "lowrank", "sparse", "huge"])
@shapes
@dtypes
def test_mirsky_bound(shape, dtype, kind):
    rng = np.random.default_rng(16)
    w0 = rand(shape, dtype, seed=17)
    if kind == "dense":
        dw = rng.normal(0.0, 1e-3, shape)
    elif kind == "lowrank":
        dw = 0.01 * rng.normal(size=(shape[0], 2)) @ rng.normal(size=(2, shape[1]))
    elif kind == "sparse":
        dw = np.where(rng.random(shape) < 0.05, rng.normal(0.0, 0.05, shape), 0.0)
    else:
        dw = rng.normal(0.0, 1.0, shape)
    wt = (w0.double() + torch.from_numpy(dw)).to(dtype)
    s0 = svd64(w0).s
    lhs = float(spectral_shift(s0, svd64(wt).s)) * float(torch.linalg.vector_norm(s0))
    rhs = float(update_fro(wt.double() - w0.double()))
    assert rhs > 0
    assert lhs <= rhs * (1 + 1e-12)  # rounding slack only


# ----------------------------------------------------------------------------------------------------------------
# batched inputs
# ----------------------------------------------------------------------------------------------------------------


def _stack(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(0.0, 0.02, (3, *shape))
    wt = w0 * (1.0 + rng.normal(0.0, 5e-3, w0.shape)) * (rng.random(w0.shape) < 0.6) + w0 * (
        rng.random(w0.shape) >= 0.6
    )
    return torch.from_numpy(w0).to(dtype), torch.from_numpy(wt).to(dtype)


@shapes
@dtypes
def test_batched_equals_per_matrix(shape, dtype):
    w0, wt = _stack(shape, dtype, seed=18)
    exact = {"rtol": 0.0, "atol": 0.0}
    close = {"rtol": 1e-12, "atol": 1e-12}
    for eta in ETAS:
        mb, fb = update_mask(w0, wt, eta), unchanged_fraction(w0, wt, eta)
        assert fb.shape == (3,)
        for i in range(3):
            assert torch.equal(mb[i], update_mask(w0[i], wt[i], eta))
            torch.testing.assert_close(fb[i], unchanged_fraction(w0[i], wt[i], eta), **exact)

    pb, lb = principal_mask(w0, 8, 0.3), lowmag_mask(w0, 0.3)
    upd = update_mask(w0, wt)
    ob_p, ob_l = mask_overlap(pb, upd), mask_overlap(lb, upd)
    au_b, av_b = principal_angles(w0, wt, k=6)
    assert au_b.shape == av_b.shape == (3, 6)
    f0b, ftb = svd64(w0, 6), svd64(wt, 6)
    shift_b = spectral_shift(f0b.s, ftb.s)
    dw = wt.double() - w0.double()
    fro_b, sd_b = update_fro(dw), svd64(dw).s
    sr_b, hill_b, hill4_b = stable_rank(sd_b), hill_alpha(sd_b), hill_alpha(sd_b, 4)
    vb = top_right_singular_vectors(dw, 5)
    assert vb.shape == (3, shape[1], 5)
    sim_b = sim_k(vb, vb.flip(0))
    for i in range(3):
        ps, ls = principal_mask(w0[i], 8, 0.3), lowmag_mask(w0[i], 0.3)
        # ties go to the lowest row-major index in both calls, so the masks are identical, not just equivalent
        assert torch.equal(pb[i], ps) and torch.equal(lb[i], ls)
        torch.testing.assert_close(ob_p[i], mask_overlap(ps, upd[i]), **exact)
        torch.testing.assert_close(ob_l[i], mask_overlap(ls, upd[i]), **exact)
        au, av = principal_angles(w0[i], wt[i], k=6)
        torch.testing.assert_close(au_b[i], au, **close)
        torch.testing.assert_close(av_b[i], av, **close)
        torch.testing.assert_close(f0b.s[i], svd64(w0[i]).s, **close)
        torch.testing.assert_close(shift_b[i], spectral_shift(svd64(w0[i]).s, svd64(wt[i]).s), **close)
        torch.testing.assert_close(fro_b[i], update_fro(dw[i]), **close)
        sd = svd64(dw[i]).s
        torch.testing.assert_close(sr_b[i], stable_rank(sd), **close)
        torch.testing.assert_close(hill_b[i], hill_alpha(sd), **close)
        torch.testing.assert_close(hill4_b[i], hill_alpha(sd, 4), **close)
        v_i = top_right_singular_vectors(dw[i], 5)
        torch.testing.assert_close(sim_k(vb[i], v_i), torch.tensor(1.0, dtype=torch.float64), **close)
        torch.testing.assert_close(
            sim_b[i], sim_k(v_i, top_right_singular_vectors(dw[2 - i], 5)), rtol=1e-10, atol=1e-10
        )


def test_two_batch_dimensions():
    w0, wt = _stack((12, 9), torch.float32, seed=19)
    w0, wt = torch.stack([w0, 2 * w0]), torch.stack([wt, 2 * wt])  # [2, 3, 12, 9]
    f = unchanged_fraction(w0, wt)
    assert f.shape == (2, 3)
    torch.testing.assert_close(f[0], f[1], rtol=0, atol=0)  # ×2 is exact in bf16
    au, av = principal_angles(w0, wt, k=4)
    assert au.shape == (2, 3, 4) and av.shape == (2, 3, 4)
    torch.testing.assert_close(au[0], au[1], rtol=1e-9, atol=1e-11)
    assert principal_mask(w0, 4, 0.5).shape == w0.shape


# ----------------------------------------------------------------------------------------------------------------
# matrix_diagnostics plumbing and argument checks
# ----------------------------------------------------------------------------------------------------------------


def test_matrix_diagnostics_origin_reuse_and_endpoint_false():
    w0, wt = _stack((20, 14), torch.bfloat16, seed=20)
    w0, wt = w0[0], wt[0]
    s = Settings(angle_k=5, mask_rank=3, lock_k=4, hill_k=6)
    o = origin_factors(w0, s)
    assert o.factors.u.shape == (20, 5) and o.factors.s.shape == (14,)
    d1, d2 = matrix_diagnostics(w0, wt, s), matrix_diagnostics(w0, wt, s, origin=o)
    for name in ("unchanged_frac", "update_fro", "stable_rank", "hill_alpha", "principal_overlap", "lowmag_overlap"):
        assert getattr(d1, name) == getattr(d2, name)
    assert d1.max_angle_v == pytest.approx(d2.max_angle_v, rel=1e-12)
    d3 = matrix_diagnostics(w0, wt, s, endpoint=False)
    assert math.isnan(d3.max_angle_u) and math.isnan(d3.max_angle_v) and math.isnan(d3.spectral_shift)
    assert d3.angles_u.numel() == 0 and d3.angles_v.numel() == 0
    assert d3.stable_rank == d1.stable_rank and d3.unchanged_frac == d1.unchanged_frac
    assert d1.lock_basis.shape == (14, 4)


def test_argument_checks():
    a = torch.zeros(4, 5)
    with pytest.raises(ValueError):
        update_mask(a, torch.zeros(5, 4))
    with pytest.raises(ValueError):
        hill_alpha(torch.ones(5, dtype=torch.float64), k=1)
    for alpha in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            lowmag_mask(a, alpha)
    with pytest.raises(ValueError):
        sim_k(torch.zeros(6, 2), torch.zeros(6, 3))
    with pytest.raises(ValueError):
        subspace_angles(torch.zeros(6, 2), torch.zeros(6, 3))
    with pytest.raises(ValueError):
        matrix_diagnostics(torch.zeros(2, 4, 5), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError):
        matrix_diagnostics(a, torch.zeros(5, 4))
    w = rand((10, 8), seed=21)
    with pytest.raises(ValueError):
        principal_angles(w, w, k=6, factors0=svd64(w, 3))


@pytest.mark.parametrize("n", [8, 200], ids=["exact-path", "krylov-path"])
def test_finite_pair_whose_float32_update_overflows(n):
    """Two finite bf16 matrices whose difference exceeds float32 (±3e38 entries): ‖ΔW‖_F is still the exact
    float64 norm; ΔW rounded to float32 holds ±inf where the Krylov path is taken, so its spectra are NaN there (the
    pass finds no NaN, the spectrum still scans ΔW) and exact in float64 below the Krylov size."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(n, n, generator=gen).to(torch.bfloat16)
    wt = w0.clone()
    w0[0, 0], wt[0, 0] = -3.0e38, 3.0e38
    d = matrix_diagnostics(w0, wt, Settings(angle_k=4, mask_rank=2), endpoint=False)
    exact = float((wt.double() - w0.double()).norm())
    assert d.update_fro == pytest.approx(exact, rel=1e-12) and exact > torch.finfo(torch.float32).max
    assert d.unchanged_frac == pytest.approx(1 - 1 / n**2)
    if n == 200:
        assert math.isnan(d.stable_rank) and torch.isnan(d.lock_basis).all()
    else:
        assert d.stable_rank == pytest.approx(1.0, rel=1e-9)
