"""Hostile and odd inputs found by the seventh outside probe (engine paths called with a device, the
distributed run, esd and extract numbers, training and reports): each test reproduces a finding and
checks the fix, numbers against float64 numpy or WeightWatcher's rules."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra.distributed import DistContext, broadcast
from spectra.engine import exact_spectra
from spectra.errors import DistributedError
from spectra.metrics import energy_rank, numerical_rank
from spectra.sketch import approx_energy_ranks, randomized_svd
from spectra.synthetic import LlamaShape, make_llama_pair
from spectra_cli.main import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _planted(m: int, n: int, s: np.ndarray, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    V, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return torch.from_numpy((U * s) @ V.T).to(dtype)


# ---- approximate mode at τ = 1 --------------------------------------------------------------------
def test_approx_numerical_rank_bounds_hold_when_the_tail_is_below_float32_rounding():
    """The energy outside the sketch is ‖M‖² minus the sketch's Σσ̂² (float32 values): a tail below that
    difference's rounding came out as 0 and the bounds at τ = 1 closed on the sketch's width ([64, 64]
    for a true 264; [256, 256] for 400) while claiming to be exact."""
    s = 1.0 / np.arange(1, 1001) ** 2.0  # smallest 1e-6, the float64 resolution 4.7e-7: numerical rank 1000
    M = _planted(1000, 1400, s).float()
    ref = np.linalg.svd(M.double().numpy(), compute_uv=False)
    truth = numerical_rank(ref, 1000)
    assert truth == 1000
    a = approx_energy_ranks(M, (0.9, 1.0), generator=torch.Generator().manual_seed(0))
    r = a.ranks[1.0]
    assert r.lo <= truth <= r.hi, r
    r9 = a.ranks[0.9]
    assert r9.lo <= energy_rank(ref, 0.9) <= r9.hi


def test_approx_cli_at_tau_one_is_not_marked_exact_wrongly(tmp_path):
    """The CLI case: 64 values of 0.05 and 200 of 5e-6 (all above the resolution) in float64."""
    s = np.r_[np.full(64, 0.05), np.full(200, 5e-6)]
    dW = _planted(600, 800, s, seed=3)
    base = torch.from_numpy(np.random.default_rng(1).standard_normal((600, 800)))
    save_file({"model.layers.0.mlp.down_proj.weight": base}, str(tmp_path / "b.safetensors"))
    save_file({"model.layers.0.mlp.down_proj.weight": base + dW}, str(tmp_path / "t.safetensors"))
    res = _run("diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--approx", "-t", "1.0",
               "--out", str(tmp_path / "d"), "--no-plots")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "d" / "results.json").read_text())["modules"][0]
    truth = numerical_rank(np.linalg.svd((base + dW - base).numpy(), compute_uv=False), 600)
    # (the sketch grows to p/2 here, where the whole spectrum is computed: an exact rank, no bounds)
    lo, hi = m["energy_rank_bounds"]["1.0"] if m["energy_rank_bounds"] else (m["energy_rank"]["1.0"],) * 2
    assert truth == 264 and lo <= truth <= hi, m["energy_rank_bounds"]


# ---- precisions and methods outside float32's range ----------------------------------------------
@pytest.mark.parametrize("backend", ["lapack", "torch"])
@pytest.mark.parametrize("scale", [3e-22, 1e20])
def test_certified_path_scales_a_gram_outside_float32s_normal_range(backend, scale):
    """The certified path rounds the float64 Gram matrix to float32: at σ ≈ 3e-22 its entries were
    subnormal (absolute rounding, which the relative certificate does not cover: energy rank 35 for 36,
    values off by 0.9%, certified); at σ ≈ 1e20 they overflowed (LinAlgError)."""
    s = np.linspace(1.0, 0.8, 40) * scale  # a flat spectrum: the energy ranks are sensitive to each value
    M = _planted(40, 60, s, seed=2, dtype=torch.float32)
    ref = np.linalg.svd(M.double().numpy(), compute_uv=False)
    out = exact_spectra(M.unsqueeze(0), precision="certified", backend=backend)
    S = out.S[0]
    np.testing.assert_allclose(S, ref, rtol=1e-4)
    for tau in (0.5, 0.9, 0.99):
        assert energy_rank(S, tau) == energy_rank(ref, tau)


@pytest.mark.parametrize("scale", [1e40, 1e-50])
def test_svd_method_in_float32_scales_float64_input(scale):
    """--method svd --precision float32 cast float64 weights to float32: at 1e40 inf (energy ranks 1, MKL
    errors on stdout), at 1e-50 zero (every ΔW "identical")."""
    s = np.geomspace(1.0, 1e-3, 30) * scale
    M = _planted(30, 50, s, seed=4)
    out = exact_spectra(M.unsqueeze(0), precision="float32", method="svd")
    S = out.S[0]
    # float32's own error: each σ within about p·ε₃₂·σ₁ (the smallest, 1e-3·σ₁, moved 1.3e-5 relative on one run)
    np.testing.assert_allclose(S, np.linalg.svd(M.numpy(), compute_uv=False), rtol=1e-5, atol=30 * 1.2e-7 * scale)


@pytest.mark.parametrize("scale", [1e40, 1e-50])
def test_randomized_svd_scales_float64_input(scale):
    s = np.geomspace(1.0, 1e-12, 300) * scale  # fast decay: the sketch is accurate, only the range is in question
    M = _planted(300, 400, s, seed=5)
    t = randomized_svd(M, 5, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(t.S, s[:5], rtol=1e-4)
    assert np.all(np.isfinite(t.residual)) and np.all(t.residual <= 1e-3 * t.S)


def test_approx_weight_spectra_say_why_they_are_missing(tmp_path):
    """--approx --weight-spectra gave null base/tuned singular values with no word."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 96, generator=g)
    save_file({"model.layers.0.self_attn.q_proj.weight": W}, str(tmp_path / "b.safetensors"))
    save_file({"model.layers.0.self_attn.q_proj.weight": W + 0.01 * torch.randn(64, 96, generator=g)},
              str(tmp_path / "t.safetensors"))
    res = _run("diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--approx", "--weight-spectra",
               "--out", str(tmp_path / "d"), "--no-plots")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "d" / "results.json").read_text())["modules"][0]
    assert m["base_singular_values"] is None and "weight spectra not computed in the approximate mode" in m["note"]


# ---- the distributed run ---------------------------------------------------------------------------
def test_broadcast_failure_on_rank_0_blames_another_rank():
    """Rank 0 said "rank 0 failed or was killed" when another rank had failed (here: no group at all)."""
    with pytest.raises(DistributedError) as info:
        broadcast(DistContext(0, 2, 0, "gloo", False), ["x"], where="reading the journal")
    assert "another rank failed" in str(info.value) and "rank 0 failed" not in str(info.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    shape = LlamaShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128)
    a = make_llama_pair(root / "a", shape=shape, seed=1)
    b = make_llama_pair(root / "b", shape=shape, seed=1, rel_update=0.05)
    return a, b


def _two_ranks(args0: list[str], args1: list[str], out) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "spectra", "diff", *args, "--out", str(out), "--no-plots", "--distributed"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r, args in enumerate((args0, args1))]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.parametrize("case", ["tuned", "options"])
def test_ranks_given_other_inputs_are_refused(small_pairs, tmp_path, case):
    """A rank given another TUNED (a stale copy on one node) had its results merged silently (exit 0,
    22 of 44 matrices from the other pair); other options crashed with KeyError or left duplicates."""
    (base, tuned), (_, other) = small_pairs
    args0 = [str(base), str(tuned)]
    args1 = [str(base), str(other)] if case == "tuned" else [str(base), str(tuned), "-t", "0.8"]
    done = _two_ranks(args0, args1, tmp_path / "d")
    for p in done:
        assert p.returncode != 0, p.stderr[-2000:]
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "rank(s) 1 of the distributed run were given other inputs or options" in done[0].stderr, done[0].stderr[-2000:]
    assert not (tmp_path / "d" / "results.json").exists() or not json.loads((tmp_path / "d" / "results.json").read_text())["modules"]


def test_ranks_with_copies_of_the_same_files_agree(small_pairs, tmp_path):
    """The check compares content, not paths: rank 1 reading its own copy (another path, another
    modification time) runs, and the results equal one process's."""
    (base, tuned), _ = small_pairs
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tuned, copy)
    os.utime(copy / "model.safetensors", (1, 1))
    done = _two_ranks([str(base), str(tuned)], [str(base), str(copy)], tmp_path / "d")
    assert all(p.returncode == 0 for p in done), [p.stderr[-2000:] for p in done]
    res = _run("diff", str(base), str(tuned), "--out", str(tmp_path / "one"), "--no-plots")
    assert res.exit_code == 0
    strip = lambda f: sorted((m["name"], m["energy_rank"], m["fro_norm"]) for m in json.loads(f.read_text())["modules"])  # noqa: E731
    assert strip(tmp_path / "d" / "results.json") == strip(tmp_path / "one" / "results.json")


def test_resume_keeps_one_record_per_matrix(small_pairs, tmp_path):
    """A journal with a repeated line (edited, or concatenated) gave results.json and results.csv the
    same matrix twice."""
    (base, tuned), _ = small_pairs
    out = tmp_path / "d"
    assert _run("diff", str(base), str(tuned), "--out", str(out), "--no-plots").exit_code == 0
    journal = out / "results.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    record = next(line for line in lines if '"module"' in line)
    journal.write_text("".join(lines) + record)
    res = _run("diff", str(base), str(tuned), "--out", str(out), "--no-plots", "--resume")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in doc["modules"]]
    assert len(names) == len(set(names))
    assert any("repeated record" in w for w in doc["warnings"])
    rows = (out / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == len(names)


def test_plan_counts_the_tied_head_pair(tmp_path):
    """--plan paired without the tied-head rule and left out the largest pair (the head against a tied
    base's embedding), which the run analyses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=300)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=True))
    base.save_pretrained(tmp_path / "base")
    tuned = LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=False))
    sd = {k: v + 0.01 * torch.randn_like(v) if v.ndim == 2 else v for k, v in base.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 0.01 * torch.randn_like(sd["model.embed_tokens.weight"])
    tuned.load_state_dict(sd)
    tuned.save_pretrained(tmp_path / "tuned")
    res = _run("diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(tmp_path / "d"), "--no-plots", "--json")
    assert res.exit_code == 0, res.output
    analysed = len(json.loads((tmp_path / "d" / "results.json").read_text())["modules"])
    plan = _run("diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--plan", "--json")
    assert plan.exit_code == 0, plan.output
    doc = json.loads(plan.output)
    counted = doc["matrices"]
    assert counted == analysed == 16, (counted, analysed, plan.output[:500])


# ---- esd: ties, equal spectra, tiny weights, rank-deficient bulks -----------------------------------
def _wwfit(lam: np.ndarray):
    import contextlib
    import io

    ww = pytest.importorskip("weightwatcher")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return ww.WW_powerlaw.WWFit(np.sort(lam))


def _esd(tmp_path, tensors: dict, *args: str) -> dict:
    f = tmp_path / "w.safetensors"
    save_file({k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in tensors.items()}, str(f))
    res = _run("esd", str(f), "--json", "--no-plots", *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_esd_fit_with_tied_top_eigenvalues_matches_weightwatcher(tmp_path):
    """A tail of equal eigenvalues has α = ∞; its KS distance came out NaN (exp(−∞·0)), NaN won np.argmin,
    and every matrix whose top eigenvalues tie (σ₁ = σ₂, kron(I, D), circulant matrices) got α = null.
    WWFit's power gives 1 at a tie (D = (n−1)/n) and a finite α wins."""
    rng = np.random.default_rng(1)
    s = np.sort(np.sqrt((1 - rng.random(100)) ** (-1 / 1.5)))[::-1]
    d = s.copy()
    d[1] = d[0]
    mats = {"l.0.tie.weight": np.diag(d), "l.1.kron.weight": np.kron(np.eye(2), np.diag(s[:50]))}
    doc = _esd(tmp_path, mats)
    for m in doc["matrices"]:
        lam = np.linalg.svd(mats[m["name"]], compute_uv=False) ** 2
        ref = _wwfit(lam[lam > 1e-5])
        assert m["alpha"] is not None, m
        assert m["alpha"] == pytest.approx(ref.alpha, rel=1e-9) and m["D"] == pytest.approx(ref.D, rel=1e-9)


def test_esd_small_all_equal_spectrum_is_not_flagged_over_trained(tmp_path):
    """Fewer than 20 equal eigenvalues: the small-sample fit had no candidate and returned α = 0, "success",
    warning over-trained (the −1/0 flag the docs say spectra does not give); with 20 or more it was null."""
    doc = _esd(tmp_path, {"l.0.a.weight": np.eye(8, dtype=np.float32), "l.0.b.weight": 3 * np.eye(16, dtype=np.float32)})
    for m in doc["matrices"]:
        assert m["alpha"] is None and m["status"] == "failed" and m["warning"] != "over-trained", m
        assert "equal eigenvalues" in m["fit_note"]


def test_esd_float64_weights_whose_squares_underflow_are_skipped(tmp_path):
    """float64 weights near 2^-600: λ = σ² underflowed and the matrix was reported as zero (rank 0, σ_max 0),
    with no word (torch's vector_norm squares unscaled, so the existing check saw ‖W‖ = 0)."""
    W = np.random.default_rng(2).standard_normal((200, 100)) * 2.0**-600
    doc = _esd(tmp_path, {"l.0.tiny.weight": W, "l.0.ok.weight": np.random.default_rng(3).standard_normal((50, 40))})
    assert [m["name"] for m in doc["matrices"]] == ["l.0.ok.weight"]
    (skip,) = doc["skipped"]
    assert skip["name"] == "l.0.tiny.weight" and "weights too small" in skip["reason"]


def test_esd_mp_bulk_of_a_low_rank_matrix_is_not_fitted_to_rounding_noise(tmp_path):
    """A rank-4 64 × 48 float64 matrix: the Marchenko–Pastur fit took the median eigenvalue (rounding
    noise, 3e-31) as the bulk and counted 15 "spikes" for 4 nonzero eigenvalues."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((64, 4)) @ rng.standard_normal((4, 48))
    (m,) = _esd(tmp_path, {"l.0.low.weight": W})["matrices"]
    assert m["matrix_rank"] == np.linalg.matrix_rank(W) == 4
    assert m["mp_num_spikes"] is None and m["mp_sigma2"] is None
    # a full-rank noise matrix keeps its fit (0 spikes above the Tracy–Widom edge)
    (m,) = _esd(tmp_path, {"l.0.noise.weight": rng.standard_normal((300, 100))})["matrices"]
    assert m["mp_num_spikes"] == 0 and m["mp_sigma2"] == pytest.approx(1.0, rel=0.15)


def test_esd_refuses_an_adapter_weights_file(tmp_path):
    """The adapter folder was refused, its adapter_model.safetensors given alone was fitted as if its
    r-row factors were weight matrices (7 of 12 flagged over-trained)."""
    g = torch.Generator().manual_seed(0)
    f = tmp_path / "adapter_model.safetensors"
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{pre}.lora_A.weight": torch.randn(4, 32, generator=g), f"{pre}.lora_B.weight": torch.randn(32, 4, generator=g)},
              str(f))
    res = _run("esd", str(f), "--no-plots")
    assert res.exit_code == 1 and "holds LoRA factors" in res.output and "Traceback" not in res.output, res.output


# ---- extract from an adapter: undefined updates -----------------------------------------------------
def _lora(tmp_path, name: str, *, nan: bool = False, alpha: float = 16.0, base_inf: bool = False, dora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=300)
    base = tmp_path / f"{name}_base"
    model = LlamaForCausalLM(cfg)
    if base_inf:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    model.save_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=dora))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ad = tmp_path / f"{name}_ad"
    peft.save_pretrained(ad)
    if nan:
        from safetensors.torch import load_file

        sd = load_file(str(ad / "adapter_model.safetensors"))
        key = next(k for k in sd if "layers.0.self_attn.q_proj.lora_B" in k)
        sd[key][0, 0] = float("nan")
        save_file(sd, str(ad / "adapter_model.safetensors"))
    if alpha != 16.0:
        c = json.loads((ad / "adapter_config.json").read_text())
        c["lora_alpha"] = alpha
        (ad / "adapter_config.json").write_text(json.dumps(c))
    return base, ad


@pytest.mark.parametrize("case", ["nan_factor", "nan_dora", "inf_base", "alpha_overflow"])
def test_extract_from_an_adapter_skips_undefined_updates(tmp_path, case):
    """NaN in lora_B: linalg.svd traceback; NaN in a DoRA factor: "dsterf did not converge"; an Inf in the
    base beside a healthy LoRA: extract.json lost (Inf not JSON) after the adapter was written; lora_alpha
    1e308 with --dtype float64 --force: 12 of 12 factors written as inf, then the same crash."""
    base, ad = _lora(tmp_path, case, nan=case.startswith("nan"), dora=case == "nan_dora", base_inf=case == "inf_base",
                     alpha=1e308 if case == "alpha_overflow" else 16.0)
    out = tmp_path / "x"
    res = _run("extract", str(base), str(ad), "-r", "2", "--dtype", "float64", "-o", str(out), "--no-plots")
    assert "Traceback" not in res.output, res.output
    if case == "alpha_overflow":  # every module overflows: nothing to extract, one line
        assert res.exit_code == 1 and "overflows float64" in res.output, res.output
        assert not (out / "adapter_model.safetensors").exists()
        return
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "extract.json").read_text())
    if case == "inf_base":
        assert len(doc["modules"]) == 4 and all(m["rel_norm"] is None for m in doc["modules"] if m["name"].startswith(
            "model.layers.0.self_attn.q_proj"))
    else:
        assert [m["name"] for m in doc["not_extracted"]] == ["model.layers.0.self_attn.q_proj.weight"], doc["not_extracted"]
        assert len(doc["modules"]) == 3
    from safetensors.torch import load_file

    assert all(bool(torch.isfinite(v).all()) for v in load_file(str(out / "adapter_model.safetensors")).values())


def test_extract_serving_vllm_keeps_the_asked_rank(small_pairs, tmp_path):
    """--serving vllm -r 3 wrote r = 8 with no word (later with a warning), though vLLM serves r = 3 with
    max_lora_rank 8 (an adapter's ranks need only be at most that setting): r = 3 now, served at 8."""
    (base, tuned), _ = small_pairs
    res = _run("extract", str(base), str(tuned), "-r", "3", "--serving", "vllm", "-o", str(tmp_path / "x"), "--no-plots")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "x" / "extract.json").read_text())
    assert {m["rank"] for m in doc["modules"]} == {3} and doc["serving"]["max_lora_rank"] == 8
    assert not any("rounded up" in w for w in doc["warnings"]), doc["warnings"]


def test_plan_calibrates_the_cpu_run_on_its_own_route(monkeypatch):
    """--plan timed torch's multithreaded eigvalsh alone while the CPU run solves with LAPACK in worker
    threads (estimates 11 s for a 7 s decomposition here, 1-8x off under load): it now times the run's
    own route, exact_spectra on a batch of as many matrices as it solves at once."""
    import spectra.engine
    from spectra.plan import calibrate

    calls = []
    real = spectra.engine.exact_spectra

    def spy(mats, **kw):
        calls.append((len(mats), kw.get("precision")))
        return real(mats, **kw)

    def forbidden(*a, **kw):
        raise AssertionError("the CPU run does not use torch.linalg.eigvalsh")

    monkeypatch.setattr(spectra.engine, "exact_spectra", spy)
    monkeypatch.setattr(torch.linalg, "eigvalsh", forbidden)
    cost = calibrate(torch.device("cpu"), "float64", size=64)
    assert calls and all(p == "float64" for _, p in calls) and max(n for n, _ in calls) >= 2
    assert np.isfinite([cost.gram_rate, cost.eig_rate]).all() and min(cost.gram_rate, cost.eig_rate) > 0


# ---- trace, interfere, compare ------------------------------------------------------------------
def test_trace_refuses_checkpoints_of_which_only_some_have_a_step(tmp_path):
    """Listed checkpoints: one with trainer_state.json (global_step 300), two without a step: these took their
    position (2, 3), were sorted before 300 and traced out of the order given, with a warning that the
    user's order was wrong and φ against the wrong first checkpoint."""
    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.self_attn.q_proj.weight"
    W = torch.randn(16, 16, generator=g)
    save_file({name: W}, str(tmp_path / "base.safetensors"))
    for i, folder in enumerate(("first", "second", "third")):
        (tmp_path / folder).mkdir()
        save_file({name: W + (i + 1) * 0.01 * torch.randn(16, 16, generator=g)}, str(tmp_path / folder / "model.safetensors"))
    (tmp_path / "first" / "trainer_state.json").write_text(json.dumps({"global_step": 300, "log_history": []}))
    res = _run("trace", str(tmp_path / "base.safetensors"), *(str(tmp_path / f) for f in ("first", "second", "third")))
    assert res.exit_code == 1 and "have no step" in res.output and "Traceback" not in res.output, res.output
    # none with a step: traced in the order given, each noted
    (tmp_path / "first" / "trainer_state.json").unlink()
    res = _run("trace", str(tmp_path / "base.safetensors"), *(str(tmp_path / f) for f in ("first", "second", "third")), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [Path(c["path"]).name for c in doc["checkpoints"]] == ["first", "second", "third"]
    assert all("position" in c["note"] for c in doc["checkpoints"])


def test_tsv_interference_ignores_a_task_that_changed_nothing():
    """Three identical tasks: relative = relative_fro = 1; adding a copy of the base (ΔW = 0) gave 4/9 and
    0.594: the zero task counted in (n − 1)² and in the Frobenius bound's pairs."""
    from spectra.interference import singular_task_interference
    from spectra.subspaces import Factored

    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((20, 3)))
    V, _ = np.linalg.qr(rng.standard_normal((30, 3)))
    f = Factored(torch.from_numpy(U), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), torch.from_numpy(V.T))
    zero = Factored(torch.zeros(20, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), torch.zeros(0, 30, dtype=torch.float64))
    three = singular_task_interference([f, f, f])
    four = singular_task_interference([f, f, f, zero])
    assert three.relative == pytest.approx(1.0) and three.relative_fro == pytest.approx(1.0)
    assert four.sti == pytest.approx(three.sti) and four.relative == pytest.approx(1.0) and four.relative_fro == pytest.approx(1.0)
    assert four.ranks == [3, 3, 3, 0]


def test_amplification_of_directions_outside_w_is_unbounded_not_rounding_noise():
    """ΔW = c·u vᵀ with u orthogonal to W's column space: ‖UᵀWV‖ is 0 in exact arithmetic; its rounding
    (1.8e-17) gave a factor of 2.1e17 in the table and findings."""
    from spectra.subspaces import amplification

    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    W = torch.from_numpy(Q[:, :32] @ np.diag(np.linspace(2.0, 1.0, 32)) @ np.linalg.qr(rng.standard_normal((32, 32)))[0])
    dW = torch.from_numpy(6.0 * np.outer(Q[:, 40], np.eye(32)[0]))  # left direction outside W's columns
    a = amplification(dW, W, 1, generator=torch.Generator().manual_seed(0))
    assert a.proj_delta == 0.0 and a.factor == float("inf")
    # a direction W does use keeps its finite factor: along W's bottom singular pair, 6 / σ_min
    Uw, Sw, Vwh = np.linalg.svd(W.numpy(), full_matrices=False)
    a = amplification(torch.from_numpy(6.0 * np.outer(Uw[:, Sw.size - 1], Vwh[-1])), W, 1, generator=torch.Generator().manual_seed(0))
    assert a.factor == pytest.approx(6.0 / Sw[-1], rel=1e-9)


def test_compare_and_interfere_name_a_checkpoint_of_other_shapes(tmp_path):
    """A checkpoint with twice the rows in q_proj: compare listed it as updated by A only ("a_only"),
    interfere as "partial", with no reason; now skipped with the shape mismatch."""
    g = torch.Generator().manual_seed(0)
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    base = {q: torch.randn(32, 32, generator=g), v: torch.randn(32, 32, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({k: w + 0.01 * torch.randn(32, 32, generator=g) for k, w in base.items()}, str(tmp_path / "a.safetensors"))
    save_file({q: torch.randn(64, 32, generator=g), v: base[v] + 0.01 * torch.randn(32, 32, generator=g)},
              str(tmp_path / "other.safetensors"))
    res = _run("compare", str(tmp_path / "a.safetensors"), str(tmp_path / "other.safetensors"), "--base",
               str(tmp_path / "base.safetensors"), "--json", "--no-plots")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["a_only"] == [] and [s["name"] for s in doc["skipped"]] == [q]
    assert "shape mismatch" in doc["skipped"][0]["reason"]
    res = _run("interfere", "--base", str(tmp_path / "base.safetensors"), str(tmp_path / "a.safetensors"),
               str(tmp_path / "other.safetensors"), "--json", "--no-plots")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert any(s["name"] == q and "shape mismatch" in s["reason"] for s in doc["skipped"]), doc["skipped"]


def test_vllm_warning_only_when_the_asked_rank_is_rounded(small_pairs, tmp_path):
    """The warning fired whenever any module's rank differed from --rank (a module smaller than it) and
    named the largest module rank: `--rank 16 rounded up to 16`."""
    (base, tuned), _ = small_pairs
    res = _run("extract", str(base), str(tuned), "-r", "16", "--serving", "vllm", "-o", str(tmp_path / "x"), "--no-plots")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "x" / "extract.json").read_text())
    assert not any("rounded up" in w for w in doc["warnings"]), doc["warnings"]


def test_positions_refused_only_for_learned_tables(tmp_path):
    """--seq-len above max_position_embeddings was refused for every model; rotary models (Llama) run
    longer sequences (a context-extension fine-tune), only learned tables (GPT-2, OPT) cannot."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    from spectra.errors import SpectraError
    from spectra.training_inputs import check_positions

    check_positions(tmp_path, LlamaConfig(max_position_embeddings=64).to_dict(), 128)
    for cfg in (GPT2Config(n_positions=64).to_dict(), OPTConfig(max_position_embeddings=64).to_dict()):
        with pytest.raises(SpectraError, match="longer than the model's 64 positions"):
            check_positions(tmp_path, cfg, 128)


def test_portable_fingerprint_reads_the_folder_names_not_the_link_targets(tmp_path):
    """A rank reading a hub snapshot (model.safetensors -> blobs/<sha>) and one reading a plain copy of the
    same files were refused as "other inputs": the portable fingerprint took the link target's name."""
    import shutil

    from spectra.config import DiffConfig
    from spectra.io.checkpoint import open_checkpoint
    from spectra.journal import run_fingerprint

    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "snap" / "blobs").mkdir(parents=True)  # spectra reads links only inside the folder given
    shutil.copy(tmp_path / "w.safetensors", tmp_path / "snap" / "blobs" / "0123abcd")
    (tmp_path / "snap" / "model.safetensors").symlink_to("blobs/0123abcd")
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "w.safetensors", tmp_path / "copy" / "model.safetensors")
    cfg = DiffConfig()
    a, b = open_checkpoint(str(tmp_path / "snap")), open_checkpoint(str(tmp_path / "copy"))
    assert run_fingerprint(a, a, cfg, portable=True) == run_fingerprint(b, b, cfg, portable=True)
    assert run_fingerprint(a, a, cfg) != run_fingerprint(b, b, cfg)  # --resume still tells the paths apart
