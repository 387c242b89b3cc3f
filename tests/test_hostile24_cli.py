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


def test_a_batch_memory_above_any_machine_is_no_cap(tmp_path: Path):
    """--batch-memory 4398046511105 (MiB) passed click and DiffConfig, then failed in the engine with a traceback after
    results.json was begun (this round's own argument check, caught by a probe)."""
    base, tuned = small_pair(tmp_path)
    for cmd in (["diff", base, tuned], ["esd", tuned]):
        r = cli([*cmd, "--out", str(tmp_path / cmd[0]), "--no-plots", "--batch-memory", "4398046511105"], cwd=tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
