"""Twenty-fifth round, training inputs (docs/bad_inputs.md, "twenty-fifth round"): a container's page cache counted
as used memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spectra.errors import ConfigError
from spectra.training_inputs import check_step_memory, free_memory


def _cgroup(root: Path, limit: str, current: int, inactive_file: int) -> Path:
    root.mkdir()
    (root / "memory.max").write_text(limit + "\n")
    (root / "memory.current").write_text(f"{current}\n")
    (root / "memory.stat").write_text(f"anon 1000\nfile {inactive_file + 5}\nactive_file 5\ninactive_file {inactive_file}\n")
    return root


def test_a_containers_page_cache_is_free_memory(tmp_path, monkeypatch):
    """cgroup v2 limit 16 GiB, usage 15 GiB of which 14 GiB inactive file cache (a checkpoint just read): the free
    memory was read as 1 GiB and `--batch 8 --seq-len 512` of a 50k vocabulary refused (needs ≥ 2.3 GiB)."""
    gib = 2**30
    cg = _cgroup(tmp_path / "cg", str(16 * gib), 15 * gib, 14 * gib)
    monkeypatch.setattr("spectra.training_inputs.Path", _NoMeminfo)  # only the cgroup's number
    assert free_memory(torch.device("cpu"), cg) == 15 * gib
    # with no cache the same usage leaves 1 GiB: a 2.3 GiB step is refused, naming both options
    tight = _cgroup(tmp_path / "tight", str(16 * gib), 15 * gib, 0)
    assert free_memory(torch.device("cpu"), tight) == gib
    monkeypatch.setattr("spectra.training_inputs.free_memory", lambda device: free_memory(device, tight))
    with pytest.raises(ConfigError, match=r"--batch 8 × --seq-len 512 needs at least 2\.3 GiB"):
        check_step_memory(8, 512, {"vocab_size": 50257}, torch.device("cpu"))
    monkeypatch.setattr("spectra.training_inputs.free_memory", lambda device: free_memory(device, cg))
    check_step_memory(8, 512, {"vocab_size": 50257}, torch.device("cpu"))  # 15 GiB free: runs
    # no limit ("max"), or no cgroup files: the cgroup says nothing
    assert free_memory(torch.device("cpu"), _cgroup(tmp_path / "max", "max", 15 * gib, 0)) is None
    assert free_memory(torch.device("cpu"), tmp_path / "none") is None


class _NoMeminfo(type(Path())):
    """A Path whose /proc/meminfo cannot be read (the host's MemAvailable left out of the test)."""

    def read_text(self, *args, **kwargs):
        if str(self) == "/proc/meminfo":
            raise OSError("not in this test")
        return super().read_text(*args, **kwargs)


def test_free_memory_of_a_cgroup_without_its_stat_file_or_over_its_limit(tmp_path, monkeypatch):
    """The review: a missing memory.stat dropped the container's limit too (the host's MemAvailable used), and usage
    above the limit gave a negative free memory ("more than the -0.1 GiB free")."""
    monkeypatch.setattr("spectra.training_inputs.Path", _NoMeminfo)
    gib = 2**30
    cg = _cgroup(tmp_path / "cg", str(4 * gib), 3 * gib, 0)
    (cg / "memory.stat").unlink()
    assert free_memory(torch.device("cpu"), cg) == gib
    over = _cgroup(tmp_path / "over", str(4 * gib), 5 * gib, 0)
    assert free_memory(torch.device("cpu"), over) == 0
