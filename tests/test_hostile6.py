"""Hostile and odd inputs found by the sixth outside probe and the new-user walkthrough: each test
reproduces a finding and checks the fix (one-line errors that say what the path is, numbers against
float64 numpy)."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra_cli.main import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_dangling_symlink_is_named_as_such(tmp_path):
    """A path that is a symbolic link to nothing said "no such file or folder" (the link is there), and
    compare said a dangling link "is a full checkpoint: ... pass --base"."""
    (tmp_path / "dang").symlink_to(tmp_path / "nothere")
    for args in (("diff", str(tmp_path / "dang"), str(tmp_path / "dang")), ("compare", str(tmp_path / "dang"), str(tmp_path / "dang"))):
        res = _run(*args)
        assert res.exit_code == 1, res.output
        assert "is a symbolic link to" in res.output and "which does not exist" in res.output, res.output
        assert "--base" not in res.output and "Traceback" not in res.output


def test_symlink_loop_hint_is_not_permissions(tmp_path):
    """A loop of symbolic links (a -> b -> a) was told to "check the file's permissions"."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a").symlink_to("b")
    (folder / "b").symlink_to("a")
    (folder / "model.safetensors").symlink_to("a")
    for target in (folder / "a", folder):
        res = _run("diff", str(target), str(target))
        assert res.exit_code == 1, res.output
        assert "loop of symbolic links" in res.output and "permissions" not in res.output, res.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_hint_is_permissions(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.ones(4, 4)}, str(f))
    f.chmod(0)
    res = _run("diff", str(f), str(f))
    assert res.exit_code == 1 and "permissions" in res.output, res.output
