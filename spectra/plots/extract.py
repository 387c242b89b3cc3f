"""Figures of ``spectra extract``, drawn from ``extract.json``'s records (so the report draws them from
files): energy kept and rank per module against the uniform-rank adapter of the same parameter count,
and the layers × modules map of the ranks chosen."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spectra.plots.base import heatmap, label, plain_text, save_figures
from spectra.roles import role_sort_key


@plain_text
def energy_figure(doc: dict[str, Any]):
    """Two panels over the modules in layer order: the share of each module's ‖ΔW‖² the adapter keeps
    (and what a uniform rank with the same total parameter count keeps), and the rank each got."""
    from matplotlib.figure import Figure

    mods = doc["modules"]
    x = np.arange(len(mods))
    uni = doc.get("uniform") or {}
    fig = Figure(figsize=(min(6 + 0.04 * len(mods), 18), 6.2), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    kept = [m["energy_kept"] for m in mods]
    ukept = [np.nan if m.get("uniform_energy_kept") is None else m["uniform_energy_kept"] for m in mods]
    tot = doc.get("totals") or {}
    ax1.plot(x, kept, "o", ms=3, label=f"extracted: {tot.get('energy_kept', float('nan')):.3f} of all energy")
    ax1.plot(x, ukept, "-", lw=1, color="tab:orange",
             label=f"uniform r = {uni.get('rank')}: {uni['energy_kept']:.3f}" if uni.get("energy_kept") is not None else "uniform")
    if doc.get("mode") == "energy":
        ax1.axhline(doc["selection"]["energy"], color="grey", ls=":", lw=1, label=f"τ = {doc['selection']['energy']:g}")
    ax1.set_ylabel("energy kept, Σ_{i≤r} σᵢ² / ‖ΔW‖²")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=8, loc="lower right")
    ax1.set_title(f"{doc.get('mode')} rule: {tot.get('params', 0):,} LoRA parameters "
                  f"({100 * tot.get('param_fraction', 0):.2f}% of the update's)", fontsize=10, parse_math=False)
    # one filled step outline, not one bar patch per module: a third of the figure's drawing time at 210 modules
    ax2.stairs([m["rank"] for m in mods], np.arange(len(mods) + 1) - 0.5, fill=True, label="extracted rank")
    ax2.plot(x, [m["uniform_rank"] for m in mods], "-", color="tab:orange", lw=1, label="uniform rank")
    ax2.set_ylabel("rank r")
    ax2.legend(fontsize=8)
    step = max(1, len(mods) // 30)
    ax2.set_xticks(x[::step], [label(f"{m['label']} L{m['layer']}" if m.get("layer") is not None else m["label"], 24)
                               for m in mods[::step]], rotation=60, ha="right", fontsize=7)
    for t in ax2.get_xticklabels():
        t.set_parse_math(False)
    ax2.set_xlabel("module (layer order)")
    return fig


def rank_heatmap(doc: dict[str, Any]):
    """Layers × modules map of the ranks chosen (median over experts); None without layered modules."""
    rows = [m for m in doc["modules"] if m.get("layer") is not None]
    if not rows:
        return None
    layers = sorted({m["layer"] for m in rows})
    order: dict[str, tuple] = {}
    for m in rows:
        order.setdefault(m["label"], role_sort_key(m.get("role"), m["label"]))
    labels = sorted(order, key=lambda k: order[k])
    cells: dict[tuple[int, str], list[float]] = {}
    for m in rows:
        cells.setdefault((m["layer"], m["label"]), []).append(float(m["rank"]))
    grid = np.full((len(layers), len(labels)), np.nan)
    li, mi = {v: i for i, v in enumerate(layers)}, {v: i for i, v in enumerate(labels)}
    for (layer, lab), vals in cells.items():
        grid[li[layer], mi[lab]] = float(np.median(vals))
    return heatmap(grid, layers, labels, title=f"Rank chosen per module ({doc.get('mode')} rule)", cbar_label="LoRA rank r",
                   fmt=lambda v: f"{v:.0f}")


def extract_builders(doc: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """name -> a callable drawing that figure: ``extract`` (energy and rank per module) and
    ``extract_ranks`` (the map; None when there is no layer stack)."""
    return {"extract": lambda: energy_figure(doc), "extract_ranks": lambda: rank_heatmap(doc)}


def extract_figures(doc: dict[str, Any]) -> dict[str, Any]:
    """name -> Figure: ``extract`` (energy and rank per module) and ``extract_ranks`` (the map)."""
    figs = {name: build() for name, build in extract_builders(doc).items()}
    return {k: v for k, v in figs.items() if v is not None}


def save_extract_plots(doc: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write :func:`extract_figures` as ``<name>.png`` into ``out_dir`` (two at a time:
    :func:`spectra.plots.base.save_figures`); name -> path."""
    return save_figures(extract_builders(doc), out_dir, dpi=110)


__all__ = ["energy_figure", "extract_builders", "extract_figures", "rank_heatmap", "save_extract_plots"]
