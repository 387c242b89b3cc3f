"""Thirty-sixth probe round: a refused ``--resume`` says what differs from the journaled run (docs/bad_inputs.md,
"thirty-sixth round")."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import ConfigError
from spectra.io.checkpoint import open_checkpoint
from spectra.journal import OTHER_INPUTS, RecordJournal, other_run, run_identity
from tests.cli_util import cli
from tests.test_trace import synthetic_run, write_state


def _model(path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(24, 16, generator=g) for i in range(2)},
              str(path / "model.safetensors"))


def test_resume_refusal_names_the_option_and_the_inputs(tmp_path):
    _model(tmp_path / "m", 0)
    _model(tmp_path / "n", 1)
    out = str(tmp_path / "e")
    assert cli(["esd", str(tmp_path / "m"), "--out", out, "--no-plots"]).returncode == 0
    run = cli(["esd", str(tmp_path / "m"), "--out", out, "--no-plots", "--resume", "--layers", "0"])
    assert run.returncode != 0 and "layers was null, now \"0\"" in run.stderr, run.stderr
    run = cli(["esd", str(tmp_path / "n"), "--out", out, "--no-plots", "--resume"])
    assert "input added: " in run.stderr and "n/model.safetensors" in run.stderr and "input gone: " in run.stderr
    # the same file changed in place (a new time and content): named as changed
    _model(tmp_path / "m2", 2)
    shutil.copy(tmp_path / "m2" / "model.safetensors", tmp_path / "m" / "model.safetensors")
    run = cli(["esd", str(tmp_path / "m"), "--out", out, "--no-plots", "--resume"])
    assert "changed since" in run.stderr and "m/model.safetensors" in run.stderr, run.stderr


def test_trace_resume_of_a_run_that_saved_another_checkpoint_adds_it(tmp_path):
    """The run saved checkpoint-30 since: --resume adds it (it was refused, "steps was [10, 20], now [10, 20, 30]"; a
    run with a checkpoint deleted or changed still is: tests/test_trace_grow.py)."""
    base, run_dir, _ = synthetic_run(tmp_path, lambda n, s: torch.full((12, 12) if "q_proj" in n else (20, 12), s * 1e-3,
                                                                        dtype=torch.float64), steps=(10, 20))
    out = str(tmp_path / "t")
    assert cli(["trace", str(base), str(run_dir), "--out", out, "--no-plots"]).returncode == 0
    shutil.copytree(run_dir / "checkpoint-20", run_dir / "checkpoint-30")  # the trainer saved its next checkpoint
    write_state(run_dir / "checkpoint-30", 30, {30: 2.7})
    run = cli(["trace", str(base), str(run_dir), "--out", out, "--no-plots", "--resume"])
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20, 30] and all(len(m["points"]) == 3 for m in doc["matrices"])


def test_an_older_journal_header_gets_the_general_reason(tmp_path):
    _model(tmp_path / "m", 0)
    ckpt = open_checkpoint(tmp_path / "m")
    fingerprint, about = run_identity([ckpt], {"a": 1})
    assert other_run(None, about) == OTHER_INPUTS and other_run(about, about) == OTHER_INPUTS  # nothing to name
    journal = RecordJournal(tmp_path / "j" / "x.jsonl")
    journal.start("0" * 16, resume=False)  # a header without "about", as earlier versions wrote
    journal.release()
    with pytest.raises(ConfigError, match="different inputs or options"):
        RecordJournal(tmp_path / "j" / "x.jsonl").start(fingerprint, resume=True, about=about)
    header = json.loads((tmp_path / "j" / "x.jsonl").read_text().splitlines()[0])
    assert header == {"fingerprint": "0" * 16}
    other = run_identity([ckpt], {"a": 2})[1]
    assert other_run(about, other) == "the journal here comes from different inputs or options: a was 1, now 2"


def test_a_journal_passed_for_results_and_a_thresholds_array_are_named(tmp_path):
    import numpy as np

    import spectra
    from spectra.errors import ResultsFormatError

    _model(tmp_path / "b", 0)
    _model(tmp_path / "t", 1)
    assert cli(["diff", str(tmp_path / "b"), str(tmp_path / "t"), "--out", str(tmp_path / "o"), "--no-plots"]).returncode == 0
    with pytest.raises(ResultsFormatError, match=r"a run's journal.*not results\.json") as err:
        spectra.DiffResult.load(tmp_path / "o" / "results.jsonl")  # was "not valid JSON … the file is corrupt"
    assert "corrupt" not in str(err.value) and "pass results.json" in err.value.hint
    assert spectra.DiffResult.load(tmp_path / "o").modules  # the folder still loads
    with pytest.raises(ConfigError, match="thresholds must be a tuple or list, each item a number"):
        spectra.DiffConfig(thresholds=np.array([0.9, 0.5]))  # was "a tuple of a number"


def test_diff_resume_refusal_names_the_threshold_and_the_swapped_inputs(tmp_path):
    _model(tmp_path / "b", 0)
    _model(tmp_path / "t", 1)
    b, t, out = str(tmp_path / "b"), str(tmp_path / "t"), str(tmp_path / "o")
    assert cli(["diff", b, t, "--out", out, "--no-plots"]).returncode == 0
    run = cli(["diff", b, t, "--out", out, "--no-plots", "--resume", "-t", "0.8"])
    assert run.returncode != 0 and "thresholds was [0.5, 0.9, 0.99], now [0.8]" in run.stderr, run.stderr
    run = cli(["diff", t, b, "--out", out, "--no-plots", "--resume"])
    assert run.returncode != 0 and "base was " in run.stderr and "tuned was " in run.stderr, run.stderr
    assert cli(["diff", b, t, "--out", out, "--no-plots", "--resume"]).returncode == 0
