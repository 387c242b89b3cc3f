"""``spectra compare`` against ``spectra diff`` on a real-layout ~135M pair, both timed in one run.

1. Generates (or reuses, with ``--workdir``) three folders in the SmolLM2-135M layout (hidden 576,
   30 layers, 9 heads / 3 kv heads, MLP 1536, vocab 49152, tied embeddings; 211 matrices, fp32):
   ``base/`` a random-init ``LlamaForCausalLM`` saved by transformers; ``tuned/`` the base plus a
   fine-tune-like update on every matrix (Gaussian factors around the power-law spectrum of
   :mod:`spectra.synthetic` for its module kind, ``‖ΔW‖/‖W‖ = 1%``); ``lora/`` a PEFT LoRA adapter (r = 16, alpha = 32, on
   q/k/v/o/gate/up/down: 210 modules) made on the same base, its factors drawn at random (PEFT
   initialises B = 0, an update of exactly zero) and scaled to ``‖s·B·A‖/‖W‖ = 1%``.
2. Warms the page cache, then times, interleaved so that load from other processes hits both alike,
   ``spectra diff base tuned --out D`` and ``spectra compare lora tuned --base base --out C``, each a
   subprocess as a user runs it (CLI, progress bar, JSON, CSV and plots), with the process's peak RSS.
   Medians of ``--repeats``; the ratio compare / diff is the issue's target (≤ 2).
3. With ``--old-pkgs DIR`` (a folder holding older ``spectra/`` and ``spectra_cli/`` packages, e.g.
   copies from an earlier commit), also times that implementation's compare in the same rounds and
   checks that every number of the two ``compare.json`` files agrees within the tolerances stated
   by :data:`TOLERANCES` (timings excepted).

Run: ``python bench/compare.py [--workdir DIR] [--repeats 3] [--no-plots] [--old-pkgs DIR] [--save NAME]``.
The commands inherit the environment: ``OMP_NUM_THREADS=1`` pins both to one thread (on a machine
shared with other jobs, multi-threaded LAPACK calls can run 10× slower than single-threaded ones).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

#: SmolLM2-135M's sizes (its config.json), for a random-init model of the same layout.
SMOLLM2_135M = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "bos_token_id": None, "eos_token_id": None,
                "pad_token_id": None}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Largest difference allowed between two compare.json files, per value: ("abs" | "rel", bound).
#: φ, captured energy, cosines and intruder cosines are in [0, 1]; norms are compared relatively.
TOLERANCES = {
    "phi": ("abs", 1e-6), "phi_grid": ("abs", 2e-6), "cosines": ("abs", 1e-6), "grassmann": ("abs", 1e-5),
    "captured": ("abs", 1e-6), "fro": ("rel", 1e-6), "amplification": ("rel", 1e-6), "max_cos": ("abs", 1e-5),
}

# Runs the CLI and reports the process's own peak RSS (VmHWM), as bench/diff_e2e.py does.
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


def generate(work: Path, *, seed: int = 0, rel: float = 0.01, lora_r: int = 16) -> tuple[Path, Path, Path]:
    """Write ``work/base``, ``work/tuned`` and ``work/lora`` (skipped when already there)."""
    import peft
    import transformers
    from safetensors.torch import load_file, save_file

    from spectra.synthetic import DEFAULT_ALPHA, power_law

    base, tuned, lora = work / "base", work / "tuned", work / "lora"
    if (lora / "adapter_config.json").is_file() and (tuned / "model.safetensors").is_file():
        return base, tuned, lora
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**SMOLLM2_135M)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(base, safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    sd = load_file(str(base / "model.safetensors"))
    out = {}
    for name, w in sd.items():
        if w.ndim != 2:
            out[name] = w.clone()
            continue
        module = name.split(".")[-2]
        (o, i), p = w.shape, min(w.shape)
        s = power_law(p, DEFAULT_ALPHA.get(module, 0.7)).float()
        # Gaussian factors around a power-law diagonal: a spectrum close to s, without the QRs of
        # spectra.synthetic.planted_matrix (minutes for the 49152 × 576 embedding on 2 cores)
        delta = (torch.randn(o, p, generator=g) * s) @ torch.randn(p, i, generator=g)
        delta *= rel * torch.linalg.norm(w) / torch.linalg.norm(delta)
        out[name] = (w + delta).contiguous()
    tuned.mkdir(parents=True, exist_ok=True)
    save_file(out, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", tuned / "config.json")
    del sd, out
    pm = peft.get_peft_model(model, peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=TARGETS))
    with torch.no_grad():
        for mod in pm.modules():
            if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in mod.lora_A:
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                W = mod.get_base_layer().weight
                A.copy_(torch.randn(A.shape, generator=g) / A.shape[1] ** 0.5)
                B.copy_(torch.randn(B.shape, generator=g))
                s = mod.scaling["default"]
                B.mul_(rel * torch.linalg.norm(W) / torch.linalg.norm(s * B @ A))
    pm.save_pretrained(lora)
    return base, tuned, lora


def warm(folders: list[Path]) -> None:
    for folder in folders:
        for f in folder.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 26):
                        pass


def run_cli(args: list[str], *, pkgs: str | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one ``spectra ...`` subprocess; exits on failure."""
    env = dict(os.environ)
    if pkgs:
        env["PYTHONPATH"] = pkgs + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    # from a neutral folder: `python -c` puts the working directory first on sys.path, and a
    # repository checkout there would shadow the packages of --old-pkgs
    proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *args], check=False, capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"spectra {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, int(proc.stderr.rsplit("spectra-peak-rss-kb:", 1)[1].split()[0]) / 1024


def _close(kind: str, a: float | None, b: float | None) -> float:
    """The difference of two values in the measure of :data:`TOLERANCES` (0 when both are None)."""
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    if kind == "rel":
        return abs(a - b) / max(abs(a), abs(b), 1e-300)
    return abs(a - b)


def compare_docs(ref: dict, new: dict) -> dict[str, float]:
    """Largest difference per value group between two compare.json documents (see :data:`TOLERANCES`);
    ``mismatch`` counts structural differences (module lists, intruder counts, ranks)."""
    worst = {k: 0.0 for k in TOLERANCES}
    worst["mismatch"] = 0.0

    def upd(group: str, a, b) -> None:
        worst[group] = max(worst[group], _close(TOLERANCES[group][0], a, b))

    by_name = {m["name"]: m for m in new["modules"]}
    if set(by_name) != {m["name"] for m in ref["modules"]} or ref["a_only"] != new["a_only"] or ref["b_only"] != new["b_only"]:
        worst["mismatch"] += 1
    for r in ref["modules"]:
        n = by_name.get(r["name"])
        if n is None:
            continue
        worst["mismatch"] += (r["rank_a"], r["rank_b"]) != (n["rank_a"], n["rank_b"])
        upd("fro", r["fro_a"], n["fro_a"])
        upd("fro", r["fro_b"], n["fro_b"])
        for side, ph in r["phi"].items():
            for k in ("phi_full", "phi_11", "mean", "random"):
                upd("phi", ph[k], n["phi"][side][k])
            for x, y in zip(r["angles"][side]["cosines"], n["angles"][side]["cosines"]):
                upd("cosines", x, y)
            upd("grassmann", r["angles"][side]["grassmann"], n["angles"][side]["grassmann"])
            for row_a, row_b in zip(ref["phi_grids"][r["name"]][side], new["phi_grids"][r["name"]][side]):
                for x, y in zip(row_a, row_b):
                    upd("phi_grid", x, y)
        for who, ce in r["captured"].items():
            for k in ("two_sided", "left", "right", "best_rank_r"):
                upd("captured", ce[k], n["captured"][who][k])
        for who, amp in (r.get("amplification") or {}).items():
            for k in ("delta_fro", "w_fro", "proj_delta", "factor", "proj_own", "proj_random", "proj_random_expected"):
                upd("amplification", amp[k], n["amplification"][who][k])
        for who, intr in (r.get("intruders") or {}).items():
            worst["mismatch"] += intr["counts"] != n["intruders"][who]["counts"]
            for x, y in zip(intr["max_cos"], n["intruders"][who]["max_cos"]):
                upd("max_cos", x, y)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where the three folders are (re)used; default a temp dir, removed")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each runs diff, compare (and the old compare)")
    ap.add_argument("--no-plots", action="store_true", help="pass --no-plots to both commands")
    ap.add_argument("--old-pkgs", default=None, help="folder with an older spectra/ and spectra_cli/ to time and check against")
    ap.add_argument("--old-rounds", type=int, default=1, help="rounds that also run the old compare (it is slow)")
    ap.add_argument("--save", default=None, help="write bench/results/NAME.md and .json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spectra-bench-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# compare vs diff on {machine()}, SmolLM2-135M layout, in {work}", flush=True)
    t0 = time.perf_counter()
    base, tuned, lora = generate(work)
    print(f"checkpoints ready in {time.perf_counter() - t0:.1f} s", flush=True)
    warm([base, tuned, lora])
    extra = ["--no-plots"] if args.no_plots else []
    routes = {
        "diff": (["diff", str(base), str(tuned), "--out", str(work / "out-diff"), *extra], None),
        "compare": (["compare", str(lora), str(tuned), "--base", str(base), "--out", str(work / "out-compare"), *extra], None),
    }
    if args.old_pkgs:
        routes["compare (old)"] = (["compare", str(lora), str(tuned), "--base", str(base), "--out",
                                    str(work / "out-compare-old"), *extra], str(Path(args.old_pkgs).resolve()))
    times: dict[str, list[float]] = {k: [] for k in routes}
    rss: dict[str, float] = {k: 0.0 for k in routes}
    for rnd in range(args.repeats):
        for name, (cmd, pkgs) in routes.items():
            if pkgs and rnd >= args.old_rounds:
                continue
            wall, peak = run_cli(cmd, pkgs=pkgs)
            times[name].append(wall)
            rss[name] = max(rss[name], peak)
            print(f"round {rnd + 1}: {name}: {wall:.1f} s, peak RSS {peak:.0f} MiB", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [[f"`spectra {name}`", f"{med[name]:.1f}", " ".join(f"{t:.1f}" for t in times[name]), f"{rss[name]:.0f}"]
            for name in routes]
    ratios = [["compare / diff", f"{med['compare'] / med['diff']:.2f}", "target ≤ 2"]]
    doc = json.loads((work / "out-compare" / "compare.json").read_text())
    check = None
    if args.old_pkgs:
        ratios.append(["old compare / diff", f"{med['compare (old)'] / med['diff']:.2f}", ""])
        ratios.append(["old compare / new compare", f"{med['compare (old)'] / med['compare']:.1f}×", ""])
        ref = json.loads((work / "out-compare-old" / "compare.json").read_text())
        check = compare_docs(ref, doc)
    table = (f"{len(doc['modules'])} modules compared, {len(doc['b_only'])} only in the full update\n\n"
             + markdown_table(["route", "median s", "all runs s", "peak RSS MiB"], rows) + "\n\n"
             + markdown_table(["ratio", "value", "target"], ratios))
    if check is not None:
        crow = [[k, f"{v:.1e}" if k != "mismatch" else f"{int(v)}",
                 f"{TOLERANCES[k][0]} ≤ {TOLERANCES[k][1]:.0e}" if k in TOLERANCES else "0",
                 "ok" if v <= (TOLERANCES[k][1] if k in TOLERANCES else 0) else "**over**"] for k, v in check.items()]
        table += "\n\nNew against old compare.json, largest difference per value group:\n\n" + markdown_table(
            ["values", "largest difference", "tolerance", ""], crow)
    print("\n" + table)
    if args.save:
        text = (f"# spectra compare vs spectra diff, SmolLM2-135M layout (fp32, random init)\n\nMachine: {machine()}\n\n"
                f"Command: `python bench/compare.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
        print(f"saved {save(args.save, text, {'times_s': times, 'peak_rss_mib': rss, 'check': check})}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
