"""Distributed runs (torchrun, gloo on CPU): cost-balanced split, results equal to one process,
a killed rank fails the run clearly and ``--resume`` completes it; ``--plan``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import wait_for_journal

import spectra
from spectra.plan import CostModel, balance, segment_ends
from spectra.synthetic import LlamaShape, make_llama_pair

SHAPE = LlamaShape(layers=8, hidden=512, intermediate=1376, heads=8, kv_heads=2, vocab=1024)
# One BLAS thread everywhere: torchrun gives each rank one, and summation order must match for the
# results to be equal to the last bit (with other thread counts they agree to ~1e-15 relative).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, *args: str, tag: str = "") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "spectra", "diff", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "SPECTRA_TEST_TAG": tag})


def _modules(out: Path) -> list[dict]:
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True
    return [{k: v for k, v in m.items() if k != "seconds"} for m in doc["modules"]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_llama_pair(tmp_path_factory.mktemp("dist"), shape=SHAPE, seed=5)


@pytest.fixture(scope="module")
def single(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--out", str(out), "--no-plots"],
                   check=True, env=ENV, capture_output=True)
    return out


def test_balance_is_by_cost_not_count():
    costs = [100.0] + [1.0] * 100  # one huge matrix (an embedding) and many small ones
    shares = balance(costs, 2)
    loads = [sum(costs[i] for i in s) for s in shares]
    assert sorted(len(s) for s in shares) == [1, 100]  # by count this would be 51/50
    assert max(loads) == 100.0
    assert sorted(i for s in shares for i in s) == list(range(101))
    # LPT bound: within 4/3 of the optimum, here checked against an exhaustive split
    costs = [7.0, 5, 4, 4, 3, 3, 2, 2, 1]
    best = min(max(sum(c for c, b in zip(costs, range(len(costs))) if (mask >> b) & 1),
                   sum(c for c, b in zip(costs, range(len(costs))) if not (mask >> b) & 1))
               for mask in range(1 << len(costs)))
    got = max(sum(costs[i] for i in s) for s in balance(costs, 2))
    assert best <= got <= best * 4 / 3


def test_segment_ends_split_cost_evenly():
    costs = [1.0] * 10 + [10.0] + [1.0] * 10
    ends = segment_ends(costs, 3)
    assert ends[-1] == len(costs) and ends == sorted(ends)
    assert segment_ends([], 4) == [0, 0, 0, 0]
    assert segment_ends([5.0], 1) == [1]


def test_cost_model_prices_shapes_by_flops():
    c = CostModel(gram_rate=1e9, eig_rate=1e8, io_rate=1e8, overhead_s=0.0)
    assert c.matrix_seconds((4096, 4096)) == pytest.approx(4096**3 / 1e9 + 4096**3 / 1e8)
    assert c.matrix_seconds((1024, 4096)) == c.matrix_seconds((4096, 1024))
    assert c.io_seconds(2e8) == pytest.approx(2.0)


def test_two_ranks_equal_one_process(pair, single, tmp_path):
    out = tmp_path / "two"
    proc = _torchrun(2, str(pair[0]), str(pair[1]), "--out", str(out), "--no-plots")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert _modules(out) == _modules(single)  # bit for bit, every field but the timing
    a = json.loads((out / "results.json").read_text())
    b = json.loads((single / "results.json").read_text())
    assert a["skipped"] == b["skipped"] and a["warnings"] == b["warnings"] and a["fingerprint"] == b["fingerprint"]
    assert stdout.count("Rank needed for 90%") == 1  # only rank 0 prints the table
    assert not list(out.glob("*.tmp"))


def _rank_pid(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` in the run marked ``tag``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SPECTRA_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return int(entry.name)
    return None


def test_killed_rank_fails_clearly_and_resume_completes(pair, single, tmp_path):
    out = tmp_path / "killed"
    tag = uuid.uuid4().hex
    proc = _torchrun(2, str(pair[0]), str(pair[1]), "--out", str(out), "--no-plots", "--method", "svd", tag=tag)
    journal = out / "results.jsonl"
    victim: list[int] = []

    def rank1_found() -> bool:
        if not victim and (pid := _rank_pid(tag, 1)):
            victim.append(pid)
        return bool(victim)

    wait_for_journal(proc, journal, lines=4, ready=rank1_found)
    os.kill(victim[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # rank 0 says what happened and what to do, in one line (torchrun adds its own summary)
    said = r"\[rank 0\] (error: .*another rank of the distributed run failed or was killed|stopped by SIGTERM).*--resume"
    assert re.search(said, stderr), stderr[-3000:]
    n_before = len(journal.read_text().splitlines())
    total = len(_modules(single))
    assert 4 <= n_before < total
    assert json.loads((out / "results.json").read_text())["complete"] is False
    # resume on two ranks: only the missing matrices are computed, the result equals an uninterrupted run
    proc = _torchrun(2, str(pair[0]), str(pair[1]), "--out", str(out), "--no-plots", "--method", "svd", "--resume")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    ref = tmp_path / "ref_svd"
    subprocess.run([sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--out", str(ref), "--no-plots",
                    "--method", "svd"], check=True, env=ENV, capture_output=True)
    assert _modules(out) == _modules(ref)
    assert len(journal.read_text().splitlines()) == total


def test_distributed_without_a_launcher_is_a_clear_error(pair, tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--distributed"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --distributed needs a launcher")
    assert "torchrun --nproc-per-node" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_counts_work_and_prices_it(pair, single):
    plan = spectra.diff_plan(*pair)
    done = _modules(single)
    assert plan.matrices == len(done)
    base, tuned = spectra.open_checkpoint(pair[0]), spectra.open_checkpoint(pair[1])
    paired = {m["name"].split(":")[0] for m in done}
    assert plan.read_bytes == sum(base.tensors[n].nbytes + tuned.tensors[n].nbytes for n in paired)
    assert sum(plan.shapes.values()) == plan.matrices
    assert plan.seconds > 0 and plan.host_bytes > 0 and plan.cost.device == "cpu"
    four = spectra.diff_plan(*pair, world_size=4, calibrate_cost=False)
    one = spectra.diff_plan(*pair, world_size=1, calibrate_cost=False)
    assert len(four.rank_seconds) == 4 and sum(four.rank_seconds) == pytest.approx(sum(one.rank_seconds))
    assert max(four.rank_seconds) < 0.5 * max(one.rank_seconds)
    proc = subprocess.run([sys.executable, "-m", "spectra", "diff", str(pair[0]), str(pair[1]), "--plan", "--nproc", "2"],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"{plan.matrices} (from" in proc.stdout and "estimated time" in proc.stdout and "peak memory" in proc.stdout


def test_rank_device_and_launch_detection(monkeypatch):
    import torch

    from spectra.distributed import launched, rank_device, world_size
    from spectra.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a 4-GPU node, as torch sees it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 3)  # one GPU per rank on the node
    assert rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # one rank per node: kept
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="would put all 4 ranks of this node on one GPU"):
        rank_device(torch.device("cuda", 1))
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ConfigError, match="LOCAL_RANK=5 has no GPU: this node has 4"):
        rank_device(torch.device("cuda"))
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ConfigError, match="LOCAL_RANK='x' is not an integer"):
        rank_device(torch.device("cuda"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched() and world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched()
    monkeypatch.setenv("WORLD_SIZE", "x")
    assert not launched()
    with pytest.raises(ConfigError, match="WORLD_SIZE='x' is not an integer"):
        world_size()


def test_rank_0_refusal_reaches_every_rank(pair, single, tmp_path):
    """--resume of a journal from other options: rank 0 refuses, and rank 1 says why instead of
    reporting a lost rank 0."""
    proc = _torchrun(2, str(pair[0]), str(pair[1]), "--out", str(single), "--no-plots", "--layers", "0", "--resume")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "[rank 0] error:" in stderr and "the journal here comes from different inputs or options" in stderr
    assert "[rank 1] error: rank 0 refused the run:" in stderr, stderr[-3000:]
