"""The ``spectra`` command line (installed as the ``spectra_cli`` package): a thin shell over the library.

Two process-wide settings are made here, for the command line only (the library changes neither):

- Importing torch, numpy, scipy and the library creates some 300 000 objects, and Python's cyclic
  collector would walk them again and again while they load and at every later full collection:
  about 0.3-0.6 s of a command's 2.5 s start on this project's 2-core CPU. So they are imported here
  with the collector paused, then frozen (``gc.freeze``: moved to a generation no collection scans),
  and the collector is turned back on as it was.
- glibc's heap returns large freed blocks to the system and keeps smaller ones (:func:`_release_large_blocks`).
"""

import contextlib
import ctypes
import gc
import os
import signal
import sys


def _release_large_blocks() -> None:
    """glibc only: give every allocation of 8 MiB or more its own mapping, returned to the system when
    freed, and keep up to 64 MiB of freed memory at the top of each heap instead of returning it.

    glibc's default mapping threshold rises to the size of each large block freed (up to 32 MiB),
    after which tensors of that size come from the heap and stay there when freed, so the peak
    resident memory of a streaming run grows with the heap's fragmentation: on the 135M benchmark pair
    (``bench/speed_135m.py``) ``spectra diff`` peaked at 615-679 MiB with glibc's default and at
    592 MiB with a fixed 8 MiB threshold, in the same time. Fixing it also fixes the trim threshold
    at its 128 KiB default, so each worker's heap gave back and faulted in again the few MiB of every
    matrix below 8 MiB (~700 000 page faults and ~4 s of system time in one ``spectra compare`` of
    that pair); 64 MiB keeps them: 160 000 faults, about a tenth less CPU time, diff's peak unchanged,
    compare's 60 MiB higher. A threshold the user set (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``) is left alone.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


class _TermWhileStarting(KeyboardInterrupt):
    """SIGTERM or SIGHUP during the imports, handled as Ctrl-C there (the command's own handler comes later)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


def _term_while_starting(signum: int, frame: object) -> None:
    raise _TermWhileStarting(signum)


_release_large_blocks()
_collector_was_on = gc.isenabled()
# the console script, or `python -m spectra` (runpy has set argv[0] to spectra/__main__.py by now); inside another
# program, signals are that program's
_is_command = bool(sys.argv) and (os.path.basename(sys.argv[0]) == "spectra"
                                  or sys.argv[0].endswith(os.path.join("spectra", "__main__.py")))
# a signal ignored at the start (nohup's SIGHUP) stays ignored
_term_before = {}
for _signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if _is_command else ():
    if _signum is not None and signal.getsignal(_signum) is not signal.SIG_IGN:
        _term_before[_signum] = signal.signal(_signum, _term_while_starting)
gc.disable()
try:
    import click  # noqa: F401
    import rich.console  # noqa: F401

    import spectra  # noqa: F401
    import spectra_cli.main  # noqa: F401 - the commands' modules too: a stop while they load is a stop while starting
except KeyboardInterrupt as _stop:
    # Ctrl-C (or SIGTERM) during the command's ~1 s of imports printed a traceback through torch's import
    # machinery, or ended the process without a word; the command has done nothing yet.
    if _is_command:
        signum = _stop.signum if isinstance(_stop, _TermWhileStarting) else signal.SIGINT
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            os.write(2, f"stopped by {name} while starting: nothing was written\n".encode())
        os._exit(128 + signum)
    raise
finally:
    gc.freeze()
    if _collector_was_on:
        gc.enable()
    for _signum, _handler in _term_before.items():
        signal.signal(_signum, _handler)
del _collector_was_on
