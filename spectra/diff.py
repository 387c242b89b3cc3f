"""``spectra diff``: the spectrum of ΔW = W_tuned − W_base for every paired matrix.

The run streams: one pair of tensors is read, ΔW formed in float32 (SPEC.md: never subtract in
bf16/fp16), split into its logical parts, decomposed and reduced to metrics before the next pair is
read, so memory is bounded by a few tensors. Each result is reported through a callback as it is
computed and, with ``out_dir``, journaled to ``results.jsonl`` at once and folded into
``results.json`` every few seconds, so an interrupted run loses at most one matrix.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from spectra import __version__
from spectra.errors import ConfigError, IdenticalCheckpointsError
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.linalg import fro_norm, resolve_device, singular_values
from spectra.metrics import DEFAULT_THRESHOLDS, spectrum_metrics
from spectra.naming import Part
from spectra.pairing import MatrixPair, Skipped, pair_checkpoints
from spectra.randmat import random_energy_rank
from spectra.results import DiffResult, ModuleResult, atomic_write_text, threshold_key

#: results.json is rewritten at most this often during a run (the journal has every result at once).
_REWRITE_EVERY_S = 5.0


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

    def __post_init__(self) -> None:
        if not self.thresholds or any(not (0.0 < float(t) <= 1.0) for t in self.thresholds):
            raise ConfigError(f"thresholds must each be in (0, 1]. Got {list(self.thresholds)} instead")
        object.__setattr__(self, "thresholds", tuple(sorted({float(t) for t in self.thresholds})))
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"--{name} must be a valid regular expression. Got {pattern!r} instead ({exc})") from None
        if self.layers is not None:
            parse_layers(self.layers)
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0. Got {self.top_k} instead")
        if self.method not in ("gram", "svd"):
            raise ConfigError(f"method must be 'gram' or 'svd'. Got {self.method!r} instead")
        if self.precision not in ("float64", "float32"):
            raise ConfigError(f"precision must be 'float64' or 'float32'. Got {self.precision!r} instead")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N. Got {self.device!r} instead")


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


@dataclass
class _Task:
    pair: MatrixPair
    units: list[tuple[str, int | None, str, torch.Tensor | None, str]] = field(default_factory=list)
    # (result name, expert, part suffix, rows, module label)


def _plan(pairs: list[MatrixPair], config: DiffConfig) -> list[_Task]:
    """Expand pairs into units (parts × experts) and apply the filters."""
    inc = re.compile(config.include) if config.include else None
    exc = re.compile(config.exclude) if config.exclude else None
    layer_ok = parse_layers(config.layers) if config.layers else None
    tasks = []
    for pair in pairs:
        spec = pair.tuned
        ndim = len(pair.tuned_info.shape)
        experts = range(pair.tuned_info.shape[0]) if ndim == 3 else [spec.expert]
        parts = spec.parts if config.split_fused else (Part(""),)
        task = _Task(pair)
        for e in experts:
            for part in parts:
                name = spec.name + (f":e{e}" if ndim == 3 else "") + (f":{part.suffix}" if part.suffix else "")
                module = spec.module + (f":{part.suffix}" if part.suffix else "")
                if layer_ok is not None and (spec.layer is None or not layer_ok(spec.layer)):
                    continue  # outside the asked layers: not analysed, not worth a skipped entry
                if (inc and not inc.search(name)) or (exc and exc.search(name)):
                    continue
                task.units.append((name, e, part.suffix, part.rows, module))
        if task.units:
            tasks.append(task)
    return tasks


def diff(
    base: str | Checkpoint,
    tuned: str | Checkpoint,
    *,
    config: DiffConfig | None = None,
    out_dir: str | Path | None = None,
    callback: Callable[[DiffEvent], None] | None = None,
    plots: bool = True,
    allow_identical: bool = True,
) -> DiffResult:
    """Spectrum metrics of ΔW = W_tuned − W_base for every paired matrix (SPEC.md).

    Args:
        base: the base checkpoint (path, folder, index, ``.bin``, hub cache id) or an opened one.
        tuned: the fine-tuned checkpoint, likewise.
        config: options; :class:`DiffConfig` defaults when None.
        out_dir: if given, ``results.json``/``results.jsonl`` are written there as results come in,
            then ``results.csv`` and the heatmaps at the end.
        callback: called with a :class:`DiffEvent` after each matrix (progress bars, logging).
        plots: write the heatmaps into ``out_dir``.
        allow_identical: if False, raise :class:`IdenticalCheckpointsError` (after writing the
            results) when every analysed ΔW is exactly zero.

    Returns:
        A :class:`DiffResult` with ``complete=True``.

    Example:
        >>> res = diff("base.safetensors", "tuned.safetensors")   # doctest: +SKIP
        >>> res.summary()[0]["energy_rank"]                       # doctest: +SKIP
    """
    config = config or DiffConfig()
    t0 = time.perf_counter()
    base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    tuned_ckpt = tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned)
    device = resolve_device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available", hint="use --device cpu or auto")
    dtype = torch.float64 if config.precision == "float64" else torch.float32
    pairing = pair_checkpoints(base_ckpt, tuned_ckpt)
    tasks = _plan(pairing.pairs, config)
    result = DiffResult(
        base=base_ckpt.label, tuned=tuned_ckpt.label, thresholds=list(config.thresholds),
        skipped=[asdict(s) for s in pairing.skipped],
        unmatched={"base_only": pairing.base_only, "tuned_only": pairing.tuned_only},
        config=asdict(config), device=str(device), version=__version__,
    )
    total = sum(len(t.units) for t in tasks)
    writer = _Writer(Path(out_dir)) if out_dir is not None else None
    if writer:
        writer.start(result)
    done = 0
    for task in tasks:
        for event_result, event_skip in _run_task(task, base_ckpt, tuned_ckpt, config, device, dtype):
            done += 1
            if event_result is not None:
                result.modules.append(event_result)
            else:
                result.skipped.append(asdict(event_skip))
                result.warnings.append(f"{event_skip.name}: {event_skip.reason}")
            if writer:
                writer.add(result, event_result, event_skip)
            if callback:
                callback(DiffEvent(done, total, event_result, event_skip))
    result.complete = True
    result.elapsed_s = time.perf_counter() - t0
    zero = bool(result.modules) and all(m.fro_norm == 0.0 for m in result.modules)
    if zero:
        result.warnings.append("every analysed ΔW is exactly zero: base and tuned hold the same weights")
    if writer:
        writer.finish(result, plots=plots)
    if zero and not allow_identical:
        raise IdenticalCheckpointsError(
            f"every one of the {len(result.modules)} analysed matrices has ΔW = 0: base and tuned hold the same weights",
            path=f"{base_ckpt.label} vs {tuned_ckpt.label}",
            hint="check that you passed the fine-tuned checkpoint" + (f"; results were still written to {out_dir}" if out_dir else ""),
        )
    return result


def _run_task(task: _Task, base: Checkpoint, tuned: Checkpoint, config: DiffConfig, device: torch.device, dtype: torch.dtype):
    """Yield ``(ModuleResult, None)`` or ``(None, Skipped)`` for each unit of one pair."""
    pair = task.pair
    wb = _oriented(base.load(pair.base.name), pair)
    wt = _oriented(tuned.load(pair.tuned.name), pair)
    for name, expert, _suffix, rows, module in task.units:
        b = wb[expert] if wb.ndim == 3 else wb
        t = wt[expert] if wt.ndim == 3 else wt
        if rows is not None:
            b, t = b[rows], t[rows]
        bad = [side for side, w in (("base", b), ("tuned", t)) if not bool(torch.isfinite(w).all())]
        if bad:
            yield None, Skipped(name, f"{' and '.join(bad)} weights contain NaN or Inf; ΔW is undefined")
            continue
        start = time.perf_counter()
        delta = (t - b).to(device)  # float32 subtraction of float32 upcasts (SPEC.md)
        S = singular_values(delta, method=config.method, dtype=dtype)
        seconds = time.perf_counter() - start
        shape = (int(delta.shape[0]), int(delta.shape[1]))
        m = spectrum_metrics(S, shape, config.thresholds)
        base_fro = fro_norm(b)
        keys = [threshold_key(tau) for tau in config.thresholds]
        yield ModuleResult(
            name=name,
            layer=pair.tuned.layer,
            module=module,
            role=pair.tuned.role,
            expert=expert if expert is not None else pair.tuned.expert,
            shape=list(shape),
            fro_norm=m.fro_norm,
            base_fro_norm=base_fro,
            rel_norm=(m.fro_norm / base_fro) if base_fro > 0 else (0.0 if m.fro_norm == 0 else None),
            spectral_norm=m.spectral_norm,
            nuclear_norm=m.nuclear_norm,
            stable_rank=m.stable_rank,
            effective_rank=m.effective_rank,
            signal_rank=m.signal_rank,
            energy_rank={k: m.energy_rank[tau] for k, tau in zip(keys, config.thresholds)},
            energy_rank_frac={k: m.energy_rank_frac[tau] for k, tau in zip(keys, config.thresholds)},
            random_energy_rank={k: random_energy_rank(shape, tau) for k, tau in zip(keys, config.thresholds)},
            singular_values=[float(s) for s in S[: config.top_k]],
            dtype=f"{pair.base_info.dtype}/{pair.tuned_info.dtype}",
            method=f"{config.method}/{config.precision}",
            seconds=seconds,
            note="; ".join(n for n in (pair.note, pair.tuned.note) if n),
        ), None


def _oriented(w: torch.Tensor, pair: MatrixPair) -> torch.Tensor:
    """float32, ``(…, out, in)``, restricted to the shared rows."""
    w = w.to(torch.float32)
    if pair.tuned.transpose:
        w = w.mT
    if pair.rows is not None:
        w = w[..., : pair.rows, :]
    return w


class _Writer:
    """Journal each result to ``results.jsonl`` at once; fold into ``results.json`` periodically."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.journal = out_dir / "results.jsonl"
        self.last = 0.0

    def start(self, result: DiffResult) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.journal.write_text("", encoding="utf-8")
        result.save_json(self.out_dir / "results.json")
        self.last = time.monotonic()

    def add(self, result: DiffResult, module: ModuleResult | None, skipped: Skipped | None) -> None:
        record = {"module": asdict(module)} if module is not None else {"skipped": asdict(skipped)}
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        if time.monotonic() - self.last >= _REWRITE_EVERY_S:
            result.save_json(self.out_dir / "results.json")
            self.last = time.monotonic()

    def finish(self, result: DiffResult, *, plots: bool) -> None:
        result.save(self.out_dir, plots=plots)
        atomic_write_text(self.out_dir / "diff_config.json", json.dumps(result.config, indent=2, sort_keys=True) + "\n")
