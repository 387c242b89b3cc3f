"""Hostile and odd inputs, forty-sixth round (docs/bad_inputs.md)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import spectra

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _gpt2_lora(path, *, r: int, dora: bool = False):
    """A tiny GPT-2 and a LoRA of r on its fused c_attn (Conv1D, split by diff into q, k, v), B random."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32))
    model.save_pretrained(path / "base")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn"], fan_in_fan_out=True,
                                                      use_dora=dora))
    with torch.no_grad():
        for n, w in lora.named_parameters():
            if "lora_B" in n:
                w.normal_()
    lora.save_pretrained(path / "ad")
    return lora


def test_recommend_gives_a_fused_lora_module_no_more_than_its_adapter_r(tmp_path):
    """A GPT-2 LoRA of r = 4 on c_attn, diffed (split into q, k, v, each of rank 4): recommend gave c_attn 12, the sum
    of its parts' ranks, where one s·B·A has at most 4 directions (and diff --no-split measures 4)."""
    from spectra.recommend import recommend

    _gpt2_lora(tmp_path, r=4)
    res = spectra.diff(str(tmp_path / "base"), str(tmp_path / "ad"), out_dir=str(tmp_path / "d"), plots=False)
    assert len(res.modules) == 6 and all(m.energy_rank["0.9"] >= 2 for m in res.modules)  # every part carries the update
    whole = spectra.diff(str(tmp_path / "base"), str(tmp_path / "ad"), out_dir=str(tmp_path / "w"), plots=False,
                         config=spectra.DiffConfig(split_fused=False))
    rec = recommend(tmp_path / "d")
    wanted = {m.name.removesuffix(".weight"): m.energy_rank["0.9"] for m in whole.modules}
    assert set(rec.ranks) == set(wanted)
    for path, r in rec.ranks.items():
        assert wanted[path] <= r <= 4  # an upper bound of the whole's τ rank, and at most the adapter's r
    assert any("or the adapter's r, where smaller" in n for n in rec.notes)


def test_recommend_leaves_a_dora_fused_module_at_its_parts_sum(tmp_path):
    """DoRA's update is dense (the magnitude rescales W too): its r bounds nothing, so the parts' sum stays."""
    from spectra.recommend import recommend

    lora = _gpt2_lora(tmp_path, r=2, dora=True)
    with torch.no_grad():
        for n, w in lora.named_parameters():
            if "magnitude" in n:
                w.mul_(torch.linspace(0.5, 1.5, w.numel()).reshape(w.shape))
    lora.save_pretrained(tmp_path / "ad")
    res = spectra.diff(str(tmp_path / "base"), str(tmp_path / "ad"), out_dir=str(tmp_path / "d"), plots=False)
    rec = recommend(tmp_path / "d")
    parts: dict[str, int] = {}
    for m in res.modules:
        path = m.name.split(":")[0].removesuffix(".weight")
        parts[path] = parts.get(path, 0) + m.energy_rank["0.9"]
    assert rec.ranks == {p: min(r, 64) for p, r in parts.items()} and max(rec.ranks.values()) > 2
    assert np.all(np.array(list(rec.ranks.values())) > 2)


# ---- the Python API (a probe of the public functions with hostile arrays) --------------------------------
def test_batch_singular_values_scale_each_matrix_by_its_own_power_of_two():
    """A 1e-170 matrix stacked beside a normal one got σ = 0 (the batch's largest entry set the scale); float32
    lost 1.8% of σ₃ of a 1e-22 matrix the same way."""
    from spectra.linalg import singular_values

    X = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = np.linalg.svd(X.numpy(), compute_uv=False)
    got = singular_values(torch.stack([X * 1e-170, X]))
    np.testing.assert_allclose(got[0], ref * 1e-170, rtol=1e-12)
    np.testing.assert_allclose(got[1], ref, rtol=1e-12)
    got32 = singular_values(torch.stack([X.float() * 1e-22, X.float()]), dtype=torch.float32)
    np.testing.assert_allclose(got32[0] / 1e-22, ref, rtol=1e-5)


def test_numpy_views_with_negative_strides_or_other_byte_order_are_read():
    """eigh's vectors reversed (V[:, ::-1]) and big-endian arrays failed with torch's error naming no argument."""
    from spectra import subspaces
    from spectra.linalg import singular_values

    G = np.random.default_rng(0).standard_normal((6, 6))
    _, V = np.linalg.eigh(G @ G.T)
    Q = V[:, ::-1][:, :2]
    assert subspaces.phi(Q, np.ascontiguousarray(Q), 2, 2) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(singular_values(np.eye(3)[::-1]), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(singular_values(np.diag([3.0, 2.0]).astype(">f8")), [3.0, 2.0])


def test_masked_arrays_are_refused_not_read_under_their_mask():
    """energy_rank of [3, 1, 1] with the last masked gave 2, counting the masked value (numpy drops the mask)."""
    from spectra.linalg import singular_values
    from spectra.metrics import energy_rank

    with pytest.raises(ValueError, match="masked array"):
        energy_rank(np.ma.array([3.0, 1.0, 1.0], mask=[0, 0, 1]), 0.9)
    with pytest.raises(ValueError, match="masked array"):
        singular_values(np.ma.array(np.eye(3), mask=np.eye(3)))


def test_factored_triplets_keep_factors_float32_cannot_hold():
    """A LoRA of scale 1e81 gave ±inf factors, one of 1e-90 rebuilt its update 45% off (cast to float32 always), while the
    dense routes keep a float64 ΔW's factors in float64."""
    from spectra.lowrank import dense_triplets, factored_triplets

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    for s in (1e40, 1e-45):
        t = factored_triplets(B * s, A * s, 1.0, 2)
        D = (B @ A) * s * s
        assert t.B.dtype == torch.float64 and bool(torch.isfinite(t.B).all())
        assert float((t.B @ t.A - D).norm() / D.norm()) < 1e-13
    d = dense_triplets(B @ A, 2)
    assert d.B.dtype == torch.float64
    t = factored_triplets(B.float(), A.float(), 1.0, 2)  # float32 factors in range stay float32
    assert t.B.dtype == torch.float32
    assert float((t.B.double() @ t.A.double() - B.float().double() @ A.float().double()).norm() / (B @ A).norm()) < 1e-6


def test_esd_helpers_refuse_what_is_no_spectrum_and_name_their_arguments():
    """matrix_rank counted NaN as nothing, a negative value as a singular value, a 3×3 array as 9 values; a float16 array
    clipped −λ_max to 0 as "rounding"; NaN levels were ignored; λ near 1e308 blamed a thresh nobody passed."""
    from spectra import esd, lowrank, metrics

    for bad in ([float("nan"), 1.0], [-5.0, 1.0], np.ones((3, 3)), ["3", "1"]):
        with pytest.raises(ValueError, match="svals"):
            esd.matrix_rank(bad, 3)
    with pytest.raises(ValueError, match="evals must be eigenvalues"):
        esd.as_eigenvalues(np.array([-1.0] + [1.0] * 15, dtype=np.float16))
    assert esd.as_eigenvalues(np.array([-1e-4, 1.0], dtype=np.float16)).tolist() == [0.0, 1.0]  # its storage rounding
    with pytest.raises(ValueError, match="1-D"):
        esd.as_eigenvalues(np.ones((2, 2)))
    with pytest.raises(ValueError, match="beyond float64's range"):
        esd.esd_metrics(np.array([1e308, 1e308, 1.0, 1.0]), (4, 8))
    with pytest.raises(ValueError, match="rounding"):
        esd.esd_metrics(np.arange(1.0, 5.0), (4, 4), rounding=float("nan"))
    with pytest.raises(ValueError, match="zero_at"):
        esd.mp_bulk_fit(np.arange(1.0, 9.0), (8, 8), zero_at=float("nan"))
    with pytest.raises(ValueError, match="resolution"):
        metrics.signal_rank(np.array([10.0, 1, 1, 1]), (4, 4), resolution=float("nan"))
    with pytest.raises(ValueError, match="a must be > 0"):
        metrics.log10_power_sum(np.array([0.0, 2.0]), -1.0)
    with pytest.raises(ValueError, match="total"):
        lowrank.energy_rank_top(np.array([3.0, 1.0]), float("nan"), 0.9)
    with pytest.raises(ValueError, match="total"):
        lowrank.energy_kept(np.array([3.0, 1.0]), 5.0, 2)
    with pytest.raises(ValueError, match="fro"):
        metrics.relative_norm("1", 1.0)
    assert lowrank.energy_kept(np.array([3.0, 1.0]), 10.0 * (1 - 1e-9), 2) == 1.0  # a total's rounding is no other total


def test_a_turn_between_subspaces_of_unequal_size_names_both_sizes():
    """A turn from a 3-direction to a 4-direction subspace reported only k = 3: read as "both sides used 3 vectors", φ
    differs (‖Q₃ᵀQ₄‖²/3 against ‖Q₃ᵀQ₃'‖²/3). Both sizes are now recorded."""
    from spectra.interference import Subspaces, subspace_turn

    g = torch.Generator().manual_seed(0)
    a = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))[0]
    turn = subspace_turn(Subspaces(a, a), Subspaces(b, b))["left"]
    assert (turn["k"], turn["k_before"], turn["k_now"]) == (3, 3, 4)
    assert turn["phi"] == pytest.approx(float(np.sum((a.numpy().T @ b.numpy()) ** 2)) / 3, rel=1e-12)


# ---- reports, sweeps and demo folders (a probe of the files spectra reads back) ----------------------------
def _train_run(d, lines):
    import json

    d.mkdir(parents=True, exist_ok=True)
    (d / "train_config.json").write_text(json.dumps({"steps": 3, "held_out_digest": "aaaa"}))
    (d / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d


def test_report_draws_a_run_whose_target_loss_went_null_and_refuses_a_loss_at_float64s_end(tmp_path):
    """spectra train logs a null target loss beside a finite source one when only the target diverges: the learning plot
    annotated (source, None) and raised from matplotlib; a source loss of 1.7e308 broke the figure's axis."""
    from spectra.errors import ResultsFormatError
    from spectra.report import build_report

    d = _train_run(tmp_path / "t", [{"step": 0, "target_loss": 5.5, "source_loss": 5.6},
                                    {"step": 3, "train_loss": 5.52, "target_loss": None, "source_loss": 5.7},
                                    {"step": 3, "target_loss": None, "source_loss": None, "error": "the held-out target loss became inf"}])
    assert "Learning vs forgetting" in build_report([str(d)])
    e = _train_run(tmp_path / "e", [{"step": 0, "target_loss": 5.5, "source_loss": 1.7e308}])
    with pytest.raises(ResultsFormatError, match="source_loss must be a number from 0 to 1e300"):
        build_report([str(e)])


@pytest.mark.parametrize("edit,message", [
    (lambda recs, r: r.update(matrix="q_proj"), '"matrix" must be an object with a string "name"'),
    (lambda recs, r: r.update(point=None), '"point" must be an object'),
    (lambda recs, r: r.update(step="two"), '"step" must be an integer >= 0'),
    (lambda recs, r: r.update(step=2.5), '"step" must be an integer >= 0'),
    (lambda recs, r: r.pop("step"), '"step" must be an integer >= 0'),
    (lambda recs, r: r["matrix"].pop("name"), '"matrix" must be an object with a string "name"'),
    (lambda recs, r: recs[0]["header"].update(config=None), "the header's \"config\" must be an object"),
    (lambda recs, r: recs.append({"timing": {"step": {"a": 1}}}), "a timing's \"step\" must be an integer >= 0"),
])
def test_a_tracker_trace_with_a_malformed_record_is_refused_in_one_line(tmp_path, edit, message):
    """One malformed record of a trace.jsonl raised TypeError, KeyError, ValueError or AttributeError from load_trace
    (and spectra report); a step of 2.5 was read as step 2."""
    import json

    from spectra.errors import ResultsFormatError
    from spectra.trace import load_trace

    recs = [{"header": {"kind": "full", "config": {"thresholds": [0.9]}}},
            {"kind": "full", "step": 2, "loss": 1.0, "matrix": {"name": "w", "module": "w", "shape": [4, 4], "base_fro_norm": 1.0},
             "point": {"fro_norm": 0.1, "rel_norm": 0.1, "energy_rank": {"0.9": 1}}},
            {"timing": {"step": 2, "seconds": 0.1, "device": "cpu"}}]
    edit(recs, recs[1])
    (tmp_path / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ResultsFormatError, match=re.escape(message)) as info:
        load_trace(tmp_path / "trace.jsonl")
    assert "trace.jsonl" in str(info.value) and "spectra train --trace-every" in info.value.hint


def test_a_refused_tracker_trace_names_the_training_that_wrote_it_not_spectra_trace(tmp_path):
    """"rerun spectra trace --out to rewrite it" was the hint for a tracker's trace.jsonl, which spectra trace cannot write."""
    from spectra.results_check import damaged_hint

    assert "spectra train --trace-every" in damaged_hint(tmp_path / "trace.jsonl")
    assert "spectra trace --out" in damaged_hint(tmp_path / "trace.json")


def test_report_of_a_demo_folder_reads_each_run_once(tmp_path):
    """A demo's folder holds each run's log in checkpoints/<run> (its cache) and runs/<run>: the report showed every
    fine-tune twice, where the demo's own report.html leaves checkpoints/ out."""
    from spectra.report import collect
    from spectra.training_inputs import DEMO_MARK

    lines = [{"step": 0, "target_loss": 5.5, "source_loss": 5.6}, {"step": 3, "target_loss": 5.0, "source_loss": 5.7}]
    for where in ("checkpoints", "runs"):
        _train_run(tmp_path / "demo" / where / "lora8", lines)
    _train_run(tmp_path / "demo" / "checkpoints" / "base-1ecc", lines)
    (tmp_path / "demo" / DEMO_MARK).write_text("made by spectra demo (training)\n")
    assert list(collect([str(tmp_path / "demo")]).train_logs) == ["lora8"]
    # a folder that is no demo's keeps its checkpoints/ runs
    (tmp_path / "demo" / DEMO_MARK).unlink()
    assert len(collect([str(tmp_path / "demo")]).train_logs) == 3


def test_report_follows_linked_result_folders_once_and_says_what_it_cannot_read(tmp_path, monkeypatch):
    """A results folder linked in (results/run1 -> /data/...) was skipped without a word ("no spectra results found"
    for a folder of links); an unreadable folder inside was skipped unsaid, and one given directly was "no results"."""
    import os

    from spectra.errors import SpectraError
    from spectra.report import build_report, collect

    lines = [{"step": 0, "target_loss": 5.5, "source_loss": 5.6}]
    _train_run(tmp_path / "data" / "run1", lines)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "run1").symlink_to(tmp_path / "data" / "run1", target_is_directory=True)
    (tmp_path / "links" / "loop").symlink_to(tmp_path / "links", target_is_directory=True)  # a loop ends
    assert list(collect([str(tmp_path / "links")]).train_logs) == ["run1"]

    _train_run(tmp_path / "data" / "locked", lines)
    real = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    html = build_report([str(tmp_path / "data")])
    assert "locked: cannot read the folder (Permission denied)" in html
    with pytest.raises(SpectraError, match=r"cannot read the folder \(Permission denied\)"):
        collect([str(tmp_path / "data" / "locked")])


def test_sweep_resume_redoes_an_analysis_stopped_between_its_json_and_its_figures(tmp_path):
    """A compare killed after compare.json, before its figures: --resume counted it done (no figures ever drawn) and
    its dead run's .spectra.lock stayed. A lock left beside a finished JSON marks the run as stopped."""
    import json

    from spectra.io.files import LOCK_NAME
    from spectra.training_inputs import analysis_written

    (tmp_path / "compare.json").write_text(json.dumps({"schema": "spectra.compare/1"}))
    assert analysis_written(tmp_path / "compare.json")
    (tmp_path / LOCK_NAME).write_text('{"pid": 999999}')
    assert not analysis_written(tmp_path / "compare.json")


def test_a_demo_of_another_kind_is_refused_in_a_demo_folder(tmp_path):
    """demo --synthetic into a training demo's folder wrote its diff beside the earlier analyses (summary.md and
    report.html then described neither), and the reverse left a synthetic results.json at the top."""
    from spectra.errors import ConfigError
    from spectra.training_inputs import DEMO_MARK, claim_demo_folder

    claim_demo_folder(tmp_path / "a", "training")
    assert "(training)" in (tmp_path / "a" / DEMO_MARK).read_text()
    with pytest.raises(ConfigError, match="holds a training demo's results"):
        claim_demo_folder(tmp_path / "a", "synthetic")
    claim_demo_folder(tmp_path / "a", "training")  # its own reruns go on
    (tmp_path / "b").mkdir()  # a mark written before it named the kind: read from what lies there
    (tmp_path / "b" / DEMO_MARK).write_text("made by spectra demo: its reruns replace the files in this folder\n")
    claim_demo_folder(tmp_path / "b", "synthetic")  # nothing tells (a run stopped early): either kind goes on
    (tmp_path / "b" / DEMO_MARK).write_text("made by spectra demo: its reruns replace the files in this folder\n")
    (tmp_path / "b" / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a synthetic demo's results"):
        claim_demo_folder(tmp_path / "b", "training")


# ---- hostile checkpoint files (a probe of the loaders) -------------------------------------------------------
def test_a_pickled_tensor_attribute_cannot_shadow_the_layout_check(tmp_path):
    """torch.load(weights_only=True) sets a tensor's pickled attributes: numel = complex made numel() 0j == 0, so a
    4-byte storage passed as a 30000² matrix (8.8 GB, then a segfault in esd); every method is now the class's own."""
    from spectra.errors import CheckpointFormatError
    from spectra.io.torchfile import read_state_dict

    big = torch.ones(1).expand(3000, 3000)
    big.numel = complex
    torch.save({"model.layers.0.self_attn.q_proj.weight": big}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match=r"strides \(0, 0\) claims 36000000 bytes from a 4-byte storage"):
        read_state_dict(tmp_path / "pytorch_model.bin")
    p = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    p.numel = complex  # a plain weight with an attribute still reads, as itself
    torch.save({"w": p}, tmp_path / "ok.bin")
    t = read_state_dict(tmp_path / "ok.bin").tensors["w"]
    assert type(t) is torch.Tensor and t.numel() == 6 and torch.equal(t, torch.arange(6.0).reshape(2, 3))


def test_overlapping_views_under_many_names_are_refused(tmp_path):
    """An adapter_model.bin of 1000 overlapping windows of one 4 MB storage took 4.2 GB as each was copied out; tied
    weights (one tensor under several names) and a fused matrix's views still read."""
    from spectra.errors import CheckpointFormatError
    from spectra.io.torchfile import read_state_dict

    store = torch.randn(200 * 200 + 300)
    torch.save({f"junk{k}.weight": store[k : k + 200 * 200].view(200, 200) for k in range(300)}, tmp_path / "bad.bin")
    with pytest.raises(CheckpointFormatError, match="overlapping views of the same bytes under many names"):
        read_state_dict(tmp_path / "bad.bin")
    emb, qkv = torch.randn(50, 8), torch.randn(24, 8)
    torch.save({"embed.weight": emb, "lm_head.weight": emb, "shared.weight": emb, "q": qkv[:8], "k": qkv[8:16], "v": qkv[16:]},
               tmp_path / "ok.bin")
    state = read_state_dict(tmp_path / "ok.bin")
    assert torch.equal(state.tensors["lm_head.weight"], emb) and torch.equal(state.tensors["v"], qkv[16:])


def test_a_cuda_storage_class_does_not_skip_the_record_size_check(tmp_path):
    """A zip .bin naming torch.cuda.FloatStorage (allowed, loaded on the CPU) skipped the record check: the mapped load
    read past a 64-byte record into the zip's headers and the next tensor, and diff reported ‖ΔW‖ = 1.2e33, exit 0."""
    import collections
    import io
    import pickle
    import zipfile

    from spectra.errors import CheckpointFormatError
    from spectra.io.torchfile import read_state_dict

    class Ref:
        def __init__(self, key, numel):
            self.key, self.numel = key, numel

    class T:
        def __init__(self, ref, size):
            self.args = (ref, 0, size, (size[1], 1), False, collections.OrderedDict())

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args)

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.cuda.FloatStorage, obj.key, "cpu", obj.numel) if isinstance(obj, Ref) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(collections.OrderedDict(q=T(Ref("0", 48), (12, 4)), k=T(Ref("1", 16), (4, 4))))
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as w:
        w.writestr("archive/data.pkl", buf.getvalue())
        w.writestr("archive/byteorder", "little")
        w.writestr("archive/data/0", torch.arange(16, dtype=torch.float32).numpy().tobytes())  # 64 bytes of the 192 claimed
        w.writestr("archive/data/1", torch.full((16,), 7.0).numpy().tobytes())
        w.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointFormatError, match="storage record archive/data/0 holds 64 bytes where its tensor needs 192"):
        read_state_dict(tmp_path / "pytorch_model.bin")


def test_a_lower_case_peft_type_is_refused_as_peft_refuses_it(tmp_path):
    """"peft_type": "lora" was read as LoRA, where PEFT raises KeyError 'lora': numbers for an adapter PEFT cannot load."""
    import json

    from spectra.errors import CheckpointFormatError
    from spectra.io.adapter import AdapterConfig

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q"]}))
    with pytest.raises(CheckpointFormatError, match="PEFT cannot load it") as info:
        AdapterConfig.from_file(tmp_path / "adapter_config.json")
    assert 'write "peft_type": "LORA"' in info.value.hint


def test_extract_keeps_a_lora_bias_adapters_biases_on_modules_without_a_bias(tmp_path):
    """A LoRA trained with lora_bias=True on a Llama (no biases): extract -e 1.0 --save-modules wrote lora_bias false and
    dropped the biases ("PEFT's lora_bias needs a bias on every adapted module", which PEFT does not need to run it):
    half the fine-tune's effect on the logits lost, energy_kept 1.0. The extracted adapter now runs as the input does."""
    import json

    from tests.cli_util import cli

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "ad")
    res = cli(["extract", str(tmp_path / "base"), str(tmp_path / "ad"), "-e", "1.0", "--save-modules", "-o", str(tmp_path / "x")])
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["lora_bias"] is True
    ids = torch.arange(12)[None]

    def logits(adapter):
        m = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64), adapter)
        return m(ids).logits.detach()

    want, got = logits(tmp_path / "ad"), logits(tmp_path / "x")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64)(ids).logits.detach()
    assert float((want - base).norm()) > 0.1 and float((got - want).norm()) < 1e-5 * float((want - base).norm())
