"""Finding the model's state dict inside a training checkpoint loaded by ``torch.load``.

Training loops save the weights beside their own state: PyTorch Lightning's ``last.ckpt``
(``{"state_dict": ..., "epoch": ..., "optimizer_states": ...}``), DeepSpeed's ``mp_rank_00_model_states.pt``
(``{"module": ..., "ds_version": ...}``), the PyTorch tutorial's ``{"model_state_dict": ..., "optimizer_state_dict": ...}``,
many loops' ``{"model": ...}``. :func:`find_state` unwraps one level (:data:`WRAPPER_KEYS`) and says how:

- entries named ``*_extra_state`` that are not tensors (a module's ``get_extra_state()``: TransformerEngine's
  FP8 metadata, ``None``) are no weights: skipped, with a note;
- another state dict beside the one read (``state_dict_ema``: an EMA copy of the weights) is named in a note;
- a DeepSpeed ZeRO-3 file, whose partitioned parameters are empty placeholders, is refused: its weights
  are in the optimizer shards and only DeepSpeed's ``zero_to_fp32.py`` puts them together; so is one rank's
  file of a tensor-parallel run (``mp_world_size`` > 1), which holds a slice of each split matrix;
- a mapping that is no state dict is refused naming the entry that is not a tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from spectra.errors import CheckpointFormatError

#: Keys a training script saves the model's state dict under (Lightning ``state_dict``, DeepSpeed ``module``,
#: many loops ``model``, the PyTorch tutorial ``model_state_dict``), beside ``epoch`` or ``optimizer``:
#: unwrapped one level when exactly one holds one (``state_dict`` first).
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
#: Where a MosaicML Composer checkpoint keeps the model's state dict: ``ckpt["state"]["model"]``.
COMPOSER_KEY = "state.model"
#: What the Hugging Face Trainer saves in a ``checkpoint-N`` folder beside the weights, by file name (none holds weights).
TRAINER_FILES = {"rng_state.pth": "the Trainer's random number generator states", "optimizer.pt": "the Trainer's optimizer state",
                 "scheduler.pt": "the Trainer's learning-rate scheduler state", "training_args.bin": "the Trainer's training arguments",
                 "scaler.pt": "the Trainer's gradient scaler state"}
#: What to do instead when given one of those files.
WEIGHTS_BESIDE = "pass the model's weights: the model.safetensors or pytorch_model.bin saved beside it"
#: Top-level keys of what a training loop saves beside the weights, and what each file is (none holds weights).
_NOT_WEIGHTS = ((("state", "param_groups"), "an optimizer's state (torch.optim: 'state', 'param_groups')"),
                (("last_epoch", "base_lrs"), "a learning-rate scheduler's state"),
                (("python", "numpy", "cpu"), "random number generator states (the Trainer's rng_state.pth)"))
#: A module's extra state (``nn.Module.get_extra_state``) is saved under this suffix, as any Python object.
EXTRA_STATE = "_extra_state"
#: Top-level keys only DeepSpeed's engine writes (``DeepSpeedEngine._save_checkpoint``).
_DEEPSPEED_KEYS = ("ds_version", "param_shapes", "ds_config")
_DEEPSPEED_FILE = re.compile(r"(zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt")
#: What to do with a DeepSpeed checkpoint: its own script writes the whole model as one state dict.
ZERO_TO_FP32 = ("consolidate it with DeepSpeed's zero_to_fp32.py, which DeepSpeed writes into the checkpoint folder: "
                "python zero_to_fp32.py CHECKPOINT_DIR OUTPUT, then pass OUTPUT")


@dataclass(frozen=True)
class FoundState:
    """A state dict found in what ``torch.load`` returned.

    Attributes:
        tensors: name -> tensor, non-tensor ``*_extra_state`` entries left out.
        wrapper: the top-level key it was under (``"state_dict"``...), or None for a plain state dict.
        notes: how it was read, each a phrase about the file (skipped extra state, another weight set beside it).
    """

    tensors: dict[str, torch.Tensor]
    wrapper: str | None = None
    notes: tuple[str, ...] = ()


def _stray(obj: dict) -> str | None:
    """What keeps ``obj`` from being a state dict, its first such entry in words (a name that is not a
    string, a value that is not a tensor and not a module's extra state), or None."""
    for k, v in obj.items():
        if not isinstance(k, str):
            return f"name {repr(k)[:80]} is {_type_name(k)}, not a string"
        if not isinstance(v, torch.Tensor) and not k.endswith(EXTRA_STATE):
            return f"entry {k[:80]!r} is {_type_name(v)}, not a tensor"
    return None


def _state_like(obj: object) -> bool:
    """Whether ``obj`` is a non-empty mapping of names to tensors, non-tensor extra state aside."""
    return isinstance(obj, dict) and bool(obj) and _stray(obj) is None and any(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_extra(obj: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(the tensors, the names of the non-tensor extra-state entries left out)``."""
    extra = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, extra


def _type_name(value: object) -> str:
    """``value``'s type for a message, with its article ("an int", "a dict", "None")."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _refuse_zero3(path: Path, top: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a DeepSpeed ZeRO-3 model-states file: its partitioned parameters are saved as empty 1-D
    placeholders (their values live in the ``*_optim_states.pt`` shards), so reading it would analyse
    the few small parameters kept whole and call every other matrix a shape mismatch, or drop it."""
    deepspeed = any(k in top for k in _DEEPSPEED_KEYS) or _DEEPSPEED_FILE.fullmatch(path.name) is not None
    empty = [k for k, v in tensors.items() if v.ndim == 1 and v.numel() == 0]
    if deepspeed and empty:
        raise CheckpointFormatError(
            f"DeepSpeed ZeRO-3 model states: {len(empty)} of {len(tensors)} parameters (e.g. {empty[0]}) are empty "
            "placeholders, their values are partitioned across the optimizer shards; a partial model is never analysed",
            path=path, hint=ZERO_TO_FP32)


def _refuse_tensor_parallel(path: Path, top: dict) -> None:
    """Refuse one rank's model states of a tensor-parallel DeepSpeed run (``mp_world_size`` > 1, which DeepSpeed's
    engine writes): each ``mp_rank_NN`` file holds a slice of every split matrix, which read alone was measured as
    the whole weight (‖ΔW‖ 0.65-0.79 of the model's, the embeddings as a resized vocabulary)."""
    world = top.get("mp_world_size")
    if isinstance(world, int) and not isinstance(world, bool) and world > 1:
        raise CheckpointFormatError(
            f"DeepSpeed model states of one tensor-parallel rank of {world} (mp_world_size {world}): every split matrix "
            "holds a slice of its rows or columns here; a partial model is never analysed", path=path,
            hint="merge the ranks into one model first (e.g. with the training framework's checkpoint conversion to a "
                 "Hugging Face folder), then pass that")


def _also_notes(top: dict, key: str) -> list[str]:
    """A note for each other state dict in ``top`` beside the one read from ``key`` (an EMA copy...)."""
    notes = []
    for other, value in top.items():
        if other == key or not isinstance(other, str) or not _state_like(value):
            continue
        if other == "frozen_param_fragments":  # DeepSpeed: the frozen part of this same model, not another one
            notes.append(f"its {other!r} (parameters DeepSpeed saved apart as frozen) were not read: zero_to_fp32.py "
                         "puts them back into one state dict")
            continue
        what = " (an exponential moving average of the weights)" if "ema" in other.lower() else ""
        notes.append(f"it also holds a state dict under {other!r}{what}, which was not read; to analyse that one, "
                     f"save it alone (torch.save(ckpt[{other!r}], 'weights.pt')) and pass that file")
    return notes


def find_state(path: Path, obj: object) -> FoundState:
    """The state dict in ``obj`` (what ``torch.load`` returned from ``path``): ``obj`` itself, or the one
    under a :data:`WRAPPER_KEYS` key.

    Raises:
        CheckpointFormatError: no state dict (naming the entry that is not a tensor, inside the wrapper when
            there is one); two wrapper keys each holding one (which is the model is ambiguous); a DeepSpeed
            ZeRO-3 file of empty placeholders.
    """
    hint = "save the model with model.state_dict() or safetensors"
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"not a state dict (a mapping of names to tensors); it holds {_type_name(obj)}",
                                    path=path, hint=hint)
    key: str | None = None
    if not obj or _state_like(obj):  # an empty mapping is refused later, as holding no tensors
        inner = obj
    else:
        found = [k for k in WRAPPER_KEYS if _state_like(obj.get(k))]
        if "state_dict" in found:  # read first since spectra's first release: a file it read keeps reading the same
            found = ["state_dict"]
        if len(found) > 1:
            raise CheckpointFormatError(
                f"holds a state dict under both {found[0]!r} and {found[1]!r}: which one is the model is ambiguous",
                path=path, hint="save the one you mean: torch.save(model.state_dict(), ...)")
        composer = isinstance(obj.get("state"), dict) and _state_like(obj["state"].get("model"))
        if not found and not composer:
            raise _not_state(path, obj, hint)
        key = found[0] if found else COMPOSER_KEY  # MosaicML Composer: {"state": {"model": ..., "optimizers": ...}, "rng": ...}
        # weight matrices beside the wrapper would be dropped without a word: which are the model? (a step counter, a
        # saved RNG state or normalisation statistics are no weight matrices)
        if top := [k for k, v in obj.items() if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.is_floating_point()]:
            raise CheckpointFormatError(
                f"holds {len(top)} weight matri{'ces' if len(top) != 1 else 'x'} at its top level (e.g. {str(top[0])[:80]!r}) and a state dict "
                f"under {key!r}: which one is the model is ambiguous", path=path,
                hint="save the one you mean: torch.save(model.state_dict(), ...)")
        inner = obj[key] if found else obj["state"]["model"]
    tensors, extra = _strip_extra(inner)
    _refuse_zero3(path, obj, tensors)
    _refuse_tensor_parallel(path, obj)
    notes = []
    if extra:
        notes.append(f"skipped {len(extra)} non-tensor module extra state entr{'y' if len(extra) == 1 else 'ies'} "
                     f"({extra[0]}{', …' if len(extra) > 1 else ''}), not weights")
    if key is not None:
        notes += _also_notes(obj, key)
    return FoundState(tensors, key, tuple(notes))


def _not_state(path: Path, obj: dict, hint: str) -> CheckpointFormatError:
    """The error for a mapping in which no state dict was found: the entry that is not a tensor, inside the
    wrapper key that holds tensors when there is one (not the top-level keys, which are fine); or what the file is,
    when a training loop's own state (an optimizer's, a scheduler's, the random generators')."""
    for keys, what in _NOT_WEIGHTS:
        if all(k in obj for k in keys):
            return CheckpointFormatError(f"{what}, not model weights", path=path, hint=WEIGHTS_BESIDE)
    for k in (*WRAPPER_KEYS, None):
        inner = obj if k is None else obj.get(k)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            where = f"under its {k!r} key, " if k is not None else ""
            return CheckpointFormatError(f"not a state dict (a mapping of names to tensors): {where}{_stray(inner)}",
                                         path=path, hint=hint)
    keys = ", ".join(repr(k)[:40] for k in list(obj)[:6])
    if any(k in obj for k in _DEEPSPEED_KEYS):  # e.g. *_optim_states.pt: optimizer partitions, no model
        return CheckpointFormatError(f"DeepSpeed checkpoint file without model weights (its top-level keys are {keys})",
                                     path=path, hint=ZERO_TO_FP32)
    return CheckpointFormatError("not a state dict (a mapping of names to tensors)" + (f"; its top-level keys are {keys}" if keys else ""),
                                 path=path, hint=hint)
