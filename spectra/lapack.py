"""Symmetric eigensolvers that release the GIL and compute only the vectors asked for: LAPACK through
scipy's Cython API.

scipy's Python LAPACK wrappers (``scipy.linalg.eigh``, ``scipy.linalg.lapack.*``) hold the GIL for
the whole call, so threads calling them run one after the other (measured in ``bench/eigensolvers.py``);
numpy's ``linalg`` releases it but has no subset solver, and a full ``eigh`` computes every vector.
``scipy.linalg.cython_lapack`` exports the same LAPACK routines as C function pointers (its
``__pyx_capi__``, the route numba uses); called through ``ctypes`` the GIL is released during the call,
so matrices solved in parallel threads use every core.

- :func:`top_eigh_upper`: the top k eigenpairs by ``dsyevr`` (Dhillon-Parlett MRRR, ``RANGE='I'``):
  the tridiagonal reduction of a full solve, then O(p·k) for the vectors and their back-transformation.
  On the project's 2-core CPU, ``p = 576``, one thread: the top 10 pairs in 13 ms and the top 64 in
  32 ms against 43-57 ms for ``numpy.linalg.eigh`` (all 576).
- :class:`Tridiagonal`: one reduction, every eigenvalue at once, and the top-k vectors later for a k
  chosen from those eigenvalues (``spectra extract``).

Both agree with ``numpy.linalg.eigh`` to rounding (``tests/test_lapack.py``). Where the Cython API
cannot be reached (a scipy built without it), :func:`top_eigh_upper` falls back to
``scipy.linalg.eigh(..., driver="evr", subset_by_index=...)`` (the same routine, holding the GIL) and
callers of :class:`Tridiagonal` check :meth:`Tridiagonal.available` and use a full ``eigh``.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["Tridiagonal", "mrrr_is_cheaper", "top_eigh_upper"]

_P = ctypes.c_void_p


#: Arguments of each routine used here (all by pointer, Fortran convention; ``int`` is 32-bit in scipy's API).
_NARGS = {"dsyevr": 21, "dsytrd": 10, "dsterf": 4, "dstemr": 21, "dstedc": 11, "dormtr": 13}


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
    return ctypes.CFUNCTYPE(None, *([_P] * _NARGS[name]))(ptr)


def _dsyevr() -> Callable[..., None] | None:
    # void dsyevr(char *jobz, char *range, char *uplo, int *n, double *a, int *lda, double *vl, double *vu,
    #             int *il, int *iu, double *abstol, int *m, double *w, double *z, int *ldz, int *isuppz,
    #             double *work, int *lwork, int *iwork, int *liwork, int *info)
    return _routine("dsyevr")


def _ptr(x: np.ndarray) -> ctypes.c_void_p:
    return x.ctypes.data_as(_P)


def _with_workspace(call: Callable[[np.ndarray, int, np.ndarray, int], None], min_work: int, min_iwork: int = 1) -> None:
    """LAPACK's workspace query (``lwork = liwork = -1``: the sizes come back in ``work[0]``, ``iwork[0]``),
    then ``call(work, lwork, iwork, liwork)`` itself with at least the documented minimum sizes.
    A routine without ``iwork`` ignores those two arguments."""
    work_q, iwork_q = np.zeros(1), np.zeros(1, dtype=np.intc)
    call(work_q, -1, iwork_q, -1)
    lwork, liwork = max(int(work_q[0]), min_work), max(int(iwork_q[0]), min_iwork)
    call(np.empty(lwork), lwork, np.empty(liwork, dtype=np.intc), liwork)


def top_eigh_upper(G: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs of the symmetric float64 matrix whose upper triangle ``G`` holds.

    Args:
        G: ``(p, p)`` array (any float dtype, converted to float64; the strict lower triangle is ignored).
        k: pairs wanted, ``1 <= k <= p``.

    Returns:
        ``(lam (k,), vecs (p, k))`` float64: eigenvalues descending and their orthonormal eigenvectors
        (column i belongs to ``lam[i]``), as LAPACK ``dsyevr`` computes them (backward stable).

    Raises:
        ValueError: ``k`` out of range or ``G`` not square. numpy.linalg.LinAlgError: LAPACK's ``info`` != 0.
    """
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square matrix. Got shape {G.shape} instead.")
    p = G.shape[0]
    if not 1 <= k <= p:
        raise ValueError(f"k must be in [1, {p}]. Got {k} instead.")
    fn = _dsyevr()
    if fn is None:
        lam, vecs = scipy.linalg.eigh(G, lower=False, driver="evr", subset_by_index=[p - k, p - 1], check_finite=False)
        return lam[::-1].copy(), vecs[:, ::-1].copy()
    a = np.array(G, dtype=np.float64, order="F")  # destroyed by LAPACK
    w = np.empty(p)
    z = np.empty((p, k), order="F")
    isuppz = np.empty(2 * k, dtype=np.intc)
    c_int, c_double, c_char = ctypes.c_int, ctypes.c_double, ctypes.c_char
    n, il, iu, m, info = c_int(p), c_int(p - k + 1), c_int(p), c_int(0), c_int(0)
    zero = c_double(0.0)  # vl, vu (unused with RANGE='I') and abstol (0: LAPACK's default tolerance)
    jobz, rng, uplo = c_char(b"V"), c_char(b"I"), c_char(b"U")

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        ref = ctypes.byref
        fn(ref(jobz), ref(rng), ref(uplo), ref(n), _ptr(a), ref(n), ref(zero), ref(zero), ref(il), ref(iu), ref(zero), ref(m),
           _ptr(w), _ptr(z), ref(n), _ptr(isuppz), _ptr(work), ref(c_int(lwork)), _ptr(iwork), ref(c_int(liwork)), ref(info))

    _with_workspace(call, 26 * p, 10 * p)
    if info.value != 0 or m.value != k:
        raise np.linalg.LinAlgError(f"LAPACK dsyevr failed (info = {info.value}, {m.value} of {k} eigenpairs)")
    return w[:k][::-1].copy(), z[:, ::-1].copy()


def mrrr_is_cheaper(p: int, k: int) -> bool:
    """Whether k eigenvectors of a p × p tridiagonal matrix cost less by MRRR (``dstemr``, roughly
    linear in k) than all p by divide and conquer (``dstedc``, ~p^2.3 whatever k). Measured on the
    project's 2-core CPU, one thread, Gram matrices of flat and decaying spectra
    (``bench/tridiagonal_vectors.py``): MRRR is the cheaper up to k ≈ 16-30 at p = 192, 65-75 at 576,
    300-340 at 1024 and ~430 at 2048; ``k ≤ max(p/16, min(p²/4800, p/5))`` stays on the safe side of each."""
    return 16 * k <= p or (4800 * k <= p * p and 5 * k <= p)


@dataclass
class Tridiagonal:
    """A symmetric float64 matrix reduced once to tridiagonal form (LAPACK ``dsytrd``, the GIL released):
    all its eigenvalues at once (``dsterf``, O(p²)), and the eigenvectors of any top k later
    (``dstemr`` for a few, ``dstedc`` for more, as :func:`mrrr_is_cheaper` decides; then ``dormtr`` for
    those k only, 2p²k flops), so that a caller can choose k from the eigenvalues. One reduction serves
    both, where ``eigvalsh`` then a top-k ``eigh`` would reduce twice and a full ``eigh`` back-transforms
    all p vectors. At p = 576, one thread: the reduction with every eigenvalue ~18-22 ms, then the top 10
    vectors ~3 ms, the top 64 ~18 ms, against 43 ms for ``numpy.linalg.eigh``. Accuracy is that of
    ``eigvalsh`` and ``eigh`` (backward stable).

    When k is known before the eigenvalues (``spectra extract --rank``), ``of(G, values=False)`` skips
    ``dsterf`` and :meth:`top_pairs` returns the top eigenvalues the vector solver computes anyway
    (MRRR's or divide and conquer's): ~4 ms less per matrix at p = 576.

    Build with :meth:`of`. Attributes: ``lam`` all eigenvalues, descending (float64, ``(p,)``; None
    when built with ``values=False``); the rest is the factorisation (``a``: the reflectors, ``d``,
    ``e``, ``tau``).
    """

    lam: np.ndarray | None
    a: np.ndarray
    d: np.ndarray
    e: np.ndarray
    tau: np.ndarray

    @staticmethod
    def available() -> bool:
        """Whether scipy's Cython LAPACK API is reachable (else callers use a full ``eigh``)."""
        return all(_routine(n) is not None for n in ("dsytrd", "dsterf", "dstemr", "dstedc", "dormtr"))

    @classmethod
    def of(cls, G: np.ndarray, *, values: bool = True) -> Tridiagonal:
        """Reduce the symmetric matrix whose upper triangle ``G`` ``(p, p)`` holds (copied, never modified);
        with ``values`` also compute every eigenvalue (``lam``)."""
        if G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"G must be a square matrix. Got shape {G.shape} instead.")
        p = G.shape[0]
        a = np.array(G, dtype=np.float64, order="F")
        d, e, tau = np.empty(p), np.empty(max(p - 1, 1)), np.empty(max(p - 1, 1))
        n, info, uplo, ref = ctypes.c_int(p), ctypes.c_int(0), ctypes.c_char(b"U"), ctypes.byref
        sytrd = _routine("dsytrd")
        if p:
            _with_workspace(lambda work, lwork, *_: sytrd(ref(uplo), ref(n), _ptr(a), ref(n), _ptr(d), _ptr(e), _ptr(tau),
                                                          _ptr(work), ref(ctypes.c_int(lwork)), ref(info)), p)
            if info.value != 0:
                raise np.linalg.LinAlgError(f"LAPACK dsytrd failed (info = {info.value})")
        if not values:
            return cls(None, a, d, e[: max(p - 1, 0)], tau)
        lam, off = d.copy(), e[: max(p - 1, 0)].copy()
        if p:
            _routine("dsterf")(ref(n), _ptr(lam), _ptr(np.ascontiguousarray(off) if p > 1 else np.empty(1)), ref(info))
            if info.value != 0:
                raise np.linalg.LinAlgError(f"LAPACK dsterf did not converge (info = {info.value})")
        return cls(lam[::-1].copy(), a, d, e[: max(p - 1, 0)], tau)

    def top_vectors(self, k: int) -> np.ndarray:
        """Orthonormal eigenvectors ``(p, k)`` float64 of the ``k`` largest eigenvalues, column i for ``lam[i]``."""
        if not 0 <= k <= self.d.size:
            raise ValueError(f"k must be in [0, {self.d.size}]. Got {k} instead.")
        return self.top_pairs(k, k)[1]

    def top_pairs(self, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` largest eigenvalues, descending ``(n,)``, and the orthonormal eigenvectors ``(p, k)`` of
        the ``k <= n`` largest (column i for value i), both float64; the values need no ``lam``."""
        p = self.d.size
        if not 0 <= k <= n <= p:
            raise ValueError(f"need 0 <= k <= n <= {p}. Got k = {k}, n = {n} instead.")
        if n == 0:
            return np.zeros(0), np.zeros((p, 0))
        if mrrr_is_cheaper(p, n):
            w, z = self._tridiagonal_vectors(n)
        else:
            w, z = self._all_tridiagonal_vectors()
            w, z = w[p - n:], z[:, p - n:]
        z = z[:, n - k:]  # ascending: the top k are the last columns
        if k and p > 1:  # Z := Q·Z, Q the reflectors of dsytrd
            ref, c_int = ctypes.byref, ctypes.c_int
            z = np.asfortranarray(z)
            nn, kk, info = c_int(p), c_int(k), c_int(0)
            side, uplo, trans = ctypes.c_char(b"L"), ctypes.c_char(b"U"), ctypes.c_char(b"N")
            ormtr = _routine("dormtr")
            _with_workspace(lambda work, lwork, *_: ormtr(ref(side), ref(uplo), ref(trans), ref(nn), ref(kk), _ptr(self.a), ref(nn),
                                                          _ptr(self.tau), _ptr(z), ref(nn), _ptr(work), ref(c_int(lwork)), ref(info)), k)
            if info.value != 0:
                raise np.linalg.LinAlgError(f"LAPACK dormtr failed (info = {info.value})")
        return w[::-1].copy(), z[:, ::-1].copy()

    def _all_tridiagonal_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every eigenvalue ``(p,)`` and eigenvector ``(p, p)`` of the tridiagonal matrix, ascending: divide and
        conquer (``dstedc``), cheaper than MRRR vector by vector once more than about a sixteenth of them are wanted."""
        p = self.d.size
        ref, c_int = ctypes.byref, ctypes.c_int
        d, e, z = self.d.copy(), np.zeros(max(p - 1, 1)), np.empty((p, p), order="F")
        e[: p - 1] = self.e
        n, info, compz = c_int(p), c_int(0), ctypes.c_char(b"I")
        stedc = _routine("dstedc")
        _with_workspace(lambda work, lwork, iwork, liwork: stedc(ref(compz), ref(n), _ptr(d), _ptr(e), _ptr(z), ref(n), _ptr(work),
                                                                 ref(c_int(lwork)), _ptr(iwork), ref(c_int(liwork)), ref(info)),
                        1 + 4 * p + p * p, 3 + 5 * p)
        if info.value != 0:
            raise np.linalg.LinAlgError(f"LAPACK dstedc failed (info = {info.value})")
        return d, z

    def _tridiagonal_vectors(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest eigenvalues ``(k,)`` of the tridiagonal matrix and their eigenvectors ``(p, k)``, ascending: MRRR (``dstemr``)."""
        p = self.d.size
        ref, c_int = ctypes.byref, ctypes.c_int
        d, e = self.d.copy(), np.zeros(p)
        e[: p - 1] = self.e  # dstemr: e has length p (its last entry is workspace)
        w, z, isuppz = np.empty(p), np.empty((p, k), order="F"), np.empty(2 * k, dtype=np.intc)
        n, il, iu, m, nzc, info = c_int(p), c_int(p - k + 1), c_int(p), c_int(0), c_int(k), c_int(0)
        zero, tryrac = ctypes.c_double(0.0), c_int(1)  # tryrac: keep high relative accuracy where the matrix allows
        jobz, rng = ctypes.c_char(b"V"), ctypes.c_char(b"I")
        stemr = _routine("dstemr")

        def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
            stemr(ref(jobz), ref(rng), ref(n), _ptr(d), _ptr(e), ref(zero), ref(zero), ref(il), ref(iu), ref(m), _ptr(w),
                  _ptr(z), ref(n), ref(nzc), _ptr(isuppz), ref(tryrac), _ptr(work), ref(c_int(lwork)), _ptr(iwork),
                  ref(c_int(liwork)), ref(info))

        _with_workspace(call, 18 * p, 10 * p)
        if info.value != 0 or m.value != k:
            raise np.linalg.LinAlgError(f"LAPACK dstemr failed (info = {info.value}, {m.value} of {k} eigenvectors)")
        return w[:k].copy(), z
