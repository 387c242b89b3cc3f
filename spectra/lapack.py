"""Symmetric eigensolvers that release the GIL and compute only the vectors asked for: LAPACK through
scipy's Cython API.

scipy's Python LAPACK wrappers (``scipy.linalg.eigh``, ``scipy.linalg.lapack.*``) hold the GIL for
the whole call, so threads calling them run one after the other (measured in ``bench/eigensolvers.py``);
numpy's ``linalg`` releases it but has no subset solver, and a full ``eigh`` computes every vector.
``scipy.linalg.cython_lapack`` exports the same LAPACK routines as C function pointers (its
``__pyx_capi__``, the route numba uses); called through ``ctypes`` the GIL is released during the call,
so matrices solved in parallel threads use every core.

- :class:`Tridiagonal`: one reduction to tridiagonal form (``sytrd``), every eigenvalue at once, and
  the top-k vectors later (inverse iteration ``stein`` from the eigenvalues already computed, MRRR
  ``stemr`` or divide and conquer ``stedc``, then ``ormtr`` for those k only) for a k chosen from those
  eigenvalues (``spectra extract``); in float64, or in float32 for callers that refine in float64.
- :func:`top_eigh_upper`: the top k eigenpairs, by the same steps (faster than LAPACK's ``dsyevr``,
  which does them too: see its docstring). On the project's 2-core CPU, ``p = 576``, one thread: the
  top 64 pairs in 17.5 ms against 43-57 ms for ``numpy.linalg.eigh`` (all 576).

Both agree with ``numpy.linalg.eigh`` to rounding (``tests/test_lapack.py``). Where the Cython API
cannot be reached (a scipy built without it), :func:`top_eigh_upper` falls back to
``scipy.linalg.eigh(..., driver="evr", subset_by_index=...)`` (holding the GIL) and callers of
:class:`Tridiagonal` check :meth:`Tridiagonal.available` and use a full ``eigh``.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["Tridiagonal", "mrrr_is_cheaper", "stein_is_cheaper", "top_eigh_upper"]

_P = ctypes.c_void_p


#: Arguments of each routine used here (all by pointer, Fortran convention; ``int`` is 32-bit in scipy's API).
_NARGS = {"sytrd": 10, "sterf": 4, "stemr": 21, "stedc": 11, "ormtr": 13, "stein": 13}


@functools.cache
def _routine(name: str) -> Callable[..., None] | None:
    """LAPACK ``name`` from ``scipy.linalg.cython_lapack`` as a ctypes function (GIL released), or None."""
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__[name]
        api = ctypes.pythonapi
        api.PyCapsule_GetName.restype = ctypes.c_char_p
        api.PyCapsule_GetName.argtypes = [ctypes.py_object]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        ptr = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    except (ImportError, AttributeError, KeyError, ValueError):
        return None
    if not ptr:
        return None
    return ctypes.CFUNCTYPE(None, *([_P] * _NARGS[name[1:]]))(ptr)


def _ptr(x: np.ndarray) -> ctypes.c_void_p:
    return x.ctypes.data_as(_P)


def _with_workspace(call: Callable[[np.ndarray, int, np.ndarray, int], None], min_work: int, min_iwork: int = 1,
                    dtype: type[np.floating] = np.float64) -> None:
    """LAPACK's workspace query (``lwork = liwork = -1``: the sizes come back in ``work[0]``, ``iwork[0]``),
    then ``call(work, lwork, iwork, liwork)`` itself with at least the documented minimum sizes.
    A routine without ``iwork`` ignores those two arguments; ``dtype`` is the routine's real type."""
    work_q, iwork_q = np.zeros(1, dtype=dtype), np.zeros(1, dtype=np.intc)
    call(work_q, -1, iwork_q, -1)
    lwork, liwork = max(int(work_q[0]), min_work), max(int(iwork_q[0]), min_iwork)
    call(np.empty(lwork, dtype=dtype), lwork, np.empty(liwork, dtype=np.intc), liwork)


def _prefix(dtype: np.dtype | type) -> tuple[str, type[np.floating], type[ctypes.c_double] | type[ctypes.c_float]]:
    """LAPACK's letter, numpy's type and ctypes' scalar of a real precision (float64 or float32)."""
    if np.dtype(dtype) == np.float32:
        return "s", np.float32, ctypes.c_float
    if np.dtype(dtype) == np.float64:
        return "d", np.float64, ctypes.c_double
    raise ValueError(f"dtype must be float64 or float32. Got {np.dtype(dtype)} instead.")


def top_eigh_upper(G: np.ndarray, k: int, *, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs of the symmetric float64 matrix whose upper triangle ``G`` holds.

    One reduction to tridiagonal form, then MRRR (or divide and conquer) for the k pairs and their
    back-transformation (:class:`Tridiagonal`), the GIL released throughout. Where LAPACK's ``dsyevr``
    does the same steps it asks its back-transformation for less workspace than the blocked code
    needs and for high relative accuracy the reduction has already given up: at p = 576, one thread,
    the top 64 pairs in 17.5 ms against its 21.5, the top 138 in 20.7 against 35.4 (``bench/eigensolvers.py``).

    Args:
        G: ``(p, p)`` array (any float dtype, converted to float64; the strict lower triangle is ignored).
        k: pairs wanted, ``1 <= k <= p``.
        overwrite: ``G`` may be destroyed (a Fortran-ordered float64 ``G`` is then reduced in place).

    Returns:
        ``(lam (k,), vecs (p, k))`` float64: eigenvalues descending and their orthonormal eigenvectors
        (column i belongs to ``lam[i]``), backward stable.

    Raises:
        ValueError: ``k`` out of range or ``G`` not square. numpy.linalg.LinAlgError: LAPACK's ``info`` != 0.
    """
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square matrix. Got shape {G.shape} instead.")
    p = G.shape[0]
    if not 1 <= k <= p:
        raise ValueError(f"k must be in [1, {p}]. Got {k} instead.")
    if not Tridiagonal.available():  # scipy without its Cython API: the same routines, holding the GIL
        lam, vecs = scipy.linalg.eigh(G, lower=False, driver="evr", subset_by_index=[p - k, p - 1], check_finite=False)
        return lam[::-1].copy(), vecs[:, ::-1].copy()
    return Tridiagonal.of(G, values=False, overwrite=overwrite).top_pairs(k, k)


#: ``ormtr``'s workspace for its blocked code: its block size (64 at most) per column plus the block
#: reflector's T (65 × 64). Its own workspace query asks for 32 per column only, with which the
#: back-transformation of 65 vectors at p = 576 took 2.9 ms instead of 1.1.
_ORMTR_BLOCK, _ORMTR_T = 64, 65 * 64


def mrrr_is_cheaper(p: int, k: int) -> bool:
    """Whether k eigenvectors of a p × p tridiagonal matrix cost less by MRRR (``dstemr``, roughly
    linear in k) than all p by divide and conquer (``dstedc``, ~p^2.3 whatever k). Measured on the
    project's 2-core CPU, one thread, Gram matrices of flat and decaying spectra
    (``bench/tridiagonal_vectors.py``): MRRR is the cheaper up to k ≈ 16-30 at p = 192, 65-75 at 576,
    300-340 at 1024 and ~430 at 2048; ``k ≤ max(p/16, min(p²/4800, p/5))`` stays on the safe side of each.
    In float32 the crossing is lower where the spectrum decays (divide and conquer deflates more: at
    p = 576 all vectors in 4.7 ms against 5.3 for the top 65) and the same on flat ones; the rule is kept."""
    return 16 * k <= p or (4800 * k <= p * p and 5 * k <= p)


def stein_is_cheaper(p: int, k: int) -> bool:
    """Whether k eigenvectors of a p × p tridiagonal matrix whose eigenvalues are known cost less by inverse
    iteration (``dstein``) than all p by divide and conquer. Measured as :func:`mrrr_is_cheaper` (``bench/tridiagonal_vectors.py``):
    inverse iteration is 3-4× faster than MRRR and the cheaper up to k ≈ p/2 on flat spectra, p/3-p/4 on decaying
    ones (its reorthogonalisation within clusters grows with k); ``4k ≤ p``, or MRRR's own range, stays on the safe side."""
    return 4 * k <= p or mrrr_is_cheaper(p, k)


@dataclass
class Tridiagonal:
    """A symmetric float64 (or float32) matrix reduced once to tridiagonal form (LAPACK ``dsytrd`` /
    ``ssytrd``, the GIL released): all its eigenvalues at once (``dsterf``, O(p²)), and the eigenvectors
    of any top k later (``dstein`` from those eigenvalues, or ``dstemr`` without them, for a few; ``dstedc``
    for more, as :func:`mrrr_is_cheaper` decides; then ``dormtr`` for those k only, 2p²k flops), so that a
    caller can choose k from the eigenvalues.
    One reduction serves both, where ``eigvalsh`` then a top-k ``eigh`` would reduce twice and a full
    ``eigh`` back-transforms all p vectors. At p = 576, one thread: the reduction with every eigenvalue
    ~14-20 ms, then the top 10 vectors ~1 ms, the top 64 ~4-6 ms, against 43 ms for
    ``numpy.linalg.eigh``. Accuracy is that of ``eigvalsh`` and ``eigh`` (backward stable) in the
    matrix's precision; float32 (the ``s`` routines: at p = 576 the reduction in ~0.6 of float64's time,
    MRRR in ~0.8) is for callers that refine the vectors in float64 (:func:`spectra.lowrank.refined_triplets`).

    When k is known before the eigenvalues (``spectra extract --rank``), ``of(G, values=False)`` skips
    ``dsterf`` and :meth:`top_pairs` returns the top eigenvalues the vector solver computes anyway
    (MRRR's or divide and conquer's): ~4 ms less per matrix at p = 576.

    Build with :meth:`of`. Attributes: ``lam`` all eigenvalues, descending (``(p,)`` in the matrix's
    dtype; None when built with ``values=False``); the rest is the factorisation (``a``: the reflectors,
    ``d``, ``e``, ``tau``), in that dtype too.
    """

    lam: np.ndarray | None
    a: np.ndarray
    d: np.ndarray
    e: np.ndarray
    tau: np.ndarray

    @staticmethod
    def available(dtype: type[np.floating] = np.float64) -> bool:
        """Whether scipy's Cython LAPACK API is reachable for ``dtype`` (else callers use a full ``eigh``)."""
        x = _prefix(dtype)[0]
        return all(_routine(x + n) is not None for n in ("sytrd", "sterf", "stemr", "stedc", "ormtr"))

    @property
    def _lapack(self) -> tuple[str, type[np.floating], type[ctypes.c_double] | type[ctypes.c_float]]:
        return _prefix(self.d.dtype)

    @classmethod
    def of(cls, G: np.ndarray, *, values: bool = True, dtype: type[np.floating] = np.float64,
           overwrite: bool = False) -> Tridiagonal:
        """Reduce the symmetric matrix whose upper triangle ``G`` ``(p, p)`` holds (copied into ``dtype``,
        float64 or float32); with ``values`` also compute every eigenvalue (``lam``). ``G`` is never
        modified unless ``overwrite``, which lets a Fortran-ordered ``G`` of ``dtype`` hold the reduction
        itself (saves a p × p copy: ~1 ms at p = 576 in float64)."""
        if G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"G must be a square matrix. Got shape {G.shape} instead.")
        x, real, _ = _prefix(dtype)
        p = G.shape[0]
        reuse = overwrite and G.dtype == real and G.flags.f_contiguous and G.flags.writeable
        a = G if reuse else np.array(G, dtype=real, order="F")
        d, e, tau = np.empty(p, dtype=real), np.empty(max(p - 1, 1), dtype=real), np.empty(max(p - 1, 1), dtype=real)
        n, info, uplo, ref = ctypes.c_int(p), ctypes.c_int(0), ctypes.c_char(b"U"), ctypes.byref
        sytrd = _routine(x + "sytrd")
        if p:
            _with_workspace(lambda work, lwork, *_: sytrd(ref(uplo), ref(n), _ptr(a), ref(n), _ptr(d), _ptr(e), _ptr(tau),
                                                          _ptr(work), ref(ctypes.c_int(lwork)), ref(info)), p, dtype=real)
            if info.value != 0:
                raise np.linalg.LinAlgError(f"LAPACK {x}sytrd failed (info = {info.value})")
        if not values:
            return cls(None, a, d, e[: max(p - 1, 0)], tau)
        lam, off = d.copy(), e[: max(p - 1, 0)].copy()
        if p:
            _routine(x + "sterf")(ref(n), _ptr(lam), _ptr(np.ascontiguousarray(off) if p > 1 else np.empty(1, dtype=real)), ref(info))
            if info.value != 0:
                raise np.linalg.LinAlgError(f"LAPACK {x}sterf did not converge (info = {info.value})")
        return cls(lam[::-1].copy(), a, d, e[: max(p - 1, 0)], tau)

    def top_vectors(self, k: int) -> np.ndarray:
        """Orthonormal eigenvectors ``(p, k)`` of the ``k`` largest eigenvalues, column i for ``lam[i]``."""
        if not 0 <= k <= self.d.size:
            raise ValueError(f"k must be in [0, {self.d.size}]. Got {k} instead.")
        return self.top_pairs(k, k)[1]

    def top_pairs(self, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` largest eigenvalues, descending ``(n,)``, and the orthonormal eigenvectors ``(p, k)`` of
        the ``k <= n`` largest (column i for value i), in the matrix's dtype; the values need no ``lam``."""
        p = self.d.size
        x, real, _ = self._lapack
        if not 0 <= k <= n <= p:
            raise ValueError(f"need 0 <= k <= n <= {p}. Got k = {k}, n = {n} instead.")
        if n == 0:
            return np.zeros(0, dtype=real), np.zeros((p, 0), dtype=real)
        # with every eigenvalue known, only the k vectors are computed (inverse iteration); else MRRR or divide and
        # conquer, which find the values again (n of them: MRRR computes a vector for each)
        known = self._known_value_vectors(n, k) if stein_is_cheaper(p, k) else None
        if known is not None:
            w, z = known
        else:
            got = self._mrrr_vectors(n) if mrrr_is_cheaper(p, n) else None
            if got is not None:
                w, z = got
            else:
                w, z = self._all_tridiagonal_vectors()
                w, z = w[p - n:], z[:, p - n:]
            z = z[:, n - k:]  # ascending: the top k are the last columns
        if k and p > 1:  # Z := Q·Z, Q the reflectors of sytrd
            ref, c_int = ctypes.byref, ctypes.c_int
            z = np.asfortranarray(z)
            nn, kk, info = c_int(p), c_int(k), c_int(0)
            side, uplo, trans = ctypes.c_char(b"L"), ctypes.c_char(b"U"), ctypes.c_char(b"N")
            ormtr = _routine(x + "ormtr")
            _with_workspace(lambda work, lwork, *_: ormtr(ref(side), ref(uplo), ref(trans), ref(nn), ref(kk), _ptr(self.a), ref(nn),
                                                          _ptr(self.tau), _ptr(z), ref(nn), _ptr(work), ref(c_int(lwork)), ref(info)),
                            _ORMTR_BLOCK * k + _ORMTR_T, dtype=real)
            if info.value != 0:
                raise np.linalg.LinAlgError(f"LAPACK {x}ormtr failed (info = {info.value})")
        return w[::-1].copy(), z[:, ::-1].copy()

    def _mrrr_vectors(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`_tridiagonal_vectors`, or None when MRRR fails or returns a vector that is not finite or not of unit
        norm: asked for one eigenvalue (``il = iu``) at the top of a cluster of five or more tied values, ``dstemr``
        returned a NaN or all-zero vector with ``info = 0`` (an extract at rank 1 wrote an adapter of NaN and reported
        the optimal energy); ``sstemr`` fails outright on some tied spectra. The caller then uses divide and conquer."""
        try:
            w, z = self._tridiagonal_vectors(n)
        except np.linalg.LinAlgError:
            return None
        tol = 1e3 * float(np.finfo(z.dtype).eps)  # MRRR normalises each vector to working accuracy
        if not (np.isfinite(w).all() and np.isfinite(z).all() and np.all(np.abs(np.linalg.norm(z, axis=0) - 1.0) <= tol)):
            return None
        return w, z

    def _known_value_vectors(self, n: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The n largest eigenvalues ``(n,)`` and the eigenvectors ``(p, k)`` of the k largest, ascending, when
        :attr:`lam` is known: inverse iteration from those values (``stein``, as LAPACK's ``syevx`` does after its
        bisection), about half of MRRR's time, which spends most of its own on finding the values again
        (p = 576, one thread, with the back-transformation: 11 vectors 1.5 against 2.8 ms, 65 vectors 4.7-5.9 against
        10.6-11.8; residuals and orthogonality ~5e-15·λ₁ for both, ``bench/tridiagonal_vectors.py``). None when the
        values are not known, when the matrix splits into blocks (``stein`` would need each block's own values) or
        when a vector does not converge: the caller then uses MRRR (checked, :meth:`_mrrr_vectors`)."""
        p = self.d.size
        if self.lam is None or k == 0:
            return None
        x, real, _ = self._lapack
        d, e = self.d, self.e
        # stebz's splitting test, so that the matrix stein sees is the one block the values belong to
        if p > 1 and bool(np.any(e * e <= np.abs(d[1:] * d[:-1]) * np.finfo(real).eps ** 2 + np.finfo(real).tiny)):
            return None
        ref, c_int = ctypes.byref, ctypes.c_int
        w = np.ascontiguousarray(self.lam[:k][::-1], dtype=real)  # ascending within the one block
        e_full = np.zeros(p, dtype=real)
        e_full[: p - 1] = e
        iblock, isplit = np.ones(k, dtype=np.intc), np.zeros(p, dtype=np.intc)
        isplit[0] = p
        z, ifail, info = np.empty((p, k), dtype=real, order="F"), np.zeros(k, dtype=np.intc), c_int(0)
        _routine(x + "stein")(ref(c_int(p)), _ptr(np.ascontiguousarray(d)), _ptr(e_full), ref(c_int(k)), _ptr(w), _ptr(iblock),
                              _ptr(isplit), _ptr(z), ref(c_int(p)), _ptr(np.empty(5 * p, dtype=real)),
                              _ptr(np.empty(p, dtype=np.intc)), _ptr(ifail), ref(info))
        if info.value != 0:  # > 0: vectors that did not converge (ifail); < 0 cannot happen with these arguments
            return None
        return np.ascontiguousarray(self.lam[:n][::-1]), z

    def _all_tridiagonal_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every eigenvalue ``(p,)`` and eigenvector ``(p, p)`` of the tridiagonal matrix, ascending: divide and
        conquer (``stedc``), cheaper than MRRR vector by vector once more than about a sixteenth of them are wanted."""
        p = self.d.size
        x, real, _ = self._lapack
        ref, c_int = ctypes.byref, ctypes.c_int
        d, e, z = self.d.copy(), np.zeros(max(p - 1, 1), dtype=real), np.empty((p, p), dtype=real, order="F")
        e[: p - 1] = self.e
        n, info, compz = c_int(p), c_int(0), ctypes.c_char(b"I")
        stedc = _routine(x + "stedc")
        _with_workspace(lambda work, lwork, iwork, liwork: stedc(ref(compz), ref(n), _ptr(d), _ptr(e), _ptr(z), ref(n), _ptr(work),
                                                                 ref(c_int(lwork)), _ptr(iwork), ref(c_int(liwork)), ref(info)),
                        1 + 4 * p + p * p, 3 + 5 * p, dtype=real)
        if info.value != 0:
            raise np.linalg.LinAlgError(f"LAPACK {x}stedc failed (info = {info.value})")
        return d, z

    def _tridiagonal_vectors(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest eigenvalues ``(k,)`` of the tridiagonal matrix and their eigenvectors ``(p, k)``, ascending: MRRR (``stemr``)."""
        p = self.d.size
        x, real, c_real = self._lapack
        ref, c_int = ctypes.byref, ctypes.c_int
        d, e = self.d.copy(), np.zeros(p, dtype=real)
        e[: p - 1] = self.e  # stemr: e has length p (its last entry is workspace)
        w, z, isuppz = np.empty(p, dtype=real), np.empty((p, k), dtype=real, order="F"), np.empty(2 * k, dtype=np.intc)
        n, il, iu, m, nzc, info = c_int(p), c_int(p - k + 1), c_int(p), c_int(0), c_int(k), c_int(0)
        # tryrac = 0 (dsyevr's choice for a tolerance above 2p·eps): no attempt at high relative accuracy; the
        # reduction to tridiagonal form already rounded every eigenvalue to ~eps·‖G‖ absolute, and the
        # attempt cost ~20% of this routine at p = 576
        zero, tryrac = c_real(0.0), c_int(0)
        jobz, rng = ctypes.c_char(b"V"), ctypes.c_char(b"I")
        stemr = _routine(x + "stemr")

        def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
            stemr(ref(jobz), ref(rng), ref(n), _ptr(d), _ptr(e), ref(zero), ref(zero), ref(il), ref(iu), ref(m), _ptr(w),
                  _ptr(z), ref(n), ref(nzc), _ptr(isuppz), ref(tryrac), _ptr(work), ref(c_int(lwork)), _ptr(iwork),
                  ref(c_int(liwork)), ref(info))

        _with_workspace(call, 18 * p, 10 * p, dtype=real)
        if info.value != 0 or m.value != k:
            raise np.linalg.LinAlgError(f"LAPACK {x}stemr failed (info = {info.value}, {m.value} of {k} eigenvectors)")
        return w[:k].copy(), z
