"""Twenty-first round, the Python API and the engine's own checks (docs/bad_inputs.md, "twenty-first round")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectra.linalg import all_finite, finite_tensor

INF, NAN = float("inf"), float("nan")


# ---- the finiteness check takes a sum first: it must never call a non-finite tensor finite, nor the reverse ------
@pytest.mark.parametrize(("values", "dtype", "want"), [
    ([1.0, 2.0], torch.float32, True),
    ([1.0, NAN], torch.float32, False),
    ([INF, -INF], torch.float32, False),  # their sum is NaN, not a cancellation
    ([INF, 1.0], torch.float64, False),
    ([3e38, 3e38], torch.float32, True),  # finite values whose float32 sum overflows
    ([1e308, 1e308], torch.float64, True),
    ([60000.0, 60000.0], torch.float16, True),
    ([1.0, INF], torch.bfloat16, False),
    ([1.0, 2.0], torch.float8_e4m3fn, True),  # fp8: no isfinite on the CPU, read through float32
    ([1.0, INF], torch.float8_e5m2, False),
    ([448.0] * 4096, torch.float8_e4m3fn, True),
])
def test_all_finite_agrees_with_isfinite_of_every_entry(values, dtype, want):
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert all_finite(t) is want
    assert bool(np.isfinite(t.double().numpy()).all()) is want  # the independent reference


def test_all_finite_of_integers_empty_and_finite_tensor_message():
    assert all_finite(torch.arange(5)) and all_finite(torch.zeros(0)) and all_finite(torch.zeros((3, 0)))
    M = torch.ones(4, 4, dtype=torch.float64)
    M[2, 1] = NAN
    with pytest.raises(ValueError, match=r"^W holds NaN or Inf"):
        finite_tensor(M, "W")
    big = torch.full((4, 4), 1e308, dtype=torch.float64)
    assert finite_tensor(big, "W") is not None  # overflowing sum, finite entries: accepted


# ---- esd: log10 Σλ^α is a number where Σλ^α leaves float64's range -----------------------------------------------
@pytest.mark.parametrize("scale", [1e100, 1e30, 1.0])
def test_log_alpha_norm_in_log_space(scale):
    from scipy.special import logsumexp

    from spectra.esd import esd_metrics

    G = np.random.default_rng(0).standard_normal((60, 40)) * scale
    lam = np.linalg.svd(G, compute_uv=False)[::-1] ** 2
    m = esd_metrics(lam, G.shape)
    assert m.alpha is not None
    want = float(logsumexp(m.alpha * np.log(lam))) / math.log(10)  # independent: natural-log logsumexp
    assert m.log_alpha_norm == pytest.approx(want, rel=1e-12)


def test_log_alpha_norm_of_a_large_alpha_on_the_command_line(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    save_file({"layers.0.a.weight": torch.diag(torch.tensor([1000.0, 1001.0]))}, str(tmp_path / "m.safetensors"))
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", "esd", str(tmp_path / "m.safetensors"),
                        "--json"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout)["matrices"][0]
    lam = np.array([1000.0, 1001.0]) ** 2
    want = (row["alpha"] * np.log(lam)).max() / math.log(10) + math.log10(np.sum((lam / lam.max()) ** row["alpha"]))
    assert row["alpha"] > 300 and row["log_alpha_norm"] == pytest.approx(want, rel=1e-12)


# ---- --device with an index torch cannot parse, or parses wrong -------------------------------------------------
@pytest.mark.parametrize("device", ["cuda:01", "cuda:٣", "cuda:128", "cuda:2147483647", "cuda:-1", "cuda: 1"])
def test_device_index_is_ascii_without_leading_zeros_up_to_127(device):
    from spectra.config import DiffConfig
    from spectra.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--device must be auto, cpu, cuda or cuda:N \(N from 0 to 127\)"):
        DiffConfig(device=device)
    assert DiffConfig(device="cuda:127").device == "cuda:127" and DiffConfig(device="cuda:0").device == "cuda:0"


def test_device_cuda_01_on_the_command_line_is_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.pair_util import small_pair

    base, tuned = small_pair(tmp_path)
    root = str(Path(__file__).resolve().parents[1])
    for cmd in (["diff", base, tuned, "--device", "cuda:01"], ["esd", tuned, "--device", "cuda:01"]):
        p = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", *cmd], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": root}, timeout=300)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert "--device must be" in p.stderr.strip().splitlines()[-1]


# ---- an empty path (an unset shell variable) is no checkpoint -----------------------------------------------------
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    from spectra import diff, open_checkpoint
    from spectra.errors import ConfigError
    from tests.pair_util import small_pair

    base, tuned = small_pair(tmp_path)
    monkeypatch.chdir(tmp_path)  # a folder holding checkpoints: "" would have read it
    with pytest.raises(ConfigError, match="^an empty path names no checkpoint"):
        open_checkpoint("")
    with pytest.raises(ConfigError, match="^an empty path names no checkpoint"):
        diff("", tuned)


def test_report_of_an_empty_path_is_refused(tmp_path, monkeypatch):
    from spectra.errors import ConfigError
    from spectra.report import input_files

    (tmp_path / "results.json").write_text("{}")
    monkeypatch.chdir(tmp_path)  # "" would have read this folder's results
    with pytest.raises(ConfigError, match="^an empty path names no results"):
        input_files([""])


def test_train_takes_the_same_device_names_and_refuses_empty_paths(tmp_path, monkeypatch):
    from spectra.errors import ConfigError
    from spectra.training import TrainConfig
    from spectra.training_inputs import read_examples, resolve_device

    for bad in ("cuda:128", "cuda:01", "cuda:٣"):
        with pytest.raises(ConfigError, match=r"--device must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    (tmp_path / "a.txt").write_text("some text to train on\n")
    monkeypatch.chdir(tmp_path)  # "" would have read a.txt
    with pytest.raises(ConfigError, match="^--data is an empty path"):
        read_examples("")
    for field in ("base", "data", "out"):
        kw = {"base": "b", "data": "d", "out": "o", field: ""}
        with pytest.raises(ConfigError, match=f"^--{field} is an empty path"):
            TrainConfig(**kw)
