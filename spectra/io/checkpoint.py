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
"""

from __future__ import annotations

import json
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
from spectra.naming import ArchInfo

FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
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


class Checkpoint:
    """A checkpoint opened for streaming: names, shapes and dtypes known, data read on demand.

    Attributes:
        label: what the user passed (kept verbatim for results).
        root: the resolved file or folder.
        format: ``"safetensors"`` or ``"bin"``.
        tensors: name -> :class:`TensorInfo`, in file order.
        config: the parsed ``config.json`` beside the weights, or None.
    """

    def __init__(self, label: str, root: Path, fmt: str, tensors: dict[str, TensorInfo], config: dict[str, Any] | None):
        self.label = label
        self.root = root
        self.format = fmt
        self.tensors = tensors
        self.config = config

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

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor, in its stored dtype, on the CPU; the result owns its memory.

        Raises:
            KeyError: ``name`` is not in this checkpoint.
            CheckpointFormatError: the data cannot be read (truncated file, corrupt archive).
        """
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
