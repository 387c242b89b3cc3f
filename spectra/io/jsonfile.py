"""Reading JSON that strangers wrote: bounded in size and nesting, strict, one-line errors.

Every untrusted JSON spectra reads (safetensors headers, index files, ``config.json``,
``adapter_config.json``, and result files people edit) goes through :func:`parse_json` /
:func:`load_json`, which differ from ``json.loads`` in what they refuse:

- nesting deeper than ``max_depth``, checked *before* parsing by :func:`json_depth` (Python's parser
  recurses once per level and raises ``RecursionError`` near 1,000 levels, or worse with a raised
  recursion limit). The default, 127, is what the safetensors library accepts: serde_json stops at
  128 levels;
- a key repeated within one object (``json.loads`` silently keeps the last one, so a header could
  show one tensor to one reader and another to the next);
- ``NaN``, ``Infinity``, numbers that overflow a float (integers too), and lone UTF-16 surrogates (``"\\ud800"``):
  none of them is JSON (RFC 8259), and the safetensors library refuses all of them;
- files larger than ``max_bytes`` (read at most ``max_bytes + 1`` bytes) and files that are not
  regular files (:func:`spectra.io.paths.open_regular`: a FIFO would block).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from spectra.errors import CheckpointFormatError, SpectraError
from spectra.io.paths import open_regular

#: Deepest nesting of arrays and objects accepted. serde_json's default recursion limit (128, used by
#: the safetensors library) admits 127 levels; real configs use fewer than 10.
MAX_JSON_DEPTH = 127
#: Largest JSON file read whole by default (the safetensors library's bound on a header).
MAX_JSON_BYTES = 100_000_000
#: Largest results file spectra reads back (results.json, compare.json, …): what its own runs write,
#: ~3 KB a matrix at the default --top-k and more with --weight-spectra, so a run of 45k expert
#: matrices passes 100 MB; bounded as the journal it is rebuilt from is.
RESULTS_MAX_BYTES = 4 << 30

# Bytes other than brackets, deleted before counting depth; brackets mapped to +1 / -1 (as int8).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def finite_or_null(x: Any) -> Any:
    """``x`` with every NaN/Inf float replaced by None, through dicts, lists and tuples (JSON has no
    NaN or Infinity; spectra's result files write an undefined number as null).

    Example:
        >>> finite_or_null({"a": [1.0, float("nan")], "b": float("inf"), "c": "x"})
        {'a': [1.0, None], 'b': None, 'c': 'x'}
    """
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        try:  # a list of numbers (a spectrum) in one C loop: a NaN or ±Inf anywhere makes the sum non-finite
            if math.isfinite(sum(x)):
                return list(x)
        except (TypeError, OverflowError):  # not all numbers (dicts, strings, None), or an int too large for a float
            pass
        return [finite_or_null(v) for v in x]
    return x


def result_json(doc: Any, *, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Strict JSON text of a result (no NaN or Infinity: ValueError, callers write null), its non-ASCII
    characters as themselves; a lone surrogate (a path of bytes that are not UTF-8, as os.fsdecode reads
    it) cannot be written as UTF-8, so such a document is written with ``\\uXXXX`` escapes, which read back
    to the same string (:func:`load_json` with ``lone_surrogates``)."""
    text = json.dumps(doc, indent=indent, ensure_ascii=False, allow_nan=False, sort_keys=sort_keys)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(doc, indent=indent, ensure_ascii=True, allow_nan=False, sort_keys=sort_keys)
    return text


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw``, not counting brackets inside strings.

    Exact for valid JSON, and for the valid prefix of invalid JSON (which is all a parser reads
    before it stops). Linear time, in C and numpy: escaped backslashes and then escaped quotes are
    dropped, so the remaining ``"`` delimit strings; the even pieces between them are outside
    strings; their brackets are summed as ±1 in chunks.

    Args:
        raw: UTF-8 JSON text.

    Returns:
        0 for a scalar, 1 for ``[]`` or ``{}``, 2 for ``[[]]``...

    Example:
        >>> json_depth(b'{"a": [1, "]]]", {"b": []}]}')
        4
    """
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(text.split(b'"')[0::2]).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    steps = np.frombuffer(brackets, dtype=np.int8)
    depth, deepest, chunk = 0, 0, 1 << 24
    for i in range(0, steps.size, chunk):  # chunks keep the int64 cumulative sum small
        running = np.cumsum(steps[i : i + chunk], dtype=np.int64) + depth
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _parse_int(text: str) -> int | float:
    # serde_json reads "-0" as the float -0.0, so the safetensors library refuses it as a dimension;
    # json.loads would give the int 0. Keep it a float so that integer checks refuse it too.
    if text == "-0":
        return -0.0
    value = int(text)
    if abs(value) >= 2**1024:  # beyond every float: as _parse_float refuses, or a sum or ratio of it would overflow
        raise ValueError(f"number {text[:40]}… is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key[:80]!r} appears twice in one object")
            seen.add(key)
    return out


def _lone_surrogate(obj: Any) -> str | None:
    """The first string (key or value) holding a lone surrogate, or None; iterative, any depth."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_json(raw: bytes, *, path: str | os.PathLike[str], what: str, max_depth: int = MAX_JSON_DEPTH,
               error: type[SpectraError] = CheckpointFormatError, lone_surrogates: bool = False, nonfinite: bool = False) -> Any:
    """Parse untrusted JSON bytes strictly (see the module docstring).

    Args:
        raw: the bytes, UTF-8.
        path: the file they came from, for messages.
        what: what the bytes are, for messages (``"safetensors header"``, ``"config.json"``).
        max_depth: deepest nesting accepted (:data:`MAX_JSON_DEPTH`).
        error: the :class:`SpectraError` subclass to raise.
        lone_surrogates: accept ``"\\ud800"`` escapes (for files spectra wrote with
            ``json.dumps(ensure_ascii=True)`` from names that held one); refused by default.
        nonfinite: read Python's ``NaN``, ``Infinity`` and ``-Infinity`` tokens as floats (for files Python's
            ``json.dumps`` wrote with its default ``allow_nan=True``: transformers' ``trainer_state.json``
            logs an fp16 run's infinite ``grad_norm`` so); refused by default.

    Returns:
        The parsed value (``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` or None).

    Raises:
        error: one line naming ``path``: not UTF-8, nested too deep, not valid JSON, a repeated key,
            NaN/Infinity, a number out of range, or a lone surrogate.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid UTF-8 (byte {exc.start})", path=path,
                    hint="the file is corrupt or not what its name says") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise error(f"{what} is nested deeper than {max_depth} levels ({depth})", path=path,
                    hint="no real file nests this deep; it is corrupt or hostile") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=float if nonfinite else _refuse_constant,
                           parse_float=_parse_float, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno})", path=path,
                    hint="the file is corrupt or not what its name says") from None
    except (ValueError, RecursionError) as exc:  # from the hooks; int digits limit; depth (checked above)
        raise error(f"{what} is not valid JSON ({str(exc).splitlines()[0][:120]})", path=path,
                    hint="the file is corrupt or not what its name says") from None
    # a lone surrogate can only come from a \uD800-\uDFFF escape (strict UTF-8 refuses encoded ones):
    # without such an escape in the bytes, no string needs a look (a 200k-entry header: 1 s saved)
    bad = None if lone_surrogates or not _SURROGATE_ESCAPE.search(raw) else _lone_surrogate(value)
    if bad is not None:
        raise error(f"{what} holds a string with a lone UTF-16 surrogate ({bad[:60]!r}), not valid Unicode", path=path,
                    hint="the file is corrupt or hostile")
    return value


def _read_bounded(path: str | os.PathLike[str], what: str, max_bytes: int, error: type[SpectraError]) -> bytes:
    """At most ``max_bytes + 1`` bytes of a regular file (a FIFO or device is refused before it could block)."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what} ({exc.strerror or type(exc).__name__})", path=path) from None
    finally:
        os.close(fd)


def load_json(path: str | os.PathLike[str], *, what: str, max_depth: int = MAX_JSON_DEPTH,
              max_bytes: int = MAX_JSON_BYTES, error: type[SpectraError] = CheckpointFormatError,
              lone_surrogates: bool = False, nonfinite: bool = False) -> Any:
    """Read and parse an untrusted JSON file: a regular file of at most ``max_bytes`` bytes, parsed by
    :func:`parse_json` (``lone_surrogates``, ``nonfinite`` as there).

    Raises:
        CheckpointNotFoundError: no such file, or it cannot be read.
        CheckpointFormatError: a FIFO, socket, device or folder (refused before it could block).
        error: larger than ``max_bytes``, or anything :func:`parse_json` refuses.

    Example:
        >>> load_json("model/config.json", what="config.json")   # doctest: +SKIP
        {'model_type': 'llama', ...}
    """
    raw = _read_bounded(path, what, max_bytes, error)
    if len(raw) > max_bytes:
        size = os.stat(path).st_size
        raise error(f"{what} is {size} bytes; more than {max_bytes} is not a {what}", path=path,
                    hint="the file is corrupt or not what its name says")
    try:
        return parse_json(raw, path=Path(path), what=what, max_depth=max_depth, error=error, lone_surrogates=lone_surrogates,
                          nonfinite=nonfinite)
    except SpectraError:
        if Path(path).suffix != ".jsonl":
            raise
        # a run's journal passed for its results: "not valid JSON (Extra data at line 2) … corrupt" misled
        raise error(f"this is a JSON-lines file (a run's journal: one record per line, kept for --resume), not {what}",
                    path=path, hint=f"pass {what} or the folder holding it") from None


def load_jsonl(path: str | os.PathLike[str], *, what: str, max_depth: int = MAX_JSON_DEPTH,
               max_bytes: int = MAX_JSON_BYTES, error: type[SpectraError] = CheckpointFormatError,
               skip_torn_tail: bool = False, lone_surrogates: bool = False) -> list[Any]:
    """Read a JSON-lines file (one value per line; blank lines and a leading UTF-8 byte order mark
    ignored) with the checks of :func:`load_json` applied to the file and to every line.

    Args:
        skip_torn_tail: drop a last line that has no newline and does not parse (a writer killed
            mid-line, as a journal may be); any other bad line is an error.

    Raises:
        error: as :func:`parse_json`, naming the line (``"<what> line 7 is not valid JSON …"``).
    """
    raw = _read_bounded(path, what, max_bytes, error)
    if len(raw) > max_bytes:
        raise error(f"{what} is larger than {max_bytes} bytes", path=path, hint="the file is corrupt or not what its name says")
    # a UTF-8 byte order mark (Windows editors write one) is not part of the first value
    lines = raw.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    values = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            values.append(parse_json(line, path=Path(path), what=f"{what} line {i}", max_depth=max_depth, error=error,
                                     lone_surrogates=lone_surrogates))
        except SpectraError:
            if skip_torn_tail and i == len(lines):  # the last piece has no newline after it: torn
                break
            raise
    return values
