"""LoRA adapters on MoE expert stacks (PEFT's ``target_parameters``), read per expert (spectra.param_experts).

The reference is PEFT's own merge (``merge_and_unload``) of the adapter into a transformers Mixtral, whose experts
are 3-D stacks in memory: ΔW of expert e = merged − base, float64 numpy SVD. The base is stored both ways a Mixtral
checkpoint is found: per expert (``block_sparse_moe.experts.e.w1/w2/w3``, what ``save_pretrained`` writes) and as
the in-memory 3-D stacks (``mlp.experts.gate_up_proj`` ``(E, 2I, H)``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra import CompareConfig, DiffConfig, compare, diff, open_checkpoint
from spectra.adapter_diff import STACK_NOT_2D
from spectra.errors import CheckpointFormatError
from spectra.io.adapter import open_adapter
from spectra.param_experts import open_adapter_on
from spectra.peft_moe import peft_moe_rules
from tests.cli_util import cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

_E, _H, _I = 3, 32, 40


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict:
    """A tiny Mixtral saved per expert (``base``) and stacked (``stacked``), a target_parameters adapter on it
    (``adapter``: both expert stacks at r = 2, down_proj at r = 3 by rank_pattern, and q_proj as a module), and
    the merged update per stacked parameter in float64."""
    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=_H, intermediate_size=_I, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=_E, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(root / "base")
    (root / "stacked").mkdir()
    base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base_sd, str(root / "stacked" / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(root / "stacked")
    lc = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], rank_pattern={"down_proj": 3},
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, lc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(root / "adapter")
        merged = pm.merge_and_unload().state_dict()
    delta = {k: (merged[k].double() - base_sd[k].double()).numpy() for k in base_sd if "experts" in k or "q_proj" in k}
    return {"root": root, "delta": delta}


def _sv(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x, compute_uv=False)


def _per_expert_reference(delta: dict) -> dict[str, np.ndarray]:
    """Result name -> ΔW, for the per-expert base (w1 = the gate rows of gate_up_proj, w3 the up rows, w2 = down)."""
    out = {}
    for layer in range(2):
        gu, down = delta[f"model.layers.{layer}.mlp.experts.gate_up_proj"], delta[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(_E):
            stem = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            out[f"{stem}.w1.weight"], out[f"{stem}.w3.weight"], out[f"{stem}.w2.weight"] = gu[e][:_I], gu[e][_I:], down[e]
    return out


def _check(mods: list, ref: dict[str, np.ndarray]) -> None:
    for name, d in ref.items():
        m = mods[name]
        s = _sv(d)
        np.testing.assert_allclose(m.fro_norm, np.linalg.norm(d), rtol=2e-5)
        np.testing.assert_allclose(m.singular_values[:4], s[:4], rtol=1e-4, atol=1e-6 * s[0])
        assert m.energy_rank["0.9"] == int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.9 - 1e-12) + 1)


def test_per_expert_base_gets_each_experts_share_as_peft_merges_it(moe):
    res = diff(str(moe["root"] / "base"), str(moe["root"] / "adapter"), config=DiffConfig(top_k=8))
    mods = {m.name: m for m in res.modules}
    ref = _per_expert_reference(moe["delta"])
    _check(mods, ref)
    assert mods["model.layers.0.block_sparse_moe.experts.1.w2.weight"].lora_r == 3  # rank_pattern matched on module.param
    assert mods["model.layers.0.block_sparse_moe.experts.1.w1.weight"].lora_r == 2
    assert "target_parameters LoRA on model.layers.0.mlp.experts.gate_up_proj, expert 1, rows 0–39" in \
        mods["model.layers.0.block_sparse_moe.experts.1.w1.weight"].note
    assert len([n for n in mods if "experts" in n]) == 2 * 3 * _E and "model.layers.1.self_attn.q_proj.weight" in mods


def test_stacked_base_gets_each_expert_of_each_stack(moe):
    res = diff(str(moe["root"] / "stacked"), str(moe["root"] / "adapter"), config=DiffConfig(top_k=8))
    mods = {m.name: m for m in res.modules}
    ref = {}
    for layer in range(2):
        for e in range(_E):
            stem = f"model.layers.{layer}.mlp.experts"
            gu = moe["delta"][f"{stem}.gate_up_proj"][e]
            ref[f"{stem}.gate_up_proj:e{e}:gate"], ref[f"{stem}.gate_up_proj:e{e}:up"] = gu[:_I], gu[_I:]
            ref[f"{stem}.down_proj:e{e}"] = moe["delta"][f"{stem}.down_proj"][e]
    _check(mods, ref)
    assert mods["model.layers.1.mlp.experts.down_proj:e2"].expert == 2
    assert mods["model.layers.1.mlp.experts.down_proj:e2"].base_fro_norm > 0


def test_without_a_base_the_adapter_is_refused_by_name(moe):
    with pytest.raises(CheckpointFormatError, match="target_parameters.*depends on the base model's layout"):
        open_adapter(moe["root"] / "adapter")
    r = cli(["diff", str(moe["root"] / "adapter"), "--no-plots"])
    assert r.returncode != 0 and "pass the base model" in r.stderr and "Traceback" not in r.stderr


def test_a_base_with_other_experts_is_refused_not_misread(moe, tmp_path):
    """A base with 4 experts per layer: the adapter's r·E rows fit no parameter, and it says so."""
    torch.manual_seed(1)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=_H, intermediate_size=_I, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointFormatError, match=r"fits none of model\.layers\.0\.mlp\.experts's parameters"):
        open_adapter_on(moe["root"] / "adapter", open_checkpoint(str(tmp_path / "other")))


def test_compare_against_the_merged_model_finds_the_same_update(moe, tmp_path):
    """The merged model saved by transformers (per expert again) compared with the adapter: each expert matrix's
    update is the adapter's own, so the subspaces coincide (principal angles 0)."""
    root = moe["root"]
    model = transformers.MixtralForCausalLM.from_pretrained(root / "base")
    merged = peft.PeftModel.from_pretrained(model, root / "adapter").merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged.save_pretrained(tmp_path / "merged")
    res = compare(str(root / "adapter"), str(tmp_path / "merged"), base=str(root / "base"), config=CompareConfig(top_k=4))
    rows = {m.name: m for m in res.modules}
    assert len([n for n in rows if "experts" in n]) == 2 * 3 * _E
    for name, d in _per_expert_reference(moe["delta"]).items():
        m = rows[name]
        assert m.fro_a == pytest.approx(np.linalg.norm(d), rel=1e-5)
        assert m.fro_b == pytest.approx(np.linalg.norm(d), rel=1e-3)  # the merged model is stored in float32
        assert m.captured["b_in_a"].two_sided == pytest.approx(1.0, abs=1e-4)


def test_compare_lists_experts_of_a_stacked_base_as_skipped(moe):
    root = moe["root"]
    res = compare(str(root / "adapter"), str(root / "adapter"), base=str(root / "stacked"))
    skipped = {s["name"]: s["reason"] for s in res.skipped}
    assert skipped["model.layers.0.mlp.experts.gate_up_proj"].endswith(f"({root / 'adapter'}): {STACK_NOT_2D}")
    assert {m.name for m in res.modules} == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def test_extract_resizes_per_expert_loras_and_lists_stacks(moe, tmp_path):
    from spectra.extract import extract
    from spectra.extract_plan import STACK_NOT_WRITTEN, ExtractConfig

    root = moe["root"]
    res = extract(str(root / "stacked"), str(root / "adapter"), tmp_path / "x", config=ExtractConfig(rank=2), plots=False)
    left = {x["name"]: x for x in res.not_extracted}
    stack = left["model.layers.0.mlp.experts.down_proj"]
    assert stack["reason"] == STACK_NOT_WRITTEN and stack["shape"] == [_E, _H, _I]
    assert stack["fro_norm"] == pytest.approx(np.linalg.norm(moe["delta"]["model.layers.0.mlp.experts.down_proj"]), rel=1e-5)
    assert {m["name"] for m in res.modules} == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def test_extract_on_a_per_expert_base_writes_an_adapter_peft_loads_to_the_same_merge(moe, tmp_path):
    """Resized to keep every component (--energy 1.0), the per-expert adapter spectra writes loads in PEFT (which
    converts per-expert Mixtral LoRAs to its fused experts) to the merge of the target_parameters adapter."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    root = moe["root"]
    res = extract(str(root / "base"), str(root / "adapter"), tmp_path / "x", config=ExtractConfig(energy=1.0), plots=False)
    assert res.totals["energy_kept"] == pytest.approx(1.0, abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.MixtralForCausalLM.from_pretrained(root / "base")
        base_sd = {k: v.clone() for k, v in model.state_dict().items()}
        merged = peft.PeftModel.from_pretrained(model, tmp_path / "x").merge_and_unload().state_dict()
    for k, d in moe["delta"].items():
        got = (merged[k].double() - base_sd[k].double()).numpy()
        np.testing.assert_allclose(got, d, atol=1e-5 * np.abs(d).max())


def test_extract_leaves_out_per_expert_loras_peft_would_drop(tmp_path):
    """Qwen2-MoE: transformers >= 5 fuses its experts on load and PEFT < 0.22 converts no per-expert LoRA for it. Resizing
    a target_parameters adapter onto its per-expert checkpoint must not write expert LoRAs that load as nothing (they
    were written, and counted as kept, by the adapter path, which did not ask the MoE rules a full model's path asks).
    PEFT 0.22 converts them: written, and loaded as the original adapter's update."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=_H, intermediate_size=48, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=_E, num_experts_per_tok=2)
    model = transformers.Qwen2MoeForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                                                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        pm.save_pretrained(tmp_path / "adapter")
    res = extract(str(tmp_path / "base"), str(tmp_path / "adapter"), tmp_path / "x", config=ExtractConfig(rank=2), plots=False)
    left = {x["name"]: x["reason"] for x in res.not_extracted}
    if peft_moe_rules("qwen2_moe").experts_dropped:  # PEFT < 0.22
        assert {m["name"] for m in res.modules} == {"model.layers.0.self_attn.q_proj.weight"}
        assert len(left) == 3 * _E and all("PEFT does not convert" in why for why in left.values())
        assert res.totals["energy_kept_all"] < 0.5
        return
    # PEFT 0.22 converts them: every expert written at the global r, and loaded (the rank-2 update is kept whole)
    assert len(res.modules) == 1 + 3 * _E and not left, left
    model = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "base")
    want = {k: v.double() for k, v in peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).merge_and_unload().state_dict().items()}
    model = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "base")
    got = {k: v.double() for k, v in peft.PeftModel.from_pretrained(model, str(tmp_path / "x")).merge_and_unload().state_dict().items()}
    for k in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert torch.allclose(got[k], want[k], atol=1e-5) and not torch.equal(want[k], model.state_dict()[k].double()), k
    assert res.totals["energy_kept_all"] == pytest.approx(1.0, abs=1e-6)


# ---- the twenty-seventh round's probe of this reader (docs/bad_inputs.md): orientation, 2-D parameters, renames ----
def _family(root, cls, cfg, lora: dict) -> dict[str, np.ndarray]:
    """``root/base`` (save_pretrained), ``root/stacked`` (the in-memory state dict), ``root/adapter`` and PEFT's merged
    update per loaded name (float64)."""
    torch.manual_seed(0)
    model = cls(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(root / "base")
        base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        (root / "stacked").mkdir()
        save_file(base_sd, str(root / "stacked" / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(root / "stacked")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
        pm.save_pretrained(root / "adapter")
        merged = pm.merge_and_unload().state_dict()
    return {k: d for k in base_sd if np.abs(d := (merged[k].double() - base_sd[k].double()).numpy()).max() > 0}


def test_llama4_experts_stored_in_out_without_is_transposed(tmp_path):
    """Llama-4's experts are stored (E, in, out) but its module does not say is_transposed: PEFT adds s·B_e·A_e to the
    stored matrix. Square gate_up_proj (hidden 32 = 2 × 16) passed the shape check read the other way round (gate
    ‖ΔW‖ 1.36 where PEFT's merge gives 1.72); the usual shapes were refused as "not for this base"."""
    cfg = transformers.Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=_E, num_experts_per_tok=1,
                                        head_dim=8, interleave_moe_layer_step=1)
    delta = _family(tmp_path, transformers.Llama4ForCausalLM, cfg,
                    dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["feed_forward.experts.gate_up_proj",
                                                                                   "feed_forward.experts.down_proj"]))
    mods = {m.name: m for m in diff(str(tmp_path / "stacked"), str(tmp_path / "adapter"), config=DiffConfig(top_k=4)).modules}
    stem = "model.layers.0.feed_forward.experts"
    for e in range(_E):
        gu = delta[f"{stem}.gate_up_proj"][e].T  # stored (in, out): the update in (out, in)
        for part, d in (("gate", gu[:16]), ("up", gu[16:])):
            np.testing.assert_allclose(mods[f"{stem}.gate_up_proj:e{e}:{part}"].singular_values[:2], _sv(d)[:2], rtol=1e-4)
        np.testing.assert_allclose(mods[f"{stem}.down_proj:e{e}"].fro_norm, np.linalg.norm(delta[f"{stem}.down_proj"][e]), rtol=1e-5)
        assert mods[f"{stem}.gate_up_proj:e{e}:gate"].shape == [16, 32]


def test_a_2d_parameter_takes_its_patterns_on_module_dot_param_and_renamed_names(tmp_path):
    """A router targeted as a parameter (mlp.gate.weight): PEFT matches alpha_pattern on "module.weight" (spectra read
    the module's name: ‖ΔW‖ 1.44 where the merge gives 5.77); and on the per-expert base its stored name is
    block_sparse_moe.gate (transformers renames it on load: "the base checkpoint does not have")."""
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=_H, intermediate_size=_I, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=_E, num_experts_per_tok=2)
    delta = _family(tmp_path, transformers.MixtralForCausalLM, cfg,
                    dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.gate.weight"], alpha_pattern={"gate.weight": 16}))
    ref = np.linalg.norm(delta["model.layers.0.mlp.gate.weight"])
    for base, name in (("stacked", "model.layers.0.mlp.gate.weight"), ("base", "model.layers.0.block_sparse_moe.gate.weight")):
        [m] = diff(str(tmp_path / base), str(tmp_path / "adapter")).modules
        assert m.name == name and m.lora_alpha == 16
        assert m.fro_norm == pytest.approx(ref, rel=1e-5)
    # the same router as a module (target_modules): its loaded name was not found on the per-expert base either
    delta = _family(tmp_path / "m", transformers.MixtralForCausalLM, cfg, dict(r=2, lora_alpha=4, target_modules=["gate"]))
    [m] = diff(str(tmp_path / "m" / "base"), str(tmp_path / "m" / "adapter")).modules
    assert m.name == "model.layers.0.block_sparse_moe.gate.weight"
    assert m.fro_norm == pytest.approx(np.linalg.norm(delta["model.layers.0.mlp.gate.weight"]), rel=1e-5)


def test_granitemoe_stacks_renamed_on_load_and_gpt_oss_bias_loras(tmp_path):
    """GraniteMoE stores its stacks as block_sparse_moe.input_linear.weight (transformers loads them as
    experts.gate_up_proj): "none of them is in the base". gpt-oss with its gate_up_proj_bias targeted too: the whole
    adapter was refused; the bias LoRA is now skipped with why, the stack read."""
    cfg = transformers.GraniteMoeConfig(vocab_size=64, hidden_size=_H, intermediate_size=_I, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, num_local_experts=_E, num_experts_per_tok=2)
    delta = _family(tmp_path / "g", transformers.GraniteMoeForCausalLM, cfg,
                    dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["block_sparse_moe.experts.down_proj"]))
    mods = {m.name: m for m in diff(str(tmp_path / "g" / "base"), str(tmp_path / "g" / "adapter")).modules}
    d = delta["model.layers.0.block_sparse_moe.experts.down_proj"]
    assert sorted(mods) == [f"model.layers.0.block_sparse_moe.output_linear.weight:e{e}" for e in range(_E)]
    for e in range(_E):
        assert mods[f"model.layers.0.block_sparse_moe.output_linear.weight:e{e}"].fro_norm == pytest.approx(np.linalg.norm(d[e]), rel=1e-5)
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=_H, intermediate_size=_I, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, num_local_experts=_E, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"])
    delta = _family(tmp_path / "o", transformers.GptOssForCausalLM, cfg,
                    dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias"]))
    res = diff(str(tmp_path / "o" / "stacked"), str(tmp_path / "o" / "adapter"))
    assert len(res.modules) == 2 * _E and any("bias parameter model.layers.0.mlp.experts.gate_up_proj_bias" in s["reason"] for s in res.skipped)
    gu = delta["model.layers.0.mlp.experts.gate_up_proj"][1].T  # stored (in, out), interleaved gate/up columns
    rows = {m.name: m for m in res.modules}
    assert rows["model.layers.0.mlp.experts.gate_up_proj:e1:gate"].fro_norm == pytest.approx(np.linalg.norm(gu[0::2]), rel=1e-5)


def test_a_module_lora_named_like_a_target_parameter_stays_a_module_lora(tmp_path):
    """The review: target_parameters=["down_proj"] beside target_modules=["down_proj"] on Qwen2-MoE: the shared expert's
    Linear down_proj (which holds no parameter down_proj) was read as a parameter LoRA and the adapter refused."""
    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=_H, intermediate_size=_I, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=_E, num_experts_per_tok=2)
    delta = _family(tmp_path, transformers.Qwen2MoeForCausalLM, cfg,
                    dict(r=2, lora_alpha=4, target_modules=["down_proj"], target_parameters=["down_proj"]))
    mods = {m.name: m for m in diff(str(tmp_path / "base"), str(tmp_path / "adapter")).modules}
    shared = "model.layers.0.mlp.shared_expert.down_proj.weight"
    assert mods[shared].fro_norm == pytest.approx(np.linalg.norm(delta[shared]), rel=1e-5)
    for e in range(_E):
        ref = np.linalg.norm(delta["model.layers.0.mlp.experts.down_proj"][e])
        assert mods[f"model.layers.0.mlp.experts.{e}.down_proj.weight"].fro_norm == pytest.approx(ref, rel=1e-5)
    from spectra.inspection import inspect_adapter

    records, other = inspect_adapter(str(tmp_path / "adapter"))  # no base: the parameter LoRA listed as stored
    assert [r["name"] for r in records] == [shared]
    assert any("a target_parameters LoRA on model.layers.0.mlp.experts (down_proj), A (6, 24)" in o for o in other)
