"""Thirty-fifth round: ``spectra diff --esd`` applies spectra esd's storage-rounding rule to W_base and W_tuned."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from tests.cli_util import cli

KEY = "model.layers.0.mlp.up_proj.weight"


def _low_rank_bf16(g: torch.Generator) -> torch.Tensor:
    """A 256 × 128 weight of exact rank 5 stored in bfloat16: its other 123 eigenvalues are storage rounding."""
    return (torch.randn(256, 5, generator=g) @ torch.randn(5, 128, generator=g)).bfloat16()


def test_diff_esd_has_no_marchenko_pastur_bulk_of_storage_rounding(tmp_path):
    """``spectra esd`` of a rank-5 bf16 weight gives no MP fit (its bulk is rounding) while ``diff --esd`` of the same
    weight as a base counted 20 spikes. Now both agree and the diff says why; the tuned side, a full-rank
    update above its rounding, keeps its fit."""
    g = torch.Generator().manual_seed(0)
    W = _low_rank_bf16(g)
    save_file({KEY: W}, tmp_path / "b.safetensors")
    save_file({KEY: (W.float() + 0.01 * torch.randn(256, 128, generator=g)).bfloat16()}, tmp_path / "t.safetensors")
    res = cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--esd", "--no-plots",
               "--out", str(tmp_path / "d")])
    assert res.returncode == 0, res.stderr
    esd = json.loads((tmp_path / "d" / "results.json").read_text())["modules"][0]["esd"]
    assert esd["base"]["mp_num_spikes"] is None and esd["base"]["mp_sigma2"] is None
    assert "W_base: its median eigenvalue" in esd["note"] and "bfloat16 storage" in esd["note"]
    assert esd["tuned"]["mp_num_spikes"] is not None and "W_tuned" not in esd["note"]
    res = cli(["esd", str(tmp_path / "b.safetensors"), "--no-plots", "--out", str(tmp_path / "e")])
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "e" / "esd.json").read_text())["matrices"][0]["mp_num_spikes"] is None


def test_adapter_diff_esd_rounding_rule_on_both_sides(tmp_path):
    """A LoRA adapter on that base: W_tuned = W_base + s·B·A carries the base's rounding (the update is tiny), so
    neither side gets an MP fit of rounding; a float32 base of the same rank has no rounding to speak of."""
    g = torch.Generator().manual_seed(1)
    W = _low_rank_bf16(g)
    (tmp_path / "base").mkdir()
    save_file({KEY: W}, tmp_path / "base" / "model.safetensors")
    (tmp_path / "lora").mkdir()
    key = "base_model.model.model.layers.0.mlp.up_proj"
    save_file({f"{key}.lora_A.weight": 1e-4 * torch.randn(2, 128, generator=g),
               f"{key}.lora_B.weight": 1e-4 * torch.randn(256, 2, generator=g)}, tmp_path / "lora" / "adapter_model.safetensors")
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["up_proj"]}))
    res = cli(["diff", str(tmp_path / "base"), str(tmp_path / "lora"), "--esd", "--no-plots", "--out", str(tmp_path / "d")])
    assert res.returncode == 0, res.stderr
    esd = json.loads((tmp_path / "d" / "results.json").read_text())["modules"][0]["esd"]
    assert esd["base"]["mp_sigma2"] is None and esd["tuned"]["mp_sigma2"] is None
    assert "W_base: its median eigenvalue" in esd["note"] and "W_tuned: its median eigenvalue" in esd["note"]
