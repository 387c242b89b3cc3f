"""Thirty-sixth probe round: budgets against the Gram route's rounding and the fractional bound of a capped module
(docs/bad_inputs.md, "thirty-sixth round")."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file

from tests.cli_util import cli


def _planted(out: int, inn: int, s: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((out, s.size)))
    V, _ = np.linalg.qr(rng.standard_normal((inn, s.size)))
    return U @ np.diag(s) @ V.T


def test_extract_budget_bound_counts_the_block_the_budget_cannot_buy(tmp_path):
    # 10 × 12: a component costs 22; --budget 60 affords rank 2, and the LP bound takes 16/22 of the third
    s = np.geomspace(1.0, 0.1, 10)
    name = "model.layers.0.mlp.up_proj.weight"
    save_file({name: torch.zeros(10, 12)}, str(tmp_path / "b.safetensors"))
    save_file({name: torch.tensor(_planted(10, 12, s, 1), dtype=torch.float32)}, str(tmp_path / "t.safetensors"))
    run = cli(["extract", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--budget", "60",
               "-o", str(tmp_path / "x"), "--no-plots"])
    assert run.returncode == 0, run.stderr
    alloc = json.loads((tmp_path / "x" / "extract.json").read_text())["allocation"]
    e = s**2 / np.sum(s**2)
    assert alloc["used_params"] == 44 and abs(alloc["kept"] - e[:2].sum()) < 1e-6
    bound = e[:2].sum() + 16 / 22 * e[2]  # the fractional knapsack's optimum
    assert abs(alloc["fractional_bound"] - bound) < 1e-6 and abs(alloc["gap"] - (bound - e[:2].sum())) < 1e-6
    assert alloc["critical"] == {"module": name, "rank": 3} and "every component fitted" not in alloc["method"]


def test_budgets_and_signal_rank_leave_the_gram_routes_rounding_alone(tmp_path):
    # an exactly rank-1 float64 update (σ₁ = 3): the Gram route shows values ~3e-8 beyond it, its rounding
    name = "model.layers.0.self_attn.v_proj.weight"
    W = np.random.default_rng(0).standard_normal((16, 32)) * 0.5
    save_file({name: torch.tensor(W)}, str(tmp_path / "b.safetensors"))
    save_file({name: torch.tensor(W + _planted(16, 32, np.array([3.0]), 39))}, str(tmp_path / "t.safetensors"))
    b, t = str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")
    run = cli(["diff", b, t, "--out", str(tmp_path / "o"), "--no-plots"])
    assert run.returncode == 0, run.stderr
    (m,) = json.loads((tmp_path / "o" / "results.json").read_text())["modules"]
    assert m["method"] == "gram/float64" and m["singular_values"][1] > m["rounding_floor"]  # above the storage floor
    assert m["signal_rank"] == 1
    rec = cli(["recommend", str(tmp_path / "o" / "results.json"), "--budget", "100000"])
    assert rec.returncode == 0, rec.stderr
    assert '"r": 1,' in rec.stdout and "holds all of its update's directions" in rec.stdout + rec.stderr
    ext = cli(["extract", b, t, "--budget", "100000", "-o", str(tmp_path / "x"), "--no-plots"])
    assert ext.returncode == 0, ext.stderr
    (mod,) = json.loads((tmp_path / "x" / "extract.json").read_text())["modules"]
    assert mod["rank"] == 1


def test_approx_goes_to_the_exact_route_without_a_full_svd_at_half_width(monkeypatch):
    # a dense update: the sketches never narrow the bounds; at p/2 the sketch was a full float64 SVD with its vectors
    # (3.4 GB for a 50000 × 2000 update), dropped, before the exact route ran
    import spectra.sketch as sketch

    widths = []
    real = sketch.randomized_svd
    monkeypatch.setattr(sketch, "randomized_svd", lambda M, k, **kw: widths.append(k) or real(M, k, **kw))
    M = torch.randn(3000, 400, generator=torch.Generator().manual_seed(0))
    res = sketch.approx_energy_ranks(M, [0.9])
    S = np.linalg.svd(M.double().numpy(), compute_uv=False)
    e = np.cumsum(S**2) / np.sum(S**2)
    # 256 columns would be p/2 or more, and (thirty-seventh round) 128 already costs more than the Gram route's values
    assert res.exact and widths == [64]
    assert res.ranks[0.9].lo == res.ranks[0.9].hi == int(np.searchsorted(e, 0.9) + 1)
