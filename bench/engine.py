"""Benchmark of the spectral engine's paths against the naive per-matrix SVD loop and scipy.

For Llama-like shapes, times (medians) each path on a fine-tune-like matrix (power-law spectrum)
and reports the ratio to the naive ``torch.linalg.svd`` loop measured in the same run, plus each
path's accuracy against a float64 reference:

- naive: ``torch.linalg.svd(M)`` float32 per matrix, as extraction scripts call it (the default
  ``full_matrices=True``); the baseline of the speed-up column
- naive_thin: ``torch.linalg.svd(M, full_matrices=False)``, a stronger baseline, shown for honesty
- scipy: ``scipy.linalg.svdvals(M)`` float32 (CPU only)
- gram64 / gram32: the exact engine path (Gram + ``eigvalsh``) in float64 / float32, batched
- svdvals32: ``torch.linalg.svdvals`` float32, batched
- top64: randomized top-64 values to relative residual 1e-3 (compared with the exact path)
- approx: approximate energy ranks (bounds within 1% of p)

Run: ``python bench/engine.py`` (CPU, a few minutes); ``--full`` adds 4096² and 4096×11008;
``--device cuda``; ``--save NAME`` writes ``bench/results/NAME.md/.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save, timed  # noqa: E402

from spectra.engine import batch_singular_values  # noqa: E402
from spectra.metrics import energy_rank  # noqa: E402
from spectra.sketch import approx_energy_ranks, truncated_singular_values  # noqa: E402

SHAPES = [(1024, 1024), (1024, 2816), (2048, 2048), (2048, 5632)]
FULL = [(4096, 4096), (4096, 11008)]


def finetune_like(shape: tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
    """A ΔW-like float32 matrix: Gaussian factors around a power-law spectrum (α = 0.6)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    m, n = shape
    p = min(shape)
    s = torch.arange(1, p + 1, dtype=torch.float32) ** -0.6
    L = torch.randn(m, p, generator=g) / m**0.5
    R = torch.randn(p, n, generator=g) / n**0.5
    return ((L * s) @ R).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also 4096² and 4096×11008")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each engine path (median)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="repeats of the naive loop and scipy")
    ap.add_argument("--batch", type=int, default=4, help="matrices per batch for the batched paths")
    ap.add_argument("--shapes", default=None, help="e.g. 1024x1024,2048x5632 (overrides the list)")
    ap.add_argument("--save", default=None, help="write bench/results/SAVE.md and .json")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = SHAPES + (FULL if args.full else [])
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    print(f"# engine benchmark on {machine()}", flush=True)
    rows, data = [], []
    for shape in shapes:
        mats = torch.stack([finetune_like(shape, i, device) for i in range(args.batch)])
        M = mats[0]
        ref = np.linalg.svd(M.double().cpu().numpy(), compute_uv=False)  # float64 oracle
        ref_rank = energy_rank(ref, 0.9)
        res: dict[str, dict] = {}

        def record(name, seconds, values=None, rank=None, note=""):
            entry = {"seconds": seconds, "note": note}
            if values is not None:
                k = min(64, len(values))
                entry["max_rel_err_top64"] = float(np.max(np.abs(values[:k] - ref[:k]) / ref[:k]))
                entry["energy_rank_0.9"] = energy_rank(values, 0.9) if len(values) == len(ref) else None
            if rank is not None:
                entry["energy_rank_0.9"] = rank
            res[name] = entry
            print(f"  {shape} {name:10s} {seconds:9.4f} s  {note}", flush=True)

        t, _, out = timed(lambda: torch.linalg.svd(M), device, args.naive_repeats)
        record("naive", t, out[1].double().cpu().numpy())
        t, _, out = timed(lambda: torch.linalg.svd(M, full_matrices=False), device, args.naive_repeats)
        record("naive_thin", t, out[1].double().cpu().numpy())
        if device.type == "cpu":
            Mn = M.numpy()
            t, _, out = timed(lambda: scipy.linalg.svdvals(Mn, check_finite=False), device, args.naive_repeats)
            record("scipy", t, out.astype(np.float64))
        for name, method, dtype in (("gram64", "gram", torch.float64), ("gram32", "gram", torch.float32), ("svdvals32", "svd", torch.float32)):
            if name == "svdvals32" and device.type == "cpu" and shape[0] * shape[1] > 2048 * 2048:
                continue  # CPU svdvals of the large shapes repeats the naive loop's cost; skipped
            t, _, out = timed(lambda: batch_singular_values(mats, device=device, method=method, dtype=dtype), device, args.repeats)
            record(name, t / args.batch, out[0], note=f"batch {args.batch}, per matrix")
        g = torch.Generator(device="cpu").manual_seed(0)
        t, _, out = timed(lambda: truncated_singular_values(M, 64, tol=1e-3, generator=g), device, args.repeats)
        record("top64", t, None, note=f"iters {out.n_iter}, sketch {out.sketch}, reported max rel err {float(np.max(out.rel_error)):.1e}")
        res["top64"]["max_rel_err_top64"] = float(np.max(np.abs(out.S - ref[:64]) / ref[:64]))
        t, _, out = timed(lambda: approx_energy_ranks(M, (0.9,), rank_tol=0.01, generator=g), device, args.repeats)
        r = out.ranks[0.9]
        record("approx", t, rank=r.estimate, note=f"bounds [{r.lo}, {r.hi}] (exact {ref_rank}), sketch {out.sketch}")
        res["approx"]["bounds"] = [r.lo, r.hi]
        naive, thin = res["naive"]["seconds"], res["naive_thin"]["seconds"]
        for name, e in res.items():
            ok = e.get("energy_rank_0.9")
            rows.append([f"{shape[0]}×{shape[1]}", name, f"{e['seconds']:.4f}", f"{naive / e['seconds']:.1f}×", f"{thin / e['seconds']:.1f}×",
                         "–" if "max_rel_err_top64" not in e else f"{e['max_rel_err_top64']:.1e}",
                         "–" if ok is None else f"{ok} ({'=' if ok == ref_rank else '≠'} {ref_rank})", e["note"]])
        data.append({"shape": list(shape), "paths": res, "exact_energy_rank_0.9": ref_rank})
    header = ["shape", "path", "median s / matrix", "speed-up vs naive", "vs naive_thin", "max rel err top-64", "energy_rank[0.9] (vs float64)", "note"]
    table = markdown_table(header, rows)
    print()
    print(table)
    if args.save:
        text = f"# Engine benchmark\n\nMachine: {machine()}\n\nCommand: `python bench/engine.py {' '.join(sys.argv[1:])}`\n\n{table}\n"
        print(f"\nsaved {save(args.save, text, {'rows': data})}")


if __name__ == "__main__":
    main()
