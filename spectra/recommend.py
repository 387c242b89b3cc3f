"""``spectra recommend``: a PEFT ``LoraConfig`` for training, from a diff's ``results.json`` alone (no
checkpoint is read again): per module the rank that holds τ of its update's energy, optionally
within a parameter budget, written as ``r``, ``rank_pattern``, ``alpha_pattern`` and ``target_modules``.

From each module's record: ``energy_rank[τ]`` when the diff computed that threshold, else the rank
read off its top singular values and ``fro_norm`` (when they reach τ). Fused matrices the diff split
(``qkv_proj:q``…) are trained whole by PEFT: the whole module gets the sum of its parts' ranks (a
rank that holds ≥ τ of each part holds ≥ τ of the whole), capped at its min(out, in), ``--max-rank`` and, in a diff
of an adapter, its LoRA r (one s·B·A has no more directions).
With a budget, components are spread by :func:`spectra.allocation.allocate` (the integer optimum) over the singular values
the results hold (``--top-k`` of the diff), each module capped at its τ rank and ``--max-rank``; a fused
module's parts pool their values (a component of any part costs the whole module's ``out + in``).
Matrices whose update is at the rounding level of their storage dtype (the rule of spectra diff's
findings, :func:`spectra.findings.analysed`) get no components: their spectrum is rounding noise. Nor does
any component at or below a matrix's ``rounding_floor`` (the rounding of its stored weights, which diff
records; ``spectra extract`` never buys one either): a budget larger than the update needs is left unspent,
with a note; results without the field (an older diff) are read as before, with a note.
Sums of σ² are scaled by a power of two (:func:`spectra.metrics.square_scale_exponent`), so that
float64 updates near 1e200 do not overflow. Alphas follow ``alpha = alpha_ratio · r`` (Biderman et
al. 2024 train with ``alpha = 2r``); rsLoRA on request.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectra.allocation import allocate
from spectra.display import matrices
from spectra.errors import ConfigError, SpectraError
from spectra.extract_heads import HEAD_NAMES, auto_task_type, head_modules, head_of, named_class
from spectra.extract_plan import all_held_text, dearer_text, unspent_text
from spectra.findings import analysed
from spectra.io.checkpoint import open_checkpoint, read_config
from spectra.io.jsonfile import RESULTS_MAX_BYTES, load_json
from spectra.io.peft_writer import check_task_type, exclude_modules, pattern_key, rank_pattern_keys, target_modules
from spectra.layouts import CONV1D_LEAVES, ArchInfo
from spectra.load_names import adapter_renames, refuse_split, renames_text
from spectra.lowrank import parse_budget
from spectra.metrics import normal_float32, resolved_above, square_scale_exponent
from spectra.naming import pairing_key, unique_pairing_keys
from spectra.pairing_notes import EXPERT_COUNT_KEYS, SAVED_WHOLE
from spectra.peft_moe import PeftMoeRules, peft_moe_rules, peft_rules
from spectra.recommend_records import buyable, ends_kept, is_embedding, kept_values, lora_r, part_rank
from spectra.results import SCHEMA as DIFF_SCHEMA
from spectra.results import DiffResult

#: Bytes per parameter assumed for a budget given as a size (``50MB``): a bf16 adapter.
BUDGET_BYTES_PER_PARAM = 2


@dataclass
class Recommendation:
    """What :func:`recommend` returns.

    Attributes:
        config: ``LoraConfig`` keyword arguments (``peft.LoraConfig(**config)``), JSON-ready.
        ranks: module path -> recommended rank (modules with rank 0 are left out of the config).
        params: LoRA parameters of the config, Σ r·(out + in).
        full_params: parameters of the full update, Σ out·in over the modules that changed (a nonzero update
            above the rounding level of its storage dtype), the denominator of a percentage budget.
        notes: caveats (ranks read off truncated spectra, capped modules, components at the rounding floor left
            out, budget shortfalls and budget left unspent).
    """

    config: dict[str, Any]
    ranks: dict[str, int]
    params: int
    full_params: int
    notes: list[str] = field(default_factory=list)


def recommend(results: str | Path | dict, *, energy: float | None = 0.9, budget: str | None = None, alpha_ratio: float = 2.0,
              rslora: bool = False, max_rank: int | None = None, embeddings: bool = False,
              task_type: str | None = "auto") -> Recommendation:
    """Recommend per-module LoRA ranks for training from a diff's results.

    Args:
        results: a ``results.json`` of ``spectra diff`` (path, or the folder holding it, or the parsed document).
        energy: τ in (0, 1]: each module's rank holds ≥ τ of its update's energy; None with a budget
            alone (then each module may take as many components as the results hold singular values).
        budget: at most this many LoRA parameters (``1.2M``, ``10%`` of the full update: Σ out·in of the modules
            that changed, :attr:`Recommendation.full_params`; ``50MB`` of a bf16 adapter), spread to keep the most energy.
        alpha_ratio: ``lora_alpha = alpha_ratio · r`` (or ``· √r`` with ``rslora``).
        rslora: write ``use_rslora``.
        max_rank: cap every rank.
        embeddings: also recommend LoRA for embeddings and the output head.
        task_type: PEFT task type written into the config; ``"auto"``: as ``extract`` writes it
            (:func:`spectra.extract_heads.auto_task_type`): SEQ_CLS, TOKEN_CLS or QUESTION_ANS when the diffed adapter or
            the ``config.json`` of the diff's tuned model (or base) says so, else the diffed adapter's own type, else the
            base's (or tuned's) class's (``CAUSAL_LM`` for a ``…ForCausalLM``, ``SEQ_2_SEQ_LM``, ``FEATURE_EXTRACTION`` for a
            bare ``…Model``), None (PEFT's plain ``PeftModel``) for other classes (a ``…ForMaskedLM``, a ViT classifier:
            PEFT's CAUSAL_LM class fails on a model that does not generate), ``CAUSAL_LM`` when no config is left to read.
            Under the first three, PEFT trains the task head whole (:mod:`spectra.extract_heads`): it gets no rank and is
            named in ``modules_to_save``.

    Raises:
        ConfigError: not diff results, τ outside (0, 1], τ not computable from the results, a bad
            or too small budget, or no module left.

    Example:
        >>> rec = recommend("diff-out/results.json", energy=0.9)          # doctest: +SKIP
        >>> peft.LoraConfig(**rec.config)                                  # doctest: +SKIP
    """
    if energy is None and budget is None:
        raise ConfigError("give --energy τ, --budget N or both")
    # a notebook's values: 2.5 or True for a rank wrote r = 2.5 into the config, True for τ read as 1.0
    energy = None if energy is None else _number(energy, "--energy", whole=False)
    max_rank = None if max_rank is None else int(_number(max_rank, "--max-rank", whole=True))
    alpha_ratio = _number(alpha_ratio, "--alpha-ratio", whole=False)
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise ConfigError(f"--energy τ must be in (0, 1]. Got {energy} instead", hint="τ is the share of ‖ΔW‖² to hold, e.g. 0.9")
    if max_rank is not None and max_rank < 1:
        raise ConfigError(f"--max-rank must be >= 1. Got {max_rank} instead")
    if not (math.isfinite(alpha_ratio) and alpha_ratio > 0):
        raise ConfigError(f"--alpha-ratio must be a finite number > 0. Got {alpha_ratio} instead",
                          hint="lora_alpha = ratio × r; Biderman et al. use 2")
    check_task_type(task_type, "--task-type", also=("auto",))  # PEFT's LoraConfig refuses any other
    if hasattr(results, "to_dict") and not isinstance(results, dict):  # the DiffResult spectra.diff returned
        results = results.to_dict()  # type: ignore[union-attr]
    if not isinstance(results, (dict, str, os.PathLike)):
        raise ConfigError(f"results must be a results.json path, its folder, a parsed document or a DiffResult. Got "
                          f"{type(results).__name__} instead")
    where = None if isinstance(results, dict) else Path(results)
    doc = results if isinstance(results, dict) else _load(Path(results))
    if doc.get("schema") != DIFF_SCHEMA:
        raise ConfigError(f"not the results of spectra diff (schema {doc.get('schema')!r})", path=where,
                          hint="pass the results.json written by spectra diff --out DIR")
    res = DiffResult.from_dict(doc, source=where)  # every key it reads, typed: an edited file is one line, not a traceback
    if doc.get("complete") is False:  # an interrupted run: a config from part of the model would mislead
        raise ConfigError("these results are of a run that did not finish (complete: false)", path=where,
                          hint="finish it first: spectra diff BASE TUNED --out DIR --resume")
    notes: list[str] = []
    dearer_said = False  # by the budget's note that every module holds all its directions
    # rounding noise, decided as diff's findings decide it: a nonzero update that is not "analysed"
    kept_names = {m.name for m in analysed(res)}
    noise = {m.name for m in res.modules if m.fro_norm and m.name not in kept_names}
    whole: dict[str, dict] = {}  # module path -> {"shape": [out, in], "parts": [records]}
    rules = _moe_rules(doc, notes)
    left_out: dict[str, list[str]] = {}  # why -> module names left out of the config
    for m in doc.get("modules", []):
        name = m["name"]
        base = name.split(":")[0]
        why = None
        if ":e" in name.split(".")[-1]:
            why = "3-D expert stacks (PEFT reaches them through target_parameters, which a LoraConfig from here does not write)"
        elif m.get("role") == "router":
            why = "MoE routers (plain parameters in transformers >= 5, which PEFT cannot wrap)"
        elif rules is not None and base.endswith(".weight"):
            why = rules.why_dropped(base[: -len(".weight")], m.get("expert"))
        if why:
            left_out.setdefault(why, []).append(base)
            continue
        if is_embedding(m) and not embeddings:
            # changed: said, as the other matrices left out are (unchanged ones, and rounding noise, need no word)
            if m.get("fro_norm") is None:
                left_out.setdefault("embeddings and the output head whose update is not finite (fro_norm null)", []).append(base)
            elif m["fro_norm"] and name not in noise and SAVED_WHOLE in (m.get("note") or ""):  # the adapter trained it whole
                left_out.setdefault("embeddings and the output head the adapter trained whole (modules_to_save): add them to "
                                    "modules_to_save to train them so again, or pass --embeddings to adapt them", []).append(base)
            elif m["fro_norm"] and name not in noise:
                left_out.setdefault("embeddings and the output head: pass --embeddings to adapt them", []).append(base)
            continue
        if not base.endswith(".weight"):  # PEFT wraps modules: a parameter of another name is reached by none of them
            if m.get("fro_norm") and name not in noise and not base.endswith((".bias", "_bias")):
                left_out.setdefault("parameters that are no module's .weight: PEFT adapts an nn.MultiheadAttention's "
                                    "in_proj_weight when target_modules names the attention module, others only through "
                                    "target_parameters", []).append(base)
            continue
        entry = whole.setdefault(base[: -len(".weight")], {"parts": [], "out": 0, "in": int(m["shape"][1])})
        entry["parts"].append(m)
        entry["out"] += int(m["shape"][0])
    # weight matrices the diff could not measure (NaN/Inf, overflow, a shape mismatch): no rank to read, so not in the
    # config either (buffers and 1-D tensors are skipped too, and are no one's business here)
    unmeasured = [s for s in doc.get("skipped") or [] if isinstance(s, dict) and isinstance(s.get("reason"), str)
                  and (any(w in s["reason"] for w in ("NaN or Inf", "overflow")) or s["reason"].startswith(("shape mismatch", "fused rows")))]
    if unmeasured:
        notes.append(f"{len(unmeasured)} matri{'ces' if len(unmeasured) > 1 else 'x'} the diff skipped {'are' if len(unmeasured) > 1 else 'is'} "
                     f"not in the config (e.g. {unmeasured[0].get('name')}: {unmeasured[0]['reason']})")
    for why, names in left_out.items():
        uniq = sorted(set(names))
        notes.append(f"{matrices(len(uniq))} {'is' if len(uniq) == 1 else 'are'} not in the config, nor in its parameter counts "
                     f"({why}); e.g. {uniq[0]}")
    undefined = sorted(p for p, e in whole.items() if any(m.get("fro_norm") is None for m in e["parts"]))
    if undefined:  # null: an update that was not finite (diff writes NaN/Inf as null); no rank can be read off it
        notes.append(f"{len(undefined)} modules have no finite update (fro_norm null) and are left out: {', '.join(undefined[:5])}"
                     + (f" and {len(undefined) - 5} more" if len(undefined) > 5 else ""))
        for p in undefined:
            del whole[p]
    if not whole:
        raise ConfigError("the results hold no module PEFT can train with LoRA", hint="embeddings and the head need --embeddings")
    whole, unread = _as_base_names(doc, whole)
    _partial_fused(doc, whole, where)
    base_config = _base_config(doc)
    if task_type == "auto":  # a PeftModelForCausalLM on a sequence classifier fails (no prepare_inputs_for_generation)
        tuned_config, adapter = _base_config(doc, "tuned"), doc.get("adapter")
        adapter_task = adapter.get("task_type") if isinstance(adapter, dict) else None  # a diff of an adapter: its own
        arch = named_class(base_config, tuned_config)
        # as extract writes it (CAUSAL_LM only for a model that generates: on CLIPModel, ViT, BERT's MLM get_peft_model
        # raised); with no config naming a class at all, the common case (a decoder LM) rather than none
        task_type = auto_task_type(tuned_config, base_config, adapter_task) or (None if arch is not None else "CAUSAL_LM")
        if task_type is None:
            notes.append(f"task_type none (PEFT's plain PeftModel): {arch} has no PEFT task class (CAUSAL_LM needs a model "
                         "that generates); pass --task-type to choose another")
        head_like = sorted({h for t in HEAD_NAMES for h in head_modules(t, [p + ".weight" for p in whole])})
        if tuned_config is None and base_config is None and adapter is None and head_like:  # moved: CAUSAL_LM gave the head a LoRA
            raise ConfigError(f"the results hold {head_like[0]}, a classifier's task head, but neither the diff's tuned model nor "
                              "its base has a config.json to read now (moved?): whether PEFT trains it whole cannot be told",
                              hint="pass --task-type SEQ_CLS, TOKEN_CLS or QUESTION_ANS (the head trained whole), or CAUSAL_LM")
    # the task head PEFT trains whole under this task type (SEQ_CLS: classifier, score): no LoRA rank, no LoRA parameters
    heads = head_modules(task_type, [p + ".weight" for p in whole])
    if held := [p for p in whole if head_of(p, heads)]:
        for p in held:
            del whole[p]
        notes.append(f"{len(held)} matri{'ces are' if len(held) > 1 else 'x is'} trained whole, not with a LoRA ({', '.join(heads)}): "
                     f"PEFT's {task_type} models add the task head to modules_to_save; not in target_modules, nor in the parameter counts")
        if not whole:
            raise ConfigError("the results hold no module PEFT can train with LoRA besides the task head",
                              hint="--task-type none (or another task type) trains the head with a LoRA")
    if unread:  # the names stay the results' (the tuned checkpoint's): say so, a wrapper prefix would not match
        # a relative base path is the diff's working folder's: run from another one, it names nothing here
        rel = ("" if Path(unread).is_absolute()
               else " (a relative path, read from this folder: run recommend where spectra diff ran)")
        notes.append(f"the diff's base ({unread}) cannot be read now{rel}: module names are as the results store them, the tuned "
                     "checkpoint's; if it was saved through a wrapper (module., model.), rename them to the base model's")
    paths = sorted(whole)
    caps: list[list[int]] = []  # per module, per part: the most components it may take
    floored: list[tuple[str, str, int]] = []  # (module path, part, its directions above the floor): capped there
    complete: set[str] = set()  # parts whose values beyond those kept are known to lie at or below their floor
    unfloored = 0  # changed parts whose record carries no rounding floor (an older diff's results)
    estimated = 0  # parts whose τ rank the diff estimated (--approx): given their upper bound
    for path in paths:
        e = whole[path]
        per = []
        for m in e["parts"]:
            if m["fro_norm"] == 0 or m["name"] in noise:
                per.append(0)
                continue
            want, guessed = part_rank(m, float(energy)) if energy is not None else (int(np.count_nonzero(kept_values(m) > 0)), False)
            estimated += guessed
            if ends_kept(m):  # the values beyond those kept are zeros or rounding (a LoRA's r, a zero kept): no more to buy
                complete.add(m["name"])
            # components at or below the rounding floor are the stored weights' rounding: never given rank (as extract)
            above = resolved_above(m.get("singular_values") or [], m.get("rounding_floor"))
            unfloored += m.get("rounding_floor") is None
            if above is not None:
                complete.add(m["name"])
                if want > above:
                    floored.append((path, m["name"], above))
                    want = above
            # a budget buys no value at or below the Gram route's resolution either (an exactly rank-1 float64 update
            # kept its rounding, 3e-8·σ₁, above a 7e-16 storage floor: r = 9)
            per.append(want if energy is not None else min(want, buyable(m)))
        caps.append(per)
    if estimated:
        notes.append(f"{estimated} matrices have approximate ranks (spectra diff --approx): each gets the upper bound of its "
                     f"τ rank, which holds at least τ of its energy (rerun diff without --approx for the exact ranks)")
    if floored:
        _, name, above = floored[0]
        said = (f"' energy rank at τ = {energy:g} counts directions" if energy is not None else " hold singular values")
        notes.append(f"{len(floored)} matrices{said} at or below the rounding floor of their stored weights (rounding "
                     f"noise, not the update; e.g. {name}, {above} above it): they are never given rank")
    if unfloored:
        notes.append(f"the results carry no rounding floor for {unfloored} matrices (written by an older spectra diff): "
                     "components at the rounding level of their stored weights cannot be told from the update and may be "
                     "given rank; rerun spectra diff to leave them out")
    noisy = [p for p in paths if any(m["name"] in noise for m in whole[p]["parts"])]
    if noisy:
        left = [p for p, per in zip(paths, caps) if p in noisy and not any(per)]
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        count = sum(m["name"] in noise for p in noisy for m in whole[p]["parts"])
        notes.append(f"{count} matrices are at the rounding level of their storage dtype (rounding noise, not a "
                     "learned update; spectra diff warns of them) and get no rank"
                     + (f": {len(left)} modules left out of target_modules ({shown})" if left else ""))
    # a learned update below one storage step: its τ ranks count the rounding too (diff's rounding_steps caveat)
    if steps := [m.name for m in res.modules if "rounding_steps" in m.caveats and m.name not in noise]:
        notes.append(f"{len(steps)} matrices (e.g. {steps[0]}) are a learned update smaller than one step of their storage dtype, "
                     "rounded entry by entry: their top directions are resolved, but their energy ranks also count that rounding "
                     "(spread over all directions), so their ranks here are above what the update itself needs")
    cost = {p: whole[p]["out"] + whole[p]["in"] for p in paths}
    # the per-expert modules (one rank for all: PEFT's global r on transformers >= 5's fused experts), and those of
    # them PEFT fuses in pairs (w1, w3 -> gate_up_proj at rank 2r over both outputs) when it converts them
    stack = [p for p in paths if any(m.get("expert") is not None for m in whole[p]["parts"])]
    fused_leaves = rules.fused if rules is not None and rules.converted else frozenset()
    # the full update: the modules that changed (a nonzero update above the rounding level), as extract's percentage
    # budget and its totals.full_params count it; a frozen module held none (10% of all raised a budget 2× where half froze)
    full = sum(whole[p]["out"] * whole[p]["in"] for p in paths
               if any(m["fro_norm"] and m["name"] not in noise for m in whole[p]["parts"]))
    # what each module may take: its parts' ranks summed; a LoRA's fused module (one B·A) has at most its r directions
    most = {p: min(sum(c), lora_r(whole[p]["parts"]) or 10**9) for p, c in zip(paths, caps)}
    ranks = {p: min(most[p], whole[p]["out"], whole[p]["in"], max_rank or 10**9) for p in paths}
    budget_n: int | None = None
    if budget is not None:
        try:
            n = budget_n = parse_budget(budget).params(full, BUDGET_BYTES_PER_PARAM)
        except ValueError as exc:
            raise ConfigError(f"--{exc}") from None
        # the expert modules take one rank: one knapsack item whose k-th component costs every expert's out + in
        # (and the block-diagonal half of a fused pair's B)
        group = stack
        group_cost = sum(cost[p] + (whole[p]["out"] if p.rpartition(".")[2] in fused_leaves else 0) for p in group)
        solo = [p for p in paths if p not in group]
        spend = sum(ranks[p] * cost[p] for p in solo) + max((ranks[p] for p in group), default=0) * group_cost
        if energy is None and spend + min(cost.values()) <= n:
            _beyond_kept(budget, n, doc, paths, whole, where, noise | complete)  # the ranks stop where the kept values do
        waiting: list[tuple[float, str, int]] = []  # (next gain, module, its cost) of the items the budget left waiting
        n_bound = spend  # what the ranks cost before the budget binds (spend changes only where it binds)
        if spend > n:
            # one power of two for every module (the greedy compares their σ² with each other)
            e = square_scale_exponent(np.array([float(m["fro_norm"]) for p in paths for m in whole[p]["parts"]]))
            own: dict[str, np.ndarray] = {}
            for p, per in zip(paths, caps):
                # PEFT trains a fused module whole: its parts' components pool into one descending list,
                # cut at the module's rank (so that --max-rank and min(out, in) bound the sum, not each part)
                pooled = np.concatenate([np.ldexp(np.asarray(m.get("singular_values") or [], dtype=np.float64)[:c], -e)
                                         for m, c in zip(whole[p]["parts"], per)])
                own[p] = np.sort(pooled**2)[::-1][: ranks[p]]
                if any(len(m.get("singular_values") or []) < c for m, c in zip(whole[p]["parts"], per)):
                    notes.append(f"{p}: the results keep fewer singular values than its τ rank; the budget is spread over those kept")
            gains, costs = [own[p] for p in solo], [cost[p] for p in solo]
            if group:  # the k-th component of the stack: every expert's k-th σ², summed
                summed = np.zeros(max(own[p].size for p in group))
                for p in group:
                    summed[: own[p].size] += own[p]
                gains.append(summed)
                costs.append(group_cost)
            if n < min(costs):
                raise ConfigError(f"--budget {budget} is {n:,} parameters, below one component of the cheapest module ({min(costs):,})",
                                  hint="raise the budget")
            alloc = allocate(gains, costs, n, tied=len(gains) - 1 if group else None)  # every rank of the experts tried
            if sum(alloc.ranks) == sum(g.size for g in gains) and alloc.params + min(costs) <= n:
                _beyond_kept(budget, n, doc, paths, whole, where, noise | complete)
            ranks = {**dict(zip(solo, alloc.ranks)), **dict.fromkeys(group, alloc.ranks[-1] if group else 0)}
            energy_all = sum(float(np.ldexp(float(m["fro_norm"]), -e)) ** 2 for p in paths for m in whole[p]["parts"]
                             if m["name"] not in noise) or 1.0
            if pooled := [p for p in paths if len(whole[p]["parts"]) > 1 and own[p].size]:  # however many it got
                # a fused matrix's top-r energy is at least its parts' pooled top r, not equal: values and bound are low
                notes.append(f"budget {budget} ({n:,} parameters) binds: the allocation keeps at least {alloc.kept / energy_all:.3f} "
                             f"of the modules' energy: {len(pooled)} fused module(s) (e.g. {pooled[0]}) are valued by their parts' "
                             "singular values pooled, a lower bound of what the whole matrix's top components hold (PEFT adapts it "
                             "whole), so they may get too few components; spectra diff --no-split measures them whole, and "
                             "spectra extract --budget decomposes them whole")
            else:
                how = "the most any allocation of whole components keeps" if alloc.optimal else "the greedy's, not proven the most"
                notes.append(f"budget {budget} ({n:,} parameters) binds: the allocation keeps {alloc.kept / energy_all:.3f} of the "
                             f"modules' energy ({how}; fractional bound {alloc.bound / energy_all:.3f})")
            spend = alloc.params
            # the items whose next component (above the floor: the gains stop there) costs more than the budget left
            names = [*solo, *([f"{group[0]} (+{len(group) - 1} tied)" if len(group) > 1 else group[0]] if group else [])]
            waiting = sorted((float(g[r]), name, c) for g, c, r, name in zip(gains, costs, alloc.ranks, names)
                             if r < g.size and g[r] > 0 and c > n - spend)
        # what the floor left unbought, in extract's words: a module whose every component above it is taken, whose
        # next one (at or below it) the rest of the budget would pay for
        capped = {p for p, _, _ in floored}
        left = [p for p in paths if p in capped and ranks[p] == most[p] < min(whole[p]["out"], whole[p]["in"], max_rank or 10**9)
                and cost[p] <= n - spend]
        if left:  # the floor's doing, unless a component above it waits for more than is left
            wait = (waiting[-1][1], waiting[-1][2], waiting[-1][0] / energy_all, len(waiting)) if waiting else None
            over = [p for p in paths if max_rank and ranks[p] == max_rank < most[p]]
            notes.append(unspent_text(spend, n, waiting=wait, floored=(len(left), left[0]), of="the modules' energy",
                                      capped=(len(over), over[0], f"--max-rank {max_rank}") if over else None))
        elif energy is None and spend == n_bound and spend < n and all(
                ranks[p] == most[p] or ranks[p] == max_rank for p in paths) and all(
                m["name"] in complete or m["name"] in noise or len(m.get("singular_values") or []) >= min(m["shape"])
                for p in paths for m in whole[p]["parts"]):
            # the budget did not bind: every module holds every direction its (complete) spectrum has, or --max-rank's
            capped = [p for p in paths if ranks[p] < most[p]]
            dearer = [p for p in paths if ranks[p] * cost[p] > whole[p]["out"] * whole[p]["in"]]
            notes.append(all_held_text(spend, n, (len(dearer), dearer[0]) if dearer else None,
                                       (len(capped), capped[0], f"--max-rank {max_rank}") if capped else None))
            dearer_said = bool(dearer) and not capped
    adapted = {p: r for p, r in ranks.items() if r > 0}
    if budget_n is None and (fused := [p for p in adapted if len(whole[p]["parts"]) > 1]):
        # the parts' ranks add up to a bound of the whole matrix's (GPT-2's c_attn: 66 where the whole needs 35)
        lora = " (or the adapter's r, where smaller: one B·A has no more directions)" if any(
            lora_r(whole[p]["parts"]) for p in fused) else ""
        notes.append(f"{len(fused)} fused module(s) (e.g. {fused[0]}) get the sum of their parts' ranks{lora}, an upper bound of "
                     "what the whole matrix needs: spectra diff --no-split measures them whole, and recommend on that gives "
                     "their own rank")
    experts = [p for p in stack if p in adapted]
    tied = max((adapted[p] for p in experts), default=None)
    extra = 0  # parameters PEFT builds beyond r·(out + in) per module (a fused expert pair's block-diagonal B)
    if experts and rules is not None and rules.converted:
        # PEFT converts per-expert LoRAs to target_parameters on the fused experts: every expert of every stack at
        # the global r, and a fused pair (w1, w3 -> gate_up_proj) at rank 2r over both outputs; counted as built
        # PEFT refuses one of a fused pair without the other (w1 without w3: "Cannot convert …"): the other is adapted too
        partners = {q: p for p in stack if (leaf := p.rpartition(".")[2]) in fused_leaves
                    for q in (p[: -len(leaf)] + other for other in sorted(fused_leaves - {leaf})) if q not in whole}
        for q, p in partners.items():
            whole[q], cost[q] = {"parts": [], "out": whole[p]["out"], "in": whole[p]["in"]}, cost[p]
        stack = [*stack, *partners]
        added = [p for p in stack if p not in adapted]
        adapted.update(dict.fromkeys(stack, tied))
        experts = stack
        extra = sum(tied * whole[p]["out"] for p in stack if p.rpartition(".")[2] in fused_leaves)
        # and the experts of those layers the diff did not measure (--include/--exclude): PEFT stacks them all
        count = next((v for k in EXPERT_COUNT_KEYS if isinstance(v := (base_config or {}).get(k), int)), 0)
        groups = Counter(rules.expert_target(p) for p in stack)  # "<experts>.<name>" -> experts measured
        one = {rules.expert_target(p): p for p in stack}
        unmeasured = sum(max(count - n, 0) * tied * (cost[one[g]] + whole[one[g]]["out"] * (one[g].rpartition(".")[2] in fused_leaves))
                         for g, n in groups.items())
        extra += unmeasured
        notes.append(f"PEFT builds its LoRA on the fused experts ({rules.source}): every expert of each stack at r = {tied}"
                     + (f" ({len(added)} more than the ranks pick, e.g. {added[0]})" if added else "")
                     + (f", {len(partners)} of them fused with a measured one (one alone PEFT refuses: {next(iter(partners))}…)" if partners else "")
                     + (f", the experts the diff did not measure in those layers too (+{unmeasured:,} parameters)" if unmeasured else "")
                     + (f", and {' and '.join(sorted(rules.fused))} fused at rank {tied * len(rules.fused)} over their "
                        f"stacked outputs (+{extra:,} parameters)" if extra else "")
                     + "; the parameter count is of the LoRA it builds")
    if experts and any(adapted[p] != tied for p in experts):
        # transformers >= 5 fuses per-expert modules on load; PEFT converts their LoRA at the global r only
        # (rank_pattern entries of single experts are ignored): every expert takes one rank, the largest
        for p in experts:
            adapted[p] = tied
        notes.append(f"the {len(experts)} per-expert modules take one rank, r = {tied} (the largest of theirs): PEFT loads per-expert LoRAs "
                     "into transformers >= 5's fused experts at the global r only")
    if not adapted:
        if noise:
            raise ConfigError("every updated matrix is at the rounding level of its storage dtype (rounding noise, not a "
                              "learned update): there is nothing to adapt", path=where,
                              hint="spectra diff's warning lists them; compare checkpoints that differ by more than rounding")
        raise ConfigError("every recommended rank is 0 (the updates are zero)")
    counts = Counter(adapted.values())
    r0 = tied if experts else max(counts, key=lambda r: (counts[r], r))

    def alpha(r: int) -> float:
        return alpha_ratio * (math.sqrt(r) if rslora else r)

    # the names transformers >= 5 loads the modules under (GPT-NeoX's embed_out is lm_head, LLaVA's layers move):
    # PEFT matches those, so the LoraConfig names them so
    # an adapter diff's skipped tensors carry PEFT's names (base_model.model.lm_head.base_layer.weight): as the model's
    # module, or the module a target names would be "excluded" (exclude_modules listed the targets themselves)
    skipped = [s["name"].removeprefix("base_model.model.").replace(".base_layer.", ".").partition(".lora_")[0].removesuffix(".weight")
               for s in doc.get("skipped") or [] if isinstance(s, dict) and isinstance(s.get("name"), str)]
    loaded, how, _, split = adapter_renames(base_config, paths + skipped + heads)
    refuse_split(split, adapted, "the LoraConfig", where, "spectra diff")
    if used := {k: v for k, v in loaded.items() if k in adapted}:  # of the modules the config adapts
        notes.append(renames_text(used, how, "the LoraConfig"))
    named = {loaded.get(p, p): r for p, r in adapted.items()}
    every = [loaded.get(p, p) for p in paths + skipped + heads]  # a short target must not name a head module either
    pattern = {pattern_key(p): named[p] for p in rank_pattern_keys(named, r0)}  # PEFT's first match wins
    if not all(math.isfinite(alpha(r)) for r in (r0, *pattern.values())):  # JSON has no Infinity; PEFT would get inf
        raise ConfigError(f"--alpha-ratio {alpha_ratio:g} × r overflows: lora_alpha would be infinite",
                          hint="lora_alpha = ratio × r; Biderman et al. use 2")
    # PEFT scales B·A by lora_alpha / r in the weights' dtype: a scale float32 flushes to 0 (1e-320) or rounds to
    # inf leaves an adapter that does nothing or overflows, however the config reads
    tiny, top = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
    if bad := [s for s in (alpha(r) / r for r in (r0, *pattern.values())) if not normal_float32(s)]:
        raise ConfigError(f"--alpha-ratio {alpha_ratio:g} gives a LoRA scale lora_alpha / r of {bad[0]:.3g}, outside the normal float32 "
                          f"numbers ({tiny:.3g} to {top:.3g}): the adapter would {'do nothing' if bad[0] < tiny else 'overflow'}",
                          hint="lora_alpha = ratio × r; Biderman et al. use 2")
    # PEFT adapts every module whose name ends with a target: a short one (q_proj) would reach those the diff did not measure
    selection = doc.get("config") or {}
    partial = any(selection.get(k) for k in ("include", "exclude", "layers"))
    # experts PEFT converts are never named with their index (PEFT 0.22 drops them so)
    targets = sorted({rules.expert_target(p) if rules else p for p in named}) if partial else target_modules(list(named), every, rules)
    if partial:
        notes.append("the diff measured part of the model (--include/--exclude/--layers): target_modules names each "
                     "measured module in full, so that PEFT adapts only those"
                     + (f"; but PEFT before 0.22 ({rules.source}) reaches the fused experts by their projection's name "
                        "alone, in every layer, and builds LoRAs on those the diff left out too (not in the counts)"
                        if experts and rules is not None and rules.retargeted else ""))
    excluded = exclude_modules(list(named), every, targets)
    old = rules.before_0_22() if rules is not None else None  # a config made by PEFT 0.22's rules, trained with an earlier PEFT
    if old is not rules and (lost := [p for p in adapted if old.why_dropped(p, 0 if p in stack else None)]):
        notes.append(f"made by the rules of {rules.source}: PEFT before 0.22 leaves {len(lost)} of its modules unadapted (e.g. {lost[0]}, "
                     f"{'an expert it does not convert' if lost[0] in stack else 'retargeted to the experts'}): train it with PEFT >= 0.22")
    config = {"peft_type": "LORA", "task_type": task_type, "r": r0, "lora_alpha": alpha(r0),
              "target_modules": targets, **({"exclude_modules": excluded} if excluded else {}), "rank_pattern": pattern,
              "alpha_pattern": {p: alpha(r) for p, r in pattern.items()}, "use_rslora": bool(rslora)}
    if heads:
        config["modules_to_save"] = sorted(loaded.get(h, h) for h in heads)
    if ArchInfo.from_config(base_config).conv1d and any(p.rsplit(".", 1)[-1] in CONV1D_LEAVES for p in named):
        config["fan_in_fan_out"] = True  # GPT-2's Conv1D stores (in, out): without it PEFT warns and sets it itself
    params = sum(r * cost[p] for p, r in adapted.items()) + extra
    dearer = [p for p, r in adapted.items() if r * cost[p] > whole[p]["out"] * whole[p]["in"]]
    if dearer and not dearer_said:
        notes.append(dearer_text(len(dearer), dearer[0]))
    if budget_n is not None and params > budget_n:  # the experts' one rank (and PEFT's fused pairs) cost more than chosen
        notes.append(f"the config's {params:,} LoRA parameters exceed the budget {budget} ({budget_n:,}): the expert modules' "
                     "one rank per stack, as PEFT builds them, costs more than the allocation spent on them")
    return Recommendation(config, adapted, params, full, notes)


def _number(value: object, name: str, *, whole: bool) -> float:
    """``value`` as a plain float: a real number (int, float, Fraction, Decimal; a numpy scalar or 0-d array or
    tensor of an integer or float dtype), refused when it is anything else (a bool, a string, a complex, a
    1-element array, a timedelta), beyond a float's range, or, with ``whole``, not a whole one."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None:  # numpy and torch: 0-d, integer or floating point (not bool, complex, dates)
        real = getattr(value, "ndim", 1) == 0 and (getattr(dtype, "kind", None) in ("i", "u", "f") if isinstance(dtype, np.dtype)
                                                   else not (dtype.is_complex or dtype == torch.bool))
    else:
        real = isinstance(value, (numbers.Real, Decimal)) and not isinstance(value, bool)
    try:
        f = float(value) if real else None  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        f = None
    if f is None or (whole and not (math.isfinite(f) and f.is_integer())):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "…"
        raise ConfigError(f"{name} must be {'a whole number' if whole else 'a number'}. Got {shown} instead")
    return f


def _input_path(doc: dict, side: str) -> str | None:
    """The diff's ``side`` ("base", "tuned") as a path to read now: where the diff read it (``inputs`` in the results:
    absolute), not the label as typed, relative to this process's folder (another project's ``base/`` was read there);
    the label for results of older versions; None when absent."""
    where = doc.get("inputs")
    p = where.get(side) if isinstance(where, dict) else None
    p = p if isinstance(p, str) and p else doc.get(side)
    return p if isinstance(p, str) and p else None


def _as_base_names(doc: dict, whole: dict[str, dict]) -> tuple[dict[str, dict], str | None]:
    """``(whole, unread)``: ``whole`` keyed by the diff's base checkpoint's module paths where they differ
    from the results' (a tuned copy saved through a wrapper, DDP's ``module.`` or a LightningModule's
    ``model.``: the config is applied to the base model, whose names those are); as is when a name is not
    matched one to one, or when the base cannot be read (``unread`` then names it). A base name that only adds
    leading wrapper components to the results' (a LightningModule's state dict saved bare, ``model.model.…``,
    against a plain tuned model) is not taken: PEFT matches names by suffix, and the wrapper is not in the
    model it loads."""
    base = _input_path(doc, "base")
    if base is None:
        return whole, None
    if (header := _header(doc, "base")) is None:
        return whole, base
    by_key = unique_pairing_keys(list(header))
    renamed = {p: (by_key.get(pairing_key(p + ".weight")) or p + ".weight")[: -len(".weight")] for p in whole}
    renamed = {p: p if b.endswith("." + p) else b for p, b in renamed.items()}
    if len(set(renamed.values())) != len(renamed):  # two results paths on one base module: leave them
        return whole, None
    return {renamed[p]: e for p, e in whole.items()}, None


def _partial_fused(doc: dict, whole: dict[str, dict], where: Path | None) -> None:
    """Refuse a fused matrix (qkv_proj, c_attn, gate_up_proj) of which the diff measured only some parts (an --include
    or --exclude on part names, ``…qkv_proj.weight:q``): PEFT adapts the whole matrix, whose rank and LoRA parameters
    those parts do not give (a budget was spent at the q part's price). Checked against the stored matrix's size in the
    tuned checkpoint (the results' names are its names), else the base; with neither readable, the parts must be a
    whole set (q, k, v; gate, up; k, v)."""
    split = {p: e for p, e in whole.items() if any(":" in m["name"] for m in e["parts"])}
    selection = doc.get("config") or {}
    if not split or not (selection.get("include") or selection.get("exclude")):
        return
    headers = [_header(doc, side) for side in ("tuned", "base")]
    for path, e in split.items():
        names = (e["parts"][0]["name"].partition(":")[0], path + ".weight")  # the tuned name, the base's
        sizes = [math.prod(h[n].shape) for h, n in zip(headers, names) if h is not None and n in h]
        measured = [m["name"].rpartition(":")[2] for m in e["parts"]]
        whole_set = (sizes[0] == e["out"] * e["in"]) if sizes else set(measured) in ({"q", "k", "v"}, {"gate", "up"}, {"k", "v"})
        if whole_set:
            continue
        raise ConfigError(f"the diff measured only part of the fused matrix {path} ({', '.join(measured)}): PEFT adapts the whole "
                          "matrix, whose rank and LoRA parameters those parts do not give", path=where,
                          hint="rerun spectra diff with every part of it selected (an --include on the matrix's name), or with --no-split")


def _header(doc: dict, side: str) -> dict[str, Any] | None:
    """The tensors of the diff's ``side`` checkpoint (its header only), or None when it cannot be read now."""
    where = _input_path(doc, side)
    try:
        return dict(open_checkpoint(where).tensors) if where else None
    except (OSError, ValueError, SpectraError):
        return None


def _base_config(doc: dict, side: str = "base") -> dict | None:
    """The ``config.json`` beside the diff's base (``side`` "tuned": its tuned model; a folder, or a file in one),
    when it is still there."""
    base = _input_path(doc, side)
    if base is None:
        return None
    try:
        # resolved: the config's own path is resolved when checked against its folder, so a relative folder
        # (a diff run as `spectra diff base/ tuned/`) put every config.json "outside" it, and the renames went unused
        folder = (Path(base) if Path(base).is_dir() else Path(base).parent).resolve()
        return read_config(folder, (folder,))  # as open_checkpoint reads it (a link out of the folder refused)
    except (OSError, ValueError, SpectraError):  # unreadable: the stored names, as without it
        return None


def _beyond_kept(budget: str, n: int, doc: dict, paths: list[str], whole: dict[str, dict], where: Path | None,
                 noise: set[str]) -> None:
    """Raise when a budget that could buy more components meets matrices whose spectra the results
    keep only in part (``spectra diff --top-k``): the rest of each spectrum is unknown, so spending
    less than the budget would be a guess. Nothing when every spectrum is kept whole. ``noise``: matrices
    whose spectrum beyond the kept values does not matter (rounding noise takes no components; a kept value at
    or below the rounding floor puts every value after it there too)."""
    short = [p for p in paths for m in whole[p]["parts"]
             if len(m.get("singular_values") or []) < min(int(x) for x in m["shape"]) and m["fro_norm"] > 0
             and m["name"] not in noise]
    if short:
        raise ConfigError(f"--budget {budget} ({n:,} parameters) needs more of the spectra than the results keep "
                          f"(the top {(doc.get('config') or {}).get('top_k', '?')} singular values of each matrix, "
                          f"e.g. {short[0]})", path=where, hint="rerun spectra diff with a larger --top-k, or give a smaller budget")


def _moe_rules(doc: dict, notes: list[str]) -> PeftMoeRules | None:
    """What PEFT drops (or refuses) on the diff's base model (:mod:`spectra.peft_moe`), read off the base's
    ``config.json`` when it is still where the diff found it; None for a model without experts, or a Mamba's names."""
    mods = doc.get("modules", [])
    moe = any(isinstance(m, dict) and (m.get("expert") is not None or m.get("role") == "router") for m in mods)
    mt = (_base_config(doc) or {}).get("model_type")  # (read as open_checkpoint reads it: a link out of the folder refused)
    model_type = mt if isinstance(mt, str) else None
    if not moe:
        return peft_rules(model_type, False)
    if model_type is None:
        notes.append("an MoE model whose base config.json was not found (where the diff read the base): whether PEFT "
                     "loads LoRAs on its experts and on MLPs named like them was not checked")
        return None
    return peft_moe_rules(model_type)


def _load(path: Path) -> dict:
    if path.is_dir():
        path = path / "results.json"
    doc = load_json(path, what="diff results", max_bytes=RESULTS_MAX_BYTES)
    if not isinstance(doc, dict):
        raise ConfigError("not a JSON object", path=path)
    return doc


__all__ = ["BUDGET_BYTES_PER_PARAM", "Recommendation", "recommend"]


def is_recommended_config(path: Path) -> bool:
    """Whether the file at ``path`` is a LoRA config as :func:`recommend` writes it (a JSON object with
    ``"peft_type": "LORA"`` and ``r``, under 16 MiB): what ``spectra recommend -o`` may replace."""
    try:
        if path.stat().st_size > 16 << 20:
            return False
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("peft_type") == "LORA" and "r" in doc
