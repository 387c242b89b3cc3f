"""Spectrum metrics against float64 numpy/scipy, planted spectra, closed forms and docs/definitions.md values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from spectra.linalg import singular_values
from spectra.metrics import effective_rank, energy_rank, signal_rank, spectrum_metrics, stable_rank
from spectra.randmat import gavish_donoho_omega, mp_energy_fraction, mp_median, random_energy_rank
from tests.conftest import reference_energy_rank, svd64


# ---- energy rank ------------------------------------------------------------------------------
def test_energy_rank_closed_forms():
    assert energy_rank(np.zeros(5), 0.9) == 0
    assert energy_rank(np.array([1.0, 0, 0]), 0.9) == 1
    # equal spectrum: k = ceil(τ·p)
    for p in (7, 10, 64):
        for tau in (0.5, 0.9, 0.99):
            assert energy_rank(np.ones(p), tau) == math.ceil(tau * p - 1e-12)
    # exactly on the threshold counts (≥): σ² = (3, 1) -> 0.75 of the energy in the first value
    assert energy_rank(np.sqrt([3.0, 1.0]), 0.75) == 1
    with pytest.raises(ValueError, match="tau must be a number in"):
        energy_rank(np.ones(3), 0.0)


@pytest.mark.parametrize("shape", [(64, 64), (50, 130), (300, 120)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.5])
def test_planted_spectrum_recovered(shape, alpha, rng):
    """A matrix built as U diag(s) Vᵀ gives back s, and its energy ranks equal the float64 oracle."""
    p = min(shape)
    s = np.arange(1, p + 1, dtype=np.float64) ** -alpha
    U, _ = np.linalg.qr(rng.standard_normal((shape[0], p)))
    V, _ = np.linalg.qr(rng.standard_normal((shape[1], p)))
    M = torch.from_numpy((U * s) @ V.T)
    for method in ("gram", "svd"):
        S = singular_values(M, method=method)
        np.testing.assert_allclose(S, s, rtol=1e-8, atol=1e-10)
    S = singular_values(M.float())
    for tau in (0.5, 0.9, 0.99):
        ref, clear = reference_energy_rank(s, tau)
        if clear:
            assert energy_rank(S, tau) == ref


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_float64_oracle_on_random_matrices(seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(96, 160, generator=g) * torch.logspace(0, -3, 160)  # decaying column scales
    S_ref = svd64(M)
    S = singular_values(M)  # float32 input, float64 Gram path
    np.testing.assert_allclose(S, S_ref, rtol=1e-6, atol=1e-9 * S_ref[0])
    m = spectrum_metrics(S, (96, 160))
    assert m.fro_norm == pytest.approx(np.linalg.norm(M.double().numpy()), rel=1e-12)
    assert m.spectral_norm == pytest.approx(S_ref[0], rel=1e-9)
    assert m.nuclear_norm == pytest.approx(S_ref.sum(), rel=1e-8)
    assert m.stable_rank == pytest.approx((S_ref**2).sum() / S_ref[0] ** 2, rel=1e-9)
    q = S_ref / S_ref.sum()
    assert m.effective_rank == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-8)
    for tau in (0.5, 0.9, 0.99):
        ref, clear = reference_energy_rank(S_ref, tau)
        if clear:
            assert m.energy_rank[tau] == ref
            assert m.energy_rank_frac[tau] == ref / 96


def test_gram_float32_keeps_energy_ranks_and_svd_method_agrees():
    g = torch.Generator().manual_seed(7)
    M = torch.randn(200, 500, generator=g) @ torch.diag(torch.linspace(1, 0.01, 500))
    S_ref = svd64(M)
    for method, dtype, rtol in (("gram", torch.float32, 1e-3), ("svd", torch.float32, 1e-4), ("svd", torch.float64, 1e-10)):
        S = singular_values(M, method=method, dtype=dtype)
        np.testing.assert_allclose(S[:50], S_ref[:50], rtol=rtol)
        for tau in (0.5, 0.9, 0.99):
            ref, clear = reference_energy_rank(S_ref, tau)
            if clear:
                assert energy_rank(S, tau) == ref, (method, dtype, tau)


def test_batched_equals_unbatched():
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(4, 40, 70, generator=g)
    S = singular_values(batch)
    assert S.shape == (4, 40)
    for i in range(4):
        np.testing.assert_allclose(S[i], singular_values(batch[i]), rtol=1e-12)


def test_stable_and_effective_rank_closed_forms():
    n = 37
    S = np.ones(n)  # identity
    assert effective_rank(S) == pytest.approx(n, rel=1e-12)
    assert stable_rank(S) == pytest.approx(n, rel=1e-12)
    rank1 = singular_values(torch.outer(torch.arange(1.0, 6.0), torch.arange(1.0, 9.0)).double())
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-6)
    assert stable_rank(rank1) == pytest.approx(1.0, abs=1e-12)
    assert effective_rank(np.zeros(4)) == 0.0 and stable_rank(np.zeros(4)) == 0.0


def test_effective_rank_of_low_rank_matrix_is_not_inflated_by_the_gram_route():
    """σ from a float64 Gram must keep the zero tail at ~0: a rank-8 1024×1024 matrix has eff. rank ≤ 8."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(1024, 8, generator=g) @ torch.randn(8, 1024, generator=g)
    S = singular_values(M)
    ref = svd64(M)
    assert effective_rank(S) == pytest.approx(effective_rank(ref), rel=1e-4)
    assert effective_rank(S) <= 8.0


# ---- random-matrix baselines -------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,expected_rank,expected_frac",
    [((4096, 4096), 2088, 0.510), ((4096, 11008), 2917, 0.712), ((1024, 1024), 523, 0.511)],
)
def test_random_energy_rank_matches_spec_reference(shape, expected_rank, expected_frac):
    p = min(shape)
    k = random_energy_rank(shape, 0.9)
    assert abs(k - expected_rank) <= max(2, 0.001 * p)
    assert mp_energy_fraction(p / max(shape), 0.9) == pytest.approx(expected_frac, abs=0.0015)


@pytest.mark.parametrize("shape", [(256, 256), (256, 704), (512, 128)])
def test_random_energy_rank_matches_seeded_monte_carlo(shape):
    g = torch.Generator().manual_seed(11)
    p = min(shape)
    for _trial in range(2):
        S = singular_values(torch.randn(*shape, generator=g))
        for tau in (0.5, 0.9, 0.99):
            assert abs(energy_rank(S, tau) - random_energy_rank(shape, tau)) <= max(3, 0.01 * p)


def test_gaussian_1024_square_spec_reference_values_measured():
    """docs/definitions.md's seeded Gaussian 1024×1024 row: energy_rank[0.9] ≈ 523, stable rank ≈ 256."""
    g = torch.Generator().manual_seed(0)
    S = singular_values(torch.randn(1024, 1024, generator=g))
    assert abs(energy_rank(S, 0.9) - 523) <= 4
    assert stable_rank(S) == pytest.approx(256, rel=0.05)


def test_gavish_donoho_omega_and_mp_median():
    assert gavish_donoho_omega(1.0) == pytest.approx(2.858, abs=2e-3)  # Gavish & Donoho 2014, Table
    for beta in (0.1, 0.25, 0.5, 0.75, 1.0):
        approx = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        assert gavish_donoho_omega(beta) == pytest.approx(approx, abs=0.02)
    # MP median checked against a sampled Wishart matrix's eigenvalues
    rng = np.random.default_rng(5)
    X = rng.standard_normal((400, 1600))
    ev = scipy.linalg.eigvalsh(X @ X.T / 1600)
    assert np.median(ev) == pytest.approx(mp_median(0.25), rel=0.02)


def test_signal_rank_finds_planted_rank_in_noise():
    rng = np.random.default_rng(2)
    m, n, r = 300, 500, 6
    signal = (rng.standard_normal((m, r)) * 8) @ rng.standard_normal((r, n)) / np.sqrt(n) * np.sqrt(m)
    noise = rng.standard_normal((m, n))
    S = svd64(signal + noise)
    assert signal_rank(S, (m, n)) == r
    assert signal_rank(svd64(noise), (m, n)) == 0


def test_resolved_above_counts_values_over_the_floor_only_when_one_reaches_it():
    from spectra.metrics import resolved_above

    S = [4.0, 2.0, 1e-7, None, 3e-9]
    assert resolved_above(S, 1e-8) == 3  # 4, 2 and 1e-7 stand above; None skipped
    assert resolved_above(S, 1e-7) == 2  # a value equal to the floor is not resolved
    assert resolved_above([4.0, 2.0], 1e-8) is None  # all above: those beyond the list unknown
    for floor in (None, 0.0, -1.0, float("nan")):
        assert resolved_above(S, floor) is None
    assert resolved_above(np.array([1.0, 0.0]), 0.5) == 1
