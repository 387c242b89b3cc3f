"""Round 29, results read back (docs/bad_inputs.md, "twenty-ninth round"): ``spectra report`` of hand-edited esd.json,
trace.json and results.json files holding values no matrix can have, and the order of a diff's warnings."""

from __future__ import annotations

import json

import pytest

from spectra.errors import ResultsFormatError
from spectra.report import build_report
from tests.test_hostile24_results import _edit, _run


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    from spectra.esd_run import esd
    from spectra.trace import trace

    root = tmp_path_factory.mktemp("r29")
    base, run = _run(root)
    out = root / "o"
    esd(str(root / "run" / "checkpoint-2" / "model.safetensors"), out_dir=out, plots=False)
    trace(base, run, out_dir=out, plots=False)
    build_report([out / "esd.json", out / "trace.json"])  # as written: read
    return out


def _first(doc, key="matrices"):
    return doc[key][0]


ESD_EDITS = {  # α = −3 was "the lowest median α"; a tail of 9999 eigenvalues of a 32 × 32 matrix; D = 5…
    "alpha": lambda d: _first(d).update(alpha=-3.0, warning="over-trained"),
    "D": lambda d: _first(d).update(D=5.0),
    "sigma": lambda d: _first(d).update(sigma=-1.0),
    "num_pl_spikes": lambda d: _first(d).update(num_pl_spikes=9999),
    "stable_rank": lambda d: _first(d).update(stable_rank=1e4),
    "xmin": lambda d: _first(d).update(xmin=_first(d)["xmax"] * 2),
    "M": lambda d: _first(d).update(M=7),
}


def _refused(path, edit, said: str) -> None:
    """``spectra report`` of ``path`` after ``edit`` (the file restored afterwards) is refused with ``said``."""
    kept = path.read_text()
    try:
        _edit(path, edit)
        with pytest.raises(ResultsFormatError, match=said):
            build_report([path])
    finally:
        path.write_text(kept)


@pytest.mark.parametrize("field", list(ESD_EDITS))
def test_esd_values_no_matrix_has_are_refused(outputs, field):
    _refused(outputs / "esd.json", ESD_EDITS[field], rf"matrices\[0\]\.{field} is .*impossible")


def _point(d, j=-1):
    return _first(d)["points"][j]


TRACE_EDITS = {  # an energy rank of 500 for a 32 × 32 matrix was in the per-kind table; φ = 3 read as a turn
    r"energy_rank\[0\.9\]": lambda d: _point(d)["energy_rank"].update({"0.9": 500}),
    "effective_rank": lambda d: _point(d).update(effective_rank=1e6),
    "sigma_ratio": lambda d: _point(d).update(sigma_ratio=0.2),
    r"turn_first\.right\.phi": lambda d: _point(d)["turn_first"]["right"].update(phi=3.0),
    r"checkpoints\[0\]\.loss": lambda d: d["checkpoints"][0].update(loss="NaN"),
    r"checkpoints\[1\]\.step": lambda d: d["checkpoints"].reverse(),  # "from step 2 to step 1", each point mislabelled
    r"points\[0\]\.step": lambda d: _point(d, 0).update(step=-5),
}


@pytest.mark.parametrize("field", list(TRACE_EDITS))
def test_trace_values_no_matrix_has_are_refused(outputs, field):
    _refused(outputs / "trace.json", TRACE_EDITS[field], rf"{field} is .*impossible")


@pytest.fixture(scope="module")
def adapter_diff(tmp_path_factory):
    peft = pytest.importorskip("peft")
    from spectra import diff
    from tests.conftest import random_lora
    from tests.test_interfere import tiny_llama

    root = tmp_path_factory.mktemp("r29d")
    tiny_llama().save_pretrained(root / "base")
    random_lora(tiny_llama(), 1, r=4, target_modules=["q_proj", "v_proj"]).save_pretrained(root / "lora")
    assert peft
    diff(root / "base", root / "lora", out_dir=root / "d", plots=False)
    return root / "d" / "results.json"


def test_a_lora_record_with_more_directions_than_its_rank_is_refused(adapter_diff):
    # "LoRA r = 1: 3 of 1 ranks used … effective rank 5.35 of 1" was rendered
    kept = adapter_diff.read_text()
    try:
        doc = json.loads(kept)
        m = doc["modules"][0]
        assert m["method"] == "factored" and m["energy_rank"]["0.9"] >= 2
        m["lora_r"] = 1
        adapter_diff.write_text(json.dumps(doc))
        said = r"modules\[0\] \(.*q_proj.weight\)\.energy_rank\[0\.9\] is 3, .* LoRA rank 1 has at most 1 direction "
        with pytest.raises(ResultsFormatError, match=said):
            build_report([adapter_diff])
    finally:
        adapter_diff.write_text(kept)
    build_report([adapter_diff])


def test_diff_warnings_are_listed_in_the_runs_order(adapter_diff):
    from spectra.report_diff import findings

    doc = json.loads(adapter_diff.read_text())
    doc["warnings"] = [f"warning number {i}" for i in range(3000)]
    said = [f.text for f in findings(adapter_diff, doc) if f.warning and f.text.startswith("warning number")]
    assert said == doc["warnings"]  # they were reversed (third, second, first), each inserted in front
