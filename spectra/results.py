"""Result objects of ``spectra diff`` and their files (docs/definitions.md, "The results contract").

``DiffResult`` is what :func:`spectra.diff` returns and what ``results.json`` holds. Files are
written atomically (temporary file + rename) so an interruption never leaves a half-written JSON.
``results.json`` is always valid JSON: NaN/Inf are written as null (with a warning) and a name that
UTF-8 cannot encode (a lone surrogate) is written with JSON's ``\\u`` escapes. Reading it back
(:meth:`DiffResult.from_dict`) checks every key it uses and raises
:class:`~spectra.errors.ResultsFormatError`, one line, on a file that is not what spectra writes.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spectra.display import display_name, matrices
from spectra.errors import ConfigError, ResultsFormatError
from spectra.io.files import atomic_write_text
from spectra.io.jsonfile import RESULTS_MAX_BYTES, finite_or_null, load_json, result_json
from spectra.metrics import threshold_key
from spectra.pairing_notes import RESIZED_NOTE
from spectra.results_check import SCHEMA, check_document

#: The numerical caveats of :mod:`spectra.numerics`, recognised in a result's ``note`` (which holds
#: their messages): code -> (pattern, what it is, what it means for the numbers).
CAVEATS: dict[str, tuple[re.Pattern[str], str, str]] = {
    "rounding_level": (
        re.compile(r"ΔW is at the rounding level of "),
        "ΔW is at the rounding level of its storage dtype",
        ("their spectra are not resolved from rounding noise (a learned update this small cannot be told from none), "
         "so a rank needed near the random baseline says nothing about the fine-tune")),
    "rounding_steps": (
        re.compile(r"ΔW moved its entries by at most one rounding step of "),
        "ΔW is made of single rounding steps of its storage dtype, with top directions above rounding noise",
        ("a learned update smaller than one step, rounded entry by entry: its top directions are resolved, but the "
         "rounding is spread over all directions, so energy ranks at high τ count it")),
    "precision_mismatch": (
        # a base stored coarser: the rounding is part of ΔW only if TUNED came from a finer original (said first)
        re.compile(r"base is \S+ and tuned \S+: (?:if TUNED was made from [^;]*?, )?ΔW includes rounding W from "),
        "base and tuned are stored at different precisions",
        # (a base stored coarser: only if TUNED came from a finer original of it, as its note says; spectra train's own
        # fine-tune of a bf16 base, trained from those very values, holds none of it)
        ("ΔW includes the rounding of W to the coarser dtype where the tuned side is the coarser one, or where TUNED was "
         "made from a finer original of a base stored coarser; that rounding is spread over all directions, so energy "
         "ranks at high τ measure it")),
    "quantisation_grid": (
        re.compile(r"appears quantised \(|are quantised on different grids"),
        "one side is on a quantisation grid and the other is not (or the grids differ)",
        "ΔW includes quantisation error, which is near full rank and inflates energy ranks"),
    "approximate": (  # not a caveat of the weights but of the numbers: said beside them as the others are
        re.compile(r"approximate: energy ranks lie within energy_rank_bounds"),
        "energy ranks are estimates from a randomized sketch (approximate mode: --approx, or p above --approx-above)",
        ("each lies within its guaranteed bounds in results.json (energy_rank_bounds); the table's medians and the "
         "findings use the estimates (without --approx, a larger --approx-above computes them exactly)")),
    "subnormal": (
        re.compile(r"subnormal values: "),
        "subnormal values carry part of ΔW",
        "hardware that flushes denormals to zero trained on different numbers"),
}
#: Every caveat warning starts with this (so that a rerun or resume replaces them, not duplicates them).
CAVEAT_PREFIX = "caveat "


def caveat_codes(note: str) -> list[str]:
    """The :data:`CAVEATS` codes whose message appears in a result's ``note``, in :data:`CAVEATS` order."""
    return [code for code, (pattern, _, _) in CAVEATS.items() if pattern.search(note or "")]


@dataclass
class ModuleResult:
    """The spectrum of ΔW for one matrix (or one part of a fused matrix).

    Attributes:
        name: the tuned side's tensor name, with ``":q"``/``":gate"``… for a split part and
            ``":e<k>"`` for one expert of a stacked ``(experts, out, in)`` tensor.
        layer: layer index, None outside the layer stack.
        module: module label (``"q_proj"``, ``"attn.c_proj"``, ``"qkv_proj:q"``).
        role: cross-architecture role (``"q"``, ``"down"``…), None when unknown.
        expert: MoE expert index, None for dense matrices.
        shape: ``[out, in]`` of the analysed matrix.
        fro_norm, spectral_norm, nuclear_norm: of ΔW.
        base_fro_norm: ``‖W_base‖_F`` of the same rows.
        rel_norm: ``‖ΔW‖_F / ‖W_base‖_F``; None when the base matrix is zero.
        stable_rank, effective_rank, signal_rank: docs/definitions.md, "Spectrum metrics".
        energy_rank, energy_rank_frac: threshold key (``"0.9"``) -> rank / rank ÷ p.
        random_energy_rank: threshold key -> energy rank of a Gaussian matrix of this shape.
        energy_rank_bounds: approximate mode only: threshold key -> ``[lo, hi]``, guaranteed
            bounds of the energy rank (the exact path leaves this None). In approximate mode
            ``nuclear_norm``, ``effective_rank`` and ``signal_rank`` are None (they need every
            singular value) and ``stable_rank`` uses the sketch's σ₁ (a lower bound of σ₁ up to float32 rounding,
            never above ``fro_norm``).
        singular_values: the top ``top_k`` singular values of ΔW, descending.
        method: how the spectrum was computed (``"gram/float64"``...).
        seconds: wall time of the decomposition.
        note: a caveat (rows analysed, split assumptions); empty when none.
        base_singular_values, tuned_singular_values: top ``top_k`` singular values of W_base and
            W_tuned, with ``--weight-spectra`` only (else None).
        lora_r, lora_alpha, lora_scale: for a LoRA update, the module's nominal rank, alpha and
            scale ``s`` (after rank/alpha patterns); None for full checkpoints.
        esd: with ``--esd`` only (else None): ``{"base", "tuned", "delta"}``, each the heavy-tailed metrics
            of that matrix (:class:`spectra.esd.EsdMetrics` as a dict: ``alpha``, ``D``, ``xmin``, ``sigma``…,
            λ = σ², WeightWatcher's default fit) or None where not computed, plus ``alpha_change``
            (α_tuned − α_base), ``alpha_change_z`` (that change in combined standard errors) and ``note``
            (why a side is None; empty otherwise).
        rounding_floor: the storage rounding floor of ΔW's singular values (:func:`spectra.delta.pair_floor`, in
            ΔW's units): a value at or below it is rounding of the stored tuned weights, not a direction of the
            update (``spectra recommend`` never buys one). The exact floor where a kept value (``singular_values``)
            reaches :func:`spectra.delta.floor_bound`, else that upper bound, which already shows every kept value
            resolved; 0.0 for a PEFT adapter's factored update (no storage rounding) and an integer dtype; None
            where unknown (results of an older spectra).
    """

    name: str
    layer: int | None
    module: str
    shape: list[int]
    fro_norm: float
    base_fro_norm: float | None
    rel_norm: float | None
    spectral_norm: float
    stable_rank: float
    effective_rank: float | None
    energy_rank: dict[str, int]
    random_energy_rank: dict[str, int]
    singular_values: list[float]
    role: str | None = None
    expert: int | None = None
    nuclear_norm: float | None = 0.0
    signal_rank: int | None = 0
    energy_rank_frac: dict[str, float] = field(default_factory=dict)
    energy_rank_bounds: dict[str, list[int]] | None = None
    dtype: str = ""
    method: str = ""
    seconds: float = 0.0
    note: str = ""
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_scale: float | None = None
    base_singular_values: list[float] | None = None
    tuned_singular_values: list[float] | None = None
    esd: dict[str, Any] | None = None
    rounding_floor: float | None = None

    @property
    def p(self) -> int:
        """``min(out, in)``: the most singular values (directions) the matrix can have."""
        return min(self.shape)

    @property
    def lora_capacity(self) -> int | None:
        """The most directions a LoRA update of this matrix can have: ``min(lora_r, p)`` (an r above p buys
        nothing more), or None for a full update."""
        return min(self.lora_r, self.p) if self.lora_r else None

    @property
    def caveats(self) -> list[str]:
        """Codes of the numerical caveats of the weights in ``note`` (see :data:`CAVEATS`); empty when none. The
        approximate mode's is not one (a sketch of exact weights): its warning comes from :func:`caveat_groups`."""
        return [c for c in caveat_codes(self.note) if c != "approximate"]

    def random_frac(self, key: str) -> float:
        """``random_energy_rank[key] / p`` (0 for an empty matrix, p = 0)."""
        return self.random_energy_rank[key] / self.p if self.p else 0.0

    def __repr__(self) -> str:
        er = {k: v for k, v in self.energy_rank.items() if k == "0.9"} or self.energy_rank
        rel = "None" if self.rel_norm is None else f"{self.rel_norm:.3g}"
        return (f"ModuleResult({display_name(self.name, 80)!r}, layer={self.layer}, module={display_name(self.module, 40)!r}, "
                f"shape={self.shape}, energy_rank={er}, rel_norm={rel})")


#: Skip reasons of weight matrices left out, as spectra.pairing and spectra.delta word them: a dtype that
#: is not a float weight (quantised), a shape or fused layout that differs, weights or a difference that
#: is not finite. Listed, not excluded: a reason not named here (a norm, a bias, a quantisation
#: parameter, an adapter's vector) never counts as a matrix left out.
_MATRIX_SKIP = re.compile(r"^shape mismatch|is not a float weight|^fused rows laid out differently|NaN or Inf|overflows|stores this matrix packed by")


def is_matrix_skip(reason: str) -> bool:
    """Whether a ``skipped`` reason is about a weight matrix left out (its change, if any, is not in the
    results) rather than a tensor that is no weight matrix.

    >>> is_matrix_skip("tuned dtype uint8 is not a float weight (quantised checkpoints are not supported)")
    True
    >>> is_matrix_skip("1-D tensor (norm or bias), not a weight matrix")
    False
    """
    return bool(_MATRIX_SKIP.search(reason))


#: Ends the reason of a skipped tensor whose stored data differs between base and tuned (checked where every
#: analysed ΔW is zero: a bias-only or norm-only fine-tune, a convolution kernel).
CHANGED_SKIP = "; it differs between base and tuned"


@dataclass
class DiffResult:
    """Everything ``spectra diff`` computed; serialises to ``results.json`` (docs/definitions.md,
    "The results contract").

    Attributes:
        base, tuned: the inputs as the user gave them (base is None for an adapter analysed alone).
        thresholds: energy-rank thresholds τ.
        modules: one entry per analysed matrix, in layer order.
        skipped: ``{"name", "reason"}`` for tensors present but not analysed.
        unmatched: ``{"base_only": [...], "tuned_only": [...]}``.
        config: the options of the run (``DiffConfig`` as a dict).
        warnings: one-line warnings: matrices skipped for a reason worth a look (NaN/Inf…), each
            numerical caveat (:meth:`add_caveat_warnings`, lines starting ``"caveat "``), an all-zero update.
        complete: False while a run is in progress or if it was interrupted.
        elapsed_s: wall time of the whole run, seconds (what ``spectra diff`` prints and the report shows).
        device: the device the spectra were computed on.
        adapter: for an adapter run, its configuration (r, lora_alpha, rslora, DoRA, patterns).
        fingerprint: hash of the inputs and result-affecting options (``--resume`` checks it).
        inputs: ``{"base": ..., "tuned": ...}``, the absolute location each input was read from (a hub id's cache
            folder, ``~`` expanded), where ``spectra recommend`` reads the models' configs again; empty in results of
            older versions (their ``base``/``tuned`` are read as typed, from the current folder).
        identity: ``{"code", "base", "tuned", "deciding"}``: hashes of spectra's source, each input, its config files by name.
    """

    base: str | None
    tuned: str
    thresholds: list[float]
    modules: list[ModuleResult] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    unmatched: dict[str, list[str]] = field(default_factory=lambda: {"base_only": [], "tuned_only": []})
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    complete: bool = False
    elapsed_s: float = 0.0
    device: str = ""
    version: str = ""
    adapter: dict[str, Any] | None = None
    fingerprint: str = ""
    inputs: dict[str, str] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        # short: a notebook cell ending in `res` must not print every singular value of every matrix
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        warn = f", {len(self.warnings)} warnings" if self.warnings else ""
        base = "None" if self.base is None else repr(display_name(self.base, 60))
        return (f"DiffResult(base={base}, tuned={display_name(self.tuned, 60)!r}, {len(self.modules)} matrices{skipped}{warn}, "
                f"thresholds={self.thresholds}, complete={self.complete})")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` document (docs/definitions.md contract plus added keys), as stored:
        NaN/Inf values stay floats here (:meth:`to_json` writes them as null)."""
        d = asdict(self)
        d = {"schema": SCHEMA, **d}
        return d

    @property
    def unpaired(self) -> int:
        """Tensors on one side only (``unmatched``), which the results do not compare."""
        return sum(len(v) for v in (self.unmatched or {}).values())

    def skipped_matrices(self) -> list[dict[str, str]]:
        """The ``skipped`` records of weight matrices (a dtype that is not a float weight, a shape
        mismatch, NaN/Inf…), not of tensors that are no weight matrix (:func:`is_matrix_skip`)."""
        return [s for s in self.skipped if is_matrix_skip(s.get("reason", ""))]

    def unpaired_weights(self) -> int:
        """Tensors on one side only that hold a layer's weights (named ``….weight`` or ``….qweight``), not
        buffers such as ``rotary_emb.inv_freq`` that one checkpoint keeps and the other drops."""
        return sum(1 for v in (self.unmatched or {}).values() for n in v if n.rpartition(".")[2] in ("weight", "qweight"))

    def not_compared(self) -> str | None:
        """What the results leave out that may hold a change — tensors on one side only and skipped weight
        matrices — in words (``"3 base-only (e.g. x) tensor(s) were not paired; 14 weight matrices were
        skipped (e.g. y: why)"``), or None: with every analysed ΔW zero, "the same weights" is only true
        when this is None."""
        alone = {k: v for k, v in (self.unmatched or {}).items() if v}
        parts = []
        if alone:
            parts.append(" and ".join(f"{len(v)} {k.replace('_only', '')}-only (e.g. {v[0]})" for k, v in alone.items())
                         + " tensor(s) were not paired")
        if skipped := self.skipped_matrices():
            parts.append(f"{matrices(len(skipped))} {'was' if len(skipped) == 1 else 'were'} skipped "
                         f"(e.g. {skipped[0]['name']}: {skipped[0]['reason']})")
        if resized := [m for m in self.modules if RESIZED_NOTE in (m.note or "")]:  # rows one side alone holds
            counts = re.search(r"base (\d+), tuned (\d+)", resized[0].note or "")
            parts.append(f"{len(resized)} table{'s' * (len(resized) > 1)} of another row count hold{'s' * (len(resized) == 1)} "
                         "rows one side alone has "
                         f"(e.g. {resized[0].name}" + (f": base {counts[1]}, tuned {counts[2]} rows)" if counts else ")"))
        if changed := [s for s in self.skipped if s.get("reason", "").endswith(CHANGED_SKIP) and s not in skipped]:
            parts.append(f"{len(changed)} tensor{'s' * (len(changed) > 1)} not analysed differ{'s' * (len(changed) == 1)} "
                         f"(e.g. {changed[0]['name']}: "
                         f"{changed[0]['reason'].removesuffix(CHANGED_SKIP)})")
        return "; ".join(parts) or None

    def non_finite(self) -> list[str]:
        """Where the results hold NaN or ±Inf (``"modules[3].stable_rank"``…): JSON cannot store
        them, so :meth:`to_json` writes null there and says so in ``warnings``."""
        return _non_finite_paths(self.to_dict(), "")

    def to_json(self, *, indent: int | None = 1) -> str:
        """``results.json``'s text: always valid JSON (RFC 8259) that encodes as UTF-8.

        NaN/±Inf become null and a warning naming where is added to ``warnings``; when a name holds a
        lone surrogate (legal in a safetensors header's JSON, not in UTF-8) the whole document is
        written with ``\\uXXXX`` escapes, which read back to the same name.
        """
        doc = self.to_dict()
        bad = _non_finite_paths(doc, "")
        if bad:
            doc = finite_or_null(doc)
            doc["warnings"] = [*doc["warnings"], non_finite_warning(bad)]
        return result_json(doc, indent=indent)

    @classmethod
    def from_dict(cls, d: Any, *, source: str | os.PathLike[str] | None = None) -> DiffResult:
        """Inverse of :meth:`to_dict`, checking every key it uses.

        Args:
            d: a parsed ``results.json`` document.
            source: the file it came from, named in errors.

        Raises:
            ResultsFormatError: another schema, a missing key or a value of the wrong type (one line
                naming the key, e.g. ``modules[3].energy_rank must be an object``).
        """
        check_document(d, source)
        d = dict(d)
        d.pop("schema")
        known = set(ModuleResult.__dataclass_fields__)
        modules = []
        required = {n for n, f in ModuleResult.__dataclass_fields__.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        for i, m in enumerate(d.get("modules", [])):
            m = {k: v for k, v in m.items() if k in known}
            if not m.get("energy_rank_frac"):  # older or hand-made files: derive it
                p = min(m["shape"])
                m["energy_rank_frac"] = {k: (v / p if p else 0.0) for k, v in m["energy_rank"].items()}
            if missing := sorted(required - set(m)):  # a hand-edited file: one line, not a TypeError
                raise ResultsFormatError(f"modules[{i}]: missing key {missing[0]!r}", path=source, hint="rerun spectra diff --out")
            modules.append(ModuleResult(**m))
        d["modules"] = modules
        fields = set(cls.__dataclass_fields__)
        top = {n for n, f in cls.__dataclass_fields__.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if missing := sorted(top - set(d)):  # a hand-edited file: one line, not a TypeError
            raise ResultsFormatError(f"missing key {missing[0]!r}", path=source, hint="rerun spectra diff --out")
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DiffResult:
        """Read a ``results.json`` (or the folder holding one).

        Raises:
            ResultsFormatError: not JSON, or not a ``spectra.diff/1`` document (see :meth:`from_dict`).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        doc = load_json(path, what="results.json", error=ResultsFormatError, lone_surrogates=True, max_bytes=RESULTS_MAX_BYTES)
        return cls.from_dict(doc, source=path)

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write ``results.json`` atomically (:meth:`to_json`)."""
        return atomic_write_text(Path(path), self.to_json() + "\n")

    def add_caveat_warnings(self) -> list[str]:
        """Put one warning per numerical caveat found in the results' notes into ``warnings``
        (replacing those of an earlier call, so that it can run again after a resume); returns them.

        Each says how many matrices it concerns, names a few, and what it means for their numbers
        (:data:`CAVEATS`); ``spectra diff`` prints them, and the report shows them on its first screen.
        """
        self.warnings = [w for w in self.warnings if not w.startswith(CAVEAT_PREFIX)]
        lines = caveat_warnings(self.modules)
        self.warnings.extend(lines)
        return lines

    def save_csv(self, path: str | os.PathLike[str]) -> Path:
        """One row per analysed matrix; energy ranks flattened to ``energy_rank_0.9`` columns."""
        return atomic_write_text(Path(path), rows_to_csv(self.rows()))

    def save(self, out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
        """Write ``results.json``, ``results.csv`` and, if ``plots``, the two heatmaps into ``out_dir``
        (after :meth:`add_caveat_warnings`, so that results.json's ``warnings`` hold the caveats); with
        ``--esd`` results also ``alpha_base_tuned.png`` (α of W_tuned against W_base)."""
        self.add_caveat_warnings()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": self.save_json(out / "results.json"), "csv": self.save_csv(out / "results.csv")}
        if not plots:
            return files
        # matplotlib only when plotting; the figures are drawn two at a time (spectra.plots.base.save_figures)
        from spectra.plots import diff as diff_plots
        from spectra.plots import esd as esd_plots
        from spectra.plots.base import save_figures

        builders = {}
        if any(m.layer is not None for m in self.modules):  # heatmaps need a layer stack
            builders["rank_heatmap"] = lambda: diff_plots.rank_heatmap(self, threshold=self.headline_threshold)
            if any(m.rel_norm is not None for m in self.modules):
                builders["relnorm_heatmap"] = lambda: diff_plots.relnorm_heatmap(self)
        points = [{"module": m.module, "alpha_base": m.esd["base"]["alpha"], "alpha_tuned": m.esd["tuned"]["alpha"]}
                  for m in self.modules if m.esd and m.esd.get("base") and m.esd.get("tuned")]
        if any(p["alpha_base"] is not None and p["alpha_tuned"] is not None for p in points):
            builders["alpha_base_tuned"] = lambda: esd_plots.alpha_base_tuned(points)
        files.update(save_figures(builders, out, dpi=120))
        return files

    @property
    def headline_threshold(self) -> float:
        """τ shown in tables and heatmaps: 0.9 (Biderman et al.'s "rank needed") when computed, else the
        computed threshold nearest to it."""
        return min(self.thresholds, key=lambda t: abs(t - 0.9))

    def computed_threshold(self, threshold: float | None) -> float:
        """``threshold`` as one of the run's computed τ (None: :attr:`headline_threshold`); a numpy float32 0.9
        is 0.9 (within 1e-6).

        Raises:
            ConfigError: a τ the run did not compute (naming those it did).
        """
        if threshold is None:
            return self.headline_threshold
        tau = float(threshold)
        near = [t for t in self.thresholds if abs(t - tau) <= 1e-6]
        if not near:
            raise ConfigError(f"τ = {tau:g} was not computed by this run (its thresholds: {', '.join(f'{t:g}' for t in self.thresholds)})",
                              hint=f"rerun spectra diff with -t {tau:g}")
        return near[0]

    # ---- tables --------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """Flat per-matrix records (what the CSV and the DataFrame hold)."""
        rows = []
        for m in self.modules:
            row: dict[str, Any] = {
                "name": m.name, "layer": m.layer, "expert": m.expert, "module": m.module, "role": m.role,
                "out": m.shape[0], "in": m.shape[1], "p": m.p, "fro_norm": m.fro_norm,
                "base_fro_norm": m.base_fro_norm, "rel_norm": m.rel_norm, "spectral_norm": m.spectral_norm,
                "nuclear_norm": m.nuclear_norm, "stable_rank": m.stable_rank,
                "effective_rank": m.effective_rank, "signal_rank": m.signal_rank,
            }
            for t in self.thresholds:
                k = threshold_key(t)
                row[f"energy_rank_{k}"] = m.energy_rank.get(k)
                row[f"energy_rank_frac_{k}"] = m.energy_rank_frac.get(k)
                row[f"random_energy_rank_{k}"] = m.random_energy_rank.get(k)
            if m.lora_r is not None:
                row.update({"lora_r": m.lora_r, "lora_alpha": m.lora_alpha, "lora_scale": m.lora_scale})
            if m.esd is not None:  # --esd: α of each side (the rest is in results.json)
                row.update({f"alpha_{side}": (m.esd.get(side) or {}).get("alpha") for side in ("base", "tuned", "delta")})
                row["alpha_change"] = m.esd.get("alpha_change")
            row.update({"dtype": m.dtype, "method": m.method, "seconds": m.seconds, "note": m.note})
            rows.append(row)
        return rows

    def to_dataframe(self):  # -> pandas.DataFrame
        """The per-matrix table of :meth:`rows` as a pandas DataFrame (needs pandas installed).

        Column names are usable as attributes: ``energy_rank_0.9`` becomes ``energy_rank_0_9``
        (``df.energy_rank_0_9``); integer columns that may be missing (``layer``, ``expert``,
        ``signal_rank``, ``lora_r``) are pandas' nullable ``Int64``, so layer 3 prints as 3, not 3.0.
        """
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        df = pd.DataFrame(self.rows())
        df.columns = [attribute_name(c) for c in df.columns]
        for col in ("layer", "expert", "signal_rank", "lora_r", "out", "in", "p"):
            if col in df.columns:
                df[col] = df[col].astype("Int64")
        return df

    def summary_records(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """Per module label, in layer-stack column order (q, k, v, o, gate, up, down…): ``module``,
        ``role``, ``count`` (matrices), ``changed`` (those with ΔW ≠ 0), ``p`` (median ``min(out, in)``),
        and medians of ``energy_rank`` (at τ = ``threshold``, default :attr:`headline_threshold`), of
        ``energy_rank_frac`` (÷ p), of ``random_frac`` (a Gaussian matrix's energy rank ÷ p), of
        ``rel_norm`` (None when no base), ``lora_r`` (the median LoRA r; None for full checkpoints) and
        ``lora_r_range`` (its smallest and largest: ranks differ under ``rank_pattern``).

        The medians are over the changed matrices, as the findings' are (three frozen layers of five
        would otherwise make a kind whose other two moved by 300% read rank 0, size 0); over all of
        them when none changed. A median of an even count keeps its half (p of 64 and 1: 32.5).
        """
        from spectra.roles import role_sort_key

        tau = self.computed_threshold(threshold)
        k = threshold_key(tau)
        groups: dict[str, list[ModuleResult]] = {}
        for m in self.modules:
            groups.setdefault(m.module, []).append(m)
        out = []
        for module, every in groups.items():
            ms = [m for m in every if m.fro_norm] or every
            rel = [m.rel_norm for m in ms if m.rel_norm is not None]
            lora = [m.lora_r for m in ms if m.lora_r is not None]
            p = statistics.median(m.p for m in ms)
            out.append({
                "module": module,
                "role": ms[0].role,
                "count": len(every),
                "changed": sum(bool(m.fro_norm) for m in every),
                "p": int(p) if float(p).is_integer() else p,
                "energy_rank": statistics.median(m.energy_rank[k] for m in ms),
                "energy_rank_frac": statistics.median(m.energy_rank_frac.get(k, 0.0) for m in ms),
                "random_frac": statistics.median(m.random_frac(k) for m in ms),
                "rel_norm": statistics.median(rel) if rel else None,
                "lora_r": statistics.median(lora) if lora else None,
                "lora_r_range": (min(lora), max(lora)) if lora else None,  # a median of 2s and 8s is a 5 no matrix has
            })
        return sorted(out, key=lambda r: role_sort_key(r["role"], r["module"]))

    def summary(self, threshold: float | None = None):  # -> pandas.DataFrame | list[dict]
        """The per-module medians of :meth:`summary_records` as a pandas DataFrame indexed by module
        label, or, when pandas is not installed, as that list of dicts.

        Example:
            >>> res.summary()                      # doctest: +SKIP
                    role  count  changed    p  energy_rank  energy_rank_frac  random_frac  rel_norm  lora_r lora_r_range
            module
            q_proj     q     30       30  576         26.0             0.045        0.512     0.013    <NA>         None
        """
        records = self.summary_records(threshold)
        try:
            import pandas as pd
        except ImportError:
            return records
        df = pd.DataFrame(records, columns=["module", "role", "count", "changed", "p", "energy_rank", "energy_rank_frac",
                                            "random_frac", "rel_norm", "lora_r", "lora_r_range"])
        df["lora_r"] = df["lora_r"].astype("Float64") if df["lora_r"].notna().any() else df["lora_r"].astype("Int64")
        return df.set_index("module")

    def plot_rank_heatmap(self, path: str | os.PathLike[str] | None = None, *, threshold: float | None = None):
        """Layers × modules heatmap of energy_rank[τ] / p (for a LoRA adapter: / r); returns the
        figure or writes ``path`` (:func:`spectra.plots.diff.rank_heatmap`)."""
        from spectra.plots import diff as diff_plots

        return diff_plots.rank_heatmap(self, path, threshold=self.computed_threshold(threshold))

    def plot_relnorm_heatmap(self, path: str | os.PathLike[str] | None = None):
        """Layers × modules heatmap of ‖ΔW‖_F / ‖W_base‖_F (:func:`spectra.plots.diff.relnorm_heatmap`)."""
        from spectra.plots import diff as diff_plots

        return diff_plots.relnorm_heatmap(self, path)

    def plot_spectra(self, path: str | os.PathLike[str] | None = None):
        """Normalised singular values and cumulative energy of ΔW, one panel per module kind with
        every layer (:func:`spectra.plots.diff.spectra_figure`)."""
        from spectra.plots import diff as diff_plots

        fig = diff_plots.spectra_figure(self)
        if path is None or fig is None:
            return fig
        from spectra.plots import save_figure

        return save_figure(fig, path)


def attribute_name(column: str) -> str:
    """A column name usable as a Python attribute: ``energy_rank_0.9`` -> ``energy_rank_0_9``.

    >>> attribute_name("random_energy_rank_0.99")
    'random_energy_rank_0_99'
    """
    return re.sub(r"\W", "_", column)


def caveat_groups(modules: list[ModuleResult]) -> list[tuple[str, list[ModuleResult]]]:
    """``(code, matrices)`` for each numerical caveat (:data:`CAVEATS` order) that some of ``modules`` carry."""
    out = []
    for code in CAVEATS:
        hit = [m for m in modules if code in caveat_codes(m.note)]
        if hit:
            out.append((code, hit))
    return out


def caveat_sentence(code: str, hit: list[ModuleResult], total: int) -> str:
    """What caveat ``code`` means, for how many of ``total`` matrices, naming a few of ``hit``."""
    return _caveat_text(code, [m.name for m in hit], total)


def _caveat_text(code: str, hit: list[str], total: int, of: str = "") -> str:
    names = ", ".join(display_name(n, 60) for n in hit[:3]) + (f" and {len(hit) - 3} more" if len(hit) > 3 else "")
    _, what, meaning = CAVEATS[code]
    return f"{what} in {len(hit)} of {total} matrices{of} ({names}): {meaning} (each matrix's note says more)"


def note_part(note: str | None, keep: str, *, prefix: bool = True) -> str:
    """The parts of a ``"; "``-joined note that start with ``keep`` (``prefix``) or contain it: one input's
    caveats (``"B: "``, ``"tuned/: "``) or one kind of remark, for a warning or a finding about that alone.

    >>> note_part("A: x; B: y; B: z", "B: ")
    'B: y; B: z'
    """
    return "; ".join(x for x in (note or "").split("; ") if (x.startswith(keep) if prefix else keep in x))


def note_caveat_warnings(notes: list[tuple[str, str]], total: int, of: str = "") -> list[str]:
    """:func:`caveat_warnings` for commands that keep a name and a note per matrix (compare, trace,
    interfere): ``notes`` holds ``(name, the note's part about one input)`` for each matrix, ``total`` the
    matrices measured, ``of`` which input (``" of B (tuned/)"``)."""
    out = []
    for code, (pattern, _, _) in CAVEATS.items():
        hit = [name for name, note in notes if pattern.search(note or "")]
        if hit:
            out.append(f"{CAVEAT_PREFIX}({code}): {_caveat_text(code, hit, total, of)}")
    return out


def points_caveat_note(points: list[Any]) -> str:
    """A traced matrix's caveats gathered from its points' notes (the in-training tracker keeps each step's with its
    point): one part per caveat, the steps it was said at and what it is; each point's note keeps its numbers.

    >>> points_caveat_note([{"step": 5, "note": "ΔW is at the rounding level of bfloat16: 90% …"}, {"step": 10}])
    "at step 5: ΔW is at the rounding level of its storage dtype (each point's note has its numbers)"
    """
    parts = []
    for pattern, what, _ in CAVEATS.values():
        steps = [str(pt.get("step")) for pt in points if isinstance(pt, dict) and pattern.search(str(pt.get("note") or ""))]
        if steps:
            at = ", ".join(steps[:6]) + (f" … ({len(steps)} steps)" if len(steps) > 6 else "")
            parts.append(f"at step{'s' * (len(steps) > 1)} {at}: {what} (each point's note has its numbers)")
    return "; ".join(parts)


def caveat_warnings(modules: list[ModuleResult]) -> list[str]:
    """One warning line per numerical caveat among ``modules`` (``"caveat (code): …"``): how many
    matrices, a few of their names, and what it means for their numbers."""
    return [f"{CAVEAT_PREFIX}({code}): {caveat_sentence(code, hit, len(modules))}" for code, hit in caveat_groups(modules)]


def non_finite_warning(paths: list[str]) -> str:
    """The warning for NaN/Inf values written as null."""
    where = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return f"{len(paths)} value(s) were NaN or infinite and are written as null: {where}"


def _non_finite_paths(x: Any, where: str) -> list[str]:
    if isinstance(x, float):
        return [] if math.isfinite(x) else [where or "value"]
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in _non_finite_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(x, (list, tuple)):
        if x and all(type(v) is float for v in x):  # long float lists (singular values): one entry for the list
            return [where] if not all(map(math.isfinite, x)) else []
        return [p for i, v in enumerate(x) for p in _non_finite_paths(v, f"{where}[{i}]")]
    return []



# ---- validation of a results.json document ----------------------------------------------------

def rows_to_csv(rows: Iterable[dict[str, Any]]) -> str:
    """CSV text of records with the union of their keys as header, in first-seen order."""
    import io

    rows = list(rows)
    header: list[str] = []
    for r in rows:
        header.extend(k for k in r if k not in header)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_text(v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


#: First characters a spreadsheet reads as the start of a formula (OWASP, "CSV injection"), and the
#: quote that marks a cell so prefixed (a name that starts with it gets one too, so that one leading
#: ``'`` is always the mark: strip it to read the name back).
_FORMULA_START = ("=", "+", "-", "@", "'")


def csv_text(value: Any) -> Any:
    r"""A cell as written to a CSV file. Text (tensor names, read from untrusted checkpoints) has its
    control, line-breaking and bidirectional characters escaped as :func:`spectra.display.display_name`
    writes them (a bare CR would split the row for Python's csv reader and pandas; an ANSI sequence
    would drive a terminal that prints the file), a literal backslash doubled (``a\nb`` as typed and ``a``,
    newline, ``b`` stay two names), then a leading ``'`` when it would start a formula, which spreadsheets
    show as text. JSON files keep every name exactly as stored.

    >>> csv_text("=1+2"), csv_text("-2.weight"), csv_text(-2.5), csv_text("model.q_proj"), csv_text("a\rb"), csv_text("'x")
    ("'=1+2", "'-2.weight", -2.5, 'model.q_proj', 'a\\rb', "''x")
    >>> csv_text("a\\nb") != csv_text("a\nb")
    True
    """
    if not isinstance(value, str):
        return value
    # every character: a CSV is data (a note or a long name is not cut); escapes read back one way only
    text = display_name(value.replace("\\", "\\\\"), None)
    return "'" + text if text.startswith(_FORMULA_START) else text
