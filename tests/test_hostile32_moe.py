"""Thirty-second round, MoE models in extract and recommend: a router named ``feed_forward.gate`` and an attention
that transformers splits on load (docs/bad_inputs.md, "thirty-second round")."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tests.cli_util import cli

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
             first_k_dense_replace=1, num_dense_layers=1)


def _pair(root, config_name: str, **extra):
    """A tiny model of ``config_name`` saved as it is (base) and with a rank-2 update on every matrix (full)."""
    config_class = getattr(transformers, config_name, None)
    if config_class is None:
        pytest.skip(f"this transformers has no {config_name}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SMALL, **extra)).float()
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p += 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
    model.save_pretrained(root / "full")
    return root / "base", root / "full"


def test_a_feed_forward_router_is_no_lora_target(tmp_path):
    """LFM2-MoE's router (feed_forward.gate, an Lfm2MoeTopKRouter once loaded) was written as a LoRA target: PEFT refused
    the adapter ("Target module Lfm2MoeTopKRouter() is not supported"), and recommend's LoraConfig the same."""
    base, full = _pair(tmp_path, "Lfm2MoeConfig", layer_types=["full_attention", "full_attention"])
    res = cli(["extract", str(base), str(full), "-r", "2", "-o", str(tmp_path / "x"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    targets = json.loads((tmp_path / "x" / "adapter_config.json").read_text())["target_modules"]
    assert "gate" not in targets and not any(t.endswith(".gate") for t in targets)
    import peft

    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "x")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_a_module_split_on_load_is_refused(tmp_path):
    """Param2-MoE stores attention.query_key_value, which transformers 5 loads split into self_attn.q_proj, k_proj,
    v_proj: extract wrote a LoRA on it that PEFT skipped without a word (energy_kept_all 0.435 claimed, 0.345 loaded)."""
    base, full = _pair(tmp_path, "Param2MoeConfig", num_local_experts=4, n_routed_experts=4, n_group=1, topk_group=1)
    res = cli(["extract", str(base), str(full), "-r", "1", "-o", str(tmp_path / "x"), "--no-plots"])
    if "query_key_value" not in (base / "model.safetensors").read_bytes()[:20000].decode("latin-1"):
        pytest.skip("this transformers saves Param2-MoE's attention split")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    text = " ".join(res.stderr.split())
    assert "that transformers splits on load into others" in text and "--exclude 'query_key_value'" in text
    res = cli(["extract", str(base), str(full), "-r", "1", "-o", str(tmp_path / "x"), "--no-plots", "--force", "--exclude", "query_key_value"])
    assert res.returncode == 0, res.stderr
    assert cli(["diff", str(base), str(full), "--out", str(tmp_path / "d"), "--no-plots"]).returncode == 0
    rec = cli(["recommend", str(tmp_path / "d" / "results.json"), "-o", str(tmp_path / "c.json")])
    assert rec.returncode == 1 and "that transformers splits on load into others" in " ".join(rec.stderr.split()), rec.stderr
