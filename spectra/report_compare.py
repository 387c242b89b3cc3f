"""The report's sections for one ``spectra compare`` result (schema ``spectra.compare/1``): its
findings and warnings (for the report's first screen), the figures with what each shows, the table
``spectra compare`` prints with a legend of its columns, the amplification and intruder tables, and
what was skipped and why. Definitions: docs/definitions.md ("Subspaces").

The result is read through :meth:`CompareResult.from_dict`, which validates every key it uses (a
hand-edited compare.json gives one line naming the key, not a traceback).
"""

from __future__ import annotations

from pathlib import Path

from spectra.compare_findings import compare_findings, headline_side, table_legend, unmatched_text
from spectra.compare_records import SCHEMA, CompareResult
from spectra.findings import Finding
from spectra.plots import compare as compare_plots
from spectra.plots.base import svg_img
from spectra.report_html import esc, legend, note, table


def load(path: Path, doc: dict) -> CompareResult:
    """The validated result (:meth:`CompareResult.from_dict`; ResultsFormatError names ``path``)."""
    return CompareResult.from_dict(doc, source=path)


def title(path: Path, doc: dict) -> str:
    """How the report names this input: ``compare: A vs B``."""
    res = load(path, doc)
    return f"compare: {res.a} vs {res.b}"


def findings(path: Path, doc: dict) -> list[Finding]:
    """:func:`spectra.compare_findings.compare_findings` of the result."""
    return compare_findings(load(path, doc))


def _v(x: object, attr: str) -> object:
    return None if x is None else getattr(x, attr)


def section_html(path: Path, doc: dict) -> str:
    """Every section of one compare result, as HTML (names escaped, figures inline SVG)."""
    res = load(path, doc)
    side = headline_side(res)
    with_base = any(m.amplification is not None for m in res.modules)
    figs = compare_plots.compare_figures(res)
    out = [f"<h2>Subspaces: A = {esc(res.a)} ({esc(res.kinds['a'])}) vs B = {esc(res.b)} ({esc(res.kinds['b'])})</h2>",
           (f"<p>base: {esc(res.base or '(none)')} · results: {esc(path)} · {len(res.modules)} modules in {res.elapsed_s:.1f} s "
           f"on {esc(res.device or res.config.get('device', '?'))}</p>")]
    if "captured_heatmap" in figs:
        out.append(svg_img(figs["captured_heatmap"], alt="share of B's update inside A's subspaces"))
        out.append(note("Each cell is the share of B's update energy that lies inside A's top-r input and output directions "
                        "(two-sided), next to the best any subspace of that rank could hold (captured/best). The colour scale "
                        "is fitted to the data; the red mark on the colour bar is what random subspaces of the same rank hold. "
                        "When A is a LoRA and B a full fine-tune, a share far below the best means full fine-tuning moved "
                        "the weights in directions the LoRA never touched."))
    if "phi_grids" in figs:
        out.append(svg_img(figs["phi_grids"], alt="phi grids"))
        out.append(note("φ(i, j) is the overlap of A's top-i and B's top-j singular directions: 1 when one span contains "
                        "the other, about max(i, j)/d for unrelated random directions (red marks on the colour bar; Hu et "
                        "al. 2021, Fig. 3/4). The modules shown are named in the title with the rule that chose them."))
    if "principal_angles" in figs:
        out.append(svg_img(figs["principal_angles"], alt="principal angles"))
        out.append(note("The angles between the two top subspaces, smallest first: 0° is a shared direction, 90° an "
                        "orthogonal one. The dashed line is the angle whose squared cosine is random subspaces' mean."))
    rows = []
    for m in res.modules:
        ph, ang = m.phi.get(side), m.angles.get(side)
        b_in_a, a_in_b = m.captured.get("b_in_a"), m.captured.get("a_in_b")
        rows.append([m.name, m.layer, m.rank_a, m.rank_b, _v(ph, "phi_full"), _v(ph, "random"), _v(ang, "grassmann"),
                     _v(b_in_a, "two_sided"), _v(b_in_a, "best_rank_r"), _v(a_in_b, "two_sided"), m.status])
    out.append("<h3>Every module (the table spectra compare prints; click a column to sort)</h3>")
    out.append(table(["module", "layer", "r_A", "r_B", f"φ({side})", "random", "Grassmann", "B in A", "best r_A", "A in B",
                      "status"], rows, sortable=True))
    items = [*table_legend(side, with_base=False),
             ("Grassmann", "geodesic distance ‖θ‖₂ between the two top subspaces, radians (θ: the principal angles)"),
             ("status", "ok, or zero_update: one update is exactly zero, or unresolved: one update is all rounding noise of "
              "its stored weights; the measures that need its subspace are null")]
    out.append(legend(items, title="Columns of this table"))
    zero = [m for m in res.modules if m.status != "ok"]
    if zero:
        out.append(table(["module", "why some measures are null"], [[m.name, m.reason] for m in zero]))
    if with_base:
        out.append("<h3>Amplification (Hu et al. 2021, Table 7 layout)</h3>")
        rows = []
        for m in res.modules:
            for who, a in (m.amplification or {}).items():
                rows.append([m.name, who.upper(), *(["–"] * 8 if a is None else
                             [a.r, a.delta_fro, a.proj_delta, a.factor, a.proj_own, a.proj_random, a.proj_random_expected, a.w_fro])])
        out.append(table(["module", "update", "r", "‖ΔW‖_F", "‖U_rᵀ W V_r‖_F (ΔW's directions)", "amplification",
                          "‖U_rᵀ W V_r‖_F (W's own)", "random U, V", "random, expected", "‖W‖_F"], rows, sortable=True))
        out.append(note("The amplification factor ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F compares the update's size with how much of the "
                        "base weight lies along the update's own top-r directions. Next to it: the same projection on W's own "
                        "top directions (the most it can be) and on random directions (one draw and its expectation "
                        "r‖W‖_F/√(out·in)). A large factor means the update strengthens directions the base weight barely "
                        "used; Hu et al. found about 21× at r = 4 for GPT-3's W_q."))
        out.append("<h3>Intruder dimensions (Shuttleworth et al. 2024)</h3>")
        for key in ("intruders_a", "intruders_b"):
            if key in figs:
                out.append(svg_img(figs[key], alt=key.replace("_", " ")))
        rows = [[m.name, *(_v((m.intruders or {}).get(w), "count") for w in ("a", "b"))] for m in res.modules]
        out.append(table(["module", "intruders in A", "intruders in B"], rows, sortable=True))
        # config values are read from the file: escaped like names (a hand-edited compare.json is untrusted)
        out.append(note(f"An intruder is one of the top-{esc(res.config.get('intruder_k', 10))} singular directions of the tuned "
                        "weight W + ΔW whose largest |cosine| with every singular direction of the base weight is below "
                        f"ε = {esc(res.config.get('epsilon', 0.5))}: a direction the base did not have. LoRA tends to create them; "
                        "full fine-tuning rarely."))
    if res.skipped:
        out.append(f"<h3>Skipped ({len(res.skipped)})</h3>")
        out.append(table(["module", "reason"], [[s["name"], s["reason"]] for s in res.skipped]))
    if res.a_only or res.b_only:
        out.append(f"<h3>Not compared</h3><p>{esc(unmatched_text(res))} "
                   "(after the filters; listed in compare.json, \"a_only\" and \"b_only\").</p>")
    return "\n".join(out)


__all__ = ["SCHEMA", "findings", "load", "section_html", "title"]
