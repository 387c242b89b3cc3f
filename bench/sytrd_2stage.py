"""LAPACK's two-stage tridiagonal reduction (``dsytrd_2stage``) against the one-stage ``dsytrd`` that
spectra's exact eigenvalue path uses (:class:`spectra.lapack.Tridiagonal`), one thread, eigenvalues only.

The two-stage reduction (dense → band by BLAS-3, then band → tridiagonal) is the usual way to speed up
``eigvalsh`` of large matrices; it is not in scipy's Cython LAPACK API, so it is called here from the
OpenBLAS that scipy ships (``scipy.libs``), with ``dsterf`` after both. Both results are checked against
``numpy.linalg.eigvalsh``. A ratio below 1 means the two-stage reduction is slower.

Run: ``python bench/sytrd_2stage.py [--repeats 5] [--save NAME]``.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save  # noqa: E402

SIZES = (192, 576, 1024, 1536, 2048)


def _openblas() -> ctypes.CDLL:
    found = glob.glob(os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs", "libscipy_openblas*.so"))
    if not found:
        raise SystemExit("scipy's bundled OpenBLAS (scipy.libs/libscipy_openblas*.so) is not here")
    return ctypes.CDLL(found[0])


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


def eigenvalues(lib: ctypes.CDLL, G: np.ndarray, two_stage: bool) -> np.ndarray:
    """Every eigenvalue of the symmetric ``G`` (ascending), by ``dsytrd`` or ``dsytrd_2stage``, then ``dsterf``."""
    ref, ci, cc = ctypes.byref, ctypes.c_int, ctypes.c_char
    p = G.shape[0]
    a = np.array(G, order="F")
    d, e, tau, info = np.empty(p), np.empty(p), np.empty(p), ci(0)
    n, uplo = ci(p), cc(b"U")
    if two_stage:
        f, hous, work = lib.scipy_dsytrd_2stage_, np.empty(1), np.empty(1)
        f(ref(cc(b"N")), ref(uplo), ref(n), _ptr(a), ref(n), _ptr(d), _ptr(e), _ptr(tau), _ptr(hous), ref(ci(-1)),
          _ptr(work), ref(ci(-1)), ref(info))
        hous, work = np.empty(int(hous[0])), np.empty(int(work[0]))
        f(ref(cc(b"N")), ref(uplo), ref(n), _ptr(a), ref(n), _ptr(d), _ptr(e), _ptr(tau), _ptr(hous), ref(ci(hous.size)),
          _ptr(work), ref(ci(work.size)), ref(info))
    else:
        f, work = lib.scipy_dsytrd_, np.empty(1)
        f(ref(uplo), ref(n), _ptr(a), ref(n), _ptr(d), _ptr(e), _ptr(tau), _ptr(work), ref(ci(-1)), ref(info))
        work = np.empty(int(work[0]))
        f(ref(uplo), ref(n), _ptr(a), ref(n), _ptr(d), _ptr(e), _ptr(tau), _ptr(work), ref(ci(work.size)), ref(info))
    if info.value != 0:
        raise RuntimeError(f"reduction failed (info = {info.value})")
    lib.scipy_dsterf_(ref(n), _ptr(d), _ptr(e), ref(info))
    return np.sort(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--save", default=None, help="write bench/results/NAME.md and .json")
    args = ap.parse_args()
    lib, rng, rows, data = _openblas(), np.random.default_rng(0), [], []
    with threadpool_limits(1):
        for p in SIZES:
            X = rng.standard_normal((p, p + 300))
            G = X @ X.T
            truth = np.linalg.eigvalsh(G)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):  # interleaved: load from other processes hits both alike
                for two in (False, True):
                    t = time.perf_counter()
                    lam = eigenvalues(lib, G, two)
                    times[two].append(time.perf_counter() - t)
                    err = float(np.max(np.abs(lam - truth)) / truth[-1])
                    if err > 1e-12:
                        raise SystemExit(f"p = {p}: {'two' if two else 'one'}-stage eigenvalues off by {err:.1e}")
            one, two = statistics.median(times[False]), statistics.median(times[True])
            rows.append([p, f"{1e3 * one:.2f}", f"{1e3 * two:.2f}", f"{one / two:.2f}×"])
            data.append({"p": p, "one_stage_s": times[False], "two_stage_s": times[True]})
            print(f"p = {p}: dsytrd {1e3 * one:.2f} ms, dsytrd_2stage {1e3 * two:.2f} ms, speed-up {one / two:.2f}×", flush=True)
    text = (f"# dsytrd_2stage against dsytrd, eigenvalues only, one thread\n\nMachine: {machine()}\n\n"
            f"Command: `python bench/sytrd_2stage.py --repeats {args.repeats}`; medians, Gram matrices of Gaussian p × (p + 300).\n\n"
            + markdown_table(["p", "dsytrd + dsterf ms", "dsytrd_2stage + dsterf ms", "speed-up of 2-stage"], rows))
    if args.save:
        print(f"wrote {save(args.save, text, {'rows': data})}")


if __name__ == "__main__":
    main()
