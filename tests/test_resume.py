"""``--resume``: an interrupted run (an exception, or SIGKILL) finishes only what is missing and ends
with the same results as an uninterrupted run; a journal from other inputs or options is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import wait_for_journal

import spectra
from spectra.config import DiffConfig
from spectra.errors import ConfigError
from spectra.synthetic import LlamaShape, make_llama_pair

SHAPE = LlamaShape(layers=6, hidden=512, intermediate=1376, heads=8, kv_heads=2, vocab=1024)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_llama_pair(tmp_path_factory.mktemp("resume"), shape=SHAPE, seed=3)


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    return spectra.diff(*pair, out_dir=tmp_path_factory.mktemp("ref"))


def _same(a, b) -> None:
    strip = lambda m: {k: v for k, v in m.__dict__.items() if k != "seconds"}  # noqa: E731
    assert [strip(m) for m in a.modules] == [strip(m) for m in b.modules]
    assert a.skipped == b.skipped and a.unmatched == b.unmatched


def test_resume_after_an_exception_equals_uninterrupted(pair, reference, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_7(ev):
        if ev.done == 7:
            raise Stop

    with pytest.raises(Stop):
        spectra.diff(*pair, out_dir=tmp_path, callback=stop_at_7)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 7
    seen = []
    resumed = spectra.diff(*pair, out_dir=tmp_path, resume=True, callback=lambda ev: seen.append(ev.done))
    assert seen[0] == 8 and seen[-1] == len(reference.modules)  # only the missing ones were computed
    assert resumed.complete
    _same(resumed, reference)
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["complete"] is True and len(again["modules"]) == len(reference.modules)


def test_resume_after_sigkill(pair, reference, tmp_path):
    cmd = [sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--out", str(tmp_path), "--method", "svd", "--no-plots"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "results.jsonl"
    wait_for_journal(proc, journal)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_before = len(journal.read_text().splitlines())
    assert 3 <= n_before < len(reference.modules)
    resumed = spectra.diff(*pair, out_dir=tmp_path, resume=True, config=DiffConfig(method="svd"))
    ref_svd = spectra.diff(*pair, config=DiffConfig(method="svd"))
    _same(resumed, ref_svd)


def test_resume_refuses_other_inputs_or_options(pair, tmp_path):
    spectra.diff(*pair, out_dir=tmp_path, config=DiffConfig(layers="0"))
    with pytest.raises(ConfigError, match="the journal here comes from different inputs or options"):
        spectra.diff(*pair, out_dir=tmp_path, resume=True, config=DiffConfig(layers="0-1"))
    with pytest.raises(ConfigError, match="the journal here comes from different inputs or options"):
        spectra.diff(pair[1], pair[0], out_dir=tmp_path, resume=True, config=DiffConfig(layers="0"))
    with pytest.raises(ConfigError, match="nothing to resume"):
        spectra.diff(*pair, out_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ConfigError, match="resume needs the output folder"):
        spectra.diff(*pair, resume=True)
    # same inputs and options, a finished run: resuming recomputes nothing and changes nothing
    seen = []
    res = spectra.diff(*pair, out_dir=tmp_path, resume=True, config=DiffConfig(layers="0"), callback=seen.append)
    assert seen == [] and len(res.modules) == 7
