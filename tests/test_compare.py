"""``spectra compare`` end to end on adapters and a full fine-tune trained here for a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("peft")

from spectra.compare import CompareConfig, compare  # noqa: E402
from spectra_cli.main import main  # noqa: E402
from tests.train_util import make_runs  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


def test_lora_r8_vs_r64(runs, tmp_path):
    res = compare(runs["lora8"], runs["lora64"], base=runs["base"], out_dir=tmp_path)
    assert res.kinds == {"a": "lora", "b": "lora"} and len(res.modules) == 14
    for m in res.modules:
        assert (m["rank_a"], m["rank_b"]) == (8, 64)
        grid = np.asarray(res.phi_grids[m["name"]]["right"])
        assert grid.shape == (8, 64) and grid.min() >= -1e-12 and grid.max() <= 1 + 1e-9
        assert m["phi"]["right"]["random"] == pytest.approx(64 / m["in"])
        ce = m["captured"]["b_in_a"]
        assert 0 <= ce["two_sided"] <= ce["best_rank_r"] + 1e-9 and ce["left"] <= ce["best_rank_r"] + 1e-9
        assert set(m["amplification"]) == {"a", "b"} and m["amplification"]["a"]["factor"] > 0
        assert set(m["intruders"]["a"]["counts"]) == {str(e / 10) for e in range(1, 10)}
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert doc["schema"] == "spectra.compare/1"
    for f in ("compare.csv", "captured_heatmap.png", "phi_grids.png", "principal_angles.png", "intruders_a.png"):
        assert (tmp_path / f).is_file(), f


def test_identical_adapter_is_fully_similar(runs):
    res = compare(runs["lora8"], runs["lora8"], config=CompareConfig(side="both"))
    for m in res.modules:
        for side in ("left", "right"):
            assert m["phi"][side]["phi_full"] == pytest.approx(1.0, abs=1e-9)
            assert m["angles"][side]["grassmann"] == pytest.approx(0.0, abs=1e-5)
        assert m["captured"]["b_in_a"]["two_sided"] == pytest.approx(1.0, abs=1e-9)


def test_lora_vs_full_and_cli(runs, tmp_path):
    res = compare(runs["lora8"], runs["full"], base=runs["base"], config=CompareConfig(top_k=32))
    assert res.kinds == {"a": "lora", "b": "full"}
    for m in res.modules:
        assert m["rank_b"] == 32
        ce = m["captured"]["b_in_a"]  # how much of the full update the LoRA subspaces hold
        assert 0 <= ce["two_sided"] <= ce["best_rank_r"] <= 1 + 1e-9
    out = CliRunner().invoke(main, ["compare", str(runs["lora8"]), str(runs["lora8b"]), "--base", str(runs["base"]),
                                    "--out", str(tmp_path / "cli"), "--layers", "1"])
    assert out.exit_code == 0, out.output
    assert "φ(right)" in out.stdout and (tmp_path / "cli" / "compare.json").is_file()
    bad = CliRunner().invoke(main, ["compare", str(runs["lora8"]), str(runs["full"])])
    assert bad.exit_code == 1 and "needs the base model" in bad.stderr
