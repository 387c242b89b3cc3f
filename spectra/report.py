"""``spectra report``: one self-contained HTML file from diff, compare and training results.

No network: figures are inline SVG data URIs, styles and the table sorter are inline, no fonts or
scripts are fetched. Every string that comes from a checkpoint or a path is HTML-escaped (tensor
names are untrusted input), and figures never parse names as mathtext.

Inputs are ``results.json`` (``spectra diff``), ``compare.json`` (``spectra compare``),
``train_log.jsonl`` (``spectra train``), or folders holding any of them (searched recursively, so
``reports/demo`` works as a whole).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from spectra.errors import SpectraError
from spectra.results import DiffResult, atomic_write_text


@dataclass
class ReportInputs:
    """What was found among the inputs."""

    diffs: list[tuple[Path, DiffResult]] = field(default_factory=list)
    compares: list[tuple[Path, dict]] = field(default_factory=list)
    train_logs: dict[str, list[dict]] = field(default_factory=dict)


def collect(paths: list[str | os.PathLike[str]]) -> ReportInputs:
    """Find results among ``paths`` (files or folders).

    Raises:
        SpectraError: a path does not exist, a file is not a spectra result, or nothing was found.
    """
    found = ReportInputs()
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise SpectraError("no such file or folder", path=p)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.name in ("results.json", "compare.json", "train_log.jsonl"))
        else:
            files.append(p)
    for f in files:
        try:
            if f.name.endswith(".jsonl"):
                found.train_logs[f.parent.name] = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
                continue
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpectraError(f"cannot read results ({exc.__class__.__name__})", path=f) from None
        schema = doc.get("schema") if isinstance(doc, dict) else None
        if schema == "spectra.diff/1":
            found.diffs.append((f, DiffResult.from_dict(doc)))
        elif schema == "spectra.compare/1":
            found.compares.append((f, doc))
        else:
            raise SpectraError(f"not a spectra result (schema {schema!r})", path=f,
                               hint="pass results.json, compare.json, train_log.jsonl or folders holding them")
    if not (found.diffs or found.compares or found.train_logs):
        raise SpectraError("no spectra results found", path=", ".join(map(str, paths)),
                           hint="pass results.json, compare.json, train_log.jsonl or folders holding them")
    return found


def _svg(fig) -> str:
    """An <img> holding the figure as an SVG data URI (inert: scripts in an <img> never run)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="fig" alt="figure" src="data:image/svg+xml;base64,{data}">'


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 1.5em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.note{background:#f4f7fb;border-left:4px solid #6a8fc7;padding:.5em .9em;margin:.6em 0}
img.fig{max-width:100%;height:auto;display:block;margin:.5em 0}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f0f0f0;cursor:pointer;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
.scroll{max-height:520px;overflow:auto}
@media print{.scroll{max-height:none;overflow:visible}th{position:static}}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, i){th.addEventListener('click', function(){
 var t=th.closest('table'), b=t.tBodies[0], rows=Array.prototype.slice.call(b.rows), asc=th.dataset.asc!=='1';
 rows.sort(function(x,y){var a=x.cells[i].textContent, c=y.cells[i].textContent, na=parseFloat(a), nc=parseFloat(c);
  var r=(!isNaN(na)&&!isNaN(nc))?na-nc:a.localeCompare(c); return asc?r:-r;});
 rows.forEach(function(r){b.appendChild(r);}); th.dataset.asc=asc?'1':'0';});});
"""


def _table(header: list[str], rows: list[list], *, sortable: bool = False) -> str:
    cls = ' class="sortable"' if sortable else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _note(text: str) -> str:
    return f'<div class="note"><b>What this means.</b> {text}</div>'


def build_report(paths: list[str | os.PathLike[str]], *, title: str = "spectra report") -> str:
    """The report's HTML text (see the module docstring for the inputs)."""
    import matplotlib

    from spectra import plots

    found = collect(paths)
    parts = [f"<h1>{_e(title)}</h1>"]
    with matplotlib.rc_context({"svg.fonttype": "path"}):
        parts.append(_overview(found))
        for path, res in found.diffs:
            parts.append(_diff_sections(path, res, plots))
        for path, doc in found.compares:
            parts.append(_compare_sections(path, doc, plots))
        if found.train_logs:
            logs = {k: v for k, v in found.train_logs.items() if any(r.get("source_loss") is not None for r in v)}
            parts.append("<h2>Learning vs forgetting</h2>")
            if logs:
                parts.append(_svg(plots.learning_forgetting_plot(logs)))
            rows = [[name, recs[-1]["step"], recs[0].get("target_loss"), recs[-1].get("target_loss"),
                     recs[0].get("source_loss"), recs[-1].get("source_loss")] for name, recs in found.train_logs.items() if recs]
            parts.append(_table(["run", "steps", "target loss at start", "at end", "source loss at start", "at end"], rows))
            parts.append(_note("Lower target loss means the run learned the new domain; higher source loss means it "
                               "forgot the old one. Biderman et al. (2024) found LoRA learns less but forgets less than full "
                               "fine-tuning; each line here goes from a run's start to its end."))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}<script>{_SORT_JS}</script></body></html>\n")


def write_report(paths: list[str | os.PathLike[str]], out: str | os.PathLike[str], *, title: str = "spectra report") -> Path:
    """Build the report and write it atomically to ``out``."""
    return atomic_write_text(Path(out), build_report(paths, title=title))


def _overview(found: ReportInputs) -> str:
    rows = []
    for path, r in found.diffs:
        rows.append(["diff", str(path.parent), r.base or "(adapter alone)", r.tuned, len(r.modules), len(r.skipped),
                     len(r.unmatched.get("base_only", [])), len(r.unmatched.get("tuned_only", [])), r.elapsed_s, r.device])
    for path, d in found.compares:
        rows.append(["compare", str(path.parent), d.get("a"), d.get("b"), len(d.get("modules", [])), "", len(d.get("a_only", [])),
                     len(d.get("b_only", [])), d.get("elapsed_s"), d.get("config", {}).get("device")])
    for name, recs in found.train_logs.items():
        rows.append(["train", name, "", "", len(recs), "", "", "", recs[-1].get("seconds") if recs else None, ""])
    return "<h2>Overview</h2>" + _table(
        ["kind", "where", "base / A", "tuned / B", "matrices / modules / log records", "skipped", "base-only / A-only",
         "tuned-only / B-only", "seconds", "device"], rows)


def _diff_sections(path: Path, res: DiffResult, plots) -> str:
    tau = res.headline_threshold
    key = str(float(tau))
    out = [f"<h2>ΔW spectra: {_e(res.tuned)}</h2>", f"<p>base: {_e(res.base or '(none: adapter alone)')} · results: {_e(path)}</p>"]
    if any(m.layer is not None for m in res.modules):
        out.append(_svg(plots.rank_heatmap(res, None, threshold=tau)))
        out.append(_note(f"Each cell is the number of singular directions needed to hold {tau:.0%} of the update's energy, as "
                         "a fraction of the most there could be. Low values mean the fine-tune changed the matrix along few "
                         "directions (a LoRA of that rank could express it); values near the random-matrix baseline in the "
                         "title mean the update is spread like noise (Biderman et al. 2024, Fig. 6)."))
        if any(m.rel_norm is not None for m in res.modules):
            out.append(_svg(plots.relnorm_heatmap(res, None)))
            out.append(_note("How large each update is next to the weight it changes (‖ΔW‖_F / ‖W_base‖_F)."))
    out.append(_spectra_figure(res))
    rows = [[m.name, m.layer, m.expert, m.module, f"{m.shape[0]}×{m.shape[1]}", m.energy_rank.get(key), m.energy_rank_frac.get(key),
             (m.random_energy_rank.get(key) or 0) / max(1, m.p), m.rel_norm, m.fro_norm, m.spectral_norm, m.stable_rank,
             m.effective_rank, m.lora_r, m.note] for m in res.modules]
    out.append("<h3>Every matrix (click a column to sort)</h3>")
    out.append(_table(["name", "layer", "expert", "module", "shape", f"energy rank [{key}]", "/ p", "random / p", "‖ΔW‖/‖W‖",
                       "‖ΔW‖_F", "σ₁", "stable rank", "effective rank", "LoRA r", "note"], rows, sortable=True))
    if res.skipped:
        out.append("<h3>Skipped</h3>" + _table(["name", "reason"], [[s["name"], s["reason"]] for s in res.skipped]))
    return "\n".join(out)


def _spectra_figure(res: DiffResult) -> str:
    """Top singular values of ΔW and their cumulative energy for a few modules (Biderman et al. Fig. S7 style)."""
    from matplotlib.figure import Figure
    import numpy as np

    layered = [m for m in res.modules if m.layer is not None and m.singular_values and m.fro_norm > 0]
    if not layered:
        return ""
    mid = sorted({m.layer for m in layered})[len({m.layer for m in layered}) // 2]
    chosen = [m for m in layered if m.layer == mid][:7]
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for m in chosen:
        s = np.asarray(m.singular_values)
        label = m.module.replace("$", r"\$")  # a name, not mathtext
        ax1.semilogy(range(1, len(s) + 1), s, label=label)
        ax2.plot(range(1, len(s) + 1), np.cumsum(s**2) / m.fro_norm**2, label=label)
    ax1.set_xlabel("index i")
    ax1.set_ylabel("σᵢ(ΔW)")
    ax1.set_title(f"Top singular values of ΔW, layer {mid}", fontsize=10)
    ax2.set_xlabel("rank k")
    ax2.set_ylabel("Σ_{i≤k} σᵢ² / ‖ΔW‖²_F")
    ax2.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("Cumulative energy (the dashed line is 90%)", fontsize=10)
    ax2.legend(fontsize=7)
    weights = ""
    with_w = [m for m in chosen if m.base_singular_values and m.tuned_singular_values]
    if with_w:
        figw = Figure(figsize=(4.2 * min(3, len(with_w)), 3.6), layout="constrained")
        for i, m in enumerate(with_w[:3]):
            ax = figw.add_subplot(1, min(3, len(with_w)), i + 1)
            for vals, lbl in ((m.base_singular_values, "W_base"), (m.tuned_singular_values, "W_tuned"), (m.singular_values, "ΔW")):
                ax.semilogy(range(1, len(vals) + 1), vals, label=lbl)
            ax.set_title(f"{m.module}, layer {m.layer}", fontsize=9, parse_math=False)
            ax.set_xlabel("index i")
            ax.set_ylabel("σᵢ")
            ax.legend(fontsize=7)
        weights = "<h3>Spectra of W_base, W_tuned and ΔW (Biderman et al. 2024, Fig. S7 style)</h3>" + _svg(figw) + _note(
            "The weights' spectra barely move while ΔW has a spectrum of its own: a fine-tune is a small update whose "
            "shape (how many directions it needs) is what the rank-needed numbers measure.")
    return weights + ("<h3>Spectra of ΔW</h3>" + _svg(fig) + _note(
        "Where the cumulative curve crosses 90% is the rank needed. Only the top singular values are stored in the results "
        "(--top-k), so a curve that has not reached 90% at the right edge needs more rank than shown."))


def _compare_sections(path: Path, doc: dict, plots) -> str:
    from types import SimpleNamespace

    res = SimpleNamespace(**{k: doc[k] for k in ("modules", "phi_grids", "kinds", "config")})
    figs = plots.compare_figures(res)
    out = [f"<h2>Subspaces: A = {_e(doc['a'])} ({_e(doc['kinds']['a'])}) vs B = {_e(doc['b'])} ({_e(doc['kinds']['b'])})</h2>",
           f"<p>results: {_e(path)}</p>"]
    if "captured_heatmap" in figs:
        out.append(_svg(figs["captured_heatmap"]))
        out.append(_note("The share of B's update that lies in A's top-r input and output directions. Compare it with the "
                         "best any rank-r subspace could hold (the table's 'best'): when A is a LoRA and B a full fine-tune, "
                         "a low share means full fine-tuning moved weights in directions the LoRA never touched."))
    if "phi_grids" in figs:
        out.append(_svg(figs["phi_grids"]))
        out.append(_note("φ(i, j) is the overlap of A's top-i and B's top-j singular directions: 1 when one contains the "
                         "other, about max(i, j)/d for unrelated random directions (Hu et al. 2021, Fig. 3/4)."))
    if "principal_angles" in figs:
        out.append(_svg(figs["principal_angles"]))
    side = next(iter(doc["modules"][0]["phi"])) if doc.get("modules") else "right"
    rows = [[m["name"], m["layer"], m["rank_a"], m["rank_b"], m["phi"][side]["phi_full"], m["phi"][side]["random"],
             m["angles"][side]["grassmann"], m["captured"]["b_in_a"]["two_sided"], m["captured"]["b_in_a"]["best_rank_r"],
             m["captured"]["a_in_b"]["two_sided"]] for m in doc.get("modules", [])]
    out.append(_table(["module", "layer", "r_A", "r_B", f"φ ({side})", "random φ", "Grassmann", "B in A", "best", "A in B"], rows, sortable=True))
    amp = [m for m in doc.get("modules", []) if m.get("amplification")]
    if amp:
        out.append("<h3>Amplification (Hu et al. 2021, Table 7 layout)</h3>")
        rows = []
        for m in amp:
            for who in ("a", "b"):
                a = m["amplification"][who]
                rows.append([m["name"], who.upper(), a["r"], a["delta_fro"], a["proj_delta"], a["factor"], a["proj_own"],
                             a["proj_random"], a["proj_random_expected"], a["w_fro"]])
        out.append(_table(["module", "update", "r", "‖ΔW‖_F", "‖U_rᵀ W V_r‖_F (ΔW's directions)", "amplification",
                           "‖U_rᵀ W V_r‖_F (W's own)", "random U, V", "random, expected", "‖W‖_F"], rows, sortable=True))
        out.append(_note("A large amplification factor means the update strengthens directions the base weight barely "
                         "used; Hu et al. found about 21× at r = 4 for GPT-3's W_q."))
    intr = [m for m in doc.get("modules", []) if m.get("intruders")]
    if intr:
        out.append("<h3>Intruder dimensions (Shuttleworth et al. 2024)</h3>")
        for key in ("intruders_a", "intruders_b"):
            if key in figs:
                out.append(_svg(figs[key]))
        rows = [[m["name"], m["intruders"]["a"]["count"], m["intruders"]["b"]["count"]] for m in intr]
        out.append(_table(["module", "intruders in A", "intruders in B"], rows, sortable=True))
        out.append(_note("An intruder is a top singular direction of the tuned weight that resembles none of the base "
                         "weight's directions (largest |cosine| below ε). LoRA tends to create them; full fine-tuning rarely."))
    return "\n".join(out)
