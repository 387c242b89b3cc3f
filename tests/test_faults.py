"""Nothing is lost: a write that fails (file-size limit standing in for a full disk, permissions)
says so in one line and leaves earlier results intact; Ctrl-C and SIGTERM stop cleanly with a
journal that ``--resume`` completes."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile

import pytest
from conftest import wait_for_journal

import spectra
from spectra.config import DiffConfig
from spectra.errors import OutputError
from spectra.synthetic import LlamaShape, make_llama_pair

SHAPE = LlamaShape(layers=6, hidden=512, intermediate=1376, heads=8, kv_heads=2, vocab=1024)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_llama_pair(tmp_path_factory.mktemp("faults"), shape=SHAPE, seed=11)


@pytest.fixture(scope="module")
def reference(pair):
    return spectra.diff(*pair, config=DiffConfig(method="svd"))


def _strip(mods):
    return [{k: v for k, v in (m if isinstance(m, dict) else m.__dict__).items() if k != "seconds"} for m in mods]


def _journal_records(path):
    lines = path.read_text().splitlines()
    good = []
    for i, line in enumerate(lines):
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            assert i == len(lines) - 1, "only the last line may be cut short"
    return good


def _limit_file_size(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_write_failure_mid_run_keeps_earlier_results(pair, reference, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--out", str(out), "--method", "svd", "--no-plots"]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size(24_000))
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "cannot write results: File too large" in last and "--resume" in last
    assert "Traceback" not in proc.stderr
    # what was written before the failure is whole: results.json parses, the journal's lines are results
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is False
    done = _journal_records(out / "results.jsonl")
    assert 0 < len(done) < len(reference.modules)
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind
    # with space again, --resume finishes from the journal and equals an uninterrupted run
    resumed = spectra.diff(*pair, out_dir=out, resume=True, config=DiffConfig(method="svd"))
    assert _strip(resumed.modules) == _strip(reference.modules)


def test_failed_rewrite_leaves_previous_file(tmp_path, monkeypatch):
    """An atomic rewrite that cannot complete (permission, disk) leaves the old file as it was."""
    from spectra.io.files import atomic_write_text

    target = tmp_path / "results.json"
    atomic_write_text(target, '{"old": true}\n')

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OutputError, match=r"results.json: cannot write results: Permission denied \(fix the folder"):
        atomic_write_text(target, '{"new": true}\n')
    assert target.read_text() == '{"old": true}\n'
    monkeypatch.undo()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write_text(target, '{"new": true}\n')
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; covered by the test above")
def test_unwritable_out_folder_is_one_line(pair, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        proc = subprocess.run([sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--out", str(out)],
                              capture_output=True, text=True)
    finally:
        out.chmod(0o700)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Permission denied" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_out_path_that_is_a_file_is_one_line(pair, tmp_path):
    out = tmp_path / "file"
    out.write_text("not a folder")
    proc = subprocess.run([sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--out", str(out / "sub")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
    assert out.read_text() == "not a folder"


def _terminal_dispositions() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


# SIGHUP (the terminal closed, an ssh connection dropped) ended a run without a word, results.json 3 matrices behind
# its journal's 26 and the folder locked
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM"),
                                             (signal.SIGHUP, 129, "SIGHUP")])
def test_interrupt_stops_cleanly_and_resumes(pair, reference, tmp_path, sig, code, word):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--out", str(out), "--method", "svd", "--no-plots"]
    # a test run started in the background by a shell without job control ignores SIGINT, and the child
    # would inherit that: the command gets the dispositions a terminal gives it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_terminal_dispositions)
    journal = out / "results.jsonl"
    wait_for_journal(proc, journal)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith(f"stopped by {word}: results finished so far are kept")
    assert "Traceback" not in stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is False
    n = len(_journal_records(journal))
    # results.json was flushed on the way out: it has every journaled result (and perhaps the one
    # whose journal line the signal preempted; resume recomputes that one from the journal's view)
    assert n <= len(doc["modules"]) <= n + 1
    assert not (out / ".spectra.lock").exists()
    resumed = spectra.diff(*pair, out_dir=out, resume=True, config=DiffConfig(method="svd"))
    assert _strip(resumed.modules) == _strip(reference.modules)


def test_a_sighup_ignored_at_the_start_stays_ignored(pair, tmp_path):
    """nohup's promise: the run goes on to the end when the terminal closes."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--out", str(out), "--method", "svd", "--no-plots"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_journal(proc, out / "results.jsonl")
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["complete"] is True
