"""Reference training runs: real few-step LoRA and full fine-tunes on a tiny model, and the quick demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import spectra  # noqa: E402
from spectra.errors import SpectraError  # noqa: E402
from spectra.training import ByteTokenizer, TrainConfig, read_examples, token_blocks, train  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    import pydoc_data.topics as topics

    prose = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:60_000]
    (root / "source.txt").write_text(prose)
    code = (Path(json.__file__).read_text() + Path(json.__file__).with_name("decoder.py").read_text()) * 3
    (root / "target.txt").write_text(code)
    return root


def _cfg(setup, name, **kw):
    base = dict(base=str(setup / "base"), data=str(setup / "target.txt"), out=str(setup / name), steps=24, batch=4,
                seq_len=64, eval_every=8, eval_batches=2, eval_source=str(setup / "source.txt"), device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_run_produces_loadable_outputs_and_learns(setup, method):
    lr = 3e-3 if method == "lora" else 1e-3
    summary = train(_cfg(setup, method, method=method, rank=4, lr=lr))
    out = setup / method
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 8, 16, 24]
    assert all(r["target_loss"] == r["target_loss"] and r["source_loss"] is not None for r in log)  # finite, logged
    assert log[-1]["target_loss"] < log[0]["target_loss"]  # it learned
    assert summary.target_loss == log[-1]["target_loss"]
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["seed"] == 0 and cfg["method"] == method and cfg["tokenizer_used"] == "ByteTokenizer"
    if method == "lora":
        import peft

        assert cfg["resolved_alpha"] == 8.0 and cfg["target_modules"][0] == "q_proj"
        model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(setup / "base"), str(out))
        assert any("lora_A" in n for n, _ in model.named_parameters())
    else:
        transformers.LlamaForCausalLM.from_pretrained(out)
    res = spectra.diff(setup / "base", out)
    assert len(res.modules) > 0 and all(m.fro_norm > 0 for m in res.modules if m.module != "embed_tokens")


def test_source_loss_is_measured_on_the_source_data(setup):
    """At step 0 the logged source loss equals the untouched base model's loss on the source blocks."""
    train(_cfg(setup, "probe", method="full", steps=1, eval_every=1, lr=1e-9))
    rec = json.loads((setup / "probe" / "train_log.jsonl").read_text().splitlines()[0])
    model = transformers.LlamaForCausalLM.from_pretrained(setup / "base").eval()
    ids, labels = token_blocks(read_examples(setup / "source.txt"), ByteTokenizer(), 64)
    with torch.no_grad():
        expected = sum(float(model(input_ids=ids[i : i + 4], labels=labels[i : i + 4]).loss) for i in range(0, 8, 4)) / 2
    assert rec["source_loss"] == pytest.approx(expected, rel=1e-5)
    assert rec["source_loss"] != pytest.approx(rec["target_loss"], rel=1e-3)


def test_same_seed_reproducible(setup):
    a = train(_cfg(setup, "rep_a", method="lora", rank=2, lr=3e-3, steps=8, eval_every=8))
    b = train(_cfg(setup, "rep_b", method="lora", rank=2, lr=3e-3, steps=8, eval_every=8))
    assert a.target_loss == b.target_loss and a.source_loss == b.source_loss
    la = (setup / "rep_a" / "train_log.jsonl").read_text().splitlines()
    lb = (setup / "rep_b" / "train_log.jsonl").read_text().splitlines()
    strip = lambda l: {k: v for k, v in json.loads(l).items() if k != "seconds"}  # noqa: E731
    assert [strip(l) for l in la] == [strip(l) for l in lb]


def test_jsonl_prompt_response_and_bad_data(setup, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "Q: 2+2?", "response": " A: 4"}\n{"text": "plain"}\n')
    ex = read_examples(p)
    assert ex == [("Q: 2+2?", " A: 4"), ("", "plain")]
    ids, labels = token_blocks(ex * 20, ByteTokenizer(), 16)
    flat_ids, flat_labels = ids.reshape(-1), labels.reshape(-1)
    assert (flat_labels[:7] == -100).all() and flat_labels[7] == flat_ids[7]  # loss on the response only
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(SpectraError, match="line 1 has neither a text field nor prompt/response"):
        read_examples(tmp_path / "bad.jsonl")
    with pytest.raises(SpectraError, match="not a Hugging Face model folder"):
        train(_cfg(setup, "x", base=str(tmp_path)))


def test_quick_demo_end_to_end(tmp_path):
    from spectra.demo import DemoConfig, run_demo

    summary = run_demo(DemoConfig.make(str(tmp_path / "demo"), quick=True), log=lambda m: None)
    out = tmp_path / "demo"
    for f in ("summary.md", "summary.json", "learning_vs_forgetting.png", "diff_full/rank_heatmap.png",
              "compare_lora8_vs_full/phi_grids.png", "compare_lora8_vs_lora64/captured_heatmap.png"):
        assert (out / f).is_file(), f
    runs = summary["runs"]
    assert set(runs) == {"full", "lora8", "lora64", "lora8_seed2"}
    assert runs["lora8"]["median_energy_rank_0.9"] <= 8  # a rank-8 update never needs more than 8
    assert runs["full"]["target_loss"] < summary["base"]["target_loss"]  # fine-tuning on the target learned it
    assert min(r["target_loss"] for r in runs.values()) < summary["base"]["target_loss"]
    # the full fine-tune extracted at LoRA r=8's size: the budgeted adapter has that many parameters, keeps
    # at least the uniform rank-8 one's energy (same count, best allocation), and its energy share equals a
    # float64 numpy SVD of ΔW truncated to the ranks it chose
    x = summary["extract"]
    lora_cfg = json.loads((out / "runs" / "lora8" / "train_config.json").read_text())
    assert x["lora_params"] == lora_cfg["trainable_params"] and x["rank"] == 8
    assert x["energy_kept"]["extracted_budget"] >= x["energy_kept"]["extracted_rank8"] - 1e-9
    doc = json.loads((out / "extract_budget" / "extract.json").read_text())
    assert doc["totals"]["params"] <= x["lora_params"]
    from safetensors.numpy import load_file

    ck = out / "checkpoints"
    base_dir = next(p for p in ck.iterdir() if p.name.startswith("base-"))
    W0, W1 = load_file(str(base_dir / "model.safetensors")), load_file(str(ck / "full" / "model.safetensors"))
    kept = total = 0.0
    for m in doc["modules"]:
        key = m["name"] if m["name"] in W0 else m["name"] + ".weight"
        s = np.linalg.svd(W1[key].astype(np.float64) - W0[key].astype(np.float64), compute_uv=False)
        kept, total = kept + float(np.sum(s[: m["rank"]] ** 2)), total + float(np.sum(s ** 2))
    assert kept / total == pytest.approx(doc["totals"]["energy_kept"], rel=1e-6)
    for text in ("python", "prose"):
        assert set(x["loss"][text]) == {"base", "tuned", "extracted_budget", "extracted_rank8", "trained_lora8"}
    assert "extracted_budget" in (out / "summary.md").read_text()


def test_sweep_runs_and_analyses(setup, tmp_path):
    from click.testing import CliRunner

    from spectra_cli.main import main

    res = CliRunner().invoke(main, ["sweep", "--base", str(setup / "base"), "--data", str(setup / "target.txt"),
                                    "--ranks", "2,4", "--methods", "lora,full", "--steps", "4", "--batch", "2",
                                    "--seq-len", "32", "--device", "cpu", "--eval-source", str(setup / "source.txt"),
                                    "--out", str(tmp_path / "sw")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert set(doc["runs"]) == {"full", "lora2", "lora4"}
    assert set(doc["compares"]) == {"lora2_vs_full", "lora4_vs_full", "lora2_vs_lora4"}
    for folder in doc["diffs"].values():
        assert (Path(folder) / "results.json").is_file()
    bad = CliRunner().invoke(main, ["sweep", "--base", "x", "--data", "y", "--methods", "dpo", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--methods must list lora and/or full" in bad.output
