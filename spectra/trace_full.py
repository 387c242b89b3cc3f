"""A trace of full checkpoints (:func:`spectra.trace.trace`), matrix by matrix: the base tensor read once, then the
same tensor of every checkpoint, so memory holds one base matrix, one ΔW and two top-k subspaces (the first and the
previous checkpoint's) whatever the number of checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spectra.delta import form_delta, oriented, pair_floor, pair_notes
from spectra.errors import CheckpointFormatError, ResultsFormatError, SpectraError
from spectra.interference import Subspaces, spectrum_and_top, subspace_turn
from spectra.io.checkpoint import Checkpoint
from spectra.journal import RecordJournal
from spectra.numerics import unresolved_text
from spectra.pairing import ALIAS_REASON, PAIRING_NOTE_PREFIX, pair_by_base_names, refuse_lora_file
from spectra.pairing_notes import unpaired_matrices
from spectra.results import caveat_codes
from spectra.selection import fused_whole_warning, refuse_empty_selection, selector
from spectra.ties import UNDETERMINED_TEXT, undetermined_cut
from spectra.trace_checks import (
    absent_warning,
    gap_note,
    pairing_notes_text,
    steps_text,
    unpaired_warnings,
)
from spectra.trace_inputs import CheckpointRef, check_earlier_points, check_trace_matrix
from spectra.trace_points import TraceConfig, jsonable, matrix_meta, matrix_order, point_metrics, skip_point, weight_alpha

if TYPE_CHECKING:
    from spectra.trace import TraceResult


def trace_full(result: TraceResult, refs: list[CheckpointRef], ckpts: list[Checkpoint], base: Checkpoint,
                config: TraceConfig, device: torch.device, journal: RecordJournal | None, done: list[dict],
                callback: Callable[[int, int, str], None] | None) -> None:
    """Matrix by matrix: the base tensor once, then the same tensor of every checkpoint."""
    pairings, said, unpaired = [], {}, {}  # what pairing said of each checkpoint (names differing in spelling…), as diff warns it
    why_not: list[dict[str, str]] = []  # per checkpoint: matrix -> why pairing left it out (an integer dtype…)
    for ref, ck in zip(refs, ckpts):
        try:
            pairing = pair_by_base_names(base, ck)
        except SpectraError as exc:
            ref.failed = f"does not pair with the base ({exc.message})"
            pairings.append({})
            why_not.append({})
            continue
        what, most = unpaired_matrices(pairing, ck)  # another architecture: its few matching shapes are no update of this base
        if most:
            ref.failed = f"does not pair with the base ({what}): a checkpoint of another model?"
            pairings.append({})
            why_not.append({})
            continue
        if what:
            unpaired.setdefault(what, []).append(Path(ref.path).name)
        pairings.append({p.base.name: p for p in pairing.pairs})
        why_not.append({k.name: k.reason for k in pairing.skipped})
        for note in (n for n in pairing.notes if n.startswith(PAIRING_NOTE_PREFIX)):  # read notes: said apart
            said.setdefault(note, []).append(Path(ref.path).name)
        for k in (k for k in pairing.skipped if k.reason.startswith(ALIAS_REASON)):  # tied names a .bin saved whole
            said.setdefault(f"{k.name} is not followed: {k.reason}", []).append(Path(ref.path).name)
    result.warnings += [f"{', '.join(names[:3])}{' …' * (len(names) > 3)}: {note}" for note, names in said.items()]
    result.warnings += unpaired_warnings(unpaired)
    if all(ref.failed for ref in refs):
        for ck in ckpts:  # an adapter's weights file given as a checkpoint: said as such
            refuse_lora_file(ck)
        raise CheckpointFormatError("no checkpoint pairs with the base", path=result.run or refs[0].path,
                                    hint="is BASE the model these checkpoints were trained from? `spectra inspect` shows both")
    earlier: dict[str, tuple[dict, list]] = {}  # name -> its journal record with the most points, and their caveats
    for i, rec in enumerate(done, 1):  # a resumed run: finished matrices and checkpoints that failed earlier
        if "matrix" in rec:
            m = rec["matrix"]
            check_trace_matrix(m, f"record {i}", journal.path if journal else None)
            check_earlier_points(m, rec.get("caveats", []), refs, f"record {i}", journal.path if journal else None)
            if len(m["points"]) > len(earlier.get(m["name"], ({"points": []},))[0]["points"]):
                earlier[m["name"]] = (m, rec.get("caveats", []))
        elif "failed" in rec:
            f = rec["failed"]
            if not (isinstance(f, dict) and isinstance(f.get("index"), int) and 0 <= f["index"] < len(refs)
                    and isinstance(f.get("reason"), str)):
                raise ResultsFormatError(f"record {i}: a failed checkpoint must have an index below {len(refs)} and a "
                                         "reason", path=journal.path if journal else None,
                                         hint="the journal was edited: run without --resume into a new folder")
            refs[f["index"]].failed = f["reason"]
    # every checkpoint measured: as it was; a run resumed with checkpoints saved since: the earlier points kept, the rest added
    result.matrices += [m for m, _ in earlier.values() if len(m["points"]) == len(refs)]
    finished = {m["name"] for m in result.matrices}
    specs = base.specs
    keep = selector(config.include, config.exclude, config.layers)
    names = sorted({n for p in pairings for n in p}, key=lambda n: matrix_order(matrix_meta(specs[n], (0, 0), None)))
    todo = []
    result.warnings += absent_warning([n for n, s in specs.items() if s.layer is not None and keep(n, s.layer)
                                       and len(base.tensors[n].shape) == 2], names)
    for name in names:
        if not keep(name, specs[name].layer):
            continue
        if len(base.tensors[name].shape) != 2:
            result.skipped.append({"name": name, "reason": "3-D expert stack: trace follows 2-D matrices only"})
        elif name not in finished:
            todo.append(name)
    if stacks := [s["name"] for s in result.skipped if "3-D expert stack" in s["reason"]]:  # the update may be mostly there
        result.warnings.append(f"{len(stacks)} 3-D expert stack(s) are not traced (e.g. {stacks[0]}): trace follows 2-D matrices only; "
                               "spectra diff analyses each expert")
    if not todo and not finished and not result.skipped:
        refuse_empty_selection(len(names), names[0] if names else "", include=config.include, exclude=config.exclude,
                               layers=config.layers, what="matrices the checkpoints update")
    if w := fused_whole_warning((specs[n] for n in sorted(set(todo) | finished) if n in specs), "trace"):
        result.warnings.append(w)
    total = len(todo) + len(finished)
    for count, name in enumerate(todo, start=len(finished) + 1):
        W = base.load(name)  # the one read of this base tensor
        first = prev = meta = base_alpha = None
        prev_at = None  # index of the checkpoint prev is from
        points = []
        caveats: dict[str, list[tuple[int | None, str]]] = {}  # code -> (step, its message) at each checkpoint
        if name in earlier:  # the points of the checkpoints an earlier run traced; its first and previous subspaces again
            m, said_then = earlier[name]
            points, meta = list(m["points"]), matrix_meta(specs[name], tuple(m["shape"]), m["base_fro_norm"])
            base_alpha = (m["base_alpha"], m.get("base_alpha_sigma")) if "base_alpha" in m else None
            for step, msg in said_then:
                caveats.setdefault((caveat_codes(msg) or [msg])[0], []).append((step, msg))
            first, prev, prev_at = _earlier_subspaces(name, W, points, pairings, ckpts, config, device)
        for ci, (ref, pairs) in enumerate(zip(refs, pairings)):
            if ci < len(points):
                continue
            if ref.failed:
                points.append(skip_point(ref.step, ref.failed))
                continue
            pair = pairs.get(name)
            if pair is None or len(pair.tuned_info.shape) != 2:
                points.append(skip_point(ref.step, why_not[ci].get(
                    name, "not in this checkpoint, or its shape differs from the base")))
                continue
            try:
                wt = ckpts[ci].load(pair.tuned.name)
            except (SpectraError, OSError) as exc:  # deleted (save_total_limit) or rewritten under us
                ref.failed = f"could not be read any more during the trace ({getattr(exc, 'message', exc)})"
                if journal:
                    journal.add({"failed": {"index": ci, "reason": ref.failed}})
                points.append(skip_point(ref.step, ref.failed))
                continue
            wb, wt, shape, base_fro, bad, notes, floor, S, top = _spectrum(pair, W, wt, device, config.top_k)
            if meta is not None and list(shape) != meta["shape"]:  # the rows it shares with the base differ
                points.append(skip_point(ref.step, f"its ΔW is {shape[0]}×{shape[1]}, not {meta['shape'][0]}×{meta['shape'][1]} "
                                                    "as at the earlier steps: this checkpoint shares other rows with the base"))
                continue
            meta = meta or matrix_meta(specs[name], shape, base_fro)
            if bad:
                points.append(skip_point(ref.step, f"{' and '.join(bad)} weights hold NaN or Inf; ΔW is undefined"))
                continue
            for msg in notes:  # rounding level, precision mismatch…
                caveats.setdefault((caveat_codes(msg) or [msg])[0], []).append((ref.step, msg))
            now = Subspaces.of(top)
            pt = {"step": ref.step, **point_metrics(S, shape, base_fro, config, floor=floor),
                  "turn_prev": subspace_turn(prev, now), "turn_first": subspace_turn(first, now)}
            if now is None and pt["fro_norm"] > 0:  # non-zero, yet nothing above the floor: null turns, said why
                pt["turn_note"] = f"{unresolved_text('ΔW', pair.tuned_info.dtype)}, so turn_prev and turn_first are null"
            else:  # "previous" skipped a checkpoint; a cut inside a tie too wide to widen: said
                said = [gap_note(refs, prev_at, ci) if prev is not None else None,
                        f"ΔW: {UNDETERMINED_TEXT}" if now is not None and undetermined_cut(S, top.S.numel(), floor) else None]
                if any(said):
                    pt["turn_note"] = "; ".join(x for x in said if x)
            if config.alpha:
                base_alpha = base_alpha or weight_alpha(wb, device)
                pt["alpha"], pt["alpha_sigma"] = weight_alpha(wt, device)
            del wt
            points.append(pt)
            if now is not None:
                prev, first, prev_at = now, first or now, ci
        if meta is None:
            result.skipped.append({"name": name, "reason": "no checkpoint could be read for it"})
            continue
        rec = {**meta, "points": points}
        if base_alpha is not None:
            rec["base_alpha"], rec["base_alpha_sigma"] = base_alpha
        if pairs_note := pairing_notes_text(name, refs, pairings):  # a resized vocabulary's rows, with the steps that resized it
            rec["note"] = "; ".join(x for x in (rec["note"], pairs_note) if x)
        for msg, steps in ((m, [st for st, x in said if x == m]) for said in caveats.values() for m in dict.fromkeys(x for _, x in said)):
            rec["note"] = "; ".join(x for x in (rec["note"], f"{steps_text(steps)}: {msg}") if x)  # its numbers are those steps'
        result.matrices.append(jsonable(rec))
        if journal:
            journal.add({"matrix": result.matrices[-1], "caveats": [[st, msg] for said in caveats.values() for st, msg in said]})
        if callback:
            callback(count, total, name)


def _spectrum(pair: Any, W: torch.Tensor, wt: torch.Tensor, device: torch.device, top_k: int) -> tuple[Any, ...]:
    """``(wb, wt, (out, in), ‖W_base‖_F, bad sides, numerical caveats, rounding floor, singular values, top-k factors)``
    of one checkpoint's ΔW of ``pair`` (``W`` the base tensor and ``wt`` the checkpoint's, as stored; ``wb``, ``wt``
    returned oriented); the last four empty or None when a side holds NaN or Inf (``bad``). Directions at the rounding
    level of the stored weights are not the update's: the spectrum's top is taken above the floor."""
    wb, wt = oriented(W, pair.base.transpose, pair.rows), oriented(wt, pair.tuned.transpose, pair.rows)
    delta, base_fro, bad = form_delta(wb, wt, device)
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    if bad:
        return wb, wt, shape, base_fro, bad, [], 0.0, None, None
    notes = pair_notes(pair, wb, wt, delta, base_fro)
    floor = pair_floor(pair, wb, wt, notes, delta)
    S, top = spectrum_and_top(delta, top_k, floor=floor)
    return wb, wt, shape, base_fro, bad, notes, floor, S, top


def _earlier_subspaces(name: str, W: torch.Tensor, points: list[dict[str, Any]], pairings: list[dict[str, Any]],
                       ckpts: list[Checkpoint], config: TraceConfig, device: torch.device) -> tuple[Any, Any, int | None]:
    """``(first, previous, index of previous)``: the top-k subspaces of matrix ``name``'s ΔW at the first and the
    last of its earlier ``points`` that had one (each checkpoint read again, as the run that measured them did), for
    the turns of the checkpoints a resumed run adds; Nones where no earlier point had one."""
    def at(ci: int) -> Subspaces | None:
        pair = pairings[ci].get(name)
        if pair is None:
            return None
        try:
            wt = ckpts[ci].load(pair.tuned.name)
        except (SpectraError, OSError):  # (the run's read of it says why, at its own point)
            return None
        *_, bad, _notes, _floor, _S, top = _spectrum(pair, W, wt, device, config.top_k)
        return None if bad else Subspaces.of(top)

    used = [ci for ci, pt in enumerate(points) if "skip" not in pt and pt.get("fro_norm")]
    first_at, first = next(((ci, s) for ci in used if (s := at(ci)) is not None), (None, None))
    if first is None:
        return None, None, None
    for ci in reversed(used):
        if ci == first_at:
            return first, first, first_at
        if (s := at(ci)) is not None:
            return first, s, ci
    return None, None, None
