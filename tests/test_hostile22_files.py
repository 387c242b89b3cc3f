"""Twenty-second round, files that are not what their names say (docs/bad_inputs.md, "twenty-second round"): a FIFO
under a result's name in --out, an index of a million absent shards, an oversized header, torch's printf codes."""

from __future__ import annotations

import json
import os
import struct
import time

import click
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.cli_util import cli

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def _pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
    base = {n: torch.randn(24, 16, generator=g) for n in names}
    tuned = {n: w + 0.1 * torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g) for n, w in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


@pytest.mark.parametrize(("command", "marker"), [("diff", "results.json"), ("esd", "esd.json")])
def test_a_fifo_under_the_result_name_in_out_does_not_hang_the_run(tmp_path, command, marker):
    """remove_earlier_outputs opened OUT/<marker> with a blocking open to read an earlier run's schema: a FIFO there
    blocked diff, esd, compare and interfere forever."""
    b, t, base, tuned = _pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / marker)
    args = ["diff", str(b), str(t)] if command == "diff" else ["esd", str(t)]
    started = time.monotonic()
    proc = cli([*args, "--out", str(out), "--no-plots"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 100
    assert (out / marker).is_file()  # the result replaced the FIFO
    doc = json.loads((out / marker).read_text())
    if command == "diff":  # and its numbers are right: ‖ΔW‖_F from float64 numpy
        for m in doc["modules"]:
            want = np.linalg.norm(tuned[m["name"]].double().numpy() - base[m["name"]].double().numpy())
            assert m["fro_norm"] == pytest.approx(want, rel=1e-6)


def test_a_stop_before_the_first_result_says_nothing_was_kept(tmp_path):
    """A sealed journal opens with its fingerprint line: a compare stopped before its first result said 'results
    finished so far are kept in OUT … --resume' where nothing was."""
    from spectra_cli.main import kept_on_stop, main

    out = tmp_path / "o"
    out.mkdir()
    ctx = click.Context(main)
    ctx.meta["spectra.args"] = ["compare", "a", "b", "--base", "c", "--out", str(out)]
    (out / "compare.jsonl").write_text(json.dumps({"fingerprint": "ab" * 32}) + "\n")
    assert kept_on_stop(main, ctx).startswith(f"stopped before any result was written to {out}")
    with open(out / "compare.jsonl", "a") as f:  # one result journaled: kept, resumable
        f.write(json.dumps({"name": "x", "seal": "0"}) + "\n")
    assert kept_on_stop(main, ctx).startswith(f"results finished so far are kept in {out}")


def test_an_index_of_a_million_absent_shards_is_refused_at_once(tmp_path):
    """Each shard's path was resolved (realpath, relative_to) before any was found missing: 85 s, 837 MB."""
    folder = tmp_path / "b"
    folder.mkdir()
    n = 10**6
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {f"model.layers.{i}.mlp.up_proj.weight": f"s{i}.safetensors" for i in range(n)}}))
    started = time.monotonic()
    proc = cli(["inspect", str(folder)], timeout=200)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert f"{n} of {n} shards listed in model.safetensors.index.json are missing" in line, line
    assert elapsed < 60, elapsed  # about 10 s here under load (the JSON alone is 63 MB)


def test_a_whole_header_over_the_bound_is_not_called_truncated(tmp_path):
    from spectra.errors import CheckpointFormatError
    from spectra.io.safetensors_file import MAX_HEADER_BYTES, read_header

    raw = b"{}" + b" " * (MAX_HEADER_BYTES + 10)
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointFormatError, match=r"header of 100,000,012 bytes is larger than the 100,000,000"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 64) + b"{}")  # a header longer than the file: truncated, as before
    with pytest.raises(CheckpointFormatError, match=r"header declares 64 bytes but the file has 10"):
        read_header(path)


def test_torchs_printf_codes_are_not_passed_on(tmp_path):
    """A storage whose size field claims 2**40 elements: torch says 'expected %ld got %ld4398…'."""
    import zipfile

    from spectra.errors import CheckpointFormatError
    from spectra.io.torchfile import read_state_dict

    path = tmp_path / "w.bin"
    torch.save({"w": torch.ones(4)}, path, _use_new_zipfile_serialization=False)  # the legacy format keeps the size field
    data = bytearray(path.read_bytes())
    assert not zipfile.is_zipfile(path)
    # the legacy format writes each storage's element count (8 bytes, little endian) before its data
    count = struct.pack("<q", 4)
    at = data.rfind(count)
    data[at:at + 8] = struct.pack("<q", 2**40)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError) as exc:
        read_state_dict(path)
    assert "%ld" not in str(exc.value)
