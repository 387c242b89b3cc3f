"""Thirty-eighth round: options at their edges in interfere and esd, patterns shown as typed, counts in words
(docs/bad_inputs.md, "thirty-eighth round")."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.cli_util import cli

Q = "model.layers.0.self_attn.q_proj.weight"


def _model(folder: Path, tensors: dict[str, torch.Tensor]) -> str:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return str(folder)


def test_interfere_top_k_beyond_any_rank_keeps_every_direction(tmp_path):
    from spectra.interfere import InterfereConfig

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 12, generator=g)
    base = _model(tmp_path / "b", {Q: W})
    tasks = [_model(tmp_path / f"t{i}", {Q: W + 0.01 * torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g)})
             for i in range(2)]
    assert InterfereConfig(top_k=10**20).top_k == 1 << 62  # a traceback half-way through the first matrix
    big = cli(["interfere", "--base", base, *tasks, "--no-plots", "--top-k", "99999999999999999999", "--out", str(tmp_path / "i")])
    small = cli(["interfere", "--base", base, *tasks, "--no-plots", "--top-k", "12", "--out", str(tmp_path / "j")])
    assert big.returncode == 0 and small.returncode == 0 and "Traceback" not in big.stderr, big.stderr
    a, b = (json.loads((tmp_path / d / "interfere.json").read_text()) for d in ("i", "j"))
    assert a["modules"] == b["modules"] and len(a["modules"]) == 1


def test_esd_plot_include_matching_nothing_is_said_and_patterns_shown_as_typed(tmp_path):
    g = torch.Generator().manual_seed(1)
    model = _model(tmp_path / "m", {Q: torch.randn(64, 48, generator=g), "model.layers.0.mlp.up_proj.weight": torch.randn(96, 48, generator=g),
                                     "model.norm.weight": torch.ones(48)})
    run = cli(["esd", model, "--plot-include", "nomatch", "--out", str(tmp_path / "e")])
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "e" / "esd.json").read_text())
    assert any("--plot-include 'nomatch' matches none of the 2 matrices" in w for w in doc["warnings"]), doc["warnings"]
    assert "matches none" in run.stderr and not (tmp_path / "e" / "esd_plots.png").exists()
    said = " ".join(run.stderr.split())
    assert "2 matrices in" in said and "1 tensor skipped" in said, said  # "1 tensors skipped"
    run = cli(["esd", model, "--no-plots", "--include", r"a\.b"])
    assert run.returncode == 1 and r"--include 'a\.b'" in run.stderr and r"a\\.b" not in run.stderr, run.stderr


def test_the_esd_flags_finding_counts_in_words():
    from pathlib import Path

    from spectra.report_esd import findings

    recs = [{"name": f"m{i}", "alpha": a, "warning": w, "layer": 0, "module": "q_proj", "role": "q"}
            for i, (a, w) in enumerate(((1.5, "over-trained"), (3.0, None), (4.0, None)))]
    text = " ".join(f.text for f in findings(Path("esd.json"), {"matrices": recs}))
    assert "1 matrix has α < 2 (over-trained) and 0 have α > 6" in text, text
