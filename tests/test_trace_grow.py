"""``spectra trace --resume`` on a run that saved more checkpoints since: the earlier checkpoints' points are kept
(not measured again) and the new ones added, and the result equals a trace of every checkpoint at once."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from spectra.errors import ConfigError
from spectra.trace import TraceConfig, trace
from spectra_cli.main import main
from spectra_cli.trace import trace_cmd
from tests.test_trace import NAMES, synthetic_run, write_adapter, write_state


def _turning(name: str, step: int) -> torch.Tensor:
    """A rank-2 update whose directions turn with the step (non-trivial turn_prev and turn_first)."""
    out, inn = NAMES[name]
    g = torch.Generator().manual_seed(abs(hash(name)) % 997)
    U, V = torch.randn(out, 2, generator=g, dtype=torch.float64), torch.randn(inn, 2, generator=g, dtype=torch.float64)
    dU, dV = torch.randn(out, 2, generator=g, dtype=torch.float64), torch.randn(inn, 2, generator=g, dtype=torch.float64)
    a = math.radians(3 * step)
    return 0.01 * step * (U * math.cos(a) + dU * math.sin(a)) @ (V + 0.1 * step * dV).T


def _same(a, b) -> None:
    assert a.matrices == b.matrices
    assert [c["step"] for c in a.checkpoints] == [c["step"] for c in b.checkpoints]
    assert a.warnings == b.warnings and a.skipped == b.skipped


def _grow(run, steps, into):
    """``into``: the run folder holding the checkpoints of ``steps`` only (the rest saved later)."""
    into.mkdir(exist_ok=True)
    for st in steps:
        if not (into / f"checkpoint-{st}").exists():
            shutil.copytree(run / f"checkpoint-{st}", into / f"checkpoint-{st}")
    return into


def test_full_trace_resumed_with_new_checkpoints_equals_a_whole_trace(tmp_path, monkeypatch):
    base, run, _ = synthetic_run(tmp_path / "syn", _turning, steps=(10, 20, 30, 40, 50))
    cfg = TraceConfig(top_k=2, alpha=True)
    whole = trace(str(base), [str(run)], config=cfg, plots=False)
    live, out = tmp_path / "live", tmp_path / "out"
    first = trace(str(base), [str(_grow(run, (10, 20, 30), live))], config=cfg, out_dir=out, plots=False)
    assert [c["step"] for c in first.checkpoints] == [10, 20, 30]
    # the earlier points are not measured again: only the first and previous checkpoints are read for their subspaces
    from spectra.io.checkpoint import Checkpoint

    reads: list[str] = []
    load = Checkpoint.load

    def counting(self, name, **kw):
        reads.append(self.label)
        return load(self, name, **kw)

    monkeypatch.setattr(Checkpoint, "load", counting)
    grown = trace(str(base), [str(_grow(run, (10, 20, 30, 40, 50), live))], config=cfg, out_dir=out, resume=True, plots=False)
    monkeypatch.undo()
    _same(grown, whole)
    per_matrix = len(reads) / len(whole.matrices)
    assert per_matrix == 1 + 2 + 2  # the base, checkpoints 10 and 30 (first, previous), 40 and 50
    assert not any("checkpoint-20" in r for r in reads)
    doc = json.loads((out / "trace.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20, 30, 40, 50]
    # stopped after one matrix of a second growth, then resumed: the same again, with no matrix listed twice
    _grow(run, (10, 20, 30, 40, 50), live)
    journal = out / "trace_journal.jsonl"
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 2 * len(whole.matrices)  # each matrix's three-point record, then its five-point one
    journal.write_text("\n".join(lines[:len(whole.matrices) + 2]) + "\n" + lines[-1][:30])  # killed mid-write
    again = trace(str(base), [str(live)], config=cfg, out_dir=out, resume=True, plots=False)
    _same(again, whole)


def test_caveat_notes_of_earlier_and_new_steps_merge_as_in_a_whole_trace(tmp_path):
    """Checkpoints of a 0.3% update in bfloat16 from step 30 on (a rounding note at those steps): the notes of
    both runs' steps as the trace of every checkpoint does."""
    base, run, _ = synthetic_run(tmp_path / "syn", _turning, steps=(10, 20, 30, 40))
    W = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    for st in (30, 40):  # a 0.3% update rounded to bfloat16: at the rounding level of the stored weights
        f = run / f"checkpoint-{st}" / "model.safetensors"
        save_file({k: (v * (1 + 0.003 * torch.randn(v.shape, generator=g, dtype=v.dtype))).to(torch.bfloat16)
                   for k, v in W.items()}, f)
    whole = trace(str(base), [str(run)], config=TraceConfig(top_k=2), plots=False)
    notes = " ".join(m["note"] for m in whole.matrices)
    assert "at step 30: base is float64 and tuned bfloat16" in notes and "at step 40: base is float64" in notes, notes
    live, out = tmp_path / "live", tmp_path / "out"
    trace(str(base), [str(_grow(run, (10, 20, 30), live))], config=TraceConfig(top_k=2), out_dir=out, plots=False)
    grown = trace(str(base), [str(_grow(run, (10, 20, 30, 40), live))], config=TraceConfig(top_k=2), out_dir=out,
                  resume=True, plots=False)
    _same(grown, whole)


def test_adapter_trace_resumed_with_new_checkpoints_equals_a_whole_trace(tmp_path):
    base, _, _ = synthetic_run(tmp_path / "syn", lambda n, s: torch.zeros(NAMES[n], dtype=torch.float64), steps=(1,))
    g = torch.Generator().manual_seed(3)
    run = tmp_path / "lora_run"
    for t in range(1, 5):
        facs = {n: (torch.randn(o, 4, generator=g), torch.randn(4, i, generator=g)) for n, (o, i) in NAMES.items()}
        write_adapter(run / f"checkpoint-{5 * t}", facs, r=4, alpha=8)
        write_state(run / f"checkpoint-{5 * t}", 5 * t, {5 * t: 1.0 / t})
    whole = trace(str(base), [str(run)], plots=False)
    live, out = tmp_path / "live", tmp_path / "out"
    trace(str(base), [str(_grow(run, (5, 10), live))], out_dir=out, plots=False)
    group = type(main)(commands=[trace_cmd])  # the command line, as a user resumes
    res = CliRunner().invoke(group, ["trace", str(base), str(_grow(run, (5, 10, 15, 20), live)), "--out", str(out),
                                     "--resume", "--no-plots"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "trace.json").read_text())
    assert doc["matrices"] == json.loads(json.dumps(whole.matrices))


def test_resume_is_refused_when_the_earlier_checkpoints_are_not_the_same(tmp_path):
    """Only checkpoints appended after the traced ones: one deleted (save_total_limit), rewritten, or an option changed
    is another run, refused with what differs."""
    base, run, _ = synthetic_run(tmp_path / "syn", _turning, steps=(10, 20, 30, 40))
    live, out = tmp_path / "live", tmp_path / "out"
    trace(str(base), [str(_grow(run, (10, 20), live))], config=TraceConfig(top_k=2), out_dir=out, plots=False)
    _grow(run, (10, 20, 30, 40), live)
    with pytest.raises(ConfigError, match="top_k was 2, now 3"):
        trace(str(base), [str(live)], config=TraceConfig(top_k=3), out_dir=out, resume=True, plots=False)
    shutil.rmtree(live / "checkpoint-10")
    with pytest.raises(ConfigError, match="gone"):
        trace(str(base), [str(live)], config=TraceConfig(top_k=2), out_dir=out, resume=True, plots=False)
    _grow(run, (10,), live)
    f = live / "checkpoint-20" / "model.safetensors"
    save_file({k: v * 1.001 for k, v in load_file(f).items()}, f)  # rewritten since
    with pytest.raises(ConfigError, match="changed"):
        trace(str(base), [str(live)], config=TraceConfig(top_k=2), out_dir=out, resume=True, plots=False)


def _adapter_run(tmp_path, steps=(5, 10, 15, 20), config_extra=None, extra_at=None):
    base, _, _ = synthetic_run(tmp_path / "syn", lambda n, s: torch.zeros(NAMES[n], dtype=torch.float64), steps=(1,))
    g = torch.Generator().manual_seed(3)
    run = tmp_path / "lora_run"
    for st in steps:
        facs = {n: (torch.randn(o, 4, generator=g), torch.randn(4, i, generator=g)) for n, (o, i) in NAMES.items()}
        write_adapter(run / f"checkpoint-{st}", facs, r=4, alpha=8)
        write_state(run / f"checkpoint-{st}", st, {st: 1.0})
        if config_extra and extra_at in (None, st):
            f = run / f"checkpoint-{st}" / "adapter_config.json"
            f.write_text(json.dumps({**json.loads(f.read_text()), **config_extra}))
    return base, run


def test_a_header_edited_to_this_runs_options_is_refused(tmp_path):
    """The journal's header ("about") is not sealed: edited to this run's options, a grown resume kept the earlier
    points at top_k 1 and τ 0.5 under a trace.json claiming τ 0.9 (64 fields wrong). The earlier run's fingerprint is
    recomputed from the inputs instead."""
    base, run, _ = synthetic_run(tmp_path / "syn", _turning, steps=(10, 20, 30))
    live, out = tmp_path / "live", tmp_path / "out"
    trace(str(base), [str(_grow(run, (10, 20), live))], config=TraceConfig(top_k=1, thresholds=(0.5,)), out_dir=out, plots=False)
    journal = out / "trace_journal.jsonl"
    lines = journal.read_text().splitlines()
    header = json.loads(lines[0])
    header["about"]["options"].update(top_k=3, thresholds=[0.9])
    journal.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match="different inputs or options"):
        trace(str(base), [str(_grow(run, (10, 20, 30), live))], config=TraceConfig(top_k=3, thresholds=(0.9,)), out_dir=out,
              resume=True, plots=False)


def test_an_adapter_journal_with_a_checkpoint_deleted_is_refused(tmp_path):
    """A record of the middle checkpoint deleted (the others' seals intact): step 10's turn_prev was measured against
    step 20, a later checkpoint."""
    from spectra.errors import ResultsFormatError

    base, run = _adapter_run(tmp_path, steps=(5, 10, 15))
    out = tmp_path / "out"
    trace(str(base), [str(run)], out_dir=out, plots=False)
    journal = out / "trace_journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(ln for ln in lines if '"checkpoint": 1,' not in ln) + "\n")
    assert len(journal.read_text().splitlines()) == len(lines) - 1
    with pytest.raises(ResultsFormatError, match="journal holds checkpoints"):
        trace(str(base), [str(run)], out_dir=out, resume=True, plots=False)


def test_a_resumed_adapter_trace_keeps_the_warning_of_another_recorded_base(tmp_path):
    """Only step 10's adapter records another base: a resumed run, which reads it no more, lost the warning."""
    other = tmp_path / "otherbase"
    other.mkdir()
    base, run = _adapter_run(tmp_path, config_extra={"base_model_name_or_path": str(other)}, extra_at=10)
    live, out = tmp_path / "live", tmp_path / "out"
    trace(str(base), [str(_grow(run, (5, 10, 15), live))], out_dir=out, plots=False)  # 10 is read again by no later run
    grown = trace(str(base), [str(_grow(run, (5, 10, 15, 20), live))], out_dir=out, resume=True, plots=False)
    whole = trace(str(base), [str(live)], plots=False)
    assert any("otherbase" in w for w in whole.warnings), whole.warnings
    _same(grown, whole)


def test_a_grown_resume_removes_the_shorter_traces_outputs_first(tmp_path):
    """Stopped after the earlier trace.json and figures were kept beside a journal of more checkpoints, `spectra report`
    showed the shorter trace as finished; finished without plots, its figures stayed beside the longer trace.json."""
    base, run, _ = synthetic_run(tmp_path / "syn", _turning, steps=(10, 20, 30))
    live, out = tmp_path / "live", tmp_path / "out"
    trace(str(base), [str(_grow(run, (10, 20), live))], config=TraceConfig(top_k=2), out_dir=out)
    assert (out / "trace_metrics.png").is_file()
    calls = []

    def stop(done, total, what):
        calls.append(what)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trace(str(base), [str(_grow(run, (10, 20, 30), live))], config=TraceConfig(top_k=2), out_dir=out, resume=True,
              callback=stop)
    assert calls and not (out / "trace.json").exists() and not list(out.glob("trace_*.png"))
    grown = trace(str(base), [str(live)], config=TraceConfig(top_k=2), out_dir=out, resume=True, plots=False)
    assert [c["step"] for c in json.loads((out / "trace.json").read_text())["checkpoints"]] == [10, 20, 30]
    assert not list(out.glob("trace_*.png")) and len(grown.matrices) == len(NAMES)
