"""End-to-end benchmark of ``spectra diff`` against the I/O floor and the naive SVD loop.

1. Generates a checkpoint pair of a Llama shape family in bf16 (TinyLlama-1.1B-shaped by default:
   22 layers, hidden 2048, MLP 5632, k/v 256, vocab 32000; ``--shape llama-7b``: 32 × 4096/11008).
   The update is fine-tune-like: a rank-64 part plus dense noise, ‖ΔW‖/‖W‖ ≈ 1%.
2. Warms the page cache, then measures the **I/O floor**: reading both checkpoints tensor by tensor
   with spectra's reader and forming ΔW in float32, with no spectral work.
3. Runs ``spectra diff`` as a user would (a subprocess: the CLI, progress bar and all outputs) and
   records its wall time, peak RSS and the engine's own time (sum of per-matrix ``seconds``).
4. Times the naive loop (``torch.linalg.svd(full_matrices=False)`` per matrix: the thin variant,
   a stronger baseline than the default full SVD) on one matrix of each shape and **extrapolates**
   it to the whole model (labelled so).

Run: ``python bench/diff_e2e.py [--shape llama-7b] [--device cuda] [--layers N] [--precisions float64,float32] [--save NAME]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save, sync, timed  # noqa: E402

from spectra.io.checkpoint import open_checkpoint  # noqa: E402
from spectra.synthetic import LlamaShape  # noqa: E402

# Runs the CLI and reports the process's own peak RSS (VmHWM). Not ru_maxrss: for a child that
# Python started by vfork+exec, ru_maxrss carries the parent's RSS from before the exec.
_PEAK_WRAPPER = (
    "import atexit, runpy, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            print('spectra-peak-rss-kb:', line.split()[1], file=sys.stderr)\n"
    "atexit.register(_peak)\n"
    "sys.argv = ['spectra'] + sys.argv[1:]\n"
    "runpy.run_module('spectra', run_name='__main__')\n"
)

FAMILIES = {
    "tinyllama": LlamaShape(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    "llama-7b": LlamaShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
}


def family_shape(family: str, layers: int | None = None) -> LlamaShape:
    """The :data:`FAMILIES` shape ``family``, with ``layers`` layers when given."""
    shape = FAMILIES[family]
    return LlamaShape(**{**shape.__dict__, "layers": layers}) if layers else shape


def generate(shape: LlamaShape, out: Path, gen_device: torch.device, seed: int = 0) -> tuple[Path, Path]:
    """Write base/ and tuned/ model folders (bf16, one safetensors file each, plus config.json)."""
    g = torch.Generator(device=gen_device).manual_seed(seed)
    base_sd, tuned_sd = {}, {}
    for name, (o, i) in shape.matrices().items():
        w = torch.randn(o, i, generator=g, device=gen_device) / i**0.5
        r = min(64, o, i)
        low = (torch.randn(o, r, generator=g, device=gen_device) @ torch.randn(r, i, generator=g, device=gen_device)) / (r * i) ** 0.5
        noise = torch.randn(o, i, generator=g, device=gen_device) / i**0.5
        delta = 0.01 * (0.8 * low + 0.2 * noise)
        base_sd[name] = w.to(torch.bfloat16).cpu()
        tuned_sd[name] = (w + delta).to(torch.bfloat16).cpu()
        del w, low, noise, delta
    for sub, sd in (("base", base_sd), ("tuned", tuned_sd)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        save_file(sd, str(out / sub / "model.safetensors"))
        (out / sub / "config.json").write_text(json.dumps(shape.config()))
        sd.clear()
    return out / "base", out / "tuned"


def warm(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 26):
                pass
    return time.perf_counter() - t0


def io_floor(base: Path, tuned: Path, device: torch.device) -> tuple[float, float, Counter]:
    """(read-only seconds, read + ΔW float32 seconds, count of matrices per shape)."""
    b, t = open_checkpoint(base), open_checkpoint(tuned)
    names = [n for n, i in t.tensors.items() if len(i.shape) == 2]
    t0 = time.perf_counter()
    for n in names:
        b.load(n), t.load(n)
    read_only = time.perf_counter() - t0
    shapes: Counter = Counter()
    t0 = time.perf_counter()
    for n in names:
        d = t.load(n).float() - b.load(n).float()
        if device.type == "cuda":
            d = d.to(device)
        shapes[tuple(d.shape)] += 1
    sync(device)
    return read_only, time.perf_counter() - t0, shapes


def read_parallel(base: Path, tuned: Path, workers: int) -> float:
    """Seconds to read every matrix of both checkpoints with ``workers`` threads (as the diff's readers do)."""
    from concurrent.futures import ThreadPoolExecutor

    b, t = open_checkpoint(base), open_checkpoint(tuned)
    names = [n for n, i in t.tensors.items() if len(i.shape) == 2]

    def read(n: str) -> None:
        b.load(n), t.load(n)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(read, names))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(FAMILIES), default="tinyllama")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default="float64", help="comma-separated: float64,float32 runs spectra diff once per precision")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir, removed)")
    ap.add_argument("--naive-repeats", type=int, default=1)
    ap.add_argument("--read-workers", default="", help="comma-separated thread counts: also time reading with that many threads")
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = family_shape(args.shape, args.layers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spectra-bench-"))
    print(f"# diff end-to-end on {machine()}: {args.shape} ({shape.layers} layers) in {work}", flush=True)
    t0 = time.perf_counter()
    base, tuned = generate(shape, work, device if device.type == "cuda" else torch.device("cpu"))
    gen_s = time.perf_counter() - t0
    files = [base / "model.safetensors", tuned / "model.safetensors"]
    gbytes = sum(f.stat().st_size for f in files) / 1e9
    print(f"generated {gbytes:.2f} GB in {gen_s:.1f} s", flush=True)
    warm(files)
    read_s, floor_s, shapes = io_floor(base, tuned, device)
    print(f"read-only {read_s:.2f} s, I/O floor (read + ΔW fp32) {floor_s:.2f} s", flush=True)
    parallel = {}
    for w in (int(x) for x in args.read_workers.split(",") if x):
        parallel[w] = read_parallel(base, tuned, w)
        print(f"read-only with {w} threads {parallel[w]:.2f} s", flush=True)

    runs = {}
    for precision in args.precisions.split(","):
        out = work / f"out-{precision}"
        cmd = [sys.executable, "-c", _PEAK_WRAPPER, "diff", str(base), str(tuned), "--out", str(out),
               "--device", args.device, "--precision", precision]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        e2e_s = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"spectra diff failed:\n{proc.stderr[-3000:]}")
        peak_rss_gb = int(proc.stderr.rsplit("spectra-peak-rss-kb:", 1)[1].split()[0]) * 1024 / 1e9
        doc = json.loads((out / "results.json").read_text())
        engine_s = sum(m["seconds"] for m in doc["modules"])
        methods = Counter(m.get("method", "?") for m in doc["modules"])
        print(f"  solved by: {dict(methods)}", flush=True)
        runs[precision] = {"e2e_s": e2e_s, "engine_s": engine_s, "peak_rss_gb": peak_rss_gb, "methods": dict(methods),
                           "energy_rank_0.9": [m["energy_rank"]["0.9"] for m in doc["modules"]]}
        print(f"spectra diff --precision {precision}: {e2e_s:.1f} s (engine {engine_s:.1f} s), peak RSS {peak_rss_gb:.2f} GB", flush=True)
    if len(runs) > 1:
        ranks = [r["energy_rank_0.9"] for r in runs.values()]
        same = sum(a == b for a, b in zip(*ranks[:2]))
        print(f"energy_rank[0.9] equal in {same} of {len(ranks[0])} matrices between precisions", flush=True)

    # naive: one torch.linalg.svd per shape, extrapolated to the model
    b, t = open_checkpoint(base), open_checkpoint(tuned)
    per_shape = {}
    for name, info in t.tensors.items():
        if len(info.shape) != 2 or tuple(info.shape) in per_shape:
            continue
        d = (t.load(name).float() - b.load(name).float()).to(device)
        sec, _, _ = timed(lambda: torch.linalg.svd(d, full_matrices=False), device, args.naive_repeats)
        per_shape[tuple(info.shape)] = sec
        print(f"naive svd {tuple(info.shape)}: {sec:.2f} s", flush=True)
    naive_s = sum(per_shape[s] * c for s, c in shapes.items())

    rows = [
        ["generate checkpoints (not compared)", f"{gen_s:.1f}", ""],
        ["read both checkpoints from page cache", f"{read_s:.2f}", "measured"],
        ["I/O floor: read + ΔW in float32", f"{floor_s:.2f}", "measured"],
    ] + [[f"read both checkpoints, {w} threads", f"{sec:.2f}", "measured"] for w, sec in parallel.items()]
    ratios = []
    for precision, r in runs.items():
        rows += [[f"engine's own time, {precision} (sum over matrices)", f"{r['engine_s']:.2f}", "measured in the diff run"],
                 [f"**spectra diff end to end**, {precision} (CLI, all outputs)", f"{r['e2e_s']:.2f}", "measured"]]
        ratios += [[f"{precision}: end to end / (I/O floor + engine)", f"{r['e2e_s'] / (floor_s + r['engine_s']):.2f}", "target ≤ 1.3 (CPU)"],
                   [f"{precision}: end to end / read from page cache", f"{r['e2e_s'] / read_s:.2f}", "target ≤ 1.3 (GPU, 7B)"],
                   [f"{precision}: naive (extrapolated) / end to end", f"{naive_s / r['e2e_s']:.1f}×", "target ≥ 50× (GPU, 7B)"],
                   [f"{precision}: peak RSS of spectra diff", f"{r['peak_rss_gb']:.2f} GB", "target ≤ 2 GB (CPU, TinyLlama)"]]
    rows.append(["naive loop: torch.linalg.svd(full_matrices=False) per matrix", f"{naive_s:.1f}",
                 f"extrapolated from one matrix per shape ({len(per_shape)} shapes)"])
    table = markdown_table(["step", "seconds", "how"], rows) + "\n\n" + markdown_table(["ratio", "value", "target"], ratios)
    print("\n" + table)
    if args.save:
        text = (f"# spectra diff end to end: {args.shape}, {shape.layers} layers, {gbytes:.2f} GB of bf16\n\n"
                f"Machine: {machine()}\n\nCommand: `python bench/diff_e2e.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
        data = {"gen_s": gen_s, "read_s": read_s, "floor_s": floor_s, "read_parallel_s": parallel,
                "runs": {k: {kk: vv for kk, vv in v.items() if kk != "energy_rank_0.9"} for k, v in runs.items()},
                "naive_extrapolated_s": naive_s, "naive_per_shape_s": {"x".join(map(str, k)): v for k, v in per_shape.items()},
                "matrices": sum(shapes.values()), "gbytes": gbytes}
        print(f"saved {save(args.save, text, data)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
