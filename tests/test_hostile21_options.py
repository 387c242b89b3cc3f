"""Options that did nothing, or nothing right, without a word (outside probe, round 21).

1. ``train --method full`` took ``--rank/--alpha/--rslora/--targets``, trained every weight, and recorded the
   values asked in train_config.json; now a warning says they do not apply and they are recorded as null
   (``sweep --methods full --ranks …`` likewise warns).
2. ``report -o newdir/`` (a folder, by its trailing slash) wrote an HTML file named ``newdir``; refused.
3. ``diff --approx --approx-above N``: the caveat blamed "p above --approx-above" for matrices below N;
   a warning says --approx-above has no effect with --approx (every matrix is approximate).
4. ``extract --eval-seq-len 7`` without ``--eval`` was ignored but recorded; warned, recorded as null.
5. ``esd --plot-include … --no-plots`` was ignored without a word; warned.
6. ``train --alpha 1e-320``: a LoRA scale that float32 flushes to 0 (the adapter adds nothing); refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import ConfigError
from tests.cli_util import cli as _cli
from tests.train_util import base_and_text, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny byte-level Llama (no tokenizer files: bytes) and a little text."""
    return base_and_text(tmp_path_factory.mktemp("h21o"), 4000)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two q/k/v layers, float32, the tuned side moved by full-rank noise."""
    root = tmp_path_factory.mktemp("h21p")
    g = torch.Generator().manual_seed(21)
    base = {f"model.layers.{i}.self_attn.{m}.weight": 0.1 * torch.randn(24, 32, generator=g)
            for i in (0, 1) for m in ("q_proj", "k_proj", "v_proj")}
    tuned = {n: w + 0.02 * torch.randn(w.shape, generator=g) for n, w in base.items()}
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return root / "base.safetensors", root / "tuned.safetensors"


# ---- 1: LoRA options of a full fine-tune ------------------------------------------------------------------
def test_full_fine_tuning_warns_of_lora_options_and_records_them_null(base_and_data, tmp_path):
    base, data = base_and_data
    r = _cli(["train", "--base", str(base), "--data", str(data), "--steps", "1", "--batch", "1", "--seq-len", "8",
              "--device", "cpu", "--trace-every", "0", "-o", str(tmp_path / "tr"), "--method", "full", "--rank", "4",
              "--rslora", "--alpha", "3", "--targets", "attn"])
    assert r.returncode == 0, r.stderr
    lines = [w for w in _warnings(r.stderr) if "--method full" in w]
    assert len(lines) == 1, r.stderr
    assert all(opt in lines[0] for opt in ("--rank", "--alpha", "--rslora", "--targets"))
    cfg = json.loads((tmp_path / "tr" / "train_config.json").read_text())
    for key in ("rank", "alpha", "rslora", "targets", "resolved_alpha", "target_modules"):
        assert cfg[key] is None, (key, cfg[key])
    n_params = sum(p.numel() for p in tiny_llama().parameters())
    assert cfg["trainable_params"] == n_params  # every weight was trained, as the null targets say
    plain = _cli(["train", "--base", str(base), "--data", str(data), "--steps", "1", "--batch", "1", "--seq-len", "8",
                  "--device", "cpu", "--trace-every", "0", "-o", str(tmp_path / "plain"), "--method", "full"])
    assert plain.returncode == 0 and not [w for w in _warnings(plain.stderr) if "--method full" in w], plain.stderr
    assert json.loads((tmp_path / "plain" / "train_config.json").read_text())["rank"] is None  # the default: no LoRA either


def test_sweep_without_lora_warns_that_ranks_do_not_apply(tmp_path):
    # the warning comes before anything runs: a missing --data then stops the sweep at once
    r = _cli(["sweep", "--base", str(tmp_path / "nobase"), "--data", str(tmp_path / "nodata.txt"), "--methods", "full",
              "--ranks", "4", "-o", str(tmp_path / "sw")])
    lines = [w for w in _warnings(r.stderr) if "--ranks" in w]
    assert len(lines) == 1 and "lora" in lines[0].lower(), r.stderr


# ---- 2: report -o DIR/ ----------------------------------------------------------------------------------------
def test_report_out_with_a_trailing_slash_is_refused(tmp_path):
    log = tmp_path / "run" / "train_log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "train_loss": None if s == 0 else 2.0, "target_loss": 2.5 - s / 10,
                                       "source_loss": None, "lr": 1e-4, "tokens": 8 * s, "seconds": 0.1 * s}) + "\n"
                           for s in range(3)))
    r = _cli(["report", str(log.parent), "-o", "newdir/"], cwd=tmp_path)
    assert r.returncode != 0
    assert not (tmp_path / "newdir").exists()  # neither a file named newdir nor a folder
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "-o" in err[0] and "newdir/" in err[0], r.stderr
    ok = _cli(["report", str(log.parent), "-o", "r.html"], cwd=tmp_path)
    assert ok.returncode == 0 and (tmp_path / "r.html").is_file(), ok.stderr


# ---- 3: diff --approx --approx-above ----------------------------------------------------------------------------
def test_approx_above_with_approx_is_named_moot(pair):
    base, tuned = pair
    r = _cli(["diff", str(base), str(tuned), "--approx", "--approx-above", "100000", "--no-plots"])
    assert r.returncode == 0, r.stderr
    lines = [w for w in _warnings(r.stderr) if "--approx-above" in w and "with --approx" in w]
    assert len(lines) == 1 and "every matrix" in lines[0], r.stderr
    plain = _cli(["diff", str(base), str(tuned), "--approx", "--no-plots"])  # the default --approx-above: nothing said
    assert plain.returncode == 0 and not [w for w in _warnings(plain.stderr) if "has no effect" in w], plain.stderr


# ---- 4: extract --eval-seq-len without --eval ----------------------------------------------------------------------
def test_eval_options_without_eval_are_warned_and_recorded_null(pair, tmp_path):
    base, tuned = pair
    r = _cli(["extract", str(base), str(tuned), "--rank", "2", "--eval-seq-len", "7", "--no-plots", "-o", str(tmp_path / "x")])
    assert r.returncode == 0, r.stderr
    lines = [w for w in _warnings(r.stderr) if "--eval-seq-len" in w]
    assert len(lines) == 1 and "--eval" in lines[0].replace("--eval-seq-len", ""), r.stderr
    cfg = json.loads((tmp_path / "x" / "extract.json").read_text())["config"]
    assert cfg["eval_text"] is None and cfg["eval_seq_len"] is None and cfg["eval_blocks"] is None


# ---- 5: esd --plot-include --no-plots ---------------------------------------------------------------------------------
def test_plot_include_with_no_plots_is_warned(pair, tmp_path):
    base, _ = pair
    r = _cli(["esd", str(base), "--plot-include", "q_proj", "--no-plots", "-o", str(tmp_path / "e")])
    assert r.returncode == 0, r.stderr
    lines = [w for w in _warnings(r.stderr) if "--plot-include" in w]
    assert len(lines) == 1 and "--no-plots" in lines[0], r.stderr
    drawn = _cli(["esd", str(base), "--plot-include", "q_proj", "-o", str(tmp_path / "e2")])
    assert drawn.returncode == 0 and not [w for w in _warnings(drawn.stderr) if "--plot-include" in w], drawn.stderr


# ---- 6: a LoRA scale float32 cannot hold ---------------------------------------------------------------------------
def test_an_alpha_whose_scale_is_not_a_normal_float32_is_refused():
    from spectra.training import TrainConfig

    # scales 1e-320/16 (0 in float32), 6.25e-39 (subnormal), 1e39 (above float32's largest), 1e-37/√1024 (subnormal)
    for alpha, rank, rslora in ((1e-320, 16, False), (1e-37, 16, False), (1e39, 1, False), (1e-37, 1024, True)):
        with pytest.raises(ConfigError, match="--alpha"):
            TrainConfig(base="b", data="d", out="o", alpha=alpha, rank=rank, rslora=rslora)
    assert TrainConfig(base="b", data="d", out="o", alpha=1e-37, rank=16, rslora=True).resolved_alpha == 1e-37  # 2.5e-38
    assert TrainConfig(base="b", data="d", out="o", alpha=1e-320, method="full").method == "full"  # alpha does not apply


def test_train_refuses_a_vanishing_alpha_in_one_line(base_and_data, tmp_path):
    base, data = base_and_data
    r = _cli(["train", "--base", str(base), "--data", str(data), "--steps", "1", "--batch", "1", "--seq-len", "8",
              "--device", "cpu", "--trace-every", "0", "-o", str(tmp_path / "tr"), "--alpha", "1e-320"])
    assert r.returncode != 0
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "--alpha" in err[0], r.stderr
    assert not (tmp_path / "tr" / "adapter_config.json").exists()
