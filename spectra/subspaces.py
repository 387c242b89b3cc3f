"""Subspace measures between updates and weights (docs/definitions.md, "Subspaces").

Principal angles and the Grassmann distance, Hu et al.'s normalised subspace similarity φ, the
energy of one update captured by another's singular subspaces, Hu et al.'s amplification factor, and
Shuttleworth et al.'s intruder dimensions.

Pure functions, no I/O. Inputs are torch tensors on any device (numpy arrays are accepted too);
everything is upcast to float64 before any product or decomposition and computed on the device of
the first tensor argument. Results come back as float64 numpy arrays or Python floats; bases built
here (:func:`top_subspace`) come back as float64 tensors on the input's device.

Conventions: a weight or update is ``(out, in)``; a subspace is an orthonormal basis ``Q`` stored
as columns, ``(d, k)``. Left singular vectors (``U``, ``d = out``) span an update's output space,
right singular vectors (``Vh.mT``, ``d = in``) its input space; choose the side with
:func:`top_subspace`. An update may be given dense, or factored as its thin SVD ``(U, S, Vh)``
(a :class:`Factored`, or a plain tuple), e.g. from :func:`spectra.engine.factored_svd` for a LoRA
adapter; the factored form is never densified except where a measure needs the dense tuned weight
(:func:`intruder_dimensions`). A dense update decomposed once for several measures is a
:class:`~spectra.singular_bases.TopSVD` (its top-k triplets and energy from one Gram eigensolve).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch

from spectra.checks import check_index
from spectra.engine import factored_svd
from spectra.linalg import finite_tensor, real_tensor, singular_values
from spectra.metrics import (
    amplification_factor,
    check_energy_range,
    factored_rank,
    numerical_rank,
    random_projection_rms,
    rank_resolution,
)
from spectra.singular_bases import TopSVD, WeightBasis, top_left_singular_pairs, top_svd
from spectra.ties import tied_cuts

Tensor = torch.Tensor | np.ndarray
Side = Literal["left", "right"]

#: ε values of the intruder sweep (Shuttleworth et al. 2024 sweep ε over (0, 1)).
DEFAULT_EPSILONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ---- inputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Factored:
    """An ``(out, in)`` update held as its thin SVD, ``ΔW = U diag(S) Vh``.

    Attributes:
        U: ``(out, q)`` orthonormal columns (left singular vectors).
        S: ``(q,)`` non-negative singular values (any order; sorted descending where used).
        Vh: ``(q, in)`` orthonormal rows (right singular vectors, transposed).

    A plain tuple ``(U, S, Vh)`` is accepted wherever a :class:`Factored` is.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> B, A = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
        >>> dW = Factored.from_lora(B, A, scale=2.0)
        >>> bool(torch.allclose(dW.dense(), 2.0 * B.double() @ A.double()))
        True
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @classmethod
    def from_lora(cls, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> Factored:
        """``ΔW = scale · B · A`` with ``B (out, r)``, ``A (r, in)``, by :func:`spectra.engine.factored_svd`
        (QR of the factors and an ``r × r`` SVD; the ``(out, in)`` product is never formed)."""
        return cls(*factored_svd(B, A, scale))

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the update."""
        return int(self.U.shape[0]), int(self.Vh.shape[1])

    def dense(self) -> torch.Tensor:
        """The ``(out, in)`` float64 matrix ``U diag(S) Vh`` (for tests and small matrices)."""
        U, S, Vh = _factors64(self, "dW", None)
        return (U * S) @ Vh


Update = Union[torch.Tensor, np.ndarray, Factored, tuple, TopSVD]  # noqa: UP007 (a runtime alias: Factored is a class defined above)


def _device_of(x: Tensor) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _to64(x: Tensor, device: torch.device | None, name: str) -> torch.Tensor:
    t = finite_tensor(x, name)  # NaN/Inf named here: an SVD of [[inf, 0], [0, 1]] returned e₂ without a word
    return t.to(device=t.device if device is None else device, dtype=torch.float64)


def _eps(x: Tensor) -> float:
    t = real_tensor(x, "Q")  # a list as the measures read it (float64), not in torch's default dtype
    return torch.finfo(t.dtype).eps if t.is_floating_point() else torch.finfo(torch.float64).eps


def _matrix(x: Tensor, name: str, device: torch.device | None) -> torch.Tensor:
    t = _to64(x, device, name)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix. Got shape {tuple(t.shape)} instead.")
    return t


def _basis(Q: Tensor, name: str, device: torch.device | None) -> torch.Tensor:
    """``Q`` as a float64 ``(d, k)`` tensor, checked to have orthonormal columns.

    Every measure here is only meaningful on orthonormal bases (φ of a raw matrix can exceed 1), so
    the check is not optional; it costs O(d·k²), the same order as the measures themselves. The
    tolerance, ``max(1e-6, min(100·eps(dtype)·√d, 0.02))`` on ``max |QᵀQ − I|``, passes float32 SVD bases
    and bf16/fp16 roundings of orthonormal ones (QᵀQ moves by ≤ ~2·eps), never a raw weight matrix.

    An accepted basis not orthonormal to float64 precision (``max |QᵀQ − I| > 1e-10``: a float32, fp16 or
    bf16 rounding) is orthonormalised in float64 (QR, column signs kept; the span is what the measures use):
    the cosines σ(QAᵀQB) of rounded bases are biased (0.1° between a bf16 basis and itself). A basis
    orthonormal to float64 precision comes back unchanged, bit for bit."""
    Q64 = _matrix(Q, name, device)
    d, k = Q64.shape
    if k == 0 or k > d:
        raise ValueError(f"{name} must have between 1 and d = {d} columns. Got {k} instead.")
    err = float((Q64.mT @ Q64 - torch.eye(k, dtype=torch.float64, device=Q64.device)).abs().max())
    tol = max(1e-6, min(100.0 * _eps(Q) * math.sqrt(d), 0.02))
    if not err <= tol:
        raise ValueError(
            f"{name} must have orthonormal columns (max |{name}ᵀ{name} − I| <= {tol:.1e}). Got {err:.3e} instead; "
            "build bases with spectra.subspaces.top_subspace."
        )
    if err > 1e-10:
        Q64, R = torch.linalg.qr(Q64)
        Q64 = torch.where(R.diagonal() < 0, -Q64, Q64)  # each column's sign as given: R's diagonal near ±1
    return Q64


def _factors64(dW: Factored | tuple, name: str, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` in float64, validated (shapes, orthonormality, S >= 0) and sorted descending."""
    if isinstance(dW, Factored):
        U, S, Vh = dW.U, dW.S, dW.Vh
    elif isinstance(dW, tuple) and len(dW) == 3:
        U, S, Vh = dW
    else:
        raise ValueError(f"{name} must be an (out, in) tensor, a Factored or a (U, S, Vh) tuple. Got {type(dW).__name__} instead.")
    if device is None:
        device = torch.as_tensor(U).device
    S64 = _to64(S, device, f"{name}'s S")
    if S64.ndim != 1:
        raise ValueError(f"{name}'s S must have shape (q,). Got {tuple(S64.shape)} instead.")
    q = S64.shape[0]
    U_t, Vh_t = real_tensor(U, f"{name}'s U"), real_tensor(Vh, f"{name}'s Vh")
    if U_t.ndim != 2 or Vh_t.ndim != 2 or U_t.shape[1] != q or Vh_t.shape[0] != q:
        raise ValueError(
            f"{name} must be U (out, q), S (q,), Vh (q, in) with one q. Got U {tuple(U_t.shape)}, "
            f"S {tuple(S64.shape)}, Vh {tuple(Vh_t.shape)} instead."
        )
    if bool((S64 < 0).any()):
        raise ValueError(f"{name}'s S must be non-negative. Got min {float(S64.min()):.3e} instead.")
    # sorted first (a hand-built tuple may not be): _basis's QR of a rounded basis keeps each top-i span only in this order
    order = torch.argsort(S64, descending=True)
    U64 = _basis(U_t[:, order.to(U_t.device)], f"{name}'s U", device)
    V64 = _basis(Vh_t[order.to(Vh_t.device)].mT, f"{name}'s Vh.mT", device)
    return U64, S64[order], V64.mT


def _is_factored(dW: Update) -> bool:
    return isinstance(dW, (Factored, tuple))


def _update_device(dW: Update) -> torch.device:
    # every public entry point taking an update calls this first, so the form is checked here
    if isinstance(dW, tuple) and len(dW) != 3:
        raise ValueError(f"dW must be an (out, in) tensor, a Factored or a (U, S, Vh) tuple. Got a tuple of {len(dW)} instead.")
    first = dW.U if isinstance(dW, (Factored, TopSVD)) else (dW[0] if isinstance(dW, tuple) else dW)
    return torch.as_tensor(first).device


def _update_shape(dW: Update) -> tuple[int, int]:
    if isinstance(dW, (Factored, TopSVD)):
        return dW.shape
    if isinstance(dW, tuple):
        return int(torch.as_tensor(dW[0]).shape[0]), int(torch.as_tensor(dW[2]).shape[-1])
    shape = tuple(torch.as_tensor(dW).shape)
    if len(shape) != 2:
        raise ValueError(f"dW must be a 2-D matrix. Got shape {shape} instead.")
    return shape  # type: ignore[return-value]


def _weight_for_update(W: Tensor, dW: Update, name: str) -> tuple[torch.device, torch.Tensor, tuple[int, int]]:
    """``(device, W as float64 on dW's device, dW's shape)``; W must have dW's shape."""
    device = _update_device(dW)
    W64 = _matrix(W, name, device)
    shape = _update_shape(dW)
    if tuple(W64.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of dW, {tuple(shape)}. Got {tuple(W64.shape)} instead.")
    return device, W64, shape


def top_subspace(M: Update, k: int, side: Side = "left") -> torch.Tensor:
    """Orthonormal basis of the top-k left or right singular vectors of ``M``.

    Args:
        M: ``(out, in)`` matrix (any device, any float dtype), or its thin SVD as a
            :class:`Factored` / ``(U, S, Vh)`` tuple (e.g. ``Factored.from_lora(B, A, scale)`` for a
            LoRA update, computed without forming ``B·A``), or a
            :class:`~spectra.singular_bases.TopSVD`.
        k: number of singular vectors, ``1 <= k <= p`` (``p = min(out, in)``, or ``q`` for a factored
            ``M``, or the k of a ``TopSVD``), and at most ``M``'s resolved rank (docs/definitions.md:
            directions past it are rounding noise; a zero ``M`` has no subspace and raises).
        side: ``"left"`` (output space, columns of ``U``) or ``"right"`` (input space, rows of ``Vh``).

    Returns:
        float64 tensor on ``M``'s device: ``(out, k)`` for ``"left"``, ``(in, k)`` for ``"right"``,
        orthonormal columns, ordered by descending singular value.

    Notes:
        A dense ``M`` is decomposed exactly (float64 ``torch.linalg.svd``). Singular vectors carry an
        arbitrary sign, and within a repeated singular value an arbitrary rotation; only the span is
        defined, which is all the measures here use.

    Example:
        >>> top_subspace(torch.diag(torch.tensor([1.0, 3.0, 2.0])), 2).abs().round().tolist()
        [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right'. Got {side!r} instead.")
    if isinstance(M, TopSVD):
        U, S, Vh = M.U, M.S, M.Vh
    elif _is_factored(M):
        U, S, Vh = _factors64(M, "M", None)  # type: ignore[arg-type]
    else:
        U, S, Vh = torch.linalg.svd(_matrix(M, "M", None), full_matrices=False)  # type: ignore[arg-type]
    rank = _resolved(M, S)  # beyond it the vectors are a null space's arbitrary ones (two zero updates: φ = 1)
    if rank == 0:
        raise ValueError("M is zero (no singular value above its resolution): its singular subspaces are undefined.")
    k = check_index(k, "k", 1, rank, f" (M's {_resolution(M)})" if rank < U.shape[1] else "")
    return U[:, :k] if side == "left" else Vh[:k].mT


def _resolved(M: Update, S: torch.Tensor) -> int:
    # a factored update's directions above RANK_TOL·σ₁, a dense one's (a TopSVD's) above the Gram route's σ₁·√(p·u)
    S64 = S.detach().to("cpu", torch.float64).numpy()
    return factored_rank(S64) if _is_factored(M) else numerical_rank(S64, min(_update_shape(M)))


def _resolution(M: Update) -> str:
    return ("rank: values below 1e-10·σ₁ are rounding of its factors" if _is_factored(M) else
            "numerical rank: values below σ₁·√(p·u), spectra's float64 resolution, count as zero (docs/definitions.md)")


# ---- principal angles ---------------------------------------------------------------------------
def principal_angles(QA: Tensor, QB: Tensor) -> np.ndarray:
    """Principal angles between ``span(QA)`` and ``span(QB)``, radians, ascending.

    Args:
        QA: ``(d, i)`` orthonormal columns.
        QB: ``(d, j)`` orthonormal columns (same ``d``).

    Returns:
        float64 array of shape ``(min(i, j),)``, ascending, in ``[0, π/2]``, with
        ``cos θ_l = σ_l(QAᵀ QB)`` (docs/definitions.md).

    Notes:
        Steps, after Knyazev & Argentati (2002) as in ``scipy.linalg.subspace_angles``:

        1. cosines ``σ(QAᵀQB)`` (descending), clipped to ``[0, 1]``;
        2. sines ``σ(Q_s − Q_b Q_bᵀ Q_s)`` (ascending), with ``Q_s`` the basis with fewer columns;
        3. ``θ = arcsin(sin)`` where ``cos² >= 1/2`` (θ <= π/4), else ``arccos(cos)``.

        The definition is step 1; step 2 only restores the accuracy of small angles, which
        ``arccos`` loses (a cosine of ``1 − 1e-17`` rounds to 1, so θ below ~1e-8 reads as 0).

    Example:
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> principal_angles(e[:, :2], e[:, 1:]).round(6).tolist()
        [0.0, 1.570796]
    """
    device = _device_of(QA)
    A = _basis(QA, "QA", device)
    B = _basis(QB, "QB", device)
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"QA and QB must have the same number of rows d. Got {A.shape[0]} and {B.shape[0]} instead.")
    small, big = (A, B) if A.shape[1] <= B.shape[1] else (B, A)  # angles are symmetric
    M = big.mT @ small  # (k_big, k_small)
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)  # descending <-> θ ascending
    sin = torch.linalg.svdvals(small - big @ M).flip(0).clamp(0.0, 1.0)  # ascending <-> θ ascending
    theta = torch.where(cos**2 >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return np.sort(theta.cpu().numpy())  # the two branches may meet out of order by one ulp


def grassmann_distance(QA: Tensor, QB: Tensor) -> float:
    """Geodesic (Grassmann) distance ``‖θ‖₂`` between the spans, radians; see :func:`principal_angles`.

    For ``i != j`` this is the distance between the smaller span and its closest subspace of the
    larger one (the angles beyond ``min(i, j)`` are not counted).
    """
    return float(np.linalg.norm(principal_angles(QA, QB)))


# ---- normalised subspace similarity φ ------------------------------------------------------------
def phi(QA: Tensor, QB: Tensor, i: int, j: int) -> float:
    """Hu et al. (2021, LoRA, Sec. 7, Eq. 4): ``φ = ‖QA[:, :i]ᵀ QB[:, :j]‖_F² / min(i, j)``.

    Args:
        QA: ``(d, a)`` orthonormal columns, most important first (top singular vectors).
        QB: ``(d, b)`` orthonormal columns.
        i: leading columns of ``QA`` used, ``1 <= i <= a``.
        j: leading columns of ``QB`` used, ``1 <= j <= b``.

    Returns:
        φ in ``[0, 1]``: 1 when one span contains the other, 0 when they are orthogonal, and
        ``max(i, j) / d`` in expectation for independent random subspaces
        (:func:`phi_random_baseline`). It is the mean squared cosine of the ``min(i, j)`` principal
        angles.

    Example:
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> phi(e[:, :2], e[:, 1:3], 2, 2)
        0.5
    """
    return float(phi_grid(QA, QB, i, j)[-1, -1])  # the grid ends at (i, j)


def phi_grid(QA: Tensor, QB: Tensor, i_max: int | None = None, j_max: int | None = None) -> np.ndarray:
    """φ(i, j) of :func:`phi` for every ``1 <= i <= i_max``, ``1 <= j <= j_max``, in one pass.

    Args:
        QA: ``(d, a)`` orthonormal columns.
        QB: ``(d, b)`` orthonormal columns.
        i_max: default ``a``; ``1 <= i_max <= a``.
        j_max: default ``b``; ``1 <= j_max <= b``.

    Returns:
        float64 array of shape ``(i_max, j_max)``; entry ``[i − 1, j − 1]`` is φ(i, j).

    Notes:
        With ``M = QAᵀQB`` (one ``(i_max, j_max)`` product), ``‖M[:i, :j]‖_F²`` is the 2-D cumulative
        sum of ``M²`` at ``[i − 1, j − 1]``; cost O(d·i_max·j_max). Values are clipped to ``[0, 1]``:
        φ <= 1 holds exactly for orthonormal bases, anything above is their rounding error.
    """
    device = _device_of(QA)
    A = _basis(QA, "QA", device)
    B = _basis(QB, "QB", device)
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"QA and QB must have the same number of rows d. Got {A.shape[0]} and {B.shape[0]} instead.")
    i_max = A.shape[1] if i_max is None else check_index(i_max, "i", 1, A.shape[1], " (columns of QA)")
    j_max = B.shape[1] if j_max is None else check_index(j_max, "j", 1, B.shape[1], " (columns of QB)")
    M = A[:, :i_max].mT @ B[:, :j_max]  # (i_max, j_max)
    energy = torch.cumsum(torch.cumsum(M**2, dim=0), dim=1)
    i = torch.arange(1, i_max + 1, device=M.device, dtype=torch.float64)[:, None]
    j = torch.arange(1, j_max + 1, device=M.device, dtype=torch.float64)[None, :]
    return (energy / torch.minimum(i, j)).clamp(0.0, 1.0).cpu().numpy()


def phi_random_baseline(i: int, j: int, d: int) -> float:
    """``E[φ(i, j)] = max(i, j) / d`` for independent uniformly random subspaces of ``R^d``.

    Exact: ``E‖QAᵀQB‖_F² = i·j/d`` (``E[QA QAᵀ] = (i/d)·I``), divided by ``min(i, j)``.

    >>> phi_random_baseline(8, 64, 4096)
    0.015625
    """
    d = check_index(d, "d", 1, 2**62)
    return max(check_index(i, "i", 1, d, " (d)"), check_index(j, "j", 1, d, " (d)")) / d


def phi_random_baseline_grid(i_max: int, j_max: int, d: int) -> np.ndarray:
    """:func:`phi_random_baseline` for every ``(i, j)``, float64 ``(i_max, j_max)``, laid out as :func:`phi_grid`."""
    d = check_index(d, "d", 1, 2**62)
    i_max, j_max = check_index(i_max, "i_max", 1, d, " (d)"), check_index(j_max, "j_max", 1, d, " (d)")
    i = np.arange(1, i_max + 1, dtype=np.float64)[:, None]
    j = np.arange(1, j_max + 1, dtype=np.float64)[None, :]
    return np.maximum(i, j) / d


# ---- captured energy ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CapturedEnergy:
    """Fractions of ``‖ΔW‖_F²`` that the subspaces ``U_L (out, r)``, ``V_L (in, r)`` hold (docs/definitions.md).

    Attributes:
        r: rank of the subspaces (columns of ``U_L``).
        two_sided: ``‖U_Lᵀ ΔW V_L‖_F² / ‖ΔW‖_F²``.
        left: ``‖U_Lᵀ ΔW‖_F² / ‖ΔW‖_F²`` (output space only).
        right: ``‖ΔW V_L‖_F² / ‖ΔW‖_F²`` (input space only).
        best_rank_r: ``Σ_{i<=r} σᵢ(ΔW)² / ‖ΔW‖_F²``, the most any rank-r subspace pair can hold
            (Eckart–Young); each of the other three is at most this.

    All four are 0 for ``ΔW = 0``. For random subspaces, ``E[left] = r/out``, ``E[right] = r/in``,
    ``E[two_sided] = r²/(out·in)``.
    """

    r: int
    two_sided: float
    left: float
    right: float
    best_rank_r: float


def captured_energy(dW: Update, U_L: Tensor, V_L: Tensor) -> CapturedEnergy:
    """Energy of an update ``ΔW`` captured by another update's singular subspaces (docs/definitions.md).

    This answers "how much of the full fine-tuning update does the LoRA subspace hold": pass the
    full update as ``dW`` and the LoRA update's bases, ``U_L = top_subspace(lora, r, "left")``,
    ``V_L = top_subspace(lora, r, "right")``.

    Args:
        dW: ``(out, in)`` update, dense, or factored as its thin SVD (:class:`Factored` or
            ``(U, S, Vh)``); a factored update is never densified: with ``ΔW = U diag(S) Vh``,
            ``‖U_LᵀΔW V_L‖ = ‖(U_LᵀU) diag(S) (Vh V_L)‖``, O((out + in)·q·r). A
            :class:`~spectra.singular_bases.TopSVD` is used as dense, with its top singular values
            and energy (its k must be at least r).
        U_L: ``(out, r)`` orthonormal columns.
        V_L: ``(in, r)`` orthonormal columns (right singular vectors as columns, i.e. ``Vh[:r].mT``).

    Returns:
        :class:`CapturedEnergy`; all zeros (not NaN) when ``ΔW = 0``.

    Notes:
        ``best_rank_r`` uses ``S`` of a factored update or a ``TopSVD``, and the exact float64
        singular values of a dense one (:func:`spectra.linalg.singular_values`, Gram route). Sums
        run in float64.

    Example:
        >>> dW = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> captured_energy(dW, e[:, :1], e[:, :1]).two_sided
        0.9
    """
    device = _update_device(dW)
    out, inn = _update_shape(dW)
    UL = _basis(U_L, "U_L", device)
    VL = _basis(V_L, "V_L", device)
    if UL.shape[0] != out:
        raise ValueError(f"U_L must have out = {out} rows. Got {UL.shape[0]} instead.")
    if VL.shape[0] != inn:
        raise ValueError(f"V_L must have in = {inn} rows. Got {VL.shape[0]} instead.")
    r = UL.shape[1]
    if VL.shape[1] != r:
        raise ValueError(f"V_L must have as many columns as U_L ({r}). Got {VL.shape[1]} instead.")

    total = None
    if _is_factored(dW):
        U, S, Vh = _factors64(dW, "dW", device)  # type: ignore[arg-type]
        left_core = (UL.mT @ U) * S  # (r, q): U_LᵀΔW = left_core · Vh, and Vh has orthonormal rows
        right_core = S[:, None] * (Vh @ VL)  # (q, r): ΔW V_L = U · right_core
        two = left_core @ (Vh @ VL)  # (r, r)
        S2 = S**2
    elif isinstance(dW, TopSVD):
        if dW.S.numel() < r:
            raise ValueError(f"dW must hold at least r = {r} singular values. Got {dW.S.numel()} instead.")
        D = _matrix(dW.dense, "dW", device)
        UtD = UL.mT @ D  # (r, in)
        left_core, right_core, two = UtD, D @ VL, UtD @ VL
        S2, total = dW.S.to(device=device, dtype=torch.float64) ** 2, dW.energy
    else:
        D = _matrix(dW, "dW", device)  # type: ignore[arg-type]
        UtD = UL.mT @ D  # (r, in)
        left_core, right_core, two = UtD, D @ VL, UtD @ VL
        S2 = torch.from_numpy(singular_values(D)).to(device) ** 2
    total = float(S2.sum()) if total is None else total
    check_energy_range(total, bool(left_core.any() or right_core.any() or S2.any()), "dW")
    if total == 0.0:
        return CapturedEnergy(r, 0.0, 0.0, 0.0, 0.0)
    return CapturedEnergy(r=r, two_sided=min(1.0, float((two**2).sum()) / total), left=min(1.0, float((left_core**2).sum()) / total),
                          right=min(1.0, float((right_core**2).sum()) / total), best_rank_r=min(1.0, float(S2[:r].sum()) / total))


# ---- amplification ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Amplification:
    """Hu et al. (2021, LoRA, Sec. 7.3, Table 7): how strongly ΔW amplifies directions of W.

    Attributes:
        r: subspace rank.
        delta_fro: ``‖ΔW‖_F``.
        w_fro: ``‖W‖_F``.
        proj_delta: ``‖U_rᵀ W V_r‖_F``, ``U_r, V_r`` the top-r left/right singular vectors of ΔW.
        factor: ``delta_fro / proj_delta`` (:func:`amplification_factor`).
        proj_own: ``‖U_W,rᵀ W V_W,r‖_F = sqrt(Σ_{i<=r} σᵢ(W)²)``, W's own top-r directions.
        proj_random: ``‖UᵀWV‖_F`` for one draw of random orthonormal ``U (out, r)``, ``V (in, r)``.
        proj_random_expected: ``sqrt(E‖UᵀWV‖_F²) = r·‖W‖_F / sqrt(out·in)``, the root mean square
            of ``proj_random`` (:func:`random_projection_rms`), a norm like the other ``proj_*``.
    """

    r: int
    delta_fro: float
    w_fro: float
    proj_delta: float
    factor: float
    proj_own: float
    proj_random: float
    proj_random_expected: float


def random_orthonormal(n: int, r: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``(n, r)`` float64 orthonormal columns whose span is uniformly (Haar) distributed: the QR of a
    Gaussian matrix drawn from ``generator`` (on its device), moved to ``device``."""
    if generator is not None and not isinstance(generator, torch.Generator):  # a seed (0) failed deep inside: "no attribute device"
        raise TypeError(f"generator must be a torch.Generator or None (seed one: torch.Generator().manual_seed(0)). Got {generator!r} instead.")
    G = torch.randn(n, r, generator=generator, device="cpu" if generator is None else generator.device, dtype=torch.float64).to(device)
    return torch.linalg.qr(G, mode="reduced").Q


def amplification(
    dW: Update,
    W: Tensor,
    r: int,
    *,
    generator: torch.Generator | None = None,
    base: WeightBasis | None = None,
    random_bases: tuple[Tensor, Tensor] | None = None,
) -> Amplification:
    """Amplification factor of an update over its base weight (Hu et al. 2021, Sec. 7.3, Table 7).

    Args:
        dW: ``(out, in)`` update, dense or factored (:class:`Factored` / ``(U, S, Vh)``; only its
            top-r factors are used, nothing is densified), or a
            :class:`~spectra.singular_bases.TopSVD` holding at least r triplets.
        W: ``(out, in)`` base weight.
        r: rank, ``1 <= r <= p`` (``p = min(out, in)``, or ``q`` for a factored ``dW``), and at most
            ``dW``'s resolved rank when it is lower (as :func:`top_subspace`'s k).
        generator: ``proj_random``'s ``torch.Generator`` (seeded: reproducible; None: torch's global one, advanced; else TypeError).
        base: W's decomposition when already computed (:class:`spectra.singular_bases.WeightBasis`
            of this W, shared with the intruders); its top-r singular values and energy are used.
        random_bases: the random ``(U (out, r), V (in, r))`` of ``proj_random``, when drawn ahead
            (:func:`random_orthonormal`); otherwise drawn here from ``generator``.

    Returns:
        :class:`Amplification`. A large ``factor`` with a small ``proj_delta`` means ΔW amplifies
        directions that W barely uses (Hu et al.: 21.6 at r = 4 for GPT-3's ``W_q``). For
        ``ΔW = 0`` its singular subspace is undefined and ``proj_delta``, ``factor`` are 0.

    Notes:
        Dense ΔW: its top-r triplets and its norm from the float64 Gram matrix
        (:func:`spectra.singular_bases.top_svd`, precision stated there). ``proj_own`` comes from
        W's exact float64 singular values (Gram route, :func:`spectra.linalg.singular_values`),
        which equals the projection onto W's own top-r singular vectors without computing them. An r
        that ends inside tied singular values of ΔW leaves its top-r subspace, and so ``proj_delta``,
        the solver's choice within the tie; ``spectra compare`` widens r past it (:func:`spectra.ties.tie_cut`).

    Example:
        >>> W = torch.diag(torch.tensor([4.0, 3.0, 0.5]))
        >>> dW = torch.diag(torch.tensor([0.0, 0.0, 2.0]))
        >>> a = amplification(dW, W, 1, generator=torch.Generator().manual_seed(0))
        >>> a.proj_delta, a.factor, a.proj_own
        (0.5, 4.0, 4.0)
    """
    device, W64, shape = _weight_for_update(W, dW, "W")
    out, inn = shape
    r = check_index(r, "r", 1, min(shape))
    dW = dW if isinstance(dW, (TopSVD, Factored, tuple)) else top_svd(_matrix(dW, "dW", device), r)  # type: ignore[arg-type]
    if isinstance(dW, TopSVD):
        U, S, Vh = (x.to(device=device, dtype=torch.float64) for x in (dW.U, dW.S, dW.Vh))
        delta_fro = math.sqrt(dW.energy)
    else:
        U, S, Vh = _factors64(dW, "dW", device)
        delta_fro = float(torch.sqrt((S**2).sum()))
    # past the resolved rank, a null space's arbitrary directions (a LoRA with a zero column of B gave a
    # factor set by the column it did not use): refused, as compare cuts r at the resolved rank
    if 0 < (rank := _resolved(dW, S)) < min(r, S.shape[0]):
        raise ValueError(f"r must be in [1, {rank}] (dW's {_resolution(dW)}). Got {r} instead.")
    r = check_index(r, "r", 1, S.shape[0])
    check_energy_range(delta_fro**2, bool(S.any()), "dW")
    proj_delta = float(torch.linalg.matrix_norm(U[:, :r].mT @ W64 @ Vh[:r].mT)) if delta_fro > 0 else 0.0
    if base is None:
        S_W = singular_values(W64)
        w_fro = float(np.sqrt(np.sum(S_W**2)))
    else:
        if base.S.numel() < r:
            base.complete()
        S_W, w_fro = base.S.cpu().numpy(), math.sqrt(base.energy)
    check_energy_range(w_fro**2, bool(np.any(S_W)), "W")
    if random_bases is None:
        Ur = random_orthonormal(out, r, generator, device)
        Vr = random_orthonormal(inn, r, generator, device)
    else:
        Ur, Vr = (_basis(Q, name, device) for Q, name in zip(random_bases, ("U", "V")))
        if Ur.shape != (out, r) or Vr.shape != (inn, r):
            raise ValueError(f"random_bases must be U ({out}, {r}) and V ({inn}, {r}). Got {tuple(Ur.shape)}, {tuple(Vr.shape)} instead.")
    # a projection at W's rounding level (σ₁(W)·√(p·ε)) is 0: ΔW's directions lie outside W's, factor ∞ (null)
    proj_delta = proj_delta if proj_delta > rank_resolution(float(np.max(S_W, initial=0.0)), min(shape)) else 0.0
    return Amplification(
        r=r,
        delta_fro=delta_fro,
        w_fro=w_fro,
        proj_delta=proj_delta,
        factor=amplification_factor(delta_fro, proj_delta),
        proj_own=float(np.sqrt(np.sum(S_W[:r] ** 2))),
        proj_random=float(torch.linalg.matrix_norm(Ur.mT @ W64 @ Vr)),
        proj_random_expected=random_projection_rms(w_fro, r, out, inn),
    )


# ---- intruder dimensions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Intruders:
    """Intruder dimensions of a fine-tuned matrix (Shuttleworth et al. 2024).

    Attributes:
        k: top singular vectors of ``W_base + ΔW`` examined.
        max_cos: float64 ``(k,)``: for each, by descending σ, its largest ``|cos|`` with W_base's left singular vectors.
        counts: ε -> number of the k with ``max_cos < ε`` (non-decreasing in ε).
        epsilon: the ε of ``count``.
        count: intruders at ``epsilon`` (default 0.5, the paper's).
        tied: whether W_base + ΔW's top k hold, or end inside, tied singular values: those vectors are
            then the solver's choice within the tie, and so are their cosines and the counts.
    """

    k: int
    max_cos: np.ndarray
    counts: dict[float, int]
    epsilon: float
    count: int
    tied: bool = False


def intruder_dimensions(
    W_base: Tensor,
    dW: Update,
    *,
    k: int = 10,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    epsilon: float = 0.5,
    base: WeightBasis | None = None,
) -> Intruders:
    """Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
    Equivalence"): top singular vectors of the tuned matrix unlike every singular vector of the base.

    Take the top ``k`` left singular vectors of ``W_tuned = W_base + ΔW``; one is an intruder when
    its largest absolute cosine with all ``p = min(out, in)`` left singular vectors of ``W_base`` is
    below ε. Only resolved vectors count (values above σ₁·√(p·u), :func:`spectra.metrics.numerical_rank`):
    a tuned weight of rank below k examines that many (``Intruders.k``), and the base's arbitrary
    null-space vectors are never matched (a direction outside a rank-deficient base is an intruder).

    Args:
        W_base: ``(out, in)`` base weight.
        dW: ``(out, in)`` update, dense or factored (:class:`Factored` / ``(U, S, Vh)``) or a
            :class:`~spectra.singular_bases.TopSVD`; the tuned weight ``W_base + ΔW`` is formed
            densely in float64 (the measure needs its singular vectors).
        k: ``1 <= k <= p``; the paper uses 10.
        epsilons: the ε sweep of ``counts``, each in ``[0, 1]``.
        epsilon: the ε of ``count``.
        base: W_base's decomposition when already computed
            (:class:`spectra.singular_bases.WeightBasis` of this W_base, shared by several updates of
            one base); otherwise made here.

    Returns:
        :class:`Intruders`.

    Notes:
        No SVD: the top-k vectors of the tuned weight from a top-k eigensolve of its float64 Gram
        matrix (for a factored update, W_base's Gram matrix plus the update's low-rank terms:
        :meth:`~spectra.singular_bases.WeightBasis.top_left_of_update`), and the base's left singular
        vectors from its Gram matrix, all p only when the top ones cannot decide a maximum; a tie of
        the base's values counts as one direction (:meth:`~spectra.singular_bases.WeightBasis.max_cosines`).
        Angles within ``(n + c·p)·u·σ₁²/gap`` of the exact vectors (:mod:`spectra.singular_bases`):
        the cosines agree with a float64 SVD's to about 1e-12 on Gaussian and fine-tuned weights.
        Half-precision inputs are upcast first (a bf16 decomposition would blur the cosines). The
        base's vectors are the thin set (``p``), as in PEFT's ``intruders.py``: when ``out > in`` a
        tuned vector outside the base's column space is an intruder, as it should be.

    Example:
        >>> Wb = torch.diag(torch.arange(6.0, 0.0, -1.0))   # singular vectors: the axes
        >>> u = torch.full((6, 1), 6.0**-0.5)                # |cos| with every axis: 0.41
        >>> res = intruder_dimensions(Wb, 20.0 * u @ u.mT, k=2)
        >>> res.count, res.counts[0.4], res.counts[0.9]
        (1, 0, 2)
    """
    device, Wb, shape = _weight_for_update(W_base, dW, "W_base")
    k, epsilons = check_index(k, "k", 1, p := min(shape)), tuple(epsilons)  # a generator was used up by the check below: counts {}
    for name, e in (*(("epsilons", x) for x in epsilons), ("epsilon", epsilon)):  # "0.5" failed inside the comparison
        if isinstance(e, (bool, np.bool_)) or not isinstance(e, (int, float, np.integer, np.floating)) or not 0.0 <= e <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]. Got {e!r} instead.")
    if base is None:
        base = WeightBasis(Wb, m=min(p, 2 * k + 10))
    elif tuple(base.W.shape) != tuple(shape):
        raise ValueError(f"base must be the decomposition of a {shape[0]}×{shape[1]} W_base. Got {tuple(base.W.shape)} instead.")
    kk = min(k + 1, p)  # one value more: whether the k-th is tied with the next
    if _is_factored(dW):  # from W_base's Gram matrix and the update's low-rank terms: no dense sum
        U, S, Vh = _factors64(dW, "dW", device)  # type: ignore[arg-type]
        U_tuned, S_tuned = base.top_left_pairs_of_update(U, S, Vh, kk)
    else:
        D = _matrix(dW.dense if isinstance(dW, TopSVD) else dW, "dW", device)  # type: ignore[arg-type]
        U_tuned, S_tuned = top_left_singular_pairs(Wb + D, kk)  # (out, kk), (kk,)
    k = min(k, numerical_rank(S_tuned.cpu().numpy(), p))  # beyond it the vectors are arbitrary
    tied = bool(k and tied_cuts(S_tuned, min(k + 1, kk), 0.0, p)[:k].any())
    max_cos = base.max_cosines(U_tuned[:, :k]).clamp(0.0, 1.0).cpu().numpy()  # (k,)
    return Intruders(k=k, max_cos=max_cos, counts={float(e): int(np.sum(max_cos < e)) for e in epsilons},
                     epsilon=float(epsilon), count=int(np.sum(max_cos < epsilon)), tied=tied)
