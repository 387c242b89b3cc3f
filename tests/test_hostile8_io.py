"""Hostile inputs, eighth round: checkpoint I/O (files changed under a run, .bin loading cost, crafted
strides, pickles calling torch functions, ambiguous folders, hub cache layouts, shard spellings,
training-checkpoint wrappers) and row sampling past 2^24 rows."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
import spectra.io.checkpoint as checkpoint_mod
from spectra.errors import CheckpointFormatError, UnsafeCheckpointError
from spectra.io.adapter import BASE_CHANGING_INITS, open_adapter
from spectra.io.checkpoint import open_checkpoint
from spectra.numerics import even_rows

Q = "model.layers.0.self_attn.q_proj.weight"


def _state(seed: int = 0, n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(8, 6, generator=g) for i in range(n)}


def _count_torch_load(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = torch.load

    def counting(f, *args, **kwargs):
        calls.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return calls


# I1: a file replaced or rewritten after its header was read ------------------------------------------------------


def test_safetensors_replaced_with_larger_header_is_refused_not_misread(tmp_path):
    path = tmp_path / "model.safetensors"
    old = _state(0)
    save_file(old, str(path))
    ckpt = open_checkpoint(tmp_path)
    # "the next checkpoint": same names and shapes, a header ~1 KB longer, so every old offset is wrong
    save_file({k: v * 2 for k, v in old.items()}, str(path), metadata={"format": "pt", "pad": "x" * 1000})
    with pytest.raises(CheckpointFormatError, match="file changed since it was opened") as exc:
        ckpt.load(Q)
    assert str(path) in str(exc.value) and Q in str(exc.value)
    assert "rerun when it is no longer being written" in str(exc.value)


def test_safetensors_rewritten_in_place_same_layout_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_state(0), str(path))
    ckpt = open_checkpoint(path)
    np.testing.assert_array_equal(ckpt.load(Q).numpy(), _state(0)[Q].numpy())
    st = path.stat()
    with open(path, "r+b") as f:  # same inode, same size, same header: only the weights differ
        data = bytearray(f.read())
        data[-4:] = b"\x00\x00\x80\x3f"
        f.seek(0)
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse-clock filesystems too
    with pytest.raises(CheckpointFormatError, match="file changed since it was opened"):
        ckpt.load(Q)
    with pytest.raises(CheckpointFormatError, match="file changed since it was opened"):
        ckpt.load_rows(Q, 0, 2)


def test_bin_replaced_after_open_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(_state(0), path)
    ckpt = open_checkpoint(tmp_path)
    torch.save({k: v * 2 for k, v in _state(0).items()}, tmp_path / "next.bin")
    os.replace(tmp_path / "next.bin", path)
    with pytest.raises(CheckpointFormatError, match="file changed since it was opened") as exc:
        ckpt.load(Q)
    assert "pytorch_model.bin" in str(exc.value)


# I2: a .bin read tensor by tensor is loaded once ------------------------------------------------------------------


@pytest.mark.parametrize("zipped", [True, False])
def test_bin_is_loaded_once_not_once_per_tensor(tmp_path, monkeypatch, zipped):
    state = _state(1, n=40)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    calls = _count_torch_load(monkeypatch)
    ckpt = open_checkpoint(tmp_path)
    for name, ref in state.items():
        got = ckpt.load(name)
        np.testing.assert_array_equal(got.numpy(), ref.numpy())
        got.zero_()  # the caller's copy: the next read is unaffected
    np.testing.assert_array_equal(ckpt.load(Q).numpy(), state[Q].numpy())
    # a mapped (zip) file is kept from its listing on; a legacy one, held whole in memory, is dropped once
    # listed (opening many checkpoints holds none of them) and loaded once more for all its reads
    assert len(calls) == (1 if zipped else 2)


def test_opening_legacy_bin_checkpoints_holds_none_in_memory(tmp_path, monkeypatch):
    torch.save(_state(2, n=4), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    held = []
    real = checkpoint_mod.StateDictCache.get

    def spy(self, path, *a, **k):
        out = real(self, path, *a, **k)
        held.append(self)
        return out

    monkeypatch.setattr(checkpoint_mod.StateDictCache, "get", spy)
    open_checkpoint(tmp_path)
    assert held and all(not cache._entries for cache in held)


def test_sharded_bin_loads_each_shard_once(tmp_path, monkeypatch):
    state = _state(2, n=6)
    names = list(state)
    wm = {}
    for i, part in enumerate((names[:3], names[3:])):
        fn = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / fn)
        wm.update({k: fn for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    calls = _count_torch_load(monkeypatch)
    ckpt = open_checkpoint(tmp_path)
    for name in reversed(names):  # the last shard listed is the one still loaded: read it first
        np.testing.assert_array_equal(ckpt.load(name).numpy(), state[name].numpy())
    assert sorted(Path(c).name for c in calls) == ["pytorch_model-00001-of-00002.bin"] * 2 + ["pytorch_model-00002-of-00002.bin"]


# I3: strides that claim more elements than the storage holds -------------------------------------------------------


def test_stride0_expanded_tensor_of_huge_shape_is_refused_at_open(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({Q: torch.ones(1).expand(2**31, 2**31)}, path)  # 4 stored bytes claiming 2^62 elements
    assert path.stat().st_size < 4096
    with pytest.raises(CheckpointFormatError, match="repeated elements") as exc:
        open_checkpoint(path)
    assert Q in str(exc.value) and "pytorch_model.bin" in str(exc.value)


def test_overlapping_strides_are_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({Q: torch.zeros(65600).as_strided((65536, 64), (1, 1))}, path)  # 262 KB claiming 16 MiB
    with pytest.raises(CheckpointFormatError, match="repeated elements") as exc:
        open_checkpoint(path)
    assert Q in str(exc.value)


def test_small_expanded_buffers_and_interleaved_strides_still_load(tmp_path):
    """An expanded buffer (torch.save keeps the view) beside the weights, and a view whose strides
    interleave without overlapping, are data: refusing them refused the whole file."""
    g = torch.Generator().manual_seed(4)
    state = {Q: torch.randn(8, 8, generator=g), "model.position_ids": torch.arange(64).expand(1, 64),
             "buf": torch.zeros(1).expand(16), "odd.weight": torch.randn(20, generator=g).as_strided((3, 2), (2, 3))}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    for name, ref in state.items():
        np.testing.assert_array_equal(ckpt.load(name).numpy(), ref.numpy())


def test_legit_strided_views_still_load(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 6, generator=g)
    big = torch.zeros(16, 6)
    big[::2] = w
    flat = torch.randn(100, generator=g)
    state = {"a.weight": w.t().contiguous().t(), "b.weight": big[::2], "c.weight": flat[10:58].view(8, 6)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    for name, ref in state.items():
        np.testing.assert_array_equal(ckpt.load(name).numpy(), ref.numpy())


# I4: row sampling past 2^24 rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(2**24 + 7, 16), (2**25, 16), (2**25 + 3, 7), (2**31, 1000), (6, 3), (100, 16), (1, 5), (0, 3)])
def test_sample_rows_exact_and_in_range(n, k):
    got = even_rows(n, k)
    m = min(n, k)
    # i·(n−1)/(m−1) rounded half to even, exactly (Python's round of a Fraction)
    ref = [round(Fraction(i * (n - 1), m - 1)) for i in range(m)] if m > 1 else [0] * m
    assert got.dtype == torch.long and got.tolist() == ref
    if m:
        assert int(got.min()) == 0 and int(got.max()) == n - 1


# I5: pickles that call torch functions, TorchScript archives ------------------------------------------------------


class _HubCall:
    def __reduce__(self):
        return (torch.hub.load, ("/nonexistent", "x"))


class _LoadCall:
    def __reduce__(self):
        return (torch.load, ("/nonexistent/inner.pt",))


@pytest.mark.parametrize("zipped", [True, False])
@pytest.mark.parametrize("obj,callee", [(_HubCall(), "torch.hub.load"), (_LoadCall(), "torch.serialization.load")])
def test_pickle_calling_torch_function_is_unsafe_not_corrupt(tmp_path, obj, callee, zipped):
    path = tmp_path / "evil.bin"
    torch.save({Q: obj}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeCheckpointError, match="refused") as exc:
        open_checkpoint(path)
    assert callee in str(exc.value) and "corrupt" not in str(exc.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_named(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 4)), str(path))
    with pytest.raises(CheckpointFormatError, match="is a TorchScript archive") as exc:
        open_checkpoint(path)
    assert "save model.state_dict() with torch.save or safetensors" in str(exc.value)
    assert "corrupt" not in str(exc.value)


@pytest.mark.parametrize("zipped", [True, False])
def test_plain_state_dict_globals_are_not_called_unsafe(tmp_path, zipped):
    g = torch.Generator().manual_seed(4)
    sd = OrderedDict([("a", torch.randn(3, 4, generator=g)), ("b", torch.randn(3, 4, generator=g).half()),
                      ("c", torch.randn(3, 4, generator=g).bfloat16()), ("d", torch.randint(-5, 5, (3, 4), dtype=torch.int8)),
                      ("e", torch.nn.Parameter(torch.randn(2, 2, generator=g))), ("f", torch.zeros(3, dtype=torch.bool))])
    path = tmp_path / "m.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=zipped)
    ckpt = open_checkpoint(path)
    for name, ref in sd.items():
        np.testing.assert_array_equal(ckpt.load(name).float().numpy(), ref.detach().float().numpy())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the same globals, the file cut short: corrupt, not unsafe
    with pytest.raises(CheckpointFormatError, match="cannot read this PyTorch file|corrupt|truncated") as exc:
        open_checkpoint(path)
    assert not isinstance(exc.value, UnsafeCheckpointError)


# I6: a folder holding a full model and an adapter ------------------------------------------------------------------


def test_folder_with_model_and_adapter_says_which_was_read(tmp_path):
    g = torch.Generator().manual_seed(5)
    save_file({Q: torch.randn(8, 8, generator=g)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "init_lora_weights": False}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2, generator=g)},
              str(tmp_path / "adapter_model.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    assert any("PEFT adapter" in n and "read the full model model.safetensors" in n for n in ckpt.notes), ckpt.notes
    adapter = open_adapter(tmp_path)
    assert list(adapter.modules) == ["model.layers.0.self_attn.q_proj"]
    assert any("read the adapter (adapter_model.safetensors)" in n and str(tmp_path / "model.safetensors") in n
               for n in adapter.notes), adapter.notes
    # and the command that reads the adapter says so, in its warnings and on the terminal
    from click.testing import CliRunner

    from spectra_cli.main import main

    res = CliRunner().invoke(main, ["diff", str(tmp_path), "--json", "--no-plots"])
    assert res.exit_code == 0, res.output
    assert any("read the adapter" in w for w in json.loads(res.stdout)["warnings"])
    assert "read the adapter" in res.stderr


# I7, I8: Hugging Face hub cache layouts ----------------------------------------------------------------------------


def _hub(tmp_path: Path, blobs_elsewhere: bool) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    cache = tmp_path / "hub"
    entry = cache / "models--org--name"
    commit = "a" * 40
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    blobs = tmp_path / "other_disk" if blobs_elsewhere else entry / "blobs"
    blobs.mkdir(parents=True)
    if blobs_elsewhere:
        (entry / "blobs").symlink_to(blobs)
    state = _state(6)
    save_file(state, str(blobs / "deadbeef"))
    (snap / "model.safetensors").symlink_to(Path("..", "..", "blobs", "deadbeef"))
    return cache, snap, state


def test_hub_cache_with_blobs_linked_to_another_disk_is_read(tmp_path, monkeypatch):
    cache, snap, state = _hub(tmp_path, blobs_elsewhere=True)
    ckpt = open_checkpoint(snap)
    np.testing.assert_array_equal(ckpt.load(Q).numpy(), state[Q].numpy())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    np.testing.assert_array_equal(open_checkpoint("org/name").load(Q).numpy(), state[Q].numpy())


def test_hub_cache_entry_or_root_suggests_the_snapshot(tmp_path):
    cache, snap, _ = _hub(tmp_path, blobs_elsewhere=False)
    for folder in (cache / "models--org--name", cache / "models--org--name" / "snapshots"):
        with pytest.raises(CheckpointFormatError, match="hub cache entry") as exc:
            open_checkpoint(folder)
        assert str(snap) in str(exc.value) and "org/name" in str(exc.value)
    with pytest.raises(CheckpointFormatError, match="Hugging Face hub cache") as exc:
        open_checkpoint(cache)
    assert "org/name" in str(exc.value) and "snapshots" in str(exc.value)


# I9: one shard spelled two ways ------------------------------------------------------------------------------------


def test_index_naming_a_shard_as_dot_slash_and_plain_reads_it_once(tmp_path, monkeypatch):
    state = _state(7)
    save_file(state, str(tmp_path / "model-00001-of-00001.safetensors"))
    names = list(state)
    wm = {n: ("./" if i % 2 else "") + "model-00001-of-00001.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    headers: list[str] = []
    real = checkpoint_mod.read_header
    monkeypatch.setattr(checkpoint_mod, "read_header", lambda p: headers.append(str(p)) or real(p))
    ckpt = open_checkpoint(tmp_path)
    assert len(headers) == 1 and ckpt.notes == []
    for name in names:
        np.testing.assert_array_equal(ckpt.load(name).numpy(), state[name].numpy())


# I10: training-checkpoint wrappers, folders named like checkpoint files --------------------------------------------


@pytest.mark.parametrize("key", ["model", "module", "state_dict"])
def test_training_checkpoint_wrapper_is_unwrapped_with_a_note(tmp_path, key):
    state = _state(8)
    torch.save({key: state, "epoch": 3, "optimizer": {"lr": 1e-3}}, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    assert list(ckpt.tensors) == list(state)
    for name, ref in state.items():
        np.testing.assert_array_equal(ckpt.load(name).numpy(), ref.numpy())
    assert any(f"under its {key!r} key" in n for n in ckpt.notes), ckpt.notes


def test_two_wrapped_state_dicts_are_ambiguous(tmp_path):
    torch.save({"model": _state(8), "module": _state(9)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="ambiguous"):
        open_checkpoint(tmp_path)
    # "state_dict" was always read first: beside "model" it still is
    state = _state(9)
    torch.save({"model": _state(8), "state_dict": state}, tmp_path / "pytorch_model.bin")
    np.testing.assert_array_equal(open_checkpoint(tmp_path).load(Q).numpy(), state[Q].numpy())


def test_subfolder_named_like_safetensors_is_not_a_checkpoint_file(tmp_path):
    state = _state(10)
    save_file(state, str(tmp_path / "weights.safetensors"))
    (tmp_path / "x.safetensors").mkdir()
    ckpt = open_checkpoint(tmp_path)
    np.testing.assert_array_equal(ckpt.load(Q).numpy(), state[Q].numpy())


# M5: LoRA-GA changes the base weights at init ----------------------------------------------------------------------


def test_lora_ga_adapter_is_base_changing(tmp_path):
    assert "lora_ga" in BASE_CHANGING_INITS
    g = torch.Generator().manual_seed(11)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "init_lora_weights": "lora_ga"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2, generator=g)},
              str(tmp_path / "adapter_model.safetensors"))
    assert open_adapter(tmp_path).config.base_changing_init == "lora_ga"
    with pytest.raises(CheckpointFormatError, match="initialised with lora_ga"):  # B·A alone is not the update
        spectra.diff(tmp_path, plots=False)
