"""Ties at a top-k cut: when singular values are equal within their resolution, a top-k subspace cut
between them is an arbitrary part of the tied span (docs/definitions.md, "Ties at the cut"). Pure
functions on a descending spectrum; used by ``trace``, ``interfere`` and ``compare``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spectra.metrics import rank_resolution

#: Singular values closer than this fraction of σ₁ are tied: the Gram route resolves values to about
#: 1e-7·σ₁, and a top-k cut between tied values picks an arbitrary part of their span.
TIE_REL = 1e-6


def _tie_tol(vals: np.ndarray, floor: float, p: int | None) -> float:
    """The resolution within which singular values count as tied (:func:`tie_cut`)."""
    return max(TIE_REL * float(vals[0]), 4.0 * float(floor) / math.sqrt(max(p or len(vals), 1)))


def _values(S: np.ndarray | torch.Tensor) -> np.ndarray:
    return S.detach().cpu().numpy() if isinstance(S, torch.Tensor) else np.asarray(S)


def cut_in_tie(S: np.ndarray | torch.Tensor, k: int, available: int, floor: float = 0.0, p: int | None = None) -> bool:
    """Whether a top-k cut falls between tied values (``σ_k − σ_{k+1}`` within the resolution of
    :func:`tie_cut`): after :func:`tie_cut` has widened what it can, a True means the top-k subspace is not
    determined (a cluster too wide to widen, such as a flat spectrum)."""
    k, available = int(k), int(available)
    if k < 1 or k >= available:
        return False
    vals = _values(S)
    return float(vals[k - 1]) - float(vals[k]) <= _tie_tol(vals, floor, p)


def tied_cuts(S: np.ndarray | torch.Tensor, r: int, floor: float = 0.0, p: int | None = None) -> np.ndarray:
    """For each i = 1 … r, whether a top-i cut of ``S`` (descending) falls between tied values
    (:func:`cut_in_tie` with the top ``r`` available), bool ``(r,)``; the last entry is always False (the
    cut at r itself is :func:`tie_cut`'s). A measure of the top-i directions (φ(i, j) of a grid) is
    not determined where it is True.

    >>> tied_cuts(np.array([3.0, 2.0, 2.0, 1.0]), 4).tolist()
    [False, True, False, False]
    """
    r = int(r)
    vals = _values(S)
    if r < 2 or vals.size < r:
        return np.zeros(max(r, 0), dtype=bool)
    tol = _tie_tol(vals, floor, p)  # cut_in_tie at each i < r, at once
    return np.append(vals[: r - 1] - vals[1:r] <= tol, False)


def tie_runs(S: np.ndarray | torch.Tensor, n: int, floor: float = 0.0, p: int | None = None) -> list[int]:
    """The first index of each run of tied values among the first ``n`` of ``S`` (descending): a run holds the
    values within the resolution of :func:`tie_cut` of its first one (not chained through neighbours, which
    a smooth spectrum would make one run); with no tie, every value is its own run.

    >>> tie_runs(np.array([5.0, 3.0, 3.0, 3.0, 1.0]), 5)
    [0, 1, 4]
    """
    vals = _values(S)
    n = min(int(n), vals.size)
    tol = _tie_tol(vals, floor, p) if n else 0.0
    if not np.any(vals[: n - 1] - vals[1:n] <= tol):  # almost always: no tie
        return list(range(n))
    starts = [0]
    for j in range(1, n):
        if vals[starts[-1]] - vals[j] > tol:
            starts.append(j)
    return starts


#: What a subspace measure's note says when its top-k cut lies in a tie too wide to widen (:func:`undetermined_cut`).
UNDETERMINED_TEXT = ("its top-k cut lies inside a cluster of tied singular values too wide to widen (past k + max(k, 8)): "
                     "the subspace is not determined, and its measures depend on the solver's choice within the cluster")


def undetermined_cut(S: np.ndarray | torch.Tensor, k: int, floor: float = 0.0, rel_tol: float | None = None) -> bool:
    """Whether the top ``k`` of the full spectrum ``S`` (descending) were cut inside a tie that
    :func:`tie_cut` left cut (:func:`cut_in_tie` among the values :func:`spectrum_and_top` keeps: above ``rel_tol·σ₁``,
    by default its cut, the Gram route's resolution ``√(p·ε)``, and above ``floor``)."""
    vals = _values(S)
    if k < 1 or not vals.size or vals[0] <= 0:
        return False
    rel = rank_resolution(1.0, vals.size) if rel_tol is None else rel_tol
    return cut_in_tie(vals, k, int(np.count_nonzero(vals > max(rel * float(vals[0]), floor))), floor)


def tie_cut(S: np.ndarray | torch.Tensor, k: int, available: int, floor: float = 0.0, p: int | None = None) -> int:
    """``k``, widened to the last singular value tied with the k-th (``S`` descending): the top-k subspace
    is only defined when ``σ_k − σ_{k+1}`` exceeds the values' resolution; cut inside a cluster of equal
    values it is an arbitrary part of the cluster's span (two checkpoints of one update, decomposed
    separately, would "turn"). Tied means within ``max(TIE_REL·σ₁, 4·floor/√p)`` of σ_k itself, not
    of a neighbour (a smooth spectrum would chain): the rounding floor (the spectral norm of all the
    storage noise) moves the values of a cluster of c directions by about ``floor·√(c/p)``, p = len(S),
    so a tie of up to 16 values split by rounding is caught; ``p`` is ``min(out, in)``, by default the
    length of ``S`` (pass it when ``S`` holds only the top values). A cluster reaching past
    ``k + max(k, 8)`` (a flat spectrum) is left cut at k: its top-k subspace is not determined
    (:func:`cut_in_tie` says so), and widening it would cost up to every direction. At most
    ``available`` (the triplets that may be kept).

    >>> tie_cut(np.array([3.0, 2.0, 2.0, 2.0, 1.0]), 2, 5)
    4
    >>> tie_cut(np.array([3.0, 2.0, 1.0]), 2, 3)
    2
    >>> tie_cut(np.ones(100), 4, 100)   # flat: not determined, left at k
    4
    """
    k, available = int(k), int(available)
    if k < 1 or k >= available:
        return min(k, available)
    vals = _values(S)
    tol = _tie_tol(vals, floor, p)
    end = k + int(np.count_nonzero(float(vals[k - 1]) - vals[k:available] <= tol))  # descending: a prefix
    return k if end > k + max(k, 8) else end


__all__ = ["TIE_REL", "UNDETERMINED_TEXT", "cut_in_tie", "tie_cut", "tie_runs", "tied_cuts", "undetermined_cut"]
