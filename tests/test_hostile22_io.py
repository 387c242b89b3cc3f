"""Twenty-second round, adapters read alone (docs/bad_inputs.md, "twenty-second round"): GPT-2's fused
``c_attn`` from a ``fan_in_fan_out`` adapter with no base, and an adapter folder with two weight files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.cli_util import cli
from tests.conftest import random_lora

T = pytest.importorskip("transformers")


def _gpt2_adapter(tmp_path):
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=32))
    model.save_pretrained(tmp_path / "base")
    peft_model = random_lora(T.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), 1, r=3, target_modules=["c_attn"],
                             fan_in_fan_out=True)
    peft_model.save_pretrained(tmp_path / "ad")
    return tmp_path / "base", tmp_path / "ad", peft_model


def _rows(proc) -> dict[str, dict]:
    assert proc.returncode == 0, proc.stderr
    return {m["name"]: m for m in json.loads(proc.stdout)["modules"]}


def test_a_gpt2_adapter_alone_splits_c_attn_as_with_its_base(tmp_path):
    """`spectra diff ADAPTER` left c_attn whole (8 rows against the base's 12: the (3d, d) update never matched the
    (d, 3d) shape that tells GPT-2's Conv1D), though the adapter's fan_in_fan_out says it."""
    base, ad, peft_model = _gpt2_adapter(tmp_path)
    alone, with_base = _rows(cli(["diff", str(ad), "--json"])), _rows(cli(["diff", str(base), str(ad), "--json"]))
    assert sorted(alone) == sorted(with_base) and len(alone) == 3, (sorted(alone), sorted(with_base))
    # the reference: PEFT's own factors, ΔW = s·B·A as (out, in) = (3d, d), its q, k, v row blocks in float64
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    dW = (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()).detach() * layer.scaling["default"]
    for i, part in enumerate("qkv"):
        block = dW[32 * i: 32 * (i + 1)].numpy()
        name = next(n for n in alone if n.endswith(f":{part}"))
        assert alone[name]["fro_norm"] == pytest.approx(float(np.linalg.norm(block)), rel=1e-9)
        assert alone[name]["fro_norm"] == pytest.approx(with_base[name]["fro_norm"], rel=1e-9)
        S = np.linalg.svd(block, compute_uv=False)
        assert alone[name]["spectral_norm"] == pytest.approx(float(S[0]), rel=1e-9)


def test_an_adapter_folder_with_two_weight_files_says_which_it_read(tmp_path):
    """A full checkpoint's folder with two weight sets was warned about; an adapter's was not (the .bin with other
    values was ignored without a word)."""
    base, ad, _ = _gpt2_adapter(tmp_path)
    from safetensors.torch import load_file

    state = load_file(ad / "adapter_model.safetensors")
    torch.save({k: v * 3 if "lora_B" in k else v for k, v in state.items()}, ad / "adapter_model.bin")
    proc = cli(["diff", str(base), str(ad), "--json"])
    assert proc.returncode == 0, proc.stderr
    said = [w for w in json.loads(proc.stdout)["warnings"] if "holds 2 weight sets" in w]
    assert len(said) == 1 and "read adapter_model.safetensors" in said[0] and "ignored adapter_model.bin" in said[0], said
    assert "holds 2 weight sets" in proc.stderr
    shutil.copy(ad / "adapter_model.safetensors", tmp_path / "x.safetensors")  # the one file alone: no such warning
    (ad / "adapter_model.bin").unlink()
    proc = cli(["diff", str(base), str(ad), "--json"])
    assert proc.returncode == 0 and "weight sets" not in proc.stdout + proc.stderr
