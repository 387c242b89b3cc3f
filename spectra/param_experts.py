"""Place the LoRAs of PEFT's ``target_parameters`` (MoE expert stacks, :mod:`spectra.io.param_lora`) on a base
checkpoint's matrices, one rank-r update per expert.

A base stores an expert stack either as a 3-D tensor (under the parameter's own name, or one transformers renames on
load: GraniteMoE's ``block_sparse_moe.input_linear.weight`` is ``experts.gate_up_proj``), or — what transformers >= 5
fuses on load — as per-expert matrices (Mixtral's ``block_sparse_moe.experts.3.w1.weight`` and ``w3.weight``, whose
rows follow each other in the fused ``gate_up_proj``: :func:`spectra.peft_moe.expert_fusions`). Per-expert matrices
get ordinary :class:`spectra.io.adapter.LoraModule` s, one per expert and matrix (expert e's B_e split by rows where
several matrices were fused), so every command measures them as it measures any LoRA. The experts of a 3-D tensor
get modules with ``expert`` set, kept apart (``Adapter.stacked``): ``spectra diff`` analyses each expert; the
commands that measure 2-D matrices only list them, as they list a full model's stacks. A 2-D parameter (a router's
``gate.weight``) is an ordinary module; a bias parameter (gpt-oss's ``gate_up_proj_bias``) is skipped with why.

Orientation: PEFT adds ``s·B_e·A_e`` to the stored ``(d1, d2)`` matrix of expert e, or its transpose where the experts
module says ``is_transposed`` (gpt-oss, Aria: stored ``(in, out)``); Llama-4's, stored ``(in, out)`` too, do not say it.
Which of the two an adapter holds is read from its factors' shapes, and for a square stack from the model type
(:data:`spectra.peft_moe.TRANSPOSED_EXPERTS`); the update is then turned into spectra's ``(out, in)``.

Which parameter a stored wrapper holds is read from shapes: the one of its module's ``target_parameters`` whose
shape and number of experts fit its factors (``lora_A`` ``(r·E, ·)``, ``lora_B`` ``(·, r·E)``); a wrapper that fits
none, or wrappers that fit more than one assignment, are refused by name.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from spectra.errors import CheckpointFormatError
from spectra.io.adapter import Adapter, LoraModule, open_adapter
from spectra.io.checkpoint import READ_NOTE_PREFIX, Checkpoint
from spectra.io.param_lora import ParamLora, weight_param
from spectra.load_names import loaded_keys
from spectra.naming import MatrixSpec, describe_checkpoint, pairing_key, unique_pairing_keys
from spectra.pairing import EMBED_ROLES, Skipped, oriented_shape
from spectra.peft_moe import TRANSPOSED_EXPERTS, ExpertFusion, expert_fusions

_MERGE = "merge the adapter (merge_and_unload) and diff the merged model against the base"


@dataclass(frozen=True)
class _Target:
    """Where one parameter sits in the base: a 3-D tensor or a 2-D one (``stored``, its stored ``(d1, d2)`` per expert and
    whether spectra reads it transposed), or per-expert matrices (``parts``: per expert, ``(base name, rows)`` in the
    fused matrix's row order, ``(d1, d2)`` the fused ``(out, in)``)."""

    experts: int
    d1: int
    d2: int
    stored: str | None = None
    transpose: bool = False
    parts: tuple[tuple[tuple[str, int], ...], ...] = ()
    bias: bool = False
    stack: bool = False

    def describe(self) -> str:
        where = self.stored or f"{self.parts[0][0][0]} …"
        return f"{self.experts} expert(s) of ({self.d1}, {self.d2}) at {where}"


@dataclass
class BaseNames:
    """A base's tensors as a PEFT adapter names them: its specs, names by pairing key, and (on first need) the names
    transformers >= 5 loads its tensors under, inverted (a PEFT adapter saved from such a model uses those)."""

    ckpt: Checkpoint
    specs: dict[str, MatrixSpec]
    lookup: dict[str, str]
    _loaded: dict[str, str] | None = None

    def stored(self, name: str) -> str | None:
        """The stored tensor of this name, or of its pairing key (a wrapper prefix apart), or None."""
        return name if name in self.ckpt.tensors else self.lookup.get(pairing_key(name))

    def find(self, name: str) -> str | None:
        """The stored tensor a loaded-model name (PEFT's) stands for, or None."""
        if (found := self.stored(name)) is not None:
            return found
        if self._loaded is None:  # (builds the model on the meta device: only for a name found neither way)
            self._loaded = {new: old for old, new in loaded_keys(self.ckpt.config, self.ckpt.tensors).items()}
        return self._loaded.get(name)


def refuse_base_changing(adapter: Adapter, then: str) -> None:
    """Refuse an adapter whose initialisation changed the base weights (PiSSA, OLoRA, CorDA, LoRA-GA… saved without
    conversion: :attr:`~spectra.io.adapter.AdapterConfig.base_changing_init`): s·B·A alone is not its update, and every
    number of it would describe the base's moved principal components. ``then``: what to do with the merged model, for
    the hint.

    Raises:
        CheckpointFormatError: names the adapter and its initialisation.
    """
    if init := adapter.config.base_changing_init:
        raise CheckpointFormatError(f"this adapter was initialised with {init} (init_lora_weights={adapter.config.init_lora_weights!r}), "
                                    "which changes the base weights: s·B·A alone is not the fine-tuning update",
                                    path=adapter.path, hint=f"merge it (merge_and_unload) and {then}")


def open_adapter_on(path: str | Path, base: Checkpoint | None, *, keep: Callable[[str, int | None], bool] | None = None,
                    check_copies: bool = True, merged: str = "pass the merged model instead") -> Adapter:
    """:func:`spectra.io.adapter.open_adapter` for measuring its updates: one whose initialisation changed the base
    (PiSSA…) is refused (:func:`refuse_base_changing`; ``merged`` says what to do with the merged model instead), its
    ``target_parameters`` LoRAs are placed on ``base`` (:func:`place_params`; without a base they are refused, as
    ``open_adapter`` refuses them), its LoRAs of a weight stored ``(in, out)`` turned (:func:`orient_weight_params`),
    and with ``check_copies`` its saved base-layer copies of the matrices ``keep(name, layer)`` selects (all: None) are
    checked against ``base`` (:func:`check_base_copies`).

    Raises:
        CheckpointFormatError: a base-changing initialisation, a saved copy that differs from ``base``.
    """
    adapter = open_adapter(path, params=base is not None)
    refuse_base_changing(adapter, merged)
    if adapter.params and base is not None:
        place_params(adapter, adapter.params, base)
    refuse_unloadable_weight_params(adapter)
    if base is not None:
        orient_weight_params(adapter, base)
    elif lone := [m for m in adapter.modules if weight_param(m, adapter.config.target_parameters)]:
        adapter.notes.append(f"{READ_NOTE_PREFIX}{adapter.path}: {len(lone)} LoRA(s) of a weight named in target_parameters (e.g. "
                             f"{lone[0]}) are read as (out, in); PEFT adds s·B·A to the weight as stored, (in, out) for a Conv1D "
                             "(GPT-2's): pass the base to orient them by its layout")
    if base is not None and check_copies:
        check_base_copies(adapter, base, keep=keep)
    return adapter


def refuse_unloadable_weight_params(adapter: Adapter) -> None:
    """Refuse an adapter with a ``target_parameters`` LoRA of a module's ``weight`` that PEFT refuses to load: with
    ``fan_in_fan_out`` set (its ParamWrapper "does not work with fan_in_fan_out"), or a module that ``target_modules``
    names too (wrapped twice). Read anyway, its update was turned round or measured where PEFT builds none.

    Raises:
        CheckpointFormatError: names the module and the clash.
    """
    cfg = adapter.config
    for module in (m for m in adapter.modules if weight_param(m, cfg.target_parameters)):
        if cfg.fan_in_fan_out:
            why = "fan_in_fan_out is true, which PEFT's LoRA of a parameter refuses"
        elif cfg.target_modules is not None and cfg.untargeted(module, module_loras=True) is None:
            why = "target_modules names the module too: PEFT would wrap it twice, and refuses"
        else:
            continue
        raise CheckpointFormatError(f"{module}.weight is in target_parameters, but {why}: PEFT does not load this adapter",
                                    path=adapter.path, tensor=module, hint="fix adapter_config.json to the way the adapter "
                                    "was trained (target_modules or target_parameters, not both; fan_in_fan_out false)")


def orient_weight_params(adapter: Adapter, base: Checkpoint) -> None:
    """Turn each ``target_parameters`` LoRA of a 2-D weight that ``base`` stores as ``(in, out)`` (a Conv1D's: GPT-2's
    ``c_attn``, ``c_proj``, ``c_fc``) to the ``(out, in)`` of its module LoRA, in ``adapter.modules``. PEFT adds s·B·A to
    the parameter as stored (B ``(in, r)``, A ``(r, out)`` there), so the update is s·(B·A)ᵀ = s·Aᵀ·Bᵀ; a module's own
    LoRA is ``(out, in)`` whatever its layer stores. Read as a module's, every direction of the update was the other
    side's (φ 0.04 against its own merge) and a non-square one refused as transposed. An embedding's weight (``(vocab,
    dim)`` as stored, as spectra orients it) becomes an embedding LoRA (``LoraModule.embedding``), whose factors extract
    writes as PEFT's ``lora_embedding_A/B``."""
    names = None
    for module, mod in list(adapter.modules.items()):
        if not weight_param(module, adapter.config.target_parameters):
            continue
        names = names or BaseNames(base, base.specs, unique_pairing_keys(list(base.tensors)))
        spec = base.specs.get(names.find(mod.weight_name) or "")
        if spec is None or not (spec.transpose or spec.role in EMBED_ROLES):
            continue
        # either way the factors swap sides: a Conv1D's update is s·(B·A)ᵀ; an embedding's s·B·A as stored, (vocab, dim),
        # has an embedding LoRA's factors
        note = "PEFT's target_parameters LoRA of the weight as stored (in, out): the update is s·(B·A)ᵀ" if spec.transpose else ""
        adapter.modules[module] = replace(mod, A=mod.B.mT.contiguous(), B=mod.A.mT.contiguous(), embedding=not spec.transpose,
                                          note="; ".join(x for x in (mod.note, note) if x))


def tied_head_spec(weight_name: str, shape: tuple[int, ...], base: Checkpoint, specs: dict[str, MatrixSpec], *,
                    rows_may_differ: bool = False) -> tuple[MatrixSpec, str] | None:
    """``(spec, embedding name)`` when ``weight_name`` (its ``(out, in)`` ``shape``, as nn.Linear stores it) is the output
    head of a base that ties the head to its input embedding (no head stored, ``tie_word_embeddings``
    not false, one embedding of the head's shape, or of its width with ``rows_may_differ``: a vocabulary
    resized since): PEFT's lm_head then computes with that matrix. Else None."""
    own = describe_checkpoint({weight_name: shape}, base.arch).get(weight_name)
    if own is None or own.role != "head" or any(sp.role == "head" for sp in specs.values()):
        return None
    if (base.config or {}).get("tie_word_embeddings") is False:
        return None
    embeds = [sp for sp in specs.values() if sp.role == "embed" and sp.layer is None]
    if len(embeds) != 1:
        return None
    embed_shape = oriented_shape(embeds[0], tuple(base.tensors[embeds[0].name].shape))
    if (embed_shape[1:] != tuple(shape)[1:]) if rows_may_differ else (embed_shape != tuple(shape)):
        return None
    note = (f"the base ties its output head to {embeds[0].name} (it stores no {weight_name}): "
            "the update is measured against that embedding")
    return replace(own, transpose=embeds[0].transpose, note="; ".join(x for x in (own.note, note) if x)), embeds[0].name


def check_base_copies(adapter: Adapter, base: Checkpoint, *, keep: Callable[[str, int | None], bool] | None = None,
                      chunk: int = 1 << 23) -> None:
    """Refuse an adapter whose saved copy of a base layer differs from ``base``'s matrix beyond rounding.

    PEFT saves ``X.base_layer.weight`` beside an embedding or output-head LoRA and loads it over the
    model's own weight: PEFT's model then updates ``base`` by ``(copy − W) + s·B·A``, not ``s·B·A``, and a
    copy that differs means the adapter was made on other weights than these. Equal within the rounding
    of the coarser of the two dtypes (``|copy − W| <= u·|W|`` entrywise, plus a subnormal step): a base
    loaded in bfloat16 saves a rounded copy, and so does a narrower format's values stored wider; NaN where both hold
    NaN is equal. Only the matrices ``keep(name, layer)`` selects are checked (``--exclude lm_head`` measures the
    rest); the copy of a head the base ties to its embedding is checked against that embedding; a copy without a
    LoRA is not checked. Compared ``chunk`` entries at a time, in float64 (a 7B model's embedding in float64 is 1 GB).

    Raises:
        CheckpointFormatError: names the copy, the base tensor and the largest difference.
    """
    copies = [n for n in adapter.base_copies if n.endswith(".base_layer.weight")]
    if not copies:
        return
    if adapter.weights is None:  # an adapter built by hand: nothing to read its copies from
        return
    where = BaseNames(base, base.specs, unique_pairing_keys(list(base.tensors)))
    for name in copies:
        mod = adapter.modules.get(name.removeprefix("base_model.model.").removesuffix(".base_layer.weight"))
        base_name = None if mod is None else mod.weight_name if mod.weight_name in base.tensors else where.find(mod.weight_name)
        if base_name is None and mod is not None and (tied := tied_head_spec(mod.weight_name, tuple(mod.shape), base, base.specs)):
            base_name = tied[1]  # a head the base ties to its embedding: PEFT loads the copy over that shared matrix
        if base_name is None:  # a copy without a LoRA: nothing measured against it
            continue
        spec = base.specs.get(base_name)
        if keep is not None and spec is not None and not keep(spec.name, spec.layer):
            continue
        copy, W = adapter.weights.load(name), base.load(base_name)
        if copy.shape != W.shape:
            raise CheckpointFormatError(f"this copy of a base layer, which PEFT loads over the base's, is {tuple(copy.shape)}, "
                                        f"the base's {base_name} {tuple(W.shape)} (a resized vocabulary?)",
                                        path=adapter.path, tensor=name, hint=_MERGE)
        info = [torch.finfo(t.dtype) for t in (copy, W) if t.is_floating_point()]
        u, step = max((i.eps / 2 for i in info), default=0.0), max((i.tiny * i.eps for i in info), default=0.0)
        differs = None  # (the difference, the base's entry) at the first entry beyond rounding
        flat_copy, flat_W = copy.reshape(-1), W.reshape(-1)
        for i in range(0, flat_W.numel(), chunk):
            c, w = flat_copy[i:i + chunk].double(), flat_W[i:i + chunk].double()
            same = (c == w) | (c.isnan() & w.isnan())  # (an equal Inf, a NaN on both sides: a copy)
            # values of a narrower format stored wider (a model loaded in bfloat16, saved in float32) carry its rounding
            tol = u + sum(torch.finfo(f).eps / 2 for f in (torch.bfloat16, torch.float16)
                          if torch.finfo(f).eps / 2 > u and bool((c.to(f).double() == c).all()))
            excess = ((c - w).abs() - tol * w.abs() - step).nan_to_num(nan=math.inf).masked_fill(same, -1.0)
            if bool((excess > 0).any()):
                k = int(excess.argmax())
                differs = float((c[k] - w[k]).abs()), float(w[k].abs())
                break
        if differs is not None:
            worst, at = differs
            raise CheckpointFormatError(
                f"this copy of a base layer differs from the base's {base_name} (by {worst:.3g} at an entry of {at:.3g}): PEFT "
                "loads the copy over the base's, so s·B·A is not this adapter's update of it, and the adapter was made on "
                "other weights than this base", path=adapter.path, tensor=name,
                hint="pass the base it was trained on; or " + _MERGE)


def place_params(adapter: Adapter, params: list[ParamLora], base: Checkpoint) -> None:
    """Add the per-expert LoRA modules of ``params`` to ``adapter`` (see the module docstring).

    Raises:
        CheckpointFormatError: DoRA (PEFT builds none on parameters); a wrapper that fits no parameter of the
            base, or fits several ways; a matrix that another LoRA of the adapter already updates.
    """
    first = params[0]
    named = f"{first.module} is adapted through PEFT's target_parameters ({', '.join(adapter.config.target_parameters or ())})"
    if adapter.config.use_dora:
        raise CheckpointFormatError(f"{named} with use_dora: PEFT builds no DoRA on parameters", path=adapter.path,
                                    tensor=first.stored[0], hint="the adapter_config.json was edited; " + _MERGE)
    where = BaseNames(base, base.specs, unique_pairing_keys(list(base.tensors)))
    fusions, source = expert_fusions(base.arch.model_type)
    square_transposed = (base.arch.model_type or "") in TRANSPOSED_EXPERTS
    groups: dict[str, list[ParamLora]] = {}
    for p in params:
        groups.setdefault(p.module, []).append(p)
    for module, wrappers in groups.items():
        targets = {name: t for name in wrappers[0].params if (t := _target(f"{module}.{name}", where, fusions)) is not None}
        assigned = _assign(adapter, wrappers, targets, source, square_transposed)
        # PEFT wraps every parameter target_parameters match: one the base holds without stored factors is a file short
        # of keys (PEFT says "missing adapter keys"), listed rather than read as unchanged
        adapter.skipped.extend(Skipped(f"{module}.{param}", f"target_parameters match it and the base holds it ({t.describe()}), but the "
                                       "adapter stores no LoRA factors for it (PEFT loads it with missing adapter keys): not analysed")
                               for param, t in targets.items() if param not in {a[0] for a in assigned})
        for w, (param, target, r, alpha, peft_t) in zip(wrappers, assigned):
            full = f"{module}.{param}"
            if target.bias:
                adapter.skipped.extend(Skipped(n, f"a LoRA on the bias parameter {full} (target_parameters): a vector per "
                                                  "expert, not a weight matrix; not analysed") for n in w.stored)
                continue
            _add(adapter, w, full, target, r, alpha, flip=peft_t != target.transpose)


def _add(adapter: Adapter, w: ParamLora, full: str, target: _Target, r: int, alpha: float, *, flip: bool) -> None:
    """``w``'s LoRA modules, one per expert (and fused part), in spectra's ``(out, in)``: ``flip`` where PEFT's
    update ``s·B_e·A_e`` is that matrix's transpose."""
    scale = alpha / math.sqrt(r) if adapter.config.use_rslora else alpha / r
    for e in range(target.experts):
        B_e, A_e = w.expert_factors(e, target.experts, r)
        if flip:  # (B·A)ᵀ = Aᵀ·Bᵀ
            B_e, A_e = A_e.mT.contiguous(), B_e.mT.contiguous()
        origin = f"target_parameters LoRA on {full}" + (f", expert {e}" if target.experts > 1 or target.parts else "")
        if target.stack:
            key = f"{full}:e{e}"
            adapter.stacked[key] = LoraModule(key, target.stored, A_e, B_e, r, alpha, scale, expert=e, note=origin)
            continue
        parts = target.parts[e] if target.parts else ((target.stored, B_e.shape[0]),)
        row = 0
        for name, rows in parts:
            mod = name.removesuffix(".weight")
            if mod in adapter.modules:
                raise CheckpointFormatError(f"{name} is updated twice: by the LoRA of {mod} and by that of {full} (target_parameters)",
                                            path=adapter.path, tensor=name, hint=_MERGE)
            note = f"{origin}, rows {row}–{row + rows - 1}" if len(parts) > 1 else origin
            adapter.modules[mod] = LoraModule(mod, name, A_e, B_e[row:row + rows].contiguous(), r, alpha, scale, note=note)
            row += rows


def _target(full: str, base: BaseNames, fusions: tuple[ExpertFusion, ...]) -> _Target | None:
    """Where the parameter ``full`` (``module.param``, as the loaded model names it) sits in ``base``, or None."""
    name = base.find(full)
    bias = full.rpartition(".")[2].endswith("bias")
    if name is not None and (name in base.specs or bias) and len(shape := tuple(base.ckpt.tensors[name].shape)) in (2, 3):
        transpose = name in base.specs and base.specs[name].transpose
        if len(shape) == 2:  # a 2-D parameter: one "expert"
            return _Target(1, shape[0], shape[1], stored=name, transpose=transpose, bias=bias)
        return _Target(shape[0], shape[1], shape[2], stored=name, transpose=transpose, stack=True, bias=bias)
    for fusion in fusions:
        tail = fusion.target.lstrip(".")
        if not ("." + full).endswith("." + tail):
            continue
        prefix = full[: len(full) - len(tail)]
        for renamed in (False, True):
            parts = _per_expert(prefix, fusion, renamed, base)
            if parts:
                ins = {inp for expert in parts for _, _, inp in expert}
                if len(ins) == 1:
                    return _Target(len(parts), sum(rows for _, rows, _ in parts[0]), ins.pop(),
                                   parts=tuple(tuple((n, rows) for n, rows, _ in expert) for expert in parts))
    return None


def _per_expert(prefix: str, fusion: ExpertFusion, renamed: bool, base: BaseNames) -> list[list[tuple[str, int, int]]]:
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
            name = base.stored(stored)  # (on-disk names: not what transformers loads them as)
            shape = tuple(base.ckpt.tensors[name].shape) if name is not None else ()
            if name is None or len(shape) != 2 or name not in base.specs:
                return experts
            out, inp = shape[::-1] if base.specs[name].transpose else shape
            found.append((name, out, inp))
        experts.append(found)


def _fits(w: ParamLora, t: _Target, r: int, square_transposed: bool) -> bool | None:
    """Whether PEFT built ``w`` on ``t`` as transposed (its update the stored matrix's transpose), or None when
    ``w``'s factors do not fit ``t`` at rank ``r``."""
    if w.A.shape[0] != r * t.experts:
        return None
    got = (w.B.shape[0], w.A.shape[1])
    if t.parts or not t.stack and not t.bias:  # fused per-expert matrices and 2-D parameters: never transposed by PEFT
        return False if got == (t.d1, t.d2) else None
    if got == (t.d1, t.d2) and got == (t.d2, t.d1):  # a square stack: the model type says
        return square_transposed
    return False if got == (t.d1, t.d2) else True if got == (t.d2, t.d1) else None


def _assign(adapter: Adapter, wrappers: list[ParamLora], targets: dict[str, _Target], source: str,
            square_transposed: bool) -> list[tuple[str, _Target, int, float, bool]]:
    """The one assignment of ``wrappers`` to distinct parameters of ``targets`` whose shapes fit; each with its
    ``(param, target, r, alpha, transposed by PEFT)`` (``r`` and ``alpha`` after the patterns, matched on
    ``module.param`` as PEFT matches them)."""
    options = []
    for w in wrappers:
        fits = []
        for param, t in targets.items():
            r, alpha = adapter.config.rank_alpha(f"{w.module}.{param}")
            if (peft_t := _fits(w, t, r, square_transposed)) is not None:
                fits.append((param, t, r, alpha, peft_t))
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


__all__ = ["BaseNames", "check_base_copies", "open_adapter_on", "place_params", "tied_head_spec"]
