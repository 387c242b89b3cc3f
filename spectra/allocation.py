"""A parameter budget spread over LoRA modules when some of them share one rank (the experts of an MoE).

:func:`spectra.lowrank.allocate_budget`'s greedy is near the optimum for modules of similar width, but a tied
item (every expert at one rank: one wide, costly block per component) is skipped for good once one of its blocks
does not fit. :func:`allocate_tied` tries each of its ranks instead. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spectra.lowrank import Allocation, allocate_budget

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


__all__ = ["TIED_TRIES", "allocate_tied"]
