"""Writing the adapter of a ``spectra extract`` run: ``adapter_model.safetensors`` streamed one module at a time
from the scratch shard, and ``adapter_config.json`` (:mod:`spectra.io.peft_writer`).

Modules are written as PEFT LoRA modules; biases and whole modules (norms, a task head) from ``not_lora``; the
experts of a 3-D stack together as one ``target_parameters`` LoRA of the stack (:func:`spectra.io.peft_writer.param_lora_layout`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spectra.extract_plan import ExtractConfig
from spectra.extract_results import ExtractResult
from spectra.io.peft_writer import (
    LoraFactors,
    adapter_config,
    lora_layout,
    lora_tensors,
    param_depths,
    param_lora_layout,
    param_lora_tensors,
    saved_name,
    write_adapter,
)

if TYPE_CHECKING:  # extract imports this module: its run types are named for the checker only
    from spectra.extract import ExtractSource
    from spectra.extract_io import ExtractRun
    from spectra.extract_plan import Target


def adapter_files(src: ExtractSource, run: ExtractRun, ranks: list[int], config: ExtractConfig,
                  not_lora: list[dict]) -> tuple[list[tuple[str, tuple[int, ...]]], Iterator[torch.Tensor], dict[str, Any],
                                                 list[tuple[str, int, tuple[int, int]]]]:
    """The adapter at ``ranks`` as ``(layout, tensors, config, pads)``: the names and shapes of every tensor,
    a generator loading them one module at a time from the scratch shard (memory: one module),
    ``adapter_config.json``, and the per-expert matrices written with zero factors (:func:`_missing_experts`).
    ``src``: the run's source (``spectra.extract.ExtractSource``); ``run``: its :class:`spectra.extract_io.ExtractRun`.
    Biases and saved modules come from ``not_lora``."""
    def as_loaded(module: str) -> str:  # the module's path once transformers >= 5 loads the model
        return src.renames.get(module, module)

    biases = {as_loaded(r["module"]): r["delta"] for r in not_lora if r.get("held") == "lora_bias"}
    full = {f"{as_loaded(n.rpartition('.')[0])}.{n.rpartition('.')[2]}" if "." in n else n: v
            for r in not_lora if r.get("held") == "modules_to_save" for n, v in r["tensors"].items()}
    chosen = [(i, t, r) for i, (t, r) in enumerate(zip(src.targets, ranks)) if r and not t.stack]
    pads = _missing_experts(src, chosen)
    stacks = _stacks(src, ranks)
    depths = param_depths(list(stacks))
    layout = [e for i, t, r in chosen for e in lora_layout(t.module, r, t.shape, embedding=t.embedding, bias=bool(biases))]
    layout += [e for p, (r, shape, _) in stacks.items() for e in param_lora_layout(p, r, len(stacks[p][2]), shape, depths[p],
                                                                                    bias=bool(biases))]
    layout += [e for m, r, shape in pads for e in lora_layout(m, r, shape, bias=bool(biases))]
    layout += [(saved_name(n), tuple(v.shape)) for n, v in full.items()]

    def tensors() -> Iterator[torch.Tensor]:
        for i, t, r in chosen:
            B, A = run.load(i, r)
            # lora_bias is one flag for every adapted module: zeros where the bias did not change
            bias = (biases.get(t.module, torch.zeros(t.shape[0])) if biases else None)
            yield from (x for _, x in lora_tensors(LoraFactors(t.module, B, A, t.embedding, bias)))
        for r, shape, experts in stacks.values():  # one stack's factors at once (r·E·(out + in) values)
            factors = [None if i is None else _peft_oriented(*run.load(i, r), flip=src.targets[i].flip) for i in experts]
            yield from param_lora_tensors(factors, r, shape, bias=bool(biases))
        for m, r, (out, inp) in pads:
            yield from (x for _, x in lora_tensors(LoraFactors(m, torch.zeros(out, r), torch.zeros(r, inp), False,
                                                               torch.zeros(out) if biases else None)))
        yield from full.values()

    adapted = {t.module: r for i, t, r in chosen} | {m: r for m, r, _ in pads}
    groups = [ranks[i] for g in run.plan.groups.values() for i in g if ranks[i]]  # the stacks' rank among them
    # every module with a weight, of any rank (a Conv3d patch embedding is a module a short target would reach too)
    all_modules = [as_loaded(n[: -len(".weight")].removeprefix(src.base_prefix)) for n in src.base.tensors if n.endswith(".weight")]
    cfg = adapter_config(adapted, all_modules=all_modules, base_model=src.base.label, task_type=src.task_type, rslora=config.rslora,
                         fan_in_fan_out=any(t.conv1d for i, t, r in chosen),
                         modules_to_save=sorted({as_loaded(r["module"]) for r in not_lora if r.get("held") == "modules_to_save"}),
                         lora_bias=bool(biases), shared_rank=groups[0] if groups else None, params=list(stacks),
                         experts=src.experts)
    if src.adapter is not None and src.adapter.config.activated:  # an aLoRA's update applies after its invocation tokens only
        cfg["alora_invocation_tokens"] = list(src.adapter.config.activated)
    return layout, tensors(), cfg, pads


def _missing_experts(src: ExtractSource, chosen: list[tuple[int, Target, int]]) -> list[tuple[str, int, tuple[int, int]]]:
    """``(module, r, (out, in))`` of the per-expert matrices a layer's written ones leave out, where PEFT converts
    per-expert LoRAs to its LoRA on transformers ≥ 5's fused experts (:attr:`ExtractSource.experts`): it stacks every
    expert's factors, fuses gate and up (``w1``, ``w3``) and refuses one without the other, and nests the fused pair's
    LoRA under down's, so an adapter holding some of a layer's experts or projections fails to load or loads without
    them. Each is written with zero factors at the experts' rank (no update): the experts and projections
    --include/--exclude left out, or that the adapter being resized did not adapt."""
    if src.experts is None:
        return []
    split = src.experts.converted_expert
    written = {t.module for _, t, _ in chosen}
    rank = {key[0]: r for _, t, r in chosen if t.expert is not None and (key := split(t.module))}  # a layer's experts: one r
    pads = []
    for module, shape in _stored_modules(src) if rank else ():
        if (key := split(module)) and key[0] in rank and module not in written and len(shape) == 2:
            pads.append((module, rank[key[0]], (int(shape[0]), int(shape[1]))))
    return pads


def _stored_modules(src: ExtractSource) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``(module, stored shape)`` of each of the base's ``.weight`` tensors, the module named as PEFT names it (the
    checkpoint's wrapper prefix removed)."""
    for n, info in src.base.tensors.items():
        if n.endswith(".weight"):
            yield n[: -len(".weight")].removeprefix(src.base_prefix), tuple(info.shape)


def _other_layers_experts(src: ExtractSource, written: list[str]) -> list[str]:
    """The experts containers (as stored) that PEFT < 0.22 (rules whose :attr:`~spectra.peft_moe.PeftMoeRules.retargeted`
    holds the converted names) adapts besides those of the ``written`` modules: it matches a converted expert by its last
    name component, so an adapter of layer 0's experts builds LoRAs on every layer's."""
    rules = src.experts
    if rules is None or not rules.retargeted:
        return []
    keys = [key for m in written if (key := rules.converted_expert(m))]
    mine, leaves = {k[0] for k in keys}, {k[1] for k in keys}
    return sorted({key[0] for m, _ in _stored_modules(src) if (key := rules.converted_expert(m)) and key[0] not in mine and key[1] in leaves})


def _stacks(src: ExtractSource, ranks: list[int]) -> dict[str, tuple[int, tuple[int, int], list[int | None]]]:
    """``{parameter path: (r, (out, in) in PEFT's orientation, target index of each expert or None)}`` of the 3-D stacks
    adapted at ``ranks``: every expert of a stack shares the experts' rank; an unchanged one, or one skipped for NaN or
    Inf, holds zero factors (:meth:`spectra.extract_io.ExtractRun.load` pads them; None here when its rank is 0)."""
    out: dict[str, tuple[int, tuple[int, int], list[int | None]]] = {}
    for i, (t, r) in enumerate(zip(src.targets, ranks)):
        if not (t.stack and r):
            continue
        shape = (t.shape[1], t.shape[0]) if t.flip else t.shape
        r0, _, experts = out.setdefault(t.module, (r, shape, [None] * t.stack))
        if r != r0:  # the plan ties every expert to one rank: a second rank is a bug, not an input
            raise RuntimeError(f"{t.name}: rank {r} in a stack at rank {r0}")
        experts[int(t.expert or 0)] = i
    return out


def _peft_oriented(B: torch.Tensor, A: torch.Tensor, *, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of ΔW = B·A in spectra's ``(out, in)``, as PEFT's stack holds them: ``(Aᵀ, Bᵀ)`` where it holds ΔWᵀ."""
    return (A.mT.contiguous(), B.mT.contiguous()) if flip else (B, A)


def write_extracted(out: Path, src: ExtractSource, run: ExtractRun, ranks: list[int], config: ExtractConfig, dtype: torch.dtype,
                    not_lora: list[dict], result: ExtractResult) -> None:
    """Write the adapter into ``out`` (:func:`adapter_files`, :func:`spectra.io.peft_writer.write_adapter`) and say
    what was written in ``result.adapter`` (``saved_params``: entries of the tensors stored whole; ``bias_params``: of
    the ``lora_B.bias`` vectors, zeros where a bias did not change; both outside the budget, which buys LoRA factors)."""
    layout, tensors, cfg, pads = adapter_files(src, run, ranks, config, not_lora)
    files = write_adapter(out, layout, tensors, cfg, dtype)
    if stacked := cfg.get("target_parameters"):
        result.warnings.append(f"{len(stacked)} 3-D expert stack(s) (e.g. {stacked[0]}) are written as PEFT target_parameters LoRAs, "
                               "one per stack: PEFT >= 0.17 loads them; a serving engine may not (vLLM serves module LoRAs)")
    if pads:
        # counted as the others are, as PEFT builds them: a fused pair's block-diagonal B holds r·out more (Target.fused_out)
        fused = src.experts.fused if src.experts is not None else frozenset()
        extra = sum(r * (o + i) + r * o * (m.rpartition(".")[2] in fused) for m, r, (o, i) in pads)
        totals = result.totals
        totals["params"] += extra
        totals["bytes"] = totals["params"] * torch.empty(0, dtype=dtype).element_size()
        totals["param_fraction"] = totals["params"] / totals["full_params"] if totals.get("full_params") else 0.0
        result.warnings.append(f"{len(pads)} per-expert matrices not extracted (left out by the selection, or absent from the adapter "
                               f"resized: e.g. {pads[0][0]}) are written with zero factors at r = {pads[0][1]} (+{extra:,} parameters, "
                               f"counted{', beyond the budget' * (config.mode == 'budget')}): PEFT stacks every expert of a layer, gate, "
                               "up and down together, into its LoRA on the fused experts")
    rules = src.experts
    if rules is not None and (others := _other_layers_experts(src, [t.module for t, r in zip(src.targets, ranks) if r and not t.stack])):
        result.warnings.append(f"PEFT before 0.22 ({rules.source}) reaches the fused experts by their projection's name alone, in every "
                               f"layer: loading this adapter also builds zero LoRAs (no update) on the experts of {len(others)} layer(s) "
                               f"not extracted (e.g. {others[0]}), parameters beyond totals.params; PEFT >= 0.22 adapts only "
                               "the extracted ones")
    # written by PEFT 0.22's rules: an earlier PEFT drops some of it on load, unsaid by either
    if rules is not None and (old := rules.before_0_22()) is not rules and (lost := [
            t.module for t, r in zip(src.targets, ranks) if r and not t.stack and old.why_dropped(t.module, t.expert)]):
        result.warnings.append(f"written by the rules of {rules.source}: PEFT before 0.22 drops {len(lost)} of its LoRA modules on load "
                               f"(e.g. {lost[0]}, {'an expert it does not convert' if '.experts.' in lost[0] else 'retargeted to the experts'})"
                               "; load it with PEFT >= 0.22")
    whole = {n: v for r in not_lora if r.get("held") == "modules_to_save" for n, v in r["tensors"].items()}  # a module's records share them
    saved = sum(v.numel() for v in whole.values())
    # lora_bias is one flag: every adapted module carries a bias vector (out,), changed or not
    bias = sum(math.prod(shape) for name, shape in layout if name.endswith(".lora_B.bias"))
    if config.mode == "budget" and (saved or bias):  # (--rank and --energy spend no budget)
        parts = [f"{saved:,} of modules kept whole (modules_to_save, adapter.saved_params)"] * bool(saved) + \
                [f"{bias:,} of lora_B.bias vectors (adapter.bias_params)"] * bool(bias)
        result.warnings.append(f"the adapter stores {saved + bias:,} parameters besides its LoRA factors, outside the budget: "
                               + ", ".join(parts))
    result.adapter = {"path": str(out), "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": cfg["use_rslora"],
                      "target_modules": cfg["target_modules"], "target_parameters": cfg.get("target_parameters"),
                      "modules_to_save": cfg["modules_to_save"], "saved_params": saved, "bias_params": bias,
                      "lora_bias": cfg["lora_bias"], "fan_in_fan_out": cfg["fan_in_fan_out"], "task_type": cfg["task_type"],
                      "dtype": str(dtype).removeprefix("torch."), "bytes": sum(f.stat().st_size for f in files),
                      "tensors": len(layout)}


__all__ = ["adapter_files", "write_extracted"]
