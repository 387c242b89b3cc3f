"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

An adapter holds, per adapted module, ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight`` ``(out, r)`` (embeddings:
``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``), and the update is ``ΔW = s · B · A`` with
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA); ``r`` and ``lora_alpha`` per module come from
``rank_pattern`` / ``alpha_pattern``, matched as PEFT matches them. Embeddings: ``ΔW = s · (B·A)ᵀ`` ``(vocab, dim)``.
DoRA adds a magnitude vector; its update depends on the base weight (:meth:`LoraModule.dora_delta`). See the
definitions document, "LoRA adapters".

The adapter is read as PEFT would load it (``peft.PeftModel.from_pretrained``): every field missing from
``adapter_config.json`` takes ``peft.LoraConfig``'s default (:data:`PEFT_LORA_DEFAULTS`: r = 8, lora_alpha = 8, not
alpha = r); factors of modules PEFT would not adapt under ``target_modules``, ``exclude_modules``, ``modules_to_save``
or ``layers_to_transform`` are skipped with that reason; a DoRA adapter needs a magnitude of shape ``(out,)`` for
every module; one factor stored under two names (with and without ``base_model.model.``) is an error, not "the last
one wins". Module patterns are untrusted regular expressions, matched safely (:mod:`spectra.io.patterns`).

Everything stays factored: :meth:`LoraModule.factors` returns ``(B', A')`` with ``ΔW = s·B'·A'`` in ``(out, in)``
orientation, for :func:`spectra.engine.factored_svd`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from spectra.errors import CheckpointFormatError, CheckpointNotFoundError
from spectra.io.checkpoint import FOLDER_WEIGHTS, READ_NOTE_PREFIX, Checkpoint, named_adapters, tensor_infos
from spectra.io.jsonfile import load_json
from spectra.io.param_lora import ParamLora, check_chain, factor_float, param_lora, weight_param
from spectra.io.paths import allowed_roots, check_inside, checkpoint_location, missing_text
from spectra.io.patterns import (
    CLASH_CHECK_S,
    PatternError,
    check_component_key,
    check_full_key,
    check_layers_key,
    check_suffix_key,
    clashing_keys,
    component_match,
    full_match,
    layer_index,
    suffix_match,
)
from spectra.io.torchfile import StateDictCache
from spectra.pairing import Skipped
from spectra.peft_releases import KEEPS_PATTERN_ORDER, MHA_TWICE, mha_out_proj_twice, release

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
#: The kinds of tensor a PEFT LoRA module saves.
LORA_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_LORA_KEY = re.compile(rf"^(?P<module>.+)\.(?P<kind>{'|'.join(LORA_KINDS)})"
                       r"(?:\.default)?(?:\.(?P<leaf>weight|bias))?$")
#: init_lora_weights values that change the base weights, so B·A alone is not the update (peft 0.21 spells
#: LoRA-GA "lora_ga", 0.22 adds Astra "astra": their inits subtract s·B₀·A₀ from W, as PiSSA does).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "astra")
#: ``peft.LoraConfig``'s defaults for the fields that decide ΔW or which modules are adapted (peft 0.13 – 0.22;
#: tests/test_hostile.py checks them against the installed peft). PEFT does *not* default lora_alpha to r.
PEFT_LORA_DEFAULTS: Mapping[str, Any] = {
    "r": 8, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False, "use_dora": False, "lora_bias": False,
    "init_lora_weights": True, "target_modules": None, "exclude_modules": None, "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "ensure_weight_tying": False,
}
#: LoraConfig fields (peft 0.22) whose set value makes the update something other than s·B·A on the stored
#: base weight, or no one weight at all: refused, each with what it does.
LORA_VARIANTS: Mapping[str, str] = {
    "kasa_config": "KaSA removes the base weight's smallest singular directions and scales B·A by a learned diagonal",
    "use_bdlora": "BD-LoRA stores block-diagonal factors in a compact form",
    "use_qalora": "QA-LoRA's A acts on inputs averaged in groups (GPTQ bases), and PEFT cannot merge it",
    "arrow_config": "Arrow routes each token to some of several LoRA experts, so no one update stands for it",
}
#: Variant fields spectra knows to leave s·B·A as PEFT merges it (initialisations, training-time options); any
#: other ``use_*`` or ``*_config`` field that is set may change the update and is refused.
KNOWN_OPTIONS = ("use_rslora", "use_dora", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
                 "monteclora_config", "megatron_config", "runtime_config", "astra_config")
#: peft_type values of prompt-learning methods: they train inputs, not weights.
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")
#: The way out for an adapter whose merged weights spectra can measure but whose factors it does not read.
MERGE_HINT = "merge the adapter (merge_and_unload) and diff the merged model against the base"
#: Largest adapter_config.json read (real ones are a few KB).
MAX_CONFIG_BYTES = 10_000_000
#: Wall-clock bound on matching every module name against the config's patterns. Each single match is bounded by
#: :mod:`spectra.io.patterns` (≤ 0.05 s); this bounds their number times that.
MATCH_BUDGET_S = 10.0


def is_adapter(path: str | Path) -> bool:
    """True when ``path`` is a folder holding ``adapter_config.json``."""
    p = Path(checkpoint_location(path))
    # exists(), not is_file(): a FIFO or folder by that name is an adapter's, and open_adapter says what is wrong with it
    return p.is_dir() and ((config := p / ADAPTER_CONFIG).exists() or config.is_symlink())


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` that matches ``module`` as PEFT matches it: ``(.*\\.)?(key)$``
    (:func:`spectra.io.patterns.suffix_match`; keys without metacharacters compared as strings).

    Raises:
        PatternError: a key that could backtrack catastrophically, or a name too long for it.
    """
    for key in patterns:
        if suffix_match(key, module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide ΔW and which modules PEFT adapts; each default is
    ``peft.LoraConfig``'s (:data:`PEFT_LORA_DEFAULTS`).

    Attributes:
        r: default rank (PEFT default 8).
        lora_alpha: default alpha (PEFT default 8, whatever r is).
        use_rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern, alpha_pattern: per-module overrides (keys matched with ``(.*\\.)?(key)$``).
        fan_in_fan_out: the base layer stores ``(in, out)`` (GPT-2 Conv1D); A and B are as usual.
        use_dora: DoRA adapter (magnitude vectors; ΔW needs the base weight).
        init_lora_weights: as saved; PiSSA/OLoRA/CorDA/LoftQ initialisations change the base weights.
        base_model_name_or_path: what the adapter was trained on, if recorded.
        target_modules: None (PEFT's per-architecture default: every stored factor is kept), one regular expression
            matched against the whole module name, ``"all-linear"``, or names matched as the name or a dotted suffix of it.
        exclude_modules: the same forms; matching modules are not adapted.
        modules_to_save: modules trained whole; PEFT never puts a LoRA on them.
        layers_to_transform, layers_pattern: only these layer indices are adapted (list form of ``target_modules`` only).
        lora_bias: ``lora_B`` has a bias (added, scaled, to the base layer's bias).
        ensure_weight_tying: PEFT ties an output head's LoRA to the tied embedding's (the same factors, transposed).
        activated: an activated LoRA's (aLoRA's) ``alora_invocation_tokens``: s·B·A applies only after them; () for a LoRA.
        target_parameters: parameters (not modules) adapted, e.g. MoE expert stacks.
        layer_replication: PEFT's ``[[start, end), ...]`` ranges of base layers stacked into the adapted model (its
            layer i runs on base layer :meth:`replicated_layers` ``[i]``).
        task_type: PEFT's ``task_type`` as saved (a string), or None.
        peft_version: the PEFT release that saved it, as saved (None where the file does not say: before PEFT 0.18).
        source: the file this was read from, for messages.
    """

    r: int = PEFT_LORA_DEFAULTS["r"]
    lora_alpha: float = float(PEFT_LORA_DEFAULTS["lora_alpha"])
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    base_model_name_or_path: str | None = None
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    lora_bias: bool = False
    ensure_weight_tying: bool = False
    activated: tuple[Any, ...] = ()
    target_parameters: tuple[str, ...] | None = None
    layer_replication: tuple[tuple[int, int], ...] | None = None
    task_type: str | None = None
    peft_version: str | None = None
    source: Path | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_file(cls, path: Path) -> AdapterConfig:
        """Parse and validate; every missing field takes PEFT's default; errors name the file and the field.

        Raises:
            CheckpointNotFoundError: no such file.
            CheckpointFormatError: not a regular file, not strict JSON (nesting, duplicate keys...),
                a field of the wrong type or range, a pattern that could backtrack
                catastrophically (:mod:`spectra.io.patterns`), or a combination PEFT refuses.
        """
        raw = load_json(path, what=ADAPTER_CONFIG, max_bytes=MAX_CONFIG_BYTES)
        if not isinstance(raw, dict):
            raise CheckpointFormatError("adapter config is not a JSON object", path=path)
        peft_type = raw.get("peft_type", "LORA")
        if peft_type != "LORA":  # PEFT looks it up as written: "lora" is a KeyError there
            upper = str(peft_type).upper()
            raise CheckpointFormatError(
                f"peft_type must be LORA. Got {peft_type!r} instead" + (" (PEFT cannot load it)" if upper == "LORA" else ""), path=path,
                hint='write "peft_type": "LORA"' if upper == "LORA" else "a prompt-learning adapter trains inputs and changes no weight: "
                "there is no ΔW to measure" if upper in PROMPT_LEARNING else f"spectra reads LoRA, rsLoRA and DoRA factors; {MERGE_HINT}")
        for key, value in raw.items():
            if value in (None, False, {}, []) or key in KNOWN_OPTIONS or not (key.startswith("use_") or key.endswith("_config")):
                continue  # PEFT's defaults: the variant is off
            what = LORA_VARIANTS.get(key, "a LoRA variant this version of spectra does not know, which may change the update")
            raise CheckpointFormatError(
                f"{key} is set: {what}; s·B·A would not be its update", path=path,
                hint="spectra cannot measure this adapter" if key in ("use_qalora", "arrow_config") else MERGE_HINT)
        r = raw.get("r", PEFT_LORA_DEFAULTS["r"])
        alpha = raw.get("lora_alpha", PEFT_LORA_DEFAULTS["lora_alpha"])
        if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
            raise CheckpointFormatError(f"r must be a positive integer. Got {r!r} instead", path=path)
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
            raise CheckpointFormatError(f"lora_alpha must be a number. Got {alpha!r} instead", path=path)
        patterns = {}
        for name in ("rank_pattern", "alpha_pattern"):
            pat = raw.get(name) or {}
            if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                                    for v in pat.values()):
                raise CheckpointFormatError(f"{name} must map module patterns to numbers. Got {_short(pat)} instead", path=path)
            if name == "rank_pattern" and any(not float(v).is_integer() or v <= 0 for v in pat.values()):
                raise CheckpointFormatError(f"rank_pattern ranks must be positive integers. Got {_short(pat)} instead", path=path)
            for key in pat:
                _guard(path, name, check_suffix_key, key)
            patterns[name] = pat
        target_modules = _names_or_regex(raw, "target_modules", path)
        exclude_modules = _names_or_regex(raw, "exclude_modules", path)
        modules_to_save = _str_list(raw, "modules_to_save", path)
        for entry in modules_to_save or ():
            _guard(path, "modules_to_save", check_component_key, entry)
        layers = raw.get("layers_to_transform")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if layers is not None and not (isinstance(layers, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            raise CheckpointFormatError(f"layers_to_transform must be an integer or a list of integers. Got {_short(layers)} instead",
                                        path=path)
        layers_pattern = raw.get("layers_pattern")
        layers_pattern = [layers_pattern] if isinstance(layers_pattern, str) else \
            _str_list(raw, "layers_pattern", path, "a string or a list of strings")
        for entry in layers_pattern or ():
            _guard(path, "layers_pattern", check_layers_key, entry)
        if isinstance(target_modules, str) and (layers or layers_pattern):  # peft.LoraConfig.__post_init__ refuses this
            raise CheckpointFormatError("layers_to_transform and layers_pattern cannot be used when target_modules is a string",
                                        path=path, hint="PEFT refuses this config as well")
        replication = raw.get("layer_replication")
        if replication is not None and not (isinstance(replication, list) and all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r)
                and r[0] < r[1] for r in replication)):
            raise CheckpointFormatError(f"layer_replication must be a list of [start, end] layer ranges. Got {_short(replication)} "
                                        "instead", path=path)
        base = raw.get("base_model_name_or_path")
        return cls(
            r=r, lora_alpha=float(alpha), use_rslora=_flag(raw, "use_rslora", path),
            rank_pattern={k: int(v) for k, v in patterns["rank_pattern"].items()},
            alpha_pattern={k: float(v) for k, v in patterns["alpha_pattern"].items()},
            fan_in_fan_out=_flag(raw, "fan_in_fan_out", path), use_dora=_flag(raw, "use_dora", path),
            init_lora_weights=raw.get("init_lora_weights", PEFT_LORA_DEFAULTS["init_lora_weights"]),
            base_model_name_or_path=base if isinstance(base, str) else None,
            target_modules=target_modules, exclude_modules=exclude_modules,
            modules_to_save=tuple(modules_to_save) if modules_to_save is not None else None,
            layers_to_transform=tuple(layers) if layers else None,
            layers_pattern=tuple(layers_pattern) if layers_pattern else None,
            lora_bias=_flag(raw, "lora_bias", path), ensure_weight_tying=_flag(raw, "ensure_weight_tying", path),
            activated=tuple(t) if isinstance(t := raw.get("alora_invocation_tokens"), list) else (t,) if t not in (None, "") else (),
            target_parameters=tuple(tp) if (tp := _str_list(raw, "target_parameters", path)) else None,
            layer_replication=tuple((a, b) for a, b in replication) if replication else None,
            task_type=raw["task_type"] if isinstance(raw.get("task_type"), str) else None, source=path,
            peft_version=raw["peft_version"] if isinstance(raw.get("peft_version"), str) else None)

    @property
    def ordered_patterns(self) -> bool:
        """Saved by PEFT >= 0.22, which keeps rank_pattern / alpha_pattern in the order training used (earlier releases
        sorted their keys on saving)."""
        return self.peft_version is not None and release(self.peft_version) >= KEEPS_PATTERN_ORDER

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of ``module`` after the patterns.

        Raises:
            CheckpointFormatError: ``module`` is too long to match against a pattern key safely.
        """
        rk = _guard(self.source, "rank_pattern", pattern_key, self.rank_pattern, module)
        ak = _guard(self.source, "alpha_pattern", pattern_key, self.alpha_pattern, module)
        return (self.rank_pattern[rk] if rk else self.r), (self.alpha_pattern[ak] if ak else self.lora_alpha)

    def scale(self, module: str) -> float:
        """``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for ``module``."""
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def untargeted(self, module: str, *, module_loras: bool = False) -> str | None:
        """Why PEFT would not put a LoRA on ``module`` under this config, or None when it would.

        Follows ``peft.tuners.tuners_utils.check_target_module_exists``: ``exclude_modules`` first, then ``modules_to_save``,
        then ``target_modules`` (one regular expression matched against the whole name, or a list of names each matching
        the name or a dotted suffix), then ``layers_to_transform``. With ``target_modules`` absent (PEFT's per-architecture default,
        which the saved config does not record) or ``target_parameters`` set (unless ``module_loras``: PEFT's
        module LoRAs alone), nothing is excluded by it.

        Raises:
            CheckpointFormatError: ``module`` is too long to match against a pattern safely.
        """
        ex = self.exclude_modules
        if ex and (_guard(self.source, "exclude_modules", full_match, ex, module) if isinstance(ex, str)
                   else module in ex or any(module.endswith("." + e) for e in ex)):
            return f"{module} matches exclude_modules"
        for entry in self.modules_to_save or ():
            if _guard(self.source, "modules_to_save", component_match, entry, module):
                return f"{module} is in modules_to_save (trained whole, never with a LoRA)"
        tm = self.target_modules
        if tm is None or (self.target_parameters and not module_loras):
            return None
        if isinstance(tm, str):
            if tm.lower() == "all-linear" or _guard(self.source, "target_modules", full_match, tm, module):
                return None
            return f"{module} does not match target_modules {tm[:80]!r}"
        if module in tm:  # named in full: PEFT adapts it whatever layers_to_transform says
            return None
        if not any(module.endswith("." + t) for t in tm):
            return f"{module} is not in target_modules"
        if self.layers_to_transform:
            idx = _guard(self.source, "layers_pattern", layer_index, module, self.layers_pattern)
            if idx is None or idx not in self.layers_to_transform:
                return f"the layer of {module} ({idx}) is not in layers_to_transform {list(self.layers_to_transform)[:8]}"
        return None

    def replicated_layers(self) -> list[int] | None:
        """The base layer each layer of the adapted model runs on (PEFT's ``layer_replication``:
        ``[[0, 2], [1, 3]]`` gives ``[0, 1, 1, 2]``), or None without replication."""
        if not self.layer_replication:
            return None
        return [i for a, b in self.layer_replication for i in range(a, b)]

    @property
    def base_changing_init(self) -> str | None:
        """The name of an initialisation that changes the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, Astra), or None."""
        return base_changing_init(self.init_lora_weights)


def base_changing_init(init_lora_weights: object) -> str | None:
    """Which of :data:`BASE_CHANGING_INITS` a LoraConfig's ``init_lora_weights`` value is (``"pissa_niter_4"``
    -> ``"pissa"``), or None: an init that moves ``s·B₀·A₀`` out of W (or, LoftQ, replaces W)."""
    init = str(init_lora_weights).lower()
    return next((m for m in BASE_CHANGING_INITS if init.startswith(m)), None)


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _guard(path: Path | None, field_name: str, fn, *args):
    """``fn(*args)``, a :class:`PatternError` turned into the config file's one-line error."""
    try:
        return fn(*args)
    except PatternError as exc:
        raise CheckpointFormatError(f"{field_name} key {exc.key[:80]!r} {exc.reason}", path=path,
                                    hint="PEFT matches these keys as regular expressions; write module names out "
                                         "(e.g. 'layers.0.self_attn.q_proj') or use a simpler expression") from None


def _flag(raw: Mapping[str, Any], name: str, path: Path) -> bool:
    value = raw.get(name)
    if value is None:  # absent or null: PEFT's default (False for every flag read here)
        return bool(PEFT_LORA_DEFAULTS[name])
    if not isinstance(value, bool):
        raise CheckpointFormatError(f"{name} must be true or false. Got {_short(value)} instead", path=path)
    return value


def _str_list(raw: Mapping[str, Any], name: str, path: Path, what: str = "a list of strings") -> list[str] | None:
    value = raw.get(name)
    if value is None:
        return None
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise CheckpointFormatError(f"{name} must be {what}. Got {_short(value)} instead", path=path)
    return value


def _names_or_regex(raw: Mapping[str, Any], name: str, path: Path) -> str | tuple[str, ...] | None:
    value = raw.get(name)
    if isinstance(value, str):
        if value.lower() != "all-linear":
            _guard(path, name, check_full_key, value)
        return value
    names = _str_list(raw, name, path, "a string or a list of strings")
    return tuple(names) if names is not None else None


#: Why a module an adapter targets is not called updated: its factors multiply to zero.
ZERO_LORA = "adapted, but its update s·B·A is exactly zero (a factor all zeros: PEFT starts lora_B, an embedding's A, so): nothing to compare"


@dataclass(frozen=True)
class LoraModule:
    """One adapted module.

    Attributes:
        module: module path without PEFT's ``base_model.model.`` prefix.
        weight_name: the base tensor this updates (``module + ".weight"``).
        A: ``lora_A`` ``(r, in)`` (embedding: ``lora_embedding_A`` ``(r, vocab)``), float32 (float64 when stored so).
        B: ``lora_B`` ``(out, r)`` (embedding: ``lora_embedding_B`` ``(dim, r)``), float32 (float64 when stored so).
        r, alpha, scale: after the patterns.
        embedding: an embedding LoRA (ΔW = s·(B·A)ᵀ).
        magnitude: DoRA magnitude ``(out,)``, or None.
        expert: the expert of a 3-D base tensor this updates (``target_parameters``: :mod:`spectra.param_experts`).
        note: where the factors came from when not a module's own (an expert's share of a ``target_parameters`` LoRA).
    """

    module: str
    weight_name: str
    A: torch.Tensor
    B: torch.Tensor
    r: int
    alpha: float
    scale: float
    embedding: bool = False
    magnitude: torch.Tensor | None = None
    expert: int | None = None
    note: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of ΔW (embeddings: ``(vocab, dim)``, the stored embedding orientation)."""
        return (self.A.shape[1], self.B.shape[0]) if self.embedding else (self.B.shape[0], self.A.shape[1])

    @property
    def zero_update(self) -> bool:
        """Whether s·B·A is exactly zero (a factor all zeros: PEFT initialises B so) and no DoRA magnitude changes the
        weight instead (DoRA's update with B = 0 is the magnitude's rescaling, not zero)."""
        return self.magnitude is None and not (bool(self.B.any()) and bool(self.A.any()))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B', A')`` with ``ΔW = scale · B' · A'`` in ``(out, in)`` orientation; B' ``(out, r)``, A' ``(r, in)``."""
        if self.embedding:
            return self.A.mT, self.B.mT  # (B·A)ᵀ = Aᵀ·Bᵀ
        return self.B, self.A

    def dense_delta(self) -> torch.Tensor:
        """``s·B·A`` formed densely in float64 (tests and DoRA only; analyses use the factors)."""
        Bf, Af = self.factors()
        return self.scale * (Bf.double() @ Af.double())

    def dora_delta(self, W: torch.Tensor) -> torch.Tensor:
        """DoRA's update for base weight ``W`` ``(out, in)``: ``m ⊙ (W + sBA) / ‖W + sBA‖_row − W``,
        the norm taken per output row as PEFT computes it (float64)."""
        if self.magnitude is None:
            raise ValueError("not a DoRA module")
        merged = W.double() + self.dense_delta()
        norm = torch.linalg.vector_norm(merged, dim=1, keepdim=True)
        return self.magnitude.double().reshape(-1, 1) / norm * merged - W.double()


@dataclass
class Adapter:
    """A PEFT LoRA adapter read from disk.

    Attributes:
        path: the folder.
        config: the parsed config.
        modules: module path -> :class:`LoraModule`.
        full: tensors the adapter stores whole and trained (``modules_to_save``): base tensor name
            -> tensor.
        base_copies: names of ``base_layer`` tensors PEFT saved: untrained copies beside embedding LoRAs, and the
            biases of adapted modules it trained (``bias`` = ``"all"`` or ``"lora_only"``).
        skipped: stored tensors not analysed, each with its reason: factors of modules PEFT would not adapt under
            the config (``target_modules`` ...), LoRA biases, DoRA magnitudes of an adapter without ``use_dora``.
        notes: caveats of how it was read, for a result's warnings (each starting :data:`spectra.io.checkpoint.READ_NOTE_PREFIX`).
        stacked: ``module.param:e<k>`` -> the LoRA of expert k of a 3-D base tensor (``target_parameters``);
            :attr:`modules` holds those on per-expert base matrices.
        params: the ``target_parameters`` LoRAs as stored, before :func:`spectra.param_experts.place_params`.
        weights: its weights file, opened (:attr:`base_copies` are read from it); None for one built by hand.
    """

    path: Path
    config: AdapterConfig
    modules: dict[str, LoraModule]
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    base_copies: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stacked: dict[str, LoraModule] = field(default_factory=dict)
    params: list[ParamLora] = field(default_factory=list)
    weights: Checkpoint | None = None


def open_adapter(path: str | Path, *, params: bool = False, match_budget_s: float = MATCH_BUDGET_S) -> Adapter:
    """Read a PEFT LoRA adapter folder as PEFT would load it (see the module docstring).

    Args:
        path: the folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
        params: keep LoRAs of PEFT's ``target_parameters`` (expert stacks) in :attr:`Adapter.params`, for
            :func:`spectra.param_experts.open_adapter_on` to place on a base; else they are refused.
        match_budget_s: wall-clock bound on matching module names against the config's patterns.

    Raises:
        CheckpointNotFoundError: no such folder, or no weights file in it.
        CheckpointFormatError: invalid config, a file that is not a regular file or resolves outside
            the folder, missing A/B halves, one factor under two names, ranks that disagree with
            the config, DoRA magnitudes missing or not ``(out,)``, a DoRA embedding (not supported),
            or pattern matching over its time bound; ``target_parameters`` LoRAs unless ``params``.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointNotFoundError(missing_text(folder), path=folder)
    if not folder.is_dir():
        raise CheckpointFormatError("a PEFT adapter is a folder (adapter_config.json and its weights)", path=folder)
    roots = allowed_roots(folder)
    config_path = folder / ADAPTER_CONFIG
    check_inside(config_path, roots, what=ADAPTER_CONFIG)
    config = AdapterConfig.from_file(config_path)
    weights = next((folder / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                    if (folder / n).exists() or (folder / n).is_symlink()), None)
    if weights is None:
        raise CheckpointNotFoundError("adapter folder has no adapter_model.safetensors or adapter_model.bin", path=folder)
    check_inside(weights, roots)
    states = StateDictCache()  # an adapter .bin is loaded once, not once per factor
    ckpt = Checkpoint(str(weights), weights, "safetensors" if weights.suffix == ".safetensors" else "bin",
                      tensor_infos(weights, states), None, states)
    stored: dict[str, dict[str, str]] = {}  # module -> kind -> stored tensor name
    seen: dict[tuple[str, ...], str] = {}  # what a stored name normalises to -> that name
    adapter = Adapter(folder, config, {}, weights=ckpt)
    if weights.name == "adapter_model.safetensors" and ((folder / "adapter_model.bin").exists() or (folder / "adapter_model.bin").is_symlink()):
        adapter.notes.append(f"{READ_NOTE_PREFIX}{folder}: the folder holds 2 weight sets; read adapter_model.safetensors "
                             "(PEFT's order) and ignored adapter_model.bin")
    full = next((n for n in FOLDER_WEIGHTS if (folder / n).exists() and not (folder / n).is_dir()), None)
    if full is not None:  # `spectra inspect FOLDER` lists that model: say which of the two this read
        adapter.notes.append(f"{READ_NOTE_PREFIX}{folder}: the folder holds a PEFT adapter and a full model ({full}); "
                             f"read the adapter ({weights.name}); pass {folder / full} to analyse the full model")
    if config.activated:
        adapter.notes.append(f"{READ_NOTE_PREFIX}{config_path}: an activated LoRA (alora_invocation_tokens): PEFT applies s·B·A "
                             "only to the tokens after its invocation sequence and cannot merge it; its spectrum is that of the "
                             "update where it applies")
    # PEFT saves each adapter of another name than "default" in a sub-folder of that name (a Trainer's
    # checkpoint-N sub-folders are a training run's, which spectra trace reads)
    others = named_adapters(folder)
    if others:
        adapter.notes.append(f"{READ_NOTE_PREFIX}{folder}: the folder also holds PEFT adapters in sub-folders "
                             f"({', '.join(others[:3])}{' …' if len(others) > 3 else ''}), not read; pass one to analyse it")
    for name in ckpt.tensors:
        short = name.removeprefix(_PREFIX)
        m = _LORA_KEY.match(short)
        if m:
            module, kind, leaf = m.group("module"), m.group("kind"), m.group("leaf") or "weight"
            what: tuple[str, ...] = (module, kind, leaf)
        elif ".base_layer." in short:
            what = ("base_layer", short)
        else:
            what = ("full", short.replace(".modules_to_save.default.", "."))
        if what in seen:
            raise CheckpointFormatError(
                f"{seen[what]} and {name} are the same {'LoRA factor' if m else 'tensor'} ({' '.join(what[:2])}) under two names; "
                "PEFT would load only one of them", path=weights, tensor=name,
                hint="the adapter file was merged or edited by hand; keep one copy")
        seen[what] = name
        if not m:
            if what[0] == "base_layer":
                adapter.base_copies.append(name)
            else:
                adapter.full[what[1]] = ckpt.load(name)
        elif leaf == "bias":
            state = "" if config.lora_bias else ", but lora_bias is false in adapter_config.json: PEFT does not load it"
            adapter.skipped.append(Skipped(name, f"LoRA bias (lora_bias=True){state}: it adds scale·b to the bias of {module}, "
                                                 "a vector, not a weight matrix; the weight update s·B·A is analysed"))
        else:
            stored.setdefault(module, {})[kind] = name
    # PEFT's LoRA of an nn.MultiheadAttention X: X.lora_* on in_proj_weight, X.base_layer.out_proj.lora_* on out_proj,
    # both at X's rank and alpha, targeted as X
    mha: dict[str, str] = {}  # X -> X.out_proj
    for m in [m for m in stored if m.endswith(".base_layer.out_proj")]:
        if (x := m[: -len(".base_layer.out_proj")]) in stored and x + ".out_proj" not in stored:
            stored[x + ".out_proj"] = stored.pop(m)
            mha[x] = x + ".out_proj"
    owner = {out: x for x, out in mha.items()}
    # every pattern match first, timed on its own (reading the factors below is not part of the bound)
    matched: dict[str, tuple[str | None, int, float]] = {}
    clashes: dict[str, dict[str, str]] = {}  # pattern field -> module -> its matching keys with their values
    started = time.monotonic()
    for module in stored:
        if time.monotonic() - started > match_budget_s:
            raise CheckpointFormatError(
                f"matching {len(stored)} module names against the patterns of {ADAPTER_CONFIG} took over {match_budget_s:g} s",
                path=config_path, hint="simplify rank_pattern / alpha_pattern / target_modules, or write module names out")
        reason = config.untargeted(owner.get(module, module))
        matched[module] = (reason, *config.rank_alpha(owner.get(module, module))) if reason is None else (reason, 0, 0.0)
    started = time.monotonic()  # which modules match clashing keys: every key against every module
    targeted = [m for m, (reason, _, _) in matched.items() if reason is None]
    for checked, module in enumerate([] if config.ordered_patterns else targeted):  # ordered: the first key trained it
        if time.monotonic() - started > CLASH_CHECK_S:  # given up, and said
            adapter.notes.append(f"{READ_NOTE_PREFIX}{config_path}: whether several rank_pattern / alpha_pattern keys match one "
                                 f"module was checked for {checked} of its {len(targeted)} modules only (over {CLASH_CHECK_S:g} s)")
            break
        for field_name in ("rank_pattern", "alpha_pattern"):
            if (keys := clashing_keys(getattr(config, field_name), module)) is not None:
                clashes.setdefault(field_name, {})[module] = keys
    for field_name, mods in clashes.items():  # PEFT's first matching key wins, and save_pretrained < 0.22 sorted the keys
        module, keys = next(iter(mods.items()))
        adapter.notes.append(f"{READ_NOTE_PREFIX}{config_path}: {len(mods)} module(s) (e.g. {module}) match several {field_name} keys with "
                             f"different values ({keys}): the first in the file is applied, as PeftModel.from_pretrained applies it, but "
                             "PEFT's save_pretrained sorts the keys (before PEFT 0.22, and this file does not say it was saved by a later "
                             "one), so the run that trained it may have used another (its update then differs from this file's)")
    wrapped: list[ParamLora] = []  # target_parameters LoRAs
    for module, kinds in stored.items():
        if weight_param(module, config.target_parameters):  # a Linear's weight as a parameter: patterns on module.weight
            matched[module] = (None, *config.rank_alpha(module + ".weight"))
        elif (param := param_lora(ckpt, config, module, kinds, weights)) is not None:
            wrapped.append(param)
            continue
        elif config.target_parameters and matched[module][0] is None:  # a module's own LoRA: target_modules decides, as in PEFT
            matched[module] = (config.untargeted(owner.get(module, module), module_loras=True), *matched[module][1:])
        reason, r, alpha = matched[module]
        if reason:
            emb = _tied_embedding(ckpt, stored, kinds) if config.ensure_weight_tying else None
            why = (f"the output head's LoRA that PEFT ties to {emb}'s (ensure_weight_tying in {ADAPTER_CONFIG}): the same "
                   f"update, measured once, on {emb}") if emb else f"not loaded by PEFT: {reason} ({ADAPTER_CONFIG})"
            adapter.skipped.extend(Skipped(n, why) for n in kinds.values())
            continue
        if min((len(ckpt.tensors[n].shape) for k, n in kinds.items() if k in ("lora_A", "lora_B")), default=2) >= 3:
            shapes = ", ".join(f"{k} {tuple(ckpt.tensors[n].shape)}" for k, n in kinds.items() if k in ("lora_A", "lora_B"))
            adapter.skipped.extend(Skipped(n, f"LoRA on a convolution ({shapes}): a kernel's update, not a weight matrix (a full "
                                              "checkpoint's kernels are skipped alike)") for n in kinds.values())
            continue
        try:
            lora = _lora_module(ckpt, config, module, kinds, (r, alpha), folder, weights)
        except CheckpointFormatError as exc:  # the likelier cause, where several keys match: PEFT re-sorted them
            if module not in clashes.get("rank_pattern", {}) or "rank" not in exc.message:
                raise
            raise CheckpointFormatError(exc.message, path=folder, tensor=module,
                                        hint=f"{module} matches several rank_pattern keys ({clashes['rank_pattern'][module]}); PEFT "
                                             "trained with the first of them in its config's order, and save_pretrained "
                                             "before PEFT 0.22 sorts the keys: put that key first again") from None
        if lora is not None and module in mha:  # X's own LoRA is in_proj_weight's (q, k and v stacked)
            lora = replace(lora, weight_name=module + ".in_proj_weight")
        elif lora is not None and module in owner and mha_out_proj_twice(config.peft_version):
            lora = replace(lora, scale=2 * lora.scale, note=f"{MHA_TWICE} ({ADAPTER_CONFIG}'s peft_version: "
                                                            f"{config.peft_version or 'none, before 0.18'})")
        if lora is not None:
            adapter.modules[module] = lora
        if "lora_magnitude_vector" in kinds and not config.use_dora:
            adapter.skipped.append(Skipped(kinds["lora_magnitude_vector"],
                                           "DoRA magnitude, but use_dora is false in adapter_config.json: PEFT does not load it, "
                                           "and the update is s·B·A"))
    if wrapped and not params:  # the base's layout places them (spectra.param_experts)
        raise CheckpointFormatError(f"{wrapped[0].module} is adapted through PEFT's target_parameters ({', '.join(config.target_parameters or ())}"
                                    "): which matrices each expert's LoRA updates depends on the base model's layout", path=folder,
                                    tensor=wrapped[0].stored[0], hint="pass the base model (spectra diff BASE ADAPTER; other commands: --base)")
    adapter.params = wrapped
    if not adapter.modules and not wrapped:
        other = next((n for n in adapter.full if any(f".{k}." in n for k in LORA_KINDS)), None)  # lora_A.<name>.weight
        why = (f" that spectra analyses ({adapter.skipped[0].reason})" if adapter.skipped else
               f" of the adapter named default (e.g. {other} is another named adapter's)" if other else "")
        raise CheckpointFormatError(f"adapter holds no LoRA factors (lora_A/lora_B){why}", path=weights)
    # PEFT saves every key under base_model.model. and loads only those: a file written otherwise (by
    # another tool, or edited) is read here by its module names, but PeftModel would load none of it
    bare = [n for kinds in stored.values() for n in kinds.values() if not n.startswith(_PREFIX)]
    if bare:
        adapter.notes.append(f"{READ_NOTE_PREFIX}{weights}: {len(bare)} LoRA factor(s) are stored without the {_PREFIX!r} prefix "
                             f"PEFT saves them under (e.g. {bare[0]}): PeftModel.from_pretrained loads none of them (it warns "
                             "of missing adapter keys); spectra reads them as the factors of the modules they name")
    return adapter


def _tied_embedding(ckpt: Checkpoint, stored: dict[str, dict[str, str]], kinds: dict[str, str]) -> str | None:
    """The embedding module whose LoRA factors, transposed, are this head's ``lora_A``/``lora_B`` (PEFT's
    ``ensure_weight_tying`` saves both), or None."""
    if set(kinds) != {"lora_A", "lora_B"}:
        return None
    A, B = ckpt.load(kinds["lora_A"]), ckpt.load(kinds["lora_B"])
    for module, other in stored.items():
        if {"lora_embedding_A", "lora_embedding_B"} <= set(other):
            eA, eB = ckpt.load(other["lora_embedding_A"]), ckpt.load(other["lora_embedding_B"])
            if eA.shape == B.mT.shape and eB.shape == A.mT.shape and torch.equal(eA, B.mT) and torch.equal(eB, A.mT):
                return module
    return None


def _lora_module(ckpt: Checkpoint, config: AdapterConfig, module: str, kinds: dict[str, str], rank_alpha: tuple[int, float],
                 folder: Path, weights: Path) -> LoraModule | None:
    """One module's factors, checked against its ``(r, alpha)`` after the patterns; None for a module
    that holds only a DoRA magnitude PEFT ignores."""
    embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a_key not in kinds and b_key not in kinds and not config.use_dora:
        return None
    if a_key not in kinds or b_key not in kinds:
        missing = b_key if a_key in kinds else a_key
        raise CheckpointFormatError(f"LoRA module {module} has no {missing}", path=weights, tensor=module,
                                    hint="the adapter file is incomplete")
    A, B = factor_float(ckpt.load(kinds[a_key])), factor_float(ckpt.load(kinds[b_key]))
    check_chain(A, B, module, weights)
    r, alpha = rank_alpha
    if r != A.shape[0] and A.shape[1] == r == B.shape[0]:  # lora_A is (x, r), lora_B (r, y): stored under each other's key
        raise CheckpointFormatError(
            f"{module}'s {a_key} is {tuple(A.shape)} and {b_key} {tuple(B.shape)} for rank {r}: the two look exchanged",
            path=weights, tensor=module,
            hint=f"PEFT stores {a_key} as (r, in) and {b_key} as (out, r); save them under each other's key")
    if r != A.shape[0]:
        raise CheckpointFormatError(f"adapter_config.json gives {module} rank {r} but its factors have rank {A.shape[0]}", path=folder,
                                    tensor=module, hint="rank_pattern and the weights disagree; the config was edited or mismatched")
    magnitude = None
    mag_name = kinds.get("lora_magnitude_vector")
    if config.use_dora:
        if embedding:
            raise CheckpointFormatError("DoRA on an embedding is not read by spectra", path=weights, tensor=module,
                                        hint=MERGE_HINT)
        if mag_name is None:
            raise CheckpointFormatError(f"use_dora is true but LoRA module {module} has no lora_magnitude_vector", path=weights,
                                        tensor=module, hint="without it the update is not s·B·A; the adapter file is incomplete")
        magnitude = factor_float(ckpt.load(mag_name))
        if tuple(magnitude.shape) != (B.shape[0],):
            raise CheckpointFormatError(
                f"DoRA magnitude {mag_name} has shape {tuple(magnitude.shape)}; PEFT requires (out,) = ({B.shape[0]},)",
                path=weights, tensor=mag_name, hint="PEFT refuses this file as well (size mismatch)")
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r  # as AdapterConfig.scale, without matching again
    return LoraModule(module, module + ".weight", A, B, r, alpha, scale, embedding, magnitude)
