"""Shared fixtures: checkpoint writers and float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def reference_energy_rank(S: np.ndarray, tau: float) -> tuple[int, bool]:
    """float64 reference energy rank and whether it is safely away from the threshold.

    Returns ``(k, clear)``; ``clear`` is False when some cumulative energy is within 1e-6 (relative)
    of τ·total, where float rounding may legitimately move the rank by one.
    """
    e = np.cumsum(S.astype(np.float64) ** 2)
    total = e[-1]
    if total == 0:
        return 0, True
    k = int(np.argmax(e >= tau * total)) + 1
    clear = bool(np.min(np.abs(e / total - tau)) > 1e-6)
    return k, clear


def svd64(M: torch.Tensor | np.ndarray) -> np.ndarray:
    """Singular values by numpy's float64 SVD (the independent oracle)."""
    A = M.double().numpy() if isinstance(M, torch.Tensor) else np.asarray(M, dtype=np.float64)
    return np.linalg.svd(A, compute_uv=False)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
