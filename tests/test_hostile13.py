"""Thirteenth round of hostile inputs (docs/bad_inputs.md, "thirteenth round"): each case failed, or
said less than the truth, on the code before it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra_cli.main import main

NAME = "model.layers.0.self_attn.q_proj.weight"


def _json(output: str) -> dict:
    return json.JSONDecoder().raw_decode(output[output.index("{"):])[0]


def _run(args: list[str]):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return r


def _folders(root: Path, weights: dict[str, torch.Tensor]) -> dict[str, Path]:
    """Each float64 weight saved as float32 ``NAME`` in ``root/<who>/model.safetensors``."""
    out = {}
    for who, w in weights.items():
        (root / who).mkdir(parents=True)
        save_file({NAME: w.float()}, root / who / "model.safetensors")
        out[who] = root / who
    return out


# ---- compare: one side zero, the other rounding noise --------------------------------------------------------
def test_compare_zero_and_rounding_noise_says_both(tmp_path):
    """A is an exact copy of the base (ΔW = 0), B only rounding noise: the reason said only that A is
    zero, as if B's update had been measured."""
    g = torch.Generator().manual_seed(3)
    W = 0.02 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    noise = W + 1e-9 * W.abs().max() * torch.randn(64, 64, generator=g, dtype=torch.float64)
    f = _folders(tmp_path, {"base": W, "same": W, "noise": noise})
    d = _json(_run(["compare", str(f["same"]), str(f["noise"]), "--base", str(f["base"]), "--json"]).output)
    (m,) = d["modules"]
    assert m["status"] == "zero_update" and m["fro_b"] > 0
    assert "ΔW of A is exactly zero" in m["reason"]
    assert "every singular value of B's update is at the rounding level of its float32 weights" in m["reason"]


def test_compare_finding_side_comes_from_the_ranks_not_the_reason_text():
    """The unresolved finding counted sides by searching the reason for "of A's": a record whose reason
    is worded otherwise (or absent, in a results.json of another version) was counted as B's."""
    from spectra.compare_findings import compare_findings
    from spectra.compare_records import ComparedModule, CompareResult

    mod = ComparedModule(name=NAME, layer=0, module="q_proj", role="attn", out=64, in_=64, rank_a=0, rank_b=3,
                         fro_a=1e-9, fro_b=1.0, status="unresolved", reason=None)
    res = CompareResult(a="a", b="b", base="base", kinds={"a": "full", "b": "full"}, config={"side": "right"}, modules=[mod])
    (found,) = [x for x in compare_findings(res) if x.topic == "unresolved"]
    assert found.numbers["by_side"] == {"A": 1}


# ---- numeric checks of one very long row -----------------------------------------------------------------------
_LONG_ROW = """
import resource, torch
from spectra.numerics import numeric_flags
n = 1 << 23
b = torch.randn(1, n); t = b + 1e-3 * torch.randn(1, n); d = t - b
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert numeric_flags(b, t, d, base_dtype="float32", tuned_dtype="float32", block=1 << 20) == []
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_numeric_checks_of_one_long_row_stay_within_blocks():
    """A 1×8M float32 update (32 MiB a side): the quantisation-grid check sorted whole sampled rows in
    float64 with their indices and the pass went a row at a time, ~15x the row's size; now blocks of
    columns and a column sample bound the temporaries."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _LONG_ROW], capture_output=True, text=True, timeout=300, check=True).stdout
    assert int(out.split()[-1]) < 3 * (1 << 23) * 4


def test_grid_check_on_a_column_sample_sees_a_dequantised_grid():
    """Rows longer than the column sample still read as quantised (int8 codes × scale) on one side."""
    from spectra.numerics import GRID_SAMPLE_COLS, numeric_flags

    g = torch.Generator().manual_seed(0)
    n = 3 * GRID_SAMPLE_COLS + 7
    base = torch.randn(2, n, generator=g)
    tuned = torch.randint(-127, 128, (2, n), generator=g).float() * 0.01
    (note,) = [x for x in numeric_flags(base, tuned, tuned - base, base_dtype="float32", tuned_dtype="float32")
               if x.code == "quantisation_grid"]
    assert "tuned appears quantised" in note.message


# ---- train: a step beyond reason is refused before the data is read ------------------------------------------
def test_train_step_size_refusal_comes_before_the_data(tmp_path):
    """--batch 1e20 was refused after the data was read and tokenised, with "(the data holds N training
    blocks)" counting only the pool read so far; a data file too short for one block was blamed first."""
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    (tmp_path / "data.txt").write_text("x", encoding="utf-8")
    r = CliRunner().invoke(main, ["train", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "data.txt"), "--steps", "1",
                                  "--batch", "100000000000000000000", "--seq-len", "16", "--device", "cpu", "-o", str(tmp_path / "run")])
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert "more tokens per step than 2,147,483,648" in " ".join(r.output.split()) and "training blocks" not in r.output, last
