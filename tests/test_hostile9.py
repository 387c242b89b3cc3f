"""The outside probe's ninth round: inputs that made spectra report numbers for the wrong rows.

Each test fails on the code before the round (ec739b7) and passes now; references are float64
numpy on the stored tensors, split the way the model's own transformers code splits them.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from families_util import fro_by_name, save_perturbed_pair


def test_codegen_qkv_proj_is_four_blocks_of_q_v_k(tmp_path):
    """CodeGen views qkv_proj(x) as (4, 3·local) and splits each block as query, value, key
    (modeling_codegen: ``qkv.view(..., -1, 3 * local_dim).split(local_dim)``); it was cut as three
    row blocks q, k, v, so a q-only update showed up in k and v."""
    import transformers as T

    torch.manual_seed(0)
    model = T.CodeGenForCausalLM(T.CodeGenConfig(vocab_size=64, n_positions=32, n_ctx=32, n_embd=64, n_layer=1,
                                                 n_head=4, rotary_dim=8))
    base, tuned, b, t = save_perturbed_pair(tmp_path, model, "codegen")
    fro = fro_by_name(base, tuned)
    name = "transformer.h.0.attn.qkv_proj.weight"
    blocks = (t[name] - b[name]).numpy().reshape(4, 3, 16, 64)  # (mp_num, [q, v, k], local, in)
    ref = {"q": blocks[:, 0], "v": blocks[:, 1], "k": blocks[:, 2]}
    for part, M in ref.items():
        assert fro[f"{name}:{part}"] == pytest.approx(np.linalg.norm(M.reshape(64, 64)), rel=1e-6), part


def test_codegen_q_only_update_leaves_k_and_v_unchanged(tmp_path):
    """The same layout seen from a planted update: only the query rows move, k and v stay at 0."""
    import transformers as T

    import spectra

    torch.manual_seed(0)
    model = T.CodeGenForCausalLM(T.CodeGenConfig(vocab_size=64, n_positions=32, n_ctx=32, n_embd=64, n_layer=1,
                                                 n_head=4, rotary_dim=8))
    base, tuned = tmp_path / "b", tmp_path / "t"
    model.save_pretrained(base)
    with torch.no_grad():
        w = model.transformer.h[0].attn.qkv_proj.weight.view(4, 48, 64)
        w[:, :16] += 0.05 * torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(3))
    model.save_pretrained(tuned)
    fro = {m.name: m.fro_norm for m in spectra.diff(str(base), str(tuned)).modules}
    name = "transformer.h.0.attn.qkv_proj.weight"
    assert fro[f"{name}:q"] > 0.1
    assert fro[f"{name}:k"] == 0 and fro[f"{name}:v"] == 0


def test_minimax_linear_attention_qkv_proj_is_per_head(tmp_path):
    """MiniMax's linear-attention layers reshape qkv_proj(x) to (heads, 3·head_dim) and split q, k, v
    per head; with grouped kv heads elsewhere it was cut as blocks "assuming q has `in` rows"."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.MiniMaxConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=64, num_local_experts=2,
                          num_experts_per_tok=1, max_position_embeddings=32)
    model = T.MiniMaxForCausalLM(cfg)
    base, tuned, b, t = save_perturbed_pair(tmp_path, model, "minimax")
    fro = fro_by_name(base, tuned)
    layer = cfg.layer_types.index("linear_attention")
    name = f"model.layers.{layer}.self_attn.qkv_proj.weight"
    per_head = (t[name] - b[name]).numpy().reshape(4, 3, 16, 64)
    for i, part in enumerate("qkv"):
        assert fro[f"{name}:{part}"] == pytest.approx(np.linalg.norm(per_head[:, i].reshape(64, 64)), rel=1e-6), part


def test_qkv_proj_of_an_unknown_model_type_says_what_was_assumed():
    """A qkv_proj of a model type spectra does not know is split as Phi-3's blocks, with a note."""
    from spectra.naming import ArchInfo, describe_checkpoint

    shapes = {"model.layers.0.attn.qkv_proj.weight": (192, 64)}
    cfg = {"model_type": "newmodel", "num_attention_heads": 4, "hidden_size": 64}
    spec = describe_checkpoint(shapes, ArchInfo.from_config(cfg))["model.layers.0.attn.qkv_proj.weight"]
    assert [p.suffix for p in spec.parts] == ["q", "k", "v"]
    assert "newmodel" in spec.note and "Phi-3" in spec.note
    phi3 = describe_checkpoint(shapes, ArchInfo.from_config({**cfg, "model_type": "phi3"}))["model.layers.0.attn.qkv_proj.weight"]
    assert phi3.note == ""


# ---- the Python API called directly (a notebook's view) ----------------------------------------------
def _X(seed: int = 0, shape=(8, 6)) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e200])
def test_singular_values_and_norm_of_float64_beyond_squaring_range(scale):
    """float64 values near 1e±200 square out of range: singular_values gave zeros (1e-200) or was off by
    4e-5 (1e-160); fro_norm gave inf or 0. Both now scale by a power of two."""
    from spectra.linalg import fro_norm, singular_values

    X = _X()
    ref = np.linalg.svd(X.numpy(), compute_uv=False)
    assert np.allclose(singular_values(X * scale) / scale, ref, rtol=1e-12)
    assert fro_norm(X * scale) / scale == pytest.approx(np.linalg.norm(X.numpy()), rel=1e-12)


def test_effective_rank_of_huge_values():
    from spectra.metrics import effective_rank

    assert effective_rank(np.array([1e308, 1e308])) == pytest.approx(2.0)


def test_subspace_measures_refuse_values_beyond_squaring_range():
    """captured_energy gave all zeros, amplification 0, top_svd S = 0 for values near 1e-200: refused now
    (compare skips such matrices); cosine_matrix (scale-free) measures them."""
    from spectra.interference import cosine_matrix
    from spectra.singular_bases import top_svd
    from spectra.subspaces import amplification, captured_energy, top_subspace

    X, W = _X(0), _X(1)
    UL, VL = top_subspace(W, 2, "left"), top_subspace(W, 2, "right")
    for call in (lambda: captured_energy(X * 1e-200, UL, VL), lambda: top_svd(X * 1e-200, 2),
                 lambda: amplification(X * 1e-200, W * 1e-200, 2, generator=torch.Generator().manual_seed(0)),
                 lambda: amplification(X, W * 1e-200, 2, generator=torch.Generator().manual_seed(0))):
        with pytest.raises(ValueError, match="outside float64's range"):
            call()
    a, b = X.numpy().ravel(), W.numpy().ravel()
    ref = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    for s in (1.0, 1e-200, 1e200):
        assert cosine_matrix([X * s, W * s])[0, 1] == pytest.approx(ref, rel=1e-12)
    e = captured_energy(X, UL, VL)
    assert all(0.0 <= v <= 1.0 for v in (e.two_sided, e.left, e.right, e.best_rank_r))


def test_complex_input_is_refused_not_cast():
    """A complex matrix lost its imaginary part ([1, 1, 1] for (1+1j)·I, whose values are √2)."""
    from spectra.engine import exact_spectra
    from spectra.interference import cosine_matrix
    from spectra.linalg import singular_values
    from spectra.sketch import randomized_svd

    Z = torch.eye(3, dtype=torch.complex64) * (1 + 1j)
    for call in (lambda: singular_values(Z), lambda: exact_spectra([Z]), lambda: randomized_svd(Z, 1),
                 lambda: cosine_matrix([Z, Z])):
        with pytest.raises(ValueError, match="real"):
            call()


def test_numpy_and_requires_grad_inputs_are_accepted():
    from spectra.engine import exact_spectra, factored_svd
    from spectra.linalg import singular_values
    from spectra.sketch import randomized_svd

    X = _X(shape=(40, 30))
    ref = np.linalg.svd(X.numpy(), compute_uv=False)
    for M in (X.numpy(), X.clone().requires_grad_()):
        assert np.allclose(singular_values(M), ref)
        assert np.allclose(exact_spectra([M], backend="torch", device="cpu").S[0], ref)
        assert np.allclose(randomized_svd(M, 2, generator=torch.Generator().manual_seed(0)).S, ref[:2], rtol=0.05)
    B, A = np.ones((3, 1)), np.ones((1, 2))
    assert float(factored_svd(B, A)[1][0]) == pytest.approx(np.sqrt(6))
    with pytest.raises(ValueError, match="one r"):
        factored_svd(torch.randn(5, 2), torch.randn(3, 4))


def test_negative_ranks_and_nonfinite_totals_are_refused():
    """energy_kept(S, total, -1) kept all but the last value (0.9286); a NaN total gave 1.0, and an
    overflowed one (σ near 1e200) 1.0 for 0.643; factored_triplets(k=-1) returned 3 of 4 factors."""
    from spectra.lowrank import energy_kept, factored_triplets

    S = np.array([3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="r must be"):
        energy_kept(S, 14.0, -1)
    for total in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            energy_kept(S, total, 1)
    assert energy_kept(S, 14.0, 1) == pytest.approx(9 / 14)
    with pytest.raises(ValueError, match="k must be"):
        factored_triplets(torch.randn(5, 4), torch.randn(4, 6), 2.0, -1)


def test_negative_singular_values_are_refused_by_interference():
    """as_factored64 dropped a triplet of S = −2 as "no direction": flat_inner(f, f) 1.0 for 5.0."""
    from spectra.interference import as_factored64
    from spectra.subspaces import Factored

    U, _, Vh = torch.linalg.svd(_X(), full_matrices=False)
    with pytest.raises(ValueError, match="non-negative"):
        as_factored64(Factored(U[:, :2], torch.tensor([-2.0, 1.0], dtype=torch.float64), Vh[:2]))


def test_randomized_svd_certificate_of_tiny_float64_and_huge_float32():
    """At 1e-300 the residual underflowed to 0: a false certificate of exactness; float32 at 1e36
    raised LinAlgError. Both are scaled by a power of two now."""
    from spectra.sketch import randomized_svd

    X = _X(1, (200, 100))
    one = randomized_svd(X, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tiny = randomized_svd(X * 1e-300, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert np.allclose(tiny.residual / 1e-300, one.residual, rtol=1e-9) and tiny.residual.min() > 0
    big = randomized_svd((X * 1e36).float(), 10, generator=torch.Generator().manual_seed(0))
    assert np.allclose(big.S / 1e36, np.linalg.svd(X.numpy(), compute_uv=False)[:10], rtol=0.02)
    for bad in (dict(n_iter=-1), dict(oversample=-2)):
        with pytest.raises(ValueError):
            randomized_svd(X, 10, **bad)


@pytest.mark.parametrize("tau", [0.0, -0.5, 2.0, float("nan")])
def test_tau_outside_unit_interval_is_refused_everywhere(tau):
    """approx_energy_ranks(M, [0]) gave rank 1, energy_rank_bounds(tau=2) p, random_energy_rank(2.0) p."""
    from spectra.metrics import energy_rank
    from spectra.randmat import random_energy_rank
    from spectra.sketch import approx_energy_ranks, energy_rank_bounds

    for call in (lambda: energy_rank(np.array([3.0, 1.0]), tau), lambda: random_energy_rank((10, 10), tau),
                 lambda: approx_energy_ranks(_X(), [tau]), lambda: energy_rank_bounds(np.array([3.0, 2.0]), 14.0, 1.0, tau, 4)):
        with pytest.raises(ValueError, match="in \\(0, 1\\]"):
            call()


def test_config_fields_of_the_wrong_type_are_refused():
    """DiffConfig(split_fused="no") kept splitting (a truthy string), top_k=2.5 and seed=2.5 were taken,
    CompareConfig(epsilons=(1.5,)) failed deep inside compare; read_workers=0 blamed max_batch."""
    import spectra
    from spectra.errors import ConfigError

    for kw, msg in [(dict(split_fused="no"), "split_fused must be True or False"), (dict(top_k=2.5), "top_k must be an integer"),
                    (dict(seed=2.5), "seed must be an integer"), (dict(approx="yes"), "approx must be True or False"),
                    (dict(approx_above=-5), "approx_above must be >= 1"), (dict(max_batch_bytes=-1), "max_batch_bytes"),
                    (dict(read_workers=0), "read_workers must be >= 1")]:
        with pytest.raises(ConfigError, match=msg):
            spectra.DiffConfig(**kw)
    for kw, msg in [(dict(epsilons=(1.5,)), "epsilons must each be in"), (dict(epsilons=(float("nan"),)), "epsilons"),
                    (dict(top_k=2.5), "top_k must be an integer")]:
        with pytest.raises(ConfigError, match=msg):
            spectra.CompareConfig(**kw)
    assert spectra.DiffConfig(thresholds=[0.9, 0.5]).thresholds == (0.5, 0.9)  # a list is still fine


def test_compare_takes_opened_checkpoints_and_zero_updates_have_rank_zero(tmp_path):
    """compare(open_checkpoint(...)) said "no such file" (it called str() on it); a zero_update side
    reported rank 64 (now 0: it has no direction)."""
    from safetensors.torch import save_file

    import spectra

    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(32, 32, generator=g) for i in range(2)}
    dA = {k: 0.1 * torch.randn(32, 32, generator=g) for k in W}
    dB = {k: (0 * v if "layers.1" in k else 0.1 * torch.randn(32, 32, generator=g)) for k, v in W.items()}
    for name, d in (("base", None), ("a", dA), ("b", dB)):
        save_file({k: (v + d[k] if d else v).contiguous() for k, v in W.items()}, str(tmp_path / f"{name}.safetensors"))
    paths = {n: str(tmp_path / f"{n}.safetensors") for n in ("base", "a", "b")}
    cfg = spectra.CompareConfig(top_k=4)
    by_path = spectra.compare(paths["a"], paths["b"], base=paths["base"], config=cfg, plots=False)
    opened = spectra.compare(*(spectra.open_checkpoint(paths[n]) for n in ("a", "b")),
                             base=spectra.open_checkpoint(paths["base"]), config=cfg, plots=False)
    one, two = by_path.to_dict(), opened.to_dict()
    one.pop("elapsed_s"), two.pop("elapsed_s")
    assert one == two
    zero = next(m for m in by_path.modules if m.status == "zero_update")
    assert (zero.rank_a, zero.rank_b) == (4, 0) and zero.note is None


# ---- labels and layouts of other architectures ---------------------------------------------------
def test_matrices_of_one_layer_never_share_a_label(tmp_path):
    """CTRL's h.N.ffn.0 (up) and h.N.ffn.2 (down) were both module "ffn" of layer N: the heatmap cell
    showed the median of their ranks (3.0 for ranks 1 and 5), a value of neither matrix. Indices that
    tell two matrices of a layer apart are kept in their labels now."""
    from safetensors.torch import save_file

    import spectra

    g = torch.Generator().manual_seed(0)
    base = {f"transformer.h.{i}.ffn.{j}.weight": torch.randn(*shape, generator=g)
            for i in range(2) for j, shape in ((0, (48, 32)), (2, (32, 48)))}
    u = lambda r, m, n: torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)  # noqa: E731
    tuned = {k: v + (u(1, *v.shape) if ".ffn.0." in k else u(5, *v.shape)) for k, v in base.items()}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    got = {(m.layer, m.module): m.fro_norm for m in res.modules}
    ref = {(i, f"ffn.{j}"): float(np.linalg.norm((tuned[k] - base[k]).double().numpy()))
           for i in range(2) for j in (0, 2) for k in [f"transformer.h.{i}.ffn.{j}.weight"]}
    assert got.keys() == ref.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in ref.items())


def test_label_collisions_of_other_layouts():
    """XLM's attentions.N / ffns.N had no layer (all layers one label); LongCat's self_attn.0/1 and
    Swin's blocks inside a stage shared labels; T5's sub-layer index stays out of its labels."""
    from spectra.naming import describe_checkpoint

    sh = {f"attentions.{i}.q_lin.weight": (8, 8) for i in range(3)}
    sh |= {f"model.layers.0.self_attn.{j}.q_b_proj.weight": (8, 8) for j in range(2)}
    sh |= {f"encoder.layers.{s}.blocks.{b}.attention.self.query.weight": (8, 8) for s in range(2) for b in range(2)}
    sh |= {"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8), "encoder.block.0.layer.1.EncDecAttention.q.weight": (8, 8)}
    got = {n: (sp.layer, sp.module) for n, sp in describe_checkpoint(sh).items()}
    assert [got[f"attentions.{i}.q_lin.weight"] for i in range(3)] == [(0, "q_lin"), (1, "q_lin"), (2, "q_lin")]
    assert got["model.layers.0.self_attn.0.q_b_proj.weight"] != got["model.layers.0.self_attn.1.q_b_proj.weight"]
    assert len({got[n] for n in sh if ".blocks." in n}) == 4
    assert got["encoder.block.0.layer.0.SelfAttention.q.weight"] == (0, "SelfAttention.q")
    assert len(set(got.values())) == len(got)


def test_phi4_multimodal_audio_gate_up_holds_up_first():
    """Phi4MultimodalAudioMLP: ``up_states, gate = gate_up_proj(x).chunk(2)``; the first half was
    labelled gate. The language model's MLP (gate first) is unchanged."""
    from spectra.naming import ArchInfo, describe_checkpoint

    audio = "model.embed_tokens_extend.audio_embed.encoder.encoders.1.feed_forward_in.gate_up_proj.weight"
    text = "model.layers.0.mlp.gate_up_proj.weight"
    specs = describe_checkpoint({audio: (96, 32), text: (128, 64)}, ArchInfo.from_config(
        {"model_type": "phi4_multimodal", "hidden_size": 64, "num_attention_heads": 4}))
    a = {p.suffix: p.rows for p in specs[audio].parts}
    t = {p.suffix: p.rows for p in specs[text].parts}
    assert torch.equal(a["up"], torch.arange(48)) and torch.equal(a["gate"], torch.arange(48, 96))
    assert torch.equal(t["gate"], torch.arange(64)) and torch.equal(t["up"], torch.arange(64, 128))


def test_dbrx_row_stacked_experts_and_decision_transformer_conv1d():
    """DBRX's ffn.experts.mlp.w1 (experts x ffn, d) was a "gate" matrix with no word that it stacks
    every expert (rank 4 for four rank-1 experts); decision_transformer's Conv1D c_attn was read
    (out, in) and left unsplit with a wrong note."""
    from spectra.naming import ArchInfo, describe_checkpoint

    name = "transformer.blocks.1.ffn.experts.mlp.w1"
    spec = describe_checkpoint({name: (384, 64)}, ArchInfo.from_config({"model_type": "dbrx", "d_model": 64}))[name]
    assert spec.role is None and "analysed as one matrix" in spec.note
    c_attn = "encoder.h.0.attn.c_attn.weight"
    dt = describe_checkpoint({c_attn: (128, 384)}, ArchInfo.from_config({"model_type": "decision_transformer", "n_embd": 128,
                                                                         "n_head": 1}))[c_attn]
    assert dt.transpose and [p.suffix for p in dt.parts] == ["q", "k", "v"]


def test_a_head_only_the_base_stores_is_named(tmp_path):
    """Base untied (lm_head stored), tuned tied (no head): the head's update was not measured and the
    run said "identical" without a word about the head."""
    from safetensors.torch import save_file

    from spectra import open_checkpoint
    from spectra.pairing import pair_checkpoints

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 16, generator=g)
    save_file({"model.embed_tokens.weight": emb, "lm_head.weight": emb + 1}, str(tmp_path / "b.safetensors"))
    save_file({"model.embed_tokens.weight": emb.clone()}, str(tmp_path / "t.safetensors"))
    pairing = pair_checkpoints(open_checkpoint(str(tmp_path / "b.safetensors")), open_checkpoint(str(tmp_path / "t.safetensors")),
                               tied_head=True)
    assert any("lm_head.weight" in n and "not measured" in n for n in pairing.notes)


# ---- outputs: CSV cells, resumed journals, exit codes ------------------------------------------------
def _tiny_pair(tmp_path, names, *, nan=False):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    b = {n: torch.randn(16, 16, generator=g) for n in names}
    t = {n: (torch.full_like(v, float("nan")) if nan else v + 0.1 * torch.randn(16, 16, generator=g)) for n, v in b.items()}
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(t, str(tmp_path / "t.safetensors"))
    return str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")


def _cli(*args):
    from click.testing import CliRunner

    from spectra_cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_csv_cells_with_a_carriage_return_stay_one_row(tmp_path):
    """A CR in a tensor name was written unquoted: Python's csv reader (and pandas) split the row, and a
    fragment read as a real matrix name. Control characters are escaped now; a leading ' is always the
    formula mark (a name starting with ' gets one more), so stripping one gives the name back."""
    import csv

    names = ["\rmodel.layers.0.self_attn.q_proj.weight", "model.layers.1.x\ry.weight", "=x.weight", "'=x.weight",
             "model.layers.2.\x1b[31mred.weight"]
    b, t = _tiny_pair(tmp_path, names)
    assert _cli("diff", b, t, "--out", tmp_path / "d", "--no-plots").exit_code == 0
    with open(tmp_path / "d" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(names)
    got = {r["name"] for r in rows}
    assert got == {"\\rmodel.layers.0.self_attn.q_proj.weight", "model.layers.1.x\\ry.weight", "'=x.weight", "''=x.weight",
                   "model.layers.2.\\x1b[31mred.weight"}
    assert not any("\x1b" in v or "\r" in v for r in rows for v in r.values())


def _journal_edit(path, key, edit):
    """Edit the first record holding ``key``; a sealed record (esd, trace …) is sealed again, as a hand edit that
    knew the rule would, so that the record's own checks are what refuses it (an unsealed edit is refused first)."""
    import json

    from spectra.journal import RecordJournal

    lines = [json.loads(x) for x in path.read_text().splitlines()]
    i = next(i for i, r in enumerate(lines) if key in r)
    edit(lines[i][key])
    if "seal" in lines[i]:  # diff's fingerprint is in results.json; the other commands' on the journal's first line
        journal = RecordJournal(path)
        journal.fingerprint = (lines[0].get("fingerprint") if "fingerprint" in lines[0] else
                               json.loads((path.parent / "results.json").read_text())["fingerprint"])
        lines[i] = journal.sealed({k: v for k, v in lines[i].items() if k != "seal"})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.update(name="model.layers.7.self_attn.FAKE_proj.weight"), "which this run does not analyse"),
    (lambda m: m.update(shape="x"), "shape must be"),
    (lambda m: m["energy_rank"].update({"0.9": 999}), "impossible"),
    (lambda m: m["energy_rank"].update({"0.5": 3, "0.9": 1}), "do not fall as τ rises"),
    (lambda m: m.update(fro_norm=99.0), "their squares sum to more|σ₁ is at most|rel_norm"),
])
def test_diff_resume_refuses_an_edited_journal_before_writing(tmp_path, edit, msg):
    """--resume took journal records in as they were: a foreign name crashed (KeyError) and emptied
    results.json, a wrong type crashed after rewriting it, impossible or contradictory numbers were
    written with complete: true. Each is refused now, before anything is written."""
    import json

    names = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in "qv"]
    b, t = _tiny_pair(tmp_path, names)
    out = tmp_path / "d"
    assert _cli("diff", b, t, "--out", out, "--no-plots").exit_code == 0
    _journal_edit(out / "results.jsonl", "module", edit)
    doc = json.loads((out / "results.json").read_text())
    doc["complete"] = False
    (out / "results.json").write_text(json.dumps(doc))
    before = (out / "results.json").read_text()
    r = _cli("diff", b, t, "--out", out, "--no-plots", "--resume")
    assert r.exit_code == 1 and re.search(msg, r.output) and "results.jsonl" in r.output, r.output
    assert (out / "results.json").read_text() == before


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.update(name="model.layers.7.self_attn.FAKE_proj.weight"), "which this run does not analyse"),
    (lambda m: m.update(alpha="high"), "alpha must be a number"),
    (lambda m: m.update(shape="x"), "shape must be"),
])
def test_esd_resume_refuses_an_edited_journal(tmp_path, edit, msg):
    """esd --resume kept a foreign record in esd.json (rc 0) and crashed on a string alpha or shape."""
    names = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in "qv"]
    b, _ = _tiny_pair(tmp_path, names)
    out = tmp_path / "e"
    assert _cli("esd", b, "--out", out, "--no-plots").exit_code == 0
    _journal_edit(out / "esd.jsonl", "matrix", edit)
    r = _cli("esd", b, "--out", out, "--no-plots", "--resume")
    assert r.exit_code == 1 and re.search(msg, r.output) and "Traceback" not in r.output, r.output


def test_trace_resume_refuses_a_point_of_the_wrong_type(tmp_path):
    """trace --resume wrote a point with step "one" into trace.json (rc 0); report then failed on it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    base = {n: torch.randn(16, 16, generator=g) for n in names}
    save_file(base, str(tmp_path / "b.safetensors"))
    paths = []
    for k in (1, 2):
        save_file({n: v + 0.05 * k * torch.randn(16, 16, generator=g) for n, v in base.items()}, str(tmp_path / f"c{k}.safetensors"))
        paths.append(tmp_path / f"c{k}.safetensors")
    out = tmp_path / "tr"
    assert _cli("trace", tmp_path / "b.safetensors", *paths, "--out", out, "--no-plots").exit_code == 0
    _journal_edit(out / "trace_journal.jsonl", "matrix", lambda m: m.update(points=[{"step": "one"}]))
    r = _cli("trace", tmp_path / "b.safetensors", *paths, "--out", out, "--no-plots", "--resume")
    assert r.exit_code == 1 and "step must be an integer" in r.output, r.output


def test_diff_and_esd_fail_when_no_matrix_could_be_analysed(tmp_path):
    """Every tuned weight NaN: diff and esd printed an empty table and exited 0 (compare, interfere and
    extract exit 1 for the same inputs)."""
    names = [f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkv"]
    b, t = _tiny_pair(tmp_path, names, nan=True)
    for args in (("diff", b, t), ("esd", t)):
        r = _cli(*args)
        assert r.exit_code == 1 and "no matrix could be analysed" in r.output, r.output


def test_output_error_hint_fits_the_cause(tmp_path):
    """A read-only --out was told to "free disk space" and that "diff --resume continues" (for every command)."""
    import errno

    from spectra.errors import output_error

    denied = str(output_error(tmp_path, OSError(errno.EPERM, "Operation not permitted")))
    full = str(output_error(tmp_path, OSError(errno.ENOSPC, "No space left on device")))
    assert "permissions" in denied and "disk space" not in denied
    assert "free disk space" in full and "permissions" not in full


def test_esd_figure_says_how_many_panels_it_shows():
    """esd_plots.png showed 12 of 21 matrices without a word."""
    from spectra.plots.esd import esd_loglog

    rec = {"name": "m", "module": "m", "eigenvalues": [float(x) for x in range(1, 40)], "alpha": 2.0, "xmin": 5.0,
           "mp_bulk_max": 10.0}
    fig = esd_loglog([dict(rec, name=f"m{i}") for i in range(21)])
    assert "12 of 21" in fig._suptitle.get_text()


def test_an_ascii_terminal_gets_escapes_not_a_traceback(tmp_path):
    """With stdout in ASCII (a C locale with PYTHONIOENCODING=ascii; Windows cp1252 consoles lack Δ too)
    the table's ΔW and ‖ raised UnicodeEncodeError after the run: exit 1 with a traceback."""
    import os
    import subprocess
    import sys

    b, t = _tiny_pair(tmp_path, [f"model.layers.0.self_attn.{m}_proj.weight" for m in "qv"])
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    proc = subprocess.run([sys.executable, "-m", "spectra", "diff", b, t], capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode("ascii", "replace")[-2000:]
    assert b"\\u0394W" in proc.stdout and b"Traceback" not in proc.stderr


def test_real_trace_results_pass_their_own_checks(tmp_path):
    """The trace-point check of this round refused every real trace (singular_values is a list,
    turn_prev nests objects): report, --report and --resume all failed. The shipped demo run and a
    fresh trace both load."""
    from pathlib import Path

    from spectra.report_trace import doc_from_jsonl

    doc = doc_from_jsonl(Path(__file__).resolve().parent.parent / "reports" / "demo" / "runs" / "full" / "trace.jsonl")
    assert doc["matrices"] and all("singular_values" in p for p in doc["matrices"][0]["points"])


def test_energy_rank_at_tau_one_may_sit_below_a_rank_near_one():
    """At τ = 1 the rank is the numerical rank, which can be below the cumulative-sum rank at
    τ = 1 − 1e-12: a genuine result with both was refused as "ranks fall as τ rises"."""
    from spectra.results_check import check_document

    m = {"name": "w", "module": "w", "shape": [8, 8], "fro_norm": 1.0, "spectral_norm": 1.0, "stable_rank": 1.0,
         "energy_rank": {"0.999999999999": 3, "1.0": 1}, "random_energy_rank": {"0.999999999999": 8, "1.0": 8},
         "singular_values": [1.0, 1e-9, 1e-9]}
    check_document({"schema": "spectra.diff/1", "tuned": "t", "thresholds": [0.999999999999, 1.0], "modules": [m]}, None)


def test_config_accepts_what_the_api_took_before():
    """Whole floats for counts, numpy bools, 0/1, and an integer --budget were refused by the new type check."""
    import numpy as np

    import spectra
    from spectra.extract_plan import ExtractConfig

    spectra.DiffConfig(max_batch_bytes=2e9, split_fused=np.True_, approx=0)
    ExtractConfig(budget=1200000)


@pytest.mark.parametrize("delta", [3e-9, -3e-9, 3e-10, -3e-10])
def test_approx_bounds_hold_for_float64_updates_near_tau(delta):
    """--approx rounded a float64 ΔW to float32 before its sketch and its exact fallback, then claimed
    [23, 23] where the rank is 22 (energy 3e-9 of τ·total past the threshold): 35 of 120 planted cases
    excluded the truth. The exact fallback now uses the matrix as given and the bounds widen by the cast."""
    import math

    from spectra.metrics import energy_rank
    from spectra.sketch import approx_energy_ranks

    tau, t, k = 0.5, 0.5 * (1 + delta), 23
    s = np.concatenate([np.linspace(1.0, 0.8, k), np.linspace(0.74, 0.56, 64 - k)])  # a gap after the k-th value
    Ek, R = math.fsum(s[:k] ** 2), math.fsum(s[k:] ** 2)
    s[k:] *= math.sqrt(Ek * (1 - t) / (t * R))  # the tail scaled so that E_k − τ·T = δ·τ·T (δ ≫ 1e-16)
    assert s[k] < s[k - 1]
    truth = k if delta > 0 else k + 1
    assert energy_rank(np.sort(s)[::-1], tau) == truth
    for shape in ((64, 64), (64, 4096)):
        M = torch.zeros(shape, dtype=torch.float64)
        M[range(64), range(64)] = torch.from_numpy(s)
        r = approx_energy_ranks(M, [tau], generator=torch.Generator().manual_seed(0)).ranks[tau]
        assert r.lo <= truth <= r.hi, (shape, r)


# ---- the command line's options and outputs ----------------------------------------------------------
def _fused_pair(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    b = {"model.layers.0.self_attn.qkv_proj.weight": torch.randn(48, 16, generator=g),
         "model.layers.0.self_attn.o_proj.weight": torch.randn(16, 16, generator=g)}
    t = {k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in b.items()}
    (tmp_path / "config.json").write_text('{"model_type": "phi3", "num_attention_heads": 4, "hidden_size": 16}')
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(t, str(tmp_path / "t.safetensors"))
    return str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")


def test_filters_match_a_fused_matrix_by_its_stored_name(tmp_path):
    """--include 'weight$' dropped every q/k/v part silently (their names end in ':q'); the stored name
    `spectra inspect` lists ('qkv_proj\\.weight$') matched nothing, and --exclude of it excluded nothing."""
    import spectra

    b, t = _fused_pair(tmp_path)
    names = lambda **kw: sorted(m.name.rsplit(".", 1)[-1] for m in spectra.diff(b, t, config=spectra.DiffConfig(**kw)).modules)  # noqa: E731
    assert names(include="weight$") == ["weight", "weight:k", "weight:q", "weight:v"]
    assert names(include=r"qkv_proj\.weight$") == ["weight:k", "weight:q", "weight:v"]
    assert names(exclude=r"qkv_proj\.weight$") == ["weight"]
    assert names(include=r"weight:q$") == ["weight:q"]


def test_single_file_outputs_never_replace_other_files(tmp_path):
    """report -o model.safetensors replaced the weights with HTML (exit 0); report -o results.jsonl
    replaced a journal; recommend -o could replace any file, and printed before writing (a closed
    stdout cost the file)."""
    b, t = _fused_pair(tmp_path)
    assert _cli("diff", b, t, "--out", tmp_path / "d", "--no-plots").exit_code == 0
    weights = (tmp_path / "b.safetensors").read_bytes()
    for target in (tmp_path / "b.safetensors", tmp_path / "d" / "results.jsonl", tmp_path / "d" / "results.csv"):
        before = target.read_bytes()
        r = _cli("report", tmp_path / "d", "-o", target)
        assert r.exit_code == 1 and "exists and is not a file this command writes" in r.output, r.output
        assert target.read_bytes() == before
    r = _cli("recommend", tmp_path / "d", "-o", tmp_path / "d" / "diff_config.json")
    assert r.exit_code == 1 and "exists" in r.output
    assert (tmp_path / "b.safetensors").read_bytes() == weights
    assert _cli("report", tmp_path / "d", "-o", tmp_path / "r.html").exit_code == 0
    assert _cli("report", tmp_path / "d", "-o", tmp_path / "r.html").exit_code == 0  # its own kind: replaced
    assert _cli("recommend", tmp_path / "d", "-o", tmp_path / "cfg.json").exit_code == 0


def test_a_full_stdout_is_one_line_not_a_traceback(tmp_path):
    """>/dev/full gave an OSError traceback; `spectra --version >&-` an AttributeError."""
    import os
    import subprocess
    import sys

    b, t = _fused_pair(tmp_path)
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "spectra", "diff", b, t], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=300)
        assert proc.returncode == 1 and "cannot write the output" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "spectra", "--version"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=120, close_fds=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
