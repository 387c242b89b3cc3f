"""Thirty-eighth round: one rule for which base tensor a tuned tensor outside the analysed matrices compares with
(docs/bad_inputs.md, "thirty-eighth round")."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from spectra import open_checkpoint
from spectra.stored_bytes import base_lookup, changed_tensors


def test_an_ambiguous_pairing_key_pairs_nothing_as_in_pairing(tmp_path):
    # two base tensors share the key layers.0.norm (with and without "model."): pairing pairs neither with a tuned
    # tensor of a third spelling, and the changed-tensor check (diff's, extract's) used to take the first of them
    base = {"model.layers.0.norm.weight": torch.ones(4), "layers.0.norm.weight": torch.full((4,), 2.0),
            "model.layers.0.mlp.weight": torch.ones(3, 4)}
    tuned = {"base_model.model.model.layers.0.norm.weight": torch.ones(4),  # equal to the first, not the second
             "base_model.model.model.layers.0.mlp.weight": torch.full((3, 4), 5.0)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    b, t = open_checkpoint(tmp_path / "b.safetensors"), open_checkpoint(tmp_path / "t.safetensors")
    lookup = base_lookup(b, t)
    assert lookup("base_model.model.model.layers.0.norm.weight") is None  # two candidates: none
    assert lookup("base_model.model.model.layers.0.mlp.weight") == "model.layers.0.mlp.weight"  # one candidate
    assert lookup("model.layers.9.mlp.weight") is None
    assert changed_tensors(b, t, list(t.tensors)) == ["base_model.model.model.layers.0.mlp.weight"]


def test_an_encoders_prefix_on_one_side_pairs_the_tensors_pairing_pairs(tmp_path):
    # deberta.encoder… against a headless encoder…: pairing drops the prefix for the matrices; the changed-tensor
    # check (a changed LayerNorm beside unchanged matrices) used the wrapper-prefix keys alone and found no base for it
    ln, w = "encoder.layer.0.attention.output.LayerNorm.weight", "encoder.layer.0.attention.output.dense.weight"
    save_file({"deberta." + ln: torch.ones(4), "deberta." + w: torch.eye(4)}, str(tmp_path / "b.safetensors"))
    save_file({ln: torch.full((4,), 2.0), w: torch.eye(4)}, str(tmp_path / "t.safetensors"))
    b, t = open_checkpoint(tmp_path / "b.safetensors"), open_checkpoint(tmp_path / "t.safetensors")
    assert base_lookup(b, t)(ln) == "deberta." + ln and changed_tensors(b, t, [ln, w]) == [ln]


def test_a_resume_refused_for_an_edited_config_names_that_file_not_the_weights(tmp_path):
    import json

    from tests.cli_util import cli

    g = torch.Generator().manual_seed(0)
    for side in ("b", "t"):
        (tmp_path / side).mkdir()
        save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(24, 16, generator=g) for i in range(2)},
                  str(tmp_path / side / "model.safetensors"))
        (tmp_path / side / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    b, t, out = str(tmp_path / "b"), str(tmp_path / "t"), str(tmp_path / "o")
    assert cli(["diff", b, t, "--out", out, "--no-plots"]).returncode == 0
    (tmp_path / "t" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "head_dim": 4}))
    run = cli(["diff", b, t, "--out", out, "--no-plots", "--resume"])
    said = " ".join(run.stderr.split())
    assert run.returncode != 0 and "config.json of tuned changed since" in said and "model.safetensors" not in said, said
    # config.json put back, the weights rewritten and config.json edited again: both named
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(24, 16, generator=g) for i in range(2)},
              str(tmp_path / "t" / "model.safetensors"))
    run = cli(["diff", b, t, "--out", out, "--no-plots", "--resume"])
    said = " ".join(run.stderr.split())
    assert run.returncode != 0 and "config.json and the weights (content, size" in said and "of tuned changed since" in said, said
    (tmp_path / "t" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))  # as at the start
    run = cli(["diff", b, t, "--out", out, "--no-plots", "--resume"])
    said = " ".join(run.stderr.split())
    assert run.returncode != 0 and "tuned changed since (content, size" in said and "config.json" not in said, said
    # the other commands' journals alike (esd's header keeps each input's deciding files)
    assert cli(["esd", t, "--out", str(tmp_path / "e"), "--no-plots"]).returncode == 0
    (tmp_path / "t" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "head_dim": 8}))
    run = cli(["esd", t, "--out", str(tmp_path / "e"), "--no-plots", "--resume"])
    said = " ".join(run.stderr.split())
    assert run.returncode != 0 and "config.json of input changed since" in said, said


def test_switch_transformers_wi_is_an_up_and_modernbert_wi_gated():
    from spectra.layouts import ArchInfo
    from spectra.naming import describe_checkpoint, describe_updates

    # Switch Transformers' dense mlp.wi is wo(act(wi(x))): one up projection, not ModernBERT's gated Wi
    d = describe_updates({"encoder.block.0.layer.1.mlp.wi.weight": (48, 32), "model.layers.0.mlp.Wi.weight": (96, 32)})
    assert d["encoder.block.0.layer.1.mlp.wi.weight"].role == "up" and len(d["encoder.block.0.layer.1.mlp.wi.weight"].parts) == 1
    assert [p.suffix for p in d["model.layers.0.mlp.Wi.weight"].parts] == ["gate", "up"]
    sw = describe_checkpoint({"encoder.block.0.layer.1.mlp.wi.weight": (96, 32)},
                             ArchInfo.from_config({"model_type": "switch_transformers", "d_model": 32}))
    assert sw["encoder.block.0.layer.1.mlp.wi.weight"].role == "up"
    for mt in ("modernbert", "modernbert-decoder"):  # a lower-case export of ModernBERT, told by its config
        mb = describe_checkpoint({"model.layers.0.mlp.wi.weight": (96, 32)}, ArchInfo.from_config({"model_type": mt, "hidden_size": 32}))
        assert [p.suffix for p in mb["model.layers.0.mlp.wi.weight"].parts] == ["gate", "up"]


def test_a_grouped_query_vision_qkv_splits_by_its_head_counts():
    from spectra.layouts import ArchInfo
    from spectra.naming import describe_checkpoint

    # EXAONE 4.5's vision attention: qkv(x).split([heads·d, kv·d, kv·d]) with 6 heads and 3 kv heads of 8
    cfg = {"model_type": "exaone4_5", "text_config": {"model_type": "exaone4", "hidden_size": 32, "num_attention_heads": 4},
           "vision_config": {"hidden_size": 48, "num_heads": 6, "num_key_value_heads": 3}}
    name = "model.visual.blocks.0.attn.qkv.weight"
    d = describe_checkpoint({name: (96, 48)}, ArchInfo.from_config(cfg))
    assert [(p.suffix, p.rows[0].item(), p.rows.numel()) for p in d[name].parts] == [("q", 0, 48), ("k", 48, 24), ("v", 72, 24)]
    odd = describe_checkpoint({name: (100, 48)}, ArchInfo.from_config(cfg))  # not (6 + 2·3)·d rows: whole, said why
    assert len(odd[name].parts) == 1 and "kv heads 3" in odd[name].note
    plain = describe_checkpoint({name: (144, 48)}, ArchInfo.from_config({"vision_config": {"num_heads": 6}}))  # ViT: 3 equal
    assert [p.rows.numel() for p in plain[name].parts] == [48, 48, 48] and not plain[name].note
    # grouped-query vision heads, a path not named as the tower's: thirds, said
    other = describe_checkpoint({"image_encoder.blocks.0.attn.qkv.weight": (96, 48)}, ArchInfo.from_config(cfg))
    assert len(other["image_encoder.blocks.0.attn.qkv.weight"].parts) == 3
    assert "6 heads and 3 kv heads" in other["image_encoder.blocks.0.attn.qkv.weight"].note


def test_deepseek_latent_attention_columns_follow_the_data_flow():
    from spectra.roles import part_role, role_sort_key

    mods = [("q", "self_attn.q_b_proj"), ("kv", "self_attn.kv_b_proj:k"), ("kv", "self_attn.kv_b_proj:v"),
            ("kv_a", "self_attn.kv_a_proj_with_mqa"), ("q_a", "self_attn.q_a_proj"), ("o", "self_attn.o_proj")]
    order = [m for r, m in sorted(mods, key=lambda x: role_sort_key(part_role(x[0], x[1]), x[1]))]
    assert order == ["self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj:k",
                     "self_attn.kv_b_proj:v", "self_attn.o_proj"]
