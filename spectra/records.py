"""Result records of a diff: the :class:`~spectra.results.ModuleResult` fields that follow from a
spectrum (exact or approximate), the random-matrix baselines beside them, the ``esd`` entry of
``spectra diff --esd``, and the per-matrix event the runs report through their callback."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spectra.config import DiffConfig
from spectra.delta import Prepared
from spectra.esd import EVALS_THRESH, GRAM_LIMIT, XminMethod, esd_metrics
from spectra.metrics import rank_resolution, relative_norm, spectrum_metrics, threshold_key
from spectra.pairing import Skipped
from spectra.randmat import random_energy_rank
from spectra.results import ModuleResult
from spectra.roles import part_role
from spectra.rounding_bulk import rounding_bulk_note
from spectra.sketch import ApproxSpectrum


@dataclass(frozen=True)
class DiffEvent:
    """Reported to the callback once per analysed or skipped matrix.

    Attributes:
        done: matrices finished so far (including this one).
        total: matrices planned (parts of fused matrices and experts counted separately).
        result: the new result, or None if the matrix was skipped.
        skipped: why the matrix was skipped, or None.
    """

    done: int
    total: int
    result: ModuleResult | None = None
    skipped: Skipped | None = None


#: A base matrix of zeros (a newly added layer saved as zeros) has no scale to relate ΔW to.
ZERO_BASE_NOTE = "W_base is all zero: ‖ΔW‖/‖W_base‖ is undefined (null)"


def common_fields(item: Prepared, config: DiffConfig) -> dict:
    """The fields every result has, whichever path computed it."""
    pair, unit = item.task.pair, item.unit
    return dict(
        name=unit.name, layer=pair.tuned.layer, module=unit.module, role=part_role(pair.tuned.role, unit.module, pair.tuned.rel_path),
            expert=unit.expert,
        shape=list(unit.shape), base_fro_norm=item.base_fro, random_energy_rank=random_ranks(unit.shape, config),
        dtype=f"{pair.base_info.dtype}/{pair.tuned_info.dtype}",
        note="; ".join(n for n in (pair.note, pair.tuned.note, item.note, ZERO_BASE_NOTE if item.base_fro == 0 else "") if n),
    )


def spectrum_fields(S: np.ndarray, shape: tuple[int, int], config: DiffConfig, base_fro: float | None,
                    method: str | None = None) -> dict:
    """The :class:`ModuleResult` fields that follow from the full spectrum ``S`` (descending, length p)
    of a ``shape`` update and ``‖W_base‖_F`` (None when there is no base), computed by the route ``method`` names
    (None: the run's ``config.method``)."""
    m = spectrum_metrics(S, shape, config.thresholds, method or config.method)
    keys = [threshold_key(tau) for tau in config.thresholds]
    return dict(
        fro_norm=m.fro_norm, rel_norm=relative_norm(m.fro_norm, base_fro) if base_fro is not None else None,
        spectral_norm=m.spectral_norm, nuclear_norm=m.nuclear_norm, stable_rank=m.stable_rank,
        effective_rank=m.effective_rank, signal_rank=m.signal_rank,
        energy_rank={k: m.energy_rank[tau] for k, tau in zip(keys, config.thresholds)},
        energy_rank_frac={k: m.energy_rank_frac[tau] for k, tau in zip(keys, config.thresholds)},
        singular_values=[float(s) for s in S[: config.top_k]],
    )


def random_ranks(shape: tuple[int, int], config: DiffConfig) -> dict[str, int]:
    """Threshold key -> energy rank of a Gaussian matrix of ``shape`` (Marchenko–Pastur)."""
    return {threshold_key(tau): random_energy_rank(shape, tau) for tau in config.thresholds}


#: A rank-deficient ΔW (a LoRA's s·B·A, a low-rank full update) is fitted only when at least this many of its
#: eigenvalues are above the spectrum's resolution: below it WeightWatcher's fit is its small-sample one, and on
#: the few nonzero values of a low-rank update it reads an α out of a handful of numbers.
MIN_DELTA_FIT_RANK = 20


def delta_fit_refusal(S_delta: np.ndarray, shape: tuple[int, int], what: str = "ΔW") -> str | None:
    """Why ΔW's eigenvalues are not fitted (the eigenvalues a fit keeps, above the float64 Gram route's
    resolution and above :data:`spectra.esd.EVALS_THRESH`, are fewer than ``p`` and than
    :data:`MIN_DELTA_FIT_RANK`), or None: the same rule for an adapter's factored update and for the merged
    model's dense one (float32 rounding of its stored weights included), so both forms get one answer."""
    S = np.asarray(S_delta, dtype=np.float64).ravel()
    p = min(shape)
    top = float(S.max()) if S.size else 0.0
    # the eigenvalues the fit would keep: above the resolution and above its absolute threshold (a merged
    # model's stored rounding sits below that threshold unless the weights are large; an adapter's zeros do)
    kept = (rank_resolution(top, p) < S) & (EVALS_THRESH < S * S) if top > 0 and np.isfinite(top) else np.zeros(0, bool)
    k = int(np.count_nonzero(kept))
    if k < p and k < MIN_DELTA_FIT_RANK:
        return (f"{what} has only {k} eigenvalues a fit keeps (above {EVALS_THRESH:g} and the resolution of its spectrum): "
                f"too few for a power-law fit (needs {MIN_DELTA_FIT_RANK}, or all p)")
    return None


def esd_entry(shape: tuple[int, int], S_delta: np.ndarray | None, S_base: np.ndarray | None = None,
              S_tuned: np.ndarray | None = None, *, note: str = "",
              rounding: tuple[tuple[float, str], tuple[float, str]] = ((0.0, ""), (0.0, ""))) -> dict:
    """The ``esd`` entry of one ``spectra diff --esd`` result (:attr:`ModuleResult.esd`).

    Args:
        shape: ``(out, in)`` of the matrix.
        S_delta: the full singular values of ΔW (descending, ``p = min(shape)`` of them; float64 numpy),
            or None where ΔW is not fitted (``note`` says why); a rank-deficient one of too low a rank is
            not fitted either (:func:`delta_fit_refusal` adds why to the note).
        S_base, S_tuned: the full singular values of W_base and W_tuned, or None (not available).
        note: why a side is missing; ``""`` when all three are there.
        rounding: ``(level, dtype)`` of W_base and of W_tuned (:func:`spectra.rounding_bulk.weight_rounding`): a side whose median eigenvalue
            is at its storage's rounding level gets no Marchenko–Pastur fit, as in ``spectra esd``, and a note says so.

    Returns:
        ``{"base", "tuned", "delta"}``, each the :meth:`spectra.esd.EsdMetrics.to_dict` of that matrix's
        eigenvalues ``λ = σ²`` (WeightWatcher's default fit) or None, with ``alpha_change`` (α_tuned −
        α_base), ``alpha_change_z`` (:func:`alpha_change`) and ``note``.
    """
    if S_delta is not None and (why := delta_fit_refusal(S_delta, shape)) is not None:
        S_delta, note = None, "; ".join(x for x in (note, why) if x)
    sides = {"ΔW": S_delta, "W_base": S_base, "W_tuned": S_tuned}
    for side, S in sides.items():  # float64 weights near 1e±154: λ = σ² leaves float64 (as spectra esd skips them)
        if S is not None and (why := _squares_refusal(np.asarray(S, dtype=np.float64))) is not None:
            sides[side], note = None, "; ".join(x for x in (note, f"{side} not fitted: {why}") if x)
    fields = esd_fields(sides["ΔW"], sides["W_base"], sides["W_tuned"], shape=shape, rounding=(rounding[0][0], rounding[1][0]))
    for side, key, (level, dtype) in (("W_base", "base", rounding[0]), ("W_tuned", "tuned", rounding[1])):
        S = sides[side]
        if fields[key] is not None and S is not None and (why := rounding_bulk_note(
                np.square(np.asarray(S, dtype=np.float64)), fields[key]["mp_sigma2"], level, dtype)):
            note = "; ".join(x for x in (note, f"{side}: {why}") if x)
    return {"base": fields["base"], "tuned": fields["tuned"], "delta": fields["delta"],
            "alpha_change": fields["alpha_change"], "alpha_change_z": fields["alpha_change_z"], "note": note}


def _squares_refusal(S: np.ndarray) -> str | None:
    """Why the eigenvalues λ = σ² of singular values ``S`` cannot be fitted in float64 (their sum leaves its range,
    the rule of :data:`spectra.esd.GRAM_LIMIT`), or None."""
    top = float(S.max()) if S.size else 0.0
    if not math.isfinite(top) or top * top * S.size >= GRAM_LIMIT:
        return f"Σλ = ‖W‖_F² exceeds {GRAM_LIMIT:.0e}, so the eigenvalues λ = σ² overflow float64; rescale the weights"
    if 0.0 < top <= (1.0 / GRAM_LIMIT / S.size) ** 0.5:  # (top² itself underflows to 0 below ~1e-162)
        return f"Σλ = ‖W‖_F² is below {1.0 / GRAM_LIMIT:.0e}, so the eigenvalues λ = σ² underflow float64; rescale the weights"
    return None


#: The ``esd`` note of a result computed in the approximate mode.
ESD_APPROX_NOTE = ("approximate mode: the power-law fit needs every eigenvalue, which the sketch does not compute "
                   "(raise --approx-above to analyse this matrix exactly)")


def exact_result(item: Prepared, S: np.ndarray, config: DiffConfig, seconds: float,
                 base_sv: list[float] | None = None, tuned_sv: list[float] | None = None,
                 esd: dict | None = None, precision: str | None = None) -> ModuleResult:
    """The result of one matrix from the full spectrum ``S`` of its ΔW (descending, length p); with
    ``--weight-spectra`` the top singular values of W_base and W_tuned, with ``--esd`` its
    :func:`esd_entry`; ``precision``: what solved it (``"float32-certified"``, ``"float64"``…), default
    the configured one."""
    method = f"{config.method}/{precision or config.precision}"  # its resolution cuts signal_rank (float32: the certificate's)
    return ModuleResult(
        **common_fields(item, config), **spectrum_fields(S, item.unit.shape, config, item.base_fro, method),
        method=method, seconds=seconds,
        base_singular_values=base_sv, tuned_singular_values=tuned_sv, esd=esd,
    )


#: The ``esd`` note of a matrix the approximate mode solved exactly (ΔW's spectrum only).
ESD_EXACT_DELTA_NOTE = ("approximate mode: W_base and W_tuned are not decomposed, so only ΔW is fitted (raise "
                        "--approx-above to fit them)")
#: Why an approximated matrix has no ``base_singular_values``/``tuned_singular_values`` under ``--weight-spectra``.
WEIGHTS_APPROX_NOTE = ("weight spectra not computed in the approximate mode (each needs a full decomposition of "
                       "W_base and W_tuned): drop --approx, or raise --approx-above past this matrix's size")


def approx_result(item: Prepared, a: ApproxSpectrum, config: DiffConfig, seconds: float) -> ModuleResult:
    """The result of one matrix the approximate mode measured: estimated ranks with their bounds, or, where the
    sketch grew to p/2 and the whole spectrum was computed instead, the exact result (W's spectra still not)."""
    p = min(item.unit.shape)
    if a.exact:
        res = exact_result(item, a.top, config, seconds, precision="float64",
                           esd=esd_entry(item.unit.shape, a.top, note=ESD_EXACT_DELTA_NOTE) if config.esd else None)
        res.note = "; ".join(n for n in (res.note, "approximate mode: the sketch reached half the matrix's size, so its "
                                         "spectrum was computed exactly", WEIGHTS_APPROX_NOTE if config.weight_spectra else "")
                             if n)
        res.method = "gram/float64"  # what sketch.approx_energy_ranks solved it with, whatever --method says
        return res
    keys = [threshold_key(tau) for tau in config.thresholds]
    # the sketch's values are float32's: σ̂₁ can exceed ‖ΔW‖_F by its rounding (a stable rank below 1); never above it
    top = np.minimum(a.top, a.fro_norm)
    sigma1 = float(top[0]) if top.size else 0.0
    fields = common_fields(item, config)
    fields["note"] = "; ".join(n for n in (fields["note"], "approximate: energy ranks lie within energy_rank_bounds (results.json); "
                                           "nuclear norm, effective and signal rank need the full spectrum",
                                           WEIGHTS_APPROX_NOTE if config.weight_spectra else "") if n)
    return ModuleResult(
        **fields,
        fro_norm=a.fro_norm, rel_norm=relative_norm(a.fro_norm, item.base_fro), spectral_norm=sigma1,
        stable_rank=(a.fro_norm / sigma1) ** 2 if sigma1 > 0 else 0.0, effective_rank=None, nuclear_norm=None,
        signal_rank=None,
        energy_rank={k: a.ranks[tau].estimate for k, tau in zip(keys, config.thresholds)},
        energy_rank_frac={k: a.ranks[tau].estimate / p for k, tau in zip(keys, config.thresholds)},
        energy_rank_bounds={k: [a.ranks[tau].lo, a.ranks[tau].hi] for k, tau in zip(keys, config.thresholds)},
        singular_values=[float(s) for s in top[: config.top_k]],
        method=f"approx/sketch{a.sketch}", seconds=seconds,
        esd=esd_entry(item.unit.shape, None, note=ESD_APPROX_NOTE) if config.esd else None,
    )


def esd_fields(S_delta: np.ndarray | None, S_base: np.ndarray | None = None, S_tuned: np.ndarray | None = None, *,
               shape: tuple[int, int], xmin: XminMethod = "fit", thresh: float = EVALS_THRESH,
               rounding: tuple[float, float] = (0.0, 0.0)) -> dict:
    """The ``esd`` entry of one ``spectra diff --esd`` result: the metrics of ΔW, W_base and W_tuned.

    Args:
        S_delta: singular values of ΔW, descending (what the diff engine returns): all ``p = min(shape)``
            of them, or the nonzero ones of a factored (LoRA) update, the rest being zeros; None: not fitted.
        S_base, S_tuned: full singular values of W_base and W_tuned, or None (not computed).
            All three come from the float64 Gram route, so ranks count only singular values above its
            resolution :func:`spectra.metrics.rank_resolution` (:func:`spectra.esd.matrix_rank`).
        shape: ``(out, in)`` of the matrix; xmin, thresh: see :func:`spectra.esd.power_law_fit`.
        rounding: the storage rounding levels of W_base and W_tuned (:func:`spectra.esd.esd_metrics`'s ``rounding``).

    Returns:
        ``{"delta": {...}, "base": {...} | None, "tuned": {...} | None, "alpha_change": float | None,
        "alpha_change_z": float | None}``, each ``{...}`` an :meth:`EsdMetrics.to_dict`;
        ``alpha_change = α_tuned − α_base`` and ``alpha_change_z`` its size in standard errors
        (:func:`alpha_change`).

    >>> S = np.linspace(3.0, 0.1, 64)
    >>> f = esd_fields(S, S, S, shape=(128, 64))
    >>> f["alpha_change"], f["delta"]["M"]
    (0.0, 64)
    """
    p = min(shape)

    def one(S: np.ndarray | None, level: float = 0.0) -> dict | None:
        if S is None:
            return None
        S = np.asarray(S, dtype=np.float64).ravel()
        if S.size > p:
            raise ValueError(f"a {shape[0]}×{shape[1]} matrix has {p} singular values. Got {S.size} instead.")
        lam = np.concatenate([S**2, np.zeros(p - S.size)])  # the zeros a factored update leaves implicit
        # the diff engine's spectra come from a float64 Gram matrix: below σ₁·√(p·ε) its values are noise
        res = rank_resolution(float(S.max()), p) if S.size and math.isfinite(float(S.max())) else 0.0
        return esd_metrics(lam, shape, xmin=xmin, thresh=thresh, resolution=res, rounding=level).to_dict()

    base, tuned = one(S_base, rounding[0]), one(S_tuned, rounding[1])
    change = alpha_change(base, tuned) if base and tuned else (None, None)
    return {"delta": one(S_delta), "base": base, "tuned": tuned, "alpha_change": change[0], "alpha_change_z": change[1]}


def alpha_change(base: dict, tuned: dict) -> tuple[float | None, float | None]:
    """``(α_tuned − α_base, z)`` with ``z = Δα / sqrt(σ_base² + σ_tuned²)`` from two metric records
    (dicts with ``alpha`` and ``sigma``); ``(None, None)`` when a fit failed, z None when both σ are 0.
    ``|z| > 2`` reads as "fine-tuning moved α beyond its fitting error" (a heuristic: the two fits are
    not independent, and σ_α ignores the choice of xmin)."""
    if base.get("alpha") is None or tuned.get("alpha") is None:
        return None, None
    d = float(tuned["alpha"] - base["alpha"])
    s = math.hypot(base.get("sigma") or 0.0, tuned.get("sigma") or 0.0)
    return d, (d / s if s > 0 else None)
