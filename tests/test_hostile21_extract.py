"""``spectra extract`` and ``spectra recommend`` against an outside probe (round 21).

1. ``--budget N%`` took the percentage of every selected matrix, frozen ones included, while the totals
   reported the share against the changed ones and ``recommend`` used a third count: a 10% budget of a model
   with one frozen layer printed "share of full update 0.1979". The full update is now the matrices that
   changed, in the budget, the totals and ``recommend`` alike.
2. ``--energy 1.0`` kept float32 rounding noise of the stored weights as directions (an exact rank-3 update
   got rank 7 to 32), which ``--budget`` never buys and the rest of spectra does not count as the update.
   Its rank now stops at the directions above the rounding floor, with a note; ``--rank`` keeps what was
   asked and notes the directions at the rounding level.

References are numpy's float64 SVD of the stored ΔW (tuned and base read back as float64).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from spectra.extract import ExtractConfig, extract
from tests.cli_util import cli as _cli

ROOT = Path(__file__).resolve().parents[1]
MATS = ("q_proj", "k_proj", "v_proj")
SHAPE = (32, 48)  # (out, in) of every matrix: one cost per component, out + in = 80


def _frozen_layer_pair(root: Path) -> tuple[str, str, dict[str, np.ndarray]]:
    """Two layers of three ``SHAPE`` matrices, float32; the tuned layer 0 moved by 0.02·N(0, 1) (full rank),
    layer 1 stored equal to the base (frozen). Returns the paths and the stored ΔW of the changed ones."""
    g = torch.Generator().manual_seed(21)
    base = {f"model.layers.{i}.self_attn.{m}.weight": 0.1 * torch.randn(*SHAPE, generator=g) for i in (0, 1) for m in MATS}
    tuned = {n: (w + 0.02 * torch.randn(*SHAPE, generator=g)) if ".0." in n else w.clone() for n, w in base.items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    deltas = {n: tuned[n].double().numpy() - base[n].double().numpy() for n in base if ".0." in n}
    return str(root / "base.safetensors"), str(root / "tuned.safetensors"), deltas


def test_a_percentage_budget_is_of_the_changed_matrices(tmp_path):
    base, tuned, deltas = _frozen_layer_pair(tmp_path)
    changed = len(deltas) * SHAPE[0] * SHAPE[1]  # 3 of the 6 matrices: 4,608 parameters of update
    res = extract(base, tuned, tmp_path / "x", config=ExtractConfig(budget="10%"), plots=False)
    want = math.floor(0.10 * changed)  # 460, not 921 (10% of all six)
    assert res.allocation["budget_params"] == want and res.selection["budget_params"] == want
    t = res.totals
    assert t["full_params"] == changed and t["params"] <= want and t["param_fraction"] <= 0.10
    # every component costs out + in = 80: the budget buys the 5 largest σ² over the changed matrices (greedy is
    # exact for one cost); float64 reference of the stored updates
    k = want // sum(SHAPE)
    S2 = {n: np.linalg.svd(d, compute_uv=False) ** 2 for n, d in deltas.items()}
    top = np.sort(np.concatenate(list(S2.values())))[::-1]
    assert t["params"] == k * sum(SHAPE)
    assert abs(t["energy_kept"] - top[:k].sum() / top.sum()) < 1e-9
    by = {m["name"]: m for m in res.modules}
    for n, s2 in S2.items():
        r = by[n]["rank"]
        assert r == int(np.sum(s2 >= top[k - 1]))  # each matrix holds its share of the top k
        assert abs(by[n]["energy_kept"] - s2[:r].sum() / s2.sum()) < 1e-9


def test_extract_and_recommend_print_one_full_update(tmp_path):
    """The CLI: extract's share and recommend's denominator are of the same full update, the changed matrices'."""
    base, tuned, deltas = _frozen_layer_pair(tmp_path)
    changed = len(deltas) * SHAPE[0] * SHAPE[1]
    ex = _cli(["extract", base, tuned, "--budget", "10%", "-o", str(tmp_path / "x"), "--no-plots"])
    assert ex.returncode == 0, ex.stderr
    doc = json.loads((tmp_path / "x" / "extract.json").read_text())
    assert doc["totals"]["full_params"] == changed and doc["allocation"]["budget_params"] == math.floor(0.10 * changed)
    row = next(line for line in ex.stdout.splitlines() if line.strip("│┃ ").startswith("extracted"))
    assert float(row.split("│")[3]) <= 0.10  # "share of full update" within the 10% asked for
    d = _cli(["diff", base, tuned, "--out", str(tmp_path / "d"), "--no-plots"])
    assert d.returncode == 0, d.stderr
    rec = _cli(["recommend", str(tmp_path / "d" / "results.json"), "--budget", "10%"])
    assert rec.returncode == 0, rec.stderr
    m = re.search(r"([\d,]+) LoRA parameters \(([\d.]+)% of the full update's ([\d,]+)\)", rec.stderr)
    assert m, rec.stderr
    params, full = int(m.group(1).replace(",", "")), int(m.group(3).replace(",", ""))
    assert full == changed and params <= math.floor(0.10 * changed)
    assert "of the changed matrices" in " ".join(_cli(["extract", "--help"]).stdout.split())


def _exact_low_rank_pair(root: Path) -> tuple[str, str, dict[str, np.ndarray]]:
    """float32 base (0.1·N(0, 1)) and tuned = base + an exact low-rank update rounded once to float32: q_proj
    rank 3 (σ = 0.05, 0.03, 0.01), k_proj rank 6 (σ = 0.05 ×3, 0.025 ×3). The stored ΔW also holds the float32
    rounding of the tuned weights, ~4e-8 per direction, below their rounding floor (~6e-8)."""
    rng = np.random.default_rng(7)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (32, 32, [0.05, 0.03, 0.01]),
              "model.layers.0.self_attn.k_proj.weight": (16, 32, [0.05] * 3 + [0.025] * 3)}
    base, tuned, deltas = {}, {}, {}
    for n, (o, i, s) in shapes.items():
        W = 0.1 * rng.standard_normal((o, i))
        U = np.linalg.qr(rng.standard_normal((o, len(s))))[0]
        V = np.linalg.qr(rng.standard_normal((i, len(s))))[0]
        b = torch.tensor(W, dtype=torch.float32)
        t = (b.double() + torch.tensor(U @ np.diag(s) @ V.T)).float()
        base[n], tuned[n] = b, t
        deltas[n] = t.double().numpy() - b.double().numpy()
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return str(root / "base.safetensors"), str(root / "tuned.safetensors"), deltas


def test_energy_one_keeps_no_direction_at_the_rounding_floor(tmp_path):
    base, tuned, deltas = _exact_low_rank_pair(tmp_path)
    true = {"model.layers.0.self_attn.q_proj.weight": 3, "model.layers.0.self_attn.k_proj.weight": 6}
    for n, d in deltas.items():  # the reference: the rounding noise stands above float64's resolution
        S = np.linalg.svd(d, compute_uv=False)
        res = S[0] * np.sqrt(min(d.shape) * np.finfo(float).eps)  # float64 resolution, σ₁·√(p·ε)
        assert np.sum(res < S) > true[n] + 3
    res = extract(base, tuned, tmp_path / "x", config=ExtractConfig(energy=1.0), plots=False)
    by = {m["name"]: m for m in res.modules}
    for n, d in deltas.items():
        S2 = np.linalg.svd(d, compute_uv=False) ** 2
        m = by[n]
        assert m["rank"] == true[n], (n, m["rank"])
        assert "rounding floor" in m["note"] and f"capped at the {true[n]} resolved" in m["note"], m["note"]
        assert abs(m["energy_kept"] - S2[: true[n]].sum() / S2.sum()) < 1e-12  # what the rank holds, said as it is
    assert any("rounding floor" in w and "--energy" in w for w in res.warnings), res.warnings
    # the factors written are the resolved directions: B·A is the rank-r truncation of the stored ΔW
    ad = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    for n, d in deltas.items():
        key = "base_model.model." + n[: -len(".weight")]
        BA = ad[key + ".lora_B.weight"].double().numpy() @ ad[key + ".lora_A.weight"].double().numpy()
        U, S, Vt = np.linalg.svd(d, full_matrices=False)
        r = true[n]
        assert np.linalg.norm(BA - (U[:, :r] * S[:r]) @ Vt[:r]) < 1e-6 * S[0]


def test_rank_above_the_resolved_directions_is_kept_and_noted(tmp_path):
    base, tuned, deltas = _exact_low_rank_pair(tmp_path)
    res = extract(base, tuned, tmp_path / "x", config=ExtractConfig(rank=5), plots=False)
    by = {m["name"]: m for m in res.modules}
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert by[q]["rank"] == 5 and by[k]["rank"] == 5  # the rank asked for, not capped
    assert "only 3 of its 5 directions" in by[q]["note"] and "rounding floor" in by[q]["note"], by[q]["note"]
    assert "rounding floor" not in by[k]["note"]  # 6 resolved directions: rank 5 holds none of the noise
    S2 = np.linalg.svd(deltas[q], compute_uv=False) ** 2
    assert abs(by[q]["energy_kept"] - S2[:5].sum() / S2.sum()) < 1e-12
    assert any("--rank 5" in w and "rounding floor" in w for w in res.warnings), res.warnings
