"""Twentieth round, Python API: hostile inputs to the subspace measures, linalg, metrics, configs and
the training tracker (docs/bad_inputs.md, "twentieth round")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch

import spectra
from spectra import linalg, metrics
from spectra import subspaces as S
from spectra.callbacks import SpectraTracker
from spectra.config import CompareConfig, DiffConfig
from spectra.errors import ConfigError
from spectra.esd_run import esd
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.randmat import gavish_donoho_omega

NAN, INF = float("nan"), float("inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank(out: int, inn: int, r: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(out, r, dtype=torch.float64, generator=g) @ torch.randn(r, inn, dtype=torch.float64, generator=g) * 0.1


# ---- 1. top_subspace of a matrix holding NaN or Inf ----------------------------------------------------------
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_top_subspace_refuses_nan_and_inf(bad):
    """float64 SVD of [[inf, 0], [0, 1]] silently returned e₂; NaN raised torch's _LinAlgError."""
    for M in (torch.tensor([[bad, 0.0], [0.0, 1.0]]), np.array([[1.0, bad], [1.0, 1.0]])):
        with pytest.raises(ValueError, match=r"^M holds NaN or Inf"):
            S.top_subspace(M, 1)


def test_factored_with_nan_values_is_refused():
    U, s, Vh = torch.linalg.svd(torch.randn(6, 4, dtype=torch.float64, generator=_gen(0)), full_matrices=False)
    with pytest.raises(ValueError, match=r"^M's S holds NaN or Inf"):
        S.top_subspace((U, torch.tensor([NAN, 1.0, 0.5, 0.1], dtype=torch.float64), Vh), 1)


# ---- 2. amplification of a dense update beyond its numerical rank ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_amplification_refuses_r_beyond_numerical_rank(dtype):
    """A rank-3 ΔW at r = 4 gave a factor from a rounding-noise direction; the factored form refused it."""
    W = torch.randn(16, 10, dtype=torch.float64, generator=_gen(2))
    D = _low_rank(16, 10, 3, 3)
    with pytest.raises(ValueError, match=r"^r must be in \[1, 3\] \(dW's numerical rank"):
        S.amplification(D.to(dtype), W, 4)
    # r within the rank: the float64 reference (Hu et al.'s ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F)
    Dn, Wn = D.to(dtype).double().numpy(), W.numpy()
    U, _, Vh = np.linalg.svd(Dn)
    for r in (1, 3):
        ref = np.linalg.norm(Dn) / np.linalg.norm(U[:, :r].T @ Wn @ Vh[:r].T)
        assert S.amplification(D.to(dtype), W, r).factor == pytest.approx(ref, rel=1e-9)
    # the factored form keeps its own rule (r up to its q), a zero update its 0
    Fq = S.Factored(*torch.linalg.svd(D, full_matrices=False))
    with pytest.raises(ValueError, match=r"r must be in \[1, 10\]"):
        S.amplification(Fq, W, 11)
    assert S.amplification(torch.zeros(16, 10), W, 2).factor == 0.0


# ---- 3. the tracker's loss --------------------------------------------------------------------------------------
def _tracker(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(6, 9, bias=False)
    t = SpectraTracker(m, every=1, out_dir=tmp_path)
    with torch.no_grad():
        m.weight.add_(0.1 * torch.randn(9, 6))
    return m, t


def _records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]


def test_tracker_takes_a_tensor_loss_as_a_float(tmp_path):
    """The docstring's own loop passes the loss tensor: JSON failed, and the step could never be measured again."""
    m, t = _tracker(tmp_path)
    loss = (m(torch.randn(2, 6)) ** 2).mean()  # 0-d, requires grad
    assert t.step(m, 1, loss=loss)
    t.step(m, 2, loss=np.float32(0.25))
    t.log_loss(3, loss=torch.tensor([1.5]), eval_loss=np.float64(2.0))
    recs = _records(tmp_path)
    points = [r for r in recs if "point" in r]
    assert [(r["step"], r["loss"]) for r in points] == [(1, pytest.approx(float(loss.detach()))), (2, 0.25)]
    assert {"step": 3, "loss": 1.5, "eval_loss": 2.0} in [r["log"] for r in recs if "log" in r]


@pytest.mark.parametrize("loss", ["x", [1.0], torch.ones(2), object()])
def test_tracker_refuses_a_loss_that_is_no_number_and_can_measure_the_step_after(tmp_path, loss):
    m, t = _tracker(tmp_path)
    with pytest.raises(ConfigError, match=r"^loss must be a number"):
        t.step(m, 1, loss=loss)
    with pytest.raises(ConfigError, match=r"^eval_loss must be a number"):
        t.log_loss(1, eval_loss=loss)
    assert t.step(m, 1, loss=0.5)  # the refused call measured nothing: step 1 is still open
    assert not t.warnings
    assert [r["loss"] for r in _records(tmp_path) if "point" in r] == [0.5]


def test_tracker_refuses_a_meta_model():
    mm = torch.nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match=r"meta device \(shapes only, no values\): load its weights first"):
        SpectraTracker(mm, every=1)


# ---- 4. seeds out of torch's range ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DiffConfig, CompareConfig, ExtractConfig])
@pytest.mark.parametrize("seed", [2**70, 2**63, -1])
def test_config_seed_out_of_range(cls, seed):
    with pytest.raises(ConfigError, match=r"^seed must be an integer from 0 to 2\*\*63-1"):
        cls(seed=seed)
    assert cls(seed=2**63 - 1).seed == 2**63 - 1


# ---- 5. a config of the wrong type at an entry point -------------------------------------------------------
@pytest.mark.parametrize(("call", "want"), [
    (lambda c: spectra.diff("b.safetensors", "t.safetensors", config=c), "DiffConfig"),
    (lambda c: spectra.diff_plan("b.safetensors", "t.safetensors", config=c), "DiffConfig"),
    (lambda c: spectra.compare("a", "b", config=c), "CompareConfig"),
    (lambda c: esd("m.safetensors", config=c), "EsdConfig"),
    (lambda c: extract("b", "t", "out", config=c), "ExtractConfig"),
])
def test_entry_points_refuse_a_config_of_another_type(call, want):
    for bad, got in (({"top_k": 3}, "dict"), (CompareConfig() if want != "CompareConfig" else DiffConfig(),
                                              "CompareConfig" if want != "CompareConfig" else "DiffConfig"), ({}, "dict")):
        with pytest.raises(ConfigError, match=rf"^config must be a {want} \(got {got}\)"):
            call(bad)


# ---- 7. Frobenius norm of subnormal values ----------------------------------------------------------------------
@pytest.mark.parametrize("values", [[5e-324, 5e-324], [5e-324, 1e-310, 3e-320], [2.5e-308, 0.0, 1e-320]])
def test_fro_norm_of_subnormals(values):
    """Scaling by 2**1073 in one step overflowed (math.ldexp(1.0, 1073))."""
    x = np.array(values)
    e = math.frexp(float(np.max(x)))[1]
    ref = math.ldexp(float(np.linalg.norm(np.ldexp(x, -e))), e)  # exact power-of-two scaling in numpy
    assert linalg.fro_norm(torch.tensor(x, dtype=torch.float64)) == pytest.approx(ref, rel=1e-15)
    assert linalg.fro_norm(torch.tensor(x, dtype=torch.float64).reshape(-1, 1), block=1) == pytest.approx(ref, rel=1e-15)


# ---- 8. NaN, Inf and odd scales --------------------------------------------------------------------------------
def _wd():
    W = torch.randn(16, 10, dtype=torch.float64, generator=_gen(5))
    return W, _low_rank(16, 10, 2, 6) * 30


@pytest.mark.parametrize("bad", [NAN, INF])
def test_subspace_measures_name_the_argument_holding_nan_or_inf(bad):
    W, D = _wd()
    Wb, Db = W.clone(), D.clone()
    Wb[0, 0] = Db[1, 1] = bad
    e = torch.eye(16, dtype=torch.float64)[:, :2], torch.eye(10, dtype=torch.float64)[:, :2]
    cases = [(lambda: S.intruder_dimensions(Wb, D, k=3), "W_base"), (lambda: S.intruder_dimensions(W, Db, k=3), "dW"),
             (lambda: S.amplification(Db, W, 2), "dW"), (lambda: S.amplification(D, Wb, 2), "W"),
             (lambda: S.captured_energy(Db, *e), "dW")]
    for f, name in cases:
        with pytest.raises(ValueError, match=rf"^{name} holds NaN or Inf"):
            f()
    with pytest.raises(ValueError, match=r"holds NaN"):  # a sum of squares that is NaN is no range problem
        metrics.check_energy_range(NAN, True, "dW")


def test_from_lora_scale_and_factors():
    g = _gen(7)
    B, A = torch.randn(20, 4, generator=g), torch.randn(4, 12, generator=g)
    ref = np.linalg.svd(B.double().numpy() @ A.double().numpy(), compute_uv=False)[:4]
    for scale in (0.0, -1.5, np.float32(2.0), torch.tensor(2.0), 3):
        got = S.Factored.from_lora(B, A, scale).S.numpy()
        np.testing.assert_allclose(got, abs(float(scale)) * ref, rtol=1e-12, atol=1e-12 * ref[0])
    for scale in (NAN, INF, -INF):
        with pytest.raises(ValueError, match=r"^scale must be a finite number"):
            S.Factored.from_lora(B, A, scale)
    for scale in ("2", None, True, torch.ones(2)):
        with pytest.raises(ValueError, match=r"^scale must be a finite number"):
            S.Factored.from_lora(B, A, scale)
    Bn = B.clone()
    Bn[0, 0] = NAN
    with pytest.raises(ValueError, match=r"^B holds NaN or Inf"):
        S.Factored.from_lora(Bn, A)
    with pytest.raises(ValueError, match=r"^A holds NaN or Inf"):
        S.Factored.from_lora(B, A / 0.0)


# ---- 9. validation gaps -----------------------------------------------------------------------------------------
def test_whole_floats_are_counts_and_fractions_are_refused():
    g = _gen(1)
    A, B = torch.randn(20, 8, dtype=torch.float64, generator=g), torch.randn(20, 8, dtype=torch.float64, generator=g)
    QA, QB = torch.linalg.qr(A).Q, torch.linalg.qr(B).Q
    ref = float(np.linalg.norm(QA.numpy()[:, :2].T @ QB.numpy()[:, :5]) ** 2 / 2)
    assert S.phi(QA, QB, 2.0, np.float64(5.0)) == pytest.approx(ref, rel=1e-12)
    assert S.phi_grid(QA, QB, 2.0, 3.0).shape == (2, 3)
    assert S.phi_random_baseline(2.0, 4, 8) == 0.5
    top = S.top_subspace(A, 2.0)
    U = np.linalg.svd(A.numpy(), full_matrices=False)[0][:, :2]
    np.testing.assert_allclose(np.sort(np.cos(sl.subspace_angles(top.numpy(), U))), [1.0, 1.0], atol=1e-12)
    W, D = _wd()
    assert S.amplification(D, W, 2.0, generator=_gen(0)) == S.amplification(D, W, 2, generator=_gen(0))
    assert S.intruder_dimensions(W, D, k=3.0).k == S.intruder_dimensions(W, D, k=3).k
    for f, name in ((lambda: S.phi(QA, QB, 2.5, 5), "i"), (lambda: S.top_subspace(A, 2.5), "k"),
                    (lambda: S.top_subspace(A, True), "k"), (lambda: S.amplification(D, W, 1.5), "r"),
                    (lambda: S.intruder_dimensions(W, D, k=2.5), "k"), (lambda: S.phi_random_baseline(1.5, 1, 5), "i"),
                    (lambda: S.top_subspace(A, "2"), "k")):
        with pytest.raises(ValueError, match=rf"^{name} must be a whole number in \["):
            f()
    with pytest.raises(ValueError, match=r"^epsilons must be in \[0, 1\]. Got '0.5' instead"):
        S.intruder_dimensions(W, D, epsilons=("0.5",))
    with pytest.raises(ValueError, match=r"^epsilon must be in \[0, 1\]. Got None instead"):
        S.intruder_dimensions(W, D, epsilon=None)


def test_metrics_shape_and_p():
    s = np.array([3.0, 2.0, 1.0, 0.5])
    with pytest.raises(ValueError, match=r"^S holds 4 values, more than min\(out, in\) of shape \(0, 0\)"):
        metrics.signal_rank(s, (0, 0))  # was a ZeroDivisionError
    with pytest.raises(ValueError, match=r"^shape must be \(out, in\)"):
        metrics.signal_rank(s, 4)
    with pytest.raises(ValueError, match=r"^shape must be \(out, in\)"):
        metrics.spectrum_metrics(s, (4,))
    with pytest.raises(ValueError, match=r"^shape must be \(out, in\)"):
        metrics.spectrum_metrics(s, (4.5, 4))
    m = metrics.spectrum_metrics(s, (4.0, np.int64(6)))
    assert type(m.p) is int and m.p == 4
    beta_ref = int(np.sum(s > gavish_donoho_omega(4 / 6) * np.median(s)))
    assert m.signal_rank == beta_ref
    for p in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match=r"^p must be (a whole number )?in \[4, "):
            metrics.numerical_rank(s, p)
    assert metrics.numerical_rank(s, 4.0) == metrics.numerical_rank(s, 4) == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, "float64"])
def test_singular_values_dtype(dtype):
    M = torch.randn(5, 4, dtype=torch.float64, generator=_gen(0))
    with pytest.raises(ValueError, match=r"^dtype must be torch.float32 or torch.float64"):
        linalg.singular_values(M, dtype=dtype)
    np.testing.assert_allclose(linalg.singular_values(M, dtype=torch.float64), np.linalg.svd(M.numpy(), compute_uv=False), rtol=1e-12)


@pytest.mark.parametrize("command", ["interfere", "trace"])
def test_interfere_and_trace_refuse_a_config_of_another_type(command, tmp_path):
    """Their entry points took `config or XConfig()`: a dict failed with an AttributeError deep in the run."""
    from spectra.errors import ConfigError
    from spectra.interfere import interfere
    from spectra.trace import trace

    fn = {"interfere": interfere, "trace": trace}[command]
    with pytest.raises(ConfigError, match=r"config must be a (Interfere|Trace)Config \(got dict\)"):
        fn(str(tmp_path / "a"), [str(tmp_path / "b"), str(tmp_path / "c")], config={"top_k": 3})
