"""Sixteenth round of the outside probe (docs/bad_inputs.md, "sixteenth round")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra.errors import CheckpointFormatError, ConfigError
from spectra.esd import esd_metrics, power_law_fit, spectral_entropy
from tests.pair_util import small_pair


def _run(*args: str):
    from click.testing import CliRunner

    from spectra_cli.main import main

    return CliRunner().invoke(main, list(args))


def _rank_deficient(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((300, 90)) @ rng.standard_normal((90, 100))


def _entropy64(lam: np.ndarray, rank: int) -> float:
    """WeightWatcher's matrix entropy in float64, written out: p = λ/Σλ + 1e-10, −Σ p ln p / ln(rank + 1e-10)."""
    p = lam / lam.sum() + 1e-10
    return float(-np.sum(p * np.log(p)) / np.log(rank + 1e-10))


def test_esd_of_eigvalsh_eigenvalues_clips_the_rounding_negatives_of_a_rank_deficient_gram():
    """np.linalg.eigvalsh(WᵀW) of a rank-90 W returns a few λ ≈ −1e-11: the entropy was −0.171 (sqrt of a
    negative made the rank tolerance NaN) and log_alpha_norm was dropped; they are clipped to 0 now."""
    W = _rank_deficient()
    lam = np.linalg.eigvalsh(W.T @ W)
    assert lam.min() < 0  # the premise: rounding negatives
    m = esd_metrics(lam, W.shape)
    clipped = np.clip(lam, 0.0, None)
    assert m.entropy == pytest.approx(_entropy64(clipped, m.matrix_rank), abs=1e-12)
    assert 0.0 < m.entropy <= 1.0
    assert m.alpha is not None
    assert m.log_alpha_norm == pytest.approx(np.log10(np.sum(clipped ** m.alpha)), rel=1e-12)
    # the same matrix from its singular values: the fit is the same
    m_svd = esd_metrics(np.linalg.svd(W, compute_uv=False) ** 2, W.shape)
    assert m.alpha == pytest.approx(m_svd.alpha, rel=1e-9)


@pytest.mark.parametrize("bad, match", [
    (np.r_[np.linspace(1.0, 50.0, 119), np.nan], "finite"),
    (np.r_[np.linspace(1.0, 50.0, 119), np.inf], "finite"),
    (np.r_[np.linspace(1.0, 50.0, 119), -1.0], "non-negative"),
    (np.linspace(1.0, 50.0, 120) + 1e-3j, "complex"),
])
def test_esd_refuses_eigenvalues_that_are_no_eigenvalues_of_a_gram_matrix(bad, match):
    """A NaN among 120 eigenvalues gave status 'success', norm nan and rank 0; −1.0 was dropped silently;
    a complex array lost its imaginary part."""
    for f in (lambda x: esd_metrics(x, (300, 120)), power_law_fit, lambda x: spectral_entropy(x, 300)):
        with pytest.raises(ValueError, match=match):
            f(bad)


def test_esd_and_metrics_take_tensors_that_need_grad_or_are_bfloat16():
    """energy_rank on a requires_grad tensor raised "Can't call numpy() on Tensor that requires grad", on a
    bfloat16 one "unsupported ScalarType BFloat16"; both are read as their values now."""
    from spectra.metrics import energy_rank

    S = torch.tensor([3.0, 1.0, 1.0])
    expected = energy_rank(S.numpy(), 0.9)
    assert energy_rank(S.clone().requires_grad_(True), 0.9) == expected
    assert energy_rank(S.bfloat16(), 0.9) == expected
    lam = torch.linspace(1.0, 30.0, 40, dtype=torch.float64)
    assert power_law_fit(lam.clone().requires_grad_(True)).alpha == power_law_fit(lam.numpy()).alpha


def test_meta_tensors_are_refused_by_name_not_returned_as_meta_results():
    """top_subspace and Factored.from_lora returned meta tensors; singular_values, phi and the metrics raised
    torch's "Tensor.item() cannot be called on meta tensors"."""
    from spectra.linalg import singular_values
    from spectra.metrics import energy_rank
    from spectra.subspaces import Factored, top_subspace

    M = torch.empty(6, 4, device="meta")
    for call in (lambda: top_subspace(M, 2), lambda: singular_values(M), lambda: energy_rank(torch.empty(3, device="meta"), 0.9),
                 lambda: Factored.from_lora(torch.empty(6, 2, device="meta"), torch.empty(2, 4, device="meta"))):
        with pytest.raises(ValueError, match="meta device"):
            call()


def test_cosine_matrix_refuses_nan_which_it_reserves_for_a_zero_update():
    from spectra.interference import cosine_matrix

    a = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        cosine_matrix([a, b])
    C = cosine_matrix([a, torch.zeros(4, 3)])
    assert np.isnan(C[0, 1])  # a zero update keeps its NaN


@pytest.mark.parametrize("what", ["state_dict", "module"])
def test_the_python_api_given_a_state_dict_or_module_says_to_save_it(tmp_path, what):
    """spectra.diff(sd_a, sd_b) raised the builtin TypeError "expected str, bytes or os.PathLike object, not dict";
    trace(base, [sd]) read the dict's keys as checkpoint paths."""
    lin = torch.nn.Linear(8, 8)
    a = lin.state_dict() if what == "state_dict" else lin
    b = {k: v + 0.01 for k, v in lin.state_dict().items()} if what == "state_dict" else lin
    from spectra.esd_run import esd
    from spectra.extract import extract
    from spectra.interfere import interfere
    from spectra.trace import trace

    out = str(Path(tmp_path) / "out")
    for call in (lambda: spectra.diff(a, b), lambda: spectra.compare(a, b), lambda: spectra.open_checkpoint(a),
                 lambda: esd(a), lambda: extract(a, b, out), lambda: interfere(a, [b, b]), lambda: trace(a, [b])):
        with pytest.raises(ConfigError, match="by its path") as err:
            call()
        assert ("save_file" in str(err.value)) if what == "state_dict" else ("save_pretrained" in str(err.value))


def _adapter(root: Path, kind: str) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    W = {"model.layers.0.self_attn.q_proj.weight": torch.randn(48, 48, generator=g),
         "model.layers.0.self_attn.v_proj.weight": torch.randn(24, 48, generator=g)}
    save_file(W, str(root / "base.safetensors"))
    sd = {}
    for k, w in W.items():
        m = "base_model.model." + k.removesuffix(".weight")
        A, B = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g)
        if kind == "swapped":
            sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"] = B, A
        else:
            sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"] = B.T.contiguous(), A.T.contiguous()
    (root / kind).mkdir()
    (root / kind / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))
    save_file(sd, str(root / kind / "adapter_model.safetensors"))
    return str(root / "base.safetensors"), str(root / kind)


@pytest.mark.parametrize("kind, match", [("swapped", "the two look exchanged"), ("transposed", "factors look transposed")])
def test_lora_factors_in_the_wrong_orientation_are_named_as_such(tmp_path, kind, match):
    """lora_A and lora_B exchanged read "adapter_config.json gives … rank 4 but its factors have rank 48 (the
    config was edited)"; each stored transposed read "trained on a different base model"."""
    base, adapter = _adapter(tmp_path, kind)
    with pytest.raises(CheckpointFormatError, match=match):
        spectra.diff(base, adapter)


def test_a_complex_tensor_is_not_called_quantised(tmp_path):
    W = torch.randn(8, 6, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    torch.save({"l.0.q_proj.weight": W}, tmp_path / "a.pt")
    torch.save({"l.0.q_proj.weight": W + 1}, tmp_path / "b.pt")
    from spectra.errors import PairingError

    with pytest.raises(PairingError, match="complex64 is not a float weight") as err:
        spectra.diff(str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
    assert "not a real-valued weight" in str(err.value) and "quantised" not in str(err.value)


def test_trace_given_one_run_folder_as_a_string_reads_the_folder_not_its_characters(tmp_path):
    """trace(base, "runs/x") iterated the string: "r: no such file or folder"."""
    from spectra.errors import CheckpointNotFoundError
    from spectra.trace import trace

    with pytest.raises(CheckpointNotFoundError, match="nonexistent_run"):
        trace(str(tmp_path / "base"), str(tmp_path / "nonexistent_run"))


def test_the_budget_allocation_spends_what_the_greedy_prefix_leaves():
    """extract --budget 600 spent 512 parameters (the greedy stopped at the first 192×64 component that did
    not fit) while an 80-parameter component of a 16×64 module still fitted: 0.426 kept against 0.446."""
    import itertools

    from spectra.allocation import allocate_budget

    gains = [np.array([10, 9.9, 9.8, 9.7, 9.6]), np.array([40.0, 5, 4]), np.array([3, 2.9, 2.8, 2.7]), np.array([25.0, 24, 2])]
    costs = [128, 256, 80, 256]

    def brute(budget):
        best = 0.0
        for ranks in itertools.product(*[range(len(g) + 1) for g in gains]):
            if sum(r * c for r, c in zip(ranks, costs)) <= budget:
                best = max(best, sum(float(g[:r].sum()) for g, r in zip(gains, ranks)))
        return best

    prefix = allocate_budget(gains, costs, 600, fill=False)
    a = allocate_budget(gains, costs, 600)
    assert prefix.params == 512 and a.params == 592 and a.filled == 80 and a.ranks[2] == 1
    assert a.kept == pytest.approx(prefix.kept + 3.0) == pytest.approx(brute(600))
    assert a.bound == prefix.bound and a.ratio == prefix.ratio and a.critical == prefix.critical
    # never worse than the prefix, never above the fractional bound, within the budget
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(2, 5))
        gs = [np.sort(rng.random(int(rng.integers(1, 5))) ** 2)[::-1] for _ in range(n)]
        cs = [int(c) for c in rng.integers(1, 40, n)]
        budget = int(rng.integers(1, sum(len(g) * c for g, c in zip(gs, cs)) + 2))
        p, f = allocate_budget(gs, cs, budget, fill=False), allocate_budget(gs, cs, budget)
        assert p.kept <= f.kept + 1e-12 <= f.bound + 2e-12
        assert f.params == sum(r * c for r, c in zip(f.ranks, cs)) <= budget
        assert f.kept == pytest.approx(sum(float(g[:r].sum()) for g, r in zip(gs, f.ranks)))


def _frozen_and_moved(root: Path) -> tuple[str, str]:
    """Five 32×32 down_proj: three frozen, two moved by 3·‖W‖ along one direction; a 64×64 and a 1×64 q_proj moved a little."""
    torch.manual_seed(0)
    b, t = {}, {}
    for i in range(5):
        n = f"model.layers.{i}.mlp.down_proj.weight"
        W = torch.randn(32, 32) * 0.05
        u, v = (torch.linalg.qr(torch.randn(32, 32))[0][:, :1] for _ in range(2))
        b[n], t[n] = W, (W.clone() if i < 3 else W + 3 * W.norm() * u @ v.T)
    for i, shape in enumerate([(64, 64), (1, 64)]):
        n = f"model.layers.{i}.self_attn.q_proj.weight"
        b[n] = torch.randn(*shape) * 0.05
        t[n] = b[n] + 0.01 * torch.randn(*shape)
    save_file(b, str(root / "b.safetensors"))
    save_file(t, str(root / "t.safetensors"))
    return str(root / "b.safetensors"), str(root / "t.safetensors")


def test_diff_findings_table_and_warning_speak_of_the_same_changed_matrices(tmp_path):
    """With three frozen matrices the size finding said "a median 161%" (changed matrices) while the "larger than the
    base" warning, over every matrix, stayed silent (median 0.199); the table read down_proj rank 0, size 0 although
    two of its five moved by 300%; p of 64 and 1 read 32; the headline put three medians of different matrices in one
    sentence ("needs 1 of its p = 32 directions (0.27 of p)")."""
    from spectra.findings import count_text, diff_findings

    res = spectra.diff(*_frozen_and_moved(tmp_path))
    rel = [m.rel_norm for m in res.modules if m.fro_norm]
    found = {f.topic: f for f in diff_findings(res) if f.topic != "zero"}
    assert found["size"].numbers["median_rel_norm"] == pytest.approx(float(np.median(rel)))
    assert found["unrelated"].numbers["median_rel_norm"] == pytest.approx(float(np.median(rel)))
    assert float(np.median(rel)) > 1
    rows = {r["module"]: r for r in res.summary_records()}
    down = rows["down_proj"]
    assert (down["count"], down["changed"]) == (5, 2) and count_text(down) == "2 of 5"
    assert down["rel_norm"] == pytest.approx(3.0, rel=1e-5) and down["energy_rank"] == 1
    assert rows["q_proj"]["p"] == 32.5 and count_text(rows["q_proj"]) == "2"
    text = found["rank"].text
    assert "p from 1 to 64" in text and "of its p = " not in text



# ---- layouts and MoE extraction (probe of transformers 5 architectures) ---------------------------------
def _mixtral_one_expert_frozen(root: Path) -> tuple[str, str]:
    """A tiny Mixtral whose every matrix moved by a rank-2 update except expert 3's down projection (never routed)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, tie_word_embeddings=False)
    m = transformers.MixtralForCausalLM(cfg)
    m.save_pretrained(root / "base")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim < 2:
                continue
            for e, w in enumerate(p if p.ndim == 3 else [p]):
                if not (p.ndim == 3 and n.endswith("experts.down_proj") and e == 3):
                    w.add_(0.05 * torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]) / 8)
    m.save_pretrained(root / "tuned")
    return str(root / "base"), str(root / "tuned")


@pytest.mark.parametrize("mode", [(), ("-r", "4"), ("-b", "30%")])
def test_extract_of_an_moe_with_a_frozen_expert_writes_an_adapter_peft_loads(tmp_path, mode):
    """The default extract failed "cannot write results: OSError (free disk space …)" (the frozen expert, given its
    stack's shared rank, had no factors file); -r 4 left it out, and PEFT refused the adapter ("size mismatch … [12, 32]
    vs [16, 32]") after extract exited 0. Now it holds zero factors at the shared rank, and the merge is exact."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, tuned = _mixtral_one_expert_frozen(tmp_path)
    out = tmp_path / "adapter"
    r = _run("extract", base, tuned, *mode, "-o", str(out), "--no-plots")
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "extract.json").read_text())
    downs = [m for m in doc["modules"] if m.get("group") and m["name"].endswith(".w2.weight")]  # Mixtral's down, as stored
    assert {m["rank"] for m in downs} == {downs[0]["rank"]} and downs[0]["rank"] > 0
    model = peft.PeftModel.from_pretrained(transformers.MixtralForCausalLM.from_pretrained(base), str(out)).merge_and_unload()
    merged = model.state_dict()
    ref = transformers.MixtralForCausalLM.from_pretrained(tuned).state_dict()
    key = next(k for k in merged if k.endswith("experts.down_proj"))
    torch.testing.assert_close(merged[key][3], ref[key][3])  # the frozen expert: unchanged
    if mode == ("-r", "4"):  # every rank-2 update kept whole
        torch.testing.assert_close(merged[key], ref[key], rtol=0, atol=1e-6)


def test_extract_notes_no_tie_among_the_rounding_noise_beyond_an_updates_rank(tmp_path):
    """extract -r 4 of rank-2 updates warned that every module's rank "cuts through tied singular values" (σ_4 = σ_5
    at ~1e-9·σ₁, rounding noise)."""
    base, tuned = _mixtral_one_expert_frozen(tmp_path)
    r = _run("extract", base, tuned, "-r", "4", "-o", str(tmp_path / "a"), "--no-plots")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "a" / "extract.json").read_text())
    assert not any("tied" in (m.get("note") or "") for m in doc["modules"])
    assert not any("tied" in w for w in doc.get("warnings", []))


def test_gemma3s_projector_stored_in_out_and_multihead_in_proj_split(tmp_path):
    """Gemma 3's mm_input_projection_weight (used as x @ W, stored (vision, text)) was read as (out, in) = (32, 64);
    nn.MultiheadAttention's in_proj_weight (q, k, v stacked) was analysed whole with no note."""
    g = torch.Generator().manual_seed(0)
    d = 32
    W = {"multi_modal_projector.mm_input_projection_weight": torch.randn(d, 64, generator=g),
         "vision_tower.head.attention.in_proj_weight": torch.randn(3 * d, d, generator=g)}
    lowrank = {"q": 3, "k": 1, "v": 2}
    T = dict(W)
    T["multi_modal_projector.mm_input_projection_weight"] = W["multi_modal_projector.mm_input_projection_weight"] + \
        torch.randn(d, 1, generator=g) @ torch.randn(1, 64, generator=g)
    upd = torch.cat([torch.randn(d, k, generator=g) @ torch.randn(k, d, generator=g) for k in lowrank.values()])
    T["vision_tower.head.attention.in_proj_weight"] = W["vision_tower.head.attention.in_proj_weight"] + upd
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file(T, str(tmp_path / "t.safetensors"))
    res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), config=spectra.DiffConfig(thresholds=(1.0,)))
    by = {(m.name, m.module): m for m in res.modules}
    proj = next(m for (n, _), m in by.items() if "mm_input" in n)
    assert tuple(proj.shape) == (64, d)
    parts = {m.module.rpartition(":")[2]: m for (n, _), m in by.items() if "in_proj" in n}
    assert {k: parts[k].energy_rank["1.0"] for k in lowrank} == lowrank


def test_gpt_neox_with_an_unused_kv_head_count_is_still_split(tmp_path):
    """A GPT-NeoX config.json carrying num_key_value_heads = 2 (4 heads; GPT-NeoX never reads it) left
    query_key_value unsplit, "layout needs config.json head counts"."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, num_key_value_heads=2)
    m = transformers.GPTNeoXForCausalLM(cfg)
    m.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        qkv = m.gpt_neox.layers[0].attention.query_key_value.weight
        rows = qkv.view(4, 3, 8, 32)  # heads, (q, k, v), head_dim, hidden
        rows[:, 0] += 0.1  # q only: a rank-1 update (every q row moved by the same vector)
    m.save_pretrained(tmp_path / "tuned")
    res = spectra.diff(str(tmp_path / "base"), str(tmp_path / "tuned"), config=spectra.DiffConfig(thresholds=(1.0,)))
    parts = {m.module.rpartition(":")[2]: m for m in res.modules if "query_key_value" in m.name}
    assert {k: parts[k].energy_rank["1.0"] for k in ("q", "k", "v")} == {"q": 1, "k": 0, "v": 0}


# ---- training data, held-out losses and the report of training runs ------------------------------------
def test_the_held_out_blocks_do_not_depend_on_how_far_a_run_reads():
    """A run read a large file as far as 64 × steps × batch blocks and drew its hold-out over that count: a 1-step
    run's 8 held-out blocks were all in a 40-step run's training set."""
    from spectra.training import HOLDOUT_POOL, TrainConfig, data_blocks, holdout_split

    short = holdout_split(data_blocks(TrainConfig(base="b", data="d", out="o", steps=1, batch=2)), 0.1)
    long = holdout_split(data_blocks(TrainConfig(base="b", data="d", out="o", steps=400, batch=8)), 0.1)
    assert torch.equal(short[0], long[0])
    assert not set(short[0].tolist()) & set(long[1].tolist())
    held, train = holdout_split(10 * HOLDOUT_POOL, 0.1)
    assert sorted(held.tolist() + train.tolist()) == list(range(10 * HOLDOUT_POOL))
    # a file smaller than the pool: the split over its blocks, as before the pool
    small = holdout_split(300, 0.1)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(small[0], perm[:30]) and torch.equal(small[1], perm[30:])


@pytest.mark.parametrize("body, match", [
    (("some prose here\n" * 50).encode("utf-16"), "UTF-16 text"),
    (("some prose here\n" * 50).encode("utf-32"), "UTF-32 text"),
    (("some prose here\n" * 50).encode("utf-16-le"), "are NUL"),
    (bytes(20000), "are NUL"),
], ids=["utf16", "utf32", "utf16-no-bom", "nul"])
def test_utf16_utf32_and_nul_files_are_not_read_as_utf8_text(tmp_path, body, match):
    """A UTF-16 file (every other character NUL, only its BOM undecodable) and 20,000 NUL bytes were trained on."""
    from spectra.errors import SpectraError
    from spectra.training_inputs import read_examples

    f = tmp_path / "data.txt"
    f.write_bytes(body)
    with pytest.raises(SpectraError, match=match):
        read_examples(f)


def test_a_utf8_byte_order_mark_is_not_trained_on(tmp_path):
    from spectra.training_inputs import read_examples

    f = tmp_path / "data.txt"
    f.write_bytes("\ufeffdef f(x):\n    return x\n".encode())
    assert read_examples(f) == [("", "def f(x):\n    return x\n")]


def test_data_suffixes_are_matched_in_any_case_and_left_out_files_are_named(tmp_path):
    """A folder's b.TXT was left out (data_read still "whole"); d.JSONL was read as one plain-text example (its JSON
    trained on); a folder of data.csv said only "no text found"."""
    from spectra.errors import SpectraError
    from spectra.training_inputs import read_examples

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.txt").write_text("alpha text\n")
    (tmp_path / "f" / "b.TXT").write_text("beta text\n")
    assert sorted(t for _, t in read_examples(tmp_path / "f")) == ["alpha text\n", "beta text\n"]
    (tmp_path / "d.JSONL").write_text('{"prompt": "Q: ", "response": "an answer"}\n')
    assert read_examples(tmp_path / "d.JSONL") == [("Q: ", "an answer")]
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SpectraError, match=r"1 file\(s\) of other suffixes left out \(e.g. data.csv\)"):
        read_examples(tmp_path / "g")


def test_a_too_short_eval_source_is_named(tmp_path):
    from spectra.errors import SpectraError
    from spectra.training_inputs import ByteTokenizer, leading_blocks

    f = tmp_path / "tiny.txt"
    f.write_text("short prose here\n")
    with pytest.raises(SpectraError, match="fewer than two blocks") as err:
        leading_blocks(f, ByteTokenizer(), 32, 8)
    assert err.value.path == str(f)


def _run_folder(root: Path, name: str, *, steps: int, last: int, digest: str, finished: bool) -> Path:
    d = root / name
    d.mkdir()
    (d / "train_config.json").write_text(json.dumps({"steps": steps, "held_out_digest": digest}))
    (d / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 1.0, "target_loss": 2.0 - s / 1000,
                                                           "source_loss": 3.0}) + "\n" for s in range(0, last + 1, 10)))
    if finished:
        (d / "train_summary.json").write_text("{}")
    return d


def test_report_names_a_stopped_training_run_and_incomparable_held_out_losses(tmp_path):
    """A sweep stopped mid-run showed its third run in "Learning vs forgetting" as "lora4 | 0 steps", a train stopped
    at 240 of 400 as a 240-step run; runs scored on other held-out blocks sat side by side without a word."""
    from spectra.report import build_report

    a = _run_folder(tmp_path, "lora2", steps=100, last=100, digest="aaaa", finished=True)
    b = _run_folder(tmp_path, "lora4", steps=400, last=240, digest="aaaa", finished=False)
    html = build_report([str(a), str(b)])
    assert "a stopped spectra train (its log ends at step 240 of 400" in html and "different blocks" not in html
    c = _run_folder(tmp_path, "full", steps=100, last=100, digest="bbbb", finished=True)
    html = build_report([str(a), str(c)])
    assert "held-out target losses score different blocks" in html and "stopped spectra train" not in html


def test_recommend_says_a_fused_modules_rank_is_the_sum_of_its_parts(tmp_path):
    """GPT-2's c_attn got 64 (27 + 25 + 14 of its q, k, v) where the whole matrix needs 35, with no note."""
    from spectra.recommend import recommend

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 48, generator=g)  # GPT-2 Conv1D layout: (in, 3·in)
    save_file({"h.0.attn.c_attn.weight": W}, str(tmp_path / "b.safetensors"))
    save_file({"h.0.attn.c_attn.weight": W + 0.1 * torch.randn(16, 48, generator=g)}, str(tmp_path / "t.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16, "n_head": 2}))
    res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), out_dir=str(tmp_path / "d"), plots=False)
    assert len(res.modules) == 3  # split into q, k, v
    rec = recommend(tmp_path / "d")
    assert any("sum of their parts' ranks" in n and "--no-split" in n for n in rec.notes)


# ---- stops, leftovers and hints (probe of interruptions) ---------------------------------------------------
def test_a_stop_swallowed_by_a_callback_is_honoured_when_the_command_returns(tmp_path):
    """A Ctrl-C raised inside a matplotlib weakref callback ("Exception ignored in …") was lost: the command ran on,
    wrote its report and exited 0. The stop watcher saw it; the command now ends as stopped (130)."""
    import os
    import signal

    import click

    from spectra_cli.main import main

    @click.group(cls=type(main))  # the command line's group: its stop handling
    def grp() -> None:
        pass

    @grp.command()
    def work() -> None:
        before = signal.signal(signal.SIGINT, lambda *a: None)  # the raise is swallowed, as in a callback
        try:
            os.kill(os.getpid(), signal.SIGINT)
            import time

            time.sleep(0.2)  # the watcher thread reads the wakeup pipe
        finally:
            signal.signal(signal.SIGINT, before)
        click.echo("finished")

    from click.testing import CliRunner

    r = CliRunner().invoke(grp, ["work"])
    assert r.exit_code == 130 and "stopped by Ctrl-C" in r.output


def test_the_plotting_childs_later_stops_get_a_handler_not_sig_ign():
    """SIG_IGN set inside the first stop's handler made Python report a SIGTERM tripped just before as
    "OSError: Signal 15 ignored due to race condition" (a traceback in the forked plotting child)."""
    import signal

    from spectra.plots import base

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            base._stop_here(signal.SIGINT, None)
        assert all(callable(signal.getsignal(s)) for s in saved)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_the_commands_modules_load_inside_the_guarded_start():
    """Ctrl-C while spectra_cli.main imported its commands' modules (after the guarded imports) printed a traceback."""
    import subprocess
    import sys

    code = "import sys, spectra_cli; print('spectra_cli.main' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_a_new_trace_removes_an_earlier_traces_report_and_figures(tmp_path):
    """A new trace with --no-plots into a folder of an earlier trace kept that trace's report.html and figures."""
    from spectra.trace import TRACE_FILES, trace

    g = torch.Generator().manual_seed(0)
    W = {"model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g)}
    save_file(W, str(tmp_path / "base.safetensors"))
    for run in ("a", "b"):
        for step in (1, 2):
            d = tmp_path / run / f"checkpoint-{step}"
            d.mkdir(parents=True)
            save_file({k: v + 0.1 * step * torch.randn(*v.shape, generator=g) for k, v in W.items()}, str(d / "model.safetensors"))
    out = tmp_path / "out"
    trace(str(tmp_path / "base.safetensors"), [str(tmp_path / "a")], out_dir=out)
    (out / "report.html").write_text("<html>run a</html>")
    assert list(out.glob("trace_*.png")) and "report.html" in TRACE_FILES
    trace(str(tmp_path / "base.safetensors"), [str(tmp_path / "b")], out_dir=out, plots=False)
    assert not (out / "report.html").exists() and not list(out.glob("trace_*.png"))


def test_a_killed_runs_temporary_figure_is_removed_by_the_next_run(tmp_path):
    """A SIGKILL during a figure's first write left .esd_plots.png.baympvsc.tmp for good (only results' were removed)."""
    from spectra.io.files import folder_lock

    (tmp_path / ".esd_plots.png.baympvsc.tmp").write_bytes(b"partial")
    (tmp_path / ".report.html.ab12cd34.tmp").write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("a user's file")
    with folder_lock(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp"]


def test_the_write_failure_hint_names_every_resumable_command_and_not_for_the_lock_file(tmp_path):
    import errno

    from spectra.errors import output_error

    e = output_error(tmp_path / "compare.json", OSError(errno.EACCES, "Permission denied"))
    assert "compare, interfere" in str(e) and "--resume" in str(e)
    e = output_error(tmp_path / ".spectra.lock", OSError(errno.EPERM, "Operation not permitted"))
    assert "intact" not in str(e) and "--resume" not in str(e)


# ---- review of the round ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["one-pass", "two-pass"])
def test_budget_fill_components_are_factored_not_zero_in_either_strategy(tmp_path, strategy):
    """The one-pass extract kept only the components above the greedy prefix's cut-off: a module the fill step then
    gave a component got a zero column in the adapter while extract.json counted its energy as kept."""
    from safetensors.torch import load_file

    from spectra.extract import ExtractConfig, extract

    g = torch.Generator().manual_seed(0)

    def lowrank(out, inn, s2):
        U = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))[0][:, : len(s2)]
        V = torch.linalg.qr(torch.randn(inn, inn, generator=g, dtype=torch.float64))[0][:, : len(s2)]
        return (U * torch.tensor(s2, dtype=torch.float64).sqrt()) @ V.T

    spec = {"model.layers.0.mlp.down_proj.weight": ((64, 64), [10, 9.9, 9.8, 9.7, 9.6]),
            "model.layers.1.mlp.down_proj.weight": ((128, 128), [40.0, 5, 4]),
            "model.layers.2.self_attn.k_proj.weight": ((16, 64), [3, 2.9, 2.8, 2.7]),
            "model.layers.3.mlp.down_proj.weight": ((128, 128), [25.0, 24, 2])}
    b, t = {}, {}
    for n, (shape, s2) in spec.items():
        b[n] = torch.randn(*shape, generator=g, dtype=torch.float64)
        t[n] = b[n] + lowrank(*shape, s2)
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(t, str(tmp_path / "t.safetensors"))
    out = tmp_path / "out"
    extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), out,
            config=ExtractConfig(budget=600, strategy=strategy, dtype="float64"), plots=False)
    doc = json.loads((out / "extract.json").read_text())
    assert doc["allocation"]["filled_params"] == 80
    ad = load_file(str(out / "adapter_model.safetensors"))
    for m in doc["modules"]:
        if m["rank"]:
            key = next(k for k in ad if m["name"].removesuffix(".weight") in k and "lora_B" in k)
            A = ad[key.replace("lora_B", "lora_A")]
            dW = (t[m["name"]] - b[m["name"]]).numpy()
            S = np.linalg.svd(dW, compute_uv=False)
            kept = float(np.linalg.norm((ad[key] @ A).numpy()) ** 2 / np.sum(S**2))  # spectra writes alpha = r: scale 1
            assert kept == pytest.approx(m["energy_kept"], rel=1e-6), m["name"]


def test_held_out_blocks_cover_what_an_evaluation_scores_with_a_large_batch():
    """batch 64 on a large file: 204 held-out blocks for the 256 (eval_batches 4 × 64) that each evaluation scores."""
    from spectra.training import TrainConfig, data_blocks, holdout_split

    cfg = TrainConfig(base="b", data="d", out="o", steps=10, batch=64)
    held, _ = holdout_split(data_blocks(cfg), cfg.holdout, cfg.eval_batches * cfg.batch)
    assert len(held) >= cfg.eval_batches * cfg.batch


def test_esd_takes_float32_eigenvalues_with_their_own_rounding():
    """torch.linalg.eigvalsh of a float32 Gram of a rank-90 matrix (negatives ~1e-2 of λ_max·p·ε32) was refused
    against float64's tolerance."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 90, generator=g) @ torch.randn(90, 100, generator=g)
    lam = torch.linalg.eigvalsh(W.T @ W)
    assert float(lam.min()) < 0
    m = esd_metrics(lam, (300, 100))
    assert m.matrix_rank is not None and m.alpha is not None


def test_trace_takes_any_iterable_of_paths(tmp_path):
    from spectra.errors import CheckpointNotFoundError
    from spectra.trace import trace

    with pytest.raises(CheckpointNotFoundError, match="nonexistent_run"):
        trace(str(tmp_path / "base"), (p for p in [str(tmp_path / "nonexistent_run")]))


def test_a_stray_nul_in_prose_is_read(tmp_path):
    from spectra.training_inputs import read_examples

    f = tmp_path / "d.txt"
    f.write_bytes(b"first line of prose\x00second line of prose here\n")
    assert read_examples(f)[0][1].startswith("first line")


def test_the_held_out_warning_names_runs_as_the_table_does_and_ignores_the_eval_source(tmp_path):
    from spectra.report import build_report

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = _run_folder(tmp_path / "a", "run", steps=10, last=10, digest="aaaa", finished=True)
    two = _run_folder(tmp_path / "b", "run", steps=10, last=10, digest="bbbb", finished=True)
    html = build_report([str(one), str(two)])
    assert "a/run" in html and "b/run" in html and "score different blocks" in html and "--eval-batches" not in html
    cfg = json.loads((two / "train_config.json").read_text())
    (two / "train_config.json").write_text(json.dumps({**cfg, "held_out_digest": "aaaa", "source_digest": "cccc"}))
    assert "score different blocks" not in build_report([str(one), str(two)])


# ---- a hostile environment -----------------------------------------------------------------------------------
def _latin1_folder(root: Path) -> str:
    """A folder named with a byte that is not UTF-8 (café in Latin-1, from an old zip), as Python spells it."""
    import os

    raw = os.fsencode(str(root)) + b"/caf\xe9"
    os.makedirs(raw)
    return os.fsdecode(raw)


def test_results_of_inputs_at_non_utf8_paths_are_written(tmp_path):
    """compare, extract and interfere computed everything, then failed "UnicodeEncodeError: … surrogates not allowed"
    writing their JSON (compare kept only its journal; extract wrote the adapter but no extract.json)."""
    from spectra.extract import ExtractConfig, extract
    from spectra.interfere import interfere

    base_dir = _latin1_folder(tmp_path)
    g = torch.Generator().manual_seed(0)
    W = {"model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g)}
    save_file(W, base_dir + "/model.safetensors")
    for name in ("t1", "t2"):
        save_file({k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in W.items()}, str(tmp_path / f"{name}.safetensors"))
    t1, t2 = str(tmp_path / "t1.safetensors"), str(tmp_path / "t2.safetensors")
    spectra.compare(t1, t2, base=base_dir, out_dir=tmp_path / "cmp")
    extract(base_dir, t1, tmp_path / "ext", config=ExtractConfig(rank=2), plots=False)
    interfere(base_dir, [t1, t2], out_dir=tmp_path / "itf")
    for f in ("cmp/compare.json", "ext/extract.json", "itf/interfere.json"):
        text = (tmp_path / f).read_text(encoding="utf-8")  # valid UTF-8: the byte written as a \u escape
        assert "caf\\udce9" in text and json.loads(text)


def test_extract_to_a_non_utf8_folder_is_refused_before_anything_is_written(tmp_path):
    """safetensors refused the scratch path with a Rust traceback, leaving .extract-scratch and a journal."""
    from spectra.extract import ExtractConfig, extract

    base, tuned = small_pair(tmp_path)
    out = _latin1_folder(tmp_path) + "/out"
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        extract(base, tuned, out, config=ExtractConfig(rank=2), plots=False)
    assert not Path(out).exists()


def test_concurrent_api_calls_give_blas_its_thread_count_back(tmp_path):
    """Four spectra.diff calls from threads left OpenBLAS on one thread for the rest of the process (3 runs in 4):
    OpenBLAS ignored the restored count while another thread was in one of its calls."""
    import threading

    threadpoolctl = pytest.importorskip("threadpoolctl")
    g = torch.Generator().manual_seed(0)
    W = {f"layers.{i}.mlp.w.weight": torch.randn(64, 64, generator=g) for i in range(8)}
    base, tuned = str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")
    save_file(W, base)
    save_file({k: v + 0.01 * torch.randn(64, 64, generator=g) for k, v in W.items()}, tuned)
    blas = lambda: [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]  # noqa: E731
    before = blas()
    for _ in range(3):
        ts = [threading.Thread(target=lambda: spectra.diff(base, tuned)) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert blas() == before


def test_an_mplbackend_matplotlib_refuses_is_dropped_with_a_warning():
    """MPLBACKEND='Agg ' (a trailing space) failed every figure and report after the numbers were computed."""
    import os
    import subprocess
    import sys

    code = "import spectra.plots, matplotlib, os; print(matplotlib.get_backend().lower(), os.environ.get('MPLBACKEND'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg "})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["agg", "None"] and "is not a matplotlib backend" in r.stderr


def test_a_stale_world_size_is_named_and_an_impossible_rank_refused(tmp_path):
    """A leftover WORLD_SIZE=2 read "--distributed needs a launcher" (never passed); RANK=5 of 2 waited out the
    rendezvous timeout (30 min by default) before 40 lines of C++ frames."""
    import os
    import subprocess
    import sys

    base, tuned = small_pair(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "spectra", "diff", base, tuned], capture_output=True, text=True,
                       env={**env, "WORLD_SIZE": "2"}, timeout=120)
    assert r.returncode == 1 and "WORLD_SIZE=2 is set in the environment" in r.stderr and "unset WORLD_SIZE" in r.stderr
    r = subprocess.run([sys.executable, "-m", "spectra", "diff", base, tuned], capture_output=True, text=True, timeout=120,
                       env={**env, "WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"})
    assert r.returncode == 1 and "RANK=5 is not a rank of WORLD_SIZE=2" in r.stderr and "Traceback" not in r.stderr


def test_a_full_fine_tune_of_a_bf16_base_trains_float32_weights(tmp_path):
    """transformers loads a bf16 base in bf16 and AdamW stepped bf16 weights: a 4-step full run changed 6% of q_proj's
    entries (the rest rounded away; ‖ΔW‖/‖W‖ 1.2e-4 against 4.3e-4 from the same values in float32), while PEFT's LoRA
    trains float32 factors: the comparison of the two was biased, silently."""
    import json as _json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file

    from spectra.synthetic import LlamaShape, make_llama_pair
    from spectra.training import TrainConfig, train

    make_llama_pair(tmp_path / "syn", shape=LlamaShape(layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256))
    base = tmp_path / "syn" / "base"
    assert next(iter(load_file(str(base / "model.safetensors")).values())).dtype == torch.bfloat16
    data = tmp_path / "code.txt"
    data.write_text(Path(_json.__file__).read_text() * 2)
    train(TrainConfig(base=str(base), data=str(data), out=str(tmp_path / "full"), method="full", steps=4, batch=2,
                      seq_len=32, device="cpu", trace_every=0))
    cfg = _json.loads((tmp_path / "full" / "train_config.json").read_text())
    assert (cfg["base_dtype"], cfg["trained_dtype"]) == ("bfloat16", "float32")
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as t, safe_open(str(base / "model.safetensors"), "pt") as b:
        tuned, w = t.get_tensor(name), b.get_tensor(name)
    assert tuned.dtype == torch.float32
    assert float((tuned.double() - w.double()).ne(0).double().mean()) > 0.9  # every entry moved, not 6%
    shutil.rmtree(tmp_path / "syn")


def test_extract_evals_losses_are_not_printed_under_energy_kept():
    """`extract --eval` printed its four held-out losses (2.6616 …) in the totals table's "energy kept" column."""
    from spectra_cli.extract import eval_table, totals_table

    doc = {"totals": {"params": 10, "param_fraction": 0.1, "energy_kept": 0.9, "rel_fro_error": 0.3, "modules_at_90": 1,
                      "modules": 1, "full_params": 100, "not_extracted_energy_share": 0.0},
           "uniform": {"rank": 1, "params": 10, "energy_kept": 0.8, "rel_fro_error": 0.4, "modules_at_90": 0},
           "serving": {}, "eval": {"loss": {"base": 2.6616, "tuned": 2.5, "adapter": 2.55, "uniform": 2.58}}}
    totals = totals_table(doc)
    assert not any("held-out" in str(c) for c in totals.columns[0]._cells)
    losses = eval_table(doc)
    assert [c.header for c in losses.columns] == ["model", "loss"] and losses.columns[1]._cells[0] == "2.6616"
    assert eval_table({**doc, "eval": None}) is None


def test_recommend_says_a_relative_base_path_is_the_diffs_folders(tmp_path, monkeypatch):
    """Run from another folder, recommend said "the diff's base (out/…) cannot be read now" of a folder that exists."""
    from spectra.recommend import recommend

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    base, tuned = small_pair(tmp_path / "work")
    spectra.diff("base.safetensors", "tuned.safetensors", out_dir="d", plots=False)
    monkeypatch.chdir(tmp_path)
    # the results record where each input was read from (inputs, the twenty-seventh round): read from there
    assert not any("cannot be read now" in n for n in recommend(tmp_path / "work" / "d").notes)
    # results of an older version (no inputs): the relative path is this folder's, and that is said
    doc = json.loads((tmp_path / "work" / "d" / "results.json").read_text())
    del doc["inputs"]
    notes = recommend(doc).notes
    assert any("cannot be read now (a relative path, read from this folder: run recommend where spectra diff ran)" in n for n in notes)
