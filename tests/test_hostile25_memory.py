"""Twenty-fifth round, memory (docs/bad_inputs.md, "twenty-fifth round"): compare measured its largest modules at
once, one per worker, with no cap (a 128k-row embedding's module costs ~3 GB: 6 GB on two workers)."""

from __future__ import annotations

import threading
import time

import torch

from spectra.engine import COMPARE_BATCH_BYTES, MEASURE_COPIES
from tests.test_trace import write_adapter


def test_compare_runs_a_module_above_the_batch_cap_alone(tmp_path, monkeypatch):
    """Two adapters of three modules: two (70,000 × 512, working sets of ~2.6 GB each, above the 2 GiB cap) may not
    run together on two workers; a small one may run beside anything."""
    import spectra.comparison as comparison

    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.mlp.up_proj.weight": (70_000, 512), "model.layers.1.mlp.up_proj.weight": (70_000, 512),
              "model.layers.0.self_attn.q_proj.weight": (64, 64)}
    for name in ("a", "b"):
        write_adapter(tmp_path / name, {n: (torch.randn(o, 1, generator=g), torch.randn(1, i, generator=g))
                                        for n, (o, i) in shapes.items()}, r=1, alpha=1.0)
    running, most, lock = [], [0], threading.Lock()
    measure = comparison._measure

    def tracked(job, *args):
        big = MEASURE_COPIES * job.shape[0] * job.shape[1] * 8 > COMPARE_BATCH_BYTES
        with lock:
            running.append(big)
            most[0] = max(most[0], sum(running))
        time.sleep(0.6 if big else 0.05)  # a big one outlasts the small one beside it: the next big could start then
        try:
            return measure(job, *args)
        finally:
            with lock:
                running.remove(big)

    monkeypatch.setattr(comparison, "_measure", tracked)
    res = comparison.compare(str(tmp_path / "a"), str(tmp_path / "b"), workers=2)
    assert len(res.modules) == 3
    assert most[0] == 1  # never two big modules at once


def test_read_ahead_counts_the_pair_the_consumer_holds():
    """Two pairs each above half the read-ahead cap (a 128k-row embedding and its head): the second was read while
    the first was still being decomposed (its bytes left the count when its read finished), ~500 MiB over the
    documented floor of the largest pair. Small pairs behind a small one are still read ahead."""
    from spectra.stream import read_ahead

    log, lock = [], threading.Lock()

    def read(task):
        with lock:
            log.append(f"read {task}")
        return [task]

    sizes = {"embed": 100, "head": 100, "a": 1, "b": 1, "c": 1}
    for task in read_ahead(list(sizes), read, lambda t: sizes[t], depth=4, workers=1, max_bytes=150, name="t"):
        time.sleep(0.2)  # decomposing it: a reader that may start would have started by now
        with lock:
            log.append(f"use {task}")
            if task == "embed":
                assert "read head" not in log  # 100 held + 100 > 150: after the consumer is done with it
            if task == "head":
                assert "read a" in log and "read b" in log  # 100 + 1 + 1 fit beside it
    assert [x for x in log if x.startswith("use")] == [f"use {t}" for t in sizes]


def test_compare_on_one_worker_measures_off_the_main_thread(tmp_path, monkeypatch):
    """compare(workers=1) measured on the main thread, where torch's solvers stall on a busy machine (a probe: 14 s
    against 1.1 s on two workers for the same 16 modules; spectra.threads runs even one worker on a pool thread)."""
    import spectra.comparison as comparison

    g = torch.Generator().manual_seed(0)
    shapes = {f"model.layers.{i}.self_attn.q_proj.weight": (32, 32) for i in range(3)}
    for name in ("a", "b"):
        write_adapter(tmp_path / name, {n: (torch.randn(o, 2, generator=g), torch.randn(2, i, generator=g))
                                        for n, (o, i) in shapes.items()}, r=2, alpha=2.0)
    on_main, measure = [], comparison._measure

    def tracked(job, *args):
        on_main.append(threading.current_thread() is threading.main_thread())
        return measure(job, *args)

    monkeypatch.setattr(comparison, "_measure", tracked)
    one = comparison.compare(str(tmp_path / "a"), str(tmp_path / "b"), workers=1)
    assert len(on_main) == 3 and not any(on_main)
    monkeypatch.setattr(comparison, "_measure", measure)
    two = comparison.compare(str(tmp_path / "a"), str(tmp_path / "b"), workers=2)
    for m1, m2 in zip(one.modules, two.modules):  # the same numbers on one worker and on two
        assert m1.name == m2.name and abs(m1.phi["right"].phi_full - m2.phi["right"].phi_full) < 1e-12
