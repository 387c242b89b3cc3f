"""What ``spectra interfere`` keeps of its per-matrix records: JSON-ready values, and the medians over matrices
that its summary, table and report give (pure functions, no I/O)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch


def clean(x: Any) -> Any:
    """numpy/torch values -> JSON types, NaN/inf -> None (never a number that is not one)."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, torch.Tensor):
        return clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def nanmedian(stack: list[Any]) -> Any:
    arr = np.array([[[np.nan if v is None else v for v in row] for row in m] for m in stack], dtype=float)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return None
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN (-> None)
        return clean(np.nanmedian(arr, axis=0))


def scalar_median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def over_matrices(summary: dict[str, Any]) -> str:
    """What a pair table's medians are over: ``"median over 16 matrices"``, or, where a task left matrices
    unchanged, the range of the per-pair counts (``pair_modules``: the matrices both tasks changed)."""
    n, counts = summary.get("modules", 0), summary.get("pair_modules") or []
    off = [c for i, row in enumerate(counts) for j, c in enumerate(row) if i != j]
    if not off or min(off) == max(off) == n:
        return f"median over {n} matrices"
    lo, hi = min(off), max(off)
    return f"median per pair over the matrices both changed ({lo}{'' if lo == hi else f'–{hi}'} of {n})"


def summarise(modules: list[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise medians over modules of every pairwise measure, and medians of the n-way scalars."""
    if not modules:
        return {}
    return {
        "cosine": nanmedian([m["cosine"] for m in modules]), "phi": nanmedian([m["phi"] for m in modules]),
        "captured": nanmedian([m["captured"] for m in modules]), "tsv": nanmedian([m["tsv"]["pairs"] for m in modules]),
        "knots": nanmedian([m["knots"]["alignment"] for m in modules]),
        "tsv_relative": scalar_median([m["tsv"]["relative"] for m in modules]),
        "tsv_relative_fro": scalar_median([m["tsv"]["relative_fro"] for m in modules]),
        "spectral_over_max": scalar_median([m["sum"]["spectral_over_max"] for m in modules]),
        "fro_sq_ratio": scalar_median([m["sum"]["fro_sq_ratio"] for m in modules]),
        "nuclear_ratio": scalar_median([m["sum"]["nuclear_ratio"] for m in modules]),
        "modules": len(modules),
        # per pair, the matrices its medians are over: those both tasks changed (a zero update has no cosine)
        "pair_modules": np.sum([[[v is not None for v in row] for row in m["cosine"]] for m in modules], axis=0).tolist(),
    }


__all__ = ["clean", "nanmedian", "over_matrices", "scalar_median", "summarise"]
