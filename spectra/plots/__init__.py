"""Figures (the only package that imports matplotlib): :mod:`spectra.plots.base` holds what every
figure shares (heatmap, labels, writing PNG/SVG), :mod:`spectra.plots.diff` the figures of a diff
(rank-needed and relative-norm heatmaps, spectra of every layer), :mod:`spectra.plots.compare` the
figures of a compare; this module re-exports them and holds the training figure.
"""

from __future__ import annotations

import os
import sys
import warnings


def _import_matplotlib_despite_mplbackend() -> None:
    """Import matplotlib when ``MPLBACKEND`` is set to what it refuses (``'Agg '``, a typo): its import raised
    "Key backend: … is not a valid value" and every figure and report failed after the numbers were computed.
    spectra draws on Agg canvases and needs no backend: the variable is dropped, with a warning."""
    try:
        import matplotlib  # noqa: F401
    except ValueError as exc:
        if "backend" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            del sys.modules[name]  # the failed import's half-made modules
        bad = os.environ.pop("MPLBACKEND")
        warnings.warn(f"MPLBACKEND={bad!r} is not a matplotlib backend: ignored (spectra draws with Agg)", stacklevel=2)
        import matplotlib  # noqa: F401


if os.environ.get("MPLBACKEND") is not None and "matplotlib" not in sys.modules:  # rare: checked here, once
    _import_matplotlib_despite_mplbackend()

from spectra.plots.base import heatmap, legend_label, plain_text, save_figure, svg_img
from spectra.plots.compare import compare_figures, compare_plots
from spectra.plots.diff import (
    rank_heatmap,
    relnorm_heatmap,
    spectra_figure,
    weight_spectra_figure,
)


@plain_text
def learning_forgetting_plot(logs: dict[str, list[dict]], path: str | os.PathLike[str] | None = None):
    """Target loss (learning) against source loss (forgetting) along each run, start to end."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for name, recs in logs.items():
        # points with both losses (a diverged run logs a null target loss beside a finite source one)
        pts = [(r["source_loss"], r["target_loss"]) for r in recs if r.get("source_loss") is not None and r.get("target_loss") is not None]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=legend_label(name))
        ax.annotate("end", (xs[-1], ys[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("source-domain loss (forgetting →), nats/token")
    ax.set_ylabel("held-out target-domain loss (← learning), nats/token")
    ax.set_title("Learning vs forgetting (Biderman et al. 2024): each run from its start", fontsize=10)
    ax.legend(fontsize=8)
    if path is None:
        return fig
    return save_figure(fig, path, dpi=120)


__all__ = ["compare_figures", "compare_plots", "heatmap", "learning_forgetting_plot", "rank_heatmap", "relnorm_heatmap",
           "save_figure", "spectra_figure", "svg_img", "weight_spectra_figure"]
