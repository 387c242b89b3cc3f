"""What ``spectra recommend`` reads off one record of a diff's ``results.json`` (a dict as the JSON holds it):
its energy rank at τ, the singular values it kept and how many of them a budget can buy, its LoRA r."""

from __future__ import annotations

import numpy as np

from spectra.errors import ConfigError
from spectra.extract_plan import is_embedding_name
from spectra.lowrank import energy_rank_top
from spectra.metrics import route_resolution, square_scale_exponent, threshold_key


def is_embedding(m: dict) -> bool:
    """An embedding or the output head (the matrices LoRA adapts only when asked)."""
    return m.get("role") == "head" or is_embedding_name(m["name"].split(":")[0], m.get("role"))


def part_rank(m: dict, tau: float) -> tuple[int, bool]:
    """The energy rank at τ of one results record, and whether it was estimated: of an approximate record whose
    bounds differ, the guaranteed upper bound (the estimate may hold less than τ)."""
    key = threshold_key(tau)
    bounds = (m.get("energy_rank_bounds") or {}).get(key)
    if isinstance(bounds, list) and len(bounds) == 2 and isinstance(bounds[1], int) and not isinstance(bounds[1], bool):
        return bounds[1], bounds[0] != bounds[1]
    ranks = m.get("energy_rank") or {}
    if key in ranks and ranks[key] is not None:
        return int(ranks[key]), False
    S = np.asarray(m.get("singular_values") or [], dtype=np.float64)
    shape = m.get("shape")
    if tau == 1.0 and ((k := buyable(m)) < S.size or isinstance(shape, list) and shape and S.size >= min(shape)):
        return k, False  # the values above the record's route's resolution (a float32 route's rounding is none)
    fro = float(m["fro_norm"])
    e = square_scale_exponent(np.append(S, fro))  # ranks are scale-free; σ² of a 1e200 update is inf
    r = energy_rank_top(np.ldexp(S, -e), float(np.ldexp(fro, -e)) ** 2, tau,
                        min(shape) if isinstance(shape, list) and shape else None)
    if r is None:
        raise ConfigError(f"τ = {tau:g} is not among the results' thresholds ({', '.join(ranks) or 'none'}) and the "
                          f"{S.size} singular values kept for {m['name']} do not reach it",
                          hint=f"rerun spectra diff with -t {tau:g} (or a larger --top-k)")
    return r, False


def lora_r(parts: list[dict]) -> int | None:
    """The LoRA r of a module whose parts all come from one adapter module (their records' ``lora_r``), else None:
    ΔW = s·B·A has at most r directions, however its rows are split into parts."""
    if any(str(m.get("method") or "").startswith("dora") for m in parts):
        return None  # DoRA's update is dense
    rs = {m.get("lora_r") for m in parts}
    r = rs.pop() if len(rs) == 1 else None
    return r if isinstance(r, int) and not isinstance(r, bool) and r > 0 else None


def kept_values(m: dict) -> np.ndarray:
    """A results record's kept singular values (null entries left out), float64."""
    return np.array([float(x) for x in m.get("singular_values") or [] if x is not None], dtype=np.float64)


def buyable(m: dict) -> int:
    """How many of a results record's kept singular values a budget can buy: those above its route's resolution
    (:func:`spectra.metrics.route_resolution` by the record's ``method``: a factored update's exact values down to
    1e-10·σ₁, the Gram route's to σ₁·√(p·ε); an exactly rank-1 float64 update kept 3e-8·σ₁ of that route's rounding as
    values 2-9, and a budget bought them)."""
    kept = kept_values(m)
    kept = kept[kept > 0]
    if not kept.size:
        return 0
    shape = m.get("shape")
    p = min(shape) if isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) for x in shape) else 0
    return int(np.count_nonzero(route_resolution(float(kept.max()), max(p, kept.size), m.get("method")) < kept))


def ends_kept(m: dict) -> bool:
    """Whether a record's spectrum beyond its kept singular values is known to be zero or rounding: it kept a zero
    (values are descending) or a value at or below the Gram route's resolution (:func:`buyable`), or as many as its
    LoRA rank (``lora_r``: s·B·A holds at most r directions; not a DoRA update)."""
    kept = kept_values(m)
    r = m.get("lora_r") if not str(m.get("method") or "").startswith("dora") else None  # DoRA's update is dense
    return (bool(np.any(kept == 0)) or buyable(m) < len(kept)
            or (isinstance(r, int) and not isinstance(r, bool) and len(kept) >= r))
