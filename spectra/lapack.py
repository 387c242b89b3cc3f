"""A top-k symmetric eigensolver that releases the GIL: LAPACK's ``dsyevr`` through scipy's Cython API.

scipy's Python LAPACK wrappers (``scipy.linalg.eigh``, ``scipy.linalg.lapack.*``) hold the GIL for
the whole call, so threads calling them run one after the other (measured in ``bench/eigensolvers.py``);
numpy's ``linalg`` releases it but has no subset solver, and a full ``eigh`` computes every vector.
``scipy.linalg.cython_lapack`` exports the same LAPACK routines as C function pointers (its
``__pyx_capi__``, the route numba uses); called through ``ctypes`` the GIL is released during the call,
so matrices solved in parallel threads use every core.

``dsyevr`` (Dhillon-Parlett MRRR) with ``RANGE='I'`` computes only the wanted eigenpairs: the
tridiagonal reduction of a full solve, then O(p·k) for the vectors and their back-transformation,
instead of all p. On the project's 2-core CPU, ``p = 576``, one thread: the top 10 pairs in 13 ms and
the top 64 in 32 ms against 43-57 ms for ``numpy.linalg.eigh`` (all 576); the results agree with it to
rounding (``tests/test_lapack.py``).

Where the Cython API cannot be reached (a scipy built without it), :func:`top_eigh_upper` falls back
to ``scipy.linalg.eigh(..., driver="evr", subset_by_index=...)``: the same routine, holding the GIL.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np
import scipy.linalg

__all__ = ["top_eigh_upper"]

_P = ctypes.c_void_p


@functools.cache
def _dsyevr() -> Callable[..., None] | None:
    """``dsyevr`` from ``scipy.linalg.cython_lapack`` as a ctypes function (GIL released), or None."""
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__["dsyevr"]
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
    # void dsyevr(char *jobz, char *range, char *uplo, int *n, double *a, int *lda, double *vl, double *vu,
    #             int *il, int *iu, double *abstol, int *m, double *w, double *z, int *ldz, int *isuppz,
    #             double *work, int *lwork, int *iwork, int *liwork, int *info): every argument by pointer
    return ctypes.CFUNCTYPE(None, *([_P] * 21))(ptr)


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
        lw, liw = c_int(lwork), c_int(liwork)
        ref = ctypes.byref
        fn(ref(jobz), ref(rng), ref(uplo), ref(n), a.ctypes.data_as(_P), ref(n), ref(zero), ref(zero), ref(il), ref(iu),
           ref(zero), ref(m), w.ctypes.data_as(_P), z.ctypes.data_as(_P), ref(n), isuppz.ctypes.data_as(_P),
           work.ctypes.data_as(_P), ref(lw), iwork.ctypes.data_as(_P), ref(liw), ref(info))

    work_q, iwork_q = np.empty(1), np.empty(1, dtype=np.intc)
    call(work_q, -1, iwork_q, -1)  # workspace query
    lwork, liwork = max(int(work_q[0]), 26 * p), max(int(iwork_q[0]), 10 * p)
    call(np.empty(lwork), lwork, np.empty(liwork, dtype=np.intc), liwork)
    if info.value != 0 or m.value != k:
        raise np.linalg.LinAlgError(f"LAPACK dsyevr failed (info = {info.value}, {m.value} of {k} eigenpairs)")
    return w[:k][::-1].copy(), z[:, ::-1].copy()
