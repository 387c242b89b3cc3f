"""The HTML reports' findings against a new-user probe (round 22).

1. ``extract``'s first finding said "The adapter keeps 100.0% of the update's energy" when the embedding and
   the head, not extracted, held 29.4% of ‖ΔW‖²_F (``energy_kept`` is of the extracted matrices only). It now
   says "of the extracted matrices' energy" and, when matrices were left out, the share of all of it
   (``energy_kept_all``) and what the left-out ones hold.
2. ``interfere``'s finding ranked pairs "Most alike … least …" when every median cosine was within chance for
   64 × 64 matrices (1/√(out·in) ≈ 0.016) and φ said the opposite. It now gives the chance levels (the cosine's
   1/√(out·in), φ's max(k)/d) and, when no pair's cosine passes 3/√(out·in), says that no pair stands out
   from unrelated updates; pairs that clearly differ are still ranked.

References: numpy float64 of the stored ΔW (tuned and base read back as float64) and closed forms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from spectra.extract import ExtractConfig, extract
from spectra.interfere import interfere
from spectra.report_extract import findings as extract_findings
from spectra.report_interfere import findings as interfere_findings
from tests.cli_util import cli

N = 64  # every interfere matrix is N × N: chance sd 1/√(N·N) = 1/64, φ's random baseline 16/64 at top-k 16
MATS = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(3) for m in "qv"]


def _deltas(root: Path, names: tuple[str, ...]) -> tuple[str, dict[str, np.ndarray]]:
    """The base file and the stored ΔW (float64) of each named task file next to it."""
    base = {k: v.double().numpy() for k, v in load_file(str(root / "base.safetensors")).items()}
    return str(root / "base.safetensors"), {
        t: {k: v.double().numpy() - base[k] for k, v in load_file(str(root / f"{t}.safetensors")).items()} for t in names}


def _tasks(root: Path, planted: float) -> tuple[str, dict[str, dict[str, np.ndarray]]]:
    """A base of ``MATS`` and three full fine-tunes a, b, c: each ΔW is 0.01·N(0, 1) (full rank, so top-k = 16),
    and a and b add ``planted`` · u vᵀ with one unit u, v per matrix (0: three unrelated updates)."""
    g = torch.Generator().manual_seed(22)
    W = {n: 0.1 * torch.randn(N, N, generator=g) for n in MATS}
    shared = {}
    for n in MATS:
        u, v = torch.randn(N, 1, generator=g), torch.randn(1, N, generator=g)
        shared[n] = planted * (u / u.norm()) @ (v / v.norm())
    root.mkdir(parents=True, exist_ok=True)
    save_file(W, str(root / "base.safetensors"))
    for t in "abc":
        save_file({n: w + 0.01 * torch.randn(N, N, generator=g) + (shared[n] if t != "c" else 0) for n, w in W.items()},
                  str(root / f"{t}.safetensors"))
    return _deltas(root, ("a", "b", "c"))


def _median_cosines(deltas: dict[str, dict[str, np.ndarray]]) -> dict[tuple[str, str], float]:
    """Per pair, the median over matrices of ⟨ΔW_s, ΔW_t⟩_F / (‖ΔW_s‖‖ΔW_t‖), float64."""
    out = {}
    for s, t in (("a", "b"), ("a", "c"), ("b", "c")):
        out[(s, t)] = float(np.median([np.vdot(deltas[s][n], deltas[t][n]) / np.linalg.norm(deltas[s][n])
                                       / np.linalg.norm(deltas[t][n]) for n in MATS]))
    return out


def _median_z(deltas: dict[str, dict[str, np.ndarray]], pair: tuple[str, str], names: list[str] = MATS) -> float:
    """The median over matrices of cos·√(out·in): about a standard normal per matrix for unrelated updates."""
    s, t = pair
    return float(np.median([np.vdot(deltas[s][n], deltas[t][n]) / np.linalg.norm(deltas[s][n]) / np.linalg.norm(deltas[t][n])
                            * np.sqrt(deltas[s][n].size) for n in names]))


def test_consistently_small_cosines_over_many_matrices_are_no_chance(tmp_path):
    """Review: the test compared each pair's median cosine with one matrix's chance level 3/√(out·in); a weak direction
    shared in all 24 matrices (cosines ≈ 2.2/64, a median 8 standard deviations of a median away from 0) read as "no
    pair stands out"."""
    names = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(12) for m in "qv"]
    g = torch.Generator().manual_seed(5)
    W = {n: 0.1 * torch.randn(N, N, generator=g) for n in names}
    shared = {}
    for n in names:
        u, v = torch.randn(N, 1, generator=g), torch.randn(1, N, generator=g)
        shared[n] = 0.12 * (u / u.norm()) @ (v / v.norm())  # ‖·‖² 0.014 against the noise's 0.41: cosine ≈ 0.034
    save_file(W, str(tmp_path / "base.safetensors"))
    for t in "abc":
        save_file({n: w + 0.01 * torch.randn(N, N, generator=g) + (shared[n] if t != "c" else 0) for n, w in W.items()},
                  str(tmp_path / f"{t}.safetensors"))
    _, deltas = _deltas(tmp_path, ("a", "b", "c"))
    z = _median_z(deltas, ("a", "b"), names)
    bound = 3 * np.sqrt(np.pi / 2) / np.sqrt(len(names))
    per = [np.vdot(deltas["a"][n], deltas["b"][n]) / np.linalg.norm(deltas["a"][n]) / np.linalg.norm(deltas["b"][n]) for n in names]
    assert z > bound and np.median(per) < 3 / N, (z, bound, np.median(per))  # the setup: the old rule's "chance"
    interfere(str(tmp_path / "base.safetensors"), [str(tmp_path / f"{t}.safetensors") for t in "abc"],
              out_dir=tmp_path / "i", plots=False)
    text, _ = _first(tmp_path / "i" / "interfere.json")
    assert text.startswith("Most alike: a.safetensors and b.safetensors"), text


def _first(path: Path) -> tuple[str, dict]:
    f = interfere_findings(path, json.loads(path.read_text()))[0]
    return f.text, f.numbers


def test_interfere_of_unrelated_updates_names_no_most_alike_pair(tmp_path):
    base, deltas = _tasks(tmp_path, planted=0.0)
    ref = _median_cosines(deltas)
    sd = 1 / np.sqrt(N * N)  # the cosine of two independent random vectors of N·N entries: mean 0, variance 1/(N·N)
    assert all(abs(v) < 3 * sd for v in ref.values()), ref  # the setup: every pair is at chance
    interfere(base, [str(tmp_path / f"{t}.safetensors") for t in "abc"], out_dir=tmp_path / "i", plots=False)
    text, nums = _first(tmp_path / "i" / "interfere.json")
    for pair in ref:  # the setup, by the test's own rule: each pair's median of cos·√(out·in) within 3·√(π/2)/√m
        assert abs(_median_z(deltas, pair)) < 3 * np.sqrt(np.pi / 2) / np.sqrt(len(MATS)), pair
    assert text.startswith("No pair stands out from unrelated updates"), text
    assert "Most alike" not in text and "least" not in text
    assert f"1/√(out·in) = {sd:.3f}" in text and f"{N} × {N}" in text and "√(π/2)/√m" in text
    assert abs(nums["cosine_chance_sd"] - sd) < 1e-15
    assert abs(nums["cosine"][0] - min(ref.values())) < 1e-9 and abs(nums["cosine"][1] - max(ref.values())) < 1e-9
    # φ beside its random baseline max(k_s, k_t)/d: full-rank updates keep the top 16 of 64 input directions
    assert "against 0.25 for random subspaces" in text
    assert all(abs(v - 16 / N) < 1e-12 for v in nums["phi_random"].values())
    # two tasks: the one pair is named, with the chance level beside it
    interfere(base, [str(tmp_path / f"{t}.safetensors") for t in "ab"], out_dir=tmp_path / "two", plots=False)
    text, _ = _first(tmp_path / "two" / "interfere.json")
    assert text.startswith(f"a.safetensors and b.safetensors: median cosine {ref[('a', 'b')]:.2f}, φ "), text
    assert "the cosines are within chance" in text and f"1/√(out·in) = {sd:.3f}" in text


def test_interfere_ranks_pairs_that_share_a_planted_direction(tmp_path):
    base, deltas = _tasks(tmp_path, planted=0.64)  # ‖u vᵀ‖² = 0.41 ≈ ‖0.01·N(0, 1)‖² of 64 × 64: cosine ≈ 0.5
    ref = _median_cosines(deltas)
    sd = 1 / np.sqrt(N * N)
    assert ref[("a", "b")] > 0.3 and abs(ref[("a", "c")]) < 3 * sd  # the setup
    interfere(base, [str(tmp_path / f"{t}.safetensors") for t in "abc"], out_dir=tmp_path / "i", plots=False)
    text, nums = _first(tmp_path / "i" / "interfere.json")
    assert text.startswith(f"Most alike: a.safetensors and b.safetensors (median cosine {ref[('a', 'b')]:.2f}, φ "), text
    low = min(ref, key=ref.get)
    assert f"least: {low[0]}.safetensors and {low[1]}.safetensors (cosine {ref[low]:.2f}, φ " in text
    assert f"unrelated updates give cosines of standard deviation 1/√(out·in) = {sd:.3f}" in text
    assert "against 0.25 for random subspaces" in text and "No pair stands out" not in text
    assert abs(nums["cosine"][1] - ref[("a", "b")]) < 1e-9


def test_interfere_report_html_says_the_chance_level(tmp_path):
    """The probe's path: ``spectra interfere … --report`` (the HTML holds the findings)."""
    base, _ = _tasks(tmp_path, planted=0.0)
    r = cli(["interfere", "--base", base, *[str(tmp_path / f"{t}.safetensors") for t in "abc"], "--out",
             str(tmp_path / "i"), "--report", "--no-plots"])
    assert r.returncode == 0, r.stderr
    html = next((tmp_path / "i").glob("*.html")).read_text()
    assert "No pair stands out from unrelated updates" in html and "Most alike" not in html


# ---- extract: the energy kept is of the extracted matrices -------------------------------------------------
def _pair_with_embeddings(root: Path) -> tuple[str, str, dict[str, np.ndarray]]:
    """Two layers of 32 × 32 q/v matrices moved by rank-2 updates, and an embedding and a head (64 × 32) moved by
    0.05·N(0, 1), which extract leaves out without --embeddings. Returns the paths and every stored ΔW (float64)."""
    g = torch.Generator().manual_seed(7)
    W = {f"model.layers.{i}.self_attn.{m}_proj.weight": 0.1 * torch.randn(32, 32, generator=g) for i in range(2) for m in "qv"}
    W |= {"model.embed_tokens.weight": torch.randn(64, 32, generator=g), "lm_head.weight": torch.randn(64, 32, generator=g)}
    tuned = {n: w + (0.05 * torch.randn(*w.shape, generator=g) if n.endswith(("embed_tokens.weight", "lm_head.weight"))
                     else 0.05 * torch.randn(32, 2, generator=g) @ torch.randn(2, 32, generator=g)) for n, w in W.items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file(W, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return (str(root / "base.safetensors"), str(root / "tuned.safetensors"),
            {n: tuned[n].double().numpy() - W[n].double().numpy() for n in W})


def test_extract_findings_say_the_share_of_all_the_matrices(tmp_path):
    base, tuned, D = _pair_with_embeddings(tmp_path)
    extract(base, tuned, tmp_path / "x", config=ExtractConfig(rank=1), plots=False)
    path = tmp_path / "x" / "extract.json"
    first = extract_findings(path, json.loads(path.read_text()))[0].text
    # float64 reference: rank 1 keeps σ₁² of each projection; the embedding and the head are not extracted
    out = ("model.embed_tokens.weight", "lm_head.weight")
    e = {n: np.linalg.svd(d, compute_uv=False) ** 2 for n, d in D.items()}
    inside = sum(s.sum() for n, s in e.items() if n not in out)
    left = sum(e[n].sum() for n in out)
    kept = sum(s[0] for n, s in e.items() if n not in out) / inside
    share, kept_all = left / (inside + left), sum(s[0] for n, s in e.items() if n not in out) / (inside + left)
    assert 0.05 < share < 0.95 and kept_all < kept - 0.05  # the setup: the head and embedding hold a real share
    assert "of the update's energy" not in first
    biggest = max(out, key=lambda n: e[n].sum())
    assert first.startswith(f"The adapter keeps {kept:.1%} of the extracted matrices' energy ({kept_all:.1%} of all the "
                            f"weight matrices': the 2 not extracted, e.g. {biggest}, hold {share:.1%}) with "), first
    # and in the HTML report, as the probe ran it
    r = cli(["report", str(tmp_path / "x"), "-o", str(tmp_path / "r.html")])
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "r.html").read_text()
    assert f"keeps {kept:.1%} of the extracted matrices" in html and f"{kept_all:.1%} of all the weight matrices" in html
    assert not any(f"% of the update{q}s energy" in html for q in ("'", "&#x27;", "&#39;"))


def test_extract_findings_without_left_out_matrices_say_nothing_more(tmp_path):
    base, tuned, D = _pair_with_embeddings(tmp_path)
    extract(base, tuned, tmp_path / "x", config=ExtractConfig(rank=1, embeddings=True), plots=False)
    path = tmp_path / "x" / "extract.json"
    doc = json.loads(path.read_text())
    first = extract_findings(path, doc)[0].text
    e = {n: np.linalg.svd(d, compute_uv=False) ** 2 for n, d in D.items()}
    kept = sum(s[0] for s in e.values()) / sum(s.sum() for s in e.values())
    assert doc["totals"]["not_extracted_energy_share"] == 0
    assert first.startswith(f"The adapter keeps {kept:.1%} of the extracted matrices' energy with "), first


# ---- diff --approx: the report marks what the terminal marks ---------------------------------------------------
def test_the_diff_report_marks_sketched_ranks_and_shows_their_bounds(tmp_path):
    """Probe I: the terminal marked approximate ranks "≈"; report.html showed them bare, never showed the bounds, and its
    figure caption called them "exact points of the curve"; results.csv's note pointed to bounds it does not hold."""
    import csv

    g = torch.Generator().manual_seed(0)
    base, tuned, S = {}, {}, {}
    for layer in range(2):
        o, i = 700, 500
        U = torch.linalg.qr(torch.randn(o, i, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(i, i, generator=g, dtype=torch.float64)).Q
        # decaying fast enough that the first sketch (64 columns) bounds the ranks: a wider one costs more than the exact route
        s = 0.05 * torch.exp(-torch.arange(i, dtype=torch.float64) / (20 + 2 * layer))
        n = f"model.layers.{layer}.mlp.down_proj.weight"
        base[n] = torch.randn(o, i, generator=g)
        tuned[n] = (base[n].double() + (U * s) @ V.T).float()
        S[n] = np.linalg.svd(tuned[n].double().numpy() - base[n].double().numpy(), compute_uv=False)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    r = cli(["diff", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--approx", "-o",
             str(tmp_path / "o"), "--report"])
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    key = str(min(doc["thresholds"], key=lambda t: abs(t - 0.9)))  # the headline τ the tables show
    html = (tmp_path / "o" / "report.html").read_text()
    wide = 0
    for m in doc["modules"]:
        e = np.cumsum(S[m["name"]] ** 2) / np.sum(S[m["name"]] ** 2)  # the float64 truth lies within the bounds
        truth = int(np.searchsorted(e, float(key)) + 1)
        lo, hi = m["energy_rank_bounds"][key]
        assert lo <= truth <= hi, (m["name"], lo, truth, hi)
        if lo < hi:
            wide += 1
            assert f"≈{m['energy_rank'][key]} [{lo}, {hi}]" in html
    assert wide, "the setup: a sketched rank with bounds apart"
    assert "≈" in html.split("Per module kind")[1].split("</table>")[0]  # the kind table's median
    assert "exact points of the curve" not in html and "estimates where a matrix was sketched" in html
    with open(tmp_path / "o" / "results.csv", newline="") as f:
        notes = [row["note"] for row in csv.DictReader(f)]
    assert notes and all("energy_rank_bounds (results.json)" in n for n in notes)
