"""Thirty-third round: architectures beyond decoder LLMs (Mamba, CLIP, ViT, Whisper-like kernels; docs/bad_inputs.md,
"thirty-third round")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import cli
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tuned(base: Path, folder: Path, ends: tuple[str, ...], g: torch.Generator) -> tuple[Path, list[str]]:
    """A copy of the saved ``base`` with a rank-2 update of σ = (3, 1)·0.05 planted on each 2-D weight whose stored name
    (as save_pretrained writes it: transformers 5 saves some models under their legacy names) ends with one of ``ends``."""
    shutil.copytree(base, folder)
    (f,) = folder.glob("*.safetensors")
    sd = load_file(f)
    planted = [k for k in sd if k.endswith(ends) and sd[k].ndim == 2]
    for n in planted:
        out, inp = sd[n].shape
        U, _ = torch.linalg.qr(torch.randn(out, 2, generator=g))
        V, _ = torch.linalg.qr(torch.randn(inp, 2, generator=g))
        sd[n] = (sd[n] + 0.05 * (U * torch.tensor([3.0, 1.0])) @ V.T).contiguous()
    save_file(sd, f, metadata={"format": "pt"})
    return folder, planted


def test_extract_and_recommend_leave_a_mambas_out_proj_out_as_peft_refuses_it(tmp_path):
    """PEFT refuses a LoRA on any module named out_proj (or conv1d) of a Mamba-based model: extract wrote one (exit 0, an
    adapter PeftModel.from_pretrained refused: "Module 'out_proj' is incompatible with Mamba-based models") and
    recommend named it in target_modules. It is left out now with PEFT's reason; the adapter loads and merges to the
    top-2 truncation of the rest."""
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4)
    transformers.MambaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    tuned, planted = _tuned(base, tmp_path / "tuned", ("layers.0.mixer.out_proj.weight", "layers.1.mixer.in_proj.weight"),
                            torch.Generator().manual_seed(1))
    assert len(planted) == 2
    res = cli(["extract", str(base), str(tuned), "-r", "2", "-o", str(tmp_path / "ext"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    cfg_out = json.loads((tmp_path / "ext" / "adapter_config.json").read_text())
    assert "out_proj" not in json.dumps(cfg_out["target_modules"])
    left = {r["name"]: r["reason"] for r in json.loads((tmp_path / "ext" / "extract.json").read_text())["not_extracted"]}
    assert "PEFT refuses a LoRA on any module named out_proj of a mamba model" in left[planted[0]]
    merged = peft.PeftModel.from_pretrained(transformers.MambaForCausalLM.from_pretrained(base), tmp_path / "ext").merge_and_unload()
    W = merged.state_dict()[planted[1]].double().numpy()
    ref = load_file(tuned / "model.safetensors")[planted[1]].double().numpy()  # rank-2 update: its top-2 truncation is itself
    assert np.allclose(W, ref, atol=1e-5)
    res = cli(["diff", str(base), str(tuned), "--out", str(tmp_path / "d"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    res = cli(["recommend", str(tmp_path / "d"), "-o", str(tmp_path / "rec.json")])
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert "out_proj" not in json.dumps(rec["target_modules"]) and "in_proj" in json.dumps(rec["target_modules"])
    peft.get_peft_model(transformers.MambaForCausalLM.from_pretrained(base), peft.LoraConfig(**rec))  # PEFT takes it


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_recommend_writes_a_task_type_peft_can_build_on_models_that_do_not_generate(tmp_path, family):
    """recommend wrote task_type CAUSAL_LM for CLIPModel and ViTForImageClassification: get_peft_model raised
    "'CLIPModel' object has no attribute 'prepare_inputs_for_generation'". It writes what extract writes now."""
    torch.manual_seed(0)
    if family == "clip":
        cfg = transformers.CLIPConfig(
            text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=16),
            vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                               patch_size=8), projection_dim=24)
        cls, ends = transformers.CLIPModel, ("text_model.encoder.layers.0.self_attn.q_proj.weight",)
    else:
        cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                                     patch_size=8, num_labels=5)
        cls, ends = transformers.ViTForImageClassification, ("layer.0.attention.attention.query.weight", "layers.0.attention.q_proj.weight")
    cls(cfg).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    tuned, planted = _tuned(base, tmp_path / "tuned", ends, torch.Generator().manual_seed(1))
    assert len(planted) == 1
    res = cli(["diff", str(base), str(tuned), "--out", str(tmp_path / "d"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    res = cli(["recommend", str(tmp_path / "d"), "-o", str(tmp_path / "rec.json")])
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["task_type"] == ("FEATURE_EXTRACTION" if family == "clip" else None)
    peft.get_peft_model(cls.from_pretrained(base), peft.LoraConfig(**rec))


def test_diff_says_a_changed_kernel_holds_most_of_the_update_and_skips_a_mambas_A_log(tmp_path):
    """A Whisper-like conv kernel (3-D) holding 80% of ΔW's energy was skipped as "3-D tensor, not a weight matrix" with
    no word that it changed (extract said it); a Mamba's A_log was given a rank and a place in the findings."""
    g = torch.Generator().manual_seed(0)
    base = {"model.encoder.conv1.weight": torch.randn(16, 8, 3, generator=g),
            "model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
            "backbone.layers.0.mixer.A_log": torch.randn(32, 4, generator=g)}
    dk = 0.2 * torch.randn(16, 8, 3, generator=g)
    dq = 0.1 * torch.randn(16, 1, generator=g) @ torch.randn(1, 16, generator=g)
    tuned = {**base, "model.encoder.conv1.weight": base["model.encoder.conv1.weight"] + dk,
             "model.encoder.layers.0.self_attn.q_proj.weight": base["model.encoder.layers.0.self_attn.q_proj.weight"] + dq,
             "backbone.layers.0.mixer.A_log": base["backbone.layers.0.mixer.A_log"] + 0.3}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    res = cli(["diff", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--out", str(tmp_path / "d"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "d" / "results.json").read_text())
    assert [m["name"] for m in out["modules"]] == ["model.encoder.layers.0.self_attn.q_proj.weight"]
    skipped = {s["name"]: s["reason"] for s in out["skipped"]}
    assert "A_log" in skipped["backbone.layers.0.mixer.A_log"] and "not a linear map" in skipped["backbone.layers.0.mixer.A_log"]
    ek, eq = float((dk.double() ** 2).sum()), float(((tuned["model.encoder.layers.0.self_attn.q_proj.weight"].double()
                                                      - base["model.encoder.layers.0.self_attn.q_proj.weight"].double()) ** 2).sum())
    hit = [w for w in out["warnings"] if "of three or more dimensions changed" in w]
    assert len(hit) == 1 and "model.encoder.conv1.weight" in hit[0], out["warnings"]
    assert f"{ek / (ek + eq):.1%} of the update's energy" in hit[0]


def test_the_depth_finding_names_a_stack_changed_in_one_layer(tmp_path):
    """T5 with updates in encoder layer 1 and decoder layers 1 and 2: the depth finding listed the decoder alone (a stack
    needed two layers), as if the encoder had not changed."""
    g = torch.Generator().manual_seed(0)
    names = ["encoder.block.1.layer.0.SelfAttention.q.weight", "decoder.block.1.layer.0.SelfAttention.q.weight",
             "decoder.block.2.layer.0.SelfAttention.q.weight"]
    base = {n: torch.randn(16, 16, generator=g) for n in names}
    save_file(base, tmp_path / "b.safetensors")
    save_file({n: w + 0.1 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for n, w in base.items()},
              tmp_path / "t.safetensors")
    res = cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "d"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "d" / "results.json").read_text())
    ranks = {m["name"]: m["energy_rank_frac"]["0.9"] for m in out["modules"]}
    line = next(x for x in res.stdout.splitlines() if "Along the depth" in x)
    assert f"encoder.block: only layer 1 {ranks[names[0]]:.2f}" in line and "decoder.block: layer 1" in line


def test_a_vision_language_decoder_gets_causal_lm_and_an_encoder_decoder_seq2seq():
    """…ForConditionalGeneration was SEQ_2_SEQ_LM for every class: LLaVA, Qwen2-VL and Gemma 3 are decoders (their saved
    config.json holds no is_encoder_decoder), on which PEFT's seq2seq class feeds decoder inputs; T5 saves it true."""
    from spectra.io.peft_writer import task_type_for

    assert task_type_for({"architectures": ["LlavaForConditionalGeneration"]}) == "CAUSAL_LM"
    assert task_type_for({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}) == "SEQ_2_SEQ_LM"
    for cls in (transformers.T5Config, transformers.BartConfig, transformers.WhisperConfig):
        saved = cls().to_diff_dict()  # what save_pretrained writes
        assert task_type_for({**saved, "architectures": ["XForConditionalGeneration"]}) == "SEQ_2_SEQ_LM"
