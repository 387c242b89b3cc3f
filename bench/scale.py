"""Per-matrix costs measured here, and the time and memory they project for 70B and 405B models.

Measures, on this machine (``--device``): the exact path's time per matrix for a range of shapes
(float64 Gram + eigensolve, one matrix at a time), fits the cost model of :mod:`spectra.plan`
(``t = m·n·p/gram_rate + p³/eig_rate + c``) to the smaller shapes and checks it on a larger one it
was not fitted to, and the read+ΔW rate on a generated bf16 pair. It fits the same model to the H200
numbers measured by ``bench/engine.py`` and ``bench/diff_e2e.py`` (``results/engine-h200.json``,
``results/diff-e2e-llama7b-h200.json``) and checks it against that run's measured 7B end-to-end
time. From both models it projects Llama-3-70B and Llama-3.1-405B diffs on 1, 8 and 64 ranks
with the planner's own cost balancing and memory estimate. Everything projected is labelled so.

    python bench/scale.py --save scale-cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, save, timed  # noqa: E402

from spectra.engine import batch_singular_values  # noqa: E402
from spectra.plan import CostModel, balance, estimate_memory  # noqa: E402

FIT_SHAPES = [(512, 1792), (1024, 1024), (1024, 3584), (1536, 1536), (1536, 5376), (2048, 2048)]
CHECK_SHAPES = [(2048, 7168)]


def fit(rows: list[tuple[tuple[int, int], float]], device: str) -> CostModel:
    """Non-negative least squares of t = a·mnp + b·p³ + c on (shape, seconds), weighted by 1/t
    (relative error), as a :class:`CostModel`."""
    A = np.array([[m * n * min(m, n), min(m, n) ** 3, 1.0] for (m, n), _ in rows])
    t = np.array([s for _, s in rows])
    coef, _ = nnls(A / t[:, None], np.ones_like(t))
    a, b, c = coef
    return CostModel(gram_rate=1 / a if a > 0 else float("inf"), eig_rate=1 / b if b > 0 else float("inf"),
                     overhead_s=float(c), device=device)


def measure_engine(device: torch.device, repeats: int) -> list[tuple[tuple[int, int], float]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in FIT_SHAPES + CHECK_SHAPES:
        M = torch.randn(*shape, generator=g, dtype=torch.float32)
        med, _, _ = timed(lambda: batch_singular_values(M.unsqueeze(0), device=device, method="gram", dtype=torch.float64),
                          device, repeats)
        rows.append((shape, med))
        print(f"  {shape[0]}×{shape[1]}: {med:.3f} s", flush=True)
    return rows


def measure_io(device: torch.device, workdir: Path, n: int = 8, shape: tuple[int, int] = (4096, 4096)) -> tuple[float, float]:
    """Stored bytes per second of reading a bf16 tensor pair and forming ΔW (page cache warm), as
    the diff run does it; also the plain read rate."""
    from safetensors.torch import save_file

    from spectra.delta import prepare
    from spectra.io.checkpoint import open_checkpoint
    from spectra.pairing import pair_checkpoints
    from spectra.selection import plan_units

    g = torch.Generator().manual_seed(1)
    for side in ("base", "tuned"):
        tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(*shape, generator=g).to(torch.bfloat16) for i in range(n)}
        save_file(tensors, str(workdir / f"{side}.safetensors"))
    base, tuned = open_checkpoint(workdir / "base.safetensors"), open_checkpoint(workdir / "tuned.safetensors")
    tasks = plan_units(pair_checkpoints(base, tuned).pairs)
    nbytes = sum(t.pair.stored_bytes for t in tasks)

    def read_and_delta():
        for t in tasks:
            prepare(t, base, tuned, device)

    def read_only():
        for t in tasks:
            base.load(t.pair.base.name), tuned.load(t.pair.tuned.name)

    read_and_delta()  # warm the page cache
    t_full, _, _ = timed(read_and_delta, device, 3)
    t_read, _, _ = timed(read_only, device, 3)
    return nbytes / t_full, nbytes / t_read


def llama_tasks(layers: int, hidden: int, inter: int, kv: int, vocab: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """(stored bf16 bytes of both sides, [matrix shapes]) per tensor pair of a Llama-architecture
    model with fused nothing (Llama stores q, k, v, gate, up separately)."""
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden), (hidden, inter)]
    shapes = [(vocab, hidden)] + per_layer * layers + [(vocab, hidden)]
    return [(2 * 2 * m * n, [(m, n)]) for m, n in shapes]


MODELS = {
    # name: (layers, hidden, intermediate, kv dim = kv heads × head dim, vocab); from the models' config.json
    "Llama-3-70B": (80, 8192, 28672, 1024, 128256),
    "Llama-3.1-405B": (126, 16384, 53248, 1024, 128256),
}


def project(cost: CostModel, tasks, ranks: int, depth: int, batch_bytes: int, on_gpu: bool) -> dict:
    io = [cost.io_seconds(b) for b, _ in tasks]
    comp = [sum(cost.matrix_seconds(s) for s in shapes) for _, shapes in tasks]
    shares = balance([a + b for a, b in zip(io, comp)], ranks)
    slow = max(shares, key=lambda s: sum(io[i] + comp[i] for i in s))
    t_io, t_comp = sum(io[i] for i in slow), sum(comp[i] for i in slow)
    # bf16 tensors are loaded as stored; ΔW is float32; the run's own defaults on an H200 (141 GB,
    # ~139 GiB usable): 45% of free memory per batch, a quarter for reading ahead (spectra.stream.run_settings)
    host, dev = estimate_memory([(tasks[i][0], sum(4 * m * n for m, n in tasks[i][1]), tasks[i][1]) for i in slow],
                                depth=depth, batch_bytes=batch_bytes, max_batch=32, on_gpu=on_gpu,
                                max_in_flight=int(0.25 * 139e9) if on_gpu else None)
    return {"ranks": ranks, "io_s": t_io, "compute_s": t_comp, "wall_s": max(t_io, t_comp) + 0.15 * min(t_io, t_comp),
            "host_bytes": host, "device_bytes": dev, "read_bytes": sum(b for b, _ in tasks),
            "aggregate_read_GBps": ranks * cost.io_rate / 1e9}


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def h200_model() -> tuple[CostModel, dict]:
    """The cost model fitted to the H200 engine benchmark (float64 Gram path) and its read+ΔW rate
    from the 7B end-to-end run; and that run's measured vs modelled end-to-end time."""
    eng = json.loads((RESULTS / "engine-h200.json").read_text())
    rows = [(tuple(r["shape"]), r["paths"]["gram64"]["seconds"]) for r in eng["rows"]]
    e2e = json.loads((RESULTS / "diff-e2e-llama7b-h200.json").read_text())
    model = fit(rows, "H200 (bench/results, measured earlier)")
    model = CostModel(gram_rate=model.gram_rate, eig_rate=model.eig_rate, overhead_s=model.overhead_s,
                      io_rate=e2e["gbytes"] * 1e9 / e2e["floor_s"], device=model.device)
    tasks = llama_tasks(32, 4096, 11008, 4096, 32000)
    p = project(model, tasks, 1, 8, 1 << 40, True)
    check = {"measured_e2e_s": e2e["runs"]["float64"]["e2e_s"], "modelled_e2e_s": p["wall_s"],
             "measured_engine_s": e2e["runs"]["float64"]["engine_s"], "modelled_engine_s": p["compute_s"],
             "fit_rows": [[list(s), t, model.matrix_seconds(s)] for s, t in rows]}
    return model, check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save", default=None, help="write results/NAME.md and .json")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine()}", flush=True)
    print("exact path per matrix (float64 Gram + eigvalsh):", flush=True)
    rows = measure_engine(device, args.repeats)
    local = fit([r for r in rows if r[0] in FIT_SHAPES], f"{args.device} (this machine)")
    with tempfile.TemporaryDirectory() as tmp:
        io_rate, read_rate = measure_io(device, Path(tmp))
    local = CostModel(gram_rate=local.gram_rate, eig_rate=local.eig_rate, overhead_s=local.overhead_s, io_rate=io_rate, device=local.device)
    gpu, gpu_check = h200_model()

    out = ["# Per-matrix costs and projections for 70B and 405B models", "",
           f"Machine: {machine()}", "", f"Command: `python bench/scale.py --device {args.device} --repeats {args.repeats}`", "",
           "## Measured here: exact path per matrix (float64 Gram + eigvalsh), one matrix at a time", "",
           markdown_table(["shape", "measured median s", "model s", "model error", "used for"],
                          [[f"{s[0]}×{s[1]}", f"{t:.3f}", f"{local.matrix_seconds(s):.3f}",
                            f"{local.matrix_seconds(s) / t - 1:+.0%}", "fit" if s in FIT_SHAPES else "check (not fitted)"]
                           for s, t in rows]), "",
           f"Fitted: Gram {local.gram_rate / 1e9:.2f} G mult-adds/s, eigensolve {local.eig_rate / 1e9:.3f} G p³/s, "
           f"{local.overhead_s * 1e3:.1f} ms per matrix. Read+ΔW of a bf16 pair (page cache warm): "
           f"{io_rate / 1e9:.2f} GB/s of stored bytes (read alone: {read_rate / 1e9:.2f} GB/s).", "",
           "## H200 model (fitted to `results/engine-h200.json`, read+ΔW rate from `results/diff-e2e-llama7b-h200.json`)", "",
           markdown_table(["shape", "measured median s", "model s"],
                          [[f"{s[0]}×{s[1]}", f"{t:.4f}", f"{m:.4f}"] for s, t, m in gpu_check["fit_rows"]]), "",
           f"Fitted: Gram {gpu.gram_rate / 1e12:.2f} T mult-adds/s, eigensolve {gpu.eig_rate / 1e9:.1f} G p³/s, "
           f"{gpu.overhead_s * 1e3:.1f} ms per matrix; read+ΔW {gpu.io_rate / 1e9:.2f} GB/s. "
           f"Check on the measured Llama-2-7B run (not fitted): engine {gpu_check['measured_engine_s']:.1f} s measured vs "
           f"{gpu_check['modelled_engine_s']:.1f} s modelled; end to end {gpu_check['measured_e2e_s']:.1f} s measured vs "
           f"{gpu_check['modelled_e2e_s']:.1f} s modelled.", "",
           "## Projected (not measured): one diff of a base/tuned pair, bf16, exact float64 spectra of every matrix", ""]
    data = {"local_rows": [[list(s), t] for s, t in rows], "local_model": local.__dict__, "h200_model": gpu.__dict__,
            "h200_check": gpu_check, "read_rate": read_rate, "projections": []}
    table = []
    for name, dims in MODELS.items():
        tasks = llama_tasks(*dims)
        for label, cost, on_gpu, depth, batch in (("this CPU", local, False, 1, 256 << 20),
                                                  ("H200", gpu, True, 8, int(0.45 * 139e9))):
            for ranks in ((1,) if not on_gpu else (1, 8, 64)):
                p = project(cost, tasks, ranks, depth, batch, on_gpu)
                data["projections"].append({"model": name, "device": label, **p})
                table.append([name, label, ranks, f"{p['read_bytes'] / 1e12:.2f} TB", _dur(p["io_s"]),
                              _dur(p["compute_s"]), f"**{_dur(p['wall_s'])}**",
                              f"{p['aggregate_read_GBps']:.2f} GB/s",
                              f"{p['host_bytes'] / 2**30:.1f} GiB", f"{p['device_bytes'] / 2**30:.1f} GiB" if on_gpu else "–"])
    out.append(markdown_table(["model", "device", "ranks", "read", "read+ΔW / rank", "decompositions / rank", "wall",
                               "storage bandwidth needed", "host data memory / rank", "GPU memory / rank"], table))
    text = "\n".join(out)
    print(text)
    if args.save:
        print(f"saved {save(args.save, text, data)}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
