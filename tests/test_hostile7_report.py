"""Hostile and odd inputs found by the seventh outside probe (recommend, report): each test reproduces a
finding and checks the fix, numbers against an independent float64 numpy reference."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import spectra
from spectra.errors import ConfigError
from spectra.metrics import numerical_rank
from spectra.recommend import recommend
from spectra.report import build_report, input_files
from spectra.results import DiffResult
from spectra_cli.main import main

DEMO = Path(__file__).resolve().parents[1] / "reports" / "demo"  # shipped: outputs of `make demo`
H = 16


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def _energy_rank(S: np.ndarray, tau: float) -> int:
    """Reference: the fewest σ holding τ of Σσ² (S scaled to ~1 first, so squares stay finite)."""
    s2 = (S / S[0]) ** 2
    return int(np.searchsorted(np.cumsum(s2), tau * s2.sum(), side="left")) + 1


def _greedy(gains: dict[str, np.ndarray], cost: dict[str, int], budget: int) -> dict[str, int]:
    """Reference: components in decreasing σ²/cost (ties: module, then rank) until the first that does not fit, then
    the rest of that order once more, taking each that still fits and continues its module's rank."""
    items = sorted(((-g / cost[p], p, k) for p, gs in gains.items() for k, g in enumerate(gs)), key=lambda x: (x[0], x[1], x[2]))
    ranks, used = dict.fromkeys(gains, 0), 0
    for _, p, k in items:
        if used + cost[p] <= budget and ranks[p] == k:
            used += cost[p]
            ranks[p] += 1
    return ranks


# ---- 1: --max-rank bounds a fused module's rank with --budget too ------------------------------------------
@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """Two layers of a fused qkv_proj (split q/k/v by spectra diff) with a large rank-6 update, and an
    o_proj with a small one."""
    root = tmp_path_factory.mktemp("fused")
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for layer in range(2):
        for name, shape, scale in (("qkv_proj", (3 * H, H), 1.0), ("o_proj", (H, H), 1e-3)):
            key = f"model.layers.{layer}.self_attn.{name}.weight"
            w = 0.02 * torch.randn(*shape, generator=g, dtype=torch.float64)
            base[key] = w
            tuned[key] = w + scale * torch.randn(shape[0], 6, generator=g, dtype=torch.float64) @ torch.randn(
                6, shape[1], generator=g, dtype=torch.float64)
    b, t = _save(root / "b", base), _save(root / "t", tuned)
    spectra.diff(b, t, out_dir=root / "d", plots=False)
    return root / "d" / "results.json", base, tuned


@pytest.mark.parametrize("budget", ["383", "300", "1000"])
def test_recommend_budget_never_gives_a_fused_module_more_than_max_rank(fused, budget):
    results, base, tuned = fused
    assert any(":q" in m["name"] for m in json.loads(results.read_text())["modules"])  # the diff split qkv_proj
    rec = recommend(results, energy=0.9, budget=budget, max_rank=2)
    assert rec.ranks and max(rec.ranks.values()) <= 2
    assert rec.config["r"] <= 2 and all(r <= 2 for r in rec.config["rank_pattern"].values())
    assert rec.params <= int(budget)
    # reference: the parts' τ-ranks from float64 SVDs; each module's parts pool their σ², cut at the cap
    gains, cost = {}, {}
    for key, w in base.items():
        d = (tuned[key] - w).numpy()
        parts = np.split(d, 3) if "qkv" in key else [d]
        pooled = np.concatenate([(s := np.linalg.svd(x, compute_uv=False))[:_energy_rank(s, 0.9)] for x in parts])
        path = key.removesuffix(".weight")
        gains[path] = np.sort(pooled**2)[::-1][:2]
        cost[path] = d.shape[0] + d.shape[1]
    want = {p: r for p, r in _greedy(gains, cost, int(budget)).items() if r}
    assert rec.ranks == want


def test_recommend_max_rank_without_budget_caps_fused_modules(fused):
    rec = recommend(fused[0], energy=0.9, max_rank=2)
    assert max(rec.ranks.values()) == 2


# ---- 2: rounding noise gets no rank -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def rounding(tmp_path_factory):
    """bf16: q_proj has a real rank-2 update, k_proj changed by at most one ulp (rounding noise)."""
    root = tmp_path_factory.mktemp("round")
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for layer in range(2):
        for name in ("q_proj", "k_proj"):
            w = torch.randn(64, 64, generator=g) * 0.02
            key = f"model.layers.{layer}.self_attn.{name}.weight"
            if name == "q_proj":
                t = w + torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g) * 1e-3
            else:
                t = w + torch.randn(64, 64, generator=g) * 1e-6 + w * 2**-8
            base[key], tuned[key] = w.bfloat16(), t.bfloat16()
    b, t = _save(root / "b", base), _save(root / "t", tuned)
    spectra.diff(b, t, out_dir=root / "d", plots=False)
    return root, base, tuned


def test_recommend_leaves_modules_at_the_rounding_level_out(rounding):
    root, base, tuned = rounding
    results = root / "d" / "results.json"
    noise = {m.name for m in DiffResult.from_dict(json.loads(results.read_text())).modules if "rounding_level" in m.caveats}
    assert noise == {f"model.layers.{i}.self_attn.k_proj.weight" for i in range(2)}  # diff's own rule flags k_proj
    for kw in ({"energy": 0.9}, {"energy": 0.9, "budget": "5%"}, {"energy": None, "budget": "6%"}):
        rec = recommend(results, **kw)
        assert set(rec.ranks) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}, kw
        assert rec.config["target_modules"] == ["q_proj"]
        assert any("rounding level" in n and "k_proj" in n for n in rec.notes)
    rec = recommend(results, energy=0.9)
    for i in range(2):  # reference: the τ-rank of each q_proj's ΔW from a float64 SVD
        key = f"model.layers.{i}.self_attn.q_proj.weight"
        s = np.linalg.svd((tuned[key].double() - base[key].double()).numpy(), compute_uv=False)
        assert rec.ranks[key.removesuffix(".weight")] == _energy_rank(s, 0.9)
    r = CliRunner().invoke(main, ["recommend", str(results)])
    assert r.exit_code == 0 and "note:" in r.output and "rounding level" in r.output


def test_recommend_refuses_when_every_update_is_rounding_noise(rounding, tmp_path):
    root, base, tuned = rounding
    keep = [k for k in base if "k_proj" in k]
    b = _save(tmp_path / "b", {k: base[k] for k in keep})
    t = _save(tmp_path / "t", {k: tuned[k] for k in keep})
    spectra.diff(b, t, out_dir=tmp_path / "d", plots=False)
    with pytest.raises(ConfigError, match="rounding level") as e:
        recommend(tmp_path / "d", energy=0.9)
    assert "\n" not in str(e.value)


# ---- 3: float64 updates near 1e200 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """float64 weights × 1e200 with low-rank updates, and the same × 1 (a scaled copy)."""
    root = tmp_path_factory.mktemp("huge")
    g = torch.Generator().manual_seed(0)
    pairs = {"huge": ({}, {}), "unit": ({}, {})}
    for layer in range(2):
        for name, shape, r in (("self_attn.q_proj", (32, 32), 3), ("mlp.up_proj", (64, 32), 6)):
            w = torch.randn(*shape, generator=g, dtype=torch.float64)
            s = torch.diag(torch.tensor([4.0, 2, 1, 0.5, 0.25, 0.1][:r], dtype=torch.float64))
            u = torch.randn(shape[0], r, generator=g, dtype=torch.float64) @ s @ torch.randn(r, shape[1], generator=g, dtype=torch.float64)
            for tag, scale in (("huge", 1e200), ("unit", 1.0)):
                key = f"model.layers.{layer}.{name}.weight"
                pairs[tag][0][key], pairs[tag][1][key] = w * scale, (w + 0.01 * u) * scale
    for tag, (b, t) in pairs.items():
        spectra.diff(_save(root / f"{tag}_b", b), _save(root / f"{tag}_t", t), out_dir=root / tag, plots=False)
    return root, pairs


@pytest.mark.parametrize("kw", [{"energy": 0.8}, {"energy": None, "budget": "20%"}, {"energy": 0.8, "budget": "20%"},
                                {"energy": 0.95, "budget": "10%"}])
def test_recommend_on_weights_near_1e200_matches_numpy_on_a_scaled_copy(huge, kw):
    root, pairs = huge
    rec = recommend(root / "huge", **kw)  # was OverflowError at float(fro_norm) ** 2
    if kw["energy"] is not None:  # τ-ranks are the update's own; the tails past them are rounding, not scaled copies
        assert rec.config == recommend(root / "unit", **kw).config
    assert not any(re.search(r"\b(nan|inf)\b", n) for n in rec.notes)
    base, tuned = pairs["huge"]
    S, cost, full = {}, {}, 0
    for key in base:  # reference: float64 SVD of the huge ΔW divided by 2**665 (exact), no overflow
        d = np.ldexp((tuned[key] - base[key]).numpy(), -665)
        S[key.removesuffix(".weight")] = np.linalg.svd(d, compute_uv=False)
        cost[key.removesuffix(".weight")] = d.shape[0] + d.shape[1]
        full += d.shape[0] * d.shape[1]
    tau = kw["energy"]
    # a budget alone buys every value above the Gram route's resolution σ₁√(pε) (below it: rounding, thirty-sixth round)
    caps = {p: (_energy_rank(s, tau) if tau is not None else numerical_rank(s)) for p, s in S.items()}
    n = int(float(kw.get("budget", "100%").rstrip("%")) / 100 * full)
    if sum(caps[p] * cost[p] for p in S) <= n:
        assert rec.ranks == caps
        return
    want = _greedy({p: s[: caps[p]] ** 2 for p, s in S.items()}, cost, n)
    energy = sum(float(np.sum(s**2)) for s in S.values())
    kept = sum(float(np.sum(S[p][:r] ** 2)) for p, r in rec.ranks.items())
    if rec.ranks != {p: r for p, r in want.items() if r}:  # two layers' components equal up to rounding: either is the choice
        assert kept == pytest.approx(sum(float(np.sum(S[p][:r] ** 2)) for p, r in want.items()), rel=1e-9)
        assert sum(r * cost[p] for p, r in rec.ranks.items()) == sum(r * cost[p] for p, r in want.items())
    line = next(x for x in rec.notes if "binds" in x)
    assert float(re.search(r"keeps ([0-9.]+) of", line).group(1)) == pytest.approx(kept / energy, abs=6e-4)


# ---- 4: training logs of two sweeps with the same run names ----------------------------------------------
def test_report_keeps_training_runs_that_share_a_folder_name(tmp_path):
    ends = {"expA": 4.725, "expB": 5.553}
    for exp, end in ends.items():
        run = tmp_path / exp / "run"
        run.mkdir(parents=True)
        recs = [{"step": 0, "target_loss": 5.5, "source_loss": 1.0}, {"step": 4, "target_loss": end, "source_loss": 1.2}]
        (run / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    text = build_report([tmp_path / "expA" / "run", tmp_path / "expB" / "run"])
    section = text[text.index("Learning vs forgetting"):]
    for exp, end in ends.items():  # each run its own row, labelled by the shortest path that tells them apart
        assert re.search(rf"<td>{exp}/run</td><td>4</td><td>5\.5</td><td>{end}</td>", section), exp
    alone = build_report([tmp_path / "expA" / "run"])
    assert "<td>run</td>" in alone  # a run alone keeps its folder name


def test_run_labels_are_the_shortest_distinguishing_suffixes(tmp_path):
    from spectra.report import run_labels

    paths = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "a" / "other", tmp_path / "x" / "a" / "run"]
    # a/run is a suffix of x/a/run: it takes one more folder
    assert run_labels(paths) == [f"{tmp_path.name}/a/run", "b/run", "other", "x/a/run"]
    assert run_labels([tmp_path / "r", tmp_path / "r"]) == ["r", "r (2)"]


# ---- 5: values read from result files are escaped ---------------------------------------------------------
SCRIPT = "<script>alert('x')</script>"


def _plant(doc: dict, where: tuple[str, ...]) -> dict:
    doc = copy.deepcopy(doc)
    d = doc
    for k in where[:-1]:
        d = d[k]
    d[where[-1]] = SCRIPT
    return doc


def _assert_inert(text: str) -> None:
    assert "<script>alert" not in text and SCRIPT not in text
    assert "&lt;script&gt;alert" in text  # shown, as text
    assert text.count("<script>") == 1  # only the report's own inline table sorter


@pytest.mark.parametrize("where", [("config", "epsilon"), ("config", "intruder_k")])
def test_report_escapes_compare_config_values(tmp_path, where):
    doc = json.loads((DEMO / "compare_lora8_vs_full" / "compare.json").read_text())
    (tmp_path / "compare.json").write_text(json.dumps(_plant(doc, where)))
    _assert_inert(build_report([tmp_path / "compare.json"]))


@pytest.mark.parametrize("where", [("serving", "max_lora_rank"), ("serving", "modules"), ("eval", "blocks"),
                                   ("eval", "seq_len"), ("eval", "text"), ("device",), ("dtype",), ("strategy",)])
def test_report_escapes_extract_values(tmp_path, where):
    doc = json.loads((DEMO / "extract_rank8" / "extract.json").read_text())
    doc["eval"] = {"text": "held_out.txt", "blocks": 8, "seq_len": 64,
                   "loss": {"base": 3.0, "tuned": 2.0, "extracted": 2.1, "uniform": 2.3},
                   "recovered": {"extracted": 0.9, "uniform": 0.7}}
    (tmp_path / "extract.json").write_text(json.dumps(_plant(doc, where)))
    _assert_inert(build_report([tmp_path / "extract.json"]))


# ---- 6: messages and counting ----------------------------------------------------------------------------
def test_report_out_under_a_file_says_so(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(main, ["report", str(DEMO / "extract_rank8"), "-o", str(tmp_path / "afile" / "r.html")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    line = r.output.strip()
    assert "\n" not in line and "is a file, not a folder" in line and "resume" not in line
    assert str(tmp_path / "afile") in line
    assert (tmp_path / "afile").read_text() == "x"


def test_report_counts_a_file_named_twice_once(tmp_path):
    folder = DEMO / "extract_rank8"
    assert input_files([folder, folder / "extract.json", folder / "." / "extract.json"]) == [folder / "extract.json"]
    text = build_report([folder, folder / "extract.json"])
    assert text.count("<h2>LoRA extraction:") == 1


@pytest.mark.parametrize("kw", [{}, {"energy": 0.8}, {"energy": None, "budget": "30%"}])
def test_recommend_leaves_a_module_with_a_null_norm_out(tmp_path, kw):
    """A results.json whose fro_norm is null (diff writes a non-finite norm as null): TypeError traceback
    for a τ read off singular values and for a budget; the module is now left out with a note."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.0.self_attn.{m}_proj.weight" for m in ("q", "v")]
    base = {n: torch.randn(64, 64, generator=g) for n in names}
    b = _save(tmp_path / "b", base)
    t = _save(tmp_path / "t", {n: w + 0.01 * torch.randn(64, 64, generator=g) for n, w in base.items()})
    assert CliRunner().invoke(main, ["diff", str(b), str(t), "--out", str(tmp_path / "d"), "--no-plots"]).exit_code == 0
    doc = json.loads((tmp_path / "d" / "results.json").read_text())
    doc["modules"][0]["fro_norm"] = None
    rec = recommend(doc, **kw)
    assert set(rec.ranks) == {names[1][: -len(".weight")]}
    assert any("fro_norm null" in n for n in rec.notes), rec.notes
