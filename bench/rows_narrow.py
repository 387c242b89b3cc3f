"""Peak memory of ``spectra diff`` on a bf16 pair with one large matrix (an embedding), formed from row blocks read one
at a time (this code) against the same pair read whole (``--before REF``), both timed in one run.

1. Generates (or reuses, with ``--workdir``) ``base.safetensors`` and ``tuned.safetensors``, bf16: an embedding of
   ``--vocab`` × ``--hidden`` (default 32000 × 2048, TinyLlama's: 131 MB a side) and two ``hidden × hidden`` projections,
   the tuned side the base plus a rank-8 update (‖ΔW‖/‖W‖ ≈ 1%), rounded to bf16.
2. Runs ``spectra diff base tuned --out D --no-plots`` of each code as a user runs it (a subprocess, the CLI), interleaved,
   ``--repeats`` times, measuring the process's peak RSS and wall time with ``/usr/bin/time``.
3. Checks that both codes wrote the same numbers (every record of results.json but timings).

Run: ``python bench/rows_narrow.py [--before REF] [--workdir DIR] [--repeats 3] [--save NAME]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def generate(work: Path, vocab: int, hidden: int) -> None:
    if (work / "tuned.safetensors").is_file():
        return
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
            "model.layers.0.self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g) * 0.02,
            "model.layers.0.self_attn.o_proj.weight": torch.randn(hidden, hidden, generator=g) * 0.02}
    tuned = {}
    for name, w in base.items():
        update = torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g)
        tuned[name] = (w + update * (0.01 * float(w.norm()) / float(update.norm()))).bfloat16()
    save_file({k: v.bfloat16() for k, v in base.items()}, str(work / "base.safetensors"))
    save_file(tuned, str(work / "tuned.safetensors"))


def run(code: Path, work: Path, out: Path) -> tuple[float, float]:
    """(peak RSS MiB, wall s) of one diff by the code in ``code``."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-c", "from cli.main import run; run()", "diff",
           str(work / "base.safetensors"), str(work / "tuned.safetensors"), "--out", str(out), "--no-plots"]
    proc = subprocess.run(cmd, cwd=code, env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        sys.exit(f"{code}: diff failed:\n{proc.stderr[-3000:]}")
    kib, wall = proc.stderr.strip().splitlines()[-1].split()
    return int(kib) / 1024, float(wall)


def numbers(out: Path) -> list[dict]:
    doc = json.loads((out / "results.json").read_text())
    return [{k: v for k, v in m.items() if k not in ("seconds", "elapsed_s")} for m in doc["modules"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="4c80211", help="git ref of the code that reads a bf16 pair whole")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spectra-rows-bf16-"))
    work.mkdir(parents=True, exist_ok=True)
    generate(work, args.vocab, args.hidden)
    before = work / "before-code"
    if not before.is_dir():
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "spectra", "cli"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
    codes = {"after (row blocks)": ROOT, f"before ({args.before}, read whole)": before}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in codes}
    for i in range(args.repeats):
        for name, code in codes.items():
            runs[name].append(run(code, work, work / f"out-{i}-{'after' if code == ROOT else 'before'}"))
    same = numbers(work / "out-0-after") == numbers(work / "out-0-before")
    rows = [[name, f"{statistics.median(r[0] for r in rs):.0f}", f"{statistics.median(r[1] for r in rs):.2f}",
             ", ".join(f"{r[0]:.0f}" for r in rs)] for name, rs in runs.items()]
    table = markdown_table(["code", "peak RSS MiB (median)", "wall s (median)", "peak RSS of each run"], rows)
    peaks = [statistics.median(r[0] for r in rs) for rs in runs.values()]
    text = (f"# `spectra diff` of a bf16 pair with a {args.vocab} × {args.hidden} embedding, read by rows or whole\n\n"
            f"Machine: {machine()}\n\nCommand: `python bench/rows_narrow.py --before {args.before} --repeats {args.repeats}`\n\n"
            f"{table}\n\nPeak RSS after / before: **{peaks[0] / peaks[1]:.2f}**; every number of results.json equal: **{same}**.\n")
    print(text)
    if args.save:
        save(args.save, text, {"runs": runs, "same_numbers": same, "vocab": args.vocab, "hidden": args.hidden})
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
