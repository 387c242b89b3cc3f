"""Random-matrix baselines: what an i.i.d. Gaussian matrix of the same shape would give.

The squared singular values of an ``m × n`` matrix with i.i.d. N(0, 1) entries, divided by
``max(m, n)``, follow the Marchenko–Pastur law with ratio ``β = p / max(m, n)`` as p grows:
density ``sqrt((b − x)(x − a)) / (2π β x)`` on ``[a, b] = [(1 − √β)², (1 + √β)²]``, mean 1.
Energy ranks of such a matrix are a fixed fraction of p, the "random baseline" next to which a
fine-tuning update's rank needed reads as structured (below) or noise-like (near).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from spectra.checks import check_shape, check_tau

_GRID = 200_001  # quadrature points in the angle variable; errors ~1e-9 in the fractions


@lru_cache(maxsize=256)
def _mp_tables(beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid x (descending), upper-tail mass F̄(x) and upper-tail energy Ē(x) of Marchenko–Pastur(β).

    With ``x = a + (b − a)(1 − cos φ)/2`` the density times dx is ``((b−a)/2)² sin²φ / (2πβx) dφ``,
    which is smooth even at β = 1 (where the density has a 1/sqrt(x) pole at 0).
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1]. Got {beta!r} instead.")
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    phi = np.linspace(math.pi, 0.0, _GRID)  # descending x
    x = a + (b - a) * (1 - np.cos(phi)) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(x > 0, ((b - a) / 2) ** 2 * np.sin(phi) ** 2 / (2 * math.pi * beta * x), 0.0)
    if beta == 1.0:  # a = 0: sin²φ / (π (1 − cos φ)) = (1 + cos φ)/π, 2/π at x = 0 (φ = 0), without 0/0
        w = (1 + np.cos(phi)) / math.pi
    dphi = math.pi / (_GRID - 1)
    mass = np.concatenate([[0.0], np.cumsum((w[1:] + w[:-1]) / 2 * dphi)])
    energy = np.concatenate([[0.0], np.cumsum((w[1:] * x[1:] + w[:-1] * x[:-1]) / 2 * dphi)])
    return x, mass / mass[-1], energy / energy[-1]


def mp_energy_fraction(beta: float, tau: float) -> float:
    """Fraction of p that the top eigenvalues of Marchenko–Pastur(β) need to hold τ of the energy."""
    if not 0.0 < tau <= 1.0:  # np.interp would clamp a τ outside (0, 1] to an end of the table
        raise ValueError(f"tau must be a number in (0, 1]. Got {tau!r} instead.")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta = min(shape) / max(shape) must be in (0, 1]. Got {beta!r} instead.")
    _, mass, energy = _mp_tables(float(beta))
    return float(np.interp(tau, energy, mass))


def random_energy_rank(shape: tuple[int, int], tau: float) -> int:
    """Energy rank at τ of an i.i.d. Gaussian matrix of ``shape`` (Marchenko–Pastur, large-p limit).

    Matches seeded Monte Carlo to within about 0.5% of p for p >= 256 (tested). docs/definitions.md reference:
    4096×4096 -> ≈ 2088, 4096×11008 -> ≈ 2917, 1024×1024 -> ≈ 523.

    ``shape``: two whole numbers >= 0; ``tau``: a number in (0, 1]; else ValueError (:func:`spectra.metrics.energy_rank`'s checks).
    """
    # tau=True read as 1, a 0-d tensor as its value, (10.5, 20) as a matrix of 10.5 rows
    shape, tau = check_shape(shape), check_tau(tau)
    p, n = min(shape), max(shape)
    if p == 0:
        return 0
    return max(1, min(p, math.ceil(mp_energy_fraction(p / n, tau) * p)))


def mp_median(beta: float) -> float:
    """Median of Marchenko–Pastur(β) (eigenvalues of ``X Xᵀ / n``, unit variance)."""
    x, mass, _ = _mp_tables(float(beta))
    return float(np.interp(0.5, mass, x))


@lru_cache(maxsize=256)
def gavish_donoho_omega(beta: float) -> float:
    """ω(β) of Gavish & Donoho (2014), Eq. (4)-(5): optimal hard threshold for unknown noise level.

    ``ω(β) = λ*(β) / sqrt(μ_β)`` with
    ``λ*(β) = sqrt(2(β+1) + 8β / ((β+1) + sqrt(β² + 14β + 1)))`` and ``μ_β`` the Marchenko–Pastur
    median. ω(1) ≈ 2.858; the paper's fit ``0.56β³ − 0.95β² + 1.82β + 1.43`` agrees to ≈ 0.02.
    ``β = min(out, in) / max(out, in)`` in (0, 1], else ValueError.
    """
    ok = not isinstance(beta, (bool, np.bool_)) and isinstance(beta, (int, float, np.integer, np.floating))
    if not (ok and 0.0 < beta <= 1.0):  # -0.5 raised "math domain error", naming nothing
        raise ValueError(f"beta = min(out, in) / max(out, in) must be a number in (0, 1]. Got {beta!r} instead.")
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))
    return lam / math.sqrt(mp_median(beta))
