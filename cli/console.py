"""What every command shares: the consoles (results to stdout, progress and messages to stderr),
the progress bar, number formatting, and quieting transformers during training. No state at module
level: each command makes its consoles when it runs."""

from __future__ import annotations

import json
import re
import time

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from spectra.display import display_name

#: Longest tensor name shown on a progress line (its start and end kept around "…").
PROGRESS_NAME = 36

EXIT_ERROR = 1
EXIT_IDENTICAL = 3


def stderr() -> Console:
    """Console for progress, warnings and errors; when redirected to a log, wide enough that a
    message stays on one line (greppable) instead of folding at 80 columns."""
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=True, highlight=False, width=200)
    return console


def stdout() -> Console:
    """Console for results; when piped to a file, wide enough that tensor names do not fold."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    return console


#: Characters JSON may leave raw (ensure_ascii=False) that a terminal would act on or cannot encode:
#: DEL, the C1 controls (0x9b is a one-byte CSI on some terminals) and lone surrogates.
_RAW_UNSAFE = re.compile("[\x7f-\x9f\ud800-\udfff]")


def echo_json(text: str) -> None:
    """Print a JSON document on stdout; written with ``\\uXXXX`` escapes instead when it holds
    characters a terminal would interpret (ESC and the other C0 controls JSON always escapes)."""
    if _RAW_UNSAFE.search(text):
        text = json.dumps(json.loads(text), indent=1, ensure_ascii=True)
    click.echo(text)


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

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_S and self.live.is_started:
            self._logged = now
            self.console.print(self.make_tasks_table(self.tasks), highlight=False)
