"""Thirty-eighth round: trace of a run that resized its vocabulary part-way (docs/bad_inputs.md, "thirty-eighth round")."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from cli_util import cli
from safetensors.torch import save_file

E = "model.embed_tokens.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")


def test_a_vocabulary_resized_at_one_checkpoint_is_said_of_its_steps_and_warned(tmp_path):
    """The pairing's note of a table resized at step 20 (100 → 104 rows) sat on the matrix without its steps, as if
    every checkpoint had been resized, and nothing was printed; now the note names the steps and a warning says it."""
    g = torch.Generator().manual_seed(0)
    emb, q = torch.randn(100, 16, generator=g), torch.randn(16, 16, generator=g)
    _save(tmp_path / "base", {E: emb, Q: q})
    run = tmp_path / "run"
    step10 = emb + 0.01 * torch.randn(100, 2, generator=g) @ torch.randn(2, 16, generator=g)
    _save(run / "checkpoint-10", {E: step10, Q: q + 0.01 * torch.randn(16, 16, generator=g)})
    grown = torch.cat([step10 + 0.01 * torch.randn(100, 16, generator=g), torch.randn(4, 16, generator=g)])
    _save(run / "checkpoint-20", {E: grown, Q: q + 0.02 * torch.randn(16, 16, generator=g)})
    res = cli(["trace", str(tmp_path / "base"), str(run), "--out", str(tmp_path / "t"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "t" / "trace.json").read_text())
    by_name = {m["name"]: m for m in out["matrices"]}
    note = by_name[E]["note"] or ""
    assert "at step 20: rows differ (base 100, tuned 104" in note, note
    assert "rows differ" not in (by_name[Q]["note"] or "")
    # both steps measured over the 100 rows both hold: step 20's ΔW is that of the shared rows
    pts = {p["step"]: p for p in by_name[E]["points"]}
    assert abs(pts[20]["fro_norm"] - float(torch.linalg.norm((grown[:100] - emb).double()))) <= 1e-6 * pts[20]["fro_norm"]
    warned = [w for w in out["warnings"] if "another row count than the base" in w]
    assert len(warned) == 1 and E in warned[0] and "at step 20" in warned[0], out["warnings"]
    assert "another row count" in " ".join(res.stderr.split())


def test_a_checkpoint_that_fails_mid_trace_says_which_points_it_kept(tmp_path):
    """A checkpoint file truncated after some matrices were measured at its step: its warning said only that it
    failed, while the points measured before stayed in trace.json with numbers; now it says how many kept theirs."""
    from spectra.trace import trace

    g = torch.Generator().manual_seed(1)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)]
    W = {n: torch.randn(16, 16, generator=g) for n in names}
    _save(tmp_path / "base", W)
    run = tmp_path / "run"
    for s in (10, 20):
        _save(run / f"checkpoint-{s}", {n: w + 0.01 * s * torch.randn(16, 16, generator=g) for n, w in W.items()})
    target = run / "checkpoint-20" / "model.safetensors"
    size = target.stat().st_size

    def cut(done, total, what):  # after the first matrix: the trainer's save_total_limit removes the file's tail
        if done == 1:
            with open(target, "r+b") as f:
                f.truncate(size // 2)

    res = trace(str(tmp_path / "base"), [str(run)], callback=cut, plots=False)
    measured = [m["name"] for m in res.matrices if any(p["step"] == 20 and not p.get("skip") for p in m["points"])]
    assert measured == [names[0]]
    warned = [w for w in res.warnings if "checkpoint-20" in w and "could not be read any more" in w]
    assert len(warned) == 1 and "1 matrix measured at step 20 before it failed keeps its point" in warned[0], res.warnings
