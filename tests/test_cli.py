"""The command line: outputs, exit codes and one-line errors (no tracebacks for expected cases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra_cli.main import main


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(24, 16, generator=g) for i in range(2) for m in ("q_proj", "v_proj")}
    base["model.layers.0.input_layernorm.weight"] = torch.ones(16)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_diff_writes_outputs_and_prints_table(pair, tmp_path):
    res = _run("diff", *pair, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "q_proj" in res.stdout and "rank[0.9]" in res.stdout
    assert "4 matrices" in res.stderr and "1 skipped" in res.stderr
    for f in ("results.json", "results.csv", "results.jsonl", "rank_heatmap.png", "relnorm_heatmap.png", "diff_config.json"):
        assert (tmp_path / "out" / f).is_file(), f


def test_diff_json_to_stdout(pair):
    res = _run("diff", *pair, "--json", "-t", "0.9")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["schema"] == "spectra.diff/1" and doc["thresholds"] == [0.9]
    assert len(doc["modules"]) == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (("diff", "{d}/missing.safetensors", "{d}/tuned.safetensors"), "missing.safetensors: no such file or folder"),
        (("diff", "{d}/base.safetensors", "{d}/tuned.safetensors", "--layers", "x"), "--layers must look like"),
        (("diff", "{d}/base.safetensors", "{d}/base.safetensors"), "ΔW = 0"),
        (("diff", "{d}/base.safetensors", "{d}/garbage.safetensors"), "garbage.safetensors: header declares"),
        (("diff", "{d}/base.safetensors", "{d}/evil.bin"), "refused: loading this file would need pickle code execution"),
        (("inspect", "{d}/nothing"), "nothing: no such file or folder"),
    ],
)
def test_expected_errors_are_one_line_with_nonzero_exit(pair, args, message):
    d = pair[0].parent
    (d / "garbage.safetensors").write_bytes(b"\xff" * 64)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, d / "evil.bin")
    res = CliRunner().invoke(main, [a.format(d=d) for a in args])
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_identical_allowed_with_flag(pair):
    res = _run("diff", pair[0], pair[0], "--allow-identical")
    assert res.exit_code == 0 and "exactly zero" in res.stderr


def test_inspect_lists_mapping(pair):
    res = _run("inspect", pair[0], "--json")
    records = json.loads(res.stdout)
    assert {r["module"] for r in records} == {"q_proj", "v_proj"}
    assert {r["layer"] for r in records} == {0, 1}
    res = _run("inspect", pair[0], "--all")
    assert res.exit_code == 0 and "input_layernorm" in res.stdout


def test_console_script_and_module_entry_points(pair):
    """The installed `spectra` script and `python -m spectra` both run; no top-level `cli` module is installed."""
    exe = Path(sys.executable).parent / "spectra"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert "spectra" in out.stdout
    out = subprocess.run([sys.executable, "-m", "spectra", "diff", "--help"], capture_output=True, text=True, check=True)
    assert "BASE" in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('cli'))"],
                           capture_output=True, text=True, cwd="/", check=True)
    assert probe.stdout.strip() == "None"


def test_debug_env_shows_traceback(pair, monkeypatch):
    monkeypatch.setenv("SPECTRA_DEBUG", "1")
    res = CliRunner().invoke(main, ["diff", str(pair[0].parent / "missing.safetensors"), str(pair[1])])
    assert res.exit_code != 0 and res.exception is not None and not isinstance(res.exception, SystemExit)


def test_names_with_markup_characters_are_printed_verbatim(pair, tmp_path):
    odd = tmp_path / "ckpt[v2]"
    odd.mkdir()
    (odd / "model.safetensors").write_bytes(pair[1].read_bytes())
    res = _run("diff", pair[0], odd, "--out", tmp_path / "o[/]")
    assert res.exit_code == 0, res.output
    assert "o[/]" in res.stderr
    res = _run("inspect", odd)
    assert "ckpt[v2]" in res.stdout
