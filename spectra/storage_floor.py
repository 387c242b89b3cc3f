"""The storage rounding floor of ΔW's singular values: the largest one that rounding the stored weights can put
into an update (:func:`rounding_floor`; from row blocks read one at a time, :func:`rounding_floor_rows`), lowered or
raised by the numerical caveats' one-grid certificate (:func:`certified_floor`). Values at or below it are rounding of
the stored weights, not directions of the update (docs/definitions.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from spectra.numerics import LEVEL_START, ONE_GRID_TOP, RESOLVED_MARGIN, STEPS_START, edge_norm, storage_eps, tiny_threshold

#: The rounding floor's margin above the expected top singular value of the storage rounding noise:
#: a finite matrix's top value fluctuates above its expectation by a few percent.
FLOOR_MARGIN = 1.5


def rounding_floor(W_tuned: torch.Tensor, tuned_dtype: str, W_base: torch.Tensor | None = None, *,
                   block: int = 1 << 22, delta: torch.Tensor | None = None) -> float:
    """The largest singular value that rounding the tuned weights to their stored dtype can put into ΔW.

    Each stored element ``x`` of ``W_tuned`` was rounded with an error of at most ``u·|x|`` (``u`` the
    unit roundoff of the stored dtype, ``torch.finfo(dtype).eps / 2``: float64 2⁻⁵³, float32 2⁻²⁴,
    float16 2⁻¹¹, bfloat16 2⁻⁸, float8_e4m3fn 2⁻⁴, float8_e5m2 2⁻³; relative to each value, so fp8
    dequantised with a scale too), uniform within that bound: ΔW holds a random full-rank matrix of
    independent entries of standard deviation at most ``u·|x|/√3``, in the rows and columns the
    fine-tune changed: a row or column stored equal on both sides is exactly 0 in ΔW (the untouched
    rows of an embedding, a frozen outlier channel add no noise), while an unchanged entry of a
    changed row may hold an update rounded away (up to half a unit in the last place, which a small
    learning rate leaves on most entries). Such a matrix's largest singular
    value is at most about the largest row norm plus the largest column norm of those deviations
    (Latała; Bandeira and van Handel): ``(√out + √in)·σ`` for entries of one scale σ (the
    Marchenko–Pastur edge), and the outlier rows or columns of real LLM weights where they dominate.
    The floor is that bound times :data:`FLOOR_MARGIN`:

        ``floor = 1.5 · u/√3 · (max_i ‖X[i, :]‖₂ + max_j ‖X[:, j]‖₂)``,  ``X = W_tuned`` where its row and
        its column each hold an entry that differs from ``W_base``, else 0

    in the weights' units (as ΔW's singular values). Only the tuned side is counted: the base as
    stored is where the fine-tune started (a base stored in another precision than training started
    from is the ``precision_mismatch`` caveat). An integer or unknown dtype (an int8 grid, whose error
    depends on a scale its values do not carry) has floor 0: its quantisation is the
    ``quantisation_grid`` caveat. An empty matrix has floor 0.

    Args:
        W_tuned: ``(out, in)`` tuned weights as analysed (any float dtype, any device; oriented either way).
        tuned_dtype: the stored dtype name (``"float32"``, ``"bfloat16"``…).
        W_base: the base weights, same shape and orientation; None: every row and column counts as changed.
        block: elements per float64 block (no full float64 copy).
        delta: ΔW as :func:`spectra.delta.form_delta` formed it from these weights, when at hand: its nonzero rows
            and columns are the changed ones (``t − b = 0`` exactly when ``t = b``), which saves the comparing pass.

    Example:
        >>> W = torch.full((4096, 4096), 0.02)
        >>> round(rounding_floor(W, "bfloat16"), 6)   # 1.5 · 2⁻⁸/√3 · 2 · 0.02 · √4096
        0.00866
        >>> rounding_floor(W, "bfloat16", W.clone())   # nothing changed: no rounding in ΔW
        0.0
        >>> T = W.clone(); T[0, 0] += 1
        >>> round(rounding_floor(T, "bfloat16", W), 6)   # one entry changed: 1.5 · 2⁻⁸/√3 · 2 · 1.02
        0.006901
        >>> rounding_floor(W, "int8")
        0.0
    """
    eps = storage_eps(tuned_dtype)
    if eps is None or W_tuned.ndim != 2 or W_tuned.numel() == 0:
        return 0.0
    # float32 work and sums for narrower weights (a bound with a 1.5 margin needs no more): a fifth of the
    # time of a float64 pass, the floor being asked of every dense update; squares out of float32's range
    # (weights beyond ~1e17 or below ~1e-19) give an infinite or zero bound: then again in float64
    wide = torch.float64 in (W_tuned.dtype, getattr(W_base, "dtype", None))
    tiny = tiny_threshold(W_tuned, tuned_dtype) or 0.0  # a subnormal's rounding is u·tiny, not u·|x| (None: scaled values)
    bound = _norm_bound(W_tuned, W_base, torch.float64 if wide else torch.float32, block, tiny, delta)
    if not wide and not 0.0 < bound < math.inf:
        bound = _norm_bound(W_tuned, W_base, torch.float64, block, tiny, delta)
    return _floor_of(eps, bound)


def _floor_of(eps: float, bound: float) -> float:
    """The floor ``1.5 · u/√3 · bound`` (``u = eps/2``) of :func:`rounding_floor`'s row-plus-column norm ``bound``; 0 when
    the bound is not finite."""
    return FLOOR_MARGIN * eps / 2 / math.sqrt(3) * bound if math.isfinite(bound) else 0.0


def rounding_floor_rows(tuned: Callable[[slice], torch.Tensor], shape: tuple[int, int], tuned_dtype: str, delta: torch.Tensor,
                        block: int = 1 << 22) -> float:
    """:func:`rounding_floor` of a pair whose ΔW is formed and whose tuned weights are read again a block of rows at a time
    (``tuned(rows)``: rows of ``W_tuned`` ``(out, in)`` as stored; a pair too large to hold beside its ΔW): the changed
    rows and columns from ``delta`` (``W_tuned − W_base`` as :func:`spectra.delta.form_delta_blocks` formed it), the norms
    from the blocks, on ``delta``'s device. The same number as :func:`rounding_floor` of the whole tensors."""
    eps = storage_eps(tuned_dtype)
    if eps is None or 0 in shape:
        return 0.0
    tiny = tiny_threshold(None, tuned_dtype) or 0.0  # read as stored
    rows = max(1, block // shape[1])
    on = _changed(lambda r: delta[r].float().abs(), shape, delta.device, torch.float32, rows)  # 0/1: exact in either dtype
    bound = _masked_norms(tuned, shape, delta.device, torch.float32, rows, tiny, on)
    if not 0.0 < bound < math.inf:  # float32's squares left its range (as rounding_floor): again in float64
        bound = _masked_norms(tuned, shape, delta.device, torch.float64, rows, tiny, (on[0].double(), on[1].double()))
    return _floor_of(eps, bound)


def certified_floor(floor: float, notes: Sequence[str], W_tuned: torch.Tensor | None, W_base: torch.Tensor | None, *,
                    delta: torch.Tensor | None = None) -> float:
    """``floor`` (:func:`rounding_floor`), lowered for a ΔW whose ``rounding_steps`` certificate fired on one grid
    (``notes``: :func:`numeric_notes` of the pair) to :data:`RESOLVED_MARGIN` × (largest row norm + largest column norm
    of ΔW), the ceiling of independent one-step noise of its entries that the certificate rests on; raised to that
    ceiling for a ΔW on one grid said to be at the rounding level (the certificate did not fire), whose singular values
    between the two diff called rounding noise while compare, trace and extract counted them as directions.

    The ``u·|x|`` floor assumes every entry carries a rounding error of up to half a step; a sub-step update of
    weights already on the grid moves a few entries by one step, with an error far smaller, so that floor sat 20×
    above the certified top value and trace, extract and compare called a learned direction unresolved while diff
    called it resolved. A finer base's note certifies the change beyond its conversion, which the floor still covers.

    Args:
        W_tuned, W_base: ``(out, in)`` as analysed (any float dtype, one device); None for a pair not held whole
            (:func:`rounding_floor_rows`), whose ``delta`` is then used.
        delta: ``W_tuned − W_base`` when at hand (:func:`spectra.delta.form_delta`'s, float32 or float64): used as it
            is, rather than a second full-size difference (a 100k-row bf16 embedding's cost 1.2 GB more at the peak).
    """
    steps = any(n.startswith(STEPS_START) and f"; yet {ONE_GRID_TOP} is at least" in n for n in notes)
    if not (steps or raises_floor(notes)):
        return floor
    if W_tuned is None or W_base is None:
        if delta is None:
            raise ValueError("certified_floor needs W_tuned and W_base, or delta")
        edge = edge_norm(delta)
    else:
        work = torch.float64 if torch.float64 in (W_tuned.dtype, W_base.dtype) else torch.float32  # (float32 loses a float64 ΔW)
        usable = delta is not None and delta.dtype in (work, torch.float64) and delta.shape == W_tuned.shape
        edge = edge_norm(delta) if usable else edge_norm(W_tuned, W_base, work)  # type: ignore[arg-type]
    if not math.isfinite(edge):
        return floor
    return min(floor, RESOLVED_MARGIN * edge) if steps else max(floor, RESOLVED_MARGIN * edge)


def raises_floor(notes: Sequence[str]) -> bool:
    """Whether :func:`certified_floor` raises the floor of a ΔW with these notes: a ΔW on one grid whose top value stays
    under the noise ceiling is said to be unresolved from rounding noise (``rounding_level``), so its floor is at least
    that ceiling and no command counts directions in it."""
    return any(n.startswith(LEVEL_START) and " (base " not in n.partition(":")[0] for n in notes)


def _norm_bound(W_tuned: torch.Tensor, W_base: torch.Tensor | None, work: torch.dtype, block: int, tiny: float = 0.0,
                delta: torch.Tensor | None = None) -> float:
    """``max_i ‖X[i, :]‖₂ + max_j ‖X[:, j]‖₂`` of :func:`rounding_floor`'s ``X`` (each ``|x|`` taken at least ``tiny``,
    the smallest normal, below which the rounding step stops shrinking), in ``work`` precision.

    In float arithmetic only: torch's elementwise kernels on bool and half tensors (``!=``, ``any``, ``where``) ran
    several times slower than float ones here (a 1536 × 576 bf16 pair: 5.9 against 2.0 ms at best), and the floor is
    asked of every dense update. A row or column changed where ``|t − b|`` is nonzero there (for finite weights
    ``t − b = 0`` exactly when ``t = b``, subnormals included; a NaN or infinite entry counts as changed)."""
    rows = max(1, block // W_tuned.shape[1])
    dev = W_tuned.device
    if delta is not None and (delta.device != dev or delta.shape != W_tuned.shape):
        delta = None  # a GPU's ΔW would cross the bus back: the CPU pair is compared instead
    whole = None  # the tuned weights in ``work`` kept from the first pass when they are one block (no second upcast)

    def changed(r: slice) -> torch.Tensor:
        nonlocal whole
        if delta is not None:
            return delta[r].to(device=dev, dtype=work).abs()
        xt = W_tuned[r].to(work)
        whole = xt if rows >= W_tuned.shape[0] else None
        return (xt - W_base[r].to(work)).abs()  # type: ignore[index]

    on = _changed(changed, tuple(W_tuned.shape), dev, work, rows) if W_base is not None else None
    return _masked_norms(lambda r: whole if whole is not None else W_tuned[r], tuple(W_tuned.shape), dev, work, rows, tiny, on)


def _changed(diff: Callable[[slice], torch.Tensor], shape: tuple[int, int], dev: torch.device, work: torch.dtype,
             rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_on, col_on)``: 1 for each row and column where ``diff(rows)`` (``|t − b|`` of a block of rows, ``work``)
    holds a nonzero entry, else 0 (NaN propagates: changed)."""
    row_on = torch.ones(shape[0], dtype=work, device=dev)
    col_max = torch.zeros(shape[1], dtype=work, device=dev)
    for r in range(0, shape[0], rows):
        a = diff(slice(r, r + rows))
        row_on[r : r + rows] = (a.amax(dim=1) != 0).to(work)
        col_max = torch.maximum(col_max, a.amax(dim=0))
    return row_on, (col_max != 0).to(work)


def _masked_norms(tuned: Callable[[slice], torch.Tensor], shape: tuple[int, int], dev: torch.device, work: torch.dtype,
                  rows: int, tiny: float, on: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """``max_i ‖X[i, :]‖₂ + max_j ‖X[:, j]‖₂`` of ``X``, the tuned weights (``tuned(rows)``: a block of rows) where
    ``on`` (:func:`_changed`; None: everywhere) marks both the row and the column changed, each ``|x|`` at least ``tiny``."""
    row_sq = torch.zeros((), dtype=work, device=dev)
    col_sq = torch.zeros(shape[1], dtype=work, device=dev)
    for r in range(0, shape[0], rows):
        x = tuned(slice(r, r + rows)).to(device=dev, dtype=work)
        if tiny > 0.0:
            x = torch.clamp(x.abs(), min=tiny)
        if on is not None:
            x = x * on[0][r : r + rows, None] * on[1]  # masked before squaring: an unchanged huge entry's square may overflow
        sq = x * x
        row_sq = torch.maximum(row_sq, sq.sum(dim=1).max())
        col_sq += sq.sum(dim=0)
    return math.sqrt(float(row_sq)) + math.sqrt(float(col_sq.max()))
