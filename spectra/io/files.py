"""Writing result files atomically: a temporary file in the same folder, then a rename, so that an
interruption (Ctrl-C, SIGKILL, a full disk) never leaves a half-written file where a whole one was;
and locking an output folder so that two runs never write into it at once (:class:`OutputLock`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from spectra.errors import OutputError, output_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


def holds_text(path: Path) -> bool:
    """Whether ``path`` is a file with more than whitespace in its first 64 KiB (a trace worth keeping)."""
    try:
        with open(path, "rb") as f:
            return bool(f.read(1 << 16).strip())
    except OSError:  # none there (or not a file): nothing to keep
        return False


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name one existing file or folder, through any spelling or link (False
    when either is missing or unreadable)."""
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):  # not a path (an opened checkpoint, a NUL in the name)
        return False


def refuse_input_as_output(out: str | os.PathLike[str], inputs: list[Path], *, option: str = "--out") -> None:
    """Refuse to write ``out`` when it is one of the files a command read (``inputs``), through any
    spelling or link: writing would replace the results it was made from.

    Raises:
        ConfigError: ``out`` is the same file as one of ``inputs``.
    """
    from spectra.errors import ConfigError

    target = Path(out)
    for f in inputs:
        if same_file(target, f):
            raise ConfigError(f"{option} {target} is the input {f}: writing it would replace the results it was made from",
                              hint=f"choose another file for {option}")


#: Files a single-file output (``report -o``, ``recommend -o``) never replaces: spectra's own results,
#: journals and configs, and a model's or adapter's files, whatever their suffix.
PROTECTED_NAMES = frozenset({
    "results.json", "results.jsonl", "results.csv", "diff_config.json", "compare.json", "compare.csv", "esd.json",
    "esd.jsonl", "esd.csv", "extract.json", "extract.jsonl", "extract.csv", "trace.json", "trace.jsonl",
    "trace_journal.jsonl", "trace.csv", "interfere.json", "interfere.csv", "sweep.json", "config.json",
    "adapter_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
    "model.safetensors.index.json", "pytorch_model.bin.index.json", "adapter_model.safetensors.index.json",
    "special_tokens_map.json", "preprocessor_config.json", "processor_config.json", "vocab.json", "added_tokens.json",
    "chat_template.json", "train_config.json", "train_summary.json",
})


def refuse_replacing(out: str | os.PathLike[str], suffixes: tuple[str, ...], *, option: str = "--out",
                     owned: Callable[[Path], bool] | None = None) -> None:
    """Refuse to write ``out`` over anything but a file this command wrote before: an existing path that is
    not a regular file (a device such as ``/dev/null``, a FIFO, a socket, a folder or a symbolic link: the
    atomic write renames a new file over it, and as root that replaced ``/dev/full``), a file not of the kind
    written (its suffix not in ``suffixes``: a model's ``.safetensors``, a ``.png``), one of
    :data:`PROTECTED_NAMES` (a run's results or journal, a model's config), or one ``owned`` says is not
    this command's own (a ``special_tokens_map.json`` is ``.json`` too).

    Raises:
        ConfigError: such a path exists at ``out``.
    """
    from spectra.errors import ConfigError

    target = Path(out)
    hint = f"choose a new file name ending in {' or '.join(suffixes)} for {option}"
    try:
        st = os.lstat(target)
    except OSError:  # nothing there (or a path the write will name in its own error)
        return
    if not stat.S_ISREG(st.st_mode):
        what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else
                "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise ConfigError(f"{option} {target} is {what}: spectra writes a new file and renames it into place, which "
                          "would replace it", hint=hint + (" (the link's own target, for a link)" if stat.S_ISLNK(st.st_mode) else ""))
    if target.suffix.lower() not in suffixes or target.name.lower() in PROTECTED_NAMES or (owned is not None and not owned(target)):
        raise ConfigError(f"{option} {target} exists and is not a file this command writes (it would be replaced)", hint=hint)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and a rename: readers
    see the old file or the new one, never a part.

    Raises:
        OutputError: the folder or file cannot be written (full disk, permissions); ``path`` is
            unchanged and no temporary file is left behind.
    """
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``):
    the classic ``os.umask(0)`` then restore, run by two threads at once, can leave it at 0 for good."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


#: A temporary file :func:`atomic_file` writes beside ``X`` (``tempfile.mkstemp``'s 8 random characters).
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
#: The results a run rewrites while it holds its folder's lock (a killed rewrite leaves a temporary
#: file beside one of them); a report, written without the lock, is not among them.
LOCKED_OUTPUTS = frozenset({"results.json", "results.csv", "diff_config.json", "compare.json", "compare.csv", "esd.json",
                            "esd.csv", "extract.json", "extract.csv", "trace.json", "trace.csv", "interfere.json",
                            "interfere.csv", "sweep.json", "train_config.json", "train_summary.json"})


#: Suffixes of the other files spectra writes through :func:`atomic_file` (figures, reports, tables).
_TEMP_TARGETS = (".png", ".svg", ".pdf", ".html", ".csv", ".json", ".md")


def _remove_stale_temps(folder: Path) -> None:
    """Remove the temporary files a killed run left beside its results (``.results.json.ab12cd34.tmp``:
    a SIGKILL or an out-of-memory kill during a rewrite), once this process holds the folder's lock, so
    no live spectra run is writing them: those of :data:`LOCKED_OUTPUTS` and of the figures, reports and
    tables spectra writes (:data:`_TEMP_TARGETS`; a SIGKILL during a figure's first write left
    ``.esd_plots.png.baympvsc.tmp`` for good)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TEMP_NAME.fullmatch(entry.name)
            target = m.group("target") if m else ""
            if ((target in LOCKED_OUTPUTS or target.endswith(_TEMP_TARGETS))
                    and entry.is_file(follow_symlinks=False)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file in the same folder, fsynced and
    renamed over ``path`` when the block ends; removed, with ``path`` unchanged, when it raises.

    Raises:
        OutputError: the folder or file cannot be written (full disk, permissions); no temporary
            file is left behind. Other exceptions of the block propagate as they are.
    """
    path = Path(path)
    tmp = fd = None
    wrapped = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            wrapped = True  # the file object closes the descriptor from here on
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if fd is not None and not wrapped:  # a Ctrl-C between mkstemp and fdopen left the descriptor open
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise output_error(path, exc) from exc
        raise


#: The lock file a run holds in its output folder (:class:`OutputLock`).
LOCK_NAME = ".spectra.lock"


#: How the lock file is opened, besides read/write: never through a symbolic link (a planted
#: ``.spectra.lock -> ../precious`` would be truncated) and never blocking (a FIFO there).
_LOCK_OPEN = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class OutputLock:
    """An exclusive lock on an output folder, so that two runs never write one folder at once (their
    journals would interleave). It is an advisory ``flock`` on ``DIR/.spectra.lock``, which holds the
    owner's pid, host and start time for the message a second run prints; the kernel releases it when
    the owner exits, however it exits, so the lock of a dead process is simply taken over. Another
    lock of this same process taken by this thread, or by a thread that has ended (an earlier run
    abandoned by an exception), does not block: a process orders its own runs; a live run of another
    thread of this process does (:func:`_refuse_other_thread`). Where the filesystem has no ``flock``, the run goes unlocked.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> lock = OutputLock.acquire(folder)
        >>> (folder / LOCK_NAME).is_file()
        True
        >>> lock.release(); (folder / LOCK_NAME).exists()
        False
    """

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd
        self.owner = threading.current_thread()  # the thread that took it (release_locks frees its own only)

    @classmethod
    def acquire(cls, folder: Path) -> OutputLock:
        """Lock ``folder`` (which must exist) for this process.

        Raises:
            OutputError: another live process holds the folder (names its pid, host and start time),
                or the lock file cannot be written.
        """
        path = Path(folder) / LOCK_NAME
        if fcntl is None:  # pragma: no cover - not POSIX
            return cls(path, None)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _LOCK_OPEN, 0o644)
            except OSError as exc:
                raise output_error(path, exc) from exc
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a FIFO, or a hard link to another file: not ours
                os.close(fd)
                raise OutputError("the lock file is not spectra's (a FIFO, a device or a hard link to another file)",
                                  path=path, hint="remove it, or choose another --out")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if _ours(holder):
                    _refuse_other_thread(Path(folder))
                    return cls(path, None)
                raise _held(folder, holder) from None
            except OSError:  # no flock on this filesystem (some network mounts): run unlocked
                os.close(fd)
                return cls(path, None)
            try:  # the file may have been released and removed between open and flock: lock the one in place
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except OSError as exc:
                os.close(fd)
                raise output_error(path, exc) from exc
            _remove_stale_temps(Path(folder))
            lock = cls(path, fd)
            with _THREADS_LOCK:
                _HELD.add(lock)
            return lock

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent; exiting the process releases it too)."""
        if self._fd is None:
            return
        with _THREADS_LOCK:
            _HELD.discard(self)
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still locked while unlinking: a run that opened it re-checks the inode
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


#: The locks this process holds, each with the thread that took it (:func:`_refuse_other_thread`); a run that
#: stopped or failed keeps its lock until the process ends, or until :func:`release_locks`.
_HELD: set[OutputLock] = set()
_THREADS_LOCK = threading.Lock()  # guards _HELD


def held_locks() -> frozenset[OutputLock]:
    """The output locks this process holds now."""
    with _THREADS_LOCK:
        return frozenset(_HELD)


def release_locks(keep: frozenset[OutputLock] = frozenset()) -> None:
    """Release the locks this thread (or a thread that has ended) took, except ``keep``, removing their
    files: what a command that stopped or failed took, as it ends, so that no ``.spectra.lock`` stays
    behind in its folder. Another live thread's run keeps its lock."""
    me = threading.current_thread()
    for lock in held_locks() - keep:
        if lock.owner is me or not lock.owner.is_alive():
            lock.release()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str] | None) -> Iterator[OutputLock | None]:
    """Hold :class:`OutputLock` on ``folder`` (created if missing) for the ``with`` block, so that a
    second run into it is refused at its start instead of interleaving its files with this run's;
    nothing for None. A folder this call created and left empty is removed again (a run refused
    before writing leaves nothing behind).

    Raises:
        OutputError: another live process holds the folder, or it cannot be created.
    """
    if folder is None:
        yield None
        return
    out = Path(folder)
    created = []  # the folders this call makes, deepest first (a/b/c of a missing a/b/c)
    p = out
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from exc
    lock = OutputLock.acquire(out)
    try:
        yield lock
    finally:
        lock.release()
        for d in created:
            try:
                d.rmdir()  # only succeeds when empty
            except OSError:
                break


def _ours(holder: dict) -> bool:
    """Whether a lock file's holder is this process (a command that locks a folder it already holds)."""
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _folder_key(folder: Path) -> str:
    """The folder's real path: one key however it is spelled (links, ``..``)."""
    return os.path.realpath(folder)


def _refuse_other_thread(folder: Path) -> None:
    """Raise when another live thread of this process holds ``folder``'s lock (a run of this thread, or
    of a thread that has ended, does not block: the process orders its own runs)."""
    # flock tells processes apart, not threads: a run from another thread of this process (a notebook's thread
    # pool) would be taken for this one locking a folder it already holds, and the two journals would interleave
    key = _folder_key(folder)
    with _THREADS_LOCK:
        owner = next((lock.owner for lock in _HELD if _folder_key(lock.path.parent) == key), None)
    if owner is not None and owner is not threading.current_thread() and owner.is_alive():  # (thread ids are reused)
        raise OutputError("another spectra run of this process (in another thread) is writing into this folder", path=folder,
                          hint="give each concurrent run its own out_dir, or wait for that one to finish")


def _held(folder: Path, holder: dict) -> OutputError:
    return OutputError(f"another spectra run is writing into this folder (pid {holder.get('pid', '?')} on "
                       f"{holder.get('host', '?')}, started {holder.get('started', '?')})", path=folder,
                       hint="wait for it to finish or choose another --out; the lock is released when that process ends")


def refuse_if_held(folder: str | os.PathLike[str]) -> None:
    """Raise the :class:`OutputLock` refusal when a live run of another process holds ``folder`` (checked
    before "the output folder is not empty", whose hint, --force, would delete that run's files); nothing
    when the folder has no lock, or one whose run has ended, or this process holds it."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None:  # pragma: no cover - not POSIX
        return
    try:
        fd = os.open(path, os.O_RDONLY | _LOCK_OPEN)
    except OSError:  # no lock file (or not one of ours): nothing holds the folder
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts only with a live holder's exclusive lock
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        holder = _read_holder(fd)
        if not _ours(holder):
            raise _held(Path(folder), holder) from None
        _refuse_other_thread(Path(folder))
    except OSError:  # no flock here (some network mounts): runs are not locked there
        pass
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    """The pid, host and start time a lock file holds ({} when unreadable)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remove_earlier_outputs(out: Path, marker: str, schema: str, names: tuple[str, ...] = (),
                           patterns: tuple[str, ...] = ()) -> None:
    """Before a new run writes its files into ``out``: when ``out/marker`` is an earlier result of the same
    command (its JSON opens with ``"schema": schema``), remove that run's ``names`` and the files matching
    ``patterns`` (globs), the marker last, so that a run stopped part way leaves fewer files, never some of
    another run's (a new compare.json beside an earlier run's figures of other inputs). A folder without
    such a marker keeps every file (they are not that command's); links and folders are left alone.

    Raises:
        OutputError: a file cannot be removed.
    """
    try:  # non-blocking, and only a regular file: a FIFO under the marker's name blocked the run forever
        fd = os.open(out / marker, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        head = os.pread(fd, 256, 0).decode("utf-8", "replace")  # the schema is the first key spectra writes
    except OSError:
        return
    finally:
        os.close(fd)
    if re.match(r'\s*\{\s*"schema"\s*:\s*"' + re.escape(schema) + '"', head) is None:
        return
    found = [out / n for n in names if n != marker] + [f for pattern in patterns for f in sorted(out.glob(pattern))]
    for f in [*found, out / marker]:
        if f.is_file() and not f.is_symlink():
            try:
                f.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise output_error(f, exc) from exc


def file_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, hex (read in 1 MiB chunks: memory stays flat whatever the file's size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_spread(h: Any, fd: int, start: int, nbytes: int, *, samples: int, chunk: int) -> None:
    """Feed the hash ``h`` with ``samples`` chunks of ``chunk`` bytes (all of them when fewer) spread evenly over bytes
    ``[start, start + nbytes)`` of the open file ``fd``, the first and last included. Raises OSError as ``os.pread``."""
    span = max(0, nbytes - chunk)
    for i in range(samples):
        h.update(os.pread(fd, min(chunk, nbytes), start + span * i // max(1, samples - 1)))


def content_sample(path: str | os.PathLike[str], *, samples: int = 16, chunk: int = 4096) -> str | None:
    """SHA-256 of ``samples`` chunks of ``chunk`` bytes spread evenly over the file (64 KiB read
    whatever its size; None if it cannot be read): a file replaced by another of the same size with
    its modification time kept (``cp -p``, ``rsync -a``, ``tar x``) is told apart, as its weights differ."""
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            hash_spread(h, fd, 0, os.fstat(fd).st_size, samples=samples, chunk=chunk)
        finally:
            os.close(fd)
    except OSError:
        return None
    return h.hexdigest()
