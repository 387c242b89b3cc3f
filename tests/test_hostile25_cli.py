"""Twenty-fifth round, command line (docs/bad_inputs.md, "twenty-fifth round"): a folder's shared report and another
command's damaged result file."""

from __future__ import annotations

import json

from tests.cli_util import cli
from tests.pair_util import small_pair


def test_a_damaged_sibling_result_leaves_the_folder_its_report(tmp_path):
    """diff and esd --report into one folder, then results.json hand-edited so the report refuses it: the next
    `esd --report` removed the folder's report.html and wrote none (exit 1); its own results got no report."""
    base, tuned = small_pair(tmp_path)
    out = tmp_path / "out"
    assert cli(["diff", base, tuned, "--out", str(out), "--report", "--no-plots"]).returncode == 0
    assert cli(["esd", tuned, "--out", str(out), "--report", "--no-plots"]).returncode == 0
    assert (out / "report.html").is_file()
    doc = json.loads((out / "results.json").read_text())
    doc["modules"][0]["rel_norm"] = doc["modules"][0]["rel_norm"] * 7 + 1  # no longer ‖ΔW‖/‖W‖ of its own norms
    (out / "results.json").write_text(json.dumps(doc))
    r = cli(["esd", tuned, "--out", str(out), "--report", "--no-plots"])
    assert r.returncode == 0, r.stderr
    assert "the report leaves out a result file of another command" in r.stderr and "results.json" in r.stderr
    text = (out / "report.html").read_text()
    assert "model.layers.0.mlp.up_proj" in text  # esd's own matrices are in it
    assert json.loads((out / "esd.json").read_text())["schema"].startswith("spectra.esd")
    # asked for explicitly, the damaged file is still refused in one line, naming it
    r = cli(["report", str(out), "-o", str(tmp_path / "all.html")])
    assert r.returncode != 0 and "results.json" in r.stderr and "Traceback" not in r.stderr
