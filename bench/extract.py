"""``spectra extract`` against ``mergekit-extract-lora`` on the same checkpoint pair, in the same run.

1. Generates a real-layout ~135M pair (SmolLM2-135M's shapes: hidden 576, 30 layers, 9 heads / 3 kv
   heads, MLP 1536, vocabulary 49152, tied embeddings; random init by transformers' LlamaConfig;
   bf16 like the released model). The tuned side is the base plus, on every attention and MLP
   matrix, a fine-tune-like update with a decaying spectrum: ``σᵢ ∝ i^(−α)`` with α drawn per
   module in [0.3, 1.1] (some updates nearly low-rank, some spread out), ‖ΔW‖_F/‖W‖_F drawn in
   [0.5%, 3%], random singular vectors, stored in bf16 (its rounding is part of the update, as in
   a real bf16 checkpoint).
2. Runs whole commands, each as its own process (CLI parsing, reading, writing the adapter), in
   turn and ``--repeats`` times; reports medians and each process's own peak RSS (VmHWM, printed at
   exit by a small wrapper; not ru_maxrss, which for a child Python starts carries the parent's RSS).
   - ``mergekit-extract-lora --max-rank R`` (embeddings and head excluded, as spectra does by default);
   - ``spectra extract --rank R`` (the same uniform rank: the same work);
   - ``spectra extract --budget P`` with P the parameter count of mergekit's adapter, one-pass and
     two-pass strategies.
3. Scores every adapter from its files against the true update: energy kept
   ``1 − Σ‖ΔW − s·B·A‖²_F / Σ‖ΔW‖²_F`` (s from the adapter's config), per module and in total.

mergekit lives in its own virtual environment (it pins its own dependencies): create it with
``python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 && /tmp/mk/bin/pip install mergekit``
and pass ``--mergekit /tmp/mk/bin/mergekit-extract-lora`` (default: ``mergekit-extract-lora`` on PATH;
the comparison is skipped, with a message, when it is absent).

Run: ``python bench/extract.py [--mergekit PATH] [--rank 64] [--repeats 3] [--layers 30] [--save extract-cpu]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save  # noqa: E402

from spectra.io.adapter import open_adapter  # noqa: E402
from spectra.io.checkpoint import open_checkpoint  # noqa: E402

# Runs a console command's module in this process and prints the process's own peak RSS at exit.
_PEAK_WRAPPER = (
    "import atexit, runpy, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            print('bench-peak-rss-kb:', line.split()[1], file=sys.stderr)\n"
    "atexit.register(_peak)\n"
    "mod, prog = sys.argv[1], sys.argv[2]\n"
    "sys.argv = [prog] + sys.argv[3:]\n"
    "if mod == 'spectra_cli.main':  # the `spectra` console script itself\n"
    "    from spectra_cli.main import run\n"
    "    run()\n"
    "else:\n"
    "    runpy.run_module(mod, run_name='__main__')\n"
)

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                    rms_norm_eps=1e-5, rope_theta=100000.0)


def generate(work: Path, layers: int, seed: int = 0) -> tuple[Path, Path]:
    """Write base/ and tuned/ model folders (see the module docstring)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "base")
    sd = load_file(str(work / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    for name, w in sd.items():
        if w.ndim != 2 or "embed" in name:
            continue
        out_dim, in_dim = w.shape
        p = min(out_dim, in_dim)
        alpha = 0.3 + 0.8 * float(torch.rand((), generator=g))
        rel = 0.005 + 0.025 * float(torch.rand((), generator=g))
        U, _ = torch.linalg.qr(torch.randn(out_dim, p, generator=g))
        V, _ = torch.linalg.qr(torch.randn(in_dim, p, generator=g))
        s = torch.arange(1, p + 1, dtype=torch.float32) ** -alpha
        delta = (U * s) @ V.T
        wf = w.float()
        delta *= rel * float(torch.linalg.matrix_norm(wf)) / float(torch.linalg.matrix_norm(delta))
        sd[name] = (wf + delta).to(torch.bfloat16)
    (work / "tuned").mkdir(exist_ok=True)
    save_file(sd, str(work / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        if (work / "base" / f).is_file():
            shutil.copy(work / "base" / f, work / "tuned" / f)
    return work / "base", work / "tuned"


def run(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system, the child's own: robust when other jobs share the
    machine) and peak RSS (GB) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sec = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    kb = int(proc.stderr.rsplit("bench-peak-rss-kb:", 1)[1].split()[0])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return sec, cpu, kb * 1024 / 1e9


def kept_energy(base: Path, tuned: Path, adapter: Path) -> dict:
    """Energy of the true update each module's ``s·B·A`` keeps, from the files (float64)."""
    b, t = open_checkpoint(base), open_checkpoint(tuned)
    a = open_adapter(adapter)
    err = tot = 0.0
    per, params = [], 0
    for mod in a.modules.values():
        delta = t.load(mod.weight_name).double() - b.load(mod.weight_name).double()
        resid = float(torch.linalg.matrix_norm(delta - mod.dense_delta()) ** 2)
        energy = float(torch.linalg.matrix_norm(delta) ** 2)
        err, tot = err + resid, tot + energy
        per.append(1 - resid / energy)
        params += mod.r * (mod.shape[0] + mod.shape[1])
    per.sort()
    return {"modules": len(per), "params": params, "energy_kept": 1 - err / tot, "median_module": statistics.median(per),
            "min_module": per[0], "max_module": per[-1], "modules_at_90": sum(x >= 0.9 for x in per),
            "ranks": sorted({m.r for m in a.modules.values()})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", default=shutil.which("mergekit-extract-lora"), help="path of mergekit-extract-lora")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spectra-bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# extract on {machine()} in {work}", flush=True)
    base, tuned = (work / "base", work / "tuned") if (work / "tuned" / "model.safetensors").is_file() else generate(work, args.layers)
    spectra_cmd = [sys.executable, "-c", _PEAK_WRAPPER, "spectra_cli.main", "spectra", "extract", str(base), str(tuned),
                   "--no-plots", "--force"]
    mk_python = None
    if args.mergekit and Path(args.mergekit).is_file():
        mk_python = str(Path(args.mergekit).resolve().parent / "python")
    else:
        print(f"mergekit-extract-lora not found ({args.mergekit!r}): timing spectra alone; pass --mergekit PATH", flush=True)
    mk_out = work / "mk"
    mk_cmd = [mk_python or "", "-c", _PEAK_WRAPPER, "mergekit.scripts.extract_lora", "mergekit-extract-lora",
              "--model", str(tuned), "--base-model", str(base), "--out-path", str(mk_out), "--max-rank", str(args.rank),
              "-e", "embed_tokens", "-e", "lm_head", "--quiet"]
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    rss: dict[str, list[float]] = {}

    def record(label: str, cmd: list[str]) -> None:
        sec, c, gb = run(cmd)
        times.setdefault(label, []).append(sec)
        cpu.setdefault(label, []).append(c)
        rss.setdefault(label, []).append(gb)
        print(f"{label}: {sec:.1f} s wall, {c:.1f} s CPU, peak RSS {gb:.2f} GB", flush=True)

    commands = ([("mergekit --max-rank", mk_cmd)] if mk_python else [])
    commands.append((f"spectra --rank {args.rank}", spectra_cmd + ["--out", str(work / "sp_rank"), "--rank", str(args.rank)]))
    for rep in range(args.repeats):
        for label, cmd in list(commands):
            if label.startswith("mergekit"):
                shutil.rmtree(mk_out, ignore_errors=True)
            record(label, cmd)
            if rep == 0 and label == f"spectra --rank {args.rank}":  # now P is known: add the budget runs
                P = kept_energy(base, tuned, mk_out if mk_python else work / "sp_rank")["params"]
                for strategy in ("one-pass", "two-pass"):
                    commands.append((f"spectra --budget P ({strategy})", spectra_cmd + [
                        "--out", str(work / f"sp_budget_{strategy}"), "--budget", str(P), "--strategy", strategy]))
                for blabel, bcmd in commands[-2:]:
                    record(blabel, bcmd)
                break
    scores = {}
    if mk_python:
        scores["mergekit --max-rank"] = kept_energy(base, tuned, mk_out)
    scores[f"spectra --rank {args.rank}"] = kept_energy(base, tuned, work / "sp_rank")
    for strategy in ("one-pass", "two-pass"):
        scores[f"spectra --budget P ({strategy})"] = kept_energy(base, tuned, work / f"sp_budget_{strategy}")
    own = json.loads((work / "sp_budget_one-pass" / "extract.json").read_text())
    rows = []
    for label in times:
        s = scores.get(label, {})
        rows.append([label, f"{statistics.median(times[label]):.1f}", " ".join(f"{x:.1f}" for x in times[label]),
                     f"{statistics.median(cpu[label]):.1f}",
                     f"{statistics.median(rss[label]):.2f}", f"{s.get('params', 0):,}", f"{s.get('energy_kept', float('nan')):.4f}",
                     f"{s.get('median_module', float('nan')):.3f}", f"{s.get('min_module', float('nan')):.3f}–{s.get('max_module', float('nan')):.3f}",
                     f"{s.get('modules_at_90', '')} / {s.get('modules', '')}"])
    table = markdown_table(["command", "median wall s", "runs (wall s)", "median CPU s", "peak RSS GB", "LoRA params", "energy kept (total)",
                            "median module", "module range", "modules ≥ 90%"], rows)
    ratios = []
    sp_rank = statistics.median(times[f"spectra --rank {args.rank}"])
    if mk_python:
        mk = statistics.median(times["mergekit --max-rank"])
        mk_cpu, sp_cpu = statistics.median(cpu["mergekit --max-rank"]), statistics.median(cpu[f"spectra --rank {args.rank}"])
        ratios = [["wall: mergekit / spectra --rank (same uniform rank)", f"{mk / sp_rank:.2f}×", "target ≥ 3× faster"],
                  ["CPU time: mergekit / spectra --rank", f"{mk_cpu / sp_cpu:.2f}×", "target ≥ 3× (robust to other jobs)"],
                  ["mergekit / spectra --budget P (one-pass)", f"{mk / statistics.median(times['spectra --budget P (one-pass)']):.2f}×", ""],
                  ["peak RSS spectra --rank / mergekit", f"{statistics.median(rss[f'spectra --rank {args.rank}']) / statistics.median(rss['mergekit --max-rank']):.2f}", "target ≤ 1"],
                  ["energy kept: spectra --budget P − mergekit", f"{scores['spectra --budget P (one-pass)']['energy_kept'] - scores['mergekit --max-rank']['energy_kept']:+.4f}", "target > 0"]]
    ratios.append(["two-pass / one-pass, wall (budget)", f"{statistics.median(times['spectra --budget P (two-pass)']) / statistics.median(times['spectra --budget P (one-pass)']):.2f}", "which strategy is faster"])
    ratios.append(["two-pass / one-pass, CPU (budget)", f"{statistics.median(cpu['spectra --budget P (two-pass)']) / statistics.median(cpu['spectra --budget P (one-pass)']):.2f}", ""])
    ratios.append(["spectra's own energy kept vs its report", f"{scores['spectra --budget P (one-pass)']['energy_kept']:.5f} vs {own['totals']['energy_kept']:.5f}",
                   "agree up to bf16 rounding of the factors"])
    ratios.append(["uniform rank at the same params (spectra's report)", f"r = {own['uniform']['rank']}: {own['uniform']['energy_kept']:.4f}", ""])
    ratios.append(["fractional bound / gap (spectra's report)", f"{own['allocation']['fractional_bound']:.5f} / {own['allocation']['gap']:.2e}", ""])
    text_table = table + "\n\n" + markdown_table(["comparison", "value", "target"], ratios)
    print("\n" + text_table)
    if args.save:
        gb = sum(f.stat().st_size for f in (base / "model.safetensors", tuned / "model.safetensors")) / 1e9
        text = (f"# spectra extract vs mergekit-extract-lora: SmolLM2-135M layout, {args.layers} layers, {gb:.2f} GB of bf16 (pair)\n\n"
                f"Machine: {machine()} (shared with other jobs: medians of {args.repeats}, commands interleaved)\n\n"
                f"Command: `python bench/extract.py {' '.join(sys.argv[1:])}`\n\n{text_table}\n")
        data = {"layers": args.layers, "rank": args.rank, "repeats": args.repeats, "times_s": times, "cpu_s": cpu, "peak_rss_gb": rss,
                "scores": scores, "spectra_report": {k: own[k] for k in ("totals", "uniform", "allocation", "serving")}}
        print(f"saved {save(args.save, text, data)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
