"""Figures: layer × module heatmaps of a diff (the only module that imports matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from spectra.naming import role_sort_key
from spectra.results import threshold_key

if TYPE_CHECKING:
    from spectra.results import DiffResult, ModuleResult


def _grid(result: "DiffResult", value: Callable[["ModuleResult"], float | None]) -> tuple[np.ndarray, list[int], list[str], bool]:
    """Matrix (layers × modules) of ``value``, the median over experts for MoE expert matrices."""
    layered = [m for m in result.modules if m.layer is not None]
    layers = sorted({m.layer for m in layered})
    order: dict[str, tuple] = {}
    for m in layered:
        order.setdefault(m.module, role_sort_key(m.role, m.module))
    modules = sorted(order, key=lambda k: order[k])
    cells: dict[tuple[int, str], list[float]] = {}
    moe = False
    for m in layered:
        v = value(m)
        if v is not None:
            cells.setdefault((m.layer, m.module), []).append(v)
        moe |= m.expert is not None
    grid = np.full((len(layers), len(modules)), np.nan)
    li, mi = {l: i for i, l in enumerate(layers)}, {k: i for i, k in enumerate(modules)}
    for (l, k), vs in cells.items():
        grid[li[l], mi[k]] = float(np.median(vs))
    return grid, layers, modules, moe


def _heatmap(grid, layers, modules, *, title, cbar_label, fmt, vmin=None, vmax=None, cmap="viridis", path=None):
    # The object-oriented Figure API: no pyplot global state, no GUI backend needed, and the
    # returned Figure still displays in a notebook.
    from matplotlib.figure import Figure

    n_layers, n_mod = grid.shape
    # Layers run down the page so that 80+ layers stay readable; size grows with the grid.
    fig_h = min(4 + 0.22 * n_layers, 40)
    fig_w = min(3 + 0.95 * n_mod, 24)
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(grid)
    im = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n_mod), modules, rotation=45, ha="right")
    step = max(1, n_layers // 40)
    ax.set_yticks(range(0, n_layers, step), [str(l) for l in layers[::step]])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(cbar_label)
    if n_layers * n_mod <= 600:  # annotate while the numbers still fit in their cells
        lo, hi = np.nanmin(grid) if np.isfinite(grid).any() else 0, np.nanmax(grid) if np.isfinite(grid).any() else 1
        mid = (lo + hi) / 2
        for i in range(n_layers):
            for j in range(n_mod):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, fmt(grid[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if grid[i, j] < mid else "black")
    if path is not None:
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path
    return fig


def rank_heatmap(result: "DiffResult", path: str | os.PathLike[str] | None = None, *, threshold: float = 0.9):
    """Layers × modules heatmap of ``energy_rank[τ] / p`` (Biderman et al. 2024, Fig. 6 style).

    The title states the Gaussian-matrix baseline fraction for comparison. Returns the written path,
    or the figure when ``path`` is None.
    """
    k = threshold_key(threshold)
    grid, layers, modules, moe = _grid(result, lambda m: m.energy_rank_frac.get(k))
    rand = [m.random_energy_rank[k] / m.p for m in result.modules if m.layer is not None and m.p]
    title = (f"Rank needed to explain {threshold:.0%} of ΔW's energy, as a fraction of p = min(out, in)\n"
             f"Gaussian random matrix of the same shapes: {np.median(rand):.2f}" if rand else "")
    if moe:
        title += "   (experts: median)"
    return _heatmap(grid, layers, modules, title=title, cbar_label=f"energy_rank[{threshold}] / p",
                    fmt=lambda v: f"{v:.2f}", vmin=0.0, vmax=1.0, path=path)


def relnorm_heatmap(result: "DiffResult", path: str | os.PathLike[str] | None = None):
    """Layers × modules heatmap of ``‖ΔW‖_F / ‖W_base‖_F`` (log colour scale when it spans decades)."""
    grid, layers, modules, moe = _grid(result, lambda m: m.rel_norm)
    title = "Relative update size ‖ΔW‖_F / ‖W_base‖_F" + ("   (experts: median)" if moe else "")
    return _heatmap(grid, layers, modules, title=title, cbar_label="‖ΔW‖_F / ‖W_base‖_F",
                    fmt=lambda v: f"{v:.2g}", cmap="magma", path=path)
