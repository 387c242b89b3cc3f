"""``spectra extract`` on hostile inputs: updates beyond the squaring range of float64 (and subnormal
float32 ones), factors a narrow ``--dtype`` flushes towards zero, ``--resume`` into a new folder, tensors
LoRA cannot hold, and a tied embedding.

References are numpy's float64 SVD of ΔW divided by its largest |entry| (so that it neither over- nor
underflows), scaled back: energy ranks, the best rank-r approximation, ‖ΔW‖_F and σ₁.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from spectra.errors import ConfigError
from spectra.extract import ExtractConfig, extract
from spectra.io.files import LOCK_NAME
from spectra.lowrank import eig_factors, gram_eig, gram_top, randomized_triplets, refined_triplets

SHAPES = {"layers.0.self_attn.q_proj.weight": (64, 96), "layers.0.mlp.down_proj.weight": (96, 64)}


def _update(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A float64 ``(out, in)`` update with singular values exp(−i/(4 + seed)) (energy rank at 0.9: 5, 6, …)."""
    rng = np.random.default_rng(seed)
    p = min(shape)
    U, _ = np.linalg.qr(rng.standard_normal((shape[0], p)))
    V, _ = np.linalg.qr(rng.standard_normal((shape[1], p)))
    return (U * np.exp(-np.arange(p) / (4 + seed))) @ V.T


def _pair(tmp: Path, scale: float, dtype: torch.dtype = torch.float64, *, ordinary: bool = False) -> tuple[str, str, dict]:
    """base (zeros, or random for the ordinary module) and tuned = base + scale·update, saved in ``dtype``;
    with ``ordinary`` the second module is an update of scale 0.01 instead. Returns the paths and ΔW per name."""
    tmp.mkdir(parents=True, exist_ok=True)
    base, tuned, deltas = {}, {}, {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        s = 0.01 if ordinary and i == 1 else scale
        b = torch.zeros(shape, dtype=dtype)
        t = torch.from_numpy(s * _update(shape, i)).to(dtype)
        base[name], tuned[name] = b, t
        deltas[name] = (t.double() - b.double()).numpy()
    save_file(base, str(tmp / "base.safetensors"))
    save_file(tuned, str(tmp / "tuned.safetensors"))
    return str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors"), deltas


def _reference(D: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(m, U, S, Vt, ...)`` of ΔW/m, m = max|ΔW| (float64 numpy SVD)."""
    m = float(np.abs(D).max())
    U, S, Vt = np.linalg.svd(D / m, full_matrices=False)
    return m, U, S, Vt, D / m


def _adapter(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per module path: (B, A, PEFT scale) in float64."""
    ad = load_file(str(out / "adapter_model.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    res = {}
    for k in ad:
        if ".lora_A." not in k:
            continue
        mod = k.split(".lora_A.")[0].removeprefix("base_model.model.")
        short = mod.rsplit(".", 1)[-1]
        alpha = cfg["alpha_pattern"].get(mod, cfg["alpha_pattern"].get(short, cfg["lora_alpha"]))
        r = cfg["rank_pattern"].get(mod, cfg["rank_pattern"].get(short, cfg["r"]))
        res[mod] = (ad[k.replace("lora_A", "lora_B")].double().numpy(), ad[k].double().numpy(), alpha / r)
    return res


def _check_against_svd(out: Path, res, deltas: dict, *, rank: int | None = None, tau: float | None = None) -> None:
    """Every adapted module: its rank (``rank``, or the energy rank at ``tau``), the adapter's product
    against the best rank-r approximation, and extract.json's ‖ΔW‖_F, σ₁ and energy kept."""
    mods = {m["name"]: m for m in res.modules}
    factors = _adapter(out)
    for name, D in deltas.items():
        m, U, S, Vt, Dn = _reference(D)
        energy = np.cumsum(S**2) / np.sum(S**2)
        want = rank if rank is not None else int(np.searchsorted(energy, tau) + 1)
        rec = mods[name]
        assert rec["rank"] == want, (name, rec["rank"], want)
        assert rec["energy_kept"] == pytest.approx(energy[want - 1], rel=1e-9)
        assert rec["fro_norm"] == pytest.approx(m * np.linalg.norm(Dn), rel=1e-9)
        assert rec["singular_values"][0] == pytest.approx(m * S[0], rel=1e-9)
        B, A, scale = factors[name.removesuffix(".weight")]
        best = (U[:, :want] * S[:want]) @ Vt[:want]
        got = scale * (B / np.sqrt(m)) @ (A / np.sqrt(m))  # ΔW's factors scaled to ΔW/m before the product
        assert np.linalg.norm(got - best) <= 1e-6 * np.linalg.norm(best), name


# ---- F1/F2: float64 ΔW beyond 2**±256, subnormal float32 ΔW ------------------------------------------
@pytest.mark.parametrize("scale", [1e-170, 1e-160, 1e155, 1e-310])
@pytest.mark.parametrize("rule", ["energy", "rank-mixed", "rank-float64", "budget", "budget-two-pass"])
def test_float64_updates_beyond_the_squaring_range_extract_as_ordinary_ones(tmp_path, scale, rule):
    """Energies are ratios and ranks scale-free: a float64 update near 1e-170 or 1e155 gets the ranks,
    energies and factors of the same update at scale 1, and extract.json its true ‖ΔW‖_F and σ₁ (was: ΔW
    reported 0 and the module dropped, a rank from a subnormal Gram matrix, or a LAPACK/Cholesky traceback)."""
    b, t, deltas = _pair(tmp_path / "in", scale)
    cfg = {"energy": dict(energy=0.9), "rank-mixed": dict(rank=3), "rank-float64": dict(rank=3, precision="float64"),
           "budget": dict(budget="20%"), "budget-two-pass": dict(budget="20%", strategy="two-pass")}[rule]
    res = extract(b, t, tmp_path / "out", config=ExtractConfig(**cfg), plots=False)
    assert res.dtype == "float64" and res.complete and not res.not_extracted
    if rule.startswith("budget"):
        # the greedy against the float64 spectra of ΔW/m0, one m0 for both modules
        m0 = max(float(np.abs(D).max()) for D in deltas.values())
        refs = {name: _reference(deltas[name]) for name in SHAPES}
        gains = sorted(((float(refs[name][0] / m0 * s) ** 2 / sum(shape), name) for name, shape in SHAPES.items()
                        for s in refs[name][2]), reverse=True)
        budget = res.allocation["budget_params"]
        ranks = dict.fromkeys(SHAPES, 0)
        for _, name in gains:
            if sum((ranks[n] + (n == name)) * sum(SHAPES[n]) for n in SHAPES) > budget:
                break
            ranks[name] += 1
        assert {m["name"]: m["rank"] for m in res.modules} == ranks
        for name, r in ranks.items():
            _check_against_svd(tmp_path / "out", res, {name: deltas[name]}, rank=r)
        return
    _check_against_svd(tmp_path / "out", res, deltas, rank=cfg.get("rank"), tau=cfg.get("energy"))


def test_a_tiny_float64_module_beside_ordinary_ones_keeps_its_energy_rank(tmp_path):
    """The probe's case: one module near 1e-170 in a float64 checkpoint whose others are ordinary."""
    b, t, deltas = _pair(tmp_path / "in", 1e-170, ordinary=True)
    res = extract(b, t, tmp_path / "out", config=ExtractConfig(energy=0.9), plots=False)
    _check_against_svd(tmp_path / "out", res, deltas, tau=0.9)
    # under a budget the tiny module's energy is nothing beside the other's: rank 0, but its norm is right
    res = extract(b, t, tmp_path / "b", config=ExtractConfig(budget="20%"), plots=False)
    tiny = next(m for m in res.modules if m["name"].endswith("q_proj.weight"))
    assert tiny["rank"] == 0 and tiny["fro_norm"] == pytest.approx(1e-170 * np.linalg.norm(deltas[tiny["name"]] / 1e-170), rel=1e-9)


@pytest.mark.parametrize("scale", [1e-38, 1e-40, 1e-42])
def test_subnormal_float32_updates_extract_under_rank(tmp_path, scale):
    """--rank (the float32-subspace route) on float32 updates at or below float32's smallest normal:
    was an OverflowError from np.float32(2**149); now the float64 SVD of the stored (rounded) update's
    best rank-3 approximation, to float32's rounding of the factors."""
    b, t, deltas = _pair(tmp_path / "in", scale, torch.float32)
    res = extract(b, t, tmp_path / "out", config=ExtractConfig(rank=3), plots=False)
    assert res.dtype == "float32"
    _check_against_svd(tmp_path / "out", res, deltas, rank=3)


@pytest.mark.parametrize("scale,dtype", [(1e-170, torch.float64), (1e200, torch.float64), (1e-310, torch.float64),
                                         (1e-40, torch.float32), (1e38, torch.float32)])
def test_every_factor_route_scales_exactly(scale, dtype):
    """gram_eig/gram_top/eig_factors, refined_triplets and randomized_triplets: S·2**exp are ΔW's singular
    values and B·A its best rank-4 approximation (a float64 ΔW's factors in float64)."""
    D = torch.from_numpy(scale * _update((64, 96), 0)).to(dtype)
    m, U, S, Vt, Dn = _reference(D.double().numpy())
    best = (U[:, :4] * S[:4]) @ Vt[:4]
    eig = gram_eig(D)
    top = gram_top(D, 5, 4)
    routes = [(eig.S, eig.exp, eig_factors(D, eig, 4)), (top.S, top.exp, eig_factors(D, top, 4))]
    for tr in (refined_triplets(D, 5, 4), randomized_triplets(D, 4)):
        routes.append((tr.S, tr.exp, (tr.B, tr.A)))
    for values, exp, (B, A) in routes:
        np.testing.assert_allclose(np.ldexp(values[:4], exp) / m, S[:4], rtol=1e-6)
        assert B.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        got = (B.double().numpy() / np.sqrt(m)) @ (A.double().numpy() / np.sqrt(m))
        assert np.linalg.norm(got - best) <= 1e-6 * np.linalg.norm(best)


# ---- F6: factors a narrow dtype flushes towards zero ---------------------------------------------------
def test_float16_factors_that_underflow_are_measured_and_warned(tmp_path):
    """An update near 1e-12 stored as float16 factors (√σ ≈ 1e-6, below float16's smallest normal): the
    stored product is ~20% off the best rank-4 approximation. storage_error bounds that (and the ordinary
    module's ~1e-3), extract.json warns; float32 stores it at rounding level."""
    b, t, deltas = _pair(tmp_path / "in", 1e-12, ordinary=True)
    res = extract(b, t, tmp_path / "o16", config=ExtractConfig(rank=4, dtype="float16"), plots=False)
    factors = _adapter(tmp_path / "o16")
    for m in res.modules:
        mm, U, S, Vt, _ = _reference(deltas[m["name"]])
        B, A, scale = factors[m["name"].removesuffix(".weight")]
        best = (U[:, :4] * S[:4]) @ Vt[:4]
        actual = np.linalg.norm(scale * (B / np.sqrt(mm)) @ (A / np.sqrt(mm)) - best) / np.linalg.norm(best)
        assert actual <= m["storage_error"] <= 3 * actual + 1e-6, (m["name"], actual, m["storage_error"])
    tiny = next(m for m in res.modules if m["name"].endswith("q_proj.weight"))
    other = next(m for m in res.modules if m is not tiny)
    assert tiny["storage_error"] > 0.1 and other["storage_error"] < 2e-3
    assert len(res.warnings) == 1 and tiny["name"] in res.warnings[0] and "--dtype float32" in res.warnings[0]
    res32 = extract(b, t, tmp_path / "o32", config=ExtractConfig(rank=4, dtype="float32"), plots=False)
    assert not res32.warnings and all(m["storage_error"] < 1e-6 for m in res32.modules)


def test_rounding_error_bounds_the_product_error():
    """rounding_error against the product of rounded factors, in float16 and bfloat16, ordinary and tiny."""
    from spectra.extract_io import rounding_error

    for scale in (1.0, 1e-9, 1e-12):
        D = torch.from_numpy(scale * _update((64, 96), 3))
        eig = gram_eig(D)
        B, A = eig_factors(D, eig, 8)
        for dt in (torch.float16, torch.bfloat16):
            bound = rounding_error(B, A, dt)
            for r in (1, 4, 8):
                exact = B[:, :r] @ A[:r]
                err = float(torch.linalg.norm(B[:, :r].to(dt).double() @ A[:r].to(dt).double() - exact) / torch.linalg.norm(exact))
                assert err <= bound[r - 1] <= 3 * err + 1e-9, (scale, dt, r, err, bound[r - 1])


# ---- F5: --resume into a new folder, a stale lock --------------------------------------------------------
def test_a_refused_resume_leaves_nothing_and_a_stale_lock_does_not_block(tmp_path):
    b, t, _ = _pair(tmp_path / "in", 1.0, torch.float32)
    new = tmp_path / "new"
    with pytest.raises(ConfigError, match="nothing to resume"):
        extract(b, t, new, config=ExtractConfig(rank=2), resume=True, plots=False)
    assert not new.exists()
    # the lock file of a run whose process has ended (no flock held) is not content
    new.mkdir()
    (new / LOCK_NAME).write_text('{"pid": 999999999, "host": "gone"}\n')
    res = extract(b, t, new, config=ExtractConfig(rank=2), plots=False)
    assert res.complete and not (new / LOCK_NAME).exists()
    # a resume whose journal comes from other options is refused and leaves no lock behind
    other = tmp_path / "other"
    extract(b, t, other, config=ExtractConfig(rank=2), plots=False)
    with pytest.raises(ConfigError, match="different inputs or options"):
        extract(b, t, other, config=ExtractConfig(rank=3), resume=True, plots=False)
    assert not (other / LOCK_NAME).exists()


# ---- F8: 0-D and 3-D/4-D tensors LoRA cannot hold ------------------------------------------------------
def test_changed_tensors_of_other_dimensions_are_listed_as_not_extracted(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.self_attn.q_proj.weight": torch.randn(32, 48, generator=g),
            "layers.0.conv.weight": torch.randn(4, 3, 2, 2, generator=g),
            "layers.0.scale": torch.tensor(1.0), "layers.0.same.weight": torch.randn(2, 2, 2, generator=g)}
    tuned = dict(base)
    tuned["layers.0.self_attn.q_proj.weight"] = base["layers.0.self_attn.q_proj.weight"] + 0.01 * torch.randn(32, 48, generator=g)
    tuned["layers.0.conv.weight"] = base["layers.0.conv.weight"] + 0.5
    tuned["layers.0.scale"] = torch.tensor(1.25)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "t.safetensors"))
    res = extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / "o",
                  config=ExtractConfig(rank=4), plots=False)
    listed = {r["name"]: r for r in res.not_extracted}
    assert set(listed) == {"layers.0.conv.weight", "layers.0.scale"}  # the unchanged 3-D tensor is not
    assert listed["layers.0.conv.weight"]["fro_norm"] == pytest.approx(0.5 * 48 ** 0.5, rel=1e-6)
    assert listed["layers.0.scale"]["fro_norm"] == pytest.approx(0.25) and "0-D" in listed["layers.0.scale"]["reason"]
    assert "4-D" in listed["layers.0.conv.weight"]["reason"]


# ---- F4: --embeddings on a tied embedding ----------------------------------------------------------------
def test_embeddings_of_a_tied_model_warn_that_only_the_merged_adapter_reproduces_the_update(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert "lm_head.weight" not in sd
    g = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.01 * torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v.shape[1], generator=g) if v.ndim == 2 else v
             for k, v in sd.items()}
    (tmp_path / "tuned").mkdir()
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"))
    (tmp_path / "tuned" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    res = extract(str(tmp_path / "base"), str(tmp_path / "tuned"), tmp_path / "o", config=ExtractConfig(rank=3, embeddings=True),
                  plots=False)
    assert any("merge_and_unload" in w and "embed_tokens" in w for w in res.warnings)
    plain = extract(str(tmp_path / "base"), str(tmp_path / "tuned"), tmp_path / "p", config=ExtractConfig(rank=3), plots=False)
    assert not any("merge_and_unload" in w for w in plain.warnings)
