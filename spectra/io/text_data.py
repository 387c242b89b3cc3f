"""Which files of a training ``--data`` (or ``--eval-source``) folder are read, and what identifies their contents.

A folder's text is every file under it (recursively) whose suffix is one of :data:`TEXT_SUFFIXES` or ``.jsonl``.
:func:`data_fingerprint` names those files and the SHA-256 of each one's bytes, so that ``spectra sweep --resume`` can
tell a folder whose files were added, removed or rewritten from the one its finished runs trained on (a sample of the
bytes missed an edit between its chunks: training text is small beside a model, and read whole anyway).
"""

from __future__ import annotations

import os
from pathlib import Path

from spectra.io.files import file_digest

#: The suffixes of a data folder's text files (lowercased: ``b.TXT`` is text too), besides ``.jsonl``.
TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".sh",
                           ".toml", ".yaml", ".yml"})


def text_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """``(every regular file under folder, those read as text)``, sorted: the text is :data:`TEXT_SUFFIXES` and
    ``.jsonl`` files (FIFOs and other special files are skipped)."""
    found = sorted(f for f in folder.rglob("*") if f.is_file())
    return found, [f for f in found if f.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl")]


def data_fingerprint(path: str | os.PathLike[str]) -> list | None:
    """What identifies the text of a data path: ``[SHA-256, size]`` of a file; of a folder, that of each file read
    (:func:`text_files`) by its path inside the folder; None for a path that cannot be read."""
    p = Path(path)
    try:
        if p.is_dir():
            return [[str(f.relative_to(p)), file_digest(f), f.stat().st_size] for f in text_files(p)[1]]
        return [file_digest(p), os.path.getsize(p)] if p.is_file() else None
    except OSError:
        return None


def overlapping(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two data paths share text: a file either reads (a folder's :func:`text_files`, a file itself) is one
    file of the other, by any spelling or link (an ``--eval-source`` file inside the ``--data`` folder, or linked
    into it, is trained on), or holds the same bytes (a copy); False when either cannot be read."""
    def files(p: Path) -> list[tuple[Path, os.stat_result]]:
        return [(f, f.stat()) for f in (text_files(p)[1] if p.is_dir() else [p])]

    try:
        fa, fb = files(Path(a)), files(Path(b))
        if {(x.st_dev, x.st_ino) for _, x in fa} & {(x.st_dev, x.st_ino) for _, x in fb}:
            return True
        common = {x.st_size for _, x in fa} & {x.st_size for _, x in fb} - {0}  # a copy has the size of its source
        digests = {file_digest(f) for f, x in fb if x.st_size in common}
        return any(file_digest(f) in digests for f, x in fa if x.st_size in common)
    except OSError:
        return False


__all__ = ["TEXT_SUFFIXES", "data_fingerprint", "overlapping", "text_files"]
