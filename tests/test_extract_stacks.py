"""``spectra extract`` of 3-D expert stacks (gpt-oss, Llama-4, GraniteMoE, Mixtral saved as loaded): each expert a
target, each stack written as PEFT's ``target_parameters`` LoRA. The reference: PEFT's own load and merge of the written
adapter in float64 against each expert's float64 best rank-r truncation (Eckart–Young)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from spectra import diff
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.io.peft_writer import param_depths, param_lora_layout, param_lora_tensors

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

_E = 3


def _model(kind: str):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  num_local_experts=_E)
    if kind == "gpt_oss":  # experts stored (E, in, out), is_transposed
        return transformers.GptOssForCausalLM(transformers.GptOssConfig(**common, num_experts_per_tok=2, head_dim=8))
    if kind == "llama4":  # stored (E, in, out) without is_transposed
        return transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**common, intermediate_size_mlp=48, head_dim=8))
    if kind == "granitemoe":  # on disk input_linear.weight / output_linear.weight, loaded as experts.gate_up_proj / down_proj
        return transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(**common, num_experts_per_tok=2))
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_experts_per_tok=2))


@pytest.fixture(scope="module", params=["gpt_oss", "llama4", "granitemoe", "mixtral"])
def stacked(request, tmp_path_factory):
    """``base``/``tuned`` folders of a tiny MoE whose stacks moved by rank-3 updates plus noise, every other matrix by a
    rank-2 one; ``delta``: the loaded names' float64 ΔW. Mixtral is saved as loaded (3-D stacks on disk)."""
    kind, root = request.param, tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model(kind)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 3:
                    E, a, b = p.shape
                    p.add_(0.05 * torch.randn(E, a, 3, generator=g) @ torch.randn(E, 3, b, generator=g) + 1e-3 * torch.randn(E, a, b, generator=g))
                elif p.ndim == 2 and p.shape[0] != 64:  # not the embedding or head
                    p.add_(0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
        after = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if kind == "mixtral":  # transformers 5 saves Mixtral per expert; a checkpoint of the loaded layout has 3-D stacks
            for name, sd in (("base", before), ("tuned", after)):
                (root / name).mkdir()
                save_file({k: v.contiguous() for k, v in sd.items()}, str(root / name / "model.safetensors"), metadata={"format": "pt"})
                model.config.save_pretrained(root / name)
        else:
            model.load_state_dict(before)
            model.save_pretrained(root / "base")
            model.load_state_dict(after)
            model.save_pretrained(root / "tuned")
    return {"kind": kind, "root": root, "cls": type(model), "delta": {k: (after[k].double() - before[k].double()) for k in before},
            "base": before}


def _truncated(d: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(d)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _merged(st, folder) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = st["cls"].from_pretrained(st["root"] / "base", dtype=torch.float64)
        return peft.PeftModel.from_pretrained(base, folder).merge_and_unload().state_dict()


def test_each_expert_merges_to_its_best_rank_r_truncation(stacked, tmp_path):
    res = extract(stacked["root"] / "base", stacked["root"] / "tuned", tmp_path / "x", config=ExtractConfig(rank=2), plots=False)
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    stacks = [k for k, v in stacked["delta"].items() if v.ndim == 3]
    assert sorted(cfg["target_parameters"]) == sorted(stacks) and cfg["r"] == 2
    assert any("target_parameters LoRAs" in w for w in res.warnings)
    merged = _merged(stacked, tmp_path / "x")
    # each stack's experts, and each matrix extracted as a module LoRA (the router, embedding and head are not)
    modules = [m["name"] for m in res.modules if m.get("expert") is None and m["name"] in stacked["delta"]]
    assert modules
    for k in stacks + modules:
        d, got = stacked["delta"][k], merged[k].double() - stacked["base"][k].double()
        for e in range(_E) if d.ndim == 3 else [None]:
            want, part = (_truncated(d[e], 2), got[e]) if e is not None else (_truncated(d, 2), got)
            torch.testing.assert_close(part, want, rtol=0, atol=2e-7 * float(want.abs().max()), msg=f"{k} expert {e}")
    # the records: one per expert, named as spectra diff names them, energy kept as the float64 spectrum says
    recs = {m["name"]: m for m in res.modules}
    for k in stacks:
        for e in range(_E):
            rows = [m for n, m in recs.items() if f":e{e}" in n and (n.startswith(k) or m["module"] == k)]
            assert rows, (k, e, list(recs)[:6])
    one = next(m for m in res.modules if m.get("expert") is not None)
    d = stacked["delta"][next(k for k in stacks if k == one["module"] or one["name"].startswith(k))][one["expert"]]
    d = d if d.shape == tuple(one["shape"]) else d.mT
    s = torch.linalg.svdvals(d)
    assert one["energy_kept"] == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-6)


def test_the_written_adapter_reads_back_as_the_truncated_update(stacked, tmp_path):
    extract(stacked["root"] / "base", stacked["root"] / "tuned", tmp_path / "x", config=ExtractConfig(rank=3), plots=False)
    back = diff(stacked["root"] / "base", tmp_path / "x")
    stacks = {k: v for k, v in stacked["delta"].items() if v.ndim == 3}
    norms = [m.fro_norm for m in back.modules if m.expert is not None]
    want = [float(torch.linalg.matrix_norm(_truncated(d[e], 3))) for d in stacks.values() for e in range(_E)]
    # gate and up are read back as parts of the fused stack: compare the sums of squares
    assert sum(x * x for x in norms) == pytest.approx(sum(x * x for x in want), rel=1e-5)


def test_a_budget_is_kept_as_peft_counts_it(stacked, tmp_path):
    res = extract(stacked["root"] / "base", stacked["root"] / "tuned", tmp_path / "b", config=ExtractConfig(budget="4000"), plots=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = stacked["cls"].from_pretrained(stacked["root"] / "base")
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "b")
    count = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert count == res.totals["params"] <= 4000
    ranks = {m["rank"] for m in res.modules if m.get("expert") is not None}
    assert len(ranks) == 1  # every expert at the stack's one rank


def test_resume_of_an_interrupted_stack_run_writes_the_same_adapter(stacked, tmp_path):
    if stacked["kind"] != "gpt_oss":
        pytest.skip("one architecture is enough for the journal")
    config = ExtractConfig(budget="4000")
    seen = []

    def stop(ev):
        seen.append(ev.name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(stacked["root"] / "base", stacked["root"] / "tuned", tmp_path / "run", config=config, callback=stop, plots=False)
    extract(stacked["root"] / "base", stacked["root"] / "tuned", tmp_path / "run", config=config, resume=True, plots=False)
    extract(stacked["root"] / "base", stacked["root"] / "tuned", tmp_path / "fresh", config=config, plots=False)
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("run", "fresh"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8)


def test_param_layout_interleaves_b_and_nests_the_parameter_wrapped_first():
    # PEFT's ParamWrapper: expert e's update is B[:, e::E] @ A[e*r:(e+1)*r]; gate_up_proj is registered before down_proj
    assert param_depths(["m.experts.gate_up_proj", "m.experts.down_proj"]) == {"m.experts.gate_up_proj": 1, "m.experts.down_proj": 0}
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g)) for _ in range(3)]
    A, B = param_lora_tensors([factors[0], None, factors[2]], 2, (5, 4))
    for e in (0, 2):
        torch.testing.assert_close(B[:, e::3] @ A[e * 2:(e + 1) * 2], factors[e][0] @ factors[e][1])
    assert not B[:, 1::3].any()
    assert [s for _, s in param_lora_layout("m.experts.down_proj", 2, 3, (5, 4), 0)] == [(6, 4), (5, 6)]


# ---- the probe of the feature -----------------------------------------------------------------------------------
def _gpt_oss_pair(root, change):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model("gpt_oss")
        model.save_pretrained(root / "base")
        with torch.no_grad():
            for n, p in model.named_parameters():
                change(n, p)
        model.save_pretrained(root / "tuned")
    return type(model)


def _low_rank(n, p):
    if p.ndim == 3:
        p.add_(0.05 * torch.randn(p.shape[0], p.shape[1], 2) @ torch.randn(p.shape[0], 2, p.shape[2]))


def test_a_selection_of_some_experts_of_a_stack_is_refused(tmp_path):
    # --include ':e1' wrote every expert (zeros for the others) but counted one: 920 parameters said, 2760 loaded (budget 1000)
    from spectra.errors import ConfigError

    _gpt_oss_pair(tmp_path, _low_rank)
    with pytest.raises(ConfigError, match=r"select 1 of the 3 experts of .*experts\.(down|gate_up)_proj: PEFT's target_parameters"):
        extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "x", config=ExtractConfig(budget="1000", include=":e1"), plots=False)


def test_an_expert_with_nan_is_written_as_zeros_and_counted(tmp_path):
    # the NaN expert's zero factors are in the file at the stack's rank: extract.json said 1184 where PEFT loads 1552
    def change(n, p):
        _low_rank(n, p)
        if n.endswith("experts.down_proj"):
            p[1, 0, 0] = float("nan")

    cls = _gpt_oss_pair(tmp_path, change)
    res = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "x", config=ExtractConfig(rank=2), plots=False)
    assert any("down_proj" in r["name"] and "NaN" in r["reason"] for r in res.not_extracted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), tmp_path / "x")
    assert sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n) == res.totals["params"]


def test_a_changed_per_expert_bias_is_listed_as_not_held(tmp_path):
    # gpt-oss's experts.gate_up_proj_bias (E, 2I) changed: in neither not_extracted nor not_lora, no word; then (the
    # pipelines' probe) listed as not extracted, where the matrices' energy share counted it: a bias, as 1-D ones are
    def change(n, p):
        _low_rank(n, p)
        if n.endswith("gate_up_proj_bias"):
            p.add_(0.1)

    _gpt_oss_pair(tmp_path, change)
    res = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "x", config=ExtractConfig(rank=2), plots=False)
    rec = next((r for r in res.not_lora if r["name"] == "model.layers.0.mlp.experts.gate_up_proj_bias"), None)
    assert rec is not None and rec["kind"] == "bias" and not rec["held"] and rec["fro_norm"] > 0, res.not_lora
    assert not any("bias" in r["name"] for r in res.not_extracted)
    assert res.totals["not_extracted_energy_share"] == pytest.approx(0.0, abs=1e-12) or all(
        "router" in r["name"] for r in res.not_extracted)


def test_compare_and_trace_say_once_what_they_leave_of_the_stacks(tmp_path):
    # compare counted each stack twice (A's reason, B's) and cut the reason mid-word; trace said only "4 matrices skipped"
    from spectra import compare
    from spectra.trace import trace

    def change(n, p):
        _low_rank(n, p)
        if n.endswith("q_proj.weight"):
            p.add_(0.05 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]))

    _gpt_oss_pair(tmp_path, change)
    extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "x", config=ExtractConfig(rank=2), plots=False)
    res = compare(tmp_path / "x", tmp_path / "tuned", base=tmp_path / "base")
    stacks = [s for s in res.skipped if "expert stack" in s["reason"]]
    assert sorted(s["name"] for s in stacks) == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    assert all(s["reason"].startswith("A (") and "; 3-D expert stack: compare measures" in s["reason"] for s in stacks)
    import shutil

    shutil.copytree(tmp_path / "tuned", tmp_path / "tuned2")  # a trace needs two checkpoints
    tr = trace(str(tmp_path / "base"), [str(tmp_path / "tuned"), str(tmp_path / "tuned2")], plots=False)
    assert any(w.startswith("2 3-D expert stack(s) are not traced") for w in tr.warnings), tr.warnings


def test_compare_says_phi_at_its_maximum_as_such(tmp_path):
    # an adapter extracted from a full update lies inside its subspace: φ = 1 beside a baseline of 0.5 read
    # "overlap somewhat more than chance" (the ratio cannot pass 2 there)
    from spectra import compare
    from spectra.compare_findings import compare_findings
    from tests.pair_util import save_folder

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(16, 16, generator=g) for i in range(2) for m in ("q_proj", "v_proj")}
    tuned = {k: v + torch.randn(16, 8, generator=g) @ torch.diag(torch.linspace(2, 1, 8)) @ torch.randn(8, 16, generator=g) / 4
             for k, v in base.items()}
    save_folder(tmp_path / "b", base)
    save_folder(tmp_path / "t", tuned)
    extract(tmp_path / "b", tmp_path / "t", tmp_path / "x", config=ExtractConfig(rank=4), plots=False)
    res = compare(tmp_path / "x", tmp_path / "t", base=tmp_path / "b")
    assert all(m.phi["right"].phi_full == pytest.approx(1.0, abs=1e-6) and m.phi["right"].random == 0.5 for m in res.modules)
    text = next(f.text for f in compare_findings(res) if f.topic == "phi")
    assert "at its largest value, 1, in 4 of 4 modules" in text and "somewhat" not in text
