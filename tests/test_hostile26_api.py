"""Twenty-sixth round, Python API (docs/bad_inputs.md, "twenty-sixth round"): lists rounded to torch's default
dtype, fp8 spectra, overflowing LoRA scales, biased angles of low-precision bases, and results.json values the
diff loader took without a word."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

import spectra
from spectra import subspaces as ss
from spectra.engine import exact_spectra, factored_svd
from spectra.errors import ResultsFormatError
from spectra.linalg import singular_values
from spectra.results import DiffResult


@pytest.fixture(params=[torch.float32, torch.bfloat16])
def default_dtype(request):
    """torch's default dtype set for the test, and restored after it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    try:
        yield request.param
    finally:
        torch.set_default_dtype(old)


def test_lists_are_read_as_float64_whatever_torch_default_dtype(default_dtype):
    """Nested lists went through torch.as_tensor: float32, or bf16 after set_default_dtype(torch.bfloat16), where
    the singular values of [[1, 1], [1, 1.001]] came back [2, 0] (rank 1)."""
    L = [[1.0, 1.0], [1.0, 1.001]]
    ref = np.linalg.svd(np.array(L), compute_uv=False)
    for method in ("svd", "gram"):
        np.testing.assert_allclose(singular_values(L, method=method), ref, rtol=1e-9)
    M = np.random.default_rng(0).standard_normal((12, 7))
    ref = np.linalg.svd(M, compute_uv=False)
    np.testing.assert_allclose(singular_values(M.tolist()), ref, rtol=1e-12)
    got = exact_spectra([M.tolist()], precision="float64", device="cpu").S[0][:7]
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    rng = np.random.default_rng(1)
    QA, QB = np.linalg.qr(rng.standard_normal((20, 4)))[0], np.linalg.qr(rng.standard_normal((20, 3)))[0]
    angles = np.sort(ss.principal_angles(QA.tolist(), QB.tolist()))
    np.testing.assert_allclose(angles, np.sort(scipy.linalg.subspace_angles(QA, QB)), atol=1e-12)
    assert abs(ss.grassmann_distance(QA.tolist(), QB.tolist()) - float(np.linalg.norm(angles))) < 1e-12
    assert abs(ss.phi(QA.tolist(), QB.tolist(), 4, 3) - np.linalg.norm(QA.T @ QB) ** 2 / 3) < 1e-12
    assert torch.get_default_dtype() == default_dtype  # nothing above changed it


def test_fp8_singular_values_work():
    """vector_norm has no fp8 kernel: NotImplementedError "norm_cpu" not implemented for 'Float8_e4m3fn'."""
    t = (torch.randn(6, 4, generator=torch.Generator().manual_seed(0))).to(torch.float8_e4m3fn)
    ref = np.linalg.svd(t.double().numpy(), compute_uv=False)
    for method in ("gram", "svd"):
        np.testing.assert_allclose(singular_values(t, method=method), ref, rtol=1e-9)


def test_overflowing_lora_scale_gives_nan_values_and_measures_refuse_in_one_line():
    """factored_svd(B, A, 1e308) and Factored.from_lora(B, A, 1e308) raised torch's _LinAlgError ("linalg.svd: The
    algorithm failed to converge"); the docstring promises NaN values, which the callers check."""
    rng = np.random.default_rng(0)
    B, A = rng.standard_normal((30, 4)), rng.standard_normal((4, 20))
    U, S, Vh = factored_svd(B, A, scale=1e308)
    assert S.shape == (4,) and bool(S.isnan().all()) and U.shape == (30, 4) and Vh.shape == (4, 20)
    U, S, Vh = factored_svd(B, A, scale=1e300)  # large, in range: exact
    np.testing.assert_allclose(S.numpy(), np.linalg.svd(1e300 * (B @ A), compute_uv=False)[:4], rtol=1e-12)
    f = ss.Factored.from_lora(B, A, 1e308)
    for measure in (lambda: ss.top_subspace(f, 2), lambda: ss.captured_energy(f, np.eye(30)[:, :2], np.eye(20)[:, :2])):
        with pytest.raises(ValueError, match=r"'s S holds NaN or Inf") as e:
            measure()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_bases_are_orthonormalised_before_the_angles(dtype):
    """principal_angles(q, q) of one bf16-rounded orthonormal 64 × 8 basis was ~0.11°, not 0: the cosines were
    σ(QAᵀQB) of bases only orthonormal to bf16's precision."""
    rng = np.random.default_rng(1)
    Q = np.linalg.qr(rng.standard_normal((64, 8)))[0]
    q = torch.tensor(Q).to(dtype)
    assert float(ss.principal_angles(q, q).max()) < 1e-12
    assert ss.grassmann_distance(q, q) < 1e-12 and abs(ss.phi(q, q, 8, 8) - 1.0) < 1e-12
    q2 = torch.tensor(Q @ np.linalg.qr(rng.standard_normal((8, 8)))[0]).to(dtype)  # same span, rounded apart
    ref = np.sort(scipy.linalg.subspace_angles(q.double().numpy(), q2.double().numpy()))
    np.testing.assert_allclose(np.sort(ss.principal_angles(q, q2)), ref, atol=1e-9)


def test_float64_orthonormal_bases_come_back_bit_for_bit():
    """Bases orthonormal to float64 precision are not touched (spectra compare's numbers stay as they were)."""
    Q = torch.tensor(np.linalg.qr(np.random.default_rng(2).standard_normal((300, 12)))[0])
    assert torch.equal(ss._basis(Q, "Q", None), Q)


def _results(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(16, 12, generator=g) for i in range(2)}
    save_file(W, str(tmp_path / "base.safetensors"))
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in W.items()}, str(tmp_path / "tuned.safetensors"))
    spectra.diff(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), out_dir=tmp_path / "out", plots=False)
    return tmp_path / "out" / "results.json"


def test_diff_loader_refuses_wrong_types_and_implausible_values(tmp_path):
    """DiffResult.load (and spectra report) took "device": 5 (the report said "on 5"), shape [2**70, 64], layer
    2**70 (findings read "layer 1180591620717411303424") and thresholds [0.9, 0.9]."""
    path = _results(tmp_path)
    doc = json.loads(path.read_text())
    DiffResult.load(path)  # as spectra writes it: read
    assert doc["thresholds"] == sorted(set(doc["thresholds"]))

    def mod(key, value):
        return lambda d: d["modules"][0].__setitem__(key, value)

    for change, key in (
        (lambda d: d.__setitem__("device", 5), "device"),
        (mod("shape", [2**70, 64]), "modules[0].shape"),
        (mod("shape", [16, 2**31 + 1]), "modules[0].shape"),
        (mod("layer", 2**70), "modules[0].layer"),
        (mod("expert", 10**18), "modules[0].expert"),
        (lambda d: d.__setitem__("thresholds", [0.9, 0.9]), "thresholds"),
        (lambda d: d.__setitem__("thresholds", d["thresholds"][::-1]), "thresholds"),
    ):
        bad = json.loads(json.dumps(doc))
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(ResultsFormatError, match=r"results\.json") as e:
            DiffResult.load(path)
        assert all(part in str(e.value) for part in key.split(".")) and "\n" not in str(e.value), str(e.value)
    for ok in ((lambda d: d.__setitem__("device", None)), mod("layer", 10**18 - 1), mod("layer", None)):
        good = json.loads(json.dumps(doc))
        ok(good)
        path.write_text(json.dumps(good))
        DiffResult.load(path)


def test_metric_arguments_and_budget_gains_are_checked():
    """Noted in the twenty-fifth round, now refused in one line: `spectral_entropy(N=-5)` (a negative tolerance counted
    every value), `matrix_rank(resolution=nan)` (every comparison False: rank 0), and `allocate_budget` with a NaN gain
    (sorted anywhere, it took a share of the budget)."""
    from spectra.allocation import allocate_budget
    from spectra.esd import matrix_rank, spectral_entropy

    S = np.array([3.0, 1.0, 1e-9])
    with pytest.raises(ValueError, match="N must be in"):
        spectral_entropy(S**2, -5)
    with pytest.raises(ValueError, match="resolution must be a finite number"):
        matrix_rank(S, 3, resolution=float("nan"))
    tol = S.max() * 3 * np.finfo(np.float64).eps  # numpy's tolerance, unchanged
    assert matrix_rank(S, 3) == int(np.count_nonzero(np.greater(S, tol)))
    for bad in (np.nan, np.inf, -1.0):
        with pytest.raises(ValueError, match="module 1: costs must be positive integers and gains finite"):
            allocate_budget([np.array([4.0, 1.0]), np.array([bad, 0.5])], [1, 1], 2)
    assert allocate_budget([np.array([4.0, 1.0]), np.array([2.0, 0.5])], [1, 1], 2).ranks == [1, 1]



def test_compare_loader_refuses_impossible_sizes_and_layers(tmp_path):
    """compare.json with `out` 2**70 or a layer 2**70 was loaded (the diff loader now refuses both): the findings would
    state them."""
    import json

    from safetensors.torch import load_file, save_file

    from spectra.compare_records import CompareResult
    from spectra.errors import ResultsFormatError
    from tests.pair_util import small_pair

    b, t = small_pair(tmp_path)
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in load_file(b).items()}, str(tmp_path / "t2.safetensors"))
    doc = spectra.compare(t, str(tmp_path / "t2.safetensors"), base=b).to_dict()
    assert CompareResult.from_dict(json.loads(json.dumps(doc))).modules  # as written: loads
    for key, value in (("out", 2**70), ("in", 2**40), ("layer", 2**70)):
        bad = json.loads(json.dumps(doc))
        bad["modules"][0][key] = value
        with pytest.raises(ResultsFormatError, match=f"modules\\[0\\]\\.{key}"):
            CompareResult.from_dict(bad, source="compare.json")


def test_an_unsorted_rounded_factored_update_keeps_its_top_subspaces():
    """The review: a hand-built (U, S, Vh) of bf16-rounded bases, S not sorted, was re-orthonormalised in the given
    column order and sorted after, so the top-1 direction mixed in the lower-σ column."""
    from spectra.subspaces import top_subspace

    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((64, 3)))[0]
    V = np.linalg.qr(rng.standard_normal((48, 3)))[0]
    S = np.array([0.5, 2.0, 1.0])  # the largest in the middle
    Ub, Vhb = torch.from_numpy(U).bfloat16(), torch.from_numpy(V.T).bfloat16()
    top = top_subspace((Ub, torch.from_numpy(S), Vhb), 1, "left").double().numpy()
    ref = Ub.double().numpy()[:, 1:2] / np.linalg.norm(Ub.double().numpy()[:, 1])  # the σ = 2 column, as given
    assert abs(float(ref[:, 0] @ top[:, 0])) == pytest.approx(1.0, abs=1e-12)
