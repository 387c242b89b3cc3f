"""``spectra recommend`` against an outside probe (round 21): rounding noise bought, an alpha that underflows.

1. recommend reads ``results.json`` only, which stored no rounding floor: a float32 pair whose update is exactly
   rank 3 got ``r = 32`` in every module under ``--budget 1e18`` (the float32 rounding of the stored weights,
   σ₄ ≈ 1e-8, bought as components: 161% of the full update's parameters), and ``--budget 50%`` said "binds …
   keeps 1.000" while buying three times the parameters that hold all the energy. ``spectra extract`` on the same
   pair stops at the resolved directions and says the rest of the budget is left unspent. ``spectra diff`` now
   records each matrix's ``rounding_floor`` (the exact floor where a kept singular value reaches the cheap upper
   bound, else that bound), and recommend never buys a component at or below it.
2. ``--alpha-ratio 1e-320`` wrote ``lora_alpha`` 3e-320: a LoRA scale that is zero in float32 (the adapter does
   nothing). A ratio whose scale ``lora_alpha / r`` is not a normal float32 is refused.

References are numpy's float64 SVD of the stored ΔW and :func:`spectra.storage_floor.rounding_floor` of the stored
weights (extract's floor).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra.config import DiffConfig
from spectra.errors import ConfigError, ResultsFormatError
from spectra.metrics import numerical_rank
from spectra.recommend import recommend
from spectra.results import DiffResult
from spectra.storage_floor import rounding_floor
from tests.cli_util import cli as _cli

ROOT = Path(__file__).resolve().parents[1]
Q, K, V = (f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkv")
#: name -> (out, in, the exact update's singular values)
SPECS = {Q: (32, 32, [0.05, 0.03, 0.01]), K: (16, 32, [0.05] * 3 + [0.025] * 3), V: (16, 32, [0.04] * 2)}
TRUE = {n: len(s) for n, (_, _, s) in SPECS.items()}


def _exact_low_rank_pair(root: Path) -> tuple[str, str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """float32 base (0.1·N(0, 1)) and tuned = base + an exact low-rank update (:data:`SPECS`) rounded once to
    float32: the stored ΔW also holds the float32 rounding of the tuned weights, below their rounding floor.
    Returns the paths and name -> (base, tuned) as stored."""
    rng = np.random.default_rng(21)
    base, tuned = {}, {}
    for n, (o, i, s) in SPECS.items():
        U = np.linalg.qr(rng.standard_normal((o, len(s))))[0]
        Vt = np.linalg.qr(rng.standard_normal((i, len(s))))[0].T
        b = torch.tensor(0.1 * rng.standard_normal((o, i)), dtype=torch.float32)
        base[n], tuned[n] = b, (b.double() + torch.tensor(U @ np.diag(s) @ Vt)).float()
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return str(root / "base.safetensors"), str(root / "tuned.safetensors"), {n: (base[n], tuned[n]) for n in base}


@pytest.fixture
def diffed(tmp_path: Path) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The pair diffed by the CLI into ``tmp_path/d``; returns its results.json and the stored weights."""
    base, tuned, weights = _exact_low_rank_pair(tmp_path)
    d = _cli(["diff", base, tuned, "--out", str(tmp_path / "d"), "--no-plots"])
    assert d.returncode == 0, d.stderr
    return tmp_path / "d" / "results.json", weights


def test_diff_records_the_rounding_floor(diffed):
    """Every kept value reaches the rounding level here (p ≤ top_k): the floor is the exact one, extract's, and
    it separates the update's directions from the float32 rounding; the journal holds it too."""
    path, weights = diffed
    doc = json.loads(path.read_text())
    by = {m["name"]: m for m in doc["modules"]}
    for n, (b, t) in weights.items():
        floor = by[n]["rounding_floor"]
        assert floor == pytest.approx(rounding_floor(t, "float32", b), rel=1e-6)
        S = np.linalg.svd(t.double().numpy() - b.double().numpy(), compute_uv=False)
        assert int(np.sum(floor < S)) == TRUE[n] and S[TRUE[n]] > 1e-9  # the rounding is there, below the floor
    journal = [json.loads(line) for line in (path.parent / "results.jsonl").read_text().splitlines()]
    assert all(r["module"]["rounding_floor"] == by[r["module"]["name"]]["rounding_floor"] for r in journal if "module" in r)
    assert DiffResult.load(path).modules[0].rounding_floor == doc["modules"][0]["rounding_floor"]


def test_diff_records_the_bound_when_every_kept_value_stands_above_it(tmp_path):
    """A full-rank float32 update with --top-k 4: its 4th value is far above the floor's bound, which is recorded
    (no pass over the weights): at least the exact floor, below every kept value."""
    g = torch.Generator().manual_seed(3)
    b = 0.1 * torch.randn(48, 40, generator=g)
    t = b + 0.02 * torch.randn(48, 40, generator=g)
    save_file({Q: b}, str(tmp_path / "b.safetensors"))
    save_file({Q: t}, str(tmp_path / "t.safetensors"))
    (m,) = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors", config=DiffConfig(top_k=4)).modules
    exact = rounding_floor(t, "float32", b)
    assert exact < m.rounding_floor < m.singular_values[-1]
    u = torch.finfo(torch.float32).eps / 2  # the bound: 1.5·u/√3·2·(‖W_base‖_F + ‖ΔW‖_F)
    assert m.rounding_floor == pytest.approx(1.5 * u / 3**0.5 * 2 * (m.base_fro_norm + m.fro_norm), rel=0.02)


@pytest.mark.parametrize("budget", ["1e18", "100%", "50%"])
def test_a_budget_never_buys_the_rounding_noise(diffed, budget):
    path, _ = diffed
    rec = _cli(["recommend", str(path), "--budget", budget])
    assert rec.returncode == 0, rec.stderr
    config = json.loads(rec.stdout)
    ranks = {p: next((r for k, r in config["rank_pattern"].items() if k.endswith(p)), config["r"])
             for p in ("q_proj", "k_proj", "v_proj")}
    assert ranks == {"q_proj": 3, "k_proj": 6, "v_proj": 2}, ranks
    resolved = 3 * 64 + 6 * 48 + 2 * 48  # every resolved component: r·(out + in)
    m = re.search(r"([\d,]+) LoRA parameters \(([\d.]+)% of the full update's ([\d,]+)\)", rec.stderr)
    assert m and int(m.group(1).replace(",", "")) == resolved, rec.stderr
    text = " ".join(rec.stderr.split())
    assert "binds" not in text, text  # nothing was cut by the budget: the floor stopped it
    assert f"{resolved:,} of the budget's" in text and "rounding level of their stored weights" in text, text
    assert "3 matrices" in text, text


def test_energy_one_stops_at_the_rounding_floor(diffed):
    path, _ = diffed
    rec = recommend(path, energy=1.0)
    assert sorted(rec.ranks.values()) == [2, 3, 6], rec.ranks
    assert any("3 matrices" in n and "rounding floor" in n for n in rec.notes), rec.notes


def test_results_without_a_floor_behave_as_before_with_a_note(diffed):
    path, _ = diffed
    doc = json.loads(path.read_text())
    for m in doc["modules"]:
        del m["rounding_floor"]
    rec = recommend(doc, budget="1e18", energy=None)
    # every value kept above the Gram route's resolution σ₁√(pε), as results of an older diff gave, with no floor to cut
    # at (a value the diff computed as exactly 0 is no component to buy: the twenty-seventh round; one at or below the
    # resolution is that route's rounding: the thirty-sixth, which took 31 to 26)
    S = {m["name"]: (m["singular_values"], min(m["shape"])) for m in doc["modules"]}
    assert sorted(rec.ranks.values()) == sorted(numerical_rank(np.array(s), p) for s, p in S.values()) == [16, 16, 26]
    assert sum("no rounding floor" in n and "rerun spectra diff" in n for n in rec.notes) == 1, rec.notes


@pytest.mark.parametrize("ratio", [1e-320, 1e-40, 1e39])
def test_an_alpha_ratio_whose_scale_is_no_normal_float32_is_refused(diffed, ratio):
    path, _ = diffed
    with pytest.raises(ConfigError, match="--alpha-ratio"):
        recommend(path, energy=0.9, alpha_ratio=ratio)
    with pytest.raises(ConfigError, match="--alpha-ratio"):  # rsLoRA's scale is ratio/√r: 1e-38/√6 is subnormal
        recommend(path, energy=0.9, alpha_ratio=1.5e-38, rslora=True)
    rec = _cli(["recommend", str(path), "--alpha-ratio", repr(ratio)])
    assert rec.returncode != 0 and "--alpha-ratio" in rec.stderr and "Traceback" not in rec.stderr, rec.stderr
    assert recommend(path, energy=0.9, alpha_ratio=1e-30).config["lora_alpha"] > 0  # a tiny normal scale is fine


@pytest.mark.parametrize("value", [-1e-7, "0.1", float("inf")])
def test_an_impossible_rounding_floor_is_refused(diffed, value):
    path, _ = diffed
    doc = json.loads(path.read_text())
    doc["modules"][1]["rounding_floor"] = value
    with pytest.raises(ResultsFormatError, match=r"modules\[1\].*rounding_floor"):
        DiffResult.from_dict(doc)
    doc["modules"][1]["rounding_floor"] = None  # unknown: accepted
    assert DiffResult.from_dict(doc).modules[1].rounding_floor is None
    doc["modules"][1]["rounding_floor"] = -1.0
    path.write_text(json.dumps(doc))
    rep = _cli(["report", str(path), "-o", str(path.parent / "r.html")])
    assert rep.returncode != 0 and "rounding_floor" in rep.stderr and "Traceback" not in rep.stderr, rep.stderr


def test_a_bf16_pair_records_its_exact_floor_as_read(tmp_path):
    """A tuned side stored in bf16: the floor is computed as the pair is read (its bound stands above the kept
    values of nearly every bf16 update), equal to extract's."""
    g = torch.Generator().manual_seed(5)
    b = (0.1 * torch.randn(40, 24, generator=g)).bfloat16()
    t = (b.float() + 0.01 * torch.randn(40, 24, generator=g)).bfloat16()
    save_file({Q: b}, str(tmp_path / "b.safetensors"))
    save_file({Q: t}, str(tmp_path / "t.safetensors"))
    (m,) = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors").modules
    assert m.rounding_floor == pytest.approx(rounding_floor(t, "bfloat16", b), rel=1e-6)
    assert 0 < m.rounding_floor < m.singular_values[0]
