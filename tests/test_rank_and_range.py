"""Measures that must not invent directions or lose a scale: subspaces of updates with fewer
directions than their rank (compare), intruders against rank-deficient bases, and float64 weights
near 1e±200 in trace, interfere and compare. References are float64 numpy SVDs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra import CompareConfig, compare
from spectra.compare_findings import compare_findings
from spectra.compare_records import ComparedModule, CompareResult
from spectra.interfere import InterfereConfig, interfere
from spectra.subspaces import intruder_dimensions
from spectra.trace import trace
from spectra_cli.main import main

SHAPES = {"self_attn.q_proj": (24, 24), "mlp.up_proj": (40, 24), "mlp.down_proj": (24, 40)}


def _name(mod: str) -> str:
    return f"model.layers.0.{mod}.weight"


def _adapter(folder, factors, r, alpha):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "up_proj", "down_proj"]}))
    tensors = {}
    for name, (B, A) in factors.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        tensors[stem + ".lora_A.weight"], tensors[stem + ".lora_B.weight"] = A.contiguous(), B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))


@pytest.fixture
def rank_two_lora(tmp_path):
    """A LoRA of r = 4 whose B has two zero columns (its update has rank 2), the same update merged
    into a float64 checkpoint, and the base."""
    g = torch.Generator().manual_seed(1)
    base, merged, factors = {}, {}, {}
    for mod, (o, i) in SHAPES.items():
        W = torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5
        B, A = torch.randn(o, 4, generator=g) * 0.1, torch.randn(4, i, generator=g)  # float32, as adapters are stored
        B[:, 2:] = 0.0
        base[_name(mod)], merged[_name(mod)] = W, W + 2.0 * B.double() @ A.double()  # alpha 8 / r 4
        factors[_name(mod)] = (B, A)
    for sub, sd in (("base", base), ("merged", merged)):
        (tmp_path / sub).mkdir()
        save_file(sd, str(tmp_path / sub / "model.safetensors"))
    _adapter(tmp_path / "lora", factors, 4, 8.0)
    return tmp_path, base, merged


def test_an_update_of_fewer_directions_than_its_rank_is_compared_at_its_resolved_rank(rank_two_lora):
    """The LoRA against its own merge: φ = 1 and every cosine 1. Before, rank 4 (and top_k 6) subspaces
    were compared, the extra directions arbitrary: φ 0.3-0.8 for the same update."""
    root, base, merged = rank_two_lora
    res = compare(str(root / "lora"), str(root / "merged"), base=str(root / "base"), config=CompareConfig(top_k=6))
    assert len(res.modules) == len(SHAPES)
    for m in res.modules:
        assert (m.rank_a, m.rank_b) == (2, 2)
        assert "A's update resolves 2 directions, fewer than its rank 4" in m.note
        assert "B's update resolves 2 directions, fewer than its rank 6" in m.note
        for side in m.sides:
            assert m.phi[side].phi_full == pytest.approx(1.0, abs=1e-9)
            np.testing.assert_allclose(m.angles[side].cosines, 1.0, atol=1e-7)
        assert m.captured["b_in_a"].two_sided == pytest.approx(1.0, abs=1e-9)
        D = merged[m.name].numpy() - base[m.name].numpy()
        W = base[m.name].numpy()
        U, _, Vh = np.linalg.svd(D)
        ref = np.linalg.norm(D) / np.linalg.norm(U[:, :2].T @ W @ Vh[:2].T)  # Hu et al.'s factor at r = 2
        assert m.amplification["a"].factor == pytest.approx(ref, rel=1e-9)
        assert m.amplification["b"].factor == pytest.approx(ref, rel=1e-9)
    assert "note" in res.rows()[0] and json.loads(res.to_json())["modules"][0]["note"]
    said = [f.text for f in compare_findings(res) if f.warning]
    assert any(t.startswith(f"{len(SHAPES)} of {len(SHAPES)} modules have an update of fewer directions") for t in said)


def test_intruders_against_a_zero_or_rank_deficient_base_use_its_resolved_vectors():
    rng = np.random.default_rng(3)
    # a zero base has no direction: every direction of the tuned weight is new (rank 3: three examined)
    dW = torch.from_numpy(rng.standard_normal((20, 3)) @ rng.standard_normal((3, 30)))
    res = intruder_dimensions(torch.zeros(20, 30, dtype=torch.float64), dW, k=10)
    assert res.k == 3 and res.max_cos.shape == (3,) and res.count == 3
    np.testing.assert_array_equal(res.max_cos, 0.0)
    # a base of rank 12 (rows 12.. zero) and an update mostly along a direction outside its column space
    W = np.zeros((30, 40))
    W[:12] = rng.standard_normal((12, 40))
    e = np.zeros(30)
    e[20:] = rng.standard_normal(10)
    e /= np.linalg.norm(e)
    D = 3 * np.linalg.norm(W, 2) * np.outer(e, rng.standard_normal(40) / 40**0.5) + 1e-3 * rng.standard_normal((30, 40))
    Ub = np.linalg.svd(W)[0][:, :12]  # the base's 12 resolved left singular vectors
    Ut = np.linalg.svd(W + D)[0][:, :5]
    ref = np.abs(Ut.T @ Ub).max(axis=1)
    got = intruder_dimensions(torch.from_numpy(W), torch.from_numpy(D), k=5)
    np.testing.assert_allclose(got.max_cos, ref, atol=1e-8)
    assert got.max_cos[0] < 0.5 and got.count >= 1  # the new direction is an intruder, whatever null-space basis


def _float64_pair(root, scale: float, n_tuned: int = 2):
    """A float64 base and tuned checkpoints at ``scale`` (entries ~1e±200): rank-3 updates plus noise."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    base = {n: torch.randn(16, 24, generator=g, dtype=torch.float64) * scale for n in names}
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    tuned = []
    for t in range(n_tuned):
        gt = torch.Generator().manual_seed(t + 1)
        sd = {n: w + scale * (0.5 * torch.randn(16, 3, generator=gt, dtype=torch.float64) @ torch.randn(3, 24, generator=gt, dtype=torch.float64)
                              + 1e-3 * torch.randn(16, 24, generator=gt, dtype=torch.float64)) for n, w in base.items()}
        save_file(sd, str(root / f"t{t}.safetensors"))
        tuned.append((root / f"t{t}.safetensors", sd))
    return base, tuned


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_trace_measures_float64_weights_near_the_range_limits(tmp_path, scale):
    """Its Gram matrix overflowed (fro null, ranks 1) or underflowed (fro 0, ranks 0) before."""
    base, tuned = _float64_pair(tmp_path, scale)
    res = trace(str(tmp_path / "base.safetensors"), [str(p) for p, _ in tuned], plots=False)
    for rec in res.matrices:
        for pt, (_, sd) in zip(rec["points"], tuned):
            D = (sd[rec["name"]] - base[rec["name"]]).numpy() / scale  # exact reference, rescaled
            S = np.linalg.svd(D, compute_uv=False)
            assert pt["fro_norm"] == pytest.approx(np.linalg.norm(S) * scale, rel=1e-10)
            cum = np.cumsum(S**2) / np.sum(S**2)
            for key, tau in (("0.5", 0.5), ("0.9", 0.9), ("0.99", 0.99)):
                assert pt["energy_rank"][key] == int(np.searchsorted(cum, tau) + 1)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_interfere_skips_float64_weights_beyond_the_squaring_range_with_the_reason(tmp_path, scale):
    """A traceback (eigh failed to converge) at 1e200, and every update called zero at 1e-200, before."""
    _float64_pair(tmp_path, scale)
    res = interfere(str(tmp_path / "base.safetensors"), [str(tmp_path / "t0.safetensors"), str(tmp_path / "t1.safetensors")],
                    config=InterfereConfig(), plots=False)
    assert not res.modules and len(res.skipped) == 2
    assert all("squares leave float64's range" in s["reason"] for s in res.skipped)
    assert not any("ΔW = 0" in w for w in res.warnings)


@pytest.mark.parametrize("alpha", [4e200, 4e-200])
def test_compare_skips_a_lora_update_beyond_the_squaring_range(rank_two_lora, tmp_path, alpha):
    """json.dumps raised on an inf norm at 4e200; at 4e-200 every module was an "exactly zero" update."""
    root, _, _ = rank_two_lora
    g = torch.Generator().manual_seed(5)
    factors = {_name(mod): (torch.randn(o, 4, generator=g, dtype=torch.float64), torch.randn(4, i, generator=g, dtype=torch.float64))
               for mod, (o, i) in SHAPES.items()}
    _adapter(tmp_path / "huge", factors, 4, alpha)
    res = compare(str(tmp_path / "huge"), str(root / "lora"), out_dir=str(tmp_path / "out"), plots=False)
    assert not res.modules and len(res.skipped) == len(SHAPES)
    assert all("leaves float64's range" in s["reason"] for s in res.skipped)
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["skipped"]
    # nothing compared is not a success: one line and status 1 (it ended with status 0)
    ran = CliRunner().invoke(main, ["compare", str(tmp_path / "huge"), str(root / "lora"), "--no-plots"])
    assert ran.exit_code == 1 and "error: no module could be compared: all 3 were skipped" in ran.output
    assert "Traceback" not in ran.output


def test_compare_json_writes_an_undefined_number_as_null():
    m = ComparedModule(name="x", layer=0, module="q_proj", role="q", out=2, in_=2, rank_a=1, rank_b=1, fro_a=math.inf, fro_b=1.0)
    res = CompareResult("a", "b", None, {"a": "lora", "b": "lora"}, {}, modules=[m])
    assert json.loads(res.to_json())["modules"][0]["fro_a"] is None


def test_a_float64_adapter_is_read_in_float64(tmp_path):
    """Its factors were rounded to float32 on reading: 1e-8 relative error against its own merge."""
    g = torch.Generator().manual_seed(7)
    factors = {_name(mod): (torch.randn(o, 4, generator=g, dtype=torch.float64), torch.randn(4, i, generator=g, dtype=torch.float64))
               for mod, (o, i) in SHAPES.items()}
    _adapter(tmp_path / "lora64", factors, 4, 8.0)
    from spectra.io.adapter import open_adapter

    for mod in open_adapter(str(tmp_path / "lora64")).modules.values():
        B, A = factors[mod.weight_name]
        assert mod.B.dtype == torch.float64 and torch.equal(mod.B, B) and torch.equal(mod.A, A)
        S = np.linalg.svd(2.0 * B.numpy() @ A.numpy(), compute_uv=False)[:4]
        np.testing.assert_allclose(np.linalg.svd(mod.dense_delta().numpy(), compute_uv=False)[:4], S, rtol=1e-13)


def test_a_lora_direction_far_below_the_gram_resolution_is_still_a_direction(rank_two_lora, tmp_path):
    """A LoRA's values come from an SVD of its exact factors: 1e-9·σ₁ is resolved, and its subspace
    keeps it (the Gram route's σ₁·√(p·u) cut dropped it: φ ≈ 0 against an adapter made of it)."""
    root, _, _ = rank_two_lora
    g = torch.Generator().manual_seed(9)
    small, only = {}, {}
    for mod, (o, i) in SHAPES.items():
        B, A = torch.randn(o, 4, generator=g, dtype=torch.float64), torch.randn(4, i, generator=g, dtype=torch.float64)
        small[_name(mod)] = (torch.cat([B[:, :2], 1e-9 * B[:, 2:]], 1), A)
        only[_name(mod)] = (torch.cat([0 * B[:, :2], B[:, 2:]], 1), A)
    _adapter(tmp_path / "small", small, 4, 4.0)
    _adapter(tmp_path / "only", only, 4, 4.0)
    res = compare(str(tmp_path / "small"), str(tmp_path / "only"), config=CompareConfig(side="right"))
    for m in res.modules:
        assert (m.rank_a, m.rank_b) == (4, 2)
        assert m.phi["right"].phi_full == pytest.approx(1.0, abs=1e-9)
