"""Figures of ``spectra esd`` and ``spectra diff --esd``: the α heatmap (layers × modules), log-log ESDs with
the fitted power-law tail, α of W_base against W_tuned and the heatmap of their difference Δα. Inputs are the flat records of ``esd.json``
(or the ``esd`` entries of ``results.json``), so the report draws them from files. Functions return a
Figure, or write a PNG and return its path when ``path`` is given."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from spectra.esd import OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA, alpha_text
from spectra.plots.base import heatmap, label, legend_label, plain_text, save_figure
from spectra.roles import role_sort_key


def alpha_grid(records: list[dict[str, Any]], key: str = "alpha") -> tuple[np.ndarray, list[int], list[str]]:
    """``(grid, layers, modules)``: the median of ``record[key]`` over experts for each (layer, module);
    NaN where no matrix or no fit. Modules ordered by role (q, k, v, o, gate, up, down…)."""
    rows = [r for r in records if r.get("layer") is not None]
    layers = sorted({r["layer"] for r in rows})
    order: dict[str, tuple] = {}
    for r in rows:
        order.setdefault(r["module"], role_sort_key(r.get("role"), r["module"]))
    modules = sorted(order, key=lambda k: order[k])
    cells: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            cells.setdefault((r["layer"], r["module"]), []).append(float(r[key]))
    grid = np.full((len(layers), len(modules)), np.nan)
    li, mi = {v: i for i, v in enumerate(layers)}, {v: i for i, v in enumerate(modules)}
    for (layer, module), vals in cells.items():
        grid[li[layer], mi[module]] = float(np.median(vals))
    return grid, layers, modules


def alpha_heatmap(records: list[dict[str, Any]], path: str | os.PathLike[str] | None = None, *, key: str = "alpha",
                  title: str | None = None):
    """Layers × modules heatmap of the power-law exponent α (median over experts).

    The colour scale is fixed to [1, 8], red (α < 2, "over-trained") through yellow to blue (α > 6,
    "under-trained"), with the bands of Martin & Mahoney's heavy-tailed self-regularisation theory
    marked on the colour bar, so that figures of different models compare; one runaway α (a random-like
    matrix can give 20 or more) does not wash out the others. ``key`` picks another numeric field
    (``alpha_weighted``…), on a scale fitted to the data.
    """
    grid, layers, modules = alpha_grid(records, key)
    if key == "alpha":
        return _written(heatmap(
            grid, layers, modules, cmap="RdYlBu", vmin=1.0, vmax=8.0, fmt=alpha_text,
            title=title or "Power-law exponent α of each matrix's eigenvalue spectrum (WeightWatcher's fit; colours clipped "
                           f"to [1, 8]): α < {OVER_TRAINED_ALPHA:g} over-trained, α > {UNDER_TRAINED_ALPHA:g} under-trained",
            cbar_label="α (median over experts)",
            marks=[(OVER_TRAINED_ALPHA, "α = 2"), (UNDER_TRAINED_ALPHA, "α = 6")]), path)
    return _written(heatmap(grid, layers, modules, title=title or key, cbar_label=key, fmt=lambda v: f"{v:.3g}"), path)


def _written(fig, path: str | os.PathLike[str] | None):
    return save_figure(fig, path, dpi=120) if path is not None else fig


def _loglog_panel(ax, rec: dict[str, Any]) -> None:
    """One log-log ESD: density of λ on logarithmic bins, the fitted tail and the MP bulk edge."""
    from matplotlib.ticker import NullFormatter

    lam = np.asarray(rec["eigenvalues"], dtype=np.float64)
    lam = lam[np.isfinite(lam) & (lam > 0)]
    # below p·eps·λ_max an eigenvalue is the solver's rounding (subnormals of a constant matrix's rank-1 Gram): bins
    # down there are ~1e-323 wide, their density overflows and the log axis fails
    lam = lam[lam > lam.max(initial=0.0) * max(lam.size, 1) * np.finfo(np.float64).eps]
    if lam.size == 0:
        ax.set_title(f"{label(rec['module'])}: all eigenvalues are 0", fontsize=8, parse_math=False)
        return
    lo, hi = lam.min(), lam.max()
    edges = np.logspace(np.log10(lo), np.log10(hi), 60) if hi > lo else np.array([lo * 0.9, hi * 1.1])
    counts, edges = np.histogram(lam, bins=edges)
    density = counts / (lam.size * np.diff(edges))
    ax.stairs(np.where(density > 0, density, np.nan), edges, color="tab:blue", label="ESD")
    alpha, xmin = rec.get("alpha"), rec.get("xmin")
    if alpha is not None and xmin is not None:
        x = np.logspace(np.log10(xmin), np.log10(hi), 50)
        n_tail = rec.get("num_pl_spikes") or 0
        # p(λ) = (α−1)/xmin · (λ/xmin)^(−α) on the tail, weighted by the tail's share of the plotted eigenvalues
        ax.plot(x, (n_tail / lam.size) * (alpha - 1) / xmin * (x / xmin) ** (-alpha), "r--", lw=1.5,
                label=f"fit α = {alpha_text(alpha)}")
        ax.axvline(xmin, color="red", lw=0.8, ls=":", label="xmin")
    if rec.get("mp_bulk_max"):
        ax.axvline(rec["mp_bulk_max"], color="grey", lw=0.8, ls="-.", label="MP bulk edge")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
    ax.set_xlabel("eigenvalue λ = σ²")
    ax.set_ylabel("density")
    where = f"layer {rec['layer']}" if rec.get("layer") is not None else label(rec["name"])
    d = f", D = {rec['D']:.3f}" if rec.get("D") is not None else ""
    ax.set_title(f"{label(rec['module'])} · {where}{d}", fontsize=8, parse_math=False)
    ax.legend(fontsize=6)


@plain_text
def esd_loglog(records: list[dict[str, Any]], path: str | os.PathLike[str] | None = None, *, max_panels: int = 12):
    """Log-log ESDs of the records that carry ``eigenvalues`` (at most ``max_panels``), each with its
    fitted tail ``p(λ) ∝ λ^(−α)`` from xmin and the Marchenko–Pastur bulk edge (WeightWatcher's
    "Log-Log ESD" plot)."""
    from matplotlib.figure import Figure

    kept = [r for r in records if r.get("eigenvalues")]
    chosen = kept[:max_panels]
    cols = min(4, max(1, len(chosen)))
    rows = max(1, -(-len(chosen) // cols))
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows), layout="constrained")
    for k, rec in enumerate(chosen):
        _loglog_panel(fig.add_subplot(rows, cols, k + 1), rec)
    more = f" (the first {len(chosen)} of {len(kept)} matrices with kept eigenvalues)" if len(kept) > len(chosen) else ""
    fig.suptitle(f"Empirical spectral densities (log-log) with the fitted power-law tail{more}", fontsize=10)
    return _written(fig, path)


@plain_text
def alpha_base_tuned(points: list[dict[str, Any]], path: str | os.PathLike[str] | None = None):
    """α of W_tuned against α of W_base, one point per matrix, coloured by module, with the diagonal
    (no change) and the [2, 6] band. ``points``: dicts with ``module``, ``alpha_base``, ``alpha_tuned``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.8, 5.0), layout="constrained")
    ax = fig.add_subplot()
    pts = [p for p in points if p.get("alpha_base") is not None and p.get("alpha_tuned") is not None]
    modules = sorted({p["module"] for p in pts})
    for m in modules:
        xs = [p["alpha_base"] for p in pts if p["module"] == m]
        ys = [p["alpha_tuned"] for p in pts if p["module"] == m]
        ax.scatter(xs, ys, s=14, label=legend_label(m))
    if pts:
        lo = min(min(p["alpha_base"], p["alpha_tuned"]) for p in pts)
        hi = max(max(p["alpha_base"], p["alpha_tuned"]) for p in pts)
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8)
    ax.axhspan(OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA, color="green", alpha=0.06)
    ax.axvspan(OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA, color="green", alpha=0.06)
    ax.set_xlabel("α of W_base")
    ax.set_ylabel("α of W_tuned")
    ax.set_title("Did fine-tuning move α? (diagonal: no change; band: 2 ≤ α ≤ 6)", fontsize=10)
    if modules:
        ax.legend(fontsize=7)
    return _written(fig, path)


def alpha_change_heatmap(points: list[dict[str, Any]], path: str | os.PathLike[str] | None = None):
    """Layers × modules heatmap of ``Δα = α(W_tuned) − α(W_base)`` (median over experts), on a diverging
    scale centred at 0: blue where fine-tuning lowered α (a heavier tail), red where it raised it.
    ``points``: dicts with ``layer``, ``module``, ``role`` and ``change`` (None where a fit failed)."""
    grid, layers, modules = alpha_grid(points, key="change")
    finite = grid[np.isfinite(grid)]
    span = float(np.max(np.abs(finite))) if finite.size and np.max(np.abs(finite)) > 0 else 1.0
    return _written(heatmap(
        grid, layers, modules, cmap="RdBu_r", vmin=-span, vmax=span, fmt=lambda v: f"{v:+.2f}",
        title="Did fine-tuning move α? Δα = α(W_tuned) − α(W_base) per layer and module (blue: lower α, a heavier tail)",
        cbar_label="Δα (median over experts)"), path)
