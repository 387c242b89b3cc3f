"""Twenty-second round, the review of its own change (docs/bad_inputs.md, "twenty-second round"): a trace of an MoE
run whose experts are stored in another layout, the amplification's checks and messages, the budget's critical
module beside a skipped one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import ConfigError
from spectra.subspaces import amplification, top_subspace


def test_a_trace_of_experts_stored_per_matrix_against_stacks_is_not_another_model(tmp_path):
    """The new unpaired-matrix check counted the 24 per-expert matrices (which the pairing note explains: a layout of
    another transformers version) as 'not in the base', marked every checkpoint failed and stopped the trace."""
    from spectra.trace import trace

    D, I, E = 8, 12, 4
    g = torch.Generator().manual_seed(0)
    stacked, per = {}, {}
    for layer in range(2):
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            stacked[f"model.layers.{layer}.self_attn.{k}.weight"] = per[f"model.layers.{layer}.self_attn.{k}.weight"] = \
                torch.randn(D, D, generator=g)
        gu, dn = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
        stacked[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gu
        stacked[f"model.layers.{layer}.mlp.experts.down_proj"] = dn
        for e in range(E):
            per[f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight"] = gu[e, :I].clone()
            per[f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"] = gu[e, I:].clone()
            per[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"] = dn[e].clone()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in stacked.items()}, str(tmp_path / "base" / "model.safetensors"))
    tuned = {}
    for step in (10, 20):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        tuned[step] = {k: (v + 0.01 * step * torch.randn(v.shape, generator=g)).contiguous() for k, v in per.items()}
        save_file(tuned[step], str(folder / "model.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    res = trace(str(tmp_path / "base"), [str(tmp_path / "run")], plots=False)
    assert not any(c.get("failed") for c in res.checkpoints), res.checkpoints
    assert len(res.matrices) == 8 and any("the experts are stored one matrix per expert" in w for w in res.warnings)
    # the attention matrices are traced exactly: ‖ΔW‖_F against float64 numpy at each step
    name = "model.layers.1.self_attn.v_proj.weight"
    rec = next(m for m in res.matrices if m["name"] == name)
    for point, step in zip(rec["points"], (10, 20)):
        want = np.linalg.norm(tuned[step][name].double().numpy() - stacked[name].double().numpy())
        assert point["step"] == step and point["fro_norm"] == pytest.approx(want, rel=1e-6)


def test_amplifications_checks_name_dW_and_say_what_the_cut_is():
    """The resolved-rank check read a (U, S, Vh) tuple's S before it was validated: 'S must hold finite…' lost dW's
    name; a dense update's cut said its small directions were rounding noise (an SVD resolves them; spectra cuts at
    σ₁·√(p·u) by choice)."""
    W = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    U = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64)).Q
    with pytest.raises(ValueError, match=r"^dW's S holds NaN or Inf"):
        amplification((U, torch.tensor([1.0, math.nan], dtype=torch.float64), V.mT), W, 1)
    with pytest.raises(ValueError, match=r"^dW's S must be non-negative"):
        amplification((U, torch.tensor([1.0, -1.0], dtype=torch.float64), V.mT), W, 1)
    dense = torch.diag(torch.tensor([1.0, 1e-8, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"k must be in \[1, 1\] \(M's numerical rank: values below σ₁·√\(p·u\)"):
        top_subspace(dense, 2)
    # r within the rank: Hu et al.'s factor from a float64 numpy SVD
    dW = (U * torch.tensor([3.0, 1.0], dtype=torch.float64)) @ V.mT
    Un, _, Vhn = np.linalg.svd(dW.numpy())
    want = np.linalg.norm(dW.numpy()) / np.linalg.norm(Un[:, :2].T @ W.numpy() @ Vhn[:2].T)
    assert amplification((U, torch.tensor([3.0, 1.0], dtype=torch.float64), V.mT), W, 2).factor == pytest.approx(want, rel=1e-10)


def test_the_python_apis_device_message_names_no_option():
    from spectra.engine import exact_spectra

    with pytest.raises(ConfigError, match=r"^device must be auto, cpu, cuda or cuda:N"):
        exact_spectra([torch.eye(3)], device="meta")


def test_the_budgets_critical_module_is_named_beside_a_skipped_one(tmp_path):
    """allocation.critical indexed the targets left after skipping one (NaN) with the knapsack's index over all of
    them: it named the module after the critical one."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    g = torch.Generator().manual_seed(2)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (16, 16), "model.layers.0.self_attn.v_proj.weight": (24, 16),
              "model.layers.0.mlp.up_proj.weight": (40, 16)}
    base = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    spectra_of = {}
    tuned = {}
    for n, (o, i) in shapes.items():
        Uq = torch.linalg.qr(torch.randn(o, 4, generator=g, dtype=torch.float64)).Q
        Vq = torch.linalg.qr(torch.randn(i, 4, generator=g, dtype=torch.float64)).Q
        s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64) * (1 + float(torch.rand((), generator=g)))
        tuned[n] = base[n] + (Uq * s) @ Vq.mT
        spectra_of[n] = s.numpy()
    tuned["model.layers.0.self_attn.q_proj.weight"][0, 0] = math.nan  # skipped, and first in order
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    budget = 150
    res = extract(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), tmp_path / "out",
                  config=ExtractConfig(budget=str(budget)), plots=False)
    # the reference: components by σ²/(out + in), greedy; the first that does not fit is the critical one
    comps = sorted(((s**2 / (o + i), n, k) for n, (o, i) in shapes.items() if "q_proj" not in n
                    for k, s in enumerate(spectra_of[n], 1)), reverse=True)
    used, critical = 0, None
    for _, n, k in comps:
        cost = sum(shapes[n])
        if used + cost > budget:
            critical = (n, k)
            break
        used += cost
    crit = res.allocation["critical"]
    assert crit is not None and (crit["module"], crit["rank"]) == critical, (crit, critical)


def test_extract_evals_uniform_adapter_holds_the_same_saved_modules(tmp_path):
    """Probe G: with --save-modules the uniform adapter --eval scores beside the extracted one had no modules_to_save,
    so it was scored with the norms' update removed."""
    import peft
    import transformers
    from safetensors.torch import load_file

    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig
    from tests.train_util import byte_llama_pair

    g = torch.Generator().manual_seed(1)

    def edit(k: str, v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 2 and "embed" not in k and "lm_head" not in k:
            return v + 0.05 * torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v.shape[1], generator=g)
        return v + 0.05 * torch.randn(v.shape, generator=g) if v.ndim == 1 else v  # the norms move

    byte_llama_pair(tmp_path, edit)
    sd = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    res = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "o", plots=False,
                  config=ExtractConfig(rank=2, save_modules=True, eval_text=str(text), eval_seq_len=64, eval_blocks=2))
    udir = Path(res.eval["uniform_adapter"])
    saved = json.loads((tmp_path / "o" / "adapter_config.json").read_text())["modules_to_save"]
    assert saved and json.loads((udir / "adapter_config.json").read_text())["modules_to_save"] == saved
    # merged by PEFT, the uniform adapter's norms are the tuned model's (they were the base's)
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), udir)
    merged = model.merge_and_unload().state_dict()
    norms = [k for k in sd if sd[k].ndim == 1]
    assert norms and all(torch.equal(merged[k], sd[k]) for k in norms)
