"""A large float32, bf16 or fp16 pair formed from row blocks read one at a time (spectra.delta.reads_by_rows): the same
ΔW, norm, numerical caveats, rounding floor and results as the pair read whole, and the stored tensors never read whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra.delta as delta_mod
from spectra.config import DiffConfig
from spectra.delta import Prepared, prepare, reads_by_rows
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.pairing import pair_checkpoints
from spectra.pipeline import diff
from spectra.selection import plan_units

ROWS, COLS = 4096, 512  # 2.1M elements: the tests lower the threshold rather than write 33 MB files


def _pair(tmp_path, tuned_rows: int = ROWS, bad: str | None = None, learned: bool = True):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(ROWS, COLS, generator=g) * 0.02
    q = torch.randn(64, 64, generator=g) * 0.02
    t_emb = torch.cat([emb, torch.randn(tuned_rows - ROWS, COLS, generator=g) * 0.02]) if tuned_rows > ROWS else emb.clone()
    # a rank-3 update in a few hundred rows (new-token style) and 1-ulp flips of every entry of 40 other rows
    t_emb[100:400] += learned * (torch.randn(300, 3, generator=g) @ torch.randn(3, COLS, generator=g)) * 1e-3
    t_emb[1000:1040] = torch.nextafter(t_emb[1000:1040], torch.full_like(t_emb[1000:1040], 1.0))
    if bad == "nan":
        t_emb[7, 3] = float("nan")
    if bad == "overflow":
        emb[5, 5], t_emb[5, 5] = -3e38, 3e38
    save_file({"model.embed_tokens.weight": emb, "model.layers.0.self_attn.q_proj.weight": q}, str(tmp_path / "base.safetensors"))
    save_file({"model.embed_tokens.weight": t_emb, "model.layers.0.self_attn.q_proj.weight": q + 1e-3},
              str(tmp_path / "tuned.safetensors"))
    return open_checkpoint(tmp_path / "base.safetensors"), open_checkpoint(tmp_path / "tuned.safetensors")


def _embedding_task(base: Checkpoint, tuned: Checkpoint):
    tasks = plan_units(pair_checkpoints(base, tuned).pairs)
    return next(t for t in tasks if "embed" in t.pair.tuned.name)


def _both(task, base, tuned, monkeypatch) -> tuple[Prepared, Prepared]:
    """``prepare`` of ``task`` read by rows (the stored tensors' whole reads refused) and read whole."""
    monkeypatch.setattr(delta_mod, "ROWS_READ_FROM", 1 << 20)
    assert reads_by_rows(task, base, tuned)
    whole_load = Checkpoint.load

    def refuse(self, name, **kw):
        if "embed" in name:
            raise AssertionError(f"{name} read whole")
        return whole_load(self, name, **kw)

    monkeypatch.setattr(Checkpoint, "load", refuse)
    by_rows = prepare(task, base, tuned, torch.device("cpu"))
    monkeypatch.setattr(Checkpoint, "load", whole_load)
    monkeypatch.setattr(delta_mod, "ROWS_READ_FROM", 1 << 40)
    assert not reads_by_rows(task, base, tuned)
    whole = prepare(task, base, tuned, torch.device("cpu"))
    assert len(by_rows) == len(whole) == 1
    return by_rows[0], whole[0]


@pytest.mark.parametrize(("tuned_rows", "learned"), [(ROWS, True), (ROWS + 300, True), (ROWS, False)])
def test_rows_read_equals_whole_read(tmp_path, monkeypatch, tuned_rows, learned):
    base, tuned = _pair(tmp_path, tuned_rows, learned=learned)
    task = _embedding_task(base, tuned)
    a, b = _both(task, base, tuned, monkeypatch)
    assert a.skip is None and b.skip is None
    assert torch.equal(a.delta, b.delta)
    assert a.base_fro == b.base_fro and a.note == b.note and a.caveats == b.caveats
    # the flips alone: the caveats' sampled rows (read again from the files) find them
    assert ("by at most one rounding step of float32" in a.note) == (not learned), a.note
    # independent reference: float64 numpy difference of the shared rows, and the base norm
    from safetensors.numpy import load_file
    wb = load_file(str(tmp_path / "base.safetensors"))["model.embed_tokens.weight"].astype(np.float64)
    wt = load_file(str(tmp_path / "tuned.safetensors"))["model.embed_tokens.weight"].astype(np.float64)[:ROWS]
    np.testing.assert_allclose(a.delta.double().numpy(), wt - wb, rtol=0, atol=1e-9)
    assert a.base_fro == pytest.approx(float(np.linalg.norm(wb)), rel=1e-12)


@pytest.mark.parametrize("bad", ["nan", "overflow"])
def test_rows_read_bad_values_as_whole_read(tmp_path, monkeypatch, bad):
    base, tuned = _pair(tmp_path, bad=bad)
    a, b = _both(_embedding_task(base, tuned), base, tuned, monkeypatch)
    assert a.skip == b.skip
    if bad == "nan":
        assert a.delta is None and "tuned weights contain NaN or Inf" in a.skip
    else:  # the float32 difference overflows: formed again in float64 from the blocks
        assert a.skip is None and a.delta.dtype == torch.float64 and torch.equal(a.delta, b.delta)
        assert float(a.delta[5, 5]) == pytest.approx(6e38, rel=1e-7)


def test_rows_read_needs_the_whole_pair_otherwise(tmp_path, monkeypatch):
    """A copy of W_base (--esd's weight spectra): read whole. A rounding floor: from a second pass over the tuned side's
    row blocks, the same number as from the pair read whole."""
    base, tuned = _pair(tmp_path)
    task = _embedding_task(base, tuned)
    monkeypatch.setattr(delta_mod, "ROWS_READ_FROM", 1 << 20)
    calls = []
    whole_load = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, name, **kw: calls.append(name) or whole_load(self, name, **kw))
    (kept,) = prepare(task, base, tuned, torch.device("cpu"), keep_base=True)
    assert kept.base is not None and len(calls) == 2
    (floored,) = prepare(task, base, tuned, torch.device("cpu"), floors=True)
    assert floored.floor_known and floored.floor > 0 and len(calls) == 2
    monkeypatch.setattr(delta_mod, "ROWS_READ_FROM", 1 << 40)
    (whole,) = prepare(task, base, tuned, torch.device("cpu"), floors=True)
    assert len(calls) == 4 and whole.floor == floored.floor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("learned", [True, False])
def test_narrow_pairs_read_by_rows_equal_whole_reads(tmp_path, monkeypatch, dtype, learned):
    """A bf16 or fp16 pair (whose rounding floor is computed with it): by rows, the same ΔW, notes and floor as read whole;
    the floor against its definition in float64 (1.5·u/√3·(largest changed row norm + largest changed column norm))."""
    g = torch.Generator().manual_seed(2)
    emb = (torch.randn(ROWS, COLS, generator=g) * 0.02).to(dtype)
    t = emb.float()
    t[100:400] += learned * (torch.randn(300, 3, generator=g) @ torch.randn(3, COLS, generator=g)) * 3e-3
    t = t.to(dtype)
    t[1000:1040] = torch.nextafter(t[1000:1040].float(), torch.ones(40, COLS)).to(dtype)  # (one step up, rounded back)
    t[2000:2040] = t[2000:2040] + (t[2000:2040].float().abs() * torch.finfo(dtype).eps).to(dtype)  # one step
    save_file({"model.embed_tokens.weight": emb}, str(tmp_path / "base.safetensors"))
    save_file({"model.embed_tokens.weight": t}, str(tmp_path / "tuned.safetensors"))
    base, tuned = open_checkpoint(tmp_path / "base.safetensors"), open_checkpoint(tmp_path / "tuned.safetensors")
    a, b = _both(_embedding_task(base, tuned), base, tuned, monkeypatch)
    assert a.skip is None and torch.equal(a.delta, b.delta) and a.note == b.note and a.caveats == b.caveats
    assert a.floor_known and b.floor_known and a.floor == b.floor > 0
    wt, d = t.double(), t.double() - emb.double()
    on = (d != 0).any(dim=1)[:, None] & (d != 0).any(dim=0)[None, :]
    x = torch.where(on, torch.clamp(wt.abs(), min=torch.finfo(dtype).tiny), torch.zeros_like(wt))
    u = torch.finfo(dtype).eps / 2
    ref = 1.5 * u / 3**0.5 * (float(x.norm(dim=1).max()) + float(x.norm(dim=0).max()))
    if learned:  # the learned update dominates: no one-grid certificate moves the floor to its own ceiling
        assert not any("rounding" in c for c in a.caveats), a.caveats
        assert a.floor == pytest.approx(ref, rel=1e-5)


def test_diff_results_equal_either_way(tmp_path, monkeypatch):
    base, tuned = _pair(tmp_path, ROWS + 300)
    monkeypatch.setattr(delta_mod, "ROWS_READ_FROM", 1 << 20)
    by_rows = diff(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), config=DiffConfig())
    monkeypatch.setattr(delta_mod, "ROWS_READ_FROM", 1 << 40)
    whole = diff(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), config=DiffConfig())
    ra, rb = by_rows.summary_records(), whole.summary_records()
    assert ra == rb and len(ra) == 2
    emb = next(m for m in by_rows.modules if "embed" in m.name)
    # the planted update: rank 3 plus the flipped rows; float64 SVD of the shared rows as the reference
    from safetensors.numpy import load_file
    wb = load_file(str(tmp_path / "base.safetensors"))["model.embed_tokens.weight"].astype(np.float64)
    wt = load_file(str(tmp_path / "tuned.safetensors"))["model.embed_tokens.weight"].astype(np.float64)[:ROWS]
    s = np.linalg.svd(wt - wb, compute_uv=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    assert emb.energy_rank["0.9"] == int(np.searchsorted(energy, 0.9) + 1)
    assert by_rows.warnings == whole.warnings


@pytest.mark.parametrize("changed", [17, 40, 300])
def test_sampled_caveats_see_flips_in_more_rows_than_the_top_ones(changed):
    """One-step flips in more rows than the 16 the sampled pass reads exactly: its ratios to ‖ΔW‖² come from the same
    sample as their numerators (the exact ‖ΔW‖² against 16 rows' flips said 40% at 40 rows: no caveat)."""
    from spectra.numerics import numeric_flags

    g = torch.Generator().manual_seed(1)
    w = torch.randn(4096, 512, generator=g) * 0.02
    t = w.clone()
    t[1000 : 1000 + changed] = torch.nextafter(t[1000 : 1000 + changed], torch.ones(changed, 512))
    sampled = numeric_flags(w, t, t - w, base_dtype="float32", tuned_dtype="float32")
    full = numeric_flags(w, t, t - w, base_dtype="float32", tuned_dtype="float32", max_rows=None)
    assert [n.code for n in full] == ["rounding_steps"]
    assert [n.code for n in sampled] == [n.code for n in full]
    assert "carrying 100% of ‖ΔW‖_F²" in sampled[0].message


def _flipped(t: torch.Tensor, rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = t[rows]
    t[rows] = torch.nextafter(x, x + torch.where(torch.rand(x.shape, generator=g) < 0.5, 1.0, -1.0))
    return t


@pytest.mark.parametrize(("flip_rows", "learned_rows", "ratio"), [(4096, 200, 2.0), (4096, 50, 2.0), (40, 40, 4.0), (100, 100, 1.0),
                                                                  (20, 20, 1.0), (4096, 100, 0.5)])
def test_sampled_caveats_agree_with_the_full_pass(flip_rows, learned_rows, ratio):
    """One-step flips in some rows and a learned update in others (``ratio`` times the flips' energy): the sampled pass's
    verdict is the full pass's. Shares of ‖ΔW‖² from evenly spaced rows gave "at the rounding level … 85%" where the
    full pass (and float64) says 33% (a learned update called noise, its floor raised), or no note where it says 65%."""
    from spectra.numerics import numeric_flags

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 256, generator=g) * 0.02
    rows = torch.randperm(4096, generator=g)
    t = _flipped(w.clone(), rows[:flip_rows], g)
    flips_sq = float(((t - w).double() ** 2).sum())
    learned = rows[flip_rows:flip_rows + learned_rows] if flip_rows < 4096 else rows[:learned_rows]
    t[learned] = w[learned] + torch.randn(learned_rows, 256, generator=g) * (ratio * flips_sq / (learned_rows * 256)) ** 0.5
    d = t - w
    full = numeric_flags(w, t, d, base_dtype="float32", tuned_dtype="float32", max_rows=None)
    sampled = numeric_flags(w, t, d, base_dtype="float32", tuned_dtype="float32")
    # the reference share, float64 over every entry: |ΔW_ij| ≤ ε·max(|w|, |t|) (one step at most)
    dd, mag = d.double().abs(), torch.maximum(w.abs(), t.abs()).double()
    share = float((dd[(dd > 0) & (dd <= mag * torch.finfo(torch.float32).eps * (1 + 1e-3))] ** 2).sum() / (dd**2).sum())
    assert abs(share - 0.5) > 0.05  # (cases near the note's threshold are a coin toss for any sample)
    assert [n.code for n in full] == (["rounding_level"] if share >= 0.5 else [])
    assert [n.code for n in sampled] == [n.code for n in full], (share, [n.message[:120] for n in sampled])
