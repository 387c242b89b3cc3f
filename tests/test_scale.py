"""Scale: bounded memory on a checkpoint pair several times the memory budget, MoE layers with
hundreds of experts, and 128k/256k-row vocabularies.

1. ``spectra diff``'s peak resident memory is a few tensors plus a batch, whatever the number of
   layers or shards: the CLI runs in a subprocess on a generated sharded pair ≥ 4× the budget, its
   peak RSS is read cgroup-free with ``os.wait4`` and compared with the same command on a tiny pair
   of the same architecture (interpreter, torch and LAPACK count in that baseline).
2. MoE: every expert of every layer is paired and analysed exactly, experts are batched by shape.
3. Large vocabularies: embedding and head analysed ``(vocab, hidden)`` (docs/definitions.md), exactly, and a
   resized vocabulary on its shared rows with a note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_energy_rank, svd64
from safetensors.torch import save_file

import spectra
from spectra.config import DiffConfig

MiB = 1 << 20

# ---- 1. bounded memory -----------------------------------------------------------------------------

#: Data memory allowed to `spectra diff` above the tiny-pair baseline, bytes, with the CPU defaults
#: (CPU defaults: batches of 16 MiB or 32 matrices, up to 32 pairs / 48 MiB read ahead). The widest matrix is 4096 × 64
#: float32 (1 MiB): one batch holds 32 ΔW (32 MiB; decomposed one by one from the list, no stacked
#: copy) and one float64 upcast block, plus the prefetched pair and glibc heap slack. Measured on
#: the 2-core dev box: baseline ≈ 259 MiB; data memory +73..79 MiB (76 layers), +81..87 MiB (152 layers).
BUDGET = 128 * MiB

#: Llama naming, small hidden size and a wide MLP: few cheap decompositions (p = 64), many bytes.
HIDDEN, INTERMEDIATE, KV = 64, 4096, 64
LAYERS = 152  # base + tuned ≈ 931 MiB ≥ 7 × BUDGET
LAYERS_PER_SHARD = 4  # 38 shards a side; the first 19 hold exactly half the layers


def _llama_layer(layer: int, g: torch.Generator, hidden: int, inter: int, kv: int) -> tuple[dict, dict]:
    """Base and tuned tensors of one Llama decoder layer, float32, ``(out, in)``; ΔW is rank 1 + rounding."""
    p = f"model.layers.{layer}."
    shapes = {
        p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
        p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
        p + "mlp.down_proj.weight": (hidden, inter),
    }
    wide = torch.randn(inter, hidden, generator=g)  # (inter, hidden): one draw reused, generation is I/O-bound anyway
    base, tuned = {}, {}
    for k, (name, (o, i)) in enumerate(shapes.items()):
        w = (wide[:o, :i] if o >= i else wide[:i, :o].T).contiguous() * (1 + 0.01 * k)
        u, v = torch.randn(o, 1, generator=g), torch.randn(1, i, generator=g)
        base[name], tuned[name] = w, w + 1e-2 * (u @ v)
    norm = p + "input_layernorm.weight"
    base[norm] = tuned[norm] = torch.ones(hidden)
    return base, tuned


def write_sharded_llama_pair(root: Path, layers: int, *, hidden: int = HIDDEN, inter: int = INTERMEDIATE,
                             kv: int = KV, per_shard: int = LAYERS_PER_SHARD, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """``root/base`` and ``root/tuned`` sharded folders (index + shards + config.json); returns the
    folders and the shard file names in layer order."""
    g = torch.Generator().manual_seed(seed)
    n_shards = -(-layers // per_shard)
    folders = [root / "base", root / "tuned"]
    for f in folders:
        f.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    shards = []
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        shards.append(shard)
        sides: tuple[dict, dict] = ({}, {})
        for layer in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            for side, part in zip(sides, _llama_layer(layer, g, hidden, inter, kv)):
                side.update(part)
        weight_map.update(dict.fromkeys(sides[0], shard))
        for folder, sd in zip(folders, sides):
            save_file(sd, str(folder / shard), metadata={"format": "pt"})
    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, kv // 64),
              "tie_word_embeddings": False}
    for folder in folders:
        _write_index(folder, weight_map)
        (folder / "config.json").write_text(json.dumps(config))
    return folders[0], folders[1], shards


def _write_index(folder: Path, weight_map: dict[str, str]) -> None:
    size = sum((folder / s).stat().st_size for s in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1))


def first_layers(src: Path, dst: Path, shards: list[str]) -> Path:
    """A folder holding only ``shards`` of ``src`` (hard links, no copy) with its own index and config."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = set(shards)
    for s in shards:
        os.link(src / s, dst / s)
    _write_index(dst, {n: s for n, s in index["weight_map"].items() if s in keep})
    os.link(src / "config.json", dst / "config.json")
    return dst


def files_size(*folders: Path) -> int:
    return sum(f.stat().st_size for folder in folders for f in folder.iterdir() if f.suffix == ".safetensors")


#: Runs argv[1:] and prints that child's peak RSS (KiB). A launcher is needed: Linux carries the
#: parent's high-water RSS into a child's ru_maxrss across fork/vfork + exec, so ``os.wait4`` on a
#: child of pytest (which imported torch and wrote the pair) reports pytest's peak, not the child's
#: (measured: a `python -c pass` child of an 800 MiB parent reads 812 MiB). The launcher is small.
_LAUNCHER = ("import resource, subprocess, sys\n"
             "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
             "sys.exit(rc)\n")


def run_diff_peak_rss(base: Path, tuned: Path, out: Path) -> tuple[int, float]:
    """Run ``python -m spectra diff`` in a subprocess; return its peak RSS (bytes) and wall time.

    No cgroup and no polling: the peak comes from the kernel's rusage of the finished process, and
    every thread of it counts.
    """
    cmd = [sys.executable, "-m", "spectra", "diff", str(base), str(tuned), "--out", str(out), "--no-plots"]
    err = out.with_name(out.name + ".stderr")
    start = time.perf_counter()
    with open(err, "wb") as stderr:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], stdout=subprocess.PIPE, stderr=stderr, text=True, check=False)
    assert proc.returncode == 0, err.read_text(errors="replace")[-2000:]
    return int(proc.stdout.split()[-1]) * 1024, time.perf_counter() - start


def _complete(out: Path, layers: int) -> None:
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["complete"] is True
    assert len(doc["modules"]) == 7 * layers
    assert {m["layer"] for m in doc["modules"]} == set(range(layers))
    assert len(doc["skipped"]) == layers  # the input_layernorm of each layer, 1-D
    assert all(m["fro_norm"] > 0 for m in doc["modules"])


def test_peak_rss_is_bounded_and_independent_of_model_size(tmp_path):
    """Peak RSS above a tiny-pair baseline ≤ BUDGET on a pair ≥ 4 × BUDGET; and a pair with half the
    layers (the first shards, hard-linked) peaks within 15% of BUDGET of the full one.

    Measured (2-core dev box): baseline 259 MiB; 76 layers (466 MiB) +73..79 MiB; 152 layers (931 MiB,
    38 shards a side, 1064 matrices) +81..87 MiB; about 25 s in all.
    """
    base, tuned, shards = write_sharded_llama_pair(tmp_path / "big", LAYERS)
    pair_bytes = files_size(base, tuned)
    assert pair_bytes >= 4 * BUDGET, pair_bytes / MiB

    half = LAYERS // 2
    assert half % LAYERS_PER_SHARD == 0
    n_half = half // LAYERS_PER_SHARD
    half_base = first_layers(base, tmp_path / "half" / "base", shards[:n_half])
    half_tuned = first_layers(tuned, tmp_path / "half" / "tuned", shards[:n_half])
    tiny_base, tiny_tuned, _ = write_sharded_llama_pair(tmp_path / "tiny", 2, hidden=16, inter=32, kv=16, per_shard=1)

    baseline, t0 = run_diff_peak_rss(tiny_base, tiny_tuned, tmp_path / "out_tiny")
    peak_half, t1 = run_diff_peak_rss(half_base, half_tuned, tmp_path / "out_half")
    peak_full, t2 = run_diff_peak_rss(base, tuned, tmp_path / "out_full")
    _complete(tmp_path / "out_half", half)
    _complete(tmp_path / "out_full", LAYERS)

    used_half, used_full = peak_half - baseline, peak_full - baseline
    report = (f"pair {pair_bytes / MiB:.0f} MiB, budget {BUDGET / MiB:.0f} MiB; baseline {baseline / MiB:.0f} MiB ({t0:.1f} s); "
              f"{half} layers +{used_half / MiB:.0f} MiB ({t1:.1f} s); {LAYERS} layers +{used_full / MiB:.0f} MiB ({t2:.1f} s)")
    print(report)
    assert used_full <= BUDGET, report
    assert used_half <= BUDGET, report
    assert abs(used_full - used_half) <= 0.25 * BUDGET, report  # twice the data, about the same peak
    # the run read every byte: memory is bounded, not the input
    assert pair_bytes >= 4 * used_full, report
    # `spectra diff --plan` predicts the data memory before reading anything; what it leaves out is
    # the allocator's slack (freed blocks glibc keeps; measured 45 vs 81 MiB here)
    estimate = spectra.diff_plan(base, tuned, calibrate_cost=False).host_bytes
    print(f"--plan estimate of the data memory: {estimate / MiB:.0f} MiB (measured +{used_full / MiB:.0f} MiB)")
    assert used_full - 64 * MiB <= estimate <= 2 * used_full, (estimate / MiB, report)


# ---- 2. MoE with hundreds of experts ---------------------------------------------------------------------

class _BatchSpy:
    """Wraps ``spectra.pipeline``'s module-level ``batch_singular_values`` and records each batch's shape."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, mats, **kw):
        # a batch comes as a (b, out, in) stack or as a list of equally shaped (out, in) matrices
        shape = tuple(mats.shape) if hasattr(mats, "shape") else (len(mats), *mats[0].shape)
        assert all(tuple(m.shape) == shape[1:] for m in mats)
        self.calls.append(shape)
        return self.fn(mats, **kw)


@pytest.fixture
def batch_spy(monkeypatch):
    module = sys.modules["spectra.pipeline"]
    spy = _BatchSpy(module.batch_singular_values)
    monkeypatch.setattr(module, "batch_singular_values", spy)
    return spy


def _check_exact(result, stored) -> int:
    """Every result's fro_norm and energy ranks equal a float64 numpy SVD of the stored difference."""
    checked = 0
    for m in result.modules:
        _, b, t = stored(m)
        S_ref = svd64(t.double() - b.double())
        assert m.fro_norm == pytest.approx(float(np.sqrt((S_ref**2).sum())), rel=1e-9), m.name
        # the float64 Gram route keeps singular values down to ~1e-7·σ1 (spectra.linalg); below that, noise
        np.testing.assert_allclose(m.singular_values, S_ref[: len(m.singular_values)], rtol=1e-6, atol=1e-6 * S_ref[0])
        for key, k in m.energy_rank.items():
            ref, clear = reference_energy_rank(S_ref, float(key))
            if clear:
                assert k == ref, (m.name, key)
                checked += 1
    return checked


def _bf16(sd: dict) -> dict:
    """Stored as bf16, like released checkpoints: then the float32 ΔW spectra forms is exactly the
    float64 difference of the stored values, and fro_norm can be held to 1e-9."""
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


MOE_LAYERS, MOE_EXPERTS = 2, 128
MOE_OUT, MOE_IN = 32, 48  # (out, in) of w1/w3; w2 is (in, out)


def test_mixtral_layers_with_128_experts_pair_every_expert_exactly(tmp_path, batch_spy):
    g = torch.Generator().manual_seed(7)
    base, tuned = {}, {}
    for layer in range(MOE_LAYERS):
        p = f"model.layers.{layer}.block_sparse_moe."
        base[p + "gate.weight"] = torch.randn(MOE_EXPERTS, MOE_IN, generator=g)  # router (experts, hidden)
        for e in range(MOE_EXPERTS):
            for leaf, shape in (("w1", (MOE_OUT, MOE_IN)), ("w3", (MOE_OUT, MOE_IN)), ("w2", (MOE_IN, MOE_OUT))):
                base[f"{p}experts.{e}.{leaf}.weight"] = torch.randn(*shape, generator=g)
    for name, w in base.items():
        rank = 1 + hash(name) % 4  # ΔW of low, varied rank: energy ranks differ between experts
        tuned[name] = w + 0.05 * torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
    base, tuned = _bf16(base), _bf16(tuned)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))

    res = spectra.diff(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", config=DiffConfig(device="cpu"))
    experts = [m for m in res.modules if m.expert is not None]
    assert len(experts) == MOE_LAYERS * MOE_EXPERTS * 3
    assert len(res.modules) == len(experts) + MOE_LAYERS  # + one router per layer
    assert not res.skipped and res.unmatched == {"base_only": [], "tuned_only": []}
    seen = {(m.layer, m.expert, m.name.split(".")[-2]) for m in experts}
    assert seen == {(layer, e, leaf) for layer in range(MOE_LAYERS) for e in range(MOE_EXPERTS) for leaf in ("w1", "w2", "w3")}
    for m in experts:
        assert m.name == f"model.layers.{m.layer}.block_sparse_moe.experts.{m.expert}.{m.name.split('.')[-2]}.weight"
        assert tuple(m.shape) == tuple(base[m.name].shape)
        assert m.role == {"w1": "gate", "w3": "up", "w2": "down"}[m.name.split(".")[-2]]
    routers = [m for m in res.modules if m.expert is None]
    assert [m.role for m in routers] == ["router"] * MOE_LAYERS
    assert _check_exact(res, lambda m: (m.name, base[m.name], tuned[m.name])) > 1000

    # experts are batched by shape, up to max_batch, never mixing shapes
    sizes = [c[0] for c in batch_spy.calls if c[1:] in ((MOE_OUT, MOE_IN), (MOE_IN, MOE_OUT))]
    assert sum(sizes) == len(experts)
    assert max(sizes) == DiffConfig().max_batch and np.mean(sizes) > 16, sizes
    assert len(batch_spy.calls) < len(res.modules) / 8


def test_stacked_3d_expert_tensors_give_one_result_per_expert(tmp_path, batch_spy):
    """Qwen-style ``mlp.experts.<proj>`` stored as one (experts, out, in) tensor: results ``<tensor>:e<k>``."""
    n_exp = 256
    g = torch.Generator().manual_seed(11)
    base, tuned = {}, {}
    for layer in range(MOE_LAYERS):
        for proj, shape in (("up_proj", (MOE_OUT, MOE_IN)), ("down_proj", (MOE_IN, MOE_OUT))):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            base[name] = torch.randn(n_exp, *shape, generator=g)
            tuned[name] = base[name] + 0.05 * torch.randn(n_exp, shape[0], 2, generator=g) @ torch.randn(n_exp, 2, shape[1], generator=g)
    base, tuned = _bf16(base), _bf16(tuned)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    res = spectra.diff(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", config=DiffConfig(device="cpu"))
    assert len(res.modules) == MOE_LAYERS * 2 * n_exp and not res.skipped
    for m in res.modules:
        tensor, e = m.name.rsplit(":e", 1)
        assert m.expert == int(e) and m.layer == int(tensor.split(".")[2])
        assert tuple(m.shape) == tuple(base[tensor].shape[1:])
    names = [m.name for m in res.modules]
    assert len(set(names)) == len(names)
    assert {m.expert for m in res.modules} == set(range(n_exp))

    def stored(m):
        tensor, e = m.name.rsplit(":e", 1)
        return tensor, base[tensor][int(e)], tuned[tensor][int(e)]

    assert _check_exact(res, stored) > 1000
    sizes = [c[0] for c in batch_spy.calls]
    assert sum(sizes) == len(res.modules) and max(sizes) == DiffConfig().max_batch, sizes


# ---- 3. large vocabularies ------------------------------------------------------------------------------

VOCAB_HIDDEN = 32  # small hidden: the float64 oracle SVD of a 256,000 × 32 matrix takes ~0.5 s


def _vocab_pair(tmp_path: Path, vocab_base: int, vocab_tuned: int, seed: int) -> tuple[Path, Path, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    h = VOCAB_HIDDEN
    base = {
        "model.embed_tokens.weight": torch.randn(vocab_base, h, generator=g),
        "lm_head.weight": torch.randn(vocab_base, h, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(h, h, generator=g),
        "model.norm.weight": torch.ones(h),
    }
    tuned = {}
    for name, w in base.items():
        if w.ndim == 1:
            tuned[name] = w.clone()
            continue
        upd = 0.01 * torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g)
        tuned[name] = w + upd
        if w.shape[0] == vocab_base and vocab_tuned > vocab_base:  # new tokens appended (a resized vocabulary)
            tuned[name] = torch.cat([tuned[name], torch.randn(vocab_tuned - vocab_base, h, generator=g)])
    base, tuned = _bf16(base), _bf16(tuned)
    folders = []
    for sub, sd in (("base", base), ("tuned", tuned)):
        (tmp_path / sub).mkdir()
        save_file(sd, str(tmp_path / sub / "model.safetensors"))
        (tmp_path / sub / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": h, "num_attention_heads": 1,
                                                                "vocab_size": sd["lm_head.weight"].shape[0], "tie_word_embeddings": False}))
        folders.append(tmp_path / sub)
    return folders[0], folders[1], base, tuned


@pytest.mark.parametrize("vocab", [128_256, 256_000])
def test_large_vocabulary_embedding_and_head_are_analysed_vocab_by_hidden(tmp_path, vocab):
    b, t, base, tuned = _vocab_pair(tmp_path, vocab, vocab, seed=vocab % 97)
    res = spectra.diff(b, t, config=DiffConfig(device="cpu"))
    by = {m.name: m for m in res.modules}
    assert set(by) == {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"}
    assert res.modules[0].name == "model.embed_tokens.weight"  # embeddings first, head last
    assert res.modules[-1].name == "lm_head.weight"
    for name, role in (("model.embed_tokens.weight", "embed"), ("lm_head.weight", "head")):
        m = by[name]
        assert m.shape == [vocab, VOCAB_HIDDEN] and m.layer is None and m.role == role and not m.note
        assert m.random_energy_rank["0.9"] <= VOCAB_HIDDEN  # p = hidden, not vocab
    assert _check_exact(res, lambda m: (m.name, base[m.name], tuned[m.name])) >= 6


def test_resized_vocabulary_128256_to_128264_analyses_shared_rows(tmp_path):
    b, t, base, tuned = _vocab_pair(tmp_path, 128_256, 128_264, seed=5)
    res = spectra.diff(b, t, config=DiffConfig(device="cpu"))
    by = {m.name: m for m in res.modules}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        m = by[name]
        assert m.shape == [128_256, VOCAB_HIDDEN]
        assert "rows differ (base 128256, tuned 128264" in m.note and "128256 leading rows" in m.note
    assert not by["model.layers.0.self_attn.q_proj.weight"].note
    assert _check_exact(res, lambda m: (m.name, base[m.name], tuned[m.name][: base[m.name].shape[0]])) >= 6


# ---- reading ahead is bounded by count and by bytes ---------------------------------------------------

def test_prefetch_is_capped_by_count_and_bytes(tmp_path, monkeypatch):
    """The reader threads never hold more than ``prefetch`` pairs, nor more than ``prefetch_bytes`` of
    them (one pair always goes, however large): the cap that keeps a GPU run of a 405B model within
    memory, tested here on the CPU with the same function."""
    import threading

    module = sys.modules["spectra.stream"]  # where the reader threads call prepare()
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32)] * 6 + [(512, 32)] + [(64, 32)] * 6  # one pair 8× the others
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}
    tuned = {k: v + 0.01 * torch.randn(*v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    reference = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(prefetch=0))

    lock, state = threading.Lock(), {"now": 0, "bytes": 0, "peak": 0, "peak_bytes": 0}
    real = module.prepare

    def counting(task, base_ckpt, tuned_ckpt, *a, **k):
        size = sum(module.pair_bytes(task, base_ckpt, tuned_ckpt))
        with lock:
            state["now"] += 1
            state["bytes"] += size
            state["peak"] = max(state["peak"], state["now"])
            state["peak_bytes"] = max(state["peak_bytes"], state["bytes"])
        time.sleep(0.01)  # let the other readers catch up, if the caps allowed them
        try:
            return real(task, base_ckpt, tuned_ckpt, *a, **k)
        finally:
            with lock:
                state["now"] -= 1
                state["bytes"] -= size

    monkeypatch.setattr(module, "prepare", counting)
    small, big = 3 * (64 * 32 * 4), 3 * (512 * 32 * 4)  # a pair: both sides float32 and its ΔW
    # (prefetch, prefetch_bytes) -> most pairs and bytes in flight; the big pair goes alone
    for depth, cap, peak, peak_bytes in ((4, None, 4, None), (8, 2 * small, 2, big), (8, 1, 1, big)):
        state.update(peak=0, peak_bytes=0)
        res = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                           config=DiffConfig(prefetch=depth, prefetch_bytes=cap, read_workers=8))
        assert [m.singular_values for m in res.modules] == [m.singular_values for m in reference.modules]
        assert state["peak"] <= peak, (depth, cap, state)
        if peak_bytes is not None:
            assert state["peak_bytes"] <= peak_bytes, (depth, cap, state)
    # without a byte cap, the count cap is reached (the threads do run ahead)
    state.update(peak=0)
    spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(prefetch=4, read_workers=8))
    assert state["peak"] >= 2
