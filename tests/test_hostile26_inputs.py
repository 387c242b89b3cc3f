"""Twenty-sixth round, inputs (docs/bad_inputs.md, "twenty-sixth round"): adapter files of other PEFT tuners, kohya
and MLX given as a model; unmerged adapter layers beside their weights; experts or a decoder pruned in one stack
only; encoder prefixes dropped on both sides; esd's unresolved singular values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import spectra
from spectra.config import DiffConfig
from tests.cli_util import cli
from tests.pair_util import save_folder as _save
from tests.train_util import tiny_llama


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory):
    """A tiny Llama and the weights files of a LoHa and an IA3 adapter made by PEFT, each saving a copy of lm_head."""
    import peft

    root = tmp_path_factory.mktemp("tuners")
    tiny_llama().save_pretrained(root / "base")
    for name, config in (("loha", peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                                   init_weights=False)),
                         ("ia3", peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                                 modules_to_save=["lm_head"], init_ia3_weights=False))):
        torch.manual_seed(0)
        peft.get_peft_model(tiny_llama(), config).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("tuner,stem", [("loha", "hada_"), ("ia3", "ia3_")])
@pytest.mark.parametrize("command", ["diff", "esd", "compare"])
def test_other_peft_tuners_weights_files_are_refused(peft_files, tmp_path, tuner, stem, command):
    """A LoHa (IA3) adapter's weights file given as a model: its saved lm_head copy paired with the base's and its
    whole update was dropped, exit 0 with "1 matrix" analysed (**silent wrong numbers**)."""
    f = str(peft_files / tuner / "adapter_model.safetensors")
    assert any(stem in k for k in spectra.open_checkpoint(f).tensors)  # the adapter holds the tuner's own parameters
    args = {"diff": ["diff", str(peft_files / "base"), f, "--out", str(tmp_path / "o")], "esd": ["esd", f, "--no-plots"],
            "compare": ["compare", f, f, "--base", str(peft_files / "base")]}[command]
    r = cli(args)
    assert r.returncode not in (0, 2) and "Traceback" not in r.stderr, r.stderr
    kind = {"loha": "LoHa", "ia3": "IA3"}[tuner]
    assert f"holds {kind} adapter weights" in r.stderr and "an adapter's weights file, not a model" in r.stderr, r.stderr
    assert ("merge the adapter into its base" if command == "esd" else "merge_and_unload") in r.stderr
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize("names,kind", [
    (["lora_te_model_layers_0_self_attn_q_proj.lora_down.weight", "lora_te_model_layers_0_self_attn_q_proj.lora_up.weight"], "kohya LoRA"),
    (["model.layers.0.self_attn.q_proj.lora_a", "model.layers.0.self_attn.q_proj.lora_b"], "MLX LoRA"),
])
def test_kohya_and_mlx_adapter_files_are_refused(tmp_path, names, kind):
    """kohya's and MLX's LoRA files: diff said "are both checkpoints of the same architecture?", esd fitted the
    factors as weight matrices (exit 0)."""
    g = torch.Generator().manual_seed(0)
    f = _save(tmp_path / "a", {names[0]: torch.randn(4, 32, generator=g), names[1]: torch.randn(32, 4, generator=g)})
    base = _save(tmp_path / "b", {"model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=g)})
    for args in (["diff", str(base), str(f), "--no-plots"], ["esd", str(f), "--no-plots"]):
        r = cli(args)
        assert r.returncode not in (0, 2) and f"holds {kind} factors" in r.stderr, r.stderr
        assert "same architecture" not in r.stderr


def test_lora_factors_beside_their_weights_are_said_not_refused(tmp_path):
    """`q_proj.weight` beside `q_proj.lora_A.weight` (a custom LoRA layer, no base_layer) was told "pass the adapter's
    folder", which does not exist; loralib's bare `q_proj.lora_A` ended in "every ΔW = 0". The review of this round:
    loralib merges the update into `weight` in eval() and keeps the factors, so the names cannot tell merged from
    unmerged: a merged model is analysed (with a warning), an unmerged one has every ΔW = 0 (refused as such)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g)
    A, B = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    base = _save(tmp_path / "b", {"model.layers.0.self_attn.q_proj.weight": w})
    for i, suffix in enumerate(("lora_{}.weight", "lora_{}")):
        factors = {f"model.layers.0.self_attn.q_proj.{suffix.format('A')}": A, f"model.layers.0.self_attn.q_proj.{suffix.format('B')}": B}
        merged = _save(tmp_path / f"m{i}", {"model.layers.0.self_attn.q_proj.weight": w + 2 * B @ A, **factors})
        res = spectra.diff(str(base), str(merged), config=DiffConfig())
        assert res.modules[0].fro_norm == pytest.approx(np.linalg.norm(2 * (B @ A).double().numpy()), rel=1e-6)
        assert any("holds LoRA factors beside its modules' weights (model.layers.0.self_attn.q_proj.weight beside" in w
                   and "loralib merges them in eval()" in w for w in res.warnings), res.warnings
        unmerged = _save(tmp_path / f"u{i}", {"model.layers.0.self_attn.q_proj.weight": w, **factors})
        r = cli(["diff", str(base), str(unmerged), "--no-plots"])
        assert r.returncode not in (0, 2) and "ΔW = 0" in r.stderr and "pass the adapter's folder" not in r.stderr, r.stderr


def _mixtral(pruned_layer: int | None, g: torch.Generator) -> tuple[dict, dict]:
    """Base: 2 layers of 4 near-copies of one FFN (a sparse-upcycled MoE); tuned: the same, fine-tuned by 0.1%, with
    expert 1 of ``pruned_layer`` removed and experts 2, 3 renumbered 1, 2."""
    base, tuned = {}, {}
    for layer in range(2):
        ffn = torch.randn(48, 32, generator=g)
        experts = [ffn + 0.05 * torch.randn(48, 32, generator=g) for _ in range(4)]
        kept = [0, 2, 3] if layer == pruned_layer else [0, 1, 2, 3]
        for e, w in enumerate(experts):
            base[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"] = w
        for new, e in enumerate(kept):
            tuned[f"model.layers.{layer}.block_sparse_moe.experts.{new}.w1.weight"] = experts[e] + 1e-3 * torch.randn(48, 32, generator=g)
    return base, tuned


def test_experts_pruned_in_one_layer_are_said(tmp_path):
    """Expert 1 of layer 0 removed, 2 and 3 renumbered (config unchanged): tuned experts 1, 2 were measured against
    base experts 1, 2 (‖ΔW‖/‖W‖ 0.14 against 0.001 for the rest), reported as the fine-tune's largest change, no note:
    the expert numbers were compared over the whole model (**wrong pairing, unsaid**)."""
    cfg = dict(model_type="mixtral", num_hidden_layers=2, num_local_experts=4)
    base, tuned = _mixtral(0, torch.Generator().manual_seed(0))
    res = spectra.diff(str(_save(tmp_path / "b", base, cfg)), str(_save(tmp_path / "t", tuned, cfg)), config=DiffConfig())
    far = {m.name for m in res.modules if m.rel_norm > 0.05}
    assert far == {f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight" for e in (1, 2)}  # the wrong pairs, measured
    assert any("in layers.0.block_sparse_moe.experts the base holds experts 0–3, tuned experts 0–2: experts pair by their "
               "number" in w for w in res.warnings), res.warnings
    same = spectra.diff(str(tmp_path / "b"), str(_save(tmp_path / "t2", _mixtral(None, torch.Generator().manual_seed(0))[1], cfg)),
                        config=DiffConfig())
    assert not any("pair by their number" in w for w in same.warnings)


def test_a_decoder_pruned_beside_a_whole_encoder_is_said_but_not_one_shard(tmp_path):
    """distil-whisper style: decoder layers 0 and 3 kept and renumbered 0, 1, the encoder whole: no layer note (the
    encoder's numbers hid the decoder's). One shard of a sharded model given alone keeps its layers' numbers: no note."""
    g = torch.Generator().manual_seed(0)
    base = {f"model.{s}.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 16, generator=g) for s in ("encoder", "decoder") for i in range(4)}
    tuned = {k: v + 1e-3 for k, v in base.items() if ".encoder." in k}
    tuned |= {f"model.decoder.layers.{new}.self_attn.q_proj.weight": base[f"model.decoder.layers.{old}.self_attn.q_proj.weight"] + 1e-3
              for new, old in ((0, 0), (1, 3))}
    b = _save(tmp_path / "b", base)
    res = spectra.diff(str(b), str(_save(tmp_path / "t", tuned)), config=DiffConfig())
    assert any("in decoder.layers the base holds layers 0–3, tuned layers 0–1: layers pair by their number" in w
               for w in res.warnings), res.warnings
    shard = _save(tmp_path / "s", tuned, name="model-00001-of-00002.safetensors") / "model-00001-of-00002.safetensors"
    res = spectra.diff(str(b), str(shard), config=DiffConfig())
    assert not any("pair by their number" in w for w in res.warnings)


def test_encoder_prefixes_are_never_dropped_on_both_sides(tmp_path):
    """`vit.` dropped from a base name and `deit.` from a tuned one in the same run: both pairs made (two models
    measured against each other), and the note named one of the two prefixes, "1 matrices"."""
    g = torch.Generator().manual_seed(0)
    base = {"vit.encoder.layer.0.attention.query.weight": torch.randn(16, 16, generator=g),
            "encoder.layer.1.attention.query.weight": torch.randn(16, 16, generator=g),
            "pooler.dense.weight": torch.randn(16, 16, generator=g)}
    tuned = {"encoder.layer.0.attention.query.weight": torch.randn(16, 16, generator=g),
             "deit.encoder.layer.1.attention.query.weight": torch.randn(16, 16, generator=g),
             "pooler.dense.weight": base["pooler.dense.weight"] + 1e-3}
    res = spectra.diff(str(_save(tmp_path / "b", base)), str(_save(tmp_path / "t", tuned)), config=DiffConfig())
    assert [m.name for m in res.modules] == ["pooler.dense.weight"]
    assert not any("paired after dropping" in w for w in res.warnings)
    one = {"distilbert.encoder.layer.0.attention.query.weight": base["vit.encoder.layer.0.attention.query.weight"] + 1e-3}
    res = spectra.diff(str(_save(tmp_path / "b1", {"encoder.layer.0.attention.query.weight": one[next(iter(one))] - 1e-3})),
                       str(_save(tmp_path / "t1", one)), config=DiffConfig())
    assert any("1 matrix paired after dropping 'distilbert'" in w for w in res.warnings), res.warnings


def test_esd_says_which_values_it_could_not_resolve(tmp_path):
    """A rank-100 product stored in float32 at 4096 × 1025 (one column past the 2²² entries esd recomputes by an SVD):
    matrix_rank 100 where numpy's float64 SVD and WeightWatcher say 1025, sv_min 0.0, and no word of it; at 4096 × 1024
    (recomputed) numpy's numbers. `diff --esd` never recomputes: its `unresolved` says how many it counted as 0."""
    rng = np.random.default_rng(0)
    W = {i: (rng.standard_normal((4096, 100)) @ rng.standard_normal((100, i)) * 0.01).astype(np.float32) for i in (1024, 1025)}
    f = _save(tmp_path / "m", {f"model.layers.{k}.mlp.up_proj.weight": torch.from_numpy(W[i]) for k, i in enumerate(W)})
    out = tmp_path / "o"
    r = cli(["esd", str(f), "--no-plots", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    recs = {m["shape"][1]: m for m in json.loads((out / "esd.json").read_text())["matrices"]}
    for i, m in recs.items():
        sv = np.linalg.svd(W[i].astype(np.float64), compute_uv=False)
        tol = sv.max() * 4096 * np.finfo(np.float64).eps
        resolved = sv > sv.max() * np.sqrt(i * np.finfo(np.float64).eps)  # the Gram route's resolution
        if i == 1024:  # recomputed: numpy's rank and smallest value
            # (its other 924 values are float32 rounding: no Marchenko–Pastur bulk, said in the note since round 34)
            assert m["matrix_rank"] == int((sv > tol).sum()) == 1024 and m["unresolved"] == 0 and "Gram route" not in m["note"]
            assert m["sv_min"] == pytest.approx(sv.min(), rel=1e-6)
        else:
            assert m["matrix_rank"] == int(resolved.sum()) == 100 and m["sv_min"] is None
            assert m["unresolved"] == i - 100 and "925 of its 1025 singular values are below the float64 Gram route's resolution" in m["note"]
    # diff --esd of a 512 × 256 rank-100 float32 base: its values below the resolution are counted, and said
    Wb = (rng.standard_normal((512, 100)) @ rng.standard_normal((100, 256)) * 0.1).astype(np.float32)
    Wt = Wb + (1e-2 * rng.standard_normal((512, 256))).astype(np.float32)
    b, t = (_save(tmp_path / n, {"model.layers.0.mlp.up_proj.weight": torch.from_numpy(x)}) for n, x in (("b", Wb), ("t", Wt)))
    res = spectra.diff(str(b), str(t), config=DiffConfig(esd=True))
    esd_base = res.modules[0].esd["base"]
    sv = np.linalg.svd(Wb.astype(np.float64), compute_uv=False)
    assert esd_base["matrix_rank"] == int((sv > sv.max() * np.sqrt(256 * np.finfo(np.float64).eps)).sum()) == 100
    assert esd_base["unresolved"] == 156 and esd_base["sv_min"] is None


def test_an_expert_stacks_own_pair_outranks_the_model_width(tmp_path):
    """muse_spark's experts run at moe_hidden_size (16 here) beside hidden_size 64 = 2·I: the width rule read the
    (E, 2I, H_moe) gate_up stack as (experts, in, out), transposed it and split gate from up along its input features:
    a change of the gate rows only was reported as gate 5.9 and up 6.8 (**silent wrong numbers**). The stack's own
    down_proj (E, H_moe, I) says (out, in)."""
    g = torch.Generator().manual_seed(0)
    E, I, H = 4, 32, 16
    base = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * I, H, generator=g),
            "model.layers.0.mlp.experts.down_proj": torch.randn(E, H, I, generator=g)}
    tuned = dict(base)
    gu = base["model.layers.0.mlp.experts.gate_up_proj"].clone()
    gu[0, :I] += 0.5 * torch.randn(I, 1, generator=g) @ torch.randn(1, H, generator=g)  # expert 0's gate rows only
    tuned["model.layers.0.mlp.experts.gate_up_proj"] = gu
    cfg = {"model_type": "some_moe", "hidden_size": 2 * I, "num_local_experts": E}
    res = spectra.diff(str(_save(tmp_path / "b", base, cfg)), str(_save(tmp_path / "t", tuned, cfg)), config=DiffConfig())
    got = {m.name.rpartition(":")[2]: m.fro_norm for m in res.modules if m.expert == 0 and "gate_up" in m.name}
    d = (gu[0] - base["model.layers.0.mlp.experts.gate_up_proj"][0]).double().numpy()
    assert got["gate"] == pytest.approx(np.linalg.norm(d[:I]), rel=1e-6) and got["up"] == 0.0, got


@pytest.mark.parametrize("model_type,name", [("mpt", "transformer.blocks.0.attn.Wqkv.weight"),
                                             ("modernbert", "model.layers.0.attn.Wqkv.weight")])
def test_plain_wqkv_blocks_are_split(tmp_path, model_type, name):
    """MPT (`chunk(3)`) and ModernBERT (`view(…, 3, -1, head_dim)`) store Wqkv as q, k, v row blocks; it was left
    whole with the note "wqkv uses a grouped layout" (InternLM2's, which stays unsplit)."""
    g = torch.Generator().manual_seed(0)
    d = 32
    W = torch.randn(3 * d, d, generator=g)
    T = W.clone()
    T[d:2 * d] += 0.1 * torch.randn(d, d, generator=g)  # the k rows only
    cfg = {"model_type": model_type, "hidden_size": d, "num_attention_heads": 4}
    res = spectra.diff(str(_save(tmp_path / "b", {name: W}, cfg)), str(_save(tmp_path / "t", {name: T}, cfg)), config=DiffConfig())
    got = {m.name.rpartition(":")[2]: m.fro_norm for m in res.modules}
    ref = (T - W).double().numpy()
    assert set(got) == {"q", "k", "v"} and got["q"] == got["v"] == 0.0, got
    assert got["k"] == pytest.approx(np.linalg.norm(ref[d:2 * d]), rel=1e-6)
    internlm = spectra.diff(str(_save(tmp_path / "bi", {name: W}, cfg | {"model_type": "internlm2"})),
                            str(_save(tmp_path / "ti", {name: T}, cfg | {"model_type": "internlm2"})), config=DiffConfig())
    assert len(internlm.modules) == 1 and "grouped layout" in (internlm.modules[0].note or "")


def test_a_headless_mamba_pairs_with_its_causal_lm(tmp_path):
    """MambaForCausalLM stores `backbone.layers.N…` where MambaModel stores `layers.N…` (and GIT `git.`, CPM-Ant
    `cpmant.`): nothing paired ("no weight matrix of the base pairs …")."""
    g = torch.Generator().manual_seed(0)
    base = {f"backbone.layers.{i}.mixer.in_proj.weight": torch.randn(64, 16, generator=g) for i in range(2)}
    base["lm_head.weight"] = torch.randn(50, 16, generator=g)
    tuned = {k.removeprefix("backbone."): v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items() if k.startswith("backbone.")}
    res = spectra.diff(str(_save(tmp_path / "b", base)), str(_save(tmp_path / "t", tuned)), config=DiffConfig())
    assert sorted(m.name for m in res.modules) == [f"layers.{i}.mixer.in_proj.weight" for i in range(2)]
    for m in res.modules:
        ref = (tuned[m.name] - base["backbone." + m.name]).double().numpy()
        assert m.fro_norm == pytest.approx(np.linalg.norm(ref), rel=1e-6)
    assert any("paired after dropping 'backbone'" in w for w in res.warnings)


def test_factor_names_of_every_kind_and_a_peft_state_dicts_infix(tmp_path):
    """The review: AdaLoRA's file (lora_E beside lora_A/B) was typed "LoRA" and sent to pass its folder (which is then
    refused as AdaLoRA); a LoHa PEFT model's state dict (`q_proj.hada_w1_a.default` beside `q_proj.base_layer.weight`)
    against its base read "every ΔW = 0" where the LoRA one gets the unmerged-PEFT refusal."""
    from spectra.adapter_files import adapter_file, factor_of

    ada = adapter_file(["m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight", "m.q_proj.lora_E"])
    assert ada is not None and ada.kind == "AdaLoRA" and "merge_and_unload" in ada.hint and not ada.unmerged
    assert factor_of("m.q_proj.hada_w1_a.default") == ("LoHa", "m.q_proj")
    assert factor_of("m.q_proj.oft_R.default.weight") == ("OFT", "m.q_proj")
    assert factor_of("m.q_proj.weight") is None and factor_of("m.hra_x.a.b") is None
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g)
    base = _save(tmp_path / "b", {"model.q_proj.weight": w})
    sd = _save(tmp_path / "t", {"model.q_proj.base_layer.weight": w, "model.q_proj.hada_w1_a.default": torch.randn(16, 2, generator=g)})
    r = cli(["diff", str(base), str(sd), "--no-plots"])
    assert r.returncode not in (0, 2) and "state dict of an unmerged PEFT model" in r.stderr and "LoHa factors" in r.stderr, r.stderr


def test_layer_counts_are_compared_across_a_dropped_encoder_prefix_and_a_shards_folder(tmp_path):
    """The review: `vit.encoder.layer` and `encoder.layer` were two stacks, so a tuned ViT of layers 0 and 3 kept (as
    0, 1; config 2 layers) against its 4-layer headless base lost the count note; and a folder holding one shard (no
    index) was not seen as a shard (the label is the folder)."""
    g = torch.Generator().manual_seed(0)
    base = {f"encoder.layer.{i}.attention.query.weight": torch.randn(16, 16, generator=g) for i in range(4)}
    tuned = {f"vit.encoder.layer.{new}.attention.query.weight": base[f"encoder.layer.{old}.attention.query.weight"] + 1e-3
             for new, old in ((0, 0), (1, 3))}
    res = spectra.diff(str(_save(tmp_path / "b", base, {"num_hidden_layers": 4})),
                       str(_save(tmp_path / "t", tuned, {"num_hidden_layers": 2})), config=DiffConfig())
    assert any("the base holds layers 0–3, tuned layers 0–1: layers pair by their number" in w for w in res.warnings), res.warnings
    enc_dec = {f"model.{s}.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 16, generator=g) for s in ("encoder", "decoder") for i in range(4)}
    part = {k: v + 1e-3 for k, v in enc_dec.items() if ".encoder." in k or ".layers.0." in k or ".layers.1." in k}
    b2 = _save(tmp_path / "b2", enc_dec)
    res = spectra.diff(str(b2), str(_save(tmp_path / "s2", part, name="model-00001-of-00002.safetensors")), config=DiffConfig())
    assert not any("pair by their number" in w for w in res.warnings), res.warnings
