"""The task heads PEFT stores whole, never as a LoRA (``spectra extract``, ``spectra recommend``).

PEFT 0.21's ``PeftModelForSequenceClassification`` and ``…ForTokenClassification`` (``task_type`` SEQ_CLS,
TOKEN_CLS) add ``classifier`` and ``score`` to ``modules_to_save``, ``PeftModelForQuestionAnswering`` (QUESTION_ANS)
``qa_outputs``. Every module whose path ends with one of those names (a plain string suffix, as
``peft.utils.other._set_trainable`` matches: DistilBERT's ``pre_classifier`` too) is then wrapped whole, and loaded
from the adapter's file, which must hold its tensors (``KeyError: 'base_model.model.classifier.weight'`` otherwise);
a LoRA on a module inside one is never applied (PEFT guards its target matching against them). So such an adapter
carries the tuned head whole, changed or not, and spends no LoRA rank on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from spectra.delta import fro_blocks
from spectra.extract_results import HEAD_KIND
from spectra.io.checkpoint import FLOAT_DTYPES, Checkpoint
from spectra.io.peft_writer import task_type_for
from spectra.metrics import relative_norm

#: PEFT task type -> the module names its PeftModel subclass adds to ``modules_to_save``.
HEAD_NAMES: dict[str, tuple[str, ...]] = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                                          "QUESTION_ANS": ("qa_outputs",)}


def head_task_type(*configs: Mapping[str, Any] | None, adapter_task: object = None) -> str | None:
    """The first of ``adapter_task`` (an adapter's own ``task_type``) and the task types of ``configs``' architectures
    (:func:`spectra.io.peft_writer.task_type_for`) whose PEFT class stores a task head whole (:data:`HEAD_NAMES`), or
    None. The tuned model's config counts: a classifier fine-tuned from a pretrained LM has a base that says
    ``BertForMaskedLM`` or ``LlamaForCausalLM``, and a head only in the tuned checkpoint.

    >>> head_task_type({"architectures": ["BertForSequenceClassification"]}, {"architectures": ["BertForMaskedLM"]})
    'SEQ_CLS'
    """
    found = [adapter_task, *(task_type_for(c) for c in configs)]
    return next((t for t in found if isinstance(t, str) and t in HEAD_NAMES), None)


def named_class(*configs: Mapping[str, Any] | None) -> str | None:
    """The class the first of ``configs`` names first in ``architectures``, or None when none names one."""
    for c in configs:
        archs = (c or {}).get("architectures")
        if isinstance(archs, list) and archs and isinstance(archs[0], str):
            return archs[0]
    return None


def auto_task_type(tuned: Mapping[str, Any] | None, base: Mapping[str, Any] | None, adapter_task: object = None) -> str | None:
    """The PEFT ``task_type`` that ``extract`` and ``recommend`` write for ``--task-type auto``: a task head's type
    (:func:`head_task_type`: the adapter's own, then the tuned model's, then the base's config), else the adapter's own
    ``task_type``, else that of the class the base's (or else the tuned model's) config names
    (:func:`spectra.io.peft_writer.task_type_for`); None when that class has no PEFT task class or no config names one.

    >>> auto_task_type({"architectures": ["BertForSequenceClassification"]}, {"architectures": ["BertForMaskedLM"]})
    'SEQ_CLS'
    >>> auto_task_type(None, {"architectures": ["LlamaForCausalLM"]}), auto_task_type(None, None, "CAUSAL_LM")
    ('CAUSAL_LM', 'CAUSAL_LM')
    """
    if (head := head_task_type(tuned, base, adapter_task=adapter_task)) is not None:
        return head
    if isinstance(adapter_task, str):
        return adapter_task
    named = base if named_class(base) is not None else tuned if named_class(tuned) is not None else None
    return task_type_for(named) if named is not None else None


def head_reason(task_type: str) -> str:
    """Why a head is in ``not_lora``, in ``extract.json``'s words."""
    return f"kept whole: PEFT's {task_type} adapters store the task head (modules_to_save), whatever changed in it"


def head_modules(task_type: str | None, names: Iterable[str]) -> list[str]:
    """The outermost module paths PEFT stores whole under ``task_type``, among the modules that hold the tensors
    ``names`` (``classifier.out_proj.weight`` holds ``classifier.out_proj`` and ``classifier``), sorted.

    >>> head_modules("SEQ_CLS", ["bert.pooler.dense.weight", "classifier.weight", "classifier.bias"])
    ['classifier']
    >>> head_modules("SEQ_CLS", ["classifier.dense.weight", "classifier.out_proj.weight"]), head_modules("CAUSAL_LM", ["score.weight"])
    (['classifier'], [])
    """
    ends = HEAD_NAMES.get(task_type or "", ())
    if not ends:
        return []
    tree = {".".join(parts[:i]) for n in names for parts in [n.split(".")] for i in range(1, len(parts))}
    hits = {m for m in tree if m.endswith(ends)}
    return sorted(m for m in hits if not any(m.startswith(h + ".") for h in hits))


def head_of(name: str, heads: Iterable[str]) -> str | None:
    """The head module holding the tensor or module ``name``, or None."""
    return next((h for h in heads if name == h or name.startswith(h + ".")), None)


def _record(name: str, tensor: torch.Tensor, base: Checkpoint, base_name: str | None, module: str,
            task_type: str, saved: str) -> dict[str, Any]:
    """One head tensor's ``not_lora`` record, its tensor under ``"tensors"`` (``saved``: its name in the base model)."""
    fro = bf = None
    if base_name is not None and tuple(base.tensors[base_name].shape) == tuple(tensor.shape):
        fro, bf = fro_blocks(base.load(base_name), tensor)
    return {"name": name, "kind": HEAD_KIND, "shape": list(tensor.shape), "fro_norm": fro,
            "rel_norm": None if fro is None or bf is None else relative_norm(fro, bf),
            "module": module, "held": "modules_to_save", "reason": head_reason(task_type), "tensors": {saved: tensor}}


def head_records(task_type: str, heads: list[str], base: Checkpoint, tuned: Checkpoint | None, *, prefix: str = "",
                 base_prefix: str = "", adapter: Any = None) -> list[dict[str, Any]]:
    """The ``not_lora`` records of every floating-point tensor of the ``heads``, each with the tuned model's tensor:
    a full tuned checkpoint's own (less its wrapper ``prefix``), else the base's (a head the tuned side does not
    store). For an ``adapter`` (:class:`spectra.io.adapter.Adapter`) resized: its ``modules_to_save`` copy, else the
    base's tensor plus the update its LoRA on that module makes (``s·B·A``, DoRA's own), else the base's."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    base_names = {n.removeprefix(base_prefix): n for n in base.tensors}
    if tuned is not None:
        for tn, info in tuned.tensors.items():
            saved = tn.removeprefix(prefix)
            if (h := head_of(saved, heads)) and info.dtype in FLOAT_DTYPES:
                seen.add(saved)
                out.append(_record(tn, tuned.load(tn), base, base_names.get(saved), h, task_type, saved))
    lora = {m.weight_name: m for m in (adapter.modules.values() if adapter is not None else ())}
    full = dict(adapter.full) if adapter is not None else {}
    for saved in sorted({*base_names, *full} - seen):
        h = head_of(saved, heads)
        bn = base_names.get(saved)
        if not h or (bn is not None and base.tensors[bn].dtype not in FLOAT_DTYPES):
            continue
        if saved in full:
            tensor = full[saved]
        elif saved in lora and bn is not None:
            W = base.load(bn).double()
            mod = lora[saved]
            delta = mod.dora_delta(W.float()).double() if mod.magnitude is not None else mod.dense_delta()
            tensor = (W + (delta if delta.shape == W.shape else delta.mT)).to(W.dtype)
        elif bn is not None:
            tensor = base.load(bn)
        else:
            continue
        out.append(_record(saved, tensor, base, bn, h, task_type, saved))
    return out


__all__ = ["HEAD_KIND", "HEAD_NAMES", "auto_task_type", "head_modules", "head_of", "head_reason", "head_records", "head_task_type",
           "named_class"]
