"""Reading ahead on the CPU (spectra.stream) and the heatmap layout (spectra.plots.base._lay_out is
checked through :func:`heatmap`): reader threads run torch on one OpenMP thread, the CPU defaults read
a batch ahead, the largest matrices go first without changing any result, and every label of a
heatmap lies inside its figure."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra.config import DiffConfig
from spectra.stream import CPU_COLLECT_BYTES, run_settings
from spectra.threads import RESULTS_AHEAD, imap_one_blas_thread, map_one_blas_thread, one_openmp_thread, zip_results


def test_a_reader_thread_runs_torch_on_one_openmp_thread_and_the_others_keep_theirs():
    before = torch.get_num_threads()
    seen = {}

    def reader():
        one_openmp_thread()
        seen["reader"] = torch.get_num_threads()

    def other():
        seen["other"] = torch.get_num_threads()

    for target in (reader, other):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    assert seen["reader"] == 1
    assert torch.get_num_threads() == before  # the calling process's setting is untouched
    assert seen["other"] == before  # and threads started later get the process's count


def test_compute_workers_are_kept_between_calls_and_run_on_one_thread_each():
    """The compute threads outlive a call (a new thread's OpenMP setup cost 3-10 ms per batch); each runs
    torch on one thread; results keep their order; at most `workers` run at once, even in a larger pool
    kept from an earlier call; a worker that maps again computes in turn instead of waiting on itself."""
    def pool_threads() -> set[int]:
        return {t.ident for t in threading.enumerate() if t.name.startswith("spectra-eig")}

    map_one_blas_thread(lambda _: threading.Event().wait(0.01), range(4), workers=2)  # the pool exists now
    before = pool_threads()
    seen = map_one_blas_thread(lambda _: threading.get_ident(), range(4), workers=2)
    seen += map_one_blas_thread(lambda _: threading.get_ident(), range(4), workers=2)
    assert pool_threads() == before and set(seen) <= before and threading.get_ident() not in seen
    assert map_one_blas_thread(lambda _: torch.get_num_threads(), range(2), workers=2) == [1, 1]
    assert map_one_blas_thread(lambda x: x * x, range(50), workers=2) == [x * x for x in range(50)]
    running, peak, lock = [0], [0], threading.Lock()

    def busy(_):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        threading.Event().wait(0.02)
        with lock:
            running[0] -= 1

    map_one_blas_thread(busy, range(6), workers=3)  # three threads now
    peak[0] = 0
    map_one_blas_thread(busy, range(6), workers=1)
    assert peak[0] == 1
    # callers on other threads share the threads safely, each with its own limit
    out: dict[int, list[int]] = {}

    def caller(w: int) -> None:
        out[w] = map_one_blas_thread(lambda x: x + w, range(200), workers=w)

    threads = [threading.Thread(target=caller, args=(w,)) for w in (1, 2, 5, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {w: [x + w for x in range(200)] for w in (1, 2, 5, 8)}
    assert map_one_blas_thread(lambda x: map_one_blas_thread(lambda y: x * y, range(3)), range(3), workers=2) == \
        [[x * y for y in range(3)] for x in range(3)]


def test_a_stopped_compute_map_finishes_what_started_and_skips_the_rest():
    started, done = [], []

    def slow(x):
        started.append(x)
        threading.Event().wait(0.05)
        done.append(x)
        if x == 0:
            raise ValueError("first fails")
        return x

    map_one_blas_thread(lambda _: threading.Event().wait(0.01), range(16), workers=16)  # many idle threads now
    with pytest.raises(ValueError, match="first fails"):
        list(imap_one_blas_thread(slow, range(20), workers=2))
    # nothing left running; with two in flight at a time, at most the two after the failing one started
    assert sorted(done) == sorted(started) and len(started) <= 3


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork here")
def test_zip_results_pulls_a_lazy_stream_only_as_workers_free_up():
    """extract's streamed pass: items come from a generator that reads as it goes; each is taken only when
    a worker is free (never more than RESULTS_AHEAD per worker ahead of what the caller has consumed),
    results come in order, and an error stops the stream where it happened, the generator closed."""
    pulled, closed = [], []

    def stream(n):
        try:
            for i in range(n):
                pulled.append(i)
                yield i
        finally:
            closed.append(True)

    taken = []
    for x, y in zip_results(stream(40), lambda i: (threading.Event().wait(0.002), i * i)[1], workers=3):
        taken.append((x, y))
        assert len(pulled) <= len(taken) + 3 * RESULTS_AHEAD  # (40 items: more than the bound could ever pull)
    assert taken == [(i, i * i) for i in range(40)] and closed

    pulled.clear()
    closed.clear()

    def boom(i):
        if i == 4:
            raise ValueError("bad matrix 4")
        return i

    got = []
    with pytest.raises(ValueError, match="bad matrix 4"):
        for x, _ in zip_results(stream(100), boom, workers=2):
            got.append(x)
    assert got == [0, 1, 2, 3] and len(pulled) <= 5 + 2 * RESULTS_AHEAD and closed


def test_a_long_item_does_not_idle_the_other_workers():
    """Results come in order, but a worker whose item finished takes the next one while the first still
    runs: item 0 here finishes only once three later items have (the old head-of-line wait ran one
    item beside it, then idled, and item 0 timed out)."""
    finished, lock, three = [], threading.Lock(), threading.Event()

    def work(i):
        if i == 0:
            return three.wait(10)
        with lock:
            finished.append(i)
            if len(finished) == 3:
                three.set()
        return i

    got = list(imap_one_blas_thread(work, range(8), workers=2))
    assert got == [True, 1, 2, 3, 4, 5, 6, 7]


def test_zip_results_keeps_what_runs_at_once_within_its_cost():
    """extract's bound on memory: items whose costs do not fit together run one after the other (one always
    runs, however large), small ones together; a stream that fails while the first items are being taken
    is closed, and what had started is finished before the error is raised."""
    lock, now, peak = threading.Lock(), [0], [0]

    def work(c):
        with lock:
            now[0] += c
            peak[0] = max(peak[0], now[0])
        threading.Event().wait(0.01)
        with lock:
            now[0] -= c
        return c

    costs = [8, 8, 3, 3, 3, 20, 1, 1]
    got = [y for _, y in zip_results(iter(costs), work, workers=3, cost=lambda c: c, max_cost=10)]
    assert got == costs and peak[0] <= 20  # 20 alone; the rest never above 10 together
    peak[0] = 0
    list(zip_results(iter([3, 3, 3, 3]), work, workers=3, cost=lambda c: c, max_cost=10))
    assert peak[0] == 9  # three small ones at once

    started, closed = [], []

    def failing():
        try:
            yield 1
            raise OSError("the checkpoint vanished")
        finally:
            closed.append(True)

    def slow(x):
        threading.Event().wait(0.05)
        started.append(x)
        return x

    with pytest.raises(OSError, match="vanished"):
        list(zip_results(failing(), slow, workers=2))
    after = list(started)
    threading.Event().wait(0.15)
    # the stream was closed; the first item was cancelled or had finished: nothing runs on after the error
    assert closed and after in ([], [1]) and started == after


def test_a_forked_child_gets_compute_workers_of_its_own():
    import os

    map_one_blas_thread(lambda x: x, range(2), workers=2)  # the parent's workers exist
    pid = os.fork()
    if pid == 0:  # the child: the parent's threads are not here; a map must not wait on them
        try:
            os._exit(0 if map_one_blas_thread(lambda x: x + 1, range(4), workers=2) == [1, 2, 3, 4] else 1)
        finally:
            os._exit(2)
    for _ in range(600):  # 30 s at most: a child waiting on threads it does not have would hang
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        threading.Event().wait(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's map hung")
    assert os.waitstatus_to_exitcode(status) == 0


def test_cpu_defaults_read_a_batch_ahead_and_options_override_them():
    cpu = torch.device("cpu")
    run = run_settings(DiffConfig(), cpu)
    assert (run.batch_bytes, run.depth, run.ahead_bytes, run.workers) == (CPU_COLLECT_BYTES, DiffConfig().max_batch, 3 * CPU_COLLECT_BYTES, 1)
    run = run_settings(DiffConfig(max_batch=8, max_batch_bytes=1 << 20, prefetch=2, prefetch_bytes=5), cpu)
    assert (run.batch_bytes, run.depth, run.ahead_bytes) == (1 << 20, 2, 5)
    assert run_settings(DiffConfig(max_batch=8), cpu).depth == 8


def test_largest_matrices_are_computed_first_and_results_stay_the_same(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(3)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (24, 24), "model.layers.0.mlp.up_proj.weight": (64, 24),
              "model.layers.1.self_attn.q_proj.weight": (24, 24), "model.embed_tokens.weight": (200, 24),
              "model.layers.1.mlp.up_proj.weight": (64, 24)}
    base = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    tuned = {k: v + 0.01 * torch.randn(*v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    order = []
    res = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(device="cpu"),
                       callback=lambda e: order.append(e.result.name))
    sizes = [shapes[n][0] * shapes[n][1] for n in order]
    assert sizes == sorted(sizes, reverse=True), order
    serial = spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", config=DiffConfig(device="cpu", prefetch=0, max_batch=1))
    assert [m.name for m in res.modules] == [m.name for m in serial.modules]  # layer order, whatever the work order
    for m, s in zip(res.modules, serial.modules, strict=True):
        assert m.energy_rank == s.energy_rank
        np.testing.assert_allclose(m.singular_values, s.singular_values, rtol=1e-12)


@pytest.mark.parametrize("n_rows, n_cols, long_names, marks",
                         [(30, 7, False, True), (2, 2, False, False), (12, 12, True, True), (80, 9, False, False)])
def test_every_heatmap_label_lies_inside_the_figure_and_off_the_cells(n_rows, n_cols, long_names, marks):
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from spectra.plots.base import heatmap

    name = "model.layers.{}.self_attn.q_proj.weight.with.a.long.tail" if long_names else "{}"
    rows = [name.format(i) for i in range(n_rows)]
    cols = [name.format(f"m{j}") for j in range(n_cols)]
    grid = np.random.default_rng(0).random((n_rows, n_cols))
    fig = heatmap(grid, rows, cols, title="a title long enough to be wrapped onto a second line " * 3,
                  cbar_label="what the colours mean, with units", fmt=lambda v: f"{v:.2f}",
                  marks=[(0.3, "random 4096×4096"), (0.6, "random 11008×4096, 4096×11008")] if marks else (),
                  col_notes=[f"random 0.{j}" for j in range(n_cols)] if marks else None)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    page = fig.bbox
    ax, cax = fig.axes[0], fig.axes[1]
    frame = ax.get_window_extent(renderer)
    texts = [t for a in (ax, cax) for t in a.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]
    assert len(texts) > n_cols + 3  # tick labels, title, axis and colour bar labels (and cell annotations)
    for t in texts:
        box = t.get_window_extent(renderer)
        assert page.x0 - 0.5 <= box.x0 and box.x1 <= page.x1 + 0.5 and page.y0 - 0.5 <= box.y0 and box.y1 <= page.y1 + 0.5, t.get_text()
        if t not in ax.texts:  # labels never cover the heatmap's cells
            assert not (box.x0 < frame.x1 - 0.5 and box.x1 > frame.x0 + 0.5 and box.y0 < frame.y1 - 0.5 and box.y1 > frame.y0 + 0.5), t.get_text()
    assert cax.get_window_extent(renderer).x0 > frame.x1  # the colour bar stands right of the heatmap


def test_a_skipped_unit_closes_the_batch_waiting_for_it(tmp_path):
    """k_proj (8×8) waited for v_proj (8×8); v_proj had an Inf and travelled alone, and down_proj (64×1)
    then joined k_proj's batch: `ValueError: mats must be equally shaped` (a traceback, no results)."""
    g = torch.Generator().manual_seed(0)
    b = {"model.layers.0.mlp.down_proj.weight": torch.randn(64, 1, generator=g),
         "model.layers.0.self_attn.k_proj.weight": torch.randn(8, 8, generator=g),
         "model.layers.0.self_attn.v_proj.weight": torch.randn(8, 8, generator=g)}
    t = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in b.items()}
    t["model.layers.0.self_attn.v_proj.weight"][0, 0] = float("inf")
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(t, str(tmp_path / "t.safetensors"))
    res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), plots=False)
    assert [s["name"] for s in res.skipped] == ["model.layers.0.self_attn.v_proj.weight"]
    for m in res.modules:
        d = (t[m.name] - b[m.name]).double().numpy()
        s = np.linalg.svd(d, compute_uv=False)
        assert m.fro_norm == pytest.approx(float(np.sqrt((s**2).sum())), rel=1e-5)
        assert m.energy_rank["0.9"] == int(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), 0.9 - 1e-12) + 1)


def test_a_failed_item_starts_nothing_more():
    """An item that fails while an earlier one still runs: the rest stay unstarted (they started, one after another,
    until the earlier item finished and the error could be raised in its turn)."""
    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        if i == 1:
            raise ValueError("bad matrix 1")
        threading.Event().wait(0.3 if i == 0 else 0.01)
        return i

    got = []
    with pytest.raises(ValueError, match="bad matrix 1"):
        for y in imap_one_blas_thread(work, range(12), workers=2):
            got.append(y)
    assert got == [0] and set(started) <= {0, 1, 2}


def test_small_results_free_their_cost_when_they_finish():
    """compare's cost is a module's working set, freed when its measures end (its result is a record): finished
    results waiting behind a long first item no longer hold the cap, so the other worker keeps going."""
    done_while_first_ran, first_done = [], threading.Event()

    def work(i):
        if i == 0:
            threading.Event().wait(0.5)
            first_done.set()
        elif not first_done.is_set():
            done_while_first_ran.append(i)
        return i

    got = list(imap_one_blas_thread(work, range(10), workers=2, cost=lambda i: 100, max_cost=300, small_results=True))
    assert got == list(range(10)) and len(done_while_first_ran) >= 4  # (without it: 2, the cap's 3 items less the first)
