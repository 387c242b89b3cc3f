"""What a compare says, in words: the findings block that ends ``spectra compare``'s output and opens
its report section, each sentence with the numbers behind it, and the legend of its table.

Pure functions of a :class:`~spectra.compare_records.CompareResult` (no I/O, no printing):

- how much of B's update A's top subspaces hold, against the best any subspace of that rank could
  hold (Eckart–Young) and against random subspaces;
- whether Hu et al.'s φ is above chance (its random baseline ``max(r_A, r_B)/d``);
- the amplification factor of each side (Hu et al. 2021, Table 7), in one sentence;
- the intruder dimensions of each side (Shuttleworth et al. 2024), in one sentence;
- warnings: modules with an update that is exactly zero or entirely at the rounding level of its stored
  weights (null measures), skipped modules (NaN/Inf, tensors an adapter stores whole).

Medians are over the modules whose measure is defined. Definitions: docs/definitions.md.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

from spectra.compare_records import ComparedModule, CompareResult, random_two_sided
from spectra.display import display_name, oversized_words
from spectra.findings import Finding, percent, shown
from spectra.metrics import oversized_update
from spectra.results import note_part

#: How a median φ ÷ its random baseline is put in words (upper bounds, checked in order).
PHI_CHANCE = 1.5
PHI_WORDS: tuple[tuple[float, str], ...] = (
    (0.5, "less than unrelated random subspaces would (below chance: each avoids the other's directions)"),
    (PHI_CHANCE, "no more than unrelated random subspaces would (at chance)"),
    (3.0, "somewhat more than chance"),
    (10.0, "clearly more than chance"),
)
PHI_STRONG = "far more than chance"
#: A module whose random baseline max(r_A, r_B)/d reaches this leaves φ (at most 1) no room to stand above chance
#: (1 / the "at chance" bound of :data:`PHI_WORDS`): its ranks nearly fill the space, so any two subspaces overlap.
PHI_BLIND = 1 / PHI_CHANCE
#: "Below chance" needs at least this many modules and this smallest rank: φ ÷ baseline of unrelated subspaces is
#: skewed at small rank (its median is 0.47 at r = 1, d = 32: two unrelated rank-1 LoRAs read "below chance" half the
#: time); at r >= 4 the 1% quantile of a median over 4 modules is 0.56 (simulated, d from 32 to 2048).
PHI_BELOW_MIN = 4


def phi_tells(m: ComparedModule, side: str) -> bool:
    """Whether module ``m``'s φ on ``side`` can show overlap above chance: its baseline is below :data:`PHI_BLIND`."""
    phi = m.phi.get(side)
    return phi is not None and phi.random < PHI_BLIND


def phi_words(ratio: float, below: bool = True) -> str:
    """Words for a median φ ÷ random baseline (:data:`PHI_WORDS`); ``below`` False where a low ratio is what unrelated
    subspaces give too (:data:`PHI_BELOW_MIN`), so it reads "at chance".

    >>> phi_words(1.1), phi_words(40.0), phi_words(0.3, below=False)
    ('no more than unrelated random subspaces would (at chance)', 'far more than chance', 'no more than unrelated random subspaces would (at chance)')
    """
    for bound, words in PHI_WORDS[0 if below else 1:]:
        if ratio < bound:
            return words
    return PHI_STRONG


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def headline_side(result: CompareResult) -> str:
    """The side the findings and the table talk about: the run's, ``right`` when it compared both."""
    side = result.config.get("side", "right")
    return "right" if side == "both" else side


def compare_findings(result: CompareResult) -> list[Finding]:
    """The findings of one compare, warnings first (see the module docstring).

    Returns:
        Warnings (null measures, skipped modules), then captured energy, φ against chance,
        amplification and intruders (each only when some module has the measure). Empty when the
        result holds no module.
    """
    out = _warnings(result)
    ok = [m for m in result.modules if m.captured.get("b_in_a") is not None]
    if ok:
        out.append(_captured_finding(ok))
    side = headline_side(result)
    with_phi = [m for m in result.modules if m.phi.get(side) is not None]
    if with_phi:
        out.append(_phi_finding(with_phi, side))
    amp = _amplification_finding(result)
    if amp:
        out.append(amp)
    intr = _intruder_finding(result)
    if intr:
        out.append(intr)
    if result.a_only or result.b_only:
        out.append(Finding("unmatched", f"{unmatched_text(result)} (after the filters); "
                           "they are listed in compare.json (a_only, b_only), not compared.",
                           numbers={"a_only": len(result.a_only), "b_only": len(result.b_only)}))
    return out


def unmatched_text(result: CompareResult) -> str:
    """How many modules one input has and the other lacks, in words true of both kinds: an adapter
    lists what it updates, a full checkpoint every matrix, changed or not (frozen ones included)."""
    def part(who: str, names: list[str]) -> str:
        if result.kinds.get(who.lower()) == "lora":
            return f"{len(names)} modules are updated only by {who}"
        return f"{len(names)} matrices of {who} (a full checkpoint: changed or not) have no counterpart in the other input"
    return f"{part('A', result.a_only)} and {part('B', result.b_only)}"


def _warnings(result: CompareResult) -> list[Finding]:
    out = [Finding("read", w, warning=True) for w in result.warnings]
    # a note holds several parts ("; "): each finding quotes only its own kind (numerical caveats are warnings already)
    def part(m: ComparedModule, marker: str) -> str:
        return note_part(m.note, marker, prefix=False)

    fewer = [m for m in result.modules if part(m, "fewer than its rank")]
    if fewer:
        out.append(Finding("rank", f"{len(fewer)} of {len(result.modules)} modules have an update of fewer directions than its "
                           f"rank (e.g. {display_name(fewer[0].name, 60)}: {part(fewer[0], 'fewer than its rank')}); their "
                           "subspaces have the resolved rank, not arbitrary extra directions (rank_a, rank_b in compare.json).",
                           warning=True, numbers={"fewer_directions": len(fewer)}))
    dora = [m for m in result.modules if part(m, "DoRA update is dense")]
    if dora:
        out.append(Finding("rank", f"{len(dora)} of {len(result.modules)} modules have a DoRA update, which is dense (more "
                           f"directions than its rank): their top-r subspaces are compared (e.g. {display_name(dora[0].name, 60)}: "
                           f"{part(dora[0], 'DoRA update is dense')}).", warning=True, numbers={"dora": len(dora)}))
    zero = [m for m in result.modules if m.status == "zero_update"]
    if zero:
        which = Counter("A and B" if m.fro_a == 0 and m.fro_b == 0 else ("A" if m.fro_a == 0 else "B") for m in zero)
        names = ", ".join(display_name(m.name, 60) for m in zero[:3]) + (", …" if len(zero) > 3 else "")
        out.append(Finding("zero", f"{len(zero)} of {len(result.modules)} modules have an update that is exactly zero "
                           f"({', '.join(f'{n} in {w}' for w, n in sorted(which.items()))}; e.g. {names}): a frozen module "
                           "or a LoRA saved at initialisation (B = 0). Their φ, angles and captured energies are null, "
                           "not numbers from an arbitrary basis.", warning=True,
                           numbers={"zero_update": len(zero), "by_side": dict(which)}))
    unresolved = [m for m in result.modules if m.status == "unresolved"]
    if unresolved:
        # which side: the one that resolves no direction (neither is zero under this status)
        which = Counter("A and B" if m.rank_a == 0 and m.rank_b == 0 else ("A" if m.rank_a == 0 else "B")
                        for m in unresolved)
        names = ", ".join(display_name(m.name, 60) for m in unresolved[:3]) + (", …" if len(unresolved) > 3 else "")
        out.append(Finding("unresolved", f"{len(unresolved)} of {len(result.modules)} modules have a non-zero update that is "
                           f"entirely at the rounding level of its stored weights ({', '.join(f'{n} in {w}' for w, n in sorted(which.items()))}; "
                           f"e.g. {names}): no singular value stands above the rounding floor, so it has no resolved direction "
                           "(status unresolved). Their φ, angles and captured energies are null, not numbers measured on "
                           "rounding noise.", warning=True, numbers={"unresolved": len(unresolved), "by_side": dict(which)}))
    if result.skipped:
        reasons = Counter(s["reason"] for s in result.skipped)
        listed = "; ".join(display_name(r, 300) for r in list(reasons)[:3]) + ("; …" if len(reasons) > 3 else "")
        out.append(Finding("skipped", f"{len(result.skipped)} modules were not compared: {listed}. They are listed with "
                           "their reason in compare.json (\"skipped\").", warning=True,
                           numbers={"skipped": len(result.skipped)}))
    return out


def _captured_finding(ms: list[ComparedModule]) -> Finding:
    got = _median([m.captured["b_in_a"].two_sided for m in ms])
    best = _median([m.captured["b_in_a"].best_rank_r for m in ms])
    rand = _median([random_two_sided(m.rank_a, m.out, m.in_) for m in ms])
    back = _median([m.captured["a_in_b"].two_sided for m in ms if m.captured.get("a_in_b") is not None])
    # ratios per module, then their median: a ratio of medians mixes shapes whose baselines differ 4×
    fits = [c.two_sided / c.best_rank_r for m in ms if (c := m.captured["b_in_a"]).best_rank_r > 0]
    of_best = _median(fits) if fits else 0.0
    over = [m.captured["b_in_a"].two_sided / r for m in ms if (r := random_two_sided(m.rank_a, m.out, m.in_)) > 0]
    times = (f"{shown(_median(over))}× what random subspaces of the same ranks hold (median of each module's ratio; "
             f"random holds a median {percent(rand)})") if over else ""
    text = (f"A's top subspaces hold {percent(got)} of B's update energy (median over {len(ms)} modules, two-sided); "
            f"the best any subspace of that rank could hold is {percent(best)}, so A reaches {percent(of_best)} of what was "
            f"possible, and {times}. B's top subspaces hold {percent(back)} of A's.")
    return Finding("captured", text, numbers={"modules": len(ms), "median_b_in_a": got, "median_best": best,
                                              "median_random": rand, "share_of_best": of_best, "median_a_in_b": back,
                                              "median_ratio_to_random": _median(over) if over else None})


def _phi_finding(every: list[ComparedModule], side: str) -> Finding:
    ms = [m for m in every if phi_tells(m, side)]
    blind = [m for m in every if not phi_tells(m, side)]
    if blind:
        e = blind[0]
        fill = (f"in {len(blind)} of {len(every)} modules the ranks nearly fill the space (e.g. {display_name(e.name, 60)}: "
                f"r_A = {e.rank_a}, r_B = {e.rank_b} of d = {e.phi[side].d}, random baseline {e.phi[side].random:.3g}): φ ≤ 1 "
                f"keeps φ at most {PHI_CHANCE:g}× its baseline there, so it cannot tell overlap from chance")
        if not ms:
            return Finding("phi", f"φ(r_A, r_B) says nothing here: {fill} (compare smaller ranks: --top-k for a full update).",
                           numbers={"side": side, "modules": 0, "uninformative": len(blind)})
    phi = _median([m.phi[side].phi_full for m in ms])
    rand = _median([m.phi[side].random for m in ms])
    above = sum(m.phi[side].phi_full > 2 * m.phi[side].random for m in ms)
    over = [m.phi[side].phi_full / m.phi[side].random for m in ms if m.phi[side].random > 0]
    ratio = _median(over) if over else float("inf")  # each module against its own baseline
    below = len(ms) >= PHI_BELOW_MIN and min(min(m.rank_a, m.rank_b) for m in ms) >= PHI_BELOW_MIN
    vectors = "input (right" if side == "right" else "output (left"
    words = phi_words(ratio, below)
    if phi >= 1 - 1e-6:  # its largest value: beside a baseline above 1/3 the ratio (≤ 1/baseline) read "somewhat more than chance"
        inside = (f"φ is at its largest value, 1, in {sum(m.phi[side].phi_full >= 1 - 1e-6 for m in ms)} of {len(ms)} modules "
                  "(the smaller subspace lies inside the other)")
        words = f"as much as φ can show: {inside}" if ratio < PHI_WORDS[2][0] else f"{words} ({inside})"
    text = (f"φ(r_A, r_B) on the {vectors} singular vectors) has median {shown(phi)} against its random baseline {rand:.3g} "
            f"(median of each module's ratio {shown(ratio)}×): the two updates' subspaces overlap {words}; "
            "φ exceeds twice its baseline in "
            f"{above} of {len(ms)} modules" + (f"; {fill}, and they are left out of these medians." if blind else "."))
    return Finding("phi", text, numbers={"side": side, "median_phi": phi, "median_random": rand, "ratio": ratio,
                                         "above_twice_random": above, "modules": len(ms), "uninformative": len(blind)})


def _amplification_finding(result: CompareResult) -> Finding | None:
    parts, numbers = [], {}
    for who in ("a", "b"):
        amps = [m.amplification[who] for m in result.modules if m.amplification and m.amplification.get(who)]
        factors = [a.factor for a in amps if a.factor is not None]
        if not factors:
            continue
        f, r = _median(factors), _median([a.r for a in amps])
        rand = _median([a.proj_random_expected for a in amps])
        proj = _median([a.proj_delta for a in amps])
        numbers[who] = {"median_factor": f, "median_r": r, "median_proj_delta": proj, "median_proj_random": rand}
        parts.append(f"{who.upper()} {f:.3g} at median r = {r:g} (‖U_rᵀ W V_r‖_F {proj:.3g} against {rand:.3g} for random directions)")
    if not parts:
        return None
    text = (f"Amplification ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F, median: {'; '.join(parts)}; Hu et al. (2021) found 21.6 at r = 4 and "
            "1.9 at r = 64 for GPT-3's W_q: a large factor means the update amplifies directions the base weight barely uses.")
    return Finding("amplification", text, numbers=numbers)


def _intruder_finding(result: CompareResult) -> Finding | None:
    parts, numbers = [], {}
    k, eps = result.config.get("intruder_k", 10), result.config.get("epsilon", 0.5)
    for who in ("a", "b"):
        counts = [m.intruders[who].count for m in result.modules if m.intruders and m.intruders.get(who)]
        if not counts:
            continue
        with_any = sum(c > 0 for c in counts)
        numbers[who] = {"total": sum(counts), "modules_with_any": with_any, "modules": len(counts), "max": max(counts)}
        if with_any:
            parts.append(f"{who.upper()} has {sum(counts)} in {with_any} of {len(counts)} modules (at most {max(counts)} in one)")
        else:
            parts.append(f"{who.upper()} has none in any of its {len(counts)} modules")
    if not parts:
        return None
    # the vectors examined: at most p per module (an intruder_k above p examines them all)
    looked = sorted({len(m.intruders[w].max_cos) for m in result.modules if m.intruders for w in ("a", "b") if m.intruders.get(w)})
    if looked and isinstance(k, int) and looked[-1] < k:
        k = f"min({k}, p) = {'–'.join(dict.fromkeys(map(str, (looked[0], looked[-1]))))}"
    text = (f"Intruder dimensions (top-{k} singular vectors of W + ΔW unlike every base direction, |cos| < {eps}): "
            f"{'; '.join(parts)}. Shuttleworth et al. (2024) found that LoRA creates them and full fine-tuning rarely does.")
    return Finding("intruders", text, numbers=numbers)


def table_legend(side: str, *, with_base: bool) -> list[tuple[str, str]]:
    """``(column, definition)`` of ``spectra compare``'s table (and the report's)."""
    vectors = "right (input-space)" if side == "right" else "left (output-space)"
    items = [
        ("module", "module label; one row per module both A and B update"),
        ("layer", "index in the layer stack; blank outside it (embeddings, head)"),
        ("r_A, r_B", "subspace ranks: a LoRA's r, or --top-k singular vectors of a full update"),
        (f"φ({side})", (f"Hu et al.'s normalised subspace similarity ‖Q_Aᵀ Q_B‖²_F / min(r_A, r_B) of the top {vectors} "
                        "singular vectors: 1 when one span holds the other, 0 when orthogonal")),
        ("random", "φ's expectation for unrelated random subspaces, max(r_A, r_B) / d (d: the vectors' dimension)"),
        ("B in A", "share of B's update energy ‖U_Aᵀ ΔW_B V_A‖²_F / ‖ΔW_B‖²_F inside A's top-r_A input and output subspaces"),
        ("best r_A", "the most any rank-r_A subspace pair can hold of B's energy, Σ_{i≤r_A} σᵢ(ΔW_B)² / ‖ΔW_B‖²_F (Eckart–Young)"),
        ("A in B", "share of A's update energy inside B's top-r_B subspaces"),
    ]
    if with_base:
        items += [
            ("amp A, amp B", ("amplification factor ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F, U_r, V_r the top-r singular vectors of ΔW "
                              "and W the base weight (Hu et al. 2021, Sec. 7.3): large when ΔW amplifies directions W barely uses")),
            ("intr A, intr B", ("intruder dimensions: how many of the top-k singular vectors of W + ΔW have |cos| below ε "
                                "with every singular vector of W (Shuttleworth et al. 2024)")),
        ]
    items.append(("–", "a measure that is undefined for the module: an update that is exactly zero, or entirely at the "
                        "rounding level of its stored weights (status unresolved), has no subspace"))
    return items


__all__ = [
    "PHI_BELOW_MIN", "PHI_BLIND", "PHI_STRONG", "PHI_WORDS", "compare_findings", "phi_tells", "headline_side", "phi_words", "random_two_sided",
    "table_legend", "unmatched_text"
]


def input_warnings(result: CompareResult, *, same_path: bool = False) -> list[str]:
    """Warnings about what was compared, from the records alone: a side whose median ‖ΔW‖_F/‖W_base‖_F is
    above 1 (its update larger than the base weights: not a fine-tune of the base given, as ``diff``,
    ``trace`` and ``interfere`` warn), and two sides whose updates have the same norm (12 digits) on every
    module, and φ of 1 wherever measured (two copies of one fine-tune under different paths: every measure compares an
    update with itself; not said when ``same_path``, which the caller says). Needs ``amplification`` (a base given) for
    the first."""
    out = []
    labels = {"a": result.a, "b": result.b}
    for who in ("a", "b"):
        rels = [getattr(m, f"fro_{who}") / amp.w_fro for m in result.modules
                if (amp := (m.amplification or {}).get(who)) is not None and amp.w_fro > 0]
        if big := oversized_update(rels):
            out.append(f"{who.upper()} ({labels[who]}): {oversized_words(big)}")
    live = [m for m in result.modules if m.fro_a > 0 or m.fro_b > 0]
    # and one subspace: two orthogonal updates of one spectrum share every norm (a planted pair was called copies)
    phis = [ph.phi_full for m in live for ph in m.phi.values() if ph is not None]
    if live and all(math.isclose(m.fro_a, m.fro_b, rel_tol=1e-12) for m in live) and not same_path \
            and phis and min(phis) > 1 - 1e-6:
        out.append(f"A and B have updates of the same norm, to 12 digits, on every one of the {len(live)} compared "
                   "modules: copies of one fine-tune (or one the negation of the other)? every measure, blind to sign, "
                   "would then compare an update with itself")
    return out
