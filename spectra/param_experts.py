"""Place the LoRAs of PEFT's ``target_parameters`` (MoE expert stacks, :mod:`spectra.io.param_lora`) on a base
checkpoint's matrices, one rank-r update per expert.

A base stores an expert stack either as a 3-D tensor under the parameter's own name (``mlp.experts.gate_up_proj``),
or — what transformers >= 5 fuses on load — as per-expert matrices (Mixtral's ``block_sparse_moe.experts.3.w1.weight``
and ``w3.weight``, whose rows follow each other in the fused ``gate_up_proj``: :func:`spectra.peft_moe.expert_fusions`).
Per-expert matrices get ordinary :class:`spectra.io.adapter.LoraModule` s, one per expert and matrix (expert e's
B_e split by rows where several matrices were fused), so every command measures them as it measures any LoRA.
The experts of a 3-D tensor get modules with ``expert`` set, kept apart (``Adapter.stacked``): ``spectra diff``
analyses each expert; the commands that measure 2-D matrices only list them, as they list a full model's stacks.

Which parameter a stored wrapper holds is read from shapes: the one of its module's ``target_parameters`` whose
``(out, in)`` and number of experts fit its factors (``lora_A`` ``(r·E, in)``, ``lora_B`` ``(out, r·E)``); a
wrapper that fits none, or wrappers that fit more than one assignment, are refused by name.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from spectra.errors import CheckpointFormatError
from spectra.io.adapter import Adapter, LoraModule
from spectra.io.checkpoint import Checkpoint
from spectra.io.param_lora import ParamLora
from spectra.naming import MatrixSpec, pairing_key, unique_pairing_keys
from spectra.pairing import oriented_shape
from spectra.peft_moe import ExpertFusion, expert_fusions

_MERGE = "merge the adapter (merge_and_unload) and diff the merged model against the base"


@dataclass(frozen=True)
class _Target:
    """Where one parameter's experts sit in the base: a 3-D tensor (``stack``) or per-expert matrices (``parts``:
    per expert, ``(base name, rows)`` in the fused matrix's row order)."""

    experts: int
    out: int
    inp: int
    stack: str | None = None
    parts: tuple[tuple[tuple[str, int], ...], ...] = ()

    def describe(self) -> str:
        where = self.stack or f"{self.parts[0][0][0]} …"
        return f"{self.experts} experts of ({self.out}, {self.inp}) at {where}"


def place_params(adapter: Adapter, params: list[ParamLora], base: Checkpoint | None) -> None:
    """Add the per-expert LoRA modules of ``params`` to ``adapter`` (see the module docstring).

    Raises:
        CheckpointFormatError: no base (where an expert's rows land depends on its layout); DoRA (PEFT builds
            none on parameters); a wrapper that fits no parameter of the base, or fits several ways; a matrix
            that another LoRA of the adapter already updates.
    """
    first = params[0]
    named = f"{first.module} is adapted through PEFT's target_parameters ({', '.join(adapter.config.target_parameters or ())})"
    if base is None:
        raise CheckpointFormatError(f"{named}: which matrices each expert's LoRA updates depends on the base model's layout",
                                    path=adapter.path, tensor=first.stored[0],
                                    hint="pass the base model (spectra diff BASE ADAPTER; compare, trace and interfere: --base)")
    if adapter.config.use_dora:
        raise CheckpointFormatError(f"{named} with use_dora: PEFT builds no DoRA on parameters", path=adapter.path,
                                    tensor=first.stored[0], hint="the adapter_config.json was edited; " + _MERGE)
    specs = base.specs
    lookup = unique_pairing_keys(list(base.tensors))
    fusions, source = expert_fusions(base.arch.model_type)
    groups: dict[str, list[ParamLora]] = {}
    for p in params:
        groups.setdefault(p.module, []).append(p)
    for module, wrappers in groups.items():
        targets = {name: t for name in wrappers[0].params
                   if (t := _target(f"{module}.{name}", base, specs, lookup, fusions)) is not None}
        for w, (param, target, r, alpha) in zip(wrappers, _assign(adapter, wrappers, targets, source)):
            scale = alpha / math.sqrt(r) if adapter.config.use_rslora else alpha / r
            for e in range(target.experts):
                B_e, A_e = w.expert_factors(e, target.experts, r)
                origin = f"target_parameters LoRA on {module}.{param}, expert {e}"
                if target.stack is not None:
                    key = f"{module}.{param}:e{e}"
                    adapter.stacked[key] = LoraModule(key, target.stack, A_e, B_e, r, alpha, scale, expert=e, note=origin)
                    continue
                row = 0
                for name, rows in target.parts[e]:
                    mod = name.removesuffix(".weight")
                    if mod in adapter.modules:
                        raise CheckpointFormatError(
                            f"{name} is updated twice: by the LoRA of {mod} and by expert {e}'s of {module}.{param} "
                            "(target_parameters)", path=adapter.path, tensor=name, hint=_MERGE)
                    part = f"{origin}, rows {row}–{row + rows - 1}" if len(target.parts[e]) > 1 else origin
                    adapter.modules[mod] = LoraModule(mod, name, A_e, B_e[row:row + rows].contiguous(), r, alpha, scale,
                                                      note=part)
                    row += rows


def _target(full: str, base: Checkpoint, specs: dict[str, MatrixSpec], lookup: dict[str, str],
            fusions: tuple[ExpertFusion, ...]) -> _Target | None:
    """Where the parameter ``full`` (``module.param``) sits in ``base``, or None when it has none."""
    name = full if full in base.tensors else lookup.get(pairing_key(full))
    if name is not None and len(shape := tuple(base.tensors[name].shape)) == 3 and name in specs:
        out, inp = oriented_shape(specs[name], shape)[1:]
        return _Target(shape[0], out, inp, stack=name)
    for fusion in fusions:
        tail = fusion.target.lstrip(".")
        if not ("." + full).endswith("." + tail):
            continue
        prefix = full[: len(full) - len(tail)]
        for renamed in (False, True):
            parts = _per_expert(prefix, fusion, renamed, base, specs, lookup)
            if parts:
                ins = {inp for expert in parts for _, _, inp in expert}
                if len(ins) == 1:
                    return _Target(len(parts), sum(rows for _, rows, _ in parts[0]), ins.pop(),
                                   parts=tuple(tuple((n, rows) for n, rows, _ in expert) for expert in parts))
    return None


def _per_expert(prefix: str, fusion: ExpertFusion, renamed: bool, base: Checkpoint, specs: dict[str, MatrixSpec],
                lookup: dict[str, str]) -> list[list[tuple[str, int, int]]]:
    """Per expert, ``(base name, out, in)`` of each of ``fusion``'s source matrices under ``prefix`` (on-disk names:
    ``renamed`` undoes the fusion's renames), for experts 0, 1, … while every source is there."""
    experts: list[list[tuple[str, int, int]]] = []
    while True:
        found = []
        for src in fusion.sources:
            stored = "." + prefix + src.lstrip(".").replace("*", str(len(experts)))
            if renamed:
                for on_disk, loaded in fusion.renames:
                    stored = stored.replace(loaded, on_disk)
            stored = stored[1:]
            name = stored if stored in base.tensors else lookup.get(pairing_key(stored))
            shape = tuple(base.tensors[name].shape) if name is not None else ()
            if name is None or len(shape) != 2 or name not in specs:
                return experts
            out, inp = oriented_shape(specs[name], shape)
            found.append((name, out, inp))
        experts.append(found)


def _assign(adapter: Adapter, wrappers: list[ParamLora], targets: dict[str, _Target],
            source: str) -> list[tuple[str, _Target, int, float]]:
    """The one assignment of ``wrappers`` to distinct parameters of ``targets`` whose shapes fit; each with its
    ``(param, target, r, alpha)`` (``r`` and ``alpha`` after the patterns, matched on ``module.param`` as PEFT
    matches them)."""
    options = []
    for w in wrappers:
        fits = []
        for param, t in targets.items():
            r, alpha = adapter.config.rank_alpha(f"{w.module}.{param}")
            if w.A.shape[0] == r * t.experts and (w.B.shape[0], w.A.shape[1]) == (t.out, t.inp):
                fits.append((param, t, r, alpha))
        if not fits:
            where = "; ".join(f"{p}: {t.describe()}" for p, t in targets.items()) or "none of them is in the base"
            raise CheckpointFormatError(
                f"the target_parameters LoRA {w.stored[0]} (A {tuple(w.A.shape)}, B {tuple(w.B.shape)}) fits none of "
                f"{w.module}'s parameters {', '.join(w.params)} in the base ({where}; per-expert layouts from {source})",
                path=adapter.path, tensor=w.stored[0],
                hint="is this adapter for this base model? `spectra inspect BASE` lists its matrices; else " + _MERGE)
        options.append(fits)
    ways = [c for c in itertools.product(*options) if len({p for p, *_ in c}) == len(c)]
    if len(ways) != 1:
        raise CheckpointFormatError(
            f"the target_parameters LoRAs of {wrappers[0].module} ({len(wrappers)} stored) fit its parameters "
            f"{'in no way' if not ways else f'in {len(ways)} ways'}: which parameter each holds is not recorded in the adapter",
            path=adapter.path, tensor=wrappers[0].stored[0], hint=_MERGE)
    return list(ways[0])


__all__ = ["place_params"]
