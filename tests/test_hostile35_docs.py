"""Thirty-fifth round, the docs against the tool: an energy rank that counts values at the rounding floor is noted in
diff as extract notes it, and the in-training tracker's LoRA points carry lora_scale as spectra trace's do."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from spectra.callbacks import SpectraTracker
from tests.cli_util import cli


def test_diff_notes_an_energy_rank_that_counts_rounding_noise(tmp_path):
    """A rank-4 update of a 64 × 64 weight stored in float32: `diff -t 1.0` read 63 with an empty note while its own
    rounding_floor stood above 59 of those values (extract and recommend say so of the same matrix)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 64, generator=g, dtype=torch.float64)
    D = 1e-3 * torch.randn(64, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 64, generator=g, dtype=torch.float64)
    save_file({"model.layers.0.mlp.down_proj.weight": W.float()}, tmp_path / "b.safetensors")
    save_file({"model.layers.0.mlp.down_proj.weight": (W + D).float()}, tmp_path / "t.safetensors")
    res = cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "-t", "1.0", "-t", "0.9", "--json"])
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)["modules"][0]
    resolved = sum(v > m["rounding_floor"] for v in m["singular_values"])
    assert resolved == 4 and m["energy_rank"]["1.0"] > 4
    assert f"energy rank {m['energy_rank']['1.0']} at τ = 1.0 counts {m['energy_rank']['1.0'] - 4} directions" in m["note"]
    res = cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--json"])  # τ ≤ 0.99: all resolved
    assert "at or below the rounding floor" not in json.loads(res.stdout)["modules"][0]["note"]


def test_the_trackers_lora_points_carry_lora_scale(tmp_path):
    """README lists lora_scale among the point fields of trace.jsonl; the tracker's LoRA points had none."""
    import pytest

    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(16, 16, bias=False))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]))
    tracker = SpectraTracker(pm, every=1, out_dir=tmp_path)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    tracker.step(pm, 1)
    points = [json.loads(line)["point"] for line in (tmp_path / "trace.jsonl").read_text().splitlines() if '"matrix"' in line]
    assert points and all(p["lora_scale"] == 3.0 for p in points)


def test_the_floor_count_note_reaches_16_bit_pairs(tmp_path):
    """The regression probe: the note was skipped where the reader computed the floor (a bf16 or fp16 tuned side), the
    pairs whose rounding is the largest: `-t 1.0` read 48 for a rank-4 update with 4 values above the floor, no note."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 48, generator=g)
    D = 0.05 * torch.randn(64, 4, generator=g) @ torch.randn(4, 48, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        save_file({"model.layers.0.mlp.down_proj.weight": W.to(dtype)}, tmp_path / "b.safetensors")
        save_file({"model.layers.0.mlp.down_proj.weight": (W + D).to(dtype)}, tmp_path / "t.safetensors")
        res = cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "-t", "1.0", "--json"])
        m = json.loads(res.stdout)["modules"][0]
        resolved = sum(v > m["rounding_floor"] for v in m["singular_values"])
        assert m["energy_rank"]["1.0"] > resolved, (dtype, m["energy_rank"], resolved)
        assert f"counts {m['energy_rank']['1.0'] - resolved} directions at or below the rounding floor" in m["note"], dtype
