"""What ``spectra trace`` says about a run beside its numbers: checkpoints that do not fit the base (another
architecture: matrices of other shapes, or that the base lacks), adapters whose rank r or adapted modules change
between checkpoints, a median ‖ΔW‖/‖W_base‖ above 1, numerical caveats, and which step a ``turn_prev`` is from.

Pure functions of a trace's records (:mod:`spectra.trace` calls them; no I/O).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spectra.display import counted
from spectra.display import matrices as matrices_text
from spectra.metrics import oversized_update
from spectra.numerics import unresolved_text
from spectra.pairing import NOT_WEIGHTS
from spectra.pairing_notes import RESIZED_NOTE
from spectra.results import note_caveat_warnings, note_part
from spectra.results_check import is_num
from spectra.selection import unmeasured_clause
from spectra.trace_inputs import CheckpointRef, moved

#: Names shown per list in a warning before "…".
SHOWN = 3


def _names(names: list[str]) -> str:
    """The first :data:`SHOWN` names, comma-separated, with "…" when there are more."""
    return ", ".join(names[:SHOWN]) + (" …" if len(names) > SHOWN else "")


def unpaired_warnings(said: dict[str, list[str]]) -> list[str]:
    """One warning per description of :func:`unpaired_matrices` (``said``: it -> the checkpoints' names), for
    checkpoints traced despite it: their mismatched matrices are skipped there, the base's missing ones not traced."""
    return [f"{_names(names)}: {what}; those are not traced at {'these checkpoints' if len(names) > 1 else 'this checkpoint'} "
            "(a checkpoint of another model, or of a resized one?)" for what, names in said.items()]


def adapter_change_warnings(metas: dict[str, dict[str, Any]], points: dict[str, dict[int, dict[str, Any]]],
                            refs: list[CheckpointRef]) -> list[str]:
    """Warnings for an adapter run whose adapters differ between checkpoints: the rank r of a module (its points'
    ``lora_r``), or the modules adapted (one run keeps its ``target_modules``: a module entering or leaving the
    adapter between two steps is adapters of several runs listed together, or a resized one). ``points``: module ->
    checkpoint index -> point; a failed checkpoint neither adds nor drops a module."""
    out = []
    changed, scaled = [], []  # (module, its r / its scale at each checkpoint)
    for name in metas:
        pts = [points.get(name, {}).get(ci) or {} for ci in range(len(refs))]
        if len({p["lora_r"] for p in pts if p.get("lora_r")}) > 1:
            changed.append((name, [str(p.get("lora_r") or "–") for p in pts]))
        elif (s := [p["lora_scale"] for p in pts if is_num(p.get("lora_scale"))]) and max(s) > min(s) * (1 + 1e-6):  # another lora_alpha
            scaled.append((name, [f"{p['lora_scale']:.6g}" if is_num(p.get("lora_scale")) else "–" for p in pts]))
    if changed:
        out.append(f"the LoRA rank r differs between checkpoints for {len(changed)} of {len(metas)} modules (e.g. "
                   f"{changed[0][0]}: r = {', '.join(changed[0][1])}): are they checkpoints of one run? Each "
                   "point's effective_rank_over_r uses its own lora_r")
    if scaled:
        out.append(f"the LoRA scale s of s·B·A (lora_alpha / r, or / √r with rsLoRA) differs between checkpoints for "
                   f"{len(scaled)} of {len(metas)} modules (e.g. {scaled[0][0]}: s = {', '.join(scaled[0][1][:12])}"
                   f"{' …' if len(scaled[0][1]) > 12 else ''}): are they checkpoints of one run? A jump in the norms "
                   "at such a step is the scale's, not training's")
    used = [ci for ci, r in enumerate(refs) if not r.failed]
    steps = []  # at each step whose adapter adapts other modules than the one before: which entered, which left
    for a, b in zip(used, used[1:]):
        held = [{n for n in metas if ci in points.get(n, {})} for ci in (a, b)]
        came, went = sorted(held[1] - held[0]), sorted(held[0] - held[1])
        if came or went:
            steps.append(f"from step {refs[a].step} to {refs[b].step}, "
                         + " and ".join(x for x in (f"{len(came)} enter ({_names(came)})" if came else "",
                                                    f"{len(went)} leave ({_names(went)})" if went else "") if x))
    if steps:
        out.append(f"the adapted modules change between checkpoints: {'; '.join(steps[:SHOWN])}{' …' if len(steps) > SHOWN else ''}. "
                   "Are they checkpoints of one run? A module's points where its adapter lacks it are skipped")
    return out


def size_warning(refs: list[CheckpointRef], matrices: list[dict[str, Any]]) -> str | None:
    """A median ‖ΔW‖/‖W_base‖ (over the matrices that changed) above 1 at any checkpoint, not only the last: one from
    another run (another base) stands out wherever it is listed. None when there is none."""
    above, zero = [], []
    for i, r in enumerate(refs):
        big = oversized_update(m["points"][i].get("rel_norm") for m in matrices if len(m["points"]) > i and moved(m["points"][i]))
        if big:
            name = "the last checkpoint" if i == len(refs) - 1 else Path(r.path).name
            if big[1]:
                zero.append(name)
            else:
                above.append(f"{name} ({big[0]:.2f})")
    words = [f"the median ‖ΔW‖/‖W_base‖ is larger than the base weights themselves at {', '.join(above)}: was this run "
             "started from this base?"] if above else []
    words += [f"‖ΔW‖/‖W_base‖ is 1 on every changed matrix at {', '.join(zero)}, as when the "
              "tuned weights are all zero (ΔW = −W_base): preallocated or incompletely written checkpoints?"] if zero else []
    return "; ".join(words) or None


def gap_note(refs: list[CheckpointRef], prev_at: int | None, ci: int) -> str | None:
    """The ``turn_note`` of checkpoint ``ci`` when its ``turn_prev`` is measured from an earlier checkpoint
    than the one before (``prev_at``, the last with a subspace for the matrix), else None."""
    return None if prev_at is None or prev_at == ci - 1 else (
        f"turn_prev is from step {refs[prev_at].step}, the last checkpoint where this matrix has a subspace "
        f"(step {refs[ci - 1].step} has none: ΔW is zero there, or unresolved, or the point was skipped: see its fro_norm, "
        "turn_note or skip)")


def steps_text(steps: list[int | None]) -> str:
    """``"at step 4"`` or ``"at steps 2, 4"`` (an unknown step as ``?``): the checkpoints a note speaks of."""
    return f"at step{'s' * (len(steps) > 1)} {', '.join('?' if st is None else str(st) for st in steps)}"


def pairing_notes_text(name: str, refs: list[CheckpointRef], pairings: list[dict[str, Any]]) -> str:
    """The notes of matrix ``name``'s pairings with the checkpoints ``refs`` (``pairings[i]``: name -> its pair at
    ``refs[i]``; rows of a resized table, each side's layout), each once, with the steps that gave it where not every
    checkpoint holding the matrix did: a vocabulary resized at step 300 is said of the steps from 300 on."""
    held: list[int | None] = []
    said: dict[str, list[int | None]] = {}
    for ref, pairs in zip(refs, pairings, strict=True):
        if name in pairs:
            held.append(ref.step)
            if pairs[name].note:
                said.setdefault(pairs[name].note, []).append(ref.step)
    return "; ".join(msg if steps == held else f"{steps_text(steps)}: {msg}" for msg, steps in sorted(said.items()))


def failed_checkpoint_warnings(refs: list[CheckpointRef], matrices: list[dict[str, Any]]) -> list[str]:
    """One warning per checkpoint that failed (``refs[i].failed``), saying so of the matrices measured at its step before
    it failed (a file deleted or rewritten during the trace): those points hold the file as it was then, the others
    are skipped."""
    out = []
    for r in (r for r in refs if r.failed):
        kept = sum(1 for m in matrices for pt in m["points"] if isinstance(pt, dict) and pt.get("step") == r.step and not pt.get("skip"))
        out.append(f"{r.path}: {r.failed}" + (f"; {matrices_text(kept)} measured at step {r.step} before it failed keep"
                                                f"{'s its point' if kept == 1 else ' their points'} (read from the file as it was then)"
                                                if kept else ""))
    return out


def run_warnings(matrices: list[dict[str, Any]]) -> list[str]:
    """The run's warnings from its matrices (a trace's or a tracker's): one per numerical caveat of their notes, one for
    matrices skipped at every checkpoint (measured nowhere: a skipped matrix in all but name), and one for points (a
    matrix at one checkpoint) whose non-zero ΔW is entirely at the rounding level of its stored weights."""
    out = note_caveat_warnings([(m["name"], "; ".join([m.get("note") or "", *(pt.get("note") or "" for pt in m["points"] if isinstance(pt, dict))]))
                                for m in matrices], len(matrices), " at one checkpoint or more")
    if resized := [m for m in matrices if RESIZED_NOTE in (m.get("note") or "")]:  # the matrix's note says at which steps
        m = resized[0]
        out.append(f"{counted(len(resized), 'table')} hold{'s' * (len(resized) == 1)} another row count than the base at "
                   f"checkpoints (e.g. {m['name']}: {note_part(m['note'], RESIZED_NOTE, prefix=False)})")
    nowhere = [m for m in matrices if m["points"] and all(isinstance(pt, dict) and pt.get("skip") for pt in m["points"])]
    if nowhere:
        one = len(nowhere) == 1
        out.append(f"{len(nowhere)} matri{'x is' if one else 'ces are'} measured at no checkpoint (e.g. {nowhere[0]['name']}: "
                   f"{nowhere[0]['points'][0]['skip']}); 'skip' of each point in trace.json says why")
    # (other turn_notes say which checkpoint turn_prev is from, or that a tie left the subspace undetermined)
    unresolved = unresolved_text("ΔW", "")[:30]  # "every singular value of ΔW is…": the wording of such a point
    hit = [(m["name"], pt.get("step")) for m in matrices for pt in m["points"]
           if isinstance(pt, dict) and str(pt.get("turn_note", "")).startswith(unresolved)]
    if not hit:
        return out
    name, step = hit[0]
    one = len(hit) == 1
    return [*out, (f"{len(hit)} point{'' if one else 's'} (a matrix at one checkpoint) {'has' if one else 'have'} an update entirely "
                   f"at the rounding level of its stored weights (e.g. {name} at step {step}): no resolved direction, so "
                   "turn_prev and turn_first are null there (turn_note in trace.json)")]


def absent_warning(chosen: list[str], held: list[str]) -> list[str]:
    """The warning (a list of one, or none) naming the base's layer matrices ``chosen`` (selected, 2-D, in a layer:
    a tied head or an embedding a checkpoint saves once is no such matrix) that no checkpoint holds (``held``: those
    some checkpoint pairs): a run that saves its trained layers only leaves the rest untraced. State parameters the
    pairing skips as no weight (a Mamba's ``A_log``) are not counted."""
    have = set(held)
    absent = [n for n in chosen if n not in have and n.rpartition(".")[2] not in NOT_WEIGHTS]
    if not absent:
        return []
    return [f"{counted(len(absent), 'matrix', 'matrices')} of the base {'is' if len(absent) == 1 else 'are'} in no checkpoint "
            f"(e.g. {absent[0]}): not traced (checkpoints that save the trained layers only?)"]


def base_copy_warning(checkpoints: list[dict[str, Any]], matrices: list[dict[str, Any]]) -> list[str]:
    """A warning naming the checkpoints (``trace.json``'s records, in step order; failed ones aside) where ΔW is exactly
    zero for every measured matrix after an earlier checkpoint changed some: a copy of the base saved mid-run (a wrong
    save, or the base copied in) reads as a training that went back and came again. None when there is none; a run
    that starts at the base (LoRA adapters saved at initialisation) is not one, nor an adapter reset to B = 0 mid-run
    (ReLoRA: a known scheme, not a wrong save)."""
    moved, copies = False, []
    for i, c in enumerate(checkpoints):
        pts = [pt for m in matrices if i < len(m["points"]) and isinstance(pt := m["points"][i], dict)
               and "skip" not in pt and pt.get("fro_norm") is not None]
        if c.get("failed") or not pts or c.get("kind") == "lora":
            continue
        if all(pt["fro_norm"] == 0 for pt in pts):
            copies += [Path(str(c.get("path"))).name] if moved else []
        else:
            moved = True
    if not copies:
        return []
    return [f"{_names(copies)}: ΔW = 0 for every matrix, the base's own weights, between checkpoints that changed them: a "
            "save of the wrong weights, or the base copied in? (their turns are measured against the base)"]


def unchanged_text(checkpoints: list[dict[str, Any]], matrices: list[dict[str, Any]], config: dict[str, Any] | None = None,
                   left_out: list[dict[str, str]] | None = None) -> str | None:
    """What a trace measured when ΔW is exactly zero (‖ΔW‖_F = 0) for every traced matrix at every checkpoint that was
    not marked failed (``checkpoints``: ``trace.json``'s records, in step order; ``matrices``: its matrix records):
    the checkpoints hold the base's weights (copies of it, or adapters saved at initialisation with B = 0), so the run
    has no update to trace. None when some point changed, or none was measured (every one skipped). ``config``: the
    run's options (``trace.json``'s): a selection (include, exclude, layers) says of the matrices traced only;
    ``left_out``: the matrices not traced (``{"name", "reason"}``), which may hold the update.

    Said as a warning, and by ``spectra trace`` as exit 3 (as ``diff`` for identical checkpoints)."""
    used = [i for i, c in enumerate(checkpoints) if not c.get("failed")]
    pts = [m["points"][i] for m in matrices for i in used if i < len(m["points"]) and isinstance(m["points"][i], dict)]
    measured = [p for p in pts if "skip" not in p and p.get("fro_norm") is not None]
    if not measured or any(p["fro_norm"] != 0 for p in measured):
        return None
    skipped = len(pts) - len(measured)  # (NaN/Inf, a shape the base lacks, a tensor not saved there): not the base's
    if skipped:
        return (f"ΔW = 0 at every checkpoint for every measured point, but {skipped} point{'s were' if skipped > 1 else ' was'} "
                "skipped (see 'skip' in trace.json)")
    at = "every checkpoint" + (" not marked failed" if len(used) < len(checkpoints) else "")
    if left_out:  # an update only in matrices trace does not measure (3-D expert stacks): not the base's weights
        return f"ΔW = 0 at {at} for each of the {len(matrices)} matrices traced" + unmeasured_clause(left_out, "traced")
    if any((config or {}).get(k) for k in ("include", "exclude", "layers")):  # what was left out may have changed
        return f"ΔW = 0 at {at} for each of the {len(matrices)} matrices selected (--include, --exclude, --layers)"
    lora = any(c.get("kind") == "lora" for c in checkpoints)
    return f"ΔW = 0 at {at}: they hold the base's weights" + (" (adapters saved at initialisation, with B = 0?)" if lora else "")
