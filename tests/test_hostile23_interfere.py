"""Twenty-third round, ``interfere`` (docs/bad_inputs.md, "twenty-third round"): two LoRAs that cancel exactly, a
DoRA task cut to its top r without a word, ``--side left`` said to be the input side, and "Most alike" for a pair at
chance beside one that pulls the other way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_hostile23_adapters import _peft_adapter


def _negated(src: Path, dst: Path, scale: float = -1.0) -> Path:
    """The adapter ``src`` with every lora_B times ``scale`` (−1: its update is −ΔW)."""
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    t = {k: (scale * v if "lora_B" in k else v) for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(t, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_two_loras_that_cancel_have_a_zero_sum(tmp_path):
    """l4 and l4 with −B: the factored sum's ~1e-16 residue read as a spectrum (energy ranks 1/3/7, effective rank 5.96)."""
    from peft import LoraConfig

    from spectra.interfere import interfere
    from spectra.report_interfere import findings

    base, l4, _ = _peft_adapter(tmp_path, "llama", "l4", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    neg = _negated(l4, tmp_path / "l4neg")
    res = interfere(str(base), [str(l4), str(neg)], out_dir=tmp_path / "o", plots=False)
    assert res.modules
    for m in res.modules:
        assert all(v == 0 for v in m["sum"]["energy_rank"].values()), m["sum"]
        assert "the updates cancel: their sum is zero" in m["note"], m["note"]
        assert m["cosine"][0][1] == pytest.approx(-1.0, abs=1e-12)
    doc = json.loads((tmp_path / "o" / "interfere.json").read_text())
    text = " ".join(f.text for f in findings(tmp_path / "o" / "interfere.json", doc))
    assert "cancels them in every matrix" in text and "strongest direction" not in text, text
    # a small third task beside the two that cancel is the sum, not rounding (the second review: a 1e-10·Σσ₁ cut zeroed it)
    tiny = _negated(l4, tmp_path / "l4tiny", scale=1e-9)
    res = interfere(str(base), [str(l4), str(neg), str(tiny)], plots=False)
    sd = load_file(str(tiny / "adapter_model.safetensors"))
    for m in res.modules:
        assert "cancel" not in m["note"] and m["sum"]["energy_rank"]["0.9"] > 0, m
        key = "base_model.model." + m["name"].removesuffix(".weight")
        S = np.linalg.svd(2.0 * sd[key + ".lora_B.weight"].double().numpy() @ sd[key + ".lora_A.weight"].double().numpy(),
                          compute_uv=False)
        assert m["sum"]["singular_values"][0] == pytest.approx(S[0], rel=1e-4)


def test_a_dora_task_says_its_top_r_directions_stand_for_it(tmp_path):
    from peft import LoraConfig

    from spectra.interfere import interfere

    base, l4, _ = _peft_adapter(tmp_path, "llama", "l4", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    _, dora, _ = _peft_adapter(tmp_path, "llama", "dora", LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    res = interfere(str(base), [str(l4), str(dora)], plots=False)
    import peft
    import transformers

    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(dora))
    for m in res.modules:
        layer = pm.base_model.model.model.layers[m["layer"]].self_attn.q_proj
        W = layer.get_base_layer().weight.detach().double()
        merged = layer.get_base_layer().weight.detach().double().clone()
        with torch.no_grad():
            layer.merge()
            merged = layer.get_base_layer().weight.detach().double()
            layer.unmerge()
        S = np.linalg.svd((merged - W).numpy(), compute_uv=False)
        share = float((S[:2] ** 2).sum() / (S ** 2).sum())
        assert f"its DoRA update is dense: its top 2 directions, {share:.1%} of its energy" in m["note"], m["note"]


def test_side_left_is_named_and_a_pair_at_chance_is_not_most_alike(tmp_path):
    from spectra.interfere import InterfereConfig, interfere
    from spectra.report_interfere import findings, section_html

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(4) for m in ("q_proj", "v_proj")]
    W = {n: torch.randn(48, 48, generator=g) for n in names}
    save_file(W, str(tmp_path / "base.safetensors"))
    tasks = {}
    for t in ("a", "b", "c"):  # unrelated updates
        tasks[t] = {n: w + 0.1 * torch.randn(48, 48, generator=g) for n, w in W.items()}
    tasks["neg"] = {n: 2 * W[n] - tasks["c"][n] for n in names}  # c's update negated
    for t, sd in tasks.items():
        save_file(sd, str(tmp_path / f"{t}.safetensors"))
    paths = [str(tmp_path / f"{t}.safetensors") for t in tasks]
    interfere(str(tmp_path / "base.safetensors"), paths, config=InterfereConfig(side="left"), out_dir=tmp_path / "o", plots=False)
    doc = json.loads((tmp_path / "o" / "interfere.json").read_text())
    text = next(f.text for f in findings(tmp_path / "o" / "interfere.json", doc) if f.topic == "modules")
    assert not text.startswith("Most alike") and text.startswith("No pair is more alike than unrelated updates"), text
    assert "c.safetensors and neg.safetensors pull against each other (median cosine -1.00" in text
    assert "which cancel in a sum" in text and "on the output side" in text
    # opposite but of different sizes: they partly cancel (the second review: -1 does not mean a zero sum)
    save_file({n: W[n] - 0.1 * (tasks["c"][n] - W[n]) for n in names}, str(tmp_path / "neg.safetensors"))
    interfere(str(tmp_path / "base.safetensors"), paths, config=InterfereConfig(side="left"), out_dir=tmp_path / "p", plots=False)
    doc = json.loads((tmp_path / "p" / "interfere.json").read_text())
    text = next(f.text for f in findings(tmp_path / "p" / "interfere.json", doc) if f.topic == "modules")
    assert "which partly cancel in a sum (the smaller's norm is a median 0.10 of the larger's)" in text, text
    assert "output side (--side left)" in section_html(tmp_path / "o" / "interfere.json", doc)
