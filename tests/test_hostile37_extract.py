"""Thirty-seventh round: what ``spectra extract`` writes, loaded by PEFT (docs/bad_inputs.md, "thirty-seventh round")."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_util import cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _qwen3_vl_moe(path, *, transposed: bool, seed: int, tuned_from=None, moe: int = 48):
    """A tiny Qwen3-VL-MoE saved (its expert stacks as the Hub stores them, ``(E, in, out)``, with ``transposed``); its
    ``gate_up_proj`` stack is square where ``2·moe`` equals the hidden size, 64."""
    tc = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=moe, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
              head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vc = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=1, num_position_embeddings=16, deepstack_visual_indexes=[0])
    torch.manual_seed(seed)
    model = transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(text_config=tc, vision_config=vc))
    if tuned_from is not None:
        model.load_state_dict(tuned_from.state_dict())
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "experts" in n:  # a rank-2 update of every expert
                    for e in range(p.shape[0]):
                        p[e].add_(0.05 * torch.randn(p.shape[1], 2, generator=g) @ torch.randn(2, p.shape[2], generator=g))
    model.save_pretrained(path)
    if transposed:
        st = load_file(str(path / "model.safetensors"))
        save_file({k: (v.transpose(1, 2).contiguous() if "experts" in k else v) for k, v in st.items()},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("moe", [48, 32])  # 32: a square (4, 64, 64) gate_up stack, which transformers loads as stored
def test_qwen3_vl_moe_stacks_stored_transposed_give_an_adapter_peft_loads_and_merges(tmp_path, moe):
    base = _qwen3_vl_moe(tmp_path / "base", transposed=True, seed=0, moe=moe)
    _qwen3_vl_moe(tmp_path / "tuned", transposed=True, seed=0, tuned_from=base, moe=moe)
    run = cli(["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "-o", str(tmp_path / "x"), "--include", "experts",
               "--rank", "2", "--no-plots"])
    assert run.returncode == 0, run.stderr
    loaded = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "base")
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    # the tuned model as transformers loads it (a square stack stored transposed is loaded as stored)
    want = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "tuned").state_dict()
    merged = peft.PeftModel.from_pretrained(loaded, tmp_path / "x").merge_and_unload().state_dict()  # "size mismatch" before
    stacks = [k for k in before if "experts" in k]
    assert stacks
    for k in stacks:  # each expert's update is rank 2: the rank-2 LoRA holds all of it
        assert torch.allclose(merged[k].double(), want[k].double(), atol=1e-5), k
    doc = json.loads((tmp_path / "x" / "extract.json").read_text())
    assert doc["totals"]["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    # read back by spectra on the same base, the adapter is the update (each expert's ΔW, in the same orientation)
    for name, (a, b) in {"adapter": (str(tmp_path / "base"), str(tmp_path / "x")),
                         "full": (str(tmp_path / "base"), str(tmp_path / "tuned"))}.items():
        r = cli(["diff", a, b, "--out", str(tmp_path / name), "--no-plots", "--include", "experts"])
        assert r.returncode == 0, r.stderr
    rows = [{m["name"].split("experts.")[-1]: m for m in json.loads((tmp_path / n / "results.json").read_text())["modules"]}
            for n in ("adapter", "full")]
    assert rows[0].keys() == rows[1].keys() and len(rows[0]) >= 8
    for key, m in rows[1].items():
        a = rows[0][key]
        assert a["shape"] == m["shape"] and a["fro_norm"] == pytest.approx(m["fro_norm"], rel=1e-4), key
        assert a["singular_values"][:2] == pytest.approx(m["singular_values"][:2], rel=1e-4), key


def _llama_pair(tmp_path, changed: str):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2 and changed in n:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "tuned")
    return str(tmp_path / "base"), str(tmp_path / "tuned")


def test_extract_of_a_selection_says_its_share_is_of_the_selected_matrices(tmp_path):
    # every matrix changed; --layers 1 reads a third of them: "share of all of ΔW's energy" was of those alone
    b, t = _llama_pair(tmp_path, "")
    run = cli(["extract", b, t, "-o", str(tmp_path / "x"), "--rank", "2", "--layers", "1", "--no-plots"])
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "x" / "extract.json").read_text())
    n_layer = 7  # q, k, v, o, gate, up, down
    assert doc["totals"]["modules"] == n_layer
    assert doc["totals"]["outside_selection"] == 2 * n_layer + 2  # the other layers, the embedding and the head
    assert any("left 16 matrices out" in w and "of the selected matrices" in w for w in doc["warnings"]), doc["warnings"]
    assert "share of the selected matrices' ΔW energy" in run.stdout, run.stdout
    full = cli(["extract", b, t, "-o", str(tmp_path / "y"), "--rank", "2", "--no-plots"])
    assert full.returncode == 0, full.stderr
    assert json.loads((tmp_path / "y" / "extract.json").read_text())["totals"]["outside_selection"] == 0


def test_extract_where_only_the_embedding_changed_names_it_instead_of_identical_weights(tmp_path):
    b, t = _llama_pair(tmp_path, "embed_tokens")
    run = cli(["extract", b, t, "-o", str(tmp_path / "x"), "--rank", "2", "--no-plots"])
    assert run.returncode not in (0, 3), (run.returncode, run.stderr)  # 3: "the updates are exactly zero"
    assert "model.embed_tokens.weight" in run.stderr and "--embeddings" in run.stderr, run.stderr
    assert "act on its reason" in run.stderr and "use the tuned checkpoint itself" not in run.stderr


def test_extract_of_a_selection_none_of_which_can_be_a_lora_says_why(tmp_path):
    # --include embed_tokens without --embeddings: the selection holds a changed matrix ("the selection is empty" before)
    b, t = _llama_pair(tmp_path, "")
    run = cli(["extract", b, t, "-o", str(tmp_path / "x"), "--rank", "2", "--include", "embed_tokens", "--no-plots"])
    assert run.returncode == 1, run.stderr
    text = run.stderr.replace("\n", " ")
    assert "selection is empty" not in text and "none of the 1 matrix selected can be a LoRA module" in text, run.stderr
    assert "model.embed_tokens.weight" in text and "--embeddings" in text
