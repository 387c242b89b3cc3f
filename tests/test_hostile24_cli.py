"""Twenty-fourth round, the command line (docs/bad_inputs.md, "twenty-fourth round")."""

from __future__ import annotations

from pathlib import Path

from tests.cli_util import cli
from tests.pair_util import small_pair


def test_a_new_diff_into_a_folder_with_a_combined_report_rebuilds_it(tmp_path: Path):
    """A plain `diff` into a folder where `esd --report` had added its part to report.html removed the report with the
    diff's earlier files: the esd part was lost until `spectra report` was run by hand."""
    base, tuned = small_pair(tmp_path)
    out = tmp_path / "o"
    assert cli(["diff", base, tuned, "--out", str(out), "--no-plots"], cwd=tmp_path).returncode == 0
    r = cli(["esd", tuned, "--out", str(out), "--no-plots", "--report"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()
    assert "results.json" in page and "esd.json" in page
    r = cli(["diff", base, tuned, "--out", str(out), "--no-plots", "--threshold", "0.5"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()  # rebuilt over both commands' results, the new diff's included
    assert "esd.json" in page and "results.json" in page and "report:" in r.stderr
    # a folder of one command's results only: its report is removed with the earlier run's files, as before
    solo = tmp_path / "solo"
    assert cli(["diff", base, tuned, "--out", str(solo), "--no-plots", "--report"], cwd=tmp_path).returncode == 0
    assert cli(["diff", base, tuned, "--out", str(solo), "--no-plots"], cwd=tmp_path).returncode == 0
    assert not (solo / "report.html").exists()
