"""Thirty-fourth round: what trace said nothing of (docs/bad_inputs.md, "thirty-fourth round")."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from spectra.trace import TraceConfig, trace


def test_a_base_copy_mid_run_and_matrices_no_checkpoint_holds_are_warned(tmp_path):
    """A run's checkpoint-2 was an exact copy of the base (ΔW = 0 for all, between checkpoints that changed): its points
    read as a training that went back; and the base matrices no checkpoint saves (a run that saves its trained layers
    only) were not mentioned anywhere. Both warned now; a run that starts at the base is not a copy."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)]
    base = {n: torch.randn(12, 12, generator=g) for n in names}
    save_file(base, tmp_path / "base.safetensors")
    run = tmp_path / "run"
    for step, scale in ((1, 0.0), (2, 0.1), (3, 0.0), (4, 0.2)):  # step 1 at the base (a start), step 3 a copy
        (run / f"checkpoint-{step}").mkdir(parents=True)
        save_file({n: base[n] + scale * torch.randn(12, 12, generator=g) for n in names[:2]},
                  run / f"checkpoint-{step}" / "model.safetensors")
    res = trace(str(tmp_path / "base.safetensors"), [str(run)], config=TraceConfig())
    copies = [w for w in res.warnings if "between checkpoints that changed them" in w]
    assert len(copies) == 1 and copies[0].startswith("checkpoint-3: ΔW = 0 for every matrix"), res.warnings
    assert any(w.startswith(f"1 matrix of the base is in no checkpoint (e.g. {names[2]})") for w in res.warnings), res.warnings


def test_data_holding_model_folders_is_refused(tmp_path):
    """--data pointing at a folder of model folders trained on their config.json and generation_config.json (19 JSON
    files, exit 0): the check for a model folder looked at the top folder only."""
    import pytest

    from spectra.errors import SpectraError
    from spectra.training_inputs import read_examples

    (tmp_path / "data" / "models" / "m1").mkdir(parents=True)
    (tmp_path / "data" / "notes.txt").write_text("some text to train on\n" * 20)
    (tmp_path / "data" / "models" / "m1" / "config.json").write_text('{"model_type": "gpt2"}')
    save_file({"w": torch.zeros(2, 2)}, tmp_path / "data" / "models" / "m1" / "model.safetensors")
    with pytest.raises(SpectraError, match=r"holds a model folder \(.*m1\), whose config and tokenizer JSON would be read"):
        read_examples(tmp_path / "data")
    (tmp_path / "data" / "models" / "m1" / "model.safetensors").unlink()  # JSON without weights: data, as before
    assert read_examples(tmp_path / "data")
