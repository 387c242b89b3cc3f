"""Twenty-seventh round, terminal output (docs/bad_inputs.md, "twenty-seventh round"): a line break in a tensor name
split the tables of esd, extract, trace and interfere into a row and a stray line (diff and compare kept it on one),
and a trace counted a matrix skipped at every checkpoint as measured ("0 matrices skipped")."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import save_file

from tests.cli_util import cli

_ODD = "model.layers.0.mlp.a,b\"c\nd_proj.weight"  # a real line feed inside the name
_LONG = "model.layers.1.mlp." + "L" * 300 + ".weight"


def _pair(root):
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(24, 16, generator=g) for n in (_ODD, _LONG, "model.layers.0.self_attn.q_proj.weight")}
    save_file(base, str(root / "base.safetensors"))
    save_file({k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in base.items()}, str(root / "tuned.safetensors"))
    return str(root / "base.safetensors"), str(root / "tuned.safetensors")


def _one_line_rows(out: str) -> None:
    lines = out.splitlines()
    assert not any(line.strip(" │|") in ("d_proj", "d_proj.weight") for line in lines), out
    assert any("a,b\"c\\nd" in line for line in lines), out  # the line feed written as \n, on the row
    assert not any("L" * 60 in line for line in lines), out  # a 300-character label is shortened, not wrapped


def test_esd_and_extract_tables_keep_each_name_on_its_row(tmp_path):
    base, tuned = _pair(tmp_path)
    r = cli(["esd", tuned, "--out", str(tmp_path / "e"), "--no-plots"])
    assert r.returncode == 0, r.stderr
    _one_line_rows(r.stdout)
    r = cli(["extract", base, tuned, "--rank", "2", "--out", str(tmp_path / "x"), "--no-plots"])
    assert r.returncode == 0, r.stderr
    _one_line_rows(r.stdout)
    rows = json.loads((tmp_path / "x" / "extract.json").read_text())["modules"]
    assert _ODD in {m["name"] for m in rows}  # the file keeps the name as it is


def test_a_matrix_skipped_at_every_checkpoint_is_said(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for step in (10, 20):
        tuned = {k: v + 0.01 * step * torch.randn(*v.shape, generator=g) for k, v in base.items()}
        tuned["model.layers.0.mlp.down_proj.weight"][0, 0] = math.inf
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file(tuned, str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    r = cli(["trace", str(tmp_path / "base.safetensors"), str(tmp_path / "run"), "--out", str(tmp_path / "t"), "--no-plots"])
    assert r.returncode == 0, r.stderr
    assert "1 matrix is measured at no checkpoint (e.g. model.layers.0.mlp.down_proj.weight" in r.stderr
    assert "(1 of them measured at no checkpoint)" in r.stderr
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert any("measured at no checkpoint" in w for w in doc["warnings"])


def test_a_turn_from_an_earlier_step_says_why_the_step_between_has_no_subspace(tmp_path):
    """A matrix whose update is exactly zero at the middle checkpoint: the next point's turn_prev is from the first, and
    its note pointed to "see its point", whose turn_note is null (the zero ΔW said nothing in words)."""
    g = torch.Generator().manual_seed(2)
    name = "model.layers.0.mlp.up_proj.weight"
    base = {name: torch.randn(24, 16, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for step, scale in ((10, 0.1), (20, 0.0), (30, 0.2)):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file({name: base[name] + scale * torch.randn(24, 16, generator=g)}, str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    r = cli(["trace", str(tmp_path / "base.safetensors"), str(tmp_path / "run"), "--out", str(tmp_path / "t"), "--no-plots"])
    assert r.returncode == 0, r.stderr
    [m] = json.loads((tmp_path / "t" / "trace.json").read_text())["matrices"]
    assert m["points"][1]["fro_norm"] == 0
    assert "step 20 has none: ΔW is zero there, or unresolved, or the point was skipped" in m["points"][2]["turn_note"]
