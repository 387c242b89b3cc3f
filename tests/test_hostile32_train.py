"""Thirty-second round, training: what a LoRA preset adapts on fused and MoE models, PEFT's target_parameters in the
record, and a base folder holding an adapter (docs/bad_inputs.md, "thirty-second round")."""

from __future__ import annotations

import json

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM

from tests.cli_util import cli
from tests.train_util import base_and_text


def _run(tmp_path, base, data, name: str, *extra: str):
    return cli(["train", "--base", str(base), "--data", str(data), "--steps", "1", "--batch", "2", "--seq-len", "16",
                "--device", "cpu", "--trace-every", "0", "-o", str(tmp_path / name), *extra], cwd=tmp_path)


def test_presets_adapt_fused_projections_and_say_what_they_leave_out(tmp_path):
    """Phi-3's default LoRA adapted o_proj and down_proj only (qkv_proj and gate_up_proj, most of its weights, never);
    on Mixtral --targets all adapted attention alone without a word, and all-linear's target_parameters (the router
    and every expert) were missing from train_config.json."""
    _, data = base_and_text(tmp_path, 4_000)
    torch.manual_seed(0)
    small = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    Phi3ForCausalLM(Phi3Config(**small, pad_token_id=0)).save_pretrained(tmp_path / "phi3")
    MixtralForCausalLM(MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(tmp_path / "mixtral")
    r = _run(tmp_path, tmp_path / "phi3", data, "p")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "p" / "train_config.json").read_text())
    assert set(cfg["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} and cfg["not_adapted"] is None
    assert "were not adapted" not in r.stderr
    r = _run(tmp_path, tmp_path / "mixtral", data, "m")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "m" / "train_config.json").read_text())
    left = cfg["not_adapted"]
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(left["weights"]) and 0.5 < left["share"] < 1
    text = " ".join(r.stderr.split())
    assert "were not adapted: --targets all-linear adapts every linear layer" in text and "mlp.experts.gate_up_proj" in text
    rep = cli(["report", str(tmp_path / "m"), "-o", str(tmp_path / "m.html")], cwd=tmp_path)  # the page says it too
    assert rep.returncode == 0 and "were not adapted" in (tmp_path / "m.html").read_text(), rep.stderr
    r = _run(tmp_path, tmp_path / "mixtral", data, "ml", "--targets", "all-linear")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "ml" / "train_config.json").read_text())
    assert cfg["target_parameters"] and any("gate_up_proj" in p for p in cfg["target_parameters"])
    assert cfg["not_adapted"] is None


def test_a_base_folder_holding_an_adapter_is_refused(tmp_path):
    """transformers loaded the folder's adapter onto the base: a full run failed with "optimizer got an empty parameter
    list" (a traceback), a LoRA run trained on top of it with other random draws, no word."""
    base, data = base_and_text(tmp_path, 4_000)
    (base / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    for method in ("full", "lora"):
        r = _run(tmp_path, base, data, method, "--method", method)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "the base folder holds a PEFT adapter (adapter_config.json) beside the model" in " ".join(r.stderr.split())
        assert not (tmp_path / method).exists()
