"""A non-zero dense update can have no resolved direction (all of it at the rounding level of its stored
weights: docs/definitions.md, "Subspaces"), and a PEFT adapter can store modules whole
(``modules_to_save``): interfere, trace and compare say so instead of reporting "no interference",
null turns without a word, or a module the adapter updated as "only in the other input"."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import torch
from click.testing import CliRunner

from spectra_cli.main import main
from tests.conftest import tiny_llama, weight_folders

NAME = "model.layers.0.self_attn.q_proj.weight"


def _json(output: str) -> dict:
    return json.JSONDecoder().raw_decode(output[output.index("{"):])[0]


def _flat(text: str) -> str:
    """Console text with the line wrapping undone."""
    return " ".join(text.split())


def _run(args: list[str]):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return r


def _orth(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def _folders(root: Path, weights: dict[str, torch.Tensor]) -> dict[str, Path]:
    return weight_folders(root, weights, NAME)


def _noise_case(root: Path) -> dict[str, Path]:
    """A 64×64 float32 base, two all-rounding-noise fine-tunes (1e-9·max|W| jitter: isolated 1-ulp
    flips, ΔW ≠ 0 but no direction above the floor) and one real rank-2 fine-tune."""
    g = torch.Generator().manual_seed(9)
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    U, V = _orth(64, 2, g), _orth(64, 2, g)
    noise = [W + 1e-9 * W.abs().max() * torch.randn(64, 64, generator=g, dtype=torch.float64) for _ in range(2)]
    return _folders(root, {"base": W, "n1": noise[0], "n2": noise[1], "real": W + 0.05 * U @ V.T})


# ---- 1. interfere ------------------------------------------------------------------------------------------
def test_interfere_all_unresolved_tsv_is_null_with_a_warning(tmp_path):
    """Two all-noise tasks: ranks [0, 0]. TSV was 0.0 ("no interference") and the pairwise TSV table empty
    with no word; now sti/relative/relative_fro and the summary's tsv_relative are null, the module says
    which tasks are at the rounding level, a warning counts them, and the JSON/CSV/report/plots/findings work."""
    f = _noise_case(tmp_path)
    out = tmp_path / "o"
    r = _run(["interfere", "--base", str(f["base"]), str(f["n1"]), str(f["n2"]), "--out", str(out), "--report"])
    d = json.loads((out / "interfere.json").read_text())
    (m,) = d["modules"]
    assert m["ranks"] == [0, 0] and all(x > 0 for x in m["fro"])
    assert m["tsv"]["sti"] is None and m["tsv"]["relative"] is None and m["tsv"]["relative_fro"] is None
    assert d["summary"]["tsv_relative"] is None and d["summary"]["tsv_relative_fro"] is None
    assert m["unresolved"] == [0, 1]
    assert f"{f['n1']}: every singular value of its update is at the rounding level of its float32 weights" in m["note"]
    assert f"{f['n2']}: every singular value" in m["note"]
    warn = [w for w in d["warnings"] if "rounding level of its stored weights" in w]
    assert len(warn) == 2 and str(f["n1"]) in warn[0] and str(f["n2"]) in warn[1], d["warnings"]
    assert "rounding level of its stored weights" in _flat(r.stderr)
    assert "TSV (ℓ1)" in r.stdout and "0.000" not in r.stdout
    assert "undefined in every matrix" in _flat(r.stdout)  # the empty pairwise TSV table says why
    rows = list(csv.DictReader(io.StringIO((out / "interfere.csv").read_text())))
    assert rows[0]["tsv_all"] == "" and rows[0]["sti_all"] == ""
    html = (out / "report.html").read_text()
    assert "rounding level" in html
    # the report's findings (used by the report above) and the CLI ran on the nulls without a crash
    from spectra.report_interfere import findings

    texts = [x.text for x in findings(out / "interfere.json", d)]
    assert any("rounding level" in t for t in texts), texts
    assert not any("φ nan" in t or "φ None" in t for t in texts)


def test_interfere_one_task_resolved_is_null_not_zero(tmp_path):
    """One real task and one all-noise task: the n-way TSV over a single task with directions has no
    normaliser ((n−1)² = 0), so it is null, not 0 ("no interference"); the noise task alone is named."""
    f = _noise_case(tmp_path)
    d = _json(_run(["interfere", "--base", str(f["base"]), str(f["real"]), str(f["n1"]), "--json", "--no-plots"]).output)
    (m,) = d["modules"]
    assert m["ranks"] == [2, 0] and m["unresolved"] == [1]
    assert m["tsv"]["relative"] is None and m["tsv"]["sti"] is None
    assert any(str(f["n1"]) in w and "rounding level of its stored weights" in w for w in d["warnings"])
    assert not any(str(f["real"]) in w and "rounding level of its stored weights" in w for w in d["warnings"])


# ---- 2. trace ------------------------------------------------------------------------------------------------
def test_trace_point_at_rounding_level_says_why_its_turn_is_null(tmp_path):
    """Checkpoints 10 and 30 hold a rank-2 update, 20 only rounding noise: point 20's turns are null, and
    now its turn_note says why and a run warning counts such points."""
    g = torch.Generator().manual_seed(5)
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    U, V = _orth(64, 2, g), _orth(64, 2, g)
    noise = W + 1e-9 * W.abs().max() * torch.randn(64, 64, generator=g, dtype=torch.float64)
    ws = {"base": W, "run/checkpoint-10": W + 0.05 * U @ V.T, "run/checkpoint-20": noise, "run/checkpoint-30": W + 0.1 * U @ V.T}
    f = _folders(tmp_path, ws)
    for step in (10, 20, 30):
        (f[f"run/checkpoint-{step}"] / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    r = _run(["trace", str(f["base"]), str(tmp_path / "run"), "--out", str(tmp_path / "t"), "--no-plots"])
    (tm,) = json.loads((tmp_path / "t" / "trace.json").read_text())["matrices"]
    p10, p20, p30 = tm["points"]
    assert p20["fro_norm"] > 0 and p20["turn_first"] is None and p20["turn_prev"] is None
    assert "rounding level of its float32 weights" in p20["turn_note"]
    assert "turn_note" not in p10 and p30["turn_note"].startswith("turn_prev is from step 10")  # (13th round: said)
    assert p30["turn_prev"]["right"]["phi"] > 0.99  # against step 10's subspace, the last one with directions
    assert "1 point (a matrix at one checkpoint)" in _flat(r.stderr) and "rounding level" in _flat(r.stderr)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t" / "trace.csv").read_text())))
    assert rows[1]["turn_note"].startswith("every singular value of ΔW is at the rounding") and rows[0]["turn_note"] == ""


# ---- 3. compare ---------------------------------------------------------------------------------------------
def test_compare_unresolved_finding_note_and_legend(tmp_path):
    """(a) a finding counts the unresolved modules and names one; (b) the note does not say "A's update
    resolves 0 directions … subspaces of the resolved rank are compared"; (c) the legend mentions
    rounding-level updates; (d) both sides unresolved reads "of A's and B's updates"."""
    f = _noise_case(tmp_path)
    r = _run(["compare", str(f["n1"]), str(f["real"]), "--base", str(f["base"])])
    assert "rounding level" in _flat(r.stdout).split("– = undefined", 1)[1][:200]
    assert "rounding level" in _flat(r.stderr) and "1 of 1 modules" in _flat(r.stderr)
    d = _json(_run(["compare", str(f["n1"]), str(f["real"]), "--base", str(f["base"]), "--json"]).output)
    (mm,) = d["modules"]
    assert mm["status"] == "unresolved" and "resolves 0 direction" not in (mm["note"] or "")
    d = _json(_run(["compare", str(f["n1"]), str(f["n2"]), "--base", str(f["base"]), "--json"]).output)
    (mm,) = d["modules"]
    assert mm["status"] == "unresolved" and mm["reason"].startswith("every singular value of A's and B's updates is at")
    import spectra.compare_records as compare_records
    from spectra.compare_findings import compare_findings, table_legend
    from spectra.compare_records import CompareResult

    assert compare_records.unresolved_reason.__doc__  # (d): the reason's helper says what it words
    found = compare_findings(CompareResult.from_dict(d))
    unres = [x for x in found if x.topic == "unresolved"]
    assert len(unres) == 1 and unres[0].numbers["unresolved"] == 1 and NAME.split(".")[-2] in unres[0].text
    assert "rounding" in dict(table_legend("right", with_base=True))["–"]
    import spectra.plots.compare as pc

    assert "rounding" in pc.__doc__


# ---- 4. modules_to_save -------------------------------------------------------------------------------------
def _peft_case(root: Path) -> dict[str, Path]:
    """tiny_llama, a PEFT LoRA r = 2 on q_proj with lm_head stored whole (and changed), and its merge."""
    import peft

    m = tiny_llama()
    m.save_pretrained(root / "base")
    torch.manual_seed(1)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.01 * torch.randn_like(p))
    pm.save_pretrained(root / "lora")
    pm.merge_and_unload().save_pretrained(root / "merged")
    return {"base": root / "base", "lora": root / "lora", "merged": root / "merged"}


def test_compare_and_trace_list_modules_to_save(tmp_path):
    """compare listed B's lm_head as only in B (as if A had not updated it) and trace said "0 matrices
    skipped" while leaving it out: both now list it as skipped, stored whole, measured by spectra diff."""
    f = _peft_case(tmp_path)
    d = _json(_run(["compare", str(f["lora"]), str(f["merged"]), "--base", str(f["base"]), "--json"]).output)
    assert "lm_head.weight" not in d["b_only"]
    (sk,) = [s for s in d["skipped"] if s["name"] == "lm_head.weight"]
    assert "modules_to_save" in sk["reason"] and "spectra diff BASE ADAPTER" in sk["reason"] and sk["reason"].startswith("A (")
    assert {m["name"] for m in d["modules"]} == {f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)}
    # B against A: the same, from the other side
    d = _json(_run(["compare", str(f["merged"]), str(f["lora"]), "--base", str(f["base"]), "--json"]).output)
    assert "lm_head.weight" not in d["a_only"] and any(s["name"] == "lm_head.weight" for s in d["skipped"])
    # trace: a run of two adapter checkpoints
    for step in (1, 2):
        shutil.copytree(f["lora"], tmp_path / "run" / f"checkpoint-{step}")
    r = _run(["trace", str(f["base"]), str(tmp_path / "run"), "--out", str(tmp_path / "t"), "--no-plots"])
    t = json.loads((tmp_path / "t" / "trace.json").read_text())
    (sk,) = [s for s in t["skipped"] if s["name"] == "lm_head.weight"]
    assert "modules_to_save" in sk["reason"] and "spectra diff BASE ADAPTER" in sk["reason"]
    assert "1 matrix skipped" in _flat(r.stderr), r.stderr
    # --resume of the finished run keeps the list
    r = _run(["trace", str(f["base"]), str(tmp_path / "run"), "--out", str(tmp_path / "t"), "--no-plots", "--resume"])
    t = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert [s["name"] for s in t["skipped"]] == ["lm_head.weight"]
