"""Twenty-fourth round, `compare` (docs/bad_inputs.md, "twenty-fourth round"): orthogonal updates called "at chance",
a module an adapter targets but leaves at B = 0 called one-sided, an intruder k above p, workers 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra import CompareConfig, compare
from spectra.compare_findings import compare_findings

D = 32
LAYERS = 4  # "below chance" needs at least 4 modules of rank >= 4 (compare_findings.PHI_BELOW_MIN)


def _name(layer: int, mod: str) -> str:
    return f"model.layers.{layer}.self_attn.{mod}.weight"


def _adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int = 4) -> str:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r,
                                                            "target_modules": ["q_proj", "v_proj"]}))
    tensors = {}
    for name, (B, A) in factors.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        tensors[stem + ".lora_A.weight"], tensors[stem + ".lora_B.weight"] = A.contiguous(), B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """base/ (four layers of q_proj and v_proj), a/ (q_proj only, inputs e0…e3), orth/ (q_proj inputs e4…e7: φ = 0
    exactly) and zero/ (q_proj inputs e0…e3, and v_proj targeted with B = 0, as PEFT saves an untrained module)."""
    root = tmp_path_factory.mktemp("h24c")
    g = torch.Generator().manual_seed(0)
    (root / "base").mkdir()
    save_file({_name(i, m): torch.randn(D, D, generator=g) / D**0.5 for i in range(LAYERS) for m in ("q_proj", "v_proj")},
              str(root / "base" / "model.safetensors"))
    eye = torch.eye(D)

    def lora(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(D, 4, generator=g), eye[rows].clone()

    a = _adapter(root / "a", {_name(i, "q_proj"): lora(slice(0, 4)) for i in range(LAYERS)})
    orth = _adapter(root / "orth", {_name(i, "q_proj"): lora(slice(4, 8)) for i in range(LAYERS)})
    zero = _adapter(root / "zero", {**{_name(i, "q_proj"): lora(slice(0, 4)) for i in range(LAYERS)},
                                    **{_name(i, "v_proj"): (torch.zeros(D, 4), torch.randn(4, D, generator=g)) for i in range(LAYERS)}})
    return str(root / "base"), a, orth, zero


def test_orthogonal_updates_are_said_below_chance_not_at_chance(pair):
    """φ = 0 exactly against a baseline of 0.125 (ratio 5e-16) read "overlap no more than unrelated random subspaces
    would (at chance)": two updates that avoid each other's directions are the opposite of unrelated."""
    base, a, orth, _ = pair
    res = compare(a, orth, base=base)
    for m in res.modules:
        assert m.phi["right"].phi_full < 1e-12 and m.phi["right"].random == pytest.approx(4 / D)
    text = next(f.text for f in compare_findings(res) if f.topic == "phi")
    assert "below chance" in text and "(at chance)" not in text
    one = [_adapter(Path(orth).parent / f"r1_{i}", {_name(j, "q_proj"): (torch.randn(D, 1), torch.randn(1, D)) for j in
                                                      range(LAYERS)}, r=1) for i in range(2)]
    text = next(f.text for f in compare_findings(compare(*one, base=base)) if f.topic == "phi")
    assert "below chance" not in text  # rank 1: half of all unrelated pairs have φ below half its baseline
    same = compare(a, a, base=base)  # the identical pair still reads far above chance
    assert "clearly more than chance" in next(f.text for f in compare_findings(same) if f.topic == "phi")  # φ = 1: 8× its baseline


def test_a_targeted_module_left_at_zero_is_not_called_one_sided(pair):
    """v_proj targeted by B's adapter with lora_B = 0 (ΔW = 0) was listed in b_only: "2 modules are updated only by
    B", an update that does not exist."""
    base, a, _, zero = pair
    res = compare(a, zero, base=base)
    assert res.b_only == [] and res.a_only == []
    left = {s["name"]: s["reason"] for s in res.skipped}
    assert set(left) == {_name(i, "v_proj") for i in range(LAYERS)}
    assert all(r.startswith("B (") and "exactly zero" in r for r in left.values())
    assert not any("updated only by" in f.text for f in compare_findings(res))
    back = compare(zero, a, base=base)  # the other way round: A's
    assert back.a_only == [] and {s["name"] for s in back.skipped} == set(left)


def test_an_intruder_k_above_p_says_how_many_vectors_were_examined(pair):
    base, a, orth, _ = pair
    res = compare(a, orth, base=base, config=CompareConfig(intruder_k=1000))
    assert all(len(m.intruders[w].max_cos) == D for m in res.modules for w in ("a", "b"))
    text = next(f.text for f in compare_findings(res) if f.topic == "intruders")
    assert "top-1000" not in text and f"top-min(1000, p) = {D} singular vectors" in text
    default = compare(a, orth, base=base)
    assert "top-10 singular vectors" in next(f.text for f in compare_findings(default) if f.topic == "intruders")


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_workers_must_be_a_positive_whole_number(pair, workers):
    """compare(..., workers=0) and workers=-1 ran as one worker without a word."""
    base, a, orth, _ = pair
    with pytest.raises(ValueError, match="workers must be a whole number >= 1"):
        compare(a, orth, base=base, workers=workers)
    from spectra.engine import exact_spectra

    with pytest.raises(ValueError, match="workers must be"):
        exact_spectra([torch.eye(3)], workers=workers)
    assert np.allclose(exact_spectra([torch.eye(3)], workers=np.int64(2)).S, 1.0)  # a numpy integer is a count
