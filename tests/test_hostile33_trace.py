"""Thirty-third round: run folders holding checkpoints saved as files (docs/bad_inputs.md, "thirty-third round")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from cli_util import cli
from safetensors.torch import save_file

Q = "model.layers.0.self_attn.q_proj.weight"


def _model(folder: Path, W: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    save_file({Q: W.contiguous()}, folder / "model.safetensors")
    return folder


def _run(tmp_path: Path) -> tuple[Path, dict[int, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 24, generator=g)
    _model(tmp_path / "base", W)
    steps = {s: W + 0.01 * s * torch.randn(24, 2, generator=g) @ torch.randn(2, 24, generator=g) for s in (5, 9, 10, 15)}
    return tmp_path / "base", steps


def test_checkpoint_files_beside_a_runs_folders_are_said_not_dropped(tmp_path):
    """checkpoint-15.safetensors and checkpoint-17.pt beside checkpoint-N folders were left out without a word (the
    trace read as if the run ended at step 9); each is listed as left out now, with its step and the way to trace it."""
    base, steps = _run(tmp_path)
    run = tmp_path / "run"
    for s in (5, 9):
        _model(run / f"checkpoint-{s}", steps[s])
    save_file({Q: steps[15].contiguous()}, run / "checkpoint-15.safetensors")
    torch.save({Q: steps[10]}, run / "checkpoint-17.pt")
    save_file({Q: steps[10].contiguous()}, run / "training_notes.safetensors")  # no step in its name: not a checkpoint
    res = cli(["trace", str(base), str(run), "--out", str(tmp_path / "t"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert [c["step"] for c in out["checkpoints"]] == [5, 9]
    left = {Path(s["path"]).name: s["reason"] for s in out["skipped_checkpoints"]}
    assert set(left) == {"checkpoint-15.safetensors", "checkpoint-17.pt"}, left
    assert "step 15 by its name" in left["checkpoint-15.safetensors"] and "list it with the checkpoints" in left["checkpoint-17.pt"]
    assert "checkpoint-15.safetensors" in res.stderr


def test_a_folder_of_checkpoint_files_is_named_and_its_files_traced_by_the_steps_in_their_names(tmp_path):
    """A folder of checkpoint-5.safetensors and checkpoint-10.safetensors was called "one checkpoint"; listed as a shell
    glob orders them (10 before 5), they were traced by position, 10 first. Now the folder is named with the way to
    list them, and listed files take their steps from their names."""
    base, steps = _run(tmp_path)
    files = tmp_path / "files"
    files.mkdir()
    for s in (5, 10):
        save_file({Q: steps[s].contiguous()}, files / f"checkpoint-{s}.safetensors")
    res = cli(["trace", str(base), str(files), "--out", str(tmp_path / "t0"), "--no-plots"])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "a folder of checkpoint files (checkpoint-5.safetensors, checkpoint-10.safetensors)" in res.stderr
    assert f"spectra trace BASE {files}/*.safetensors" in res.stderr
    res = cli(["trace", str(base), str(files / "checkpoint-10.safetensors"), str(files / "checkpoint-5.safetensors"),
               "--out", str(tmp_path / "t"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert [(c["step"], c["source"], Path(c["path"]).name) for c in out["checkpoints"]] == [
        (5, "file name", "checkpoint-5.safetensors"), (10, "file name", "checkpoint-10.safetensors")]


def test_a_run_folder_listed_with_other_checkpoints_is_called_a_run_folder(tmp_path):
    """A run folder holding a loose weights file, listed beside another checkpoint, was read as a step-less model
    ("1 of the 2 checkpoints have no step … give every checkpoint its step")."""
    base, steps = _run(tmp_path)
    run = tmp_path / "run"
    for s in (5, 9):
        _model(run / f"checkpoint-{s}", steps[s])
    shutil.copy(run / "checkpoint-9" / "model.safetensors", run / "model.safetensors")
    other = _model(tmp_path / "run2" / "checkpoint-10", steps[10])
    res = cli(["trace", str(base), str(run), str(other), "--out", str(tmp_path / "t"), "--no-plots"])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "this is a training run's folder of checkpoint-N folders, listed with other checkpoints" in res.stderr
    assert f"spectra trace BASE {run}" in res.stderr


def test_a_run_folder_with_its_own_stepped_model_can_be_listed_beside_its_checkpoints(tmp_path):
    """The refusal above is for a run folder read as a step-less model: one whose own model has a trainer_state.json
    with its global_step (the final model) is a checkpoint, listed with the others as before."""
    base, steps = _run(tmp_path)
    run = tmp_path / "run"
    for s in (5, 9):
        _model(run / f"checkpoint-{s}", steps[s])
    save_file({Q: steps[15].contiguous()}, run / "model.safetensors")
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 15, "log_history": []}))
    res = cli(["trace", str(base), str(run / "checkpoint-5"), str(run / "checkpoint-9"), str(run), "--out", str(tmp_path / "t"),
               "--no-plots"])
    assert res.returncode == 0, res.stderr
    assert [c["step"] for c in json.loads((tmp_path / "t" / "trace.json").read_text())["checkpoints"]] == [5, 9, 15]


def test_progress_in_a_log_prints_while_one_long_item_runs(monkeypatch):
    """On a log, the progress line came only when an item finished: an esd of an 8B pair printed nothing for 145 s (its
    embedding first), which reads as a hang. A timer prints it every LOG_EVERY_S seconds too."""
    import io
    import time

    from rich.console import Console

    import spectra_cli.console as console

    monkeypatch.setattr(console, "LOG_EVERY_S", 0.05)
    out = io.StringIO()
    progress = console._LogProgress(console=Console(file=out, force_terminal=False, width=120))
    with progress:
        progress.add_task("ESD fits", total=5)
        time.sleep(0.4)  # no update at all
    assert out.getvalue().count("ESD fits") >= 3, out.getvalue()
