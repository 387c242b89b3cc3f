"""Seventeenth round of the outside probe (docs/bad_inputs.md, "seventeenth round")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectra.callbacks import SpectraTracker
from spectra.report import build_report
from spectra.trace import load_trace
from spectra.training_inputs import read_examples
from tests.pair_util import small_pair

ROOT = Path(__file__).resolve().parents[1]


def test_a_jsonl_data_file_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Windows editors start JSONL with EF BB BF: "line 1 is not valid JSON (Unexpected UTF-8 BOM)" while a
    .txt with the same mark was read."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first line"}\n{"prompt": "q", "response": "an answer"}\n')
    assert read_examples(path) == [("", "first line"), ("q", "an answer")]


def test_a_reader_that_leaves_stdout_ends_the_printing_not_the_run(tmp_path):
    """`spectra diff B T | head -1`: rich's console raised SystemExit(1) at its next line after the reader
    left (exit 1, no word); the printed table is a view of the files, so the run finishes, exit 0."""
    base, tuned = small_pair(tmp_path)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write to stdout fails with EPIPE
    out = tmp_path / "out"
    try:
        proc = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", "diff", base, tuned,
                               "--out", str(out)], stdout=write, stderr=subprocess.PIPE, text=True, timeout=240,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
    assert json.loads((out / "results.json").read_text())["complete"] is True
    assert (out / "rank_heatmap.png").is_file() and (out / "results.csv").is_file()


def test_a_full_disk_under_stdout_is_still_an_error(tmp_path):
    """Only a reader that left is forgiven: results meant for a file (> /dev/full) that did not reach it are
    an error, as before."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    base, tuned = small_pair(tmp_path)
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", "diff", base, tuned,
                               "--out", str(tmp_path / "o"), "--no-plots"], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=240, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "cannot write the output: No space left on device" in proc.stderr


def test_an_in_training_trace_records_its_seconds_and_device_for_the_report(tmp_path):
    """The report's overview row of a tracker's trace.jsonl said device "auto" (the config's word) and 0.0 s."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path)
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        tracker.measure(step)
    timings = [json.loads(x)["timing"] for x in (tmp_path / "trace.jsonl").read_text().splitlines() if '"timing"' in x]
    assert [t["step"] for t in timings] == [1, 2] and {t["device"] for t in timings} == {"cpu"}
    res = load_trace(tmp_path / "trace.jsonl")
    assert res.device == "cpu" and res.elapsed_s == pytest.approx(sum(t["seconds"] for t in timings)) and res.elapsed_s > 0
    html = build_report([str(tmp_path / "trace.jsonl")])
    overview = html[html.index("<h2>Overview</h2>"):].split("</table>")[0]
    assert f"<td>{res.elapsed_s:.1f}</td><td>cpu</td></tr>" in overview and ">auto<" not in overview
    # a resumed run drops the interrupted run's records after the resume step, its timings too
    SpectraTracker(model, every=1, out_dir=tmp_path, resume_step=1)
    kept = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r["timing"]["step"] for r in kept if "timing" in r] == [1]
