"""The engine's paths: batching and its allocation-failure fallback, randomized SVD within its
reported bounds, approximate energy ranks inside their guaranteed bounds, and the factored SVD."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import spectra
from spectra.config import DiffConfig
from spectra.engine import batch_singular_values, factored_svd
from spectra.metrics import energy_rank
from spectra.sketch import approx_energy_ranks, energy_rank_bounds, randomized_svd, truncated_singular_values
from tests.conftest import svd64


def planted(shape, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(shape[0], len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], len(s), generator=g, dtype=torch.float64))
    return (U * torch.as_tensor(s, dtype=torch.float64)) @ V.T


def test_batched_equals_unbatched_and_oom_fallback_path():
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(7, 48, 80, generator=g)
    one_by_one = np.stack([batch_singular_values(mats[i : i + 1], device="cpu")[0] for i in range(7)])
    whole = batch_singular_values(mats, device="cpu")
    np.testing.assert_allclose(whole, one_by_one, rtol=1e-12)
    # the torch backend (the CUDA path, here on the CPU): a cap below one matrix's working memory
    # forces the split-and-retry path down to single matrices, a larger one halves the chunks
    capped = batch_singular_values(mats, device="cpu", backend="torch", max_batch_bytes=10**9, hard_limit_bytes=1)
    np.testing.assert_allclose(capped, one_by_one, rtol=1e-12)
    halved = batch_singular_values(mats, device="cpu", backend="torch", max_batch_bytes=10**9,
                                   hard_limit_bytes=3 * 48 * 80 * 12 + 3 * 4 * 48 * 48 * 8)
    np.testing.assert_allclose(halved, one_by_one, rtol=1e-12)
    np.testing.assert_allclose(whole[3], svd64(mats[3]), rtol=1e-6)


def test_diff_batched_equals_unbatched(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(40, 24, generator=g) for i in range(5)}
    base.update({f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(24, 24, generator=g) for i in range(5)})
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    args = (tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    serial = spectra.diff(*args, config=DiffConfig(max_batch=1, prefetch=0))
    batched = spectra.diff(*args, config=DiffConfig(max_batch=4, prefetch=3))
    assert [m.name for m in serial.modules] == [m.name for m in batched.modules]
    assert [m.layer for m in batched.modules] == sorted(m.layer for m in batched.modules)  # layer order kept
    for a, b in zip(serial.modules, batched.modules):
        np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-12)
        assert a.energy_rank == b.energy_rank


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_randomized_svd_within_reported_bound(alpha):
    shape = (400, 600)
    s = np.arange(1, 401, dtype=np.float64) ** -alpha
    M = planted(shape, s).float()
    res = randomized_svd(M, 20, n_iter=4, generator=torch.Generator().manual_seed(0))
    assert not res.exact and res.S.shape == (20,)
    err = np.abs(res.S - s[:20])
    assert np.all(err <= res.residual * (1 + 1e-6) + 1e-6 * s[0])  # the reported bound holds
    assert np.all(s[:20] * (1 + 1e-5) >= res.S)  # Ritz values do not exceed the true ones (to fp32)
    # subspaces: top singular vectors recovered up to sign
    U, S, Vh = torch.linalg.svd(M.double())
    overlap = torch.abs((res.U.double().T @ U[:, :20]).diagonal())
    assert float(overlap[:10].min()) > 0.999


def test_truncated_meets_tolerance_and_falls_back_to_exact_when_k_near_p():
    s = np.arange(1, 301, dtype=np.float64) ** -0.7
    M = planted((300, 500), s).float()
    res = truncated_singular_values(M, 64, tol=1e-3, generator=torch.Generator().manual_seed(1))
    assert np.all(res.rel_error <= 1e-3) or res.exact
    np.testing.assert_allclose(res.S, s[:64], rtol=2e-3)
    wide = randomized_svd(M, 140)
    assert wide.exact and np.allclose(wide.S, s[:140], rtol=1e-5)


def test_randomized_batched():
    s = 3 * 0.85 ** np.arange(90)
    mats = torch.stack([planted((120, 90), s, seed=i) for i in range(3)]).float()
    res = randomized_svd(mats, 5, generator=torch.Generator().manual_seed(2))
    assert res.S.shape == (3, 5) and res.U.shape == (3, 120, 5) and res.Vh.shape == (3, 5, 90)
    np.testing.assert_allclose(res.S, np.tile(s[:5], (3, 1)), rtol=1e-4)
    for i in range(3):
        single = randomized_svd(mats[i], 5, generator=torch.Generator().manual_seed(2))
        np.testing.assert_allclose(single.S, res.S[i], rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.3, 0.8, 1.5])
def test_approx_energy_ranks_inside_bounds_on_planted_spectra(alpha):
    p = 512
    s = np.arange(1, p + 1, dtype=np.float64) ** -alpha
    M = planted((p, 768), s).float()
    approx = approx_energy_ranks(M, (0.5, 0.9, 0.99), rank_tol=0.02, start=32, generator=torch.Generator().manual_seed(0))
    for tau, r in approx.ranks.items():
        exact = energy_rank(s, tau)
        assert r.lo <= exact <= r.hi, (tau, r, exact)
        assert r.lo <= r.estimate <= r.hi
    assert approx.fro_norm == pytest.approx(np.sqrt((s**2).sum()), rel=1e-5)


def test_energy_rank_bounds_are_tight_with_the_full_spectrum():
    s = np.array([5.0, 3, 2, 1, 0.5])
    total = float((s**2).sum())
    r = energy_rank_bounds(s, total, 0.0, 0.9, 5)
    assert r.lo == r.hi == energy_rank(s, 0.9) and r.exact
    r = energy_rank_bounds(s[:2], total, float((s[2:] ** 2).sum()), 0.9, 5)  # sketch of 2: rank 3 lies in [lo, hi]
    assert r.lo <= 3 <= r.hi


def test_diff_approx_mode_bounds_hold(tmp_path):
    from safetensors.torch import save_file

    s = np.arange(1, 257, dtype=np.float64) ** -0.6
    base = {"model.layers.0.mlp.up_proj.weight": torch.zeros(256, 400)}
    tuned = {"model.layers.0.mlp.up_proj.weight": planted((256, 400), s).float()}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    (m,) = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(approx=True)).modules
    # this slowly decaying spectrum grows the sketch to p/2, where the whole spectrum is computed instead: exact
    assert m.method == "gram/float64" and m.energy_rank_bounds is None and "computed exactly" in m.note
    for key, rank in m.energy_rank.items():
        assert rank == energy_rank(s, float(key))
    (e,) = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(approx_above=1000)).modules
    assert e.energy_rank_bounds is None and e.method == "gram/float64"
    # above the threshold (p = 256 > 128) the approximate mode is used without --approx, with bounds (a spectrum
    # that decays fast enough for a narrow sketch to bound its ranks)
    fast = 0.85 ** np.arange(256)
    save_file({"model.layers.0.mlp.up_proj.weight": planted((256, 400), fast).float()}, str(tmp_path / "c.safetensors"))
    (a,) = spectra.diff(tmp_path / "a.safetensors", tmp_path / "c.safetensors", config=DiffConfig(approx_above=128)).modules
    assert a.method.startswith("approx/") and a.energy_rank_bounds is not None and a.effective_rank is None
    for key, (lo, hi) in a.energy_rank_bounds.items():
        assert lo <= energy_rank(fast, float(key)) <= hi
        assert lo <= a.energy_rank[key] <= hi
    assert DiffConfig().approx_above == 16384  # the documented default: every matrix up to 405B stays exact


@pytest.mark.parametrize("scale", [1.0, 2.0, 16 / np.sqrt(8)])
def test_factored_svd_equals_dense_float64(scale):
    g = torch.Generator().manual_seed(3)
    B = torch.randn(96, 8, generator=g)
    A = torch.randn(8, 160, generator=g)
    U, S, Vh = factored_svd(B, A, scale)
    dense = scale * (B.double() @ A.double())
    U_ref, S_ref, Vh_ref = np.linalg.svd(dense.numpy(), full_matrices=False)
    np.testing.assert_allclose(S.numpy(), S_ref[:8], rtol=1e-10)
    np.testing.assert_allclose((U * S) @ Vh, dense.numpy(), atol=1e-10 * S_ref[0])
    # subspaces equal, sign-free: principal angles between spans are ~0
    assert np.max(scipy.linalg.subspace_angles(U.numpy(), U_ref[:, :8])) < 1e-7
    assert np.max(scipy.linalg.subspace_angles(Vh.T.numpy(), Vh_ref[:8].T)) < 1e-7


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_every_path_on_device_matches_float64(device, tmp_path):
    """Same functions, ``device`` argument: exact, batched, randomized, approximate, factored and
    the whole diff agree with the float64 CPU reference on this device."""
    from safetensors.torch import save_file

    s = np.arange(1, 201, dtype=np.float64) ** -0.8
    M = planted((200, 320), s).float()
    exact = batch_singular_values(torch.stack([M, M]).to(device), device=device)
    np.testing.assert_allclose(exact[1], s, rtol=1e-5, atol=1e-7)
    gen = torch.Generator(device="cpu").manual_seed(0)
    top = randomized_svd(M.to(device), 10, generator=gen, device=device)
    assert top.U.device.type == device
    np.testing.assert_allclose(top.S, s[:10], rtol=1e-4)
    approx = approx_energy_ranks(M.to(device), (0.9,), generator=gen, device=device)
    assert approx.ranks[0.9].lo <= energy_rank(s, 0.9) <= approx.ranks[0.9].hi
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(50, 4, generator=g), torch.randn(4, 70, generator=g)
    _, S, _ = factored_svd(B.to(device), A.to(device), 2.0)
    np.testing.assert_allclose(S.cpu().numpy(), 2.0 * svd64(B.double() @ A.double())[:4], rtol=1e-10)
    save_file({"layers.0.mlp.up_proj.weight": torch.zeros(200, 320)}, str(tmp_path / "a.safetensors"))
    save_file({"layers.0.mlp.up_proj.weight": M}, str(tmp_path / "b.safetensors"))
    (m,) = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(device=device)).modules
    np.testing.assert_allclose(m.singular_values, s[:64], rtol=1e-5)


@pytest.mark.parametrize("shape", [(30, 70), (70, 30)])
@pytest.mark.parametrize("batched", [False, True])
def test_blocked_gram_equals_full_product(shape, batched):
    from spectra.linalg import fro_norm, gram

    g = torch.Generator().manual_seed(9)
    M = torch.randn(*((3,) if batched else ()), *shape, generator=g)
    M64 = M.double()
    ref = M64 @ M64.mT if shape[0] <= shape[1] else M64.mT @ M64
    for block_bytes in (1, 8 * 30 * 7, 1 << 30):  # one column per block, a few columns, everything
        torch.testing.assert_close(gram(M, block_bytes=block_bytes), ref, rtol=1e-13, atol=1e-12)
    assert fro_norm(M, block=17) == pytest.approx(float(torch.linalg.norm(M64)), rel=1e-14)
