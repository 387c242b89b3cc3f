"""Checkpoint loading: formats, dtypes, sharding, the hub cache, and bad files."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra.errors import CheckpointFormatError, CheckpointNotFoundError, UnsafeCheckpointError
from spectra.io.checkpoint import open_checkpoint
from spectra.io.safetensors_file import read_header


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 40, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(16),
        "lm_head.weight": torch.randn(50, 16, generator=g),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_safetensors_reader_matches_library(tmp_path, dtype):
    sd = {k: v.to(dtype) for k, v in _state().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert set(ckpt.tensors) == set(sd)
    for name, t in sd.items():
        got = ckpt.load(name)
        assert got.dtype == dtype and got.shape == t.shape
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8))  # bit-identical, NaN-safe


def _write_sharded(folder: Path, sd: dict[str, torch.Tensor], n_shards: int = 2, *, fmt: str = "safetensors") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        part = names[i::n_shards]
        ext = "safetensors" if fmt == "safetensors" else "bin"
        prefix = "model" if fmt == "safetensors" else "pytorch_model"
        shard = f"{prefix}-{i + 1:05d}-of-{n_shards:05d}.{ext}"
        if fmt == "safetensors":
            save_file({k: sd[k] for k in part}, str(folder / shard))
        else:
            torch.save({k: sd[k] for k in part}, folder / shard)
        weight_map.update({k: shard for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_single_and_bin_give_identical_results(tmp_path):
    base, tuned = _state(0), {k: v + 0.01 * torch.randn_like(v) for k, v in _state(0).items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    _write_sharded(tmp_path / "base_sharded", base)
    _write_sharded(tmp_path / "tuned_sharded", tuned, n_shards=3)
    torch.save(base, tmp_path / "base.bin")
    _write_sharded(tmp_path / "tuned_bin", tuned, fmt="bin")
    runs = {
        "single": spectra.diff(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"),
        "sharded": spectra.diff(tmp_path / "base_sharded", tmp_path / "tuned_sharded"),
        "bin": spectra.diff(tmp_path / "base.bin", tmp_path / "tuned_bin"),
        "mixed": spectra.diff(tmp_path / "base_sharded", tmp_path / "tuned.safetensors"),
    }
    ref = runs["single"]
    assert len(ref.modules) == 4
    assert [s["name"] for s in ref.skipped] == ["model.layers.0.input_layernorm.weight"]
    for label, res in runs.items():
        assert [m.name for m in res.modules] == [m.name for m in ref.modules], label
        for a, b in zip(res.modules, ref.modules, strict=True):
            assert a.singular_values == b.singular_values, label
            assert a.energy_rank == b.energy_rank and a.rel_norm == b.rel_norm, label


def test_index_is_used_not_glob(tmp_path):
    """A stray shard not in the index is ignored; the index decides."""
    sd = _state()
    _write_sharded(tmp_path / "m", sd)
    save_file({"rogue.weight": torch.zeros(3, 3)}, str(tmp_path / "m" / "model-00009-of-00009.safetensors"))
    assert set(open_checkpoint(tmp_path / "m").tensors) == set(sd)


def test_hub_cache_resolution_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    entry = cache / "models--acme--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = entry / "snapshots" / commit
    blobs = entry / "blobs"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file(_state(), str(blobs / "abc123"))
    os.symlink(os.path.relpath(blobs / "abc123", snap), snap / "model.safetensors")  # as the hub cache does
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ckpt = open_checkpoint("acme/tiny")
    assert ckpt.root == snap / "model.safetensors"
    assert "lm_head.weight" in ckpt.tensors
    assert open_checkpoint(f"acme/tiny@{commit}").tensors.keys() == ckpt.tensors.keys()
    with pytest.raises(CheckpointNotFoundError, match="acme/other is not in the local Hugging Face cache"):
        open_checkpoint("acme/other")
    with pytest.raises(CheckpointNotFoundError, match="revision 'v2'"):
        open_checkpoint("acme/tiny@v2")


def test_partial_hub_snapshot_is_an_error(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--big" / "snapshots" / "c0ffee"
    _write_sharded(snap, _state(), n_shards=2)
    (snap / "model-00002-of-00002.safetensors").unlink()
    (cache / "models--acme--big" / "refs").mkdir()
    (cache / "models--acme--big" / "refs" / "main").write_text("c0ffee")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(CheckpointNotFoundError, match=r"1 of 2 shards .* missing: model-00002-of-00002.safetensors"):
        open_checkpoint("acme/big")


# ---- bad files ----------------------------------------------------------------------------------
def test_missing_file_and_missing_shard(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope.safetensors")
    _write_sharded(tmp_path / "m", _state(), n_shards=3)
    (tmp_path / "m" / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError) as exc:
        open_checkpoint(tmp_path / "m")
    assert "model-00003-of-00003.safetensors" in str(exc.value) and str(tmp_path / "m") in str(exc.value)


def test_index_pointing_outside_folder_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"x.weight": torch.zeros(2, 2)}, str(tmp_path / "outside.safetensors"))
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x.weight": "../outside.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match="index points outside its folder"):
        open_checkpoint(tmp_path / "m")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        open_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointFormatError, match="too short for a safetensors header"):
        open_checkpoint(path)


def test_file_truncated_after_opening_is_reported_not_sigbus(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_state(), str(path))
    ckpt = open_checkpoint(path)
    os.truncate(path, path.stat().st_size - 64)
    with pytest.raises(CheckpointFormatError, match="file ended after"):
        for name in ckpt.tensors:
            ckpt.load(name)


@pytest.mark.parametrize(
    "header,match",
    [
        (b"not json at all", "safetensors header is not valid JSON"),
        (b"\xff\xfe\xfd", "safetensors header is not valid UTF-8"),
        (json.dumps({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}).encode(), "unknown dtype 'Q7'"),
        (json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(), "needs 8"),
        (json.dumps({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode(), "invalid shape"),
        (json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode(), "truncated"),
        (json.dumps([1, 2]).encode(), "not a JSON object"),
    ],
)
def test_corrupt_headers(tmp_path, header, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointFormatError, match=match) as exc:
        read_header(path)
    assert str(path) in str(exc.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused_not_run(tmp_path, monkeypatch):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2, 2), "payload": _Evil()}, path)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"w": _Evil()}))
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    with pytest.raises(UnsafeCheckpointError, match=r"refused: loading this file would need pickle code execution \(it calls (posix|os)\.system"):
        open_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match=r"refused: loading this file would need pickle code execution"):
        open_checkpoint(legacy)
    assert calls == []


def test_corrupt_bin_and_non_state_dict(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointFormatError, match="cannot read this PyTorch file"):
        open_checkpoint(bad)
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], lst)
    with pytest.raises(CheckpointFormatError, match="not a state dict"):
        open_checkpoint(lst)


def test_folder_without_checkpoint_and_adapter_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="no model.safetensors"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="PEFT adapter"):
        open_checkpoint(tmp_path / "adapter")
    (tmp_path / "two").mkdir()
    for n in ("a", "b"):
        save_file({"w": torch.zeros(1, 1)}, str(tmp_path / "two" / f"{n}.safetensors"))
    with pytest.raises(CheckpointFormatError, match="2 .safetensors files but no model.safetensors.index.json"):
        open_checkpoint(tmp_path / "two")


def test_bounded_reads_do_not_keep_file_mapped(tmp_path):
    """Each load returns a tensor that owns its memory (no mmap view into the file)."""
    save_file(_state(), str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    t = ckpt.load("lm_head.weight")
    os.unlink(tmp_path / "m.safetensors")
    assert np.isfinite(t.numpy()).all()


def test_lfs_pointer_and_unreadable_files(tmp_path, monkeypatch):
    lfs = tmp_path / "pytorch_model.bin"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointNotFoundError, match="Git LFS pointer"):
        open_checkpoint(lfs)
    locked = tmp_path / "m.safetensors"
    save_file(_state(), str(locked))
    real_open = os.open

    def deny(file, *args, **kwargs):  # as a file without read permission behaves for a non-root user
        if str(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)  # spectra opens every file with os.open (O_NONBLOCK, then fstat)
    with pytest.raises(CheckpointNotFoundError, match="cannot read the file \\(Permission denied\\)"):
        open_checkpoint(locked)
    monkeypatch.undo()
    with pytest.raises(CheckpointNotFoundError, match="not a valid revision"):
        open_checkpoint("acme/tiny@../../etc")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_rows_read_a_block_at_a_time_equal_the_whole_tensor(tmp_path, dtype):
    """Checkpoint.load_rows (one positioned read per block of rows) against load(): every block, the
    empty one and the ends; refused for a range outside the tensor, a .bin tensor or a boolean one;
    a file truncated after it was opened is one CheckpointFormatError naming the tensor."""
    g = torch.Generator().manual_seed(0)
    t = {"emb": torch.randn(37, 5, generator=g).to(dtype), "cube": torch.randn(4, 3, 2, generator=g).to(dtype),
         "flag": torch.ones(3, dtype=torch.bool)}
    save_file(t, str(tmp_path / "m.safetensors"))
    ck = open_checkpoint(tmp_path / "m.safetensors")
    whole = ck.load("emb")
    for step in (1, 5, 36, 37):
        parts = [ck.load_rows("emb", r, min(37, r + step)) for r in range(0, 37, step)]
        assert torch.equal(torch.cat(parts), whole)
    assert ck.load_rows("emb", 7, 7).shape == (0, 5)
    assert torch.equal(ck.load_rows("cube", 1, 3), ck.load("cube")[1:3])
    assert not ck.reads_rows("flag")
    with pytest.raises(ValueError):
        ck.load_rows("emb", 30, 38)
    torch.save(t, tmp_path / "m.bin")
    assert not open_checkpoint(tmp_path / "m.bin").reads_rows("emb")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointFormatError, match="emb|cube|flag"):
        for r in range(37):
            ck.load_rows("emb", r, r + 1)
            ck.load_rows("cube", 0, 4)
