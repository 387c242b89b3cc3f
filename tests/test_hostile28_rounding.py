"""Twenty-eighth probe round: rounding-level updates and interfere (docs/bad_inputs.md, "twenty-eighth round")."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from spectra.comparison import compare
from spectra.interfere import interfere

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A bf16 tiny Llama and two tuned copies whose rank-2 update moves entries by about one bf16 step."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("onestep")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(cfg)
    base = {k: v.detach().to(torch.bfloat16).double() for k, v in model.state_dict().items() if "rotary" not in k}
    g = torch.Generator().manual_seed(1)
    U, V, U2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((64, 2), (2, 64), (64, 2)))
    eps = torch.finfo(torch.bfloat16).eps

    def save(name, sd):
        (root / name).mkdir()
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(root / name / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg.save_pretrained(root / name)

    save("base", base)
    for i, u in enumerate((U, U + 0.3 * U2)):
        tuned = {}
        for k, v in base.items():
            upd = u @ V
            tuned[k] = v + upd / upd.abs().max() * eps * v.abs().mean() * (1 + 0.5 * i) if v.ndim == 2 and "embed" not in k else v
        save(f"t{i}", tuned)
    return root


def test_interfere_calls_a_rounding_level_update_noise_as_compare_does(one_step):
    # interfere's floor was not raised for an update at the rounding level (the notes were not passed to it):
    # task 1 got rank 1 and captured energies on q_proj where compare, diff and its own note say rounding noise
    r = one_step
    c = next(m for m in compare(r / "t0", r / "t1", base=r / "base").modules if m.name == Q)
    i = next(m for m in interfere(r / "base", [r / "t0", r / "t1"]).modules if m["name"] == Q)
    assert (c.rank_a, c.rank_b) == (0, 0) and c.status == "unresolved"
    assert list(i["ranks"]) == [0, 0], i["ranks"]
    assert sorted(i["unresolved"]) == [0, 1]
