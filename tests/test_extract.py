"""``spectra extract`` and ``spectra recommend``: adapters PEFT loads and merges to the truncated update,
allocations checked against brute force, energy ranks against ``spectra diff``, and the bad inputs.

Every model is a tiny random transformers model of a real architecture, built from its config in the
test; the tuned side is the base plus a planted update (a rank-6 part with a decaying spectrum plus
small dense noise on every matrix, and changed norms/biases). References are numpy's float64 SVD.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import spectra
from spectra.allocation import allocate_budget, uniform_rank
from spectra.errors import CheckpointFormatError, ConfigError, IdenticalCheckpointsError, PairingError
from spectra.extract import ExtractConfig, extract
from spectra.io.adapter import open_adapter
from spectra.lowrank import dense_triplets, energy_kept, energy_rank_top, factored_triplets, parse_budget, rank_levels
from spectra.metrics import energy_rank
from spectra.recommend import recommend
from tests.conftest import random_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
FAMILIES = {
    "llama": ("llama", dict(_SMALL, num_key_value_heads=2), "causal"),
    "mistral": ("mistral", dict(_SMALL, num_key_value_heads=2), "causal"),
    "qwen2": ("qwen2", dict(_SMALL, num_key_value_heads=2), "causal"),
    "phi3": ("phi3", dict(_SMALL, num_key_value_heads=2, pad_token_id=0), "causal"),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32), "causal"),
    "gpt_neox": ("gpt_neox", dict(_SMALL), "causal"),
    "bert": ("bert", dict(_SMALL), "masked"),
    "mixtral": ("mixtral", dict(_SMALL, intermediate_size=24, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), "causal"),
}


def _model(name: str):
    model_type, kwargs, head = FAMILIES[name]
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    cls = transformers.AutoModelForMaskedLM if head == "masked" else transformers.AutoModelForCausalLM
    return cls, cls.from_config(cfg)


def _is_embedding(name: str) -> bool:
    leaf = name.rsplit(".", 2)[-2]
    return "embed" in leaf.lower() or leaf in ("wte", "wpe", "lm_head", "embed_out")


def _planted(shape: tuple[int, ...], g: torch.Generator, scale: float | None = None) -> torch.Tensor:
    """A rank-6 update with singular values 1, 1/2, … 1/6 (times ``scale``, random in [0.01, 0.03)
    by default, so that modules differ) plus dense noise 1e-3·scale."""
    out_dim, in_dim = shape
    scale = 0.01 + 0.02 * float(torch.rand((), generator=g)) if scale is None else scale
    U, _ = torch.linalg.qr(torch.randn(out_dim, 6, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_dim, 6, generator=g, dtype=torch.float64))
    s = scale / torch.arange(1, 7, dtype=torch.float64)
    return ((U * s) @ V.T + 1e-3 * scale * torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)).float()


def make_pair(tmp: Path, name: str, *, seed: int = 1, one_d: bool = True) -> tuple[Path, Path]:
    """Save ``base/`` (a tiny model) and ``tuned/`` (base + a planted update of every non-embedding
    matrix, and of every 1-D tensor when ``one_d``)."""
    _, model = _model(name)
    model.save_pretrained(tmp / "base")
    sd = load_file(str(tmp / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if v.ndim == 2 and not _is_embedding(k) and min(v.shape) > 4:
            sd[k] = v + _planted(tuple(v.shape), g)
        elif v.ndim == 1 and one_d:
            sd[k] = v + 0.01 * torch.randn(v.shape, generator=g)
    (tmp / "tuned").mkdir()
    save_file(sd, str(tmp / "tuned" / "model.safetensors"))
    shutil.copy(tmp / "base" / "config.json", tmp / "tuned" / "config.json")
    return tmp / "base", tmp / "tuned"


def peft_merge(name: str, base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Load the adapter with PEFT (asserting no missing or unexpected keys) and merge it."""
    cls, _ = _model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)  # PEFT warns on missing adapter keys
        warnings.filterwarnings("ignore", message=".*(deprecated|fan_in_fan_out|rank_pattern|alpha_pattern).*")
        model = peft.PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir)
    check = model.load_adapter(adapter_dir, adapter_name="check")
    assert not [k for k in check.missing_keys if ".check." in k or k.endswith(".check")], check.missing_keys
    assert not check.unexpected_keys, check.unexpected_keys
    model.delete_adapter("check")
    model.set_adapter("default")
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def truncated(delta: torch.Tensor, r: int) -> torch.Tensor:
    """The rank-r truncation of ``delta`` by numpy's float64 SVD (Eckart–Young)."""
    U, S, Vh = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    return torch.from_numpy((U[:, :r] * S[:r]) @ Vh[:r])


def module_ranks(adapter_dir: Path) -> dict[str, int]:
    """Module path -> rank as PEFT reads the config (rank_pattern over r)."""
    a = open_adapter(adapter_dir)
    return {m.module: m.r for m in a.modules.values()}


def merged_weight(name: str, merged: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The merged weight of a checkpoint tensor ``key``; transformers ≥ 5 fuses Mixtral's experts."""
    if name == "mixtral" and ".experts." in key:
        prefix, rest = key.split(".block_sparse_moe.experts.")
        e, w = int(rest.split(".")[0]), rest.split(".")[1]
        if w == "w2":
            return merged[f"{prefix}.mlp.experts.down_proj"][e]
        gate_up = merged[f"{prefix}.mlp.experts.gate_up_proj"][e]
        half = gate_up.shape[0] // 2
        return gate_up[:half] if w == "w1" else gate_up[half:]
    return merged[key]


@pytest.mark.parametrize("rule", ["budget", "rank"])  # rank: the float32 subspace with float64 factors
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_peft_loads_and_merges_to_the_truncation(tmp_path, name, rule):
    """Every family: PEFT loads the adapter with no missing/unexpected key, and base + merged adapter
    equals base + the rank-r truncation of each module's ΔW (r as the adapter says) to float32 rounding."""
    base_dir, tuned_dir = make_pair(tmp_path, name)
    budget = 4 * sum(t.shape[0] + t.shape[1] for n, t in load_file(str(base_dir / "model.safetensors")).items()
                     if t.ndim == 2 and not _is_embedding(n))  # a mean rank of 4 of the planted 6: it binds
    config = (ExtractConfig(budget=str(budget), save_modules=True) if rule == "budget"
              else ExtractConfig(rank=3, top_values=5, save_modules=True))  # 6 values, all of the planted part
    res = extract(base_dir, tuned_dir, tmp_path / "out", config=config)
    ranks = module_ranks(tmp_path / "out")
    if rule == "budget":
        assert len(set(ranks.values())) > 1 or name == "mixtral"  # the budget spreads ranks unevenly
    else:
        assert set(ranks.values()) == {3} and {m["method"] for m in res.modules} == {"gram-eigh/float32+ritz/float64"}
    merged = peft_merge(name, base_dir, tmp_path / "out")
    base, tuned = load_file(str(base_dir / "model.safetensors")), load_file(str(tuned_dir / "model.safetensors"))
    conv1d = name == "gpt2"
    checked = 0
    for m in res.modules:
        key = m["name"]
        W0, W1, Wm = base[key], tuned[key], merged_weight(name, merged, key)
        if conv1d and W0.shape != tuple(m["shape"]):  # Conv1D stores (in, out)
            W0, W1, Wm = W0.T, W1.T, Wm.T
        r = ranks.get(m["module"], 0)
        assert r == m["rank"]
        expected = W0.double() + truncated(W1.double() - W0.double(), r)
        scale = float((W1.double() - W0.double()).abs().max())
        torch.testing.assert_close(Wm.double(), expected, rtol=0, atol=2e-6 * scale + 1e-7)
        checked += 1
    assert checked == len(res.modules) > 0
    if name == "mixtral":  # per-expert matrices share the adapter's r (PEFT converts them only then)
        expert = {r for mod, r in ranks.items() if ".experts." in mod}
        assert expert == {json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"]}
    if name in ("gpt2", "gpt_neox", "bert"):  # every adapted module has a bias: kept as lora_B.bias
        assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_bias"]
        for m in res.modules:
            bkey = m["name"].removesuffix(".weight") + ".bias"
            if m["rank"] and bkey in base:
                torch.testing.assert_close(merged[bkey], tuned[bkey], rtol=0, atol=1e-6)
    held = {r["name"]: r["held"] for r in res.not_lora}
    assert held and all(h is not None for n, h in held.items() if "norm" in n.lower() or ".ln_" in n)
    for n in held:
        if held[n] == "modules_to_save" and n in merged:  # norms come back exactly
            torch.testing.assert_close(merged[n], tuned[n], rtol=0, atol=0)


# ---- exactness -------------------------------------------------------------------------------------
def test_extracting_a_merged_lora_recovers_it_at_rounding_level(tmp_path):
    """base + a merged rank-4 LoRA, extracted at rank 4, gives back ΔW: what is lost is only the part
    of W_tuned − W_base beyond rank 4, i.e. the float32 rounding of the merged weights."""
    cls, model = _model("llama")
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    lora.merge_and_unload().save_pretrained(tmp_path / "tuned")
    res = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", config=ExtractConfig(rank=4))
    base, tuned = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(tmp_path / "tuned" / "model.safetensors"))
    mods = open_adapter(tmp_path / "out").modules
    assert not (tmp_path / "out" / ".spectra.lock").exists()  # a finished run leaves no lock behind
    assert len(mods) == len(res.modules) == 14
    for mod in mods.values():
        delta = tuned[mod.weight_name].double() - base[mod.weight_name].double()
        floor = float(torch.linalg.matrix_norm(delta - truncated(delta, 4)))  # rounding beyond rank 4
        err = float(torch.linalg.matrix_norm(mod.dense_delta() - delta))
        assert floor / float(torch.linalg.matrix_norm(delta)) < 1e-6  # the floor is rounding
        assert err <= floor * 1.01 + 1e-7 * float(torch.linalg.matrix_norm(delta)), mod.module


def test_factors_split_evenly_and_match_numpy():
    """B = U√σ, A = √σVᵀ: B·A is the truncation, BᵀB = AAᵀ = diag(σ), for wide, tall and rank-deficient ΔW."""
    g = torch.Generator().manual_seed(5)
    for shape in ((20, 50), (50, 20), (30, 30)):
        M = torch.randn(*shape, generator=g, dtype=torch.float64)
        M[:, :3] = 0.0  # rank-deficient columns too
        t = dense_triplets(M.float(), 5)
        S = np.linalg.svd(M.numpy(), compute_uv=False)
        np.testing.assert_allclose(t.S, S[:6], rtol=1e-6)
        assert t.total == pytest.approx(float((M.float().double() ** 2).sum()), rel=1e-12)
        torch.testing.assert_close((t.B @ t.A).double(), truncated(M.float(), 5), rtol=0, atol=1e-5)
        torch.testing.assert_close(t.B.T @ t.B, torch.diag(torch.from_numpy(S[:5]).float()), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t.A @ t.A.T, torch.diag(torch.from_numpy(S[:5]).float()), rtol=1e-4, atol=1e-5)
        assert energy_kept(t.S, t.total, 5) == pytest.approx(float(np.sum(S[:5] ** 2) / np.sum(S**2)), rel=1e-6)
        full = dense_triplets(M.float(), 0, values=min(shape))
        for tau in (0.5, 0.9, 0.99, 1.0):
            assert energy_rank_top(full.S, full.total, tau) == energy_rank(full.S, tau)
    B, A = torch.randn(40, 3, generator=g), torch.randn(3, 30, generator=g)  # a LoRA update, from its factors
    f = factored_triplets(B, A, 2.0, 2)
    torch.testing.assert_close((f.B @ f.A).double(), truncated(2.0 * B @ A, 2), rtol=0, atol=1e-5)


# ---- the allocation ----------------------------------------------------------------------------------
def _brute(gains, costs, budget, levels=None):
    best = 0.0
    options = [[0, *(levels[i] if levels else range(1, len(g) + 1))] for i, g in enumerate(gains)]
    for ranks in itertools.product(*options):
        if sum(r * c for r, c in zip(ranks, costs)) <= budget:
            best = max(best, sum(float(np.sum(g[:r])) for g, r in zip(gains, ranks)))
    return best


def test_budget_allocation_against_brute_force():
    """Equal costs: the greedy is the optimum (every component costs the same). Unequal costs: it is
    within the reported gap of the optimum, which the fractional bound caps; with vLLM's rank levels too."""
    rng = np.random.default_rng(0)
    for case in range(300):
        n = int(rng.integers(2, 4))
        gains = [np.sort(rng.random(int(rng.integers(1, 5))) ** 2)[::-1] for _ in range(n)]
        equal = case % 2 == 0
        costs = [3] * n if equal else [int(c) for c in rng.integers(2, 9, n)]
        budget = int(rng.integers(1, sum(len(g) * c for g, c in zip(gains, costs)) + 2))
        a = allocate_budget(gains, costs, budget)
        best = _brute(gains, costs, budget)
        got = sum(float(np.sum(g[:r])) for g, r in zip(gains, a.ranks))
        assert a.kept == pytest.approx(got) and a.params == sum(r * c for r, c in zip(a.ranks, costs)) <= budget
        assert got <= best + 1e-12 and best <= a.bound + 1e-12
        if equal:
            assert got == pytest.approx(best), (gains, costs, budget)
        else:
            assert best - got <= a.gap + 1e-12
    gains = [np.array([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0.5, 0.2, 0.1]), np.array([5.0, 1, 1, 1, 1, 1, 1, 1])]
    levels = [[4, 8, 12], [4, 8]]
    a = allocate_budget(gains, [1, 1], 12, levels=levels)
    assert a.ranks == [8, 4] and a.kept == pytest.approx(_brute(gains, [1, 1], 12, levels))


def test_budget_parsing_and_levels():
    assert parse_budget("10%").params(1000, 2) == 100
    assert parse_budget("1.5M").params(0, 2) == 1_500_000
    assert parse_budget("50MB").params(0, 2) == 25_000_000
    assert parse_budget("1KiB").params(0, 4) == 256
    assert parse_budget("2e3").params(0, 2) == 2000
    for bad in ("", "ten", "0", "120%", "5XB", "-3"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    assert rank_levels(600, serving="vllm") == list(range(1, 513))  # vLLM's largest max_lora_rank caps every rank
    assert rank_levels(600, 100, serving="vllm") == list(range(1, 101))
    assert uniform_rank([10, 20], [5, 2], 95) == 5  # r = 5: 5·10 + 2·20 = 90 <= 95 (the second module is capped at 2)
    assert uniform_rank([10, 20], [5, 5], 95) == 3  # 3·30 = 90 <= 95 < 4·30


# ---- rank rules ------------------------------------------------------------------------------------
def test_energy_ranks_equal_diff_energy_rank(tmp_path):
    from tests.conftest import reference_energy_rank

    base_dir, tuned_dir = make_pair(tmp_path, "llama", one_d=False)
    diff = spectra.diff(base_dir, tuned_dir, config=spectra.DiffConfig(split_fused=False))
    base, tuned = load_file(str(base_dir / "model.safetensors")), load_file(str(tuned_dir / "model.safetensors"))
    compared = 0
    for tau in (0.5, 0.9, 0.99):
        res = extract(base_dir, tuned_dir, tmp_path / f"e{tau}", config=ExtractConfig(energy=tau))
        by_name = {m.name: m for m in diff.modules}
        for m in res.modules:
            S = np.linalg.svd((tuned[m["name"]].double() - base[m["name"]].double()).numpy(), compute_uv=False)
            _, clear = reference_energy_rank(S, tau)
            if clear:
                assert m["rank"] == m["energy_rank"] == by_name[m["name"]].energy_rank[str(tau)], (m["name"], tau)
                assert m["energy_kept"] >= tau
                compared += 1
    assert compared >= 30


def test_rank_mixed_precision_equals_float64(tmp_path):
    """--rank's default route (subspace in float32, values and factors in float64) against
    --precision float64 and a float64 numpy SVD: the same energies (to 1e-8 of ‖ΔW‖²), values never
    above the exact ones, B·A the truncation; from the command line too."""
    from click.testing import CliRunner

    from spectra_cli.extract import extract_cmd

    base_dir, tuned_dir = make_pair(tmp_path, "llama", one_d=False)
    # the top 6 values (5 in extract.json, σ₆ for the spectral error) lie in the planted rank-6 part, above
    # float32's rounding level (beyond it the planted noise sits at that level, and the float64 route is
    # taken: tests/test_lapack.py checks that choice)
    mixed = extract(base_dir, tuned_dir, tmp_path / "m", config=ExtractConfig(rank=3, top_values=5))
    exact = extract(base_dir, tuned_dir, tmp_path / "x", config=ExtractConfig(rank=3, top_values=5, precision="float64"))
    base, tuned = load_file(str(base_dir / "model.safetensors")), load_file(str(tuned_dir / "model.safetensors"))
    merged = {m.module: m for m in open_adapter(tmp_path / "m").modules.values()}
    for mm, mx in zip(mixed.modules, exact.modules, strict=True):
        assert mm["name"] == mx["name"] and mm["rank"] == mx["rank"] == 3
        assert mm["method"] == "gram-eigh/float32+ritz/float64" and mx["method"] == "gram-eigh/float64"
        assert mm["energy_kept"] == pytest.approx(mx["energy_kept"], abs=1e-8)
        assert mm["residual"] is not None and mm["residual"] < 1e-4
        delta = tuned[mm["name"]].double() - base[mm["name"]].double()
        S = np.linalg.svd(delta.numpy(), compute_uv=False)
        assert mm["spectral_error"] == pytest.approx(S[3] / S[0], abs=1e-6)
        torch.testing.assert_close(merged[mm["module"]].dense_delta().double(), truncated(delta, 3), rtol=0,
                                   atol=2e-6 * float(delta.abs().max()))
    r = CliRunner().invoke(extract_cmd, [str(base_dir), str(tuned_dir), "--out", str(tmp_path / "c"), "--rank", "3",
                                         "--precision", "float64", "--no-plots", "--json"])
    assert r.exit_code == 0, r.output
    assert {m["method"] for m in json.loads((tmp_path / "c" / "extract.json").read_text())["modules"]} == {"gram-eigh/float64"}
    with pytest.raises(ConfigError, match="--precision"):
        ExtractConfig(rank=3, precision="float16")


def test_serving_vllm_reports_the_padded_cost(tmp_path):
    _, model = _model("llama")
    cfg = transformers.AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "base")
    sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(2)
    for k, v in sd.items():
        if v.ndim == 2 and not _is_embedding(k):
            sd[k] = v + 0.01 * torch.randn(v.shape, generator=g)  # full-rank updates: ranks spread out
    (tmp_path / "tuned").mkdir()
    save_file(sd, str(tmp_path / "tuned" / "model.safetensors"))
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "tuned")
    res = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", config=ExtractConfig(energy=0.5, serving="vllm"))
    ranks = {m["rank"] for m in res.modules}
    assert len(ranks) > 1 and all(m["energy_kept"] >= 0.5 for m in res.modules)
    plain = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "outp", config=ExtractConfig(energy=0.5))
    assert [m["rank"] for m in res.modules] == [m["rank"] for m in plain.modules]  # any rank up to 512 serves
    s = res.serving  # vLLM pads every module to max_lora_rank, the accepted value at or above the largest rank
    served = next(v for v in (1, 8, 16, 32, 64, 128) if v >= max(ranks))
    assert s["max_lora_rank"] == served and s["modules"] == len(res.modules)
    assert s["params"] == served * sum(m["shape"][0] + m["shape"][1] for m in res.modules)
    b = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "outb", config=ExtractConfig(budget="20%", serving="vllm"))
    assert b.totals["params"] <= b.allocation["budget_params"] and b.totals["energy_kept"] >= b.uniform["energy_kept"]


def test_budget_beats_uniform_and_reports_the_bound(tmp_path):
    base_dir, tuned_dir = make_pair(tmp_path, "llama", one_d=False)
    res = extract(base_dir, tuned_dir, tmp_path / "out", config=ExtractConfig(budget="6%"))
    t, u, a = res.totals, res.uniform, res.allocation
    assert t["params"] <= a["budget_params"] and u["params"] <= t["params"]
    assert t["energy_kept"] >= u["energy_kept"] and a["kept"] == pytest.approx(t["energy_kept"])
    assert t["energy_kept"] <= a["fractional_bound"] <= t["energy_kept"] + a["gap"] + 1e-12
    base, tuned = load_file(str(base_dir / "model.safetensors")), load_file(str(tuned_dir / "model.safetensors"))
    num = den = 0.0  # the uniform numbers from an independent SVD of every module
    for m in res.modules:
        S = np.linalg.svd((tuned[m["name"]].double() - base[m["name"]].double()).numpy(), compute_uv=False)
        num += float(np.sum(S[: min(u["rank"], S.size)] ** 2))
        den += float(np.sum(S**2))
        assert m["energy_kept"] == pytest.approx(float(np.sum(S[: m["rank"]] ** 2) / np.sum(S**2)), rel=1e-6)
        assert m["rel_fro_error"] == pytest.approx(math.sqrt(1 - m["energy_kept"]), rel=1e-9)
        if m["rank"] < S.size:
            assert m["spectral_error"] == pytest.approx(S[m["rank"]] / S[0], rel=1e-5)
    assert u["energy_kept"] == pytest.approx(num / den, rel=1e-6)


def test_two_pass_equals_one_pass_and_randomized_path(tmp_path):
    base_dir, tuned_dir = make_pair(tmp_path, "llama", one_d=False)
    one = extract(base_dir, tuned_dir, tmp_path / "one", config=ExtractConfig(budget="5%", strategy="one-pass"))
    two = extract(base_dir, tuned_dir, tmp_path / "two", config=ExtractConfig(budget="5%", strategy="two-pass"))
    assert [m["rank"] for m in one.modules] == [m["rank"] for m in two.modules] and two.strategy == "two-pass"
    a, b = load_file(str(tmp_path / "one" / "adapter_model.safetensors")), load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    rnd = extract(base_dir, tuned_dir, tmp_path / "rnd", config=ExtractConfig(rank=4, approx_above=8))
    exact = extract(base_dir, tuned_dir, tmp_path / "ex", config=ExtractConfig(rank=4))
    for mr, me in zip(rnd.modules, exact.modules):
        assert mr["method"] in ("randomized", "exact-svd/float64")
        assert mr["energy_kept"] == pytest.approx(me["energy_kept"], rel=1e-4)  # well-separated planted spectrum
        if mr["method"] == "randomized":
            assert mr["residual"] is not None and mr["residual"] < 1e-2


# ---- adapters as TUNED ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_resize_an_adapter(tmp_path, dora):
    """A LoRA r = 8 adapter resized to r = 3 from its factors (DoRA: from its dense update): PEFT
    merges the result to base + the rank-3 truncation of the adapter's update."""
    cls, model = _model("llama")
    model.save_pretrained(tmp_path / "base")
    pm = random_lora(model, 4, r=8, lora_alpha=16, use_dora=dora, target_modules=["q_proj", "v_proj", "down_proj"])
    pm.save_pretrained(tmp_path / "adapter")
    full = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    res = extract(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", config=ExtractConfig(rank=3))
    assert res.kind == ("dora" if dora else "lora") and len(res.modules) == 6
    assert all(m["method"] == ("dora/gram-eigh/float64" if dora else "factored") for m in res.modules)
    merged = peft_merge("llama", tmp_path / "base", tmp_path / "out")
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    for m in res.modules:
        delta = full[m["name"]].double() - base[m["name"]].double()
        scale = float(delta.abs().max())
        torch.testing.assert_close(merged[m["name"]].double(), base[m["name"]].double() + truncated(delta, 3), rtol=0, atol=2e-6 * scale)
        if not dora:
            assert m["energy_kept"] < 1.0 and len([s for s in m["singular_values"] if s > 1e-9 * m["singular_values"][0]]) == 8


# ---- resume, outputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["budget", "rank"])  # rank: the streamed mixed-precision pass, factors written by workers
def test_resume_finishes_an_interrupted_run(tmp_path, rule):
    base_dir, tuned_dir = make_pair(tmp_path, "llama")
    config = ExtractConfig(budget="5%", save_modules=True) if rule == "budget" else ExtractConfig(rank=3, save_modules=True)
    seen = []

    def stop(ev):
        seen.append(ev.name)
        if len(seen) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(base_dir, tuned_dir, tmp_path / "run", config=config, callback=stop)
    assert (tmp_path / "run" / "extract.jsonl").is_file() and not (tmp_path / "run" / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match="not empty"):
        extract(base_dir, tuned_dir, tmp_path / "run", config=config)
    lines = (tmp_path / "run" / "extract.jsonl").read_text().splitlines()
    factored = {json.loads(line)["factors"]["order"] for line in lines if '"factors"' in line}
    # the 6th spectrum stopped the run: it and any other of its batch were journaled without their factors
    assert len(seen) - 2 <= len(factored) <= 5
    done = []
    res = extract(base_dir, tuned_dir, tmp_path / "run", config=config, resume=True, callback=lambda ev: done.append(ev.name))
    assert len(done) == len(res.modules) - len(factored)  # a module without its factors is redone
    fresh = extract(base_dir, tuned_dir, tmp_path / "fresh", config=config)
    assert [m["rank"] for m in res.modules] == [m["rank"] for m in fresh.modules]
    a, b = load_file(str(tmp_path / "run" / "adapter_model.safetensors")), load_file(str(tmp_path / "fresh" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8)
    assert not (tmp_path / "run" / ".extract-scratch").exists()
    doc = json.loads((tmp_path / "run" / "extract.json").read_text())
    assert doc["schema"] == "spectra.extract/1" and doc["complete"]
    assert (tmp_path / "run" / "extract.csv").read_text().count("\n") == len(res.modules) + 1
    assert (tmp_path / "run" / "extract.png").stat().st_size > 0 and (tmp_path / "run" / "extract_ranks.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="different inputs or options"):
        extract(base_dir, tuned_dir, tmp_path / "run", config=ExtractConfig(budget="6%"), resume=True)
    extract(base_dir, tuned_dir, tmp_path / "run", config=ExtractConfig(rank=2), force=True)
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["r"] == 2


def test_embeddings_and_dtype(tmp_path):
    base_dir, tuned_dir = make_pair(tmp_path, "llama", one_d=False)
    sd = load_file(str(tuned_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(9)
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] + _planted((64, 32), g)
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(tuned_dir / "model.safetensors"))
    res = extract(base_dir, tuned_dir, tmp_path / "plain", config=ExtractConfig(rank=2))
    assert res.dtype == "bfloat16"
    left = {r["name"]: r for r in res.not_extracted}
    assert "embedding" in left["model.embed_tokens.weight"]["reason"] and left["model.embed_tokens.weight"]["rel_norm"] > 0
    res = extract(base_dir, tuned_dir, tmp_path / "emb", config=ExtractConfig(rank=2, embeddings=True, dtype="float32"))
    names = {m["name"]: m for m in res.modules}
    assert names["model.embed_tokens.weight"]["embedding"] and res.dtype == "float32"
    keys = load_file(str(tmp_path / "emb" / "adapter_model.safetensors"))
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (2, 64)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 2)
    merged = peft_merge("llama", base_dir, tmp_path / "emb")
    base, tuned = load_file(str(base_dir / "model.safetensors")), load_file(str(tuned_dir / "model.safetensors"))
    delta = tuned["model.embed_tokens.weight"].double() - base["model.embed_tokens.weight"].double()
    torch.testing.assert_close(merged["model.embed_tokens.weight"].double(), base["model.embed_tokens.weight"].double() + truncated(delta, 2),
                               rtol=0, atol=1e-6 * float(delta.abs().max()))


# ---- bad input --------------------------------------------------------------------------------------
def test_bad_inputs(tmp_path):
    base_dir, tuned_dir = make_pair(tmp_path, "llama")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--energy τ must be in \(0, 1\]. Got 1.5 instead"):
        ExtractConfig(energy=1.5)
    with pytest.raises(ConfigError, match="choose one of --rank, --energy and --budget"):
        ExtractConfig(rank=2, budget="1M")
    with pytest.raises(ConfigError, match="budget must be a parameter count"):
        ExtractConfig(budget="lots")
    with pytest.raises(ConfigError, match=r"--rank 40 is above min\(out, in\) = 16 of model.layers.0.self_attn.k_proj.weight \(16×32\)"):
        extract(base_dir, tuned_dir, out, config=ExtractConfig(rank=40))
    with pytest.raises(ConfigError, match=r"--budget 10 is 10 LoRA parameters, below the cheapest component"):
        extract(base_dir, tuned_dir, out, config=ExtractConfig(budget="10"))
    with pytest.raises(ConfigError, match="no matrix to extract|no matrix is left by --include"):
        extract(base_dir, tuned_dir, out, config=ExtractConfig(rank=2, include="nothing_matches"))
    (out / "mine.txt").parent.mkdir(exist_ok=True)
    (out / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"output folder is not empty \(mine.txt\)"):
        extract(base_dir, tuned_dir, out, config=ExtractConfig(rank=2))
    with pytest.raises(IdenticalCheckpointsError, match="has ΔW = 0: there is nothing to extract"):
        extract(base_dir, base_dir, tmp_path / "same", config=ExtractConfig(rank=2))
    assert (tmp_path / "same" / "extract.json").is_file() and not (tmp_path / "same" / "adapter_model.safetensors").exists()
    # a base that does not match the adapter
    _, model = _model("llama")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    other = load_file(str(base_dir / "model.safetensors"))
    other.pop("model.layers.1.self_attn.q_proj.weight")
    (tmp_path / "other").mkdir()
    save_file(other, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(PairingError, match="the adapter updates model.layers.1.self_attn.q_proj"):
        extract(tmp_path / "other", tmp_path / "adapter", tmp_path / "o2", config=ExtractConfig(rank=1))
    other["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    save_file(other, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=r"the adapter's update of model.layers.1.self_attn.q_proj is \(32, 32\)"):
        extract(tmp_path / "other", tmp_path / "adapter", tmp_path / "o3", config=ExtractConfig(rank=1))


# ---- recommend -------------------------------------------------------------------------------------------
def test_recommend_from_diff_results(tmp_path):
    """From a diff's results alone: ranks = energy_rank[τ] per module (fused parts summed), a config
    PEFT accepts and applies with exactly those ranks; with a budget, at most that many parameters."""
    base_dir, tuned_dir = make_pair(tmp_path, "phi3", one_d=False)
    res = spectra.diff(base_dir, tuned_dir, out_dir=tmp_path / "diff", plots=False)
    rec = recommend(tmp_path / "diff" / "results.json", energy=0.9)
    by_module: dict[str, int] = {}
    for m in res.modules:
        if "embed" in m.name or "lm_head" in m.name:
            continue
        path = m.name.split(":")[0].removesuffix(".weight")
        by_module[path] = by_module.get(path, 0) + m.energy_rank["0.9"]
    assert rec.ranks == {p: min(r, 32) for p, r in by_module.items() if r}
    assert "qkv_proj" in rec.config["target_modules"] and "q_proj" not in rec.config["target_modules"]
    cfg = peft.LoraConfig(**rec.config)
    _, model = _model("phi3")
    pm = peft.get_peft_model(model, cfg)
    for name, module in pm.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            assert module.lora_A["default"].weight.shape[0] == rec.ranks[name.removeprefix("base_model.model.")]
            assert module.scaling["default"] == pytest.approx(2.0)  # alpha = 2r
    small = recommend(tmp_path / "diff", energy=0.9, budget="2%")
    assert small.params <= 0.02 * small.full_params and small.params < rec.params
    assert all(small.ranks[p] <= rec.ranks[p] for p in small.ranks)
    # τ not among the thresholds: read off the kept singular values when they reach it, else refused
    assert recommend(tmp_path / "diff", energy=0.75).ranks  # the diff kept all 32 values (top-k 64)
    spectra.diff(base_dir, tuned_dir, out_dir=tmp_path / "diff1", plots=False, config=spectra.DiffConfig(top_k=1))
    with pytest.raises(ConfigError, match="τ = 0.75 is not among the results' thresholds"):
        recommend(tmp_path / "diff1", energy=0.75)
    with pytest.raises(ConfigError, match=r"--energy τ must be in \(0, 1\]"):
        recommend(tmp_path / "diff", energy=0.0)
    (tmp_path / "x.json").write_text(json.dumps({"schema": "spectra.compare/1"}))
    with pytest.raises(ConfigError, match="not the results of spectra diff"):
        recommend(tmp_path / "x.json")


# ---- the command line, the report, --eval -----------------------------------------------------------------
def test_cli_extract_and_recommend(tmp_path):
    from click.testing import CliRunner

    from spectra_cli.extract import extract_cmd, recommend_cmd

    base_dir, tuned_dir = make_pair(tmp_path, "llama")
    r = CliRunner().invoke(extract_cmd, [str(base_dir), str(tuned_dir), "--out", str(tmp_path / "o"), "--budget", "10%", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "uniform r =" in r.output and "q_proj" in r.output
    doc = json.loads((tmp_path / "o" / "extract.json").read_text())
    assert doc["schema"] == "spectra.extract/1" and doc["mode"] == "budget"
    r = CliRunner().invoke(extract_cmd, [str(base_dir), str(tuned_dir), "--out", str(tmp_path / "o"), "--rank", "2"])
    assert isinstance(r.exception, ConfigError) and "not empty" in str(r.exception)
    r = CliRunner().invoke(extract_cmd, [str(base_dir), str(base_dir), "--out", str(tmp_path / "same"), "--rank", "2"])
    assert isinstance(r.exception, IdenticalCheckpointsError)
    spectra.diff(base_dir, tuned_dir, out_dir=tmp_path / "d", plots=False)
    r = CliRunner().invoke(recommend_cmd, [str(tmp_path / "d" / "results.json"), "--energy", "0.9", "--out", str(tmp_path / "lora.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "lora.json").read_text())["peft_type"] == "LORA"


def test_report_section(tmp_path):
    from spectra.report_extract import findings, section_html

    base_dir, tuned_dir = make_pair(tmp_path, "llama")
    res = extract(base_dir, tuned_dir, tmp_path / "o", config=ExtractConfig(budget="10%"))
    doc = json.loads((tmp_path / "o" / "extract.json").read_text())
    doc["modules"][0]["name"] = "<script>x</script>"
    html = section_html(tmp_path / "o" / "extract.json", doc)
    assert "<script>x" not in html and "&lt;script&gt;" in html and "uniform r =" in html
    texts = [f.text for f in findings(tmp_path / "o" / "extract.json", doc)]
    assert any(f"{res.totals['energy_kept']:.1%}" in t for t in texts)
    assert any("norms or biases are not in the adapter" in t for t in texts)  # no --save-modules here


def test_eval_reports_held_out_losses(tmp_path):
    """A byte-level Llama (vocabulary 256, no tokenizer files): base, tuned, extracted and uniform
    losses; at full rank the extracted adapter reproduces the tuned model's loss."""
    cfg = transformers.AutoConfig.for_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if v.ndim == 2 and "embed" not in k and "lm_head" not in k:
            sd[k] = v + 5 * _planted(tuple(v.shape), g)
    (tmp_path / "tuned").mkdir()
    save_file(sd, str(tmp_path / "tuned" / "model.safetensors"))
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "tuned")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    res = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "o",
                  config=ExtractConfig(rank=16, eval_text=str(text), eval_seq_len=64, eval_blocks=4))
    ev = res.eval
    assert set(ev["loss"]) == {"base", "tuned", "extracted", "uniform"} and ev["blocks"] == 4 and ev["tokens"] == 4 * 63
    assert ev["loss"]["extracted"] == pytest.approx(ev["loss"]["tuned"], abs=1e-4)  # rank 16 = min(out, in): exact
    assert (tmp_path / "o" / "uniform_r16" / "adapter_config.json").is_file()
    cls = transformers.AutoModelForCausalLM
    ids = torch.tensor([list(text.read_text().encode())[:64]])
    with torch.no_grad():  # the loss definition, independently: mean next-token cross-entropy of block 0
        logits = cls.from_pretrained(tmp_path / "base")(input_ids=ids).logits[0, :-1]
    first = float(torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:]))
    assert abs(first - ev["loss"]["base"]) < 0.5  # same scale (the mean runs over 4 blocks, not 1)


# ---- the writer ---------------------------------------------------------------------------------------
def test_writer_layout_and_target_modules(tmp_path):
    from spectra.io.peft_writer import LoraFactors, lora_layout, lora_tensors, target_modules, write_safetensors

    g = torch.Generator().manual_seed(0)
    mods = [LoraFactors("a.q", torch.randn(5, 2, generator=g), torch.randn(2, 3, generator=g), bias=torch.randn(5, generator=g)),
            LoraFactors("a.emb", torch.randn(7, 2, generator=g), torch.randn(2, 4, generator=g), embedding=True)]
    layout = lora_layout("a.q", 2, (5, 3), bias=True) + lora_layout("a.emb", 2, (7, 4), embedding=True)
    tensors = [t for m in mods for _, t in lora_tensors(m)]
    for dtype in (torch.float32, torch.bfloat16):
        path = write_safetensors(tmp_path / "x.safetensors", layout, tensors, dtype)
        back = load_file(str(path))
        assert list(back) == [k for k, _ in layout] or set(back) == {k for k, _ in layout}
        for (k, shape), t in zip(layout, tensors):
            assert back[k].dtype == dtype and tuple(back[k].shape) == shape
            torch.testing.assert_close(back[k], t.to(dtype))
    assert back["base_model.model.a.emb.lora_embedding_A"].shape == (2, 7)  # (r, vocab)
    with pytest.raises(ValueError, match="must have shape"):
        write_safetensors(tmp_path / "y.safetensors", layout, tensors[::-1], torch.float32)
    assert not (tmp_path / "y.safetensors").exists()
    assert target_modules(["m.0.q", "m.1.q"], ["m.0.q", "m.1.q", "m.0.k"]) == ["q"]
    assert target_modules(["m.0.q"], ["m.0.q", "m.1.q"]) == ["m.0.q"]


def test_left_out_norms_read_by_rows_equal_the_whole_read(tmp_path):
    """The norms of a matrix left out (an embedding with a resized vocabulary: the tuned side has more
    rows) read a block of rows at a time equal those of the whole tensors, in safetensors and .bin."""
    from spectra.extract_results import pair_norms
    from spectra.io.checkpoint import open_checkpoint

    g = torch.Generator().manual_seed(5)
    b = torch.randn(300, 16, generator=g).bfloat16()
    t = torch.cat([b.float() + 0.01 * torch.randn(300, 16, generator=g), torch.randn(7, 16, generator=g)]).bfloat16()
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    save_file({"w": t}, str(tmp_path / "t.safetensors"))
    torch.save({"w": b}, tmp_path / "b.bin")
    cb, ct, cbin = (open_checkpoint(tmp_path / n) for n in ("b.safetensors", "t.safetensors", "b.bin"))
    ref = (float((t[:300].double() - b.double()).norm()), float(b.double().norm()))
    for block in (16, 100, 1 << 20):  # one row, several rows, the whole matrix per block
        assert pair_norms(cb, "w", ct, "w", 300, block=block) == pytest.approx(ref, rel=1e-12)
        assert pair_norms(cbin, "w", ct, "w", 300, block=block) == pytest.approx(ref, rel=1e-12)
    same = pair_norms(cb, "w", cb, "w", None)
    assert same[0] == 0.0 and same[1] == pytest.approx(ref[1], rel=1e-12)
