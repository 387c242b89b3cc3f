"""Round 29 of hostile inputs: ``spectra interfere`` (docs/bad_inputs.md, "twenty-ninth round")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from spectra.interfere import interfere
from tests.test_interfere import make_adapter, tiny_llama


def test_lora_tasks_get_rel_norm_and_the_not_a_fine_tune_warning(tmp_path):
    # LoRA tasks had rel_norm null (only dense updates had one): an adapter 70× its base weights passed without the
    # "is it a fine-tune of this base?" warning that diff and compare give for it
    tiny_llama().save_pretrained(tmp_path / "base")
    refs = {who: make_adapter(tmp_path / "base", tmp_path / who, seed, targets=["q_proj"]) for who, seed in (("a", 1), ("b", 2))}
    scales = {"a": 0.01, "b": 30.0}  # a: a small update; b: ‖ΔW‖ 30× its random one, far past the base's norm
    for who, scale in scales.items():
        file = tmp_path / who / "adapter_model.safetensors"
        save_file({k: v * scale if "lora_B" in k else v for k, v in load_file(file).items()}, file)
    base = load_file(tmp_path / "base" / "model.safetensors")
    res = interfere(tmp_path / "base", [tmp_path / "a", tmp_path / "b"])
    assert res.modules
    for m in res.modules:
        W = base[m["name"]].double().numpy()
        for i, who in enumerate("ab"):
            want = scales[who] * np.linalg.norm(refs[who][m["name"]]) / np.linalg.norm(W)
            assert m["rel_norm"][i] == pytest.approx(want, rel=1e-5)
    assert max(m["rel_norm"][0] for m in res.modules) < 1 < min(m["rel_norm"][1] for m in res.modules)
    assert not any(w.startswith(str(tmp_path / "a")) and "fine-tune of this base" in w for w in res.warnings)
    assert any(w.startswith(str(tmp_path / "b")) and "is it a fine-tune of this base?" in w for w in res.warnings), res.warnings


def test_lora_only_module_with_a_huge_float64_base_is_still_measured(tmp_path):
    # the base is now read for every module: a float64 base beyond the squaring range must not skip a LoRA-only
    # module (its measures never square the base); its rel_norm is null, not inf
    model = tiny_llama()
    sd = {k: v.double() * 1e200 for k, v in model.state_dict().items()}
    (tmp_path / "base").mkdir()
    model.config.save_pretrained(tmp_path / "base")
    save_file(sd, tmp_path / "base" / "model.safetensors")
    tiny_llama().save_pretrained(tmp_path / "small")
    for who, seed in (("a", 1), ("b", 2)):
        make_adapter(tmp_path / "small", tmp_path / who, seed, targets=["q_proj"])
    res = interfere(tmp_path / "base", [tmp_path / "a", tmp_path / "b"])
    assert len(res.modules) == 2 and not res.skipped
    assert all(m["rel_norm"] == [None, None] for m in res.modules)
    assert all(np.isfinite(m["fro"]).all() for m in res.modules)
    assert torch.isfinite(torch.tensor([m["cosine"][0][1] for m in res.modules])).all()
