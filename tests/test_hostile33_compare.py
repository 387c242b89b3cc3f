"""Thirty-third round: compare and interfere on full checkpoints that do not pair whole with the base
(docs/bad_inputs.md, "thirty-third round")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import cli
from safetensors.torch import save_file

EMB, Q = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"


def _save(folder: Path, tensors: dict[str, torch.Tensor], vocab: int) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "vocab_size": vocab, "hidden_size": 48, "tie_word_embeddings": True}))
    return folder


def _base(root: Path, g: torch.Generator) -> dict[str, torch.Tensor]:
    base = {EMB: torch.randn(100, 48, generator=g), Q: torch.randn(48, 48, generator=g)}
    _save(root / "base", base, 100)
    return base


def _low_rank(rows: int, g: torch.Generator) -> torch.Tensor:
    return 0.05 * torch.randn(rows, 3, generator=g) @ torch.randn(3, 48, generator=g)


def test_compare_measures_vocabularies_resized_both_ways_on_the_rows_all_three_share(tmp_path):
    """One fine-tune shrank the vocabulary (100 -> 90 rows), the other grew it (100 -> 120): each paired its own leading
    rows with the base's, and compare refused the embedding ("B's update is 100×48, not 90×48"); the 90 rows all three
    have are compared now, each number equal to a float64 reference on those rows."""
    g = torch.Generator().manual_seed(0)
    base = _base(tmp_path, g)
    a = {EMB: (base[EMB] + _low_rank(100, g))[:90], Q: base[Q] + _low_rank(48, g)}
    b = {EMB: torch.cat([base[EMB] + _low_rank(100, g), torch.randn(20, 48, generator=g)]), Q: base[Q] + _low_rank(48, g)}
    _save(tmp_path / "a", a, 90), _save(tmp_path / "b", b, 120)
    res = cli(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(tmp_path / "base"), "--top-k", "3",
               "--out", str(tmp_path / "c"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert not out["skipped"], out["skipped"]
    emb = next(m for m in out["modules"] if m["name"] == EMB)
    assert "the 90 leading rows all three have are compared" in emb["note"]
    W = base[EMB][:90].double().numpy()
    dA, dB = a[EMB][:90].double().numpy() - W, b[EMB][:90].double().numpy() - W
    assert np.isclose(emb["fro_a"], np.linalg.norm(dA), rtol=1e-6) and np.isclose(emb["fro_b"], np.linalg.norm(dB), rtol=1e-6)
    va, vb = (np.linalg.svd(d)[2][:3].T for d in (dA, dB))
    phi = float(np.sum((va.T @ vb) ** 2)) / 3  # φ(3, 3) = ‖V_Aᵀ V_B‖_F² / min(i, j)
    assert np.isclose(emb["phi"]["right"]["phi_full"], phi, atol=1e-6)


def test_compare_and_interfere_say_what_a_full_checkpoint_holds_beyond_the_base(tmp_path):
    """A fine-tune with a matrix the base lacks (a renamed or added layer) lost it from compare and interfere without a
    word (a_only empty, no warning; spectra diff lists it as tuned_only): a warning names it now."""
    g = torch.Generator().manual_seed(1)
    base = _base(tmp_path, g)
    extra = "model.layers.0.mlp.extra_proj.weight"
    _save(tmp_path / "a", {EMB: base[EMB] + _low_rank(100, g), Q: base[Q] + _low_rank(48, g),
                           extra: torch.randn(48, 48, generator=g)}, 100)
    _save(tmp_path / "b", {EMB: base[EMB] + _low_rank(100, g), Q: base[Q] + _low_rank(48, g)}, 100)
    for cmd, json_name, said in (("compare", "compare.json", "not compared"), ("interfere", "interfere.json", "not measured")):
        args = [cmd, str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / cmd), "--no-plots"]
        res = cli(args)
        assert res.returncode == 0, res.stderr
        warnings = json.loads((tmp_path / cmd / json_name).read_text())["warnings"]
        hit = [w for w in warnings if extra in w]
        assert len(hit) == 1 and "1 is not in the base" in hit[0] and said in hit[0], warnings
        assert extra in res.stderr
    # filtered out, it is not said
    res = cli(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(tmp_path / "base"), "--include", "q_proj",
               "--out", str(tmp_path / "c2"), "--no-plots"])
    assert res.returncode == 0 and extra not in res.stderr, res.stderr


def test_compare_refuses_a_module_whose_measures_exceed_the_free_memory(tmp_path, monkeypatch):
    """A Llama-3-8B-sized embedding (128256 × 4096) grew compare past 22 GB of 23.5 with no word (the kernel kills such a
    run); the largest module's float64 measures are checked against the free memory first (here a 100 × 48 embedding
    against 100 kB free, since the machine's own memory cannot be made small in a test)."""
    import spectra
    from spectra.errors import ConfigError

    g = torch.Generator().manual_seed(2)
    base = _base(tmp_path, g)
    for side in ("a", "b"):
        _save(tmp_path / side, {EMB: base[EMB] + _low_rank(100, g), Q: base[Q] + _low_rank(48, g)}, 100)
    monkeypatch.setattr("spectra.plan.free_memory", lambda device: 100_000)
    with pytest.raises(ConfigError, match=r"model.embed_tokens.weight \(100, 48\) needs at least [0-9.e-]+ GiB .* is free") as err:
        spectra.compare(str(tmp_path / "a"), str(tmp_path / "b"), base=str(tmp_path / "base"), plots=False)
    assert "--exclude 'embed_tokens'" in str(err.value.hint)
    monkeypatch.setattr("spectra.plan.free_memory", lambda device: None)  # unknown: not refused
    assert spectra.compare(str(tmp_path / "a"), str(tmp_path / "b"), base=str(tmp_path / "base"), plots=False).modules
