"""Thirty-third round: the review's refactors, pinned (docs/bad_inputs.md, "thirty-third round")."""

from __future__ import annotations

import pytest
import torch
from cli_util import cli
from safetensors.torch import save_file
from test_hostile32_io import init_adapter

from spectra.errors import CheckpointFormatError
from spectra.io.checkpoint import open_checkpoint
from spectra.param_experts import open_adapter_on


@pytest.fixture
def pissa_setup(tmp_path):
    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g)}, tmp_path / "base" / "model.safetensors")
    return tmp_path, init_adapter(tmp_path / "pissa", "pissa", g), init_adapter(tmp_path / "plain", True, g)


def test_every_measuring_command_refuses_a_base_changing_adapter_with_its_own_hint(pissa_setup):
    """The refusal lives in open_adapter_on now (each command called it beside, and extract raised another class):
    diff, interfere and extract refuse a PiSSA adapter in one line, each naming what to do with the merged model; trace
    leaves that checkpoint out of the run with the reason, as it does any checkpoint it cannot use."""
    root, pissa, plain = pissa_setup
    base = str(root / "base")
    runs = {"diff": (["diff", base, str(pissa)], "diff the merged model against the original base"),
            "interfere": (["interfere", str(plain), str(pissa), "--base", base], "pass the merged model instead"),
            "extract": (["extract", base, str(pissa), "-r", "1"], "extract from the merged model against the original base")}
    for name, (args, hint) in runs.items():
        res = cli([*args, "--out", str(root / f"out_{name}"), "--no-plots"])
        assert res.returncode == 1 and "Traceback" not in res.stderr, (name, res.stderr)
        assert "this adapter was initialised with pissa" in res.stderr and hint in res.stderr, (name, res.stderr)
    res = cli(["trace", base, str(plain), str(pissa), "--out", str(root / "out_trace"), "--no-plots"])
    assert res.returncode == 0 and f"{pissa}: cannot be used (this adapter was initialised with pissa" in res.stderr, res.stderr


def test_open_adapter_on_refuses_before_reading_the_factors(pissa_setup):
    root, pissa, plain = pissa_setup
    base = open_checkpoint(str(root / "base"))
    with pytest.raises(CheckpointFormatError, match="merge it .merge_and_unload. and trace merged"):
        open_adapter_on(pissa, base, merged="trace merged checkpoints instead")
    assert open_adapter_on(plain, base).config.base_changing_init is None
