"""The spectral engine: batched exact spectra, truncated (randomized) SVD, approximate energy ranks
with guaranteed bounds, and the factored SVD of LoRA updates.

Every function here is pure tensor code with a ``device`` argument (or works on the device of its
input) and runs on the CPU in the tests. Conventions: matrices are ``(out, in)``; a batch is
``(b, out, in)``; ``U, S, Vh`` always (``Vh`` holds Vᴴ); spectra come back as float64 numpy.

Paths and their precision:

- :func:`batch_singular_values` — exact, all p values; the Gram/eigh route of
  :mod:`spectra.linalg` or ``svdvals``, chunked to fit the device and retried in smaller chunks on an
  allocation failure.
- :func:`randomized_svd` — top-k triplets by a randomized range finder with re-orthonormalised power
  iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4/5.1); each value comes with an a-posteriori
  residual bound (see :class:`TruncatedSVD`).
- :func:`approx_energy_ranks` — energy ranks from an adaptively grown sketch, each with a lower and
  upper bound that hold deterministically (Ky Fan; see the function).
- :func:`factored_svd` — exact SVD of ``s·B·A`` from QR of the factors, O((out + in)·r²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from spectra.linalg import resolve_device, singular_values

Method = Literal["auto", "gram", "svd"]

#: Default batch memory cap on the CPU, bytes (the GPU uses its free memory). Batching buys little
#: on a CPU, whose BLAS already uses every core, so the cap is small and keeps peak memory low.
CPU_BATCH_BYTES = 256 << 20


class BatchTooLarge(RuntimeError):
    """Raised (or a real CUDA OOM caught) when a batch does not fit; the batch is split and retried."""


def choose_method(method: Method = "auto") -> str:
    """The exact method ``"auto"`` stands for, on any device and shape.

    Measured (``bench/engine.py``; ``bench/results/``): on the CPU the float64 Gram + ``syevd`` route
    beats ``svdvals`` by 10-50× at every Llama shape; on CUDA (H100/H200) batched ``eigvalsh`` on
    the Gram also wins for every shape we measured, so ``"auto"`` picks ``"gram"`` everywhere, and
    ``"svd"`` stays available for comparison and for users who want backward-stable small values.
    """
    if method != "auto":
        return method
    return "gram"


def estimate_batch_bytes(shape: tuple[int, int], dtype: torch.dtype, method: str) -> int:
    """Working memory of one matrix of ``shape`` in the exact path, bytes (input, upcast, Gram, workspace)."""
    out_dim, in_dim = shape
    p = min(shape)
    item = torch.empty(0, dtype=dtype).element_size()
    if method == "gram":  # input + one upcast block (≤ 64 MiB, see linalg.gram) + Gram and eigh workspace
        return out_dim * in_dim * 4 + min(out_dim * in_dim * item, 64 << 20) + 4 * p * p * item
    return out_dim * in_dim * (4 + 3 * item) + 2 * p * p * item


def batch_budget(device: torch.device, max_batch_bytes: int | None = None) -> int:
    """Bytes a batch may use on ``device``: ``max_batch_bytes`` if given, else 70% of the free CUDA
    memory, else :data:`CPU_BATCH_BYTES`."""
    if max_batch_bytes is not None:
        return int(max_batch_bytes)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    return CPU_BATCH_BYTES


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, BatchTooLarge):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def batch_singular_values(
    mats: torch.Tensor | Sequence[torch.Tensor],
    *,
    device: str | torch.device = "auto",
    method: Method = "auto",
    dtype: torch.dtype = torch.float64,
    max_batch_bytes: int | None = None,
    hard_limit_bytes: int | None = None,
) -> np.ndarray:
    """Exact singular values of equally shaped matrices, computed in device-sized chunks.

    Args:
        mats: ``(b, out, in)`` tensor or a sequence of ``(out, in)`` tensors, any device, float. A
            sequence is stacked one chunk at a time on CUDA and not at all on the CPU, so no copy
            of the whole batch is made.
        device: where to compute (``"auto"``: CUDA if available).
        method: ``"gram"``, ``"svd"`` or ``"auto"`` (:func:`choose_method`).
        dtype: decomposition precision.
        max_batch_bytes: memory a chunk may use; default from :func:`batch_budget`.
        hard_limit_bytes: for tests: a chunk whose estimate exceeds this raises
            :class:`BatchTooLarge` as an allocation failure would, exercising the split-and-retry path.

    Returns:
        float64 array ``(b, p)``, each row descending.
    """
    if isinstance(mats, torch.Tensor):
        if mats.ndim != 3:
            raise ValueError(f"mats must have shape (b, out, in). Got {tuple(mats.shape)} instead.")
        count, shape = int(mats.shape[0]), (int(mats.shape[1]), int(mats.shape[2]))
    else:
        mats = list(mats)
        if not mats or any(m.ndim != 2 or m.shape != mats[0].shape for m in mats):
            raise ValueError(f"mats must be equally shaped (out, in) matrices. Got {[tuple(m.shape) for m in mats]} instead.")
        count, shape = len(mats), (int(mats[0].shape[0]), int(mats[0].shape[1]))
    dev = resolve_device(device)
    if min(shape) == 0 or count == 0:
        return np.zeros((count, min(shape)), dtype=np.float64)
    meth = choose_method(method)
    per = estimate_batch_bytes(shape, dtype, meth)
    chunk = max(1, min(count, batch_budget(dev, max_batch_bytes) // max(per, 1)))
    if not isinstance(mats, torch.Tensor) and dev.type == "cpu":
        # separate matrices on the CPU: one at a time, as views, so the batch is never copied into a
        # stack (the CPU's BLAS already uses every core on one matrix; batching buys little there)
        chunk = 1

    def take(i: int, n: int) -> torch.Tensor:
        if isinstance(mats, torch.Tensor):
            return mats[i : i + n]
        return mats[i].unsqueeze(0) if n == 1 else torch.stack(mats[i : i + n])

    out = np.empty((count, min(shape)), dtype=np.float64)
    i = 0
    while i < count:
        n = min(chunk, count - i)
        try:
            if hard_limit_bytes is not None and n * per > hard_limit_bytes:
                raise BatchTooLarge(f"chunk of {n} needs {n * per} bytes > {hard_limit_bytes}")
            out[i : i + n] = _exact_chunk(take(i, n).to(dev, non_blocking=True), meth, dtype)
        except Exception as exc:  # noqa: BLE001 - only allocation failures are retried
            if not _is_oom(exc):
                raise
            if n == 1:
                if isinstance(exc, BatchTooLarge):  # a single matrix always runs; the cap is advisory
                    out[i : i + 1] = _exact_chunk(take(i, 1).to(dev), meth, dtype)
                    i += 1
                    continue
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            chunk = max(1, n // 2)
            continue
        i += n
    return out


def _exact_chunk(batch: torch.Tensor, method: str, dtype: torch.dtype) -> np.ndarray:
    return singular_values(batch, method=method, dtype=dtype)  # type: ignore[arg-type]


# ---- truncated path -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TruncatedSVD:
    """Top-k singular triplets of ``M`` (``(out, in)``, or batched ``(b, out, in)``).

    Attributes:
        U: ``(…, out, k)`` left singular vectors.
        S: ``(…, k)`` singular values, descending, float64 numpy.
        Vh: ``(…, k, in)`` right singular vectors, transposed.
        residual: ``(…, k)`` float64: ``‖M vᵢ − σᵢ uᵢ‖ / √2``. Some true singular value of M lies
            within this distance of ``S[i]`` (Bauer–Fike on the Hermitian dilation), and
            ``S[i] <= σᵢ(M)`` (Ritz values from a subspace underestimate). Relative error estimates
            are ``residual / S``.
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
    dev = resolve_device(device) if device is not None else M.device
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
    omega = torch.randn(*batch, n, ell, generator=generator, device="cpu" if generator is None or generator.device.type == "cpu" else dev, dtype=dtype).to(dev)
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
        top: the sketch's singular values (lower bounds of the true ones), descending.
        residual_energy: ``‖M‖_F² − ‖QᵀM‖_F²``: energy outside the sketch (exact up to rounding).
        ranks: threshold -> :class:`ApproxRank`.
        sketch: final sketch width.
    """

    fro_norm: float
    top: np.ndarray
    residual_energy: float
    ranks: dict[float, ApproxRank]
    sketch: int


def energy_rank_bounds(top: np.ndarray, total: float, residual: float, tau: float, p: int) -> ApproxRank:
    """Bounds on the energy rank at τ from a sketch.

    With ``M = QQᵀM + (I − QQᵀ)M`` the two parts have orthogonal column spaces, so
    ``MᵀM = AᵀA + RᵀR`` and, by Ky Fan's inequality, for every k
    ``L_k = Σ_{i≤k} σ̂ᵢ² <= E_k = Σ_{i≤k} σᵢ² <= L_k + ‖R‖_F² = U_k``. Hence the true rank lies
    between the first k with ``U_k >= τ·total`` and the first k with ``L_k >= τ·total`` (p if the
    sketch never gets there).
    """
    if total <= 0:
        return ApproxRank(0, 0, 0)
    L = np.cumsum(np.asarray(top, dtype=np.float64) ** 2)
    target = tau * total
    lo_idx = int(np.searchsorted(L + max(residual, 0.0), target, side="left"))
    lo = lo_idx + 1 if lo_idx < L.size else L.size + 1
    hi_idx = int(np.searchsorted(L, target, side="left"))
    hi = hi_idx + 1 if hi_idx < L.size else p
    lo = min(lo, hi)
    return ApproxRank(int(math.ceil((lo + hi) / 2)), int(lo), int(hi))


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
    ``(2·n_iter + 2)`` products of M with an ``(in, l)`` block, no p×p decomposition.
    """
    dev = resolve_device(device) if device is not None else M.device
    M = M.to(dev, torch.float32)
    p = min(M.shape)
    total = float(torch.linalg.vector_norm(M.double()).item() ** 2)
    ell = min(start, p)
    while True:
        tsvd = randomized_svd(M, min(ell, p), oversample=0, n_iter=n_iter, generator=generator)
        if tsvd.exact:  # the sketch got as wide as p/2: the exact spectrum costs no more, use all of it
            top = batch_singular_values(M.unsqueeze(0), device=dev)[0]
            ranks = {float(t): energy_rank_bounds(top, total, 0.0, float(t), p) for t in thresholds}
            return ApproxSpectrum(math.sqrt(total), top, 0.0, ranks, p)
        top = tsvd.S
        captured = float(np.sum(top.astype(np.float64) ** 2))
        residual = max(total - captured, 0.0)
        ranks = {float(t): energy_rank_bounds(top, total, residual, float(t), p) for t in thresholds}
        wide = any(r.hi - r.lo > rank_tol * p for r in ranks.values())
        if not wide or tsvd.exact or ell >= max_fraction * p:
            return ApproxSpectrum(math.sqrt(total), top, residual, ranks, int(tsvd.sketch))
        ell = min(p, ell * 2)


# ---- factored path ---------------------------------------------------------------------------------
def factored_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, *, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``ΔW = scale · B · A`` without forming the ``(out, in)`` product.

    Args:
        B: ``(out, r)`` (PEFT's ``lora_B.weight``).
        A: ``(r, in)`` (PEFT's ``lora_A.weight``).
        scale: ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA).
        dtype: working precision.

    Returns:
        ``U (out, r)``, ``S (r,)`` descending, ``Vh (r, in)`` with ``U diag(S) Vh = scale·B·A``.
        Cost O((out + in)·r²): QR of B and of Aᵀ, then the SVD of the r × r core
        ``scale · R_B R_Aᵀ``.
    """
    B = B.to(dtype)
    A = A.to(dtype)
    Qb, Rb = torch.linalg.qr(B, mode="reduced")      # (out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.mT, mode="reduced")   # (in, r), (r, r)
    Uc, S, Vch = torch.linalg.svd(scale * (Rb @ Ra.mT), full_matrices=False)
    return Qb @ Uc, S, Vch @ Qa.mT
