"""Trace ΔW inside a training process: :class:`SpectraTracker` for any training loop, and
:class:`SpectraCallback`, its adapter for ``transformers.Trainer``.

Every ``every`` optimiser steps the tracker computes, for each weight matrix the run trains, the
metrics ``spectra trace`` computes from checkpoints (:func:`spectra.trace.point_metrics` and
:func:`spectra.interference.subspace_turn`), on the device the model is on, without writing a checkpoint:

- PEFT LoRA models: the update of each adapted module is ``s·B·A``, decomposed exactly from the
  factors (QR of B and Aᵀ, SVD of an r × r core; :meth:`spectra.subspaces.Factored.from_lora`).
  Memory: per module two top-k subspaces, ``2·k·(out + in)`` float64 numbers.
- Full fine-tuning: a copy of every trained 2-D weight is kept from the start (``initial="cpu"``,
  the default, holds it in host memory: the model's size again in its dtype; ``"device"`` keeps it
  beside the model, faster but the model's size again in accelerator memory). ΔW = W − W₀ is
  decomposed exactly through the float64 Gram matrix (:func:`spectra.interference.spectrum_and_top`).
  Memory: the copy plus per matrix two top-k subspaces.

A run resumed from a checkpoint (``resume_from_checkpoint``) continues its trace: the records up to
the resumed step stay; a full fine-tune's base is read again from the folder the model was loaded
from (``name_or_path``, unless it is one of the run's own checkpoints or its norms are not those the trace
recorded; without it, ΔW is measured from the resumed weights and its φ to the first restarts, as a warning
says); φ to the first measurement is measured from the same first step (its
subspaces are kept in ``out_dir/trace_first.npz``); the first turn after a resume at an unmeasured
step is null (the previous subspaces are not kept). A fresh tracker in a folder that holds a trace (a second
``trainer.train()`` of one callback, another run with the same ``output_dir``) keeps the earlier trace as
``trace.1.jsonl``. PiSSA, OLoRA, CorDA and LoRA-GA inits move ``s·B₀·A₀`` out of W: their
update is ``s·(B·A − B₀·A₀)``, traced from the factors at the start (LoftQ not at all; resumed, such a
run trains on untraced, as its trace says). Other PEFT tuners (LoHa, IA3, OFT, VeRA…) are refused. A matrix holding NaN or inf (a diverged
run) is not measured; a warning in the trace says so.

Each measurement appends one JSON line per matrix to ``out_dir/trace.jsonl`` (``{"kind", "step",
"loss", "matrix": {...}, "point": {...}}``, readable by :func:`spectra.trace.load_trace` and
``spectra report``) and returns a few medians per module kind (``spectra/<module>/<metric>``) that a
loop can log. :class:`SpectraCallback` sends those to the Trainer's loggers (TensorBoard, W&B…)
through ``trainer.log`` when it knows the trainer (:func:`attach`), and otherwise merges them into the
logs of the next ``on_log`` call and into ``state.log_history`` (loggers registered before it have
already written that step, which is why :func:`attach` is the way to use it). Importing this module
does not import transformers; ``SpectraCallback`` is built on first use.

Distributed runs: only the main process measures (the others return at once); parameters sharded
by FSDP/DeepSpeed ZeRO-3 are not gathered (the tracker refuses them with a one-line error).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from spectra.config import config_of
from spectra.errors import ConfigError, OutputError
from spectra.interference import Subspaces, spectrum_and_top, subspace_turn, truncate
from spectra.io.files import atomic_file, atomic_write_text, holds_text
from spectra.journal import append_record
from spectra.linalg import all_finite
from spectra.metrics import refuse_meta
from spectra.naming import describe_checkpoint, layer_of
from spectra.numerics import numeric_notes, unresolved_text
from spectra.selection import selector
from spectra.storage_floor import certified_floor, rounding_floor
from spectra.subspaces import Factored
from spectra.trace_points import (
    TraceConfig,
    jsonable,
    matrix_meta,
    point_metrics,
)
from spectra.tracker_files import FIRST_FILE, kept_records, load_first, refuse_other_options, set_aside
from spectra.tracker_logs import log_medians, loss_number
from spectra.tracker_model import (
    active_adapters,
    is_module_wrapper,
    lora_factors,
    original_weights,
    peft_inits,
    peft_types,
    recorded_base_norms,
    renamed_at_load,
    stored_in_out,
    stored_name,
    trainable_matrices,
    untraced_lora,
    untraced_params,
)

#: After the fix an OutputError names (free disk space, fix the permissions…), when the tracker cannot write its trace:
#: the Trainer callback warns and trains on.
TRACKER_WRITE_HINT = ("or give the tracker another out_dir; trace.jsonl keeps every whole record written before, and a run "
                      "resumed from a checkpoint continues it (resume_step, or the Trainer's resume_from_checkpoint)")
_PEFT_PREFIX = "base_model.model."


@dataclass
class _Tracked:
    """One traced matrix: how to get its update, and the state kept between measurements."""

    name: str
    meta: dict[str, Any]
    transpose: bool
    source: str = ""  # the parameter's (full) or PEFT layer's (LoRA) name in the model, as a checkpoint stores it
    module: Any = None  # LoRA: the PEFT layer
    adapters: tuple[str, ...] = ()
    start: tuple[torch.Tensor, torch.Tensor] | None = None  # (s·B₀, A₀) of an init that moved them out of W (PiSSA…)
    param: torch.Tensor | None = None  # full fine-tuning: the trained weight
    initial: torch.Tensor | None = None  # ... and its copy from the start
    first: Subspaces | None = None
    prev: Subspaces | None = None


class SpectraTracker:
    """Trace metrics of every trained matrix, measured in the training process.

    Args:
        model: the model being trained: a PEFT model (LoRA layers found by their ``lora_A``/``lora_B``
            and ``scaling``) or any ``torch.nn.Module`` (every 2-D floating-point parameter with
            ``requires_grad`` is traced, as full fine-tuning).
        every: measure at steps that are multiples of ``every`` (``step(model, s)``); 0 never.
        out_dir: folder of ``trace.jsonl`` (created); None keeps nothing on disk.
        config: thresholds, ``top_k`` of the compared subspaces, include/exclude/layers (matched on
            the weight names as the checkpoint stores them, e.g. ``model.layers.0.self_attn.q_proj.weight``).
        initial: where the copy of the initial weights lives for full fine-tuning (``"cpu"`` or
            ``"device"``; see the module docstring for the memory).
        is_main: this process writes and measures (False on the other ranks of a distributed run).
        resume_step: the optimiser step a resumed run restarts from (its checkpoint's); > 0 continues
            an existing ``trace.jsonl``: records up to that step are kept, later ones dropped, and φ to
            the first measurement is taken from ``trace_first.npz`` (0: a fresh trace).

    Example:
        >>> tracker = SpectraTracker(model, every=50, out_dir="runs/lora8")   # doctest: +SKIP
        >>> for step in range(1, steps + 1):                                   # doctest: +SKIP
        ...     train_step()
        ...     logs = tracker.step(model, step, loss=loss)  # None between measurements
    """

    def __init__(self, model: torch.nn.Module, *, every: int = 50, out_dir: str | Path | None = None,
                 config: TraceConfig | None = None, initial: Literal["cpu", "device"] = "cpu", is_main: bool = True,
                 resume_step: int = 0) -> None:
        if isinstance(every, (bool, np.bool_)) or not isinstance(every, (int, np.integer)) or every < 0:  # 1.5, True: no cadence
            raise ConfigError(f"every must be a whole number >= 0. Got {every!r} instead")
        every = int(every)
        if initial not in ("cpu", "device"):
            raise ConfigError(f"initial must be 'cpu' or 'device'. Got {initial!r} instead")
        self.every = every
        self.config = config_of(config, TraceConfig)
        self.path = Path(out_dir) / "trace.jsonl" if out_dir is not None else None
        self.is_main = is_main
        self.initial = initial
        self.seconds = 0.0  # time spent measuring, for overhead reports
        self.measurements = 0
        self.skipped: list[dict[str, str]] = []
        self.matrices: list[_Tracked] = []
        self.warnings: list[str] = []
        self._first_saved = True  # trace_first.npz holds every reference set so far
        self._measured_to: int | None = None  # the last step measured (steps must increase)
        #: whether ΔW is measured from the weights training started from (False: a resumed full fine-tune whose
        #: base could not be read again, measured from the weights it resumed with)
        self.from_base = True
        #: why ΔW is not measured from the base (``from_base`` False), for the warning that says so
        self.base_note = ""
        #: stored names of the model's trained 2-D weights when last looked at: one that starts training later is said once
        self._known: set[str] = set()
        if is_main:
            self._discover(model, int(resume_step))
            if self.path is not None and resume_step > 0 and self.path.is_file():
                with _tracker_hint():
                    self._resume(int(resume_step))
                self._measured_to = int(resume_step)  # kept up to there; the resumed run measures the later steps
            elif self.path is not None:  # a fresh trace per run: its header, then what is not traced
                with _tracker_hint():  # an earlier run's trace (a curriculum's phase, another process) is kept beside it
                    earlier = set_aside(self.path.parent) if holds_text(self.path) else None
                    atomic_write_text(self.path, "")
                self.first_path.unlink(missing_ok=True)  # an earlier run's references are not this run's
                self._write({"header": {"kind": self.kind, "every": every, "initial": initial, "matrices": len(self.matrices),
                                        "config": asdict(self.config)}})
                for s in self.skipped:
                    self._write({"skipped": s})
                if stacks := [s["name"] for s in self.skipped if "an expert stack?" in s["reason"]]:  # the update may be mostly there
                    self.warn(f"{len(stacks)} weights of more than 2 dimensions are not traced (e.g. {stacks[0]}): "
                              "the tracker follows 2-D matrices only")
                if renamed := renamed_at_load(model):
                    self.warn(f"transformers renamed weights of this model as it loaded them ({renamed}): the trace names them as the "
                              "model holds them, its checkpoints store them under the other names (filters match the model's)")
                if earlier:
                    self.warn(f"the earlier training's trace is kept as {earlier}: {self.path.parent} held a trace when this "
                              "one began")
                if wide := [tr for tr in self.matrices if tr.meta.get("lora_r") and tr.meta["lora_r"] > min(tr.meta["shape"])]:
                    tr = wide[0]  # factors wider than the matrix: directions they cannot hold, a ratio that cannot reach 1
                    self.warn(f"LoRA r = {tr.meta['lora_r']} is above min(out, in) of {len(wide)} adapted matrices (e.g. {tr.name}: "
                              f"{min(tr.meta['shape'])}): they hold at most that many directions, so their effective_rank_over_r "
                              f"stays below {min(tr.meta['shape']) / tr.meta['lora_r']:.2g}")

    @property
    def first_path(self) -> Path:
        """``trace_first.npz`` beside ``trace.jsonl``: each matrix's first measured subspaces
        (``<name>.U`` ``(out, k)``, ``<name>.V`` ``(in, k)``), so that a resumed run measures φ from the
        same first step (:meth:`_resume`). Only for a tracker that writes (``path`` set)."""
        assert self.path is not None  # every caller checks path first
        return self.path.with_name(FIRST_FILE)

    def _resume(self, step: int) -> None:
        """Continue the trace of a run resumed from its checkpoint at ``step``: keep the records up to
        ``step``, drop the later ones (the interrupted run measured them after the checkpoint; they are
        measured again), and reload the first subspaces of the matrices whose first measurement was kept
        (a LoRA's: its update is s·B·A whatever the resume; a full fine-tune's ΔW is measured from the
        resumed weights, another update, so its φ to the first restarts). The previous measurement's
        subspaces are not kept on disk: a LoRA measured at ``step`` itself takes them from its factors
        now (the checkpoint's, the same update); otherwise the first turn_prev after the resume is null,
        not a turn from the checkpoint's weights, which no record holds."""
        refuse_other_options(self.path, {"kind": self.kind, "config": asdict(self.config)}, asdict(TraceConfig()))
        kept, dropped, measured, at_step = kept_records(self.path, step)
        atomic_write_text(self.path, "".join(kept))
        exact = self.kind == "lora" or self.from_base  # the update the first measurement was of, measured again
        refs = load_first(self.first_path) if exact else {}
        for tr in self.matrices:
            tr.first = refs.get(tr.name) if tr.name in measured else None
            top = self._now(tr)[1] if exact and tr.name in at_step else None
            tr.prev = Subspaces.of(top) if top is not None else None  # None too for factors holding NaN/Inf
        self._first_saved = not any(tr.first is None for tr in self.matrices)
        self.warn(f"training resumed at step {step}: the trace continues from there"
                  + (f" ({dropped} records measured after step {step} by the interrupted run were dropped)" if dropped else "")
                  + ("" if exact and at_step else f"; turn_prev at the first measurement after it is null (step {step} "
                                                     f"{'was not measured' if exact else 'is where ΔW is measured from'})")
                  + ("" if exact and refs else
                     "; turn_first after it is measured from the first measurement after it"
                     + ("" if not exact else f" (no {FIRST_FILE})")))

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with _tracker_hint():
                append_record(self.path, jsonable(record))

    def warn(self, text: str, step: int | None = None) -> None:
        """Record a caveat of this trace (kept in ``trace.jsonl``, shown by the report); ``step``: the step it is said of
        (dropped with that step's records when a run resumes from an earlier one)."""
        self.warnings.append(text)
        self._write({"warning": text, **({"step": int(step)} if step is not None else {})})

    def log_loss(self, step: int, **values: float | None) -> None:
        """Record the training loss (or any of ``loss``, ``eval_loss``, ``target_loss``…) at ``step``
        for the report's loss curve (the measurements themselves are sparser)."""
        if self.is_main:
            self._write({"log": {"step": int(step), **{k: x for k, v in values.items() if (x := loss_number(v, k)) is not None}}})

    @property
    def kind(self) -> str:
        """``"lora"`` or ``"full"``."""
        return "lora" if any(t.module is not None for t in self.matrices) else "full"

    # ---- discovery --------------------------------------------------------------------------------
    def _discover(self, model: torch.nn.Module, resume_step: int, *, use_originals: bool = True) -> None:
        keep = selector(self.config.include, self.config.exclude, self.config.layers)
        wrapped = is_module_wrapper(model)
        self._known = {stored_name(n, wrapped) for n in trainable_matrices(model)}
        inits = peft_inits(model)
        lora = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "lora_B") and hasattr(m, "scaling")]
        found: list[tuple[str, tuple[int, ...], dict[str, Any]]] = []
        if lora:
            for mod_name, mod in lora:
                base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else getattr(mod, "base_layer", None)
                weight = getattr(base, "weight", None)
                active = active_adapters(mod)
                name = stored_name(mod_name, wrapped).removeprefix(_PEFT_PREFIX) + ".weight"
                if not active:
                    continue
                if (untraced := untraced_lora(mod, name, weight)) is not None:  # a conv's, a 3-D expert stack's
                    self.skipped += [untraced] if keep(untraced["name"], layer_of(untraced["name"])) else []
                    continue
                if any(getattr(mod, "use_dora", {}).get(a, False) for a in active):
                    self.skipped.append({"name": name, "reason": "DoRA: its update depends on the base weight; not traced"})
                    continue
                moved = [inits[a] for a in active if inits.get(a)]
                # PiSSA, OLoRA, CorDA, LoRA-GA subtract s·B₀·A₀ from W: the update is s·(B·A − B₀·A₀), exact from the
                # factors at the start; LoftQ replaces W by a quantised residual (no exact update), and a resumed run
                # no longer knows B₀, A₀
                if moved and (resume_step > 0 or "loftq" in moved or len(active) > 1):
                    why = ("LoftQ replaces the base weight by a quantised residual" if "loftq" in moved else
                           "the run resumed, so the factors it started from (s·B₀·A₀, moved out of W) are unknown"
                           if resume_step > 0 else "several adapters, one with a base-changing init")
                    self.skipped.append({"name": name, "reason": f"initialised with {moved[0]}: {why}; not traced"})
                    continue
                if any(a in mod.lora_A and mod.lora_A[a].weight.ndim != 2 for a in active):
                    self.skipped.append({"name": name, "reason": "convolution LoRA: not a matrix"})
                    continue
                B, A, scale = lora_factors(mod, active[0])
                out_in = (int(B.shape[0]), int(A.shape[1]))  # ΔW's (out, in) as the factors give it
                # a quantised base (QLoRA's packed 4-bit weight) has another shape: no relative norm then
                dense_base = weight.is_floating_point() and tuple(weight.shape) in (out_in, out_in[::-1])
                start = (scale * B.double(), A.double()) if moved else None  # copies: training changes B and A in place
                found.append((name, tuple(weight.shape) if dense_base else out_in,
                              {"module": mod, "adapters": active, "weight": weight if dense_base else None, "out_in": out_in,
                               "start": start, "source": stored_name(mod_name, wrapped)}))
            self.skipped += [{"name": stored_name(n, wrapped), "reason": "trained whole beside the LoRA (modules_to_save); not traced"}
                             for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "lora_" not in n]
        elif tuners := sorted({t for t in peft_types(model) if t != "LORA"}):
            raise ConfigError(f"the model holds PEFT {', '.join(tuners)} adapters: the tracker traces LoRA updates (s·B·A) and "
                              "full fine-tuning, and reading these factors as weights would give wrong numbers",
                              hint="trace a LoRA or a full fine-tune")
        else:
            for name, p in trainable_matrices(model).items():
                found.append((stored_name(name, wrapped), tuple(p.shape), {"param": p, "source": stored_name(name, wrapped)}))
            self.skipped += [u for u in untraced_params(model, wrapped) if keep(u["name"], layer_of(u["name"]))]
        if len(names := [n for n, _, _ in found]) != len(set(names)):
            twice = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"two trained weights of the model have one name as a checkpoint stores it ({twice}): their "
                              "records would be one matrix's", hint="rename one of the submodules")
        for name, _, parts in found:  # a model on the meta device: shapes, no values ("Cannot copy out of meta tensor" below)
            for t in (parts.get("param"), parts.get("weight"), *(t for a in parts.get("adapters", ()) for t in lora_factors(parts["module"], a)[:2])):
                refuse_meta(t, f"weight {name}")
        if any(len(s) != 2 or 0 in s for _, s, _ in found):
            raise ConfigError("some trained weights are empty or not 2-D on this process (sharded by FSDP or ZeRO-3?)",
                              hint="trace from saved checkpoints with `spectra trace` instead")
        params = {n: parts["param"] for n, _, parts in found if "param" in parts}
        # a resumed full fine-tune: its base, read again from the folder the model was loaded from, is what ΔW is of
        originals, recorded = None, {}
        if resume_step > 0 and params and use_originals:
            recorded = recorded_base_norms(self.path) if self.path is not None else {}
            originals, self.base_note = original_weights(model, params, self.path.parent if self.path else None, resume_step,
                                                         by_norms=bool(recorded.keys() & params.keys()))
        self.from_base = not params or resume_step == 0 or originals is not None
        specs = describe_checkpoint({n: s for n, s, _ in found})
        for name, shape, parts in found:
            spec = specs.get(name)
            if spec is None or not keep(name, spec.layer):
                continue
            out_in = parts.get("out_in") or ((shape[1], shape[0]) if spec.transpose else shape)
            if "param" in parts:
                p = parts["param"]
                dev = p.device if self.initial == "device" else torch.device("cpu")
                init = (originals.load(name) if originals is not None else p.detach()).to(device=dev, dtype=p.dtype, copy=True)
                base_fro = float(torch.linalg.vector_norm(init.double()))
                # the same copy gives the same norm (to the rounding of another device's sum); a checkpoint of the run does not
                if originals is not None and name in recorded and not math.isclose(base_fro, recorded[name], rel_tol=1e-12):
                    return self._discover_from_resumed(model, resume_step, originals.label, name, base_fro, recorded[name])
                self.matrices.append(_Tracked(name, matrix_meta(spec, out_in, base_fro), spec.transpose, parts["source"], param=p,
                                              initial=init))
            else:
                mod, start = parts["module"], parts["start"]
                r = sum(lora_factors(mod, a)[0].shape[1] for a in parts["adapters"])
                w = parts["weight"]
                base_fro = None
                if w is not None:  # the base the update is of: W, or W + s·B₀·A₀ where the init moved that out of W
                    w64 = w.detach().double()
                    w64 = w64.mT if getattr(mod, "fan_in_fan_out", False) or stored_in_out(mod) or tuple(w64.shape) != out_in else w64
                    sq = float(torch.sum(w64 * w64))
                    if start is not None:
                        sB0, A0 = (t.to(w64.device) for t in start)
                        sq += 2.0 * float(torch.trace(sB0.mT @ w64 @ A0.mT)) + float(torch.sum((sB0.mT @ sB0) * (A0 @ A0.mT)))
                    base_fro = max(sq, 0.0) ** 0.5
                self.matrices.append(_Tracked(name, matrix_meta(spec, out_in, base_fro, r), False, parts["source"],
                                              module=mod, adapters=parts["adapters"], start=start))
        if not self.matrices:
            said = "; ".join(f"{x['name']}: {x['reason']}" for x in self.skipped[:2])
            raise ConfigError("the tracker found no matrix to trace" + (f" ({said})" if said else
                              " (no trained 2-D weight, or none that include/exclude/layers keep)"),
                              hint="check the filters against the weight names as a checkpoint stores them "
                                   "(model.layers.0.self_attn.q_proj.weight), or that the model has trainable weights")

    def _discover_from_resumed(self, model: torch.nn.Module, resume_step: int, folder: str, name: str, now: float,
                               then: float) -> None:
        """:meth:`_discover` again with ΔW measured from the resumed weights: the folder the model was loaded from holds
        another ``name`` than the base the trace measured from (its norm ``now`` against the recorded ``then``)."""
        self.matrices.clear()
        self.skipped.clear()
        self._discover(model, resume_step, use_originals=False)
        self.from_base = False
        self.base_note = (f"the folder it was loaded from ({folder}) is not the base the trace measured from ({name}: ‖W‖_F "
                          f"{now:.9g} there, {then:.9g} in trace.jsonl)")

    # ---- measuring ----------------------------------------------------------------------------------
    def step(self, model: torch.nn.Module | None, step: int, *, loss: float | None = None) -> dict[str, float] | None:
        """Measure when ``step`` is a multiple of ``every`` (and > 0); returns the logger medians, or
        None when nothing was measured. ``model`` (None: not checked), the model being trained: a traced weight
        replaced since the tracker was made (``module.weight = nn.Parameter(…)``) is measured as replaced, one
        gone is no longer measured, and weights that started training since (gradual unfreezing) are named, not
        traced (each said once in the trace)."""
        if not self.is_main or self.every == 0 or step <= 0 or step % self.every:
            return None
        if model is not None:
            self._follow(model)
        return self.measure(step, loss=loss) if self.matrices else None

    def finish(self, model: torch.nn.Module | None, step: int) -> dict[str, float] | None:
        """At the end of training: measure ``step`` when :meth:`step` did not (not a multiple of ``every``); the logger
        medians, or None when nothing was measured."""
        if not self.is_main or self.every == 0 or step <= 0 or (self._measured_to is not None and step <= self._measured_to):
            return None
        if model is not None:
            self._follow(model)
        return self.measure(step) if self.matrices else None

    def _follow(self, model: torch.nn.Module) -> None:
        """Re-bind each traced matrix to what ``model`` holds under its name now (see :meth:`step`)."""
        wrapped = is_module_wrapper(model)
        params = {stored_name(n, wrapped): p for n, p in model.named_parameters()}
        modules = {stored_name(n, wrapped): m for n, m in model.named_modules()} if self.kind == "lora" else {}
        replaced, gone = [], []
        for tr in self.matrices:
            now = params.get(tr.source) if tr.param is not None else modules.get(tr.source)
            held = tr.param if tr.param is not None else tr.module
            if now is held:
                continue
            same = now is not None and (tuple(now.shape) == tuple(held.shape) if tr.param is not None else
                                        hasattr(now, "lora_A") and active_adapters(now) == tr.adapters)
            if same and tr.param is not None:
                tr.param = now
            elif same:
                tr.module = now
            (replaced if same else gone).append(tr.name)
        self.matrices = [tr for tr in self.matrices if tr.name not in gone]
        if replaced:
            self.warn(f"{len(replaced)} traced weights were replaced in the model since the tracker was made (e.g. {replaced[0]}): "
                      "measured from what the model holds now")
        if gone:
            self.warn(f"{len(gone)} traced weights are no longer in the model in their shape (e.g. {gone[0]}): not measured from "
                      "here")
        trained = {stored_name(n, wrapped) for n in trainable_matrices(model)}
        if new := sorted(trained - self._known):
            self.warn(f"{len(new)} weights train now that did not when the tracker was made (e.g. {new[0]}): not traced; make the "
                      "tracker after unfreezing them, or trace the saved checkpoints with spectra trace")
        self._known |= trained

    @torch.no_grad()
    def measure(self, step: int, *, loss: float | None = None) -> dict[str, float]:
        """Measure every tracked matrix now; append to ``trace.jsonl``; return the logger medians."""
        loss = loss_number(loss, "loss")  # before anything is measured: a refused loss leaves the step to measure again
        # a step measured again (or an earlier one) would repeat records, or turn against a later point
        if self._measured_to is not None and step <= self._measured_to:
            if not any("not after the last step measured" in w for w in self.warnings):
                self.warn(f"step {step} is not after the last step measured ({self._measured_to}): not measured (steps must increase)")
            return {}
        t0 = time.perf_counter()
        with _few_threads(self.matrices):
            records = self._records(step, loss)
        for rec in records:
            self._write(rec)
        self._measured_to = int(step)  # once its records are written: a step that failed before can be measured again
        self._save_first()
        took = time.perf_counter() - t0
        # the report's overview shows what the measurements cost and where they ran, as for a command
        self._write({"timing": {"step": int(step), "seconds": round(took, 4), "device": self._device()}})
        self.seconds += took
        self.measurements += 1
        return log_medians(records)

    def _device(self) -> str:
        """The device the traced weights are on (``"cpu"``, ``"cuda:0"``), where they are measured."""
        tr = self.matrices[0]
        return str((tr.param if tr.param is not None else tr.module.get_base_layer().weight).device)

    def _now(self, tr: _Tracked) -> tuple[np.ndarray | None, Factored | None, float, list[str]]:
        """``(singular values, top-k factors, rounding floor, numerical caveats)`` of one matrix's update now (the
        floor 0 and no caveats for a LoRA, formed from its factors; :func:`spectra.numerics.numeric_notes` of a
        full update, as ``spectra trace`` says them); ``(None, None, 0.0, [])`` when it holds NaN or inf (a diverged
        run: no SVD of it is defined)."""
        if tr.module is not None:
            factors = [lora_factors(tr.module, a) for a in tr.adapters]
            B = torch.cat([s * b for b, _, s in factors], dim=1)
            A = torch.cat([a for _, a, _ in factors], dim=0)
            if tr.start is not None:  # s·B·A − s·B₀·A₀ as one factored product [s·B, −s·B₀]·[A; A₀]
                sB0, A0 = tr.start
                B = torch.cat([B.double(), -sB0.to(B.device)], dim=1)
                A = torch.cat([A.double(), A0.to(A.device)], dim=0)
            if not (all_finite(B) and all_finite(A)):
                return None, None, 0.0, []
            f = Factored.from_lora(B, A, 1.0)
            return f.S.cpu().numpy(), truncate(f, self.config.top_k), 0.0, []
        initial = tr.initial.to(tr.param.device)  # once: ΔW and the floor both read it (a copy on a GPU)
        # in float64 for float64 weights, as spectra trace forms it (a float32 difference rounds a small update away)
        work = torch.float64 if torch.float64 in (tr.param.dtype, initial.dtype) else torch.float32
        delta = tr.param.detach().to(work) - initial.to(work)
        if not all_finite(delta):
            return None, None, 0.0, []
        # directions at the rounding level of the weights as held (bf16 training…) are not directions
        dtype = str(tr.param.dtype).removeprefix("torch.")
        notes = numeric_notes(initial, tr.param.detach(), delta, base_dtype=dtype, tuned_dtype=dtype)
        floor = certified_floor(rounding_floor(tr.param.detach(), dtype, initial), notes, tr.param.detach(), initial)
        return (*spectrum_and_top(delta.mT if tr.transpose else delta, self.config.top_k, floor=floor), floor, notes)

    def _records(self, step: int, loss: float | None) -> list[dict[str, Any]]:
        records, diverged, switched = [], [], []
        for tr in self.matrices:
            if tr.module is not None and active_adapters(tr.module) != tr.adapters:  # set_adapter() since: not what is trained
                switched.append(tr.name)
                continue
            S, top, floor, caveats = self._now(tr)
            if S is None:
                diverged.append(tr.name)
                continue
            now = Subspaces.of(top)
            point = {**point_metrics(S, tuple(tr.meta["shape"]), tr.meta["base_fro_norm"], self.config, tr.meta["lora_r"], floor),
                     "turn_prev": subspace_turn(tr.prev, now), "turn_first": subspace_turn(tr.first, now)}
            # what `spectra trace` says of the same weights: this step's caveats, kept with its point (constant size
            # per record; the loader gathers them per matrix), and why the turns of an unresolved update are null
            if now is None and point["fro_norm"] > 0 and tr.param is not None:  # (a LoRA's floor is 0: always resolved)
                point["turn_note"] = f"{unresolved_text('ΔW', str(tr.param.dtype).removeprefix('torch.'))}, so turn_prev and turn_first are null"
            if caveats:
                point["note"] = "; ".join(caveats)
            if tr.module is not None and len(tr.adapters) == 1:  # as spectra trace gives it (trace_checks reads a change)
                point["lora_scale"] = float(tr.module.scaling[tr.adapters[0]])
            if now is not None:
                tr.prev = now
                if tr.first is None:
                    tr.first, self._first_saved = now, False
            records.append({"kind": self.kind, "step": int(step), "loss": loss, "matrix": tr.meta, "point": jsonable(point)})
        if switched and not any("set_adapter() since?" in w for w in self.warnings):  # said once
            self.warn(f"from step {step}: the active LoRA adapters of {len(switched)} modules (e.g. {switched[0]}) are no longer "
                      "those the tracker was made for (set_adapter() since?): not measured; make the tracker after set_adapter()", step)
        if (cast := next((tr for tr in self.matrices if tr.param is not None and tr.param.dtype != tr.initial.dtype), None)) and not any(
                "were cast" in w for w in self.warnings):  # model.to(bfloat16) after the tracker copied them: said once
            self.warn(f"the traced weights were cast since the tracker copied them (e.g. {cast.name}: {cast.initial.dtype} → "
                      f"{cast.param.dtype}): ΔW holds the cast's rounding; make the tracker after the cast", step)
        if diverged:
            self.warn(f"step {step}: {len(diverged)} matrices hold NaN or inf (the training diverged), not measured: "
                      + ", ".join(diverged[:3]) + ("…" if len(diverged) > 3 else ""), step)
        return records

    def _save_first(self) -> None:
        """Write every matrix's first subspaces to :attr:`first_path` (float64 ``.npz``, no pickles)."""
        if self.path is None or self._first_saved:
            return
        arrays = {f"{tr.name}.{side}": t.detach().to("cpu", torch.float64).numpy()
                  for tr in self.matrices if tr.first is not None for side, t in (("U", tr.first.U), ("V", tr.first.V))}
        with _tracker_hint(), atomic_file(self.first_path) as f:
            np.savez(f, **arrays)
        self._first_saved = True

    def close(self) -> None:
        """Drop the copies and subspaces (the trace stays on disk)."""
        for tr in self.matrices:
            tr.initial = tr.first = tr.prev = None


#: Largest matrix (out · in) measured with one CPU thread: LAPACK calls on matrices this small gain
#: nothing from threads, and on a loaded machine their OpenMP regions wait for descheduled threads
#: (measured here: a 192 × 8 SVD took 50 ms with 2 threads under load and 18 µs with 1).
SMALL_MATRIX = 1 << 20


@contextlib.contextmanager
def _tracker_hint() -> Iterator[None]:
    """A write error of the tracker with its own hint (the CLI's names --out and --resume, which a tracker has not)."""
    try:
        yield
    except OutputError as exc:
        fix = (exc.hint or "").split(", or choose another --out")[0].split(";")[0] or "free disk space"
        raise OutputError(exc.message, path=exc.path, hint=f"{fix}, {TRACKER_WRITE_HINT}") from exc


@contextlib.contextmanager
def _few_threads(matrices: list[_Tracked]) -> Iterator[None]:
    """One intra-op thread while measuring small CPU matrices; the previous count restored after."""
    small = all(int(np.prod(t.meta["shape"])) <= SMALL_MATRIX for t in matrices)
    cpu = all((t.param if t.param is not None else t.module.get_base_layer().weight).device.type == "cpu"
              for t in matrices) if matrices else False
    if not (small and cpu):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _CallbackHooks:
    """A ``transformers.TrainerCallback`` over :class:`SpectraTracker` (created at ``on_train_begin``
    from the model the Trainer trains, so a full fine-tune's initial weights are the ones training
    starts from). The class is ``spectra.callbacks.SpectraCallback``, built on first use so that
    importing this module does not import transformers.

    Args:
        every: measure every ``every`` optimiser steps (``state.global_step``).
        out_dir: folder of ``trace.jsonl``; default the Trainer's ``args.output_dir``.
        config, initial: as :class:`SpectraTracker`.
        trainer: the Trainer, so that measurements go through ``trainer.log`` to every logger; set by
            :func:`attach`.

    Example:
        >>> trainer = transformers.Trainer(model=model, args=args, train_dataset=ds)   # doctest: +SKIP
        >>> attach(trainer, every=50)                                                  # doctest: +SKIP
        >>> trainer.train()                                                            # doctest: +SKIP
    """

    def __init__(self, every: int = 50, out_dir: str | Path | None = None, *, config: TraceConfig | None = None,
                 initial: Literal["cpu", "device"] = "cpu", trainer: Any = None) -> None:
        self.every, self.out_dir, self.config, self.initial, self.trainer = every, out_dir, config, initial, trainer
        self.tracker: SpectraTracker | None = None
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # resume_from_checkpoint: the Trainer has restored global_step; the trace up to it is kept and continued
        out = Path(self.out_dir or args.output_dir)
        # a second trainer.train() of this callback (a curriculum's next phase), or another process in the same
        # output_dir, starts a trace of its own: the tracker keeps the earlier one beside it, not overwritten
        try:
            self.tracker = SpectraTracker(model, every=self.every, out_dir=out, config=self.config, initial=self.initial,
                                          is_main=state.is_world_process_zero, resume_step=state.global_step)
        except OutputError as exc:  # a fresh run whose trace cannot be written is said before it trains; a resumed one trains on
            if state.global_step == 0:
                raise
            self._stop_tracing(exc, state.global_step)
            return control
        except ConfigError as exc:
            if state.global_step == 0:  # a run that cannot be traced is said before it trains
                raise
            # a resumed run the tracker cannot follow (a PiSSA init's B₀, A₀ are gone; other options): it trains on, untraced,
            # as said; the interrupted run's records after the step it resumed from are of no run now
            self.tracker = None
            if state.is_world_process_zero and (path := out / "trace.jsonl").is_file():
                atomic_write_text(path, "".join(kept_records(path, state.global_step)[0]))
                append_record(path, {"warning": f"training resumed at step {state.global_step}: not traced from there ({exc.message})"})
            return control
        if state.global_step > 0 and not self.tracker.from_base and state.is_world_process_zero:
            self.tracker.warn(f"training resumed at step {state.global_step}: ΔW is measured from the weights it resumed "
                              f"with, not from the base ({self.tracker.base_note})")

    def _stop_tracing(self, exc: OutputError, step: int) -> None:
        """A trace that cannot be written (a full disk) stops tracing, not the training: warned once."""
        warnings.warn(f"spectra: tracing stopped at step {step}, the training goes on: {exc}", RuntimeWarning, stacklevel=3)
        if self.tracker is not None:
            self.tracker.close()
        self.tracker = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is None:
            return control
        try:
            logs = self.tracker.step(kwargs.get("model"), state.global_step)  # the loss of this step is logged after this hook
        except OutputError as exc:
            self._stop_tracing(exc, state.global_step)
            return control
        if logs:
            if self.trainer is not None:
                due = control.should_log
                self.trainer.log(dict(logs))  # every logger sees them (TensorBoard, W&B, ...), and log_history
                # trainer.log's on_log clears should_log on this same control; restore it, or the step's
                # own loss would not be logged
                control.should_log = due
            else:
                self._pending.update(logs)
                control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tracker is not None and logs and any(k in logs for k in ("loss", "eval_loss")):
            try:
                self.tracker.log_loss(state.global_step, loss=logs.get("loss"), eval_loss=logs.get("eval_loss"))
            except OutputError as exc:
                self._stop_tracing(exc, state.global_step)
        if self._pending and logs is not None:
            logs.update(self._pending)  # reaches the callbacks after this one
            if state.log_history:
                state.log_history[-1].update(self._pending)  # and trainer_state.json
            self._pending = {}
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            try:  # the model the Trainer ends with, as spectra train traces it (every=4, max_steps=6 left step 6 out)
                if (logs := self.tracker.finish(kwargs.get("model"), state.global_step)) and self.trainer is not None:
                    self.trainer.log(dict(logs))
            except OutputError as exc:
                self._stop_tracing(exc, state.global_step)
                return control
            self.tracker.close()
        return control


@functools.cache
def callback_class() -> type:
    """``SpectraCallback``: :class:`_CallbackHooks` on top of ``transformers.TrainerCallback`` (whose
    other hooks stay no-ops)."""
    from transformers import TrainerCallback

    return type("SpectraCallback", (_CallbackHooks, TrainerCallback), {"__doc__": _CallbackHooks.__doc__, "__module__": __name__})


def __getattr__(name: str) -> Any:  # PEP 562: ``from spectra.callbacks import SpectraCallback`` builds the class
    if name == "SpectraCallback":
        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attach(trainer: Any, every: int = 50, out_dir: str | Path | None = None, **kwargs: Any) -> Any:
    """Add a ``SpectraCallback`` to ``trainer`` that logs through ``trainer.log`` (so every configured
    logger shows the metrics); returns it."""
    cb = callback_class()(every, out_dir, trainer=trainer, **kwargs)
    trainer.add_callback(cb)
    return cb
