"""What every command shares: the consoles (results to stdout, progress and messages to stderr),
the progress bar, number formatting, and quieting transformers during training. No state at module
level: each command makes its consoles when it runs."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import click
from click.core import ParameterSource
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from spectra.display import display_name, printable

#: Longest tensor name shown on a progress line (its start and end kept around "…").
PROGRESS_NAME = 36

EXIT_ERROR = 1
EXIT_IDENTICAL = 3


def identical_hint(out_dir: str | None, what: str = "checkpoints") -> str:
    """The hint of an exit-3 error (nothing measured: the updates are exactly zero), in compare, interfere and trace."""
    return (f"check that you passed the fine-tuned {what}; --allow-identical accepts this"
            + (f"; results were still written to {out_dir}" if out_dir else ""))


def shown(text: object) -> str:
    """``text`` fit for a rich markup string: control characters (a hostile tensor name's or path's ESC, BEL,
    OSC 8 link…) written as escapes, line breaks kept, rich markup escaped. Every line the CLI prints that
    holds a name, a path or a library message goes through it."""
    safe = "\n".join(printable(line) for line in str(text).split("\n"))
    body = safe.rstrip("\\")
    n = len(safe) - len(body)
    if not n:
        return escape(safe)
    # trailing backslashes: rich's escape doubles one (lest it escape a following tag), which then shows
    # doubled unless a tag follows; ending on an empty tag makes the doubled run render as the n written
    return escape(body) + "\\" * (2 * n) + "[dim][/dim]"


#: Narrowest width the consoles draw at: a terminal that reports less (COLUMNS=0 made rich print
#: nothing at all, COLUMNS=1 one character per line) is drawn at 80 columns, which it wraps.
MIN_WIDTH = 20


def _console(stderr: bool) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # a log or a pipe: wide enough that a message stays on one (greppable) line
        return Console(stderr=stderr, highlight=False, width=200)
    if console.width < MIN_WIDTH:
        return Console(stderr=stderr, highlight=False, width=80)
    return console


def stderr() -> Console:
    """Console for progress, warnings and errors; when redirected to a log, wide enough that a
    message stays on one line (greppable) instead of folding at 80 columns."""
    return _console(True)


def stdout() -> Console:
    """Console for results; when piped to a file, wide enough that tensor names do not fold."""
    return _console(False)


#: Characters JSON may leave raw (ensure_ascii=False) that a terminal would act on or cannot encode:
#: DEL, the C1 controls (0x9b is a one-byte CSI on some terminals) and lone surrogates.
_RAW_UNSAFE = re.compile("[\x7f-\x9f\ud800-\udfff]")


def echo_json(text: str) -> None:
    """Print a JSON document on stdout; written with ``\\uXXXX`` escapes instead when it holds
    characters a terminal would interpret (ESC and the other C0 controls JSON always escapes)."""
    if _RAW_UNSAFE.search(text):
        text = json.dumps(json.loads(text), indent=1, ensure_ascii=True)
    click.echo(text)


#: Narrowest a name column may fold to before a table is printed as one block per row instead.
NAME_MIN = 10
#: Longest cell of a column taken for numbers (kept whole); longer ones, or with spaces, fold as text.
NUMBER_MAX = 16


def print_table(console: Console, table: Table) -> None:
    """Print a results table whose numbers are never cut: rich shrinks every column of a table wider
    than the terminal, and "0.87" became "0.…" at 80 columns. Numbers (right-justified columns of
    short one-word cells) keep their full width and names fold onto more lines: in a boxed table,
    else with headers folded at their spaces, else without borders; when even that does not fit, each
    row is printed as a block of ``column: value`` lines, which fits any width."""
    cols = table.columns
    texts = [["" if x is None else (console.render_str(x) if isinstance(x, str) else x).plain for x in c.cells] for c in cols]
    # a number: a right-justified cell of one short word ("0.512", "2–8", "–"); --plan's right column is prose
    numeric = [c.justify == "right" and all(len(t) <= NUMBER_MAX and " " not in t.strip() for t in ts) for c, ts in zip(cols, texts)]
    natural = [max([cell_len(t) for t in ts] + [0]) for ts in texts]
    headers = [str(c.header) for c in cols]
    for boxed, fold in ((True, False), (True, True), (False, False), (False, True)):
        # a header folds at its spaces: then its longest word is the least its column needs
        head = [max([len(w) for w in h.split()] + [0]) if fold else len(h) for h in headers]
        need = [max(h, n if num else min(n, NAME_MIN)) for h, n, num in zip(head, natural, numeric)]
        # boxed: a space each side of a cell, separators and edges; plain: one space between columns
        frame = 3 * len(cols) + 1 if boxed else len(cols)
        if sum(need) + frame > console.width:
            continue
        spare = (console.width - frame - sum(need)) // max(1, numeric.count(False))
        for i, c in enumerate(cols):  # fixed widths: rich shrinks nothing, names share what numbers leave
            c.width = need[i] if numeric[i] else min(max(natural[i], head[i]), need[i] + spare)
            c.overflow = "fold"
        if not boxed:
            table.box, table.padding, table.pad_edge = None, (0, 1, 0, 0), False
        console.print(table)
        return
    if table.title:
        console.print(table.title, highlight=False)
    labels = [" ".join(h.split()) for h in headers]
    for r in range(table.row_count):
        row = [ts[r] for ts in texts]
        console.print(Text(" ".join(t for t, num in zip(row, numeric) if not num), style="bold"), overflow="fold")
        for label, t, num in zip(labels, row, numeric):
            if num:
                console.print(Text(f"  {label + ': ' if label else ''}{t}"), overflow="fold")


def print_explanation(ctx: click.Context, title: str, columns: list[tuple[str, str]], notes: list[str]) -> None:
    """``--explain``: what each column of a command's table means (``title``, then one line per
    ``(column, meaning)``, then ``notes``), as text or, with ``--json``, as a JSON object; then exit 0.
    ``--explain`` is eager (it needs no input), so ``--json`` is looked for in the command's tokens,
    which ``spectra``'s group keeps in ``ctx.meta`` before any option is read."""
    if "--json" in ctx.meta.get("spectra.args", ()):
        echo_json(json.dumps({"title": title, "columns": dict(columns), "notes": notes}, indent=1, ensure_ascii=False))
        ctx.exit(0)
    console = stdout()
    console.print(shown(title), highlight=False)
    width = max((len(name) for name, _ in columns), default=0) + 2
    for name, text in columns:
        console.print(f"  {shown(name):<{width}} {shown(text)}", highlight=False)
    for note in notes:
        console.print(shown(note), highlight=False)
    ctx.exit(0)


def quiet_transformers() -> None:
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


def folder_report(err: Console, out_dir: str, own: str) -> None:
    """Write ``out_dir/report.html`` over every result file in the folder (``own`` first) and say where."""
    from spectra.report import write_folder_report

    written, left_out = write_folder_report(out_dir, own)
    for text in left_out:
        err.print(f"[yellow]warning:[/] {shown('the report leaves out a result file of another command: ' + text)}", highlight=False)
    err.print(shown(f"report: {display_name(str(written), None)}"), highlight=False)


def cell(name: object, limit: int = 40) -> str:
    """A name for a table cell: on one line (a line break written ``\\n``, as :func:`shown` keeps it for messages),
    at most ``limit`` characters keeping its start and end, rich markup escaped."""
    return shown(display_name(name, limit))


def short_name(name: str) -> str:
    """A tensor name for a progress line: printable (no control characters reach the terminal) and
    at most :data:`PROGRESS_NAME` characters, keeping its start and end."""
    return display_name(name, PROGRESS_NAME)


def progress_bar(console: Console) -> Progress:
    """The progress line: description, bar, done/total, elapsed, eta and the current tensor name.

    The counts and times never fold or get cut; only the name gives way (it is shortened by the
    caller with :func:`short_name` and cut at its end if the line is still too narrow). A log that is
    not a terminal gets no bar, which leaves the width to the numbers.
    """
    fixed = {"no_wrap": True, "overflow": "ignore"}
    columns = [TextColumn("[bold]{task.description}", table_column=Column(**fixed))]
    if console.is_terminal:
        columns.append(BarColumn(bar_width=24))
    columns += [
        MofNCompleteColumn(table_column=Column(**fixed)), TimeElapsedColumn(table_column=Column(**fixed)),
        TextColumn("eta", table_column=Column(**fixed)), TimeRemainingColumn(table_column=Column(**fixed)),
        # wrappable (no_wrap False) so that rich narrows this column, not the numbers, when the line is
        # too wide; one line only: the name is cut with an ellipsis, never folded
        TextColumn("{task.fields[current]}", style="dim", markup=False,
                   table_column=Column(overflow="ellipsis", ratio=1, max_width=PROGRESS_NAME)),
    ]
    if console.is_terminal:
        return Progress(*columns, console=console, transient=False)
    return _LogProgress(*columns, console=console, transient=False)


#: Seconds between the progress lines written to a log (stderr not a terminal).
LOG_EVERY_S = 30.0


class _LogProgress(Progress):
    """Progress for a log file or pipe: rich draws a live display only on a terminal (elsewhere it
    prints the final state at the end, so a long run's log stayed empty for its whole length); this
    also prints the tasks' current line at most every :data:`LOG_EVERY_S` seconds."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._logged = time.monotonic()
        self._stopped = threading.Event()

    def start(self) -> None:
        super().start()
        # a timer too: a run's largest matrices come first, and minutes without a line read as a hang
        threading.Thread(target=self._tick, name="spectra-log-progress", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        if self.tasks:
            super().stop()
        else:  # stopped before its first task (a refusal): rich's closing empty line stood before the error
            self.live.stop()

    def _tick(self) -> None:
        while not self._stopped.wait(max(LOG_EVERY_S, 0.01)):
            self._log()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._log()

    def _log(self) -> None:
        with self._lock:  # (the timer's thread and the run's)
            now = time.monotonic()
            if now - self._logged < LOG_EVERY_S or not self.live.is_started:
                return
            self._logged = now
            table = self.make_tasks_table(self.tasks)
        self.console.print(table, highlight=False)


class OutPath(click.Path):
    """A path a command writes to (``--out``): ``~`` expanded as in input paths (a quoted ``'~/res'`` made a
    folder named ``~`` here, which a later ``rm -rf ~`` would not forgive), a folder reached through links
    resolved once; ``-`` refused, as spectra writes files there, not to standard output."""

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        if isinstance(value, str):
            if value.strip() == "-":
                self.fail("'-' is not standard output here: spectra writes files, so name a folder or file", param, ctx)
            if not value.strip():  # "" was taken for "not given" by `if out:` (recommend -o "" wrote nothing, exit 0)
                from spectra.errors import ConfigError

                opt = max((o for o in getattr(param, "opts", ()) if o.startswith("--")), key=len, default="--out")
                what = "folder" if not self.file_okay else "file" if not self.dir_okay else "folder or file"
                raise ConfigError(f"{opt} must name a {what}. Got {value!r} instead",
                                  hint=f"pass {opt} {'DIR' if what == 'folder' else 'FILE'}"
                                       f"{'; --out . writes into the current folder' if what == 'folder' else ''}")
            value = os.path.expanduser(value)
            dangling = os.path.islink(value) and not os.path.exists(value)  # refused as no folder, further on
            if not self.file_okay and not dangling and os.path.realpath(value) != os.path.abspath(value):
                # an output folder reached through a link (`latest -> run-7`) is the folder it names now: a link
                # switched mid-run split the run's files between two folders, the second written without its lock
                value = os.path.realpath(value)
        return super().convert(value, param, ctx)


def given(name: str) -> bool:
    """Whether option ``name`` of the current command was given (command line or environment), not left at its
    default: a warning about an option that has no effect is for one the user chose."""
    source = click.get_current_context().get_parameter_source(name)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def one_pattern(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> str | None:
    """``--include``/``--exclude`` given once (None when not given); given again, a usage error: the last one
    alone was kept before, the others dropped without a word, and joining them into one regex would
    change what each means (a leading ``(?i)``, the backtracking guard counted over all of them)."""
    if len(value) > 1:
        raise click.BadParameter(f"given {len(value)} times ({', '.join(repr(v) for v in value)}); pass one regex, e.g. "
                                 f"{'|'.join(value[:2])!r} for either", ctx, param)
    return value[0] if value else None
