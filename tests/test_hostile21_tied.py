"""Twenty-first round, tied heads: a LoRA on the output head of a base that ties it to the embedding (no
``lm_head.weight`` stored) against a full fine-tune that ties its head too. ``compare`` called the head "updated
only by A", though the full side's head *is* its embedding, changed by its embedding's update; it now pairs the
LoRA's head with that update. And an adapter with LoRAs on both the embedding and the tied head now says, in
``compare`` and ``diff``, that the two are separate updates of one stored matrix which merging moves by their
sum (``diff`` gives ‖ΔE + ΔH‖_F from the factors). Numbers against float64 numpy and PEFT's merge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.cli_util import cli as _cli

HIDDEN, VOCAB, SCALE = 32, 64, 2.0  # lora_alpha 8 over r 4


def _llama():
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _lora(folder: Path, base: Path, targets: list[str], seed: int) -> None:
    """A PEFT LoRA (r 4, alpha 8) on ``targets`` of the tied base, its factors set by hand (non-zero update)."""
    import peft
    import transformers as T

    model = T.LlamaForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """base (tied, no lm_head stored); ad (LoRAs on embed_tokens, q_proj, lm_head); head (LoRAs on q_proj, lm_head);
    full (tied, embedding and q_proj moved by rank-3 updates, no lm_head stored); untied (its own, changed lm_head)."""
    import transformers as T

    root = tmp_path_factory.mktemp("tied")
    _llama().save_pretrained(root / "base")
    assert "lm_head.weight" not in load_file(str(root / "base" / "model.safetensors"))
    _lora(root / "ad", root / "base", ["embed_tokens", "q_proj", "lm_head"], 1)
    _lora(root / "head", root / "base", ["q_proj", "lm_head"], 2)
    g = torch.Generator().manual_seed(3)
    full = T.LlamaForCausalLM.from_pretrained(root / "base")
    with torch.no_grad():
        full.model.embed_tokens.weight += 0.05 * torch.randn(VOCAB, 3, generator=g) @ torch.randn(3, HIDDEN, generator=g)
        full.model.layers[0].self_attn.q_proj.weight += 0.05 * torch.randn(HIDDEN, 3, generator=g) @ torch.randn(3, HIDDEN, generator=g)
    full.save_pretrained(root / "full")
    assert "lm_head.weight" not in load_file(str(root / "full" / "model.safetensors"))
    untied = T.LlamaForCausalLM.from_pretrained(root / "base")
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.detach().clone()
                                               + 0.05 * torch.randn(VOCAB, 2, generator=g) @ torch.randn(2, HIDDEN, generator=g))
    untied.save_pretrained(root / "untied")
    assert "lm_head.weight" in load_file(str(root / "untied" / "model.safetensors"))
    return root


def _factors(folder: Path) -> dict[str, np.ndarray]:
    """ΔH (head) and ΔE (embedding) of an adapter, float64, as stored ((vocab, hidden)): s·B·A and s·(B·A)ᵀ."""
    f = {k: v.double().numpy() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    out = {"head": SCALE * f["base_model.model.lm_head.lora_B.weight"] @ f["base_model.model.lm_head.lora_A.weight"]}
    if "base_model.model.model.embed_tokens.lora_embedding_A" in f:
        out["embed"] = SCALE * (f["base_model.model.model.embed_tokens.lora_embedding_B"]
                                @ f["base_model.model.model.embed_tokens.lora_embedding_A"]).T
    return out


def _embedding(folder: Path) -> np.ndarray:
    return load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"].double().numpy()


def _reference(W: np.ndarray, dA: np.ndarray, dB: np.ndarray, ra: int, rb: int, k: int = 10) -> dict:
    """φ (right singular vectors), principal cosines, captured energies, amplification and intruders, float64 SVDs."""
    UA, sA, VAt = np.linalg.svd(dA, full_matrices=False)
    UB, sB, VBt = np.linalg.svd(dB, full_matrices=False)
    G = VAt[:ra] @ VBt[:rb].T
    out = {"phi_full": float((G ** 2).sum() / min(ra, rb)), "cosines": np.clip(np.linalg.svd(G, compute_uv=False), 0, 1)}

    def captured(U, Vt, r, D, s):
        t = (D ** 2).sum()
        return {"two_sided": ((U[:, :r].T @ D @ Vt[:r].T) ** 2).sum() / t, "left": ((U[:, :r].T @ D) ** 2).sum() / t,
                "right": ((D @ Vt[:r].T) ** 2).sum() / t, "best_rank_r": (s[:r] ** 2).sum() / t}

    out["b_in_a"], out["a_in_b"] = captured(UA, VAt, ra, dB, sB), captured(UB, VBt, rb, dA, sA)
    UW, sW, _ = np.linalg.svd(W, full_matrices=False)
    for who, U, Vt, r, D in (("a", UA, VAt, ra, dA), ("b", UB, VBt, rb, dB)):
        proj = np.linalg.norm(U[:, :r].T @ W @ Vt[:r].T)
        out[f"amp_{who}"] = {"delta_fro": np.linalg.norm(D), "w_fro": np.linalg.norm(W), "proj_delta": proj,
                             "factor": np.linalg.norm(D) / proj, "proj_own": np.sqrt((sW[:r] ** 2).sum())}
        Ut = np.linalg.svd(W + D, full_matrices=False)[0]
        out[f"max_cos_{who}"] = np.abs(Ut[:, :k].T @ UW).max(1)
    return out


def _check_row(m: dict, W: np.ndarray, dA: np.ndarray, dB: np.ndarray) -> None:
    ref = _reference(W, dA, dB, m["rank_a"], m["rank_b"])
    assert m["fro_a"] == pytest.approx(np.linalg.norm(dA), rel=1e-6)
    assert m["fro_b"] == pytest.approx(np.linalg.norm(dB), rel=1e-5)
    assert m["phi"]["right"]["phi_full"] == pytest.approx(ref["phi_full"], abs=1e-5)
    np.testing.assert_allclose(m["angles"]["right"]["cosines"], ref["cosines"], atol=1e-5)
    for key in ("b_in_a", "a_in_b"):
        for part in ("two_sided", "left", "right", "best_rank_r"):
            assert m["captured"][key][part] == pytest.approx(ref[key][part], abs=1e-5), (key, part)
    for who in "ab":
        for part, value in ref[f"amp_{who}"].items():
            assert m["amplification"][who][part] == pytest.approx(value, rel=1e-5), (who, part)
        np.testing.assert_allclose(m["intruders"][who]["max_cos"], ref[f"max_cos_{who}"], atol=1e-5)
        assert m["intruders"][who]["count"] == int((ref[f"max_cos_{who}"] < 0.5).sum())


def test_compare_pairs_a_tied_head_lora_with_the_embedding_of_a_tied_full_fine_tune(models):
    """The finding: ``compare AD FULL --base BASE`` listed lm_head as "only in A" (the full side stores no head: it is
    its embedding, which it changed), and nothing said that AD's two LoRAs update one stored matrix."""
    W = _embedding(models / "base")
    dE_full = _embedding(models / "full") - W
    ad = _factors(models / "ad")
    res = _cli(["compare", str(models / "ad"), str(models / "full"), "--base", str(models / "base"), "--json", "--no-plots"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "lm_head.weight" not in out["a_only"] and "lm_head.weight" not in out["b_only"]
    rows = {m["name"]: m for m in out["modules"]}
    head, embed = rows["lm_head.weight"], rows["model.embed_tokens.weight"]
    assert (head["out"], head["in"], head["rank_a"], head["rank_b"]) == (VOCAB, HIDDEN, 4, 3)
    _check_row(head, W, ad["head"], dE_full)  # A's ΔH against B's ΔE, both vocab × hidden as stored
    _check_row(embed, W, ad["embed"], dE_full)
    for m in (head, embed):  # A's two LoRAs: one stored matrix, merging moves it by their sum
        assert "one stored matrix" in m["note"] and "their sum" in m["note"], m["note"]
    assert "stores no output head" in head["note"] and "stores no output head" not in embed["note"], head["note"]

    # the full side first, a head-only LoRA second: the same pairing, mirrored
    hd = _factors(models / "head")
    res = _cli(["compare", str(models / "full"), str(models / "head"), "--base", str(models / "base"), "--json", "--no-plots"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "lm_head.weight" not in out["b_only"] and "model.embed_tokens.weight" in out["a_only"]
    head = next(m for m in out["modules"] if m["name"] == "lm_head.weight")
    _check_row(head, W, dE_full, hd["head"])
    assert "one stored matrix" not in head["note"] and "A (" in head["note"] and "stores no output head" in head["note"]

    # a full side that stores its own untied head keeps its own pairing: that head minus the base's embedding
    res = _cli(["compare", str(models / "ad"), str(models / "untied"), "--base", str(models / "base"), "--json", "--no-plots"])
    assert res.returncode == 0, res.stderr
    head = next(m for m in json.loads(res.stdout)["modules"] if m["name"] == "lm_head.weight")
    dH_untied = load_file(str(models / "untied" / "model.safetensors"))["lm_head.weight"].double().numpy() - W
    assert head["fro_b"] == pytest.approx(np.linalg.norm(dH_untied), rel=1e-5)
    assert "stores no output head" not in head["note"]


def test_diff_says_an_adapters_embedding_and_tied_head_loras_are_one_matrix_with_their_sums_norm(models):
    """``diff BASE AD`` gave the embedding and the tied head as two rows with no word that they are one stored matrix,
    which PEFT's merge_and_unload moves by ΔE + ΔH; the note now says so, with ‖ΔE + ΔH‖_F from the factors."""
    import peft
    import transformers as T

    W = _embedding(models / "base")
    ad = _factors(models / "ad")
    total = float(np.linalg.norm(ad["embed"] + ad["head"]))
    merged = peft.PeftModel.from_pretrained(T.LlamaForCausalLM.from_pretrained(models / "base", dtype=torch.float64),
                                            models / "ad").merge_and_unload()
    moved = merged.model.embed_tokens.weight.detach().numpy() - W
    assert np.linalg.norm(moved) == pytest.approx(total, rel=1e-9)  # PEFT adds both LoRAs to the one tensor
    res = _cli(["diff", str(models / "base"), str(models / "ad"), "--json"])
    assert res.returncode == 0, res.stderr
    rows = {m["name"]: m for m in json.loads(res.stdout)["modules"]}
    head, embed = rows["lm_head.weight"], rows["model.embed_tokens.weight"]
    assert head["fro_norm"] == pytest.approx(np.linalg.norm(ad["head"]), rel=1e-6)
    assert embed["fro_norm"] == pytest.approx(np.linalg.norm(ad["embed"]), rel=1e-6)
    for m in (head, embed):
        assert "one stored matrix" in m["note"] and f"‖ΔE + ΔH‖_F = {total:.4g}" in m["note"], m["note"]
    assert "one stored matrix" not in rows["model.layers.0.self_attn.q_proj.weight"]["note"]
    # a head-only LoRA has nothing to add up
    res = _cli(["diff", str(models / "base"), str(models / "head"), "--json"])
    assert res.returncode == 0, res.stderr
    head = next(m for m in json.loads(res.stdout)["modules"] if m["name"] == "lm_head.weight")
    assert "one stored matrix" not in head["note"] and "ties its output head" in head["note"]
