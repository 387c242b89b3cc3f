"""``spectra extract``: the PEFT LoRA adapter that keeps the most of an update for a rank, energy or
parameter budget, from a full fine-tune or from another adapter, with what it kept and what it lost.

The run streams, like ``spectra diff``: reader threads form ΔW (float32, oriented ``(out, in)``) for
the next tensor pairs while the main thread decomposes the current batch of equally shaped matrices
(:mod:`spectra.stream`); memory is bounded by the pairs in flight, one batch and one matrix's Gram
eigendecomposition, whatever the model. Each module's spectrum is journaled (``extract.jsonl``) and
the top singular triplets that can still be chosen are written to a scratch shard in the output
folder as soon as they are computed, so ``resume`` finishes an interrupted run.

Ranks (:mod:`spectra.extract_plan`, :mod:`spectra.lowrank`): ``--rank`` and ``--energy`` decide each
module alone; ``--budget`` needs every module's spectrum first. The default ``one-pass`` strategy
keeps, per module, the components whose energy per parameter is not already below the cut-off of the
modules seen before (they can still be chosen whatever comes later), so one read and one
eigendecomposition per matrix suffice; ``two-pass`` computes all singular values first (the
engine's exact batched path), allocates, and reads again for the vectors of the chosen components.
``bench/extract.py`` measures both.

Factors: ``B = U_r·diag(√σ)``, ``A = diag(√σ)·V_rᵀ`` with ``lora_alpha = r`` per module (scale 1;
rsLoRA ``alpha = √r``) from the top-r singular vectors (float64 Gram eigendecomposition; under
``--rank`` on the CPU the subspace from float32 and the values and factors on it in float64,
:func:`spectra.lowrank.refined_triplets`, matrices streamed through the compute threads; the
randomized SVD with its certified residual above ``approx_above``; for an adapter, the factored SVD
of ``s·B·A``, never densified; DoRA from its dense update), stored in the tuned checkpoint's dtype. The output
folder's checks and the inputs' norms live in :mod:`spectra.extract_io`."""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from spectra._version import __version__
from spectra.adapter_diff import adapter_updates, non_finite_factor
from spectra.allocation import uniform_rank
from spectra.config import DiffConfig, config_of, public_entry
from spectra.delta import Prepared
from spectra.engine import batch_singular_values
from spectra.errors import ConfigError, IdenticalCheckpointsError, SpectraError
from spectra.extract_eval import EvalData
from spectra.extract_heads import auto_task_type, head_modules, head_of, head_records
from spectra.extract_io import (
    JOURNAL,
    OUTPUT_FILES,
    SCRATCH,
    ExtractEvent,
    ExtractRun,
    adapter_dtype,
    left_out_records,
    lora_fro,
    out_dtype,
    prepare_out,
    refuse_an_input_folder,
    refuse_unwritten_layouts,
    tensor_fro,
)
from spectra.extract_plan import (
    RESULT_FIELDS,
    STACK_NOT_WRITTEN,
    ExtractConfig,
    Target,
    alias_notes,
    extractable,
    final_ranks,
    module_of,
    one_lora_per_tied_weight,
    one_side_only,
    plan_ranks,
    settle_budget,
    stack_flip,
    target_of,
    why_not_target,
)
from spectra.extract_results import (
    ExtractResult,
    build_result,
    no_target_error,
    note_storage,
    nothing_extracted_error,
    pair_norms,
    root_sigma1,
    tied_embedding_warning,
)
from spectra.extract_vectors import LORA_BIAS_REASON, one_d_changes
from spectra.extract_write import adapter_files, write_extracted
from spectra.io.adapter import Adapter, is_adapter
from spectra.io.checkpoint import FLOAT_DTYPES, Checkpoint, open_checkpoint, read_notes
from spectra.io.paths import checkpoint_location
from spectra.io.peft_writer import write_adapter
from spectra.journal import RecordJournal, run_identity
from spectra.linalg import all_finite, check_device_available, resolve_device
from spectra.load_names import adapter_renames, refuse_split, renames_text
from spectra.lowrank import (
    GramEig,
    Triplets,
    eig_factors,
    energy_rank_top,
    factored_triplets,
    gram_eig,
    gram_top,
    randomized_triplets,
    refined_triplets,
    spectrum_total,
)
from spectra.metrics import square_scale_exponent
from spectra.naming import layer_of
from spectra.pairing import NOT_WEIGHTS, PAIRING_NOTE_PREFIX, pair_checkpoints
from spectra.param_experts import open_adapter_on
from spectra.peft_moe import PeftMoeRules, peft_rules
from spectra.plots.base import preload as preload_plots
from spectra.selection import Task, plan_units, selector
from spectra.stored_bytes import base_lookup
from spectra.stream import RunSettings, batches, largest_first, prefetch, run_settings
from spectra.threads import map_one_blas_thread, zip_results


# ---- inputs ---------------------------------------------------------------------------------------
@dataclass
class ExtractSource:
    """What is extracted: the targets, and for a full checkpoint the tensor pairs to stream; for an
    adapter its modules. Plus what is not extracted, for the report."""

    kind: str  # "full" | "lora"
    base: Checkpoint
    targets: list[Target]
    tuned: Checkpoint | None = None
    tasks: list[Task] | None = None
    adapter: Adapter | None = None
    mods: dict[int, Any] | None = None  # target order -> LoraModule
    left_out: list[tuple[Any, str]] | None = None  # (Task or (name, shape, fro, base_fro), reason)
    one_d: list[tuple[str, str]] | None = None  # (tuned name, base name) of paired 1-D tensors
    unmatched: dict[str, list[str]] | None = None
    label: str = ""
    renames: dict[str, str] = field(default_factory=dict)  # module path as stored -> as transformers loads it
    notes: list[str] = field(default_factory=list)  # how the targets were chosen, for the warnings
    base_prefix: str = ""  # a wrapper prefix of the base names the modules drop (they take the tuned names then)
    task_type: str | None = None  # the adapter's PEFT task_type
    saved: list[dict] = field(default_factory=list)  # the task head's not_lora records (extract_heads), held whole
    outside_selection: int = 0  # paired matrices --include/--exclude/--layers left out (not read: no energy to count)
    experts: PeftMoeRules | None = None  # what PEFT does with per-expert LoRAs on load (how target_modules names them)


#: Seconds the adapter's writing waits for :func:`spectra.load_names.load_renames` past the decompositions.
RENAME_WAIT_S = 120.0


def _open_source(base: Checkpoint, tuned: str | Checkpoint, config: ExtractConfig) -> ExtractSource:
    if not isinstance(tuned, Checkpoint) and is_adapter(tuned):
        return _adapter_source(base, open_adapter_on(tuned, base, keep=selector(config.include, config.exclude, config.layers),
                                                      merged="extract from the merged model against the original base"), config)
    pairing = pair_checkpoints(base, tuned_ckpt := tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned), tied_head=True)
    tasks = plan_units(pairing.pairs, include=config.include, exclude=config.exclude, layers=config.layers, split_fused=False,
                       skipped=pairing.skipped)
    targets, kept, left = [], [], []
    # an MoE: what PEFT would drop on load (per-expert LoRAs it cannot convert, dense MLPs named like experts); a Mamba's refusals
    model_type = base.arch.model_type or tuned_ckpt.arch.model_type
    rules = peft_rules(model_type, any(p.tuned.expert is not None or len(p.tuned_info.shape) == 3 for p in pairing.pairs))
    # the wrapper prefix of the tuned names (DDP's module., a LightningModule's model.), from a module both name
    prefix = next((p.tuned.name[: -len(p.base.name)] for p in pairing.pairs
                   if p.base.role == p.tuned.role and p.tuned.name.endswith("." + p.base.name)), "")
    # and of the base names, when the base has no config.json to be loaded by (a LightningModule's state dict
    # saved bare, model.model.layers…, beside a plain tuned model): the model a user loads has the tuned names,
    # and an adapter named model.model.… loads onto it as a silent no-op
    base_prefix = "" if base.config is not None else next(
        (p.base.name[: -len(p.tuned.name)] for p in pairing.pairs
         if p.base.role == p.tuned.role and p.base.name.endswith("." + p.tuned.name)), "")
    model_config = base.config or (tuned_ckpt.config if base_prefix else None)
    # auto: a classifier's task type from the tuned model's config too (its base may be the pretrained LM)
    task_type = auto_task_type(tuned_ckpt.config, model_config) if config.task_type == "auto" else config.task_type
    # a task head PEFT stores whole (SEQ_CLS: classifier, score): never a LoRA target, listed in not_lora instead
    heads = head_modules(task_type, [n.removeprefix(base_prefix) for n in base.tensors] + [n.removeprefix(prefix) for n in tuned_ckpt.tensors])
    for task in tasks:
        spec = task.pair.tuned
        # named as the base names it: the adapter loads onto the base model (a tuned `module.` prefix must not reach it)
        module = module_of(task.pair, prefix).removeprefix(base_prefix)
        if head_of(module, heads):
            continue
        why = why_not_target(spec, tuple(task.pair.tuned_info.shape), config, rows_differ=task.pair.rows is not None,
                             rules=rules)
        if why:
            left.append((task, why))
            continue
        note = "; ".join(x for x in (spec.note, task.pair.note) if x)
        if len(shape := task.pair.tuned_info.shape) == 3:  # each expert a target, the stack one target_parameters LoRA
            if len(task.units) != shape[0]:  # PEFT's LoRA of a stack adapts every expert: the rest would be zeros, paid for
                raise ConfigError(f"--include/--exclude select {len(task.units)} of the {shape[0]} experts of {spec.name}: PEFT's "
                                  "target_parameters LoRA adapts every expert of a stack", hint="select the stack whole, or none of it")
            param = task.pair.base.name.removeprefix(base_prefix)
            flip = stack_flip(spec, base.arch.model_type or tuned_ckpt.arch.model_type, tuple(shape))
            targets += [target_of(u.order, spec, param, u.shape, base_name=task.pair.base.name, dtype=task.pair.tuned_info.dtype,
                                  note=note, unit=(u.name, int(u.expert or 0), int(shape[0]), flip)) for u in task.units]
            kept.append(task)
            continue
        unit = task.units[0]
        targets.append(target_of(unit.order, spec, module, unit.shape, base_name=task.pair.base.name, dtype=task.pair.tuned_info.dtype,
                                 note=note, rules=rules))
        kept.append(task)
    # how the two paired (a layout that left every layer matrix out…), then the tied weights' note
    notes = [n for n in pairing.notes if n.startswith(PAIRING_NOTE_PREFIX)] + one_lora_per_tied_weight(targets, kept, left, base, tuned_ckpt)
    notes += alias_notes(pairing) + one_side_only(pairing, base, tuned_ckpt, selector(config.include, config.exclude, config.layers),
                           lambda side, n: head_of(n.removeprefix(base_prefix if side == "base" else prefix), heads) is not None)
    one_d = []
    base_of = base_lookup(base, tuned_ckpt)  # built once: per skipped tensor it was quadratic in the count
    for s in pairing.skipped:
        info = tuned_ckpt.tensors.get(s.name)
        if head_of(s.name.removeprefix(prefix), heads):  # the head's records say what happened to it
            continue
        mismatched = info is not None and len(info.shape) >= 2 and s.reason.startswith("shape mismatch")
        floating = info is not None and info.dtype in FLOAT_DTYPES
        one_dim = floating and (len(info.shape) == 1 or s.reason.startswith("per-expert bias"))  # an MoE's (E, out) bias: a bias
        # 0-D, a conv's 4-D…, and a Mamba's A_log (2-D, no linear map: the pairing skipped it)
        other = floating and (len(info.shape) not in (1, 2) or s.reason == NOT_WEIGHTS["A_log"]) and not mismatched
        if not (mismatched or one_dim or other):
            continue
        bn = base_of(s.name)
        if mismatched:  # a matrix whose base has another shape: not silently dropped, listed with the reason
            left.append(((s.name, tuple(info.shape), None, tensor_fro(base, bn)), s.reason))
        elif other and bn is not None and tuple(base.tensors[bn].shape) == tuple(info.shape):
            # listed (as spectra diff lists it) when fine-tuning changed it: LoRA cannot hold it
            fro, base_fro = pair_norms(base, bn, tuned_ckpt, s.name, None)
            if fro != 0.0:
                left.append(((s.name, tuple(info.shape), fro, base_fro), f"{s.reason}: LoRA adapts weight matrices only"))
        elif one_dim and bn is not None:
            one_d.append((s.name, bn))
    return ExtractSource("full", base, sorted(targets, key=lambda t: t.order), tuned=tuned_ckpt, tasks=kept, left_out=left,
                   outside_selection=len({p.tuned.name for p in pairing.pairs} - {t.pair.tuned.name for t in tasks}), one_d=one_d,
                   unmatched={"base_only": pairing.base_only, "tuned_only": pairing.tuned_only},
                   label=tuned_ckpt.label, notes=notes, base_prefix=base_prefix, task_type=task_type, experts=rules,
                   saved=head_records(task_type, heads, base, tuned_ckpt, prefix=prefix, base_prefix=base_prefix) if heads else [])


def _adapter_source(base: Checkpoint, adapter: Adapter, config: ExtractConfig) -> ExtractSource:
    """Targets of an adapter being resized: each of its LoRA modules (whole, as PEFT wrapped it)."""
    keep = selector(config.include, config.exclude, config.layers)
    targets, mods, left = [], {}, []
    # auto: the adapter's own task type (a resized adapter loads as the original did), else the base's class
    task_type = auto_task_type(None, base.config, adapter.config.task_type) if config.task_type == "auto" else config.task_type
    heads = head_modules(task_type, [*base.tensors, *adapter.full, *(m.weight_name for m in adapter.modules.values())])
    refuse_unwritten_layouts(adapter)
    updates = adapter_updates(adapter, base)
    # an MoE: what PEFT drops on load, as for a full model (per-expert LoRAs it does not convert to its fused experts)
    rules = peft_rules(base.arch.model_type, any(spec.expert is not None for _, spec, _ in updates))
    for order, (mod, spec, base_name) in enumerate(updates):
        if not keep(spec.name, spec.layer) or head_of(mod.module, heads):
            continue
        why = ("embedding: pass --embeddings to keep it (as PEFT's embedding LoRA)" if mod.embedding and not config.embeddings
               else "output head: pass --embeddings to extract it (as PEFT's LoRA)" if spec.role == "head" and not config.embeddings
               else rules.why_dropped(spec.name.removesuffix(".weight"), spec.expert) if rules is not None else None)
        if why:
            left.append(((spec.name, tuple(mod.shape), lora_fro(mod), tensor_fro(base, base_name)), why))
            continue
        t = target_of(order, spec, mod.module, tuple(mod.shape), base_name=base_name, dtype="float32", note=spec.note, rules=rules)
        # s·B·A holds at most r components (a DoRA update is dense)
        targets.append(Target(**{**asdict(t), "embedding": mod.embedding, "dtype": adapter_dtype(adapter),
                                 "components": mod.r if mod.magnitude is None else 0}))
        mods[order] = mod
    for s in adapter.skipped:  # (a lora_B.bias is a bias: one_d_changes accounts for it)
        if not s.reason.startswith(LORA_BIAS_REASON):
            left.append(((s.name, (), None, None), s.reason))
    stacks: dict[str, float] = {}  # a 3-D base tensor -> Σ over its experts' LoRAs of ‖s·B·A‖²_F
    specs = base.specs if adapter.stacked else {}
    for m in adapter.stacked.values():
        if keep(m.weight_name, specs[m.weight_name].layer):
            stacks[m.weight_name] = stacks.get(m.weight_name, 0.0) + (lora_fro(m) or 0.0) ** 2
    for stack, sq in stacks.items():
        left.append(((stack, tuple(base.tensors[stack].shape), math.sqrt(sq), tensor_fro(base, stack)), STACK_NOT_WRITTEN))
    return ExtractSource("dora" if adapter.config.use_dora else "lora", base, targets, adapter=adapter, mods=mods, left_out=left,
                   one_d=[], unmatched={"base_only": [], "tuned_only": []}, label=str(adapter.path), task_type=task_type,
                   notes=read_notes((base, adapter)), experts=rules,
                   saved=head_records(task_type, heads, base, None, adapter=adapter) if heads else [])


# ---- passes -----------------------------------------------------------------------------------------
def _settings(config: ExtractConfig, device: torch.device) -> RunSettings:
    """Batch memory, read-ahead and readers, as ``spectra diff`` resolves them."""
    return run_settings(DiffConfig(device=config.device, max_batch_bytes=config.max_batch_bytes, prefetch=config.prefetch), device)


def _stream(src: ExtractSource, tasks: list[Task], config: ExtractConfig, device: torch.device) -> Iterator[list[Prepared]]:
    settings = _settings(config, device)
    # each ΔW's rounding floor: its stored weights' rounding is no part of the update (budget and energy stop there)
    prepared = prefetch(tasks, src.base, src.tuned, settings.depth, settings.workers, device, False, settings.ahead_bytes, floors=True)
    try:
        # the CPU decomposes as many matrices at once as it has threads (one BLAS thread each), so a batch
        # keeps only those and the pairs read ahead in memory
        yield from batches(prepared, [u.shape for t in tasks for u in t.units],
                           32 if device.type == "cuda" else torch.get_num_threads(), settings.batch_bytes)
    finally:
        prepared.close()


def _approx(config: ExtractConfig, t: Target) -> bool:
    return config.approx_above is not None and t.p > config.approx_above


def _randomized(run: ExtractRun, i: int, delta: torch.Tensor, floor: float = 0.0) -> None:
    """Top triplets of a matrix above ``approx_above`` (both strategies keep its factors at once)."""
    t, config = run.targets[i], run.config
    k = min(t.p, max(run.plan.caps[i], run.plan.uniform_bound))
    if config.mode == "energy":  # grow the sketch until the energy rank is inside it
        k = min(k, 64)
        while True:
            tr = randomized_triplets(delta, k, seed=config.seed)
            if energy_rank_top(tr.S, tr.total, config.energy, t.p) is not None or k >= min(t.p, run.plan.caps[i]):
                break
            k = min(t.p, run.plan.caps[i], 2 * k)
    else:
        tr = randomized_triplets(delta, k, seed=config.seed)
    run.add_spectrum(i, tr.S, tr.total, tr.method, residual=tr.residual, base_fro=None, exp=tr.exp, floor=floor)
    run.add_factors(i, tr.B, tr.A)


def _dense_pass(src: ExtractSource, run: ExtractRun, config: ExtractConfig, device: torch.device, *, stage: str,
                want: dict[int, int] | None = None) -> None:
    """Stream the pairs of the targets still to do. ``want`` None: the first pass (spectra; with the
    one-pass strategy also the factors); else the second: target -> components to factor."""
    two = config.resolved_strategy == "two-pass"
    if want is None:
        todo = {i for i in range(len(run.targets)) if i not in run.spectra or (not two and i not in run.factors)}
    else:
        todo = {i for i, k in want.items() if not run.has_factors(i, k)}
    tasks = largest_first([t for t in src.tasks if any(run.index[u.order] in todo for u in t.units)])  # a stack: its experts
    if want is None and not two and config.mode == "rank" and config.precision == "mixed" and device.type == "cpu":
        _refined_pass(src, run, config, device, tasks, todo)
        return
    for batch in _stream(src, tasks, config, device):
        cutoff = run.cutoff() if want is None and not two else 0.0
        exact = []
        for item in batch:
            i = run.index[item.unit.order]
            if i not in todo:  # an expert of a stack read again for another one: done already
                item.delta = None
            elif item.delta is None:
                run.skip(i, item.skip or "skipped")
            elif _approx(config, run.targets[i]):
                _randomized(run, i, item.delta, item.floor)
            else:
                exact.append((i, item))
        if want is None and two and exact:  # values only, the engine's exact batched path
            S_all = batch_singular_values([it.delta for _, it in exact], device=device, max_batch_bytes=config.max_batch_bytes)
            for (i, item), S in zip(exact, S_all):
                e = square_scale_exponent(S)  # σ² beyond float64's range: journaled as S·2**-e (ExtractRun)
                S = np.ldexp(S, -e) if e else S
                run.add_spectrum(i, S, spectrum_total(S), "gram-eigvalsh/float64", base_fro=item.base_fro, note=item.note, exp=e,
                                 floor=item.floor)
        else:
            # spectra of the batch (in parallel), the ranks from them (in order), then the factors (in parallel)
            deltas = [item.delta for _, item in exact]
            if want is None and config.mode == "rank":
                # k is the rank, known before the spectrum: where the values kept are about as many as the
                # vectors, they come with the vectors (no pass for all p values); a few vectors and many
                # values (--rank 8 with 64 values kept) cost less through every value (gram_eig)
                ks = [run.keep_now(i, np.zeros(0), 1.0, 0.0) for i, _ in exact]
                eigs = _in_parallel(_rank_eig, [(d, max(k, run.n_values(i)), k) for d, (i, _), k in zip(deltas, exact, ks)], device)
            else:
                eigs = _in_parallel(gram_eig, [(d,) for d in deltas], device)
                ks = [run.keep_now(i, eig.S, eig.total, cutoff, eig.exp) if want is None else want[i] for (i, _), eig in zip(exact, eigs)]
            if want is None:
                for (i, item), eig in zip(exact, eigs):
                    run.add_spectrum(i, eig.S, eig.total, "gram-eigh/float64", base_fro=item.base_fro, note=item.note, exp=eig.exp,
                                     floor=item.floor)
            factors = _in_parallel(eig_factors, list(zip(deltas, eigs, ks)), device)
            del eigs
            for (i, _), (B, A) in zip(exact, factors):
                run.add_factors(i, B, A, stage=None if want is None else stage)
        for item in batch:
            item.delta = None


def _refined_pass(src: ExtractSource, run: ExtractRun, config: ExtractConfig, device: torch.device, tasks: list[Task],
                  todo: set[int]) -> None:
    """``--rank`` (one pass) under ``precision="mixed"`` on the CPU: each matrix's subspace in float32,
    its values and factors in float64 (:func:`spectra.lowrank.refined_triplets`).

    k is known before any spectrum, so matrices need no batches: they flow through the compute
    threads (a free thread takes the next matrix when the main thread takes the oldest result, where a
    batch waited for its slowest member and then for the main thread) while the matrices computed at
    once hold at most one batch's memory (``--batch-memory``; one matrix always, however large), and
    each thread writes its own factors' scratch file; the main thread journals the results in order.
    A matrix above ``approx_above`` (the randomized path) is computed by the main thread in its turn."""
    batch_bytes = _settings(config, device).batch_bytes

    def jobs() -> Iterator[tuple[int, Prepared, int | None]]:  # pulled by the main thread
        for batch in _stream(src, tasks, config, device):
            for item in batch:
                i = run.index[item.unit.order]
                if i not in todo:  # an expert of a stack done before (a resumed run)
                    item.delta = None
                    continue
                exact = item.delta is not None and not _approx(config, run.targets[i])
                yield i, item, run.keep_now(i, np.zeros(0), 1.0, 0.0) if exact else None

    def cost(job: tuple[int, Prepared, int | None]) -> int:  # bytes of ΔW, as a batch counts them
        return 0 if job[2] is None else job[1].delta.numel() * job[1].delta.element_size()

    def work(job: tuple[int, Prepared, int | None]) -> Triplets | None:
        i, item, k = job
        if k is None:
            return None
        tr = refined_triplets(item.delta, max(k, run.n_values(i)), k)
        run.store_factors(i, tr.B, tr.A)
        return tr

    with contextlib.closing(zip_results(jobs(), work, cost=cost, max_cost=batch_bytes)) as results:
        for (i, item, _), tr in results:
            if tr is not None:
                run.add_spectrum(i, tr.S, tr.total, tr.method, residual=tr.residual, base_fro=item.base_fro, note=item.note,
                                 exp=tr.exp, floor=item.floor)
                run.add_factors(i, tr.B, tr.A, stored=True)
            elif item.delta is None:
                run.skip(i, item.skip or "skipped")
            else:
                _randomized(run, i, item.delta, item.floor)
            item.delta = None


_R = TypeVar("_R")


def _rank_eig(delta: torch.Tensor, n: int, k: int) -> GramEig:
    """The top n values and k vectors: from the vector solver when n is within 8 of k (measured at p = 576:
    --rank 64 with 65 values 107 ms against 124 through every value; --rank 8 with 65 values 50 against 34)."""
    return gram_top(delta, n, k) if n - k <= 8 else gram_eig(delta)


def _in_parallel(fn: Callable[..., _R], args: list[tuple], device: torch.device) -> list[_R]:
    """``[fn(*a) for a in args]``; on the CPU several at once, one BLAS thread each (an eigensolve at these
    sizes barely uses two threads, two matrices in two threads use both cores)."""
    if device.type == "cpu" and len(args) > 1:
        return map_one_blas_thread(lambda a: fn(*a), args)
    return [fn(*a) for a in args]


def _adapter_pass(src: ExtractSource, run: ExtractRun, device: torch.device) -> None:
    """Each LoRA module of the adapter: its exact factored SVD (DoRA: the dense update's)."""
    for i, t in enumerate(run.targets):
        if i in run.spectra and i in run.factors:
            continue
        mod = src.mods[t.order]
        why = non_finite_factor(mod)
        if why:  # as spectra diff skips it: no adapter can hold an undefined update
            run.skip(i, why)
            continue
        base_fro = tensor_fro(src.base, t.base_name)
        if base_fro is not None and not math.isfinite(base_fro):  # a LoRA's update does not need the base
            base_fro = None
        if mod.magnitude is not None:  # DoRA: ΔW depends on the base; dense
            W = src.base.load(t.base_name).to(torch.float32)
            W = W.mT if t.conv1d else W
            delta = mod.dora_delta(W).to(device)
            if not all_finite(delta):
                run.skip(i, f"the DoRA update of {mod.module} is not finite (its base weight {t.base_name} holds NaN or "
                            "Inf, or the update overflows float32)")
                continue
            eig = gram_eig(delta)
            k = min(t.p, max(run.plan.caps[i], run.plan.uniform_bound))
            run.add_spectrum(i, eig.S, eig.total, "dora/gram-eigh/float64", base_fro=base_fro, note=t.note, exp=eig.exp)
            run.add_factors(i, *eig_factors(delta, eig, k))
            continue
        Bf, Af = mod.factors()
        tr = factored_triplets(Bf.to(device), Af.to(device), mod.scale, k=t.p)
        if not (math.isfinite(tr.total) and np.isfinite(tr.S).all()):
            run.skip(i, f"the update s·B·A of {mod.module} overflows float64 (scale {mod.scale:g} = lora_alpha / r); "
                        "check lora_alpha in adapter_config.json")
            continue
        S = np.zeros(t.p)
        S[: min(t.p, tr.S.size)] = tr.S[: t.p]
        run.add_spectrum(i, S, tr.total, "factored", base_fro=base_fro, note=f"LoRA r={mod.r}, scale={mod.scale:g}")
        run.add_factors(i, tr.B, tr.A)


# ---- the command ------------------------------------------------------------------------------------
@public_entry
def extract(base: str | Checkpoint, tuned: str | Checkpoint, out_dir: str | Path, *, config: ExtractConfig | None = None,
            resume: bool = False, force: bool = False, plots: bool = True,
            callback: Callable[[ExtractEvent], None] | None = None) -> ExtractResult:
    """Extract a PEFT LoRA adapter from ``tuned`` (a full checkpoint, or an adapter to resize) against
    ``base`` into ``out_dir``, with ``extract.json`` saying what it kept and lost.

    Args:
        base: the base checkpoint (any form :func:`spectra.io.checkpoint.open_checkpoint` reads).
        tuned: the fine-tuned checkpoint, or a PEFT adapter folder of that base (LoRA, rsLoRA, DoRA).
        out_dir: the adapter folder to write (``adapter_config.json``, ``adapter_model.safetensors``,
            ``extract.json``, ``extract.csv``, ``extract.png``); must be empty or new.
        config: the rank rule and options (:class:`ExtractConfig`; default ``energy = 0.9``).
        resume: finish an interrupted run in ``out_dir`` (same inputs and options).
        force: overwrite ``out_dir``'s earlier spectra outputs.
        plots: write the figures.
        callback: called with an :class:`ExtractEvent` after each module.

    Returns:
        The :class:`~spectra.extract_results.ExtractResult` (``extract.json``'s contents).

    Raises:
        ConfigError: a bad option, an output folder that is not empty, ``--rank`` above a module's
            min(out, in), a budget below the cheapest component, nothing to extract.
        PairingError, CheckpointFormatError: base and tuned (or the adapter) do not match.
        IdenticalCheckpointsError: every ΔW is exactly zero (``extract.json`` is still written).

    Example:
        >>> res = extract("base/", "tuned/", "adapter/", config=ExtractConfig(budget="10%"))  # doctest: +SKIP
        >>> res.totals["energy_kept"], res.uniform["energy_kept"]                             # doctest: +SKIP
    """
    config = config_of(config, ExtractConfig)
    device = resolve_device(config.device)
    check_device_available(device)
    t0 = time.perf_counter()
    out = Path(out_dir)
    for x in (base, tuned):
        if not isinstance(x, Checkpoint):
            checkpoint_location(x)
    refuse_an_input_folder(out, base, tuned)
    base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    src = _open_source(base_ckpt, tuned, config)
    if not src.targets:
        raise no_target_error(src.notes, src.left_out or [], f"{base_ckpt.label} vs {src.label}")
    if src.kind == "lora" and config.mode == "rank":  # s·B·A has at most r nonzero singular values
        low = min(src.targets, key=lambda t: src.mods[t.order].r)
        r_low = src.mods[low.order].r
        if min(config.rank, config.max_rank or config.rank) > r_low:
            raise ConfigError(f"--rank {config.rank} is above the rank r = {r_low} of the adapter's {low.name}: its update "
                              f"s·B·A has at most {r_low} nonzero singular values", path=src.label,
                              hint=f"choose --rank <= {r_low} to resize the adapter down (--energy 1.0 keeps every module whole)")
    # --eval's inputs (models, tokenizer, text, positions) are checked before anything is extracted
    evaluation = _eval_inputs(base_ckpt, tuned, config) if config.eval_text else None
    prepare_out(out, resume, force)  # after every check of the inputs: a refused run deletes nothing
    dtype = out_dtype(config, [t.dtype for t in src.targets])
    plan = plan_ranks(src.targets, config, bytes_per := torch.empty(0, dtype=dtype).element_size())
    inputs = [base_ckpt] + ([src.tuned] if src.tuned is not None else [])
    options = {k: getattr(config, k) for k in RESULT_FIELDS}
    if src.adapter is not None:  # the adapter's weights file (names, shapes, size, mtime) and its config
        weights = next(src.adapter.path / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                       if (src.adapter.path / n).is_file())
        inputs.append(open_checkpoint(weights))
        options["adapter"] = [src.label, repr(src.adapter.config)]
    # journal records name targets by position: the same names in the same order, or no resume (an adapter's
    # modules are in layer order since the tenth round; a journal of the file's key order must not be resumed)
    options["targets"] = hashlib.sha256("\n".join(t.name for t in src.targets).encode()).hexdigest()[:16]
    fingerprint, about = run_identity(inputs, options)
    journal = RecordJournal(out / JOURNAL)
    # factors are kept in the adapter's dtype (float64 factors of a float64 ΔW stay float64 in a float64 adapter)
    run = ExtractRun(src.targets, plan, config, out, journal, callback, scratch_dtype=dtype)
    started = False
    try:  # a refused resume, an error or a stop leaves no lock behind (the journal stays, for --resume)
        run.absorb(journal.start(fingerprint, resume=resume, about=about))
        started = True  # (a refused resume keeps the earlier run's scratch factors)
        not_extracted = left_out_records(src.base, src.tuned, src.left_out)
        # the names transformers >= 5 loads the modules under (PEFT matches those): its import and a meta-device
        # model (seconds) run beside the decompositions
        loaded: dict[str, Any] = {}
        renamer = threading.Thread(target=lambda: loaded.update(zip(("renames", "source", "params", "split"), adapter_renames(
            src.base.config or (src.tuned.config if src.base_prefix else None),
            [n[: -len(".weight")].removeprefix(src.base_prefix) for n in src.base.tensors if n.endswith(".weight")],
            sorted({t.module for t in src.targets if t.stack})))),  # target_parameters name the parameters as loaded too
            name="spectra-load-names", daemon=True)
        renamer.start()
        # the figures' imports (~0.5 s of matplotlib) run beside the decompositions, not after them
        loader = threading.Thread(target=preload_plots, name="spectra-plots-import", daemon=True) if plots else None
        if loader is not None:
            loader.start()
        if src.kind == "full":
            _dense_pass(src, run, config, device, stage="spectra")
        else:
            _adapter_pass(src, run, device)
        plan = run.plan = settle_budget(plan, src.targets, config, run.spectra, bytes_per)  # a percentage: of the changed ones
        ranks, alloc = final_ranks(src.targets, plan, config, run.spectra)
        usable = [i for i in range(len(src.targets)) if not run.spectra[i].get("skipped")]
        if not usable:
            raise ConfigError(f"none of the {len(src.targets)} chosen matrices can be extracted: "
                              f"{run.spectra[0]['note']} ({src.targets[0].name}){' and others' if len(src.targets) > 1 else ''}",
                              path=f"{base_ckpt.label} vs {src.label}", hint="spectra diff lists the reason of each matrix")
        # every entry of B = U√σ and A = √σVᵀ (orthonormal U, V) is at most √σ₁: a module whose √σ₁ exceeds
        # the storage dtype's range (fp16: 65504) is refused before anything is written, never stored as inf
        for i in usable:
            root = root_sigma1(run.spectra[i])  # of ΔW itself, not of the journaled ΔW·2**-exp
            if ranks[i] and dtype.is_floating_point and root > torch.finfo(dtype).max:
                wider = "float32" if dtype == torch.float16 and root <= torch.finfo(torch.float32).max else "float64"
                raise ConfigError(f"the LoRA factors of {src.targets[i].name} reach up to √σ₁ = {root:.3g}, beyond "
                                  f"the largest {str(dtype).removeprefix('torch.')} ({torch.finfo(dtype).max:.3g}): they would be "
                                  "stored as inf", path=out, hint=f"write the adapter in {wider}: rerun with --dtype {wider} --force")
        # the uniform baseline spreads the same parameters over the updates there are (skipped, unchanged and
        # rounding-level matrices get none, as in the extracted adapter)
        # (an unchanged expert of a stack keeps the stack's rank, as PEFT needs: its zero factors count)
        live = [i for i in usable if extractable(run.spectra[i]) or ranks[i]]
        uniform = uniform_rank([src.targets[i].cost for i in live], [src.targets[i].cap for i in live],
                               sum(ranks[i] * src.targets[i].cost for i in live))
        if src.kind == "full" and config.resolved_strategy == "two-pass":
            want = {i: min(t.p, max(r, min(t.cap, uniform) if config.eval_text else 0)) for i, (t, r) in enumerate(zip(src.targets, ranks))}
            _dense_pass(src, run, config, device, stage="vectors", want={i: k for i, k in want.items() if k})
        elif src.kind == "full":
            # one pass kept each module's components above the greedy prefix's cut-off; the budget's fill step
            # or the exact search (spectra.allocation) may give a module more, below it: those modules are factored again
            short = {i: r for i, r in enumerate(ranks) if r and float(run.spectra[i].get("total") or 0) > 0
                     and not run.has_factors(i, r)}
            if short:
                _dense_pass(src, run, config, device, stage="vectors", want=short)
        head, keep = {r["name"] for r in src.saved}, selector(config.include, config.exclude, config.layers)  # (a head is held whole)
        changes = one_d_changes(src.base, src.tuned, src.one_d, [t for t, r in zip(src.targets, ranks) if r], src.adapter,
                                config.save_modules, src.base_prefix)
        not_lora = [r for r in changes if r["name"] not in head and keep(r["name"], layer_of(r["name"]))] + src.saved  # selected ones
        renamer.join(timeout=RENAME_WAIT_S)  # a model transformers builds slowly: the stored names, as without it
        src.renames = dict(loaded.get("renames") or {}) if not renamer.is_alive() else {}
        params = dict(loaded.get("params") or {}) if not renamer.is_alive() else {}
        if not renamer.is_alive():  # (the spectra are journaled: the rerun it asks for takes them from there)
            refuse_split(loaded.get("split") or {}, [t.module for t, r in zip(src.targets, ranks) if r and not t.stack],
                         "the adapter", out, "it into a new folder (or with --force)")
        src.targets = [replace(t, module=(params if t.stack else src.renames).get(t.module, t.module)) for t in src.targets]
        result = build_result(src, run.spectra, ranks, alloc, plan, config, dtype, device, uniform, not_extracted(), not_lora)
        result.fingerprint, result.version = fingerprint, __version__
        # what the adapter's dtype does to each module's factors (F6), and a tied head the adapter cannot reach unmerged
        note_storage(result, {src.targets[i].name: run.storage_error(i, ranks[i]) for i in usable}, dtype)
        result.warnings += src.notes + tied_embedding_warning(src.base, src.targets, ranks, src.tuned)
        if cut := [m["name"] for m in result.modules if "cuts through tied singular values" in (m.get("note") or "")]:
            result.warnings.append(f"{len(cut)} of {len(result.modules)} modules (e.g. {cut[0]}) have a rank that cuts through tied "
                                   "singular values: their adapter holds one of equally good choices (each one's note in extract.json)")
        written = {t.module for t, r in zip(src.targets, ranks) if r} | {src.renames.get(x["module"], x["module"]) for x in not_lora if x.get("held")}
        if used := {k: v for k, v in src.renames.items() if v in written}:  # GPT-NeoX's embed_out is lm_head once loaded…
            result.warnings.append(renames_text(used, loaded["source"], "the adapter"))
        if not any(extractable(run.spectra[i]) for i in usable) or not any(ranks[i] for i in usable):
            moved = result.nothing_written()
            result.elapsed_s = time.perf_counter() - t0
            result.save(out, plots=False)
            raise nothing_extracted_error(result, [float(run.spectra[i]["total"]) for i in usable],
                                          any(extractable(run.spectra[i]) for i in usable), moved, f"{base_ckpt.label} vs {src.label}", out)
        write_extracted(out, src, run, ranks, config, dtype, not_lora, result)
        failed = None
        if evaluation is not None:
            try:
                _eval(out, base_ckpt, tuned, src, run, uniform, config, dtype, device, result, evaluation, not_lora)
            except Exception as exc:  # noqa: BLE001 - the adapter is written: its extract.json is saved, then exc raised
                failed, result.eval = exc, None
                result.warnings.append(f"--eval failed, so extract.json holds no held-out losses: {exc}")
        result.complete = True
        result.elapsed_s = time.perf_counter() - t0
        result.save(out, plots=False)
        shutil.rmtree(out / SCRATCH, ignore_errors=True)  # the adapter is whole: a stop while the figures are drawn keeps no copy
        if loader is not None and result.modules:  # the figures' imports ran beside the decompositions (plots asked for)
            from spectra.plots.extract import save_extract_plots

            loader.join()
            save_extract_plots(result.to_dict(), out)
        journal.release()  # finished: no lock left in the folder
        if isinstance(failed, SpectraError):
            raise type(failed)(failed.message, path=failed.path, tensor=failed.tensor, hint=f"{failed.hint + '; ' if failed.hint else ''}"
                               f"the adapter and extract.json (without the held-out losses) were written to {out}")
        if failed is not None:
            raise failed
        return result
    except BaseException as exc:
        if started and isinstance(exc, (ConfigError, IdenticalCheckpointsError)):  # refused for good (nothing to extract…)
            shutil.rmtree(out / SCRATCH, ignore_errors=True)  # no scratch factors left behind: a rerun would be refused alike
        journal.release()
        raise


def _eval_inputs(base_ckpt: Checkpoint, tuned: str | Checkpoint, config: ExtractConfig) -> EvalData:
    """``--eval``'s inputs, checked and tokenised (:func:`spectra.extract_eval.prepare_eval`)."""
    from spectra.extract_eval import prepare_eval

    tuned_label = tuned.label if isinstance(tuned, Checkpoint) else str(tuned)
    return prepare_eval(base_ckpt.label, tuned_label, config.eval_text, seq_len=config.eval_seq_len, blocks=config.eval_blocks)


def _eval(out: Path, base_ckpt: Checkpoint, tuned: str | Checkpoint, src: ExtractSource, run: ExtractRun, uniform: int,
          config: ExtractConfig, dtype: torch.dtype, device: torch.device, result: ExtractResult, data: EvalData,
          not_lora: list[dict]) -> None:
    """Write the uniform-rank adapter of the same size beside the extracted one, holding the same saved modules and
    biases (without them it was scored with the norms' update removed), then evaluate both."""
    from spectra.extract_eval import held_out_losses

    held = {m["name"]: m["rank"] for m in result.modules}  # an unchanged expert of a stack holds the stack's rank
    ranks_u = [min(uniform, t.cap) if extractable(run.spectra[i]) or held.get(t.name) else 0 for i, t in enumerate(src.targets)]
    missing = [t.name for i, (t, r) in enumerate(zip(src.targets, ranks_u)) if r and not run.has_factors(i, r)]
    if missing:
        raise ConfigError(f"the uniform rank-{uniform} adapter needs components that were not kept ({missing[0]}…)",
                          hint="rerun with --force (the run keeps them when --eval is given from the start)")
    layout, tensors, cfg, _ = adapter_files(src, run, ranks_u, config, not_lora)
    udir = out / f"uniform_r{uniform}"
    write_adapter(udir, layout, tensors, cfg, dtype)
    tuned_label = tuned.label if isinstance(tuned, Checkpoint) else str(tuned)
    losses = held_out_losses(base_ckpt.label, tuned_label, {"extracted": out, "uniform": udir}, config.eval_text,
                             seq_len=config.eval_seq_len, blocks=config.eval_blocks, device=device, data=data)
    losses["uniform_adapter"] = str(udir)
    losses["uniform_rank"] = uniform
    result.eval = losses
    result.warnings += losses["notes"]  # which tokenizer read the text, when not the base's own


__all__ = ["JOURNAL", "OUTPUT_FILES", "SCRATCH", "ExtractConfig", "ExtractEvent", "ExtractResult", "extract", "final_ranks"]
