"""The findings in words, the caveat warnings, the result files' safety (NaN, surrogates, wrong
types), the Python conventions of DiffResult, and the honesty of the diff figures, each checked
against numbers computed here independently (numpy float64 spectra, brute-force medians)."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys

import numpy as np
import pytest
import torch

import spectra
from spectra.display import display_name, printable, shorten
from spectra.errors import ResultsFormatError
from spectra.findings import diff_findings, rank_words, skipped_reasons
from spectra.metrics import spectrum_metrics
from spectra.numerics import numeric_flags
from spectra.plots.base import text_color
from spectra.plots.diff import cumulative_energy, rank_heatmap, spectra_figure
from spectra.randmat import random_energy_rank
from spectra.results import CAVEATS, DiffResult, ModuleResult, caveat_codes

TAUS = (0.5, 0.9, 0.99)


def _module(name: str, layer: int | None, module: str, S: np.ndarray, shape: tuple[int, int], *, base_fro: float = 10.0,
            top_k: int = 64, note: str = "", lora_r: int | None = None, role: str | None = None) -> ModuleResult:
    """A ModuleResult from a full spectrum, its metrics computed by spectra.metrics (itself tested
    against numpy) and its baselines by spectra.randmat."""
    m = spectrum_metrics(S, shape, TAUS)
    return ModuleResult(
        name=name, layer=layer, module=module, role=role, shape=list(shape), fro_norm=m.fro_norm, base_fro_norm=base_fro,
        rel_norm=m.fro_norm / base_fro, spectral_norm=m.spectral_norm, stable_rank=m.stable_rank,
        effective_rank=m.effective_rank, energy_rank={str(t): m.energy_rank[t] for t in TAUS},
        random_energy_rank={str(t): random_energy_rank(shape, t) for t in TAUS},
        energy_rank_frac={str(t): m.energy_rank_frac[t] for t in TAUS}, singular_values=[float(x) for x in S[:top_k]],
        nuclear_norm=m.nuclear_norm, signal_rank=m.signal_rank, note=note, lora_r=lora_r,
    )


def _planted(decay: float, p: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(np.exp(-decay * np.arange(p)) * (1 + 0.01 * rng.random(p)))[::-1]


@pytest.fixture
def planted() -> DiffResult:
    """6 layers × (q 64×64 decaying fast, up 128×64 decaying slowly); deeper layers decay faster."""
    rng = np.random.default_rng(0)
    mods = []
    for layer in range(6):
        mods.append(_module(f"model.layers.{layer}.q_proj.weight", layer, "q_proj", _planted(0.3 + 0.05 * layer, 64, rng), (64, 64),
                            role="q"))
        mods.append(_module(f"model.layers.{layer}.mlp.up_proj.weight", layer, "up_proj", _planted(0.05 + 0.01 * layer, 64, rng),
                            (128, 64), role="up", base_fro=20.0 + layer))
    return DiffResult(base="b", tuned="t", thresholds=list(TAUS), modules=mods, complete=True, elapsed_s=1.25, device="cpu")


# ---- findings against brute force -------------------------------------------------------------------

def test_rank_finding_matches_brute_force_medians(planted):
    f = {x.topic: x for x in diff_findings(planted)}
    ranks, fracs, ratios = [], [], []
    for m in planted.modules:
        S = np.asarray(m.singular_values)  # top 64 = all here
        k = int(np.searchsorted(np.cumsum(S**2), 0.9 * np.sum(S**2)) + 1)
        ranks.append(k)
        fracs.append(k / 64)
        ratios.append((k / 64) / (random_energy_rank(tuple(m.shape), 0.9) / 64))
    n = f["rank"].numbers
    assert n["median_rank"] == statistics.median(ranks)
    assert n["median_frac"] == pytest.approx(statistics.median(fracs))
    assert n["median_ratio_to_random"] == pytest.approx(statistics.median(ratios))
    assert rank_words(statistics.median(ratios)) in f["rank"].text
    assert f"{statistics.median(ranks):g} of its p = 64" in f["rank"].text


def test_kind_depth_and_size_findings(planted):
    f = {x.topic: x for x in diff_findings(planted)}
    q = [m.energy_rank["0.9"] / 64 for m in planted.modules if m.module == "q_proj"]
    up = [m.energy_rank["0.9"] / 64 for m in planted.modules if m.module == "up_proj"]
    assert f["modules"].numbers["q_proj"]["median_frac"] == pytest.approx(statistics.median(q))
    assert f["modules"].numbers["up_proj"]["median_frac"] == pytest.approx(statistics.median(up))
    assert "lowest in q_proj, highest in up_proj" in f["modules"].text
    # deeper layers decay faster in both kinds: the rank needed falls with depth
    thirds = f["depth"].numbers["thirds"]
    first = [m.energy_rank_frac["0.9"] for m in planted.modules if m.layer in (0, 1)]
    assert thirds[0] == pytest.approx(statistics.median(first))
    assert thirds[0] > thirds[2] and "falls with depth" in f["depth"].text
    rel = [m.fro_norm / m.base_fro_norm for m in planted.modules]
    assert f["size"].numbers["median_rel_norm"] == pytest.approx(statistics.median(rel))
    assert f["size"].numbers["largest"] == max(planted.modules, key=lambda m: m.rel_norm).name


def test_adapter_finding_says_how_much_of_r_is_used():
    rng = np.random.default_rng(1)
    mods = []
    for layer in range(4):  # rank-8 updates whose 90% rank is 5 or 6, as the demo's LoRA r = 8
        S = np.zeros(64)
        S[:8] = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3 + 0.1 * (layer % 2), 0.1]
        mods.append(_module(f"l.{layer}.q_proj.weight", layer, "q_proj", S * (1 + 0.001 * rng.random()), (64, 64), lora_r=8))
    res = DiffResult(base="b", tuned="a", thresholds=list(TAUS), modules=mods, complete=True)
    used = [m.energy_rank["0.9"] for m in mods]
    (f,) = [x for x in diff_findings(res) if x.topic == "adapter"]
    assert f"LoRA r = 8: {statistics.median(used):g} of 8 ranks used" in f.text
    assert f.numbers["min_used"] == min(used) and f.numbers["max_used"] == max(used)
    assert "No matrix needs all of its r" in f.text


def test_zero_and_empty_matrices_do_not_break_findings_or_the_summary():
    zero = _module("l.0.q_proj.weight", 0, "q_proj", np.zeros(8), (8, 8))
    empty = _module("l.0.k_proj.weight", 0, "k_proj", np.zeros(0), (0, 16))
    res = DiffResult(base="b", tuned="t", thresholds=list(TAUS), modules=[zero, empty], complete=True)
    recs = {r["module"]: r for r in res.summary_records()}
    assert recs["k_proj"]["random_frac"] == 0.0 and recs["k_proj"]["p"] == 0
    f = diff_findings(res)
    assert [x.topic for x in f if x.warning] == ["zero"] and "exactly zero" in f[0].text


def test_skipped_reasons_are_grouped_and_explained():
    res = DiffResult(base="b", tuned="t", thresholds=[0.9], complete=True, skipped=[
        {"name": f"l.{i}.norm.weight", "reason": "1-D tensor (norm or bias), not a weight matrix"} for i in range(3)]
        + [{"name": "x", "reason": "shape mismatch: base (2, 3) vs tuned (3, 3)"}])
    assert skipped_reasons(res) == [("1-D tensor (norm or bias), not a weight matrix", 3), ("shape mismatch", 1)]
    (f,) = [x for x in diff_findings(res) if x.topic == "skipped"]
    assert f.text.startswith("4 tensors were not analysed: 3 × 1-D tensor") and 'results.json ("skipped")' in f.text


# ---- caveats: recognised from spectra.numerics' own messages ---------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8_rows(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / s).clamp(-128, 127) * s


def _caveat_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, str, str]]:
    g = _gen(20)
    w = torch.randn(64, 1024, generator=g) * 0.02
    b16 = w.bfloat16()
    lr = torch.randn(64, 8, generator=g) @ torch.randn(8, 1024, generator=g) / math.sqrt(8)
    sub_b, sub_t = b16.clone(), b16.clone()
    sub_b[:, :4], sub_t[:, :4] = torch.tensor(3e-39).bfloat16(), torch.tensor(1e-39).bfloat16()
    return {
        "rounding_level": (b16, (b16.float() * (1 + 3e-3 * torch.randn(64, 1024, generator=g))).bfloat16(), "bfloat16", "bfloat16"),
        # a sub-ulp rank-1 update rounded entry by entry: one-step flips whose top direction stands above noise
        "rounding_steps": (b16, (b16.float() + 4e-3 * b16.float().abs() * torch.sign(lr[:, :1] * lr[:1, :])).bfloat16(),
                           "bfloat16", "bfloat16"),
        "precision_mismatch": (w, (w + 2e-4 * lr).bfloat16(), "float32", "bfloat16"),
        "quantisation_grid": (b16, _int8_rows(w + 1e-3 * lr).bfloat16(), "bfloat16", "bfloat16"),
        "subnormal": (sub_b, sub_t, "bfloat16", "bfloat16"),
    }


@pytest.mark.parametrize("code", [c for c in CAVEATS if c != "approximate"])  # (approximate: the sketch's, not numerics')
def test_every_numerics_caveat_is_recognised_in_a_note(code):
    b, t, bd, td = _caveat_cases()[code]
    flags = numeric_flags(b, t, t.double() - b.double(), base_dtype=bd, tuned_dtype=td)
    assert code in [f.code for f in flags]
    note = "; ".join(["LoRA r=8, alpha=16, scale=2", *(f.message for f in flags)])
    assert caveat_codes(note) == [f.code for f in flags]  # each recognised, none invented


def test_the_approximate_modes_note_is_recognised():
    # the words spectra.records.approx_result writes into a sketched matrix's note
    assert caveat_codes("approximate: energy ranks lie within energy_rank_bounds; nuclear norm …") == ["approximate"]


def test_caveats_become_warnings_in_results_json_and_findings(tmp_path):
    from safetensors.torch import save_file

    b, t, _, _ = _caveat_cases()["rounding_level"]
    save_file({"model.layers.0.self_attn.q_proj.weight": b.contiguous()}, str(tmp_path / "b.safetensors"))
    save_file({"model.layers.0.self_attn.q_proj.weight": t.contiguous()}, str(tmp_path / "t.safetensors"))
    res = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors", out_dir=tmp_path / "out", plots=False)
    doc = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    (w,) = [w for w in doc["warnings"] if w.startswith("caveat (rounding_level)")]
    assert "1 of 1 matrices" in w and "rounding noise" in w
    again = DiffResult.load(tmp_path / "out")
    again.add_caveat_warnings()  # idempotent: a resume or a second save does not duplicate them
    assert sum(x.startswith("caveat ") for x in again.warnings) == 1
    f = diff_findings(res)
    assert f[0].warning and f[0].numbers == {"code": "rounding_level", "matrices": 1}
    assert any(x.topic == "rank" and "No statement on rank" in x.text for x in f)


# ---- results files: NaN, surrogates, validation -----------------------------------------------------

def _strict_loads(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_become_null_with_a_warning(planted, tmp_path):
    planted.modules[1].stable_rank = float("inf")
    planted.modules[2].singular_values[3] = float("nan")
    assert planted.non_finite() == ["modules[1].stable_rank", "modules[2].singular_values"]
    doc = _strict_loads(planted.to_json())
    assert doc["modules"][1]["stable_rank"] is None and doc["modules"][2]["singular_values"][3] is None
    assert any("NaN or infinite" in w and "modules[1].stable_rank" in w for w in doc["warnings"])
    planted.save_json(tmp_path / "r.json")  # no ValueError from allow_nan=False
    _strict_loads((tmp_path / "r.json").read_text(encoding="utf-8"))


def test_lone_surrogate_name_gives_valid_utf8_json_that_reads_back(planted, tmp_path):
    name = "model.layers.0.\ud800\x1b[31m.q_proj.weight"
    planted.modules[0].name = name
    path = planted.save_json(tmp_path / "results.json")
    raw = path.read_bytes()
    raw.decode("utf-8")  # strict: valid UTF-8
    assert DiffResult.load(path).modules[0].name == name
    assert "\\ud800" in display_name(name) and "\x1b" not in display_name(name)


@pytest.mark.parametrize("edit,key", [
    (lambda d: d.update(modules="oops"), "modules must be an array of objects. Got string"),
    (lambda d: d.update(thresholds=[]), "thresholds must be a non-empty array"),
    (lambda d: d.pop("modules"), "missing key 'modules'"),
    (lambda d: d["modules"][0]["energy_rank"].pop("0.9"), "modules[0].energy_rank must be an object with an integer"),
    (lambda d: d["modules"][0].update(shape=[64]), "modules[0].shape must be an array of two"),
    (lambda d: d["modules"][1].update(layer="3"), "modules[1].layer must be a non-negative integer or null. Got string"),
    (lambda d: d.update(skipped=[{"name": 1}]), "skipped[0] must be an object"),
    (lambda d: d.update(schema="spectra.diff/0"), "schema must be 'spectra.diff/1'"),
])
def test_from_dict_refuses_wrong_types_with_one_line(planted, tmp_path, edit, key):
    doc = json.loads(planted.to_json())
    edit(doc)
    with pytest.raises(ResultsFormatError) as err:
        DiffResult.from_dict(doc, source=tmp_path / "results.json")
    text = str(err.value)
    assert key in text and "\n" not in text and "results.json" in text


# ---- Python conventions -----------------------------------------------------------------------------

def test_short_repr_dataframe_and_summary(planted):
    planted.modules = planted.modules * 200  # 2400 matrices: repr must stay short
    assert len(repr(planted)) < 300 and "2400 matrices" in repr(planted)
    assert len(repr(planted.modules[0])) < 300
    df = planted.to_dataframe()
    assert str(df["layer"].dtype) == "Int64" and df.layer.tolist()[:2] == [0, 0]
    assert "energy_rank_0_9" in df.columns and all(c.isidentifier() for c in df.columns)
    assert (df.energy_rank_0_9 == [m.energy_rank["0.9"] for m in planted.modules]).all()
    s = planted.summary()
    assert list(s.index) == ["q_proj", "up_proj"]  # role order
    assert s.loc["q_proj", "count"] == 1200


def test_summary_without_pandas_is_the_list_of_dicts(planted, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    rows = planted.summary()
    assert isinstance(rows, list) and rows == planted.summary_records()


def test_display_helpers():
    assert printable("a\x1b[2Jb\x9b\x07") == "a\\x1b[2Jb\\x9b\\x07"
    long = "model.layers.0." + "x" * 200_000 + ".q_proj.weight"
    assert len(display_name(long)) <= 120 and display_name(long).endswith(".q_proj.weight")
    assert shorten("abc", 10) == "abc"


# ---- figures that say what they show ----------------------------------------------------------------

def test_cumulative_energy_is_exact_where_stored_and_true_beyond(planted):
    rng = np.random.default_rng(3)
    S = _planted(0.02, 128, rng)  # slow decay: the 90% and 99% ranks lie beyond the 16 stored values
    m = _module("l.0.up_proj.weight", 0, "up_proj", S, (256, 128), top_k=16)
    k, E, k_more, e_more = cumulative_energy(m, list(TAUS))
    full = np.cumsum(S.astype(np.float64) ** 2) / np.sum(S.astype(np.float64) ** 2)
    np.testing.assert_allclose(E, full[:16], rtol=1e-12)
    assert list(k) == list(range(1, 17)) and len(k_more) >= 2
    for r, tau in zip(k_more, e_more, strict=True):  # energy_rank[τ] is where the true curve first reaches τ
        assert full[int(r) - 1] >= tau > full[int(r) - 2]


def test_rank_heatmap_shows_each_shapes_baseline_and_lora_usage(planted):
    fig = rank_heatmap(planted)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    for shape, label in (((64, 64), "q_proj"), ((128, 64), "up_proj")):
        frac = random_energy_rank(shape, 0.9) / 64
        assert f"{label}\nrandom {frac:.2f}" in ticks
    for m in planted.modules:
        m.lora_r = 8 if m.module == "q_proj" else 16
    fig = rank_heatmap(planted)
    texts = {t.get_text() for t in fig.axes[0].texts}
    want = {f"{m.energy_rank['0.9']}/{m.lora_r}" for m in planted.modules}
    assert want <= texts
    assert fig.axes[1].get_ylim() == (0.0, 1.0)


def test_spectra_figure_draws_every_layer_and_says_what_is_not_stored(planted):
    fig = spectra_figure(planted)
    cumulative_axes = fig.axes[1:4:2]  # (σ, cumulative) per kind
    for ax in cumulative_axes:
        solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
        assert len(solid) == 6  # every layer
    title = fig._suptitle.get_text()
    assert "99% rank" in title and "not stored" not in title  # 64 stored values cover these 64-wide spectra
    for m in planted.modules:
        m.singular_values = m.singular_values[:8]
    assert "not stored" in spectra_figure(planted)._suptitle.get_text()
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert not any(re.search(r"[_^]\{", lbl) for lbl in labels)  # no raw mathtext


def test_cell_text_colour_is_the_more_readable_one():
    from matplotlib import colormaps

    def lum(c):
        lin = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    for name in ("viridis", "magma", "Reds"):
        for x in np.linspace(0, 1, 257):
            c = colormaps[name](x)
            contrast = {"black": (lum(c) + 0.05) / 0.05, "white": 1.05 / (lum(c) + 0.05)}
            assert contrast[text_color(c)] == max(contrast.values())
            assert max(contrast.values()) >= 4.5  # WCAG AA for normal text
