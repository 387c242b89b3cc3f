"""Heavy-tailed metrics of one empirical spectral density (ESD): WeightWatcher's power-law fit and the
norm metrics beside it, a Marchenko–Pastur bulk fit, from the eigenvalues ``λᵢ = σᵢ²`` of one weight
matrix ``W`` of shape ``(out, in)`` (the eigenvalues of ``WᵀW`` or ``WWᵀ``, whichever is smaller, *not*
divided by ``N`` — WeightWatcher's convention). Pure numpy in float64; no torch, no I/O.

The heavy-tailed self-regularisation (HT-SR) theory of Martin & Mahoney (JMLR 2021, "Implicit
self-regularization in deep neural networks"; Nature Communications 2021, "Predicting trends in the
quality of state-of-the-art neural networks without access to training or testing data") fits the
upper tail of the ESD with a power law ``p(λ) ∝ λ^(−α)`` for ``λ ≥ xmin``. Each function that mirrors
``weightwatcher`` 0.7.7 names the function it mirrors; the numbers agree with it to ~1e-12 relative on
the same eigenvalues (``tests/test_esd.py``).

Where this module departs from WeightWatcher, deliberately:

- A failed fit gives ``None`` (JSON ``null``), not WeightWatcher's sentinel ``-1`` (whose ``-1 < 2`` makes
  WeightWatcher flag every failed layer "over-trained"); no warning is given for a failed fit.
- A fit whose α is not finite (a tail of equal eigenvalues, where WeightWatcher's MLE divides by 0)
  is reported as failed, not as ``inf``; so is one with α above :data:`ALPHA_TIE` (10⁶): its tail's
  eigenvalues are equal within a millionth (ten equal values stored in float32 differ by its
  rounding, ~1e-8, and WeightWatcher gives α = 2e8 and "under-trained" where an exact tie fails).
- ``xmin="peak"``: WeightWatcher 0.7.7's ``fix_fingers="xmin_peak"`` fails on every layer (with its
  default ``pl_package="ww"``, ``WWFit`` receives the ``(lo, hi)`` range as one xmin and raises a
  broadcasting error; with ``pl_package="powerlaw"``, powerlaw 2.x refuses the ``distribution``
  keyword). This module follows the published implementation of the same idea that runs, TempBalance's
  ``net_esd_estimator`` (Zhou et al., NeurIPS 2023; also AlphaPruning, Lu et al., NeurIPS 2024): the same
  histogram peak and range as WeightWatcher's ``fit_powerlaw``, and ``WWFit``'s α and KS distance.
- ``xmin="mid"`` is not in WeightWatcher; it is TempBalance's ``fix_fingers="xmin_mid"`` (``xmin`` the
  median eigenvalue, Xiao et al. 2023, "Heavy-tailed regularization of weight matrices in deep neural
  networks").
- :func:`esd_metrics` also drops eigenvalues at or below ``λ_max·M·ε`` (ε of float64), the rounding level of
  the float64 eigensolver that computed them, from the fit: a rank-deficient matrix of large scale (weights
  near 1e19 and beyond) would otherwise fit its rounding noise, which WeightWatcher's absolute threshold
  lets through. Below ``λ_max ≈ 1e8`` the absolute threshold is the larger, and nothing changes.
- The Marchenko–Pastur fit is this module's own (:func:`mp_bulk_fit`), not WeightWatcher's kernel
  density fit (``RMT_Util.fit_density_with_range``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from spectra.checks import check_index, check_number, check_shape
from spectra.metrics import as_spectrum, host_array, log10_power_sum
from spectra.randmat import mp_median

XminMethod = Literal["fit", "peak", "mid"]
XMIN_METHODS: tuple[str, ...] = ("fit", "peak", "mid")

#: ``‖W‖_F²`` at or above this is refused (skipped with the reason): the Gram matrix's entries and the
#: eigenvalues λ = σ² would overflow float64 (max ≈ 1.8e308) in the decomposition; at or below its inverse they
#: underflow (subnormals, then 0).
GRAM_LIMIT = 1e300
#: Eigenvalues at or below this are dropped before the power-law fit (WeightWatcher's ``EVALS_THRESH``
#: in ``constants.py``, applied as ``evals[evals > thresh]`` in ``WeightWatcher.fit_powerlaw``). It is an
#: absolute threshold, as WeightWatcher's: a matrix whose whole spectrum is below it has no fit.
EVALS_THRESH = 1e-5
#: ``WW_powerlaw.SMALL_N_CUTOFF``: fewer eigenvalues than this use WWFit's small-sample fit.
SMALL_N_CUTOFF = 20
#: ``k_min`` of ``WWFit.fit_powerlaw_smallN``: the smallest tail it fits.
SMALL_N_MIN_TAIL = 8
#: ``constants.OVER_TRAINED_THRESH`` and ``UNDER_TRAINED_THRESH``: α below 2 is "over-trained", above 6
#: "under-trained" (Martin & Mahoney: well-trained layers have 2 ≤ α ≤ 6).
OVER_TRAINED_ALPHA = 2.0
UNDER_TRAINED_ALPHA = 6.0
#: ``constants.EPSILON`` as ``RMT_Util.matrix_entropy`` uses it on a CPU (on CUDA WeightWatcher uses 6e-5).
ENTROPY_EPSILON = 1e-10
#: ``constants.WEAK_RANK_LOSS_TOLERANCE``: eigenvalues below it count toward ``weak_rank_loss``.
WEAK_RANK_LOSS_TOLERANCE = 1e-6
#: Histogram bins of ``log10 λ`` used to find the ESD's peak (``fit_powerlaw``, ``num_bins = 100``).
PEAK_BINS = 100
#: 99th percentile of the Tracy–Widom law (β = 1; Johnstone 2001, Table 1 gives 0.99 → 2.02), the margin
#: above the Marchenko–Pastur edge beyond which an eigenvalue counts as a spike.
TW1_Q99 = 2.0234


def alpha_text(alpha: float | None, decimals: int = 2) -> str:
    """α with ``decimals`` decimals, more when rounding would put it on the other side of a band edge
    (α = 1.997, flagged over-trained, read "2.00"); "–" for None.

    >>> alpha_text(3.14159), alpha_text(1.99697), alpha_text(6.0004), alpha_text(None)
    ('3.14', '1.997', '6.0004', '–')
    """
    if alpha is None:
        return "–"
    for d in range(decimals, 10):
        text = f"{alpha:.{d}f}"
        if all((float(text) < edge) == (alpha < edge) and (float(text) > edge) == (alpha > edge)
               for edge in (OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA)):
            return text
    return f"{alpha!r}"

#: Elements of one block of the KS-distance computation (candidates × tail); bounds its memory (~16 MiB
#: per temporary) whatever the matrix size.
_KS_BLOCK = 1 << 21


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit ``p(λ) ∝ λ^(−α)``, ``λ ≥ xmin``, of the eigenvalues above the threshold.

    Attributes:
        alpha: the exponent α (None when the fit failed).
        D: Kolmogorov–Smirnov distance of the fit at the chosen xmin (WeightWatcher's form, see
            :func:`candidate_fits`).
        xmin: the chosen lower end of the tail (an eigenvalue).
        xmax: the largest eigenvalue fitted.
        sigma: standard error of α, ``(α − 1) / sqrt(n_tail)`` (Clauset et al. 2009, Eq. 3.2), at the
            chosen xmin: it leaves out the search over xmin, so actual errors run wider (on Pareto
            samples, median |α̂ − α| / σ is about 1.2 where 0.67 would be exact; ``tests/test_esd.py``).
        n_fit: eigenvalues above the threshold (the fitted data).
        n_tail: eigenvalues in the tail, ``λ ≥ xmin`` among the fitted ones.
        method: ``"fit"``, ``"peak"`` or ``"mid"`` (how xmin was chosen).
        branch: ``"standard"``; ``"small_n"`` (WWFit's bias-corrected fit for fewer than
            :data:`SMALL_N_CUTOFF` eigenvalues); ``"failed"``.
        reason: why the fit failed; empty otherwise.
    """

    alpha: float | None
    D: float | None
    xmin: float | None
    xmax: float | None
    sigma: float | None
    n_fit: int
    n_tail: int
    method: str
    branch: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.alpha is not None

    @property
    def warning(self) -> str:
        """``"over-trained"`` (α < 2), ``"under-trained"`` (α > 6) or ``""`` (``fit_powerlaw``'s rule)."""
        return training_warning(self.alpha)


def training_warning(alpha: float | None) -> str:
    """WeightWatcher's warning for α (``WeightWatcher.fit_powerlaw``); ``""`` for a failed fit."""
    if alpha is None:
        return ""
    if alpha < OVER_TRAINED_ALPHA:
        return "over-trained"
    if alpha > UNDER_TRAINED_ALPHA:
        return "under-trained"
    return ""


def _failed(method: str, n_fit: int, reason: str, xmax: float | None = None) -> PowerLawFit:
    return PowerLawFit(None, None, None, xmax, None, n_fit, 0, method, "failed", reason)


def _ks_distances(x: np.ndarray, alphas: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``D_i = max_{j ≥ i} |1 − (x_j / x_i)^(1 − α_i) − (j − i)/n_i|``, ``n_i = N − i``, for each candidate
    index ``i`` in ``rows`` (ascending); 1 where ``α_i ≤ 1`` or is NaN (as WWFit leaves them).

    ``x``: ``(N,)`` float64, ascending. O(N²) work in all, done in blocks of consecutive candidates
    against their common tail (bounded memory, no Python loop per candidate). The power is taken as
    ``exp((1 − α)(ln x_j − ln x_i))``: it differs from WWFit's ``(x_j/x_i) ** (1 − α)`` by rounding only
    (~1e-15 absolute in the CDF).
    """
    N = x.size
    out = np.ones(rows.size)
    valid = alphas > 1.0
    logx = np.log(x)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        start = 0
        while start < rows.size:
            # narrow blocks waste little on the j < i triangle; wide enough to amortise numpy's overhead
            T = N - int(rows[start])
            stop = min(rows.size, start + max(1, min(256, _KS_BLOCK // max(T, 1))))
            sel = valid[start:stop]
            if sel.any():
                i = rows[start:stop][sel]
                a = alphas[start:stop][sel]
                i0 = int(i[0])
                inv_n = 1.0 / (N - i).astype(np.float64)
                E = np.subtract.outer(-logx[i], -logx[i0:])  # (b, T): ln x_j − ln x_i
                E *= (1.0 - a)[:, None]
                if np.isinf(a).any():  # a tail of equal values (α = ∞): (x_j/x_i)^(−∞) is 1 at a tie, as WWFit's
                    E[np.isnan(E)] = 0.0  # power gives, not NaN (a NaN D would win np.argmin)
                np.exp(E, out=E)  # (x_j / x_i)^(1 − α): the fitted CCDF, so 1 − E is the fitted CDF
                # 1 − E − (j − i)/n, with (j − i)/n = (j − i0)/n − (i − i0)/n
                np.subtract((1.0 + (i - i0) * inv_n)[:, None], E, out=E)
                E -= np.multiply.outer(inv_n, np.arange(N - i0, dtype=np.float64))
                np.abs(E, out=E)
                w = int(i[-1] - i0)
                if w:  # the columns j < i of each row are not in its tail
                    E[:, :w][np.arange(w)[None, :] < (i - i0)[:, None]] = 0.0
                res = out[start:stop]
                res[sel] = E.max(axis=1)
            start = stop
    return out


def candidate_fits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """α and KS distance D of every candidate ``xmin = x_i``, ``i = 0 … N−2`` (every eigenvalue but the
    largest), as ``WW_powerlaw.WWFit.fit_power_law_standard`` computes them.

    With ``n = N − i`` eigenvalues in the tail (``x_i`` included):
    ``α_i = 1 + n / Σ_{j≥i} ln(x_j / x_i)`` (the continuous power-law MLE, Clauset et al. 2009, Eq. 3.1)
    and ``D_i = max_{j≥i} |1 − (x_j/x_i)^(1−α_i) − (j − i)/n|``: the fitted CDF against the empirical CDF
    ``(j − i)/n`` *before* each point (``0, 1/n, …, (n−1)/n``), WeightWatcher's one-sided form.

    Args:
        x: ``(N,)`` positive eigenvalues, float64, ascending, N ≥ 2.

    Returns:
        ``(alphas, Ds)``, each ``(N − 1,)`` float64. α is ``inf`` for a tail of equal eigenvalues.

    >>> a, d = candidate_fits(np.array([1.0, 2.0, 4.0]))
    >>> [round(float(v), 6) for v in a]
    [2.442695, 3.88539]
    """
    x = np.asarray(x, dtype=np.float64)
    N = x.size
    logx = np.log(x)
    # Σ_{j≥i} ln x_j, summed from the end so that short tails carry only their own rounding
    suffix = np.cumsum(logx[::-1])[::-1]
    n = (N - np.arange(N - 1)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / (suffix[:-1] - n * logx[:-1])
    return alphas, _ks_distances(x, alphas, np.arange(N - 1))


def _small_n_fit(x: np.ndarray) -> PowerLawFit | None:
    """``WWFit`` on fewer than :data:`SMALL_N_CUTOFF` eigenvalues (``fit_powerlaw_smallN`` followed by
    ``WWFit.__init__``'s ``argmin(Ds)``, which overrides the small-N objective's choice).

    The tail estimate is bias-corrected, ``α = 1 + (n − 1) / Σ ln(x_j / x_i)``; candidates with a tail
    shorter than :data:`SMALL_N_MIN_TAIL` or a degenerate one keep ``α = 0, D = 1``; when none is left the
    whole sample is fitted as one tail. Returns None where WeightWatcher's fit fails (N < 2) and where
    every eigenvalue is equal (WeightWatcher's α = 0 there would flag the matrix over-trained).
    """
    N = x.size
    if N < 2:
        return None
    logx = np.log(x)
    alphas = np.zeros(N - 1)
    Ds = np.ones(N - 1)

    def ks(i: int, alpha: float) -> float:
        n = N - i
        return float(np.max(np.abs(np.arange(n) / float(n) - (1.0 - (x[i:] / x[i]) ** (1.0 - alpha)))))

    any_candidate = False
    for i in range(N - 1):
        n = N - i
        if n < SMALL_N_MIN_TAIL:
            continue
        s = float(np.sum(logx[i:]) - n * logx[i])
        if s <= 1e-12:
            continue
        alphas[i] = 1.0 + (n - 1.0) / s
        if alphas[i] <= 1.0:
            continue
        Ds[i] = ks(i, alphas[i])
        any_candidate = True
    if not any_candidate:  # fit_powerlaw_smallN's fallback: the whole sample as the tail
        s = float(np.sum(logx) - N * logx[0])
        if s <= 1e-12:  # every eigenvalue equal: no tail (WWFit's α = 0 here would read as over-trained)
            return None
        alphas[0] = 1.0 + (N - 1.0) / s
        Ds[0] = ks(0, alphas[0])
    i = int(np.argmin(Ds))
    n_tail = N - i
    alpha = float(alphas[i])
    return PowerLawFit(alpha, float(Ds[i]), float(x[i]), float(x[-1]), (alpha - 1.0) / math.sqrt(n_tail), N, n_tail,
                       "fit", "small_n")


def peak_xmin_range(x: np.ndarray) -> tuple[float, float]:
    """The ``(lo, hi)`` xmin range around the ESD's peak, as ``WeightWatcher.fit_powerlaw`` computes it
    for ``fix_fingers="xmin_peak"``.

    The peak is the left edge ``p`` of the fullest of 100 equal bins of ``log10 λ``; the range is
    ``(log10(0.95·p), 1.5·p)``. The lower end is a *logarithm* compared with eigenvalues (WeightWatcher's
    and TempBalance's code both do this): it is always below ``p``, so in effect the range is every
    eigenvalue from ``log10(0.95·p)`` up to ``1.5·p``. Kept as published, so that results compare.

    Args:
        x: ``(N,)`` positive eigenvalues, float64, ascending.
    """
    try:
        counts, edges = np.histogram(logs := np.log10(x), bins=PEAK_BINS)
        peak = 10.0 ** edges[int(np.argmax(counts))]
    except ValueError:  # values equal but for rounding (an orthogonal W): too narrow for 100 distinct edges, one bin
        peak = 10.0 ** float(logs.min())
    return float(np.log10(0.95 * peak)), float(1.5 * peak)


def as_eigenvalues(evals: np.ndarray | Sequence[float], name: str = "evals") -> np.ndarray:
    """``evals`` (eigenvalues ``λ = σ²`` of ``WᵀW``, any order; a numpy array, a sequence or a tensor) as a
    float64 1-D array, ascending, validated: ValueError for complex, NaN or Inf values, and for negative
    ones beyond rounding. A symmetric eigensolver's rounding of ``WᵀW`` (``np.linalg.eigvalsh``) leaves
    the zero eigenvalues of a rank-deficient W at about ``±p·ε·λ_max``: those are clipped to 0, what they
    stand for (a square root of them would be NaN, and a negative λ is no eigenvalue of a Gram matrix).

    >>> as_eigenvalues([4.0, -1e-17, 1.0]).tolist()
    [0.0, 1.0, 4.0]
    """
    lam = host_array(evals, name)
    if np.iscomplexobj(lam):
        raise ValueError(f"{name} must be real eigenvalues of WᵀW. Got a complex array instead.")
    given = np.asarray(lam)
    if given.dtype.kind not in "iuf":  # strings and bools read as numbers: ['3', '1'] as 3.0, True as 1.0
        raise ValueError(f"{name} must hold real numbers (eigenvalues of WᵀW). Got numpy dtype {given.dtype} instead.")
    if given.ndim != 1:  # a matrix flattened would be read as p² eigenvalues
        raise ValueError(f"{name} must be a 1-D array of eigenvalues. Got shape {given.shape} instead.")
    # the precision the eigenvalues were computed in (float32 eigvalsh rounds at ~1e-7·λ_max, not 1e-16); no solver
    # works in float16: its values were computed in float32 at least and rounded once when stored
    eps = float(np.finfo(given.dtype).eps) if given.dtype.kind == "f" else float(np.finfo(np.float64).eps)
    stored = max(0.0, eps - float(np.finfo(np.float32).eps))
    eps = min(eps, float(np.finfo(np.float32).eps))
    lam = np.sort(given.astype(np.float64))
    if lam.size and not np.isfinite(lam).all():
        raise ValueError(f"{name} must be finite. Got NaN or Inf instead.")
    if lam.size and lam[0] < 0.0:
        # the rounding of an eigensolver of a p × p Gram matrix: a few p·ε·λ_max (64× as margin)
        tol = (64.0 * lam.size * eps + stored) * max(float(lam[-1]), 0.0)
        if lam[0] < -tol:
            raise ValueError(f"{name} must be eigenvalues of WᵀW (non-negative, or negative only by rounding, "
                             f"above -{tol:.1e}). Got {lam[0]:.6g} instead.")
        lam = np.clip(lam, 0.0, None)
    return lam


#: α above this is a tail of eigenvalues equal within about 1/α (a tie split by rounding), not a power
#: law: reported as a failed fit, as an exact tie is (heavy-tailed fits of trained weights give α < 10).
ALPHA_TIE = 1e6
_TIE_REASON = (f"α above {ALPHA_TIE:.0e}: the tail's eigenvalues are equal within a millionth (a tie split by "
               "rounding), not a power law")
#: The failed fit's reason of a matrix whose eigenvalues are all zero.
ZERO_REASON = "the matrix is exactly zero (every eigenvalue 0)"

def power_law_fit(evals: np.ndarray | Sequence[float], *, xmin: XminMethod = "fit",
                  thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Fit ``p(λ) ∝ λ^(−α)`` to the upper tail of an ESD.

    The eigenvalues above ``thresh`` are kept (``fit_powerlaw``: ``evals[evals > thresh]``), then:

    - ``xmin="fit"`` (WeightWatcher's default, ``WW_powerlaw.WWFit``): every kept eigenvalue but the
      largest is tried as xmin (:func:`candidate_fits`); the one with the smallest D wins (the first on
      a tie, as ``np.argmin``). With fewer than 20 eigenvalues, WWFit's small-sample fit.
    - ``xmin="peak"``: the same, restricted to candidates within :func:`peak_xmin_range`.
    - ``xmin="mid"``: ``xmin`` is the kept eigenvalue at index ``N // 2`` (at most ``N − 2``).

    Args:
        evals: eigenvalues ``λ = σ²`` of one matrix, any order, ``(p,)``.
        xmin: how xmin is chosen (above).
        thresh: eigenvalues ``≤ thresh`` are dropped (absolute, as WeightWatcher): a finite number >= 0.

    Returns:
        A :class:`PowerLawFit`; ``alpha`` is None (with ``reason``) when fewer than 2 eigenvalues are
        above the threshold, or α is not finite.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> lam = (1.0 - rng.random(4000)) ** (-1 / 1.5)   # Pareto tail: p(λ) ∝ λ^(−2.5), λ ≥ 1
        >>> fit = power_law_fit(lam)
        >>> abs(fit.alpha - 2.5) < 3 * fit.sigma
        True
    """
    if xmin not in XMIN_METHODS:
        raise ValueError(f"xmin must be one of {XMIN_METHODS}. Got {xmin!r} instead.")
    thresh = check_number(thresh, "thresh", 0.0)  # "1e-5" failed inside numpy's comparison
    lam = as_eigenvalues(evals)
    x = lam[lam > thresh]
    N = x.size
    xmax = float(x[-1]) if N else None
    if N < 2:
        return _failed(xmin, N, ZERO_REASON if not lam.any() else
                       f"{N} eigenvalue(s) above {thresh:g}; a power-law fit needs at least 2", xmax)
    if xmin == "fit" and N < SMALL_N_CUTOFF:
        fit = _small_n_fit(x)
        if fit is None or not math.isfinite(fit.alpha):  # N >= 2 here: every eigenvalue equal
            return _failed(xmin, N, "α is not finite (equal eigenvalues in the tail)", xmax)
        if fit.alpha > ALPHA_TIE:
            return _failed(xmin, N, _TIE_REASON, xmax)
        return fit
    if xmin == "mid":
        i = min(N // 2, N - 2)
        rows = np.array([i])
        n = float(N - i)
        with np.errstate(divide="ignore"):
            alphas = np.array([1.0 + n / (np.sum(np.log(x[i:])) - n * np.log(x[i]))])
        Ds = _ks_distances(x, alphas, rows)
        best = 0
    else:
        alphas, Ds = candidate_fits(x)
        rows = np.arange(N - 1)
        if xmin == "peak":
            lo, hi = peak_xmin_range(x)
            keep = (x[:-1] >= lo) & (x[:-1] <= hi)
            if not keep.any():
                return _failed(xmin, N, f"no eigenvalue in the peak range [{lo:.4g}, {hi:.4g}]", xmax)
            rows, alphas, Ds = rows[keep], alphas[keep], Ds[keep]
        best = int(np.argmin(Ds))
    i, alpha = int(rows[best]), float(alphas[best])
    if not math.isfinite(alpha) or alpha <= 1.0:
        return _failed(xmin, N, "α is not finite (equal eigenvalues in the tail)", xmax)
    if alpha > ALPHA_TIE:
        return _failed(xmin, N, _TIE_REASON, xmax)
    n_tail = N - i
    return PowerLawFit(alpha, float(Ds[best]), float(x[i]), xmax, (alpha - 1.0) / math.sqrt(n_tail), N, n_tail,
                       xmin, "standard")


@dataclass(frozen=True)
class MPFit:
    """A Marchenko–Pastur fit of the bulk of an ESD (see :func:`mp_bulk_fit`).

    Attributes:
        sigma2: the fitted element variance s² of the noise bulk.
        bulk_min, bulk_max: the MP edges ``s²(√N ∓ √M)²`` (eigenvalue units, not divided by N).
        spike_threshold: eigenvalues above this count as spikes (``bulk_max`` plus the Tracy–Widom
            99% margin).
        num_spikes: eigenvalues above ``spike_threshold``.
        softrank: ``bulk_max / λ_max`` (Martin & Mahoney's MP soft rank, ``mp_softrank``).
    """

    sigma2: float
    bulk_min: float
    bulk_max: float
    spike_threshold: float
    num_spikes: int
    softrank: float


def mp_bulk_fit(evals: np.ndarray | Sequence[float], shape: tuple[int, int], *, zero_at: float = 0.0) -> MPFit | None:
    """Fit the Marchenko–Pastur law to the bulk of an ESD and count the spikes above it.

    If ``W`` (N × M, N ≥ M) had i.i.d. entries of variance s², the eigenvalues of ``WᵀW`` would fill
    ``[s²(√N − √M)², s²(√N + √M)²]`` with median ``s²·N·μ(M/N)``, μ the Marchenko–Pastur median
    (:func:`spectra.randmat.mp_median`). Steps:

    1. ``s² = median(λ) / (N·μ(M/N))``: Gavish & Donoho's (2014, Sec. III-E) noise estimate. A rank-k
       structure moves each eigenvalue by at most k places (Weyl's interlacing), so the median, and the
       estimate, barely move while k ≪ M (measured: +0.8% with 5 strong spikes at 1200 × 600).
    2. Spikes: eigenvalues above ``s²[(√N' + √M)² + 2.02·(√N' + √M)(1/√N' + 1/√M)^(1/3)]``, N' = N − 1,
       the 99th percentile of the largest eigenvalue of pure noise of known s² (Johnstone 2001, Tracy–Widom β = 1);
       with s² estimated from the same eigenvalues, 3-8% of Gaussian matrices of 16 to 128 rows show a spike.

    This is not WeightWatcher's fit (a kernel-density brute-force search, ``RMT_Util.fit_density_with_range``),
    whose σ is in rescaled units; ``tests/test_esd.py`` checks this one on planted spiked Wishart matrices.

    Args:
        evals: all ``M = min(shape)`` eigenvalues ``λ = σ²`` (zeros included), any order.
        shape: ``(out, in)`` of the matrix, two whole numbers >= 0 (ValueError otherwise, or when ``evals`` does not hold ``M``).
        zero_at: eigenvalues at or below this are zero (the solver's rounding level).

    Returns:
        An :class:`MPFit`, or None when ``min(shape) < 2`` or the median eigenvalue is 0: a matrix of rank
        at most M/2 has no noise bulk to fit (its "median" would be rounding noise, and every
        eigenvalue above it a spike).
    """
    lam, shape = as_eigenvalues(evals), check_shape(shape)
    zero_at = check_number(zero_at, "zero_at", 0.0)  # a NaN zero level read every bulk as none
    N, M = max(shape), min(shape)
    if lam.size != M:  # the top eigenvalues alone: their median is no bulk's (σ² 2.4 where the full ESD gives 0.99)
        raise ValueError(f"evals must hold min(shape) = {M} eigenvalues. Got {lam.size} instead.")
    if M < 2 or not float(np.median(lam)) > zero_at:
        return None
    mu = mp_median(M / N)
    n1 = max(N - 1, 1)
    edge_tw = (math.sqrt(n1) + math.sqrt(M)) ** 2 + TW1_Q99 * (math.sqrt(n1) + math.sqrt(M)) * (1 / math.sqrt(n1) + 1 / math.sqrt(M)) ** (1 / 3)

    s2 = float(np.median(lam)) / (N * mu)
    k = int(np.count_nonzero(lam > s2 * edge_tw))
    bulk_max = s2 * (math.sqrt(N) + math.sqrt(M)) ** 2
    return MPFit(sigma2=s2, bulk_min=s2 * (math.sqrt(N) - math.sqrt(M)) ** 2, bulk_max=bulk_max,
                 spike_threshold=s2 * edge_tw, num_spikes=k, softrank=bulk_max / float(lam[-1]))


@dataclass(frozen=True)
class EsdMetrics:
    """Everything :func:`esd_metrics` reports for one matrix; field names follow WeightWatcher's
    ``analyze()`` columns where one exists, so a user can switch.

    Attributes:
        N, M: ``max(shape)``, ``min(shape)``.
        num_evals: eigenvalues (M).
        num_fit_evals: eigenvalues above the threshold, the fitted data.
        alpha, D, xmin, xmax, sigma: the power-law fit (:class:`PowerLawFit`); ``sigma`` is σ_α.
        num_pl_spikes: eigenvalues ``≥ xmin`` (the power-law tail).
        xmin_method, fit_branch: how xmin was chosen; ``"standard"``, ``"small_n"`` or ``"failed"``.
        status: ``"success"`` or ``"failed"``; ``fit_note``: why it failed.
        warning: ``"over-trained"`` (α < 2), ``"under-trained"`` (α > 6) or ``""``.
        norm: ``Σλ = ‖W‖_F²``; ``log_norm``: ``log10 Σλ``.
        spectral_norm: ``λ_max = σ₁²`` (WeightWatcher's meaning: note the square); ``log_spectral_norm``:
            ``log10 λ_max``; ``lambda_max``: the same value under WeightWatcher's other name.
        alpha_weighted: ``α · log10 λ_max`` ("α-hat", Martin & Mahoney 2021).
        log_alpha_norm: ``log10 Σ λᵢ^α`` over all M eigenvalues.
        stable_rank: ``Σλ / λ_max``.
        matrix_rank: ``#{σᵢ > σ_max · N · ε}`` (``RMT_Util.matrix_rank``, numpy's default tolerance), on
            singular values resolved that far (:func:`matrix_rank`).
        entropy: WeightWatcher's spectral entropy ``−Σ pᵢ ln pᵢ / ln(rank)``, ``pᵢ = λᵢ/Σλ + 1e-10``,
            ``rank = matrix_rank + 1e-10`` (``RMT_Util.matrix_entropy``; 1 for a flat spectrum).
        sv_max, sv_min: largest and smallest singular value; sv_min None when it is below the resolution.
        rank_loss: ``M − matrix_rank``; ``weak_rank_loss``: eigenvalues below 1e-6.
        unresolved: singular values at or below the solver's ``resolution`` (:func:`matrix_rank`), which
            matrix_rank, rank_loss, weak_rank_loss and entropy count as 0 (an exact SVD: 0).
        mp_sigma2, mp_bulk_min, mp_bulk_max, mp_spike_threshold, mp_num_spikes, mp_softrank: the
            Marchenko–Pastur fit (:class:`MPFit`); None when it does not apply.
    """

    N: int
    M: int
    num_evals: int
    num_fit_evals: int
    alpha: float | None
    D: float | None
    xmin: float | None
    xmax: float | None
    sigma: float | None
    num_pl_spikes: int | None
    xmin_method: str
    fit_branch: str
    status: str
    fit_note: str
    warning: str
    norm: float
    log_norm: float | None
    spectral_norm: float
    log_spectral_norm: float | None
    lambda_max: float
    alpha_weighted: float | None
    log_alpha_norm: float | None
    stable_rank: float | None
    matrix_rank: int
    entropy: float | None
    sv_max: float
    sv_min: float | None
    rank_loss: int
    weak_rank_loss: int
    unresolved: int
    mp_sigma2: float | None
    mp_bulk_min: float | None
    mp_bulk_max: float | None
    mp_spike_threshold: float | None
    mp_num_spikes: int | None
    mp_softrank: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _log10(v: float) -> float | None:
    return math.log10(v) if v > 0 and math.isfinite(v) else None


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def matrix_rank(svals: np.ndarray, N: int, *, resolution: float = 0.0) -> int:
    """``#{σᵢ > max(σ_max · N · ε, resolution)}``, ε of float64 (``RMT_Util.matrix_rank``; numpy's
    ``matrix_rank`` default tolerance).

    Args:
        svals: ``(p,)`` singular values, float64, any order; ``N``: the larger dimension.
        resolution: the smallest singular value the solver that computed ``svals`` tells from 0. An exact
            SVD (WeightWatcher's) resolves down to the numpy tolerance (0 here); the float64 Gram route
            only down to ``σ₁·√(p·ε)`` (:func:`spectra.metrics.rank_resolution`): below that its values
            are rounding noise, which the numpy tolerance would count (an all-ones 96 × 64 matrix got 21).

    >>> matrix_rank(np.array([3.0, 1.0, 1e-9]), 3), matrix_rank(np.array([3.0, 1.0, 1e-9]), 3, resolution=1e-7)
    (3, 2)
    """
    sv = as_spectrum(svals, "svals")  # NaN, negative, 2-D or string values are no singular values
    N, resolution = check_index(N, "N", 1, 1 << 62), check_number(resolution, "resolution", 0.0)  # a NaN counted nothing
    if sv.size == 0:
        return 0
    tol = max(float(np.max(sv)) * N * np.finfo(np.float64).eps, resolution)
    return int(np.count_nonzero(sv > tol))


def spectral_entropy(evals: np.ndarray, N: int, *, resolution: float = 0.0) -> float | None:
    """WeightWatcher's matrix entropy (``RMT_Util.matrix_entropy``): ``−Σ pᵢ ln pᵢ / ln(r)`` with
    ``pᵢ = λᵢ / Σλ + 1e-10`` over all eigenvalues and ``r = matrix_rank + 1e-10``. None for a zero
    matrix. A flat spectrum of full rank gives ≈ 1; a rank-1 matrix divides by ``ln(1 + 1e-10)``, as
    WeightWatcher does. None for a single eigenvalue (a 1 × N matrix: ``≈ 0 / ln(1 + 1e-10)`` gave −1.0).

    ``resolution`` (a singular value; see :func:`matrix_rank`): eigenvalues ``λ ≤ resolution²`` are
    unresolved rounding noise and enter as 0, as the exact zeros they stand for. Either way such a λ is at
    most ``p·ε`` of Σλ, far below the 1e-10 added to every pᵢ, so this changes the sum by rounding only;
    what matters is that ``r`` counts them as 0.

    >>> round(spectral_entropy(np.ones(8), 8), 6)
    1.0
    """
    lam = as_eigenvalues(evals)
    total = float(np.sum(lam))
    N, resolution = check_index(N, "N", 1, 1 << 62), check_number(resolution, "resolution", 0.0)
    if lam.size <= 1 or total <= 0.0:
        return None
    if resolution > 0.0:
        lam = np.where(lam > resolution * resolution, lam, 0.0)
        total = float(np.sum(lam))
    rank = matrix_rank(np.sqrt(lam), N, resolution=resolution) + ENTROPY_EPSILON
    p = lam / total + ENTROPY_EPSILON
    return _finite(float(-np.sum(p * np.log(p)) / np.log(rank)))


def esd_metrics(evals: np.ndarray | Sequence[float], shape: tuple[int, int], *, xmin: XminMethod = "fit",
                thresh: float = EVALS_THRESH, resolution: float = 0.0, rounding: float = 0.0) -> EsdMetrics:
    """All ESD metrics of one matrix from its eigenvalues (``WeightWatcher.apply_esd``,
    ``apply_powerlaw`` and ``apply_norm_metrics`` on one layer).

    Args:
        evals: the ``M = min(shape)`` eigenvalues ``λ = σ²`` of the matrix (not divided by N), any order.
        shape: ``(out, in)``.
        xmin, thresh: see :func:`power_law_fit`. The fit drops eigenvalues at or below
            ``max(thresh, λ_max·M·ε)``, ε the float64 machine epsilon: below ``λ_max·M·ε`` a float64
            eigensolver returns rounding noise, not eigenvalues (it matters only for λ_max above ~1e8).
        resolution: the smallest singular value the solver of ``evals`` resolves (:func:`matrix_rank`):
            0 for an exact SVD, :func:`spectra.metrics.rank_resolution` for eigenvalues of a float64 Gram
            matrix. ``matrix_rank``, ``rank_loss``, ``weak_rank_loss`` and ``entropy`` count the
            singular values at or below it as 0.
        rounding: the median eigenvalue at or below which the bulk may be the rounding of the matrix's storage
            (:func:`spectra.rounding_bulk.rounding_bulk`; 0: exact): the Marchenko–Pastur fit (``mp_*``) is then dropped (a rank-5 weight
            stored in bfloat16 read 21 spikes off its rounding). A full-rank weight's median lies far above it.
    Returns:
        :class:`EsdMetrics`. Norm metrics use every eigenvalue; the fit only those above the threshold.

    Example:
        >>> W = np.random.default_rng(0).standard_normal((300, 100))
        >>> m = esd_metrics(np.linalg.svd(W, compute_uv=False) ** 2, W.shape)
        >>> m.status, m.N, m.M, m.mp_num_spikes
        ('success', 300, 100, 0)
    """
    lam, shape = as_eigenvalues(evals), check_shape(shape)  # (-300, 100) was reported as "min(shape) = -300 eigenvalues"
    N, M = max(shape), min(shape)
    if lam.size != M:
        raise ValueError(f"evals must hold min(shape) = {M} eigenvalues. Got {lam.size} instead.")
    if M == 0:
        raise ValueError(f"shape must have no zero dimension. Got {tuple(shape)} instead.")
    # the rounding level of the eigensolver: a rank-deficient matrix of large scale has "eigenvalues" above
    # the absolute threshold that are noise (a constant 16 × 8 matrix of 3e38 gave α = 1.01 on them)
    rounding = check_number(rounding, "rounding", 0.0)  # a NaN was ignored by max()
    with np.errstate(over="ignore"):
        if not math.isfinite(float(np.sum(lam))):  # norms and the fit's sums would be inf (λ near 1e308)
            raise ValueError("evals sum beyond float64's range (Σλ = ‖W‖_F² overflows): divide W by a power of two first")
    # M·ε first: λ_max·M overflowed past 1.8e308 and blamed a thresh nobody passed
    floor = float(lam[-1]) * (M * np.finfo(np.float64).eps) if lam.size and math.isfinite(lam[-1]) else 0.0
    fit = power_law_fit(lam, xmin=xmin, thresh=max(thresh, floor))
    S = np.sqrt(np.clip(lam, 0.0, None))
    norm = float(np.sum(lam))
    lam_max = float(lam[-1])
    log_spec = _log10(lam_max)
    rank = matrix_rank(S, N, resolution=resolution)
    alpha_weighted = log_alpha_norm = None
    if fit.ok:
        alpha_weighted = fit.alpha * log_spec if log_spec is not None else None
        log_alpha_norm = log10_power_sum(lam, fit.alpha)  # in log space: Σλ^α overflowed at α·log10 λ_max > 308
    mp = mp_bulk_fit(lam, shape, zero_at=max(floor, resolution**2, rounding))
    return EsdMetrics(
        N=N, M=M, num_evals=M, num_fit_evals=fit.n_fit,
        alpha=fit.alpha, D=fit.D, xmin=fit.xmin, xmax=fit.xmax, sigma=fit.sigma,
        num_pl_spikes=int(np.count_nonzero(lam >= fit.xmin)) if fit.ok else None,
        xmin_method=fit.method, fit_branch=fit.branch, status="success" if fit.ok else "failed", fit_note=fit.reason,
        warning=fit.warning,
        norm=norm, log_norm=_log10(norm), spectral_norm=lam_max, log_spectral_norm=log_spec, lambda_max=lam_max,
        alpha_weighted=alpha_weighted, log_alpha_norm=log_alpha_norm,
        stable_rank=norm / lam_max if lam_max > 0 else None,
        matrix_rank=rank, entropy=spectral_entropy(lam, N, resolution=resolution),
        sv_max=float(S[-1]), sv_min=float(S[0]) if resolution <= 0.0 or S[0] > resolution else None, rank_loss=M - rank,
        weak_rank_loss=int(np.count_nonzero((lam < WEAK_RANK_LOSS_TOLERANCE) | np.less_equal(S, resolution))),
        unresolved=int(np.count_nonzero(np.less_equal(S, resolution))) if resolution > 0.0 else 0,
        mp_sigma2=mp.sigma2 if mp else None, mp_bulk_min=mp.bulk_min if mp else None,
        mp_bulk_max=mp.bulk_max if mp else None, mp_spike_threshold=mp.spike_threshold if mp else None,
        mp_num_spikes=mp.num_spikes if mp else None, mp_softrank=mp.softrank if mp else None,
    )
