"""Twenty-eighth probe round: the command line's JSON and its output streams (docs/bad_inputs.md, "twenty-eighth round")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.cli_util import ROOT
from tests.pair_util import save_folder


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[bytes]:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", *args], capture_output=True,
                          timeout=300, cwd=ROOT, env=environ)


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[str, str, str]:
    """A base folder whose name is not UTF-8 (``caf\\xe9``, as an old zip unpacks it) and a tensor name holding a C1
    control character (U+009B, a one-character CSI), beside two tuned checkpoints."""
    root = tmp_path_factory.mktemp("odd")
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.\u009b31m.weight"]
    W = {n: torch.randn(12, 8, generator=g) for n in names}
    base = os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9")
    save_folder(__import__("pathlib").Path(base), W)
    t1 = save_folder(root / "t1", {n: v + 0.1 * torch.randn(12, 2, generator=g) @ torch.randn(2, 8, generator=g) for n, v in W.items()})
    t2 = save_folder(root / "t2", {n: v + 0.1 * torch.randn(12, 2, generator=g) @ torch.randn(2, 8, generator=g) for n, v in W.items()})
    return base, str(t1), str(t2)


@pytest.mark.parametrize("command", ["trace", "extract", "interfere", "esd"])
def test_json_on_stdout_is_valid_utf8_with_escapes(odd, tmp_path, command):
    # trace, extract and interfere --json printed a lone surrogate: a UnicodeEncodeError traceback after the whole run
    # under a strict UTF-8 stdout, raw 0xE9 bytes under the C locale; they and esd printed U+009B raw
    base, t1, t2 = odd
    args = {"trace": ["trace", base, t1, t2], "extract": ["extract", base, t1, "-r", "1", "--out", str(tmp_path / "x"), "--force"],
            "interfere": ["interfere", "--base", base, t1, t2], "esd": ["esd", base]}[command]
    for env in ({"PYTHONIOENCODING": "utf-8:strict"}, {"LC_ALL": "C", "PYTHONIOENCODING": ""}):
        proc = _run([*args, "--json", "--no-plots"], **env)
        assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-500:]
        text = proc.stdout.decode("utf-8")  # strict: no raw surrogate bytes
        assert "\u009b" not in text and "\x1b" not in text
        json.loads(text)


def test_the_version_into_a_full_disk_is_one_line():
    # `spectra --version >/dev/full`: an OSError traceback from click's eager option (the group's, before any command)
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", "--version"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: cannot write the output: No space left on device"
