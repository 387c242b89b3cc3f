"""``spectra interfere``: how several fine-tunes of one base collide, pair by pair and all together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

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

if TYPE_CHECKING:
    from spectra.interfere import InterfereResult


@click.command("interfere", short_help="Interference between several fine-tunes of one base (adapters or full).")
@click.argument("tuned", nargs=-1, required=True)
@click.option("--base", required=True, help="The base model every fine-tune started from.")
@click.option("--out", "-o", "out_dir", type=OutPath(file_okay=False), default=None,
              help="Folder for interfere.json, interfere.csv and the heatmaps (default: no files).")
@click.option("--top-k", default=16, show_default=True, type=click.IntRange(min=1),
              help="Singular triplets per update for φ, captured energy, TSV and KnOTS (a LoRA of smaller rank is used whole).")
@click.option("--side", type=click.Choice(["left", "right"]), default="right", show_default=True,
              help="Singular vectors φ compares (Hu et al. compared the right ones).")
@click.option("--include", multiple=True, callback=one_pattern,
              help="Regex on base matrix names to keep.")
@click.option("--exclude", multiple=True, callback=one_pattern,
              help="Regex on base matrix names to leave out.")
@click.option("--layers", default=None, help="Layer selection such as '0-3,7'.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dense-memory", type=click.IntRange(min=1), default=1024, show_default=True, metavar="MIB",
              help="Most MiB of full-checkpoint updates held at once per matrix (beyond it tensors are read again).")
@click.option("--json", "as_json", is_flag=True, help="Print interfere.json to stdout instead of the tables.")
@click.option("--no-plots", is_flag=True, help="Do not write the heatmaps.")
@click.option("--allow-identical", is_flag=True,
              help="Exit 0 even when fewer than two tasks change any compared matrix (no pair measured).")
@click.option("--report", "report", is_flag=True, help="Also write OUT/report.html (needs --out).")
@click.option("--resume", is_flag=True, help="Finish an interrupted run in --out from its journal (same inputs and options).")
def interfere_cmd(tuned, base, out_dir, top_k, side, include, exclude, layers, device, dense_memory, as_json, no_plots,
                  report, resume, allow_identical=False) -> None:
    """Interference between fine-tunes T1 T2 … Tn of BASE (PEFT LoRA adapters or full checkpoints).

    Per matrix every task holds: for each pair, the cosine of the flattened updates, φ of their
    top-k subspaces, the energy one update holds in the other's subspaces, the Task Singular Vectors
    interference and the KnOTS alignment; over all n, the TSV interference, the KnOTS shared basis
    and the spectrum of the summed update against the parts. Definitions: README, "Several fine-tunes".
    Exit 3 (results still written) when fewer than two tasks change any compared matrix: no pair is measured.
    """
    from spectra.interfere import InterfereConfig, interfere

    if len(tuned) < 2:
        raise click.UsageError("give two or more fine-tunes: spectra interfere --base BASE T1 T2 [T3 ...]")
    if report and not out_dir:
        raise click.UsageError("--report writes OUT/report.html: give --out DIR as well")
    if resume and not out_dir:
        raise click.UsageError("--resume finishes the run journaled in --out DIR: give --out DIR as well")
    from spectra.io.files import folder_lock

    # the whole command, results and --report alike: a second run into the same folder is refused at its start
    click.get_current_context().with_resource(folder_lock(out_dir))
    config = InterfereConfig(top_k=top_k, side=side, include=include, exclude=exclude, layers=layers, device=device,
                             max_dense_bytes=dense_memory << 20)
    err = stderr()
    progress = progress_bar(err)
    task_id = None

    def on_module(done: int, total: int, name: str) -> None:
        nonlocal task_id
        if task_id is None:
            task_id = progress.add_task("interference", total=total, current="")
        progress.update(task_id, completed=done, current=short_name(name))

    from spectra.report import shared_report

    rebuild = bool(out_dir) and not report and shared_report(out_dir, "interfere.json")  # before the run removes it
    with progress:
        result = interfere(base, list(tuned), config=config, out_dir=out_dir, callback=on_module, plots=not no_plots,
                           resume=resume)
    doc = result.to_dict()
    if as_json:
        echo_json(json.dumps(doc, indent=1, ensure_ascii=False))
    else:
        out = stdout()
        for key, label in (("cosine", "cosine of the flattened updates"), ("phi", f"φ of the top-k subspaces ({side})"),
                           ("tsv", "TSV interference, bounded form (1: identical)")):
            print_table(out, _pair_table(doc, key, label))
            if not (doc.get("summary") or {}).get(key) and doc["modules"]:  # an empty grid says why, not nothing
                out.print(f"({shown(label)}: undefined in every matrix: no two tasks have it there; an update that is "
                          "exactly zero, or entirely at the rounding level of its stored weights, has no direction: see "
                          "the warnings)", highlight=False)
        print_table(out, _module_table(doc))
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {shown(w)}", highlight=False)
    err.print(f"{len(result.modules)} matrices compared in {result.elapsed_s:.1f} s on {result.device}; "
              f"{len(result.partial)} held by some tasks only, {len(result.skipped)} skipped", highlight=False)
    if out_dir:
        err.print(f"results: {shown(str(Path(out_dir) / 'interfere.json'))}", highlight=False)
    if report or rebuild:  # rebuild: the folder's report also showed another command's results
        folder_report(err, out_dir, "interfere.json")
    if not result.modules and result.skipped:  # nothing measured: not a success, whatever was written
        from spectra.errors import PairingError

        first = result.skipped[0]
        raise PairingError(f"no matrix could be compared: all {len(result.skipped)} were skipped, e.g. {first['name']}: "
                           f"{first['reason']}", hint="the reasons are listed in interfere.json (skipped)" if out_dir else None)
    if not allow_identical:
        raise_if_unmeasured(result, out_dir)


def raise_if_unmeasured(result: InterfereResult, out_dir: str | None) -> None:
    """Raise :class:`spectra.errors.IdenticalCheckpointsError` (exit 3, as ``diff`` for identical checkpoints)
    when matrices were compared but fewer than two tasks have a non-zero update on any of them: no pair of
    tasks was measured, every pairwise number is null."""
    from spectra.errors import IdenticalCheckpointsError
    from spectra.interfere_summary import changed_tasks, skips_of
    from spectra.selection import unmeasured_clause

    live = changed_tasks(result)
    if not result.modules or len(live) >= 2:
        return
    idle = [i for i in range(len(result.tasks)) if i not in live]
    who = ", ".join(result.names[i] for i in idle)
    raise IdenticalCheckpointsError(
        ("ΔW = 0 on the one compared matrix for " if len(result.modules) == 1 else
         f"ΔW = 0 on every one of the {len(result.modules)} compared matrices for ")
        + (f"{who}: only {result.names[live[0]]} changed {'it' if len(result.modules) == 1 else 'any'}" if live
           else f"every task ({who})")
        + ", so no pair of tasks was measured" + unmeasured_clause(skips_of(result, idle)),
        path=", ".join(dict.fromkeys(result.tasks[i] for i in idle)),
        hint=identical_hint(out_dir))


def _pair_table(doc: dict, key: str, label: str) -> Table:
    from spectra.interfere_summary import over_matrices

    names = doc["names"]
    m = (doc.get("summary") or {}).get(key) or []
    table = Table(title=f"{label}, {over_matrices(doc['summary'])}", title_justify="left")
    table.add_column("")
    for n in names:
        table.add_column(cell(n), justify="right")
    for i, row in enumerate(m):
        table.add_row(cell(names[i]), *("–" if v is None else f"{v:.3f}" for v in row))
    return table


def _module_table(doc: dict) -> Table:
    from spectra.roles import role_sort_key

    table = Table(title=f"All {len(doc['names'])} together, median per module", title_justify="left")
    for col in ("module", "n", "TSV (ℓ1)", "TSV (bounded)", "σ₁ sum / max", "‖sum‖² / Σ‖·‖²", "nuclear sum / Σ"):
        table.add_column(col, justify="left" if col == "module" else "right")
    kinds: dict[str, list[dict]] = {}
    for m in doc["modules"]:
        kinds.setdefault(m["module"], []).append(m)

    def med(values: list) -> str:
        vals = sorted(v for v in values if v is not None)
        if not vals:
            return "–"
        mid = len(vals) // 2
        return f"{(vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2):.3f}"

    for kind in sorted(kinds, key=lambda k: role_sort_key(kinds[k][0].get("role"), k)):
        ms = kinds[kind]
        table.add_row(cell(kind), str(len(ms)), med([m["tsv"]["relative"] for m in ms]),
                      med([m["tsv"].get("relative_fro") for m in ms]), med([m["sum"]["spectral_over_max"] for m in ms]),
                      med([m["sum"]["fro_sq_ratio"] for m in ms]), med([m["sum"]["nuclear_ratio"] for m in ms]))
    return table
