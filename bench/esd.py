"""``spectra esd`` against ``WeightWatcher(model=...).analyze()`` (weightwatcher 0.7.7) on the same model, same run.

1. Builds a model with SmolLM2-135M's layout (hidden 576, 30 layers, 9 heads / 3 kv heads, MLP 1536,
   vocabulary 49152, tied embeddings) from a transformers ``LlamaConfig`` with random init (seed 0),
   stored in bf16 safetensors as the released model is.
2. Whole commands, alternated, ``--repeats`` times each (subprocesses: interpreter start, imports, reading,
   analysis and output files included):
   - ``spectra esd MODEL --out DIR --no-plots`` (the CLI; also once with its plots);
   - ``python -c "import torch, transformers, weightwatcher; m = AutoModelForCausalLM.from_pretrained(MODEL);
     WeightWatcher(model=m).analyze().to_csv(...)"`` (WeightWatcher needs a torch model object).
3. Whole function calls in one process (imports and model load done once): ``spectra.esd_run.esd(MODEL)``
   against ``WeightWatcher(model=m).analyze()``.
4. Rows covered (spectra's count, ``--ww-compatible``'s, WeightWatcher's) and parity of the shared rows
   (α, D, xmin, σ_α, α-hat, log α-norm: worst relative difference). A second, tiny model with a
   Llama-3-sized vocabulary (128256) shows the rows WeightWatcher's ``max_N`` leaves out (``describe()``,
   no SVD).

Numbers are medians with every run listed; the CPU is shared, so the load average is recorded too.
Run: ``python bench/esd.py [--repeats 3] [--inproc-repeats 1] [--workdir DIR] [--save esd-cpu]``;
``--inproc-only`` repeats step 3 alone (``--inproc-repeats`` alternated runs) into ``<save>-inproc``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save

PARITY = ("alpha", "D", "xmin", "sigma", "alpha_weighted", "log_alpha_norm")

# The CLI as `spectra esd` runs it; registers the command when cli/main.py does not list it yet.
SPECTRA_CMD = (
    "import sys\n"
    "from spectra_cli.main import main\n"
    "from spectra_cli.esd import esd_cmd\n"
    "main.commands.setdefault('esd', esd_cmd)\n"
    "main(['esd'] + sys.argv[1:])\n"
)
WW_CMD = (
    "import sys, logging\n"
    "import torch, transformers, weightwatcher\n"
    "logging.getLogger('weightwatcher').setLevel(logging.ERROR)\n"
    "model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
    "details = weightwatcher.WeightWatcher(model=model).analyze()\n"
    "details.to_csv(sys.argv[2])\n"
)


def build(path: Path, vocab: int = 49152, hidden: int = 576, layers: int = 30, heads: int = 9, kv: int = 3,
          intermediate: int = 1536) -> Path:
    """A random-init Llama with SmolLM2-135M's layout (default), saved in bf16 safetensors."""
    import transformers

    if (path / "config.json").is_file():
        return path
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def parity(esd_json: Path, ww_csv: Path) -> dict:
    """Worst relative difference per field over WeightWatcher's rows mapped to tensor names (a tied
    ``lm_head`` to the embedding it shares)."""
    import pandas as pd

    ours = {m["name"]: m for m in json.loads(esd_json.read_text())["matrices"]}
    worst = {k: 0.0 for k in PARITY}
    rows = pd.read_csv(ww_csv).to_dict("records")
    for row in rows:
        name = "model.embed_tokens.weight" if row["longname"] == "lm_head" else row["longname"] + ".weight"
        rec = ours[name]
        for k in PARITY:
            worst[k] = max(worst[k], abs(rec[k] - row[k]) / abs(row[k]))
    return {"ww_rows": len(rows), "spectra_rows": len(ours), "worst_rel_diff": worst}


def in_process(model: Path, repeats: int) -> dict[str, list[float]]:
    """The analysis alone, in this process (imports and the torch model already loaded), alternated."""
    import logging

    import transformers
    import weightwatcher

    from spectra.esd_run import EsdConfig, esd

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(model)
    inproc: dict[str, list[float]] = {"spectra.esd_run.esd()": [], "WeightWatcher(model).analyze()": []}
    for r in range(repeats):
        t0 = time.perf_counter()
        esd(model, config=EsdConfig(device="cpu"), plots=False)
        inproc["spectra.esd_run.esd()"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        weightwatcher.WeightWatcher(model=torch_model).analyze()
        inproc["WeightWatcher(model).analyze()"].append(time.perf_counter() - t0)
        print(f"in-process {r + 1}/{repeats}:", {k: v[-1] for k, v in inproc.items()}, flush=True)
    return inproc


def in_process_only(model: Path, repeats: int, name: str | None) -> None:
    """``--inproc-only``: the in-process comparison alone, saved as ``bench/results/<name>.{md,json}``."""
    load0 = os.getloadavg()
    inproc = in_process(model, repeats)
    load1 = os.getloadavg()
    med = {k: statistics.median(v) for k, v in inproc.items()}
    speed = med["WeightWatcher(model).analyze()"] / med["spectra.esd_run.esd()"]
    rows = [[k, f"{statistics.median(v):.1f}", ", ".join(f"{x:.1f}" for x in v)] for k, v in inproc.items()]
    text = "\n".join([
        f"# spectra esd vs WeightWatcher 0.7.7, analysis alone in one process — {machine()}; {cpu_name()}, {os.cpu_count()} cores",
        "",
        "Model: SmolLM2-135M layout, random init, bf16 (as bench/results/esd-cpu.md). Imports and the torch model loaded once; "
        f"runs alternated. Load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end (shared CPU).",
        "",
        markdown_table(["what", "median s", "runs (s)"], rows),
        "",
        f"**Speed-up, analysis alone: {speed:.1f}×**",
    ])
    print(text)
    if name is None:
        return
    print(save(name, text, {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_start": load0, "loadavg_end": load1,
                            "in_process_s": inproc, "in_process_median_s": med, "speedup_in_process": speed}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inproc-repeats", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="Keep the models here (default: a temporary folder).")
    ap.add_argument("--save", default=None, help="write bench/results/SAVE.md and .json (nothing is written without it)")
    ap.add_argument("--inproc-only", action="store_true",
                    help="Only the in-process comparison (--inproc-repeats runs), saved as <save>-inproc.")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spectra-bench-esd-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build(work / "smollm2-135m-layout")
    if args.inproc_only:
        in_process_only(model, args.inproc_repeats, args.save and args.save + "-inproc")
        return
    py = sys.executable
    load0 = os.getloadavg()
    times: dict[str, list[float]] = {"spectra esd (CLI, --no-plots)": [], "WeightWatcher analyze() (imports + load + analyze)": []}
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", flush=True)
        times["spectra esd (CLI, --no-plots)"].append(run([py, "-c", SPECTRA_CMD, str(model), "--out", str(work / "out"), "--no-plots"]))
        times["WeightWatcher analyze() (imports + load + analyze)"].append(run([py, "-c", WW_CMD, str(model), str(work / "ww.csv")]))
        print({k: v[-1] for k, v in times.items()}, flush=True)
    with_plots = run([py, "-c", SPECTRA_CMD, str(model), "--out", str(work / "out-plots")])
    ww_compat = run([py, "-c", SPECTRA_CMD, str(model), "--out", str(work / "out-ww"), "--no-plots", "--ww-compatible"])
    inproc = in_process(model, args.inproc_repeats)
    import transformers
    import weightwatcher

    from spectra.esd_run import EsdConfig, esd

    # rows WeightWatcher's max_N leaves out on a Llama-3-sized vocabulary (describe(): shapes only)
    big_vocab = build(work / "tiny-vocab128k", vocab=128256, hidden=64, layers=2, heads=4, kv=2, intermediate=172)
    desc = weightwatcher.WeightWatcher(model=transformers.AutoModelForCausalLM.from_pretrained(big_vocab)).describe()
    big = esd(big_vocab, config=EsdConfig(device="cpu"), plots=False)
    big_ww = esd(big_vocab, config=EsdConfig(device="cpu", ww_compatible=True), plots=False)
    load1 = os.getloadavg()

    med = {k: statistics.median(v) for k, v in times.items()}
    spectra_s, ww_s = med["spectra esd (CLI, --no-plots)"], med["WeightWatcher analyze() (imports + load + analyze)"]
    par = parity(work / "out" / "esd.json", work / "ww.csv")
    compat_rows = len(json.loads((work / "out-ww" / "esd.json").read_text())["matrices"])
    inmed = {k: statistics.median(v) for k, v in inproc.items()}
    data = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_start": load0, "loadavg_end": load1,
        "model": "SmolLM2-135M layout (hidden 576, 30 layers, 9/3 heads, MLP 1536, vocab 49152, tied), random init, bf16",
        "whole_commands_s": times, "whole_commands_median_s": med, "speedup_whole_commands": ww_s / spectra_s,
        "spectra_with_plots_s": with_plots, "spectra_ww_compatible_s": ww_compat,
        "in_process_s": inproc, "in_process_median_s": inmed,
        "speedup_in_process": inmed["WeightWatcher(model).analyze()"] / inmed["spectra.esd_run.esd()"],
        "rows": {"spectra": par["spectra_rows"], "spectra_ww_compatible": compat_rows, "weightwatcher": par["ww_rows"],
                 "note": "WeightWatcher lists the tied lm_head as a second row, the same matrix as model.embed_tokens"},
        "parity_worst_rel_diff": par["worst_rel_diff"],
        "vocab_128256_rows": {"spectra": len(big.matrices), "spectra_ww_compatible": len(big_ww.matrices),
                              "weightwatcher_describe": len(desc),
                              "skipped_by_ww_rules": [s["name"] for s in big_ww.skipped if "max_N" in s["reason"]]},
    }
    rows = [[k, f"{statistics.median(v):.1f}", ", ".join(f"{x:.1f}" for x in v)] for k, v in times.items()]
    rows.append(["spectra esd (CLI, with plots)", f"{with_plots:.1f}", f"{with_plots:.1f}"])
    rows += [[k, f"{statistics.median(v):.1f}", ", ".join(f"{x:.1f}" for x in v)] for k, v in inproc.items()]
    text = "\n".join([
        f"# spectra esd vs WeightWatcher 0.7.7 — {machine()}; {cpu_name()}, {os.cpu_count()} cores",
        "",
        f"Model: {data['model']}. Load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end (shared CPU).",
        "",
        markdown_table(["what", "median s", "runs (s)"], rows),
        "",
        (f"**Speed-up, whole commands: {ww_s / spectra_s:.1f}×** (target ≥ 5×); analysis alone in one process: "
         f"{data['speedup_in_process']:.1f}×."),
        "",
        (f"Rows: spectra {par['spectra_rows']}, spectra --ww-compatible {compat_rows}, WeightWatcher {par['ww_rows']} "
         "(its tied lm_head row is the embedding again). With a 128256-row vocabulary: spectra "
         f"{len(big.matrices)}, --ww-compatible {len(big_ww.matrices)}, WeightWatcher describe() {len(desc)} rows."),
        "",
        "Parity over WeightWatcher's rows (worst relative difference): "
        + ", ".join(f"{k} {v:.1e}" for k, v in par["worst_rel_diff"].items()),
    ])
    print(text)
    if args.save:
        print(save(args.save, text, data))


if __name__ == "__main__":
    main()
