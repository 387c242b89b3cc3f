"""Thirty-seventh round: DeepSeek-V2/V3's multi-head latent attention (``q_a_proj``, ``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``) labelled, and ``kv_b_proj`` split into its per-head k and v rows
(docs/bad_inputs.md, "thirty-seventh round")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import reference_energy_rank, svd64

transformers = pytest.importorskip("transformers")

HEADS, NOPE, ROPE, VD, KV_RANK, Q_RANK = 4, 6, 4, 5, 8, 16


def _deepseek_config():
    return transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=Q_RANK, kv_lora_rank=KV_RANK,
        qk_rope_head_dim=ROPE, qk_nope_head_dim=NOPE, v_head_dim=VD, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)


def test_latent_attention_roles_and_kv_b_split_from_config():
    from spectra.layouts import ArchInfo
    from spectra.naming import describe_checkpoint

    arch = ArchInfo.from_config(_deepseek_config().to_dict())
    assert (arch.qk_nope_head_dim, arch.v_head_dim) == (NOPE, VD)
    pre = "model.layers.0.self_attn."
    d = describe_checkpoint({pre + "q_a_proj.weight": (Q_RANK, 32), pre + "q_b_proj.weight": (HEADS * (NOPE + ROPE), Q_RANK),
                             pre + "kv_a_proj_with_mqa.weight": (KV_RANK + ROPE, 32),
                             pre + "kv_b_proj.weight": (HEADS * (NOPE + VD), KV_RANK), pre + "o_proj.weight": (32, HEADS * VD)},
                            arch)
    assert {k.split(".")[-2]: v.role for k, v in d.items()} == {
        "q_a_proj": "q_a", "q_b_proj": "q", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv", "o_proj": "o"}
    kv = d[pre + "kv_b_proj.weight"]
    rows = np.arange(HEADS * (NOPE + VD)).reshape(HEADS, NOPE + VD)  # kv_b(c).view(…, heads, nope + v).split([nope, v])
    assert [p.suffix for p in kv.parts] == ["k", "v"]
    assert kv.parts[0].rows.tolist() == rows[:, :NOPE].reshape(-1).tolist()
    assert kv.parts[1].rows.tolist() == rows[:, NOPE:].reshape(-1).tolist()
    # without the config's head sizes the matrix is left whole, and the note says what would split it
    bare = describe_checkpoint({pre + "kv_b_proj.weight": (HEADS * (NOPE + VD), KV_RANK)})[pre + "kv_b_proj.weight"]
    assert [p.suffix for p in bare.parts] == [""] and "qk_nope_head_dim" in bare.note
    wrong = describe_checkpoint({pre + "kv_b_proj.weight": (HEADS * (NOPE + VD) + 1, KV_RANK)}, arch)[pre + "kv_b_proj.weight"]
    assert [p.suffix for p in wrong.parts] == [""] and "left unsplit" in wrong.note


def test_deepseek_v3_update_of_the_values_lands_in_kv_b_proj_v(tmp_path):
    from tests.cli_util import cli

    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(_deepseek_config())
    model.save_pretrained(tmp_path / "base")
    v_rows = torch.arange(HEADS * (NOPE + VD)).view(HEADS, NOPE + VD)[:, NOPE:].reshape(-1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = model.model.layers[0].self_attn.kv_b_proj.weight
        before = w.detach().clone()
        w[v_rows] += 0.01 * torch.randn(len(v_rows), 2, generator=g) @ torch.randn(2, KV_RANK, generator=g)
        stored = w[v_rows].detach().double() - before[v_rows].double()
    model.save_pretrained(tmp_path / "tuned")
    run = cli(["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(tmp_path / "o"), "--no-plots"])
    assert run.returncode == 0, run.stderr
    mods = {m["name"]: m for m in json.loads((tmp_path / "o" / "results.json").read_text())["modules"]}
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    v, k = mods[f"{name}:v"], mods[f"{name}:k"]
    S = svd64(stored)
    assert v["role"] == "v" and k["role"] == "k" and k["fro_norm"] == 0.0
    assert v["fro_norm"] == pytest.approx(float(np.sqrt(np.sum(S**2))), rel=1e-6)
    ref, clear = reference_energy_rank(S, 0.9)
    assert clear and v["energy_rank"]["0.9"] == ref == 2
    assert mods["model.layers.0.self_attn.q_a_proj.weight"]["role"] == "q_a"
    assert mods["model.layers.0.self_attn.q_b_proj.weight"]["role"] == "q"
