"""SpectraTracker and SpectraCallback: the metrics measured during training equal those ``spectra trace``
computes from the saved checkpoints, reach the Trainer's loggers, and cost little."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from spectra.callbacks import SpectraCallback, SpectraTracker
from spectra.errors import ConfigError
from spectra.trace import TraceConfig, load_trace, trace
from spectra.tracker_logs import log_medians
from tests.test_trace import trainer_run


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    return root, {m: trainer_run(root, m, every=2) for m in ("full", "lora")}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_callback_equals_trace_from_checkpoints(traced, method):
    """The same numbers from the training process (no checkpoint read) as from checkpoint-N folders."""
    root, runs = traced
    live = load_trace(runs[method] / "trace.jsonl")
    saved = trace(str(root / "base"), [str(runs[method])])
    assert live.kind == saved.kind == method
    assert [c["step"] for c in live.checkpoints] == [c["step"] for c in saved.checkpoints] == [2, 4, 6]
    a = {m["name"]: m for m in live.matrices}
    b = {m["name"]: m for m in saved.matrices}
    assert set(a) == set(b)
    for name in a:
        assert a[name]["lora_r"] == b[name]["lora_r"] and a[name]["shape"] == b[name]["shape"]
        for pa, pb in zip(a[name]["points"], b[name]["points"]):
            assert pa["energy_rank"] == pb["energy_rank"]
            for key in ("fro_norm", "rel_norm", "spectral_norm", "stable_rank", "effective_rank"):
                assert pa[key] == pytest.approx(pb[key], rel=1e-6), (name, key)
            for which in ("turn_prev", "turn_first"):
                if pb[which] is None:
                    assert pa[which] is None
                else:
                    assert pa[which]["right"]["phi"] == pytest.approx(pb[which]["right"]["phi"], abs=1e-6)
    assert [h["step"] for h in live.loss_history] == [1, 2, 3, 4, 5, 6]  # every logged loss, joined for the report


def test_metrics_reach_the_loggers(traced):
    _, runs = traced
    state = json.loads((runs["lora"] / "checkpoint-6" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if any(k.startswith("spectra/") for k in h)]
    assert [h["step"] for h in logged] == [2, 4, 6]
    assert {"spectra/q_proj/energy_rank_0.9", "spectra/v_proj/rel_norm", "spectra/up_proj/effective_rank"} <= set(logged[0])
    assert "spectra/q_proj/phi_first" in logged[1]
    # the step's own training loss is still logged at the measured steps (trainer.log must not swallow it)
    assert {h["step"] for h in state["log_history"] if "loss" in h} == {1, 2, 3, 4, 5, 6}


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=32, max_position_embeddings=16,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def test_plain_loop_with_a_known_update(tmp_path):
    """W_t = W₀ + t·ΔW (set by hand): ranks constant, norms ∝ t, subspaces unturned; measured every 2 steps."""
    model = _tiny()
    tracker = SpectraTracker(model, every=2, out_dir=tmp_path, config=TraceConfig(top_k=2, include="q_proj"))
    assert [t.name for t in tracker.matrices] == ["model.layers.0.self_attn.q_proj.weight"] and tracker.kind == "full"
    w = model.model.layers[0].self_attn.q_proj.weight
    w0 = w.detach().clone()
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) * 0.01
    got = []
    for step in range(1, 7):
        with torch.no_grad():
            w.copy_(w0 + step * delta)
        logs = tracker.step(model, step, loss=1.0 / step)
        assert (logs is None) == (step % 2 == 1)
        if logs:
            got.append(logs)
    assert tracker.measurements == 3 and tracker.seconds > 0
    res = load_trace(tmp_path / "trace.jsonl")
    pts = res.matrices[0]["points"]
    S = np.linalg.svd((delta.double()).numpy(), compute_uv=False)
    for p, step in zip(pts, (2, 4, 6)):
        assert p["fro_norm"] == pytest.approx(step * np.linalg.norm(S), rel=1e-5)
        assert p["energy_rank"] == pts[0]["energy_rank"]
    assert pts[2]["turn_first"]["right"]["phi"] == pytest.approx(1.0, abs=1e-6)
    assert got[-1]["spectra/q_proj/phi_first"] == pytest.approx(1.0, abs=1e-6)
    assert [h["loss"] for h in res.loss_history] == pytest.approx([0.5, 0.25, 1 / 6])
    assert tracker.step(model, 0) is None  # nothing at step 0 (the update is zero by construction)


def test_lora_model_and_skips(tmp_path):
    model = peft.get_peft_model(_tiny(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    tracker = SpectraTracker(model, every=1, out_dir=None)
    assert tracker.kind == "lora" and {t.meta["lora_r"] for t in tracker.matrices} == {2}
    logs = tracker.step(model, 1)  # LoRA starts with B = 0: zero updates, no subspace, no NaN
    assert logs["spectra/q_proj/energy_rank_0.9"] == 0 and "spectra/q_proj/phi_prev" not in logs
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    tracker.step(model, 2)
    mod = model.base_model.model.model.layers[0].self_attn.q_proj
    B, A, s = mod.lora_B["default"].weight.double(), mod.lora_A["default"].weight.double(), mod.scaling["default"]
    S_ref = np.linalg.svd((s * B @ A).detach().numpy(), compute_uv=False)
    logs = tracker.measure(3)
    q = S_ref[:2] / S_ref[:2].sum()
    # each key carries what its name says (the rank itself was logged as the ratio to r)
    assert logs["spectra/q_proj/effective_rank"] == pytest.approx(math.exp(-np.sum(q * np.log(q))), rel=1e-6)
    assert logs["spectra/q_proj/effective_rank_over_r"] == pytest.approx(math.exp(-np.sum(q * np.log(q))) / 2, rel=1e-6)
    dora = peft.get_peft_model(_tiny(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="found no matrix to trace .*DoRA"):  # nothing left to trace: said at once
        SpectraTracker(dora, every=1)
    with pytest.raises(ConfigError, match="every must be a whole number >= 0"):
        SpectraTracker(_tiny(), every=-1)
    with pytest.raises(ConfigError, match="initial must be"):
        SpectraTracker(_tiny(), initial="gpu")


def test_callback_without_trainer_merges_into_the_next_log():
    model = _tiny()
    cb = SpectraCallback(every=1, out_dir=None)
    args = transformers.TrainingArguments(output_dir="/tmp/unused-spectra-cb", report_to=[], use_cpu=True)
    state = transformers.TrainerState()
    control = transformers.TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    state.global_step = 1
    control = cb.on_step_end(args, state, control)
    assert control.should_log
    logs = {"loss": 2.0}
    state.log_history.append({"loss": 2.0, "step": 1})
    cb.on_log(args, state, control, logs=logs)
    assert "spectra/up_proj/rel_norm" in logs and "spectra/up_proj/rel_norm" in state.log_history[-1]


def test_log_medians():
    recs = [{"matrix": {"module": "q"}, "point": {"energy_rank": {"0.5": 1, "0.9": r}, "rel_norm": 0.1 * r,
                                                  "turn_prev": {"right": {"phi": 0.9}}}} for r in (1, 2, 6)]
    logs = log_medians(recs)
    assert logs == {"spectra/q/energy_rank_0.9": 2, "spectra/q/rel_norm": pytest.approx(0.2), "spectra/q/phi_prev": 0.9}
