"""Nineteenth round: what the eighteenth left noted (docs/bad_inputs.md, "nineteenth round")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

import spectra
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.recommend import recommend


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(root), os.environ.get("PYTHONPATH")) if x),
           "COLUMNS": "200", **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", *args], capture_output=True,
                          text=True, timeout=240, cwd=root, env=env, **kw)


@pytest.mark.parametrize("name", ["a\\", "C:\\dir\\", "two\\\\", "x[red]\\", "\\"])
def test_a_trailing_backslash_is_printed_as_written(name):
    """rich's escape doubles a trailing backslash (lest it escape a tag that follows): a path or tensor name
    ending in one was printed with two when nothing followed, or when plain text did."""
    from spectra_cli.console import shown

    for markup, expected in ((shown(name), name), (shown(name) + " ok", name + " ok"),
                             ("[red]" + shown(name) + "[/red]", name), (shown(name) + "[bold]x[/bold]", name + "x")):
        console = Console(record=True, width=200, color_system=None)
        console.print(markup, end="")
        assert console.export_text() == expected, (name, markup)


def test_an_empty_tensor_name_gets_a_visible_label(tmp_path):
    """A tensor named "" (legal in safetensors) got an empty label: a blank table cell and "largest in  (0.10)"."""
    g = torch.Generator().manual_seed(0)
    W = {"": torch.randn(8, 6, generator=g), "x.weight": torch.randn(8, 6, generator=g)}
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file({k: v + 0.3 * torch.randn(8, 6, generator=g) for k, v in W.items()}, str(tmp_path / "t.safetensors"))
    proc = _cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "o"),
                 "--no-plots"])
    assert proc.returncode == 0, proc.stderr
    assert "│ \"\"" in proc.stdout and "largest in \"\" (" in proc.stdout, proc.stdout
    assert "  (" not in proc.stdout.split("Findings", 1)[1].replace("\n  ", "\n"), proc.stdout


def test_one_layer_stack_under_two_prefixes_keeps_two_labels(tmp_path):
    """model.layers.N.… beside layers.N.… in one file: one label for both, so their heatmap cells and summary
    rows pooled two different updates (their median)."""
    from spectra.plots.diff import layer_grid

    g = torch.Generator().manual_seed(1)
    names = [f"{p}layers.{i}.self_attn.q_proj.weight" for p in ("model.", "") for i in range(2)]
    W = {n: torch.randn(8, 8, generator=g) for n in names}
    save_file(W, str(tmp_path / "b.safetensors"))
    T = {n: w + (0.1 if n.startswith("model.") else 1.0) * torch.randn(8, 8, generator=g) for n, w in W.items()}
    save_file(T, str(tmp_path / "t.safetensors"))
    res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    labels = {m.name: m.module for m in res.modules}
    assert labels["model.layers.0.self_attn.q_proj.weight"] != labels["layers.0.self_attn.q_proj.weight"], labels
    grid, layers, modules, _ = layer_grid(res, lambda m: m.rel_norm)
    assert grid.shape == (2, 2), (grid, modules)
    for m in res.modules:  # each cell is one matrix's own value, not a median of two
        assert grid[layers.index(m.layer), modules.index(m.module)] == pytest.approx(m.rel_norm), m.name


def _planted(root: Path, rank: int = 4) -> tuple[str, str, dict[str, np.ndarray]]:
    g = torch.Generator().manual_seed(2)
    W = {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(64, 48, generator=g) * 0.05
         for i in range(2) for m in ("q_proj", "v_proj")}
    T = {n: w + 0.002 * torch.randn(64, rank, generator=g) @ torch.randn(rank, 48, generator=g) for n, w in W.items()}
    save_file(W, str(root / "b.safetensors"))
    save_file(T, str(root / "t.safetensors"))
    deltas = {n: T[n].double().numpy() - W[n].double().numpy() for n in W}  # the stored update, float64
    return str(root / "b.safetensors"), str(root / "t.safetensors"), deltas


def test_a_budget_is_not_spent_on_rounding_noise(tmp_path):
    """A rank-4 update stored in float32 and a budget ten times what it needs: the fill step spent the rest
    on components at the rounding level of the stored weights (ranks 37-41, 19,968 of 20,000 parameters,
    for no energy); now each module keeps its 4 directions, the rest is left unspent with a warning."""
    base, tuned, deltas = _planted(tmp_path)
    res = extract(base, tuned, tmp_path / "a", config=ExtractConfig(budget="20000"), plots=False)
    assert [m["rank"] for m in res.modules] == [4, 4, 4, 4], [m["rank"] for m in res.modules]
    assert res.allocation["used_params"] == 4 * 4 * (64 + 48)
    assert any("rounding level" in w and "budget" in w for w in res.warnings), res.warnings
    for m in res.modules:  # the four directions hold the whole update (float64 reference), so nothing is lost
        S = np.linalg.svd(deltas[m["name"]], compute_uv=False)
        assert m["energy_kept"] == pytest.approx(float(np.sum(S[:4] ** 2) / np.sum(S**2)), abs=1e-9)
        assert S[4] < 1e-5 * S[3]  # what was left: rounding, five orders of magnitude below the update
    # a budget that binds is spent as before: the greedy's prefix over real components
    tight = extract(base, tuned, tmp_path / "b", config=ExtractConfig(budget="1000"), plots=False)
    assert tight.allocation["used_params"] <= 1000 and sum(m["rank"] for m in tight.modules) == 1000 // 112
    assert not any("rounding level" in w for w in tight.warnings), tight.warnings


def test_recommend_sets_fan_in_fan_out_for_gpt2(tmp_path):
    """recommend's LoraConfig for GPT-2 (Conv1D layers, stored (in, out)) left fan_in_fan_out out: PEFT warned
    and set it itself for every module; now the config says it, and PEFT builds the model without that warning."""
    T = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    model = T.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "tuned")
    spectra.diff(str(tmp_path / "base"), str(tmp_path / "tuned"), out_dir=tmp_path / "d")
    rec = recommend(tmp_path / "d" / "results.json")
    assert rec.config.get("fan_in_fan_out") is True, rec.config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.get_peft_model(T.GPT2LMHeadModel(cfg), peft.LoraConfig(**{k: v for k, v in rec.config.items() if k != "peft_type"}))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)], [str(w.message) for w in caught]
    # without the base's config.json (moved away) nothing is assumed: PEFT decides, as before
    doc = json.loads((tmp_path / "d" / "results.json").read_text())
    nowhere = str(tmp_path / "nowhere")
    (tmp_path / "d" / "results.json").write_text(json.dumps({**doc, "base": nowhere, "inputs": {**doc["inputs"], "base": nowhere}}))
    assert "fan_in_fan_out" not in recommend(tmp_path / "d" / "results.json").config


def _bf16_saved(rel: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A float32 base, the base plus a rank-4 update of ‖ΔW‖/‖W‖ = rel saved in bf16, and the float64 share
    of the stored ΔW's energy that is the bf16 rounding (not the update)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(256, 128, generator=g) * 0.02
    d = torch.randn(256, 4, generator=g) @ torch.randn(4, 128, generator=g)
    d = d / d.norm() * b.norm() * rel
    t = (b + d).to(torch.bfloat16)
    D, R = t.double() - b.double(), t.double() - (b.double() + d.double())
    return b, t, float(R.norm() ** 2 / D.norm() ** 2)


def test_a_bf16_saved_update_of_a_float32_base_is_not_called_rounding_noise():
    """A float32 base and its fine-tune saved in bf16: entries that changed by up to a whole bf16 step counted as
    rounding, though the tuned side's rounding is at most half of one; an update of 3e-3·‖W‖ (77% of its energy
    learned, float64) was called "the spectrum of rounding noise" and left out of the findings. Its note is now
    precision_mismatch, with the rounding share the float64 reference gives."""
    from spectra.numerics import numeric_flags

    b, t, truth = _bf16_saved(3e-3, 0)
    assert 0.15 < truth < 0.35  # most of this ΔW is the update
    flags = {f.code: f.message for f in numeric_flags(b, t, t.float() - b, base_dtype="float32", tuned_dtype="bfloat16")}
    assert "rounding_level" not in flags and "precision_mismatch" in flags, flags
    said = float(flags["precision_mismatch"].split("≈ ")[1].split("%")[0]) / 100
    assert said == pytest.approx(truth, abs=0.03), (said, truth)
    b, t, truth = _bf16_saved(1e-3, 1)  # three quarters rounding: still rounding noise
    assert truth > 0.6
    assert "rounding_level" in {f.code for f in numeric_flags(b, t, t.float() - b, base_dtype="float32", tuned_dtype="bfloat16")}


def test_an_estimated_rounding_share_never_exceeds_the_whole():
    """Sampled rows scaled up to the whole matrix estimated 101% of ‖ΔW‖² in ≤ 1-step entries, printed as such."""
    from spectra.numerics import numeric_flags

    for seed in range(6):
        b, t, _ = _bf16_saved(1e-4, seed)
        for f in numeric_flags(b, t, t.float() - b, base_dtype="float32", tuned_dtype="bfloat16"):
            shares = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)%", f.message)]
            assert shares and all(0 <= x <= 100 for x in shares), f.message


def _llama_pair(root: Path, *, tie: bool = False) -> tuple[Path, Path]:
    """A tiny Llama saved by transformers and a copy whose matrices moved by rank-2 updates."""
    from tests.train_util import tiny_llama

    model = tiny_llama(0)
    if tie:  # built tied (the base then stores no head)
        model.config.tie_word_embeddings = True
        model = type(model)(model.config)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g) / 8)
    model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def _wrapped_bare_base(root: Path, base: Path) -> Path:
    """The base's state dict saved bare under a LightningModule's prefix (model.model.layers…), no config.json."""
    from safetensors.torch import load_file

    (root / "wrapped").mkdir()
    save_file({"model." + k: v for k, v in load_file(str(base / "model.safetensors")).items()},
              str(root / "wrapped" / "model.safetensors"))
    return root / "wrapped" / "model.safetensors"


def test_extract_from_a_wrapped_bare_base_loads_onto_the_model(tmp_path):
    """A base saved bare with a wrapper prefix and no config.json, against a plain tuned model folder: the adapter was
    named model.model.layers…, and PEFT loaded it onto the model as a silent no-op (0 tensors changed by the merge)
    while extract.json said 0.85 of the energy was kept. Now it takes the tuned (loadable) names, and the merge is
    the base plus the rank-r truncation of ΔW (float64 reference)."""
    T = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, tuned = _llama_pair(tmp_path)
    wrapped = _wrapped_bare_base(tmp_path, base)
    extract(str(wrapped), str(tuned), tmp_path / "ex", config=ExtractConfig(rank=2), plots=False)
    model = T.LlamaForCausalLM.from_pretrained(base, dtype=torch.float64)
    ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "ex").merge_and_unload().state_dict()
    target = T.LlamaForCausalLM.from_pretrained(tuned, dtype=torch.float64).state_dict()
    checked = 0
    for k in ref:
        if k.endswith("proj.weight"):
            U, S, Vh = torch.linalg.svd(target[k] - ref[k])
            trunc = (U[:, :2] * S[:2]) @ Vh[:2]
            assert torch.linalg.norm(merged[k] - ref[k] - trunc) <= 1e-5 * torch.linalg.norm(trunc), k
            checked += 1
    assert checked == 14


def test_recommend_of_a_wrapped_bare_base_keeps_names_peft_matches(tmp_path):
    """The same wrapped base through diff and recommend: rank_pattern keys model.model.layers…, which PEFT ignored
    ("did not match any targeted module"), every module at the global r. The names stay the results' (PEFT matches by
    suffix), and PEFT builds every module at the recommended rank."""
    T = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, tuned = _llama_pair(tmp_path)
    wrapped = _wrapped_bare_base(tmp_path, base)
    spectra.diff(str(wrapped), str(tuned), out_dir=tmp_path / "d")
    rec = recommend(tmp_path / "d" / "results.json", energy=0.5)
    assert not any(k.startswith("model.model.") for k in rec.config["rank_pattern"]), rec.config["rank_pattern"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.get_peft_model(T.LlamaForCausalLM.from_pretrained(base),
                                 peft.LoraConfig(**{k: v for k, v in rec.config.items() if k != "peft_type"}))
    assert not [w for w in caught if "did not match" in str(w.message)], [str(w.message) for w in caught]
    built = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p.shape[0]
             for n, p in pm.named_parameters() if n.endswith("lora_A.default.weight")}
    assert built == {k if k.startswith("model.") else "model." + k: r for k, r in rec.ranks.items()}, (built, rec.ranks)


def _mixtral(root: Path) -> tuple[Path, Path]:
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.MixtralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=100,
                          max_position_embeddings=64)
    m = T.MixtralForCausalLM(cfg)
    m.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim >= 2 and "embed" not in n and "lm_head" not in n:
                d = 0.01 * torch.randn(*p.shape, generator=g)
                if p.ndim == 2:
                    d += 0.1 * torch.randn(p.shape[0], 6, generator=g) @ torch.randn(6, p.shape[1], generator=g)
                p.add_(d)
    m.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def test_recommend_counts_moe_parameters_as_peft_builds_them(tmp_path):
    """Mixtral: recommend counted r·(out + in) per chosen expert, while PEFT adapts every expert of each stack and
    fuses w1 and w3 into gate_up_proj at rank 2r (40,496 said, 55,856 built; a 10% budget built 1.9× over). Now the
    count is PEFT's own and a budget is kept, the expert stacks one knapsack item."""
    T = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, tuned = _mixtral(tmp_path)
    spectra.diff(str(base), str(tuned), out_dir=tmp_path / "d")
    for kw in ({"energy": 0.9}, {"energy": None, "budget": "30%"}, {"energy": None, "budget": "60%"}):
        rec = recommend(tmp_path / "d" / "results.json", **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(T.MixtralForCausalLM.from_pretrained(base),
                                     peft.LoraConfig(**{k: v for k, v in rec.config.items() if k != "peft_type"}))
        built = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
        assert rec.params == built, (kw, rec.params, built)
        if "budget" in kw:
            full = rec.full_params
            assert built <= float(kw["budget"].rstrip("%")) / 100 * full, (kw, built, full)


def test_interfere_and_trace_say_an_untied_head_of_a_tied_base(tmp_path):
    """A base that ties its head (stores none) and a fine-tune saved untied with a changed head: interfere and trace
    left the head out without a word (compare listed it, diff paired it with the embedding)."""
    T = pytest.importorskip("transformers")
    base, tuned = _llama_pair(tmp_path, tie=True)
    m = T.LlamaForCausalLM.from_pretrained(tuned)
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.detach().clone() + 0.05)
    m.save_pretrained(tmp_path / "untied")
    proc = _cli(["interfere", "--base", str(base), str(tmp_path / "untied"), str(tuned), "-o", str(tmp_path / "i")])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "i" / "interfere.json").read_text())
    assert any(s["name"] == "lm_head.weight" and "ties" in s["reason"] for s in doc["skipped"]), doc["skipped"]
    proc = _cli(["trace", str(base), str(tuned), str(tmp_path / "untied"), "-o", str(tmp_path / "t")])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert any("lm_head.weight" in w and "ties" in w for w in doc["warnings"]), doc["warnings"]


def test_trace_orders_checkpoints_of_one_step_by_name_and_names_them(tmp_path):
    """checkpoint-10 and checkpoint-010 in one run folder: traced in the filesystem's listing order, with a warning
    that "they keep the order given" (none was given). Now by folder name, and the warning names them."""
    import shutil

    base, tuned = _llama_pair(tmp_path)
    for name in ("checkpoint-10", "checkpoint-010", "checkpoint-20"):
        shutil.copytree(tuned, tmp_path / "run" / name)
    proc = _cli(["trace", str(base), str(tmp_path / "run"), "-o", str(tmp_path / "t")])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert [Path(c["path"]).name for c in doc["checkpoints"]] == ["checkpoint-010", "checkpoint-10", "checkpoint-20"]
    assert any("checkpoint-010, checkpoint-10 have the same step" in w for w in doc["warnings"]), doc["warnings"]


def test_trace_refuses_a_dora_adapter_among_lora_ones(tmp_path):
    """The README says DoRA adapters are a one-line error; one among LoRA checkpoints was a failed last point, exit 0."""
    T = pytest.importorskip("transformers")
    from tests.conftest import random_lora

    base, _ = _llama_pair(tmp_path)
    random_lora(T.LlamaForCausalLM.from_pretrained(base), 1, r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "l")
    random_lora(T.LlamaForCausalLM.from_pretrained(base), 2, r=2, target_modules=["q_proj"], use_dora=True
                ).save_pretrained(tmp_path / "d")
    proc = _cli(["trace", str(base), str(tmp_path / "l"), str(tmp_path / "d"), "-o", str(tmp_path / "t")])
    assert proc.returncode == 1 and "DoRA adapters are not traced" in proc.stderr, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_trace_names_the_truncated_shard(tmp_path):
    """A run's checkpoint with one truncated shard of several was left out as "cannot be read (data ends at byte …)",
    without saying which shard."""
    T = pytest.importorskip("transformers")
    base, tuned = _llama_pair(tmp_path)
    for step in (1, 2):
        T.LlamaForCausalLM.from_pretrained(tuned).save_pretrained(tmp_path / "run" / f"checkpoint-{step}", max_shard_size="200KB")
    shard = sorted((tmp_path / "run" / "checkpoint-1").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    proc = _cli(["trace", str(base), str(tmp_path / "run"), "-o", str(tmp_path / "t")])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    reasons = [s["reason"] for s in doc["skipped_checkpoints"]]
    assert any(shard.name in r and "data ends" in r for r in reasons), reasons


# ---- review of the round and the twentieth probes ----------------------------------------------------------
def test_one_ulp_flips_of_a_bf16_release_saved_in_float32_are_still_rounding_noise():
    """Review: the ε/2 step went by the dtype name, so a bf16 release saved in float32 (values on the bf16 grid) and
    its bf16 fine-tune's one-ulp flips (100% rounding, float64) were called a learned update, with a
    precision_mismatch of "27.7%" where the base needs no rounding at all; recommend then wrote r = 130."""
    from spectra.numerics import numeric_flags

    g = torch.Generator().manual_seed(4)
    b16 = (torch.randn(256, 256, generator=g) * 0.02).to(torch.bfloat16)
    bits = b16.view(torch.int16).clone()
    flip = torch.rand(256, 256, generator=g) < 0.3
    bits[flip] += torch.where(torch.rand(256, 256, generator=g) < 0.5, 1, -1).to(torch.int16)[flip]
    t = bits.view(torch.bfloat16)
    b = b16.float()  # exactly the bf16 values, stored as float32
    assert torch.equal(b.to(torch.bfloat16).float(), b)
    codes = [f.code for f in numeric_flags(b, t, t.float() - b, base_dtype="float32", tuned_dtype="bfloat16")]
    assert codes == ["rounding_level"], codes
    # a float32 base off the bf16 grid keeps the half step (this round's mend)
    b2, t2, truth = _bf16_saved(3e-3, 0)
    assert "rounding_level" not in [f.code for f in numeric_flags(b2, t2, t2.float() - b2, base_dtype="float32",
                                                                    tuned_dtype="bfloat16")]


def test_a_budget_that_buys_only_rounding_noise_is_one_line(tmp_path):
    """Review: every component at or below the rounding floor left every rank 0 and PEFT's writer raised
    "ranks must name at least one adapted module" (a traceback)."""
    g = torch.Generator().manual_seed(5)
    W = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(256, 256, generator=g) * 0.02 for i in range(2)}
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file({n: (w + 3e-3 * 0.02 * torch.randn(256, 256, generator=g)).to(torch.bfloat16) for n, w in W.items()},
              str(tmp_path / "t.safetensors"))
    proc = _cli(["extract", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--budget", "20%",
                 "--out", str(tmp_path / "x"), "--no-plots"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "at or below the rounding floor" in proc.stderr and (tmp_path / "x" / "extract.json").is_file(), proc.stderr


def _two_adapters(root: Path) -> tuple[Path, Path, Path]:
    T = pytest.importorskip("transformers")
    from tests.conftest import random_lora

    base, _ = _llama_pair(root)
    random_lora(T.LlamaForCausalLM.from_pretrained(base), 1, r=2, target_modules=["q_proj", "v_proj"]).save_pretrained(root / "c")
    random_lora(T.LlamaForCausalLM.from_pretrained(base), 2, r=2, target_modules=["q_proj", "v_proj", "gate_proj"]
                ).save_pretrained(root / "d")
    return base, root / "c", root / "d"


def test_compare_refuses_a_filter_that_leaves_only_one_sided_modules(tmp_path):
    """--include gate over two adapters of which only one adapts gate_proj: an empty table, exit 0 (a filter that
    leaves nothing is refused everywhere else)."""
    base, c, d = _two_adapters(tmp_path)
    proc = _cli(["compare", str(c), str(d), "--base", str(base), "--include", "gate", "--out", str(tmp_path / "o")])
    assert proc.returncode == 1 and "--include 'gate' leaves none of the" in proc.stderr, (proc.returncode, proc.stderr)
    assert "only in B" in proc.stderr and "Traceback" not in proc.stderr


def test_an_exclude_that_takes_everything_is_worded_as_such(tmp_path):
    """"none of the 4 paired matrices matches" for an --exclude all 4 matched."""
    from spectra.config import DiffConfig
    from spectra.errors import ConfigError
    from tests.pair_util import small_pair

    base, tuned = small_pair(tmp_path)
    with pytest.raises(ConfigError, match="passes"):
        spectra.diff(base, tuned, config=DiffConfig(exclude="."))


def _saved_by(folder: Path, version: str, field: str, keys: dict) -> None:
    """Rewrite an adapter's config as that PEFT release saves it: ``peft_version``, and ``field``'s keys in the order
    given (PEFT before 0.22 sorted them; this PEFT may not)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "peft_version": version, field: keys}))


def test_pattern_keys_that_clash_on_a_module_are_said(tmp_path):
    """Two alpha_pattern keys matching one module with different values: PEFT trains with the first in its order but
    save_pretrained sorts the keys, so the saved file may apply the other; nothing said so. A rank_pattern clash that
    leaves the factors' rank unmatched was blamed on an edited config."""
    T = pytest.importorskip("transformers")
    from tests.conftest import random_lora

    base, _ = _llama_pair(tmp_path)
    random_lora(T.LlamaForCausalLM.from_pretrained(base), 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                alpha_pattern={"q_proj": 3, "layers.0.self_attn.q_proj": 20}).save_pretrained(tmp_path / "a")
    _saved_by(tmp_path / "a", "0.21.2", "alpha_pattern", {"layers.0.self_attn.q_proj": 20, "q_proj": 3})
    proc = _cli(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--base", str(base), "--json"])
    assert "several alpha_pattern keys" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr
    random_lora(T.LlamaForCausalLM.from_pretrained(base), 1, r=8, target_modules=["q_proj"],
                rank_pattern={"q_proj": 5, "layers.0.self_attn.q_proj": 2}).save_pretrained(tmp_path / "r")
    _saved_by(tmp_path / "r", "0.21.2", "rank_pattern", {"layers.0.self_attn.q_proj": 2, "q_proj": 5})
    proc = _cli(["diff", str(base), str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-plots"])
    assert proc.returncode == 1 and "several rank_pattern keys" in proc.stderr and "sorts the keys" in proc.stderr, proc.stderr
    # PEFT 0.22 keeps the patterns' order on saving: the first key in the file is the one training used, and no word is due
    _saved_by(tmp_path / "r", "0.22.0", "rank_pattern", {"q_proj": 5, "layers.0.self_attn.q_proj": 2})
    proc = _cli(["diff", str(base), str(tmp_path / "r"), "--out", str(tmp_path / "o2"), "--no-plots"])
    assert proc.returncode == 0 and "several rank_pattern keys" not in proc.stdout + proc.stderr, proc.stderr


def test_trace_gives_no_sigma_ratio_over_a_rounding_level_second_value(tmp_path):
    """A rank-1 float32 update: σ₂ is float32 rounding (2.6e-7, under the 7.5e-7 rounding floor) and trace reported
    σ₁/σ₂ = 5.75e6."""
    from spectra.storage_floor import rounding_floor
    from spectra.trace import TraceConfig, trace

    g = torch.Generator().manual_seed(0)
    W = {"model.layers.0.self_attn.q_proj.weight": torch.randn(32, 24, generator=g)}
    T1 = {n: w + 0.05 * torch.randn(32, 1, generator=g) @ torch.randn(1, 24, generator=g) for n, w in W.items()}
    T2 = {n: w + 0.05 * torch.randn(32, 24, generator=g) for n, w in W.items()}
    for name, sd in (("b", W), ("t1", T1), ("t2", T2)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    n = "model.layers.0.self_attn.q_proj.weight"
    S = np.linalg.svd(T1[n].double().numpy() - W[n].double().numpy(), compute_uv=False)
    assert S[1] <= rounding_floor(T1[n], "float32", W[n])  # the float64 reference: σ₂ is rounding
    res = trace(str(tmp_path / "b.safetensors"), [str(tmp_path / "t1.safetensors"), str(tmp_path / "t2.safetensors")],
                config=TraceConfig(device="cpu"))
    pts = res.matrices[0]["points"]
    assert pts[0]["sigma_ratio"] is None and pts[1]["sigma_ratio"] is not None, pts


def test_an_html_report_leaves_empty_fields_blank(tmp_path):
    """This round's empty-name label went through the display helper every HTML cell uses: 166 empty notes and
    fields of the demo's report showed "" (as if they held the empty string)."""
    from tests.pair_util import small_pair

    base, tuned = small_pair(tmp_path)
    spectra.diff(base, tuned, out_dir=tmp_path / "d")
    proc = _cli(["report", str(tmp_path / "d"), "-o", str(tmp_path / "r.html")])
    assert proc.returncode == 0, proc.stderr
    assert "&quot;&quot;" not in (tmp_path / "r.html").read_text(), "an empty field shown as \"\""


@pytest.mark.parametrize("kw", [{"max_rank": 2.5}, {"max_rank": True}, {"energy": True}, {"alpha_ratio": "2"}])
def test_recommend_refuses_values_no_lora_config_can_hold(tmp_path, kw):
    """recommend(max_rank=2.5) wrote r = 2.5 into the config; True was a rank (and energy=True τ = 1)."""
    from spectra.errors import ConfigError
    from tests.pair_util import small_pair

    base, tuned = small_pair(tmp_path)
    spectra.diff(base, tuned, out_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match="must be"):
        recommend(tmp_path / "d" / "results.json", **{"energy": 0.9, **kw})
    assert recommend(tmp_path / "d" / "results.json", energy=0.9, max_rank=np.int64(2)).config["r"] == 2


def test_library_calls_with_no_checkpoint_or_one_path_are_one_line(tmp_path):
    """trace(base, []) raised an IndexError; interfere(base, "t.safetensors") took each character for a task."""
    from spectra.errors import ConfigError
    from spectra.interfere import interfere
    from spectra.trace import TraceConfig, trace
    from tests.pair_util import small_pair

    base, tuned = small_pair(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint given"):
        trace(base, [], config=TraceConfig(device="cpu"))
    with pytest.raises(ConfigError, match="a list of fine-tunes"):
        interfere(base, tuned)


def test_repeated_epsilons_are_kept_once():
    """CompareConfig(epsilons=(0.5, 0.1, 0.5)) was saved as given while the per-module counts folded the two 0.5s."""
    from spectra.config import CompareConfig

    assert CompareConfig(epsilons=(0.5, 0.1, 0.5)).epsilons == (0.1, 0.5)


# ---- review of the second batch and a new user's walk through the README ----------------------------------
def test_an_adapters_read_notes_are_said_once(tmp_path):
    """Review: the second batch passed each adapter's notes to compare and interfere again, beside read_notes: every
    note twice ("reading ad3: the folder holds a PEFT adapter and a full model" four times for two adapters)."""
    import shutil

    T = pytest.importorskip("transformers")
    from tests.conftest import random_lora

    base, _ = _llama_pair(tmp_path)
    for i, name in enumerate(("a", "b")):
        random_lora(T.LlamaForCausalLM.from_pretrained(base), i, r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / name)
        shutil.copy(base / "model.safetensors", tmp_path / name / "model.safetensors")
    proc = _cli(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--base", str(base), "--json"])
    assert proc.returncode == 0, proc.stderr
    said = [w for w in json.loads(proc.stdout)["warnings"] if "holds a PEFT adapter and a full model" in w]
    assert len(said) == 2, said


def test_recommend_takes_any_real_number_and_refuses_the_rest_in_one_line(tmp_path):
    """Review: Fraction, Decimal and 0-d tensors worked before the type check and not after; 10**400 was an
    OverflowError traceback."""
    from decimal import Decimal
    from fractions import Fraction

    from spectra.errors import ConfigError
    from tests.pair_util import small_pair

    base, tuned = small_pair(tmp_path)
    spectra.diff(base, tuned, out_dir=tmp_path / "d")
    res = tmp_path / "d" / "results.json"
    ranks = recommend(res, energy=0.9).ranks
    for tau in (Fraction(9, 10), Decimal("0.9"), np.float32(0.9)):
        assert recommend(res, energy=tau).ranks == ranks
    with pytest.raises(ConfigError, match="whole number"):
        recommend(res, energy=0.9, max_rank=10**400)
    from spectra.errors import ConfigError as CE
    from spectra.interfere import interfere
    with pytest.raises(CE, match="a list of fine-tunes"):
        interfere(base, tuned.encode())


def test_clashing_keys_are_found_in_a_long_pattern(tmp_path):
    """Review: the clash check stopped at 256 keys, while recommend writes ~560 for an 80-layer model."""
    T = pytest.importorskip("transformers")
    from tests.conftest import random_lora

    base, _ = _llama_pair(tmp_path)
    filler = {f"layers.{i}.nothing_{j}": 4 for i in range(30) for j in range(10)}
    random_lora(T.LlamaForCausalLM.from_pretrained(base), 1, r=4, lora_alpha=8, target_modules=["q_proj"],
                alpha_pattern={**filler, "q_proj": 3, "layers.0.self_attn.q_proj": 20}).save_pretrained(tmp_path / "a")
    _saved_by(tmp_path / "a", "0.21.2", "alpha_pattern", dict(sorted({**filler, "q_proj": 3, "layers.0.self_attn.q_proj": 20}.items())))
    proc = _cli(["diff", str(base), str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--no-plots"])
    assert proc.returncode == 0, proc.stderr
    said = [w for w in json.loads((tmp_path / "o" / "results.json").read_text())["warnings"] if "several alpha_pattern keys" in w]
    assert len(said) == 1 and "'q_proj': 3" in said[0] and "sorts the keys" in said[0], said


def _neox(root: Path) -> tuple[Path, Path]:
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64))
    m.save_pretrained(root / "base")
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.add_(0.02 * torch.randn(p.shape[0], 3) @ torch.randn(3, p.shape[1]))
    m.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def test_rename_warnings_speak_of_what_is_written(tmp_path):
    """extract on GPT-NeoX without --embeddings warned "the adapter names them as loaded (… embed_out → lm_head)" while
    embed_out was not extracted; recommend said nothing of a changed head it left out (and counted the full update
    without it)."""
    base, tuned = _neox(tmp_path)
    proc = _cli(["extract", str(base), str(tuned), "--rank", "2", "-o", str(tmp_path / "x"), "--no-plots"])
    assert proc.returncode == 0 and "embed_out → lm_head" not in proc.stderr, proc.stderr
    proc = _cli(["extract", str(base), str(tuned), "--rank", "2", "--embeddings", "-o", str(tmp_path / "y"), "--no-plots"])
    assert proc.returncode == 0 and "embed_out → lm_head" in proc.stderr, proc.stderr
    spectra.diff(str(base), str(tuned), out_dir=tmp_path / "d")
    rec = recommend(tmp_path / "d" / "results.json", energy=0.9)
    assert any("pass --embeddings" in n and "embed_out" in n for n in rec.notes), rec.notes
    assert not any("embed_out → lm_head" in n for n in rec.notes), rec.notes


def test_trace_of_a_spectra_train_folder_points_to_its_trace(tmp_path):
    """README: `spectra trace base/ runs/lora8`, the folder `spectra train` writes, which holds no checkpoints: "one
    checkpoint is not a trace" without a word of the trace.jsonl it holds."""
    import shutil

    base, tuned = _llama_pair(tmp_path)
    shutil.copytree(tuned, tmp_path / "run")
    (tmp_path / "run" / "trace.jsonl").write_text("")
    proc = _cli(["trace", str(base), str(tmp_path / "run"), "-o", str(tmp_path / "t")])
    assert proc.returncode == 1 and "spectra report" in proc.stderr and "trace.jsonl" in proc.stderr, proc.stderr


def test_a_module_kind_with_no_changed_matrix_says_so(tmp_path):
    """The diff table printed an unchanged kind as "n = 1, rank 0" (read: needs no direction); its legend says
    "c of n" when only c changed."""
    from spectra.findings import count_text

    assert count_text({"count": 1, "changed": 0}) == "0 of 1"
    assert count_text({"count": 5, "changed": 5}) == "5" and count_text({"count": 5, "changed": 2}) == "2 of 5"


# ---- third review and the option probes ------------------------------------------------------------------
def _long_adapter(root: Path, layers: int = 80) -> Path:
    """A recommend-style adapter of ``layers`` × 7 modules whose rank_pattern and alpha_pattern name every
    module in full (~560 keys each), with one clash planted on the last layer."""
    mods = [f"model.layers.{i}.{m}" for i in range(layers) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    g = torch.Generator().manual_seed(0)
    root.mkdir()
    save_file({f"base_model.model.{m}.lora_{x}.weight": torch.randn(*s, generator=g) for m in mods
               for x, s in (("A", (2, 8)), ("B", (8, 2)))}, str(root / "adapter_model.safetensors"))
    alpha = {m: 4 for m in mods}
    alpha[f"layers.{layers - 1}.mlp.down_proj"] = 99
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                      "up_proj", "down_proj"],
        "rank_pattern": {m: 2 for m in mods}, "alpha_pattern": alpha}))
    return root


def test_a_long_pattern_is_matched_in_time_and_its_clash_found(tmp_path):
    """Review: each key with a dot was checked for backtracking again for every module (560 × 1,120 matches: 70 s),
    so the clash check gave up after 2 s without a word, and the match of the config itself took 10 s (spectra
    nearly refused its own recommend output for an 80-layer model). Keys are checked once and compiled once now."""
    from spectra.io.adapter import open_adapter

    adapter = open_adapter(_long_adapter(tmp_path / "a"))
    said = [n for n in adapter.notes if "several alpha_pattern keys" in n]
    assert len(said) == 1 and "model.layers.79.mlp.down_proj" in said[0], adapter.notes
    assert not any("checked for" in n for n in adapter.notes), adapter.notes


@pytest.mark.parametrize("value", [torch.tensor(True), np.array(True), np.complex128(0.9 + 0.5j), bytearray(b"0.9"),
                                   torch.tensor([0.9]), np.timedelta64(4)])
def test_recommend_refuses_what_only_looks_like_a_number(tmp_path, value):
    """Review: float() took a 0-d bool tensor (τ = 1), a complex (its real part), bytes-like objects and 1-element tensors."""
    from spectra.errors import ConfigError
    from tests.pair_util import small_pair

    base, tuned = small_pair(tmp_path)
    spectra.diff(base, tuned, out_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match="must be a number"):
        recommend(tmp_path / "d" / "results.json", energy=value)


def test_approximate_ranks_are_marked_and_sigma1_never_exceeds_the_norm(tmp_path):
    """--approx printed the sketch's rank estimates as the table's ranks and the findings' with no word of it (the
    bounds only in results.json); the float32 sketch's σ̂₁ of a rank-1 update exceeded ‖ΔW‖_F (stable rank
    0.9999998); --approx --precision float32 was accepted, recorded and ignored."""
    from spectra.config import DiffConfig
    from spectra.errors import ConfigError

    g = torch.Generator().manual_seed(7)
    W = {"model.layers.0.mlp.big.weight": torch.randn(300, 200, generator=g, dtype=torch.float64)}
    T = {n: w + torch.randn(300, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 200, generator=g, dtype=torch.float64)
         + 1e-4 * torch.randn(300, 200, generator=g, dtype=torch.float64) for n, w in W.items()}
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file(T, str(tmp_path / "t.safetensors"))
    proc = _cli(["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--approx", "--out",
                 str(tmp_path / "o"), "--no-plots"])
    assert proc.returncode == 0, proc.stderr
    assert "≈" in proc.stdout and "estimates from a randomized sketch" in proc.stderr, proc.stdout + proc.stderr
    assert "numerical caveat" not in proc.stdout  # a sketch of exact weights is no caveat of the weights (review)
    m = json.loads((tmp_path / "o" / "results.json").read_text())["modules"][0]
    assert m["method"].startswith("approx") and m["spectral_norm"] <= m["fro_norm"] and m["stable_rank"] >= 1.0, m
    with pytest.raises(ConfigError, match="does not apply with approx"):
        DiffConfig(approx=True, precision="float32")


def test_recommend_says_nothing_of_rounding_noise_embeddings_left_out(tmp_path):
    """Review: embeddings changed only by rounding were told "pass --embeddings to adapt them"."""
    g = torch.Generator().manual_seed(8)
    W = {"model.embed_tokens.weight": torch.randn(64, 16, generator=g), "model.layers.0.self_attn.q_proj.weight":
         torch.randn(16, 16, generator=g)}
    T = {"model.embed_tokens.weight": W["model.embed_tokens.weight"] * (1 + 1e-9),
         "model.layers.0.self_attn.q_proj.weight": W["model.layers.0.self_attn.q_proj.weight"]
         + 0.1 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)}
    T["model.embed_tokens.weight"][0, 0] = torch.nextafter(W["model.embed_tokens.weight"][0, 0], torch.tensor(10.0))
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file(T, str(tmp_path / "t.safetensors"))
    spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), out_dir=tmp_path / "d")
    rec = recommend(tmp_path / "d" / "results.json", energy=0.9)
    assert not any("pass --embeddings" in n for n in rec.notes), rec.notes


# ---- the tracker and training probe --------------------------------------------------------------------------
def _tiny_step(model, seed: int, lr: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 16), generator=g)
    model(input_ids=x, labels=x).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(-lr * p.grad)
                p.grad = None


def test_the_tracker_says_what_trace_says_of_rounding_level_updates(tmp_path):
    """A bf16 model stepped by SGD at a small learning rate: spectra trace of its weights warned of rounding-level
    updates and nulled their turns with a turn_note; the in-training tracker measured the same updates (σ₁ 11-18×
    below the rounding floor) as if learned, with no note, no turn_note and no warning."""
    from spectra.callbacks import SpectraTracker
    from spectra.trace import load_trace
    from tests.train_util import tiny_llama

    model = tiny_llama(0).to(torch.bfloat16)
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path / "t")
    for step in (1, 2):
        _tiny_step(model, step, 1e-3)
        tracker.step(model, step)
    tracker.close()
    res = load_trace(tmp_path / "t")
    assert any(w.startswith("caveat (rounding_level)") for w in res.warnings), res.warnings
    noted = [m for m in res.matrices if "at step" in (m.get("note") or "") and "rounding level" in m["note"]]
    assert noted, [m.get("note") for m in res.matrices]
    nulls = [pt for m in res.matrices for pt in m["points"] if pt.get("turn_note", "").startswith("every singular value")]
    assert all(pt["turn_prev"] is None for pt in nulls)


def test_the_tracker_does_not_measure_adapters_switched_after_it(tmp_path):
    """A tracker made before set_adapter('second') measured the first adapter, untrained: fro_norm 0.0 at every
    step, no warning."""
    peft = pytest.importorskip("peft")
    from spectra.callbacks import SpectraTracker
    from spectra.trace import load_trace
    from tests.train_util import tiny_llama

    model = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="first")
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path / "t")
    model.set_adapter("second")
    tracker.step(model, 1)
    tracker.close()
    res = load_trace(tmp_path / "t")
    assert any("set_adapter() since?" in w for w in res.warnings), res.warnings
    assert not any(pt.get("fro_norm") == 0.0 for m in res.matrices for pt in m["points"]), res.matrices


def test_the_tracker_refuses_odd_cadences_and_repeated_steps(tmp_path):
    """every=1.5 and every=True were taken; a step given twice wrote its records twice (32 for 16 matrices), and
    steps out of order measured turn_prev against a later step."""
    from spectra.callbacks import SpectraTracker
    from spectra.errors import ConfigError
    from tests.train_util import tiny_llama

    model = tiny_llama(0)
    for every in (1.5, True):
        with pytest.raises(ConfigError, match="whole number"):
            SpectraTracker(model, every=every)
    tracker = SpectraTracker(model, every=1, out_dir=tmp_path / "t")
    for step in (1, 1, 3, 2):
        _tiny_step(model, step, 1e-2)
        tracker.step(model, step)
    tracker.close()
    lines = [json.loads(x) for x in (tmp_path / "t" / "trace.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "point" in r]
    assert sorted(set(steps)) == [1, 3] and len(steps) == 2 * len(tracker.matrices), steps
    assert any("not after the last step measured" in (r.get("warning") or "") for r in lines)


def test_train_refuses_an_eval_source_that_is_its_data(tmp_path):
    """--eval-source equal to --data scored the training text as the "forgetting" of the source domain."""
    from spectra.errors import ConfigError
    from spectra.training import TrainConfig, train
    from tests.train_util import tiny_llama

    tiny_llama(0).save_pretrained(tmp_path / "base")
    (tmp_path / "d.txt").write_text("some text " * 200)
    with pytest.raises(ConfigError, match="--eval-source is --data"):
        train(TrainConfig(base=str(tmp_path / "base"), data=str(tmp_path / "d.txt"), out=str(tmp_path / "o"),
                          eval_source=str(tmp_path / "." / "d.txt"), steps=1))


def test_a_long_tracked_run_keeps_each_steps_caveats_with_its_point(tmp_path):
    """Review: the tracker rewrote a growing note (every step's caveat message so far) into every record: trace.jsonl
    grew with the square of the steps (135 MB at 400 steps of four 128² layers, 1.8 MB before). Each point now keeps
    its own step's caveats, and loading gathers them per matrix; a resumed tracker keeps the earlier ones."""
    from spectra.callbacks import SpectraTracker
    from spectra.trace import load_trace

    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False) for _ in range(2)]).to(torch.bfloat16)
    w0 = [p.detach().clone() for p in m.parameters()]

    def flip(step: int) -> None:
        g = torch.Generator().manual_seed(step)
        for p, w in zip(m.parameters(), w0):
            p.data = torch.where(torch.rand(w.shape, generator=g) < 0.2, torch.nextafter(w, torch.full_like(w, 1e9)), w)

    tracker = SpectraTracker(m, every=1, out_dir=tmp_path / "t")
    for step in range(1, 41):
        flip(step)
        tracker.step(m, step)
    tracker.close()
    recs = [json.loads(x) for x in (tmp_path / "t" / "trace.jsonl").read_text().splitlines()]
    mats = [r for r in recs if "matrix" in r]
    assert {len(json.dumps(r["matrix"])) for r in mats} == {len(json.dumps(mats[0]["matrix"]))}  # no growing note
    assert all("rounding level" in r["point"].get("note", "") for r in mats)
    resumed = SpectraTracker(m, every=1, out_dir=tmp_path / "t", resume_step=40)
    flip(41)
    resumed.step(m, 41)
    resumed.close()
    res = load_trace(tmp_path / "t")
    assert any(w.startswith("caveat (rounding_level)") for w in res.warnings), res.warnings
    assert all("(41 steps)" in mt["note"] for mt in res.matrices), [mt["note"] for mt in res.matrices]
