"""Twenty-fourth round, the Python API with hostile arguments (docs/bad_inputs.md, "twenty-fourth round"): a hang on a
NaN iteration cap, complex and non-finite updates measured as if real, a NaN tolerance that switched the float32
certificate's checks off, tensors that require grad."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectra.engine import batch_singular_values, exact_spectra
from spectra.interference import spectrum_and_top, truncate
from spectra.lowrank import dense_triplets, gram_eig, randomized_triplets, rank_levels, refined_triplets
from spectra.sketch import approx_energy_ranks, randomized_svd
from spectra.subspaces import Factored


@pytest.mark.parametrize("kwargs", [dict(tol=1e-30, max_iter=float("nan")), dict(tol=0.0, max_iter=float("inf")),
                                    dict(max_iter=None), dict(tol="1e-3"), dict(tol=float("nan")), dict(dtype=torch.float16),
                                    dict(generator=0)])
def test_randomized_svd_refuses_what_would_hang_or_fail_deep_inside(kwargs):
    """max_iter=nan never ended (nan compares False both ways: no power iteration ran, and the loop never stopped)."""
    with pytest.raises(ValueError, match=[k for k in kwargs if k != "tol" or len(kwargs) == 1][-1]):
        randomized_svd(torch.randn(200, 100), 3, **kwargs)


def test_complex_non_finite_and_batched_inputs_are_refused_by_name():
    """A complex ΔW lost its imaginary part in dense_triplets/refined_triplets/spectrum_and_top (σ₁ 2.40 against the
    true 3.57: the real part's values); Inf gave NaN values, or an empty factorisation read as a zero update."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.complex64, generator=g)
    for f in (lambda d: dense_triplets(d, 2), lambda d: refined_triplets(d, 3, 2), lambda d: randomized_triplets(d, 2),
              lambda d: spectrum_and_top(d, 2), gram_eig):
        with pytest.raises(ValueError, match="delta must be real"):
            f(z)
        inf = torch.eye(4)
        inf[0, 0] = float("inf")
        with pytest.raises(ValueError, match="delta holds NaN or Inf"):
            f(inf)
    for mats in (torch.full((1, 3, 3), float("nan")), torch.tensor([[[float("inf"), 0.0], [0.0, 1.0]]])):
        for backend in ("lapack", "torch"):
            with pytest.raises(ValueError, match=r"mats\[0\] holds NaN or Inf"):
                exact_spectra(mats, device="cpu", backend=backend)
        with pytest.raises(ValueError, match="NaN or Inf"):
            batch_singular_values(mats, device="cpu", backend="torch")
    with pytest.raises(ValueError, match="one non-empty"):
        approx_energy_ranks(torch.randn(2, 200, 100), [0.9])
    with pytest.raises(ValueError, match="must hold numbers"):
        exact_spectra(torch.randn(2, 3, 3) > 0, device="cpu", backend="torch", precision="float32")
    with pytest.raises(ValueError, match="dense tensor"):
        exact_spectra([torch.eye(3).to_sparse()], device="cpu")


@pytest.mark.parametrize("kwargs", [dict(rtol=float("nan")), dict(rtol=float("inf")), dict(rtol=-1.0), dict(rtol="0.1"),
                                    dict(top_k=float("nan")), dict(thresholds=(0.9, float("nan"))), dict(max_batch_bytes=float("nan"))])
def test_exact_spectra_checks_its_certificate_arguments(kwargs):
    """rtol=nan switched the certificate's norm checks off (a matrix failing only those would be 'float32-certified');
    -1 sent every matrix to float64; top_k=nan and a string rtol failed inside numpy or a slice."""
    with pytest.raises(ValueError, match=next(iter(kwargs)).rstrip("s") if "thresholds" not in kwargs else "threshold"):
        exact_spectra(torch.randn(2, 5, 4), device="cpu", **kwargs)


def test_exact_spectra_labels_and_values_of_ordinary_calls_hold():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    ref = np.linalg.svd(M.numpy(), compute_uv=False)
    for backend in ("lapack", "torch"):
        res = exact_spectra(M, device="cpu", backend=backend, precision="float64")
        assert np.allclose(res.S, ref, rtol=1e-12, atol=1e-12) and set(res.precision) == {"float64"}
    assert exact_spectra(torch.zeros(2, 0, 3), device="cpu").precision == ("float64", "float64")  # not 'certified'
    # a batch cap above any memory is no cap (--batch-memory 2^42 MiB failed with a traceback after the run began)
    assert np.allclose(exact_spectra(M, device="cpu", backend="torch", max_batch_bytes=2**84).S, ref, rtol=1e-6)


def test_spectrum_and_top_checks_its_floors_and_k():
    """rel_tol=nan kept no direction (an empty factorisation: a zero update); k=2.5 was cut to 2 without a word."""
    D = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for kwargs in (dict(rel_tol=float("nan")), dict(rel_tol=-1.0), dict(floor=float("nan")), dict(floor=-1.0)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            spectrum_and_top(D, 2, **kwargs)
    with pytest.raises(ValueError, match="k must be"):
        spectrum_and_top(D, 2.5)
    with pytest.raises(ValueError, match="k must be"):
        truncate(Factored(*torch.linalg.svd(D, full_matrices=False)), 2.5)
    S, top = spectrum_and_top(D, 2)
    assert np.allclose(S, np.linalg.svd(D.numpy(), compute_uv=False), rtol=1e-10) and top.S.numel() == 2


def test_tensors_that_require_grad_are_read_detached():
    """dense_triplets returned factors carrying the input's autograd graph; refined_triplets and spectrum_and_top
    failed with "Can't call numpy() on Tensor that requires grad"."""
    D = torch.randn(30, 20, generator=torch.Generator().manual_seed(3), requires_grad=True)
    ref = np.linalg.svd(D.detach().double().numpy(), compute_uv=False)
    t = dense_triplets(D, 3)
    assert not t.B.requires_grad and np.allclose(t.S, ref[:4], rtol=1e-6)
    r = refined_triplets(D, 4, 3)
    assert np.allclose(r.S, ref[:4], rtol=1e-5) and not r.B.requires_grad
    S, _ = spectrum_and_top(D, 2)
    assert np.allclose(S, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        dense_triplets(D, 2.5)
    with pytest.raises(ValueError, match="serving"):
        rank_levels(8, serving="bogus")
