"""``spectra diff``: the spectrum of ΔW = W_tuned − W_base for every paired matrix.

The run streams. A background thread reads the next tensor pairs (``prefetch`` of them at most) and
forms ΔW in float32 (docs/definitions.md: never subtract in bf16/fp16), split into its logical parts, while the
main thread decomposes the previous batch: equally shaped matrices (all q_proj of a model, all
experts of a layer) are visited together and decomposed in device-sized batches
(:mod:`spectra.engine`). Memory is bounded by the prefetched pairs plus one batch, not by the model.
Each result is reported through a callback as it is computed and, with ``out_dir``, journaled to
``results.jsonl`` at once and folded into ``results.json`` every few seconds, so an interrupted run
loses at most one batch. Results come back in layer order whatever the work order was.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from spectra import distributed
from spectra._version import __version__
from spectra.adapter_diff import diff_adapter
from spectra.config import DiffConfig, config_of, public_entry
from spectra.delta import Prepared, floor_bound, fro_blocks, pair_bytes, prepare, unit_floor
from spectra.distributed import DistContext
from spectra.engine import batch_singular_values, exact_spectra
from spectra.errors import ConfigError, IdenticalCheckpointsError, SpectraError
from spectra.io.adapter import is_adapter
from spectra.io.checkpoint import FLOAT_DTYPES, Checkpoint, open_checkpoint
from spectra.io.files import same_file
from spectra.journal import Journal, absorb, diff_identity, run_fingerprint
from spectra.linalg import check_device_available, resolve_device
from spectra.metrics import resolved_above
from spectra.pairing import NOT_MATRIX, Skipped, drop_tied_heads, pair_checkpoints
from spectra.param_experts import open_adapter_on
from spectra.plan import CostModel, Plan, balance, calibrate, estimate_memory, peak_rss_bytes, segment_ends
from spectra.plots.base import preload as preload_plots
from spectra.records import DiffEvent, approx_result, esd_entry, exact_result
from spectra.results import CHANGED_SKIP, DiffResult, ModuleResult
from spectra.rounding_bulk import weight_rounding
from spectra.selection import Task, layer_filter, plan_units, selector
from spectra.sketch import approx_energy_ranks
from spectra.storage_floor import raises_floor
from spectra.stored_bytes import base_lookup, changed_tensors
from spectra.stream import batches, largest_first, prefetch, run_settings
from spectra.threads import one_openmp_thread

#: The largest tensor pair ``plan_run`` reads to measure the I/O rate (stored bytes of both sides).
PROBE_MAX_BYTES = 128 << 20
#: A distributed run exchanges results this many times at most (in a background thread, so ranks do
#: not wait for each other; more rounds mean a finer journal on rank 0 after a lost rank).
ROUNDS = 32

__all__ = ["DiffConfig", "DiffEvent", "diff", "plan_run", "all_zero", "raise_if_identical"]


def _results(batch: list[Prepared], config: DiffConfig, device: torch.device, dtype: torch.dtype,
             budget: int) -> list[tuple[ModuleResult | None, Skipped | None]]:
    """Decompose one batch (chunks of at most ``budget`` bytes) and turn each spectrum into a result."""
    first = batch[0]
    if first.delta is None:
        return [(None, Skipped(first.unit.name, first.skip or "skipped"))]
    shape = first.unit.shape
    start = time.perf_counter()
    if config.approx or (config.approx_above is not None and min(shape) > config.approx_above):
        approx = [approx_energy_ranks(item.delta, config.thresholds, rank_tol=config.approx_tol, device=device,
                                      generator=torch.Generator().manual_seed(config.seed)) for item in batch]
        seconds = (time.perf_counter() - start) / len(batch)
        _release(batch)
        return [(approx_result(item, a, config, seconds), None) for item, a in zip(batch, approx)]
    solved: tuple[str, ...] = (config.precision,) * len(batch)
    if config.precision == "float32":
        # float32 with its energy ranks certified: a matrix whose float32 spectrum cannot be proven to give
        # the float64 ranks is solved again in float64 (plain float32 moved ranks with a small tail). The other
        # metrics and the kept values stay float32's (certifying them too sent almost every matrix to float64)
        spectra = exact_spectra([item.delta for item in batch], precision="certified", thresholds=config.thresholds,
                                top_k=0, metrics=False, device=device, method=config.method,
                                max_batch_bytes=budget)
        S_all, solved = spectra.S, spectra.precision
    else:
        S_all = batch_singular_values([item.delta for item in batch], device=device, method=config.method,
                                      dtype=dtype, max_batch_bytes=budget)
    seconds = (time.perf_counter() - start) / len(batch)
    weights: list[tuple[list[float] | None, list[float] | None]] = [(None, None)] * len(batch)
    esds: list[dict | None] = [None] * len(batch)
    if config.weight_spectra:
        bases = [item.base for item in batch]
        S_b = batch_singular_values(bases, device=device, method=config.method, dtype=dtype, max_batch_bytes=budget)
        # each side's storage rounding level (a Marchenko–Pastur bulk at it is no bulk), as spectra esd: W_base's
        # before the copy becomes W_tuned
        base_levels = [weight_rounding(item.base, item.task.pair.base_info.dtype) for item in batch] if config.esd else []
        for item in batch:  # W_tuned = W_base + ΔW, in place in the private upcast copy of W_base
            item.base += item.delta
        tuned_levels = [weight_rounding(item.base, item.task.pair.tuned_info.dtype) for item in batch] if config.esd else []
        S_t = batch_singular_values(bases, device=device, method=config.method, dtype=dtype, max_batch_bytes=budget)
        del bases
        weights = [([float(x) for x in sb[: config.top_k]], [float(x) for x in st[: config.top_k]]) for sb, st in zip(S_b, S_t)]
        if config.esd:  # on the full spectra, before anything is truncated to top_k
            esds = [esd_entry(item.unit.shape, S, sb, st, rounding=lv)
                    for item, S, sb, st, lv in zip(batch, S_all, S_b, S_t, zip(base_levels, tuned_levels))]
    _release(batch)
    return [(exact_result(item, S, config, seconds, *w, esd=e, precision=pr), None)
            for item, S, w, e, pr in zip(batch, S_all, weights, esds, solved)]


def _with_floors(batch: list[Prepared], results: list[tuple[ModuleResult | None, Skipped | None]], base: Checkpoint,
                 tuned: Checkpoint) -> list[tuple[ModuleResult | None, Skipped | None]]:
    """``results`` (of :func:`_results`, one per item of ``batch``) with each module's ``rounding_floor``.

    The upper bound :func:`spectra.delta.floor_bound` costs nothing (norms the result has); where the smallest
    kept singular value stands above it, no kept value is at or below the floor and the bound is recorded. Only
    where one is not is the exact floor computed (:func:`spectra.delta.unit_floor`, the pair read again and one
    O(out·in) pass; a pair stored narrower than float32 has it from its reader already): a float32 fine-tune's
    top-k values stand far above float32 rounding, so the common case pays nothing, while an update of exact low
    rank, or one at the rounding level, gets the floor that tells its directions from the rounding."""
    for item, (module, _) in zip(batch, results):
        if module is None:
            continue
        if module.fro_norm == 0:  # ΔW = 0: no row or column changed, so no rounding reaches ΔW
            module.rounding_floor = 0.0
            continue
        module.rounding_floor = _floor(item, module, base, tuned)
        # (a 16-bit pair, whose rounding is the largest, too: the note was skipped where the reader had the floor)
        module.note = "; ".join(n for n in (module.note, floor_count_note(module)) if n)
    return results


def _floor(item: Prepared, module: ModuleResult, base: Checkpoint, tuned: Checkpoint) -> float | None:
    """One module's ``rounding_floor`` (see :func:`_with_floors`); None where it is not finite."""
    if item.floor_known:  # computed as the pair was read (a 16-bit or 8-bit tuned side, spectra.delta.floor_when_read)
        return item.floor
    bound = floor_bound(module.shape, item.task.pair.tuned_info.dtype, item.base_fro, module.fro_norm)
    kept = module.singular_values
    # (--top-k 0 keeps no value: none to tell from the rounding; a ΔW at the rounding level has its floor raised
    # above the bound: spectra.storage_floor.certified_floor)
    if (not kept or bound < kept[-1]) and not raises_floor(item.caveats):
        return bound if math.isfinite(bound) else None
    floor = unit_floor(item, base, tuned)  # (a float32 or float64 pair: read again, its ΔW and stored tensors being gone)
    return floor if math.isfinite(floor) else None


def floor_count_note(module: ModuleResult) -> str:
    """What a module's note says when an energy rank counts kept singular values at or below its ``rounding_floor``
    (``-t 1.0`` on a float32 merge of a rank-4 LoRA read 9, values 5-9 at 7e-9 under a 1.7e-8 floor), as ``extract``
    and ``recommend`` say it; "" otherwise (or when the rank reaches past the kept values)."""
    floor, kept = module.rounding_floor, module.singular_values or []
    over = {k: r for k, r in (module.energy_rank or {}).items()
            if floor and 0 < r <= len(kept) and kept[r - 1] <= floor}
    if not over:
        return ""
    key, r = max(over.items(), key=lambda kv: kv[1])
    resolved = resolved_above(kept, floor) or 0
    return (f"energy rank {r} at τ = {key} counts {r - resolved} directions at or below the rounding floor of its stored "
            f"weights ({floor:.3g}: rounding noise, not the update; {resolved} stand above it)")


def _release(batch: list[Prepared]) -> None:
    """Drop the ΔW tensors of a decomposed batch now: generator and loop variables still hold the
    batch while the next tensors are read, and a large embedding's ΔW is hundreds of MB."""
    for item in batch:
        item.delta = None
        item.base = None


@public_entry
def diff(
    base: str | Checkpoint,
    tuned: str | Checkpoint | None = None,
    *,
    config: DiffConfig | None = None,
    out_dir: str | Path | None = None,
    callback: Callable[[DiffEvent], None] | None = None,
    plots: bool = True,
    allow_identical: bool = True,
    resume: bool = False,
    distributed_run: bool = False,
) -> DiffResult:
    """Spectrum metrics of ΔW = W_tuned − W_base for every paired matrix (docs/definitions.md).

    Args:
        base: the base checkpoint (path, folder, index, ``.bin``, hub cache id) or an opened one;
            or, with ``tuned`` None, a PEFT adapter folder to analyse on its own.
        tuned: the fine-tuned checkpoint, likewise, or a PEFT adapter folder (its updates
            ``s·B·A`` are analysed from the factors, see :mod:`spectra.adapter_diff`).
        config: options; :class:`DiffConfig` defaults when None.
        out_dir: if given, ``results.json``/``results.jsonl`` are written there as results come in,
            then ``results.csv`` and the heatmaps at the end.
        callback: called with a :class:`DiffEvent` after each matrix (progress bars, logging).
        plots: write the heatmaps into ``out_dir``.
        allow_identical: if False, raise :class:`IdenticalCheckpointsError` (after writing the
            results) when every analysed ΔW is exactly zero.
        resume: continue an interrupted run in ``out_dir`` from its journal (``results.jsonl``):
            only the missing matrices are computed, and the results equal an uninterrupted run's.
            Refused when the journal comes from other inputs or options.
        distributed_run: this process is one rank of a run started by ``torchrun`` (see
            :mod:`spectra.distributed`): the tensor pairs are split among the ranks by cost, rank 0
            writes ``out_dir`` and calls ``callback``, and every rank returns the whole result.
            PEFT adapters (cheap: factored) are analysed whole on every rank.

    Returns:
        A :class:`DiffResult` with ``complete=True``.

    Raises:
        DistributedError: another rank failed or was killed; rerun with ``resume`` to finish.

    Example:
        >>> res = diff("base.safetensors", "tuned.safetensors")   # doctest: +SKIP
        >>> res = diff("base/", "lora-adapter/")                  # doctest: +SKIP
        >>> res.summary_records()[0]["energy_rank"]                       # doctest: +SKIP
    """
    config = config_of(config, DiffConfig)
    device = resolve_device(config.device)
    ctx = None
    if distributed_run:
        device = distributed.rank_device(device)
    check_device_available(device)
    if distributed_run:
        ctx = distributed.init(device)
    try:
        return _diff(base, tuned, config, device, out_dir, callback, plots, allow_identical, resume, ctx)
    finally:
        distributed.close(ctx)


def _diff(base: str | Checkpoint, tuned: str | Checkpoint | None, config: DiffConfig, device: torch.device,
          out_dir: str | Path | None, callback: Callable[[DiffEvent], None] | None, plots: bool,
          allow_identical: bool, resume: bool, ctx: DistContext | None) -> DiffResult:
    """:func:`diff` once the device (and the process group) is settled."""
    t0 = time.perf_counter()
    dtype = torch.float64 if config.precision == "float64" else torch.float32
    lead = ctx is None or ctx.rank == 0  # the rank that writes and reports
    writer = Journal(Path(out_dir)) if out_dir is not None and lead else None
    # the heatmaps' imports (~0.5 s of matplotlib) run beside the engine, not after the run; from the
    # first result on, once the largest tensor pair (the first read: the run's memory peak) is done
    loader = threading.Thread(target=preload_plots, name="spectra-plots-import", daemon=True) if writer and plots else None
    if loader is not None:
        callback = _starting(loader, callback)
    callback = callback if lead else None
    if resume and out_dir is None:
        raise ConfigError("resume needs the output folder of the interrupted run", hint="pass --out DIR with --resume")
    adapter_path = tuned if tuned is not None else base
    if not isinstance(adapter_path, Checkpoint) and is_adapter(adapter_path):
        base_ckpt = None
        if tuned is not None:
            base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
        opened = open_adapter_on(adapter_path, base_ckpt, keep=selector(config.include, config.exclude, config.layers),
                                 merged="diff the merged model against the original base")
        result = diff_adapter(base_ckpt, opened, config=config, device=device, dtype=dtype,
                              callback=callback, writer=writer, label_base=base_ckpt.label if base_ckpt else None,
                              label_tuned=str(adapter_path), resume=resume)
        for m in result.modules:  # decomposed from its factors, which hold no storage rounding: no floor
            m.rounding_floor = 0.0
    elif tuned is None:
        raise ConfigError(f"{base} is not a PEFT adapter folder; a single input must be an adapter",
                          hint="pass BASE and TUNED to diff two checkpoints")
    else:
        base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
        tuned_ckpt = tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned)
        result = _diff_checkpoints(base_ckpt, tuned_ckpt, config, device, dtype, writer, callback, resume, ctx,
                                   journaled=out_dir is not None)
        if all_zero(result):  # the change may lie in what a diff does not analyse: biases, norms, kernels (BitFit)
            changed = set(changed_tensors(base_ckpt, tuned_ckpt, [s["name"] for s in result.skipped]))
            result.skipped = [{**s, "reason": s["reason"] + CHANGED_SKIP} if s["name"] in changed else s for s in result.skipped]
    result.complete = True
    result.elapsed_s = time.perf_counter() - t0
    result.add_caveat_warnings()
    if all_zero(result):
        left_out = result.not_compared()
        result.warnings.append("every analysed ΔW is exactly zero: " + (
            f"{left_out}, and are not compared" if left_out else "base and tuned hold the same weights"))
    if loader is not None:
        if loader.ident is None:  # no result came
            loader.start()
        loader.join()
    if writer:
        writer.finish(result, plots=plots)
    if not allow_identical:
        raise_if_identical(result, out_dir)
    return result


def _starting(thread: threading.Thread, callback: Callable[[DiffEvent], None] | None) -> Callable[[DiffEvent], None]:
    """``callback``, that also starts ``thread`` at its first call."""
    def call(event: DiffEvent) -> None:
        if thread.ident is None:
            thread.start()
        if callback is not None:
            callback(event)
    return call


def all_zero(result: DiffResult) -> bool:
    """True when results exist and every analysed ΔW is exactly zero."""
    return bool(result.modules) and all(m.fro_norm == 0.0 for m in result.modules)


def raise_if_identical(result: DiffResult, out_dir: str | Path | None = None) -> None:
    """Raise :class:`IdenticalCheckpointsError` when every analysed ΔW is exactly zero."""
    if all_zero(result):
        written = f"; results were still written to {out_dir}" if out_dir else ""
        left_out = result.not_compared()
        if left_out:  # "the same weights" would be false: what changed may be what was not compared
            raise IdenticalCheckpointsError(
                f"every analysed matrix ({len(result.modules)}) has ΔW = 0, but {left_out}, and are not compared",
                path=f"{result.base} vs {result.tuned}",
                hint=("see the pairing warnings (a tensor renamed on one side?); " if result.unpaired else "")
                + ("`spectra inspect` shows why each tensor was skipped; " if result.skipped_matrices() else "")
                + "--allow-identical accepts this" + written)
        if any((result.config or {}).get(k) for k in ("include", "exclude", "layers")):  # the rest may have changed
            raise IdenticalCheckpointsError(
                f"each of the {len(result.modules)} matrices selected (--include, --exclude, --layers) has ΔW = 0",
                path=f"{result.base} vs {result.tuned}", hint="widen the selection; --allow-identical accepts this" + written)
        twice = result.base and result.tuned and same_file(result.base, result.tuned)
        raise IdenticalCheckpointsError(
            f"every one of the {len(result.modules)} analysed matrices has ΔW = 0: base and tuned hold the same weights"
            + (" (the same path was given as both)" if twice else ""),
            path=f"{result.base} vs {result.tuned}",
            hint="check that you passed the fine-tuned checkpoint; --allow-identical accepts this" + written,
        )


def _task_seconds(task: Task, cost: CostModel, config: DiffConfig) -> tuple[float, float]:
    """Estimated seconds of one tensor pair: ``(reading both sides and forming ΔW, decomposing its
    units)``; three decompositions per unit with ``weight_spectra``."""
    work = 3 if config.weight_spectra else 1
    return cost.io_seconds(task.pair.stored_bytes), sum(work * cost.matrix_seconds(u.shape) for u in task.units)


def _diff_checkpoints(base_ckpt: Checkpoint, tuned_ckpt: Checkpoint, config: DiffConfig, device: torch.device,
                      dtype: torch.dtype, writer: Journal | None, callback: Callable[[DiffEvent], None] | None,
                      resume: bool = False, ctx: DistContext | None = None, *, journaled: bool = False) -> DiffResult:
    """The streaming, batched run over two full checkpoints (see the module docstring); ``journaled``: rank 0
    journals the results (what a distributed failure's hint says).

    With ``ctx`` (a distributed run) every rank plans the same work, takes its cost-balanced share
    of the tensor pairs, and hands its results to a background exchange after each of ``rounds``
    segments of equal cost (:class:`spectra.distributed.Exchanger`), collecting the others' between
    batches; every rank returns the whole result, and only rank 0 has a ``writer``.
    """
    pairing = pair_checkpoints(base_ckpt, tuned_ckpt, tied_head=True)
    drop_tied_heads(pairing, base_ckpt, tuned_ckpt)  # a tied head's row would repeat the embedding's
    planned = plan_units(pairing.pairs, include=config.include, exclude=config.exclude, layers=config.layers, split_fused=config.split_fused,
                         skipped=pairing.skipped)
    order = {u.name: u.order for t in planned for u in t.units}
    chosen = layer_filter(config.layers)  # what is not analysed, in the layers asked for
    result = DiffResult(
        base=base_ckpt.label, tuned=tuned_ckpt.label, thresholds=list(config.thresholds),
        skipped=[asdict(s) for s in pairing.skipped if chosen(s.name)],
        unmatched={"base_only": [n for n in pairing.base_only if chosen(n)], "tuned_only": [n for n in pairing.tuned_only if chosen(n)]},
        config=asdict(config), device=str(device), version=__version__,
        inputs={"base": str(base_ckpt.root), "tuned": str(tuned_ckpt.root)},
    )
    result.warnings.extend(pairing.notes)  # e.g. which of a folder's weight sets was read
    result.fingerprint, result.identity = diff_identity(base_ckpt, tuned_ckpt, config)
    if ctx is None:
        finished = writer.start(result, resume=resume, known=set(order)) if writer else []
    else:  # only rank 0 reads the journal; the others learn what is done, or why it was refused
        # every rank must analyse the same pairs with the same options, or the merged results mix them
        prints = distributed.exchange(ctx, run_fingerprint(base_ckpt, tuned_ckpt, config, portable=True),
                                      where="comparing the ranks' inputs", journaled=False)
        odd = [r for r, f in enumerate(prints) if f != prints[0]]
        if odd:
            raise ConfigError(f"rank(s) {', '.join(map(str, odd))} of the distributed run were given other inputs or "
                              "options than rank 0 (checkpoint files, config.json, or options that change results)",
                              hint="start every rank with the same command on identical copies of BASE and TUNED")
        refused = None
        try:
            mine = ("ok", writer.start(result, resume=resume, known=set(order)) if writer else [])
        except SpectraError as exc:
            refused, mine = exc, ("error", str(exc))
        status, payload = distributed.broadcast(ctx, mine, where="reading the journal")
        if refused is not None:
            raise refused
        if status == "error":
            raise ConfigError(f"rank 0 refused the run: {payload}")
        finished = payload
    names = absorb(result, finished)
    tasks = []
    for t in planned:
        left = [u for u in t.units if u.name not in names]
        if left:
            tasks.append(Task(t.pair, left))
    tasks = largest_first(tasks)
    done = len(names)
    total = done + sum(len(t.units) for t in tasks)
    rounds, ends = 0, []
    if ctx is not None:
        cost = CostModel.default(device)
        costs = [sum(_task_seconds(t, cost, config)) for t in tasks]
        shares = balance(costs, ctx.world_size)
        tasks = [tasks[i] for i in shares[ctx.rank]]  # stays in shape order: batching works as before
        rounds = max(1, min(ROUNDS, max(len(s) for s in shares)))  # the same on every rank
        unit_costs = [c / len(t.units) for t, c in zip(tasks, (costs[i] for i in shares[ctx.rank])) for _ in t.units]
        ends = segment_ends(unit_costs, rounds)
    run = run_settings(config, device)
    budget = run.batch_bytes
    prepared = prefetch(tasks, base_ckpt, tuned_ckpt, run.depth, run.workers, device, config.weight_spectra, run.ahead_bytes)
    outbox: list[tuple[ModuleResult | None, Skipped | None]] = []
    emitted = 0
    completed = False

    def record(module: ModuleResult | None, skip: Skipped | None) -> None:
        nonlocal done
        done += 1
        if module is not None:
            result.modules.append(module)
        else:
            result.skipped.append(asdict(skip))
        if writer:
            writer.add(result, module, skip)
        if callback:
            callback(DiffEvent(done, total, module, skip))

    exchanger = distributed.Exchanger(ctx, rounds, device, journaled=journaled) if ctx is not None else None

    def collect(wait: bool = False) -> None:  # results the other ranks finished
        for module, skip in exchanger.receive(wait=wait):
            record(module, skip)

    try:
        shapes = [u.shape for t in tasks for u in t.units]
        k = 0
        for batch in batches(prepared, shapes, config.max_batch, budget):
            for module, skip in _with_floors(batch, _results(batch, config, device, dtype, budget), base_ckpt, tuned_ckpt):
                record(module, skip)
                emitted += 1
                if exchanger is not None:
                    outbox.append((module, skip))
                    while k < rounds and ends[k] <= emitted:
                        exchanger.send(outbox)
                        outbox, k = [], k + 1
            if exchanger is not None:
                collect()
        if exchanger is not None:
            while k < rounds:  # ranks with less work still take part in every round
                exchanger.send(outbox)
                outbox, k = [], k + 1
            collect(wait=True)
        completed = True
    finally:
        prepared.close()
        if writer and not completed:  # interrupted (error, Ctrl-C): keep everything finished so far
            writer.flush(result)
    result.modules.sort(key=lambda m: order[m.name])
    if moved := _changed_beyond_matrices(result, base_ckpt, tuned_ckpt, selector(config.include, config.exclude, config.layers)):
        result.warnings.append(moved)
    result.skipped.sort(key=lambda s: order.get(s["name"], -1))  # pairing skips first, then layer order
    result.warnings.extend(f"{s['name']}: {s['reason']}" for s in result.skipped if s["name"] in order)
    return result


def _changed_beyond_matrices(result: DiffResult, base: Checkpoint, tuned: Checkpoint,
                             keep: Callable[[str, int | None], bool]) -> str | None:
    """A warning when skipped tensors of three or more dimensions changed (a convolution kernel: Whisper's conv1 and conv2,
    a Mamba's conv1d, a ViT's patch embedding), with their share of the update's energy: the findings saw only the
    matrices, and a fine-tune whose update is mostly in a kernel read as small. None when none changed. ``keep(name,
    layer)``: the run's filters (--include, --exclude, --layers)."""
    base_of, changed = base_lookup(base, tuned), []
    for s in result.skipped:
        tn = s["name"]
        info, spec = tuned.tensors.get(tn), tuned.specs.get(tn)
        if (not s["reason"].endswith(NOT_MATRIX) or info is None or len(info.shape) < 3 or info.dtype not in FLOAT_DTYPES
                or not keep(tn, spec.layer if spec is not None else None)):
            continue
        if (bn := base_of(tn)) is not None and tuple(base.tensors[bn].shape) == tuple(tuned.tensors[tn].shape):
            fro = fro_blocks(base.load(bn), tuned.load(tn))[0]  # in blocks: no float copy of the whole tensor
            if fro > 0:
                changed.append((tn, fro))
    if not changed:
        return None
    inside = sum(m.fro_norm**2 for m in result.modules if m.fro_norm is not None and math.isfinite(m.fro_norm))
    outside = sum(f * f for _, f in changed)
    name, fro = max(changed, key=lambda x: x[1])
    return (f"{len(changed)} skipped tensor{'s' * (len(changed) > 1)} of three or more dimensions changed (e.g. {name}, "
            f"‖ΔW‖_F {fro:.3g}), {outside / (inside + outside):.1%} of the update's energy (‖ΔW‖²_F of {'them' if len(changed) > 1 else 'it'} "
            "and the analysed matrices): no number here describes that part")


@public_entry
def probe_tasks(tasks: list[Task], target: int = 32 << 20, most: int = 64) -> list[Task]:
    """The tensor pairs ``--plan`` reads for the I/O rate: those nearest ``target`` bytes (stored, both sides) until
    ``target`` in all (at most ``most``), none above :data:`PROBE_MAX_BYTES`: a plan computes nothing, and a lone 2 GB
    pair read for a rate took minutes and its memory (the default rate is used when none is small enough). Several
    small ones, not one: a 0.5 MiB pair's fixed cost read as a rate of 5 MB/s priced a 470 MiB embedding and head at
    68 s, read in 2. Nearest by ratio, not difference: a 64 MiB pair is 32 MiB from the target, so any smaller one came
    first and 64 tiny pairs priced a model of 2048 × 8192 matrices at 5 minutes (read in 18 s)."""
    chosen: list[Task] = []
    for t in sorted((t for t in tasks if t.pair.stored_bytes <= PROBE_MAX_BYTES),
                    key=lambda t: abs(math.log(max(t.pair.stored_bytes, 1) / target))):
        if sum(c.pair.stored_bytes for c in chosen) >= target or len(chosen) == most:
            break
        chosen.append(t)
    return chosen


def plan_run(base: str | Checkpoint, tuned: str | Checkpoint, config: DiffConfig | None = None, *,
             world_size: int = 1, calibrate_cost: bool = True) -> Plan:
    """What ``diff(base, tuned, config)`` will do and cost, before doing it (``spectra diff --plan``).

    Opens both checkpoints (headers only), pairs and plans the matrices exactly as :func:`diff`
    does, then prices them: with ``calibrate_cost`` the rates are measured on the configured device
    (:func:`spectra.plan.calibrate`: a probe Gram product and eigensolve, and one real tensor pair
    read and subtracted), else :class:`CostModel` defaults are used.

    Args:
        base, tuned: checkpoints as for :func:`diff` (PEFT adapters are not planned: their factored
            analysis takes seconds).
        config: options; :class:`DiffConfig` defaults when None.
        world_size: ranks the work would be split over (``torchrun --nproc-per-node``).
        calibrate_cost: measure the rates on the device (about a second) instead of using defaults.

    Returns:
        A :class:`spectra.plan.Plan`. Memory is the data's (tensors in flight, the batch, the
        decomposition workspace) on top of ``baseline_bytes``, the process as it is now.
    """
    config = config_of(config, DiffConfig)
    if any(not isinstance(x, Checkpoint) and is_adapter(x) for x in (base, tuned)):
        raise ConfigError("--plan prices checkpoint pairs; a PEFT adapter is analysed from its factors in seconds",
                          hint="run without --plan")
    device = resolve_device(config.device)
    check_device_available(device)
    base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    tuned_ckpt = tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned)
    pairing = pair_checkpoints(base_ckpt, tuned_ckpt, tied_head=True)  # as the run pairs them
    drop_tied_heads(pairing, base_ckpt, tuned_ckpt)
    tasks = plan_units(pairing.pairs, include=config.include, exclude=config.exclude, layers=config.layers, split_fused=config.split_fused,
                       skipped=pairing.skipped)
    cost = CostModel.default(device)
    if calibrate_cost:
        probe = None
        chosen = probe_tasks(tasks)

        def read_chosen() -> None:
            for t in chosen:
                prepare(t, base_ckpt, tuned_ckpt, device)  # each pair freed before the next is read

        # on a reader thread of one OpenMP thread, as the run reads: on the main thread's team a busy machine's
        # barriers cost ~40 ms per 0.25 MiB pair (the plan priced a 3 s run at 60-70 s)
        with ThreadPoolExecutor(max_workers=1, initializer=one_openmp_thread) as reader:
            if chosen:
                probe = (lambda: reader.submit(read_chosen).result(), sum(t.pair.stored_bytes for t in chosen))
            cost = calibrate(device, config.precision, io_probe=probe, method=config.method)
    io, compute = zip(*(_task_seconds(t, cost, config) for t in tasks)) if tasks else ((), ())
    shares = balance([a + b for a, b in zip(io, compute)], world_size)
    slowest = max(shares, key=lambda s: sum(io[i] + compute[i] for i in s))
    shapes: dict[tuple[int, int], int] = {}
    for t in tasks:
        for u in t.units:
            shapes[u.shape] = shapes.get(u.shape, 0) + 1
    run = run_settings(config, device)
    host, on_device = estimate_memory(
        [(*pair_bytes(t, base_ckpt, tuned_ckpt, config.weight_spectra), [u.shape for u in t.units]) for t in tasks],
        depth=run.depth, batch_bytes=run.batch_bytes, max_batch=config.max_batch,
        dtype=torch.float64 if config.precision == "float64" else torch.float32, method=config.method,
        on_gpu=device.type == "cuda", max_in_flight=run.ahead_bytes, workers=run.workers)
    approx = sum(n for s, n in shapes.items() if config.approx or (config.approx_above is not None and min(s) > config.approx_above))
    notes = ["memory is the data's; the allocator keeps some freed memory on top (40-80 MiB in tests/test_scale.py)"]
    if config.precision == "float32":
        notes.append("a float32 spectrum whose energy ranks cannot be certified is solved again in float64, which the time "
                     "does not price (up to twice it for such a matrix)")
    if config.method == "svd" and not calibrate_cost:
        notes.append("--method svd is priced at the Gram route's default rates: an SVD per matrix takes many times longer")
    if approx:
        notes.append(f"{approx} matrices use the approximate mode, priced as exact: the time is an upper estimate only where "
                     "the sketch settles early; a spectrum that decays slowly (or τ = 1) widens it to half the matrix and then "
                     "takes the exact route as well, several times the exact time; the memory is a lower estimate: the "
                     "sketch's working space, up to ~1.5× each such matrix's ΔW, is not counted")
    return Plan(
        matrices=sum(shapes.values()), tensors=len(tasks),
        read_bytes=sum(t.pair.stored_bytes for t in tasks), shapes=shapes,
        world_size=world_size, rank_seconds=[sum(io[i] + compute[i] for i in s) for s in shares],
        io_seconds=sum(io[i] for i in slowest), compute_seconds=sum(compute[i] for i in slowest),
        host_bytes=host, device_bytes=on_device, baseline_bytes=peak_rss_bytes(), cost=cost, approx=approx, notes=notes,
    )
