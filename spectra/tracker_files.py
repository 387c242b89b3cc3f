"""The files :class:`spectra.callbacks.SpectraTracker` keeps beside ``trace.jsonl``: each matrix's first measured
subspaces (``trace_first.npz``), which a resumed run measures φ from, an earlier training's trace set aside, and the
check that a resumed trace keeps its options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectra.errors import ConfigError
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


def refuse_other_options(path: Path, now: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse to continue the trace in ``path`` (``trace.jsonl``) with other options than it began with: its header's
    ``kind`` and ``config`` (thresholds, top_k, include/exclude/layers; not the device) against ``now`` (the resumed tracker's, the
    header's fields; an option the header lacks, written before it existed, counts as its value in ``defaults``). Records
    of both would sit under one header: energy ranks at thresholds it does not list, matrices it did not select, turns
    of another k, read back as one trace. A file without a header is not checked.

    Raises:
        ConfigError: names each option that differs, with both values.
    """
    header = None
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:  # up to the header only (its first line)
        for line in f:  # newline="\n": records are framed by "\n" alone, as kept_records reads them
            try:
                rec = json.loads(line.removeprefix("\ufeff"))
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("header"), dict):
                header = rec["header"]
                break
    if header is None:
        return
    if not isinstance(header.get("config"), dict):
        raise ConfigError("the trace's header holds no options (its config is not a mapping): it cannot be continued", path=path,
                          hint="give the tracker another out_dir")
    was = json.loads(json.dumps({**defaults, **header["config"], "kind": header.get("kind")}, default=list))
    new = json.loads(json.dumps({"kind": now["kind"], **now["config"]}, default=list))  # tuples as the header's lists

    def shown(value: object) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:59] + "…"

    # (where it measures is no option of the trace: a run resumed on another device continues it)
    if differ := [f"{k} {shown(was.get(k))} → {shown(v)}" for k, v in new.items() if was.get(k) != v and k != "device"]:
        raise ConfigError(f"the trace was begun with other options than this resumed tracker's ({'; '.join(differ)}): its records "
                          "and the new ones would be read as one trace", path=path,
                          hint="resume with the options the trace began with, or give the tracker another out_dir")


def kept_records(path: Path, step: int) -> tuple[list[str], int, set[str], set[str]]:
    """What a run resumed at ``step`` keeps of its ``trace.jsonl``: ``(lines kept, records dropped, names of the
    matrices measured in the kept records, names measured at step itself)``. Records of a later step (matrices, logs,
    timings, and warnings said of one: a divergence the resumed run may not repeat) are dropped: the interrupted run
    measured them after the checkpoint, and the resumed run measures them again."""
    kept, dropped, measured, at_step = [], 0, set(), set()
    for line in path.read_text(encoding="utf-8", errors="replace").removeprefix("\ufeff").split("\n"):
        try:  # records are framed by "\n" alone (a name may hold U+2028, which splitlines() splits at)
            rec = json.loads(line)
        except ValueError:
            continue  # a blank line, or one torn by a kill or a full disk: the whole records after it are kept
        tagged = next((rec[k] for k in ("log", "timing") if isinstance(rec.get(k), dict)), None) if isinstance(rec, dict) else None
        at = rec.get("step") if isinstance(rec, dict) and ("matrix" in rec or "warning" in rec) else \
            tagged.get("step") if tagged is not None else None
        if isinstance(at, int) and at > step:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("matrix"), dict):
            measured.add(rec["matrix"].get("name"))
            if at == step:
                at_step.add(rec["matrix"].get("name"))
        kept.append(line + "\n")
    return kept, dropped, measured, at_step
