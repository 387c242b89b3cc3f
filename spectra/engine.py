"""The spectral engine: batched exact spectra (float64, or certified float32) and the factored SVD of
LoRA updates; the truncated (randomized) SVD and approximate energy ranks are in :mod:`spectra.sketch`.

Every function here is pure tensor code with a ``device`` argument (or works on the device of its
input) and runs on the CPU in the tests. Conventions: matrices are ``(out, in)``; a batch is
``(b, out, in)``; ``U, S, Vh`` always (``Vh`` holds Vᴴ); spectra come back as float64 numpy.

Paths and their precision:

- :func:`exact_spectra` — exact, all p values of each matrix of a batch, by the Gram/eigh route of
  :mod:`spectra.linalg` (or ``svdvals``). ``precision="float64"`` is the reference;
  ``"certified"`` (the default) solves in float32 and keeps a matrix's float32 spectrum only when
  :func:`spectra.linalg.certify_float32` proves that every metric computed from it equals the float64
  one (energy and signal ranks exactly, the float metrics to ``rtol``), else recomputes that matrix in
  float64; ``"float32"`` is plain float32. Two backends: on the CPU, numpy's BLAS and LAPACK (which
  release the GIL) with the matrices of a batch solved at once in worker threads, one BLAS thread each (a p ≤ 1024 eigensolve
  barely uses a second core, and multithreaded BLAS collapses on a busy machine); elsewhere
  (CUDA, or ``backend="torch"``), batched torch chunks sized to the device and retried in smaller
  chunks on an allocation failure. :func:`batch_singular_values` returns just the values.
- :func:`factored_svd` — exact SVD of ``s·B·A`` from QR of the factors, O((out + in)·r²).

A matrix whose entries would overflow or underflow when squared (float64 weights near 1e200 or
updates near 1e-160) is divided by a power of two before its Gram matrix or sketch is formed and its
values multiplied back (:func:`gram_scale_exponent`): exact, and ordinary matrices are not touched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from spectra.checks import check_index, check_number, check_tau
from spectra.linalg import (
    CERTIFY_RTOL,
    Method,
    all_finite,
    as_numpy,
    certify_float32,
    check_device_available,
    eigvalsh_upper,
    finite_tensor,
    gram,
    gram_scale_exponent,
    gram_upper,
    real_tensor,
    resolve_device,
    trace_and_fro,
)
from spectra.metrics import DEFAULT_THRESHOLDS
from spectra.threads import check_workers, map_one_blas_thread

#: What an exact spectrum is computed in: ``"float64"`` (the reference), ``"certified"`` (float32
#: where a certificate proves it gives the float64 results, float64 elsewhere) or ``"float32"``.
Precision = Literal["float64", "certified", "float32"]
PRECISIONS: tuple[str, ...] = ("float64", "certified", "float32")

#: Where the exact path runs: ``"lapack"`` (CPU: numpy's LAPACK, matrices in parallel threads),
#: ``"torch"`` (any device: batched ``torch.linalg``), ``"auto"`` (lapack on the CPU, else torch).
Backend = Literal["auto", "lapack", "torch"]

#: Default batch memory cap on the CPU, bytes. Batching buys little on a CPU, so the cap is small
#: and keeps peak memory low.
CPU_BATCH_BYTES = 256 << 20
#: Float64 copies of its matrix that compare's measures of one module hold at once (the base, both updates, W + ΔW
#: for the intruders, their products: ~300 MB measured for a 2048 × 2048 module); its cost against the cap below.
MEASURE_COPIES = 9
#: The float64 copies of its matrix compare holds at least for one module (49 bytes per entry measured on a 32000 × 4096
#: embedding): a module whose copies exceed the free memory is refused before the run, not killed by the kernel.
MEASURE_MIN_COPIES = 6
#: compare's cap on the working sets of the modules measured at once on the CPU, bytes; a larger module runs alone.
COMPARE_BATCH_BYTES = 2 << 30

#: Default share of the free CUDA memory a batch may use; a quarter more goes to reading ahead
#: (``DiffConfig.prefetch_bytes``), leaving room for the allocator and other processes.
CUDA_BATCH_FRACTION = 0.45

#: Eigensolver of the CPU backend per size: ``(largest p, solver when matrices are solved in parallel
#: threads, solver for a matrix solved alone with every BLAS thread)``, the first row whose p bound
#: holds applies; a solver is ``"numpy"`` (``numpy.linalg.eigvalsh``: OpenBLAS's ``syevd``, GIL released)
#: or ``"torch"`` (``torch.linalg.eigvalsh``, on a worker thread). scipy's drivers hold the GIL, so
#: threads calling them run one at a time. Measured on this project's 2-core CPU
#: (``bench/eigensolvers.py``, ``bench/results/eigensolvers-cpu.md``): two threads with one BLAS thread
#: each solve numpy's 1.75× faster than one (576: 12.1 ms per matrix against 21.1; scipy's and torch's
#: from two threads 22.9 and 23.2 ms) and at least as fast as any other at every p; a lone matrix on
#: every thread is within noise of torch's up to p = 1024 and 1.2× slower at 2048 (470 ms against 393).
EIG_DRIVERS: tuple[tuple[float, str, str], ...] = ((1536, "numpy", "numpy"), (math.inf, "numpy", "torch"))

#: The CPU backend solves the matrices of a batch in this many threads at most, one BLAS thread each
#: (None: ``torch.get_num_threads()``, the process's CPU budget).
DEFAULT_WORKERS: int | None = None

#: A matrix solved alone (a batch of one) gets every BLAS thread from this p up; below it one thread,
#: which is as fast at these sizes and does not stall when other processes hold the cores
#: (``bench/results/eigensolvers-cpu.md``).
ALONE_THREADS_MIN_P = 1024



class BatchTooLarge(RuntimeError):
    """Raised (or a real CUDA OOM caught) when a batch does not fit; the batch is split and retried."""


@dataclass(frozen=True)
class Spectra:
    """Exact spectra of a batch of equally shaped matrices (:func:`exact_spectra`).

    Attributes:
        S: float64 array ``(b, p)``, each row descending, ``p = min(out, in)``.
        precision: per matrix, what produced its row: ``"float64"``, ``"float32"`` (asked for), or
            ``"float32-certified"``.
        failed: per matrix, the certificate's failed checks that sent it to float64 (empty when it
            was certified or not asked for).
        gram_seconds, eig_seconds: per matrix, seconds spent forming its Gram matrix and solving it
            (on its worker thread; a torch chunk's time is shared evenly by its matrices).
    """

    S: np.ndarray
    precision: tuple[str, ...]
    failed: tuple[tuple[str, ...], ...]
    gram_seconds: np.ndarray
    eig_seconds: np.ndarray

    @property
    def recomputed(self) -> int:
        """Matrices whose float32 spectrum was not certified and were recomputed in float64."""
        return sum(1 for f in self.failed if f)


def eig_driver(p: int, *, alone: bool = False) -> str:
    """The solver :data:`EIG_DRIVERS` picks for a ``p × p`` eigensolve, for a matrix solved ``alone``
    on every BLAS thread or (False) one of several solved in parallel threads."""
    for bound, parallel, lone in EIG_DRIVERS:
        if p <= bound:
            return lone if alone else parallel
    return "numpy"


def estimate_batch_bytes(shape: tuple[int, int], dtype: torch.dtype, method: str) -> int:
    """Working memory of one matrix of ``shape`` in the exact path, bytes (input, upcast, Gram, workspace)."""
    out_dim, in_dim = shape
    p = min(shape)
    item = torch.empty(0, dtype=dtype).element_size()
    if method == "gram":  # input + one upcast block (≤ 64 MiB, see linalg.gram) + Gram and eigh workspace
        return out_dim * in_dim * 4 + min(out_dim * in_dim * item, 64 << 20) + 4 * p * p * item
    return out_dim * in_dim * (4 + 3 * item) + 2 * p * p * item


def batch_budget(device: torch.device, max_batch_bytes: int | None = None) -> int:
    """Bytes a batch may use on ``device``: ``max_batch_bytes`` if given, else
    :data:`CUDA_BATCH_FRACTION` (45%) of the free CUDA memory, else :data:`CPU_BATCH_BYTES`."""
    if max_batch_bytes is not None:
        return int(max_batch_bytes)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_BATCH_FRACTION)
    return CPU_BATCH_BYTES


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, BatchTooLarge):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def exact_spectra(
    mats: torch.Tensor | Sequence[torch.Tensor],
    *,
    precision: Precision = "certified",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    top_k: int = 64,
    rtol: float = CERTIFY_RTOL,
    metrics: bool = True,
    device: str | torch.device = "auto",
    method: Method = "gram",
    max_batch_bytes: int | None = None,
    hard_limit_bytes: int | None = None,
    workers: int | None = DEFAULT_WORKERS,
    backend: Backend = "auto",
) -> Spectra:
    """Exact singular values of equally shaped matrices, with the precision each was computed in.

    Args:
        mats: ``(b, out, in)`` tensor or a sequence of ``(out, in)`` tensors, any device, float. A
            sequence is never stacked on the CPU (each matrix is read in place) and stacked one chunk
            at a time on CUDA.
        precision: ``"float64"``, ``"certified"`` or ``"float32"`` (:data:`Precision`). With
            ``"certified"`` the Gram matrix is formed in float64, solved in float32 and checked by
            :func:`spectra.linalg.certify_float32` for ``thresholds``, ``top_k`` and ``rtol``; a matrix
            that fails is solved again in float64 from the same Gram matrix. ``method="svd"`` has no
            certificate: ``"certified"`` runs it in float64.
        thresholds: energy-rank thresholds τ that must come out exact (certified precision only).
        top_k: leading singular values that must be within ``rtol`` (certified precision only).
        rtol: relative tolerance of the float metrics (certified precision only).
        metrics: certify the norms, stable, effective and signal rank too; False when only the
            leading ``top_k`` values and the energy ranks are reported (the weights' own spectra).
        device: where to compute (``"auto"``: CUDA if available).
        method: ``"gram"`` or ``"svd"`` (:mod:`spectra.linalg`).
        max_batch_bytes: memory a torch chunk may use; default from :func:`batch_budget`.
        hard_limit_bytes: for tests: a torch chunk whose estimate exceeds this raises
            :class:`BatchTooLarge` as an allocation failure would, exercising the split-and-retry path.
        workers: CPU backend: matrices solved at once (default ``torch.get_num_threads()``).
        backend: ``"auto"``, ``"lapack"`` (CPU only) or ``"torch"`` (:data:`Backend`).

    Returns:
        :class:`Spectra`; ``S`` is float64 ``(b, p)``, each row descending.

    Example:
        >>> M = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        >>> res = exact_spectra([M, 2 * M], device="cpu")
        >>> res.S.round(6).tolist(), res.precision
        ([[3.0, 2.0, 1.0], [6.0, 4.0, 2.0]], ('float32-certified', 'float32-certified'))
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}. Got {precision!r} instead.")
    if method not in ("gram", "svd"):
        raise ValueError(f"method must be 'gram' or 'svd'. Got {method!r} instead.")
    if backend not in ("auto", "lapack", "torch"):
        raise ValueError(f"backend must be 'auto', 'lapack' or 'torch'. Got {backend!r} instead.")
    if isinstance(mats, (torch.Tensor, np.ndarray)):
        mats = real_tensor(mats, "mats")
        if mats.ndim != 3:
            raise ValueError(f"mats must have shape (b, out, in). Got {tuple(mats.shape)} instead.")
        count, shape = int(mats.shape[0]), (int(mats.shape[1]), int(mats.shape[2]))
    else:
        mats = [real_tensor(m, "each matrix") for m in mats]
        if not mats or any(m.ndim != 2 or m.shape != mats[0].shape for m in mats):
            raise ValueError(f"mats must be equally shaped (out, in) matrices. Got {[tuple(m.shape) for m in mats]} instead.")
        count, shape = len(mats), (int(mats[0].shape[0]), int(mats[0].shape[1]))
    workers = check_workers(workers, torch.get_num_threads())
    # a NaN rtol turned the certificate's norm checks off (every comparison with NaN is False)
    rtol, top_k = check_number(rtol, "rtol", 0.0, 1.0), check_index(top_k, "top_k", 0, 1 << 62)
    thresholds = tuple(check_tau(t, "each threshold") for t in thresholds)
    for name, limit in (("max_batch_bytes", max_batch_bytes), ("hard_limit_bytes", hard_limit_bytes)):
        if limit is not None:  # no upper bound: a cap above the memory there is no cap (--batch-memory 2^42 MiB)
            check_index(limit, name, 1, 1 << 256)
    dev = resolve_device(device)
    check_device_available(dev)
    if backend == "auto":
        backend = "lapack" if dev.type == "cpu" and method == "gram" else "torch"
    if backend == "lapack" and (dev.type != "cpu" or method != "gram"):
        raise ValueError(f"backend 'lapack' runs the Gram method on the CPU. Got device {dev}, method {method!r} instead.")
    if method == "svd" and precision == "certified":
        precision = "float64"  # no certificate for svdvals; the reference path it is
    p = min(shape)
    if p == 0 or count == 0:
        empty = np.zeros(count)
        return Spectra(np.zeros((count, p)), ("float64",) * count, ((),) * count, empty, empty.copy())  # nothing to certify
    check = dict(thresholds=tuple(float(t) for t in thresholds), top_k=top_k, rtol=rtol, metrics=metrics, shape=shape)
    try:
        if backend == "lapack":
            rows = _lapack_batch(mats, count, precision, check, workers)
        else:
            rows = _torch_batch(mats, count, shape, dev, precision, method, check, max_batch_bytes, hard_limit_bytes)
    except (np.linalg.LinAlgError, torch.linalg.LinAlgError, ValueError):  # "did not converge", NaN metrics: NaN input?
        _refuse_non_finite(mats)
        raise
    S = np.stack([r[0] for r in rows])
    if not np.isfinite(S).all():  # checked after, not before: a pass over every matrix costs the diff ~1.5%
        _refuse_non_finite(mats)
    return Spectra(S=S, precision=tuple(r[1] for r in rows), failed=tuple(r[2] for r in rows),
                   gram_seconds=np.array([r[3] for r in rows]), eig_seconds=np.array([r[4] for r in rows]))


def _refuse_non_finite(mats: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """ValueError naming the first of ``mats`` that holds NaN or Inf (its singular values are undefined); none: returns."""
    bad = next((i for i, m in enumerate(mats) if not all_finite(m)), None)
    if bad is not None:
        raise ValueError(f"mats[{bad}] holds NaN or Inf: its singular values are undefined.")


def batch_singular_values(
    mats: torch.Tensor | Sequence[torch.Tensor],
    *,
    device: str | torch.device = "auto",
    method: Method = "gram",
    dtype: torch.dtype = torch.float64,
    max_batch_bytes: int | None = None,
    hard_limit_bytes: int | None = None,
    workers: int | None = DEFAULT_WORKERS,
    backend: Backend = "auto",
) -> np.ndarray:
    """Exact singular values of equally shaped matrices in ``dtype`` (float64 or plain float32):
    :func:`exact_spectra`'s values, without a certificate.

    Returns:
        float64 array ``(b, p)``, each row descending.
    """
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32. Got {dtype} instead.")
    precision: Precision = "float64" if dtype == torch.float64 else "float32"
    return exact_spectra(mats, precision=precision, device=device, method=method, max_batch_bytes=max_batch_bytes,
                         hard_limit_bytes=hard_limit_bytes, workers=workers, backend=backend).S


# ---- CPU backend: LAPACK through scipy, matrices in parallel threads ----------------------------------
_Row = tuple[np.ndarray, str, tuple[str, ...], float, float]  # S, precision, failed checks, gram s, eig s


def _eigvalsh(G: np.ndarray, solver: str) -> np.ndarray:
    """Eigenvalues (descending, float64) of the matrix whose upper triangle ``G`` holds, by ``solver``
    (:data:`EIG_DRIVERS`); ``G`` may be destroyed."""
    if solver == "torch":
        return torch.linalg.eigvalsh(torch.from_numpy(G), UPLO="U").numpy()[::-1].astype(np.float64)
    return eigvalsh_upper(G, driver=solver, overwrite=True)


def float32_exponent(trace: float) -> int:
    """The power of two ``f`` to divide a float64 Gram matrix by before rounding it to float32 (0: none
    needed), from its trace (the largest entry is at most the trace): outside ``[2⁻⁶⁰, 2⁶⁰]`` its entries
    would overflow or become subnormal (absolute, not relative, rounding), which the certificate's
    relative bound does not cover. Eigenvalues are then multiplied by ``2**f``.

    >>> float32_exponent(3.0), float32_exponent(1e-40)
    (0, -132)
    """
    if not math.isfinite(trace) or trace <= 0.0:
        return 0
    f = math.frexp(trace)[1]
    return f if abs(f) > 60 else 0


def _lapack_one(M: np.ndarray, precision: str, check: dict, alone: bool = False) -> _Row:
    """Gram (``syrk``), eigensolve, and for ``"certified"`` the certificate and the float64 fallback;
    a matrix outside :data:`GRAM_SCALE_LIMIT` is scaled by a power of two first (a max and a min pass, for
    float64 input or a float32 Gram only: about 3% of a 576 × 1536 Gram's time)."""
    t0 = time.perf_counter()
    p = min(M.shape)
    gram_dtype = np.float32 if precision == "float32" else np.float64
    # float32 entries always square within float64's range, so only float64 input or a float32 Gram is checked
    guard = M.size and (M.dtype == np.float64 or gram_dtype is np.float32)
    e = gram_scale_exponent(max(float(M.max()), -float(M.min())), gram_dtype) if guard else 0
    if e:
        M = np.ldexp(M, -e)  # exact: a power of two (a copy, only for such extreme matrices)
    G = gram_upper(M, dtype=gram_dtype)
    t1 = time.perf_counter()
    failed: tuple[str, ...] = ()
    if precision == "certified":
        trace, fro = trace_and_fro(G)
        f = float32_exponent(trace)  # in float32's normal range: the certificate's bound is relative
        G32 = (G * 2.0**-f if f else G).astype(np.float32, order="F")
        lam = np.ldexp(_eigvalsh(G32, eig_driver(p, alone=alone)), f)
        cert = certify_float32(lam, trace=trace, gram_fro=fro, **check)
        label = "float32-certified"
        if not cert.ok:
            failed, label = cert.failed, "float64"
            lam = _eigvalsh(G, eig_driver(p, alone=alone))
    else:
        label = precision
        lam = _eigvalsh(G, eig_driver(p, alone=alone))
    S = np.sqrt(np.maximum(lam, 0.0))
    if e:
        S = np.ldexp(S, e)
    return S, label, failed, t1 - t0, time.perf_counter() - t1


def _lapack_batch(mats: torch.Tensor | list[torch.Tensor], count: int, precision: str, check: dict, workers: int) -> list[_Row]:
    """Every matrix on the CPU: with several matrices, up to ``workers`` at once with one BLAS thread
    each (:func:`map_one_blas_thread`); a lone matrix with one BLAS thread below
    :data:`ALONE_THREADS_MIN_P`, every thread above."""
    arrays = [as_numpy(mats[i]) for i in range(count)]
    workers = max(1, min(workers, count))
    if workers == 1 and min(arrays[0].shape) >= ALONE_THREADS_MIN_P:
        with ThreadPoolExecutor(1, thread_name_prefix="spectra-eig") as pool:
            return list(pool.map(lambda M: _lapack_one(M, precision, check, True), arrays))
    return map_one_blas_thread(lambda M: _lapack_one(M, precision, check), arrays, workers)


# ---- torch backend: batched chunks on any device ------------------------------------------------------
def _torch_batch(mats: torch.Tensor | list[torch.Tensor], count: int, shape: tuple[int, int], dev: torch.device, precision: str,
                 method: str, check: dict, max_batch_bytes: int | None, hard_limit_bytes: int | None) -> list[_Row]:
    """Chunks sized by :func:`batch_budget`, halved on an allocation failure down to one matrix."""
    dtype = torch.float32 if precision == "float32" else torch.float64
    per = estimate_batch_bytes(shape, dtype, method)
    chunk = max(1, min(count, batch_budget(dev, max_batch_bytes) // max(per, 1)))

    def take(i: int, n: int) -> torch.Tensor:
        if isinstance(mats, torch.Tensor):
            return mats[i : i + n]
        return mats[i].unsqueeze(0) if n == 1 else torch.stack(mats[i : i + n])

    rows: list[_Row] = []
    i = 0
    while i < count:
        n = min(chunk, count - i)
        try:
            if hard_limit_bytes is not None and n * per > hard_limit_bytes:
                raise BatchTooLarge(f"chunk of {n} needs {n * per} bytes > {hard_limit_bytes}")
            rows += _torch_chunk(take(i, n).to(dev, non_blocking=True), precision, method, check)
        except Exception as exc:  # noqa: BLE001 - only allocation failures are retried
            if not _is_oom(exc):
                raise
            if n == 1:
                if isinstance(exc, BatchTooLarge):  # a single matrix always runs; the cap is advisory
                    rows += _torch_chunk(take(i, 1).to(dev), precision, method, check)
                    i += 1
                    continue
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            chunk = max(1, n // 2)
            continue
        i += n
    return rows


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _scaled(batch: torch.Tensor, target: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """``batch`` ``(n, out, in)`` with each matrix divided by its :func:`gram_scale_exponent` for ``target``
    (a power of two: exact; none for ordinary matrices), and the ``(n,)`` exponents to multiply values back by."""
    amax = torch.maximum(batch.amax(dim=(-2, -1)), -batch.amin(dim=(-2, -1))).double().cpu().tolist()
    ex = np.array([gram_scale_exponent(a, target) for a in amax], dtype=int)
    if ex.any():
        batch = torch.ldexp(batch, torch.as_tensor(-ex, device=batch.device).reshape(-1, 1, 1)).to(batch.dtype)
    return batch, ex


def _torch_chunk(batch: torch.Tensor, precision: str, method: str, check: dict) -> list[_Row]:
    """One stacked chunk ``(n, out, in)``: float64/float32 as asked, or certified float32 with a
    float64 recompute of the matrices whose certificate fails (from the same float64 Gram)."""
    n = batch.shape[0]
    t0 = time.perf_counter()
    if method == "svd":
        ex = np.zeros(n, dtype=int)
        if batch.dtype == torch.float64 and precision == "float32":  # float64 beyond float32's range: scale first
            batch, ex = _scaled(batch, torch.float32)
        S = torch.linalg.svdvals(batch.to(torch.float32 if precision == "float32" else torch.float64))
        S = np.ldexp(S.double().cpu().numpy(), ex.reshape(-1, 1))
        sec = (time.perf_counter() - t0) / n
        return [(S[j], precision, (), 0.0, sec) for j in range(n)]
    gram_dtype = torch.float32 if precision == "float32" else torch.float64
    # per matrix, a power of two that keeps its Gram matrix in range (GRAM_SCALE_LIMIT; usually 0)
    exps = np.zeros(n, dtype=int)  # float32/bf16 entries always square within float64's range: only the others are checked
    if batch.dtype == torch.float64 or gram_dtype == torch.float32:
        batch, exps = _scaled(batch, gram_dtype)
    G = gram(batch, dtype=gram_dtype)
    _sync(G)
    t1 = time.perf_counter()
    failed: list[tuple[str, ...]] = [()] * n
    labels = [precision] * n
    if precision == "certified":
        traces = G.diagonal(dim1=-2, dim2=-1).sum(-1).cpu().numpy()
        fs = np.array([float32_exponent(float(t)) for t in traces])  # as the CPU backend: float32's normal range
        G32 = torch.ldexp(G, torch.as_tensor(-fs, device=G.device).reshape(-1, 1, 1)).float() if fs.any() else G.float()
        lam = np.ldexp(torch.linalg.eigvalsh(G32).flip(-1).double().cpu().numpy(), fs.reshape(-1, 1))
        fros = torch.linalg.matrix_norm(G).cpu().numpy()
        certs = [certify_float32(lam[j], trace=float(traces[j]), gram_fro=float(fros[j]), **check) for j in range(n)]
        labels = ["float32-certified" if c.ok else "float64" for c in certs]
        failed = [c.failed for c in certs]
        redo = [j for j, c in enumerate(certs) if not c.ok]
        if redo:
            lam[redo] = torch.linalg.eigvalsh(G[redo]).flip(-1).cpu().numpy()
    else:
        lam = torch.linalg.eigvalsh(G).flip(-1).double().cpu().numpy()
    S = np.sqrt(np.maximum(lam, 0.0))
    if any(exps):
        S = np.ldexp(S, np.array(exps).reshape(-1, 1))
    t2 = time.perf_counter()
    return [(S[j], labels[j], failed[j], (t1 - t0) / n, (t2 - t1) / n) for j in range(n)]


# ---- factored path ---------------------------------------------------------------------------------
def factored_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, *,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``ΔW = scale · B · A`` without forming the ``(out, in)`` product.

    Args:
        B: ``(out, r)`` (PEFT's ``lora_B.weight``).
        A: ``(r, in)`` (PEFT's ``lora_A.weight``).
        scale: ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA).
        dtype: working precision, torch.float32 or torch.float64 (ValueError otherwise: half precision has no QR).

    Returns:
        ``U (out, r)``, ``S (r,)`` descending, ``Vh (r, in)`` with ``U diag(S) Vh = scale·B·A``.
        Cost O((out + in)·r²): QR of B and of Aᵀ, then the SVD of the r × r core
        ``scale · R_B R_Aᵀ``. Finite factors and scale whose product overflows ``dtype`` give NaN values:
        callers check ``S`` (each names the module and its lora_alpha).
    """
    if dtype not in (torch.float32, torch.float64):  # float16 failed deep inside ("geqrf_cpu" not implemented for 'Half')
        raise ValueError(f"dtype must be torch.float32 or torch.float64. Got {dtype!r} instead.")
    B, A = finite_tensor(B, "B").to(dtype), finite_tensor(A, "A").to(dtype)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"B must be (out, r) and A (r, in) with one r. Got B {tuple(B.shape)}, A {tuple(A.shape)} instead.")
    one = isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.is_complex() and scale.dtype != torch.bool
    scale = float(scale.detach().reshape(())) if one else scale  # type: ignore[union-attr]
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (lora_alpha / r; 0 and negative ones are fine). Got {scale!r} instead.")
    Qb, Rb = torch.linalg.qr(B, mode="reduced")      # (out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.mT, mode="reduced")   # (in, r), (r, r)
    core = float(scale) * (Rb @ Ra.mT)
    if not all_finite(core):  # the SVD would fail to converge on inf: NaN values, as promised above
        k = min(core.shape)
        return Qb[:, :k], torch.full((k,), math.nan, dtype=core.dtype, device=core.device), Qa[:, :k].mT
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    return Qb @ Uc, S, Vch @ Qa.mT
