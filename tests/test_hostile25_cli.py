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


def test_a_stop_while_extract_draws_its_figures_says_the_adapter_is_whole(tmp_path):
    """Ctrl-C while extract drew its figures: "results finished so far are kept … run --resume to finish" (exit 130)
    where extract.json said complete and the adapter was whole, and a scratch copy of every module's factors
    (.extract-scratch, the adapter's size again) stayed beside it."""
    import os
    import subprocess
    import sys

    from tests.cli_util import ROOT

    base, tuned = small_pair(tmp_path)
    out = tmp_path / "x"
    stop_in_plots = ("import os, signal, spectra.plots.extract as m; "
                     "m.save_extract_plots = lambda *a, **k: os.kill(os.getpid(), signal.SIGINT); "
                     "from spectra_cli.main import run; run()")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", stop_in_plots, "extract", base, tuned, "--rank", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 130, r.stderr
    assert "extract.json was complete before the stop; files written after it (figures, the CSV) may be missing" in r.stderr, r.stderr
    assert json.loads((out / "extract.json").read_text())["complete"] is True
    assert not (out / ".extract-scratch").exists() and (out / "adapter_model.safetensors").is_file()
    again = cli(["extract", base, tuned, "--rank", "2", "--out", str(out), "--resume"])
    assert again.returncode == 0 and (out / "extract.png").is_file(), again.stderr


def test_a_name_the_figure_font_lacks_prints_no_matplotlib_warnings(tmp_path):
    """An emoji in a tensor name: `diff --report` printed matplotlib's "Glyph 128293 (\\N{FIRE}) missing from font(s)"
    with its source line, 5-7 times per run, past the CLI's own output."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    b = {"model.layers.0.😀🔥.weight": torch.randn(16, 12, generator=g)}
    for name, tensors in (("b", b), ("t", {k: v + 0.1 * torch.randn(16, 12, generator=g) for k, v in b.items()})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    r = cli(["diff", str(tmp_path / "b"), str(tmp_path / "t"), "--out", str(tmp_path / "o"), "--report"])
    assert r.returncode == 0 and "Glyph" not in r.stderr and "UserWarning" not in r.stderr, r.stderr
    assert "😀🔥" in (tmp_path / "o" / "results.csv").read_text(encoding="utf-8")
