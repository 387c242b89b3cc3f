"""What the in-training tracker (:mod:`spectra.callbacks`) reads off a live model: the names a checkpoint would store its
weights under, the trained matrices, a PEFT model's configs and LoRA factors, and the base a resumed full fine-tune's
ΔW is of. No measuring here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from spectra.errors import SpectraError
from spectra.io.adapter import base_changing_init
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.naming import INNER_WRAPPERS


def original_weights(model: torch.nn.Module, params: dict[str, torch.Tensor], trace_dir: Path | None,
                     resume_step: int, *, by_norms: bool = False) -> tuple[Checkpoint | None, str]:
    """``(checkpoint, why not)``: the folder the model was loaded from (``name_or_path``, a local folder), opened, when
    it stores every one of ``params`` (stored name -> the trained parameter) in its shape and is not a checkpoint of
    the run being resumed: what a resumed full fine-tune's ΔW is of (each is read when its copy is made, and its norm
    checked against the trace's records there: :meth:`spectra.callbacks.SpectraTracker._discover`). Else
    ``(None, why)`` (ΔW is then measured from the resumed weights, as the trace says).

    A model loaded from the run's own checkpoint before resuming from it has that checkpoint as ``name_or_path``: it
    holds every weight in its shape, and taking it for the base measured every later step from the resumed weights
    while the trace said "from the base". Where the trace holds norms to check each copy against (``by_norms``), those
    decide; without them, a folder in ``trace_dir`` (the folder of ``trace.jsonl``), or one whose
    ``trainer_state.json`` is at ``resume_step`` (the Trainer's checkpoint being resumed), is taken for no base (a
    stage-2 run's base, a stage-1 checkpoint at the same step, was refused so with its norms at hand)."""
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path or not Path(path).is_dir():
        return None, "the model was not loaded from a local folder (name_or_path)"
    if not by_norms and (trace_dir is not None and Path(path).resolve().parent == trace_dir.resolve()
                         or _trainer_step(Path(path)) == resume_step):
        return None, f"the model was loaded from {Path(path).name}, a checkpoint of this run, not from its base"
    try:
        ckpt = open_checkpoint(path)
    except (SpectraError, OSError):
        return None, f"the folder it was loaded from ({path}) could not be read again"
    if not all(name in ckpt.tensors and tuple(ckpt.tensors[name].shape) == tuple(p.shape) for name, p in params.items()):
        return None, f"the folder it was loaded from ({path}) does not hold every trained weight in its shape"
    return ckpt, ""


def _trainer_step(folder: Path) -> int | None:
    """``global_step`` of a Trainer checkpoint's ``trainer_state.json`` in ``folder``, None without one."""
    try:
        step = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


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




#: Wrappers that hold the trained model as their ``module`` attribute (every name then starts with ``module.``).
_MODULE_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def is_module_wrapper(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a DDP / DataParallel / DeepSpeed engine wrapping the trained model as ``module`` (every
    name then starts with ``module.``), also under ``torch.compile`` (``compile(DDP(model))``, the order PyTorch
    recommends: ``_orig_mod.module.…``); a model's own submodule called ``module`` is not one (its checkpoints keep it)."""
    if type(model).__name__ == "OptimizedModule":
        model = getattr(model, "_orig_mod", model)
    return type(model).__name__ in _MODULE_WRAPPERS and isinstance(getattr(model, "module", None), torch.nn.Module)


def stored_name(name: str, wrapped: bool) -> str:
    """A parameter's name as a checkpoint stores it: without the segments of
    :data:`spectra.naming.INNER_WRAPPERS` (torch.compile's, FSDP's, activation checkpointing's), and without the
    leading ``module.`` of a wrapper (``wrapped``, :func:`is_module_wrapper`; a tracker given the DDP-wrapped model
    named every matrix ``module.model.…``, so its filters matched nothing). Only a wrapper's: a model's own submodule
    called ``module`` keeps it (stripped, ``module.weight`` and a ``weight`` beside it were one name)."""
    parts = name.split(".")
    name = ".".join([c for c in parts[:-1] if c not in INNER_WRAPPERS] + parts[-1:])
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
    (:data:`spectra.io.adapter.BASE_CHANGING_INITS`: PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, Astra); others absent."""
    return {name: m for name, c in peft_configs(model).items() if (m := base_changing_init(getattr(c, "init_lora_weights", "")))}


def active_adapters(mod: Any) -> tuple[str, ...]:
    """The adapters a PEFT LoRA layer applies now (its active ones that hold LoRA factors)."""
    return tuple(a for a in getattr(mod, "active_adapters", ()) if a in mod.lora_A or a in getattr(mod, "lora_embedding_A", {}))


def stored_in_out(mod: Any) -> bool:
    """Whether ``mod`` is PEFT's ``target_parameters`` LoRA of a weight its module stores ``(in, out)`` (a Conv1D's:
    GPT-2's): PEFT adds s·B·A to the parameter as stored, so in ``(out, in)`` the update is s·(B·A)ᵀ."""
    base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else None
    return getattr(mod, "parameter_name", None) == "weight" and type(base).__name__ == "Conv1D"


def lora_factors(mod: Any, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B (out, r), A (r, in), scale)`` of one adapter of a PEFT LoRA layer, in the base weight's
    ``(out, in)`` orientation as stored by ``nn.Linear`` (embeddings: the stored ``(vocab, dim)``)."""
    s = float(mod.scaling[adapter])
    if adapter in mod.lora_A:
        B, A = mod.lora_B[adapter].weight.detach(), mod.lora_A[adapter].weight.detach()
        return (A.mT, B.mT, s) if stored_in_out(mod) else (B, A, s)  # a Conv1D weight's: s·B·A as stored, (in, out)
    A, B = mod.lora_embedding_A[adapter].detach(), mod.lora_embedding_B[adapter].detach()  # (r, vocab), (dim, r)
    return A.mT, B.mT, s  # (B·A)ᵀ = Aᵀ·Bᵀ


#: Why the tracker does not follow a trained weight of more than two dimensions (a MoE's experts stacked in one 3-D
#: parameter, transformers ≥ 5's ``mlp.experts.gate_up_proj``), said as ``spectra trace`` says it of a stack.
NOT_2D = ("{n}-D weight (an expert stack?): the tracker follows 2-D matrices only; spectra trace of the saved checkpoints "
          "follows experts stored one matrix each, spectra diff analyses each expert")


def untraced_lora(mod: Any, name: str, weight: Any) -> dict[str, str] | None:
    """The skipped record of a PEFT LoRA layer whose update the tracker does not follow (its base weight ``weight`` not
    2-D: a convolution's, or a ``target_parameters`` LoRA of a 3-D expert stack, whose base layer holds no ``weight``);
    ``name`` the update's stored name. None for a 2-D weight."""
    if weight is not None and getattr(weight, "ndim", 0) == 2:
        return None
    param = getattr(mod, "parameter_name", None)
    if weight is None and param:  # a ParamWrapper's: the parameter it adapts, as stored
        held = getattr(mod.get_base_layer(), param, None) if hasattr(mod, "get_base_layer") else None
        dims = getattr(held, "ndim", 0)
        return {"name": name.removesuffix(".weight") + f".{param}", "reason": NOT_2D.format(n=dims) if dims > 2 else
                "target_parameters LoRA of a parameter that is no matrix; not traced"}
    if weight is None:
        return {"name": name, "reason": "LoRA layer without a base weight; not traced"}
    return {"name": name, "reason": "convolution LoRA: not a matrix" if weight.ndim > 2 else f"{weight.ndim}-D weight: not a matrix"}


def untraced_params(model: torch.nn.Module, wrapped: bool) -> list[dict[str, str]]:
    """Skipped records of the trained floating-point parameters of more than two dimensions (a full fine-tune's 3-D
    expert stacks), which the tracker does not follow (:data:`NOT_2D`)."""
    return [{"name": stored_name(n, wrapped), "reason": NOT_2D.format(n=p.ndim)} for n, p in model.named_parameters()
            if p.ndim > 2 and p.requires_grad and p.is_floating_point()]


def renamed_at_load(model: torch.nn.Module) -> str:
    """``"'.block_sparse_moe.' → '.mlp.'"`` when transformers (≥ 5) renamed some of ``model``'s weights as it loaded them
    (its ``_weight_conversions``): the tracker names weights as the model holds them, and its checkpoints store those
    under the other names. ``""`` when nothing was renamed."""
    for m in model.modules():  # (a PEFT or DDP model holds the transformers model as a submodule)
        for c in getattr(m, "_weight_conversions", None) or ():
            if type(c).__name__ == "WeightRenaming" and (src := getattr(c, "source_patterns", None)) and (dst := getattr(c, "target_patterns", None)):
                return f"{src[0]!r} → {dst[0]!r}"
    return ""
