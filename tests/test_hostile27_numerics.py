"""Twenty-seventh round, numerics (docs/bad_inputs.md, "twenty-seventh round"): a sub-step update that diff called
rounding noise while compare counted its directions (the floor sat below the noise ceiling diff's verdict used), and
``diff --esd`` losing the whole run to a traceback on float64 weights near 1e160 (``spectra esd`` skipped them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra import CompareConfig, DiffConfig, compare, diff
from spectra.numerics import RESOLVED_MARGIN
from tests.cli_util import cli

_N = "model.layers.0.self_attn.q_proj.weight"


def _planted(m: int, n: int, s: list[float], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.T


def test_a_sub_step_update_is_unresolved_in_diff_and_compare_alike(tmp_path):
    """bf16 weights of scale 0.02 plus a rank-2 update of σ = 0.003, 0.0015 (under one bf16 step per entry), rounded
    to bf16: σ₁ of the stored ΔW lies above the u·|w| floor but within what independent one-step flips of its
    entries reach. diff said "rounding noise"; compare said "resolves 2 directions"."""
    g = torch.Generator().manual_seed(4)
    W = (0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)).bfloat16()
    tuned = (W.double() + _planted(64, 64, [0.003, 0.0015])).bfloat16()
    save_file({_N: W}, str(tmp_path / "base.safetensors"))
    save_file({_N: tuned}, str(tmp_path / "tuned.safetensors"))
    d = (tuned.double() - W.double()).numpy()
    s = np.linalg.svd(d, compute_uv=False)
    edge = np.linalg.norm(d, axis=1).max() + np.linalg.norm(d, axis=0).max()
    assert s[0] < RESOLVED_MARGIN * edge  # the case: within the noise ceiling
    res = diff(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), config=DiffConfig())
    [m] = res.modules
    assert "rounding_level" in m.caveats and "not resolved from rounding noise" in m.note
    assert m.rounding_floor >= RESOLVED_MARGIN * edge * (1 - 1e-6) > s[0]  # no direction above it, as the note says
    cmp = compare(str(tmp_path / "tuned.safetensors"), str(tmp_path / "tuned.safetensors"), base=str(tmp_path / "base.safetensors"),
                  config=CompareConfig(top_k=8))
    [row] = cmp.modules
    assert row.status == "unresolved" and row.rank_a == 0


def test_diff_esd_skips_the_fit_of_float64_weights_near_1e160_and_keeps_the_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {_N: torch.randn(16, 16, generator=g, dtype=torch.float64),
            "model.layers.0.self_attn.k_proj.weight": 1e160 * torch.randn(16, 16, generator=g, dtype=torch.float64)}
    tuned = {k: v + 0.1 * v.abs().max() * torch.randn(16, 16, generator=g, dtype=torch.float64) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    r = cli(["diff", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--esd", "--out", str(tmp_path / "o"),
             "--no-plots"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = {m["name"]: m for m in json.loads((tmp_path / "o" / "results.json").read_text())["modules"]}
    big = rows["model.layers.0.self_attn.k_proj.weight"]["esd"]
    assert big["delta"] is None and big["base"] is None and "overflow float64" in big["note"]
    assert rows[_N]["esd"]["delta"]["alpha"] is not None or rows[_N]["esd"]["delta"]["M"] == 16  # the normal one is fitted


def test_a_zero_threshold_says_what_reads_as_zero(tmp_path):
    from tests.pair_util import small_pair

    b, t = small_pair(tmp_path)
    r = cli(["diff", b, t, "-t", "0", "--no-plots"])
    assert r.returncode != 0 and "0, or a value below 5e-324, the smallest float, which reads as 0" in r.stderr


def test_the_raised_floor_of_a_float64_update_is_measured_in_float64():
    """The review: the noise ceiling was measured on the float32 difference of float64 weights: 0 for one-step float64
    flips (the floor not raised: a direction counted above it), or 1e-6 where entries straddle a float32 boundary
    (a floor nine orders above the update)."""
    import math

    from spectra.numerics import numeric_notes
    from spectra.storage_floor import certified_floor, rounding_floor

    g = torch.Generator().manual_seed(0)
    for straddle in (False, True):
        W = torch.randn(64, 48, generator=g, dtype=torch.float64)
        if straddle:
            W = W.float().double()
            W = W + 0.5 * (torch.nextafter(W.float(), torch.full_like(W.float(), math.inf)).double() - W)
        T = W.clone()
        flip = torch.rand(W.shape, generator=g, dtype=torch.float64) < 0.3
        T[flip] = torch.nextafter(W[flip], torch.full_like(W[flip], math.inf))
        d = T - W
        notes = numeric_notes(W, T, d, base_dtype="float64", tuned_dtype="float64")
        assert notes and notes[0].startswith("ΔW is at the rounding level of float64")
        floor = certified_floor(rounding_floor(T, "float64", W), notes, T, W)
        top = float(torch.linalg.svdvals(d)[0])
        edge = float(d.norm(dim=1).max() + d.norm(dim=0).max())
        assert top <= floor == pytest.approx(RESOLVED_MARGIN * edge, rel=1e-9)
