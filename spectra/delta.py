"""Forming ΔW = W_tuned − W_base: the one place where stored tensors are oriented to ``(out, in)``,
upcast and subtracted (docs/definitions.md: never subtract in bf16/fp16), with the NaN/Inf and overflow checks
and the numerical caveats of each update (:mod:`spectra.numerics`).

Everything that needs a dense update (``diff``, ``compare``, ``extract``, ``trace``, ``interfere``)
forms it here, so how ΔW is formed has one home.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from spectra.io.checkpoint import Checkpoint, TensorInfo
from spectra.linalg import row_blocks
from spectra.numerics import NOTE_ROWS, numeric_notes
from spectra.pairing import MatrixPair
from spectra.selection import Task, Unit
from spectra.storage_floor import FLOOR_MARGIN, certified_floor, rounding_floor, rounding_floor_rows


@dataclass
class Prepared:
    """A unit ready for the engine: ΔW (float32, CPU) and the base norm, or why it is skipped."""

    unit: Unit
    task: Task
    delta: torch.Tensor | None
    base_fro: float
    skip: str | None = None
    base: torch.Tensor | None = None  # W_base upcast, only with DiffConfig.weight_spectra
    note: str = ""  # numerical caveats of this ΔW (spectra.numerics)
    floor: float = 0.0  # storage rounding floor of ΔW's singular values (pair_floor), only when asked for
    caveats: tuple[str, ...] = ()  # the notes one by one: certified_floor reads the rounding_steps one alone
    floor_known: bool = False  # ``floor`` was computed (else 0.0 stands for "not asked")


def oriented(w: torch.Tensor, transpose: bool, rows: int | None) -> torch.Tensor:
    """A view of ``w`` in ``(…, out, in)`` orientation (each side by its own storage layout),
    restricted to the shared leading rows; stored dtype (upcast block by block in :func:`form_delta`)."""
    if transpose:
        w = w.mT
    if rows is not None:
        w = w[..., :rows, :]
    return w


def prepare(task: Task, base: Checkpoint, tuned: Checkpoint, device: torch.device, keep_base: bool = False,
            floors: bool = False) -> list[Prepared]:
    """Read one tensor pair and form ΔW on ``device`` for each of its units (runs in a reader thread);
    with ``floors`` also each ΔW's storage rounding floor (:func:`pair_floor`, one more pass over the pair), and
    without it too for a tuned side stored narrower than float32 (:func:`floor_when_read`)."""
    pair = task.pair
    floors = floors or floor_when_read(pair.tuned_info.dtype)
    if not keep_base and reads_by_rows(task, base, tuned):
        return [_prepare_by_rows(task, base, tuned, device, floors)]
    wb = oriented(base.load(pair.base.name), pair.base.transpose, pair.rows)
    wt = oriented(tuned.load(pair.tuned.name), pair.tuned.transpose, pair.rows)
    out = []
    for unit in task.units:
        b, t = unit_tensors(unit, wb, wt)
        delta, base_fro, bad = form_delta(b, t, device)
        if bad:
            out.append(_skipped(unit, task, bad))
        else:
            notes = pair_notes(pair, b, t, delta, base_fro)  # base_fro²: inf, not OverflowError, past 1e154
            out.append(Prepared(unit, task, delta, base_fro, base=b.to(device=device, dtype=delta.dtype, copy=True) if keep_base else None,
                                 note="; ".join(notes), floor=pair_floor(pair, b, t, notes, delta) if floors else 0.0,
                                 caveats=tuple(notes), floor_known=floors))
    return out


#: Elements from which a float32 pair is formed from row blocks read one at a time (:func:`reads_by_rows`).
ROWS_READ_FROM = 1 << 23


def reads_by_rows(task: Task, base: Checkpoint, tuned: Checkpoint) -> bool:
    """Whether :func:`prepare` forms the ΔW of ``task`` from row blocks of each side read from the files one at a time,
    rather than from both tensors read whole: a float32, bf16 or fp16 pair (one dtype on both sides) of one 2-D matrix
    stored as analysed (no transpose, no fused parts or experts) of at least :data:`ROWS_READ_FROM` elements in
    safetensors files. Its peak is then ΔW alone, not ΔW and the stored pair (a 49152 × 576 float32 embedding: 113 MiB,
    not 340). The numerical caveats read their sampled rows again (:func:`pair_notes`), the rounding floor the tuned
    side's blocks (:func:`spectra.storage_floor.rounding_floor_rows`); a pair that needs more of the stored tensors (a
    copy of W_base, a base stored in another dtype than the tuned side) is read whole."""
    pair = task.pair
    if len(task.units) != 1 or task.units[0].expert is not None or task.units[0].rows is not None:
        return False
    if pair.base.transpose or pair.tuned.transpose or pair.base_info.dtype != pair.tuned_info.dtype or \
            pair.tuned_info.dtype not in ("float32", "bfloat16", "float16"):
        return False
    shape = tuple(pair.tuned_info.shape)
    if len(shape) != 2 or tuple(pair.base_info.shape)[1:] != shape[1:]:
        return False
    rows = pair.rows if pair.rows is not None else shape[0]
    return rows > NOTE_ROWS and rows * shape[1] >= ROWS_READ_FROM and base.reads_rows(pair.base.name) and tuned.reads_rows(pair.tuned.name)


def _prepare_by_rows(task: Task, base: Checkpoint, tuned: Checkpoint, device: torch.device, floors: bool) -> Prepared:
    """:func:`prepare` of a pair :func:`reads_by_rows` accepts; with ``floors`` the rounding floor from a second pass
    over the tuned side's row blocks (:func:`spectra.storage_floor.rounding_floor_rows`)."""
    pair, unit = task.pair, task.units[0]
    rows = pair.rows if pair.rows is not None else pair.tuned_info.shape[0]

    def read_tuned(block: slice) -> torch.Tensor:
        return tuned.load_rows(pair.tuned.name, block.start, min(block.stop, rows))

    def read(block: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return base.load_rows(pair.base.name, block.start, min(block.stop, rows)), read_tuned(block)

    def rows_of(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [read(slice(i, i + 1)) for i in index.tolist()]
        return torch.cat([b for b, _ in picked]), torch.cat([t for _, t in picked])

    shape = (rows, pair.tuned_info.shape[1])
    delta, base_fro, bad = form_delta_blocks(read, shape, (getattr(torch, pair.base_info.dtype), getattr(torch, pair.tuned_info.dtype)), device)
    if bad:
        return _skipped(unit, task, bad)
    notes = pair_notes(pair, None, None, delta, base_fro, rows_of=rows_of)
    # (the floor's pass reads the tuned side alone)
    floor = certified_floor(rounding_floor_rows(read_tuned, shape, pair.tuned_info.dtype, delta), notes, None, None,
                            delta=delta) if floors else 0.0
    return Prepared(unit, task, delta, base_fro, note="; ".join(notes), floor=floor, caveats=tuple(notes), floor_known=floors)


def _skipped(unit: Unit, task: Task, bad: list[str]) -> Prepared:
    """The :class:`Prepared` of a unit whose ΔW is undefined (``bad``: :func:`form_delta`'s)."""
    if bad == ["overflow"]:
        return Prepared(unit, task, None, 0.0, "ΔW overflows float32 (weights near ±3.4e38); its spectrum is undefined")
    return Prepared(unit, task, None, 0.0, f"{' and '.join(bad)} weights contain NaN or Inf; ΔW is undefined")


def floor_when_read(tuned_dtype: str) -> bool:
    """Whether :func:`prepare` computes the rounding floor of a pair whose tuned side is stored in ``tuned_dtype``
    even when not asked: a dtype narrower than float32 (bf16, fp16, fp8). There :func:`floor_bound`, 2·1.5·u/√3 of
    ‖W‖_F, stands above the 64th singular value of nearly every fine-tune (bf16: σ₆₄ ≤ ‖ΔW‖_F/8 clears it only
    when ‖ΔW‖_F ≥ 5.5% of ‖W‖_F), so
    ``spectra diff`` needs the exact floor of almost every such matrix; computed in the reader thread, beside the
    decomposition and on one OpenMP thread, it costs less than reading the pair again after it
    (:func:`unit_floor`, which float32 and float64 pairs are left to: their bound is 2¹³× lower)."""
    tdtype = getattr(torch, tuned_dtype, None)
    return isinstance(tdtype, torch.dtype) and tdtype.is_floating_point and torch.finfo(tdtype).eps > torch.finfo(torch.float32).eps


def unit_tensors(unit: Unit, wb: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(base, tuned)`` views of one unit (an expert, a fused part's rows) in the oriented stored tensors."""
    b = wb[unit.expert] if wb.ndim == 3 else wb
    t = wt[unit.expert] if wt.ndim == 3 else wt
    if unit.rows is not None:
        b, t = b[unit.rows], t[unit.rows]
    return b, t


def floor_bound(shape: Sequence[int], tuned_dtype: str, base_fro: float, fro: float) -> float:
    """An upper bound of :func:`pair_floor` from norms ``spectra diff`` has anyway, with no pass over the weights.

    The floor is ``1.5·u/√3·(max_i ‖X[i, :]‖ + max_j ‖X[:, j]‖)`` for ``X`` part of W_tuned (each ``|x|`` taken
    at least the dtype's smallest normal), and a row or column norm is at most ``‖W_tuned‖_F ≤ ‖W_base‖_F +
    ‖ΔW‖_F`` (plus the smallest normal's share, ``tiny·√in`` and ``tiny·√out``); the certified floor of
    ``rounding_steps`` is lower still. ``base_fro``, ``fro``: ``‖W_base‖_F`` and ``‖ΔW‖_F`` of the unit. About
    √out/2 above the floor for weights of one scale: enough to show that a spectrum's kept values are resolved,
    not to cut them. 0.0 for an integer or unknown dtype (no floor, as :func:`pair_floor`); inf when the norms are not finite."""
    tdtype = getattr(torch, tuned_dtype, None)
    if not isinstance(tdtype, torch.dtype) or not tdtype.is_floating_point:
        return 0.0
    info = torch.finfo(tdtype)
    out_dim, in_dim = (int(x) for x in shape)
    edge = 2.0 * (base_fro + fro) + info.tiny * (math.sqrt(out_dim) + math.sqrt(in_dim))
    # 1.01: the norms come from float32 sums and a float32 spectrum (relative errors ~1e-4), the bound must hold
    return FLOOR_MARGIN * info.eps / 2 / math.sqrt(3) * edge * 1.01 if math.isfinite(edge) else math.inf


def unit_floor(item: Prepared, base: Checkpoint, tuned: Checkpoint) -> float:
    """:func:`pair_floor` of a prepared unit whose ΔW (and stored tensors) are gone: its pair read again.

    ``spectra diff`` asks it only of the matrices whose kept singular values reach :func:`floor_bound`, after
    the decomposition (the reader threads do not know the spectrum): keeping every pair's stored tensors until
    then would hold memory the prefetch budget does not count, for the few matrices that need them."""
    pair = item.task.pair
    wb = oriented(base.load(pair.base.name), pair.base.transpose, pair.rows)
    wt = oriented(tuned.load(pair.tuned.name), pair.tuned.transpose, pair.rows)
    b, t = unit_tensors(item.unit, wb, wt)
    return pair_floor(pair, b, t, item.caveats)


def pair_notes(pair: MatrixPair, wb: torch.Tensor | None, wt: torch.Tensor | None, delta: torch.Tensor, base_fro: float,
               rows_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[str]:
    """The numerical caveats (:func:`spectra.numerics.numeric_notes`) of the ΔW that :func:`form_delta`
    formed from the oriented stored tensors ``wb``, ``wt`` of ``pair`` (their stored dtypes decide ε), for
    every command that forms ΔW (diff's :func:`prepare`, compare, trace, interfere); with ``rows_of`` (and ``wb``,
    ``wt`` None) the rows the caveats sample are read again from the files (:func:`reads_by_rows`)."""
    return numeric_notes(wb, wt, delta, base_dtype=pair.base_info.dtype, tuned_dtype=pair.tuned_info.dtype,
                         base_sq=base_fro * base_fro, rows_of=rows_of)


def pair_floor(pair: MatrixPair, wb: torch.Tensor, wt: torch.Tensor, notes: Sequence[str] = (),
               delta: torch.Tensor | None = None) -> float:
    """The storage rounding floor (:func:`spectra.storage_floor.rounding_floor`) of a ΔW formed from the
    oriented stored tensors ``wb``, ``wt`` of ``pair``: singular values of ΔW at or below it are rounding
    of the stored weights, not directions of the update. Used by every command that decomposes a
    dense update into directions (compare, trace, interfere). ``notes``: the pair's :func:`pair_notes`, whose
    certified one-step update lowers it (:func:`spectra.storage_floor.certified_floor`). ``delta``: that ΔW when at hand
    (:func:`form_delta`'s), whose nonzero rows and columns save the floor's comparing pass."""
    return certified_floor(rounding_floor(wt, pair.tuned_info.dtype, wb, delta=delta), notes, wt, wb, delta=delta)


#: Elements of each row block :func:`form_delta` upcasts and subtracts at a time.
_BLOCK = 1 << 22


def form_delta(b: torch.Tensor, t: torch.Tensor, device: torch.device, block: int = _BLOCK,
               work: torch.dtype | None = None) -> tuple[torch.Tensor, float, list[str]]:
    """ΔW = t − b on ``device`` (docs/definitions.md: upcast, then subtract), ‖b‖_F in float64, and which sides
    hold NaN/Inf.

    ΔW is float32, or float64 when either side is stored in float64 (a float32 subtraction would
    round away updates below float32 resolution) or when the float32 difference of finite weights
    overflows (entries near ±3e38 of opposite signs: the float64 difference is finite; ``work`` forces
    the dtype). Works through row blocks of ``block`` elements:
    a bf16 pair never has both float32 upcasts in memory at once (peak: the stored pair plus ΔW),
    and on a GPU only the stored bytes cross the bus.
    """
    return form_delta_blocks(lambda rows: (b[rows], t[rows]), tuple(b.shape), (b.dtype, t.dtype), device, block, work)


def form_delta_blocks(read: Callable[[slice], tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, ...],
                      dtypes: tuple[torch.dtype, torch.dtype], device: torch.device, block: int = _BLOCK,
                      work: torch.dtype | None = None) -> tuple[torch.Tensor, float, list[str]]:
    """:func:`form_delta` of a pair given by ``read(rows)``, which returns rows ``rows`` (a slice of the first axis, its
    stop possibly past the end) of ``(W_base, W_tuned)`` as stored; ``shape`` ``(out, in)`` and ``dtypes`` the stored
    dtypes of the two sides. A pair read from its files a block at a time (:func:`prepare`) never holds more of its
    stored tensors than one block of each."""
    work = work or (torch.float64 if torch.float64 in dtypes else torch.float32)
    delta = torch.empty(shape, dtype=work, device=device)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    finite_b = torch.ones((), dtype=torch.bool, device=device)
    delta_ok = torch.ones((), dtype=torch.bool, device=device)
    blocks = row_blocks(shape[0], shape[-1], block)
    for rows in blocks:
        b_rows, t_rows = read(rows)
        bb = b_rows.to(device).to(work)
        tb = t_rows.to(device).to(work)
        # accumulated in float64 without a float64 copy of the block (half the time, 8 bytes/element less)
        part = torch.linalg.vector_norm(bb, dtype=torch.float64) ** 2
        sq += part
        # a float32² sum cannot overflow float64, so it is finite exactly when the block is; float64
        # weights above 1e154 would overflow it, so they are checked one by one (float64 is rare)
        finite_b &= torch.isfinite(bb).all() if work == torch.float64 else torch.isfinite(part)
        d = delta[rows]
        torch.sub(tb, bb, out=d)
        delta_ok &= torch.isfinite(d.sum())  # NaN/Inf in tuned reach the sum (isfinite() per element is 5× slower)
    base_ok, sums_ok = torch.stack([finite_b, delta_ok]).tolist()  # one sync per matrix
    bad = [] if base_ok else ["base"]
    if not sums_ok:  # rare: tuned or base is not finite, or a sum overflowed; look closely
        # (fp8 has no isfinite on the CPU: upcast each block)
        wide = (torch.float32, torch.float64)  # (a float64 weight above 3.4e38 is finite: never narrowed to float32)
        if not all(bool(torch.isfinite(tb if (tb := read(rows)[1]).dtype in wide else tb.float()).all()) for rows in blocks):
            bad.append("tuned")
        elif base_ok and not all(bool(torch.isfinite(delta[rows]).all()) for rows in blocks):
            if work == torch.float32:  # both sides finite, their float32 difference is not: float64 holds it
                del delta
                return form_delta_blocks(read, shape, dtypes, device, block, work=torch.float64)
            bad.append("overflow")  # (float64 weights near 1.8e308 of opposite signs)
    base_fro = float(sq.item()) ** 0.5
    if base_ok and work == torch.float64 and not 1e-150 < base_fro < 1e150:
        # float64 weights whose squares over- or underflow: the norm of the scaled matrix, scaled back
        amax = max((float(x.abs().max()) for rows in blocks if (x := read(rows)[0]).numel()), default=0.0)
        if 0 < amax < math.inf:
            scaled = sum(float(torch.linalg.vector_norm(read(rows)[0].to(device, torch.float64) / amax)) ** 2 for rows in blocks)
            base_fro = amax * math.sqrt(scaled)
    return delta, base_fro, bad


def pair_bytes(task: Task, base: Checkpoint, tuned: Checkpoint, keep_base: bool = False, floors: bool = False) -> tuple[int, int]:
    """Memory of one tensor pair in flight, bytes, as ``(loaded, formed)``: both tensors as loaded
    (a quantised weight with a scale comes back float32; a pair :func:`prepare` reads by rows, one block of each),
    and what is formed from them: ΔW of each unit (float64 when a side is stored in float64, else float32) and, with
    ``keep_base``, a copy of W_base in that dtype. ``floors`` as :func:`prepare`'s."""
    pair = task.pair
    if not keep_base and reads_by_rows(task, base, tuned):  # (the floor's second pass reads blocks too)
        return 2 * _BLOCK * 4, 4 * task.units[0].shape[0] * task.units[0].shape[1]

    def loaded(ckpt: Checkpoint, name: str, info: TensorInfo) -> int:
        return math.prod(info.shape) * 4 if name in ckpt.scales else info.nbytes

    item = 8 if "float64" in (pair.base_info.dtype, pair.tuned_info.dtype) else 4
    formed = sum(item * u.shape[0] * u.shape[1] for u in task.units) * (2 if keep_base else 1)
    return loaded(base, pair.base.name, pair.base_info) + loaded(tuned, pair.tuned.name, pair.tuned_info), formed


def fro_blocks(b: torch.Tensor | None, t: torch.Tensor, rows: int | None = None, block: int = 1 << 20) -> tuple[float, float]:
    """``(‖t − b‖_F, ‖b‖_F)`` of two tensors of one shape: float32 differences of blocks of ``block`` elements (exact for bf16/fp16
    inputs up to one float32 rounding), norms accumulated in float64; no copy of the whole tensor."""
    t = t.reshape(-1, t.shape[-1]) if t.ndim > 1 else t.reshape(1, -1)
    b = None if b is None else (b.reshape(-1, b.shape[-1]) if b.ndim > 1 else b.reshape(1, -1))
    if rows is not None:
        t, b = t[:rows], (None if b is None else b[:rows])
    step = max(1, block // max(1, t.shape[1]))
    return norms_of_blocks((t[r : r + step], None if b is None else b[r : r + step]) for r in range(0, t.shape[0], step))


def norms_of_blocks(blocks: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[float, float]:
    """``(‖t − b‖_F, ‖b‖_F)`` summed over ``(t, b)`` blocks (b None: zeros): float32 differences (exact for
    bf16/fp16 inputs up to one float32 rounding), norms accumulated in float64."""
    d2 = b2 = 0.0
    for t_block, b_block in blocks:
        tb = t_block.float()
        bb = b_block.float() if b_block is not None else torch.zeros_like(tb)
        d2 += float(torch.linalg.vector_norm(tb - bb, dtype=torch.float64)) ** 2
        b2 += float(torch.linalg.vector_norm(bb, dtype=torch.float64)) ** 2
    return math.sqrt(d2), math.sqrt(b2)
