"""Symmetric eigensolves of Gram matrices on a GPU: one after another, batched, or several at once on streams.

``spectra diff`` takes the eigenvalues of one ``p × p`` Gram matrix per weight matrix (p = 4096 for every
matrix of a Llama-2-7B). For each p and dtype, times per matrix (a batch of ``--batch`` random positive
semi-definite matrices, medians of ``--repeats``, the variants interleaved in each repeat):

- ``batched``: ``torch.linalg.eigvalsh`` on the ``(n, p, p)`` batch (the engine before streams);
- ``loop``: one ``torch.linalg.eigvalsh`` per matrix;
- ``streams-k``: :func:`eigvalsh_streams` with k threads, each on a CUDA stream of its own (cuSOLVER's
  lazily loaded library is initialised by ``batched`` first, on the main thread: its first use from several
  threads at once raised "lazy wrapper should be called at most once" in torch 2.11);
- ``magma``: the batch with ``torch.backends.cuda.preferred_linalg_library("magma")`` (where torch has MAGMA).

Every variant's eigenvalues are checked against ``batched`` (relative to λ₁). Also times the Gram product
of a ``(p, 2.7·p)`` matrix in float64 and float32 (the engine forms it in float64). Runs on the CPU too
(``--device cpu``: the streams are plain threads there), which is how the script itself is tested.

Run: ``python bench/gpu_eig.py [--device cuda] [--sizes 1024,2048,4096] [--batch 8] [--repeats 3] [--save NAME]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save, sync  # noqa: E402

from spectra.linalg import gram  # noqa: E402


def eigvalsh_streams(G: torch.Tensor, streams: int) -> torch.Tensor:
    """``torch.linalg.eigvalsh`` of each ``(p, p)`` matrix of ``G`` ``(n, p, p)``, ``streams`` threads at once,
    each on a CUDA stream of its own (plain threads on the CPU). Tried for the engine and not adopted
    (results/gpu-eig-h200.md: 1.02x at p = 4096 in float64); kept here to measure again."""
    n = G.shape[0]
    k = max(1, min(streams, n))
    cuda = G.device.type == "cuda"
    out = torch.empty(G.shape[:-1], dtype=G.dtype, device=G.device)
    side = [torch.cuda.Stream(G.device) if cuda else None for _ in range(k)]
    caller = torch.cuda.current_stream(G.device) if cuda else None
    for s in side:
        if s is not None:
            s.wait_stream(caller)

    def solve(i: int) -> None:
        with (torch.cuda.stream(side[i]) if cuda else contextlib.nullcontext()):
            for j in range(i, n, k):
                out[j] = torch.linalg.eigvalsh(G[j])

    with ThreadPoolExecutor(k) as pool:
        list(pool.map(solve, range(k)))
    for s in side:
        if s is not None:
            caller.wait_stream(s)
    return out


def variants(device: torch.device) -> dict:
    out = {
        "batched": lambda G: torch.linalg.eigvalsh(G),
        "loop": lambda G: torch.stack([torch.linalg.eigvalsh(g) for g in G]),
        "streams-2": lambda G: eigvalsh_streams(G, 2),
        "streams-4": lambda G: eigvalsh_streams(G, 4),
        "streams-8": lambda G: eigvalsh_streams(G, 8),
    }
    if device.type == "cuda":
        def magma(G: torch.Tensor) -> torch.Tensor:
            before = torch.backends.cuda.preferred_linalg_library()
            torch.backends.cuda.preferred_linalg_library("magma")
            try:
                return torch.linalg.eigvalsh(G)
            finally:
                torch.backends.cuda.preferred_linalg_library(before)
        out["magma"] = magma
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    rows, data = [], {}
    print(f"# eigensolves on {machine()} ({device}), batch {args.batch}, medians of {args.repeats}", flush=True)
    for p in (int(x) for x in args.sizes.split(",")):
        X = torch.randn(p, int(2.7 * p), generator=g, device=device, dtype=torch.float32)
        gram_ms = {}
        for name, dt in (("float64", torch.float64), ("float32", torch.float32)):
            gram(X, dtype=dt)
            sync(device)
            t0 = time.perf_counter()
            gram(X, dtype=dt)
            sync(device)
            gram_ms[name] = (time.perf_counter() - t0) * 1e3
        for dname in args.dtypes.split(","):
            dt = getattr(torch, dname)
            G = torch.stack([gram(torch.randn(p, p + p // 2, generator=g, device=device), dtype=dt) for _ in range(args.batch)])
            fns = variants(device)
            ref = torch.linalg.eigvalsh(G)
            times: dict[str, list[float]] = {k: [] for k in fns}
            errs: dict[str, float] = {}
            for k, fn in fns.items():  # warm-up and check
                try:
                    lam = fn(G)
                except RuntimeError as exc:  # e.g. a torch built without MAGMA
                    print(f"  {k}: unavailable ({str(exc).splitlines()[0][:100]})", flush=True)
                    times.pop(k)
                    continue
                errs[k] = float(((lam - ref).abs().max() / ref.abs().max()).item())
            for _ in range(args.repeats):
                for k in times:
                    sync(device)
                    t0 = time.perf_counter()
                    fns[k](G)
                    sync(device)
                    times[k].append((time.perf_counter() - t0) / args.batch * 1e3)
            base = statistics.median(times["batched"])
            for k, ts in times.items():
                ms = statistics.median(ts)
                rows.append([p, dname, k, f"{ms:.1f}", f"{base / ms:.2f}×", f"{errs[k]:.1e}"])
                data[f"{p}/{dname}/{k}"] = {"ms_per_matrix": ms, "all_ms": ts, "max_rel_diff": errs[k]}
                print(f"p={p} {dname} {k}: {ms:.1f} ms/matrix ({base / ms:.2f}x batched), max |Δλ|/λ1 {errs[k]:.1e}", flush=True)
            del G, ref
        rows.append([p, "gram", f"({p}, {int(2.7 * p)}) float64 / float32", f"{gram_ms['float64']:.1f} / {gram_ms['float32']:.1f}", "", ""])
        data[f"{p}/gram_ms"] = gram_ms
    table = markdown_table(["p", "dtype", "variant", "ms per matrix", "speed vs batched", "max |Δλ|/λ₁ vs batched"], rows)
    print("\n" + table)
    if args.save:
        text = (f"# Gram eigensolves on {device.type}: batched, looped, concurrent streams\n\nMachine: {machine()}\n\n"
                f"Command: `python bench/gpu_eig.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
        print(f"saved {save(args.save, text, {'batch': args.batch, 'repeats': args.repeats, 'results': data})}")


if __name__ == "__main__":
    main()
