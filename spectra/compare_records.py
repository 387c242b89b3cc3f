"""Typed results of ``spectra compare``: ``compare.json`` (schema ``spectra.compare/1``) as dataclasses.

:class:`CompareResult` holds one :class:`ComparedModule` per module both inputs update. Every
measure is a small frozen record whose fields are the JSON keys (the measures' own dataclasses from
:mod:`spectra.subspaces` where they exist). :meth:`CompareResult.from_dict` checks every key it
reads, and every value's range and agreement (φ and shares in [0, 1], captured energy at most
best_rank_r, ranks within min(out, in), intruders at most those examined, each module once), and raises
a one-line :class:`~spectra.errors.ResultsFormatError` naming it: people edit and merge these files.

A measure is ``None`` (JSON ``null``) when it is undefined for the module, with ``status`` and
``reason`` saying why: an update that is exactly zero has no singular subspace, so φ, the angles,
the energy the other update's subspaces capture of it (0/0) and its amplification factor are
undefined, not the values an arbitrary basis would give.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from spectra._version import __version__
from spectra.errors import ResultsFormatError
from spectra.io.jsonfile import RESULTS_MAX_BYTES, finite_or_null, load_json, result_json
from spectra.io.safetensors_file import MAX_DIM
from spectra.numerics import unresolved_text
from spectra.results_check import MAX_INDEX, impossible, is_axis, is_int, is_num
from spectra.subspaces import Amplification, CapturedEnergy, phi_random_baseline

SCHEMA = "spectra.compare/1"
#: ``ComparedModule.status`` values: every measure computed; one or both updates exactly zero; one or both
#: updates all rounding noise of their stored weights (no resolved direction).
STATUSES = ("ok", "zero_update", "unresolved")
SIDES = ("left", "right")


@dataclass(frozen=True)
class PhiSummary:
    """Hu et al.'s φ on one side (docs/definitions.md, "Subspaces").

    Attributes:
        phi_full: φ(A, B, r_A, r_B), all columns of both bases.
        phi_11: φ(A, B, 1, 1), the two top directions; None when σ₁ of either update is tied (its top
            direction is then an arbitrary one of the tie).
        mean: mean of the φ(i, j) grid's determined entries (those at no cut inside a tie).
        random: ``max(r_A, r_B) / d``, φ's expectation for independent random subspaces.
        d: dimension of the space (``out`` for left, ``in`` for right singular vectors).
    """

    phi_full: float
    phi_11: float | None
    mean: float
    random: float
    d: int


@dataclass(frozen=True)
class AngleSummary:
    """Principal angles between the two top subspaces on one side.

    Attributes:
        cosines: ``cos θ_l``, descending (θ ascending), ``min(r_A, r_B)`` of them.
        grassmann: ``‖θ‖₂`` in radians.
    """

    cosines: list[float]
    grassmann: float


@dataclass(frozen=True)
class IntruderSummary:
    """Intruder dimensions of ``W_base + ΔW`` (Shuttleworth et al. 2024).

    Attributes:
        count: intruders at ``epsilon``.
        epsilon: the threshold of ``count``.
        counts: ε (as ``str(float)``) -> intruders at that ε.
        max_cos: for each top singular vector of the tuned weight, its largest ``|cos|`` with the
            base's left singular vectors.
    """

    count: int
    epsilon: float
    counts: dict[str, int]
    max_cos: list[float]


@dataclass
class ComparedModule:
    """The measures of one module both inputs update; ``None`` where undefined (see ``reason``).

    Attributes:
        name, layer, module, role: the base tensor's name, layer (None outside the stack), module
            label and role.
        out, in_: ``(out, in)`` of the update (``in`` in JSON).
        rank_a, rank_b: subspace ranks compared (LoRA r, or ``top_k`` of a full update; an update's
            numerical rank where it is lower: see ``note``; 0 for an exactly zero update).
        fro_a, fro_b: ``‖ΔW_A‖_F``, ``‖ΔW_B‖_F``.
        phi, angles: side (``left``/``right``) -> :class:`PhiSummary` / :class:`AngleSummary`.
        captured: ``b_in_a`` (B's energy in A's subspaces) and ``a_in_b`` -> :class:`CapturedEnergy`.
        amplification: ``a``/``b`` -> :class:`Amplification`; None when no base was given.
        intruders: ``a``/``b`` -> :class:`IntruderSummary`; None when no base was given.
        status: ``"ok"``, ``"zero_update"`` (one or both updates exactly zero) or ``"unresolved"`` (every
            singular value of a dense update at the rounding level of its stored weights: no direction).
        reason: why measures are null; None when status is ok.
        note: why a rank is below the asked one (an update of fewer resolved directions), else None.
    """

    name: str
    layer: int | None
    module: str
    role: str | None
    out: int
    in_: int
    rank_a: int
    rank_b: int
    fro_a: float
    fro_b: float
    phi: dict[str, PhiSummary | None] = field(default_factory=dict)
    angles: dict[str, AngleSummary | None] = field(default_factory=dict)
    captured: dict[str, CapturedEnergy | None] = field(default_factory=dict)
    amplification: dict[str, Amplification | None] | None = None
    intruders: dict[str, IntruderSummary | None] | None = None
    status: str = "ok"
    reason: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The module's ``compare.json`` record (``amplification``/``intruders`` only with a base)."""
        d: dict[str, Any] = {"name": self.name, "layer": self.layer, "module": self.module, "role": self.role,
                             "out": self.out, "in": self.in_, "rank_a": self.rank_a, "rank_b": self.rank_b,
                             "fro_a": self.fro_a, "fro_b": self.fro_b}
        for key in ("phi", "angles", "captured", "amplification", "intruders"):
            value = getattr(self, key)
            if value is not None:
                d[key] = {k: None if v is None else _finite(asdict(v)) for k, v in value.items()}
        d["status"] = self.status
        d["reason"] = self.reason
        d["note"] = self.note
        return d

    def __getitem__(self, key: str) -> Any:
        """``module["phi"]``: the ``compare.json`` record's value, for code written against the
        untyped dict records (prefer the attributes)."""
        return self.to_dict()[key]

    @property
    def sides(self) -> list[str]:
        """The sides compared (``left``, ``right`` or both)."""
        return list(self.phi)


@dataclass
class CompareResult:
    """What ``spectra compare`` computed; ``compare.json`` holds :meth:`to_dict`.

    Attributes:
        a, b, base: the inputs as given (base may be None).
        kinds: ``{"a": "lora"|"full", "b": ...}``.
        config: the options (:class:`spectra.config.CompareConfig` as a dict; ``device`` as asked).
        modules: one :class:`ComparedModule` per module both update (after the filters).
        a_only, b_only: modules (base tensor names) of one side only, after the filters: those an
            adapter updates, or every paired matrix of a full checkpoint (changed or not).
        phi_grids: module name -> side -> φ grid (rows i = 1..r_A, columns j = 1..r_B), null at a cut
            inside tied singular values (not determined); absent for modules whose φ is null.
        skipped: ``{"name", "reason"}`` for modules left out (NaN/Inf in a factor or a weight).
        warnings: how the inputs were read, where it needs saying (a folder of several weight sets).
        device: the device the run used (``cpu``, ``cuda:0``), resolved from ``config["device"]``.
        elapsed_s: wall seconds of the run.
        version: spectra's version.
    """

    a: str
    b: str
    base: str | None
    kinds: dict[str, str]
    config: dict[str, Any]
    modules: list[ComparedModule] = field(default_factory=list)
    a_only: list[str] = field(default_factory=list)
    b_only: list[str] = field(default_factory=list)
    phi_grids: dict[str, dict[str, list[list[float | None]]]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    device: str | None = None
    elapsed_s: float = 0.0
    version: str = __version__

    def __repr__(self) -> str:  # the grids make the default repr megabytes long
        return (f"CompareResult(a={self.a!r}, b={self.b!r}, base={self.base!r}, kinds={self.kinds}, "
                f"modules={len(self.modules)}, a_only={len(self.a_only)}, b_only={len(self.b_only)}, "
                f"skipped={len(self.skipped)})")

    def to_dict(self) -> dict[str, Any]:
        """The ``compare.json`` document."""
        d: dict[str, Any] = {"schema": SCHEMA}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = [m.to_dict() for m in v] if f.name == "modules" else v
        return d

    def to_json(self, *, indent: int | None = 1) -> str:
        """:meth:`to_dict` as strict JSON (no NaN/Infinity: undefined values are null)."""
        return result_json(finite_or_null(self.to_dict()), indent=indent)

    def rows(self) -> list[dict[str, Any]]:
        """Flat per-module records for CSV/DataFrames (None where a measure is undefined)."""
        out = []
        for m in self.modules:
            row: dict[str, Any] = {"name": m.name, "layer": m.layer, "module": m.module, "role": m.role, "out": m.out,
                                   "in": m.in_, "rank_a": m.rank_a, "rank_b": m.rank_b}
            for side, ph in m.phi.items():
                ang = m.angles.get(side)
                row[f"phi_{side}"] = None if ph is None else ph.phi_full
                row[f"phi_{side}_random"] = None if ph is None else ph.random
                row[f"grassmann_{side}"] = None if ang is None else ang.grassmann
            for who, ce in m.captured.items():
                for k in ("two_sided", "left", "right", "best_rank_r"):
                    row[f"captured_{who}_{k}"] = None if ce is None else getattr(ce, k)
            for who, amp in (m.amplification or {}).items():
                row[f"amplification_{who}"] = None if amp is None else amp.factor
            for who, intr in (m.intruders or {}).items():
                row[f"intruders_{who}"] = None if intr is None else intr.count
            row["status"] = m.status
            row["note"] = m.note
            out.append(row)
        return out

    @classmethod
    def from_dict(cls, d: Any, *, source: str | os.PathLike[str] | None = None) -> CompareResult:
        """Inverse of :meth:`to_dict`, checking the type and range of every key it reads.

        Raises:
            ResultsFormatError: another schema, a missing key, a value of the wrong type or one no
                comparison gives (out of range, above what its record allows, a module twice), in one
                line naming the key (e.g. ``modules[3].phi.right.phi_full must be a number or null, from 0 to 1``).
        """
        return _Reader(source).result(d)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompareResult:
        """Read a ``compare.json`` (or the folder holding one), validated by :meth:`from_dict`."""
        path = Path(path)
        if path.is_dir():
            path = path / "compare.json"
        doc = load_json(path, what="compare.json", error=ResultsFormatError, lone_surrogates=True,
                        max_bytes=RESULTS_MAX_BYTES)
        return cls.from_dict(doc, source=path)


def random_two_sided(r: int, out: int, in_: int) -> float:
    """Expected two-sided captured energy of random rank-r subspaces: ``r² / (out·in)`` (the
    baseline of ``captured.b_in_a.two_sided``, one per module shape).

    >>> random_two_sided(8, 64, 128)
    0.0078125
    """
    return r * r / (out * in_)


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """A measure's fields with non-finite numbers as None (JSON has no Infinity: an amplification
    factor is infinite when ΔW has no component in W's directions at all)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ---- validation ---------------------------------------------------------------------------------
def _type_name(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}.get(type(x), type(x).__name__)


#: Rounding allowed above 1 in a share or φ (the writer clips most at 1; a float64 sum can end 1e-16 above).
_SLACK = 1e-9
#: How far captured energy may pass best_rank_r: the two come by different routes (projections, singular values).
_CAPTURED_SLACK = 1e-6
_GRIDS = "an object of number grids, from 0 to 1 (null at a tie)"


def _positive(v: Any) -> bool:
    return is_int(v) and v >= 1


def _count(v: Any) -> bool:
    return is_int(v) and v >= 0


def _norm(v: Any) -> bool:
    return is_num(v) and v >= 0


def _unit(v: Any) -> bool:
    return is_num(v) and 0 <= v <= 1 + _SLACK


#: A measure record's field -> (check, what it must be); the other fields are shares (φ, captured energy: in
#: [0, 1]) or norms and ratios (≥ 0), null where undefined (not finite, see _finite).
_FIELD_RULES: dict[str, tuple[Any, str]] = {
    "cosines": (lambda v: isinstance(v, list) and all(_unit(x) for x in v), "an array of numbers from 0 to 1 (cosines)"),
    "max_cos": (lambda v: isinstance(v, list) and all(_unit(x) for x in v), "an array of numbers from 0 to 1 (cosines)"),
    "counts": (lambda v: isinstance(v, dict) and all(_count(x) for x in v.values()), "an object of integers, not negative"),
    "r": (_count, "an integer, not negative"), "count": (_count, "an integer, not negative"), "d": (_positive, "a positive integer"),
}
_SHARE = (lambda v: v is None or _unit(v), "a number or null, from 0 to 1")
_NON_NEGATIVE = (lambda v: v is None or _norm(v), "a number or null, not negative")


def _grids_ok(by_side: Any) -> bool:
    """Whether φ grids (side -> rows) hold numbers from 0 to 1, null at a tie."""
    return isinstance(by_side, dict) and all(
        isinstance(grid, list) and all(isinstance(row, list) and all(x is None or _unit(x) for x in row) for row in grid)
        for grid in by_side.values())


class _Reader:
    """Builds a :class:`CompareResult` from a parsed document, failing on the first bad key."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def fail(self, key: str, what: str, got: Any) -> None:
        shown = _type_name(got) if isinstance(got, (dict, list)) and len(str(got)) > 80 else repr(got)[:80]
        raise ResultsFormatError(f"{key} must be {what}. Got {shown} instead", path=self.source,
                                 hint="this file was not written by spectra compare or was edited; rerun spectra compare --out")

    def get(self, d: dict, key: str, at: str, ok, what: str, *, required: bool = True, default: Any = None) -> Any:
        if key not in d:
            if required:
                raise ResultsFormatError(f"{at}missing key {key!r}", path=self.source, hint="rerun spectra compare --out")
            return default
        if not ok(d[key]):
            self.fail(f"{at}{key}", what, d[key])
        return d[key]

    def record(self, cls: type, d: Any, at: str) -> Any:
        """A frozen measure record: each field of its type and in its range (:data:`_FIELD_RULES`)."""
        if d is None:
            return None
        if not isinstance(d, dict):
            self.fail(at, "an object or null", d)
        values = {}
        for f in fields(cls):
            ok, what = _FIELD_RULES.get(f.name) or (_SHARE if cls in (PhiSummary, CapturedEnergy) else _NON_NEGATIVE)
            values[f.name] = self.get(d, f.name, at + ".", ok, what)
        return cls(**values)

    def measures(self, m: dict, key: str, names: tuple[str, ...], cls: type, at: str, *, required: bool) -> Any:
        value = self.get(m, key, at, lambda v: isinstance(v, dict) or (v is None and not required),
                         "an object" if required else "an object or null", required=required)
        if value is None:
            return None
        return {k: self.record(cls, value[k], f"{at}{key}.{k}") for k in names if k in value}

    def module(self, m: Any, i: int) -> ComparedModule:
        at = f"modules[{i}]."
        if not isinstance(m, dict):
            self.fail(f"modules[{i}]", "an object", m)
        g = self.get
        base = {
            "name": g(m, "name", at, lambda v: isinstance(v, str), "a string"),
            "layer": g(m, "layer", at, lambda v: v is None or (is_int(v) and 0 <= v < MAX_INDEX), "an integer or null, not negative"
                       " (a tensor name's index has at most 18 digits)"),
            "module": g(m, "module", at, lambda v: isinstance(v, str), "a string"),
            "role": g(m, "role", at, lambda v: v is None or isinstance(v, str), "a string or null", required=False),
            "out": g(m, "out", at, is_axis, f"a positive integer up to {MAX_DIM}"),
            "in_": g(m, "in", at, is_axis, f"a positive integer up to {MAX_DIM}"),
            "rank_a": g(m, "rank_a", at, _count, "an integer, not negative"),
            "rank_b": g(m, "rank_b", at, _count, "an integer, not negative"),
            "fro_a": g(m, "fro_a", at, _norm, "a number, not negative"), "fro_b": g(m, "fro_b", at, _norm, "a number, not negative"),
            "status": g(m, "status", at, lambda v: v in STATUSES, f"one of {', '.join(STATUSES)}", required=False, default="ok"),
            "reason": g(m, "reason", at, lambda v: v is None or isinstance(v, str), "a string or null", required=False),
            "note": g(m, "note", at, lambda v: v is None or isinstance(v, str), "a string or null", required=False),
        }
        phi = self.measures(m, "phi", SIDES, PhiSummary, at, required=True)
        if not phi:
            self.fail(f"{at}phi", "an object with a left or right entry", m["phi"])
        rec = ComparedModule(
            **base, phi=phi, angles=self.measures(m, "angles", SIDES, AngleSummary, at, required=True),
            captured=self.measures(m, "captured", ("b_in_a", "a_in_b"), CapturedEnergy, at, required=True),
            amplification=self.measures(m, "amplification", ("a", "b"), Amplification, at, required=False),
            intruders=self.measures(m, "intruders", ("a", "b"), IntruderSummary, at, required=False),
        )
        self.consistent(rec, at)
        return rec

    def consistent(self, m: ComparedModule, at: str) -> None:
        """Refuse values of the right types that no comparison gives (a hand edit): the findings would state them."""
        def bad(key: str, value: Any, why: str) -> None:
            impossible(f"{at}{key}", value, why, self.source, rerun="spectra compare --out")

        p = min(m.out, m.in_)
        for key in ("rank_a", "rank_b"):
            rank = getattr(m, key)
            if rank > p:
                bad(key, rank, f"a rank is at most min(out, in) = {p}")
            if rank == 0 and m.status == "ok":  # 0 only for an update with no direction (status says which)
                bad(key, rank, 'a rank is at least 1 where status is "ok"')
        measured = [v is not None for d in (m.phi, m.angles, m.captured) for v in d.values()]
        if m.status == "ok" and not all(measured):  # the findings count an "ok" module's measures
            bad("status", m.status, "a module whose φ, angles or captured energy are null has status zero_update or unresolved")
        if m.status != "ok" and any(measured):  # a "zero" module still counted in the findings' medians and intruders
            bad("status", m.status, "φ, the angles and the captured energies of a module with no update are null")
        if (m.status == "zero_update") != (m.fro_a == 0 or m.fro_b == 0):
            bad("status", m.status, f"status is zero_update exactly where fro_a or fro_b is 0 (here {m.fro_a:.6g} and {m.fro_b:.6g})")
        for side, ang in m.angles.items():
            if ang is None:
                continue
            if len(ang.cosines) != min(m.rank_a, m.rank_b):
                bad(f"angles.{side}.cosines", f"{len(ang.cosines)} values", f"there are min(rank_a, rank_b) = "
                                                                              f"{min(m.rank_a, m.rank_b)} principal angles")
            if any(x < y - _SLACK for x, y in zip(ang.cosines, ang.cosines[1:])):
                bad(f"angles.{side}.cosines", ang.cosines[:4], "cosines are in descending order")
            want = math.sqrt(sum(math.acos(min(1.0, c)) ** 2 for c in ang.cosines))
            if ang.grassmann is not None and not math.isclose(ang.grassmann, want, rel_tol=1e-4, abs_tol=1e-4):
                bad(f"angles.{side}.grassmann", ang.grassmann, f"it is ‖arccos(cosines)‖₂ = {want:.6g}")
        for who, rank in (("b_in_a", m.rank_a), ("a_in_b", m.rank_b)):
            if (ce := m.captured.get(who)) is not None and ce.r != rank:
                bad(f"captured.{who}.r", ce.r, f"the subspaces are {'A' if who == 'b_in_a' else 'B'}'s, of rank {rank}")
        for who, rank, fro in (("a", m.rank_a, m.fro_a), ("b", m.rank_b, m.fro_b)):
            amp = (m.amplification or {}).get(who)
            if amp is None:
                continue
            if amp.r != rank:
                bad(f"amplification.{who}.r", amp.r, f"the subspaces are of rank_{who} = {rank}")
            if amp.delta_fro is not None and not math.isclose(amp.delta_fro, fro, rel_tol=1e-9, abs_tol=1e-300):
                bad(f"amplification.{who}.delta_fro", amp.delta_fro, f"it is fro_{who} = {fro:.6g}")
            for key in ("proj_own", "proj_delta"):  # (null where undefined: the record's rule allows it)
                if (v := getattr(amp, key)) is not None and amp.w_fro is not None and v > amp.w_fro * (1 + 1e-9):
                    bad(f"amplification.{who}.{key}", v, f"no projection of W is larger than ‖W‖_F = {amp.w_fro:.6g}")
        for side, ph in m.phi.items():
            d = m.out if side == "left" else m.in_
            if ph is not None and ph.d != d:
                bad(f"phi.{side}.d", ph.d, f"the {side} singular vectors have {'out' if side == 'left' else 'in'} = {d} entries")
            # the baseline follows from the ranks and d: an edited one turned "at chance" into "far more than chance"
            if ph is not None and m.rank_a and m.rank_b and not math.isclose(ph.random, want := phi_random_baseline(
                    m.rank_a, m.rank_b, d), rel_tol=1e-9):
                bad(f"phi.{side}.random", ph.random, f"it is max(rank_a, rank_b) / d = {want:.6g}")
        for who, ce in m.captured.items():
            for key in ("two_sided", "left", "right"):
                v = getattr(ce, key) if ce is not None else None
                if v is not None and ce.best_rank_r is not None and v > ce.best_rank_r + _CAPTURED_SLACK:
                    bad(f"captured.{who}.{key}", v, f"no rank-{ce.r} subspaces hold more than best_rank_r = {ce.best_rank_r} "
                                                    "(Eckart–Young)")
        for who, amp in (m.amplification or {}).items():
            if amp is not None and amp.factor is not None and amp.proj_delta is not None and amp.delta_fro is not None:
                want = amp.delta_fro / amp.proj_delta if amp.proj_delta > 0 else 0.0  # 0 for ΔW = 0 (null when unbounded)
                if not math.isclose(amp.factor, want, rel_tol=1e-6, abs_tol=1e-300):
                    bad(f"amplification.{who}.factor", amp.factor, f"it is delta_fro / proj_delta = {want:.6g}")
        for who, intr in (m.intruders or {}).items():
            if intr is None:
                continue
            k = len(intr.max_cos)
            for key, count in [("count", intr.count), *((f"counts[{e!r}]", c) for e, c in intr.counts.items())]:
                if count > k:
                    bad(f"intruders.{who}.{key}", count, f"at most the {k} top directions examined (max_cos) are intruders")
            if is_num(intr.epsilon) and (at_eps := intr.counts.get(str(float(intr.epsilon)))) is not None and at_eps != intr.count:
                bad(f"intruders.{who}.count", intr.count, f"it is counts[{str(float(intr.epsilon))!r}] = {at_eps}, the count at its ε")
            for e, count in intr.counts.items():  # max_cos is stored to 6 decimals: a value at ε ± 1e-6 may go either way
                lo, hi = (sum(c < float(e) + t for c in intr.max_cos) for t in (-1e-6, 1e-6))
                if not lo <= count <= hi:
                    bad(f"intruders.{who}.counts[{e!r}]", count, f"max_cos holds {lo} values below ε = {e}")

    def across(self, modules: dict[str, ComparedModule], grids: dict[str, Any], config: dict[str, Any]) -> None:
        """Refuse φ grids of a module not compared or not of its ranks' shape, and intruders at another ε than the config's."""
        for name, by_side in grids.items():
            m = modules.get(name)
            if m is None:
                impossible(f"phi_grids[{name[:60]!r}]", "a grid", "grids are of compared modules only", self.source,
                           rerun="spectra compare --out")
            for side, grid in by_side.items():
                if len(grid) != m.rank_a or any(len(row) != m.rank_b for row in grid):
                    impossible(f"phi_grids[{name[:60]!r}].{side}", f"{len(grid)} × {len(grid[0]) if grid else 0}",
                               f"the grid is rank_a × rank_b = {m.rank_a} × {m.rank_b}", self.source, rerun="spectra compare --out")
        eps = config.get("epsilon")
        for m in modules.values():
            for who, intr in (m.intruders or {}).items():
                if intr is not None and is_num(eps) and is_num(intr.epsilon) and not math.isclose(intr.epsilon, eps, rel_tol=1e-12):
                    impossible(f"modules[{m.name[:60]!r}].intruders.{who}.epsilon", intr.epsilon, f"it is config.epsilon = {eps}",
                               self.source, rerun="spectra compare --out")

    def result(self, d: Any) -> CompareResult:
        if not isinstance(d, dict):
            self.fail("compare.json", "a JSON object", d)
        if d.get("schema") != SCHEMA:
            raise ResultsFormatError(f"schema must be {SCHEMA!r}. Got {d.get('schema')!r} instead", path=self.source,
                                     hint="pass a compare.json written by spectra compare")
        g, at = self.get, ""
        is_str = lambda v: isinstance(v, str)
        names = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
        kinds = g(d, "kinds", at, lambda v: isinstance(v, dict) and all(v.get(k) in ("lora", "full") for k in ("a", "b")),
                  'an object {"a": "lora"|"full", "b": "lora"|"full"}')
        modules = g(d, "modules", at, lambda v: isinstance(v, list), "an array of objects")
        grids = g(d, "phi_grids", at, lambda v: isinstance(v, dict), "an object", required=False, default={})
        for name, by_side in grids.items():
            if not _grids_ok(by_side):
                self.fail(f"phi_grids[{name!r}]", _GRIDS, by_side)
        skipped = g(d, "skipped", at, lambda v: isinstance(v, list) and all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("reason"), str) for s in v),
            'an array of {"name", "reason"} strings', required=False, default=[])
        records = [self.module(m, i) for i, m in enumerate(modules)]
        seen: dict[str, ComparedModule] = {}
        for i, m in enumerate(records):
            if m.name in seen:  # counted twice in every median and count of the findings
                impossible(f"modules[{i}].name", m.name[:80], "each module has one record; this name came before", self.source,
                           rerun="spectra compare --out")
            seen[m.name] = m
        config = g(d, "config", at, lambda v: isinstance(v, dict), "an object", required=False, default={})
        self.across(seen, grids, config)
        a_only = g(d, "a_only", at, names, "an array of strings", required=False, default=[])
        b_only = g(d, "b_only", at, names, "an array of strings", required=False, default=[])
        for key, listed in (("a_only", a_only), ("b_only", b_only)):
            if both := next((n for n in listed if n in seen), None):  # "updated only by A" and compared
                impossible(key, both[:80], "a module updated by one side only is not among the compared modules", self.source,
                           rerun="spectra compare --out")
        return CompareResult(
            a=g(d, "a", at, is_str, "a string"), b=g(d, "b", at, is_str, "a string"),
            base=g(d, "base", at, lambda v: v is None or isinstance(v, str), "a string or null", required=False),
            kinds=kinds, config=config, modules=records, a_only=a_only, b_only=b_only,
            phi_grids=grids, skipped=skipped,
            warnings=g(d, "warnings", at, names, "an array of strings", required=False, default=[]),
            device=g(d, "device", at, lambda v: v is None or isinstance(v, str), "a string or null", required=False),
            elapsed_s=g(d, "elapsed_s", at, _norm, "a number, not negative", required=False, default=0.0),
            version=g(d, "version", at, is_str, "a string", required=False, default=__version__),
        )


def journal_record(index: int, out: tuple[ComparedModule, dict] | dict[str, str]) -> dict[str, Any]:
    """One line of compare's journal: the module at ``index`` of the run's plan, measured
    (``{"i", "module", "grids"}``) or skipped (``{"i", "skipped"}``); strict JSON (undefined values null)."""
    if isinstance(out, dict):
        return {"i": index, "skipped": out}
    rec, grids = out
    return finite_or_null({"i": index, "module": rec.to_dict(), "grids": grids})


def from_journal_record(d: Any, source: str | os.PathLike[str], line: int) -> tuple[int, tuple[ComparedModule, dict] | dict[str, str]]:
    """Inverse of :func:`journal_record`: ``(index, out)``, every key checked as :meth:`CompareResult.load` checks it.

    Raises:
        ResultsFormatError: the record is not one compare wrote (names the line of ``source``).
    """
    reader, at = _Reader(source), f"record {line}: "
    if not isinstance(d, dict) or not is_int(d.get("i")) or ("module" in d) == ("skipped" in d):
        reader.fail(f"record {line}", 'an object {"i", "module", "grids"} or {"i", "skipped"}', d)
    if "skipped" in d:
        s = d["skipped"]
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("reason"), str)):
            reader.fail(f"{at}skipped", 'an object {"name", "reason"}', s)
        return d["i"], {"name": s["name"], "reason": s["reason"]}
    grids = d.get("grids")
    if not _grids_ok(grids):
        reader.fail(f"{at}grids", _GRIDS, grids)
    return d["i"], (reader.module(d["module"], d["i"]), grids)


def zero_reason(zero_a: bool, zero_b: bool) -> str:
    """The ``reason`` of a module whose update on side A (``zero_a``), B or both is exactly zero: status ``zero_update``."""
    who = "A and B" if zero_a and zero_b else ("A" if zero_a else "B")
    return (f"ΔW of {who} is exactly zero (a frozen module, or a LoRA saved at initialisation with B = 0): "
            "it has no singular subspace, so φ, the angles and the captured energies are undefined")


def unresolved_reason(a: str | None, b: str | None) -> str:
    """The ``reason`` of a module whose non-zero dense update on side A, B or both has no singular value above the
    rounding floor of its stored weights (``a``, ``b``: the stored dtype of each such side, None for the others):
    status ``unresolved``, with null subspace measures (also appended to a ``zero_update`` reason when the other side
    is exactly zero)."""
    both = a is not None and b is not None
    whose = "A's and B's updates" if both else f"{'A' if a is not None else 'B'}'s update"
    stored = "/".join(dict.fromkeys(x for x in (a, b) if x is not None))
    return (f"{unresolved_text(whose, stored, plural=both)}: {'each' if both else 'the'} update is rounding noise of "
            "the stored weights, so φ, the angles and the captured energies are undefined")


__all__ = ["SCHEMA", "STATUSES", "AngleSummary", "CompareResult", "ComparedModule", "IntruderSummary", "PhiSummary",
           "from_journal_record", "journal_record", "random_two_sided", "unresolved_reason", "zero_reason"]
