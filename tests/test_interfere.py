"""``spectra interfere`` end to end on a tiny Llama: PEFT adapters and full checkpoints, checked against
dense float64 references built independently (PEFT's merge_and_unload, numpy SVDs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from spectra.errors import CheckpointFormatError, ConfigError, PairingError
from spectra.interfere import InterfereConfig, interfere
from spectra.io.checkpoint import Checkpoint
from spectra.report_interfere import findings, section_html
from spectra_cli.interfere import interfere_cmd
from spectra_cli.main import main
from tests.test_interference import knots_reference, tsv_reference

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=32, max_position_embeddings=16,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def make_adapter(base_dir: Path, out: Path, seed: int, r: int = 4, targets=TARGETS) -> dict[str, np.ndarray]:
    """A PEFT adapter with random B (so ΔW ≠ 0), and its dense updates from PEFT's own merge."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    before = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=True))
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n or "lora_A" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    model.save_pretrained(out)
    merged = model.merge_and_unload()
    return {n: p.detach().double().numpy() - before[n] for n, p in merged.named_parameters() if p.ndim == 2
            and not np.array_equal(p.detach().double().numpy(), before[n])}


def make_full(base_dir: Path, out: Path, seed: int) -> dict[str, np.ndarray]:
    """A full checkpoint: base + a random rank-3 update on every linear weight of the layers."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for n, p in model.named_parameters():
        if p.ndim == 2 and "layers" in n:
            d = 0.05 * torch.randn(p.shape[0], 3, generator=g) @ torch.randn(3, p.shape[1], generator=g)
            before = p.detach().double().numpy().copy()
            p.data += d
            deltas[n] = p.detach().double().numpy() - before
    model.save_pretrained(out)
    return deltas


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ifr")
    tiny_llama().save_pretrained(root / "base")
    refs = {"a": make_adapter(root / "base", root / "lora_a", 1), "b": make_adapter(root / "base", root / "lora_b", 2),
            "full": make_full(root / "base", root / "full", 3), "full2": make_full(root / "base", root / "full2", 4)}
    make_adapter(root / "base", root / "lora_q", 5, targets=["q_proj"])
    tiny_llama(seed=9).__class__(transformers.LlamaConfig(hidden_size=24, intermediate_size=24, num_hidden_layers=2,
                                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                                                          max_position_embeddings=16)).save_pretrained(root / "other_base")
    make_adapter(root / "other_base", root / "lora_other", 6)
    return root, refs


def _svd_top(M: np.ndarray, k: int):
    """Top-k triplets, leaving out singular values below 1e-6·σ₁ as spectra does for dense updates
    (a rank-3 update stored in float32 has rounding-level singular values beyond the third)."""
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    k = min(k, int(np.sum(1e-6 * S[0] < S)))
    return U[:, :k], S[:k], Vh[:k]


def test_end_to_end_against_dense_references(tasks, tmp_path):
    root, refs = tasks
    k = 4
    res = interfere(root / "base", [root / "lora_a", root / "lora_b", root / "full"], config=InterfereConfig(top_k=k),
                    out_dir=tmp_path)
    assert res.kinds == ["lora", "lora", "full"] and len(res.modules) == 2 * len(TARGETS)
    for m in res.modules:
        D = [refs["a"][m["name"]], refs["b"][m["name"]], refs["full"][m["name"]]]
        flat = np.array([d.reshape(-1) for d in D])
        G = flat @ flat.T
        cos = G / np.sqrt(np.outer(np.diag(G), np.diag(G)))
        assert np.allclose(np.array(m["cosine"]), cos, atol=1e-6), m["name"]  # float32 storage of the full update
        tops = [_svd_top(d, k) for d in D]
        for s in range(3):
            for t in range(3):
                Vs, Vt = tops[s][2].T, tops[t][2].T
                assert m["phi"][s][t] == pytest.approx(np.linalg.norm(Vs.T @ Vt) ** 2 / min(Vs.shape[1], Vt.shape[1]), abs=1e-5)
                ref = np.linalg.norm(tops[s][0].T @ D[t] @ tops[s][2].T) ** 2 / np.sum(D[t] ** 2)
                assert m["captured"][s][t] == pytest.approx(ref, abs=1e-5)
        sti, _ = tsv_reference(D, k, rel_floor=1e-6)
        assert m["tsv"]["sti"] == pytest.approx(sti, rel=1e-4)
        _, A = knots_reference([(u * s) @ vh for u, s, vh in tops])
        assert np.allclose(np.array(m["knots"]["alignment"]), A, atol=1e-5)
        S_sum = np.linalg.svd(sum(D), compute_uv=False)
        assert m["sum"]["singular_values"][:5] == pytest.approx(S_sum[:5], rel=1e-5, abs=1e-9)
        assert m["sum"]["fro_sq_ratio"] == pytest.approx(np.sum(S_sum**2) / np.trace(G), rel=1e-5)
        assert m["fro"] == pytest.approx(np.sqrt(np.diag(G)).tolist(), rel=1e-6)
    doc = json.loads((tmp_path / "interfere.json").read_text())
    assert doc["schema"] == "spectra.interfere/1" and doc["names"] == ["lora_a", "lora_b", "full"]
    assert len(doc["summary"]["cosine"]) == 3 and doc["summary"]["modules"] == len(res.modules)
    assert (tmp_path / "interfere.csv").read_text().count("\n") == 1 + len(res.modules) * 3
    for name in ("cosine", "phi", "captured", "tsv", "knots", "layers"):
        assert (tmp_path / f"interfere_{name}.png").is_file(), name
    # the matrices only the full checkpoint updates (embeddings, head, the rest of the layers) are listed
    partial = {p["name"] for p in res.partial}
    assert "model.layers.0.self_attn.k_proj.weight" in partial


def test_grouped_dense_path_reads_each_base_tensor_once(tasks, monkeypatch):
    root, _ = tasks
    inputs = [root / "full", root / "lora_a", root / "full2"]
    one = interfere(root / "base", inputs, config=InterfereConfig(top_k=3))
    reads: list[str] = []
    load = Checkpoint.load

    def counting(self, name, **kw):
        reads.append(f"{self.label}|{name}")
        return load(self, name, **kw)

    monkeypatch.setattr(Checkpoint, "load", counting)
    grouped = interfere(root / "base", inputs, config=InterfereConfig(top_k=3, max_dense_bytes=1))  # one dense at a time
    for a, b in zip(one.modules, grouped.modules):
        for key in ("cosine", "captured", "phi"):
            assert np.allclose(np.array(a[key], dtype=float), np.array(b[key], dtype=float), atol=1e-12), key
        assert a["sum"] == b["sum"] and a["tsv"] == b["tsv"]
    base_reads = [r for r in reads if r.startswith(str(root / "base") + "|")]
    assert len(base_reads) == len(set(base_reads)) == len(grouped.modules)  # the base: once per matrix
    # two full checkpoints in groups of one: the first is read once, the second twice (once per group)
    name = grouped.modules[0]["name"]
    assert reads.count(f"{root / 'full'}|{name}") == 1 and reads.count(f"{root / 'full2'}|{name}") == 2


def test_identical_and_zero_updates(tasks, tmp_path):
    root, _ = tasks
    res = interfere(root / "base", [root / "lora_a", root / "lora_a"])
    for m in res.modules:
        assert m["cosine"][0][1] == pytest.approx(1.0) and m["phi"][0][1] == pytest.approx(1.0)
        assert m["tsv"]["pairs"][0][1] == pytest.approx(1.0) and m["knots"]["alignment"][0][1] == pytest.approx(1.0)
        assert m["sum"]["spectral_over_max"] == pytest.approx(2.0) and m["sum"]["fro_sq_ratio"] == pytest.approx(2.0)
    shutil.copytree(root / "base", tmp_path / "same")  # a "fine-tune" equal to its base: ΔW = 0
    res = interfere(root / "base", [root / "full", tmp_path / "same"], config=InterfereConfig(include="layers.0"))
    m = res.modules[0]
    assert m["cosine"][0][1] is None and m["phi"][0][1] is None and m["ranks"][1] == 0  # undefined, never 0 or NaN
    json.dumps(res.to_dict(), allow_nan=False)


def test_bad_inputs(tasks, tmp_path):
    root, _ = tasks
    with pytest.raises(ConfigError, match="at least two"):
        interfere(root / "base", [root / "lora_a"])
    with pytest.raises(CheckpointFormatError, match="different base model"):
        interfere(root / "base", [root / "lora_a", root / "lora_other"])
    with pytest.raises(PairingError, match="no matrix in common"):
        interfere(root / "base", [root / "lora_a", root / "lora_q"], config=InterfereConfig(exclude="q_proj"))
    bad = tmp_path / "nan"
    shutil.copytree(root / "full", bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    res = interfere(root / "base", [root / "lora_a", bad])
    assert any(s["name"] == "model.layers.1.mlp.down_proj.weight" and "NaN" in s["reason"] for s in res.skipped)
    assert "model.layers.1.mlp.down_proj.weight" not in {m["name"] for m in res.modules}


def test_cli_and_report(tasks, tmp_path):
    root, _ = tasks
    odd = tmp_path / "<i>lora</i>"  # a name the report must escape
    shutil.copytree(root / "lora_b", odd)
    group = type(main)(commands=[interfere_cmd])
    out = CliRunner().invoke(group, ["interfere", "--base", str(root / "base"), str(root / "lora_a"), str(odd),
                                     str(root / "full"), "--top-k", "2", "--out", str(tmp_path / "o")])
    assert out.exit_code == 0, out.output
    assert "cosine of the flattened updates" in out.stdout and "σ₁ sum / max" in out.stdout
    path = tmp_path / "o" / "interfere.json"
    doc = json.loads(path.read_text())
    html = section_html(path, doc)
    assert "<i>lora</i>" not in html and "&lt;i&gt;lora&lt;/i&gt;" in html
    # the fixture's three tasks are independent random updates: every median cosine is within chance (3/√(out·in))
    assert any(f.text.startswith("No pair stands out") for f in findings(path, doc))
    bad = CliRunner().invoke(group, ["interfere", "--base", str(root / "base"), str(root / "lora_a"), str(root / "lora_other")])
    assert bad.exit_code == 1 and bad.stderr.count("\n") <= 2 and "different base model" in bad.stderr
    usage = CliRunner().invoke(group, ["interfere", "--base", str(root / "base"), str(root / "lora_a")])
    assert usage.exit_code == 2 and "two or more" in usage.stderr
