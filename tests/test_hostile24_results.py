"""Twenty-fourth round, results read back (docs/bad_inputs.md, "twenty-fourth round"): trace's turn of directions said
against chance, and hand-edited result files whose fields contradict each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spectra.report_trace import findings as trace_findings
from spectra.trace import TraceConfig, trace


def _run(root: Path) -> tuple[str, list[str]]:
    """A base of 32 × 32 matrices and a run folder of two unrelated checkpoints (noise, then other noise)."""
    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(32, 32, generator=g) for i in range(2) for m in ("q_proj", "o_proj")}
    save_file(W, str(root / "base.safetensors"))
    for step in (1, 2):
        d = root / "run" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in W.items()}, str(d / "model.safetensors"))
    return str(root / "base.safetensors"), [str(root / "run")]


def test_trace_says_unrelated_directions_are_at_chance_and_a_full_width_k_tells_nothing(tmp_path):
    """Two unrelated checkpoints at --top-k 32 on 32-wide matrices: "barely turned since the first checkpoint: median
    φ = 1.00" (any two 32-dimensional subspaces of R³² coincide); at the default k = 8, φ = 0.25 = 8/32 was "turned
    away" with no word that this is chance."""
    base, run = _run(tmp_path)
    full = trace(base, run, config=TraceConfig(top_k=32))
    text = " ".join(f.text for f in trace_findings(tmp_path / "t.json", full.to_dict()))
    assert "barely turned" not in text and "says nothing here" in text
    eight = trace(base, run, config=TraceConfig(top_k=8))
    turn = next(f for f in trace_findings(tmp_path / "t.json", eight.to_dict()) if "input directions" in f.text)
    assert "at chance" in turn.text and turn.numbers["phi_random"] == 8 / 32
    assert abs(turn.numbers["phi_first_last"] - 0.25) < 0.15  # unrelated noise: near 8/32


def _edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_hand_edits_that_contradict_the_records_own_fields_are_refused(tmp_path):
    """`spectra report` stated them: an α of 7.5 counted "over-trained" by its old flag; a φ baseline of 0.01 (it is
    max(r_A, r_B)/d = 0.25) turned "at chance" into "far more than chance"; an intruder count beside max_cos that
    holds another; extract's rel_fro_error 0.9 beside energy_kept 0.9994 and totals.energy_kept 0.5 beside modules
    that all keep ≥ 90%; trace's rel_norm 0.001 where fro_norm / base_fro_norm is 1.9."""
    from spectra import CompareConfig, compare
    from spectra.errors import ResultsFormatError
    from spectra.esd_run import esd
    from spectra.extract import ExtractConfig, extract
    from spectra.report import build_report

    base, run = _run(tmp_path)
    tuned = str(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    out = tmp_path / "o"
    esd(tuned, out_dir=out, plots=False)
    compare(str(tmp_path / "run" / "checkpoint-1" / "model.safetensors"), tuned, base=base, out_dir=out, plots=False,
            config=CompareConfig(top_k=4))
    extract(base, tuned, out / "x", config=ExtractConfig(energy=0.9), plots=False)
    trace(base, run, out_dir=out, plots=False)
    build_report([out / n for n in ("esd.json", "compare.json", "trace.json")] + [out / "x" / "extract.json"])  # as written

    def alpha(doc):
        m = next(m for m in doc["matrices"] if m["warning"] == "")
        m["alpha"] = 1.5
    def random(doc):
        doc["modules"][0]["phi"]["right"]["random"] = 0.01
    def counts(doc):
        intr = doc["modules"][0]["intruders"]["b"]
        intr["counts"] = {e: (c + 1) % (len(intr["max_cos"]) + 1) for e, c in intr["counts"].items()}
    def error(doc):
        m = next(m for m in doc["modules"] if m["energy_kept"] and m["energy_kept"] > 0.5)
        m["rel_fro_error"] = 0.9
    def totals(doc):
        doc["totals"]["energy_kept"] = min(m["energy_kept"] for m in doc["modules"] if m["energy_kept"]) / 2
    def rel(doc):
        doc["matrices"][0]["points"][-1]["rel_norm"] = 0.001

    for name, change, field in (("esd.json", alpha, "warning"), ("compare.json", random, "phi.right.random"),
                                ("compare.json", counts, "counts"), ("x/extract.json", error, "rel_fro_error"),
                                ("x/extract.json", totals, "totals.energy_kept"), ("trace.json", rel, "rel_norm")):
        path = out / name
        kept = path.read_text()
        _edit(path, change)
        with pytest.raises(ResultsFormatError, match=field.replace(".", r"\.").replace("[", r"\[")):
            build_report([path])
        path.write_text(kept)


def test_a_resumed_trackers_trace_jsonl_still_reports(tmp_path):
    """The review: a training resumed where the tracker cannot read the base again measures from the resumed weights,
    each line with its own base norm; the round's rel_norm check refused the report of such a trace.jsonl."""
    from spectra.callbacks import SpectraTracker
    from spectra.report import build_report

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].mlp = torch.nn.Module()
    model.layers[0].mlp.up_proj = torch.nn.Linear(16, 24, bias=False)
    for resume, steps in ((None, (1, 2)), (2, (3, 4))):
        tracker = SpectraTracker(model, every=1, out_dir=tmp_path / "run", **({"resume_step": resume} if resume else {}))
        for step in steps:
            with torch.no_grad():
                model.layers[0].mlp.up_proj.weight.add_(0.05 * torch.randn(24, 16))
            tracker.step(model, step)
        tracker.close()
    assert "trace" in build_report([tmp_path / "run" / "trace.jsonl"]).lower()


def test_esd_of_a_constant_matrix_plots_and_reports(tmp_path):
    """An all-ones matrix (a rank-1 Gram whose other eigenvalues are the solver's subnormals, down to 2.5e-323): the
    log-log panel's bins ~1e-323 wide overflowed its density, and `spectra esd` ended in matplotlib's OverflowError
    (exit 1); `spectra report` refused the esd.json that `--no-plots` wrote, as if edited by hand."""
    from tests.cli_util import cli

    save_file({"model.layers.0.mlp.g.weight": torch.ones(64, 64),
               "model.layers.0.mlp.h.weight": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "m.safetensors"))
    r = cli(["esd", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "e")], cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "e" / "esd_plots.png").is_file()
    r = cli(["report", str(tmp_path / "e"), "-o", str(tmp_path / "r.html")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
