"""Which modules a reference LoRA run adapts: ``--targets`` presets, the names a model has, and what a preset leaves out.

The presets follow Biderman et al. (2024): ``all`` (attention and MLP), ``attn``, ``mlp``. Each names the split
projections of Llama-style models and the fused ones of the models that fuse them (Phi-3's ``qkv_proj`` and
``gate_up_proj``); a preset keeps the names the model has. What the presets do not name (an MoE's fused expert tensors,
which ``all-linear`` adapts as PEFT ``target_parameters``; a router) is said by :func:`untargeted`.
"""

from __future__ import annotations

import torch

from spectra.errors import ConfigError
from spectra.naming import in_attention, layer_of, module_path

TARGET_SETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj", "gate_up_proj"],
}
TARGET_SETS["all"] = TARGET_SETS["attn"] + TARGET_SETS["mlp"]
#: ``--targets all-linear``: PEFT's own choice of every linear layer but the output head
ALL_LINEAR = "all-linear"


def _matches(name: str, targets: list[str]) -> bool:
    """Whether module path ``name`` is one PEFT's ``target_modules`` list adapts (the name, or a path ending in it)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def adaptable_modules(model: torch.nn.Module) -> list[str]:
    """Last parts of the names of the model's modules LoRA can adapt (linear, GPT-2's Conv1D,
    embeddings), sorted: what ``--targets`` may name."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if n and (isinstance(m, kinds) or type(m).__name__ == "Conv1D")})


def check_targets(model: torch.nn.Module, targets: list[str], *, preset: str | None = None) -> list[str]:
    """The ``targets`` the model has (a name matches a module named so, or ending in ``.name``, as
    PEFT matches). A preset (``all``, ``attn``, ``mlp``) keeps the names the model has; names the
    user typed must all be there.

    Raises:
        ConfigError: a typed name matches no module, or a preset none.
    """
    names = [n for n, _ in model.named_modules() if n]
    have = [t for t in targets if any(_matches(n, [t]) for n in names)]
    known = ", ".join(adaptable_modules(model)) or "none"
    if preset is not None and not have:
        raise ConfigError(f"--targets {preset} adapts {', '.join(targets)}, none of which this model has; the modules LoRA can "
                          f"adapt in it are: {known}", hint="pass --targets with some of those names, or --targets all-linear")
    missing = [t for t in targets if t not in have]
    if preset is None and missing:
        raise ConfigError(f"--targets names modules this model does not have: {', '.join(missing)}; the modules LoRA can adapt "
                          f"in it are: {known}", hint="correct the names, or pass --targets all-linear (every linear layer but the output head)")
    return have


def check_lora_rank(model: torch.nn.Module, modules: str | list[str], rank: int, option: str = "--rank") -> None:
    """Refuse a LoRA rank above ``min(out, in)`` of every matrix it would adapt: such factors add
    parameters and no direction (and a rank like 2^63 overflowed inside PEFT with a traceback).

    Args:
        modules: :data:`ALL_LINEAR` or the module names to adapt, matched as PEFT matches them (a module
            named so, or whose path ends in ``.name``).
        option: the command-line option that gave ``rank``, for the message (``spectra sweep``'s ``--ranks``).

    Raises:
        ConfigError: ``rank`` above the largest ``min(out, in)`` among the adapted modules.
    """
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    dims = [min(m.weight.shape[-2:]) for n, m in model.named_modules()
            if (isinstance(m, kinds) or type(m).__name__ == "Conv1D") and getattr(m, "weight", None) is not None
            and m.weight.dim() == 2 and (modules == ALL_LINEAR or _matches(n, list(modules)))]
    if dims and rank > max(dims):
        raise ConfigError(f"{option} {rank} is above min(out, in) of every matrix it adapts (at most {max(dims)} here): "
                          "the factors would add parameters and no direction", hint=f"use {option} {max(dims)} or less")


def resolve_targets(model: torch.nn.Module, targets: str, names: list[str]) -> str | list[str]:
    """What ``--targets`` (``targets``, standing for the module ``names``) adapts in this model: :data:`ALL_LINEAR`, or
    the names it has (:func:`check_targets`: a preset keeps those, typed names must all be there)."""
    if targets == ALL_LINEAR:
        return ALL_LINEAR
    return check_targets(model, names, preset=targets if targets in TARGET_SETS else None)


def untargeted(model: torch.nn.Module, targets: list[str], preset: str) -> tuple[list[str], float]:
    """The weights of the layer stack a preset leaves out: their paths without the layer index (``mlp.experts.gate_up_proj``,
    ``mlp.gate``), sorted, and their share of the stack's matrix entries. Weights of two or more dimensions count
    (norms and biases do not), within the attention blocks for ``attn``, outside them for ``mlp``, everywhere for ``all``.

    >>> m = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.ModuleDict({
    ...     "q_proj": torch.nn.Linear(4, 4), "router": torch.nn.Linear(4, 12)})])})
    >>> untargeted(m, ["q_proj"], "all")
    (['router'], 0.75)
    """
    left: dict[str, int] = {}
    total = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or layer_of(name) is None:
            continue
        module = name.rpartition(".")[0]
        in_attn = in_attention(name)
        if (preset == "attn" and not in_attn) or (preset == "mlp" and in_attn):
            continue
        total += p.numel()
        if not _matches(module, targets):  # one entry for every layer's and expert's copy
            short = module_path(name)
            left[short] = left.get(short, 0) + p.numel()
    return sorted(left), (sum(left.values()) / total if total else 0.0)


def untargeted_text(run_config: dict) -> str | None:
    """The warning for a run whose preset left weights out (``train_config.json``'s ``not_adapted``), None when none."""
    left = run_config.get("not_adapted")
    if not isinstance(left, dict) or not left.get("weights"):
        return None
    names, adapted, share = left["weights"], run_config.get("target_modules") or [], left.get("share") or 0
    # (a file edited by hand: these fields as spectra train writes them, or no warning from it)
    if not (isinstance(names, list) and isinstance(adapted, list) and all(isinstance(x, str) for x in names + adapted)
            and isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share <= 1):
        raise ValueError(f"train_config.json's not_adapted is not as spectra train writes it (share {share!r})")
    return (f"--targets {run_config.get('targets')} adapted {', '.join(adapted)}; the model's "
            f"{', '.join(names[:4])}{' …' if len(names) > 4 else ''} ({float(share):.0%} of its layers' matrix "
            "entries) were not adapted: --targets all-linear adapts every linear layer and, through PEFT's target_parameters, "
            "an MoE's fused experts; or name the modules")


__all__ = ["ALL_LINEAR", "TARGET_SETS", "adaptable_modules", "check_lora_rank", "check_targets", "resolve_targets", "untargeted",
           "untargeted_text"]
