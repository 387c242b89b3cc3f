"""Thirteenth round of hostile inputs (docs/bad_inputs.md, "thirteenth round"): each case failed, or
said less than the truth, on the code before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra_cli.main import main
from tests.conftest import weight_folders

NAME = "model.layers.0.self_attn.q_proj.weight"


def _json(output: str) -> dict:
    return json.JSONDecoder().raw_decode(output[output.index("{"):])[0]


def _run(args: list[str]):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return r


def _folders(root: Path, weights: dict[str, torch.Tensor]) -> dict[str, Path]:
    return weight_folders(root, weights, NAME)


# ---- compare: one side zero, the other rounding noise --------------------------------------------------------
def test_compare_zero_and_rounding_noise_says_both(tmp_path):
    """A is an exact copy of the base (ΔW = 0), B only rounding noise: the reason said only that A is
    zero, as if B's update had been measured."""
    g = torch.Generator().manual_seed(3)
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    noise = W + 1e-9 * W.abs().max() * torch.randn(64, 64, generator=g, dtype=torch.float64)
    f = _folders(tmp_path, {"base": W, "same": W, "noise": noise})
    d = _json(_run(["compare", str(f["same"]), str(f["noise"]), "--base", str(f["base"]), "--json",
                      "--allow-identical"]).output)  # (without it exit 3: A's update is zero everywhere)
    (m,) = d["modules"]
    assert m["status"] == "zero_update" and m["fro_b"] > 0
    assert "ΔW of A is exactly zero" in m["reason"]
    assert "every singular value of B's update is at the rounding level of its float32 weights" in m["reason"]


def test_compare_finding_side_comes_from_the_ranks_not_the_reason_text():
    """The unresolved finding counted sides by searching the reason for "of A's": a record whose reason
    is worded otherwise (or absent, in a results.json of another version) was counted as B's."""
    from spectra.compare_findings import compare_findings
    from spectra.compare_records import ComparedModule, CompareResult

    mod = ComparedModule(name=NAME, layer=0, module="q_proj", role="attn", out=64, in_=64, rank_a=0, rank_b=3,
                         fro_a=1e-9, fro_b=1.0, status="unresolved", reason=None)
    res = CompareResult(a="a", b="b", base="base", kinds={"a": "full", "b": "full"}, config={"side": "right"}, modules=[mod])
    (found,) = [x for x in compare_findings(res) if x.topic == "unresolved"]
    assert found.numbers["by_side"] == {"A": 1}


# ---- numeric checks of one very long row -----------------------------------------------------------------------
_LONG_ROW = """
import resource, torch
from spectra.numerics import numeric_flags
n = 1 << 23
b = torch.randn(1, n); t = b + 1e-3 * torch.randn(1, n); d = t - b
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert numeric_flags(b, t, d, base_dtype="float32", tuned_dtype="float32", block=1 << 20) == []
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_numeric_checks_of_one_long_row_stay_within_blocks():
    """A 1×8M float32 update (32 MiB a side): the quantisation-grid check sorted whole sampled rows in
    float64 with their indices and the pass went a row at a time, ~15x the row's size; now blocks of
    columns and a column sample bound the temporaries."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _LONG_ROW], capture_output=True, text=True, timeout=300, check=True).stdout
    assert int(out.split()[-1]) < 3 * (1 << 23) * 4


def test_grid_check_on_a_column_sample_sees_a_dequantised_grid():
    """Rows longer than the column sample still read as quantised (int8 codes × scale) on one side."""
    from spectra.numerics import GRID_SAMPLE_COLS, numeric_flags

    g = torch.Generator().manual_seed(0)
    n = 3 * GRID_SAMPLE_COLS + 7
    base = torch.randn(2, n, generator=g)
    tuned = torch.randint(-127, 128, (2, n), generator=g).float() * 0.01
    (note,) = [x for x in numeric_flags(base, tuned, tuned - base, base_dtype="float32", tuned_dtype="float32")
               if x.code == "quantisation_grid"]
    assert "tuned appears quantised" in note.message


# ---- train: a step beyond reason is refused before the data is read ------------------------------------------
def test_train_step_size_refusal_comes_before_the_data(tmp_path):
    """--batch 1e20 was refused after the data was read and tokenised, with "(the data holds N training
    blocks)" counting only the pool read so far; a data file too short for one block was blamed first."""
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    (tmp_path / "data.txt").write_text("x", encoding="utf-8")
    r = CliRunner().invoke(main, ["train", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "data.txt"), "--steps", "1",
                                  "--batch", "100000000000000000000", "--seq-len", "16", "--device", "cpu", "-o", str(tmp_path / "run")])
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert "more tokens per step than 2,147,483,648" in " ".join(r.output.split()) and "training blocks" not in r.output, last


# ---- quantised checkpoints of formats spectra does not dequantise ---------------------------------------------
def _tiny_weights(seed: int = 0, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g), "lm_head.weight": torch.randn(64, 32, generator=g)}
    for i in range(layers):
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"):
            w[f"model.layers.{i}.{m}.weight"] = torch.randn(32, 32, generator=g)
    return w


def _packed(w: dict[str, torch.Tensor], g: torch.Generator, fmt: str) -> dict[str, torch.Tensor]:
    """``w`` with each layer matrix (32×32) replaced by a ``fmt`` export of random codes: ``"gptq"`` (int32
    ``qweight``, ``qzeros``, fp16 ``scales``, ``g_idx``) or ``"mlx"`` (packed ``weight``, fp16 ``scales`` and
    ``biases``); embeddings and head kept."""
    def codes(shape: tuple[int, int]) -> torch.Tensor:
        return torch.randint(0, 2**31 - 1, shape, dtype=torch.int32, generator=g)

    out = {}
    for k, v in w.items():
        if ".layers." not in k:
            out[k] = v
            continue
        p = k.removesuffix(".weight")
        if fmt == "gptq":
            out.update({p + ".qweight": codes((4, 32)), p + ".qzeros": codes((1, 4)),
                        p + ".scales": (torch.rand(1, 32, generator=g) * 0.01).half(), p + ".g_idx": torch.zeros(32, dtype=torch.int32)})
        else:
            out.update({k: codes((32, 4)), p + ".scales": (torch.rand(32, 1, generator=g) * 0.01).half(),
                        p + ".biases": (torch.rand(32, 1, generator=g) * 0.01).half()})
    return out


def _save(folder: Path, w: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in w.items()}, folder / "model.safetensors")
    return folder


def test_gptq_and_mlx_scales_are_not_analysed_as_weight_matrices(tmp_path):
    """GPTQ/AWQ's fp16 ``X.scales`` and MLX's ``X.scales``/``X.biases`` were diffed as weight matrices
    (table rows, findings, esd α) with exit 0; now each is a quantisation parameter of X's packed weight,
    the packed weights are skipped naming the format, and a warning says what the findings cover."""
    w = _tiny_weights()
    tuned = {k: v + 0.01 for k, v in w.items()}
    def quantise(w: dict[str, torch.Tensor], g: torch.Generator, fmt: str) -> dict[str, torch.Tensor]:
        out = _packed(w, g, "gptq" if fmt == "gptq" else "mlx")
        return {k.replace(".biases", ".qbiases"): v for k, v in out.items()} if fmt == "metal" else out  # transformers' metal

    for name in ("gptq", "mlx", "metal"):
        base = _save(tmp_path / f"{name}_b", quantise(w, torch.Generator().manual_seed(1), name))
        tun = _save(tmp_path / f"{name}_t", quantise(tuned, torch.Generator().manual_seed(2), name))
        r = CliRunner().invoke(main, ["diff", str(base), str(tun), "--out", str(tmp_path / f"o_{name}"), "--no-plots"])
        assert r.exit_code == 0, r.output
        d = json.loads((tmp_path / f"o_{name}" / "results.json").read_text())
        assert sorted(m["name"] for m in d["modules"]) == ["lm_head.weight", "model.embed_tokens.weight"]
        reasons = {s["name"]: s["reason"] for s in d["skipped"]}
        fmt = {"gptq": "GPTQ/AWQ", "mlx": "MLX", "metal": "metal"}[name]
        assert f"model.layers.0.self_attn.q_proj's {fmt} weight" in reasons["model.layers.0.self_attn.q_proj.scales"]
        packed = "model.layers.0.self_attn.q_proj." + ("qweight" if name == "gptq" else "weight")
        assert f"packed by {fmt} quantisation" in reasons[packed] and "dequantise it first" in reasons[packed]
        assert "6 matrices were skipped" in " ".join(r.output.split()) and "findings cover the 2 matrices analysed only" in " ".join(r.output.split())
        e = CliRunner().invoke(main, ["esd", str(tun), "--json"])
        assert not any(x["name"].endswith((".scales", ".biases")) for x in _json(e.output)["matrices"]), e.output


def test_bnb4_both_sides_is_not_called_the_same_weights(tmp_path):
    """Two bitsandbytes-4bit checkpoints whose packed codes differ, embeddings frozen: exit 3 "base and
    tuned hold the same weights" (the 14 quantised matrices skipped for their dtype decided nothing)."""
    w = _tiny_weights()

    def bnb4(seed: int) -> dict[str, torch.Tensor]:
        g, out = torch.Generator().manual_seed(seed), {}
        for k, v in w.items():
            if ".layers." in k:
                out[k] = torch.randint(0, 255, (v.numel() // 2, 1), dtype=torch.uint8, generator=g)
                out[k + ".absmax"] = torch.rand(v.numel() // 64, generator=g)
                out[k + ".quant_map"] = torch.linspace(-1, 1, 16)
                out[k + ".quant_state.bitsandbytes__nf4"] = torch.randint(0, 255, (120,), dtype=torch.uint8, generator=g)
            else:
                out[k] = v
        return out

    base, tun = _save(tmp_path / "b", bnb4(1)), _save(tmp_path / "t", bnb4(2))
    r = CliRunner().invoke(main, ["diff", str(base), str(tun), "--out", str(tmp_path / "o"), "--no-plots"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 3 and "same weights" not in flat, r.output
    assert "6 matrices were skipped" in flat and "bitsandbytes 4-bit" in flat
    d = json.loads((tmp_path / "o" / "results.json").read_text())
    reasons = {s["name"]: s["reason"] for s in d["skipped"]}
    assert "bitsandbytes 4-bit weight" in reasons["model.layers.0.mlp.up_proj.weight.absmax"]


def test_wrapper_components_inside_names_pair(tmp_path):
    """Activation checkpointing / FSDP / per-block torch.compile put ``_checkpoint_wrapped_module``,
    ``_fsdp_wrapped_module``, ``_orig_mod`` inside names (``named_parameters()``): only the embedding
    and head paired, exit 0 with findings about "the update" and no warning."""
    w = _tiny_weights()
    g = torch.Generator().manual_seed(5)
    tuned = {}
    for k, v in w.items():
        k2 = k.replace("model.layers.0.", "model.layers.0._checkpoint_wrapped_module.").replace(
            "model.layers.1.", "_fsdp_wrapped_module.model.layers.1._orig_mod.")
        tuned[k2] = v + 0.01 * torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
    base, tun = _save(tmp_path / "b", w), _save(tmp_path / "t", tuned)
    r = CliRunner().invoke(main, ["diff", str(base), str(tun), "--out", str(tmp_path / "o"), "--no-plots"])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(d["modules"]) == 8 and not any(d["unmatched"].values())
    for m in d["modules"]:
        if "layers" in m["name"]:
            assert m["energy_rank"]["0.9"] <= 2 and m["layer"] in (0, 1)


def test_matrix_skip_reasons_are_classified_as_pairing_words_them():
    """results.is_matrix_skip reads pairing's reasons: each non-matrix reason must stay one."""
    from spectra.results import is_matrix_skip

    assert not is_matrix_skip("1-D tensor (norm or bias), not a weight matrix")
    assert not is_matrix_skip("empty tensor (shape (0, 16)): nothing to analyse")
    assert not is_matrix_skip("quantisation scale of x.weight; applied to it")
    assert not is_matrix_skip("activation/cache quantisation scale (input_scale), not a weight")
    assert not is_matrix_skip("quantisation parameter (scales) of x's GPTQ/AWQ weight, which spectra does not dequantise: …")
    assert is_matrix_skip("shape mismatch: base (4, 4) vs tuned (4, 5)")
    assert is_matrix_skip("tuned dtype int8 is not a float weight (quantised checkpoints are not supported)")
    assert is_matrix_skip("tuned weights contain NaN or Inf; ΔW is undefined")
    # an adapter's own reasons (review): none is a matrix left out
    assert not is_matrix_skip("lora_B.bias of x: a vector, not a weight matrix; the weight update s·B·A is analysed")
    assert not is_matrix_skip("copy of the base layer PEFT saves whole beside a LoRA on an embedding or output head, not an update")
    assert not is_matrix_skip("DoRA magnitude, but use_dora is false in adapter_config.json: PEFT does not load it")


def test_buffers_on_one_side_do_not_make_a_coverage_warning(tmp_path):
    """A base with rotary ``inv_freq`` buffers (original Llama-2 files) against a tuned model without them:
    "2 base-only tensors were not paired … the findings cover the 8 matrices analysed only" (review)."""
    w = _tiny_weights()
    g = torch.Generator().manual_seed(4)
    t = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in w.items()}
    w.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(2)})
    b, tt = _save(tmp_path / "b", w), _save(tmp_path / "t", t)
    r = CliRunner().invoke(main, ["diff", str(b), str(tt), "--out", str(tmp_path / "o"), "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "findings cover" not in " ".join(r.output.split())


# ---- a top-k cut inside tied singular values -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trace_turn_of_a_rescaled_update_with_a_tie_at_the_cut_is_none(tmp_path, dtype):
    """Checkpoint 2's update is 1.5x checkpoint 1's, σ = 2 (x5), 1 (x6): --top-k 8 cut the tie, each
    checkpoint's top-8 was an arbitrary part of the tied span and trace reported a turn (φ 0.81, 83°)."""
    g = torch.Generator().manual_seed(11)
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(64, 11, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(64, 11, generator=g, dtype=torch.float64))[0]
    D = 0.01 * (U * torch.tensor([2.0] * 5 + [1.0] * 6, dtype=torch.float64)) @ V.T
    for who, w in {"base": W, "run/checkpoint-1": W + D, "run/checkpoint-2": W + 1.5 * D}.items():
        (tmp_path / who).mkdir(parents=True)
        save_file({NAME: w.to(dtype)}, tmp_path / who / "model.safetensors")
    for step in (1, 2):
        (tmp_path / f"run/checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    _run(["trace", str(tmp_path / "base"), str(tmp_path / "run"), "--out", str(tmp_path / "t"), "--no-plots"])
    (tm,) = json.loads((tmp_path / "t" / "trace.json").read_text())["matrices"]
    turn = tm["points"][1]["turn_prev"]
    for side in ("left", "right"):
        assert turn[side]["phi"] > 1 - 1e-6, turn


def test_trace_turn_across_a_missing_checkpoint_says_which_step(tmp_path):
    """The matrix is missing from checkpoint 20: point 30's turn_prev was measured against step 10 with
    nothing saying "previous" was two checkpoints back."""
    g = torch.Generator().manual_seed(12)
    other = "model.layers.0.self_attn.k_proj.weight"
    W = {NAME: 0.02 * torch.randn(32, 32, generator=g), other: 0.02 * torch.randn(32, 32, generator=g)}
    U, V = torch.randn(32, 2, generator=g), torch.randn(2, 32, generator=g)
    ckpts = {10: {k: w + 0.01 * U @ V for k, w in W.items()}, 20: {other: W[other] + 0.02 * U @ V},
             30: {k: w + 0.03 * U @ V for k, w in W.items()}}
    (tmp_path / "base").mkdir()
    save_file(W, tmp_path / "base" / "model.safetensors")
    for step, sd in ckpts.items():
        d = tmp_path / "run" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file(sd, d / "model.safetensors")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    r = CliRunner().invoke(main, ["trace", str(tmp_path / "base"), str(tmp_path / "run"), "--out", str(tmp_path / "t"), "--no-plots"])
    assert r.exit_code == 0, r.output
    tm = {m["name"]: m for m in json.loads((tmp_path / "t" / "trace.json").read_text())["matrices"]}
    p10, p20, p30 = tm[NAME]["points"]
    assert "skip" in p20 and p30["turn_prev"] is not None
    assert p30["turn_note"].startswith("turn_prev is from step 10") and "step 20 has none" in p30["turn_note"]
    assert all("turn_note" not in p for p in tm[other]["points"])
    assert "rounding level" not in r.output


# ---- the Python API in a notebook's process ------------------------------------------------------------------
def test_config_numpy_scalars_become_plain_values():
    """np.int64 top_k / seed, np.bool_ split_fused passed the type check and then failed (a JSON
    fingerprint, a slice, manual_seed); a float32 τ became 0.8999999761581421 (a column named so)."""
    import numpy as np

    from spectra.config import CompareConfig, DiffConfig

    c = DiffConfig(top_k=np.int64(5), seed=np.int64(0), split_fused=np.bool_(True), max_batch=np.int64(4),
                   thresholds=(np.float32(0.9),))
    assert (type(c.top_k), type(c.seed), type(c.split_fused), type(c.max_batch)) == (int, int, bool, int)
    assert c.thresholds == (0.9,)
    json.dumps(vars(c))
    cc = CompareConfig(seed=1.0, intruder_k=10.0, top_k=np.uint8(10))
    assert (cc.seed, cc.intruder_k, cc.top_k) == (1, 10, 10) and type(cc.top_k) is int


def _small_pair(root: Path) -> tuple[Path, Path]:
    w = _tiny_weights()
    g = torch.Generator().manual_seed(8)
    t = {k: v + 0.01 * torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g) for k, v in w.items()}
    return _save(root / "b", w), _save(root / "t", t)


def test_figures_ignore_a_users_usetex(tmp_path, monkeypatch):
    """rcParams["text.usetex"] = True without LaTeX: diff computed everything, then raised "latex could
    not be found" (no result object, diff_config.json missing)."""
    import matplotlib

    import spectra

    b, t = _small_pair(tmp_path)
    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)
    monkeypatch.setenv("PATH", str(tmp_path / "no-latex-here"))
    res = spectra.diff(str(b), str(t), out_dir=tmp_path / "o")
    assert res.complete and (tmp_path / "o" / "rank_heatmap.png").is_file() and (tmp_path / "o" / "diff_config.json").is_file()
    assert matplotlib.rcParams["text.usetex"] is True


def test_a_second_thread_of_one_process_cannot_write_the_same_folder(tmp_path):
    """Two threads diffing into one out_dir: flock tells processes apart, not threads, so both ran and
    interleaved their journals; a later resume returned the other run's numbers."""
    import threading

    from spectra.errors import OutputError
    from spectra.io.files import OutputLock

    out = tmp_path / "o"
    out.mkdir()
    held, done, errors = threading.Event(), threading.Event(), []

    def holder() -> None:
        lock = OutputLock.acquire(out)
        held.set()
        done.wait(30)
        lock.release()

    th = threading.Thread(target=holder)
    th.start()
    held.wait(30)
    try:
        OutputLock.acquire(out)
    except OutputError as exc:
        errors.append(str(exc))
    finally:
        done.set()
        th.join()
    assert errors and "another spectra run of this process" in errors[0]
    OutputLock.acquire(out).release()  # the holder has finished: free again
    again = OutputLock.acquire(out)  # this thread's own nested lock still passes
    OutputLock.acquire(out).release()
    again.release()


def test_figures_are_not_forked_while_a_users_thread_runs():
    """A user's thread drawing with matplotlib at the fork left the child waiting on its lock; the parent
    gave up after 300 s per figure set. With a thread not spectra's own alive, run_split works in-process."""
    import os
    import threading

    from spectra.plots.base import foreign_threads, run_split

    stop = threading.Event()
    th = threading.Thread(target=stop.wait, name="user-plotting")
    th.start()
    try:
        assert "user-plotting" in foreign_threads()
        assert run_split([os.getpid, os.getpid]) == [os.getpid()] * 2  # both here, none in a child
    finally:
        stop.set()
        th.join()


_META = """
import sys, torch
torch.set_default_device("meta")
import spectra
from spectra.esd_run import esd
r = spectra.diff(sys.argv[1], sys.argv[2])
c = spectra.compare(sys.argv[2], sys.argv[2], base=sys.argv[1])
e = esd(sys.argv[2])
print(r.modules[0].fro_norm, len(c.modules), len(e.matrices), torch.get_default_device())
"""


def test_a_meta_default_device_does_not_reach_spectras_tensors(tmp_path):
    """torch.set_default_device("meta") in a notebook: every command failed with "Cannot copy out of meta
    tensor"; now each entry point makes its unplaced tensors on the CPU, and the caller's setting stays."""
    import subprocess
    import sys

    b, t = _small_pair(tmp_path)
    out = subprocess.run([sys.executable, "-c", _META, str(b), str(t)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    fro, n_cmp, n_esd, dev = out.stdout.split()
    assert float(fro) > 0 and int(n_cmp) == 8 and int(n_esd) == 8 and dev == "meta"


def test_esd_tail_tied_up_to_float32_rounding_is_not_a_power_law():
    """Eigenvalues 8, 4, 2, 1 (ten each) stored in float32 differ by ~1e-8 in the top ten: α = 2.2e8,
    status "success", "under-trained" (an exact tie fails the fit instead); now failed with the reason."""
    import numpy as np

    from spectra.esd import esd_metrics

    rng = np.random.default_rng(11)
    U = np.linalg.qr(rng.standard_normal((80, 40)))[0]
    V = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    W = ((U * np.sqrt(np.repeat([8.0, 4.0, 2.0, 1.0], 10))) @ V.T).astype(np.float32).astype(np.float64)
    lam = np.linalg.svd(W, compute_uv=False) ** 2
    assert lam.max() / lam[:10].min() - 1 > 0  # the stored tie is split
    m = esd_metrics(lam, W.shape)
    assert m.alpha is None and m.status == "failed" and "equal within a millionth" in m.fit_note


def test_compare_widens_a_cut_inside_a_tie_as_trace_does(tmp_path):
    """compare of an update and its 1.5x rescaling, σ = 2 (x5), 1 (x6), --top-k 8: φ 0.84 and cosines
    down to 0.32 (two arbitrary parts of the tied span) where trace, on the same pair, says φ = 1."""
    g = torch.Generator().manual_seed(0)
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(64, 11, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(64, 11, generator=g, dtype=torch.float64))[0]
    D = 0.01 * (U * torch.tensor([2.0] * 5 + [1.0] * 6, dtype=torch.float64)) @ V.T
    f = _folders(tmp_path, {"base": W, "a": W + D, "b": W + 1.5 * D})
    d = _json(_run(["compare", str(f["a"]), str(f["b"]), "--base", str(f["base"]), "--top-k", "8", "--side", "both",
                    "--json"]).output)
    (m,) = d["modules"]
    assert m["rank_a"] == m["rank_b"] == 11 and "cut through tied singular values" in m["note"]
    for side in ("left", "right"):
        assert m["phi"][side]["phi_full"] > 1 - 1e-6 and min(m["angles"][side]["cosines"]) > 1 - 1e-6
    assert m["amplification"]["a"]["r"] == 11


def test_rich_progress_refresher_does_not_stop_forked_figures():
    """The CLI's progress bar runs rich's refresh thread in every command: taken for a user's thread, it
    turned the parallel figure drawing off in every CLI run (review of this round)."""
    from rich.progress import Progress

    from spectra.plots.base import foreign_threads

    with Progress(auto_refresh=True, transient=True) as bar:
        bar.add_task("x", total=1)
        assert foreign_threads() == []


def test_trace_of_adapters_says_which_step_turn_prev_is_from(tmp_path):
    """Three LoRA adapters, v_proj missing from the middle one: step 3's turn_prev was measured against
    step 1 with no word (the full-checkpoint path said so; review of this round)."""
    import transformers as T
    from peft import LoraConfig, get_peft_model

    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    for step, targets in ((1, ["q_proj", "v_proj"]), (2, ["q_proj"]), (3, ["q_proj", "v_proj"])):
        torch.manual_seed(step)
        p = get_peft_model(T.LlamaForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(r=4, target_modules=targets))
        with torch.no_grad():
            for n, t in p.named_parameters():
                if "lora_B" in n:
                    t.normal_(0, 0.01)
        p.save_pretrained(tmp_path / f"step{step}")
    d = _json(_run(["trace", str(tmp_path / "base"), *(str(tmp_path / f"step{s}") for s in (1, 2, 3)), "--json",
                    "--device", "cpu"]).output)
    (v,) = [m for m in d["matrices"] if "v_proj" in m["name"]]
    assert v["points"][2]["turn_note"].startswith("turn_prev is from step 1")
    (q,) = [m for m in d["matrices"] if "q_proj" in m["name"]]
    assert all("turn_note" not in p for p in q["points"])


def test_float32_precision_keeps_the_float64_energy_ranks(tmp_path):
    """--precision float32 promised energy ranks "stay right": with a tail of 1e-4 of the energy the plain
    float32 spectrum moved rank[0.99995] by dozens; now each matrix is certified or solved in float64."""
    import numpy as np

    import spectra
    from spectra.config import DiffConfig

    rng = np.random.default_rng(3)
    p = 512
    U = np.linalg.qr(rng.standard_normal((p, p)))[0]
    V = np.linalg.qr(rng.standard_normal((p, p)))[0]
    s = np.full(p, np.sqrt(1e-4 / (p - 1)))
    s[0] = 1.0
    W = 0.02 * rng.standard_normal((p, p))
    T = (W + (U * s) @ V.T).astype(np.float32)
    W32 = W.astype(np.float32)
    save_file({NAME: torch.from_numpy(W32)}, tmp_path / "b.safetensors")
    save_file({NAME: torch.from_numpy(T)}, tmp_path / "t.safetensors")
    sv = np.linalg.svd((T - W32).astype(np.float64), compute_uv=False)  # ΔW as spectra forms it (float32), in float64
    taus = (0.999, 0.9999, 0.99995)
    energy = np.cumsum(sv**2) / np.sum(sv**2)
    want = {str(t): int(np.searchsorted(energy, t) + 1) for t in taus}
    res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
                       config=DiffConfig(precision="float32", thresholds=taus))
    (m,) = res.modules
    assert m.energy_rank == want, (m.energy_rank, want, m.method)


def test_a_float32_difference_beyond_float32s_range_is_formed_in_float64(tmp_path):
    """One entry of float32 (or bf16) weights going from -3e38 to +3e38: ΔW "overflows float32 … its
    spectrum is undefined", skipped (exit 1 when alone), though its float64 difference is finite."""
    import numpy as np

    import spectra

    rng = np.random.default_rng(3)
    b = rng.uniform(-1, 1, (32, 24)) * 1e37
    t = b.copy()
    t[0, 0], b[0, 0] = 3e38, -3e38
    for dt in (torch.float32, torch.bfloat16):
        bb, tt = torch.from_numpy(b).to(dt), torch.from_numpy(t).to(dt)
        save_file({NAME: bb}, tmp_path / "b.safetensors")
        save_file({NAME: tt}, tmp_path / "t.safetensors")
        res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
        (m,) = res.modules
        sv = np.linalg.svd(tt.double().numpy() - bb.double().numpy(), compute_uv=False)
        assert not res.skipped and abs(m.fro_norm / np.linalg.norm(sv) - 1) < 1e-12 and abs(m.spectral_norm / sv[0] - 1) < 1e-12


def test_compare_widened_on_one_side_only(tmp_path):
    """A's cut lies inside a tie of 12 values (widened to 16), B's smooth spectrum has 9 triplets computed:
    captured_energy raised "dW must hold at least r = 16 singular values" (probe of this round's fix)."""
    g = torch.Generator().manual_seed(1)
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)

    def planted(s: list[float]) -> torch.Tensor:
        U = torch.linalg.qr(torch.randn(64, len(s), generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(64, len(s), generator=g, dtype=torch.float64))[0]
        return (U * torch.tensor(s, dtype=torch.float64)) @ V.T

    f = _folders(tmp_path, {"base": W, "a": W + 0.01 * planted([2.0] * 4 + [1.0] * 12),
                            "b": W + 0.01 * planted(torch.linspace(2, 0.5, 20).tolist())})
    d = _json(_run(["compare", str(f["a"]), str(f["b"]), "--base", str(f["base"]), "--top-k", "8", "--json"]).output)
    (m,) = d["modules"]
    assert (m["rank_a"], m["rank_b"]) == (16, 8) and 0 < m["captured"]["b_in_a"]["two_sided"] <= 1


# ---- extract: one LoRA per weight a tied base shares ---------------------------------------------------------
@pytest.mark.parametrize("base_as", ["folder", "bin"])
def test_extract_writes_one_lora_for_a_tied_embedding_and_head(tmp_path, base_as):
    """A tied base, the tuned copy saved with torch.save(model.state_dict()) (it keeps lm_head.weight):
    extract --embeddings wrote an embedding LoRA and a head LoRA, and PEFT's merge put both into the one
    shared tensor (twice the update: error 1.0 where extract.json said 0.06). A base saved as a full .bin
    (head stored, config tied) did the same without a word."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_llama

    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "base")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    if base_as == "bin":
        torch.save(base_sd, tmp_path / "base" / "pytorch_model.bin")
        (tmp_path / "base" / "model.safetensors").unlink()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb += 0.01 * torch.randn(emb.shape[0], 3, generator=g) @ torch.randn(3, emb.shape[1], generator=g)
    torch.save(model.state_dict(), tmp_path / "tuned.pt")  # lm_head.weight kept: the same tensor as the embedding
    out = tmp_path / "ex"
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "base"), str(tmp_path / "tuned.pt"), "-o", str(out), "-r", "3",
                                  "--embeddings", "--no-plots"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "extract.json").read_text())
    assert not any(m["name"] == "lm_head.weight" for m in doc["modules"]) and "one LoRA" in " ".join(doc["warnings"])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out).merge_and_unload()
    got = merged.model.embed_tokens.weight.double()
    assert torch.allclose(got, emb.double(), atol=1e-6), float((got - emb.double()).abs().max())  # rank 3 of a rank-3 update


def test_recommend_names_modules_as_the_base_does(tmp_path):
    """diff of a tuned copy saved through DDP (``module.`` names), then recommend: rank_pattern keys
    ``module.model.layers…``, which PEFT ignored ("did not match any targeted module"), every module at the
    global r (extract already named modules by the base; recommend did not)."""
    import spectra
    from spectra.recommend import recommend
    from tests.conftest import tiny_llama

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(2)
    tuned = {}
    for k, v in model.state_dict().items():
        if v.ndim == 2 and "layers" in k:
            r = 1 + len(tuned) % 3  # ranks 1, 2, 3: a pattern to keep
            v = v + 0.01 * torch.randn(v.shape[0], r, generator=g) @ torch.randn(r, v.shape[1], generator=g)
        tuned["module." + k] = v.contiguous()
    save_file(tuned, tmp_path / "tuned.safetensors")
    spectra.diff(str(tmp_path / "base"), str(tmp_path / "tuned.safetensors"), out_dir=tmp_path / "d", plots=False)
    rec = recommend(tmp_path / "d" / "results.json", energy=0.999)
    keys = [*rec.config["rank_pattern"], *rec.config["target_modules"]]
    assert keys and not any(k.startswith("module.") for k in keys), keys
    assert len(set(rec.config["rank_pattern"].values())) > 1
    (tmp_path / "base").rename(tmp_path / "moved")  # no base to read the names from: said, not silent (review)
    assert any("cannot be read now" in n for n in recommend(tmp_path / "d" / "results.json", energy=0.999).notes)


def test_compare_tie_tolerance_counts_every_direction_as_interfere_does(tmp_path):
    """float32 256², σ₈ − σ₉ = 2.5e-8 (2.6e-6·σ₁: not tied by trace's or interfere's rule): compare took the
    floor's share over the 9 triplets it had, not over p = 256, and called the cut a tie (ranks 9)."""
    import numpy as np

    rng = np.random.default_rng(2)
    d = 256
    W = 0.02 * rng.standard_normal((d, d))
    s = np.array([0.01 - 0.0006 * i for i in range(8)] + [0.01 - 0.0042 - 2.5e-8 * j for j in range(1, 4)] + [0.003, 0.002])
    U = np.linalg.qr(rng.standard_normal((d, len(s))))[0]
    V = np.linalg.qr(rng.standard_normal((d, len(s))))[0]
    D = (U * s) @ V.T
    f = _folders(tmp_path, {"base": torch.from_numpy(W), "a": torch.from_numpy(W + D), "b": torch.from_numpy(W + 1.5 * D)})
    d_ = _json(_run(["compare", str(f["a"]), str(f["b"]), "--base", str(f["base"]), "--top-k", "8", "--json"]).output)
    (m,) = d_["modules"]
    assert (m["rank_a"], m["rank_b"]) == (8, 8) and "tied" not in (m["note"] or "")


def test_a_flat_spectrum_cut_is_said_to_be_undetermined(tmp_path):
    """c·orthogonal updates (every σ equal) at --top-k 8: the cluster is too wide to widen, so the top-8
    subspace is arbitrary; compare, interfere and trace reported φ ≈ 0.1 as a measured turn, with no word."""
    g = torch.Generator().manual_seed(6)
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    f = _folders(tmp_path, {"base": W, "a": W + 0.01 * Q, "b": W + 0.015 * Q})
    d = _json(_run(["compare", str(f["a"]), str(f["b"]), "--base", str(f["base"]), "--top-k", "8", "--json"]).output)
    (m,) = d["modules"]
    assert "too wide to widen" in m["note"]
    d = _json(_run(["interfere", "--base", str(f["base"]), str(f["a"]), str(f["b"]), "--top-k", "8", "--json", "--no-plots"]).output)
    (m,) = d["modules"]
    assert "not determined" in m["note"]


def test_csv_text_cells_are_not_shortened():
    """CSV cells went through the console's 120-character shortening: a compare note lost its middle
    ("…t through tied singular values: its top 11…") and a long tensor name would too."""
    from spectra.results import csv_text

    note = "A's rank 8 cut through tied singular values: its top 11, the whole tie, are compared; " * 3
    assert csv_text(note) == note and csv_text("x" * 500) == "x" * 500


def test_extract_tied_gpt2_whose_config_leaves_the_tie_out(tmp_path):
    """GPT-2's config.json leaves tie_word_embeddings out (its class defaults to True): a base saved as a
    full .bin (head stored) against a tuned .pt still got two LoRAs, merged twice (review)."""
    import transformers as T
    from peft import PeftModel

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=32))
    model.save_pretrained(tmp_path / "base")
    torch.save(model.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    (tmp_path / "base" / "model.safetensors").unlink()
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte += 0.01 * torch.randn(wte.shape[0], 3, generator=g) @ torch.randn(3, wte.shape[1], generator=g)
    torch.save(model.state_dict(), tmp_path / "tuned.pt")
    out = tmp_path / "ex"
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "base"), str(tmp_path / "tuned.pt"), "-o", str(out), "-r", "3",
                                  "--embeddings", "--no-plots"])
    assert r.exit_code == 0, r.output
    merged = PeftModel.from_pretrained(T.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), out).merge_and_unload()
    got = merged.transformer.wte.weight.detach().double()
    assert torch.allclose(got, wte.detach().double(), atol=1e-6), float((got - wte.detach().double()).abs().max())
