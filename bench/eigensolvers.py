"""Which symmetric eigensolver, and which Gram product, to use for each matrix size on this CPU.

For the p of each SmolLM2-135M and Llama shape (p = 192, 576; 1024, 2048; 4096 with ``--full``), times
per matrix, in one run with the variants interleaved (each repeat runs every variant once, so load
from other processes hits them alike), medians of ``--repeats``:

- eigenvalues of a p × p Gram matrix: ``torch.linalg.eigvalsh``, ``numpy.linalg.eigvalsh`` (OpenBLAS
  ``syevd``; the engine's solver) and scipy's ``eigvalsh`` with driver ``evd``, ``evr`` and ``ev``,
  each in float64 and float32, and each either **serial** (one matrix at a time, every BLAS thread;
  and with one BLAS thread) or **parallel** (one matrix per worker thread, one BLAS thread each,
  ``threadpoolctl``; torch is run from two Python threads with its own threads, as it cannot pin).
  scipy's wrappers hold the GIL, so its "parallel" rows run one matrix at a time;
- eigenpairs (float64): all of them (``numpy.linalg.eigh``), and the top 64 by LAPACK ``syevr``
  through scipy's Python wrapper (``scipy.linalg.eigh(subset_by_index=...)``, GIL held) and through
  :func:`spectra.lapack.top_eigh_upper` (the same steps, GIL released), serial and parallel;
- the Gram product of an ``(p, 3p)`` float32 matrix: ``spectra.linalg.gram`` (torch, upcast then
  ``X Xᵀ``), ``spectra.linalg.gram_upper`` (numpy, ``syrk``) and scipy's ``syrk`` wrapper, float64
  and float32, serial and parallel as above.

The "best" column picks the fastest variant per size and dtype; ``spectra.engine`` uses these picks
(``EIG_DRIVERS``). Run: ``python bench/eigensolvers.py [--full] [--repeats 5] [--save NAME]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save  # noqa: E402

from spectra.lapack import top_eigh_upper  # noqa: E402
from spectra.linalg import gram, gram_upper  # noqa: E402

SIZES = {192: "SmolLM2 k/v (192×576)", 576: "SmolLM2 q/o/gate/up/down, embedding", 1024: "Llama 1024", 2048: "TinyLlama (2048)"}
FULL = {4096: "Llama-2-7B (4096)"}


def matrices(p: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` fine-tune-like float32 ``(p, 3p)`` matrices: a rank-8 part on Gaussian noise."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        X = g.standard_normal((p, 3 * p)) + 3.0 * (g.standard_normal((p, 8)) @ g.standard_normal((8, 3 * p))) / np.sqrt(8)
        out.append(X.astype(np.float32))
    return out


def run(variants: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each variant, interleaved over repeats (after one warm-up round)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def threads(fn, items, workers: int):
    """``fn`` over ``items`` in ``workers`` Python threads, every library's threads left as they are."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def one_thread(fn, items):
    """``fn`` over ``items`` one at a time with one BLAS thread."""
    with threadpool_limits(1, user_api="blas"):
        return [fn(x) for x in items]


def parallel(fn, items, workers: int):
    """``fn`` over ``items`` in ``workers`` threads with one BLAS thread each (scipy's OpenBLAS)."""
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also p = 4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default=None, help="comma-separated p values (overrides the list)")
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    sizes = {**SIZES, **(FULL if args.full else {})}
    if args.sizes:
        sizes = {int(p): sizes.get(int(p), "") for p in args.sizes.split(",")}
    workers = torch.get_num_threads()
    print(f"# eigensolvers and Gram products on {machine()}, {workers} workers", flush=True)
    rows, data = [], []
    for p, label in sizes.items():
        count = max(2 * workers, {192: 16, 576: 8, 1024: 4}.get(p, 2 * workers))
        mats = matrices(p, count)
        G64 = [gram_upper(M) for M in mats]
        G32 = [G.astype(np.float32, order="F") for G in G64]
        full64 = [torch.from_numpy(np.triu(G) + np.triu(G, 1).T) for G in G64]
        full32 = [G.float() for G in full64]
        variants: dict[str, callable] = {}
        for dt, Gs, Ts in (("float64", G64, full64), ("float32", G32, full32)):
            variants[f"eig {dt} torch serial"] = lambda Ts=Ts: [torch.linalg.eigvalsh(T) for T in Ts]
            variants[f"eig {dt} torch 2 python threads"] = lambda Ts=Ts: threads(torch.linalg.eigvalsh, Ts, workers)
            def np_one(G):
                return np.linalg.eigvalsh(G, UPLO="U")
            variants[f"eig {dt} numpy serial"] = lambda Gs=Gs: [np_one(G) for G in Gs]
            variants[f"eig {dt} numpy serial, 1 thread"] = lambda Gs=Gs: one_thread(np_one, Gs)
            variants[f"eig {dt} numpy parallel"] = lambda Gs=Gs: parallel(np_one, Gs, workers)
            for drv in ("evd", "evr", "ev"):
                def one(G, drv=drv):
                    return scipy.linalg.eigvalsh(G, lower=False, driver=drv, check_finite=False)
                variants[f"eig {dt} scipy-{drv} serial"] = lambda Gs=Gs, one=one: [one(G) for G in Gs]
                variants[f"eig {dt} scipy-{drv} serial, 1 thread"] = lambda Gs=Gs, one=one: one_thread(one, Gs)
                variants[f"eig {dt} scipy-{drv} parallel"] = lambda Gs=Gs, one=one: parallel(one, Gs, workers)
        k = min(64, p // 2)

        def evr_scipy(G, k=k):
            return scipy.linalg.eigh(G, lower=False, driver="evr", subset_by_index=[p - k, p - 1], check_finite=False)

        def evr_nogil(G, k=k):
            return top_eigh_upper(G, k)

        def eigh_all(G):
            return np.linalg.eigh(G, UPLO="U")

        for name, one in (("numpy eigh (all)", eigh_all), (f"scipy evr top-{k}", evr_scipy), (f"spectra.lapack top-{k}", evr_nogil)):
            variants[f"eigh float64 {name} serial, 1 thread"] = lambda one=one: one_thread(one, G64)
            variants[f"eigh float64 {name} parallel"] = lambda one=one: parallel(one, G64, workers)
        for dt, npdt, tdt in (("float64", np.float64, torch.float64), ("float32", np.float32, torch.float32)):
            tm = [torch.from_numpy(M) for M in mats]
            variants[f"gram {dt} torch serial"] = lambda tm=tm, tdt=tdt: [gram(M, dtype=tdt) for M in tm]
            variants[f"gram {dt} numpy serial"] = lambda npdt=npdt, mats=mats: [gram_upper(M, dtype=npdt) for M in mats]
            variants[f"gram {dt} numpy serial, 1 thread"] = lambda npdt=npdt, mats=mats: one_thread(lambda X, npdt=npdt: gram_upper(X, dtype=npdt), mats)
            variants[f"gram {dt} numpy parallel"] = lambda npdt=npdt, mats=mats: parallel(lambda X, npdt=npdt: gram_upper(X, dtype=npdt), mats, workers)

            def syrk(X, npdt=npdt):
                f = scipy.linalg.blas.dsyrk if npdt is np.float64 else scipy.linalg.blas.ssyrk
                return f(1.0, np.asarray(X, dtype=npdt))
            variants[f"gram {dt} scipy-syrk parallel"] = lambda syrk=syrk, mats=mats: parallel(syrk, mats, workers)
        med = run(variants, args.repeats)
        per = {k: v / count for k, v in med.items()}
        entry = {"p": p, "label": label, "matrices": count, "seconds_per_matrix": per}
        for kind, dt in (("eig", "float64"), ("eig", "float32"), ("eigh", "float64"), ("gram", "float64"), ("gram", "float32")):
            ref = f"{kind} {dt} torch serial" if kind != "eigh" else f"{kind} {dt} numpy eigh (all) serial, 1 thread"
            base = per[ref]
            group = {k: v for k, v in per.items() if k.startswith(f"{kind} {dt} ")}
            best = min(group, key=group.get)
            entry[f"best {kind} {dt}"] = best
            for k, v in group.items():
                rows.append([p, k, f"{1000 * v:.2f}", f"{base / v:.2f}×", "**best**" if k == best else ""])
        data.append(entry)
        print(markdown_table(["p", "variant", "ms / matrix", "speed-up", ""], [r for r in rows if r[0] == p]), flush=True)
    table = markdown_table(["p", "variant", "ms / matrix (median)",
                            "speed-up vs torch serial (eigh: vs numpy eigh, 1 thread; same dtype)", ""], rows)
    picks = markdown_table(["p", "what", "eig float64", "eig float32", "eigh float64", "gram float64", "gram float32"],
                           [[e["p"], e["label"], e["best eig float64"], e["best eig float32"], e["best eigh float64"],
                             e["best gram float64"], e["best gram float32"]] for e in data])
    print("\n" + picks)
    if args.save:
        text = (f"# Eigensolvers and Gram products per size\n\nMachine: {machine()}; {workers} workers for the parallel variants.\n\n"
                f"Command: `python bench/eigensolvers.py {' '.join(sys.argv[1:])}`\n\n## Fastest per size\n\n{picks}\n\n## All variants\n\n{table}\n")
        print(f"saved {save(args.save, text, {'sizes': data, 'workers': workers})}")


if __name__ == "__main__":
    main()
