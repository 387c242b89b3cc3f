"""One error hierarchy for everything spectra reports to a user.

Every error carries the file and/or tensor it is about and a hint saying what to do, so the CLI can
print it as one line (``error: <path>: <tensor>: <message> (<hint>)``) without a traceback. The
text is passed through :func:`spectra.naming.display_name`: names from hostile files cannot break
the line, drive the terminal with escape sequences, or fail to encode.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from spectra.display import fmt_bytes
from spectra.naming import display_name


class SpectraError(Exception):
    """Base class of the errors spectra raises for expected bad input.

    Args:
        message: what is wrong, one sentence without a trailing period.
        path: the file or folder concerned, if any.
        tensor: the tensor name concerned, if any.
        hint: what the user can do about it, if anything.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.path, None if self.tensor is None else f"tensor {self.tensor!r}") if p]
        text = ": ".join([*parts, self.message])
        if self.hint:
            text += f" ({self.hint})"
        # names and paths come from untrusted files: no terminal controls, no line breaks, no surrogates
        return display_name(text)


class CheckpointNotFoundError(SpectraError):
    """A checkpoint, shard or cache entry does not exist."""


class CheckpointFormatError(SpectraError):
    """A file exists but is not a valid checkpoint: truncated, corrupt, unknown layout."""


class UnsafeCheckpointError(SpectraError):
    """A file would need arbitrary code execution (pickle) to load; spectra refuses it."""


class PairingError(SpectraError):
    """The two checkpoints do not pair: no shared matrices, or incompatible architectures."""


class ConfigError(SpectraError):
    """An option or combination of options is invalid."""


class IdenticalCheckpointsError(SpectraError):
    """Every paired update is exactly zero: base and tuned hold the same weights."""


class DistributedError(SpectraError):
    """Another rank of a distributed run failed, was killed, or stopped answering."""


class ResultsFormatError(SpectraError):
    """A results file (results.json, compare.json, train_log.jsonl) is not what spectra writes:
    wrong schema, a missing key or a value of the wrong type (often after a hand edit or a merge)."""


class OutputError(SpectraError):
    """A result file could not be written (full disk, no permission); earlier files are unchanged."""


def too_long_text(path: str | os.PathLike[str] | bytes | None) -> str:
    """Why a path was refused as too long (``ENAMETOOLONG``): one of its names (255 bytes on most file systems),
    or, when none is that long, the whole path (4,096 bytes on Linux)."""
    raw = os.fsencode(path) if path is not None else b""
    if path is None or len(raw) < 4096 or any(len(part) > 255 for part in raw.split(b"/")):  # (eCryptfs allows 143-byte names)
        return "a name in the path is longer than the file system allows (255 bytes on most)"
    return f"the path ({len(raw)} bytes) is longer than the system allows (4,096 bytes on Linux)"


def output_error(path: str | Path, exc: OSError) -> OutputError:
    """The :class:`OutputError` for an ``OSError`` raised while writing ``path``."""
    why = exc.strerror or type(exc).__name__
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    denied = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    # a path of the wrong kind is no matter of disk space: say what is there instead
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        why = f"{why}: it is not a folder (a file, a device, or a symbolic link to a missing folder)"
    elif exc.errno == errno.EISDIR:
        why = f"{why}: a folder stands where spectra writes a file"
    elif exc.errno == errno.ELOOP:
        why = f"{why}: a symbolic link stands where spectra writes a file of its own"
    odd = exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP)
    if exc.errno == errno.ENAMETOOLONG:  # the path itself: nothing was written under it
        return OutputError(f"cannot write results: {why}: {too_long_text(path)}", path=path, hint="choose a shorter --out")
    if exc.errno == errno.ENOENT and Path(path).parent.is_dir():  # /proc and other file systems that make no files
        return OutputError(f"cannot write results: {why}: the folder exists but its file system does not create files "
                           "there", path=path, hint="choose an --out (or -o) on an ordinary disk")
    if exc.errno == errno.ENOENT:  # the output folder went away mid-run (rm -rf): with it the journal, so no --resume
        return OutputError(f"cannot write results: {why}: the output folder (or a part of its path) is missing: it was removed "
                           "during the run, or the file system there makes no folders (/proc, /sys)", path=path,
                           hint="run the command again with an --out (or -o) on an ordinary disk; what it had written went with the folder")
    fix = ("free disk space" if full else "fix the folder's permissions (or its immutable flag)" if denied
           else "remove or rename what is in the way" if odd else "free disk space or fix the folder's permissions")
    # the lock file is the first thing a run writes: nothing before it to be intact or to resume
    first = Path(path).name == ".spectra.lock"
    return OutputError(f"cannot write results: {why}", path=path,
                       hint=f"{fix}, or choose another --out" + ("" if first else
                            "; files written earlier are intact (diff, esd, compare, interfere, extract and trace continue "
                            "an interrupted run with --resume)"))


#: Words of the errors torch raises when an allocation fails (CPU allocator, CUDA caching allocator, MPS).
_OOM_WORDS = ("can't allocate memory", "out of memory", "defaultcpuallocator")


def out_of_memory(exc: BaseException) -> str | None:
    """One line saying that ``exc`` is an allocation that failed (``MemoryError``, torch's CPU allocator
    or ``torch.cuda.OutOfMemoryError``), with the bytes it asked for when torch said; None for any
    other error (which should propagate).

    >>> out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate "
    ...                            "memory: you tried to allocate 576000000 bytes. Error code 12"))
    'out of memory: an allocation of 549.3 MiB failed'
    >>> out_of_memory(ValueError("bad"))
    """
    text = str(exc)
    if isinstance(exc, RuntimeError) and "can't start new thread" in text:  # its stack could not be mapped (ulimit -v)
        return "out of memory: a new thread could not be started (its stack could not be allocated)"
    if not (isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(w in text.lower() for w in _OOM_WORDS))):
        return None
    import re

    asked = re.search(r"allocate (\d+) bytes", text)
    size = re.search(r"[Tt]ried to allocate ([0-9.]+ [KMGT]i?B)", text)
    what = (f"an allocation of {fmt_bytes(int(asked.group(1)))} failed" if asked else
            f"an allocation of {size.group(1)} failed" if size else "an allocation failed")
    return f"out of memory: {what}"
