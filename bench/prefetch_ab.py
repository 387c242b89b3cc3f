"""``spectra diff`` end to end with CUDA read-ahead depths side by side (the default ``max_batch + 8`` = 40 pairs
against the 8 before it), on the generated pair of :mod:`diff_e2e`, alternating the variants in each round.

Run: ``python bench/prefetch_ab.py [--shape llama-7b] [--device cuda] [--depths 40,8] [--rounds 1] [--save NAME]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save  # noqa: E402
from diff_e2e import _PEAK_WRAPPER, FAMILIES, family_shape, generate, warm  # noqa: E402

from spectra.io.checkpoint import open_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(FAMILIES), default="tinyllama")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depths", default="40,8", help="comma-separated --prefetch values, the first the default")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    shape = family_shape(args.shape, args.layers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spectra-ab-"))
    print(f"# read-ahead depths on {machine()}: {args.shape} in {work}", flush=True)
    t0 = time.perf_counter()
    base, tuned = generate(shape, work, torch.device(args.device) if args.device.startswith("cuda") else torch.device("cpu"))
    print(f"generated in {time.perf_counter() - t0:.1f} s", flush=True)
    files = [base / "model.safetensors", tuned / "model.safetensors"]
    warm(files)
    b, t = open_checkpoint(base), open_checkpoint(tuned)
    t0 = time.perf_counter()  # as diff_e2e's "read both checkpoints": tensor by tensor, one thread, page cache
    for name, info in t.tensors.items():
        if len(info.shape) == 2:
            b.load(name), t.load(name)
    read_s = time.perf_counter() - t0
    print(f"read both checkpoints from the page cache: {read_s:.2f} s", flush=True)
    depths = [int(d) for d in args.depths.split(",")]
    times: dict[int, list[float]] = {d: [] for d in depths}
    ranks: dict[int, list[int]] = {}
    for r in range(args.rounds):
        for d in depths:
            out = work / f"out-{d}-{r}"
            cmd = [sys.executable, "-c", _PEAK_WRAPPER, "diff", str(base), str(tuned), "--out", str(out),
                   "--device", args.device, "--prefetch", str(d)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            sec = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"spectra diff failed:\n{proc.stderr[-3000:]}")
            times[d].append(sec)
            ranks[d] = [m["energy_rank"]["0.9"] for m in json.loads((out / "results.json").read_text())["modules"]]
            print(f"--prefetch {d}: {sec:.1f} s ({sec / read_s:.2f}x the read)", flush=True)
    same = all(ranks[d] == ranks[depths[0]] for d in depths)
    rows = [[d, f"{statistics.median(times[d]):.1f}", f"{statistics.median(times[d]) / read_s:.2f}",
             " ".join(f"{t:.1f}" for t in times[d])] for d in depths]
    table = markdown_table(["--prefetch", "end to end, s (median)", "÷ read of both checkpoints", "each round, s"], rows)
    print(f"\n{table}\n\nread of both checkpoints {read_s:.2f} s; energy ranks equal across depths: {same}")
    if args.save:
        text = (f"# spectra diff with CUDA read-ahead depths: {args.shape}\n\nMachine: {machine()}\n\n"
                f"Command: `python bench/prefetch_ab.py {' '.join(sys.argv[1:])}`\n\n{table}\n\n"
                f"Read of both checkpoints from the page cache (tensor by tensor, one thread): {read_s:.2f} s. Energy ranks equal across depths: {same}.\n")
        print(f"saved {save(args.save, text, {'read_s': read_s, 'times': times, 'ranks_equal': same})}")


if __name__ == "__main__":
    main()
