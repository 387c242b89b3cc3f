"""Hostile and odd inputs, forty-fifth round (docs/bad_inputs.md)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from spectra_cli.main import main as cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _llama(path):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return model


def test_trace_filter_keeping_only_saved_tensors_says_why(tmp_path):
    """An adapter run whose --include keeps only a modules_to_save tensor: told what it keeps and why it is not traced,
    not that the filter matched nothing."""
    model = _llama(tmp_path / "base")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                      init_lora_weights=False))
    for step in (10, 20):
        with torch.no_grad():
            for _, w in lora.named_parameters():
                if w.requires_grad:
                    w.add_(0.01 * torch.randn_like(w))
        lora.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    res = CliRunner().invoke(cli, ["trace", str(tmp_path / "base"), str(tmp_path / "run"), "--include", "lm_head",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "lm_head.weight: stored whole (modules_to_save)" in res.output and "no matrix is left" not in res.output
    assert not (tmp_path / "o" / "trace.json").exists()
    res = CliRunner().invoke(cli, ["trace", str(tmp_path / "base"), str(tmp_path / "run"), "--include", "zzz"])
    assert res.exit_code != 0 and "no matrix is left by --include 'zzz'" in res.output


def test_adapter_diff_filter_leaving_no_module_names_the_filter(tmp_path):
    """`diff BASE ADAPTER --layers 0 --exclude c_` said "all 2 tensors were skipped" (the adapter's other skips)."""
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                                      init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    res = CliRunner().invoke(cli, ["diff", str(tmp_path / "base"), str(tmp_path / "lora"), "--layers", "0", "--exclude", "c_",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "no matrix is left by --exclude 'c_', --layers '0': none of the 6 modules the adapter updates" in res.output
    assert not (tmp_path / "o" / "results.json").exists()
    res = CliRunner().invoke(cli, ["diff", str(tmp_path / "base"), str(tmp_path / "lora"), "--layers", "0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output


def _tiny_llama(layers: int = 1):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                                  num_hidden_layers=layers, num_attention_heads=4,
                                                                  num_key_value_heads=4, max_position_embeddings=64))


def test_tracker_resumed_with_other_options_is_refused(tmp_path):
    """A tracker resumed with another config appended τ 0.8, top_k 2 records of other matrices under a header saying
    include 'q_proj', τ (0.5, 0.9, 0.99), top_k 8: read back as one trace."""
    from spectra.callbacks import SpectraTracker
    from spectra.errors import ConfigError
    from spectra.trace import TraceConfig, load_trace

    m = _tiny_llama(2)
    x = torch.randint(0, 128, (2, 16))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)

    def train(tr, a, b):
        for s in range(a, b + 1):
            m(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            tr.step(m, s)

    train(SpectraTracker(m, every=2, out_dir=tmp_path, config=TraceConfig(include="q_proj")), 1, 4)
    before = (tmp_path / "trace.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"include 'q_proj' → 'q_proj\|v_proj'; thresholds \[0.5, 0.9, 0.99\] → \[0.8\]; top_k 8 → 2"):
        SpectraTracker(m, every=2, out_dir=tmp_path, resume_step=4, config=TraceConfig(include="q_proj|v_proj", thresholds=(0.8,), top_k=2))
    assert (tmp_path / "trace.jsonl").read_text() == before  # refused before anything was dropped or written
    # the same options (another device named) continue it
    train(SpectraTracker(m, every=2, out_dir=tmp_path, resume_step=4, config=TraceConfig(include="q_proj", device="cpu")), 5, 6)
    steps = sorted({p["step"] for mt in load_trace(tmp_path / "trace.jsonl").matrices for p in mt["points"]})
    assert steps == [2, 4, 6]


def test_tracker_resume_drops_the_later_steps_warnings(tmp_path):
    """A divergence warning of step 6 stayed after a resume at step 4 re-measured step 6 finite."""
    import copy

    from spectra.callbacks import SpectraTracker
    from spectra.trace import load_trace

    m = _tiny_llama()
    x = torch.randint(0, 128, (2, 16))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tr = SpectraTracker(m, every=2, out_dir=tmp_path)
    saved = None
    for s in range(1, 7):
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if s == 4:
            saved = copy.deepcopy(m.state_dict())
        if s == 6:
            with torch.no_grad():
                m.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
        tr.step(m, s)
    assert any("training diverged" in w for w in load_trace(tmp_path / "trace.jsonl").warnings)
    m.load_state_dict(saved)
    tr2 = SpectraTracker(m, every=2, out_dir=tmp_path, resume_step=4)
    for s in range(5, 7):
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        tr2.step(m, s)
    t = load_trace(tmp_path / "trace.jsonl")
    assert not any("training diverged" in w for w in t.warnings), t.warnings
    assert all(p["fro_norm"] is not None for mt in t.matrices for p in mt["points"] if p["step"] == 6)


def test_tracker_says_what_it_does_not_follow_of_a_moe(tmp_path):
    """transformers ≥ 5 holds Mixtral's experts as 3-D parameters: the tracker dropped them (full and target_parameters
    LoRA) without a word, and named the router as the model holds it (mlp.gate), not as checkpoints store it."""
    from spectra.callbacks import SpectraTracker
    from spectra.trace import TraceConfig, load_trace

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "base")
    if not any(p.ndim == 3 for p in model.parameters()):
        pytest.skip("this transformers stores Mixtral's experts one matrix each")
    SpectraTracker(model, every=2, out_dir=tmp_path / "full")
    t = load_trace(tmp_path / "full" / "trace.jsonl")
    stacks = {s["name"] for s in t.skipped if "3-D weight (an expert stack?)" in s["reason"]}
    assert stacks == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    assert any("2 weights of more than 2 dimensions are not traced" in w for w in t.warnings)
    assert any("transformers renamed weights of this model as it loaded them ('.block_sparse_moe.' → '.mlp.')" in w for w in t.warnings)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]))
    SpectraTracker(lora, every=2, out_dir=tmp_path / "lora")
    t = load_trace(tmp_path / "lora" / "trace.jsonl")
    assert {s["name"] for s in t.skipped if "expert stack" in s["reason"]} == {"model.layers.0.mlp.experts.gate_up_proj"}
    SpectraTracker(lora, every=2, out_dir=tmp_path / "lora_q", config=TraceConfig(include="q_proj"))  # what the filters leave out: unsaid
    assert not load_trace(tmp_path / "lora_q" / "trace.jsonl").skipped


def _save(folder, tensors, config):
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


def test_mxfp4_experts_are_named_as_such(tmp_path):
    """gpt-oss's MXFP4 release stores its experts as uint8 X_blocks (E, out, in/32, 16) and X_scales: they were "4-D
    tensors", and against a bf16 fine-tune's X the base's stack was dropped from both one-sided lists unsaid (exit 0,
    warnings [], findings from the attention alone)."""
    from spectra import diff

    g = torch.Generator().manual_seed(0)
    cfg = {"model_type": "gpt_oss", "hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 8, "num_local_experts": 2, "quantization_config": {"quant_method": "mxfp4"}}
    packed = {"model.layers.0.mlp.experts.gate_up_proj_blocks": torch.randint(0, 255, (2, 64, 1, 16), generator=g, dtype=torch.uint8),
              "model.layers.0.mlp.experts.gate_up_proj_scales": torch.randint(120, 130, (2, 64, 1), generator=g, dtype=torch.uint8),
              "model.layers.0.mlp.experts.down_proj_blocks": torch.randint(0, 255, (2, 32, 2, 16), generator=g, dtype=torch.uint8),
              "model.layers.0.mlp.experts.down_proj_scales": torch.randint(120, 130, (2, 32, 2), generator=g, dtype=torch.uint8)}
    q = torch.randn(32, 32, generator=g)
    _save(tmp_path / "base", {**packed, "model.layers.0.self_attn.q_proj.weight": q}, cfg)
    _save(tmp_path / "tuned", {**packed, "model.layers.0.self_attn.q_proj.weight": q + 0.01}, cfg)
    res = diff(str(tmp_path / "base"), str(tmp_path / "tuned"))
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    assert set(reasons) == set(packed)
    assert all("MXFP4 weight, which spectra does not dequantise: dequantise it first" in r for r in reasons.values())
    plain = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(2, 32, 64, generator=g),
             "model.layers.0.mlp.experts.down_proj": torch.randn(2, 32, 32, generator=g)}
    plain_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    _save(tmp_path / "bf16", {**plain, "model.layers.0.self_attn.q_proj.weight": q + 0.01}, plain_cfg)
    res = diff(str(tmp_path / "base"), str(tmp_path / "bf16"))
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    assert set(reasons) == set(plain) and all(r.startswith("base stores this matrix packed by MXFP4 quantisation") for r in reasons.values())
    assert [m.name for m in res.modules] == ["model.layers.0.self_attn.q_proj.weight"]


def test_a_tensor_named_like_a_split_part_is_refused(tmp_path):
    """A tensor stored as 'X:q' beside a fused GPT-2 c_attn X: two records of one name, and --resume kept one (the
    largest update of the model lost, exit 0)."""
    g = torch.Generator().manual_seed(0)
    cfg = {"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 1, "vocab_size": 20, "n_positions": 8}
    base = {"transformer.h.0.attn.c_attn.weight": torch.randn(16, 48, generator=g),
            "transformer.h.0.attn.c_proj.weight": torch.randn(16, 16, generator=g),
            "transformer.h.0.attn.c_attn.weight:q": torch.randn(16, 16, generator=g)}
    _save(tmp_path / "base", base, cfg)
    _save(tmp_path / "tuned", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, cfg)
    res = CliRunner().invoke(cli, ["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert ("two matrices would be reported as transformer.h.0.attn.c_attn.weight:q: a part of transformer.h.0.attn.c_attn.weight "
            "and the tensor stored under that name") in " ".join(res.output.split())
    res = CliRunner().invoke(cli, ["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--no-split", "--json"])
    assert res.exit_code == 0, res.output


def _merged(base_dir, adapter_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    return peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


def _trained(base_dir, config, scale=0.05, which=lambda n: True):
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and which(n):
                p.add_(torch.randn_like(p) * scale)
    return model


def test_extract_keeps_a_norms_trained_bias_and_says_token_rows_are_not_kept(tmp_path):
    """bias="all" of a GPT-2 LoRA: the LayerNorms' biases were dropped as "its module also holds a matrix" (PEFT's merge of
    the extracted adapter moved them 0 where the input moved them 0.42); trainable token rows were written as a
    modules_to_save PEFT does not load, and called kept."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "g2")
    _trained(tmp_path / "g2", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
             ).save_pretrained(tmp_path / "g2lora")
    res = extract(str(tmp_path / "g2"), str(tmp_path / "g2lora"), tmp_path / "g2out", config=ExtractConfig(rank=4, save_modules=True),
                  plots=False)
    held = {r["name"]: r["held"] for r in res.not_lora if ".ln_" in r["name"]}
    assert held and set(held.values()) == {"modules_to_save"}, res.not_lora
    base, want, got = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g2", dtype=torch.float64).state_dict(),
                       _merged(tmp_path / "g2", tmp_path / "g2lora"), _merged(tmp_path / "g2", tmp_path / "g2out"))
    for k in ("transformer.h.0.ln_1.bias", "transformer.ln_f.bias", "transformer.h.0.ln_1.weight"):
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    assert float((want["transformer.h.0.ln_1.bias"] - base["transformer.h.0.ln_1.bias"]).norm()) > 0.1
    # a linear layer's bias (c_proj, not adapted) is still not kept: its module holds a matrix
    assert {r["held"] for r in res.not_lora if "c_proj.bias" in r["name"]} == {None}

    _llama(tmp_path / "ll")
    _trained(tmp_path / "ll", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[1, 5, 7])
             ).save_pretrained(tmp_path / "tok")
    res = extract(str(tmp_path / "ll"), str(tmp_path / "tok"), tmp_path / "tokout",
                  config=ExtractConfig(rank=4, save_modules=True, embeddings=True), plots=False)
    rec = next(r for r in res.not_lora if "trainable_tokens_delta" in r["name"])
    assert rec["held"] is None and rec["reason"].startswith("trainable token rows")
    assert any("trainable_tokens_delta is not kept" in w for w in res.warnings)
    import json
    assert not json.loads((tmp_path / "tokout" / "adapter_config.json").read_text()).get("modules_to_save")


def test_extract_of_an_activated_lora_keeps_its_invocation_tokens(tmp_path):
    """An aLoRA's extracted adapter lost alora_invocation_tokens: PEFT applied it to every token (logits 0.69 off the base
    on a prompt without the invocation sequence, where the input adapter changes nothing)."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    _llama(tmp_path / "base")
    _trained(tmp_path / "base", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6],
                                                task_type="CAUSAL_LM"), scale=0.3, which=lambda n: "lora_" in n).save_pretrained(tmp_path / "alora")
    extract(str(tmp_path / "base"), str(tmp_path / "alora"), tmp_path / "out", config=ExtractConfig(rank=4), plots=False)

    def logits(adapter, ids):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        model = peft.PeftModel.from_pretrained(model, adapter) if adapter else model
        with torch.no_grad():
            return model.eval()(torch.tensor([ids])).logits

    plain, invoked = [10, 11, 12, 13, 14, 15], [10, 5, 6, 13, 14, 15]
    assert torch.allclose(logits(tmp_path / "out", plain), logits(None, plain), atol=1e-6)
    want, got = logits(tmp_path / "alora", invoked), logits(tmp_path / "out", invoked)
    assert float((want - logits(None, invoked)).abs().max()) > 1e-3 and torch.allclose(got, want, atol=1e-4)


def test_extract_with_nothing_to_extract_leaves_no_scratch(tmp_path):
    from spectra.errors import IdenticalCheckpointsError
    from spectra.extract import SCRATCH, extract
    from spectra.extract_plan import ExtractConfig

    _llama(tmp_path / "base")
    with pytest.raises(IdenticalCheckpointsError):
        extract(str(tmp_path / "base"), str(tmp_path / "base"), tmp_path / "out", config=ExtractConfig(rank=2), plots=False)
    assert not (tmp_path / "out" / SCRATCH).exists() and (tmp_path / "out" / "extract.json").is_file()


def test_tracker_resume_checks_review(tmp_path):
    """Review probe of the resume check: a header written before an option existed is read at its default, a long value
    is shortened in the refusal, and a header without options is refused as such."""
    import json

    from spectra.callbacks import SpectraTracker
    from spectra.errors import ConfigError

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))

    def run(edit):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        tr = SpectraTracker(m, every=2, out_dir=out)
        for s in range(1, 5):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 1e-2)
            tr.step(m, s)
        lines = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines() if x.strip()]
        edit(lines[0]["header"])
        (out / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        return out

    SpectraTracker(m, every=2, out_dir=run(lambda h: h["config"].pop("alpha")), resume_step=4)  # (older header: at its default)
    with pytest.raises(ConfigError) as err:
        SpectraTracker(m, every=2, out_dir=run(lambda h: h["config"].update(include="x" * 100000)), resume_step=4)
    assert len(str(err.value)) < 600 and "xxx…" in str(err.value)
    with pytest.raises(ConfigError, match="header holds no options"):
        SpectraTracker(m, every=2, out_dir=run(lambda h: h.update(config=None)), resume_step=4)


def test_callback_resumed_with_other_options_drops_the_abandoned_steps(tmp_path):
    """Under the Trainer a resume with other options trains on untraced (said in trace.jsonl): the interrupted run's
    records after the checkpoint it resumed from (steps 6 and 8) stayed in the trace."""
    import json
    import shutil

    from spectra.callbacks import attach
    from spectra.trace import TraceConfig
    from tests.train_util import TokenData

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4)

    def trainer(steps, thresholds):
        torch.manual_seed(0)
        args = transformers.TrainingArguments(str(tmp_path), max_steps=steps, per_device_train_batch_size=4, save_steps=4,
                                              logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-2)
        t = transformers.Trainer(model=transformers.LlamaForCausalLM(cfg), args=args, train_dataset=TokenData())
        attach(t, every=2, config=TraceConfig(thresholds=thresholds))
        return t

    def steps():
        recs = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines() if x.strip()]
        return sorted({r["step"] for r in recs if "matrix" in r}), [r["warning"] for r in recs if "warning" in r]

    trainer(8, (0.5, 0.9)).train()
    assert steps()[0] == [2, 4, 6, 8]
    shutil.rmtree(tmp_path / "checkpoint-8")
    trainer(6, (0.5, 0.99)).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    measured, warned = steps()
    assert measured == [2, 4]
    assert any("training resumed at step 4: not traced from there" in w and "thresholds [0.5, 0.9] → [0.5, 0.99]" in w for w in warned)


def test_float_matrices_named_like_mxfp4_are_analysed(tmp_path):
    from spectra import diff

    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mixer.conv_blocks": torch.randn(64, 64, generator=g),
            "model.layers.0.mixer.conv_scales": torch.randn(64, 64, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(64, 32, generator=g)}
    _save(tmp_path / "base", base, {"model_type": "llama"})
    _save(tmp_path / "tuned", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, {"model_type": "llama"})
    res = diff(str(tmp_path / "base"), str(tmp_path / "tuned"))
    assert {m.name for m in res.modules} == set(base) and not res.skipped


def test_train_refuses_a_config_that_does_not_describe_its_weights(tmp_path):
    """spectra train loaded what config.json described: a stored weight missing was initialised at random, a config of
    one more layer trained a random layer, one of fewer dropped a stored layer, and a missing vocab_size said only
    "look at the above report" (suppressed). Each is now refused, naming a tensor, before anything is written."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from spectra.errors import ConfigError
    from spectra.training_inputs import load_model

    _llama(tmp_path / "base")
    cases = {}
    for name in ("missing", "more", "fewer", "vocab"):
        shutil.copytree(tmp_path / "base", tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cases[name] = cfg
    tensors = load_file(str(tmp_path / "base" / "model.safetensors"))
    tensors.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(tensors, str(tmp_path / "missing" / "model.safetensors"), metadata={"format": "pt"})
    cases["more"]["num_hidden_layers"] = 3
    cases["fewer"]["num_hidden_layers"] = 1
    cases["vocab"].pop("vocab_size")
    for name in ("more", "fewer", "vocab"):
        (tmp_path / name / "config.json").write_text(json.dumps(cases[name]))
    load_model(tmp_path / "base")
    want = {"missing": "1 weights the checkpoint does not hold (transformers would initialise them at random), e.g. "
                       "model.layers.0.self_attn.q_proj.weight",
            "more": "weights the checkpoint does not hold", "fewer": "9 stored weights the model has no place for (they would be dropped)",
            "vocab": "weights of another shape than stored, e.g. lm_head.weight stored (128, 64), built (32000, 64)"}
    for name, text in want.items():
        with pytest.raises(ConfigError, match="config.json does not describe the weights stored beside it") as err:
            load_model(tmp_path / name)
        assert text in str(err.value), (name, str(err.value))
    (tmp_path / "data.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    res = CliRunner().invoke(cli, ["train", "--method", "full", "--base", str(tmp_path / "missing"), "--data", str(tmp_path / "data.txt"),
                                   "--steps", "2", "--batch", "2", "--seq-len", "16", "--trace-every", "0", "-o", str(tmp_path / "out")])
    assert res.exit_code != 0 and "config.json does not describe the weights" in " ".join(res.output.split())
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_report_refuses_what_is_no_training_log(tmp_path):
    """Any JSON-lines file was shown as a training run (diff's journal, a --data file); two logs pasted into one file read
    as one run; a hand-edited train_config.json gave a traceback or "750% of its layers' matrix entries"."""
    import json

    def report(folder):
        return CliRunner().invoke(cli, ["report", str(folder), "-o", str(tmp_path / f"{folder.name}.html")])

    def log(name, records, config=None):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if config is not None:
            (tmp_path / name / "train_config.json").write_text(json.dumps(config))
        return tmp_path / name

    ok = [{"step": 0, "target_loss": 5.0, "source_loss": 4.0}, {"step": 10, "target_loss": 3.0, "source_loss": 4.1}]
    assert report(log("ok", ok)).exit_code == 0
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.jsonl").write_text('{"text": "hello"}\n')
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "data" / "data.jsonl"), "-o", str(tmp_path / "d.html")])
    assert res.exit_code != 0 and "no training-log record" in " ".join(res.output.split())
    res = report(log("pasted", ok + [{"step": 0, "target_loss": 9.0}, {"step": 10, "target_loss": 8.0}]))
    assert res.exit_code != 0 and "step 0 after step 10: steps must increase" in " ".join(res.output.split())
    res = report(log("negative", [{"step": 0, "target_loss": -3.0}]))
    assert res.exit_code != 0 and "target_loss must be a number from 0 to 1e300" in " ".join(res.output.split())
    for share in (7.5, "abc"):
        res = report(log(f"share{share}", ok, {"steps": 10, "targets": "attention", "target_modules": ["q_proj"],
                                               "not_adapted": {"weights": ["mlp.up_proj"], "share": share}}))
        assert res.exit_code != 0
        assert "train_config.json beside these logs is not as spectra train writes it" in " ".join(res.output.split())


def test_a_trace_cut_off_mid_step_leaves_that_step_out(tmp_path):
    """A tracker killed while writing a step's records (7 of 14 matrices): the step was read as measured, the rest
    "not measured", and the findings compared a median over 7 matrices with one over 14."""
    import json

    from spectra.callbacks import SpectraTracker
    from spectra.trace import load_trace

    m = _tiny_llama()
    x = torch.randint(0, 128, (2, 16))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tr = SpectraTracker(m, every=2, out_dir=tmp_path)
    for s in range(1, 7):
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        tr.step(m, s)
    lines = (tmp_path / "trace.jsonl").read_text().splitlines()
    whole = load_trace(tmp_path / "trace.jsonl")
    at6 = [i for i, x in enumerate(lines) if json.loads(x).get("step") == 6 and "matrix" in json.loads(x)]
    (tmp_path / "trace.jsonl").write_text("\n".join(lines[: at6[len(at6) // 2]]) + "\n")  # killed half-way through step 6
    cut = load_trace(tmp_path / "trace.jsonl")
    assert [c["step"] for c in cut.checkpoints] == [2, 4] and [c["step"] for c in whole.checkpoints] == [2, 4, 6]
    assert any(w.startswith(f"step 6 was cut off while its records were written ({len(at6) // 2} of {len(at6)} matrices") for w in cut.warnings)
    assert all(p["step"] != 6 for mt in cut.matrices for p in mt["points"])
