"""The figures of a ``spectra compare`` result, each saying what it shows.

- captured energy (layers × modules): the share of B's update that A's top subspaces hold, on a
  colour scale fitted to the data, each cell reading ``captured/best`` (the best any subspace of
  that rank can hold), the random-subspace expectation marked on the colour bar;
- intruder dimensions of each side (layers × modules): counts on a 0..max scale (at least 0..1), or
  "no intruders in any module" in the title when every count is 0;
- φ grids (Hu et al. 2021, Fig. 3/4 style) and principal-angle curves for modules chosen by a rule
  stated in the title (:func:`chosen_modules`: per module kind, the layer with that kind's median
  φ), on a colour scale fitted to the grids shown, the random baseline marked.

Modules whose measures are null (an update that is exactly zero, or entirely at the rounding level of its
stored weights: status ``unresolved``) are blank cells.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spectra.compare_records import ComparedModule, CompareResult, random_two_sided
from spectra.plots.base import heatmap, label, legend_label, plain_text, save_figures, wrap
from spectra.roles import role_sort_key

#: At most this many module kinds get a φ panel (the first ones in the usual role order).
MAX_PHI_PANELS = 8


def layer_module_grid(modules: list[ComparedModule], value: Callable[[ComparedModule], float | None],
                      ) -> tuple[np.ndarray, list[int], list[str]]:
    """``(grid (layers, kinds), layers, kinds)`` of ``value`` over the modules in the layer stack
    (NaN where a module is missing or its value is None)."""
    rows = [m for m in modules if m.layer is not None]
    layers = sorted({m.layer for m in rows})
    order: dict[str, tuple] = {}
    for m in rows:
        order.setdefault(m.module, role_sort_key(m.role, m.module))
    kinds = sorted(order, key=lambda k: order[k])
    grid = np.full((len(layers), len(kinds)), np.nan)
    li, ki = {v: i for i, v in enumerate(layers)}, {k: i for i, k in enumerate(kinds)}
    for m in rows:
        v = value(m)
        if v is not None:
            grid[li[m.layer], ki[m.module]] = v
    return grid, layers, kinds


def phi_side(result: CompareResult) -> str:
    """The side the figures show: the run's side, ``right`` when it compared both."""
    side = result.config.get("side", "right")
    return "right" if side == "both" else side


def chosen_modules(result: CompareResult, side: str) -> tuple[list[ComparedModule], str]:
    """The modules the φ and angle figures show, and the rule in words: for each module kind (at
    most :data:`MAX_PHI_PANELS`, in role order), the module whose φ(r_A, r_B) is that kind's median
    (the lower middle one for an even count), so the panels are typical, not extremes."""
    by_kind: dict[str, list[ComparedModule]] = {}
    for m in result.modules:
        if m.phi.get(side) is not None and m.name in result.phi_grids:
            by_kind.setdefault(m.module, []).append(m)
    kinds = sorted(by_kind, key=lambda k: role_sort_key(by_kind[k][0].role, k))[:MAX_PHI_PANELS]
    chosen = []
    for k in kinds:
        ms = sorted(by_kind[k], key=lambda m: (m.phi[side].phi_full, m.name))
        chosen.append(ms[(len(ms) - 1) // 2])
    more = f" (the first {MAX_PHI_PANELS} of {len(by_kind)} kinds)" if len(by_kind) > MAX_PHI_PANELS else ""
    return chosen, f"one module per kind{more}: the layer whose φ(r_A, r_B) is that kind's median"


def captured_heatmap(result: CompareResult):
    """Share of B's update in A's top subspaces, per layer and module kind (None without layers)."""
    mods = [m for m in result.modules if m.layer is not None]
    grid, layers, kinds = layer_module_grid(mods, lambda m: m.captured["b_in_a"].two_sided if m.captured.get("b_in_a") else None)
    if not grid.size or not np.isfinite(grid).any():
        return None
    best, _, _ = layer_module_grid(mods, lambda m: m.captured["b_in_a"].best_rank_r if m.captured.get("b_in_a") else None)
    text = np.full(grid.shape, "", dtype=object)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            text[i, j] = f"{v:.2g}/{best[i, j]:.2g}"
    # E[two-sided] for random subspaces of ranks r_A: r_A² / (out·in) (definitions document), per module kind:
    # one mark for all would put every cell of a narrow kind above "random" and of a wide one below it
    by_kind: dict[str, list[float]] = {}
    for m in mods:
        if m.captured.get("b_in_a"):
            by_kind.setdefault(m.module, []).append(random_two_sided(m.rank_a, m.out, m.in_))
    rand = {k: statistics.median(v) for k, v in by_kind.items()}
    a_lbl, b_lbl = f"A ({result.kinds['a']})", f"B ({result.kinds['b']})"
    title = (f"Share of {b_lbl}'s update energy inside {a_lbl}'s top-r subspaces (two-sided). Cells: captured/best, "
             f"the best any rank-r_A subspace pair can hold; median best {statistics.median(best[np.isfinite(best)]):.2g}; "
             f"under each module, what random subspaces of its ranks hold. Colour scale fitted to the data "
             f"(max {np.nanmax(grid):.2g}).")
    marks = sorted({f"{v:.2g}": v for v in rand.values()}.items(), key=lambda kv: kv[1])
    return heatmap(grid, layers, kinds, title=title, cbar_label="‖U_Aᵀ ΔW_B V_A‖²_F / ‖ΔW_B‖²_F", cell_text=text,
                   vmin=0.0, marks=[(v, f"random {t}") for t, v in marks][:6],
                   col_notes=[f"random {rand[k]:.2g}" if k in rand else "" for k in kinds])


def intruder_heatmap(result: CompareResult, who: str):
    """Intruder counts of side ``who`` (``"a"``/``"b"``) per layer and module kind (None when the run
    had no base or no layered module)."""
    mods = [m for m in result.modules if m.layer is not None and m.intruders is not None]
    grid, layers, kinds = layer_module_grid(mods, lambda m: m.intruders.get(who).count if m.intruders.get(who) else None)
    if not grid.size or not np.isfinite(grid).any():
        return None
    k, eps = result.config.get("intruder_k", 10), result.config.get("epsilon", 0.5)
    top = float(np.nanmax(grid))
    lbl = f"{who.upper()} ({result.kinds[who]})"
    title = (f"Intruder dimensions of {lbl}: of the top-{k} singular vectors of W + ΔW, those whose largest |cos| "
             f"with every base singular vector is below ε = {eps}")
    if top == 0:
        title += ". No intruders in any module."
    return heatmap(grid, layers, kinds, title=title, cbar_label=f"intruders (of {k})", fmt=lambda v: f"{v:.0f}",
                   vmin=0.0, vmax=max(1.0, top), cmap="Reds")


@plain_text
def phi_grids_figure(result: CompareResult):
    """φ(i, j) grids of :func:`chosen_modules` (None when no module has one)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    side = phi_side(result)
    chosen, rule = chosen_modules(result, side)
    if not chosen:
        return None
    grids = [np.asarray(result.phi_grids[m.name][side], dtype=float) for m in chosen]
    hi = max(float(np.nanmax(g)) for g in grids)  # null (NaN): a cut inside tied values, drawn grey
    rands = sorted({m.phi[side].random for m in chosen})
    vmax = max(hi, rands[-1], 1e-6)
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    suptitle = wrap(f"Normalised subspace similarity (Hu et al. 2021, Eq. 4); {rule}. Colour scale fitted to the grids "
                    f"shown (0 to {vmax:.2g}).", 40 * cols)
    # a fixed layout in inches (constrained layout measured every text twice: ~2× the drawing time):
    # panels of 3.1 × 2.2 in, room for two title lines above and the axis labels and ticks around each,
    # the figure title on top and the colour bar with its label on the right
    panel_w, panel_h, left, gap_w, right = 3.1, 2.2, 0.75, 1.1, 1.3
    top = 0.35 + 0.22 * (suptitle.count("\n") + 1) + 0.55
    gap_h, bottom = 1.15, 0.6
    W = left + cols * panel_w + (cols - 1) * gap_w + right
    H = top + rows * panel_h + (rows - 1) * gap_h + bottom
    fig = Figure(figsize=(W, H))
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    im = None
    for idx, (m, g) in enumerate(zip(chosen, grids)):
        r, c = divmod(idx, cols)
        x0, y1 = left + c * (panel_w + gap_w), H - top - r * (panel_h + gap_h)
        ax = fig.add_axes(((x0) / W, (y1 - panel_h) / H, panel_w / W, panel_h / H))
        im = ax.imshow(g, aspect="auto", origin="lower", vmin=0.0, vmax=vmax, cmap=cmap, interpolation="nearest",
                       extent=(0.5, g.shape[1] + 0.5, 0.5, g.shape[0] + 0.5))
        ph = m.phi[side]
        ax.set_title(f"{label(m.module)} · layer {m.layer}\nφ = {ph.phi_full:.3f}, random {ph.random:.3f}", fontsize=9, parse_math=False)
        ax.set_xlabel(f"j: top-j of B (r_B = {m.rank_b})")
        ax.set_ylabel(f"i: top-i of A (r_A = {m.rank_a})")
    bar_x = left + cols * panel_w + (cols - 1) * gap_w + 0.25
    cax = fig.add_axes((bar_x / W, bottom / H, 0.18 / W, (H - top - bottom) / H))
    cb = fig.colorbar(im, cax=cax)
    for rand in rands:
        cb.ax.axhline(rand, color="red", lw=1.5)
    cb.set_label(wrap(f"φ(A, B, i, j), {side} singular vectors; red: random φ(r_A, r_B) "
                      f"({', '.join(f'{r:.2g}' for r in rands)})", max(30, int((H - top - bottom) * 10))), fontsize=8)
    fig.suptitle(suptitle, fontsize=10, y=1 - 0.3 / H, va="top")
    return fig


@plain_text
def angles_figure(result: CompareResult):
    """Principal angles of :func:`chosen_modules`, with the angle random subspaces would give."""
    from matplotlib.figure import Figure

    side = phi_side(result)
    chosen, rule = chosen_modules(result, side)
    chosen = [m for m in chosen if m.angles.get(side) is not None]
    if not chosen:
        return None
    fig = Figure(figsize=(7.5, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for m in chosen:
        cos = np.clip(m.angles[side].cosines, 0.0, 1.0)
        ax.plot(range(1, len(cos) + 1), np.degrees(np.arccos(cos)), marker="o", ms=3,
                label=legend_label(f"{m.module} L{m.layer}"))
    # random subspaces: the mean cos² of the angles is φ's baseline max(r_A, r_B)/d (one line per value)
    for rand, d in sorted({(m.phi[side].random, m.phi[side].d) for m in chosen}):
        ax.axhline(np.degrees(np.arccos(np.sqrt(rand))), color="grey", ls="--", lw=1,
                   label=f"random subspaces, d = {d} (mean cos² = {rand:.2g})")
    ax.set_xlabel("principal angle index l (ascending)")
    ax.set_ylabel("θ_l (degrees)")
    ax.set_ylim(0, 90)
    ax.set_title(wrap(f"Principal angles between A's and B's top subspaces ({side}); {rule}", 90), fontsize=9, parse_math=False)
    ax.legend(fontsize=7)
    return fig


def compare_builders(result: CompareResult) -> dict[str, Callable[[], object]]:
    """name -> a callable drawing that figure of a compare result (None when it has nothing to show)."""
    # in an order that shares the drawing evenly between the two processes of save_figures (this one
    # draws the 1st, 3rd and 5th; measured on a 30-layer result: φ grids ~0.5 s, captured ~0.75 s,
    # each intruder map ~0.4 s, angles ~0.2 s)
    builders: dict[str, Callable[[], object]] = {
        "phi_grids": lambda: phi_grids_figure(result), "captured_heatmap": lambda: captured_heatmap(result)}
    if any(m.intruders is not None for m in result.modules):
        builders["intruders_a"] = lambda: intruder_heatmap(result, "a")
        builders["intruders_b"] = lambda: intruder_heatmap(result, "b")
    builders["principal_angles"] = lambda: angles_figure(result)
    return builders


def compare_figures(result: CompareResult) -> dict:
    """Every figure of a compare result, name -> Figure (only those with something to show)."""
    figs = {name: build() for name, build in compare_builders(result).items()}
    return {k: v for k, v in figs.items() if v is not None}


def compare_plots(result: CompareResult, out_dir: str | Path) -> dict[str, Path]:
    """Write the figures of :func:`compare_figures` as PNGs into ``out_dir`` (two at a time:
    :func:`spectra.plots.base.save_figures`); returns name -> path."""
    return save_figures(compare_builders(result), out_dir, dpi=110)


__all__ = ["MAX_PHI_PANELS", "angles_figure", "captured_heatmap", "chosen_modules", "compare_builders", "compare_figures",
           "compare_plots", "intruder_heatmap", "layer_module_grid", "phi_grids_figure", "phi_side"]
