"""``spectra esd``: WeightWatcher's heavy-tailed metrics (:mod:`spectra.esd`) for every matrix of one
checkpoint, streamed.

A reader thread loads the next tensor (upcast to float32, oriented ``(out, in)``, split into experts,
and into parts only if asked) while the engine decomposes the current batch of equally shaped
matrices with :func:`spectra.engine.batch_singular_values` (exact: float64 Gram + eigh); ``λ = σ²``.
Memory stays at one tensor ahead plus one batch, whatever the model. Each record is journaled to
``esd.jsonl`` at once (``--resume`` finishes an interrupted run) and reported through a callback;
results come back in layer order.

Differences from ``WeightWatcher(model).analyze()`` (0.7.7) in what is analysed, and
``EsdConfig.ww_compatible`` which undoes them (README.md, "spectra esd"):

- every matrix: vocabularies above 50000 rows and matrices with more than 15000 eigenvalues
  (WeightWatcher's ``max_N`` and ``max_evals``) and stacked expert tensors, which WeightWatcher does not
  see (they are not a module's ``.weight``), are analysed;
- a tied ``lm_head`` is stored once and analysed once (WeightWatcher lists it as a second row,
  identical to the embedding);
- Conv kernels (4-D) are not matrices here; WeightWatcher pools their ``kh × kw`` slices.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from spectra._version import __version__
from spectra.adapter_files import adapter_file
from spectra.config import SharedOptions, config_of, public_entry, search_pattern
from spectra.delta import oriented
from spectra.display import as_typed, matrices
from spectra.engine import batch_budget, batch_singular_values
from spectra.errors import ConfigError, ResultsFormatError
from spectra.esd import EVALS_THRESH, GRAM_LIMIT, XMIN_METHODS, ZERO_REASON, XminMethod, esd_metrics
from spectra.esd_results import SCHEMA as ESD_SCHEMA
from spectra.esd_results import EsdRecord, EsdResult, check_record
from spectra.io.adapter import is_adapter
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.io.files import remove_earlier_outputs
from spectra.journal import REWRITE_EVERY_S, RecordJournal, first_of_each, run_identity
from spectra.linalg import all_finite, check_device_available, resolve_device
from spectra.load_names import ww_unseen
from spectra.metrics import numerical_rank, rank_resolution
from spectra.numerics import unit_roundoff
from spectra.pairing import NOT_MATRIX, MatrixPair, pair_checkpoints
from spectra.roles import part_role
from spectra.rounding_bulk import rounding_bulk, rounding_bulk_note
from spectra.selection import Task, Unit, layer_filter, plan_units
from spectra.stream import largest_first, one_openmp_thread, read_ahead

__all__ = ["WW_MAX_EVALS", "WW_MAX_N", "WW_MIN_EVALS", "EsdConfig", "EsdEvent", "esd", "ww_skip_reason"]

#: WeightWatcher 0.7.7 ``analyze()`` defaults (``constants.py``): a layer is skipped when its number of
#: eigenvalues M = min(shape) is below ``min_evals`` or above ``max_evals``, or N = max(shape) is above ``max_N``.
WW_MIN_EVALS = 8
WW_MAX_EVALS = 15000
WW_MAX_N = 50000

#: esd's journal in its folder: one line per matrix as it is fitted (``--resume``).
JOURNAL = "esd.jsonl"
#: What esd writes into its folder besides its journal (removed first when an earlier esd wrote there).
ESD_FILES = ("esd.json", "esd.csv", "esd_config.json", "alpha_heatmap.png", "esd_plots.png", "report.html")

#: EsdConfig fields that change the numbers written (``--resume`` refuses a journal made with others).
RESULT_FIELDS = ("include", "exclude", "layers", "xmin", "ww_compatible", "split_fused", "evals_thresh", "plot_include")


#: ESD plots of at most this many matrices when ``plot_include`` is not given (the middle layer's).
DEFAULT_PLOTTED = 8


@dataclass(frozen=True)
class EsdConfig(SharedOptions):
    """Options of an esd run; saved with the results.

    Attributes:
        include, exclude, layers, device: see :class:`spectra.config.SharedOptions`.
        xmin: how the power-law tail's lower end is chosen: ``"fit"`` (WeightWatcher's default, the
            xmin with the smallest KS distance), ``"peak"`` or ``"mid"`` (:func:`spectra.esd.power_law_fit`).
        ww_compatible: analyse only what WeightWatcher 0.7.7's ``analyze()`` analyses (:func:`ww_skip_reason`),
            so rows can be compared one to one; the others are listed as skipped with the rule.
        split_fused: split fused matrices (``qkv_proj``, ``c_attn``, ``gate_up_proj``…) into their parts;
            False (default) analyses them whole, as WeightWatcher does.
        evals_thresh: eigenvalues at or below this are left out of the power-law fit (WeightWatcher's
            absolute ``EVALS_THRESH``, 1e-5).
        plot_include: regex; the eigenvalues of matching matrices are kept in the results and plotted
            on log-log axes. None: the matrices of the middle layer (at most 8).
        max_batch: most equally shaped matrices decomposed together (on the CPU, in parallel threads with one
            BLAS thread each; on CUDA, as one batched call).
        max_batch_bytes: memory cap of a batch (and of the engine's chunks); default 70% of free CUDA
            memory, 256 MiB on the CPU.
        prefetch: tensors read ahead while the engine works (at least 1; default 32), and never more than
            ``max_batch_bytes`` of them, so that the next batch is read while this one is decomposed.
    """

    xmin: XminMethod = "fit"
    ww_compatible: bool = False
    split_fused: bool = False
    evals_thresh: float = EVALS_THRESH
    plot_include: str | None = None
    max_batch: int = 32
    max_batch_bytes: int | None = None
    prefetch: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.xmin not in XMIN_METHODS:
            raise ConfigError(f"xmin must be one of fit, peak, mid. Got {self.xmin!r} instead")
        if self.ww_compatible and self.split_fused:
            raise ConfigError("ww_compatible analyses fused matrices whole, as WeightWatcher does; splitting them "
                              "gives rows WeightWatcher does not have", hint="drop --split or --ww-compatible")
        if not (self.evals_thresh >= 0.0):
            raise ConfigError(f"evals_thresh must be >= 0. Got {self.evals_thresh!r} instead")
        if self.plot_include is not None:  # guarded against catastrophic backtracking, as --include
            search_pattern("--plot-include", self.plot_include)
        if self.max_batch < 1 or self.prefetch < 1:
            raise ConfigError(f"max_batch and prefetch must be >= 1. Got {self.max_batch}, {self.prefetch} instead")
        if self.max_batch_bytes is not None and self.max_batch_bytes < 1:
            raise ConfigError(f"max_batch_bytes must be >= 1. Got {self.max_batch_bytes} instead")


@dataclass(frozen=True)
class EsdEvent:
    """Reported to the callback once per analysed or skipped matrix.

    Attributes:
        done: matrices finished so far (this one included); total: matrices planned.
        record: the new record, or None if the matrix was skipped; skipped: ``{"name", "reason"}`` or None.
    """

    done: int
    total: int
    record: EsdRecord | None = None
    skipped: dict[str, str] | None = None


def ww_skip_reason(pair: MatrixPair) -> str | None:
    """Why WeightWatcher 0.7.7's ``analyze()`` (default options) would not analyse this tensor, or None.

    WeightWatcher walks ``model.named_modules()`` and analyses the ``.weight`` of ``Linear``,
    ``Conv1d``/``Conv2d`` (GPT-2's ``Conv1D`` included) and ``Embedding`` modules
    (``WWLayerIterator.layer_supported``) whose ``M = min(shape)`` lies in ``[min_evals, max_evals] =
    [8, 15000]`` and ``N = max(shape) <= max_N = 50000``. From a checkpoint, a module weight is a 2-D
    tensor named ``*.weight``; a stacked 3-D expert tensor is a bare parameter WeightWatcher never sees.
    """
    name, shape = pair.tuned.name, tuple(pair.tuned_info.shape)
    if len(shape) != 2:
        return "stacked expert tensor: not a module's .weight, WeightWatcher does not see it (--ww-compatible)"
    if not name.endswith(".weight"):
        return "not a module's .weight: WeightWatcher does not see it (--ww-compatible)"
    out_dim, in_dim = pair.out_in
    M, N = min(out_dim, in_dim), max(out_dim, in_dim)
    if M < WW_MIN_EVALS:
        return f"min(shape) = {M} < {WW_MIN_EVALS}: below WeightWatcher's min_evals (--ww-compatible)"
    if M > WW_MAX_EVALS:
        return f"min(shape) = {M} > {WW_MAX_EVALS}: above WeightWatcher's max_evals (--ww-compatible)"
    if N > WW_MAX_N:
        return f"max(shape) = {N} > {WW_MAX_N}: above WeightWatcher's max_N (--ww-compatible)"
    return None


def _record_name(rec: object) -> str | None:
    """The matrix an esd journal record (``{"matrix": …}`` or ``{"skipped": …}``, checked) is of."""
    entry = rec.get("matrix", rec.get("skipped")) if isinstance(rec, dict) else None
    return entry.get("name") if isinstance(entry, dict) and isinstance(entry.get("name"), str) else None


def _plotted(tasks: list[Task], pattern: str | None) -> set[str]:
    """Names of the units whose eigenvalues are kept: ``pattern`` matches, or the middle layer's
    first :data:`DEFAULT_PLOTTED` units (plan order, so a resumed run keeps the same ones)."""
    units = sorted((u for t in tasks for u in t.units), key=lambda u: u.order)
    if pattern is not None:
        rx = search_pattern("--plot-include", pattern)
        return {u.name for u in units if rx.search(u.name)}
    layer_of = {u.name: t.pair.tuned.layer for t in tasks for u in t.units}
    layers = sorted({layer_of[u.name] for u in units if layer_of[u.name] is not None})
    if not layers:
        return {u.name for u in units[:DEFAULT_PLOTTED]}
    mid = layers[len(layers) // 2]
    return set([u.name for u in units if layer_of[u.name] == mid and u.expert in (None, 0)][:DEFAULT_PLOTTED])


def _read(task: Task, ckpt: Checkpoint) -> list[tuple[Unit, Task, torch.Tensor | None, str]]:
    """Load one tensor and cut it into its units: ``(unit, task, W (out, in) float32 or None, why skipped)``.
    Runs in the reader thread. float64 weights stay float64; others are upcast to float32 (exact)."""
    pair = task.pair
    w = oriented(ckpt.load(pair.tuned.name), pair.tuned.transpose, pair.rows)
    out = []
    for unit in task.units:
        m = w[unit.expert] if w.ndim == 3 else w
        if unit.rows is not None:
            m = m[unit.rows]
        m = m.to(torch.float64 if m.dtype == torch.float64 else torch.float32)
        if not all_finite(m):
            out.append((unit, task, None, "NaN or Inf in the weights; the spectrum is undefined"))
        elif m.dtype == torch.float64 and not float(torch.linalg.vector_norm(m)) ** 2 < GRAM_LIMIT:
            # float32 squares cannot overflow float64; float64 weights near 1e154 make λ = σ² (and the Gram) overflow
            out.append((unit, task, None, f"weights too large: ‖W‖_F² exceeds {GRAM_LIMIT:.0e}, so the eigenvalues "
                                          "λ = σ² overflow float64; rescale the weights"))
        elif m.dtype == torch.float64 and 0.0 < max(float(m.max()), -float(m.min())) * m.numel() ** 0.5 < GRAM_LIMIT**-0.5:
            # and near 1e-154 they underflow: λ = σ² rounds to subnormals or 0 (a full-rank matrix read as zero;
            # torch's vector_norm squares unscaled, so the bound is from the largest entry: ‖W‖_F <= max·√n)
            out.append((unit, task, None, f"weights too small: ‖W‖_F² is below {1.0 / GRAM_LIMIT:.0e}, so the eigenvalues "
                                          "λ = σ² underflow float64; rescale the weights"))
        else:
            out.append((unit, task, m, ""))
    return out


def _stream(tasks: list[Task], ckpt: Checkpoint, depth: int, max_bytes: int) -> Iterator[tuple[Unit, Task, torch.Tensor | None, str]]:
    """Units in plan order while one thread reads up to ``depth`` tensors ahead, and no more than
    ``max_bytes`` of them (their float32 units; one tensor always goes). A reader's exception is
    re-raised here, in order."""
    def cost(task: Task) -> int:
        return sum(u.shape[0] * u.shape[1] for u in task.units) * (8 if task.pair.tuned_info.dtype == "float64" else 4)

    yield from read_ahead(tasks, lambda task: _read(task, ckpt), cost, depth=depth, workers=1, max_bytes=max_bytes,
                          name="spectra-esd-read")


@public_entry
def esd(
    model: str | Checkpoint,
    *,
    config: EsdConfig | None = None,
    out_dir: str | Path | None = None,
    callback: Callable[[EsdEvent], None] | None = None,
    resume: bool = False,
    plots: bool = True,
) -> EsdResult:
    """WeightWatcher's ESD metrics (α, D, xmin, σ_α, α-hat, norms, entropy, MP fit) of every matrix of
    one checkpoint, from exact eigenvalues ``λ = σ²`` of each ``(out, in)`` weight.

    Args:
        model: a checkpoint (``.safetensors``, model folder, index, ``.bin``, hub cache id) or an opened one.
        config: options; :class:`EsdConfig` defaults when None.
        out_dir: if given, ``esd.jsonl`` is journaled as records come in and ``esd.json`` rewritten every
            few seconds, then ``esd.json``, ``esd.csv``, ``esd_config.json`` and the plots at the end.
        callback: called with an :class:`EsdEvent` after each matrix.
        resume: finish an interrupted run in ``out_dir`` from its journal (same inputs and options).
        plots: write ``alpha_heatmap.png`` and ``esd_plots.png`` into ``out_dir``.

    Returns:
        An :class:`EsdResult` with ``complete=True``.

    Raises:
        ConfigError: ``model`` is a PEFT adapter, ``resume`` without ``out_dir``, or a journal from other
            inputs or options.

    Example:
        >>> res = esd("model/", out_dir="esd-out")          # doctest: +SKIP
        >>> res.summary()[0]["alpha_median"]                # doctest: +SKIP
    """
    config = config_of(config, EsdConfig)
    device = resolve_device(config.device)
    check_device_available(device)
    t0 = time.perf_counter()
    if not isinstance(model, Checkpoint) and is_adapter(model):
        raise ConfigError("is a PEFT adapter: esd analyses full weight matrices", path=model,
                          hint="merge the adapter into its base first, or use `spectra diff BASE ADAPTER --esd`")
    if resume and out_dir is None:
        raise ConfigError("resume needs the output folder of the interrupted run", hint="pass --out DIR with --resume")
    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    if (found := adapter_file(ckpt.tensors)) and not found.unmerged:  # an adapter's weights file given alone
        raise ConfigError(f"{found.message}: esd fits full weight matrices, and a factor's spectrum says nothing of the "
                          "model's", path=ckpt.root, hint="merge the adapter into its base first"
                          + (", or use `spectra diff BASE ADAPTER_FOLDER --esd`" if found.kind == "LoRA" and not found.unmerged else ""))
    pairing = pair_checkpoints(ckpt, ckpt)
    tasks = plan_units(pairing.pairs, include=config.include, exclude=config.exclude, layers=config.layers,
                       split_fused=config.split_fused, what="matrices", skipped=pairing.skipped)
    chosen = layer_filter(config.layers)  # what is not analysed, in the layers asked for
    result = EsdResult(model=ckpt.label, skipped=[asdict(s) for s in pairing.skipped if chosen(s.name)], config=asdict(config), device=str(device),
                       version=__version__)
    result.warnings.extend(pairing.notes)  # e.g. which of a folder's weight sets was read
    if config.ww_compatible:
        for s in result.skipped:  # rows WeightWatcher has and this run cannot: said, since they break one to one
            if s["reason"] == f"4-D tensor, {NOT_MATRIX}" and s["name"].endswith(".weight"):
                s["reason"] += ("; WeightWatcher analyses a Conv2d's kernel (its slices pooled), so its rows hold one for "
                                "this tensor that --ww-compatible has not")
        kept = []
        # the modules WeightWatcher walks are those of the model the installed transformers builds (>= 5: MoE
        # experts stacked, routers not Linear); without config.json or transformers, the name rules alone
        unseen = ww_unseen(ckpt.config, [t.pair.tuned.name for t in tasks]) or {}
        for t in tasks:
            why = ww_skip_reason(t.pair) or unseen.get(t.pair.tuned.name)
            if why is None:
                kept.append(t)
            else:
                result.skipped.extend({"name": u.name, "reason": why} for u in t.units)
        tasks = kept
    order = {u.name: u.order for t in tasks for u in t.units}
    plotted = _plotted(tasks, config.plot_include)
    if config.plot_include is not None and not plotted:  # esd_plots.png (and the report's panel) would be left out unsaid
        result.warnings.append(f"--plot-include {as_typed(config.plot_include)} matches none of the {matrices(sum(len(t.units) for t in tasks))} "
                               "analysed (after --include/--exclude/--layers): no ESD plot is drawn")
    result.fingerprint, about = run_identity([ckpt], {k: getattr(config, k) for k in RESULT_FIELDS})
    journal = RecordJournal(Path(out_dir) / JOURNAL) if out_dir is not None else None
    done_names: set[str] = set()
    if journal is not None:
        records = journal.start(result.fingerprint, resume=resume, about=about)  # takes the folder's lock
        if not resume:  # an earlier esd's files here describe another run: gone before this one's first write
            remove_earlier_outputs(Path(out_dir), "esd.json", ESD_SCHEMA, ESD_FILES)
        for i, rec in enumerate(records, 1):  # checked before esd.json is rewritten: a refusal loses nothing
            entry = rec.get("matrix", rec.get("skipped")) if isinstance(rec, dict) else None
            if isinstance(rec, dict) and "matrix" in rec:
                check_record(entry, f"record {i}", journal.path)
            elif not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("reason"), str)):
                raise ResultsFormatError(f"record {i} must be {{\"matrix\": {{…}}}} or {{\"skipped\": {{\"name\", \"reason\"}}}}. "
                                         f"Got {str(rec)[:80]!r} instead", path=journal.path,
                                         hint="the journal was edited: run without --resume into a new folder")
            name = entry["name"]
            if name not in order and not any(s["name"] == name for s in result.skipped):
                raise ResultsFormatError(f"record {i} is of {str(name)[:120]!r}, which this run does not analyse (another "
                                         "model's journal, or an edited one)", path=journal.path,
                                         hint="run without --resume into a new folder")
        # one record per name: a repeated line (an edited or joined journal) would list a matrix twice, counted
        # twice in esd.csv, the summary and every median; a name the run lists as skipped already is not added again
        for rec in first_of_each(records, _record_name, result.warnings, seen=(s["name"] for s in result.skipped)):
            if "matrix" in rec:
                result.matrices.append(EsdRecord.from_dict(rec["matrix"]))
                done_names.add(rec["matrix"]["name"])
            elif "skipped" in rec:
                result.skipped.append(rec["skipped"])
                done_names.add(rec["skipped"]["name"])
        result.save_json(Path(out_dir) / "esd.json")
    tasks = [Task(t.pair, [u for u in t.units if u.name not in done_names]) for t in tasks]
    tasks = largest_first([t for t in tasks if t.units])  # records are put back in plan order at the end
    total = len(done_names) + sum(len(t.units) for t in tasks)
    state = {"done": len(done_names), "saved": time.monotonic()}

    def emit(record: EsdRecord | None, skipped: dict[str, str] | None) -> None:
        state["done"] += 1
        if record is not None:
            result.matrices.append(record)
        else:
            result.skipped.append(skipped)
        if journal is not None:
            journal.add({"matrix": record.to_dict()} if record is not None else {"skipped": skipped})
            if time.monotonic() - state["saved"] >= REWRITE_EVERY_S:
                result.save_json(Path(out_dir) / "esd.json")
                state["saved"] = time.monotonic()
        if callback is not None:
            callback(EsdEvent(state["done"], total, record, skipped))

    budget = batch_budget(device, config.max_batch_bytes)
    shapes = [u.shape for t in tasks for u in t.units]
    batch: list[tuple[Unit, Task, torch.Tensor]] = []
    size = 0
    finished = False
    # the fits of one batch run on a worker thread while the engine decomposes the next; records are
    # emitted (journal, callback) from this thread, in order
    fits: deque[Future] = deque()

    def drain(wait: bool) -> None:
        while fits and (wait or fits[0].done()):
            for rec in fits.popleft().result():
                emit(rec, None)

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectra-esd-fit", initializer=one_openmp_thread) as fitter:
            def flush() -> None:
                S_all, res, per = _decompose(batch, device, budget)
                # each matrix's storage rounding level (a bulk at it is no bulk), from its stored entries
                levels = [rounding_bulk(W, unit_roundoff(task.pair.tuned_info.dtype)) for _, task, W in batch]
                items = [(unit, task, level) for (unit, task, _), level in zip(batch, levels)]
                batch.clear()  # drop the weights now: the next tensors are being read
                fits.append(fitter.submit(_fit, items, S_all, res, per, config, plotted))
                drain(wait=False)

            for k, (unit, task, W, why) in enumerate(_stream(tasks, ckpt, config.prefetch, budget)):
                if W is None:
                    drain(wait=True)  # keep the journal in plan order
                    emit(None, {"name": unit.name, "reason": why})
                    continue
                if batch and batch[0][0].shape != unit.shape:  # a skipped matrix ended the run of the batch's shape
                    flush()
                    size = 0
                batch.append((unit, task, W))
                size += W.numel() * W.element_size()
                nxt = shapes[k + 1] if k + 1 < len(shapes) else None
                if nxt != unit.shape or len(batch) >= config.max_batch or size + nxt[0] * nxt[1] * 4 > budget:
                    flush()
                    size = 0
            if batch:
                flush()
            drain(wait=True)
        finished = True
    finally:
        if journal is not None and not finished:  # an interrupted run leaves esd.json (complete: false) beside its journal
            try:
                result.save_json(Path(out_dir) / "esd.json")
            finally:
                journal.release()  # and no lock in the folder
    result.matrices.sort(key=lambda r: order.get(r.name, len(order)))
    failed = sum(m["alpha"] is None for m in result.matrices)
    zero = sum(m.metrics.get("fit_note") == ZERO_REASON for m in result.matrices)
    if zero == len(result.matrices) > 1:  # a preallocated file that never got its data reads as zeros past its header
        result.warnings.append(f"every one of the {zero} matrices is exactly zero: a preallocated or incompletely written "
                               "checkpoint? (no power law to fit)")
    elif failed:
        result.warnings.append(f"{failed} of {len(result.matrices)} power-law fits failed (too few eigenvalues above "
                               f"{config.evals_thresh:g}, or a degenerate tail); their alpha is null")
    result.complete = True
    result.elapsed_s = time.perf_counter() - t0
    if out_dir is not None:
        result.save(out_dir, plots=plots)
    if journal is not None:
        journal.release()  # finished: no lock left in the folder
    return result


#: The largest matrix (elements) whose Gram spectrum, when it leaves singular values unresolved, is
#: recomputed by an SVD in float64 (32 MiB; ~1-2 s at 2048², where 8192² took over 7 minutes on the project's
#: 2-core CPU: a hostile file of such matrices would run for hours); a larger one keeps the Gram values and
#: counts the unresolved ones as 0 (:func:`spectra.esd.matrix_rank`'s ``resolution``).
REFINE_MAX_ELEMENTS = 1 << 22


def _decompose(batch: list[tuple[Unit, Task, torch.Tensor]], device: torch.device,
               budget: int) -> tuple[np.ndarray, list[float], float]:
    """Exact singular values of one batch of equally shaped matrices (float64 Gram + eigensolver),
    ``(S (b, p) float64 descending, resolution (b,) of each row, seconds per matrix)``.

    The Gram route tells a singular value from 0 only down to ``σ₁·√(p·ε)`` (:func:`rank_resolution`);
    WeightWatcher's rank and entropy count down to ``σ₁·N·ε`` on an SVD. A matrix with values below the
    Gram resolution (rank-deficient, or rank-deficient up to float32 rounding) is solved again by an SVD
    in float64 (resolution 0), up to :data:`REFINE_MAX_ELEMENTS`; a full-rank one (nearly all) is not."""
    start = time.perf_counter()
    S_all = batch_singular_values([W for _, _, W in batch], device=device, method="gram", dtype=torch.float64,
                                  max_batch_bytes=budget)
    p = S_all.shape[1]
    res = [0.0] * len(batch)
    for i, (_, _, W) in enumerate(batch):
        if numerical_rank(S_all[i], p) == p:
            continue  # every value resolved: the Gram spectrum is WeightWatcher's to rounding
        if W.numel() <= REFINE_MAX_ELEMENTS:
            S_all[i] = torch.linalg.svdvals(W.to(device="cpu", dtype=torch.float64)).numpy()
        else:
            res[i] = rank_resolution(float(S_all[i].max()), p)
    return S_all, res, (time.perf_counter() - start) / len(batch)


def _fit(items: list[tuple[Unit, Task, float]], S_all: np.ndarray, res: list[float], per: float, config: EsdConfig,
         plotted: set[str]) -> list[EsdRecord]:
    """The ESD metrics of each matrix of a decomposed batch, as records (runs on the fit thread);
    ``res``: the resolution of each row of ``S_all`` (:func:`_decompose`)."""
    out = []
    for (unit, task, level), S, r in zip(items, S_all, res):
        t = time.perf_counter()
        lam = np.square(S[::-1])  # ascending eigenvalues λ = σ² (not divided by N, as WeightWatcher)
        pair = task.pair
        metrics = esd_metrics(lam, unit.shape, xmin=config.xmin, thresh=config.evals_thresh, resolution=r, rounding=level)
        bulk = rounding_bulk_note(lam, metrics.mp_sigma2, level, pair.tuned_info.dtype)
        # above REFINE_MAX_ELEMENTS, values the Gram route cannot resolve are not recomputed: said where it happens
        unresolved = (f"{metrics.unresolved} of its {metrics.M} singular values are below the float64 Gram route's resolution "
                      f"σ₁·√(p·ε) = {r:.3g} (not recomputed by an SVD above {REFINE_MAX_ELEMENTS:,} entries): matrix_rank, "
                      "rank_loss, weak_rank_loss and entropy count them as 0, sv_min is null; WeightWatcher's SVD "
                      "resolves them") if metrics.unresolved else ""
        out.append(EsdRecord(
            name=unit.name, layer=pair.tuned.layer, module=unit.module, role=part_role(pair.tuned.role, unit.module, pair.tuned.rel_path),
            expert=unit.expert,
            shape=list(unit.shape), dtype=pair.tuned_info.dtype,
            note="; ".join(n for n in (pair.note, pair.tuned.note, unresolved, bulk) if n),
            metrics=metrics.to_dict(), seconds=per + time.perf_counter() - t,
            eigenvalues=[float(v) for v in lam] if unit.name in plotted else None,
        ))
    return out
