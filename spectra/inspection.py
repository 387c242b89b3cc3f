"""What ``spectra inspect`` shows: how a checkpoint's tensors map to layers, modules and roles."""

from __future__ import annotations

import re
from typing import Any

from spectra.io.checkpoint import FLOAT_DTYPES, Checkpoint, open_checkpoint
from spectra.roles import ROLE_ORDER


def inspect_checkpoint(path: str | Checkpoint, *, include_non_matrices: bool = False) -> list[dict[str, Any]]:
    """One record per tensor: name, layer, expert, module, role, stored shape, dtype, parts, note.

    Args:
        path: anything :func:`spectra.open_checkpoint` accepts, or a checkpoint it opened.
        include_non_matrices: also list 1-D/0-D tensors and matrices of a dtype that is not a float weight
            (int, bool, complex without a dequantisation scale, which every command skips); module and role
            are None for them.

    Returns:
        Records in model order (:func:`model_order`: embeddings, then layer 0, 1, 2 … 10 by number,
        each in role order q, k, v, o, gate, up, down, then the rest); ``parts`` lists the split
        suffixes (``["q", "k", "v"]``) or ``[""]``.
    """
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    specs = ckpt.specs
    records = []
    for name, info in ckpt.tensors.items():
        spec = specs.get(name)
        if spec is not None and info.dtype not in FLOAT_DTYPES and name not in ckpt.scales:
            spec = None  # an int/bool/complex matrix with no scale is skipped by every command: not listed as one
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
            "note": spec.note if spec else ("" if info.dtype in FLOAT_DTYPES or len(info.shape) < 2
                                             else f"dtype {info.dtype} is not a float weight: not analysed"),
        })
    return sorted(records, key=model_order)


def inspect_adapter(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One record per LoRA module of the PEFT adapter folder ``path``, as :func:`inspect_checkpoint`'s, with the
    update's ``(out, in)`` shape, ``r``, ``lora_alpha``, ``scale`` (after the patterns) and ``dora``; and the adapter's
    read notes, and why each of its other stored tensors is not a LoRA update (``"name: reason"``).

    Raises:
        CheckpointFormatError: the folder is not an adapter spectra reads (the refusals of ``spectra diff``).
    """
    from spectra.adapter_diff import SAVED_BIAS, adapter_updates
    from spectra.io.adapter import open_adapter

    adapter = open_adapter(path, params=True)  # target_parameters LoRAs listed as stored (a base places them)
    records = [{"name": mod.weight_name, "layer": spec.layer, "expert": spec.expert, "module": spec.module, "role": spec.role,
                "shape": list(mod.shape), "r": mod.r, "lora_alpha": mod.alpha, "scale": mod.scale,
                "dora": mod.magnitude is not None, "note": spec.note} for mod, spec, _ in adapter_updates(adapter, None)]
    other = ([f"{s.name}: {s.reason}" for s in adapter.skipped]
             + [f"{n}: {SAVED_BIAS if n.endswith('.bias') else 'stored whole (modules_to_save)'}" for n in adapter.full]
             + [f"{n}: {SAVED_BIAS if n.endswith('.bias') else 'a copy of the base layer PEFT saved'}" for n in adapter.base_copies]
             # the adapter does not say which of the config's target_parameters a LoRA is on (a router's 2-D weight or
             # an expert stack): the base does
             + [f"{p.stored[0]}: a target_parameters LoRA on {p.module} "
                f"({p.params[0] if len(p.params) == 1 else ' or '.join(p.params) + ': the base says which'}), "
                f"A {tuple(p.A.shape)}, B {tuple(p.B.shape)}: on a 3-D expert stack one rank-r LoRA per expert; spectra diff "
                "BASE ADAPTER places it on the base's matrices" for p in adapter.params])
    return sorted(records, key=model_order), [*adapter.notes, *other]


def natural_key(name: str) -> tuple:
    """Sort key comparing the numbers inside a name as numbers: ``layers.2`` before ``layers.10``.

    >>> sorted(["h.10.w", "h.2.w", "h.1.w"], key=natural_key)
    ['h.1.w', 'h.2.w', 'h.10.w']
    """
    # ASCII digits only, compared by length then text: int() of a 5000-digit run raises
    return tuple((0, len(p.lstrip("0")), p.lstrip("0")) if p.isdigit() else (1, 0, p)
                 for p in re.split(r"([0-9]+)", name) if p)


def model_order(record: dict[str, Any]) -> tuple:
    """Sort key of an inspect record: embeddings first, then the layers by number (each in role
    order, experts by number), then everything outside the stack; names compared with
    :func:`natural_key`. Tensors that are not matrices (``--all``) go with the layer their name
    holds."""
    role, layer = record.get("role"), record.get("layer")
    if layer is None and record.get("module") is None:  # a norm or bias: place it by the number in its name
        m = re.search(r"\.(\d+)\.", record["name"])
        layer = int(m.group(1)) if m else None
    block = 1 if layer is not None else (0 if role in ("embed", "pos_embed") else 2)
    rank = ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)
    expert = record.get("expert")
    return (block, -1 if layer is None else layer, -1 if expert is None else expert, rank, natural_key(record["name"]))
