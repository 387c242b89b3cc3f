"""Result objects of ``spectra esd`` and their files: ``esd.json`` (schema ``spectra.esd/1``, documented in
README.md), ``esd.csv``, the α heatmap and the log-log ESD plots. Files are written atomically."""

from __future__ import annotations

import copy
import json
import os
import statistics
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from spectra.errors import ResultsFormatError
from spectra.esd import training_warning
from spectra.io.files import atomic_write_text
from spectra.io.jsonfile import RESULTS_MAX_BYTES, finite_or_null, load_json, result_json
from spectra.results import rows_to_csv
from spectra.results_check import impossible, is_num, unique_names

SCHEMA = "spectra.esd/1"

#: Identity fields of a record; every other key of a record is an :class:`spectra.esd.EsdMetrics` field.
IDENTITY_FIELDS = ("name", "layer", "module", "role", "expert", "shape", "dtype", "note")


@dataclass
class EsdRecord:
    """The ESD metrics of one matrix.

    Attributes:
        name: the tensor name (``":e<k>"`` for one expert of a stacked tensor, ``":q"``… for a split part).
        layer: layer index, None outside the layer stack.
        module: module label (``"q_proj"``); role: cross-architecture role (``"q"``…), or None.
        expert: MoE expert index, or None.
        shape: ``[out, in]`` of the analysed matrix.
        dtype: the stored dtype.
        note: caveats (rows analysed, unsplit fused matrix…); empty when none.
        metrics: the :class:`spectra.esd.EsdMetrics` fields (``alpha``, ``D``, ``xmin``, ``sigma``…).
        seconds: wall time of the decomposition and fit.
        eigenvalues: all eigenvalues λ = σ², ascending, for the matrices chosen for ESD plots; else None.
    """

    name: str
    layer: int | None
    module: str
    role: str | None
    expert: int | None
    shape: list[int]
    dtype: str
    note: str
    metrics: dict[str, Any]
    seconds: float = 0.0
    eigenvalues: list[float] | None = None

    def __getitem__(self, key: str) -> Any:
        """A metric by name (``rec["alpha"]``), or an identity field."""
        return self.metrics[key] if key in self.metrics else getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The flat record of ``esd.json``: identity fields, metrics, ``seconds``, ``eigenvalues``."""
        d = {k: getattr(self, k) for k in IDENTITY_FIELDS}
        d.update(self.metrics)
        d["seconds"] = self.seconds
        d["eigenvalues"] = self.eigenvalues
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EsdRecord:
        ident = {k: d.get(k) for k in IDENTITY_FIELDS}
        metrics = {k: v for k, v in d.items() if k not in IDENTITY_FIELDS and k not in ("seconds", "eigenvalues")}
        return cls(**ident, metrics=metrics, seconds=d.get("seconds", 0.0), eigenvalues=d.get("eigenvalues"))


#: Metrics of an ``esd`` record that are text; every other one is a number or null.
TEXT_FIELDS = frozenset({"name", "module", "role", "dtype", "note", "xmin_method", "fit_branch", "status", "fit_note", "warning"})


def check_record(m: Any, at: str, source: Any) -> None:
    """Refuse an ``esd.json`` matrix record (or a journal's) whose keys have other types than spectra
    writes: a name, a module, a shape of two positive integers, text for :data:`TEXT_FIELDS`, numbers
    or null for the rest (a report or ``--resume`` would otherwise crash on them or show them).

    Raises:
        ResultsFormatError: one line naming ``source``, the record and the key.
    """
    def bad(key: str, what: str) -> ResultsFormatError:
        return ResultsFormatError(f"{at}.{key} must be {what}. Got {str(m.get(key))[:60]!r} instead", path=source,
                                  hint="the file was edited or damaged; rerun spectra esd --out to rewrite it")

    if not (isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("module"), str)):
        raise ResultsFormatError(f"{at} must be an object with a name, a module and a shape [out, in]", path=source)
    shape = m.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                                for x in shape)):
        raise bad("shape", "[out, in], two positive integers")
    for key, v in m.items():
        if key in TEXT_FIELDS:
            if v is not None and not isinstance(v, str):
                raise bad(key, "text or null")
        elif key == "eigenvalues":
            if v is not None and not (isinstance(v, list) and all(is_num(x) for x in v)):
                raise bad(key, "an array of numbers or null")
        elif key != "shape" and v is not None and not is_num(v):
            raise bad(key, "a number or null")
    if m.get("status") == "success" and not is_num(m.get("alpha")):  # a missing α read as a failed fit, the medians moved
        raise bad("alpha", "a number where the fit succeeded (status success)")
    _check_ranges(m, min(shape), max(shape), at, source)
    # the flag follows from α (WeightWatcher's thresholds): an edited α beside the old flag was counted by the flag
    if "warning" in m and "alpha" in m and (m["warning"] or "") != training_warning(m["alpha"]):
        raise bad("warning", f"{training_warning(m['alpha']) or 'empty'!r} for α = {m['alpha']} (α < 2: over-trained, "
                             "α > 6: under-trained)")


def _check_ranges(m: dict[str, Any], M: int, N: int, at: str, source: Any) -> None:
    """Refuse values no ESD of an ``N × M`` matrix (``M <= N``) can have: counts outside 0..M, α below 1 (the
    power-law MLE is 1 + n / Σ ln(λ/xmin)), a KS distance outside [0, 1], negative scales, xmin above xmax, λ_max
    above Σλ, a stable rank above M. ``m`` has passed the type checks of :func:`check_record`."""
    def no(key: str, why: str) -> None:
        impossible(f"{at}.{key}", m[key], why, source, rerun="spectra esd --out")

    def has(key: str) -> bool:
        return is_num(m.get(key))

    for key, want, of in (("N", N, "max"), ("M", M, "min")):
        if has(key) and m[key] != want:
            no(key, f"it is {of}(shape) = {want}")
    for key in ("num_evals", "num_fit_evals", "num_pl_spikes", "matrix_rank", "rank_loss", "weak_rank_loss", "unresolved",
                "mp_num_spikes"):
        if has(key) and not 0 <= m[key] <= M:
            no(key, f"a count of eigenvalues lies from 0 to min(shape) = {M}")
    if has("alpha") and not m["alpha"] >= 1:
        no("alpha", "the power-law exponent's estimate 1 + n / Σ ln(λ/xmin) is above 1")
    if has("D") and not 0 <= m["D"] <= 1:
        no("D", "a Kolmogorov–Smirnov distance lies from 0 to 1")
    for key in ("sigma", "xmin", "xmax", "norm", "spectral_norm", "lambda_max", "sv_max", "sv_min", "stable_rank", "mp_sigma2"):
        if has(key) and not m[key] >= 0:
            no(key, "it is not negative")
    if has("xmin") and has("xmax") and m["xmin"] > m["xmax"] * (1 + 1e-12):
        no("xmin", f"the fitted tail starts at or below its largest eigenvalue ({m['xmax']})")
    for key in ("spectral_norm", "lambda_max"):
        if has(key) and has("norm") and m[key] > m["norm"] * (1 + 1e-6) + 1e-300:
            no(key, f"λ_max is at most Σλ = {m['norm']}")
    if has("stable_rank") and m["stable_rank"] > M * (1 + 1e-9):
        no("stable_rank", f"Σλ / λ_max is at most min(shape) = {M}")


@dataclass
class EsdResult:
    """Everything ``spectra esd`` computed for one checkpoint; ``esd.json`` holds it.

    Attributes:
        model: the checkpoint as the user gave it.
        matrices: one record per analysed matrix, in layer order.
        skipped: ``{"name", "reason"}`` for tensors present but not analysed.
        config: the options (:class:`spectra.esd_run.EsdConfig` as a dict).
        warnings: one-line warnings of the run.
        complete: False while the run is in progress or if it was interrupted.
        elapsed_s: wall time of the whole run, seconds; device: where the spectra were computed.
        version: spectra's version; fingerprint: hash of the inputs and result-affecting options.
    """

    model: str
    matrices: list[EsdRecord] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    complete: bool = False
    elapsed_s: float = 0.0
    device: str = ""
    version: str = ""
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it would deep-copy every record (and its eigenvalues) only to be replaced
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "matrices"}
        d["matrices"] = [m.to_dict() for m in self.matrices]
        return {"schema": SCHEMA, **d}

    @classmethod
    def from_dict(cls, d: Any, *, source: str | os.PathLike[str] | None = None) -> EsdResult:
        """Inverse of :meth:`to_dict`.

        Raises:
            ResultsFormatError: another schema, or a matrix record without a string ``name``, a
                ``[out, in]`` ``shape`` and a ``module`` (one line naming the key and ``source``).
        """
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise ResultsFormatError(f"schema must be {SCHEMA!r}. Got {got!r} instead", path=source)
        mats = d.get("matrices", [])
        if not isinstance(mats, list):
            raise ResultsFormatError("matrices must be a list", path=source)
        for i, m in enumerate(mats):
            check_record(m, f"matrices[{i}]", source)
        unique_names(mats, source, "spectra esd --out")
        # a key every esd.json holds, deleted by hand or never written by an older writer: one line, not a TypeError
        if missing := [f.name for f in fields(cls) if f.name not in d and f.default is MISSING and f.default_factory is MISSING]:
            raise ResultsFormatError(f"esd.json has no {missing[0]!r}, which spectra esd always writes", path=source,
                                     hint="the file was edited or damaged; rerun spectra esd --out to rewrite it")
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["matrices"] = [EsdRecord.from_dict(m) for m in mats]
        return cls(**kw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EsdResult:
        """Read ``esd.json`` (or the folder holding one).

        Raises:
            ResultsFormatError: not JSON, or not a ``spectra.esd/1`` document.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "esd.json"
        doc = load_json(path, what="esd.json", error=ResultsFormatError, lone_surrogates=True, max_bytes=RESULTS_MAX_BYTES)
        return cls.from_dict(doc, source=path)

    def to_json(self, indent: int | None = 1) -> str:
        """``esd.json``'s text: valid JSON always (a non-finite number becomes null), UTF-8 when every
        name encodes, else with ``\\uXXXX`` escapes (a tensor name may hold a lone surrogate)."""
        doc = self.to_dict()
        try:
            return result_json(doc, indent=indent)
        except ValueError:  # a non-finite number somewhere (rare): write it as null
            return result_json(finite_or_null(doc), indent=indent)

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(Path(path), self.to_json() + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """Flat per-matrix rows for the CSV and :meth:`to_dataframe` (eigenvalues left out)."""
        rows = []
        for m in self.matrices:
            d = m.to_dict()
            d.pop("eigenvalues")
            out, inn = d.pop("shape")
            d = {"name": d.pop("name"), "layer": d.pop("layer"), "expert": d.pop("expert"), "module": d.pop("module"),
                 "role": d.pop("role"), "out": out, "in": inn, **d}
            rows.append(d)
        return rows

    def save_csv(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(Path(path), rows_to_csv(self.rows()))

    def to_dataframe(self):  # -> pandas.DataFrame
        """The per-matrix table as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        return pd.DataFrame(self.rows())

    def summary(self) -> list[dict[str, Any]]:
        """Per module label, in first-seen order: count, fitted count, median/min/max α, median D,
        and how many matrices are over-trained (α < 2) and under-trained (α > 6)."""
        groups: dict[str, list[EsdRecord]] = {}
        for m in self.matrices:
            groups.setdefault(m.module, []).append(m)
        out = []
        for module, ms in groups.items():
            alphas = [m["alpha"] for m in ms if m["alpha"] is not None]
            out.append({
                "module": module, "role": ms[0].role, "count": len(ms), "fitted": len(alphas),
                "alpha_median": statistics.median(alphas) if alphas else None,
                "alpha_min": min(alphas) if alphas else None, "alpha_max": max(alphas) if alphas else None,
                "D_median": statistics.median(m["D"] for m in ms if m["D"] is not None) if alphas else None,
                "over_trained": sum(m["warning"] == "over-trained" for m in ms),
                "under_trained": sum(m["warning"] == "under-trained" for m in ms),
            })
        return out

    def save(self, out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
        """Write ``esd.json``, ``esd.csv``, ``esd_config.json`` and, with ``plots``, ``alpha_heatmap.png``
        (needs a layer stack) and ``esd_plots.png`` (needs matrices with eigenvalues kept)."""
        out = Path(out_dir)
        files = {"json": self.save_json(out / "esd.json"), "csv": self.save_csv(out / "esd.csv"),
                 "config": atomic_write_text(out / "esd_config.json", json.dumps(self.config, indent=2, sort_keys=True) + "\n")}
        if plots:
            from spectra.plots import esd as esd_plots  # matplotlib only when plotting

            if any(m.layer is not None and m["alpha"] is not None for m in self.matrices):
                files["alpha_heatmap"] = esd_plots.alpha_heatmap(self.to_dict()["matrices"], out / "alpha_heatmap.png")
            chosen = [m.to_dict() for m in self.matrices if m.eigenvalues]
            if chosen:
                files["esd_plots"] = esd_plots.esd_loglog(chosen, out / "esd_plots.png")
        return files
