"""What ``spectra inspect`` shows: how a checkpoint's tensors map to layers, modules and roles."""

from __future__ import annotations

from typing import Any

from spectra.io.checkpoint import open_checkpoint
from spectra.naming import describe_checkpoint


def inspect_checkpoint(path: str, *, include_non_matrices: bool = False) -> list[dict[str, Any]]:
    """One record per tensor: name, layer, expert, module, role, stored shape, dtype, parts, note.

    Args:
        path: anything :func:`spectra.open_checkpoint` accepts.
        include_non_matrices: also list 1-D/0-D tensors (module and role are None for them).

    Returns:
        Records in file order; ``parts`` lists the split suffixes (``["q", "k", "v"]``) or ``[""]``.
    """
    ckpt = open_checkpoint(path)
    specs = describe_checkpoint({n: t.shape for n, t in ckpt.tensors.items()}, ckpt.arch)
    records = []
    for name, info in ckpt.tensors.items():
        spec = specs.get(name)
        if spec is None and not include_non_matrices:
            continue
        records.append({
            "name": name,
            "layer": spec.layer if spec else None,
            "expert": spec.expert if spec else None,
            "module": spec.module if spec else None,
            "role": spec.role if spec else None,
            "shape": list(info.shape),
            "dtype": info.dtype,
            "parts": [p.suffix for p in spec.parts] if spec else [],
            "transpose": bool(spec and spec.transpose),
            "note": spec.note if spec else "",
        })
    return records
