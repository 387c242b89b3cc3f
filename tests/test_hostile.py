"""Hostile and odd inputs (issue 13, second round of outside probes): one test per cause.

Each test reproduces what the probe found (a traceback, a hang, a read outside the folder or a
silently wrong number) and checks the fix: a one-line :class:`spectra.errors.SpectraError` naming the
file or tensor, a documented skip, or a number equal to an independent reference (PEFT, the
``safetensors`` library, float64 numpy).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import spectra
from spectra.errors import CheckpointFormatError, CheckpointNotFoundError, PairingError, SpectraError, UnsafeCheckpointError
from spectra.io.adapter import AdapterConfig, open_adapter, pattern_key
from spectra.io.checkpoint import open_checkpoint
from spectra.io.jsonfile import MAX_JSON_DEPTH, json_depth, load_json, load_jsonl
from spectra.io.safetensors_file import MAX_DIM, read_header
from spectra.naming import display_name
from spectra.pairing import pair_checkpoints

peft = pytest.importorskip("peft")


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


def _st_bytes(header: dict | str | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _lora(module: str, r: int = 2, d_in: int = 8, d_out: int = 6, seed: int = 0, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}{module}.lora_A.weight": torch.randn(r, d_in, generator=g),
            f"{prefix}{module}.lora_B.weight": torch.randn(d_out, r, generator=g)}


# ---- cause 2: deeply nested JSON ---------------------------------------------------------------
def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b"1") == 0
    assert json_depth(b'{"a": [1, [2, {"b": []}]]}') == 5
    # brackets inside strings, escaped quotes and escaped backslashes do not count
    assert json_depth(rb'["[[[[", "\"[[", "\\", [{"k\\\"{": "]]]"}]]') == 3
    deep = b"[" * 1000 + b"]" * 1000
    assert json_depth(deep) == 1000
    # python's own parser agrees on every depth it can reach
    for text in (b"[]", b'{"a": {"b": [[], {}]}}', b'[["\\\\"], "[", {"x": ["]"]}]'):
        def depth(o):
            return 1 + max((depth(v) for v in (o.values() if isinstance(o, dict) else o)), default=0) if isinstance(o, (dict, list)) else 0
        assert json_depth(text) == depth(json.loads(text))


@pytest.mark.parametrize("where", ["header", "index", "config", "adapter_config"])
def test_deeply_nested_json_is_refused_before_parsing(tmp_path, where):
    start = time.perf_counter()
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    if where == "header":  # 5,000 levels inside a safetensors header
        deep = '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + "[" * 5000 + "]" * 5000 + "}}"
        bad = tmp_path / "deep.safetensors"
        bad.write_bytes(_st_bytes(deep, b"\0" * 4))
        target, opener = bad, open_checkpoint
    elif where == "index":
        bad = folder / "model.safetensors.index.json"
        bad.write_text('{"weight_map": {"w": "model.safetensors"}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
        target, opener = bad, open_checkpoint  # the folder itself reads model.safetensors first, as transformers
    elif where == "config":
        bad = folder / "config.json"
        bad.write_text("[" * 100_000 + "]" * 100_000)
        target, opener = folder, open_checkpoint
    else:
        bad = tmp_path / "adapter" / "adapter_config.json"
        _adapter(tmp_path / "adapter", _lora("q_proj"), {"r": 2})
        bad.write_text('{"r": 2, "x": ' + "{\"a\": " * 100_000 + "1" + "}" * 100_000 + "}")
        target, opener = tmp_path / "adapter", open_adapter
    with pytest.raises(CheckpointFormatError, match=rf"nested deeper than {MAX_JSON_DEPTH} levels") as exc:
        opener(target)
    assert str(bad) in _one_line(exc.value)
    assert time.perf_counter() - start < 5


def test_nesting_limit_is_the_safetensors_librarys(tmp_path):
    """serde_json (behind safe_open) stops at 128 levels: depth 127 is read by both, 128 by neither."""
    for depth, ok in ((MAX_JSON_DEPTH, True), (MAX_JSON_DEPTH + 1, False)):
        inner = "[" * (depth - 2) + "]" * (depth - 2)
        path = tmp_path / f"d{depth}.safetensors"
        path.write_bytes(_st_bytes('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": %s}}' % inner, b"\0" * 4))
        assert _library_accepts(path) is ok
        if ok:
            assert set(read_header(path)[0]) == {"w"}
        else:
            with pytest.raises(CheckpointFormatError, match="nested deeper"):
                read_header(path)


def test_load_json_refuses_oversized_files(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"pad": "x" * 2000}))
    with pytest.raises(CheckpointFormatError, match=r"config.json is 20\d\d bytes; more than 1000 is not a config.json"):
        load_json(path, what="config.json", max_bytes=1000)


def test_load_jsonl_names_the_line_and_can_drop_a_torn_tail(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n{"torn": ')
    assert load_jsonl(path, what="journal", skip_torn_tail=True) == [{"a": 1}, [2]]
    with pytest.raises(CheckpointFormatError, match="journal line 4 is not valid JSON"):
        load_jsonl(path, what="journal")
    path.write_text('{"a": 1}\n' + "[" * 200 + "]" * 200 + '\n{"b": 2}\n')  # a bad line that is not the last: always an error
    with pytest.raises(CheckpointFormatError, match="journal line 2 is nested deeper than 127 levels"):
        load_jsonl(path, what="journal", skip_torn_tail=True)


# ---- cause 4: corrupt and mislabelled .bin files -------------------------------------------------
@pytest.mark.parametrize("content,suffix,match", [
    (b"hello world\n", ".bin", r"not a PyTorch checkpoint \(it starts with b'hello world\\n'"),
    (b"r\0\0\0\0.", ".pt", r"not a PyTorch checkpoint \(it starts with b'r\\x00"),
    (b".", ".bin", r"not a PyTorch checkpoint \(it starts with b'\.'"),
    (b"\x80\x02corrupt", ".bin", r"cannot read this PyTorch file"),
    (b"", ".bin", r"the file is empty \(0 bytes\)"),
    (b'  {"weight_map": {"a": "b"}}', ".bin", r"this is a JSON file, not a PyTorch checkpoint"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", ".pt", r"this is an HTML page, not a PyTorch checkpoint"),
    (_st_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ".bin",
     r"this is a safetensors file named \.bin"),
])
def test_corrupt_or_mislabelled_bin_is_a_format_error(tmp_path, content, suffix, match):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=match) as exc:
        open_checkpoint(path)
    text = _one_line(exc.value)
    assert "pickle code execution" not in text and str(path) in text
    assert not isinstance(exc.value, UnsafeCheckpointError)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_code_executing_pickles_still_say_so(tmp_path, monkeypatch, protocol):
    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps({"w": _Evil()}, protocol=protocol))
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    with pytest.raises(UnsafeCheckpointError, match=r"would need pickle code execution \(it calls (posix|os)\.system"):
        open_checkpoint(path)
    assert calls == []


# ---- cause 5: nn.Parameter, sparse and meta tensors in a .bin -------------------------------------
def test_parameters_in_a_bin_are_ordinary_tensors(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    tuned = torch.nn.Linear(16, 12)
    with torch.no_grad():
        tuned.weight.copy_(base.weight + 0.01 * torch.randn(12, 16))
    torch.save(base.state_dict(keep_vars=True), tmp_path / "base.bin")  # holds nn.Parameter objects
    torch.save(dict(tuned.named_parameters()), tmp_path / "tuned.bin")
    ckpt = open_checkpoint(tmp_path / "tuned.bin")
    w = ckpt.load("weight")
    assert type(w) is torch.Tensor and not w.requires_grad
    res = spectra.diff(tmp_path / "base.bin", tmp_path / "tuned.bin")
    (mod,) = res.modules
    ref = np.linalg.norm(tuned.weight.detach().double().numpy() - base.weight.detach().double().numpy())
    assert mod.fro_norm == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("kind", ["sparse", "meta", "quantized"])
def test_sparse_meta_and_quantised_tensors_are_refused_naming_them(tmp_path, kind):
    t = {"sparse": torch.eye(4).to_sparse(), "meta": torch.empty(4, 4, device="meta"),
         "quantized": torch.quantize_per_tensor(torch.ones(4, 4), 0.1, 0, torch.qint8)}[kind]
    torch.save({"ok.weight": torch.ones(4, 4), "odd.weight": t}, tmp_path / "x.bin")
    with pytest.raises(CheckpointFormatError, match=f"tensor 'odd.weight': {kind[:5]}") as exc:
        open_checkpoint(tmp_path / "x.bin")
    _one_line(exc.value)


# ---- cause 8: huge declared shapes --------------------------------------------------------------
@pytest.mark.parametrize("shape", [[2**50, 0], [2**40, 0, 8], [0, 2**31 + 1]])
def test_absurd_dimensions_are_refused_at_the_header(tmp_path, shape):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_st_bytes({"model.layers.0.mlp.experts.down_proj": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}))
    start = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match=rf"dimension {max(shape)} .* larger than {MAX_DIM}"):
        open_checkpoint(path)
    assert time.perf_counter() - start < 5  # O(1): a loop over the declared axis would take hours


def test_empty_matrices_are_skipped_as_empty(tmp_path):
    sd = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(0, 16), "model.layers.0.mlp.experts.down_proj": torch.zeros(2**20, 0, 8),
          "model.layers.0.self_attn.k_proj.weight": torch.ones(4, 4)}
    save_file(sd, str(tmp_path / "b.safetensors"))
    save_file({**sd, "model.layers.0.self_attn.k_proj.weight": 2 * torch.ones(4, 4)}, str(tmp_path / "t.safetensors"))
    start = time.perf_counter()
    pairing = pair_checkpoints(open_checkpoint(tmp_path / "b.safetensors"), open_checkpoint(tmp_path / "t.safetensors"))
    assert time.perf_counter() - start < 10  # the (2**20, 0, 8) stack is never iterated
    reasons = {s.name: s.reason for s in pairing.skipped}
    assert reasons["model.layers.0.self_attn.q_proj.weight"].startswith("empty tensor (shape (0, 16))")
    assert reasons["model.layers.0.mlp.experts.down_proj"].startswith("empty tensor (shape (1048576, 0, 8))")
    assert [p.tuned.name for p in pairing.pairs] == ["model.layers.0.self_attn.k_proj.weight"]


# ---- cause 9: FIFOs and other non-regular files --------------------------------------------------
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["input_safetensors", "input_bin", "shard", "index", "config", "adapter_config",
                                   "adapter_weights", "socket", "folder_as_file"])
def test_non_regular_files_are_refused_without_blocking(tmp_path, where):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(folder / "a.safetensors"))
    if where == "input_safetensors":
        target, opener, kind = _fifo(tmp_path / "x.safetensors"), open_checkpoint, "a FIFO \\(named pipe\\)"
    elif where == "input_bin":
        target, opener, kind = _fifo(tmp_path / "x.bin"), open_checkpoint, "a FIFO \\(named pipe\\)"
    elif where == "shard":
        _fifo(folder / "b.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}))
        target, opener, kind = folder, open_checkpoint, "a FIFO \\(named pipe\\)"
    elif where == "index":
        _fifo(folder / "model.safetensors.index.json")
        target, opener, kind = folder, open_checkpoint, "a FIFO \\(named pipe\\)"
    elif where == "config":
        _fifo(folder / "config.json")
        target, opener, kind = folder / "a.safetensors", open_checkpoint, "a FIFO \\(named pipe\\)"
    elif where == "adapter_config":
        (tmp_path / "ad").mkdir()
        save_file(_lora("q_proj"), str(tmp_path / "ad" / "adapter_model.safetensors"))
        _fifo(tmp_path / "ad" / "adapter_config.json")
        target, opener, kind = tmp_path / "ad", open_adapter, "a FIFO \\(named pipe\\)"
    elif where == "adapter_weights":
        (tmp_path / "ad").mkdir()
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"r": 2}))
        _fifo(tmp_path / "ad" / "adapter_model.safetensors")
        target, opener, kind = tmp_path / "ad", open_adapter, "a FIFO \\(named pipe\\)"
    elif where == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(tmp_path / "s.safetensors"))
        target, opener, kind = tmp_path / "s.safetensors", open_checkpoint, "a socket"
    else:
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "model.safetensors").mkdir()
        target, opener, kind = tmp_path / "f", open_checkpoint, "a folder"
    with pytest.raises(SpectraError, match=f"is {kind}, not a regular file") as exc:
        opener(target)
    _one_line(exc.value)


# ---- cause 10: regular expressions from untrusted configs ----------------------------------------
def test_catastrophic_pattern_is_refused_quickly(tmp_path):
    name = "a" * 5000 + "c"
    folder = _adapter(tmp_path / "ad", _lora(name), {"r": 2, "lora_alpha": 4, "alpha_pattern": {"(a|a)+b": 2}})
    start = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match=r"alpha_pattern key '\(a\|a\)\+b' .*nested") as exc:
        open_adapter(folder)
    assert time.perf_counter() - start < 1
    assert str(folder / "adapter_config.json") in _one_line(exc.value)


def test_pattern_matching_has_a_wall_clock_bound(tmp_path):
    """Each match is bounded by the key's shape; their number by a time budget (here spent before the first)."""
    folder = _adapter(tmp_path / "ad", _lora("model.layers.0.q_proj"), {"r": 2, "alpha_pattern": {r"layers\.\d+\..*": 4}})
    assert open_adapter(folder).modules["model.layers.0.q_proj"].alpha == 4.0
    with pytest.raises(CheckpointFormatError, match=r"matching 1 module names against the patterns of adapter_config.json took over"):
        open_adapter(folder, match_budget_s=-1.0)


@pytest.mark.parametrize("key", ["(a+)+b", "(a*)*b", "(ab|a)*c", "(a?)+b", "(.*a){5}x", r"(\w+\.)*x", "(a|b|ab)*c", r"(a)\1"])
def test_dangerous_pattern_shapes_are_refused(tmp_path, key):
    with pytest.raises(CheckpointFormatError, match="rank_pattern key"):
        AdapterConfig.from_file(_config(tmp_path, {"r": 2, "rank_pattern": {key: 4}}))


def _config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_pattern_matching_agrees_with_peft():
    from peft.utils.other import get_pattern_key

    keys = ["q_proj", "layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj", r"layers\.[0-3]\..*q_proj",
            "^model.layers.1.*", "self_attn.(q|v)_proj", r"mlp\.\w+_proj", ".*", "v_proj$", "(?!.*vision).*o_proj"]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.12.self_attn.v_proj",
             "model.layers.0.mlp.down_proj", "vision.layers.0.o_proj", "model.layers.3.self_attn.o_proj", "q_proj",
             "model.qq_proj", "model.layers.0.self_attn.qkv_proj", "x.q_proj\n"]
    for key in keys:
        for name in names:
            ours = pattern_key({key: 1}, name)
            theirs = get_pattern_key([key], name)
            assert (ours == key) == (theirs == key and re.match(rf"(.*\.)?({key})$", name) is not None), (key, name)


def test_long_names_with_literal_keys_are_fast():
    name = "x." * 100_000 + "q_proj"
    start = time.perf_counter()
    assert pattern_key({"q_proj": 2, "k_proj": 3}, name) == "q_proj"
    assert time.perf_counter() - start < 2  # string comparison, not a regex: microseconds


# ---- cause 13: safetensors headers as strict as the library --------------------------------------
E4 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
HEADER_CASES = {
    # name: (header text, data bytes)
    "duplicate name, different bytes": ('{"a": %s, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}' % json.dumps(E4), 8),
    "two names aliasing the same bytes": (json.dumps({"a": E4, "b": E4}), 4),
    "overlapping ranges": (json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}), 12),
    "gap between tensors": (json.dumps({"a": E4, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}), 12),
    "first tensor not at 0": (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}), 8),
    "trailing bytes": (json.dumps({"a": E4}), 5),
    "__metadata__ with a number": (json.dumps({"__metadata__": {"x": 1}, "a": E4}), 4),
    "__metadata__ a list": (json.dumps({"__metadata__": ["x"], "a": E4}), 4),
    "-0 in a shape": ('{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', 0),
    "1.0 in a shape": ('{"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', 4),
    "NaN": ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": NaN}}', 4),
    "1e400": ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1e400}}', 4),
    "lone surrogate in a name": ('{"a\\ud800": %s}' % json.dumps(E4), 4),
    "three offsets": ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}', 4),
    "missing dtype": ('{"a": {"shape": [1], "data_offsets": [0, 4]}}', 4),
    "dtype in lower case": ('{"a": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}', 4),
    "a string where an entry belongs": ('{"a": "x"}', 0),
    "F4 with an odd count": ('{"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}', 2),
    "__metadata__ twice": ('{"__metadata__": {}, "__metadata__": {"a": "b"}, "a": %s}' % json.dumps(E4), 4),
    "element count overflowing 64 bits before a 0": (json.dumps({"a": {"dtype": "F32", "shape": [2**31, 2**31, 4, 0],
                                                                      "data_offsets": [0, 0]}}), 0),
    # accepted by both
    "__metadata__ null": (json.dumps({"__metadata__": None, "a": E4}), 4),
    "unknown extra field": (json.dumps({"a": {**E4, "zz": [1, {"q": None}]}}), 4),
    "zero-length tensors sharing an offset": (json.dumps({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                                                           "b": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}), 0),
    "entries out of offset order": (json.dumps({"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, "a": E4}), 8),
    "surrogate pair in a name": ('{"a\\ud83d\\ude00": %s}' % json.dumps(E4), 4),
    "whitespace around": (" \n\t" + json.dumps({"a": E4}) + "\r  ", 4),
    "U16, C64, F8_E8M0, F4, F6": (json.dumps({"u": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]},
                                              "c": {"dtype": "C64", "shape": [1], "data_offsets": [4, 12]},
                                              "e": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [12, 14]},
                                              "f": {"dtype": "F4", "shape": [2, 2], "data_offsets": [14, 16]},
                                              "s": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [16, 19]}}), 19),
    "empty header": ("{}", 0),
    "element count 2^63 before a 0": (json.dumps({"a": {"dtype": "F32", "shape": [2**31, 2**31, 2, 0], "data_offsets": [0, 0]}}), 0),
    "big integer in an extra field": ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 123456789012345678901234567890}}', 4),
}


def _library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
        return True
    except Exception:  # noqa: BLE001 - the library's verdict, whatever its exception type
        return False


def _we_accept(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except CheckpointFormatError as exc:
        _one_line(exc)
        return False


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_validation_agrees_with_the_safetensors_library(tmp_path, case):
    header, n = HEADER_CASES[case]
    path = tmp_path / "m.safetensors"
    path.write_bytes(_st_bytes(header, bytes(range(n))))
    assert _we_accept(path) == _library_accepts(path), case


def test_duplicate_names_are_refused_even_when_identical(tmp_path):
    """The library keeps the last of two identical entries; we refuse every duplicate (stricter, on purpose)."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(_st_bytes('{"a": %s, "a": %s}' % (json.dumps(E4), json.dumps(E4)), b"\0" * 4))
    assert _library_accepts(path)
    with pytest.raises(CheckpointFormatError, match="key 'a' appears twice"):
        read_header(path)


def test_accepted_headers_read_the_same_values_as_the_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"b": torch.randn(3, 5, generator=g), "a": torch.randn(7, generator=g).to(torch.bfloat16), "z": torch.zeros(0, 4),
          "u": torch.arange(6, dtype=torch.int32).reshape(2, 3).to(torch.uint16)}
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    entries, meta = read_header(tmp_path / "m.safetensors")
    assert meta == {"format": "pt"}
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        for name in f.keys():
            ours, theirs = ckpt.load(name), f.get_tensor(name)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
            assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), name  # bit-identical


# ---- cause 14: PEFT's defaults -----------------------------------------------------------------
def test_adapter_config_defaults_are_peft_defaults(tmp_path):
    fields = {f.name: f for f in __import__("dataclasses").fields(peft.LoraConfig)}
    ours = AdapterConfig.from_file(_config(tmp_path, {}))
    peft_default = peft.LoraConfig()
    for name in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "use_dora", "init_lora_weights", "lora_bias",
                 "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
        assert name in fields, name
        assert getattr(ours, name) == getattr(peft_default, name), name
    assert ours.rank_pattern == (peft_default.rank_pattern or {}) and ours.alpha_pattern == (peft_default.alpha_pattern or {})
    assert ours.scale("anything") == peft_default.lora_alpha / peft_default.r == 1.0


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 6)
        self.v_proj = torch.nn.Linear(8, 6)
        self.norm = torch.nn.LayerNorm(6)


def _peft_adapter(tmp_path: Path, **kwargs) -> tuple[Path, _Tiny]:
    torch.manual_seed(0)
    base = _Tiny()
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(tmp_path / "ad")
    return tmp_path / "ad", base


def test_missing_lora_alpha_is_peft_default_8_not_r(tmp_path):
    folder, base = _peft_adapter(tmp_path, r=4, lora_alpha=32, target_modules=["q_proj"])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    assert loaded.peft_config["default"].lora_alpha == 8
    merged = loaded.merge_and_unload().q_proj.weight.detach().double()
    mod = open_adapter(folder).modules["q_proj"]
    assert (mod.r, mod.alpha, mod.scale) == (4, 8.0, 2.0)
    torch.testing.assert_close(mod.dense_delta(), merged - base.q_proj.weight.detach().double(), rtol=0, atol=1e-6)


# ---- cause 15: DoRA magnitudes ------------------------------------------------------------------
def test_dora_without_magnitudes_is_an_error(tmp_path):
    folder = _adapter(tmp_path / "ad", _lora("q_proj"), {"r": 2, "use_dora": True})
    with pytest.raises(CheckpointFormatError, match="use_dora is true but LoRA module q_proj has no lora_magnitude_vector") as exc:
        open_adapter(folder)
    _one_line(exc.value)


@pytest.mark.parametrize("shape", [(1,), (8,), (6, 1)])
def test_dora_magnitude_must_be_out_shaped_as_peft_requires(tmp_path, shape):
    folder, _ = _peft_adapter(tmp_path, r=2, use_dora=True, target_modules=["q_proj"])
    from safetensors.torch import load_file

    sd = load_file(str(folder / "adapter_model.safetensors"))
    (mag,) = [k for k in sd if "lora_magnitude_vector" in k]
    assert tuple(sd[mag].shape) == (6,)
    sd[mag] = torch.ones(shape)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    with pytest.raises(Exception):  # noqa: B017 - PEFT itself refuses the file (size mismatch)
        peft.PeftModel.from_pretrained(_Tiny(), folder)
    with pytest.raises(CheckpointFormatError, match=re.escape(f"has shape {shape}; PEFT requires (out,) = (6,)")) as exc:
        open_adapter(folder)
    assert mag in _one_line(exc.value)


def test_magnitudes_without_use_dora_are_skipped_as_peft_ignores_them(tmp_path):
    tensors = {**_lora("q_proj"), "base_model.model.q_proj.lora_magnitude_vector": torch.ones(6)}
    ad = open_adapter(_adapter(tmp_path / "ad", tensors, {"r": 2}))
    assert ad.modules["q_proj"].magnitude is None
    assert [(s.name, s.reason.split(":")[0]) for s in ad.skipped] == [
        ("base_model.model.q_proj.lora_magnitude_vector", "DoRA magnitude, but use_dora is false in adapter_config.json")]


# ---- cause 16: one factor under two names ---------------------------------------------------------
@pytest.mark.parametrize("other", ["q_proj.lora_A.weight", "base_model.model.q_proj.lora_A.default.weight"])
def test_same_factor_under_two_names_is_an_error(tmp_path, other):
    tensors = {**_lora("q_proj"), other: 100 * torch.ones(2, 8)}
    folder = _adapter(tmp_path / "ad", tensors, {"r": 2})
    with pytest.raises(CheckpointFormatError, match="are the same LoRA factor") as exc:
        open_adapter(folder)
    assert "base_model.model.q_proj.lora_A.weight" in _one_line(exc.value) and other in str(exc.value)


# ---- cause 20: sides that disagree on orientation --------------------------------------------------
def _gpt2_state(d: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"transformer.wte.weight": torch.randn(50, d, generator=g),
            "transformer.h.0.attn.c_attn.weight": torch.randn(d, 3 * d, generator=g),  # Conv1D: (in, out)
            "transformer.h.0.attn.c_proj.weight": torch.randn(d, d, generator=g),
            "transformer.h.0.mlp.c_fc.weight": torch.randn(d, 4 * d, generator=g),
            "transformer.h.0.mlp.c_proj.weight": torch.randn(4 * d, d, generator=g)}


def _save(folder: Path, sd: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_sides_disagreeing_on_orientation_over_the_same_bytes_are_refused(tmp_path):
    sd = _gpt2_state()
    base = _save(tmp_path / "b", sd, {"model_type": "gpt2", "n_embd": 16, "n_head": 4})
    tuned = _save(tmp_path / "t", {k: v + 1e-3 for k, v in sd.items()},
                  {"model_type": "gpt_bigcode", "n_embd": 16, "n_head": 4, "multi_query": False})
    with pytest.raises(PairingError, match=r"base stores transformer\.h\.0\.attn\.c_attn\.weight as \(in, out\) "
                                           r"\(config.json model_type 'gpt2'\) but tuned as \(out, in\) "
                                           r"\(config.json model_type 'gpt_bigcode'\)") as exc:
        pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned))
    assert "shape mismatch" not in _one_line(exc.value)


def test_sides_in_different_layouts_confirmed_by_shapes_are_reconciled(tmp_path):
    """GPT-2 Conv1D storage against the same model converted to nn.Linear storage (gpt_bigcode): each
    side is oriented by its own config, confirmed by its shapes, and ΔW is formed in (out, in). The fused
    c_attn is laid out differently by the two configs (GPT-2: q, k, v blocks; GPT-BigCode without
    multi-query: q, k, v per head, transformers' view(heads, 3·head_dim)): it is skipped with that reason."""
    sd = _gpt2_state()
    g = torch.Generator().manual_seed(5)
    linear = {k: (v.T.contiguous() if ".h." in k else v) + 1e-3 * torch.randn(v.T.shape if ".h." in k else v.shape, generator=g)
              for k, v in sd.items()}
    base = _save(tmp_path / "b", sd, {"model_type": "gpt2", "n_embd": 16, "n_head": 4})
    tuned = _save(tmp_path / "t", linear, {"model_type": "gpt_bigcode", "n_embd": 16, "n_head": 4, "multi_query": False})
    pairing = pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned))
    by = {p.tuned.name: p for p in pairing.pairs}
    assert "each oriented by its own config.json" in by["transformer.h.0.attn.c_proj.weight"].note
    res = spectra.diff(base, tuned)
    assert {s["name"] for s in res.skipped if "laid out differently" in s["reason"]} == {
        "transformer.h.0.attn.c_attn.weight"}
    checked = 0
    for m in res.modules:
        stored = m.name.split(":")[0]
        if ".h." not in stored:
            continue
        assert "c_attn" not in stored
        ref = linear[stored].double() - sd[stored].double().T
        checked += 1
        assert m.fro_norm == pytest.approx(float(np.linalg.norm(ref.numpy())), rel=1e-6), m.name
    assert checked == 3


# ---- cause 21: reads outside the folder -----------------------------------------------------------
def test_index_through_a_symlink_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(outside / "secret.safetensors"))
    os.symlink(outside, folder / "r")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "r/secret.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match="resolves outside the checkpoint folder") as exc:
        open_checkpoint(folder)
    assert "r/secret.safetensors" in _one_line(exc.value)


@pytest.mark.parametrize("link", ["model.safetensors", "config.json"])
def test_symlinked_files_pointing_outside_are_refused(tmp_path, link):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "elsewhere.safetensors"))
    (tmp_path / "elsewhere.json").write_text("{}")
    if link == "config.json":
        save_file({"w": torch.ones(2, 2)}, str(folder / "model.safetensors"))
        os.symlink(tmp_path / "elsewhere.json", folder / "config.json")
    else:
        os.symlink(tmp_path / "elsewhere.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=f"{link} resolves outside the checkpoint folder"):
        open_checkpoint(folder)


def test_hub_ref_pointing_outside_the_cache_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    entry = cache / "models--acme--tiny"
    (entry / "refs").mkdir(parents=True)
    (entry / "snapshots").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(outside / "model.safetensors"))
    (entry / "refs" / "main").write_text("../../../outside")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(CheckpointNotFoundError, match="refs/main holds '../../../outside', not a commit") as exc:
        open_checkpoint("acme/tiny")
    _one_line(exc.value)


def test_hub_snapshot_links_into_its_blobs_are_followed(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    entry = cache / "models--acme--tiny"
    snap = entry / "snapshots" / "abc"
    (entry / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(2, 2)}, str(entry / "blobs" / "f00"))
    (entry / "blobs" / "c0f").write_text(json.dumps({"model_type": "llama"}))
    os.symlink("../../blobs/f00", snap / "model.safetensors")
    os.symlink("../../blobs/c0f", snap / "config.json")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ckpt = open_checkpoint("acme/tiny")
    assert ckpt.config == {"model_type": "llama"} and list(ckpt.tensors) == ["w"]


# ---- misleading messages ------------------------------------------------------------------------
def test_matrix_paired_with_a_vector_is_called_so(tmp_path):
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4), "model.norm.weight": torch.ones(4, 4)},
              str(tmp_path / "b.safetensors"))
    save_file({"model.layers.0.self_attn.q_proj.weight": 2 * torch.ones(4, 4), "model.norm.weight": torch.ones(4)},
              str(tmp_path / "t.safetensors"))
    pairing = pair_checkpoints(open_checkpoint(tmp_path / "b.safetensors"), open_checkpoint(tmp_path / "t.safetensors"))
    (skip,) = pairing.skipped
    assert skip.reason == "shape mismatch: base (4, 4) is a matrix, tuned (4,) is a 1-D tensor"


def test_lora_bias_is_named_as_such(tmp_path):
    folder, _ = _peft_adapter(tmp_path, r=2, lora_bias=True, target_modules=["q_proj"])
    ad = open_adapter(folder)
    (skip,) = ad.skipped
    assert skip.name.endswith("q_proj.lora_B.bias") and skip.reason.startswith("LoRA bias (lora_bias=True)")
    assert not ad.full


def test_target_modules_are_honoured(tmp_path):
    tensors = {**_lora("model.layers.0.self_attn.q_proj"), **_lora("model.layers.0.self_attn.k_proj", seed=1),
               **_lora("model.layers.1.self_attn.q_proj", seed=2)}
    ad = open_adapter(_adapter(tmp_path / "a", tensors, {"r": 2, "target_modules": ["q_proj"], "layers_to_transform": [0]}))
    assert list(ad.modules) == ["model.layers.0.self_attn.q_proj"]
    reasons = {s.name: s.reason for s in ad.skipped}
    assert reasons["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].startswith(
        "not loaded by PEFT: model.layers.0.self_attn.k_proj is not in target_modules")
    assert "layers_to_transform" in reasons["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    ad = open_adapter(_adapter(tmp_path / "b", tensors, {"r": 2, "target_modules": r".*\.k_proj"}))
    assert list(ad.modules) == ["model.layers.0.self_attn.k_proj"]
    with pytest.raises(CheckpointFormatError, match="target_modules .*nested"):
        open_adapter(_adapter(tmp_path / "c", tensors, {"r": 2, "target_modules": "(a|a)*"}))


TARGET_CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": r".*\.layers\.[01]\.self_attn\.(q|k)_proj"},
    {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["k_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*mlp.*"},
    {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head", "self_attn.q_proj"]},
]
TARGET_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                "model.layers.0.mlp.down_proj", "lm_head", "model.layers.12.self_attn.v_proj", "q_proj", "model.qq_proj"]


@pytest.mark.parametrize("cfg", TARGET_CONFIGS, ids=range(len(TARGET_CONFIGS)))
def test_target_module_selection_agrees_with_peft(tmp_path, cfg):
    from peft.tuners.tuners_utils import check_target_module_exists

    ours = AdapterConfig.from_file(_config(tmp_path, {"r": 2, **cfg}))
    theirs = peft.LoraConfig(r=2, **cfg)
    for name in TARGET_NAMES:
        assert (ours.untargeted(name) is None) == bool(check_target_module_exists(theirs, name)), name


def test_display_name_escapes_terminal_controls_and_surrogates():
    assert display_name("model.layers.0.q_proj.weight") == "model.layers.0.q_proj.weight"
    assert display_name("a\x1b[31mred\x1b[0m") == "a\\x1b[31mred\\x1b[0m"
    assert display_name("x\ud800y") == "x\\ud800y"
    assert display_name("bidi\u202eevil\nnl\x9b") == "bidi\\u202eevil\\nnl\\x9b"
    assert display_name("日本語 ok") == "日本語 ok"
    out = display_name("x\ud800y")
    out.encode("utf-8")  # never raises
    long = display_name("a" * 200_000, max_chars=60)
    assert len(long) <= 60 + 30 and long.endswith("(200000 characters)")


def test_errors_never_print_terminal_controls(tmp_path):
    tensors = _lora("evil\x1b]0;owned\x07", prefix="")
    tensors.pop("evil\x1b]0;owned\x07.lora_B.weight")
    with pytest.raises(CheckpointFormatError) as exc:
        open_adapter(_adapter(tmp_path / "ad", tensors, {"r": 2}))
    assert "\x1b" not in str(exc.value) and "\x07" not in str(exc.value)
    assert "\\x1b" in str(exc.value)



def test_interfere_lists_what_each_adapter_leaves_out(tmp_path):
    """A LoRA bias is not part of s·B·A: interfere skips it with the same reason `diff ADAPTER` gives."""
    from safetensors.torch import save_file

    from spectra.interfere import interfere

    a, base = _peft_adapter(tmp_path / "a", r=2, lora_bias=True, target_modules=["q_proj"])
    b, _ = _peft_adapter(tmp_path / "b", r=2, target_modules=["q_proj"])
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    res = interfere(str(tmp_path / "base.safetensors"), [str(a), str(b)])
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    (name,) = [n for n in reasons if n.endswith("q_proj.lora_B.bias")]
    assert reasons[name].startswith(f"{a}: LoRA bias (lora_bias=True)")
    assert not any(n.startswith(str(b)) for n in reasons.values())
