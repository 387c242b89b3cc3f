"""Hostile and odd inputs found by the sixth outside probe and the new-user walkthrough: each test
reproduces a finding and checks the fix (one-line errors that say what the path is, numbers against
float64 numpy)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from families_util import fro_by_name, save_perturbed_pair
from safetensors.torch import save_file

from spectra_cli.main import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_dangling_symlink_is_named_as_such(tmp_path):
    """A path that is a symbolic link to nothing said "no such file or folder" (the link is there), and
    compare said a dangling link "is a full checkpoint: ... pass --base"."""
    (tmp_path / "dang").symlink_to(tmp_path / "nothere")
    for args in (("diff", str(tmp_path / "dang"), str(tmp_path / "dang")), ("compare", str(tmp_path / "dang"), str(tmp_path / "dang"))):
        res = _run(*args)
        assert res.exit_code == 1, res.output
        assert "is a symbolic link to" in res.output and "which does not exist" in res.output, res.output
        assert "--base" not in res.output and "Traceback" not in res.output


def test_symlink_loop_hint_is_not_permissions(tmp_path):
    """A loop of symbolic links (a -> b -> a) was told to "check the file's permissions"."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a").symlink_to("b")
    (folder / "b").symlink_to("a")
    (folder / "model.safetensors").symlink_to("a")
    for target in (folder / "a", folder):
        res = _run("diff", str(target), str(target))
        assert res.exit_code == 1, res.output
        assert "loop of symbolic links" in res.output and "permissions" not in res.output, res.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_hint_is_permissions(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.ones(4, 4)}, str(f))
    f.chmod(0)
    res = _run("diff", str(f), str(f))
    assert res.exit_code == 1 and "permissions" in res.output, res.output


# ---- fused matrices split as the model computes them ----------------------------------------------
def test_gpt2_cross_attention_c_attn_is_k_and_v(tmp_path):
    """GPT-2 cross-attention's c_attn is Conv1D(2d): k and v of the encoder states (q is q_attn); it was
    cut in thirds as q, k, v whenever 2d was a multiple of 3."""
    import transformers as T

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=48, n_head=4, n_layer=1, vocab_size=64, n_positions=16,
                                           add_cross_attention=True))
    base, tuned, b, t = save_perturbed_pair(tmp_path, model, "gpt2x")
    fro = fro_by_name(base, tuned)
    name = "transformer.h.0.crossattention.c_attn.weight"
    D = (t[name] - b[name]).T.numpy()  # Conv1D stores (in, out)
    assert fro[f"{name}:k"] == pytest.approx(np.linalg.norm(D[:48]), rel=1e-6)
    assert fro[f"{name}:v"] == pytest.approx(np.linalg.norm(D[48:]), rel=1e-6)
    assert f"{name}:q" not in fro
    self_attn = "transformer.h.0.attn.c_attn.weight"
    Ds = (t[self_attn] - b[self_attn]).T.numpy()
    for i, part in enumerate("qkv"):
        assert fro[f"{self_attn}:{part}"] == pytest.approx(np.linalg.norm(Ds[48 * i:48 * (i + 1)]), rel=1e-6)


@pytest.mark.parametrize("multi_query", [False, True])
def test_gpt_bigcode_c_attn_split_as_transformers_views_it(tmp_path, multi_query):
    """GPT-BigCode without multi-query views c_attn's output as (heads, 3·head_dim): q, k, v per head; it
    was split as three row blocks. With multi-query: q rows, then one k and one v head."""
    import transformers as T

    torch.manual_seed(0)
    model = T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(n_embd=64, n_head=4, n_layer=1, vocab_size=64, n_positions=16,
                                                       multi_query=multi_query))
    base, tuned, b, t = save_perturbed_pair(tmp_path, model, "bigcode")
    fro = fro_by_name(base, tuned)
    name = "transformer.h.0.attn.c_attn.weight"
    D = (t[name] - b[name]).numpy()
    if multi_query:
        ref = {"q": D[:64], "k": D[64:80], "v": D[80:96]}
    else:
        per_head = D.reshape(4, 3, 16, 64)
        ref = {s: per_head[:, i].reshape(64, 64) for i, s in enumerate("qkv")}
    for part, M in ref.items():
        assert fro[f"{name}:{part}"] == pytest.approx(np.linalg.norm(M), rel=1e-6), part


def test_arch_of_old_configs():
    """A GPT-BigCode config older than num_key_value_heads is multi-query unless it says otherwise;
    Falcon-40B's RefinedWeb config gives n_head_kv and uses the grouped layout without the flag
    transformers' converted config adds."""
    from spectra.naming import ArchInfo, describe_checkpoint

    assert ArchInfo.from_config({"model_type": "gpt_bigcode", "n_head": 4, "n_embd": 64}).num_kv_heads == 1
    assert ArchInfo.from_config({"model_type": "gpt_bigcode", "n_head": 4, "n_embd": 64,
                                 "multi_query": False}).num_kv_heads == 4
    rw = ArchInfo.from_config({"model_type": "RefinedWeb", "n_head": 4, "n_head_kv": 2, "hidden_size": 256})
    assert (rw.falcon_layout, rw.num_kv_heads, rw.head_dim) == ("new", 2, 64)
    name = "transformer.h.0.self_attention.query_key_value.weight"
    spec = describe_checkpoint({name: (512, 256)}, rw)[name]
    idx = torch.arange(512).view(2, 4, 64)  # per kv head: 2 q heads, then k, then v
    got = {p.suffix: p.rows for p in spec.parts}
    assert torch.equal(got["q"], idx[:, :2].reshape(-1)) and torch.equal(got["k"], idx[:, 2].reshape(-1))
    assert torch.equal(got["v"], idx[:, 3].reshape(-1))
    assert ArchInfo.from_config({"model_type": "RefinedWebModel", "n_head": 4, "hidden_size": 256}).falcon_layout == "multi_query"


def test_c_attn_without_config_note_names_what_is_missing():
    from spectra.naming import describe_checkpoint

    spec = describe_checkpoint({"transformer.h.0.attn.c_attn.weight": (96, 32)})["transformer.h.0.attn.c_attn.weight"]
    assert len(spec.parts) == 1 and "non-GPT-2" not in spec.note and "config.json" in spec.note


# ---- rows of a resized matrix ---------------------------------------------------------------------
def test_resized_rows_pair_only_vocabulary_tables(tmp_path):
    """Phi-3 with 2 kv heads against 4 (and MLP 128 against 96): the leading rows of qkv_proj/gate_up_proj
    were subtracted as if a resized vocabulary (a traceback one way, k minus part of q the other); now
    such matrices are skipped as a shape mismatch, while a resized embedding still pairs its rows."""
    import transformers as T

    def phi(kv, inter=128, vocab=100):
        return T.Phi3Config(hidden_size=64, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=64, pad_token_id=0)

    torch.manual_seed(0)
    for name, cfg in (("kv2", phi(2)), ("kv4", phi(4)), ("i96", phi(2, 96)), ("v120", phi(2, vocab=120))):
        T.Phi3ForCausalLM(cfg).save_pretrained(tmp_path / name)
    for b, t, skipped in (("kv2", "kv4", "qkv_proj"), ("kv4", "kv2", "qkv_proj"), ("kv2", "i96", "gate_up_proj")):
        res = _run("diff", str(tmp_path / b), str(tmp_path / t), "--json", "--allow-identical")
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output
        out = json.loads(res.stdout)
        assert not any(skipped in m["name"] for m in out["modules"]), (b, t)
        assert any(skipped in s["name"] and "shape mismatch" in s["reason"] for s in out["skipped"]), (b, t)
    from safetensors.torch import load_file

    import spectra

    res = spectra.diff(str(tmp_path / "kv2"), str(tmp_path / "v120"))
    emb = next(m for m in res.modules if "embed_tokens" in m.name)
    wb = load_file(str(tmp_path / "kv2" / "model.safetensors"))["model.embed_tokens.weight"].double()
    wt = load_file(str(tmp_path / "v120" / "model.safetensors"))["model.embed_tokens.weight"].double()
    assert emb.fro_norm == pytest.approx(float(torch.linalg.norm(wt[:100] - wb)), rel=1e-6)


# ---- PEFT adapters whose modules are not the base's modules of the same name ----------------------
def _llama(layers: int = 2, tie: bool = False):
    import transformers as T

    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=60,
                                            tie_word_embeddings=tie))


def test_layer_replication_adapter_is_refused_against_a_base(tmp_path):
    """PEFT's layer_replication stacks base layers [0, 1, 1, 2] into a 4-layer model: adapter layer i
    was paired with base layer i (wrong base weights for rel_norm, a wrong DoRA ΔW)."""
    from tests.conftest import random_lora

    model = _llama(layers=4)
    model.save_pretrained(tmp_path / "base")
    random_lora(model, 0, r=4, lora_alpha=8, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 3]]).save_pretrained(
        tmp_path / "ad")
    res = _run("diff", str(tmp_path / "base"), str(tmp_path / "ad"))
    assert res.exit_code == 1 and "layer_replication" in res.output and "[0, 1, 1, 2]" in res.output, res.output
    assert "Traceback" not in res.output
    res = _run("compare", str(tmp_path / "ad"), str(tmp_path / "ad"), "--base", str(tmp_path / "base"))
    assert res.exit_code == 1 and "layer_replication" in res.output, res.output
    alone = _run("diff", str(tmp_path / "ad"), "--json")  # s·B·A of each of the model's layers needs no base
    assert alone.exit_code == 0, alone.output
    assert len(json.loads(alone.stdout)["modules"]) == 4


def test_lora_on_a_tied_head_is_measured_against_the_embedding(tmp_path):
    """A LoRA on lm_head of a base that ties it to embed_tokens (and stores no lm_head) was refused as
    "for another model"; the head computes with the embedding matrix, as the full diff pairs it."""
    from safetensors.torch import load_file

    from tests.conftest import random_lora

    model = _llama(tie=True)
    model.save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in load_file(str(tmp_path / "base" / "model.safetensors"))
    random_lora(model, 1, r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]).save_pretrained(tmp_path / "ad")
    res = _run("diff", str(tmp_path / "base"), str(tmp_path / "ad"), "--json")
    assert res.exit_code == 0, res.output
    head = next(m for m in json.loads(res.stdout)["modules"] if m["name"].startswith("lm_head"))
    f = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    A = next(v for k, v in f.items() if "lm_head.lora_A" in k).double()
    B = next(v for k, v in f.items() if "lm_head.lora_B" in k).double()
    W = load_file(str(tmp_path / "base" / "model.safetensors"))["model.embed_tokens.weight"].double()
    D = (8 / 4) * B @ A
    assert head["fro_norm"] == pytest.approx(float(torch.linalg.norm(D)), rel=1e-9)
    assert head["rel_norm"] == pytest.approx(float(torch.linalg.norm(D) / torch.linalg.norm(W)), rel=1e-6)
    assert "ties its output head" in head["note"]
    res = _run("compare", str(tmp_path / "ad"), str(tmp_path / "ad"), "--base", str(tmp_path / "base"),
               "--out", str(tmp_path / "c"), "--no-plots")
    assert res.exit_code == 0, res.output
    cmp = json.loads((tmp_path / "c" / "compare.json").read_text())
    head = next(m for m in cmp["modules"] if m["name"].startswith("lm_head"))
    assert head["amplification"]["a"]["w_fro"] == pytest.approx(float(torch.linalg.norm(W)), rel=1e-6)


# ---- sharded folders read as transformers reads them ---------------------------------------------
def _sharded(folder, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str]) -> None:
    folder.mkdir()
    for fname, tensors in shards.items():
        save_file(tensors, str(folder / fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_shard_tensors_missing_from_the_index_are_read(tmp_path):
    """transformers loads every tensor of every listed shard (the index only lists files); a tensor left
    out of weight_map was invisible to spectra, which then called a changed pair "identical"."""
    g = torch.Generator().manual_seed(0)
    w = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(16, 8, generator=g) for i in range(2)}
    tuned = {k: v.clone() for k, v in w.items()}
    tuned["model.layers.1.mlp.up_proj.weight"] += 0.5
    for name, sd in (("b", w), ("t", tuned)):
        _sharded(tmp_path / name, {"s-1.safetensors": {"model.layers.0.mlp.up_proj.weight": sd["model.layers.0.mlp.up_proj.weight"]},
                                   "s-2.safetensors": {"model.layers.1.mlp.up_proj.weight": sd["model.layers.1.mlp.up_proj.weight"]}},
                 {"model.layers.0.mlp.up_proj.weight": "s-1.safetensors"})  # layer 1 left out; its shard still listed
        (tmp_path / name / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "model.layers.0.mlp.up_proj.weight": "s-1.safetensors", "model.layers.0.mlp.x.weight": "s-2.safetensors"}}))
        save_file({"model.layers.1.mlp.up_proj.weight": sd["model.layers.1.mlp.up_proj.weight"],
                   "model.layers.0.mlp.x.weight": torch.ones(2, 2)}, str(tmp_path / name / "s-2.safetensors"))
    res = _run("diff", str(tmp_path / "b"), str(tmp_path / "t"), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    by = {m["name"]: m for m in out["modules"]}
    assert by["model.layers.1.mlp.up_proj.weight"]["fro_norm"] == pytest.approx(0.5 * np.sqrt(16 * 8), rel=1e-6)
    assert any("not in model.safetensors.index.json" in x for x in out["warnings"]), out["warnings"]


def test_a_tensor_in_two_shards_is_read_from_the_last_as_transformers_does(tmp_path):
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    name = "model.layers.0.mlp.up_proj.weight"
    _sharded(tmp_path / "m", {"a.safetensors": {name: old}, "b.safetensors": {name: new, "other.weight": old}},
             {name: "a.safetensors", "other.weight": "b.safetensors"})
    from spectra.io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(tmp_path / "m"))
    assert torch.equal(ckpt.load(name), new)
    assert any("more than one shard" in n and "b.safetensors" in n for n in ckpt.notes), ckpt.notes
    _sharded(tmp_path / "gone", {"a.safetensors": {"x.weight": old}}, {name: "a.safetensors"})
    res = _run("diff", str(tmp_path / "gone"), str(tmp_path / "gone"))
    assert res.exit_code == 1 and "no listed shard holds it" in res.output, res.output


# ---- options and outputs (second probe of this round) ----------------------------------------------
@pytest.fixture
def tiny_pair(tmp_path):
    """A base and a tuned safetensors file of four Llama-named matrices (ΔW of rank 3 plus noise)."""
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(24, 16, generator=g) for i in range(2) for m in ("q_proj", "v_proj")}
    tuned = {k: v + 0.1 * torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g) + 1e-3 * torch.randn(24, 16, generator=g)
             for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def test_approx_bounds_hold_the_exact_rank_at_ties(tmp_path):
    """ΔW = a k×k identity block: every nonzero σ equal, the energy lands exactly on τ. --approx's
    "guaranteed" bounds were one above the exact rank (float32 values against a float64 total)."""
    import spectra
    from spectra.config import DiffConfig

    base, tuned = {}, {}
    for p in (2, 16, 40, 100, 256):
        for k in (2, 10, 40):
            if k <= p:
                name = f"model.layers.{p}.n{k}.up_proj.weight"
                base[name] = torch.zeros(p, p)
                tuned[name] = torch.zeros(p, p)
                tuned[name][range(k), range(k)] = 1.0
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
                       config=DiffConfig(thresholds=(0.5, 0.9), approx=True))
    for m in res.modules:
        k = int(m.name.split(".n")[1].split(".")[0])
        for tau in (0.5, 0.9):
            exact = int(np.ceil(tau * k - 1e-9))  # k equal values: the first j with j/k >= τ
            # (where the sketch grew to p/2 the whole spectrum was computed: an exact rank, no bounds)
            lo, hi = m.energy_rank_bounds[str(tau)] if m.energy_rank_bounds else (m.energy_rank[str(tau)],) * 2
            assert lo <= exact <= hi, (m.name, tau, exact, (lo, hi))


def test_report_and_recommend_refuse_to_overwrite_their_input(tmp_path, tiny_pair):
    base, tuned = tiny_pair
    out = tmp_path / "d"
    assert _run("diff", str(base), str(tuned), "--out", str(out), "--no-plots").exit_code == 0
    before = (out / "results.json").read_bytes()
    for args in (("report", str(out / "results.json"), "--out", str(out / "results.json")),
                 ("report", str(out), "--out", str(out / "results.json")),
                 ("recommend", str(out / "results.json"), "--out", str(out / "results.json")),
                 ("recommend", str(out), "--out", str(out / "." / "results.json"))):
        res = _run(*args)
        assert res.exit_code == 1 and "would replace the results it was made from" in res.output, (args, res.output)
    assert (out / "results.json").read_bytes() == before
    assert _run("report", str(out), "--out", str(out / "report.html")).exit_code == 0


def test_compare_and_interfere_lock_their_out_folder(tmp_path, tiny_pair):
    """Two compare (or interfere) runs into one --out interleaved their files, and one's --report showed
    the other's numbers: now a second run is refused while the first holds the folder."""
    from spectra.io.files import LOCK_NAME, OutputLock

    base, tuned = tiny_pair
    out = tmp_path / "c"
    out.mkdir()
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, pathlib\n"
                               "from spectra.io.files import OutputLock\n"
                               f"l = OutputLock.acquire(pathlib.Path({str(out)!r})); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (("compare", str(tuned), str(tuned), "--base", str(base), "--out", str(out)),
                     ("interfere", "--base", str(base), str(tuned), str(tuned), "--out", str(out))):
            res = _run(*args)
            assert res.exit_code == 1 and "another spectra run is writing into this folder" in res.output, res.output
        assert not (out / "compare.json").exists() and not (out / "interfere.json").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    res = _run("compare", str(tuned), str(tuned), "--base", str(base), "--out", str(out), "--no-plots")
    assert res.exit_code == 0, res.output
    assert (out / "compare.json").is_file() and not (out / LOCK_NAME).exists()
    assert OutputLock  # the class the runs take
    gone = tmp_path / "never"
    assert _run("compare", str(tmp_path / "nothing"), str(tuned), "--base", str(base), "--out", str(gone)).exit_code == 1
    assert not gone.exists()  # a run refused before writing leaves no folder


@pytest.mark.parametrize("budget", ["1e400", "1e309", "1e308MB", "1e300GiB", "0"])
def test_budget_beyond_range_is_one_line(budget):
    from spectra.lowrank import parse_budget

    with pytest.raises(ValueError, match="at least 1 and below 2\\^63"):
        parse_budget(budget)


def test_recommend_alpha_ratio_overflow_is_refused(tmp_path, tiny_pair):
    base, tuned = tiny_pair
    out = tmp_path / "d"
    assert _run("diff", str(base), str(tuned), "--out", str(out), "--no-plots").exit_code == 0
    res = _run("recommend", str(out), "--alpha-ratio", "1e308")
    assert res.exit_code == 1 and "overflows" in res.output and "Infinity" not in res.output, res.output


def test_release_workers_wakes_a_thread_the_pool_never_registered():
    """A Ctrl-C between a pool thread's start and its registration left a thread the exit hook never
    woke (the exit then waited 20 s for the stop watchdog). release_workers wakes every reader of the
    pool's queue: here a worker started by hand on that queue, as the interrupted start leaves it."""
    import concurrent.futures.thread as cft
    import threading
    import weakref

    from spectra.threads import imap_one_blas_thread, release_workers

    assert list(imap_one_blas_thread(lambda x: x + 1, [1, 2, 3], 2)) == [2, 3, 4]
    # a pool thread's own (executor reference, work queue): a second reader of that queue, unregistered
    worker = next(t for t in threading.enumerate() if t.name.startswith("spectra-eig"))
    pool_ref, queue = worker._args[0], worker._args[1]
    assert isinstance(pool_ref, weakref.ref) and pool_ref() is not None
    stray = threading.Thread(target=cft._worker, args=(pool_ref, queue, None, ()), daemon=False)
    stray.start()
    release_workers()
    stray.join(timeout=5)
    assert not stray.is_alive()
    assert list(imap_one_blas_thread(lambda x: 2 * x, [1, 2], 2)) == [2, 4]  # a new pool after the release


def test_extract_rank_above_max_rank_is_refused():
    """--rank 32 --max-rank 8 wrote rank 8 everywhere while extract.json said rank 32."""
    from spectra.errors import ConfigError
    from spectra.extract_plan import ExtractConfig

    with pytest.raises(ConfigError, match="--rank 32 is above --max-rank 8"):
        ExtractConfig(rank=32, max_rank=8)
    assert ExtractConfig(rank=8, max_rank=8).rank == 8


# ---- found by the new-user walkthrough ---------------------------------------------------------------
def test_train_refuses_byte_tokens_beyond_a_small_vocabulary(tmp_path):
    """A model folder without tokenizer files is trained on UTF-8 bytes (ids 0-255); with a vocabulary
    of 100 the embedding lookup failed mid-run with an IndexError traceback and a half-made --out."""
    pytest.importorskip("peft")
    _llama().save_pretrained(tmp_path / "base")  # vocab_size 60, no tokenizer files
    (tmp_path / "code.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "run"
    res = _run("train", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "code.txt"), "--method", "lora",
               "--rank", "2", "--steps", "2", "--out", str(out))
    assert res.exit_code == 1 and "outside the model's vocabulary of 60" in res.output, res.output
    assert "UTF-8 bytes" in res.output and "Traceback" not in res.output
    assert not out.exists()


# ---- found by the review of this round's change ------------------------------------------------------
def test_tied_head_lora_in_trace_interfere_and_compare_with_a_full_side(tmp_path):
    """After the tied-head pairing: trace read the head's name from the base (KeyError traceback), interfere
    keyed the head by the embedding's name (one task's update replaced the other's, silently), and compare
    left an untied full fine-tune's head "only in B"."""
    from safetensors.torch import load_file

    from tests.conftest import random_lora

    model = _llama(tie=True)
    model.save_pretrained(tmp_path / "base")
    W = load_file(str(tmp_path / "base" / "model.safetensors"))["model.embed_tokens.weight"].double()
    for i in (1, 2):
        random_lora(_llama(tie=True), i, r=4, lora_alpha=8, target_modules=["lm_head", "q_proj", "embed_tokens"]).save_pretrained(
            tmp_path / f"ad{i}")
    res = _run("trace", str(tmp_path / "base"), str(tmp_path / "ad1"), str(tmp_path / "ad2"), "--json", "--no-plots")
    assert res.exit_code == 0, res.output
    head = next(m for m in json.loads(res.stdout)["matrices"] if m["name"].startswith("lm_head"))
    f = load_file(str(tmp_path / "ad2" / "adapter_model.safetensors"))
    D = 2.0 * next(v for k, v in f.items() if "lm_head.lora_B" in k).double() @ next(v for k, v in f.items() if "lm_head.lora_A" in k).double()
    assert head["points"][-1]["rel_norm"] == pytest.approx(float(torch.linalg.norm(D) / torch.linalg.norm(W)), rel=1e-6)
    res = _run("interfere", "--base", str(tmp_path / "base"), str(tmp_path / "ad1"), str(tmp_path / "ad2"), "--json", "--no-plots")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    emb = next(m for m in out["modules"] if "embed_tokens" in m["name"])
    E = {i: load_file(str(tmp_path / f"ad{i}" / "adapter_model.safetensors")) for i in (1, 2)}
    dE = [2.0 * (next(v for k, v in E[i].items() if "embed_tokens.lora_embedding_A" in k).double().T
                 @ next(v for k, v in E[i].items() if "embed_tokens.lora_embedding_B" in k).double().T) for i in (1, 2)]
    cos = float((dE[0] * dE[1]).sum() / (torch.linalg.norm(dE[0]) * torch.linalg.norm(dE[1])))
    assert emb["cosine"][0][1] == pytest.approx(cos, abs=1e-9)  # the embedding's own updates, not the heads'
    assert sum("output head the base ties" in s["reason"] for s in out["skipped"]) == 2
    # a full fine-tune saved untied (its own lm_head) against a LoRA on the tied head: paired in compare
    full = _llama(tie=True)
    with torch.no_grad():
        full.model.embed_tokens.weight.add_(0.01)
    full.config.tie_word_embeddings = False
    full.lm_head.weight = torch.nn.Parameter(full.model.embed_tokens.weight.detach().clone() + 0.02)
    full.save_pretrained(tmp_path / "full")
    res = _run("compare", str(tmp_path / "ad1"), str(tmp_path / "full"), "--base", str(tmp_path / "base"), "--json", "--no-plots")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert "lm_head.weight" not in out["b_only"] and "lm_head.weight" not in out["a_only"]
    head = next(m for m in out["modules"] if m["name"].startswith("lm_head"))
    Wt = load_file(str(tmp_path / "full" / "model.safetensors"))["lm_head.weight"].double()
    assert head["fro_b"] == pytest.approx(float(torch.linalg.norm(Wt - W)), rel=1e-6)


def test_resized_mlm_decoder_pairs_its_rows_like_the_embedding(tmp_path):
    """BERT's cls.predictions.decoder (role unknown by name) holds the vocabulary's rows: with a resized
    vocabulary it pairs its leading rows, as the embedding does (the role-only rule skipped it)."""
    g = torch.Generator().manual_seed(0)
    base = {"bert.embeddings.word_embeddings.weight": torch.randn(100, 16, generator=g),
            "cls.predictions.decoder.weight": torch.randn(100, 16, generator=g),
            "bert.encoder.layer.0.attention.self.query.weight": torch.randn(16, 16, generator=g)}
    tuned = {k: torch.cat([v, torch.randn(10, 16, generator=g)]) if v.shape[0] == 100 else v + 0.1 for k, v in base.items()}
    tuned = {k: v + 0.01 for k, v in tuned.items()}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    import spectra

    res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    dec = next(m for m in res.modules if "decoder" in m.name)
    ref = tuned["cls.predictions.decoder.weight"][:100].double() - base["cls.predictions.decoder.weight"].double()
    assert dec.fro_norm == pytest.approx(float(torch.linalg.norm(ref)), rel=1e-6)


def test_identity_layer_replication_is_accepted_and_a_failed_run_leaves_no_folders(tmp_path):
    from tests.conftest import random_lora

    model = _llama(layers=2)
    model.save_pretrained(tmp_path / "base")
    random_lora(model, 0, r=2, lora_alpha=4, target_modules=["q_proj"], layer_replication=[[0, 2]]).save_pretrained(tmp_path / "ad")
    assert _run("diff", str(tmp_path / "base"), str(tmp_path / "ad")).exit_code == 0
    res = _run("compare", str(tmp_path / "ad"), str(tmp_path / "missing"), "--base", str(tmp_path / "base"),
               "--out", str(tmp_path / "n1" / "n2" / "n3"))
    assert res.exit_code == 1 and not (tmp_path / "n1").exists(), res.output


def test_diff_warns_about_unrelated_checkpoints_and_nproc_without_plan(tmp_path, tiny_pair):
    g = torch.Generator().manual_seed(3)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 16, generator=g) for i in range(3)}
    other = {k: torch.randn(32, 16, generator=g) for k in base}  # an independent initialisation: ‖ΔW‖/‖W‖ ≈ √2
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(other, str(tmp_path / "b.safetensors"))
    res = _run("diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert res.exit_code == 0 and "larger than the base weights themselves" in res.output, res.output
    b, t = tiny_pair  # a genuine small update: no such warning
    res = _run("diff", str(b), str(t))
    assert res.exit_code == 0 and "larger than the base weights" not in res.output, res.output
    res = _run("diff", str(b), str(t), "--nproc", "2")
    assert res.exit_code == 2 and "--nproc goes with --plan" in res.output, res.output


# ---- third probe of this round: run folders, long --layers lists ---------------------------------------
def test_trace_run_folder_takes_the_step_from_trainer_state_and_lists_dangling_links(tmp_path):
    """In a run folder the folder name's step was used over trainer_state.json's global_step (a copied
    checkpoint got another step's loss, with no warning), unlike listed checkpoints; a checkpoint-N link
    to nothing was dropped without a word."""
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    run = tmp_path / "run"
    history = [{"step": s, "loss": 3.0 - s / 1000} for s in (10, 20, 30)]
    for name, step in (("checkpoint-10", 10), ("checkpoint-010", 20), ("checkpoint-30", 30)):
        d = run / name
        d.mkdir(parents=True)
        save_file({k: v + 0.01 * step for k, v in base.items()}, str(d / "model.safetensors"))
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history[: step // 10]}))
    (run / "checkpoint-40").symlink_to(tmp_path / "nowhere")
    res = _run("trace", str(tmp_path / "base.safetensors"), str(run), "--json", "--no-plots")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [(c["step"], c["loss"]) for c in out["checkpoints"]] == [(10, 2.99), (20, 2.98), (30, 2.97)]
    assert any("global_step 20 is used" in w for w in out["warnings"]), out["warnings"]
    (skip,) = out["skipped_checkpoints"]
    assert skip["path"].endswith("checkpoint-40") and "symbolic link" in skip["reason"]


def test_layers_filter_equals_the_plain_rule_and_scales():
    import random

    from spectra.config import parse_layers

    def plain(spec: str, i: int) -> bool:
        for part in spec.split(","):
            lo, dash, hi = part.partition("-")
            if int(lo) <= i and (not dash or not hi or i <= int(hi)) and (dash or i == int(lo)):
                return True
        return False

    rnd = random.Random(0)
    for _ in range(500):
        parts = []
        for _ in range(rnd.randint(1, 6)):
            lo = rnd.randint(0, 30)
            kind = rnd.random()
            parts.append(str(lo) if kind < 0.4 else f"{lo}-" if kind < 0.5 else f"{lo}-{lo + rnd.randint(0, 10)}")
        spec = ",".join(parts)
        keep = parse_layers(spec)
        assert [i for i in range(50) if keep(i)] == [i for i in range(50) if plain(spec, i)], spec
    keep = parse_layers(",".join(str(i) for i in range(0, 20000, 2)))  # a 10,000-layer list (was linear per test)
    assert sum(keep(i) for i in range(20000)) == 10000


def test_inspect_prints_plain_lines_for_very_many_tensors(tmp_path, monkeypatch, tiny_pair):
    """A boxed table of 100k MoE tensors took a minute to lay out: above PLAIN_ROWS rows the listing is
    tab-separated, one line per tensor, the same columns."""
    import spectra_cli.other as other

    base, _ = tiny_pair
    monkeypatch.setattr(other, "PLAIN_ROWS", 2)
    res = _run("inspect", str(base))
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln]
    assert lines[0].split("\t") == ["name", "layer", "expert", "module", "role", "shape", "dtype", "parts", "note"]
    assert len(lines) == 5 and lines[1].split("\t")[:2] == ["model.layers.0.self_attn.q_proj.weight", "0"]


def test_progress_in_a_log_prints_lines_as_it_goes(monkeypatch, tiny_pair):
    """On a log (stderr not a terminal) rich prints a progress display only when it stops, so a long
    run's log stayed empty for its whole length (the demo's 10-minute pretraining under load): the
    progress now also prints its line every LOG_EVERY_S seconds there."""
    import spectra_cli.console as console

    base, tuned = tiny_pair
    monkeypatch.setattr(console, "LOG_EVERY_S", 0.0)
    res = _run("diff", str(base), str(tuned), "--no-plots")
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("ΔW spectra")]
    # one per update, then the final state; before the first, the task's own line may come (0/?: it starts with the run)
    counted = [ln for ln in lines if "0/?" not in ln]
    assert len(counted) >= 3 and "1/4" in counted[0] and all("0/?" in ln for ln in lines[: len(lines) - len(counted)]), lines
