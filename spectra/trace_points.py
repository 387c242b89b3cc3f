"""What ``spectra trace`` and :class:`spectra.callbacks.SpectraTracker` measure at one (matrix, checkpoint) point:
the options (:class:`TraceConfig`), the spectrum fields of a point (:func:`point_metrics`), a matrix's own fields
(:func:`matrix_meta`), and the order matrices are listed in."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spectra.config import SharedOptions, check_thresholds
from spectra.errors import ConfigError
from spectra.esd import power_law_fit
from spectra.linalg import singular_values
from spectra.metrics import DEFAULT_THRESHOLDS, relative_norm, spectrum_metrics, threshold_key
from spectra.naming import MatrixSpec
from spectra.roles import role_sort_key

#: Singular values below this fraction of σ₁ are zero within the precision of the exact spectrum.
SIGMA_FLOOR = 1e-7


@dataclass(frozen=True)
class TraceConfig(SharedOptions):
    """Options of a trace (``spectra trace`` and :class:`spectra.callbacks.SpectraTracker`).

    Attributes:
        thresholds: energy-rank thresholds τ (each in (0, 1]).
        top_k: rank of the subspaces compared between checkpoints (``min(top_k, rank)``; a LoRA
            update of rank r <= top_k is compared whole). Small k keeps the angles about the
            directions that carry the update; 8 holds most of a fine-tuning update's energy in the
            demo's runs.
        keep_singular: top singular values stored per point.
        alpha: also fit WeightWatcher's power-law exponent α (:func:`spectra.esd.power_law_fit`, its
            default ``xmin="fit"``) to the eigenvalues σ² of each checkpoint's weight ``W_step`` and of
            ``W_base`` (full checkpoints only: one more exact eigensolve per matrix and checkpoint).
        include, exclude, layers, device: see :class:`spectra.config.SharedOptions`.
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    top_k: int = 8
    keep_singular: int = 8
    alpha: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "thresholds", check_thresholds(self.thresholds))
        if self.top_k < 1 or self.keep_singular < 0:
            raise ConfigError(f"top_k must be >= 1 and keep_singular >= 0. Got {self.top_k}, {self.keep_singular} instead")


# ---- per-point metrics (shared with spectra.callbacks) -------------------------------------------------
def point_metrics(S: np.ndarray, shape: tuple[int, int], base_fro: float | None, config: TraceConfig,
                  lora_r: int | None = None, floor: float = 0.0) -> dict[str, Any]:
    """The spectrum fields of one (matrix, step) point from ΔW's singular values ``S`` (any length holding every non-zero
    value; padded with zeros to ``p``). ``sigma_ratio`` (σ₁/σ₂) is None when σ₂ is at most ``SIGMA_FLOOR · σ₁`` (the float64
    Gram route's precision) or ``floor``, the stored weights' rounding floor (:func:`spectra.delta.pair_floor`): a ratio of
    a σ₂ that is zero within either is made of rounding (5.75e6 for a rank-1 float32 update)."""
    p = min(shape)
    S = np.sort(np.asarray(S, dtype=np.float64))[::-1][:p]
    full = np.pad(S, (0, p - S.size))
    m = spectrum_metrics(full, shape, config.thresholds)
    point = {
        "fro_norm": m.fro_norm, "rel_norm": relative_norm(m.fro_norm, base_fro) if base_fro is not None else None,
        "spectral_norm": m.spectral_norm,
        "sigma_ratio": float(full[0] / full[1]) if p > 1 and full[1] > max(SIGMA_FLOOR * full[0], floor) else None,
        "stable_rank": m.stable_rank, "effective_rank": m.effective_rank,
        "energy_rank": {threshold_key(t): m.energy_rank[t] for t in config.thresholds},
        "singular_values": [float(x) for x in full[: config.keep_singular]],
    }
    if lora_r:
        point["effective_rank_over_r"] = m.effective_rank / lora_r
        point["lora_r"] = int(lora_r)  # this checkpoint's r: the ratio's denominator, which a mixed list can change
    return point


def matrix_meta(spec: MatrixSpec, shape: tuple[int, int], base_fro: float | None, lora_r: int | None = None) -> dict[str, Any]:
    """The per-matrix fields of a trace (points are added beside them)."""
    return {"name": spec.name, "layer": spec.layer, "module": spec.module, "role": spec.role,
            "shape": [int(shape[0]), int(shape[1])], "base_fro_norm": base_fro, "lora_r": lora_r, "note": spec.note}


def jsonable(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python (a JSON number is always a number)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def matrix_order(meta: dict[str, Any]) -> tuple:
    band = 0 if meta.get("role") in ("embed", "pos_embed") else (1 if meta.get("layer") is not None else 2)
    return (band, meta.get("layer") if meta.get("layer") is not None else -1,
            role_sort_key(meta.get("role"), meta.get("module") or ""), meta["name"])


def weight_alpha(w: torch.Tensor, device: torch.device) -> tuple[float | None, float | None]:
    """WeightWatcher's α of a weight ``w`` and its standard error (None when the fit fails)."""
    x = w.to(device)
    fit = power_law_fit(singular_values(x if x.dtype in (torch.float32, torch.float64) else x.float()) ** 2)
    return fit.alpha, fit.sigma


def skip_point(step: int, reason: str) -> dict[str, Any]:
    return {"step": step, "skip": reason}
