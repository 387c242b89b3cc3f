"""Thirtieth round of hostile inputs: the Python API in a long-lived process (docs/bad_inputs.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import spectra
from spectra.errors import ConfigError
from spectra.io.files import LOCK_NAME
from tests.pair_util import small_pair

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def _stop(*_args):
    raise RuntimeError("stopped by the caller")


def _base_and_adapter(tmp_path: Path) -> tuple[Path, Path]:
    from tests.test_interfere import make_adapter, tiny_llama

    tiny_llama(0).save_pretrained(tmp_path / "base")
    make_adapter(tmp_path / "base", tmp_path / "lora", seed=1)
    return tmp_path / "base", tmp_path / "lora"


def test_a_failed_adapter_diff_or_extract_frees_its_folder_and_keeps_its_results(tmp_path):
    """A diff of an adapter, or an extract, stopped by an error (a callback's, a Ctrl-C) kept its folder locked until
    the process ended: `spectra diff … --resume` from a shell beside the notebook was refused with "another spectra
    run is writing into this folder … wait for it to finish"; the adapter diff's results.json said 0 modules where
    its journal held one."""
    base, lora = _base_and_adapter(tmp_path)
    seen = []

    def second(event):
        seen.append(event)
        if len(seen) == 2:
            raise RuntimeError("stopped by the caller")

    with pytest.raises(RuntimeError, match="stopped by the caller"):
        spectra.diff(str(base), str(lora), out_dir=tmp_path / "d", callback=second)
    assert not (tmp_path / "d" / LOCK_NAME).exists()
    doc = json.loads((tmp_path / "d" / "results.json").read_text())
    assert doc["complete"] is False and len(doc["modules"]) == 2  # the two finished before the stop
    res = spectra.diff(str(base), str(lora), out_dir=tmp_path / "d", resume=True)
    assert res.complete and len(res.modules) > 2
    from spectra.extract import ExtractConfig, extract

    with pytest.raises(RuntimeError, match="stopped by the caller"):
        extract(str(base), str(lora), tmp_path / "x", config=ExtractConfig(rank=2), callback=_stop)
    assert not (tmp_path / "x" / LOCK_NAME).exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"out_dir": b"out"}, "out_dir must be a folder path (a str or os.PathLike). Got bytes"),
    ({"out_dir": 5}, "out_dir must be a folder path (a str or os.PathLike). Got int 5"),
    ({"callback": 5}, "callback must be a function or None. Got int 5"),
    ({"plots": "no", "out_dir": "o"}, "plots must be True or False. Got str 'no'"),
    ({"resume": "no", "out_dir": "o"}, "resume must be True or False. Got str 'no'"),
])
def test_the_shared_arguments_of_the_entry_points_are_checked(tmp_path, monkeypatch, kwargs, message):
    """out_dir=b"out" or 5 raised pathlib's TypeError, callback=5 a TypeError after the run started, plots="no" drew
    the figures and resume="no" resumed: each is refused in one line before any work, by every entry point."""
    monkeypatch.chdir(tmp_path)
    b, t = small_pair(tmp_path)
    from spectra.comparison import compare
    from spectra.esd_run import esd

    for call in (lambda: spectra.diff(b, t, **kwargs), lambda: esd(t, **kwargs), lambda: compare(t, t, base=b, **kwargs)):
        with pytest.raises(ConfigError) as exc:
            call()
        assert exc.value.message.startswith(message)
    assert not (tmp_path / "o").exists()


def test_out_dir_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """out_dir="~/x" made a folder named "~" in the working directory (where `rm -rf ~` waits), while the inputs'
    "~" was expanded."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    b, t = small_pair(tmp_path)
    spectra.diff(b, t, out_dir="~/res", plots=False)
    assert (tmp_path / "home" / "res" / "results.json").is_file() and not (work / "~").exists()
    assert torch.get_default_device().type == "cpu"


def test_a_stop_between_creating_and_opening_the_temporary_file_leaks_nothing(tmp_path, monkeypatch):
    """A Ctrl-C that landed between mkstemp and fdopen in an atomic write left the temporary file's descriptor open
    in the process (a notebook's kernel collects one per stop)."""
    import os

    from spectra.io.files import atomic_write_text

    def interrupted(fd, mode):
        raise KeyboardInterrupt

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fchmod", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "results.json", "{}")
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == fds and os.listdir(tmp_path) == []


def test_a_call_from_another_thread_holds_blas_to_one_thread_per_worker():
    """threadpoolctl ≥ 3.8 makes the first thread to set OpenBLAS's thread count its controlling thread and ignores the
    others while it lives: after one call from the main thread, every call from another thread (a notebook's thread
    pool, a web server's) left each worker on two BLAS threads, and a compare took 3.7× as long (5.2 s against 1.4)."""
    import threading

    from threadpoolctl import threadpool_info

    from spectra.threads import imap_one_blas_thread

    def blas() -> list[int]:
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    before = blas()
    seen: dict[str, list[int]] = {}

    def run(tag: str) -> None:
        seen[tag] = list(imap_one_blas_thread(lambda _: blas(), [0, 1, 2], 2))[-1]

    run("main")  # the main thread sets the count first, as a notebook's first call does
    th = threading.Thread(target=run, args=("thread",))
    th.start()
    th.join()
    assert seen["main"] == seen["thread"] == [1] * len(before)
    assert blas() == before  # given back
