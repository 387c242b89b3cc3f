"""The report's ESD sections: from an ``esd.json`` (schema ``spectra.esd/1``), the α heatmap, log-log ESDs,
per-module medians and the table of every matrix; from a ``results.json`` of ``spectra diff --esd``, α of
W_base against W_tuned per module (did fine-tuning move it?) and α of ΔW. Also the findings of an
``esd.json`` for the report's first screen. Definitions: docs/definitions.md; README.md, "spectra esd".

Every name from a checkpoint or a path goes through :func:`spectra.report_html.esc`; figures are
inline SVG.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from spectra.display import matrices
from spectra.esd import OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA, alpha_text
from spectra.findings import MOVED_Z, Finding, esd_points
from spectra.plots import esd as esd_plots
from spectra.plots.base import svg_img
from spectra.report_html import esc, legend, note, table
from spectra.results import SCHEMA as DIFF_SCHEMA
from spectra.roles import role_sort_key

SCHEMA = "spectra.esd/1"
#: ``|Δα| / sqrt(σ_base² + σ_tuned²)`` above this reads as "fine-tuning moved α".

_BANDS = (f"Martin &amp; Mahoney's heavy-tailed self-regularisation theory reads the exponent α of the power-law tail "
          f"of a weight matrix's eigenvalue spectrum as how much correlation training has put into it: well-trained "
          f"layers have {OVER_TRAINED_ALPHA:g} ≤ α ≤ {UNDER_TRAINED_ALPHA:g}; α &gt; {UNDER_TRAINED_ALPHA:g} is a spectrum "
          f"close to random (under-trained), α &lt; {OVER_TRAINED_ALPHA:g} a very heavy tail (over-trained). σ_α is the "
          "fit's standard error and D its Kolmogorov–Smirnov distance: a large D (above ~0.1 for hundreds of "
          "eigenvalues) means the tail is not a clean power law, and α should be read with care.")

MATRIX_LEGEND = [
    ("α", "exponent of the power law p(λ) ∝ λ^(−α) fitted to the eigenvalues λ = σ² ≥ xmin (WeightWatcher's fit)"),
    ("σ_α", "standard error of α, (α − 1)/√n with n the eigenvalues in the tail"),
    ("D", "Kolmogorov–Smirnov distance between the tail and the fitted law (smaller: a cleaner power law)"),
    ("xmin", "where the tail starts: the candidate eigenvalue with the smallest D (or near the peak, or the median)"),
    ("tail size", "eigenvalues ≥ xmin (WeightWatcher's num_pl_spikes)"),
    ("α-hat", "α · log₁₀ λ_max, WeightWatcher's alpha_weighted"),
    ("log₁₀ Σλ^α", "WeightWatcher's log_alpha_norm"),
    ("log₁₀ λ_max", "log of the largest eigenvalue σ₁² (WeightWatcher's log_spectral_norm)"),
    ("log₁₀ ‖W‖²_F", "log of the sum of eigenvalues (WeightWatcher's log_norm)"),
    ("stable rank", "Σλ / λ_max"),
    ("entropy", "WeightWatcher's spectral entropy: −Σ p ln p / ln(rank), p = λ/Σλ; 1 for a flat spectrum"),
    ("MP σ², MP spikes", "Marchenko–Pastur fit of the bulk (element variance) and the eigenvalues beyond its edge"),
]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _verdict(alpha: float) -> str:
    if alpha > UNDER_TRAINED_ALPHA:
        return f"above {UNDER_TRAINED_ALPHA:g}: spectra close to random (under-trained, in HT-SR's reading)"
    if alpha < OVER_TRAINED_ALPHA:
        return f"below {OVER_TRAINED_ALPHA:g}: very heavy tails (over-trained, in HT-SR's reading)"
    return f"within [{OVER_TRAINED_ALPHA:g}, {UNDER_TRAINED_ALPHA:g}], the range of well-trained layers"


def _alpha(a: float | None) -> str | None:
    """α as :func:`spectra.esd.alpha_text` shows it (on its flag's side of 2 and 6); None stays None."""
    return None if a is None else alpha_text(a)


def title(path: Path, doc: dict) -> str:
    """How the report names an ``esd.json``: ``esd: MODEL``."""
    return f"esd: {doc.get('model')}"


def findings(path: Path, doc: dict) -> list[Finding]:
    """What an ``esd.json`` says, in words: the median α and its reading, the module kinds with the
    lowest and highest α, how many matrices are flagged; failed fits as a warning."""
    recs = doc.get("matrices", [])
    fitted = [r for r in recs if r.get("alpha") is not None]
    out: list[Finding] = []
    if fitted:
        alphas = [r["alpha"] for r in fitted]
        med = statistics.median(alphas)
        out.append(Finding("alpha", f"Median α over {matrices(len(fitted))} is {alpha_text(med)} (range {alpha_text(min(alphas))}–"
                                    f"{alpha_text(max(alphas))}): {_verdict(med)}.",
                           numbers={"median": med, "min": min(alphas), "max": max(alphas), "n": len(fitted)}))
        by_module: dict[str, list[float]] = {}
        for r in fitted:
            by_module.setdefault(r["module"], []).append(r["alpha"])
        if len(by_module) > 1:
            meds = sorted((statistics.median(v), k) for k, v in by_module.items())
            out.append(Finding("modules", f"Lowest median α: {meds[0][1]} ({alpha_text(meds[0][0])}); highest: {meds[-1][1]} "
                                          f"({alpha_text(meds[-1][0])}).", numbers={k: m for m, k in meds}))
        over = sum(r.get("warning") == "over-trained" for r in recs)
        under = sum(r.get("warning") == "under-trained" for r in recs)
        out.append(Finding("flags", f"{matrices(over)} {'has' if over == 1 else 'have'} α < {OVER_TRAINED_ALPHA:g} (over-trained) "
                                    f"and {under} {'has' if under == 1 else 'have'} "
                                    f"α > {UNDER_TRAINED_ALPHA:g} (under-trained), of {len(recs)}.",
                           numbers={"over_trained": over, "under_trained": under, "matrices": len(recs)}))
    failed = len(recs) - len(fitted)
    if failed:
        out.append(Finding("failed", f"{failed} of {len(recs)} power-law fits failed (too few eigenvalues above the "
                                     "threshold, or a degenerate tail); their α is missing.", warning=True,
                           numbers={"failed": failed}))
    if not doc.get("complete", True):
        out.append(Finding("incomplete", "The run did not finish: finish it with `spectra esd … --resume`.", warning=True))
    return out


def section_html(path: Path, doc: dict[str, Any]) -> str:
    """The report sections of one results document: an ``esd.json`` (``spectra.esd/1``) or a
    ``results.json`` (``spectra.diff/1``) whose modules carry ``esd`` entries (``spectra diff --esd``);
    ``""`` for a diff without them.

    Raises:
        ValueError: ``doc`` has another schema.
    """
    schema = doc.get("schema")
    if schema == SCHEMA:
        return _esd_section(path, doc)
    if schema == DIFF_SCHEMA:
        return _diff_section(path, doc)
    raise ValueError(f"schema must be {SCHEMA!r} or {DIFF_SCHEMA!r}. Got {schema!r} instead.")


def _esd_section(path: Path, doc: dict[str, Any]) -> str:
    recs = doc.get("matrices", [])
    fitted = [r for r in recs if r.get("alpha") is not None]
    cfg = doc.get("config", {})
    compat = " · WeightWatcher-compatible rows" if cfg.get("ww_compatible") else ""
    out = [f"<h2>Heavy-tailed spectra (ESD): {esc(doc.get('model'))}</h2>",
           (f"<p>results: {esc(path)} · xmin: {esc(cfg.get('xmin', 'fit'))}{compat} · {matrices(len(recs))} in "
            f"{float(doc.get('elapsed_s') or 0.0):.1f} s on {esc(doc.get('device') or '?')}</p>")]
    if any(r.get("layer") is not None for r in fitted):
        out.append(svg_img(esd_plots.alpha_heatmap(recs), alt="alpha per layer and module"))
        out.append(note(_BANDS + " Each cell is one matrix (the median over the experts of an MoE layer)."))
    if any(r.get("eigenvalues") for r in recs):
        out.append(svg_img(esd_plots.esd_loglog(recs), alt="log-log eigenvalue densities with the fitted tails"))
        out.append(note("Each panel is one matrix's eigenvalue density on log-log axes, where a power law is a straight "
                        "line; the dashed red line is the fitted tail from xmin (dotted), of slope −α. The dash-dotted "
                        "line is the edge of the Marchenko–Pastur bulk a random matrix of the same shape and scale would "
                        "fill: eigenvalues beyond it are structure that training added."))
    groups: dict[str, list[dict]] = {}
    for r in recs:
        groups.setdefault(r["module"], []).append(r)
    rows = []
    for module in sorted(groups, key=lambda m: role_sort_key(groups[m][0].get("role"), m)):
        rs = groups[module]
        al = [r["alpha"] for r in rs if r.get("alpha") is not None]
        rows.append([module, len(rs), _alpha(_median(al)), _alpha(min(al) if al else None), _alpha(max(al) if al else None),
                     _median([r["D"] for r in rs if r.get("D") is not None]),
                     _median([r["alpha_weighted"] for r in rs if r.get("alpha_weighted") is not None]),
                     sum(r.get("warning") == "over-trained" for r in rs), sum(r.get("warning") == "under-trained" for r in rs),
                     _median([r["mp_num_spikes"] for r in rs if r.get("mp_num_spikes") is not None])])
    out.append("<h3>Per module</h3>")
    out.append(table(["module", "matrices", "median α", "min α", "max α", "median D", "median α-hat", "α < 2", "α > 6",
                      "median MP spikes"], rows))
    out.append("<h3>Every matrix (click a column to sort)</h3>")
    out.append(table(["name", "layer", "module", "shape", "α", "σ_α", "D", "xmin", "tail size", "α-hat", "log₁₀ Σλ^α",
                      "log₁₀ λ_max", "log₁₀ ‖W‖²_F", "stable rank", "entropy", "MP σ²", "MP spikes", "warning", "note"],
                     [[r["name"], r.get("layer"), r["module"], "×".join(map(str, r["shape"])), _alpha(r.get("alpha")), r.get("sigma"),
                       r.get("D"), r.get("xmin"), r.get("num_pl_spikes"), r.get("alpha_weighted"), r.get("log_alpha_norm"),
                       r.get("log_spectral_norm"), r.get("log_norm"), r.get("stable_rank"), r.get("entropy"), r.get("mp_sigma2"),
                       r.get("mp_num_spikes"), r.get("warning") or r.get("fit_note"), r.get("note")] for r in recs],
                     sortable=True))
    out.append(legend(MATRIX_LEGEND, title="Columns of this table"))
    if doc.get("skipped"):
        out.append("<h3>Skipped</h3>" + table(["name", "reason"], [[s["name"], s["reason"]] for s in doc["skipped"]]))
    return "\n".join(out)


def diff_points(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`spectra.findings.esd_points` of a results.json document."""
    return esd_points(doc.get("modules", []))


def _diff_section(path: Path, doc: dict[str, Any]) -> str:
    pts = diff_points(doc)
    if not pts:
        return ""
    out = [f"<h2>Did fine-tuning move α? {esc(doc.get('tuned'))}</h2>",
           f"<p>base: {esc(doc.get('base') or '(none)')} · results: {esc(path)}</p>"]
    both = [p for p in pts if p["change"] is not None]
    if both:
        out.append(svg_img(esd_plots.alpha_base_tuned(both), alt="alpha of the tuned weights against the base weights"))
        out.append(note(_BANDS + f" A point on the diagonal is a matrix whose α fine-tuning left unchanged; a change beyond "
                        f"{MOVED_Z:g} combined standard errors (|z| &gt; {MOVED_Z:g}) is counted as moved. The spectrum of "
                        "ΔW itself is another matter: a low-rank update has few eigenvalues above the threshold and often no "
                        "fit (its α is then missing)."))
        if any(p["layer"] is not None for p in both):
            out.append(svg_img(esd_plots.alpha_change_heatmap(both), alt="change of alpha per layer and module"))
            out.append(note("Each cell is Δα = α(W_tuned) − α(W_base) of one matrix (the median over the experts of an MoE "
                            "layer), on a scale centred at 0: where fine-tuning moved the heavy tail, layer by layer."))
    else:
        out.append("<p>α of W_base and W_tuned was not fitted here (an adapter analysed without its base has neither, "
                   "and the approximate mode fits nothing).</p>")
    notes = sorted({m["esd"].get("note") for m in doc.get("modules", []) if m.get("esd") and m["esd"].get("note")})
    if notes:  # why sides are missing (each matrix's entry has its own note)
        more = f"; and {len(notes) - 5} other reasons" if len(notes) > 5 else ""
        out.append(note("Not fitted: " + "; ".join(esc(n) for n in notes[:5]) + more + "."))
    groups: dict[str, list[dict]] = {}
    for p in pts:
        groups.setdefault(p["module"], []).append(p)
    rows = []
    for module in sorted(groups, key=lambda k: role_sort_key(groups[k][0].get("role"), k)):
        ps = groups[module]
        rows.append([module, len(ps), _alpha(_median([p["alpha_base"] for p in ps if p["alpha_base"] is not None])),
                     _alpha(_median([p["alpha_tuned"] for p in ps if p["alpha_tuned"] is not None])),
                     _median([p["change"] for p in ps if p["change"] is not None]),
                     sum(p["z"] is not None and abs(p["z"]) > MOVED_Z for p in ps),
                     sum(p["warning_base"] != p["warning_tuned"] for p in ps),
                     _median([p["alpha_delta"] for p in ps if p["alpha_delta"] is not None])])
    out.append("<h3>α per module</h3>")
    out.append(table(["module", "matrices", "median α (base)", "median α (tuned)", "median Δα", f"moved (|z| > {MOVED_Z:g})",
                      "flag changed", "median α of ΔW"], rows))
    out.append("<h3>α of every matrix (click a column to sort)</h3>")
    out.append(table(["name", "layer", "module", "α base", "σ base", "α tuned", "σ tuned", "Δα", "z", "α of ΔW",
                      "warning base", "warning tuned"],
                     [[p["name"], p["layer"], p["module"], _alpha(p["alpha_base"]), p["sigma_base"], _alpha(p["alpha_tuned"]), p["sigma_tuned"],
                       p["change"], p["z"], p["alpha_delta"], p["warning_base"], p["warning_tuned"]] for p in pts], sortable=True))
    return "\n".join(out)
