"""The fortieth round's probe (docs/bad_inputs.md): PEFT's ``target_parameters`` LoRA of a weight stored ``(in, out)``
(GPT-2's Conv1D), which PEFT adds to the parameter as stored, was read as a module's ``(out, in)`` LoRA: every
direction of the update belonged to the other side (compare and interfere of an adapter against its own merge: φ and
cosine 0.04; extract wrote the transpose, keeping −0.9 of the energy where it claimed 1.0), and a non-square one was
refused as transposed. A checkpoint's tensor of an integer dtype was skipped by trace as "not in this checkpoint"."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from spectra import DiffConfig, diff
from spectra.comparison import compare
from spectra.config import CompareConfig
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.interfere import interfere
from spectra.trace import trace

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _gpt2_param_lora(tmp_path, target: str):
    """A tiny GPT-2, a PEFT target_parameters LoRA of ``target`` (non-zero factors), and PEFT's merge of it."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=[target]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    merged(tmp_path / "base", tmp_path / "adapter").save_pretrained(tmp_path / "merged")
    return tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"


def merged(base, adapter):
    return peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base), str(adapter)).merge_and_unload()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in model.state_dict().items()}


def test_a_square_conv1d_weights_parameter_lora_is_its_merge(tmp_path):
    base, adapter, full = _gpt2_param_lora(tmp_path, "attn.c_proj.weight")
    cmp = compare(str(adapter), str(full), base=str(base), config=CompareConfig(side="both"), plots=False)
    assert cmp.modules
    for m in cmp.modules:
        m = m.to_dict() if hasattr(m, "to_dict") else m
        for side in ("left", "right"):
            assert m["phi"][side]["phi_full"] == pytest.approx(1.0, abs=1e-6), (m["name"], side)
        assert m["captured"]["b_in_a"]["two_sided"] == pytest.approx(1.0, abs=1e-6)
    inter = interfere(str(base), [str(adapter), str(full)], plots=False)
    for m in inter.modules:
        assert m["cosine"][0][1] == pytest.approx(1.0, abs=1e-6), m["name"]
    res = extract(str(base), str(adapter), tmp_path / "ex", config=ExtractConfig(rank=2), plots=False)
    W0, S, E = _state(transformers.GPT2LMHeadModel.from_pretrained(base)), _state(merged(base, adapter)), _state(merged(base, tmp_path / "ex"))
    for m in res.modules:
        D, L = S[m["name"]] - W0[m["name"]], E[m["name"]] - W0[m["name"]]
        assert float(((D - L).norm() / D.norm()) ** 2) < 1e-8 and m["energy_kept"] == pytest.approx(1.0, abs=1e-6), m["name"]


def test_a_non_square_conv1d_weights_parameter_lora_is_read_as_peft_merges_it(tmp_path):
    base, adapter, full = _gpt2_param_lora(tmp_path, "mlp.c_fc.weight")
    res = diff(str(base), str(adapter), out_dir=tmp_path / "d", plots=False, config=DiffConfig(esd=True))
    ref = diff(str(base), str(full), out_dir=tmp_path / "f", plots=False, config=DiffConfig(esd=True, include="c_fc"))
    got, want = {m.name: m for m in res.modules}, {m.name: m for m in ref.modules}
    assert set(got) == {"transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"} == set(want)
    for n in got:
        assert got[n].shape == want[n].shape
        assert got[n].fro_norm == pytest.approx(want[n].fro_norm, rel=1e-5)
        assert got[n].esd["tuned"]["lambda_max"] == pytest.approx(want[n].esd["tuned"]["lambda_max"], rel=1e-5)


def test_trace_and_interfere_say_why_a_checkpoints_integer_tensor_is_skipped(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.q.weight": torch.randn(16, 16, generator=g), "layers.0.k.weight": torch.randn(16, 16, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({k: v + 0.1 * torch.randn(16, 16, generator=g) for k, v in base.items()}, tmp_path / "c1.safetensors")
    c2 = {k: v + 0.2 * torch.randn(16, 16, generator=g) for k, v in base.items()}
    c2["layers.0.q.weight"] = (c2["layers.0.q.weight"] * 50).clamp(0, 255).to(torch.uint8)
    save_file(c2, tmp_path / "c2.safetensors")
    res = trace(str(tmp_path / "base.safetensors"), [str(tmp_path / "c1.safetensors"), str(tmp_path / "c2.safetensors")])
    q = next(m for m in res.matrices if m["name"] == "layers.0.q.weight")
    assert "skip" not in q["points"][0]
    assert "uint8" in q["points"][1]["skip"] and "not in this checkpoint" not in q["points"][1]["skip"], q["points"][1]
    json.dumps(res.to_dict())
    inter = interfere(str(tmp_path / "base.safetensors"), [str(tmp_path / "c1.safetensors"), str(tmp_path / "c2.safetensors")],
                      plots=False)
    assert any(s["name"] == "layers.0.q.weight" and "uint8" in s["reason"] for s in inter.skipped), inter.skipped


def test_a_weights_parameter_lora_without_a_base_says_its_orientation_is_assumed(tmp_path):
    """Without the base nothing tells a Conv1D's weight from a Linear's: read as (out, in), and said."""
    base, adapter, _ = _gpt2_param_lora(tmp_path, "attn.c_proj.weight")
    res = diff(str(adapter), None, out_dir=tmp_path / "d", plots=False)
    assert any("target_parameters" in w and "pass the base" in w for w in res.warnings), res.warnings
    res = compare(str(adapter), str(adapter), plots=False)
    assert any("target_parameters" in w and "pass the base" in w for w in res.warnings), res.warnings


def test_the_tracker_orients_a_conv1d_weights_parameter_lora_as_trace_does(tmp_path):
    """SpectraTracker took PEFT's target_parameters LoRA of GPT-2's c_fc as (in, out): shape [32, 128] where trace says
    [128, 32], and every turn's left and right exchanged (max angle left 12.3° where the float64 reference says 18.3°)."""
    import numpy as np
    from scipy.linalg import subspace_angles

    from spectra.callbacks import SpectraTracker
    from spectra.trace import TraceConfig

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                                                     target_parameters=["mlp.c_fc.weight"]))
    tracker = SpectraTracker(model, every=1, out_dir=None, config=TraceConfig(top_k=2))
    wrapper = next(m for n, m in model.named_modules() if hasattr(m, "lora_A") and "c_fc" in n)
    deltas = []
    for step in (1, 2):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.3 * torch.randn_like(p))
        B, A = wrapper.lora_B["default"].weight.double(), wrapper.lora_A["default"].weight.double()
        deltas.append((2.0 * B @ A).detach().numpy().T)  # PEFT adds s·B·A to the (in, out) Conv1D weight: ΔW is its transpose
        tracker.step(model, step)
    (tr,) = tracker.matrices
    assert tr.meta["shape"] == [64, 16] == list(deltas[0].shape)
    turn = tracker._records(3, None)[0]["point"]["turn_first"]
    U0, _, V0 = np.linalg.svd(deltas[0])
    U1, _, V1 = np.linalg.svd(deltas[1])
    assert turn["left"]["max_angle_deg"] == pytest.approx(np.degrees(subspace_angles(U0[:, :2], U1[:, :2]).max()), abs=1e-4)
    assert turn["right"]["max_angle_deg"] == pytest.approx(np.degrees(subspace_angles(V0[:2].T, V1[:2].T).max()), abs=1e-4)


def test_a_filter_that_keeps_only_skipped_tensors_says_why_they_were_skipped(tmp_path):
    """--include o_proj where the tuned o_proj is int8: "no matrix is left by --include 'o_proj' … are regular
    expressions" sent users to fix a filter that was right (diff, esd and extract alike)."""
    from spectra.errors import ConfigError

    g = torch.Generator().manual_seed(0)
    k = "model.layers.0.self_attn.{}.weight"
    (tmp_path / "b").mkdir()
    (tmp_path / "t").mkdir()
    save_file({k.format(m): torch.randn(16, 16, generator=g) for m in ("q_proj", "o_proj")}, tmp_path / "b" / "model.safetensors")
    save_file({k.format("q_proj"): torch.randn(16, 16, generator=g), k.format("o_proj"): torch.ones(16, 16, dtype=torch.int8)},
              tmp_path / "t" / "model.safetensors")
    with pytest.raises(ConfigError, match=r"leaves none of the 1 paired matrices: what it keeps was not analysed .*o_proj.*int8"):
        diff(str(tmp_path / "b"), str(tmp_path / "t"), plots=False, config=DiffConfig(include="o_proj"))
    with pytest.raises(ConfigError, match="no matrix is left by --include 'v_proj'"):  # a filter that keeps nothing at all
        diff(str(tmp_path / "b"), str(tmp_path / "t"), plots=False, config=DiffConfig(include="v_proj"))
    with pytest.raises(ConfigError, match="what it keeps was not analysed"):
        extract(str(tmp_path / "b"), str(tmp_path / "t"), tmp_path / "x", config=ExtractConfig(rank=2, include="o_proj"), plots=False)


def test_extract_of_an_embeddings_parameter_lora_writes_peft_embedding_factors(tmp_path):
    """target_parameters=["wpe.weight"]: extract wrote lora_A/lora_B under target_modules ["wpe"], which PEFT's embedding
    LoRA (lora_embedding_A/B) does not load: the adapter did nothing, with exit 0 and no --embeddings asked."""
    from spectra.errors import SpectraError

    base, adapter, _ = _gpt2_param_lora(tmp_path, "wpe.weight")
    with pytest.raises(SpectraError, match="pass --embeddings"):
        extract(str(base), str(adapter), tmp_path / "no", config=ExtractConfig(rank=2), plots=False)
    extract(str(base), str(adapter), tmp_path / "ex", config=ExtractConfig(rank=2, embeddings=True), plots=False)
    W0, S, E = _state(transformers.GPT2LMHeadModel.from_pretrained(base)), _state(merged(base, adapter)), _state(merged(base, tmp_path / "ex"))
    D, L = S["transformer.wpe.weight"] - W0["transformer.wpe.weight"], E["transformer.wpe.weight"] - W0["transformer.wpe.weight"]
    assert float(D.norm()) > 0 and float(((D - L).norm() / D.norm()) ** 2) < 1e-8


def _edit_config(adapter, **changes):
    f = adapter / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def test_module_loras_that_peft_does_not_load_beside_target_parameters_are_skipped(tmp_path):
    """With target_parameters set, factors of a module target_modules does not name (c_fc) were measured (‖ΔW‖ 179)
    where PEFT loads none of them."""
    from safetensors.torch import load_file

    base, adapter, _ = _gpt2_param_lora(tmp_path, "attn.c_proj.weight")
    f = adapter / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(1)
    save_file({**load_file(f), "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": torch.randn(2, 32, generator=g),
               "base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight": torch.randn(128, 2, generator=g)}, f)
    res = diff(str(base), str(adapter), plots=False)
    assert "transformer.h.0.mlp.c_fc.weight" not in {m.name for m in res.modules}
    assert any("c_fc" in s["name"] and "not in target_modules" in s["reason"] for s in res.skipped), res.skipped


@pytest.mark.parametrize("changes,said", [({"target_modules": ["c_proj"]}, "target_modules names the module too"),
                                          ({"fan_in_fan_out": True}, "fan_in_fan_out is true")])
def test_a_weights_parameter_lora_peft_refuses_to_load_is_refused(tmp_path, changes, said):
    """target_modules ["c_proj"] beside target_parameters ["attn.c_proj.weight"] (or fan_in_fan_out with it): PEFT
    refuses to load it; spectra read it, turned (compare against the merge: φ 0.08)."""
    from spectra.errors import CheckpointFormatError

    base, adapter, _ = _gpt2_param_lora(tmp_path, "attn.c_proj.weight")
    _edit_config(adapter, **changes)
    with pytest.raises(CheckpointFormatError, match=said):
        diff(str(base), str(adapter), plots=False)
