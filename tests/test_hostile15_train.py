"""Fifteenth round of the outside probe, training side and layouts (docs/bad_inputs.md, "fifteenth round"):
the in-training tracker, sweep, held-out losses, and checkpoints whose head or layout a config must decide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import spectra
from spectra.callbacks import SpectraTracker, attach
from spectra.errors import ConfigError
from spectra.trace import TraceConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=32, max_position_embeddings=16,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    return transformers.LlamaForCausalLM(cfg)


def _points(out: Path) -> dict[tuple[int, str], dict]:
    recs = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    return {(r["step"], r["matrix"]["name"]): r["point"] for r in recs if "point" in r}


# ---- the tracker --------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_tracker_measures_pissa_updates_from_the_original_weight(tmp_path, init):
    """PiSSA and OLoRA move s·B₀·A₀ out of W: the update is s·(B·A − B₀·A₀), not s·B·A (the tracker reported
    rel_norm 0.81 where the merged model had moved 0.0019; `spectra trace` refused such runs)."""
    model = _tiny()
    W0 = {n: p.detach().double().clone() for n, p in model.named_parameters() if "q_proj" in n}
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=init))
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a training step, by hand
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    tracker.measure(1)
    merged = model.merge_and_unload()
    (name,) = W0
    delta = dict(merged.named_parameters())[name].detach().double() - W0[name]
    S = np.linalg.svd(delta.numpy(), compute_uv=False)
    point = _points(tmp_path)[1, name]
    assert point["fro_norm"] == pytest.approx(float(np.linalg.norm(S)), rel=1e-5)
    assert point["spectral_norm"] == pytest.approx(float(S[0]), rel=1e-5)
    assert point["rel_norm"] == pytest.approx(float(np.linalg.norm(S) / torch.linalg.norm(W0[name])), rel=1e-5)


def test_tracker_refuses_what_it_cannot_measure(tmp_path):
    pissa = peft.get_peft_model(_tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ConfigError, match="initialised with pissa: the run resumed"):  # B₀, A₀ are gone after a resume
        SpectraTracker(pissa, every=1, resume_step=3)
    for config in (peft.LoHaConfig(r=2, target_modules=["q_proj"]), peft.IA3Config(target_modules=["q_proj"],
                                                                                     feedforward_modules=[])):
        tuned = peft.get_peft_model(_tiny(), config)  # their factors were traced as if they were weights
        with pytest.raises(ConfigError, match=f"PEFT {config.peft_type.value.upper()} adapters"):
            SpectraTracker(tuned, every=1)
    with pytest.raises(ConfigError, match="found no matrix to trace"):  # nothing selected traced nothing, silently
        SpectraTracker(_tiny(), every=1, config=TraceConfig(include="nomatch"))


def test_tracker_names_a_compiled_models_weights_as_stored():
    """torch.compile's wrapper prefixed every name with _orig_mod., so filters on stored names matched nothing."""
    compiled = torch.compile(_tiny())
    tracker = SpectraTracker(compiled, every=1, config=TraceConfig(include=r"^model\.layers\.0\.self_attn\.q_proj"))
    assert [t.name for t in tracker.matrices] == ["model.layers.0.self_attn.q_proj.weight"]


class _Blocks(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randint(0, 32, (64, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _trainer(out: Path, steps: int, *, stop_at: int | None = None, every: int = 2, save_steps: int = 3, full: Path | None = None,
             init: str | bool = True, lr: float = 1e-2):
    if full is not None:  # a full fine-tune of the model saved in that folder (its name_or_path)
        if not (full / "config.json").is_file():
            _tiny().save_pretrained(full)
        model = transformers.LlamaForCausalLM.from_pretrained(full)
    else:
        model = peft.get_peft_model(_tiny(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=init))
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                          save_steps=save_steps, logging_steps=1, report_to=[], learning_rate=lr,
                                          use_cpu=True, disable_tqdm=True, seed=0)
    tr = transformers.Trainer(model=model, args=args, train_dataset=_Blocks())
    attach(tr, every=every)
    if stop_at is not None:
        class Stop(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == stop_at:
                    raise KeyboardInterrupt

        tr.add_callback(Stop())
    return tr


@pytest.mark.parametrize("method", ["lora", "full"])
def test_callback_resumed_between_measurements_leaves_that_turn_null(tmp_path, method):
    """Resumed from checkpoint-3 with every=2: turn_prev at step 4 was measured from step 3's weights, which no
    record holds (φ 0.997 where the run measured 0.989 from step 2); now null, and every other number as in an
    uninterrupted run. A full fine-tune's ΔW was measured from the resumed weights (fro 0.165 against 0.760):
    its base is read again from the folder the model was loaded from."""
    full = tmp_path / "base" if method == "full" else None
    torch.manual_seed(0)
    _trainer(tmp_path / "whole", 8, full=full).train()
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "cut", 8, stop_at=5, full=full).train()
    torch.manual_seed(0)
    _trainer(tmp_path / "cut", 8, full=full).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    whole, cut = _points(tmp_path / "whole"), _points(tmp_path / "cut")
    assert sorted(whole) == sorted(cut)
    for key in whole:
        assert cut[key]["fro_norm"] == pytest.approx(whole[key]["fro_norm"], rel=1e-9)
        assert (cut[key]["turn_first"] is None) == (whole[key]["turn_first"] is None)
        if key[0] == 4:
            assert cut[key]["turn_prev"] is None and whole[key]["turn_prev"] is not None
        elif whole[key]["turn_prev"] is not None:
            assert cut[key]["turn_prev"]["right"]["phi"] == pytest.approx(whole[key]["turn_prev"]["right"]["phi"], abs=1e-9)
    text = (tmp_path / "cut" / "trace.jsonl").read_text()
    assert "step 3 was not measured" in text and "measured from the weights it resumed with" not in text


def test_a_resumed_pissa_run_trains_on_untraced_with_a_word(tmp_path):
    """Resumed, a PiSSA run's B₀, A₀ are gone: the tracker cannot follow it, and raising at train begin killed the
    resume the user asked for. It trains on; the trace says from where it is not followed."""
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, 4, stop_at=3, every=1, save_steps=2, init="pissa", lr=1e-3).train()
    torch.manual_seed(0)
    tr = _trainer(tmp_path, 4, every=1, save_steps=2, init="pissa", lr=1e-3)
    tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert tr.state.global_step == 4
    text = (tmp_path / "trace.jsonl").read_text()
    assert "training resumed at step 2: not traced from there" in text and "initialised with pissa" in text


def test_a_second_train_keeps_the_first_trace(tmp_path):
    """A curriculum's second trainer.train() with the same callback truncated trace.jsonl: phase 1 was lost."""
    tr = _trainer(tmp_path, 4, every=2, save_steps=100)
    tr.train()
    first = (tmp_path / "trace.jsonl").read_text()
    tr.train()
    assert (tmp_path / "trace.1.jsonl").read_text() == first and (tmp_path / "trace_first.1.npz").is_file()
    assert "the earlier training's trace is kept as trace.1.jsonl" in (tmp_path / "trace.jsonl").read_text()


# ---- train and sweep ------------------------------------------------------------------------------------
def test_held_out_loss_is_the_mean_over_tokens_not_over_batches():
    """Five held-out blocks in batches of 4: the mean of the two batch means counted the last block 4×."""
    from spectra.training import held_out_loss

    model = _tiny()
    ids = torch.randint(0, 32, (5, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[4, :6] = -100  # a partly scored block
    got = held_out_loss(model, (ids, labels), 2, 4, torch.device("cpu"), False)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert got == pytest.approx(float(ref), rel=1e-5)
    assert model.training


def test_sweep_force_never_clears_a_folder_holding_its_inputs(tmp_path):
    """`sweep --base runs/full --out runs --force` (re-sweeping from an earlier sweep's full run) deleted the base
    model's files while clearing the earlier sweep, before any run could refuse the folder."""
    from spectra.training import sweep

    out = tmp_path / "runs"
    _tiny().save_pretrained(out / "full")
    (tmp_path / "data.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    before = sorted(p.name for p in (out / "full").iterdir())
    with pytest.raises(ConfigError, match="--base .* lies in .*full, a folder of an earlier sweep that --force would clear"):
        sweep(str(out / "full"), str(tmp_path / "data.txt"), str(out), methods=["lora"], ranks=[2], force=True, steps=1)
    assert sorted(p.name for p in (out / "full").iterdir()) == before


# ---- layouts --------------------------------------------------------------------------------------------
def test_a_headless_base_without_config_is_not_taken_for_a_tied_one(tmp_path):
    """A LlamaModel backbone saved as one file (no head, no config) against an untied LlamaForCausalLM: the tuned
    lm_head was compared with the base embedding (rel_norm 1.49) as if the base tied them."""
    model = _tiny(tie_word_embeddings=False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file({k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}, str(tmp_path / "backbone.safetensors"))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "tuned")
    res = spectra.diff(str(tmp_path / "backbone.safetensors"), str(tmp_path / "tuned"))
    assert "lm_head.weight" not in {m.name for m in res.modules}
    assert res.unmatched["tuned_only"] == ["lm_head.weight"]
    assert any("has no config.json to say whether it ties" in w for w in res.warnings)
    # a base whose config says it ties them is still compared with the tuned head; so is one whose config leaves
    # the key out (its model type's default: transformers 4 wrote GPT-2's configs so)
    model2 = _tiny(tie_word_embeddings=True)
    model2.save_pretrained(tmp_path / "tied")
    res = spectra.diff(str(tmp_path / "tied"), str(tmp_path / "tuned"))
    assert "lm_head.weight" in {m.name for m in res.modules}
    cfg = json.loads((tmp_path / "tied" / "config.json").read_text())
    cfg.pop("tie_word_embeddings")
    (tmp_path / "tied" / "config.json").write_text(json.dumps(cfg))
    assert "lm_head.weight" in {m.name for m in spectra.diff(str(tmp_path / "tied"), str(tmp_path / "tuned")).modules}


def test_square_matrices_beside_transposed_ones_are_not_paired_as_stored(tmp_path):
    """GPT-2 re-saved with its Conv1D weights in nn.Linear layout (config unchanged): the non-square ones were
    skipped as shape mismatches, while the square attn.c_proj gave W_tunedᵀ − W_base (rel_norm 1.96) silently."""
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "tuned")
    sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v + 0.01 * torch.randn_like(v)).T.contiguous() if k.endswith(conv) else v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    res = spectra.diff(str(tmp_path / "base"), str(tmp_path / "tuned"))
    assert not [m for m in res.modules if "c_proj" in m.name or "c_attn" in m.name or "c_fc" in m.name]
    square = [s for s in res.skipped if s["name"].endswith("attn.c_proj.weight")]
    assert len(square) == 2 and all("stored transposed against the base" in s["reason"] for s in square)
    assert any("tuned stores its layer matrices transposed against the base" in w for w in res.warnings)  # said, not only skipped
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    with pytest.raises(ConfigError, match="no matrix to extract: tuned stores its layer matrices transposed"):  # not "check --include"
        extract(str(tmp_path / "base"), str(tmp_path / "tuned"), tmp_path / "ex", config=ExtractConfig(rank=2), plots=False)
    # the same update in GPT-2's own layout pairs every matrix, c_proj included
    shutil.copytree(tmp_path / "base", tmp_path / "same")
    save_file({k: v.T.contiguous() if k.endswith(conv) else v for k, v in sd.items()}, str(tmp_path / "same" / "model.safetensors"),
              metadata={"format": "pt"})
    names = {m.name for m in spectra.diff(str(tmp_path / "base"), str(tmp_path / "same")).modules}
    assert {"transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"} <= names
