"""``spectra report`` and ``spectra inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from spectra.display import display_name
from spectra_cli.console import OutPath, echo_json, shown, stderr, stdout


@click.command("report", short_help="One self-contained HTML page from the results of any command (or folders of them).")
@click.argument("results", nargs=-1, required=True)
@click.option("--out", "-o", "out_path", default="report.html", show_default=True, type=OutPath(dir_okay=False),
              help="The HTML file to write.")
@click.option("--title", default="spectra report", show_default=True, help="The page's title and heading.")
def report_cmd(results, out_path, title) -> None:
    """One self-contained HTML report (no network) from the results of any command: results.json
    (diff), compare.json, esd.json, extract.json, interfere.json, trace.json or a tracker's
    trace.jsonl, train_log.jsonl; or folders holding them (e.g. reports/demo).

    It opens with the warnings that change how the numbers read and the findings of each input in
    words, then an overview, then each input's figures and tables with legends. A file that is not
    what spectra writes (edited, merged, truncated) is refused with one line naming it.
    """
    from spectra.report import write_report

    if not out_path.strip():
        raise click.BadParameter("must name a file", param_hint="--out")
    if not title.strip():
        raise click.BadParameter("must not be empty (the page's title and heading)", param_hint="--title")
    path = write_report(list(results), out_path, title=title)
    stderr().print(shown(f"report: {display_name(str(path), None)}"), highlight=False)


#: Above this many rows `spectra inspect` prints tab-separated lines instead of a boxed table.
PLAIN_ROWS = 2000


@click.command("inspect", short_help="List a checkpoint's matrices with the layer, module, role and split spectra gives them.")
@click.argument("path")
@click.option("--all", "show_all", is_flag=True, help="Also list 1-D and non-float tensors.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
def inspect_cmd(path, show_all, as_json) -> None:
    """List a checkpoint's matrices with their layer, module, role, shape and dtype.

    The quick way to see how spectra understood an architecture: fused matrices show the parts
    they will be split into, and transposed (Conv1D) storage is marked. Rows are in model order:
    embeddings, then layers 0, 1, 2 … by number (each in q, k, v, o, gate, up, down order), then
    the rest.
    """
    from spectra.adapter_files import adapter_file
    from spectra.inspection import inspect_checkpoint
    from spectra.io.adapter import is_adapter
    from spectra.io.checkpoint import open_checkpoint

    if is_adapter(Path(path)):  # what the adapter updates, as diff will read it
        _inspect_adapter(path, as_json)
        return
    ckpt = open_checkpoint(path)
    records = inspect_checkpoint(ckpt, include_non_matrices=show_all)
    if found := adapter_file(ckpt.tensors):  # listed as stored; the folder (or the merged model) shows the updates they make
        stderr().print(f"[yellow]warning:[/] {shown(f'{path} {found.message}; listed as stored: {found.hint}')}",
                       highlight=False, soft_wrap=True)
    if as_json:
        echo_json(json.dumps(records, indent=1, ensure_ascii=False))
        for note in ckpt.notes:  # stdout stays pure JSON; how the checkpoint was read still goes to stderr
            stderr().print(f"[yellow]warning:[/] {shown(note)}", highlight=False)
        return
    cols = ("name", "layer", "expert", "module", "role", "shape", "dtype", "parts", "note")
    rows = [(display_name(r["name"], 200), "" if r["layer"] is None else str(r["layer"]),
             "" if r["expert"] is None else str(r["expert"]), display_name(r["module"] or "", 80), r["role"] or "",
             "×".join(map(str, r["shape"])), display_name(r["dtype"], 40),
             ",".join(display_name(p, 20) for p in r["parts"]) + (" (T)" if r["transpose"] else ""),
             display_name(r["note"], 400)) for r in records]
    if len(rows) > PLAIN_ROWS:  # a boxed table lays out every row (~0.6 ms each: a minute for 100k MoE tensors)
        click.echo("\t".join(cols))
        click.echo("\n".join("\t".join(row) for row in rows))
    else:
        table = Table(title=shown(display_name(str(path), None)), title_justify="left")
        for col in cols:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*map(shown, row))
        stdout().print(table)
    hidden = len(ckpt.tensors) - len(records)
    stderr().print(f"{sum(1 for r in records if r['module'])} matrices, {len(records)} tensors listed"
                   + (f" ({hidden} more, not matrices spectra analyses: --all lists them)" if hidden else ""), highlight=False)
    for note in ckpt.notes:  # which weight set of a folder was read
        stderr().print(f"[yellow]warning:[/] {shown(note)}", highlight=False)


def _inspect_adapter(path: str, as_json: bool) -> None:
    from spectra.inspection import inspect_adapter

    records, notes = inspect_adapter(path)
    if as_json:
        echo_json(json.dumps(records, indent=1, ensure_ascii=False))
    else:
        cols = ("name", "layer", "expert", "module", "role", "update (out×in)", "r", "alpha", "scale", "note")
        table = Table(title=shown(display_name(str(path), None) + " (PEFT adapter)"), title_justify="left")
        for col in cols:
            table.add_column(col, overflow="fold")
        for r in records:
            table.add_row(*map(shown, (display_name(r["name"], 200), "" if r["layer"] is None else str(r["layer"]),
                                       "" if r["expert"] is None else str(r["expert"]), display_name(r["module"] or "", 80),
                                       r["role"] or "", "×".join(map(str, r["shape"])), str(r["r"]), f"{r['lora_alpha']:g}",
                                       f"{r['scale']:g}" + (" (DoRA)" if r["dora"] else ""), display_name(r["note"] or "", 400))))
        stdout().print(table)
        stderr().print(f"{len(records)} LoRA modules listed", highlight=False)
    for note in notes:  # tensors that are not LoRA factors, and how the folder was read
        stderr().print(f"[yellow]note:[/] {shown(display_name(note, 400))}", highlight=False)
