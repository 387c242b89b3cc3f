"""Thirty-first probe round, memory (docs/bad_inputs.md, "thirty-first round"): full-size copies the memory
statements do not count. The values must stay what they were; the copies are gone (measured by the probe: a 100k-row
bf16 embedding at the rounding level peaked at 2.25 GB in diff against 1.12 GB for a resolved one, trace held a float64
copy of ΔW)."""

from __future__ import annotations

import numpy as np
import torch

from spectra.interference import spectrum_and_top
from spectra.numerics import RESOLVED_MARGIN, numeric_notes
from spectra.storage_floor import certified_floor, raises_floor, rounding_floor


def test_the_floor_of_a_rounding_level_update_is_the_same_from_the_update_at_hand():
    """certified_floor formed tuned − base again beside the ΔW it was given (diff, compare, trace, interfere); with
    `delta` it uses that one, and without it works in blocks: the same floor either way."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(3000, 1500, generator=g) * 0.02).bfloat16()  # 4.5M entries: above the 4M-entry blocks
    t = (w.float() + 0.003 * torch.randn(3000, 1500, generator=g) * w.float()).bfloat16()
    delta = t.float() - w.float()
    notes = numeric_notes(w, t, delta, base_dtype="bfloat16", tuned_dtype="bfloat16")
    assert raises_floor(notes)  # the case that forms the difference
    floor = rounding_floor(t, "bfloat16", w, delta=delta)
    given, blocked = certified_floor(floor, notes, t, w, delta=delta), certified_floor(floor, notes, t, w)
    d64 = delta.double()
    edge = float(d64.norm(dim=1).max() + d64.norm(dim=0).max())  # largest row norm + largest column norm, float64
    assert given == blocked  # one measure whichever way it is reached (float64 norms over blocks of rows)
    assert abs(given / max(floor, RESOLVED_MARGIN * edge) - 1) < 1e-12


def test_a_tall_updates_top_vectors_are_formed_in_blocks_and_still_exact():
    """spectrum_and_top formed Xᵀ·Q from a float64 copy of all of ΔW (800 MB for a 100k × 1024 embedding): now in
    blocks of rows; the values and the long side's subspace still match float64 numpy."""
    g = torch.Generator().manual_seed(0)
    d = (torch.randn(20_000, 256, generator=g) @ torch.diag(torch.linspace(1, 0.01, 256)) @ torch.randn(256, 256, generator=g)).float()
    S, top = spectrum_and_top(d, 8)
    U, S_ref, _ = np.linalg.svd(d.double().numpy(), full_matrices=False)
    np.testing.assert_allclose(S[:8], S_ref[:8], rtol=1e-10)
    cosines = np.linalg.svd(top.U.numpy().T @ U[:, :8], compute_uv=False)
    assert cosines.min() > 1 - 1e-10
