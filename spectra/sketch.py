"""Top-of-the-spectrum routes: a randomized truncated SVD with a-posteriori residual bounds, and
energy ranks from an adaptively grown sketch with bounds that hold deterministically.

- :func:`randomized_svd` — top-k triplets by a randomized range finder with re-orthonormalised power
  iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4/5.1); each value comes with an a-posteriori
  residual bound (see :class:`TruncatedSVD`).
- :func:`approx_energy_ranks` — energy ranks from a sketch, each with a lower and upper bound (Ky Fan;
  see :func:`energy_rank_bounds`).

Both work in float32 by default; a float64 matrix outside float32's range is divided by a power of two
first and its values multiplied back (:func:`spectra.linalg.gram_scale_exponent`), so neither
overflows nor flushes to zero. Conventions as :mod:`spectra.engine`: ``(out, in)`` matrices, spectra
as float64 numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from spectra.checks import check_index, check_number, check_tau
from spectra.engine import batch_singular_values
from spectra.linalg import check_device_available, finite_tensor, gram_scale_exponent, resolve_device
from spectra.metrics import as_spectrum, energy_rank, rank_resolution

__all__ = ["ApproxRank", "ApproxSpectrum", "TruncatedSVD", "approx_energy_ranks", "energy_rank_bounds", "randomized_svd",
           "truncated_singular_values"]


# ---- truncated path -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TruncatedSVD:
    """Top-k singular triplets of ``M`` (``(out, in)``, or batched ``(b, out, in)``).

    Attributes:
        U: ``(…, out, k)`` left singular vectors.
        S: ``(…, k)`` singular values, descending, float64 numpy.
        Vh: ``(…, k, in)`` right singular vectors, transposed.
        residual: ``(…, k)`` float64: ``‖M vᵢ − σᵢ uᵢ‖ / √2``. Some true singular value of M lies
            within this distance of ``S[i]`` (Bauer–Fike on the Hermitian dilation). Ritz values from a
            subspace underestimate, so ``S[i] <= σᵢ(M)`` up to the working ``dtype``'s rounding (M is
            rounded to it and multiplied in it): at float32 ``S[i]`` can exceed ``σᵢ(M)`` by a few 1e-7
            relative (up to 1.5e-7 measured on float64 400 × 400 matrices), at ``dtype=torch.float64`` by ~1e-16.
            Relative error estimates are ``residual / S``.
        n_iter: power iterations used; ``sketch``: sketch width l = k + oversampling.
        exact: True when the exact path was used instead (k too close to p).
    """

    U: torch.Tensor
    S: np.ndarray
    Vh: torch.Tensor
    residual: np.ndarray
    n_iter: int
    sketch: int
    exact: bool = False

    @property
    def rel_error(self) -> np.ndarray:
        """``residual / S`` (inf where S is 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.S > 0, self.residual / self.S, np.where(self.residual > 0, np.inf, 0.0))


def _float_input(M: torch.Tensor, name: str) -> torch.Tensor:
    """``M`` detached, as a real floating tensor (numpy arrays accepted); complex input is refused, not cast."""
    M = finite_tensor(M, name)  # NaN or Inf: a LAPACK error deep inside, or NaN values
    if M.ndim < 2:
        raise ValueError(f"{name} must have shape (out, in) or (b, out, in). Got {tuple(M.shape)} instead.")
    return M if M.is_floating_point() else M.double()


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def randomized_svd(
    M: torch.Tensor,
    k: int,
    *,
    oversample: int | None = None,
    n_iter: int = 4,
    tol: float | None = None,
    max_iter: int = 16,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> TruncatedSVD:
    """Top-k singular triplets by a randomized range finder with power iterations.

    Args:
        M: ``(out, in)`` or ``(b, out, in)`` float tensor.
        k: number of triplets (1 <= k <= p).
        oversample: extra sketch columns; default ``max(10, k)`` (l = 2k suits slowly decaying
            fine-tuning spectra; see the benchmark).
        n_iter: power iterations, each followed by re-orthonormalisation (QR) against round-off.
        tol: if given, keep doubling the iterations (up to ``max_iter``) until every returned value's
            ``residual / S <= tol``.
        generator: randomness (seeded for reproducible sketches); device generator if on CUDA.
        device: where to compute; default the device of ``M``.
        dtype: working precision of the sketch.

    Returns:
        :class:`TruncatedSVD`; when ``l = k + oversample >= p / 2`` the exact path is used instead
        (a sketch that wide costs as much as the exact route and is less accurate).

    Example:
        >>> M = torch.diag(torch.arange(10.0, 0.0, -1.0))
        >>> randomized_svd(M, 3, generator=torch.Generator().manual_seed(0)).S.round(4).tolist()
        [10.0, 9.0, 8.0]
    """
    M = _float_input(M, "M")
    dev = resolve_device(device) if device is not None else M.device
    check_device_available(dev)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer. Got {k!r} instead.")
    if oversample is not None and (isinstance(oversample, bool) or not isinstance(oversample, (int, np.integer)) or oversample < 0):
        raise ValueError(f"oversample must be a non-negative integer or None. Got {oversample!r} instead.")
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer. Got {n_iter!r} instead.")
    if tol is not None:
        check_number(tol, "tol", 0.0)
    check_index(max_iter, "max_iter", 0, 1 << 16)  # a NaN or infinite cap never ended the loop below
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64. Got {dtype!r} instead.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None. Got {generator!r} instead.")
    if M.numel():
        # values beyond the working dtype's squaring range would overflow, or flush to zero and certify a
        # residual of 0 (float64 near 1e-300): a power of two per matrix first (exact), values and
        # residuals multiplied back
        lo, hi = torch.aminmax(M.reshape(*M.shape[:-2], -1), dim=-1)  # one pass
        amax = torch.maximum(hi, -lo).reshape(-1).tolist()
        exps = np.array([gram_scale_exponent(a, dtype) for a in amax]).reshape(M.shape[:-2])
        if exps.any():
            t = randomized_svd(torch.ldexp(M, torch.as_tensor(-exps, device=M.device)[..., None, None]), k, oversample=oversample,
                               n_iter=n_iter, tol=tol, max_iter=max_iter, generator=generator, device=device, dtype=dtype)
            return replace(t, S=np.ldexp(t.S, exps[..., None]), residual=np.ldexp(t.residual, exps[..., None]))
    M = M.to(dev, dtype)
    m, n = M.shape[-2], M.shape[-1]
    p = min(m, n)
    if not 1 <= k <= p:
        raise ValueError(f"k must be in [1, {p}]. Got {k} instead.")
    ell = min(p, k + (oversample if oversample is not None else max(10, k)))
    if 2 * ell >= p:
        U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
        return TruncatedSVD(U[..., :k].to(dtype), S[..., :k].cpu().numpy(), Vh[..., :k, :].to(dtype),
                            np.zeros(S[..., :k].shape), 0, p, exact=True)
    batch = M.shape[:-2]
    gen_device = "cpu" if generator is None or generator.device.type == "cpu" else dev
    omega = torch.randn(*batch, n, ell, generator=generator, device=gen_device, dtype=dtype).to(dev)
    Q = _orth(M @ omega)
    done_iter = 0
    iters = n_iter
    while True:
        while done_iter < iters:
            Q = _orth(M @ _orth(M.mT @ Q))
            done_iter += 1
        Bm = Q.mT @ M  # (…, l, n)
        Ub, S, Vh = torch.linalg.svd(Bm.double(), full_matrices=False)
        U = Q.double() @ Ub[..., :k]
        S, Vh = S[..., :k], Vh[..., :k, :]
        # M vᵢ − σᵢ uᵢ = (I − QQᵀ) M vᵢ; the right residual Mᵀuᵢ − σᵢvᵢ is 0 by construction.
        MV = M.double() @ Vh.mT
        residual = torch.linalg.vector_norm(MV - U * S.unsqueeze(-2), dim=-2) / math.sqrt(2)
        res = TruncatedSVD(U.to(dtype), S.cpu().numpy(), Vh.to(dtype), residual.cpu().numpy(), done_iter, ell)
        if tol is None or bool(np.all(res.rel_error <= tol)) or iters >= max_iter:
            return res
        iters = min(max_iter, max(1, iters) * 2)


def truncated_singular_values(M: torch.Tensor, k: int, *, tol: float = 1e-3, **kwargs) -> TruncatedSVD:
    """Top-k singular values with ``residual / σ <= tol`` (iterations grown until met)."""
    return randomized_svd(M, k, tol=tol, **kwargs)


# ---- approximate energy ranks --------------------------------------------------------------------
@dataclass(frozen=True)
class ApproxRank:
    """An energy rank known to lie in ``[lo, hi]``; ``estimate`` is the midpoint rounded up.

    ``exact`` is True when lo == hi (then the rank is exact, not an estimate).
    """

    estimate: int
    lo: int
    hi: int

    @property
    def exact(self) -> bool:
        return self.lo == self.hi


@dataclass(frozen=True)
class ApproxSpectrum:
    """What the approximate mode knows about one matrix.

    Attributes:
        fro_norm: exact ``‖M‖_F`` (float64 accumulation).
        top: the sketch's singular values (lower bounds of the true ones, up to the sketch's float32
            rounding: σ̂₁ of a rank-1 matrix can exceed σ₁ by ~1e-7 relative), descending.
        residual_energy: ``‖M‖_F² − ‖QᵀM‖_F²``: energy outside the sketch (exact up to rounding).
        ranks: threshold -> :class:`ApproxRank`.
        sketch: final sketch width.
        exact: the sketch grew to p/2 and the whole spectrum was computed instead (float64 Gram eigensolve):
            ``top`` holds all p singular values and every rank is exact.
    """

    fro_norm: float
    top: np.ndarray
    residual_energy: float
    ranks: dict[float, ApproxRank]
    sketch: int
    exact: bool = False


def energy_rank_bounds(top: np.ndarray, total: float, residual: float, tau: float, p: int,
                       slack: float = 0.0) -> ApproxRank:
    """Bounds on the energy rank at τ from a sketch.

    With ``M = QQᵀM + (I − QQᵀ)M`` the two parts have orthogonal column spaces, so
    ``MᵀM = AᵀA + RᵀR`` and, by Ky Fan's inequality, for every k
    ``L_k = Σ_{i≤k} σ̂ᵢ² <= E_k = Σ_{i≤k} σᵢ² <= L_k + ‖R‖_F² = U_k``. Hence the true rank lies
    between the first k with ``U_k >= τ·total`` and the first k with ``L_k >= τ·total`` (p if the
    sketch never gets there). ``slack``: the rounding error of the computed ``L_k`` (an energy, as
    ``total``), which widens both sides: ``L_k − slack`` and ``U_k + slack`` (values computed in
    float32 land just below a tie at τ, e.g. an identity block, and would exclude the exact rank).

    Arguments: ``top`` ``(n,)`` the sketch's singular values, validated as :func:`spectra.metrics.as_spectrum` does
    (sorted descending when given otherwise; NaN, Inf, negative values refused); ``total``, ``residual`` and
    ``slack`` finite energies >= 0 with ``Σ top² <= total`` up to ``slack`` and float32 rounding (2·n·u₃₂·total);
    ``p = min(out, in) >= n``. Anything else is a ValueError naming the argument (an ascending ``top``
    gave another rank, a ``top`` beyond ``total`` bounds of no matrix).
    """
    tau = check_tau(tau)
    top = as_spectrum(top, "top")
    total, residual = check_number(total, "total", 0.0), check_number(residual, "residual", 0.0)
    slack = check_number(slack, "slack", 0.0)
    p = check_index(p, "p", top.size, 2**62, " (min(out, in), at least len(top))")
    captured = float(np.sum(top**2))
    if captured > total + slack + 2.0 * top.size * float(np.finfo(np.float32).eps) * total:
        raise ValueError(f"top's energy Σ top² = {captured!r} exceeds total = {total!r}: top must be singular values of the matrix of total.")
    if total <= 0:
        return ApproxRank(0, 0, 0)
    if tau == 1.0 and len(top):
        # the numerical rank (spectra.metrics.numerical_rank): values above σ₁·√(p·ε). σ̂ᵢ <= σᵢ and
        # σᵢ² <= σ̂ᵢ² + ‖R‖_F², so the sketch's values bound how many are above it from both sides.
        # ‖R‖² (the residual) is a difference of two sums, ‖M‖² minus the sketch's Σσ̂², known only to
        # within their rounding (``slack``): a tail below that is invisible, so tail2 = residual + slack.
        S2 = top**2
        tail2 = residual + slack
        tol_lo2 = rank_resolution(math.sqrt(float(S2[0])), p) ** 2  # σ₁ >= σ̂₁
        tol_hi2 = rank_resolution(math.sqrt(float(S2[0]) + tail2), p) ** 2  # σ₁² <= σ̂₁² + ‖R‖²
        lo = int(np.count_nonzero(tol_hi2 < S2))
        upper = int(np.count_nonzero(tol_lo2 < S2 + tail2))
        hi = upper if upper < S2.size or tail2 <= tol_lo2 else p
        return ApproxRank(int(math.ceil((lo + hi) / 2)), lo, max(lo, hi))
    L = np.cumsum(top**2)
    target = tau * total
    lo_idx = int(np.searchsorted(L + (residual + slack), target, side="left"))
    lo = lo_idx + 1 if lo_idx < L.size else L.size + 1
    hi_idx = int(np.searchsorted(L - slack, target, side="left"))
    hi = hi_idx + 1 if hi_idx < L.size else p
    lo = min(lo, hi)
    return ApproxRank(int(math.ceil((lo + hi) / 2)), int(lo), int(hi))


def _round_cost(shape: torch.Size, ell: int, n_iter: int) -> float:
    """The cost of one sketch round of width ``ell``, in the exact route's multiply-adds: its ``2·n_iter + 2`` products
    with M and its QRs, counted twice (thin float32 products and Householder QRs ran at about half the rate of the
    exact route's float64 Gram product on a 2-core CPU: a 20000 × 1000 update, rounds of 64, 128 and 256 columns 7 s,
    the exact route 0.6 s)."""
    out, inn = int(shape[0]), int(shape[1])
    return 2.0 * ((2 * n_iter + 2) * out * inn * ell + (n_iter + 1) * 2 * max(out, inn) * ell * ell)


def _exact_cost(shape: torch.Size) -> float:
    """Multiply-adds of the exact Gram route: the float64 Gram matrix (``syrk``) and its tridiagonal reduction."""
    out, inn = int(shape[0]), int(shape[1])
    p = min(out, inn)
    return out * inn * p / 2 + 2 * p**3 / 3


def approx_energy_ranks(
    M: torch.Tensor,
    thresholds: Sequence[float],
    *,
    rank_tol: float = 0.01,
    start: int = 64,
    max_fraction: float = 0.5,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> ApproxSpectrum:
    """Energy ranks of a large ``(out, in)`` matrix without a full decomposition, with bounds.

    The sketch width doubles from ``start`` until, for every threshold, ``hi − lo <= rank_tol·p``
    (bounds from :func:`energy_rank_bounds`), or until it reaches ``max_fraction·p``; the bounds hold
    whatever the sketch, so a stopped run still returns true bounds, only wider. Cost per round:
    ``(2·n_iter + 2)`` products of M with an ``(in, l)`` block, no p×p decomposition. Where a sketch would be as wide as
    ``p/2``, or a round after the first would cost more than the exact Gram route, the exact spectrum is computed
    instead (``exact``). ``rank_tol`` and
    ``max_fraction``: finite numbers in [0, 1] (ValueError otherwise: a NaN tolerance stopped the refining at once).
    """
    rank_tol, max_fraction = check_number(rank_tol, "rank_tol", 0.0, 1.0), check_number(max_fraction, "max_fraction", 0.0, 1.0)
    thresholds = [check_tau(float(t) if isinstance(t, (int, float, np.floating)) and not isinstance(t, bool) else t,
                            "each threshold") for t in thresholds]
    M = _float_input(M, "M")
    if M.ndim != 2 or not M.numel():
        raise ValueError(f"M must be one non-empty (out, in) matrix. Got shape {tuple(M.shape)} instead.")
    dev = resolve_device(device) if device is not None else M.device
    check_device_available(dev)
    # the sketch runs in float32: a float64 matrix beyond 2**±32 is scaled by a power of two first
    # (ranks are scale-free; norms and values are scaled back), else it would overflow or vanish
    e = gram_scale_exponent(max(float(M.max()), -float(M.min())), torch.float32) if M.numel() else 0
    src = torch.ldexp(M.to(dev), torch.tensor(-e, device=dev)) if e else M.to(dev)  # exact: a power of two
    M = src.to(torch.float32)
    p = min(M.shape)
    total = float(torch.linalg.vector_norm(src.double()).item() ** 2)  # of the matrix given, not its float32 copy
    # a float64 matrix rounded to float32 for the sketch (|δ| <= u|m| per entry) moves each partial energy by at
    # most about 2u·total: the bounds widen by that, or a rank whose energy lies within 1e-8 of τ is excluded
    cast_slack = 2.5 * float(np.finfo(np.float32).eps) * total if src.dtype == torch.float64 else 0.0
    if e:
        res = approx_energy_ranks(src, thresholds, rank_tol=rank_tol, start=start, max_fraction=max_fraction, n_iter=n_iter,
                                  generator=generator, device=dev)
        with np.errstate(over="ignore"):  # an energy (σ²) of such a matrix may not be representable: inf
            residual = float(np.ldexp(res.residual_energy, 2 * e))
        return ApproxSpectrum(float(np.ldexp(res.fro_norm, e)), np.ldexp(res.top, e), residual, res.ranks, res.sketch, res.exact)
    ell = min(start, p)
    while True:
        # a sketch as wide as p/2, or a refining round that costs more than the whole spectrum by the Gram route: that
        # route's values directly (the sketch went on to p/2, a full float64 SVD there: 3.4 GB for a 50000 × 2000 update;
        # a 20000 × 1000 update took 7 s against the exact route's 0.6). The first round always runs: it was asked for.
        if 2 * min(ell, p) >= p or (ell > min(start, p) and _round_cost(M.shape, ell, n_iter) >= _exact_cost(M.shape)):
            top = batch_singular_values(src.unsqueeze(0), device=dev)[0]  # in the given precision: the diff's values
            # the exact route's rule on the same values (its own total): the same rank, also at a tie
            ranks = {float(t): ApproxRank(r, r, r) for t in thresholds for r in [energy_rank(top, float(t))]}
            return ApproxSpectrum(math.sqrt(total), top, 0.0, ranks, p, exact=True)
        tsvd = randomized_svd(M, min(ell, p), oversample=0, n_iter=n_iter, generator=generator)
        top = tsvd.S
        captured = float(np.sum(top.astype(np.float64) ** 2))
        residual = max(total - captured, 0.0)
        # σ̂ are computed in the sketch's float32 (backward stable: each σ̂ᵢ² within a few u·σ̂₁²), so the
        # sum of the first k is off by up to about 2·k·u·σ̂₁² (k <= len(top))
        slack = cast_slack + (2.0 * len(top) * float(np.finfo(np.float32).eps) * float(top[0]) ** 2 if len(top) else 0.0)
        ranks = {float(t): energy_rank_bounds(top, total, residual, float(t), p, slack) for t in thresholds}
        wide = any(r.hi - r.lo > rank_tol * p for r in ranks.values())
        if not wide or tsvd.exact or ell >= max_fraction * p:
            return ApproxSpectrum(math.sqrt(total), top, residual, ranks, int(tsvd.sketch))
        ell = min(p, ell * 2)


