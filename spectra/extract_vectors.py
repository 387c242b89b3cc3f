"""What a LoRA cannot hold, in a ``spectra extract`` run: the norms and biases a fine-tune changed (LayerNorm tuning,
BitFit) and an adapter's whole saved modules, each recorded in ``not_lora`` and, with ``--save-modules``, kept where
PEFT can keep it (``lora_B.bias``, ``modules_to_save``)."""

from __future__ import annotations

from typing import Any

import torch

from spectra.adapter_diff import SAVED_TOKENS, saved_kind_reason
from spectra.delta import fro_blocks
from spectra.extract_plan import Target
from spectra.extract_results import ONE_D_KINDS, TOKENS_NOT_HELD, rel_or_none
from spectra.io.checkpoint import Checkpoint
from spectra.naming import is_bias, pairing_key, unique_pairing_keys

#: The prefix PEFT puts before the model's own names in an adapter file.
_PEFT_PREFIX = "base_model.model."
#: The reason :mod:`spectra.io.adapter` gives a ``lora_B.bias`` (``lora_bias=True``), which this module accounts for.
LORA_BIAS_REASON = "LoRA bias (lora_bias=True)"


def one_d_changes(base: Checkpoint, tuned: Checkpoint | None, pairs: list[tuple[str, str]], adapted: list[Target],
                  adapter: Any, save_modules: bool, base_prefix: str = "") -> list[dict[str, Any]]:
    """Changed 1-D tensors (norms, biases) and, for an adapter, its ``modules_to_save`` and trained biases: what LoRA
    cannot hold. With ``save_modules`` each is kept where PEFT can: the bias of an adapted module as
    ``lora_B.bias`` (PEFT's ``lora_bias`` is one flag for every adapted module, so only when each
    has a bias, or the input adapter was trained with ``lora_bias``, and none is an embedding), a module holding only
    1-D tensors as ``modules_to_save``.
    Records carry the tensors to write under ``"delta"``/``"tensors"`` (dropped from ``extract.json``).
    """
    targets = {t.module: t for t in adapted}
    # an adapter trained with lora_bias keeps it (PEFT runs it on modules without a bias; merging them is what fails,
    # for the input adapter as for the one written)
    biased = bool(adapted) and not any(t.embedding for t in adapted) and (all(
        t.base_name is not None and t.base_name.removesuffix(".weight") + ".bias" in base.tensors for t in adapted)
        or (adapter is not None and bool(adapter.config.lora_bias)))
    if adapter is not None:
        return _adapter_changes(base, adapter, targets, biased, save_modules)
    out = []
    for tn, bn in pairs:
        t, b = tuned.load(tn), base.load(bn)
        if t.shape != b.shape or torch.equal(t, b):
            continue
        fro, bf = fro_blocks(b, t)
        # the module as the base names it (what the adapter targets), found in the tuned checkpoint by its own name
        # (less a wrapper prefix of the base names that the modules drop: extract._open_source)
        tuned_owner, owner = tn.rpartition(".")[0], bn.rpartition(".")[0].removeprefix(base_prefix)
        rec = {"name": tn, "kind": ONE_D_KINDS[0] if is_bias(tn) else ONE_D_KINDS[1], "shape": list(t.shape), "fro_norm": fro,
               "rel_norm": rel_or_none(fro, bf), "module": owner, "held": None, "reason": ""}
        inside, only_1d = _module_tensors(tuned, tuned_owner)
        if owner in targets:
            _as_lora_bias(rec, t.double() - b.double(), biased, save_modules)
        elif not only_1d:
            rec["reason"] = HOLDS_MATRIX
        elif save_modules:
            rec.update(held="modules_to_save", reason="kept whole as PEFT modules_to_save",
                       tensors={owner + c[len(tuned_owner):]: tuned.load(c) for c in inside})
        else:
            rec["reason"] = "pass --save-modules to keep it as PEFT modules_to_save"
        out.append(rec)
    return out


#: Why a changed 1-D tensor of a module that also holds a matrix is not kept (as PEFT ``modules_to_save``).
HOLDS_MATRIX = "its module also holds a matrix; saving the module whole (modules_to_save) would store that matrix"


def _as_lora_bias(rec: dict[str, Any], delta: torch.Tensor, biased: bool, save_modules: bool) -> None:
    """Fill ``rec`` (the ``not_lora`` record of an adapted module's bias) with how its change ``delta`` (Δb, float64)
    is held: as ``lora_B.bias`` with ``save_modules`` where PEFT's one ``lora_bias`` flag can hold it, else why not."""
    if not biased:
        rec["reason"] = ("bias of an adapted module: PEFT merges a lora_bias only into modules that have a bias (not every "
                         "adapted module has one, or one is an embedding); not held")
    elif save_modules:
        rec.update(held="lora_bias", reason="kept as lora_B.bias", delta=delta.float())
    else:
        rec["reason"] = "bias of an adapted module: pass --save-modules to keep it as lora_B.bias"


def _bias_record(name: str, module: str, delta: torch.Tensor, base_bias: torch.Tensor | None, targets: dict[str, Target],
                 biased: bool, save_modules: bool) -> dict[str, Any]:
    """The ``not_lora`` record of a trained bias ``delta`` (Δb, float64) of ``module``, kept as ``lora_B.bias`` where it can be."""
    fro = float(torch.linalg.vector_norm(delta))
    bf = float(torch.linalg.vector_norm(base_bias.double())) if base_bias is not None else None
    rec = {"name": name, "kind": ONE_D_KINDS[0], "shape": list(delta.shape), "fro_norm": fro, "rel_norm": rel_or_none(fro, bf),
           "module": module, "held": None, "reason": ""}
    if module in targets:
        _as_lora_bias(rec, delta, biased, save_modules)
    else:
        rec["reason"] = "bias of a module not extracted (no component of its weight update kept); not held"
    return rec


def _other_bias(base: Checkpoint, adapter: Any, name: str, bn: str, rec: dict[str, Any], save_modules: bool) -> dict[str, Any]:
    """``rec`` completed for a bias ``bias="all"`` trained on a module no LoRA adapts (``name`` in the adapter, ``bn`` in
    the base): kept whole as ``modules_to_save`` with ``save_modules`` where the module holds only 1-D tensors (a norm:
    its weight from the adapter where saved, else the base's), else why not (a linear layer's matrix would be stored)."""
    module, base_module = name.rpartition(".")[0], bn.rpartition(".")[0]
    inside, only_1d = _module_tensors(base, base_module)
    if not only_1d:
        return {**rec, "reason": HOLDS_MATRIX}
    if not save_modules:
        return {**rec, "reason": "pass --save-modules to keep it as PEFT modules_to_save"}
    named = {module + n[len(base_module):]: n for n in inside}
    return {**rec, "held": "modules_to_save", "reason": "kept whole as PEFT modules_to_save",
            "tensors": {m: adapter.full[m] if m in adapter.full else base.load(n) for m, n in named.items()}}


def _module_tensors(ckpt: Checkpoint, module: str) -> tuple[list[str], bool]:
    """Every tensor of ``module`` in ``ckpt`` (its submodules' too), and whether all are 1-D: a module PEFT can keep
    whole as ``modules_to_save`` without storing a matrix (a norm)."""
    inside = [n for n in ckpt.tensors if n.startswith(module + ".")]
    return inside, all(len(ckpt.tensors[n].shape) == 1 for n in inside)


def _base_tensor(base: Checkpoint, name: str) -> str | None:
    """``name`` as the base stores it: itself, or the one base tensor of its pairing key (a wrapper prefix the adapter's
    names drop: ``model.`` of a bare base model); None when the base has none."""
    if name in base.tensors:
        return name
    return unique_pairing_keys(list(base.tensors)).get(pairing_key(name))


def _adapter_changes(base: Checkpoint, adapter: Any, targets: dict[str, Target], biased: bool,
                     save_modules: bool) -> list[dict[str, Any]]:
    """:func:`one_d_changes` of an adapter: its ``modules_to_save`` (those that differ from the base), the biases of
    its adapted modules it trained (``bias="lora_only"``/``"all"``: saved as ``base_layer.bias``; ``lora_bias=True``:
    ``scale·lora_B.bias``, summed per module), and the biases of other modules ``bias="all"`` trained."""
    out: list[dict[str, Any]] = []
    copies: dict[str, str] = {}  # module -> its trained bias as saved (base_layer.bias)
    loras: dict[str, str] = {}  # module -> its lora_B.bias (added, times the module's scale, to the bias)
    for name in adapter.base_copies:
        if name.endswith(".base_layer.bias"):
            copies[name.removeprefix(_PEFT_PREFIX).removesuffix(".base_layer.bias")] = name
    for s in adapter.skipped if adapter.config.lora_bias else ():  # (without the flag PEFT does not load them)
        module = s.name.removeprefix(_PEFT_PREFIX).partition(".lora_B")[0]
        if s.reason.startswith(LORA_BIAS_REASON) and module in adapter.modules:
            loras[module] = s.name
    for module in dict.fromkeys([*copies, *loras]):
        t = targets.get(module)
        weight = t.base_name if t is not None and t.base_name else adapter.modules[module].weight_name \
            if module in adapter.modules else f"{module}.weight"
        bn = _base_tensor(base, weight.removesuffix(".weight") + ".bias")
        base_bias = base.load(bn) if bn is not None else None
        before = base_bias.double() if base_bias is not None else None
        delta = adapter.weights.load(copies[module]).double() - (before if before is not None else 0.0) \
            if module in copies else torch.zeros_like(before) if before is not None else None
        if module in loras:
            lora = adapter.weights.load(loras[module]).double() * adapter.modules[module].scale
            delta = lora if delta is None else delta + lora
        if delta is not None and float(torch.linalg.vector_norm(delta)) > 0:
            out.append(_bias_record(copies.get(module, loras.get(module, "")), module, delta, base_bias, targets, biased,
                                    save_modules))
    for name, tensor in adapter.full.items():
        bn = _base_tensor(base, name)
        in_base = bn is not None and tuple(base.tensors[bn].shape) == tuple(tensor.shape)
        fro = fro_blocks(base.load(bn), tensor)[0] if in_base else None
        if fro == 0.0:  # saved whole but unchanged: nothing of the update is in it (written, it costs its size)
            continue
        module = name.rpartition(".")[0]
        bf = float(torch.linalg.vector_norm(base.load(bn).double()).item()) if bn is not None else None
        if is_bias(name) and tensor.ndim == 1 and f"{module}.weight" not in adapter.full and in_base:
            if module in targets:  # an adapted module's bias trained under bias="all"
                out.append(_bias_record(name, module, tensor.double() - base.load(bn).double(), base.load(bn), targets,
                                        biased, save_modules))
            else:  # bias="all": the bias of a module no LoRA adapts (a linear layer's, or a norm's)
                out.append(_other_bias(base, adapter, name, bn, {"name": name, "kind": ONE_D_KINDS[0], "shape": list(tensor.shape),
                                       "fro_norm": fro, "rel_norm": rel_or_none(fro, bf), "module": module, "held": None}, save_modules))
            continue
        rec = {"name": name, "kind": "modules_to_save of the adapter", "shape": list(tensor.shape), "fro_norm": fro,
               "rel_norm": rel_or_none(fro, bf), "module": module, "held": None,
               "reason": "stored whole by the tuned adapter: pass --save-modules to keep it"}
        if saved_kind_reason(name) == SAVED_TOKENS:  # PEFT's own tensor: no modules_to_save entry loads it
            rec["reason"] = TOKENS_NOT_HELD
        elif save_modules:
            rec.update(held="modules_to_save", reason="kept whole as PEFT modules_to_save", tensors={name: tensor})
        out.append(rec)
    return out


__all__ = ["LORA_BIAS_REASON", "one_d_changes"]
