"""Twenty-third round: numbers under stress (docs/bad_inputs.md, "twenty-third round"): recommend on approximate
results, the approximate mode's exact fallback, a LoRA r above min(out, in)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file


def _planted(root, p: int = 400, seed: int = 15):
    """A zero base and a tuned p×p weight with singular values 100 geometric (1 → 0.1) then p − 100 at 0.01."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((p, p)))
    V, _ = np.linalg.qr(rng.standard_normal((p, p)))
    s = np.r_[np.geomspace(1, 0.1, 100), np.full(p - 100, 0.01)]
    W = torch.tensor((U * s) @ V.T, dtype=torch.float32)
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(p, p)}, str(root / "b.safetensors"))
    save_file({"model.layers.0.mlp.up_proj.weight": W}, str(root / "t.safetensors"))
    return W.double().numpy()


def test_recommend_on_approximate_ranks_gives_ranks_that_hold_tau(tmp_path):
    """recommend took the approximate mode's estimate (the bounds' midpoint): r = 62 held 0.94927 of the energy for
    τ = 0.95, with no word that the ranks were estimates."""
    from spectra import DiffConfig, diff
    from spectra.recommend import recommend

    W = _planted(tmp_path)
    S2 = np.linalg.svd(W, compute_uv=False) ** 2
    res = diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), plots=False,
               config=DiffConfig(approx_above=100, thresholds=(0.8, 0.9), approx_tol=0.02))  # ranks a first sketch
    # (64 columns) bounds: a wider one of this 400 × 400 update costs more than its exact spectrum, computed instead
    res.save(tmp_path / "out")
    m = res.modules[0]
    assert m.method.startswith("approx")
    for tau in (0.8, 0.9):
        rec = recommend(tmp_path / "out" / "results.json", energy=tau)
        r = next(iter(rec.ranks.values()))
        # the rank recommended holds at least τ of the energy (float64 SVD of the stored update)
        assert S2[:r].sum() / S2.sum() >= tau, (tau, r, S2[:r].sum() / S2.sum())
        lo, hi = m.energy_rank_bounds[f"{tau:g}"]
        assert r == hi
        if lo != hi:
            assert any("approximate ranks" in n for n in rec.notes), rec.notes


def test_bounds_that_do_not_hold_the_estimate_are_refused(tmp_path):
    import json

    from spectra import DiffConfig, diff
    from spectra.errors import ResultsFormatError
    from spectra.recommend import recommend

    _planted(tmp_path, p=300)
    diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), plots=False,
         config=DiffConfig(approx_above=100, approx_tol=0.05, thresholds=(0.5, 0.9))).save(tmp_path / "out")  # (as above)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    doc["modules"][0]["energy_rank_bounds"]["0.9"] = [1, 5000]
    (tmp_path / "out" / "results.json").write_text(json.dumps(doc))
    with pytest.raises(ResultsFormatError, match="energy_rank_bounds"):
        recommend(tmp_path / "out" / "results.json", energy=0.9)


def test_the_approximate_modes_exact_fallback_is_reported_as_exact(tmp_path):
    """Where the sketch grew to p/2 the spectrum was computed exactly, yet the record said 'approx/sketch512', nulled
    nuclear norm, effective and signal rank ('need the full spectrum') and the run's caveat called its ranks estimates."""
    from spectra import DiffConfig, diff

    rng = np.random.default_rng(0)
    W = torch.tensor(rng.standard_normal((256, 10)) @ rng.standard_normal((10, 256)), dtype=torch.float32)
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(256, 256)}, str(tmp_path / "b.safetensors"))
    save_file({"model.layers.0.self_attn.q_proj.weight": W}, str(tmp_path / "t.safetensors"))
    res = diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), plots=False,
               config=DiffConfig(approx_above=100, thresholds=(0.9, 1.0)))
    m = res.modules[0]
    S = np.linalg.svd(W.double().numpy(), compute_uv=False)
    assert not m.method.startswith("approx") and m.energy_rank_bounds is None
    assert m.nuclear_norm == pytest.approx(S.sum(), rel=1e-6)
    kept = S[S / S[0] > 1e-6]  # Roy & Vetterli, on the values above float32's rounding
    q = kept / kept.sum()
    assert m.effective_rank == pytest.approx(float(np.exp(-(q * np.log(q)).sum())), rel=1e-4)
    assert m.energy_rank["1.0"] == 10 and m.energy_rank["0.9"] == int(np.searchsorted(np.cumsum(S**2) / (S**2).sum(), 0.9) + 1)
    assert "approximate" not in m.caveats and "computed exactly" in m.note
    assert not any("estimate" in w for w in res.warnings)


def test_a_lora_rank_above_min_out_in_is_measured_against_p(tmp_path):
    """A LoRA r = 64 on 8×16 and 16×24 matrices: 'No matrix needs all of its r' and cells '8/64', though every v_proj
    update used all 8 directions it can hold."""
    import peft
    import transformers

    from spectra import diff

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                             peft.LoraConfig(r=64, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    res = diff(str(tmp_path / "base"), str(tmp_path / "lora"), plots=False)
    v = [m for m in res.modules if "v_proj" in m.name]
    assert v and all(m.p == 8 and m.energy_rank["0.9"] <= 8 and m.lora_capacity == 8 for m in v)
    from spectra.findings import diff_findings

    found = diff_findings(res)
    text = next(f.text for f in found if f.topic == "adapter")
    assert text.startswith("LoRA r = 64, above min(out, in) = p in 4 matrices") and "p = 16" in text, text
    assert "of 64" not in text and "of min(r, p)" in text
    full = [m for m in res.modules if m.energy_rank["0.9"] == m.lora_capacity]
    assert ("No matrix needs all of its min(r, p)" in text) == (not full), text
    f = next(f for f in found if f.topic == "adapter")
    assert f.numbers["median_share_of_r"] == pytest.approx(float(np.median([m.energy_rank["0.9"] / min(64, m.p) for m in res.modules])))


def test_compare_leaves_phi_that_cannot_tell_overlap_from_chance_out_of_its_verdict(tmp_path):
    """Where max(r_A, r_B) = d, φ = 1 and its baseline is 1: the findings said 'median 0.686 against 0.667 … at
    chance', a median mixing those always-1 modules with the rest."""
    from spectra import CompareConfig, compare
    from spectra.compare_findings import compare_findings, phi_words

    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.1.self_attn.q_proj.weight": (8, 8),
              "model.layers.0.mlp.up_proj.weight": (64, 64), "model.layers.1.mlp.up_proj.weight": (64, 64)}
    W = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    shared = {k: torch.randn(s[1], 3, generator=g) for k, s in shapes.items()}
    tuned = {}
    for side in ("a", "b"):  # a rank-3 update on the 64×64 matrices, sharing their input directions; dense 8×8 ones
        tuned[side] = {k: w + (torch.randn(w.shape[0], 3, generator=g) @ shared[k].T if w.shape[0] == 64
                               else 0.1 * torch.randn(w.shape, generator=g)) for k, w in W.items()}
        save_file(tuned[side], str(tmp_path / f"{side}.safetensors"))
    save_file(W, str(tmp_path / "base.safetensors"))
    res = compare(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), base=str(tmp_path / "base.safetensors"),
                  config=CompareConfig(top_k=64), plots=False)
    by = {m.name: m for m in res.modules}
    small = [by[k] for k in shapes if shapes[k][0] == 8]
    big = [by[k] for k in shapes if shapes[k][0] == 64]
    assert all(m.rank_a == m.rank_b == 8 and m.phi["right"].random == 1.0 for m in small)
    assert all(m.rank_a == m.rank_b == 3 for m in big)
    f = next(x for x in compare_findings(res) if x.topic == "phi")
    assert f.numbers["modules"] == 2 and f.numbers["uninformative"] == 2
    want = float(np.median([m.phi["right"].phi_full for m in big]))
    ratio = float(np.median([m.phi["right"].phi_full / m.phi["right"].random for m in big]))
    assert f.numbers["median_phi"] == pytest.approx(want) and phi_words(ratio) in f.text and ratio > 10
    assert "in 2 of 4 modules the ranks nearly fill the space" in f.text and "left out of these medians" in f.text
    assert "φ ≤ 1 keeps φ at most 1.5× its baseline" in f.text
    # only blind modules: no verdict at all
    res.modules = small
    f = next(x for x in compare_findings(res) if x.topic == "phi")
    assert f.text.startswith("φ(r_A, r_B) says nothing here") and "(at chance)" not in f.text and "median" not in f.text
