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
    assert k["role"] == "k" and k["fro_norm"] == pytest.approx(float(np.sqrt(np.sum(S**2))), rel=1e-6)  # ΔW formed in float32
    for tau in ("0.5", "0.9"):
        ref, clear = reference_energy_rank(S, float(tau))
        assert clear and k["energy_rank"][tau] == ref
    assert mods[f"{name}:q"]["fro_norm"] == 0.0 and mods[f"{name}:v"]["fro_norm"] == 0.0
    assert mods["visual.blocks.0.attn.proj.weight"]["role"] == "o"


def test_roles_of_more_families_and_each_part_its_own_role():
    from spectra.layouts import ArchInfo
    from spectra.naming import describe_checkpoint
    from spectra.roles import part_role, role_sort_key

    d = describe_updates({"encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (48, 32),  # T5 gated: act(wi_0) * wi_1
                          "encoder.block.0.layer.1.DenseReluDense.wi_1.weight": (48, 32),
                          "encoder.block.0.layer.1.DenseReluDense.wi.weight": (48, 32),  # T5 (not gated): an up
                          "transformer.h.0.mlp.fc_in.weight": (64, 16), "transformer.h.0.mlp.fc_out.weight": (16, 64),  # GPT-J
                          "model.decoder.embed_positions.weight": (66, 16),  # BART, OPT
                          "rwkv.blocks.0.attention.output.weight": (16, 16),
                          "model.layers.0.mlp.Wi.weight": (96, 32), "model.layers.0.mlp.Wo.weight": (32, 48)})  # ModernBERT
    roles = {k.split(".")[-2]: v.role for k, v in d.items()}
    assert roles == {"wi_0": "gate", "wi_1": "up", "wi": "up", "fc_in": "up", "fc_out": "down", "embed_positions": "pos_embed",
                     "output": "o", "Wi": "gate_up", "Wo": "down"}
    wi = d["model.layers.0.mlp.Wi.weight"]  # input, gate = Wi(x).chunk(2): act(input) * gate, the first half activated
    assert [(p.suffix, p.rows.tolist()) for p in wi.parts] == [("gate", list(range(48))), ("up", list(range(48, 96)))]
    glm = describe_checkpoint({"transformer.encoder.layers.0.mlp.dense_h_to_4h.weight": (96, 32),
                               "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight": (32, 48)},
                              ArchInfo.from_config({"model_type": "chatglm", "num_attention_heads": 4, "multi_query_group_num": 2,
                                                    "hidden_size": 32, "kv_channels": 8, "ffn_hidden_size": 48}))
    up = glm["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"]  # SwiGLU's gate and up, where GPT-NeoX's is an up
    assert up.role == "gate_up" and [p.suffix for p in up.parts] == ["gate", "up"]
    assert part_role("qkv", "c_attn:v", "h.attn.c_attn") == "v" and part_role("gate_up", "gate_up_proj:e2:gate") == "gate"
    assert part_role("qkv", "c_attn:k", "h.crossattention.c_attn") == "cross_k" and part_role("qkv", "c_attn") == "qkv"
    mods = ["c_attn:v", "c_attn:k", "c_attn:q", "c_proj"]  # alphabetically k, q, v
    assert sorted(mods, key=lambda m: role_sort_key("qkv" if ":" in m else "o", m)) == ["c_attn:q", "c_attn:k", "c_attn:v", "c_proj"]


def test_t5_embedding_saved_as_four_copies_is_measured_once(tmp_path):
    from safetensors.torch import save_file

    import spectra

    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu"))
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g) * 0.005
    tied = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]
    for folder, add in (("b", False), ("t", True)):
        (tmp_path / folder).mkdir()
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # safetensors refuses shared tensors
        for k in tied:
            sd[k] = sd[k] + delta if add else sd[k]
        save_file(sd, str(tmp_path / folder / "model.safetensors"))
        model.config.save_pretrained(tmp_path / folder)
    result = spectra.diff(str(tmp_path / "b"), str(tmp_path / "t"), plots=False)
    changed = [m for m in result.modules if m.fro_norm]
    stored = (model.shared.weight.detach() + delta) - model.shared.weight.detach()  # as float32 rounds it
    assert [m.name for m in changed] == ["shared.weight"]  # the table the model owns, not decoder.embed_tokens (stored first)
    assert changed[0].fro_norm == pytest.approx(float(np.linalg.norm(stored.double().numpy())), rel=1e-9)
    skipped = {s["name"]: s["reason"] for s in result.skipped}
    assert {n for n, why in skipped.items() if "the same bytes in both checkpoints" in why} == {
        "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert skipped["lm_head.weight"].startswith("tied to shared.weight (tie_word_embeddings: true)")  # the config says why


def _pair(tmp_path, base: dict, tuned: dict):
    from safetensors.torch import save_file

    for folder, sd in (("b", base), ("t", tuned)):
        (tmp_path / folder).mkdir()
        save_file(sd, str(tmp_path / folder / "model.safetensors"))
    return str(tmp_path / "b"), str(tmp_path / "t")


def test_a_bias_only_fine_tune_is_not_called_the_same_weights(tmp_path):
    from tests.cli_util import cli

    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g), "model.layers.0.mlp.up_proj.bias": torch.randn(8, generator=g),
            "model.layers.0.input_layernorm.weight": torch.ones(4), "patch.weight": torch.randn(4, 3, 2, 2, generator=g)}
    tuned = {**base, "model.layers.0.mlp.up_proj.bias": base["model.layers.0.mlp.up_proj.bias"] + 1}  # BitFit
    b, t = _pair(tmp_path, base, tuned)
    run = cli(["diff", b, t])
    assert run.returncode != 0 and "same weights" not in run.stderr, run.stderr
    assert "1 tensor not analysed differs (e.g. model.layers.0.mlp.up_proj.bias" in run.stderr
    ok = cli(["diff", b, t, "--json", "--allow-identical"])
    skipped = {s["name"]: s["reason"] for s in json.loads(ok.stdout)["skipped"]}  # the unchanged norm and kernel: not named
    assert skipped["model.layers.0.mlp.up_proj.bias"].endswith("; it differs between base and tuned")
    assert not skipped["model.layers.0.input_layernorm.weight"].endswith("differs between base and tuned")
    assert not skipped["patch.weight"].endswith("differs between base and tuned")


def test_a_resized_vocabulary_equal_over_its_shared_rows_is_not_the_same_weights(tmp_path):
    from tests.cli_util import cli

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 4, generator=g)
    base = {"model.embed_tokens.weight": emb, "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g)}
    tuned = {**base, "model.embed_tokens.weight": torch.cat([emb, torch.randn(2, 4, generator=g)])}  # two new tokens
    b, t = _pair(tmp_path, base, tuned)
    run = cli(["diff", b, t])
    assert run.returncode != 0 and "same weights" not in run.stderr, run.stderr
    assert "1 table of another row count holds rows one side alone has (e.g. model.embed_tokens.weight: base 10, tuned 12" in run.stderr


def test_a_conv_lora_is_skipped_with_its_reason_not_a_broken_chain(tmp_path):
    peft = pytest.importorskip("peft")
    import spectra

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16,
                                 patch_size=8)
    torch.manual_seed(0)
    transformers.ViTModel(cfg).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(transformers.ViTModel.from_pretrained(tmp_path / "base"),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["projection", "q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "ad")
    result = spectra.diff(str(tmp_path / "base"), str(tmp_path / "ad"), plots=False)  # was "factors … do not chain", exit 1
    changed = [m.name for m in result.modules if m.fro_norm]  # the attention's query LoRA (saved as query or q_proj)
    assert len(changed) == 1 and "projection" not in changed[0]
    conv = [s for s in result.skipped if "projection" in s["name"]]
    assert conv and all("LoRA on a convolution (lora_A (2, 3, 8, 8), lora_B (32, 2, 1, 1))" in s["reason"] for s in conv)


def test_review_a_cast_copy_is_not_changed_and_a_long_out_name_gets_its_stop_note(tmp_path):
    from safetensors.torch import save_file

    from spectra.io.checkpoint import open_checkpoint
    from spectra.stored_bytes import changed_tensors

    g = torch.Generator().manual_seed(0)
    bias = torch.randn(8, generator=g).to(torch.bfloat16)
    save_file({"m.bias": bias, "m.other": bias.clone()}, str(tmp_path / "b.safetensors"))
    save_file({"m.bias": bias.float(), "m.other": bias.float() + 1}, str(tmp_path / "t.safetensors"))  # a float32 copy
    base, tuned = open_checkpoint(tmp_path / "b.safetensors"), open_checkpoint(tmp_path / "t.safetensors")
    assert changed_tensors(base, tuned, ["m.bias", "m.other", "absent"]) == ["m.other"]  # values decide across dtypes

    from tests.cli_util import cli

    run = cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--out", str(tmp_path / ("x" * 300))])
    assert "Traceback" not in run.stderr and run.returncode != 0, run.stderr  # the stop note's glob raised ENAMETOOLONG


def test_an_untied_head_equal_to_its_embedding_is_measured_on_its_own(tmp_path):
    # regression probe: a separate head (tie_word_embeddings false) whose bytes equal the embedding's was dropped as a
    # copy, and extract's adapter left its update out (PEFT's merge kept the base head: error = the whole ‖ΔW‖)
    from safetensors.torch import save_file

    import spectra

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    g = torch.Generator().manual_seed(1)
    d = torch.randn(64, 1, generator=g) @ torch.randn(1, 32, generator=g) * 0.1
    for folder, add in (("b", False), ("t", True)):
        (tmp_path / folder).mkdir()
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = sd[k] + d if add else sd[k]
        save_file(sd, str(tmp_path / folder / "model.safetensors"))
        cfg.save_pretrained(tmp_path / folder)
    result = spectra.diff(str(tmp_path / "b"), str(tmp_path / "t"), plots=False)
    assert sorted(m.name for m in result.modules if m.fro_norm) == ["lm_head.weight", "model.embed_tokens.weight"]
