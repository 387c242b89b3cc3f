"""Thirty-third round: what the results files say against what they hold (docs/bad_inputs.md, "thirty-third round")."""

from __future__ import annotations

import json

import numpy as np
import torch
from cli_util import cli
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file

Q = "model.layers.0.self_attn.q_proj.weight"


def test_compare_intruder_counts_agree_with_the_cosines_it_writes(tmp_path):
    """max_cos was rounded to 6 digits while count used the unrounded values: a top vector at |cos| 0.4999996 was
    written as 0.5 and counted below 0.5 (count 4 where the file's own cosines give 3)."""
    n = 16
    W = np.diag(np.linspace(10, 3, n))
    c = 0.4999996
    u = np.zeros(n)
    u[:4], u[4] = c, np.sqrt(1 - 4 * c * c)
    Q_, _ = np.linalg.qr(np.column_stack([u, np.random.default_rng(0).standard_normal((n, n - 1))]))
    Q_[:, 0] *= np.sign(Q_[:, 0] @ u)
    V, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((n, n)))
    T = (Q_ * np.r_[1000.0, np.linspace(0.5, 0.1, n - 1)]) @ V.T
    save_np({Q: W}, str(tmp_path / "base.safetensors"))
    save_np({Q: T}, str(tmp_path / "tuned.safetensors"))
    tuned = str(tmp_path / "tuned.safetensors")
    res = cli(["compare", tuned, tuned, "--base", str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "c"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "c" / "compare.json").read_text())["modules"][0]
    ref = np.abs(np.linalg.svd(T)[0][:, 0] @ np.linalg.svd(W)[0]).max()  # the top vector's max |cos| with W's, float64
    for side in ("a", "b"):
        intr = rec["intruders"][side]
        cos = np.asarray(intr["max_cos"])
        assert abs(cos[0] - ref) < 1e-9 and cos[0] < 0.5
        assert intr["count"] == int((cos < intr["epsilon"]).sum())
        assert all(k == int((cos < float(e)).sum()) for e, k in intr["counts"].items())


def test_interfere_warns_of_a_large_update_on_few_matrices_as_diff_does(tmp_path):
    """interfere took the median ‖ΔW‖/‖W_base‖ over every compared matrix, unchanged ones as 0: a fine-tune that moved
    2 of 5 matrices five times their norm (diff and compare: median 5, a warning) read 0 and went unsaid."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)]
    base = {n: torch.randn(16, 16, generator=g) for n in names}
    a = {n: base[n] + (5 * base[n] if i < 2 else 0) for i, n in enumerate(names)}
    b = {n: base[n] + 0.01 * torch.randn(16, 16, generator=g) for n in names}
    for tag, t in (("base", base), ("a", a), ("b", b)):
        save_file(t, tmp_path / f"{tag}.safetensors")
    res = cli(["interfere", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--base", str(tmp_path / "base.safetensors"),
               "--out", str(tmp_path / "i"), "--no-plots"])
    assert res.returncode == 0, res.stderr
    warnings = json.loads((tmp_path / "i" / "interfere.json").read_text())["warnings"]
    hit = [w for w in warnings if "median ‖ΔW‖/‖W_base‖ is 5.00" in w]
    assert len(hit) == 1 and "a.safetensors" in hit[0], warnings
    assert not any("b.safetensors: the median" in w for w in warnings)


def test_the_same_results_render_the_same_report(tmp_path):
    """Reports from the same results differed inside their SVG figures (the drawing time, random clip-path ids)."""
    g = torch.Generator().manual_seed(2)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 16, generator=g) for i in range(3)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({n: w + 0.1 * torch.randn(32, 2, generator=g) @ torch.randn(2, 16, generator=g) for n, w in base.items()},
              tmp_path / "tuned.safetensors")
    res = cli(["diff", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--out", str(tmp_path / "d")])
    assert res.returncode == 0, res.stderr
    pages = []
    for i in (1, 2):
        res = cli(["report", str(tmp_path / "d"), "-o", str(tmp_path / f"r{i}.html")])
        assert res.returncode == 0, res.stderr
        pages.append((tmp_path / f"r{i}.html").read_bytes())
    assert b"data:image/svg+xml" in pages[0] and pages[0] == pages[1]
