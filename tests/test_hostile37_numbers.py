"""Thirty-seventh round: numbers of the float32 route and of the resolved directions that every command counts
(docs/bad_inputs.md, "thirty-seventh round")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.cli_util import cli


def test_float32_route_certifies_signal_rank_or_solves_again_in_float64(tmp_path):
    # an exactly rank-1 update of a float32 matrix: the float32 Gram route certified its energy ranks, but its values past
    # σ₁ are its rounding (~1e-4·σ₁, within the certificate's bound √Δ of 0): signal_rank counted them (22), recommend
    # bought them (r = 24); the certificate now checks the signal rank, and such a matrix is solved in float64
    g = torch.Generator().manual_seed(0)
    name, dense = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    W, W2 = torch.randn(48, 48, generator=g) * 0.05, torch.randn(48, 64, generator=g) * 0.05
    u, v = torch.randn(48, 1, generator=g), torch.randn(1, 48, generator=g)
    save_file({name: W, dense: W2}, str(tmp_path / "b.safetensors"))
    save_file({name: W + 0.02 * u @ v, dense: W2 + 0.01 * torch.randn(48, 64, generator=g)}, str(tmp_path / "t.safetensors"))
    runs = {}
    for precision in ("float32", "float64"):
        run = cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--precision", precision,
                   "--out", str(tmp_path / precision), "--no-plots"])
        assert run.returncode == 0, run.stderr
        runs[precision] = {m["name"]: m for m in json.loads((tmp_path / precision / "results.json").read_text())["modules"]}
    low, full = runs["float32"][name], runs["float32"][dense]
    assert low["method"] == "gram/float64" and low["signal_rank"] == 1 and low["energy_rank"]["0.99"] == 1
    # a dense update keeps the certified float32 spectrum, and its signal rank is the float64 route's
    assert full["method"] == "gram/float32-certified" and full["signal_rank"] == runs["float64"][dense]["signal_rank"]
    for opts in (["--budget", "100%"], ["--energy", "1.0"]):
        rec = cli(["recommend", str(tmp_path / "float32" / "results.json"), *opts])
        assert rec.returncode == 0, rec.stderr
        assert '"model.layers.0.self_attn.q_proj": 1' in rec.stdout, (opts, rec.stdout)


def test_certified_float32_record_buys_no_value_within_its_error_bound():
    # a certified float32 record's values at or below √Δ (its error bound) may be rounding: no budget buys them
    from spectra.metrics import float32_error_bound, rank_resolution, route_resolution

    cut = route_resolution(1.0, 512, "gram/float32-certified")
    assert cut == pytest.approx(float32_error_bound(1.0, 512) ** 0.5) and 2e-3 < cut < 5e-3  # not √(p·ε₃₂) = 7.8e-3
    assert route_resolution(1.0, 512, "gram/float64") == rank_resolution(1.0, 512)


def test_interfere_and_trace_resolve_the_directions_compare_resolves(tmp_path):
    # two float64 updates sharing their top direction, each with another second direction at 5e-7·σ₁: above the
    # Gram route's resolution √(p·ε)·σ₁ = 1.0e-7·σ₁ (p = 48), which compare cuts at; interfere cut at 1e-6·σ₁
    from spectra.interference import spectrum_and_top

    rng = np.random.default_rng(9)
    U, _ = np.linalg.qr(rng.standard_normal((48, 3)))
    V, _ = np.linalg.qr(rng.standard_normal((80, 3)))
    name = "model.layers.0.self_attn.k_proj.weight"
    W = rng.standard_normal((48, 80)) * 0.05
    A = np.outer(U[:, 0], V[:, 0]) + 5e-7 * np.outer(U[:, 1], V[:, 1])
    B = np.outer(U[:, 0], V[:, 0]) + 5e-7 * np.outer(U[:, 2], V[:, 2])
    for file, M in (("base", W), ("a", W + A), ("b", W + B)):
        save_file({name: torch.tensor(M)}, str(tmp_path / f"{file}.safetensors"))
    S, top = spectrum_and_top(torch.tensor(A), 4)
    assert top.S.numel() == 2  # both resolved directions, as compare's rank_a
    f = [str(tmp_path / f"{x}.safetensors") for x in ("base", "a", "b")]
    comp = cli(["compare", f[1], f[2], "--base", f[0], "--top-k", "4", "--out", str(tmp_path / "c"), "--no-plots"])
    assert comp.returncode == 0, comp.stderr
    inter = cli(["interfere", "--base", f[0], f[1], f[2], "--top-k", "4", "--out", str(tmp_path / "i"), "--no-plots"])
    assert inter.returncode == 0, inter.stderr
    (c,) = json.loads((tmp_path / "c" / "compare.json").read_text())["modules"]
    (i,) = json.loads((tmp_path / "i" / "interfere.json").read_text())["modules"]
    assert (c["rank_a"], c["rank_b"]) == (2, 2) and i["ranks"] == [2, 2]
    # φ of the right subspaces: the shared direction of two, 1/2 (Hu et al.'s normalisation by min(k_a, k_b))
    assert abs(c["phi"]["right"]["phi_full"] - 0.5) < 1e-6 and abs(i["phi"][0][1] - 0.5) < 1e-6


def test_approx_stops_sketching_when_a_round_costs_more_than_the_exact_route(monkeypatch):
    # a dense 8000 × 600 update: its ranks need a sketch near p/2, and each round after the first costs more than the
    # float64 Gram route's whole spectrum; the sketch went 64, 128, 256 columns before computing that spectrum anyway
    import spectra.sketch as sk
    from spectra.metrics import energy_rank

    widths = []
    real = sk.randomized_svd
    monkeypatch.setattr(sk, "randomized_svd", lambda M, k, **kw: widths.append(k) or real(M, k, **kw))
    M = torch.randn(8000, 600, generator=torch.Generator().manual_seed(0))
    res = sk.approx_energy_ranks(M, [0.5, 0.9])
    assert widths == [64] and res.exact
    S = np.linalg.svd(M.double().numpy(), compute_uv=False)
    for tau in (0.5, 0.9):
        r = res.ranks[tau]
        assert r.lo == r.hi == energy_rank(S, tau)


def test_recommend_says_when_the_lora_holds_more_parameters_than_the_dense_update(tmp_path):
    # 4 × 4 updates of rank 4: r·(out + in) = 32 > out·in = 16 (extract said it; recommend gave 200% silently)
    g = torch.Generator().manual_seed(0)
    b = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(4, 4, generator=g) for i in range(3)}
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file({k: v + 0.1 * torch.randn(4, 4, generator=g) for k, v in b.items()}, str(tmp_path / "t.safetensors"))
    run = cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "o"),
               "--no-plots"])
    assert run.returncode == 0, run.stderr
    rec = cli(["recommend", str(tmp_path / "o" / "results.json"), "--energy", "0.999"])
    assert rec.returncode == 0, rec.stderr
    assert "hold more parameters than the dense ΔW" in (rec.stdout + rec.stderr).replace("\n", " "), rec.stderr
    small = cli(["recommend", str(tmp_path / "o" / "results.json"), "--energy", "0.5"])
    assert small.returncode == 0 and "hold more parameters" not in small.stdout + small.stderr
