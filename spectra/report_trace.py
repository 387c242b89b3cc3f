"""The report's sections for a trace (schema ``spectra.trace/1``: ``trace.json`` of ``spectra trace``,
or the ``trace.jsonl`` a :class:`spectra.callbacks.SpectraTracker` writes during training): how the
update's rank, size and directions evolved, next to the training loss. Definitions: README, "Trace".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spectra.compare_findings import PHI_BLIND, PHI_CHANCE
from spectra.display import counted, matrices, tau_percent
from spectra.errors import ResultsFormatError
from spectra.findings import Finding
from spectra.plots import trace as trace_plots
from spectra.plots.base import svg_img
from spectra.report_html import esc, legend, note, table
from spectra.results_check import unique_names
from spectra.roles import role_sort_key
from spectra.trace import SCHEMA, TraceResult, load_trace
from spectra.trace_inputs import check_trace_matrix, check_trace_steps, moved

__all__ = ["SCHEMA", "doc_from_jsonl", "findings", "load", "section_html", "title"]


def load(path: Path, doc: dict) -> TraceResult:
    """The validated trace (one line naming ``path`` when it is not one)."""
    try:
        res = TraceResult.from_dict(doc)
    except (ValueError, TypeError) as exc:
        raise ResultsFormatError(f"not a readable {SCHEMA} document ({exc})", path=path) from None
    if not isinstance(res.matrices, list) or not isinstance(res.checkpoints, list):
        raise ResultsFormatError("a trace needs lists of matrices and checkpoints", path=path)
    for i, m in enumerate(res.matrices):
        check_trace_matrix(m, f"matrices[{i}]", path, ratios=res.source == "spectra trace")
    check_trace_steps(res.checkpoints, res.matrices, path, aligned=res.source == "spectra trace")
    unique_names(res.matrices, path, "spectra trace --out")  # a matrix listed twice would count twice in every median
    return res


def doc_from_jsonl(path: Path) -> dict:
    """A ``trace.jsonl`` written during training as a ``spectra.trace/1`` document (for ``spectra report``)."""
    return load_trace(path).to_dict()


def title(path: Path, doc: dict) -> str:
    """``trace: RUN`` (the run folder, or the base with the checkpoint count)."""
    res = load(path, doc)
    return f"trace: {res.run or path.parent} ({counted(len(res.checkpoints), 'checkpoint')}, {res.kind})"


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def _at(res: TraceResult, index: int, value) -> float | None:
    """Median over matrices of ``value(point)`` at checkpoint ``index`` (skipped points and unchanged matrices
    left out: :func:`spectra.trace_inputs.moved`)."""
    vals = []
    for m in res.matrices:
        pts = m.get("points") or []
        if -len(pts) <= index < len(pts) and moved(pts[index]):
            vals.append(value(pts[index]))
    return _median(vals)


def _turn_finding(res: TraceResult, since: str) -> Finding | None:
    """How far the top-k input directions turned from the first checkpoint (``since``: its words) to the last (median
    φ), against what two unrelated k-dimensional subspaces of the input width d give (k/d); modules where k/d leaves φ
    no room above chance (:data:`spectra.compare_findings.PHI_BLIND`: k = d gives φ = 1 whatever the updates) are left
    out and counted. Where fewer than half the modules turned as the median says, the words give the range instead."""
    told, blind = [], 0
    for m in res.matrices:
        pts, d = m.get("points") or [], (m.get("shape") or [0, 0])[1]
        turn = ((pts[-1].get("turn_first") or {}).get("right") or {}) if pts and moved(pts[-1]) else {}
        if turn.get("phi") is None or not turn.get("k") or not d:
            continue
        if turn["k"] / d >= PHI_BLIND:
            blind += 1
        else:
            told.append((turn["phi"], turn["k"], turn["k"] / d))
    top_k = res.config.get("top_k")
    if not told:
        return None if not blind else Finding("rank", f"φ between the first and last checkpoints' top-{top_k} input directions "
                                               "says nothing here: k is at least 2/3 of every module's input width, where any "
                                               "two subspaces overlap (φ = 1 at k = d).", numbers={"phi_blind": blind})
    turned, k, chance = (float(np.median([t[i] for t in told])) for i in range(3))

    def how(phi: float, chance: float) -> str:
        return ("turned as far as unrelated random subspaces would (at chance)" if phi < PHI_CHANCE * chance else
                "barely turned" if phi > 0.9 else "turned part of the way" if phi > 0.5 else "turned away")
    words = how(turned, chance)
    if 2 * sum(how(phi, c) == words for phi, _, c in told) < len(told):  # an even count's median between two extremes
        words = f"turned by different amounts in different modules (φ from {min(t[0] for t in told):.2f} to {max(t[0] for t in told):.2f})"
    # φ compares the directions both updates resolve (k = the fewer of the two), which can be below top_k
    fewer = f" (median {k:g} resolved of the {top_k} asked)" if isinstance(top_k, int) and k < top_k else ""
    left = f"; {blind} modules whose k is at least 2/3 of their width, where φ cannot tell, left out" if blind else ""
    return Finding("rank", f"The top-{top_k if top_k is not None else 'k'} input directions{fewer} of the updates {words} since "
                           f"{since}: median φ = {turned:.2f} against {chance:.2f} for unrelated random subspaces "
                           f"(1: the same subspace, or the smaller one within the larger; 0: orthogonal){left}.",
                   numbers={"phi_first_last": turned, "k": k, "phi_random": chance, "phi_blind": blind})


def _key(res: TraceResult) -> str:
    return trace_plots.headline_key(res.to_dict())


def findings(path: Path, doc: dict) -> list[Finding]:
    """What changed from the first to the last checkpoint, in words, and what was left out."""
    res = load(path, doc)
    out: list[Finding] = []
    if not res.checkpoints or not res.matrices:
        return [Finding("incomplete", "the trace holds no measured checkpoint", warning=True)]
    key = _key(res)
    if not res.complete and res.source == "spectra trace":  # a stopped run's trace.json: the checkpoints it reached
        out.append(Finding("incomplete", "This run did not finish (complete: false): the numbers cover only the matrices "
                           "measured before it stopped; finish it with `spectra trace … --resume`.", warning=True))

    def rank(p: dict) -> float | None:
        return (p.get("energy_rank") or {}).get(key)

    # from the first checkpoint where a matrix moved: a run's step-0 copy of the base has no rank, norm or subspace
    start = next((i for i in range(len(res.checkpoints)) if _at(res, i, rank) is not None), 0)
    first, last = res.checkpoints[start]["step"], res.checkpoints[-1]["step"]
    r0, r1 = _at(res, start, rank), _at(res, -1, rank)
    n0, n1 = (_at(res, i, lambda p: p.get("rel_norm")) for i in (start, -1))
    unmoved = f" (before step {first} no matrix had moved from the base)" if start else ""
    if r0 is not None and r1 is not None:
        size = f"; ‖ΔW‖/‖W_base‖ from {n0:.3g} to {n1:.3g}" if n0 is not None and n1 is not None else ""
        if start == len(res.checkpoints) - 1:  # one checkpoint: a state, not a change
            size = f"; ‖ΔW‖/‖W_base‖ is {n1:.3g}" if n1 is not None else ""
            only = "the only checkpoint" if len(res.checkpoints) == 1 else "the only one where a matrix moved"
            out.append(Finding("rank", f"At step {last} ({only}) the median rank ΔW needs for {tau_percent(key)} "
                                       f"of its energy is {r1:g}{size}{unmoved}.", numbers={"rank": [r1, r1], "rel_norm": [n1, n1]}))
        else:
            out.append(Finding("rank", f"From step {first} to step {last} the median rank ΔW needs for {tau_percent(key)} of "
                                       f"its energy went from {r0:g} to {r1:g}{size}{unmoved}.",
                               numbers={"rank": [r0, r1], "rel_norm": [n0, n1]}))
    if len(res.checkpoints) > 1 and (turn := _turn_finding(res, f"step {first}" if start else "the first checkpoint")) is not None:
        out.append(turn)
    if res.kind == "lora":
        u0, u1 = (_at(res, i, lambda p: p.get("effective_rank_over_r")) for i in (start, -1))
        if u0 is not None and u1 is not None:
            since = f", {u0:.0%} at step {first}" if len(res.checkpoints) > 1 else ""
            out.append(Finding("adapter", f"LoRA's effective rank is {u1:.0%} of r at step {last} (median over modules){since}.",
                               numbers={"effective_rank_over_r": [u0, u1]}))
    for s in res.skipped_checkpoints:
        out.append(Finding("skipped", f"checkpoint {Path(s['path']).name} left out: {s['reason']}", warning=True))
    for w in res.warnings:
        out.append(Finding("caveat", w, warning=True))
    return out


LEGEND = [
    ("step", "the training step of the checkpoint (trainer_state.json's global_step, else the checkpoint-N name)"),
    ("energy rank [τ]", "the fewest singular directions of ΔW = W_step − W_base holding τ of Σσᵢ²"),
    ("‖ΔW‖/‖W‖", "‖ΔW‖_F / ‖W_base‖_F"),
    ("σ₁/σ₂", "ratio of the two largest singular values: large when one direction dominates the update"),
    ("effective rank", "exp of the entropy of σᵢ / Σσⱼ (Roy & Vetterli 2007); for LoRA also divided by r"),
    ("φ first / φ prev", ("‖Q_aᵀQ_b‖_F² / k between the update's top-k right singular vectors now and at the first "
                         "(previous) checkpoint (Hu et al. 2021, Eq. 4): 1 unturned, 0 orthogonal")),
    ("max angle", "the largest principal angle between those subspaces, degrees"),
    ("α", ("WeightWatcher's power-law exponent of the eigenvalues σ² of the weight W (not ΔW), with --alpha; "
          "α < 2 reads over-trained, α > 6 under-trained (Martin & Mahoney 2021)")),
]


def section_html(path: Path, doc: dict) -> str:
    """The trace's figures and tables (names escaped, figures inline SVG)."""
    res = load(path, doc)
    d = res.to_dict()
    key = _key(res)
    steps = [c["step"] for c in res.checkpoints]
    out = [f"<h2>Trace: {esc(res.run or res.base or path.parent)}</h2>",
           (f"<p>base: {esc(res.base or '(the run’s own start)')} · {len(res.checkpoints)} checkpoint{'s' * (len(steps) != 1)} "
           f"({f'step {esc(steps[0])}' if len(steps) == 1 else f'steps {esc(steps[0])}–{esc(steps[-1])}' if steps else 'none'})"
           f" · {matrices(len(res.matrices))} · "
           f"{esc(res.kind)} · from {esc(res.source)} · results: {esc(path)}</p>")]
    figs = trace_plots.trace_figures(d) if res.matrices else {}
    if "trace_loss" in figs:
        out.append(svg_img(figs["trace_loss"], alt="training loss and the update's rank"))
        out.append(note("The training loss (black) and the median rank ΔW needs (blue, one point per checkpoint): whether "
                        "the update keeps recruiting directions while the loss still falls, or stops growing in rank."))
    if "trace_metrics" in figs:
        out.append(svg_img(figs["trace_metrics"], alt="metrics against the step"))
        out.append(note("One line per module kind (median over layers). A rank or effective rank that falls while the norm "
                        "grows means training concentrates the update in fewer directions (a LoRA losing effective rank, "
                        "or rank-1 spikes growing). φ with the first checkpoint falling means the update's main directions "
                        "keep turning; φ with the previous one (dashed) near 1 means they turn slowly."))
    for which, text in (("rank", ("Each cell: the rank needed, as a fraction of what the matrix (or LoRA's r) allows, "
                                 "median over the layer's matrices, at each checkpoint.")),
                        ("turn", ("Each cell: φ between the checkpoint's top-k subspace and the first checkpoint's: where "
                                 "in depth and when the update's directions moved."))):
        if f"trace_heatmap_{which}" in figs:
            out.append(svg_img(figs[f"trace_heatmap_{which}"], alt=f"layer by step: {which}"))
            out.append(note(text))
    out.append("<h3>Checkpoints</h3>")
    out.append(table(["step", "loss", "kind", "step from", "note"],
                     [[c["step"], c.get("loss"), c["kind"], c["source"], "; ".join(x for x in (c.get("note"), c.get("failed")) if x)]
                      for c in res.checkpoints]))
    out.append("<h3>Per module kind, first and last checkpoint (medians over the matrices that changed there; n counts all)</h3>")
    kinds: dict[str, list[dict[str, Any]]] = {}
    for m in res.matrices:
        kinds.setdefault(m["module"], []).append(m)
    alpha = any("base_alpha" in m for m in res.matrices)
    rows = []
    for kind in sorted(kinds, key=lambda k: role_sort_key(kinds[k][0].get("role"), k)):
        def med(i: int, value, ms=kinds[kind], measured=moved) -> float | None:  # as the terminal's: matrices that changed
            return _median([value(pts[i]) for m in ms if -len(pts := m["points"]) <= i < len(pts) and measured(pts[i])])
        row = [kind, len(kinds[kind])]
        for fn in (lambda p: (p.get("energy_rank") or {}).get(key), lambda p: p.get("rel_norm"), lambda p: p.get("sigma_ratio"),
                   lambda p: p.get("effective_rank_over_r", p.get("effective_rank"))):
            row += [med(0, fn), med(-1, fn)]
        row.append(med(-1, lambda p: ((p.get("turn_first") or {}).get("right") or {}).get("phi")))
        if alpha:
            # α is the weight's, not ΔW's: a frozen matrix has one too (measured points, as α of W_base)
            row += [_median([m.get("base_alpha") for m in kinds[kind]]),
                    med(-1, lambda p: p.get("alpha"), measured=lambda p: isinstance(p, dict) and "skip" not in p)]
        rows.append(row)
    eff = "effective rank / r" if res.kind == "lora" else "effective rank"
    out.append(table(["module", "n", f"energy rank [{key}] first", "last", "‖ΔW‖/‖W‖ first", "last", "σ₁/σ₂ first", "last",
                      f"{eff} first", "last", "φ first (last ckpt)", *(("α of W_base", "α last") if alpha else ())],
                     rows, sortable=True))
    out.append(legend(LEGEND, title="Columns"))
    if res.skipped_checkpoints:
        out.append(f"<h3>Checkpoints left out ({len(res.skipped_checkpoints)})</h3>")
        out.append(table(["checkpoint", "reason"], [[s["path"], s["reason"]] for s in res.skipped_checkpoints]))
    if res.skipped:
        out.append(f"<h3>Matrices not traced ({len(res.skipped)})</h3>")
        out.append(table(["name", "reason"], [[s["name"], s["reason"]] for s in res.skipped]))
    return "\n".join(out)
