"""Figures of ``spectra interfere``: one n × n heatmap per pairwise measure (the median over modules)
and a layers × modules heatmap of the n-way Task Singular Vectors interference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spectra.plots.base import heatmap, save_figures
from spectra.roles import role_sort_key

#: measure key -> (title, colour-bar label, vmin, vmax, colour map)
MEASURES: dict[str, tuple[str, str, float, float, str]] = {
    "cosine": ("Cosine of the flattened updates (Ilharco et al. 2023)", "⟨ΔW_s, ΔW_t⟩ / ‖ΔW_s‖‖ΔW_t‖", -1.0, 1.0, "RdBu_r"),
    "phi": ("Subspace similarity φ of the top-k subspaces (Hu et al. 2021, Eq. 4)", "φ(k_s, k_t)", 0.0, 1.0, "viridis"),
    "captured": ("Energy of column t's update in row s's top-k subspaces", "‖U_sᵀ ΔW_t V_s‖² / ‖ΔW_t‖²", 0.0, 1.0, "viridis"),
    "tsv": ("Task Singular Vectors interference of each pair (Gargiulo et al. 2025), bounded form",
            "‖(UᵀU − I) Σ (VᵀV − I)‖_F / bound (1: identical)", 0.0, 1.0, "magma"),
    "knots": ("Alignment in the KnOTS shared basis (Stoica et al. 2025): CKA of the coordinates", "CKA", 0.0, 1.0, "viridis"),
}


def interfere_figures(doc: dict[str, Any]) -> dict[str, Any]:
    """Name -> Figure: ``interfere_<measure>`` for each pairwise measure (the element-wise median over
    modules, tasks × tasks) and ``interfere_layers`` (layers × modules, the n-way relative TSV
    interference)."""
    figs: dict[str, Any] = {}
    summary = doc.get("summary") or {}
    names = doc["names"]
    count = summary.get("modules", 0)
    for key, (title, cbar, lo, hi, cmap) in MEASURES.items():
        if summary.get(key) is None:
            continue
        grid = np.array([[np.nan if v is None else v for v in row] for row in summary[key]], dtype=float)
        if key == "phi" and (doc.get("config") or {}).get("side") == "left":
            title += ", output side"
        figs[f"interfere_{key}"] = heatmap(grid, names, names, title=f"{title}; median over {count} matrices",
                                           cbar_label=cbar, fmt=lambda v: f"{v:.2f}", vmin=lo, vmax=hi, cmap=cmap,
                                           row_label="task s", col_label="task t")
    rows = [m for m in doc.get("modules", []) if m["layer"] is not None and m["tsv"].get("relative_fro") is not None]
    if rows:
        layers = sorted({m["layer"] for m in rows})
        order: dict[str, tuple] = {}
        for m in rows:
            order.setdefault(m["module"], role_sort_key(m["role"], m["module"]))
        modules = sorted(order, key=lambda k: order[k])
        grid = np.full((len(layers), len(modules)), np.nan)
        for m in rows:
            grid[layers.index(m["layer"]), modules.index(m["module"])] = m["tsv"]["relative_fro"]
        figs["interfere_layers"] = heatmap(
            grid, layers, modules, title=f"Task Singular Vectors interference of all {len(names)} updates "
                                         "(bounded form: 0 none, 1 identical)",
            cbar_label="‖(UᵀU − I) Σ (VᵀV − I)‖_F / bound", fmt=lambda v: f"{v:.2f}", vmin=0.0, vmax=1.0, cmap="magma")
    return figs


def save_interfere_plots(doc: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write :func:`interfere_figures` as PNGs into ``out_dir`` (two at a time:
    :func:`spectra.plots.base.save_figures`); returns name -> path."""
    return save_figures({name: (lambda fig=fig: fig) for name, fig in interfere_figures(doc).items()}, out_dir, dpi=110)
