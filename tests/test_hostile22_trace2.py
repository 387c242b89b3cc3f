"""Twenty-second round, ``spectra trace`` as a new user meets it: checkpoints that hold the base's weights (ΔW = 0 at
every checkpoint) exit 3 with one line, as ``diff``, ``compare`` and ``interfere`` do for identical inputs, while a run
identical to the base at step 0 only is a trace (exit 0); one weights file given as the checkpoints is refused, as one
checkpoint folder is, rather than traced as a one-point trace (of the base against itself, given the base's file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from spectra.errors import ConfigError
from spectra.trace_inputs import find_checkpoints
from tests.cli_util import cli

D = 12
NAMES = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")]
ZERO_LINE = ("error: {where}ΔW = 0 at every checkpoint: they hold the base's weights{lora} (check that you passed the "
             "fine-tuned checkpoints; --allow-identical accepts this; results were still written to {out})")


def _write(folder: Path, weights: dict[str, torch.Tensor], step: int | None) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if step is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def _base(root: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(D, D, generator=g) for n in NAMES}
    _write(root / "base", base, None)
    return base


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _fro64(base: Path, ckpt: Path) -> dict[str, float]:
    """‖W_ckpt − W_base‖_F per matrix, in float64 numpy from the files."""
    a, b = load_file(str(base / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    return {n: float(np.linalg.norm(b[n].astype(np.float64) - a[n].astype(np.float64))) for n in NAMES}


def test_checkpoints_that_hold_the_base_exit_3_and_a_run_equal_to_it_at_step_0_only_exits_0(tmp_path):
    """Copies of the base traced as checkpoints gave exit 0, a table of dashes and no warning; diff, compare and
    interfere exit 3 on such inputs. Step 0 equal to the base (a run's first save) is no such case."""
    base = _base(tmp_path)
    run = tmp_path / "run"
    for s in (10, 20):
        shutil.copytree(tmp_path / "base", run / f"checkpoint-{s}")
        (run / f"checkpoint-{s}" / "trainer_state.json").write_text(json.dumps({"global_step": s, "log_history": []}))
    out = tmp_path / "t"
    proc = cli(["trace", str(tmp_path / "base"), str(run), "-o", str(out), "--no-plots"])
    assert proc.returncode == 3, proc.stderr
    assert _errors(proc.stderr) == [ZERO_LINE.format(where=f"{run}: ", lora="", out=out)], proc.stderr
    doc = json.loads((out / "trace.json").read_text())  # results still written, the warning in them
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20]
    assert all(_fro64(tmp_path / "base", run / f"checkpoint-{s}")[n] == 0.0 for s in (10, 20) for n in NAMES)
    assert {(m["name"], pt["fro_norm"]) for m in doc["matrices"] for pt in m["points"]} == {(n, 0.0) for n in NAMES}
    assert ("ΔW = 0 at every checkpoint: they hold the base's weights; check that you passed the fine-tuned "
            "checkpoints") in doc["warnings"], doc["warnings"]
    allowed = cli(["trace", str(tmp_path / "base"), str(run), "-o", str(tmp_path / "t2"), "--no-plots", "--allow-identical"])
    assert allowed.returncode == 0 and not _errors(allowed.stderr), allowed.stderr
    # listed checkpoints: the same, the base and the count named (no run folder)
    listed = cli(["trace", str(tmp_path / "base"), str(run / "checkpoint-10"), str(run / "checkpoint-20"), "--no-plots"])
    assert listed.returncode == 3 and _errors(listed.stderr) == [
        ZERO_LINE.format(where=f"{tmp_path / 'base'} vs 2 checkpoints: ", lora="", out="").replace(
            "; results were still written to ", "")], listed.stderr
    # a selection: only the matrices selected are said to be unchanged (those left out may have moved)
    chosen = cli(["trace", str(tmp_path / "base"), str(run), "--include", "mlp", "--no-plots"])
    assert chosen.returncode == 3 and _errors(chosen.stderr)[0].startswith(
        f"error: {run}: ΔW = 0 at every checkpoint for each of the 2 matrices selected (--include, --exclude, --layers)")

    # a run whose step 0 is the base and whose step 10 moved: a trace, exit 0, ‖ΔW‖ as numpy says
    g = torch.Generator().manual_seed(1)
    _write(tmp_path / "r2" / "checkpoint-0", base, 0)
    _write(tmp_path / "r2" / "checkpoint-10", {n: w + 0.01 * torch.randn(D, D, generator=g) for n, w in base.items()}, 10)
    ok = cli(["trace", str(tmp_path / "base"), str(tmp_path / "r2"), "-o", str(tmp_path / "t3"), "--no-plots"])
    assert ok.returncode == 0 and not _errors(ok.stderr), ok.stderr
    doc = json.loads((tmp_path / "t3" / "trace.json").read_text())
    want = _fro64(tmp_path / "base", tmp_path / "r2" / "checkpoint-10")
    for m in doc["matrices"]:
        assert m["points"][0]["fro_norm"] == 0.0
        assert m["points"][1]["fro_norm"] == pytest.approx(want[m["name"]], rel=1e-6) and want[m["name"]] > 0.05
    assert not any("ΔW = 0" in w for w in doc["warnings"]), doc["warnings"]


def test_a_failed_checkpoint_beside_copies_of_the_base_still_exits_3(tmp_path):
    """The checkpoints that were traced all hold the base's weights; one of another model (marked failed) measures
    nothing, so it does not make the run a trace."""
    _base(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "base", run / "checkpoint-10")
    g = torch.Generator().manual_seed(2)
    _write(run / "checkpoint-20", {n: torch.randn(D + 4, D, generator=g) for n in NAMES}, 20)  # another model's shapes
    (run / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    proc = cli(["trace", str(tmp_path / "base"), str(run), "-o", str(tmp_path / "t"), "--no-plots"])
    assert proc.returncode == 3, proc.stderr
    assert _errors(proc.stderr) == [ZERO_LINE.format(where=f"{run}: ", lora="", out=tmp_path / "t").replace(
        "at every checkpoint", "at every checkpoint not marked failed")], proc.stderr
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert [bool(c["failed"]) for c in doc["checkpoints"]] == [False, True], doc["checkpoints"]


def test_adapters_saved_at_initialisation_exit_3_saying_so(tmp_path):
    """LoRA checkpoints with B = 0 (s·B·A = 0 exactly): the adapters hold no update."""
    g = torch.Generator().manual_seed(0)
    W = {n: torch.randn(D, D, generator=g) for n in NAMES if "q_proj" in n}
    save_file(W, str(tmp_path / "base.safetensors"))
    for s in (5, 10):
        folder = tmp_path / "run" / f"checkpoint-{s}"
        folder.mkdir(parents=True)
        sd = {}
        for k in W:
            m = "base_model.model." + k.removesuffix(".weight")
            sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"] = torch.randn(4, D, generator=g), torch.zeros(D, 4)
        save_file(sd, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": s, "log_history": []}))
    proc = cli(["trace", str(tmp_path / "base.safetensors"), str(tmp_path / "run"), "-o", str(tmp_path / "t"), "--no-plots"])
    assert proc.returncode == 3, proc.stderr
    assert _errors(proc.stderr) == [ZERO_LINE.format(where=f"{tmp_path / 'run'}: ", out=tmp_path / "t",
                                                     lora=" (adapters saved at initialisation, with B = 0?)")], proc.stderr
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert doc["kind"] == "lora" and [pt["fro_norm"] for m in doc["matrices"] for pt in m["points"]] == [0.0] * 4


@pytest.mark.parametrize("which", ["tuned", "base"])
def test_one_weights_file_is_refused_as_one_checkpoint_folder_is(tmp_path, which):
    """`spectra trace base tuned` was refused ("one checkpoint is not a trace") but `spectra trace base
    tuned/model.safetensors` was traced as a one-point trace, and `spectra trace base base/model.safetensors` traced
    the base against itself, exit 0."""
    base = _base(tmp_path)
    _write(tmp_path / "tuned", {n: w + 0.01 for n, w in base.items()}, None)
    weights = tmp_path / which / "model.safetensors"
    for arg in (tmp_path / which, weights):
        proc = cli(["trace", str(tmp_path / "base"), str(arg), "-o", str(tmp_path / "t"), "--no-plots"])
        assert proc.returncode == 1, proc.stderr
        assert _errors(proc.stderr) == [f"error: {arg}: one checkpoint is not a trace (pass a run folder with "
                                        "checkpoint-N folders, or two or more checkpoints in order)"], proc.stderr
    assert not (tmp_path / "t" / "trace.json").exists()
    with pytest.raises(ConfigError, match="one checkpoint is not a trace"):
        find_checkpoints([str(weights)])
    # two weights files are a trace (listed checkpoints may be files), exit 0
    two = cli(["trace", str(tmp_path / "base"), str(tmp_path / "base" / "model.safetensors"),
               str(tmp_path / "tuned" / "model.safetensors"), "--no-plots"])
    assert two.returncode == 0 and not _errors(two.stderr), two.stderr


def test_diff_of_a_selection_that_did_not_change_does_not_say_the_weights_are_the_same(tmp_path):
    """Review: `diff --include mlp` of a fine-tune of q_proj only said "base and tuned hold the same weights"."""
    w = _base(tmp_path)
    g = torch.Generator().manual_seed(3)
    _write(tmp_path / "tuned", {n: v + (0.1 * torch.randn(v.shape, generator=g) if "q_proj" in n else 0) for n, v in w.items()},
           None)
    proc = cli(["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--include", "mlp", "--no-plots"])
    assert proc.returncode == 3
    line = _errors(proc.stderr)[-1]
    assert "each of the 2 matrices selected (--include, --exclude, --layers) has ΔW = 0" in line and "same weights" not in line
    whole = cli(["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--no-plots", "--json"])
    assert whole.returncode == 0  # the unselected q_proj moved: ‖ΔW‖_F as float64 numpy
    rows = {m["name"]: m for m in json.loads(whole.stdout)["modules"]}
    t = load_file(str(tmp_path / "tuned" / "model.safetensors"))  # numpy arrays
    for n in NAMES:
        want = float(np.linalg.norm(t[n].astype(np.float64) - w[n].double().numpy()))
        assert rows[n]["fro_norm"] == pytest.approx(want, abs=1e-6)
