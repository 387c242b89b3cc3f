"""Thirty-fifth round, extract and recommend with a PEFT adapter as input: its trained biases (``bias="lora_only"``,
``lora_bias=True``) are kept or listed, a rank above the adapter's is said, a budget remainder is blamed on the budget,
other adapters of the folder, the output head and an unchanged saved head are handled as for a full fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cli_util import cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _base(folder: Path, bias: bool = True) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, attention_bias=bias)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _adapter(base: Path, folder: Path, *, zero_cols: int = 0, second: bool = False, **kw) -> Path:
    """A PEFT adapter of ``base`` made by PEFT, its ``lora_B`` (and trained biases) filled with random values;
    ``zero_cols``: that many columns of each lora_B left zero (an update of lower rank than r)."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), peft.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n and n.endswith("weight"):
                p.normal_(0, 0.05)
                if zero_cols:
                    p[:, -zero_cols:] = 0
            elif p.requires_grad and n.endswith("bias"):  # lora_B.bias, or a bias bias="lora_only" trains
                p.add_(0.05 * torch.randn_like(p))
    if second:
        pm.add_adapter("second", peft.LoraConfig(**kw))
    pm.save_pretrained(folder)
    return folder


def _merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    m = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float64), adapter)
    return {k: v.detach().clone() for k, v in m.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ex35")
    _base(root / "baseb")
    _adapter(root / "baseb", root / "lora_only", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only")
    _adapter(root / "baseb", root / "lora_bias", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
    return root


@pytest.mark.parametrize("kind", ["lora_only", "lora_bias"])
def test_an_adapters_trained_biases_are_kept_with_save_modules_and_listed_without(models, kind, tmp_path):
    """bias="lora_only": extract exited 0 with nothing in not_lora, and PEFT's merge of the written adapter had the base
    biases (relative error 1.0 on each); lora_bias=True: its biases listed as "matrices that changed not extracted" with
    shape [], and dropped even with --save-modules. Now both are listed as biases, and --save-modules writes them as
    lora_B.bias: the merges agree."""
    base, adapter = models / "baseb", models / kind
    res = cli(["extract", str(base), str(adapter), "-r", "4", "-o", str(tmp_path / "plain")])
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "plain" / "extract.json").read_text())
    biases = [r for r in doc["not_lora"] if r["kind"] == "bias"]
    assert len(biases) == 4 and all(r["held"] is None and r["shape"] == [r["shape"][0]] and r["fro_norm"] > 0 for r in biases)
    assert not doc["not_extracted"] and "changed norms/biases are not in the adapter" in res.stderr
    res = cli(["extract", str(base), str(adapter), "-r", "4", "--save-modules", "-o", str(tmp_path / "kept")])
    assert res.returncode == 0, res.stderr
    want, got = _merged(base, adapter), _merged(base, tmp_path / "kept")
    for name in want:
        if name.endswith("bias") or "_proj.weight" in name:
            assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), name
    assert any(not torch.equal(want[n], transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float64).state_dict()[n])
               for n in want if n.endswith("q_proj.bias"))  # the biases did change


def test_a_rank_above_the_adapters_says_its_components_are_zeros(tmp_path):
    """An r = 8 adapter whose update has rank 2, extracted at --rank 3: every third column of lora_B was 0, unsaid
    (a full fine-tune of rank 3 at --rank 5 gets a note and a warning)."""
    base = _base(tmp_path / "base", bias=False)
    _adapter(base, tmp_path / "a", zero_cols=6, r=8, lora_alpha=16, target_modules=["q_proj"])
    res = cli(["extract", str(base), str(tmp_path / "a"), "-r", "3", "-o", str(tmp_path / "x")])
    assert res.returncode == 0, res.stderr
    assert "--rank 3 is above the rank of the adapter's update s·B·A in 2 modules" in " ".join(res.stderr.split())
    doc = json.loads((tmp_path / "x" / "extract.json").read_text())
    assert all("only 2 of its 3 components are nonzero" in m["note"] for m in doc["modules"])


def test_adapter_folder_notes_head_rule_and_unchanged_saved_head(tmp_path):
    """A folder with a second adapter in a sub-folder was read as its root one without a word; lm_head was extracted
    from an adapter without --embeddings (a full fine-tune's is refused without it); an unchanged modules_to_save head
    was counted as a changed "norm/bias" and written whole."""
    base = _base(tmp_path / "base", bias=False)
    _adapter(base, tmp_path / "multi", second=True, r=2, lora_alpha=4, target_modules=["q_proj"])
    res = cli(["extract", str(base), str(tmp_path / "multi"), "-r", "2", "-o", str(tmp_path / "x1")])
    assert res.returncode == 0 and "also holds PEFT adapters in sub-folders (second)" in res.stderr, res.stderr
    _adapter(base, tmp_path / "head", r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    res = cli(["extract", str(base), str(tmp_path / "head"), "-r", "2", "-o", str(tmp_path / "x2")])
    assert res.returncode == 0, res.stderr
    left = {r["name"]: r["reason"] for r in json.loads((tmp_path / "x2" / "extract.json").read_text())["not_extracted"]}
    assert left == {"lm_head.weight": "output head: pass --embeddings to extract it (as PEFT's LoRA)"}
    _adapter(base, tmp_path / "mts", r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    res = cli(["extract", str(base), str(tmp_path / "mts"), "-r", "2", "--save-modules", "-o", str(tmp_path / "x3")])
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "x3" / "extract.json").read_text())
    assert not doc["not_lora"] and "norms/biases" not in res.stderr  # the saved head equals the base's


def test_a_budget_remainder_is_the_budgets_doing_not_a_cap(tmp_path):
    """--budget 50 with components of 64 parameters and no --max-rank: "5 modules are at the largest rank --max-rank /
    --serving allows (e.g. … at r = 0)". The remainder is less than the next component: said so."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    W = {n: torch.randn(32, 32, generator=g) for n in names}
    save_file(W, tmp_path / "b.safetensors")
    save_file({n: w + 0.05 * torch.randn(32, 32, generator=g) for n, w in W.items()}, tmp_path / "t.safetensors")
    res = cli(["extract", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "-b", "100", "-o", str(tmp_path / "x")])
    text = " ".join(res.stderr.split())
    assert res.returncode == 0, res.stderr
    assert "the 36 left are less than the next resolved component" in text and "--max-rank" not in text, text


def test_recommend_from_an_adapter_diff_excludes_none_of_its_targets(tmp_path):
    """A diff of an adapter on the embedding and head lists PEFT's base_layer copies as skipped: recommend turned them
    into exclude_modules naming the very modules it targets (base_model.model.lm_head beside target lm_head)."""
    base = _base(tmp_path / "base", bias=False)
    _adapter(base, tmp_path / "emb", r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens", "lm_head"])
    assert cli(["diff", str(base), str(tmp_path / "emb"), "--no-plots", "--out", str(tmp_path / "d")]).returncode == 0
    res = cli(["recommend", str(tmp_path / "d" / "results.json"), "-e", "0.9", "--embeddings", "-o", str(tmp_path / "cfg.json")])
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert "lm_head" in cfg["target_modules"] and not cfg.get("exclude_modules"), cfg
