"""The interference measures (spectra.interference) against float64 brute force and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from spectra.interference import (
    accumulation,
    captured_matrix,
    cosine_matrix,
    flat_inner,
    gram_matrix,
    knots_basis,
    phi_matrix,
    singular_task_interference,
    spectrum_and_top,
    sum_factored,
    truncate,
    tsv_pair_matrix,
)
from spectra.subspaces import Factored


def fac(M: np.ndarray, k: int | None = None) -> Factored:
    """Top-k thin SVD by numpy (the independent oracle), as a Factored."""
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    k = len(S) if k is None else k
    return Factored(torch.from_numpy(U[:, :k].copy()), torch.from_numpy(S[:k].copy()), torch.from_numpy(Vh[:k].copy()))


def dense(f: Factored) -> np.ndarray:
    return (f.U.numpy() * f.S.numpy()) @ f.Vh.numpy()


def low_rank(rng, out, inn, r, scale=1.0):
    return scale * rng.standard_normal((out, r)) @ rng.standard_normal((r, inn))


# ---- reference implementations (float64 numpy, written from the papers' definitions) -----------------
def tsv_reference(mats: list[np.ndarray], k: int, rel_floor: float = 0.0) -> tuple[float, np.ndarray]:
    """Gargiulo et al. 2025: U = [U_1 … U_n] side by side, V likewise, Σ = blockdiag; entrywise ℓ1.
    Singular values at or below ``rel_floor · σ₁`` are left out."""
    Us, Ss, Vs = [], [], []
    for M in mats:
        U, S, Vh = np.linalg.svd(M, full_matrices=False)
        keep = S[:k] > rel_floor * S[0]
        Us.append(U[:, :k][:, keep])
        Ss.append(np.diag(S[:k][keep]))
        Vs.append(Vh[:k][keep].T)
    U, V = np.hstack(Us), np.hstack(Vs)
    Sigma = scipy.linalg.block_diag(*Ss)
    M = (U.T @ U - np.eye(U.shape[1])) @ Sigma @ (V.T @ V - np.eye(V.shape[1]))
    return float(np.abs(M).sum()), M


def knots_reference(mats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stoica et al. 2025: SVD of the concatenation along the input axis; CKA of Z_t = UᵀΔW_t."""
    C = np.hstack(mats)
    U, S, _ = np.linalg.svd(C, full_matrices=False)
    R = int(np.sum(1e-10 * S[0] < S))
    U = U[:, :R]
    Z = [U.T @ M for M in mats]
    n = len(mats)
    A = np.array([[np.linalg.norm(Z[s] @ Z[t].T) ** 2 / (np.linalg.norm(Z[s] @ Z[s].T) * np.linalg.norm(Z[t] @ Z[t].T))
                   for t in range(n)] for s in range(n)])
    return S[:R], A


# ---- pairs ----------------------------------------------------------------------------------------------
def test_flat_inner_is_exact_for_every_form(rng):
    A, B = low_rank(rng, 9, 7, 3), rng.standard_normal((9, 7))
    ref = float(np.sum(A * B))
    for a in (torch.from_numpy(A), fac(A)):
        for b in (torch.from_numpy(B), fac(B)):
            assert flat_inner(a, b) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_cosine_known_answers(rng):
    A = low_rank(rng, 6, 5, 2)
    B = np.zeros((6, 5))
    B[0, 0] = 1.0  # not orthogonal to A in general; build an orthogonal one by Gram–Schmidt on the flat vectors
    b = rng.standard_normal(30)
    a = A.reshape(-1)
    b -= a * (a @ b) / (a @ a)
    B = b.reshape(6, 5)
    C = cosine_matrix([torch.from_numpy(A), fac(2.5 * A), torch.from_numpy(B), torch.from_numpy(-A), torch.zeros(6, 5)])
    assert C[0, 1] == pytest.approx(1.0, abs=1e-12) and C[0, 3] == pytest.approx(-1.0, abs=1e-12)
    assert C[0, 2] == pytest.approx(0.0, abs=1e-12) and C[1, 2] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(C[4]).all() and np.isnan(C[:, 4]).all()  # a zero update has no cosine, not 0
    G = gram_matrix([torch.from_numpy(A), torch.from_numpy(B)])
    assert G[0, 0] == pytest.approx(np.sum(A * A)) and G[0, 1] == pytest.approx(0.0, abs=1e-10)


def test_phi_and_captured_against_brute_force(rng):
    mats = [low_rank(rng, 12, 10, r) for r in (2, 3, 4)]
    k = 3
    fs = [fac(M, k) for M in mats]
    P = phi_matrix(fs, "right")
    C = captured_matrix(fs, [torch.from_numpy(M) for M in mats])
    for s in range(3):
        for t in range(3):
            Qs = np.linalg.svd(mats[s])[2][: min(k, [2, 3, 4][s])].T
            Qt = np.linalg.svd(mats[t])[2][: min(k, [2, 3, 4][t])].T
            assert P[s, t] == pytest.approx(np.linalg.norm(Qs.T @ Qt) ** 2 / min(Qs.shape[1], Qt.shape[1]), abs=1e-10)
            Us, _, Vhs = np.linalg.svd(mats[s])
            ks = min(k, [2, 3, 4][s])
            ref = np.linalg.norm(Us[:, :ks].T @ mats[t] @ Vhs[:ks].T) ** 2 / np.linalg.norm(mats[t]) ** 2
            assert C[s, t] == pytest.approx(ref, abs=1e-10)
    # a factored measured update (exact for a low-rank update) gives the same numbers as the dense one
    assert np.allclose(captured_matrix(fs, [fac(M) for M in mats]), C, atol=1e-10)
    assert np.allclose(np.diag(P), 1.0)


def test_phi_orthogonal_and_identical():
    e = np.eye(8)
    A = 3 * np.outer(e[0], e[0]) + np.outer(e[1], e[1])
    B = 2 * np.outer(e[2], e[4]) + np.outer(e[3], e[5])
    P = phi_matrix([fac(A, 2), fac(B, 2), fac(A, 2)], "left")
    assert P[0, 1] == pytest.approx(0.0, abs=1e-15) and P[0, 2] == pytest.approx(1.0)


# ---- TSV ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(2, 3), (3, 2), (4, 4)])
def test_tsv_matches_the_papers_definition(rng, n, k):
    mats = [low_rank(rng, 10, 8, 4) for _ in range(n)]
    ref, _ = tsv_reference(mats, k)
    res = singular_task_interference([fac(A, k) for A in mats])
    assert res.sti == pytest.approx(ref, rel=1e-10)
    S_total = sum(np.linalg.svd(A, compute_uv=False)[:k].sum() for A in mats)
    assert res.relative == pytest.approx(ref / ((n - 1) ** 2 * S_total), rel=1e-10)
    assert 0.0 <= res.relative_fro <= 1.0
    assert res.ranks == [k] * n


def test_tsv_known_answers():
    e = np.eye(6)
    f1 = fac(2 * np.outer(e[0], e[0]), 1)
    # orthogonal tasks (disjoint left and right spaces): no interference
    f2 = fac(np.outer(e[1], e[1]) + 5 * np.outer(e[2], e[3]), 2)
    assert singular_task_interference([f1, f2]).sti == 0.0
    # n identical updates: STI = n (n−1)² Σσ, relative 1 and bounded form 1
    A = 4 * np.outer(e[0], e[1]) + np.outer(e[2], e[3])
    for n in (2, 3, 4):
        res = singular_task_interference([fac(A, 2)] * n)
        assert res.sti == pytest.approx(n * (n - 1) ** 2 * 5.0)
        assert res.relative == pytest.approx(1.0) and res.relative_fro == pytest.approx(1.0)
    # a hand-computed pair: ΔW_1 = 2 e1 e1ᵀ, ΔW_2 = 3 u vᵀ with u = (e1 + e2)/√2, v = (e1 + e3)/√2.
    # U_1ᵀU_2 = V_1ᵀV_2 = 1/√2, so M = blockdiag(½·3, ½·2): STI = 2.5, relative 2.5 / 5,
    # bounded sqrt(1.5² + 1²) / sqrt(3² + 2²) = 0.5
    u, v = (e[0] + e[1]) / math.sqrt(2), (e[0] + e[2]) / math.sqrt(2)
    res = singular_task_interference([f1, fac(3 * np.outer(u, v), 1)])
    assert res.sti == pytest.approx(2.5) and res.relative == pytest.approx(0.5) and res.relative_fro == pytest.approx(0.5)


def test_tsv_is_blind_to_singular_vector_signs(rng):
    A, B = low_rank(rng, 7, 6, 3), low_rank(rng, 7, 6, 3)
    fa, fb = fac(A, 3), fac(B, 3)
    sign = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    flipped = Factored(fa.U * sign, fa.S, fa.Vh * sign[:, None])  # the same update
    assert np.allclose(dense(flipped), A)
    a, b = singular_task_interference([fa, fb]), singular_task_interference([flipped, fb])
    assert a.sti == pytest.approx(b.sti, rel=1e-12) and a.relative_fro == pytest.approx(b.relative_fro, rel=1e-12)


def test_tsv_bounded_form_stays_in_range(rng):
    for _ in range(20):
        n = int(rng.integers(2, 5))
        base = low_rank(rng, 8, 8, 2)
        mats = [base + rng.uniform(0, 1) * low_rank(rng, 8, 8, 3) for _ in range(n)]  # partly shared directions
        res = singular_task_interference([fac(M, 4) for M in mats])
        assert 0.0 <= res.relative_fro <= 1.0 + 1e-12
    R = tsv_pair_matrix([fac(M, 4) for M in mats] + [Factored(torch.zeros(8, 0, dtype=torch.float64),
                                                                torch.zeros(0, dtype=torch.float64),
                                                                torch.zeros(0, 8, dtype=torch.float64))])
    assert np.isnan(R[-1]).all() and np.all(np.diag(R)[:-1] == 0)


# ---- KnOTS ----------------------------------------------------------------------------------------------
def test_knots_against_brute_force(rng):
    mats = [low_rank(rng, 9, 7, r) for r in (2, 3, 2)]
    S_ref, A_ref = knots_reference(mats)
    res = knots_basis([fac(M) for M in mats], thresholds=(0.9,))
    assert res.rank == len(S_ref) and np.allclose(res.S, S_ref, rtol=1e-10)
    assert np.allclose(res.alignment, A_ref, atol=1e-10)
    # the basis-free form of the same number: ⟨G_s, G_t⟩ / (‖G_s‖‖G_t‖) with G = ΔWᵀΔW
    G = [M.T @ M for M in mats]
    for s in range(3):
        for t in range(3):
            assert res.alignment[s, t] == pytest.approx(np.sum(G[s] * G[t]) / np.linalg.norm(G[s]) / np.linalg.norm(G[t]), abs=1e-10)
    e = np.cumsum(S_ref**2) / np.sum(S_ref**2)
    assert res.energy_rank["0.9"] == int(np.searchsorted(e, 0.9)) + 1


def test_knots_known_answers():
    e = np.eye(6)
    A = 2 * np.outer(e[0], e[0]) + np.outer(e[1], e[1])
    B = 2 * np.outer(e[2], e[2]) + np.outer(e[3], e[3])  # orthogonal, with the same spectrum: C has repeated σ
    res = knots_basis([fac(A), fac(B), fac(3 * A)])
    assert res.alignment[0, 1] == pytest.approx(0.0, abs=1e-15)  # well defined despite the ties
    assert res.alignment[0, 2] == pytest.approx(1.0)
    assert res.rank == 4 and res.task_energy_rank["0.9"] == 2 + 2 + 2


# ---- the summed update ------------------------------------------------------------------------------------
def test_sum_spectrum_and_accumulation(rng):
    mats = [low_rank(rng, 8, 11, r) for r in (1, 2, 3)]
    f = sum_factored([fac(M) for M in mats])
    S_ref = np.linalg.svd(sum(mats), compute_uv=False)
    assert np.allclose(f.S.numpy(), S_ref[: f.S.numel()], rtol=1e-10)
    assert np.allclose(dense(f), sum(mats), atol=1e-10)
    acc = accumulation(f.S.numpy(), [np.linalg.svd(M, compute_uv=False) for M in mats], thresholds=(0.9,))
    tops = [np.linalg.svd(M, compute_uv=False)[0] for M in mats]
    assert acc.spectral_over_max == pytest.approx(S_ref[0] / max(tops))
    assert acc.spectral_ratio == pytest.approx(S_ref[0] / sum(tops))
    assert acc.fro_sq_ratio == pytest.approx(np.sum(S_ref**2) / sum(np.sum(M**2) for M in mats))
    assert acc.nuclear_ratio == pytest.approx(S_ref.sum() / sum(np.linalg.svd(M, compute_uv=False).sum() for M in mats))


def test_accumulation_known_answers():
    e = np.eye(5)
    A = 3 * np.outer(e[0], e[1]) + np.outer(e[2], e[3])
    B = 3 * np.outer(e[1], e[0]) + np.outer(e[3], e[4])  # orthogonal to A on both sides
    S = lambda M: np.linalg.svd(M, compute_uv=False)
    same = accumulation(S(3 * A), [S(A)] * 3)
    assert (same.spectral_over_max, same.fro_sq_ratio, same.nuclear_ratio) == pytest.approx((3.0, 3.0, 1.0))
    apart = accumulation(S(A + B), [S(A), S(B)])
    assert (apart.spectral_over_max, apart.fro_sq_ratio, apart.nuclear_ratio) == pytest.approx((1.0, 1.0, 1.0))
    cancel = accumulation(S(A - A), [S(A), S(-A)])
    assert cancel.fro_sq_ratio == 0.0 and cancel.spectral_over_max == 0.0 and cancel.nuclear_ratio == 0.0
    overlap = accumulation(S(np.outer(e[0], e[1]) + np.outer(e[0], e[2])), [S(np.outer(e[0], e[1])), S(np.outer(e[0], e[2]))])
    assert overlap.nuclear_ratio == pytest.approx(1 / math.sqrt(2))  # one shared side: nothing cancels, yet below 1
    nothing = accumulation(np.zeros(3), [np.zeros(3), np.zeros(3)])
    assert nothing.fro_sq_ratio is None and nothing.spectral_over_max is None  # undefined, not a number


# ---- the decomposition behind full updates ------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (9, 9)])
def test_spectrum_and_top_against_numpy(rng, shape):
    M = low_rank(rng, *shape, 4) + 1e-3 * rng.standard_normal(shape)
    S, top = spectrum_and_top(torch.from_numpy(M), 3)
    U, S_ref, Vh = np.linalg.svd(M, full_matrices=False)
    assert np.allclose(S, S_ref, rtol=0, atol=1e-7 * S_ref[0])  # the Gram route's stated precision
    assert np.allclose(dense(top), (U[:, :3] * S_ref[:3]) @ Vh[:3], atol=1e-9)  # the rank-3 truncation, signs paired
    assert np.allclose(top.U.T.numpy() @ top.U.numpy(), np.eye(3), atol=1e-10)
    zero_S, zero_top = spectrum_and_top(torch.zeros(4, 6), 2)
    assert not zero_S.any() and zero_top.S.numel() == 0
    assert truncate(fac(M), 2).S.numel() == 2
