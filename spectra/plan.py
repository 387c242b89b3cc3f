"""Cost model of a diff run: what ``spectra diff --plan`` prints, and how distributed runs split work.

A run reads every paired tensor twice (base and tuned), forms ΔW, and decomposes it. With the
exact Gram path (:mod:`spectra.linalg`) a ``(m, n)`` matrix with ``p = min(m, n)`` costs

    t ≈ m·n·p / gram_rate  +  p³ / eig_rate

(the Gram product, then the symmetric eigensolve), and a tensor pair costs ``bytes / io_rate`` to
read and subtract. :func:`calibrate` measures the three rates on the chosen device in about a
second; :class:`CostModel` then prices any shape, which is how the estimates for models we cannot
run here (``docs/scale.md``) are made. Reading overlaps the decomposition when prefetching, so a
run takes about ``max(io, compute)`` where the two are balanced and their sum at worst; the plan
reports both.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from spectra.errors import ConfigError
from spectra.linalg import gram

#: Rates used when nothing was calibrated, per device type (float64 exact path), fitted by
#: ``bench/scale.py``: the 2-core CPU of this project's development machine, and an H200
#: (``bench/results/scale-cpu.md``). Distributed runs balance their ranks with these; only the
#: ratios between the terms matter there.
DEFAULT_RATES = {
    "cpu": {"gram_rate": 3.26e10, "eig_rate": 1.52e10, "io_rate": 4.0e8, "overhead_s": 0.02},
    "cuda": {"gram_rate": 2.37e13, "eig_rate": 7.1e11, "io_rate": 1.09e9, "overhead_s": 0.0089},
}


@dataclass(frozen=True)
class CostModel:
    """Per-matrix and per-byte costs on one device.

    Attributes:
        gram_rate: multiply-adds per second of the Gram product (``m·n·p`` per matrix).
        eig_rate: ``p³`` units per second of the symmetric eigensolve of a ``p × p`` Gram matrix.
        io_rate: stored bytes per second of reading a tensor pair and forming ΔW.
        overhead_s: fixed seconds per matrix (launches, bookkeeping).
        device: where the rates were measured (``"cpu"``, ``"cuda:0"``, or ``"default"``).
        precision: ``"float64"`` or ``"float32"``, the decomposition dtype measured.
        method: ``"gram"`` (Gram product + eigensolve) or ``"svd"`` (one SVD per matrix, priced by ``svd_rate``).
        svd_rate: ``m·n·p`` per second of ``--method svd``'s SVDs (measured on a ``p × 4p`` probe: a square matrix,
            whose bidiagonalisation costs about half as much per ``m·n·p``, is priced about 2× high); None for Gram.
    """

    gram_rate: float = DEFAULT_RATES["cpu"]["gram_rate"]
    eig_rate: float = DEFAULT_RATES["cpu"]["eig_rate"]
    io_rate: float = DEFAULT_RATES["cpu"]["io_rate"]
    overhead_s: float = DEFAULT_RATES["cpu"]["overhead_s"]
    device: str = "default"
    precision: str = "float64"
    method: str = "gram"
    svd_rate: float | None = None

    @classmethod
    def default(cls, device: torch.device | str) -> CostModel:
        """The uncalibrated model of a device type (:data:`DEFAULT_RATES`): CUDA or CPU."""
        kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
        return cls(**DEFAULT_RATES[kind], device=f"default {kind}")

    def matrix_seconds(self, shape: tuple[int, int]) -> float:
        """Estimated seconds to decompose one ``(m, n)`` matrix exactly."""
        m, n = shape
        p = min(m, n)
        if self.method == "svd" and self.svd_rate:
            return m * n * p / self.svd_rate + self.overhead_s
        return m * n * p / self.gram_rate + p**3 / self.eig_rate + self.overhead_s

    def io_seconds(self, nbytes: int) -> float:
        """Estimated seconds to read ``nbytes`` of stored tensors and form their ΔW."""
        return nbytes / self.io_rate


def balance(costs: Sequence[float], ranks: int) -> list[list[int]]:
    """Split items among ``ranks`` so that the largest total cost is small (greedy LPT: the most
    expensive item first, each to the least loaded rank; within 4/3 of the optimum).

    Args:
        costs: cost of each item (any unit), ``len(costs) = n``.
        ranks: number of workers, ≥ 1.

    Returns:
        ``ranks`` lists of item indices, each in ascending index order (the caller's work order).
        Deterministic: ties go to the lower index and the lower rank.

    Example:
        >>> balance([5, 3, 2, 2], 2)
        [[0, 3], [1, 2]]
    """
    loads = [0.0] * ranks
    out: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += costs[i]
    return [sorted(x) for x in out]


def segment_ends(costs: Sequence[float], rounds: int) -> list[int]:
    """End indices (exclusive) of ``rounds`` consecutive segments of roughly equal cost.

    Used by distributed runs: every rank sends its results to the others after each segment, and
    all ranks do the same number of rounds whatever their item counts.

    Args:
        costs: cost of each item, in work order.
        rounds: number of segments, ≥ 1.

    Returns:
        ``rounds`` non-decreasing end indices; the last is ``len(costs)``. A segment may be empty
        (an item costing more than a segment spans several).

    Example:
        >>> segment_ends([1, 1, 1, 1], 2)
        [2, 4]
        >>> segment_ends([1, 6, 1], 3)  # the costly item overruns the second goal: an empty segment
        [1, 1, 3]
    """
    total = float(sum(costs))
    ends, acc, i = [], 0.0, 0
    for k in range(1, rounds + 1):
        goal = total * k / rounds
        while i < len(costs) and (acc + costs[i] <= goal + 1e-12 * total or k == rounds):
            acc += costs[i]
            i += 1
        ends.append(i)
    ends[-1] = len(costs)
    return ends


def _cpu_rates(M: torch.Tensor, precision: str) -> tuple[float, float]:
    """``(gram_rate, eig_rate)`` of the CPU run's own route: a batch of copies of ``M`` (``(p, 4p)``)
    through :func:`spectra.engine.exact_spectra` (LAPACK in worker threads, one BLAS thread each), as
    many as it runs at once, so the rates are wall-clock rates with the workers' parallelism in
    them. The wall time is shared between Gram and eigensolve as the workers' own timings are (a
    multithreaded torch eigensolve timed alone, the earlier probe, is another solver: estimates 1-8x off)."""
    from spectra.engine import exact_spectra

    p, n = M.shape
    k = max(2, torch.get_num_threads())  # the engine's workers (one per torch thread)
    mats = M.unsqueeze(0).expand(k, p, n).contiguous()
    prec = precision if precision in ("float64", "float32", "certified") else "float64"
    exact_spectra(mats[:1], precision=prec, device="cpu", metrics=False)  # warm-up (libraries, thread pool)
    walls, shares = [], []
    for _ in range(3):
        start = time.perf_counter()
        out = exact_spectra(mats, precision=prec, device="cpu", metrics=False)
        walls.append(time.perf_counter() - start)
        g, e = float(np.sum(out.gram_seconds)), float(np.sum(out.eig_seconds))
        shares.append(g / max(g + e, 1e-12))
    wall, share = float(np.median(walls)), float(np.median(shares))
    return k * n * p * p / max(wall * share, 1e-9), k * p**3 / max(wall * (1.0 - share), 1e-9)


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def calibrate(device: torch.device, precision: str = "float64", *, size: int | None = None,
              io_probe: tuple[Callable[[], object], int] | None = None, method: str = "gram") -> CostModel:
    """Measure the rates of :class:`CostModel` on ``device`` (about a second).

    Args:
        device: where the engine will run.
        precision: decomposition dtype, ``"float64"`` or ``"float32"``.
        size: ``p`` of the probe matrices (default 512 on the CPU, 4096 on CUDA, large enough that
            the measured rates hold at model sizes).
        io_probe: ``(read, nbytes)``: a callable that reads one tensor pair and forms its ΔW, and
            the stored bytes it reads; None keeps the default I/O rate.
        method: ``"svd"`` (``--method svd``) times SVDs of the probe through the run's own route
            (:func:`spectra.engine.exact_spectra`) for :attr:`CostModel.svd_rate`: priced as the Gram route, a plan said
            1.8 s for a 49 s run.
    """
    dtype = torch.float64 if precision == "float64" else torch.float32
    p = size or (4096 if device.type == "cuda" else 512)
    g = torch.Generator(device="cpu").manual_seed(0)
    M = torch.randn(p, 4 * p, generator=g, dtype=torch.float32).to(device)
    io_rate = CostModel.default(device).io_rate
    if io_probe is not None:
        read, nbytes = io_probe
        io_rate = nbytes / max(_median_time(read, repeats=2), 1e-6)
    if method == "svd":  # one SVD per matrix, its cost growing as m·n·p: a batch through the run's own route
        from spectra.engine import exact_spectra

        k = 2
        mats = M.unsqueeze(0).expand(k, *M.shape).contiguous()
        prec = "float32" if precision == "float32" else "float64"
        exact_spectra(mats[:1], precision=prec, device=device, method="svd", metrics=False)  # warm-up
        t_svd = _median_time(lambda: exact_spectra(mats, precision=prec, device=device, method="svd", metrics=False)) / k
        return replace(CostModel.default(device), io_rate=io_rate, device=str(device), precision=precision, method="svd",
                       svd_rate=4 * p**3 / max(t_svd, 1e-9))
    if device.type == "cpu":
        gram_rate, eig_rate = _cpu_rates(M, precision)
        return CostModel(gram_rate=gram_rate, eig_rate=eig_rate, io_rate=io_rate, device=str(device), precision=precision)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_gram():
        gram(M, dtype=dtype)
        sync()

    G = gram(M, dtype=dtype)

    def run_eig():
        torch.linalg.eigvalsh(G)
        sync()

    run_gram(), run_eig()  # warm-up (library loading, kernels)
    t_gram = _median_time(run_gram)
    t_eig = _median_time(run_eig)
    return CostModel(gram_rate=p * 4 * p * p / t_gram, eig_rate=p**3 / t_eig, io_rate=io_rate,
                     device=str(device), precision=precision)


@dataclass
class Plan:
    """What a diff run will do, priced by a :class:`CostModel`.

    Attributes:
        matrices: matrices (units: parts × experts) to analyse.
        tensors: tensor pairs to read.
        read_bytes: stored bytes read, both checkpoints together.
        shapes: ``(m, n)`` -> count, for the table.
        world_size: ranks the work is split over.
        rank_seconds: estimated compute + I/O seconds of each rank (sum, no overlap).
        io_seconds: I/O part of the slowest rank.
        compute_seconds: decomposition part of the slowest rank.
        host_bytes: estimated peak host memory of the data (process baseline excluded).
        device_bytes: estimated peak memory of a batch on the compute device (CUDA), else 0.
        baseline_bytes: resident memory of this process now (interpreter, torch, libraries).
        cost: the cost model used.
        approx: matrices that will use the approximate mode.
    """

    matrices: int
    tensors: int
    read_bytes: int
    shapes: dict[tuple[int, int], int]
    world_size: int
    rank_seconds: list[float]
    io_seconds: float
    compute_seconds: float
    host_bytes: int
    device_bytes: int
    baseline_bytes: int
    cost: CostModel
    approx: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Estimated wall time: the slowest rank, reads overlapping the decomposition."""
        return max(self.io_seconds, self.compute_seconds) + 0.15 * min(self.io_seconds, self.compute_seconds)


def estimate_memory(pairs: Sequence[tuple[int, int, Sequence[tuple[int, int]]]], *, depth: int, batch_bytes: int,
                    max_batch: int, dtype: torch.dtype = torch.float64, method: str = "gram", on_gpu: bool = False,
                    max_in_flight: int | None = None, workers: int = 1) -> tuple[int, int]:
    """Peak memory of a run's data, bytes, as ``(host, device)`` (device is 0 on a CPU run).

    What a streaming run holds at once (:mod:`spectra.pipeline`): up to ``depth + 1`` tensor pairs in
    flight (and no more than ``max_in_flight`` bytes of them, the largest pair excepted), each as
    loaded plus its ΔW, and one batch of equally shaped matrices, capped by ``batch_bytes``, with
    the decomposition's workspace (one matrix's on the CPU, a chunk's on CUDA). On a GPU, ΔW and the batch live on the device and the host
    holds only the tensors being read.

    Args:
        pairs: per tensor pair: the bytes of both tensors as loaded (dequantised fp8/int8 weights
            are float32), the bytes formed from them (ΔW of each matrix, and a W_base copy with
            ``weight_spectra``), and the ``(m, n)`` shapes of its matrices.
        depth: tensor pairs read ahead (``DiffConfig.prefetch``).
        batch_bytes: the batch cap (:func:`spectra.engine.batch_budget`).
        max_batch: most matrices per batch.
        dtype, method: the decomposition's dtype and method (workspace size).
        on_gpu: the decomposition runs on CUDA.
        max_in_flight: the byte cap on pairs in flight (``DiffConfig.prefetch_bytes``).
        workers: reader threads; each forms ΔW through row blocks of at most 2²² elements, with
            two float32 upcasts and a float64 copy of the base block (16 bytes per element).

    Example:
        >>> estimate_memory([(8, 16, [(2, 2)])] * 3, depth=1, batch_bytes=1 << 20, max_batch=4)[1]
        0
    """
    from spectra.engine import estimate_batch_bytes

    counts: dict[tuple[int, int], int] = {}
    for _, _, shapes in pairs:
        for s in shapes:
            counts[s] = counts.get(s, 0) + 1
    if on_gpu:  # a chunk of the batch is stacked and decomposed together
        batch = max((min(batch_bytes, min(n, max_batch) * estimate_batch_bytes(s, dtype, method)) for s, n in counts.items()), default=0)

    def ahead(sizes: list[int]) -> int:
        top = sorted(sizes, reverse=True)[: depth + 1]
        return sum(top) if max_in_flight is None else max(top[:1] + [min(sum(top), max_in_flight)], default=0)

    largest = max((m * n for _, _, shapes in pairs for m, n in shapes), default=0)
    blocks = workers * 16 * min(largest, 1 << 22)  # the row blocks of spectra.delta.form_delta, per reader
    if on_gpu:
        return ahead([host for host, _, _ in pairs]), ahead([formed for _, formed, _ in pairs]) + batch + blocks
    # on the CPU the batch's ΔW wait in a list and are decomposed one at a time (spectra.engine); a pair whose ΔW joined
    # the batch has let its loaded tensors go, so the batch of a shape is held beside the pairs of other shapes in
    # flight, not beside itself again (a bf16 embedding pair was counted twice: 7.0 GiB planned, 4.4 measured)
    sizes = sorted(((host + formed, i) for i, (host, formed, _) in enumerate(pairs)), reverse=True)
    of_shape: dict[tuple[int, int], list[int]] = {}  # each shape's pairs, largest first
    for _, i in sizes:
        for sh in dict.fromkeys(pairs[i][2]):
            of_shape.setdefault(sh, []).append(i)
    peak = ahead([b for b, _ in sizes])
    for sh, n in counts.items():  # (one pass over the largest pairs per shape: 10⁵ shapes of a hostile header stay fast)
        k = min(n, max_batch, max(1, batch_bytes // (4 * sh[0] * sh[1])))  # the batch's ΔW, which left the pairs in flight
        held = min(batch_bytes, k * 4 * sh[0] * sh[1]) + estimate_batch_bytes(sh, dtype, method)
        out = set(of_shape[sh][:k])
        peak = max(peak, held + ahead([b for b, i in sizes[: depth + 1 + k] if i not in out]))
    return peak + blocks, 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, bytes (Linux ``ru_maxrss`` is KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def refuse_beyond_memory(what: str, need: int, use: str, device: torch.device, *, hint: str) -> None:
    """Refuse a run whose largest module (``what``: its name and shape) needs ``need`` bytes for ``use`` when less memory
    is free (:func:`free_memory`; unknown: no refusal): the kernel would kill it later, results lost.

    Raises:
        ConfigError: naming the module, the bytes needed and free, with ``hint`` (how to leave it out)."""
    if (free := free_memory(device)) is not None and need > free:
        raise ConfigError(f"{what} needs at least {need / 2**30:.3g} GiB for {use}, and {free / 2**30:.3g} GiB is free", hint=hint)


def free_memory(device: torch.device, cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the run can still allocate on ``device``: CUDA's free memory; on a CPU the kernel's ``MemAvailable`` or a
    container's (cgroup v2 at ``cgroup``) limit less its working set, whichever is less; None where neither is known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):  # not Linux
        found += [int(x.split()[1]) * 1024 for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:")]
    with contextlib.suppress(OSError, ValueError):  # no cgroup v2, or no limit ("max")
        free = int((cgroup / "memory.max").read_text()) - int((cgroup / "memory.current").read_text())
        with contextlib.suppress(OSError, ValueError, IndexError):  # the usage counts page cache, whose inactive part
            fields = (cgroup / "memory.stat").read_text().split()  # the kernel reclaims before it kills (working set)
            free += int(fields[fields.index("inactive_file") + 1]) if "inactive_file" in fields else 0
        found.append(max(free, 0))
    return min(found) if found else None
