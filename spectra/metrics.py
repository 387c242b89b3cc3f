"""Spectrum metrics of one matrix from its singular values (docs/definitions.md, "Spectrum metrics").

Pure numpy on float64 arrays; no torch, no I/O. ``S`` is always the full spectrum, descending,
``S.shape == (p,)`` with ``p = min(out, in)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from spectra.checks import check_index, check_number, check_shape, check_tau
from spectra.randmat import gavish_donoho_omega

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.9, 0.99)


def threshold_key(t: float) -> str:
    """JSON key of a threshold, as Python writes ``str(float)`` (docs/definitions.md): 0.9 -> ``"0.9"``."""
    return str(float(t))


def square_scale_exponent(S: np.ndarray) -> int:
    """The power of two ``e`` to divide ``S`` by so that ``σ²`` neither overflows nor underflows: the
    exponent of ``max(S)`` when it lies beyond 2**±256 (float64 updates near 1e200 or 1e-160), else 0
    (ordinary spectra are not touched, so their metrics are bit-identical).

    >>> square_scale_exponent(np.array([1e-160, 0.0])), square_scale_exponent(np.array([3.0]))
    (-531, 0)
    """
    top = float(np.max(S)) if np.size(S) else 0.0
    e = math.frexp(top)[1] if math.isfinite(top) and top > 0.0 else 0
    return e if abs(e) > 256 else 0


#: Largest magnitude (and smallest nonzero one) whose squares, and sums of a few million of them,
#: stay inside float64's range: the limit of measures that form Gram matrices or inner products unscaled.
SQUARING_LIMIT = 2.0**250


def outside_squaring_range(amax: float) -> bool:
    """Whether values of largest magnitude ``amax`` (a matrix's max |entry|, or its σ₁) square outside
    float64's range (:data:`SQUARING_LIMIT`): above ~1e75 or, nonzero, below ~1e-75.

    >>> outside_squaring_range(1e200), outside_squaring_range(1e-200), outside_squaring_range(0.0), outside_squaring_range(3.0)
    (True, True, False, False)
    """
    return amax > SQUARING_LIMIT or 0.0 < amax < 1.0 / SQUARING_LIMIT


def check_energy_range(energy: float, nonzero: bool, name: str) -> None:
    """ValueError when ``energy`` (a sum of squares, e.g. ``‖M‖_F²``) left float64's range: inf or NaN,
    or below ``SQUARING_LIMIT**-2`` (0 included) although ``nonzero`` says the matrix is not zero.
    Measures built on such sums would read 0, inf or NaN (values near 1e±160)."""
    if math.isfinite(energy) and (energy >= SQUARING_LIMIT ** -2 or (energy == 0.0 and not nonzero)):
        return
    if math.isnan(energy):  # NaN in the matrix, not a range problem: no power of two fixes it
        raise ValueError(f"{name} holds NaN: its measures are undefined.")
    raise ValueError(f"{name}'s squared values fall outside float64's range (|values| beyond 2**±250, "
                     f"sum of squares {energy!r}): divide it by a power of two first")


def refuse_meta(x: object, name: str) -> None:
    """ValueError naming ``name`` when ``x`` is a tensor on the meta device (shapes, no values): any measure of
    it would be a meta tensor, or fail deep inside torch."""
    if getattr(x, "is_meta", False):
        raise ValueError(f"{name} is on the meta device (shapes only, no values): load its weights first.")


def host_array(x: object, name: str) -> object:
    """``x`` as numpy can read it: a torch tensor (no torch import here: duck-typed) detached, on the CPU,
    bfloat16/float16 widened to float64 (numpy has no bfloat16); anything else unchanged. A tensor on
    the meta device (shapes, no values) is refused, naming ``name``."""
    if isinstance(x, np.ma.MaskedArray):  # np.asarray drops the mask: the masked values would be counted silently
        raise ValueError(f"{name} is a masked array: pass the values to use ({name}.compressed()) or .filled() ones.")
    if not (hasattr(x, "detach") and hasattr(x, "is_meta")):
        return x
    refuse_meta(x, name)
    t = x.detach().cpu()
    if t.is_complex():
        return t.resolve_conj().numpy()
    return (t.double() if t.is_floating_point() and t.element_size() < 4 else t).numpy()


def as_spectrum(S: np.ndarray, name: str = "S") -> np.ndarray:
    """``S`` as a float64 1-D array of singular values in descending order (sorted when given otherwise,
    e.g. ``sqrt(eigvalsh(G))``, which ascends); ValueError for what no spectrum is: complex, not 1-D,
    NaN or Inf, negative values (whose metrics would be numbers of something else), strings, bools or objects.

    >>> as_spectrum([1.0, 3.0, 2.0]).tolist()
    [3.0, 2.0, 1.0]
    """
    S = host_array(S, name)
    if np.iscomplexobj(S):
        raise ValueError(f"{name} must hold real singular values. Got a complex array instead.")
    S = np.asarray(S)
    if S.dtype.kind not in "iuf":  # strings and bools were read as numbers: ['3', '1'] as 3.0 and 1.0, True as 1.0
        raise ValueError(f"{name} must hold real numbers (singular values). Got numpy dtype {S.dtype} instead.")
    S = S.astype(np.float64, copy=False)
    if S.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of singular values. Got shape {S.shape} instead.")
    if S.size and not (np.isfinite(S).all() and S.min() >= 0.0):
        bad = "NaN or Inf" if not np.isfinite(S).all() else "negative values"
        raise ValueError(f"{name} must hold finite, non-negative singular values. Got {bad} instead.")
    return S if S.size < 2 or bool(np.all(S[:-1] >= S[1:])) else np.sort(S)[::-1].copy()


def fro_norm_of(S: np.ndarray) -> float:
    """``sqrt(Σσᵢ²)``, the squares summed after scaling by :func:`square_scale_exponent` (exact: a
    power of two), so that it is neither inf for σ near 1e200 nor 0 for σ near 1e-160."""
    S = as_spectrum(S)
    e = square_scale_exponent(S)
    return float(np.ldexp(np.sqrt(np.sum(np.ldexp(S, -e) ** 2)), e))


def energy_rank(S: np.ndarray, tau: float) -> int:
    """Smallest k with ``Σ_{i<=k} σᵢ² >= τ · Σ σᵢ²``; 0 for a zero matrix. At τ = 1 the numerical rank
    (:func:`numerical_rank`): the rule would count values too small to change a float64 sum, or not,
    as rounding decides (so the rank at τ = 1 can be below that at τ = 1 − 1e-13).

    This is Biderman et al. 2024's "rank needed to explain τ of the spectrum" (Fig. 6): uncentred,
    on σ², like PCA's explained variance. The cumulative sum runs in float64.

    >>> energy_rank(np.array([3.0, 1.0, 1.0]), 0.9)
    2
    """
    tau = check_tau(tau)
    S = as_spectrum(S)
    if tau == 1.0:
        return numerical_rank(S)
    energy = np.cumsum(np.ldexp(S, -square_scale_exponent(S)) ** 2)  # ranks are scale-free
    if energy.size == 0 or energy[-1] == 0.0:
        return 0
    k = int(np.searchsorted(energy, tau * energy[-1], side="left")) + 1
    return min(k, energy.size)


def rank_resolution(sigma_max: float, p: int) -> float:
    """``σ₁·√(p·ε)`` (ε = 2.2e-16): the smallest singular value the exact float64 Gram route tells from 0
    in a matrix of ``p = min(out, in)`` whose largest is ``sigma_max``; the threshold of :func:`numerical_rank`."""
    return float(sigma_max) * math.sqrt(p * float(np.finfo(np.float64).eps))


#: Unit roundoff of IEEE float32 (round to nearest).
EPS32 = 2.0**-24

#: ``c₀`` of the float32 eigensolver's normwise backward error, ``‖E‖_F <= c₀·√p · u · ‖G‖_F``.
#: LAPACK bounds it by "a modestly growing function of p" times ``u·‖G‖`` (worst case O(p²) for
#: Householder tridiagonalisation, typically O(√p)). Measured (``bench/certified.py``,
#: ``bench/results/certified-cpu.md``): 640 float32 solves, p from 64 to 2048, ten kinds of spectra
#: (Gaussian, power laws, low rank plus noise, exactly low rank, clusters, a ramp, embedding-like
#: columns) and four solvers (scipy's ``evd``, ``evr``, ``ev``, torch's ``eigvalsh``). The largest of
#: ``‖λ̂ − λ‖₂``, ``max |λ̂ᵢ − λᵢ|`` and the partial-sum errors over ``√k``, in units of ``u·‖G‖_F``,
#: grew like √p (7.4 at p = 64, 52 at p = 2048) and stayed below ``1.16·√p``; ``c₀ = 8`` is 6.9× that.
EIG_BACKWARD_C0 = 8.0


def float32_error_bound(gram_fro: float, p: int) -> float:
    """``Δ``: the computed float32 eigenvalues of ``fl32(G)`` (``p × p``) are exact for ``G + E``, ``‖E‖_F <= Δ``.

    ``Δ = (1 + c·(1 + u)) · u · ‖G‖_F`` with ``u = 2⁻²⁴`` and ``c = c₀·√p``, ``c₀`` =
    :data:`EIG_BACKWARD_C0`: rounding G to float32 moves it by at most ``u·‖G‖_F``, and the
    eigensolver's backward error on the rounded matrix is at most ``c·u·‖fl32(G)‖_F <= c·u·(1 + u)·‖G‖_F``.
    Units: those of the eigenvalues (σ²).
    """
    c = EIG_BACKWARD_C0 * math.sqrt(p)
    return (1.0 + c * (1.0 + EPS32)) * EPS32 * gram_fro


def route_resolution(sigma_max: float, p: int, method: str | None = None) -> float:
    """The smallest singular value a route tells from 0 in a matrix of ``p = min(out, in)`` whose largest is
    ``sigma_max``, by its results' ``method``: ``RANK_TOL·σ₁`` for a factored update's exact factors (``factored``),
    ``p·ε·σ₁`` for an SVD of the matrix (``svd/…``), the certified float32 route's error bound ``√Δ`` (``…float32…``,
    about ``σ₁·√(8·√p·ε₃₂)``: its kept values below it may be rounding, which ``signal_rank`` counted and a budget
    bought), and the float64 Gram route's ``σ₁·√(p·ε)`` (:func:`rank_resolution`) for every other (``gram/float64``,
    ``gram-eigh/…``, DoRA's and saved modules' dense updates, sketches). Values at or below it are that route's
    rounding: no direction to count or buy."""
    m = str(method or "")
    if m.startswith("factored"):
        return RANK_TOL * float(sigma_max)
    if "float32" in m:  # the certificate's error bound √Δ (:func:`float32_error_bound`, ‖G‖_F taken as σ₁²)
        return max(math.sqrt(float32_error_bound(float(sigma_max) ** 2, p)), rank_resolution(sigma_max, p))
    if m.startswith("svd"):
        return p * float(np.finfo(np.float64).eps) * float(sigma_max)
    return rank_resolution(sigma_max, p)


def numerical_rank(S: np.ndarray, p: int | None = None) -> int:
    """The energy rank at τ = 1: how many singular values stand above ``σ₁·√(p·ε)`` (ε = 2.2e-16, p =
    ``len(S)`` unless given), the resolution of the exact float64 Gram route, below which a singular
    value cannot be told from 0. (The cumulative-sum rule would stop wherever the σᵢ² too small to
    change a float64 sum begin, a place set by rounding, not by the update.) 0 for a zero matrix.

    >>> numerical_rank(np.array([3.0, 1.0, 1e-9])), numerical_rank(np.array([3.0, 1.0, 1e-6]))
    (2, 3)
    """
    S = as_spectrum(S)
    if S.size == 0:
        return 0
    p = S.size if p is None else check_index(p, "p", S.size, 2**62, " (min(out, in), at least len(S))")
    return int(np.count_nonzero(rank_resolution(float(S.max()), p) < S)) if S.max() > 0 else 0


#: A factored update's singular values (an SVD of its exact factors, accurate to ~1e-15·σ₁) below
#: ``RANK_TOL · σ₁`` count as zero: rounding, not a direction.
RANK_TOL = 1e-10


def factored_rank(S: np.ndarray) -> int:
    """How many of a factored update's singular values ``S`` (a LoRA's ``s·B·A`` from its exact
    factors) stand above ``RANK_TOL · σ₁``: its rank, where :func:`numerical_rank`'s Gram resolution
    (~1e-7·σ₁) would drop real directions. 0 for a zero update.

    >>> factored_rank(np.array([2.0, 1e-9, 1e-12, 0.0]))
    2
    """
    S = as_spectrum(S)
    return int(np.count_nonzero(RANK_TOL * S.max() < S)) if S.size and S.max() > 0 else 0


def resolved_above(S: Iterable[float | None], floor: float | None) -> int | None:
    """How many singular values ``S`` (any order; None entries skipped) stand above a rounding ``floor`` (the
    largest singular value rounding the stored weights can put into ΔW, :func:`spectra.delta.pair_floor`), when
    at least one is at or below it; None when no floor is known (None or <= 0: an older record, an adapter's
    exact factors) or every value stands above it (those beyond the list are then unknown).

    >>> resolved_above([3.0, 1e-3, 1e-9], 1e-8), resolved_above([3.0, 1.0], 1e-8), resolved_above([1.0], None)
    (2, None, None)
    """
    kept = [float(x) for x in S if x is not None]
    if floor is None or not floor > 0 or not any(x <= floor for x in kept):
        return None
    return sum(x > floor for x in kept)


def amplification_factor(delta_fro: float, proj_delta: float) -> float:
    """Hu et al. (2021, Sec. 7.3): ``‖ΔW‖_F / ‖U_rᵀ W V_r‖_F``; 0 when ``ΔW = 0``, inf when only the
    projection is 0. Both norms finite and >= 0, else ValueError naming the argument.

    >>> round(amplification_factor(6.91, 0.32), 1)   # Table 7, GPT-3 W_q, r = 4
    21.6
    """
    # a NaN projection read as inf, a negative norm gave a negative factor
    delta_fro, proj_delta = check_number(delta_fro, "delta_fro", 0.0), check_number(proj_delta, "proj_delta", 0.0)
    if delta_fro == 0.0:
        return 0.0
    return delta_fro / proj_delta if proj_delta > 0.0 else math.inf


def random_projection_rms(w_fro: float, r: int, out: int, in_: int) -> float:
    """``sqrt(E‖UᵀWV‖_F²) = r·‖W‖_F / sqrt(out·in)`` for independent random orthonormal ``U (out, r)``,
    ``V (in, r)``.

    Exact: ``E[UUᵀ] = (r/out)·I`` and ``E[VVᵀ] = (r/in)·I``, so ``E‖UᵀWV‖_F² = r²‖W‖_F²/(out·in)``.
    This is the root mean square; ``E‖UᵀWV‖_F`` itself is slightly smaller (Jensen). docs/definitions.md's
    0.0202 (r = 4) and 0.3227 (r = 64) for GPT-3's ``W_q`` (12288², ‖W‖_F = 61.95) are this value.

    ``w_fro`` finite and >= 0, ``out, in_ >= 1`` and ``1 <= r <= min(out, in_)`` (no r-dimensional orthonormal U or V
    exists past it), else ValueError naming the argument.

    >>> round(random_projection_rms(61.95, 4, 12288, 12288), 4)
    0.0202
    """
    w_fro = check_number(w_fro, "w_fro", 0.0)
    out, in_ = check_index(out, "out", 1, 2**62), check_index(in_, "in_", 1, 2**62)
    r = check_index(r, "r", 1, min(out, in_), " (min(out, in_))")
    return r * w_fro / math.sqrt(out * in_)


def stable_rank(S: np.ndarray) -> float:
    """``Σσᵢ² / σ₁²``; 0 for a zero matrix."""
    S = as_spectrum(S)
    S = np.ldexp(S, -square_scale_exponent(S))  # a ratio: scale-free
    if S.size == 0 or S[0] == 0.0:
        return 0.0
    return float(np.sum(S**2) / S[0] ** 2)


def effective_rank(S: np.ndarray) -> float:
    """Roy & Vetterli (2007): ``exp(−Σ qᵢ ln qᵢ)``, ``qᵢ = σᵢ / Σσⱼ``, ``0·ln 0 = 0``; 0 for a zero matrix.

    >>> round(effective_rank(np.ones(5)), 12)
    5.0
    """
    S = as_spectrum(S)
    S = np.ldexp(S, -square_scale_exponent(S))  # q is scale-free; σ near 1e308 would overflow the sum
    total = S.sum()
    if total == 0.0:
        return 0.0
    q = S[S > 0] / total
    return float(np.exp(-np.sum(q * np.log(q))))


def signal_rank(S: np.ndarray, shape: tuple[int, int], resolution: float | None = None) -> int:
    """Gavish & Donoho (2014) hard threshold for unknown noise: ``#{σᵢ > ω(β)·median(σ)}``, counting only values
    above the route's ``resolution`` too (:func:`route_resolution`; None: the Gram route's ``σ₁·√(p·ε)``): where the
    median lies under it (an exactly rank-1 update: values 2e-9 … 3e-8 of σ₁ that are that route's rounding), the
    rule counted the rounding.

    ``β = p / max(out, in)``. A Gaussian-noise matrix gives about 0; a rank-r signal well above the
    noise gives r. ``S``: all ``p = min(out, in)`` singular values, any order (the median needs every one).

    >>> signal_rank(np.array([3.0, 3e-8, 2e-8, 1e-12, 1e-12, 1e-12, 1e-12]), (7, 7))  # (3 by the median rule alone)
    1
    """
    S = as_spectrum(S)
    shape = check_shape(shape)
    if S.size != min(shape):  # more: (0, 0) divided by zero below; fewer: the median of a truncated spectrum is no noise level
        raise ValueError(f"S holds {S.size} values, {'more' if S.size > min(shape) else 'fewer'} than min(out, in) of shape {shape}: "
                         f"pass all {min(shape)} singular values and the matrix's shape.")
    if S.size == 0:
        return 0
    beta = min(shape) / max(shape)
    res = rank_resolution(float(S.max()), S.size) if resolution is None else check_number(resolution, "resolution", 0.0)
    return int(np.sum(max(gavish_donoho_omega(beta) * np.median(S), res) < S))


def relative_norm(fro: float, base_fro: float) -> float | None:
    """``‖ΔW‖_F / ‖W_base‖_F``; 0 for a zero update, None (not NaN/inf, not a silent 0) when only the
    base is zero or either norm is not finite (float64 weights whose norm overflowed). A negative norm is a ValueError."""
    for name, v in (("fro", fro), ("base_fro", base_fro)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a norm (a number >= 0). Got {v!r} instead.")
        if v < 0:  # no norm: its ratio would be a negative "relative norm"
            raise ValueError(f"{name} must be a norm (>= 0). Got {v!r} instead.")
    if not (math.isfinite(fro) and math.isfinite(base_fro)):
        return None
    if base_fro > 0:
        return fro / base_fro
    return 0.0 if fro == 0 else None


def oversized_update(rels: Iterable[float | None]) -> tuple[float, bool] | None:
    """``(median, all_one)`` when the ``‖ΔW‖_F / ‖W_base‖_F`` of the changed matrices (``rels``; None, 0 and non-finite
    ones left out) say the update is no fine-tune of this base, else None: a median above 1 (a fine-tune moves a
    matrix by a fraction of its norm; two independent initialisations give about √2), or every ratio 1 to 6 digits
    (``all_one``: ΔW = −W_base, what a tuned checkpoint of all-zero weights gives, e.g. a preallocated file that never
    got its data). ``diff``, ``compare``, ``trace`` and ``interfere`` warn of it (:func:`spectra.display.oversized_words`)."""
    x = [r for r in rels if r and math.isfinite(r)]
    if not x:
        return None
    med = float(np.median(x))
    one = all(abs(r - 1.0) < 1e-6 for r in x)
    return (med, one) if one or med > 1.0 else None


@dataclass(frozen=True)
class SpectrumMetrics:
    """Every docs/definitions.md metric of one matrix that needs only its spectrum.

    Attributes:
        p: ``min(out, in)``.
        fro_norm: ``sqrt(Σσᵢ²)``.
        spectral_norm: ``σ₁``.
        nuclear_norm: ``Σσᵢ``.
        stable_rank: ``Σσᵢ² / σ₁²``.
        effective_rank: Roy & Vetterli entropy rank.
        energy_rank: threshold -> energy rank.
        energy_rank_frac: threshold -> energy rank / p.
        signal_rank: Gavish–Donoho count.
    """

    p: int
    fro_norm: float
    spectral_norm: float
    nuclear_norm: float
    stable_rank: float
    effective_rank: float
    energy_rank: dict[float, int]
    energy_rank_frac: dict[float, float]
    signal_rank: int


def spectrum_metrics(S: np.ndarray, shape: tuple[int, int], thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                     method: str | None = None) -> SpectrumMetrics:
    """All spectrum metrics of a matrix of ``shape`` with singular values ``S`` (length p, any order), computed by the
    route ``method`` names (:func:`route_resolution`; None: the float64 Gram route)."""
    S = as_spectrum(S)
    shape = check_shape(shape)
    p = min(shape)
    if S.shape != (p,):
        raise ValueError(f"S must have shape ({p},) for a {shape} matrix. Got {S.shape} instead.")
    res = route_resolution(float(S.max()), p, method) if p else None
    # τ = 1: the numerical rank, or the values above a coarser route's resolution (a certified float32 spectrum's)
    tau1 = int(np.count_nonzero(max(res, rank_resolution(float(S.max()), p)) < S)) if p and S.max() > 0 else 0
    ranks = {float(t): energy_rank(S, t) if t != 1.0 else tau1 for t in thresholds}
    return SpectrumMetrics(
        p=p,
        fro_norm=fro_norm_of(S),
        spectral_norm=float(S[0]) if p else 0.0,
        nuclear_norm=float(S.sum()),
        stable_rank=stable_rank(S),
        effective_rank=effective_rank(S),
        energy_rank=ranks,
        energy_rank_frac={t: (k / p if p else 0.0) for t, k in ranks.items()},
        signal_rank=signal_rank(S, shape, res),
    )


def log10_power_sum(x: np.ndarray, a: float) -> float | None:
    """``log10 Σ xᵢ^a`` of non-negative ``x`` ``(n,)`` (float64) and ``a > 0``, computed as
    ``a·log10 x_max + log10 Σ (xᵢ/x_max)^a`` so that a sum beyond float64's range (``a·log10 x_max`` past
    ±308: a large α, or weights of large or small scale) is still a number; None when every x is 0, or a
    value is not finite.

    Example:
        >>> round(log10_power_sum(np.array([1000.0, 1001.0]), 501.25), 4)
        1504.1733
    """
    if isinstance(a, (int, float, np.integer, np.floating)) and not isinstance(a, (bool, np.bool_)) and a <= 0:
        raise ValueError(f"a must be > 0 (a power of 0 is 1, a negative one infinite). Got {a!r} instead.")
    x = np.asarray(x, dtype=np.float64)
    top = float(np.max(x, initial=0.0))
    if not (top > 0.0 and math.isfinite(top) and math.isfinite(a) and np.isfinite(x).all()):
        return None
    return a * math.log10(top) + math.log10(float(np.sum((x[x > 0] / top) ** a)))


def normal_float32(x: float) -> bool:
    """Whether ``x`` is a normal float32 magnitude, ``1.18e-38 <= x <= 3.4e38``: a LoRA scale (lora_alpha / r) that
    PEFT applies in float32 outside it flushes to 0 (the adapter adds nothing) or overflows.

    >>> normal_float32(2.0), normal_float32(1e-320), normal_float32(1e39)
    (True, False, False)
    """
    info = np.finfo(np.float32)
    return float(info.tiny) <= x <= float(info.max)
