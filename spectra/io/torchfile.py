"""Reading PyTorch ``.bin`` / ``.pt`` / ``.pth`` state dicts without running code from them.

``torch.load(weights_only=True)`` refuses any pickle that imports something outside torch's allowlist,
but on corrupt bytes its unpickler raises whatever it meets (``KeyError``, ``IndexError``...), and on a
file that is not a pickle at all its message suggests code execution. So, around it:

- the first bytes say what a file is when it cannot be a checkpoint (empty, JSON, an HTML error page,
  a safetensors file with a ``.bin`` name) and the error says that;
- when the load fails, the callables the pickle would import are read from its opcodes with
  :mod:`pickletools` (nothing is executed): a non-torch one makes it an
  :class:`~spectra.errors.UnsafeCheckpointError` naming it, anything else a corrupt file;
- tensors come back plain: ``nn.Parameter`` detached, sparse, meta and quantized tensors refused.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import struct
import warnings
from pathlib import Path

import torch

from spectra.errors import CheckpointFormatError, CheckpointNotFoundError, UnsafeCheckpointError
from spectra.io.paths import open_regular
from spectra.io.safetensors_file import MAX_DIM

#: What torch.save writes first: a zip archive (since torch 1.6), or a pickle protocol-2 PROTO opcode.
_ZIP_MAGIC = b"PK\x03\x04"
#: Pickle opcodes whose argument is a string that a later STACK_GLOBAL may import.
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"})
#: Globals torch's weights-only unpickler allows by default: a file that fails with only these is corrupt, not unsafe.
_PLAIN_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset",
                  "builtins.bytearray", "builtins.slice", "builtins.complex")


def _sniff(head: bytes, size: int, suffix: str) -> tuple[str, str] | None:
    """``(what the file is, hint)`` when its first bytes show it cannot be a torch.save checkpoint."""
    if size == 0:
        return "the file is empty (0 bytes)", "the download failed or was interrupted; download it again"
    text = head.lstrip(b" \t\r\n\xef\xbb\xbf")
    if text[:1] in (b"{", b"["):
        return "this is a JSON file, not a PyTorch checkpoint", "was a config or index file saved under this name?"
    if text[:1] == b"<":
        page = "an HTML page" if text[:15].lower().startswith((b"<!doctype html", b"<html")) else "an XML or HTML document"
        return f"this is {page}, not a PyTorch checkpoint", "a download saved an error page instead of the file; download it again"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return f"this is a safetensors file named {suffix}", "rename it to .safetensors"
    return None


def _pickle_globals(data: bytes) -> list[str]:
    """The globals (``module.name``) the pickles at the start of ``data`` import, found by reading their
    opcodes with :mod:`pickletools` (nothing is executed). Stops at the first corrupt opcode."""
    found: list[str] = []
    strings: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(8):  # torch's legacy format is several pickles in a row, then raw storage bytes
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]) if len(strings) >= 2 else "an imported Python object")
                elif op.name in _STRING_OPS and isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # noqa: BLE001 - corrupt or truncated opcodes: what was found so far stands
            break
        if stream.tell() >= len(data):
            break
    return found


def _load_error(path: Path, head: bytes, zipped: bool, exc: Exception) -> Exception:
    """The one-line error for a ``.bin`` that ``torch.load(weights_only=True)`` could not read."""
    text = str(exc)
    if zipped:
        calls = re.findall(r"GLOBAL ([\w.]+)", text)
    else:
        fd = open_regular(path)
        try:
            calls = _pickle_globals(os.pread(fd, 1 << 20, 0))
        finally:
            os.close(fd)
    unsafe = [c for c in calls if not c.startswith(_PLAIN_GLOBALS)]
    if unsafe:
        return UnsafeCheckpointError(
            f"refused: loading this file would need pickle code execution (it calls {unsafe[0]}; weights_only=True refused it)",
            path=path, hint="convert it to safetensors with a tool you trust; spectra never runs code from checkpoints",
        )
    if not zipped and not head.startswith(b"\x80"):
        return CheckpointFormatError(
            f"not a PyTorch checkpoint (it starts with {head[:12]!r}; torch.save writes a zip archive or a pickle starting with 0x80)",
            path=path, hint="the file is corrupt or not what its name says",
        )
    refused = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    why = f"the weights-only unpickler refuses it: {refused.group(1).strip()[:120]}" if refused else \
        f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"
    return CheckpointFormatError(f"cannot read this PyTorch file ({why})", path=path,
                                 hint="the file is truncated or corrupt; download it again")


def _plain_tensor(path: Path, name: str, value: torch.Tensor) -> torch.Tensor:
    """A dense, CPU, autograd-free view of a loaded tensor; sparse, meta and quantized ones refused."""
    if value.layout != torch.strided:
        raise CheckpointFormatError(f"sparse tensor ({str(value.layout).removeprefix('torch.')}), not a dense weight",
                                    path=path, tensor=name, hint="save it dense (tensor.to_dense()) or as safetensors")
    if value.device.type == "meta":
        raise CheckpointFormatError("meta tensor: it has a shape but no data (saved from a model on the meta device)",
                                    path=path, tensor=name, hint="save the model after its weights are loaded")
    if value.is_quantized:
        raise CheckpointFormatError(f"quantized torch tensor ({str(value.dtype).removeprefix('torch.')}), not a plain weight",
                                    path=path, tensor=name, hint="save tensor.dequantize() instead")
    too_big = next((d for d in value.shape if d > MAX_DIM), None)
    if too_big is not None:
        raise CheckpointFormatError(f"dimension {too_big} of shape {tuple(value.shape)} is larger than {MAX_DIM} (2^31)",
                                    path=path, tensor=name, hint="the file is corrupt or hostile")
    return value.detach()  # an nn.Parameter (state_dict(keep_vars=True), named_parameters()) is an ordinary tensor


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch state dict safely: ``torch.load(weights_only=True)``, memory-mapped when the
    file allows (the zip format; the legacy format is read whole).

    Args:
        path: a ``.bin`` / ``.pt`` / ``.pth`` file (a ``{"state_dict": {...}}`` wrapper is unwrapped).

    Returns:
        name -> dense CPU tensor, detached (``nn.Parameter`` objects become plain tensors).

    Raises:
        CheckpointNotFoundError: no such file, a Git LFS pointer, or unreadable.
        CheckpointFormatError: not a regular file; not a ``torch.save`` checkpoint (said what it
            looks like instead); corrupt; not a mapping of names to tensors; a sparse, meta or
            quantized tensor, or an axis over :data:`spectra.io.safetensors_file.MAX_DIM`.
        UnsafeCheckpointError: loading it would need pickle code execution (names what it calls).
    """
    fd = open_regular(path)  # a FIFO would block torch.load forever
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 64, 0)
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot read the file ({exc.strerror or exc.__class__.__name__})", path=path) from None
    finally:
        os.close(fd)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointNotFoundError("this is a Git LFS pointer, not the weights", path=path,
                                      hint="fetch the real file (git lfs pull) or download it again")
    sniffed = _sniff(head, size, path.suffix)
    if sniffed is not None:
        raise CheckpointFormatError(sniffed[0], path=path, hint=sniffed[1])
    zipped = head.startswith(_ZIP_MAGIC)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the outcome is what counts
            warnings.simplefilter("ignore")
            # the legacy (pre-zip) format cannot be mapped: that one is read whole
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises anything (KeyError, IndexError...) on corrupt bytes
        raise _load_error(path, head, zipped, exc) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointFormatError(
            "not a state dict (a mapping of names to tensors)", path=path,
            hint="save the model with model.state_dict() or safetensors",
        )
    return {k: _plain_tensor(path, k, v) for k, v in obj.items()}
