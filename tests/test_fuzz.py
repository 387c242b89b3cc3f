"""Property-based fuzzing of the untrusted-input parsers (hypothesis): safetensors headers, index
files and adapter configs. Every case ends in a correct result or a SpectraError, never another
exception, a hang or a read outside the given folder. Case counts: FUZZ_EXAMPLES (default 300 each);
set SPECTRA_FUZZ_EXAMPLES=20000 for a long run."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from spectra.errors import SpectraError
from spectra.io.adapter import open_adapter
from spectra.io.checkpoint import open_checkpoint

FUZZ_EXAMPLES = int(os.environ.get("SPECTRA_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.text(max_size=20))
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "Q4", ""]), json_scalars),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_scalars),
    "data_offsets": st.one_of(st.lists(st.integers(-10, 2**40), min_size=0, max_size=3), json_scalars),
})
names = st.text(min_size=0, max_size=300)  # unicode, very long, HTML/JS, empty


def _check(path: Path) -> None:
    """Open and read everything; anything but success or a SpectraError fails the property."""
    try:
        ckpt = open_checkpoint(path)
        for name in ckpt.tensors:
            ckpt.load(name)
    except SpectraError as exc:
        assert str(exc)  # a message, one line or more, naming the problem


@SETTINGS
@given(header=st.dictionaries(names, st.one_of(entries, json_scalars), max_size=4), data=st.binary(max_size=64),
       declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_safetensors_headers(header, data, declared):
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        n = len(raw) if declared is None else declared
        path.write_bytes(struct.pack("<Q", n) + raw + data)
        _check(path)


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_arbitrary_bytes_as_safetensors(blob):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(blob)
        _check(path)


@SETTINGS
@given(weight_map=st.dictionaries(names, st.one_of(st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd", "sub/../../x",
                                                                     "missing.safetensors", "", "C:\\x"]), json_scalars), max_size=4),
       extra=st.dictionaries(st.text(max_size=8), json_scalars, max_size=2))
def test_index_files(weight_map, extra):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        folder.mkdir()
        save_file({"w": torch.zeros(2, 2)}, str(folder / "a.safetensors"))
        save_file({"secret": torch.ones(1)}, str(Path(d) / "a.safetensors"))  # outside the folder: must never be read
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map, **extra}))
        try:
            ckpt = open_checkpoint(folder)
            assert all(Path(t.file).resolve().is_relative_to(folder.resolve()) for t in ckpt.tensors.values())
            for name in ckpt.tensors:
                ckpt.load(name)
        except SpectraError:
            pass


@SETTINGS
@given(config=st.dictionaries(st.sampled_from(["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type",
                                               "fan_in_fan_out", "use_dora", "init_lora_weights", "target_modules"]),
                              st.one_of(json_scalars, st.dictionaries(st.text(max_size=12), json_scalars, max_size=3)), max_size=8))
def test_adapter_configs(config):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        g = torch.Generator().manual_seed(0)
        save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8, generator=g),
                   "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(6, 4, generator=g)},
                  str(folder / "adapter_model.safetensors"))
        try:
            adapter = open_adapter(folder)
            for mod in adapter.modules.values():
                assert mod.dense_delta().shape == (6, 8)
        except SpectraError:
            pass
