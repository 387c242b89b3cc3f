"""Where spectra may read: regular files only, and only inside the folder the user named.

Two guards for every file spectra opens on a user's behalf (weights, shards, index files,
``config.json``, adapter files):

- :func:`regular_file` / :func:`open_regular`: a FIFO, socket, device or folder where a file is
  expected is refused *before* anything could block on it (``open()`` on a FIFO waits for a writer
  forever). The check is ``os.stat`` + ``S_ISREG``, then the file is opened with ``O_NONBLOCK`` and
  checked again with ``fstat``, so a file swapped for a FIFO in between cannot block either.
- :func:`check_inside`: a file found *inside* a checkpoint folder (a shard an index names, a
  ``config.json``, ``model.safetensors``) must resolve, symlinks followed, to a path inside that
  folder (:func:`allowed_roots`). A folder may link anywhere inside itself; a Hugging Face hub
  snapshot may also link into its own repository's ``blobs/``, as the hub cache does.

The paths the user typed are trusted as given: naming ``/data/x.safetensors`` reads it wherever it
links. What the files themselves name is not.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from spectra.errors import CheckpointFormatError, CheckpointNotFoundError, ConfigError, SpectraError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def refuse_empty_path(x: object, message: str) -> None:
    """ConfigError(``message``) when ``x`` is the empty string: ``Path("")`` is ``"."``, so an unset shell variable
    (``spectra diff "$BASE" …``) would read the current folder without a word."""
    if isinstance(x, str) and not x:
        raise ConfigError(message, hint="is a shell variable unset? pass the file or folder; . is the current folder")


def checkpoint_location(x: object) -> str | os.PathLike[str]:
    """``x`` when it names a checkpoint on disk (a non-empty ``str`` or path-like); otherwise ConfigError saying how to
    save what was given. spectra streams checkpoints from their files (bounded memory, resumable runs,
    fingerprints of the inputs), so an in-memory state dict, module or tensor is saved first."""
    refuse_empty_path(x, "an empty path names no checkpoint")
    if isinstance(x, (str, os.PathLike)):
        return x
    kind = type(x).__name__
    if isinstance(x, dict):
        hint = ("a state dict? save it first: safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "
                "'tuned.safetensors'), and pass the file's path")
    elif hasattr(x, "state_dict") and hasattr(x, "parameters"):
        hint = "a model? save it first (model.save_pretrained(folder), or safetensors of its state_dict()) and pass the path"
    else:
        hint = "pass a .safetensors/.bin file, a model or adapter folder, an index file or a hub cache id"
    raise ConfigError(f"a checkpoint is given by its path, not as a {kind}", hint=hint)


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words (``"a FIFO (named pipe)"``, ``"a folder"``...)."""
    return next((kind for test, kind in _KINDS if test(mode)), "not a file")


def missing_text(path: str | os.PathLike[str], missing: str = "no such file or folder") -> str:
    """Why nothing is at ``path``, in words: ``missing``, or that it is a symbolic link whose target
    does not exist (the link itself is there, so "no such file" alone would puzzle the user)."""
    try:
        if os.path.islink(path):
            try:
                os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # the link leads back to itself: its target "exists", as a loop
                    return f"is a symbolic link to {os.readlink(path)!r}, a loop of symbolic links (it leads back to itself)"
            return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
    except (OSError, ValueError):
        pass
    return missing


def unreadable_hint(exc: BaseException) -> str:
    """What to do about an ``OSError`` from stat/open of a path the user named, by its errno."""
    if getattr(exc, "errno", None) == errno.ELOOP:
        return "the path is a loop of symbolic links: point it at the real file or folder"
    if getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM):
        return "check the file's permissions"
    return "check the path"


def regular_file(path: str | os.PathLike[str], *, tensor: str | None = None) -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed), refusing anything but a regular file.

    Raises:
        CheckpointNotFoundError: nothing at ``path`` (or a dangling symlink), or it cannot be stat'ed.
        CheckpointFormatError: ``path`` is a FIFO, socket, device or folder; nothing was opened.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(missing_text(path, "no such file"), path=path, tensor=tensor) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise CheckpointNotFoundError(f"cannot read the file ({getattr(exc, 'strerror', None) or exc})", path=path,
                                      tensor=tensor, hint=unreadable_hint(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointFormatError(f"is {file_kind(st.st_mode)}, not a regular file", path=path, tensor=tensor,
                                    hint="spectra reads checkpoints from regular files only")
    return st


def open_regular(path: str | os.PathLike[str], *, tensor: str | None = None) -> int:
    """Open ``path`` read-only and return the descriptor, refusing (without blocking) anything that is
    not a regular file. The caller closes it.

    ``O_NONBLOCK`` makes ``open()`` of a FIFO return at once instead of waiting for a writer; the
    ``fstat`` that follows sees the file actually opened, whatever replaced it since a first check.

    Raises:
        CheckpointNotFoundError, CheckpointFormatError: as :func:`regular_file`.
    """
    regular_file(path, tensor=tensor)  # a clear message before any open(), and no open() of a device
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot read the file ({exc.strerror or type(exc).__name__})", path=path,
                                      tensor=tensor, hint=unreadable_hint(exc)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointFormatError(f"is {file_kind(st.st_mode)}, not a regular file", path=path, tensor=tensor,
                                    hint="spectra reads checkpoints from regular files only")
    return fd


def allowed_roots(folder: str | os.PathLike[str]) -> tuple[Path, ...]:
    """The real folders files found in ``folder`` may resolve into: ``folder`` itself, and for a hub
    cache snapshot (``…/models--org--name/snapshots/<commit>``) also that repository's ``blobs/``,
    where the hub cache keeps the files the snapshot links to, itself resolved: a cache whose ``blobs/``
    links to another disk keeps its files there."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
        roots.append(Path(os.path.realpath(real.parent.parent / "blobs")))
    return tuple(roots)


def check_inside(path: str | os.PathLike[str], roots: tuple[Path, ...], *, what: str | None = None,
                 error: type[SpectraError] = CheckpointFormatError) -> Path:
    """``path`` with symlinks resolved, refusing one that lands outside every folder in ``roots``.

    Args:
        path: a file found inside a checkpoint folder (it need not exist).
        roots: from :func:`allowed_roots`.
        what: how to name it in the message (default: ``path`` relative to the first root).

    Raises:
        CheckpointFormatError: ``path`` resolves outside ``roots``; nothing was opened.
    """
    real = Path(os.path.realpath(path))
    if any(real == root or real.is_relative_to(root) for root in roots):
        return real
    raise error(f"{what or Path(path).name} resolves outside the checkpoint folder (to {real})", path=roots[0],
                hint="spectra reads only files inside the folder it is given; copy the file into the folder")


#: What identifies the bytes of a file: ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``. A file replaced
#: (a new inode) or rewritten in place (new size, mtime or change time: ``cp -p`` or ``rsync -t`` restore the mtime
#: of a file rewritten in place, never its ctime) since its header was read no longer matches.
FileStamp = tuple[int, int, int, int, int]


def file_stamp(st: os.stat_result) -> FileStamp:
    """The :data:`FileStamp` of a ``stat`` / ``fstat`` result."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_unchanged(path: str | os.PathLike[str], stamp: FileStamp | None, now: os.stat_result | FileStamp, *,
                    tensor: str | None = None) -> None:
    """Refuse to read on when the file at ``path`` (now ``now``, a stat result or stamp) is not the one
    whose header gave ``stamp``: offsets from the old header would read the new bytes, mixing two
    checkpoints into silently wrong numbers.

    Raises:
        CheckpointFormatError: the file was replaced or rewritten since it was opened (None: nothing to check).
    """
    now = file_stamp(now) if isinstance(now, os.stat_result) else now  # a stat_result is a tuple too
    if stamp is None or now == stamp:
        return
    if now[:4] == stamp[:4]:  # only the change time: permissions, links or a rewrite whose mtime was put back
        raise CheckpointFormatError("file changed since it was opened (its change time moved: a chmod, a new hard link, or a "
                                    "rewrite in place whose modification time was restored, which spectra cannot tell apart)",
                                    path=path, tensor=tensor, hint="rerun when nothing else touches the file")
    # a shorter file is usually a truncation (or a writer that truncates first): say how short
    shrunk = f"file ended after {now[2]} of the {stamp[2]} bytes it had when opened: " if now[2] < stamp[2] else ""
    raise CheckpointFormatError(f"{shrunk}file changed since it was opened", path=path, tensor=tensor,
                                hint="rerun when it is no longer being written; if it was truncated, download it again")


_HUB_ENTRY = ("models--", "datasets--", "spaces--")


def _snapshot_of(entry: Path) -> str | None:
    """The snapshot (commit folder) of a hub cache entry that ``refs/main`` names, else its only one."""
    try:
        ref, commit = entry / "refs" / "main", ""
        if ref.is_file():  # a regular file (never a FIFO); a commit hash is 40 characters
            with open(ref, "rb") as f:
                commit = f.read(200).decode("utf-8", errors="replace").strip()
        if commit and "/" not in commit and (entry / "snapshots" / commit).is_dir():
            return commit
        snaps = [p.name for p in (entry / "snapshots").iterdir() if p.is_dir()]
    except OSError:
        return None
    return snaps[0] if len(snaps) == 1 else None


def hub_cache_hint(folder: Path) -> tuple[str, str] | None:
    """``(what the folder is, what to pass instead)`` when ``folder`` is a Hugging Face hub cache, one of
    its entries (``models--org--name``) or an entry's ``snapshots/``, which hold no weights themselves;
    None for any other folder."""
    name, parent = folder.name, folder.parent
    if name == "snapshots" and parent.name.startswith(_HUB_ENTRY):
        folder, name = parent, parent.name
    if name.startswith(_HUB_ENTRY) and (folder / "snapshots").is_dir():
        repo = name.split("--", 1)[1].replace("--", "/", 1)
        rev = _snapshot_of(folder)
        where = folder / "snapshots" / (rev or "<revision>")
        return ("it is a Hugging Face hub cache entry; its weights are in a snapshot folder inside it",
                f"pass {where} or the repo id {repo}" + ("" if rev else f"; its revisions are the folders in {folder / 'snapshots'}"))
    try:
        entries = sorted(p.name for p in folder.iterdir() if p.name.startswith("models--") and p.is_dir())
    except OSError:
        return None
    if not entries:
        return None
    repo = entries[0].split("--", 1)[1].replace("--", "/", 1)
    return (f"it is a Hugging Face hub cache ({len(entries)} models)",
            f"pass a repo id such as {repo}, with HF_HUB_CACHE={folder} if it is not the default cache, "
            f"or a snapshot folder such as {folder / entries[0] / 'snapshots' / '<revision>'}")
