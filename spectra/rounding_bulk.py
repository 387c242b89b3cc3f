"""Where a weight's eigenvalue bulk may be the rounding of its storage (``spectra esd``, ``diff --esd``): the level its
median eigenvalue must clear for a Marchenko–Pastur fit to describe the weights rather than their rounding."""

from __future__ import annotations

import math

import numpy as np
import torch

from spectra.numerics import unit_roundoff

#: How far above the median eigenvalue storage rounding would give a median eigenvalue must lie to be the matrix's bulk.
ROUNDING_BULK = 4.0
#: The median of w² for Gaussian w over its mean (χ²₁'s median): turns a median of squares into a typical mean square.
_CHI2_MEDIAN = 0.45494
#: Entries sampled for the typical square of a matrix (:func:`rounding_bulk`).
_BULK_SAMPLE = 1 << 16


def rounding_bulk(W: torch.Tensor, roundoff: float) -> float:
    """The median eigenvalue of ``WᵀW`` (``W`` ``(out, in)``, any float dtype) at or below which its bulk may be the
    rounding of its storage (``roundoff``: the stored dtype's unit roundoff, :func:`spectra.numerics.unit_roundoff`;
    0 gives 0): :data:`ROUNDING_BULK` · ``u²/3 · N · w²``, ``N = max(out, in)`` and ``w²`` the typical square of an entry
    (the median of the squares of up to 65,536 sampled entries, over χ²₁'s median). Rounding adds entries of variance
    at most ``u²w²/3``, so a bulk of it has a median eigenvalue near ``u²/3 · N · w²``; a typical entry, not the mean,
    because a few outlier rows or columns put their rounding in a few eigenvalues, not in the bulk (a mean-based bound
    dropped the fit of a Gaussian weight with two ×3000 columns)."""
    if roundoff <= 0 or W.numel() == 0:
        return 0.0
    flat = W.reshape(-1)
    step = max(1, flat.numel() // _BULK_SAMPLE)
    while math.gcd(step, W.shape[-1]) != 1:  # a step sharing a factor with the row length samples a few columns only
        step += 1
    x = flat[::step].double()
    return ROUNDING_BULK * roundoff * roundoff / 3 * max(W.shape) * float(torch.median(x * x)) / _CHI2_MEDIAN


def weight_rounding(W: torch.Tensor, dtype: str) -> tuple[float, str]:
    """``(level, dtype)`` of a weight ``W`` (``(out, in)``, any float dtype) stored in ``dtype``, for
    :func:`spectra.records.esd_entry`'s ``rounding``: :func:`rounding_bulk` with that dtype's unit roundoff."""
    return rounding_bulk(W, unit_roundoff(dtype)), dtype


def rounding_bulk_note(lam: np.ndarray, mp_sigma2: float | None, level: float, dtype: str) -> str:
    """Why a matrix with eigenvalues ``lam`` (any order) has no Marchenko–Pastur fit when its median eigenvalue is at
    or below ``level`` (:func:`rounding_bulk` of its ``dtype`` storage), or ``""`` (a fit, or a bulk above it)."""
    mid = float(np.median(lam)) if len(lam) else 0.0
    if mp_sigma2 is not None or not 0 < mid <= level:
        return ""
    return (f"its median eigenvalue {mid:.3g} is at the rounding of its {dtype} storage ({level:.3g}): no "
            "Marchenko–Pastur fit (mp_* null)")


__all__ = ["ROUNDING_BULK", "rounding_bulk", "rounding_bulk_note", "weight_rounding"]
