"""Hostile and odd inputs found by the third outside probe (extract, recommend, trace, report): each
test reproduces a finding and checks the fix against an independent reference (numpy float64 SVD,
PEFT's own name matching) or the one-line error."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra.errors import ConfigError, SpectraError
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.io.jsonfile import load_json
from spectra.recommend import recommend
from spectra.trace import trace
from spectra_cli.main import main

H, I = 16, 32


def _names(layers: int = 2):
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for k in "qkvo":
            yield p + f"self_attn.{k}_proj.weight", (H, H)
        yield p + "mlp.gate_proj.weight", (I, H)
        yield p + "mlp.up_proj.weight", (I, H)
        yield p + "mlp.down_proj.weight", (H, I)


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 2-layer Llama-named base and a tuned copy with a rank-8 update per matrix."""
    root = tmp_path_factory.mktemp("h3")
    g = torch.Generator().manual_seed(0)
    base = {n: 0.02 * torch.randn(*s, generator=g) for n, s in _names()}
    tuned = {n: w + 0.01 * torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g)
             for n, w in base.items()}
    return root, base, tuned, _save(root / "base", base), _save(root / "tuned", tuned)


Q = "model.layers.0.self_attn.q_proj.weight"


def _one_bad_value(tuned: dict[str, torch.Tensor], folder: Path, value: float, at: tuple[int, int]) -> Path:
    """The tuned checkpoint with ``value`` (NaN, Inf) at ``at`` of layer 0's q_proj, saved in ``folder``."""
    bad = dict(tuned)
    bad[Q] = tuned[Q].clone()
    bad[Q][at] = value
    return _save(folder, bad)


def test_extract_lists_a_nan_matrix_as_not_extracted_not_as_fully_kept(pair, tmp_path):
    root, base, tuned, b, _ = pair
    q = Q
    t = _one_bad_value(tuned, tmp_path / "tnan", float("nan"), (0, 0))
    res = extract(str(b), str(t), tmp_path / "out", config=ExtractConfig(rank=2), plots=False)
    assert q not in [m["name"] for m in res.modules]
    assert [(r["name"], "NaN" in r["reason"]) for r in res.not_extracted] == [(q, True)]
    assert res.totals["modules"] == 13 and any(q in w for w in res.warnings)
    # no module of a rank-8 update keeps 90% at rank 2: the NaN matrix no longer counts as one that does
    assert res.totals["modules_at_90"] == 0
    for m in res.modules:  # the energies are those of a float64 SVD of each ΔW
        d = (tuned[m["name"]] - base[m["name"]]).double().numpy()
        s2 = np.linalg.svd(d, compute_uv=False) ** 2
        assert m["energy_kept"] == pytest.approx(s2[:2].sum() / s2.sum(), rel=1e-9)


def test_extract_lists_a_matrix_whose_columns_differ(pair, tmp_path):
    root, base, tuned, b, _ = pair
    odd = dict(tuned)
    q = Q
    odd[q] = torch.randn(H, H + 4)
    res = extract(str(b), str(_save(tmp_path / "tcols", odd)), tmp_path / "out", config=ExtractConfig(rank=2), plots=False)
    assert [(r["name"], r["shape"], r["reason"].startswith("shape mismatch")) for r in res.not_extracted] == [(q, [H, H + 4], True)]
    assert len(res.modules) == 13


def test_extract_table_medians_are_true_medians(pair, tmp_path):
    root, base, tuned, b, t = pair
    out = tmp_path / "em"
    r = CliRunner().invoke(main, ["extract", str(b), str(t), "--out", str(out), "--energy", "0.9", "--no-plots"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "extract.json").read_text())
    q = [m for m in doc["modules"] if m["label"] == "q_proj"]
    row = next(line for line in r.output.splitlines() if line.split("│")[1:2] and line.split("│")[1].strip() == "q_proj")
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[2] == f"{statistics.median(m['rank'] for m in q):g}"
    assert cells[4] == f"{statistics.median(m['energy_kept'] for m in q):.3f}"


@pytest.fixture(scope="module")
def diffs(pair, tmp_path_factory):
    root, _, _, b, t = pair
    out = tmp_path_factory.mktemp("h3d")
    runs = {}
    for name, extra in (("full", []), ("layer0", ["--layers", "0"]), ("topk2", ["--top-k", "2"])):
        r = CliRunner().invoke(main, ["diff", str(b), str(t), "--out", str(out / name), "--no-plots", *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads((out / name / "results.json").read_text())
    return runs


def test_recommend_refuses_an_unfinished_run(diffs):
    doc = dict(diffs["full"], complete=False)
    with pytest.raises(ConfigError, match=r"did not finish \(complete: false\)"):
        recommend(doc, energy=0.9)


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), 0.0, -1.0])
def test_recommend_refuses_an_alpha_ratio_that_is_not_finite_and_positive(diffs, ratio):
    with pytest.raises(ConfigError, match="alpha-ratio must be a finite number > 0"):
        recommend(diffs["full"], energy=0.9, alpha_ratio=ratio)


def test_recommend_after_a_partial_diff_names_only_the_measured_modules(diffs):
    rec = recommend(diffs["layer0"], energy=0.9)
    targets = rec.config["target_modules"]
    # PEFT adapts a module whose name equals a target or ends with "." + target (peft.tuners.tuners_utils)
    every = [n.removesuffix(".weight") for n, _ in _names()]
    hit = [m for m in every if any(m == t or m.endswith("." + t) for t in targets)]
    assert hit and all(".layers.0." in m for m in hit)
    assert any("measured part of the model" in n for n in rec.notes)
    assert set(recommend(diffs["full"], energy=0.9).config["target_modules"]) == {f"{k}_proj" for k in
                                                                                  ("q", "k", "v", "o", "gate", "up", "down")}


def test_recommend_budget_beyond_the_kept_singular_values_is_refused(diffs):
    with pytest.raises(ConfigError, match="needs more of the spectra than the results keep"):
        recommend(diffs["topk2"], energy=None, budget="90%")
    small = recommend(diffs["topk2"], energy=None, budget="5%")  # within the top 2 of each matrix: fine
    assert 0 < small.params <= 0.05 * small.full_params


def test_trace_skips_a_checkpoint_sharing_other_rows_with_the_base(pair, tmp_path):
    root, base, tuned, b, t = pair
    short = dict(tuned)
    q = Q
    short[q] = tuned[q][:8].clone()
    s = _save(tmp_path / "short", short)
    res = trace(str(b), [str(t), str(s)], out_dir=None)
    pts = next(m for m in res.to_dict()["matrices"] if m["name"] == q)["points"]
    # a projection's rows are not paired across a resize (only a vocabulary's are): its shape differs, said as the pairing says it
    assert "skip" not in pts[0] and "shape mismatch: base (16, 16) vs tuned (8, 16)" in pts[1]["skip"]


def test_json_integers_beyond_float_range_are_refused(tmp_path):
    f = tmp_path / "r.json"
    f.write_text('{"a": 1' + "0" * 400 + "}")
    with pytest.raises(SpectraError, match="out of range"):
        load_json(f, what="results.json")
    f.write_text('{"a": 18446744073709551615}')  # a u64 (safetensors offsets) still reads
    assert load_json(f, what="results.json") == {"a": 2**64 - 1}


def test_esd_resume_refuses_a_weight_file_replaced_with_the_same_size_and_mtime(pair, tmp_path):
    import os
    import shutil

    root, base, tuned, b, t = pair
    src = tmp_path / "ckpt"
    src.mkdir()
    shutil.copy2(b / "model.safetensors", src / "model.safetensors")
    out = tmp_path / "es"
    r = CliRunner().invoke(main, ["esd", str(src), "--out", str(out), "--no-plots"])
    assert r.exit_code == 0, r.output
    lines = (out / "esd.jsonl").read_text().splitlines(keepends=True)
    (out / "esd.jsonl").write_text("".join(lines[:6]))  # interrupted after a few matrices
    doc = json.loads((out / "esd.json").read_text())
    (out / "esd.json").write_text(json.dumps(dict(doc, complete=False)))
    st = os.stat(src / "model.safetensors")
    shutil.copyfile(t / "model.safetensors", src / "model.safetensors")  # same size: same names and shapes
    os.utime(src / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(src / "model.safetensors").st_size == st.st_size
    r = CliRunner().invoke(main, ["esd", str(src), "--out", str(out), "--no-plots", "--resume"])
    assert r.exit_code != 0
    assert len(r.output.strip().splitlines()) == 1 and "resume" in r.output.lower(), r.output


def test_budget_parameter_counts_are_whole_and_the_percentage_message_reads():
    from spectra.lowrank import parse_budget

    with pytest.raises(ValueError, match="a parameter count must be a whole number"):
        parse_budget("1.5")
    assert parse_budget("1.5k").params(0, 2) == 1500
    with pytest.raises(ValueError, match=r"^budget percentage must be in \(0, 100\]"):
        parse_budget("0%")


def test_interfere_says_why_no_matrix_is_shared(pair, tmp_path):
    from spectra.errors import PairingError
    from spectra.interfere import interfere

    root, base, tuned, b, t = pair
    grown = {n: torch.cat([w, w[:4]]) for n, w in tuned.items()}  # every matrix has 4 rows more than the base's
    g = _save(tmp_path / "grown", grown)
    with pytest.raises(PairingError, match="every tensor pair was skipped.*shape mismatch.*only embedding and output-head rows"):
        interfere(str(b), [str(t), str(g)])


def test_trace_says_how_many_points_it_skipped(pair, tmp_path):
    root, base, tuned, b, t = pair
    s = _one_bad_value(tuned, tmp_path / "tinf", float("inf"), (1, 1))
    r = CliRunner().invoke(main, ["trace", str(b), str(t), str(s), "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "1 points (a matrix at one checkpoint) skipped" in r.output
