"""What :class:`spectra.callbacks.SpectraTracker` sends to a training's loggers (TensorBoard, W&B…): medians per
module kind of a step's trace records; the full detail stays in ``trace.jsonl``."""

from __future__ import annotations

import statistics
from typing import Any

#: Metrics sent to the loggers, as medians per module kind (the full detail goes to trace.jsonl).
LOG_METRICS = ("energy_rank", "rel_norm", "effective_rank", "turn_prev", "turn_first")


def log_medians(records: list[dict[str, Any]]) -> dict[str, float]:
    """``spectra/<module>/<metric>`` -> median over that module kind's matrices, for the loggers:
    energy rank at τ = 0.9 (or the nearest traced τ), relative norm, effective rank (and, for LoRA,
    ``effective_rank_over_r``: that ÷ r), and φ with the previous and the first measurement (right
    singular vectors). Each key carries the quantity its name says, as ``trace.jsonl`` names it."""
    groups: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        pt, kind = rec["point"], rec["matrix"]["module"]
        ranks = pt.get("energy_rank") or {}
        key = min(ranks, key=lambda t: abs(float(t) - 0.9)) if ranks else None
        values = {
            f"energy_rank_{key}": ranks.get(key) if key else None,
            "rel_norm": pt.get("rel_norm"),
            "effective_rank": pt.get("effective_rank"),
            "effective_rank_over_r": pt.get("effective_rank_over_r"),
            "phi_prev": ((pt.get("turn_prev") or {}).get("right") or {}).get("phi"),
            "phi_first": ((pt.get("turn_first") or {}).get("right") or {}).get("phi"),
        }
        for metric, v in values.items():
            if v is not None:
                groups.setdefault(kind, {}).setdefault(metric, []).append(float(v))
    return {f"spectra/{kind}/{metric}": statistics.median(vs) for kind, ms in groups.items() for metric, vs in ms.items()}


__all__ = ["LOG_METRICS", "log_medians"]
