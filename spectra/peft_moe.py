"""Which LoRA modules of a mixture-of-experts model PEFT actually applies when it loads an adapter
into a transformers ≥ 5 model.

transformers ≥ 5 fuses the per-expert ``nn.Linear`` weights some MoE checkpoints store
(``experts.N.gate_proj``…) into 3-D stacks on load. An adapter written for the per-expert modules
then loads only if PEFT converts it, which PEFT does for two families of model types (the Mixtral
pattern and the Qwen2-MoE pattern of transformers' ``conversion_mapping``; ``qwen2_moe`` itself from
PEFT 0.22) and only when every expert has the adapter's global ``r``. Silent losses follow, each
checked against PEFT's own loading (``PeftModel.from_pretrained`` then ``merge_and_unload``):

- a model type whose experts transformers fuses but PEFT does not convert (``phimoe``, ``jamba``…;
  ``qwen2_moe`` before PEFT 0.22): the per-expert LoRA weights are dropped on load;
- PEFT < 0.22 on a model type it converts: every target whose name ends in one of the expert
  projections' names (``gate_proj``, ``up_proj``, ``down_proj`` for the Qwen2-MoE pattern) is
  retargeted to the fused expert parameters, so a LoRA on a dense MLP (DeepSeek-V3's first layers)
  or a shared expert of those names is dropped too. PEFT 0.22 keeps a target whose modules are all
  ``nn.Linear`` (its #3711);
- PEFT 0.22 renames a converted target in place (``…experts.0.gate_proj`` becomes the parameter
  ``…experts.0.gate_up_proj``, which does not exist), so an adapter must name its experts by the
  projection's name alone or as ``…experts.gate_proj`` (:func:`spectra.io.peft_writer.target_modules`).

The rules are read from the installed transformers and PEFT when they are there (the layouts
change between releases), else from the tables below (transformers 5.24, PEFT 0.22).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

from spectra.peft_releases import CONVERTED_SINCE, KEEPS_LINEAR_TARGETS, release

#: PEFT's target-name conversions, by pattern: an expert projection's old name -> the fused name.
#: The router (``gate``) maps to its own weight and is not a loss.
_PEFT_MOE_TARGETS: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
#: PEFT's own additions to transformers' conversion patterns (PEFT 0.22: Mixtral's and Qwen2-MoE's).
_PEFT_PATTERNS: dict[str, str] = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}
#: Model types whose experts transformers 5.24 fuses on load, and PEFT 0.22's pattern for each
#: (None: PEFT does not convert them).
_FUSED: dict[str, str | None] = {
    **dict.fromkeys(("mixtral", "minimax", "minimax_m2"), "mixtral"),
    **dict.fromkeys((
        "afmoe", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
        "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa", "hunyuan_v1_moe",
        "longcat_flash", "mellum", "olmoe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_text",
        "qwen3_omni_moe_thinker", "sarvam_mla", "solar_open", "qwen2_moe"), "qwen2_moe"),
    **dict.fromkeys((
        "phimoe", "jamba", "lfm2_moe", "kimi_linear", "nemotron_h", "ernie4_5_vl_moe", "deepseek_v4",
        "qwen3_5_moe_text", "sarvam_moe", "mimo_v2_flash", "bailing_hybrid"), None),
}


@dataclass(frozen=True)
class PeftMoeRules:
    """What PEFT drops of a LoRA adapter on a model of one type (see the module docstring).

    Attributes:
        model_type: ``config.json``'s ``model_type``, or None when unknown.
        experts_dropped: per-expert 2-D LoRA modules are dropped on load.
        retargeted: last name components PEFT (< 0.22) retargets to the fused experts: a non-expert module
            with one of these names is dropped on load.
        fused: those of :attr:`converted` that PEFT fuses into one parameter (Mixtral's ``w1`` and ``w3``
            into ``gate_up_proj``), whose LoRA it builds at rank ``r`` times their number over their stacked
            outputs (a block-diagonal B: ``2r·(in + out_w1 + out_w3)`` parameters per expert for two).
        source: where the rules came from (``"transformers 5.24.0, peft 0.22.0"`` or the tables).
        refused: last name components PEFT refuses as LoRA targets on this model type (:data:`PEFT_REFUSED_LEAVES`).
        converted: last name components of the per-expert modules PEFT converts to its LoRA on the fused experts
            (at the global ``r``; named by that component or ``…experts.<name>``, never with the expert's index).
        renames: ``(on disk, loaded)`` name parts transformers renames where it fuses the experts (Mixtral's
            ``.block_sparse_moe.`` -> ``.mlp.``): a target naming the experts' container names it as loaded.
    """

    model_type: str | None
    experts_dropped: bool = False
    retargeted: frozenset[str] = frozenset()
    source: str = ""
    fused: frozenset[str] = frozenset()
    refused: frozenset[str] = frozenset()
    converted: frozenset[str] = frozenset()
    renames: tuple[tuple[str, str], ...] = ()

    def expert_target(self, module: str) -> str:
        """How ``target_modules`` names ``module`` in full: its path, or for a per-expert module PEFT converts
        (:attr:`converted`), its experts container's path as transformers loads it and the module's name. PEFT 0.22
        renames a converted target in place, so ``…experts.0.gate_proj`` would become a parameter
        ``…experts.0.gate_up_proj`` that does not exist, and its LoRA be dropped (PEFT < 0.22 keeps the last name only).

        >>> PeftMoeRules("mixtral", converted=frozenset({"w1"}), renames=((".block_sparse_moe.", ".mlp."),)).expert_target(
        ...     "model.layers.1.block_sparse_moe.experts.7.w1")
        'model.layers.1.mlp.experts.w1'
        """
        if (split := self.converted_expert(module)) is None:
            return module
        container = "." + split[0] + "."
        for on_disk, loaded in self.renames:
            container = container.replace(on_disk, loaded)
        return container[1:] + split[1]

    def before_0_22(self) -> PeftMoeRules:
        """These rules as PEFT before 0.22 applies them (the same where they are that release's): the modules named
        like the experts it converts are retargeted, and the experts of a model type converted only since are dropped."""
        if self.retargeted or not self.converted:
            return self
        return replace(self, retargeted=self.converted, experts_dropped=(self.model_type or "") in CONVERTED_SINCE,
                       source=f"{self.source}, as PEFT before 0.22 applies them")

    def converted_expert(self, module: str) -> tuple[str, str] | None:
        """``(experts container, name)`` of a per-expert module PEFT converts (``…experts.<N>.<name>``, the name in
        :attr:`converted`), as stored; None for any other module.

        >>> PeftMoeRules("olmoe", converted=frozenset({"up_proj"})).converted_expert("m.layers.0.mlp.experts.3.up_proj")
        ('m.layers.0.mlp.experts', 'up_proj')
        """
        parts = module.split(".")
        if len(parts) < 3 or parts[-1] not in self.converted or not parts[-2].isdigit() or parts[-3] != "experts":
            return None
        return ".".join(parts[:-2]), parts[-1]

    def why_dropped(self, module: str, expert: int | None) -> str | None:
        """Why PEFT would drop (or refuse: :attr:`refused`) a LoRA on ``module`` (a module path; ``expert``: its expert
        index, None outside the experts), or None when it applies it."""
        if (leaf := module.rpartition(".")[2]) in self.refused:
            return (f"PEFT refuses a LoRA on any module named {leaf} of a {self.model_type} model (Mamba-based): "
                    "an adapter or LoraConfig naming it fails to load")
        if expert is not None and self.experts_dropped:
            return (f"per-expert LoRA: transformers >= 5 fuses the experts of a {self.model_type} model on load and PEFT "
                    f"does not convert per-expert adapters for it, so it would drop this module ({self.source})")
        if expert is None and module.rpartition(".")[2] in self.retargeted:
            return (f"PEFT retargets every {module.rpartition('.')[2]} of a {self.model_type} model to the fused experts "
                    f"on load, so a LoRA on this non-expert module would be dropped ({self.source})")
        return None


#: Model types on which PEFT refuses a LoRA on modules of these names (PEFT 0.21's ``_check_lora_target_modules_mamba``,
#: whose table is local to that function: a Mamba mixer's ``out_proj`` and ``conv1d``; any module of the name counts).
PEFT_REFUSED_LEAVES: dict[str, frozenset[str]] = dict.fromkeys(
    ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"), frozenset({"out_proj", "conv1d"}))


def peft_moe_rules(model_type: str | None) -> PeftMoeRules:
    """The :class:`PeftMoeRules` of a model type, from the installed transformers and PEFT when they
    are installed (transformers < 5 fuses nothing: no rule), else from this module's tables; with the
    module names PEFT refuses on it (:data:`PEFT_REFUSED_LEAVES`)."""
    return replace(_moe_rules(model_type), refused=PEFT_REFUSED_LEAVES.get(model_type or "", frozenset()))


def peft_rules(model_type: str | None, moe: bool) -> PeftMoeRules | None:
    """What PEFT drops or refuses on a model: :func:`peft_moe_rules` for one with experts (``moe``), only the refused
    names of a model type in :data:`PEFT_REFUSED_LEAVES` otherwise (no transformers import), None for any other."""
    if moe:
        return peft_moe_rules(model_type)
    refused = PEFT_REFUSED_LEAVES.get(model_type or "")
    return PeftMoeRules(model_type, refused=refused) if refused else None


def _moe_rules(model_type: str | None) -> PeftMoeRules:
    if not model_type:
        return PeftMoeRules(None)
    if importlib.util.find_spec("transformers") is None:  # rules for where the adapter will likely be loaded
        return _from_tables(model_type, "transformers is not installed here")
    import transformers
    try:
        from transformers import conversion_mapping
    except ImportError:  # transformers < 5 keeps per-expert modules: PEFT applies every LoRA module
        return PeftMoeRules(model_type, source=f"transformers {transformers.__version__}")
    fused, fallback = _fuses_experts(conversion_mapping, model_type)
    patterns = dict(getattr(conversion_mapping, "_MODEL_TO_CONVERSION_PATTERN", {}))
    targets = _PEFT_MOE_TARGETS
    version = f"transformers {transformers.__version__}" + (f" ({fallback})" if fallback else "")
    keeps_linear = True  # PEFT not installed: the rules of the release a user would install (the tables')
    try:
        import peft
        from peft.utils import transformers_weight_conversion as conv
        patterns = dict(getattr(conv, "_MODEL_TO_CONVERSION_PATTERN", {**patterns, "mixtral": "mixtral"}))
        targets = dict(getattr(conv, "_MOE_TARGET_MODULE_MAPPING", targets))
        version += f", peft {peft.__version__}"
        keeps_linear = release(peft.__version__) >= KEEPS_LINEAR_TARGETS
    except ImportError:
        patterns.update(_PEFT_PATTERNS)
    pattern = patterns.get(model_type)
    return _rules(model_type, targets.get(pattern or ""), fused=fused, keeps_linear=keeps_linear,
                  source=version, renames=_renames(model_type, pattern))


def _rules(model_type: str, mapping: dict[str, str] | None, *, fused: bool, keeps_linear: bool, source: str,
           renames: tuple[tuple[str, str], ...] = ()) -> PeftMoeRules:
    """The rules of a model type whose experts transformers fuses (``fused``) under PEFT's target ``mapping`` for its
    pattern (None: PEFT does not convert it); ``keeps_linear``: PEFT >= 0.22 keeps non-expert modules of those names."""
    if mapping is None:
        return PeftMoeRules(model_type, experts_dropped=fused, source=source)
    converted = frozenset(mapping) - {"gate"}
    return PeftMoeRules(model_type, retargeted=frozenset() if keeps_linear else converted, source=source,
                        fused=_fused_names(mapping), converted=converted, renames=renames)


def _renames(model_type: str, pattern: str | None) -> tuple[tuple[str, str], ...]:
    """The names transformers renames where it fuses ``model_type``'s experts: its conversion_mapping's, else those of
    the tables' fusions for PEFT's ``pattern`` (Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``)."""
    fusions, source = expert_fusions(model_type)
    if source.startswith("the conversion_mapping"):
        return fusions[0].renames
    return _FUSION_TABLES[0].renames if pattern == "mixtral" else ()


def _fused_names(mapping: dict[str, str]) -> frozenset[str]:
    """The old names of a PEFT target mapping that share their new name with another (w1, w3 -> gate_up_proj)."""
    new = [v for k, v in mapping.items() if k != "gate"]
    return frozenset(k for k, v in mapping.items() if k != "gate" and new.count(v) > 1)


def _fuses_experts(conversion_mapping, model_type: str) -> tuple[bool, str]:
    """Whether transformers' load-time conversion of ``model_type`` merges per-expert weights, and
    "" or, when its helper failed, that the answer is this module's table's (said in the rules' source)."""
    try:
        convs = conversion_mapping.get_checkpoint_conversion_mapping(model_type) or []
    except Exception as exc:  # noqa: BLE001 - a transformers whose helper changed: the table's answer, said so
        return model_type in _FUSED, (f"its get_checkpoint_conversion_mapping raised {type(exc).__name__}: "
                                      "whether it fuses experts is from the tables of transformers 5.24")
    return any("experts.*" in p for c in convs for p in getattr(c, "source_patterns", []) or []), ""


def _from_tables(model_type: str, why: str) -> PeftMoeRules:
    if model_type not in _FUSED:
        return PeftMoeRules(model_type)
    pattern = _FUSED[model_type]
    return _rules(model_type, _PEFT_MOE_TARGETS[pattern] if pattern else None, fused=True, keeps_linear=True,
                  source="tables of transformers 5.24 and PEFT 0.22" + (f"; {why}" if why else ""),
                  renames=_FUSION_TABLES[0].renames if pattern == "mixtral" else ())


@dataclass(frozen=True)
class ExpertFusion:
    """How transformers >= 5 builds one fused 3-D expert parameter from a checkpoint's per-expert matrices on
    load: where each expert's rows of a LoRA on that parameter (PEFT's ``target_parameters``) sit on disk.

    Attributes:
        target: the fused parameter's name tail, e.g. ``.experts.gate_up_proj`` (``(experts, out, in)`` in memory).
        sources: the per-expert tensors' name tails with ``*`` for the expert index, in row order of the fused
            matrix (``.experts.*.w1.weight`` then ``.experts.*.w3.weight``: gate rows first).
        renames: ``(on disk, in memory)`` name parts renamed on load (Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``).
    """

    target: str
    sources: tuple[str, ...]
    renames: tuple[tuple[str, str], ...] = ()


#: Model types whose experts module says ``is_transposed`` (stored ``(experts, in, out)``), where PEFT adds the transpose of
#: ``B_e·A_e`` to each expert's stored matrix (transformers 5.25: gpt-oss, Aria, Ergo, OpenAI Privacy Filter); what a
#: square stack's LoRA is read by (other shapes tell it themselves: :mod:`spectra.param_experts`).
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "aria_text", "ergo", "openai_privacy_filter"})
#: Model types whose stacks transformers transposes on load where stored ``(experts, in, out)`` (Qwen3-VL-MoE:
#: ``conversion_mapping``'s ``Transpose(1, 2, check_dims=True)`` to the module's ``(experts, out, in)``): PEFT's LoRA is of
#: the loaded parameter, spectra's ``(out, in)``, whichever way the checkpoint stores it.
LOAD_TRANSPOSED_EXPERTS = frozenset({"qwen3_vl_moe", "qwen3_vl_moe_text"})
#: The two fusion patterns of transformers 5.24 (Mixtral's and Qwen2-MoE's), for where transformers is not installed.
_FUSION_TABLES: tuple[ExpertFusion, ...] = (
    ExpertFusion(".experts.gate_up_proj", (".experts.*.w1.weight", ".experts.*.w3.weight"), ((".block_sparse_moe.", ".mlp."),)),
    ExpertFusion(".experts.down_proj", (".experts.*.w2.weight",), ((".block_sparse_moe.", ".mlp."),)),
    ExpertFusion("mlp.experts.gate_up_proj", ("mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight")),
    ExpertFusion("mlp.experts.down_proj", ("mlp.experts.*.down_proj.weight",)),
)


def expert_fusions(model_type: str | None) -> tuple[tuple[ExpertFusion, ...], str]:
    """The expert fusions transformers applies on loading a ``model_type`` checkpoint, and where they came from.

    Read from the installed transformers' ``conversion_mapping`` (only converters that stack the experts
    (``MergeModulelist(dim=0)``) and concatenate their matrices along the rows (``Concatenate(dim=1)``), the
    layouts whose inverse is a row split); else, or for an unknown model type, the tables of transformers 5.24.
    """
    try:
        from transformers import conversion_mapping

        convs = list(conversion_mapping.get_checkpoint_conversion_mapping(model_type) or []) if model_type else []
    except Exception:  # noqa: BLE001 - no transformers, or a helper that changed: the tables
        convs = []
    renames = tuple((src, dst) for c in convs if type(c).__name__ == "WeightRenaming"
                    for src, dst in zip(getattr(c, "source_patterns", ()) or (), getattr(c, "target_patterns", ()) or ()))
    fusions = []
    for c in convs:
        sources, targets = list(getattr(c, "source_patterns", ()) or ()), list(getattr(c, "target_patterns", ()) or ())
        ops = [(type(o).__name__, getattr(o, "dim", None)) for o in getattr(c, "operations", ()) or ()]
        if (type(c).__name__ == "WeightConverter" and len(targets) == 1 and sources and all(s.count("*") == 1 for s in sources)
                and ops and ops[0] == ("MergeModulelist", 0) and all(op in (("Concatenate", 1),) for op in ops[1:])):
            fusions.append(ExpertFusion(targets[0], tuple(sources), renames))
    if fusions:
        return tuple(fusions), f"the conversion_mapping of the installed transformers for {model_type}"
    return _FUSION_TABLES, "the expert fusions of transformers 5.24 (Mixtral's and Qwen2-MoE's)"


__all__ = ["LOAD_TRANSPOSED_EXPERTS", "PEFT_REFUSED_LEAVES", "TRANSPOSED_EXPERTS",
           "ExpertFusion", "PeftMoeRules", "expert_fusions", "peft_moe_rules", "peft_rules"]
