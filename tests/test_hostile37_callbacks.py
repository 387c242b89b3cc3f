"""Thirty-seventh round: the training callbacks (docs/bad_inputs.md, "thirty-seventh round")."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from spectra.callbacks import SpectraTracker


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)


class _Model(nn.Module):
    def __init__(self, n: int = 3):
        super().__init__()
        self.layers = nn.ModuleList([_Layer() for _ in range(n)])

    def forward(self, x):
        return self.layers[0].q_proj(x)  # the other layers get no gradient (skipped layers, unrouted experts)


def test_logged_medians_are_over_the_matrices_that_changed(tmp_path):
    torch.manual_seed(0)
    model = _Model()
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path / "trk")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(1, 3):
        x = torch.randn(8, 16)
        (model(x) - x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        logs = tracker.step(model, step)
    tracker.close()
    W0 = [r for r in map(json.loads, (tmp_path / "trk" / "trace.jsonl").read_text().splitlines())
          if "point" in r and r["step"] == 2]
    changed = [r["point"] for r in W0 if r["point"]["fro_norm"] > 0]
    assert len(W0) == 3 and len(changed) == 1
    # the median of one changed matrix and two untouched ones was 0.0: "no update"
    assert logs["spectra/q_proj/rel_norm"] == pytest.approx(changed[0]["rel_norm"]) and logs["spectra/q_proj/rel_norm"] > 0
    assert logs["spectra/q_proj/energy_rank_0.9"] == changed[0]["energy_rank"]["0.9"] > 0


def test_a_cast_after_the_tracker_copied_the_weights_is_said(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False))
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path / "trk")
    model.to(torch.bfloat16)  # nothing trains: ΔW is the cast's rounding
    tracker.step(model, 1)
    tracker.close()
    assert any("were cast since the tracker copied them" in w and "bfloat16" in w for w in tracker.warnings), tracker.warnings
    warned = [r["warning"] for r in map(json.loads, (tmp_path / "trk" / "trace.jsonl").read_text().splitlines()) if "warning" in r]
    assert any("were cast" in w for w in warned)  # in the trace too, where spectra report reads it


def test_trainer_callback_measures_the_last_step(tmp_path):
    transformers = pytest.importorskip("transformers")
    from spectra.callbacks import attach

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=6,
                                          save_strategy="no", logging_steps=1, learning_rate=5e-3, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data())
    attach(trainer, every=4)
    trainer.train()
    recs = [json.loads(x) for x in (tmp_path / "run" / "trace.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in recs if "point" in r}) == [4, 6]  # step 6, the model the Trainer ends with
