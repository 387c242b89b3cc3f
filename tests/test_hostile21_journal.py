"""Twenty-first round: a weight file edited in place with its modification time put back (docs/bad_inputs.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = str(Path(__file__).resolve().parents[1])


def _spectra(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)


def test_diff_resume_refuses_a_weight_file_edited_in_place_between_the_sampled_chunks(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(8)]
    W = {n: torch.randn(256, 128, generator=g) for n in names}  # 128 KiB a matrix: a 1 MiB file, 64 KiB of it sampled
    save_file(W, str(tmp_path / "base.safetensors"))
    tuned = tmp_path / "tuned.safetensors"
    save_file({n: w + 0.05 * torch.randn(w.shape, generator=g) for n, w in W.items()}, str(tuned))
    out = tmp_path / "d"
    r = _spectra("diff", str(tmp_path / "base.safetensors"), str(tuned), "--out", str(out), "--no-plots")
    assert r.returncode == 0, r.stderr
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:5]))  # stopped after a few matrices
    doc = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(dict(doc, complete=False)))
    # bytes of a journaled matrix that none of the 16 sampled 4 KiB chunks covers, scaled in place
    size = tuned.stat().st_size
    sampled = [(max(0, size - 4096) * i // 15, max(0, size - 4096) * i // 15 + 4096) for i in range(16)]
    done = {json.loads(x)["module"]["name"] for x in lines[:5] if x.startswith('{"module"')}
    header = 8 + int.from_bytes(tuned.read_bytes()[:8], "little")
    meta = json.loads(tuned.read_bytes()[8:header])
    name = next(n for n in names if n in done)
    start, end = (header + o for o in meta[name]["data_offsets"])
    lo = next(a for a in range(start, end - 4096, 512) if all(a + 4096 <= s or a >= e for s, e in sampled))
    st = tuned.stat()
    with open(tuned, "r+b") as fh:
        fh.seek(lo)
        block = torch.frombuffer(bytearray(fh.read(4096)), dtype=torch.float32) * 3.0
        fh.seek(lo)
        fh.write(block.numpy().tobytes())
    os.utime(tuned, ns=(st.st_atime_ns, st.st_mtime_ns))  # the modification time put back
    assert tuned.stat().st_size == st.st_size and tuned.stat().st_mtime_ns == st.st_mtime_ns
    time.sleep(0.01)
    r = _spectra("diff", str(tmp_path / "base.safetensors"), str(tuned), "--out", str(out), "--no-plots", "--resume")
    assert r.returncode != 0, "a resume mixed results of two different weight files"
    assert "resume" in r.stderr.lower() and len(r.stderr.strip().splitlines()) == 1, r.stderr
