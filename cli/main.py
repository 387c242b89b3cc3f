"""``spectra`` commands: parse, check flag combinations, call the library, print.

Results go to stdout; progress, hints and errors to stderr. Expected failures (every
:class:`spectra.SpectraError`) print one line and exit with status 1; set ``SPECTRA_DEBUG=1`` for
the traceback. Unknown exceptions propagate.
"""

from __future__ import annotations

import os
import signal
import threading

import click

import spectra
from spectra.errors import IdenticalCheckpointsError, SpectraError
from spectra_cli import compare as compare_commands
from spectra_cli import diff as diff_commands
from spectra_cli import esd as esd_commands
from spectra_cli import extract as extract_commands
from spectra_cli import interfere as interfere_commands
from spectra_cli import other as other_commands
from spectra_cli import trace as trace_commands
from spectra_cli import training as training_commands
from spectra_cli.console import EXIT_ERROR, EXIT_IDENTICAL


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


for _command in (diff_commands.diff_cmd, compare_commands.compare_cmd, other_commands.report_cmd, other_commands.inspect_cmd,
                 training_commands.train_cmd, training_commands.sweep_cmd, training_commands.demo_cmd,
                 trace_commands.trace_cmd, interfere_commands.interfere_cmd, esd_commands.esd_cmd,
                 extract_commands.extract_cmd, extract_commands.recommend_cmd):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
