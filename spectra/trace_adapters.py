"""A trace of adapter checkpoints (:func:`spectra.trace.trace`), checkpoint by checkpoint: each adapter's factors
(small), ‖W_base‖_F once per module, and per module the first and previous top-k subspaces."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spectra.adapter_diff import adapter_updates, recorded_base_warning, saved_skips
from spectra.errors import CheckpointFormatError, ConfigError, ResultsFormatError, SpectraError
from spectra.interference import Subspaces, subspace_turn, truncate
from spectra.io.checkpoint import Checkpoint
from spectra.journal import RecordJournal
from spectra.naming import MatrixSpec
from spectra.pairing import Skipped
from spectra.param_experts import open_adapter_on
from spectra.selection import fused_whole_warning, refuse_empty_selection, selector
from spectra.subspaces import Factored
from spectra.trace_checks import adapter_change_warnings, gap_note
from spectra.trace_inputs import CheckpointRef, check_trace_point
from spectra.trace_points import TraceConfig, jsonable, matrix_meta, point_metrics, skip_point

if TYPE_CHECKING:
    from spectra.trace import TraceResult


def trace_adapters(result: TraceResult, refs: list[CheckpointRef], base: Checkpoint, config: TraceConfig,
                    device: torch.device, journal: RecordJournal | None, done: list[dict],
                    callback: Callable[[int, int, str], None] | None) -> None:
    """Checkpoint by checkpoint: each adapter's factors, ‖W_base‖_F once per module, and per module
    the first and previous top-k subspaces."""
    keep = selector(config.include, config.exclude, config.layers)
    if config.alpha:
        result.warnings.append("α is fitted to dense weights; adapter checkpoints are traced without it")
    base_fro: dict[str, float] = {}
    metas: dict[str, dict[str, Any]] = {}
    points: dict[str, dict[int, dict[str, Any]]] = {}
    first: dict[str, Subspaces] = {}
    prev: dict[str, Subspaces] = {}
    prev_at: dict[str, int] = {}  # the checkpoint each prev is from (trace_checks.gap_note)
    saved: dict[str, str] = {}  # tensor an adapter stores whole (modules_to_save) -> why it is not traced
    other_base: dict[str, str] = {}  # a base the adapters record that is not BASE -> the warning (once per base)
    for i, rec in enumerate(done, 1):  # a resumed run: the journal holds a prefix of the checkpoints
        if "checkpoint" in rec:
            if not (isinstance(rec["checkpoint"], int) and 0 <= rec["checkpoint"] < len(refs)
                    and isinstance(rec.get("points", {}), dict)):
                raise ResultsFormatError(f"record {i}: checkpoint must be an index below {len(refs)}, with points by "
                                         "matrix", path=journal.path if journal else None,
                                         hint="the journal was edited: run without --resume into a new folder")
            for name, pt in rec.get("points", {}).items():
                check_trace_point(pt, f"record {i}.points[{str(name)[:80]!r}]", journal.path if journal else None)
            if rec.get("failed"):
                refs[rec["checkpoint"]].failed = rec["failed"]
            metas.update(rec.get("meta", {}))
            if isinstance(rec.get("saved"), dict):  # tensors stored whole (modules_to_save), listed as skipped
                saved.update({str(k): str(v) for k, v in rec["saved"].items()})
            if isinstance(rec.get("other_base"), dict):  # a base the adapters record that is not BASE: warned again
                other_base.update({str(k): str(v) for k, v in rec["other_base"].items()})
            for name, pt in rec.get("points", {}).items():
                points.setdefault(name, {})[rec["checkpoint"]] = pt
    finished, checked = {rec["checkpoint"] for rec in done if "checkpoint" in rec}, False  # checked: the base-layer copies
    if finished != set(range(len(finished))):  # checkpoints are journaled in order: a gap is a record deleted since
        raise ResultsFormatError(f"the journal holds checkpoints {sorted(finished)[:8]} but not "
                                 f"{sorted(set(range(max(finished) + 1)) - finished)[:8]}, which came before them",
                                 path=journal.path if journal else None, hint="the journal was edited: run without --resume into a new folder")
    if finished:  # the first and previous subspaces the next points compare with, recomputed from their adapters
        cache: dict[int, dict[str, Subspaces]] = {}
        for name, pts in points.items():
            used = sorted(ci for ci, pt in pts.items() if "skip" not in pt and pt.get("fro_norm"))
            if used:
                prev_at[name] = used[-1]
            for ci, into in ((used[0], first), (used[-1], prev)) if used else ():
                if ci not in cache:
                    cache[ci] = {spec.name: s for mod, spec, _shape, _base in _adapter_modules(refs[ci], base, keep, None, other_base)
                                 if (s := _lora_subspaces(mod, config, device)) is not None}
                if name in cache[ci]:
                    into[name] = cache[ci][name]
    for ci, ref in enumerate(refs):
        if ci in finished:
            continue
        try:
            new_saved: dict[str, str] = {}
            known = set(other_base)
            modules = _adapter_modules(ref, base, keep, new_saved, other_base, check_copies=not checked)  # once a run: one base
            checked = True
            saved.update(new_saved)
        except (SpectraError, OSError) as exc:  # unreadable now, or made for another base
            ref.failed = f"cannot be used ({getattr(exc, 'message', exc)})"
            if journal:
                journal.add({"checkpoint": ci, "failed": ref.failed, "points": {}, "meta": {}})
            continue
        new_points, new_meta = {}, {}
        for mod, spec, shape, base_name in modules:
            name = spec.name
            if name not in base_fro:  # the one read of this base tensor (a tied head's: the embedding)
                base_fro[name] = float(torch.linalg.vector_norm(base.load(base_name).double()))
            f = Factored.from_lora(*(x.to(device) for x in mod.factors()), mod.scale)
            now = Subspaces.of(truncate(f, config.top_k))
            new_meta[name] = metas[name] = metas.get(name) or matrix_meta(spec, shape, base_fro[name], mod.r)
            pt = {"step": ref.step, **point_metrics(f.S.cpu().numpy(), shape, base_fro[name], config, mod.r), "lora_scale": mod.scale,
                  "turn_prev": subspace_turn(prev.get(name), now), "turn_first": subspace_turn(first.get(name), now)}
            if now is not None and name in prev and (gap := gap_note(refs, prev_at.get(name), ci)):
                pt["turn_note"] = gap
            new_points[name] = points.setdefault(name, {})[ci] = jsonable(pt)
            if now is not None:
                prev[name], prev_at[name] = now, ci
                first.setdefault(name, now)
        if journal:
            journal.add({"checkpoint": ci, "points": new_points, "meta": new_meta, "saved": new_saved,
                         "other_base": {k: v for k, v in other_base.items() if k not in known}})
        if callback:
            callback(ci + 1, len(refs), Path(ref.path).name)
    # not a LoRA update: listed with the reason, never left out without a word (interfere lists them likewise)
    result.skipped += [{"name": n, "reason": r} for n, r in sorted(saved.items())]
    if w := fused_whole_warning((base.specs[n] for n in sorted(metas) if n in base.specs), "trace"):
        result.warnings.append(w)
    for name, meta in metas.items():
        pts = [points[name].get(ci) or skip_point(ref.step, ref.failed or "not in this adapter") for ci, ref in enumerate(refs)]
        result.matrices.append({**meta, "points": pts})
    # one run keeps its r and its target modules: adapters of several runs (or a resized one) listed together
    result.warnings += adapter_change_warnings(metas, points, refs) + list(other_base.values())
    if not result.matrices and not any(r.failed for r in refs):  # every adapter was read: the filters left nothing
        every = sorted({spec.name for mod, spec, _shape, _base in _adapter_modules(refs[0], base, selector(None, None, None))})
        refuse_empty_selection(len(every), every[0] if every else "", include=config.include, exclude=config.exclude,
                               layers=config.layers, what="modules the first adapter updates",
                               skipped=[Skipped(n, r) for n, r in sorted(saved.items())])
    if not result.matrices:
        raise CheckpointFormatError("no adapter checkpoint could be used", path=result.run or refs[0].path,
                                    hint="; ".join(r.failed for r in refs if r.failed)[:400] or None)


def _lora_subspaces(mod: Any, config: TraceConfig, device: torch.device) -> Subspaces | None:
    return Subspaces.of(truncate(Factored.from_lora(*(x.to(device) for x in mod.factors()), mod.scale), config.top_k))


def _adapter_modules(ref: CheckpointRef, base: Checkpoint, keep: Callable, saved: dict[str, str] | None = None,
                     other_base: dict[str, str] | None = None, check_copies: bool = False) -> list[tuple[Any, MatrixSpec, tuple[int, int], str]]:
    """``(LoraModule, spec, (out, in), base tensor name)`` of each kept module of an adapter checkpoint
    (the spec names the updated matrix; its base tensor differs for a head tied to the embedding).
    ``saved``, when given, receives each kept tensor the adapter stores whole (``modules_to_save``) with
    why it is not traced (:func:`spectra.adapter_diff.saved_modules` pairs them; ``spectra diff`` measures them);
    ``other_base`` the base the adapter records when not ``base`` (its ``rel_norm`` is then against other weights), with the
    warning diff, compare and interfere give; ``check_copies``: its base-layer copies checked (``check_base_copies``).

    Raises:
        ConfigError: a DoRA adapter (its update needs the base weights at every checkpoint).
        SpectraError: the adapter does not fit the base, or cannot be read.
    """
    adapter = open_adapter_on(ref.path, base, keep=keep, check_copies=check_copies, merged="trace merged checkpoints instead")
    if adapter.config.use_dora:
        raise ConfigError("DoRA adapters are not traced: their update needs the base weights at every checkpoint",
                          path=ref.path, hint="trace merged checkpoints instead (merge_and_unload)")
    if saved is not None:
        saved.update({n: why for n, why, layer in saved_skips(adapter, base) if keep(n, layer)})
    if other_base is not None and (w := recorded_base_warning(adapter, base)):
        other_base.setdefault(str(adapter.config.base_model_name_or_path), w)
    out = []
    for mod, spec, base_name in adapter_updates(adapter, base):
        if keep(spec.name, spec.layer):
            out.append((mod, spec, (int(mod.shape[0]), int(mod.shape[1])), base_name or spec.name))
    return out
