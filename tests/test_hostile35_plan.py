"""Thirty-fifth round, ``diff --plan`` and the stop watchdog: the I/O probe picks pairs near its target by ratio, --method
svd is priced as SVDs, float32's float64 fallback is noted."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from spectra import pipeline
from spectra.config import DiffConfig


def _task(nbytes: int) -> SimpleNamespace:
    return SimpleNamespace(pair=SimpleNamespace(stored_bytes=nbytes))


def test_the_io_probe_reads_a_large_pair_before_many_tiny_ones():
    """A 64 MiB pair is 32 MiB from the 32 MiB target, so 200 pairs of 1 KiB came first by difference: the probe read
    64 tiny pairs, measured their fixed cost as a rate, and priced 3 × 2048 × 8192 bf16 matrices at 5 min (read in
    18 s). By ratio the large pair is the nearest."""
    tasks = [_task(1024) for _ in range(200)] + [_task(64 << 20) for _ in range(3)]
    chosen = pipeline.probe_tasks(tasks)
    assert [t.pair.stored_bytes for t in chosen] == [64 << 20]
    assert [t.pair.stored_bytes for t in pipeline.probe_tasks([_task(1024)] * 5)] == [1024] * 5  # only tiny ones: read


def test_plan_prices_method_svd_as_svds_and_notes_the_float32_fallback(tmp_path):
    """--plan --method svd was priced at the Gram route's rates (1.8 s planned, 49 s run); --precision float32 did not
    say that a matrix whose float32 spectrum fails its certificate is solved again in float64."""
    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 192, generator=g) for i in range(2)}
    save_file(W, tmp_path / "b.safetensors")
    save_file({n: w + 0.01 * torch.randn(64, 192, generator=g) for n, w in W.items()}, tmp_path / "t.safetensors")
    b, t = str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")
    svd = pipeline.plan_run(b, t, DiffConfig(method="svd"))
    gram = pipeline.plan_run(b, t, DiffConfig())
    assert svd.cost.method == "svd" and gram.cost.method == "gram"
    # an SVD of a 512 × 1536 matrix costs several times its Gram product and eigensolve (measured ~10× on 2 cores)
    assert svd.cost.matrix_seconds((512, 1536)) > 2 * gram.cost.matrix_seconds((512, 1536)), (svd.cost, gram.cost)
    f32 = pipeline.plan_run(b, t, DiffConfig(precision="float32"))
    assert any("solved again in float64" in n for n in f32.notes) and not any("solved again" in n for n in gram.notes)


def test_a_stop_on_another_rank_says_rank_0_keeps_the_journal(tmp_path, monkeypatch):
    """After rank 0 was killed, rank 1 said "results finished so far are kept in kA": it keeps nothing itself, and on
    another node that folder is not this one's. It says rank 0 journals them."""
    import click

    from spectra_cli.main import kept_on_stop, main

    ctx = click.Context(main)
    ctx.meta["spectra.args"] = ["diff", "a", "b", "--out", str(tmp_path / "o")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert kept_on_stop(main, ctx).startswith(f"rank 0 journals the results exchanged so far in its {tmp_path / 'o'}")
    monkeypatch.setenv("RANK", "0")
    assert not kept_on_stop(main, ctx).startswith("rank 0 journals")

