"""Thirtieth round of hostile inputs: checkpoints as training frameworks write them (docs/bad_inputs.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import spectra
from spectra.errors import SpectraError
from spectra.io.checkpoint import open_checkpoint
from spectra.results import is_matrix_skip
from tests.pair_util import save_folder

NAMES = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]


def _weights(seed: int = 0, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(12, 8, generator=g) + shift for n in NAMES}


def test_one_tensor_parallel_rank_of_deepspeed_is_refused(tmp_path):
    """A tensor-parallel DeepSpeed run writes one mp_rank_NN file per rank, each with a slice of every split matrix
    (and mp_world_size): rank 00 alone was analysed as the whole model, ‖ΔW‖ 0.65-0.79 of the real one, exit 0."""
    half = {n: w[:6] for n, w in _weights().items()}
    torch.save({"module": half, "mp_world_size": 2, "ds_version": "0.14.0"}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(SpectraError, match=r"one tensor-parallel rank of 2 \(mp_world_size 2\).*never analysed") as exc:
        open_checkpoint(tmp_path / "mp_rank_00_model_states.pt")
    assert "merge the ranks" in (exc.value.hint or "")
    torch.save({"module": _weights(), "mp_world_size": 1, "ds_version": "0.14.0"}, tmp_path / "whole.pt")
    assert sorted(open_checkpoint(tmp_path / "whole.pt").tensors) == NAMES  # one rank: the whole weights, read


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_deepspeed_folders_advice_names_rank_00_only_when_it_is_the_whole_model(tmp_path, ranks):
    """The error for a DeepSpeed folder said "or pass …/mp_rank_00_model_states.pt, which holds the whole weights under
    ZeRO-1/2" beside an mp_rank_01 file too: rank 00 holds half of each split matrix there."""
    step = tmp_path / "ds" / "global_step10"
    step.mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("global_step10")
    for r in range(ranks):
        torch.save({"module": {}}, step / f"mp_rank_{r:02d}_model_states.pt")
    with pytest.raises(SpectraError) as exc:
        open_checkpoint(tmp_path / "ds")
    assert ("mp_rank_00_model_states.pt, which holds the whole weights" in (exc.value.hint or "")) == (ranks == 1)


def test_flat_optimizer_moments_and_integer_buffers_are_no_weights(tmp_path):
    """Adam's moments saved flat beside the weights (optim.state.<param>.exp_avg, the weights' shapes) were analysed
    as 16 more matrices with ranks and findings; an int64 2-D buffer on both sides was "not a float weight (quantised
    checkpoints are not supported)" and counted as a weight left out."""
    sides = {}
    for side, shift in (("base", 0.0), ("tuned", 0.01)):
        sd = _weights(0, shift)
        sd |= {f"optim.state.{n}.{m}": torch.rand(12, 8) for n in NAMES for m in ("exp_avg", "exp_avg_sq")}
        sd["model.position_ids"] = torch.arange(16).reshape(2, 8)
        torch.save(sd, tmp_path / f"{side}.pt")
        sides[side] = tmp_path / f"{side}.pt"
    res = spectra.diff(str(sides["base"]), str(sides["tuned"]))
    assert sorted(m.name for m in res.modules) == NAMES
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    assert all(reasons[f"optim.state.{n}.exp_avg"].startswith("optimizer state (exp_avg") for n in NAMES)
    assert "integer or boolean buffer" in reasons["model.position_ids"]
    assert not any(is_matrix_skip(r) for r in reasons.values())
    assert not any("skipped" in w and "findings cover" in w for w in res.warnings)


def test_trace_takes_the_step_of_lightning_checkpoint_names(tmp_path):
    """Lightning names its checkpoints epoch=E-step=S.ckpt; a shell glob lists step=100 before step=20 and 90: they
    were traced in that order as steps 1, 2, 3 (‖ΔW‖ 0.30 → 0.06 → 0.27: training undoing itself), exit 0."""
    base = _weights()
    save_folder(tmp_path / "base", base)
    paths = []
    for step in (100, 20, 90):  # the glob's order
        p = tmp_path / f"epoch={step // 10}-step={step}.ckpt"
        torch.save({"state_dict": {n: w + step / 1000 for n, w in base.items()}, "global_step": step, "epoch": step // 10}, p)
        paths.append(str(p))
    from spectra.trace import trace

    res = trace(str(tmp_path / "base"), paths)
    assert [c["step"] for c in res.checkpoints] == [20, 90, 100]
    assert [Path(c["path"]).name for c in res.checkpoints] == ["epoch=2-step=20.ckpt", "epoch=9-step=90.ckpt", "epoch=10-step=100.ckpt"]
    assert any("out of step order" in w for w in res.warnings)
    fro = [pt["fro_norm"] for pt in res.matrices[0]["points"]]
    assert fro == sorted(fro)


def test_a_head_paired_with_the_embedding_of_a_base_without_config_says_it_is_assumed(tmp_path):
    """A headless base (a bare backbone) without config.json against a tuned model with lm_head: the note stated
    "the base ties its output head to embed_tokens" as a fact."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(20, 8, generator=g)
    save_folder(tmp_path / "b", {"model.embed_tokens.weight": emb})
    save_folder(tmp_path / "t", {"model.embed_tokens.weight": emb + 0.01, "lm_head.weight": emb + 0.02})
    res = spectra.diff(str(tmp_path / "b"), str(tmp_path / "t"))
    head = next(m for m in res.modules if m.name == "lm_head.weight")
    assert "no config.json says it ties its head: taken as tied to model.embed_tokens.weight" in head.note
    save_folder(tmp_path / "b2", {"model.embed_tokens.weight": emb}, {"tie_word_embeddings": True, "model_type": "llama"})
    res = spectra.diff(str(tmp_path / "b2"), str(tmp_path / "t"))
    head = next(m for m in res.modules if m.name == "lm_head.weight")
    assert "the base ties its output head to model.embed_tokens.weight" in head.note
    assert json.dumps(res.to_dict())  # serialisable as ever


def test_a_training_loops_own_state_files_say_what_they_are(tmp_path):
    """A Trainer folder's optimizer.pt, scheduler.pt and rng_state.pth were "not a state dict; its top-level keys are
    'state', 'param_groups'" (or "entry 'python' is a tuple"), without saying what they are or where the weights are."""
    import random

    import numpy as np

    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save(sched.state_dict(), tmp_path / "scheduler.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
               tmp_path / "rng_state.pth")  # as the Trainer saves it: numpy's state needs pickle code to load
    torch.save({"python": random.getstate(), "numpy": "kept apart", "cpu": torch.random.get_rng_state()}, tmp_path / "rng.pt")
    for name, what in (("optimizer.pt", "an optimizer's state"), ("scheduler.pt", "a learning-rate scheduler's state"),
                       ("rng_state.pth", "random number generator states"), ("rng.pt", "random number generator states")):
        with pytest.raises(SpectraError) as exc:
            open_checkpoint(tmp_path / name)
        assert what in exc.value.message and "not model weights" in exc.value.message and "model.safetensors" in exc.value.hint


def test_a_composer_checkpoint_is_read_from_its_state_model(tmp_path):
    """MosaicML Composer keeps the weights at ckpt["state"]["model"]: refused with "its top-level keys are 'state',
    'rng'"; read now, as the other training checkpoints' wrappers are."""
    for side, shift in (("base", 0.0), ("tuned", 0.01)):
        w = _weights(0, shift)
        torch.save({"state": {"model": w, "optimizers": {"AdamW": {}}, "timestamp": {}}, "rng": [{}]}, tmp_path / f"{side}.pt")
    res = spectra.diff(str(tmp_path / "base.pt"), str(tmp_path / "tuned.pt"))
    assert sorted(m.name for m in res.modules) == NAMES
    assert all(m.fro_norm == pytest.approx(0.01 * (12 * 8) ** 0.5, rel=1e-5) for m in res.modules)


@pytest.mark.parametrize("layout", ["trainer", "lightning"])
def test_a_folder_of_checkpoints_names_them(tmp_path, layout):
    """A Trainer output folder holding only checkpoint-N folders, or a Lightning folder of .ckpt files, got the generic
    "no model.safetensors … in this folder"."""
    run = tmp_path / "run"
    for step in (10, 20):
        if layout == "trainer":
            save_folder(run / f"checkpoint-{step}", _weights())
        else:
            run.mkdir(exist_ok=True)
            torch.save({"state_dict": _weights(), "global_step": step}, run / f"epoch=0-step={step}.ckpt")
    with pytest.raises(SpectraError) as exc:
        open_checkpoint(run)
    if layout == "trainer":
        assert "a training run's folder of checkpoints (checkpoint-10, checkpoint-20)" in exc.value.message
        assert "spectra trace BASE" in exc.value.hint and "checkpoint-20" in exc.value.hint
    else:
        assert "a folder of training checkpoints (epoch=0-step=10.ckpt, epoch=0-step=20.ckpt)" in exc.value.message


def test_a_file_of_two_models_names_their_prefixes(tmp_path):
    """A DPO trainer's state (policy.… and ref_model.…) against its base: "no weight matrix of the base pairs … are both
    checkpoints of the same architecture?", where the file holds two models of that very architecture."""
    w = _weights()
    torch.save(w, tmp_path / "base.pt")
    torch.save({f"{who}.{n}": t + 0.01 for who in ("policy", "ref_model") for n, t in w.items()}, tmp_path / "dpo.pt")
    with pytest.raises(SpectraError) as exc:
        spectra.diff(str(tmp_path / "base.pt"), str(tmp_path / "dpo.pt"))
    assert "tuned holds 2 models, under 'policy.' and 'ref_model.'" in exc.value.message
    assert "k.startswith('policy.')" in exc.value.hint
    save_folder(tmp_path / "b", {f"student.{n}": t for n, t in w.items()})
    with pytest.raises(SpectraError, match=r"base holds its model under 'student\.'"):
        spectra.diff(str(tmp_path / "b"), str(tmp_path / "base.pt"))
