"""What changed with PEFT 0.22, checked against the installed PEFT's own loading: the MoE targets it converts (named
without the expert's index), the dense modules it keeps beside them, pattern keys saved in order, and Astra's
initialisation (base-changing, like PiSSA)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra import DiffConfig, diff, peft_releases
from spectra.errors import CheckpointFormatError, ConfigError
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.io.adapter import BASE_CHANGING_INITS, open_adapter
from spectra.io.peft_writer import target_modules
from spectra.peft_moe import PeftMoeRules, peft_moe_rules
from spectra.recommend import recommend
from tests.test_hostile8_moe import _DEEPSEEK, _moe_pair


def test_astra_adapter_is_base_changing(tmp_path):
    """PEFT 0.22's Astra init subtracts s·B₀·A₀ from the base weight: B·A alone is not the update. Its astra_config was
    refused as "a LoRA variant this version of spectra does not know" instead of for what it does."""
    assert "astra" in BASE_CHANGING_INITS
    g = torch.Generator().manual_seed(11)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "init_lora_weights": "astra",
         "astra_config": {"verbose": False, "prune_temp_fields": True}, "peft_version": "0.22.0"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2, generator=g)},
              str(tmp_path / "adapter_model.safetensors"))
    assert open_adapter(tmp_path).config.base_changing_init == "astra"
    with pytest.raises(CheckpointFormatError, match="initialised with astra"):
        spectra.diff(tmp_path, plots=False)


def test_expert_targets_never_carry_the_expert_index():
    """A per-expert module PEFT converts is named by its projection, or as ``…experts.<name>`` (the container as
    transformers loads it) where the name alone would reach a module left out; other modules keep their full path."""
    experts = [f"m.layers.1.block_sparse_moe.experts.{e}.{leaf}" for e in range(2) for leaf in ("w1", "w2")]
    every = ["m.layers.0.mlp.w1", *experts]
    rules = PeftMoeRules("mixtral", converted=frozenset({"w1", "w2"}), renames=((".block_sparse_moe.", ".mlp."),))
    assert target_modules(experts, every, rules) == ["m.layers.1.mlp.experts.w1", "w2"]
    assert target_modules(experts, every) == [*sorted(e for e in experts if e.endswith("w1")), "w2"]
    assert rules.expert_target("m.layers.0.mlp.w1") == "m.layers.0.mlp.w1"
    assert rules.expert_target("m.experts.x.w1") == "m.experts.x.w1"


def test_recommend_on_part_of_an_moe_names_experts_peft_converts(tmp_path):
    """recommend names each measured module in full after --exclude; an expert's full path (…experts.0.gate_proj) is
    dropped by PEFT 0.22, whose conversion renames it to a parameter that does not exist. The LoRA PEFT builds from the
    config must hold the experts and count the parameters recommend says."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base, tuned = _moe_pair(tmp_path, "deepseek_v3", **_DEEPSEEK)
    diff(str(base), str(tuned), out_dir=tmp_path / "d", plots=False, config=DiffConfig(exclude=r"layers\.0\.mlp\."))
    rec = recommend(tmp_path / "d" / "results.json", energy=0.9)
    rules = peft_moe_rules("deepseek_v3")
    assert rules.converted and {r for p, r in rec.ranks.items() if ".experts." in p} == {rec.config["r"]}
    assert not any(".experts.0." in t for t in rec.config["target_modules"]), rec.config["target_modules"]
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**rec.config))
    names = [k for k, _ in model.named_parameters() if "lora_" in k]
    assert any(".experts." in k for k in names) and not any("layers.0.mlp." in k for k in names), names
    assert sum(v.numel() for k, v in model.named_parameters() if "lora_" in k) == rec.params


class _Mha(torch.nn.Module):
    """An nn.MultiheadAttention (in_proj_weight (3·8, 8), out_proj (8, 8)) and a Linear, as CLIP-style towers hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin = torch.nn.MultiheadAttention(8, 2), torch.nn.Linear(8, 8)


def _mha_adapter(tmp_path, peft):
    """``base.safetensors`` and PEFT's LoRA on the attention module itself and on the Linear (random B: a nonzero update)."""
    torch.manual_seed(0)
    model = _Mha()
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["mha", "lin"], init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "ad")


def _merged_delta(tmp_path, peft) -> dict[str, torch.Tensor]:
    """ΔW of each matrix as the installed PEFT merges the adapter (float64)."""
    from safetensors.torch import load_file

    base = load_file(str(tmp_path / "base.safetensors"))
    model = _Mha()
    model.load_state_dict(base)
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "ad")).merge_and_unload().state_dict()
    return {k: merged[k].double() - base[k].double() for k in base if base[k].dim() == 2}


def test_multihead_attention_lora_is_read_as_peft_merges_it(tmp_path):
    """PEFT's LoRA of an nn.MultiheadAttention X stores X.lora_* (on in_proj_weight) and X.base_layer.out_proj.lora_*.
    spectra refused it ("the adapter updates mha, which the base checkpoint does not have") and would have skipped the
    out_proj as untargeted; PEFT before 0.22 applies the out_proj update twice, and 0.22 doubles lora_B of such files."""
    peft = pytest.importorskip("peft")
    _mha_adapter(tmp_path, peft)
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    versions = [saved.get("peft_version")]
    if peft_releases.release(peft.__version__) >= (0, 22):  # a file of an earlier release, as this PEFT loads it
        versions.append("0.21.2")
    for i, version in enumerate(versions):
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**saved, "peft_version": version}))
        truth = _merged_delta(tmp_path, peft)
        res = diff(str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), out_dir=tmp_path / f"o{i}", plots=False)
        got = {m.name: m.fro_norm for m in res.modules}
        qkv = sum(got[f"mha.in_proj_weight:{p}"] ** 2 for p in "qkv") ** 0.5
        assert qkv == pytest.approx(float(truth["mha.in_proj_weight"].norm()), rel=1e-5), version
        assert got["mha.out_proj.weight"] == pytest.approx(float(truth["mha.out_proj.weight"].norm()), rel=1e-5), version
        assert got["lin.weight"] == pytest.approx(float(truth["lin.weight"].norm()), rel=1e-5)
        assert not res.skipped or all("out_proj" not in s.name for s in res.skipped), res.skipped
    # extract cannot write that layout back (out_proj under base_layer at the module's rank): said, not a silent loss
    with pytest.raises(ConfigError, match="nn.MultiheadAttention"):
        extract(str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), tmp_path / "x", config=ExtractConfig(rank=2), plots=False)
    # recommend from the diff: the in_proj_weight, a parameter no module holds as .weight, is said to be left out
    rec = recommend(tmp_path / "o0" / "results.json", energy=0.9)
    assert any("mha.in_proj_weight" in n and "names the attention module" in n for n in rec.notes), rec.notes


def test_recommend_on_some_layers_of_a_mixtral_counts_what_peft_builds(tmp_path):
    """--exclude of layer 0: the config names layer 1's experts as loaded (mlp.experts.w1); PEFT 0.22 builds exactly
    the counted LoRA, PEFT before 0.22 builds one on layer 0's experts too, which a note says."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base, tuned = _moe_pair(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    diff(str(base), str(tuned), out_dir=tmp_path / "d", plots=False, config=DiffConfig(exclude=r"layers\.0\."))
    rec = recommend(tmp_path / "d" / "results.json", energy=0.9)
    assert "model.layers.1.mlp.experts.w1" in rec.config["target_modules"], rec.config["target_modules"]
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**rec.config))
    built = {k: v.numel() for k, v in model.named_parameters() if "lora_" in k}
    layer0 = sum(n for k, n in built.items() if ".layers.0." in k)
    said = any("builds LoRAs on those the diff left out" in n for n in rec.notes)
    assert sum(built.values()) - layer0 == rec.params and bool(layer0) == said == bool(peft_moe_rules("mixtral").retargeted)


def test_extract_of_some_experts_writes_every_expert_peft_stacks(tmp_path):
    """--include of experts 0 and 1 of four: PEFT stacks every expert's LoRA into the fused experts' one, and the adapter
    holding two failed to load (a size mismatch, under PEFT 0.21 and 0.22). The others are written with zero factors:
    it loads, the selected experts take their update and the others none. An adapter holding some experts (written so
    by hand) is resized the same way."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, tuned = _moe_pair(tmp_path, "olmoe", num_experts=4, num_experts_per_tok=2)
    res = extract(str(base), str(tuned), tmp_path / "ad", config=ExtractConfig(energy=0.99, include=r"experts\.[01]\."), plots=False)

    def merged(adapter):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return {k: v.double() for k, v in peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict().items()}

    def sd(path):
        return {k: v.double() for k, v in AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().items()}

    b, t, m = sd(base), sd(tuned), merged(tmp_path / "ad")
    tot = miss = 0.0
    for k in (k for k in b if k.endswith(("experts.gate_up_proj", "experts.down_proj"))):
        d, got = t[k] - b[k], m[k] - b[k]
        tot += float((d[:2] ** 2).sum())
        miss += float(((d[:2] - got[:2]) ** 2).sum())
        assert torch.equal(m[k][2:], b[k][2:]), k  # the experts left out: unchanged
    assert tot > 0 and 1 - miss / tot == pytest.approx(res.totals["energy_kept_all"], abs=2e-4)
    # an adapter of experts 0 and 1 only (the padding removed by hand): resized, it loads as the first one does
    (tmp_path / "some").mkdir()
    stored = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    save_file({k: v for k, v in stored.items() if not any(f".experts.{e}." in k for e in (2, 3))},
              str(tmp_path / "some" / "adapter_model.safetensors"))
    (tmp_path / "some" / "adapter_config.json").write_text((tmp_path / "ad" / "adapter_config.json").read_text())
    extract(str(base), str(tmp_path / "some"), tmp_path / "ad2", config=ExtractConfig(rank=res.adapter["r"]), plots=False)
    m2 = merged(tmp_path / "ad2")
    assert all(torch.allclose(m2[k], m[k], atol=1e-6) for k in m), [k for k in m if not torch.allclose(m2[k], m[k], atol=1e-6)]


def test_recommend_on_some_experts_counts_every_expert_peft_builds(tmp_path):
    """--include of two of four experts: PEFT builds its LoRA on every expert of those layers' fused experts; recommend
    counted the two measured (23,456 parameters where PEFT built 42,272)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base, tuned = _moe_pair(tmp_path, "olmoe", num_experts=4, num_experts_per_tok=2)
    diff(str(base), str(tuned), out_dir=tmp_path / "d", plots=False, config=DiffConfig(include=r"self_attn|experts\.[01]\."))
    rec = recommend(tmp_path / "d" / "results.json", energy=0.9)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**rec.config))
    assert sum(v.numel() for k, v in model.named_parameters() if "lora_" in k) == rec.params
    assert any("the experts the diff did not measure" in n for n in rec.notes), rec.notes
