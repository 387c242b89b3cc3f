"""How a parameter budget is spread over LoRA modules: the rank of each that keeps the most energy.

``--budget N`` maximises the energy kept, Σ over modules of its top-rᵢ σ², for at most N LoRA parameters, where one
component of an ``(out, in)`` module costs ``out + in`` (its column of B and its row of A). A knapsack whose items
are the rank-1 components (or the blocks between the ranks a serving engine accepts); a module's σᵢ² are
non-increasing, so its value per parameter is too. Three steps, pure numpy:

1. :func:`allocate_budget`: components in decreasing value per parameter (Dantzig 1957) until one does not fit, then
   the rest spent on later ones that fit. It solves the fractional problem exactly: its cut-off ratio λ gives the
   fractional optimum ``bound``, an upper bound of every integer allocation.
2. :func:`allocate_tied`: a tied item (every expert of an MoE at one rank) tried at each of its ranks.
3. :func:`exact_allocation`: the integer optimum. For any λ ≥ 0, an allocation keeps
   ``U − λ·(parameters left) − Σ_modules D(rᵢ)`` with ``U = λ·N + Σ max(0, σ² − λ·cost)`` over all components and
   ``D(r) ≥ 0`` the sum of ``|σ² − λ·cost|`` over the components where rank r departs from the fractional optimum.
   One that keeps more than the greedy has ``Σ D < U − kept``: only the ranks within that of the fractional
   optimum remain (reduced-cost fixing, as in branch-and-bound knapsack solvers: Martello & Toth 1990, ch. 2-3),
   usually a few per module near the cut-off, and a search over their combinations that keeps only the Pareto
   states (parameters, energy) finds the best. When the states outgrow :data:`EXACT_STATES` (or the work
   :data:`EXACT_WORK`) the greedy's allocation stands, with ``optimal`` False.

A budget where the greedy goes wrong: 192 parameters, a module of cost 192 holding σ² = 1.0 and one of cost 96 holding
0.51 and 0.10. The greedy buys 0.51 first (more per parameter) and keeps 0.61; the optimum is the 1.0.
:func:`allocate` runs the three steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

#: Most partial allocations (Pareto states) :func:`exact_allocation` keeps at one module, and generates in all
#: (``EXACT_WORK``), before it gives up and leaves the greedy's allocation: a second at most.
EXACT_STATES = 50_000
EXACT_WORK = 2_000_000


@dataclass(frozen=True)
class Allocation:
    """A rank per module under a budget (what :func:`allocate_budget`, :func:`allocate_tied`, :func:`exact_allocation`
    and :func:`allocate` return).

    Attributes:
        ranks: rank of each module.
        kept: Σ of the σ² kept (same units as the gains).
        params: LoRA parameters used, Σ rᵢ·costᵢ (≤ the budget).
        bound: the fractional-knapsack optimum (an upper bound of every integer allocation's kept
            energy): ``kept`` plus the budget left times the value per parameter of the first block
            that did not fit; equal to ``kept`` when everything fitted.
        critical: ``(module, rank it would have reached)`` of that first block; None when none.
        ratio: that block's gain per parameter (0 when none), the greedy prefix's cut-off: every block
            above it is taken, and adding modules to the problem only raises it. Blocks below it are
            taken only to spend what the prefix left (``fill``), each within that rest.
        filled: parameters of the blocks taken after the prefix (part of ``params``).
        optimal: whether no allocation of whole components keeps more (:func:`exact_allocation` proved it; the
            greedy alone proves it only when everything fitted or its gap is at the sums' rounding).
    """

    ranks: list[int]
    kept: float
    params: int
    bound: float
    critical: tuple[int, int] | None = None
    ratio: float = 0.0
    filled: int = 0
    optimal: bool = False

    @property
    def gap(self) -> float:
        """``bound − kept``: how much more any allocation could keep at most (0 when none could)."""
        return max(0.0, self.bound - self.kept)


def _blocks(gains: np.ndarray, levels: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rank reached, components added, gain)`` of each step between consecutive allowed levels,
    up to the first step that adds no energy (later ones add none either: the gains are non-increasing)."""
    n = gains.size
    reach = np.arange(1, n + 1) if levels is None else np.unique(np.minimum(np.asarray(levels, dtype=np.int64), n))
    reach = reach[reach > 0]
    cum = np.concatenate([[0.0], np.cumsum(gains)])
    prev = np.concatenate([[0], reach[:-1]])
    gain = cum[reach] - cum[prev]
    stop = np.flatnonzero(gain <= 0)
    keep = stop[0] if stop.size else reach.size
    return reach[:keep], (reach - prev)[:keep], gain[:keep]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_problem(gains: Sequence[np.ndarray], costs: Sequence[int], budget: int,
                   levels: Sequence[Sequence[int]] | None) -> None:
    """Refuse (ValueError) what would make an allocation wrong without a word: gains that are not finite, >= 0 and
    non-increasing, or whose sum overflows (a NaN sorted anywhere and took a share); costs, budget and levels that are
    not integers (a float cost counted rounded), a negative budget or cost, a level below 1."""
    if len(gains) != len(costs) or (levels is not None and len(levels) != len(gains)):
        raise ValueError(f"gains, costs and levels must have one entry per module. Got {len(gains)}, {len(costs)}"
                         f"{'' if levels is None else f' and {len(levels)}'} instead.")
    if not _is_int(budget) or budget < 0:
        raise ValueError(f"budget must be an integer >= 0. Got {budget!r} instead.")
    for i, g in enumerate(gains):
        g = np.asarray(g, dtype=np.float64)
        if not _is_int(costs[i]) or costs[i] <= 0 or not np.all(np.isfinite(g) & (g >= 0)) or np.any(g[1:] > g[:-1]) \
                or not np.isfinite(g.sum()):
            raise ValueError(f"module {i}: costs must be positive integers and gains finite, >= 0 and non-increasing. Got cost "
                             f"{costs[i]!r}, gains {g[:4]} instead.")
        if levels is not None and not all(_is_int(v) and v >= 1 for v in levels[i]):
            raise ValueError(f"module {i}: levels must be integers >= 1. Got {list(levels[i])[:8]} instead.")


def allocate_budget(gains: Sequence[np.ndarray], costs: Sequence[int], budget: int, *,
                    levels: Sequence[Sequence[int]] | None = None, fill: bool = True) -> Allocation:
    """Ranks that keep the most energy for at most ``budget`` parameters (greedy on energy per parameter).

    Args:
        gains: per module, ``σᵢ²`` for i = 1 … (the most components it may take), non-increasing,
            float64. Zero gains are never taken (they would spend parameters on nothing).
        costs: per module, parameters per component (``out + in``), positive integers.
        budget: parameters available.
        levels: per module, the ranks it may take, ascending (default every rank 1 … len(gains)).
            Consecutive levels form blocks; since each block's σ² are all ≤ the previous block's,
            the blocks' values per parameter are non-increasing too, and the greedy still applies.
        fill: spend what the prefix leaves (below).

    Returns:
        :class:`Allocation`. Blocks are taken in decreasing order of gain / cost (ties: module index,
        then rank) until the first that does not fit (the textbook greedy's prefix, vectorised: one
        sort of all blocks). With ``fill``, the rest of that order is then walked once, taking each
        block that still fits and continues its module's rank (a module whose block was passed over
        takes no later one): narrow modules' components spend a rest that the critical module's wider
        one does not fit (600 parameters: 512 spent by the prefix, an 80-parameter component left out).
        Still not the integer optimum in every case: the gap to the fractional optimum is reported.

    Example:
        >>> a = allocate_budget([np.array([9.0, 1.0]), np.array([4.0, 4.0])], [1, 1], 3)
        >>> a.ranks, a.kept, a.params
        ([1, 2], 17.0, 3)
    """
    _check_problem(gains, costs, budget, levels)
    mods, reach, cost, gain, ratio = [], [], [], [], []
    for i, g in enumerate(gains):
        g = np.asarray(g, dtype=np.float64)
        r, added, v = _blocks(g, None if levels is None else levels[i])
        c = added * int(costs[i])
        mods.append(np.full(r.size, i))
        reach.append(r)
        cost.append(c)
        gain.append(v)
        # non-increasing within a module in exact arithmetic; the running minimum keeps it so after
        # rounding, so that a module's blocks are always taken in order
        ratio.append(np.minimum.accumulate(v / c) if r.size else v)
    ranks = [0] * len(gains)
    if not mods or not sum(m.size for m in mods):
        return Allocation(ranks, 0.0, 0, 0.0, optimal=True)
    mod, rch, cst, gn, rt = (np.concatenate(x) for x in (mods, reach, cost, gain, ratio))
    order = np.lexsort((rch, mod, -rt))  # by ratio descending, then module, then rank
    cum = np.cumsum(cst[order])
    n = int(np.searchsorted(cum, int(budget), side="right"))  # the blocks whose prefix fits
    taken = order[:n]
    for i, r in zip(mod[taken].tolist(), rch[taken].tolist()):
        ranks[i] = max(ranks[i], r)
    kept = float(np.sum(gn[taken]))
    used = int(cum[n - 1]) if n else 0
    if n == order.size:
        return Allocation(ranks, kept, used, kept, optimal=True)
    crit = order[n]
    bound = kept + (int(budget) - used) * float(rt[crit])  # the fractional optimum: the prefix's, not the filled one's
    filled = 0
    if fill:
        left, cheapest = int(budget) - used, int(cst.min())
        start = rch - cst // np.asarray(costs, dtype=np.int64)[mod]  # the rank each block continues from
        for b in order[n:].tolist():
            if left < cheapest:
                break
            i = int(mod[b])
            if cst[b] <= left and ranks[i] == start[b]:
                ranks[i], left, kept, filled = int(rch[b]), left - int(cst[b]), kept + float(gn[b]), filled + int(cst[b])
    return Allocation(ranks, kept, used + filled, max(bound, kept), (int(mod[crit]), int(rch[crit])), float(rt[crit]), filled)


def reach_above(gains: np.ndarray, cost: int, ratio: float, levels: Sequence[int] | None = None) -> int:
    """The largest allowed rank whose every block has a gain per parameter ≥ ``ratio``: the most
    components a module can receive once another allocation's critical ratio is ``ratio`` (adding
    modules to a knapsack only pushes the greedy's cut-off up, :class:`Allocation`).

    >>> reach_above(np.array([9.0, 4.0, 1.0]), 1, 4.0)
    2
    """
    reach, added, gain = _blocks(np.asarray(gains, dtype=np.float64), levels)
    if not reach.size:
        return 0
    ok = np.minimum.accumulate(gain / (added * cost)) >= ratio
    n = int(np.argmin(ok)) if not ok.all() else ok.size
    return int(reach[n - 1]) if n else 0


def uniform_rank(costs: Sequence[int], caps: Sequence[int], params: int) -> int:
    """The largest uniform rank r whose adapter, each module at ``min(r, cap)``, costs at most
    ``params`` parameters: what "the same parameter count, spread evenly" buys.

    >>> uniform_rank([10, 10], [4, 1], 45)
    3
    """
    lo, hi = 0, max(caps, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(mid, c) * k for c, k in zip(caps, costs)) <= params:
            lo = mid
        else:
            hi = mid - 1
    return lo


#: Most ranks of a tied item :func:`allocate_tied` tries one by one (each a greedy over the rest).
TIED_TRIES = 64


def allocate_tied(gains: Sequence[np.ndarray], costs: Sequence[int], budget: int, *,
                  levels: Sequence[Sequence[int]] | None = None, tied: int | None = None) -> Allocation:
    """:func:`allocate_budget`, with every rank of the item ``tied`` tried in turn and the greedy run over the others
    with what it leaves; the most energy kept wins (the plain greedy's allocation among them).

    A tied item (every expert of an MoE at one rank) is one wide, costly block per component: once one does not fit,
    the greedy's prefix stops buying it and the budget goes to components far below it (a Mixtral budget kept 0.73 of
    the energy, with the experts at r = 1, where the experts at r = 2 and the rest kept 0.82). Exact in the tied item's
    rank when at most :data:`TIED_TRIES` of them fit the budget (else that many: evenly spaced, and those within 8 of
    the greedy's); the others are the greedy's. ``bound`` stays the whole problem's fractional optimum.

    Example:
        >>> g = [np.array([3.0, 3.0]), np.array([1.0]), np.array([1.0])]
        >>> allocate_budget(g, [6, 1, 1], 12).ranks, allocate_tied(g, [6, 1, 1], 12, tied=0).ranks
        ([1, 1, 1], [2, 0, 0])
    """
    plain = allocate_budget(gains, costs, budget, levels=levels)
    if tied is None:
        return plain
    if not _is_int(tied) or not 0 <= tied < len(gains):
        raise ValueError(f"tied must be the index of a module, 0 to {len(gains) - 1}. Got {tied!r} instead.")
    steps = [0, *(levels[tied] if levels is not None else range(1, len(gains[tied]) + 1))]
    steps = [r for r in steps if r <= len(gains[tied]) and r * int(costs[tied]) <= budget]
    if len(steps) > TIED_TRIES:  # evenly spaced ranks, and those around the greedy's (never worse than it)
        near = {r for r in steps if abs(r - plain.ranks[tied]) <= 8}
        spaced = {steps[round(k * (len(steps) - 1) / (TIED_TRIES - len(near) - 1))] for k in range(TIED_TRIES - len(near))}
        steps = sorted(near | spaced)
    others = [i for i in range(len(gains)) if i != tied]
    best = plain
    for r in steps:
        sub = allocate_budget([gains[i] for i in others], [costs[i] for i in others], int(budget) - r * int(costs[tied]),
                              levels=None if levels is None else [levels[i] for i in others])
        kept = sub.kept + float(np.sum(np.asarray(gains[tied], dtype=np.float64)[:r]))
        if kept > best.kept * (1 + 1e-12):
            ranks = [0] * len(gains)
            for j, i in enumerate(others):
                ranks[i] = sub.ranks[j]
            ranks[tied] = r
            best = Allocation(ranks, kept, sub.params + r * int(costs[tied]), max(plain.bound, kept), plain.critical,
                              plain.ratio, sub.filled)
    return best


def _options(gains: np.ndarray, cost: int, levels: Sequence[int] | None, lam: float) -> tuple[np.ndarray, ...]:
    """The ranks one module may take, ``(K + 1,)`` each from 0: rank, energy kept, parameters, and D (module
    docstring) for the cut-off λ = ``lam``; with the sum of its positive ``σ² − λ·cost`` (its share of U)."""
    reach, added, gain = _blocks(np.asarray(gains, dtype=np.float64), levels)
    params = added * int(cost)
    delta = gain - lam * params
    pos, neg = np.maximum(delta, 0.0), np.maximum(-delta, 0.0)
    dev = np.concatenate([[0.0], np.cumsum(neg)]) + (pos.sum() - np.concatenate([[0.0], np.cumsum(pos)]))
    return (np.concatenate([[0], reach]), np.concatenate([[0.0], np.cumsum(gain)]), np.concatenate([[0], np.cumsum(params)]),
            np.maximum(dev, 0.0), float(pos.sum()))


def exact_allocation(gains: Sequence[np.ndarray], costs: Sequence[int], budget: int, start: Allocation, *,
                     levels: Sequence[Sequence[int]] | None = None) -> Allocation:
    """The allocation that keeps the most energy for at most ``budget`` parameters, from ``start`` (a feasible one:
    the greedy's, :func:`allocate_tied`'s) and its cut-off ``start.ratio`` (module docstring).

    Args: as :func:`allocate_budget`; ``start`` an allocation of these modules within ``budget``.

    Returns:
        :class:`Allocation` with ``optimal`` True and the best ranks (``start``'s when none keeps more than it by
        more than the sums' rounding, 1e-12 relative); ``bound``, ``critical`` and ``ratio`` are ``start``'s, and
        ``filled`` counts the parameters outside the greedy's prefix. ``start``'s ranks, ``optimal`` False, when
        the search would outgrow :data:`EXACT_STATES` / :data:`EXACT_WORK` (checked before each step's arrays are made).

    Example:
        >>> g, c = [np.array([1.0]), np.array([0.51, 0.10])], [192, 96]
        >>> allocate_budget(g, c, 192).ranks, exact_allocation(g, c, 192, allocate_budget(g, c, 192)).ranks
        ([0, 2], [1, 0])
    """
    if start.critical is None:  # everything fitted
        return replace(start, optimal=True)

    def settled(ranks: list[int], kept: float, optimal: bool) -> Allocation:  # filled: one meaning whatever start was
        params = sum(r * int(c) for r, c in zip(ranks, costs))
        return replace(start, ranks=ranks, kept=kept, params=params, optimal=optimal,
                       filled=params - _prefix_params(gains, costs, levels, ranks, start))

    lam = max(float(start.ratio), 0.0)
    mods = [_options(g, c, None if levels is None else levels[i], lam) for i, (g, c) in enumerate(zip(gains, costs))]
    upper = lam * int(budget) + sum(m[4] for m in mods)  # every allocation keeps at most this (weak duality)
    tol = 1e-12 * max(upper, float(np.finfo(np.float64).tiny))
    gap = upper - start.kept
    if start.optimal or gap <= tol:
        return settled(list(start.ranks), start.kept, True)
    # each module's ranks within the gap of the fractional optimum (start's own always: rounding cannot drop it)
    choices = [np.union1d(np.flatnonzero(m[3] <= gap + tol), np.flatnonzero(m[0] == r)) for m, r in zip(mods, start.ranks)]
    if any(ch.size == 0 for ch in choices):  # a rank of start's that is no option (cannot happen with start from here)
        return settled(list(start.ranks), start.kept, False)
    fixed = [i for i, ch in enumerate(choices) if ch.size == 1]
    free = sorted((i for i, ch in enumerate(choices) if ch.size > 1), key=lambda i: choices[i].size)
    params0 = sum(int(mods[i][2][choices[i][0]]) for i in fixed)
    kept0 = sum(float(mods[i][1][choices[i][0]]) for i in fixed)
    dev0 = sum(float(mods[i][3][choices[i][0]]) for i in fixed)
    # the least parameters and D the modules still to come must add
    rest_params = np.cumsum([0, *(int(mods[i][2][choices[i]].min()) for i in reversed(free))])[::-1]
    rest_dev = np.cumsum([0.0, *(float(mods[i][3][choices[i]].min()) for i in reversed(free))])[::-1]
    rest_most = np.cumsum([0, *(int(mods[i][2][choices[i]].max()) for i in reversed(free))])[::-1]
    par, val, dev = np.array([params0], dtype=np.int64), np.array([kept0]), np.array([dev0])
    trail: list[tuple[np.ndarray, np.ndarray]] = []  # per free module: each state's parent and choice
    work = 0
    for s, i in enumerate(free):
        ch = choices[i]
        work += par.size * ch.size
        if work > EXACT_WORK:  # before the step's arrays: a flat module of thousands of ranks would take gigabytes
            return settled(list(start.ranks), start.kept, False)
        p_new = (par[:, None] + mods[i][2][ch][None, :]).ravel()
        v_new = (val[:, None] + mods[i][1][ch][None, :]).ravel()
        d_new = (dev[:, None] + mods[i][3][ch][None, :]).ravel()
        # a state must fit, and must be able to beat start: its D, and λ times the parameters it leaves unspent
        # even when every module to come takes its widest choice, stay below the gap
        unspent = np.maximum(budget - p_new - rest_most[s + 1], 0)
        ok = np.flatnonzero((p_new + rest_params[s + 1] <= budget) & (d_new + rest_dev[s + 1] + lam * unspent <= gap + tol))
        order = ok[np.lexsort((-v_new[ok], p_new[ok]))]  # by parameters, then most energy first
        best_before = np.maximum.accumulate(np.concatenate([[-np.inf], v_new[order]]))[:-1]
        order = order[v_new[order] > best_before]  # the Pareto states: more energy than every cheaper one
        if order.size > EXACT_STATES:
            return settled(list(start.ranks), start.kept, False)
        trail.append((order // ch.size, order % ch.size))
        par, val, dev = p_new[order], v_new[order], d_new[order]
    if not val.size or float(val.max()) <= start.kept + tol:
        return settled(list(start.ranks), start.kept, True)
    ranks = list(start.ranks)
    for i in fixed:
        ranks[i] = int(mods[i][0][choices[i][0]])
    k = int(np.argmax(val))
    for s in range(len(free) - 1, -1, -1):
        parent, pick = trail[s]
        ranks[free[s]] = int(mods[free[s]][0][choices[free[s]][pick[k]]])
        k = int(parent[k])
    return settled(ranks, float(val.max()), True)


def _prefix_params(gains: Sequence[np.ndarray], costs: Sequence[int], levels: Sequence[Sequence[int]] | None,
                   ranks: Sequence[int], start: Allocation) -> int:
    """Parameters of ``ranks``' blocks that lie in the greedy's prefix (ordered before ``start.critical``, as
    :func:`allocate_budget` orders them: value per parameter descending, then module, then rank). ``rt == ratio`` holds
    bit for bit for the critical block's ties because both sides compute the ratio by the same arithmetic."""
    cm, cr = start.critical or (len(gains), 0)
    total = 0
    for i, (g, c) in enumerate(zip(gains, costs)):
        reach, added, gain = _blocks(np.asarray(g, dtype=np.float64), None if levels is None else levels[i])
        rt = np.minimum.accumulate(gain / (added * int(c))) if reach.size else gain
        first = (rt > start.ratio) | ((rt == start.ratio) & ((i < cm) | ((i == cm) & (reach < cr))))
        total += int(np.sum((added * int(c))[first & (reach <= ranks[i])]))
    return total


def allocate(gains: Sequence[np.ndarray], costs: Sequence[int], budget: int, *,
             levels: Sequence[Sequence[int]] | None = None, tied: int | None = None) -> Allocation:
    """The ranks that keep the most energy for at most ``budget`` parameters: :func:`allocate_tied` (the greedy,
    ``tied`` tried at each rank), then :func:`exact_allocation` from it. Arguments as :func:`allocate_tied`.

    Example:
        >>> allocate([np.array([1.0]), np.array([0.51, 0.10])], [192, 96], 192).ranks
        [1, 0]
    """
    start = allocate_tied(gains, costs, budget, levels=levels, tied=tied)
    return exact_allocation(gains, costs, budget, start, levels=levels)


__all__ = ["EXACT_STATES", "EXACT_WORK", "TIED_TRIES", "Allocation", "allocate", "allocate_budget", "allocate_tied",
           "exact_allocation", "reach_above", "uniform_rank"]
