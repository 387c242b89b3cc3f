"""Thirtieth round of hostile inputs: recommend's task type for a model that does not generate (docs/bad_inputs.md)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_recommend_of_a_masked_lm_writes_a_config_peft_loads(tmp_path):
    """recommend of a BertForMaskedLM diff wrote task_type CAUSAL_LM: PEFT's get_peft_model then raised
    AttributeError ('BertForMaskedLM' object has no attribute 'prepare_inputs_for_generation'). Now none, PEFT's
    plain PeftModel, with a note; a causal LM keeps CAUSAL_LM."""
    import peft
    import transformers

    import spectra
    from spectra.recommend import recommend

    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=60)
    torch.manual_seed(0)
    base = transformers.BertForMaskedLM(cfg)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for layer in base.bert.encoder.layer:
            layer.attention.self.query.weight += 0.01 * torch.randn(32, 32)
    base.save_pretrained(tmp_path / "tuned")
    spectra.diff(tmp_path / "base", tmp_path / "tuned", out_dir=tmp_path / "d")
    rec = recommend(tmp_path / "d")
    assert rec.config["task_type"] is None
    assert any("BertForMaskedLM" in n and "does not generate" not in n and "needs a model that generates" in n for n in rec.notes)
    keys = peft.LoraConfig.__dataclass_fields__
    model = peft.get_peft_model(transformers.BertForMaskedLM(cfg), peft.LoraConfig(**{k: v for k, v in rec.config.items() if k in keys}))
    x = torch.randint(0, 60, (1, 6))
    assert model(input_ids=x, labels=x).loss.isfinite()
    assert recommend(tmp_path / "d", task_type="CAUSAL_LM").config["task_type"] == "CAUSAL_LM"  # asked for: written as asked
