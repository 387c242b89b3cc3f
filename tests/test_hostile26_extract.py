"""Twenty-sixth round, extract and recommend (docs/bad_inputs.md, "twenty-sixth round"): a sequence classifier's
adapter PEFT could not load (its head missing from modules_to_save), and a tied-head warning for a model with no
output head.

Every model is a tiny random transformers model; references are PEFT's own loading and merging, and numpy's float64
SVD (Eckart–Young)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
_IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 7]])


def _planted(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A rank-4 update with singular values 1, .6, .35, .2 (times a random scale) plus dense noise."""
    out_dim, in_dim = shape
    k = min(4, out_dim, in_dim)
    scale = 0.01 + 0.02 * float(torch.rand((), generator=g))
    U, _ = torch.linalg.qr(torch.randn(out_dim, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_dim, k, generator=g, dtype=torch.float64))
    s = scale * torch.tensor([1.0, 0.6, 0.35, 0.2][:k], dtype=torch.float64)
    return ((U * s) @ V.T + 2e-3 * scale * torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)).float()


def _pair(root: Path, cls, model_type: str, **kw) -> tuple[Path, Path]:
    """``base/`` and ``tuned/`` (base + a planted update of every matrix of at least 3 rows and columns, the stored
    per-expert matrices included, and of every bias)."""
    torch.manual_seed(0)
    model = cls.from_config(transformers.AutoConfig.for_model(model_type, **kw)).float().eval()
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2 and min(p.shape) >= 3:
                p += _planted(tuple(p.shape), g)
            elif p.ndim == 3:
                for e in range(p.shape[0]):
                    p[e] += _planted(tuple(p.shape[1:]), g)
            elif p.ndim == 1 and n.endswith("bias"):
                p += 0.01 * torch.randn(p.shape, generator=g)
    model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[Path, Path]:
    return _pair(tmp_path_factory.mktemp("bert"), transformers.AutoModelForSequenceClassification, "bert", **_SMALL, num_labels=3)


def _trunc(d: np.ndarray, r: int) -> np.ndarray:
    U, S, Vh = np.linalg.svd(d, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _load(cls, base: Path, adapter: Path):
    """PEFT's model of base + adapter (no missing or unexpected adapter key), unmerged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what PEFT and transformers say on load is no part of the check
        model = peft.PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32).eval(), adapter)
        check = model.load_adapter(adapter, adapter_name="check")
    assert not [k for k in check.missing_keys if ".check." in k or k.endswith(".check")], check.missing_keys
    assert not check.unexpected_keys, check.unexpected_keys
    model.delete_adapter("check")
    model.set_adapter("default")
    return model


def _sd(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}


# ---- 1. a sequence classifier: PEFT stores its head whole ------------------------------------------------------------
@pytest.mark.parametrize("exclude", [None, "classifier"])
def test_a_seq_cls_adapter_loads_with_the_tuned_head_whole(bert, tmp_path, exclude):
    """task_type SEQ_CLS (auto) wrote no classifier: PeftModelForSequenceClassification adds it to modules_to_save and
    raised KeyError 'base_model.model.classifier.weight' on load, with the classifier extracted as LoRA or excluded."""
    from spectra.extract import ExtractConfig, extract

    base_dir, tuned_dir = bert
    res = extract(base_dir, tuned_dir, tmp_path / "a", config=ExtractConfig(rank=3, exclude=exclude), plots=False)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert not any(m["module"] == "classifier" for m in res.modules)  # no LoRA rank spent on it
    held = {r["name"]: r for r in res.not_lora if r["module"] == "classifier"}
    assert set(held) == {"classifier.weight", "classifier.bias"}
    assert all(r["held"] == "modules_to_save" and "SEQ_CLS" in r["reason"] for r in held.values())
    assert not any("classifier" in r["name"] for r in res.not_extracted)
    assert res.adapter["saved_params"] == 3 * 32 + 3
    cls = transformers.AutoModelForSequenceClassification
    model = _load(cls, base_dir, tmp_path / "a")
    with torch.no_grad():
        logits = model(input_ids=_IDS).logits.double()
    merged = {k: v.double() for k, v in model.merge_and_unload().state_dict().items()}
    base, tuned = _sd(base_dir), _sd(tuned_dir)
    ref = dict(base)
    for k in ("classifier.weight", "classifier.bias"):  # the tuned head, exactly
        torch.testing.assert_close(merged[k], tuned[k], rtol=0, atol=0)
        ref[k] = tuned[k]
    for m in res.modules:
        k = m["name"]
        want = base[k].numpy() + _trunc((tuned[k] - base[k]).numpy(), m["rank"])
        np.testing.assert_allclose(merged[k].numpy(), want, rtol=0, atol=2e-6 * float(np.abs(want - base[k].numpy()).max()) + 1e-7)
        ref[k] = torch.from_numpy(want)
    reference = cls.from_pretrained(base_dir, dtype=torch.float32).eval()
    reference.load_state_dict({k: v.float() for k, v in ref.items()}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(input_ids=_IDS).logits.double(), rtol=0, atol=1e-5)


def test_a_seq_cls_adapter_resized_from_an_adapter_keeps_its_head(bert, tmp_path):
    """Resizing a PEFT SEQ_CLS adapter (its classifier in modules_to_save) without --save-modules dropped the head:
    the written SEQ_CLS adapter did not load."""
    from spectra.extract import ExtractConfig, extract

    base_dir, _ = bert
    cls = transformers.AutoModelForSequenceClassification
    torch.manual_seed(0)
    lora = peft.get_peft_model(cls.from_pretrained(base_dir), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"],
                                                                            task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():
        lora.base_model.model.classifier.modules_to_save["default"].weight.add_(0.1)
    lora.save_pretrained(tmp_path / "in")
    extract(base_dir, tmp_path / "in", tmp_path / "out", config=ExtractConfig(rank=4), plots=False)
    got = _load(cls, base_dir, tmp_path / "out").merge_and_unload().state_dict()
    want = lora.merge_and_unload().state_dict()
    for k in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    for k in (k for k in want if k.endswith(("query.weight", "value.weight"))):  # rank 4 of a rank-4 update: all of it
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_recommend_for_a_seq_cls_model_trains_with_peft(bert, tmp_path):
    """recommend wrote task_type CAUSAL_LM (PEFT: no prepare_inputs_for_generation on a sequence classifier) and a LoRA
    rank for the classifier that SEQ_CLS ignores (its parameters counted all the same)."""
    from spectra import diff
    from spectra.recommend import recommend

    base_dir, tuned_dir = bert
    diff(base_dir, tuned_dir, plots=False).save(tmp_path / "d")
    rec = recommend(tmp_path / "d" / "results.json", energy=0.9)
    cfg = rec.config
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert "classifier" not in rec.ranks and "classifier" not in cfg["target_modules"] and "classifier" not in cfg["rank_pattern"]
    cls = transformers.AutoModelForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns of rank_pattern keys it ignores
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        model = peft.get_peft_model(cls.from_pretrained(base_dir), peft.LoraConfig(**cfg))
    out = model(input_ids=_IDS, labels=torch.tensor([1]))
    out.loss.backward()
    assert model.base_model.model.classifier.modules_to_save["default"].weight.grad is not None
    built = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert built == rec.params


# ---- 2. a tied-head warning only where there is a head ----------------------------------------------------------------
def test_no_tied_head_warning_for_a_model_without_an_output_head(bert, tmp_path):
    """BertForSequenceClassification (BertConfig's tie_word_embeddings defaults to true) was warned that its word
    embedding is tied to an lm_head it does not have; a masked LM, whose head is tied, still is."""
    from spectra.extract import ExtractConfig, extract

    base_dir, tuned_dir = bert
    res = extract(base_dir, tuned_dir, tmp_path / "a", config=ExtractConfig(rank=2, embeddings=True), plots=False)
    assert any(m["name"] == "bert.embeddings.word_embeddings.weight" and m["rank"] for m in res.modules)
    assert not [w for w in res.warnings if "tied to the output head" in w], res.warnings
    _load(transformers.AutoModelForSequenceClassification, base_dir, tmp_path / "a")
    from spectra.extract_results import has_output_head

    cfg = json.loads((base_dir / "config.json").read_text())
    assert not has_output_head(cfg) and has_output_head({**cfg, "architectures": ["BertForMaskedLM"]})
    base2, tuned2 = _pair(tmp_path / "mlm", transformers.AutoModelForMaskedLM, "bert", **_SMALL)
    res = extract(base2, tuned2, tmp_path / "b", config=ExtractConfig(rank=2, embeddings=True), plots=False)
    assert [w for w in res.warnings if "bert.embeddings.word_embeddings.weight is tied to the output head" in w], res.warnings


# ---- the review of the fix ---------------------------------------------------------------------------------------------
def test_a_classifier_fine_tuned_from_a_masked_lm_gets_its_head(bert, tmp_path):
    """The usual setup: BertForMaskedLM (the pretrained model) as the base, a BertForSequenceClassification as the
    tuned model. auto read the base's config only: task type null, the classifier left out (a random head on load)."""
    from spectra.extract import ExtractConfig, extract

    base_dir, tuned_dir = bert
    mlm = tmp_path / "mlm_base"
    mlm.mkdir()
    for f in base_dir.iterdir():
        (mlm / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((mlm / "config.json").read_text())
    (mlm / "config.json").write_text(json.dumps(cfg | {"architectures": ["BertForMaskedLM"]}))
    extract(mlm, tuned_dir, tmp_path / "a", config=ExtractConfig(rank=3), plots=False)
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["task_type"] == "SEQ_CLS" and written["modules_to_save"] == ["classifier"]
    model = _load(transformers.AutoModelForSequenceClassification, base_dir, tmp_path / "a")
    merged = model.merge_and_unload().state_dict()
    tuned = _sd(tuned_dir)
    assert torch.equal(merged["classifier.weight"].double(), tuned["classifier.weight"])  # the tuned head, whole


def test_recommend_keeps_causal_lm_where_no_classifier_is_named(tmp_path):
    """recommend's auto gave None for a causal LM whose config has no `architectures`, FEATURE_EXTRACTION for a
    LlamaModel: CAUSAL_LM was written before, and still is."""
    from spectra.extract_heads import head_task_type
    from spectra.extract_results import has_output_head

    assert head_task_type({"model_type": "llama"}) is None and head_task_type({"architectures": ["LlamaModel"]}) is None
    assert head_task_type({"architectures": ["LlamaForCausalLM"]}, {"architectures": ["LlamaForSequenceClassification"]}) == "SEQ_CLS"
    assert has_output_head({"architectures": ["GPTNeoXJapaneseForCausalLM"]})  # its head is `embed_out`
    import spectra
    from spectra.recommend import recommend
    from tests.pair_util import small_pair

    b, t = small_pair(tmp_path)  # two up_proj matrices, no config.json at all
    spectra.diff(b, t, out_dir=tmp_path / "d")
    assert recommend(tmp_path / "d" / "results.json").config["task_type"] == "CAUSAL_LM"
