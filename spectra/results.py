"""Result objects of ``spectra diff`` and their files (SPEC.md, "The results contract").

``DiffResult`` is what :func:`spectra.diff` returns and what ``results.json`` holds. Files are
written atomically (temporary file + rename) so an interruption never leaves a half-written JSON.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from spectra.errors import output_error

SCHEMA = "spectra.diff/1"


def threshold_key(t: float) -> str:
    """JSON key of a threshold, as Python writes ``str(float)`` (SPEC.md): 0.9 -> ``"0.9"``."""
    return str(float(t))


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
        stable_rank, effective_rank, signal_rank: SPEC.md definitions.
        energy_rank, energy_rank_frac: threshold key (``"0.9"``) -> rank / rank ÷ p.
        random_energy_rank: threshold key -> energy rank of a Gaussian matrix of this shape.
        energy_rank_bounds: approximate mode only: threshold key -> ``[lo, hi]``, guaranteed
            bounds of the energy rank (the exact path leaves this None). In approximate mode
            ``nuclear_norm``, ``effective_rank`` and ``signal_rank`` are None (they need every
            singular value) and ``stable_rank`` uses the sketch's σ₁ (a lower bound of σ₁).
        singular_values: the top ``top_k`` singular values of ΔW, descending.
        method: how the spectrum was computed (``"gram/float64"``...).
        seconds: wall time of the decomposition.
        note: a caveat (rows analysed, split assumptions); empty when none.
        base_singular_values, tuned_singular_values: top ``top_k`` singular values of W_base and
            W_tuned, with ``--weight-spectra`` only (else None).
        lora_r, lora_alpha, lora_scale: for a LoRA update, the module's nominal rank, alpha and
            scale ``s`` (after rank/alpha patterns); None for full checkpoints.
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

    @property
    def p(self) -> int:
        """``min(out, in)``."""
        return min(self.shape)


@dataclass
class DiffResult:
    """Everything ``spectra diff`` computed; serialises to the SPEC.md contract.

    Attributes:
        base, tuned: the inputs as the user gave them (base is None for an adapter analysed alone).
        thresholds: energy-rank thresholds τ.
        modules: one entry per analysed matrix, in layer order.
        skipped: ``{"name", "reason"}`` for tensors present but not analysed.
        unmatched: ``{"base_only": [...], "tuned_only": [...]}``.
        config: the options of the run (``DiffConfig`` as a dict).
        warnings: one-line warnings raised during the run.
        complete: False while a run is in progress or if it was interrupted.
        elapsed_s: wall time of the whole run, seconds.
        device: the device the spectra were computed on.
        adapter: for an adapter run, its configuration (r, lora_alpha, rslora, DoRA, patterns).
        fingerprint: hash of the inputs and result-affecting options (``--resume`` checks it).
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

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` document (SPEC.md contract plus added keys)."""
        d = asdict(self)
        d = {"schema": SCHEMA, **d}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffResult":
        """Inverse of :meth:`to_dict`; refuses other schemas."""
        if d.get("schema") != SCHEMA:
            raise ValueError(f"schema must be {SCHEMA!r}. Got {d.get('schema')!r} instead.")
        d = dict(d)
        d.pop("schema")
        known = {f for f in ModuleResult.__dataclass_fields__}
        d["modules"] = [ModuleResult(**{k: v for k, v in m.items() if k in known}) for m in d.get("modules", [])]
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "DiffResult":
        """Read a ``results.json`` (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write ``results.json`` atomically."""
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n")

    def save_csv(self, path: str | os.PathLike[str]) -> Path:
        """One row per analysed matrix; energy ranks flattened to ``energy_rank_0.9`` columns."""
        return atomic_write_text(Path(path), rows_to_csv(self.rows()))

    def save(self, out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
        """Write ``results.json``, ``results.csv`` and, if ``plots``, the two heatmaps into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": self.save_json(out / "results.json"), "csv": self.save_csv(out / "results.csv")}
        if plots and any(m.layer is not None for m in self.modules):  # heatmaps need a layer stack
            from spectra import plots as _plots  # matplotlib only when plotting

            files["rank_heatmap"] = _plots.rank_heatmap(self, out / "rank_heatmap.png", threshold=self.headline_threshold)
            if any(m.rel_norm is not None for m in self.modules):
                files["relnorm_heatmap"] = _plots.relnorm_heatmap(self, out / "relnorm_heatmap.png")
        return files

    @property
    def headline_threshold(self) -> float:
        """τ shown in tables and heatmaps: 0.9 (Biderman et al.'s "rank needed") when computed, else the
        computed threshold nearest to it."""
        return min(self.thresholds, key=lambda t: abs(t - 0.9))

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
            row.update({"dtype": m.dtype, "method": m.method, "seconds": m.seconds, "note": m.note})
            rows.append(row)
        return rows

    def to_dataframe(self):  # -> pandas.DataFrame
        """The per-matrix table as a pandas DataFrame (needs pandas installed)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        return pd.DataFrame(self.rows())

    def summary(self, threshold: float = 0.9) -> list[dict[str, Any]]:
        """Per module label: count, medians of energy rank, its fraction of p, the random baseline
        fraction and rel_norm, in layer-stack column order."""
        k = threshold_key(threshold)
        groups: dict[str, list[ModuleResult]] = {}
        for m in self.modules:
            groups.setdefault(m.module, []).append(m)
        out = []
        for module, ms in groups.items():
            rel = [m.rel_norm for m in ms if m.rel_norm is not None]
            out.append({
                "module": module,
                "role": ms[0].role,
                "count": len(ms),
                "p": int(statistics.median(m.p for m in ms)),
                "energy_rank": statistics.median(m.energy_rank[k] for m in ms),
                "energy_rank_frac": statistics.median(m.energy_rank_frac[k] for m in ms),
                "random_frac": statistics.median(m.random_energy_rank[k] / m.p for m in ms),
                "rel_norm": statistics.median(rel) if rel else None,
            })
        return out

    def plot_rank_heatmap(self, path: str | os.PathLike[str] | None = None, *, threshold: float = 0.9):
        """Layers × modules heatmap of energy_rank[τ] / p; returns the figure or writes ``path``."""
        from spectra import plots as _plots

        return _plots.rank_heatmap(self, path, threshold=threshold)

    def plot_relnorm_heatmap(self, path: str | os.PathLike[str] | None = None):
        """Layers × modules heatmap of ‖ΔW‖_F / ‖W_base‖_F."""
        from spectra import plots as _plots

        return _plots.relnorm_heatmap(self, path)


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
    writer.writerows(rows)
    return buf.getvalue()


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and a rename: readers
    see the old file or the new one, never a part.

    Raises:
        OutputError: the folder or file cannot be written (full disk, permissions); ``path`` is
            unchanged and no temporary file is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise output_error(path, exc) from exc
        raise
    return path
