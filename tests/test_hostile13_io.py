"""Training checkpoints and distributed-training folders as inputs (adversarial probe 13):

- a PyTorch Lightning ``last.ckpt`` is read as the ``.pt`` it is; ``{"model_state_dict": ...}`` unwrapped;
- a module's non-tensor ``_extra_state`` is skipped with a note, and a state dict that holds another
  non-tensor names that entry; an EMA weight set beside the one read is named;
- DeepSpeed ZeRO-3 placeholders are refused naming ``zero_to_fp32.py``; DeepSpeed, DCP and FSDP folders
  name their converter; a NumPy archive renamed ``.pt`` is named as one;
- ``extract`` from a tuned checkpoint with a wrapper prefix (DDP ``module.``, Lightning ``model.``) writes
  an adapter that PEFT loads onto the base, checked against base + the truncated float64 SVD of ΔW.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from spectra.errors import CheckpointFormatError
from spectra.io.checkpoint import open_checkpoint
from spectra_cli.main import main
from tests.conftest import tiny_llama


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(16, 32, generator=g),
            "model.layers.0.input_layernorm.weight": torch.ones(16)}


def _lightning(state: dict[str, torch.Tensor], prefix: str = "model.", **extra: object) -> dict:
    """What ``Trainer.save_checkpoint`` writes: the LightningModule's state dict (its HF model under ``prefix``)."""
    return {"epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.4.0",
            "state_dict": {prefix + k: v for k, v in state.items()},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                                  "param_groups": [{"lr": 1e-4, "params": [0]}]}],
            "lr_schedulers": [], "hyper_parameters": {"lr": 1e-4}, **extra}


def _same(ckpt, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    assert sorted(ckpt.tensors) == sorted(prefix + k for k in state)
    for k, v in state.items():
        np.testing.assert_array_equal(ckpt.load(prefix + k).numpy(), v.numpy())


# 1, 2: .ckpt files and the tutorial's model_state_dict --------------------------------------------------------------


@pytest.mark.parametrize("name", ["last.ckpt", "epoch=3-step=100.ckpt", "model.pth"])
def test_lightning_ckpt_is_read_as_a_pytorch_file(tmp_path, name):
    state = _state(1)
    torch.save(_lightning(state), tmp_path / name)
    ckpt = open_checkpoint(tmp_path / name)
    _same(ckpt, state, "model.")
    assert any("under its 'state_dict' key" in n for n in ckpt.notes), ckpt.notes


def test_ckpt_is_still_loaded_weights_only(tmp_path):
    """A .ckpt whose pickle would import a callable is refused as a .pt is, never run."""
    class Boom:
        def __reduce__(self):
            return (print, ("ran",))
    torch.save({"state_dict": _state(), "x": Boom()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="pickle code execution"):
        open_checkpoint(tmp_path / "evil.ckpt")


def test_model_state_dict_key_is_unwrapped_with_a_note(tmp_path):
    state = _state(2)
    torch.save({"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 2},
               tmp_path / "checkpoint.pt")
    ckpt = open_checkpoint(tmp_path / "checkpoint.pt")
    _same(ckpt, state)
    assert any("under its 'model_state_dict' key" in n for n in ckpt.notes), ckpt.notes


def test_model_state_dict_beside_model_is_still_ambiguous(tmp_path):
    torch.save({"model": _state(2), "model_state_dict": _state(3)}, tmp_path / "two.pt")
    with pytest.raises(CheckpointFormatError, match="ambiguous"):
        open_checkpoint(tmp_path / "two.pt")


# 3: a module's extra state ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{"fp8_meta": None}, None, b"\x00\x01"])
def test_non_tensor_extra_state_is_skipped_with_a_note(tmp_path, extra):
    state = _state(3)
    sd = _lightning(state)
    sd["state_dict"]["model.model.layers.0.self_attn._extra_state"] = extra
    torch.save(sd, tmp_path / "last.ckpt")
    ckpt = open_checkpoint(tmp_path / "last.ckpt")
    _same(ckpt, state, "model.")
    note = next(n for n in ckpt.notes if "extra state" in n)
    assert "model.model.layers.0.self_attn._extra_state" in note and "under its 'state_dict' key" in note


def test_plain_state_dict_with_extra_state_is_read(tmp_path):
    state = _state(4)
    torch.save({**state, "model.layers.0.mlp._extra_state": None}, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    _same(ckpt, state)
    assert any("skipped 1 non-tensor module extra state entry" in n for n in ckpt.notes), ckpt.notes


def test_other_non_tensor_entry_is_named_inside_the_wrapper(tmp_path):
    sd = _lightning(_state(5))
    sd["state_dict"]["model.model.rope_cache"] = {"theta": 10000.0}
    torch.save(sd, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointFormatError) as err:
        open_checkpoint(tmp_path / "last.ckpt")
    text = str(err.value)
    assert "under its 'state_dict' key, entry 'model.model.rope_cache' is a dict, not a tensor" in text, text
    assert "top-level keys" not in text


# 4: an EMA weight set beside the model's ---------------------------------------------------------------------------


def test_ema_state_dict_beside_state_dict_is_named(tmp_path):
    state, ema = _state(6), _state(7)
    torch.save({"state_dict": state, "state_dict_ema": ema, "epoch": 3}, tmp_path / "ema.pt")
    ckpt = open_checkpoint(tmp_path / "ema.pt")
    _same(ckpt, state)
    note = next(n for n in ckpt.notes if "state_dict_ema" in n)
    assert "moving average" in note and "not read" in note and "torch.save(ckpt['state_dict_ema']" in note


# 5: DeepSpeed, DCP, FSDP ------------------------------------------------------------------------------------------


def _ds_states(module: dict[str, torch.Tensor], stage: int) -> dict:
    """What ``DeepSpeedEngine.save_checkpoint`` writes to ``*_model_states.pt``."""
    return {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": [{k: v.shape for k, v in module.items()}],
            "global_steps": 10, "dp_world_size": 2, "ds_config": {"zero_optimization": {"stage": stage}}, "ds_version": "0.15.0"}


@pytest.mark.parametrize("threshold", [0, 300])  # every matrix partitioned; the small ones kept whole (persistent)
def test_zero3_placeholders_are_refused_naming_zero_to_fp32(tmp_path, threshold):
    state = _state(8)
    module = {k: (torch.empty(0) if v.ndim == 2 and v.numel() > threshold else v) for k, v in state.items()}
    torch.save(_ds_states(module, 3), tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointFormatError) as err:
        open_checkpoint(tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    text = str(err.value)
    assert "ZeRO-3" in text and "zero_to_fp32.py" in text and "placeholders" in text, text


def test_zero2_model_states_are_read(tmp_path):
    state = _state(9)
    torch.save(_ds_states(state, 2), tmp_path / "mp_rank_00_model_states.pt")
    _same(open_checkpoint(tmp_path / "mp_rank_00_model_states.pt"), state)


def test_deepspeed_folders_name_zero_to_fp32(tmp_path):
    root = tmp_path / "ds"
    (root / "global_step10").mkdir(parents=True)
    (root / "latest").write_text("global_step10")
    torch.save(_ds_states(_state(), 2), root / "global_step10" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2}, "ds_version": "0.15.0"},
               root / "global_step10" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    for where in (root, root / "global_step10"):
        with pytest.raises(CheckpointFormatError) as err:
            open_checkpoint(where)
        text = str(err.value)
        assert "DeepSpeed" in text and "zero_to_fp32.py" in text and "mp_rank_00_model_states.pt" in text, text
    with pytest.raises(CheckpointFormatError, match="DeepSpeed checkpoint file without model weights.*zero_to_fp32"):
        open_checkpoint(root / "global_step10" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    # ZeRO-3: no model-states file holds whole weights, so none is offered
    (root / "global_step10" / "mp_rank_00_model_states.pt").rename(root / "global_step10" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointFormatError) as err:
        open_checkpoint(root)
    assert "ZeRO-3" in str(err.value) and "or pass" not in str(err.value)


def test_dcp_and_fsdp_folders_name_dcp_to_torch(tmp_path):
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"\x80\x04metadata")
    (dcp / "__0_0.distcp").write_bytes(b"\x00" * 64)
    for where in (dcp, dcp / "__0_0.distcp", dcp / ".metadata"):
        with pytest.raises(CheckpointFormatError) as err:
            open_checkpoint(where)
        assert "torch.distributed.checkpoint" in str(err.value) and "dcp_to_torch" in str(err.value), str(err.value)
    run = tmp_path / "run"
    shutil.copytree(dcp, run / "pytorch_model_fsdp_0")
    with pytest.raises(CheckpointFormatError, match="FSDP.*dcp_to_torch .*pytorch_model_fsdp_0"):
        open_checkpoint(run)


# 6: a NumPy archive under a PyTorch name ---------------------------------------------------------------------------


def test_npz_renamed_pt_is_named_a_numpy_archive(tmp_path):
    np.savez(tmp_path / "weights.npz", **{k: v.numpy() for k, v in _state().items()})
    shutil.copy(tmp_path / "weights.npz", tmp_path / "weights.pt")
    for name in ("weights.pt", "weights.npz"):
        with pytest.raises(CheckpointFormatError, match="NumPy archive"):
            open_checkpoint(tmp_path / name)


# 7: extract from a tuned checkpoint saved through a wrapper ---------------------------------------------------------


def _tuned_pair(tmp: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A tiny Llama base folder and tuned weights = base + a rank-3 update per matrix and a changed norm."""
    model = tiny_llama(seed=0)
    base_dir = tmp / "base"
    model.save_pretrained(base_dir)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tuned = {k: (v + 0.01 * torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v.shape[1], generator=g)
                 if v.ndim == 2 else v.clone()) for k, v in base.items()}
    tuned["model.norm.weight"] = tuned["model.norm.weight"] + 0.1
    return base_dir, base, tuned


def _merged_against_svd(base_dir: Path, out: Path, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], r: int) -> int:
    """Load the adapter with PEFT onto the base, merge, and compare each changed matrix with base + the rank-r
    truncated float64 SVD of ΔW; returns the number of matrices it changed."""
    peft = pytest.importorskip("peft")
    import transformers as T

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft.PeftModel.from_pretrained(T.LlamaForCausalLM.from_pretrained(base_dir), out).merge_and_unload().state_dict()
    changed = 0
    for k, w in merged.items():
        if w.ndim != 2 or torch.equal(w, base[k]):
            continue
        changed += 1
        D = (tuned[k].double() - base[k].double()).numpy()
        U, S, Vt = np.linalg.svd(D, full_matrices=False)
        ref = base[k].double().numpy() + (U[:, :r] * S[:r]) @ Vt[:r]
        assert np.abs(w.double().numpy() - ref).max() <= 1e-5 * np.abs(D).max(), k
    return changed


@pytest.mark.parametrize("layout", ["ddp", "lightning"])
def test_extract_names_modules_as_the_base_does(tmp_path, layout):
    base_dir, base, tuned = _tuned_pair(tmp_path)
    if layout == "ddp":  # DistributedDataParallel's state dict: every name under "module."
        where = tmp_path / "tuned_ddp"
        where.mkdir()
        save_file({"module." + k: v.contiguous() for k, v in tuned.items()}, str(where / "model.safetensors"))
        shutil.copy(base_dir / "config.json", where / "config.json")
    else:  # a LightningModule holding the HF model as self.model: "model.model.layers…"
        where = tmp_path / "last.ckpt"
        torch.save(_lightning(tuned), where)
    out = tmp_path / "ex"
    res = CliRunner().invoke(main, ["extract", str(base_dir), str(where), "-o", str(out), "-r", "2", "--save-modules", "--no-plots"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    names = list(load_file(str(out / "adapter_model.safetensors")))
    assert all(n.startswith(("base_model.model.model.layers.", "base_model.model.model.norm.")) for n in names), names[:3]
    assert cfg["modules_to_save"] == ["model.norm"] and "base_model.model.model.norm.weight" in names, (cfg, names)
    assert all(not m.startswith(("module.", "model.model.")) for m in cfg["target_modules"]), cfg["target_modules"]
    assert cfg["task_type"] == "CAUSAL_LM"  # the base folder's config names LlamaForCausalLM
    assert _merged_against_svd(base_dir, out, base, tuned, 2) == 14
