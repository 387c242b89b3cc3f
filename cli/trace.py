"""``spectra trace``: how ΔW's rank, size and directions evolve over a training run's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from spectra.display import counted
from spectra_cli.console import (
    OutPath,
    cell,
    echo_json,
    folder_report,
    identical_hint,
    one_pattern,
    print_table,
    progress_bar,
    short_name,
    shown,
    stderr,
    stdout,
)

if TYPE_CHECKING:  # (spectra.trace imports torch: only when the command runs)
    from spectra.trace import TraceResult


@click.command("trace")
@click.argument("base")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--out", "-o", "out_dir", type=OutPath(file_okay=False), default=None,
              help="Folder for trace.json, trace.csv, the journal and the plots (default: no files).")
@click.option("--threshold", "-t", "thresholds", type=float, multiple=True,
              help="Energy-rank threshold τ in (0, 1]; repeatable. Default: 0.5 0.9 0.99.")
@click.option("--top-k", default=8, show_default=True, type=click.IntRange(min=1),
              help="Rank of the subspaces compared between checkpoints (a LoRA of smaller rank is compared whole).")
@click.option("--alpha", is_flag=True,
              help="Also fit WeightWatcher's power-law α to each checkpoint's weights (full checkpoints; slower).")
@click.option("--include", multiple=True, callback=one_pattern,
              help="Regex: trace only matrices whose name matches.")
@click.option("--exclude", multiple=True, callback=one_pattern,
              help="Regex: leave out matrices whose name matches (e.g. 'embed|lm_head').")
@click.option("--layers", default=None, help="Layer selection such as '0-3,7,10-' (drops embeddings and head).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Finish an interrupted trace in --out from its journal (same inputs and options), "
              "or add the checkpoints a run saved since (the traced ones kept).")
@click.option("--json", "as_json", is_flag=True, help="Print trace.json to stdout instead of the table.")
@click.option("--no-plots", is_flag=True, help="Do not write the figures.")
@click.option("--report", "report", is_flag=True, help="Also write OUT/report.html (needs --out).")
@click.option("--allow-identical", is_flag=True, help="Exit 0 even when every ΔW is exactly zero at every checkpoint.")
def trace_cmd(base, checkpoints, out_dir, thresholds, top_k, alpha, include, exclude, layers, device, resume, as_json,
              no_plots, report, allow_identical=False) -> None:
    """Trace ΔW = W_step − BASE over a training run.

    CHECKPOINTS is one run folder holding Hugging Face Trainer checkpoint-N folders (full models or
    PEFT adapters; steps and losses from their trainer_state.json), or two or more checkpoints in
    order. Per matrix and checkpoint: energy ranks, ‖ΔW‖ and ‖ΔW‖/‖W_base‖, σ₁/σ₂, stable and
    effective rank (LoRA: against r), and how far the top-k singular subspaces turned since the
    previous and the first checkpoint. A checkpoint still being written is left out with the reason.
    Exit 3 (results still written) when ΔW is exactly zero for every matrix at every checkpoint.
    """
    from spectra.display import matrices
    from spectra.trace import TraceConfig, jsonable, trace

    if report and not out_dir:
        raise click.UsageError("--report writes OUT/report.html: give --out DIR as well")
    if resume and not out_dir:
        raise click.UsageError("--resume finishes the trace journaled in --out DIR: give --out DIR as well")
    config = TraceConfig(**({"thresholds": tuple(thresholds)} if thresholds else {}), top_k=top_k, alpha=alpha, include=include,
                         exclude=exclude, layers=layers, device=device)
    err = stderr()
    progress = progress_bar(err)
    task_id = None

    def on_progress(done: int, total: int, what: str) -> None:
        nonlocal task_id
        if task_id is None:
            task_id = progress.add_task("trace", total=total, current="")
        progress.update(task_id, completed=done, current=short_name(what))

    from spectra.report import shared_report

    rebuild = bool(out_dir) and not report and shared_report(out_dir, "trace.json")  # before the run removes it
    with progress:
        result = trace(base, list(checkpoints), config=config, out_dir=out_dir, callback=on_progress, resume=resume,
                       plots=not no_plots)
    if as_json:
        echo_json(json.dumps(jsonable(result.to_dict()), indent=1, ensure_ascii=False))
    else:
        print_table(stdout(), _summary_table(result))
    for s in result.skipped_checkpoints:
        err.print(f"[yellow]warning:[/] left out {shown(s['path'])}: {shown(s['reason'])}", highlight=False)
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {shown(w)}", highlight=False)
    # a point (one matrix at one checkpoint) is skipped for NaN/Inf or a shape its base does not share
    points = [pt for m in result.matrices for pt in m["points"] if isinstance(pt, dict) and pt.get("skip")]
    skipped_points = f", {len(points)} points (a matrix at one checkpoint) skipped: see 'skip' in trace.json" if points else ""
    nowhere = sum(1 for m in result.matrices if m["points"] and all(isinstance(pt, dict) and pt.get("skip") for pt in m["points"]))
    nowhere_text = f" ({nowhere} of them measured at no checkpoint)" if nowhere else ""
    err.print(f"{matrices(len(result.matrices))}{nowhere_text} over {counted(len(result.checkpoints), 'checkpoint')} in {result.elapsed_s:.1f} s "
              f"on {result.device}; {matrices(len(result.skipped))} skipped{skipped_points}", highlight=False)
    if out_dir:
        err.print(f"results: {shown(str(Path(out_dir) / 'trace.json'))}", highlight=False)
    if report or rebuild:  # rebuild: the folder's report also showed another command's results
        folder_report(err, out_dir, "trace.json")
    if not allow_identical:
        raise_if_unchanged(result, out_dir)


def raise_if_unchanged(result: TraceResult, out_dir: str | None) -> None:
    """Raise :class:`spectra.errors.IdenticalCheckpointsError` (exit 3, as ``diff`` for identical checkpoints) when
    ΔW is exactly zero for every traced matrix at every checkpoint not marked failed: the run has no update to trace
    (a zero at some checkpoints only, such as step 0, is a trace)."""
    from spectra.errors import IdenticalCheckpointsError
    from spectra.trace_checks import unchanged_text

    zero = unchanged_text(result.checkpoints, result.matrices, result.config, result.skipped)
    if zero is None:
        return
    raise IdenticalCheckpointsError(zero, path=result.run or f"{result.base} vs {counted(len(result.checkpoints), 'checkpoint')}",
                                    hint=identical_hint(out_dir))


def _summary_table(result) -> Table:
    """Per module kind: the median energy rank, relative norm and φ with the first checkpoint, at the
    first and the last checkpoint, over the kind's matrices that changed there (n counts all)."""
    from spectra.plots.trace import (
        headline_key,  # a pure helper; matplotlib is imported only when plotting
    )
    from spectra.roles import role_sort_key
    from spectra.trace_inputs import moved

    key = headline_key(result.to_dict())
    steps = [c["step"] for c in result.checkpoints]
    span = (f"at step {steps[0]} (a single checkpoint)" if len(steps) == 1 else
            f"from step {steps[0]} to step {steps[-1]} ({counted(len(steps), 'checkpoint')})")
    table = Table(title=f"ΔW {span}, median per module", title_justify="left")
    for col in ("module", "n", f"rank[{key}] first", "last", "‖ΔW‖/‖W‖ first", "last", "φ with first (last ckpt)"):
        table.add_column(col, justify="left" if col == "module" else "right")
    kinds: dict[str, list[dict]] = {}
    for m in result.matrices:
        kinds.setdefault(m["module"], []).append(m)

    def med(ms: list[dict], i: int, value) -> str:
        vals = sorted(v for m in ms if m["points"] and moved(m["points"][i]) and (v := value(m["points"][i])) is not None)
        if not vals:
            return "–"
        mid = len(vals) // 2
        x = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
        return f"{x:.3g}"

    for kind in sorted(kinds, key=lambda k: role_sort_key(kinds[k][0].get("role"), k)):
        ms = kinds[kind]
        table.add_row(cell(kind), str(len(ms)),
                      med(ms, 0, lambda p: (p.get("energy_rank") or {}).get(key)), med(ms, -1, lambda p: (p.get("energy_rank") or {}).get(key)),
                      med(ms, 0, lambda p: p.get("rel_norm")), med(ms, -1, lambda p: p.get("rel_norm")),
                      med(ms, -1, lambda p: ((p.get("turn_first") or {}).get("right") or {}).get("phi")))
    return table
