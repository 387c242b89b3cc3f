"""Singular vectors from one eigendecomposition of the smaller Gram matrix, computing only the
vectors a subspace measure needs (docs/definitions.md, "Subspaces").

``spectra compare`` needs, per matrix: every left singular vector of the base weight W (intruders;
shared by both updates), the top-k left singular vectors of each ``W + ΔW`` (intruders), and the
top-k singular triplets of a dense update (φ, angles, captured energy, amplification). A float64
SVD computes all vectors of both sides; here the smaller Gram matrix ``G`` (``M Mᵀ`` when
``out <= in``, else ``Mᵀ M``) is formed in float64 (BLAS ``syrk``) and LAPACK's symmetric
eigensolver returns only the eigenpairs asked for (``syevr`` for a top-k subset, ``syevd`` for all);
the other side's vectors follow as ``M v / σ``. On CUDA the same steps run in torch.

Precision (float64, unit roundoff ``u = 2⁻⁵³ ≈ 1.1e-16``; ``n`` the long side, ``p`` the short one):
forming G costs an error ``‖δG‖₂ <= n·u·σ₁²``, and the eigensolver is backward stable
(``‖E‖₂ <= c·p·u·σ₁²`` with a small constant c). Hence

- every ``σᵢ²`` is within ``(n + c·p)·u·σ₁²`` of the exact value (Weyl), so the energy fractions built
  from them are exact to about ``10⁻¹²``;
- each Gram-side singular vector is within an angle ``(n + c·p)·u·σ₁² / gapᵢ`` of the exact one,
  ``gapᵢ = min_{j≠i} |σᵢ² − σⱼ²|`` (Davis–Kahan), and a vector ``u = M v / ‖M v‖`` of the other
  side adds at most ``(σ₁/σᵢ)`` times that. At ``n = 1536, p = 576`` this is below 1e-6 rad whenever
  ``gapᵢ > 1e-6·σ₁²``; a float64 SVD's own bound is ``u·σ₁ / gap(σ)``.

Within a cluster of singular values closer than that, individual vectors are not determined by the
matrix (only the cluster's span is), for an SVD as for this route. Below the resolution
``σ₁·√(p·u)`` (:func:`spectra.metrics.rank_resolution`) a value is zero within this precision and its
vector is an arbitrary direction of the unresolved subspace: the measures here use only the
resolved vectors (the numerical rank, :func:`spectra.metrics.numerical_rank`), so a rank-deficient
matrix (a zero base, an update of fewer directions than asked) never contributes arbitrary ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spectra.checks import check_index
from spectra.lapack import Tridiagonal, top_eigh_upper
from spectra.linalg import finite_tensor, gram_upper
from spectra.metrics import check_energy_range, numerical_rank
from spectra.ties import TIE_REL, tie_runs

#: Largest p = min(out, in) whose Gram matrix (and its tridiagonal reduction) a :class:`WeightBasis` keeps
#: (two p × p float64 arrays: 256 MiB at 4096).
GRAM_KEEP_MAX_P = 4096


@dataclass(frozen=True)
class TopSVD:
    """A dense ``(out, in)`` matrix with its top-k singular triplets and its energy, decomposed once.

    Attributes:
        dense: the matrix as given (float32 or float64, any device; :func:`top_svd` widens other dtypes to float64).
        U: ``(out, k)`` float64, orthonormal columns, by descending singular value.
        S: ``(k,)`` float64, descending.
        Vh: ``(k, in)`` float64, orthonormal rows.
        energy: ``‖M‖_F²`` in float64 (the trace of the float64 Gram matrix).
    """

    dense: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    energy: float

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)``."""
        return int(self.dense.shape[0]), int(self.dense.shape[1])


def gram_eigh(M: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Top-k eigenpairs of the smaller float64 Gram matrix of ``M``.

    Args:
        M: ``(out, in)`` float32/float64 tensor, any device.
        k: eigenpairs wanted, ``1 <= k <= p``; None: all ``p``.

    Returns:
        ``(lam (k,), vecs (p, k), trace)``: eigenvalues descending (``σᵢ²``, clipped at 0), their
        orthonormal eigenvectors (left singular vectors when ``out <= in``, right ones otherwise),
        both float64 on ``M``'s device, and ``trace(G) = ‖M‖_F²``.
    """
    G = _gram64(M)
    trace = float(G.trace())
    check_energy_range(trace, trace != 0.0 or bool(M.any()), "M")  # squares near 1e±320: values 0 or inf
    lam, vecs = _top_eigh(G, k, scratch=True)
    return lam, vecs, trace


def _gram64(M: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of ``M`` (``M Mᵀ`` when ``out <= in``, else ``Mᵀ M``), float64 ``(p, p)``
    on M's device, both triangles filled (on the CPU numpy's ``syrk``, which releases the GIL)."""
    if M.device.type == "cpu":  # symmetric: its transpose is the same matrix, in C order (no copy)
        return torch.from_numpy(gram_upper(M.detach().numpy(), dtype=np.float64).T)
    M64 = M.to(torch.float64)
    return M64 @ M64.mT if M.shape[0] <= M.shape[1] else M64.mT @ M64


def _top_eigh(G: torch.Tensor, k: int | None, *, scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of the symmetric float64 ``G (p, p)`` (None: all p): eigenvalues descending,
    clipped at 0, and orthonormal eigenvectors ``(p, k)``, on G's device. ``scratch``: G is a
    temporary with both triangles filled, which the CPU solver may reduce in place (no p × p copy)."""
    p = G.shape[0]
    k = p if k is None else k
    if not 1 <= k <= p:
        raise ValueError(f"k must be in [1, {p}]. Got {k} instead.")
    if G.device.type == "cpu":
        # the GIL released, so modules solved in parallel threads use every core; only k vectors are
        # back-transformed, which beats numpy's full eigh at every k (p = 576: 26 against 28 ms for all)
        A = G.numpy()
        # a C-ordered symmetric array is its own transpose: the Fortran-ordered view LAPACK can work in
        lam, vecs = top_eigh_upper(A.T if scratch and A.flags.c_contiguous else A, k, overwrite=scratch)
        lam_t, vecs_t = torch.from_numpy(lam), torch.from_numpy(vecs)
    else:
        lam_all, vecs_all = torch.linalg.eigh(G)
        lam_t, vecs_t = lam_all.flip(0)[:k], vecs_all.flip(1)[:, :k]
    return lam_t.clamp_min(0.0), vecs_t


def _other_side(M64: torch.Tensor, vecs: torch.Tensor, *, wide: bool, complete: bool) -> torch.Tensor:
    """The other side's singular vectors ``M v / σ`` (or ``Mᵀ u / σ``), ``(d, k)`` float64.

    With ``complete`` the block is orthonormalised by QR (O(d·k²)): QR of orthogonal columns only
    normalises them (the sign is fixed to keep each direction), and columns of numerically zero σ,
    which carry no direction of M, become an orthonormal completion, as an SVD returns. Without it
    the columns are only normalised (callers that take |cosines| of all p columns, where a QR
    would cost as much as the eigensolve).
    """
    return _directions(M64.mT @ vecs if wide else M64 @ vecs, complete=complete)  # (d, k), columns σᵢ·(vector)


def _directions(Y: torch.Tensor, *, complete: bool) -> torch.Tensor:
    """The columns of ``Y`` ``(d, k)`` as unit vectors: orthonormalised by QR (each column's sign kept)
    with ``complete``, else only normalised (:func:`_other_side`)."""
    if complete:
        Q, R = torch.linalg.qr(Y, mode="reduced")
        sign = torch.sign(torch.diagonal(R))
        return Q * torch.where(sign == 0, torch.ones_like(sign), sign)
    norms = torch.linalg.vector_norm(Y, dim=0)
    return Y / torch.where(norms > 0, norms, torch.ones_like(norms))


def dense_matrix(M: object, name: str) -> torch.Tensor:
    """``M`` as the real 2-D tensor the Gram route reads (a numpy array or a list converted, detached; float32 and
    float64 kept, other dtypes such as bf16, fp16 or integers widened to float64, which the route works in and numpy,
    whose BLAS forms the Gram matrix on the CPU, has no bf16 for). ValueError naming ``name`` for complex input (a cast
    would drop the imaginary part), bool, NaN or Inf, a meta tensor, or a shape other than ``(out, in)``."""
    t = finite_tensor(M, name)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (out, in) matrix. Got shape {tuple(t.shape)} instead.")
    return t if t.dtype in (torch.float32, torch.float64) else t.double()


def top_svd(M: torch.Tensor, k: int) -> TopSVD:
    """Top-k singular triplets of a dense ``(out, in)`` matrix through its Gram matrix.

    Cost: the ``p × p`` float64 Gram (``out·in·p`` multiply-adds), a top-k symmetric eigensolve and
    one ``(out, in) × (·, k)`` product; no SVD. Precision: see the module docstring.

    Args:
        M: ``(out, in)`` real tensor or numpy array, any device (:func:`dense_matrix`: other dtypes than float32/64 widened).
        k: triplets wanted, a whole number in ``[1, min(out, in)]``.

    Returns:
        :class:`TopSVD`; ``U``, ``S``, ``Vh`` on ``M``'s device.

    Example:
        >>> M = torch.diag(torch.tensor([3.0, 1.0, 2.0]))
        >>> t = top_svd(M, 2)
        >>> t.S.tolist(), t.energy
        ([3.0, 2.0], 14.0)
    """
    M = dense_matrix(M, "M")  # a complex M lost its imaginary part in the float64 Gram matrix
    k = check_index(k, "k", 1, min(M.shape))
    wide = M.shape[0] <= M.shape[1]
    lam, vecs, trace = gram_eigh(M, k)
    S = lam.sqrt()
    M64 = M.to(torch.float64)
    other = _other_side(M64, vecs.to(M.device), wide=wide, complete=True)
    U, V = (vecs, other) if wide else (other, vecs)
    return TopSVD(M, U.to(M.device), S.to(M.device), V.mT.to(M.device), trace)


def left_singular_basis(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``p`` left singular vectors and singular values of ``W (out, in)``, through the Gram matrix.

    Returns:
        ``(U (out, p), S (p,))`` float64 on W's device, S descending. When ``out > in`` the columns
        are ``W v / ‖W v‖``; those of numerically zero σ carry no direction of W (any completion is
        as arbitrary as an SVD's) and are left as computed: they are used for ``|cos|`` only.
    """
    wide = W.shape[0] <= W.shape[1]
    lam, vecs, _ = gram_eigh(W)
    S = lam.sqrt()
    if wide:
        return vecs.to(W.device), S.to(W.device)
    return _other_side(W.to(torch.float64), vecs.to(W.device), wide=False, complete=False), S.to(W.device)


class WeightBasis:
    """A base weight's left singular vectors and values, computed once and shared by the measures of
    every update of it (intruders of both sides, amplification), and only as far as they need.

    It starts from the top ``m`` left singular vectors and the top ``values`` singular values (at least
    m + 1) of W's Gram matrix and computes all ``p`` vectors only when :meth:`max_cosines` cannot be
    decided from the top m.

    Arguments: ``W`` ``(out, in)`` real tensor or numpy array (:func:`dense_matrix`); ``m``, ``values`` whole numbers
    (``m >= 1``; both capped at p) or None (m: all p).

    Attributes:
        W: ``(out, in)`` float64 weight.
        U: ``(out, m)`` float64 left singular vectors, by descending σ (all p once :meth:`complete` ran).
        S: ``(min(p, max(m + 1, values)),)`` float64 singular values, descending (all p once :meth:`complete` ran).
        rank: W's numerical rank (:func:`spectra.metrics.numerical_rank`: the values above σ₁·√(p·u)),
            or None while only values above the resolution are known (at least ``len(S)`` then).
        energy: ``‖W‖_F²`` (trace of the float64 Gram matrix).
        G: W's float64 Gram matrix ``(p, p)`` (``W Wᵀ`` or ``Wᵀ W``, the smaller) for
            :meth:`top_left_of_update`; None above :data:`GRAM_KEEP_MAX_P`.

    Example:
        >>> b = WeightBasis(torch.diag(torch.tensor([3.0, 2.0, 1.0])), m=2)
        >>> b.S.tolist(), b.energy, b.max_cosines(torch.eye(3, dtype=torch.float64)[:, 2:]).tolist()
        ([3.0, 2.0, 1.0], 14.0, [1.0])
    """

    def __init__(self, W: torch.Tensor, m: int | None = None, values: int | None = None) -> None:
        W = dense_matrix(W, "W")
        self.W = W.to(torch.float64)
        p = min(W.shape)
        m = p if m is None else min(check_index(m, "m", 1, 1 << 62), p)
        values = None if values is None else check_index(values, "values", 0, 1 << 62)
        # one value past the m vectors: whether the m-th is tied with the next (:meth:`max_cosines`)
        n_values = min(p, max(m + 1, m if values is None else min(values, p)))
        G = _gram64(self.W)
        self.energy = float(G.trace())
        # kept for the Gram matrices of W + (low-rank update) (:meth:`top_left_of_update`), and on the CPU
        # with its tridiagonal reduction (every value now, any top vectors later, those of :meth:`complete`
        # too, without a second reduction), up to p = GRAM_KEEP_MAX_P (two p × p float64 arrays: 256 MiB
        # at 4096); larger ones keep nothing p × p: a top-k eigensolve, recomputed from W + ΔW
        keep = p <= GRAM_KEEP_MAX_P
        self.G = G if keep else None
        self._tri = Tridiagonal.of(G.numpy()) if keep and G.device.type == "cpu" and Tridiagonal.available() else None
        if self._tri is not None:
            lam = torch.from_numpy(np.maximum(self._tri.lam[:n_values], 0.0))
            vecs = torch.from_numpy(self._tri.top_vectors(m))
            self.rank: int | None = numerical_rank(np.sqrt(np.maximum(self._tri.lam, 0.0)), p)
        else:
            lam, vecs = _top_eigh(G, n_values)
            vecs = vecs[:, :m]
            r = numerical_rank(lam.sqrt().cpu().numpy(), p)
            self.rank = r if r < n_values or n_values == p else None
        self.S = lam.sqrt().to(W.device)
        self.U = self._left(vecs, complete=m < p)

    def _left(self, vecs: torch.Tensor, *, complete: bool) -> torch.Tensor:
        if self.W.shape[0] <= self.W.shape[1]:
            return vecs.to(self.W.device)
        return _other_side(self.W, vecs.to(self.W.device), wide=False, complete=complete)

    @property
    def is_complete(self) -> bool:
        """Whether :attr:`U` holds all ``p = min(out, in)`` left singular vectors."""
        return self.U.shape[1] == min(self.W.shape)

    def complete(self) -> None:
        """Compute all ``p`` left singular vectors and values (one full eigensolve)."""
        if not self.is_complete:
            if self._tri is not None:
                lam, vecs = torch.from_numpy(np.maximum(self._tri.lam, 0.0)), torch.from_numpy(self._tri.top_vectors(self._tri.lam.size))
            else:
                lam, vecs = _top_eigh(self.G, None) if self.G is not None else gram_eigh(self.W)[:2]
            self.S = lam.sqrt().to(self.W.device)
            self.U = self._left(vecs, complete=False)
            self.rank = numerical_rank(self.S.cpu().numpy(), min(self.W.shape))

    def top_left_of_update(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> torch.Tensor:
        """The vectors of :meth:`top_left_pairs_of_update`, ``(out, k)``."""
        return self.top_left_pairs_of_update(U, S, Vh, k)[0]

    def top_left_pairs_of_update(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k left singular vectors of ``W + U·diag(S)·Vh`` (a low-rank update, e.g. a LoRA's),
        ``(out, k)`` float64 by descending σ, and their singular values ``(k,)``, as
        :func:`top_left_singular_pairs` of the dense sum gives them, without forming it or its Gram matrix: W's Gram matrix plus the update's terms,
        ``G + C + Cᵀ + U S (Vh Vhᵀ) S Uᵀ`` with ``C = (W Vhᵀ) S Uᵀ`` (or ``Wᵀ U S Vh`` and
        ``Vhᵀ S (UᵀU) S Vh`` on the input side when ``out > in``), O((out + in)·p·r) instead of
        O(out·in·p). Its rounding error is that of G, about ``n·u·‖W‖²`` (module docstring), which is
        the dense route's ``n·u·‖W + ΔW‖²`` within a factor 4 when ``‖ΔW‖_F ≤ ‖W‖_F / 2``; a larger
        update (one that could cancel much of W) takes the dense route.

        Args:
            U: ``(out, r)``, S: ``(r,)``, Vh: ``(r, in)`` float64 on W's device (any r; need not be orthonormal).
            k: vectors wanted, ``1 <= k <= p``.
        """
        W, G = self.W, self.G
        US = U * S
        update_sq = float(torch.sum((US.mT @ US) * (Vh @ Vh.mT)))  # ‖U S Vh‖_F² = tr(SUᵀUS · VhVhᵀ), r × r
        if G is None or not update_sq <= self.energy / 4:
            return top_left_singular_pairs(W + US @ Vh, k)
        wide = W.shape[0] <= W.shape[1]
        # the three terms as one symmetric rank-2r product: X Rᵀ + R Xᵀ + R K Rᵀ = L Rᵀ + R Lᵀ with
        # L = X + R K / 2 (K symmetric): one (p, 2r) × (2r, p) product and one addition
        if wide:  # G = W Wᵀ (out × out): X = W Vhᵀ, R = U S, K = Vh Vhᵀ
            X, R, K = W @ Vh.mT, US, Vh @ Vh.mT
        else:  # G = Wᵀ W (in × in): X = Wᵀ U S, R = Vhᵀ, K = (U S)ᵀ (U S)
            X, R, K = W.mT @ US, Vh.mT, US.mT @ US
        L = X + R @ K / 2
        lam, vecs = _top_eigh(G + torch.cat([L, R], dim=1) @ torch.cat([R, L], dim=1).mT, k, scratch=True)
        if wide:
            return vecs, lam.sqrt()
        return _directions(W @ vecs + US @ (Vh @ vecs), complete=True), lam.sqrt()  # (W + U S Vh)·v, orthonormalised

    def max_cosines(self, Q: torch.Tensor) -> torch.Tensor:
        """For each column q of ``Q (out, k)`` (unit vectors), ``max_j |⟨q, u_j⟩|`` over W's resolved
        left singular vectors u_j (the first :attr:`rank`: those of values below the resolution are
        arbitrary directions; 0 for a zero W), float64 ``(k,)``. Where W's singular values are tied
        (within :data:`spectra.ties.TIE_REL`·σ₁ of the first of a run) its vectors there are any
        orthonormal basis of the tie's span, so the tie counts as one direction of W: the norm of q's
        projection on that span, ``√Σ_{j in tie} ⟨q, u_j⟩²``, the largest cosine any choice of the
        vectors gives (an orthogonal W, all values tied, holds every q: cosine 1).

        From the top m alone when that decides it: the vectors beyond the ties complete within m hold
        at most ``ρ = 1 − Σ ⟨q, u_j⟩²`` of q's squared norm (the u_j are orthonormal), so no cosine
        among them exceeds ``√ρ``; when the largest of the top-m cosines is above ``√ρ`` (with a
        1e-9 margin for rounding) it is the maximum. Otherwise all p vectors are computed
        (:meth:`complete`) and the maximum taken over them. Either way the result is the maximum
        over those vectors, to the precision of the vectors (module docstring).
        """
        Q64 = Q.mT.to(torch.float64)
        every = self.rank is not None and self.rank <= self.U.shape[1]  # every resolved vector is at hand
        if every and self.rank == 0:
            return torch.zeros(Q.shape[1], dtype=torch.float64, device=self.U.device)
        n = self.rank if every else self.U.shape[1]
        C2 = (Q64 @ self.U[:, :n]) ** 2  # (k, n), every column resolved
        S = self.S.cpu().numpy()
        starts = tie_runs(S, n)
        ends = starts[1:] + [n]
        if not every and (S.size <= n or S[starts[-1]] - S[n] <= TIE_REL * float(S[0])):  # the last run may go on past n
            starts, ends = starts[:-1], ends[:-1]
        if not starts:
            self.complete()
            return self.max_cosines(Q)
        if len(starts) == ends[-1]:  # single values: the largest cosine itself
            top = C2[:, : ends[-1]].amax(dim=1).sqrt()
        else:
            cum = torch.nn.functional.pad(C2.cumsum(dim=1), (1, 0))  # (k, n + 1): the runs' sums as differences
            top = (cum[:, ends] - cum[:, starts]).amax(dim=1).clamp_min(0.0).sqrt()
        if every:
            return top
        rest = (1.0 - C2[:, : ends[-1]].sum(dim=1)).clamp_min(0.0).sqrt()
        if bool((top >= rest + 1e-9).all()):
            return top
        self.complete()
        return self.max_cosines(Q)


def top_left_singular_vectors(M: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k left singular vectors of ``M (out, in)``, ``(out, k)`` float64, by descending σ."""
    return top_left_singular_pairs(M, k)[0]


def top_left_singular_pairs(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k left singular vectors of ``M (out, in)``, ``(out, k)`` float64 by descending σ, and
    their singular values ``(k,)`` float64, on M's device. ``M`` as :func:`top_svd`'s, ``k`` in ``[1, min(out, in)]``."""
    M = dense_matrix(M, "M")
    k = check_index(k, "k", 1, min(M.shape))
    wide = M.shape[0] <= M.shape[1]
    lam, vecs, _ = gram_eigh(M, k)
    S = lam.sqrt().to(M.device)
    if wide:
        return vecs.to(M.device), S
    return _other_side(M.to(torch.float64), vecs.to(M.device), wide=False, complete=True), S


__all__ = ["GRAM_KEEP_MAX_P", "TopSVD", "WeightBasis", "dense_matrix", "gram_eigh", "left_singular_basis", "top_left_singular_pairs",
           "top_left_singular_vectors", "top_svd"]
