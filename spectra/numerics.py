"""Numerical caveats of one weight update ΔW = W_tuned − W_base, as explained notes.

Pure tensor functions, no I/O. :func:`numeric_notes` looks at one matrix pair as stored and says when
the spectrum of ΔW may reflect the storage format rather than the fine-tuning:

``subnormal``
    Base or tuned holds subnormal (denormal) values of its stored dtype that could move ‖ΔW‖_F by
    ≥ 1 % (:data:`SUBNORMAL_EFFECT`) if flushed. spectra upcasts and keeps them, but hardware that
    flushes denormals to zero (FTZ/DAZ, common on GPUs for fp16/fp8) trained on different numbers.
``rounding_level``
    Most of ΔW's energy sits in entries that changed by at most one rounding step of the tuned
    weights' stored dtype (the rounding made when they were saved; a base stored coarser, such as a
    bf16 release fine-tuned and saved in float32, is exact as it stands),
    ``|ΔW_ij| ≤ ε · max(|W_base,ij|, |W_tuned,ij|)`` with ε = ``torch.finfo(dtype).eps``
    (one ulp at 1: bf16 2^-7, fp16 2^-10, fp32 2^-23, fp8 e4m3 2^-3); ``ε/2`` where the base is stored
    finer than the tuned weights (its ΔW holds only the tuned side's round-to-nearest, at most half an ulp). A 1e-8 relative update stored
    in bf16 comes out as 0 or as isolated ±1-ulp flips: the spectrum is not resolved from rounding noise.
    Not said when power iteration shows a top singular value that such noise cannot reach (``rounding_steps``).
    The norm ratio ‖ΔW‖_F/‖W_base‖_F is reported beside the unit roundoff u = ε/2, but is not the
    criterion on its own: a sparse real update (a few rows of an embedding) has a small ratio too.
``rounding_steps``
    As ``rounding_level`` entry by entry, but the largest singular value of the change on the tuned grid (ΔW on
    one grid; ``TUNED − BASE`` rounded to the tuned dtype where the base is finer: its repeated values round
    alike, a low-rank error that is no update) is certified (power iteration, a lower bound) above
    :data:`RESOLVED_MARGIN` times its ``max_i ‖X[i, :]‖₂ + max_j ‖X[:, j]‖₂``, more than
    independent rounding noise of those very entries reaches (Latała; Bandeira and van Handel): a learned
    update of sub-ulp size rounded entry by entry (a small learning rate on bf16 weights). Round-to-nearest of
    ``w + δ`` flips ``w`` by one step where δ passes the distance to the next rounding boundary (half a step for
    weights on the grid; a probability of about ``|δ|/ulp`` for weights spread over their cells, as a float32
    master copy is), so the flips follow the update and its top directions show; the rest of the spectrum is
    that rounding, and energy ranks at high τ count it.
``precision_mismatch``
    The two sides are stored at different precisions (fp32 base, bf16 tuned): ΔW includes rounding W
    to the coarser dtype (for a base stored coarser, only if TUNED was made from a finer original of
    it), ≈ 0.045·ε²·‖W‖_F² of energy (round-to-nearest error, ulp²/12, averaged over a binade), spread
    over all directions. Flagged when that is ≥ 1 % of ‖ΔW‖_F² (it then moves
    ``energy_rank[0.99]``).
``quantisation_grid``
    One side is quantised (stored as fp8/int8, or every sampled row of ≥ 1024 entries holds ≤ 256
    distinct values, as int8/int4-dequantised weights do) and the other is not, or both are on
    different grids: ΔW includes quantisation error, which is near full rank.

An all-zero ΔW gets no notes (``fro_norm == 0`` is reported elsewhere); nor does a ΔW with NaN/Inf.
Every check is O(elements) in row blocks of bounded size, or reads a fixed, evenly spaced sample
of rows: results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from spectra.io.checkpoint import QUANTISED_DTYPES
from spectra.linalg import row_blocks

#: ``subnormal`` fires when flushing the subnormal entries could change ‖ΔW‖_F by this fraction.
SUBNORMAL_EFFECT = 0.01
#: ``rounding_level`` fires when at least this fraction of ‖ΔW‖_F² is in ≤ 1-ulp entries.
ROUNDING_ENERGY = 0.5
#: ``rounding_steps`` replaces ``rounding_level`` when σ₁(ΔW) is certified above this many times the largest
#: row norm plus the largest column norm of ΔW (independent noise stays within about 1× of it; a rank-1 pattern
#: of one-step flips of a d×d matrix is √d/2 times it).
RESOLVED_MARGIN = 1.5
#: How a ``rounding_steps`` note starts (the caveat's pattern in :data:`spectra.results.CAVEATS` reads it).
STEPS_START = "ΔW moved its entries by at most one rounding step of "
#: How a ``rounding_level`` note starts (the caveat's pattern in :data:`spectra.results.CAVEATS` reads it; and
#: :func:`spectra.storage_floor.certified_floor`, which raises the floor of such a ΔW on one grid).
LEVEL_START = "ΔW is at the rounding level of "
#: How a ``rounding_steps`` note on one grid names its certificate (:func:`spectra.storage_floor.certified_floor` reads it back).
ONE_GRID_TOP = "its top singular value"
#: Power-iteration steps of that certificate (a top value at 1.5× a noise bulk is within 1% after ~6).
RESOLVED_STEPS = 12
#: ``precision_mismatch`` fires when the estimated rounding energy is this fraction of ‖ΔW‖_F².
MISMATCH_ENERGY = 0.01
#: A sampled row of at least GRID_MIN_ROW entries with at most GRID_MAX_LEVELS distinct values
#: looks quantised (int8 has 256 levels; a bf16 row of 1024 Gaussian weights has ~650-720).
GRID_MIN_ROW = 1024
GRID_MAX_LEVELS = 256
#: Two quantised sides are on different grids when a sampled row's union of values exceeds this
#: many times the larger side's own count (same grid: the union stays within the grid's levels).
GRID_UNION_RATIO = 1.5
#: Columns of each sampled row the grid check reads (evenly spaced; every column of a shorter row).
GRID_SAMPLE_COLS = 1 << 16
#: Mean of (rounding error / x)² under round-to-nearest, in units of ε², for x log-uniform in a
#: binade: (1/12)·E[(2^e/x)²] = (1/12)·(3/8)/ln 2 ≈ 0.0451.
_ROUND_ENERGY_PER_EPS2 = 0.375 / (12 * 0.6931471805599453)
#: Storage dtypes that are quantisation grids: those spectra dequantises with a scale
#: (:data:`spectra.io.checkpoint.QUANTISED_DTYPES`) and the packed ones it does not read.
_QUANTISED_DTYPES = QUANTISED_DTYPES | {"uint8", "int4"}


@dataclass(frozen=True)
class NumericNote:
    """One caveat about a matrix pair.

    Attributes:
        code: ``"subnormal"``, ``"rounding_level"``, ``"rounding_steps"``, ``"precision_mismatch"`` or
            ``"quantisation_grid"`` (see the module docstring).
        message: one explained sentence for users (no trailing period), fit to join with ``"; "``.
    """

    code: str
    message: str


#: The rows of ΔW the element-wise caveats read (:func:`numeric_flags`' ``max_rows``): a full pass costs several times
#: forming ΔW on a CPU.
NOTE_ROWS = 64


def numeric_notes(base: torch.Tensor | None, tuned: torch.Tensor | None, delta: torch.Tensor, *,
                  base_dtype: str, tuned_dtype: str, base_sq: float | None = None,
                  rows_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[str]:
    """Explained numerical caveats of ΔW, as messages (see :func:`numeric_flags` for the arguments).

    Example:
        >>> w = (torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
        >>> t = (w.float() * (1 + 1e-8)).bfloat16()  # a 1e-8 relative update, rounded away in bf16
        >>> numeric_notes(w, t, t.float() - w.float(), base_dtype="bfloat16", tuned_dtype="bfloat16")
        []
        >>> t = (w.float() + 0.003 * torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * w.float()).bfloat16()
        >>> [m.split(":")[0] for m in numeric_notes(w, t, t.float() - w.float(), base_dtype="bfloat16", tuned_dtype="bfloat16")]
        ['ΔW is at the rounding level of bfloat16']
    """
    return [n.message for n in numeric_flags(base, tuned, delta, base_dtype=base_dtype, tuned_dtype=tuned_dtype, base_sq=base_sq,
                                             rows_of=rows_of)]


def numeric_flags(base: torch.Tensor | None, tuned: torch.Tensor | None, delta: torch.Tensor, *,
                  base_dtype: str, tuned_dtype: str, block: int = 1 << 22,
                  sample_rows: int = 16, max_rows: int | None = NOTE_ROWS, base_sq: float | None = None,
                  rows_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[NumericNote]:
    """Numerical caveats of one update ΔW = W_tuned − W_base (module docstring), in a fixed order.

    Args:
        base, tuned: W_base and W_tuned, shape ``(out, in)`` (any leading dims are folded into rows),
            as stored (bf16, fp16, fp32, fp8...) or upcast / dequantised to float32; any device.
        delta: ΔW = tuned − base, same shape, float32 or float64 (as :func:`spectra.delta.form_delta` forms it).
        base_dtype, tuned_dtype: the stored dtype names (``"bfloat16"``, ``"float8_e4m3fn"``,
            ``"int8"``...), which decide ε and whether a side is quantised.
        block: elements per row block of the O(elements) pass (bounds temporary memory).
        sample_rows: rows read (evenly spaced among the rows the other checks read) by the
            quantisation-grid check.
        max_rows: above this many rows the element-wise checks sample: the 16 rows where ΔW is largest
            (so that an update confined to a few rows, such as new token embeddings, is seen), counted
            exactly, and two samples of ``max_rows − 16`` others scaled up to all of them: evenly spaced
            rows for the weights' sums (subnormals, the quantisation grid) and rows drawn in proportion to
            their ‖ΔW‖² for ΔW's (the share of one-step changes, changed entries); None reads every row. A
            full pass costs several times forming ΔW on a CPU. ‖ΔW‖_F² is always taken over every row, and
            the note says what was estimated.
        base_sq: ‖W_base‖_F² when the caller has it (:func:`spectra.delta.form_delta` computes it while forming
            ΔW); else it is computed (or, with sampling, estimated) here.
        rows_of: with ``base`` and ``tuned`` None, reads the given rows (int64 indices, in that order) of W_base and
            W_tuned as stored, for a pair not held whole (formed from row blocks, :func:`spectra.delta.prepare`). Only
            for a sampled pass (more rows than ``max_rows``) of a base stored no finer than the tuned side, the one case
            that reads no other rows; ``base_sq`` is then needed.

    Returns:
        The :class:`NumericNote` of each check that fired; empty when ΔW is all zero or not finite.
    """
    if base is None or tuned is None:
        if rows_of is None or base is not None or tuned is not None:
            raise ValueError("give base and tuned, or rows_of without them")
    elif base.shape != tuned.shape or base.shape != delta.shape:
        raise ValueError(f"base, tuned and delta must have one shape. Got {tuple(base.shape)}, "
                         f"{tuple(tuned.shape)}, {tuple(delta.shape)} instead")
    if delta.numel() == 0:
        return []
    cols = delta.shape[-1] if delta.ndim else 1
    d2 = delta.reshape(-1, cols)
    b2, t2 = (None, None) if base is None or tuned is None else (base.reshape(-1, cols), tuned.reshape(-1, cols))
    eps_b, eps_t = storage_eps(base_dtype), storage_eps(tuned_dtype)
    # (2)'s ε is the rounding of the tuned weights when they were stored (as spectra.storage_floor.rounding_floor's): a base stored
    # coarser (a bf16 release fine-tuned and saved in float32) is exact as it stands, and changes below its
    # step are the update, not rounding (they were called noise, and recommend refused); the base's own
    # rounding, when TUNED was made from a finer original, is (5)'s caveat
    eps = eps_t if eps_t is not None else eps_b
    # a rounding step of ΔW: one ulp (≤ ε·|x|) where both sides are on one grid (a 1-ulp flip), but half of one
    # (the unit roundoff) where the base is stored finer, since then ΔW's rounding is only the tuned side's
    # round-to-nearest; a full ulp there called a bf16-saved update of 3e-3·‖W‖ rounding noise (77% of it learned).
    # Finer by its values, not only its dtype: a bf16 release saved in float32 is on the bf16 grid (the rows read
    # are checked), and its fine-tune's one-ulp flips are rounding noise as on one grid
    finer_dtype = eps_b is not None and eps_t is not None and eps_b < eps_t
    if b2 is None and (finer_dtype or max_rows is None or d2.shape[0] <= max_rows or base_sq is None):
        raise ValueError("rows_of serves a sampled pass (more rows than max_rows, base_sq given) of a base stored no finer than the tuned side")
    tiny_b = tiny_threshold(b2, base_dtype)
    tiny_t = tiny_threshold(t2, tuned_dtype)
    total_rows = d2.shape[0]
    where = ""
    if max_rows is None or total_rows <= max_rows:
        finer_base = finer_dtype and not _on_grid(b2, tuned_dtype, block)
        s = _pass(b2, t2, d2, eps / 2 if finer_base else eps, tiny_b, tiny_t, block, norms=base_sq is None)
    else:
        # ‖ΔW‖² over every row (cheap: one norm per row); the element-wise sums from the rows where ΔW is largest, counted
        # exactly, plus a sample of the others scaled up to all of them
        energy = torch.linalg.vector_norm(d2, dim=1).double()  # float32 per row: ample for these ratios, 4x faster
        if not bool(torch.isfinite(energy).all()):
            return []
        top = torch.topk(energy, min(16, max_rows)).indices
        rest = torch.ones(total_rows, dtype=torch.bool, device=energy.device)
        rest[top] = False
        rest_rows = torch.nonzero(rest).flatten()
        k = max_rows - top.numel()
        even = rest_rows[even_rows(rest_rows.numel(), k).to(rest_rows.device)]
        ones = torch.ones(top.numel(), dtype=torch.float64, device=energy.device)
        # the weights' sums (sizes, subnormals, the grid) from evenly spaced rows, each standing for as many rows
        rows_b = torch.cat([top, even])
        w_b = torch.cat([ones, torch.full((even.numel(),), rest_rows.numel() / max(1, even.numel()), dtype=torch.float64,
                                          device=energy.device)])
        # ΔW's (one-step share, flushing's effect, changed entries) from rows drawn in proportion to their ‖ΔW‖² (systematic
        # sampling), each standing for an equal part of the others' energy: an update spread over more rows than the top
        # ones is seen in proportion whichever rows hold it (evenly spaced rows missed 24 of 40 flipped rows, no note; or
        # 184 of 200 learned rows, a false one)
        e2 = energy[rest_rows] ** 2
        rest_sq = float(e2.sum())
        picked, mult = torch.unique(torch.searchsorted(torch.cumsum(e2, 0), (torch.arange(k, dtype=torch.float64, device=e2.device) + 0.5)
                                                       * (rest_sq / max(k, 1))).clamp(max=max(e2.numel() - 1, 0)), return_counts=True) \
            if rest_sq > 0 and k > 0 else (torch.zeros(0, dtype=torch.long, device=e2.device), None)
        drawn = rest_rows[picked]
        w_a = mult * (rest_sq / k) / e2[picked] if mult is not None else torch.zeros(0, dtype=torch.float64, device=e2.device)
        both = torch.cat([rows_b, drawn])  # the top rows once: both estimates count them exactly
        b_rows, t_rows = rows_of(both.cpu()) if b2 is None or t2 is None else (b2[both.to(b2.device)], t2[both.to(t2.device)])
        nt, nb = top.numel(), rows_b.numel()
        finer_base = finer_dtype and not _on_grid(b_rows[:nb], tuned_dtype, block)
        step = eps / 2 if finer_base else eps
        part = [_pass(b_rows[i:j], t_rows[i:j], d2[both[i:j]], step, tiny_b, tiny_t, block, weight=w.to(d2.device), norms=n and base_sq is None,
                      delta_sq=False) for i, j, w, n in ((0, nt, ones, True), (nt, nb, w_b[nt:], True), (nb, both.numel(), w_a, False))]
        # the weights' sums: top + evenly spaced rows; ΔW's: top + rows drawn by their energy
        s = {key: part[0][key] + part[1 if key not in ("ulp_sq", "flush_sq", "nonzero", "ulp") else 2][key]
             for key in part[0] if key != "finite"}
        s["finite"] = all(x["finite"] for x in part)
        s["delta_sq"] = float((energy**2).sum())
        for key in ("nonzero", "ulp", "sub_b", "sub_t"):
            s[key] = int(round(s[key]))
        b2, t2 = b_rows[:nb], t_rows[:nb]  # the grid check samples from these
        sampled = torch.unique(both).numel()
        where = f" (estimated from {sampled} of {total_rows} rows: the {top.numel()} that changed most, and a sample of the others)"
    if base_sq is not None:  # exact, from the caller's pass over every element
        s["base_sq"] = s["tuned_sq"] = float(base_sq)  # ‖W_tuned‖ ≈ ‖W_base‖ at the precision these ratios need
    if s["delta_sq"] == 0.0 or not s["finite"]:
        return []
    notes: list[NumericNote] = []
    fro = s["delta_sq"] ** 0.5
    n = total_rows * cols

    # (1) subnormals: flushing them to zero changes ΔW_ij by b_ij where the base's is subnormal and by −t_ij where
    # the tuned's is: exactly that, summed (a bound of ‖b_sub‖ + ‖t_sub‖ said 15% where flushing moved 0.02%,
    # as both sides' subnormals of one entry mostly cancel)
    effect = s["flush_sq"] ** 0.5 / fro
    if (s["sub_b"] or s["sub_t"]) and effect >= SUBNORMAL_EFFECT:
        sides = ", ".join(f"{side} {k} ({k / n:.2%}, below {tiny:.3g} in {dt})"
                          for side, k, tiny, dt in (("base", s["sub_b"], tiny_b, base_dtype), ("tuned", s["sub_t"], tiny_t, tuned_dtype)) if k)
        notes.append(NumericNote("subnormal", (
            f"subnormal values: {sides}{where}; spectra computes in float64 and keeps them, but hardware that flushes "
            f"denormals to zero would see a ΔW different by {effect:.1%} of ‖ΔW‖_F")))

    # (2) rounding level: ≤ 1-ulp changes carry most of ‖ΔW‖².
    rounding = False
    if eps is not None and s["nonzero"]:
        coarse = tuned_dtype if eps_t is not None else base_dtype
        share = min(s["ulp_sq"] / s["delta_sq"], 1.0)  # sampled rows scaled up can estimate above the exact total
        if share >= ROUNDING_ENERGY:
            rounding = True  # either way, (5)'s mixed-precision rounding is said by this note
            mixed = f" (base {base_dtype}, tuned {tuned_dtype})" if base_dtype != tuned_dtype else ""
            steps = (f"{min(s['ulp'] / s['nonzero'], 1.0):.0%} of its {s['nonzero']} nonzero entries{where}, carrying "
                     f"{share:.0%} of ‖ΔW‖_F², changed by at most one rounding step (|ΔW_ij| ≤ "
                     f"{'ε/2' if finer_base else 'ε'}·|W_ij|, ε = {eps:.3g})")
            # entries of one step are not enough: a sub-ulp learned update rounds to flips that average to it
            # (a rank-1 pattern of them was called noise), so the spectrum's top is asked too; of the change on the
            # tuned grid only (TUNED − BASE rounded to it): converting a finer base's repeated values rounds them
            # alike, a low-rank error that is no update (a constant matrix's bf16 copy was called learned)
            moved = d2 if not finer_base else (
                tuned.reshape(-1, cols).to(d2.dtype) - base.reshape(-1, cols).to(getattr(torch, tuned_dtype)).to(d2.dtype))
            sigma, edge = _top_singular_lower(moved)
            if sigma > RESOLVED_MARGIN * edge:
                what = ONE_GRID_TOP if not finer_base else (
                    f"the top singular value of the change beyond rounding the base to {coarse} (TUNED − BASE rounded)")
                notes.append(NumericNote("rounding_steps", (
                    f"{STEPS_START}{coarse}{mixed}: {steps}; yet {what} "
                    f"is at least {_down3(sigma)}, {sigma / edge:.1f}× the {edge:.3g} (largest row norm + largest column "
                    f"norm) under which independent rounding noise of those entries stays: its top directions are a "
                    f"learned update rounded entry by entry, and energy ranks also count that rounding, spread over all directions")))
            else:
                rel = fro / s["base_sq"] ** 0.5 if s["base_sq"] > 0 else float("inf")
                notes.append(NumericNote("rounding_level", (
                    f"{LEVEL_START}{coarse}{mixed}: {steps}; ‖ΔW‖_F/‖W‖_F = {rel:.3g} against a unit roundoff of "
                    f"{eps / 2:.3g}; and its top singular value stays within {RESOLVED_MARGIN:g}× the {edge:.3g} (largest row "
                    f"norm + largest column norm) that independent rounding noise of those entries reaches: its spectrum "
                    f"is not resolved from rounding noise (a learned update this small, rounded entry by entry, cannot be "
                    f"told from none)")))

    # (3) quantisation grids (sampled rows).
    grid = _grid_note(b2, t2, base_dtype, tuned_dtype, sample_rows)
    # (5) mixed precisions: the rounding of W into the coarser dtype is part of ΔW.
    # (a base stored finer whose values are on the tuned grid needs no rounding: nothing to say)
    if not rounding and grid is None and eps_b is not None and eps_t is not None and eps_b != eps_t and (finer_base or not finer_dtype):
        fine_sq = s["base_sq"] if eps_b < eps_t else s["tuned_sq"]
        coarse_eps = max(eps_b, eps_t)
        est = _ROUND_ENERGY_PER_EPS2 * coarse_eps**2 * fine_sq
        share = est / s["delta_sq"]
        if share >= MISMATCH_ENERGY:
            fine, coarse = (base_dtype, tuned_dtype) if eps_b < eps_t else (tuned_dtype, base_dtype)
            # a tuned side stored coarser was rounded when saved: certain; a base stored coarser was rounded
            # only if TUNED came from a finer original of it (not when it was tuned from these weights)
            when = "" if eps_b < eps_t else f"if TUNED was made from a {fine} original of this base rather than from its {coarse} weights, "
            notes.append(NumericNote("precision_mismatch", (
                f"base is {base_dtype} and tuned {tuned_dtype}: {when}ΔW includes rounding W from {fine} to {coarse}, "
                f"≈ {min(share, 1.0):.1%} of ‖ΔW‖_F² (0.045·ε²·‖W‖_F², ε = {coarse_eps:.3g}), spread over all directions; "
                f"energy ranks at τ ≥ {max(0.0, 1 - share):.3g} measure that rounding, not the update")))
    if grid is not None:
        notes.append(grid)
    return notes


def unresolved_text(whose: str, dtypes: str, plural: bool = False) -> str:
    """The one wording, in every command, of a non-zero update with no singular value above the rounding
    floor of its stored weights (:func:`rounding_floor`): ``whose`` names the update(s) ("ΔW", "A's
    update"), ``dtypes`` their stored dtype(s), ``plural`` when ``whose`` names several updates.

    Example:
        >>> unresolved_text("ΔW", "bfloat16")
        'every singular value of ΔW is at the rounding level of its bfloat16 weights: no resolved direction'
    """
    return (f"every singular value of {whose} is at the rounding level of {'their' if plural else 'its'} {dtypes} weights: "
            f"no resolved direction{'s' if plural else ''}")


def unit_roundoff(dtype: str) -> float:
    """The unit roundoff ``u = torch.finfo(dtype).eps / 2`` of a stored dtype (bfloat16 2⁻⁸, float32 2⁻²⁴): each stored
    value is within ``u·|x|`` of what was rounded; 0 for integer or unknown dtypes."""
    eps = storage_eps(dtype)
    return eps / 2 if eps is not None else 0.0


def storage_eps(dtype: str) -> float | None:
    """``torch.finfo(dtype).eps`` (one ulp at 1.0), or None for integer / unknown dtypes."""
    tdtype = getattr(torch, dtype, None)
    if not isinstance(tdtype, torch.dtype) or not tdtype.is_floating_point:
        return None
    return float(torch.finfo(tdtype).eps)


def tiny_threshold(x: torch.Tensor | None, dtype: str) -> float | None:
    """Smallest normal of the stored dtype when ``x`` holds values in that dtype's units (None: read as stored);
    None when ``x`` was dequantised (scaled codes: subnormality of the codes cannot be seen in the values)."""
    tdtype = getattr(torch, dtype, None)
    if not isinstance(tdtype, torch.dtype) or not tdtype.is_floating_point:
        return None
    if x is not None and x.dtype != tdtype:
        rows = even_rows(x.shape[0], 16)
        sample = x[rows]
        if not torch.equal(sample.to(tdtype).to(sample.dtype), sample):
            return None  # not representable as stored: scaled (dequantised) values
    return float(torch.finfo(tdtype).tiny)


def _pass(b: torch.Tensor, t: torch.Tensor, d: torch.Tensor, eps: float | None,
          tiny_b: float | None, tiny_t: float | None, block: int, weight: torch.Tensor | None = None,
          norms: bool = True, delta_sq: bool = True) -> dict:
    """One O(elements) pass in row blocks; sums in float64, one host sync at the end. With ``weight``
    (float64, one per row) every sum and count is weighted by row, and the counts come back as floats.
    ``norms``/``delta_sq`` False: the caller has ``‖W‖²``/``‖ΔW‖²`` already; those sums stay 0 (each is a
    few small kernels per block, and at these sizes the kernels' overhead is the pass's cost)."""
    dev = d.device
    work = d.dtype if d.dtype.is_floating_point else torch.float32
    acc = {k: torch.zeros((), dtype=torch.float64, device=dev)
           for k in ("delta_sq", "base_sq", "tuned_sq", "ulp_sq", "flush_sq")}
    cnt = {k: torch.zeros((), dtype=torch.int64 if weight is None else torch.float64, device=dev)
           for k in ("nonzero", "ulp", "sub_b", "sub_t")}
    finite = torch.ones((), dtype=torch.bool, device=dev)
    # blocks of whole rows, or of a row's columns when one row is longer than a block (a 1×N matrix:
    # the temporaries below, a few times a block each, would otherwise be a few times the row)
    step = max(1, min(d.shape[1], block))
    rows = max(1, block // step)
    for r, c in ((r, c) for r in range(0, d.shape[0], rows) for c in range(0, d.shape[1], step)):
        db = d[r : r + rows, c : c + step].to(work)
        bs = b[r : r + rows, c : c + step].to(dev).to(work)
        ts = t[r : r + rows, c : c + step].to(dev).to(work)
        bb, tb = bs.abs(), ts.abs()
        w = None if weight is None else weight[r : r + rows, None]

        def total(x: torch.Tensor, w: torch.Tensor | None = w) -> torch.Tensor:  # w bound now: this block's weights
            return x.sum() if w is None else (x * w).sum()

        finite &= torch.isfinite(db).all()
        d64 = db.double()
        if delta_sq:
            acc["delta_sq"] += total(d64 * d64)
        if norms:
            acc["base_sq"] += total(bb.double() ** 2)
            acc["tuned_sq"] += total(tb.double() ** 2)
        nz = db != 0
        cnt["nonzero"] += total(nz)
        if eps is not None:
            # one ulp at x is ε·2^floor(log2|x|) ≤ ε·|x|; the slack absorbs float32 rounding of the product
            # a subnormal's step is the format's smallest one, ε·tiny, not ε·|x| (fp16 weights of 1e-6 flipped by
            # one bit read as an update of many steps): the magnitude is taken at least the smallest normal
            mag = torch.maximum(bb, tb) if tiny_t is None else torch.clamp(torch.maximum(bb, tb), min=tiny_t)
            small = nz & (db.abs() <= mag * (eps * (1 + 1e-3)))
            cnt["ulp"] += total(small)
            acc["ulp_sq"] += total(d64 * d64 * small)
        flushed = None  # what flushing the subnormals to zero changes ΔW by: b on base's, −t on tuned's
        for side, x, signed, sign, tiny in (("sub_b", bb, bs, 1.0, tiny_b), ("sub_t", tb, ts, -1.0, tiny_t)):
            if tiny is not None:
                sub = (x > 0) & (x < tiny)
                cnt[side] += total(sub)
                part = sign * signed.double() * sub
                flushed = part if flushed is None else flushed + part
        if flushed is not None:
            acc["flush_sq"] += total(flushed * flushed)
    # one host sync for every sum (each .item() is one)
    values = torch.stack([*acc.values(), *(c.double() for c in cnt.values()), finite.double()]).tolist()
    out: dict = dict(zip(acc, values[: len(acc)]))
    out.update({k: (int(v) if weight is None else v) for k, v in zip(cnt, values[len(acc) : -1])})
    out["finite"] = bool(values[-1])
    return out


def _down3(x: float) -> str:
    """``x`` to three significant digits rounded down, with a relative 1e-5 off first (float32 products can pass σ₁ by
    ~2e-7): a lower bound printed as one. ``_down3(1.2356) == "1.23"``."""
    x *= 1 - 1e-5
    if not 0 < x < math.inf:
        return f"{max(x, 0.0):.3g}"
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    return f"{math.floor(x / step) * step:.3g}"


def edge_norm(a: torch.Tensor, b: torch.Tensor | None = None, work: torch.dtype | None = None, block: int = 1 << 22) -> float:
    """``max_i ‖x[i, :]‖₂ + max_j ‖x[:, j]‖₂`` of ``x = a − b`` (``b`` None: ``a``), formed in ``work`` (default ``a``'s
    dtype): about the largest singular value independent noise of these entries reaches (the certificate's and
    :func:`spectra.storage_floor.certified_floor`'s one measure). Above ``block`` entries, ``x`` is formed a block of rows at a time and the
    norms summed in float64: a full-size difference (or float64 copy) of a large embedding is memory the run's plan does
    not count. NaN propagates as in one max over every row."""
    work = work or a.dtype
    if a.ndim != 2 or a.numel() <= block or a.shape[0] == 0:
        x = a.to(work) - b.to(work) if b is not None else a.to(work)
        return float(torch.linalg.vector_norm(x, dim=1).max()) + float(torch.linalg.vector_norm(x, dim=0).max())
    rows, cols = None, None
    for part in row_blocks(a.shape[0], a.shape[1], block):
        d = (a[part].to(work) - b[part].to(work) if b is not None else a[part].to(work)).double()
        r, c = torch.linalg.vector_norm(d, dim=1).max(), torch.linalg.vector_norm(d, dim=0)
        rows = r if rows is None else torch.maximum(rows, r)  # (torch.maximum keeps a NaN)
        cols = c if cols is None else torch.hypot(cols, c)  # a column's norm over the blocks, without squaring
    return float(rows) + float(cols.max())  # type: ignore[union-attr]


def _top_singular_lower(d: torch.Tensor) -> tuple[float, float]:
    """``(σ, edge)`` of a 2-D ΔW: ``σ ≤ σ₁(d)`` from :data:`RESOLVED_STEPS` power-iteration steps (``‖d v‖`` for a
    unit ``v`` never exceeds σ₁; stops once above ``RESOLVED_MARGIN·edge``), and ``edge = max_i ‖d[i, :]‖₂ +
    max_j ‖d[:, j]‖₂``, in d's units. Float32 work (float64 for float64 input): the margin dwarfs its rounding."""
    x = d if d.dtype in (torch.float32, torch.float64) else d.float()
    edge = edge_norm(x)
    v = x[int(torch.linalg.vector_norm(x, dim=1).argmax())].clone()  # the largest row: a rank-1 update's right vector at once
    sigma = 0.0
    for _ in range(RESOLVED_STEPS):
        norm = float(torch.linalg.vector_norm(v))
        if not 0.0 < norm < math.inf:
            break
        y = x @ (v / norm)
        sigma = max(sigma, float(torch.linalg.vector_norm(y)))
        if sigma > RESOLVED_MARGIN * edge:
            break
        v = x.T @ y
    return sigma, edge


def _on_grid(b: torch.Tensor, dtype: str, block: int) -> bool:
    """Whether every value of ``b`` (2-D, rows as read) is exactly representable in the stored dtype ``dtype``
    (a float32 copy of bf16 weights is); False for a dtype torch does not know. Row blocks of ``block`` elements."""
    tdt = getattr(torch, dtype, None)
    if not isinstance(tdt, torch.dtype) or not tdt.is_floating_point or b.numel() == 0:
        return False
    rows = max(1, block // max(1, b.shape[1]))
    return all(bool((x.to(tdt).to(x.dtype) == x).all()) for x in (b[r : r + rows] for r in range(0, b.shape[0], rows)))


def even_rows(n: int, k: int) -> torch.Tensor:
    """``min(n, k)`` evenly spaced row indices, first and last included (deterministic): ``i·(n−1)/(k−1)``
    rounded half to even, in exact integer arithmetic (a float32 linspace loses integers past 2^24 rows
    and indexed past the end)."""
    k = min(n, k)
    if k <= 1:
        return torch.zeros(max(k, 0), dtype=torch.long)
    num = torch.arange(k, dtype=torch.long) * (n - 1)  # ≤ 2^31 · k: far inside int64
    q, r = num // (k - 1), num % (k - 1)
    up = (2 * r > k - 1) | ((2 * r == k - 1) & (q % 2 == 1))
    return q + up.long()


def _distinct(rows: torch.Tensor) -> torch.Tensor:
    """Number of distinct values in each row of a 2-D finite tensor (one sort for all rows; -0.0 and
    0.0 count once, as in :func:`torch.unique`)."""
    s = torch.sort(rows, dim=1).values
    return 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)


def _grid_note(b: torch.Tensor, t: torch.Tensor, base_dtype: str, tuned_dtype: str, sample_rows: int) -> NumericNote | None:
    """The ``quantisation_grid`` note, or None."""
    long_rows = b.shape[1] >= GRID_MIN_ROW
    if not long_rows and base_dtype not in _QUANTISED_DTYPES and tuned_dtype not in _QUANTISED_DTYPES:
        return None  # rows too short to judge by their values, and neither dtype is a grid
    rows = even_rows(b.shape[0], sample_rows)
    # at most GRID_SAMPLE_COLS evenly spaced columns, the same on both sides: a grid's few levels show in
    # any such sample, and the sorts below stay small for rows of millions of entries
    cols = even_rows(b.shape[1], GRID_SAMPLE_COLS)
    sb = b[rows.to(b.device)[:, None], cols.to(b.device)[None, :]].to(torch.float64).cpu()
    st = t[rows.to(t.device)[:, None], cols.to(t.device)[None, :]].to(torch.float64).cpu()
    levels_b, levels_t = _distinct(sb), _distinct(st)

    def looks(levels: torch.Tensor, dtype: str) -> str | None:
        if dtype in _QUANTISED_DTYPES:
            return f"stored as {dtype}"
        if long_rows and levels.numel() and bool((levels <= GRID_MAX_LEVELS).all()):
            return (f"≤ {int(levels.max())} distinct values in each of {levels.numel()} sampled rows "
                    f"of {b.shape[1]}, as int8/int4-dequantised weights")
        return None

    qb, qt = looks(levels_b, base_dtype), looks(levels_t, tuned_dtype)
    fp8 = base_dtype == tuned_dtype and base_dtype in _QUANTISED_DTYPES and storage_eps(base_dtype) is not None
    if fp8 and _on_grid(sb, base_dtype, sb.numel()) and _on_grid(st, tuned_dtype, st.numel()):
        return None  # two unscaled fp8 sides: one number format, as bf16 and bf16 (its steps are (2)'s to judge)
    if qb and qt:
        ratios = _distinct(torch.cat([sb, st], dim=1)) / torch.clamp(torch.maximum(levels_b, levels_t), min=1)
        ratio = float(ratios.max()) if ratios.numel() else 0.0
        if ratio <= GRID_UNION_RATIO:
            return None  # same grid: ΔW is made of grid steps, the update as well as it can be stored
        return NumericNote("quantisation_grid", (
            f"base ({qb}) and tuned ({qt}) are quantised on different grids (a sampled row holds "
            f"{ratio:.1f}x more distinct values over both sides than over one): ΔW includes the "
            f"quantisation error of both, which is near full rank"))
    if qb or qt:
        side, why, other = ("base", qb, "tuned") if qb else ("tuned", qt, "base")
        return NumericNote("quantisation_grid", (
            f"{side} appears quantised ({why}) and {other} does not: ΔW includes quantisation error, which is "
            f"near full rank and inflates energy ranks"))
    return None


__all__ = ["NOTE_ROWS", "NumericNote", "edge_norm", "even_rows", "numeric_flags", "numeric_notes", "storage_eps", "tiny_threshold",
           "unit_roundoff"]
