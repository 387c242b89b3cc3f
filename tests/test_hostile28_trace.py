"""Twenty-eighth probe round: the training tracker and its trace.jsonl (docs/bad_inputs.md, "twenty-eighth round")."""

from __future__ import annotations

import errno
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import spectra.journal as journal
from spectra.callbacks import SpectraTracker, callback_class
from spectra.errors import OutputError
from spectra.trace import load_trace


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential()
    m.add_module("q_proj", torch.nn.Linear(32, 32, bias=False))
    return m.to(dtype)


def test_a_float64_model_is_measured_in_float64(tmp_path):
    # ΔW was formed in float32: a 1e-9 rank-2 update of float64 weights read as rank 5 at τ = 0.9, σ₁ 11% off
    m = _model(torch.float64)
    W0 = m.q_proj.weight.detach().clone()
    tracker = SpectraTracker(m, every=1, out_dir=tmp_path / "cb")
    g = torch.Generator().manual_seed(1)
    U, V = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(2, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        m.q_proj.weight.copy_(W0 + 1e-9 * U @ V)
    tracker.step(m, 1)
    point = next(json.loads(line)["point"] for line in (tmp_path / "cb" / "trace.jsonl").read_text().splitlines() if '"matrix"' in line)
    s = np.linalg.svd((m.q_proj.weight.detach() - W0).numpy(), compute_uv=False)
    assert point["energy_rank"]["0.9"] == int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.9) + 1) == 2
    np.testing.assert_allclose(point["singular_values"][:2], s[:2], rtol=1e-9)


def test_a_write_cut_short_leaves_no_torn_line(tmp_path, monkeypatch):
    # a full disk left '{"kind": "full",' in trace.jsonl; the next record was glued onto it and every reader stopped there
    path = tmp_path / "trace.jsonl"
    journal.append_record(path, {"a": 1})
    before = path.read_bytes()
    real_open = open

    class Half:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def tell(self):
            return self.f.tell()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "open", lambda p, mode="r", *a, **k: Half(real_open(p, mode, *a, **k)), raising=False)
    with pytest.raises(OutputError, match="No space left"):
        journal.append_record(path, {"kind": "full", "step": 3})
    monkeypatch.undo()
    assert path.read_bytes() == before
    journal.append_record(path, {"b": 2})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"a": 1}, {"b": 2}]


def test_a_torn_line_inside_trace_jsonl_hides_nothing_after_it(tmp_path):
    # load_trace stopped at the torn line (steps [1, 2] of 6, no warning) and a resume deleted the records after it
    m = _model()
    tracker = SpectraTracker(m, every=1, out_dir=tmp_path)
    for step in range(1, 7):
        with torch.no_grad():
            m.q_proj.weight.add_(0.01 * torch.randn(32, 32))
        if step == 3:
            with open(tmp_path / "trace.jsonl", "a") as f:  # what a full disk left before this fix
                f.write('{"kind": "full",\n')
            continue
        tracker.step(m, step)
    res = load_trace(tmp_path / "trace.jsonl")
    assert [c["step"] for c in res.checkpoints] == [1, 2, 4, 5, 6]
    assert any("not valid JSON" in w for w in res.warnings)
    SpectraTracker(m, every=1, out_dir=tmp_path, resume_step=5)
    steps = sorted({json.loads(x)["step"] for x in (tmp_path / "trace.jsonl").read_text().splitlines() if '"matrix"' in x})
    assert steps == [1, 2, 4, 5]


def test_the_trainer_callback_trains_on_when_its_trace_cannot_be_written(tmp_path):
    pytest.importorskip("transformers")
    cb = callback_class()(every=1, out_dir=tmp_path)

    class Full:
        def step(self, model, step):
            raise OutputError("cannot write results: No space left on device", path=tmp_path / "trace.jsonl", hint="x")

        def close(self):
            pass

    cb.tracker = Full()
    control = SimpleNamespace(should_log=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cb.on_step_end(None, SimpleNamespace(global_step=7), control) is control
    assert cb.tracker is None
    assert any("tracing stopped at step 7, the training goes on" in str(w.message) for w in caught)


def test_the_trackers_write_error_names_what_a_tracker_has(tmp_path):
    # the hint named --out and --resume, which a tracker has not
    m = _model()
    (tmp_path / "trace.jsonl").mkdir()  # a folder stands where the trace goes
    with pytest.raises(OutputError) as err:
        SpectraTracker(m, every=1, out_dir=tmp_path).step(m, 1)
    assert "--resume" not in (err.value.hint or "") and "out_dir" in err.value.hint


# ---- the second review of the round ----------------------------------------------------------------------------
def test_a_second_training_after_tracing_stopped_keeps_the_first_trace(tmp_path):
    # _stop_tracing left tracker None, and on_train_begin set the earlier trace aside only when a tracker was there:
    # the next phase rewrote trace.jsonl empty
    pytest.importorskip("transformers")
    m = _model()
    cb = callback_class()(every=1, out_dir=tmp_path)
    args, control = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(should_log=False)
    cb.on_train_begin(args, SimpleNamespace(global_step=0, is_world_process_zero=True), control, model=m)
    for step in (1, 2):
        with torch.no_grad():
            m.q_proj.weight.add_(0.01 * torch.randn(32, 32))
        cb.on_step_end(args, SimpleNamespace(global_step=step), control)
    cb.tracker.step = lambda model, step: (_ for _ in ()).throw(OutputError("cannot write results: No space left", path=tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb.on_step_end(args, SimpleNamespace(global_step=3), control)
    assert cb.tracker is None
    cb.on_train_begin(args, SimpleNamespace(global_step=0, is_world_process_zero=True), control, model=m)
    first = load_trace(tmp_path / "trace.1.jsonl")
    assert [c["step"] for c in first.checkpoints] == [1, 2]


def test_a_name_holding_a_line_separator_is_one_record(tmp_path):
    # records were split with str.splitlines(), which cuts at U+2028: both halves dropped as "a write cut short"
    m = torch.nn.Sequential()
    m.add_module("q\u2028proj", torch.nn.Linear(8, 8, bias=False))
    tracker = SpectraTracker(m, every=1, out_dir=tmp_path)
    for step in (1, 2):
        with torch.no_grad():
            m[0].weight.add_(0.01 * torch.randn(8, 8))
        tracker.step(m, step)
    res = load_trace(tmp_path / "trace.jsonl")
    assert [c["step"] for c in res.checkpoints] == [1, 2] and not any("not valid JSON" in w for w in res.warnings)
    SpectraTracker(m, every=1, out_dir=tmp_path, resume_step=2)
    assert [c["step"] for c in load_trace(tmp_path / "trace.jsonl").checkpoints] == [1, 2]
