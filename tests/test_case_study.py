"""The SmolLM2-135M case study in ``reports/smollm2_case_study/``: its committed summary equals what its
result files say, and the conversion's decoding math is right.

The summary tests regenerate ``summary.md`` and ``study.json`` from the committed result files with
``make.py``'s own :func:`summarise` and compare them byte for byte, then recompute the headline numbers
here from the raw files with plain ``json``/``statistics`` code. They skip only when the committed
results are absent. The decoding tests (Q4_1, Q8_0, the q/k row permutation) need no files.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

STUDY = Path(__file__).resolve().parents[1] / "reports" / "smollm2_case_study"


def _load_make():
    spec = importlib.util.spec_from_file_location("smollm2_case_study_make", STUDY / "make.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


make = _load_make()

needs_results = pytest.mark.skipif(not (STUDY / "summary.md").is_file() or not (STUDY / "study.json").is_file(),
                                   reason="the case study's results are not committed (run make study)")


# ---- the committed summary against the committed results ---------------------------------------------
@needs_results
def test_summary_and_study_json_regenerate_exactly_from_the_result_files():
    text, doc = make.summarise(STUDY)
    assert text == (STUDY / "summary.md").read_text(encoding="utf-8")
    assert doc == json.loads((STUDY / "study.json").read_text())


def _log(name: str) -> list[dict]:
    return [json.loads(x) for x in (STUDY / "runs" / name / "train_log.jsonl").read_text().splitlines() if x.strip()]


def _layer_modules(name: str, roles: set[str]) -> list[dict]:
    doc = json.loads((STUDY / f"diff_{name}" / "results.json").read_text())
    return [m for m in doc["modules"] if m["layer"] is not None and m["role"] in roles]


@needs_results
def test_headline_numbers_recomputed_from_the_raw_files():
    doc = json.loads((STUDY / "study.json").read_text())
    text = (STUDY / "summary.md").read_text(encoding="utf-8")
    attn, mlp = {"q", "k", "v", "o"}, {"gate", "up", "down"}
    base = _log("full")[0]
    assert doc["base"] == {"target_loss": round(base["target_loss"], 3), "source_loss": round(base["source_loss"], 3)}
    assert f"{base['target_loss']:.3f}" in text and f"{base['source_loss']:.3f}" in text
    for name, run in doc["runs"].items():
        last = _log(name)[-1]
        assert run["target_loss"] == round(last["target_loss"], 3)
        assert run["source_loss"] == round(last["source_loss"], 3)
        assert run["learned"] == round(base["target_loss"] - last["target_loss"], 3)
        assert run["forgot"] == round(last["source_loss"] - base["source_loss"], 3)
        mods = _layer_modules(name, attn | mlp)
        assert run["modules"] == len(mods) == 210  # 30 layers × 7 linear modules
        assert run["median_rank90"] == round(float(np.median([m["energy_rank"]["0.9"] for m in mods])), 1)
        assert run["median_frac90_mlp"] == round(float(np.median(
            [m["energy_rank"]["0.9"] / min(m["shape"]) for m in _layer_modules(name, mlp)])), 3)
        assert run["median_frac90_attn"] == round(float(np.median(
            [m["energy_rank"]["0.9"] / min(m["shape"]) for m in _layer_modules(name, attn)])), 3)
        cfg = json.loads((STUDY / "runs" / name / "train_config.json").read_text())
        assert run["trainable_params"] == cfg["trainable_params"]
        if cfg["method"] == "lora":  # a rank-r update cannot need more than r directions
            assert run["median_rank90"] <= cfg["rank"]
        # the row of the table quotes these very numbers
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        for value in (f"{run['target_loss']:.3f}", f"{run['source_loss']:.3f}", f"{run['median_rank90']:g}"):
            assert value in row
    full = doc["runs"]["full"]
    f = doc["findings"]
    assert f["full_rank90_over_r_small"] == round(full["median_rank90"] / 8, 1)
    assert f"{f['full_rank90_over_r_small']:g}× r = 8" in text
    assert f["lora_small_forgot_less"] == (doc["runs"]["lora8"]["forgot"] < full["forgot"])


@needs_results
def test_comparison_numbers_recomputed_from_compare_json():
    doc = json.loads((STUDY / "study.json").read_text())
    text = (STUDY / "summary.md").read_text(encoding="utf-8")
    for key, row in doc["comparisons"].items():
        cmp = json.loads((STUDY / f"compare_{key}" / "compare.json").read_text())
        mods = cmp["modules"]
        assert row["modules"] == len(mods)
        for side, suffix in (("right", ""), ("left", "_left")):
            phi11 = statistics.median(m["phi"][side]["phi_11"] for m in mods)
            assert row[f"median_phi_11{suffix}"] == round(phi11, 3)
            phi_full = statistics.median(m["phi"][side]["phi_full"] for m in mods)
            assert row[f"median_phi_full{suffix}"] == round(phi_full, 3)
            # φ lies in [0, 1]; the grid's last entry is φ(r_A, r_B)
            assert all(0 <= m["phi"][side]["phi_full"] <= 1 + 1e-9 for m in mods)
            some = mods[0]["name"]
            assert cmp["phi_grids"][some][side][-1][-1] == pytest.approx(mods[0]["phi"][side]["phi_full"], abs=1e-6)
        assert row["median_captured_b_in_a"] == round(statistics.median(m["captured"]["b_in_a"]["two_sided"] for m in mods), 3)
        factor = statistics.median(m["amplification"]["a"]["factor"] for m in mods)
        assert row["median_amp_factor_a"] == round(factor, 2)
        line = next(x for x in text.splitlines() if x.startswith(f"| {key} |"))
        assert f"{row['median_phi_11']:.3f}" in line and f"{row['median_phi_11_left']:.3f}" in line


@needs_results
def test_source_md_records_the_pinned_package_and_checksums():
    source = (STUDY / "SOURCE.md").read_text(encoding="utf-8")
    for fact in (make.PACKAGE, make.VERSION, make.WHEEL_SHA256, make.GGUF_SHA256, "Apache-2.0"):
        assert fact in source
    assert re.search(r"largest absolute difference 0\b", source)


@needs_results
def test_committed_folder_holds_no_weights_and_stays_small():
    files = [p for p in STUDY.rglob("*") if p.is_file() and "cache" not in p.relative_to(STUDY).parts]
    assert not [p for p in files if p.suffix in (".safetensors", ".gguf", ".whl", ".bin")]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20


# ---- the conversion's decoding, against hand-built blocks -------------------------------------------
def _f16_bytes(x: float) -> np.ndarray:
    return np.frombuffer(np.float16(x).tobytes(), dtype=np.uint8)


def test_q4_1_block_decodes_to_scale_times_nibble_plus_min():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=32)
    d, m = 0.125, -0.75  # exact in float16
    block = np.concatenate([_f16_bytes(d), _f16_bytes(m), (q[:16] | (q[16:] << 4)).astype(np.uint8)])
    out = make.dequantize_q4_1(np.concatenate([block, block]), (2, 32))
    np.testing.assert_array_equal(out[0], d * q + m)
    np.testing.assert_array_equal(out[1], out[0])


def test_q8_0_block_decodes_to_scale_times_int8():
    q = np.arange(-16, 16, dtype=np.int8)
    d = 0.0625
    block = np.concatenate([_f16_bytes(d), q.view(np.uint8)])
    np.testing.assert_array_equal(make.dequantize_q8_0(block, (1, 32))[0], d * q.astype(np.float32))


@pytest.mark.parametrize("n_head, head_dim", [(9, 64), (3, 64), (2, 8)])
def test_unpermute_rows_inverts_llama_cpp_permutation(n_head, head_dim):
    # llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) stores
    # w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in).
    w = np.random.default_rng(1).standard_normal((n_head * head_dim, 5))
    permuted = w.reshape(n_head, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(make.unpermute_rows(permuted, n_head), w)
    assert not np.array_equal(permuted, w)


@needs_results
def test_esd_and_extract_numbers_recomputed_from_the_raw_files():
    """Points 7 and 8 of the summary: α medians from the two esd.json files, the extracted adapters'
    energy from their extract.json, the losses from eval.json, each recomputed here with plain code."""
    doc = json.loads((STUDY / "study.json").read_text())
    text = (STUDY / "summary.md").read_text(encoding="utf-8")
    if "esd" not in doc:
        pytest.skip("the committed study has no esd results")
    roles = {"q", "k", "v", "o", "gate", "up", "down"}

    def alphas(name: str) -> dict[str, float]:
        d = json.loads((STUDY / f"esd_{name}" / "esd.json").read_text())
        return {m["name"]: m["alpha"] for m in d["matrices"] if m["layer"] is not None and m["role"] in roles and m["alpha"] is not None}

    base, full = alphas("base"), alphas("full")
    names = set(base) & set(full)
    assert doc["esd"]["matrices"] == len(names) == 210
    assert doc["esd"]["median_alpha_base"] == round(statistics.median(base[n] for n in names), 2)
    assert doc["esd"]["median_alpha_full"] == round(statistics.median(full[n] for n in names), 2)
    assert doc["esd"]["alpha_moved_0_1"] == sum(abs(full[n] - base[n]) >= 0.1 for n in names)
    assert f"the median α is {doc['esd']['median_alpha_base']:g} in the base" in text
    ev = json.loads((STUDY / "extract_full" / "eval.json").read_text())
    for key in ("budget", "rank8"):
        ex = json.loads((STUDY / "extract_full" / key / "extract.json").read_text())
        assert ex["totals"]["params"] <= ev["lora_params"]
        # the share of ‖ΔW‖²_F kept, from the per-module fields: Σ E_i ‖ΔW_i‖² / Σ ‖ΔW_i‖²
        mods = ex["modules"]
        kept = sum(m["energy_kept"] * m["fro_norm"] ** 2 for m in mods) / sum(m["fro_norm"] ** 2 for m in mods)
        assert doc["extract"][key]["energy_kept"] == round(kept, 3)
    loss = ev["evals"]["python"]["loss"]
    assert f"extracted (budget) {loss['extracted_budget']:.3f}" in text
    assert doc["extract"]["budget"]["energy_kept"] >= doc["extract"]["rank8"]["energy_kept"]


@needs_results
def test_trace_numbers_recomputed_from_the_raw_file():
    """Point 9: per traced step, the median 90% energy rank over the per-layer matrices, from trace.jsonl."""
    doc = json.loads((STUDY / "study.json").read_text())
    if "trace" not in doc:
        pytest.skip("the committed study has no trace")
    roles = {"q", "k", "v", "o", "gate", "up", "down"}
    by_step: dict[int, list[int]] = {}
    for line in (STUDY / "trace_full" / "trace.jsonl").read_text().splitlines():
        rec = json.loads(line)
        m = rec.get("matrix")
        if m and m["layer"] is not None and m["role"] in roles:
            by_step.setdefault(rec["step"], []).append(rec["point"]["energy_rank"]["0.9"])
    assert sorted(by_step) == [4, 8, 12, 16, 20, 24] and all(len(v) == 210 for v in by_step.values())
    for step, ranks in by_step.items():
        assert doc["trace"]["steps"][str(step)]["median_rank90"] == round(statistics.median(ranks), 1)
    assert doc["trace"]["last_equals_diff"] == (round(statistics.median(by_step[24]), 1) == doc["runs"]["full"]["median_rank90"])
