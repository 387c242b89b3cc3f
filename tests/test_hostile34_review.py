"""Thirty-fourth round: the review leftovers, pinned (docs/bad_inputs.md, "thirty-fourth round")."""

from __future__ import annotations

import json

import torch
from cli_util import cli
from safetensors.torch import save_file
from test_hostile32_io import init_adapter

from spectra.extract_heads import auto_task_type


def test_a_resized_adapter_keeps_its_own_task_type(tmp_path):
    """extract chose the automatic task type apart from recommend: resizing an adapter took the base's class's type
    (None for a BertForMaskedLM) over the adapter's own FEATURE_EXTRACTION, which recommend kept. One function now
    (extract_heads.auto_task_type): the resized adapter loads as the original did."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g)}, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    ad = init_adapter(tmp_path / "ad", True, g)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "FEATURE_EXTRACTION"}))
    res = cli(["extract", str(tmp_path / "base"), str(ad), "-r", "1", "--out", str(tmp_path / "out"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    written = json.loads(next((tmp_path / "out").rglob("adapter_config.json")).read_text())
    assert written["task_type"] == "FEATURE_EXTRACTION", written
    # the order: a head's type from any side first, then the adapter's own, then the base's class, then the tuned's
    bert, llama = {"architectures": ["BertForMaskedLM"]}, {"architectures": ["LlamaForCausalLM"]}
    assert auto_task_type({"architectures": ["BertForTokenClassification"]}, bert, "CAUSAL_LM") == "TOKEN_CLS"
    assert auto_task_type(llama, bert) is None and auto_task_type(llama, None) == "CAUSAL_LM"
    assert auto_task_type(None, {"architectures": []}) is None


def test_plan_counts_the_batch_its_bytes_allow():
    """The new per-shape peak took min(n, max_batch) pairs out of flight while the batch held only batch_bytes of
    them: the same run planned 84 MiB with max_batch 8 and 100 MiB with max_batch 2 (the review's case)."""
    from spectra.plan import estimate_memory

    pairs = [(8 << 20, 4 << 20, [(1024, 1024)])] * 10
    kw = {"depth": 3, "batch_bytes": 8 << 20}
    assert estimate_memory(pairs, max_batch=8, **kw) == estimate_memory(pairs, max_batch=2, **kw)


def test_a_variant_index_beside_model_safetensors_is_no_loose_shard(tmp_path):
    """transformers' hub layout, model.safetensors beside an fp16 variant's shards and its index, was noted as "ignored
    2 shard files … no index names"; the variant's index names them."""
    import json as _json

    from spectra.io.checkpoint import open_checkpoint

    w = torch.zeros(4, 4)
    save_file({"a.weight": w, "b.weight": w.clone()}, tmp_path / "model.safetensors")
    save_file({"a.weight": w.half()}, tmp_path / "model.fp16-00001-of-00002.safetensors")
    save_file({"b.weight": w.half()}, tmp_path / "model.fp16-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.fp16.json").write_text(_json.dumps({"weight_map": {
        "a.weight": "model.fp16-00001-of-00002.safetensors", "b.weight": "model.fp16-00002-of-00002.safetensors"}}))
    assert not open_checkpoint(tmp_path).notes


def test_a_small_eigenproblem_runs_on_one_blas_thread_and_gives_the_count_back():
    """trace and interfere reduced small Gram matrices on two OpenBLAS threads, which spun against torch's OpenMP team:
    a trace of 512-1024 matrices took 4.1-4.5 s where one BLAS thread took 1.6-2.3 s. spectrum_and_top holds one thread
    up to ONE_THREAD_MAX_P and leaves the process's count as it found it; the numbers are the same."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from spectra.interference import spectrum_and_top

    def counts() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = counts()
    D = torch.randn(300, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    S, top = spectrum_and_top(D, 5)
    assert counts() == before
    np.testing.assert_allclose(S, np.linalg.svd(D.numpy(), compute_uv=False), rtol=1e-10)
