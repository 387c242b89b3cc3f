"""Hostile and odd inputs to ``spectra extract --eval`` and ``spectra report``, found by the eighth
outside probe: each test reproduces a finding (E1…E10) and checks the fix. Losses are checked
against an independent computation (transformers, float64 cross-entropy); tiny models in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import spectra  # noqa: E402
from spectra.errors import ConfigError, ResultsFormatError, SpectraError  # noqa: E402
from spectra.extract import ExtractConfig, extract  # noqa: E402
from spectra.report import write_report  # noqa: E402
from spectra.results import DiffResult  # noqa: E402
from spectra.training import TrainConfig, train  # noqa: E402
from spectra_cli.main import main  # noqa: E402

VOCAB = 300
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _tokenizer():
    """A byte-level BPE tokenizer of VOCAB tokens, trained on Python's own help text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([_text()[:50_000]], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>"],
                                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


def _perturbed(folder: Path, out: Path, *, embeddings: bool = False, seed: int = 1) -> Path:
    """``out``: ``folder``'s model with a rank-4 update of every matrix (the embedding too when asked)."""
    sd = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if v.ndim == 2 and (embeddings or "embed" not in k):
            sd[k] = v + 0.5 * (torch.randn(v.shape[0], 4, generator=g) @ torch.randn(4, v.shape[1], generator=g)) / 2
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(folder / "config.json", out / "config.json")
    return out


def _llama(out: Path, *, tied: bool = False, vocab: int = VOCAB, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                                   tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("h8eval")
    tok = _tokenizer()
    _llama(root / "base")
    tuned = _perturbed(root / "base", root / "tuned")
    tok.save_pretrained(tuned)  # the tuned folder has the tokenizer, the base none (E1)
    (root / "eval.txt").write_text(_text()[100_000:130_000], encoding="utf-8")
    return root


def _loss(folder: Path, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of a model folder on ``ids`` (n, L), independently of spectra."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def _one_line_error(res) -> str:
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return [line for line in res.output.splitlines() if line.strip()][-1]


# ---- E1: the tokenizer ----------------------------------------------------------------------------
def test_e1_base_without_tokenizer_uses_the_tuned_folders_and_says_so(env, tmp_path):
    res = extract(env / "base", env / "tuned", tmp_path / "o",
                  config=ExtractConfig(rank=4, eval_text=str(env / "eval.txt"), eval_seq_len=32, eval_blocks=4))
    ev = res.eval
    tok = transformers.AutoTokenizer.from_pretrained(env / "tuned")
    ids = torch.tensor(tok((env / "eval.txt").read_text(), add_special_tokens=False)["input_ids"][: 4 * 32]).view(4, 32)
    # the losses of the text as the model reads it (its tokenizer), not of its UTF-8 bytes
    assert ev["loss"]["base"] == pytest.approx(_loss(env / "base", ids), abs=1e-5)
    assert ev["loss"]["tuned"] == pytest.approx(_loss(env / "tuned", ids), abs=1e-5)
    assert ev["tokenizer"] == {"source": "tuned", "path": str(env / "tuned"), "class": ev["tokenizer"]["class"]}
    assert any("no tokenizer files" in w and "tuned folder's tokenizer" in w for w in res.warnings)
    doc = json.loads((tmp_path / "o" / "extract.json").read_text())
    assert doc["eval"]["tokenizer"]["source"] == "tuned"


# ---- E2: a tied head ----------------------------------------------------------------------------------
def test_e2_tied_embeddings_are_scored_merged(tmp_path):
    base = _llama(tmp_path / "base", tied=True)
    tuned = _perturbed(base, tmp_path / "tuned", embeddings=True)
    (tmp_path / "t.txt").write_text(_text()[:20_000], encoding="utf-8")
    res = extract(base, tuned, tmp_path / "o", config=ExtractConfig(energy=1.0, embeddings=True, eval_text=str(tmp_path / "t.txt"),
                                                                       eval_seq_len=32, eval_blocks=4))
    ev = res.eval
    # every module whole, merged: base + adapter is the tuned model, its tied head included
    assert ev["loss"]["extracted"] == pytest.approx(ev["loss"]["tuned"], abs=1e-4)
    assert ev["recovered"]["extracted"] == pytest.approx(1.0, abs=1e-3)
    assert ev["scored"]["extracted"] == "merged"


# ---- E3: encoders ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("h8bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(root / "base")
    _perturbed(root / "base", root / "tuned")
    (root / "t.txt").write_text(_text()[:20_000], encoding="utf-8")
    return root


def test_e3_eval_refuses_an_encoder_before_extracting(bert, tmp_path):
    with pytest.raises(ConfigError, match=r"--eval needs a causal LM; this bert model is an encoder \(config.json "
                                          r"is_decoder is not true\): its bidirectional attention sees the next token") as exc:
        extract(bert / "base", bert / "tuned", tmp_path / "o",
                config=ExtractConfig(rank=4, eval_text=str(bert / "t.txt"), eval_seq_len=32, eval_blocks=4))
    assert exc.value.path == str(bert / "base" / "config.json")
    assert not (tmp_path / "o").exists()  # refused before anything was extracted


def test_e3_train_refuses_an_encoder(bert, tmp_path):
    with pytest.raises(ConfigError, match=r"spectra train needs a causal LM; this bert model is an encoder"):
        train(TrainConfig(base=str(bert / "base"), data=str(bert / "t.txt"), out=str(tmp_path / "run"), steps=1, targets="query,value",
                          batch=2, seq_len=32, eval_every=1, eval_batches=1, device="cpu", trace_every=0))
    assert not (tmp_path / "run").exists()


# ---- E4: positions ------------------------------------------------------------------------------------
def test_e4_eval_seq_len_beyond_the_position_table_is_refused_first(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    _perturbed(tmp_path / "base", tmp_path / "tuned")
    (tmp_path / "t.txt").write_text(_text()[:20_000], encoding="utf-8")
    res = CliRunner().invoke(main, ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "-o", str(tmp_path / "o"),
                                    "--rank", "4", "--eval", str(tmp_path / "t.txt"), "--eval-seq-len", "64", "--no-plots"])
    line = _one_line_error(res)
    assert line == (f"error: {tmp_path / 'base'}: --eval-seq-len 64 is longer than the model's 32 positions (config.json "
                    "n_positions) (pass --eval-seq-len 32 or less)")
    assert not (tmp_path / "o").exists()


# ---- E5: not a causal LM, a config that does not match its weights ----------------------------------------
def test_e5_t5_is_refused_clearly(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "tuned")
    (tmp_path / "t.txt").write_text(_text()[:20_000], encoding="utf-8")
    with pytest.raises(ConfigError, match=r"--eval needs a decoder-only causal LM; this t5 model is an encoder-decoder model"):
        extract(tmp_path / "base", _perturbed(tmp_path / "base", tmp_path / "t2"), tmp_path / "o",
                config=ExtractConfig(rank=4, eval_text=str(tmp_path / "t.txt"), eval_seq_len=32, eval_blocks=4))
    assert not (tmp_path / "o").exists()


def test_e5_vocab_size_that_disagrees_with_the_embeddings(env, tmp_path):
    for side in ("base", "tuned"):
        shutil.copytree(env / side, tmp_path / side)
        cfg = json.loads((tmp_path / side / "config.json").read_text())
        (tmp_path / side / "config.json").write_text(json.dumps({**cfg, "vocab_size": 400}))
    with pytest.raises(ConfigError, match=r"the weights hold it as \[300, 32\] but config.json describes \[400, 32\]") as exc:
        extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "o",
                config=ExtractConfig(rank=4, eval_text=str(env / "eval.txt"), eval_seq_len=32, eval_blocks=4))
    assert exc.value.tensor == "model.embed_tokens.weight" and exc.value.path == str(tmp_path / "base")
    assert not (tmp_path / "o").exists()


# ---- E6: checks first; a failed eval keeps the results --------------------------------------------------
def test_e6_short_text_is_refused_before_extracting_naming_file_and_option(env, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny text", encoding="utf-8")
    res = CliRunner().invoke(main, ["extract", str(env / "base"), str(env / "tuned"), "-o", str(tmp_path / "o"), "--rank", "4",
                                    "--eval", str(short), "--eval-seq-len", "64", "--no-plots"])
    line = _one_line_error(res)
    assert line.startswith(f"error: {short}: --eval needs at least 2 blocks of --eval-seq-len 64 tokens (128); the text holds ")
    assert "tokenizer" in line and "give a longer text" in line
    assert not (tmp_path / "o").exists()


def test_e6_eval_failure_after_extraction_keeps_extract_json(env, tmp_path, monkeypatch):
    import spectra.extract_eval

    def broken(*args, **kwargs):
        raise ConfigError("--eval: transformers cannot load the model: out of memory", path=str(env / "base"))

    monkeypatch.setattr(spectra.extract_eval, "held_out_losses", broken)
    with pytest.raises(ConfigError, match="out of memory") as exc:
        extract(env / "base", env / "tuned", tmp_path / "o",
                config=ExtractConfig(rank=4, eval_text=str(env / "eval.txt"), eval_seq_len=32, eval_blocks=4))
    assert (tmp_path / "o" / "extract.csv").is_file() and (tmp_path / "o" / "adapter_model.safetensors").is_file()
    doc = json.loads((tmp_path / "o" / "extract.json").read_text())
    assert doc["eval"] is None and doc["complete"] is True
    assert any(w.startswith("--eval failed, so extract.json holds no held-out losses") for w in doc["warnings"])
    assert f"the adapter and extract.json (without the held-out losses) were written to {tmp_path / 'o'}" in exc.value.hint


# ---- E8: a bounded read ------------------------------------------------------------------------------------
def test_e8_only_the_prefix_the_blocks_need_is_read(tmp_path):
    base = _llama(tmp_path / "base", vocab=256)
    tuned = _perturbed(base, tmp_path / "tuned")
    text = tmp_path / "big.txt"
    good = _text()[:200_000]
    # 3 MB of bytes that are not UTF-8 after the text: a read of the whole file would refuse it as binary
    text.write_bytes(good.encode("utf-8") + b"\xff" * 3_000_000)
    res = extract(base, tuned, tmp_path / "o", config=ExtractConfig(rank=4, eval_text=str(text), eval_seq_len=64, eval_blocks=4))
    ids = torch.tensor(list(good.encode("utf-8")[: 4 * 64])).view(4, 64)
    assert res.eval["blocks"] == 4 and res.eval["tokenizer"]["source"] == "bytes"
    assert res.eval["loss"]["base"] == pytest.approx(_loss(base, ids), abs=1e-5)


# ---- E9: the report refuses impossible values -----------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("h8report")
    spectra.diff(str(env / "base"), str(env / "tuned"), out_dir=root / "d", plots=False)
    extract(env / "base", env / "tuned", root / "x", config=ExtractConfig(rank=4), plots=False)
    return root


def _edited(src: Path, dst: Path, edit) -> Path:
    doc = json.loads(src.read_text())
    edit(doc)
    dst.mkdir()
    (dst / src.name).write_text(json.dumps(doc))
    return dst / src.name


@pytest.mark.parametrize(("kind", "edit", "message"), [
    ("d", lambda d: d["modules"][0]["energy_rank"].update({"0.9": -5}),
     r"modules\[0\] \(\S+\)\.energy_rank\[0\.9\] is -5, which is impossible: a rank lies from 0 to min\(shape\) = \d+"),
    ("d", lambda d: d["modules"][0]["energy_rank"].update({"0.9": 10**6}), r"energy_rank\[0\.9\] is 1000000, which is impossible"),
    ("d", lambda d: d["modules"][0].update(fro_norm=-1.0), r"\.fro_norm is -1\.0, which is impossible: norms and ranks are not negative"),
    ("d", lambda d: d["modules"][0].update(shape=[0, 0]), r"\.shape is \[0, 0\], which is impossible"),
    ("x", lambda d: d["totals"].update(energy_kept=7.5), r"totals\.energy_kept is 7\.5, which is impossible: a share lies from 0 to 1"),
    ("x", lambda d: d["modules"][0].update(rank=-3), r"modules\[0\] \(\S+\)\.rank is -3, which is impossible: a rank lies from 0"),
    ("x", lambda d: d["modules"][0].update(energy_kept=1.5), r"\.energy_kept is 1\.5, which is impossible"),
])
def test_e9_report_refuses_impossible_values(results, tmp_path, kind, edit, message):
    src = results / kind / ("results.json" if kind == "d" else "extract.json")
    path = _edited(src, tmp_path / "in", edit)
    with pytest.raises(ResultsFormatError, match=message) as exc:
        write_report([path.parent], tmp_path / "r.html")
    assert exc.value.path == str(path) and "\n" not in str(exc.value)
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(("kind", "schema"), [("d", "spectra.diff/2"), ("x", "spectra.extract/3")])
def test_e9_newer_schema_says_upgrade(results, tmp_path, kind, schema):
    src = results / kind / ("results.json" if kind == "d" else "extract.json")
    path = _edited(src, tmp_path / "in", lambda d: d.update(schema=schema))
    with pytest.raises(ResultsFormatError, match=rf"written by a newer spectra \(schema {schema}\); this spectra \S+ reads") as exc:
        write_report([path.parent], tmp_path / "r.html")
    assert exc.value.hint == "upgrade spectra (pip install -U spectra) to read it"
    if kind == "d":  # the Python API reads it with the same words
        with pytest.raises(ResultsFormatError, match=r"written by a newer spectra \(schema spectra\.diff/2\)"):
            DiffResult.load(path)


@pytest.mark.parametrize("version", ["²", "9" * 5000])
def test_e9_odd_schema_versions_are_one_line_errors(results, tmp_path, version):
    """'²' passes str.isdigit and 5000 digits pass too, but int() refuses both: a ValueError traceback."""
    path = _edited(results / "d" / "results.json", tmp_path / "in", lambda d: d.update(schema=f"spectra.diff/{version}"))
    with pytest.raises(ResultsFormatError, match=r"not a spectra result \(schema ") as exc:
        write_report([path.parent], tmp_path / "r.html")
    assert len(str(exc.value)) < 400
    with pytest.raises(ResultsFormatError, match="schema must be"):
        DiffResult.load(path)


# ---- E10: one pair, one checkpoint ------------------------------------------------------------------------
def test_e10_interfere_with_two_tasks_names_the_one_pair(env, tmp_path):
    from spectra.interfere import interfere
    from spectra.report_interfere import findings

    t2 = _perturbed(env / "base", tmp_path / "t2", seed=7)
    interfere(str(env / "base"), [str(env / "tuned"), str(t2)], out_dir=tmp_path / "i")
    path = tmp_path / "i" / "interfere.json"
    texts = [f.text for f in findings(path, json.loads(path.read_text()))]
    first = texts[0]
    assert "Most alike" not in first and "least" not in first
    assert first.startswith("tuned and t2: median cosine ") or first.startswith("t2 and tuned: median cosine "), first


def test_e10_trace_of_one_checkpoint_says_at_step(env, tmp_path):
    from spectra.report_trace import findings
    from spectra.trace import trace

    ckpt = tmp_path / "run" / "checkpoint-50"
    ckpt.parent.mkdir()
    shutil.copytree(env / "tuned", ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 50, "log_history": [{"step": 50, "loss": 1.0}]}))
    trace(str(env / "base"), [str(ckpt.parent)], out_dir=tmp_path / "t")  # a run folder holding one checkpoint
    path = tmp_path / "t" / "trace.json"
    texts = [f.text for f in findings(path, json.loads(path.read_text()))]
    assert not any("from step 50 to step 50" in t.lower() for t in texts), texts
    assert any(t.startswith("At step 50 (the only checkpoint) the median rank ΔW needs for 90% of its energy is ") for t in texts)


def test_e2_e1_report_shows_eval(env, tmp_path):
    """The report still renders an extract.json with the eval's new keys (tokenizer, scored, notes)."""
    extract(env / "base", env / "tuned", tmp_path / "o",
            config=ExtractConfig(rank=4, eval_text=str(env / "eval.txt"), eval_seq_len=32, eval_blocks=4), plots=False)
    write_report([tmp_path / "o"], tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "Held-out loss" in html and "eval.txt" in html
    assert "Text read with the tuned folder&#x27;s tokenizer (the base has none)." in html or \
        "Text read with the tuned folder's tokenizer (the base has none)." in html
    assert "extracted: merged, uniform: merged" in html


def test_e6_eval_inputs_errors_are_spectra_errors(env, tmp_path):
    """A FIFO or a binary --eval file: one line, before extracting."""
    binary = tmp_path / "b.txt"
    binary.write_bytes(bytes(range(256)) * 200)
    with pytest.raises(SpectraError, match="is not UTF-8 text"):
        extract(env / "base", env / "tuned", tmp_path / "o",
                config=ExtractConfig(rank=4, eval_text=str(binary), eval_seq_len=32, eval_blocks=4))
    assert not (tmp_path / "o").exists()
