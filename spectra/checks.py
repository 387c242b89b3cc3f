"""Checks of the public functions' arguments: one line naming the argument and what it must be.

Below every numeric module (metrics, randmat, sketch…), which import them: no spectra imports here.
"""

from __future__ import annotations

import math
import operator

import numpy as np


def check_tau(tau: float, name: str = "tau") -> float:
    """``tau`` as a float when it lies in (0, 1] (an energy share), else ValueError naming it.

    >>> check_tau(0.9)
    0.9
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating, np.integer)) or not 0.0 < tau <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1]. Got {tau!r} instead.")
    return float(tau)


def check_rank(r: int, name: str = "rank") -> int:
    """``r`` when it is a non-negative integer (a count of singular directions), else ValueError naming it."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise ValueError(f"{name} must be a non-negative integer. Got {r!r} instead.")
    return int(r)


def check_index(value: object, name: str, lo: int, hi: int, what: str = "") -> int:
    """``value`` as an int when it is a whole number in ``[lo, hi]`` (a whole float such as 2.0 counts, as the
    configs take it; a bool does not), else one-line ValueError naming ``name`` (``what``: words after the range).

    >>> check_index(2.0, "k", 1, 4)
    2
    """
    try:  # ints, numpy and torch integers; whole floats below (a slice needs an int, so 2.0 failed deep inside)
        whole = None if isinstance(value, (bool, np.bool_)) else operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        ok = isinstance(value, (float, np.floating)) and float(value).is_integer()
        whole = int(value) if ok else None  # type: ignore[arg-type]
    if whole is not None and lo <= whole <= hi:
        return whole
    raise ValueError(f"{name} must be {'in' if whole is not None else 'a whole number in'} [{lo}, {hi}]{what}. Got {value!r} instead.")


def check_number(value: object, name: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` as a float when it is a finite real number in ``[lo, hi]`` (a bool or a string is not), else one-line
    ValueError naming ``name``: a NaN tolerance turned checks off (every comparison with NaN is False).

    >>> check_number(1e-3, "tol", 0.0)
    0.001
    """
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
    if ok and math.isfinite(float(value)) and lo <= float(value) <= hi:  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    bounds = f" in [{lo:g}, {hi:g}]" if math.isfinite(lo) and math.isfinite(hi) else f" >= {lo:g}" if math.isfinite(lo) else ""
    raise ValueError(f"{name} must be a finite number{bounds}. Got {value!r} instead.")


def check_shape(shape: object) -> tuple[int, int]:
    """``shape`` as ``(out, in)``, two whole numbers >= 0 (``(4.0, 4.0)`` is ``(4, 4)``), else ValueError."""
    try:
        out, inn = (check_index(d, "shape", 0, 2**62) for d in shape)  # type: ignore[union-attr]
    except (TypeError, ValueError):  # not iterable, not two items, or not whole numbers >= 0
        raise ValueError(f"shape must be (out, in), two whole numbers >= 0. Got {shape!r} instead.") from None
    return out, inn


__all__ = ["check_index", "check_number", "check_rank", "check_shape", "check_tau"]
