"""``spectra interfere --base BASE T1 … Tn``: how n fine-tunes of one base collide, module by module.

Each Tᵢ is a PEFT LoRA adapter (its update ``s·B·A`` is used exactly, from the factors) or a full
checkpoint (``ΔW = W_tuned − W_base``, formed as :mod:`spectra.delta` forms every update). For every
base matrix that all n hold, :mod:`spectra.interference` gives the pairwise measures (cosine of
the flattened updates, φ of the top-k subspaces, captured energy, the Task Singular Vectors
interference of each pair, the KnOTS alignment) and the measures over all n together (TSV
interference, the KnOTS shared basis, the spectrum of the summed update against the parts).

Streaming and memory. The run goes module by module: the base tensor is read once, each task's
tensor is read when its module comes (tensor by tensor, never a whole checkpoint), and what stays
between modules is the result records. Within a module the tasks' top-k triplets are kept
(``k·(out + in)`` numbers each) and, for full checkpoints, the dense updates needed for the exact
cosine and captured energy, at most ``max_dense_bytes`` of them at once: when n dense updates do not
fit, they are taken in groups and a task's tensor is read again for each earlier group (each
checkpoint is read once when they fit, which the default 1 GiB allows for n·out·in·4 bytes up to
1 GiB). LoRA adapters are read whole when opened (their factors are the top-r triplets).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from spectra._version import __version__
from spectra.adapter_diff import adapter_updates, recorded_base_warning, saved_skips
from spectra.config import SharedOptions, check_thresholds, config_of, public_entry
from spectra.delta import form_delta, oriented, pair_floor, pair_notes
from spectra.display import oversized_words
from spectra.errors import ConfigError, PairingError, ResultsFormatError
from spectra.interfere_summary import clean, copies, summarise, zero_tasks_warning
from spectra.interference import (
    accumulation,
    as_factored64,
    captured64,
    checked64,
    cosine_from_gram,
    inner64,
    knots_basis,
    phi_matrix,
    singular_task_interference,
    spectrum_and_top,
    sum_factored,
    truncate,
    tsv_pair_matrix,
)
from spectra.io.adapter import Adapter, LoraModule, is_adapter
from spectra.io.checkpoint import Checkpoint, open_checkpoint, read_notes
from spectra.io.files import atomic_write_text, folder_lock, remove_earlier_outputs
from spectra.io.jsonfile import result_json
from spectra.journal import RecordJournal, first_by_index, start_sealed
from spectra.linalg import check_device_available, resolve_device, singular_values
from spectra.metrics import DEFAULT_THRESHOLDS, outside_squaring_range, oversized_update, rank_resolution, relative_norm
from spectra.naming import MatrixSpec, describe_checkpoint
from spectra.numerics import unresolved_text
from spectra.pairing import PAIRING_NOTE_PREFIX, MatrixPair, pair_by_base_names
from spectra.pairing_notes import unpaired_matrices
from spectra.param_experts import open_adapter_on
from spectra.plan import refuse_beyond_memory
from spectra.results import note_caveat_warnings, note_part, rows_to_csv
from spectra.roles import role_sort_key
from spectra.selection import fused_whole_warning, selector
from spectra.subspaces import Factored
from spectra.ties import UNDETERMINED_TEXT, tied_cuts, undetermined_cut
from spectra.trace_inputs import open_weights, weights_identity

SCHEMA = "spectra.interfere/1"

#: What interfere writes besides its heatmaps (``interfere_*.png``); removed first when an earlier interfere wrote there.
INTERFERE_FILES = ("interfere.json", "interfere.csv", "report.html")
#: The pairwise measures, each an n × n matrix per module (and their medians in ``summary``).
PAIR_MEASURES = ("cosine", "phi", "captured", "tsv", "knots")
#: How a matrix's note begins where the tasks' updates cancel (the report's findings count them by it).
CANCEL_NOTE = "the updates cancel"
#: Bytes per entry a module with a dense update needs at least (float64 sum and held update, the update as formed).
DENSE_MIN_BYTES = 24
#: float64's machine epsilon, the scale of a factored sum's rounding (relative to the parts' σ₁).
EPS64 = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class InterfereConfig(SharedOptions):
    """Options of an interfere run; saved with the results.

    Attributes:
        top_k: singular triplets per update for the subspace measures (φ, captured energy, TSV,
            KnOTS): the top ``min(top_k, rank)``; a LoRA update of rank r <= top_k is used whole.
        side: singular vectors φ compares: ``"right"`` (input space, as Hu et al.) or ``"left"``.
        thresholds: energy-rank thresholds of the summed update and the KnOTS concatenation.
        max_dense_bytes: most bytes of dense full-checkpoint updates held at once for one module
            (the exact cosine and captured energy need pairs of them); beyond it they are taken in
            groups and tensors are read again (see the module docstring).
        keep_singular: singular values of the summed update kept in the results.
        include, exclude, layers, device: see :class:`spectra.config.SharedOptions` (matched on the
            base tensor names).
    """

    top_k: int = 16
    side: Literal["left", "right"] = "right"
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    max_dense_bytes: int = 1 << 30
    keep_singular: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1. Got {self.top_k} instead")
        # more directions than any matrix has keeps them all (as diff's and compare's --top-k): one bound the solvers take
        object.__setattr__(self, "top_k", min(self.top_k, 1 << 62))
        if self.side not in ("left", "right"):
            raise ConfigError(f"side must be left or right. Got {self.side!r} instead")
        object.__setattr__(self, "thresholds", check_thresholds(self.thresholds))
        if self.max_dense_bytes < 1 or self.keep_singular < 0:
            raise ConfigError(f"max_dense_bytes must be >= 1 and keep_singular >= 0. Got {self.max_dense_bytes}, "
                              f"{self.keep_singular} instead")


# ---- inputs ------------------------------------------------------------------------------------------
class _Task:
    """One input: a LoRA adapter or a full checkpoint, and the base matrices it updates."""

    def __init__(self, label: str, base: Checkpoint, keep: Callable[[str, int | None], bool] | None = None) -> None:
        self.label = label
        self.adapter: Adapter | None = None
        self.ckpt: Checkpoint | None = None
        self.skipped: list[dict[str, str]] = []
        self.updates: dict[str, LoraModule | MatrixPair] = {}  # base tensor name -> what updates it
        self.pair_notes: list[str] = []  # what pairing said (names that differ only in spelling…), as diff warns it
        if is_adapter(label):
            self.kind = "lora"
            self.adapter = open_adapter_on(label, base, keep=keep)
            for mod, spec, base_name in adapter_updates(self.adapter, base):
                if spec.name != base_name:  # a head tied to the embedding: keyed by base tensor it would mix with it
                    self.skipped.append({"name": spec.name, "reason": f"{label}: a LoRA on an output head the base ties to "
                                         f"{base_name}: not measured here (spectra diff BASE ADAPTER measures it)"})
                    continue
                self.updates[base_name] = mod
            self.skipped += [{"name": n, "reason": f"{label}: {why}"} for n, why, _ in saved_skips(self.adapter, base)]
            # untargeted factors, LoRA biases, stray DoRA magnitudes: as `spectra diff ADAPTER` lists them
            self.skipped += [{"name": k.name, "reason": f"{label}: {k.reason}"} for k in self.adapter.skipped]
        else:
            self.kind = "full"
            self.ckpt = open_checkpoint(label)
            pairing = pair_by_base_names(base, self.ckpt, aliases=False)  # tied names matched by name against the others
            self.pair_notes = [n for n in pairing.notes if n.startswith(PAIRING_NOTE_PREFIX)]  # read notes: said apart
            if unpaired := unpaired_matrices(pairing, self.ckpt, keep, shapes=False)[0]:  # (shape mismatches: skipped below)
                self.pair_notes.append(f"{unpaired}: not measured (spectra diff BASE {label} lists them)")
            for p in pairing.pairs:
                self.updates[p.base.name] = p
            # matrices this task holds but cannot pair (another model's shapes, a weight of an integer dtype): said, not only "partial"
            self.skipped += [{"name": x.name, "reason": f"{label}: {x.reason}"} for x in pairing.skipped
                             if x.reason.startswith(("shape mismatch", "fused rows", "an output head", "tuned dtype"))]

    @functools.cached_property
    def weights(self) -> Checkpoint:
        """The checkpoint its tensors are read from (an adapter's weights file), for its identity and the journal's."""
        return self.ckpt if self.adapter is None else self.adapter.weights or open_weights(self.adapter.path, "lora")  # type: ignore[return-value]

    def dense(self, spec: MatrixSpec, W: torch.Tensor, device: torch.device, *,
              notes: bool = True) -> tuple[torch.Tensor | None, float, str, list[str], float]:
        """Dense ``ΔW`` of base matrix ``spec`` on ``device`` (full checkpoints and DoRA), ‖W_base‖_F,
        why it is undefined ("" when it is fine), its numerical caveats (:func:`spectra.delta.pair_notes`:
        a bf16 update at the rounding level…) and the rounding floor of its stored weights
        (:func:`spectra.delta.pair_floor`; 0 for DoRA, formed from its factors). ``W`` is the base tensor as stored."""
        u = self.updates[spec.name]
        if isinstance(u, LoraModule):  # DoRA: the update depends on the base weight
            Wo = (W.mT if spec.transpose else W).to(torch.float32)
            return u.dora_delta(Wo).to(device), float(torch.linalg.vector_norm(Wo.double())), "", [], 0.0
        wb = oriented(W, u.base.transpose, u.rows)
        wt = oriented(self.ckpt.load(u.tuned.name), u.tuned.transpose, u.rows)
        delta, base_fro, bad = form_delta(wb, wt, device)
        if bad:
            return None, base_fro, f"{self.label}: {' and '.join(bad)} weights hold NaN or Inf (or ΔW overflows)", [], 0.0
        if not notes:
            return delta, base_fro, "", [], 0.0
        said = pair_notes(u, wb, wt, delta, base_fro)  # the floor reads them: a rounding-level update's is raised to its ceiling
        return delta, base_fro, "", said, pair_floor(u, wb, wt, said, delta)

    def needs_dense(self, name: str) -> bool:
        u = self.updates[name]
        return not isinstance(u, LoraModule) or u.magnitude is not None

    def exact(self, name: str, device: torch.device) -> Factored:
        """The exact thin SVD of a (non-DoRA) LoRA update, from its factors."""
        u = self.updates[name]
        B, A = u.factors()
        return Factored.from_lora(B.to(device), A.to(device), u.scale)


def _short_names(labels: list[str]) -> list[str]:
    """Folder names for plots and tables, made unique with their position when they repeat."""
    names = [Path(lbl.rstrip("/")).name or lbl for lbl in labels]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


# ---- result ------------------------------------------------------------------------------------------
@dataclass
class InterfereResult:
    """What ``spectra interfere`` computed; ``interfere.json`` holds :meth:`to_dict` (README schema).

    Attributes:
        base: the base as given. tasks: the inputs as given; names: short names (folder names).
        kinds: ``"lora"`` or ``"full"`` per task. config: the options.
        modules: one record per matrix every task holds (see :func:`interfere`; a full checkpoint holds
            every matrix, changed or not, so a task's update may be zero there).
        summary: per pairwise measure the element-wise median over modules (``n × n``), and medians
            of the n-way scalars.
        partial: matrices only some tasks hold, with those tasks' indices (a full checkpoint holds every
            matrix, changed or not; an adapter only the modules it adapts).
        skipped: ``{"name", "reason"}`` for matrices not analysed.
        warnings: one-line caveats.
    """

    base: str
    tasks: list[str]
    names: list[str]
    kinds: list[str]
    config: dict[str, Any]
    modules: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    partial: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    device: str = ""
    version: str = __version__
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    def rows(self) -> list[dict[str, Any]]:
        """CSV rows: one per module and pair of tasks (s < t), with the module's n-way numbers."""
        out = []
        for m in self.modules:
            for s in range(len(self.tasks)):
                for t in range(s + 1, len(self.tasks)):
                    out.append({
                        "name": m["name"], "layer": m["layer"], "module": m["module"], "s": s, "t": t,
                        "task_s": self.names[s], "task_t": self.names[t], "cosine": m["cosine"][s][t], "phi": m["phi"][s][t],
                        "captured_t_in_s": m["captured"][s][t], "captured_s_in_t": m["captured"][t][s],
                        "tsv_pair": m["tsv"]["pairs"][s][t], "knots_alignment": m["knots"]["alignment"][s][t],
                        "sti_all": m["tsv"]["sti"], "tsv_all": m["tsv"]["relative"], "tsv_all_fro": m["tsv"]["relative_fro"],
                        "sum_spectral_over_max": m["sum"]["spectral_over_max"], "sum_fro_sq_ratio": m["sum"]["fro_sq_ratio"],
                        "sum_nuclear_ratio": m["sum"]["nuclear_ratio"],
                    })
        return out

    def save(self, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write ``interfere.json``, ``interfere.csv`` and (``plots``) the heatmaps into ``out_dir``."""
        out = Path(out_dir)
        with folder_lock(out):  # another run writing here is refused, not interleaved with these files
            remove_earlier_outputs(out, "interfere.json", SCHEMA, INTERFERE_FILES, ("interfere_*.png",))
            files = {"json": atomic_write_text(out / "interfere.json",
                                               result_json(self.to_dict()) + "\n"),
                     "csv": atomic_write_text(out / "interfere.csv", rows_to_csv(self.rows()))}
            if plots and self.modules:
                # matplotlib only when plotting
                from spectra.plots.interfere import save_interfere_plots

                files.update(save_interfere_plots(self.to_dict(), out))
        return files


# ---- one module ----------------------------------------------------------------------------------------
class _SkipModule(Exception):
    """A task's update of this module is undefined (NaN/Inf) or out of float64's squaring range: the
    module is skipped with the reason."""


def _out_of_range(who: str, top: float) -> str:
    return (f"{who} holds values of magnitude {top:.3g} here, whose squares leave float64's range: interfere cannot "
            "measure it (spectra diff can: it scales before squaring)")


def measure_module(name: str, spec: MatrixSpec, tasks: list[_Task], base: Checkpoint, config: InterfereConfig,
                   device: torch.device) -> dict[str, Any]:
    """Every measure of one base matrix over the n tasks (see the module docstring for memory).

    Raises:
        _SkipModule: a task's update of this matrix holds NaN/Inf.
    """
    n = len(tasks)
    k = config.top_k
    dense_tasks = [t for t in range(n) if tasks[t].needs_dense(name)]
    exact = {t: tasks[t].exact(name, device) for t in range(n) if t not in dense_tasks}
    # read once per module; a LoRA-only module reads it too, for ‖ΔW‖/‖W_base‖ (as diff and compare give it)
    W = base.load(name)
    # the measures square entries unscaled (norms, inner products, Gram matrices): float64 values near
    # 1e±200 would give inf or 0 (an update reported as zero), so such a module is skipped with the reason
    for who, top in [(tasks[t].label, float(f.S.max()) if f.S.numel() else 0.0) for t, f in exact.items()] + (
            [("the base", float(W.abs().max()))] if dense_tasks and W.dtype == torch.float64 and W.numel() else []):
        if outside_squaring_range(top):
            raise _SkipModule(_out_of_range(who, top))
    factors: dict[int, Factored] = {t: truncate(f, k) for t, f in exact.items()}
    spectra_: dict[int, np.ndarray] = {t: f.S.cpu().numpy() for t, f in exact.items()}
    rel_norms: list[float | None] = [None] * n
    if exact:
        base_fro = float(torch.linalg.vector_norm(W.double())) if W.numel() else 0.0  # NaN/Inf: null, as relative_norm says
        for t, f in exact.items():
            rel_norms[t] = relative_norm(float(torch.linalg.vector_norm(f.S.double())), base_fro)
    G = np.full((n, n), np.nan)
    C = np.full((n, n), np.nan)
    total = None  # dense float64 running sum when any update is dense
    seen: set[int] = set()
    floors: dict[int, float] = {}  # each dense update's rounding floor (its ties are judged at that resolution)
    numeric: list[str] = []  # "<task>: <caveat>" of each dense update
    numeric += [f"{tasks[t].label}: {UNDETERMINED_TEXT}" for t, f in exact.items() if undetermined_cut(f.S, factors[t].S.numel())]

    def load(t: int) -> torch.Tensor:
        nonlocal total
        # re-reads: said once (the floor is only needed at the first read, which decomposes ΔW)
        delta, base_fro, why, notes, floor = tasks[t].dense(spec, W, device, notes=t not in seen)
        if delta is None:
            raise _SkipModule(why)
        if t not in seen:  # first read: spectrum, top-k triplets, running sum
            seen.add(t)
            numeric.extend(f"{tasks[t].label}: {msg}" for msg in notes)
            top = float(delta.abs().max()) if delta.dtype == torch.float64 and delta.numel() else 0.0
            if outside_squaring_range(top):
                raise _SkipModule(_out_of_range(tasks[t].label, top))
            # directions at the rounding level of the stored weights are not directions of the update; a DoRA
            # update (dense) is represented by its top r directions, as compare represents it
            u = tasks[t].updates[name]
            spectra_[t], factors[t] = spectrum_and_top(delta, min(k, u.r) if isinstance(u, LoraModule) else k, floor=floor)
            floors[t] = floor
            S_all, kept = np.asarray(spectra_[t], dtype=np.float64), factors[t].S.numel()
            if isinstance(u, LoraModule) and S_all.size > kept and S_all[kept:].any():  # as compare says it
                share = float(np.sum(S_all[:kept] ** 2) / np.sum(S_all ** 2))
                numeric.append(f"{tasks[t].label}: its DoRA update is dense: its top {kept} directions, {share:.1%} of its "
                               "energy, stand for it in φ, captured energy, TSV and KnOTS (the cosine and the sum use all of it)")
            if undetermined_cut(spectra_[t], factors[t].S.numel(), floor):
                numeric.append(f"{tasks[t].label}: {UNDETERMINED_TEXT}")
            # (no float64 temporaries of the whole matrix: an embedding's are gigabytes)
            rel_norms[t] = relative_norm(float(torch.linalg.vector_norm(delta, dtype=torch.float64)), base_fro)
            if total is None:
                total = torch.zeros(delta.shape, dtype=torch.float64, device=device)
                for f in exact.values():
                    total += (f.U * f.S) @ f.Vh
            total.add_(delta)
        # float64 and checked once per read, not once per pair (20 tasks: 380 conversions of each)
        d64 = checked64(delta)
        sq[t] = float(torch.linalg.vector_norm(d64)) ** 2
        f64[t] = as_factored64(factors[t])
        return d64

    f64: dict[int, Factored] = {t: as_factored64(f) for t, f in factors.items()}  # each task's top triplets, checked
    sq: dict[int, float] = {}  # ‖ΔW_t‖_F²

    def pair(s: int, t: int, us: Any, ut: Any) -> None:
        G[s, t] = G[t, s] = inner64(us, ut)
        C[s, t] = captured64(f64[s], ut, sq[t])
        C[t, s] = captured64(f64[t], us, sq[s])

    def diag(t: int, ut: Any) -> None:
        G[t, t] = inner64(ut, ut)
        C[t, t] = captured64(f64[t], ut, sq[t])

    ex64 = {t: checked64(f) for t, f in exact.items()}
    sq.update({t: float((f.S**2).sum()) for t, f in ex64.items()})
    lora = sorted(exact)
    for i, s in enumerate(lora):
        diag(s, ex64[s])
        for t in lora[i + 1:]:
            pair(s, t, ex64[s], ex64[t])
    if dense_tasks:
        out_dim, in_dim = spec_shape(spec, base)
        per = out_dim * in_dim * 8  # one ΔW held in float64
        g = max(1, config.max_dense_bytes // max(per, 1))
        groups = [dense_tasks[i:i + g] for i in range(0, len(dense_tasks), g)]
        for gi, group in enumerate(groups):
            held = {t: load(t) for t in group}
            for j, s in enumerate(group):
                diag(s, held[s])
                for t in group[j + 1:]:
                    pair(s, t, held[s], held[t])
                for t in lora:
                    pair(s, t, held[s], ex64[t])
            for later in groups[gi + 1:]:
                for u in later:  # streamed against the held group, then dropped
                    du = load(u)
                    for s in group:
                        pair(s, u, held[s], du)
                    del du
            del held
    fs = [factors[t] for t in range(n)]
    # a non-zero dense update with no triplet above its rounding floor: all of it is rounding of the stored
    # weights, so its subspace measures are null; said per task (as compare's status "unresolved")
    unresolved = [t for t in sorted(seen) if fs[t].S.numel() == 0 and G[t, t] > 0]
    numeric += [f"{tasks[t].label}: {unresolved_text('its update', tasks[t].updates[name].tuned_info.dtype)}, so its φ, "
                "captured energy, TSV and KnOTS entries are null" for t in unresolved]
    # TSV's entrywise score reads single triplets, which inside a tie (widened at the cut, or within) are the solver's choice
    p = min(spec_shape(spec, base))
    numeric += [f"{tasks[t].label}: its top directions hold tied singular values: the TSV score of single triplets depends on "
                "the solver's choice within the tie (φ, captured energy and KnOTS do not)"
                for t in range(n) if fs[t].S.numel() > 1 and tied_cuts(fs[t].S, fs[t].S.numel(), floors.get(t, 0.0), p).any()]
    # the Gram route's values below its resolution are rounding, not directions (nor nuclear norm)
    S_sum = _resolved(singular_values(total)) if total is not None else sum_factored([exact[t] for t in range(n)]).S.cpu().numpy()
    # updates that cancel: the sum holds only each dense update's storage rounding (the top value of a sum of
    # noises is at most the sum of their floors), whose energy ranks would read as a spread-out update
    floor_sum = sum(floors.values())
    # (and well below the largest task's σ₁: tasks that are themselves at the rounding level do not cancel)
    top_task = max((float(f.S[0]) for f in fs if f.S.numel()), default=0.0)
    cancel = 0 < floor_sum < math.inf and top_task > 0 and (not S_sum.size or S_sum[0] <= min(floor_sum, 0.5 * top_task))
    # every task factored (no storage floor): the stacked SVD's rounding is a few k·ε·Σ_t σ₁(t) (k the stacked rank), so
    # values below 16 times that are no direction of the sum (two LoRAs with B and −B left ~1e-16 read as a spread-out update)
    stacked = sum(int(f.S.numel()) for f in fs)
    level = 16 * stacked * EPS64 * sum(float(f.S[0]) for f in fs if f.S.numel()) if total is None else 0.0
    if level > 0:
        S_sum = np.where(S_sum > level, S_sum, 0.0)
    cancelled = level > 0 and top_task > 0 and not (S_sum > 0).any()
    tsv = singular_task_interference(fs)
    knots = knots_basis(fs, config.thresholds, floor=(fmax := max(floors.values(), default=0.0)))
    # a coarse task (bf16 beside float32) sets the shared rank's cut: say what of the finer tasks falls under it
    under = sum(int((fs[t].S.cpu() <= 2.0 * fmax).sum()) for t in range(n) if floors.get(t, 0.0) < fmax / 4) if fmax > 0 else 0
    if under:
        coarse = max(floors, key=floors.__getitem__)
        numeric.append(f"KnOTS's shared rank counts the directions above twice {tasks[coarse].label}'s rounding floor "
                       f"({fmax:.3g}, the coarsest task's): {under} resolved directions of finer tasks lie below it (their "
                       "KnOTS alignment counts them)")
    # the dense updates' spectra (Gram route too) as the sum's: otherwise its nuclear ratio reads 0.99999995 for a lone task
    acc = accumulation(S_sum, [_resolved(spectra_[t]) if t in seen else spectra_[t] for t in range(n)],
                       thresholds=config.thresholds, keep=config.keep_singular)
    if cancel:
        acc = replace(acc, energy_rank={k: 0 for k in acc.energy_rank})
        numeric.append(f"{CANCEL_NOTE}: their sum is at the rounding level of the stored weights (σ₁ "
                       f"{float(S_sum[0]) if S_sum.size else 0.0:.3g} against a floor of {floor_sum:.3g}), so its energy "
                       "ranks are 0 (no direction above rounding); its ratios say how far it cancelled")
    elif cancelled:
        acc = replace(acc, energy_rank={k: 0 for k in acc.energy_rank})
        numeric.append(f"{CANCEL_NOTE}: their sum is zero (every singular value at or below {level:.3g}, the rounding of "
                       "float64 arithmetic on the factors), so it has no direction and no energy ranks")
    out_dim, in_dim = spec_shape(spec, base)
    return clean({
        "name": spec.name, "layer": spec.layer, "module": spec.module, "role": spec.role, "out": out_dim, "in": in_dim,
        "ranks": [int(f.S.numel()) for f in fs], "fro": [math.sqrt(max(G[t, t], 0.0)) for t in range(n)],
        "rel_norm": rel_norms, "unresolved": unresolved,
        "cosine": cosine_from_gram(G), "phi": phi_matrix(fs, config.side), "captured": C,
        "tsv": {"sti": tsv.sti, "relative": tsv.relative, "relative_fro": tsv.relative_fro, "pairs": tsv_pair_matrix(fs)},
        "knots": {"alignment": knots.alignment, "rank": knots.rank, "energy_rank": knots.energy_rank,
                  "task_energy_rank": knots.task_energy_rank},
        "sum": asdict(acc), "note": "; ".join(x for x in (spec.note, *numeric) if x),
    })


def _resolved(S: np.ndarray) -> np.ndarray:
    """A Gram-route spectrum with the values below its resolution (:func:`spectra.metrics.rank_resolution`) set to 0."""
    return np.where(rank_resolution(float(S[0]), S.size) < S, S, 0.0) if S.size else S


def spec_shape(spec: MatrixSpec, base: Checkpoint) -> tuple[int, int]:
    """``(out, in)`` of base matrix ``spec`` as analysed (its stored shape oriented)."""
    stored = tuple(base.tensors[spec.name].shape)
    return (int(stored[1]), int(stored[0])) if spec.transpose else (int(stored[0]), int(stored[1]))


# ---- the run ---------------------------------------------------------------------------------------------
@public_entry
def interfere(
    base: str,
    tuned_list: list[str],
    *,
    config: InterfereConfig | None = None,
    out_dir: str | Path | None = None,
    callback: Callable[[int, int, str], None] | None = None,
    plots: bool = True,
    resume: bool = False,
) -> InterfereResult:
    """Interference between n fine-tunes of one base, per matrix (see the module docstring).

    Args:
        base: the base checkpoint every task was tuned from.
        tuned_list: n >= 2 PEFT LoRA adapter folders or full checkpoints (mixing is allowed).
        config: options (:class:`InterfereConfig`).
        out_dir: where ``interfere.json``, ``interfere.csv`` and the heatmaps go; each matrix's measures
            are journaled to ``interfere.jsonl`` there as they are computed.
        callback: ``callback(done, total, name)`` after each matrix.
        plots: write the heatmaps into ``out_dir``.
        resume: finish an interrupted run in ``out_dir`` from its journal (same inputs and options).

    Returns:
        :class:`InterfereResult`. Each module record holds ``ranks`` (triplets used per task),
        ``fro`` (‖ΔW_t‖_F), ``rel_norm`` (‖ΔW_t‖_F/‖W_base‖_F; None where ‖W_base‖_F is 0 or not finite), the n × n
        matrices ``cosine``, ``phi``, ``captured`` (row s: whose subspaces, column t: whose energy),
        ``tsv.pairs`` and ``knots.alignment``, the n-way ``tsv`` (``sti``, ``relative``) and ``knots``
        (``rank``, ``energy_rank``, ``task_energy_rank``), ``sum`` (:class:`spectra.interference.Accumulation`),
        and ``unresolved`` (the tasks whose non-zero dense update is entirely at the rounding level of its
        stored weights: no direction). Undefined values (a zero update has no cosine or subspace; a
        rounding-level one no subspace; the n-way TSV with fewer than two tasks of directions) are None.

    Raises:
        ConfigError: fewer than two tasks.
        PairingError: the tasks update no matrix in common, or one does not pair with the base.
        CheckpointFormatError: an adapter's shapes do not fit the base (another base model).

    Example:
        >>> res = interfere("base/", ["lora-code/", "lora-json/"], out_dir="ifr")   # doctest: +SKIP
        >>> res.summary["cosine"]                                                   # doctest: +SKIP
    """
    config = config_of(config, InterfereConfig)
    if resume and out_dir is None:
        raise ConfigError("resume needs the output folder of the interrupted run", hint="pass --out DIR with --resume")
    t0 = time.perf_counter()
    if isinstance(tuned_list, (str, bytes, os.PathLike)):  # one path: its characters were taken for the tasks ("t: no such file")
        raise ConfigError(f"interfere takes a list of fine-tunes. Got one path, {str(tuned_list)!r}, instead",
                          hint="pass [T1, T2, ...]: at least two fine-tunes of the base")
    labels = [str(t) for t in tuned_list]
    if len(labels) < 2:
        raise ConfigError(f"interfere needs at least two fine-tunes. Got {len(labels)} instead",
                          hint="pass --base BASE T1 T2 [T3 ...]")
    device = resolve_device(config.device)
    check_device_available(device)
    base_ckpt = open_checkpoint(base)
    keep = selector(config.include, config.exclude, config.layers)
    tasks = [_Task(lbl, base_ckpt, keep) for lbl in labels]
    result = InterfereResult(base=str(base), tasks=labels, names=_short_names(labels), kinds=[t.kind for t in tasks],
                             config=asdict(config), device=str(device))
    for t in tasks:
        result.skipped += t.skipped
    # how each folder was read (several weight sets in one: the one transformers reads), once each
    result.warnings += read_notes((base_ckpt, *(t.ckpt for t in tasks), *(t.adapter for t in tasks)))
    result.warnings += [w for t in tasks if t.adapter is not None and (w := recorded_base_warning(t.adapter, base_ckpt))]
    # as compare says of A and B: a task given twice makes its pairs an update measured against itself
    # the files read, not the spelling: a folder and its weights file, or a link to either, are one checkpoint
    ids = [weights_identity(t.weights, t.label) for t in tasks]
    same = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels)) if ids[i] == ids[j]]
    groups = [[i, *(j for j in range(i + 1, len(labels)) if ids[j] == ids[i])] for i in range(len(labels))
              if ids[i] not in ids[:i] and ids.count(ids[i]) > 1]  # one warning for a checkpoint given three times
    result.warnings += [f"tasks {', '.join(result.names[i] for i in g[:-1])} and {result.names[g[-1]]} are the same checkpoint "
                        f"({labels[g[0]]}): {'their pair compares' if len(g) == 2 else 'their pairs compare'} an update with itself"
                        for g in groups]
    specs = describe_checkpoint({n: i.shape for n, i in base_ckpt.tensors.items()}, base_ckpt.arch)
    every = set.intersection(*(set(t.updates) for t in tasks))
    some = set.union(*(set(t.updates) for t in tasks)) - every
    result.partial = [{"name": n, "tasks": [i for i, t in enumerate(tasks) if n in t.updates]}
                      for n in sorted(some) if n in specs and keep(n, specs[n].layer)]
    todo: list[tuple[str, MatrixSpec]] = []
    for name in every:
        spec = specs.get(name)
        if spec is None or not keep(name, spec.layer):
            continue
        if len(base_ckpt.tensors[name].shape) != 2:
            result.skipped.append({"name": name, "reason": "3-D expert stack: interfere compares 2-D matrices only"})
            continue
        resized = [t.label for t in tasks if isinstance(t.updates[name], MatrixPair) and t.updates[name].rows is not None]
        if resized:
            result.skipped.append({"name": name, "reason": f"rows differ from the base in {', '.join(resized)} "
                                                           "(resized vocabulary): interfere compares equal shapes only"})
            continue
        todo.append((name, spec))
    if not todo:
        why = f"; skipped, e.g. {result.skipped[0]['name']}: {result.skipped[0]['reason']}" if result.skipped else ""
        raise PairingError(f"the fine-tunes update no matrix in common (after --include/--exclude/--layers){why}",
                           path=", ".join(labels), hint="are they fine-tunes of the same base model, with shared target modules?")
    todo.sort(key=lambda ns: (ns[1].layer if ns[1].layer is not None else -1, role_sort_key(ns[1].role, ns[1].module), ns[0]))
    if w := fused_whole_warning((spec for _, spec in todo), "interfere"):
        result.warnings.append(w)
    journal, done = _journaled(todo, tasks, base_ckpt, config, out_dir, resume, result.warnings)
    with contextlib.ExitStack() as held:
        if journal is not None:  # finished, failed or stopped: no lock left in the folder (the journal stays)
            held.callback(journal.release)
        # float64 sum, one update held in float64, the one being formed: a 128256 × 4096 embedding's are some 19 GB
        if dense := [(math.prod(spec_shape(sp, base_ckpt)), n, sp) for k, (n, sp) in enumerate(todo)
                     if k not in done and any(t.needs_dense(n) for t in tasks)]:  # (a resume: what is left to measure)
            size, name, spec = max(dense, key=lambda x: x[0])
            refuse_beyond_memory(f"{name} {spec_shape(spec, base_ckpt)}", size * DENSE_MIN_BYTES, "interfere's float64 sums and "
                                 "updates", device, hint=f"--exclude '{spec.module}' (spectra diff measures each task's update in far less)")
        for i, (name, spec) in enumerate(todo):
            if i in done:
                rec = done[i]
            else:
                try:
                    rec = {"module": measure_module(name, spec, tasks, base_ckpt, config, device)}
                except _SkipModule as exc:
                    rec = {"skipped": {"name": name, "reason": str(exc)}}
                if journal is not None:
                    journal.add({"i": i, **rec})
            if "module" in rec:
                result.modules.append(rec["module"])
            else:
                result.skipped.append(rec["skipped"])
            if callback:
                callback(i + 1, len(todo), name)
        result.summary = summarise(result.modules)
        if tied := [m["name"] for m in result.modules if "tied singular values" in (m.get("note") or "")]:
            result.warnings.append(f"{len(tied)} of {len(result.modules)} matrices (e.g. {tied[0]}) hold tied singular values in a "
                                   "task's kept triplets: its TSV entries there are a solver's choice (each one's note in "
                                   "interfere.json)")
        # copies under two paths (a path given twice is said above)
        result.warnings += [f"tasks {result.names[i]} and {result.names[j]} have updates of the same norm, to 12 digits, on "
                            f"every one of the {k} matrices: copies of one fine-tune? their pair compares an update with itself"
                            for i in range(len(tasks)) for j in range(i + 1, len(tasks))
                            if (i, j) not in same and (k := copies(result.modules, i, j))]
        for i, t in enumerate(tasks):
            # over the matrices it changed, as diff and compare take it (its unchanged ones, as 0, hid a large update)
            if big := oversized_update(m["rel_norm"][i] for m in result.modules):
                result.warnings.append(f"{t.label}: {oversized_words(big)}")
            result.warnings += [f"{t.label}: {note}" for note in t.pair_notes]
            own = [(m["name"], note_part(m.get("note"), f"{t.label}: ")) for m in result.modules]
            result.warnings += note_caveat_warnings(own, len(result.modules), f" of {t.label}")
            noise = [m["name"] for m in result.modules if i in m.get("unresolved", ())]
            if noise:
                result.warnings.append(f"{t.label}: ΔW of {len(noise)} of {len(result.modules)} compared matrices (e.g. {noise[0]}) "
                                       "is entirely at the rounding level of its stored weights: no resolved direction, so "
                                       "its φ, captured energy, TSV and KnOTS entries there are null (not 0)")
            zero = sum(not m["fro"][i] for m in result.modules)
            if len(result.modules) > zero and zero * 2 > len(result.modules):  # its pairs' medians rest on the few it changed
                result.warnings.append(f"{result.names[i]}: ΔW = 0 on {zero} of the {len(result.modules)} compared matrices: its "
                                       f"pairs' medians are over the {len(result.modules) - zero} it changed (pair_modules in the summary)")
        result.warnings += zero_tasks_warning(result)
        # a folder given twice repeats its per-task caveats word for word: said once
        result.warnings = list(dict.fromkeys(result.warnings))
        result.complete = True
        result.elapsed_s = time.perf_counter() - t0
        if out_dir is not None:
            result.save(out_dir, plots=plots)
    return result


#: interfere's journal in its folder: one line per matrix as it is measured (``--resume``).
JOURNAL = "interfere.jsonl"


#: The keys of a module record that the summary and the outputs read, and their shapes: per task (n) or n × n.
_PER_TASK, _PER_PAIR = ("ranks", "fro", "rel_norm"), ("cosine", "phi", "captured")


def _journaled(todo: list[tuple[str, MatrixSpec]], tasks: list[_Task], base: Checkpoint, config: InterfereConfig,
               out_dir: str | Path | None, resume: bool, warnings: list[str]) -> tuple[RecordJournal | None, dict[int, dict[str, Any]]]:
    """The journal of a run into ``out_dir``, started (the folder locked; an earlier interfere's files
    removed unless resuming), and with ``resume`` the records it holds by plan index (``{"module": …}`` or
    ``{"skipped": …}``); ``(None, {})`` without ``out_dir``.

    Raises:
        ConfigError: ``resume`` without a journal, or a journal of other inputs or options.
        ResultsFormatError: a record interfere did not write, or of a matrix this run does not measure at its place.
    """
    if out_dir is None:
        return None, {}
    weights = [t.weights for t in tasks]
    options = {k: v for k, v in asdict(config).items() if k not in ("device", "max_dense_bytes")}  # neither moves a number
    # the labels as typed too: the records' notes name them (another spelling would mix two in one result)
    journal, records = start_sealed(Path(out_dir) / JOURNAL, [base, *weights], {**options, "tasks": [t.label for t in tasks]},
                                    resume=resume, clear=lambda: remove_earlier_outputs(
                                        Path(out_dir), "interfere.json", SCHEMA, INTERFERE_FILES, ("interfere_*.png",)))
    n, done = len(tasks), {}
    records = first_by_index(records, warnings, of="a matrix")  # a line repeated by hand replaced the first
    for line, rec in records:
        body = rec.get("module", rec.get("skipped"))
        i = rec.get("i")
        ok = (isinstance(body, dict) and isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(todo)
              and body.get("name") == todo[i][0])
        if ok and "module" in rec:
            ok = (all(isinstance(body.get(k), list) and len(body[k]) == n for k in _PER_TASK + _PER_PAIR)
                  and all(isinstance(row, list) and len(row) == n for k in _PER_PAIR for row in body[k])
                  and all(isinstance(body.get(k), dict) for k in ("tsv", "knots", "sum")))
        elif ok:
            ok = isinstance(body.get("reason"), str)
        if not ok:
            raise ResultsFormatError(f"record {line} is not one this run wrote for its matrix at that place (an edited "
                                     "journal, or another run's)", path=journal.path, hint="run without --resume into a new folder")
        done[i] = {"module" if "module" in rec else "skipped": body}
    return journal, done
