"""LoRA factors PEFT saves for a parameter rather than a module (``target_parameters``, PEFT >= 0.17).

PEFT wraps a module's ``nn.Parameter`` — typically a 3-D expert stack such as ``mlp.experts.gate_up_proj``
``(experts, out, in)`` — in a ``ParamWrapper`` whose ``lora_A`` is ``(r·E, in)`` and ``lora_B`` ``(out, r·E)``
for ``E`` experts. Expert ``e``'s update is ``s · B_e · A_e`` with ``A_e = A[e·r:(e+1)·r]`` and ``B_e = B[:, e::E]``:
PEFT reshapes A to ``(E, r, in)`` but B to ``(out, r, E)``, so B's columns interleave the experts
(``peft.tuners.lora.layer.ParamWrapper``). PEFT's "out" and "in" are the stored matrix's rows and columns (its
transpose's where the experts module says ``is_transposed``), whatever order the model computes in.

Several parameters of one module nest wrappers: the saved keys of the parameter wrapped first carry one
``base_layer.`` more per parameter wrapped after it (``experts.base_layer.lora_A`` and ``experts.lora_A``).
PEFT wraps them in the module's registration order, which the adapter does not record, so which
parameter a key holds is decided from the base model's shapes (:mod:`spectra.param_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from spectra.errors import CheckpointFormatError
from spectra.io.checkpoint import Checkpoint

_BASE_LAYER = ".base_layer"


@dataclass(frozen=True)
class ParamLora:
    """The LoRA factors of one wrapped parameter, as stored.

    Attributes:
        module: the wrapped module's path without PEFT's prefix and ``base_layer`` components
            (``model.layers.0.mlp.experts``).
        depth: how many ``base_layer.`` components its keys carry (0: the parameter wrapped last).
        A: ``lora_A`` ``(r·E, in)``, float32 (float64 when stored so).
        B: ``lora_B`` ``(out, r·E)``, same dtype.
        params: the parameter names of ``target_parameters`` that PEFT could have matched on ``module``
            (``gate_up_proj``, ``down_proj``), in the config's order.
        stored: the stored names of A and B, for messages.
    """

    module: str
    depth: int
    A: torch.Tensor
    B: torch.Tensor
    params: tuple[str, ...]
    stored: tuple[str, str]

    def expert_factors(self, e: int, experts: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B_e, A_e)`` of expert ``e`` of ``experts`` at rank ``r``: B_e ``(out, r)``, A_e ``(r, in)``
        (contiguous copies), with expert ``e``'s update ``s · B_e · A_e`` in PEFT's orientation (module docstring)."""
        return self.B[:, e::experts].contiguous(), self.A[e * r:(e + 1) * r].contiguous()


def unwrapped(module: str) -> tuple[str, int]:
    """``module`` without its trailing ``base_layer`` components, and how many there were.

    >>> unwrapped("model.layers.0.mlp.experts.base_layer")
    ('model.layers.0.mlp.experts', 1)
    """
    depth = 0
    while module.endswith(_BASE_LAYER):
        module, depth = module[: -len(_BASE_LAYER)], depth + 1
    return module, depth


def matching_params(module: str, target_parameters: tuple[str, ...] | None) -> tuple[str, ...]:
    """The parameter names of ``target_parameters`` that PEFT matches on ``module`` (an unwrapped path): an
    entry ``x.y.p`` matches when ``module.p`` is the entry or ends with ``.`` + the entry
    (``peft.tuners.tuners_utils.BaseTuner._inject_parameters``).

    >>> matching_params("model.layers.0.mlp.experts", ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "q_proj.weight"))
    ('gate_up_proj', 'down_proj')
    """
    out: list[str] = []
    for entry in target_parameters or ():
        param = entry.rpartition(".")[2]
        key = f"{module}.{param}"
        # (a Linear named down_proj holds weight and bias, never a parameter down_proj: PEFT matches the module's own)
        if (key == entry or key.endswith("." + entry)) and param not in out and param != module.rpartition(".")[2]:
            out.append(param)
    return tuple(out)


def factor_float(t: torch.Tensor) -> torch.Tensor:
    """A stored factor in float32, or float64 when stored so (a float64 adapter rounded to float32 lost
    ~1e-8 of its update's norm: its numbers no longer matched its own merge)."""
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def weight_param(module: str, target_parameters: tuple[str, ...] | None) -> bool:
    """Whether ``module``'s LoRA is PEFT's on its ``weight`` as a parameter (a router's ``gate.weight``): a module LoRA,
    s·B·A, whose ``rank_pattern``/``alpha_pattern`` PEFT matches on ``module.weight``, not on the module."""
    return matching_params(module, target_parameters) == ("weight",)


def check_chain(A: torch.Tensor, B: torch.Tensor, module: str, weights: Path) -> None:
    """Refuse factors that are not ``A (r, in)``, ``B (out, r)`` of one ``r``."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise CheckpointFormatError(f"LoRA factors of {module} do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}",
                                    path=weights, tensor=module)


class _Targets(Protocol):
    """What :func:`param_lora` reads of an adapter's config (:class:`spectra.io.adapter.AdapterConfig`)."""

    target_modules: str | tuple[str, ...] | None
    target_parameters: tuple[str, ...] | None

    def untargeted(self, module: str, *, module_loras: bool = False) -> str | None: ...


def param_lora(ckpt: Checkpoint, config: _Targets, module: str, kinds: dict[str, str], weights: Path) -> ParamLora | None:
    """The factors of a parameter PEFT wrapped (``target_parameters``: :mod:`spectra.io.param_lora`), or None for a
    module's own LoRA (and for a Linear's ``weight`` targeted as a parameter, :func:`weight_param`: its update is s·B·A)."""
    unwrapped_module, depth = unwrapped(module)
    params = matching_params(unwrapped_module, config.target_parameters)
    if not params or (params == ("weight",) and depth == 0):
        return None
    tm = config.target_modules
    # a bare entry ("gate_up_proj") ends every module's path, but PEFT wraps only parameters a module holds: a Linear
    # that target_modules names is adapted as a module (its keys never nest base_layer). "all-linear" (which PEFT
    # saves expanded) would name the experts module too by this test, which cannot tell a Linear by its name
    all_linear = isinstance(tm, str) and tm.lower() == "all-linear"
    if depth == 0 and tm is not None and not all_linear and config.untargeted(unwrapped_module, module_loras=True) is None:
        return None
    if set(kinds) != {"lora_A", "lora_B"}:
        raise CheckpointFormatError(f"the target_parameters LoRA of {unwrapped_module} holds {', '.join(sorted(kinds))}; "
                                    "PEFT saves lora_A and lora_B only", path=weights, tensor=module, hint="the adapter file is incomplete")
    A, B = factor_float(ckpt.load(kinds["lora_A"])), factor_float(ckpt.load(kinds["lora_B"]))
    check_chain(A, B, module, weights)
    return ParamLora(unwrapped_module, depth, A, B, params, (kinds["lora_A"], kinds["lora_B"]))


__all__ = ["ParamLora", "check_chain", "factor_float", "matching_params", "param_lora", "unwrapped", "weight_param"]
