"""``spectra compare A B [--base BASE]``: how two updates of the same base relate (docs/definitions.md, "Subspaces").

A and B are each a PEFT LoRA adapter (ΔW = s·B·A, decomposed from its factors) or a full fine-tuned
checkpoint (ΔW = W_tuned − W_base, which needs ``base``). For every module both update, the paper
measures are computed on the top singular subspaces: Hu et al.'s φ grid with its random baseline,
principal angles and the Grassmann distance, the energy of each update captured by the other's
subspaces next to the best any subspace of that rank can capture, and, with the base, Hu et al.'s
amplification factor and Shuttleworth et al.'s intruder dimensions for each side. Matrices are compared
whole: fused matrices (``qkv_proj``, ``c_attn``) are not split here.

Cost: no SVD of a dense matrix. A LoRA update is decomposed from its factors; a dense update's top-k triplets, the
base weight's left singular basis (computed once per module and shared by the intruders of both sides and by both
amplification factors) and the top-k left singular vectors of each ``W + ΔW`` come from float64 Gram eigensolves that
compute only the vectors asked for (:mod:`spectra.singular_bases`, which states their precision). Modules run on
several threads on the CPU, one BLAS thread each; the numbers do not depend on it.

Undefined measures are null, never numbers from an arbitrary basis: an update that is exactly zero
(a frozen module, a LoRA saved at initialisation with B = 0) has no singular subspace, nor has a non-zero
dense one entirely at the rounding level of its stored weights (status ``unresolved``). A module with
NaN/Inf in a LoRA factor, a weight or the update is skipped with its reason, as is a tensor an adapter
stores whole (``modules_to_save``: not a LoRA update; ``spectra diff BASE ADAPTER`` measures it).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from spectra.adapter_diff import adapter_updates, merged_skips, recorded_base_warning, saved_skips, tied_compare_notes
from spectra.compare_findings import input_warnings
from spectra.compare_records import (
    SCHEMA,
    AngleSummary,
    ComparedModule,
    CompareResult,
    IntruderSummary,
    PhiSummary,
    from_journal_record,
    journal_record,
    unresolved_reason,
    zero_reason,
)
from spectra.config import CompareConfig, config_of, public_entry
from spectra.delta import form_delta, oriented, pair_floor, pair_notes
from spectra.engine import COMPARE_BATCH_BYTES, MEASURE_COPIES, MEASURE_MIN_COPIES
from spectra.errors import ConfigError, PairingError, ResultsFormatError
from spectra.io.adapter import ZERO_LORA, Adapter, LoraModule, is_adapter
from spectra.io.checkpoint import Checkpoint, open_checkpoint, read_notes
from spectra.io.files import atomic_write_text, folder_lock, remove_earlier_outputs, same_file
from spectra.io.paths import checkpoint_location
from spectra.journal import RecordJournal, first_by_index, start_sealed
from spectra.linalg import all_finite, check_device_available, resolve_device
from spectra.metrics import factored_rank, numerical_rank, outside_squaring_range
from spectra.naming import MatrixSpec, describe_checkpoint, describe_updates, pairing_key, unique_pairing_keys
from spectra.pairing import PAIRING_NOTE_PREFIX, MatrixPair, pair_checkpoints, pair_tied_heads, refuse_lora_file
from spectra.pairing_notes import unpaired_matrices
from spectra.param_experts import open_adapter_on
from spectra.plan import refuse_beyond_memory
from spectra.plots.base import preload as preload_plots
from spectra.plots.compare import compare_plots
from spectra.results import note_caveat_warnings, note_part, rows_to_csv
from spectra.roles import role_sort_key
from spectra.selection import fused_whole_warning, refuse_empty_selection, selector
from spectra.singular_bases import TopSVD, WeightBasis, top_svd
from spectra.sketch import randomized_svd
from spectra.subspaces import (
    Factored,
    amplification,
    captured_energy,
    grassmann_distance,
    intruder_dimensions,
    phi_grid,
    phi_random_baseline,
    principal_angles,
    random_orthonormal,
    top_subspace,
)
from spectra.threads import check_workers, imap_one_blas_thread
from spectra.ties import cut_in_tie, tie_cut, tied_cuts
from spectra.trace_inputs import open_weights

__all__ = ["SCHEMA", "CompareResult", "ComparedModule", "compare"]

#: Above this p a full update's top-k comes from the randomized SVD (relative tolerance 1e-3 on the
#: singular values) instead of the exact float64 Gram eigensolve of :func:`spectra.singular_bases.top_svd`.
EXACT_MAX_P = 4096


def _beyond_squaring(M: torch.Tensor) -> str | None:
    """Why the measures cannot be formed from ``M`` (float64 entries whose squares over- or underflow:
    only float64 weights reach this), or None. ``spectra diff`` scales such matrices and measures them.
    Any other dtype is None at once: every float32 (or narrower) value squares within float64's range."""
    amax = float(M.abs().max()) if M.numel() and M.dtype == torch.float64 else 0.0
    return (f"has entries of magnitude {amax:.3g}, whose squares leave float64's range: compare cannot measure it "
            "(spectra diff can: it scales before squaring)") if outside_squaring_range(amax) else None


def _resolved_rank(form: Factored | TopSVD, p: int, floor: float = 0.0) -> int:
    """How many directions an update's singular values resolve: a dense update's (the float64 Gram
    route's top values) down to σ₁·√(p·u) (:func:`spectra.metrics.numerical_rank`) and above ``floor``,
    the rounding floor of the weights it was formed from (:func:`spectra.delta.pair_floor`); a factored one's
    (a LoRA's s·B·A, an SVD of its exact factors, accurate to ~u·σ₁) down to
    :data:`spectra.metrics.RANK_TOL`·σ₁, as ``spectra interfere`` counts them: a LoRA direction at
    1e-9·σ₁ is a direction, which the Gram route's 1e-7·σ₁ would drop."""
    S = form.S.detach().cpu().numpy()
    if isinstance(form, TopSVD):
        return min(numerical_rank(S, p), int(np.count_nonzero(floor < S)))
    return factored_rank(S)


def _tie_widened(u: _Update | str, r: int, p: int) -> tuple[_Update | str, int, str]:
    """``(u, r, tie)``: a dense update's rank ``r`` widened past singular values tied with the r-th
    (:func:`spectra.ties.tie_cut`), its triplets recomputed when the tie reaches past the ones
    computed; ``tie`` is ``"widened"``, ``"undetermined"`` (a cluster too wide to widen: the top-r
    subspace is not determined) or ``""``. A factored (LoRA) update, an approximate one (p above
    :data:`EXACT_MAX_P`) or r = 0 is as is."""
    if isinstance(u, str) or not isinstance(u.form, TopSVD) or r == 0 or p > EXACT_MAX_P:
        return u, r, ""
    form = u.form
    wide = tie_cut(form.S, r, _resolved_rank(form, p, u.floor), u.floor, p)
    if wide > r and wide >= form.S.numel() and form.S.numel() < p:  # the tie may go on past the triplets computed
        form = top_svd(form.dense.to(torch.float64), min(p, r + max(r, 8) + 2))
        wide = tie_cut(form.S, r, _resolved_rank(form, p, u.floor), u.floor, p)
    if wide > r:
        return replace(u, form=form), wide, "widened"
    return u, r, "undetermined" if cut_in_tie(form.S, r, _resolved_rank(form, p, u.floor), u.floor, p) else ""


def _holding(u: _Update, n: int, p: int) -> _Update:
    """``u`` with a dense form of at least ``min(n, p)`` triplets (recomputed when it holds fewer)."""
    fewer = isinstance(u.form, TopSVD) and u.form.S.numel() < min(n, p)
    return replace(u, form=top_svd(u.form.dense.to(torch.float64), min(n, p))) if fewer else u


@dataclass(frozen=True)
class _Update:
    """One side's update of one module: ``form`` is exact (a LoRA's thin SVD, or a dense update with
    its top-k triplets); ``energy`` is ``‖ΔW‖_F²``."""

    form: Factored | TopSVD
    energy: float
    notes: tuple[str, ...] = ()  # numerical caveats of a dense ΔW (spectra.numerics: rounding level…)
    floor: float = 0.0  # a dense ΔW's storage rounding floor (spectra.storage_floor.rounding_floor); 0: none
    stored: str = ""  # the stored dtype(s) that floor comes from, for the notes ("float32", "float32/bfloat16")


class _Side:
    """One input of a comparison: per base tensor (pairing key), where its update comes from."""

    def __init__(self, source: str | Checkpoint, base: Checkpoint | None, config: CompareConfig):
        opened = source if isinstance(source, Checkpoint) else None
        self.label = label = opened.label if opened is not None else str(checkpoint_location(source))
        self.base = base
        self.config = config
        self.adapter: Adapter | None = None
        self.tuned: Checkpoint | None = None
        self.mods: dict[str, LoraModule] = {}
        self.pairs: dict[str, MatrixPair] = {}
        # adapter modules measured against a base tensor of another name (a head tied to the embedding):
        # pairing key -> (the module's spec, the base tensor)
        self.tied: dict[str, tuple[MatrixSpec, str]] = {}
        self.skipped: dict[str, str] = {}  # pairing key -> why its pairing left this matrix out (a full side)
        self.stacks: dict[str, MatrixSpec] = {}  # pairing key -> spec of a paired 3-D expert stack (a full side)
        self.pair_notes: list[str] = []  # what pairing said (names that differ only in spelling…), as diff warns it
        # pairing key -> (name, why it is not compared, layer) of each tensor an adapter stores whole (modules_to_save)
        self.saved: dict[str, tuple[str, str, int | None]] = {}
        if opened is None and is_adapter(label):
            self.adapter = open_adapter_on(label, base, keep=selector(config.include, config.exclude, config.layers))
            self.kind = "lora"
            if base is not None:  # every adapted module exists in the base, same shape
                self.tied = {pairing_key(m.weight_name): (sp, n) for m, sp, n in adapter_updates(self.adapter, base)
                             if n is not None and pairing_key(n) != pairing_key(m.weight_name)}
            self.mods = {pairing_key(m.weight_name): m for m in self.adapter.modules.values()}
            self.saved = {pairing_key(n): (n, why, layer) for n, why, layer in saved_skips(self.adapter, base)}
            self.names = {k: m.weight_name for k, m in self.mods.items()}
        else:
            self.tuned = opened or open_checkpoint(label)  # first: a missing path is "no such file", not "needs --base"
            if base is None:
                refuse_lora_file(self.tuned)
                raise ConfigError(f"{label} is a full checkpoint: its update needs the base model", hint="pass --base BASE")
            self.kind = "full"
            # the same pairing as `spectra diff`: wrapper prefixes, skipped non-float or mismatched
            # matrices, shared rows of a resized vocabulary, a tuned head on a base that ties it (keyed by
            # the head's name: the embedding keeps its own key)
            pairing = pair_checkpoints(base, self.tuned, tied_head=True, aliases=False)  # tied names matched by name
            self.stacks = {pairing_key(p.tuned.name): p.tuned for p in pairing.pairs if len(p.tuned_info.shape) != 2}
            self.pair_notes = [n for n in pairing.notes if n.startswith(PAIRING_NOTE_PREFIX)]  # read notes: said apart
            if unpaired := unpaired_matrices(pairing, self.tuned, selector(config.include, config.exclude, config.layers))[0]:
                self.pair_notes.append(f"{unpaired}: not compared (spectra diff BASE {label} lists them)")  # was said nowhere
            for p in (p for p in pairing.pairs if len(p.tuned_info.shape) == 2):
                tied = p.tuned.role == "head" and p.base.role == "embed"
                key = pairing_key(p.tuned.name if tied else p.base.name)
                if key in self.pairs:  # model.layers.0.x and layers.0.x in one base: one key, two matrices
                    raise ConfigError(f"the base holds {self.pairs[key].base.name} and {p.base.name}, which compare keys "
                                      "alike (a wrapper prefix apart)", hint="spectra diff and interfere measure each by its name")
                self.pairs[key] = p
                if tied:
                    self.tied[key] = (replace(p.tuned, transpose=p.base.transpose, note=p.note), p.base.name)
            self.names = {k: p.tuned.name for k, p in self.pairs.items()}
            self.skipped = {pairing_key(x.name): x.reason for x in pairing.skipped}

    def own_specs(self) -> dict[str, MatrixSpec]:
        """Pairing key -> spec of each updated matrix, from this side's names alone (no base)."""
        if self.kind == "lora":
            specs = describe_updates({m.weight_name: m.shape for m in self.mods.values()}, fan_in_fan_out=self.adapter.config.fan_in_fan_out)
            return {k: specs[m.weight_name] for k, m in self.mods.items() if m.weight_name in specs}
        return {k: p.base for k, p in self.pairs.items()}

    def shape(self, key: str) -> tuple[int, int]:
        """``(out, in)`` of the update, without reading it."""
        if self.kind == "lora":
            return tuple(self.mods[key].shape)  # type: ignore[return-value]
        return self.pairs[key].out_in

    def rank(self, key: str, shape: tuple[int, int]) -> int:
        """The subspace rank: a LoRA's r (at most p), or ``top_k`` of a dense update (full, DoRA)."""
        p = min(shape)
        if self.kind == "lora":
            mod = self.mods[key]
            return min(mod.r, p) if mod.magnitude is None else min(mod.r, self.config.top_k, p)
        return min(self.config.top_k, p)

    def is_dora(self, key: str) -> bool:
        """Whether the module ``key`` is a DoRA module (a dense update of more than r directions)."""
        return self.kind == "lora" and self.mods[key].magnitude is not None

    def update(self, key: str, W: torch.Tensor | None, transpose: bool, device: torch.device, need: int,
               base_name: str | None = None, rows: int | None = None) -> _Update | str:
        """The update, or why it cannot be measured (NaN/Inf, overflow) as one line.

        ``W`` is the base weight ``base_name`` as stored (DoRA needs it; a full update reuses it
        instead of reading it again); a dense update keeps its top
        ``max(top_k, need)`` singular triplets (``need``: the largest rank any measure of the module
        uses, e.g. the other side's r for the best energy a rank-r subspace can capture). ``rows``: the rows compared
        when fewer than this side's (the other side's vocabulary resized further, :func:`_shared_rows`)."""
        if self.kind == "lora":
            mod = self.mods[key]
            Bf, Af = mod.factors()
            for what, t in (("lora_B", Bf), ("lora_A", Af)) + ((("magnitude", mod.magnitude),) if mod.magnitude is not None else ()):
                if not all_finite(t):
                    return f"{what} of {mod.module} in {self.label} contains NaN or Inf"
            if mod.magnitude is not None:  # DoRA: dense, needs the base
                if W is None:
                    raise ConfigError("a DoRA adapter's update depends on the base weights", hint="pass --base BASE")
                dense = mod.dora_delta(W.mT if transpose else W).to(device)
                return self._dense(dense, mod.module, need)
            f = Factored.from_lora(Bf.to(device), Af.to(device), mod.scale)
            if not bool(torch.isfinite(f.S).all()):
                return f"the update s·B·A of {mod.module} in {self.label} overflows float64 (scale {mod.scale:g})"
            top = float(f.S.max()) if f.S.numel() else 0.0
            if outside_squaring_range(top):  # its energy would be inf or 0: measured as exactly zero before
                return (f"the update s·B·A of {mod.module} in {self.label} has σ₁ = {top:.3g}, whose square leaves "
                        "float64's range: compare cannot measure it (spectra diff can: it scales before squaring)")
            return _Update(f, float((f.S.double() ** 2).sum()))
        pair = self.pairs[key]
        stored = W if W is not None and base_name == pair.base.name else self.base.load(pair.base.name)
        cut = rows if rows is not None and rows < pair.out_in[0] else pair.rows
        wb = oriented(stored, pair.base.transpose, cut)
        wt = oriented(self.tuned.load(pair.tuned.name), pair.tuned.transpose, cut)
        dense, base_fro, bad = form_delta(wb, wt, device)
        if bad:
            what = ("the difference of the weights overflows" if bad == ["overflow"]
                    else f"the {' and '.join(bad)} weights contain NaN or Inf")
            return f"{what} ({pair.tuned.name} in {self.label})"
        u = self._dense(dense, pair.tuned.name, need)
        if isinstance(u, str):  # a bf16 update at the rounding level measures rounding noise: said, as spectra diff says it
            return u
        # a resized vocabulary's shared rows are what is compared: said, as spectra diff says it
        resized = [pair.note] if pair.rows is not None and pair.note else []
        if cut != pair.rows:
            resized.append(f"the other input's vocabulary was resized otherwise: of these, the {cut} leading rows all three "
                           "have are compared")
        notes = pair_notes(pair, wb, wt, dense, base_fro)  # the floor's dtype: the tuned side's rounding
        return replace(u, notes=(*resized, *notes), floor=pair_floor(pair, wb, wt, notes, dense), stored=pair.tuned_info.dtype)

    def _dense(self, dense: torch.Tensor, name: str, need: int) -> _Update | str:
        if not all_finite(dense):
            return f"the update of {name} in {self.label} contains NaN or Inf"
        why = _beyond_squaring(dense)  # before the upcast: a float32 update is in range (no pass over it)
        dense = dense.to(torch.float64)  # once: every measure works in float64
        if why:
            return f"the update of {name} in {self.label} {why}"
        p = min(dense.shape)
        k = min(max(self.config.top_k, need) + 1, p)  # one more: whether the cut lies in a tie (_tie_widened)
        if p <= EXACT_MAX_P:
            top = top_svd(dense, k)
        else:
            t = randomized_svd(dense, k, tol=1e-3, generator=torch.Generator().manual_seed(self.config.seed))
            energy = float(torch.linalg.vector_norm(dense.double()) ** 2)
            top = TopSVD(dense, t.U.double(), torch.as_tensor(t.S, device=dense.device, dtype=torch.float64), t.Vh.double(), energy)
        return _Update(top, top.energy)


@dataclass(frozen=True)
class _Job:
    """What one module's measures need, decided in order before any work (so that runs on several
    threads draw the same random bases as one thread)."""

    key: str
    spec: MatrixSpec
    base_name: str | None
    shape: tuple[int, int]
    rank_a: int
    rank_b: int
    random_seed: int | None  # of the random bases of amplification's baseline (None: no base weights)


def _shared_rows(A: _Side, B: _Side, key: str, spec: MatrixSpec) -> tuple[int, int]:
    """The ``(out, in)`` compared of module ``key``: A's, or, for a vocabulary table two full checkpoints resized
    differently (one shrunk, one grown: each pairs its own leading rows with the base's), the rows all three share."""
    shape, other = A.shape(key), B.shape(key)
    if A.kind == B.kind == "full" and shape[1] == other[1] and (A.pairs[key].rows, B.pairs[key].rows) != (None, None):
        return min(shape[0], other[0]), shape[1]  # (rows the pairing shared: a vocabulary table, by role or by row count)
    return shape


def _refuse_beyond_memory(jobs: list[_Job], device: torch.device) -> None:
    """Refuse a run whose largest module's float64 measures need more than the free memory (a 128256 × 4096 embedding
    grew past 22 GB, to be killed by the kernel): named, with the way to leave it out."""
    if (big := max(jobs, key=lambda j: j.shape[0] * j.shape[1], default=None)) is not None:
        refuse_beyond_memory(f"{big.spec.name} {big.shape}", MEASURE_MIN_COPIES * 8 * math.prod(big.shape), "compare's float64 measures",
                             device, hint=f"--exclude '{big.spec.module}' (spectra diff measures it in far less)")


def _random_bases(job: _Job, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The Haar-random ``(U (out, r), V (in, r))`` of amplification's random baseline for each side, drawn
    from the module's own generator (``job.random_seed``): a's U, a's V, b's U, b's V."""
    gen = torch.Generator().manual_seed(job.random_seed if job.random_seed is not None else 0)
    out_dim, in_dim = job.shape
    return {who: (random_orthonormal(out_dim, r, gen, device), random_orthonormal(in_dim, r, gen, device))
            for who, r in (("a", job.rank_a), ("b", job.rank_b))}


def _top_share(form: Factored | TopSVD, r: int) -> float:
    """The share of a dense update's energy in its top r singular values (1 for a factored one)."""
    if not isinstance(form, TopSVD) or form.energy <= 0:
        return 1.0
    return min(1.0, float((form.S[:r] ** 2).sum()) / form.energy)


def _floor_cuts(form: Factored | TopSVD, floor: float, r: int) -> bool:
    """Whether the rounding floor, not the float64 resolution, ended a dense update's resolved directions at ``r``."""
    return r < form.S.numel() and float(form.S[r]) <= floor


def _measure(job: _Job, A: _Side, B: _Side, base: Checkpoint | None, config: CompareConfig,
             device: torch.device) -> tuple[ComparedModule, dict[str, list[list[float]]]] | dict[str, str]:
    """The measures of one module (pure given its inputs; runs on a worker thread), or a skip record."""
    spec, (out_dim, in_dim) = job.spec, job.shape
    W_stored = base.load(job.base_name) if base is not None and job.base_name is not None else None
    W = None
    if W_stored is not None:
        # float64 once: every measure works in float64 (shared rows of a resized vocabulary)
        oriented_W = (W_stored.mT if spec.transpose else W_stored)[:out_dim]
        W = oriented_W.to(device=device, dtype=torch.float64).contiguous()
        if not all_finite(W):
            return {"name": spec.name, "reason": f"the base weights of {spec.name} contain NaN or Inf"}
        why = _beyond_squaring(oriented_W)  # as stored: float32 or narrower weights are in range (no pass over them)
        if why:
            return {"name": spec.name, "reason": f"the base weights of {spec.name} {why}"}
    need = max(job.rank_a, job.rank_b)
    ua = A.update(job.key, W_stored, spec.transpose, device, need, job.base_name, out_dim)
    ub = B.update(job.key, W_stored, spec.transpose, device, need, job.base_name, out_dim)
    for u in (ua, ub):
        if isinstance(u, str):
            return {"name": spec.name, "reason": u}
    for who, u in (("A", ua), ("B", ub)):
        if u.form.shape != (out_dim, in_dim):
            return {"name": spec.name, "reason": f"{who}'s update is {u.form.shape[0]}×{u.form.shape[1]}, not {out_dim}×{in_dim}"}
    zero_a, zero_b = ua.energy == 0.0, ub.energy == 0.0
    # a subspace of more directions than the update resolves would be filled with arbitrary ones
    # (a LoRA whose B has zero columns, a full update of a few rows): its resolved rank is used
    # (a dense update's directions at or below the rounding floor of its stored weights are rounding noise)
    ra, rb = (0 if zero else min(r, _resolved_rank(u.form, min(out_dim, in_dim), u.floor))  # a zero update has no direction
              for r, u, zero in ((job.rank_a, ua, zero_a), (job.rank_b, ub, zero_b)))
    # a cut inside tied singular values is widened to the whole tie (as trace and interfere do)
    (ua, ra, tie_a), (ub, rb, tie_b) = (_tie_widened(u, r, min(out_dim, in_dim)) for u, r in ((ua, ra), (ub, rb)))
    if "widened" in (tie_a, tie_b):  # the other side's best rank-r energy needs as many of its values as the widened rank
        ua, ub = (_holding(u, max(ra, rb), min(out_dim, in_dim)) for u in (ua, ub))
    fewer = [f"{who}'s update resolves {r} direction{'s' * (r != 1)}"
             f"{f' above the rounding level of its {u.stored} weights' if u.floor > 0 and _floor_cuts(u.form, u.floor, r) else ''}"
             f", fewer than its rank {asked}"
             for who, u, r, asked, zero in (("A", ua, ra, job.rank_a, zero_a), ("B", ub, rb, job.rank_b, zero_b))
             if 0 < r < asked]  # r = 0 (zero, or all rounding noise): no subspace at all, which status and reason say
    # a side whose every direction is rounding noise has no subspace: its measures are null, as for a zero update
    unresolved_a, unresolved_b = (r == 0 and not zero for r, zero in ((ra, zero_a), (rb, zero_b)))
    # a DoRA update (m ⊙ column-normalised W + sBA, minus W) is dense: its top r directions stand for it
    dora = [f"{who}'s DoRA update is dense: its top {r} directions, {_top_share(u.form, r):.1%} of its energy, are compared"
            for who, s, u, r, zero in (("A", A, ua, ra, zero_a), ("B", B, ub, rb, zero_b)) if s.is_dora(job.key) and not zero]
    tied = [f"{who}'s rank {asked} cut through tied singular values: its top {r}, the whole tie, are compared"
            if tie == "widened" else
            f"{who}'s rank {asked} cuts a cluster of tied singular values too wide to widen (past {asked + max(asked, 8)}): "
            "its top-r subspace is not determined, and the measures depend on the solver's choice within the cluster"
            for who, r, asked, tie in (("A", ra, job.rank_a, tie_a), ("B", rb, job.rank_b, tie_b)) if tie]
    sides = ("left", "right") if config.side == "both" else (config.side,)
    numeric = [f"{who}: {n}" for who, u in (("A", ua), ("B", ub)) for n in u.notes]
    rec = ComparedModule(name=spec.name, layer=spec.layer, module=spec.module, role=spec.role, out=out_dim, in_=in_dim,
                         rank_a=ra, rank_b=rb, fro_a=ua.energy ** 0.5, fro_b=ub.energy ** 0.5,
                         note="; ".join([*([f"{'; '.join(fewer)}: subspaces of the resolved rank are compared"] if fewer else []),
                                         *dora, *tied, *numeric]) or None)
    grids: dict[str, list[list[float]]] = {}
    if zero_a or zero_b or unresolved_a or unresolved_b:
        noise = [unresolved_reason(ua.stored if unresolved_a else None, ub.stored if unresolved_b else None)] if unresolved_a or unresolved_b else []
        # the other side may be all rounding noise: said too, or its update would read as measured
        rec.status, rec.reason = ("zero_update", "; ".join([zero_reason(zero_a, zero_b), *noise])) if zero_a or zero_b else ("unresolved", noise[0])
        rec.phi = dict.fromkeys(sides)
        rec.angles = dict.fromkeys(sides)
        rec.captured = {"b_in_a": None, "a_in_b": None}
    else:
        fa, fb = ua.form, ub.form
        # φ(i, j) at a cut i (or j) between tied values compares an arbitrary part of the tie: not determined
        p = min(out_dim, in_dim)
        cuts_a, cuts_b = tied_cuts(fa.S, ra, ua.floor, p), tied_cuts(fb.S, rb, ub.floor, p)
        undefined = cuts_a[:, None] | cuts_b[None, :]
        if undefined.any():
            whose = "A's and B's" if cuts_a.any() and cuts_b.any() else ("A's" if cuts_a.any() else "B's")
            rec.note = "; ".join(x for x in (rec.note, f"{whose} top directions hold tied singular values: φ(i, j) at a cut "
                                              "inside a tie depends on the solver's choice, so those φ grid entries are null "
                                              "(φ₁₁ too when σ₁ is tied) and the grid's mean is over the others") if x)
        for side in sides:
            QA, QB = top_subspace(fa, ra, side), top_subspace(fb, rb, side)
            d = QA.shape[0]
            grid = np.where(undefined, np.nan, phi_grid(QA, QB))
            grids[side] = [[None if math.isnan(x) else x for x in row] for row in grid.round(6).tolist()]
            rec.phi[side] = PhiSummary(phi_full=float(grid[-1, -1]), phi_11=None if undefined[0, 0] else float(grid[0, 0]),
                                       mean=float(np.nanmean(grid)), random=phi_random_baseline(ra, rb, d), d=d)
            ang = principal_angles(QA, QB)
            rec.angles[side] = AngleSummary(cosines=np.cos(ang).tolist(), grassmann=grassmann_distance(QA, QB))
        UA, VA = top_subspace(fa, ra, "left"), top_subspace(fa, ra, "right")
        UB, VB = top_subspace(fb, rb, "left"), top_subspace(fb, rb, "right")
        rec.captured = {"b_in_a": captured_energy(fb, UA, VA), "a_in_b": captured_energy(fa, UB, VB)}
    if W is not None:
        # W's decomposition is computed once and shared by both sides' amplification and intruders,
        # as far as they need it: the top singular pairs, all of them only for an undecided cosine
        k = min(config.intruder_k, min(W.shape))
        basis = WeightBasis(W, m=2 * k + 10, values=max(ra, rb))
        random_bases = _random_bases(job, device)
        rec.amplification, rec.intruders = {}, {}
        for who, u, r, zero in (("a", ua, ra, zero_a), ("b", ub, rb, zero_b)):
            if zero or r == 0:  # W + 0 = W (or only rounding noise): no amplification factor, nothing to intrude
                rec.amplification[who] = rec.intruders[who] = None
                continue
            Ur, Vr = random_bases[who]  # drawn at the asked rank: the first r columns are as Haar-random
            if r > Ur.shape[1]:  # widened at a tie: more Haar-random columns, the first ones kept
                gen = torch.Generator().manual_seed((job.random_seed or 0) + 1 + (who == "b"))
                Ur, Vr = (torch.linalg.qr(torch.cat([Q, random_orthonormal(Q.shape[0], r - Q.shape[1], gen, device)], 1)).Q
                          for Q in (Ur, Vr))
            rec.amplification[who] = amp = amplification(u.form, W, r, base=basis, random_bases=(Ur[:, :r], Vr[:, :r]))
            if amp.proj_delta == 0.0:  # written as null: say why
                rec.note = "; ".join(x for x in (rec.note, f"{who.upper()}'s top directions lie outside W's (projection at "
                                                 "rounding level): amplification factor unbounded, null") if x)
            intr = intruder_dimensions(W, u.form, k=k, epsilons=config.epsilons, epsilon=config.epsilon, base=basis)
            rec.intruders[who] = IntruderSummary(count=intr.count, epsilon=intr.epsilon,
                                                 counts={str(float(e)): c for e, c in intr.counts.items()},
                                                 max_cos=np.asarray(intr.max_cos, dtype=float).tolist())
            if intr.tied:
                rec.note = "; ".join(x for x in (rec.note, f"{who.upper()}'s tuned weight W + ΔW has tied singular values "
                                                  f"among its top {k}: those vectors, their cosines with W's and so the "
                                                  "intruder count are the solver's choice within the tie") if x)
    return rec, grids


@public_entry
def compare(
    a: str | Checkpoint,
    b: str | Checkpoint,
    *,
    base: str | Checkpoint | None = None,
    config: CompareConfig | None = None,
    out_dir: str | Path | None = None,
    callback: Callable[[int, int, str], None] | None = None,
    plots: bool = True,
    workers: int | None = None,
    resume: bool = False,
) -> CompareResult:
    """Compare the updates of ``a`` and ``b`` (each a LoRA adapter or, with ``base``, a full checkpoint).

    Args:
        a, b: adapter folders or checkpoints (anything :func:`spectra.open_checkpoint` accepts, or a
            :class:`~spectra.io.checkpoint.Checkpoint` it opened).
        base: the base both were fine-tuned from; needed for full checkpoints, DoRA, amplification
            and intruder dimensions.
        config: options (:class:`CompareConfig`).
        out_dir: where ``compare.json``, ``compare.csv`` and the plots go; each module's measures are
            journaled to ``compare.jsonl`` there as they are computed.
        callback: ``callback(done, total, name)`` after each module, in order.
        plots: write the figures with the results.
        workers: modules measured at once on the CPU, one BLAS thread each (default: torch's thread
            count); 1 runs them one by one with every thread. Results do not depend on it.
        resume: finish an interrupted run in ``out_dir`` from its journal (same inputs and options).

    Returns:
        :class:`CompareResult`. A module whose update is exactly zero (or entirely at the rounding level
        of its stored weights) on either side gets null measures and its reason; one with NaN/Inf in a
        factor, a weight or the update, and a tensor an adapter stores whole, is listed in ``skipped``.

    Example:
        >>> res = compare("lora-r8/", "lora-r64/", base="base/")   # doctest: +SKIP
    """
    config = config_of(config, CompareConfig)
    if resume and out_dir is None:
        raise ConfigError("resume needs the output folder of the interrupted run", hint="pass --out DIR with --resume")
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    check_device_available(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    base_ckpt = base if isinstance(base, Checkpoint) or base is None else open_checkpoint(base)
    A = _Side(a, base_ckpt, config)
    B = _Side(b, base_ckpt, config)
    # an adapter's LoRA on a tied head against a full side that ties its head too: that head is its embedding
    heads = {w: pair_tied_heads(o.tied if o.adapter else {}, s.pairs, s.names, s.tuned) for w, s, o in (("A", A, B), ("B", B, A))}
    result = CompareResult(A.label, B.label, None if base_ckpt is None else base_ckpt.label, {"a": A.kind, "b": B.kind}, asdict(config),
                           device=str(device))
    # how each folder was read (several weight sets in one: the one transformers reads), once each
    result.warnings = read_notes((base_ckpt, A.tuned, B.tuned, A.adapter, B.adapter))
    if base_ckpt is not None:  # an adapter of another base of the same shapes: said, since no check can fail
        result.warnings += [w for s in (A, B) if s.adapter is not None and (w := recorded_base_warning(s.adapter, base_ckpt))]
    if same_path := same_file(*(str(getattr(x, "root", None) or x.label) if isinstance(x, Checkpoint) else x for x in (a, b))):
        result.warnings.append(f"A and B are the same checkpoint ({A.label}): every measure compares an update with itself")
    shared = [k for k in A.names if k in B.names]
    if not shared:
        raise PairingError("the two inputs update no module in common", path=f"{a} vs {b}", hint="are they fine-tunes of the same base model?")
    keep = selector(config.include, config.exclude, config.layers)
    base_keys: dict[str, str] = {}
    if base_ckpt is not None:
        base_specs = describe_checkpoint({n: t.shape for n, t in base_ckpt.tensors.items()}, base_ckpt.arch)
        base_keys = unique_pairing_keys(list(base_specs))
        specs = {k: base_specs[n] for k, n in base_keys.items()}
        for k, (spec, name) in {**A.tied, **B.tied}.items():  # adapters' heads on a tied embedding
            if k not in specs:
                specs[k], base_keys[k] = spec, name
    else:
        specs = {**B.own_specs(), **A.own_specs()}

    # the filters apply to the one-sided lists too: --layers 0-1 lists no embedding as "only in B"
    for side, other, names in ((A, B, result.a_only), (B, A, result.b_only)):
        own = side.own_specs()
        for k in side.names:
            if k not in other.names:
                spec = specs.get(k) or own.get(k)
                if spec is not None and not keep(spec.name, spec.layer):
                    continue
                if k in other.saved:  # not one-sided: the other adapter stores it whole (listed as skipped below)
                    continue
                if side.kind == "lora" and side.mods[k].zero_update:  # adapted, but B = 0: no update to call one-sided
                    result.skipped.append({"name": side.names[k], "reason": f"{'A' if side is A else 'B'} ({side.label}): {ZERO_LORA}"})
                    continue
                if k in other.skipped:  # not one-sided: the other side holds it but cannot pair it (another shape…)
                    who = "B" if other is B else "A"
                    result.skipped.append({"name": side.names[k], "reason": f"{who} ({other.label}): {other.skipped[k]}"})
                    continue
                names.append(side.names[k] if spec is None else spec.name)
        names.sort()
    # an adapter's tensors stored whole are no LoRA update: listed with the reason, not dropped or called one-sided
    result.skipped += [{"name": name, "reason": f"{who} ({side.label}): {why}"} for who, side in (("A", A), ("B", B))
                       for name, why, layer in side.saved.values() if keep(name, layer)]
    result.skipped += [{"name": sp.name, "reason": "3-D expert stack: compare measures 2-D matrices only "  # no one subspace
                        "(spectra diff analyses each expert)"}
                       for _, sp in sorted({**A.stacks, **B.stacks}.items()) if keep(sp.name, sp.layer)]
    result.skipped = merged_skips(result.skipped)  # a stack both sides hold (an adapter's LoRA on it, a full update): once
    todo = []
    for k in shared:
        spec = specs.get(k)
        if spec is None:
            raise PairingError(f"the base checkpoint has no matrix {A.names[k]}",
                               path=base_ckpt.label if base_ckpt is not None else None, tensor=A.names[k])
        if keep(spec.name, spec.layer):
            todo.append((k, spec))
    if not todo and not result.skipped:  # skipped ones are reported; matrices only one input holds are no comparison
        refuse_empty_selection(len(shared), A.names[shared[0]], include=config.include, exclude=config.exclude,
                               layers=config.layers, what="modules both inputs update", one_sided={"A": result.a_only, "B": result.b_only})
    todo.sort(key=lambda t: (t[1].layer if t[1].layer is not None else -1, role_sort_key(t[1].role, t[1].module)))
    if w := fused_whole_warning((spec for _, spec in todo), "compare"):
        result.warnings.append(w)
    gen = torch.Generator().manual_seed(config.seed)
    jobs = []
    for k, spec in todo:
        shape = _shared_rows(A, B, k, spec)
        ra, rb = A.rank(k, shape), B.rank(k, shape)
        seed = None
        if base_ckpt is not None and base_keys.get(k) is not None:
            # one seed per module, drawn in module order: the same numbers on any number of workers, while
            # the bases themselves are drawn by the worker (in parallel, and only for the modules in flight)
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        jobs.append(_Job(k, spec, base_keys.get(k), shape, ra, rb, seed))
    _refuse_beyond_memory(jobs, device)
    journal, done = _journaled(jobs, A, B, base_ckpt, config, out_dir, resume, result.warnings)
    workers = check_workers(workers, torch.get_num_threads() if device.type == "cpu" else 1)
    def measure(job: _Job):
        return _measure(job, A, B, base_ckpt, config, device)

    # the figures' imports (~0.5 s of matplotlib) run beside the measures, not after them
    loader = threading.Thread(target=preload_plots, name="spectra-plots-import", daemon=True) if out_dir is not None and plots else None
    if loader is not None:
        loader.start()
    with contextlib.ExitStack() as held:
        if journal is not None:  # finished, failed or stopped: no lock left in the folder (the journal stays)
            held.callback(journal.release)
        # modules are independent: several at once, one BLAS thread each, on pool threads even for one worker (on a busy machine
        # torch's solvers stalled on the main thread: 14 s against 1.1 s) while their working sets fit; a big one alone
        pending = [job for i, job in enumerate(jobs) if i not in done]
        n = max(1, min(workers, len(pending)))
        outs = imap_one_blas_thread(measure, pending, n, cost=lambda job: MEASURE_COPIES * 8 * job.shape[0] * job.shape[1],
                                    max_cost=COMPARE_BATCH_BYTES, small_results=True)
        with contextlib.closing(outs):  # a stop (Ctrl-C, a callback's error) restores the BLAS threads at once
            computed = iter(outs)
            for i, job in enumerate(jobs):
                out = done[i] if i in done else next(computed)
                if journal is not None and i not in done:
                    journal.add(journal_record(i, out))
                if isinstance(out, dict):
                    result.skipped.append(out)
                else:
                    rec, grids = out
                    result.modules.append(rec)
                    if grids:
                        result.phi_grids[rec.name] = grids
                if callback:
                    callback(i + 1, len(jobs), job.spec.name)
        tied_notes = tied_compare_notes([(w, s.label, s.adapter, heads[w]) for w, s in (("A", A), ("B", B))], base_ckpt)
        for m in result.modules:  # a head tied to the embedding: said on the rows it concerns (after a resume too)
            m.note = "; ".join(x for x in (m.note, *tied_notes.get(m.name, ())) if x) or None
        for who, side in (("A", A), ("B", B)):  # numerical caveats of the dense updates, one line per kind and side
            notes = [(m.name, note_part(m.note, f"{who}: ")) for m in result.modules]
            result.warnings += note_caveat_warnings(notes, len(result.modules), f" of {who} ({side.label})")
            result.warnings += [f"{who} ({side.label}): {n}" for n in side.pair_notes]
        result.warnings += input_warnings(result, same_path=same_path)
        if tied := [m.name for m in result.modules if "tied singular values" in (m.note or "")]:
            result.warnings.append(f"{len(tied)} of {len(result.modules)} modules (e.g. {tied[0]}) hold tied singular values at or "
                                   "inside a rank: what that leaves undetermined is null or said in each one's note (compare.json)")
        result.elapsed_s = time.perf_counter() - t0
        if loader is not None:
            loader.join()
        if out_dir is not None:
            save_result(result, out_dir, plots=plots)
    return result


def _journaled(jobs: list[_Job], A: _Side, B: _Side, base: Checkpoint | None, config: CompareConfig,
               out_dir: str | Path | None, resume: bool, warnings: list[str]) -> tuple[RecordJournal | None, dict[int, _Out]]:
    """The journal of a run into ``out_dir``, started (the folder locked; an earlier compare's files
    removed unless resuming), and with ``resume`` the measures it holds, by plan index (a record repeated is left
    out, said in ``warnings``); ``(None, {})`` without ``out_dir``.

    Raises:
        ConfigError: ``resume`` without a journal, or a journal of other inputs or options.
        ResultsFormatError: a journal record compare did not write, or of a module this run does not compare.
    """
    if out_dir is None:
        return None, {}
    sides = [s.tuned if s.adapter is None else open_weights(s.adapter.path, "lora") for s in (A, B)]
    options = {k: v for k, v in asdict(config).items() if k != "device"}  # the numbers do not depend on the device
    # the labels as typed too: the records' skip reasons name them (another spelling would mix two in one result)
    journal, records = start_sealed(Path(out_dir) / JOURNAL, [c for c in (base, *sides) if c is not None],
                                    {**options, "labels": [A.label, B.label]}, resume=resume,
                                    clear=lambda: remove_earlier_outputs(Path(out_dir), "compare.json", SCHEMA, COMPARE_FILES))
    done: dict[int, _Out] = {}
    records = first_by_index(records, warnings, of="a module")  # a line repeated by hand replaced the first
    for line, body in records:
        i, out = from_journal_record(body, journal.path, line)
        name = out["name"] if isinstance(out, dict) else out[0].name
        if not 0 <= i < len(jobs) or jobs[i].spec.name != name:
            raise ResultsFormatError(f"record {line} is of {name[:120]!r}, which this run does not compare at {i} (an edited "
                                     "journal)", path=journal.path, hint="run without --resume into a new folder")
        done[i] = out
    return journal, done


#: One module's outcome: its record and φ grids, or a skip record ``{"name", "reason"}``.
_Out = tuple[ComparedModule, dict] | dict[str, str]

#: compare's journal in its folder: one line per module as it is measured (``--resume``).
JOURNAL = "compare.jsonl"

#: What compare writes into its folder (removed first when an earlier compare wrote there).
COMPARE_FILES = ("compare.json", "compare.csv", "captured_heatmap.png", "intruders_a.png", "intruders_b.png", "phi_grids.png",
                 "principal_angles.png", "report.html")


def save_result(result: CompareResult, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``compare.json``, ``compare.csv`` and (with ``plots``) the figures into ``out_dir``."""
    out = Path(out_dir)
    with folder_lock(out):  # another run writing here is refused, not interleaved with these files
        remove_earlier_outputs(out, "compare.json", SCHEMA, COMPARE_FILES)
        files = {
            "json": atomic_write_text(out / "compare.json", result.to_json() + "\n"),
            "csv": atomic_write_text(out / "compare.csv", rows_to_csv(result.rows())),
        }
        if plots and result.modules:  # (matplotlib is imported only when a figure is drawn)
            files.update(compare_plots(result, out))
    return files
