"""Subspace measures against independent references (scipy, numpy float64 SVD), closed forms,
planted updates and seeded Monte Carlo with tolerances derived from the exact variances.

Every random draw here is seeded. Subspaces are compared through quantities that do not depend on
the signs of singular vectors (angles, norms, |cos|).
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from spectra import singular_bases, subspaces
from spectra.engine import factored_svd
from spectra.singular_bases import (
    TopSVD,
    WeightBasis,
    left_singular_basis,
    top_left_singular_vectors,
    top_svd,
)
from spectra.subspaces import (
    Factored,
    amplification,
    amplification_factor,
    captured_energy,
    grassmann_distance,
    intruder_dimensions,
    phi,
    phi_grid,
    phi_random_baseline,
    phi_random_baseline_grid,
    principal_angles,
    random_orthonormal,
    random_projection_rms,
    top_subspace,
)


def rand_basis(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """A uniformly random k-dim subspace of R^d: QR of a seeded Gaussian matrix.

    The QR runs in torch, not numpy: alternating numpy's OpenBLAS and torch's OpenMP pools in a
    tight Monte Carlo loop makes each spin-wait for the other's cores (60× slower on 2 cores).
    """
    return torch.linalg.qr(torch.from_numpy(rng.standard_normal((d, k)))).Q.numpy()


def planted(rng: np.random.Generator, shape: tuple[int, int], s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U diag(s) Vᵀ`` with random orthonormal U (out, q), V (in, q); returns (M, U, V)."""
    U = rand_basis(rng, shape[0], s.size)
    V = rand_basis(rng, shape[1], s.size)
    return (U * s) @ V.T, U, V


def test_docstring_examples_run():
    assert doctest.testmod(subspaces, raise_on_error=False).failed == 0
    assert doctest.testmod(singular_bases, raise_on_error=False).failed == 0


# ---- principal angles ----------------------------------------------------------------------------
@pytest.mark.parametrize("d,i,j", [(50, 5, 8), (64, 12, 3), (40, 7, 7), (30, 20, 15), (1024, 16, 64)])
def test_principal_angles_match_scipy(d, i, j):
    """scipy returns the angles descending; ours are ascending. (30, 20, 15) intersects in 5 dims,
    so 5 angles are 0, the case where arccos alone would be off by ~1e-8."""
    rng = np.random.default_rng(d * 1000 + i * 10 + j)
    A, B = rand_basis(rng, d, i), rand_basis(rng, d, j)
    theta = principal_angles(torch.from_numpy(A), torch.from_numpy(B))
    ref = np.sort(scipy.linalg.subspace_angles(A, B))
    assert theta.shape == (min(i, j),) and theta.dtype == np.float64
    assert np.all(np.diff(theta) >= 0)
    # scipy's sine/cosine mask is aligned with the wrong end of the spectrum, so some of its angles
    # near 0 come from arccos, which resolves only sqrt(2·eps) ≈ 2.1e-8; elsewhere both agree to 1e-10
    tol = np.where(ref < 1e-6, math.sqrt(2 * np.finfo(np.float64).eps) * 1.01, 1e-10)
    assert np.all(np.abs(theta - ref) <= tol)
    n_shared = max(0, i + j - d)  # dimensions the two spans must share: their angles are exactly 0
    assert np.all(theta[:n_shared] < 1e-14)
    np.testing.assert_allclose(principal_angles(torch.from_numpy(B), torch.from_numpy(A)), theta, atol=1e-14)  # symmetric
    assert grassmann_distance(torch.from_numpy(A), torch.from_numpy(B)) == pytest.approx(np.linalg.norm(ref), abs=1e-10)
    # identity: φ over all columns is the mean squared cosine of the principal angles
    assert phi(torch.from_numpy(A), torch.from_numpy(B), i, j) == pytest.approx(np.mean(np.cos(ref) ** 2), abs=1e-12)


@pytest.mark.parametrize("t", [1e-9, 1e-4, 0.3, 1.2, math.pi / 2])
def test_principal_angle_known_answer_including_tiny_angles(t):
    """span(e1) against span(cos t·e1 + sin t·e2): the angle is t, even at t = 1e-9 (sine branch)."""
    e = np.eye(5)
    a = e[:, :1]
    b = (math.cos(t) * e[:, 0] + math.sin(t) * e[:, 1])[:, None]
    (theta,) = principal_angles(torch.from_numpy(a), torch.from_numpy(b))
    assert theta == pytest.approx(t, rel=1e-9, abs=1e-15)


def test_principal_angles_identical_and_orthogonal_and_float32():
    rng = np.random.default_rng(0)
    Q = rand_basis(rng, 80, 10)
    np.testing.assert_allclose(principal_angles(torch.from_numpy(Q), torch.from_numpy(Q[:, ::-1].copy())), 0.0, atol=1e-12)
    full = rand_basis(rng, 80, 20)
    np.testing.assert_allclose(principal_angles(torch.from_numpy(full[:, :10]), torch.from_numpy(full[:, 10:])), np.pi / 2, atol=1e-12)
    # float32 bases are accepted (upcast to float64); float32 rounding limits the agreement
    A, B = rand_basis(rng, 80, 6), rand_basis(rng, 80, 9)
    theta32 = principal_angles(torch.from_numpy(A).float(), torch.from_numpy(B).float())
    np.testing.assert_allclose(theta32, np.sort(scipy.linalg.subspace_angles(A, B)), atol=1e-5)


# ---- φ ----------------------------------------------------------------------------------------------
def test_phi_identical_is_one_and_orthogonal_is_zero():
    rng = np.random.default_rng(1)
    Q = torch.from_numpy(rand_basis(rng, 64, 24))
    np.testing.assert_allclose(phi_grid(Q, Q), 1.0, atol=1e-12)  # nested prefixes: one span contains the other
    np.testing.assert_allclose(phi_grid(Q[:, :12], Q[:, 12:]), 0.0, atol=1e-12)
    assert phi(Q, Q, 3, 17) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("d,a,b", [(64, 8, 8), (100, 8, 20), (128, 16, 5)])
def test_phi_grid_equals_naive_double_loop_and_is_in_unit_interval(d, a, b):
    rng = np.random.default_rng(d + a + b)
    # correlated subspaces so φ spans (0, 1): B shares part of A's span
    A = rand_basis(rng, d, a)
    B = np.linalg.qr(np.hstack([A[:, : min(a, b) // 2], rng.standard_normal((d, b - min(a, b) // 2))]))[0]
    QA, QB = torch.from_numpy(A), torch.from_numpy(B)
    grid = phi_grid(QA, QB)
    assert grid.shape == (a, b) and grid.dtype == np.float64
    naive = np.array([[phi(QA, QB, i, j) for j in range(1, b + 1)] for i in range(1, a + 1)])
    ref = np.array([[np.linalg.norm(A[:, :i].T @ B[:, :j]) ** 2 / min(i, j) for j in range(1, b + 1)] for i in range(1, a + 1)])
    np.testing.assert_allclose(grid, naive, rtol=0, atol=1e-14)
    np.testing.assert_allclose(grid, ref, rtol=0, atol=1e-12)
    assert np.all((grid >= 0) & (grid <= 1))
    assert phi_grid(QA, QB, 3, 2).shape == (3, 2)
    np.testing.assert_array_equal(phi_grid(QA, QB, 3, 2), grid[:3, :2])


def test_phi_random_subspaces_match_baseline():
    """Independent uniformly random subspaces in d = 1024: E[φ(i, j)] = max(i, j)/d, per cell and
    over the grid.

    Tolerance from the exact variance of ``X = ‖QA_iᵀ QB_j‖_F²`` for independent uniform subspaces,
    ``Var X = 2ij(d−i)(d−j) / (d²(d−1)(d+2))``, so ``sd(φ) = sqrt(Var X) / min(i, j)``. With N
    trials each cell's mean must lie within 5·sd/√N of max(i, j)/d, and the grid mean within
    5·mean(sd)/√N (the sd of a mean of correlated cells is at most the mean of their sds).
    """
    d, n, N = 1024, 16, 200
    rng = np.random.default_rng(20210617)
    acc = np.zeros((n, n))
    for _ in range(N):
        acc += phi_grid(torch.from_numpy(rand_basis(rng, d, n)), torch.from_numpy(rand_basis(rng, d, n)))
    mean = acc / N
    base = phi_random_baseline_grid(n, n, d)
    i = np.arange(1, n + 1, dtype=np.float64)[:, None]
    j = np.arange(1, n + 1, dtype=np.float64)[None, :]
    sd = np.sqrt(2 * i * j * (d - i) * (d - j) / (d**2 * (d - 1) * (d + 2))) / np.minimum(i, j)
    assert np.all(np.abs(mean - base) <= 5 * sd / math.sqrt(N))
    assert abs(mean.mean() - base.mean()) <= 5 * sd.mean() / math.sqrt(N)
    assert base[7, 2] == phi_random_baseline(8, 3, d) == 8 / 1024


# ---- captured energy --------------------------------------------------------------------------------
def _spectrum_update(rng, shape=(96, 160), q=40):
    s = np.sort(rng.uniform(0.05, 1.0, q))[::-1] * np.arange(1, q + 1) ** -0.7  # distinct, decaying
    return planted(rng, shape, s), s


@pytest.mark.parametrize("r", [1, 5, 12])
def test_captured_energy_in_own_top_subspace_equals_energy_fraction(r):
    rng = np.random.default_rng(r)
    (M, _, _), _ = _spectrum_update(rng)
    U_ref, S_ref, Vh_ref = np.linalg.svd(M, full_matrices=False)  # independent float64 oracle
    frac = np.sum(S_ref[:r] ** 2) / np.sum(S_ref**2)
    res = captured_energy(torch.from_numpy(M), torch.from_numpy(U_ref[:, :r]), torch.from_numpy(Vh_ref[:r].T))
    assert res.r == r
    for value in (res.two_sided, res.left, res.right, res.best_rank_r):
        assert value == pytest.approx(frac, rel=1e-10)
    # bases built by spectra itself (possibly other signs) give the same numbers
    D = torch.from_numpy(M).float()
    res32 = captured_energy(D, top_subspace(D, r, "left"), top_subspace(D, r, "right"))
    assert res32.two_sided == pytest.approx(frac, rel=1e-5)


def test_captured_energy_random_subspace_near_r_over_dim():
    """Random U_L (out, r), V_L (in, r): E[left] = r/out, E[right] = r/in, E[two_sided] = r²/(out·in).

    For a uniform rank-r projection P in R^n and fixed G >= 0 with tr G = 1,
    ``Var tr(PG) = 2r(n−r)/(n(n−1)(n+2)) · (tr G² − 1/n)``; here ``G = ΔWΔWᵀ/‖ΔW‖²`` (left) or
    ``ΔWᵀΔW/‖ΔW‖²`` (right), both with ``tr G² = Σσ⁴/(Σσ²)²``. The N-trial mean must lie within 5 sd/√N.
    """
    rng = np.random.default_rng(7)
    (M, _, _), s = _spectrum_update(rng)
    out, inn, r, N = M.shape[0], M.shape[1], 8, 300
    D = torch.from_numpy(M)
    vals = np.empty((N, 3))  # columns: left, right, two_sided
    for t in range(N):
        e = captured_energy(D, torch.from_numpy(rand_basis(rng, out, r)), torch.from_numpy(rand_basis(rng, inn, r)))
        vals[t] = e.left, e.right, e.two_sided
    trG2 = np.sum(s**4) / np.sum(s**2) ** 2
    for col, n in ((0, out), (1, inn)):
        sd = math.sqrt(2 * r * (n - r) / (n * (n - 1) * (n + 2)) * (trG2 - 1 / n))
        assert abs(vals[:, col].mean() - r / n) <= 5 * sd / math.sqrt(N)
    # two-sided: E = r²/(out·in) (independent projections). No closed-form variance is used here:
    # one draw's relative sd is ~0.4 for this update, ~0.023 for the 300-draw mean, so 10% is ~4 sd.
    assert vals[:, 2].mean() == pytest.approx(r * r / (out * inn), rel=0.10)
    assert np.all(vals[:, 2] <= vals[:, :2].min(axis=1) + 1e-15)


@pytest.mark.parametrize("scale", [1.0, 16 / 8, 16 / math.sqrt(8)])
def test_captured_energy_factored_equals_dense(scale):
    g = torch.Generator().manual_seed(11)
    B, A = torch.randn(96, 8, generator=g), torch.randn(8, 160, generator=g)
    dense = scale * (B.double() @ A.double())
    B2, A2 = torch.randn(96, 6, generator=g), torch.randn(6, 160, generator=g)
    other = Factored.from_lora(B2, A2, 1.0)
    UL, VL = top_subspace(other, 6, "left"), top_subspace(other, 6, "right")
    ref = captured_energy(dense, UL, VL)
    for fac in (Factored.from_lora(B, A, scale), factored_svd(B, A, scale)):
        res = captured_energy(fac, UL, VL)
        for field in ("two_sided", "left", "right", "best_rank_r"):
            assert getattr(res, field) == pytest.approx(getattr(ref, field), rel=1e-10)
    # a hand-built triple in ascending order is sorted before best_rank_r is taken
    U, S, Vh = factored_svd(B, A, scale)
    res = captured_energy((U.flip(1), S.flip(0), Vh.flip(0)), UL[:, :2], VL[:, :2])
    assert res.best_rank_r == pytest.approx(captured_energy(dense, UL[:, :2], VL[:, :2]).best_rank_r, rel=1e-10)


def test_captured_energy_zero_update_is_zeros_not_nan():
    rng = np.random.default_rng(3)
    UL, VL = torch.from_numpy(rand_basis(rng, 20, 3)), torch.from_numpy(rand_basis(rng, 30, 3))
    res = captured_energy(torch.zeros(20, 30), UL, VL)
    assert (res.two_sided, res.left, res.right, res.best_rank_r) == (0.0, 0.0, 0.0, 0.0)
    zero_fac = (torch.from_numpy(rand_basis(rng, 20, 2)), torch.zeros(2, dtype=torch.float64), torch.from_numpy(rand_basis(rng, 30, 2).T))
    res = captured_energy(zero_fac, UL, VL)
    assert (res.two_sided, res.left, res.right, res.best_rank_r) == (0.0, 0.0, 0.0, 0.0)


# ---- amplification ----------------------------------------------------------------------------------
def test_amplification_reproduces_hu_et_al_table7_arithmetic():
    """GPT-3 175B, layer 48, W_q (12288 × 12288), ‖W_q‖_F = 61.95 (Hu et al. 2021, Table 7).

    docs/definitions.md's random-projection numbers 0.0202 (r = 4) and 0.3227 (r = 64) are ``sqrt(E‖UᵀWV‖_F²)``
    (the squared expectations are 4.07e-4 and 0.104): a norm, comparable to ‖U_rᵀWV_r‖_F.
    """
    assert round(amplification_factor(6.91, 0.32), 1) == 21.6
    assert round(amplification_factor(3.57, 1.90), 2) == 1.88
    assert round(random_projection_rms(61.95, 4, 12288, 12288), 4) == 0.0202
    assert round(random_projection_rms(61.95, 64, 12288, 12288), 4) == 0.3227
    assert random_projection_rms(61.95, 4, 12288, 12288) ** 2 == pytest.approx(4 * 4 * 61.95**2 / 12288**2, rel=1e-14)
    assert amplification_factor(0.0, 0.0) == 0.0 and amplification_factor(1.0, 0.0) == math.inf


@pytest.mark.parametrize("r", [1, 4, 8])
def test_amplification_on_planted_update_matches_numpy(r):
    rng = np.random.default_rng(100 + r)
    out, inn = 120, 200
    W, _, _ = planted(rng, (out, inn), 5.0 * np.arange(1, out + 1) ** -0.6)
    dW, _, _ = planted(rng, (out, inn), np.array([3.0, 2.5, 2.0, 1.6, 1.3, 1.0, 0.8, 0.6]))
    U_ref, S_ref, Vh_ref = np.linalg.svd(dW, full_matrices=False)
    proj_ref = np.linalg.norm(U_ref[:, :r].T @ W @ Vh_ref[:r].T)
    S_W = np.linalg.svd(W, compute_uv=False)
    res = amplification(torch.from_numpy(dW), torch.from_numpy(W), r, generator=torch.Generator().manual_seed(0))
    assert res.r == r
    assert res.delta_fro == pytest.approx(np.linalg.norm(dW), rel=1e-12)
    assert res.w_fro == pytest.approx(np.linalg.norm(W), rel=1e-12)
    assert res.proj_delta == pytest.approx(proj_ref, rel=1e-10)
    assert res.factor == pytest.approx(np.linalg.norm(dW) / proj_ref, rel=1e-10)
    assert res.proj_own == pytest.approx(np.sqrt(np.sum(S_W[:r] ** 2)), rel=1e-10)
    assert res.proj_random_expected == pytest.approx(r * np.linalg.norm(W) / np.sqrt(out * inn), rel=1e-12)
    # W's own directions are the best any rank-r pair can do
    assert res.proj_delta <= res.proj_own * (1 + 1e-12) and res.proj_random <= res.proj_own * (1 + 1e-12)
    # factored input (the thin SVD of the same update) gives the same numbers
    fac = (torch.from_numpy(U_ref[:, :8]), torch.from_numpy(S_ref[:8]), torch.from_numpy(Vh_ref[:8]))
    res_f = amplification(fac, torch.from_numpy(W), r, generator=torch.Generator().manual_seed(0))
    for field in ("delta_fro", "proj_delta", "factor", "proj_own", "proj_random", "proj_random_expected"):
        assert getattr(res_f, field) == pytest.approx(getattr(res, field), rel=1e-10)


def test_amplification_random_projection_near_expectation():
    """Seeded random projections: reproducible per seed, and their root-mean-square over 40 seeds is
    within 20% of ``proj_random_expected = sqrt(E‖UᵀWV‖_F²)``. One draw's squared norm has a relative
    sd of ~0.4 for this W, the 40-draw mean square ~0.065; ±20% on the root is −36%/+44% on the
    square, over 5 sd."""
    rng = np.random.default_rng(5)
    W, _, _ = planted(rng, (120, 200), 5.0 * np.arange(1, 121) ** -0.3)
    dW, _, _ = planted(rng, (120, 200), np.array([2.0, 1.0, 0.5, 0.25]))
    Wt, dWt = torch.from_numpy(W), torch.from_numpy(dW)
    draws = np.array([amplification(dWt, Wt, 4, generator=torch.Generator().manual_seed(s)).proj_random for s in range(40)])
    again = amplification(dWt, Wt, 4, generator=torch.Generator().manual_seed(0)).proj_random
    assert again == draws[0]
    expected = amplification(dWt, Wt, 4).proj_random_expected
    assert math.sqrt(np.mean(draws**2)) == pytest.approx(expected, rel=0.2)


# ---- intruder dimensions ----------------------------------------------------------------------------
def _base_256x384(rng):
    return planted(rng, (256, 384), 10.0 * np.arange(1, 257) ** -0.5)  # σ1 = 10, decaying


def test_planted_intruder_is_found():
    rng = np.random.default_rng(2024)
    Wb, _, _ = _base_256x384(rng)
    u = rng.standard_normal(256); u /= np.linalg.norm(u)
    v = rng.standard_normal(384); v /= np.linalg.norm(v)
    dW = 30.0 * np.outer(u, v)  # c = 3 σ1(W_base), along a random direction
    res = intruder_dimensions(torch.from_numpy(Wb), torch.from_numpy(dW))
    # independent oracle: numpy SVDs, |cos| against all p left singular vectors of the base
    U_b = np.linalg.svd(Wb, full_matrices=False)[0]
    U_t = np.linalg.svd(Wb + dW, full_matrices=False)[0][:, :10]
    ref = np.abs(U_t.T @ U_b).max(axis=1)
    np.testing.assert_allclose(res.max_cos, ref, atol=1e-8)
    assert res.k == 10 and res.max_cos.shape == (10,)
    assert res.max_cos[0] < 0.4  # the top tuned vector is ≈ u, far from every base direction
    assert res.count >= 1 and res.counts[0.5] == res.count and res.epsilon == 0.5
    counts = [res.counts[e] for e in sorted(res.counts)]
    assert counts == sorted(counts)  # monotone non-decreasing in ε
    # factored spike gives the same answer
    fac = (torch.from_numpy(u[:, None]), torch.tensor([30.0], dtype=torch.float64), torch.from_numpy(v[None, :]))
    np.testing.assert_allclose(intruder_dimensions(torch.from_numpy(Wb), fac).max_cos, res.max_cos, atol=1e-10)


def test_no_intruder_for_small_update_inside_base_subspace():
    rng = np.random.default_rng(7)
    Wb, U_b, V_b = _base_256x384(rng)
    small = 0.01 * np.array([1.0, 0.8, 0.6, 0.4, 0.2])
    dW = (U_b[:, :5] * small) @ V_b[:, :5].T
    res = intruder_dimensions(torch.from_numpy(Wb), torch.from_numpy(dW))
    assert res.count == 0 and all(c == 0 for c in res.counts.values())
    assert res.max_cos.min() > 0.99
    counts = [res.counts[e] for e in sorted(res.counts)]
    assert counts == sorted(counts)


@pytest.mark.parametrize("seed", range(3))
def test_intruder_counts_monotone_in_epsilon(seed):
    rng = np.random.default_rng(seed)
    Wb = rng.standard_normal((64, 96))
    dW = 0.5 * rng.standard_normal((64, 96))
    res = intruder_dimensions(torch.from_numpy(Wb), torch.from_numpy(dW), k=20, epsilons=np.linspace(0.0, 1.0, 21))
    counts = [res.counts[e] for e in sorted(res.counts)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] <= 20
    assert np.all((res.max_cos >= 0) & (res.max_cos <= 1))


# ---- helpers and errors ------------------------------------------------------------------------------
def test_top_subspace_spans_match_numpy_svd():
    rng = np.random.default_rng(9)
    (M, _, _), _ = _spectrum_update(rng)
    U_ref, _, Vh_ref = np.linalg.svd(M, full_matrices=False)
    for side, ref in (("left", U_ref[:, :6]), ("right", Vh_ref[:6].T)):
        Q = top_subspace(torch.from_numpy(M), 6, side)
        assert Q.dtype == torch.float64 and Q.shape == ref.shape
        assert np.max(scipy.linalg.subspace_angles(Q.numpy(), ref)) < 1e-8
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(96, 4, generator=g), torch.randn(4, 160, generator=g)
    dense = (B.double() @ A.double()).numpy()
    U_ref, _, Vh_ref = np.linalg.svd(dense, full_matrices=False)
    assert np.max(scipy.linalg.subspace_angles(top_subspace(Factored.from_lora(B, A), 3, "right").numpy(), Vh_ref[:3].T)) < 1e-8


def test_errors_name_the_rule_and_the_bad_value():
    rng = np.random.default_rng(0)
    Q = torch.from_numpy(rand_basis(rng, 30, 4))
    raw = torch.from_numpy(rng.standard_normal((30, 4)))
    with pytest.raises(ValueError, match=r"QB must have orthonormal columns .* Got .* instead"):
        principal_angles(Q, raw)
    with pytest.raises(ValueError, match=r"QA and QB must have the same number of rows d. Got 30 and 20 instead."):
        phi_grid(Q, torch.from_numpy(rand_basis(rng, 20, 4)))
    with pytest.raises(ValueError, match=r"i must be in \[1, 4\] \(columns of QA\). Got 5 instead."):
        phi(Q, Q, 5, 1)
    with pytest.raises(ValueError, match=r"side must be 'left' or 'right'. Got 'up' instead."):
        top_subspace(raw, 2, "up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]. Got 9 instead."):
        top_subspace(raw, 9)
    with pytest.raises(ValueError, match=r"W must have the shape of dW, \(30, 4\). Got \(4, 30\) instead."):
        amplification(raw, raw.mT, 1)
    with pytest.raises(ValueError, match=r"dW's U must have orthonormal columns"):
        captured_energy((raw, torch.ones(4), raw.mT), Q, Q)
    with pytest.raises(ValueError, match=r"V_L must have as many columns as U_L \(4\). Got 2 instead."):
        captured_energy(torch.zeros(30, 30), Q, Q[:, :2])
    with pytest.raises(ValueError, match=r"epsilons must be in \[0, 1\]. Got 1.5 instead."):
        intruder_dimensions(raw, raw, k=2, epsilons=(1.5,))


# ---- singular vectors from the Gram matrix (spectra.singular_bases) ------------------------------------
def _sign_free_error(Q: np.ndarray, ref: np.ndarray) -> float:
    """max over columns of 1 − |cos| between matching columns (0 for equal vectors of any sign)."""
    return float(np.max(1.0 - np.abs(np.sum(Q * ref, axis=0))))


@pytest.mark.parametrize("shape", [(60, 60), (40, 90), (110, 50)])
def test_top_svd_matches_numpy_svd(shape):
    """Planted spectrum with relative gaps ≥ 2% between the top values: the Gram route's vectors are
    within (n + c·p)·u·σ₁²/gap ≈ 1e-13 of the SVD's, its values within 1e-12 relative."""
    rng = np.random.default_rng(sum(shape))
    p = min(shape)
    M, _, _ = planted(rng, shape, 3.0 * np.arange(1, p + 1, dtype=float) ** -1.0)
    U_ref, S_ref, Vh_ref = np.linalg.svd(M, full_matrices=False)
    for dtype in (torch.float64, torch.float32):
        Mt = torch.from_numpy(M).to(dtype)
        if dtype == torch.float32:  # the reference is the SVD of the matrix actually given
            U_ref, S_ref, Vh_ref = np.linalg.svd(Mt.double().numpy(), full_matrices=False)
        t = top_svd(Mt, 8)
        assert isinstance(t, TopSVD) and t.U.dtype == torch.float64 and t.shape == shape
        np.testing.assert_allclose(t.S.numpy(), S_ref[:8], rtol=1e-12)
        assert _sign_free_error(t.U.numpy(), U_ref[:, :8]) < 1e-12 and _sign_free_error(t.Vh.numpy().T, Vh_ref[:8].T) < 1e-12
        assert t.energy == pytest.approx(np.sum(S_ref**2), rel=1e-13)
        np.testing.assert_allclose(t.U.numpy().T @ t.U.numpy(), np.eye(8), atol=1e-13)
        # U diag(S) Vh is the rank-8 truncation
        np.testing.assert_allclose((t.U * t.S) @ t.Vh, (U_ref[:, :8] * S_ref[:8]) @ Vh_ref[:8], atol=1e-12)


def test_top_svd_of_a_rank_deficient_matrix_is_an_orthonormal_completion():
    rng = np.random.default_rng(3)
    M, U0, V0 = planted(rng, (70, 30), np.array([2.0, 1.0]))
    for Mt in (torch.from_numpy(M), torch.from_numpy(M.T.copy())):
        t = top_svd(Mt, 5)
        np.testing.assert_allclose(t.S.numpy()[:2], [2.0, 1.0], rtol=1e-12)
        assert np.all(t.S.numpy()[2:] < 1e-7)
        for Q in (t.U.numpy(), t.Vh.numpy().T):
            np.testing.assert_allclose(Q.T @ Q, np.eye(5), atol=1e-12)
        top_left = t.U.numpy()[:, :2]
        ref = U0 if Mt.shape[0] == 70 else V0
        assert np.max(scipy.linalg.subspace_angles(top_left, ref)) < 1e-10


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_left_basis_and_top_left_vectors_match_numpy(shape):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    W = rng.standard_normal(shape) / np.sqrt(shape[1])
    U_ref, S_ref, _ = np.linalg.svd(W, full_matrices=False)
    U, S = left_singular_basis(torch.from_numpy(W))
    assert U.shape == (shape[0], min(shape))
    np.testing.assert_allclose(S.numpy(), S_ref, rtol=1e-10)  # smallest σ of a square matrix: ~1e-11 relative
    assert _sign_free_error(U.numpy(), U_ref) < 1e-10
    top = top_left_singular_vectors(torch.from_numpy(W), 7)
    assert _sign_free_error(top.numpy(), U_ref[:, :7]) < 1e-12


def test_shared_pieces_give_the_same_numbers_as_computing_them_here():
    """What spectra compare shares between measures (the base's basis and spectrum, the random bases
    drawn ahead, a dense update decomposed once) changes no number."""
    rng = np.random.default_rng(11)
    W, _, _ = planted(rng, (90, 140), 4.0 * np.arange(1, 91) ** -0.5)
    dW, _, _ = planted(rng, (90, 140), np.array([3.0, 2.0, 1.5, 1.0, 0.7, 0.5]))
    Wt, dWt = torch.from_numpy(W), torch.from_numpy(dW)
    top = top_svd(dWt, 6)
    own = amplification(dWt, Wt, 4, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    drawn = (random_orthonormal(90, 4, g, torch.device("cpu")), random_orthonormal(140, 4, g, torch.device("cpu")))
    for dw, basis in ((dWt, WeightBasis(Wt, m=4)), (top, WeightBasis(Wt, m=2)), (top, WeightBasis(Wt))):
        shared = amplification(dw, Wt, 4, base=basis, random_bases=drawn)
        for field in ("delta_fro", "w_fro", "proj_delta", "factor", "proj_own", "proj_random", "proj_random_expected"):
            assert getattr(shared, field) == pytest.approx(getattr(own, field), rel=1e-12), field
    a = intruder_dimensions(Wt, dWt, k=5)
    for basis in (WeightBasis(Wt), WeightBasis(Wt, m=20), WeightBasis(Wt, m=1)):
        b = intruder_dimensions(Wt, top, k=5, base=basis)
        np.testing.assert_allclose(a.max_cos, b.max_cos, atol=1e-12)
        assert a.counts == b.counts
    UL, VL = top_subspace(top, 3, "left"), top_subspace(top, 3, "right")
    ce_dense, ce_top = captured_energy(dWt, UL, VL), captured_energy(top, UL, VL)
    for field in ("two_sided", "left", "right", "best_rank_r"):
        assert getattr(ce_top, field) == pytest.approx(getattr(ce_dense, field), abs=1e-14)
    with pytest.raises(ValueError, match=r"dW must hold at least r = 8 singular values. Got 6 instead."):
        # (bases of 8 columns from elsewhere: the rank-6 update's own stop at its 6 directions)
        captured_energy(top, random_orthonormal(90, 8, g, torch.device("cpu")), random_orthonormal(140, 8, g, torch.device("cpu")))
    with pytest.raises(ValueError, match=r"random_bases must be U \(90, 4\) and V \(140, 4\)"):
        amplification(dWt, Wt, 4, random_bases=(drawn[1], drawn[0]))
    with pytest.raises(ValueError, match=r"base must be the decomposition of a 90×140 W_base. Got \(140, 90\) instead."):
        intruder_dimensions(Wt, dWt, base=WeightBasis(Wt.mT))


@pytest.mark.parametrize("shape", [(60, 100), (100, 60), (70, 70)])
def test_intruders_of_a_factored_update_from_the_base_gram_equal_the_dense_sum(shape, monkeypatch):
    """W + U·S·Vh's top vectors from W's Gram matrix plus the update's low-rank terms (no dense sum)
    equal those of the dense sum's own Gram matrix and of a float64 SVD; so do the intruders, and
    with the Gram matrix not kept (above GRAM_KEEP_MAX_P) the dense route gives them again."""
    rng = np.random.default_rng(sum(shape))
    out, inn = shape
    W, _, _ = planted(rng, shape, 3.0 * np.arange(1, min(shape) + 1) ** -0.6)
    B, A = rng.standard_normal((out, 6)), rng.standard_normal((6, inn))
    scale = 0.3 * np.linalg.norm(W) / np.linalg.norm(B @ A)  # a LoRA-sized update: ‖ΔW‖_F = 0.3 ‖W‖_F
    Wt = torch.from_numpy(W)
    lora = Factored.from_lora(torch.from_numpy(B), torch.from_numpy(A), scale)
    U, S, Vh = lora.U.double(), lora.S.double(), lora.Vh.double()
    dense = W + scale * B @ A
    U_ref = np.linalg.svd(dense, full_matrices=False)[0][:, :10]
    basis = WeightBasis(Wt, m=30)
    assert basis.G is not None
    got = basis.top_left_of_update(U, S, Vh, 10).numpy()
    assert _sign_free_error(got, U_ref) < 1e-10
    np.testing.assert_allclose(got.T @ got, np.eye(10), atol=1e-12)
    assert _sign_free_error(got, top_left_singular_vectors(torch.from_numpy(dense), 10).numpy()) < 1e-10
    fact = intruder_dimensions(Wt, lora, k=10, base=basis)
    ref = intruder_dimensions(Wt, torch.from_numpy(scale * B @ A), k=10)
    np.testing.assert_allclose(fact.max_cos, ref.max_cos, atol=1e-10)
    assert fact.counts == ref.counts and fact.count == ref.count
    # an update that could cancel much of W (‖ΔW‖_F > ‖W‖_F / 2) takes the dense route: G's rounding,
    # ~u·‖W‖², could be large against W + ΔW's own Gram matrix
    dense_calls = []
    real = singular_bases.top_left_singular_pairs
    monkeypatch.setattr(singular_bases, "top_left_singular_pairs", lambda M, k: dense_calls.append(k) or real(M, k))
    basis.top_left_of_update(U, S, Vh, 10)
    assert dense_calls == []
    Uw, Sw, Vhw = (torch.from_numpy(x) for x in np.linalg.svd(W, full_matrices=False))
    near = basis.top_left_of_update(Uw, Sw * (1 - 1e-6), Vhw, 3)  # W + ΔW = 1e-6·W
    assert dense_calls == [3]
    assert _sign_free_error(near.numpy(), np.linalg.svd(W, full_matrices=False)[0][:, :3]) < 1e-8
    monkeypatch.setattr(singular_bases, "GRAM_KEEP_MAX_P", 10)
    small = WeightBasis(Wt, m=30)
    assert small.G is None and small._tri is None  # nothing p × p kept above the cap
    np.testing.assert_allclose(intruder_dimensions(Wt, lora, k=10, base=small).max_cos, ref.max_cos, atol=1e-10)


def test_weight_basis_decides_cosines_from_the_top_vectors_or_computes_all():
    """max_cosines is the maximum over all p left singular vectors whether or not the top m decide
    it: a vector near the top is decided from them; a spread-out one (an intruder) is not, and the
    basis completes itself."""
    rng = np.random.default_rng(21)
    W, U0, _ = planted(rng, (80, 120), 3.0 * np.arange(1, 81) ** -0.7)
    near = U0[:, :3] + 0.05 * rng.standard_normal((80, 3))
    spread = U0 @ np.ones(80) / np.sqrt(80)  # |cos| = 1/√80 with every singular vector
    for Q in (near / np.linalg.norm(near, axis=0), spread[:, None]):
        ref = np.abs(Q.T @ U0).max(axis=1)
        basis = WeightBasis(torch.from_numpy(W), m=10)
        got = basis.max_cosines(torch.from_numpy(Q)).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-12)
        assert basis.is_complete == (Q.shape[1] == 1)
