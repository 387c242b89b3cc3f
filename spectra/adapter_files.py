"""An adapter's weights file given as a model, told from a model by its tensor names alone.

PEFT saves each tuner's parameters under its own stem (LoRA's ``lora_A``/``lora_B``, LoHa's ``hada_w1_a``,
IA3's ``ia3_l`` …), kohya's scripts save ``lora_down``/``lora_up`` and MLX ``lora_a``/``lora_b``. Such a
file holds no weight matrix of the model: given as one, only the copies it saves (``modules_to_save``: a
task head, embeddings) would pair and the update itself would be lost. A model that ships unmerged
adapter layers in PEFT's own layout (``X.base_layer.weight`` beside ``X.lora_A.…``, as Phi-4-multimodal)
is a model; one whose factors sit beside the plain ``X.weight`` is a model whose updates are not in its
weights (:attr:`AdapterFile.unmerged`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: The parameter stems of PEFT's weight tuners other than LoRA (each tuner's ``prefix``), with the tuner's name.
PEFT_TUNER_STEMS = {
    "hada_": "LoHa", "lokr_": "LoKr", "ia3_": "IA3", "vera_": "VeRA", "pvera_": "PVeRA", "oft_": "OFT", "boft_": "BOFT",
    "fourierft_": "FourierFT", "vblora_": "VB-LoRA", "randlora_": "RandLoRA", "shira_": "SHiRA", "hra_": "HRA",
    "miss_": "MiSS", "bone_": "Bone", "c3a_": "C3A", "delora_": "DeLoRA", "waveft_": "WaveFT", "gralora_": "GraLoRA",
}

#: What to do with a PEFT LoRA adapter's weights file given as a model (every command that reads checkpoints says it).
LORA_FILE_HINT = "pass the adapter's folder (with its adapter_config.json), as TUNED or alone, with the full base model"


@dataclass(frozen=True)
class AdapterFile:
    """Adapter factors found among a checkpoint's tensor names (:func:`adapter_file`).

    Attributes:
        kind: ``"LoRA"`` (PEFT's), another PEFT tuner's name (``"LoHa"``, ``"IA3"`` …), ``"kohya LoRA"`` or ``"MLX LoRA"``.
        factors: the factor tensors' names, in the checkpoint's order (at least one).
        unmerged: a factor's module also stores its plain weight (``plain``): a model saved with unmerged
            adapter layers, whose updates are in the factors, not in its weights.
        plain: that weight's name when ``unmerged``, else None.
    """

    kind: str
    factors: list[str]
    unmerged: bool = False
    plain: str | None = None

    @property
    def message(self) -> str:
        """What the file is, for a one-line error (the factor named)."""
        if self.unmerged:
            return (f"holds unmerged {self.kind} layers ({self.plain} beside {self.factors[0]}): its updates are in the "
                    "factors, not in its weights")
        what = "LoRA factors" if self.kind == "LoRA" else (f"{self.kind} factors" if self.kind.endswith("LoRA") else f"{self.kind} adapter weights")
        return f"holds {what} ({self.factors[0]}, …): an adapter's weights file, not a model"

    @property
    def hint(self) -> str:
        """What to do instead."""
        if self.unmerged:
            return "merge the factors into the weights, W + s·B·A for LoRA, and save the model"
        if self.kind == "LoRA":
            return LORA_FILE_HINT
        if self.kind in PEFT_TUNER_STEMS.values():
            return ("spectra reads LoRA, rsLoRA and DoRA adapters: merge this one into its base (merge_and_unload), save "
                    "the model and diff it against the base")
        return "merge it into its base model and save the merged model, then diff it against the base"


def factor_of(name: str) -> tuple[str, str] | None:
    """``(kind, module)`` when tensor ``name`` is an adapter factor (:class:`AdapterFile`'s kinds; ``module``: the
    name before the factor's component, e.g. ``…q_proj`` of ``…q_proj.lora_A.weight``), else None."""
    parts = name.split(".")
    for i, c in enumerate(parts[1:], 1):
        rest, kind = parts[i + 1:], None
        if c in ("lora_A", "lora_B") or c.startswith("lora_embedding_"):
            kind = "LoRA"
        elif c in ("lora_down", "lora_up"):
            kind = "kohya LoRA"
        elif c in ("lora_a", "lora_b") and not rest:
            kind = "MLX LoRA"
        elif len(rest) <= 1 and all(r in ("weight", "bias") for r in rest):
            # PEFT saves a tuner's parameter last, or as a layer's weight (OFT's oft_R.weight)
            kind = next((k for stem, k in PEFT_TUNER_STEMS.items() if c.startswith(stem) and len(c) > len(stem)), None)
        if kind is not None:
            return kind, ".".join(parts[:i])
    return None


def adapter_file(names: Iterable[str]) -> AdapterFile | None:
    """The adapter factors among a checkpoint's tensor ``names``, or None: no factors, or a model that
    ships unmerged adapter layers beside their ``base_layer`` (paired tensor by tensor). The kind is that of
    the first factor found."""
    names = list(names)
    if any(".base_layer." in n for n in names):
        return None
    found = [(n, f) for n in names if (f := factor_of(n)) is not None]
    if not found:
        return None
    stored = set(names)
    plain = next((f"{m}.weight" for m in sorted({m for _, (_, m) in found}) if f"{m}.weight" in stored), None)
    return AdapterFile(found[0][1][0], [n for n, _ in found], plain is not None, plain)


__all__ = ["LORA_FILE_HINT", "PEFT_TUNER_STEMS", "AdapterFile", "adapter_file", "factor_of"]
