"""What :class:`spectra.callbacks.SpectraTracker` sends to a training's loggers (TensorBoard, W&B…): medians per
module kind of a step's trace records (the full detail stays in ``trace.jsonl``), and the losses it records."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch

from spectra.errors import ConfigError

#: Metrics sent to the loggers, as medians per module kind (the full detail goes to trace.jsonl).
LOG_METRICS = ("energy_rank", "rel_norm", "effective_rank", "turn_prev", "turn_first")


def log_medians(records: list[dict[str, Any]]) -> dict[str, float]:
    """``spectra/<module>/<metric>`` -> median over that module kind's matrices, for the loggers:
    energy rank at τ = 0.9 (or the nearest traced τ), relative norm, effective rank (and, for LoRA,
    ``effective_rank_over_r``: that ÷ r), and φ with the previous and the first measurement (right
    singular vectors), over the matrices whose update is not zero (as trace's findings take them; untouched layers made a
    median of 0 read as "no update"), or over all of a kind none of whose matrices changed (a LoRA's first step: 0). Each
    key carries the quantity its name says, as ``trace.jsonl`` names it."""
    moved = {rec["matrix"]["module"] for rec in records if rec["point"].get("fro_norm") != 0}
    groups: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        pt, kind = rec["point"], rec["matrix"]["module"]
        if pt.get("fro_norm") == 0 and kind in moved:
            continue
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


def loss_number(value: Any, name: str) -> float | None:
    """A loss as a JSON number: a one-element tensor (the loop's own loss, detached) or numpy scalar as a float, None as
    None; anything else refused (a tensor failed json.dumps after the step was marked measured, a string was written as is)."""
    one = value.size == 1 if isinstance(value, np.ndarray) else isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta
    if one:
        value = (value.detach() if isinstance(value, torch.Tensor) else value).reshape(()).item()
    if value is None or (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))):
        return None if value is None else float(value)
    raise ConfigError(f"{name} must be a number, a one-element tensor or None. Got {type(value).__name__} instead",
                      hint="pass the loss tensor itself or loss.item()")


__all__ = ["LOG_METRICS", "log_medians", "loss_number"]
