"""Low-rank truncation: which rank each module keeps, and the LoRA factors of a truncated update.

Two halves, both pure (no I/O, no printing):

- **Ranks of one module** (numpy, float64). ``--rank R`` keeps R components everywhere; ``--energy τ`` keeps
  the smallest rank holding ≥ τ of each module's ‖ΔW‖²_F (the diff's ``energy_rank[τ]``); budgets
  (:class:`Budget`) and the rank levels a serving engine accepts. A budget spread over modules is
  :mod:`spectra.allocation`'s.
- **Factors** (torch, float64). The top singular triplets of a dense ΔW come from the eigenvectors
  of its smaller Gram matrix (:func:`dense_triplets`), the same route as the exact spectra of
  :mod:`spectra.linalg`; each is split evenly, ``B = U_r·diag(√σ)``, ``A = diag(√σ)·V_rᵀ``, so that
  ``B·A`` is the rank-r truncation with a PEFT scale of 1 (:func:`split_factors`).

Orientation is always ``(out, in)``; B is ``(out, r)``, A ``(r, in)``. A float64 ΔW beyond 2**±256 is divided
by 2**e first, as ``spectra diff`` does: ``S``, ``total`` are then ``ΔW·2**-e``'s (``exp`` = e), the factors ΔW's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from spectra.checks import check_index, check_rank, check_tau
from spectra.engine import factored_svd
from spectra.lapack import Tridiagonal
from spectra.linalg import as_numpy, finite_tensor, fro_norm, gram, gram_scale_exponent, gram_upper, real_tensor
from spectra.metrics import as_spectrum, numerical_rank
from spectra.sketch import randomized_svd

#: vLLM's accepted ``max_lora_rank`` values (``MaxLoRARanks``, vllm/config/lora.py): any adapter of r ≤ 512 loads, and
#: every module is padded to ``max_lora_rank`` (serving memory is that rank times the modules, whatever each one's r).
VLLM_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_PARAM_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


# ---- budgets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """A ``--budget`` as the user wrote it.

    Attributes:
        kind: ``"params"`` (LoRA parameters), ``"fraction"`` (of the full update's parameter count,
            Σ out·in over the chosen modules whose update is nonzero and above the rounding level) or ``"bytes"`` (adapter size in the output dtype).
        value: parameters, a fraction in (0, 1], or bytes.
        text: the text it was parsed from.
    """

    kind: Literal["params", "fraction", "bytes"]
    value: float
    text: str

    def params(self, full_params: int, bytes_per_param: int) -> int:
        """The budget in LoRA parameters, for modules holding ``full_params`` weights in total and
        an adapter stored with ``bytes_per_param`` bytes per value.

        >>> parse_budget("10%").params(1000, 2), parse_budget("1kB").params(0, 2), parse_budget("5k").params(0, 4)
        (100, 500, 5000)
        """
        if self.kind == "params":
            return int(self.value)
        if self.kind == "fraction":
            return math.floor(self.value * full_params)
        return int(self.value // bytes_per_param)


def parse_budget(text: str) -> Budget:
    """Parse a ``--budget``: a parameter count (``1200000``, ``1.2M``, ``500k``), a percentage of the
    full update (``10%``), or a size in the output dtype (``50MB``, ``1.5GiB``; kB/MB/GB are powers
    of 1000, KiB/MiB/GiB of 1024).

    Raises:
        ValueError: anything else, or a value that is not positive (the message says which forms work).
    """
    t = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*(%|[kKmMgG]?i?[bB]|[kKmMgG]?)", t)
    if not m:
        raise ValueError(f"budget must be a parameter count (1200000, 1.2M), a percentage (10%) or a size (50MB, 1GiB). "
                         f"Got {text!r} instead")
    value = float(m.group(1) + (f"e{m.group(2)}" if m.group(2) else ""))  # 1e400 reads as inf: refused below
    unit = m.group(3)
    if unit == "%":
        if not 0 < value <= 100:
            raise ValueError(f"budget percentage must be in (0, 100]. Got {text!r} instead")
        return Budget("fraction", value / 100.0, t)
    if unit.lower().endswith("b"):
        key = unit.lower()
        if key not in _BYTE_UNITS:
            raise ValueError(f"budget size units are B, kB, MB, GB, KiB, MiB, GiB. Got {text!r} instead")
        value *= _BYTE_UNITS[key]
        kind: Literal["params", "bytes"] = "bytes"
    else:
        value *= _PARAM_UNITS[unit.lower()]
        kind = "params"
    if not 1 <= value < 2.0**63:  # positive, and a count int64 holds (beyond it: inf, floor overflows)
        raise ValueError(f"budget must be at least 1 and below 2^63 (parameters or bytes). Got {text!r} instead")
    if kind == "params" and value != math.floor(value):  # "1.5" read as 1 parameter would be a silent guess
        raise ValueError(f"budget: a parameter count must be a whole number. Got {text!r} ({value:g}) instead")
    return Budget(kind, float(math.floor(value)), t)


# ---- ranks of one module --------------------------------------------------------------------------
def spectrum_total(S: np.ndarray) -> float:
    """``Σσᵢ²`` summed as :func:`spectra.metrics.energy_rank` sums it (the last cumulative sum, float64, descending),
    so that ranks from :func:`energy_rank_top` equal the diff's on the same spectrum. ``S`` ``(n,)``, any order, any
    real dtype (a tensor is detached, bf16/fp16 widened), validated as :func:`spectra.metrics.as_spectrum` does.

    >>> spectrum_total(np.array([3.0, 1.0]))
    10.0
    """
    cum = np.cumsum(as_spectrum(S) ** 2)
    return float(cum[-1]) if cum.size else 0.0


def energy_kept(S: np.ndarray, total: float, r: int) -> float:
    """``Σ_{i≤r} σᵢ² / ‖ΔW‖²_F``: the share of the update's energy a rank-r truncation keeps (1 for a
    zero update). ``S`` ``(n,)`` holds at least the top r values, any order (sorted descending here, as
    :func:`energy_rank_top` sorts), validated as :func:`spectra.metrics.as_spectrum` does (NaN, Inf and negative
    values refused; a tensor detached, bf16/fp16 widened); ``total`` is ‖ΔW‖²_F.

    >>> energy_kept(np.array([3.0, 1.0]), 10.0, 1)
    0.9
    """
    check_rank(r, "r")
    S = as_spectrum(S)  # NaN read as all of the energy (min(1, nan)), an ascending S as its smallest values
    if not math.isfinite(total):  # an energy beyond float64 (σ near 1e200) or NaN: no ratio to report
        raise ValueError(f"total must be a finite energy (scale S by a power of two first). Got {total!r} instead.")
    if total <= 0:
        return 1.0
    top = S[:r]
    kept = float(np.sum(top * top))
    if kept > total * (1 + 1e-6):  # a total of another matrix, or a truncated one: no share of anything
        raise ValueError(f"total must be ‖ΔW‖²_F, at least the kept values' Σσ² ({kept:.6g}). Got {total!r} instead.")
    return min(1.0, kept / total)


def energy_rank_top(S: np.ndarray, total: float, tau: float, p: int | None = None) -> int | None:
    """Smallest k with ``Σ_{i≤k} σᵢ² ≥ τ·total`` from the top values ``S`` (descending) and the exact
    ``total``; 0 for a zero update; None when ``S`` is too short to reach it. With the whole spectrum
    and ``total = Σσᵢ²`` this is :func:`spectra.metrics.energy_rank`. At τ = 1 it is the numerical
    rank (:func:`spectra.metrics.numerical_rank`); ``p``, the matrix's min(out, in), says whether ``S``
    is the whole spectrum (None: it is).

    >>> energy_rank_top(np.array([3.0, 1.0, 1.0]), 11.0, 0.9), energy_rank_top(np.array([3.0]), 11.0, 0.9)
    (2, None)
    """
    tau = check_tau(tau)
    if isinstance(total, (bool, np.bool_)) or not isinstance(total, (int, float, np.integer, np.floating)) or math.isnan(total):
        raise ValueError(f"total must be a number, ‖ΔW‖²_F. Got {total!r} instead.")  # NaN read as "S too short"
    if total <= 0:
        return 0
    if tau == 1.0:  # the numerical rank (spectra.metrics.numerical_rank); unknown while S may go on above it
        k = numerical_rank(S, p)
        return k if k < len(S) or p is None or len(S) >= p else None
    cum = np.cumsum(as_spectrum(S) ** 2)
    k = int(np.searchsorted(cum, tau * total, side="left"))
    if k < cum.size:
        return k + 1
    # a total summed otherwise (a trace) can leave the whole spectrum's cumulative sum a rounding
    # error under τ·total at τ = 1: then the first k within 1e-12 of it
    k = int(np.searchsorted(cum, tau * total * (1 - 1e-12), side="left"))
    return k + 1 if k < cum.size else None


def rank_levels(p: int, max_rank: int | None = None, serving: str | None = None) -> list[int]:
    """The ranks a module of ``p = min(out, in)`` may take, ascending (0 is always allowed).

    Every rank 1 … min(p, max_rank); with ``serving="vllm"`` also at most 512, vLLM's largest ``max_lora_rank``
    (a grid of :data:`VLLM_RANKS` per module bought nothing, as vLLM pads every module anyway).

    >>> rank_levels(5, 3), rank_levels(4, serving="vllm"), len(rank_levels(4096, serving="vllm"))
    ([1, 2, 3], [1, 2, 3, 4], 512)
    """
    if serving not in (None, "none", "vllm"):
        raise ValueError(f"serving must be 'none' (or None) or 'vllm'. Got {serving!r} instead.")
    cap = min(p, max_rank) if max_rank is not None else p
    if serving == "vllm":
        cap = min(cap, VLLM_RANKS[-1])
    return list(range(1, cap + 1))


def round_up(r: int, levels: Sequence[int]) -> int:
    """The smallest allowed level ≥ r (the largest when r exceeds them all); 0 stays 0.

    >>> round_up(9, [8, 16, 32]), round_up(40, [8, 16, 32]), round_up(0, [8])
    (16, 32, 0)
    """
    if r <= 0 or not levels:
        return 0
    return next((v for v in levels if v >= r), levels[-1])


# ---- factors ----------------------------------------------------------------------------------------
@dataclass
class Triplets:
    """What one module's decomposition keeps.

    Attributes:
        S: top singular values, descending, float64 (at least as many as factors kept, plus one when
            the spectrum has more, for the spectral error σ_{r+1}/σ₁).
        total: ``‖ΔW‖²_F`` in float64 (over the whole spectrum).
        B: ``(out, k)`` ``U_k·diag(√σ)``, on the CPU, float64 for a float64 ΔW (or factors float32 cannot hold),
            else float32; None when k = 0.
        A: ``(k, in)`` ``diag(√σ)·V_kᵀ``, as B; None when k = 0.
        method: how it was computed (``"gram-eigh/float64"``, ``"randomized"``, ``"factored"``).
        residual: randomized path: the largest certified ``‖ΔW vᵢ − σᵢuᵢ‖/√2`` relative to σ₁
            (:class:`spectra.sketch.TruncatedSVD`); None for the exact paths.
        exp: S and total are those of ``ΔW·2**-exp`` (0 unless ΔW is beyond the squaring range); B, A are ΔW's.
    """

    S: np.ndarray
    total: float
    B: torch.Tensor | None
    A: torch.Tensor | None
    method: str
    residual: float | None = None
    exp: int = 0


def scale_pow2(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x·2**n``, exact (barring a subnormal result), in steps of 2**±100 (each factor within float32's range)."""
    first = True
    while n:
        step = max(-100, min(100, n))
        x, first, n = (x * math.ldexp(1.0, step) if first else x.mul_(math.ldexp(1.0, step))), False, n - step
    return x


def squaring_exponent(delta: torch.Tensor, gram_dtype: type[np.floating] = np.float64) -> int:
    """The power of two to divide ``delta`` by before squaring it in ``gram_dtype`` (:func:`spectra.linalg.gram_scale_exponent`)."""
    if not delta.numel() or (delta.dtype != torch.float64 and gram_dtype is np.float64):
        return 0
    lo, hi = torch.aminmax(delta)
    return gram_scale_exponent(max(float(hi), -float(lo)), gram_dtype)


def factors_out(B: torch.Tensor, A: torch.Tensor, exp: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``ΔW·2**-exp`` as ΔW's (``2**⌊exp/2⌋`` on B, the rest on A; exact), on the CPU, float64 for a
    float64 ΔW (those of a ΔW near 1e-170 are near 1e-85: zero in float32), else float32."""
    out = torch.float64 if dtype == torch.float64 else torch.float32
    if exp:
        B, A = scale_pow2(B.double(), exp // 2), scale_pow2(A.double(), exp - exp // 2)
    return B.to(out).cpu(), A.to(out).cpu()


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U·diag(√S)`` ``(out, k)`` and ``A = diag(√S)·Vh`` ``(k, in)``, so that ``B·A = U·diag(S)·Vh``
    with a PEFT scale of 1 and both factors of the same magnitude (neither over- nor underflows when
    stored in bf16/fp16). Signs are normalised: each column of B has its largest |entry| positive. ``S`` ``(k,)``
    must not hold negative values (ValueError: clamped to 0, a direction would be dropped without a word).
    """
    if bool((S < 0).any()):
        raise ValueError(f"S must hold non-negative singular values. Got min {float(S.min())!r} instead.")
    root = S.sqrt()
    B, A = U * root, root.unsqueeze(-1) * Vh
    flip = _sign(B)
    return B * flip, flip.unsqueeze(-1) * A


def _sign(M: torch.Tensor) -> torch.Tensor:
    """+1/−1 per column making its largest-magnitude entry positive (sklearn's ``svd_flip``)."""
    if M.shape[-1] == 0:
        return torch.ones(0, dtype=M.dtype, device=M.device)
    s = torch.sign(M[M.abs().argmax(dim=0), torch.arange(M.shape[1], device=M.device)])
    return torch.where(s == 0, torch.ones_like(s), s)


def _matmul64(X: torch.Tensor, Y: torch.Tensor, *, left_t: bool = False, block: int = 1 << 22) -> torch.Tensor:
    """``X @ Y`` (or ``Xᵀ @ Y``) in float64 without a float64 copy of the large ``X`` (row blocks of
    ``block`` elements are upcast one at a time)."""
    rows = max(1, block // max(1, X.shape[1]))
    if left_t:  # Xᵀ Y = Σ_blocks X_bᵀ Y_b
        out = torch.zeros(X.shape[1], Y.shape[1], dtype=torch.float64, device=X.device)
        for r in range(0, X.shape[0], rows):
            out.addmm_(X[r : r + rows].double().mT, Y[r : r + rows])
        return out
    return torch.cat([X[r : r + rows].double() @ Y for r in range(0, X.shape[0], rows)])


@dataclass
class GramEig:
    """The eigendecomposition of a dense ΔW's smaller Gram matrix (:func:`gram_eig`).

    Attributes:
        S: all p singular values, descending, float64 numpy (:func:`gram_top`: the top n only).
        total: ``‖ΔW‖²_F`` as ``Σσᵢ²`` (float64; :func:`gram_top`: the Gram matrix's trace, equal up to rounding).
        Q: ``(p, p)`` float64 eigenvectors, columns in the order of S (left singular vectors when
            out ≤ in, ``G = ΔWΔWᵀ``, else right ones, ``G = ΔWᵀΔW``); None when ``tri`` holds the
            reduced Gram matrix instead, whose top vectors :meth:`top` computes on request.
        tri: the Gram matrix reduced to tridiagonal form (:class:`spectra.lapack.Tridiagonal`, the CPU path).
        exp: as :class:`Triplets`'.
    """

    S: np.ndarray
    total: float
    Q: torch.Tensor | None
    tri: Tridiagonal | None = None
    exp: int = 0

    def top(self, k: int) -> torch.Tensor:
        """The eigenvectors of the k largest eigenvalues, ``(p, k)`` float64, in the order of S."""
        if self.Q is not None:
            return self.Q[:, :k]
        return torch.from_numpy(self.tri.top_vectors(k))


def gram_eig(delta: torch.Tensor) -> GramEig:
    """All singular values of a dense ``(out, in)`` ΔW and the singular vectors of its smaller side,
    from the float64 Gram matrix and a symmetric eigensolver, on ΔW's device. On the CPU the Gram
    matrix (:func:`spectra.linalg.gram_upper`) is reduced once to tridiagonal form
    (:class:`spectra.lapack.Tridiagonal`): every eigenvalue now, only the top vectors a caller asks for
    later (:meth:`GramEig.top`); both release the GIL, so matrices can be solved in parallel threads
    (:func:`spectra.threads.map_one_blas_thread`). Elsewhere ``torch.linalg.eigh``.

    Precision: the eigenvalues of G carry an absolute error of about ``p·eps·σ₁²`` (eps = 1.1e-16),
    so singular values and directions are exact down to ≈1e-7·σ₁ (the same as ``spectra diff``'s
    exact path); the components below that hold < 1e-14 of the energy. A float64 ΔW beyond the
    squaring range is scaled first (``exp``).
    """
    delta = finite_tensor(delta, "delta")
    e = squaring_exponent(delta)
    delta = scale_pow2(delta, -e) if e else delta
    tri = None
    if delta.device.type == "cpu" and Tridiagonal.available():
        tri = Tridiagonal.of(gram_upper(as_numpy(delta)), overwrite=True)
        S, Q = np.sqrt(np.maximum(tri.lam, 0.0)), None
    else:
        if delta.device.type == "cpu":  # scipy without its Cython LAPACK API: numpy's full eigh
            lam_np, vecs = np.linalg.eigh(gram_upper(as_numpy(delta)), UPLO="U")  # ascending
            lam, Q = torch.from_numpy(lam_np), torch.from_numpy(vecs)
        else:
            lam, Q = torch.linalg.eigh(gram(delta))  # ascending
        S, Q = lam.flip(-1).clamp_min(0).sqrt().cpu().numpy(), Q.flip(-1)
    # the total as spectra diff sums it (Σσᵢ² of the clamped eigenvalues, equal to the trace up to
    # rounding), so that energy ranks agree with the diff's wherever the spectra do
    return GramEig(S, spectrum_total(S), Q, tri, e)


def gram_top(delta: torch.Tensor, n: int, k: int) -> GramEig:
    """The top ``n`` singular values of a dense ``(out, in)`` ΔW and the singular vectors of its ``k <= n``
    largest, for a caller that knows k before seeing the spectrum (``spectra extract --rank``).

    On the CPU (:class:`spectra.lapack.Tridiagonal`) the values come from the vector solver itself
    (:meth:`~spectra.lapack.Tridiagonal.top_pairs`): no pass for all p eigenvalues (``dsterf``: ~4 ms of a
    576² matrix's ~50). Elsewhere :func:`gram_eig`, cut. ``S``: the top n values (float64, descending); ``total``:
    ``‖ΔW‖²_F``, the Gram matrix's trace (Σ of its eigenvalues up to rounding). Precision, ``exp`` as :func:`gram_eig`."""
    delta = real_tensor(delta, "delta")
    p = min(delta.shape)
    if not 0 <= k <= n <= p:
        raise ValueError(f"need 0 <= k <= n <= {p}. Got k = {k}, n = {n} instead.")
    if delta.device.type != "cpu" or not Tridiagonal.available():
        eig = gram_eig(delta)  # refuses NaN/Inf itself
        return GramEig(eig.S[:n], eig.total, eig.top(k) if k else None, None, eig.exp)
    e = squaring_exponent(delta := finite_tensor(delta, "delta"))
    G = gram_upper(as_numpy(scale_pow2(delta, -e) if e else delta))
    total = float(np.trace(G))
    lam, vecs = Tridiagonal.of(G, values=False, overwrite=True).top_pairs(n, k)
    return GramEig(np.sqrt(np.maximum(lam, 0.0)), total, torch.from_numpy(vecs), None, e)


def eig_factors(delta: torch.Tensor, eig: GramEig, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """LoRA factors ``B (out, k)``, ``A (k, in)`` (CPU; float64 for a float64 ΔW, else float32) of the
    top-k components of ΔW (computed on ``ΔW·2**-eig.exp`` and scaled back, :func:`factors_out`).

    The other side's vectors are formed in float64 as ``ΔWᵀU_k`` (or ``ΔW·V_k``), whose column norms
    are the σᵢ, so ``B·A = U_kU_kᵀΔW`` (or ``ΔW·V_kV_kᵀ``) is exactly the projection of ΔW onto the
    computed singular subspace: an error in the vectors moves the product only to second order. A
    component whose σ comes out 0 is stored as zeros. None, None when k = 0.
    """
    if k == 0:
        return None, None
    dtype = delta.dtype
    delta = scale_pow2(delta, -eig.exp) if eig.exp else delta
    out_dim, in_dim = delta.shape
    Qk = eig.top(k)
    if out_dim <= in_dim:  # Q holds U; ΔWᵀU_k = V_k·diag(σ)
        W = _matmul64(delta, Qk, left_t=True)  # (in, k)
        sig = torch.linalg.vector_norm(W, dim=0)
        U, Vh = Qk, (W / torch.where(sig > 0, sig, 1.0)).mT
    else:  # Q holds V; ΔW·V_k = U_k·diag(σ)
        W = _matmul64(delta, Qk)  # (out, k)
        sig = torch.linalg.vector_norm(W, dim=0)
        U, Vh = W / torch.where(sig > 0, sig, 1.0), Qk.mT
    return factors_out(*split_factors(U, sig, Vh), eig.exp, dtype)


def dense_triplets(delta: torch.Tensor, k: int, *, values: int | None = None) -> Triplets:
    """Top-k singular triplets of a dense ``(out, in)`` ΔW as LoRA factors, and its top singular values
    (:func:`gram_eig` then :func:`eig_factors`).

    Args:
        delta: ``(out, in)`` float32 or float64, any device.
        k: triplets to return as factors (0 … p).
        values: how many top singular values to return (default ``k + 1``, capped at p).

    Example:
        >>> t = dense_triplets(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 2)
        >>> t.S.round(6).tolist(), round(t.total, 6), bool(torch.allclose(t.B @ t.A, torch.diag(torch.tensor([3.0, 2.0, 0.0]))))
        ([3.0, 2.0, 1.0], 14.0, True)
    """
    delta = real_tensor(delta, "delta")  # detached: no autograd graph in the factors; gram_eig refuses NaN/Inf
    p = min(delta.shape)
    k = check_index(k, "k", 0, p)
    values = None if values is None else check_index(values, "values", 0, 1 << 62)
    eig = gram_eig(delta)
    B, A = eig_factors(delta, eig, k)
    n = min(p, values if values is not None else k + 1)
    return Triplets(eig.S[:n], eig.total, B, A, "gram-eigh/float64", exp=eig.exp)


#: :func:`refined_triplets` takes the float64 route when the n-th float32 Gram eigenvalue is below this many times
#: √p·eps₃₂·λ₁ (a float32 eigensolve's typical rounding: 2.9e-6·λ₁ at p = 576). Measured at p = 576, 65 values, one
#: dominant direction: the others at λ ratio 9e-6 came within 2.4e-5 (relative) of float64's values and 6e-9 of
#: ‖ΔW‖²; at 1e-6 within 6e-3 and 8e-8. Smoothly decaying spectra stay accurate far lower (5e-6: 1e-5, 6e-10).
REFINED_FLOOR = 10.0


def refined_triplets(delta: torch.Tensor, n: int, k: int) -> Triplets:
    """Top singular triplets of a dense ``(out, in)`` ΔW whose subspace is found in float32 and whose
    values and factors are computed in float64 (Rayleigh-Ritz): about 0.8× the time of
    :func:`gram_top` then :func:`eig_factors` on the CPU at p = 576 (one thread: 18 ms against 23 for a
    576², 22 against 26 for a 1536 × 576 ΔW, 65 vectors), for the same energies to ~1e-8 of ‖ΔW‖²_F
    wherever measured (3e-9 at worst; typically 1e-12) and values to ~1e-7·σ₁ (the values at the
    subspace's edge, of slowly decaying spectra, converge the slowest; inside a gap, to ~1e-12·σ₁).

    1. The smaller Gram matrix in float32 and its top ``n`` eigenvectors Z (``ssytrd``, MRRR or
       divide and conquer, ``sormtr``: :class:`spectra.lapack.Tridiagonal` in float32). Z spans the
       top-n singular subspace of ΔW to float32's accuracy (its angle to the exact one is about
       ``p·eps₃₂·σ₁²`` over the gap below σₙ²).
    2. In float64: Z made orthonormal (Cholesky QR), ``Y = ΔW·Z`` (or ``ΔWᵀZ``), and the SVD of the
       projection ``Y·Zᵀ`` from the eigendecomposition of the n × n matrix ``YᵀY``. The values are
       the Ritz values of ΔW on span(Z): each is at most the true σᵢ and equal to it up to the square
       of the subspace's angle (second order), and ``B·A`` is exactly the projection of ΔW onto the
       k-dimensional subspace kept, so its energy ``Σσᵢ²`` (i ≤ k) is that of the factors returned, a
       lower bound of the optimum and equal to it to rounding wherever the float32 subspace is close.
    3. The residual ``‖ΔW vᵢ − σᵢuᵢ‖`` of every triplet (the other side holds exactly, by
       construction) in float64: ``residual`` is the largest over √2, relative to σ₁, as
       :func:`randomized_triplets` reports it.

    Where float32 cannot resolve what is asked, the float64 route (:func:`gram_top`, :func:`eig_factors`)
    is taken instead: when the n-th float32 eigenvalue is below :data:`REFINED_FLOOR`·√p·eps₃₂·λ₁ (an
    update dominated by a few directions, whose other components float32 rounds away, or an update
    of lower rank than n). A ΔW whose squares would leave float32's (float64's) range is scaled by a power
    of two first (for float64's, the returned ``exp``).

    Args: ``delta`` ``(out, in)`` float32 (or float64) on the CPU (elsewhere :func:`gram_top` and
    :func:`eig_factors`); ``n`` values returned (``k <= n <= min(out, in)``); ``k`` components as factors
    (:func:`factors_out`). Returns: :class:`Triplets`: ``S`` the n Ritz values, ``total`` the exact ``‖ΔW‖²_F``,
    method ``"gram-eigh/float32+ritz/float64"`` with the residual (float64 route: ``"gram-eigh/float64"``, none).
    """
    delta = finite_tensor(delta, "delta")  # detached: numpy cannot read a tensor that requires grad
    p = min(delta.shape)
    n, k = check_index(n, "n", 0, p), check_index(k, "k", 0, p)
    if not k <= n:
        raise ValueError(f"need 0 <= k <= n <= {p}. Got k = {k}, n = {n} instead.")
    # a float64 ΔW beyond float64's squaring range: all of it on ΔW·2**-e, the factors scaled back
    e, dtype = squaring_exponent(delta), delta.dtype
    tr = _refined(scale_pow2(delta, -e) if e else delta, n, k)
    B, A = (None, None) if tr.B is None else factors_out(tr.B, tr.A, e, dtype)
    return Triplets(tr.S, tr.total, B, A, tr.method, tr.residual, e)


def _refined(delta: torch.Tensor, n: int, k: int) -> Triplets:
    """:func:`refined_triplets` of a ΔW whose squares stay within float64's range (factors in float64)."""
    p = min(delta.shape)

    def exact() -> Triplets:
        eig = gram_top(delta, n, k)
        B, A = eig_factors(delta, eig, k)
        return Triplets(eig.S, fro_norm(delta) ** 2, B, A, "gram-eigh/float64")

    if delta.device.type != "cpu" or not Tridiagonal.available(np.float32) or n == 0:
        return exact()
    wide = delta.shape[0] <= delta.shape[1]  # the Gram matrix is ΔWΔWᵀ and Z holds left vectors
    M = as_numpy(delta)
    e32 = gram_scale_exponent(float(np.abs(M).max()) if M.size else 0.0, np.float32)
    if e32:  # its squares would leave float32's range: scale by a power of 2 (np.ldexp: exact, any exponent)
        M = np.ldexp(M, -e32)
    lam32, Z32 = Tridiagonal.of(gram_upper(M, dtype=np.float32), values=False, dtype=np.float32,
                                 overwrite=True).top_pairs(n, n)
    if not lam32[0] > 0 or lam32[-1] < REFINED_FLOOR * math.sqrt(p) * float(np.finfo(np.float32).eps) * lam32[0]:
        # a component asked for lies at float32's rounding level of the Gram matrix (an update dominated
        # by a few directions, or of low rank): float32 cannot see its direction, float64 can
        return exact()
    # ΔW in float64 once for the total and both products (blocks instead for a matrix above 64 MiB of it)
    D = delta.double() if delta.numel() <= 1 << 23 else None
    total = float(torch.dot(D.reshape(-1), D.reshape(-1))) if D is not None else fro_norm(delta) ** 2

    def times(X: torch.Tensor, left_t: bool) -> torch.Tensor:  # ΔW·X, or ΔWᵀX
        if D is None:
            return _matmul64(delta, X, left_t=left_t)
        return D.mT @ X if left_t else D @ X

    Z = torch.from_numpy(Z32).double()
    # Cholesky QR: Z is orthonormal to float32's accuracy, so ZᵀZ is near I and this is as good as Householder
    L = torch.linalg.cholesky(Z.mT @ Z)
    Z = torch.linalg.solve_triangular(L, Z.mT, upper=False).mT
    Y = times(Z, wide)  # (in, n) = ΔWᵀZ, or (out, n) = ΔW·Z
    theta, R = torch.linalg.eigh(Y.mT @ Y)  # ascending
    theta, R = theta.flip(0).clamp_min(0), R.flip(1)
    sig = theta.sqrt()
    Z, Y = Z @ R, Y @ R
    other = Y / torch.where(sig > 0, sig, 1.0)  # unit columns (zero where σ = 0)
    # the side not built from Z: ΔW·vᵢ − σᵢuᵢ (or ΔWᵀuᵢ − σᵢvᵢ)
    resid = times(other, not wide) - Z * sig
    res_max = float(torch.linalg.vector_norm(resid, dim=0).max()) / math.sqrt(2)
    U, Vh = (Z, other.mT) if wide else (other, Z.mT)
    S = sig.numpy().copy()
    residual = res_max / S[0] if S[0] > 0 else 0.0
    B, A = split_factors(U[:, :k], sig[:k], Vh[:k]) if k else (None, None)
    return Triplets(S, total, B, A, "gram-eigh/float32+ritz/float64", residual)


def randomized_triplets(delta: torch.Tensor, k: int, *, seed: int = 0, tol: float = 1e-3) -> Triplets:
    """Top-k triplets of a large ΔW by :func:`spectra.sketch.randomized_svd` (power iterations grown
    until every value's certified residual is within ``tol`` of it), with the exact ``‖ΔW‖²_F``.
    The energy kept, ``Σ σ̂ᵢ²``, is that of the returned factors' product (the projection of ΔW on the
    sketch's top singular subspace) and a lower bound of the optimal rank-k energy, both up to the float32
    sketch's rounding (measured ~1e-8 relative above the optimum on a 600 × 500 ΔW). The sketch runs in
    float32: a ΔW whose squares would leave float32's range is scaled first (``exp``)."""
    delta = finite_tensor(delta, "delta")
    k = check_index(k, "k", 0, min(delta.shape))
    e, dtype = squaring_exponent(delta, np.float32), delta.dtype
    delta = scale_pow2(delta, -e) if e else delta
    total = fro_norm(delta) ** 2
    if k == 0:
        return Triplets(np.zeros(0), total, None, None, "randomized", exp=e)
    t = randomized_svd(delta, k, tol=tol, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    B, A = split_factors(t.U.double(), torch.as_tensor(t.S, device=t.U.device), t.Vh.double())
    res = float(np.max(t.residual) / t.S[0]) if t.S.size and t.S[0] > 0 else 0.0
    return Triplets(np.asarray(t.S, dtype=np.float64), total, *factors_out(B, A, e, dtype),
                    "exact-svd/float64" if t.exact else "randomized", None if t.exact else res, e)


def factored_triplets(Bf: torch.Tensor, Af: torch.Tensor, scale: float, k: int) -> Triplets:
    """Top-k triplets of a LoRA update ``scale·Bf·Af`` from its factors (QR of both and an r × r SVD,
    :func:`spectra.engine.factored_svd`; the ``(out, in)`` product is never formed). Exact."""
    U, S, Vh = factored_svd(Bf, Af, scale)
    total = float((S.double() ** 2).sum().item())
    k = min(check_rank(k, "k"), int(S.numel()))
    B, A = split_factors(U[:, :k], S[:k], Vh[:k])
    if k:
        # float64 factors stay float64 (as factors_out keeps a float64 ΔW's), and so do factors float32 cannot hold:
        # √σ of an update near 1e81 is inf in float32, near 1e-90 a subnormal that lost its digits
        B, A = B.cpu(), A.cpu()
        wide = torch.float64 in (Bf.dtype, Af.dtype) or not _fits_float32(B) or not _fits_float32(A)
        B, A = (B.double(), A.double()) if wide else (B.float(), A.float())
    return Triplets(S.double().cpu().numpy(), total, B if k else None, A if k else None, "factored")


def _fits_float32(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite in float32 and its nonzero magnitudes are normal floats there."""
    a = x.abs().double()
    nz = a[a > 0]
    return bool(a.max() <= torch.finfo(torch.float32).max) and (nz.numel() == 0 or bool(nz.max() >= torch.finfo(torch.float32).tiny))


__all__ = ["REFINED_FLOOR", "VLLM_RANKS", "Budget", "GramEig", "Triplets",
           "dense_triplets", "eig_factors", "energy_kept", "energy_rank_top", "factored_triplets", "factors_out",
           "gram_eig", "gram_top", "parse_budget", "randomized_triplets", "refined_triplets", "rank_levels",
           "round_up", "scale_pow2", "spectrum_total", "split_factors", "squaring_exponent"]
