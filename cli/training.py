"""``spectra train``, ``spectra sweep`` and ``spectra demo``: reference runs and the offline demo."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from spectra.config import DiffConfig
from spectra_cli.console import progress_bar, quiet_transformers, stderr, stdout
from spectra_cli.diff import run_diff


@click.command("train", short_help="One reference fine-tune (LoRA via PEFT, or full), logged.")
@click.option("--base", required=True, help="Local Hugging Face causal-LM folder (never downloaded).")
@click.option("--data", required=True, help="Target data: a text file, a folder of text/code files, or JSONL (text, or prompt/response).")
@click.option("--method", type=click.Choice(["full", "lora"]), default="lora", show_default=True,
              help="LoRA through PEFT, or full fine-tuning.")
@click.option("--rank", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank r.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default 2·r, as Biderman et al. advise).")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r).")
@click.option("--targets", default="all", show_default=True, help="all (default, Biderman et al.), attn, mlp, or module names.")
@click.option("--lr", type=float, default=None, help="Default 2e-4 for LoRA, 2e-5 for full (LoRA ≈ 10× full, Biderman et al.).")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Sequences per step.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=8), help="Tokens per sequence.")
@click.option("--seed", default=0, show_default=True, help="Seed of initialisation, data order and LoRA init.")
@click.option("--eval-source", default=None, help="Source-domain data: its loss measures forgetting.")
@click.option("--eval-every", default=50, show_default=True, type=click.IntRange(min=1), help="Steps between evaluations of target and source loss.")
@click.option("--device", default="auto", show_default=True, help="auto uses CUDA with bf16 autocast when present.")
@click.option("--trace-every", default=50, show_default=True, type=click.IntRange(min=0),
              help="Measure ΔW's spectrum and subspaces every N steps while training (OUT/trace.jsonl); 0: off.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (adapter or model, logs).")
def train_cmd(base, data, method, rank, alpha, rslora, targets, lr, steps, batch, seq_len, seed, eval_source, eval_every, device,
              trace_every, out_dir) -> None:
    """One reference fine-tune (LoRA through PEFT, or full), logged to OUT/train_log.jsonl.

    A LoRA run writes a standard PEFT adapter, a full run a safetensors model folder; both can be
    analysed with `spectra diff BASE OUT`. Tokens come from BASE's tokenizer files; a folder without
    them is read as UTF-8 bytes (ids 0-255; train_config.json says which).
    """
    from spectra.training import TrainConfig, train

    quiet_transformers()
    config = TrainConfig(base=base, data=data, out=out_dir, method=method, rank=rank, alpha=alpha, rslora=rslora,
                         targets=targets, lr=lr, steps=steps, batch=batch, seq_len=seq_len, seed=seed,
                         eval_source=eval_source, eval_every=eval_every, device=device, trace_every=trace_every)
    err = stderr()
    progress = progress_bar(err)
    task_id = progress.add_task(f"{method} fine-tune", total=steps, current="")

    def on_record(rec: dict) -> None:
        src = "" if rec["source_loss"] is None else f" source {rec['source_loss']:.3f}"
        progress.update(task_id, completed=rec["step"], current=f"target {rec['target_loss']:.3f}{src}")

    with progress:
        summary = train(config, callback=on_record)
    err.print(escape(f"{summary.steps} steps in {summary.seconds:.1f} s: target loss {summary.target_loss:.3f}"
                     + ("" if summary.source_loss is None else f", source loss {summary.source_loss:.3f}")
                     + f"; outputs in {out_dir}"), highlight=False)


@click.command("sweep", short_help="Several reference runs on one base, then diff and compare them.")
@click.option("--base", required=True, help="Local Hugging Face causal-LM folder.")
@click.option("--data", required=True, help="Target data (as for spectra train).")
@click.option("--methods", default="lora,full", show_default=True, help="Comma-separated: lora, full.")
@click.option("--ranks", default="8,64", show_default=True, help="Comma-separated LoRA ranks.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds: one set of runs per seed.")
@click.option("--eval-source", default=None, help="Source-domain data for the forgetting measure.")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Sequences per step.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=8), help="Tokens per sequence.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: one subfolder per run (adapter or model, logs), their diffs and compares, sweep.json.")
def sweep_cmd(base, data, methods, ranks, seeds, eval_source, steps, batch, seq_len, device, out_dir) -> None:
    """Several reference runs on one base and dataset, then diff each and compare LoRA with full
    fine-tuning and consecutive LoRA ranks (OUT/sweep.json lists everything)."""
    from spectra.training import sweep

    quiet_transformers()
    try:
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        rank_list = [int(r) for r in ranks.split(",") if r.strip()]
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("--ranks and --seeds must be comma-separated integers") from None
    if not method_list or any(m not in ("lora", "full") for m in method_list):
        raise click.BadParameter(f"--methods must list lora and/or full. Got {methods!r} instead")
    err = stderr()
    progress = progress_bar(err)
    tasks: dict[str, int] = {}

    def on_record(name: str, rec: dict) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(f"train {name}", total=steps, current="")
        progress.update(tasks[name], completed=rec["step"], current=f"target {rec['target_loss']:.3f}")

    with progress:
        doc = sweep(base, data, out_dir, methods=method_list, ranks=rank_list, seeds=seed_list, eval_source=eval_source,
                    callback=on_record, steps=steps, batch=batch, seq_len=seq_len, device=device)
    table = Table(title="sweep", title_justify="left")
    for c in ("run", "target loss", "source loss", "seconds"):
        table.add_column(c, justify="left" if c == "run" else "right")
    for name, r in doc["runs"].items():
        table.add_row(escape(name), f"{r['target_loss']:.3f}", "–" if r["source_loss"] is None else f"{r['source_loss']:.3f}", f"{r['seconds']:.0f}")
    stdout().print(table)
    err.print(escape(f"analyses in {Path(out_dir) / 'analysis'}; index: {Path(out_dir) / 'sweep.json'}"), highlight=False)


@click.command("demo", short_help="Offline end-to-end demo: tiny pretrain, fine-tunes, every analysis.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Where the runs, analyses and summary go (default: out/demo for the full demo; a new scratch "
                   "folder for --quick and --synthetic). reports/demo holds a committed copy of a full demo's outputs.")
@click.option("--quick", is_flag=True, help="A tiny model and few steps (≤ 2 minutes; what the tests run).")
@click.option("--synthetic", is_flag=True, help="No training: diff a generated Llama-shaped pair with a planted update.")
@click.option("--seed", default=0, show_default=True, help="Seed of initialisation, data order and LoRA init.")
def demo_cmd(out_dir, quick, synthetic, seed) -> None:
    """Offline end-to-end demo: pretrain a tiny byte-level Llama on English prose, fine-tune it on
    Python code (full, LoRA r=8 and r=64, a second seed) and on JSON records (LoRA r=8), then diff,
    compare, extract (the full fine-tune at LoRA r=8's size), interfere (the two tasks) and plot
    everything, with an HTML report."""
    err = stderr()
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="spectra-demo-") if (quick or synthetic) else "out/demo"
    elif quick and Path(out_dir).resolve() == (Path("reports") / "demo").resolve() and (Path(out_dir) / "summary.json").exists():
        raise click.UsageError("--quick would overwrite the full example in reports/demo: pass another --out (or none for a scratch folder)")
    out = Path(out_dir)
    if synthetic:
        from spectra.synthetic import LlamaShape, make_llama_pair

        t0 = time.perf_counter()
        base, tuned = make_llama_pair(out / "checkpoints", shape=LlamaShape(), seed=seed)
        err.print(escape(f"generated {base} and {tuned} in {time.perf_counter() - t0:.1f} s"), highlight=False)
        run_diff(str(base), str(tuned), DiffConfig(), out_dir=str(out), allow_identical=False)
        return
    from spectra.demo import DemoConfig, run_demo

    quiet_transformers()
    config = DemoConfig.make(str(out), quick=quick, seed=seed)
    t0 = time.perf_counter()
    progress = progress_bar(err)
    tasks: dict[str, int] = {}
    total = {"base": config.pretrain_steps}

    def on_train(name: str, rec: dict) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(f"train {name}", total=total.get(name, config.finetune_steps), current="")
        src = "" if rec["source_loss"] is None else f", source {rec['source_loss']:.3f}"
        progress.update(tasks[name], completed=rec["step"], current=f"target {rec['target_loss']:.3f}{src}")

    with progress:
        run_demo(config, log=lambda m: progress.console.print(escape(m), highlight=False), on_train=on_train)
    stdout().print((out / "summary.md").read_text(encoding="utf-8"), markup=False, highlight=False)
    err.print(escape(f"demo finished in {time.perf_counter() - t0:.0f} s; everything is in {out}/"), highlight=False)

