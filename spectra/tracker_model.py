"""What the in-training tracker (:mod:`spectra.callbacks`) reads off a live model: the names a checkpoint would store its
weights under, the trained matrices, a PEFT model's configs and LoRA factors, and the base a resumed full fine-tune's
ΔW is of. No measuring here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from spectra.errors import SpectraError
from spectra.io.adapter import base_changing_init
from spectra.io.checkpoint import Checkpoint, open_checkpoint


def original_weights(model: torch.nn.Module, params: dict[str, torch.Tensor], out_dir: Path | None,
                     recorded: dict[str, float]) -> tuple[Checkpoint | None, str]:
    """``(checkpoint, why not)``: the folder the model was loaded from (``name_or_path``, a local folder), opened,
    when it stores every one of ``params`` (stored name -> the trained parameter) in its shape and is the base the
    trace so far measured from: what a resumed full fine-tune's ΔW is of (each is read when its copy is made). Else
    ``(None, why)`` (ΔW is then measured from the resumed weights, as the trace says).

    A model loaded from the run's own checkpoint before resuming from it has that checkpoint as ``name_or_path``: it
    holds every weight in its shape, and taking it for the base measured every later step from the resumed weights
    while the trace said "from the base". So the folder must not be one of ``out_dir``'s checkpoints, and its norms
    must be those the trace's records give (``recorded``: stored name -> ``base_fro_norm``)."""
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path or not Path(path).is_dir():
        return None, "the model was not loaded from a local folder (name_or_path)"
    if out_dir is not None and Path(path).resolve().parent == out_dir.resolve():
        return None, f"the model was loaded from {Path(path).name}, a checkpoint of this run, not from its base"
    try:
        ckpt = open_checkpoint(path)
    except (SpectraError, OSError):
        return None, f"the folder it was loaded from ({path}) could not be read again"
    if not all(name in ckpt.tensors and tuple(ckpt.tensors[name].shape) == tuple(p.shape) for name, p in params.items()):
        return None, f"the folder it was loaded from ({path}) does not hold every trained weight in its shape"
    for name, norm in recorded.items():
        if name in params and name in ckpt.tensors:
            now = float(torch.linalg.vector_norm(ckpt.load(name).double()))
            if not math.isclose(now, norm, rel_tol=1e-6, abs_tol=1e-300):
                return None, (f"the folder it was loaded from ({path}) is not the base the trace measured from ({name}: "
                              f"‖W‖_F {now:.6g} there, {norm:.6g} in trace.jsonl)")
            break  # one weight tells a checkpoint of the run from its base
    return ckpt, ""


def recorded_base_norms(path: Path) -> dict[str, float]:
    """Stored name -> ``base_fro_norm`` of the matrix records of a trace file (``trace.jsonl``), the first of each;
    {} when there is no file or no record."""
    out: dict[str, float] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        meta = rec.get("matrix") if isinstance(rec, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get("name"), str) and isinstance(meta.get("base_fro_norm"), (int, float)):
            out.setdefault(meta["name"], float(meta["base_fro_norm"]))
    return out


#: Segments wrappers add to parameter names that a saved checkpoint does not hold: torch.compile's,
#: FSDP's and activation checkpointing's (anywhere), DistributedDataParallel's ``module.`` (in front).
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


#: Wrappers that hold the trained model as their ``module`` attribute (every name then starts with ``module.``).
_MODULE_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def is_module_wrapper(model: torch.nn.Module) -> bool:
    """Whether ``model`` wraps the trained model as ``module`` (every name then starts with ``module.``): a DDP /
    DataParallel / DeepSpeed engine, or any module whose one child is ``module`` and which holds no parameter of its
    own (a model with a ``weight`` beside a submodule ``module`` is not one)."""
    if not isinstance(getattr(model, "module", None), torch.nn.Module):
        return False
    return type(model).__name__ in _MODULE_WRAPPERS or (
        [n for n, _ in model.named_children()] == ["module"] and not any(True for _ in model.named_parameters(recurse=False)))


def stored_name(name: str, wrapped: bool) -> str:
    """A parameter's name as a checkpoint stores it: without the segments of :data:`_WRAPPER_SEGMENTS`, and without
    the leading ``module.`` of a wrapper (``wrapped``, :func:`is_module_wrapper`; a tracker given the DDP-wrapped model
    named every matrix ``module.model.…``, so its filters matched nothing). Only a wrapper's: a model's own submodule
    called ``module`` keeps it (stripped, ``module.weight`` and a ``weight`` beside it were one name)."""
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace("." + seg, ".").removeprefix(seg)
    return name.removeprefix("module.") if wrapped else name


def trainable_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Model name -> each 2-D floating-point parameter that requires grad now (what a full fine-tune trains)."""
    return {n: p for n, p in model.named_parameters() if p.ndim == 2 and p.requires_grad and p.is_floating_point()}


def peft_configs(model: torch.nn.Module) -> dict[str, Any]:
    """``peft_config`` of a PEFT model (also under torch.compile's or DDP's wrapper), adapter name -> its config; {} otherwise."""
    configs = getattr(model, "peft_config", None) or next(
        (c for w in ("_orig_mod", "module") if (c := getattr(getattr(model, w, None), "peft_config", None))), None)
    return configs if isinstance(configs, dict) else {}


def peft_types(model: torch.nn.Module) -> set[str]:
    """The PEFT tuner types of a model's adapters (``"LORA"``, ``"LOHA"``, ``"IA3"``…)."""
    return {str(getattr(getattr(c, "peft_type", None), "value", getattr(c, "peft_type", ""))).upper() for c in peft_configs(model).values()}


def peft_inits(model: torch.nn.Module) -> dict[str, str]:
    """Adapter name -> the base-changing ``init_lora_weights`` it was made with
    (:data:`spectra.io.adapter.BASE_CHANGING_INITS`: PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA); others absent."""
    return {name: m for name, c in peft_configs(model).items() if (m := base_changing_init(getattr(c, "init_lora_weights", "")))}


def active_adapters(mod: Any) -> tuple[str, ...]:
    """The adapters a PEFT LoRA layer applies now (its active ones that hold LoRA factors)."""
    return tuple(a for a in getattr(mod, "active_adapters", ()) if a in mod.lora_A or a in getattr(mod, "lora_embedding_A", {}))


def lora_factors(mod: Any, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B (out, r), A (r, in), scale)`` of one adapter of a PEFT LoRA layer, in the base weight's
    ``(out, in)`` orientation as stored by ``nn.Linear`` (embeddings: the stored ``(vocab, dim)``)."""
    s = float(mod.scaling[adapter])
    if adapter in mod.lora_A:
        return mod.lora_B[adapter].weight.detach(), mod.lora_A[adapter].weight.detach(), s
    A, B = mod.lora_embedding_A[adapter].detach(), mod.lora_embedding_B[adapter].detach()  # (r, vocab), (dim, r)
    return A.mT, B.mT, s  # (B·A)ᵀ = Aᵀ·Bᵀ
