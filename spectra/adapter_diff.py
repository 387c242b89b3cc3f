"""``spectra diff BASE ADAPTER`` and ``spectra diff ADAPTER``: spectra of LoRA updates, from the factors.

Each adapted module's ``ΔW = s·B·A`` is decomposed by :func:`spectra.engine.factored_svd` (QR of the
factors, SVD of the r × r core; never densified), so its r singular values are exact and the rest
are zero. The results use the same contract and metrics as a full diff, plus the nominal rank, alpha
and scale, so that "how much of r does the update use" reads off ``energy_rank`` and
``effective_rank``. DoRA updates depend on the base weight and are formed densely (they are not low
rank). Adapters whose initialisation changed the base weights (PiSSA, OLoRA, CorDA, LoftQ) are
refused: their B·A is not the update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from spectra._version import __version__
from spectra.config import DiffConfig
from spectra.delta import form_delta, oriented
from spectra.engine import batch_singular_values, factored_svd
from spectra.errors import CheckpointFormatError, PairingError
from spectra.io.adapter import LORA_KINDS, Adapter, LoraModule
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.io.files import same_file
from spectra.journal import absorb, diff_identity
from spectra.linalg import all_finite
from spectra.naming import MatrixSpec, describe_checkpoint, describe_updates, pairing_key, spec_order, unique_pairing_keys
from spectra.numerics import numeric_notes
from spectra.pairing import PAIRING_NOTE_PREFIX, Skipped, oriented_shape
from spectra.pairing_notes import SAVED_WHOLE
from spectra.param_experts import BaseNames, refuse_base_changing, tied_head_spec
from spectra.records import ZERO_BASE_NOTE, DiffEvent, esd_entry, random_ranks, spectrum_fields
from spectra.results import DiffResult, ModuleResult
from spectra.roles import part_role
from spectra.rounding_bulk import weight_rounding
from spectra.selection import refuse_empty_selection, selector, units_of


def adapter_updates(adapter: Adapter, base: Checkpoint | None) -> list[tuple[LoraModule, MatrixSpec, str | None]]:
    """Each LoRA module with the spec of the matrix it updates and its base tensor name (None without base).

    A LoRA on the output head of a base that ties it to the input embedding (and so stores no head)
    updates that embedding's matrix: its spec keeps the head's name, its base tensor is the embedding.

    Raises:
        PairingError: a module the adapter updates is not in the base (names it).
        CheckpointFormatError: the adapter's update shape differs from the base matrix's; an adapter
            built with ``layer_replication`` (its layers are not the base's layers of the same number).
    """
    if base is not None:
        replicated = adapter.config.replicated_layers()
        if replicated is not None and replicated != list(range(len(replicated))):  # [[0, n]] maps each layer to itself
            raise CheckpointFormatError(
                f"this adapter was made with layer_replication {[list(r) for r in adapter.config.layer_replication or ()]}: "
                f"its layers run on base layers {replicated[:12]}{' …' if len(replicated) > 12 else ''}, not on the base layers "
                "of the same number, which is how spectra pairs them", path=adapter.path,
                hint="a DoRA update depends on the base weight of each replicated layer, which spectra does not map"
                if adapter.config.use_dora else "analyse the adapter alone (spectra diff ADAPTER, no base): its s·B·A per layer "
                "needs no base")
        specs = describe_checkpoint({n: t.shape for n, t in base.tensors.items()}, base.arch)
        lookup = unique_pairing_keys(list(base.tensors))
        names = BaseNames(base, specs, lookup)  # a PEFT adapter of a transformers >= 5 model names modules as it loads them
    else:
        specs = describe_updates({m.weight_name: m.shape for m in adapter.modules.values()}, fan_in_fan_out=adapter.config.fan_in_fan_out)
    out = []
    for mod in adapter.modules.values():
        if base is None:
            out.append((mod, specs[mod.weight_name], None))
            continue
        name = mod.weight_name if mod.weight_name in base.tensors else names.find(mod.weight_name)
        if name is None or name not in specs:
            tied = _tied_head_of(mod, base, specs)
            if tied is not None:
                out.append(tied)
                continue
            raise PairingError(
                f"the adapter updates {mod.module}, which the base checkpoint does not have",
                path=f"{adapter.path} vs {base.label}", tensor=mod.weight_name,
                hint="is this adapter for this base model? `spectra inspect BASE` lists its matrices",
            )
        spec = specs[name]
        out_in = oriented_shape(spec, tuple(base.tensors[name].shape))
        if tuple(mod.shape) != out_in:
            transposed = tuple(mod.shape) == out_in[::-1]  # each factor stored transposed: B·A is the update's transpose
            raise CheckpointFormatError(
                f"the adapter's update of {mod.module} is {tuple(mod.shape)} but the base matrix is {out_in}",
                path=adapter.path, tensor=name,
                hint=(f"its factors look transposed: PEFT stores lora_A as (r, in) = (r, {out_in[1]}) and lora_B as "
                      f"(out, r) = ({out_in[0]}, r)") if transposed else "the adapter was trained on a different base model",
            )
        out.append((mod, spec, name))
    out.sort(key=lambda t: spec_order(t[1]))  # the file's key order put layer 10 before layer 2
    return out


def stacked_updates(adapter: Adapter, base: Checkpoint | None) -> list[tuple[LoraModule, MatrixSpec, str | None]]:
    """Each LoRA of one expert of a 3-D base tensor (``target_parameters``: :mod:`spectra.param_experts`), with that
    tensor's spec (its ``expert`` set) and name; only ``spectra diff`` analyses them (the other commands measure 2-D
    matrices only, and list them: :func:`saved_skips`)."""
    if base is None or not adapter.stacked:
        return []
    specs = base.specs
    return sorted(((mod, replace(specs[mod.weight_name], expert=mod.expert), mod.weight_name) for mod in adapter.stacked.values()),
                  key=lambda t: (spec_order(t[1]), t[0].expert))


def tied_pair_notes(updates: list[tuple[LoraModule, MatrixSpec, str | None]], whose: str = "the adapter's") -> dict[str, str]:
    """Spec name -> note for the two LoRAs of one adapter that update one stored matrix: a LoRA on the output
    head of a base that ties it to the input embedding (measured against that embedding: :func:`adapter_updates`)
    beside a LoRA on the embedding itself. Each stays its own row, as an unmerged PEFT model applies ΔE in the
    embedding and ΔH in the head; but merging (``merge_and_unload``) adds both to the one tensor, which the rows
    alone do not show. The note gives the sum's ‖·‖_F, from the factors (:func:`_sum_fro`)."""
    by_base: dict[str, list[tuple[LoraModule, MatrixSpec]]] = {}
    for mod, spec, base_name in updates:
        if base_name is not None:
            by_base.setdefault(base_name, []).append((mod, spec))
    notes = {}
    for base_name, group in by_base.items():
        if len(group) != 2 or {spec.role for _, spec in group} != {"embed", "head"}:
            continue
        (embed, se), (head, sh) = sorted(group, key=lambda g: g[1].role != "embed")
        total = _sum_fro(embed, head)
        notes[se.name] = notes[sh.name] = (
            f"{whose} LoRAs on {se.name} and {sh.name} are separate updates of one stored matrix, {base_name} (the base ties "
            "its output head to its embedding): each is measured alone, as an unmerged model applies them, and merging both "
            f"moves the matrix by their sum{'' if total is None else f', ‖ΔE + ΔH‖_F = {total:.4g}'}")
    return notes


def _sum_fro(a: LoraModule, b: LoraModule) -> float | None:
    """‖ΔA + ΔB‖_F of two LoRA updates of one matrix from their factors, never densified: ‖ΔA‖² + ‖ΔB‖² + 2⟨ΔA, ΔB⟩,
    each ⟨s·B₁A₁, t·B₂A₂⟩ = s·t·tr((B₁ᵀB₂)(A₂A₁ᵀ)) from r × r products, in float64. None for a DoRA module (its update
    is dense, not s·B·A), shapes that differ, or a sum that is not finite."""
    if a.magnitude is not None or b.magnitude is not None or a.shape != b.shape:
        return None
    (Ba, Aa), (Bb, Ab) = ((B.double(), A.double()) for B, A in (a.factors(), b.factors()))

    def inner(B1: torch.Tensor, A1: torch.Tensor, s1: float, B2: torch.Tensor, A2: torch.Tensor, s2: float) -> float:
        return s1 * s2 * float(torch.trace((B1.mT @ B2) @ (A2 @ A1.mT)))

    sq = inner(Ba, Aa, a.scale, Ba, Aa, a.scale) + inner(Bb, Ab, b.scale, Bb, Ab, b.scale) + 2 * inner(Ba, Aa, a.scale, Bb, Ab, b.scale)
    return math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else None  # rounding may leave a cancelled sum a hair below 0


def tied_compare_notes(sides: list[tuple[str, str, Adapter | None, dict[str, str]]], base: Checkpoint | None) -> dict[str, list[str]]:
    """For ``compare``: module name -> notes on an output head that a base ties to its embedding. ``sides`` holds
    ``(who, label, adapter or None, heads)`` per input, ``heads`` the head name -> tuned embedding name of each head
    that input, a full checkpoint tying its head too, stands in for by its embedding
    (:func:`spectra.pairing.pair_tied_heads`). An adapter with LoRAs on both gets :func:`tied_pair_notes` on both rows."""
    notes: dict[str, list[str]] = {}
    for who, _, adapter, _ in sides:
        if adapter is not None and base is not None:
            for name, text in tied_pair_notes(adapter_updates(adapter, base), f"{who}'s").items():
                notes.setdefault(name, []).append(text)
    for (who, label, _, heads), (other, *_) in zip(sides, sides[::-1]):
        for head, embed in heads.items():
            notes.setdefault(head, []).append(
                f"{who} ({label}) stores no output head: it ties its head to {embed}, so its head's update is that "
                f"embedding's, compared here with {other}'s LoRA on {head} (which the base ties to the same matrix)")
    return notes


def recorded_base_warning(adapter: Adapter, base: Checkpoint) -> str | None:
    """A warning when ``adapter_config.json`` records, as ``base_model_name_or_path``, a file or folder
    that exists here and is not ``base`` (nor its folder): an adapter of another base of the same
    architecture passes every shape check, and its amplification, intruders, ``rel_norm`` (and a DoRA
    update itself) would be measured against weights it was not trained on. A hub name, or a recorded
    path that does not exist from here, is not judged (None)."""
    recorded = adapter.config.base_model_name_or_path
    try:
        where = Path(recorded) if recorded else None
        if where is None or not where.exists():
            return None
    except (OSError, ValueError):  # not a path on this system (a NUL, a name too long)
        return None
    root = Path(base.root)
    # a model is a folder or a file in it: either spelling on either side names the same model
    mine = [where, where.parent] if where.is_file() else [where]
    given = [root, root.parent] if root.is_file() else [root]
    if any(same_file(a, b) for a in mine for b in given):
        return None
    return (f"{PAIRING_NOTE_PREFIX}{adapter.path}: its adapter_config.json records the base {recorded!r}, which is another file or folder "
            f"than the base given ({base.label}): unless they hold the same weights, the update is measured against "
            "a base it was not trained on")


def _tied_head_of(mod: LoraModule, base: Checkpoint,
                  specs: dict[str, MatrixSpec]) -> tuple[LoraModule, MatrixSpec, str] | None:
    """``(mod, spec, embedding name)`` when ``mod`` is a LoRA on the output head of a base that ties the
    head to its input embedding (:func:`spectra.param_experts.tied_head_spec`). Else None."""
    tied = tied_head_spec(mod.weight_name, tuple(mod.shape), base, specs)
    return None if tied is None else (mod, *tied)


@dataclass(frozen=True)
class SavedModule:
    """A matrix an adapter stores whole (``modules_to_save``: trained in full beside the LoRAs), paired
    with its base matrix: its update is the saved tensor minus the base's, dense.

    Attributes:
        tensor: the saved tensor as stored in the adapter.
        spec: the matrix's spec (the base's, or the head's when it is tied to the base's embedding).
        base_name: the base tensor it is measured against.
        rows: when the two have different numbers of rows (a vocabulary resized for new tokens), the
            leading rows both have, which are analysed; else None.
        note: a caveat for its results (a tied head, resized rows); empty when none.
    """

    tensor: torch.Tensor
    spec: MatrixSpec
    base_name: str
    rows: int | None = None
    note: str = ""


#: Why a tensor an adapter stores whole is not measured, by case.
SAVED_NO_BASE = ("stored whole (modules_to_save): its update is this tensor minus the base's; "
                 "pass the base (spectra diff BASE ADAPTER) to measure it")
SAVED_NEW = ("stored whole (modules_to_save) and not in the base: a module trained from scratch "
             "(e.g. a new classification head), which has no update to measure")
SAVED_VECTOR = "stored whole (modules_to_save): a vector (a norm or a bias), not a weight matrix"
SAVED_BIAS = ("a bias the adapter trained (adapter_config.json's bias = 'all' or 'lora_only', or a module in "
              "modules_to_save): a vector, not a weight matrix")
SAVED_OTHER_ADAPTER = ("a factor of another named adapter (PEFT keys it lora_A.<name>): the file holds several adapters and "
                       "spectra reads the one named default; save each with PeftModel.save_pretrained to analyse it")
SAVED_VARIANT = "a LoRA variant's own tensor (VeLoRA's, MonteCLoRA's), outside s·B·A: PEFT's merge does not use it"
#: Why a command that measures LoRA updates (compare, trace, interfere) lists a matrix an adapter stores whole.
STACK_NOT_2D = ("a LoRA on every expert of this 3-D expert stack (target_parameters): this command measures 2-D matrices "
                "only (spectra diff BASE ADAPTER analyses each expert)")
SAVED_NOT_LORA = "stored whole (modules_to_save), not a LoRA update (spectra diff BASE ADAPTER measures it)"
SAVED_COPY = ("PEFT's internal copy of a module it wraps (original_module / modules_to_save), saved beside the "
              "module's own weight: not a separate update")
SAVED_TOKENS = ("trainable token rows (trainable_token_indices): new values of a few rows of the embedding, not a "
                "whole matrix; not measured")


def saved_kind_reason(name: str) -> str | None:
    """Why a tensor an adapter stores outside its LoRA factors is not a module saved whole, or None."""
    parts = name.split(".")
    if "trainable_tokens_delta" in parts or "token_adapter" in parts:
        return SAVED_TOKENS
    if "original_module" in parts or "modules_to_save" in parts:
        return SAVED_COPY
    if any(p in LORA_KINDS and nxt not in ("weight", "bias", "default") for p, nxt in zip(parts, parts[1:])):
        return SAVED_OTHER_ADAPTER  # lora_A.<name>.weight: PEFT's key of an adapter named other than "default"
    if any(p.startswith("lora_") for p in parts):  # not a factor (the adapter reader took those): a variant's extra
        return SAVED_VARIANT
    return None


def saved_modules(adapter: Adapter, base: Checkpoint | None) -> tuple[dict[str, SavedModule], list[Skipped]]:
    """The matrices ``adapter`` stores whole (``modules_to_save``) paired with the base's, by the
    saved tensor's name in the base model; and those that cannot be measured, each with its reason
    (no base given; a module the base does not have; a vector; a shape the base's matrix does not
    share). Rows of an embedding or output head resized for new tokens are paired as a full diff
    pairs them: the leading rows both have."""
    if not adapter.full:
        return {}, []
    if base is None:
        return {}, [Skipped(n, saved_kind_reason(n) or SAVED_NO_BASE) for n in adapter.full]
    specs = describe_checkpoint({n: t.shape for n, t in base.tensors.items()}, base.arch)
    lookup = unique_pairing_keys(list(base.tensors))
    saved: dict[str, SavedModule] = {}
    skipped: list[Skipped] = []
    for name, t in adapter.full.items():
        why = saved_kind_reason(name) or ((SAVED_BIAS if name.endswith(".bias") else SAVED_VECTOR) if t.ndim < 2 else None)
        if why:
            skipped.append(Skipped(name, why))
            continue
        base_name = name if name in base.tensors else lookup.get(pairing_key(name))
        spec, note = (specs.get(base_name) if base_name else None), ""
        if spec is None and base_name is None:
            tied = tied_head_spec(name, tuple(t.shape), base, specs, rows_may_differ=True)  # tokens added: rows differ
            if tied is None:
                skipped.append(Skipped(name, SAVED_NEW))
                continue
            spec, base_name = tied
        if spec is None or len(spec_shape := oriented_shape(spec, tuple(t.shape))) != 2:
            skipped.append(Skipped(name, f"stored whole (modules_to_save); the base's {base_name} is not a weight matrix "
                                         "spectra analyses"))
            continue
        base_shape = oriented_shape(spec, tuple(base.tensors[base_name].shape))
        rows = None
        if tuple(spec_shape) != tuple(base_shape):
            if spec.role not in ("embed", "head") or spec_shape[1] != base_shape[1]:
                skipped.append(Skipped(name, f"stored whole (modules_to_save) as {spec_shape[0]}×{spec_shape[1]}, but the base's "
                                             f"{base_name} is {base_shape[0]}×{base_shape[1]}: not the same matrix"))
                continue
            rows = min(spec_shape[0], base_shape[0])
            note = (f"rows differ (base {base_shape[0]}, adapter {spec_shape[0]}, e.g. a vocabulary resized for new tokens): "
                    f"the {rows} leading rows both have are analysed")
        saved[name] = SavedModule(t, spec, base_name, rows, note)
    return saved, skipped


def diff_adapter(
    base: Checkpoint | None,
    adapter: Adapter,
    *,
    config: DiffConfig,
    device: torch.device,
    dtype: torch.dtype,
    callback: Callable | None = None,
    writer=None,
    label_base: str | None = None,
    label_tuned: str | None = None,
    resume: bool = False,
) -> DiffResult:
    """Spectrum metrics of every LoRA update of ``adapter`` (see the module docstring).

    Args:
        base: the base checkpoint, or None to analyse the adapter alone (no rel_norm, no DoRA).
        adapter: the opened adapter.
        config: a :class:`spectra.config.DiffConfig` (thresholds, filters, top_k, device).
        device, dtype: where and in what precision to decompose.
        callback: called with a ``DiffEvent`` per module.
        writer: the run's results writer (journal), or None.
        resume: continue the journal of an interrupted run of the same adapter, base and options in
            ``writer``'s folder (its finished matrices are kept, the rest computed).
    """
    refuse_base_changing(adapter, "diff the merged model against the original base")  # an API caller's open_adapter checks none
    if adapter.config.use_dora and base is None:
        raise CheckpointFormatError("a DoRA adapter's update depends on the base weights", path=adapter.path,
                                    hint="pass the base model: spectra diff BASE ADAPTER")
    result = DiffResult(base=label_base, tuned=label_tuned or str(adapter.path), thresholds=list(config.thresholds),
                        config=asdict(config), device=str(device), version=__version__,
                        inputs={**({"base": str(base.root)} if base is not None else {}), "tuned": str(adapter.path.absolute())})
    result.warnings.extend(adapter.notes)  # which of a folder's inputs was read (an adapter beside a full model)
    if base is not None and (other := recorded_base_warning(adapter, base)):
        result.warnings.append(other)
    result.adapter = {"r": adapter.config.r, "lora_alpha": adapter.config.lora_alpha, "use_rslora": adapter.config.use_rslora,
                      "use_dora": adapter.config.use_dora, "rank_pattern": adapter.config.rank_pattern,
                      "alpha_pattern": adapter.config.alpha_pattern, "fan_in_fan_out": adapter.config.fan_in_fan_out,
                      "task_type": adapter.config.task_type}
    units: list[tuple[LoraModule | SavedModule, MatrixSpec, str | None, str, torch.Tensor | None, str]] = []
    keep = selector(config.include, config.exclude, config.layers)
    updates = adapter_updates(adapter, base)
    tied = tied_pair_notes(updates)  # an embedding LoRA and a tied head's: one stored matrix
    for mod, spec, base_name in updates + stacked_updates(adapter, base):
        for name, part_rows, module in units_of(spec, keep, split_fused=config.split_fused, expert=mod.expert):
            units.append((mod, spec, base_name, name, part_rows, module))
    saved, not_saved = saved_modules(adapter, base)
    for sv in saved.values():
        for name, part_rows, module in units_of(sv.spec, keep, split_fused=config.split_fused):
            units.append((sv, sv.spec, sv.base_name, name, part_rows, module))
    units.sort(key=lambda u: spec_order(u[1]))  # a saved embedding or head among the LoRA modules, in model order
    for skip in not_saved:
        result.skipped.append(asdict(skip))
    for copy in adapter.base_copies:
        result.skipped.append(asdict(Skipped(copy, SAVED_BIAS if copy.endswith(".bias") else
                                             "copy of the base layer PEFT saves whole beside a LoRA on an embedding or output head, not an update")))
    for skip in adapter.skipped:  # untargeted factors, LoRA biases, stray DoRA magnitudes: each with its reason
        result.skipped.append(asdict(skip))
    if not units:  # the filters left nothing: said so (what they keep and was skipped, with why), before any file is written
        every = sorted([spec.name for _mod, spec, _base in updates] + [sv.spec.name for sv in saved.values()])
        refuse_empty_selection(len(every), every[0] if every else "", include=config.include, exclude=config.exclude,
                               layers=config.layers, what="modules the adapter updates",
                               skipped=[Skipped(s["name"], s["reason"]) for s in result.skipped])
    finished: set[str] = set()
    if writer:
        result.fingerprint, result.identity = _adapter_identity(adapter, base, config)
        finished = absorb(result, writer.start(result, resume=resume, known={u[3] for u in units}))
    units = [u for u in units if u[3] not in finished]
    total = len(finished) + len(units)
    last: dict[str, torch.Tensor] = {}  # the base tensor of the unit before: a 3-D stack's experts follow each other

    def load(base_name: str) -> torch.Tensor:
        if base_name not in last:
            last.clear()
            last[base_name] = base.load(base_name)  # type: ignore[union-attr]
        return last[base_name]

    try:  # an error or a stop: results.json holds what was finished, and the folder is free again
        for done, (mod, spec, base_name, name, rows, module) in enumerate(units, start=len(finished) + 1):
            if isinstance(mod, SavedModule):
                res = _saved_result(mod, base, name, rows, module, config, device, dtype)  # type: ignore[arg-type]
            else:
                res = non_finite_factor(mod) or _module_result(mod, spec, load if base is not None else None, base_name, name, rows,
                                                               module, config, device, dtype)
                if not isinstance(res, str) and spec.name in tied:
                    res.note = "; ".join(x for x in (res.note, tied[spec.name]) if x)
            skip = None
            if isinstance(res, str):  # a skip with its reason, as a full diff skips NaN/Inf weights
                skip, res = Skipped(name, res), None
                result.skipped.append(asdict(skip))
                result.warnings.append(f"{name}: {skip.reason}")
            else:
                result.modules.append(res)
            if writer:
                writer.add(result, res, skip)
            if callback:
                callback(DiffEvent(done, total, res, skip))
    except BaseException:
        if writer:
            writer.flush(result)
        raise
    return result


def _adapter_identity(adapter: Adapter, base: Checkpoint | None, config: DiffConfig) -> tuple[str, dict[str, str]]:
    """What a journal of this adapter diff is resumed under: the adapter's weights file with its
    adapter_config.json, the base's, and the options (:func:`spectra.journal.diff_identity`)."""
    weights = next(p for p in (adapter.path / "adapter_model.safetensors", adapter.path / "adapter_model.bin")
                   if p.exists() or p.is_symlink())
    files = open_checkpoint(str(weights))
    return diff_identity(base if base is not None else files, files, config)


def merged_skips(skipped: list[dict[str, str]]) -> list[dict[str, str]]:
    """``{"name", "reason"}`` records with one per name, in first-seen order, the reasons of a name's repeats joined by
    "; " (a matrix each input leaves out: counted once, both reasons said).

    >>> merged_skips([{"name": "a", "reason": "A: x"}, {"name": "b", "reason": "y"}, {"name": "a", "reason": "B: z"}])
    [{'name': 'a', 'reason': 'A: x; B: z'}, {'name': 'b', 'reason': 'y'}]
    """
    first: dict[str, dict[str, str]] = {}
    reasons: dict[str, list[str]] = {}
    for s in skipped:
        first.setdefault(s["name"], dict(s))
        if s["reason"] not in (said := reasons.setdefault(s["name"], [])):
            said.append(s["reason"])
    return [{**rec, "reason": "; ".join(reasons[name])} for name, rec in first.items()]


def saved_skips(adapter: Adapter, base: Checkpoint | None) -> list[tuple[str, str, int | None]]:
    """``(name, reason, layer)`` of each tensor ``adapter`` stores outside its LoRA factors, for the
    commands that measure LoRA updates only (compare, trace, interfere): a matrix saved whole
    (:func:`saved_modules`) with :data:`SAVED_NOT_LORA`, anything else with its own reason (a vector,
    PEFT's internal copies, trainable token rows, no base); ``layer`` for the ``--layers`` filter."""
    whole, unmeasured = saved_modules(adapter, base)
    specs = base.specs if base is not None and (unmeasured or adapter.stacked) else {}  # (describes every base tensor: once)
    stacks = dict.fromkeys(m.weight_name for m in adapter.stacked.values())
    return ([(n, SAVED_NOT_LORA, sm.spec.layer) for n, sm in whole.items()]
            + [(x.name, x.reason, sp.layer if (sp := specs.get(x.name)) else None) for x in unmeasured]
            + [(n, STACK_NOT_2D, sp.layer if (sp := specs.get(n)) else None) for n in stacks])


def _saved_result(sv: SavedModule, base: Checkpoint, name: str, part_rows: torch.Tensor | None, module: str,
                  config: DiffConfig, device: torch.device, dtype: torch.dtype) -> ModuleResult | str:
    """The result of one analysed part of a matrix the adapter stores whole (:class:`SavedModule`): the
    dense update ``saved − base``, decomposed as a full diff decomposes it; or why it has none (NaN/Inf)."""
    start = time.perf_counter()
    spec = sv.spec
    wb = oriented(base.load(sv.base_name), spec.transpose, sv.rows)
    wt = oriented(sv.tensor, spec.transpose, sv.rows)
    if part_rows is not None:
        wb, wt = wb[part_rows], wt[part_rows]
    delta, base_fro, bad = form_delta(wb, wt, device)
    if bad:
        what = "the difference of the weights overflows" if bad == ["overflow"] else f"the {' and '.join(bad)} weights contain NaN or Inf"
        return f"{what} (modules_to_save: {name} stored whole in the adapter); ΔW is undefined"
    base_dtype, tuned_dtype = base.tensors[sv.base_name].dtype, str(sv.tensor.dtype).removeprefix("torch.")
    notes = numeric_notes(wb, wt, delta, base_dtype=base_dtype, tuned_dtype=tuned_dtype, base_sq=base_fro * base_fro)
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    S = batch_singular_values(delta.unsqueeze(0), device=device, dtype=dtype)[0]
    base_sv = tuned_sv = esd = None
    if config.weight_spectra or config.esd:
        S_b, S_t = batch_singular_values([wb.double(), wt.double()], device=device, dtype=dtype)
        if config.weight_spectra:
            base_sv, tuned_sv = [float(x) for x in S_b[: config.top_k]], [float(x) for x in S_t[: config.top_k]]
        if config.esd:
            esd = esd_entry(shape, S, S_b, S_t, rounding=(weight_rounding(wb, base_dtype), weight_rounding(wt, tuned_dtype)))
    note = "; ".join(x for x in (f"{SAVED_WHOLE}: ΔW = the saved matrix − the base's, dense", sv.note, spec.note,
                                 *notes, ZERO_BASE_NOTE if base_fro == 0 else "") if x)
    return ModuleResult(
        name=name, layer=spec.layer, module=module, role=part_role(spec.role, module, spec.rel_path), expert=spec.expert,
        shape=list(shape),
        base_fro_norm=base_fro, **spectrum_fields(S, shape, config, base_fro, "gram"), random_energy_rank=random_ranks(shape, config),
        dtype=f"{base_dtype}/{tuned_dtype}", method="modules_to_save/dense",
        seconds=time.perf_counter() - start, note=note, base_singular_values=base_sv, tuned_singular_values=tuned_sv, esd=esd,
    )


def non_finite_factor(mod: LoraModule) -> str | None:
    """Why ``mod``'s update is undefined — a factor (or DoRA magnitude) holding NaN or Inf, named as
    stored in the adapter — or None when every factor is finite."""
    factors = (("lora_embedding_A" if mod.embedding else "lora_A", mod.A), ("lora_embedding_B" if mod.embedding else "lora_B", mod.B))
    if mod.magnitude is not None:
        factors += (("lora_magnitude_vector", mod.magnitude),)
    for what, t in factors:
        if not all_finite(t):
            return f"{what} of {mod.module} contains NaN or Inf; ΔW is undefined"
    return None


def _module_result(mod: LoraModule, spec: MatrixSpec, load: Callable[[str], torch.Tensor] | None, base_name: str | None,
                   name: str, rows: torch.Tensor | None, module: str, config: DiffConfig, device: torch.device,
                   dtype: torch.dtype) -> ModuleResult | str:
    """The result of one analysed part of a LoRA module, or why it has none (a DoRA update that is not
    finite, from a base weight holding NaN or Inf); ``load`` reads a base tensor by name (None: no base)."""
    start = time.perf_counter()
    Bf, Af = mod.factors()
    full, base_dtype = None, ""
    if load is not None and base_name:
        stored = load(base_name)
        base_dtype = str(stored.dtype).removeprefix("torch.")
        stored = stored[mod.expert] if mod.expert is not None else stored  # one expert of a 3-D stack, before converting
        full = oriented(stored.to(torch.float32), spec.transpose, None)
    W = full[rows] if full is not None and rows is not None else full  # the analysed part's rows
    if rows is not None:
        Bf = Bf[rows]
    shape = (int(Bf.shape[0]), int(Af.shape[1]))
    p = min(shape)
    if mod.magnitude is not None:  # DoRA normalises whole rows of W + sBA: form it on the full matrix
        delta = mod.dora_delta(full)
        if rows is not None:
            delta = delta[rows]
        if not all_finite(delta):
            return f"the DoRA update of {mod.module} is not finite (NaN or Inf in the base weight {base_name}); ΔW is undefined"
        if not all_finite(delta := delta.to(torch.float32)):  # finite in float64, beyond float32's range
            return f"the DoRA update of {mod.module} overflows float32 (base weight {base_name} near its largest values)"
        S = batch_singular_values(delta.unsqueeze(0), device=device, dtype=dtype)[0]
        method = "dora/dense"
    else:
        _, s, _ = factored_svd(Bf.to(device), Af.to(device), mod.scale)
        S = np.zeros(p)
        S[: min(p, s.numel())] = s.cpu().numpy()[:p]
        method = "factored"
    if not np.isfinite(S).all():  # before any other work on it (the dense W + ΔW of --weight-spectra, the fits)
        return (f"the update s·B·A of {mod.module} overflows float64 (scale {mod.scale:g} = lora_alpha / r): the spectrum is "
                "undefined; check lora_alpha in adapter_config.json")
    base_fro = float(torch.linalg.vector_norm(W.double()).item()) if W is not None else None
    base_sv = tuned_sv = esd = None
    if config.weight_spectra and W is not None:  # W_tuned = W_base + ΔW, formed densely in float64
        tuned = W.double() + (delta.double() if mod.magnitude is not None else mod.scale * (Bf.double() @ Af.double()))
        if not all_finite(tuned):
            return f"W_base + ΔW of {mod.module} is not finite (NaN or Inf in the base weight {base_name}, or an overflowing update)"
        S_b, S_t = batch_singular_values([W.double(), tuned], device=device, dtype=dtype)
        # W_tuned carries W_base's storage rounding (the update is exact): both get the base's dtype
        rounding = (weight_rounding(W, base_dtype), weight_rounding(tuned, base_dtype)) if config.esd else ((0.0, ""), (0.0, ""))
        del tuned
        base_sv, tuned_sv = [float(x) for x in S_b[: config.top_k]], [float(x) for x in S_t[: config.top_k]]
        if config.esd:
            # a factored ΔW has at most r nonzero eigenvalues: fitted by the rule a merged model's dense ΔW
            # meets (spectra.records.delta_fit_refusal), so both forms of one update get one answer
            esd = esd_entry(shape, S, S_b, S_t, rounding=rounding)
    elif config.esd:  # the adapter alone (DoRA needs the base, so ΔW is factored here)
        esd = esd_entry(shape, S, note="no base checkpoint: W_base and W_tuned are unknown")
    note = (f"LoRA r={mod.r}, alpha={mod.alpha:g}, scale={mod.scale:g}" + (", DoRA" if mod.magnitude is not None else "")
            + (", embedding" if mod.embedding else ""))
    note += "".join("; " + x for x in (mod.note, spec.note) if x)
    if base_fro == 0:
        note += "; " + ZERO_BASE_NOTE
    return ModuleResult(
        name=name, layer=spec.layer, module=module, role=part_role(spec.role, module, spec.rel_path), expert=spec.expert,
        shape=list(shape),
        base_fro_norm=base_fro, **spectrum_fields(S, shape, config, base_fro, method), random_energy_rank=random_ranks(shape, config),
        dtype="float32", method=method, seconds=time.perf_counter() - start, note=note,
        lora_r=mod.r, lora_alpha=mod.alpha, lora_scale=mod.scale,
        base_singular_values=base_sv, tuned_singular_values=tuned_sv, esd=esd,
    )
