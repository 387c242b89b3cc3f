"""Twenty-third round, ``extract`` and ``recommend`` for a budget (docs/bad_inputs.md, "twenty-third round"): a budget
left unspent because every module holds all of its directions, said nowhere; a NaN matrix's unknown energy counted
as none in 'all of ΔW's energy'."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file


def _full_rank_pair(root: Path) -> tuple[str, str, dict[str, np.ndarray]]:
    """Two 12 × 8 matrices whose updates have full rank 8 (out·in = 96 parameters each, a rank-8 LoRA 160)."""
    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(12, 8, generator=g) for i in range(2)}
    T = {k: v + 0.1 * torch.randn(12, 8, generator=g) for k, v in W.items()}
    save_file(W, str(root / "b.safetensors"))
    save_file(T, str(root / "t.safetensors"))
    return str(root / "b.safetensors"), str(root / "t.safetensors"), {k: (T[k] - W[k]).double().numpy() for k in W}


def test_a_budget_larger_than_every_direction_is_said_unspent(tmp_path):
    from spectra import diff
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig
    from spectra.recommend import recommend

    base, tuned, dW = _full_rank_pair(tmp_path)
    res = extract(base, tuned, tmp_path / "x", config=ExtractConfig(budget="100000"), plots=False)
    # every module at its full rank 8 (float64 SVD: 8 nonzero values), 2 · 8 · 20 = 320 parameters of 100,000
    assert [m["rank"] for m in res.modules] == [8, 8] and all(np.linalg.svd(d, compute_uv=False)[-1] > 1e-3 for d in dW.values())
    assert res.totals["params"] == 320
    said = [w for w in res.warnings if "every module already holds all of its update's directions" in w]
    assert said and said[0].startswith("320 of the budget's 100,000 parameters spent"), res.warnings
    assert "the LoRA factors hold more parameters than the dense ΔW" in said[0]  # 160 > 96 per module
    diff(base, tuned, plots=False).save(tmp_path / "d")
    rec = recommend(tmp_path / "d" / "results.json", energy=None, budget="100000")
    assert rec.params == 320 and any("every module already holds all of its update's directions" in n for n in rec.notes), rec.notes
    # under --max-rank 2 the cap, not the directions, leaves the budget: said so (the second review)
    res = extract(base, tuned, tmp_path / "m", config=ExtractConfig(budget="100000", max_rank=2), plots=False)
    assert [m["rank"] for m in res.modules] == [2, 2]
    assert any("80 of the budget's 100,000 parameters spent: 2 modules are at the largest rank --max-rank / --serving "
               "allows (e.g. model.layers.0.mlp.up_proj.weight at r = 2)" in w for w in res.warnings), res.warnings
    rec = recommend(tmp_path / "d" / "results.json", energy=None, budget="100000", max_rank=2)
    assert any("2 modules are at the largest rank --max-rank 2 allows" in n for n in rec.notes), rec.notes
    # a budget that binds says nothing of the kind
    res = extract(base, tuned, tmp_path / "y", config=ExtractConfig(budget="200"), plots=False)
    assert not any("already holds all" in w for w in res.warnings)


def test_a_nan_matrix_left_out_is_not_counted_as_no_energy(tmp_path):
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    g = torch.Generator().manual_seed(1)
    W = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 16, generator=g) for i in range(3)}
    T = {k: v + torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for k, v in W.items()}
    T["model.layers.2.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file(T, str(tmp_path / "t.safetensors"))
    res = extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / "x",
                  config=ExtractConfig(rank=2), plots=False)
    assert res.totals["unmeasured"] == 1
    assert any("1 matrix not extracted has no finite ΔW (e.g. model.layers.2.self_attn.q_proj.weight" in w
               and "energy_kept_all and not_extracted_energy_share are over the matrices with one" in w for w in res.warnings), res.warnings
    assert res.totals["energy_kept_all"] == pytest.approx(1.0, abs=1e-9) and math.isfinite(res.totals["not_extracted_energy_share"])


def test_a_shape_change_is_not_counted_as_no_finite_update(tmp_path):
    """The second review: totals.unmeasured counted a matrix left out for its changed shape as 'no finite ΔW'."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    g = torch.Generator().manual_seed(2)
    W = {"model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
         "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g)}
    T = {"model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g),
         "model.layers.0.self_attn.q_proj.weight": W["model.layers.0.self_attn.q_proj.weight"] + 0.1}
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file(T, str(tmp_path / "t.safetensors"))
    res = extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / "x",
                  config=ExtractConfig(rank=1), plots=False)
    assert res.totals["unmeasured"] == 0 and not any("no finite ΔW" in w for w in res.warnings), res.warnings
