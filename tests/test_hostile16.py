"""Sixteenth round of the outside probe (docs/bad_inputs.md, "sixteenth round")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra.errors import CheckpointFormatError, ConfigError
from spectra.esd import esd_metrics, power_law_fit, spectral_entropy


def _rank_deficient(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((300, 90)) @ rng.standard_normal((90, 100))


def _entropy64(lam: np.ndarray, rank: int) -> float:
    """WeightWatcher's matrix entropy in float64, written out: p = λ/Σλ + 1e-10, −Σ p ln p / ln(rank + 1e-10)."""
    p = lam / lam.sum() + 1e-10
    return float(-np.sum(p * np.log(p)) / np.log(rank + 1e-10))


def test_esd_of_eigvalsh_eigenvalues_clips_the_rounding_negatives_of_a_rank_deficient_gram():
    """np.linalg.eigvalsh(WᵀW) of a rank-90 W returns a few λ ≈ −1e-11: the entropy was −0.171 (sqrt of a
    negative made the rank tolerance NaN) and log_alpha_norm was dropped; they are clipped to 0 now."""
    W = _rank_deficient()
    lam = np.linalg.eigvalsh(W.T @ W)
    assert lam.min() < 0  # the premise: rounding negatives
    m = esd_metrics(lam, W.shape)
    clipped = np.clip(lam, 0.0, None)
    assert m.entropy == pytest.approx(_entropy64(clipped, m.matrix_rank), abs=1e-12)
    assert 0.0 < m.entropy <= 1.0
    assert m.alpha is not None
    assert m.log_alpha_norm == pytest.approx(np.log10(np.sum(clipped ** m.alpha)), rel=1e-12)
    # the same matrix from its singular values: the fit is the same
    m_svd = esd_metrics(np.linalg.svd(W, compute_uv=False) ** 2, W.shape)
    assert m.alpha == pytest.approx(m_svd.alpha, rel=1e-9)


@pytest.mark.parametrize("bad, match", [
    (np.r_[np.linspace(1.0, 50.0, 119), np.nan], "finite"),
    (np.r_[np.linspace(1.0, 50.0, 119), np.inf], "finite"),
    (np.r_[np.linspace(1.0, 50.0, 119), -1.0], "non-negative"),
    (np.linspace(1.0, 50.0, 120) + 1e-3j, "complex"),
])
def test_esd_refuses_eigenvalues_that_are_no_eigenvalues_of_a_gram_matrix(bad, match):
    """A NaN among 120 eigenvalues gave status 'success', norm nan and rank 0; −1.0 was dropped silently;
    a complex array lost its imaginary part."""
    for f in (lambda x: esd_metrics(x, (300, 120)), power_law_fit, lambda x: spectral_entropy(x, 300)):
        with pytest.raises(ValueError, match=match):
            f(bad)


def test_esd_and_metrics_take_tensors_that_need_grad_or_are_bfloat16():
    """energy_rank on a requires_grad tensor raised "Can't call numpy() on Tensor that requires grad", on a
    bfloat16 one "unsupported ScalarType BFloat16"; both are read as their values now."""
    from spectra.metrics import energy_rank

    S = torch.tensor([3.0, 1.0, 1.0])
    expected = energy_rank(S.numpy(), 0.9)
    assert energy_rank(S.clone().requires_grad_(True), 0.9) == expected
    assert energy_rank(S.bfloat16(), 0.9) == expected
    lam = torch.linspace(1.0, 30.0, 40, dtype=torch.float64)
    assert power_law_fit(lam.clone().requires_grad_(True)).alpha == power_law_fit(lam.numpy()).alpha


def test_meta_tensors_are_refused_by_name_not_returned_as_meta_results():
    """top_subspace and Factored.from_lora returned meta tensors; singular_values, phi and the metrics raised
    torch's "Tensor.item() cannot be called on meta tensors"."""
    from spectra.linalg import singular_values
    from spectra.metrics import energy_rank
    from spectra.subspaces import Factored, top_subspace

    M = torch.empty(6, 4, device="meta")
    for call in (lambda: top_subspace(M, 2), lambda: singular_values(M), lambda: energy_rank(torch.empty(3, device="meta"), 0.9),
                 lambda: Factored.from_lora(torch.empty(6, 2, device="meta"), torch.empty(2, 4, device="meta"))):
        with pytest.raises(ValueError, match="meta device"):
            call()


def test_cosine_matrix_refuses_nan_which_it_reserves_for_a_zero_update():
    from spectra.interference import cosine_matrix

    a = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        cosine_matrix([a, b])
    C = cosine_matrix([a, torch.zeros(4, 3)])
    assert np.isnan(C[0, 1])  # a zero update keeps its NaN


@pytest.mark.parametrize("what", ["state_dict", "module"])
def test_the_python_api_given_a_state_dict_or_module_says_to_save_it(tmp_path, what):
    """spectra.diff(sd_a, sd_b) raised the builtin TypeError "expected str, bytes or os.PathLike object, not dict";
    trace(base, [sd]) read the dict's keys as checkpoint paths."""
    lin = torch.nn.Linear(8, 8)
    a = lin.state_dict() if what == "state_dict" else lin
    b = {k: v + 0.01 for k, v in lin.state_dict().items()} if what == "state_dict" else lin
    from spectra.esd_run import esd
    from spectra.extract import extract
    from spectra.interfere import interfere
    from spectra.trace import trace

    out = str(Path(tmp_path) / "out")
    for call in (lambda: spectra.diff(a, b), lambda: spectra.compare(a, b), lambda: spectra.open_checkpoint(a),
                 lambda: esd(a), lambda: extract(a, b, out), lambda: interfere(a, [b, b]), lambda: trace(a, [b])):
        with pytest.raises(ConfigError, match="by its path") as err:
            call()
        assert ("save_file" in str(err.value)) if what == "state_dict" else ("save_pretrained" in str(err.value))


def _adapter(root: Path, kind: str) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    W = {"model.layers.0.self_attn.q_proj.weight": torch.randn(48, 48, generator=g),
         "model.layers.0.self_attn.v_proj.weight": torch.randn(24, 48, generator=g)}
    save_file(W, str(root / "base.safetensors"))
    sd = {}
    for k, w in W.items():
        m = "base_model.model." + k.removesuffix(".weight")
        A, B = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g)
        if kind == "swapped":
            sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"] = B, A
        else:
            sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"] = B.T.contiguous(), A.T.contiguous()
    (root / kind).mkdir()
    (root / kind / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))
    save_file(sd, str(root / kind / "adapter_model.safetensors"))
    return str(root / "base.safetensors"), str(root / kind)


@pytest.mark.parametrize("kind, match", [("swapped", "the two look exchanged"), ("transposed", "factors look transposed")])
def test_lora_factors_in_the_wrong_orientation_are_named_as_such(tmp_path, kind, match):
    """lora_A and lora_B exchanged read "adapter_config.json gives … rank 4 but its factors have rank 48 (the
    config was edited)"; each stored transposed read "trained on a different base model"."""
    base, adapter = _adapter(tmp_path, kind)
    with pytest.raises(CheckpointFormatError, match=match):
        spectra.diff(base, adapter)


def test_a_complex_tensor_is_not_called_quantised(tmp_path):
    W = torch.randn(8, 6, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    torch.save({"l.0.q_proj.weight": W}, tmp_path / "a.pt")
    torch.save({"l.0.q_proj.weight": W + 1}, tmp_path / "b.pt")
    from spectra.errors import PairingError

    with pytest.raises(PairingError, match="complex64 is not a float weight") as err:
        spectra.diff(str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
    assert "not a real-valued weight" in str(err.value) and "quantised" not in str(err.value)


def test_trace_given_one_run_folder_as_a_string_reads_the_folder_not_its_characters(tmp_path):
    """trace(base, "runs/x") iterated the string: "r: no such file or folder"."""
    from spectra.errors import CheckpointNotFoundError
    from spectra.trace import trace

    with pytest.raises(CheckpointNotFoundError, match="nonexistent_run"):
        trace(str(tmp_path / "base"), str(tmp_path / "nonexistent_run"))


def test_the_budget_allocation_spends_what_the_greedy_prefix_leaves():
    """extract --budget 600 spent 512 parameters (the greedy stopped at the first 192×64 component that did
    not fit) while an 80-parameter component of a 16×64 module still fitted: 0.426 kept against 0.446."""
    import itertools

    from spectra.lowrank import allocate_budget

    gains = [np.array([10, 9.9, 9.8, 9.7, 9.6]), np.array([40.0, 5, 4]), np.array([3, 2.9, 2.8, 2.7]), np.array([25.0, 24, 2])]
    costs = [128, 256, 80, 256]

    def brute(budget):
        best = 0.0
        for ranks in itertools.product(*[range(len(g) + 1) for g in gains]):
            if sum(r * c for r, c in zip(ranks, costs)) <= budget:
                best = max(best, sum(float(g[:r].sum()) for g, r in zip(gains, ranks)))
        return best

    prefix = allocate_budget(gains, costs, 600, fill=False)
    a = allocate_budget(gains, costs, 600)
    assert prefix.params == 512 and a.params == 592 and a.filled == 80 and a.ranks[2] == 1
    assert a.kept == pytest.approx(prefix.kept + 3.0) == pytest.approx(brute(600))
    assert a.bound == prefix.bound and a.ratio == prefix.ratio and a.critical == prefix.critical
    # never worse than the prefix, never above the fractional bound, within the budget
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(2, 5))
        gs = [np.sort(rng.random(int(rng.integers(1, 5))) ** 2)[::-1] for _ in range(n)]
        cs = [int(c) for c in rng.integers(1, 40, n)]
        budget = int(rng.integers(1, sum(len(g) * c for g, c in zip(gs, cs)) + 2))
        p, f = allocate_budget(gs, cs, budget, fill=False), allocate_budget(gs, cs, budget)
        assert p.kept <= f.kept + 1e-12 <= f.bound + 2e-12
        assert f.params == sum(r * c for r, c in zip(f.ranks, cs)) <= budget
        assert f.kept == pytest.approx(sum(float(g[:r].sum()) for g, r in zip(gs, f.ranks)))


def _frozen_and_moved(root: Path) -> tuple[str, str]:
    """Five 32×32 down_proj: three frozen, two moved by 3·‖W‖ along one direction; a 64×64 and a 1×64 q_proj moved a little."""
    torch.manual_seed(0)
    b, t = {}, {}
    for i in range(5):
        n = f"model.layers.{i}.mlp.down_proj.weight"
        W = torch.randn(32, 32) * 0.05
        u, v = (torch.linalg.qr(torch.randn(32, 32))[0][:, :1] for _ in range(2))
        b[n], t[n] = W, (W.clone() if i < 3 else W + 3 * W.norm() * u @ v.T)
    for i, shape in enumerate([(64, 64), (1, 64)]):
        n = f"model.layers.{i}.self_attn.q_proj.weight"
        b[n] = torch.randn(*shape) * 0.05
        t[n] = b[n] + 0.01 * torch.randn(*shape)
    save_file(b, str(root / "b.safetensors"))
    save_file(t, str(root / "t.safetensors"))
    return str(root / "b.safetensors"), str(root / "t.safetensors")


def test_diff_findings_table_and_warning_speak_of_the_same_changed_matrices(tmp_path):
    """With three frozen matrices the size finding said "a median 161%" (changed matrices) while the "larger than the
    base" warning, over every matrix, stayed silent (median 0.199); the table read down_proj rank 0, size 0 although
    two of its five moved by 300%; p of 64 and 1 read 32; the headline put three medians of different matrices in one
    sentence ("needs 1 of its p = 32 directions (0.27 of p)")."""
    from spectra.findings import count_text, diff_findings

    res = spectra.diff(*_frozen_and_moved(tmp_path))
    rel = [m.rel_norm for m in res.modules if m.fro_norm]
    found = {f.topic: f for f in diff_findings(res) if f.topic != "zero"}
    assert found["size"].numbers["median_rel_norm"] == pytest.approx(float(np.median(rel)))
    assert found["unrelated"].numbers["median_rel_norm"] == pytest.approx(float(np.median(rel)))
    assert float(np.median(rel)) > 1
    rows = {r["module"]: r for r in res.summary_records()}
    down = rows["down_proj"]
    assert (down["count"], down["changed"]) == (5, 2) and count_text(down) == "2 of 5"
    assert down["rel_norm"] == pytest.approx(3.0, rel=1e-5) and down["energy_rank"] == 1
    assert rows["q_proj"]["p"] == 32.5 and count_text(rows["q_proj"]) == "2"
    text = found["rank"].text
    assert "p from 1 to 64" in text and "of its p = " not in text

