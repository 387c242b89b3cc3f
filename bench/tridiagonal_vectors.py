"""Top-k eigenvectors of a tridiagonal matrix: MRRR (``dstemr``, k vectors) against divide and conquer
(``dstedc``, all p), the choice :func:`spectra.lapack.mrrr_is_cheaper` makes for
:meth:`spectra.lapack.Tridiagonal.top_vectors` (``spectra extract``'s factors), and inverse iteration from
eigenvalues already known (``dstein``, the route :meth:`~spectra.lapack.Tridiagonal.top_pairs` takes when every
eigenvalue was computed first: ``spectra compare``'s base weights, ``spectra extract --budget``).

For each p, the tridiagonal form of the Gram matrix of a Gaussian ``(p, 2.67p)`` matrix ("flat"
spectrum, Marchenko-Pastur) and of the same with row i scaled by ``i^-0.5`` ("decay"); one BLAS
thread (the engine solves one matrix per thread); medians of ``--repeats``. Prints, per p and
spectrum, the time of ``dstedc``, of ``dstemr`` and of ``dstein`` for each k (the vectors of the
tridiagonal matrix only, no back-transformation), the largest k at which ``dstemr`` was faster than
``dstedc``, and the largest k the rule gives it; the same for ``dstein`` (:func:`spectra.lapack.stein_is_cheaper`).

Run: ``python bench/tridiagonal_vectors.py [--sizes 192,576,1024,2048] [--repeats 3] [--save NAME]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save  # noqa: E402

from spectra.lapack import Tridiagonal, mrrr_is_cheaper, stein_is_cheaper  # noqa: E402

KS = (8, 16, 32, 64, 128, 256, 512)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="192,576,1024,2048", help="comma-separated p")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save", default=None, help="write bench/results/NAME.md and .json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows, data = [], []
    with threadpool_limits(1):
        for p in (int(s) for s in args.sizes.split(",")):
            for kind in ("flat", "decay"):
                M = rng.standard_normal((p, int(2.67 * p)))
                if kind == "decay":
                    M = (M.T / np.arange(1, p + 1) ** 0.5).T
                tri = Tridiagonal.of(M @ M.T)
                stedc = median_ms(tri._all_tridiagonal_vectors, args.repeats)
                stemr = {k: median_ms(lambda k=k: tri._tridiagonal_vectors(k), args.repeats) for k in KS if k <= p // 2}
                stein = {k: median_ms(lambda k=k: tri._known_value_vectors(k, k), args.repeats) for k in stemr}
                faster = max((k for k, t in stemr.items() if t < stedc), default=0)
                rule = max((k for k in range(1, p + 1) if mrrr_is_cheaper(p, k)), default=0)
                stein_faster = max((k for k, t in stein.items() if t < stedc), default=0)
                stein_rule = max((k for k in range(1, p + 1) if stein_is_cheaper(p, k)), default=0)
                rows.append([p, kind, f"{stedc:.1f}", " ".join(f"{k}: {t:.1f}" for k, t in stemr.items()),
                             " ".join(f"{k}: {t:.1f}" for k, t in stein.items()), faster, rule, stein_faster, stein_rule])
                data.append({"p": p, "spectrum": kind, "stedc_ms": stedc, "stemr_ms": stemr, "stein_ms": stein, "largest_k_stemr_faster": faster, "largest_k_stein_faster": stein_faster, "stein_rule_k": stein_rule,
                             "rule_k": rule})
                print(*rows[-1], flush=True)
    table = markdown_table(["p", "spectrum", "dstedc ms (all p)", "dstemr ms per k", "dstein ms per k (values known)", "largest k, dstemr faster", "rule's k", "largest k, dstein faster", "stein rule's k"], rows)
    print(table)
    if args.save:
        cmd = "python bench/tridiagonal_vectors.py " + " ".join(sys.argv[1:])
        text = (f"# Tridiagonal eigenvectors: MRRR (k) against divide and conquer (all) and inverse iteration (k, values known)\n\nMachine: {machine()}, one BLAS thread\n\n"
                f"Command: `{cmd}`\n\n{table}\n")
        print("wrote", save(args.save, text, {"machine": machine(), "rows": data}))


if __name__ == "__main__":
    main()
