"""Twenty-third round: PEFT adapters of many kinds (docs/bad_inputs.md, "twenty-third round"): resizing an adapter
whose modules have ranks of their own, LoRA variants whose update is not s·B·A of the stored base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.train_util import byte_llama_pair, corpus_tokens


def _pattern_adapter(root: Path) -> tuple[Path, Path]:
    """A byte-level Llama base and a trained-looking LoRA on q_proj (r = 4) and v_proj (r = 1 by rank_pattern)."""
    import peft
    import transformers

    base, _ = byte_llama_pair(root, lambda name, t: t)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 1})
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root / "adapter")
    return base, root / "adapter"


def test_resizing_an_adapter_with_a_rank_pattern_scores_a_uniform_adapter_within_each_modules_rank(tmp_path):
    """--eval built the uniform baseline at min(u, p) per module: v_proj's rank-1 update has one component, so it
    failed ("needs components that were not kept … rerun with --force"), and --force failed the same way."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    base, adapter = _pattern_adapter(tmp_path)
    text = tmp_path / "eval.txt"
    text.write_bytes(bytes(corpus_tokens(4000).tolist()))
    res = extract(str(base), str(adapter), tmp_path / "ex", plots=False,
                  config=ExtractConfig(energy=1.0, eval_text=str(text), eval_seq_len=32, eval_blocks=4))
    ranks = {m["name"].split(".")[-2]: m["rank"] for m in res.modules}
    assert set(ranks) == {"q_proj", "v_proj"} and max(ranks.values()) == 4
    u = res.eval["uniform_rank"]
    mods = {m["name"]: m for m in res.modules}
    for name, m in mods.items():
        r_own = 1 if "v_proj" in name else 4
        assert m["uniform_rank"] == min(u, r_own)
    # the uniform adapter as written holds those ranks; its parameters are the reported count, within the extracted one's
    sd = load_file(str(Path(res.eval["uniform_adapter"]) / "adapter_model.safetensors"))
    held = {k: v.shape[0] for k, v in sd.items() if "lora_A" in k}
    for k, r in held.items():
        name = k.split(".lora_A")[0].removeprefix("base_model.model.") + ".weight"
        assert r == mods[name]["uniform_rank"], (k, r)
    params = sum(v.numel() for v in sd.values())
    assert params == res.uniform["params"] <= res.totals["params"]
    assert all(np.isfinite(res.eval["loss"][k]) for k in ("base", "tuned", "extracted", "uniform"))


def _tiny(arch: str):
    import transformers

    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, max_position_embeddings=64)
    cfg = (transformers.Qwen2Config(**kw, tie_word_embeddings=True) if arch == "qwen2" else transformers.LlamaConfig(**kw))
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _peft_adapter(root: Path, arch: str, name: str, cfg) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """``root/base`` (a tiny model), ``root/name`` (a PEFT adapter of it, every trainable tensor moved by PEFT's own
    model) and the float64 update PEFT's forward applies to each weight (merged - base)."""
    import peft

    base = root / "base"
    if not base.exists():
        _tiny(arch).save_pretrained(base)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    before = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root / name)
    return base, root / name, before


def test_kasa_and_other_variants_whose_update_is_not_sBA_are_refused(tmp_path):
    """A KaSA adapter (peft_type LORA, kasa_config set: B·diag·A and the base truncated) was read as s·B·A: ‖ΔW‖ 1.757
    against PEFT's merged 1.815, rank 4 of PEFT's 8, exit 0, its lora_diag vectors called saved modules; BD-LoRA's
    compact factors said 'do not chain', as a corrupt file."""
    from peft import LoraConfig
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig

    from tests.cli_util import cli

    base, kasa, _ = _peft_adapter(tmp_path, "llama", "kasa", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                        kasa_config=KasaConfig()))
    _, bd, _ = _peft_adapter(tmp_path, "llama", "bd", LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
        use_bdlora=BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2)))
    for folder, key in ((kasa, "kasa_config"), (bd, "use_bdlora")):
        for args in (["diff", str(base), str(folder)], ["compare", str(folder), str(folder), "--base", str(base)],
                     ["extract", str(base), str(folder), "--rank", "2"], ["interfere", str(folder), str(folder), "--base", str(base)]):
            r = cli([*args, "--out", str(tmp_path / "o")], cwd=tmp_path)
            err = r.stderr.strip().splitlines()
            assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr)
            assert f"{key} is set" in err[-1] and "merge_and_unload" in err[-1] and "adapter_config.json" in err[-1], err[-1]
    # a variant field this version does not know is refused too; a known training-time one is not
    cfg = json.loads((kasa / "adapter_config.json").read_text())
    cfg.pop("kasa_config")
    for key, value, refused in (("use_frobnicate", True, True), ("newvariant_config", {"k": 1}, True),
                                ("velora_config", {"k": 1}, False), ("use_qalora", False, False)):
        (kasa / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        r = cli(["diff", str(base), str(kasa), "--json"], cwd=tmp_path)
        assert (r.returncode == 1 and f"{key} is set" in r.stderr) if refused else r.returncode == 0, (key, r.stderr[-400:])


def test_other_peft_types_say_what_to_do(tmp_path):
    """'peft_type must be LORA' named no way out: a mergeable method is merged and diffed; a prompt-learning one has
    no update at all."""
    from spectra.errors import CheckpointFormatError
    from spectra.io.adapter import AdapterConfig

    for peft_type, hint in (("LOHA", "merge_and_unload"), ("IA3", "merge_and_unload"),
                            ("PROMPT_TUNING", "changes no weight"), ("PREFIX_TUNING", "changes no weight")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 4}))
        with pytest.raises(CheckpointFormatError) as e:
            AdapterConfig.from_file(tmp_path / "adapter_config.json")
        assert f"Got '{peft_type}'" in str(e.value) and hint in str(e.value), str(e.value)


def test_trained_biases_and_variant_tensors_are_named_for_what_they_are(tmp_path):
    """bias='lora_only' saved each adapted layer's trained bias as base_layer.bias: it was called 'copy of the base layer
    saved by PEFT beside an embedding LoRA' (there was none); bias='all' biases and VeLoRA's tensors 'modules_to_save'."""
    from peft import LoraConfig
    from peft.tuners.lora import config as C

    from spectra import diff

    base, biased, before = _peft_adapter(tmp_path, "qwen2", "bias", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                              bias="all"))
    _, velora, _ = _peft_adapter(tmp_path, "qwen2", "velora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                          velora_config=C.VeloraConfig()))
    res = diff(str(base), str(biased))
    reasons = {s["name"].removeprefix("base_model.model."): s["reason"] for s in res.skipped}
    assert set(reasons) >= {"model.layers.0.self_attn.q_proj.base_layer.bias", "model.layers.0.self_attn.k_proj.bias"}, reasons
    for name, why in reasons.items():
        if name.endswith(".bias"):
            assert why.startswith("a bias the adapter trained") and "embedding LoRA" not in why, (name, why)
    # the weight updates are PEFT's: ‖ΔW‖_F of each adapted matrix against its merge in float64
    import peft
    import transformers

    merged = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(biased)).merge_and_unload()
    after = {k: v.detach().double() for k, v in merged.state_dict().items()}
    for m in res.modules:
        assert m.fro_norm == pytest.approx(float(torch.linalg.norm(after[m.name] - before[m.name])), rel=1e-5), m.name
    res = diff(str(base), str(velora))
    extra = [s for s in res.skipped if "lora_velora" in s["name"]]
    assert extra and all(s["reason"].startswith("a LoRA variant's own tensor") for s in extra), res.skipped


def test_a_head_lora_tied_to_the_embedding_is_named_and_eval_scores_it_unmerged(tmp_path):
    """ensure_weight_tying=True saves lm_head's LoRA as the embedding's factors transposed: it was skipped as 'not loaded
    by PEFT: lm_head is not in target_modules' (PEFT does load it), and extract --eval merged the tuned adapter, which
    peft 0.21 applies twice to the shared tensor (logits off by ~6)."""
    import peft
    import transformers
    from peft import LoraConfig

    from spectra import diff
    from spectra.extract_eval import held_out_losses, prepare_eval

    base, tied, before = _peft_adapter(tmp_path, "qwen2", "tied", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                                                             ensure_weight_tying=True))
    res = diff(str(base), str(tied))
    head = [s for s in res.skipped if ".lm_head.lora_" in s["name"]]
    assert len(head) == 2 and all("ties to model.embed_tokens's (ensure_weight_tying" in s["reason"] for s in head), res.skipped
    # the embedding's update is the one PEFT's (unmerged) forward applies: E + s·(B_e A_e)ᵀ, checked on the logits
    emb = next(m for m in res.modules if "embed_tokens" in m.name)
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(tied))
    delta = pm.base_model.model.model.embed_tokens.get_delta_weight("default").double()
    assert emb.fro_norm == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-6)
    text = tmp_path / "eval.txt"
    text.write_bytes(bytes((corpus_tokens(3000) % 64).tolist()))
    data = prepare_eval(str(base), str(tied), str(text), seq_len=16, blocks=2)
    losses = held_out_losses(str(base), str(tied), {}, str(text), seq_len=16, blocks=2, device="cpu", data=data)
    assert losses["scored"]["tuned"].startswith("unmerged (ensure_weight_tying")
    x = data.ids[:, :16]
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(pm(x).logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
    assert losses["loss"]["tuned"] == pytest.approx(float(want), rel=1e-4)


def test_an_activated_lora_is_read_with_a_note(tmp_path):
    """aLoRA (alora_invocation_tokens) was read as a plain update with no word (the review): PEFT applies it only after
    its invocation tokens and cannot merge it."""
    from peft import LoraConfig

    from spectra import diff

    base, alora, before = _peft_adapter(tmp_path, "llama", "alora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                              alora_invocation_tokens=[1, 2]))
    res = diff(str(base), str(alora))
    assert any("an activated LoRA (alora_invocation_tokens)" in w for w in res.warnings), res.warnings
    from safetensors.torch import load_file

    sd = load_file(str(alora / "adapter_model.safetensors"))
    for m in res.modules:  # the update where it applies: s·B·A, float64
        key = "base_model.model." + m.name.removesuffix(".weight")
        dW = 2.0 * sd[key + ".lora_B.weight"].double() @ sd[key + ".lora_A.weight"].double()
        assert m.fro_norm == pytest.approx(float(torch.linalg.norm(dW)), rel=1e-6)
