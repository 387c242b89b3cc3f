"""PEFT adapters as inputs: ΔW from the factors equals PEFT's own merge, for every LoRA variant."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import spectra
from spectra.errors import CheckpointFormatError, PairingError
from spectra.io.adapter import open_adapter, pattern_key
from tests.conftest import random_lora, svd64

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny(model_type: str):
    torch.manual_seed(0)
    if model_type == "gpt2":
        cfg = transformers.AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=60, n_positions=32)
    else:
        cfg = transformers.AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=60)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg)


def _make(tmp: Path, model_type: str, **lora_kwargs) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Save a tiny base model and a PEFT adapter with random (non-zero) factors; return the merged weights."""
    cfg, model = _tiny(model_type)
    model.save_pretrained(tmp / "base")
    peft_model = random_lora(model, 1, **lora_kwargs)
    peft_model.save_pretrained(tmp / "adapter")
    merged = peft_model.merge_and_unload().state_dict()
    return tmp / "base", tmp / "adapter", merged


CASES = {
    "patterns": dict(model_type="llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    "rslora": dict(model_type="llama", r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "up_proj"]),
    "embedding": dict(model_type="llama", r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"]),
    "dora": dict(model_type="llama", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj"]),
    "gpt2_fan_in_fan_out": dict(model_type="gpt2", r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_delta_from_adapter_equals_peft_merge(tmp_path, case):
    kwargs = dict(CASES[case])
    model_type = kwargs.pop("model_type")
    base_dir, adapter_dir, merged = _make(tmp_path, model_type, **kwargs)
    base = load_file(str(base_dir / "model.safetensors"))
    adapter = open_adapter(adapter_dir)
    assert adapter.modules
    conv1d = model_type == "gpt2"
    for mod in adapter.modules.values():
        W = base[mod.weight_name].float()
        W_merged = merged[mod.weight_name].float()
        if conv1d:  # GPT-2 Conv1D stores (in, out): compare in (out, in)
            W, W_merged = W.T, W_merged.T
        expected = (W_merged.double() - W.double())
        got = mod.dora_delta(W) if mod.magnitude is not None else mod.dense_delta()
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6 * max(1.0, scale) + 1e-6)
    # the diff's spectra (factored, or dense for DoRA) equal a float64 SVD of PEFT's merged update
    res = spectra.diff(base_dir, adapter_dir)
    by_name = {m.name: m for m in res.modules}
    for mod in adapter.modules.values():
        W = base[mod.weight_name].double()
        W_merged = merged[mod.weight_name].double()
        if conv1d:
            W, W_merged = W.T, W_merged.T
        parts = [m for n, m in by_name.items() if n == mod.weight_name or n.startswith(mod.weight_name + ":")]
        assert parts, mod.weight_name
        if len(parts) == 1:
            ref = svd64(W_merged - W)
            k = len(parts[0].singular_values)
            np.testing.assert_allclose(parts[0].singular_values, ref[:k], rtol=1e-4, atol=1e-6 * ref[0])
            assert parts[0].lora_r == mod.r and parts[0].lora_scale == pytest.approx(mod.scale)
            assert parts[0].rel_norm == pytest.approx(np.linalg.norm((W_merged - W).numpy()) / np.linalg.norm(W.numpy()), rel=1e-4)
        else:  # GPT-2 c_attn: q, k, v row blocks of the (out, in) update
            d = W.shape[0] // 3
            for i, part in enumerate(sorted(parts, key=lambda m: "qkv".index(m.name[-1]))):
                ref = svd64((W_merged - W)[i * d : (i + 1) * d])
                np.testing.assert_allclose(part.singular_values, ref[: len(part.singular_values)], rtol=1e-4, atol=1e-6 * ref[0])


def test_patterns_and_scales(tmp_path):
    _, adapter_dir, _ = _make(tmp_path, **CASES["patterns"])
    adapter = open_adapter(adapter_dir)
    v = adapter.modules["model.layers.0.self_attn.v_proj"]
    q1 = adapter.modules["model.layers.1.self_attn.q_proj"]
    q0 = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert (v.r, v.alpha, v.scale) == (2, 8.0, 4.0)
    assert (q1.r, q1.alpha, q1.scale) == (4, 3.0, 0.75)
    assert (q0.r, q0.alpha, q0.scale) == (4, 8.0, 2.0)
    assert pattern_key({"q_proj": 1}, "model.layers.0.self_attn.qkv_proj") is None  # whole components only
    _, rs_dir, _ = _make(tmp_path / "rs", **CASES["rslora"])
    up = open_adapter(rs_dir).modules["model.layers.0.mlp.up_proj"]
    assert up.scale == pytest.approx(16 / math.sqrt(8))


def test_adapter_alone_and_rank_usage(tmp_path):
    _, adapter_dir, _ = _make(tmp_path, **CASES["patterns"])
    res = spectra.diff(adapter_dir)
    assert res.base is None and res.tuned == str(adapter_dir) and res.adapter["r"] == 4
    for m in res.modules:
        assert m.rel_norm is None and m.base_fro_norm is None
        assert m.energy_rank["0.99"] <= m.lora_r  # a rank-r update never needs more than r
        assert 1.0 <= m.effective_rank <= m.lora_r + 1e-9
        assert m.method == "factored"


def test_adapter_errors(tmp_path):
    _, dora_dir, _ = _make(tmp_path / "d", **CASES["dora"])
    with pytest.raises(CheckpointFormatError, match="DoRA adapter's update depends on the base weights"):
        spectra.diff(dora_dir)
    base_dir, adapter_dir, _ = _make(tmp_path / "p", **CASES["patterns"])
    # an adapter for another base: the module it updates is missing there
    other = load_file(str(base_dir / "model.safetensors"))
    other.pop("model.layers.1.self_attn.v_proj.weight")
    from safetensors.torch import save_file

    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(PairingError, match="the adapter updates model.layers.1.self_attn.v_proj"):
        spectra.diff(tmp_path / "other.safetensors", adapter_dir)
    # PiSSA-initialised adapters are refused: B·A is not the update
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match="initialised with pissa"):
        spectra.diff(base_dir, adapter_dir)
    cfg["init_lora_weights"] = False
    cfg["rank_pattern"] = {"v_proj": 3}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match="gives model.layers.0.self_attn.v_proj rank 3 but its factors have rank 2"):
        open_adapter(adapter_dir)
    cfg["r"] = 0
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match="r must be a positive integer. Got 0 instead"):
        open_adapter(adapter_dir)


def test_compare_says_a_dora_update_is_measured_through_its_top_r(tmp_path):
    """A DoRA update is dense (more than r directions): compare measures its top r and says which share
    of its energy they hold (numpy's SVD of PEFT's merged update)."""
    base_dir, dora_dir, merged = _make(tmp_path, **CASES["dora"])
    res = spectra.compare(str(dora_dir), str(dora_dir), base=str(base_dir), plots=False)
    base = load_file(str(base_dir / "model.safetensors"))
    checked = 0
    for m in res.modules:
        if m.status != "ok":
            continue
        name = f"{m.name}.weight" if not m.name.endswith(".weight") else m.name
        dW = merged[name].double().numpy() - base[name].double().numpy()
        s = np.linalg.svd(dW, compute_uv=False)
        share = float((s[: m.rank_a] ** 2).sum() / (s**2).sum())
        assert share < 1 - 1e-6  # the update has more directions than r
        assert f"A's DoRA update is dense: its top {m.rank_a} directions, {share:.1%} of its energy, are compared" in m.note
        assert "B's DoRA update is dense" in m.note
        checked += 1
    assert checked >= 2
