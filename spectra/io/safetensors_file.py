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

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from spectra.errors import CheckpointFormatError, CheckpointNotFoundError

#: safetensors dtype tag -> (torch dtype or None when this torch lacks it, bytes per element)
_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}

_TAG_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # for torch builds without fp8


def dtype_name(tag: str) -> str:
    """torch's name for a safetensors dtype tag: ``"BF16"`` -> ``"bfloat16"``."""
    tdtype = _DTYPES[tag][0]
    return str(tdtype).removeprefix("torch.") if tdtype is not None else _TAG_NAMES[tag]


# A header larger than this is not a checkpoint we should trust with our memory; the safetensors
# library uses the same 100 MB bound.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as declared in a safetensors header.

    Attributes:
        name: tensor name as stored.
        dtype: safetensors dtype tag (``"BF16"``, ``"F32"``, ...).
        shape: shape as stored (for a Linear weight ``(out, in)``).
        start: absolute byte offset of the data in the file.
        nbytes: size of the data in bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate the header of a safetensors file.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(entries, metadata)``: tensor name -> :class:`TensorEntry`, and the ``__metadata__`` map.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CheckpointFormatError: the header is truncated, not JSON, or declares data outside the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFormatError(
                    f"file is {size} bytes, too short for a safetensors header",
                    path=path, hint="the file is truncated or not a safetensors file",
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointFormatError(
                    f"header declares {n} bytes but the file has {size}",
                    path=path, hint="the file is truncated or not a safetensors file",
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointNotFoundError("file not found", path=path) from None
    except IsADirectoryError:
        raise CheckpointFormatError("expected a .safetensors file, got a folder", path=path) from None
    except OSError as exc:  # permissions, I/O errors
        raise CheckpointNotFoundError(f"cannot read the file ({exc.strerror or exc.__class__.__name__})", path=path,
                                      hint="check the file's permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(
            f"header is not valid UTF-8 JSON ({exc.__class__.__name__})",
            path=path, hint="the file is corrupt or not a safetensors file",
        ) from None
    if not isinstance(header, dict):
        raise CheckpointFormatError("header is not a JSON object", path=path)
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError("__metadata__ is not a JSON object", path=path)
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _validate_entry(path, name, info, data_start, data_size)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _validate_entry(path: Path, name: str, info: object, data_start: int, data_size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise CheckpointFormatError("header entry is not an object", path=path, tensor=name)
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if dtype not in _DTYPES:
        raise CheckpointFormatError(
            f"unknown dtype {dtype!r}", path=path, tensor=name,
            hint=f"known dtypes are {', '.join(sorted(_DTYPES))}",
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointFormatError(f"invalid shape {shape!r}", path=path, tensor=name)
    if not (
        isinstance(offsets, list) and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointFormatError(f"invalid data_offsets {offsets!r}", path=path, tensor=name)
    nbytes = math.prod(shape) * _DTYPES[dtype][1]
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointFormatError(
            f"data_offsets span {offsets[1] - offsets[0]} bytes but {dtype} {tuple(shape)} needs {nbytes}",
            path=path, tensor=name, hint="the file is corrupt",
        )
    if offsets[1] > data_size:
        raise CheckpointFormatError(
            f"data ends at byte {data_start + offsets[1]} but the file has {data_start + data_size}",
            path=path, tensor=name, hint="the file is truncated; download it again",
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], nbytes)


def read_tensor(path: str | Path, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor with a positioned read (no mmap), in its stored dtype, on the CPU.

    Args:
        path: the file ``entry`` came from.
        entry: a header entry from :func:`read_header`.

    Returns:
        A fresh tensor of shape ``entry.shape`` that owns its memory.

    Raises:
        CheckpointFormatError: the file became shorter than its header says (truncated after it
            was opened), or this torch has no such dtype (fp8 needs torch >= 2.1).
    """
    tdtype, _ = _DTYPES[entry.dtype]
    if tdtype is None:
        raise CheckpointFormatError(
            f"dtype {entry.dtype} is not supported by this torch {torch.__version__}",
            path=path, tensor=entry.name, hint="upgrade torch",
        )
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()) if entry.nbytes else memoryview(b"")
    got = 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot open the file any more ({exc.strerror or exc.__class__.__name__})",
                                      path=path, tensor=entry.name) from None
    try:
        while got < entry.nbytes:
            n = os.preadv(fd, [view[got:]], entry.start + got)
            if n == 0:
                raise CheckpointFormatError(
                    f"file ended after {got} of {entry.nbytes} bytes of this tensor",
                    path=path, tensor=entry.name,
                    hint="the file was truncated or is being written; download it again",
                )
            got += n
    finally:
        os.close(fd)
    if entry.dtype == "BOOL":
        return buf.to(torch.bool).reshape(entry.shape)
    return buf.view(tdtype).reshape(entry.shape)
