"""Twenty-eighth probe round: checkpoint files that lie or change (docs/bad_inputs.md, "twenty-eighth round")."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import CheckpointFormatError
from spectra.io.checkpoint import open_checkpoint
from tests.cli_util import cli

W = "model.layers.0.mlp.up_proj.weight"


def test_a_bin_whose_pickle_is_compressed_is_refused_before_torch_loads_it(tmp_path):
    # a 2 MB .bin whose deflated data.pkl held a 2 GB string took 8 GB in torch.load before it was refused
    buf = io.BytesIO()
    torch.save({W: torch.randn(16, 16), "pad": "A" * 100_000}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(tmp_path / "tuned.bin", "w") as out:
        for info in src.infolist():
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.compress_type = zipfile.ZIP_DEFLATED if info.filename.endswith("data.pkl") else zipfile.ZIP_STORED
            out.writestr(zi, src.read(info))
    torch.save({W: torch.randn(16, 16)}, tmp_path / "base.bin")
    proc = cli(["diff", str(tmp_path / "base.bin"), str(tmp_path / "tuned.bin"), "--out", str(tmp_path / "d")])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data.pkl is compressed: torch.save stores its pickle" in proc.stderr


def test_a_file_rewritten_in_place_with_its_mtime_restored_is_seen(tmp_path):
    # cp -p / rsync --inplace -t: same inode, size and mtime, other bytes: the next read returned them (7.0 for 1.0)
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.ones(4, 4)}, str(path))
    save_file({"a": torch.full((4, 4), 7.0), "b": torch.full((4, 4), 7.0)}, str(tmp_path / "other.safetensors"))
    ckpt = open_checkpoint(path)
    assert float(ckpt.load("a")[0, 0]) == 1.0
    st = os.stat(path)
    with open(tmp_path / "other.safetensors", "rb") as s, open(path, "r+b") as d:
        d.write(s.read())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CheckpointFormatError, match="file changed since it was opened"):
        ckpt.load("b")


def test_a_bin_rewritten_while_its_mapped_tensor_is_copied_is_seen(tmp_path, monkeypatch):
    # the stamp was checked before the copy out of the mapped file, not after: a rewrite during it gave mixed bytes
    path = tmp_path / "t.bin"
    torch.save({W: torch.ones(64, 64)}, path)
    ckpt = open_checkpoint(path)
    states = ckpt._states  # noqa: SLF001 - the cache whose mapped tensors are copied
    real_get = type(states).get

    def get_then_rewrite(self, *args, **kwargs):
        loaded = real_get(self, *args, **kwargs)
        with open(path, "r+b") as f:  # in place, same size: the mapped pages change under the copy
            f.seek(-8, os.SEEK_END)
            f.write(f.read(0) or b"\0" * 8)
        return loaded

    monkeypatch.setattr(type(states), "get", get_then_rewrite)
    with pytest.raises(CheckpointFormatError, match="file changed since it was opened"):
        ckpt.load(W)


def test_a_bin_whose_zip_directory_is_corrupt_is_one_line(tmp_path):
    # a directory entry flagged UTF-8 holding other bytes: zipfile raises UnicodeDecodeError, which the pickle check let out
    buf = io.BytesIO()
    torch.save({W: torch.randn(4, 4)}, buf)
    raw = bytearray(buf.getvalue())
    at = raw.index(b"PK\x01\x02")  # the first central directory entry: its name made invalid UTF-8, flagged as UTF-8
    raw[at + 8:at + 10] = (int.from_bytes(raw[at + 8:at + 10], "little") | 0x800).to_bytes(2, "little")
    name_len = int.from_bytes(raw[at + 28:at + 30], "little")
    raw[at + 46:at + 46 + name_len] = b"\xff" * name_len
    (tmp_path / "t.bin").write_bytes(bytes(raw))
    torch.save({W: torch.randn(4, 4)}, tmp_path / "b.bin")
    proc = cli(["diff", str(tmp_path / "b.bin"), str(tmp_path / "t.bin"), "--out", str(tmp_path / "d")])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: ")


def test_a_chmod_between_open_and_read_is_named_as_such(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4, 4)}, str(path))
    ckpt = open_checkpoint(path)
    os.chmod(path, 0o600)
    with pytest.raises(CheckpointFormatError, match="its change time moved: a chmod, a new hard link"):
        ckpt.load("a")
