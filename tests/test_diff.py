"""``spectra.diff`` end to end: the results contract, exactness against float64, and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import spectra
from spectra.config import DiffConfig
from spectra.errors import ConfigError, IdenticalCheckpointsError, PairingError
from spectra.results import DiffResult
from spectra.synthetic import LlamaShape, make_llama_pair
from tests.conftest import reference_energy_rank, svd64

LLAMA_SMALL = LlamaShape(layers=4, hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=2048)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    return make_llama_pair(tmp_path_factory.mktemp("llama"), shape=LLAMA_SMALL, seed=0)


@pytest.fixture(scope="module")
def llama_result(llama_pair, tmp_path_factory) -> tuple[DiffResult, Path]:
    out = tmp_path_factory.mktemp("out")
    return spectra.diff(*llama_pair, out_dir=out), out


def test_llama_shaped_pair_energy_ranks_equal_float64_svd(llama_pair, llama_result):
    """The issue's acceptance run: 4 layers, hidden 1024, MLP 2816, GQA k/v 256, bf16 on disk."""
    result, _ = llama_result
    base, tuned = (load_file(str(p / "model.safetensors")) for p in llama_pair)
    assert len(result.modules) == 4 * 7 + 2
    shapes = {m.module: tuple(m.shape) for m in result.modules}
    assert shapes["k_proj"] == (256, 1024) and shapes["down_proj"] == (1024, 2816) and shapes["lm_head"] == (2048, 1024)
    checked = 0
    for m in result.modules:
        delta = tuned[m.name].double() - base[m.name].double()
        S_ref = svd64(delta)
        np.testing.assert_allclose(m.singular_values, S_ref[: len(m.singular_values)], rtol=1e-6)
        assert m.fro_norm == pytest.approx(np.sqrt((S_ref**2).sum()), rel=1e-9)
        assert m.rel_norm == pytest.approx(m.fro_norm / np.linalg.norm(base[m.name].double().numpy()), rel=1e-9)
        for key, k in m.energy_rank.items():
            ref, clear = reference_energy_rank(S_ref, float(key))
            if clear:
                assert k == ref, (m.name, key)
                checked += 1
    assert checked >= 80


def test_results_contract(llama_result):
    result, out = llama_result
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["schema"] == "spectra.diff/1" and doc["complete"] is True
    assert doc["thresholds"] == [0.5, 0.9, 0.99]
    assert set(doc["unmatched"]) == {"base_only", "tuned_only"}
    required = {"name", "layer", "module", "shape", "fro_norm", "base_fro_norm", "rel_norm", "spectral_norm",
                "stable_rank", "effective_rank", "energy_rank", "random_energy_rank", "singular_values"}
    for m in doc["modules"]:
        assert required <= set(m)
        assert set(m["energy_rank"]) == {"0.5", "0.9", "0.99"}
        assert m["singular_values"] == sorted(m["singular_values"], reverse=True)
    layers = {m["name"]: m["layer"] for m in doc["modules"]}
    assert layers["model.embed_tokens.weight"] is None and layers["lm_head.weight"] is None
    assert layers["model.layers.3.mlp.down_proj.weight"] == 3
    assert {s["name"] for s in doc["skipped"]} >= {"model.norm.weight", "model.layers.0.input_layernorm.weight"}
    assert all("1-D" in s["reason"] for s in doc["skipped"])
    # journal holds every result; CSV one row per matrix; heatmaps written
    journal = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(journal) == len(doc["modules"])
    assert len((out / "results.csv").read_text().splitlines()) == len(doc["modules"]) + 1
    for png in ("rank_heatmap.png", "relnorm_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # reload round trip and DataFrame
    again = DiffResult.load(out)
    assert [m.energy_rank for m in again.modules] == [m.energy_rank for m in result.modules]
    df = again.to_dataframe()
    assert len(df) == len(result.modules) and "energy_rank_0_9" in df.columns


def test_planted_structure_is_visible(llama_result):
    """The generator plants faster-decaying spectra in attention than in the MLP: ranks must say so."""
    result, _ = llama_result
    summary = {r["module"]: r for r in result.summary_records(0.9)}
    assert summary["q_proj"]["energy_rank_frac"] < summary["up_proj"]["energy_rank_frac"]
    assert all(r["energy_rank_frac"] < r["random_frac"] for r in summary.values())


def test_zero_update_gives_zero_ranks_not_nan(tmp_path):
    sd = {"layers.0.q_proj.weight": torch.randn(8, 8)}
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(sd, str(tmp_path / "b.safetensors"))
    res = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    (m,) = res.modules
    assert m.energy_rank == {"0.5": 0, "0.9": 0, "0.99": 0} and m.rel_norm == 0.0
    assert m.stable_rank == 0.0 and m.effective_rank == 0.0
    assert any("exactly zero" in w for w in res.warnings)
    with pytest.raises(IdenticalCheckpointsError, match="ΔW = 0"):
        spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", allow_identical=False)


def test_nan_matrix_is_skipped_and_the_rest_analysed(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.mlp.up_proj.weight": torch.randn(6, 4, generator=g) for i in range(3)}
    tuned = {k: v + 0.1 for k, v in base.items()}
    tuned["layers.1.mlp.up_proj.weight"][2, 1] = float("nan")
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    res = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert [m.layer for m in res.modules] == [0, 2]
    assert {"name": "layers.1.mlp.up_proj.weight", "reason": "tuned weights contain NaN or Inf; ΔW is undefined"} in res.skipped


def test_different_architectures_do_not_pair(tmp_path):
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(4, 12)}, str(tmp_path / "gpt2.safetensors"))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "llama.safetensors"))
    with pytest.raises(PairingError, match="no weight matrix of the base pairs with the tuned checkpoint"):
        spectra.diff(tmp_path / "gpt2.safetensors", tmp_path / "llama.safetensors")


def test_resized_vocabulary_analyses_shared_rows(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"model.embed_tokens.weight": torch.randn(100, 16, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g)}
    tuned = {"model.embed_tokens.weight": torch.cat([base["model.embed_tokens.weight"] + 0.01, torch.randn(4, 16, generator=g)]),
             "model.layers.0.self_attn.q_proj.weight": base["model.layers.0.self_attn.q_proj.weight"] * 1.01}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    res = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    emb = next(m for m in res.modules if m.module == "embed_tokens")
    assert emb.shape == [100, 16] and "rows differ (base 100, tuned 104" in emb.note
    assert emb.fro_norm == pytest.approx(0.01 * math.sqrt(1600), rel=1e-4)


def test_prefix_differences_pair(tmp_path):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 8, generator=g)
    save_file({"model.layers.0.self_attn.q_proj.weight": w}, str(tmp_path / "a.safetensors"))
    save_file({"layers.0.self_attn.q_proj.weight": w * 2}, str(tmp_path / "b.safetensors"))
    (m,) = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").modules
    assert m.name == "layers.0.self_attn.q_proj.weight" and m.rel_norm == pytest.approx(1.0, rel=1e-6)


def test_filters_and_layers(llama_pair):
    res = spectra.diff(*llama_pair, config=DiffConfig(layers="1-2", exclude="mlp", top_k=3))
    assert {m.layer for m in res.modules} == {1, 2}
    assert {m.module for m in res.modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(len(m.singular_values) == 3 for m in res.modules)
    res = spectra.diff(*llama_pair, config=DiffConfig(include=r"embed|lm_head", thresholds=(0.9,)))
    assert [m.module for m in res.modules] == ["embed_tokens", "lm_head"]
    assert list(res.modules[0].energy_rank) == ["0.9"]


@pytest.mark.parametrize(
    "kwargs,match",
    [({"thresholds": (0.0,)}, "thresholds must each be in"), ({"include": "("}, "--include must be a valid regular expression"),
     ({"layers": "a-b"}, "--layers must look like"), ({"layers": "5-2"}, "is empty"),
     ({"device": "tpu"}, "device must be"), ({"method": "qr"}, "method must be")],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DiffConfig(**kwargs)


def test_results_written_as_they_come(tmp_path, llama_pair):
    """An interrupted run keeps every finished matrix in results.jsonl."""
    class Stop(Exception):
        pass

    def cb(ev):
        if ev.done == 5:
            raise Stop

    with pytest.raises(Stop):
        spectra.diff(*llama_pair, out_dir=tmp_path, callback=cb)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["complete"] is False and doc["schema"] == "spectra.diff/1"


def test_device_argument_runs_on_cpu(tmp_path):
    g = torch.Generator().manual_seed(4)
    base = {"layers.0.mlp.up_proj.weight": torch.randn(20, 12, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    ref = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(device="cpu", method="svd"))
    fast = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(device="cpu", precision="float32"))
    np.testing.assert_allclose(ref.modules[0].singular_values, fast.modules[0].singular_values, rtol=1e-4)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="this machine has 0 CUDA device"):
            spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(device="cuda"))


def test_stacked_expert_tensor_is_analysed_per_expert(tmp_path):
    """A 3-D ``experts`` tensor (experts, out, in) gives one result per expert, expert index kept apart
    from the layer index, each equal to the float64 reference."""
    g = torch.Generator().manual_seed(5)
    base = {"model.layers.2.mlp.experts.down_proj": torch.randn(4, 12, 20, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    res = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert [(m.layer, m.expert) for m in res.modules] == [(2, e) for e in range(4)]
    assert [m.name for m in res.modules] == [f"model.layers.2.mlp.experts.down_proj:e{e}" for e in range(4)]
    for e, m in enumerate(res.modules):
        S_ref = svd64(tuned["model.layers.2.mlp.experts.down_proj"][e].double() - base["model.layers.2.mlp.experts.down_proj"][e].double())
        np.testing.assert_allclose(m.singular_values, S_ref, rtol=1e-6)


def test_float64_checkpoints_keep_updates_below_float32_resolution(tmp_path):
    """Both sides in float64: ΔW is formed in float64, so a 1e-9 update of weights near 1 survives."""
    g = torch.Generator().manual_seed(6)
    base = {"layers.0.mlp.up_proj.weight": 1.0 + 0.01 * torch.randn(10, 8, generator=g, dtype=torch.float64)}
    delta = 1e-9 * torch.randn(10, 8, generator=g, dtype=torch.float64)
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file({k: v + delta for k, v in base.items()}, str(tmp_path / "b.safetensors"))
    (m,) = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").modules
    assert m.fro_norm == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-5)


def test_other_thresholds_and_no_layer_stack_still_write_outputs(tmp_path, llama_pair):
    res = spectra.diff(*llama_pair, out_dir=tmp_path / "a", config=DiffConfig(thresholds=(0.95,), layers="0"))
    assert (tmp_path / "a" / "rank_heatmap.png").is_file() and res.headline_threshold == 0.95
    spectra.diff(*llama_pair, out_dir=tmp_path / "b", config=DiffConfig(include="lm_head"))
    assert (tmp_path / "b" / "results.json").is_file() and not (tmp_path / "b" / "rank_heatmap.png").exists()


def test_gqa_query_key_value_is_split_in_blocks():
    """ChatGLM-style grouped query_key_value: q, k, v row blocks, not the per-head interleave."""
    from spectra.naming import ArchInfo, describe_checkpoint

    arch = ArchInfo.from_config({"model_type": "chatglm", "num_attention_heads": 8, "multi_query_group_num": 2, "hidden_size": 64})
    (spec,) = describe_checkpoint({"transformer.encoder.layers.0.self_attention.query_key_value.weight": (96, 64)}, arch).values()
    assert [p.suffix for p in spec.parts] == ["q", "k", "v"]
    assert [p.rows.tolist() for p in spec.parts] == [list(range(0, 64)), list(range(64, 80)), list(range(80, 96))]


def test_weight_spectra_option(tmp_path):
    g = torch.Generator().manual_seed(8)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(30, 20, generator=g)}
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    (m,) = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(weight_spectra=True, top_k=5)).modules
    k = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(m.base_singular_values, svd64(base[k])[:5], rtol=1e-6)
    np.testing.assert_allclose(m.tuned_singular_values, svd64(tuned[k])[:5], rtol=1e-6)
    (plain,) = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").modules
    assert plain.base_singular_values is None and plain.singular_values[:5] == pytest.approx(m.singular_values, rel=1e-12)
