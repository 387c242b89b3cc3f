"""Where a model named by a Hugging Face hub id (``org/name[@revision]``) sits in the local hub cache: nothing is
downloaded; the folder is read as any model folder (:func:`spectra.io.checkpoint.open_checkpoint`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from spectra.errors import CheckpointNotFoundError
from spectra.io.paths import check_inside, open_regular


def hub_cache_dir() -> Path:
    """The hub cache folder as ``huggingface_hub`` resolves it (env vars first); an unknown ``~user``: one line."""
    var = next((v for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME") if os.environ.get(v)), "XDG_CACHE_HOME")
    raw = os.environ[var] if var != "XDG_CACHE_HOME" else os.path.join(os.environ.get(var, "~/.cache"), "huggingface")
    try:
        where = Path(raw).expanduser()
    except RuntimeError:  # "~nouser/…", or no home directory to expand "~" to
        raise CheckpointNotFoundError(f"{var}={raw!r}: its ~ cannot be expanded", hint=f"set {var} to a full path") from None
    return where if var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE") else where / "hub"


#: A snapshot folder name: the hub writes 40-hex commit hashes; any single plain path component is accepted.
_COMMIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def resolve_hub_cache(repo: str) -> Path:
    """Snapshot folder of ``org/name[@revision]`` in the local hub cache; nothing is downloaded.

    The revision (or what ``refs/<revision>`` holds) must name a snapshot folder directly: a plain
    name, never a path, and the snapshot must resolve inside the repository's cache entry.

    Raises:
        CheckpointNotFoundError: the model or revision is not cached, or a ref holds a path.
    """
    repo_id, _, revision = repo.partition("@")
    revision = revision or "main"
    if ".." in revision.split("/") or revision.startswith("/"):
        raise CheckpointNotFoundError(f"revision {revision!r} is not a valid revision name", path=repo)
    cache = hub_cache_dir()
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    hint = f"download it first (e.g. `hf download {repo_id}`); spectra works offline and never downloads"
    if not entry.is_dir():
        raise CheckpointNotFoundError(f"{repo_id} is not in the local Hugging Face cache ({cache})", path=repo, hint=hint)
    ref = entry / "refs" / revision
    commit = revision
    if ref.is_file():
        check_inside(ref, (Path(os.path.realpath(entry)),), what=f"refs/{revision}", error=CheckpointNotFoundError)
        commit = _read_ref(ref)
        if not _COMMIT.match(commit):
            raise CheckpointNotFoundError(f"refs/{revision} holds {commit[:80]!r}, not a commit", path=entry,
                                          hint="the cache entry is corrupt or was tampered with; download the model again")
    snapshot = entry / "snapshots" / commit
    if not _COMMIT.match(commit) or not snapshot.is_dir():
        try:  # the snapshots that are there (a cache copied without refs/, or a download by commit)
            held = sorted(p.name for p in (entry / "snapshots").iterdir() if _COMMIT.match(p.name) and p.is_dir())
        except OSError:
            held = []
        if held:
            hint = (f"pass one of the cached revisions: {', '.join(f'{repo_id}@{h}' for h in held[:3])}"
                    + (f" ({len(held)} in all)" if len(held) > 3 else "") + f", or {hint}")
        raise CheckpointNotFoundError(f"revision {revision!r} of {repo_id} is not in the local cache ({entry})", path=repo, hint=hint)
    check_inside(snapshot, (Path(os.path.realpath(entry / "snapshots")),), error=CheckpointNotFoundError)
    return snapshot


def _read_ref(path: Path, limit: int = 1024) -> str:
    """The first ``limit`` bytes of a hub ref (a commit hash), stripped; a FIFO is refused."""
    fd = open_regular(path)
    try:
        return os.pread(fd, limit, 0).decode("utf-8", errors="replace").strip()
    finally:
        os.close(fd)
