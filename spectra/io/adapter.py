"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

An adapter holds, per adapted module, ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight``
``(out, r)`` (embeddings: ``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``),
and the update is ``ΔW = s · B · A`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA); ``r`` and ``lora_alpha`` per module come from ``rank_pattern`` / ``alpha_pattern``, matched as
PEFT matches them. Embeddings: ``ΔW = s · (B·A)ᵀ`` ``(vocab, dim)``. DoRA adds a magnitude vector;
its update depends on the base weight (:meth:`LoraModule.dora_delta`). See SPEC.md, "LoRA adapters".

Everything stays factored: :meth:`LoraModule.factors` returns ``(B', A')`` with ``ΔW = s·B'·A'`` in
``(out, in)`` orientation, for :func:`spectra.engine.factored_svd`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from spectra.errors import CheckpointFormatError, CheckpointNotFoundError
from spectra.io.checkpoint import Checkpoint, _bin_infos, _safetensors_infos

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.(?:default\.)?weight|\.default)?$")
#: init_lora_weights values that change the base weights, so B·A alone is not the update.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def is_adapter(path: str | Path) -> bool:
    """True when ``path`` is a folder holding ``adapter_config.json``."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` that matches ``module`` as PEFT matches it: ``(.*\\.)?(key)$``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide ΔW.

    Attributes:
        r: default rank.
        lora_alpha: default alpha.
        use_rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern, alpha_pattern: per-module overrides (keys matched with ``(.*\\.)?(key)$``).
        fan_in_fan_out: the base layer stores ``(in, out)`` (GPT-2 Conv1D); A and B are as usual.
        use_dora: DoRA adapter (magnitude vectors; ΔW needs the base weight).
        init_lora_weights: as saved; PiSSA/OLoRA/CorDA/LoftQ initialisations change the base weights.
        base_model_name_or_path: what the adapter was trained on, if recorded.
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    base_model_name_or_path: str | None = None

    @classmethod
    def from_file(cls, path: Path) -> "AdapterConfig":
        """Parse and validate; errors name the file and the field."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"cannot parse the adapter config ({exc.__class__.__name__})", path=path) from None
        if not isinstance(raw, dict):
            raise CheckpointFormatError("adapter config is not a JSON object", path=path)
        peft_type = raw.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise CheckpointFormatError(f"peft_type must be LORA. Got {peft_type!r} instead", path=path,
                                        hint="spectra analyses LoRA-family adapters (LoRA, rsLoRA, DoRA)")
        r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
        if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
            raise CheckpointFormatError(f"r must be a positive integer. Got {r!r} instead", path=path)
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
            raise CheckpointFormatError(f"lora_alpha must be a number. Got {alpha!r} instead", path=path)
        patterns = {}
        for name in ("rank_pattern", "alpha_pattern"):
            pat = raw.get(name) or {}
            if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pat.values()):
                raise CheckpointFormatError(f"{name} must map module patterns to numbers. Got {pat!r} instead", path=path)
            if name == "rank_pattern" and any(not float(v).is_integer() or v <= 0 for v in pat.values()):
                raise CheckpointFormatError(f"rank_pattern ranks must be positive integers. Got {pat!r} instead", path=path)
            for key in pat:
                try:
                    re.compile(key)
                except re.error:
                    raise CheckpointFormatError(f"{name} key {key!r} is not a valid pattern", path=path) from None
            patterns[name] = pat
        return cls(
            r=r, lora_alpha=float(alpha), use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern={k: int(v) for k, v in patterns["rank_pattern"].items()},
            alpha_pattern={k: float(v) for k, v in patterns["alpha_pattern"].items()},
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)), use_dora=bool(raw.get("use_dora", False)),
            init_lora_weights=raw.get("init_lora_weights", True),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        )

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of ``module`` after the patterns."""
        rk = pattern_key(self.rank_pattern, module)
        ak = pattern_key(self.alpha_pattern, module)
        return (self.rank_pattern[rk] if rk else self.r), (self.alpha_pattern[ak] if ak else self.lora_alpha)

    def scale(self, module: str) -> float:
        """``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for ``module``."""
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def base_changing_init(self) -> str | None:
        """The name of an initialisation that changes the base weights (PiSSA, OLoRA, CorDA, LoftQ), or None."""
        init = str(self.init_lora_weights).lower()
        return next((m for m in BASE_CHANGING_INITS if init.startswith(m)), None)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module.

    Attributes:
        module: module path without PEFT's ``base_model.model.`` prefix.
        weight_name: the base tensor this updates (``module + ".weight"``).
        A: ``lora_A`` ``(r, in)`` (embedding: ``lora_embedding_A`` ``(r, vocab)``), float32.
        B: ``lora_B`` ``(out, r)`` (embedding: ``lora_embedding_B`` ``(dim, r)``), float32.
        r, alpha, scale: after the patterns.
        embedding: an embedding LoRA (ΔW = s·(B·A)ᵀ).
        magnitude: DoRA magnitude ``(out,)``, or None.
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

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of ΔW (embeddings: ``(vocab, dim)``, the stored embedding orientation)."""
        return (self.A.shape[1], self.B.shape[0]) if self.embedding else (self.B.shape[0], self.A.shape[1])

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
        base_copies: names of untrained base-layer copies PEFT saved beside embedding LoRAs.
    """

    path: Path
    config: AdapterConfig
    modules: dict[str, LoraModule]
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    base_copies: list[str] = field(default_factory=list)


def open_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter folder.

    Raises:
        CheckpointNotFoundError: no such folder, or no weights file in it.
        CheckpointFormatError: invalid config, missing A/B halves, ranks that disagree with the
            config, or a DoRA embedding (not supported).
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointNotFoundError("no such file or folder", path=folder)
    config = AdapterConfig.from_file(folder / ADAPTER_CONFIG)
    weights = next((folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointNotFoundError("adapter folder has no adapter_model.safetensors or adapter_model.bin", path=folder)
    infos = _safetensors_infos(weights) if weights.suffix == ".safetensors" else _bin_infos(weights)
    ckpt = Checkpoint(str(weights), weights, "safetensors" if weights.suffix == ".safetensors" else "bin", infos, None)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    base_copies: list[str] = []
    for name in ckpt.tensors:
        short = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        m = _LORA_KEY.match(short)
        if m:
            parts.setdefault(m.group("module"), {})[m.group("kind")] = ckpt.load(name).to(torch.float32)
        elif ".base_layer." in short:
            base_copies.append(name)
        else:
            full[short.replace(".modules_to_save.default.", ".")] = ckpt.load(name)
    modules: dict[str, LoraModule] = {}
    for module, kinds in parts.items():
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_key not in kinds or b_key not in kinds:
            missing = b_key if a_key in kinds else a_key
            raise CheckpointFormatError(f"LoRA module {module} has no {missing}", path=weights, tensor=module,
                                        hint="the adapter file is incomplete")
        A, B = kinds[a_key], kinds[b_key]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointFormatError(f"LoRA factors of {module} do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}",
                                        path=weights, tensor=module)
        r, alpha = config.rank_alpha(module)
        if r != A.shape[0]:
            raise CheckpointFormatError(
                f"adapter_config.json gives {module} rank {r} but its factors have rank {A.shape[0]}",
                path=folder, tensor=module, hint="rank_pattern and the weights disagree; the config was edited or mismatched",
            )
        magnitude = kinds.get("lora_magnitude_vector")
        if magnitude is not None and embedding:
            raise CheckpointFormatError("DoRA on an embedding is not supported", path=weights, tensor=module)
        modules[module] = LoraModule(module, module + ".weight", A, B, r, alpha, config.scale(module), embedding, magnitude)
    if not modules:
        raise CheckpointFormatError("adapter holds no LoRA factors (lora_A/lora_B)", path=weights)
    return Adapter(folder, config, modules, full, base_copies)
