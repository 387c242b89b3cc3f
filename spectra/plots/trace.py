"""Figures of ``spectra trace``: metrics against the training step per module kind, layer × step
heatmaps, and the training loss beside the update's rank (for the report)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spectra.display import tau_percent
from spectra.plots.base import heatmap, legend_label, plain_text, save_figures
from spectra.roles import role_sort_key
from spectra.trace_inputs import moved


def headline_key(doc: dict[str, Any]) -> str:
    """The energy-rank threshold key shown: 0.9 when traced, else the nearest traced one."""
    ts = doc.get("thresholds") or [0.9]
    return str(float(min(ts, key=lambda t: abs(float(t) - 0.9))))


def _turn(pt: dict[str, Any], which: str, side: str = "right") -> float | None:
    return ((pt.get(which) or {}).get(side) or {}).get("phi")


def metric_getters(doc: dict[str, Any]) -> dict[str, tuple[str, Callable[[dict, dict], float | None]]]:
    """Panel name -> (axis label, ``value(matrix, point)``) of the metrics plotted against the step."""
    key = headline_key(doc)
    lora = doc.get("kind") == "lora"
    return {
        "energy_rank": (f"energy rank [{key}] of ΔW", lambda m, p: (p.get("energy_rank") or {}).get(key)),
        "rel_norm": ("‖ΔW‖_F / ‖W_base‖_F", lambda m, p: p.get("rel_norm")),
        "effective_rank": ("effective rank / r" if lora else "effective rank of ΔW",
                           (lambda m, p: p.get("effective_rank_over_r")) if lora else (lambda m, p: p.get("effective_rank"))),
        "turn": ("φ of the top-k (right) with the first checkpoint;\ndashed: with the previous one",
                 lambda m, p: _turn(p, "turn_first")),
    }


def _series(doc: dict[str, Any], value: Callable[[dict, dict], float | None]) -> dict[str, tuple[list[int], list[float]]]:
    """Module kind -> (steps, median over that kind's changed matrices, :func:`spectra.trace_inputs.moved`) of ``value``."""
    steps = [c["step"] for c in doc.get("checkpoints", [])]
    kinds: dict[str, list[list[float]]] = {}
    order: dict[str, tuple] = {}
    for m in doc.get("matrices", []):
        order.setdefault(m["module"], role_sort_key(m.get("role"), m["module"]))
        row = []
        for p in m["points"]:
            v = value(m, p) if moved(p) else None  # an unchanged matrix is no point of the update's growth
            row.append(np.nan if v is None else float(v))
        kinds.setdefault(m["module"], []).append(row)
    out = {}
    for kind in sorted(kinds, key=lambda k: order[k]):
        arr = np.array(kinds[kind], dtype=float)
        with np.errstate(all="ignore"):
            med = np.array([np.nanmedian(col) if np.isfinite(col).any() else np.nan for col in arr.T])
        out[kind] = (steps, med.tolist())
    return out


@plain_text
def metrics_figure(doc: dict[str, Any]):
    """2 × 2 panels of metrics against the step, one line per module kind (median over layers)."""
    from matplotlib.figure import Figure

    getters = metric_getters(doc)
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    for i, (name, (label, value)) in enumerate(getters.items()):
        ax = fig.add_subplot(2, 2, i + 1)
        for kind, (steps, vals) in _series(doc, value).items():
            line, = ax.plot(steps, vals, marker="o", ms=3, label=legend_label(kind))
            if name == "turn":
                _, prev = _series(doc, lambda m, p: _turn(p, "turn_prev")).get(kind, (steps, []))
                if prev:
                    ax.plot(steps, prev, ls="--", lw=0.9, color=line.get_color())
        if name == "rel_norm" and any(np.isfinite(v) and v > 0 for _, vals in _series(doc, value).values() for v in vals):
            ax.set_yscale("log")
        if name == "turn":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training step")
        ax.set_ylabel(label, fontsize=8)
    fig.axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("How ΔW evolved during training (median over layers per module kind)", fontsize=10)
    return fig


def layer_step_heatmap(doc: dict[str, Any], *, which: str = "rank"):
    """Layers × steps: the median over a layer's matrices of ``energy_rank[τ] / p`` (full) or
    ``/ r`` (LoRA) (``which="rank"``), or of φ with the first checkpoint's subspace (``"turn"``).
    Returns None when there is no layer stack."""

    key = headline_key(doc)
    steps = [c["step"] for c in doc.get("checkpoints", [])]
    mats = [m for m in doc.get("matrices", []) if m.get("layer") is not None]
    if not mats or not steps:
        return None
    layers = sorted({m["layer"] for m in mats})
    cells: dict[tuple[int, int], list[float]] = {}
    for m in mats:
        for j, p in enumerate(m["points"]):
            if not moved(p):
                continue
            denom = p.get("lora_r") or m.get("lora_r") or min(m["shape"])  # each point's own r: a run may change it
            v = (p.get("energy_rank") or {}).get(key)
            v = v / denom if which == "rank" and v is not None else (_turn(p, "turn_first") if which == "turn" else None)
            if v is not None:
                cells.setdefault((layers.index(m["layer"]), j), []).append(v)
    grid = np.full((len(layers), len(steps)), np.nan)
    for (i, j), vs in cells.items():
        grid[i, j] = float(np.median(vs))
    if which == "rank":
        unit = "r" if doc.get("kind") == "lora" else "p = min(out, in)"
        title, cbar = f"Rank needed for {tau_percent(key)} of ΔW's energy, as a fraction of {unit}", f"energy_rank[{key}] / {unit.split()[0]}"
    else:
        title, cbar = "φ between each checkpoint's top-k subspace and the first one's (1: unturned)", "φ (right singular vectors)"
    return heatmap(grid, layers, steps, title=title + " (median over the layer's matrices)", cbar_label=cbar,
                   fmt=lambda v: f"{v:.2f}", vmin=0.0, vmax=1.0, cmap="viridis" if which == "rank" else "magma",
                   row_label="layer", col_label="training step")


@plain_text
def loss_figure(doc: dict[str, Any]):
    """The training loss against the step with the median energy rank of ΔW on a second axis;
    None when the run logged no loss."""
    from matplotlib.figure import Figure

    hist = [h for h in doc.get("loss_history", []) if h.get("loss") is not None]
    if not hist:
        return None
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], color="black", lw=1.2, label="training loss")
    for extra, style in (("eval_loss", ":"), ("target_loss", "--")):
        pts = [h for h in doc.get("loss_history", []) if h.get(extra) is not None]
        if pts:
            ax.plot([h["step"] for h in pts], [h[extra] for h in pts], color="black", ls=style, lw=1, label=extra.replace("_", " "))
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats/token)")
    key = headline_key(doc)
    series = _series(doc, lambda m, p: (p.get("energy_rank") or {}).get(key))
    if series:
        ax2 = ax.twinx()
        steps = [c["step"] for c in doc.get("checkpoints", [])]
        all_rows = np.array([vals for _, vals in series.values()], dtype=float)
        with np.errstate(all="ignore"):
            med = [np.nanmedian(col) if np.isfinite(col).any() else np.nan for col in all_rows.T]
        ax2.plot(steps, med, color="tab:blue", marker="o", ms=3, label=f"median energy rank [{key}]")
        ax2.set_ylabel(f"median energy rank [{key}] of ΔW", color="tab:blue")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("Training loss and the rank of the update (checkpoints marked)", fontsize=10)
    return fig


def trace_builders(doc: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """name -> a callable drawing that figure of a trace document (``trace.json`` as a dict; None when
    it has nothing to show)."""
    return {"trace_metrics": lambda: metrics_figure(doc),
            "trace_heatmap_rank": lambda: layer_step_heatmap(doc, which="rank"),
            "trace_heatmap_turn": lambda: layer_step_heatmap(doc, which="turn"),
            "trace_loss": lambda: loss_figure(doc)}


def trace_figures(doc: dict[str, Any]) -> dict[str, Any]:
    """Name -> Figure of a trace document (``trace.json`` as a dict)."""
    figs = {name: build() for name, build in trace_builders(doc).items()}
    return {k: v for k, v in figs.items() if v is not None}


def save_trace_plots(doc: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write :func:`trace_figures` as PNGs into ``out_dir`` (two at a time:
    :func:`spectra.plots.base.save_figures`); returns name -> path."""
    return save_figures(trace_builders(doc), out_dir, dpi=110)
