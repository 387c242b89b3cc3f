"""The report's sections for ``spectra interfere`` (schema ``spectra.interfere/1``): how n fine-tunes
of one base overlap, pair by pair and all together. Definitions: README, "Interference".
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from spectra.display import matrices
from spectra.errors import ResultsFormatError
from spectra.findings import Finding
from spectra.interfere import CANCEL_NOTE, PAIR_MEASURES, SCHEMA
from spectra.interfere_summary import summarise
from spectra.plots import interfere as interfere_plots
from spectra.plots.base import svg_img
from spectra.report_html import esc, legend, note, table
from spectra.results_check import impossible, is_int, is_num

__all__ = ["SCHEMA", "check", "findings", "section_html", "title"]

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
    check(path, doc)
    return doc


#: Rounding allowed past a bound: a share or cosine summed in float64 ends ~1e-16 off; the n-way ratios
#: divide spectra of a sum and of its parts decomposed apart (the writer takes back only 1e-9 past 1).
_SLACK, _RATIO_SLACK = 1e-9, 1e-6
#: Pairwise measures (n × n): bounds and whether s, t and t, s are one number.
_PAIR = {"cosine": (-1.0, 1.0, True), "phi": (0.0, 1.0, True), "captured": (0.0, 1.0, False),
         "tsv": (0.0, 1.0, True), "knots": (0.0, 1.0, True)}


def check(path: Path, doc: dict[str, Any]) -> None:
    """Refuse an ``interfere.json`` the report would state as facts though no run writes it: a value of
    the wrong type or outside its range (a cosine past ±1, a share or φ outside [0, 1], a negative norm or
    rank), a pair matrix that is not n × n or not symmetric, a matrix listed twice, or a summary that is
    not the medians of the listed matrices (:func:`spectra.interfere_summary.summarise`).

    Raises:
        ResultsFormatError: one line naming the file, the record and the field.
    """
    def typed(where: str, what: str, got: Any) -> None:
        shown = type(got).__name__ if isinstance(got, (dict, list)) and len(str(got)) > 80 else repr(got)[:80]
        raise ResultsFormatError(f"{where} must be {what}. Got {shown} instead", path=path,
                                 hint="this file was not written by spectra interfere or was edited; rerun spectra interfere --out")

    def bad(where: str, value: Any, why: str) -> None:
        impossible(where, value, why, path, rerun="spectra interfere --out")

    def number(where: str, v: Any, lo: float, hi: float, slack: float = _SLACK) -> None:
        if v is None:  # undefined (a task with no direction, NaN written as null)
            return
        if not is_num(v):
            typed(where, "a number or null", v)
        if not lo - slack <= v <= hi * (1 + slack) + slack:
            bad(where, v, "it is not negative" if hi == math.inf else f"it lies from {lo:g} to {hi:g}")

    def listed(where: str, v: Any, size: int | None = None) -> list:
        if not isinstance(v, list) or (size is not None and len(v) != size):
            typed(where, "an array" + (f" of {size} (one per task)" if size is not None else ""), v)
        return v

    def ints(where: str, v: Any, hi: float = math.inf) -> None:
        if not (is_int(v) and 0 <= v <= hi):
            typed(where, "a non-negative integer" + (f" of at most {hi}" if hi < math.inf else ""), v)

    def pairs(where: str, v: Any, lo: float, hi: float, symmetric: bool, *, null: bool = False) -> None:
        if v is None and null:  # a summary matrix with no defined entry
            return
        for s, row in enumerate(listed(where, v, n)):
            for t, x in enumerate(listed(f"{where}[{s}]", row, n)):
                number(f"{where}[{s}][{t}]", x, lo, hi)
        for s in range(n):
            for t in range(s + 1, n) if symmetric else ():
                a, b = v[s][t], v[t][s]
                if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)):
                    bad(f"{where}[{s}][{t}]", a, f"the measure is symmetric: [{t}][{s}] is {b!r}")

    def strings(where: str, v: Any) -> None:
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            typed(where, "an array of strings", v)

    n = len(doc["tasks"])
    for key in ("tasks", "names"):
        strings(key, doc[key])
    if len(set(doc["names"])) < n:  # the writer makes them unique: a pair "a and a" names nothing
        bad("names", doc["names"], "each task has its own name")
    if not (isinstance(doc.get("kinds"), list) and len(doc["kinds"]) == n and all(k in ("lora", "full") for k in doc["kinds"])):
        typed("kinds", f'an array of {n} of "lora" or "full"', doc.get("kinds"))
    strings("warnings", doc.get("warnings") or [])
    for key, fields_ in (("skipped", ("name", "reason")), ("partial", ("name",))):
        for i, x in enumerate(listed(key, doc.get(key) or [])):
            if not (isinstance(x, dict) and all(isinstance(x.get(f), str) for f in fields_)):
                typed(f"{key}[{i}]", "an object with string " + " and ".join(f'"{f}"' for f in fields_), x)
            if key == "partial":
                for j, t in enumerate(listed(f"partial[{i}].tasks", x.get("tasks"))):
                    ints(f"partial[{i}].tasks[{j}]", t, n - 1)
    if "elapsed_s" in doc and not (is_num(doc["elapsed_s"]) and doc["elapsed_s"] >= 0):
        typed("elapsed_s", "a non-negative number", doc["elapsed_s"])
    if "complete" in doc and not isinstance(doc["complete"], bool):  # "no", 0 or null would read as a finished run
        typed("complete", "true or false", doc["complete"])
    seen: set[str] = set()
    for i, m in enumerate(doc["modules"]):
        if not isinstance(m, dict):
            typed(f"modules[{i}]", "an object", m)
        if not isinstance(m.get("name"), str):
            typed(f"modules[{i}].name", "a string", m.get("name"))
        at = f"modules[{i}] ({m['name'][:80]})"
        if m["name"] in seen:  # counted twice in every median and count
            bad(f"{at}.name", m["name"][:80], "each matrix has one record; this name came before")
        seen.add(m["name"])
        _check_module(m, at, n, typed=typed, bad=bad, number=number, listed=listed, ints=ints, pairs=pairs)
    _check_summary(doc, n, typed=typed, bad=bad, number=number, ints=ints, pairs=pairs)


def _check_module(m: dict[str, Any], at: str, n: int, *, typed, bad, number, listed, ints, pairs) -> None:
    """One record of ``modules`` (see :func:`check`)."""
    if m.get("layer") is not None:
        ints(f"{at}.layer", m["layer"])
    for key in ("module", "note"):
        if key in m and not isinstance(m[key], str):
            typed(f"{at}.{key}", "a string", m[key])
    for key in ("out", "in"):
        if key in m and not (is_int(m[key]) and m[key] >= 1):
            typed(f"{at}.{key}", "a positive integer", m[key])
    p = min(m.get("out", math.inf), m.get("in", math.inf))
    for t, r in enumerate(listed(f"{at}.ranks", m.get("ranks"), n)):
        ints(f"{at}.ranks[{t}]", r, p)
    for key in ("fro", "rel_norm"):
        for t, v in enumerate(listed(f"{at}.{key}", m.get(key), n)):
            number(f"{at}.{key}[{t}]", v, 0.0, math.inf)
    for j, t in enumerate(listed(f"{at}.unresolved", m.get("unresolved", []))):
        ints(f"{at}.unresolved[{j}]", t, n - 1)
    for key in ("cosine", "phi", "captured"):
        lo, hi, symmetric = _PAIR[key]
        pairs(f"{at}.{key}", m.get(key), lo, hi, symmetric)
    tsv, knots, acc = (m.get(k) for k in ("tsv", "knots", "sum"))
    for key, v in (("tsv", tsv), ("knots", knots), ("sum", acc)):
        if not isinstance(v, dict):
            typed(f"{at}.{key}", "an object", v)
    pairs(f"{at}.tsv.pairs", tsv.get("pairs"), 0.0, 1.0, True)
    number(f"{at}.tsv.sti", tsv.get("sti"), 0.0, math.inf)
    number(f"{at}.tsv.relative", tsv.get("relative"), 0.0, math.inf)  # the ℓ1 form can pass 1
    number(f"{at}.tsv.relative_fro", tsv.get("relative_fro"), 0.0, 1.0)
    pairs(f"{at}.knots.alignment", knots.get("alignment"), 0.0, 1.0, True)
    ints(f"{at}.knots.rank", knots.get("rank"))
    for key in ("energy_rank", "task_energy_rank"):
        for k, v in _object(f"{at}.knots.{key}", knots.get(key, {}), typed).items():
            ints(f"{at}.knots.{key}[{k!r}]", v)
    for key, hi in (("fro_sq_ratio", n), ("spectral_over_max", n), ("spectral_ratio", 1), ("nuclear_ratio", 1)):
        number(f"{at}.sum.{key}", acc.get(key), 0.0, hi, _RATIO_SLACK)  # ‖Σ‖ ≤ Σ‖·‖ ≤ n max‖·‖
    for key in ("fro", "spectral", "nuclear", "stable_rank", "effective_rank"):
        number(f"{at}.sum.{key}", acc.get(key), 0.0, math.inf)
    for key in ("task_stable_rank", "task_effective_rank", "singular_values"):
        for t, v in enumerate(listed(f"{at}.sum.{key}", acc.get(key, []), None if key == "singular_values" else n)):
            number(f"{at}.sum.{key}[{t}]", v, 0.0, math.inf)
    for k, v in _object(f"{at}.sum.energy_rank", acc.get("energy_rank", {}), typed).items():
        ints(f"{at}.sum.energy_rank[{k!r}]", v, p)
    for k, v in _object(f"{at}.sum.task_energy_rank", acc.get("task_energy_rank", {}), typed).items():
        for t, r in enumerate(listed(f"{at}.sum.task_energy_rank[{k!r}]", v, n)):
            ints(f"{at}.sum.task_energy_rank[{k!r}][{t}]", r, p)


def _check_summary(doc: dict[str, Any], n: int, *, typed, bad, number, ints, pairs) -> None:
    """``summary``: in range, and the medians :func:`spectra.interfere_summary.summarise` takes of ``modules``
    (the findings state it: a summary over matrices the file does not hold reads as theirs)."""
    s = doc.get("summary")
    if s is None:
        s = {}
    if not isinstance(s, dict):
        typed("summary", "an object", s)
    count = len(doc["modules"])
    if "modules" in s:
        ints("summary.modules", s["modules"])
        if s["modules"] != count:
            bad("summary.modules", s["modules"], f"the file lists {count} matrices in modules")
    for key, (lo, hi, symmetric) in _PAIR.items():
        if key in s:
            pairs(f"summary.{key}", s[key], lo, hi, symmetric, null=True)
    if s.get("pair_modules") is not None:
        pairs("summary.pair_modules", s["pair_modules"], 0, count, True)
        for i, row in enumerate(s["pair_modules"]):
            for j, v in enumerate(row):
                ints(f"summary.pair_modules[{i}][{j}]", v, count)
    for key, hi, slack in (("tsv_relative", math.inf, _SLACK), ("tsv_relative_fro", 1, _SLACK), ("spectral_over_max", n, _RATIO_SLACK),
                           ("fro_sq_ratio", n, _RATIO_SLACK), ("nuclear_ratio", 1, _RATIO_SLACK)):
        number(f"summary.{key}", s.get(key), 0.0, hi, slack)
    if not count and s:  # the writer's summary of no matrices is {}: these medians are of matrices not listed
        bad("summary", "…", "the file lists no matrices in modules to take medians over")
    if count and not s:
        return  # no summary written: the findings say nothing of one
    want = summarise(doc["modules"])
    for key, value in s.items():
        if key not in want:
            continue
        for where, got, exp in _cells(f"summary.{key}", value, want[key]):
            if (got is None) != (exp is None) or (got is not None and not math.isclose(got, exp, rel_tol=1e-9, abs_tol=1e-12)):
                bad(where, got, f"it is the median over the {count} listed matrices ({'null' if exp is None else f'{exp:.6g}'})")


def _cells(where: str, got: Any, want: Any) -> list[tuple[str, Any, Any]]:
    """``(where, got, want)`` of each number of a summary entry and of its recomputed value, element by element."""
    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
        return [c for i, (g, w) in enumerate(zip(got, want)) for c in _cells(f"{where}[{i}]", g, w)]
    return [(where, got, want)]


def _object(where: str, v: Any, typed) -> dict:
    if not isinstance(v, dict):
        typed(where, "an object", v)
    return v


def title(path: Path, doc: dict) -> str:
    d = load(path, doc)
    return f"interfere: {', '.join(d['names'])}"


def _pairs(d: dict, key: str) -> list[tuple[float, int, int]]:
    m = (d.get("summary") or {}).get(key)
    if not m:
        return []
    n = len(d["names"])
    return sorted((m[s][t], s, t) for s in range(n) for t in range(s + 1, n) if m[s][t] is not None)


def _cosine_chance(d: dict) -> tuple[int, str] | None:
    """``(out·in, "out × in")`` of the median matrix compared (the lower middle one of an even count), whose
    1/√(out·in) is the standard deviation of the cosine of two independent random updates of it; None for an
    ``interfere.json`` whose modules do not list ``out`` and ``in``."""
    shapes = sorted((m["out"] * m["in"], f"{m['out']} × {m['in']}") for m in d["modules"]
                    if is_int(m.get("out")) and is_int(m.get("in")))
    return shapes[(len(shapes) - 1) // 2] if shapes else None


def _phi_random(d: dict, a: int, b: int) -> float | None:
    """φ's random baseline for tasks a, b: max(k_a, k_b)/d (``ranks`` the top-k kept, d = ``in`` for the right
    singular vectors, ``out`` for the left), the median over the matrices where their φ is defined, as the
    summary's φ is; None without shapes."""
    dim = "out" if (d.get("config") or {}).get("side") == "left" else "in"
    vals = [max(m["ranks"][a], m["ranks"][b]) / m[dim] for m in d["modules"] if m["phi"][a][b] is not None and is_int(m.get(dim))]
    return statistics.median(vals) if vals else None


#: √(π/2): the standard deviation of the median of m independent standard normals is about this / √m.
MEDIAN_SD = math.sqrt(math.pi / 2)


def _at_chance(d: dict, a: int, b: int) -> bool | None:
    """Whether tasks a, b's cosines are what unrelated updates give: each matrix's cosine times √(out·in) is about a
    standard normal for independent random updates, and the median of m of them lies within 3·√(π/2)/√m of 0 (a
    median over many matrices is far tighter than one matrix's 1/√(out·in): consistent small cosines are no
    chance); None without shapes."""
    zs = [m["cosine"][a][b] * math.sqrt(m["out"] * m["in"]) for m in d["modules"]
          if m["cosine"][a][b] is not None and is_int(m.get("out")) and is_int(m.get("in"))]
    return abs(statistics.median(zs)) < 3 * MEDIAN_SD / math.sqrt(len(zs)) if zs else None


def findings(path: Path, doc: dict) -> list[Finding]:
    """The most and least overlapping pairs, and what summing all the updates does, in words."""
    d = load(path, doc)
    s = d.get("summary") or {}
    out: list[Finding] = []
    names = d["names"]
    if d.get("complete") is False:  # the writer saves only finished runs: an edited or foreign file, said first
        out.append(Finding("incomplete", f"This run did not finish (complete: false): the numbers cover only the "
                                         f"{matrices(len(d['modules']))} its interfere.json holds; spectra interfere … "
                                         "--resume completes it from interfere.jsonl.", warning=True))
    cos, phi = _pairs(d, "cosine"), (s.get("phi") or [])

    def phi_of(a: int, b: int) -> str:
        # φ is null where a task has no resolved direction (zero, or rounding-level updates), the cosine is not
        v = phi[a][b] if a < len(phi) and b < len(phi[a]) else None
        return "undefined (no resolved direction)" if v is None else f"{v:.2f}"

    counts = s.get("pair_modules")  # interfere.json before the per-pair counts: every pair over all modules

    def over(a: int, b: int) -> str:
        k = counts[a][b] if counts else s.get("modules")
        return f"over {matrices(k)}" + (f" of {s.get('modules')}" if counts and k != s.get("modules") else "")

    level = _cosine_chance(d)
    sd = 1 / math.sqrt(level[0]) if level else None

    left = (d.get("config") or {}).get("side") == "left"

    def phi_vs(a: int, b: int) -> str:  # φ beside its random-subspace baseline for the pair (and its side, if not the default)
        base = _phi_random(d, a, b)
        said = phi_of(a, b)
        return said + (f" against {base:.2f} for random subspaces" if base is not None and said[0].isdigit() else "") + \
            (" on the output side" if left and said[0].isdigit() else "")

    # the cosine of two independent random updates of out·in entries has mean 0 and standard deviation
    # 1/√(out·in); a pair is at chance when its scaled cosines' median is (_at_chance): a ranking of such pairs ranks noise
    unit = f"1/√(out·in) = {sd:.3f} for the median matrix, {level[1]}" if level else ""
    alike = bool(cos) and all(_at_chance(d, a, b) for _, a, b in cos)
    test = ("each pair's cosines scaled by √(out·in) have a median within 3 standard deviations (√(π/2)/√m over m "
            "matrices) of unrelated updates'")
    nums = {"cosine": [cos[0][0], cos[-1][0]] if cos else [], "cosine_chance_sd": sd,
            "phi_random": {f"{names[a]} | {names[b]}": _phi_random(d, a, b) for _, a, b in cos}}
    if len(cos) == 1:  # two fine-tunes: one pair, neither "most" nor "least" alike
        (v, a, b), = cos
        verdict = (f"; the cosines are within chance: unrelated updates give one matrix's cosine a standard deviation of "
                   f"{unit}, and {test.replace('each pair', 'the pair')}" if alike else
                   f"; unrelated updates give cosines of standard deviation {unit}" if level else "")
        out.append(Finding("modules", f"{names[a]} and {names[b]}: median cosine {v:.2f}, φ {phi_vs(a, b)}, "
                                      f"{over(a, b)}{verdict}.", numbers=nums))
    elif alike:
        (lo, a, b), (hi, c, e) = cos[0], cos[-1]
        text = (f"No pair stands out from unrelated updates: one matrix's cosine of two independent random updates has "
                f"standard deviation {unit}, and {test}; the median cosines run from {lo:.3f} ({names[a]} and "
                f"{names[b]}) to {hi:.3f} ({names[c]} and {names[e]})")
        defined = [(phi[x][y], x, y) for _, x, y in cos if x < len(phi) and y < len(phi[x]) and phi[x][y] is not None]
        if defined:
            _, x, y = max(defined)
            text += f"; the highest φ is {names[x]} and {names[y]}'s, {phi_vs(x, y)}"
        out.append(Finding("modules", text + ".", numbers=nums))
    elif cos:
        (lo, a, b), (hi, c, e) = cos[0], cos[-1]
        chance = f"; unrelated updates give cosines of standard deviation {unit}" if level else ""
        # the most alike pair may be at chance where another pair stands out by pulling the other way
        most = (f"No pair is more alike than unrelated updates (the highest median cosine, {hi:.3f}, is {names[c]} and "
                f"{names[e]}'s, within chance: {test})" if _at_chance(d, c, e) and level else
                f"Most alike: {names[c]} and {names[e]} (median cosine {hi:.2f}, φ {phi_vs(c, e)}, {over(c, e)})")
        if lo < 0 and not _at_chance(d, a, b):
            least = f"{names[a]} and {names[b]} pull against each other (median cosine {lo:.2f}, φ {phi_vs(a, b)}, {over(a, b)})"
            if lo <= -0.99:  # opposite directions cancel in a sum only as far as the norms agree
                size = statistics.median([min(m["fro"][a], m["fro"][b]) / max(m["fro"][a], m["fro"][b]) for m in d["modules"]
                                          if m["fro"][a] and m["fro"][b]] or [0.0])
                least += (": opposite updates in one shared subspace, which cancel in a sum" if size >= 0.99 else
                          f": opposite updates in one shared subspace, which partly cancel in a sum (the smaller's norm is a "
                          f"median {size:.2f} of the larger's)")
        else:
            least = f"least: {names[a]} and {names[b]} (cosine {lo:.2f}, φ {phi_vs(a, b)}, {over(a, b)})"
        out.append(Finding("modules", f"{most}; {least}{chance}.", numbers=nums))
    cancelled = [m for m in d["modules"] if CANCEL_NOTE in (m.get("note") or "")]  # measure_module's verdicts
    if cancelled:
        where = "every matrix" if len(cancelled) == len(d["modules"]) else f"{len(cancelled)} of {matrices(len(d['modules']))}"
        out.append(Finding("size", f"Adding the {len(names)} updates (task arithmetic) cancels them in {where} (e.g. "
                                   f"{cancelled[0]['name']}: its note says how far): the sum is at the rounding level there.",
                           numbers={"cancelled": len(cancelled)}))
    if s.get("spectral_over_max") is not None and len(cancelled) < len(d["modules"]):  # the ratios of a sum that is there
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
           (f"<p>base: {esc(d.get('base'))} · {matrices(len(d['modules']))} every task holds · top-k = "
           f"{esc((d.get('config') or {}).get('top_k'))} · results: {esc(path)}</p>"),
           table(["#", "name", "kind", "path"], [[i, names[i], d["kinds"][i], d["tasks"][i]] for i in range(n)])]
    figs = interfere_plots.interfere_figures(d)
    side = "output side (--side left)" if (d.get("config") or {}).get("side") == "left" else "input side"
    texts = {
        "cosine": "Cosine of the flattened updates, median over matrices: how much two fine-tunes push the weights the "
                  "same way. Near 0 is typical of unrelated tasks (two independent random updates of an out × in matrix give "
                  "cosines of standard deviation 1/√(out·in)); negative values mean they pull against each other.",
        "phi": f"How much the top-k singular directions ({side}) of two updates overlap: 1 when one contains the other, "
               "about max(k)/d for random directions.",
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
