"""``spectra`` commands: parse, check flag combinations, call the library, print.

Results go to stdout; progress, hints and errors to stderr. Expected failures (every
:class:`spectra.SpectraError`) print one line and exit with status 1; set ``SPECTRA_DEBUG=1`` for
the traceback. Unknown exceptions propagate.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import click

import spectra
from spectra import distributed as spectra_distributed
from spectra.display import display_name
from spectra.errors import ConfigError, IdenticalCheckpointsError, SpectraError, out_of_memory, too_long_text
from spectra.io.files import held_locks, release_locks
from spectra_cli import compare as compare_commands
from spectra_cli import diff as diff_commands
from spectra_cli import esd as esd_commands
from spectra_cli import extract as extract_commands
from spectra_cli import interfere as interfere_commands
from spectra_cli import other as other_commands
from spectra_cli import trace as trace_commands
from spectra_cli import training as training_commands
from spectra_cli.console import EXIT_ERROR, EXIT_IDENTICAL

#: After a first SIGTERM or Ctrl-C the run has this many seconds to stop cleanly (flush results.json)
#: before the process ends anyway: a thread blocked in ``open()`` of a FIFO, or a long native call,
#: never reaches the code that would stop it. A second signal ends it at once.
STOP_GRACE_S = 20.0
#: A second signal of the same kind this soon after the first is the same stop delivered twice
#: (coreutils ``timeout`` signals the command and then its process group), not a request to hurry.
DUPLICATE_S = 0.25


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, torchrun stopping the ranks of a failed run) or SIGHUP (the terminal
    closed, an ssh connection dropped), handled as Ctrl-C; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum


#: The signals that stop a command cleanly. SIGHUP ended it without a word, results.json behind its journal
#: (3 of 26 matrices) and the folder locked; one ignored when the command started (``nohup``) stays ignored.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class _StopSignals:
    """SIGTERM, SIGHUP and Ctrl-C for one command: the first raises in the main thread (a clean stop: what was
    computed is journaled, results.json is flushed); the second, or the grace period running out,
    ends the process with ``os._exit`` (128 + the signal: 143 for SIGTERM, 129 for SIGHUP, 130 for Ctrl-C), like SIGKILL, which the
    journal survives. Signals are seen by a watcher thread through ``signal.set_wakeup_fd``: Python
    runs handlers only in the main thread between bytecodes, so a main thread blocked in a join or
    a long native call would never see the second one."""

    def __init__(self, grace_s: float, kept: str | Callable[[], str] = "") -> None:
        self.grace_s = grace_s
        # what the stop leaves behind, for the message of a hard exit: a callable is asked then (the
        # files written by that time), its answer at the start standing in should it fail
        self.kept = kept
        self.timer: threading.Timer | None = None
        self.count = 0
        self._first = (0, 0.0)  # signal number and time of the first stop
        self._raised = False
        self._lock = threading.Lock()
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        # (Ctrl-C is Python's own KeyboardInterrupt; a signal ignored at the start, as nohup ignores SIGHUP, stays so)
        self._previous = {s: signal.signal(s, self._on_sigterm) for s in STOP_SIGNALS
                          if s != signal.SIGINT and signal.getsignal(s) is not signal.SIG_IGN}
        threading.Thread(target=self._watch, name="spectra-stop", daemon=True).start()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if not self._raised:  # the first stops cleanly; a later one is the watcher's to act on
            self._raised = True
            raise Terminated(signum)

    def _watch(self) -> None:
        while data := os.read(self._read, 64):  # blocks without the GIL; empty once closed
            for signum in data:
                if signum in STOP_SIGNALS:
                    self._seen(signum)
        os.close(self._read)

    def _seen(self, signum: int) -> None:
        code = 128 + signum
        now = time.monotonic()
        with self._lock:
            if self.count and signum == self._first[0] and now - self._first[1] < DUPLICATE_S:
                return  # the same stop delivered twice (timeout signals the command, then its group)
            self.count += 1
            first = self.count == 1
            if first:
                self._first = (signum, now)
        if first:  # kept after the command returns when this process is the command: it also bounds a hang in its exit
            # "stopped at once (did not stop within 20 s)" read as a contradiction: this stop is the forced one
            self.timer = threading.Timer(self.grace_s, _hard_exit, (code, f"it did not stop within {self.grace_s:g} s of the signal",
                                                                    self.kept, "ended by force"))
            self.timer.daemon = True
            self.timer.start()
        else:
            _hard_exit(code, "a second stop signal", self.kept)

    @property
    def stopped_by(self) -> int | None:
        """The signal of the first stop seen (SIGINT, SIGTERM or SIGHUP), None when none came."""
        return self._first[0] if self.count else None

    def interrupt(self) -> KeyboardInterrupt:
        """The exception of the first stop seen (Ctrl-C's KeyboardInterrupt, or :class:`Terminated`), to raise where
        Python let it pass."""
        return KeyboardInterrupt() if self.stopped_by == signal.SIGINT else Terminated(self.stopped_by or signal.SIGTERM)

    def close(self, *, owns_process: bool) -> None:
        """Restore the previous handler and wakeup fd; the watcher ends. Inside another program (a
        notebook, a test runner: ``owns_process`` False) a pending grace timer is cancelled, so that a
        Ctrl-C that stopped the command cleanly does not end the program 20 s later. When this process
        is the command, what is left is its exit (:func:`run`): a stop then is answered by
        :func:`_after_command`, not by a KeyboardInterrupt traceback from the interpreter's exit hooks."""
        if self.timer is not None and not owns_process:
            self.timer.cancel()
        signal.set_wakeup_fd(self._previous_fd)
        for s, previous in self._previous.items():
            signal.signal(s, _after_command if owns_process else previous)
        if owns_process:
            signal.signal(signal.SIGINT, _after_command)
        os.close(self._write)


_STOPS_AFTER: list[int] = []  # stops that came after the command ended (this process is the command)


def _after_command(signum: int, frame: object) -> None:
    """A stop once the command has ended and written everything: the first is let pass (the exit is under
    way, its status the command's); a second ends the process at once, should that exit hang."""
    _STOPS_AFTER.append(signum)
    if len(_STOPS_AFTER) > 1:
        os._exit(128 + signum)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that ``exc`` is, or the one behind a lock left released by it: an interrupt
    raised inside ``threading.Condition.wait`` (a future's result, a join) releases the lock, and the
    ``with`` around the wait then raises "cannot release un-acquired lock" with the interrupt as its
    context. That is still the stop; any other error raised while stopping is an error, shown as one."""
    if isinstance(exc, KeyboardInterrupt):
        return exc
    context = exc.__context__
    if (isinstance(exc, RuntimeError) and isinstance(context, KeyboardInterrupt)
            and any(words in str(exc) for words in ("un-acquired lock", "release unlocked lock"))):
        return context
    return None


def _owns_process() -> bool:
    """True when this process is the ``spectra`` command itself (the console script, ``python -m spectra``
    or torchrun's ``-m spectra``), not a program that called :func:`main`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return Path(sys.argv[0]).stem == "spectra" or (spec is not None and spec.name in ("spectra", "spectra.__main__"))


def _launched_rank() -> str | None:
    """``RANK`` as the launcher set it when this process is one rank of a distributed run (``WORLD_SIZE`` above 1; "?"
    without a RANK), else None: read from the environment, as the stop watchdog may not import."""
    return os.environ.get("RANK", "?").strip() if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") else None


def _hard_exit(code: int, why: str, kept: str | Callable[[], str], head: str = "stopped at once") -> None:
    if callable(kept):
        try:
            kept = kept()
        except Exception:  # the message must never stop the exit
            kept = ""
    # a rank waiting inside the rendezvous for a peer that died is stopped here: its lines carry its rank (read from
    # the environment: an import from this watchdog thread could wait on an import lock the stuck thread holds)
    prefix = f"[rank {os.environ.get('RANK', '?')}] " if _launched_rank() is not None else ""
    with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone (EIO): the exit must still come
        os.write(2, f"{prefix}{head} ({why}){': ' + kept if kept else ''}\n".encode())
    os._exit(code)


def _journaled(out: Path) -> bool:
    """Whether ``out`` holds a journal (``*.jsonl``) with a result in it: more than the fingerprint line a
    sealed journal opens with (compare, esd, interfere, trace: a stop before the first result kept nothing).
    False when it cannot be looked at (a name too long, a folder not entered): the stop message is asked
    before and during any run."""
    try:
        with os.scandir(out) as entries:
            found = [e.path for e in entries if e.name.endswith(".jsonl") and e.is_file() and e.stat().st_size > 0]
        for path in found:
            with open(path, "rb") as f:  # a regular file (is_file above); a header names every input: read it whole
                first, second = f.readline(1 << 26), f.readline(1 << 16)
            if second.strip() or not first.startswith(b'{"fingerprint"'):
                return True
        return False
    except OSError:
        return False


def _finished(out: Path, since: float) -> str | None:
    """The result file in ``out`` (:data:`spectra.report.RESULT_FILES`) that this run, started at ``since``
    (``time.time()``), wrote as complete, or None."""
    from spectra.report import RESULT_FILES

    for name in RESULT_FILES:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # absent, being written, not an object
            path = out / name
            if path.stat().st_mtime >= since and json.loads(path.read_text(encoding="utf-8")).get("complete") is True:
                return str(path)
    return None


def kept_on_stop(group: click.Group, ctx: click.Context, since: float | None = None) -> str:
    """What a stop leaves of the command ``ctx``'s arguments name, in words: the journal of a command that
    can resume (``--resume``) and was given ``--out``, else that nothing (or nothing usable) was kept.
    The subcommand's options are read with click's resilient parsing (no errors, no callbacks). A
    command with a ``stop_note(params, since) -> str`` attribute (``spectra train``, ``sweep``: partial
    logs, finished runs; ``since`` is the command's start, ``time.time()``) words it itself."""
    try:
        name, cmd, rest = group.resolve_command(ctx, list(ctx.meta.get("spectra.args", ())))
        if cmd is None:
            return ""
        with cmd.make_context(name, rest, parent=ctx, resilient_parsing=True) as sub:
            params = dict(sub.params)
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, IndexError, ValueError, TypeError):
        return ""
    note = getattr(cmd, "stop_note", None)
    if callable(note):
        return str(note(params, since))
    out = params.get("out_dir")
    if out and "resume" in params:
        # another rank of a distributed run keeps nothing itself: rank 0 journals (on its own machine)
        if _launched_rank() not in (None, "0"):
            return (f"rank 0 journals the results exchanged so far in its {out} (on its machine); run the same command "
                    "with --resume to finish")
        if since is not None and (done := _finished(Path(out), since)):  # stopped while the figures were drawn
            return (f"{done} was complete before the stop; files written after it (figures, the CSV) may be missing: "
                    "run the same command with --resume to write them")
        if not _journaled(Path(out)):  # stopped while the inputs were opened
            holds = ""
            with contextlib.suppress(OSError):  # a name too long, a folder not entered: asked before any run too
                holds = " (the files there hold none)" if any(Path(out).glob("*.json*")) else ""  # an empty results.json
            return f"stopped before any result was written to {out}{holds}: run the command again"
        return (f"results finished so far are kept in {out} (in its journal, *.jsonl); run the same command "
                "with --resume to finish")
    if out:  # a command that writes --out only as it finishes (every one that writes results journals them now)
        return f"{name} writes {out} when it finishes: nothing was kept; run the command again"
    return "nothing was written (no --out)" if "out_dir" in params else ""


def _rank_prefix() -> str:
    """``[rank N] `` in a multi-process run, so that each rank's lines can be told apart."""
    return f"[rank {os.environ.get('RANK', '?')}] " if spectra_distributed.launched() else ""


class _Group(click.Group):
    """Turns :class:`SpectraError` into one line on stderr and a non-zero exit, and Ctrl-C or
    SIGTERM into a clean stop: what was computed is already journaled (``diff --resume``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["spectra.args"] = list(args)  # the subcommand's tokens, for the stop message (kept_on_stop)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        started = time.time()
        kept = kept_on_stop(self, ctx)

        def kept_now() -> str:  # asked at a hard exit: the files written by then
            return kept_on_stop(self, ctx, since=started) or kept

        stop = _StopSignals(STOP_GRACE_S, kept_now) if threading.current_thread() is threading.main_thread() else None
        held_before = held_locks()
        try:
            try:
                result = super().invoke(ctx)
                if stop is not None and stop.stopped_by is not None:
                    # a stop raised where Python swallows exceptions (a weakref callback while a figure is
                    # drawn: "Exception ignored in …") let the command run on: honoured now
                    raise stop.interrupt()
                return result
            except SpectraError as exc:
                if os.environ.get("SPECTRA_DEBUG") == "1":
                    raise
                code = EXIT_IDENTICAL if isinstance(exc, IdenticalCheckpointsError) else EXIT_ERROR
                click.echo(f"{_rank_prefix()}error: {exc}", err=True)
                ctx.exit(code)
            except OSError as exc:
                # standard output closed, full (>/dev/full) or a pipe whose reader left (| head): files written
                # before are on disk; one line instead of a traceback. Any other OSError is unexpected: raised.
                if os.environ.get("SPECTRA_DEBUG") == "1":
                    raise
                if stop is not None and stop.stopped_by is not None and exc.errno == errno.EIO:
                    # the stop's own lines written to a terminal that went away with the SIGHUP: still that stop
                    raise stop.interrupt() from exc
                if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):  # a path given: a name over 255 bytes, a link loop
                    what = too_long_text(exc.filename) if exc.errno == errno.ENAMETOOLONG else "it goes through a loop of symbolic links"
                    click.echo(f"{_rank_prefix()}error: {display_name(exc.filename if exc.filename is not None else '?', 200)}: "
                               f"{what} (choose another path)", err=True)
                    ctx.exit(EXIT_ERROR)
                if exc.errno not in (errno.EPIPE, errno.ENOSPC, errno.EBADF):
                    raise
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    click.echo(f"{_rank_prefix()}error: cannot write the output: {exc.strerror or exc}", err=True)
                ctx.exit(EXIT_ERROR)
            except (MemoryError, RuntimeError) as exc:
                # a matrix larger than the memory left: one line (the journal holds what was finished), not a traceback
                if isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop from") and \
                        os.environ.get("SPECTRA_DEBUG") != "1":  # pathlib's resolve(strict=False) on a link loop
                    click.echo(f"{_rank_prefix()}error: {display_name(str(exc), 300)} (choose another path)", err=True)
                    ctx.exit(EXIT_ERROR)
                oom = out_of_memory(exc)
                if oom is None or os.environ.get("SPECTRA_DEBUG") == "1":
                    raise
                kept = kept_on_stop(self, ctx, since=started) or kept
                plan = "; `spectra diff --plan` says what a run needs" if ctx.invoked_subcommand == "diff" else ""
                click.echo(f"{_rank_prefix()}error: {oom} (free memory or use a machine with more{plan})"
                           f"{'; ' + kept if kept else ''}", err=True)
                ctx.exit(EXIT_ERROR)
        except BaseException as exc:
            interrupt = _interrupt_behind(exc)
            if interrupt is None:
                raise
            signum = interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            kept = kept_on_stop(self, ctx, since=started) or kept  # what the files say now
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                click.echo(f"{_rank_prefix()}stopped by {what}{': ' + kept if kept else ''}", err=True)
            ctx.exit(128 + signum)
        finally:
            if stop is not None:
                stop.close(owns_process=_owns_process())
            release_locks(keep=held_before)  # a stopped or failed run's lock file goes with it (its journal stays)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(spectra.__version__, prog_name="spectra")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Weight-space spectral analysis of fine-tuned models."""
    # under torchrun every rank would run the whole command into one folder: one wins the lock, the rest fail
    asks_help = any(a in ctx.help_option_names for a in ctx.meta.get("spectra.args", ()))
    if ctx.invoked_subcommand not in (None, "diff") and not asks_help and spectra_distributed.launched():
        raise ConfigError(f"spectra {ctx.invoked_subcommand} runs in one process (WORLD_SIZE={os.environ.get('WORLD_SIZE')} "
                          "here); only spectra diff splits its work over the ranks of a launcher",
                          hint="run it without torchrun, or unset WORLD_SIZE")


for _command in (diff_commands.diff_cmd, compare_commands.compare_cmd, other_commands.report_cmd, other_commands.inspect_cmd,
                 training_commands.train_cmd, training_commands.sweep_cmd, training_commands.demo_cmd,
                 trace_commands.trace_cmd, interfere_commands.interfere_cmd, esd_commands.esd_cmd,
                 extract_commands.extract_cmd, extract_commands.recommend_cmd):
    main.add_command(_command)


def _escape_unencodable_output() -> None:
    """On a terminal or pipe whose encoding lacks spectra's symbols (Δ, σ, τ, ‖: an ASCII locale, a
    Windows cp1252 console), print them as backslash escapes instead of failing with
    UnicodeEncodeError after the results were computed."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (getattr(stream, "encoding", "") or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")


class _DiagnosticStream:
    """``sys.stderr`` that never fails the run: progress, warnings and hints are diagnostics, so a full
    disk under a stderr log, ``2>/dev/full`` or a reader that left (``2>&1 | head``) must not stop a
    computation or lose its results (stdout and the output files still say everything). The first failed
    write (EPIPE, ENOSPC, EBADF, EIO) ends the writes to it; everything else is the wrapped stream's."""

    _FAILED = (errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EBADF, errno.EIO)

    def __init__(self, stream) -> None:
        self._stream = stream
        self._broken = False

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except OSError as exc:
                if exc.errno not in self._FAILED:
                    raise
                self._broken = True
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except OSError as exc:
                if exc.errno not in self._FAILED:
                    raise
                self._broken = True

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _ResultsStream(_DiagnosticStream):
    """``sys.stdout`` whose reader may leave: ``spectra diff … | head`` reads a few lines and closes the
    pipe. The printed table is a view of results the command writes to files, so a reader that leaves
    ends what is printed, not the run (rich's console raised SystemExit(1) at its next line, click's echo
    a BrokenPipeError: the command stopped wherever it was printing, before its later files). A full disk
    or a closed descriptor under stdout stays an error: results meant for a file did not reach it."""

    _FAILED = (errno.EPIPE,)


def run() -> None:
    """The ``spectra`` console script: :func:`main`, then an exit without the interpreter's teardown.

    Python's last step, clearing every module and freeing torch's ~300 000 objects one at a time,
    took 0.13 s of each command here (0.25 s after a bare ``import torch``) and does nothing a
    finished command needs. What it does that matters is done first, as the interpreter does it:
    non-daemon threads joined (``threading._shutdown``, with the thread pools' own exit hooks),
    ``atexit`` handlers (logging, multiprocessing children), stdout and stderr flushed (Python's and C's); then
    ``os._exit`` with the command's status. Every file spectra writes is closed by then. An unexpected
    exception (a traceback) or a Python without ``threading._shutdown`` exits the ordinary way.
    """
    _escape_unencodable_output()
    # a name's emoji that the figure font lacks is drawn as a box; matplotlib's warning printed its own source line,
    # per glyph, per figure, past the CLI's output (names in the results are exact)
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
    if sys.stderr is not None:
        sys.stderr = _DiagnosticStream(sys.stderr)
    if sys.stdout is not None:
        sys.stdout = _ResultsStream(sys.stdout)
    default_hook = sys.unraisablehook

    def unraisable(info) -> None:  # a stop swallowed in a callback is honoured after the command (_Group.invoke)
        if not (isinstance(info.exc_type, type) and issubclass(info.exc_type, KeyboardInterrupt)):
            default_hook(info)

    sys.unraisablehook = unraisable
    try:
        main(prog_name="spectra")  # click's standalone mode: always ends in SystemExit
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    except OSError as exc:  # --version / --help of the group (printed while parsing, before _Group.invoke) into a full disk
        if exc.errno not in (errno.EPIPE, errno.ENOSPC, errno.EBADF) or os.environ.get("SPECTRA_DEBUG") == "1":
            raise
        with contextlib.suppress(OSError, ValueError, AttributeError):
            click.echo(f"error: cannot write the output: {exc.strerror or exc}", err=True)
        code = EXIT_ERROR
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None or threading.current_thread() is not threading.main_thread():  # pragma: no cover
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1, as the interpreter does
        print(code, file=sys.stderr)
        code = 1
    if "spectra.threads" in sys.modules:  # its compute threads end now (a stop may have left one unregistered)
        sys.modules["spectra.threads"].release_workers()
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a closed pipe or stream (None when closed at start)
            stream.flush()
    with contextlib.suppress(OSError, AttributeError, TypeError):  # C's stdio buffers too (not on Windows: no CDLL(None))
        ctypes.CDLL(None).fflush(None)
    os._exit(code & 0xFF)


if __name__ == "__main__":  # pragma: no cover
    run()
