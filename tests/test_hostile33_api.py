"""Thirty-third round: the public Python API's arguments (docs/bad_inputs.md, "thirty-third round")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectra import esd, interference, lowrank, metrics, randmat, sketch, subspaces
from spectra.engine import factored_svd
from spectra.singular_bases import WeightBasis, top_left_singular_vectors, top_svd


def _rng(seed: int = 9) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- 1. top_svd, top_left_singular_vectors, WeightBasis ------------------------------------------------
def test_top_svd_refuses_a_complex_matrix():
    rng = _rng()
    Mc = torch.tensor(rng.standard_normal((7, 5)) + 1j * rng.standard_normal((7, 5)))
    for call in (lambda: top_svd(Mc, 2), lambda: top_left_singular_vectors(Mc, 2), lambda: WeightBasis(Mc)):
        with pytest.raises(ValueError, match=r"must be real\. Got dtype torch\.complex128"):
            call()  # was S of the real part only (4.81, 3.72 against the complex matrix's 6.10, 4.20)


def test_top_svd_reads_numpy_half_precision_and_a_whole_float_k():
    M = _rng().standard_normal((8, 5))
    ref = np.linalg.svd(M, compute_uv=False)
    t = top_svd(M, 2.0)  # was AttributeError ('str' object has no attribute 'type'), then a slice TypeError
    np.testing.assert_allclose(t.S.numpy(), ref[:2], rtol=1e-12)
    assert t.energy == pytest.approx(float(np.sum(M**2)), rel=1e-13)
    Mb = torch.tensor(M).bfloat16()
    ref_b = np.linalg.svd(Mb.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(top_svd(Mb, 1).S.numpy(), ref_b[:1], rtol=1e-12)  # was "unsupported ScalarType BFloat16"
    U_ref = np.linalg.svd(Mb.double().numpy())[0][:, :2]  # fp16 holds these bf16 values exactly
    U = top_left_singular_vectors(Mb.half(), 2).numpy()  # was "unsupported ScalarType Half"
    np.testing.assert_allclose(np.abs(np.sum(U * U_ref, axis=0)), 1.0, atol=1e-9)  # the same directions, up to sign
    np.testing.assert_allclose(WeightBasis(M).S.numpy(), ref, rtol=1e-12)  # numpy W: was W.to AttributeError


@pytest.mark.parametrize(("M", "k", "message"), [
    (torch.ones(4, 3, dtype=torch.float64), 2.5, r"^k must be a whole number in \[1, 3\]\. Got 2\.5 instead"),
    (torch.ones(4, 3, dtype=torch.float64), True, r"^k must be a whole number in \[1, 3\]\. Got True instead"),
    (torch.ones(5, dtype=torch.float64), 1, r"^M must be a 2-D \(out, in\) matrix\. Got shape \(5,\) instead"),
    (torch.empty(4, 3, device="meta"), 1, r"^M is on the meta device"),
])
def test_top_svd_names_a_bad_k_or_matrix(M, k, message):
    for call in (top_svd, top_left_singular_vectors):
        with pytest.raises(ValueError, match=message):
            call(M, k)


def test_weight_basis_names_a_bad_m():
    with pytest.raises(ValueError, match=r"^m must be a whole number in"):
        WeightBasis(torch.eye(3, dtype=torch.float64), m=2.5)  # was a float slice count deep inside


# ---- 2. lowrank ------------------------------------------------------------------------------------------
def test_energy_kept_validates_and_sorts_its_spectrum():
    with pytest.raises(ValueError, match=r"^S must hold finite, non-negative singular values\. Got NaN"):
        lowrank.energy_kept(np.array([np.nan, 1.0]), 10.0, 1)  # was 1.0: min(1.0, nan)
    with pytest.raises(ValueError, match=r"^S must hold finite, non-negative singular values\. Got negative"):
        lowrank.energy_kept(np.array([-3.0, 1.0]), 10.0, 1)  # was 0.9
    S = np.array([1.0, 3.0])
    ref = float(np.sort(S)[::-1][0] ** 2 / 10.0)
    assert lowrank.energy_kept(S, 10.0, 1) == pytest.approx(ref, rel=1e-15)  # was 0.1 (the smaller value's share)
    assert lowrank.energy_rank_top(S, 10.0, 0.85) == 1  # its sibling, which sorted already


def test_energy_kept_and_spectrum_total_read_bf16_and_grad_tensors():
    S = torch.tensor([3.0, 1.0])
    assert lowrank.energy_kept(S.bfloat16(), 10.0, 1) == pytest.approx(0.9, rel=1e-15)  # was "unsupported ScalarType"
    assert lowrank.spectrum_total(S.clone().requires_grad_(True)) == float(np.sum(np.array([3.0, 1.0]) ** 2))


def test_split_factors_refuses_negative_values():
    I2 = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^S must hold non-negative singular values\. Got min -1\.0"):
        lowrank.split_factors(I2, torch.tensor([1.0, -1.0], dtype=torch.float64), I2)  # was B·A = diag(1, 0)


def test_factored_svd_names_a_half_precision_dtype():
    rng = _rng()
    with pytest.raises(ValueError, match=r"^dtype must be torch\.float32 or torch\.float64\. Got torch\.float16"):
        factored_svd(rng.standard_normal((5, 2)), rng.standard_normal((2, 4)), dtype=torch.float16)


# ---- 3. esd ------------------------------------------------------------------------------------------------
def test_mp_bulk_fit_needs_every_eigenvalue_and_a_shape():
    W = _rng().standard_normal((300, 100))
    lam = np.linalg.svd(W, compute_uv=False) ** 2
    fit = esd.mp_bulk_fit(lam, (300, 100))
    assert fit is not None and fit.sigma2 == pytest.approx(1.0, abs=0.05)  # unit-variance entries
    with pytest.raises(ValueError, match=r"^evals must hold min\(shape\) = 100 eigenvalues\. Got 10 instead"):
        esd.mp_bulk_fit(np.sort(lam)[-10:], (300, 100))  # was σ² 2.41
    for shape in ((300, 100, 5), (-300, 100)):
        with pytest.raises(ValueError, match=r"^shape must be \(out, in\), two whole numbers >= 0"):
            esd.mp_bulk_fit(lam, shape)  # were 34 spikes, and None
    with pytest.raises(ValueError, match=r"^shape must be \(out, in\), two whole numbers >= 0\. Got \(-300, 100\)"):
        esd.esd_metrics(lam, (-300, 100))  # was "min(shape) = -300 eigenvalues"


def test_power_law_fit_names_a_text_threshold():
    with pytest.raises(ValueError, match=r"^thresh must be a finite number >= 0\. Got '1e-5' instead"):
        esd.power_law_fit(np.arange(1.0, 50.0), thresh="1e-5")


# ---- 4. metrics' scalar helpers -----------------------------------------------------------------------------
def test_signal_rank_needs_the_whole_spectrum():
    n, rng = 200, _rng()
    X = rng.standard_normal((n, n)) + 3 * np.outer(rng.standard_normal(n), rng.standard_normal(n)) / np.sqrt(n)
    S = np.linalg.svd(X, compute_uv=False)
    assert metrics.signal_rank(S, (n, n)) == int(np.sum(2.858 * np.median(S) < S)) == 1  # ω(1) = 2.858 (Gavish & Donoho)
    with pytest.raises(ValueError, match=r"^S holds 64 values, fewer than min\(out, in\) of shape \(200, 200\)"):
        metrics.signal_rank(S[:64], (n, n))  # was 0: the median of the top 64 as the noise level


def test_scalar_helpers_refuse_impossible_norms_and_ranks():
    for args, name in (((1.0, math.nan), "proj_delta"), ((-1.0, 0.5), "delta_fro"), ((math.nan, 0.5), "delta_fro")):
        with pytest.raises(ValueError, match=rf"^{name} must be a finite number >= 0"):
            metrics.amplification_factor(*args)  # were inf, -2.0, nan
    assert metrics.amplification_factor(6.91, 0.32) == pytest.approx(6.91 / 0.32, rel=1e-15)
    with pytest.raises(ValueError, match=r"^r must be in \[1, 4\] \(min\(out, in_\)\)\. Got 10 instead"):
        metrics.random_projection_rms(1.0, 10, 4, 4)  # was 2.5
    with pytest.raises(ValueError, match=r"^w_fro must be a finite number >= 0"):
        metrics.random_projection_rms(-1.0, 2, 4, 4)
    with pytest.raises(ValueError, match=r"^out must be in \[1, "):
        metrics.random_projection_rms(1.0, 1, 0, 4)  # was a ZeroDivisionError
    assert metrics.random_projection_rms(2.0, 3, 4, 9) == pytest.approx(3 * 2.0 / 6.0, rel=1e-15)
    with pytest.raises(ValueError, match=r"^fro must be a norm \(>= 0\)\. Got -1\.0 instead"):
        metrics.relative_norm(-1.0, 2.0)  # was -0.5
    assert metrics.relative_norm(1.0, 2.0) == 0.5 and metrics.relative_norm(1.0, math.nan) is None  # documented null


# ---- 5. approx_energy_ranks -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank_tol": math.nan}, r"^rank_tol must be a finite number in \[0, 1\]\. Got nan"),
    ({"max_fraction": math.nan}, r"^max_fraction must be a finite number in \[0, 1\]\. Got nan"),
    ({"max_fraction": -0.5}, r"^max_fraction must be a finite number in \[0, 1\]"),
])
def test_approx_energy_ranks_names_a_bad_tolerance(kwargs, message):
    M = torch.tensor(_rng().standard_normal((200, 150)))
    with pytest.raises(ValueError, match=message):  # rank_tol=nan stopped refining at once: [54, 400] for rank 297
        sketch.approx_energy_ranks(M, [0.99], generator=torch.Generator().manual_seed(0), **kwargs)


# ---- 6. intruder_dimensions ------------------------------------------------------------------------------------
def test_intruder_epsilons_from_a_generator_are_counted():
    rng = _rng()
    Wb, dW = rng.standard_normal((8, 5)), rng.standard_normal((8, 5))
    res = subspaces.intruder_dimensions(Wb, dW, k=3, epsilons=(e for e in (0.3, 0.5, 0.9)))
    U_base = np.linalg.svd(Wb, full_matrices=False)[0]
    U_tuned = np.linalg.svd(Wb + dW, full_matrices=False)[0][:, :3]
    max_cos = np.abs(U_tuned.T @ U_base).max(axis=1)
    assert res.counts == {e: int(np.sum(max_cos < e)) for e in (0.3, 0.5, 0.9)}  # was {}


# ---- 7. interference.phi_matrix ----------------------------------------------------------------------------------
def test_phi_matrix_names_dense_updates():
    D = _rng().standard_normal((8, 5))
    with pytest.raises(TypeError, match=r"^factors must be Factored thin SVDs .*Got ndarray at 0 instead"):
        interference.phi_matrix([D, D])  # was AttributeError: no attribute 'U'


# ---- 8. randmat ---------------------------------------------------------------------------------------------------
def test_gavish_donoho_omega_names_its_aspect_ratio():
    with pytest.raises(ValueError, match=r"^beta = min\(out, in\) / max\(out, in\) must be a number in \(0, 1\]\. Got -0\.5"):
        randmat.gavish_donoho_omega(-0.5)  # was "math domain error"
    assert randmat.gavish_donoho_omega(1.0) == pytest.approx(0.56 - 0.95 + 1.82 + 1.43, abs=0.02)  # the paper's fit


@pytest.mark.parametrize(("shape", "tau", "message"), [
    ((10.5, 20), 0.9, r"^shape must be \(out, in\), two whole numbers >= 0"),
    ((10, 20), True, r"^tau must be a number in \(0, 1\]\. Got True"),
    ((10, 20), torch.tensor(0.9), r"^tau must be a number in \(0, 1\]\. Got tensor"),
])
def test_random_energy_rank_checks_as_energy_rank(shape, tau, message):
    with pytest.raises(ValueError, match=message):  # were 7, 10 and 7
        randmat.random_energy_rank(shape, tau)


# ---- 9. randomized_svd's documented bound ------------------------------------------------------------------------
def test_randomized_svd_bound_holds_as_documented():
    n, rng = 400, _rng()
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    s = 1 / np.arange(1, n + 1) ** 0.7
    M = torch.tensor((U * s) @ V.T)
    t32 = sketch.randomized_svd(M, 10, generator=torch.Generator().manual_seed(0))
    t64 = sketch.randomized_svd(M, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert np.max((t32.S - s[:10]) / s[:10]) < 5e-7 and np.max((t64.S - s[:10]) / s[:10]) < 1e-14
    doc = " ".join(sketch.TruncatedSVD.__doc__.split())
    assert "S[i] <= σᵢ(M)`` up to the working ``dtype``'s rounding" in doc  # was an unconditional S[i] <= σᵢ(M)


# ---- 10. energy_rank_bounds --------------------------------------------------------------------------------------
def test_energy_rank_bounds_sorts_its_top_values():
    top, total, residual, tau = np.array([1.0, 3.0]), 11.0, 1.0, 0.5
    L = np.cumsum(np.sort(top)[::-1] ** 2)  # Ky Fan: the true E_k lies in [L_k, L_k + residual]
    lo, hi = int(np.argmax(L + residual >= tau * total)) + 1, int(np.argmax(tau * total <= L)) + 1
    r = sketch.energy_rank_bounds(top, total, residual, tau, 3)
    assert (r.lo, r.hi) == (lo, hi) == (1, 1)  # was (2, 2): the ascending values read as the sketch's top


@pytest.mark.parametrize(("args", "message"), [
    ((np.array([np.nan, 1.0]), 11.0, 1.0, 0.5, 3), r"^top must hold finite, non-negative singular values"),
    ((np.array([3.0, -1.0]), 11.0, 1.0, 0.5, 3), r"^top must hold finite, non-negative singular values"),
    ((np.array([3.0, 1.0]), 11.0, -1.0, 0.5, 3), r"^residual must be a finite number >= 0"),
    ((np.array([3.0, 1.0]), 11.0, 1.0, 0.5, 1), r"^p must be in \[2, .*\(min\(out, in\), at least len\(top\)\)"),
    ((np.array([3.0, 1.0]), 5.0, 1.0, 0.5, 3), r"^top's energy Σ top² = 10\.0 exceeds total = 5\.0"),
])
def test_energy_rank_bounds_names_impossible_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        sketch.energy_rank_bounds(*args)


# ---- 11. as_spectrum -----------------------------------------------------------------------------------------
def test_spectra_of_strings_or_bools_are_refused():
    with pytest.raises(ValueError, match=r"^S must hold real numbers \(singular values\)\. Got numpy dtype <U1 instead"):
        metrics.energy_rank(["3", "1"], 0.9)  # was 1
    with pytest.raises(ValueError, match=r"^S must hold real numbers \(singular values\)\. Got numpy dtype bool instead"):
        metrics.stable_rank([True, True, False])  # was 2.0
    assert metrics.stable_rank([3, 1]) == pytest.approx(10 / 9, rel=1e-15)  # integers are numbers


# ---- 12. amplification's generator ---------------------------------------------------------------------------
def test_amplification_names_a_seed_given_as_generator():
    rng = _rng()
    with pytest.raises(TypeError, match=r"^generator must be a torch\.Generator or None .*Got 0 instead"):
        subspaces.amplification(rng.standard_normal((8, 5)), rng.standard_normal((8, 5)), 2, generator=0)
