"""Thirty-fourth round: extract's accounting, and KnOTS beside a coarse task (docs/bad_inputs.md, "thirty-fourth round")."""

from __future__ import annotations

import json

import numpy as np
import torch
from cli_util import cli
from safetensors.torch import save_file

from spectra.interference import knots_basis
from spectra.subspaces import Factored

Q = "model.layers.0.self_attn.q_proj"


def _pair(tmp_path, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> tuple[str, str]:
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")


def test_a_changed_a_log_is_listed_as_not_extracted(tmp_path):
    """A Mamba mixer's A_log (2-D, no linear map: the pairing skips it) changed by the fine-tune appeared nowhere in
    extract.json, and energy_kept_all left its energy out (0.440 reported, 0.433 measured on Jamba)."""
    g = torch.Generator().manual_seed(0)
    base = {f"{Q}.weight": torch.randn(16, 16, generator=g), "model.layers.0.mamba.A_log": torch.randn(32, 4, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    b, t = _pair(tmp_path, base, tuned)
    res = cli(["extract", b, t, "-r", "16", "--out", str(tmp_path / "out"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "out" / "extract.json").read_text())
    left = {r["name"]: r for r in doc["not_extracted"]}
    assert "an SSM's state parameter" in left["model.layers.0.mamba.A_log"]["reason"], doc["not_extracted"]
    d = {k: (tuned[k].double() - base[k].double()).norm().item() ** 2 for k in base}
    # every component of q_proj kept (rank 16 of 16): what is not held is A_log's share, measured here in float64
    assert abs(doc["totals"]["energy_kept_all"] - d[f"{Q}.weight"] / sum(d.values())) < 1e-6, doc["totals"]


def test_save_modules_counts_the_lora_bias_vectors(tmp_path):
    """--save-modules writes a lora_B.bias on every adapted module, counted nowhere: PEFT built 3,008 parameters for a
    budget of 2,457 and totals.params 2,432. adapter.bias_params counts them, and a warning says they are outside it."""
    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.self_attn.{m}.{p}": torch.randn(24, 16, generator=g) if p == "weight" else torch.randn(24, generator=g)
            for i in range(2) for m in ("q_proj", "v_proj") for p in ("weight", "bias")}
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tuned["model.norm.weight"] = torch.ones(16) * 1.1
    base["model.norm.weight"] = torch.ones(16)
    b, t = _pair(tmp_path, base, tuned)
    res = cli(["extract", b, t, "-b", "50%", "--save-modules", "--out", str(tmp_path / "out"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "out" / "extract.json").read_text())
    assert doc["adapter"]["bias_params"] == 4 * 24 and doc["adapter"]["saved_params"] == 16, doc["adapter"]
    assert any("outside the budget: 16 of modules kept whole (modules_to_save, adapter.saved_params), 96 of lora_B.bias"
               in w for w in doc["warnings"]), doc["warnings"]
    res = cli(["extract", b, t, "-r", "2", "--save-modules", "--out", str(tmp_path / "rank"), "--no-plots"])
    doc = json.loads((tmp_path / "rank" / "extract.json").read_text())  # --rank spends no budget: counted, not warned
    assert doc["adapter"]["bias_params"] == 96 and not any("outside the budget" in w for w in doc["warnings"]), doc["warnings"]


def test_a_norms_only_fine_tune_is_named_and_nothing_is_kept(tmp_path):
    """LayerNorm tuning: extract said "check that you passed the fine-tuned checkpoint" while extract.json listed the
    norms as "kept whole as PEFT modules_to_save" (no adapter was written) and spent "0 of the budget"."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 64, generator=g)
    base = {f"{Q}.weight": w, "model.layers.0.input_layernorm.weight": torch.ones(64)}
    tuned = {f"{Q}.weight": w.clone(), "model.layers.0.input_layernorm.weight": torch.ones(64) * 1.2}
    b, t = _pair(tmp_path, base, tuned)
    res = cli(["extract", b, t, "-b", "10%", "--save-modules", "--out", str(tmp_path / "out"), "--no-plots"])
    assert res.returncode not in (0, 3) and "Traceback" not in res.stderr, (res.returncode, res.stderr)
    assert "only 1 norm/bias tensor changed (e.g. model.layers.0.input_layernorm.weight)" in res.stderr, res.stderr
    doc = json.loads((tmp_path / "out" / "extract.json").read_text())
    assert [r["held"] for r in doc["not_lora"]] == [None] and doc["adapter"] is None, doc["not_lora"]
    assert not any("parameters spent" in x for x in doc["warnings"]), doc["warnings"]


def test_a_tiny_budget_in_words_and_no_blank_line_before_the_error(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 16, generator=g)
    b, t = _pair(tmp_path, {f"{Q}.weight": w}, {f"{Q}.weight": w + 0.1 * torch.randn(16, 16, generator=g)})
    res = cli(["extract", b, t, "-b", "1", "--out", str(tmp_path / "out"), "--no-plots"])
    assert res.returncode == 1 and res.stderr.startswith("error: --budget 1 is 1 LoRA parameter, below"), repr(res.stderr[:200])


def test_knots_alignment_does_not_depend_on_the_coarsest_floor():
    """knots_basis cut its basis at twice the largest task floor before aligning: a bf16 task beside float32 ones
    nulled every alignment (rank 0) or shrank it (0.0023 for 0.029). The floor cuts the shared rank only; the
    alignment is the closed form ⟨ΔW_sᵀΔW_s, ΔW_tᵀΔW_t⟩ / (‖·‖‖·‖) of each task's factors."""
    g = torch.Generator().manual_seed(4)
    fs = []
    for scale in (1.0, 0.5, 0.01):
        D = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 30, generator=g, dtype=torch.float64) * scale
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        fs.append((D, Factored(U[:, :5], S[:5], Vh[:5])))
    coarse = knots_basis([f for _, f in fs], floor=10.0 * float(fs[0][1].S[0]))  # above every value: rank 0
    fine = knots_basis([f for _, f in fs])
    assert coarse.rank == 0 and fine.rank == 15
    for s in range(3):
        for t in range(3):
            a, b = fs[s][0], fs[t][0]
            ref = float((a.T @ a * (b.T @ b)).sum() / (torch.linalg.norm(a.T @ a) * torch.linalg.norm(b.T @ b)))
            assert np.isclose(coarse.alignment[s, t], ref, rtol=1e-10, atol=1e-12), (s, t, coarse.alignment[s, t], ref)
            assert np.isclose(fine.alignment[s, t], ref, rtol=1e-10, atol=1e-12)
