"""``spectra esd``: WeightWatcher's heavy-tailed metrics (α, α-hat, norms, MP fit) of every matrix of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from spectra.display import counted, matrices
from spectra_cli.console import OutPath, cell, echo_json, folder_report, one_pattern, print_table, progress_bar, short_name, shown, stderr, stdout


@click.command("esd")
@click.argument("model")
@click.option("--out", "-o", "out_dir", type=OutPath(file_okay=False), default=None,
              help="Folder for esd.json, esd.csv, esd.jsonl (journal) and the plots (default: no files).")
@click.option("--json", "as_json", is_flag=True, help="Print esd.json to stdout instead of the table.")
@click.option("--xmin", type=click.Choice(["fit", "peak", "mid"]), default="fit", show_default=True,
              help="Lower end of the power-law tail: the best KS fit (WeightWatcher's default), near the ESD's "
                   "peak, or the median eigenvalue.")
@click.option("--ww-compatible", is_flag=True,
              help="Analyse only what WeightWatcher 0.7.7's analyze() does (module .weight matrices with "
                   "8 <= min(shape) <= 15000 and max(shape) <= 50000), so rows compare one to one (its Conv2d rows "
                   "excepted: 4-D kernels are no matrices here).")
@click.option("--split", "split_fused", is_flag=True,
              help="Split fused matrices (qkv_proj, c_attn, gate_up_proj…) into their parts (default: whole, as WeightWatcher).")
@click.option("--include", multiple=True, callback=one_pattern,
              help="Regex: analyse only matrices whose name matches.")
@click.option("--exclude", multiple=True, callback=one_pattern,
              help="Regex: leave out matrices whose name matches (e.g. 'embed|lm_head').")
@click.option("--layers", default=None, help="Layer selection such as '0-3,7,10-' (drops embeddings and head).")
@click.option("--plot-include", multiple=True, callback=one_pattern, metavar="REGEX",
              help="Keep the eigenvalues of matching matrices and plot their log-log ESDs (default: the middle layer's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-memory", type=click.IntRange(min=1), default=None, metavar="MIB",
              help="Memory cap of one batch of equally shaped matrices, MiB (default: 256 on the CPU, 70% of free GPU memory).")
@click.option("--resume", is_flag=True, help="Finish an interrupted run in --out from its journal (same inputs and options).")
@click.option("--no-plots", is_flag=True, help="Do not write alpha_heatmap.png and esd_plots.png.")
@click.option("--report", "report", is_flag=True, help="Also write OUT/report.html (needs --out).")
def esd_cmd(model, out_dir, as_json, xmin, ww_compatible, split_fused, include, exclude, layers, plot_include, device,
            batch_memory, resume, no_plots, report) -> None:
    """Power-law exponent α of each matrix's eigenvalue spectrum (WeightWatcher's fit) and the metrics
    beside it, for every matrix of MODEL.

    MODEL is a .safetensors file, a model folder (sharded or not), a .bin/.pt state dict, an index
    file, or an org/name entry of the local Hugging Face cache. Eigenvalues are λ = σ² of each
    (out, in) weight, not divided by N, as WeightWatcher. α < 2 is flagged over-trained, α > 6
    under-trained.
    """
    from spectra.errors import ConfigError
    from spectra.esd_run import EsdConfig, EsdEvent, esd

    if out_dir is not None and not out_dir.strip():
        raise ConfigError(f"--out must name a folder. Got {out_dir!r} instead",
                          hint="pass --out DIR; --out . writes into the current folder")
    if report and not out_dir:
        raise click.UsageError("--report writes OUT/report.html: give --out DIR as well")
    if resume and not out_dir:
        raise click.UsageError("--resume finishes the run journaled in --out DIR: give --out DIR as well")
    config = EsdConfig(xmin=xmin, ww_compatible=ww_compatible, split_fused=split_fused, include=include, exclude=exclude,
                       layers=layers, plot_include=plot_include, device=device,
                       max_batch_bytes=batch_memory << 20 if batch_memory else None)
    err = stderr()
    if plot_include is not None and not report and (no_plots or not out_dir):
        # it picks the matrices esd_plots.png (and the report) draw: with neither, at most their eigenvalues are kept
        why = "with --no-plots" if no_plots else "without --out"
        kept = "esd.json" if out_dir else "the JSON printed" if as_json else None
        err.print("[yellow]warning:[/] " + (f"--plot-include plots nothing {why}: it only keeps the matching matrices' "
                                            f"eigenvalues in {kept}" if kept else f"--plot-include has no effect {why}"),
                  highlight=False)
    progress = progress_bar(err)
    task_id = None

    def on_event(ev: EsdEvent) -> None:
        nonlocal task_id
        if task_id is None:
            task_id = progress.add_task("ESD fits", total=ev.total, current="")
        current = ev.record.name if ev.record else ev.skipped["name"]
        progress.update(task_id, completed=ev.done, current=short_name(current))
        if ev.skipped is not None:
            progress.console.print(f"[yellow]warning:[/] {shown(ev.skipped['name'])}: {shown(ev.skipped['reason'])}", highlight=False)

    from spectra.report import shared_report

    rebuild = bool(out_dir) and not report and shared_report(out_dir, "esd.json")  # before the run removes it
    with progress:
        result = esd(model, config=config, out_dir=out_dir, callback=on_event, resume=resume, plots=not no_plots)
    if as_json:
        echo_json(result.to_json())
    else:
        print_table(stdout(), _summary_table(result))
    over = sum(m["warning"] == "over-trained" for m in result.matrices)
    under = sum(m["warning"] == "under-trained" for m in result.matrices)
    err.print(f"{matrices(len(result.matrices))} in {result.elapsed_s:.1f} s on {result.device}; {over} over-trained "
              f"(α < 2), {under} under-trained (α > 6); {counted(len(result.skipped), 'tensor')} skipped", highlight=False)
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {shown(w)}", highlight=False)
    if out_dir:
        err.print(f"results: {shown(str(Path(out_dir) / 'esd.json'))}", highlight=False)
    if report or rebuild:  # rebuild: the folder's report also showed another command's results
        folder_report(err, out_dir, "esd.json")
    if not result.matrices and result.skipped:  # nothing analysed: not a success, whatever was written
        from spectra.errors import PairingError

        first = next((s for s in result.skipped if not s["reason"].startswith("1-D")), result.skipped[0])
        raise PairingError(f"no matrix could be analysed: all {len(result.skipped)} tensors were skipped, e.g. {first['name']}: "
                           f"{first['reason']}", hint="the reasons are listed in esd.json (skipped)" if out_dir else None)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _summary_table(result) -> Table:
    from spectra.esd import alpha_text  # the digits that keep α on its side of 2 and 6, as its flag
    from spectra.roles import role_sort_key

    table = Table(title=shown(f"Power-law exponent α per module: {result.model} (xmin: {result.config.get('xmin')})"),
                  title_justify="left")
    for col in ("module", "n", "fitted", "α median", "α min", "α max", "D median", "α<2", "α>6"):
        table.add_column(col, justify="left" if col == "module" else "right")
    rows = sorted(result.summary(), key=lambda r: role_sort_key(r["role"], r["module"]))
    for r in rows:
        table.add_row(cell(r["module"]), str(r["count"]), str(r["fitted"]), alpha_text(r["alpha_median"]),
                      alpha_text(r["alpha_min"]), alpha_text(r["alpha_max"]), _fmt(r["D_median"], ".3f"), str(r["over_trained"]),
                      str(r["under_trained"]))
    return table
