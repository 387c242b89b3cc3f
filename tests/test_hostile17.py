"""Seventeenth round of the outside probe (docs/bad_inputs.md, "seventeenth round")."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra.callbacks import SpectraTracker
from spectra.esd import esd_metrics
from spectra.randmat import mp_median
from spectra.report import build_report
from spectra.trace import load_trace
from spectra.training_inputs import read_examples
from tests.pair_util import small_pair

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The environment of a CLI child: this checkout's spectra first, the rest of PYTHONPATH kept."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}


def test_a_jsonl_data_file_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Windows editors start JSONL with EF BB BF: "line 1 is not valid JSON (Unexpected UTF-8 BOM)" while a
    .txt with the same mark was read."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first line"}\n{"prompt": "q", "response": "an answer"}\n')
    assert read_examples(path) == [("", "first line"), ("q", "an answer")]


def test_a_reader_that_leaves_stdout_ends_the_printing_not_the_run(tmp_path):
    """`spectra diff B T | head -1`: rich's console raised SystemExit(1) at its next line after the reader
    left (exit 1, no word); the printed table is a view of the files, so the run finishes, exit 0."""
    base, tuned = small_pair(tmp_path)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write to stdout fails with EPIPE
    out = tmp_path / "out"
    try:
        proc = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", "diff", base, tuned,
                               "--out", str(out)], stdout=write, stderr=subprocess.PIPE, text=True, timeout=240,
                              cwd=ROOT, env=_env())
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
    assert json.loads((out / "results.json").read_text())["complete"] is True
    assert (out / "rank_heatmap.png").is_file() and (out / "results.csv").is_file()


def test_a_full_disk_under_stdout_is_still_an_error(tmp_path):
    """Only a reader that left is forgiven: results meant for a file (> /dev/full) that did not reach it are
    an error, as before."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    base, tuned = small_pair(tmp_path)
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", "diff", base, tuned,
                               "--out", str(tmp_path / "o"), "--no-plots"], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=240, cwd=ROOT, env=_env())
    assert proc.returncode == 1 and "cannot write the output: No space left on device" in proc.stderr


def test_an_in_training_trace_records_its_seconds_and_device_for_the_report(tmp_path):
    """The report's overview row of a tracker's trace.jsonl said device "auto" (the config's word) and 0.0 s."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path)
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        tracker.measure(step)
    timings = [json.loads(x)["timing"] for x in (tmp_path / "trace.jsonl").read_text().splitlines() if '"timing"' in x]
    assert [t["step"] for t in timings] == [1, 2] and {t["device"] for t in timings} == {"cpu"}
    res = load_trace(tmp_path / "trace.jsonl")
    assert res.device == "cpu" and res.elapsed_s == pytest.approx(sum(t["seconds"] for t in timings)) and res.elapsed_s > 0
    html = build_report([str(tmp_path / "trace.jsonl")])
    overview = html[html.index("<h2>Overview</h2>"):].split("</table>")[0]
    assert f"<td>{res.elapsed_s:.1f}</td><td>cpu</td></tr>" in overview and ">auto<" not in overview
    # a resumed run drops the interrupted run's records after the resume step, its timings too
    SpectraTracker(model, every=1, out_dir=tmp_path, resume_step=1)
    kept = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r["timing"]["step"] for r in kept if "timing" in r] == [1]


def _llama_like(root: Path, changed: dict[str, torch.Tensor], *, base_dtype=torch.float32) -> tuple[str, str]:
    """``(base, tuned)`` of four 16 × 16 q/k/v/o matrices in two layers; ``changed`` adds to the named ones."""
    g = torch.Generator().manual_seed(3)
    W = {f"model.layers.{i}.self_attn.{m}_proj.weight": torch.randn(16, 16, generator=g) / 4
         for i in range(2) for m in "qkvo"}
    save_file({k: v.to(base_dtype) for k, v in W.items()}, str(root / "base.safetensors"))
    save_file({k: v + changed.get(k, 0) for k, v in W.items()}, str(root / "tuned.safetensors"))
    return str(root / "base.safetensors"), str(root / "tuned.safetensors")


def test_a_base_stored_coarser_than_the_tuned_model_raises_the_precision_caveat(tmp_path):
    """bf16 base, float32 tuned (made from a float32 original): each note said ΔW includes rounding W to bf16,
    but its wording ("if TUNED was made from …") did not match the caveat's pattern: no warning, and the
    findings read the rounding as an update about as spread out as noise."""
    g = torch.Generator().manual_seed(0)
    key = "model.layers.0.self_attn.q_proj.weight"
    base, tuned = _llama_like(tmp_path, {key: 0.01 * torch.randn(16, 1, generator=g) @ torch.randn(1, 16, generator=g)},
                              base_dtype=torch.bfloat16)
    res = spectra.diff(base, tuned)
    assert any(w.startswith("caveat (precision_mismatch)") for w in res.warnings), res.warnings
    assert all("precision_mismatch" in m.caveats for m in res.modules if m.name != key)


def test_esd_xmin_peak_of_equal_eigenvalues_is_a_failed_fit_not_a_traceback():
    """An orthogonal float64 W: its eigenvalues span ~1e-16 in log10, too narrow for 100 histogram bins
    (numpy: "Too many bins for data range"); `spectra esd --xmin peak` died on the whole model."""
    W = 4 * np.linalg.qr(np.random.default_rng(0).standard_normal((24, 24)))[0]
    lam = np.linalg.svd(W, compute_uv=False) ** 2
    assert np.ptp(np.log10(lam)) < 1e-14
    for xmin in ("peak", "fit"):
        m = esd_metrics(lam, (24, 24), xmin=xmin)
        assert m.alpha is None


def test_marchenko_pastur_median_of_a_square_matrix_is_the_closed_form():
    """β = 1 dropped the end node of the quadrature ((1 + cos φ)/π is 2/π at x = 0, not 0): the median was
    1.06e-5 too large, and with it every MP field of every square matrix and the ω(1) of signal_rank."""
    from scipy.optimize import brentq

    # quarter-circle law of σ/√n: P(u ≤ s) = (s·√(4 − s²)/2 + 2·asin(s/2))/π; the median of λ = σ² is u²
    u = brentq(lambda s: (s * math.sqrt(4 - s * s) / 2 + 2 * math.asin(s / 2)) / math.pi - 0.5, 0, 2, xtol=1e-15)
    assert mp_median(1.0) == pytest.approx(u * u, rel=1e-8)
    assert mp_median(0.25) == pytest.approx(mp_median(0.25 + 1e-12), rel=1e-6)  # other shapes were right


def test_extract_counts_and_medians_are_over_the_changed_modules_and_rounding_noise_gets_no_rank(tmp_path):
    """Frozen layers counted as "energy kept 1.000 at rank 0" (modules ≥ 90%: 10 / 14 where every changed
    module kept < 55%), and a module moved by one float32 ulp got rank 22 of rounding noise, 65% of the
    adapter, without a warning; the uniform baseline spread its rank over unchanged modules too."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    g = torch.Generator().manual_seed(1)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    upd = {n: 0.05 * torch.randn(16, 3, generator=g) @ torch.randn(3, 16, generator=g) for n in (q, k)}
    base, _ = _llama_like(tmp_path, {})
    from safetensors.torch import load_file

    W = load_file(base)
    tuned_sd = {n: w + upd.get(n, 0) for n, w in W.items()}
    tuned_sd[o] = torch.nextafter(W[o], torch.full_like(W[o], math.inf))  # one ulp up: rounding level
    save_file(tuned_sd, str(tmp_path / "t.safetensors"))
    for config in (ExtractConfig(rank=1), ExtractConfig(energy=0.9), ExtractConfig(budget="2000")):
        out = tmp_path / f"x_{config.mode}"
        res = extract(base, str(tmp_path / "t.safetensors"), out, config=config, plots=False)
        by = {m["name"]: m for m in res.modules}
        assert by[o]["rank"] == 0 and not by[o]["changed"] and "rounding noise is not extracted" in by[o]["note"]
        assert [n for n, m in by.items() if m["changed"]] == [q, k]
        t = res.totals
        assert t["changed"] == 2 and t["full_params"] == 2 * 16 * 16
        # float64 reference: Σ_{i≤r}σᵢ² / Σσᵢ² of each stored update at the chosen rank
        kept = []
        for n in (q, k):
            S = np.linalg.svd(upd[n].double().numpy(), compute_uv=False)
            kept.append(float(np.sum(S[: by[n]["rank"]] ** 2) / np.sum(S**2)))
        # (--rank finds the subspace in float32 and refines it in float64: within 1e-7 of the optimum, README)
        assert t["median_energy_kept"] == pytest.approx(float(np.median(kept)), abs=1e-7)
        assert t["min_energy_kept"] == pytest.approx(min(kept), abs=1e-7)
        assert t["modules_at_90"] == sum(x >= 0.9 for x in kept)
        assert t["min_rank"] == min(by[n]["rank"] for n in (q, k)) > 0
        # the uniform baseline: the same parameters over the two changed modules (out + in = 32 each), rounded down
        assert res.uniform["params"] == 2 * res.uniform["rank"] * 32 and 0 <= t["params"] - res.uniform["params"] < 2 * 32
        assert any("rounding level of their stored weights" in w and "1 get rank 0" in w for w in res.warnings)
        from safetensors import safe_open

        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert any("layers.0.self_attn.q_proj" in k for k in keys) and not any("o_proj" in k for k in keys)


def test_trace_of_a_run_folder_lists_the_models_beside_its_checkpoints(tmp_path):
    """Trainer.save_model's final model at the run folder and a checkpoint-final folder were dropped without
    a word: the trace read as if the run ended at its last checkpoint-N."""
    from spectra.trace import TraceConfig, trace

    base, tuned = small_pair(tmp_path)
    run = tmp_path / "run"
    for name in ("checkpoint-5", "checkpoint-10", "checkpoint-final", "step_0007"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(Path(tuned).read_bytes())
    (run / "model.safetensors").write_bytes(Path(tuned).read_bytes())
    (run / "logs").mkdir()  # no weights: not a model
    (run / "logs" / "training_args.bin").write_bytes(b"not a model")  # a Trainer file, not weights
    (run / "last").symlink_to(run / "checkpoint-10", target_is_directory=True)  # that checkpoint: not listed
    res = trace(base, [str(run)], config=TraceConfig(), plots=False)
    assert [c["step"] for c in res.checkpoints] == [5, 10]
    left = {Path(s["path"]).name: s["reason"] for s in res.skipped_checkpoints}
    assert set(left) == {"model.safetensors", "checkpoint-final", "step_0007"}
    assert all("name it checkpoint-<step> or give it a trainer_state.json" in r for r in left.values())
    # what the hint says works: checkpoint-final with its trainer_state.json, listed with the others
    (run / "checkpoint-final" / "trainer_state.json").write_text(json.dumps({"global_step": 12, "log_history": []}))
    for n in (5, 10):
        (run / f"checkpoint-{n}" / "trainer_state.json").write_text(json.dumps({"global_step": n, "log_history": []}))
    listed = trace(base, [str(run / d) for d in ("checkpoint-5", "checkpoint-10", "checkpoint-final")], plots=False)
    assert [c["step"] for c in listed.checkpoints] == [5, 10, 12]


def test_trace_medians_are_over_the_matrices_that_changed(tmp_path):
    """A run that trained q and k only: trace's findings said the median rank went "from 0 to 0" and
    ‖ΔW‖/‖W‖ "from 0 to 0" (medians over 16 matrices, 12 of them unchanged), and the larger-than-the-base
    warning diff gives on the same last checkpoint was missing."""
    from safetensors.torch import load_file

    from spectra.findings import diff_findings
    from spectra.report_trace import findings
    from spectra.trace import trace

    g = torch.Generator().manual_seed(5)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    upd = {n: 2.0 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for n in names}
    base, _ = _llama_like(tmp_path, {})
    W = load_file(base)
    ckpts = []
    for i, f in enumerate((0.5, 1.0)):
        path = tmp_path / f"c{i}.safetensors"
        save_file({n: w + f * upd.get(n, 0) for n, w in W.items()}, str(path))
        ckpts.append(str(path))
    res = trace(base, ckpts, plots=False)
    last = spectra.diff(base, ckpts[-1])
    rel = [float(np.linalg.norm(f * upd[n].double().numpy()) / np.linalg.norm(W[n].double().numpy())) for f in (0.5, 1.0)
           for n in names]
    text = " ".join(f.text for f in findings(tmp_path / "trace.json", res.to_dict()))
    assert "went from 2 to 2" in text and f"from {np.median(rel[:2]):.3g} to {np.median(rel[2:]):.3g}" in text
    assert any("larger than the base weights themselves" in w for w in res.warnings)
    assert any("the base weights themselves" in f.text for f in diff_findings(last) if f.warning)  # diff says it too


def test_interfere_medians_say_how_many_matrices_each_pair_rests_on(tmp_path):
    """One task changed 1 of the 8 matrices: "most alike … over 8 matrices" rested on one matrix, without a
    word; a sum of exactly opposite updates reported energy ranks of the rounding noise left (12 against the
    tasks' 2, 2) with no note."""
    from safetensors.torch import load_file

    from spectra.interfere import interfere
    from spectra.interfere_summary import over_matrices
    from spectra.report_interfere import findings

    g = torch.Generator().manual_seed(2)
    base, _ = _llama_like(tmp_path, {})
    W = load_file(base)
    D = {n: 1e-2 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for n in W}
    one = "model.layers.0.self_attn.q_proj.weight"
    for name, f in (("a", lambda n: D[n]), ("h", lambda n: D[n] if n == one else 0 * D[n]), ("c", lambda n: -D[n])):
        save_file({n: w + f(n) for n, w in W.items()}, str(tmp_path / f"{name}.safetensors"))
    res = interfere(base, [str(tmp_path / "a.safetensors"), str(tmp_path / "h.safetensors")], out_dir=tmp_path / "i", plots=False)
    s = res.summary
    assert s["modules"] == 8 and s["pair_modules"] == [[8, 1], [1, 1]]
    assert over_matrices(s) == "median per pair over the matrices both changed (1 of 8)"
    text = " ".join(f.text for f in findings(tmp_path / "i" / "interfere.json", res.to_dict()))
    assert "over 1 matrix of 8" in text
    assert any("ΔW = 0 on 7 of the 8 compared matrices" in w for w in res.warnings)

    res = interfere(base, [str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors")], plots=False)
    for m in res.modules:
        # float64 reference: the stored updates sum to rounding (a + c − 2·base is float32 rounding of ±D)
        total = (load_file(str(tmp_path / "a.safetensors"))[m["name"]].double() + load_file(str(tmp_path / "c.safetensors"))[m["name"]].double()
                 - 2 * W[m["name"]].double())
        assert float(torch.linalg.matrix_norm(total, 2)) < 1e-6 * float(torch.linalg.matrix_norm(D[m["name"]].double(), 2))
        assert set(m["sum"]["energy_rank"].values()) == {0} and "the updates cancel" in m["note"]
        assert m["sum"]["spectral_over_max"] < 1e-5
    # two tasks that are themselves one ulp up (rounding level, same sign): their sum does not cancel
    for name in ("u1", "u2"):
        save_file({n: torch.nextafter(w, torch.full_like(w, math.inf)) if n == one else w for n, w in W.items()},
                  str(tmp_path / f"{name}.safetensors"))
    res = interfere(base, [str(tmp_path / "u1.safetensors"), str(tmp_path / "u2.safetensors")], plots=False)
    assert not any("the updates cancel" in (m.get("note") or "") for m in res.modules)


def test_compare_interfere_and_trace_pass_on_what_pairing_said(tmp_path):
    """A tuned file that stores a changed matrix under the NFD spelling of the base's NFC name: diff warned
    ("differs only in its spelling"); interfere called the task "a copy of the base?", compare said B's
    update was exactly zero, trace said nothing."""
    import unicodedata

    from spectra.comparison import compare
    from spectra.interfere import interfere
    from spectra.trace import trace

    g = torch.Generator().manual_seed(0)
    nfc = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.caf\u00e9.weight"]
    base = {n: torch.randn(8, 8, generator=g) for n in nfc}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({n: w + 0.1 * torch.randn(8, 8, generator=g) for n, w in base.items()}, str(tmp_path / "a.safetensors"))
    save_file({unicodedata.normalize("NFD", n): w + (0.1 if "caf" in n else 0.0) * torch.randn(8, 8, generator=g)
               for n, w in base.items()}, str(tmp_path / "c.safetensors"))
    b, a, c = (str(tmp_path / f"{x}.safetensors") for x in ("base", "a", "c"))
    spelling = "differs from a base tensor's only in its spelling"
    assert any(spelling in w for w in spectra.diff(b, c).warnings)
    assert any(w.startswith("B (") and spelling in w for w in compare(a, c, base=b, plots=False).warnings)
    assert any(w.startswith(f"{c}: ") and spelling in w for w in interfere(b, [a, c], plots=False).warnings)
    assert any(w.startswith("c.safetensors: ") and spelling in w for w in trace(b, [a, c], plots=False).warnings)


def test_compare_names_two_base_matrices_it_would_key_alike(tmp_path):
    """`model.layers.0.q_proj.weight` and `layers.0.q_proj.weight` in one base: compare said the base had
    no matrix model.layers.0.self_attn.q_proj.weight, which it holds."""
    from spectra.comparison import compare
    from spectra.errors import ConfigError

    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.weight"]
    W = {n: torch.randn(8, 8, generator=g) for n in names}
    save_file(W, str(tmp_path / "base.safetensors"))
    for f in ("a", "b"):
        save_file({n: w + 0.1 * torch.randn(8, 8, generator=g) for n, w in W.items()}, str(tmp_path / f"{f}.safetensors"))
    with pytest.raises(ConfigError, match=r"the base holds (model\.)?layers\.0\.self_attn\.q_proj\.weight and .*keys alike"):
        compare(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), base=str(tmp_path / "base.safetensors"),
                plots=False)


def test_quantised_format_lookup_does_not_scan_every_tensor_name():
    """foreign_format scanned all names for `X.weight.quant_state.` once per int8 weight: 16,000 matrices
    took 100 s to pair (quadratic). It looks names up now; a names container that refuses iteration shows it."""
    from types import SimpleNamespace

    from spectra.pairing import foreign_format

    class NoScan(dict):
        def __iter__(self):
            raise AssertionError("scanned every name")

    names = NoScan({"l.0.q.weight": 0, "l.0.q.weight.quant_state.bitsandbytes__nf4": 0, "l.1.q.weight": 0, "l.1.q.SCB": 0,
                    "l.2.q.weight": 0})
    ckpt = SimpleNamespace(tensors=names)
    assert foreign_format("l.0.q", ckpt) == "bitsandbytes 4-bit"
    assert foreign_format("l.1.q", ckpt) == "bitsandbytes int8"
    assert foreign_format("l.2.q", ckpt) is None


def test_csv_names_read_back_one_way():
    """A newline was written as \\n and a backslash as itself: `a<LF>b` and `a\\nb` (typed) were one CSV name."""
    from spectra.results import csv_text

    assert csv_text("layers.0.a\nb.weight") == "layers.0.a\\nb.weight"
    assert csv_text("layers.0.a\\nb.weight") == "layers.0.a\\\\nb.weight"


def test_esd_of_an_update_fits_its_factored_and_merged_forms_alike():
    """A rank-3 ΔW: its adapter (factored) was not fitted ("rank ≤ r") while the same update merged got α from
    3 eigenvalues (one flagged over-trained). One rule now: a rank-deficient ΔW needs 20 eigenvalues."""
    from spectra.records import MIN_DELTA_FIT_RANK, delta_fit_refusal, esd_entry

    rng = np.random.default_rng(0)
    for k in (3, MIN_DELTA_FIT_RANK - 1, MIN_DELTA_FIT_RANK):
        dense = rng.standard_normal((96, k)) @ rng.standard_normal((k, 64))
        S_dense = np.linalg.svd(dense, compute_uv=False)  # 64 values, 64 − k of them rounding
        S_factored = np.concatenate([S_dense[:k], np.zeros(64 - k)])
        for S in (S_dense, S_factored):
            entry = esd_entry((96, 64), S)
            if k < MIN_DELTA_FIT_RANK:
                assert entry["delta"] is None and entry["note"].startswith(f"ΔW has only {k} eigenvalues a fit keeps")
            else:
                assert entry["delta"] is not None and delta_fit_refusal(S, (96, 64)) is None
    assert delta_fit_refusal(rng.standard_normal(8) ** 2 + 1, (8, 8)) is None  # full rank: fitted, however small


def test_extract_of_rounding_noise_only_is_one_line(tmp_path):
    """Every changed matrix one ulp away: all ranks 0, then PEFT's config writer raised "ranks must name at
    least one adapted module" (a traceback) after the spectra were computed (review of this round)."""
    from spectra.errors import ConfigError
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 16, generator=g) / 4 for i in range(3)}
    T = dict(W)
    k = "model.layers.0.self_attn.q_proj.weight"
    T[k] = torch.nextafter(W[k], torch.full_like(W[k], math.inf))
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file(T, str(tmp_path / "t.safetensors"))
    for config in (ExtractConfig(rank=2), ExtractConfig(energy=0.9), ExtractConfig(budget="1000")):
        with pytest.raises(ConfigError, match="at the rounding level of its stored weights .*nothing to extract"):
            extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / f"o_{config.mode}",
                    config=config, plots=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_esd_of_a_merged_low_rank_update_as_stored_is_not_fitted(tmp_path, dtype):
    """The merged model stored in float32/bf16: its ΔW holds the rounding of the stored weights, so its rank
    counted at float64's resolution was p and α came from the 3 eigenvalues above 1e-5 (review of this round)."""
    from spectra.config import DiffConfig

    g = torch.Generator().manual_seed(0)
    k = "model.layers.0.self_attn.q_proj.weight"
    W = torch.randn(96, 64, generator=g)
    D = 0.01 * torch.randn(96, 3, generator=g) @ torch.randn(3, 64, generator=g)
    save_file({k: W.to(dtype)}, str(tmp_path / "b.safetensors"))
    save_file({k: (W + D).to(dtype)}, str(tmp_path / "t.safetensors"))
    e = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), config=DiffConfig(esd=True)).modules[0].esd
    if dtype == torch.float32:  # the rounding is far below the fit's threshold: the three values are all it would keep
        assert e["delta"] is None and e["note"].startswith("ΔW has only 3 eigenvalues a fit keeps"), e
    else:  # bf16 rounding of unit weights is above the threshold: the stored ΔW is full rank and fitted as stored
        assert e["delta"] is not None and e["delta"]["num_evals"] == 64 and e["note"] == "", e


def test_extract_holds_an_unchanged_expert_at_its_stack_rank_and_counts_it(tmp_path):
    """One expert of a stack moved by rounding only: PEFT needs one rank per stack, so it keeps the stack's
    rank (zero factors), but the uniform baseline and the dense size left it out: the baseline had fewer
    parameters than the adapter it was said to match (review of this round)."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    g = torch.Generator().manual_seed(3)
    experts = [f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight" for e in range(3)]
    q = "model.layers.0.self_attn.q_proj.weight"
    W = {n: torch.randn(16, 16, generator=g) / 4 for n in [q, *experts]}
    T = {n: w + 0.1 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for n, w in W.items()}
    T[experts[2]] = torch.nextafter(W[experts[2]], torch.full_like(W[experts[2]], math.inf))
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file(T, str(tmp_path / "t.safetensors"))
    res = extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / "o",
                  config=ExtractConfig(rank=2), plots=False)
    by = {m["name"]: m for m in res.modules}
    assert [by[n]["rank"] for n in [q, *experts]] == [2, 2, 2, 2]
    assert not by[experts[2]]["changed"] and "held at its expert stack's rank" in by[experts[2]]["note"]
    assert any("0 get rank 0" in w and "1 keep their expert stack rank" in w for w in res.warnings)
    t = res.totals
    assert t["params"] == 4 * 2 * 32 and t["changed"] == 3
    assert res.uniform["rank"] == 2 and res.uniform["params"] == t["params"]  # the held expert counted in both
    assert t["full_params"] == 4 * 16 * 16
