"""Quantised checkpoints with scale tensors (dequantised on load) and numerical caveats of ΔW.

Part A: fp8 / int8 weights stored with ``weight_scale`` / ``weight_scale_inv`` are analysed
dequantised, against a float64 numpy oracle; scale tensors are never analysed as matrices.
Part B: :func:`spectra.numerics.numeric_flags` on planted cases, each flag both firing and not firing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import spectra
from spectra.errors import CheckpointFormatError, SpectraError
from spectra.io.checkpoint import dequantize, open_checkpoint
from spectra.numerics import numeric_flags, numeric_notes
from tests.conftest import reference_energy_rank, svd64

Q = "model.layers.0.self_attn.q_proj"
D = "model.layers.0.mlp.down_proj"
FP8 = torch.float8_e4m3fn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fp8_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantise float weights to fp8 codes for a given (already broadcast) scale."""
    return (w / scale).clamp(-448, 448).to(FP8)


def _block_expand(s: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """float64 reference expansion of block scales to the weight's shape (the oracle's way)."""
    return s.double().repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def _oracle(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> np.ndarray:
    """Dequantised weight in float64 numpy."""
    s = s.double()
    if s.numel() == 1:
        full = s.reshape(1, 1).expand(q.shape)
    elif s.numel() == q.shape[0]:
        full = s.reshape(-1, 1).expand(q.shape)
    else:
        full = _block_expand(s.reshape(-(-q.shape[0] // block[0]), -1), tuple(q.shape), block)
    return q.double().numpy() * full.numpy()


def _check_module(m, ref: np.ndarray) -> None:
    """A ModuleResult against the float64 SVD of the reference ΔW."""
    S = svd64(ref)
    assert m.fro_norm == pytest.approx(float(np.sqrt(np.sum(ref**2))), rel=1e-6)
    k = len(m.singular_values)
    np.testing.assert_allclose(m.singular_values, S[:k], rtol=1e-5, atol=1e-6 * S[0])
    for key, rank in m.energy_rank.items():
        want, clear = reference_energy_rank(S, float(key))
        if clear:
            assert rank == want, key


def _scaled_pair(shape, make_scale, seed=0, leaf="weight_scale"):
    """(base sd, tuned sd, base ΔW reference) for fp8 weights with a scale made by make_scale."""
    g = _gen(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    upd = 1e-2 * torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g)
    sb, st = make_scale(w, 1.0), make_scale(w + upd, 1.1)
    return w, w + upd, sb, st


# ---------------------------------------------------------------------------------------------------
# Part A: dequantisation on load
# ---------------------------------------------------------------------------------------------------

def _per_tensor(w, f):
    return (w.abs().max() / 448 * f).reshape(())


def _per_channel(w, f):
    return (w.abs().amax(dim=1, keepdim=True) / 448 * f)  # (out, 1)


def _write_fp8(path: Path, w: torch.Tensor, s: torch.Tensor, block, leaf: str, extra: dict | None = None,
               scale_shape=None) -> tuple[torch.Tensor, torch.Tensor]:
    full = s.reshape(1, 1) if s.numel() == 1 else (s.reshape(-1, 1) if s.numel() == w.shape[0] else
                                                   _block_expand(s, tuple(w.shape), block).float())
    q = _fp8_codes(w, full)
    stored_s = s.reshape(scale_shape) if scale_shape is not None else s
    sd = {f"{Q}.weight": q, f"{Q}.{leaf}": stored_s.float().contiguous(), **(extra or {})}
    save_file(sd, str(path))
    return q, stored_s


@pytest.mark.parametrize("kind,scale_shape", [("tensor", ()), ("tensor", (1,)), ("channel", None), ("channel", (-1,))])
def test_fp8_per_tensor_and_per_channel_scales_match_float64_oracle(tmp_path, kind, scale_shape):
    make = _per_tensor if kind == "tensor" else _per_channel
    w_b, w_t, s_b, s_t = _scaled_pair((96, 80), make)
    extra = {f"{Q}.input_scale": torch.tensor([0.5])}
    qb, sb = _write_fp8(tmp_path / "b.safetensors", w_b, s_b, None, "weight_scale", extra, scale_shape)
    qt, st = _write_fp8(tmp_path / "t.safetensors", w_t, s_t, None, "weight_scale", extra, scale_shape)
    res = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    assert [m.name for m in res.modules] == [f"{Q}.weight"]
    _check_module(res.modules[0], _oracle(qt, st, None) - _oracle(qb, sb, None))
    assert "dequantised from float8_e4m3fn" in res.modules[0].note
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    assert reasons[f"{Q}.weight_scale"] == f"quantisation scale of {Q}.weight; applied to it"
    assert "not a weight" in reasons[f"{Q}.input_scale"]


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (130, 129), (100, 40)])
def test_fp8_deepseek_block_scales_including_partial_blocks(tmp_path, shape):
    """weight_scale_inv of shape (ceil(out/128), ceil(in/128)) is multiplied, partial last blocks too."""
    block = (128, 128)
    sshape = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    g = _gen(3)
    w_b = torch.randn(*shape, generator=g) * 0.02
    w_t = w_b + 3e-3 * torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)
    s_b = torch.rand(*sshape, generator=g) * 1e-4 + 2e-5  # distinct per block, so a wrong layout shows
    s_t = s_b * (1 + 0.1 * torch.rand(*sshape, generator=g))
    qb, _ = _write_fp8(tmp_path / "b.safetensors", w_b, s_b, block, "weight_scale_inv")
    qt, _ = _write_fp8(tmp_path / "t.safetensors", w_t, s_t, block, "weight_scale_inv")
    res = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    assert [m.name for m in res.modules] == [f"{Q}.weight"]  # the 2-D scale is not a matrix
    _check_module(res.modules[0], _oracle(qt, s_t, block) - _oracle(qb, s_b, block))
    assert ("128x128 block" if sshape != (1, 1) else "per-tensor") in res.modules[0].note  # one block: one scale
    assert {s["name"] for s in res.skipped} == {f"{Q}.weight_scale_inv"}


def test_block_size_from_config_and_bf16_base_against_fp8_tuned(tmp_path):
    """config.json's weight_block_size wins over the 128 default; a bf16 base pairs with fp8 tuned."""
    shape, block = (96, 160), (64, 64)
    g = _gen(5)
    w_b = (torch.randn(*shape, generator=g) * 0.02).bfloat16()
    s_t = torch.rand(2, 3, generator=g) * 1e-4 + 2e-5
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}))
    qt, _ = _write_fp8(tmp_path / "t" / "model.safetensors", w_b.float(), s_t, block, "weight_scale_inv")
    save_file({f"{Q}.weight": w_b}, str(tmp_path / "b.safetensors"))
    ckpt = open_checkpoint(tmp_path / "t")
    assert ckpt.scales[f"{Q}.weight"].block == block
    res = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t")
    _check_module(res.modules[0], _oracle(qt, s_t, block) - w_b.double().numpy())
    assert res.modules[0].note.startswith("tuned dequantised from float8_e4m3fn with 64x64 block scales")


def test_int8_weight_with_per_channel_scale_and_zero_point(tmp_path):
    g = _gen(7)
    w_b = torch.randn(40, 64, generator=g) * 0.02
    w_t = w_b + 1e-2 * torch.randn(40, 1, generator=g) @ torch.randn(1, 64, generator=g)
    refs = []
    for name, w, zp in (("b", w_b, False), ("t", w_t, True)):
        s = w.abs().amax(dim=1, keepdim=True) / 100
        z = torch.full((40, 1), 3, dtype=torch.int8) if zp else None
        q = (torch.round(w / s) + (3 if zp else 0)).clamp(-128, 127).to(torch.int8)
        sd = {f"{Q}.weight": q, f"{Q}.weight_scale": s}
        if zp:
            sd[f"{Q}.weight_zero_point"] = z
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        refs.append((q.double().numpy() - (3 if zp else 0)) * s.double().numpy())
    res = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    assert [m.name for m in res.modules] == [f"{Q}.weight"]
    _check_module(res.modules[0], refs[1] - refs[0])
    assert "zero point" in res.modules[0].note
    # without a scale an int8 tensor is still not a float weight
    save_file({f"{Q}.weight": torch.zeros(4, 4, dtype=torch.int8), f"{D}.weight": torch.ones(4, 4)}, str(tmp_path / "i.safetensors"))
    save_file({f"{Q}.weight": torch.ones(4, 4, dtype=torch.int8), f"{D}.weight": torch.zeros(4, 4)}, str(tmp_path / "j.safetensors"))
    res = spectra.diff(tmp_path / "i.safetensors", tmp_path / "j.safetensors")
    assert [m.name for m in res.modules] == [f"{D}.weight"]
    assert "is not a float weight" in {s["name"]: s["reason"] for s in res.skipped}[f"{Q}.weight"]


def test_load_dequantises_unless_asked_not_to(tmp_path):
    w, _, s, _ = _scaled_pair((8, 16), _per_channel)
    q, _ = _write_fp8(tmp_path / "m.safetensors", w, s, None, "weight_scale")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    got = ckpt.load(f"{Q}.weight")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), _oracle(q, s, None), rtol=2**-23)
    raw = ckpt.load(f"{Q}.weight", dequantize=False)
    assert raw.dtype == FP8 and torch.equal(raw.view(torch.uint8), q.view(torch.uint8))
    assert ckpt.load(f"{Q}.weight_scale").shape == (8, 1)


@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((256, 256), (128, 128)), ((7, 10), (1, 5)), ((3, 4, 6), (4, 6))])
def test_dequantize_equals_expanded_scale_product(shape, block):
    g = _gen(11)
    q = (torch.randn(*shape, generator=g) * 50).to(FP8)
    lead = shape[:-2]
    s = torch.rand(*lead, -(-shape[-2] // block[0]), -(-shape[-1] // block[1]), generator=g)
    full = s.double().repeat_interleave(block[0], -2)[..., : shape[-2], :].repeat_interleave(block[1], -1)[..., : shape[-1]]
    np.testing.assert_allclose(dequantize(q, s, block).double().numpy(), q.double().numpy() * full.numpy(), rtol=2**-23)


def test_float32_input_is_not_scaled_in_place():
    w = torch.ones(2, 2)
    dequantize(w, torch.tensor(3.0), (2, 2))
    assert torch.equal(w, torch.ones(2, 2))


@pytest.mark.parametrize("leaf,sshape", [("weight_scale_inv", (3, 3)), ("weight_scale", (64, 7)), ("weight_scale", (5,))])
def test_scale_that_does_not_fit_its_weight_names_both_tensors(tmp_path, leaf, sshape):
    save_file({f"{Q}.weight": torch.zeros(64, 200).to(FP8), f"{Q}.{leaf}": torch.ones(*sshape)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointFormatError) as err:
        open_checkpoint(tmp_path / "m.safetensors")
    msg = str(err.value)
    assert f"quantisation scale {Q}.{leaf} has shape {sshape}, which does not fit weight {Q}.weight of shape (64, 200)" in msg
    assert "(1, 2) (128x128 blocks)" in msg and "different files or versions" in msg


def test_two_scales_for_one_weight_are_refused(tmp_path):
    save_file({f"{Q}.weight": torch.zeros(4, 4).to(FP8), f"{Q}.weight_scale": torch.ones(()),
               f"{Q}.weight_scale_inv": torch.ones(1, 1)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointFormatError, match="weight has two scales"):
        open_checkpoint(tmp_path / "m.safetensors")


def test_scale_beside_a_bf16_weight_is_not_applied_and_says_so(tmp_path):
    for name, v in (("b", 1.0), ("t", 2.0)):
        save_file({f"{Q}.weight": torch.full((4, 4), v).bfloat16(), f"{Q}.weight_scale": torch.full((4, 4), 10.0)},
                  str(tmp_path / f"{name}.safetensors"))
    res = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    assert [m.name for m in res.modules] == [f"{Q}.weight"]
    assert res.modules[0].fro_norm == pytest.approx(4.0)
    assert "stored as bfloat16, not fp8/int8; not applied" in res.skipped[0]["reason"]


# ---------------------------------------------------------------------------------------------------
# Part B: numeric_flags on planted cases
# ---------------------------------------------------------------------------------------------------

def _codes(base, tuned, bd, td, delta=None):
    delta = tuned.double() - base.double() if delta is None else delta
    return [n.code for n in numeric_flags(base, tuned, delta, base_dtype=bd, tuned_dtype=td)]


def _normal_update(dtype=torch.bfloat16, shape=(128, 1024), rel_scale=1e-3, seed=0):
    """A fine-tuning-like update: W (std 0.02) + 1e-3 · rank-8 product of unit-variance factors/sqrt(r)."""
    g = _gen(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    lr = torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g) / math.sqrt(8)
    return w.to(dtype), (w + rel_scale * lr).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_no_flag_on_a_normal_fine_tuning_update(dtype):
    b, t = _normal_update(dtype)
    name = str(dtype).removeprefix("torch.")
    assert _codes(b, t, name, name) == []
    assert numeric_notes(b, t, t.float() - b.float(), base_dtype=name, tuned_dtype=name) == []


def test_all_zero_delta_gets_no_notes():
    w = (torch.randn(32, 64, generator=_gen(1)) * 0.02).bfloat16()
    t = (w.float() * (1 + 1e-8)).bfloat16()  # rounded away entirely
    assert torch.equal(t, w)
    assert _codes(w, t, "bfloat16", "bfloat16") == []


def test_rounding_level_fires_on_sub_ulp_updates_in_bf16():
    g = _gen(2)
    w = torch.randn(64, 256, generator=g) * 0.02
    b = w.bfloat16()
    t = (b.float() * (1 + 3e-3 * torch.randn(64, 256, generator=g))).bfloat16()  # < 1 ulp (2^-7) per entry
    assert _codes(b, t, "bfloat16", "bfloat16") == ["rounding_level"]
    msg = numeric_notes(b, t, t.float() - b.float(), base_dtype="bfloat16", tuned_dtype="bfloat16")[0]
    assert msg.startswith("ΔW is at the rounding level of bfloat16: ")
    assert "its spectrum is not resolved from rounding noise" in msg


def test_rounding_level_fires_on_isolated_one_ulp_flips():
    b = (torch.randn(64, 256, generator=_gen(3)) * 0.02).bfloat16()
    flip = torch.rand(64, 256, generator=_gen(4)) < 0.01
    bits = b.view(torch.int16).clone()
    bits[flip] += 1  # sign-magnitude: the next bf16 value away from zero, exactly one ulp
    t = bits.view(torch.bfloat16)
    assert int((t != b).sum()) == int(flip.sum()) > 0
    assert _codes(b, t, "bfloat16", "bfloat16") == ["rounding_level"]


def test_rounding_level_fires_for_a_tiny_update_saved_in_coarser_dtype():
    w = torch.randn(64, 256, generator=_gen(5)) * 0.02
    t = (w + 1e-8).bfloat16()  # the update is far below bf16 resolution; ΔW is bf16 rounding of W
    codes = _codes(w, t, "float32", "bfloat16")
    assert codes == ["rounding_level"]
    msg = numeric_notes(w, t, t.float() - w, base_dtype="float32", tuned_dtype="bfloat16")[0]
    assert "(base float32, tuned bfloat16)" in msg


def test_precision_mismatch_fires_only_when_rounding_is_a_visible_share():
    w = torch.randn(128, 512, generator=_gen(6)) * 0.02
    lr = torch.randn(128, 8, generator=_gen(7)) @ torch.randn(8, 512, generator=_gen(8)) / math.sqrt(8)
    small = (w + 2e-4 * lr).bfloat16()  # ‖ΔW‖/‖W‖ ≈ 0.01: bf16 rounding ≈ 3% of ‖ΔW‖²
    big = (w + 2e-3 * lr).bfloat16()  # ≈ 0.1: rounding ≈ 0.03%
    assert _codes(w, small, "float32", "bfloat16") == ["precision_mismatch"]
    assert _codes(w, big, "float32", "bfloat16") == []
    msg = numeric_notes(w, small, small.float() - w, base_dtype="float32", tuned_dtype="bfloat16")[0]
    assert msg.startswith("base is float32 and tuned bfloat16: ΔW includes rounding W from float32 to bfloat16")


def test_subnormal_fires_when_the_update_lives_in_denormals():
    b = (torch.randn(32, 64, generator=_gen(9)) * 0.02).bfloat16()
    t = b.clone()
    t[:, :4] = torch.tensor(1e-39).bfloat16()  # bf16 subnormals (below 1.18e-38)
    b[:, :4] = torch.tensor(3e-39).bfloat16()
    codes = _codes(b, t, "bfloat16", "bfloat16")
    assert "subnormal" in codes
    msg = numeric_notes(b, t, t.double() - b.double(), base_dtype="bfloat16", tuned_dtype="bfloat16")[0]
    assert msg.startswith("subnormal values: base 128 (6.25%, below 1.18e-38 in bfloat16), tuned 128")


def test_subnormal_fires_for_fp16_weights_of_tiny_scale_but_not_normal_fp16():
    g = _gen(10)
    w = torch.randn(64, 256, generator=g) * 3e-5  # most below fp16's smallest normal 6.1e-5
    b = w.half()
    t = (w + 3e-6 * torch.randn(64, 256, generator=g)).half()
    assert "subnormal" in _codes(b, t, "float16", "float16")
    b, t = _normal_update(torch.float16)
    assert (b.abs() < 6.1e-5).any()  # a normal fp16 matrix has a few subnormals: no note for those
    assert _codes(b, t, "float16", "float16") == []


def test_subnormal_check_is_skipped_for_dequantised_values():
    """Scaled fp8 values are not in code units: their subnormality cannot be judged from values."""
    q = (torch.randn(16, 64, generator=_gen(12)) * 0.01).to(FP8)  # mostly fp8 subnormal codes
    assert "subnormal" in _codes(q, (q.float() * 2).to(FP8), "float8_e4m3fn", "float8_e4m3fn")
    deq_b, deq_t = q.float() * 0.37, q.float() * 0.41
    assert "subnormal" not in _codes(deq_b, deq_t, "float8_e4m3fn", "float8_e4m3fn")


def _int8_rows(w: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True) / 127 * scale_factor
    return (torch.round(w / s).clamp(-128, 127) * s)


def test_quantisation_grid_fires_when_one_side_is_int8_dequantised():
    b, t = _normal_update(torch.float32, shape=(64, 1024))
    tq = _int8_rows(t).bfloat16()
    assert _codes(b.bfloat16(), tq, "bfloat16", "bfloat16") == ["quantisation_grid"]
    msg = numeric_notes(b.bfloat16(), tq, tq.float() - b.bfloat16().float(), base_dtype="bfloat16", tuned_dtype="bfloat16")[0]
    assert msg.startswith("tuned appears quantised (≤ ") and "ΔW includes quantisation error, which is near full rank" in msg


def test_quantisation_grid_by_dtype_and_different_grids():
    b, t = _normal_update(torch.float32, shape=(64, 1024))
    t8 = (t / 1e-3).to(FP8)  # stored fp8: quantised by its dtype, whatever the row length
    assert _codes(b.bfloat16(), t8, "bfloat16", "float8_e4m3fn") == ["quantisation_grid"]
    bq, tq_other = _int8_rows(b), _int8_rows(t, 1.37)
    assert _codes(bq, tq_other, "float32", "float32") == ["quantisation_grid"]
    assert "different grids" in numeric_notes(bq, tq_other, tq_other - bq, base_dtype="float32", tuned_dtype="float32")[0]
    # same grid: the tuned codes move by ±1 step on 10% of entries, same per-row scales
    s = b.abs().amax(dim=1, keepdim=True) / 127
    codes = torch.round(b / s).clamp(-127, 127)
    step = torch.randint(-1, 2, codes.shape, generator=_gen(14)) * (torch.rand(codes.shape, generator=_gen(15)) < 0.1)
    bq_same, tq_same = codes * s, (codes + step).clamp(-127, 127) * s
    assert _codes(bq_same, tq_same, "float32", "float32") == []


def test_short_rows_are_not_judged_by_distinct_values():
    w = torch.randn(64, 512, generator=_gen(13)) * 0.02
    tq = _int8_rows(w + 1e-3)
    assert "quantisation_grid" not in _codes(w, tq, "float32", "float32")


def test_numeric_flags_validates_shapes():
    with pytest.raises(ValueError, match="must have one shape"):
        numeric_flags(torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2, 2), base_dtype="float32", tuned_dtype="float32")


# ---------------------------------------------------------------------------------------------------
# Part B through spectra.diff: flagged cases keep the right numbers and carry their note
# ---------------------------------------------------------------------------------------------------


def _flagged_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    g = _gen(20)
    w = torch.randn(64, 1024, generator=g) * 0.02
    b16 = w.bfloat16()
    lr = torch.randn(64, 8, generator=g) @ torch.randn(8, 1024, generator=g) / math.sqrt(8)
    sub_b = b16.clone()
    sub_t = b16.clone()
    sub_b[:, :4], sub_t[:, :4] = torch.tensor(3e-39).bfloat16(), torch.tensor(1e-39).bfloat16()
    return {
        "rounding": (b16, (b16.float() * (1 + 3e-3 * torch.randn(64, 1024, generator=g))).bfloat16(),
                     "at the rounding level of bfloat16"),
        "mismatch": (w, (w + 2e-4 * lr).bfloat16(), "ΔW includes rounding W from float32 to bfloat16"),
        "grid": (b16, _int8_rows(w + 1e-3 * lr).bfloat16(), "ΔW includes quantisation error"),
        "subnormal": (sub_b, sub_t, "subnormal values"),
    }


def _diff_case(tmp_path: Path, case: str):
    b, t, phrase = _flagged_cases()[case]
    save_file({f"{Q}.weight": b.contiguous()}, str(tmp_path / "b.safetensors"))
    save_file({f"{Q}.weight": t.contiguous()}, str(tmp_path / "t.safetensors"))
    res = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    ref = t.double().numpy() - b.double().numpy()
    return res.modules[0], ref, phrase


@pytest.mark.parametrize("case", ["rounding", "mismatch", "grid", "subnormal"])
def test_flagged_cases_still_give_the_float64_fro_norm(tmp_path, case):
    m, ref, _ = _diff_case(tmp_path, case)
    assert m.fro_norm == pytest.approx(float(np.sqrt(np.sum(ref**2))), rel=1e-6)


@pytest.mark.parametrize("case", ["rounding", "mismatch", "grid", "subnormal"])
def test_flagged_cases_carry_their_note_through_diff(tmp_path, case):
    m, _, phrase = _diff_case(tmp_path, case)
    assert phrase in m.note


def test_normal_update_gets_no_numeric_note_through_diff(tmp_path):
    b, t = _normal_update(torch.bfloat16, shape=(64, 1024))
    save_file({f"{Q}.weight": b}, str(tmp_path / "b.safetensors"))
    save_file({f"{Q}.weight": t}, str(tmp_path / "t.safetensors"))
    m = spectra.diff(tmp_path / "b.safetensors", tmp_path / "t.safetensors").modules[0]
    # and one flagged case in the same run shape does get one, so this is not vacuous
    assert m.note == "" and "rounding level" in _diff_case(tmp_path, "rounding")[0].note


# ---------------------------------------------------------------------------------------------------
# Fuzz: any weight/scale shape pair either dequantises to the weight's shape or is refused cleanly
# ---------------------------------------------------------------------------------------------------

SCALE_FUZZ_EXAMPLES = int(os.environ.get("SPECTRA_FUZZ_EXAMPLES", "150"))


@settings(max_examples=SCALE_FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(wshape=st.lists(st.integers(0, 300), min_size=0, max_size=3),
       sshape=st.lists(st.integers(0, 300), min_size=0, max_size=3),
       leaf=st.sampled_from(["weight_scale", "weight_scale_inv"]),
       wdtype=st.sampled_from([FP8, torch.int8, torch.bfloat16]))
def test_fuzz_scale_shapes(wshape, sshape, leaf, wdtype):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        save_file({f"{Q}.weight": torch.zeros(wshape).to(wdtype), f"{Q}.{leaf}": torch.ones(sshape)}, str(path))
        try:
            ckpt = open_checkpoint(path)
        except CheckpointFormatError as exc:
            assert f"{Q}.{leaf}" in str(exc) and f"{Q}.weight" in str(exc)
            return
        except SpectraError:
            return
        w = ckpt.load(f"{Q}.weight")
        assert tuple(w.shape) == tuple(wshape)
        if f"{Q}.weight" in ckpt.scales:
            assert w.dtype == torch.float32


def test_delta_flags_nan_inf_and_overflow_on_every_storage_dtype():
    """ΔW is formed with a cheap finiteness test (a sum per block); its rare failures are resolved
    exactly: NaN/Inf on either side (fp8 included, which has no CPU isfinite), an overflowing
    difference of finite weights, and float64 weights too large to square are told apart."""
    from spectra.delta import form_delta as _delta

    cpu = torch.device("cpu")
    nan8 = torch.zeros(4, 4)
    nan8[1, 1] = float("nan")
    assert _delta(torch.zeros(4, 4).to(torch.float8_e4m3fn), nan8.to(torch.float8_e4m3fn), cpu)[2] == ["tuned"]
    # a float32 difference beyond float32's range is formed in float64 (13th round); float64 weights near
    # float64's largest value of opposite signs still overflow
    delta, _, bad = _delta(torch.full((4, 4), 3e38), torch.full((4, 4), -3e38), cpu)
    assert bad == [] and delta.dtype == torch.float64 and float(delta[0, 0]) == pytest.approx(-6e38, rel=1e-7)
    huge = torch.full((4, 4), 1.7e308, dtype=torch.float64)
    assert _delta(huge, -huge, cpu)[2] == ["overflow"]
    big = torch.full((4, 4), 1e200, dtype=torch.float64)
    delta, norm, bad = _delta(big, big + 1e190, cpu)
    assert bad == [] and torch.isfinite(delta).all() and norm == pytest.approx(4e200, rel=1e-12)  # ‖W‖² overflows: scaled first
    for side in ("base", "tuned"):
        w = [torch.ones(8, 8), torch.ones(8, 8)]
        w[side == "tuned"][3, 5] = float("inf")
        assert _delta(*w, cpu)[2] == [side]
    both = torch.ones(8, 8)
    both[0, 0] = float("nan")
    assert _delta(both, both.clone(), cpu)[2] == ["base", "tuned"]
