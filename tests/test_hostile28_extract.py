"""Twenty-eighth probe round: extract and recommend (docs/bad_inputs.md, "twenty-eighth round")."""

from __future__ import annotations

import warnings

import pytest
import torch

from spectra import DiffConfig, diff
from spectra.errors import ConfigError
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.recommend import recommend
from tests.pair_util import save_folder

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _phi3(root):
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Phi3ForCausalLM(cfg)
        model.save_pretrained(root / "base")
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.add_(0.05 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]))
        model.save_pretrained(root / "tuned")
    return cfg


def test_recommend_refuses_a_fused_matrix_the_diff_measured_in_part(tmp_path):
    # diff --include ':q$' measured qkv_proj's q rows only: recommend named the whole qkv_proj and priced each
    # component at q's 32 + 32 (640 parameters printed; PEFT built 960, over a budget of 700)
    cfg = _phi3(tmp_path)
    diff(tmp_path / "base", tmp_path / "tuned", config=DiffConfig(include=":q$|o_proj"), out_dir=tmp_path / "part", plots=False)
    with pytest.raises(ConfigError, match=r"only part of the fused matrix model\.layers\.0\.self_attn\.qkv_proj \(q\)"):
        recommend(tmp_path / "part", budget="700")
    # every part measured: priced as PEFT builds it (its own parameter count)
    diff(tmp_path / "base", tmp_path / "tuned", config=DiffConfig(include="qkv_proj|o_proj"), out_dir=tmp_path / "all", plots=False)
    rec = recommend(tmp_path / "all", budget="2000")
    model = transformers.Phi3ForCausalLM(cfg)
    pm = peft.get_peft_model(model, peft.LoraConfig(**{k: v for k, v in rec.config.items() if k != "peft_type"}))
    assert sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n) == rec.params <= 2000


def test_recommend_names_the_matrices_the_diff_skipped(tmp_path):
    # a NaN in one tuned q_proj: the diff skipped it and recommend's config left it out without a word
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(16, 16, generator=g) for i in range(2) for m in ("q_proj", "v_proj")}
    tuned = {k: v + 0.1 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for k, v in base.items()}
    tuned["model.layers.0.self_attn.q_proj.weight"][3, 4] = float("nan")
    save_folder(tmp_path / "b", base)
    save_folder(tmp_path / "t", tuned)
    diff(tmp_path / "b", tmp_path / "t", out_dir=tmp_path / "d", plots=False)
    notes = recommend(tmp_path / "d").notes
    assert any("1 matrix the diff skipped is not in the config (e.g. model.layers.0.self_attn.q_proj.weight: tuned weights contain NaN"
               in n for n in notes), notes


@pytest.mark.parametrize("side", ["base", "tuned"])
def test_extract_warns_of_a_matrix_in_one_checkpoint_only(tmp_path, side):
    # extract said nothing of a layer the fine-tune added (or removed): the names were only in extract.json "unmatched"
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.0.self_attn.{m}.weight": torch.randn(16, 16, generator=g) for m in ("q_proj", "v_proj")}
    tuned = {k: v + 0.1 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for k, v in base.items()}
    extra = "model.layers.0.self_attn.extra_proj.weight"
    (base if side == "base" else tuned)[extra] = torch.randn(16, 16, generator=g)
    save_folder(tmp_path / "b", base)
    save_folder(tmp_path / "t", tuned)
    res = extract(tmp_path / "b", tmp_path / "t", tmp_path / "x", config=ExtractConfig(rank=2), plots=False)
    assert res.unmatched[f"{side}_only"] == [extra]
    assert any(f"1 weight matrix is in one checkpoint only (e.g. {side}-only {extra})" in w for w in res.warnings), res.warnings


# ---- the review of this round's fixes ------------------------------------------------------------------------
@pytest.mark.parametrize("moved", [("base",), ("base", "tuned")])
def test_recommend_accepts_a_fused_matrix_measured_whole_after_the_inputs_moved(tmp_path, moved):
    # the check of the parts refused every qkv_proj (q, k, v) once the base could not be read
    import shutil

    _phi3(tmp_path)
    diff(tmp_path / "base", tmp_path / "tuned", config=DiffConfig(include="layers"), out_dir=tmp_path / "d", plots=False)
    before = recommend(tmp_path / "d", budget="2000")
    for name in moved:
        shutil.move(tmp_path / name, tmp_path / f"{name}_moved")
    assert recommend(tmp_path / "d", budget="2000").params == before.params


def test_recommend_reads_the_task_type_of_a_diffed_adapter_after_its_base_moved(tmp_path):
    import shutil

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = transformers.Qwen2ForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "score" in n and "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "adapter")
    diff(tmp_path / "base", tmp_path / "adapter", out_dir=tmp_path / "d", plots=False)
    shutil.move(tmp_path / "base", tmp_path / "base_moved")
    rec = recommend(tmp_path / "d", budget="2000")
    assert rec.config["task_type"] == "SEQ_CLS" and rec.config["modules_to_save"] == ["score"]


def test_extract_does_not_call_quantisation_scales_or_buffers_matrices_of_one_checkpoint(tmp_path):
    # an fp8 base's weight_scale_inv (2-D float32) and GPT-2's causal-mask buffers h.N.attn.bias (4-D) were warned of
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 256, generator=g) * 0.02
    scale = W.abs().amax() / 448.0
    base = {"model.layers.0.mlp.up_proj.weight": (W / scale).to(torch.float8_e4m3fn),
            "model.layers.0.mlp.up_proj.weight_scale_inv": scale.reshape(1, 1).expand(2, 2).contiguous(),
            "model.layers.0.attn.bias": torch.ones(1, 1, 8, 8)}
    tuned = {"model.layers.0.mlp.up_proj.weight": (W + 0.01 * torch.randn(256, 2, generator=g) @ torch.randn(2, 256, generator=g)).to(torch.bfloat16)}
    save_folder(tmp_path / "b", base)
    save_folder(tmp_path / "t", tuned)
    res = extract(tmp_path / "b", tmp_path / "t", tmp_path / "x", config=ExtractConfig(rank=2), plots=False)
    assert res.unmatched["base_only"] and not any("one checkpoint only" in w for w in res.warnings), res.warnings
