"""Thirty-fourth round: interfere's memory (docs/bad_inputs.md, "thirty-fourth round")."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import ConfigError
from spectra.interfere import interfere

EMB, Q = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"


def test_interfere_refuses_a_dense_module_beyond_the_free_memory(tmp_path, monkeypatch):
    """interfere held about 37 bytes per entry of a module with full fine-tunes (a float64 sum, the updates in float64)
    with no guard but the kernel's; the largest such module is checked against the free memory first, as compare's
    is (here a 100 × 48 embedding against 100 kB free: the machine's own memory cannot be made small in a test)."""
    g = torch.Generator().manual_seed(0)
    base = {EMB: torch.randn(100, 48, generator=g), Q: torch.randn(48, 48, generator=g)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    for task in ("a", "b"):
        (tmp_path / task).mkdir()
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / task / "model.safetensors")
    tasks = [str(tmp_path / "a"), str(tmp_path / "b")]
    monkeypatch.setattr("spectra.plan.free_memory", lambda device: 100_000)
    with pytest.raises(ConfigError, match=r"model.embed_tokens.weight \(100, 48\) needs at least [0-9.e-]+ GiB for interfere") as err:
        interfere(str(tmp_path / "base"), tasks, plots=False)
    assert "--exclude 'embed_tokens'" in str(err.value.hint)
    monkeypatch.setattr("spectra.plan.free_memory", lambda device: None)  # unknown: not refused
    assert len(interfere(str(tmp_path / "base"), tasks, plots=False).modules) == 2
