"""Open a checkpoint given the way users name one, and stream its tensors one at a time.

Accepted inputs (:func:`open_checkpoint`):

- a ``.safetensors`` file;
- a model folder: ``model.safetensors.index.json`` (the index decides the shards; we never glob),
  else ``model.safetensors``, else ``pytorch_model.bin.index.json`` / ``pytorch_model.bin``, else a
  folder holding exactly one ``.safetensors`` file;
- an index file (``*.safetensors.index.json`` / ``*.bin.index.json``) directly;
- a PyTorch ``.bin`` / ``.pt`` / ``.pth`` state dict, read with ``torch.load(weights_only=True)``
  only: a file that needs pickle code execution is refused, never run;
- ``org/name`` or ``org/name@revision``: a Hugging Face hub cache entry, resolved offline.

Memory stays bounded by the tensor being read: safetensors are read with positioned reads (see
:mod:`spectra.io.safetensors_file`), ``.bin`` files are mapped, the one tensor copied out and the
map dropped.

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

import json
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import torch

from spectra.errors import CheckpointFormatError, CheckpointNotFoundError, UnsafeCheckpointError
from spectra.io.safetensors_file import TensorEntry, dtype_name, read_header, read_tensor
from spectra.naming import WEIGHT_QUANT_LEAVES, ArchInfo

FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
#: Stored dtypes whose values are codes to be multiplied by a companion scale when one exists.
QUANTISED_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2", "int8"})
#: DeepSeek-V3's block size, used for ``weight_scale_inv`` when config.json does not give one.
DEFAULT_SCALE_BLOCK = (128, 128)
_BIN_SUFFIXES = (".bin", ".pt", ".pth")
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
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    entry: TensorEntry | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of stored data."""
        n = 1
        for d in self.shape:
            n *= d
        return n * (torch.empty(0, dtype=getattr(torch, self.dtype)).element_size())


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

    def __init__(self, label: str, root: Path, fmt: str, tensors: dict[str, TensorInfo], config: dict[str, Any] | None):
        self.label = label
        self.root = root
        self.format = fmt
        self.tensors = tensors
        self.config = config
        self.scales = find_weight_scales(tensors, config)

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, format={self.format!r}, tensors={len(self.tensors)})"

    @property
    def arch(self) -> ArchInfo:
        """Head counts and layout from ``config.json`` (or inferred from shapes)."""
        return ArchInfo.from_config(self.config, {n: t.shape for n, t in self.tensors.items()})

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
        state = _load_bin(info.file)
        try:
            tensor = state[name]
        except KeyError:
            raise CheckpointFormatError("tensor vanished from the file since it was opened", path=info.file, tensor=name) from None
        return tensor.clone()  # copy out of the mapped file so the map can be dropped

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
        CheckpointFormatError: the files are not a checkpoint spectra can read.
        UnsafeCheckpointError: a ``.bin`` file needs pickle code execution.

    Example:
        >>> ckpt = open_checkpoint("path/to/model")            # doctest: +SKIP
        >>> w = ckpt.load("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    """
    label = str(spec)
    path = Path(os.path.expanduser(label))
    if not path.exists():
        if _HUB_ID.match(label) and not label.startswith((".", "/")):
            path = resolve_hub_cache(label)
        else:
            raise CheckpointNotFoundError("no such file or folder", path=label)
    if path.is_dir():
        return _open_folder(label, path)
    return _open_file(label, path)


def _open_folder(label: str, folder: Path) -> Checkpoint:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            return _open_index(label, folder / index_name)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return _open_file(label, folder / single)
    if (folder / "adapter_config.json").is_file():
        raise CheckpointFormatError(
            "this folder is a PEFT adapter (adapter_config.json), not a full checkpoint",
            path=folder, hint="an adapter goes second: `spectra diff BASE ADAPTER`, or alone: `spectra diff ADAPTER`",
        )
    try:
        candidates = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot list the folder ({exc.strerror or exc.__class__.__name__})", path=folder) from None
    if len(candidates) == 1:
        return _open_file(label, folder / candidates[0])
    if candidates:
        raise CheckpointFormatError(
            f"{len(candidates)} .safetensors files but no model.safetensors.index.json",
            path=folder, hint="pass one file, or add the index that says which shards form the model",
        )
    raise CheckpointFormatError(
        "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or index in this folder",
        path=folder, hint="pass a checkpoint file or a Hugging Face model folder",
    )


def _open_file(label: str, path: Path) -> Checkpoint:
    if path.name.endswith(".index.json"):
        return _open_index(label, path)
    config = _read_config(path.parent)
    if path.suffix == ".safetensors":
        return Checkpoint(label, path, "safetensors", _safetensors_infos(path), config)
    if path.suffix in _BIN_SUFFIXES:
        return Checkpoint(label, path, "bin", _bin_infos(path), config)
    raise CheckpointFormatError(
        f"unknown checkpoint file type {path.suffix!r}",
        path=path, hint="expected .safetensors, .bin, .pt, .pth or an .index.json",
    )


def _safetensors_infos(path: Path) -> dict[str, TensorInfo]:
    entries, _ = read_header(path)
    return {n: TensorInfo(n, e.shape, dtype_name(e.dtype), path, e) for n, e in entries.items()}


def _bin_infos(path: Path) -> dict[str, TensorInfo]:
    state = _load_bin(path)
    return {n: TensorInfo(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), path) for n, t in state.items()}


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch state dict safely: ``weights_only=True``, memory-mapped when the file allows."""
    if not path.exists():
        raise CheckpointNotFoundError("no such file", path=path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot read the file ({exc.strerror or exc.__class__.__name__})", path=path) from None
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointNotFoundError("this is a Git LFS pointer, not the weights", path=path,
                                      hint="fetch the real file (git lfs pull) or download it again")
    try:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols; the outcome is what counts
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc).lower():
                raise
            # Legacy (pre-zip) format cannot be mapped: this reads the whole file.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        what = f"it calls {found.group(1)}" if found else "it is not a plain tensor pickle"
        raise UnsafeCheckpointError(
            f"refused: loading this file would need pickle code execution ({what}; weights_only=True failed)",
            path=path, hint="convert it to safetensors with a tool you trust; spectra never runs code from checkpoints",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointFormatError(
            f"cannot read this PyTorch file ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})",
            path=path, hint="the file is truncated or corrupt; download it again",
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointFormatError(
            "not a state dict (a mapping of names to tensors)", path=path,
            hint="save the model with model.state_dict() or safetensors",
        )
    return obj


def _open_index(label: str, index_path: Path) -> Checkpoint:
    folder = index_path.parent
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"cannot parse the index ({exc.__class__.__name__})", path=index_path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError("index has no weight_map", path=index_path)
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard not in shards and not _safe_relative(shard):
            raise CheckpointFormatError(
                f"index points outside its folder: {shard!r}", path=index_path, tensor=str(name),
                hint="shard paths must be plain file names relative to the index",
            )
        shards.setdefault(shard, folder / shard)
    missing = sorted(s for s, p in shards.items() if not p.exists())  # exists() follows cache symlinks
    if missing:
        raise CheckpointNotFoundError(
            f"{len(missing)} of {len(shards)} shards listed in {index_path.name} are missing: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else ""),
            path=folder, hint="the download is incomplete; fetch the missing shards (a partial model is never analysed)",
        )
    fmt = "safetensors" if all(s.endswith(".safetensors") for s in shards) else "bin"
    per_shard: dict[str, dict[str, TensorInfo]] = {
        s: (_safetensors_infos(p) if s.endswith(".safetensors") else _bin_infos(p)) for s, p in shards.items()
    }
    tensors: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        info = per_shard[shard].get(name)
        if info is None:
            raise CheckpointFormatError(
                f"the index says this tensor is in {shard}, but that shard does not hold it",
                path=index_path, tensor=name, hint="the index and shards are from different versions",
            )
        tensors[name] = info
    return Checkpoint(label, folder, fmt, tensors, _read_config(folder))


def _safe_relative(shard: str) -> bool:
    p = PurePosixPath(shard.replace("\\", "/"))
    return bool(shard) and not p.is_absolute() and ".." not in p.parts and ":" not in shard


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(
            f"config.json cannot be parsed ({exc.__class__.__name__})", path=path,
            hint="fix or remove it; it is used for head counts when splitting fused q/k/v matrices",
        ) from None
    return config if isinstance(config, dict) else None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, as ``huggingface_hub`` resolves it (env vars first)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_hub_cache(repo: str) -> Path:
    """Snapshot folder of ``org/name[@revision]`` in the local hub cache; nothing is downloaded.

    Raises:
        CheckpointNotFoundError: the model or revision is not cached.
    """
    repo_id, _, revision = repo.partition("@")
    revision = revision or "main"
    if ".." in revision.split("/") or revision.startswith("/"):
        raise CheckpointNotFoundError(f"revision {revision!r} is not a valid revision name", path=repo)
    cache = hub_cache_dir()
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    hint = f"download it first (e.g. `hf download {repo_id}`); spectra works offline and never downloads"
    if not entry.is_dir():
        raise CheckpointNotFoundError(f"{repo_id} is not in the local Hugging Face cache ({cache})", path=repo, hint=hint)
    ref = entry / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = entry / "snapshots" / commit
    if not snapshot.is_dir():
        raise CheckpointNotFoundError(f"revision {revision!r} of {repo_id} is not in the local cache ({entry})", path=repo, hint=hint)
    return snapshot
