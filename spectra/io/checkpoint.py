"""Open a checkpoint given the way users name one, and stream its tensors one at a time.

Accepted inputs (:func:`open_checkpoint`):

- a ``.safetensors`` file;
- a model folder: the first of ``model.safetensors``, ``model.safetensors.index.json`` (the index decides
  the shards; we never glob), ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` — transformers'
  ``from_pretrained`` order (:data:`FOLDER_WEIGHTS`), so a stale second set beside the first is ignored as
  transformers ignores it (with a note in :attr:`Checkpoint.notes`) — else a folder holding exactly one
  ``.safetensors`` file;
- an index file (``*.safetensors.index.json`` / ``*.bin.index.json``) directly;
- a PyTorch ``.bin`` / ``.pt`` / ``.pth`` state dict, read with ``torch.load(weights_only=True)``
  only: a file that needs pickle code execution is refused, never run (:mod:`spectra.io.torchfile`);
- ``org/name`` or ``org/name@revision``: a Hugging Face hub cache entry, resolved offline.

Only regular files are opened (a FIFO would block forever), and a file found inside a folder (a
shard, ``config.json``) must resolve inside it, symlinks followed (:mod:`spectra.io.paths`). Every
JSON file is read by :func:`spectra.io.jsonfile.load_json` (bounded size and nesting, strict).

Memory stays bounded by the tensor being read: safetensors are read with positioned reads (see
:mod:`spectra.io.safetensors_file`); the state dict of the last ``.bin`` file read is kept per checkpoint
(:class:`spectra.io.torchfile.StateDictCache`: mapped for the zip format, whole for the legacy one), so
each file is loaded once, and each tensor is copied out of it. Every read checks that the file is still
the one whose header was read (device, inode, size, mtime): a file replaced or rewritten during a run is
an error, never a mix of two checkpoints.

Quantised weights (fp8 ``float8_e4m3fn`` / ``float8_e5m2``, or ``int8``) stored with a companion
scale are dequantised on load (:meth:`Checkpoint.load`, :func:`dequantize`): the stored codes alone
are not the weights, and diffing them without their scales gives silently wrong numbers. Scales
found beside ``X.weight`` (:func:`find_weight_scales`):

- ``X.weight_scale`` (compressed-tensors, FBGEMM): one element (per tensor); ``(out,)`` or
  ``(out, 1)`` (per output channel); ``(out, in / g)`` (per group of ``g`` inputs); or block scales
  as below (compressed-tensors ``block_structure``);
- ``X.weight_scale_inv`` (DeepSeek-V3): ``(ceil(out / 128), ceil(in / 128))`` block scales, block
  size from ``config.json``'s ``quantization_config.weight_block_size`` when given. Despite its
  name it is *multiplied*: ``W = W_fp8 · scale`` (DeepSeek-V3 ``weight_dequant``);
- ``X.weight_zero_point`` (asymmetric int8), same shape as the scale: ``W = (Q − z) · scale``.

Activation scales (``input_scale``) and KV-cache scales are not weights and are never applied.
"""

from __future__ import annotations

import functools
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectra.errors import CheckpointFormatError, CheckpointNotFoundError, SpectraError
from spectra.io.hub import resolve_hub_cache
from spectra.io.jsonfile import load_json
from spectra.io.paths import (
    FileStamp,
    allowed_roots,
    check_inside,
    check_unchanged,
    checkpoint_location,
    file_kind,
    hub_cache_hint,
    missing_text,
    unreadable_hint,
)
from spectra.io.safetensors_file import TensorEntry, dtype_name, read_header, read_rows, read_tensor
from spectra.io.shard_index import read_order, safe_relative, shard_key
from spectra.io.torchfile import StateDictCache
from spectra.io.training_folders import INDEX_NAME, describe_file, describe_folder, lone_shard, model_parallel_file
from spectra.naming import WEIGHT_QUANT_LEAVES, ArchInfo, MatrixSpec, describe_checkpoint

FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
#: Stored dtypes whose values are codes to be multiplied by a companion scale when one exists.
QUANTISED_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2", "int8"})
#: DeepSeek-V3's block size, used for ``weight_scale_inv`` when config.json does not give one.
DEFAULT_SCALE_BLOCK = (128, 128)
_BIN_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # .ckpt: PyTorch Lightning's torch.save checkpoint
#: The suffixes of a checkpoint saved as one file (safetensors, torch.save, Lightning's .ckpt).
WEIGHT_FILE_SUFFIXES = (".safetensors", *_BIN_SUFFIXES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, as declared (nothing read yet).

    Attributes:
        name: tensor name as stored.
        shape: stored shape.
        dtype: torch dtype name (``"bfloat16"``, ``"float32"``...).
        file: the file holding it.
        entry: its safetensors header entry, or None for ``.bin`` files.
        stamp: for a ``.bin`` file, its :data:`~spectra.io.paths.FileStamp` when it was listed (a
            safetensors entry carries its own); reads refuse a file changed since.
        alias_of: for a ``.bin`` file, the first name of the same file holding the same tensor (tied weights saved
            whole: :attr:`spectra.io.torchfile.LoadedState.aliases`); None for the first name or another tensor.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    entry: TensorEntry | None = None
    stamp: FileStamp | None = field(default=None, compare=False)
    alias_of: str | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        """Bytes of stored data."""
        if self.entry is not None:
            return self.entry.nbytes
        return math.prod(self.shape) * torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()


@dataclass(frozen=True)
class WeightScale:
    """How one quantised weight is dequantised: ``W = (Q − zero_point) · scale``, each scale entry
    covering a ``block`` of the stored ``(…, out, in)`` weight.

    Attributes:
        weight: the quantised weight's name (``X.weight``).
        scale: the scale tensor's name (``X.weight_scale`` or ``X.weight_scale_inv``).
        block: ``(rows, cols)`` of the weight one scale entry covers: ``(out, in)`` per tensor,
            ``(1, in)`` per output channel, ``(1, g)`` per group, ``(128, 128)`` DeepSeek-V3 blocks.
        kind: the same in words, for notes (``"per-tensor"``, ``"128x128 block"``...).
        zero_point: the zero-point tensor's name, or None (symmetric quantisation).
    """

    weight: str
    scale: str
    block: tuple[int, int]
    kind: str
    zero_point: str | None = None

    def describe(self, dtype: str) -> str:
        """One phrase for notes: ``"dequantised from float8_e4m3fn with 128x128 block scales (X.weight_scale_inv)"``."""
        zp = f" and zero point ({self.zero_point})" if self.zero_point else ""
        return f"dequantised from {dtype} with {self.kind} scales ({self.scale}){zp}"


class Checkpoint:
    """A checkpoint opened for streaming: names, shapes and dtypes known, data read on demand.

    Attributes:
        label: what the user passed (kept verbatim for results).
        root: the resolved file or folder.
        format: ``"safetensors"`` or ``"bin"``.
        tensors: name -> :class:`TensorInfo`, in file order.
        config: the parsed ``config.json`` beside the weights, or None.
        scales: quantised weight name -> :class:`WeightScale`, for every fp8/int8 weight stored with
            a companion scale (:func:`find_weight_scales`); :meth:`load` applies it.

    Raises:
        CheckpointFormatError: a scale's shape does not fit its weight (checked from the headers,
            before anything is read).
    """

    def __init__(self, label: str, root: Path, fmt: str, tensors: dict[str, TensorInfo], config: dict[str, Any] | None,
                 states: StateDictCache | None = None):
        self.label = label
        self.root = root
        self.format = fmt
        self.tensors = tensors
        self.config = config
        self.scales = find_weight_scales(tensors, config)
        #: caveats of how the checkpoint was read (e.g. which of several weight sets in a folder), for a
        #: result's warnings; each starts with :data:`READ_NOTE_PREFIX`
        self.notes: list[str] = []
        #: the last ``.bin`` file's state dict, so a file is loaded once, not once per tensor
        self._states = states if states is not None else StateDictCache()

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, format={self.format!r}, tensors={len(self.tensors)})"

    # cached: a checkpoint's names, shapes and config do not change once opened
    @functools.cached_property
    def arch(self) -> ArchInfo:
        """Head counts and layout from ``config.json`` (or inferred from shapes)."""
        return ArchInfo.from_config(self.config, {n: t.shape for n, t in self.tensors.items()})

    @functools.cached_property
    def specs(self) -> dict[str, MatrixSpec]:
        """Every weight named by role, layer and module (:func:`spectra.naming.describe_checkpoint`)."""
        return describe_checkpoint({n: t.shape for n, t in self.tensors.items()}, self.arch)

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(t.nbytes for t in self.tensors.values())

    def load(self, name: str, *, dequantize: bool = True) -> torch.Tensor:
        """Read one tensor on the CPU; the result owns its memory.

        A quantised weight with a companion scale (``name`` in :attr:`scales`) comes back
        dequantised, float32, same shape (:func:`dequantize`); every other tensor, or any tensor
        with ``dequantize=False``, in its stored dtype.

        Raises:
            KeyError: ``name`` is not in this checkpoint.
            CheckpointFormatError: the data cannot be read (truncated file, corrupt archive).
        """
        q = self._read(name)
        ws = self.scales.get(name) if dequantize else None
        if ws is None:
            return q
        zp = self._read(ws.zero_point) if ws.zero_point else None
        return _dequantize(q, self._read(ws.scale), ws.block, zp)

    def _read(self, name: str) -> torch.Tensor:
        """One tensor as stored."""
        info = self.tensors[name]
        if info.entry is not None:
            return read_tensor(info.file, info.entry)
        state = self._states.get(info.file, info.stamp, tensor=name).tensors
        try:
            tensor = state[name]
        except KeyError:
            raise CheckpointFormatError("tensor vanished from the file since it was opened", path=info.file, tensor=name) from None
        copy = tensor.clone()  # the cached state dict is shared (and mapped): callers get their own copy
        check_unchanged(info.file, info.stamp, os.stat(info.file), tensor=name)  # rewritten under the mapped copy: mixed bytes
        return copy

    def reads_rows(self, name: str) -> bool:
        """Whether :meth:`load_rows` can read ``name`` a block of rows at a time (a safetensors tensor with
        at least one axis, neither quantised nor boolean); else only :meth:`load` reads it, whole."""
        info = self.tensors[name]
        return info.entry is not None and name not in self.scales and info.entry.dtype != "BOOL" and len(info.shape) >= 1

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``name`` (first axis), as stored, by one positioned read
        (:meth:`reads_rows` must hold): a large tensor, an embedding, read block by block.

        Raises:
            KeyError: ``name`` is not in this checkpoint. ValueError: it cannot be read by rows.
            CheckpointFormatError: the data cannot be read.
        """
        if not self.reads_rows(name):
            raise ValueError(f"{name} cannot be read a block of rows at a time")
        info = self.tensors[name]
        return read_rows(info.file, info.entry, start, stop)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, in the order given (default: file order)."""
        for name in names if names is not None else list(self.tensors):
            yield name, self.load(name)


def find_weight_scales(tensors: dict[str, TensorInfo], config: dict[str, Any] | None = None) -> dict[str, WeightScale]:
    """The companion scale of every quantised weight, checked against the weight's shape.

    Args:
        tensors: a checkpoint's tensors (name -> :class:`TensorInfo`, headers only).
        config: its ``config.json``, for the block size (``quantization_config.weight_block_size``
            or compressed-tensors' ``block_structure``); DeepSeek-V3's 128×128 when absent.

    Returns:
        weight name -> :class:`WeightScale`, for weights stored as fp8 or int8 (``QUANTISED_DTYPES``)
        that have an ``X.weight_scale`` or ``X.weight_scale_inv``. Scales beside a weight stored in a
        wider float are not applied (they are reported as skipped, with that reason, by pairing).

    Raises:
        CheckpointFormatError: a scale (or zero point) does not fit its weight, or a weight has two
            scales; the message names both tensors.
    """
    hint_block = _config_block(config)
    out: dict[str, WeightScale] = {}
    for name, info in tensors.items():
        if info.dtype not in QUANTISED_DTYPES:
            continue
        prefix = name[: -len("weight")] if name.endswith("weight") else None
        if prefix is None:
            continue
        found = {leaf: prefix + leaf for leaf in WEIGHT_QUANT_LEAVES if prefix + leaf in tensors}
        scale_names = [found[k] for k in ("weight_scale", "weight_scale_inv") if k in found]
        if not scale_names:
            continue
        if len(scale_names) > 1:
            raise CheckpointFormatError(
                f"weight has two scales, {scale_names[0]} and {scale_names[1]}; which one applies is ambiguous",
                path=info.file, tensor=name, hint="the checkpoint mixes two quantisation formats",
            )
        sname = scale_names[0]
        sinfo = tensors[sname]
        if sinfo.dtype not in FLOAT_DTYPES:
            raise CheckpointFormatError(
                f"quantisation scale {sname} of weight {name} has dtype {sinfo.dtype}; a float scale was expected",
                path=sinfo.file, tensor=sname,
            )
        leaf = sname[len(prefix):]
        fit = _scale_block(info.shape, sinfo.shape, leaf, hint_block)
        if fit is None:
            lead, (r, c) = info.shape[:-2], (info.shape[-2:] if len(info.shape) >= 2 else (None, None))
            blk = hint_block or DEFAULT_SCALE_BLOCK
            expect = ("1 element" if r is None else
                      f"1 element (per tensor), {(*lead, r)} or {(*lead, r, 1)} (per output channel), "
                      f"({', '.join(str(d) for d in (*lead, r))}, in/g) (per group of g inputs) or "
                      f"{(*lead, -(-r // blk[0]), -(-c // blk[1]))} ({blk[0]}x{blk[1]} blocks)")
            raise CheckpointFormatError(
                f"quantisation scale {sname} has shape {tuple(sinfo.shape)}, which does not fit weight {name} "
                f"of shape {tuple(info.shape)}; expected {expect}",
                path=sinfo.file, tensor=sname,
                hint="the scale and the weight come from different files or versions of the model",
            )
        block, kind = fit
        zname = found.get("weight_zero_point")
        if zname is not None and tuple(tensors[zname].shape) != tuple(sinfo.shape) and math.prod(tensors[zname].shape) != 1:
            raise CheckpointFormatError(
                f"zero point {zname} has shape {tuple(tensors[zname].shape)} but its scale {sname} has "
                f"{tuple(sinfo.shape)}; they must match",
                path=tensors[zname].file, tensor=zname,
            )
        out[name] = WeightScale(name, sname, block, kind, zname)
    return out


def _config_block(config: dict[str, Any] | None) -> tuple[int, int] | None:
    """The block size of block-wise weight scales from config.json, or None."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return None
    candidates = [qc.get("weight_block_size")]
    groups = qc.get("config_groups")
    if isinstance(groups, dict):
        candidates += [g.get("weights", {}).get("block_structure") for g in groups.values()
                       if isinstance(g, dict) and isinstance(g.get("weights"), dict)]
    for c in candidates:
        if isinstance(c, str) and re.fullmatch(r"\d+x\d+", c):
            c = [int(x) for x in c.split("x")]
        if isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in c):
            return int(c[0]), int(c[1])
    return None


def _scale_block(wshape: tuple[int, ...], sshape: tuple[int, ...], leaf: str,
                 hint: tuple[int, int] | None) -> tuple[tuple[int, int], str] | None:
    """``((rows, cols) each scale entry covers, kind)`` for a weight of stored shape ``(…, out, in)``
    and a scale of shape ``sshape``; None when the scale fits no known layout."""
    n = math.prod(sshape)
    if len(wshape) < 2:
        return ((1, 1), "per-tensor") if n == 1 else None
    lead, (r, c) = tuple(wshape[:-2]), tuple(wshape[-2:])
    sshape = tuple(sshape)
    if n == 1:
        return (r, c), "per-tensor"
    if lead and sshape in (lead, (*lead, 1), (*lead, 1, 1)):
        return (r, c), "per-tensor (per expert)"
    if sshape in ((*lead, r), (*lead, r, 1)):
        return (1, c), "per-channel"
    if len(sshape) != len(wshape) or sshape[:-2] != lead:
        return None
    a, b = sshape[-2:]
    if leaf == "weight_scale" and a == r and b > 0 and c % b == 0:
        return (1, c // b), f"per-group (group size {c // b})"
    br, bc = hint or DEFAULT_SCALE_BLOCK
    if -(-r // br) == a and -(-c // bc) == b:
        return (br, bc), f"{br}x{bc} block"
    return None


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """``W = (Q − zero_point) · scale`` with each scale entry broadcast over a ``block`` of ``Q``.

    Args:
        q: the stored codes, shape ``(…, out, in)`` (fp8, int8 or any dtype), or 0-/1-D with a
            one-element scale.
        scale: shape ``(…, ceil(out / block[0]), ceil(in / block[1]))``, or anything with that many
            elements (``(out,)``, ``(out, 1)``, ``()``); any float dtype. The last block of a row or
            column may be partial (shapes need not be multiples of the block).
        block: ``(rows, cols)`` of ``q`` one scale entry covers.
        zero_point: None, or the same number of elements as ``scale``.

    Returns:
        A new float32 tensor shaped like ``q``. Peak memory is ``q`` plus the result plus one row of
        expanded scales (``in`` floats) per block row: the scale is never expanded to ``q``'s size.
        The product is rounded once to float32 (relative error ≤ 2^-24); codes of ≤ 8 bits
        times a float32 scale are otherwise exact.

    Example:
        >>> q = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).to(torch.float8_e4m3fn)
        >>> dequantize(q, torch.tensor([[0.5], [2.0]]), (1, 3))
        tensor([[ 0.5000,  1.0000,  1.5000],
                [ 8.0000, 10.0000, 12.0000]])
    """
    return _dequantize(q, scale, block, zero_point)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], zero_point: torch.Tensor | None) -> torch.Tensor:
    out = q.to(torch.float32)
    if out is q:  # already float32: never scale the caller's tensor in place
        out = out.clone()
    s = scale.to(torch.float32)
    z = zero_point.to(torch.float32) if zero_point is not None else None
    if out.numel() == 0:
        return out
    if s.numel() == 1:
        if z is not None:
            out.sub_(z.reshape(()))
        return out.mul_(s.reshape(()))
    lead, (r, c) = out.shape[:-2], out.shape[-2:]
    br, bc = block
    a, b = -(-r // br), -(-c // bc)
    s = s.reshape(*lead, a, b)
    z = z.reshape(*lead, a, b) if z is not None and z.numel() > 1 else z
    if r % br == 0 and c % bc == 0:  # exact tiling: broadcast through a blocked view, no copy
        v = out.view(*lead, a, br, b, bc)
        if z is not None:
            v.sub_(z.reshape(*lead, a, 1, b, 1) if z.numel() > 1 else z.reshape(()))
        v.mul_(s.view(*lead, a, 1, b, 1))
        return out
    for i in range(a):  # partial last blocks (e.g. 7168 x 18432 / 128 is fine, 200 x 300 is not)
        rows = out[..., i * br : (i + 1) * br, :]  # (…, ≤br, in), a view
        if z is not None:
            rows.sub_(z[..., i : i + 1, :].repeat_interleave(bc, dim=-1)[..., :c] if z.numel() > 1 else z.reshape(()))
        rows.mul_(s[..., i : i + 1, :].repeat_interleave(bc, dim=-1)[..., :c])  # (…, 1, in)
    return out


def open_checkpoint(spec: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint from a file, folder, index file or hub cache id, reading headers only.

    Args:
        spec: see the module docstring for the accepted forms.

    Returns:
        A :class:`Checkpoint` whose tensors can be streamed with :meth:`Checkpoint.load`.

    Raises:
        CheckpointNotFoundError: nothing at that path, a shard listed by an index is missing, or the
            hub id is not in the local cache.
        CheckpointFormatError: the files are not a checkpoint spectra can read; a FIFO, socket or
            device where a file is expected (refused before anything could block); a file found in
            the folder (a shard, ``config.json``) that resolves outside it (:mod:`spectra.io.paths`).
        UnsafeCheckpointError: a ``.bin`` file needs pickle code execution.

    Example:
        >>> ckpt = open_checkpoint("path/to/model")            # doctest: +SKIP
        >>> w = ckpt.load("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    """
    label = str(checkpoint_location(spec))
    shown = Path(os.path.expanduser(label))
    # absolute now: its tensors are read later, and a notebook's os.chdir in between named another folder's files
    # (messages and notes keep the path as typed)
    path = shown.absolute()
    try:
        ckpt = _open_path(label, path)
    except SpectraError as exc:
        if not shown.is_absolute():
            exc.path = exc.path and exc.path.replace(str(path), str(shown))
            exc.message = exc.message.replace(str(path), str(shown))
        raise
    if not shown.is_absolute():
        ckpt.notes = [n.replace(str(path), str(shown)) for n in ckpt.notes]
    return ckpt


def _open_path(label: str, path: Path) -> Checkpoint:
    """:func:`open_checkpoint` of the absolute ``path`` the user named ``label``."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if _HUB_ID.match(label) and not label.startswith((".", "/")):
            return _open_folder(label, resolve_hub_cache(label))
        raise CheckpointNotFoundError(missing_text(path), path=label) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise CheckpointNotFoundError(f"cannot read it ({getattr(exc, 'strerror', None) or exc})", path=label,
                                      hint=unreadable_hint(exc)) from None
    if stat.S_ISDIR(mode):
        return _open_folder(label, path)
    if not stat.S_ISREG(mode):
        raise CheckpointFormatError(f"is {file_kind(mode)}, not a regular file", path=label,
                                    hint="pass a checkpoint file or a model folder")
    return _open_file(label, path, allowed_roots(path.parent))


#: Every :attr:`Checkpoint.notes` line starts with this, so that a command can tell them among a result's warnings.
READ_NOTE_PREFIX = "reading "


def read_notes(checkpoints: Iterable[Any]) -> list[str]:
    """How the given checkpoints (or adapters: anything with ``notes``) were read (:attr:`Checkpoint.notes`:
    the weight set a folder of several was read from), each note once, in order; None entries are passed
    over. For a result's warnings."""
    return list(dict.fromkeys(n for c in checkpoints if c is not None for n in c.notes))

#: The weight files of a model folder, in the order transformers' ``PreTrainedModel.from_pretrained``
#: (``_get_resolved_checkpoint_files``, transformers 4.x/5.x) tries them: the first present is the model.
FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _is_entry(path: Path) -> bool:
    """Whether something is at ``path``: a symlink counts even when broken or pointing outside (it is refused
    when opened, never skipped silently), and so does a FIFO or a folder under a weight file's name."""
    return path.exists() or path.is_symlink()


def _open_folder(label: str, folder: Path) -> Checkpoint:
    roots = allowed_roots(folder)
    present = [n for n in FOLDER_WEIGHTS if _is_entry(folder / n)]
    if present:
        chosen = folder / present[0]
        check_inside(chosen, roots)
        ckpt = _open_index(label, chosen, roots) if present[0].endswith(".index.json") else _open_file(label, chosen, roots)
        # shards no index names (a newer download's, beside a stale pytorch_model.bin) are another weight set
        listed = os.listdir(folder)  # once: a variant's index names its shards, which are then no loose weight set
        loose = [] if "model.safetensors.index.json" in present or any(INDEX_NAME.fullmatch(n) for n in listed) \
            else sorted(n for n in listed if n.endswith(".safetensors") and lone_shard(folder / n))
        if len(present) > 1 or loose:  # e.g. a stale pytorch_model.bin index left beside a newer model.safetensors
            ignored = present[1:] + ([f"{len(loose)} shard files ({loose[0]} …) no index names"] if loose else [])
            ckpt.notes.append(f"{READ_NOTE_PREFIX}{label}: the folder holds {len(present) + bool(loose)} weight sets; read "
                              f"{present[0]} (transformers' order) and ignored {', '.join(ignored)}")
        if _is_entry(folder / "adapter_config.json"):  # commands that take adapters read the adapter instead
            ckpt.notes.append(f"{READ_NOTE_PREFIX}{label}: the folder holds a full model and a PEFT adapter "
                              f"(adapter_config.json); read the full model {present[0]} here, while diff, compare, esd and "
                              f"trace read the adapter; pass {folder / present[0]} to read the full model everywhere")
        return ckpt
    if (folder / "adapter_config.json").is_file():
        raise CheckpointFormatError("this folder is a PEFT adapter (adapter_config.json), not a full checkpoint", path=folder,
                                    hint="an adapter is the fine-tuned side, never the base: give the full model it was "
                                         "trained on as the base (`spectra diff BASE ADAPTER`, `spectra compare A B --base BASE`)")
    try:
        # found by suffix, not named: a sub-folder called x.safetensors is no candidate (a named one is refused above)
        candidates = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors" and not p.is_dir())
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot list the folder ({exc.strerror or exc.__class__.__name__})", path=folder) from None
    if len(candidates) == 1:  # one shard of several (an interrupted download, most often) is read with a note saying so
        check_inside(folder / candidates[0], roots)
        return _open_file(label, folder / candidates[0], roots)
    if candidates:
        variants = sorted(p.name for p in folder.iterdir() if INDEX_NAME.fullmatch(p.name) and p.is_file())
        raise CheckpointFormatError(
            f"{len(candidates)} .safetensors files but no model.safetensors.index.json",
            path=folder, hint=f"pass the variant's index ({folder / variants[0]})" if variants else
            "pass one file, or add the index that says which shards form the model",
        )
    hub = hub_cache_hint(folder) or describe_folder(folder)  # a hub cache passed for its snapshot, a DeepSpeed folder…
    # PEFT saves an adapter of another name than "default" in a sub-folder of that name
    adapters = named_adapters(folder) if not hub else []
    listed = ", ".join(adapters[:3]) + (" …" if len(adapters) > 3 else "")
    raise CheckpointFormatError(
        "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json in this folder"
        + (f": {hub[0]}" if hub else f"; it holds PEFT adapters in sub-folders ({listed})" if adapters else ""),
        path=folder, hint=hub[1] if hub else (f"pass one of them, e.g. {folder / adapters[0]}" if adapters
                                              else "pass a checkpoint file or a Hugging Face model folder"),
    )


def _open_file(label: str, path: Path, roots: tuple[Path, ...]) -> Checkpoint:
    """``path`` is the file the user named, or one found in a folder and checked against ``roots``;
    files it leads to (shards, ``config.json``) must resolve inside ``roots``."""
    if INDEX_NAME.fullmatch(path.name):
        return _open_index(label, path, roots)
    split = model_parallel_file(path) if path.suffix in WEIGHT_FILE_SUFFIXES else None
    if path.suffix not in WEIGHT_FILE_SUFFIXES or split:
        what, hint = split or describe_file(path) or (f"unknown checkpoint file type {path.suffix!r}",
                                                      "expected .safetensors, .bin, .pt, .pth, .ckpt or an .index.json")
        raise CheckpointFormatError(what, path=path, hint=hint)
    states = StateDictCache()
    infos = tensor_infos(path, states)
    ckpt = Checkpoint(label, path, "safetensors" if path.suffix == ".safetensors" else "bin", infos,
                      read_config(path.parent, roots), states)
    ckpt.notes.extend(unwrap_notes(label, states))
    if shard := lone_shard(path):  # one shard's matrices, never the whole model: every command says so
        ckpt.notes.append(f"{READ_NOTE_PREFIX}{label}: {path.name} is shard {shard[0]} of {shard[1]} and no index names the "
                          "others; only its tensors are read (an interrupted download?)")
    return ckpt


def unwrap_notes(label: str, states: StateDictCache) -> list[str]:
    """A :attr:`Checkpoint.notes` line for each ``.bin`` file whose state dict was found inside a training
    checkpoint (``{"model": {...}, "epoch": ...}``) and read from there, or read with caveats (skipped extra
    state, an EMA weight set beside it: :attr:`spectra.io.torchfile.LoadedState.notes`)."""
    notes = []
    for p in dict.fromkeys([*states.unwrapped, *states.file_notes]):
        key, rest = states.unwrapped.get(p), "; ".join(states.file_notes.get(p, ()))
        head = f"{p.name} is a training checkpoint; read the state dict under its {key!r} key" if key else p.name
        notes.append(f"{READ_NOTE_PREFIX}{label}: {head}" + (("; " if key else ": ") + rest if rest else ""))
    return notes


#: The note of a safetensors file whose metadata says TensorFlow or Flax wrote it.
FOREIGN_LAYOUT = ("its metadata says format {fmt!r}: TensorFlow and Flax store a dense kernel as (in, out), the transpose of "
                  "PyTorch's (out, in) that spectra reads, so a square matrix paired with a PyTorch checkpoint's is compared "
                  "transposed (convert it first: transformers' from_{fmt}=True, then save_pretrained)")


def tensor_infos(path: Path, states: StateDictCache | None = None) -> dict[str, TensorInfo]:
    """Every tensor of one ``.safetensors`` or ``.bin`` / ``.pt`` / ``.pth`` file, headers only for
    safetensors (a ``.bin`` is loaded, memory-mapped when its format allows, to learn its shapes).

    Args:
        path: the file.
        states: the checkpoint's cache of loaded ``.bin`` files, so that listing a file also loads it for
            its first reads; None for a one-off load.

    Raises:
        CheckpointNotFoundError, CheckpointFormatError, UnsafeCheckpointError: as :func:`open_checkpoint`.
    """
    if path.suffix == ".safetensors":
        entries, metadata = read_header(path)
        if states is not None and (fmt := metadata.get("format")) in ("tf", "flax"):
            # transformers converts such files (from_tf / from_flax); read as they are, a square kernel is transposed
            states.file_notes[path] = (*states.file_notes.get(path, ()), FOREIGN_LAYOUT.format(fmt=fmt))
        return {n: TensorInfo(n, e.shape, dtype_name(e.dtype), path, e) for n, e in entries.items()}
    states = states if states is not None else StateDictCache()
    loaded = states.get(path)
    if not loaded.mapped:
        # a legacy-format file is held whole: not kept past its listing, so that opening many checkpoints
        # (trace, interfere) holds none of them; its first read loads it again
        states.forget(path)
    return {n: TensorInfo(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), path, stamp=loaded.stamp,
                          alias_of=loaded.aliases.get(n)) for n, t in loaded.tensors.items()}


def _open_index(label: str, index_path: Path, roots: tuple[Path, ...]) -> Checkpoint:
    folder = index_path.parent
    check_inside(index_path, roots)
    index = load_json(index_path, what="index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError("index has no weight_map", path=index_path)
    listed: dict[str, None] = {}  # the shard keys, in order
    spellings: set[str] = set()  # as listed: transformers orders the shards by these
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard not in listed and not safe_relative(shard):
            raise CheckpointFormatError(f"index points outside its folder: {shard!r}", path=index_path, tensor=str(name),
                                        hint="shard paths must be plain file names relative to the index")
        spellings.add(shard)
        shard = weight_map[name] = shard_key(shard)  # `./a.bin` and `a.bin` are one shard, listed and read once
        listed[shard] = None
    # a shard via a linked folder (`r -> /`) refused before any stat; plain names once they exist (10**6 absent: 85 s)
    for shard in (s for s in listed if "/" in s):
        check_inside(folder / shard, roots, what=shard)
    if missing := sorted(s for s in listed if not os.path.exists(os.path.join(folder, s))):  # follows cache symlinks
        raise CheckpointNotFoundError(
            f"{len(missing)} of {len(listed)} shards listed in {index_path.name} are missing: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else ""),
            path=folder, hint="the download is incomplete; fetch the missing shards (a partial model is never analysed)")
    shards = {s: folder / s for s in listed}
    for shard in (s for s in listed if "/" not in s):  # a plain name that links out of the allowed roots
        check_inside(shards[shard], roots, what=shard)
    fmt = "safetensors" if all(s.endswith(".safetensors") for s in shards) else "bin"
    states = StateDictCache()
    per_shard = {s: tensor_infos(p, states) if p.suffix in WEIGHT_FILE_SUFFIXES else _unknown_shard(index_path, s)
                 for s, p in shards.items()}
    # every tensor of every listed shard, in transformers' order (spectra.io.shard_index)
    tensors, _, texts = read_order(sorted(spellings), weight_map, per_shard, index_path.name)
    absent = next((n for n in weight_map if n not in tensors), None)
    if absent is not None:
        raise CheckpointFormatError(
            f"the index says this tensor is in {weight_map[absent]}, but no listed shard holds it",
            path=index_path, tensor=absent, hint="the index and shards are from different versions",
        )
    notes = [f"{READ_NOTE_PREFIX}{label}: {t}" for t in texts]
    ckpt = Checkpoint(label, folder, fmt, tensors, read_config(folder, roots), states)
    ckpt.notes.extend(notes + unwrap_notes(label, states))
    return ckpt


def _unknown_shard(index_path: Path, shard: str) -> dict[str, TensorInfo]:
    raise CheckpointFormatError(f"index lists {shard!r}, which is not a .safetensors or .bin file", path=index_path,
                                hint="shards must be .safetensors, .bin, .pt or .pth files")


def named_adapters(folder: Path) -> list[str]:
    """The sub-folders of ``folder`` that hold a PEFT adapter saved under a name (``folder/speech/``),
    sorted; a Hugging Face Trainer's ``checkpoint-N`` folders are left out (a run, not named adapters)."""
    try:
        return sorted(q.name for q in folder.iterdir() if q.is_dir() and (q / "adapter_config.json").is_file()
                      and not re.fullmatch(r"checkpoint-\d+", q.name))
    except OSError:
        return []


def read_config(folder: Path, roots: tuple[Path, ...]) -> dict[str, Any] | None:
    """``folder``'s config.json as a dict (None: none, or not an object), kept inside ``roots``."""
    path = folder / "config.json"
    if not (path.exists() or path.is_symlink()):
        return None
    check_inside(path, roots, what="config.json")
    config = load_json(path, what="config.json")
    return config if isinstance(config, dict) else None
