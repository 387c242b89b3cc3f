"""Round 29, architectures beyond decoder-only stacks (docs/bad_inputs.md, "twenty-ninth round"): tied weights saved
whole by ``torch.save`` (T5: one embedding under four names), a tied head beside an embedding named ``embeddings``
(Mamba), several stacks of layers in the depth finding (encoder and decoder), and roles of RWKV and DeBERTa."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from spectra import diff
from spectra.findings import diff_findings
from spectra.naming import describe_checkpoint


def _low_rank(shape, rank, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(rank, shape[1], generator=g,
                                                                                                 dtype=torch.float64)


@pytest.fixture(scope="module")
def t5_bin(tmp_path_factory):
    """A T5 base and a fine-tune (a rank-2 change of the shared embedding, a rank-3 change of one q), each saved with
    ``torch.save(model.state_dict())``, which keeps the embedding shared by shared, both embed_tokens and lm_head."""
    root = tmp_path_factory.mktemp("t5bin")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(cfg)
    deltas = {"shared.weight": _low_rank((64, 16), 2, 1), "encoder.block.1.layer.0.SelfAttention.q.weight": _low_rank((8, 16), 3, 2)}
    for side in ("base", "tuned"):
        (root / side).mkdir()
        model.config.save_pretrained(root / side)
        sd = model.state_dict()
        assert sd["shared.weight"].data_ptr() == sd["encoder.embed_tokens.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
        torch.save(sd, root / side / "pytorch_model.bin")
        if side == "base":
            with torch.no_grad():
                for name, d in deltas.items():
                    model.get_parameter(name).add_(d.float())
    return root, deltas


def test_tied_weights_saved_whole_are_measured_once(t5_bin):
    # the one embedding's update was four rows (shared, encoder.embed_tokens, decoder.embed_tokens, lm_head), no word
    root, deltas = t5_bin
    res = diff(root / "base", root / "tuned")
    tied = [m for m in res.modules if m.name.endswith(("shared.weight", "embed_tokens.weight", "lm_head.weight"))]
    assert [m.name for m in tied] == ["shared.weight"]
    tuned = torch.load(root / "tuned" / "pytorch_model.bin", weights_only=True)
    base = torch.load(root / "base" / "pytorch_model.bin", weights_only=True)
    want = np.linalg.norm((tuned["shared.weight"].double() - base["shared.weight"].double()).numpy())
    assert tied[0].fro_norm == pytest.approx(want, rel=1e-9) and tied[0].energy_rank["0.9"] <= 2
    said = {s["name"]: s["reason"] for s in res.skipped}
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        assert "the same stored tensor as shared.weight (tied weights saved under several names)" in said[name]


def test_extract_of_tied_weights_saved_whole_writes_one_embedding_lora(t5_bin, tmp_path):
    # a LoRA on each of shared and both embed_tokens: PEFT's merge added the one embedding's update three times
    from spectra.extract import ExtractConfig, extract

    root, deltas = t5_bin
    config = ExtractConfig(rank=2, embeddings=True, exclude="relative_attention_bias")
    extract(root / "base", root / "tuned", tmp_path / "ad", config=config, plots=False)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert not any("embed_tokens" in t for t in cfg["target_modules"])
    base = transformers.T5ForConditionalGeneration.from_pretrained(root / "base", torch_dtype=torch.float64)
    before = base.shared.weight.detach().clone()
    merged = peft.PeftModel.from_pretrained(base, tmp_path / "ad").merge_and_unload()
    got = (merged.shared.weight.detach() - before).numpy()
    want = deltas["shared.weight"].numpy()  # rank 2: kept whole, to float32 storage
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_compare_matches_a_lora_on_a_tied_name_with_the_full_update_of_that_tensor(t5_bin, tmp_path):
    # a LoRA on lm_head against a .bin full fine-tune that stores lm_head as the embedding's alias: the full side's
    # lm_head pair was dropped as "measured there", and compare, which matches the two sides by name, compared nothing
    from spectra import compare
    from tests.conftest import random_lora

    root, _ = t5_bin
    base = transformers.T5ForConditionalGeneration.from_pretrained(root / "base")
    random_lora(base, 3, r=2, target_modules=["lm_head", "q"]).save_pretrained(tmp_path / "lora")
    res = compare(tmp_path / "lora", root / "tuned", base=root / "base")
    head = next(m for m in res.modules if m.name.startswith("lm_head"))
    tuned = torch.load(root / "tuned" / "pytorch_model.bin", weights_only=True)
    old = torch.load(root / "base" / "pytorch_model.bin", weights_only=True)
    want = np.linalg.norm((tuned["lm_head.weight"].double() - old["lm_head.weight"].double()).numpy())
    assert head.fro_b == pytest.approx(want, rel=1e-6)


def test_extract_from_a_tied_base_writes_one_lora_per_stored_tensor(t5_bin, tmp_path):
    # a tied .bin base against an untied fine-tune (each embedding name its own update): LoRAs on shared and both
    # embed_tokens, three updates PEFT's merge added into the one stored tensor of the base
    from spectra.extract import ExtractConfig, extract

    root, _ = t5_bin
    sd = torch.load(root / "tuned" / "pytorch_model.bin", weights_only=True)
    g = torch.Generator().manual_seed(7)
    untied = {k: v.clone() + (0.01 * torch.randn(v.shape, generator=g) if k.endswith("embed_tokens.weight") else 0) for k, v in sd.items()}
    (tmp_path / "untied").mkdir()
    (tmp_path / "untied" / "config.json").write_text((root / "tuned" / "config.json").read_text())
    torch.save(untied, tmp_path / "untied" / "pytorch_model.bin")
    res = extract(root / "base", tmp_path / "untied", tmp_path / "ad", plots=False,
                  config=ExtractConfig(rank=2, embeddings=True, exclude="relative_attention_bias"))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "shared" in cfg["target_modules"] and not any("embed_tokens" in t for t in cfg["target_modules"])
    left = {r["name"]: r["reason"] for r in res.not_extracted}
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        assert "the base ties it to shared.weight" in left[name]


def test_a_tied_head_pairs_with_an_embedding_named_embeddings(tmp_path):
    # Mamba's backbone.embeddings had no role: a tuned copy that unties and changes its head had the head listed
    # tuned-only, no warning, and the findings spoke of the one small layer change
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                                   state_size=4, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "base")
    sd = load_file(tmp_path / "base" / "model.safetensors")
    assert "lm_head.weight" not in sd
    dh = _low_rank((64, 16), 3, 5)
    sd["lm_head.weight"] = (sd["backbone.embeddings.weight"].double() + dh).float()
    (tmp_path / "tuned").mkdir()
    save_file(sd, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "tuned" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    res = diff(tmp_path / "base", tmp_path / "tuned")
    head = next(m for m in res.modules if m.name == "lm_head.weight")
    stored = sd["lm_head.weight"].double() - load_file(tmp_path / "base" / "model.safetensors")["backbone.embeddings.weight"].double()
    assert head.fro_norm == pytest.approx(float(np.linalg.norm(stored.numpy())), rel=1e-6)  # ΔW formed in float32
    assert "lm_head.weight" not in res.unmatched["tuned_only"]


def test_the_depth_finding_speaks_of_each_stack(tmp_path):
    # an encoder whose rank needed rises with depth beside a decoder whose rank falls: "the rank needed falls with
    # depth … highest in layer 0" (the decoder's more matrices per layer set the pooled median)
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for stack, kinds, ranks in (("encoder", ("q", "k"), (1, 2, 4, 6, 8, 10)), ("decoder", ("q", "k", "v", "o"), (10, 8, 6, 4, 2, 1))):
        for i, r in enumerate(ranks):
            for kind in kinds:
                name = f"{stack}.block.{i}.layer.0.SelfAttention.{kind}.weight"
                base[name] = torch.randn(32, 32, generator=g)
                tuned[name] = base[name] + _low_rank((32, 32), r, zlib.crc32(f"{stack}.{i}.{kind}".encode()) % 1000).float()
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    depth = next(f for f in diff_findings(diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors")) if f.topic == "depth")
    assert "decoder.block: the rank needed falls with depth (" in depth.text and "encoder.block: the rank needed rises with depth (" in depth.text
    assert depth.text.count(";") == 1 and depth.text.count(":") == 3  # one clause per stack, after the heading
    stacks = depth.numbers["stacks"]
    assert stacks["encoder.block"]["highest_layer"] == 5 and stacks["decoder.block"]["highest_layer"] == 0


def test_roles_of_rwkv_deberta_mamba_and_clip_names():
    # RWKV's MLP read as attention's k and v; DeBERTa-v2's query_proj…, Mamba's embeddings, CLIP's token_embedding had no
    # role (a bare top-level `head` stays without one: timm's classifier is named so as often as RWKV's output head)
    shapes = {"rwkv.blocks.0.feed_forward.key.weight": (64, 16), "rwkv.blocks.0.feed_forward.value.weight": (16, 64),
              "rwkv.blocks.0.attention.key.weight": (16, 16),
              "deberta.encoder.layer.0.attention.self.query_proj.weight": (16, 16),
              "backbone.embeddings.weight": (50, 16), "text_model.embeddings.token_embedding.weight": (50, 16),
              "transformer.tokens_embed.weight": (50, 16), "transformer.positions_embed.weight": (32, 16)}
    specs = describe_checkpoint(shapes)
    roles = {n: specs[n].role for n in shapes}
    assert roles == {"rwkv.blocks.0.feed_forward.key.weight": "up", "rwkv.blocks.0.feed_forward.value.weight": "down",
                     "rwkv.blocks.0.attention.key.weight": "k",
                     "deberta.encoder.layer.0.attention.self.query_proj.weight": "q", "backbone.embeddings.weight": "embed",
                     "text_model.embeddings.token_embedding.weight": "embed", "transformer.tokens_embed.weight": "embed",
                     "transformer.positions_embed.weight": "pos_embed"}


def test_a_wqkv_without_a_config_says_why_it_is_whole(tmp_path):
    # an MPT Wqkv LoRA diffed alone read "wqkv uses a grouped layout" (InternLM2's), where no config said the model type
    g = torch.Generator().manual_seed(0)
    name = "transformer.blocks.0.attn.Wqkv.weight"
    W = torch.randn(96, 32, generator=g)
    save_file({name: W}, str(tmp_path / "b.safetensors"))
    save_file({name: W + 0.1 * torch.randn(96, 32, generator=g)}, str(tmp_path / "t.safetensors"))
    res = diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    assert len(res.modules) == 1 and "no config.json says which" in res.modules[0].note


def test_trace_says_which_tied_names_it_follows_once(t5_bin, tmp_path):
    # trace of tied .bin checkpoints followed the embedding once and said "0 matrices skipped": the other names silent
    from spectra.trace import trace

    root, _ = t5_bin
    for step in (1, 2):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        for f in ("config.json", "pytorch_model.bin"):
            (tmp_path / "run" / f"checkpoint-{step}" / f).write_bytes((root / "tuned" / f).read_bytes())
    res = trace(root / "base", tmp_path / "run")
    said = [w for w in res.warnings if "lm_head.weight is not followed: the same stored tensor as shared.weight" in w]
    assert len(said) == 1 and "checkpoint-1" in said[0] and "checkpoint-2" in said[0]
