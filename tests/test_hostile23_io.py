"""Twenty-third round, resources and untrusted files (docs/bad_inputs.md, "twenty-third round"): a ``.bin`` whose
storage record is short or compressed was memory-mapped as it stood (the next record's bytes, or deflated bytes, read
as weights: ‖ΔW‖ 4.6× too large, exit 0); ``diff --plan`` read a 2 GB pair to measure the I/O rate."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import CheckpointFormatError


def _bins(root: Path, dtype: torch.dtype = torch.float32, ordered: bool = False) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A pair of ``torch.save`` files (a dict, or an ``OrderedDict`` as ``model.state_dict()`` is) of two 32 × 32."""
    from collections import OrderedDict

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(32, 32, generator=g).to(dtype) for i in range(2)}
    tuned = {k: (v.float() + 0.5 * torch.randn(32, 32, generator=g)).to(dtype) for k, v in base.items()}
    torch.save(OrderedDict(base) if ordered else base, root / "base.bin")
    torch.save(OrderedDict(tuned) if ordered else tuned, root / "tuned.bin")
    return root / "base.bin", root / "tuned.bin", tuned


def _rewrite(src: Path, dst: Path, *, cut: int = 0, compress: int = zipfile.ZIP_STORED) -> Path:
    """``src`` re-zipped: the first storage record ``cut`` bytes short, every storage record with ``compress``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as z:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data/0") and cut:
                data = data[:-cut]
            z.writestr(info.filename, data, compress_type=compress if "/data/" in info.filename else zipfile.ZIP_STORED)
    return dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("ordered", [False, True])
def test_short_and_compressed_storage_records_are_refused(tmp_path, dtype, ordered):
    """(An OrderedDict's pickle and float8's untyped storages escaped the first version of the check: the review.)"""
    import spectra

    base, tuned, weights = _bins(tmp_path, dtype, ordered)
    size = torch.finfo(dtype).bits // 8
    short = _rewrite(tuned, tmp_path / "short.bin", cut=4)
    deflated = _rewrite(tuned, tmp_path / "deflated.bin", compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointFormatError, match=rf"storage record tuned/data/0 holds {1024 * size - 4} bytes where its "
                                                    rf"tensor needs {1024 * size} \(\d+ × \d+\)") as e:
        spectra.diff(str(base), str(short))
    assert e.value.path and e.value.path.endswith("short.bin")
    with pytest.raises(CheckpointFormatError, match="storage record tuned/data/0 is compressed"):
        spectra.diff(str(base), str(deflated))
    # torch's own full load agrees on both files: the first is corrupt, the second holds the right tensors
    with pytest.raises(RuntimeError, match="size"):
        torch.load(short, weights_only=True)
    assert all(torch.equal(torch.load(deflated, weights_only=True)[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in weights.items())
    # an intact re-zipped file (stored records) is read, exactly
    same = _rewrite(tuned, tmp_path / "same.bin")
    res = spectra.diff(str(base), str(same))
    b = torch.load(base, weights_only=True)
    for m in res.modules:
        want = np.linalg.norm(weights[m.name].double().numpy() - b[m.name].double().numpy())  # float8 read exactly too
        assert m.fro_norm == pytest.approx(want, rel=1e-6)


def test_a_pickle_the_scan_cannot_follow_is_checked_by_torchs_full_load(tmp_path, monkeypatch):
    import spectra
    import spectra.io.torchfile as tf

    def fail(self):
        raise pickle.UnpicklingError("not followed")

    base, tuned, _ = _bins(tmp_path)
    monkeypatch.setattr(tf._StorageScan, "load", fail)
    with pytest.raises(CheckpointFormatError, match="the file is corrupt"):
        spectra.diff(str(base), str(_rewrite(tuned, tmp_path / "short.bin", cut=4)))
    assert len(spectra.diff(str(base), str(tuned)).modules) == 2


def test_plan_does_not_read_a_pair_larger_than_its_probe_bound(tmp_path, monkeypatch):
    import spectra.pipeline as pipeline

    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64)}, str(tmp_path / "b.safetensors"))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(64, 64)}, str(tmp_path / "t.safetensors"))
    reads: list[str] = []
    real = pipeline.prepare
    monkeypatch.setattr(pipeline, "prepare", lambda task, *a, **k: reads.append(task.units[0].name) or real(task, *a, **k))
    pipeline.plan_run(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    assert reads  # a small pair is read to measure the rate
    reads.clear()
    monkeypatch.setattr(pipeline, "PROBE_MAX_BYTES", 64 * 64 * 4 * 2 - 1)  # the pair is one byte over the bound
    plan = pipeline.plan_run(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    assert not reads and plan is not None
