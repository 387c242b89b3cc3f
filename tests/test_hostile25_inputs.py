"""Twenty-fifth round, inputs a new user gets wrong (docs/bad_inputs.md, "twenty-fifth round"): an adapter's
weights file given instead of its folder, and an adapter given as compare's --base."""

from __future__ import annotations

import pytest

from tests.cli_util import cli
from tests.conftest import random_lora
from tests.train_util import tiny_llama


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_file")
    tiny_llama().save_pretrained(root / "base")
    for name, seed in (("a", 1), ("b", 2)):
        random_lora(tiny_llama(), seed, r=4, target_modules=["q_proj", "v_proj"]).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("args", [
    ["diff", "{base}", "{a}/adapter_model.safetensors"],
    ["compare", "{a}/adapter_model.safetensors", "{b}"],
    ["compare", "{a}/adapter_model.safetensors", "{b}", "--base", "{base}"],
    ["extract", "{base}", "{a}/adapter_model.safetensors", "-r", "2", "--out", "{out}"],
    ["interfere", "--base", "{base}", "{a}/adapter_model.safetensors", "{b}", "--out", "{out}"],
    ["trace", "{base}", "{a}/adapter_model.safetensors", "{b}/adapter_model.safetensors", "--out", "{out}"],
])
def test_an_adapters_weights_file_is_named_as_such(base_and_adapters, tmp_path, args):
    """`adapter_model.safetensors` given where its folder belongs: "no weight matrix of the base pairs … same
    architecture?" (diff, extract, interfere, compare --base), "is a full checkpoint: … pass --base" (compare: wrong,
    and following it led to the first), "no checkpoint pairs with the base" (trace)."""
    root = base_and_adapters
    filled = [a.format(base=root / "base", a=root / "a", b=root / "b", out=tmp_path / "out") for a in args]
    r = cli(filled)
    assert r.returncode not in (0, 2) and "Traceback" not in r.stderr, r.stderr
    assert "holds LoRA factors" in r.stderr and "pass the adapter's folder (with its adapter_config.json)" in r.stderr, r.stderr
    assert "same architecture" not in r.stderr and "pass --base BASE" not in r.stderr


def test_an_adapter_as_compares_base_gets_advice_for_compare(base_and_adapters):
    """`compare A B --base ADAPTER`: "an adapter goes second: `spectra diff BASE ADAPTER`, or alone" (diff's advice)."""
    root = base_and_adapters
    r = cli(["compare", str(root / "a"), str(root / "b"), "--base", str(root / "a")])
    assert r.returncode == 1 and "this folder is a PEFT adapter" in r.stderr, r.stderr
    assert "never the base: give the full model it was trained on as the base" in r.stderr
    assert "an adapter goes second" not in r.stderr


def test_inspect_of_an_adapters_weights_file_says_what_it_is(base_and_adapters):
    """`spectra inspect a/adapter_model.safetensors` listed its lora_A/lora_B factors as weight matrices, no word."""
    r = cli(["inspect", str(base_and_adapters / "a" / "adapter_model.safetensors")])
    assert r.returncode == 0 and "lora_A" in r.stdout
    assert "holds LoRA factors" in r.stderr and "pass the adapter's folder" in r.stderr, r.stderr
    plain = cli(["inspect", str(base_and_adapters / "base")])
    assert plain.returncode == 0 and "holds LoRA factors" not in plain.stderr


def test_an_adapters_weights_file_with_saved_modules_is_refused_too(tmp_path):
    """PEFT's adapter file with `modules_to_save` holds lm_head and embed_tokens copies beside the factors: those
    paired with the base, so diff, compare, extract and interfere ran on the two copies alone (exit 0) and dropped
    the q_proj LoRA update; compare.json said nothing of it."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    random_lora(tiny_llama(), 3, r=4, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]).save_pretrained(
        tmp_path / "mts")
    weights = str(tmp_path / "mts" / "adapter_model.safetensors")
    for args in (["diff", str(base), weights], ["compare", weights, str(base), "--base", str(base)],
                 ["extract", str(base), weights, "-r", "2", "--embeddings", "--out", str(tmp_path / "x")],
                 ["interfere", "--base", str(base), weights, str(base), "--out", str(tmp_path / "i")]):
        r = cli(args)
        assert r.returncode == 1 and "holds LoRA factors" in r.stderr, (args[0], r.stderr)
    # the folder is read as the adapter it is: its q_proj update measured
    ok = cli(["diff", str(base), str(tmp_path / "mts"), "--out", str(tmp_path / "d"), "--no-plots"])
    assert ok.returncode == 0 and "q_proj" in (tmp_path / "d" / "results.csv").read_text(), ok.stderr


def test_a_model_with_unmerged_lora_layers_is_a_model(tmp_path):
    """A model that ships its LoRA layers unmerged (`X.base_layer.weight` beside `X.lora_A.speech.weight`, as
    Phi-4-multimodal does; 4 of 5 tensors factors): esd refused it as "an adapter's weights file" and inspect told
    its user to find the adapter's folder, which does not exist."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn.q_proj"
        tensors[f"{p}.base_layer.weight"] = torch.randn(32, 32, generator=g)
        for name in ("speech", "vision"):
            tensors[f"{p}.lora_A.{name}.weight"] = torch.randn(4, 32, generator=g)
            tensors[f"{p}.lora_B.{name}.weight"] = torch.randn(32, 4, generator=g)
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    r = cli(["esd", str(folder), "--out", str(tmp_path / "e"), "--no-plots"])
    assert "holds LoRA factors" not in r.stderr and r.returncode == 0, r.stderr
    r = cli(["inspect", str(folder)])
    assert r.returncode == 0 and "holds LoRA factors" not in r.stderr
