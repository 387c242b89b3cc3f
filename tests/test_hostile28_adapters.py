"""Twenty-eighth probe round: target_parameters adapters and recommend on moved models (docs/bad_inputs.md,
"twenty-eighth round"). References: PEFT's own merge (float64 ΔW per expert)."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from spectra import diff
from spectra.errors import ConfigError
from spectra.recommend import recommend

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

_E, _H, _I = 3, 32, 40


def _mixtral(root):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=_H, intermediate_size=_I, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=_E, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg)
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    (root / "stacked").mkdir()
    save_file(base, str(root / "stacked" / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(root / "stacked")
    return model, base


def test_bare_target_parameters_beside_target_modules_read_as_peft_merges(tmp_path):
    # target_parameters=["gate_up_proj", "down_proj"] (bare names) end every module's path: q_proj's own LoRA was
    # claimed as a parameter LoRA and the adapter refused ("fits none of q_proj's parameters down_proj, gate_up_proj")
    model, base = _mixtral(tmp_path)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                    target_parameters=["gate_up_proj", "down_proj"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "adapter")
        merged = pm.merge_and_unload().state_dict()
    delta = {k: (merged[k].double() - base[k].double()).numpy() for k in base}
    mods = {m.name: m for m in diff(tmp_path / "stacked", tmp_path / "adapter").modules}
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(mods[q].fro_norm, np.linalg.norm(delta[q]), rtol=1e-5)
    gu, down = delta["model.layers.0.mlp.experts.gate_up_proj"], delta["model.layers.0.mlp.experts.down_proj"]
    for e in range(_E):
        parts = [mods[f"model.layers.0.mlp.experts.gate_up_proj:e{e}:{p}"].fro_norm for p in ("gate", "up")]
        np.testing.assert_allclose(np.hypot(*parts), np.linalg.norm(gu[e]), rtol=1e-5)
        np.testing.assert_allclose(mods[f"model.layers.0.mlp.experts.down_proj:e{e}"].fro_norm, np.linalg.norm(down[e]), rtol=1e-5)


def test_a_wrapped_parameter_without_factors_is_listed_not_silently_absent(tmp_path):
    # a file short of one stack's keys (its sibling's still nested under base_layer) was read with "0 skipped"
    model, _ = _mixtral(tmp_path)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                                    init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    kept = {k: v for k, v in tensors.items() if ".base_layer." in k}  # the parameter wrapped first: the other one's keys dropped
    assert kept and len(kept) < len(tensors)
    save_file(kept, str(path))
    res = diff(tmp_path / "stacked", tmp_path / "adapter")
    missing = [s for s in res.skipped if "stores no LoRA factors" in s["reason"]]
    assert len(missing) == 1 and missing[0]["name"].startswith("model.layers.0.mlp.experts."), res.skipped
    assert len(res.modules) == _E * (2 if missing[0]["name"].endswith("down_proj") else 1)


def test_recommend_refuses_to_guess_a_classifiers_task_type_once_the_models_moved(tmp_path):
    # the diff's base and tuned moved: auto fell back to CAUSAL_LM and put the classifier head `score` under a LoRA
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(0.05 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]))
    model.save_pretrained(tmp_path / "tuned")
    diff(tmp_path / "base", tmp_path / "tuned", out_dir=tmp_path / "res", plots=False)
    before = recommend(tmp_path / "res")
    assert before.config["task_type"] == "SEQ_CLS" and "score" not in str(before.config["target_modules"])
    for name in ("base", "tuned"):
        shutil.move(tmp_path / name, tmp_path / f"{name}_moved")
    with pytest.raises(ConfigError, match="score, a classifier's task head"):
        recommend(tmp_path / "res")
    assert recommend(tmp_path / "res", task_type="SEQ_CLS").config == before.config
