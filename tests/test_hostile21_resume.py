"""Twenty-first round, a journal line repeated (an edited or concatenated journal) before ``--resume``: ``esd`` and
``trace`` keep one record per matrix with a warning (as ``diff`` does), not the matrix twice in the result and its
count; ``spectra report`` refuses an ``esd.json`` or ``trace.json`` listing a matrix twice; a ``trace.jsonl`` of the
training callback with a line repeated keeps the first of the (matrix, step) and says so."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import ResultsFormatError
from spectra.esd_results import EsdResult
from spectra.esd_run import EsdConfig, esd
from spectra.trace import load_trace, trace
from tests.cli_util import cli as _cli

D = 16
NAMES = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def _weights(step: int) -> dict[str, torch.Tensor]:
    """The base (step 0), or the base plus an update growing with the step."""
    out = {}
    for j, n in enumerate(NAMES):
        g = torch.Generator().manual_seed(j)
        w = 0.05 * torch.randn(32, D, generator=g)
        out[n] = w + step / 100 * torch.randn(32, D, generator=g) if step else w
    return out


def _folder(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    save_file(_weights(step), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if step:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                               "log_history": [{"step": step, "loss": 1 / step}]}))
    return folder


def _repeat_second_line(journal: Path, keep: int) -> None:
    """The journal of a run stopped after ``keep`` records, with its first record (line 2) appended again."""
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:1 + keep]) + lines[1])


def test_esd_resume_keeps_one_record_per_name_and_report_refuses_a_name_twice(tmp_path):
    model = _folder(tmp_path / "model", 0)
    whole = esd(str(model), out_dir=tmp_path / "a", config=EsdConfig(device="cpu"), plots=False)
    out = tmp_path / "b"
    out.mkdir()
    (out / "esd.jsonl").write_text((tmp_path / "a" / "esd.jsonl").read_text())
    _repeat_second_line(out / "esd.jsonl", keep=3)
    res = esd(str(model), out_dir=out, config=EsdConfig(device="cpu"), resume=True, plots=False)
    names = [m.name for m in res.matrices]
    assert sorted(names) == sorted(m.name for m in whole.matrices) and len(names) == len(NAMES)
    assert any("repeated record" in w and "first of each was kept" in w for w in res.warnings), res.warnings
    doc = json.loads((out / "esd.json").read_text())
    assert len(doc["matrices"]) == len(NAMES) and len({m["name"] for m in doc["matrices"]}) == len(NAMES)
    with open(out / "esd.csv", newline="") as f:
        assert Counter(r["name"] for r in csv.DictReader(f)).most_common(1)[0][1] == 1

    # an esd.json listing a matrix twice: refused by its loader and by the report, naming the file and the name
    doc["matrices"].append(doc["matrices"][1])
    (out / "esd.json").write_text(json.dumps(doc))
    with pytest.raises(ResultsFormatError, match="came before"):
        EsdResult.load(out)
    rep = _cli(["report", str(out / "esd.json"), "-o", str(tmp_path / "r.html")], tmp_path)
    assert rep.returncode == 1 and not (tmp_path / "r.html").exists(), rep.stderr
    lines = [x for x in rep.stderr.splitlines() if x.strip()]
    assert "esd.json" in lines[0] and doc["matrices"][1]["name"] in lines[0] and "Traceback" not in rep.stderr, rep.stderr


def _run(tmp_path: Path) -> tuple[Path, Path]:
    base = _folder(tmp_path / "base", 0)
    for step in (10, 20):
        _folder(tmp_path / "run" / f"checkpoint-{step}", step)
    return base, tmp_path / "run"


def test_trace_resume_keeps_one_record_per_matrix_and_report_refuses_a_matrix_twice(tmp_path):
    base, run = _run(tmp_path)
    whole = trace(str(base), [str(run)], out_dir=tmp_path / "a", plots=False)
    out = tmp_path / "b"
    out.mkdir()
    (out / "trace_journal.jsonl").write_text((tmp_path / "a" / "trace_journal.jsonl").read_text())
    _repeat_second_line(out / "trace_journal.jsonl", keep=3)
    res = trace(str(base), [str(run)], out_dir=out, resume=True, plots=False)
    assert [m["name"] for m in res.matrices] == [m["name"] for m in whole.matrices]
    assert res.matrices == whole.matrices
    assert any("repeated record" in w and "first of each was kept" in w for w in res.warnings), res.warnings
    doc = json.loads((out / "trace.json").read_text())
    assert len({m["name"] for m in doc["matrices"]}) == len(doc["matrices"]) == len(NAMES)

    doc["matrices"].append(doc["matrices"][2])
    (out / "trace.json").write_text(json.dumps(doc))
    rep = _cli(["report", str(out / "trace.json"), "-o", str(tmp_path / "r.html")], tmp_path)
    assert rep.returncode == 1 and not (tmp_path / "r.html").exists(), rep.stderr
    lines = [x for x in rep.stderr.splitlines() if x.strip()]
    assert "trace.json" in lines[0] and doc["matrices"][2]["name"] in lines[0] and "Traceback" not in rep.stderr, rep.stderr


def test_tracker_jsonl_with_a_repeated_line_keeps_the_first_and_says_so(tmp_path):
    """A training callback's trace.jsonl (one line per matrix and measurement) with a line repeated: the matrix's
    point at that step is the first line's, and the trace says a line was repeated (the report shows it)."""
    base, run = _run(tmp_path)
    doc = trace(str(base), [str(run)]).to_dict()
    lines = [json.dumps({"header": {"kind": "full", "config": doc["config"]}})]
    for m in doc["matrices"]:
        meta = {k: v for k, v in m.items() if k != "points"}
        lines += [json.dumps({"kind": "full", "step": p["step"], "loss": None, "matrix": meta,
                              "point": {k: v for k, v in p.items() if k != "step"}}) for p in m["points"]]
    edited = json.loads(lines[1])
    edited["point"]["fro_norm"] = 123.0  # the repeated line, told apart: the first is kept
    path = tmp_path / "tracked" / "trace.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join([*lines, json.dumps(edited)]) + "\n")
    res = load_trace(path)
    first = next(m for m in res.matrices if m["name"] == edited["matrix"]["name"])
    assert first["points"][0]["fro_norm"] == json.loads(lines[1])["point"]["fro_norm"]
    assert len(res.matrices) == len(NAMES)
    assert any("repeated" in w and "first of each was kept" in w for w in res.warnings), res.warnings
