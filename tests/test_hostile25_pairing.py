"""Twenty-fifth round, pairing (docs/bad_inputs.md, "twenty-fifth round"): a two-tower base against a headless
encoder, and MoE experts removed and renumbered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import spectra
from spectra.config import DiffConfig
from spectra.findings import diff_findings


def _save(folder: Path, tensors: dict, config: dict | None = None) -> Path:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_two_tower_base_keeps_its_prefix_on_every_name(tmp_path):
    """Base: a vision tower (`vit.`, 4 layers and a pooler) beside a 2-layer text tower; tuned: an unrelated headless
    encoder of 4 layers. `vit.` was dropped only on the names with no `text_model.` twin (layers 2–3, the pooler), so
    three vision matrices were measured against text ones, exit 0, no word of it."""
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for layer in range(4):
        base[f"vit.encoder.layer.{layer}.attention.attention.query.weight"] = torch.randn(32, 32, generator=g)
        tuned[f"encoder.layer.{layer}.attention.attention.query.weight"] = torch.randn(32, 32, generator=g)
    for layer in range(2):
        base[f"text_model.encoder.layer.{layer}.attention.attention.query.weight"] = torch.randn(32, 32, generator=g)
    base["vit.pooler.dense.weight"] = torch.randn(32, 32, generator=g)
    tuned["pooler.dense.weight"] = torch.randn(32, 32, generator=g)
    b, t = _save(tmp_path / "base", base), _save(tmp_path / "tuned", tuned)
    try:
        res = spectra.diff(str(b), str(t), config=DiffConfig())
    except spectra.errors.PairingError as e:  # nothing pairs: the right answer, said in one line
        assert "\n" not in str(e)
    else:
        raise AssertionError(f"paired a vision tower with an unrelated encoder: {[m.name for m in res.modules]}")


def test_a_headless_encoder_pairing_is_said(tmp_path):
    """The one-sided prefix pass pairs a task model with its headless encoder; the pairing now says so."""
    g = torch.Generator().manual_seed(0)
    base = {f"encoder.layer.{i}.attention.self.query.weight": torch.randn(16, 16, generator=g) for i in range(2)}
    tuned = {f"distilbert.{k}": v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tuned["classifier.weight"] = torch.randn(3, 16, generator=g)
    base["encoder.layer.0.attention.self.query.bias"] = torch.zeros(16)  # a bias pairs too, but is no matrix
    tuned["distilbert.encoder.layer.0.attention.self.query.bias"] = torch.zeros(16)
    res = spectra.diff(str(_save(tmp_path / "b", base)), str(_save(tmp_path / "t", tuned)), config=DiffConfig())
    assert len(res.modules) == 2
    assert any("2 matrices paired after dropping 'distilbert' from the front of the tuned's names" in w for w in res.warnings)
    plain = spectra.diff(str(tmp_path / "b"), str(tmp_path / "b"), config=DiffConfig(), allow_identical=True)
    assert not any("paired after dropping" in w for w in plain.warnings)


def _mixtral(keep: list[int], g: torch.Generator, experts: int = 8) -> tuple[dict, dict]:
    base, tuned = {}, {}
    for layer in range(2):
        w = torch.randn(32, 32, generator=g)
        base[f"model.layers.{layer}.self_attn.q_proj.weight"] = w
        tuned[f"model.layers.{layer}.self_attn.q_proj.weight"] = w + 0.01 * torch.randn(32, 32, generator=g)
        for e in range(experts):
            base[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"] = torch.randn(48, 32, generator=g)
        for new, e in enumerate(keep):
            w = base[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"]
            tuned[f"model.layers.{layer}.block_sparse_moe.experts.{new}.w1.weight"] = w + 0.01 * torch.randn(w.shape, generator=g)
    return base, tuned


def test_pruned_experts_are_said(tmp_path):
    """Mixtral experts, expert 6 of 8 removed and 7 renumbered 6 (expert pruning): tuned expert 6 was measured against
    base expert 6 (‖ΔW‖/‖W‖ ≈ 1.4) with only a warning that blamed layers."""
    cfg = dict(model_type="mixtral", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4,
               num_hidden_layers=2, num_local_experts=8, vocab_size=64)
    base, tuned = _mixtral([0, 1, 2, 3, 4, 5, 7], torch.Generator().manual_seed(1))
    b = _save(tmp_path / "base", base, cfg)
    t = _save(tmp_path / "tuned", tuned, cfg | {"num_local_experts": 7})
    res = spectra.diff(str(b), str(t), config=DiffConfig())
    assert any("the base holds experts 0–7, tuned experts 0–6: experts pair by their number" in w for w in res.warnings)
    assert not any("layers pair by their number" in w for w in res.warnings)
    far = [m for m in res.modules if m.rel_norm > 1.0]
    for m in far:  # the measured numbers: base expert 6 against the weights of base expert 7
        ref = np.linalg.norm(tuned[m.name].double().numpy() - base[m.name].double().numpy()) / np.linalg.norm(base[m.name].double().numpy())
        assert abs(m.rel_norm - ref) < 1e-6 * ref
    assert {m.name.split(".experts.")[1].split(".")[0] for m in far} == {"6"}
    found = [f for f in diff_findings(res) if f.topic == "unrelated"]
    assert len(found) == 1 and "was a layer or expert removed" in found[0].text
    # a checkpoint of the same experts on both sides, or one side holding fewer without a config saying so: no note
    base2, tuned2 = _mixtral(list(range(8)), torch.Generator().manual_seed(2))
    same = spectra.diff(str(_save(tmp_path / "b2", base2, cfg)), str(_save(tmp_path / "t2", tuned2, cfg)), config=DiffConfig())
    assert not any("experts pair by their number" in w for w in same.warnings)


def test_a_task_head_norm_beside_the_encoders_does_not_make_it_a_tower(tmp_path):
    """AST's task model holds `audio_spectrogram_transformer.layernorm.weight` beside `classifier.layernorm.weight`:
    one 1-D name that would collide. The review found this round's tower rule keeping the prefix on every name (no
    pair with the headless base, "are both checkpoints of the same architecture?"); only a colliding matrix makes a
    tower, and the colliding norm alone keeps its prefix."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.attention.{m}.weight": torch.randn(32, 32, generator=g) for i in range(2) for m in ("q_proj", "k_proj")}
    base["layernorm.weight"] = torch.ones(32)
    tuned = {f"audio_spectrogram_transformer.{k}": v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tuned["classifier.layernorm.weight"] = torch.ones(32)
    tuned["classifier.dense.weight"] = torch.randn(5, 32, generator=g)
    res = spectra.diff(str(_save(tmp_path / "b", base)), str(_save(tmp_path / "t", tuned)), config=DiffConfig())
    assert len(res.modules) == 4
    for m in res.modules:
        bare = m.name.removeprefix("audio_spectrogram_transformer.")
        ref = np.linalg.norm((tuned[m.name] - base[bare]).double().numpy())
        assert abs(m.fro_norm - ref) < 1e-6 * ref
