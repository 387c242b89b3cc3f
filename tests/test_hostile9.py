"""The outside probe's ninth round: inputs that made spectra report numbers for the wrong rows.

Each test fails on the code before the round (ec739b7) and passes now; references are float64
numpy on the stored tensors, split the way the model's own transformers code splits them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _pair(tmp_path, model, tag: str, seed: int = 1):
    """Save ``model`` as base, perturb every 2-D parameter, save as tuned; float64 state dicts of both."""
    base, tuned = tmp_path / f"{tag}_base", tmp_path / f"{tag}_tuned"
    model.save_pretrained(base)
    b = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in model.parameters():
            if prm.ndim == 2:
                prm.add_(0.01 * torch.randn(prm.shape, generator=g))
    model.save_pretrained(tuned)
    t = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    return base, tuned, b, t


def _fro_by_name(base, tuned) -> dict[str, float]:
    import spectra

    return {m.name: m.fro_norm for m in spectra.diff(str(base), str(tuned)).modules}


def test_codegen_qkv_proj_is_four_blocks_of_q_v_k(tmp_path):
    """CodeGen views qkv_proj(x) as (4, 3·local) and splits each block as query, value, key
    (modeling_codegen: ``qkv.view(..., -1, 3 * local_dim).split(local_dim)``); it was cut as three
    row blocks q, k, v, so a q-only update showed up in k and v."""
    import transformers as T

    torch.manual_seed(0)
    model = T.CodeGenForCausalLM(T.CodeGenConfig(vocab_size=64, n_positions=32, n_ctx=32, n_embd=64, n_layer=1,
                                                 n_head=4, rotary_dim=8))
    base, tuned, b, t = _pair(tmp_path, model, "codegen")
    fro = _fro_by_name(base, tuned)
    name = "transformer.h.0.attn.qkv_proj.weight"
    blocks = (t[name] - b[name]).numpy().reshape(4, 3, 16, 64)  # (mp_num, [q, v, k], local, in)
    ref = {"q": blocks[:, 0], "v": blocks[:, 1], "k": blocks[:, 2]}
    for part, M in ref.items():
        assert fro[f"{name}:{part}"] == pytest.approx(np.linalg.norm(M.reshape(64, 64)), rel=1e-6), part


def test_codegen_q_only_update_leaves_k_and_v_unchanged(tmp_path):
    """The same layout seen from a planted update: only the query rows move, k and v stay at 0."""
    import transformers as T

    import spectra

    torch.manual_seed(0)
    model = T.CodeGenForCausalLM(T.CodeGenConfig(vocab_size=64, n_positions=32, n_ctx=32, n_embd=64, n_layer=1,
                                                 n_head=4, rotary_dim=8))
    base, tuned = tmp_path / "b", tmp_path / "t"
    model.save_pretrained(base)
    with torch.no_grad():
        w = model.transformer.h[0].attn.qkv_proj.weight.view(4, 48, 64)
        w[:, :16] += 0.05 * torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(3))
    model.save_pretrained(tuned)
    fro = {m.name: m.fro_norm for m in spectra.diff(str(base), str(tuned)).modules}
    name = "transformer.h.0.attn.qkv_proj.weight"
    assert fro[f"{name}:q"] > 0.1
    assert fro[f"{name}:k"] == 0 and fro[f"{name}:v"] == 0


def test_minimax_linear_attention_qkv_proj_is_per_head(tmp_path):
    """MiniMax's linear-attention layers reshape qkv_proj(x) to (heads, 3·head_dim) and split q, k, v
    per head; with grouped kv heads elsewhere it was cut as blocks "assuming q has `in` rows"."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.MiniMaxConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=64, num_local_experts=2,
                          num_experts_per_tok=1, max_position_embeddings=32)
    model = T.MiniMaxForCausalLM(cfg)
    base, tuned, b, t = _pair(tmp_path, model, "minimax")
    fro = _fro_by_name(base, tuned)
    layer = cfg.layer_types.index("linear_attention")
    name = f"model.layers.{layer}.self_attn.qkv_proj.weight"
    per_head = (t[name] - b[name]).numpy().reshape(4, 3, 16, 64)
    for i, part in enumerate("qkv"):
        assert fro[f"{name}:{part}"] == pytest.approx(np.linalg.norm(per_head[:, i].reshape(64, 64)), rel=1e-6), part


def test_qkv_proj_of_an_unknown_model_type_says_what_was_assumed():
    """A qkv_proj of a model type spectra does not know is split as Phi-3's blocks, with a note."""
    from spectra.naming import ArchInfo, describe_checkpoint

    shapes = {"model.layers.0.attn.qkv_proj.weight": (192, 64)}
    cfg = {"model_type": "newmodel", "num_attention_heads": 4, "hidden_size": 64}
    spec = describe_checkpoint(shapes, ArchInfo.from_config(cfg))["model.layers.0.attn.qkv_proj.weight"]
    assert [p.suffix for p in spec.parts] == ["q", "k", "v"]
    assert "newmodel" in spec.note and "Phi-3" in spec.note
    phi3 = describe_checkpoint(shapes, ArchInfo.from_config({**cfg, "model_type": "phi3"}))["model.layers.0.attn.qkv_proj.weight"]
    assert phi3.note == ""
