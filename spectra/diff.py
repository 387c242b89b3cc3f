"""``spectra diff``: the spectrum of ΔW = W_tuned − W_base for every paired matrix.

The run streams. A background thread reads the next tensor pairs (``prefetch`` of them at most) and
forms ΔW in float32 (SPEC.md: never subtract in bf16/fp16), split into its logical parts, while the
main thread decomposes the previous batch: equally shaped matrices (all q_proj of a model, all
experts of a layer) are visited together and decomposed in device-sized batches
(:mod:`spectra.engine`). Memory is bounded by the prefetched pairs plus one batch, not by the model.
Each result is reported through a callback as it is computed and, with ``out_dir``, journaled to
``results.jsonl`` at once and folded into ``results.json`` every few seconds, so an interrupted run
loses at most one batch. Results come back in layer order whatever the work order was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch

from spectra import __version__
from spectra.errors import ConfigError, IdenticalCheckpointsError, SpectraError, output_error
from spectra.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from spectra.engine import ApproxSpectrum, approx_energy_ranks, batch_budget, batch_singular_values
from spectra.linalg import resolve_device
from spectra.numerics import numeric_notes
from spectra.metrics import DEFAULT_THRESHOLDS, relative_norm, spectrum_metrics
from spectra.naming import Part
from spectra.pairing import MatrixPair, Skipped, pair_checkpoints
from spectra import distributed
from spectra.distributed import DistContext
from spectra.plan import CostModel, Plan, balance, calibrate, estimate_memory, peak_rss_bytes, segment_ends
from spectra.randmat import random_energy_rank
from spectra.results import DiffResult, ModuleResult, atomic_write_text, threshold_key

#: results.json is rewritten at most this often during a run (the journal has every result at once).
_REWRITE_EVERY_S = 5.0
#: A distributed run exchanges results this many times at most (in a background thread, so ranks do
#: not wait for each other; more rounds mean a finer journal on rank 0 after a lost rank).
_ROUNDS = 32


@dataclass(frozen=True)
class DiffConfig:
    """Options of a diff run; saved with the results.

    Attributes:
        thresholds: energy-rank thresholds τ (each in (0, 1]); SPEC.md's defaults 0.5, 0.9, 0.99.
        include: regex; only matrices whose result name matches (``re.search``) are analysed.
        exclude: regex; matrices whose result name matches are left out (and listed as skipped).
        layers: layer selection such as ``"0-3,7,10-"``; matrices outside the layer stack
            (embeddings, head) are left out when set.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        top_k: how many of the largest singular values each result keeps (plots, JSON); the metrics
            always use the full spectrum.
        method: ``"gram"`` (eigenvalues of the smaller Gram matrix; fast) or ``"svd"``
            (``torch.linalg.svdvals``); both exact, see :mod:`spectra.linalg`.
        precision: dtype of the decomposition. ``"float64"`` (default) keeps every singular value
            down to ~1e-7·σ₁; ``"float32"`` is ~2× faster on CPU and keeps energy ranks and norms but
            not the small singular values (nuclear norm, effective rank of low-rank updates).
        split_fused: split fused matrices (``qkv_proj``, ``c_attn``, ``query_key_value``,
            ``gate_up_proj``) into their logical parts (SPEC.md); False analyses them whole.
        approx: estimate energy ranks from a randomized sketch instead of the exact spectrum; each
            estimate comes with guaranteed bounds (``energy_rank_bounds``), see
            :func:`spectra.engine.approx_energy_ranks`.
        approx_above: use the approximate mode automatically for matrices with ``p = min(out, in)``
            above this; None never does. The default, 16384, keeps every matrix of today's open
            models up to 405B exact (their largest p is 16384) and stops the exact path's p³ cost
            (and its 8·p² byte Gram) from taking over beyond that (``docs/scale.md``).
        approx_tol: approximate mode stops when every bound is narrower than this fraction of p.
        seed: seed of the random sketches (approximate mode), so reruns give the same numbers.
        max_batch: most matrices decomposed together (equal shapes only).
        max_batch_bytes: memory cap of a batch; default 45% of the free CUDA memory (a quarter more goes to
            reading ahead, see ``prefetch_bytes``), or 256 MiB on the CPU.
        prefetch: tensor pairs read ahead while the engine works (0: none); default 1 on the CPU
            (whose cores the engine already uses) and 8 on CUDA.
        prefetch_bytes: most bytes of tensor pairs in flight (stored tensors and their ΔW); default a
            quarter of the free CUDA memory on a GPU (ΔW is formed there), no cap on the CPU (where
            ``prefetch`` counts pairs). One pair is always read, however large.
        weight_spectra: also keep the top singular values of W_base and W_tuned (two more exact
            decompositions per matrix), for spectra plots of the weights next to ΔW (Biderman et al.
            Fig. S7).
        read_workers: reader threads; default 1 on the CPU and up to 4 on CUDA, where reading and
            forming ΔW, not the GPU, is the bottleneck (``bench/results/``).
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    include: str | None = None
    exclude: str | None = None
    layers: str | None = None
    device: str = "auto"
    top_k: int = 64
    method: Literal["gram", "svd"] = "gram"
    precision: Literal["float64", "float32"] = "float64"
    split_fused: bool = True
    approx: bool = False
    approx_above: int | None = 16384
    approx_tol: float = 0.01
    seed: int = 0
    max_batch: int = 32
    max_batch_bytes: int | None = None
    prefetch: int | None = None
    prefetch_bytes: int | None = None
    read_workers: int | None = None
    weight_spectra: bool = False

    def __post_init__(self) -> None:
        if not self.thresholds or any(not (0.0 < float(t) <= 1.0) for t in self.thresholds):
            raise ConfigError(f"thresholds must each be in (0, 1]. Got {list(self.thresholds)} instead")
        object.__setattr__(self, "thresholds", tuple(sorted({float(t) for t in self.thresholds})))
        validate_filters(self.include, self.exclude)
        if self.layers is not None:
            parse_layers(self.layers)
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0. Got {self.top_k} instead")
        if self.method not in ("gram", "svd"):
            raise ConfigError(f"method must be 'gram' or 'svd'. Got {self.method!r} instead")
        if self.precision not in ("float64", "float32"):
            raise ConfigError(f"precision must be 'float64' or 'float32'. Got {self.precision!r} instead")
        if not 0 < self.approx_tol < 1:
            raise ConfigError(f"approx_tol must be in (0, 1). Got {self.approx_tol} instead")
        if self.prefetch_bytes is not None and self.prefetch_bytes < 1:
            raise ConfigError(f"prefetch_bytes must be >= 1. Got {self.prefetch_bytes} instead")
        if self.max_batch < 1 or (self.prefetch is not None and self.prefetch < 0) or (self.read_workers is not None and self.read_workers < 1):
            raise ConfigError(f"max_batch must be >= 1 and prefetch >= 0. Got {self.max_batch}, {self.prefetch} instead")
        validate_device(self.device)


def validate_filters(include: str | None, exclude: str | None) -> None:
    """Raise :class:`ConfigError` unless both are valid regular expressions (or None)."""
    for name, pattern in (("include", include), ("exclude", exclude)):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"--{name} must be a valid regular expression. Got {pattern!r} instead ({exc})") from None


def validate_device(device: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` is auto, cpu, cuda or cuda:N."""
    if device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N. Got {device!r} instead")


def check_device_available(device: torch.device) -> None:
    """Raise :class:`ConfigError` when a CUDA device is asked for that this machine does not have."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (device.index is not None and device.index >= count):
        raise ConfigError(f"--device {device} was asked for but this machine has {count} CUDA device(s)",
                          hint="use --device cpu, auto or an existing cuda:N")


def parse_layers(spec: str) -> Callable[[int], bool]:
    """Parse ``"0-3,7,10-"`` into a predicate on layer indices.

    >>> pred = parse_layers("0-1,5,8-")
    >>> [i for i in range(10) if pred(i)]
    [0, 1, 5, 8, 9]
    """
    ranges: list[tuple[int, int | None]] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d*))?", part)
        if not m:
            raise ConfigError(f"--layers must look like '0-3,7,10-'. Got {spec!r} instead")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else (int(m.group(2)) if m.group(2) else None)
        if hi is not None and hi < lo:
            raise ConfigError(f"--layers range {part!r} is empty (end before start)")
        ranges.append((lo, hi))
    return lambda i: any(lo <= i and (hi is None or i <= hi) for lo, hi in ranges)


@dataclass(frozen=True)
class DiffEvent:
    """Reported to the callback once per analysed or skipped matrix.

    Attributes:
        done: matrices finished so far (including this one).
        total: matrices planned (parts of fused matrices and experts counted separately).
        result: the new result, or None if the matrix was skipped.
        skipped: why the matrix was skipped, or None.
    """

    done: int
    total: int
    result: ModuleResult | None = None
    skipped: Skipped | None = None


@dataclass(frozen=True)
class _Unit:
    """One matrix to analyse: a part of a (possibly fused, possibly expert-stacked) tensor pair."""

    order: int  # position in the final, layer-ordered results
    name: str
    expert: int | None
    rows: torch.Tensor | None
    module: str
    shape: tuple[int, int]


@dataclass
class _Task:
    pair: MatrixPair
    units: list[_Unit] = field(default_factory=list)


def selector(include: str | None, exclude: str | None, layers: str | None) -> Callable[[str, int | None], bool]:
    """``keep(name, layer)`` for the ``--include``/``--exclude`` regexes and the ``--layers`` selection
    (which leaves out matrices outside the layer stack). Compiled once per run."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    layer_ok = parse_layers(layers) if layers else None

    def keep(name: str, layer: int | None) -> bool:
        if layer_ok is not None and (layer is None or not layer_ok(layer)):
            return False  # outside the asked layers: not analysed, not worth a skipped entry
        return not ((inc and not inc.search(name)) or (exc and exc.search(name)))

    return keep


def _filter_units(spec, config: DiffConfig, keep: Callable[[str, int | None], bool],
                  expert: int | None = None) -> list[tuple[str, torch.Tensor | None, str]]:
    """``(result name, rows, module label)`` of each part of ``spec`` that ``keep`` keeps.

    Experts of a stacked 3-D tensor are named ``<tensor>:e<k>``, parts ``<tensor>:q`` (SPEC.md).
    """
    out = []
    for part in (spec.parts if config.split_fused else (Part(""),)):
        name = spec.name + (f":e{expert}" if expert is not None else "") + (f":{part.suffix}" if part.suffix else "")
        if keep(name, spec.layer):
            out.append((name, part.rows, spec.module + (f":{part.suffix}" if part.suffix else "")))
    return out


def _plan(pairs: list[MatrixPair], config: DiffConfig) -> list[_Task]:
    """Expand pairs into units (parts × experts), apply the filters, and order the work so that
    equally shaped units are adjacent (they are batched together)."""
    tasks: list[_Task] = []
    order = 0
    keep = selector(config.include, config.exclude, config.layers)
    for pair in pairs:
        spec = pair.tuned
        stacked = len(pair.tuned_info.shape) == 3
        stored = pair.tuned_info.shape[-2:]
        out_dim, in_dim = (stored[1], stored[0]) if spec.transpose else (stored[0], stored[1])
        if pair.rows is not None:
            out_dim = pair.rows
        task = _Task(pair)
        for e in (range(pair.tuned_info.shape[0]) if stacked else [None]):
            for name, rows, module in _filter_units(spec, config, keep, e):
                shape = (int(rows.numel()) if rows is not None else int(out_dim), int(in_dim))
                task.units.append(_Unit(order, name, e if stacked else spec.expert, rows, module, shape))
                order += 1
        if task.units:
            tasks.append(task)
    tasks.sort(key=lambda t: (t.units[0].shape, t.units[0].order))
    return tasks


@dataclass
class _Prepared:
    """A unit ready for the engine: ΔW (float32, CPU) and the base norm, or why it is skipped."""

    unit: _Unit
    task: _Task
    delta: torch.Tensor | None
    base_fro: float
    skip: str | None = None
    base: torch.Tensor | None = None  # W_base upcast, only with DiffConfig.weight_spectra
    note: str = ""  # numerical caveats of this ΔW (spectra.numerics)


def _prepare(task: _Task, base: Checkpoint, tuned: Checkpoint, device: torch.device, keep_base: bool = False) -> list[_Prepared]:
    """Read one tensor pair and form ΔW on ``device`` for each of its units (runs in a reader thread)."""
    pair = task.pair
    wb = _oriented(base.load(pair.base.name), pair.base.transpose, pair.rows)
    wt = _oriented(tuned.load(pair.tuned.name), pair.tuned.transpose, pair.rows)
    out = []
    for unit in task.units:
        b = wb[unit.expert] if wb.ndim == 3 else wb
        t = wt[unit.expert] if wt.ndim == 3 else wt
        if unit.rows is not None:
            b, t = b[unit.rows], t[unit.rows]
        delta, base_fro, bad = _delta(b, t, device)
        if bad == ["overflow"]:
            out.append(_Prepared(unit, task, None, 0.0, "ΔW overflows float32 (weights near ±3.4e38); its spectrum is undefined"))
        elif bad:
            out.append(_Prepared(unit, task, None, 0.0, f"{' and '.join(bad)} weights contain NaN or Inf; ΔW is undefined"))
        else:
            notes = numeric_notes(b, t, delta, base_dtype=pair.base_info.dtype, tuned_dtype=pair.tuned_info.dtype,
                                  base_sq=base_fro**2)
            out.append(_Prepared(unit, task, delta, base_fro, base=b.to(device=device, dtype=delta.dtype, copy=True) if keep_base else None,
                                 note="; ".join(notes)))
    return out


def _delta(b: torch.Tensor, t: torch.Tensor, device: torch.device, block: int = 1 << 22) -> tuple[torch.Tensor, float, list[str]]:
    """ΔW = t − b on ``device`` (SPEC.md: upcast, then subtract), ‖b‖_F in float64, and which sides
    hold NaN/Inf.

    ΔW is float32, or float64 when either side is stored in float64 (a float32 subtraction would
    round away updates below float32 resolution). Works through row blocks of ``block`` elements:
    a bf16 pair never has both float32 upcasts in memory at once (peak: the stored pair plus ΔW),
    and on a GPU only the stored bytes cross the bus.
    """
    work = torch.float64 if torch.float64 in (b.dtype, t.dtype) else torch.float32
    delta = torch.empty(b.shape, dtype=work, device=device)
    rows = max(1, block // max(1, b.shape[-1]))
    sq = torch.zeros((), dtype=torch.float64, device=device)
    finite_b = torch.ones((), dtype=torch.bool, device=device)
    delta_ok = torch.ones((), dtype=torch.bool, device=device)
    for r in range(0, b.shape[0], rows):
        bb = b[r : r + rows].to(device).to(work)
        tb = t[r : r + rows].to(device).to(work)
        b64 = bb.double().reshape(-1)
        part = torch.dot(b64, b64)
        sq += part
        # a float32² sum cannot overflow float64, so it is finite exactly when the block is; float64
        # weights above 1e154 would overflow it, so they are checked one by one (float64 is rare)
        finite_b &= torch.isfinite(bb).all() if work == torch.float64 else torch.isfinite(part)
        d = delta[r : r + rows]
        torch.sub(tb, bb, out=d)
        delta_ok &= torch.isfinite(d.sum())  # NaN/Inf in tuned reach the sum (isfinite() per element is 5× slower)
    base_ok, sums_ok = torch.stack([finite_b, delta_ok]).tolist()  # one sync per matrix
    bad = [] if base_ok else ["base"]
    if not sums_ok:  # rare: tuned or base is not finite, or a sum overflowed; look closely
        # (fp8 has no isfinite on the CPU: upcast each block)
        if not all(bool(torch.isfinite(t[r : r + rows].float()).all()) for r in range(0, t.shape[0], rows)):
            bad.append("tuned")
        elif base_ok and not all(bool(torch.isfinite(delta[r : r + rows]).all()) for r in range(0, delta.shape[0], rows)):
            bad.append("overflow")  # both sides finite, their difference is not
    return delta, float(sq.item()) ** 0.5, bad


def _pair_bytes(task: _Task, base: Checkpoint, tuned: Checkpoint, keep_base: bool = False) -> tuple[int, int]:
    """Memory of one tensor pair in flight, bytes, as ``(loaded, formed)``: both tensors as loaded
    (a quantised weight with a scale comes back float32), and what is formed from them: ΔW of each
    unit (float64 when a side is stored in float64, else float32) and, with ``keep_base``, a copy of
    W_base in that dtype."""
    pair = task.pair

    def loaded(ckpt: Checkpoint, name: str, info: TensorInfo) -> int:
        return math.prod(info.shape) * 4 if name in ckpt.scales else info.nbytes

    item = 8 if "float64" in (pair.base_info.dtype, pair.tuned_info.dtype) else 4
    formed = sum(item * u.shape[0] * u.shape[1] for u in task.units) * (2 if keep_base else 1)
    return loaded(base, pair.base.name, pair.base_info) + loaded(tuned, pair.tuned.name, pair.tuned_info), formed


@dataclass(frozen=True)
class _Settings:
    """How a run uses memory and threads on its device (defaults resolved from :class:`DiffConfig`)."""

    batch_bytes: int  # cap of one batch of ΔW (collected) and of the engine's chunks
    depth: int  # tensor pairs read ahead
    workers: int  # reader threads
    ahead_bytes: int | None  # cap of the pairs in flight (on CUDA: the ΔW formed on the device)


def _settings(config: DiffConfig, device: torch.device) -> _Settings:
    """Resolve the memory and thread defaults: on CUDA, 45% of free memory for a batch and a quarter
    for reading ahead (ΔW is formed on the GPU), 8 pairs ahead and up to 4 readers; on the CPU a
    256 MiB batch, one pair ahead and one reader (the engine's BLAS already uses every core)."""
    cuda = device.type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if cuda else 0
    batch = config.max_batch_bytes if config.max_batch_bytes is not None else (int(0.45 * free) if cuda else batch_budget(device))
    ahead = config.prefetch_bytes if config.prefetch_bytes is not None else (int(0.25 * free) if cuda else None)
    return _Settings(
        batch_bytes=batch,
        depth=config.prefetch if config.prefetch is not None else (8 if cuda else 1),
        workers=config.read_workers or (min(4, os.cpu_count() or 1) if cuda else 1),
        ahead_bytes=ahead,
    )


def _prefetch(tasks: list[_Task], base: Checkpoint, tuned: Checkpoint, depth: int, workers: int,
              device: torch.device, keep_base: bool = False, max_bytes: int | None = None) -> Iterator[_Prepared]:
    """Yield prepared units in plan order while ``workers`` threads read up to ``depth`` tensor
    pairs ahead, and no more than ``max_bytes`` of them (:func:`_pair_bytes`: what the pair formed
    on the GPU, or everything it holds on the CPU; one pair always goes).

    Reading (positioned reads release the GIL) and forming ΔW overlap with the decomposition of the
    previous batch; the two caps bound the memory this takes, whatever the model: on a GPU, where ΔW
    is formed on the device, a 405B model's embedding pair alone is 17 GB. A reader's exception is
    re-raised here, in order.
    """
    if depth <= 0:
        for task in tasks:
            yield from _prepare(task, base, tuned, device, keep_base)
        return
    todo = deque(tasks)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="spectra-read") as pool:
        pending: deque = deque()
        in_flight = 0

        def cost(task: _Task) -> int:
            loaded, formed = _pair_bytes(task, base, tuned, keep_base)
            return formed if device.type == "cuda" else loaded + formed

        def fill() -> None:
            nonlocal in_flight
            while todo and len(pending) < depth:
                nbytes = cost(todo[0])
                if pending and max_bytes is not None and in_flight + nbytes > max_bytes:
                    return
                in_flight += nbytes
                pending.append((pool.submit(_prepare, todo.popleft(), base, tuned, device, keep_base), nbytes))

        try:
            fill()
            while pending:
                fut, nbytes = pending.popleft()
                items = fut.result()
                in_flight -= nbytes
                fill()
                yield from items
        finally:
            for fut, _ in pending:
                fut.cancel()


def _batches(prepared: Iterator[_Prepared], shapes: list[tuple[int, int]], max_count: int, max_bytes: int) -> Iterator[list[_Prepared]]:
    """Group consecutive equally shaped units; skipped units travel alone.

    ``shapes`` is the planned shape of every unit in stream order: a batch is closed as soon as the
    next unit cannot join it, before that unit is read, so no ΔW waits in memory for its batch.
    """
    batch: list[_Prepared] = []
    size = 0
    for i, item in enumerate(prepared):
        if item.delta is None:
            yield [item]
            continue
        batch.append(item)
        size += item.delta.numel() * 4
        nxt = shapes[i + 1] if i + 1 < len(shapes) else None
        if nxt != item.unit.shape or len(batch) >= max_count or size + nxt[0] * nxt[1] * 4 > max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _results(batch: list[_Prepared], config: DiffConfig, device: torch.device, dtype: torch.dtype) -> list[tuple[ModuleResult | None, Skipped | None]]:
    """Decompose one batch and turn each spectrum into a result."""
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
        return [(_approx_result(item, a, config, seconds), None) for item, a in zip(batch, approx)]
    S_all = batch_singular_values([item.delta for item in batch], device=device, method=config.method,
                                  dtype=dtype, max_batch_bytes=config.max_batch_bytes)
    seconds = (time.perf_counter() - start) / len(batch)
    weights: list[tuple[list[float] | None, list[float] | None]] = [(None, None)] * len(batch)
    if config.weight_spectra:
        bases = [item.base for item in batch]
        S_b = batch_singular_values(bases, device=device, method=config.method, dtype=dtype, max_batch_bytes=config.max_batch_bytes)
        for item in batch:  # W_tuned = W_base + ΔW, in place in the private upcast copy of W_base
            item.base += item.delta
        S_t = batch_singular_values(bases, device=device, method=config.method, dtype=dtype, max_batch_bytes=config.max_batch_bytes)
        del bases
        weights = [([float(x) for x in sb[: config.top_k]], [float(x) for x in st[: config.top_k]]) for sb, st in zip(S_b, S_t)]
    _release(batch)
    return [(_exact_result(item, S, config, seconds, *w), None) for item, S, w in zip(batch, S_all, weights)]


def _release(batch: list[_Prepared]) -> None:
    """Drop the ΔW tensors of a decomposed batch now: generator and loop variables still hold the
    batch while the next tensors are read, and a large embedding's ΔW is hundreds of MB."""
    for item in batch:
        item.delta = None
        item.base = None


def _common(item: _Prepared, config: DiffConfig) -> dict:
    """The fields every result has, whichever path computed it."""
    pair, unit = item.task.pair, item.unit
    return dict(
        name=unit.name, layer=pair.tuned.layer, module=unit.module, role=pair.tuned.role, expert=unit.expert,
        shape=list(unit.shape), base_fro_norm=item.base_fro, random_energy_rank=random_ranks(unit.shape, config),
        dtype=f"{pair.base_info.dtype}/{pair.tuned_info.dtype}",
        note="; ".join(n for n in (pair.note, pair.tuned.note, item.note) if n),
    )


def spectrum_fields(S: np.ndarray, shape: tuple[int, int], config: DiffConfig, base_fro: float | None) -> dict:
    """The :class:`ModuleResult` fields that follow from the full spectrum ``S`` (descending, length p)
    of a ``shape`` update and ``‖W_base‖_F`` (None when there is no base)."""
    m = spectrum_metrics(S, shape, config.thresholds)
    keys = [threshold_key(tau) for tau in config.thresholds]
    return dict(
        fro_norm=m.fro_norm, rel_norm=relative_norm(m.fro_norm, base_fro) if base_fro is not None else None,
        spectral_norm=m.spectral_norm, nuclear_norm=m.nuclear_norm, stable_rank=m.stable_rank,
        effective_rank=m.effective_rank, signal_rank=m.signal_rank,
        energy_rank={k: m.energy_rank[tau] for k, tau in zip(keys, config.thresholds)},
        energy_rank_frac={k: m.energy_rank_frac[tau] for k, tau in zip(keys, config.thresholds)},
        singular_values=[float(s) for s in S[: config.top_k]],
    )


def random_ranks(shape: tuple[int, int], config: DiffConfig) -> dict[str, int]:
    """Threshold key -> energy rank of a Gaussian matrix of ``shape`` (Marchenko–Pastur)."""
    return {threshold_key(tau): random_energy_rank(shape, tau) for tau in config.thresholds}


def _exact_result(item: _Prepared, S: np.ndarray, config: DiffConfig, seconds: float,
                  base_sv: list[float] | None = None, tuned_sv: list[float] | None = None) -> ModuleResult:
    return ModuleResult(
        **_common(item, config), **spectrum_fields(S, item.unit.shape, config, item.base_fro),
        method=f"{config.method}/{config.precision}", seconds=seconds,
        base_singular_values=base_sv, tuned_singular_values=tuned_sv,
    )


def _approx_result(item: _Prepared, a: ApproxSpectrum, config: DiffConfig, seconds: float) -> ModuleResult:
    p = min(item.unit.shape)
    keys = [threshold_key(tau) for tau in config.thresholds]
    sigma1 = float(a.top[0]) if a.top.size else 0.0
    fields = _common(item, config)
    fields["note"] = "; ".join(n for n in (fields["note"], "approximate: energy ranks lie within energy_rank_bounds; "
                                           "nuclear norm, effective and signal rank need the full spectrum") if n)
    return ModuleResult(
        **fields,
        fro_norm=a.fro_norm, rel_norm=relative_norm(a.fro_norm, item.base_fro), spectral_norm=sigma1,
        stable_rank=(a.fro_norm**2 / sigma1**2) if sigma1 > 0 else 0.0, effective_rank=None, nuclear_norm=None,
        signal_rank=None,
        energy_rank={k: a.ranks[tau].estimate for k, tau in zip(keys, config.thresholds)},
        energy_rank_frac={k: a.ranks[tau].estimate / p for k, tau in zip(keys, config.thresholds)},
        energy_rank_bounds={k: [a.ranks[tau].lo, a.ranks[tau].hi] for k, tau in zip(keys, config.thresholds)},
        singular_values=[float(s) for s in a.top[: config.top_k]],
        method=f"approx/sketch{a.sketch}", seconds=seconds,
    )


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
    """Spectrum metrics of ΔW = W_tuned − W_base for every paired matrix (SPEC.md).

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
        >>> res.summary()[0]["energy_rank"]                       # doctest: +SKIP
    """
    config = config or DiffConfig()
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
    from spectra.adapter_diff import diff_adapter
    from spectra.io.adapter import is_adapter, open_adapter

    t0 = time.perf_counter()
    dtype = torch.float64 if config.precision == "float64" else torch.float32
    lead = ctx is None or ctx.rank == 0  # the rank that writes and reports
    writer = _Writer(Path(out_dir)) if out_dir is not None and lead else None
    callback = callback if lead else None
    adapter_path = tuned if tuned is not None else base
    if not isinstance(adapter_path, Checkpoint) and is_adapter(adapter_path):
        base_ckpt = None
        if tuned is not None:
            base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
        result = diff_adapter(base_ckpt, open_adapter(adapter_path), config=config, device=device, dtype=dtype,
                              callback=callback, writer=writer, label_base=base_ckpt.label if base_ckpt else None,
                              label_tuned=str(adapter_path))
    elif tuned is None:
        raise ConfigError(f"{base} is not a PEFT adapter folder; a single input must be an adapter",
                          hint="pass BASE and TUNED to diff two checkpoints")
    else:
        base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
        tuned_ckpt = tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned)
        if resume and out_dir is None:
            raise ConfigError("resume needs the output folder of the interrupted run", hint="pass --out DIR with --resume")
        result = _diff_checkpoints(base_ckpt, tuned_ckpt, config, device, dtype, writer, callback, resume, ctx)
    result.complete = True
    result.elapsed_s = time.perf_counter() - t0
    if all_zero(result):
        result.warnings.append("every analysed ΔW is exactly zero: base and tuned hold the same weights")
    if writer:
        writer.finish(result, plots=plots)
    if not allow_identical:
        raise_if_identical(result, out_dir)
    return result


def all_zero(result: DiffResult) -> bool:
    """True when results exist and every analysed ΔW is exactly zero."""
    return bool(result.modules) and all(m.fro_norm == 0.0 for m in result.modules)


def raise_if_identical(result: DiffResult, out_dir: str | Path | None = None) -> None:
    """Raise :class:`IdenticalCheckpointsError` when every analysed ΔW is exactly zero."""
    if all_zero(result):
        raise IdenticalCheckpointsError(
            f"every one of the {len(result.modules)} analysed matrices has ΔW = 0: base and tuned hold the same weights",
            path=f"{result.base} vs {result.tuned}",
            hint="check that you passed the fine-tuned checkpoint; --allow-identical accepts this"
            + (f"; results were still written to {out_dir}" if out_dir else ""),
        )


def _absorb(result: DiffResult, records: list[dict]) -> set[str]:
    """Add journal records (``{"module": …}`` / ``{"skipped": …}``) to ``result``; their names."""
    names = set()
    known = set(ModuleResult.__dataclass_fields__)
    for rec in records:
        if "module" in rec:
            result.modules.append(ModuleResult(**{k: v for k, v in rec["module"].items() if k in known}))
            names.add(rec["module"]["name"])
        elif "skipped" in rec:
            result.skipped.append(rec["skipped"])
            names.add(rec["skipped"]["name"])
    return names


def _task_seconds(task: _Task, cost: CostModel, config: DiffConfig) -> tuple[float, float]:
    """Estimated seconds of one tensor pair: ``(reading both sides and forming ΔW, decomposing its
    units)``; three decompositions per unit with ``weight_spectra``."""
    work = 3 if config.weight_spectra else 1
    return cost.io_seconds(task.pair.stored_bytes), sum(work * cost.matrix_seconds(u.shape) for u in task.units)


def _diff_checkpoints(base_ckpt: Checkpoint, tuned_ckpt: Checkpoint, config: DiffConfig, device: torch.device,
                      dtype: torch.dtype, writer: "_Writer | None", callback: Callable[[DiffEvent], None] | None,
                      resume: bool = False, ctx: DistContext | None = None) -> DiffResult:
    """The streaming, batched run over two full checkpoints (see the module docstring).

    With ``ctx`` (a distributed run) every rank plans the same work, takes its cost-balanced share
    of the tensor pairs, and hands its results to a background exchange after each of ``rounds``
    segments of equal cost (:class:`spectra.distributed.Exchanger`), collecting the others' between
    batches; every rank returns the whole result, and only rank 0 has a ``writer``.
    """
    pairing = pair_checkpoints(base_ckpt, tuned_ckpt)
    planned = _plan(pairing.pairs, config)
    order = {u.name: u.order for t in planned for u in t.units}
    result = DiffResult(
        base=base_ckpt.label, tuned=tuned_ckpt.label, thresholds=list(config.thresholds),
        skipped=[asdict(s) for s in pairing.skipped],
        unmatched={"base_only": pairing.base_only, "tuned_only": pairing.tuned_only},
        config=asdict(config), device=str(device), version=__version__,
    )
    result.fingerprint = run_fingerprint(base_ckpt, tuned_ckpt, config)
    if ctx is None:
        finished = writer.start(result, resume=resume) if writer else []
    else:  # only rank 0 reads the journal; the others learn what is done, or why it was refused
        refused = None
        try:
            mine = ("ok", writer.start(result, resume=resume) if writer else [])
        except SpectraError as exc:
            refused, mine = exc, ("error", str(exc))
        status, payload = distributed.broadcast(ctx, mine, where="reading the journal")
        if refused is not None:
            raise refused
        if status == "error":
            raise ConfigError(f"rank 0 refused the run: {payload}")
        finished = payload
    names = _absorb(result, finished)
    tasks = []
    for t in planned:
        left = [u for u in t.units if u.name not in names]
        if left:
            tasks.append(_Task(t.pair, left))
    done = len(names)
    total = done + sum(len(t.units) for t in tasks)
    rounds, ends = 0, []
    if ctx is not None:
        cost = CostModel.default(device)
        costs = [sum(_task_seconds(t, cost, config)) for t in tasks]
        shares = balance(costs, ctx.world_size)
        tasks = [tasks[i] for i in shares[ctx.rank]]  # stays in shape order: batching works as before
        rounds = max(1, min(_ROUNDS, max(len(s) for s in shares)))  # the same on every rank
        unit_costs = [c / len(t.units) for t, c in zip(tasks, (costs[i] for i in shares[ctx.rank])) for _ in t.units]
        ends = segment_ends(unit_costs, rounds)
    run = _settings(config, device)
    budget = run.batch_bytes
    prepared = _prefetch(tasks, base_ckpt, tuned_ckpt, run.depth, run.workers, device, config.weight_spectra, run.ahead_bytes)
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

    exchanger = distributed.Exchanger(ctx, rounds, device) if ctx is not None else None

    def collect(wait: bool = False) -> None:  # results the other ranks finished
        for module, skip in exchanger.receive(wait=wait):
            record(module, skip)

    try:
        shapes = [u.shape for t in tasks for u in t.units]
        k = 0
        for batch in _batches(prepared, shapes, config.max_batch, budget):
            for module, skip in _results(batch, config, device, dtype):
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
    result.skipped.sort(key=lambda s: order.get(s["name"], -1))  # pairing skips first, then layer order
    result.warnings.extend(f"{s['name']}: {s['reason']}" for s in result.skipped if s["name"] in order)
    return result


#: DiffConfig fields that change the numbers a run writes (the others only change how it runs).
_RESULT_FIELDS = ("thresholds", "include", "exclude", "layers", "top_k", "method", "precision", "split_fused",
                  "approx", "approx_above", "approx_tol", "seed", "weight_spectra")


def run_fingerprint(base: Checkpoint, tuned: Checkpoint, config: DiffConfig) -> str:
    """A hash of the inputs (tensor names, shapes, dtypes, offsets; file sizes and modification
    times) and of the result-affecting options: a journal is resumed only under the same one."""
    h = hashlib.sha256(json.dumps({k: getattr(config, k) for k in _RESULT_FIELDS}, sort_keys=True, default=list).encode())
    for ckpt in (base, tuned):
        files = sorted({str(t.file) for t in ckpt.tensors.values()})
        h.update(json.dumps([ckpt.label, [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files],
                             sorted((n, list(t.shape), t.dtype, t.entry.start if t.entry else -1) for n, t in ckpt.tensors.items())]).encode())
    return h.hexdigest()[:16]


def _oriented(w: torch.Tensor, transpose: bool, rows: int | None) -> torch.Tensor:
    """A view of ``w`` in ``(…, out, in)`` orientation (each side by its own storage layout),
    restricted to the shared leading rows; stored dtype (upcast block by block in :func:`_delta`)."""
    if transpose:
        w = w.mT
    if rows is not None:
        w = w[..., :rows, :]
    return w


class _Writer:
    """Journal each result to ``results.jsonl`` at once; fold into ``results.json`` periodically."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.journal = out_dir / "results.jsonl"
        self.last = 0.0

    def start(self, result: DiffResult, *, resume: bool = False) -> list[dict]:
        """Begin a run; with ``resume``, return the journal's records of an earlier run with the same
        fingerprint (inputs and result-affecting options) and append to it, else start afresh.

        Raises:
            ConfigError: ``resume`` with no journal, or a journal from other inputs or options.
        """
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(self.out_dir, exc) from exc
        done: list[dict] = []
        if resume:
            previous = self.out_dir / "results.json"
            if not (self.journal.is_file() and previous.is_file()):
                raise ConfigError("nothing to resume: no results.jsonl and results.json", path=self.out_dir,
                                  hint="run without --resume first")
            try:
                old = json.loads(previous.read_text(encoding="utf-8")).get("fingerprint")
            except (OSError, json.JSONDecodeError):
                old = None
            if old != result.fingerprint:
                raise ConfigError("the journal here comes from different inputs or options", path=self.out_dir,
                                  hint="pass the same BASE, TUNED and options, or run without --resume into a new folder")
            for line in self.journal.read_text(encoding="utf-8").splitlines():
                try:
                    done.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a kill: that matrix is recomputed
            # rewrite the journal with the whole records only, so the next append starts on a new line
            atomic_write_text(self.journal, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
        else:
            atomic_write_text(self.journal, "")
        result.save_json(self.out_dir / "results.json")
        self.last = time.monotonic()
        return done

    def add(self, result: DiffResult, module: ModuleResult | None, skipped: Skipped | None) -> None:
        record = {"module": asdict(module)} if module is not None else {"skipped": asdict(skipped)}
        try:
            with open(self.journal, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        except OSError as exc:  # the journal keeps every line written before this one
            raise output_error(self.journal, exc) from exc
        if time.monotonic() - self.last >= _REWRITE_EVERY_S:
            result.save_json(self.out_dir / "results.json")
            self.last = time.monotonic()

    def flush(self, result: DiffResult) -> None:
        """Write ``results.json`` now (``complete`` stays False on an interrupted run)."""
        result.save_json(self.out_dir / "results.json")

    def finish(self, result: DiffResult, *, plots: bool) -> None:
        result.save(self.out_dir, plots=plots)
        atomic_write_text(self.out_dir / "diff_config.json", json.dumps(result.config, indent=2, sort_keys=True) + "\n")


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
    from spectra.io.adapter import is_adapter

    config = config or DiffConfig()
    if any(not isinstance(x, Checkpoint) and is_adapter(x) for x in (base, tuned)):
        raise ConfigError("--plan prices checkpoint pairs; a PEFT adapter is analysed from its factors in seconds",
                          hint="run without --plan")
    device = resolve_device(config.device)
    check_device_available(device)
    base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    tuned_ckpt = tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned)
    pairing = pair_checkpoints(base_ckpt, tuned_ckpt)
    tasks = _plan(pairing.pairs, config)
    cost = CostModel.default(device)
    if calibrate_cost:
        probe = None
        if tasks:  # one real pair, the one nearest 32 MiB, read and subtracted as the run will
            task = min(tasks, key=lambda t: abs(t.pair.stored_bytes - (32 << 20)))
            probe = (lambda: _prepare(task, base_ckpt, tuned_ckpt, device), task.pair.stored_bytes)
        cost = calibrate(device, config.precision, io_probe=probe)
    io, compute = zip(*(_task_seconds(t, cost, config) for t in tasks)) if tasks else ((), ())
    shares = balance([a + b for a, b in zip(io, compute)], world_size)
    slowest = max(shares, key=lambda s: sum(io[i] + compute[i] for i in s))
    shapes: dict[tuple[int, int], int] = {}
    for t in tasks:
        for u in t.units:
            shapes[u.shape] = shapes.get(u.shape, 0) + 1
    run = _settings(config, device)
    host, on_device = estimate_memory(
        [(*_pair_bytes(t, base_ckpt, tuned_ckpt, config.weight_spectra), [u.shape for u in t.units]) for t in tasks],
        depth=run.depth, batch_bytes=run.batch_bytes, max_batch=config.max_batch,
        dtype=torch.float64 if config.precision == "float64" else torch.float32, method=config.method,
        on_gpu=device.type == "cuda", max_in_flight=run.ahead_bytes, workers=run.workers)
    approx = sum(n for s, n in shapes.items() if config.approx or (config.approx_above is not None and min(s) > config.approx_above))
    notes = ["memory is the data's; the allocator keeps some freed memory on top (40-80 MiB in tests/test_scale.py)"]
    if approx:
        notes.append(f"{approx} matrices use the approximate mode (priced as exact: an upper estimate)")
    return Plan(
        matrices=sum(shapes.values()), tensors=len(tasks),
        read_bytes=sum(t.pair.stored_bytes for t in tasks), shapes=shapes,
        world_size=world_size, rank_seconds=[sum(io[i] + compute[i] for i in s) for s in shares],
        io_seconds=sum(io[i] for i in slowest), compute_seconds=sum(compute[i] for i in slowest),
        host_bytes=host, device_bytes=on_device, baseline_bytes=peak_rss_bytes(), cost=cost, approx=approx, notes=notes,
    )
