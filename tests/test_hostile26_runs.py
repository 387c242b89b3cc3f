"""Twenty-sixth round, runs (docs/bad_inputs.md, "twenty-sixth round"): `diff --plan`'s read rate measured on one
small pair on the main thread's OpenMP team; a distributed run's failure before anything was journaled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import spectra.pipeline as pipeline
from spectra.config import DiffConfig
from spectra.distributed import DistContext, exchange
from spectra.errors import DistributedError


def test_the_plans_read_probe_reads_as_the_run_does(tmp_path, monkeypatch):
    """A model of 0.25-0.5 MiB pairs beside a 234 MiB embedding: the plan timed one 0.5 MiB pair on the main thread,
    whose OpenMP team's barriers on a busy machine cost ~40 ms per pair, and priced the 3 s run at 60-70 s. It now
    reads pairs up to 32 MiB in all, on a reader thread of one OpenMP thread, as the run's reader does."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(4) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    base = {n: torch.randn(256, 256, generator=g) for n in names}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({n: w + 1e-3 for n, w in base.items()}, str(tmp_path / "t.safetensors"))
    seen = []
    real = pipeline.prepare

    def spy(task, *args, **kwargs):
        seen.append((task.pair.tuned.name, torch.get_num_threads()))  # torch's OpenMP team in this thread
        return real(task, *args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare", spy)
    plan = pipeline.plan_run(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), DiffConfig())
    assert plan.tensors == 16
    assert {n for n, _ in seen} == set(names)  # every pair (4 MiB in all, under 32), read twice
    assert len(seen) == 2 * len(names)
    assert all(n == 1 for _, n in seen), seen


def test_a_rank_failing_before_anything_was_journaled_is_not_told_to_resume():
    """A rank that failed while the ranks' inputs were compared (a truncated shard on one rank): "results exchanged so
    far are journaled by rank 0; rerun the same command with --resume", where no --out folder existed yet and --resume
    then said "nothing to resume"."""
    ctx = DistContext(0, 2, 0, "gloo", False)  # no process group: the gather fails as when a peer is gone
    with pytest.raises(DistributedError) as before:
        exchange(ctx, 1, where="comparing the ranks' inputs", journaled=False)
    assert "run the same command again" in before.value.hint and "--resume" not in before.value.hint
    with pytest.raises(DistributedError) as during:
        exchange(ctx, 1, where="exchanging results (round 1 of 2)")
    assert "--resume" in during.value.hint


def test_a_ranks_hard_exit_names_the_rank():
    """A rank stuck in the rendezvous for a peer that died before joining is ended by the 20 s stop watchdog: its
    line, "stopped at once (did not stop within 20 s) …", was the only one without the `[rank N]` of the others."""
    script = textwrap.dedent("""
        from spectra_cli.main import _hard_exit
        _hard_exit(143, "it did not stop within 20 s of the signal", "", "ended by force")
    """)
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 143 and res.stderr.strip() == "[rank 1] ended by force (it did not stop within 20 s of the signal)", res.stderr


def test_an_update_only_in_skipped_expert_stacks_is_not_called_a_copy_of_the_base(tmp_path):
    """A Mixtral stored as 3-D expert stacks whose fine-tunes changed only expert 2: trace said "ΔW = 0 at every
    checkpoint: they hold the base's weights", interfere "copies of the base, or a LoRA saved at initialisation?",
    where the update sat in the stacks they skip."""
    from tests.cli_util import cli
    from tests.pair_util import save_folder

    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
            "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 32, 16, generator=g),
            "model.layers.0.mlp.experts.down_proj": torch.randn(4, 16, 16, generator=g)}
    cfg = {"model_type": "mixtral", "hidden_size": 16, "num_local_experts": 4}
    b = save_folder(tmp_path / "base", base, cfg)
    tuned = []
    for i in (1, 2):
        t = dict(base)
        t["model.layers.0.mlp.experts.gate_up_proj"] = base["model.layers.0.mlp.experts.gate_up_proj"].clone()
        t["model.layers.0.mlp.experts.gate_up_proj"][2] += 0.1 * i
        tuned.append(str(save_folder(tmp_path / f"t{i}", t, cfg)))
    for args in (["trace", str(b), *tuned, "--no-plots"], ["interfere", "--base", str(b), *tuned, "--no-plots"]):
        r = cli(args)
        assert r.returncode == 3 and "were not" in r.stderr and "3-D expert stack" in r.stderr and "the update may be in them" in r.stderr, r.stderr
        assert "hold the base's weights" not in r.stderr and "copies of the base" not in r.stderr


def test_a_copy_of_the_base_is_not_blamed_on_another_tasks_skipped_matrix(tmp_path):
    """The review: A a copy of the base, B with a resized embedding (skipped for B alone): A was told "1 matrix was not
    compared (e.g. embed_tokens: rows differ … in B): the update may be in it" instead of being called a copy."""
    from spectra.interfere import InterfereConfig, interfere
    from tests.pair_util import save_folder

    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(10, 8, generator=g), "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g)}
    b = save_folder(tmp_path / "base", base)
    a = save_folder(tmp_path / "a", dict(base))
    other = {"model.embed_tokens.weight": torch.randn(12, 8, generator=g),
             "model.layers.0.self_attn.q_proj.weight": base["model.layers.0.self_attn.q_proj.weight"] + 0.1}
    c = save_folder(tmp_path / "c", other)
    d = save_folder(tmp_path / "d", {k: v + 0.05 * torch.randn(v.shape, generator=g) if "q_proj" in k else v for k, v in other.items()})
    res = interfere(str(b), [str(a), str(c), str(d)], config=InterfereConfig())
    said = [w for w in res.warnings if "ΔW = 0 on every compared matrix" in w]
    assert len(said) == 1 and "a copy of the base" in said[0] and "may be in" not in said[0], res.warnings
