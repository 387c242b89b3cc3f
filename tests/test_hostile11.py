"""The outside probe's eleventh round: what the tenth left found but not mended, and what the eleventh found.

Each test fails on the code before the round (08a62de) and passes now (docs/bad_inputs.md, "eleventh round").
"""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from spectra.results import caveat_codes
from spectra_cli.main import main
from tests.conftest import lock_held_elsewhere, random_lora

NAMES = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _json(res) -> dict:
    """The JSON document a ``--json`` run printed (warnings may follow it on the mixed output)."""
    return json.JSONDecoder().raw_decode(res.output[res.output.index("{"):])[0]


def _pairs(tmp_path, *, reshape_b: str | None = None):
    """A base and two full fine-tunes of four 16 × 16 matrices; ``reshape_b`` names one B stores as 8 × 16."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    b = {n: torch.randn(16, 16, generator=g) for n in NAMES}
    t = {n: v + 0.1 * torch.randn(16, 16, generator=g) for n, v in b.items()}
    t2 = {n: v + 0.1 * torch.randn(16, 16, generator=g) for n, v in b.items()}
    if reshape_b:
        t2[reshape_b] = torch.randn(8, 16, generator=g)
    for name, d in (("b", b), ("t", t), ("t2", t2)):
        save_file(d, str(tmp_path / f"{name}.safetensors"))
    return [tmp_path / f"{n}.safetensors" for n in ("b", "t", "t2")]


# ---- compare: the other side's pairing skips obey the filters ---------------------------------------------
def test_compare_skips_of_the_other_side_obey_layers(tmp_path):
    """A matrix B could not pair (another shape) in layer 1 was listed as skipped under --layers 0."""
    bad = "model.layers.1.self_attn.q_proj.weight"
    b, t, t2 = _pairs(tmp_path, reshape_b=bad)
    res = _cli("compare", t, t2, "--base", b, "--layers", "0", "--json")
    assert res.exit_code == 0, res.output
    doc = _json(res)
    assert [m["name"] for m in doc["modules"]] == [n for n in NAMES if ".0." in n]
    assert doc["skipped"] == []
    res = _cli("compare", t, t2, "--base", b, "--json")  # unfiltered, the skip is still said
    assert [s["name"] for s in _json(res)["skipped"]] == [bad]


# ---- extract: what PEFT loads is what the numbers claim ---------------------------------------------------
def _perturbed(model_cls, cfg, tmp_path, name: str, scale: float = 0.05):
    """``model_cls(cfg)`` saved as ``name`` and, with a rank-2 change of every 2-D weight, as ``name + "_t"``."""
    torch.manual_seed(0)
    m = model_cls(cfg)
    m.save_pretrained(tmp_path / name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.add_(scale * p.norm() / p.numel() ** 0.5 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
    m.save_pretrained(tmp_path / f"{name}_t")
    return tmp_path / name, tmp_path / f"{name}_t"


def _merged_errors(model_cls, base, tuned, adapter) -> dict[str, float]:
    """‖ΔW − merged update‖ / ‖ΔW‖ per extracted matrix, with PEFT's own loading and merging (float64)."""
    import warnings

    from peft import PeftModel

    b = model_cls.from_pretrained(base, dtype=torch.float64)
    sb = {k: v.clone() for k, v in b.state_dict().items()}
    st = model_cls.from_pretrained(tuned, dtype=torch.float64).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "missing adapter keys" would be a silent loss
        merged = PeftModel.from_pretrained(b, adapter).merge_and_unload().state_dict()
    doc = json.loads((adapter / "extract.json").read_text())
    out = {}
    for m in doc["modules"]:
        if m.get("rank"):
            k = f"{m['module']}.weight"  # the loaded model's name (transformers >= 5 renames some modules)
            out[m["name"]] = (float((st[k] - merged[k]).norm() / (st[k] - sb[k]).norm()), m["rel_fro_error"])
    return out


def test_extract_of_ctrl_names_its_sequential_layers_and_its_embedding(tmp_path):
    """CTRL's ffn.0 / ffn.2 were written as the targets "0" and "2" (PEFT then tried to wrap the decoder
    layer h.0 and refused to load), and its token table transformer.w was extracted as a linear LoRA that
    PEFT dropped on load while extract.json claimed it exact."""
    import transformers as T

    cfg = T.CTRLConfig(vocab_size=60, n_positions=16, n_embd=16, dff=32, n_layer=2, n_head=2)
    base, tuned = _perturbed(T.CTRLLMHeadModel, cfg, tmp_path, "ctrl")
    res = _cli("extract", base, tuned, "-o", tmp_path / "a", "--rank", "2", "--dtype", "float32", "--no-plots", "--json")
    assert res.exit_code == 0, res.output
    cfg_doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "0" not in cfg_doc["target_modules"] and "ffn.0" in cfg_doc["target_modules"]
    doc = json.loads((tmp_path / "a" / "extract.json").read_text())
    assert "transformer.w.weight" not in [m["name"] for m in doc["modules"]]
    assert any(s["name"] == "transformer.w.weight" and "embedding" in s["reason"] for s in doc["not_extracted"])
    for err, claimed in _merged_errors(T.CTRLLMHeadModel, base, tuned, tmp_path / "a").values():
        assert abs(err - claimed) < 1e-4
    res = _cli("extract", base, tuned, "-o", tmp_path / "e", "--rank", "2", "--dtype", "float32", "--no-plots", "--embeddings")
    assert res.exit_code == 0, res.output
    errors = _merged_errors(T.CTRLLMHeadModel, base, tuned, tmp_path / "e")
    assert errors["transformer.w.weight"][0] < 1e-4 and all(abs(e - c) < 1e-4 for e, c in errors.values())


def test_extract_of_t5_leaves_its_relative_position_buckets_to_embeddings(tmp_path):
    """T5's relative_attention_bias is an nn.Embedding: extracted as a linear LoRA, PEFT dropped it on
    load (merged error 1.0) while extract.json claimed 2e-8."""
    import transformers as T

    cfg = T.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, decoder_start_token_id=0)
    base, tuned = _perturbed(T.T5ForConditionalGeneration, cfg, tmp_path, "t5")
    res = _cli("extract", base, tuned, "-o", tmp_path / "a", "--rank", "2", "--dtype", "float32", "--no-plots")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "a" / "extract.json").read_text())
    assert not any("relative_attention_bias" in m["name"] for m in doc["modules"])
    assert sum("relative_attention_bias" in s["name"] and "embedding" in s["reason"] for s in doc["not_extracted"]) == 2
    for err, claimed in _merged_errors(T.T5ForConditionalGeneration, base, tuned, tmp_path / "a").values():
        assert abs(err - claimed) < 1e-4
    res = _cli("extract", base, tuned, "-o", tmp_path / "e", "--rank", "2", "--dtype", "float32", "--no-plots", "--embeddings")
    assert res.exit_code == 0, res.output
    errors = _merged_errors(T.T5ForConditionalGeneration, base, tuned, tmp_path / "e")
    bias = [v for k, v in errors.items() if "relative_attention_bias" in k]
    assert len(bias) == 2 and all(e < 1e-4 for e, _ in bias)


def test_extract_names_modules_as_transformers_loads_them(tmp_path):
    """GPT-NeoX's embed_out is lm_head once transformers 5 loads the model: the adapter's embed_out LoRA
    matched nothing and PEFT left it at zero, while extract.json counted it (energy_kept 0.913 of a
    module that never applies)."""
    import transformers as T

    cfg = T.GPTNeoXConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          max_position_embeddings=32, tie_word_embeddings=False)
    base, tuned = _perturbed(T.GPTNeoXForCausalLM, cfg, tmp_path, "neox")
    res = _cli("extract", base, tuned, "-o", tmp_path / "a", "--rank", "2", "--dtype", "float32", "--no-plots", "--embeddings")
    assert res.exit_code == 0, res.output
    assert "embed_out → lm_head" in res.output
    doc = json.loads((tmp_path / "a" / "extract.json").read_text())
    assert {m["name"]: m["module"] for m in doc["modules"]}["embed_out.weight"] == "lm_head"
    assert "lm_head" in json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    errors = _merged_errors(T.GPTNeoXForCausalLM, base, tuned, tmp_path / "a")
    assert len(errors) == len(doc["modules"]) and all(abs(e - c) < 1e-4 for e, c in errors.values()), errors


def test_recommend_names_modules_as_transformers_loads_them(tmp_path):
    """recommend wrote GPT-NeoX's head as embed_out (and LLaVA's / Qwen2-VL's layers under their stored
    paths): PEFT matched nothing there and trained the rest only."""
    import peft
    import transformers as T

    cfg = T.GPTNeoXConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          max_position_embeddings=32, tie_word_embeddings=False)
    base, tuned = _perturbed(T.GPTNeoXForCausalLM, cfg, tmp_path, "neox")
    assert _cli("diff", base, tuned, "-o", tmp_path / "d", "--no-plots").exit_code == 0
    res = _cli("recommend", tmp_path / "d" / "results.json", "--embeddings", "-o", tmp_path / "lora.json")
    assert res.exit_code == 0 and "embed_out → lm_head" in res.output, res.output
    lora = json.loads((tmp_path / "lora.json").read_text())
    assert "lm_head" in lora["target_modules"] and "embed_out" not in lora["target_modules"]
    model = peft.get_peft_model(T.GPTNeoXForCausalLM.from_pretrained(base), peft.LoraConfig(**lora))
    wrapped = {n.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.") for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert "lm_head" in wrapped


def test_extract_rank_pattern_of_a_path_that_ends_another(tmp_path):
    """rank_pattern {"layers.0.fc": 1, "vision.layers.0.fc": 3} sorted: PEFT gives a module the first key
    that ends its name, so vision.layers.0.fc got r = 1 and the adapter failed to load."""
    import warnings

    from peft import PeftModel
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    ranks = {"layers.0.fc": 1, "vision.layers.0.fc": 3, **{f"{p}layers.{i}.fc": 2 for p in ("", "vision.") for i in (1, 2, 3)}}
    base = {f"{m}.weight": 0.1 * torch.randn(24, 24, generator=g) for m in ranks}
    tuned = {k: v + 0.01 * torch.randn(24, r, generator=g) @ torch.randn(r, 24, generator=g)
             for (k, v), r in zip(base.items(), ranks.values(), strict=True)}
    for name, d in (("b", base), ("t", tuned)):
        (tmp_path / name).mkdir()
        save_file(d, str(tmp_path / name / "model.safetensors"))
    res = _cli("extract", tmp_path / "b", tmp_path / "t", "-o", tmp_path / "a", "--energy", "0.99999", "--dtype", "float32",
               "--no-plots")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert list(cfg["rank_pattern"]) == ["vision.layers.0.fc", "layers.0.fc"]  # the longer first

    model = torch.nn.Module()
    for m in ranks:  # the module tree the names describe
        parent = model
        *path, leaf = m.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(24, 24, bias=False, dtype=torch.float64))
        parent.get_submodule(leaf).weight.data = base[f"{m}.weight"].double().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        merged = PeftModel.from_pretrained(model, str(tmp_path / "a")).merge_and_unload().state_dict()
    for k in base:
        d = tuned[k].double() - base[k].double()
        assert float((d - (merged[k] - base[k].double())).norm() / d.norm()) < 1e-4, k


def test_pattern_keys_and_targets_for_peft():
    from spectra.io.peft_writer import adapter_config

    cfg = adapter_config({"layers.0.fc": 2, "x.a+b": 3, "y.a+b": 2}, all_modules=["layers.0.fc", "vision.layers.0.fc", "x.a+b", "y.a+b"],
                         base_model=None, task_type=None)
    # vision.layers.0.fc is not adapted: the full path layers.0.fc would reach it, so it is excluded
    assert cfg["target_modules"] == ["a+b", "layers.0.fc"] and cfg["exclude_modules"] == ["vision.layers.0.fc"]
    assert cfg["rank_pattern"] == {"x.a\\+b": 3}  # a regular expression to PEFT: its "+" escaped


# ---- compare, trace and interfere say when an update is rounding noise -------------------------------------
def _bf16_run(tmp_path):
    """An fp32 base and three bf16 checkpoints of one rank-2 direction growing 1e-3 → 1e-2 of ‖W‖: the
    first two are at bf16's rounding level (spectra diff warns on them)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(64, 64, generator=g) for n in NAMES}
    direction = {n: torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g) for n in NAMES}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    for step, mag in ((10, 1e-3), (20, 2e-3), (30, 1e-2)):
        d = tmp_path / "run" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file({n: (w + mag * w.norm() / direction[n].norm() * direction[n]).bfloat16() for n, w in base.items()},
                  str(d / "model.safetensors"))
    return tmp_path / "base", tmp_path / "run"


def test_trace_compare_interfere_warn_of_updates_at_the_rounding_level(tmp_path):
    """spectra diff warned; trace read a rank falling 30 → 2 as training concentrating the update, and
    interfere read cosine 0.5 between two checkpoints of one direction, without a word."""
    base, run = _bf16_run(tmp_path)
    c10, c30 = run / "checkpoint-10", run / "checkpoint-30"
    res = _cli("trace", base, run, "-o", tmp_path / "t")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert any(w.startswith("caveat (rounding_level)") and "4 of 4 matrices" in w for w in doc["warnings"])
    # step 20 (2e-3 of ‖W‖) holds ~60% update energy: with a float32 base, bf16's rounding is half a step, and the
    # note is precision_mismatch with that step's own share (nineteenth round), not step 10's rounding level
    assert all("at step 10: ΔW is at the rounding level of bfloat16" in m["note"]
               and "at step 20: base is float32 and tuned bfloat16" in m["note"] for m in doc["matrices"])
    res = _cli("compare", c10, c30, "--base", base, "--json")
    assert res.exit_code == 0, res.output
    doc = _json(res)
    assert [w.split(" (")[0] for w in doc["warnings"] if w.startswith("caveat (rounding_level)")] == ["caveat"]
    assert any("matrices of A (" in w for w in doc["warnings"] if w.startswith("caveat (rounding_level)"))
    assert "B: ΔW is at the rounding level" not in json.dumps(doc["modules"])  # 1e-2 of ‖W‖ is a real update
    res = _cli("interfere", "--base", base, c10, c30, "-o", tmp_path / "i")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "i" / "interfere.json").read_text())
    rounding = [w for w in doc["warnings"] if w.startswith("caveat (rounding_level)")]
    assert len(rounding) == 1 and f"of {c10}" in rounding[0]


# ---- an adapter of another base of the same shapes -------------------------------------------------------
def _lora_on(tmp_path, base_dir, name: str, **kw):
    """A PEFT LoRA (r = 2 on q/v, random non-zero factors) made on ``base_dir``, which its config records."""
    import transformers as T

    random_lora(T.LlamaForCausalLM.from_pretrained(base_dir), 1, r=2, target_modules=["q_proj", "v_proj"], **kw
                ).save_pretrained(tmp_path / name)
    assert json.loads((tmp_path / name / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    return tmp_path / name


def _tiny_llama(path, seed: int):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    T.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_an_adapter_of_another_local_base_is_said(tmp_path):
    """An adapter trained on base1 analysed against base2 (same architecture) passed silently: its rel_norm,
    amplification and intruders were measured against weights it was not trained on."""
    b1, b2 = _tiny_llama(tmp_path / "b1", 0), _tiny_llama(tmp_path / "b2", 1)
    ad = _lora_on(tmp_path, b1, "ad")
    other = "records the base"
    for args in (["diff", b2, ad], ["compare", ad, ad, "--base", b2], ["interfere", "--base", b2, ad, ad]):
        res = _cli(*args)
        assert res.exit_code == 0 and other in res.output, (args, res.output)
    for args in (["diff", b1, ad], ["diff", str(b1) + "/", ad], ["compare", ad, ad, "--base", b1]):
        res = _cli(*args)
        assert res.exit_code == 0 and other not in res.output, (args, res.output)


# ---- DoRA is not "k of r ranks used" -------------------------------------------------------------------------
def test_dora_findings_do_not_read_a_dense_update_against_r(tmp_path):
    """diff said "LoRA r = 2: 5 of 2 ranks used" of a DoRA adapter, and compare called its dense update
    one "of fewer directions than its rank"."""
    b1 = _tiny_llama(tmp_path / "b1", 0)
    ad = _lora_on(tmp_path, b1, "dora", use_dora=True)
    res = _cli("diff", b1, ad)
    assert res.exit_code == 0, res.output
    assert "DoRA (r = 2): each update is dense" in res.output and "of 2 ranks used" not in res.output
    res = _cli("compare", ad, ad, "--base", b1)
    assert res.exit_code == 0, res.output
    assert "fewer directions than its rank" not in res.output and "have a DoRA update, which is dense" in res.output


# ---- trace: checkpoints of several runs ----------------------------------------------------------------------
def test_trace_says_when_r_changes_and_when_any_checkpoint_outgrows_the_base(tmp_path):
    """Adapters of r = 2 and r = 4 traced together gave no warning (effective_rank_over_r changed its
    denominator silently); a full checkpoint of another base listed first was not flagged (only the last was)."""
    import peft
    import transformers as T

    b1 = _tiny_llama(tmp_path / "b1", 0)
    for step, r in ((1, 2), (2, 4)):
        m = peft.get_peft_model(T.LlamaForCausalLM.from_pretrained(b1),
                                peft.LoraConfig(r=r, target_modules=["q_proj"], init_lora_weights=False))
        m.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    res = _cli("trace", b1, tmp_path / "run", "-o", tmp_path / "t")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert any("the LoRA rank r differs between checkpoints for 2 of 2 modules" in w and "r = 2, 4" in w for w in doc["warnings"])
    assert [p["lora_r"] for p in doc["matrices"][0]["points"]] == [2, 4]

    b, t, _ = _pairs(tmp_path)  # a first checkpoint from another model, then two real ones
    from safetensors.torch import load_file, save_file

    for i, w in enumerate(("other", "c1", "c2")):
        d = tmp_path / "full" / f"checkpoint-{i + 1}"
        d.mkdir(parents=True)
        src = load_file(str(t))
        save_file({k: (torch.randn_like(v) * 3 if w == "other" else v + 0.01 * i * torch.ones_like(v)) for k, v in src.items()},
                  str(d / "model.safetensors"))
    res = _cli("trace", b, tmp_path / "full", "-o", tmp_path / "tf")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "tf" / "trace.json").read_text())
    assert any("larger than the base weights themselves at checkpoint-1" in w for w in doc["warnings"]), doc["warnings"]


# ---- report: values no run can write ------------------------------------------------------------------------
def test_report_refuses_values_no_run_writes(tmp_path):
    """Hand-edited results.json files rendered as numbers: "complete": "no" as finished, LoRA r = -8,
    stable rank 1e6 of a 16 × 16 matrix, ascending or too many singular values, a share of p that is not
    energy_rank / p, a nuclear norm below σ₁, one record twice, layer -3, elapsed -5 s."""
    b, t, _ = _pairs(tmp_path)
    res = _cli("diff", b, t, "-o", tmp_path / "d")
    assert res.exit_code == 0, res.output
    good = json.loads((tmp_path / "d" / "results.json").read_text())
    assert _cli("report", tmp_path / "d", "-o", tmp_path / "ok.html").exit_code == 0

    def m0(d):
        return d["modules"][0]

    edits = {
        "complete": lambda d: d.__setitem__("complete", "no"),
        "lora_r": lambda d: m0(d).__setitem__("lora_r", -8),
        "stable_rank": lambda d: m0(d).__setitem__("stable_rank", 1e6),
        "effective_rank": lambda d: m0(d).__setitem__("effective_rank", 999.0),
        "largest first": lambda d: m0(d).__setitem__("singular_values", sorted(m0(d)["singular_values"])),
        "min(shape) = 16": lambda d: m0(d)["singular_values"].extend([1e-12] * 10),
        "energy_rank_frac": lambda d: m0(d)["energy_rank_frac"].__setitem__("0.9", 0.9),
        "nuclear_norm": lambda d: m0(d).__setitem__("nuclear_norm", 1e-3),
        "this name came before": lambda d: d["modules"].append(json.loads(json.dumps(m0(d)))),
        "layer": lambda d: m0(d).__setitem__("layer", -3),
        "elapsed_s": lambda d: d.__setitem__("elapsed_s", -5),
    }
    for i, (word, edit) in enumerate(edits.items()):
        doc = json.loads(json.dumps(good))
        edit(doc)
        folder = tmp_path / f"e{i}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(doc))
        res = _cli("report", folder, "-o", folder / "r.html")
        assert res.exit_code == 1 and word in _last_line(res) and "Traceback" not in res.output, (word, res.output)
        assert not (folder / "r.html").exists()


def _last_line(res) -> str:
    return res.output.strip().splitlines()[-1]


def test_the_rank_finding_says_when_its_matrices_carry_a_caveat(tmp_path):
    """'The update is low-rank: the median matrix needs 19 of its p = 64' rested on matrices whose ΔW
    includes rounding fp32 weights to bf16 (precision_mismatch), without saying so beside it."""
    base, run = _bf16_run(tmp_path)
    res = _cli("diff", base, run / "checkpoint-30", "-o", tmp_path / "d")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "d" / "results.json").read_text())
    assert all("precision_mismatch" in caveat_codes(m["note"]) for m in doc["modules"])
    from spectra.findings import diff_findings
    from spectra.results import DiffResult

    found = diff_findings(DiffResult.load(tmp_path / "d" / "results.json"))
    rank = next(f for f in found if f.topic == "rank" and f.text.startswith("The update is"))
    assert rank.text.endswith("(all of these 4 matrices carry a numerical caveat: see the warnings)."), rank.text


# ---- the environment: stderr, locks, odd --out, variables -------------------------------------------------
def test_a_failing_stderr_does_not_stop_the_run(tmp_path):
    """`spectra diff … 2>/dev/full` (or progress under `2>&1 | head`) exited 1 with no output and, mid-run,
    results.json incomplete: a failed diagnostic write was taken for a failed output."""
    import subprocess
    import sys

    b, t, _ = _pairs(tmp_path)
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "spectra", "diff", str(b), str(t), "--json", "-o", str(tmp_path / "d")],
                              stdout=subprocess.PIPE, stderr=full, text=True, timeout=300)
    assert proc.returncode == 0
    assert len(json.loads(proc.stdout)["modules"]) == 4
    assert json.loads((tmp_path / "d" / "results.json").read_text())["complete"] is True


def test_a_lock_file_that_is_a_link_is_never_followed(tmp_path):
    """A planted `.spectra.lock -> ../victim` was opened through the link and truncated to the lock's JSON."""
    b, t, _ = _pairs(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / ".spectra.lock").symlink_to(victim)
    res = _cli("diff", b, t, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "a symbolic link stands where spectra writes a file of its own" in _last_line(res)
    assert victim.read_text() == "precious\n"


def test_an_out_that_is_not_a_folder_is_not_blamed_on_disk_space(tmp_path):
    b, t, _ = _pairs(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "missing" / "dir")
    for out in (tmp_path / "dangling", "/dev/null"):
        res = _cli("diff", b, t, "-o", out)
        assert res.exit_code == 1 and "it is not a folder" in _last_line(res) and "free disk space" not in _last_line(res), res.output


def test_an_unknown_user_in_the_hub_cache_variable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", "~no_such_user_here/x")
    res = _cli("diff", "acme/x", "acme/y")
    assert res.exit_code == 1 and "HF_HUB_CACHE='~no_such_user_here/x': its ~ cannot be expanded" in _last_line(res)
    assert "Traceback" not in res.output


def test_a_distributed_timeout_that_is_not_a_positive_number_is_named(monkeypatch):
    """nan, inf, 1e400, 0, -1 reached timedelta or the rendezvous and were blamed on MASTER_ADDR/MASTER_PORT."""
    import pytest

    from spectra.distributed import init
    from spectra.errors import ConfigError

    for var, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(var, value)
    for bad in ("nan", "inf", "1e400", "0", "-1", "abc"):
        monkeypatch.setenv("SPECTRA_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="is not a positive, finite number of seconds"):
            init(torch.device("cpu"))


def test_a_live_run_is_named_before_the_folder_is_called_not_empty(tmp_path):
    """A second `train --out` (or `extract -o`) into a folder a live run writes was told to pass --force,
    which would delete that run's files."""

    import pytest

    from spectra.errors import OutputError
    from spectra.extract_io import prepare_out
    from spectra.training_inputs import check_out

    out = tmp_path / "o"
    out.mkdir()
    (out / "train_log.jsonl").write_text("{}\n")
    with lock_held_elsewhere(out):
        with pytest.raises(OutputError, match="another spectra run is writing into this folder"):
            check_out(out, base=tmp_path / "base", inputs=[], force=False)
        with pytest.raises(OutputError, match="another spectra run is writing into this folder"):
            prepare_out(out, resume=False, force=False)
    with pytest.raises(Exception, match="not empty"):  # the holder gone: the folder is only not empty
        check_out(out, base=tmp_path / "base", inputs=[], force=False)


def test_a_stopped_demo_names_its_scratch_folder(tmp_path):
    """Ctrl-C during `spectra demo --quick` said "nothing was written (no --out)" and left its scratch folder unseen."""
    from spectra_cli.training import demo_cmd

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "checkpoints").mkdir()
    assert demo_cmd.stop_note({"out_dir": str(tmp_path / "d")}, None) == f"what the demo made so far is in {tmp_path / 'd'}/"
    assert demo_cmd.stop_note({"out_dir": str(tmp_path / "empty")}, None) == "nothing was written"


def test_the_depth_finding_of_equal_layers_does_not_name_one_as_both_extremes(tmp_path):
    """"highest in layer 0 (0.06), lowest in layer 0 (0.06)" on a model whose layers need the same rank."""
    from safetensors.torch import save_file

    from spectra.findings import diff_findings
    from spectra.results import DiffResult

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 16, generator=g) for i in range(6)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({n: w + 0.1 * torch.eye(16) for n, w in base.items()}, str(tmp_path / "t.safetensors"))
    assert _cli("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", tmp_path / "d", "--no-plots").exit_code == 0
    depth = next(f for f in diff_findings(DiffResult.load(tmp_path / "d" / "results.json")) if f.topic == "depth")
    assert "the same in every layer" in depth.text and "lowest in layer" not in depth.text, depth.text


# ---- the review's points -------------------------------------------------------------------------------------
def test_recommend_prints_and_writes_the_pattern_in_peft_order(tmp_path):
    """recommend's JSON was dumped with sort_keys=True, which sorted rank_pattern again: layers.0.fc before
    vision.layers.0.fc, so PEFT gave the vision module layers.0.fc's rank."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    ranks = {"layers.0.fc": 1, "vision.layers.0.fc": 3, **{f"{p}layers.{i}.fc": 2 for p in ("", "vision.") for i in (1, 2, 3)}}
    base = {f"{m}.weight": torch.randn(24, 24, generator=g) for m in ranks}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({k: v + 0.1 * torch.randn(24, r, generator=g) @ torch.randn(r, 24, generator=g)
               for (k, v), r in zip(base.items(), ranks.values(), strict=True)}, str(tmp_path / "t.safetensors"))
    assert _cli("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", tmp_path / "d", "--no-plots").exit_code == 0
    res = _cli("recommend", tmp_path / "d", "--energy", "0.99999", "-o", tmp_path / "lora.json")
    assert res.exit_code == 0, res.output
    for doc in (_json(res), json.loads((tmp_path / "lora.json").read_text())):
        assert list(doc["rank_pattern"]) == ["vision.layers.0.fc", "layers.0.fc"], doc["rank_pattern"]


def test_a_lock_file_that_is_a_fifo_or_a_hard_link_is_refused(tmp_path):
    """O_NOFOLLOW stops a symbolic link only: a hard-linked .spectra.lock was truncated like the link was,
    and a FIFO there would block the open forever."""
    import os

    b, t, _ = _pairs(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "h").mkdir()
    os.link(victim, tmp_path / "h" / ".spectra.lock")
    res = _cli("diff", b, t, "-o", tmp_path / "h")
    assert res.exit_code == 1 and "the lock file is not spectra's" in _last_line(res)
    assert victim.read_text() == "precious\n"
    (tmp_path / "f").mkdir()
    os.mkfifo(tmp_path / "f" / ".spectra.lock")
    res = _cli("diff", b, t, "-o", tmp_path / "f")
    assert res.exit_code == 1 and "the lock file is not spectra's" in _last_line(res)


def test_load_renames_of_a_hand_written_config_is_no_rename():
    from spectra.load_names import load_renames

    for cfg in ({"architectures": 5, "model_type": "llama"}, {"architectures": {}, "model_type": "llama"},
                {"architectures": ["NoSuchModel"], "model_type": "llama"}, {"architectures": ["LlamaForCausalLM"]}, None):
        assert load_renames(cfg, ["model.layers.0.self_attn.q_proj"]) == ({}, None)
    from spectra.io.peft_writer import task_type_for

    assert task_type_for({"architectures": 5}) is None


def test_an_approximate_runs_stable_rank_is_not_judged_against_p(tmp_path):
    """The sketch's σ₁ is a lower bound: a flat spectrum's stable rank can exceed p in an approximate run."""
    b, t, _ = _pairs(tmp_path)
    assert _cli("diff", b, t, "-o", tmp_path / "d", "--no-plots").exit_code == 0
    doc = json.loads((tmp_path / "d" / "results.json").read_text())
    doc["modules"][0].update(method="approx/sketch32", stable_rank=16.5)
    (tmp_path / "d" / "results.json").write_text(json.dumps(doc))
    assert _cli("report", tmp_path / "d", "-o", tmp_path / "r.html").exit_code == 0
    doc["modules"][0].update(method="exact/float64")
    (tmp_path / "d" / "results.json").write_text(json.dumps(doc))
    assert _cli("report", tmp_path / "d", "-o", tmp_path / "r2.html").exit_code == 1


def test_a_stopped_full_demo_is_not_called_a_scratch_folder(tmp_path, monkeypatch):
    from spectra_cli.training import demo_cmd

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "demo" / "runs").mkdir(parents=True)
    assert demo_cmd.stop_note({"out_dir": None}, None) == "what the demo made so far is in out/demo/"
