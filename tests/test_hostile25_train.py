"""Twenty-fifth round, training inputs (docs/bad_inputs.md, "twenty-fifth round"): a container's page cache counted
as used memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spectra.errors import ConfigError
from spectra.plan import free_memory
from spectra.training_inputs import check_step_memory


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
    monkeypatch.setattr("spectra.plan.Path", _NoMeminfo)  # only the cgroup's number
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
    monkeypatch.setattr("spectra.plan.Path", _NoMeminfo)
    gib = 2**30
    cg = _cgroup(tmp_path / "cg", str(4 * gib), 3 * gib, 0)
    (cg / "memory.stat").unlink()
    assert free_memory(torch.device("cpu"), cg) == gib
    over = _cgroup(tmp_path / "over", str(4 * gib), 5 * gib, 0)
    assert free_memory(torch.device("cpu"), over) == 0


SMALL = {"steps": 3, "batch": 2, "seq_len": 8, "device": "cpu", "trace_every": 0, "eval_every": 3, "eval_batches": 1}


def test_sweep_resume_refuses_other_text_or_weights_at_the_same_paths(tmp_path):
    """A sweep stopped after its first run, then --data rewritten (or the base replaced) at the same path: the resume
    kept the first run (trained on the old text or from the old base) beside runs trained on the new ones, exit 0,
    no word (only the paths were compared)."""
    import shutil

    from spectra.training import sweep
    from tests.train_util import base_and_text

    base, data = base_and_text(tmp_path / "in", 60_000)

    def stop_in_lora(name: str, rec: dict) -> None:
        if name == "lora2" and rec["step"] == 3:
            raise KeyboardInterrupt

    out = tmp_path / "sw"
    with pytest.raises(KeyboardInterrupt):
        sweep(str(base), str(data), str(out), methods=["lora", "full"], ranks=[2], callback=stop_in_lora, **SMALL)
    assert (out / "full" / "train_summary.json").is_file()
    text = Path(data).read_bytes()
    Path(data).write_bytes(text[::-1])  # other text, the same size
    with pytest.raises(ConfigError, match="was started with inputs"):
        sweep(str(base), str(data), str(out), methods=["lora", "full"], ranks=[2], resume=True, **SMALL)
    Path(data).write_bytes(text)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    weights = next(other.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    save_file({k: v + 1 for k, v in load_file(str(weights)).items()}, str(weights))
    shutil.rmtree(base)
    shutil.copytree(other, base)  # the base replaced at its path
    with pytest.raises(ConfigError, match="was started with inputs"):
        sweep(str(base), str(data), str(out), methods=["lora", "full"], ranks=[2], resume=True, **SMALL)
