"""Thirty-fourth round: the review leftovers, pinned (docs/bad_inputs.md, "thirty-fourth round")."""

from __future__ import annotations

import json

import torch
from cli_util import cli
from safetensors.torch import save_file
from test_hostile32_io import init_adapter

from spectra.extract_heads import auto_task_type


def test_a_resized_adapter_keeps_its_own_task_type(tmp_path):
    """extract chose the automatic task type apart from recommend: resizing an adapter took the base's class's type
    (None for a BertForMaskedLM) over the adapter's own FEATURE_EXTRACTION, which recommend kept. One function now
    (extract_heads.auto_task_type): the resized adapter loads as the original did."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g)}, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    ad = init_adapter(tmp_path / "ad", True, g)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "FEATURE_EXTRACTION"}))
    res = cli(["extract", str(tmp_path / "base"), str(ad), "-r", "1", "--out", str(tmp_path / "out"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    written = json.loads(next((tmp_path / "out").rglob("adapter_config.json")).read_text())
    assert written["task_type"] == "FEATURE_EXTRACTION", written
    # the order: a head's type from any side first, then the adapter's own, then the base's class, then the tuned's
    bert, llama = {"architectures": ["BertForMaskedLM"]}, {"architectures": ["LlamaForCausalLM"]}
    assert auto_task_type({"architectures": ["BertForTokenClassification"]}, bert, "CAUSAL_LM") == "TOKEN_CLS"
    assert auto_task_type(llama, bert) is None and auto_task_type(llama, None) == "CAUSAL_LM"
    assert auto_task_type(None, {"architectures": []}) is None
