"""Thirty-sixth probe round: ViT-style ``attn.qkv`` / ``attn.proj`` (Qwen2-VL's vision tower, timm, InternViT) split
and labelled like the language model's attention (docs/bad_inputs.md, "thirty-sixth round")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spectra.naming import describe_updates
from tests.conftest import reference_energy_rank, svd64

transformers = pytest.importorskip("transformers")


def test_vit_style_qkv_is_three_row_blocks_and_proj_is_o():
    d = describe_updates({"visual.blocks.0.attn.qkv.weight": (96, 32), "visual.blocks.0.attn.proj.weight": (32, 32),
                          "blocks.1.attn.qkv.weight": (100, 32)})
    qkv = d["visual.blocks.0.attn.qkv.weight"]
    assert qkv.role == "qkv" and [p.suffix for p in qkv.parts] == ["q", "k", "v"]
    assert [p.rows.tolist() for p in qkv.parts] == [list(range(0, 32)), list(range(32, 64)), list(range(64, 96))]
    assert d["visual.blocks.0.attn.proj.weight"].role == "o"
    odd = d["blocks.1.attn.qkv.weight"]  # 100 rows: no three equal blocks, left whole and said so
    assert [p.suffix for p in odd.parts] == [""] and "left unsplit" in odd.note


def test_qwen2_vl_vision_qkv_update_lands_in_its_own_part(tmp_path):
    from tests.cli_util import cli

    cfg = transformers.Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, in_channels=3, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2))
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg)
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(32, 3, generator=g) @ torch.diag(torch.tensor([1.0, 0.5, 0.1])) @ torch.randn(3, 32, generator=g) * 0.01
    with torch.no_grad():
        qkv = model.model.visual.blocks[0].attn.qkv.weight
        before = qkv.detach().clone()
        qkv[32:64] += delta  # the key rows only
        stored = qkv[32:64].detach().double() - before[32:64].double()  # ΔW as float32 storage rounds it
    model.save_pretrained(tmp_path / "tuned")
    run = cli(["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(tmp_path / "o"), "--no-plots"])
    assert run.returncode == 0, run.stderr
    mods = {m["name"]: m for m in json.loads((tmp_path / "o" / "results.json").read_text())["modules"]}
    name = "visual.blocks.0.attn.qkv.weight"  # results name modules by pairing key (wrapper prefixes dropped)
    k = mods[f"{name}:k"]
    S = svd64(stored)
    assert k["role"] == "qkv" and k["fro_norm"] == pytest.approx(float(np.sqrt(np.sum(S**2))), rel=1e-6)  # ΔW formed in float32
    for tau in ("0.5", "0.9"):
        ref, clear = reference_energy_rank(S, float(tau))
        assert clear and k["energy_rank"][tau] == ref
    assert mods[f"{name}:q"]["fro_norm"] == 0.0 and mods[f"{name}:v"]["fro_norm"] == 0.0
    assert mods["visual.blocks.0.attn.proj.weight"]["role"] == "o"
