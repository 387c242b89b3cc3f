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
subspaces are kept. ``--resume`` continues from the journal (``trace_journal.jsonl``), and adds the checkpoints a
run saved since it was traced (:func:`spectra.journal.prefix_fingerprint`; a full trace reads each matrix's first and
latest traced checkpoint again for its turns: :mod:`spectra.trace_full`).

The same per-matrix metrics are computed inside a training process by
:class:`spectra.callbacks.SpectraTracker`; its ``trace.jsonl`` loads with :func:`load_trace`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spectra._version import __version__
from spectra.config import config_of, public_entry
from spectra.errors import ConfigError, ResultsFormatError
from spectra.io.checkpoint import open_checkpoint, read_notes
from spectra.io.files import atomic_write_text, remove_earlier_outputs, same_file
from spectra.io.jsonfile import RESULTS_MAX_BYTES, load_json, parse_json, result_json
from spectra.io.paths import checkpoint_location
from spectra.journal import RecordJournal, checkpoint_identity, prefix_fingerprint, run_identity
from spectra.linalg import check_device_available, resolve_device
from spectra.results import points_caveat_note, rows_to_csv
from spectra.results_check import damaged_hint
from spectra.trace_adapters import trace_adapters
from spectra.trace_checks import (
    base_copy_warning,
    failed_checkpoint_warnings,
    run_warnings,
    size_warning,
    unchanged_text,
)
from spectra.trace_full import trace_full
from spectra.trace_inputs import (
    CHECKPOINT_DIR,
    CheckpointRef,
    find_checkpoints,
    first_trace_records,
    open_weights,
    refuse_empty_plan,
)
from spectra.trace_points import (  # noqa: F401 (public here too: users import them from spectra.trace)
    SIGMA_FLOOR,
    TraceConfig,
    jsonable,
    matrix_meta,
    matrix_order,
    point_metrics,
)

SCHEMA = "spectra.trace/1"
JOURNAL = "trace_journal.jsonl"
#: A trace's own files (with its ``trace_*.png`` figures), removed before a new, not resumed, trace writes there.
TRACE_FILES = ("trace.json", "trace.csv", "report.html")
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


def result_from_records(records: list[dict[str, Any]], *, base: str | None = None, run: str | None = None,
                        source: str = "spectra.callbacks") -> TraceResult:
    """A :class:`TraceResult` from the lines of a ``trace.jsonl`` written by :class:`spectra.callbacks.SpectraTracker`:
    ``{"header": {...}}``, ``{"skipped": {...}}``, ``{"warning": "..."}``, ``{"log": {"step", "loss", ...}}`` and
    one ``{"kind", "step", "loss", "matrix": meta, "point": point}`` per matrix and measurement."""
    records = first_trace_records(records)  # a repeated line: its (matrix, step)'s first kept, with a warning record
    recs = [r for r in records if isinstance(r, dict) and "matrix" in r and "point" in r]
    timings = [r["timing"] for r in records if isinstance(r, dict) and isinstance(r.get("timing"), dict)]
    # a step's timing follows its matrix records: a last step without one was cut off while written (a kill), its
    # records a part of the matrices, whose medians beside the other steps' would compare other sets
    partial = None
    if timings and recs and (last := max(int(r["step"]) for r in recs)) not in {t.get("step") for t in timings}:
        partial = (last, sum(int(r["step"]) == last for r in recs), len({r["matrix"]["name"] for r in recs}))
        recs = [r for r in recs if int(r["step"]) != last]
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
    if partial is not None:
        res.warnings.append(f"step {partial[0]} was cut off while its records were written ({partial[1]} of {partial[2]} matrices; "
                            "the run stopped): left out")
    # seconds spent measuring and where (0 s and no device from a trace.jsonl written before these records)
    res.elapsed_s = float(sum(t["seconds"] for t in timings if isinstance(t.get("seconds"), (int, float))))
    res.device = next((t["device"] for t in reversed(timings) if isinstance(t.get("device"), str)), "")
    if not res.thresholds:
        res.thresholds = sorted({float(t) for r in recs for t in r["point"].get("energy_rank", {})})
    for name in sorted(metas, key=lambda n: matrix_order(metas[n])):
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
            rec = parse_json(line.encode("utf-8"), path=p, what="a trace.jsonl line", error=ResultsFormatError)
        except ResultsFormatError:
            if i < len(lines):  # not the line a running training is writing: a write cut short (a full disk), then more
                torn.append(i)
            continue
        _refuse_malformed(rec, i, p)
        records.append(rec)
    result = result_from_records(records, run=str(p.parent))
    if torn:
        result.warnings.append(f"trace.jsonl line(s) {', '.join(map(str, torn[:5]))} are not valid JSON (a write cut short, e.g. by a "
                               "full disk): skipped, and the records after them read")
    return result


def _refuse_malformed(rec: Any, line: int, path: Path) -> None:
    """Refuse a trace.jsonl line whose parts have other types than the tracker writes (a traceback came from reading
    it, before the points' own checks): a matrix record's integer ``step`` >= 0, ``matrix`` an object with a string
    ``name`` and ``point`` an object; a header's ``config`` an object; a timing's integer ``step``.

    Raises:
        ResultsFormatError: one line naming the file, the line and the field.
    """
    def step(v: Any) -> bool:  # 2.5 was read as step 2, true as step 1
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    why = None
    if not isinstance(rec, dict):
        why = "must be a JSON object"
    elif "matrix" in rec or "point" in rec:
        if not (isinstance(rec.get("matrix"), dict) and isinstance(rec["matrix"].get("name"), str)):
            why = '"matrix" must be an object with a string "name"'
        elif not isinstance(rec.get("point"), dict):
            why = '"point" must be an object'
        elif not step(rec.get("step")):
            why = f'"step" must be an integer >= 0. Got {str(rec.get("step"))[:40]!r} instead'
    elif isinstance(rec.get("header"), dict) and "config" in rec["header"] and not isinstance(rec["header"]["config"], dict):
        why = 'the header\'s "config" must be an object'
    elif isinstance(rec.get("timing"), dict) and "step" in rec["timing"] and not step(rec["timing"]["step"]):
        why = 'a timing\'s "step" must be an integer >= 0'
    if why is not None:
        raise ResultsFormatError(f"line {line}: {why}", path=path, hint=damaged_hint(path))


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
        resume: finish an interrupted run in ``out_dir`` from its journal (same inputs and options), or extend it with
            checkpoints appended since (the same run folder, more ``checkpoint-N``; the traced points kept).
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
    options["steps"] = [r.step for r in refs]
    identities = [checkpoint_identity(c) for c in (base_ckpt, *weights)]  # (content samples: read once)
    result.fingerprint, about = run_identity([base_ckpt, *weights], options, identities)
    journal = RecordJournal(Path(out_dir) / JOURNAL) if out_dir is not None else None
    # resumed after the run saved more checkpoints: the earlier run is this one less them
    earlier = functools.partial(prefix_fingerprint, now=about, checkpoints=[base_ckpt, *weights], options=options, grows="steps",
                                identities=identities)
    done = first_trace_records(journal.start(result.fingerprint, resume=resume, about=about, earlier=earlier), result.warnings) if journal else []
    if journal is not None and (not resume or journal.grown):  # an earlier trace's figures and report describe another run
        remove_earlier_outputs(Path(out_dir), "trace.json", SCHEMA, TRACE_FILES, ("trace_*.png",))
    try:
        if result.kind == "lora":
            trace_adapters(result, refs, base_ckpt, config, device, journal, done, callback)
        else:
            trace_full(result, refs, weights, base_ckpt, config, device, journal, done, callback)
    except BaseException:
        if journal is not None:  # failed or stopped: no lock left in the folder (the journal stays for --resume)
            journal.release()
        raise
    result.checkpoints = [asdict(r) for r in refs]
    result.loss_history = found.merged_history(r.path for r in refs if r.failed)  # a failed one's log is not this run's
    result.warnings += failed_checkpoint_warnings(refs, result.matrices)
    result.matrices.sort(key=matrix_order)
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
