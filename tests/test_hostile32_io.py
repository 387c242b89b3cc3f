"""Thirty-second round: loaders, distributed runs, devices and labels (docs/bad_inputs.md, "thirty-second round")."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import ROOT, cli
from safetensors.torch import save_file

# ---- ranks given copies that differ only between the file-wide samples -----------------------------------------


def _between_samples(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose every float32 outside content_sample's 16 chunks is tripled: the same size, names and
    file-wide sample, other weights."""
    raw = bytearray(src.read_bytes())
    size, chunk = len(raw), 4096
    sampled = np.zeros(size, dtype=bool)
    for i in range(16):
        start = max(0, size - chunk) * i // 15
        sampled[start:start + chunk] = True
    head = 8 + int.from_bytes(raw[:8], "little")
    data = np.frombuffer(bytes(raw[head:]), dtype=np.float32).copy()
    touched = sampled[head:head + 4 * data.size].reshape(-1, 4).any(axis=1)
    data[~touched] *= 3.0
    raw[head:] = data.tobytes()
    dst.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("copies")
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(4) for p in ("q_proj", "v_proj")]
    base = {n: torch.randn(128, 128, generator=g) * 0.02 for n in names}
    tuned = {n: w + torch.randn(128, 4, generator=g) @ torch.randn(4, 128, generator=g) * 1e-2 for n, w in base.items()}
    for d in ("base", "ta", "tb", "tc"):
        (root / d).mkdir()
    save_file(base, root / "base" / "model.safetensors")
    save_file(tuned, root / "ta" / "model.safetensors")
    _between_samples(root / "ta" / "model.safetensors", root / "tb" / "model.safetensors")
    shutil.copy(root / "ta" / "model.safetensors", root / "tc" / "model.safetensors")  # a true copy elsewhere
    return root


def test_a_copy_differing_between_the_file_samples_is_other_inputs(copies):
    """The ranks compared each file by name, size and 16 chunks of 4 KiB: a copy whose weights differ only between
    those chunks passed, and its matrices were merged into the results (v_proj ‖ΔW‖ 8.37 for 2.43, exit 0).
    Each tensor's own chunks are compared now; a true copy in another folder still agrees."""
    from spectra.config import DiffConfig
    from spectra.io.checkpoint import open_checkpoint
    from spectra.io.files import content_sample
    from spectra.journal import run_fingerprint

    a, b = copies / "ta" / "model.safetensors", copies / "tb" / "model.safetensors"
    assert content_sample(a) == content_sample(b) and a.read_bytes() != b.read_bytes()
    base = open_checkpoint(str(copies / "base"))
    prints = {d: run_fingerprint(base, open_checkpoint(str(copies / d)), DiffConfig(), portable=True)
              for d in ("ta", "tb", "tc")}
    assert prints["ta"] != prints["tb"] and prints["ta"] == prints["tc"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_given_such_copies_are_refused(copies, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "spectra", "diff", str(copies / "base"), str(copies / tuned),
                               "--out", str(tmp_path / "d"), "--no-plots", "--distributed"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r, tuned in enumerate(("ta", "tb"))]
    done = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(code != 0 and "Traceback" not in err for code, _, err in done), [d[2][-1500:] for d in done]
    assert "rank(s) 1 of the distributed run were given other inputs or options" in done[0][2]


# ---- commands other than diff under a launcher; a RANK left over -------------------------------------------------
def test_other_commands_under_torchrun_say_they_run_in_one_process(copies, tmp_path):
    """Under torchrun each rank ran the whole esd/extract into one folder: one won the lock, the other failed and
    torchrun stopped the winner (a partial folder, an adapter half written)."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for args in (["esd", str(copies / "ta"), "--out", str(tmp_path / "e")],
                 ["extract", str(copies / "base"), str(copies / "ta"), "-r", "1", "-o", str(tmp_path / "x")]):
        res = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", *args], capture_output=True,
                             text=True, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"spectra {args[0]} runs in one process (WORLD_SIZE=2 here); only spectra diff splits its work" in res.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()
    res = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", "compare", "--help"], capture_output=True,
                         text=True, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0 and "Usage:" in res.stdout  # help is no run


def test_a_rank_without_a_world_is_the_lead(monkeypatch):
    """RANK=1 left in the environment of one process hid its warnings (is_lead looked at RANK alone)."""
    from spectra.distributed import is_lead

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert is_lead()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not is_lead()


# ---- PyTorch files ---------------------------------------------------------------------------------------------------
def test_top_level_tensors_beside_a_wrapped_state_dict_are_ambiguous(tmp_path):
    """{**tuned, "model": base}: only the state dict under "model" was read, the top-level tensors dropped without a
    word (here: every ΔW 0, "base and tuned hold the same weights")."""
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(16, 8, generator=g)}
    tuned = {"fc.weight": base["fc.weight"] + 1.0}
    torch.save(base, tmp_path / "b.pt")
    torch.save({**tuned, "model": base}, tmp_path / "mixed.pt")
    res = cli(["diff", str(tmp_path / "b.pt"), str(tmp_path / "mixed.pt"), "--no-plots"])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "holds 1 weight matrix at its top level (e.g. 'fc.weight') and a state dict under 'model'" in res.stderr
    # a counter, a saved RNG state, normalisation statistics: no weight matrices
    torch.save({"model": tuned, "step": torch.tensor(3), "torch_rng_state": torch.get_rng_state(), "mean": torch.zeros(3)},
               tmp_path / "ckpt.pt")
    res = cli(["diff", str(tmp_path / "b.pt"), str(tmp_path / "ckpt.pt"), "--no-plots", "--json"])
    assert res.returncode == 0, res.stderr


def test_legacy_format_float8_is_torchs_limit_not_a_corrupt_download(tmp_path):
    w = torch.randn(16, 8).to(torch.float8_e4m3fn)
    torch.save({"fc.weight": w}, tmp_path / "a.pt", _use_new_zipfile_serialization=False)
    torch.save({"fc.weight": w}, tmp_path / "b.pt", _use_new_zipfile_serialization=False)
    try:
        torch.load(tmp_path / "a.pt", weights_only=True)
        pytest.skip("this torch reads legacy-format float8")
    except Exception:  # noqa: BLE001 - whatever this torch raises for it
        pass
    res = cli(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--no-plots"])
    assert res.returncode == 1 and "legacy (pre-zip) format" in res.stderr and "download it again" not in res.stderr


def test_flax_or_tf_safetensors_are_said_to_hold_transposed_kernels(tmp_path):
    """A square kernel of a Flax file (in, out) paired with a PyTorch base was compared transposed, without a word."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=g)
    save_file({"model.layers.0.mlp.down_proj.weight": W}, tmp_path / "b.safetensors")
    save_file({"model.layers.0.mlp.down_proj.weight": W.T.contiguous()}, tmp_path / "t.safetensors", metadata={"format": "flax"})
    res = cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    assert "its metadata says format 'flax'" in " ".join(res.stderr.split()) and "from_flax=True" in res.stderr


def test_cpu_0_is_a_device():
    """torch.device("cpu", 0) is torch's own spelling of the CPU: refused as "Got 'cpu:0'"."""
    from spectra.config import DiffConfig
    from spectra.linalg import resolve_device

    assert DiffConfig(device=torch.device("cpu", 0)).device == "cpu:0" and resolve_device("cpu:0").type == "cpu"


# ---- esd and labels ----------------------------------------------------------------------------------------------
def test_container_weights_get_a_module_label(tmp_path):
    """An nn.Sequential's "2.weight" was labelled "" (a blank, quoted cell; every such matrix one module)."""
    g = torch.Generator().manual_seed(0)
    save_file({"0.weight": torch.randn(32, 16, 3, 3, generator=g), "2.weight": torch.randn(48, 64, generator=g),
               "3.weight": torch.randn(40, 48, generator=g), "layers.1.weight": torch.randn(40, 40, generator=g)},
              tmp_path / "m.safetensors")
    res = cli(["inspect", str(tmp_path / "m.safetensors"), "--json"])
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    rows = {m["name"]: m for m in (doc["matrices"] if isinstance(doc, dict) else doc)}
    assert rows["2.weight"]["module"] == "2" and rows["3.weight"]["module"] == "3"
    assert rows["layers.1.weight"]["module"] == "layers" and rows["layers.1.weight"]["layer"] == 1
    res = cli(["esd", str(tmp_path / "m.safetensors"), "--ww-compatible", "--out", str(tmp_path / "e"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    skipped = {s["name"]: s["reason"] for s in json.loads((tmp_path / "e" / "esd.json").read_text())["skipped"]}
    assert "WeightWatcher analyses a Conv2d's kernel" in skipped["0.weight"]


# ---- compare of an adapter whose initialisation moved the base --------------------------------------------------
def init_adapter(folder: Path, init: object, g: torch.Generator) -> Path:
    """A rank-2 PEFT adapter on q_proj (16 × 16) with ``init_lora_weights = init`` in its config."""
    folder.mkdir()
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.randn(2, 16, generator=g), f"{key}.lora_B.weight": torch.randn(16, 2, generator=g)},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"],
                                                            "init_lora_weights": init}))
    return folder


def test_compare_refuses_an_adapter_that_moved_its_base(tmp_path):
    """A PiSSA or OLoRA adapter saved as trained holds W's top components in B·A: compare measured them as the update
    (‖ΔW‖ 0.58 where PEFT's merge moves 0.013, amplification 0.999 for 0.043), where diff, interfere, trace and extract
    refuse it."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g)}, tmp_path / "base" / "model.safetensors")
    pissa, plain = init_adapter(tmp_path / "pissa", "pissa", g), init_adapter(tmp_path / "plain", True, g)
    for args in (["compare", str(pissa), str(plain), "--base", str(tmp_path / "base")], ["compare", str(plain), str(pissa)]):
        res = cli([*args, "--out", str(tmp_path / "c"), "--no-plots"])
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert "this adapter was initialised with pissa" in res.stderr and "merge it (merge_and_unload)" in res.stderr
    res = cli(["compare", str(plain), str(plain), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "c2"), "--no-plots"])
    assert res.returncode == 0, res.stderr
