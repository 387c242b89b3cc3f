"""Twenty-seventh round, the Python API (docs/bad_inputs.md, "twenty-seventh round"): recommend read the diff's models
relative to the folder it was run from (another project's base/ and tuned/ were read, their task type taken), an opened
checkpoint read another folder's files after os.chdir, and bare KeyError/TypeError tracebacks for a τ the run did
not compute, a DiffResult given to recommend, one path given to build_report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra import diff, open_checkpoint
from spectra.errors import ConfigError, SpectraError
from spectra.recommend import recommend

transformers = pytest.importorskip("transformers")


def _pair(folder, seed: int, architectures: list[str]):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    w = {f"model.layers.0.self_attn.{p}.weight": torch.randn(32, 32, generator=g) for p in ("q_proj", "v_proj")}
    cfg = {"model_type": "llama", "architectures": architectures, "hidden_size": 32}
    for side, d in (("base", w), ("tuned", {k: v + 0.1 * torch.randn(32, 32, generator=g) for k, v in w.items()})):
        (folder / side).mkdir()
        save_file(d, str(folder / side / "model.safetensors"))
        (folder / side / "config.json").write_text(json.dumps(cfg))


def test_recommend_reads_the_models_where_the_diff_ran(tmp_path, monkeypatch):
    _pair(tmp_path / "projA", 0, ["LlamaForCausalLM"])
    _pair(tmp_path / "projB", 1, ["LlamaForSequenceClassification"])
    monkeypatch.chdir(tmp_path / "projA")
    diff("base", "tuned", out_dir="res")
    assert recommend("res/results.json").config["task_type"] == "CAUSAL_LM"
    monkeypatch.chdir(tmp_path / "projB")  # relative base/ and tuned/ name this project's models here
    rec = recommend(tmp_path / "projA" / "res" / "results.json")
    assert rec.config["task_type"] == "CAUSAL_LM" and not any("cannot be read" in n for n in rec.notes)
    # the review: checkpoints opened in A, diffed from B (the labels are A's): the inputs' own locations are recorded
    monkeypatch.chdir(tmp_path / "projA")
    b, t = open_checkpoint("base"), open_checkpoint("tuned")
    monkeypatch.chdir(tmp_path / "projB")
    res = diff(b, t, out_dir=tmp_path / "res2")
    assert res.inputs == {"base": str(tmp_path / "projA" / "base" / "model.safetensors"),
                          "tuned": str(tmp_path / "projA" / "tuned" / "model.safetensors")}
    assert recommend(tmp_path / "res2").config["task_type"] == "CAUSAL_LM"


def test_an_opened_checkpoint_reads_its_own_files_after_chdir(tmp_path, monkeypatch):
    _pair(tmp_path / "projA", 0, ["LlamaForCausalLM"])
    _pair(tmp_path / "projB", 1, ["LlamaForCausalLM"])
    monkeypatch.chdir(tmp_path / "projA")
    b, t = open_checkpoint("base"), open_checkpoint("tuned")
    ref = diff("base", "tuned")
    monkeypatch.chdir(tmp_path / "projB")
    got = diff(b, t)
    assert [m.fro_norm for m in got.modules] == [m.fro_norm for m in ref.modules]
    assert got.base == "base"  # the label as typed
    (tmp_path / "projB" / "empty").mkdir()
    with pytest.raises(SpectraError) as info:  # a message names the path as typed, not made absolute
        open_checkpoint("empty")
    assert str(info.value).startswith("empty: ") and str(tmp_path) not in str(info.value)


def test_api_misuse_is_one_line(tmp_path, monkeypatch):
    _pair(tmp_path / "p", 0, ["LlamaForCausalLM"])
    monkeypatch.chdir(tmp_path / "p")
    res = diff("base", "tuned", out_dir="res")
    with pytest.raises(ConfigError, match=r"τ = 0.7 was not computed by this run \(its thresholds: 0.5, 0.9, 0.99\)"):
        res.summary(0.7)
    assert res.summary_records(np.float32(0.9)) == res.summary_records(0.9)  # 0.8999999761581421 is 0.9
    assert recommend(res).ranks == recommend("res").ranks  # the DiffResult spectra.diff returned
    with pytest.raises(ConfigError, match="results must be a results.json path"):
        recommend(5)
    from spectra.report import build_report

    assert "spectra report" in build_report("res")  # one path, not its characters ("r: no such file")
    with pytest.raises(SpectraError):
        build_report(os.fspath(tmp_path / "nothing"))
