"""Twenty-fourth round, training (docs/bad_inputs.md, "twenty-fourth round"): the learning rate logged one step late,
a divergence said only on stderr, and a batch too large for memory killed by the kernel."""

from __future__ import annotations

import json
import math

from tests.cli_util import cli
from tests.train_util import base_and_text


def test_the_log_holds_each_steps_own_rate_and_a_divergence(tmp_path):
    """The step-2 record said lr 1.5e-4 where step 2 trained at 2e-4·½(1 + cos(π/6)) = 1.866e-4 (the scheduler's next
    rate), and the last record 0.0, a rate no step used; a run whose loss became NaN left its log at step 0 and the
    report called it "stopped" with a row start = end."""
    base, data = base_and_text(tmp_path, 20_000)
    common = ["train", "--base", str(base), "--data", str(data), "--batch", "2", "--seq-len", "32", "--device", "cpu",
              "--trace-every", "0"]
    r = cli([*common, "--steps", "6", "--eval-every", "2", "--lr", "2e-4", "-o", str(tmp_path / "ok")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (tmp_path / "ok" / "train_log.jsonl").read_text().splitlines()]
    steps, warmup = 6, 1  # max(1, steps // 20)
    for rec in recs[1:]:  # LambdaLR: step s (1-based) runs at factor(s - 1)
        s = rec["step"] - 1
        want = 2e-4 * min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        assert math.isclose(rec["lr"], want, rel_tol=1e-9), rec
    assert recs[-1]["lr"] > 0
    # (1e3 reached NaN on one machine and a saturated uniform output, loss ln 256, on another: 1e8 overflows anywhere)
    r = cli([*common, "--steps", "3", "--lr", "1e8", "--method", "full", "-o", str(tmp_path / "nan")], cwd=tmp_path)
    assert r.returncode != 0 and "became" in r.stderr
    last = json.loads((tmp_path / "nan" / "train_log.jsonl").read_text().splitlines()[-1])
    assert last["step"] > 0 and "became" in last["error"]
    rep = cli(["report", str(tmp_path / "nan"), "-o", str(tmp_path / "r.html")], cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    assert "failed at step" in (tmp_path / "r.html").read_text() and "a stopped spectra train" not in (tmp_path / "r.html").read_text()


def test_a_batch_too_large_for_memory_is_refused_before_the_output_is_made(tmp_path):
    base, data = base_and_text(tmp_path, 20_000)
    r = cli(["train", "--base", str(base), "--data", str(data), "--batch", "1000000", "--seq-len", "32", "--steps", "2",
             "--device", "cpu", "-o", str(tmp_path / "big")], cwd=tmp_path)
    assert r.returncode != 0 and "GiB for the logits of one step" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "big").exists()
