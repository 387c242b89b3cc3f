"""Round 29, how spectra runs (docs/bad_inputs.md, "twenty-ninth round"): an --out folder reached through a link that
is switched during the run, a thread that cannot start under a memory limit, the figures' preload under one."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import out_of_memory
from tests.cli_util import cli


def test_an_out_folder_through_a_link_is_resolved_once(tmp_path):
    # `--out L` with L -> A, L switched to B mid-run (a `latest -> run-N` link): the lock and the first records went to
    # A, the figures, CSV and a complete results.json to B, whose journal missed A's records and whose lock was never
    # taken (a second run into B interleaved its records): the folder is now the one the link named at the start
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(24, 16, generator=g) for i in range(2)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(tmp_path / "tuned.safetensors"))
    (tmp_path / "A").mkdir()
    (tmp_path / "L").symlink_to("A")
    run = cli(["diff", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--out", str(tmp_path / "L"),
               "--no-plots"])
    assert run.returncode == 0, run.stderr
    assert f"results: {tmp_path / 'A' / 'results.json'}" in run.stdout + run.stderr
    assert (tmp_path / "A" / "results.json").is_file()


def test_a_thread_that_cannot_start_is_out_of_memory_in_one_line():
    # under `ulimit -v`, extract's read-ahead thread could not map its stack: a RuntimeError traceback, then SIGABRT
    said = out_of_memory(RuntimeError("can't start new thread"))
    assert said is not None and said.startswith("out of memory: a new thread could not be started")
    assert out_of_memory(RuntimeError("something else")) is None


def test_the_figures_preload_keeps_an_import_failure_for_the_figures(monkeypatch):
    # under a memory limit the preload thread printed "Exception in thread spectra-plots-import: ImportError …" in the
    # middle of the run, which went on; the figures' own import reports it after the results are written
    from spectra.plots.base import preload

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # importing it raises ImportError
    preload()
    with pytest.raises(ImportError):
        import matplotlib.backends.backend_agg  # noqa: F401
