"""``spectra train`` / ``spectra sweep`` (probe j, round 22).

1. ``--lr 1e-320`` (any lr float32 holds as 0 or a subnormal) trained nothing, exit 0, no warning; the API's
   TrainConfig / sweep likewise. Refused in one line, as ``--alpha`` is.
2. An interrupted sweep could not be resumed (``--force`` deleted its finished runs and retrained them);
   ``sweep --resume`` keeps the finished runs and analyses, trains the rest, and refuses other options.
3. The ``data_read`` note said "64× the blocks the run draws" when the count came from the held-out
   pool's floor (or the evaluation's share): it names the term that set the count.
4. ``TrainConfig(seq_len=1)`` passed and the error blamed the data; refused as ``--seq-len`` is (>= 8).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from spectra.errors import ConfigError
from tests.cli_util import cli as _cli
from tests.train_util import base_and_text

#: float32's smallest normal number, written out (2^-126), and its largest
F32_TINY, F32_MAX = 2.0**-126, float(np.finfo(np.float32).max)
SMALL = {"steps": 3, "batch": 2, "seq_len": 8, "device": "cpu", "trace_every": 0, "eval_every": 3, "eval_batches": 1}


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny byte-level Llama (no tokenizer files: bytes) and 60,000 bytes of prose."""
    return base_and_text(tmp_path_factory.mktemp("h22t"), 60_000)


# ---- 1: a learning rate float32 flushes to 0 -------------------------------------------------------------
@pytest.mark.parametrize("lr", [1e-320, 1e-39, 1.1e-38, 1.2e-38, 1e-30, 3e38, 3.5e38, 1e39])
def test_lr_outside_float32_normals_is_refused_by_train_config(lr):
    from spectra.training import TrainConfig

    with np.errstate(over="ignore"):  # 3.5e38 rounds to inf in float32: that is the point
        normal = bool(np.float32(lr) >= np.float32(F32_TINY)) and math.isfinite(float(np.float32(lr)))
    assert normal == (F32_TINY <= lr <= F32_MAX)
    if normal:
        assert TrainConfig(base="b", data="d", out="o", lr=lr).resolved_lr == lr
        return
    with pytest.raises(ConfigError) as exc:
        TrainConfig(base="b", data="d", out="o", lr=lr)
    assert "\n" not in str(exc.value)
    assert ("0 or subnormal in float32" if lr < F32_TINY else "infinite in float32") in exc.value.message


def test_cli_refuses_a_subnormal_lr_and_sweep_api_too(base_and_data, tmp_path):
    from spectra.training import sweep

    base, data = base_and_data
    assert np.float32(1e-320) == 0  # what AdamW's float32 step would multiply by
    r = _cli(["train", "--base", str(base), "--data", str(data), "--lr", "1e-320", "--steps", "1", "--seq-len", "8",
              "--device", "cpu", "--trace-every", "0", "-o", str(tmp_path / "t")])
    assert r.returncode == 2 and "Invalid value for '--lr': 1e-320 is 0 or subnormal in float32" in r.stderr
    assert not (tmp_path / "t").exists()
    with pytest.raises(ConfigError, match="--lr 1e-320 is 0 or subnormal"):
        sweep(str(base), str(data), str(tmp_path / "sw"), methods=["full"], ranks=[], lr=1e-320, **SMALL)
    assert not (tmp_path / "sw").exists()


# ---- 4: seq_len below --seq-len's minimum ----------------------------------------------------------------
@pytest.mark.parametrize("seq_len", [0, 1, 7])
def test_train_config_refuses_seq_len_below_eight(seq_len):
    from spectra.training import TrainConfig

    with pytest.raises(ConfigError) as exc:
        TrainConfig(base="b", data="d", out="o", seq_len=seq_len)
    assert exc.value.message == f"seq_len must be >= 8 tokens. Got {seq_len} instead"
    assert TrainConfig(base="b", data="d", out="o", seq_len=8).seq_len == 8


# ---- 3: the data_read note names the term that set the count ---------------------------------------------
@pytest.mark.parametrize(("kw", "blocks", "says"), [
    ({"steps": 1}, 2048, "the 2048 blocks the held-out split is drawn from"),  # 64·1/0.9 = 72, 4/0.1 = 40
    ({"steps": 33}, math.ceil(64 * 33 / 0.9), "64× the blocks the run draws"),  # 2346.7 > 2048
    ({"steps": 1, "holdout": 0.01, "eval_batches": 30}, 3000, "enough that its held-out share (0.01) holds the 30 blocks"),
])
def test_data_read_note_names_the_term_that_set_the_count(base_and_data, tmp_path, kw, blocks, says):
    from spectra.training import TrainConfig, train

    base, data = base_and_data
    assert blocks * 8 < 60_000  # the file holds more than the run reads: the note is written
    cfg = TrainConfig(base=str(base), data=str(data), out=str(tmp_path / "r"), batch=1, seq_len=8, device="cpu",
                      trace_every=0, eval_every=100, **{"eval_batches": 1, **kw})
    train(cfg)
    read = json.loads((tmp_path / "r" / "train_config.json").read_text())["data_read"]
    assert read["blocks"] == blocks and read["tokens"] == blocks * 8
    assert says in read["note"] and ("64×" in read["note"]) == ("64×" in says)


# ---- 2: resuming an interrupted sweep --------------------------------------------------------------------
def _adapter(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


def test_sweep_resume_keeps_finished_runs_and_matches_an_uninterrupted_sweep(base_and_data, tmp_path):
    from spectra.training import sweep

    base, data = base_and_data
    args = (str(base), str(data))
    ref = sweep(*args, str(tmp_path / "ref"), methods=["lora", "full"], ranks=[2], **SMALL)

    def stop_in_lora(name: str, rec: dict) -> None:
        if name == "lora2" and rec["step"] == 3:
            raise KeyboardInterrupt

    out = tmp_path / "sw"
    with pytest.raises(KeyboardInterrupt):
        sweep(*args, str(out), methods=["lora", "full"], ranks=[2], callback=stop_in_lora, **SMALL)
    assert (out / "full" / "train_summary.json").is_file() and not (out / "lora2" / "train_summary.json").exists()
    full_mtime = (out / "full" / "model.safetensors").stat().st_mtime_ns

    with pytest.raises(ConfigError) as exc:  # other options: one line naming the option
        sweep(*args, str(out), methods=["lora", "full"], ranks=[2], resume=True, **{**SMALL, "steps": 4})
    assert "\n" not in str(exc.value) and "was started with steps 3, this one has 4" in exc.value.message
    with pytest.raises(ConfigError, match="--force deletes the finished runs that --resume keeps"):
        sweep(*args, str(out), methods=["lora", "full"], ranks=[2], resume=True, force=True, **SMALL)

    trained: list[str] = []
    doc = sweep(*args, str(out), methods=["lora", "full"], ranks=[2], resume=True,
                callback=lambda n, r: trained.append(n), **SMALL)
    assert set(trained) == {"lora2"}  # the finished full run was kept, not retrained
    assert (out / "full" / "model.safetensors").stat().st_mtime_ns == full_mtime
    assert sorted(doc["diffs"]) == ["full", "lora2"] and sorted(doc["compares"]) == ["lora2_vs_full"]
    for name in ("full", "lora2"):
        assert doc["runs"][name]["target_loss"] == pytest.approx(ref["runs"][name]["target_loss"], rel=1e-6, abs=0)
    a, b = _adapter(out / "lora2"), _adapter(tmp_path / "ref" / "lora2")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-6, atol=0) for k in a)
    assert json.loads((out / "sweep.json").read_text())["runs"] == doc["runs"]
    for sub in ("analysis/diff_lora2/results.json", "analysis/compare_lora2_vs_full/compare.json"):
        assert (out / sub).is_file()


def test_sweep_resume_redoes_only_missing_analyses(base_and_data, tmp_path, monkeypatch):
    import spectra.training as training

    base, data = base_and_data
    out = tmp_path / "sw"
    real = training.compare

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "compare", stop)
    with pytest.raises(KeyboardInterrupt):
        training.sweep(str(base), str(data), str(out), methods=["lora", "full"], ranks=[2], **SMALL)
    monkeypatch.setattr(training, "compare", real)
    kept = {n: (out / "analysis" / f"diff_{n}" / "results.json").stat().st_mtime_ns for n in ("full", "lora2")}
    trained: list[str] = []
    doc = training.sweep(str(base), str(data), str(out), methods=["lora", "full"], ranks=[2], resume=True,
                         callback=lambda n, r: trained.append(n), **SMALL)
    assert trained == [] and sorted(doc["compares"]) == ["lora2_vs_full"]
    assert {n: (out / "analysis" / f"diff_{n}" / "results.json").stat().st_mtime_ns for n in kept} == kept
    assert json.loads((out / "analysis" / "compare_lora2_vs_full" / "compare.json").read_text())["modules"]


def test_sweep_resume_refuses_a_folder_no_sweep_recorded(base_and_data, tmp_path):
    from spectra.training import sweep

    base, data = base_and_data
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as exc:
        sweep(str(base), str(data), str(tmp_path / "sw"), methods=["full"], ranks=[], resume=True, **SMALL)
    assert "holds no readable sweep_options.json" in exc.value.message and "\n" not in str(exc.value)
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["notes.txt"]


def test_sweep_stop_note_offers_resume_and_cli_refuses_force_with_resume(base_and_data, tmp_path):
    from spectra_cli.training import sweep_cmd

    _sweep_stop_note = sweep_cmd.stop_note  # what a stopped sweep says (spectra_cli.main.kept_on_stop)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "train_summary.json").write_text("{}")
    note = _sweep_stop_note({"out_dir": str(tmp_path)}, 0.0)
    assert note.startswith(f"the finished runs (full) are in {tmp_path}; ")
    assert "--resume to finish the sweep" in note and "--force deletes the finished runs" in note
    base, data = base_and_data
    r = _cli(["sweep", "--base", str(base), "--data", str(data), "--methods", "full", "--force", "--resume",
              "-o", str(tmp_path / "x")])
    assert r.returncode == 2 and "--force deletes the finished runs that --resume keeps" in r.stderr
