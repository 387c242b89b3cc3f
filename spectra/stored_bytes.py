"""Stored bytes compared without loading tensors: tied weights stored as copies, and tensors that changed.

``torch.save`` keeps tied weights as one tensor under several names (``TensorInfo.alias_of``); ``safetensors``
refuses shared tensors, so a checkpoint written with :func:`safetensors.torch.save_file` after cloning them holds T5's
one embedding four times (``shared``, both stacks' ``embed_tokens``, ``lm_head``). Read as four matrices, one update
was measured four times. Only embedding tables outside the layer stack are compared (where models tie; a head goes by
its config's ``tie_word_embeddings``), first by size and a sample, then byte for byte, a block at a time.

Where every analysed ΔW is zero, the tensors a diff does not analyse (biases, norms, convolution kernels) are compared
the same way (:func:`changed_tensors`): a bias-only (BitFit) or LayerNorm-only fine-tune was called "the same weights".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

from spectra.io.checkpoint import Checkpoint, TensorInfo
from spectra.name_match import match_names
from spectra.naming import pairing_key

#: Bytes compared per read: two blocks in memory at a time, whatever the tables' size.
BLOCK_BYTES = 1 << 24


def stored_copies(ckpt: Checkpoint, names: Iterable[str]) -> dict[str, str]:
    """Each of ``names`` (tensors of ``ckpt``) that holds byte for byte the data of another (same dtype and shape), mapped
    to the one kept; the others are not keys. Safetensors tensors only
    (a ``.bin`` saved whole keeps tied weights as one tensor already)."""
    wanted = set(names)
    groups: dict[tuple[str, tuple[int, ...]], list[TensorInfo]] = {}
    # the table the model owns stays: the shortest name (T5's ``shared`` before both stacks' ``embed_tokens``;
    # safetensors stores names sorted, ``decoder…`` first), then the file's order
    order = {n: (pairing_key(n).count("."), i) for i, n in enumerate(ckpt.tensors) if n in wanted}
    for name in sorted(order, key=order.__getitem__):
        info = ckpt.tensors[name]
        if info.entry is not None:
            groups.setdefault((info.dtype, tuple(info.shape)), []).append(info)
    out: dict[str, str] = {}
    for group in groups.values():
        by_sample: dict[bytes | None, list[TensorInfo]] = {}
        for info in group:  # a few KiB of each first: tensors that differ there are never read whole
            by_sample.setdefault(_sample(info), []).append(info)
        for sample, same in by_sample.items():
            if sample is None:  # unreadable: nothing is taken for a copy unread
                continue
            for i, info in enumerate(same):
                first = next((f for f in same[:i] if f.name not in out and same_bytes(f, info)), None)
                if first is not None:
                    out[info.name] = first.name
    return out


def _sample(info: TensorInfo, n: int = 1 << 12) -> bytes | None:
    """The first and last ``n`` bytes of a safetensors tensor's data; None when they cannot be read."""
    if info.entry is None:
        return None
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError:
        return None
    try:
        k = min(n, info.entry.nbytes)
        return os.pread(fd, k, info.entry.start) + os.pread(fd, k, info.entry.start + info.entry.nbytes - k)
    except OSError:
        return None
    finally:
        os.close(fd)


def same_bytes(a: TensorInfo, b: TensorInfo) -> bool | None:
    """Whether two safetensors tensors store the same bytes (read ``BLOCK_BYTES`` at a time); None when either cannot
    be read (nothing is taken for a copy, or for changed, unread)."""
    if a.entry is None or b.entry is None:
        return None
    if a.entry.nbytes != b.entry.nbytes:
        return False
    try:
        fa, fb = os.open(a.file, os.O_RDONLY), os.open(b.file, os.O_RDONLY)
    except OSError:
        return None
    try:
        for off in range(0, a.entry.nbytes, BLOCK_BYTES):
            n = min(BLOCK_BYTES, a.entry.nbytes - off)
            x, y = os.pread(fa, n, a.entry.start + off), os.pread(fb, n, b.entry.start + off)
            if len(x) != n or len(y) != n:
                return None  # a file cut short since its header was read
            if x != y:
                return False
        return True
    except OSError:
        return None
    finally:
        os.close(fa)
        os.close(fb)


def base_lookup(base: Checkpoint, tuned: Checkpoint) -> Callable[[str], str | None]:
    """A function from a ``tuned`` tensor's name to the ``base`` tensor it compares with, by pairing's rule
    (:func:`spectra.name_match.match_names`: the same name, else the one base tensor of another wrapper prefix, else an
    encoder's prefix dropped on one side); None where pairing pairs it with nothing. One rule for diff's
    changed-tensor checks and extract's skipped tensors."""
    of = {t: b for b, t in match_names(base.tensors, tuned.tensors)}
    return of.get


def changed_tensors(base: Checkpoint, tuned: Checkpoint, names: Iterable[str]) -> list[str]:
    """The ``names`` (tensors of ``tuned``) whose data differs from their base tensor (:func:`base_lookup`), in the
    order given; tensors the base lacks are left out (pairing lists them). Another shape counts as changed; another dtype
    compares the values; the same dtype the bytes (safetensors read a block at a time, others loaded)."""
    base_of = base_lookup(base, tuned)
    out = []
    for name in names:
        b = base_of(name)
        if b is None or name not in tuned.tensors:
            continue
        bi, ti = base.tensors[b], tuned.tensors[name]
        if tuple(bi.shape) != tuple(ti.shape):
            out.append(name)
        elif bi.dtype != ti.dtype:  # a bf16 base beside a float32 copy: the values decide, not the bytes
            x, y = base.load(b, dequantize=False), tuned.load(name, dequantize=False)
            if not (x.is_floating_point() and y.is_floating_point() and torch.equal(x.double(), y.double())):
                out.append(name)
        elif bi.entry is not None and ti.entry is not None:
            if same_bytes(bi, ti) is False:
                out.append(name)
        elif not torch.equal(*(x.reshape(-1).view(torch.uint8) for x in (base.load(b, dequantize=False),
                                                                         tuned.load(name, dequantize=False)))):
            out.append(name)  # bytes, not values: NaN equals NaN, 0.0 differs from -0.0
    return out


__all__ = ["BLOCK_BYTES", "base_lookup", "changed_tensors", "same_bytes", "stored_copies"]
