"""Hostile and odd inputs to ``spectra train``, ``spectra sweep``, ``spectra demo`` and the Trainer
callback, found by the seventh outside probe: each test reproduces a finding and checks the fix
(one-line errors, nothing half-written, no mixed runs), numbers against float64 numpy."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import spectra.training  # noqa: E402
from spectra.callbacks import SpectraTracker, attach  # noqa: E402
from spectra.errors import ConfigError, OutputError, SpectraError  # noqa: E402
from spectra.training import ByteTokenizer, TrainConfig, read_examples, sweep, token_blocks, train  # noqa: E402
from spectra_cli.main import main  # noqa: E402
from tests.conftest import lock_held_elsewhere


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res) -> str:
    """The error a refused command printed: exit != 0, no traceback, one line."""
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    return lines[-1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("h7train")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    g2 = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(g2).save_pretrained(root / "g2base")
    import pydoc_data.topics as topics

    (root / "target.txt").write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:20_000], encoding="utf-8")
    return root


def _cfg(env: Path, out: Path, **kw) -> TrainConfig:
    args = dict(base=str(env / "base"), data=str(env / "target.txt"), out=str(out), steps=2, batch=2, seq_len=32,
                eval_every=1, eval_batches=1, trace_every=1, device="cpu", lr=1e-2)
    args.update(kw)
    return TrainConfig(**args)


def _cli_train(env: Path, out: Path, *extra: str):
    return _run("train", "--base", env / "base", "--data", env / "target.txt", "--steps", "2", "--batch", "2",
                "--seq-len", "32", "--eval-every", "1", "--trace-every", "1", "--device", "cpu", "-o", out, *extra)


# ---- 1. a used --out: refused unless --force, which removes the earlier run's files ---------------------------
def test_train_into_a_used_out_is_refused_and_force_replaces_the_earlier_run(env, tmp_path):
    out = tmp_path / "run"
    train(_cfg(env, out, rank=4))
    assert (out / "adapter_model.safetensors").is_file()
    line = _one_line_error(_cli_train(env, out, "--method", "full"))
    assert "not empty" in line and "--force" in line
    assert json.loads((out / "train_config.json").read_text())["method"] == "lora"  # untouched
    (out / "notes.txt").write_text("mine")  # not a run's file: --force keeps it
    res = _cli_train(env, out, "--method", "full", "--force")
    assert res.exit_code == 0, res.output
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "train_config.json").read_text())["method"] == "full"


def test_a_stopped_train_says_what_it_wrote(env, tmp_path, monkeypatch):
    out = tmp_path / "stopped"
    calls = []

    def stop_on_second(x):  # the log line of step 1 is written, then the run is stopped (as by Ctrl-C)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return x

    monkeypatch.setattr(spectra.training, "finite_or_null", stop_on_second)
    res = _cli_train(env, out)
    assert res.exit_code == 130
    line = _one_line_error(res)
    assert "nothing was kept" not in line
    assert "stopped by Ctrl-C: no adapter was saved" in line and "train_config.json" in line and "train_log.jsonl" in line
    assert (out / "train_log.jsonl").is_file() and not (out / "adapter_config.json").exists()


# ---- 2. --out is the base model ------------------------------------------------------------------------
def test_out_equal_to_base_is_refused_and_the_base_kept(env, tmp_path):
    base = tmp_path / "base_copy"
    base.mkdir()
    for f in (env / "base").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    before = _sha(base / "model.safetensors")
    for out in (base, tmp_path / "link"):
        if out.name == "link":
            out.symlink_to(base)
        for force in ((), ("--force",)):
            res = _run("train", "--base", base, "--data", env / "target.txt", "--method", "full", "--steps", "1",
                       "--batch", "2", "--seq-len", "32", "--device", "cpu", "-o", out, *force)
            assert "is the base model's folder" in _one_line_error(res)
    assert _sha(base / "model.safetensors") == before


# ---- 3. two runs into one folder ---------------------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_is_refused(env, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    with lock_held_elsewhere(out), pytest.raises(OutputError, match="another spectra run is writing into this folder"):
        train(_cfg(env, out))
    assert sorted(p.name for p in out.iterdir()) == [".spectra.lock"]  # nothing of the refused run


# ---- 4. the Trainer callback on resume_from_checkpoint ----------------------------------------------------
def test_callback_resume_keeps_the_trace_and_the_first_reference(env, tmp_path):
    import peft
    from safetensors.torch import load_file

    ids = torch.tensor(list((env / "target.txt").read_bytes()[:8000]))

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            x = ids[i * 32 : (i + 1) * 32]
            return {"input_ids": x, "labels": x}

    out = tmp_path / "hf"

    def trainer(max_steps: int):
        torch.manual_seed(0)
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(env / "base"),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                                              save_steps=1, save_strategy="steps", logging_steps=1, report_to=[],
                                              learning_rate=1e-2, use_cpu=True, disable_tqdm=True)
        tr = transformers.Trainer(model=model, args=args, train_dataset=Blocks())
        attach(tr, every=1)
        return tr

    trainer(3).train()
    first_run = [line for line in (out / "trace.jsonl").read_text().splitlines() if '"point"' in line]
    trainer(5).train(resume_from_checkpoint=str(out / "checkpoint-3"))
    lines = (out / "trace.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines if '"point"' in line]
    assert sorted({r["step"] for r in recs}) == [1, 2, 3, 4, 5]
    assert [line for line in lines if '"point"' in line][: len(first_run)] == first_run  # steps 1-3 kept as written
    assert sum('"header"' in line for line in lines) == 1 and any("resumed at step 3" in line for line in lines)
    # φ(first, step 5) from the adapters the Trainer saved, in float64 numpy: the reference is step 1, not step 4
    name = "base_model.model.model.layers.0.self_attn.q_proj"

    def right_subspace(step: int) -> np.ndarray:
        sd = load_file(str(out / f"checkpoint-{step}" / "adapter_model.safetensors"))
        delta = sd[f"{name}.lora_B.weight"].double().numpy() @ sd[f"{name}.lora_A.weight"].double().numpy()
        return np.linalg.svd(delta)[2][:4].T

    V1, V4, V5 = right_subspace(1), right_subspace(4), right_subspace(5)
    phi = lambda a, b: float(np.sum((a.T @ b) ** 2) / 4)  # noqa: E731 - Hu et al. 2021, Eq. 4
    rec = next(r for r in recs if r["step"] == 5 and r["matrix"]["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert rec["point"]["turn_first"]["right"]["phi"] == pytest.approx(phi(V1, V5), abs=1e-6)
    assert abs(phi(V1, V5) - phi(V4, V5)) > 1e-4  # the two references differ enough to tell apart
    assert rec["point"]["turn_prev"]["right"]["phi"] == pytest.approx(phi(V4, V5), abs=1e-6)


def test_tracker_skips_non_finite_weights_with_a_warning(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path)
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    assert tracker.step(model, 1) == {}  # no LinAlgError from an SVD of NaN
    text = (tmp_path / "trace.jsonl").read_text()
    assert "hold NaN or inf" in text and "NaN" not in text.replace("hold NaN or inf", "")


# ---- 5. sweep: ranks, seeds and pairs ---------------------------------------------------------------------
@pytest.mark.parametrize("ranks,seeds,why", [("0,2", "0", ">= 1"), ("-2", "0", ">= 1"), ("2,2", "0", "repeats a rank"),
                                             ("2", "0,0", "repeats a seed"), (",", "0", "no rank"),
                                             ("2", str(2**80), "2**63-1")])
def test_sweep_refuses_bad_rank_and_seed_lists(env, tmp_path, ranks, seeds, why):
    res = _run("sweep", "--base", env / "base", "--data", env / "target.txt", "--methods", "lora", "--ranks", ranks,
               "--seeds", seeds, "--steps", "1", "--device", "cpu", "-o", tmp_path / "sw")
    assert res.exit_code == 2 and why in res.output, res.output
    assert not (tmp_path / "sw").exists()


def test_sweep_pairs_runs_within_a_seed(env, tmp_path, monkeypatch):
    trained, compared = [], []

    def fake_train(config, callback=None, force=False):
        trained.append((Path(config.out).name, config.method, config.rank, config.seed))
        return spectra.training.TrainSummary(config.out, config.method, 1, 0.0, 1.0, 1.0, None, 1)

    monkeypatch.setattr(spectra.training, "train", fake_train)
    monkeypatch.setattr(spectra.training, "diff", lambda *a, **k: None)
    monkeypatch.setattr(spectra.training, "compare", lambda a, b, **k: compared.append((Path(a).name, Path(b).name)))
    doc = sweep(str(env / "base"), str(env / "target.txt"), str(tmp_path / "sw"), methods=["lora", "full"], ranks=[4, 2],
                seeds=[0, 1])
    assert all(name.startswith(f"lora{rank}_seed{seed}") or name == f"full_seed{seed}" for name, _, rank, seed in trained)
    expected = {(f"lora{r}_seed{s}", f"full_seed{s}") for r in (2, 4) for s in (0, 1)} | {(f"lora2_seed{s}", f"lora4_seed{s}") for s in (0, 1)}
    assert set(compared) == expected and len(compared) == len(expected)
    assert set(doc["compares"]) == {f"{a}_vs_{b}" for a, b in expected}
    with pytest.raises(ConfigError, match="not empty"):  # sweep.json is there now
        sweep(str(env / "base"), str(env / "target.txt"), str(tmp_path / "sw"), methods=["full"], ranks=[], seeds=[0])
    from spectra.training import check_sweep

    for bad in ([0, 2], [2, 2], []):
        with pytest.raises(ConfigError):
            check_sweep(["lora"], bad, [0])


# ---- 6. a FIFO as --data / --eval-source --------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_data_is_refused_without_blocking(env, tmp_path):
    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    with pytest.raises(SpectraError, match="FIFO"):
        read_examples(fifo)
    assert "FIFO" in _one_line_error(_cli_train(env, tmp_path / "o1", "--data", fifo))
    assert "FIFO" in _one_line_error(_cli_train(env, tmp_path / "o2", "--eval-source", fifo))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ---- 7. NaN in the log, --lr / --alpha, prompt-only blocks --------------------------------------------------
@pytest.mark.parametrize("option,value", [("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"),
                                          ("--alpha", "0"), ("--alpha", "nan"), ("--alpha", "-inf")])
def test_lr_and_alpha_must_be_finite_and_positive(env, tmp_path, option, value):
    res = _cli_train(env, tmp_path / "o", option, value)
    assert res.exit_code == 2 and "must be a finite number > 0" in res.output and "Traceback" not in res.output
    with pytest.raises(ConfigError, match="finite number > 0"):
        _cfg(env, tmp_path / "o", **{option[2:]: float(value)})
    assert not (tmp_path / "o").exists()


def test_a_diverged_run_logs_null_not_nan_and_fails(env, tmp_path):
    out = tmp_path / "div"
    with pytest.raises(SpectraError, match="lower --lr"):
        train(_cfg(env, out, method="full", lr=1e30, steps=3))
    def strict(s):
        raise AssertionError(f"{s} in the log")
    recs = [json.loads(line, parse_constant=strict) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert recs[0]["target_loss"] is not None and recs[-1]["target_loss"] is None  # undefined: null, valid JSON
    for line in (out / "trace.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=strict)
    assert not (out / "model.safetensors").exists()


def test_prompt_only_blocks_are_left_out_and_all_prompt_data_refused(env, tmp_path):
    prompt = "describe the thing in detail please. " * 8
    examples = [(f"Question {i}: {prompt}", "ok.") for i in range(100)]
    ids, labels = token_blocks(examples, ByteTokenizer(), 32)
    # by hand: the token stream and its targets, cut in blocks of 32; a block trains only if it has a target after position 0
    stream = [(b, t) for p, r in examples for b, t in [(x, False) for x in p.encode()] + [(x, True) for x in (r + "\n").encode()]]
    n = len(stream) // 32
    expect = [stream[i * 32 : (i + 1) * 32] for i in range(n) if any(t for _, t in stream[i * 32 + 1 : (i + 1) * 32])]
    assert ids.tolist() == [[b for b, _ in blk] for blk in expect]
    assert bool(((labels[:, 1:] != -100).any(dim=1)).all())
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": prompt, "response": ""}) + "\n" for _ in range(50)) +
                    json.dumps({"prompt": prompt, "response": "x"}) + "\n")
    with pytest.raises(SpectraError, match="hold a response token"):
        token_blocks(read_examples(data), ByteTokenizer(), 32)
    line = _one_line_error(_cli_train(env, tmp_path / "o", "--data", data))
    assert "hold a response token" in line and "lower --lr" not in line


# ---- 8. tracebacks that are now one-line errors, with nothing left behind -------------------------------------
def test_bad_options_and_model_folders_are_one_line_errors(env, tmp_path):
    def model(name: str, edit) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in (env / "base").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    bad_json = model("badjson", lambda d: (d / "config.json").write_text("{not json"))
    no_type = model("notype", lambda d: (d / "config.json").write_text("{}"))
    no_weights = model("noweights", lambda d: (d / "model.safetensors").unlink())
    bad_tok = model("badtok", lambda d: (d / "tokenizer.json").write_text("garbage"))
    (tmp_path / "afile").write_text("hi")
    cases = [
        (("--device", "tpu"), "--device must be auto, cpu, cuda or cuda:N"),
        (("--seed", str(2**80)), "range"),
        (("--base", bad_json), "not valid JSON"),
        (("--base", no_type), "model_type"),
        (("--base", no_weights), "no weights file"),
        (("--base", bad_tok), "cannot load the tokenizer"),
        (("--targets", "nosuch"), "does not have: nosuch"),
        (("--targets", "q_proj,k_prj"), "does not have: k_prj"),
        (("--base", env / "g2base", "--seq-len", "128", "--targets", "c_attn"), "longer than the model's 64 positions"),
        (("--base", env / "g2base"), "c_attn"),
    ]
    if not torch.cuda.is_available():
        cases.append((("--device", "cuda"), "CUDA is not available"))
    for i, (extra, why) in enumerate(cases):
        out = tmp_path / f"o{i}"
        assert why in _one_line_error(_cli_train(env, out, *extra)), extra
        assert not out.exists(), extra  # made only after every check
    short = ("--base", env / "base", "--data", env / "target.txt", "--seq-len", "32", "--steps", "1", "--device", "cpu")
    for args in (("train", *short, "-o", tmp_path / "afile" / "sub"),
                 ("sweep", *short, "--methods", "full", "-o", tmp_path / "afile" / "s"),
                 ("demo", "--synthetic", "--out", tmp_path / "afile" / "x")):
        assert "cannot be made a folder" in _one_line_error(_run(*args))
    res = _run("demo", "--synthetic", "--seed", str(2**80), "--out", tmp_path / "dm")
    assert res.exit_code == 2 and not (tmp_path / "dm").exists()


def test_all_linear_targets_and_gpt2_named_targets_train(env, tmp_path):
    res = _cli_train(env, tmp_path / "al", "--targets", "all-linear", "--rank", "2")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "al" / "train_config.json").read_text())
    adapter = json.loads((tmp_path / "al" / "adapter_config.json").read_text())
    leaves = {n.rsplit(".", 1)[-1] for n in adapter["target_modules"]}  # PEFT resolves all-linear to full names
    assert set(cfg["target_modules"]) == leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    res = _run("train", "--base", env / "g2base", "--data", env / "target.txt", "--targets", "c_attn", "--steps", "1",
               "--batch", "2", "--seq-len", "32", "--device", "cpu", "--trace-every", "1", "-o", tmp_path / "g2")
    assert res.exit_code == 0, res.output


# ---- 9. binary / non-UTF-8 data ----------------------------------------------------------------------------
def test_binary_and_latin1_data_are_refused_a_stray_byte_is_not(env, tmp_path):
    blob = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    (tmp_path / "x.bin").write_bytes(blob)
    expect = blob.decode("utf-8", "replace").count("\ufffd") / len(blob.decode("utf-8", "replace"))
    with pytest.raises(SpectraError, match=f"{expect:.0%} of its characters do not decode"):
        read_examples(tmp_path / "x.bin")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 na\xefve \xff text " * 400)
    assert "not UTF-8 text" in _one_line_error(_cli_train(env, tmp_path / "o", "--data", tmp_path / "latin1.txt"))
    text = (env / "target.txt").read_bytes()
    (tmp_path / "stray.txt").write_bytes(text[:5000] + b"\xe9" + text[5000:])  # one byte in 20,000: read as U+FFFD
    assert read_examples(tmp_path / "stray.txt")[0][1].count("\ufffd") == 1


# ---- 10. --alpha 0 trains nothing: refused (above); a typo in --targets (above) -------------------------------
def test_preset_targets_record_what_was_adapted(env, tmp_path):
    train(_cfg(env, tmp_path / "attn", targets="attn", rank=2))
    cfg = json.loads((tmp_path / "attn" / "train_config.json").read_text())
    adapter = json.loads((tmp_path / "attn" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


# ---- 11. demo --synthetic --quick ------------------------------------------------------------------------------
def test_synthetic_demo_applies_quick(tmp_path):
    res = _run("demo", "--synthetic", "--quick", "--out", tmp_path / "d")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "d" / "checkpoints" / "base" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (2, 128)
