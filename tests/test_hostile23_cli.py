"""Twenty-third round, a new user's walk (docs/bad_inputs.md, "twenty-third round"): inspect of an adapter, the demo's
forgetting sentence, --eval's errors, odd option values and an output on a file system that makes no files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cli_util import cli


def _adapter(root: Path) -> tuple[Path, Path]:
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(root / "base")
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(root / "base"),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all",
                                             rank_pattern={"v_proj": 2}))
    pm.save_pretrained(root / "lora")
    return root / "base", root / "lora"


def test_inspect_lists_an_adapters_modules_with_their_rank_and_scale(tmp_path):
    """`spectra inspect ADAPTER` refused with diff's advice ('an adapter goes second: spectra diff BASE ADAPTER')."""
    _, lora = _adapter(tmp_path)
    r = cli(["inspect", str(lora), "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 4 and {x["module"] for x in rows} == {"q_proj", "v_proj"}
    for x in rows:  # PEFT's scale: lora_alpha / r after rank_pattern; v_proj's update is (kv heads · head dim) × hidden
        r_ = 2 if x["module"] == "v_proj" else 4
        assert x["r"] == r_ and x["scale"] == pytest.approx(8 / r_) and x["shape"] == ([16, 32] if r_ == 2 else [32, 32])
    assert "a bias the adapter trained" in r.stderr  # bias="all": the k_proj biases are said for what they are
    table = cli(["inspect", str(lora)], cwd=tmp_path)
    assert table.returncode == 0 and "4 LoRA modules listed" in table.stderr and "(PEFT adapter)" in table.stdout


def test_inspect_says_how_many_tensors_it_does_not_list(tmp_path):
    base, _ = _adapter(tmp_path)
    r = cli(["inspect", str(base)], cwd=tmp_path)
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        n = len(list(f.keys()))
    listed = int(r.stderr.split(" tensors listed")[0].split(", ")[-1])
    assert r.returncode == 0 and f"({n - listed} more, not matrices spectra analyses: --all lists them)" in r.stderr, r.stderr


def test_eval_errors_name_the_bad_file_and_no_blocks_advice(tmp_path):
    """A bad --eval JSONL line was reported against the folder holding it, with the hint for too short a text."""
    from tests.train_util import byte_llama_pair

    base, tuned = byte_llama_pair(tmp_path, lambda n, t: t * 1.01)
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "a.jsonl").write_text('{"foo": 1}\n')
    for target in (tmp_path / "ev", tmp_path / "ev" / "a.jsonl"):
        r = cli(["extract", str(base), str(tuned), "--rank", "2", "--eval", str(target), "--out", str(tmp_path / "x")],
                cwd=tmp_path)
        err = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and "a.jsonl: --eval: line 1 has neither a text field" in err, err
        assert "--eval-seq-len" not in err and "longer text" not in err


def test_odd_option_values_are_refused(tmp_path):
    from tests.pair_util import small_pair

    base, tuned = small_pair(tmp_path)
    assert cli(["diff", base, tuned, "--out", str(tmp_path / "d"), "--no-plots"], cwd=tmp_path).returncode == 0
    r = cli(["report", str(tmp_path / "d"), "-o", str(tmp_path / "r.html"), "--title", "  "], cwd=tmp_path)
    assert r.returncode == 2 and "--title" in r.stderr and not (tmp_path / "r.html").exists()
    r = cli(["diff", base, tuned, "--layers", "١", "--json"], cwd=tmp_path)  # an Arabic-Indic one selected layer 1
    assert r.returncode != 0 and "--layers must look like" in r.stderr, r.stderr
    if Path("/proc").is_dir():
        r = cli(["report", str(tmp_path / "d"), "-o", "/proc/x.html"], cwd=tmp_path)
        assert r.returncode == 1 and "was removed" not in r.stderr and "does not create files there" in r.stderr, r.stderr


def test_the_demo_says_neither_forgot_when_both_source_losses_fell():
    """'did not forget less' where both runs' source loss fell below the base's (neither forgot)."""
    from spectra.demo import forgetting_text

    assert forgetting_text(3.422, 3.301, 3.360).startswith("neither forgot")
    assert forgetting_text(1.394, 1.575, 1.546).startswith("LoRA r=8 forgot less than full fine-tuning")
    assert forgetting_text(1.394, 1.575, 1.600).startswith("LoRA r=8 forgot no less")
    assert forgetting_text(1.394, 1.575, 1.300).startswith("only full fine-tuning forgot")
