"""Twenty-seventh round, adapters (docs/bad_inputs.md, "twenty-seventh round"): one weights file holding two named
adapters (``lora_A.default.weight`` beside ``lora_A.second.weight``, as a state dict of a PeftModel with two adapters
saved by hand) called the second one's factors "a LoRA variant's own tensor", and with only the second one said the
file held no lora_A/lora_B at all."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra import diff
from spectra.errors import CheckpointFormatError
from spectra.io.adapter import open_adapter

_MOD = "base_model.model.model.layers.0.self_attn.q_proj"


def _adapter(folder, names: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    factors = {n: (torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g)) for n in names}
    save_file({f"{_MOD}.lora_{k}.{n}.weight": t for n, (A, B) in factors.items() for k, t in (("A", A), ("B", B))},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    return factors


def test_a_second_named_adapter_is_named_as_one(tmp_path):
    factors = _adapter(tmp_path / "two", ("default", "second"))
    res = diff(str(tmp_path / "two"))
    A, B = factors["default"]
    ref = np.linalg.svd(2.0 * B.double().numpy() @ A.double().numpy(), compute_uv=False)
    [m] = res.modules
    np.testing.assert_allclose(m.singular_values[:2], ref[:2], rtol=1e-6)  # the default adapter's update
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    short = _MOD.removeprefix("base_model.model.")
    assert set(reasons) == {f"{short}.lora_A.second.weight", f"{short}.lora_B.second.weight"}
    assert all(r.startswith("a factor of another named adapter") for r in reasons.values())


def test_only_another_named_adapter_is_said_so(tmp_path):
    _adapter(tmp_path / "one", ("second",))
    with pytest.raises(CheckpointFormatError, match=r"adapter holds no LoRA factors \(lora_A/lora_B\) of the adapter named default "
                                                    r"\(e\.g\. .*lora_A\.second\.weight is another named adapter's\)"):
        open_adapter(tmp_path / "one")
