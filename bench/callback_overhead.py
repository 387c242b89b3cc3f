"""Overhead of tracing ΔW during training (:class:`spectra.callbacks.SpectraTracker`) on the demo's
training configuration.

The model, data and step are the demo's (``spectra.demo.DemoConfig`` defaults: a byte-level Llama,
hidden 192, 4 layers, intermediate 512, 4 heads; batches of 8 × 128 bytes of the standard library's
Python code; AdamW, gradient clipping, the warm-up + cosine schedule of ``spectra.training``): LoRA
at r = 8 on every linear module (lr 3e-3) and full fine-tuning (lr 3e-4), from a fresh initialisation
(the overhead does not depend on the weights' values).

Two measurements, both in the same run:

1. *Cost model*: the median wall time of a training step and of one measurement (every traced
   matrix decomposed, compared with the previous and first subspaces, appended to trace.jsonl);
   the overhead at an interval N is ``median measurement / (N · median step)``.
2. *End to end*: blocks of ``--block`` steps alternately without and with the tracker measuring
   every ``--every`` steps (ABAB…, so drift in the machine's load hits both), the ratio of the
   median block times minus one.

Run: ``python bench/callback_overhead.py`` (CPU, a few minutes) ``--save callback-overhead-cpu``
writes ``bench/results/``; ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save, sync

from spectra.callbacks import SpectraTracker
from spectra.demo import DemoConfig, target_text


def build(method: str, cfg: DemoConfig, device: torch.device, seed: int = 0):
    """The demo's model (and, for LoRA, PEFT on every linear module at r = 8, alpha 16), its optimiser
    and schedule, as spectra.training builds them."""
    import peft
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                                      num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, vocab_size=256,
                                      max_position_embeddings=cfg.seq_len, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr_lora if method == "lora" else cfg.lr_full, weight_decay=0.0)
    steps = cfg.finetune_steps
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return model, params, opt, sched


def batches(cfg: DemoConfig, seed: int = 0):
    data = torch.tensor(list(target_text(200_000).encode("utf-8")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, data.numel() - cfg.seq_len - 1, (cfg.batch,), generator=g)
        x = torch.stack([data[i : i + cfg.seq_len] for i in idx])
        yield x, x


def train_step(model, params, opt, sched, x, y, device) -> float:
    loss = model(input_ids=x.to(device), labels=y.to(device)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def run(method: str, args, cfg: DemoConfig, device: torch.device) -> dict:
    model, params, opt, sched = build(method, cfg, device)
    data = batches(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tracker = SpectraTracker(model, every=args.every, out_dir=tmp)
        for _ in range(args.warmup):
            train_step(model, params, opt, sched, *next(data), device)
        tracker.measure(0)  # the first measurement pays one-time costs (kernels, allocations)
        step_times, measure_times, blocks = [], [], {"plain": [], "traced": []}
        step = 0
        for b in range(2 * args.blocks):
            traced = b % 2 == 1
            t_block = time.perf_counter()
            for _ in range(args.block):
                step += 1
                sync(device)
                t0 = time.perf_counter()
                loss = train_step(model, params, opt, sched, *next(data), device)
                sync(device)
                step_times.append(time.perf_counter() - t0)
                if traced and step % args.every == 0:
                    t0 = time.perf_counter()
                    tracker.measure(step, loss=loss)
                    sync(device)
                    measure_times.append(time.perf_counter() - t0)
            blocks["traced" if traced else "plain"].append(time.perf_counter() - t_block)
        for _ in range(args.extra_measurements):  # more samples of the measurement cost alone
            t0 = time.perf_counter()
            tracker.measure(step, loss=None)
            sync(device)
            measure_times.append(time.perf_counter() - t0)
        traced_matrices = len(tracker.matrices)
        trace_bytes = (Path(tmp) / "trace.jsonl").stat().st_size
    step_med, meas_med = statistics.median(step_times), statistics.median(measure_times)
    e2e = statistics.median(blocks["traced"]) / statistics.median(blocks["plain"]) - 1
    return {
        "method": method, "matrices": traced_matrices, "steps": len(step_times), "median_step_s": step_med,
        "median_measurement_s": meas_med, "measurements": len(measure_times),
        "overhead_model": {str(n): meas_med / (n * step_med) for n in (10, 25, 50, 100)},
        "end_to_end": {"every": args.every, "block": args.block, "blocks": args.blocks, "overhead": e2e,
                       "median_plain_block_s": statistics.median(blocks["plain"]),
                       "median_traced_block_s": statistics.median(blocks["traced"])},
        "trace_bytes_per_measurement": trace_bytes / max(1, len(measure_times) + 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--every", type=int, default=10, help="measurement interval in the end-to-end blocks (default 10: "
                                                            "a harsher interval than the default 50, so the cost shows)")
    ap.add_argument("--block", type=int, default=20, help="steps per block")
    ap.add_argument("--blocks", type=int, default=3, help="blocks of each kind (ABAB…)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--extra-measurements", type=int, default=5)
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for training and measuring alike (default: torch's); on a shared, loaded "
                         "CPU 1 avoids OpenMP threads waiting for each other")
    ap.add_argument("--save", default=None, help="write bench/results/NAME.md and .json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = DemoConfig()
    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    results = [run(m, args, cfg, device) for m in args.methods.split(",")]
    load_after = os.getloadavg()[0]
    rows = []
    for r in results:
        rows.append([r["method"], r["matrices"], f"{r['median_step_s'] * 1e3:.1f}", f"{r['median_measurement_s'] * 1e3:.1f}",
                     *(f"{100 * r['overhead_model'][n]:.2f}%" for n in ("10", "50", "100")),
                     f"{100 * r['end_to_end']['overhead']:+.1f}%"])
    text = "\n".join([
        "# Overhead of SpectraTracker during training (the demo's configuration)", "",
        (f"Machine: {machine()}; 1-minute load average {load_before:.1f} at the start, {load_after:.1f} at the end "
        f"({os.cpu_count()} CPUs)"), "", f"Command: `python bench/callback_overhead.py {' '.join(sys.argv[1:])}`", "",
        (f"Model: byte-level Llama, hidden {cfg.hidden}, {cfg.layers} layers, intermediate {cfg.intermediate}; batch "
        f"{cfg.batch} × {cfg.seq_len}. LoRA: r = 8 on every linear module. Default interval: 50 steps."), "",
        markdown_table(["method", "traced matrices", "median step (ms)", "median measurement (ms)",
                        "overhead every 10", "every 50 (default)", "every 100",
                        f"end to end, every {args.every} (median blocks of {args.block} steps)"], rows), "",
        ("Overhead from the cost model = median measurement / (interval × median step). The end-to-end column compares "
        f"the median time of {args.blocks} blocks with the tracker measuring every {args.every} steps against "
        f"{args.blocks} blocks without it, interleaved; on a shared machine it carries the load's noise (it can even "
        "come out negative), which is why the cost model is the headline."),
    ])
    print(text)
    if args.save:
        print(save(args.save, text, {"results": results, "args": vars(args), "load_average": [load_before, load_after]}))


if __name__ == "__main__":
    main()
