"""What a diff says, in words: the findings block that ends ``spectra diff``'s output and opens the
report, each statement with the numbers behind it.

Pure functions of a :class:`~spectra.results.DiffResult` (no I/O, no printing): how low-rank the
update is against a random matrix of the same shapes, per module kind and along the depth of the
stack; how big it is next to the weights; for a LoRA adapter, how much of its rank r the update
uses; and every caveat that changes how those numbers read (numerical notes, zero updates,
skipped tensors). The metrics are defined in docs/definitions.md.

Example:
    >>> res = spectra.DiffResult.load("reports/demo/diff_full")       # doctest: +SKIP
    >>> for f in diff_findings(res):                                  # doctest: +SKIP
    ...     print(f.text)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from spectra.display import display_name, matrices, oversized_words, range_text, tau_percent
from spectra.metrics import oversized_update, threshold_key
from spectra.pairing_notes import RESIZED_NOTE
from spectra.results import DiffResult, ModuleResult, caveat_groups, caveat_sentence
from spectra.roles import role_sort_key

#: How a median ratio (rank needed ÷ the random baseline of the same shape) is put in words.
#: Upper bounds, checked in order; the last word applies above the last bound.
RANK_WORDS: tuple[tuple[float, str], ...] = (
    (0.25, "strongly low-rank"),
    (0.6, "low-rank"),
    (0.9, "somewhat low-rank"),
)
NOT_LOW_RANK = "about as spread out as random noise (not low-rank)"
#: At most this many module kinds are listed one by one; beyond it, the two lowest and two highest.
MAX_KINDS_LISTED = 12


@dataclass(frozen=True)
class Finding:
    """One statement of a findings block.

    Attributes:
        topic: ``"rank"`` (against random), ``"modules"`` (per module kind), ``"depth"`` (along the
            layers), ``"size"`` (relative norm), ``"adapter"`` (use of the LoRA rank r), ``"caveat"``
            (a numerical caveat), ``"zero"`` (updates that are exactly zero), ``"skipped"``,
            ``"nonfinite"``, ``"incomplete"``; compare's findings add ``"unresolved"`` (updates all at the
            rounding level of their stored weights) among their own.
        text: one or two sentences in words, with the numbers.
        warning: True for caveats: shown as warnings (CLI ``warning:`` lines, the report's first screen).
        numbers: the numbers behind ``text`` (medians, ranges, counts), for scripts and tests.
    """

    topic: str
    text: str
    warning: bool = False
    numbers: dict[str, Any] = field(default_factory=dict)


def rank_words(ratio: float) -> str:
    """Words for a median ratio of the rank needed to the random baseline (:data:`RANK_WORDS`).

    >>> rank_words(0.2), rank_words(0.95)
    ('strongly low-rank', 'about as spread out as random noise (not low-rank)')
    """
    for bound, words in RANK_WORDS:
        if ratio < bound:
            return words
    return NOT_LOW_RANK


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _fmt(x: float) -> str:
    """Two decimals from 0.1 to 100, else two significant digits (0.0128 read "0.01" beside a minimum of "0.0092").

    >>> _fmt(0.1525), _fmt(0.0128), _fmt(0.0092), _fmt(98.84), _fmt(1234.0)
    ('0.15', '0.013', '0.0092', '98.84', '1.2e+03')
    """
    return f"{x:.2f}" if 0.1 <= abs(x) < 100 else f"{x:.2g}"


def percent(x: float) -> str:
    """A share as a percentage, two significant digits below 10%, whole percents above (never an
    exponent: 0.9999 gave '1e+02%').

    Shares at float64 rounding of 1 (below 1e-12) read 0%, others below 0.01% "<0.01%": a share of 1.5e-32
    (two orthogonal updates) read "1.5e-30%".

    >>> percent(0.1325), percent(0.0042), percent(0.9999), percent(1.5), percent(1.5e-32), percent(3e-7)
    ('13%', '0.42%', '100%', '150%', '0%', '<0.01%')
    """
    v = x * 100
    if abs(x) < ROUNDING_SHOWN:
        return "0%"
    if abs(v) < 0.01:
        return "<0.01%"
    return f"{v:.2g}%" if abs(v) < 10 else f"{v:.0f}%"


#: Measures in [0, 1] (φ, shares) below this are float64 rounding of sums of O(1) terms: shown as 0.
ROUNDING_SHOWN = 1e-12


def shown(x: float) -> str:
    """A measure of order 1 to three significant digits, 0 below :data:`ROUNDING_SHOWN` (φ 6.22e-32 was printed).

    >>> shown(0.12345), shown(6.2e-32), shown(2.0)
    ('0.123', '0', '2')
    """
    return "0" if abs(x) < ROUNDING_SHOWN else f"{x:.3g}"


def analysed(result: DiffResult) -> list[ModuleResult]:
    """The matrices the rank statements are about: nonzero updates of nonempty matrices whose
    spectrum is not rounding noise (``rounding_level`` caveat)."""
    return [m for m in result.modules if m.p and m.fro_norm and "rounding_level" not in m.caveats]


#: |Δα| over the fits' combined standard error above which fine-tuning counts as having moved α
MOVED_Z = 2.0


def esd_points(modules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per matrix of a ``spectra diff --esd`` result (its ``modules`` as dicts): name, layer,
    module, role, α and σ_α of W_base and W_tuned, α of ΔW, Δα and its z, and the warnings of both sides."""
    pts = []
    for m in modules:
        e = m.get("esd")
        if not e:
            continue
        base, tuned, delta = e.get("base") or {}, e.get("tuned") or {}, e.get("delta") or {}
        pts.append({"name": m["name"], "layer": m.get("layer"), "module": m["module"], "role": m.get("role"),
                    "alpha_base": base.get("alpha"), "alpha_tuned": tuned.get("alpha"), "sigma_base": base.get("sigma"),
                    "sigma_tuned": tuned.get("sigma"), "alpha_delta": delta.get("alpha"), "change": e.get("alpha_change"),
                    "z": e.get("alpha_change_z"), "warning_base": base.get("warning", ""), "warning_tuned": tuned.get("warning", "")})
    return pts


def alpha_findings(modules: list[dict[str, Any]]) -> list[Finding]:
    """What a ``spectra diff --esd`` result says about α, in words (empty without ESD entries): how many
    matrices fine-tuning moved beyond :data:`MOVED_Z` standard errors, the median change, flags that changed;
    over the matrices it changed (an unchanged one's Δα is 0 by construction: counted, it would pull the median
    to 0 while the findings above leave those matrices out)."""
    unchanged = {m["name"] for m in modules if m.get("fro_norm") == 0}
    pts = [p for p in esd_points(modules) if p["change"] is not None and p["name"] not in unchanged]
    if not pts:
        return []
    moved = [p for p in pts if p["z"] is not None and abs(p["z"]) > MOVED_Z]
    med = statistics.median(p["change"] for p in pts)
    flipped = sum(p["warning_base"] != p["warning_tuned"] for p in pts)
    return [Finding("alpha", f"Fine-tuning moved α by more than {MOVED_Z:g} standard errors in {len(moved)} of {len(pts)} "
                             f"{'changed ' if unchanged else ''}matrices (median Δα {med:+.3f}); {flipped} "
                             "changed their over/under-trained flag.",
                    numbers={"moved": len(moved), "matrices": len(pts), "median_change": med, "flag_changed": flipped})]


def diff_findings(result: DiffResult, threshold: float | None = None) -> list[Finding]:
    """The findings of one diff, warnings first (see the module docstring).

    Args:
        result: a finished (or loaded) diff.
        threshold: τ of the rank statements; default :attr:`DiffResult.headline_threshold` (0.9).

    Returns:
        Findings in reading order: warnings (caveats, zero updates, NaN/Inf, an incomplete run),
        then rank against random, per module kind, along the depth, the adapter's use of r, the size,
        and what was skipped. Empty when the result holds no matrix.
    """
    tau = result.headline_threshold if threshold is None else threshold
    k = threshold_key(tau)
    out = [*_warnings(result)]
    ms = [m for m in analysed(result) if k in m.energy_rank]
    noise = [m for m in result.modules if m.fro_norm and "rounding_level" in m.caveats]
    if not ms and noise:
        out.append(Finding("rank", f"No statement on rank: every updated matrix ({len(noise)}) is at the rounding level of "
                           "its storage dtype, so its spectrum is not resolved from rounding noise (see the warning).",
                           numbers={"matrices": 0, "rounding_level": len(noise)}))
    elif noise:
        out.append(Finding("rank", f"The statements on rank below leave out the {matrices(len(noise))} at the rounding "
                           "level (see the warning).", numbers={"rounding_level": len(noise)}))
    if ms:
        out.append(_rank_finding(ms, k, tau))
        kinds = _kinds_finding(ms, k)
        if kinds:
            out.append(kinds)
        depth = _depth_finding(ms, k)
        if depth:
            out.append(depth)
        lora = [m for m in ms if m.lora_r]
        if lora and (result.adapter or {}).get("use_dora"):
            out.append(_dora_finding(lora, k, tau))
        elif lora:
            out.append(_adapter_finding(lora, k, tau))
    size = _size_finding([m for m in result.modules if m.fro_norm])
    if size:
        out.append(size)
    out += alpha_findings([{"name": m.name, "layer": m.layer, "module": m.module, "role": m.role, "esd": m.esd,
                            "fro_norm": m.fro_norm} for m in result.modules if m.esd])
    skipped = skipped_finding(result)
    if skipped:
        out.append(skipped)
    return out


#: The share of what was left out (skipped weight matrices and unpaired tensors) from which a warning says
#: the findings cover only the analysed matrices (a single matrix with NaN is one warning line already).
COVERAGE_SHARE = 0.1


def _warnings(result: DiffResult) -> list[Finding]:
    out = []
    if not result.complete:
        n = len(result.modules)
        # results.json is rewritten every few seconds; the journal beside it (results.jsonl) holds every result
        out.append(Finding("incomplete", "This run did not finish (complete: false): the numbers cover only the "
                           f"{matrices(n)} results.json held when it was last saved (results.jsonl "
                           "beside it journals every one finished); spectra diff … --resume completes it.", warning=True))
    for code, hit in caveat_groups(result.modules):
        out.append(Finding("caveat", caveat_sentence(code, hit, len(result.modules)) + ".", warning=True,
                           numbers={"code": code, "matrices": len(hit)}))
    nonempty = [m for m in result.modules if m.p]  # an empty (p = 0) matrix has no update to speak of
    zero = [m for m in nonempty if m.fro_norm == 0]
    left_out = result.not_compared()
    if zero and len(zero) == len(nonempty) and left_out:  # what changed may be what was not compared
        out.append(Finding("zero", f"Every one of the {len(zero)} analysed ΔW is exactly zero, but {left_out}, and are not "
                           "compared (see the warnings): the change, if any, is not in these results.", warning=True,
                           numbers={"matrices": len(zero), "unpaired": result.unpaired,
                                    "skipped_matrices": len(result.skipped_matrices())}))
    elif zero and len(zero) == len(nonempty):
        out.append(Finding("zero", f"Every one of the {len(zero)} analysed ΔW is exactly zero: base and tuned hold the "
                           "same weights (check that the fine-tuned checkpoint was passed).", warning=True,
                           numbers={"matrices": len(zero)}))
    elif zero:
        # a resized table unchanged over the rows both hold: its new rows are not measured, not "not changed"
        names = ", ".join(display_name(m.name, 60) + (" (over the rows both hold; the rows one side alone holds are not "
                                                      "measured)" if RESIZED_NOTE in (m.note or "") else "")
                          for m in zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
        out.append(Finding("zero", f"{len(zero)} of {len(nonempty)} matrices were not changed at all (ΔW = 0: "
                           f"frozen or not trained): {names}. They are left out of the statements below.", warning=True,
                           numbers={"matrices": len(zero)}))
    n_out = len(result.skipped_matrices()) + result.unpaired_weights()
    if (n_out and not (zero and len(zero) == len(nonempty)) and n_out >= COVERAGE_SHARE * (n_out + len(result.modules))
            and (left_out := result.not_compared())):
        # statements about "the update" from a few matrices while most were left out (a quantised checkpoint)
        out.append(Finding("coverage", f"{left_out}, and are not compared: the findings cover the "
                           f"{matrices(len(result.modules))} analysed only.", warning=True,
                           numbers={"skipped_matrices": len(result.skipped_matrices()), "unpaired": result.unpaired,
                                    "analysed": len(result.modules)}))
    # over the changed matrices, as the size finding's median: frozen layers (ΔW = 0) must not hide it
    rels = [m.rel_norm for m in nonempty if m.fro_norm and m.rel_norm is not None and math.isfinite(m.rel_norm)]
    median_rel = statistics.median(rels) if rels else 0.0
    if big := oversized_update(rels):  # a fine-tune moves weights by a fraction of their norm
        words = oversized_words(big)
        out.append(Finding("unrelated", words[0].upper() + words[1:] + ("" if big[1] else " (Two independent "
                           "initialisations of one architecture give about √2 ≈ 1.4.)"), warning=True,
                           numbers={"median_rel_norm": median_rel}))
    elif far := sorted((m for m in nonempty if m.rel_norm is not None and m.rel_norm >= 1.0), key=lambda m: -m.rel_norm):
        # a few matrices as far from their base as unrelated weights, hidden by the median (a layer removed on one side)
        layers = sorted({m.layer for m in far if m.layer is not None})
        shown = ", ".join(map(str, layers[:6])) + (", …" if len(layers) > 6 else "")
        outside = sum(m.layer is None for m in far)  # the example (the largest) may be one of them: an embedding
        where = (f" (in layer{'s' if len(layers) > 1 else ''} {shown}" + (f", and {outside} outside the layer stack" if outside else "")
                 + ")" if layers else "")
        out.append(Finding("unrelated", f"{len(far)} of {len(nonempty)} matrices moved by their own norm or more{where}: "
                           f"‖ΔW‖_F / ‖W_base‖_F up to {far[0].rel_norm:.2f} (e.g. {display_name(far[0].name, 60)}), where "
                           f"the median is {median_rel:.2f}. A fine-tune moves a matrix by a fraction of its norm; two "
                           "independent initialisations give about √2 ≈ 1.4: was a layer or expert removed, inserted or "
                           "re-initialised on one side (both pair by their number), or is the base matrix near zero "
                           "(a zero-initialised gate)?", warning=True,
                           numbers={"matrices": len(far), "max_rel_norm": far[0].rel_norm, "median_rel_norm": median_rel}))
    bad = result.non_finite()
    if bad:
        out.append(Finding("nonfinite", f"{len(bad)} value(s) are NaN or infinite ({', '.join(bad[:3])}"
                           f"{' …' if len(bad) > 3 else ''}): JSON output writes them as null.", warning=True,
                           numbers={"values": len(bad)}))
    return out


def _rank_finding(ms: list[ModuleResult], k: str, tau: float) -> Finding:
    fr = [m.energy_rank_frac.get(k, m.energy_rank[k] / m.p) for m in ms]
    rnd = [m.random_frac(k) for m in ms]
    ratio = _median([f / r for f, r in zip(fr, rnd, strict=True) if r > 0] or [0.0])
    med_rank, med_p = _median([m.energy_rank[k] for m in ms]), _median([m.p for m in ms])
    words = rank_words(ratio)
    lo, hi = min(rnd), max(rnd)
    rnd_text = f"{_fmt(lo)}" if abs(hi - lo) < 0.005 else f"{_fmt(lo)}–{_fmt(hi)} (by shape)"
    times = f", {1 / ratio:.1f}× fewer directions than noise" if 0 < ratio < 0.9 else ""
    caveated = sum(bool(m.caveats) for m in ms)  # e.g. bf16 against fp32: their ranks at high τ measure the rounding
    ps = {m.p for m in ms}
    # one p: the median rank and its fraction of p describe the same matrix; several: the three medians are of
    # different matrices, so the fraction leads and the rank and p are said as ranges' medians
    needs = (f"the median matrix needs {med_rank:g} of its p = {med_p:g} directions ({_fmt(_median(fr))} of p)" if len(ps) == 1
             else f"the matrices need a median {_fmt(_median(fr))} of their p directions (median rank {med_rank:g}; "
                  f"p from {min(ps)} to {max(ps)})")
    text = (f"The update is {words}: {needs} for {tau_percent(tau)} of ΔW's energy, where a random matrix of the same shape "
            f"needs {rnd_text} of p{times}"
            + (f" ({'all' if caveated == len(ms) else caveated} of these {len(ms)} matrices carry a numerical caveat: see "
               "the warnings)." if caveated else "."))
    return Finding("rank", text, numbers={"median_rank": med_rank, "median_p": med_p, "median_frac": _median(fr),
                                          "random_frac_min": lo, "random_frac_max": hi, "median_ratio_to_random": ratio,
                                          "matrices": len(ms)})


def _kinds_finding(ms: list[ModuleResult], k: str) -> Finding | None:
    groups: dict[str, list[ModuleResult]] = {}
    for m in ms:
        groups.setdefault(m.module, []).append(m)
    if len(groups) < 2:
        return None
    rows = sorted(((kind, _median([m.energy_rank_frac.get(k, 0.0) for m in g]), _median([m.random_frac(k) for m in g]))
                   for kind, g in groups.items()), key=lambda r: role_sort_key(groups[r[0]][0].role, r[0]))
    by_value = sorted(rows, key=lambda r: r[1])
    shown = rows if len(rows) <= MAX_KINDS_LISTED else by_value[:2] + by_value[-2:]
    listed = ", ".join(f"{display_name(kind, 40)} {_fmt(f)} ({_fmt(r)})" for kind, f, r in shown)
    above = [kind for kind, f, r in rows if f >= 0.9 * r]
    tail = (f"; near or above random: {_kinds_text(above)}" if above  # 1500 kinds listed whole: an 11 KB bullet
            else "; every kind is below its random baseline")
    lo, hi = by_value[0], by_value[-1]
    # every kind shown with the extreme's value is named (gate_proj and up_proj at 0.59 both), in the table's order
    lows, highs = ([kind for kind, f, _r in rows if _fmt(f) == _fmt(x[1])] for x in (lo, hi))
    spread = ("about the same in every kind" if hi[1] - lo[1] < 0.1 * max(hi[1], 1e-12) + 0.005 or set(lows) & set(highs)
              else f"lowest in {_kinds_text(lows)}, highest in {_kinds_text(highs)}")
    text = f"By module kind (median rank needed ÷ p, random in brackets): {listed}; {spread}{tail}."
    return Finding("modules", text, numbers={kind: {"median_frac": f, "random_frac": r} for kind, f, r in rows})


def _stack(m: ModuleResult) -> str:
    """The layer stack a matrix is in: its name before the layer index (``encoder.block`` of T5's
    ``encoder.block.2.layer.0.SelfAttention.q.weight``; ``model.layers`` of a decoder-only model)."""
    head, sep, _ = m.name.partition(f".{m.layer}.")
    return head if sep else ""


def _depth_finding(ms: list[ModuleResult], k: str) -> Finding | None:
    """How the rank needed changes along the depth; with several stacks of layers (an encoder and a decoder, a
    vision tower beside a language model), one clause per stack: their layer numbers are each stack's own, and
    pooled, the stack with more matrices per layer hid the other's opposite trend."""
    stacks: dict[str, list[ModuleResult]] = {}
    for m in ms:
        if m.layer is not None:
            stacks.setdefault(_stack(m), []).append(m)
    if len(stacks) < 2:
        one = _stack_depth(ms, k)
        return None if one is None else Finding("depth", one[0], numbers=one[2])
    # a stack of one layer is named too (T5's encoder changed in one layer beside a decoder changed in two was left out)
    found = {name: d for name, group in sorted(stacks.items()) if (d := _stack_depth(group, k, one=True)) is not None}
    if not found:
        return None
    text = ("Along the depth, per stack of layers (median rank needed ÷ p, each stack numbering its own layers): "
            + "; ".join(f"{name}: {clause}" for name, (_, clause, _) in found.items()) + ".")
    return Finding("depth", text, numbers={"stacks": {name: numbers for name, (_, _, numbers) in found.items()}})


def _stack_depth(ms: list[ModuleResult], k: str, *, one: bool = False) -> tuple[str, str, dict] | None:
    """``(sentence, clause, numbers)`` of the rank needed along one stack's layers: the sentence for a model of one
    stack, the clause for one of several (no semicolons inside); None with fewer than two layers (one, with ``one``)."""
    per_layer: dict[int, list[float]] = {}
    for m in ms:
        if m.layer is not None:
            per_layer.setdefault(m.layer, []).append(m.energy_rank_frac.get(k, 0.0))
    if len(per_layer) < (1 if one else 2):
        return None
    layers = sorted(per_layer)
    med = {lay: _median(v) for lay, v in per_layer.items()}
    hi = max(layers, key=lambda lay: (med[lay], -lay))
    lo = min(layers, key=lambda lay: (med[lay], lay))
    if len(layers) < 6:
        listed = ("only " if len(layers) == 1 else "") + ", ".join(f"layer {lay} {_fmt(med[lay])}" for lay in layers)
        text, clause = f"Along the depth (median rank needed ÷ p per layer): {listed}.", listed
        thirds = None
    else:
        n = len(layers)
        parts = [layers[: n // 3], layers[n // 3 : n - n // 3], layers[n - n // 3 :]]
        thirds = [_median([x for lay in part for x in per_layer[lay]]) for part in parts]
        span = [f"{p[0]}–{p[-1]}" for p in parts]
        trend = ("rises with depth" if thirds[2] > 1.15 * thirds[0] else
                 "falls with depth" if thirds[2] < thirds[0] / 1.15 else "is about the same at every depth")
        extremes = (f"the same in every layer ({_fmt(med[hi])})" if med[hi] == med[lo]  # not "highest in 0, lowest in 0"
                    else f"highest in layer {hi} ({_fmt(med[hi])}), lowest in layer {lo} ({_fmt(med[lo])})")
        thirds_text = f"{_fmt(thirds[0])} of p in layers {span[0]}, {_fmt(thirds[1])} in {span[1]}, {_fmt(thirds[2])} in {span[2]}"
        text = f"Along the depth, the rank needed {trend}: {thirds_text}; {extremes}."
        clause = f"the rank needed {trend} ({thirds_text}), {extremes}"
    return text, clause, {"per_layer": med, "thirds": thirds, "highest_layer": hi, "lowest_layer": lo}


def _dora_finding(ms: list[ModuleResult], k: str, tau: float) -> Finding:
    """A DoRA update, m ⊙ column-normalised (W + sBA) − W, is dense: "k of r ranks used" would read it
    against a bound it does not have."""
    rs = sorted({m.lora_r for m in ms})
    used = _median([m.energy_rank[k] for m in ms])
    return Finding("adapter", f"DoRA (r = {range_text((rs[0], rs[-1]))}): each update is dense (the magnitude vector rescales "
                   f"every column of W), so its rank is not bounded by r: a median {used:g} ranks for {tau_percent(tau)} of its "
                   "energy, of which s·B·A spans at most r.", numbers={"r": rs, "median_used": used})


def _adapter_finding(ms: list[ModuleResult], k: str, tau: float) -> Finding:
    used = [m.energy_rank[k] for m in ms]
    rs = sorted({m.lora_r for m in ms})
    eff = [m.effective_rank for m in ms if m.effective_rank is not None]
    # a matrix holds at most p = min(out, in) directions: an r above p is measured against p
    shares = [m.energy_rank[k] / m.lora_capacity for m in ms]
    wide = [m for m in ms if m.lora_r > m.p]
    of = "min(r, p)" if wide else "r"
    if len(rs) == 1 and not wide:
        r = rs[0]
        text = (f"LoRA r = {r}: {_median(used):g} of {r} ranks used (median over {matrices(len(ms))}; from {min(used)} to "
                f"{max(used)}) for {tau_percent(tau)} of each update's energy"
                + (f"; effective rank {_fmt(_median(eff))} of {r}." if eff else "."))
    elif len(rs) == 1:
        e = wide[0]
        text = (f"LoRA r = {rs[0]}, above min(out, in) = p in {matrices(len(wide))} (e.g. {display_name(e.module, 40)}, p = {e.p}: "
                f"at most p directions): the updates use a median {_median(shares):.0%} of min(r, p) ({_median(used):g} ranks; "
                f"from {min(used)} to {max(used)}) for {tau_percent(tau)} of their energy"
                + (f"; effective rank {_fmt(_median(eff))}." if eff else "."))
    else:
        per = []
        for r in rs:
            u = [m.energy_rank[k] for m in ms if m.lora_r == r]
            per.append(f"r = {r}: {_median(u):g} of {r} used ({matrices(len(u))})")
        text = (f"LoRA with ranks {rs[0]}–{rs[-1]} (rank_pattern): the updates use a median {_median(shares):.0%} of their {of} "
                f"for {tau_percent(tau)} of their energy; " + "; ".join(per) + "."
                + (f" r exceeds p = min(out, in) in {matrices(len(wide))}: those hold at most p directions." if wide else ""))
    if all(u < m.lora_capacity for u, m in zip(used, ms)):
        text += f" No matrix needs all of its {of} for {tau_percent(tau)} of its energy."
    # median_share_of_r: of min(r, p), the most ranks a matrix can use
    return Finding("adapter", text, numbers={"r": rs, "median_used": _median(used), "min_used": min(used), "max_used": max(used),
                                             "median_share_of_r": _median(shares), "r_above_p": len(wide)})


def _size_finding(ms: list[ModuleResult]) -> Finding | None:
    rel = [m for m in ms if m.rel_norm is not None]
    if not ms:
        return None
    if not rel:
        fro = [m.fro_norm for m in ms]
        return Finding("size", f"Size: ‖ΔW‖_F has median {_fmt(_median(fro))} (from {_fmt(min(fro))} to {_fmt(max(fro))}); "
                       "without the base weights there is no relative size (pass BASE for ‖ΔW‖_F / ‖W_base‖_F).",
                       numbers={"median_fro": _median(fro)})
    vals = [m.rel_norm for m in rel]
    top = max(rel, key=lambda m: m.rel_norm)
    where = f"{display_name(top.module, 40)}" + (f" of layer {top.layer}" if top.layer is not None else "")
    kinds: dict[str, list[float]] = {}
    for m in rel:
        kinds.setdefault(m.module, []).append(m.rel_norm)
    meds = {x: _median(v) for x, v in kinds.items()}
    shown = _fmt(max(meds.values()))
    big = [x for x in kinds if _fmt(meds[x]) == shown]  # every kind whose median shows as the largest one does
    by_kind = ("." if len(kinds) < 2 or big == [top.module] else
               f"; by median every kind is about the same ({shown})." if len(big) == len(kinds) else
               f"; by median the largest kind is {display_name(big[0], 40)} ({shown})." if len(big) == 1 else
               f"; by median the largest kinds are {_kinds_text(big)} ({shown} each).")
    text = (f"Size: the update moved the weights by a median {percent(_median(vals))} of their norm (‖ΔW‖_F / ‖W_base‖_F "
            f"{_fmt(_median(vals))}, from {_fmt(min(vals))} to {_fmt(max(vals))}); largest in {where} ({_fmt(top.rel_norm)})"
            + by_kind)
    return Finding("size", text, numbers={"median_rel_norm": _median(vals), "min_rel_norm": min(vals), "max_rel_norm": max(vals),
                                          "largest": top.name, "largest_kinds": big})


def _kinds_text(kinds: list[str]) -> str:
    """Module kinds in words: ``"q_proj"``, ``"gate_proj and up_proj"``, ``"a, b and c"``; beyond
    :data:`MAX_KINDS_LISTED`, the first ones and how many more."""
    names = [display_name(x, 40) for x in kinds]
    if len(names) > MAX_KINDS_LISTED:
        names = [*names[: MAX_KINDS_LISTED - 1], f"{len(names) - MAX_KINDS_LISTED + 1} more"]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def skipped_reasons(result: DiffResult) -> list[tuple[str, int]]:
    """Why tensors were skipped, grouped: ``(reason, count)``, most frequent first (a reason's
    details after its first ``:``, such as the two shapes of a mismatch, are dropped)."""
    counts: dict[str, int] = {}
    for s in result.skipped:
        reason = str(s.get("reason", "")).split(":")[0].strip() or "no reason given"
        counts[reason] = counts.get(reason, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def skipped_finding(result: DiffResult) -> Finding | None:
    """What was skipped and why, and where to see each name (None when nothing was)."""
    if not result.skipped:
        return None
    reasons = skipped_reasons(result)
    listed = "; ".join(f"{n} × {display_name(r, 100)}" for r, n in reasons[:4]) + ("; …" if len(reasons) > 4 else "")
    return Finding("skipped", f"{len(result.skipped)} tensors were not analysed: {listed}. Each is listed with its reason "
                   "in results.json (\"skipped\") and in the report's Skipped table.",
                   numbers={"skipped": len(result.skipped), "reasons": dict(reasons)})


def count_text(record: dict) -> str:
    """The ``n`` cell of a :meth:`~spectra.DiffResult.summary_records` row: ``"5"``, or ``"2 of 5"`` when only
    2 of the 5 matrices changed (the row's medians are over those 2), ``"0 of 1"`` when none did (a plain ``1``
    beside a rank of 0 read as "needs no direction", not "unchanged")."""
    n, c = record["count"], record.get("changed", record["count"])
    return f"{c} of {n}" if c < n else str(n)


def summary_legend(tau: float, *, lora: bool = False) -> list[tuple[str, str]]:
    """``(column, definition)`` for the per-module summary table (``spectra diff``'s table)."""
    k = threshold_key(tau)
    items = [
        ("module", ("the module label: the shortest suffix of the tensor name that is unique in the checkpoint "
                   "(q_proj, mlp.down_proj…); one row per label")),
        ("n", ("how many matrices have this label (layers × experts × parts of split fused matrices); \"c of n\" when only "
               "c of them changed (ΔW ≠ 0): the medians of the row are over those c, as the findings' are; \"0 of n\": none "
               "changed, and the row's ranks and size are those of ΔW = 0 (random / p stays the shape's baseline)")),
        ("p", ("min(out, in) of the matrix: the most singular values, i.e. independent directions, a matrix of that "
              "shape can have (median over the changed matrices)")),
    ]
    if lora:
        items.append(("LoRA r", "the adapter's rank r for this module (after rank_pattern): its update has at most r directions; "
                                "lowest–highest when its layers differ"))
    items += [
        (f"rank[{k}]", (f"rank needed: the fewest singular directions of ΔW that hold {tau_percent(tau)} of its energy "
                       f"‖ΔW‖²_F = Σσᵢ² (energy_rank[{k}]), median over the changed matrices")),
        ("/ p", "rank needed ÷ p: near 0, a few directions carry the update; 1, every direction is needed"),
        ("random / p", ("the same fraction for a Gaussian random matrix of the same shape (Marchenko–Pastur law): "
                       "what a dense, unstructured update would need; well below it means a low-rank update")),
        ("‖ΔW‖/‖W‖", "relative size ‖ΔW‖_F / ‖W_base‖_F (0.01: the weights moved by 1% of their norm); – without a base"),
    ]
    return items


def matrix_legend(tau: float) -> list[tuple[str, str]]:
    """``(column, definition)`` for the per-matrix table of the report."""
    k = threshold_key(tau)
    return [
        ("name", "the tuned side's tensor name (\":q\", \":gate\"… for a part of a split fused matrix, \":e<k>\" for expert k)"),
        ("layer", "index in the layer stack; – for embeddings, head and other matrices outside it"),
        ("expert", "MoE expert index; – for dense matrices"),
        ("module", "module label (shortest unique suffix of the name)"),
        ("shape", "out × in of the analysed matrix, as torch.nn.Linear stores it; p = min(out, in)"),
        (f"energy rank [{k}]", f"the fewest singular directions of ΔW holding {tau_percent(tau)} of Σσᵢ² (rank needed)"),
        ("/ p", "energy rank ÷ p"),
        ("random / p", "energy rank ÷ p of a Gaussian random matrix of the same shape (Marchenko–Pastur)"),
        ("‖ΔW‖/‖W‖", "‖ΔW‖_F / ‖W_base‖_F"),
        ("‖ΔW‖_F", "Frobenius norm of the update, sqrt(Σσᵢ²)"),
        ("σ₁", "largest singular value of ΔW (spectral norm)"),
        ("stable rank", "Σσᵢ² / σ₁²: how many directions as strong as the first would hold the same energy"),
        ("effective rank", "exp of the entropy of the normalised singular values σᵢ / Σσⱼ (Roy & Vetterli 2007)"),
        ("LoRA r", "the adapter's rank for this module; – for a full fine-tune"),
        ("note", ("caveats for this matrix: rows analysed, split assumptions, numerical notes (rounding level, "
                 "precision mismatch, quantisation grid)")),
    ]


__all__ = ["MOVED_Z", "NOT_LOW_RANK", "RANK_WORDS", "Finding", "alpha_findings", "analysed", "diff_findings", "esd_points",
           "matrix_legend", "ROUNDING_SHOWN", "percent", "rank_words", "shown", "skipped_finding", "skipped_reasons", "summary_legend"]
