"""Reading ahead and batching for the streaming runs: reader threads form ΔW for the next tensor
pairs (bounded in count and bytes) while the engine decomposes the previous batch of equally shaped
matrices. Memory stays bounded by the pairs in flight plus one batch, whatever the model's size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from spectra.config import DiffConfig
from spectra.delta import Prepared, pair_bytes, prepare
from spectra.io.checkpoint import Checkpoint
from spectra.selection import Task
from spectra.threads import one_openmp_thread

T = TypeVar("T")


@dataclass(frozen=True)
class RunSettings:
    """How a run uses memory and threads on its device (defaults resolved from :class:`DiffConfig`)."""

    batch_bytes: int  # cap of one batch of ΔW (collected) and of the engine's chunks
    depth: int  # tensor pairs read ahead
    workers: int  # reader threads
    ahead_bytes: int | None  # cap of the pairs in flight (on CUDA: the ΔW formed on the device)


#: Cap of a batch of ΔW collected on the CPU. The CPU engine solves a batch one matrix per worker
#: thread, so a larger batch gains nothing there; it only made the engine wait, cores idle, while
#: the whole next batch was read (batches stop at ``max_batch`` small matrices either way).
CPU_COLLECT_BYTES = 16 << 20


def run_settings(config: DiffConfig, device: torch.device) -> RunSettings:
    """Resolve the memory and thread defaults.

    On CUDA: 45% of free memory for a batch and a quarter for reading ahead (ΔW is formed on the
    GPU), 8 pairs ahead, up to 4 readers. Reading the whole next batch ahead (``max_batch + 8`` = 40
    pairs) gained nothing on an H200 (Llama-2-7B: 43.3 s against 43.1 s, bench/results/prefetch-ab-llama7b-h200.md):
    the eigensolves, not the reads, set the pace there.

    On the CPU: batches of :data:`CPU_COLLECT_BYTES` (or ``max_batch`` matrices) and one reader (the
    engine's workers already use every core), which reads up to ``max_batch`` pairs ahead and no
    more than three batches' worth of bytes (a pair counts as loaded plus formed until it is taken):
    about one batch of ΔW is ready when the engine finishes the previous one. With 256 MiB batches
    and one pair ahead, 7 of the 211 pairs of a 30-layer 135M-layout model were read while the
    engine worked (the others while it waited); with these defaults, 174-195.
    """
    cuda = device.type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if cuda else 0
    batch = config.max_batch_bytes if config.max_batch_bytes is not None else (int(0.45 * free) if cuda else CPU_COLLECT_BYTES)
    ahead = config.prefetch_bytes if config.prefetch_bytes is not None else (int(0.25 * free) if cuda else 3 * batch)
    return RunSettings(
        batch_bytes=batch,
        depth=config.prefetch if config.prefetch is not None else (8 if cuda else config.max_batch),
        workers=config.read_workers or (min(4, os.cpu_count() or 1) if cuda else 1),
        ahead_bytes=ahead,
    )


def prefetch(tasks: list[Task], base: Checkpoint, tuned: Checkpoint, depth: int, workers: int,
              device: torch.device, keep_base: bool = False, max_bytes: int | None = None,
              floors: bool = False) -> Iterator[Prepared]:
    """Yield prepared units in plan order while ``workers`` threads read up to ``depth`` tensor
    pairs ahead, and no more than ``max_bytes`` of them (:func:`pair_bytes`: what the pair formed
    on the GPU, or everything it holds on the CPU; one pair always goes).

    Reading (positioned reads release the GIL) and forming ΔW overlap with the decomposition of the
    previous batch; the two caps bound the memory this takes, whatever the model: on a GPU, where ΔW
    is formed on the device, a 405B model's embedding pair alone is 17 GB. A reader's exception is
    re-raised here, in order. ``floors``: each ΔW's storage rounding floor too (:func:`spectra.delta.prepare`).
    """
    if depth <= 0:
        for task in tasks:
            yield from prepare(task, base, tuned, device, keep_base, floors)
        return
    def cost(task: Task) -> int:
        loaded, formed = pair_bytes(task, base, tuned, keep_base, floors)
        return formed if device.type == "cuda" else loaded + formed

    yield from read_ahead(tasks, lambda task: prepare(task, base, tuned, device, keep_base, floors), cost, depth=depth,
                          workers=workers, max_bytes=max_bytes, name="spectra-read")


def read_ahead(tasks: list[Task], read: Callable[[Task], list[T]], cost: Callable[[Task], int], *, depth: int, workers: int,
               max_bytes: int | None, name: str) -> Iterator[T]:
    """``read(task)``'s items for every task, in order, while ``workers`` threads (one OpenMP thread
    each) run up to ``depth`` tasks ahead and no more than ``max_bytes`` of ``cost``, counting the task
    whose items the consumer holds (one task always goes when nothing else is read or held, however
    large). A reader's exception is re-raised here, in order; tasks not started when the consumer
    stops are cancelled."""
    todo = deque(tasks)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name, initializer=one_openmp_thread) as pool:
        pending: deque = deque()
        in_flight = held = 0

        def fill() -> None:
            nonlocal in_flight
            while todo and len(pending) < depth:
                nbytes = cost(todo[0])
                if (pending or held) and max_bytes is not None and in_flight + held + nbytes > max_bytes:
                    return
                in_flight += nbytes
                pending.append((pool.submit(read, todo.popleft()), nbytes))

        try:
            fill()
            while pending:
                fut, nbytes = pending.popleft()
                items = fut.result()
                # the consumer holds these until it asks for the next: a 128k-row embedding pair read while the
                # previous one was decomposed held both (+500 MiB over the largest pair the docs give as the floor)
                in_flight, held = in_flight - nbytes, nbytes
                fill()
                yield from items
                held = 0
                fill()
        finally:
            for fut, _ in pending:
                fut.cancel()


def largest_first(tasks: list[Task]) -> list[Task]:
    """``tasks`` with the largest matrices first and equal shapes next to each other (else plan order).

    Largest first: each large tensor is read while little else is in memory (the run's peak), and its
    decomposition overlaps the reading of the others instead of ending the run alone on one core.
    Equal shapes together: a batch holds only equally shaped matrices, and ``(1536, 576)`` and
    ``(576, 1536)`` (same size) interleaved in layer order would cut every batch to one or two matrices,
    leaving CPU workers idle.
    """
    def key(t: Task) -> tuple[int, tuple[int, int]]:
        shape = t.units[0].shape
        return -shape[0] * shape[1], tuple(shape)

    return sorted(tasks, key=key)


def batches(prepared: Iterator[Prepared], shapes: list[tuple[int, int]], max_count: int, max_bytes: int) -> Iterator[list[Prepared]]:
    """Group consecutive equally shaped units; skipped units travel alone.

    ``shapes`` is the planned shape of every unit in stream order: a batch is closed as soon as the
    next unit cannot join it, before that unit is read, so no ΔW waits in memory for its batch.
    """
    batch: list[Prepared] = []
    size = 0
    for i, item in enumerate(prepared):
        if item.delta is None:
            if batch:  # the open batch expected this unit: closed here, or a unit of another shape would join it
                yield batch
                batch, size = [], 0
            yield [item]
            continue
        batch.append(item)
        size += item.delta.numel() * 4
        nxt = shapes[i + 1] if i + 1 < len(shapes) else None
        if nxt != item.unit.shape or len(batch) >= max_count or size + nxt[0] * nxt[1] * 4 > max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
