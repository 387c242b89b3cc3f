"""Twenty-second round, the Python API (docs/bad_inputs.md, "twenty-second round"): subspaces past an
update's resolved rank, devices torch cannot use, an empty batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectra.config import DiffConfig
from spectra.engine import exact_spectra
from spectra.errors import ConfigError
from spectra.linalg import singular_values
from spectra.sketch import randomized_svd
from spectra.subspaces import Factored, amplification, phi, principal_angles, top_subspace


def _rank1_lora(unused_seed: int) -> tuple[np.ndarray, np.ndarray, Factored]:
    """A rank-1 update b·a held as an r = 2 LoRA whose second column of B is random and whose second
    row of A is zero: the update does not depend on that column."""
    rng = np.random.default_rng(0)
    b, a = rng.standard_normal((20, 1)), rng.standard_normal((1, 15))
    c = np.random.default_rng(unused_seed).standard_normal((20, 1))
    return b, a, Factored.from_lora(torch.tensor(np.hstack([b, c])), torch.tensor(np.vstack([a, 0 * a])))


def _amplification_reference(W: np.ndarray, dW: np.ndarray, r: int) -> float:
    """Hu et al.'s factor ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F from a float64 numpy SVD of the dense update."""
    U, _, Vh = np.linalg.svd(dW)
    return float(np.linalg.norm(dW) / np.linalg.norm(U[:, :r].T @ W @ Vh[:r].T))


def test_a_factored_update_is_measured_through_its_resolved_directions_only():
    W = np.random.default_rng(5).standard_normal((20, 15))
    for seed in (1, 2):  # the unused column changed the factor: 6.380 and 8.158 where the update is one
        b, a, F = _rank1_lora(seed)
        want = _amplification_reference(W, b @ a, 1)
        got = amplification(F, torch.tensor(W), 1, generator=torch.Generator().manual_seed(0))
        assert got.factor == pytest.approx(want, rel=1e-10)
        with pytest.raises(ValueError, match=r"r must be in \[1, 1\] \(dW's rank:"):
            amplification(F, torch.tensor(W), 2, generator=torch.Generator().manual_seed(0))
        with pytest.raises(ValueError, match=r"k must be in \[1, 1\] \(M's rank"):
            top_subspace(F, 2)
        # its one direction is the reference's, up to sign
        u = top_subspace(F, 1).numpy()[:, 0]
        assert abs(float(u @ (b[:, 0] / np.linalg.norm(b)))) == pytest.approx(1.0, abs=1e-12)
    # the dense update's numerical rank gives the same rule
    b, a, _ = _rank1_lora(1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 1\] \(M's numerical rank"):
        top_subspace(torch.tensor(b @ a), 2)
    # a full-rank update keeps the plain range
    assert top_subspace(torch.tensor(np.random.default_rng(3).standard_normal((6, 4))), 4).shape == (6, 4)


def test_zero_updates_have_no_subspace_instead_of_an_overlap_of_one():
    g = torch.Generator().manual_seed(0)
    untrained = [Factored.from_lora(torch.zeros(20, 4), torch.randn(4, 15, generator=g)) for _ in range(2)]
    for M in (*untrained, torch.zeros(20, 15)):
        with pytest.raises(ValueError, match=r"^M is zero .*singular subspaces are undefined"):
            top_subspace(M, 1)
    # two rank-1 updates compared at their rank: φ and the angle are the closed form |⟨u, v⟩|²
    rng = np.random.default_rng(4)
    u, v = rng.standard_normal(20), rng.standard_normal(20)
    QA = top_subspace(torch.tensor(np.outer(u, rng.standard_normal(15))), 1)
    QB = top_subspace(torch.tensor(np.outer(v, rng.standard_normal(15))), 1)
    cos = abs(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))
    assert phi(QA, QB, 1, 1) == pytest.approx(cos**2, abs=1e-12)
    assert np.cos(principal_angles(QA, QB))[0] == pytest.approx(cos, abs=1e-12)
    with pytest.raises(ValueError, match=r"k must be in \[1, 1\]"):  # φ at k = 3 was mostly null-space vectors
        top_subspace(torch.tensor(np.outer(u, rng.standard_normal(15))), 3)


@pytest.mark.parametrize("device", ["meta", torch.device("meta"), "mps", "CPU", None, "cuda:01"])
def test_devices_torch_cannot_use_are_one_config_error(device):
    X = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"device must be auto, cpu, cuda or cuda:N"):
        exact_spectra([X], device=device)
    if device is not None:  # None is the matrix's own device there
        with pytest.raises(ConfigError, match=r"device must be auto, cpu, cuda or cuda:N"):
            randomized_svd(X, 3, device=device)


def test_a_torch_device_is_taken_where_a_device_name_is():
    X = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = np.linalg.svd(X.numpy(), compute_uv=False)
    got = exact_spectra([X], device=torch.device("cpu"), precision="float64")
    np.testing.assert_allclose(np.asarray(got.S)[0], want, rtol=1e-10)
    assert DiffConfig(device=torch.device("cpu")).device == "cpu"  # recorded as its name ("must be a string")
    with pytest.raises(ConfigError, match=r"device must be auto"):
        DiffConfig(device=torch.device("meta"))


def test_an_empty_batch_has_an_empty_spectrum():
    for shape, want in (((0, 3, 5), (0, 3)), ((3, 0, 5), (3, 0)), ((0, 5), (0,))):
        got = singular_values(torch.zeros(shape))
        assert got.shape == want and got.dtype == np.float64
    np.testing.assert_allclose(singular_values(torch.eye(3)[None].repeat(2, 1, 1)), np.ones((2, 3)), rtol=1e-12)
