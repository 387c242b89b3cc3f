"""Threads for compute: several small decompositions at once, one BLAS and one OpenMP thread each.

At p of a few thousand one eigensolve barely uses two threads, while two matrices in two threads use
both cores; a reader thread whose torch kernels fork an OpenMP team oversubscribes the cores the
engine's workers hold. The BLAS thread count is process-wide (OpenBLAS has no per-thread setting),
set and restored around a call with threadpoolctl; the OpenMP count is per thread (an ICV).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import numpy  # noqa: F401 - both OpenBLAS libraries are loaded before threadpoolctl first looks
import scipy.linalg  # noqa: F401
import torch
from threadpoolctl import ThreadpoolController

__all__ = ["ONE_THREAD_MAX_P", "RESULTS_AHEAD", "check_workers", "imap_one_blas_thread", "map_one_blas_thread", "one_blas_thread",
           "one_openmp_thread", "release_workers", "zip_results"]

_T = TypeVar("_T")
_R = TypeVar("_R")


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """threadpoolctl's view of the loaded BLAS libraries (scipy's and numpy's OpenBLAS), built once:
    finding them costs ~20 ms, setting their thread count afterwards microseconds. Both libraries
    are loaded when this module is imported (its imports), so the cached view is complete."""
    return ThreadpoolController()


@functools.cache
def _openmp_controller() -> ThreadpoolController:
    """threadpoolctl's view of the loaded OpenMP runtimes (torch's), built once (~20 ms)."""
    return ThreadpoolController().select(user_api="openmp")


def one_openmp_thread() -> None:
    """Run torch's CPU kernels on one OpenMP thread in the calling thread only (a reader or worker thread).

    Why: the engine's workers already hold every core; a reader whose element-wise kernels fork
    an OpenMP team oversubscribes them, and the team spin-waits at each barrier on cores the LAPACK
    workers need: in a 135M-layout diff on a busy 2-core machine the reader thread alone spent
    9-13 s of CPU with a two-thread team and 2.5-2.7 s with one. The OpenMP thread count is a
    per-thread setting (an ICV), so the main thread and the engine keep theirs; it ends with the
    thread. (``torch.set_num_threads`` would not do: torch also hands its last value to the next new
    thread of the process, whichever it is.)
    """
    torch.get_num_threads()  # torch sets a new thread's count on first use: set ours after it
    _openmp_controller().limit(limits=1)


class _OneBlasThread:
    """The process-wide BLAS limit of one thread, held by any number of overlapping calls: the first to
    enter sets it, the last to leave restores the count from before the first. (A limit per call would
    save and restore out of order when two threads overlap: the second saves the first's 1 and restores
    it after the first restored the original, leaving the process on one BLAS thread for good.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: list[tuple[object, int]] = []  # (BLAS library, its thread count before the first holder)

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                libs = _blas_controller().select(user_api="blas").lib_controllers
                self._saved = [(lib, lib.get_num_threads()) for lib in libs]
                for lib, _ in self._saved:
                    _set_blas_threads(lib, 1)
            self._holders += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                _restore_blas(self._saved)
                self._saved = []


#: Tries (2 ms apart) at giving a BLAS library its thread count back. OpenBLAS may ignore a new count
#: while another thread of the process is inside one of its calls (a notebook's own numpy, a second
#: spectra call outside the limit): read back and set again, rather than leave the process on one thread.
_RESTORE_TRIES = 50


def _set_blas_threads(lib, n: int) -> None:
    """Set a BLAS library's thread count. A pthreads OpenBLAS's count is process-wide, and set directly:
    threadpoolctl ≥ 3.8 makes the first thread to set it its controlling thread for as long as that thread
    lives and ignores the others, so after a call from the main thread every later call from another thread
    (a notebook's thread pool) left OpenBLAS on two threads per worker, whose spinning made a compare 3.7× slower."""
    # threadpoolctl's own setter under that logic (its name private; before 3.8 set_num_threads had no such logic)
    direct = getattr(lib, "_real_set_num_threads", None)
    if getattr(lib, "internal_api", "") == "openblas" and getattr(lib, "threading_layer", "") == "pthreads" and callable(direct):
        direct(n)
    else:
        lib.set_num_threads(n)


def _restore_blas(saved: list[tuple[object, int]]) -> None:
    for attempt in range(_RESTORE_TRIES):
        wrong = [(lib, n) for lib, n in saved if lib.get_num_threads() != n]
        if not wrong:
            return
        if attempt:
            time.sleep(0.002)
        for lib, n in wrong:
            _set_blas_threads(lib, n)


_ONE_BLAS_THREAD = _OneBlasThread()

#: The largest side p of a symmetric eigenproblem solved on one BLAS thread outside the engine's worker pools
#: (:func:`one_blas_thread`): measured on the project's 2-core CPU, idle, an interfere of 256-1024 matrices ran in 1.1 s
#: on one OpenBLAS thread against 2.1-2.7 s on two (its reduction's threads spin against torch's OpenMP team), a trace
#: of 512-1024 matrices in 1.6-2.3 s against 4.1-4.5 s; at p = 2048 the two were even (3.8 s and 3.7 s).
ONE_THREAD_MAX_P = 2048


def one_blas_thread(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """A context holding the process's BLAS on one thread (shared by overlapping holders, restored by the last), or
    a context that does nothing when not ``enabled`` (a large eigenproblem, whose reduction two threads speed up)."""
    return _ONE_BLAS_THREAD if enabled else contextlib.nullcontext()


#: Upper bound of the kept compute threads; they are made on demand (ThreadPoolExecutor starts a
#: thread only when no idle one can take a task), so a run holds about as many as it asks for.
_MAX_THREADS = 64

#: Items :func:`imap_one_blas_thread` may have started and not yet handed over, per worker (running, or finished and
#: waiting for an earlier one): enough that one long item (an embedding) does not idle the other cores, few enough to
#: bound memory.
RESULTS_AHEAD = 4


class _Workers:
    """The compute threads, kept for the life of the process.

    Why kept: a new thread's first OpenMP call (its one-thread setting) costs 3-10 ms on the
    project's CPU; a pool made per batch paid it for every worker of every batch (~1 s of a
    135M-layout extract). One executor, never replaced, so callers on different threads share it
    safely; each caller keeps at most its ``workers`` tasks in flight (:func:`imap_one_blas_thread`).
    A forked child starts with none (``os.register_at_fork``). A worker that itself maps (nested
    use) computes its items in turn rather than queueing behind itself.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_MAX_THREADS, thread_name_prefix="spectra-eig", initializer=self._init)
            return self._pool

    def _init(self) -> None:
        self._local.worker = True
        one_openmp_thread()

    def inside(self) -> bool:
        return getattr(self._local, "worker", False)

    def forget(self) -> None:  # in a forked child: the parent's threads do not exist there
        self._lock = threading.Lock()
        self._pool = None

    def shutdown(self) -> None:
        """End the threads without waiting: queued work is cancelled, idle threads exit, a running item
        finishes first. A later map starts a new pool."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_WORKERS = _Workers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKERS.forget)


def release_workers() -> None:
    """End the process's compute threads (:class:`_Workers`) at once, before the interpreter joins
    its threads on exit. Why: a Ctrl-C that lands while the pool starts a thread (after the thread
    starts, before the pool registers it) leaves a thread the pool's own exit hook never wakes, and
    the exit waits on it; ``shutdown`` wakes every thread reading the pool's queue, registered or not."""
    _WORKERS.shutdown()


def check_workers(workers: int | None, default: int) -> int:
    """A ``workers`` argument of the API: ``default`` for None, else a whole number ≥ 1.

    Raises:
        ValueError: 0, a negative or a non-integer count (``max(1, …)`` ran 0 and -1 as 1 without a word).
    """
    if workers is None:
        return default
    try:  # ints, numpy and torch integers (not bools, not floats)
        n = None if isinstance(workers, bool) else operator.index(workers)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"workers must be a whole number >= 1 (matrices measured at once; leave it out for torch's thread "
                         f"count). Got {workers!r} instead.")
    return n


def imap_one_blas_thread(fn: Callable[[_T], _R], items: Iterable[_T], workers: int | None = None, *,
                         cost: Callable[[_T], int] | None = None, max_cost: int | None = None,
                         small_results: bool = False) -> Iterator[_R]:
    """``fn(x)`` for each of ``items``, in order, computed up to ``workers`` at once in threads with one
    BLAS thread each; results are yielded as they come, so a caller can report progress.

    For numpy's BLAS/LAPACK calls (which release the GIL) on independent small matrices: at p of a few
    thousand one eigensolve barely uses two threads, while two matrices in two threads use both cores.
    The BLAS thread count is process-wide (OpenBLAS has no per-thread setting); it holds until the
    iterator is exhausted or closed, then is restored. ``workers`` None: ``torch.get_num_threads()``.
    The threads are the process's compute workers (:class:`_Workers`), kept between calls; the caller's
    thread submits the next item whenever a worker is free (also while it waits on an earlier item, so
    one long item does not idle the other workers), so at most ``workers`` run at once, at most
    ``RESULTS_AHEAD × workers`` items are started and not yet handed over, and an early stop (an
    exception, a closed iterator) leaves the rest unstarted. The first exception is raised where its
    result would have come. ``items`` may be a lazy iterator (a stream that reads as it goes): an item
    is taken from it only when it can start, and a generator is closed when the map ends. With
    ``cost``, the items started and not yet handed over also cost at most ``max_cost`` together (one
    always runs, whatever its cost): memory stays bounded when items are large matrices. With
    ``small_results``, an item's cost ends when it finishes (a working set, freed then; its result is small).
    """
    workers = max(1, torch.get_num_threads() if workers is None else workers)
    if isinstance(items, Sized):
        workers = min(workers, len(items) or 1)
    # on pool threads, even one: torch's eigensolver stalls on the main thread of a busy machine;
    # torch's OpenMP thread count is per thread: each worker sets its own to one (for torch ops in fn)
    with _ONE_BLAS_THREAD:
        if _WORKERS.inside():
            yield from map(fn, items)
            return
        pool = _WORKERS.executor()
        todo = iter(items)
        queue: deque[tuple[Future[_R], int]] = deque()  # started, not yet handed over, in order
        waiting: list[_T] = []  # an item taken from todo that did not fit yet
        in_flight = 0  # the cost of the items in queue: a finished one's holds until it is handed over (unless small_results)
        freed: set[Future[_R]] = set()  # finished items whose cost small_results ended

        def top_up() -> None:
            nonlocal in_flight
            if small_results:
                for f, c in queue:
                    if f.done() and f not in freed:
                        freed.add(f)
                        in_flight -= c
            if any(f.done() and not f.cancelled() and f.exception() is not None for f, _ in queue):
                return  # an item failed: nothing more starts (its error is raised in turn)
            # a worker whose item finished before the head's takes the next (results are handed over in
            # order: waiting on the head alone left a core idle behind each long item); finished results
            # wait in queue, their cost counted, so memory stays bounded
            while sum(not f.done() for f, _ in queue) < workers and len(queue) < RESULTS_AHEAD * workers:
                if not waiting:
                    try:
                        waiting.append(next(todo))
                    except StopIteration:
                        return
                c = cost(waiting[0]) if cost is not None else 0
                if queue and max_cost is not None and in_flight + c > max_cost:
                    return
                queue.append((pool.submit(fn, waiting.pop()), c))
                in_flight += c

        try:
            top_up()
            while queue:
                head, c = queue[0]
                if not head.done():
                    wait([f for f, _ in queue if not f.done()], return_when=FIRST_COMPLETED)
                    top_up()
                    continue
                queue.popleft()
                if head in freed:
                    freed.discard(head)
                else:
                    in_flight -= c
                top_up()  # the next item starts before this result is handed over
                yield head.result()
        finally:  # stopped early (an error, a closed iterator): finish what started; the rest never starts
            for f, _ in queue:
                f.cancel()
            wait([f for f, _ in queue])
            waiting.clear()
            close = getattr(todo, "close", None)
            if close is not None:  # a stream: its readers stop and its buffers go now, not with a traceback
                close()


def zip_results(items: Iterable[_T], fn: Callable[[_T], _R], workers: int | None = None, *,
                cost: Callable[[_T], int] | None = None, max_cost: int | None = None) -> Iterator[tuple[_T, _R]]:
    """``(x, fn(x))`` for each of ``items``, in order, by :func:`imap_one_blas_thread` (``cost`` and
    ``max_cost`` as there); ``items`` may be a lazy iterator (a stream that reads as it goes): the next
    item is taken, on the caller's thread, only when a worker is free and its cost fits."""
    return imap_one_blas_thread(lambda x: (x, fn(x)), items, workers, cost=cost, max_cost=max_cost)


def map_one_blas_thread(fn: Callable[[_T], _R], items: Sequence[_T], workers: int | None = None) -> list[_R]:
    """``[fn(x) for x in items]`` by :func:`imap_one_blas_thread`."""
    return list(imap_one_blas_thread(fn, items, workers))
