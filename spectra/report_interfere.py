"""The report's sections for ``spectra interfere`` (schema ``spectra.interfere/1``): how n fine-tunes
of one base overlap, pair by pair and all together. Definitions: README, "Interference".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spectra.display import matrices
from spectra.errors import ResultsFormatError
from spectra.findings import Finding
from spectra.interfere import PAIR_MEASURES, SCHEMA
from spectra.plots import interfere as interfere_plots
from spectra.plots.base import svg_img
from spectra.report_html import esc, legend, note, table

__all__ = ["SCHEMA", "findings", "section_html", "title"]

LEGEND = [
    ("cosine", "⟨ΔW_s, ΔW_t⟩_F / (‖ΔW_s‖_F ‖ΔW_t‖_F): the updates as flat vectors (Ilharco et al. 2023)"),
    ("φ", "‖Q_sᵀQ_t‖_F² / min(k_s, k_t) of the top-k singular vectors (Hu et al. 2021, Eq. 4); random ≈ max(k)/d"),
    ("captured", "‖U_sᵀ ΔW_t V_s‖_F² / ‖ΔW_t‖_F²: the share of t's update inside s's top-k left and right subspaces"),
    ("TSV (ℓ1)", ("‖(UᵀU − I) Σ (VᵀV − I)‖₁ with U = [U_1 … U_n], V = [V_1 … V_n], Σ block-diagonal (Gargiulo et al. 2025), "
            "÷ ((n−1)² Σσ): 0 orthogonal tasks, 1 identical ones (can pass 1: the ℓ1 norm is entrywise)")),
    ("TSV (bounded)", ("the Frobenius norm of the same matrix over the bound Σ‖Σ_r‖_F of its blocks: in [0, 1], 0 for "
                       "orthogonal tasks, 1 for identical updates (the pairwise heatmap shows this form)")),
    ("KnOTS", "linear CKA of the tasks' coordinates Z_t = UᵀΔW_t in the shared basis of [ΔW_1 … ΔW_n] (Stoica et al. 2025)"),
    ("σ₁ sum / max", "σ₁(Σ_t ΔW_t) / max_t σ₁(ΔW_t): n when every task pushes the same top direction, 1 when they are orthogonal"),
    ("‖sum‖² / Σ‖·‖²", "‖Σ_t ΔW_t‖_F² / Σ_t ‖ΔW_t‖_F²: 1 orthogonal, n identical, below 1 when the updates cancel"),
    ("nuclear sum / Σ", ("‖Σ_t ΔW_t‖_* / Σ_t ‖ΔW_t‖_*: 1 for identical or fully orthogonal updates, below 1 when "
                         "their directions overlap without coinciding, or cancel")),
    ("–", ("undefined: an update that is exactly zero, or entirely at the rounding level of its stored weights, has no "
           "direction (no φ, captured energy, TSV or KnOTS entry); the n-way TSV needs two tasks with directions")),
]


def load(path: Path, doc: dict) -> dict:
    """The document, checked to have what the sections read (one line naming ``path`` otherwise)."""
    if doc.get("schema") != SCHEMA:
        raise ResultsFormatError(f"schema must be {SCHEMA!r}. Got {doc.get('schema')!r} instead", path=path)
    n = len(doc.get("tasks") or [])
    if n < 2 or len(doc.get("names") or []) != n or not isinstance(doc.get("modules"), list):
        raise ResultsFormatError("an interfere result needs two or more tasks, their names and a list of modules", path=path)
    return doc


def title(path: Path, doc: dict) -> str:
    d = load(path, doc)
    return f"interfere: {', '.join(d['names'])}"


def _pairs(d: dict, key: str) -> list[tuple[float, int, int]]:
    m = (d.get("summary") or {}).get(key)
    if not m:
        return []
    n = len(d["names"])
    return sorted((m[s][t], s, t) for s in range(n) for t in range(s + 1, n) if m[s][t] is not None)


def findings(path: Path, doc: dict) -> list[Finding]:
    """The most and least overlapping pairs, and what summing all the updates does, in words."""
    d = load(path, doc)
    s = d.get("summary") or {}
    out: list[Finding] = []
    names = d["names"]
    cos, phi = _pairs(d, "cosine"), (s.get("phi") or [])

    def phi_of(a: int, b: int) -> str:
        # φ is null where a task has no resolved direction (zero, or rounding-level updates), the cosine is not
        v = phi[a][b] if a < len(phi) and b < len(phi[a]) else None
        return "undefined (no resolved direction)" if v is None else f"{v:.2f}"

    counts = s.get("pair_modules")  # interfere.json before the per-pair counts: every pair over all modules

    def over(a: int, b: int) -> str:
        k = counts[a][b] if counts else s.get("modules")
        return f"over {matrices(k)}" + (f" of {s.get('modules')}" if counts and k != s.get("modules") else "")

    if len(cos) == 1:  # two fine-tunes: one pair, neither "most" nor "least" alike
        (v, a, b), = cos
        out.append(Finding("modules", f"{names[a]} and {names[b]}: median cosine {v:.2f}, φ {phi_of(a, b)}, "
                                      f"{over(a, b)}.", numbers={"cosine": [v, v]}))
    elif cos:
        (lo, a, b), (hi, c, e) = cos[0], cos[-1]
        out.append(Finding("modules", f"Most alike: {names[c]} and {names[e]} (median cosine {hi:.2f}, φ {phi_of(c, e)}, "
                                      f"{over(c, e)}); least: {names[a]} and {names[b]} (cosine {lo:.2f}, φ {phi_of(a, b)}, "
                                      f"{over(a, b)}).", numbers={"cosine": [lo, hi]}))
    if s.get("spectral_over_max") is not None:
        out.append(Finding("size", f"Adding the {len(names)} updates (task arithmetic) makes the strongest direction "
                                   f"{s['spectral_over_max']:.2f}× the strongest single update's (median; {len(names)} if "
                                   f"all pushed the same direction, 1 if none shared it), and ‖sum‖² is "
                                   f"{s['fro_sq_ratio']:.2f}× the sum of the parts'.",
                           numbers={"spectral_over_max": s["spectral_over_max"], "fro_sq_ratio": s["fro_sq_ratio"]}))
    if d.get("skipped"):
        out.append(Finding("skipped", f"{matrices(len(d['skipped']))} were not compared (see the section).", warning=True))
    for w in d.get("warnings") or []:
        out.append(Finding("caveat", w, warning=True))
    return out


def section_html(path: Path, doc: dict) -> str:
    """The heatmaps per measure, the n-way numbers per module, and what was left out."""
    d = load(path, doc)
    names, n = d["names"], len(d["names"])
    s = d.get("summary") or {}
    out = [f"<h2>Interference between {n} fine-tunes: {esc(', '.join(names))}</h2>",
           (f"<p>base: {esc(d.get('base'))} · {matrices(len(d['modules']))} every task updates · top-k = "
           f"{esc((d.get('config') or {}).get('top_k'))} · results: {esc(path)}</p>"),
           table(["#", "name", "kind", "path"], [[i, names[i], d["kinds"][i], d["tasks"][i]] for i in range(n)])]
    figs = interfere_plots.interfere_figures(d)
    texts = {
        "cosine": "Cosine of the flattened updates, median over matrices: how much two fine-tunes push the weights the "
                  "same way. Near 0 is typical of unrelated tasks; negative values mean they pull against each other.",
        "phi": "How much the top-k singular directions (input side by default) of two updates overlap: 1 when one "
               "contains the other, about max(k)/d for random directions.",
        "captured": "Row s, column t: the share of t's update that lies inside s's top-k directions on both sides. "
                    "Read along a column to see which task's subspace would absorb t's update in a merge.",
        "tsv": "Task Singular Vectors interference of each pair (Gargiulo et al. 2025), in its bounded form: the singular "
               "vectors of different tasks interacting, weighted by the singular values; 0 for orthogonal tasks, 1 for "
               "identical ones.",
        "knots": "Alignment in KnOTS's shared basis (Stoica et al. 2025): 1 when two tasks weigh the shared directions and "
                 "inputs the same way, 0 when they use orthogonal inputs.",
    }
    for key in PAIR_MEASURES:
        if f"interfere_{key}" in figs:
            out.append(svg_img(figs[f"interfere_{key}"], alt=f"{key} between tasks"))
            out.append(note(texts[key]))
    if "interfere_layers" in figs:
        out.append(svg_img(figs["interfere_layers"], alt="TSV interference by layer and module"))
        out.append(note("Where in the network the n updates collide most (bounded TSV interference per matrix)."))
    out.append("<h3>All tasks together, medians over matrices</h3>")
    out.append(table(["TSV (ℓ1)", "TSV (bounded)", "σ₁ sum / max", "‖sum‖² / Σ‖·‖²", "nuclear sum / Σ"],
                     [[s.get("tsv_relative"), s.get("tsv_relative_fro"), s.get("spectral_over_max"), s.get("fro_sq_ratio"),
                       s.get("nuclear_ratio")]]))
    if s.get("modules") and s.get("tsv_relative") is None:
        out.append(note("TSV is undefined (–) in every matrix: no two tasks have a resolved direction there (an update "
                        "that is exactly zero, or entirely at the rounding level of its stored weights; the warnings name "
                        "the tasks)."))
    out.append(note("Over-accumulation: when tasks share directions, adding their updates (task arithmetic) makes those "
                    "directions grow faster than the rest; the merged update's spectrum is dominated by a few components "
                    "(Marczak et al. 2025). σ₁ sum / max near n says the top direction was shared by all."))
    rows = []
    for m in d["modules"]:
        tsv, acc, kn = m["tsv"], m["sum"], m["knots"]
        rows.append([m["name"], m["layer"], m["module"], _range(m["cosine"]), _range(m["phi"]), tsv["sti"], tsv["relative"],
                     tsv.get("relative_fro"), kn["rank"], acc["spectral_over_max"], acc["fro_sq_ratio"], acc["nuclear_ratio"],
                     _ranks(acc)])
    out.append("<h3>Every matrix (click a column to sort)</h3>")
    out.append(table(["name", "layer", "module", "cosine (min–max)", "φ (min–max)", "STI", "TSV (ℓ1)", "TSV (bounded)",
                      "KnOTS rank", "σ₁ sum / max", "‖sum‖² / Σ‖·‖²", "nuclear sum / Σ", "energy rank: sum | tasks"],
                     rows, sortable=True))
    out.append(legend(LEGEND, title="Measures"))
    if d.get("partial"):
        out.append(f"<h3>Held by some tasks only ({len(d['partial'])})</h3>")
        out.append(table(["name", "tasks"], [[p["name"], ", ".join(names[i] for i in p["tasks"])] for p in d["partial"]]))
    if d.get("skipped"):
        out.append(f"<h3>Not compared ({len(d['skipped'])})</h3>")
        out.append(table(["name", "reason"], [[x["name"], x["reason"]] for x in d["skipped"]]))
    return "\n".join(out)


def _range(matrix: list[list[Any]]) -> str:
    vals = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i < j and v is not None]
    return f"{min(vals):.2f}–{max(vals):.2f}" if vals else "–"


def _ranks(acc: dict[str, Any]) -> str:
    key = min(acc["energy_rank"], key=lambda t: abs(float(t) - 0.9)) if acc.get("energy_rank") else None
    if key is None:
        return "–"
    return f"{acc['energy_rank'][key]} | {', '.join(str(x) for x in acc['task_energy_rank'][key])}"
