"""``spectra diff``: the spectrum of ΔW for every paired matrix, as a table, JSON or files."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

import spectra
from spectra import distributed as spectra_distributed
from spectra.config import DiffConfig
from spectra.display import display_name, fmt_bytes, matrices, range_text, tau_percent
from spectra.errors import ConfigError
from spectra.findings import count_text, diff_findings, skipped_reasons, summary_legend
from spectra.io.checkpoint import READ_NOTE_PREFIX
from spectra.pairing import PAIRING_NOTE_PREFIX
from spectra.pipeline import all_zero, raise_if_identical
from spectra.records import DiffEvent
from spectra_cli.console import (
    OutPath,
    cell,
    echo_json,
    folder_report,
    given,
    one_pattern,
    print_explanation,
    print_table,
    progress_bar,
    short_name,
    shown,
    stderr,
    stdout,
)

#: Shown by ``spectra diff --explain`` (and, shortened, under the table).
EXPLAIN_EPILOG = ("Definitions of every metric, with formulas and sources: docs/definitions.md in the spectra "
                  "repository. The findings under the table say in words what the numbers show.")


def _explain(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--explain``: print the legend of the table's columns and stop (no checkpoint needed)."""
    if not value or ctx.resilient_parsing:
        return
    print_explanation(ctx, "Columns of the table spectra diff prints (one row per module kind, medians over its matrices):",
                      summary_legend(0.9, lora=True),
                      ["For a LoRA adapter, rank[0.9] out of LoRA r is how much of the adapter's rank the update uses.",
                       EXPLAIN_EPILOG])


#: --nproc's ceiling: a plan lists every rank's share (10 million ranks took 44 s and 1.7 GiB to plan)
MAX_PLAN_RANKS = 1 << 16


@click.command("diff", short_help="Spectrum of ΔW = TUNED − BASE for every paired matrix: rank needed, norms, baselines.")
@click.argument("base")
@click.argument("tuned", required=False)
@click.option("--out", "-o", "out_dir", type=OutPath(file_okay=False), default=None,
              help="Folder for results.json, results.csv and the heatmaps (default: no files).")
@click.option("--threshold", "-t", "thresholds", type=float, multiple=True,
              help="Energy-rank threshold τ in (0, 1]; repeatable. Default: 0.5 0.9 0.99.")
@click.option("--include", multiple=True, callback=one_pattern,
              help="Regex: analyse only matrices whose name matches.")
@click.option("--exclude", multiple=True, callback=one_pattern,
              help="Regex: leave out matrices whose name matches (e.g. 'embed|lm_head').")
@click.option("--layers", default=None, help="Layer selection such as '0-3,7,10-' (drops embeddings and head).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--top-k", default=64, show_default=True, type=click.IntRange(min=0),
              help="Singular values kept per matrix in the results (metrics use all of them).")
@click.option("--method", type=click.Choice(["gram", "svd"]), default="gram", show_default=True,
              help="Exact spectrum via the Gram matrix's eigenvalues (fast) or an SVD.")
@click.option("--precision", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="Precision of the decomposition; float32: energy ranks certified per matrix (else float64), other metrics float32's.")
@click.option("--no-split", is_flag=True, help="Analyse fused q/k/v and gate/up matrices whole.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json (with --plan: the plan) to stdout instead of the table.")
@click.option("--no-plots", is_flag=True, help="Do not write the heatmaps.")
@click.option("--allow-identical", is_flag=True, help="Exit 0 even when every ΔW is exactly zero.")
@click.option("--report", "report", is_flag=True, help="Also write OUT/report.html (needs --out).")
@click.option("--weight-spectra", is_flag=True, help="Also keep the top singular values of W_base and W_tuned (3× the work).")
@click.option("--esd", is_flag=True,
              help="Also fit WeightWatcher's power-law α (and its other ESD metrics) to W_base, W_tuned and ΔW of each "
                   "matrix (implies --weight-spectra); the report shows whether fine-tuning moved α.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run in --out from its journal (same inputs and options).")
@click.option("--approx", is_flag=True, help="Approximate energy ranks with guaranteed bounds for every matrix (randomized sketch).")
@click.option("--approx-above", type=click.IntRange(min=0), default=16384, show_default=True,
              help="Use the approximate mode for matrices with min(out, in) above this; 0: never.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the matrices, bytes to read, estimated time (quick calibration on --device) and memory; do nothing else.")
@click.option("--nproc", type=click.IntRange(min=1, max=MAX_PLAN_RANKS), default=None,
              help="With --plan: the number of ranks to plan for (default: this launch's WORLD_SIZE, else 1; "
                   f"at most {MAX_PLAN_RANKS}).")
@click.option("--batch-memory", type=click.IntRange(min=1), default=None, metavar="MIB",
              help="Memory cap of one batch of matrices, MiB (default: 16 on the CPU, 45% of free GPU memory).")
@click.option("--prefetch", type=click.IntRange(min=0), default=None,
              help="Tensor pairs read ahead while the engine works (default: 32 on the CPU, at most 3 batches' bytes; "
                   "8 on CUDA; 0: none).")
@click.option("--distributed/--no-distributed", default=None,
              help="Run as one rank of a torchrun job (default: on when launched by torchrun with WORLD_SIZE > 1).")
@click.option("--explain", is_flag=True, is_eager=True, expose_value=False, callback=_explain,
              help="Print what each column of the table means (p, rank[τ], / p, random / p, ‖ΔW‖/‖W‖) and exit.")
def diff_cmd(base, tuned, out_dir, thresholds, include, exclude, layers, device, top_k, method, precision,
             no_split, as_json, no_plots, allow_identical, report=False, weight_spectra=False, resume=False,
             approx=False, approx_above=16384, plan_only=False, nproc=None, distributed=None,
             batch_memory=None, prefetch=None, esd=False) -> None:
    """Spectrum of ΔW = TUNED − BASE for every paired matrix.

    BASE and TUNED are each a .safetensors file, a model folder (sharded or not), a .bin/.pt state
    dict, an index file, or an org/name entry of the local Hugging Face cache. TUNED may be a PEFT
    LoRA adapter folder (ΔW = s·B·A from the factors); `spectra diff ADAPTER` alone analyses an
    adapter without its base (no relative norms; DoRA needs the base).

    Prints one row per module kind (medians: rank needed for 90% of ΔW's energy, as a fraction of
    p = min(out, in), next to a random matrix's), a legend, and the findings in words, with any
    caveat as a warning. --explain defines every column; docs/definitions.md every metric.
    """
    if out_dir is not None and not out_dir.strip():
        raise ConfigError(f"--out must name a folder. Got {out_dir!r} instead",
                          hint="pass --out DIR; --out . writes into the current folder")
    if report and not out_dir:
        raise click.UsageError("--report writes OUT/report.html: give --out DIR as well")
    config = DiffConfig(
        **({"thresholds": tuple(thresholds)} if thresholds else {}),
        include=include, exclude=exclude, layers=layers, device=device, top_k=top_k,
        method=method, precision=precision, split_fused=not no_split, weight_spectra=weight_spectra, esd=esd,
        approx=approx, approx_above=approx_above or None,
        max_batch_bytes=batch_memory << 20 if batch_memory else None, prefetch=prefetch,
    )
    from spectra.distributed import is_lead, launched, world_size

    if approx and given("approx_above") and is_lead():
        stderr().print(f"[yellow]warning:[/] --approx-above {approx_above} has no effect with --approx: every matrix is "
                       "approximate", highlight=False)
    if nproc is not None and not plan_only:  # it plans; a run's ranks come from the launcher (torchrun)
        raise click.UsageError("--nproc goes with --plan (a run's ranks are torchrun's --nproc-per-node)")
    if plan_only:
        if tuned is None:
            raise click.UsageError("--plan needs BASE and TUNED checkpoints")
        ran = [o for o, chosen in (("--out", out_dir), ("--resume", resume), ("--report", report)) if chosen]
        if ran:  # the same command line with --plan added: these belong to the run, which a plan does not start
            stderr().print(shown(f"note: --plan runs nothing and writes nothing; {', '.join(ran)} apply to the run itself"),
                           highlight=False)
        world = nproc or world_size()
        plan = spectra.diff_plan(base, tuned, config, world_size=world)
        if as_json:  # the plan's fields; shapes as [out, in, count] rows (JSON has no tuple keys)
            doc = {**asdict(plan), "shapes": [[*shape, n] for shape, n in plan.shapes.items()], "seconds": plan.seconds}
            echo_json(json.dumps(doc, indent=1))
        else:
            _print_plan(plan, stdout())
        return
    world_size()  # a malformed WORLD_SIZE is an error here, not a run of one process beside the launcher's others
    run_diff(base, tuned, config, out_dir=out_dir, as_json=as_json, plots=not no_plots, allow_identical=allow_identical,
             report=report, resume=resume, distributed=launched() if distributed is None else distributed)


def run_diff(base: str, tuned: str | None, config: DiffConfig, *, out_dir: str | None = None, as_json: bool = False,
             plots: bool = True, allow_identical: bool = False, report: bool = False, resume: bool = False,
             distributed: bool = False) -> None:
    """Run one diff with a progress bar, print the table (or JSON) and the closing lines; the body
    of ``spectra diff`` (also used by ``spectra demo --synthetic``)."""
    lead = not distributed or spectra_distributed.is_lead()
    err = stderr() if lead else Console(stderr=True, quiet=True)  # other ranks print only their errors
    progress = progress_bar(err)
    # the task starts with the run: the first (largest) matrix may take minutes, and a log showed no line and an
    # elapsed time without it until it ended (its total comes with the first event)
    task_id = progress.add_task("ΔW spectra", total=None, current="")
    started = False

    def on_event(ev: DiffEvent) -> None:
        nonlocal started
        started = True
        current = ev.result.name if ev.result else ev.skipped.name
        progress.update(task_id, total=ev.total, completed=ev.done, current=short_name(current))
        if ev.skipped is not None:
            progress.console.print(f"[yellow]warning:[/] {shown(display_name(ev.skipped.name))}: "
                                   f"{shown(display_name(ev.skipped.reason, 400))}", highlight=False)

    from spectra.report import shared_report

    rebuild = bool(out_dir) and lead and not report and shared_report(out_dir, "results.json")  # before the run removes it
    with progress:
        try:
            result = spectra.diff(base, tuned, config=config, out_dir=out_dir, callback=on_event,
                                  plots=plots, allow_identical=True, resume=resume, distributed_run=distributed)
        finally:
            if not started:  # refused before any matrix, or none to analyse: no empty progress line
                progress.remove_task(task_id)
    if not lead:
        return
    result.add_caveat_warnings()  # already in results.json when written; for the lines below in any case
    found = diff_findings(result)
    if as_json:
        echo_json(result.to_json())
    else:
        out = stdout()
        print_table(out, _summary_table(result))
        lora = any(m.lora_r is not None for m in result.modules)
        out.print(_short_legend(result.headline_threshold, lora), style="dim", highlight=False)
        plain = [f for f in found if not f.warning and f.topic != "skipped"]  # skips: the stderr line below
        if plain:
            out.print("[bold]Findings[/]")
            for f in plain:
                out.print(f"  • {shown(f.text)}", highlight=False)
    err.print(f"{matrices(len(result.modules))} in {result.elapsed_s:.1f} s on {shown(result.device)}; "
              f"{len(result.skipped)} skipped, {len(result.unmatched['base_only'])} base-only, "
              f"{len(result.unmatched['tuned_only'])} tuned-only tensors", highlight=False)
    if result.skipped:
        counted = skipped_reasons(result)
        reasons = "; ".join(f"{n} × {display_name(r, 100)}" for r, n in counted[:3]) + ("; …" if len(counted) > 3 else "")
        where = (f"results.json \"skipped\" in {display_name(out_dir)}" if out_dir else
                 "\"skipped\" in the JSON on stdout" if as_json else "--out DIR or --json")
        err.print(shown(f"skipped: {reasons} (each name and reason: {where})"), highlight=False)
    if out_dir:
        err.print(f"results: {shown(display_name(str(Path(out_dir) / 'results.json'), None))}", highlight=False)
    if report or rebuild:  # rebuild: the folder's report also showed another command's results
        folder_report(err, out_dir, "results.json")
    for f in found:
        if f.warning:
            err.print(f"[yellow]warning:[/] {shown(f.text)}", highlight=False)
    for w in result.warnings:  # how a checkpoint was read (which of a folder's weight sets): explains an all-zero ΔW
        if w.startswith((READ_NOTE_PREFIX, PAIRING_NOTE_PREFIX)):
            err.print(f"[yellow]warning:[/] {shown(display_name(w, 400))}", highlight=False)
    if all_zero(result) and not allow_identical:
        raise_if_identical(result, out_dir)
    if not result.modules and result.skipped:  # nothing analysed: not a success, whatever was written
        from spectra.errors import PairingError

        first = next((s for s in result.skipped if not s["reason"].startswith("1-D")), result.skipped[0])
        raise PairingError(f"no matrix could be analysed: all {len(result.skipped)} tensors were skipped, e.g. {first['name']}: "
                           f"{first['reason']}", hint="the reasons are listed in results.json (skipped)" if out_dir else None)


def _short_legend(tau: float, lora: bool) -> str:
    """Two lines under the table: p, the rank needed and the baselines (``--explain`` says more)."""
    k = str(float(tau))
    return (f"p = min(out, in), the most directions a matrix can have; rank[{k}] = fewest singular directions holding "
            f"{tau_percent(tau)} of ΔW's energy; / p = that ÷ p; random / p = the same for a Gaussian random matrix of the shape "
            f"(a dense update); ‖ΔW‖/‖W‖ = relative size{'; LoRA r = the adapter rank (rank[' + k + '] of r is used)' if lora else ''}. "
            "spectra diff --explain defines each column; docs/definitions.md each metric.")


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _print_plan(plan: spectra.plan.Plan, console: Console) -> None:
    """The ``--plan`` summary: work, bytes, time and memory, then the matrices by shape."""
    c = plan.cost
    table = Table(title="spectra diff --plan (nothing has been computed)", title_justify="left", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("matrices to analyse", f"{plan.matrices:,} (from {plan.tensors:,} tensor pairs)")
    table.add_row("bytes to read (both checkpoints)", fmt_bytes(plan.read_bytes))
    table.add_row("ranks", str(plan.world_size))
    table.add_row("estimated time", f"{fmt_seconds(plan.seconds)} (slowest rank: read+ΔW {fmt_seconds(plan.io_seconds)}, "
                                    f"decompositions {fmt_seconds(plan.compute_seconds)})")
    table.add_row("estimated peak memory, host", f"{fmt_bytes(plan.baseline_bytes + plan.host_bytes)} "
                                                 f"(process now {fmt_bytes(plan.baseline_bytes)} + data {fmt_bytes(plan.host_bytes)})")
    if plan.device_bytes:
        table.add_row("estimated peak memory, GPU", fmt_bytes(plan.device_bytes))
    rates = (f"SVD {c.svd_rate / 1e9:.2f} G m·n·p/s" if c.method == "svd" and c.svd_rate else
             f"Gram {c.gram_rate / 1e9:.1f} G mult-adds/s, eigensolve {c.eig_rate / 1e9:.2f} G p³/s")
    table.add_row("calibration", f"{c.device}, {c.precision}: {rates}, read+ΔW {c.io_rate / 1e6:.0f} MB/s")
    print_table(console, table)
    shapes = Table(title="matrices by shape (out × in)", title_justify="left")
    for col in ("shape", "count", "est. s / matrix"):
        shapes.add_column(col, justify="right")
    for shape, n in sorted(plan.shapes.items(), key=lambda kv: -kv[1] * c.matrix_seconds(kv[0])):
        shapes.add_row(f"{shape[0]}×{shape[1]}", str(n), f"{c.matrix_seconds(shape):.3g}")
    console.print(shapes)
    for note in plan.notes:
        console.print(f"note: {shown(note)}")


def _summary_table(result: spectra.DiffResult) -> Table:
    """One row per module kind: medians of the rank needed, its fraction of p, the random baseline and
    the relative norm (:meth:`spectra.DiffResult.summary_records`)."""
    tau = result.headline_threshold
    key = str(float(tau))
    table = Table(title=f"Rank needed for {tau_percent(tau)} of ΔW's energy, median per module kind", title_justify="left")
    lora = any(m.lora_r is not None for m in result.modules)
    for col, just in (("module", "left"), ("n", "right"), ("p", "right"), *((("LoRA r", "right"),) if lora else ()),
                      (f"rank[{key}]", "right"), ("/ p", "right"), ("random / p", "right"), ("‖ΔW‖/‖W‖", "right")):
        table.add_column(col, justify=just)
    # a kind holding a sketched matrix (approximate mode): its rank is an estimate, marked so (the warning says more)
    approx = {m.module for m in result.modules if m.method.startswith("approx")}
    for r in result.summary_records(tau):
        est = "≈" if r["module"] in approx else ""
        table.add_row(
            cell(r["module"]), count_text(r), f"{r['p']:g}",
            *((range_text(r["lora_r_range"]),) if lora else ()),
            f"{est}{r['energy_rank']:g}", f"{est}{r['energy_rank_frac']:.3f}",
            f"{r['random_frac']:.3f}", "–" if r["rel_norm"] is None else f"{r['rel_norm']:.3g}",
        )
    return table
