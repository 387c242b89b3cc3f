"""Thirty-first probe round: training runs and several fine-tunes (docs/bad_inputs.md, "thirty-first round").

trace of a run whose trainer_state.json holds Python's Infinity/NaN (the Trainer writes them), of adapter checkpoints
recorded against another base or saved under another lora_alpha; interfere of one checkpoint under two spellings; and
PEFT's saved copies of base layers (an embedding or head LoRA) checked against the base every command measures on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spectra.errors import CheckpointFormatError
from spectra.interfere import interfere
from spectra.io.checkpoint import open_checkpoint
from spectra.io.jsonfile import load_json
from spectra.param_experts import open_adapter_on
from spectra.trace import TraceConfig, trace
from tests.cli_util import cli
from tests.test_interfere import make_adapter, make_full, tiny_llama
from tests.test_trace import NAMES, synthetic_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT: "Setting save_embedding_layers to True"


def _update(name: str, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    out, inn = NAMES[name]
    return 0.01 * step * torch.randn(out, 2, generator=g, dtype=torch.float64) @ torch.randn(2, inn, generator=g, dtype=torch.float64)


def test_trainer_state_with_infinity_and_nan_is_read(tmp_path):
    """transformers writes trainer_state.json with json.dumps' allow_nan: an fp16 run's grad_norm of Infinity (and a
    diverged loss of NaN) sat in every later checkpoint's log_history; a strict read left out every checkpoint but the
    first as "still being saved" and dropped every loss. Now each checkpoint is traced with its finite loss."""
    base, run, _ = synthetic_run(tmp_path, _update, steps=(10, 20, 30))
    for step in (10, 20, 30):
        state = run / f"checkpoint-{step}" / "trainer_state.json"
        doc = json.loads(state.read_text())
        doc["log_history"].insert(0, {"step": 0, "loss": float("nan"), "grad_norm": float("inf")})
        state.write_text(json.dumps(doc))  # allow_nan (the default): NaN and Infinity tokens, as the Trainer writes
        assert "Infinity" in state.read_text()
    res = trace(str(base), [str(run)], config=TraceConfig(top_k=2))
    assert [c["step"] for c in res.checkpoints] == [10, 20, 30]
    assert [c["loss"] for c in res.checkpoints] == pytest.approx([2.9, 2.8, 2.7])
    assert not res.skipped_checkpoints and not any("being saved" in w for w in res.warnings)
    assert all(rec["step"] != 0 for rec in res.loss_history)  # the NaN loss is not a point of the curve
    with pytest.raises(CheckpointFormatError, match="NaN is not a JSON number"):  # every other reader stays strict
        load_json(run / "checkpoint-10" / "trainer_state.json", what="trainer_state.json")


def test_a_control_character_in_json_is_named_once(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_bytes(b'{"a": "x\x01y"}')
    with pytest.raises(CheckpointFormatError) as err:
        load_json(bad, what="config.json")
    assert "Invalid control character at line 1" in err.value.message and "at at" not in err.value.message


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("h31")
    tiny_llama().save_pretrained(root / "base")
    tiny_llama(seed=5).save_pretrained(root / "other")  # the same architecture, other weights
    for step, seed in ((1, 1), (2, 2)):
        make_adapter(root / "base", root / "run" / f"checkpoint-{step}", seed)
    make_full(root / "base", root / "full", 3)
    make_adapter(root / "base", root / "emb", 4, targets=["embed_tokens", "q_proj", "lm_head"])
    return root


def test_trace_warns_of_adapters_recorded_on_another_base(models):
    """diff, compare and interfere said it; trace measured rel_norm against the other base without a word."""
    res = trace(str(models / "other"), [str(models / "run")], config=TraceConfig(top_k=2))
    other = [w for w in res.warnings if "records the base" in w]
    assert len(other) == 1 and str(models / "base") in other[0]  # once, not once per checkpoint
    assert not any("records the base" in w for w in trace(str(models / "base"), [str(models / "run")],
                                                            config=TraceConfig(top_k=2)).warnings)


def test_trace_warns_when_the_lora_scale_changes_between_checkpoints(models, tmp_path):
    """The same r with another lora_alpha scales every norm: a jump no training made (a change of r was said)."""
    run = tmp_path / "run"
    shutil.copytree(models / "run", run)
    cfg = run / "checkpoint-2" / "adapter_config.json"
    doc = json.loads(cfg.read_text())
    doc["lora_alpha"] = 10 * doc["lora_alpha"]
    cfg.write_text(json.dumps(doc))
    res = trace(str(models / "base"), [str(run)], config=TraceConfig(top_k=2))
    q = next(m for m in res.matrices if m["name"].endswith("layers.0.self_attn.q_proj.weight"))
    r = q["points"][0]["lora_r"]
    assert [p["lora_scale"] for p in q["points"]] == pytest.approx([2.0, 20.0])  # lora_alpha / r: 8/4, 80/4
    assert r == 4
    said = [w for w in res.warnings if "LoRA scale s" in w]
    assert len(said) == 1 and "s = 2, 20" in said[0]
    assert not any("LoRA scale" in w for w in trace(str(models / "base"), [str(models / "run")],
                                                    config=TraceConfig(top_k=2)).warnings)


def test_interfere_knows_a_folder_and_its_weights_file_are_one_checkpoint(models):
    full = models / "full"
    res = interfere(str(models / "base"), [str(full), str(full / "model.safetensors"), str(models / "run" / "checkpoint-1")])
    same = [w for w in res.warnings if "are the same checkpoint" in w]
    assert len(same) == 1 and "same norm" not in " ".join(res.warnings)


def test_a_saved_base_layer_copy_is_checked_against_the_base(models, tmp_path):
    """PEFT saves X.base_layer.weight beside an embedding or head LoRA and loads it over the model's own weight: a
    copy that differs makes (copy − W) + s·B·A the update, and spectra measured s·B·A alone (ΔW of lm_head 2.3
    where PEFT's merged model has 33). A copy equal to the base (or its bfloat16 rounding) is fine."""
    emb, base = models / "emb", models / "base"
    assert cli(["diff", str(base), str(emb), "--no-plots"]).returncode == 0
    tensors = load_file(emb / "adapter_model.safetensors")
    head = "base_model.model.lm_head.base_layer.weight"

    def variant(name: str, value: torch.Tensor) -> Path:
        folder = tmp_path / name
        shutil.copytree(emb, folder)
        save_file({**tensors, head: value}, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        return folder

    rounded = variant("bf16", tensors[head].to(torch.bfloat16))  # a base loaded in bfloat16 saves a rounded copy
    assert open_adapter_on(rounded, open_checkpoint(base)).base_copies  # read, and accepted
    g = torch.Generator().manual_seed(0)
    changed = variant("changed", tensors[head] + 0.5 * torch.outer(torch.randn(tensors[head].shape[0], generator=g),
                                                                  torch.randn(tensors[head].shape[1], generator=g)))
    for args in (("diff", str(base), str(changed)), ("interfere", "--base", str(base), str(changed), str(emb)),
                 ("compare", str(changed), str(emb), "--base", str(base))):
        r = cli(list(args))
        assert r.returncode != 0 and "this copy of a base layer differs from the base's lm_head.weight" in r.stderr, args
        assert "Traceback" not in r.stderr
    # the copy is of lm_head alone: a run that leaves lm_head out measures the rest (PEFT loads it over that matrix only)
    r = cli(["diff", str(base), str(changed), "--exclude", "lm_head", "--no-plots"])
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_fifo_named_like_a_checkpoint_is_listed_as_left_out(tmp_path):
    """A link loop and a link to nothing were listed; a FIFO (or a file) named checkpoint-50 was dropped unsaid."""
    base, run, _ = synthetic_run(tmp_path, _update, steps=(10, 20))
    os.mkfifo(run / "checkpoint-50")
    (run / "checkpoint-60").write_text("not a folder")
    res = trace(str(base), [str(run)], config=TraceConfig(top_k=2))
    assert [c["step"] for c in res.checkpoints] == [10, 20]
    left = {Path(s["path"]).name: s["reason"] for s in res.skipped_checkpoints}
    assert left == {"checkpoint-50": "not a folder (a Trainer checkpoint is one)", "checkpoint-60": "not a folder (a Trainer checkpoint is one)"}


def test_a_path_over_path_max_is_not_blamed_on_one_name(tmp_path):
    """--out of 20 names of 240 bytes (none over 255, the whole over 4,096): "a name in the path is longer than the file
    system allows" sent the user hunting for a long name."""
    base, run, _ = synthetic_run(tmp_path, _update, steps=(10,))
    deep = tmp_path.joinpath(*["d" * 240] * 20)
    r = cli(["diff", str(base), str(run / "checkpoint-10"), "--out", str(deep)])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is longer than the system allows (4,096 bytes on Linux)" in r.stderr and "a name in the path" not in r.stderr
    r = cli(["diff", str(base), str(run / "checkpoint-10"), "--out", str(tmp_path / ("x" * 300))])
    assert r.returncode == 1 and "a name in the path is longer than the file system allows" in r.stderr


def test_a_tied_heads_copy_and_a_copy_of_narrower_values_are_judged_right(models, tmp_path):
    """Review round: a tied base's lm_head copy (PEFT loads it over the shared embedding) was never compared, so a
    changed one passed (‖ΔW‖ 1.03 where PEFT's merged model has 23); and a float32 copy holding bfloat16 values (a
    model loaded in bfloat16, saved in float32) was refused against the float32 base."""
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=32, max_position_embeddings=16, tie_word_embeddings=True,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "tied"),
                                peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    model.save_pretrained(tmp_path / "head")
    tensors = load_file(tmp_path / "head" / "adapter_model.safetensors")
    head = "base_model.model.lm_head.base_layer.weight"
    assert head in tensors
    open_adapter_on(tmp_path / "head", open_checkpoint(tmp_path / "tied"))  # its own copy: accepted
    shutil.copytree(tmp_path / "head", tmp_path / "bad")
    save_file({**tensors, head: tensors[head] + torch.randn(tensors[head].shape)}, tmp_path / "bad" / "adapter_model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match="this copy of a base layer differs from the base's model.embed_tokens.weight"):
        open_adapter_on(tmp_path / "bad", open_checkpoint(tmp_path / "tied"))

    emb = load_file(models / "emb" / "adapter_model.safetensors")
    lm = "base_model.model.lm_head.base_layer.weight"
    shutil.copytree(models / "emb", tmp_path / "narrow")
    save_file({**emb, lm: emb[lm].to(torch.bfloat16).float()}, tmp_path / "narrow" / "adapter_model.safetensors",
              metadata={"format": "pt"})  # bfloat16 values, stored in float32
    open_adapter_on(tmp_path / "narrow", open_checkpoint(models / "base"))


def test_odd_trainer_states_and_near_equal_scales(tmp_path, models):
    """A log_history of NaN (a hand edit the allow-NaN read lets through) raised TypeError; a lora_alpha of 8 against
    8.0000001 warned "s = 2, 2"."""
    base, run, _ = synthetic_run(tmp_path, _update, steps=(10, 20))
    state = run / "checkpoint-20" / "trainer_state.json"
    state.write_text(state.read_text().replace('"log_history": [', '"log_history": NaN, "was": ['))
    assert [c["step"] for c in trace(str(base), [str(run)], config=TraceConfig(top_k=2)).checkpoints] == [10, 20]
    near = tmp_path / "near"
    shutil.copytree(models / "run", near)
    cfg = near / "checkpoint-2" / "adapter_config.json"
    doc = json.loads(cfg.read_text())
    doc["lora_alpha"] = doc["lora_alpha"] + 1e-7
    cfg.write_text(json.dumps(doc))
    assert not any("LoRA scale" in w for w in trace(str(models / "base"), [str(near)], config=TraceConfig(top_k=2)).warnings)


def test_one_checkpoint_three_ways_is_one_warning(models, tmp_path):
    full = models / "full"
    (tmp_path / "link").symlink_to(full)
    res = interfere(str(models / "base"), [str(full), str(tmp_path / "link"), str(full / "model.safetensors")])
    same = [w for w in res.warnings if "are the same checkpoint" in w]
    assert len(same) == 1 and "their pairs compare an update with itself" in same[0]
