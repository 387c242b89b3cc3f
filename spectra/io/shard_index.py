"""Which shard of a sharded checkpoint each tensor is read from, as transformers reads them.

transformers reads every tensor of every shard a ``*.index.json`` lists, the shard files in the
sorted order of their names *as the index spells them* (``./b.safetensors`` sorts before
``a.safetensors``), a later one replacing an earlier one of the same name: the index's weight map
only lists the files. spectra reads the same copies, and says where that differs from what the
index maps (:func:`read_order`). Pure functions over names; the files are opened by
:mod:`spectra.io.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import TypeVar

__all__ = ["read_order", "safe_relative", "shard_key"]

_I = TypeVar("_I")


def _plain(shard: str) -> bool:
    # a plain file name (every real index's spelling): its own key and safe, without pathlib's parse, which
    # made an index of 10**6 shards cost a minute
    return "/" not in shard and "\\" not in shard and ":" not in shard and "\0" not in shard and shard not in ("", ".", "..")


def shard_key(shard: str) -> str:
    """A shard path in one spelling: ``./a.bin`` -> ``a.bin``, ``sub//a.bin`` -> ``sub/a.bin``."""
    return shard if _plain(shard) else str(PurePosixPath(shard))


def safe_relative(shard: str) -> bool:
    """Whether ``shard`` is a relative path that stays in the index's folder (no ``..``, no drive, no NUL)."""
    if _plain(shard):
        return True
    p = PurePosixPath(shard.replace("\\", "/"))
    return bool(shard) and not p.is_absolute() and ".." not in p.parts and ":" not in shard and "\0" not in shard


def read_order(spellings: list[str], weight_map: Mapping[str, str], per_shard: Mapping[str, Mapping[str, _I]],
               index_name: str) -> tuple[dict[str, _I], dict[str, str], list[str]]:
    """The tensors read from the shards, the shard each one's copy comes from, and notes.

    Args:
        spellings: the shard paths as the index spells them, each distinct one once, sorted.
        weight_map: tensor name -> its shard's key (:func:`shard_key`).
        per_shard: shard key -> tensor name -> its info, for every listed shard.
        index_name: the index file's name, for the notes.

    Returns:
        ``(tensors, source, notes)``: name -> info of the copy read, name -> its shard key, and one
        sentence per kind of difference from the map (a tensor the map does not list; one in several
        shards; one only in another shard than the map names). A name the map lists and no shard
        holds is the caller's to refuse (absent from ``tensors``).
    """
    holders: dict[str, int] = {}
    for infos in per_shard.values():
        for name in infos:
            holders[name] = holders.get(name, 0) + 1
    tensors: dict[str, _I] = {}
    source: dict[str, str] = {}
    # a shard spelled two ways is read at each spelling, as transformers reads it: its last one decides
    for spelling in spellings:
        shard = shard_key(spelling)
        for name, info in per_shard[shard].items():
            tensors[name], source[name] = info, shard
    unlisted = [n for n in tensors if n not in weight_map]
    moved = [n for n, shard in weight_map.items() if n in source and source[n] != shard]
    # every name held twice, also one the map puts in the shard read last: the other copy, with other values
    # maybe, is left out, and that is worth a line whichever shard the map names
    copies = [n for n in tensors if holders[n] > 1]
    elsewhere = [n for n in moved if holders[n] == 1]
    notes = []
    if unlisted:
        notes.append(f"{len(unlisted)} tensor(s) in the shards are not in {index_name} (e.g. {unlisted[0]}): read, as "
                     "transformers reads every tensor of every listed shard")
    if copies:
        mapped = f"mapped to {weight_map[copies[0]]}" if copies[0] in weight_map else f"not in {index_name}"
        notes.append(f"{len(copies)} tensor(s) are in more than one shard (e.g. {copies[0]}, {mapped}): "
                     f"read from {source[copies[0]]}, the last in the order of the index's file names, as transformers does")
    if elsewhere:
        notes.append(f"{len(elsewhere)} tensor(s) are not in the shard the index maps them to (e.g. {elsewhere[0]}, mapped to "
                     f"{weight_map[elsewhere[0]]}): read from {source[elsewhere[0]]}, the one shard holding it, as transformers "
                     "reads every tensor of every listed shard")
    return tensors, source, notes
