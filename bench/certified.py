"""Certified float32 spectra: the constant behind the bound, how often the certificate holds, and
what it saves, measured in one run.

1. **Calibration of c₀** (``spectra.metrics.EIG_BACKWARD_C0``). For p = 64 … 1024 (2048 with ``--full``)
   and ten kinds of spectra (Gaussian; power laws σᵢ ∝ i^-α, α = 0.3, 0.6, 1, 2; rank 8 plus 1e-3
   noise; exactly rank p/4; four clusters; a linear ramp; column-scaled like an embedding), the float64
   Gram matrix is rounded to float32 and solved by scipy's ``evd``, ``evr``, ``ev`` and torch's
   ``eigvalsh``; against the float64 eigenvalues, three ratios to ``u·‖G‖_F`` (u = 2⁻²⁴) are recorded:
   the largest eigenvalue error (Weyl), the largest partial-sum error over ``√k`` (head) or ``√(p−k)``
   (tail) (Ky Fan), and the 2-norm of all errors (Hoffman–Wielandt). They grow like √p, so each is
   also given over √p: ``c₀`` must exceed all of those.
2. **The certificate on SmolLM2-135M shapes** (576², 192×576, 1536×576, 576×1536) and updates like
   a full fine-tune's (``bench/smollm.py``: noise plus rank 16), a steeper power law (α = 0.6), a
   merged rank-16 LoRA and Gaussian noise: batches of 8, ``exact_spectra`` with ``precision="float64"``
   and ``"certified"`` interleaved (medians of ``--repeats``), for ``rtol`` 1e-4 and 1e-3; how many
   matrices were certified, which checks failed, and whether every energy rank equals float64's.

Run: ``python bench/certified.py [--full] [--repeats 3] [--save NAME]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save  # noqa: E402
from smollm import update  # noqa: E402

from spectra.engine import exact_spectra  # noqa: E402
from spectra.linalg import gram_upper, trace_and_fro  # noqa: E402
from spectra.metrics import EIG_BACKWARD_C0, EPS32, spectrum_metrics  # noqa: E402

THRESHOLDS = (0.5, 0.9, 0.99)
CALIBRATION = {64: 8, 192: 4, 576: 2, 1024: 1}
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


def calibration_matrix(kind: str, p: int, rng: np.random.Generator) -> np.ndarray:
    """A float32 ``(p, 3p)`` matrix of the named kind of spectrum."""
    n = 3 * p
    if kind == "gaussian":
        return rng.standard_normal((p, n)).astype(np.float32)
    if kind == "embedding-like":
        return (rng.standard_normal((p, n)) * rng.gamma(0.5, size=(1, n))).astype(np.float32)
    if kind == "rank8+noise":
        return (rng.standard_normal((p, 8)) @ rng.standard_normal((8, n)) + 1e-3 * rng.standard_normal((p, n))).astype(np.float32)
    if kind.startswith("power"):
        s = np.arange(1, p + 1) ** -float(kind[5:])
    elif kind == "rank p/4":
        s = np.concatenate([np.linspace(2, 1, p // 4), np.zeros(p - p // 4)])
    elif kind == "clusters":
        s = np.repeat([4.0, 2.0, 1.0, 0.5], -(-p // 4))[:p]
    else:  # ramp
        s = np.linspace(1.0, 0.01, p)
    return ((orthonormal(rng, p, p) * s) @ orthonormal(rng, n, p).T).astype(np.float32)


KINDS = ["gaussian", "power0.3", "power0.6", "power1", "power2", "rank8+noise", "rank p/4", "clusters", "ramp", "embedding-like"]


def calibrate(sizes: dict[int, int]) -> tuple[list[list[object]], dict]:
    """Largest error ratios per p and solver (see the module docstring). Runs with one thread (speed
    does not matter here, and multithreaded LAPACK stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            return _calibrate(sizes)
    finally:
        torch.set_num_threads(threads)


def _calibrate(sizes: dict[int, int]) -> tuple[list[list[object]], dict]:
    rng = np.random.default_rng(0)
    worst: dict[tuple[int, str], list[float]] = {}
    count = 0
    for p, seeds in sizes.items():
        for kind in KINDS:
            for _ in range(seeds):
                G = gram_upper(calibration_matrix(kind, p, rng))
                _, fro = trace_and_fro(G)
                lam = scipy.linalg.eigvalsh(G, lower=False, driver="evd")[::-1]
                G32 = G.astype(np.float32, order="F")
                full32 = torch.from_numpy(np.triu(G32) + np.triu(G32, 1).T)
                solved = {d: scipy.linalg.eigvalsh(G32, lower=False, driver=d)[::-1] for d in ("evd", "evr", "ev")}
                solved["torch"] = torch.linalg.eigvalsh(full32).flip(0).numpy()
                unit = EPS32 * fro
                k = np.arange(1, p + 1)
                for solver, got in solved.items():
                    d = got.astype(np.float64) - lam
                    head = np.abs(np.cumsum(d)) / np.sqrt(k)
                    tail = np.abs(np.cumsum(d[::-1]))[::-1] / np.sqrt(p - k + 1)
                    ratios = [np.max(np.abs(d)) / unit, max(head.max(), tail.max()) / unit, math.sqrt(float(d @ d)) / unit]
                    w = worst.setdefault((p, solver), [0.0, 0.0, 0.0])
                    worst[(p, solver)] = [max(a, b) for a, b in zip(w, ratios, strict=True)]
                    count += 1
        print(f"  calibrated p = {p}", flush=True)
    rows = [[p, solver, f"{w[0]:.2f}", f"{w[1]:.2f}", f"{w[2]:.2f}", f"{max(w) / math.sqrt(p):.3f}"] for (p, solver), w in sorted(worst.items())]
    overall = max(max(w) / math.sqrt(p) for (p, _), w in worst.items())
    return rows, {"solves": count, "max_ratio_over_sqrt_p": overall, "c0": EIG_BACKWARD_C0, "margin": EIG_BACKWARD_C0 / overall,
                  "per_size": {f"{p}/{s}": w for (p, s), w in worst.items()}}


def update_batch(kind: str, shape: tuple[int, int], count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        if kind == "fine-tune (noise + rank 16)":
            out.append(update(0.02 * torch.randn(*shape, generator=g), g))
        elif kind == "power law α=0.6":
            p = min(shape)
            U, _ = torch.linalg.qr(torch.randn(shape[0], p, generator=g))
            V, _ = torch.linalg.qr(torch.randn(shape[1], p, generator=g))
            out.append((U * torch.arange(1, p + 1, dtype=torch.float32) ** -0.6) @ V.T)
        elif kind == "merged LoRA (rank 16)":
            out.append(torch.randn(shape[0], 16, generator=g) @ torch.randn(16, shape[1], generator=g) / 100)
        else:
            out.append(torch.randn(*shape, generator=g))
    return out


def certificate_rates(repeats: int) -> tuple[list[list[object]], list[dict]]:
    rows, data = [], []
    for kind in ("fine-tune (noise + rank 16)", "power law α=0.6", "merged LoRA (rank 16)", "gaussian"):
        for shape in SHAPES:
            mats = update_batch(kind, shape, 8, seed=zlib.crc32(f"{kind}{shape}".encode()) % 2**31)
            ref = exact_spectra(mats, precision="float64", device="cpu")
            want = [spectrum_metrics(S, shape, THRESHOLDS).energy_rank for S in ref.S]
            times: dict[str, list[float]] = {"float64": [], "certified 1e-4": [], "certified 1e-3": []}
            results = {}
            for _ in range(repeats):
                for name in times:
                    kw = {"precision": "float64"} if name == "float64" else {"precision": "certified", "rtol": float(name.split()[1])}
                    t0 = time.perf_counter()
                    results[name] = exact_spectra(mats, device="cpu", thresholds=THRESHOLDS, top_k=64, **kw)
                    times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["float64"]) / len(mats)
            for name, res in results.items():
                same = all(spectrum_metrics(S, shape, THRESHOLDS).energy_rank == w for S, w in zip(res.S, want, strict=True))
                failed = Counter(c for f in res.failed for c in f)
                sec = statistics.median(times[name]) / len(mats)
                certified = res.precision.count("float32-certified")
                rows.append([kind, f"{shape[0]}×{shape[1]}", name, f"{1000 * sec:.1f}", f"{base / sec:.2f}×",
                             f"{certified} / {len(mats)}" if name != "float64" else "–", "yes" if same else "**no**",
                             ", ".join(f"{k} {v}" for k, v in failed.most_common()) or "–"])
                data.append({"kind": kind, "shape": list(shape), "variant": name, "seconds_per_matrix": sec, "certified": certified,
                             "matrices": len(mats), "energy_ranks_equal": same, "failed": dict(failed)})
            print(f"  {kind} {shape}: " + ", ".join(f"{r[2]} {r[3]} ms ({r[5]})" for r in rows[-3:]), flush=True)
    return rows, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also p = 2048 in the calibration")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    print(f"# certified float32 on {machine()}", flush=True)
    sizes = {**CALIBRATION, **({2048: 1} if args.full else {})}
    text = f"# Certified float32 spectra\n\nMachine: {machine()}\n\nCommand: `python bench/certified.py {' '.join(sys.argv[1:])}`\n\n"
    out: dict = {}
    if not args.skip_calibration:
        crow, cal = calibrate(sizes)
        ctable = markdown_table(["p", "float32 solver", "largest eigenvalue error / (u‖G‖_F)", "largest partial-sum error / (√k·u‖G‖_F)",
                                 "‖λ̂ − λ‖₂ / (u‖G‖_F)", "largest / √p"], crow)
        print(ctable)
        summary = (f"{cal['solves']} float32 solves; the largest ratio over √p is {cal['max_ratio_over_sqrt_p']:.3f}; "
                   f"c₀ = {cal['c0']:g} is {cal['margin']:.1f}× that.")
        print(summary)
        text += f"## Calibration of c₀\n\n{summary}\n\n{ctable}\n\n"
        out["calibration"] = cal
    rrow, rates = certificate_rates(args.repeats)
    rtable = markdown_table(["update", "shape", "path", "ms / matrix (median, batch of 8)", "vs float64", "certified", "energy ranks = float64",
                             "failed checks (count)"], rrow)
    print(rtable)
    text += f"## The certificate on SmolLM2-135M shapes\n\n{rtable}\n"
    out["rates"] = rates
    if args.save:
        print(f"saved {save(args.save, text, out)}")


if __name__ == "__main__":
    main()
