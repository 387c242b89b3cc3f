"""Figures: layer × module heatmaps of a diff (the only module that imports matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from spectra.naming import role_sort_key
from spectra.results import atomic_write_bytes, threshold_key

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
    # tick labels are checkpoint names: never parse them as mathtext ("$" is legal in a name)
    masked = np.ma.masked_invalid(grid)
    im = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n_mod), modules, rotation=45, ha="right")
    for label in ax.get_xticklabels():
        label.set_parse_math(False)
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
        return save_figure(fig, path, dpi=120)
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


def _layer_module_grid(records: list[dict], value) -> tuple[np.ndarray, list[int], list[str]]:
    rows = [r for r in records if r["layer"] is not None]
    layers = sorted({r["layer"] for r in rows})
    order: dict[str, tuple] = {}
    for r in rows:
        order.setdefault(r["module"], role_sort_key(r["role"], r["module"]))
    modules = sorted(order, key=lambda k: order[k])
    grid = np.full((len(layers), len(modules)), np.nan)
    li, mi = {l: i for i, l in enumerate(layers)}, {k: i for i, k in enumerate(modules)}
    for r in rows:
        v = value(r)
        if v is not None:
            grid[li[r["layer"]], mi[r["module"]]] = v
    return grid, layers, modules


def compare_plots(result, out_dir: Path, *, max_phi_modules: int = 4) -> dict[str, Path]:
    """Write :func:`compare_figures` as PNGs into ``out_dir``; returns name -> path."""
    files = {}
    for name, fig in compare_figures(result, max_phi_modules=max_phi_modules).items():
        files[name] = save_figure(fig, Path(out_dir) / f"{name}.png", dpi=110)
    return files


def compare_figures(result, *, max_phi_modules: int = 4) -> dict:
    """The figures of a compare run: captured energy and intruder counts (layers × modules), φ grids
    of a few modules (Hu et al. Fig. 3/4 style) and principal-angle curves. Returns name -> Figure."""
    from matplotlib.figure import Figure

    files: dict = {}
    recs = result.modules
    a_lbl, b_lbl = f"A ({result.kinds['a']})", f"B ({result.kinds['b']})"
    grid, layers, modules = _layer_module_grid(recs, lambda r: r["captured"]["b_in_a"]["two_sided"])
    if grid.size:
        files["captured_heatmap"] = _heatmap(
            grid, layers, modules, title=f"Energy of {b_lbl}'s update captured by {a_lbl}'s top-r subspaces (two-sided)",
            cbar_label="‖U_Aᵀ ΔW_B V_A‖²_F / ‖ΔW_B‖²_F", fmt=lambda v: f"{v:.2f}", vmin=0.0, vmax=1.0,
            path=None)
    if any("intruders" in r for r in recs):
        for who, lbl in (("a", a_lbl), ("b", b_lbl)):
            grid, layers, modules = _layer_module_grid(recs, lambda r: (r.get("intruders") or {}).get(who, {}).get("count"))
            if grid.size and np.isfinite(grid).any():
                eps = result.config["epsilon"]
                files[f"intruders_{who}"] = _heatmap(
                    grid, layers, modules, title=f"Intruder dimensions of {lbl} (top-{result.config['intruder_k']}, ε = {eps})",
                    cbar_label="intruder count", fmt=lambda v: f"{v:.0f}", vmin=0.0, cmap="Reds",
                    path=None)
    # φ grids for a few modules in the middle of the stack
    chosen = sorted(recs, key=lambda r: (abs((r["layer"] or 0) - np.median([x["layer"] or 0 for x in recs])), r["name"]))[:max_phi_modules]
    if chosen:
        side = next(iter(chosen[0]["phi"]))
        fig = Figure(figsize=(4.2 * len(chosen), 3.8), layout="constrained")
        for idx, r in enumerate(chosen):
            ax = fig.add_subplot(1, len(chosen), idx + 1)
            g = np.asarray(result.phi_grids[r["name"]][side])
            im = ax.imshow(g, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                           extent=(0.5, g.shape[1] + 0.5, 0.5, g.shape[0] + 0.5))
            ax.set_title(f"{r['module']} · layer {r['layer']}\nrandom ≈ {r['phi'][side]['random']:.3f}", fontsize=9, parse_math=False)
            ax.set_xlabel(f"j (top-j of B, r={r['rank_b']})")
            ax.set_ylabel(f"i (top-i of A, r={r['rank_a']})")
        fig.colorbar(im, ax=fig.axes, label=f"φ(A, B, i, j), {side} singular vectors")
        fig.suptitle("Normalised subspace similarity (Hu et al. 2021, Eq. 4)", fontsize=10)
        files["phi_grids"] = fig
        # principal angle curves
        fig = Figure(figsize=(6.5, 4), layout="constrained")
        ax = fig.add_subplot()
        for r in chosen:
            cos = r["angles"][side]["cosines"]
            ax.plot(range(1, len(cos) + 1), np.degrees(np.arccos(np.clip(cos, 0, 1))), marker="o", ms=3,
                    label=f"{r['module']} L{r['layer']}".replace("$", r"\$"))
        ax.set_xlabel("principal angle index l")
        ax.set_ylabel("θ_l (degrees)")
        ax.set_ylim(0, 90)
        ax.set_title(f"Principal angles between A's and B's top subspaces ({side})", fontsize=10)
        ax.legend(fontsize=7)
        files["principal_angles"] = fig
    return files


def learning_forgetting_plot(logs: dict[str, list[dict]], path: str | os.PathLike[str] | None = None):
    """Target loss (learning) against source loss (forgetting) along each run, start to end."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for name, recs in logs.items():
        pts = [(r["source_loss"], r["target_loss"]) for r in recs if r.get("source_loss") is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=name.replace("$", r"\$"))
        ax.annotate("end", (xs[-1], ys[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("source-domain loss (forgetting →), nats/token")
    ax.set_ylabel("held-out target-domain loss (← learning), nats/token")
    ax.set_title("Learning vs forgetting (Biderman et al. 2024): each run from its start", fontsize=10)
    ax.legend(fontsize=8)
    if path is None:
        return fig
    return save_figure(fig, path, dpi=120)


def save_figure(fig, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Render ``fig`` as PNG in memory and write it atomically (an interrupted or failed write never
    leaves a half image; a full disk raises :class:`spectra.errors.OutputError`)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(Path(path), buf.getvalue())
