"""The twelfth round: what the eleventh left found but not mended, and what the twelfth probe found.

Each test fails on the code before the round (7ae82ac) and passes now (docs/bad_inputs.md, "twelfth round").
"""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from spectra_cli.main import main
from tests.conftest import random_lora, reference_energy_rank, svd64, tiny_llama


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _tiny_pair(tmp_path):
    """``b.safetensors`` and ``t.safetensors`` in ``tmp_path``: two 8 × 8 up_proj matrices and a small update of each."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    b = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8, 8, generator=g) for i in range(2)}
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file({n: v + 0.1 * torch.randn(8, 8, generator=g) for n, v in b.items()}, str(tmp_path / "t.safetensors"))


def _saved_adapter(tmp_path, *, tie: bool = False, resize: int = 0, extra_save: tuple[str, ...] = ()):
    """A base tiny Llama and a PEFT LoRA (q_proj) whose ``modules_to_save`` (lm_head or embed_tokens,
    the usual pair when tokens are added) were moved by a planted update; returns (base dir, adapter dir,
    {saved name: its weight after training})."""
    from safetensors.torch import load_file

    model = tiny_llama(tie=tie)
    model.save_pretrained(tmp_path / "base")
    if resize:
        model.resize_token_embeddings(model.config.vocab_size + resize)
    saved = ("embed_tokens",) if tie else ("lm_head", "embed_tokens")
    peft_model = random_lora(model, 1, r=2, target_modules=["q_proj"], modules_to_save=[*saved, *extra_save])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "modules_to_save" in name:  # a rank-3 update of 5% of the weight's norm
                U, V = torch.randn(prm.shape[0], 3, generator=g), torch.randn(3, prm.shape[1], generator=g)
                prm.add_(0.05 * prm.norm() * (U @ V) / (U @ V).norm())
    peft_model.save_pretrained(tmp_path / "lora")
    stored = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    after = {k.removeprefix("base_model.model.").replace(".modules_to_save.default", ""): v
             for k, v in stored.items() if "lora_" not in k}
    return tmp_path / "base", tmp_path / "lora", after


def test_modules_to_save_matrices_are_diffed_against_the_base(tmp_path):
    """An adapter's modules_to_save (here lm_head and embed_tokens) were listed as skipped, "diff the
    merged model for it": their updates, often the largest of a fine-tune that adds tokens, were not
    measured. Now ΔW = saved − base, exact against numpy's float64 SVD."""
    from safetensors.torch import load_file

    base, lora, after = _saved_adapter(tmp_path)
    res = _cli("diff", base, lora, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    rows = {m["name"]: m for m in doc["modules"]}
    W0 = load_file(str(base / "model.safetensors"))
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert name in rows, (name, [s["name"] for s in doc["skipped"]])
        m = rows[name]
        S = svd64(after[name].double() - W0[name].double())
        k, clear = reference_energy_rank(S, 0.9)
        assert clear and m["energy_rank"]["0.9"] == k == 3
        np.testing.assert_allclose(m["singular_values"][:3], S[:3], rtol=1e-6)
        assert m["rel_norm"] == pytest_approx(float(np.linalg.norm(S) / W0[name].double().norm()))
        assert "modules_to_save" in m["note"] and m["lora_r"] is None
    assert sum(m["lora_r"] == 2 for m in doc["modules"]) == 2  # the q_proj LoRAs as before
    names = [m["name"] for m in doc["modules"]]
    assert names.index("model.embed_tokens.weight") == 0 and names[-1] == "lm_head.weight"  # in model order
    alone = _cli("diff", lora, "--out", tmp_path / "o2")  # without the base: said why, not measured
    assert alone.exit_code == 0, alone.output
    skipped = {s["name"]: s["reason"] for s in json.loads((tmp_path / "o2" / "results.json").read_text())["skipped"]}
    assert "pass the base" in skipped["lm_head.weight"]


def pytest_approx(x: float):
    import pytest

    return pytest.approx(x, rel=1e-6)


def test_modules_to_save_of_a_resized_vocabulary_and_a_tied_head(tmp_path):
    """Tokens added (vocabulary 64 -> 72): the saved embedding's 64 leading rows are paired with the
    base's, as a full diff pairs a resized vocabulary; a base that ties its head: a saved embedding is
    measured; a new classification-style module the base lacks is skipped with its reason."""
    from safetensors.torch import load_file, save_file

    base, lora, after = _saved_adapter(tmp_path / "a", resize=8)
    res = _cli("diff", base, lora, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    rows = {m["name"]: m for m in json.loads((tmp_path / "o" / "results.json").read_text())["modules"]}
    W0 = load_file(str(base / "model.safetensors"))
    m = rows["model.embed_tokens.weight"]
    S = svd64(after["model.embed_tokens.weight"][:64].double() - W0["model.embed_tokens.weight"].double())
    np.testing.assert_allclose(m["singular_values"][:3], S[:3], rtol=1e-6)
    assert m["shape"] == [64, 32] and "64 leading rows" in m["note"]

    base, lora, after = _saved_adapter(tmp_path / "b", tie=True, extra_save=("lm_head",))
    stored = load_file(str(lora / "adapter_model.safetensors"))  # and a module the base does not have
    stored["base_model.model.score.modules_to_save.default.weight"] = torch.randn(3, 32)
    save_file(stored, str(lora / "adapter_model.safetensors"))
    res = _cli("diff", base, lora, "--out", tmp_path / "o3")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o3" / "results.json").read_text())
    rows = {m["name"]: m for m in doc["modules"]}
    W0 = load_file(str(base / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the head's base is the tied embedding
        S = svd64(after[name].double() - W0["model.embed_tokens.weight"].double())
        np.testing.assert_allclose(rows[name]["singular_values"][:3], S[:3], rtol=1e-6)
    assert "ties its output head" in rows["lm_head.weight"]["note"]
    assert "not in the base" in {s["name"]: s["reason"] for s in doc["skipped"]}["score.weight"]


def test_an_interrupted_runs_finding_counts_what_results_json_held(tmp_path):
    """A run killed between two rewrites of results.json: the report said "the numbers cover only the
    1 matrices finished" while the journal held 13. Now: "1 matrix", and that the journal holds every one."""

    from spectra.findings import diff_findings
    from spectra.results import DiffResult

    _tiny_pair(tmp_path)
    assert _cli("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--out", tmp_path / "o").exit_code == 0
    res = DiffResult.load(tmp_path / "o" / "results.json")
    res.modules, res.complete = res.modules[:1], False
    text = next(f.text for f in diff_findings(res) if f.topic == "incomplete")
    assert "1 matrix results.json held" in text and "results.jsonl" in text and "--resume" in text


def test_index_shards_are_read_in_the_order_of_their_spellings(tmp_path):
    """A tensor in two shards, listed as `a.safetensors` and `./b.safetensors`: transformers sorts the
    spellings (`./b…` first) and keeps a's copy; spectra sorted the normalised names and read b's (a
    silent wrong number, under a note saying it read as transformers does)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    x, y = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    W = {x: torch.randn(8, 8, generator=g), y: torch.randn(8, 8, generator=g)}
    save_file(W, str(tmp_path / "base.safetensors"))
    (tmp_path / "t").mkdir()
    a_copy, b_copy = W[x] + 1.0, W[x] + 0.01
    save_file({x: a_copy, y: W[y]}, str(tmp_path / "t" / "a.safetensors"))
    save_file({x: b_copy}, str(tmp_path / "t" / "b.safetensors"))
    (tmp_path / "t" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {y: "a.safetensors", x: "./b.safetensors"}}))
    res = _cli("diff", tmp_path / "base.safetensors", tmp_path / "t", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    fro = {m["name"]: m["fro_norm"] for m in doc["modules"]}[x]
    assert abs(fro - float((a_copy - W[x]).double().norm())) < 1e-5  # a's copy, as transformers reads it
    assert any("more than one shard" in w and "read from a.safetensors" in w for w in doc["warnings"])


def test_a_changed_matrix_renamed_in_spelling_is_named_not_called_identical(tmp_path):
    """Tuned stores down_proj as `Down_proj` (or with a trailing space, NFD accents, `/` separators):
    it did not pair, and the run said "base and tuned hold the same weights" (exit 3). Now the near
    miss is named and the verdict says what was not compared."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    q, d = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
    b = {q: torch.randn(16, 16, generator=g), d: torch.randn(16, 32, generator=g)}
    save_file(b, str(tmp_path / "b.safetensors"))
    for tag, name in (("case", d.replace("down", "Down")), ("space", d + " "), ("slash", d.replace(".", "/"))):
        save_file({q: b[q].clone(), name: b[d] + 0.1}, str(tmp_path / f"{tag}.safetensors"))
        res = _cli("diff", tmp_path / "b.safetensors", tmp_path / f"{tag}.safetensors", "--out", tmp_path / f"o_{tag}")
        assert res.exit_code == 3, res.output
        assert "same weights" not in res.output and "not paired" in res.output, res.output
        doc = json.loads((tmp_path / f"o_{tag}" / "results.json").read_text())
        assert any("only in its spelling" in w and repr(name) in w for w in doc["warnings"]), doc["warnings"]


def test_an_unmerged_peft_models_state_dict_is_refused(tmp_path):
    """torch.save(peft_model.state_dict()) as TUNED: q_proj.base_layer.weight and lora_A/B did not
    pair, every paired matrix was unchanged, and diff said "base and tuned hold the same weights"."""
    import peft

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    (tmp_path / "t").mkdir()
    torch.save({k: v.contiguous() for k, v in pm.state_dict().items()}, tmp_path / "t" / "pytorch_model.bin")
    (tmp_path / "t" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    res = _cli("diff", tmp_path / "base", tmp_path / "t")
    assert res.exit_code not in (0, 3) and "unmerged PEFT model" in res.output and "merge_and_unload" in res.output, res.output
    assert "Traceback" not in res.output


def test_adapter_factors_without_peft_prefix_are_said_not_to_load(tmp_path):
    """Factors stored as `model.layers.0…lora_A.weight` (no base_model.model.): PEFT loads none of them
    (merging changes nothing), spectra reported the update with no word."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    random_lora(model, 1, r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "lora")
    f = tmp_path / "lora" / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(str(f)).items()}, str(f))
    res = _cli("diff", tmp_path / "base", tmp_path / "lora", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    warnings = json.loads((tmp_path / "o" / "results.json").read_text())["warnings"]
    assert any("without the 'base_model.model.' prefix" in w and "loads none of them" in w for w in warnings), warnings


def test_relnorm_heatmap_on_a_log_scale_draws_an_unchanged_matrix(tmp_path):
    """rel_norm 0, 0.00095 and 0.093: the log colour scale masked the 0 and wrote no text, so the
    unchanged matrix drew as a blank cell, as a matrix that does not exist does."""
    from safetensors.torch import save_file

    from spectra.plots.diff import relnorm_heatmap
    from spectra.results import DiffResult

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    b = {n: torch.randn(8, 8, generator=g) for n in names}
    t = {n: b[n] + s * b[n].norm() / 8 * torch.randn(8, 8, generator=g) for n, s in zip(names, (0.0, 0.001, 0.1))}
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(t, str(tmp_path / "t.safetensors"))
    assert _cli("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--out", tmp_path / "o").exit_code == 0
    fig = relnorm_heatmap(DiffResult.load(tmp_path / "o" / "results.json"))
    ax = fig.axes[0]
    assert "1 cell at 0" in ax.get_title()
    assert "0" in [t.get_text() for t in ax.texts]  # the unchanged matrix's cell is written
    assert len(ax.images) == 2  # the values and the grey layer of cells off the log scale


def test_trace_finding_says_how_many_directions_were_compared(tmp_path):
    """Updates of rank 2 traced with top_k 8: the finding read "The top-8 input directions … barely
    turned: median φ = 1.00" while φ compared 2 directions of each (all the updates resolve)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]
    b = {n: torch.randn(24, 16, generator=g, dtype=torch.float64) for n in names}
    save_file(b, str(tmp_path / "base.safetensors"))
    D = {n: torch.randn(24, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 16, generator=g, dtype=torch.float64)
         for n in names}
    for step, s in ((10, 0.01), (20, 0.03)):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file({n: b[n] + s * D[n] for n in names}, str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    res = _cli("trace", tmp_path / "base.safetensors", tmp_path / "run", "--top-k", "8", "--out", tmp_path / "tr",
               "--no-plots")
    assert res.exit_code == 0, res.output
    from spectra.report_trace import findings

    doc = json.loads((tmp_path / "tr" / "trace.json").read_text())
    text = next(f.text for f in findings(tmp_path / "tr" / "trace.json", doc) if "input directions" in f.text)
    assert "median 2 resolved of the 8 asked" in text, text


def test_switch_and_nllb_experts_named_expert_n_are_experts():
    """Switch Transformers and NLLB-MoE name experts `experts.expert_3`: each expert was its own module
    kind ("expert_3.wi": 8 kinds per matrix in tables and heatmaps) with no expert index."""
    import transformers as T

    from spectra.naming import describe_checkpoint

    for cfg, cls in ((T.SwitchTransformersConfig(d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=2, num_decoder_layers=2,
                                                 num_experts=4, vocab_size=32, encoder_sparse_step=1, decoder_sparse_step=1),
                      T.SwitchTransformersForConditionalGeneration),
                     (T.NllbMoeConfig(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4, vocab_size=32,
                                      encoder_sparse_step=1, decoder_sparse_step=1), T.NllbMoeForConditionalGeneration)):
        with torch.device("meta"):
            model = cls(cfg)
        specs = describe_checkpoint({n: tuple(p.shape) for n, p in model.state_dict().items()})
        experts = {n: s for n, s in specs.items() if ".expert_" in n}
        assert experts, list(specs)[:20]
        for n, s in experts.items():
            assert s.expert == int(n.split(".expert_")[1].split(".")[0]) and "expert_" not in s.module, (n, s)
        assert len({s.module for s in experts.values()}) <= 4, {s.module for s in experts.values()}  # wi/wo or fc1/fc2 per stack


# ---- found by the review of this round's change ------------------------------------------------------
def test_an_index_whose_weight_map_holds_a_list_is_one_line(tmp_path):
    """The shard order read the weight map's values before checking them: a list gave a TypeError traceback."""
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": ["m-1.safetensors"]}}))
    res = _cli("inspect", tmp_path)
    assert res.exit_code == 1 and "index points outside its folder" in res.output and "Traceback" not in res.output


def test_a_saved_head_of_a_tied_base_with_added_tokens_is_measured(tmp_path):
    """Tokens added to a base that ties its head, lm_head in modules_to_save: the 72-row head was skipped
    as "not in the base: a module trained from scratch"; its 64 shared rows are measured against the embedding."""
    from safetensors.torch import load_file

    base, lora, after = _saved_adapter(tmp_path, tie=True, resize=8, extra_save=("lm_head",))
    res = _cli("diff", base, lora, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    rows = {m["name"]: m for m in json.loads((tmp_path / "o" / "results.json").read_text())["modules"]}
    E = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"].double()
    S = svd64(after["lm_head.weight"][:64].double() - E)
    np.testing.assert_allclose(rows["lm_head.weight"]["singular_values"][:3], S[:3], rtol=1e-6)
    assert rows["lm_head.weight"]["shape"] == [64, 32] and "64 leading rows" in rows["lm_head.weight"]["note"]


def test_unmerged_peft_layers_are_refused_only_against_a_plain_weight(tmp_path):
    """A base that ships its own unmerged LoRA layers (as Phi-4-multimodal does) against a merged tuned
    model was told to "pass the adapter folder as TUNED"; both sides with such layers pair tensor by tensor."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    q, d = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj.weight"
    lora = {f"{q}.base_layer.weight": torch.randn(8, 8, generator=g), f"{q}.lora_A.speech.weight": torch.randn(2, 8, generator=g),
            f"{q}.lora_B.speech.weight": torch.randn(8, 2, generator=g), d: torch.randn(8, 16, generator=g)}
    save_file(lora, str(tmp_path / "b.safetensors"))
    save_file({f"{q}.weight": lora[f"{q}.base_layer.weight"] + 0.1, d: lora[d] + 0.1}, str(tmp_path / "merged.safetensors"))
    res = _cli("diff", tmp_path / "b.safetensors", tmp_path / "merged.safetensors")
    assert res.exit_code == 1 and "base is the state dict of an unmerged PEFT model" in res.output
    assert "as TUNED" not in res.output and "Traceback" not in res.output
    save_file({k: v + 0.1 for k, v in lora.items()}, str(tmp_path / "t.safetensors"))  # both sides ship the layers
    res = _cli("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output


def test_peft_internal_copies_and_trainable_tokens_get_their_own_reasons(tmp_path):
    """PEFT's `original_module` / `modules_to_save` copies and a `trainable_tokens_delta` were skipped
    as "not in the base: a module trained from scratch (e.g. a new classification head)"."""
    from safetensors.torch import load_file, save_file

    base, lora, _ = _saved_adapter(tmp_path)
    f = lora / "adapter_model.safetensors"
    stored = load_file(str(f))
    stored["base_model.model.lm_head.original_module.weight"] = torch.randn(64, 32)
    stored["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.randn(3, 32)
    save_file(stored, str(f))
    res = _cli("diff", base, lora, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    why = {s["name"]: s["reason"] for s in json.loads((tmp_path / "o" / "results.json").read_text())["skipped"]}
    assert "internal copy" in why["lm_head.original_module.weight"]
    assert "trainable token rows" in why["model.embed_tokens.token_adapter.trainable_tokens_delta"]


def test_resume_of_an_adapter_diff_keeps_what_was_done(tmp_path):
    """`--resume` was ignored for adapter diffs: the journal was emptied and every matrix computed again
    (now that saved embeddings and heads are dense decompositions, the costly part)."""
    base, lora, _ = _saved_adapter(tmp_path)
    out = tmp_path / "o"
    assert _cli("diff", base, lora, "--out", out).exit_code == 0
    first = json.loads((out / "results.json").read_text())
    journal = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(journal[:2]) + "\n")  # a run stopped after two matrices
    kept = [json.loads(x)["module"]["name"] for x in journal[:2]]
    res = _cli("diff", base, lora, "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    again = json.loads((out / "results.json").read_text())
    assert sorted(m["name"] for m in again["modules"]) == sorted(m["name"] for m in first["modules"])
    by = {m["name"]: m for m in again["modules"]}
    for m in first["modules"]:
        assert by[m["name"]]["singular_values"] == m["singular_values"]
    assert [json.loads(x)["module"]["name"] for x in (out / "results.jsonl").read_text().splitlines()][:2] == kept
    other, _, _ = _saved_adapter(tmp_path / "other")  # another base: the journal is not this run's
    res = _cli("diff", other, lora, "--out", out, "--resume")
    assert res.exit_code != 0 and "different inputs or options" in res.output


def test_extract_of_an_adapter_counts_its_saved_matrices_in_the_totals(tmp_path):
    """extract BASE ADAPTER of an adapter with modules_to_save (lm_head, embed_tokens): energy_kept_all
    1.0 and not_extracted_energy_share 0 while the saved matrices were left out of the adapter written
    (PEFT's merge reproduced 0.81 of ‖ΔW‖²). Now they count: not held unless --save-modules."""
    from safetensors.torch import load_file

    base, lora, after = _saved_adapter(tmp_path)
    res = _cli("extract", base, lora, "-o", tmp_path / "x", "--energy", "0.999")
    assert res.exit_code == 0, res.output
    totals = json.loads((tmp_path / "x" / "extract.json").read_text())["totals"]
    W0 = load_file(str(base / "model.safetensors"))
    saved = sum(float((after[n].double() - W0[n].double()).pow(2).sum()) for n in ("lm_head.weight", "model.embed_tokens.weight"))
    lora_e = totals["energy_kept"]  # of the LoRA modules, whose own energy is below
    from spectra.io.adapter import open_adapter

    ad = open_adapter(lora)
    lora_total = sum(float((m.scale * m.B.double() @ m.A.double()).pow(2).sum()) for m in ad.modules.values())
    assert totals["not_extracted_energy_share"] == pytest_approx(saved / (saved + lora_total))
    assert totals["energy_kept_all"] == pytest_approx(lora_e * lora_total / (saved + lora_total))
    res = _cli("extract", base, lora, "-o", tmp_path / "y", "--energy", "0.999", "--save-modules")
    assert res.exit_code == 0, res.output
    kept = json.loads((tmp_path / "y" / "extract.json").read_text())["totals"]
    assert kept["not_extracted_energy_share"] == 0.0
    assert kept["energy_kept_all"] == pytest_approx((lora_e * lora_total + saved) / (saved + lora_total))


# ---- found by the hang/leak probe ------------------------------------------------------------------------
def test_results_json_above_the_generic_json_cap_is_read_back(tmp_path):
    """A 20,000-matrix run with --weight-spectra wrote a 113 MB results.json that report, recommend,
    DiffResult.load and --resume refused ("more than 100000000 is not a results.json … corrupt"): the
    generic cap on JSON files read whole. spectra's own results files are read up to the journal's bound."""

    from spectra.io.jsonfile import MAX_JSON_BYTES
    from spectra.results import DiffResult

    _tiny_pair(tmp_path)
    out = tmp_path / "o"
    assert _cli("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--out", out).exit_code == 0
    with open(out / "results.json", "a") as f:  # as large as a big run's, and still valid JSON
        f.write(" " * (MAX_JSON_BYTES + 1))
    assert len(DiffResult.load(out / "results.json").modules) == 2
    res = _cli("report", out, "-o", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    res = _cli("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--out", out, "--resume")
    assert res.exit_code == 0, res.output


def test_a_killed_rewrites_temporary_file_is_removed_by_the_next_run(tmp_path):
    """SIGKILL during a rewrite of results.json left `.results.json.XXXXXXXX.tmp` (as large as the
    results) that neither --resume nor a fresh run removed. The next run holding the folder's lock
    removes such files beside its outputs, and nothing else."""

    _tiny_pair(tmp_path)
    out = tmp_path / "o"
    assert _cli("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--out", out).exit_code == 0
    stale, other = out / ".results.json.k9x_2ab7.tmp", out / ".notes.txt.k9x_2ab7.tmp"
    stale.write_text("{")
    (out / "notes.txt").write_text("a user's file")  # and a temporary file of another tool beside it (review)
    other.write_text("not spectra's")
    res = _cli("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    assert not stale.exists() and other.exists()


def test_a_stop_before_any_result_does_not_promise_a_resume(tmp_path, monkeypatch):
    """SIGTERM while a 500k-entry header was still being read: "results finished so far are kept in
    out (in its journal); run the same command with --resume", for a folder never created (--resume
    then said "nothing to resume")."""
    from spectra_cli.main import kept_on_stop, main

    monkeypatch.chdir(tmp_path)
    ctx = main.make_context("spectra", ["diff", "B", "T", "--out", "D"])
    assert "stopped before any result was written to D" in kept_on_stop(main, ctx)
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / "results.jsonl").write_text('{"module": {"name": "x"}}\n')
    assert "kept in D (in its journal" in kept_on_stop(main, ctx)


def test_adapters_saved_in_sub_folders_are_named(tmp_path):
    """PEFT saves an adapter of another name than "default" in a sub-folder of that name: `diff BASE
    FOLDER` said "no model.safetensors … (pass a checkpoint file or a Hugging Face model folder)", and a
    folder holding the default adapter and another one read the first without a word on the second."""
    import shutil

    base, lora, _ = _saved_adapter(tmp_path)
    (tmp_path / "only").mkdir()
    shutil.copytree(lora, tmp_path / "only" / "speech")
    res = _cli("diff", base, tmp_path / "only")
    assert res.exit_code == 1 and "PEFT adapters in sub-folders (speech)" in res.output, res.output
    shutil.copytree(lora, lora / "checkpoint-500")  # a Trainer's checkpoints are a run, not named adapters (review)
    res = _cli("diff", base, lora, "--out", tmp_path / "o0")
    assert res.exit_code == 0, res.output
    assert not any("sub-folders" in w for w in json.loads((tmp_path / "o0" / "results.json").read_text())["warnings"])
    shutil.copytree(lora / "speech" if (lora / "speech").exists() else tmp_path / "only" / "speech", lora / "second")
    res = _cli("diff", base, lora, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    warnings = json.loads((tmp_path / "o" / "results.json").read_text())["warnings"]
    assert any("also holds PEFT adapters in sub-folders (second), not read" in w for w in warnings), warnings


def test_train_reads_a_large_corpus_only_as_far_as_the_run_needs(tmp_path):
    """`train --data 27MB.txt --steps 2 --batch 2 --seq-len 16` held the whole corpus as token lists
    (1.8 GB for 64 tokens drawn; ~50× the file); --eval-source likewise. A text file is read as far as
    a pool of 64× the blocks the run draws (the eval source: the blocks it scores), said in
    train_config.json; its blocks are the whole file's leading ones."""
    import pydoc_data.topics as topics

    from spectra.training import TrainConfig, data_blocks
    from spectra.training_inputs import ByteTokenizer, leading_blocks, read_examples, token_blocks

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    big = tmp_path / "big.txt"
    big.write_text(text * 3, encoding="utf-8")  # ~2 MB: more than the first 64 KiB read
    tok = ByteTokenizer()
    whole_ids, whole_labels = token_blocks(read_examples(big), tok, 64)
    ids, labels, whole = leading_blocks(big, tok, 64, 5000)
    assert not whole and torch.equal(ids, whole_ids[:5000]) and torch.equal(labels, whole_labels[:5000])
    ids, _, whole = leading_blocks(big, tok, 64, 10**9)  # more than the file holds: all of it
    assert whole and torch.equal(ids, whole_ids)
    (tmp_path / "folder").mkdir()  # a folder is read whole, and all of it used (review: it was cut to the pool)
    (tmp_path / "folder" / "a.txt").write_text(text, encoding="utf-8")
    ids, _, whole = leading_blocks(tmp_path / "folder", tok, 64, 10)
    assert whole and len(ids) == len(token_blocks(read_examples(tmp_path / "folder"), tok, 64)[0]) > 10

    model = tiny_llama(vocab=256)
    model.save_pretrained(tmp_path / "base")
    cfg = TrainConfig(base=str(tmp_path / "base"), data=str(big), out=str(tmp_path / "run"), steps=2, batch=2, seq_len=16,
                      device="cpu", trace_every=0)
    # a text as large as the data, not a copy of it (--eval-source equal to --data, or a copy of it, is refused)
    source = tmp_path / "source.txt"
    source.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics, reverse=True)) * 3, encoding="utf-8")
    res = _cli("train", "--base", tmp_path / "base", "--data", big, "--eval-source", source, "--steps", "2", "--batch", "2",
               "--seq-len", "16", "--device", "cpu", "--trace-every", "0", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    read = json.loads((tmp_path / "run" / "train_config.json").read_text())["data_read"]
    assert read["blocks"] == data_blocks(cfg) and "holds more than the run can use" in read["note"]


def test_interfere_represents_a_dora_update_by_its_top_r_directions_as_compare_does(tmp_path):
    """A DoRA update is dense: compare compares its top r directions, interfere took its top_k (16 of
    a rank-2 adapter), so one pair of adapters had two sets of ranks and φ."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    random_lora(tiny_llama(), 1, r=2, use_dora=True, target_modules=["q_proj"]).save_pretrained(tmp_path / "dora")
    random_lora(tiny_llama(), 2, r=4, target_modules=["q_proj"]).save_pretrained(tmp_path / "lora")
    res = _cli("interfere", tmp_path / "dora", tmp_path / "lora", "--base", tmp_path / "base", "--json", "--no-plots")
    assert res.exit_code == 0, res.output
    doc = json.JSONDecoder().raw_decode(res.output[res.output.index("{"):])[0]
    assert [m["ranks"] for m in doc["modules"]] == [[2, 4], [2, 4]]
    res = _cli("compare", tmp_path / "dora", tmp_path / "lora", "--base", tmp_path / "base", "--json")
    assert res.exit_code == 0, res.output
    cmp = json.JSONDecoder().raw_decode(res.output[res.output.index("{"):])[0]
    assert [(m["rank_a"], m["rank_b"]) for m in cmp["modules"]] == [(2, 4), (2, 4)]
