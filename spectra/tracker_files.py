"""The files :class:`spectra.callbacks.SpectraTracker` keeps beside ``trace.jsonl``: each matrix's first measured
subspaces (``trace_first.npz``), which a resumed run measures φ from, and an earlier training's trace set aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spectra.interference import Subspaces

#: Beside ``trace.jsonl``: the first measured subspaces, which a resumed run measures φ from.
FIRST_FILE = "trace_first.npz"  # numpy, not .safetensors: a folder's one .safetensors file is its model


def load_first(path: Path) -> dict[str, Subspaces]:
    """The first subspaces :class:`spectra.callbacks.SpectraTracker` wrote, by matrix name ({} when none or unreadable)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError):
        return {}
    names = {k.rsplit(".", 1)[0] for k in arrays}
    return {n: Subspaces(arrays[f"{n}.U"], arrays[f"{n}.V"]) for n in names if f"{n}.U" in arrays and f"{n}.V" in arrays}


def set_aside(out: Path) -> str | None:
    """Rename ``trace.jsonl`` (and ``trace_first.npz``) in ``out`` to the first free ``trace.N.jsonl``
    (``trace_first.N.npz``); the new name, or None when there was no trace."""
    trace = out / "trace.jsonl"
    if not trace.is_file():
        return None
    n = 1
    while (out / f"trace.{n}.jsonl").exists():
        n += 1
    trace.rename(out / f"trace.{n}.jsonl")
    if (out / FIRST_FILE).is_file():
        (out / FIRST_FILE).rename(out / f"trace_first.{n}.npz")
    return f"trace.{n}.jsonl"


__all__ = ["FIRST_FILE", "load_first", "set_aside"]
