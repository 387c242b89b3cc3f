"""``spectra`` commands: parse, check flag combinations, call the library, print.

Results go to stdout; progress, hints and errors to stderr. Expected failures (every
:class:`spectra.SpectraError`) print one line and exit with status 1; set ``SPECTRA_DEBUG=1`` for
the traceback. Unknown exceptions propagate.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import spectra
from spectra.diff import DiffConfig, DiffEvent, all_zero, raise_if_identical
from spectra.errors import IdenticalCheckpointsError, SpectraError

EXIT_ERROR = 1
EXIT_IDENTICAL = 3


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _quiet_transformers() -> None:
    """Training commands report progress themselves: silence transformers' own bars and notices."""
    import warnings

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")


def _stdout() -> Console:
    """Console for results; when piped to a file, wide enough that tensor names do not fold."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    return console


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, torchrun stopping the ranks of a failed run), handled as Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _rank_prefix() -> str:
    """``[rank N] `` in a multi-process run, so that each rank's lines can be told apart."""
    from spectra.distributed import launched

    return f"[rank {os.environ.get('RANK', '?')}] " if launched() else ""


class _Group(click.Group):
    """Turns :class:`SpectraError` into one line on stderr and a non-zero exit, and Ctrl-C or
    SIGTERM into a clean stop: what was computed is already journaled (``diff --resume``)."""

    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
        try:
            return super().invoke(ctx)
        except SpectraError as exc:
            if os.environ.get("SPECTRA_DEBUG") == "1":
                raise
            code = EXIT_IDENTICAL if isinstance(exc, IdenticalCheckpointsError) else EXIT_ERROR
            click.echo(f"{_rank_prefix()}error: {exc}", err=True)
            ctx.exit(code)
        except KeyboardInterrupt as exc:
            what = "SIGTERM" if isinstance(exc, _Terminated) else "Ctrl-C"
            click.echo(f"{_rank_prefix()}stopped by {what}: results finished so far are kept in the --out folder "
                       "(results.jsonl); run the same command with --resume to finish", err=True)
            ctx.exit(143 if isinstance(exc, _Terminated) else 130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(spectra.__version__, prog_name="spectra")
def main() -> None:
    """Weight-space spectral analysis of fine-tuned models."""


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[current]}", style="dim"),
        console=console, transient=False,
    )


@main.command("diff")
@click.argument("base")
@click.argument("tuned", required=False)
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for results.json, results.csv and the heatmaps (default: no files).")
@click.option("--threshold", "-t", "thresholds", type=float, multiple=True,
              help="Energy-rank threshold τ in (0, 1]; repeatable. Default: 0.5 0.9 0.99.")
@click.option("--include", default=None, help="Regex: analyse only matrices whose name matches.")
@click.option("--exclude", default=None, help="Regex: leave out matrices whose name matches (e.g. 'embed|lm_head').")
@click.option("--layers", default=None, help="Layer selection such as '0-3,7,10-' (drops embeddings and head).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--top-k", default=64, show_default=True, type=click.IntRange(min=0),
              help="Singular values kept per matrix in the results (metrics use all of them).")
@click.option("--method", type=click.Choice(["gram", "svd"]), default="gram", show_default=True,
              help="Exact spectrum via the Gram matrix's eigenvalues (fast) or an SVD.")
@click.option("--precision", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="Precision of the decomposition; float32 is faster but loses small singular values.")
@click.option("--no-split", is_flag=True, help="Analyse fused q/k/v and gate/up matrices whole.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout instead of the table.")
@click.option("--no-plots", is_flag=True, help="Do not write the heatmaps.")
@click.option("--allow-identical", is_flag=True, help="Exit 0 even when every ΔW is exactly zero.")
@click.option("--report", "report", is_flag=True, help="Also write OUT/report.html (needs --out).")
@click.option("--weight-spectra", is_flag=True, help="Also keep the top singular values of W_base and W_tuned (3× the work).")
@click.option("--resume", is_flag=True, help="Finish an interrupted run in --out from its journal (same inputs and options).")
@click.option("--approx", is_flag=True, help="Approximate energy ranks with guaranteed bounds for every matrix (randomized sketch).")
@click.option("--approx-above", type=click.IntRange(min=0), default=16384, show_default=True,
              help="Use the approximate mode for matrices with min(out, in) above this; 0: never.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the matrices, bytes to read, estimated time (quick calibration on --device) and memory; do nothing else.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="With --plan: the number of ranks to plan for (default: this launch's WORLD_SIZE, else 1).")
@click.option("--batch-memory", type=click.IntRange(min=1), default=None, metavar="MIB",
              help="Memory cap of one batch of matrices, MiB (default: 256 on the CPU, 45% of free GPU memory).")
@click.option("--prefetch", type=click.IntRange(min=0), default=None,
              help="Tensor pairs read ahead while the engine works (default: 1 on the CPU, 8 on CUDA; 0: none).")
@click.option("--distributed/--no-distributed", default=None,
              help="Run as one rank of a torchrun job (default: on when launched by torchrun with WORLD_SIZE > 1).")
def diff_cmd(base, tuned, out_dir, thresholds, include, exclude, layers, device, top_k, method, precision,
             no_split, as_json, no_plots, allow_identical, report=False, weight_spectra=False, resume=False,
             approx=False, approx_above=16384, plan_only=False, nproc=None, distributed=None,
             batch_memory=None, prefetch=None) -> None:
    """Spectrum of ΔW = TUNED − BASE for every paired matrix.

    BASE and TUNED are each a .safetensors file, a model folder (sharded or not), a .bin/.pt state
    dict, an index file, or an org/name entry of the local Hugging Face cache. TUNED may be a PEFT
    LoRA adapter folder (ΔW = s·B·A from the factors); `spectra diff ADAPTER` alone analyses an
    adapter without its base (no relative norms; DoRA needs the base).
    """
    if report and not out_dir:
        raise click.UsageError("--report writes OUT/report.html: give --out DIR as well")
    config = DiffConfig(
        **({"thresholds": tuple(thresholds)} if thresholds else {}),
        include=include, exclude=exclude, layers=layers, device=device, top_k=top_k,
        method=method, precision=precision, split_fused=not no_split, weight_spectra=weight_spectra,
        approx=approx, approx_above=approx_above or None,
        max_batch_bytes=batch_memory << 20 if batch_memory else None, prefetch=prefetch,
    )
    from spectra.distributed import launched, world_size

    if plan_only:
        if tuned is None:
            raise click.UsageError("--plan needs BASE and TUNED checkpoints")
        world = nproc or world_size()
        _print_plan(spectra.diff_plan(base, tuned, config, world_size=world), _stdout())
        return
    distributed = launched() if distributed is None else distributed
    lead = not distributed or os.environ.get("RANK", "0") == "0"
    err = _stderr() if lead else Console(stderr=True, quiet=True)  # other ranks print only their errors
    progress = _progress(err)
    task_id = None

    def on_event(ev: DiffEvent) -> None:
        nonlocal task_id
        if task_id is None:
            task_id = progress.add_task("ΔW spectra", total=ev.total, current="")
        current = ev.result.name if ev.result else ev.skipped.name
        progress.update(task_id, completed=ev.done, current=current[-60:])
        if ev.skipped is not None:
            progress.console.print(f"[yellow]warning:[/] {escape(ev.skipped.name)}: {escape(ev.skipped.reason)}", highlight=False)

    start = time.perf_counter()
    with progress:
        result = spectra.diff(base, tuned, config=config, out_dir=out_dir, callback=on_event,
                              plots=not no_plots, allow_identical=True, resume=resume, distributed_run=distributed)
    if not lead:
        return
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    else:
        _stdout().print(_summary_table(result))
    err.print(f"{len(result.modules)} matrices in {time.perf_counter() - start:.1f} s on {result.device}; "
              f"{len(result.skipped)} skipped, {len(result.unmatched['base_only'])} base-only, "
              f"{len(result.unmatched['tuned_only'])} tuned-only tensors", highlight=False)
    if out_dir:
        err.print(f"results: {escape(str(Path(out_dir) / 'results.json'))}", highlight=False)
    if report:
        from spectra.report import write_report

        err.print(escape(f"report: {write_report([Path(out_dir) / 'results.json'], Path(out_dir) / 'report.html')}"), highlight=False)
    if all_zero(result):
        err.print("[yellow]warning:[/] every analysed ΔW is exactly zero: base and tuned hold the same weights")
        if not allow_identical:
            raise_if_identical(result, out_dir)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _print_plan(plan: "spectra.plan.Plan", console: Console) -> None:
    """The ``--plan`` summary: work, bytes, time and memory, then the matrices by shape."""
    c = plan.cost
    table = Table(title="spectra diff --plan (nothing has been computed)", title_justify="left", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("matrices to analyse", f"{plan.matrices:,} (from {plan.tensors:,} tensor pairs)")
    table.add_row("bytes to read (both checkpoints)", _fmt_bytes(plan.read_bytes))
    table.add_row("ranks", str(plan.world_size))
    table.add_row("estimated time", f"{_fmt_seconds(plan.seconds)} (slowest rank: read+ΔW {_fmt_seconds(plan.io_seconds)}, "
                                    f"decompositions {_fmt_seconds(plan.compute_seconds)})")
    table.add_row("estimated peak memory, host", f"{_fmt_bytes(plan.baseline_bytes + plan.host_bytes)} "
                                                 f"(process now {_fmt_bytes(plan.baseline_bytes)} + data {_fmt_bytes(plan.host_bytes)})")
    if plan.device_bytes:
        table.add_row("estimated peak memory, GPU", _fmt_bytes(plan.device_bytes))
    table.add_row("calibration", f"{c.device}, {c.precision}: Gram {c.gram_rate / 1e9:.1f} G mult-adds/s, "
                                 f"eigensolve {c.eig_rate / 1e9:.2f} G p³/s, read+ΔW {c.io_rate / 1e6:.0f} MB/s")
    console.print(table)
    shapes = Table(title="matrices by shape (out × in)", title_justify="left")
    for col in ("shape", "count", "est. s / matrix"):
        shapes.add_column(col, justify="right")
    for shape, n in sorted(plan.shapes.items(), key=lambda kv: -kv[1] * c.matrix_seconds(kv[0])):
        shapes.add_row(f"{shape[0]}×{shape[1]}", str(n), f"{c.matrix_seconds(shape):.3g}")
    console.print(shapes)
    for note in plan.notes:
        console.print(f"note: {escape(note)}")


def _summary_table(result: spectra.DiffResult) -> Table:
    tau = result.headline_threshold
    key = str(float(tau))
    table = Table(title=f"Rank needed for {tau:.0%} of ΔW's energy, median per module", title_justify="left")
    lora = any(m.lora_r is not None for m in result.modules)
    for col, just in (("module", "left"), ("n", "right"), ("p", "right"), *((("LoRA r", "right"),) if lora else ()),
                      (f"rank[{key}]", "right"), ("/ p", "right"), ("random / p", "right"), ("‖ΔW‖/‖W‖", "right")):
        table.add_column(col, justify=just)
    lora_r = {}
    for m in result.modules:
        lora_r.setdefault(m.module, m.lora_r)
    from spectra.naming import role_sort_key

    rows = sorted(result.summary(tau), key=lambda r: role_sort_key(r["role"], r["module"]))
    for r in rows:
        table.add_row(
            escape(r["module"]), str(r["count"]), str(r["p"]), *((str(lora_r.get(r["module"])),) if lora else ()),
            f"{r['energy_rank']:g}", f"{r['energy_rank_frac']:.3f}",
            f"{r['random_frac']:.3f}", "–" if r["rel_norm"] is None else f"{r['rel_norm']:.3g}",
        )
    return table


@main.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--base", default=None, help="The base model both were tuned from (needed for full checkpoints, DoRA, amplification, intruders).")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), default=None, help="Folder for compare.json, compare.csv and plots.")
@click.option("--side", type=click.Choice(["left", "right", "both"]), default="right", show_default=True,
              help="Singular vectors compared (Hu et al. used the right ones of LoRA's A).")
@click.option("--top-k", default=64, show_default=True, type=click.IntRange(min=1), help="Subspace rank taken from a full update.")
@click.option("--include", default=None, help="Regex on module names to keep.")
@click.option("--exclude", default=None, help="Regex on module names to leave out.")
@click.option("--layers", default=None, help="Layer selection such as '0-3,7'.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print compare.json to stdout instead of the table.")
@click.option("--no-plots", is_flag=True)
@click.option("--report", "report", is_flag=True, help="Also write OUT/report.html (needs --out).")
def compare_cmd(a, b, base, out_dir, side, top_k, include, exclude, layers, device, as_json, no_plots, report) -> None:
    """How two updates of one base relate: φ grids, principal angles, captured energy,
    amplification and intruder dimensions (SPEC.md, Subspaces).

    A and B are each a PEFT LoRA adapter folder or a full fine-tuned checkpoint (then --base is
    required).
    """
    from spectra.compare import CompareConfig, compare

    if report and not out_dir:
        raise click.UsageError("--report writes OUT/report.html: give --out DIR as well")
    config = CompareConfig(side=side, top_k=top_k, include=include, exclude=exclude, layers=layers, device=device)
    err = _stderr()
    progress = _progress(err)
    task_id = None

    def on_module(done: int, total: int, name: str) -> None:
        nonlocal task_id
        if task_id is None:
            task_id = progress.add_task("subspaces", total=total, current="")
        progress.update(task_id, completed=done, current=name[-60:])

    with progress:
        result = compare(a, b, base=base, config=config, out_dir=out_dir, callback=on_module, plots=not no_plots)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    else:
        _stdout().print(_compare_table(result))
    err.print(f"{len(result.modules)} modules compared in {result.elapsed_s:.1f} s; "
              f"{len(result.a_only)} only in A, {len(result.b_only)} only in B", highlight=False)
    if out_dir:
        err.print(f"results: {escape(str(Path(out_dir) / 'compare.json'))}", highlight=False)
    if report:
        from spectra.report import write_report

        err.print(escape(f"report: {write_report([Path(out_dir) / 'compare.json'], Path(out_dir) / 'report.html')}"), highlight=False)


def _compare_table(result) -> Table:
    side = result.config["side"] if result.config["side"] != "both" else "right"
    table = Table(title=escape(f"A = {result.a} ({result.kinds['a']}), B = {result.b} ({result.kinds['b']})"), title_justify="left")
    cols = ["module", "layer", "r_A", "r_B", f"φ({side})", "random", "B in A", "best r_A", "A in B"]
    with_base = any("amplification" in m for m in result.modules)
    if with_base:
        cols += ["amp A", "amp B", "intr A", "intr B"]
    for c in cols:
        table.add_column(c, justify="left" if c == "module" else "right")
    for m in result.modules:
        ph = m["phi"][side]
        row = [escape(m["module"]), "" if m["layer"] is None else str(m["layer"]), str(m["rank_a"]), str(m["rank_b"]),
               f"{ph['phi_full']:.3f}", f"{ph['random']:.3f}", f"{m['captured']['b_in_a']['two_sided']:.3f}",
               f"{m['captured']['b_in_a']['best_rank_r']:.3f}", f"{m['captured']['a_in_b']['two_sided']:.3f}"]
        if with_base:
            amp, intr = m.get("amplification", {}), m.get("intruders", {})
            row += [f"{amp['a']['factor']:.2f}" if amp else "–", f"{amp['b']['factor']:.2f}" if amp else "–",
                    str(intr['a']['count']) if intr else "–", str(intr['b']['count']) if intr else "–"]
        table.add_row(*row)
    return table


@main.command("report")
@click.argument("results", nargs=-1, required=True)
@click.option("--out", "-o", "out_path", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="The HTML file to write.")
@click.option("--title", default="spectra report", show_default=True)
def report_cmd(results, out_path, title) -> None:
    """One self-contained HTML report (no network) from results.json, compare.json,
    train_log.jsonl files, or folders holding them (e.g. reports/demo)."""
    from spectra.report import write_report

    path = write_report(list(results), out_path, title=title)
    _stderr().print(escape(f"report: {path}"), highlight=False)


@main.command("inspect")
@click.argument("path")
@click.option("--all", "show_all", is_flag=True, help="Also list 1-D and non-float tensors.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
def inspect_cmd(path, show_all, as_json) -> None:
    """List a checkpoint's matrices with their layer, module, role, shape and dtype.

    The quick way to see how spectra understood an architecture: fused matrices show the parts
    they will be split into, and transposed (Conv1D) storage is marked.
    """
    from spectra.inspect import inspect_checkpoint

    records = inspect_checkpoint(path, include_non_matrices=show_all)
    if as_json:
        click.echo(json.dumps(records, indent=1, ensure_ascii=False))
        return
    table = Table(title=escape(str(path)), title_justify="left")
    for col in ("name", "layer", "expert", "module", "role", "shape", "dtype", "parts", "note"):
        table.add_column(col, overflow="fold")
    for r in records:
        table.add_row(
            escape(r["name"]), "" if r["layer"] is None else str(r["layer"]), "" if r["expert"] is None else str(r["expert"]),
            escape(r["module"] or ""), r["role"] or "", "×".join(map(str, r["shape"])), r["dtype"],
            ",".join(r["parts"]) + (" (T)" if r["transpose"] else ""), escape(r["note"]),
        )
    _stdout().print(table)
    _stderr().print(f"{sum(1 for r in records if r['module'])} matrices, {len(records)} tensors listed", highlight=False)


@main.command("train")
@click.option("--base", required=True, help="Local Hugging Face causal-LM folder (never downloaded).")
@click.option("--data", required=True, help="Target data: a text file, a folder of text/code files, or JSONL (text, or prompt/response).")
@click.option("--method", type=click.Choice(["full", "lora"]), default="lora", show_default=True)
@click.option("--rank", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank r.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default 2·r, as Biderman et al. advise).")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r).")
@click.option("--targets", default="all", show_default=True, help="all (default, Biderman et al.), attn, mlp, or module names.")
@click.option("--lr", type=float, default=None, help="Default 2e-4 for LoRA, 2e-5 for full (LoRA ≈ 10× full, Biderman et al.).")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=8))
@click.option("--seed", default=0, show_default=True)
@click.option("--eval-source", default=None, help="Source-domain data: its loss measures forgetting.")
@click.option("--eval-every", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto uses CUDA with bf16 autocast when present.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False))
def train_cmd(base, data, method, rank, alpha, rslora, targets, lr, steps, batch, seq_len, seed, eval_source, eval_every, device, out_dir) -> None:
    """One reference fine-tune (LoRA through PEFT, or full), logged to OUT/train_log.jsonl.

    A LoRA run writes a standard PEFT adapter, a full run a safetensors model folder; both can be
    analysed with `spectra diff BASE OUT`.
    """
    from spectra.training import TrainConfig, train

    _quiet_transformers()
    config = TrainConfig(base=base, data=data, out=out_dir, method=method, rank=rank, alpha=alpha, rslora=rslora,
                         targets=targets, lr=lr, steps=steps, batch=batch, seq_len=seq_len, seed=seed,
                         eval_source=eval_source, eval_every=eval_every, device=device)
    err = _stderr()
    progress = _progress(err)
    task_id = progress.add_task(f"{method} fine-tune", total=steps, current="")

    def on_record(rec: dict) -> None:
        src = "" if rec["source_loss"] is None else f" source {rec['source_loss']:.3f}"
        progress.update(task_id, completed=rec["step"], current=f"target {rec['target_loss']:.3f}{src}")

    with progress:
        summary = train(config, callback=on_record)
    err.print(escape(f"{summary.steps} steps in {summary.seconds:.1f} s: target loss {summary.target_loss:.3f}"
                     + ("" if summary.source_loss is None else f", source loss {summary.source_loss:.3f}")
                     + f"; outputs in {out_dir}"), highlight=False)


@main.command("sweep")
@click.option("--base", required=True, help="Local Hugging Face causal-LM folder.")
@click.option("--data", required=True, help="Target data (as for spectra train).")
@click.option("--methods", default="lora,full", show_default=True, help="Comma-separated: lora, full.")
@click.option("--ranks", default="8,64", show_default=True, help="Comma-separated LoRA ranks.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds: one set of runs per seed.")
@click.option("--eval-source", default=None, help="Source-domain data for the forgetting measure.")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=8))
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False))
def sweep_cmd(base, data, methods, ranks, seeds, eval_source, steps, batch, seq_len, device, out_dir) -> None:
    """Several reference runs on one base and dataset, then diff each and compare LoRA with full
    fine-tuning and consecutive LoRA ranks (OUT/sweep.json lists everything)."""
    from spectra.training import sweep

    _quiet_transformers()
    try:
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        rank_list = [int(r) for r in ranks.split(",") if r.strip()]
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("--ranks and --seeds must be comma-separated integers") from None
    if not method_list or any(m not in ("lora", "full") for m in method_list):
        raise click.BadParameter(f"--methods must list lora and/or full. Got {methods!r} instead")
    err = _stderr()
    progress = _progress(err)
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
    _stdout().print(table)
    err.print(escape(f"analyses in {Path(out_dir) / 'analysis'}; index: {Path(out_dir) / 'sweep.json'}"), highlight=False)


@main.command("demo")
@click.option("--out", "out_dir", default="reports/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the runs, analyses and summary go.")
@click.option("--quick", is_flag=True, help="A tiny model and few steps (≤ 2 minutes; what the tests run).")
@click.option("--synthetic", is_flag=True, help="No training: diff a generated Llama-shaped pair with a planted update.")
@click.option("--seed", default=0, show_default=True)
def demo_cmd(out_dir, quick, synthetic, seed) -> None:
    """Offline end-to-end demo: pretrain a tiny byte-level Llama on English prose, fine-tune it on
    Python code (full, LoRA r=8 and r=64, a second seed), then diff, compare and plot everything."""
    err = _stderr()
    out = Path(out_dir)
    if synthetic:
        from spectra.synthetic import LlamaShape, make_llama_pair

        t0 = time.perf_counter()
        base, tuned = make_llama_pair(out / "checkpoints", shape=LlamaShape(), seed=seed)
        err.print(escape(f"generated {base} and {tuned} in {time.perf_counter() - t0:.1f} s"), highlight=False)
        click.get_current_context().invoke(
            diff_cmd, base=str(base), tuned=str(tuned), out_dir=str(out), thresholds=(), include=None, exclude=None,
            layers=None, device="auto", top_k=64, method="gram", precision="float64", no_split=False, as_json=False,
            no_plots=False, allow_identical=False)
        return
    from spectra.demo import DemoConfig, run_demo

    _quiet_transformers()
    config = DemoConfig.make(str(out), quick=quick, seed=seed)
    t0 = time.perf_counter()
    progress = _progress(err)
    tasks: dict[str, int] = {}
    total = {"base": config.pretrain_steps}

    def on_train(name: str, rec: dict) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(f"train {name}", total=total.get(name, config.finetune_steps), current="")
        src = "" if rec["source_loss"] is None else f", source {rec['source_loss']:.3f}"
        progress.update(tasks[name], completed=rec["step"], current=f"target {rec['target_loss']:.3f}{src}")

    with progress:
        run_demo(config, log=lambda m: progress.console.print(escape(m), highlight=False), on_train=on_train)
    _stdout().print((out / "summary.md").read_text(encoding="utf-8"), markup=False, highlight=False)
    err.print(escape(f"demo finished in {time.perf_counter() - t0:.0f} s; everything is in {out}/"), highlight=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
