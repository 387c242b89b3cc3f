"""spectra.plots.base.run_split / save_figures: figures drawn half in a forked child, half here, with
this process taking over whatever the child could not do (an error, a crash, a hang)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from spectra.plots import base
from spectra.plots.base import heatmap, run_split, save_figures

fork_only = pytest.mark.skipif(not hasattr(os, "fork") or len(os.sched_getaffinity(0)) < 2,
                               reason="needs os.fork and two usable cores")


def _pid(i: int):
    return lambda: (i, os.getpid())


@pytest.fixture(autouse=True)
def _no_foreign_threads(monkeypatch):
    """These tests are about the fork itself: threads other tests of the session left alive (an idle pool,
    a progress monitor) must not turn it off (run_split draws in-process beside them; tested in test_hostile13)."""
    monkeypatch.setattr(base, "foreign_threads", lambda: [])


@fork_only
def test_results_in_order_and_half_of_them_from_a_child():
    out = run_split([_pid(i) for i in range(5)])
    assert [i for i, _ in out] == list(range(5))
    here = os.getpid()
    assert [pid == here for _, pid in out] == [True, False, True, False, True]
    assert len({pid for _, pid in out[1::2]}) == 1


@fork_only
def test_the_child_leaves_stop_signals_to_their_default_and_wakes_no_watcher():
    import signal

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)
    try:
        out = run_split([lambda: None, lambda: (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
                                                signal.set_wakeup_fd(-1))])
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
    # a stop raises KeyboardInterrupt in the child (its tasks clean up, it leaves); no wakeup fd inherited
    assert out[1][0] is base._stop_here and out[1][1] is base._stop_here and out[1][2] == -1


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@fork_only
def test_a_failed_fork_runs_everything_here_and_leaks_nothing(monkeypatch):
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    before = _open_fds()
    here = os.getpid()
    assert run_split([_pid(i) for i in range(3)]) == [(i, here) for i in range(3)]
    assert _open_fds() == before


@fork_only
def test_with_sigchld_ignored_the_results_still_come_back():
    import signal

    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the child: waitpid cannot
    try:
        before = _open_fds()
        out = run_split([_pid(i) for i in range(4)])
        assert [i for i, _ in out] == list(range(4))
        assert _open_fds() == before
    finally:
        signal.signal(signal.SIGCHLD, previous)


@fork_only
def test_a_stopped_child_leaves_at_once():
    """The parent's error stops the child with SIGTERM, which it turns into KeyboardInterrupt: it leaves
    well before the SIGKILL that would follow 2 s later."""
    def boom():
        time.sleep(0.2)  # the child is inside its sleep by now
        raise ValueError("here")

    t = time.perf_counter()
    with pytest.raises(ValueError, match="here"):
        run_split([boom, lambda: time.sleep(30)])
    assert time.perf_counter() - t < 1.5


def test_one_task_or_no_fork_runs_here(monkeypatch):
    here = os.getpid()
    assert run_split([_pid(0)]) == [(0, here)]
    assert run_split([]) == []
    monkeypatch.setenv("SPECTRA_NO_FORK", "1")
    assert run_split([_pid(i) for i in range(3)]) == [(i, here) for i in range(3)]


@fork_only
def test_a_task_that_fails_in_the_child_is_run_here():
    here = os.getpid()

    def fails_in_child():
        if os.getpid() != here:
            raise RuntimeError("child only")
        return "done here"

    assert run_split([lambda: 1, fails_in_child, lambda: 3]) == [1, "done here", 3]


@fork_only
def test_a_child_that_hangs_is_killed_and_its_tasks_run_here():
    here = os.getpid()

    def hangs_in_child():
        if os.getpid() != here:
            time.sleep(60)
        return "done here"

    t = time.perf_counter()
    assert run_split([lambda: 1, hangs_in_child], timeout_s=0.5) == [1, "done here"]
    assert time.perf_counter() - t < 20


@fork_only
def test_an_error_here_propagates_and_leaves_no_child():
    def boom():
        raise ValueError("here")

    with pytest.raises(ValueError, match="here"):
        run_split([boom, lambda: time.sleep(30)])
    with pytest.raises(ChildProcessError):  # the child was killed and reaped: nothing left to wait for
        os.waitpid(-1, os.WNOHANG)


def test_save_figures_writes_each_figure_and_skips_none(tmp_path):
    grid = np.arange(6.0).reshape(2, 3)
    builders = {
        "first": lambda: heatmap(grid, [0, 1], ["a", "b", "c"], title="t", cbar_label="v"),
        "nothing": lambda: None,
        "second": lambda: heatmap(-grid, [0, 1], ["a", "b", "c"], title="t2", cbar_label="v"),
    }
    paths = save_figures(builders, tmp_path, dpi=50)
    assert list(paths) == ["first", "second"]
    for name, path in paths.items():
        assert path == tmp_path / f"{name}.png"
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert not (tmp_path / "nothing.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.png", "second.png"]  # no temporary files left
