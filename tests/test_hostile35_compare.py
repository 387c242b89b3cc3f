"""Thirty-fifth round, compare: two orthogonal updates of one spectrum are not "copies", shares at float64 rounding
read 0, a hand-edited compare.json that contradicts itself is refused, and a repeated journal line is left out."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra.compare_findings import compare_findings
from spectra.compare_records import CompareResult
from spectra.errors import ResultsFormatError

NAMES = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]


def _planted(folder: Path, overlap: int) -> tuple[str, str, str]:
    """Base, A and B of 64 × 64 matrices: A = base + U[:, :4]·S·V[:, :4]ᵀ, B the same with columns shifted by
    ``4 − overlap`` (so ``overlap`` of B's four directions are A's), one S: equal norms on every module."""
    rng = np.random.default_rng(5)
    base, A, B = {}, {}, {}
    S = np.diag([1.0, 0.8, 0.6, 0.4]) * 0.05
    for n in NAMES:
        base[n] = rng.standard_normal((64, 64)) * 0.05
        U, V = (np.linalg.qr(rng.standard_normal((64, 8)))[0] for _ in range(2))
        k = 4 - overlap
        A[n] = base[n] + U[:, :4] @ S @ V[:, :4].T
        B[n] = base[n] + U[:, k:k + 4] @ S @ V[:, k:k + 4].T
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, d in (("base", base), ("a", A), ("b", B)):
        save_file({k: torch.tensor(v) for k, v in d.items()}, folder / f"{name}.safetensors")
        paths.append(str(folder / f"{name}.safetensors"))
    return paths[0], paths[1], paths[2]


def test_orthogonal_updates_of_one_spectrum_are_not_called_copies(tmp_path):
    """Equal norms on every module and φ = 6e-32: the warning said "copies of one fine-tune … every measure would
    compare an update with itself", and the findings printed "1.5e-30% of B's update energy" and "median 6.22e-32"."""
    base, a, b = _planted(tmp_path, overlap=0)
    res = spectra.compare(a, b, base=base, config=spectra.CompareConfig(top_k=4))
    assert not any("same norm" in w for w in res.warnings), res.warnings
    text = " ".join(f.text for f in compare_findings(res))
    assert not re.search(r"\de-\d\d", text), text
    assert "hold 0% of B's update energy" in text and "has median 0 against" in text
    same = spectra.compare(a, a.replace("a.safetensors", "a.safetensors"), base=base)  # the path twice: said once
    assert sum("same checkpoint" in w or "same norm" in w for w in same.warnings) == 1


@pytest.fixture(scope="module")
def compare_doc(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cmp")
    base, a, b = _planted(folder, overlap=2)
    spectra.compare(a, b, base=base, config=spectra.CompareConfig(top_k=4, side="both"), out_dir=folder / "out", plots=False)
    return json.loads((folder / "out" / "compare.json").read_text())


def _first(d: dict) -> dict:
    return d["modules"][0]


EDITS = {  # each: an edit no comparison writes, and the key the refusal names
    "zero_update_with_numbers": (lambda d: _first(d).update(status="zero_update"), "modules[0].status"),
    "compared_and_a_only": (lambda d: d["a_only"].append(_first(d)["name"]), "a_only"),
    "compared_and_b_only": (lambda d: d["b_only"].append(_first(d)["name"]), "b_only"),
    "count_not_counts_at_eps": (lambda d: _first(d)["intruders"]["a"].update(count=_first(d)["intruders"]["a"]["count"] + 1),
                                "intruders.a.count"),
    "grid_shape": (lambda d: d["phi_grids"][_first(d)["name"]].update(right=[[0.5] * 3] * 2), "phi_grids"),
    "grid_of_no_module": (lambda d: d["phi_grids"].update({"ghost.weight": {"right": [[0.5]]}}), "phi_grids"),
    "captured_r": (lambda d: _first(d)["captured"]["b_in_a"].update(r=3), "captured.b_in_a.r"),
    "grassmann_zero": (lambda d: _first(d)["angles"]["right"].update(grassmann=0.0), "angles.right.grassmann"),
    "cosines_ascending": (lambda d: _first(d)["angles"]["right"].update(cosines=sorted(_first(d)["angles"]["right"]["cosines"])),
                          "angles.right.cosines"),
    "one_cosine": (lambda d: _first(d)["angles"]["right"].update(cosines=[1.0]), "angles.right.cosines"),
    "proj_own_above_w": (lambda d: _first(d)["amplification"]["a"].update(proj_own=99.0), "amplification.a.proj_own"),
    "delta_fro_not_fro_a": (lambda d: _first(d)["amplification"]["a"].update(
        delta_fro=99.0, factor=99.0 / _first(d)["amplification"]["a"]["proj_delta"]), "amplification.a"),
    "epsilon_not_config": (lambda d: _first(d)["intruders"]["a"].update(epsilon=0.3), "intruders.a.epsilon"),
    "proj_delta_above_w": (lambda d: _first(d)["amplification"]["b"].update(proj_delta=99.0, factor=_first(d)["amplification"]["b"]
                                                                             ["delta_fro"] / 99.0), "amplification.b.proj_delta"),
    "ok_with_a_null_phi": (lambda d: _first(d)["phi"].update(left=None), "modules[0].status"),
    "zero_update_of_two_updates": (lambda d: [_first(d).update(status="zero_update", reason="x"),
                                              [_first(d)[k].update(dict.fromkeys(_first(d)[k])) for k in ("phi", "angles", "captured")]],
                                   "modules[0].status"),
    "left_cosines_ascending": (lambda d: _first(d)["angles"]["left"].update(cosines=sorted(_first(d)["angles"]["left"]["cosines"])),
                               "angles.left.cosines"),
}

NULLED = {  # fields a record may hold as null (undefined): the new checks must pass them over, not raise TypeError
    "grassmann": lambda d: _first(d)["angles"]["right"].update(grassmann=None),
    "delta_fro": lambda d: _first(d)["amplification"]["a"].update(delta_fro=None, factor=None),
    "proj_own": lambda d: _first(d)["amplification"]["a"].update(proj_own=None),
    "w_fro": lambda d: _first(d)["amplification"]["a"].update(w_fro=None),
    "epsilon": lambda d: _first(d)["intruders"]["a"].update(epsilon=None),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_compare_json_that_contradicts_itself_is_refused(compare_doc, edit, tmp_path):
    """report read each of these edits and stated them (a "zero" module still counted among the intruders, a module
    "updated only by A" while compared, an intruder count that is not its own sweep's at ε…)."""
    assert CompareResult.from_dict(compare_doc).modules  # the file as written is read
    doc = copy.deepcopy(compare_doc)
    change, key = EDITS[edit]
    change(doc)
    with pytest.raises(ResultsFormatError, match=re.escape(key)):
        CompareResult.from_dict(doc, source=tmp_path / "compare.json")


@pytest.mark.parametrize("field", sorted(NULLED))
def test_a_null_field_is_read_or_refused_in_one_line(compare_doc, field, tmp_path):
    """The review: the new checks did arithmetic on fields whose rule allows null: a bare TypeError."""
    doc = copy.deepcopy(compare_doc)
    NULLED[field](doc)
    try:
        CompareResult.from_dict(doc, source=tmp_path / "compare.json")
    except ResultsFormatError:
        pass


def test_a_repeated_compare_journal_line_is_left_out_with_a_word(tmp_path):
    """A line of compare.jsonl copied further down was taken silently, the last copy winning (diff keeps the first
    and says so)."""
    base, a, b = _planted(tmp_path, overlap=2)
    out = tmp_path / "out"
    whole = spectra.compare(a, b, base=base, out_dir=out, plots=False)
    lines = (out / "compare.jsonl").read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if '"i": 0' in line or '"i":0' in line)
    (out / "compare.jsonl").write_text("".join([*lines, lines[first]]))
    again = spectra.compare(a, b, base=base, out_dir=out, plots=False, resume=True)
    assert any("repeated record" in w and "first of each was kept" in w for w in again.warnings), again.warnings
    assert [m.to_dict() for m in again.modules] == [m.to_dict() for m in whole.modules]
