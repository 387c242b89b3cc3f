"""Certified float32 spectra (spectra.linalg.certify_float32, spectra.engine.exact_spectra): every
integer metric equals the float64 one, every float metric is within rtol, and a matrix whose cumulative
energy sits close to τ goes back to float64. Also: the CPU backend's parallel threads equal the serial
run, the LAPACK kernels equal float64 numpy, and the torch (CUDA) code path runs on the CPU."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from spectra import engine, linalg
from spectra.engine import Spectra, batch_budget, exact_spectra
from spectra.linalg import certify_float32, eigvalsh_upper, gram_upper, trace_and_fro
from spectra.metrics import EIG_BACKWARD_C0, EPS32, energy_rank, float32_error_bound, spectrum_metrics
from tests.conftest import svd64

THRESHOLDS = (0.5, 0.9, 0.99)
FLOATS = ("fro_norm", "spectral_norm", "nuclear_norm", "stable_rank", "effective_rank")


def planted(shape, s, seed=0) -> torch.Tensor:
    """float32 ``U diag(s) Vᵀ`` with random orthonormal U, V (float64 before the cast)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(shape[0], len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], len(s), generator=g, dtype=torch.float64))
    return ((U * torch.as_tensor(np.ascontiguousarray(s), dtype=torch.float64)) @ V.T).float()


def assert_matches_float64(M: torch.Tensor, res_S: np.ndarray, label: str, thresholds, rtol: float, top_k: int,
                           backend: str = "lapack") -> None:
    """The metrics of ``res_S`` against the float64 path's (same backend), and the float64 path's energy
    ranks against numpy's float64 SVD of the same float32 input (the independent oracle)."""
    ref = exact_spectra([M], precision="float64", device="cpu", backend=backend).S[0]
    got = spectrum_metrics(res_S, tuple(M.shape), thresholds)
    want = spectrum_metrics(ref, tuple(M.shape), thresholds)
    assert want.energy_rank == spectrum_metrics(svd64(M), tuple(M.shape), thresholds).energy_rank
    assert got.energy_rank == want.energy_rank, (label, got.energy_rank, want.energy_rank)
    assert got.signal_rank == want.signal_rank, label
    # a float64 recompute may differ from the float64 path in rounding (another batch, another Gram
    # product): the Gram route keeps values to ~1e-8·σ₁, zero values are noise at that level
    tol = rtol if label == "float32-certified" else 1e-6
    for name in FLOATS:
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=tol, abs=1e-300), (label, name)
    k = min(top_k, len(ref))
    np.testing.assert_allclose(res_S[:k], ref[:k], rtol=tol, atol=0 if label == "float32-certified" else 1e-7 * ref[0])


def near_threshold_taus(M: torch.Tensor, ks, offset: float) -> list[float]:
    """Thresholds τ = E_k / T + offset: the cumulative energy at k sits ``offset·T`` from τ·T."""
    e = np.cumsum(svd64(M) ** 2)
    return [float(e[k - 1] / e[-1] + offset) for k in ks]


# ---- the certificate on its own ------------------------------------------------------------------------
def float32_eigenvalues(M: np.ndarray):
    G = gram_upper(M)
    trace, fro = trace_and_fro(G)
    return eigvalsh_upper(G.astype(np.float32, order="F")), eigvalsh_upper(G), trace, fro


@pytest.mark.parametrize("kind", ["gaussian", "power", "lowrank", "clusters"])
@pytest.mark.parametrize("shape", [(64, 192), (150, 150), (300, 100)])
def test_error_bounds_hold_with_margin(kind, shape):
    """The backward-error model behind Δ: eigenvalue errors, partial-sum errors and the
    Hoffman–Wielandt sum all stay below Δ, with room (c₀ is 7× the largest ratio measured)."""
    rng = np.random.default_rng(zlib.crc32(f"{kind}{shape}".encode()))  # hash() of a str varies by process
    p = min(shape)
    if kind == "gaussian":
        M = rng.standard_normal(shape)
    elif kind == "power":
        M = planted(shape, np.arange(1, p + 1) ** -0.8).numpy()
    elif kind == "lowrank":
        M = rng.standard_normal((shape[0], 6)) @ rng.standard_normal((6, shape[1])) + 1e-3 * rng.standard_normal(shape)
    else:
        M = planted(shape, np.repeat([4.0, 2.0, 1.0], -(-p // 3))[:p]).numpy()
    lam32, lam64, trace, fro = float32_eigenvalues(M.astype(np.float32))
    bound = float32_error_bound(fro, p)
    assert bound == pytest.approx((1 + EIG_BACKWARD_C0 * math.sqrt(p) * (1 + EPS32)) * EPS32 * fro)
    d = lam32 - lam64
    k = np.arange(1, p + 1)
    assert np.max(np.abs(d)) <= bound / 4
    assert np.max(np.abs(np.cumsum(d)) / np.sqrt(k)) <= bound / 4
    assert math.sqrt(float(np.sum(d**2))) <= bound / 4
    assert trace == pytest.approx(float(np.sum(M.astype(np.float32).astype(np.float64) ** 2)), rel=1e-12)
    assert fro == pytest.approx(float(np.linalg.norm(np.diag(lam64))), rel=1e-9)


def test_certificate_accepts_a_benign_spectrum_and_names_what_fails():
    s = np.linspace(2.0, 1.0, 80)  # well conditioned, no energy rank near its threshold
    M = planted((80, 200), s).numpy()
    lam32, _, trace, fro = float32_eigenvalues(M)
    ok = certify_float32(lam32, trace=trace, gram_fro=fro, shape=M.shape, thresholds=THRESHOLDS, top_k=64)
    assert ok.ok and ok.failed == () and ok.bound > 0
    # a threshold placed 1e-9·T above a cumulative energy cannot be certified in float32
    tau = float(np.cumsum(np.sort(lam32)[::-1])[39] / trace + 1e-9)
    bad = certify_float32(lam32, trace=trace, gram_fro=fro, shape=M.shape, thresholds=(tau,))
    assert not bad.ok and bad.failed == (f"energy_rank[{tau}]",)
    # a rank-3 matrix: the float32 noise floor of the zero singular values breaks the float metrics
    low = planted((80, 200), [3.0, 2.0, 1.0]).numpy()
    lam32, _, trace, fro = float32_eigenvalues(low)
    res = certify_float32(lam32, trace=trace, gram_fro=fro, shape=low.shape, thresholds=THRESHOLDS, top_k=64)
    assert not res.ok and {"nuclear_norm", "effective_rank", "singular_values"} <= set(res.failed)


def test_zero_matrix_is_certified_with_zero_metrics():
    cert = certify_float32(np.zeros(5), trace=0.0, gram_fro=0.0, shape=(5, 9), thresholds=THRESHOLDS)
    assert cert.ok
    res = exact_spectra([torch.zeros(5, 9), torch.zeros(5, 9)], device="cpu")
    assert res.precision == ("float32-certified",) * 2 and not res.S.any()
    m = spectrum_metrics(res.S[0], (5, 9), THRESHOLDS)
    assert m.energy_rank == {t: 0 for t in THRESHOLDS} and m.fro_norm == 0.0


def test_certify_rejects_a_wrong_length():
    with pytest.raises(ValueError, match=r"lam must have shape \(4,\) for a \(4, 6\) matrix"):
        certify_float32(np.ones(3), trace=3.0, gram_fro=1.7, shape=(4, 6), thresholds=THRESHOLDS)


# ---- the engine: certified results equal float64 ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["lapack", "torch"])
def test_adversarial_thresholds_fall_back_to_float64(backend):
    """τ placed 5e-8·T from a cumulative energy, on either side: float32 cannot tell, so the matrix is
    recomputed in float64 and its ranks equal float64 numpy's."""
    mats = [planted((100, 160), np.arange(1, 101) ** -0.5, seed=i) for i in range(2)]
    for sign in (+1, -1):
        taus = near_threshold_taus(mats[0], [7, 60], sign * 5e-8)
        res = exact_spectra(mats, thresholds=taus, top_k=8, rtol=1e-3, device="cpu", backend=backend)
        assert res.precision[0] == "float64" and res.recomputed >= 1
        assert {f"energy_rank[{t}]" for t in taus} <= set(res.failed[0])
        for M, S, label in zip(mats, res.S, res.precision, strict=True):
            assert_matches_float64(M, S, label, taus, 1e-3, 8, backend)
        want = [energy_rank(svd64(mats[0]), t) for t in taus]
        assert want == ([8, 61] if sign > 0 else [7, 60])


@pytest.mark.parametrize("backend", ["lapack", "torch"])
def test_certified_equals_float64_on_many_planted_spectra(backend):
    """Seeded sweep over shapes and spectra (Gaussian, power laws, low rank + noise, exactly low rank,
    clusters, gaps next to τ): whatever the certificate decides, the reported ranks are float64's."""
    rng = np.random.default_rng(2024)
    labels = []
    for case in range(36):
        p = int(rng.integers(12, 90))
        shape = (p, int(rng.integers(p, 3 * p))) if case % 2 else (int(rng.integers(p, 3 * p)), p)
        kind = case % 6
        if kind == 0:
            M = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        elif kind == 1:
            M = planted(shape, np.arange(1, p + 1) ** -rng.uniform(0.2, 1.5), seed=case)
        elif kind == 2:
            r = int(rng.integers(1, 6))
            M = torch.from_numpy((rng.standard_normal((shape[0], r)) @ rng.standard_normal((r, shape[1]))
                                  + 1e-4 * rng.standard_normal(shape)).astype(np.float32))
        elif kind == 3:
            M = planted(shape, np.sort(rng.uniform(0.5, 2.0, size=p // 3))[::-1], seed=case)  # rank p // 3
        elif kind == 4:
            M = planted(shape, np.repeat([3.0, 1.0], [p // 4, p - p // 4]), seed=case)
        else:
            M = planted(shape, np.linspace(1.0, 0.3, p), seed=case)
        taus = list(THRESHOLDS)
        if case % 3 == 0:  # add adversarial thresholds next to a cumulative energy
            taus += near_threshold_taus(M, [int(rng.integers(1, p))], float(rng.choice([-1, 1]) * 10.0 ** rng.uniform(-9, -5)))
        taus = [t for t in taus if 0 < t <= 1]
        res = exact_spectra([M, M.clone()], thresholds=taus, top_k=16, rtol=1e-4, device="cpu", backend=backend)
        for S, label in zip(res.S, res.precision, strict=True):
            assert_matches_float64(M, S, label, taus, 1e-4, 16, backend)
        labels += res.precision
    assert labels.count("float32-certified") >= 10 and labels.count("float64") >= 10  # both branches ran


def test_low_rank_and_rank_deficient_updates_go_to_float64_and_stay_exact():
    g = torch.Generator().manual_seed(5)
    lora = (torch.randn(96, 8, generator=g) @ torch.randn(8, 160, generator=g)) / 10  # a rank-8 update
    res = exact_spectra([lora, lora + 1e-7 * torch.randn(96, 160, generator=g)], device="cpu")
    assert res.precision == ("float64", "float64")
    assert_matches_float64(lora, res.S[0], res.precision[0], THRESHOLDS, 1e-4, 64)
    assert spectrum_metrics(res.S[0], (96, 160), THRESHOLDS).energy_rank[0.99] <= 8


def test_gaussian_matrices_are_certified():
    g = torch.Generator().manual_seed(6)
    mats = torch.randn(4, 100, 300, generator=g)
    res = exact_spectra(mats, top_k=16, device="cpu")
    assert res.precision.count("float32-certified") >= 3
    for M, S, label in zip(mats, res.S, res.precision, strict=True):
        assert_matches_float64(M, S, label, THRESHOLDS, 1e-4, 16)


# ---- the CPU backend: kernels, threads, and the torch path on the CPU ----------------------------------
@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (1, 5), (5, 1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gram_upper_equals_float64_product(shape, dtype):
    rng = np.random.default_rng(3)
    M = rng.standard_normal(shape).astype(np.float32)
    M64 = M.astype(np.float64)
    ref = M64 @ M64.T if shape[0] <= shape[1] else M64.T @ M64
    for block_bytes in (1, 4 * 30 * 7, 1 << 30):  # one column per block, a few columns, everything
        G = gram_upper(M, dtype=dtype, block_bytes=block_bytes)
        assert G.dtype == dtype and G.flags.f_contiguous
        tol = 1e-13 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(np.triu(G), np.triu(ref), rtol=tol, atol=tol * np.abs(ref).max())
        lam = eigvalsh_upper(G)
        np.testing.assert_allclose(np.sqrt(np.maximum(lam, 0)), svd64(M)[: min(shape)], rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-6)


def test_gram_upper_of_a_non_contiguous_view():
    rng = np.random.default_rng(4)
    big = rng.standard_normal((40, 90)).astype(np.float32)
    view = big[::2, 5:80]  # strided rows and columns
    np.testing.assert_allclose(np.triu(gram_upper(view)), np.triu(view.astype(np.float64) @ view.T.astype(np.float64)), rtol=1e-12)


@pytest.mark.parametrize("precision", ["float64", "certified", "float32"])
def test_parallel_threads_equal_the_serial_run(precision):
    g = torch.Generator().manual_seed(7)
    mats = [torch.randn(64, 150, generator=g) for _ in range(6)]
    serial = exact_spectra(mats, precision=precision, workers=1, device="cpu")
    threaded = exact_spectra(mats, precision=precision, workers=3, device="cpu")
    np.testing.assert_allclose(threaded.S, serial.S, rtol=1e-12 if precision == "float64" else 1e-5)
    assert threaded.precision == serial.precision
    if precision != "float32":  # plain float32 promises no more than float32 accuracy
        for M, S, label in zip(mats, threaded.S, threaded.precision, strict=True):
            assert_matches_float64(M, S, label, THRESHOLDS, 1e-4, 64)
    assert threaded.gram_seconds.shape == threaded.eig_seconds.shape == (6,)


def test_torch_backend_on_the_cpu_equals_lapack_and_numpy():
    """The CUDA code path (batched torch chunks, with the split-and-retry fallback) on the CPU."""
    g = torch.Generator().manual_seed(8)
    mats = torch.randn(5, 48, 80, generator=g)
    lapack = exact_spectra(mats, precision="float64", device="cpu")
    chunked = exact_spectra(mats, precision="float64", device="cpu", backend="torch", max_batch_bytes=10**9, hard_limit_bytes=1)
    np.testing.assert_allclose(chunked.S, lapack.S, rtol=1e-12)
    np.testing.assert_allclose(lapack.S[2], svd64(mats[2]), rtol=1e-10)
    certified = exact_spectra(mats, device="cpu", backend="torch", max_batch_bytes=10**9, hard_limit_bytes=1, top_k=8)
    for M, S, label in zip(mats, certified.S, certified.precision, strict=True):
        assert_matches_float64(M, S, label, THRESHOLDS, 1e-4, 8, "torch")


def test_svd_method_and_float32_precision():
    g = torch.Generator().manual_seed(9)
    mats = torch.randn(3, 40, 25, generator=g)
    res = exact_spectra(mats, method="svd", device="cpu")  # no certificate for svdvals: float64
    assert res.precision == ("float64",) * 3
    np.testing.assert_allclose(res.S[1], svd64(mats[1]), rtol=1e-10)
    f32 = exact_spectra(mats, precision="float32", device="cpu")
    assert f32.precision == ("float32",) * 3 and f32.recomputed == 0
    np.testing.assert_allclose(f32.S, res.S, rtol=1e-4)


def test_exact_spectra_rejects_bad_options():
    M = [torch.ones(3, 4)]
    with pytest.raises(ValueError, match="precision must be one of"):
        exact_spectra(M, precision="float16")
    with pytest.raises(ValueError, match="method must be 'gram' or 'svd'. Got 'auto' instead"):
        exact_spectra(M, method="auto")
    with pytest.raises(ValueError, match="backend 'lapack' runs the Gram method on the CPU"):
        exact_spectra(M, method="svd", backend="lapack", device="cpu")
    with pytest.raises(ValueError, match="dtype must be torch.float64 or torch.float32"):
        engine.batch_singular_values(M, dtype=torch.float16)


def test_one_method_type_and_the_documented_cuda_batch_share(monkeypatch):
    assert engine.Method is linalg.Method and not hasattr(engine, "choose_method")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert batch_budget(torch.device("cuda")) == 450  # 45% of the free memory, as DiffConfig documents
    assert batch_budget(torch.device("cuda"), 123) == 123
    assert batch_budget(torch.device("cpu")) == engine.CPU_BATCH_BYTES


def test_empty_batch_shapes():
    res = exact_spectra([torch.zeros(0, 5)], device="cpu")
    assert isinstance(res, Spectra) and res.S.shape == (1, 0)


def test_blas_thread_count_is_restored_after_a_batch():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    exact_spectra(torch.randn(3, 20, 30), device="cpu", workers=2)
    exact_spectra(torch.randn(1, 20, 30), device="cpu")
    assert blas_threads() == before
