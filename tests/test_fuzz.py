"""Property-based fuzzing of the untrusted-input parsers (hypothesis): safetensors headers (random
and mutated from valid ones, compared with the safetensors library), JSON nesting depth, declared
sizes, file types (FIFOs, sockets, folders, symlinks), path resolution through symlinks, index
files, adapter configs and the regular expressions they carry. Every case ends in a correct result
or a SpectraError, never another exception, a hang or a read outside the given folder; and every
*valid* input the strategies build must be accepted (a parser that refused everything would fail).
Case counts: FUZZ_EXAMPLES (default 300 each); set SPECTRA_FUZZ_EXAMPLES=20000 for a long run."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from spectra.errors import SpectraError
from spectra.io.adapter import open_adapter
from spectra.io.checkpoint import open_checkpoint
from spectra.io.jsonfile import MAX_JSON_DEPTH, finite_or_null, json_depth, parse_json
from spectra.io.patterns import MAX_NAME_CHARS, PatternError, component_expression, component_match, full_match, suffix_expression, suffix_match
from spectra.io.safetensors_file import MAX_DIM, read_header
from spectra.pairing import pair_checkpoints

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


def _library_accepts(path: Path) -> bool:
    """The safetensors library's verdict on a file's header (safe_open parses and validates it)."""
    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
        return True
    except Exception:  # noqa: BLE001 - any refusal, whatever its type
        return False


def _we_accept(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except SpectraError as exc:
        assert str(exc) and "\n" not in str(exc)
        return False


def _huge_dim(header: object) -> bool:
    """A declared axis above MAX_DIM: the one rule where we are stricter than the library on purpose."""
    return isinstance(header, dict) and any(
        isinstance(v, dict) and isinstance(v.get("shape"), list)
        and any(isinstance(d, int) and not isinstance(d, bool) and d > MAX_DIM for d in v["shape"])
        for v in header.values())


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
        ours, lib = _we_accept(path), _library_accepts(path)
        assert ours == (lib and not _huge_dim(header))


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_arbitrary_bytes_as_safetensors(blob):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(blob)
        _check(path)


@SETTINGS
@given(weight_map=st.one_of(
           st.just({"w": "a.safetensors"}),  # the valid corpus: must be read
           st.dictionaries(names, st.one_of(st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd", "sub/../../x",
                                                             "missing.safetensors", "", "C:\\x"]), json_scalars), max_size=4)),
       extra=st.dictionaries(st.text(max_size=8), json_scalars, max_size=2))
def test_index_files(weight_map, extra):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        folder.mkdir()
        save_file({"w": torch.zeros(2, 2)}, str(folder / "a.safetensors"))
        save_file({"secret": torch.ones(1)}, str(Path(d) / "a.safetensors"))  # outside the folder: must never be read
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map, **extra}))
        valid = (bool(weight_map) and all(k == "w" and v == "a.safetensors" for k, v in weight_map.items())
                 and all(math.isfinite(v) for v in extra.values() if isinstance(v, float)))  # json.dumps writes inf as Infinity, not JSON
        try:
            ckpt = open_checkpoint(folder)
            assert all(Path(t.file).resolve().is_relative_to(folder.resolve()) for t in ckpt.tensors.values())
            for name in ckpt.tensors:
                ckpt.load(name)
            accepted = True
        except SpectraError:
            accepted = False
        assert accepted == valid


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


@SETTINGS
@given(alpha=st.one_of(st.none(), st.integers(1, 64), st.floats(0.01, 1e4)), rslora=st.sampled_from([None, True, False]),
       target=st.sampled_from([None, ["q_proj"], ["self_attn.q_proj", "v_proj"], r"model\.layers\.\d+\.self_attn\.q_proj",
                               "all-linear", ["model.layers.0.self_attn.q_proj"]]),
       pattern=st.sampled_from([{}, {"q_proj": 3.0}, {"layers.0.self_attn.q_proj": 5}, {r"layers\.[0-9]+\..*q_proj": 7}]),
       r_default=st.sampled_from([None, 4, 16]))
def test_valid_adapter_configs_are_read_with_peft_numbers(alpha, rslora, target, pattern, r_default):
    """The valid corpus: every one of these configs is accepted and gives PEFT's scale."""
    config = {"target_modules": target, "alpha_pattern": pattern}
    if alpha is not None:
        config["lora_alpha"] = alpha
    if rslora is not None:
        config["use_rslora"] = rslora
    config["r"] = 4 if r_default is None else r_default
    if r_default not in (None, 4):
        config["rank_pattern"] = {"q_proj": 4}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        g = torch.Generator().manual_seed(0)
        A, B = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": A,
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": B}, str(folder / "adapter_model.safetensors"))
        mod = open_adapter(folder).modules["model.layers.0.self_attn.q_proj"]
        a = float(next(iter(pattern.values()))) if pattern else float(8 if alpha is None else alpha)  # PEFT's default alpha is 8
        expected = a / math.sqrt(4) if rslora else a / 4
        assert mod.r == 4 and mod.scale == pytest.approx(expected, rel=1e-12)
        torch.testing.assert_close(mod.dense_delta(), expected * (B.double() @ A.double()), rtol=1e-12, atol=0)


# ---- mutated safetensors headers against the safetensors library -----------------------------------
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "I32": 4, "U16": 2, "C64": 8}
valid_tensors = st.lists(st.tuples(st.text(max_size=12), st.sampled_from(sorted(_BYTES)), st.lists(st.integers(0, 4), max_size=3)),
                         max_size=5, unique_by=lambda t: t[0])
MUTATIONS = ["swap_offsets", "shift_begin", "shift_end", "alias", "overlap", "trailing", "truncate", "shape", "dtype", "deep_field",
             "metadata", "offsets_len", "negative", "float_dim", "huge_dim", "duplicate", "reorder"]


def _layout(tensors: list[tuple[str, str, list[int]]]) -> tuple[dict, bytes]:
    header, pos = {}, 0
    for name, dtype, shape in tensors:
        n = math.prod(shape) * _BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, bytes(i % 251 for i in range(pos))


@settings(max_examples=max(FUZZ_EXAMPLES, 300), deadline=None, suppress_health_check=list(HealthCheck))
@given(tensors=valid_tensors, mutations=st.lists(st.sampled_from(MUTATIONS), max_size=3), data=st.data())
def test_mutated_headers_agree_with_the_safetensors_library(tensors, mutations, data):
    header, blob = _layout(tensors)
    names_ = list(header)
    duplicate = False
    for mutation in mutations:
        pick = (lambda: data.draw(st.sampled_from(names_))) if names_ else None
        if mutation == "swap_offsets" and len(names_) >= 2:
            a, b = data.draw(st.permutations(names_))[:2]
            header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        elif mutation in ("shift_begin", "shift_end") and pick:
            offsets = header[pick()]["data_offsets"]
            if len(offsets) == 2:
                offsets[mutation == "shift_end"] += data.draw(st.integers(-3, 3))
        elif mutation == "alias" and len(names_) >= 2:
            a, b = data.draw(st.permutations(names_))[:2]
            header[b] = dict(header[a])  # two names on the same bytes
        elif mutation == "overlap" and pick:
            offsets = header[pick()]["data_offsets"]
            if len(offsets) == 2:
                offsets[1] += 1
        elif mutation == "trailing":
            blob += b"\0" * data.draw(st.integers(1, 5))
        elif mutation == "truncate" and blob:
            blob = blob[: -data.draw(st.integers(1, len(blob)))]
        elif mutation == "shape" and pick:
            header[pick()]["shape"] = data.draw(st.lists(st.integers(0, 5), max_size=3))
        elif mutation == "dtype" and pick:
            header[pick()]["dtype"] = data.draw(st.sampled_from([*_BYTES, "F4", "F6_E2M3", "Q7", "f32", ""]))
        elif mutation == "deep_field" and pick:
            depth = data.draw(st.integers(MAX_JSON_DEPTH - 4, MAX_JSON_DEPTH + 2))
            nested: object = []
            for _ in range(depth - 3):  # the header object and the entry are two levels; the list itself one more
                nested = [nested]
            header[pick()]["extra"] = nested
        elif mutation == "metadata":
            header["__metadata__"] = data.draw(st.sampled_from([None, {"a": "b"}, {"a": 1}, [], "x", {}]))
        elif mutation == "offsets_len" and pick:
            header[pick()]["data_offsets"] = data.draw(st.lists(st.integers(0, 8), max_size=3))
        elif mutation == "negative" and pick:
            header[pick()]["shape"] = [-1]
        elif mutation == "float_dim" and pick:
            header[pick()]["shape"] = [1.0]
        elif mutation == "huge_dim" and pick:
            name = pick()
            header[name]["shape"] = [data.draw(st.sampled_from([MAX_DIM, MAX_DIM + 1, 2**40, 2**63, 2**64])), 0]
            start = (header[name]["data_offsets"] or [0])[0]
            header[name]["data_offsets"] = [start, start]
        elif mutation == "duplicate" and pick:
            duplicate = True
        elif mutation == "reorder":
            header = dict(reversed(list(header.items())))
    text = json.dumps(header)
    if duplicate:  # repeat one entry verbatim: json objects cannot hold it, so splice the text
        name = data.draw(st.sampled_from(names_))
        entry = json.dumps({name: header[name]})[1:-1]
        text = text[:-1] + ", " + entry + "}" if header else "{" + entry + "}"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(struct.pack("<Q", len(text.encode())) + text.encode() + blob)
        ours, lib = _we_accept(path), _library_accepts(path)
        if duplicate or _huge_dim(header):
            assert not ours  # stricter than the library on purpose (SECURITY.md)
        else:
            assert ours == lib, (mutations, text[:300])
        if not mutations:  # the valid corpus: accepted by both, and read bit for bit as the library reads it
            assert ours and lib
            ckpt = open_checkpoint(path)
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    got, ref = ckpt.load(name), f.get_tensor(name)
                    assert got.dtype == ref.dtype and got.shape == ref.shape
                    if got.dtype == torch.bool:  # stored bytes other than 0/1 are True; we normalise them, the library keeps them
                        assert torch.equal(got, ref != 0)
                    else:
                        assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))  # bit-identical


# ---- JSON nesting depth in every JSON spectra reads ---------------------------------------------
def _nested(depth: int, kinds: list[str], payload: str) -> str:
    text = json.dumps(payload)  # a string that may hold brackets, quotes and backslashes
    for i in range(depth):
        text = f"[{text}]" if kinds[i % len(kinds)] == "a" else f'{{"k{i}": {text}}}'
    return text


@SETTINGS
@given(depth=st.one_of(st.integers(0, 300), st.integers(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 3)),
       kinds=st.lists(st.sampled_from("ao"), min_size=1, max_size=4), payload=st.text(alphabet='[]{}"\\ab:,', max_size=12),
       where=st.sampled_from(["bytes", "header", "index", "config", "adapter_config"]))
def test_nesting_depth(depth, kinds, payload, where):
    value = _nested(depth, kinds, payload)
    assert json_depth(value.encode()) == depth
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        if where == "bytes":
            try:
                got, accepted = parse_json(value.encode(), path="x.json", what="value"), True
            except SpectraError:
                accepted = False
            assert accepted == (depth <= MAX_JSON_DEPTH)
            if accepted:
                assert got == json.loads(value)
            return
        # the value sits one level below the file's top-level object (two inside a header entry)
        total = depth + (2 if where == "header" else 1)
        save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
        if where == "header":
            text = '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": %s}}' % value
            path = folder / "deep.safetensors"
            path.write_bytes(struct.pack("<Q", len(text.encode())) + text.encode() + b"\0" * 4)
            run = lambda: open_checkpoint(path)  # noqa: E731
        elif where == "index":
            (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model.safetensors"}, "x": %s}' % value)
            # the index itself: the folder reads model.safetensors first, as transformers does
            run = lambda: open_checkpoint(folder / "model.safetensors.index.json")  # noqa: E731
        elif where == "config":
            (folder / "config.json").write_text('{"model_type": "llama", "x": %s}' % value)
            run = lambda: open_checkpoint(folder)  # noqa: E731
        else:
            save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(2, 4),
                       "base_model.model.q_proj.lora_B.weight": torch.ones(3, 2)}, str(folder / "adapter_model.safetensors"))
            (folder / "adapter_config.json").write_text('{"r": 2, "x": %s}' % value)
            run = lambda: open_adapter(folder)  # noqa: E731
        try:
            run()
            accepted = True
        except SpectraError as exc:
            assert "\n" not in str(exc)
            accepted = False
        assert accepted == (total <= MAX_JSON_DEPTH), (where, depth)


# ---- declared sizes ------------------------------------------------------------------------------
dims = st.one_of(st.integers(0, 6), st.sampled_from([0, 1, 2**20, MAX_DIM, MAX_DIM + 1, 2**40, 2**50, 2**63, 2**64 - 1]))


@SETTINGS
@given(shape=st.lists(dims, max_size=4), dtype=st.sampled_from(["F32", "BF16", "U8", "F4"]), extra=st.integers(-2, 2),
       stacked=st.booleans())
def test_declared_sizes_are_checked_in_constant_time(shape, dtype, extra, stacked):
    bits = {"F32": 32, "BF16": 16, "U8": 8, "F4": 4}[dtype]
    count = 0 if 0 in shape else math.prod(shape)
    nbytes = count * bits // 8 if count <= 4096 else 4096  # cap the file: the header may declare any size
    span = max(0, nbytes + extra)
    name = "model.layers.0.mlp.experts.down_proj" if stacked else "model.layers.0.mlp.down_proj.weight"
    header = {name: {"dtype": dtype, "shape": shape, "data_offsets": [0, span]}}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * span)
        start = time.perf_counter()
        ours, lib = _we_accept(path), _library_accepts(path)
        assert time.perf_counter() - start < 10  # a loop over a declared axis of 2^40 would take hours
        assert ours == (lib and not _huge_dim(header))
        if ours and count == 0 and len(shape) in (2, 3):  # an empty matrix: skipped at once, whatever its other axes
            start = time.perf_counter()
            pairing = None
            try:
                pairing = pair_checkpoints(open_checkpoint(path), open_checkpoint(path))
            except SpectraError:
                pass  # nothing else to pair
            assert time.perf_counter() - start < 10
            if pairing is not None:
                assert not pairing.pairs


# ---- file types and path resolution --------------------------------------------------------------
KINDS = ["file", "fifo", "socket", "folder", "dangling", "link_inside", "link_outside"]


def _make(path: Path, kind: str, source: Path, outside: Path) -> None:
    """Put a ``kind`` at ``path``: a copy of ``source``, a FIFO, a socket, a folder, or a symlink."""
    if kind == "file":
        path.write_bytes(source.read_bytes())
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()  # the socket file stays
    elif kind == "folder":
        path.mkdir()
    elif kind == "dangling":
        os.symlink(path.parent / "nowhere", path)
    elif kind == "link_inside":
        target = path.parent / f".real-{path.name}"
        target.write_bytes(source.read_bytes())
        os.symlink(target.name, path)
    else:
        target = outside / f"real-{path.name}"
        target.write_bytes(source.read_bytes())
        os.symlink(target, path)


class _OpenAudit:
    """Record every path opened through os.open (all of spectra's reads of safetensors and JSON)."""

    def __init__(self, monkeypatch):
        self.opened: list[str] = []
        real = os.open

        def audited(path, *args, **kwargs):
            self.opened.append(os.path.realpath(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", audited)


@pytest.mark.timeout(600)
@SETTINGS
@given(shard=st.sampled_from(KINDS), config=st.sampled_from([*KINDS, "absent"]), index=st.sampled_from(["file", "fifo", "folder"]))
def test_file_types_in_a_model_folder(shard, config, index):
    """Every combination ends at once (a FIFO never blocks): read when every file is a regular file
    inside the folder, refused otherwise."""
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        root = Path(d)
        folder, outside, src = root / "m", root / "outside", root / "src"
        for p in (folder, outside, src):
            p.mkdir()
        save_file({"w": torch.ones(2, 2)}, str(src / "shard.safetensors"))
        (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (src / "index.json").write_text(json.dumps({"weight_map": {"w": "s.safetensors"}}))
        _make(folder / "s.safetensors", shard, src / "shard.safetensors", outside)
        if config != "absent":
            _make(folder / "config.json", config, src / "config.json", outside)
        _make(folder / "model.safetensors.index.json", index, src / "index.json", outside)
        audit = _OpenAudit(mp)
        start = time.perf_counter()
        try:
            ckpt = open_checkpoint(folder)
            ckpt.load("w")
            accepted = True
        except SpectraError as exc:
            assert "\n" not in str(exc)
            accepted = False
        assert time.perf_counter() - start < 10
        ok = {"file", "link_inside"}
        assert accepted == (shard in ok and config in ok | {"absent"} and index == "file"), (shard, config, index)
        assert not any(p.startswith(str(outside.resolve())) for p in audit.opened)


@pytest.mark.timeout(600)
@SETTINGS
@given(kind=st.sampled_from(KINDS), suffix=st.sampled_from([".safetensors", ".bin"]))
def test_file_types_as_the_input(kind, suffix):
    """A path the user names is read wherever it links (they chose it); anything but a regular file
    (or a folder holding a checkpoint) is refused without blocking."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        outside = root / "outside"
        outside.mkdir()
        src = root / f"src{suffix}"
        if suffix == ".bin":
            torch.save({"w": torch.ones(2, 2)}, src)
        else:
            save_file({"w": torch.ones(2, 2)}, str(src))
        target = root / f"x{suffix}"
        _make(target, kind, src, outside)
        start = time.perf_counter()
        try:
            open_checkpoint(target).load("w")
            accepted = True
        except SpectraError as exc:
            assert "\n" not in str(exc)
            accepted = False
        assert time.perf_counter() - start < 10
        assert accepted == (kind in ("file", "link_inside", "link_outside"))


@pytest.mark.timeout(600)
@SETTINGS
@given(kinds=st.fixed_dictionaries({"adapter_config.json": st.sampled_from(KINDS),
                                    "adapter_model.safetensors": st.sampled_from(KINDS)}))
def test_file_types_in_an_adapter_folder(kinds):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        folder, outside, src = root / "ad", root / "outside", root / "src"
        for p in (folder, outside, src):
            p.mkdir()
        (src / "adapter_config.json").write_text(json.dumps({"r": 2}))
        save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(2, 4), "base_model.model.q_proj.lora_B.weight": torch.ones(3, 2)},
                  str(src / "adapter_model.safetensors"))
        for name, kind in kinds.items():
            _make(folder / name, kind, src / name, outside)
        try:
            open_adapter(folder)
            accepted = True
        except SpectraError as exc:
            assert "\n" not in str(exc)
            accepted = False
        assert accepted == all(k in ("file", "link_inside") for k in kinds.values()), kinds


SHARD_PATHS = ["a.safetensors", "sub/b.safetensors", "lin/b.safetensors", "lout/o.safetensors", "fa.safetensors",
               "fo.safetensors", "abs.safetensors", "sub/../a.safetensors", "sub/deep/c.safetensors", "lsub/deep/c.safetensors"]
INSIDE = {"a.safetensors", "sub/b.safetensors", "lin/b.safetensors", "fa.safetensors", "sub/deep/c.safetensors",
          "lsub/deep/c.safetensors"}


@SETTINGS
@given(weight_map=st.dictionaries(st.sampled_from(["w0", "w1", "w2", "w3"]), st.sampled_from(SHARD_PATHS), min_size=1))
def test_path_resolution_through_symlinks(weight_map):
    """Index entries reach shards through symlinked folders and files: read when the real path is
    inside the folder, refused (before any open) when it is outside or uses '..'."""
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        root = Path(d)
        folder, outside = root / "m", root / "outside"
        (folder / "sub" / "deep").mkdir(parents=True)
        outside.mkdir()
        tensors = {f"w{i}": torch.full((2, 2), float(i)) for i in range(4)}
        for p in ("a.safetensors", "sub/b.safetensors", "sub/deep/c.safetensors"):
            save_file(tensors, str(folder / p))
        save_file(tensors, str(outside / "o.safetensors"))
        os.symlink("sub", folder / "lin")
        os.symlink(outside, folder / "lout")
        os.symlink("sub", folder / "lsub")
        os.symlink("a.safetensors", folder / "fa.safetensors")
        os.symlink("../outside/o.safetensors", folder / "fo.safetensors")
        os.symlink(outside / "o.safetensors", folder / "abs.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        audit = _OpenAudit(mp)
        try:
            ckpt = open_checkpoint(folder)
            for name in ckpt.tensors:
                assert torch.equal(ckpt.load(name), tensors[name])
            accepted = True
        except SpectraError as exc:
            assert "\n" not in str(exc)
            accepted = False
        assert accepted == all(p in INSIDE for p in weight_map.values()), weight_map
        assert not any(p.startswith(str(outside.resolve())) for p in audit.opened), audit.opened


# ---- regular expressions from adapter configs ----------------------------------------------------
_ATOMS = st.sampled_from(["a", "b", "_", ".", r"\.", "[ab]", r"\w", r"\d", "q_proj", "^", "$"])
_QUANT = st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{2,}", "*?", "+?"])
#: Any regular expression over a small alphabet, with nesting, alternation and repetition.
regexes = st.recursive(_ATOMS, lambda inner: st.one_of(
    st.tuples(inner, inner).map("".join),
    st.tuples(inner, inner).map(lambda t: f"({t[0]}|{t[1]})"),
    st.tuples(inner, _QUANT).map(lambda t: f"({t[0]}){t[1]}"),
    st.tuples(_ATOMS, _QUANT).map("".join),
), max_leaves=8)
#: The safe corpus: no repeated group holding a repetition or alternation, at most one unbounded
#: repetition. Every one of these must be matched, never refused.
_SAFE_PIECES = st.sampled_from(["a", "b", r"\.", "_", "[ab]", r"\w", "q_proj", ".", "(a|b)", "(ab)?", r"(\.a)", "[ab]?"])
safe_regexes = st.tuples(st.lists(_SAFE_PIECES, min_size=1, max_size=5), st.sampled_from(["", ".*", r"\w+", "[ab]*", "(ab)+"]),
                         st.integers(0, 5)).map(lambda t: "".join(t[0][: t[2]]) + t[1] + "".join(t[0][t[2]:]))
module_names = st.one_of(st.text(alphabet="ab._q", max_size=40), st.text(alphabet="ab.", min_size=200, max_size=MAX_NAME_CHARS),
                         st.just("model.layers.0.self_attn.q_proj"))


def _ours_vs_python(fn, expression: str, key: str, name: str, python) -> bool | None:
    """Our match, checked against Python's re on PEFT's expression; None when refused."""
    start = time.perf_counter()
    try:
        got = fn(key, name)
    except PatternError:
        assert time.perf_counter() - start < 5  # generous on a shared CPU; catastrophic cases take minutes
        return None
    assert time.perf_counter() - start < 5, (key, len(name))
    assert got == (python(expression, name) is not None), (key, name)  # safe to run: our check said so
    return got


@pytest.mark.timeout(600)
@SETTINGS
@given(key=regexes, name=module_names)
def test_any_regex_is_matched_like_peft_or_refused_quickly(key, name):
    _ours_vs_python(suffix_match, suffix_expression(key), key, name, re.match)        # rank_pattern / alpha_pattern
    _ours_vs_python(full_match, key, key, name, re.fullmatch)                         # target_modules as a string
    _ours_vs_python(component_match, component_expression(key), key, name, re.match)  # modules_to_save


@SETTINGS
@given(key=safe_regexes, name=module_names)
def test_safe_regexes_are_never_refused(key, name):
    assert _ours_vs_python(suffix_match, suffix_expression(key), key, name, re.match) is not None, key
    assert _ours_vs_python(full_match, key, key, name, re.fullmatch) is not None, key


def _finite_or_null_reference(x):
    """finite_or_null element by element (what its one-pass sum over a list of numbers must equal)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null_reference(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null_reference(v) for v in x]
    return x


_JSON_LEAVES = st.one_of(st.floats(), st.sampled_from([1e308, -1e308, math.inf, -math.inf, math.nan]), st.integers(),
                         st.sampled_from([10**400, -(10**400)]), st.booleans(), st.none(), st.text(max_size=3))


@SETTINGS
@given(st.recursive(_JSON_LEAVES, lambda kids: st.one_of(st.lists(kids, max_size=6), st.tuples(kids, kids),
                                                         st.dictionaries(st.text(max_size=3), kids, max_size=4)), max_leaves=40))
def test_finite_or_null_replaces_every_nan_and_inf(doc):
    """Result files write NaN/Inf as null: the fast path for lists of numbers (a sum that is finite only
    when every element is) must agree with the element-wise walk, also when finite numbers overflow the
    sum (1e308 + 1e308), for ints too large for a float, and for mixed lists."""
    got, want = finite_or_null(doc), _finite_or_null_reference(doc)
    assert json.dumps(got, allow_nan=False) == json.dumps(want, allow_nan=False)
