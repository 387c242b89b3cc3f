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
