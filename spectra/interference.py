"""How several updates of one base matrix interfere: pure float64 math, no I/O.

Given n updates ``ΔW_1 … ΔW_n`` of the same ``(out, in)`` matrix (fine-tunes of one base on
different tasks), this module computes

per pair (s, t)
    - :func:`cosine_matrix`: the cosine of the flattened updates,
      ``⟨ΔW_s, ΔW_t⟩_F / (‖ΔW_s‖_F ‖ΔW_t‖_F)`` — the similarity Ilharco et al. (2023, "Editing models
      with task arithmetic", ICLR) report between task vectors, here per matrix;
    - :func:`phi_matrix`: Hu et al.'s normalised subspace similarity (2021, "LoRA", Sec. 7, Eq. 4)
      of the two top-k singular subspaces, ``φ = ‖Q_sᵀQ_t‖_F² / min(k_s, k_t)`` (the definitions
      document, "Subspaces");
    - :func:`captured_matrix`: the energy of ``ΔW_t`` captured by ``ΔW_s``'s top-k left and right
      singular subspaces, ``‖U_sᵀ ΔW_t V_s‖_F² / ‖ΔW_t‖_F²`` (the definitions document, "Subspaces");

over all n together
    - :func:`singular_task_interference`: the Task Singular Vectors interference of Gargiulo et al.
      (2025, "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR: its singular task interference),
      ``‖(UᵀU − I) Σ (VᵀV − I)‖₁`` with the tasks' top-k singular vectors stacked side by side
      (see the function for the stacking, which fusion_bench gets wrong);
    - :func:`knots_basis`: the shared basis of KnOTS (Stoica et al. 2025, "Model merging with SVD to
      tie the KnOTS", ICLR): the SVD of ``[ΔW_1 … ΔW_n]`` concatenated along the input axis,
      and how aligned the tasks are in it;
    - :func:`accumulation`: the spectrum of the summed update ``Σ_t ΔW_t`` (task arithmetic with unit
      coefficients) against the spectra of the parts: the over-accumulation of shared directions
      that Marczak et al. (2025, "No Task Left Behind: Isotropic Model Merging with Common and
      Task-Specific Subspaces", ICML, Fig. 1) see in merged updates;

and for one update at two times (``spectra trace``)
    - :func:`subspace_turn`: how far its top-k singular subspaces turned (φ and principal angles).

Updates are given dense (``(out, in)`` tensor or array) or factored as a thin SVD
(:class:`spectra.subspaces.Factored`, e.g. ``Factored.from_lora(B, A, s)`` for a LoRA update, or the
top-k triplets of a full update). Everything is upcast to float64 before any product; results come
back as float64 numpy arrays or Python floats. Measures over the top-k subspaces (φ, captured energy,
TSV, KnOTS) take the factored forms; the cosine and the accumulation are exact for whatever form is
given (a factored form holding only the top-k triplets of a full update is the truncated update).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spectra.checks import check_index, check_number
from spectra.engine import factored_svd
from spectra.lapack import Tridiagonal
from spectra.linalg import all_finite, finite_tensor, gram, real_tensor, row_blocks, thin_qr
from spectra.lowrank import scale_pow2, squaring_exponent
from spectra.metrics import RANK_TOL, effective_rank, energy_rank, rank_resolution, stable_rank, threshold_key
from spectra.subspaces import Factored, phi, principal_angles
from spectra.threads import ONE_THREAD_MAX_P, one_blas_thread
from spectra.ties import tie_cut

Update = torch.Tensor | np.ndarray | Factored

# Singular values below RANK_TOL·σ₁ count as zero when the numerical rank of a concatenation is
# taken (float64 SVD of a stack of exact factors: its rounding is ~1e-15·σ₁); spectra.metrics.RANK_TOL


# ---- inputs ------------------------------------------------------------------------------------------
def as_factored64(f: Factored) -> Factored:
    """``f`` in float64 with its triplets sorted by descending singular value, and the triplets with
    ``σ <= RANK_TOL · σ₁`` dropped: zero or rounding-level values carry no direction (a rank-2
    update's third singular vector from a float64 SVD is noise), so they never enter a subspace."""
    U = real_tensor(f.U, "U").to(torch.float64)
    S = real_tensor(f.S, "S").to(U.device, torch.float64)
    Vh = real_tensor(f.Vh, "Vh").to(U.device, torch.float64)
    if not bool((S >= 0).all()):  # a negative or NaN value would be dropped below as "no direction"
        raise ValueError(f"S must be non-negative singular values. Got {S.tolist()[:8]} instead.")
    if not (all_finite(S) and all_finite(U) and all_finite(Vh)):
        raise ValueError("an update's factors must be finite. Got NaN or Inf entries instead.")
    order = torch.argsort(S, descending=True)
    floor = RANK_TOL * float(S[order[0]]) if S.numel() else 0.0
    keep = order[S[order] > floor]
    return Factored(U[:, keep], S[keep], Vh[keep])


def truncate(f: Factored, k: int) -> Factored:
    """The top-``k`` triplets of ``f`` (all of them when it has fewer), float64, descending; ``k`` is
    widened past singular values tied with the k-th (:func:`tie_cut`)."""
    k = check_index(k, "k", 1, 1 << 62)  # 2.5 was cut to 2 without a word
    g = as_factored64(f)
    k = tie_cut(g.S, k, g.S.numel())
    return Factored(g.U[:, :k], g.S[:k], g.Vh[:k])


def _dense64(x: Update) -> torch.Tensor:
    if isinstance(x, Factored):
        g = as_factored64(x)
        return (g.U * g.S) @ g.Vh
    t = real_tensor(x, "an update").to(torch.float64)
    if t.ndim != 2:
        raise ValueError(f"an update must be a 2-D (out, in) matrix. Got shape {tuple(t.shape)} instead.")
    if not all_finite(t):  # its cosines would be NaN, which reads as "a zero update" here
        raise ValueError("an update must be finite. Got NaN or Inf entries instead.")
    return t


def _shape(x: Update) -> tuple[int, int]:
    return x.shape if isinstance(x, Factored) else tuple(torch.as_tensor(x).shape)  # type: ignore[return-value]


def _check_shapes(updates: Sequence[Update]) -> tuple[int, int]:
    if len(updates) < 1:
        raise ValueError("need at least one update. Got none instead.")
    shapes = {tuple(_shape(u)) for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"updates must share one (out, in) shape. Got {sorted(shapes)} instead.")
    return next(iter(shapes))  # type: ignore[return-value]


def spectrum_and_top(delta: torch.Tensor, k: int, *, rel_tol: float | None = None,
                     floor: float = 0.0) -> tuple[np.ndarray, Factored]:
    """Every singular value of a dense update and its top-k triplets, from one float64 eigensolve.

    The smaller Gram matrix ``G = X Xᵀ`` (``X`` = ΔW, or ΔWᵀ when out > in; :func:`spectra.linalg.gram`)
    is decomposed on ``delta``'s device (on the CPU reduced once, :class:`spectra.lapack.Tridiagonal`: every value,
    then the kept vectors only; elsewhere ``torch.linalg.eigh``): ``σ_i = sqrt(λ_i)`` and the
    eigenvectors are the singular vectors of that side; the other side's top-k vectors are
    ``Xᵀ q_i / σ_i``, re-orthonormalised by a QR (only their span is used downstream). Singular
    values are exact to ≈1e-7·σ₁ (float64 Gram, the definitions' precision statement); vectors are
    kept only for ``σ_i > max(rel_tol · σ₁, floor)``: below the route's resolution ``σ₁·√(p·ε)``
    (:func:`spectra.metrics.rank_resolution`, the default ``rel_tol``, as ``compare`` cuts) the Gram route cannot
    resolve them, and at or below ``floor`` (the storage rounding floor of the weights ΔW was formed
    from, :func:`spectra.delta.pair_floor`) they are rounding noise of the stored weights. A float64
    update whose squares would leave float64's range (entries near 1e±200) is scaled by a power of two
    first (exact; :func:`spectra.lowrank.squaring_exponent`), as ``spectra diff`` does.

    Args:
        delta: ``(out, in)`` float tensor on any device.
        k: triplets kept (``>= 1``), more when the k-th value ties the next (:func:`tie_cut`).
        rel_tol: relative floor of the kept singular values; None: ``√(p·ε)`` (a fixed 1e-6 dropped a direction at
            5e-7·σ₁ that ``compare`` resolves, and kept rounding at p > 4500).
        floor: absolute floor of the kept singular values, in ΔW's units (0: none). The spectrum
            ``S`` is returned whole either way.

    Returns:
        ``(S, top)``: float64 ``(p,)`` descending and a float64 :class:`Factored` with at most k
        triplets, more when the k-th ties the next (none for a zero update).
    """
    delta = finite_tensor(delta, "delta")  # NaN or Inf: NaN values and no vectors, read as a zero update
    if delta.ndim != 2:
        raise ValueError(f"delta must be a 2-D (out, in) matrix. Got shape {tuple(delta.shape)} instead.")
    k = check_index(k, "k", 1, 1 << 62)
    floor = check_number(floor, "floor", 0.0)
    out, inn = delta.shape
    rel_tol = rank_resolution(1.0, min(out, inn)) if rel_tol is None else check_number(rel_tol, "rel_tol", 0.0, 1.0)
    wide = out <= inn
    e = squaring_exponent(delta)  # 0 unless float64 (narrower entries square within float64's range)
    if e:
        delta = scale_pow2(delta, -e)
    G = gram(delta, dtype=torch.float64)
    # on the CPU one reduction gives every value, then only the vectors kept (a full eigh back-transformed all p: at
    # p = 4096, 21 s against 3.7 s for the values, for 16 vectors)
    blas = one_blas_thread(G.shape[0] <= ONE_THREAD_MAX_P)  # a small reduction is faster on one BLAS thread
    with blas:
        tri = Tridiagonal.of(G.numpy(), overwrite=True) if G.device.type == "cpu" and Tridiagonal.available() else None
    if tri is not None:
        lam = torch.from_numpy(tri.lam).clamp_min(0.0)
    else:
        lam, Q = torch.linalg.eigh(G)  # ascending
        lam, Q = lam.flip(0).clamp_min(0.0), Q.flip(1)
    S = lam.sqrt()
    S_np = np.ldexp(S.cpu().numpy(), e)
    cut = max(rel_tol * float(S[0]), math.ldexp(floor, -e) if floor > 0 else 0.0)  # the floor in the scaled units (exact)
    above = int((cut < S).sum()) if float(S[0]) > 0 else 0
    keep = tie_cut(S, min(k, above), above, math.ldexp(floor, -e) if floor > 0 else 0.0)  # a cut inside a tie widens
    if keep == 0:
        return S_np, Factored(torch.zeros(out, 0, dtype=torch.float64, device=delta.device), S[:0],
                              torch.zeros(0, inn, dtype=torch.float64, device=delta.device))
    Sk = S[:keep]
    X = delta if wide else delta.mT  # (p, long)
    with blas:
        Qk = torch.from_numpy(tri.top_vectors(keep)) if tri is not None else Q[:, :keep]  # the short side's singular vectors (p, keep)
        other, R = thin_qr(_times(X.mT, Qk) / Sk)  # of (long, keep), already orthonormal up to rounding
    other = other * torch.sign(torch.diagonal(R))  # undo the QR's sign flips: U diag(S) Vh stays the truncation
    U, Vh = (Qk, other.mT) if wide else (other, Qk.mT)
    return S_np, Factored(U, torch.from_numpy(S_np[:keep].copy()).to(Sk.device), Vh)


def _times(A: torch.Tensor, Q: torch.Tensor, block: int = 1 << 22) -> torch.Tensor:
    """``A @ Q`` in float64 (``A (n, p)`` any float dtype, ``Q (p, k)`` float64), ``A`` upcast ``block`` entries at a
    time: a float64 copy of a whole 100k-row embedding's ΔW is 800 MB that trace's and interfere's memory
    statements ("one ΔW") do not count."""
    if A.numel() <= block or A.dtype == torch.float64:
        return A.to(torch.float64) @ Q
    out = torch.empty(A.shape[0], Q.shape[1], dtype=torch.float64, device=Q.device)
    for rows in row_blocks(A.shape[0], A.shape[1], block):
        out[rows] = A[rows].to(torch.float64) @ Q
    return out


# ---- pairs -------------------------------------------------------------------------------------------
def flat_inner(a: Update, b: Update) -> float:
    """``⟨a, b⟩_F = Σ_ij a_ij b_ij`` in float64, exact for any mix of dense and factored forms.

    Factored forms are never densified: ``⟨U_a S_a Vh_a, U_b S_b Vh_b⟩ = Σ_ij S_a,i S_b,j
    (U_aᵀU_b)_ij (Vh_a Vh_bᵀ)_ij`` and ``⟨D, U S Vh⟩ = Σ_i σ_i u_iᵀ D v_i``.

    >>> flat_inner(torch.eye(2), 3 * torch.eye(2))
    6.0
    """
    _check_shapes([a, b])
    return inner64(checked64(a), checked64(b))


def checked64(x: Update) -> torch.Tensor | Factored:
    """An update as :func:`inner64` and :func:`captured64` take it: a factored one through :func:`as_factored64`
    (``U (out, k)``, ``S (k,)``, ``Vh (k, in)`` float64, descending), a dense one as a finite float64 ``(out, in)`` tensor
    (:func:`_dense64`'s checks); check once, use in every pair."""
    return as_factored64(x) if isinstance(x, Factored) else _dense64(x)


def inner64(a: torch.Tensor | Factored, b: torch.Tensor | Factored) -> float:
    """:func:`flat_inner` of two updates already checked (:func:`checked64`): no conversion, no check per pair."""
    if isinstance(a, Factored) and isinstance(b, Factored):
        core = (a.U.mT @ b.U.to(a.U.device)) * (a.Vh @ b.Vh.to(a.U.device).mT)  # (q_a, q_b)
        return float((a.S[:, None] * core * b.S.to(a.U.device)[None, :]).sum())
    if isinstance(b, Factored):
        a, b = b, a
    if isinstance(a, Factored):  # a factored, b dense: Σ σ_i u_iᵀ D v_i
        return float((a.S * ((a.U.mT @ b.to(a.U.device)) * a.Vh).sum(dim=1)).sum())
    return float(torch.dot(a.reshape(-1), b.to(a.device).reshape(-1)))


def gram_matrix(updates: Sequence[Update]) -> np.ndarray:
    """``G[s, t] = ⟨ΔW_s, ΔW_t⟩_F``, float64 ``(n, n)``, symmetric (:func:`flat_inner`)."""
    _check_shapes(updates)
    n = len(updates)
    ready = [checked64(u) for u in updates]  # converted and checked once, not once per pair
    G = np.zeros((n, n))
    for s in range(n):
        for t in range(s, n):
            G[s, t] = G[t, s] = inner64(ready[s], ready[t])
    return G


def cosine_from_gram(G: np.ndarray) -> np.ndarray:
    """Cosines ``G[s, t] / sqrt(G[s, s] G[t, t])``, clipped to [−1, 1]; NaN where an update is zero
    (the cosine of a zero matrix is undefined, and 0 would read as "orthogonal")."""
    d = np.sqrt(np.clip(np.diag(G), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        C = G / np.outer(d, d)
    C[np.outer(d, d) == 0] = np.nan
    return np.clip(C, -1.0, 1.0)


def cosine_matrix(updates: Sequence[Update]) -> np.ndarray:
    """Cosine of the flattened updates, ``(n, n)`` float64 (Ilharco et al. 2023, per matrix).

    1 on the diagonal; 0 for updates orthogonal as vectors of ``R^{out·in}``; NaN for a zero update.

    >>> e = torch.eye(2)
    >>> cosine_matrix([e, 2 * e, torch.tensor([[0., 1.], [1., 0.]])]).round(6).tolist()
    [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    return cosine_from_gram(gram_matrix([_unit_scaled(u) for u in updates]))


def _unit_scaled(x: Update) -> Update:
    """``x`` divided by a power of two (exact) when its values would square out of float64's range
    (near 1e±160): cosines are scale-free, and such an inner product is inf or 0."""
    if isinstance(x, Factored):
        g = as_factored64(x)
        e = squaring_exponent(g.S)
        return Factored(g.U, scale_pow2(g.S, -e), g.Vh) if e else g
    d = _dense64(x)
    e = squaring_exponent(d)
    return scale_pow2(d, -e) if e else d


def subspace(f: Factored, side: str) -> torch.Tensor:
    """The orthonormal basis of ``f``'s singular vectors on ``side`` (``"left"``: U ``(out, q)``;
    ``"right"``: Vhᵀ ``(in, q)``), in descending singular value order."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right'. Got {side!r} instead.")
    g = as_factored64(f)
    return g.U if side == "left" else g.Vh.mT


def phi_matrix(factors: Sequence[Factored], side: str = "right") -> np.ndarray:
    """``Φ[s, t] = φ(ΔW_s, ΔW_t, k_s, k_t) = ‖Q_sᵀ Q_t‖_F² / min(k_s, k_t)`` (Hu et al. 2021, Eq. 4)
    on each update's whole factored subspace (``k_t`` = its number of non-zero triplets).

    Args:
        factors: the (truncated) thin SVDs, one per task, same shape.
        side: ``"right"`` (input space; Hu et al. compared LoRA ``A`` matrices) or ``"left"``.

    Returns:
        ``(n, n)`` float64 in [0, 1], 1 on the diagonal, 1 when one span contains the other, 0 when
        the spans are orthogonal, ``max(k_s, k_t)/d`` in expectation for random spans; NaN where an
        update is zero (no subspace).
    """
    factors = list(factors)
    for i, f in enumerate(factors):  # a dense matrix failed inside ("'numpy.ndarray' object has no attribute 'U'")
        if not isinstance(f, Factored):
            raise TypeError(f"factors must be Factored thin SVDs (Factored.from_lora, spectrum_and_top). Got {type(f).__name__} at {i} instead.")
    _check_shapes(factors)
    Qs = [subspace(f, side) for f in factors]
    n = len(Qs)
    P = np.full((n, n), np.nan)
    for s in range(n):
        for t in range(s, n):
            if Qs[s].shape[1] and Qs[t].shape[1]:
                P[s, t] = P[t, s] = phi(Qs[s], Qs[t].to(Qs[s].device), Qs[s].shape[1], Qs[t].shape[1])
    return P


def captured_two_sided(f_s: Factored, update_t: Update) -> float:
    """``‖U_sᵀ ΔW_t V_s‖_F² / ‖ΔW_t‖_F²``: the energy of ``ΔW_t`` inside ``ΔW_s``'s left and right
    singular subspaces (the definitions document, "Subspaces"); NaN when either update is zero."""
    h = checked64(update_t)
    return captured64(as_factored64(f_s), h, float((h.S**2).sum()) if isinstance(h, Factored) else float((h**2).sum()))


def captured64(g: Factored, h: torch.Tensor | Factored, total: float) -> float:
    """:func:`captured_two_sided` of updates already checked (:func:`checked64`, one shape ``(out, in)``, one device):
    ``g`` whose subspaces, ``h`` whose energy, ``total`` being ``‖h‖_F²`` (float64, the units of h squared)."""
    if g.S.numel() == 0 or total == 0.0:
        return math.nan
    U, V = g.U, g.Vh.mT
    core = ((U.mT @ h.U.to(U.device)) * h.S.to(U.device) @ (h.Vh.to(U.device) @ V) if isinstance(h, Factored)
            else U.mT @ h.to(U.device) @ V)  # (k_s, k_s)
    return min(1.0, float((core**2).sum()) / total)


def captured_matrix(factors: Sequence[Factored], updates: Sequence[Update] | None = None) -> np.ndarray:
    """``C[s, t]`` = fraction of ``ΔW_t``'s energy captured by ``ΔW_s``'s top subspaces (two-sided).

    Args:
        factors: the (truncated) thin SVDs giving each task's subspaces (``U_s``, ``V_s``).
        updates: the updates whose energy is measured (dense, or factored: exact for LoRA); default
            ``factors`` themselves.

    Returns:
        ``(n, n)`` float64 in [0, 1]; row s = whose subspaces, column t = whose energy. The diagonal
        is the share of each update its own top-k triplets hold (1 for a LoRA update with k >= r).
    """
    updates = list(factors) if updates is None else list(updates)
    _check_shapes(list(factors) + updates)
    n = len(factors)
    return np.array([[captured_two_sided(factors[s], updates[t]) for t in range(n)] for s in range(n)])


# ---- all n together: Task Singular Vectors ----------------------------------------------------------
@dataclass(frozen=True)
class TSVInterference:
    """Singular task interference of n updates (Gargiulo et al. 2025, CVPR).

    Attributes:
        sti: ``‖(UᵀU − I) Σ (VᵀV − I)‖₁`` (entrywise ℓ1 norm), in the units of the singular values.
        relative: ``sti / ((n − 1)² · ‖Σ‖₁)`` with ``‖Σ‖₁ = Σ_t Σ_i σ_t,i``: 0 when every pair of tasks
            has orthogonal left or right singular vectors, 1 for n identical updates. It can exceed
            1 when tasks share subspaces but pair the directions differently (the ℓ1 norm is
            entrywise, so it depends on how ``U_sᵀU_t`` mixes the basis vectors: up to √k for a
            rotation within a shared k-dimensional subspace).
        relative_fro: spectra's bounded companion, ``‖M‖_F / sqrt(Σ_st b_st²)`` with
            ``M = (UᵀU − I) Σ (VᵀV − I)`` and ``b_st = Σ_{r ∉ {s, t}} ‖Σ_r‖_F``: block (s, t) of M is
            ``Σ_{r ≠ s, t} (U_sᵀU_r) Σ_r (V_rᵀV_t)`` and each cosine block is a contraction, so
            ``‖M_st‖_F <= b_st`` and the ratio lies in [0, 1]: 0 for orthogonal tasks, 1 for
            identical updates with equal spectra, unchanged by rotations that keep Σ.
        ranks: the ``k_t`` of each task (non-zero triplets used).

    ``sti``, ``relative`` and ``relative_fro`` are None when fewer than two tasks have a direction (a
    zero update, or a dense one entirely at the rounding level of its stored weights): there is no
    pair of tasks to interfere and the normalisers are 0, so 0 ("no interference") would be a claim
    the data cannot make.
    """

    sti: float | None
    relative: float | None
    relative_fro: float | None
    ranks: list[int]


def singular_task_interference(factors: Sequence[Factored]) -> TSVInterference:
    """Task Singular Vectors interference of n updates of one matrix (Gargiulo et al. 2025, CVPR).

    With each task's (truncated) thin SVD ``ΔW_t ≈ U_t Σ_t V_tᵀ`` (``U_t (out, k_t)``,
    ``V_t (in, k_t)``), stack the singular vectors **side by side**, as the paper and its code do
    (``sum_u[:, i*k:(i+1)*k] = u[:, :k]`` in AntoAndGar/task_singular_vectors)::

        U = [U_1 … U_n]          (out, K)   K = Σ k_t
        V = [V_1 … V_n]          (in,  K)
        Σ = blockdiag(Σ_1 … Σ_n) (K, K)
        STI = ‖(UᵀU − I) Σ (VᵀV − I)‖₁

    ``UᵀU − I`` is zero on its diagonal blocks (each ``U_t`` is orthonormal) and holds the cosines
    ``U_sᵀU_t`` between different tasks' singular vectors elsewhere, so STI is 0 when every pair of
    tasks is orthogonal on the left or on the right, and grows with shared directions weighted by
    the singular values. Concatenating along the other axis (``torch.cat(U, dim=0)``, as
    fusion_bench's ``compute_task_singular_interference`` does) gives ``UᵀU = Σ_t U_tᵀU_t`` of size
    ``(k, k)``, which is ``n·I`` for any tasks and no longer matches Σ's ``n·k`` rows for n > 1.

    ``‖·‖₁`` is taken entrywise (the sum of absolute values); the paper writes ``‖·‖₁`` without
    expanding it. Cost O((out + in)·K² + K³); memory O(K²).

    Args:
        factors: one thin SVD per task, all of the same ``(out, in)`` shape; zero triplets are
            dropped, so a zero update contributes nothing.

    Returns:
        :class:`TSVInterference` (its measures None when fewer than two tasks have a triplet).

    Example:
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> f1 = Factored(e[:, :1], torch.tensor([2.0]), e[:1])      # 2·e1e1ᵀ
        >>> f2 = Factored(e[:, 1:2], torch.tensor([1.0]), e[1:2])    # orthogonal: no interference
        >>> singular_task_interference([f1, f2]).sti, singular_task_interference([f1, f1]).relative
        (0.0, 1.0)
        >>> round(singular_task_interference([f1, f1, f1]).relative_fro, 12)
        1.0
    """
    fs = [as_factored64(f) for f in factors]
    _check_shapes(fs)
    ranks = [int(f.S.numel()) for f in fs]
    # a zero update (a copy of the base) has no block in U, Σ, V: it counts in neither normalisation
    # (counted, three identical tasks and a copy of the base gave relative 4/9 and relative_fro 0.59, not 1)
    fs = [f for f, k in zip(fs, ranks) if k > 0]
    n = len(fs)
    if n < 2:  # nothing to interfere with: undefined, not "no interference" (TSVInterference)
        return TSVInterference(None, None, None, ranks)
    dev = fs[0].U.device
    U = torch.cat([f.U.to(dev) for f in fs], dim=1)  # (out, K): tasks side by side
    V = torch.cat([f.Vh.to(dev).mT for f in fs], dim=1)  # (in, K)
    S = torch.cat([f.S.to(dev) for f in fs])  # (K,): Σ's diagonal
    eye = torch.eye(U.shape[1], dtype=torch.float64, device=dev)
    M = ((U.mT @ U - eye) * S[None, :]) @ (V.mT @ V - eye)  # (UᵀU − I) Σ (VᵀV − I), Σ diagonal
    sti = float(M.abs().sum())
    scale = (n - 1) ** 2 * float(S.sum())
    norms = np.array([float(torch.linalg.vector_norm(f.S)) for f in fs])  # ‖Σ_r‖_F
    b = norms.sum() - norms[:, None] - norms[None, :]  # Σ_{r ∉ {s, t}} ‖Σ_r‖_F (s ≠ t)
    b[np.diag_indices(n)] = norms.sum() - norms  # Σ_{r ≠ s}
    bound = float(np.sqrt(np.sum(b**2)))
    fro = float(torch.linalg.matrix_norm(M))
    return TSVInterference(sti, sti / scale if scale > 0 else None, min(1.0, fro / bound) if bound > 0 else None, ranks)


def tsv_pair_matrix(factors: Sequence[Factored]) -> np.ndarray:
    """``R[s, t]`` = :attr:`TSVInterference.relative_fro` of the pair (s, t) alone: in [0, 1], 0 for
    orthogonal, 1 for identical updates (for n = 2 it is ``sqrt(‖A Σ_t Bᵀ‖_F² + ‖Aᵀ Σ_s B‖_F²) /
    sqrt(‖Σ_s‖_F² + ‖Σ_t‖_F²)`` with ``A = U_sᵀU_t``, ``B = V_sᵀV_t``); 0 on the diagonal by
    convention, NaN where an update has no direction (zero, or a dense one at the rounding level of its
    stored weights)."""
    fs = [as_factored64(f) for f in factors]
    n = len(fs)
    R = np.zeros((n, n))
    for s in range(n):
        for t in range(s + 1, n):
            if fs[s].S.numel() == 0 or fs[t].S.numel() == 0:
                R[s, t] = R[t, s] = np.nan
            else:
                R[s, t] = R[t, s] = singular_task_interference([fs[s], fs[t]]).relative_fro
    for s in range(n):
        if fs[s].S.numel() == 0:
            R[s, s] = np.nan
    return R


# ---- all n together: KnOTS shared basis ---------------------------------------------------------------
@dataclass(frozen=True)
class SharedBasis:
    """The KnOTS shared basis of n updates and the tasks' alignment in it (Stoica et al. 2025).

    Attributes:
        S: ``(R,)`` singular values of the concatenation ``[ΔW_1 … ΔW_n]``, descending (numerical
            rank R: values above ``RANK_TOL · σ₁``).
        alignment: ``(n, n)`` float64 in [0, 1]: the linear CKA of the tasks' coordinates in the
            shared basis (see :func:`knots_basis`); 1 on the diagonal, NaN for a zero update.
        energy_rank: threshold key -> energy rank of the concatenation.
        task_energy_rank: threshold key -> the sum over tasks of each update's own energy rank.
    """

    S: np.ndarray
    alignment: np.ndarray
    energy_rank: dict[str, int]
    task_energy_rank: dict[str, int]

    @property
    def rank(self) -> int:
        """Numerical rank R of the concatenation (the number of shared basis vectors)."""
        return int(self.S.size)


def knots_basis(factors: Sequence[Factored], thresholds: Sequence[float] = (0.9,), *, floor: float = 0.0) -> SharedBasis:
    """KnOTS's shared basis (Stoica et al. 2025, "Model merging with SVD to tie the KnOTS", ICLR) and
    how aligned the tasks are in it.

    Definition (KnOTS, as its ``task_merger.py`` does it): concatenate the updates along the input
    axis and take one SVD, ``C = [ΔW_1 … ΔW_n] = U Σ [V_1ᵀ … V_nᵀ]`` (``(out, n·in)``): U and Σ are
    shared by every task and ``ΔW_t = U Σ V_tᵀ``. Task t's coordinates in the shared basis are
    ``Z_t = Σ V_tᵀ = UᵀΔW_t`` ``(R, in)``: row j says how task t uses the shared direction ``u_j``.

    Alignment of two tasks in that basis: the linear CKA (Kornblith et al. 2019, "Similarity of neural
    network representations revisited", ICML; uncentred) of their coordinates, with the input dimensions
    as samples and the R shared directions as features::

        A[s, t] = ‖Z_s Z_tᵀ‖_F² / (‖Z_s Z_sᵀ‖_F ‖Z_t Z_tᵀ‖_F)   in [0, 1]

    1 when the two tasks put the same weight on the same shared directions and inputs (``Z_s ∝ Z_t``
    up to a rotation of the inputs), 0 when they use orthogonal input spaces. Because U spans every
    ``ΔW_t``'s column space, ``Z_s Z_tᵀ = Uᵀ ΔW_s ΔW_tᵀ U`` and the value equals
    ``⟨ΔW_sᵀΔW_s, ΔW_tᵀΔW_t⟩_F / (‖ΔW_sᵀΔW_s‖_F ‖ΔW_tᵀΔW_t‖_F)``: it does not depend on the choice
    of basis vectors inside repeated singular values of C (which a per-direction comparison would),
    so it is well defined; the tests check both forms against each other.

    Computation from the factors, without forming C: with ``ΔW_t = U_t S_t Vh_t``,
    ``C = [U_1 S_1 … U_n S_n] · blockdiag(Vh_1 … Vh_n)`` and the block-diagonal factor has
    orthonormal rows, so C's U and Σ are those of the ``(out, Σk_t)`` matrix ``[U_1 S_1 … U_n S_n]``.

    Args:
        factors: one (truncated) thin SVD per task, same shape (for a LoRA update, exact).
        thresholds: energy-rank thresholds for :attr:`SharedBasis.energy_rank`.
        floor: the largest rounding floor of the tasks' dense updates (:func:`spectra.delta.pair_floor`; 0
            for exact factors): each task's subspace is resolved to about it, so two tasks of one update
            stored in float32 differ there, and directions of C at or below 2·floor are rounding, not
            shared directions (they are not counted in the rank, :attr:`SharedBasis.S`). The alignment does
            not depend on it: it is computed in the whole basis, from each task's own resolved factors.

    Returns:
        :class:`SharedBasis`.
    """
    fs = [as_factored64(f) for f in factors]
    _check_shapes(fs)
    n = len(fs)
    dev = fs[0].U.device
    blocks = [f.U.to(dev) * f.S.to(dev) for f in fs]  # U_t S_t (out, k_t)
    M = torch.cat(blocks, dim=1)
    if M.shape[1] == 0:
        keys = [threshold_key(t) for t in thresholds]
        return SharedBasis(np.zeros(0), np.full((n, n), np.nan), {k: 0 for k in keys}, {k: 0 for k in keys})
    Uc, Sc, _ = torch.linalg.svd(M, full_matrices=False)
    top = float(Sc[0])
    nonzero = Sc > RANK_TOL * top if top > 0 else torch.zeros_like(Sc, dtype=torch.bool)
    # the alignment in the whole basis (basis-free, as the closed form above: each task's resolved factors decide it);
    # cutting the basis at the coarsest task's floor nulled or shrank it for the finer tasks (a bf16 task beside
    # float32 ones: 0.0023 for 0.029)
    P = [Uc[:, nonzero].mT @ b for b in blocks]  # Z_t = P_t Vh_t, (R, k_t)
    keep = nonzero & (Sc > 2.0 * floor)  # the shared rank: directions above rounding
    Sc = Sc[keep]
    A = np.full((n, n), np.nan)
    self_norm = [float(torch.linalg.matrix_norm(p @ p.mT)) for p in P]  # ‖Z_t Z_tᵀ‖_F (Vh_t orthonormal rows)
    for s in range(n):
        for t in range(s, n):
            if self_norm[s] == 0.0 or self_norm[t] == 0.0:
                continue
            cross = P[s] @ (fs[s].Vh.to(dev) @ fs[t].Vh.to(dev).mT) @ P[t].mT  # Z_s Z_tᵀ (R, R)
            A[s, t] = A[t, s] = min(1.0, float((cross**2).sum()) / (self_norm[s] * self_norm[t]))
    S_np = Sc.cpu().numpy()
    keys = {threshold_key(t): t for t in thresholds}
    return SharedBasis(
        S=S_np, alignment=A,
        energy_rank={k: energy_rank(S_np, t) for k, t in keys.items()},
        task_energy_rank={k: sum(energy_rank(f.S.cpu().numpy(), t) for f in fs) for k, t in keys.items()},
    )


# ---- all n together: the summed update ----------------------------------------------------------------
def sum_factored(factors: Sequence[Factored]) -> Factored:
    """Exact thin SVD of ``Σ_t U_t S_t Vh_t`` from the stacked factors (:func:`spectra.engine.factored_svd`
    of ``[U_1 S_1 … U_n S_n]`` and ``[Vh_1; …; Vh_n]``), never forming the ``(out, in)`` sum."""
    fs = [as_factored64(f) for f in factors]
    out, inn = _check_shapes(fs)
    dev = fs[0].U.device
    B = torch.cat([f.U.to(dev) * f.S.to(dev) for f in fs], dim=1)
    A = torch.cat([f.Vh.to(dev) for f in fs], dim=0)
    if B.shape[1] == 0:
        return Factored(torch.zeros(out, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64),
                        torch.zeros(0, inn, dtype=torch.float64))
    return Factored(*factored_svd(B, A, 1.0))


@dataclass(frozen=True)
class Accumulation:
    """The spectrum of ``Σ_t ΔW_t`` against the spectra of the parts (task arithmetic, λ = 1).

    Attributes:
        fro_sq_ratio: ``‖Σ ΔW_t‖_F² / Σ‖ΔW_t‖_F²`` = 1 + (sum of the pairs' inner products)/(sum of
            energies): 1 for updates orthogonal as vectors, n for n identical ones, below 1 when
            they cancel.
        spectral_over_max: ``σ₁(Σ ΔW_t) / max_t σ₁(ΔW_t)``: how much the strongest direction of the
            sum outgrows the strongest single one (n for n identical updates, 1 when the tasks' top
            directions are orthogonal on both sides): the over-accumulation of shared directions.
        spectral_ratio: ``σ₁(Σ ΔW_t) / Σ_t σ₁(ΔW_t)`` in [0, 1] (triangle inequality).
        nuclear_ratio: ``‖Σ ΔW_t‖_* / Σ_t ‖ΔW_t‖_*`` in [0, 1]: 1 for updates identical up to a positive
            scale or orthogonal on both sides; lower when their directions overlap without coinciding
            or cancel (``u vᵀ + u wᵀ`` with ``v ⟂ w`` gives ``1/√2``).
        fro, spectral, nuclear: norms of the sum.
        stable_rank, effective_rank: of the sum (the definitions document).
        task_stable_rank, task_effective_rank: of each update, in input order.
        energy_rank: threshold key -> energy rank of the sum.
        task_energy_rank: threshold key -> ``[energy rank of each update]``.
        singular_values: the top singular values of the sum (as many as asked for), descending.
    """

    fro_sq_ratio: float | None
    spectral_over_max: float | None
    spectral_ratio: float | None
    nuclear_ratio: float | None
    fro: float
    spectral: float
    nuclear: float
    stable_rank: float
    effective_rank: float
    task_stable_rank: list[float]
    task_effective_rank: list[float]
    energy_rank: dict[str, int]
    task_energy_rank: dict[str, list[int]]
    singular_values: list[float]


def _at_most_1(x: float | None) -> float | None:
    """A ratio bounded by 1 in exact arithmetic, rounding above it taken back to 1 (a larger excess is kept: an error shows)."""
    return 1.0 if x is not None and 1.0 < x <= 1.0 + 1e-9 else x


def accumulation(S_sum: np.ndarray, S_tasks: Sequence[np.ndarray], *, thresholds: Sequence[float] = (0.9,),
                 keep: int = 32) -> Accumulation:
    """:class:`Accumulation` from the singular values of the sum and of each update.

    Args:
        S_sum: singular values of ``Σ_t ΔW_t`` (any length holding every non-zero value).
        S_tasks: singular values of each ``ΔW_t`` likewise.
        thresholds: energy-rank thresholds.
        keep: how many of the sum's top singular values to keep in the result.

    Ratios are None (not NaN or inf) when their denominator is zero (every update zero).

    >>> a = accumulation(np.array([2.0]), [np.array([1.0]), np.array([1.0])])   # two identical rank-1 updates
    >>> a.spectral_over_max, a.fro_sq_ratio, a.nuclear_ratio
    (2.0, 2.0, 1.0)
    """
    S = np.sort(np.asarray(S_sum, dtype=np.float64))[::-1]
    Ts = [np.sort(np.asarray(s, dtype=np.float64))[::-1] for s in S_tasks]

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    fro_sq = float(np.sum(S**2))
    spectral = float(S[0]) if S.size else 0.0
    nuclear = float(S.sum())
    tops = [float(t[0]) if t.size else 0.0 for t in Ts]
    keys = {threshold_key(t): t for t in thresholds}
    return Accumulation(
        fro_sq_ratio=ratio(fro_sq, sum(float(np.sum(t**2)) for t in Ts)),
        spectral_over_max=ratio(spectral, max(tops) if tops else 0.0),
        # at most 1 by the triangle inequality; a sum and its parts decomposed apart can pass it by rounding
        spectral_ratio=_at_most_1(ratio(spectral, sum(tops))),
        nuclear_ratio=_at_most_1(ratio(nuclear, sum(float(t.sum()) for t in Ts))),
        fro=math.sqrt(fro_sq), spectral=spectral, nuclear=nuclear,
        stable_rank=stable_rank(S), effective_rank=effective_rank(S),
        task_stable_rank=[stable_rank(t) for t in Ts], task_effective_rank=[effective_rank(t) for t in Ts],
        energy_rank={k: energy_rank(S, t) for k, t in keys.items()},
        task_energy_rank={k: [energy_rank(s, t) for s in Ts] for k, t in keys.items()},
        singular_values=[float(x) for x in S[:keep]],
    )


# ---- one update at two times: how far its subspaces turned ---------------------------------------------
@dataclass(frozen=True)
class Subspaces:
    """The top-k left ``U (out, k)`` and right ``V (in, k)`` singular subspaces of one update."""

    U: torch.Tensor
    V: torch.Tensor

    @classmethod
    def of(cls, f: Factored) -> Subspaces | None:
        """From a thin SVD (its triplets as given); None for a zero update (no subspace)."""
        if f.S.numel() == 0:
            return None
        return cls(f.U, f.Vh.mT)


def subspace_turn(before: Subspaces | None, now: Subspaces | None) -> dict[str, dict[str, float]] | None:
    """How far the subspaces turned from ``before`` to ``now``, per side (``"left"``, ``"right"``).

    With ``M = Q_beforeᵀ Q_now`` (``k × k'``): ``phi = ‖M‖_F² / min(k, k')`` (Hu et al. 2021, Eq. 4:
    1 unturned, 0 orthogonal), the principal angles ``θ_l`` with ``cos θ_l = σ_l(M)``
    (:func:`spectra.subspaces.principal_angles`: small angles from their sines, so an unturned
    subspace reads 1e-15 rad, not arccos's 1.5e-8), ``max_angle_deg`` the largest in degrees,
    ``grassmann`` = ‖θ‖₂ in radians, ``k = min(k, k')``, and both sizes ``k_before``, ``k_now`` (unequal where one
    checkpoint resolves more directions). O(d·k²) per side (products, the bases' orthonormality check and the SVD of
    a ``d × k`` residual; this runs inside training loops, where the update's own spectrum costs far more). None when
    either update is zero.
    """
    if before is None or now is None:
        return None
    out = {}
    for side, a, b in (("left", before.U, now.U), ("right", before.V, now.V)):
        M = a.to(torch.float64).mT @ b.to(device=a.device, dtype=torch.float64)
        theta = principal_angles(a, b)  # checks orthonormality at the bases' own precision (float32 ones too)
        out[side] = {"phi": min(1.0, float((M**2).sum()) / min(M.shape)), "max_angle_deg": float(np.degrees(theta.max())),
                     "grassmann": float(np.linalg.norm(theta)), "k": min(M.shape), "k_before": M.shape[0], "k_now": M.shape[1]}
    return out
