"""Reading safetensors files tensor by tensor, without mmap.

The format is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the header),
then the raw little-endian data. We parse the header ourselves, validate every entry against the
file size, and read each tensor with a positioned read into a fresh buffer. Why not
``safetensors.safe_open``: it mmaps the file, so pages stay resident while the file is open (memory
grows with the model, not with one tensor), and a file truncated under us kills the process with
SIGBUS instead of raising an error we can report.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spectra.errors import CheckpointFormatError
from spectra.io.jsonfile import parse_json
from spectra.io.paths import FileStamp, check_unchanged, file_stamp, open_regular

#: safetensors dtype tag -> (torch dtype, or None when torch cannot hold it, bits per element). Every
#: tag the safetensors library (0.8) knows, so that a header it reads is a header we read; tensors of
#: a dtype torch lacks (F4, F6) are listed and skipped by pairing, and refused if read.
_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 64),
    "F32": (torch.float32, 32),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
    "F4": (None, 4),  # torch's float4_e2m1fn_x2 packs two per element: a different shape, so not used
    "C64": (torch.complex64, 64),
    "I64": (torch.int64, 64),
    "I32": (torch.int32, 32),
    "I16": (torch.int16, 16),
    "I8": (torch.int8, 8),
    "U64": (getattr(torch, "uint64", None), 64),
    "U32": (getattr(torch, "uint32", None), 32),
    "U16": (getattr(torch, "uint16", None), 16),
    "U8": (torch.uint8, 8),
    "BOOL": (torch.bool, 8),
}

#: names for tags this torch has no dtype for
_TAG_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
              "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F6_E2M3": "float6_e2m3",
              "F6_E3M2": "float6_e3m2", "F4": "float4_e2m1", "U64": "uint64", "U32": "uint32", "U16": "uint16"}


def dtype_name(tag: str) -> str:
    """torch's name for a safetensors dtype tag: ``"BF16"`` -> ``"bfloat16"``."""
    tdtype = _DTYPES[tag][0]
    return str(tdtype).removeprefix("torch.") if tdtype is not None else _TAG_NAMES[tag]


# A header larger than this is not a checkpoint we should trust with our memory; the safetensors
# library uses the same 100 MB bound.
MAX_HEADER_BYTES = 100_000_000
#: Largest dimension accepted, per axis. No weight has an axis near 2^31 (vocabularies are < 2^20),
#: and a zero-element tensor declaring ``[2**50, 0]`` would otherwise make every loop over that axis
#: hang. The safetensors library has no such bound; this is the one place we are stricter on purpose
#: (with duplicate names, which it keeps the last of).
MAX_DIM = 2**31


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as declared in a safetensors header.

    Attributes:
        name: tensor name as stored.
        dtype: safetensors dtype tag (``"BF16"``, ``"F32"``, ...).
        shape: shape as stored (for a Linear weight ``(out, in)``).
        start: absolute byte offset of the data in the file.
        nbytes: size of the data in bytes.
        stamp: the file's :data:`~spectra.io.paths.FileStamp` when the header was read: every later
            read checks it, so bytes of a file replaced or rewritten since are never read at old offsets.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int
    stamp: FileStamp | None = field(default=None, compare=False)


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate the header of a safetensors file as strictly as the safetensors library.

    The rules of its ``Metadata::validate`` (safetensors 0.8, ``tensor.rs``), checked here so that a
    header the library refuses is never read, and one it reads is read the same:

    - an 8-byte little-endian length N ≤ 100 MB, then N bytes of UTF-8 JSON (strict: see
      :func:`spectra.io.jsonfile.parse_json`; nesting ≤ 127 levels, as serde_json);
    - a JSON object; ``__metadata__`` absent, null, or a map of strings to strings;
    - every other key a tensor: ``dtype`` one of the library's tags, ``shape`` a list of
      non-negative integers, ``data_offsets`` exactly ``[begin, end]`` (other fields are ignored);
      ``shape × bits per element`` a whole number of bytes equal to ``end − begin``, the product
      taken in axis order and refused when it passes 2^64 (``[2**40, 2**40, 0]`` included);
    - sorted by offsets, the tensors tile the data region exactly: the first begins at 0, each
      begins where the previous ends (no gap, no overlap, no two names on the same bytes, except
      zero-length ones), and the last ends at the end of the file (no trailing bytes).

    Stricter than the library on purpose: a name repeated in the JSON object (the library keeps the
    last), and any axis larger than :data:`MAX_DIM`.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(entries, metadata)``: tensor name -> :class:`TensorEntry` (header order), and the
        ``__metadata__`` map.

    Raises:
        CheckpointNotFoundError: the file does not exist or cannot be read.
        CheckpointFormatError: not a regular file (a FIFO is refused without blocking), or a header
            that breaks any rule above; one line naming the file (and the tensor).
    """
    path = Path(path)
    fd = open_regular(path)
    try:
        st = os.fstat(fd)  # of the descriptor the header is read through: the stamp is of those bytes
        size, stamp = st.st_size, file_stamp(st)
        head = _pread_exact(fd, 8, 0)
        if len(head) < 8:
            raise CheckpointFormatError(
                f"file is {size} bytes, too short for a safetensors header",
                path=path, hint="the file is truncated or not a safetensors file",
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES and 8 + n <= size:  # whole, but larger than any checkpoint's (it said "truncated")
            raise CheckpointFormatError(
                f"header of {n:,} bytes is larger than the {MAX_HEADER_BYTES:,} the safetensors library accepts",
                path=path, hint="no checkpoint has such a header: the file was made by hand or is damaged")
        if 8 + n > size:
            raise CheckpointFormatError(
                f"header declares {n} bytes but the file has {size}",
                path=path, hint="the file is truncated or not a safetensors file",
            )
        raw = _pread_exact(fd, n, 8)
    except OSError as exc:  # I/O errors
        raise CheckpointFormatError(f"cannot read the file ({exc.strerror or exc.__class__.__name__})", path=path) from None
    finally:
        os.close(fd)
    if len(raw) < n:
        raise CheckpointFormatError(f"file ended inside its {n}-byte header", path=path,
                                    hint="the file was truncated while being read")
    header = parse_json(raw, path=path, what="safetensors header")
    if not isinstance(header, dict):
        raise CheckpointFormatError("header is not a JSON object", path=path)
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointFormatError(f"__metadata__ must map strings to strings. Got {_short(metadata)} instead", path=path)
    entries = {name: _validate_entry(path, name, info, data_start, data_size, stamp) for name, info in header.items()}
    _check_tiling(path, list(entries.values()), data_start, data_size)
    return entries, metadata


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _validate_entry(path: Path, name: str, info: object, data_start: int, data_size: int,
                    stamp: FileStamp | None = None) -> TensorEntry:
    if not isinstance(info, dict):
        raise CheckpointFormatError("header entry is not an object", path=path, tensor=name)
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointFormatError(
            f"unknown dtype {_short(dtype)}", path=path, tensor=name,
            hint=f"known dtypes are {', '.join(sorted(_DTYPES))}",
        )
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointFormatError(f"invalid shape {_short(shape)}", path=path, tensor=name)
    too_big = next((d for d in shape if d > MAX_DIM), None)
    if too_big is not None:
        raise CheckpointFormatError(f"dimension {too_big} of shape {_short(shape)} is larger than {MAX_DIM} (2^31)",
                                    path=path, tensor=name, hint="no weight has such an axis; the header is corrupt or hostile")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets) and offsets[0] <= offsets[1]):
        raise CheckpointFormatError(f"invalid data_offsets {_short(offsets)}", path=path, tensor=name)
    span = offsets[1] - offsets[0]
    bits = _DTYPES[dtype][1]
    count = 1
    for d in shape:  # in order, as the library's checked product: [2**40, 2**40, 0] overflows before the 0
        count *= d
        if count >= 1 << 64:
            raise CheckpointFormatError(f"the element count of shape {_short(shape)} overflows 64 bits", path=path,
                                        tensor=name, hint="the header is corrupt or hostile")
    if count * bits >= 1 << 64 or count * bits > 8 * data_size:
        raise CheckpointFormatError(
            f"{dtype} {_short(tuple(shape))} needs more bytes than the file's {data_size}-byte data region",
            path=path, tensor=name, hint="the file is truncated or its header is corrupt")
    if count * bits % 8:
        raise CheckpointFormatError(f"{count} elements of {dtype} are not a whole number of bytes", path=path, tensor=name)
    nbytes = count * bits // 8
    if span != nbytes:
        raise CheckpointFormatError(f"data_offsets span {span} bytes but {dtype} {_short(tuple(shape))} needs {nbytes}",
                                    path=path, tensor=name, hint="the file is corrupt")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], nbytes, stamp)


def _check_tiling(path: Path, entries: list[TensorEntry], data_start: int, data_size: int) -> None:
    """The tensors, sorted by offsets as the library sorts them, cover the data region exactly once."""
    pos, prev = 0, None
    for e in sorted(entries, key=lambda e: (e.start, e.start + e.nbytes)):
        begin = e.start - data_start
        if begin < pos:
            raise CheckpointFormatError(
                f"its bytes [{begin}, {begin + e.nbytes}) overlap those of {prev.name!r} [{prev.start - data_start}, {pos})",
                path=path, tensor=e.name, hint="two tensors share bytes; the header is corrupt or hostile")
        if begin > pos:
            raise CheckpointFormatError(
                f"bytes [{pos}, {begin}) before it belong to no tensor", path=path, tensor=e.name,
                hint="the data region must be tiled by the tensors; the header is corrupt")
        pos, prev = begin + e.nbytes, e
    if pos > data_size:
        raise CheckpointFormatError(
            f"data ends at byte {data_start + pos} but the file has {data_start + data_size}",
            path=path, tensor=prev.name if prev else None, hint="the file is truncated; download it again",
        )
    if pos < data_size:
        raise CheckpointFormatError(
            f"{data_size - pos} bytes after the last tensor belong to no tensor", path=path,
            hint="the file is corrupt or something was appended to it",
        )


def _read_into(path: str | Path, entry: TensorEntry, buf: torch.Tensor, offset: int) -> None:
    """Fill the uint8 tensor ``buf`` with the bytes of ``entry`` from ``offset`` on (positioned reads),
    refusing a file that is no longer the one the header was read from (checked before and after)."""
    view = memoryview(buf.numpy())
    got, size = 0, buf.numel()
    fd = open_regular(path, tensor=entry.name)  # replaced by a FIFO since it was opened: refused, never blocks
    try:
        check_unchanged(path, entry.stamp, os.fstat(fd), tensor=entry.name)
        while got < size:
            n = os.preadv(fd, [view[got:]], entry.start + offset + got)
            if n == 0:
                raise CheckpointFormatError(
                    f"file ended after {offset + got} of {entry.nbytes} bytes of this tensor",
                    path=path, tensor=entry.name,
                    hint="the file was truncated or is being written; download it again",
                )
            got += n
        # rewritten in place while we read (same inode): what was read may mix the old and new files
        check_unchanged(path, entry.stamp, os.fstat(fd), tensor=entry.name)
    finally:
        os.close(fd)


def read_rows(path: str | Path, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` (the first axis) of a tensor, by one positioned read, in its stored dtype:
    a large tensor read block by block never holds more than a block (``stop - start`` rows).

    Raises:
        ValueError: the tensor has no axis, is boolean, or the range is outside ``[0, shape[0]]``.
        CheckpointFormatError: as :func:`read_tensor`.
    """
    if not entry.shape or entry.dtype == "BOOL" or not 0 <= start <= stop <= entry.shape[0]:
        raise ValueError(f"rows [{start}, {stop}) of {entry.name} {entry.shape} ({entry.dtype}) cannot be read")
    tdtype = _DTYPES[entry.dtype][0]
    if tdtype is None:
        raise CheckpointFormatError(f"dtype {entry.dtype} is not supported by this torch {torch.__version__}",
                                    path=path, tensor=entry.name, hint="upgrade torch")
    row = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
    buf = torch.empty((stop - start) * row, dtype=torch.uint8)
    if buf.numel():
        _read_into(path, entry, buf, start * row)
    return buf.view(tdtype).reshape((stop - start, *entry.shape[1:]))


def read_tensor(path: str | Path, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor with a positioned read (no mmap), in its stored dtype, on the CPU.

    Args:
        path: the file ``entry`` came from.
        entry: a header entry from :func:`read_header`.

    Returns:
        A fresh tensor of shape ``entry.shape`` that owns its memory.

    Raises:
        CheckpointFormatError: the file became shorter than its header says (truncated after it
            was opened), was replaced or rewritten since its header was read, or this torch has no
            such dtype (fp8 needs torch >= 2.1).
    """
    tdtype, _ = _DTYPES[entry.dtype]
    if tdtype is None:
        raise CheckpointFormatError(
            f"dtype {entry.dtype} is not supported by this torch {torch.__version__}",
            path=path, tensor=entry.name, hint="upgrade torch",
        )
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=tdtype)
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    _read_into(path, entry, buf, 0)
    if entry.dtype == "BOOL":
        return buf.to(torch.bool).reshape(entry.shape)
    return buf.view(tdtype).reshape(entry.shape)
