"""The thirty-ninth round's probe of extract and recommend on MoE models against PEFT 0.22's (and 0.21's) own loading
(docs/bad_inputs.md, "PEFT 0.22"): a selection that keeps part of a layer's experts' projections, the parameters PEFT
builds, what an earlier PEFT drops of an adapter written by 0.22's rules, and --save-modules outside the selection."""

from __future__ import annotations

import json

import pytest
import torch

from spectra import DiffConfig, diff
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.peft_releases import release
from spectra.recommend import recommend
from tests.test_hostile8_moe import _moe_pair

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
_MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2}


def _state(path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().items()}


def _merged(base, adapter) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT's merged state dict (float64) and the LoRA parameters it built."""
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    built = sum(v.numel() for k, v in model.named_parameters() if "lora_" in k)
    return {k: v.double() for k, v in model.merge_and_unload().state_dict().items()}, built


@pytest.mark.parametrize("option,rows,others", [
    # w1 and w3 fused in gate_up_proj (gate rows first), w2 the down_proj: the selected rows of each stack, and whether
    # the other matrices (attention, router, embeddings) are selected
    ({"exclude": "w2"}, {"gate_up_proj": slice(None), "down_proj": slice(0, 0)}, True),
    ({"include": "w1"}, {"gate_up_proj": slice(0, 48), "down_proj": slice(0, 0)}, False),
])
def test_extract_of_part_of_the_experts_projections_loads_as_claimed(tmp_path, option, rows, others):
    """--exclude w2: PEFT nests the fused gate/up LoRA under down's; without down it loaded none of it (the energy 0.58
    claimed, 0.11 loaded). --include w1: PEFT refuses w1 without w3 ("Cannot convert PEFT target(s) w1 without also
    targeting w3"). The projections left out are written with zero factors, counted, and said."""
    base, tuned = _moe_pair(tmp_path, "mixtral", **_MIXTRAL)
    res = extract(str(base), str(tuned), tmp_path / "ad", config=ExtractConfig(rank=4, **option), plots=False)
    (b, t), (m, built) = (_state(base), _state(tuned)), _merged(base, tmp_path / "ad")
    tot = miss = 0.0
    for k in (k for k in b if b[k].dim() == 2 and others):
        tot += float(((t[k] - b[k]) ** 2).sum())
        miss += float(((t[k] - m[k]) ** 2).sum())
    for k in (k for k in b if ".experts." in k):
        sel = rows[k.rpartition(".")[2]]
        d, got = t[k] - b[k], m[k] - b[k]
        tot += float((d[:, sel] ** 2).sum())
        miss += float(((d[:, sel] - got[:, sel]) ** 2).sum())
        outside = torch.ones(d.shape[1], dtype=torch.bool)
        outside[sel] = False
        assert torch.equal(m[k][:, outside], b[k][:, outside]), k  # the rows left out: the base's
    assert 1 - miss / tot == pytest.approx(res.totals["energy_kept_all"], abs=2e-4)
    assert res.totals["params"] == built, (res.totals["params"], built)
    assert any("written with zero factors" in w for w in res.warnings), res.warnings


def test_recommend_adds_the_projection_peft_fuses_with_a_measured_one(tmp_path):
    """A diff of w1 alone: the config named w1 without w3, which get_peft_model refuses under PEFT 0.21 and 0.22."""
    base, tuned = _moe_pair(tmp_path, "mixtral", **_MIXTRAL)
    diff(str(base), str(tuned), out_dir=tmp_path / "d", plots=False, config=DiffConfig(include="w1"))
    rec = recommend(tmp_path / "d" / "results.json", energy=0.9)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**rec.config))
    assert sum(v.numel() for k, v in model.named_parameters() if "lora_" in k) == rec.params
    assert any("fused with a measured one" in n for n in rec.notes), rec.notes


def test_an_adapter_written_by_peft_022_rules_says_what_earlier_releases_drop(tmp_path):
    """Qwen2-MoE's experts and shared expert are written by PEFT 0.22's rules; PEFT 0.21 drops them on load (0.915 of
    the energy under 0.22, 0.445 under 0.21), and nothing said so."""
    base, tuned = _moe_pair(tmp_path, "qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                            shared_expert_intermediate_size=40)
    res = extract(str(base), str(tuned), tmp_path / "ad", config=ExtractConfig(energy=0.9), plots=False)
    said = [w for w in res.warnings if "PEFT before 0.22 drops" in w]
    if release(peft.__version__) < (0, 22):  # PEFT < 0.22 installed: its own rules, nothing lost under it
        assert not said
    else:
        assert len(said) == 1 and "load it with PEFT >= 0.22" in said[0], res.warnings


def test_save_modules_keeps_only_the_selected_layers_norms(tmp_path):
    """extract --layers 0 --save-modules listed layer 1's norms and the final norm in modules_to_save, with the tuned
    values: PEFT changed weights outside the selection."""
    base, tuned = _moe_pair(tmp_path, "mixtral", **_MIXTRAL)
    extract(str(base), str(tuned), tmp_path / "ad", config=ExtractConfig(rank=2, layers="0", save_modules=True), plots=False)
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["modules_to_save"] or []
    assert saved and all(s.startswith("model.layers.0.") for s in saved), saved
    b, (m, _) = _state(base), _merged(base, tmp_path / "ad")
    assert [k for k in b if ".layers.0." not in k and not torch.equal(m[k], b[k])] == []


def test_a_config_made_by_peft_022_rules_says_what_earlier_releases_leave_out(tmp_path):
    """recommend on DeepSeek-V3 under PEFT 0.22 adapts the dense MLP and the shared experts (0.22 keeps them); PEFT 0.21
    retargets them to the experts, training none of them, and nothing said so."""
    from tests.test_hostile8_moe import _DEEPSEEK

    base, tuned = _moe_pair(tmp_path, "deepseek_v3", **_DEEPSEEK)
    diff(str(base), str(tuned), out_dir=tmp_path / "d", plots=False)
    rec = recommend(tmp_path / "d" / "results.json", energy=0.9)
    said = [n for n in rec.notes if "PEFT before 0.22 leaves" in n]
    dense = [p for p in rec.ranks if ".experts." not in p and p.rpartition(".")[2] in ("gate_proj", "up_proj", "down_proj")]
    if release(peft.__version__) < (0, 22):  # its own rules: those modules are left out of the config, said as such
        assert not said and not dense
    else:
        assert dense and len(said) == 1 and "retargeted to the experts" in said[0] and "train it with PEFT >= 0.22" in said[0]


def test_extract_of_one_layers_experts_says_what_peft_before_022_builds_on_the_others(tmp_path):
    """extract --layers 0 under PEFT 0.21: the adapter names layer 0's experts, but PEFT 0.21 matches a converted expert
    by its projection's name alone and built zero LoRAs on layer 1's experts too (5,824 LoRA parameters where
    totals.params said 3,136), unsaid. PEFT 0.22 builds exactly what was counted."""
    base, tuned = _moe_pair(tmp_path, "mixtral", **_MIXTRAL)
    res = extract(str(base), str(tuned), tmp_path / "ad", config=ExtractConfig(rank=2, layers="0"), plots=False)
    b, (m, built) = _state(base), _merged(base, tmp_path / "ad")
    assert all(torch.equal(m[k], b[k]) for k in b if ".layers.1." in k)  # the zero LoRAs change nothing
    said = [w for w in res.warnings if "builds zero LoRAs" in w]
    if release(peft.__version__) < (0, 22):
        assert built > res.totals["params"] and len(said) == 1 and "model.layers.1.block_sparse_moe.experts" in said[0], res.warnings
    else:
        assert built == res.totals["params"] and not said, (built, res.totals["params"], res.warnings)
