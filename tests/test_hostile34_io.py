"""Thirty-fourth round: checkpoint layouts on disk (docs/bad_inputs.md, "thirty-fourth round")."""

from __future__ import annotations

import json

import pytest
import torch
from cli_util import cli
from safetensors.torch import save_file

from spectra import diff
from spectra.errors import CheckpointFormatError, CheckpointNotFoundError
from spectra.esd import ZERO_REASON, power_law_fit
from spectra.findings import diff_findings
from spectra.io.checkpoint import open_checkpoint

NAMES = ("layers.0.attention.wq.weight", "layers.0.attention.wo.weight", "layers.1.attention.wq.weight")


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(24, 24, generator=g) for n in NAMES}


def test_one_rank_of_a_model_parallel_meta_checkpoint_is_refused(tmp_path):
    """consolidated.00.pth of a two-rank Meta checkpoint holds half of every split matrix (wq by rows, wo by columns):
    read alone, diff, esd and inspect measured 12×24 halves as the model with exit 0. Refused now, file and folder, with
    the ranks named and what to do; a one-rank folder names the file to pass."""
    for r in (0, 1):
        torch.save({n: w.chunk(2, dim=0)[r].clone() for n, w in _weights().items()}, tmp_path / f"consolidated.0{r}.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 24}))
    for spec in (tmp_path / "consolidated.00.pth", tmp_path):
        with pytest.raises(CheckpointFormatError, match="holds 2 model-parallel ranks .consolidated.00.pth … consolidated.01.pth") as e:
            open_checkpoint(spec)
        assert "convert_llama_weights_to_hf.py" in str(e.value), e.value
    (tmp_path / "consolidated.01.pth").unlink()
    assert open_checkpoint(tmp_path / "consolidated.00.pth").tensors[NAMES[0]].shape == (12, 24)  # one rank: the model
    with pytest.raises(CheckpointFormatError, match="Meta-format checkpoint folder") as e:
        open_checkpoint(tmp_path)
    assert str(tmp_path / "consolidated.00.pth") in str(e.value)


def test_one_shard_without_its_index_is_read_with_a_note(tmp_path):
    """An interrupted download (model-00001-of-00002.safetensors alone, no index) was read as the model by esd and
    inspect with no word (diff's pairing notes said it); two such folders diffed as "identical". The folder and the
    file are read with a note every command shows (a shard diffed against a shard is a use, so no refusal)."""
    save_file(_weights(), tmp_path / "model-00001-of-00002.safetensors")
    for spec in (tmp_path, tmp_path / "model-00001-of-00002.safetensors"):
        ckpt = open_checkpoint(spec)
        assert any("is shard 1 of 2 and no index names the others" in n for n in ckpt.notes), ckpt.notes
    (tmp_path / "one").mkdir()
    save_file(_weights(), tmp_path / "one" / "model-00001-of-00001.safetensors")  # a one-shard model is whole
    assert not open_checkpoint(tmp_path / "one").notes


def test_loose_shards_beside_a_bin_and_a_variant_index(tmp_path):
    """Shards no index names, beside a stale pytorch_model.bin, were ignored silently (the .bin read); a variant's
    index (model.safetensors.index.fp16.json, transformers' name) could not be passed, nor was it named."""
    w = _weights()
    torch.save(w, tmp_path / "pytorch_model.bin")
    save_file({NAMES[0]: w[NAMES[0]]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({n: w[n] for n in NAMES[1:]}, tmp_path / "model-00002-of-00002.safetensors")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "bin"
    assert any("read pytorch_model.bin" in n and "ignored 2 shard files (model-00001-of-00002.safetensors …)" in n
               for n in ckpt.notes), ckpt.notes
    v = tmp_path / "variant"
    v.mkdir()
    save_file({NAMES[0]: w[NAMES[0]]}, v / "model.fp16-00001-of-00002.safetensors")
    save_file({n: w[n] for n in NAMES[1:]}, v / "model.fp16-00002-of-00002.safetensors")
    (v / "model.safetensors.index.fp16.json").write_text(json.dumps({"weight_map": {
        NAMES[0]: "model.fp16-00001-of-00002.safetensors", **{n: "model.fp16-00002-of-00002.safetensors" for n in NAMES[1:]}}}))
    with pytest.raises(CheckpointFormatError, match="no model.safetensors.index.json") as e:
        open_checkpoint(v)
    assert str(v / "model.safetensors.index.fp16.json") in str(e.value)
    got = open_checkpoint(v / "model.safetensors.index.fp16.json")
    assert sorted(got.tensors) == sorted(NAMES) and torch.equal(got.load(NAMES[2]), w[NAMES[2]])


def test_a_hub_entry_without_refs_names_its_snapshots(tmp_path, monkeypatch):
    """A cache entry copied without refs/ (or downloaded by commit) was "not in the local cache", whatever it held."""
    commit = "f" * 40
    snap = tmp_path / "models--org--noref" / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(_weights(), snap / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match=f"pass one of the cached revisions: org/noref@{commit}"):
        open_checkpoint("org/noref")
    assert open_checkpoint(f"org/noref@{commit}").tensors.keys() == set(NAMES)


def test_an_all_zero_tuned_checkpoint_is_named_by_diff_and_esd(tmp_path):
    """A preallocated file whose data never came (zeros past the header) gave ΔW = −W_base and only "the update is
    larger than the base"; esd said "16 of 16 power-law fits failed (too few eigenvalues above 1e-05 …)". Both say
    what the numbers show now; a matrix of zeros has its own fit reason."""
    save_file(_weights(), tmp_path / "base.safetensors")
    save_file({n: torch.zeros(24, 24) for n in NAMES}, tmp_path / "zero.safetensors")
    res = diff(str(tmp_path / "base.safetensors"), str(tmp_path / "zero.safetensors"))
    text = " ".join(f.text for f in diff_findings(res))
    assert "1 on every changed matrix, as when the tuned weights are all zero" in text, text
    r = cli(["esd", str(tmp_path / "zero.safetensors"), "--json"])
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and any("every one of the 3 matrices is exactly zero" in w for w in doc["warnings"]), doc["warnings"]
    assert power_law_fit(torch.zeros(5).numpy()).reason == ZERO_REASON
    assert power_law_fit([0.0, 0.0, 2e-6]).reason.startswith("0 eigenvalue(s) above")  # small, not zero: as before
