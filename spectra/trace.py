"""``spectra trace BASE RUN_DIR`` (or ``BASE CKPT1 CKPT2 …``): how ΔW evolves over a training run.

For every matrix and checkpoint: the spectrum metrics of ``ΔW_t = W_t − W_base`` (energy ranks,
‖ΔW‖_F and ‖ΔW‖_F/‖W_base‖_F, σ₁, σ₁/σ₂, stable and effective rank; for LoRA the effective rank of
``s·B·A`` against r), and how far the update's top-k singular subspaces turned since the previous
checkpoint and since the first (principal angles, φ; the definitions document, "Subspaces").

Inputs: a run folder of Hugging Face Trainer ``checkpoint-N`` folders (full models or PEFT
adapters; step and loss from each ``trainer_state.json``), or checkpoints listed in order.

Streaming. Full checkpoints are traced matrix by matrix: the base tensor is read once, then the same
tensor of each checkpoint, so each file is read once, tensor by tensor, and memory holds one base
matrix, one ΔW and two top-k subspaces (first and previous) whatever the number of checkpoints.
Adapters are traced checkpoint by checkpoint (their factors are small): the base contributes only
‖W_base‖_F per matrix (each base tensor read once), and per module the first and previous top-k
subspaces are kept. ``--resume`` continues from the journal (``trace_journal.jsonl``).

The same per-matrix metrics are computed inside a training process by
:class:`spectra.callbacks.SpectraTracker`; its ``trace.jsonl`` loads with :func:`load_trace`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectra._version import __version__
from spectra.adapter_diff import adapter_updates, recorded_base_warning, saved_skips
from spectra.config import SharedOptions, check_thresholds, config_of, public_entry
from spectra.delta import form_delta, oriented, pair_floor, pair_notes
from spectra.errors import CheckpointFormatError, ConfigError, ResultsFormatError, SpectraError
from spectra.esd import power_law_fit
from spectra.interference import Subspaces, spectrum_and_top, subspace_turn, truncate
from spectra.io.checkpoint import Checkpoint, open_checkpoint, read_notes
from spectra.io.files import atomic_write_text, remove_earlier_outputs, same_file
from spectra.io.jsonfile import RESULTS_MAX_BYTES, load_json, parse_json, result_json
from spectra.io.paths import checkpoint_location
from spectra.journal import RecordJournal, run_identity
from spectra.linalg import check_device_available, resolve_device, singular_values
from spectra.metrics import DEFAULT_THRESHOLDS, relative_norm, spectrum_metrics, threshold_key
from spectra.naming import MatrixSpec
from spectra.numerics import unresolved_text
from spectra.pairing import ALIAS_REASON, PAIRING_NOTE_PREFIX, pair_by_base_names, refuse_lora_file
from spectra.pairing_notes import unpaired_matrices
from spectra.param_experts import open_adapter_on
from spectra.results import caveat_codes, points_caveat_note, rows_to_csv
from spectra.roles import role_sort_key
from spectra.selection import fused_whole_warning, refuse_empty_selection, selector
from spectra.subspaces import Factored
from spectra.ties import UNDETERMINED_TEXT, undetermined_cut
from spectra.trace_checks import (
    absent_warning,
    adapter_change_warnings,
    base_copy_warning,
    failed_checkpoint_warnings,
    gap_note,
    pairing_notes_text,
    run_warnings,
    size_warning,
    steps_text,
    unchanged_text,
    unpaired_warnings,
)
from spectra.trace_inputs import (
    CHECKPOINT_DIR,
    CheckpointRef,
    check_trace_matrix,
    check_trace_point,
    find_checkpoints,
    first_trace_records,
    open_weights,
    refuse_empty_plan,
)

SCHEMA = "spectra.trace/1"
JOURNAL = "trace_journal.jsonl"
#: A trace's own files (with its ``trace_*.png`` figures), removed before a new, not resumed, trace writes there.
TRACE_FILES = ("trace.json", "trace.csv", "report.html")
#: Singular values below this fraction of σ₁ are zero within the precision of the exact spectrum.
SIGMA_FLOOR = 1e-7


@dataclass(frozen=True)
class TraceConfig(SharedOptions):
    """Options of a trace (``spectra trace`` and :class:`spectra.callbacks.SpectraTracker`).

    Attributes:
        thresholds: energy-rank thresholds τ (each in (0, 1]).
        top_k: rank of the subspaces compared between checkpoints (``min(top_k, rank)``; a LoRA
            update of rank r <= top_k is compared whole). Small k keeps the angles about the
            directions that carry the update; 8 holds most of a fine-tuning update's energy in the
            demo's runs.
        keep_singular: top singular values stored per point.
        alpha: also fit WeightWatcher's power-law exponent α (:func:`spectra.esd.power_law_fit`, its
            default ``xmin="fit"``) to the eigenvalues σ² of each checkpoint's weight ``W_step`` and of
            ``W_base`` (full checkpoints only: one more exact eigensolve per matrix and checkpoint).
        include, exclude, layers, device: see :class:`spectra.config.SharedOptions`.
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    top_k: int = 8
    keep_singular: int = 8
    alpha: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "thresholds", check_thresholds(self.thresholds))
        if self.top_k < 1 or self.keep_singular < 0:
            raise ConfigError(f"top_k must be >= 1 and keep_singular >= 0. Got {self.top_k}, {self.keep_singular} instead")


# ---- per-point metrics (shared with spectra.callbacks) -------------------------------------------------
def point_metrics(S: np.ndarray, shape: tuple[int, int], base_fro: float | None, config: TraceConfig,
                  lora_r: int | None = None, floor: float = 0.0) -> dict[str, Any]:
    """The spectrum fields of one (matrix, step) point from ΔW's singular values ``S`` (any length holding every non-zero
    value; padded with zeros to ``p``). ``sigma_ratio`` (σ₁/σ₂) is None when σ₂ is at most ``SIGMA_FLOOR · σ₁`` (the float64
    Gram route's precision) or ``floor``, the stored weights' rounding floor (:func:`spectra.delta.pair_floor`): a ratio of
    a σ₂ that is zero within either is made of rounding (5.75e6 for a rank-1 float32 update)."""
    p = min(shape)
    S = np.sort(np.asarray(S, dtype=np.float64))[::-1][:p]
    full = np.pad(S, (0, p - S.size))
    m = spectrum_metrics(full, shape, config.thresholds)
    point = {
        "fro_norm": m.fro_norm, "rel_norm": relative_norm(m.fro_norm, base_fro) if base_fro is not None else None,
        "spectral_norm": m.spectral_norm,
        "sigma_ratio": float(full[0] / full[1]) if p > 1 and full[1] > max(SIGMA_FLOOR * full[0], floor) else None,
        "stable_rank": m.stable_rank, "effective_rank": m.effective_rank,
        "energy_rank": {threshold_key(t): m.energy_rank[t] for t in config.thresholds},
        "singular_values": [float(x) for x in full[: config.keep_singular]],
    }
    if lora_r:
        point["effective_rank_over_r"] = m.effective_rank / lora_r
        point["lora_r"] = int(lora_r)  # this checkpoint's r: the ratio's denominator, which a mixed list can change
    return point


def matrix_meta(spec: MatrixSpec, shape: tuple[int, int], base_fro: float | None, lora_r: int | None = None) -> dict[str, Any]:
    """The per-matrix fields of a trace (points are added beside them)."""
    return {"name": spec.name, "layer": spec.layer, "module": spec.module, "role": spec.role,
            "shape": [int(shape[0]), int(shape[1])], "base_fro_norm": base_fro, "lora_r": lora_r, "note": spec.note}


# ---- result ----------------------------------------------------------------------------------------------
@dataclass
class TraceResult:
    """What ``spectra trace`` computed; ``trace.json`` holds :meth:`to_dict` (README schema).

    Attributes:
        base, run: the inputs (run: the run folder, or None for a list of checkpoints).
        kind: ``"lora"`` or ``"full"``. thresholds, config: the options.
        checkpoints: the traced checkpoints in step order (:class:`CheckpointRef` fields).
        skipped_checkpoints: ``{"path", "reason"}`` for checkpoints left out.
        loss_history: ``{"step", "loss", …}`` from the run's logs, for the report.
        matrices: one record per matrix: ``name, layer, module, role, shape, base_fro_norm, lora_r,
            note`` and ``points``, one per checkpoint in the same order (``step`` and the metrics of
            :func:`point_metrics` plus ``turn_prev``/``turn_first`` from :func:`spectra.interference.subspace_turn`, or ``skip``;
            ``turn_note`` says why the turns are null when ΔW is non-zero but entirely at the rounding level of its stored weights,
            or which step ``turn_prev`` is from when the checkpoint before has no subspace for this matrix).
        skipped: ``{"name", "reason"}`` for matrices not traced.
    """

    base: str | None
    run: str | None
    kind: str
    thresholds: list[float]
    config: dict[str, Any]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    skipped_checkpoints: list[dict[str, str]] = field(default_factory=list)
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    matrices: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    complete: bool = False
    elapsed_s: float = 0.0
    device: str = ""
    version: str = __version__
    fingerprint: str = ""
    source: str = "spectra trace"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceResult:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"schema must be {SCHEMA!r}. Got {d.get('schema')!r} instead.")
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in fields})

    def rows(self) -> list[dict[str, Any]]:
        """CSV rows: one per (matrix, checkpoint), energy ranks and turns flattened."""
        steps = {i: c for i, c in enumerate(self.checkpoints)}
        out = []
        for m in self.matrices:
            for i, pt in enumerate(m["points"]):
                row = {k: m[k] for k in ("name", "layer", "module", "role", "lora_r")}
                row.update({"step": pt.get("step"), "loss": steps.get(i, {}).get("loss"), "skip": pt.get("skip", ""),
                            "turn_note": pt.get("turn_note", "")})
                for k, v in ((k, v) for k, v in pt.items() if k not in ("step", "skip", "singular_values")):
                    if k == "energy_rank":
                        row.update({f"energy_rank_{t}": r for t, r in v.items()})
                    elif k in ("turn_prev", "turn_first"):
                        for side in ("left", "right"):
                            for key in ("phi", "max_angle_deg"):
                                row[f"{k}_{side}_{key}"] = (v or {}).get(side, {}).get(key)
                    else:
                        row[k] = v
                out.append(row)
        return out

    def save(self, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write ``trace.json``, ``trace.csv`` and (``plots``) the figures into ``out_dir``."""
        out = Path(out_dir)
        files = {"json": atomic_write_text(out / "trace.json", result_json(jsonable(self.to_dict())) + "\n"),
                 "csv": atomic_write_text(out / "trace.csv", rows_to_csv(self.rows()))}
        if plots and self.matrices:
            from spectra.plots.trace import (
                save_trace_plots,  # matplotlib only when plotting
            )

            files.update(save_trace_plots(self.to_dict(), out))
        return files


def jsonable(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python (a JSON number is always a number)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def result_from_records(records: list[dict[str, Any]], *, base: str | None = None, run: str | None = None,
                        source: str = "spectra.callbacks") -> TraceResult:
    """A :class:`TraceResult` from the lines of a ``trace.jsonl`` written by :class:`spectra.callbacks.SpectraTracker`:
    ``{"header": {...}}``, ``{"skipped": {...}}``, ``{"warning": "..."}``, ``{"log": {"step", "loss", ...}}`` and
    one ``{"kind", "step", "loss", "matrix": meta, "point": point}`` per matrix and measurement."""
    records = first_trace_records(records)  # a repeated line: its (matrix, step)'s first kept, with a warning record
    recs = [r for r in records if isinstance(r, dict) and "matrix" in r and "point" in r]
    header = next((r["header"] for r in records if isinstance(r, dict) and isinstance(r.get("header"), dict)), {})
    logs = [r["log"] for r in records if isinstance(r, dict) and isinstance(r.get("log"), dict) and isinstance(r["log"].get("step"), int)]
    steps = sorted({int(r["step"]) for r in recs})
    losses: dict[int, float | None] = {}
    metas: dict[str, dict[str, Any]] = {}
    points: dict[str, dict[int, dict[str, Any]]] = {}
    for r in recs:
        losses.setdefault(int(r["step"]), r.get("loss"))
        metas.setdefault(r["matrix"]["name"], r["matrix"])
        points.setdefault(r["matrix"]["name"], {})[int(r["step"])] = {"step": int(r["step"]), **r["point"]}
    history = {h["step"]: h for h in logs}
    for s, loss in losses.items():
        if loss is not None:
            history.setdefault(s, {"step": s, "loss": loss})
    kind = recs[0].get("kind", "full") if recs else header.get("kind", "full")
    config = header.get("config", {})
    res = TraceResult(base=base, run=run, kind=kind, thresholds=list(config.get("thresholds", [])), config=config, source=source,
                      checkpoints=[asdict(CheckpointRef(f"step {s}", s, (history.get(s) or {}).get("loss"), kind, "in training"))
                                   for s in steps],  # the loss the Trainer logged at that step (records carry none)
                      loss_history=[history[s] for s in sorted(history)],
                      skipped=[r["skipped"] for r in records if isinstance(r, dict) and isinstance(r.get("skipped"), dict)],
                      warnings=[r["warning"] for r in records if isinstance(r, dict) and isinstance(r.get("warning"), str)])
    # seconds spent measuring and where (0 s and no device from a trace.jsonl written before these records)
    timings = [r["timing"] for r in records if isinstance(r, dict) and isinstance(r.get("timing"), dict)]
    res.elapsed_s = float(sum(t["seconds"] for t in timings if isinstance(t.get("seconds"), (int, float))))
    res.device = next((t["device"] for t in reversed(timings) if isinstance(t.get("device"), str)), "")
    if not res.thresholds:
        res.thresholds = sorted({float(t) for r in recs for t in r["point"].get("energy_rank", {})})
    for name in sorted(metas, key=lambda n: _order(metas[n])):
        pts = [points[name].get(s, {"step": s, "skip": "not measured"}) for s in steps]  # caveats: each point's own note
        res.matrices.append({**metas[name], "note": "; ".join(x for x in (metas[name].get("note"), points_caveat_note(pts)) if x), "points": pts})
    res.warnings += run_warnings(res.matrices)
    res.complete = True
    return res


def load_trace(path: str | Path) -> TraceResult:
    """Read ``trace.json`` (``spectra trace``) or ``trace.jsonl`` (:class:`spectra.callbacks.SpectraTracker`),
    or a folder holding one (strict JSON, :mod:`spectra.io.jsonfile`).

    Raises:
        ResultsFormatError: nothing readable there, or not a trace.
    """
    p = Path(path)
    if p.is_dir():
        p = next((p / n for n in ("trace.json", "trace.jsonl") if (p / n).is_file()), p / "trace.json")
    if p.suffix != ".jsonl":
        doc = load_json(p, what="trace.json", error=ResultsFormatError, max_bytes=RESULTS_MAX_BYTES)
        try:
            return TraceResult.from_dict(doc if isinstance(doc, dict) else {})
        except (TypeError, ValueError) as exc:
            raise ResultsFormatError(f"not a trace ({exc})", path=p, hint="pass trace.json, trace.jsonl or a folder holding one") from None
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsFormatError(f"cannot read trace.jsonl ({exc.__class__.__name__})", path=p) from None
    records, torn = [], []
    lines = text.removeprefix("\ufeff").split("\n")  # records are framed by "\n" alone: a name may hold U+2028
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(parse_json(line.encode("utf-8"), path=p, what="a trace.jsonl line", error=ResultsFormatError))
        except ResultsFormatError:
            if i < len(lines):  # not the line a running training is writing: a write cut short (a full disk), then more
                torn.append(i)
    result = result_from_records(records, run=str(p.parent))
    if torn:
        result.warnings.append(f"trace.jsonl line(s) {', '.join(map(str, torn[:5]))} are not valid JSON (a write cut short, e.g. by a "
                               "full disk): skipped, and the records after them read")
    return result


def _order(meta: dict[str, Any]) -> tuple:
    band = 0 if meta.get("role") in ("embed", "pos_embed") else (1 if meta.get("layer") is not None else 2)
    return (band, meta.get("layer") if meta.get("layer") is not None else -1,
            role_sort_key(meta.get("role"), meta.get("module") or ""), meta["name"])


# ---- the run -----------------------------------------------------------------------------------------------
@public_entry
def trace(
    base: str,
    paths: list[str],
    *,
    config: TraceConfig | None = None,
    out_dir: str | Path | None = None,
    callback: Callable[[int, int, str], None] | None = None,
    resume: bool = False,
    plots: bool = True,
) -> TraceResult:
    """Trace ΔW over a run's checkpoints (see the module docstring).

    Args:
        base: the checkpoint training started from.
        paths: ``[RUN_DIR]`` or checkpoints in order (:func:`find_checkpoints`).
        config: options (:class:`TraceConfig`).
        out_dir: where ``trace.json``, ``trace.csv``, the journal and the plots go.
        callback: ``callback(done, total, what)`` after each matrix (full) or checkpoint (LoRA).
        resume: finish an interrupted run in ``out_dir`` from its journal (same inputs and options).
        plots: write the figures.

    Returns:
        :class:`TraceResult` (``complete=True``).

    Raises:
        ConfigError: ``resume`` without ``out_dir``, a journal from other inputs, or a DoRA adapter.
        CheckpointNotFoundError, CheckpointFormatError, PairingError: unreadable inputs, or
            checkpoints that do not fit the base (:func:`find_checkpoints` for which are skipped).

    Example:
        >>> res = trace("base/", ["runs/lora8"], out_dir="trace")    # doctest: +SKIP
        >>> res.matrices[0]["points"][-1]["energy_rank"]["0.9"]      # doctest: +SKIP
    """
    config = config_of(config, TraceConfig)
    t0 = time.perf_counter()
    if resume and out_dir is None:
        raise ConfigError("resume needs the output folder of the interrupted run", hint="pass --out DIR with --resume")
    device = resolve_device(config.device)
    check_device_available(device)
    if isinstance(paths, (str, os.PathLike)):  # one run folder given bare: its characters are no checkpoints
        paths = [paths]
    elif isinstance(paths, Mapping) or not isinstance(paths, Iterable):
        checkpoint_location(paths)  # a state dict or model: says to save it
    checkpoint_location(base)
    found = find_checkpoints([str(checkpoint_location(p)) for p in paths])
    where = Path(out_dir).resolve() if out_dir is not None else None  # through links, as the run folder is listed
    if where is not None and found.run and CHECKPOINT_DIR.match(where.name) and same_file(where.parent, found.run):
        # every later trace of the run (this one's --resume too) would list it as an unreadable checkpoint
        raise ConfigError("--out is a checkpoint-N folder inside the run folder being traced", path=out_dir,
                          hint="write the trace outside the run folder (or under another name)")
    base_ckpt = open_checkpoint(base)
    refs = found.checkpoints
    refuse_empty_plan(base_ckpt, refs, config.include, config.exclude, config.layers)  # before any journal is written
    result = TraceResult(base=str(base), run=found.run, kind=refs[0].kind, thresholds=list(config.thresholds),
                         config=asdict(config), skipped_checkpoints=found.skipped, loss_history=found.loss_history,
                         warnings=list(found.warnings), device=str(device))
    weights = [open_weights(r.path, r.kind) for r in refs]
    # how each folder was read (several weight sets in one: the one transformers reads), once each
    result.warnings += read_notes((base_ckpt, *weights))
    options = {k: getattr(config, k) for k in ("thresholds", "top_k", "keep_singular", "alpha", "include", "exclude", "layers")}
    result.fingerprint, about = run_identity([base_ckpt, *weights], {**options, "steps": [r.step for r in refs]})
    journal = RecordJournal(Path(out_dir) / JOURNAL) if out_dir is not None else None
    done = first_trace_records(journal.start(result.fingerprint, resume=resume, about=about), result.warnings) if journal else []
    if journal is not None and not resume:  # an earlier trace's figures and report describe another run
        remove_earlier_outputs(Path(out_dir), "trace.json", SCHEMA, TRACE_FILES, ("trace_*.png",))
    try:
        if result.kind == "lora":
            _trace_adapters(result, refs, base_ckpt, config, device, journal, done, callback)
        else:
            _trace_full(result, refs, weights, base_ckpt, config, device, journal, done, callback)
    except BaseException:
        if journal is not None:  # failed or stopped: no lock left in the folder (the journal stays for --resume)
            journal.release()
        raise
    result.checkpoints = [asdict(r) for r in refs]
    result.loss_history = found.merged_history(r.path for r in refs if r.failed)  # a failed one's log is not this run's
    result.warnings += failed_checkpoint_warnings(refs, result.matrices)
    result.matrices.sort(key=_order)
    if above := size_warning(refs, result.matrices):
        result.warnings.append(above)
    result.warnings += run_warnings(result.matrices) + base_copy_warning(result.checkpoints, result.matrices)
    if zero := unchanged_text(result.checkpoints, result.matrices, result.config, result.skipped):  # (the CLI exits 3 on it, as diff)
        result.warnings.append(f"{zero}; check that you passed the fine-tuned checkpoints")
    result.complete = True
    result.elapsed_s = time.perf_counter() - t0
    if out_dir is not None:
        result.save(out_dir, plots=plots)
    if journal is not None:
        journal.release()  # finished: no lock left in the folder
    return result


def _alpha(w: torch.Tensor, device: torch.device) -> tuple[float | None, float | None]:
    """WeightWatcher's α of a weight ``w`` and its standard error (None when the fit fails)."""
    x = w.to(device)
    fit = power_law_fit(singular_values(x if x.dtype in (torch.float32, torch.float64) else x.float()) ** 2)
    return fit.alpha, fit.sigma


def _skip_point(step: int, reason: str) -> dict[str, Any]:
    return {"step": step, "skip": reason}


def _trace_full(result: TraceResult, refs: list[CheckpointRef], ckpts: list[Checkpoint], base: Checkpoint,
                config: TraceConfig, device: torch.device, journal: RecordJournal | None, done: list[dict],
                callback: Callable[[int, int, str], None] | None) -> None:
    """Matrix by matrix: the base tensor once, then the same tensor of every checkpoint."""
    pairings, said, unpaired = [], {}, {}  # what pairing said of each checkpoint (names differing in spelling…), as diff warns it
    for ref, ck in zip(refs, ckpts):
        try:
            pairing = pair_by_base_names(base, ck)
        except SpectraError as exc:
            ref.failed = f"does not pair with the base ({exc.message})"
            pairings.append({})
            continue
        what, most = unpaired_matrices(pairing, ck)  # another architecture: its few matching shapes are no update of this base
        if most:
            ref.failed = f"does not pair with the base ({what}): a checkpoint of another model?"
            pairings.append({})
            continue
        if what:
            unpaired.setdefault(what, []).append(Path(ref.path).name)
        pairings.append({p.base.name: p for p in pairing.pairs})
        for note in (n for n in pairing.notes if n.startswith(PAIRING_NOTE_PREFIX)):  # read notes: said apart
            said.setdefault(note, []).append(Path(ref.path).name)
        for k in (k for k in pairing.skipped if k.reason.startswith(ALIAS_REASON)):  # tied names a .bin saved whole
            said.setdefault(f"{k.name} is not followed: {k.reason}", []).append(Path(ref.path).name)
    result.warnings += [f"{', '.join(names[:3])}{' …' * (len(names) > 3)}: {note}" for note, names in said.items()]
    result.warnings += unpaired_warnings(unpaired)
    if all(ref.failed for ref in refs):
        for ck in ckpts:  # an adapter's weights file given as a checkpoint: said as such
            refuse_lora_file(ck)
        raise CheckpointFormatError("no checkpoint pairs with the base", path=result.run or refs[0].path,
                                    hint="is BASE the model these checkpoints were trained from? `spectra inspect` shows both")
    for i, rec in enumerate(done, 1):  # a resumed run: finished matrices and checkpoints that failed earlier
        if "matrix" in rec:
            check_trace_matrix(rec["matrix"], f"record {i}", journal.path if journal else None)
            result.matrices.append(rec["matrix"])
        elif "failed" in rec:
            f = rec["failed"]
            if not (isinstance(f, dict) and isinstance(f.get("index"), int) and 0 <= f["index"] < len(refs)
                    and isinstance(f.get("reason"), str)):
                raise ResultsFormatError(f"record {i}: a failed checkpoint must have an index below {len(refs)} and a "
                                         "reason", path=journal.path if journal else None,
                                         hint="the journal was edited: run without --resume into a new folder")
            refs[f["index"]].failed = f["reason"]
    finished = {m["name"] for m in result.matrices}
    specs = base.specs
    keep = selector(config.include, config.exclude, config.layers)
    names = sorted({n for p in pairings for n in p}, key=lambda n: _order(matrix_meta(specs[n], (0, 0), None)))
    todo = []
    result.warnings += absent_warning([n for n, s in specs.items() if s.layer is not None and keep(n, s.layer)
                                       and len(base.tensors[n].shape) == 2], names)
    for name in names:
        if not keep(name, specs[name].layer):
            continue
        if len(base.tensors[name].shape) != 2:
            result.skipped.append({"name": name, "reason": "3-D expert stack: trace follows 2-D matrices only"})
        elif name not in finished:
            todo.append(name)
    if stacks := [s["name"] for s in result.skipped if "3-D expert stack" in s["reason"]]:  # the update may be mostly there
        result.warnings.append(f"{len(stacks)} 3-D expert stack(s) are not traced (e.g. {stacks[0]}): trace follows 2-D matrices only; "
                               "spectra diff analyses each expert")
    if not todo and not finished and not result.skipped:
        refuse_empty_selection(len(names), names[0] if names else "", include=config.include, exclude=config.exclude,
                               layers=config.layers, what="matrices the checkpoints update")
    if w := fused_whole_warning((specs[n] for n in sorted(set(todo) | finished) if n in specs), "trace"):
        result.warnings.append(w)
    total = len(todo) + len(finished)
    for count, name in enumerate(todo, start=len(finished) + 1):
        W = base.load(name)  # the one read of this base tensor
        first = prev = meta = base_alpha = None
        prev_at = None  # index of the checkpoint prev is from
        points = []
        caveats: dict[str, list[tuple[int | None, str]]] = {}  # code -> (step, its message) at each checkpoint
        for ci, (ref, pairs) in enumerate(zip(refs, pairings)):
            if ref.failed:
                points.append(_skip_point(ref.step, ref.failed))
                continue
            pair = pairs.get(name)
            if pair is None or len(pair.tuned_info.shape) != 2:
                points.append(_skip_point(ref.step, "not in this checkpoint, or its shape differs from the base"))
                continue
            try:
                wt = ckpts[ci].load(pair.tuned.name)
            except (SpectraError, OSError) as exc:  # deleted (save_total_limit) or rewritten under us
                ref.failed = f"could not be read any more during the trace ({getattr(exc, 'message', exc)})"
                if journal:
                    journal.add({"failed": {"index": ci, "reason": ref.failed}})
                points.append(_skip_point(ref.step, ref.failed))
                continue
            wb, wt = oriented(W, pair.base.transpose, pair.rows), oriented(wt, pair.tuned.transpose, pair.rows)
            delta, base_fro, bad = form_delta(wb, wt, device)
            shape = (int(delta.shape[0]), int(delta.shape[1]))
            if meta is not None and list(shape) != meta["shape"]:  # the rows it shares with the base differ
                points.append(_skip_point(ref.step, f"its ΔW is {shape[0]}×{shape[1]}, not {meta['shape'][0]}×{meta['shape'][1]} "
                                                    "as at the earlier steps: this checkpoint shares other rows with the base"))
                continue
            meta = meta or matrix_meta(specs[name], shape, base_fro)
            if bad:
                points.append(_skip_point(ref.step, f"{' and '.join(bad)} weights hold NaN or Inf; ΔW is undefined"))
                continue
            for msg in (notes := pair_notes(pair, wb, wt, delta, base_fro)):  # rounding level, precision mismatch…
                caveats.setdefault((caveat_codes(msg) or [msg])[0], []).append((ref.step, msg))
            floor = pair_floor(pair, wb, wt, notes, delta)  # directions at the rounding level of the stored weights: not the update's
            S, top = spectrum_and_top(delta, config.top_k, floor=floor)
            del delta
            now = Subspaces.of(top)
            pt = {"step": ref.step, **point_metrics(S, shape, base_fro, config, floor=floor),
                  "turn_prev": subspace_turn(prev, now), "turn_first": subspace_turn(first, now)}
            if now is None and pt["fro_norm"] > 0:  # non-zero, yet nothing above the floor: null turns, said why
                pt["turn_note"] = f"{unresolved_text('ΔW', pair.tuned_info.dtype)}, so turn_prev and turn_first are null"
            else:  # "previous" skipped a checkpoint; a cut inside a tie too wide to widen: said
                said = [gap_note(refs, prev_at, ci) if prev is not None else None,
                        f"ΔW: {UNDETERMINED_TEXT}" if now is not None and undetermined_cut(S, top.S.numel(), floor) else None]
                if any(said):
                    pt["turn_note"] = "; ".join(x for x in said if x)
            if config.alpha:
                base_alpha = base_alpha or _alpha(wb, device)
                pt["alpha"], pt["alpha_sigma"] = _alpha(wt, device)
            del wt
            points.append(pt)
            if now is not None:
                prev, first, prev_at = now, first or now, ci
        if meta is None:
            result.skipped.append({"name": name, "reason": "no checkpoint could be read for it"})
            continue
        rec = {**meta, "points": points}
        if base_alpha is not None:
            rec["base_alpha"], rec["base_alpha_sigma"] = base_alpha
        if pairs_note := pairing_notes_text(name, refs, pairings):  # a resized vocabulary's rows, with the steps that resized it
            rec["note"] = "; ".join(x for x in (rec["note"], pairs_note) if x)
        for msg, steps in ((m, [st for st, x in said if x == m]) for said in caveats.values() for m in dict.fromkeys(x for _, x in said)):
            rec["note"] = "; ".join(x for x in (rec["note"], f"{steps_text(steps)}: {msg}") if x)  # its numbers are those steps'
        result.matrices.append(jsonable(rec))
        if journal:
            journal.add({"matrix": result.matrices[-1]})
        if callback:
            callback(count, total, name)


def _trace_adapters(result: TraceResult, refs: list[CheckpointRef], base: Checkpoint, config: TraceConfig,
                    device: torch.device, journal: RecordJournal | None, done: list[dict],
                    callback: Callable[[int, int, str], None] | None) -> None:
    """Checkpoint by checkpoint: each adapter's factors, ‖W_base‖_F once per module, and per module
    the first and previous top-k subspaces."""
    keep = selector(config.include, config.exclude, config.layers)
    if config.alpha:
        result.warnings.append("α is fitted to dense weights; adapter checkpoints are traced without it")
    base_fro: dict[str, float] = {}
    metas: dict[str, dict[str, Any]] = {}
    points: dict[str, dict[int, dict[str, Any]]] = {}
    first: dict[str, Subspaces] = {}
    prev: dict[str, Subspaces] = {}
    prev_at: dict[str, int] = {}  # the checkpoint each prev is from (trace_checks.gap_note)
    saved: dict[str, str] = {}  # tensor an adapter stores whole (modules_to_save) -> why it is not traced
    other_base: dict[str, str] = {}  # a base the adapters record that is not BASE -> the warning (once per base)
    for i, rec in enumerate(done, 1):  # a resumed run: the journal holds a prefix of the checkpoints
        if "checkpoint" in rec:
            if not (isinstance(rec["checkpoint"], int) and 0 <= rec["checkpoint"] < len(refs)
                    and isinstance(rec.get("points", {}), dict)):
                raise ResultsFormatError(f"record {i}: checkpoint must be an index below {len(refs)}, with points by "
                                         "matrix", path=journal.path if journal else None,
                                         hint="the journal was edited: run without --resume into a new folder")
            for name, pt in rec.get("points", {}).items():
                check_trace_point(pt, f"record {i}.points[{str(name)[:80]!r}]", journal.path if journal else None)
            if rec.get("failed"):
                refs[rec["checkpoint"]].failed = rec["failed"]
            metas.update(rec.get("meta", {}))
            if isinstance(rec.get("saved"), dict):  # tensors stored whole (modules_to_save), listed as skipped
                saved.update({str(k): str(v) for k, v in rec["saved"].items()})
            for name, pt in rec.get("points", {}).items():
                points.setdefault(name, {})[rec["checkpoint"]] = pt
    finished, checked = {rec["checkpoint"] for rec in done if "checkpoint" in rec}, False  # checked: the base-layer copies
    if finished:  # the first and previous subspaces the next points compare with, recomputed from their adapters
        cache: dict[int, dict[str, Subspaces]] = {}
        for name, pts in points.items():
            used = sorted(ci for ci, pt in pts.items() if "skip" not in pt and pt.get("fro_norm"))
            if used:
                prev_at[name] = used[-1]
            for ci, into in ((used[0], first), (used[-1], prev)) if used else ():
                if ci not in cache:
                    cache[ci] = {spec.name: s for mod, spec, _shape, _base in _adapter_modules(refs[ci], base, keep, None, other_base)
                                 if (s := _lora_subspaces(mod, config, device)) is not None}
                if name in cache[ci]:
                    into[name] = cache[ci][name]
    for ci, ref in enumerate(refs):
        if ci in finished:
            continue
        try:
            new_saved: dict[str, str] = {}
            modules = _adapter_modules(ref, base, keep, new_saved, other_base, check_copies=not checked)  # once a run: one base
            checked = True
            saved.update(new_saved)
        except (SpectraError, OSError) as exc:  # unreadable now, or made for another base
            ref.failed = f"cannot be used ({getattr(exc, 'message', exc)})"
            if journal:
                journal.add({"checkpoint": ci, "failed": ref.failed, "points": {}, "meta": {}})
            continue
        new_points, new_meta = {}, {}
        for mod, spec, shape, base_name in modules:
            name = spec.name
            if name not in base_fro:  # the one read of this base tensor (a tied head's: the embedding)
                base_fro[name] = float(torch.linalg.vector_norm(base.load(base_name).double()))
            f = Factored.from_lora(*(x.to(device) for x in mod.factors()), mod.scale)
            now = Subspaces.of(truncate(f, config.top_k))
            new_meta[name] = metas[name] = metas.get(name) or matrix_meta(spec, shape, base_fro[name], mod.r)
            pt = {"step": ref.step, **point_metrics(f.S.cpu().numpy(), shape, base_fro[name], config, mod.r), "lora_scale": mod.scale,
                  "turn_prev": subspace_turn(prev.get(name), now), "turn_first": subspace_turn(first.get(name), now)}
            if now is not None and name in prev and (gap := gap_note(refs, prev_at.get(name), ci)):
                pt["turn_note"] = gap
            new_points[name] = points.setdefault(name, {})[ci] = jsonable(pt)
            if now is not None:
                prev[name], prev_at[name] = now, ci
                first.setdefault(name, now)
        if journal:
            journal.add({"checkpoint": ci, "points": new_points, "meta": new_meta, "saved": new_saved})
        if callback:
            callback(ci + 1, len(refs), Path(ref.path).name)
    # not a LoRA update: listed with the reason, never left out without a word (interfere lists them likewise)
    result.skipped += [{"name": n, "reason": r} for n, r in sorted(saved.items())]
    if w := fused_whole_warning((base.specs[n] for n in sorted(metas) if n in base.specs), "trace"):
        result.warnings.append(w)
    for name, meta in metas.items():
        pts = [points[name].get(ci) or _skip_point(ref.step, ref.failed or "not in this adapter") for ci, ref in enumerate(refs)]
        result.matrices.append({**meta, "points": pts})
    # one run keeps its r and its target modules: adapters of several runs (or a resized one) listed together
    result.warnings += adapter_change_warnings(metas, points, refs) + list(other_base.values())
    if not result.matrices and not any(r.failed for r in refs):  # every adapter was read: the filters left nothing
        every = sorted({spec.name for mod, spec, _shape, _base in _adapter_modules(refs[0], base, selector(None, None, None))})
        refuse_empty_selection(len(every), every[0] if every else "", include=config.include, exclude=config.exclude,
                               layers=config.layers, what="modules the first adapter updates")
    if not result.matrices:
        raise CheckpointFormatError("no adapter checkpoint could be used", path=result.run or refs[0].path,
                                    hint="; ".join(r.failed for r in refs if r.failed)[:400] or None)


def _lora_subspaces(mod: Any, config: TraceConfig, device: torch.device) -> Subspaces | None:
    return Subspaces.of(truncate(Factored.from_lora(*(x.to(device) for x in mod.factors()), mod.scale), config.top_k))


def _adapter_modules(ref: CheckpointRef, base: Checkpoint, keep: Callable, saved: dict[str, str] | None = None,
                     other_base: dict[str, str] | None = None, check_copies: bool = False) -> list[tuple[Any, MatrixSpec, tuple[int, int], str]]:
    """``(LoraModule, spec, (out, in), base tensor name)`` of each kept module of an adapter checkpoint
    (the spec names the updated matrix; its base tensor differs for a head tied to the embedding).
    ``saved``, when given, receives each kept tensor the adapter stores whole (``modules_to_save``) with
    why it is not traced (:func:`spectra.adapter_diff.saved_modules` pairs them; ``spectra diff`` measures them);
    ``other_base`` the base the adapter records when not ``base`` (its ``rel_norm`` is then against other weights), with the
    warning diff, compare and interfere give; ``check_copies``: its base-layer copies checked (``check_base_copies``).

    Raises:
        ConfigError: a DoRA adapter (its update needs the base weights at every checkpoint).
        SpectraError: the adapter does not fit the base, or cannot be read.
    """
    adapter = open_adapter_on(ref.path, base, keep=keep, check_copies=check_copies, merged="trace merged checkpoints instead")
    if adapter.config.use_dora:
        raise ConfigError("DoRA adapters are not traced: their update needs the base weights at every checkpoint",
                          path=ref.path, hint="trace merged checkpoints instead (merge_and_unload)")
    if saved is not None:
        saved.update({n: why for n, why, layer in saved_skips(adapter, base) if keep(n, layer)})
    if other_base is not None and (w := recorded_base_warning(adapter, base)):
        other_base.setdefault(str(adapter.config.base_model_name_or_path), w)
    out = []
    for mod, spec, base_name in adapter_updates(adapter, base):
        if keep(spec.name, spec.layer):
            out.append((mod, spec, (int(mod.shape[0]), int(mod.shape[1])), base_name or spec.name))
    return out
