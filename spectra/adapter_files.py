"""An adapter's weights file given as a model, told from a model by its tensor names alone.

PEFT saves each tuner's parameters under its own stem (LoRA's ``lora_A``/``lora_B``, LoHa's ``hada_w1_a``,
IA3's ``ia3_l`` …), kohya's scripts save ``lora_down``/``lora_up`` and MLX ``lora_a``/``lora_b``. Such a
file holds no weight matrix of the model: given as one, only the copies it saves (``modules_to_save``: a
task head, embeddings) would pair and the update itself would be lost. A model that ships unmerged
adapter layers in PEFT's own layout (``X.base_layer.weight`` beside ``X.lora_A.…``, as Phi-4-multimodal)
is a model; one whose factors sit beside the plain ``X.weight`` (loralib's layers) is a model too, whose
weights may or may not hold the update: loralib adds it into ``weight`` in ``eval()`` and keeps the factors, so
the names cannot tell (:attr:`AdapterFile.unmerged`: said, not refused).
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
        unmerged: a factor's module also stores its plain weight (``plain``): a model saved with its adapter
            layers (merged into the weights or not: the names cannot tell), not an adapter file.
        plain: that weight's name when ``unmerged``, else None.
    """

    kind: str
    factors: list[str]
    unmerged: bool = False
    plain: str | None = None

    @property
    def message(self) -> str:
        """What the file is (the factor named): for a one-line error, or a warning where :attr:`unmerged`."""
        if self.unmerged:
            return (f"holds {self.kind} factors beside its modules' weights ({self.plain} beside {self.factors[0]}): the "
                    "weights are analysed as stored, the factors as tensors of their own")
        what = "LoRA factors" if self.kind == "LoRA" else (f"{self.kind} factors" if self.kind.endswith("LoRA") else f"{self.kind} adapter weights")
        return f"holds {what} ({self.factors[0]}, …): an adapter's weights file, not a model"

    @property
    def hint(self) -> str:
        """What to do instead."""
        if self.unmerged:
            return ("if the factors are not merged into the weights (loralib merges them in eval(), and keeps them), the "
                    "update is not in the weights: merge them, W + s·B·A for LoRA, and save the model")
        if self.kind == "LoRA":
            return LORA_FILE_HINT
        if self.kind in (*PEFT_TUNER_STEMS.values(), "AdaLoRA"):
            return ("spectra reads LoRA, rsLoRA and DoRA adapters: merge this one into its base (PEFT's merge_and_unload, "
                    "or the tool that made it), save the model and diff it against the base")
        return "merge it into its base model and save the merged model, then diff it against the base"


def factor_of(name: str) -> tuple[str, str] | None:
    """``(kind, module)`` when tensor ``name`` is an adapter factor (:class:`AdapterFile`'s kinds; ``module``: the
    name before the factor's component, e.g. ``…q_proj`` of ``…q_proj.lora_A.weight``), else None."""
    parts = name.split(".")
    for i, c in enumerate(parts[1:], 1):
        rest, kind = parts[i + 1:], None
        if c == "lora_E":  # AdaLoRA's singular values, beside its lora_A / lora_B
            kind = "AdaLoRA"
        elif c in ("lora_A", "lora_B") or c.startswith("lora_embedding_"):
            kind = "LoRA"
        elif c in ("lora_down", "lora_up"):
            kind = "kohya LoRA"
        elif c in ("lora_a", "lora_b") and not rest:
            kind = "MLX LoRA"
        elif len(rest) <= 2 and (len(rest) == 1 or rest[-1:] in ([], ["weight"], ["bias"])):
            # PEFT saves a tuner's parameter last or as a layer's weight (OFT's oft_R.weight); a model's state dict
            # holds the adapter's name after it (hada_w1_a.default, oft_R.default.weight)
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
    kinds = {k for _, (k, _) in found}
    return AdapterFile("AdaLoRA" if "AdaLoRA" in kinds else found[0][1][0], [n for n, _ in found], plain is not None, plain)


__all__ = ["LORA_FILE_HINT", "PEFT_TUNER_STEMS", "AdapterFile", "adapter_file", "factor_of"]
