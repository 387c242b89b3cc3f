"""Reading PyTorch ``.bin`` / ``.pt`` / ``.pth`` state dicts without running code from them.

``torch.load(weights_only=True)`` refuses any pickle that imports something outside torch's allowlist,
but on corrupt bytes its unpickler raises whatever it meets (``KeyError``, ``IndexError``...), and on a
file that is not a pickle at all its message suggests code execution. So, around it:

- the first bytes say what a file is when it cannot be a checkpoint (empty, JSON, an HTML error page,
  a safetensors file with a ``.bin`` name) and the error says that;
- when the load fails, the callables the pickle would import are read from its opcodes with
  :mod:`pickletools` (nothing is executed): a non-torch one makes it an
  :class:`~spectra.errors.UnsafeCheckpointError` naming it, anything else a corrupt file;
- a TorchScript archive is named as such (it holds a program, not a state dict);
- tensors come back plain: ``nn.Parameter`` detached, sparse, meta and quantized tensors refused, and so
  are views whose strides repeat or overlap elements (an expanded 4-byte storage can claim terabytes);
- a training checkpoint's ``{"model": state_dict, "epoch": ...}`` is unwrapped one level, its modules' non-tensor
  extra state skipped and a DeepSpeed ZeRO-3 file of placeholders refused (:mod:`spectra.io.train_state`);
- a NumPy archive (``np.savez``) under a PyTorch name is named as such.

:class:`StateDictCache` keeps the last file's state dict, so a ``.bin`` read tensor by tensor is
loaded once, not once per tensor, and checks that the file has not changed since it was opened.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
import threading
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spectra.errors import CheckpointFormatError, CheckpointNotFoundError, UnsafeCheckpointError
from spectra.io.paths import FileStamp, check_unchanged, file_stamp, open_regular, regular_file
from spectra.io.safetensors_file import MAX_DIM
from spectra.io.train_state import TRAINER_FILES, WEIGHTS_BESIDE, find_state

#: What torch.save writes first: a zip archive (since torch 1.6), or a pickle protocol-2 PROTO opcode.
_ZIP_MAGIC = b"PK\x03\x04"
#: Pickle opcodes whose argument is a string that a later STACK_GLOBAL may import.
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"})
#: Globals a state dict's pickle uses (what torch's weights-only unpickler allows by default): a file that
#: fails with only these is corrupt, not unsafe. Listed one by one: ``torch.hub.load`` or ``torch.load`` in a
#: pickle is code execution, not a corrupt file.
_PLAIN_GLOBALS = frozenset({
    "collections.OrderedDict", "collections.Counter", "_codecs.encode", "torch.Size", "torch.device", "torch.Tensor",
    "torch.nn.parameter.Parameter", "torch.serialization._get_layout", "torch.storage.TypedStorage",
    "torch.storage.UntypedStorage", "torch._tensor._rebuild_from_type_v2",
    *(f"{m}.{n}" for m in ("builtins", "__builtin__") for n in ("set", "frozenset", "bytearray", "slice", "complex")),
    # dtypes, layouts and quantisation schemes are pickled as torch.<name>
    *(f"torch.{n}" for n, v in vars(torch).items() if isinstance(v, (torch.dtype, torch.layout, torch.qscheme))),
})
#: Storage and legacy tensor classes (torch.FloatStorage, torch.cuda.HalfStorage...) and torch's tensor rebuilders.
_PLAIN_PATTERN = re.compile(r"torch\.(?:cuda\.)?(?:sparse\.)?[A-Z][A-Za-z0-9]*(?:Storage|Tensor)|torch\._utils\._rebuild_[a-z0-9_]+")


def _plain_global(name: str) -> bool:
    """Whether a pickle global is one a plain state dict uses (no code runs through it)."""
    return name in _PLAIN_GLOBALS or _PLAIN_PATTERN.fullmatch(name) is not None


def _clip(text: str, limit: int) -> str:
    """The first sentence of ``text``, cut at a word boundary to at most ``limit`` characters."""
    text = " ".join(text.split())
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    if len(first) <= limit:
        return first.rstrip(".")
    return first[:limit].rsplit(" ", 1)[0] + " ..."


def _zip_names(path: Path) -> list[str]:
    """The member names of a zip file; empty when it cannot be listed."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return []


def _is_torchscript(names: list[str]) -> bool:
    """Whether a zip's members are a TorchScript archive's (``torch.jit.save``: ``constants.pkl`` and ``code/``)."""
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _is_numpy_archive(names: list[str]) -> bool:
    """Whether a zip's members are ``np.savez``'s: ``.npy`` arrays, and no ``data.pkl`` as torch.save writes."""
    return bool(names) and all(n.endswith(".npy") for n in names)


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
    unsafe = [c for c in calls if not _plain_global(c)]
    if unsafe and path.name in TRAINER_FILES:  # the Trainer's own state beside the weights: no weights to convert
        return UnsafeCheckpointError(f"{TRAINER_FILES[path.name]}, not model weights (refused: loading it would need pickle "
                                     f"code execution, it calls {unsafe[0]})", path=path,
                                     hint=WEIGHTS_BESIDE)
    if unsafe:
        return UnsafeCheckpointError(
            f"refused: loading this file would need pickle code execution (it calls {unsafe[0]}; weights_only=True refused it)",
            path=path, hint=("a Lightning checkpoint's hyper_parameters often hold such objects (a Namespace, a path): if you "
                             "trust the file, save its weights alone, torch.save(torch.load(p, weights_only=False)['state_dict'], "
                             "'weights.pt'), and pass that; spectra never runs code from checkpoints"
                             if Path(path).suffix == ".ckpt" else
                             "convert it to safetensors with a tool you trust; spectra never runs code from checkpoints"),
        )
    if not zipped and not head.startswith(b"\x80"):
        return CheckpointFormatError(
            f"not a PyTorch checkpoint (it starts with {head[:12]!r}; torch.save writes a zip archive or a pickle starting with 0x80)",
            path=path, hint="the file is corrupt or not what its name says",
        )
    members = _zip_names(path) if zipped else []
    if _is_torchscript(members):
        return CheckpointFormatError("is a TorchScript archive (torch.jit.save), not a state dict", path=path,
                                     hint="save model.state_dict() with torch.save or safetensors")
    if _is_numpy_archive(members):
        return CheckpointFormatError(f"this is a NumPy archive (np.savez: {len(members)} .npy arrays), not a PyTorch checkpoint",
                                     path=path, hint="save the arrays as safetensors (safetensors.numpy.save_file) or "
                                                     "with torch.save of torch tensors")
    refused = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
    why = f"the weights-only unpickler refuses it: {_clip(refused.group(1), 160)}" if refused else \
        f"{type(exc).__name__}: {_clip(text, 160)}"
    if "storage has wrong byte size" in text:  # torch's own text leaves its printf codes in ("expected %ld got %ld4398…")
        why = "a storage's declared size does not match the bytes stored for it"
    if not zipped and "UntypedStorage' has no attribute 'dtype'" in text:  # torch >= 2.x on fp8 in the pre-1.6 format
        return CheckpointFormatError("torch cannot read this file: float8 (or other newer dtype) tensors saved in the legacy (pre-zip) format of "
                                     "torch.save(..., _use_new_zipfile_serialization=False)", path=path,
                                     hint="save it again in torch.save's default (zip) format or as safetensors, where it was made")
    return CheckpointFormatError(f"cannot read this PyTorch file ({why})", path=path,
                                 hint="the file is truncated or corrupt; download it again")


#: Bytes a view with repeated elements (stride 0, overlapping strides) may claim beyond its storage:
#: an expanded buffer (``position_ids``, a mask) is kept; 4 bytes claiming a 2^31 × 2^31 matrix is not.
_REPEAT_SLACK = 1 << 20


def _layout_problem(value: torch.Tensor) -> str | None:
    """Why a strided tensor cannot be copied out as the weight it claims to be, or None.

    A pickle sets each tensor's shape and strides over its storage. Strides of 0 (an expanded view)
    or strides that revisit elements let a few stored bytes claim any shape (4 bytes as a 2^31 × 2^31
    matrix): copying it out would allocate what the shape implies, not what the file holds. A view
    whose elements are distinct claims at most its storage, so a shape that claims more than 4× the
    storage and :data:`_REPEAT_SLACK` repeats elements on purpose; one reaching past the storage is corrupt.
    """
    if value.numel() == 0:
        return None
    reach = sum(st * (sz - 1) for sz, st in zip(value.shape, value.stride(), strict=True) if sz > 1)
    need = (value.storage_offset() + reach + 1) * value.element_size()
    have = value.untyped_storage().nbytes()
    if need > have:
        return f"shape {tuple(value.shape)} with strides {tuple(value.stride())} needs {need} bytes of a {have}-byte storage"
    claimed = value.numel() * value.element_size()
    if claimed > 4 * have + _REPEAT_SLACK:
        return (f"shape {tuple(value.shape)} with strides {tuple(value.stride())} claims {claimed} bytes from a "
                f"{have}-byte storage (repeated elements: an expanded view)")
    return None


def _plain_tensor(path: Path, name: str, value: torch.Tensor) -> torch.Tensor:
    """A dense, CPU, autograd-free view of a loaded tensor; sparse, meta and quantized ones refused, and
    views whose shape claims more elements than their storage holds."""
    # first, a fresh plain tensor: a pickle may set a tensor's attributes (weights_only allows it), and an attribute
    # shadows a method (numel = complex made numel() 0j == 0, and 4 bytes passed as a 30000² matrix)
    value = torch.Tensor.detach(value)
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
    problem = _layout_problem(value)
    if problem is not None:
        raise CheckpointFormatError(f"{problem}: it is not a stored weight", path=path, tensor=name,
                                    hint="save tensor.contiguous() instead; a file that does this on purpose is hostile")
    return value  # (detached: an nn.Parameter of state_dict(keep_vars=True), named_parameters(), is an ordinary tensor)


@dataclass(frozen=True)
class LoadedState:
    """A ``.bin`` state dict as loaded.

    Attributes:
        tensors: name -> dense CPU tensor (views of the mapped file for the zip format: copy before changing one).
        stamp: the file's :data:`~spectra.io.paths.FileStamp` the tensors were loaded from.
        wrapper: the key of a training checkpoint the state dict was found under (``"model"``...), or None.
        mapped: whether the tensors are views of the memory-mapped file.
        notes: how the file was read beyond the wrapper (skipped extra state, another weight set beside it).
        aliases: name -> the first name holding the same tensor (same storage, offset, shape, strides and dtype):
            ``torch.save`` keeps tied weights shared, so a T5 state dict saved whole holds its one embedding as
            ``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head``.
    """

    tensors: dict[str, torch.Tensor]
    stamp: FileStamp
    wrapper: str | None = None
    mapped: bool = False
    notes: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)


def _aliases(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """:attr:`LoadedState.aliases` of the loaded ``tensors`` (empty ones, which hold no data, alias nothing)."""
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def read_state_dict(path: Path) -> LoadedState:
    """Load a PyTorch state dict safely: ``torch.load(weights_only=True)``, memory-mapped when the
    file allows (the zip format; the legacy format is read whole).

    Args:
        path: a ``.bin`` / ``.pt`` / ``.pth`` file (a training checkpoint's ``{"model": {...}, "epoch": ...}``
            is unwrapped one level, :func:`spectra.io.train_state.find_state`).

    Returns:
        The tensors (detached: ``nn.Parameter`` objects become plain tensors), the file's stamp, and
        the wrapper key if one was unwrapped.

    Raises:
        CheckpointNotFoundError: no such file, a Git LFS pointer, or unreadable.
        CheckpointFormatError: not a regular file; not a ``torch.save`` checkpoint (said what it
            looks like instead, a TorchScript archive included); corrupt; not a mapping of names to
            tensors; a sparse, meta or quantized tensor, an axis over
            :data:`spectra.io.safetensors_file.MAX_DIM`, or strides that claim more than the storage
            holds; the file changed while it was loaded.
        UnsafeCheckpointError: loading it would need pickle code execution (names what it calls).
    """
    fd = open_regular(path)  # a FIFO would block torch.load forever
    try:
        st = os.fstat(fd)
        head = os.pread(fd, 64, 0)
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot read the file ({exc.strerror or exc.__class__.__name__})", path=path) from None
    finally:
        os.close(fd)
    size, stamp = st.st_size, file_stamp(st)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointNotFoundError("this is a Git LFS pointer, not the weights", path=path,
                                      hint="fetch the real file (git lfs pull) or download it again")
    sniffed = _sniff(head, size, path.suffix)
    if sniffed is not None:
        raise CheckpointFormatError(sniffed[0], path=path, hint=sniffed[1])
    zipped = head.startswith(_ZIP_MAGIC)
    if zipped:
        _check_pickle(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the outcome is what counts
            warnings.simplefilter("ignore")
            # the legacy (pre-zip) format cannot be mapped: that one is read whole
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises anything (KeyError, IndexError...) on corrupt bytes
        check_unchanged(path, stamp, regular_file(path))  # a file rewritten under the load: say that, not "corrupt"
        raise _load_error(path, head, zipped, exc) from None
    check_unchanged(path, stamp, regular_file(path))  # torch opened it by name: the same file as stamped?
    if zipped:
        _check_records(path)
    found = find_state(path, obj)
    tensors = {k: _plain_tensor(path, k, v) for k, v in found.tensors.items()}
    aliases = _aliases(tensors)
    _refuse_overlapping(path, tensors, aliases)
    return LoadedState(tensors, stamp, found.wrapper, mapped=zipped, notes=found.notes, aliases=aliases)


def _refuse_overlapping(path: Path, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Refuse a state dict whose tensors (an alias of another counted once) claim more than 4× the bytes of their
    storages and :data:`_REPEAT_SLACK`: overlapping views of one storage under many names, which a file of a few
    megabytes made into gigabytes as each was copied out (1000 windows of one 4 MB storage: 4 GB). Tied weights are
    aliases; a model's views of a fused matrix do not overlap."""
    storages: dict[int, int] = {}
    claimed = 0
    for name, t in tensors.items():
        if name not in aliases and t.numel():
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            claimed += t.numel() * t.element_size()
    have = sum(storages.values())
    if claimed > 4 * have + _REPEAT_SLACK:
        raise CheckpointFormatError(f"its {len(tensors) - len(aliases)} tensors claim {claimed:,} bytes from {have:,} bytes of storage "
                                    "(overlapping views of the same bytes under many names): it is not a saved state dict", path=path,
                                    hint="save each weight on its own (tensor.clone()) or as safetensors; a file doing this on purpose is hostile")


class _Inert:
    """What :class:`_StorageScan` makes of every global and call: nothing runs, only the storage classes' names stay."""

    def __init__(self, *args: object, name: str = "", **kwargs: object) -> None:
        self.name = name

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        return _Inert()

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:  # an OrderedDict's SETITEMS
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


class _StorageScan(pickle.Unpickler):
    """Lists the storages a ``torch.save`` pickle refers to, ``(key, dtype name, numel)``, importing and calling
    nothing (run only on a pickle ``torch.load(weights_only=True)`` has accepted)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: list[tuple[str, str, int]] = []

    def find_class(self, module: str, name: str) -> _Inert:  # never imports
        # torch.cuda.FloatStorage is allowed too (loaded on the CPU): its record was not checked, and read past its end
        return _Inert(name=name if module == "torch" or module.startswith("torch.") else "")

    def persistent_load(self, pid: object) -> _Inert:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Inert):
            self.storages.append((str(pid[2]), pid[1].name, int(pid[4])))
        return _Inert()


#: The largest ``data.pkl`` read: ``torch.save`` writes about 100 bytes per tensor (a megabyte for ten thousand).
MAX_PICKLE_BYTES = 64 << 20


def _check_pickle(path: Path) -> None:
    """Refuse, from the zip's directory alone, a ``data.pkl`` that ``torch.save`` cannot have written: compressed (it
    stores every record) or above :data:`MAX_PICKLE_BYTES`: a 2 MB file whose deflated pickle held a 2 GB string took
    8 GB of memory in ``torch.load`` before it was refused as no state dict."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"), None)
    except Exception:  # noqa: BLE001 - a corrupt directory (zipfile raises ValueError, UnicodeDecodeError…): torch.load says what
        return
    if pkl is not None and pkl.compress_type != zipfile.ZIP_STORED:
        raise CheckpointFormatError(f"{pkl.filename} is compressed: torch.save stores its pickle, so this is no checkpoint it saved "
                                    "(a deflated pickle can stand for gigabytes)", path=path,
                                    hint="load it with torch.load where that is safe and save the state dict as safetensors")
    if pkl is not None and pkl.file_size > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(f"{pkl.filename} holds {pkl.file_size:,} bytes, more than spectra reads ({MAX_PICKLE_BYTES >> 20} "
                                    "MiB; a state dict's pickle takes about 100 bytes per tensor): besides the tensors it holds much "
                                    "else", path=path, hint="save the state dict alone (torch.save(model.state_dict(), …) or safetensors)")


def _check_records(path: Path) -> None:
    """A memory-mapped load reads each storage at its zip record's offset without checking the record (torch's
    full load does): a record shorter than its storage would be read into the next one's bytes, a compressed one as
    its compressed bytes. Refuse both, naming the record."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pkl = next((n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"), None)
            data = z.read(pkl) if pkl is not None else b""
    except (OSError, zipfile.BadZipFile, RuntimeError) as exc:  # torch read it: a zip this module cannot is corrupt
        raise CheckpointFormatError(f"the file is corrupt: {exc}", path=path, hint="download or save the checkpoint again") from None
    if pkl is None:
        return
    prefix = pkl[: -len("data.pkl")]
    packed = next((i for n, i in infos.items() if n.startswith(prefix + "data/") and i.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise CheckpointFormatError(f"storage record {packed.filename} is compressed: its bytes cannot be read in place",
                                    path=path, hint="re-save the checkpoint with torch.save (or as safetensors)")
    scan = _StorageScan(data)
    try:
        scan.load()
    except Exception:  # noqa: BLE001 - torch read it, this scan cannot follow it: torch's full load checks every record
        _full_load_check(path)
        return
    for key, kind, numel in scan.storages:
        info = infos.get(f"{prefix}data/{key}")
        with warnings.catch_warnings():  # typed storages are deprecated (their dtype is all that is read)
            warnings.simplefilter("ignore")
            dtype = getattr(torch, kind, None) if kind.endswith("Storage") and kind != "UntypedStorage" else None
            # an untyped storage (float8, uint16 …) counts bytes
            size = 1 if kind == "UntypedStorage" else getattr(getattr(dtype, "dtype", None), "itemsize", None)
        if info is not None and size is None:  # a storage class the scan cannot size: torch's full load checks the records
            _full_load_check(path)
            return
        if info is not None and info.file_size != numel * size:
            raise CheckpointFormatError(f"storage record {info.filename} holds {info.file_size} bytes where its tensor "
                                        f"needs {numel * size} ({numel} × {size}): the file is corrupt", path=path,
                                        hint="download or save the checkpoint again")


def _full_load_check(path: Path) -> None:
    """Refuse a zip ``.bin`` whose records torch's full (unmapped) load refuses: one shorter or longer than its storage.
    Memory: the file, this once."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # noqa: BLE001 - a record torch's full load refuses (short, or of another size)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointFormatError(f"the file is corrupt: {first}", path=path, hint="download or save the checkpoint again") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of :func:`read_state_dict` (name -> dense CPU tensor); raises as it does."""
    return read_state_dict(path).tensors


class StateDictCache:
    """The state dicts of the last ``max_files`` ``.bin`` files loaded, so that reading a file tensor by
    tensor loads it once (a 500-tensor file loaded per tensor took minutes), and memory stays bounded:
    a zip-format file is memory-mapped (its pages are the page cache's, reclaimable), a legacy-format
    one is held whole until another file replaces it. Thread-safe: reader threads share one.

    Every :meth:`get` checks the file against the stamp its tensors were listed from, so a file
    replaced or rewritten during a run is an error, never a mix of two checkpoints.
    """

    def __init__(self, max_files: int = 1) -> None:
        self.max_files = max(1, max_files)
        self._entries: OrderedDict[str, LoadedState] = OrderedDict()
        self._lock = threading.Lock()
        #: file -> the wrapper key its state dict was found under, for every file loaded that had one
        self.unwrapped: dict[Path, str] = {}
        #: file -> how it was read beyond the wrapper (:attr:`LoadedState.notes`), for every file that has some
        self.file_notes: dict[Path, tuple[str, ...]] = {}

    def __getstate__(self) -> dict:
        # a copy (pickled, deep-copied) starts empty: a lock and mapped files do not travel
        return {"max_files": self.max_files, "unwrapped": dict(self.unwrapped), "file_notes": dict(self.file_notes)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_files"])
        self.unwrapped = state["unwrapped"]
        self.file_notes = state.get("file_notes", {})

    def forget(self, path: Path) -> None:
        """Drop ``path``'s state dict (a no-op when it is not held)."""
        with self._lock:
            self._entries.pop(str(path), None)

    def get(self, path: Path, stamp: FileStamp | None = None, *, tensor: str | None = None) -> LoadedState:
        """The state dict of ``path``, loaded on first use.

        Args:
            path: the ``.bin`` file.
            stamp: the file's stamp when its tensors were listed; None to accept the file as it is now.
            tensor: the tensor wanted, for messages.

        Raises:
            CheckpointFormatError: the file changed since ``stamp``; or as :func:`read_state_dict`.
            CheckpointNotFoundError, UnsafeCheckpointError: as :func:`read_state_dict`.
        """
        key = str(path)
        with self._lock:  # held while loading: a second reader waits for this load instead of repeating it
            now = file_stamp(regular_file(path, tensor=tensor))
            check_unchanged(path, stamp, now, tensor=tensor)
            hit = self._entries.get(key)
            if hit is not None and hit.stamp == now:
                self._entries.move_to_end(key)
                return hit
            self._entries.pop(key, None)
            loaded = read_state_dict(path)
            check_unchanged(path, stamp, loaded.stamp, tensor=tensor)  # replaced between the check and the load
            self._entries[key] = loaded
            while len(self._entries) > self.max_files:
                self._entries.popitem(last=False)  # drops the tensors (and the map) of the oldest file
            if loaded.wrapper is not None:
                self.unwrapped[Path(path)] = loaded.wrapper
            if loaded.notes:
                self.file_notes[Path(path)] = loaded.notes
            return loaded
