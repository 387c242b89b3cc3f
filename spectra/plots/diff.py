"""Figures of one ``spectra diff`` result: layers × modules heatmaps of the rank needed (against
each shape's random baseline; for a LoRA adapter, the share of r it uses) and of the update's size,
and the spectra of ΔW for every layer with their cumulative energy. Definitions:
docs/definitions.md, "Spectrum metrics".

Each function returns a matplotlib Figure, or writes a PNG and returns its path when given one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from spectra.display import tau_percent
from spectra.metrics import threshold_key
from spectra.plots.base import heatmap, label, plain_text, save_figure, wrap
from spectra.roles import role_sort_key

if TYPE_CHECKING:
    from spectra.results import DiffResult, ModuleResult

#: At most this many lines per panel of the spectra figure (layers beyond it are evenly subsampled).
MAX_LINES = 64
#: Most module kinds the spectra figure shows (two panels each): those with the most matrices.
MAX_KINDS = 20


def layer_grid(result: DiffResult, value: Callable[[ModuleResult], float | None]) -> tuple[np.ndarray, list[int], list[str], bool]:
    """``(grid, layers, modules, moe)``: ``value`` of each matrix in the layer stack as a layers ×
    module-labels array (NaN where there is none), modules in role order (q, k, v, o, gate, up,
    down…); for MoE expert matrices the median over the experts of a cell (``moe`` is then True)."""
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
        if v is not None and np.isfinite(v):
            cells.setdefault((m.layer, m.module), []).append(v)
        moe |= m.expert is not None
    grid = np.full((len(layers), len(modules)), np.nan)
    li, mi = {lay: i for i, lay in enumerate(layers)}, {k: i for i, k in enumerate(modules)}
    for (lay, k), vs in cells.items():
        grid[li[lay], mi[k]] = float(np.median(vs))
    return grid, layers, modules, moe


def random_baselines(result: DiffResult, key: str) -> list[tuple[float, str]]:
    """``(fraction, "random 192×512")`` for each distinct random-matrix baseline
    ``random_energy_rank[key] / p`` of the analysed shapes (shapes with the same fraction share one
    entry, e.g. ``(out, in)`` and ``(in, out)``), ascending."""
    by_frac: dict[float, list[str]] = {}
    for m in result.modules:
        if m.layer is None or not m.p or key not in m.random_energy_rank:
            continue
        shape = f"{m.shape[0]}×{m.shape[1]}"
        names = by_frac.setdefault(round(m.random_frac(key), 3), [])
        if shape not in names:
            names.append(shape)
    return [(f, "random " + ", ".join(shapes[:2]) + (" …" if len(shapes) > 2 else "")) for f, shapes in sorted(by_frac.items())]


def is_adapter(result: DiffResult) -> bool:
    """True when every matrix the heatmaps draw (those of the layer stack; every one when none is) is a LoRA update
    (``lora_r`` set): a head the adapter saved whole (``modules_to_save``) lies outside the grid, so the cells keep
    the adapter's "used / r" view."""
    drawn = [m for m in result.modules if m.layer is not None] or result.modules
    return bool(drawn) and all(m.lora_r for m in drawn)


def rank_heatmap(result: DiffResult, path: str | os.PathLike[str] | None = None, *, threshold: float = 0.9):
    """Layers × modules heatmap of the rank needed for ``threshold`` of ΔW's energy
    (Biderman et al. 2024, Fig. 6 style).

    Full updates: ``energy_rank[τ] / p`` with p = min(out, in), on a colour scale fitted to the data,
    with each shape's Gaussian-matrix baseline ``random_energy_rank[τ] / p`` marked on the colour
    bar (or listed there when it lies outside the data's range). LoRA adapters: ``energy_rank[τ] / min(r, p)``,
    the share of the adapter's rank r the update uses (p where r exceeds it), on 0–1, each cell reading "used/r".
    Returns the written path, or the figure when ``path`` is None.
    """
    k = threshold_key(threshold)
    if is_adapter(result):
        grid, layers, modules, moe = layer_grid(result, lambda m: m.energy_rank[k] / m.lora_capacity)
        used, _, _, _ = layer_grid(result, lambda m: m.energy_rank[k])
        r, _, _, _ = layer_grid(result, lambda m: m.lora_capacity)
        text = np.where(np.isfinite(grid), np.char.add(np.char.add(np.nan_to_num(used).round().astype(int).astype(str), "/"),
                                                         np.nan_to_num(r).round().astype(int).astype(str)), "")
        title = (f"LoRA: ranks used for {tau_percent(threshold)} of the update's energy, out of the adapter's r\n"
                 f"(cells: energy_rank[{k}] / r, or / p where r > p = min(out, in); 1 = every rank is needed)")
        fig = heatmap(grid, layers, modules, title=title + ("   (experts: median)" if moe else ""),
                      cbar_label=f"energy_rank[{k}] / r", cell_text=text, vmin=0.0, vmax=1.0, cmap="viridis")
    else:
        grid, layers, modules, moe = layer_grid(result, lambda m: m.energy_rank_frac.get(k))
        rand, _, _, _ = layer_grid(result, lambda m: m.random_frac(k) if m.p else None)
        notes = []
        for j in range(len(modules)):  # one baseline per column when its shapes agree, else the range
            col = rand[:, j][np.isfinite(rand[:, j])]
            notes.append("" if not col.size else f"random {col.min():.2f}" if np.ptp(col) < 0.005
                         else f"random {col.min():.2f}–{col.max():.2f}")
        cells = np.isfinite(grid) & np.isfinite(rand)
        below = int(np.sum(grid[cells] < rand[cells]))
        n_zero = int(np.sum(grid[cells] == 0))  # rank 0 (ΔW = 0) is not "below random": nothing changed there
        flagged, _, _, _ = layer_grid(result, lambda m: 1.0 if m.caveats else 0.0)
        text = np.where(np.isfinite(grid), np.char.add(np.char.mod("%.2f", np.nan_to_num(grid)),
                                                        np.where(flagged > 0, "*", "")), "")
        title = (f"Rank needed for {tau_percent(threshold)} of ΔW's energy, as a fraction of p = min(out, in)\n"
                 f"under each module: the same for a Gaussian random matrix of its shape (a dense update); "
                 f"{below - n_zero} of {int(cells.sum()) - n_zero} cells lie below it"
                 + (f" ({n_zero} cell{'s' * (n_zero != 1)} at 0: ΔW = 0)" if n_zero else "")
                 + ("\n* a numerical caveat (rounding level, precision, quantisation): see the warnings"
                    if np.nansum(flagged) else ""))
        marks = random_baselines(result, k)
        data_max = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
        # the colour scale fits the data, stretched to show the baselines that lie close above it
        vmax = max([data_max] + [v for v, _ in marks if v <= 1.5 * data_max]) or 1.0
        fig = heatmap(grid, layers, modules, title=title + ("   (experts: median)" if moe else ""),
                      cbar_label=f"energy_rank[{k}] / p", cell_text=text, marks=marks, vmin=0.0, vmax=vmax,
                      col_notes=notes, cmap="viridis")
    return fig if path is None else save_figure(fig, path, dpi=120)


def relnorm_heatmap(result: DiffResult, path: str | os.PathLike[str] | None = None):
    """Layers × modules heatmap of ``‖ΔW‖_F / ‖W_base‖_F``, on a logarithmic colour scale when the
    values span more than a factor of 10, else a linear one from 0, fitted to the data."""
    grid, layers, modules, moe = layer_grid(result, lambda m: m.rel_norm)
    pos = grid[np.isfinite(grid) & (grid > 0)]
    log = bool(pos.size) and pos.max() / pos.min() > 10
    n_zero = int(np.sum(grid == 0))
    title = ("Relative size of the update ‖ΔW‖_F / ‖W_base‖_F (0.01 = the weights moved by 1% of their norm)"
             + (f"; {n_zero} cell{'s' * (n_zero != 1)} at 0 (ΔW = 0){', grey: off the log scale' if log else ''}" if n_zero else "")
             + ("   (experts: median)" if moe else ""))
    fig = heatmap(grid, layers, modules, title=title, cbar_label="‖ΔW‖_F / ‖W_base‖_F" + (" (log scale)" if log else ""),
                  fmt=lambda v: f"{v:.2g}", log=log, cmap="magma")
    return fig if path is None else save_figure(fig, path, dpi=120)


def cumulative_energy(m: ModuleResult, thresholds: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cumulative energy curve of one result, as far as the result knows it.

    Returns ``(k, E, k_more, E_more)``: ``E[i] = Σ_{j≤k[i]} σⱼ² / ‖ΔW‖²_F`` exactly for
    ``k = 1..len(singular_values)`` (the stored top values), then the points the energy ranks
    give beyond them: ``E_more[i] = τ`` at ``k_more[i] = energy_rank[τ]`` for each τ whose rank lies
    past the stored values (``energy_rank[τ]`` is the smallest k whose share reaches τ, so the
    curve passes at or above these points). Empty arrays for a zero update.
    """
    if not m.fro_norm or not m.singular_values:
        e = np.zeros(0)
        return e, e, e, e
    s = np.asarray(m.singular_values, dtype=np.float64)
    k = np.arange(1, len(s) + 1)
    energy = np.cumsum((s / m.fro_norm) ** 2)  # as ratios: σ near 1e200 (float64 weights) squares past float64
    more = sorted((m.energy_rank[threshold_key(t)], float(t)) for t in thresholds
                  if threshold_key(t) in m.energy_rank and m.energy_rank[threshold_key(t)] > len(s))
    k_more = np.array([r for r, _ in more], dtype=float)
    e_more = np.array([t for _, t in more], dtype=float)
    return k, np.minimum(energy, 1.0), k_more, e_more


def _kinds(result: DiffResult) -> list[tuple[str, list[ModuleResult]]]:
    """Module labels in role order with their matrices (one expert per layer for MoE stacks)."""
    groups: dict[str, list[ModuleResult]] = {}
    order: dict[str, tuple] = {}
    for m in result.modules:
        if not m.fro_norm or not m.singular_values:
            continue
        ms = groups.setdefault(m.module, [])
        if m.expert is not None and any(x.layer == m.layer and x.expert is not None for x in ms):
            continue  # MoE: the first expert of each layer stands for the layer
        ms.append(m)
        order.setdefault(m.module, role_sort_key(m.role, m.module))
    return [(k, groups[k]) for k in sorted(groups, key=lambda k: order[k])]


@plain_text
def spectra_figure(result: DiffResult, *, threshold: float | None = None):
    """The spectrum of ΔW for every layer: for each module kind, the normalised singular values
    ``σᵢ / σ₁`` (top row) and the cumulative energy ``Σ_{j≤k} σⱼ² / ‖ΔW‖²_F`` (bottom row), one line
    per layer coloured by depth, drawn as far as the highest threshold's energy rank (99% by default).

    Solid lines come from the stored top singular values (``--top-k``); beyond them the dotted
    segments join the points the energy ranks give (τ at k = energy_rank[τ]): the values between
    those points are not stored, and the figure says so. Returns None when nothing was updated.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    kinds = _kinds(result)
    if not kinds:
        return None
    shown = ""
    if len(kinds) > MAX_KINDS:  # two panels a kind: 512 one-expert kinds drew for minutes into 16 MB of SVG
        chosen = {k for k, _ in sorted(kinds, key=lambda kv: -len(kv[1]))[:MAX_KINDS]}
        shown = f"; the {MAX_KINDS} of {len(kinds)} module kinds with the most matrices"
        kinds = [(k, ms) for k, ms in kinds if k in chosen]
    tau = result.headline_threshold if threshold is None else threshold
    top = max(result.thresholds)
    layers = sorted({m.layer for _, ms in kinds for m in ms if m.layer is not None})
    norm = Normalize(vmin=min(layers, default=0), vmax=max(max(layers, default=1), min(layers, default=0) + 1))
    cmap = colormaps["viridis"]
    ncols = min(len(kinds), 5)
    nrows = -(-len(kinds) // ncols)
    width, height = 2.7 * ncols + 1.6, 5.0 * nrows + 0.9
    # a fixed grid, not constrained layout: with 10-20 panels the layout solver costs seconds per figure
    fig = Figure(figsize=(width, height))
    grid = fig.add_gridspec(2 * nrows, ncols, left=0.75 / width, right=1 - 1.2 / width, bottom=0.45 / height,
                            top=1 - 0.75 / height, hspace=0.45, wspace=0.32)
    stored = min(len(m.singular_values) for _, ms in kinds for m in ms)
    extrapolated = False
    for idx, (kind, ms) in enumerate(kinds):
        row, col = divmod(idx, ncols)
        ax_s = fig.add_subplot(grid[2 * row, col])
        ax_e = fig.add_subplot(grid[2 * row + 1, col])
        if len(ms) > MAX_LINES:  # evenly spaced layers, first and last kept
            keep = np.unique(np.linspace(0, len(ms) - 1, MAX_LINES).round().astype(int))
            ms = [ms[i] for i in keep]
        xmax = 1
        for m in ms:
            colour = cmap(norm(m.layer)) if m.layer is not None else "black"
            s = np.asarray(m.singular_values, dtype=float)
            ax_s.semilogy(np.arange(1, len(s) + 1), s / s[0] if s[0] > 0 else s, color=colour, lw=0.9)
            k, e, k_more, e_more = cumulative_energy(m, result.thresholds)
            ax_e.plot(k, e, color=colour, lw=0.9)
            if k_more.size:
                extrapolated = True
                ax_e.plot(np.r_[k[-1], k_more], np.r_[e[-1], e_more], color=colour, lw=0.9, ls=":", marker="o", ms=2.5)
            xmax = max(xmax, m.energy_rank.get(threshold_key(top), len(s)))
        ax_s.set_title(label(kind) + (f" ({len(ms)} layers)" if len(ms) > 1 else ""), fontsize=9, parse_math=False)
        ax_s.set_xlim(0.5, max(2, min(xmax, max(len(m.singular_values) for m in ms))) + 0.5)
        ax_e.set_xlim(0, max(xmax, 2) * 1.03)
        ax_e.set_ylim(0, 1.02)
        ax_e.axhline(tau, color="grey", lw=0.8, ls="--")
        if col == 0:
            ax_s.set_ylabel("σᵢ / σ₁ (log scale)")
            ax_e.set_ylabel("share of ΔW's energy in the top k")
        ax_s.set_xlabel("index i", fontsize=8)
        ax_e.set_xlabel("rank k", fontsize=8)
        ax_s.tick_params(labelsize=7)
        ax_e.tick_params(labelsize=7)
    if layers:
        from matplotlib.cm import ScalarMappable
        from matplotlib.ticker import MaxNLocator

        cax = fig.add_axes((1 - 0.85 / width, 0.25, 0.12 / width, 0.5))
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, label="layer (black: outside the layer stack)")
        cb.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    note = (f"solid: the stored top {stored} singular values; dotted: through the energy ranks at τ = "
            + ", ".join(f"{t:g}" for t in sorted(result.thresholds)) + " (values between them are not stored)"
            if extrapolated else "every curve drawn from stored singular values") + shown
    fig.suptitle(wrap(f"Spectra of ΔW, every layer: singular values (top) and cumulative energy up to the {tau_percent(top)} rank "
                      f"(bottom; dashed line: {tau_percent(tau)})", int(width * 12)) + "\n" + wrap(note, int(width * 12)),
                 fontsize=10, y=1 - 0.08 / height, va="top")
    return fig


@plain_text
def weight_spectra_figure(result: DiffResult, *, max_panels: int = 3):
    """Top singular values of W_base, W_tuned and ΔW for up to ``max_panels`` matrices of the middle
    layer that have them (``--weight-spectra``; Biderman et al. 2024, Fig. S7 style); None when no
    result has them."""
    from matplotlib.figure import Figure

    with_w = [m for m in result.modules if m.base_singular_values and m.tuned_singular_values and m.layer is not None]
    if not with_w:
        return None
    layers = sorted({m.layer for m in with_w})
    mid = layers[len(layers) // 2]
    chosen = [m for m in with_w if m.layer == mid][:max_panels]
    fig = Figure(figsize=(4.2 * len(chosen), 3.6), layout="constrained")
    for i, m in enumerate(chosen):
        ax = fig.add_subplot(1, len(chosen), i + 1)
        for vals, name in ((m.base_singular_values, "W_base"), (m.tuned_singular_values, "W_tuned"), (m.singular_values, "ΔW")):
            ax.semilogy(range(1, len(vals) + 1), vals, label=name)
        ax.set_title(f"{label(m.module)}, layer {m.layer}", fontsize=9, parse_math=False)
        ax.set_xlabel("index i")
        ax.set_ylabel("σᵢ")
        ax.legend(fontsize=7)
    fig.suptitle(f"Top singular values of the weights and of the update, layer {mid} (middle of the stack)", fontsize=10)
    return fig


__all__ = ["cumulative_energy", "is_adapter", "layer_grid", "random_baselines", "rank_heatmap",
           "relnorm_heatmap", "spectra_figure", "weight_spectra_figure"]
