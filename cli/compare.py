"""``spectra compare``: how two updates of one base relate: the table, its legend and the findings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from spectra.compare_findings import compare_findings, headline_side, table_legend
from spectra.display import display_name
from spectra_cli.console import (
    OutPath,
    cell,
    echo_json,
    folder_report,
    identical_hint,
    one_pattern,
    print_explanation,
    print_table,
    progress_bar,
    short_name,
    shown,
    stderr,
    stdout,
)

if TYPE_CHECKING:
    from spectra.compare_records import CompareResult

#: Shown by ``spectra compare --explain`` after the columns.
EXPLAIN_EPILOG = ("Definitions of every measure, with formulas and sources: docs/definitions.md in the spectra "
                  "repository (\"Subspaces\"). The findings under the table say in words what the numbers show.")


def _explain(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--explain``: print the legend of the table's columns and stop (no input needed)."""
    if not value or ctx.resilient_parsing:
        return
    print_explanation(ctx, "Columns of the table spectra compare prints (one row per module both A and B update):",
                      table_legend("right", with_base=True),
                      ["With --side left, φ is computed on the left (output-space) singular vectors instead.", EXPLAIN_EPILOG])


@click.command("compare", short_help="How two updates of one base relate: φ, angles, captured energy, amplification, intruders.")
@click.argument("a")
@click.argument("b")
@click.option("--base", default=None,
              help="The base model both were tuned from (needed for full checkpoints, DoRA, amplification and intruders).")
@click.option("--out", "-o", "out_dir", type=OutPath(file_okay=False), default=None,
              help="Folder for compare.json, compare.csv and the plots (default: no files).")
@click.option("--side", type=click.Choice(["left", "right", "both"]), default="right", show_default=True,
              help="Singular vectors compared: right (input space; Hu et al. used the right ones of LoRA's A), left, or both.")
@click.option("--top-k", default=64, show_default=True, type=click.IntRange(min=1),
              help="Subspace rank taken from a full (non-LoRA) update.")
@click.option("--include", multiple=True, callback=one_pattern,
              help="Regex: compare only modules whose base tensor name matches.")
@click.option("--exclude", multiple=True, callback=one_pattern,
              help="Regex: leave out modules whose base tensor name matches.")
@click.option("--layers", default=None,
              help="Layer selection such as '0-3,7,10-' (drops embeddings and head, also from the only-in-A/B lists).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json to stdout instead of the table.")
@click.option("--no-plots", is_flag=True, help="Do not write the figures (captured energy, φ grids, angles, intruders).")
@click.option("--report", "report", is_flag=True, help="Also write OUT/report.html (needs --out).")
@click.option("--allow-identical", is_flag=True,
              help="Exit 0 even when A's or B's update is exactly zero on every compared module (nothing compared).")
@click.option("--resume", is_flag=True, help="Finish an interrupted run in --out from its journal (same inputs and options).")
@click.option("--explain", is_flag=True, is_eager=True, expose_value=False, callback=_explain,
              help="Print what each column of the table means, and exit.")
def compare_cmd(a, b, base, out_dir, side, top_k, include, exclude, layers, device, as_json, no_plots, report, resume,
                allow_identical=False) -> None:
    """How two updates of one base relate: φ grids, principal angles, captured energy,
    amplification and intruder dimensions (definitions: docs/definitions.md, "Subspaces").

    A and B are each a PEFT LoRA adapter folder or a full fine-tuned checkpoint (then --base is
    required). Prints one row per module both update, a legend, and the findings in words
    (how much of B the subspaces of A hold against the best possible and random, whether φ is
    above chance, amplification and intruders). --explain defines every column. Exit 3 (results
    still written) when A's or B's update is exactly zero on every compared module.
    """
    from spectra.comparison import compare
    from spectra.config import CompareConfig

    if report and not out_dir:
        raise click.UsageError("--report writes OUT/report.html: give --out DIR as well")
    if resume and not out_dir:
        raise click.UsageError("--resume finishes the run journaled in --out DIR: give --out DIR as well")
    from spectra.io.files import folder_lock

    # the whole command, results and --report alike: a second run into the same folder is refused at its start
    click.get_current_context().with_resource(folder_lock(out_dir))
    config = CompareConfig(side=side, top_k=top_k, include=include, exclude=exclude, layers=layers, device=device)
    err = stderr()
    progress = progress_bar(err)
    task_id = None

    def on_module(done: int, total: int, name: str) -> None:
        nonlocal task_id
        if task_id is None:
            task_id = progress.add_task("subspaces", total=total, current="")
        progress.update(task_id, completed=done, current=short_name(name))

    from spectra.report import shared_report

    rebuild = bool(out_dir) and not report and shared_report(out_dir, "compare.json")  # before the run removes it
    with progress:
        result = compare(a, b, base=base, config=config, out_dir=out_dir, callback=on_module, plots=not no_plots, resume=resume)
    found = compare_findings(result)
    if as_json:
        echo_json(result.to_json())
    else:
        out = stdout()
        print_table(out, compare_table(result))
        out.print(short_legend(result), style="dim", highlight=False)
        plain = [f for f in found if not f.warning]
        if plain:
            out.print("[bold]Findings[/]")
            for f in plain:
                out.print(f"  • {shown(f.text)}", highlight=False)
    err.print(f"{len(result.modules)} modules compared in {result.elapsed_s:.1f} s on {shown(result.device or '?')}; "
              f"{len(result.skipped)} skipped, {len(result.a_only)} held only by A, {len(result.b_only)} only by B", highlight=False)
    if out_dir:
        err.print(f"results: {shown(display_name(str(Path(out_dir) / 'compare.json'), None))}", highlight=False)
    if report or rebuild:  # rebuild: the folder's report also showed another command's results
        folder_report(err, out_dir, "compare.json")
    for f in found:
        if f.warning:
            err.print(f"[yellow]warning:[/] {shown(f.text)}", highlight=False)
    if not result.modules and result.skipped:  # nothing measured: not a success, whatever was written
        from spectra.errors import PairingError

        first = result.skipped[0]
        raise PairingError(f"no module could be compared: all {len(result.skipped)} were skipped, e.g. {first['name']}: "
                           f"{first['reason']}", hint="the reasons are listed in compare.json (skipped)" if out_dir else None)
    if not allow_identical:
        raise_if_zero_side(result, out_dir)


def raise_if_zero_side(result: CompareResult, out_dir: str | None) -> None:
    """Raise :class:`spectra.errors.IdenticalCheckpointsError` (exit 3, as ``diff`` for identical checkpoints)
    when modules were compared but A's or B's update is exactly zero (‖ΔW‖_F = 0) on every one of them:
    a zero update has no direction, so every measure is null and nothing was compared."""
    from spectra.errors import IdenticalCheckpointsError

    zero = [(w, path) for w, path, key in (("A", result.a, "fro_a"), ("B", result.b, "fro_b"))
            if result.modules and all(getattr(m, key) == 0 for m in result.modules)]
    if not zero:
        return
    raise IdenticalCheckpointsError(
        f"ΔW of {' and '.join(w for w, _ in zero)} is exactly zero on "
        + ("the one compared module" if len(result.modules) == 1 else f"every one of the {len(result.modules)} compared modules")
        + " (a copy of the base, or a LoRA saved at initialisation with B = 0): nothing could be compared",
        path=", ".join(dict.fromkeys(str(path) for _, path in zero)),
        hint=identical_hint(out_dir, "checkpoint"))


def short_legend(result) -> str:
    """The lines under the table (``--explain`` says more)."""
    side = headline_side(result)
    with_base = any(m.amplification is not None for m in result.modules)
    text = (f"r = subspace rank; φ({side}) = overlap of A's and B's top {side} singular vectors (1 same span, 0 orthogonal), "
            "random = φ of unrelated random subspaces; B in A = share of B's energy inside A's subspaces, best r_A = the most "
            "any rank-r_A subspace could hold, A in B = the reverse")
    if with_base:
        text += "; amp = amplification ‖ΔW‖/‖U_rᵀWV_r‖; intr = intruder dimensions of W + ΔW"
    return text + ("; – = undefined (an update that is exactly zero, or entirely at the rounding level of its stored "
                   "weights). spectra compare --explain defines each column.")


def _f(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


#: Above this many modules the table gives each module kind's medians (every module's row is in compare.csv):
#: a row per module of a 70B model (560) would bury the findings, and at 50 000 took a minute to print.
MAX_MODULE_ROWS = 64


def _values(m, side: str, with_base: bool) -> list[float | None]:
    """One module's numbers in the table's column order after the name and layer."""
    ph, b_in_a, a_in_b = m.phi.get(side), m.captured.get("b_in_a"), m.captured.get("a_in_b")
    row = [m.rank_a, m.rank_b, ph and ph.phi_full, ph and ph.random, b_in_a and b_in_a.two_sided,
           b_in_a and b_in_a.best_rank_r, a_in_b and a_in_b.two_sided]
    if with_base:
        amp, intr = m.amplification or {}, m.intruders or {}
        row += [amp.get(w) and amp[w].factor for w in ("a", "b")] + [intr.get(w) and intr[w].count for w in ("a", "b")]
    return [None if v is None else float(v) for v in row]


def compare_table(result) -> Table:
    """One row per compared module (measures that are undefined shown as –), or, above
    :data:`MAX_MODULE_ROWS` modules, one per module kind with the medians of its modules' defined values."""
    import statistics

    from spectra.roles import role_sort_key

    side = headline_side(result)
    with_base = any(m.amplification is not None for m in result.modules)
    per_kind = len(result.modules) > MAX_MODULE_ROWS
    title = f"A = {display_name(result.a)} ({result.kinds['a']}), B = {display_name(result.b)} ({result.kinds['b']})"
    if per_kind:
        title += f"; median per module kind over {len(result.modules)} modules (each module: compare.csv)"
    table = Table(title=shown(title), title_justify="left")
    cols = ["module", "n" if per_kind else "layer", "r_A", "r_B", f"φ({side})", "random", "B in A", "best r_A", "A in B"]
    if with_base:
        cols += ["amp A", "amp B", "intr A", "intr B"]
    for c in cols:
        table.add_column(c, justify="left" if c == "module" else "right")
    specs = [".0f", ".0f", ".3f", ".3f", ".3f", ".3f", ".3f"] + ([".2f", ".2f", ".0f", ".0f"] if with_base else [])
    if not per_kind:
        rows = [(m.module, "" if m.layer is None else str(m.layer), _values(m, side, with_base)) for m in result.modules]
    else:
        kinds: dict[str, list] = {}
        for m in result.modules:
            kinds.setdefault(m.module, []).append(m)
        order = sorted(kinds, key=lambda k: role_sort_key(kinds[k][0].role, k))
        rows = []
        for kind in order:
            cells = list(zip(*(_values(m, side, with_base) for m in kinds[kind])))
            rows.append((kind, str(len(kinds[kind])), [statistics.median(d) if (d := [v for v in c if v is not None]) else None
                                                        for c in cells]))
    for name, second, values in rows:
        # a median of counts can fall between two (2.5): shown as it is, not rounded to an even neighbour
        cells = [_f(v, ".1f" if spec == ".0f" and v is not None and v % 1 else spec) for v, spec in zip(values, specs)]
        table.add_row(cell(name), second, *cells)
    return table
