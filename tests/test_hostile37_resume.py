"""Thirty-seventh round: a refused ``diff --resume`` names the input file that changed, and the code
(docs/bad_inputs.md, "thirty-seventh round")."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from tests.cli_util import cli


def _model(path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(24, 16, generator=g) for i in range(2)},
              str(path / "model.safetensors"))


def test_diff_resume_refusal_names_the_changed_file_and_other_code(tmp_path):
    _model(tmp_path / "b", 0)
    _model(tmp_path / "t", 1)
    b, t, out = str(tmp_path / "b"), str(tmp_path / "t"), tmp_path / "o"
    assert cli(["diff", b, t, "--out", str(out), "--no-plots"]).returncode == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["identity"]) == {"code", "base", "tuned", "deciding"}
    _model(tmp_path / "t", 2)  # the tuned weights rewritten in place, same path
    run = cli(["diff", b, t, "--out", str(out), "--no-plots", "--resume"])
    assert run.returncode != 0 and "tuned changed since" in run.stderr and "model.safetensors" not in run.stderr.split(
        "tuned changed since")[0], run.stderr
    assert "base changed" not in run.stderr and str(tmp_path / "t") in run.stderr.replace("\n", "")
    # results written by other code: the journal's records are another version's
    assert cli(["diff", b, t, "--out", str(out), "--no-plots"]).returncode == 0
    doc = json.loads((out / "results.json").read_text())
    doc["identity"]["code"] = "0" * 16
    doc["fingerprint"] = "0" * 16
    (out / "results.json").write_text(json.dumps(doc))
    run = cli(["diff", b, t, "--out", str(out), "--no-plots", "--resume"])
    assert run.returncode != 0 and "another version of spectra wrote it" in run.stderr, run.stderr
