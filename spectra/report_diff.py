"""The report's sections for one ``spectra diff`` result (schema ``spectra.diff/1``): its findings
and warnings (for the report's first screen), the heatmaps, the spectra of every layer, the
per-module medians ``spectra diff`` prints, the table of every matrix with a legend of its columns,
and what was skipped and why. Definitions: docs/definitions.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spectra.display import matrices, range_text, tau_percent
from spectra.findings import Finding, count_text, diff_findings, matrix_legend, skipped_reasons, summary_legend
from spectra.plots import diff as diff_plots
from spectra.plots.base import svg_img
from spectra.report_html import esc, legend, note, table
from spectra.results import CAVEAT_PREFIX, SCHEMA, DiffResult


def load(path: Path, doc: dict) -> DiffResult:
    """The validated result (:meth:`DiffResult.from_dict`; ResultsFormatError names ``path``)."""
    return DiffResult.from_dict(doc, source=path)


def title(path: Path, doc: dict) -> str:
    """How the report names this input: ``diff: TUNED vs BASE`` (last path components; the overview
    has the inputs in full)."""
    res = load(path, doc)

    def short(x: str) -> str:
        return Path(x).name or x

    return f"diff: {short(res.tuned)} vs {short(res.base)}" if res.base else f"diff: {short(res.tuned)} (adapter alone)"


def findings(path: Path, doc: dict) -> list[Finding]:
    """:func:`spectra.findings.diff_findings` of the result, with ``--esd`` whether fine-tuning moved α
    (:func:`spectra.findings.alpha_findings`), plus the run's other warnings (tensors skipped for NaN/Inf,
    non-finite values) as warning findings."""
    res = load(path, doc)
    out = diff_findings(res)  # with `diff --esd`, whether fine-tuning moved α too
    seen = {f.text for f in out}
    # in the run's order, ahead of the findings (one list: inserting each in front reversed them, in quadratic time)
    # the caveat and zero-update findings say those warnings already
    warned = [Finding("warning", w, warning=True) for w in res.warnings
              if not (w.startswith(CAVEAT_PREFIX) or w.startswith("every analysed ΔW is exactly zero") or w in seen)]
    return warned + out


def section_html(path: Path, doc: dict) -> str:
    """Every section of one diff result, as HTML (names escaped, figures inline SVG)."""
    res = load(path, doc)
    tau = res.headline_threshold
    key = str(float(tau))
    lora = any(m.lora_r is not None for m in res.modules)
    out = [f"<h2>ΔW spectra: {esc(res.tuned)}</h2>",
           f"<p>base: {esc(res.base or '(none: adapter alone)')} · results: {esc(path)} · {matrices(len(res.modules))} in "
           f"{res.elapsed_s:.1f} s on {esc(res.device or '?')}</p>"]
    if any(m.layer is not None for m in res.modules):
        out.append(svg_img(diff_plots.rank_heatmap(res, None, threshold=tau), alt="rank needed per layer and module"))
        if diff_plots.is_adapter(res):
            out.append(note(f"Each cell is the number of directions the LoRA update needs for {tau_percent(tau)} of its energy, out "
                            "of the adapter's rank r (\"6/8\": 6 of 8). Cells well below 1 mean the adapter did not use "
                            "all of its rank; 1 means every rank it has is needed (Biderman et al. 2024, Fig. 6)."))
        else:
            out.append(note(f"Each cell is the number of singular directions needed to hold {tau_percent(tau)} of the update's "
                            "energy, as a fraction of the most there could be (p = min(out, in)). Under each module is the "
                            "same number for a random Gaussian matrix of that shape (red marks on the colour bar when they "
                            "fall within its range): a dense, unstructured update. Cells well below it mean the fine-tune "
                            "changed the matrix along few directions; cells near it mean the update is spread like noise "
                            "(Biderman et al. 2024, Fig. 6)."))
        if any(m.rel_norm is not None for m in res.modules):
            out.append(svg_img(diff_plots.relnorm_heatmap(res, None), alt="relative size of the update"))
            out.append(note("How large each update is next to the weight it changes (‖ΔW‖_F / ‖W_base‖_F): 0.01 means the "
                            "weights moved by 1% of their norm. The colour scale is logarithmic when the values span more "
                            "than a factor of 10."))
    fig = diff_plots.spectra_figure(res)
    if fig is not None:
        out.append("<h3>Spectra of ΔW, every layer</h3>" + svg_img(fig, alt="spectra of every layer"))
        out.append(note(f"Top row: the singular values of each update divided by its largest, one line per layer (colour: "
                        f"depth). Bottom row: the share of the update's energy held by its top k directions; where a curve "
                        f"crosses the dashed line is the rank needed for {tau_percent(tau)}. Solid lines come from the singular values "
                        "the results keep (--top-k); dotted segments join the energy ranks at each threshold ("
                        + ("points of the curve, estimates where a matrix was sketched (approximate mode)" if any(
                            m.method.startswith("approx") for m in res.modules) else "exact points of the curve")
                        + ", with values in between not stored)."))
    figw = diff_plots.weight_spectra_figure(res)
    if figw is not None:
        out.append("<h3>Spectra of W_base, W_tuned and ΔW (Biderman et al. 2024, Fig. S7 style)</h3>" + svg_img(figw))
        out.append(note("The weights' spectra barely move while ΔW has a spectrum of its own: a fine-tune is a small "
                        "update whose shape (how many directions it needs) is what the rank-needed numbers measure."))
    out.append("<h3>Per module kind (the table spectra diff prints)</h3>")
    # sketched ranks (approximate mode) marked as the terminal marks them: "≈" for a kind, [lo, hi] for a matrix
    approx = {m.module for m in res.modules if m.method.startswith("approx")}

    def est(x: Any, sketched: bool) -> Any:
        return f"≈{x:.4g}" if sketched and isinstance(x, (int, float)) else x

    def rank(m: Any) -> Any:
        lo, hi = (m.energy_rank_bounds or {}).get(key) or (None, None)
        return m.energy_rank.get(key) if lo is None or lo == hi else f"≈{m.energy_rank.get(key)} [{lo}, {hi}]"
    rows = [[r["module"], count_text(r), r["p"], *((range_text(r["lora_r_range"]),) if lora else ()),
             est(r["energy_rank"], r["module"] in approx), est(r["energy_rank_frac"], r["module"] in approx),
             r["random_frac"], r["rel_norm"]] for r in res.summary_records(tau)]
    out.append(table(["module", "n", "p", *(("LoRA r",) if lora else ()), f"rank[{key}]", "/ p", "random / p", "‖ΔW‖/‖W‖"],
                     rows, sortable=True))
    out.append(legend(summary_legend(tau, lora=lora), title="Columns of this table"))
    rows = [[m.name, m.layer, m.expert, m.module, f"{m.shape[0]}×{m.shape[1]}", rank(m), m.energy_rank_frac.get(key),
             m.random_frac(key), m.rel_norm, m.fro_norm, m.spectral_norm, m.stable_rank, m.effective_rank, m.lora_r, m.note]
            for m in res.modules]
    out.append("<h3>Every matrix (click a column to sort)</h3>")
    out.append(table(["name", "layer", "expert", "module", "shape", f"energy rank [{key}]", "/ p", "random / p", "‖ΔW‖/‖W‖",
                      "‖ΔW‖_F", "σ₁", "stable rank", "effective rank", "LoRA r", "note"], rows, sortable=True))
    out.append(legend(matrix_legend(tau), title="Columns of this table"))
    if res.skipped:
        reasons = "; ".join(f"{n} × {r}" for r, n in skipped_reasons(res))
        out.append(f"<h3>Skipped ({len(res.skipped)})</h3><p>Tensors present but not analysed: {esc(reasons, 2000)}.</p>")
        out.append(table(["name", "reason"], [[s["name"], s["reason"]] for s in res.skipped]))
    unmatched = res.unmatched or {}
    if unmatched.get("base_only") or unmatched.get("tuned_only"):
        out.append(f"<h3>Unmatched</h3><p>{len(unmatched.get('base_only', []))} tensors only in the base and "
                   f"{len(unmatched.get('tuned_only', []))} only in the tuned checkpoint (listed in results.json, "
                   "\"unmatched\").</p>")
    return "\n".join(out)


__all__ = ["SCHEMA", "findings", "load", "section_html", "title"]
