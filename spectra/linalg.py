"""Exact spectra of weight updates: the singular values of ``(..., out, in)`` matrices, and the
certificate that lets a float32 spectrum stand in for the float64 one.

Pure functions: the torch ones take tensors on any device, the LAPACK ones numpy arrays on the CPU;
spectra come back as float64 numpy arrays (sums over a spectrum are always float64, docs/definitions.md).

Two exact methods:

``"gram"`` (default)
    Form the smaller Gram matrix ``G = M Mᵀ`` (out <= in) or ``Mᵀ M`` (p × p, p = min(out, in)) and
    take its eigenvalues with a symmetric eigensolver; ``σᵢ = sqrt(max(λᵢ, 0))``. Two kernels:
    :func:`gram` + ``torch.linalg.eigvalsh`` (any device, batched; the CUDA path), and
    :func:`gram_upper` + :func:`eigvalsh_upper` (numpy's BLAS and LAPACK, which release the GIL) on
    the CPU, where several matrices are solved at once in threads, one BLAS thread each
    (:mod:`spectra.engine`).

    Precision: eigenvalues of G carry an absolute error of about ``p · eps · σ₁²``. In float64
    (eps ≈ 1.1e-16) singular values are accurate down to ≈ 1e-7·σ₁, so energy ranks, norms, stable
    and effective rank are exact for any practical purpose. In float32 (eps ≈ 6e-8) singular values
    below ≈ 3e-3·σ₁ become noise, which inflates the nuclear norm and effective rank of low-rank
    updates, and an energy rank whose cumulative energy lies close to τ can move by one. Plain
    float32 is therefore only a speed option; :func:`certify_float32` decides, per matrix, whether a
    float32 spectrum gives the float64 results (below).

``"svd"``
    ``torch.linalg.svdvals`` in the requested dtype: backward-stable, every singular value
    accurate to ``eps · σ₁``; slower on the CPU by 10-50×.

Certified float32 (:func:`certify_float32`)
    The Gram matrix is formed in float64 (its rounding error, ``n · 1.1e-16 · ‖M‖_F²`` at worst, is
    negligible), rounded to float32 and solved in float32. The computed eigenvalues are then the exact
    eigenvalues of ``G + E`` with ``‖E‖_F <= Δ = (1 + c·(1 + u)) · u · ‖G‖_F``, ``u = 2⁻²⁴``: the rounding
    to float32 contributes at most ``u · ‖G‖_F`` (each entry moves by at most ``u·|Gᵢⱼ|``), and the
    eigensolver's normwise backward error is at most ``c · u · ‖G‖_F`` (LAPACK's error model, Anderson
    et al., LAPACK Users' Guide §4.7: "a modestly growing function of p" times ``u·‖G‖``), with
    ``c = c₀·√p`` and ``c₀`` = :data:`spectra.metrics.EIG_BACKWARD_C0` taken from measurement (see the constant). From
    ``‖E‖_F <= Δ`` alone, rigorously:

    - Weyl: every eigenvalue ``|λ̂ᵢ − λᵢ| <= ‖E‖₂ <= Δ``;
    - Ky Fan: every partial sum ``|Σ_{i<=k} (λ̂ᵢ − λᵢ)| <= Σ_{i<=k} σᵢ(E) <= √k · Δ``, and the same
      for the tail sums with ``√(p − k)``;
    - Hoffman–Wielandt: ``Σᵢ (λ̂ᵢ − λᵢ)² <= Δ²``.

    The energy rank at τ is accepted when the true cumulative energy is on the same side of
    ``τ · ‖M‖_F²`` (known exactly, the trace of the float64 Gram) as the computed one for both the
    chosen rank and the one before, with these margins; the float metrics (Frobenius and spectral
    norm, stable rank, nuclear norm, effective rank, the leading singular values) when their
    worst-case relative error under these bounds is at most ``rtol``; the signal rank when no
    singular value's interval straddles the threshold's. Otherwise the caller recomputes in float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch

from spectra.errors import ConfigError
from spectra.metrics import SQUARING_LIMIT, float32_error_bound, rank_resolution, refuse_meta, spectrum_metrics
from spectra.randmat import gavish_donoho_omega

Method = Literal["gram", "svd"]


def validate_device(device: str | torch.device, name: str = "--device") -> None:
    """Raise :class:`ConfigError` unless ``device`` is auto, cpu (or cpu:0), cuda or cuda:N (N an ASCII index from 0 to 127
    without leading zeros: torch parses "cuda:01" nowhere, "cuda:٣" raised deep inside, and its int8 index
    read "cuda:128" as cuda:-128), as a string or a ``torch.device`` (meta or mps failed deep inside). ``name``: the
    option or argument the message names."""
    device = str(device) if isinstance(device, torch.device) else device
    # cpu:0 is torch's own name of torch.device("cpu", 0)
    m = re.fullmatch(r"cpu(?::0)?|cuda(?::(0|[1-9][0-9]{0,2}))?", device, flags=re.ASCII) if isinstance(device, str) else None
    if device != "auto" and (m is None or (m.group(1) is not None and int(m.group(1)) > 127)):
        raise ConfigError(f"{name} must be auto, cpu, cuda or cuda:N (N from 0 to 127). Got {device!r} instead")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; cpu, cuda or cuda:N (a string or a ``torch.device``) as
    ``torch.device``; anything else a :class:`ConfigError` (:func:`validate_device`)."""
    validate_device(device, "device")  # the Python API's argument (the commands check --device before)
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


#: A matrix whose largest |entry| lies outside ``[2**-L, 2**L]`` is scaled by a power of two before
#: its Gram matrix is formed, L by the Gram's dtype: squaring doubles the exponent, so float64 weights
#: near 1e200 overflow the Gram (inf) and updates near 1e-160 underflow it (reported as zero). A
#: power of two scales exactly, and inside the range nothing is scaled, so ordinary inputs give
#: bit-identical spectra. At L the Gram's entries stay below 2**(2L) times the long dimension.
GRAM_SCALE_LIMIT = {np.dtype(np.float64): 256, np.dtype(np.float32): 32}


def gram_scale_exponent(amax: float, gram_dtype: type[np.floating] | torch.dtype) -> int:
    """The power of two ``e`` to divide a matrix by before forming its Gram matrix in ``gram_dtype``
    (0: none needed), from its largest ``|entry|`` ``amax``; singular values are then multiplied by
    ``2**e``. Nonzero only outside :data:`GRAM_SCALE_LIMIT` (NaN, Inf and 0 give 0).

    >>> gram_scale_exponent(1e-160, np.float64), gram_scale_exponent(3.0, np.float64)
    (-531, 0)
    """
    dt = np.dtype(np.float32 if gram_dtype in (torch.float32, np.float32) else np.float64)
    if not math.isfinite(amax) or amax == 0.0:
        return 0
    e = math.frexp(amax)[1]
    return e if abs(e) > GRAM_SCALE_LIMIT[dt] else 0


def check_device_available(device: torch.device) -> None:
    """Raise :class:`~spectra.errors.ConfigError` when a CUDA device is asked for that this machine does not have."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (device.index is not None and device.index >= count):
        # (worded for both the commands' --device and the Python API's device argument)
        raise ConfigError(f"device {device} was asked for but this machine has {count} CUDA device(s)",
                          hint="use the device cpu, auto or an existing cuda:N")


def gram(M: torch.Tensor, *, dtype: torch.dtype = torch.float64, block_bytes: int = 64 << 20) -> torch.Tensor:
    """The smaller Gram matrix of ``M``, accumulated in ``dtype``.

    Args:
        M: tensor of shape ``(..., out, in)``.
        dtype: precision of the products and the sum.
        block_bytes: the long dimension is upcast and multiplied in blocks of at most this many
            bytes, so a float64 Gram of a float32 ``32000 × 2048`` embedding never holds a float64
            copy of the whole matrix (memory stays at one block plus the p × p result).

    Returns:
        ``(..., p, p)`` with ``p = min(out, in)``: ``M Mᵀ`` when ``out <= in`` else ``Mᵀ M``.
    """
    wide = M.shape[-2] <= M.shape[-1]
    X = M if wide else M.mT  # (..., p, long): G = X Xᵀ = Σ_blocks X_b X_bᵀ
    p, long = X.shape[-2], X.shape[-1]
    per_col = max(1, p * torch.empty(0, dtype=dtype).element_size() * max(1, X[..., 0, 0].numel()))
    step = max(1, min(long, block_bytes // per_col))
    if step >= long:
        Xd = X.to(dtype)
        return Xd @ Xd.mT
    G = torch.zeros(*X.shape[:-2], p, p, dtype=dtype, device=M.device)
    for start in range(0, long, step):
        Xb = X[..., start : start + step].to(dtype)
        G.addmm_(Xb, Xb.mT) if G.ndim == 2 else G.baddbmm_(Xb, Xb.mT)
    return G


def singular_values(
    M: torch.Tensor,
    *,
    method: Method = "gram",
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """All singular values of ``M`` (or of each matrix in a batch), descending.

    Args:
        M: ``(out, in)`` or ``(batch, out, in)`` float tensor on any device.
        method: ``"gram"`` (eigenvalues of the smaller Gram matrix) or ``"svd"``; see the module
            docstring for their precision.
        dtype: precision of the decomposition (float64 or float32).

    Returns:
        float64 array of shape ``(p,)`` or ``(batch, p)``, ``p = min(out, in)``, non-negative,
        descending.

    Example:
        >>> M = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        >>> singular_values(M).round(6).tolist()
        [3.0, 2.0, 1.0]
    """
    if dtype not in (torch.float32, torch.float64):  # float16 has no eigensolver, and would lose the spectrum
        raise ValueError(f"dtype must be torch.float32 or torch.float64. Got {dtype!r} instead.")
    M = real_tensor(M, "M")
    if M.ndim not in (2, 3):
        raise ValueError(f"M must have shape (out, in) or (batch, out, in). Got {tuple(M.shape)} instead.")
    if min(M.shape[-2:]) == 0 or M.numel() == 0:  # an empty batch too: the inf-norm of no entries raised
        return np.zeros(M.shape[:-2] + (min(M.shape[-2:]),), dtype=np.float64)
    if not M.is_floating_point():  # integers and booleans: exact in the decomposition's dtype
        M = M.to(dtype)
    elif M.element_size() == 1:  # fp8 has no norm kernel; float32 holds every fp8 value exactly
        M = M.float()
    amax = torch.linalg.vector_norm(M, ord=math.inf, dim=(-2, -1)).reshape(-1).tolist()
    if not all(math.isfinite(a) for a in amax):
        raise ValueError("M holds NaN or Inf: its singular values are undefined.")
    # values whose squares leave the decomposition's range (in float32, 1e-30 squared underflows to 0) are
    # scaled by a power of two first: exact, and undone on the values; each matrix of a batch by its own (one
    # 1e-170 matrix beside a normal one underflowed to zeros)
    e = np.array([gram_scale_exponent(a, dtype) for a in amax], dtype=np.int64).reshape(M.shape[:-2])
    if e.any():
        M = torch.ldexp(M.to(torch.promote_types(M.dtype, dtype)), torch.as_tensor(-e, device=M.device)[..., None, None])
    if method == "gram":
        lam = torch.linalg.eigvalsh(gram(M, dtype=dtype))  # ascending
        s = lam.clamp_min_(0).sqrt_().flip(-1)
    elif method == "svd":
        s = torch.linalg.svdvals(M.to(dtype))
    else:
        raise ValueError(f"method must be 'gram' or 'svd'. Got {method!r} instead.")
    return np.ldexp(s.double().cpu().numpy(), e[..., None])


def real_tensor(M: object, name: str) -> torch.Tensor:
    """``M`` (a tensor or numpy array) detached, as a tensor; complex input is refused (a cast to a
    real dtype would drop its imaginary part). Lists and tuples are read as numpy reads them (Python
    floats as float64), not rounded to torch's default dtype (float32, or bf16 if a caller set it)."""
    if not isinstance(M, (torch.Tensor, np.ndarray)):
        try:
            M = np.asarray(M)
        except ValueError as exc:  # ragged lists: numpy's "inhomogeneous shape" named no argument
            raise ValueError(f"{name} must be a rectangular array of numbers ({exc})") from None
        if M.dtype.kind not in "biufc":  # strings, None: torch's TypeError named no argument
            raise ValueError(f"{name} must hold numbers. Got numpy dtype {M.dtype} instead.")
    if isinstance(M, np.ma.MaskedArray):  # torch reads the data under the mask: masked values counted silently
        raise ValueError(f"{name} is a masked array: pass the values to use ({name}.compressed()) or .filled() ones.")
    if isinstance(M, np.ndarray) and (not M.dtype.isnative or any(st < 0 for st in M.strides)):
        # V[:, ::-1] (eigh's vectors descending) and big-endian files: torch refuses both with a message naming no argument
        M = np.ascontiguousarray(M, dtype=M.dtype.newbyteorder("="))
    t = torch.as_tensor(M).detach()
    if t.is_complex():
        raise ValueError(f"{name} must be real. Got dtype {t.dtype} instead.")
    if t.dtype == torch.bool:  # no matrix of numbers: negation and norms fail deep inside torch
        raise ValueError(f"{name} must hold numbers. Got dtype torch.bool instead (convert it with .float()).")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense tensor. Got layout {t.layout} instead (convert it with .to_dense()).")
    refuse_meta(t, name)
    return t


def row_blocks(rows: int, cols: int, block: int) -> list[slice]:
    """Slices of whole rows of a ``(rows, cols)`` matrix, each at most ``block`` entries (one row at least): the pieces
    a large matrix is upcast or differenced in, so that no full-size copy is made.

    >>> row_blocks(5, 4, 8)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 6, None)]
    """
    step = max(1, block // max(1, cols))
    return [slice(i, i + step) for i in range(0, rows, step)]


def all_finite(t: torch.Tensor) -> bool:
    """Whether the tensor ``t`` (any shape and dtype, fp8 included) holds no NaN or Inf (always for integer
    and bool tensors).

    A finite sum proves every entry finite (NaN and ±inf never sum to a finite value) at about 1/15 the
    cost of ``isfinite`` over every entry (0.15 against 2.5 ms for 1536 × 576 float64 here); entries are
    checked one by one only when the sum is not finite (NaN, Inf, or finite values whose sum overflows)."""
    if not t.is_floating_point():
        return True
    wide = t.dtype in (torch.float32, torch.float64)
    if bool((t.sum() if wide else t.sum(dtype=torch.float32)).isfinite()):  # fp8 and half sums in float32
        return True
    return bool(torch.isfinite(t if wide else t.float()).all())  # fp8 has no isfinite: upcast


def finite_tensor(M: object, name: str) -> torch.Tensor:
    """:func:`real_tensor`, refused with a one-line ValueError naming ``name`` when it holds NaN or Inf (LAPACK
    would fail to converge, or an SVD return vectors of the finite part as if nothing were wrong)."""
    t = real_tensor(M, name)
    if not all_finite(t):
        raise ValueError(f"{name} holds NaN or Inf: its measures are undefined (check the weights, or the run that made them).")
    return t


def fro_norm(M: torch.Tensor, *, block: int = 1 << 23) -> float:
    """Frobenius norm of ``M``, accumulated in float64 over blocks of ``block`` elements (no full
    float64 copy of a large matrix)."""
    flat, e, halves = real_tensor(M, "M").reshape(-1), None, (1.0, 1.0)
    for _ in range(2):
        total = 0.0
        for start in range(0, flat.numel(), block):
            chunk = flat[start : start + block].double()
            if e is not None:  # the rescaled pass only (a multiply on every pass cost ~2x); not in place:
                chunk = chunk * halves[0] * halves[1]  # .double() of float64 input is the input itself
            total += float(torch.dot(chunk, chunk).item())
        if e is not None or (math.isfinite(total) and (total >= SQUARING_LIMIT**-2 or total == 0.0 and not bool(flat.any()))):
            return total**0.5 / halves[0] / halves[1]  # inf where the norm itself overflows
        # squares out of float64's range (values near 1e±160, or a sum that overflowed): again, scaled by 2**-e
        amax = float(torch.linalg.vector_norm(flat, ord=math.inf))
        if not (math.isfinite(amax) and amax > 0):
            return amax
        e = math.frexp(amax)[1]  # down to -1073 for subnormals: 2**1073 overflows, so it is applied in two halves
        halves = (math.ldexp(1.0, -(e // 2)), math.ldexp(1.0, e // 2 - e))
    return total**0.5 / halves[0] / halves[1]


# ---- the LAPACK route on the CPU: numpy arrays, one call per matrix ------------------------------
def as_numpy(m: torch.Tensor) -> np.ndarray:
    """A CPU float32/float64 numpy view of ``m`` (a copy only for other dtypes, upcast to float32, or devices)."""
    m = m.detach()
    if m.device.type != "cpu":
        m = m.cpu()
    if m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    return m.numpy()


def gram_upper(M: np.ndarray, *, dtype: type[np.floating] = np.float64, block_bytes: int = 32 << 20) -> np.ndarray:
    """The smaller Gram matrix of ``M``, accumulated in ``dtype``, by numpy's BLAS.

    numpy releases the GIL around its BLAS calls (scipy's f2py BLAS/LAPACK wrappers hold it:
    two threads calling ``scipy.linalg.blas.dsyrk`` or ``scipy.linalg.eigvalsh`` run one after the
    other, measured in ``bench/eigensolvers.py``), so several calls run at once in worker threads.
    ``X.T @ X`` on one buffer is dispatched to ``syrk`` by numpy (one triangle, mirrored).

    Args:
        M: ``(out, in)`` float32 or float64 array.
        dtype: ``np.float64`` or ``np.float32``: precision of the products and the sum.
        block_bytes: the long dimension is converted to ``dtype`` and multiplied in blocks of at most
            this many bytes, so a float64 Gram of a float32 ``49152 × 576`` embedding never holds a
            float64 copy of the whole matrix.

    Returns:
        Fortran-ordered symmetric ``(p, p)`` array, ``p = min(out, in)``: ``M Mᵀ`` (``out <= in``) or
        ``Mᵀ M``. Both triangles are filled; the LAPACK callers read the upper one.

    Example:
        >>> G = gram_upper(np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]))
        >>> G.tolist()
        [[5.0, 2.0], [2.0, 2.0]]
    """
    if M.ndim != 2:
        raise ValueError(f"M must have shape (out, in). Got {M.shape} instead.")
    dtype = np.dtype(dtype).type
    wide = M.shape[0] <= M.shape[1]
    p, long = min(M.shape), max(M.shape)
    step = max(1, min(long, block_bytes // max(1, p * np.dtype(dtype).itemsize)))
    G = None
    for start in range(0, long, step):
        # one buffer times its own transpose is one syrk; a wide M is multiplied as it lies (A·Aᵀ):
        # copying it transposed first cost a 576 × 1536 float32 Gram matrix 5.4 ms instead of 3.3
        if wide:
            A = np.ascontiguousarray(M[:, start : start + step], dtype=dtype)  # (p, w)
            prod = A @ A.T
        else:
            A = np.ascontiguousarray(M[start : start + step], dtype=dtype)  # (w, p)
            prod = A.T @ A
        if G is None:
            G = prod
        else:
            G += prod
    if G is None:  # long == 0: an empty product
        G = np.zeros((p, p), dtype=dtype)
    return G.T  # symmetric: the transpose is the same matrix, Fortran-ordered, without a copy


#: ``eigvalsh_upper`` solvers: numpy's ``eigvalsh`` (LAPACK ``syevd``, the GIL released) and scipy's drivers.
EIGVALSH_DRIVERS = ("numpy", "evd", "evr", "ev")


def eigvalsh_upper(G: np.ndarray, *, driver: str = "numpy", overwrite: bool = False) -> np.ndarray:
    """Eigenvalues of the symmetric matrix whose upper triangle ``G`` holds, by LAPACK.

    Args:
        G: ``(p, p)`` float32 or float64 array; the strict lower triangle is ignored.
        driver: ``"numpy"`` (default: ``numpy.linalg.eigvalsh``, divide and conquer ``syevd``, which
            releases the GIL so that threads solve matrices in parallel), or scipy's ``eigvalsh``
            driver ``"evd"``, ``"evr"`` (MRRR) or ``"ev"`` (QR iteration), which hold the GIL. All are
            backward stable (``bench/eigensolvers.py`` times them).
        overwrite: let scipy's LAPACK destroy ``G`` (saves a copy; numpy always works on a copy).

    Returns:
        float64 array ``(p,)``, descending, as the solver computed them (in G's precision; small
        negative values are kept: the certificate needs them raw).
    """
    if driver not in EIGVALSH_DRIVERS:
        raise ValueError(f"driver must be one of {EIGVALSH_DRIVERS}. Got {driver!r} instead.")
    if G.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    if driver == "numpy":
        lam = np.linalg.eigvalsh(G, UPLO="U")
    else:
        lam = scipy.linalg.eigvalsh(G, lower=False, driver=driver, overwrite_a=overwrite, check_finite=False)
    return lam[::-1].astype(np.float64)


def trace_and_fro(G: np.ndarray) -> tuple[float, float]:
    """``(trace(G), ‖G‖_F)`` in float64 of the symmetric matrix whose upper triangle ``G`` holds.

    ``trace(G) = ‖M‖_F²`` for a Gram matrix: the exact total energy the certificate compares with.
    """
    d = np.diagonal(G).astype(np.float64)
    upper = np.triu(G, 1).astype(np.float64, copy=False)
    return float(d.sum()), math.sqrt(float(d @ d) + 2.0 * float(np.vdot(upper, upper)))


#: Entries of the largest block :func:`thin_qr` orthonormalises by numpy's QR rather than torch's.
SMALL_QR = 1 << 16


def thin_qr(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced QR ``(Q (n, k), R (k, k))`` of ``Y (n, k)``, same dtype and device. On the CPU a small block by
    numpy, whose LAPACK runs on the caller's BLAS threads (:func:`spectra.threads.one_blas_thread`): torch's woke its
    OpenMP team for each call (13 of an interfere's 42 s over 300 matrices of 2 × 2, 15 ms a QR on a loaded 2-core
    machine; 576 × 10 in a loop: 3.0 against 0.23 ms); a large one by torch (49152 × 8: 63 against 99 ms)."""
    if Y.device.type == "cpu" and Y.numel() <= SMALL_QR:
        Q, R = np.linalg.qr(Y.numpy(), mode="reduced")
        return torch.from_numpy(Q), torch.from_numpy(R)
    return torch.linalg.qr(Y, mode="reduced")


# ---- certified float32 ------------------------------------------------------------------------------
#: Default relative tolerance of the float metrics of a certified float32 spectrum.
CERTIFY_RTOL = 1e-4


@dataclass(frozen=True)
class Certificate:
    """Whether a float32 spectrum gives a matrix's float64 results.

    Attributes:
        ok: every check passed: the integer metrics computed from the float32 spectrum (energy ranks,
            signal rank) equal the exact ones, the float metrics are within ``rtol`` of them.
        failed: the checks that did not pass, e.g. ``("energy_rank[0.9]", "nuclear_norm")``.
        bound: ``Δ`` of :func:`spectra.metrics.float32_error_bound` (units of σ²).
    """

    ok: bool
    failed: tuple[str, ...]
    bound: float


def _rel_spread(value: float, lo: float, hi: float) -> float:
    """Largest relative distance from ``value`` to a point of ``[lo, hi]`` (inf when value is 0)."""
    if value <= 0.0:
        return math.inf
    return max(hi - value, value - lo) / value


def _nuclear_error(lam: np.ndarray, bound: float) -> float:
    """Bound on ``Σ |σ̂ᵢ − σᵢ|`` given ``Σ (λ̂ᵢ − λᵢ)² <= Δ²`` (Hoffman–Wielandt), ``σ̂ = √max(λ̂, 0)``.

    For the large eigenvalues, ``|σ̂ᵢ − σᵢ| <= |dᵢ| / σ̂ᵢ`` and Cauchy–Schwarz give ``Δ·sqrt(Σ 1/λ̂ᵢ)``; for
    the others ``|σ̂ᵢ − σᵢ| <= sqrt|dᵢ|`` and Hölder give ``n^{3/4}·√Δ``. The split is the best one.
    """
    asc = lam[::-1]  # ascending: the first j are the small ones
    p = asc.size
    inv = np.where(asc > 0, 1.0 / np.where(asc > 0, asc, 1.0), np.inf)
    big = np.concatenate([np.cumsum(inv[::-1])[::-1], [0.0]])  # Σ_{i>=j} 1/λ̂ᵢ for j = 0..p
    j = np.arange(p + 1)
    return float(np.min(bound * np.sqrt(big) + j**0.75 * math.sqrt(bound)))  # j = p is always finite


def _entropy_error(S: np.ndarray, lam: np.ndarray, bound: float, nuclear_err: float) -> float:
    """Bound on ``|H(σ) − H(σ̂)|`` with ``H = ln N − Σ σᵢ ln σᵢ / N``, ``N = Σσᵢ`` (effective rank = e^H).

    H is scale free, so σ is measured in units of σ̂₁. For ``λ̂ᵢ > 4Δ``: ``|φ(x) − φ(x̂)| <= Lᵢ |x − x̂|``
    with ``φ(x) = x ln x`` and ``Lᵢ`` the largest ``|ln z + 1|`` on ``x̂ᵢ ± Δ/x̂ᵢ`` (Weyl), then
    ``|dᵢ| / x̂ᵢ`` and Cauchy–Schwarz with Hoffman–Wielandt; for the rest, the largest change of φ on
    each value's Weyl interval (φ is convex, so at an end or at 1/e).
    """
    s = float(S[0])
    d = bound / s**2
    x = S / s
    xl = lam / s**2
    total = float(x.sum())
    err_n = nuclear_err / s
    if err_n >= total:
        return math.inf
    big = xl > 4 * d
    xb = x[big]
    eta = d / xb
    slope = np.maximum(np.abs(np.log(xb - eta) + 1.0), np.abs(np.log(xb + eta) + 1.0))
    err_big = d * math.sqrt(float(np.sum((slope / xb) ** 2)))

    def phi(z: np.ndarray) -> np.ndarray:
        return np.where(z > 0, z * np.log(np.where(z > 0, z, 1.0)), 0.0)

    xs, ls = x[~big], xl[~big]
    zl = np.sqrt(np.maximum(ls - d, 0.0))
    zh = np.sqrt(np.maximum(ls, 0.0) + d)
    f0 = phi(xs)
    dev = np.maximum(np.abs(phi(zl) - f0), np.abs(phi(zh) - f0))
    inside = (zl < 1 / math.e) & (zh > 1 / math.e)
    dev = np.where(inside, np.maximum(dev, np.abs(-1 / math.e - f0)), dev)
    err_p = err_big + float(dev.sum())
    p_hat = float(phi(x).sum())
    rest = total - err_n
    return err_n / rest + err_p / rest + abs(p_hat) * err_n / (total * rest)


def certify_float32(
    lam: np.ndarray,
    *,
    trace: float,
    gram_fro: float,
    shape: tuple[int, int],
    thresholds: Sequence[float],
    rtol: float = CERTIFY_RTOL,
    top_k: int = 0,
    metrics: bool = True,
) -> Certificate:
    """Decide whether the float32 eigenvalues ``lam`` of a Gram matrix give its float64 results.

    The checks (see the module docstring for the bounds; ``Δ`` = :func:`spectra.metrics.float32_error_bound`):

    - energy rank at each τ: with ``k`` the rank computed from ``lam`` (:func:`spectra.metrics.energy_rank`),
      the true cumulative energy must satisfy ``E_{k−1} < τ·T <= E_k`` for every spectrum within the
      bounds, where ``T = trace`` (exact) and ``E_j`` lies within ``√j·Δ`` of the computed partial sum
      and within ``√(p − j)·Δ`` of ``T`` minus the computed tail;
    - ``fro_norm``: ``|sqrt(Σσ̂²) − sqrt(T)| <= rtol·sqrt(T)`` (T is exact, so this is a direct check);
    - ``spectral_norm``, ``stable_rank``, the leading ``top_k`` singular values: relative error
      ``<= rtol`` over each value's Weyl interval ``λ̂ᵢ ± Δ``;
    - ``nuclear_norm`` and ``effective_rank``: relative error ``<= rtol`` by the Hoffman–Wielandt bounds;
    - ``signal_rank`` (also without ``metrics``: it is reported): the count of σᵢ above ``max(ω(β)·median(σ), res)``
      (``res`` the float64 route's resolution) is the same at both ends of every value's Weyl interval.

    Args:
        lam: ``(p,)`` the computed eigenvalues, descending, unclamped (as float64).
        trace: ``trace(G) = ‖M‖_F²`` from the float64 Gram.
        gram_fro: ``‖G‖_F`` from the float64 Gram.
        shape: ``(out, in)`` of M.
        thresholds: the energy-rank thresholds τ to certify.
        rtol: relative tolerance of the float metrics.
        top_k: how many leading singular values must also be within ``rtol``.
        metrics: also check the norms, stable and effective rank (False where those are reported from the float32
            values as they are, or not at all, as for the spectra of the weights themselves).

    Returns:
        :class:`Certificate`. A zero matrix (``trace == 0``) is certified when every computed value is 0.

    Example:
        >>> lam = np.array([4.0, 1.0, 0.25])
        >>> G = np.diag(lam)
        >>> certify_float32(lam, trace=5.25, gram_fro=float(np.linalg.norm(G)), shape=(3, 5), thresholds=[0.5, 0.9]).ok
        True
    """
    lam = np.asarray(lam, dtype=np.float64)
    p = min(shape)
    if lam.shape != (p,):
        raise ValueError(f"lam must have shape ({p},) for a {shape} matrix. Got {lam.shape} instead.")
    if trace == 0.0:
        ok = not np.any(lam)
        return Certificate(ok, () if ok else ("zero matrix",), 0.0)
    D = float32_error_bound(gram_fro, p)
    S = np.sqrt(np.maximum(lam, 0.0))
    m = spectrum_metrics(S, shape, thresholds)  # the values a caller will report from S
    failed: list[str] = []
    # energy ranks: bounds on the true partial sums E_k, k = 1..p (our own float64 sums get a slack)
    slack = 4.0 * (p + 2) * 2.0**-53 * trace
    k = np.arange(1, p + 1, dtype=np.float64)
    head = np.cumsum(lam)
    tail = np.concatenate([np.cumsum(lam[::-1])[::-1][1:], [0.0]])
    hi = np.minimum(head + np.sqrt(k) * D, trace - tail + np.sqrt(p - k) * D) + slack
    lo = np.maximum(head - np.sqrt(k) * D, trace - tail - np.sqrt(p - k) * D) - slack
    lo[-1] = hi[-1] = trace  # E_p = T exactly
    for tau, r in m.energy_rank.items():
        target = tau * trace
        before = 0.0 if r == 1 else hi[r - 2]
        if r == 0 or not (before < target <= lo[r - 1]):
            failed.append(f"energy_rank[{tau}]")
    lo_s = np.sqrt(np.maximum(lam - D, 0.0))
    hi_s = np.sqrt(np.maximum(lam, 0.0) + D)
    n_top = min(top_k, p)
    top, spread = S[:n_top], np.maximum(hi_s[:n_top] - S[:n_top], S[:n_top] - lo_s[:n_top])
    if n_top and (np.any(top <= 0) or np.max(spread / np.where(top > 0, top, 1.0)) > rtol):
        failed.append("singular_values")
    # signal rank, reported whatever ``metrics``: the same count at both ends of every interval (the median is monotone),
    # above the float64 route's resolution too; a low-rank update's float32 rounding (values within √Δ of 0) fails it
    res = rank_resolution(float(hi_s[0]), p)
    omega = gavish_donoho_omega(p / max(shape))
    count_lo = int(np.sum(lo_s > max(omega * float(np.median(hi_s)), res)))
    count_hi = int(np.sum(hi_s > max(omega * float(np.median(lo_s)), res)))
    if not count_lo == count_hi == m.signal_rank:
        failed.append("signal_rank")
    if not metrics:
        return Certificate(not failed, tuple(failed), D)
    # norms and stable rank
    if abs(m.fro_norm - math.sqrt(trace)) > rtol * math.sqrt(trace):
        failed.append("fro_norm")
    l1 = float(lam[0])
    s_lo, s_hi = math.sqrt(max(l1 - D, 0.0)), math.sqrt(l1 + D)
    if _rel_spread(m.spectral_norm, s_lo, s_hi) > rtol:
        failed.append("spectral_norm")
    if l1 - D <= 0.0 or _rel_spread(m.stable_rank, trace / (l1 + D), trace / (l1 - D)) > rtol:
        failed.append("stable_rank")
    # nuclear norm and effective rank
    err_n = _nuclear_error(lam, D)
    nuclear = m.nuclear_norm
    if err_n >= nuclear or err_n / (nuclear - err_n) > rtol:
        failed.append("nuclear_norm")
    err_h = _entropy_error(S, lam, D, err_n) if err_n < nuclear else math.inf
    if not math.isfinite(err_h) or math.expm1(err_h) > rtol:
        failed.append("effective_rank")
    return Certificate(not failed, tuple(failed), D)
