"""What ``spectra interfere`` keeps of its per-matrix records: JSON-ready values, the medians over matrices
that its summary, table and report give, and the warnings read off its records (pure functions, no I/O)."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spectra.selection import unmeasured_clause

if TYPE_CHECKING:  # interfere imports this module: its result type is named for the checker only
    from spectra.interfere import InterfereResult


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


def changed_tasks(result: InterfereResult) -> list[int]:
    """The indices of the tasks whose update is non-zero (‖ΔW_t‖_F > 0) on at least one compared matrix:
    fewer than two and no pair of tasks is measured (``spectra interfere`` exits 3)."""
    return [i for i in range(len(result.tasks)) if any(m["fro"][i] for m in result.modules)]


def skips_of(result: InterfereResult, tasks: list[int]) -> list[dict[str, str]]:
    """The skipped matrices that may hold an update of ``tasks`` (indices): those skipped for them or for every task,
    not those another task's input alone caused (its resized embedding says nothing of a copy of the base)."""
    others = [result.tasks[i] for i in range(len(result.tasks)) if i not in tasks]
    mine = [result.tasks[i] for i in tasks]

    def elsewhere(reason: str) -> bool:  # a reason naming another task's input ("…: …", "rows differ … in T2"), not one of these
        return any(o in reason for o in others) and not any(m in reason for m in mine)
    return [s for s in result.skipped if not elsewhere(str(s.get("reason", "")))]


def zero_tasks_warning(result: InterfereResult) -> list[str]:
    """One warning naming (by their distinct names) the tasks with ΔW = 0 on every compared matrix, and what
    the totals then hold; none when there is no such task (or no compared matrix)."""
    live = changed_tasks(result)
    idle = [i for i in range(len(result.tasks)) if i not in live]
    if not result.modules or not idle:
        return []
    one = len(idle) == 1
    rest = ("the totals hold the other tasks only" if len(live) > 1 else
            f"no pair is measured: the totals hold {result.names[live[0]]} alone" if live else
            "no task changed any compared matrix: nothing is measured")
    why = (unmeasured_clause(mine)[2:] if (mine := skips_of(result, idle)) else  # the update may sit in what was not compared
           f"{'a copy' if one else 'copies'} of the base, or a LoRA saved at initialisation?")
    return [f"{', '.join(result.names[i] for i in idle)}: ΔW = 0 on every compared matrix ({why}): {'its' if one else 'their'} "
            f"pairs have no interference to measure, and {rest}"]


def copies(modules: list[dict[str, Any]], i: int, j: int) -> int:
    """How many matrices tasks ``i`` and ``j`` changed when their updates look one on every one of them (norms
    equal to 12 digits and cosine +1: an update and its negation, task negation, share a norm), else 0."""
    live = [m for m in modules if m["fro"][i] or m["fro"][j]]
    same = all(math.isclose(m["fro"][i], m["fro"][j], rel_tol=1e-12) and m["cosine"][i][j] is not None
               and m["cosine"][i][j] > 1 - 1e-9 for m in live)
    return len(live) if same else 0

__all__ = ["changed_tasks", "clean", "copies", "nanmedian", "over_matrices", "scalar_median", "skips_of", "summarise", "zero_tasks_warning"]
