"""Thirty-eighth round: an adapter whose output head is trained whole (PEFT's ``modules_to_save``) beside its LoRA
matrices, through diff's heatmap, extract's totals and recommend (docs/bad_inputs.md, "thirty-eighth round")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cli_util import cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("saved38")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                             peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or ("modules_to_save" in n and n.endswith("weight")):  # the head's trained copy too
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(root / "lora")
    return root / "base", root / "lora"


def test_the_heatmap_keeps_the_adapter_view_and_extract_names_the_share(pair, tmp_path):
    from spectra.plots import diff as diff_plots
    from spectra.results import DiffResult

    base, lora = pair
    assert cli(["diff", str(base), str(lora), "--out", str(tmp_path / "d"), "--no-plots"]).returncode == 0
    res = DiffResult.load(tmp_path / "d" / "results.json")
    head = next(m for m in res.modules if m.name == "lm_head.weight")
    assert head.lora_r is None and head.layer is None  # saved whole, outside the layer grid
    assert diff_plots.is_adapter(res)  # one saved head turned every cell into energy_rank / p
    # extract: the totals' energy kept is of the LoRA matrices; with the head kept whole, energy_kept_all is more
    run = cli(["extract", str(base), str(lora), "--rank", "4", "--save-modules", "--out", str(tmp_path / "x")])
    assert run.returncode == 0, run.stderr
    totals = json.loads((tmp_path / "x" / "extract.json").read_text())["totals"]
    assert totals["energy_kept_all"] > totals["energy_kept"] + 1e-3 and totals["not_extracted_energy_share"] == 0.0
    said = " ".join(run.stdout.split())
    assert "share of all of ΔW's energy)" not in said and "share of the extracted matrices' ΔW energy; with the modules saved " \
        f"whole, {totals['energy_kept_all']:.4f} of all of ΔW's energy" in said, said
    run = cli(["extract", str(base), str(lora), "--rank", "4", "--out", str(tmp_path / "y")])
    assert run.returncode == 0 and "1 changed saved module is not in the adapter" in " ".join(run.stderr.split()), run.stderr
    # recommend: the head is left out of the LoRA config as the adapter trained it: said so, not "pass --embeddings" alone
    rec = cli(["recommend", str(tmp_path / "d" / "results.json"), "--energy", "0.9"])
    assert rec.returncode == 0, rec.stderr
    assert "the adapter trained whole (modules_to_save)" in " ".join(rec.stderr.split()), rec.stderr


def test_the_size_warning_counts_the_far_matrices_outside_the_layers():
    import numpy as np

    from spectra.findings import diff_findings
    from spectra.results import DiffResult
    from tests.test_findings import _module

    S = np.array([1.0, 0.5, 0.25])
    mods = [_module(f"model.layers.{i}.mlp.up_proj.weight", i, "up_proj", S, (3, 3), base_fro=f, role="up")
            for i, f in enumerate((40.0, 30.0, 0.7, 40.0))]
    mods.append(_module("model.embed_tokens.weight", None, "embed_tokens", S, (3, 3), base_fro=0.3, role="embed"))
    res = DiffResult(base="b", tuned="t", thresholds=[0.5, 0.9, 0.99], modules=mods, complete=True)
    text = " ".join(f.text for f in diff_findings(res))
    assert "2 of 5 matrices moved by their own norm or more (in layer 2, and 1 outside the layer stack)" in text, text
    assert "e.g. model.embed_tokens.weight" in text
