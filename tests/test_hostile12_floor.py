"""The storage rounding floor of a dense update: rounding noise of float32/bf16 weights is not a direction.

compare, trace and interfere count a dense update's direction as resolved only above both the float64
computation's resolution and the rounding floor of the stored weights
(:func:`spectra.storage_floor.rounding_floor`; docs/definitions.md, "Subspaces")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra.storage_floor import rounding_floor
from spectra_cli.main import main
from tests.conftest import random_lora, tiny_llama

NAME = "model.layers.0.self_attn.q_proj.weight"


def _json(output: str) -> dict:
    return json.JSONDecoder().raw_decode(output[output.index("{"):])[0]


def _invoke(args: list[str]) -> dict:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return _json(r.output)


def _orth(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def test_merged_lora_saved_in_float32_has_its_rank(tmp_path):
    """A rank-4 LoRA merged into a float32 model: the merged update resolves exactly the LoRA's 4
    directions (the rest is float32 rounding), so φ and the captured energy are 1."""
    m = tiny_llama()
    m.save_pretrained(tmp_path / "base")
    pm = random_lora(m, 1, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, prm in pm.named_parameters():
            if "lora_B" in n:
                prm.mul_(0.05)
    pm.save_pretrained(tmp_path / "lora")
    exact = {}  # module name -> float64 s·B·A
    for n, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            A = mod.lora_A["default"].weight.detach().double().numpy()
            B = mod.lora_B["default"].weight.detach().double().numpy()
            exact[n.removeprefix("base_model.model.")] = mod.scaling["default"] * B @ A
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    d = _invoke(["compare", str(tmp_path / "lora"), str(tmp_path / "merged"), "--base", str(tmp_path / "base"), "--json"])
    assert len(d["modules"]) == 4
    for mm in d["modules"]:
        assert mm["rank_a"] == 4 and mm["rank_b"] == 4, (mm["name"], mm["rank_b"], mm["note"])
        assert mm["phi"]["right"]["phi_full"] == pytest.approx(1.0, abs=1e-6)
        # the exact update's energy, held in 4 directions of rank 4: all of it, as float64 says
        dw = next(v for k, v in exact.items() if mm["name"].endswith(k + ".weight"))
        assert np.linalg.matrix_rank(dw) == 4
        assert mm["captured"]["b_in_a"]["two_sided"] == pytest.approx(1.0, abs=1e-6)
        assert mm["captured"]["a_in_b"]["two_sided"] == pytest.approx(1.0, abs=1e-6)
        assert "B's update resolves 4 directions above the rounding level of its float32 weights, fewer than its rank" in mm["note"]
        assert mm["fro_b"] == pytest.approx(np.linalg.norm(dw), rel=1e-4)


def _probe_run(root: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, Path, dict[int, np.ndarray]]:
    """A 64×64 base (rms 0.02) and checkpoints 10, 30, 40 stored in ``dtype``: ΔW10 = rank 2 (σ 0.05,
    0.03), ΔW30 = 3·ΔW10 + a new direction (σ 0.02), ΔW40 = ΔW30 (saved again)."""
    g = torch.Generator().manual_seed(7)
    W = (0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)).to(dtype)
    U, V = _orth(64, 3, g), _orth(64, 3, g)
    d10 = (U[:, :2] * torch.tensor([0.05, 0.03], dtype=torch.float64)) @ V[:, :2].T
    d30 = 3 * d10 + 0.02 * U[:, 2:] @ V[:, 2:].T
    (root / "base").mkdir(parents=True)
    save_file({NAME: W}, root / "base" / "model.safetensors")
    deltas = {10: d10, 30: d30, 40: d30}
    for step, d in deltas.items():
        f = root / "run" / f"checkpoint-{step}"
        f.mkdir(parents=True)
        save_file({NAME: (W.double() + d).to(dtype)}, f / "model.safetensors")
        f.joinpath("trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return root / "base", root / "run", {s: d.numpy() for s, d in deltas.items()}


def test_trace_interfere_compare_agree_on_float32_checkpoints(tmp_path):
    """The probe's case: the same pair of float32 checkpoints gets ranks 2 and 3 and φ = 1 (ΔW10's
    subspace lies inside ΔW30's) from compare, interfere and trace alike."""
    base, run, _ = _probe_run(tmp_path)
    c10, c30 = str(run / "checkpoint-10"), str(run / "checkpoint-30")
    d = _invoke(["compare", c10, c30, "--base", str(base), "--json", "--side", "both"])
    (mm,) = d["modules"]
    assert (mm["rank_a"], mm["rank_b"]) == (2, 3), mm["note"]
    for side in ("left", "right"):
        assert mm["phi"][side]["phi_full"] == pytest.approx(1.0, abs=1e-6)
    i = _invoke(["interfere", c10, c30, "--base", str(base), "--json", "--no-plots"])
    (im,) = i["modules"]
    assert im["ranks"] == [2, 3]
    assert im["phi"][0][1] == pytest.approx(1.0, abs=1e-6)
    r = CliRunner().invoke(main, ["trace", str(base), str(run), "--out", str(tmp_path / "t"), "--no-plots"])
    assert r.exit_code == 0, r.output
    (tm,) = json.loads((tmp_path / "t" / "trace.json").read_text())["matrices"]
    p10, p30, p40 = tm["points"]
    assert p10["turn_first"] is None  # (the first subspace)
    assert p40["turn_first"]["right"]["k"] == 2 and p40["turn_first"]["right"]["phi"] == pytest.approx(1.0, abs=1e-6)
    assert p30["turn_prev"]["right"]["k"] == 2 and p30["turn_prev"]["right"]["phi"] == pytest.approx(1.0, abs=1e-6)
    assert p40["turn_prev"]["right"]["k"] == 3 and p40["turn_prev"]["right"]["phi"] == pytest.approx(1.0, abs=1e-6)
    for side in ("left", "right"):
        assert p30["turn_prev"][side]["phi"] == pytest.approx(mm["phi"][side]["phi_full"], abs=1e-6)


def test_real_dense_float32_update_keeps_every_direction(tmp_path):
    """A Gaussian update at 1% of W (full rank, far above float32 rounding): compare keeps all its top_k
    directions, and its smallest singular value stands well above the floor (the floor cuts no real one)."""
    g = torch.Generator().manual_seed(3)
    W = 0.02 * torch.randn(64, 96, generator=g, dtype=torch.float64)
    dW = 0.01 * 0.02 * torch.randn(64, 96, generator=g, dtype=torch.float64)
    for who, w in (("base", W), ("t1", W + dW), ("t2", W + 2 * dW)):
        (tmp_path / who).mkdir()
        save_file({NAME: w.float()}, tmp_path / who / "model.safetensors")
    d = _invoke(["compare", str(tmp_path / "t1"), str(tmp_path / "t2"), "--base", str(tmp_path / "base"), "--json"])
    (mm,) = d["modules"]
    assert (mm["rank_a"], mm["rank_b"]) == (64, 64), mm["note"]
    assert mm["phi"]["right"]["phi_full"] == pytest.approx(1.0, abs=1e-6)
    floor = rounding_floor((W + dW).float(), "float32", W.float())
    smallest = float(torch.linalg.svdvals((W + dW).float().double() - W.float().double())[-1])
    assert smallest > 100 * floor


def test_bf16_planted_rank3_update_resolves_three(tmp_path):
    """A rank-3 update at 5% of ‖W‖ stored in bf16: its 3 directions are resolved, not bf16 rounding noise."""
    g = torch.Generator().manual_seed(5)
    W = (0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)).bfloat16()
    U, V = _orth(64, 3, g), _orth(64, 3, g)
    s = 0.05 * float(W.double().norm()) * torch.tensor([0.7, 0.55, 0.45], dtype=torch.float64)
    dW = (U * s) @ V.T
    for who, w in (("base", W), ("t1", (W.double() + dW).bfloat16()), ("t2", (W.double() + dW).bfloat16())):
        (tmp_path / who).mkdir()
        save_file({NAME: w}, tmp_path / who / "model.safetensors")
    d = _invoke(["compare", str(tmp_path / "t1"), str(tmp_path / "t2"), "--base", str(tmp_path / "base"), "--json"])
    (mm,) = d["modules"]
    assert (mm["rank_a"], mm["rank_b"]) == (3, 3)
    assert "rounding level of its bfloat16 weights" in mm["note"]
    i = _invoke(["interfere", str(tmp_path / "t1"), str(tmp_path / "t2"), "--base", str(tmp_path / "base"), "--json", "--no-plots"])
    assert i["modules"][0]["ranks"] == [3, 3]


@pytest.mark.parametrize("dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
@pytest.mark.parametrize("shape", [(64, 64), (128, 48)])
@pytest.mark.parametrize("layout", ["plain", "outlier_columns", "few_rows_changed", "mostly_rounded_away"])
def test_rounding_floor_bounds_monte_carlo_noise(dtype, name, shape, layout):
    """A base as stored (exact) and a tuned matrix rounded to the storage dtype: the rounding error's
    σ_max lies below the floor, and the floor is within 4× of it (a margin, not a blanket), for weights
    of one scale, for 4 input columns 50× larger (the outlier channels of real LLM weights), when only a
    few rows changed (an embedding's trained rows: one rms over all entries misjudged both), and when an
    update below the storage's resolution left most entries unchanged (a small learning rate in bf16:
    counting the changed entries only put the noise at 3.5-9× the floor)."""
    g = torch.Generator().manual_seed(11)
    worst, floor = 0.0, math.inf
    for _ in range(5):
        wb = (0.02 * torch.randn(*shape, generator=g, dtype=torch.float64))
        if layout == "outlier_columns":
            wb[:, :4] *= 50
        wb = wb.to(dtype).double()  # the base as stored is where the fine-tune started
        scale = 0.3 * torch.finfo(dtype).eps if layout == "mostly_rounded_away" else 1e-2
        step = scale * wb.abs() * torch.randn(*shape, generator=g, dtype=torch.float64)
        if layout == "few_rows_changed":
            step[4:] = 0.0
        wt = wb + step
        stored = wt.to(dtype)
        noise = stored.double() - wt
        worst = max(worst, float(torch.linalg.svdvals(noise)[0]))
        floor = min(floor, rounding_floor(stored, name, wb.to(dtype)))
    assert worst < floor < 4 * worst, (worst, floor)


def test_rounding_floor_edge_cases():
    """float64 storage has a negligible floor; an unknown or integer dtype adds nothing; fp8 uses its
    mantissa; nothing changed or an empty matrix: 0."""
    W = torch.ones(64, 64)
    assert rounding_floor(W.double(), "float64") < 1e-13
    assert rounding_floor(W, "int8") == 0.0
    assert rounding_floor(W, "float8_e4m3fn") == pytest.approx(1.5 * 2.0**-4 / math.sqrt(3) * 16, rel=1e-9)
    assert rounding_floor(W, "float32", W.clone()) == 0.0
    assert rounding_floor(torch.ones(0, 5), "float32") == 0.0
    for scale in (1e19, 1e-24):  # squares beyond float32's range: the float64 pass (was a floor of 0, review)
        assert rounding_floor(torch.full((64, 64), scale), "float32") == pytest.approx(1.5 * 2.0**-24 / math.sqrt(3) * 16 * scale,
                                                                                      rel=1e-6)


def test_callback_floor_of_bf16_training(tmp_path):
    """The in-training tracker of a model trained in bf16: a rank-1 change of the weights is one
    direction, not one plus bf16 rounding noise."""
    from spectra.callbacks import SpectraTracker
    from spectra.trace import TraceConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).to(torch.bfloat16)
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path, config=TraceConfig(top_k=8))
    g = torch.Generator().manual_seed(2)
    w = model[0].weight
    with torch.no_grad():
        step = 0.05 * float(w.double().norm()) * _orth(64, 1, g) @ _orth(64, 1, g).T
        w.copy_((w.double() + step).bfloat16())
    tracker.measure(1)
    tracker.measure(2)
    recs = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines() if x.strip()]
    pts = [r["point"] for r in recs if "point" in r]
    assert pts[0]["turn_first"] is None  # (no earlier subspace yet)
    assert pts[1]["turn_first"]["right"]["k"] == 1 and pts[1]["turn_prev"]["right"]["phi"] == pytest.approx(1.0, abs=1e-6)


def test_update_all_at_rounding_level_is_unresolved_not_a_crash(tmp_path):
    """A float32 update of 1e-9 relative size (isolated 1-ulp flips): no direction above the floor;
    compare says so (status unresolved, null subspace measures) instead of measuring noise or crashing."""
    g = torch.Generator().manual_seed(9)
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    U, V = _orth(64, 2, g), _orth(64, 2, g)
    tiny = W + 1e-9 * W.abs().max() * torch.randn(64, 64, generator=g, dtype=torch.float64)
    for who, w in (("base", W), ("t1", tiny), ("t2", W + 0.05 * U @ V.T)):
        (tmp_path / who).mkdir()
        save_file({NAME: w.float()}, tmp_path / who / "model.safetensors")
    d = _invoke(["compare", str(tmp_path / "t1"), str(tmp_path / "t2"), "--base", str(tmp_path / "base"), "--json"])
    (mm,) = d["modules"]
    assert mm["fro_a"] > 0 and (mm["rank_a"], mm["rank_b"]) == (0, 2)
    assert mm["status"] == "unresolved" and "rounding level of its float32 weights" in mm["reason"]
    assert mm["phi"]["right"] is None and mm["captured"]["b_in_a"] is None
    assert mm["amplification"]["a"] is None and mm["amplification"]["b"] is not None


def test_unchanged_outlier_row_and_untouched_embedding_rows_add_no_floor(tmp_path):
    """bf16 weights with one row of ~100 (unchanged by the fine-tune) and a rank-2 update of the other
    rows at 13% of their norm: one rms over every entry put the floor above the update, and compare
    called it rounding noise (status unresolved), interfere ranks [0, 0]. The floor counts the
    changed entries only: rank 2, as diff and numpy say."""
    g = torch.Generator().manual_seed(4)
    W = 0.01 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    W[0] = 100.0 + torch.randn(64, generator=g, dtype=torch.float64)
    U, V = _orth(63, 2, g), _orth(64, 2, g)
    dW = torch.zeros(64, 64, dtype=torch.float64)
    dW[1:] = 0.13 * float(W[1:].norm()) * (U * torch.tensor([0.7, 0.6], dtype=torch.float64)) @ V.T
    Wb = W.bfloat16()
    for who, w in (("base", Wb), ("t1", (Wb.double() + dW).bfloat16()), ("t2", (Wb.double() + 2 * dW).bfloat16())):
        (tmp_path / who).mkdir()
        save_file({NAME: w}, tmp_path / who / "model.safetensors")
    d = _invoke(["compare", str(tmp_path / "t1"), str(tmp_path / "t2"), "--base", str(tmp_path / "base"), "--json"])
    (mm,) = d["modules"]
    assert mm["status"] == "ok" and (mm["rank_a"], mm["rank_b"]) == (2, 2), mm
    i = _invoke(["interfere", str(tmp_path / "t1"), str(tmp_path / "t2"), "--base", str(tmp_path / "base"), "--json", "--no-plots"])
    assert i["modules"][0]["ranks"] == [2, 2]
