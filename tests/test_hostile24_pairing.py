"""Twenty-fourth round, pairing (docs/bad_inputs.md, "twenty-fourth round"): a layer removed on one side, encoders
saved with and without their base_model_prefix, a GPTQ checkpoint against a float one, and what --layers selects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import spectra
from spectra.config import DiffConfig
from spectra.findings import diff_findings
from tests.cli_util import cli


def _llama(root: Path, layers: int = 3) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    return root / "base"


def _save(folder: Path, tensors: dict, config: dict) -> Path:
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_pruned_layer_is_said_and_the_unrelated_matrices_are_warned_of(tmp_path):
    """Layer 1 removed and layer 2 renumbered 1 (a pruned model): tuned layer 1 was measured against base layer 1 at
    ‖ΔW‖/‖W‖ ≈ 1.4 with no warning (the unrelated-weights warning looked at the median only), exit 0."""
    base = _llama(tmp_path)
    g = torch.Generator().manual_seed(1)
    tuned = {}
    for k, v in load_file(str(base / "model.safetensors")).items():
        if ".layers.1." in k:
            continue
        tuned[k.replace(".layers.2.", ".layers.1.")] = v + 1e-3 * torch.randn(v.shape, generator=g) if v.ndim == 2 else v
    config = json.loads((base / "config.json").read_text()) | {"num_hidden_layers": 2}
    pruned = _save(tmp_path / "pruned", tuned, config)
    res = spectra.diff(str(base), str(pruned), config=DiffConfig())
    assert any("the base holds layers 0–2, tuned layers 0–1: layers pair by their number" in w for w in res.warnings)
    found = [f for f in diff_findings(res) if f.topic == "unrelated"]
    base_w = load_file(str(base / "model.safetensors"))
    far = [m for m in res.modules if m.layer == 1]
    for m in far:  # the numbers the warning quotes are the measured ones: base layer 1 against base layer 2's weights
        ref = np.linalg.norm(tuned[m.name].double().numpy() - base_w[m.name].double().numpy()) / np.linalg.norm(base_w[m.name].double().numpy())
        assert abs(m.rel_norm - ref) < 1e-6 * ref and m.rel_norm > 1.0
    assert len(found) == 1 and found[0].warning and f"{len(far)} of {len(res.modules)} matrices moved by their own norm" in found[0].text
    assert "(in layer 1)" in found[0].text
    # the same layers on both sides: no such note, no warning
    same = spectra.diff(str(base), str(base), config=DiffConfig(), allow_identical=True)
    assert not any("layers pair by their number" in w for w in same.warnings)
    assert not [f for f in diff_findings(same) if f.topic == "unrelated"]


def test_an_encoder_saved_without_its_base_model_prefix_pairs(tmp_path):
    """A headless DistilBERT base against its sequence-classification fine-tune (`distilbert.` prefix): refused as
    'are both checkpoints of the same architecture?' (the prefix was not one spectra strips)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    b = transformers.DistilBertModel(cfg)
    b.save_pretrained(tmp_path / "b")
    t = transformers.DistilBertForSequenceClassification(cfg)
    t.distilbert.load_state_dict(b.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in t.distilbert.parameters():
            if p.ndim == 2:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    t.save_pretrained(tmp_path / "t")
    res = spectra.diff(str(tmp_path / "b"), str(tmp_path / "t"), config=DiffConfig())
    bw, tw = load_file(str(tmp_path / "b" / "model.safetensors")), load_file(str(tmp_path / "t" / "model.safetensors"))
    assert len(res.modules) == 14  # 2 layers × (q, k, v, out, lin1, lin2) + word and position embeddings
    for m in res.modules:
        d = tw[m.name].double().numpy() - bw[m.name.removeprefix("distilbert.")].double().numpy()
        assert abs(m.fro_norm - np.linalg.norm(d)) < 1e-9 * np.linalg.norm(d)


def test_a_gptq_checkpoint_against_a_float_one_names_the_format(tmp_path):
    """A GPTQ tuned checkpoint (X.qweight, qzeros, scales, g_idx) against a float base: exit 0 with the layer matrices
    "base-only … not paired", no word of GPTQ and no way out (GPTQ on both sides named it)."""
    base = _llama(tmp_path, layers=2)
    packed = {}
    for k, v in load_file(str(base / "model.safetensors")).items():
        if ".layers." in k and v.ndim == 2:
            m = k.removesuffix(".weight")
            packed |= {f"{m}.qweight": torch.zeros(v.shape[1] // 8, v.shape[0], dtype=torch.int32),
                       f"{m}.qzeros": torch.zeros(1, v.shape[0] // 8, dtype=torch.int32),
                       f"{m}.scales": torch.ones(1, v.shape[0], dtype=torch.float16), f"{m}.g_idx": torch.zeros(v.shape[1], dtype=torch.int32)}
        else:
            packed[k] = v
    gptq = _save(tmp_path / "gptq", packed, json.loads((base / "config.json").read_text()))
    res = spectra.diff(str(base), str(gptq), config=DiffConfig(), allow_identical=True)
    assert res.unmatched == {"base_only": [], "tuned_only": []}
    skipped = [s for s in res.skipped if "GPTQ/AWQ" in s["reason"]]
    assert len(skipped) == 14 and all(s["name"].endswith(".weight") and "dequantise it first" in s["reason"] for s in skipped)
    assert len(res.skipped_matrices()) == 14  # counted as matrices left out: the coverage warning says so
    # the analysed embedding and head are unchanged: the finding says what was left out, GPTQ named
    assert any(f.warning and f.topic == "zero" and "GPTQ/AWQ" in f.text for f in diff_findings(res))


def test_layers_selects_what_is_listed_as_skipped_or_unpaired(tmp_path):
    """`--layers 0` listed every other layer's norms as skipped and their one-sided tensors as not paired, and the
    coverage warning counted them as lost."""
    base = _llama(tmp_path)
    tuned = {k: v + 1e-3 for k, v in load_file(str(base / "model.safetensors")).items() if ".layers.2." not in k}
    other = _save(tmp_path / "t", tuned, json.loads((base / "config.json").read_text()) | {"num_hidden_layers": 2})
    r = cli(["diff", str(base), str(other), "--layers", "0", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {s["name"] for s in doc["skipped"]} == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}
    assert doc["unmatched"] == {"base_only": [], "tuned_only": []} and "not paired" not in r.stderr
    whole = spectra.diff(str(base), str(other), config=DiffConfig())  # no selection: every one of them is listed
    assert len(whole.unmatched["base_only"]) == 9 and len(whole.skipped) == 5


def test_an_encoder_prefix_is_dropped_only_where_no_other_tower_shares_the_name(tmp_path):
    """With the encoders' prefixes stripped always (this round's first change), a two-tower base (`vit.encoder…` beside
    `text_model.encoder…`) paired a headless text fine-tune with its *vision* tower (‖ΔW‖/‖W‖ 1.41, exit 0), and a base
    holding `vit.encoder…` beside a headless `encoder…` refused a pair that had paired (both keys became one)."""
    from spectra.errors import PairingError

    g = torch.Generator().manual_seed(0)
    mods = ("attention.output.dense", "intermediate.dense")
    dual = {f"{tower}.encoder.layer.{i}.{m}.weight": torch.randn(32 if "inter" in m else 16, 16, generator=g)
            for tower in ("vit", "text_model") for i in range(2) for m in mods}
    save_file(dual, str(tmp_path / "dual.safetensors"))
    text = {k.removeprefix("text_model."): v + 0.01 * torch.randn(v.shape, generator=g) for k, v in dual.items() if k.startswith("text_model.")}
    save_file(text, str(tmp_path / "text.safetensors"))
    try:
        res = spectra.diff(str(tmp_path / "dual.safetensors"), str(tmp_path / "text.safetensors"), config=DiffConfig())
    except PairingError:
        res = None  # refused: no matrix of this base is the text tower's under the headless names
    assert res is None or all(m.rel_norm < 0.1 for m in res.modules)  # never the vision tower against the text one
    side = {f"vit.encoder.layer.{i}.{m}.weight": torch.randn(16, 16, generator=g) for i in range(2) for m in mods[:1]}
    side |= {f"encoder.layer.{i}.{m}.weight": torch.randn(16, 16, generator=g) for i in range(2) for m in mods[:1]}
    save_file(side, str(tmp_path / "b2.safetensors"))
    save_file({"model." + k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in side.items()}, str(tmp_path / "t2.safetensors"))
    res = spectra.diff(str(tmp_path / "b2.safetensors"), str(tmp_path / "t2.safetensors"), config=DiffConfig())
    assert len(res.modules) == 4 and all(m.rel_norm < 0.1 for m in res.modules)


def test_two_different_encoders_prefixes_are_not_both_dropped(tmp_path):
    """The review: with both sides' encoder prefixes dropped, `hubert.encoder…` paired with `wav2vec2.encoder…`
    (two models of the same module names and shapes measured as one update); at 29bec09 they paired nothing."""
    from spectra.errors import PairingError

    g = torch.Generator().manual_seed(0)
    tail = [f"encoder.layers.{i}.attention.{m}.weight" for i in range(2) for m in ("k_proj", "q_proj")]
    save_file({"hubert." + t: torch.randn(16, 16, generator=g) for t in tail}, str(tmp_path / "hubert.safetensors"))
    save_file({"wav2vec2." + t: torch.randn(16, 16, generator=g) for t in tail}, str(tmp_path / "w2v.safetensors"))
    with pytest.raises(PairingError, match="no weight matrix of the base pairs"):
        spectra.diff(str(tmp_path / "hubert.safetensors"), str(tmp_path / "w2v.safetensors"), config=DiffConfig())
    save_file({t: torch.randn(16, 16, generator=g) for t in tail}, str(tmp_path / "bare.safetensors"))  # headless
    res = spectra.diff(str(tmp_path / "bare.safetensors"), str(tmp_path / "w2v.safetensors"), config=DiffConfig())
    assert len(res.modules) == 4  # one side's prefix dropped: paired
